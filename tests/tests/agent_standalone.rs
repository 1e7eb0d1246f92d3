//! The agent as a real process in standalone mode: loads, pins, attaches, programs the services
//! file, follows edits (inotify) and SIGHUP, rejects bad entries alone, detaches on SIGTERM.

use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{ServiceKey, ServiceValue, maps};
use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir as tempdir},
    netns::{Netns, require_privileges},
};

/// Frontends in the pinned services map, as (VIP, port, proto).
fn pinned_frontends(pin_dir: &std::path::Path) -> BTreeSet<(Ipv4Addr, u16, u8)> {
    let data = MapData::from_pin(pin_dir.join(maps::SERVICES)).expect("pinned services map");
    let map: HashMap<MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(Map::HashMap(data)).unwrap();
    map.keys()
        .map(|k| {
            let k = k.unwrap();
            (
                Ipv4Addr::from(lb_common::wire_addr_v4_octets(&k.addr)),
                u16::from_be(k.port),
                k.proto,
            )
        })
        .collect()
}

fn xdp_attached(ns: &Netns, iface: &str) -> bool {
    ns.ip(&["link", "show", iface])
        .unwrap()
        .contains("prog/xdp")
}

#[test]
fn standalone_agent_follows_its_services_file() {
    require_privileges();
    let ns = Netns::new("standalone").unwrap();
    ns.ip(&[
        "link", "add", "xlb0", "type", "veth", "peer", "name", "xlb1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "xlb0", "up"]).unwrap();
    ns.ip(&["link", "set", "xlb1", "up"]).unwrap();
    let bpffs = BpfFs::new("standalone").unwrap();
    let pin_dir = bpffs.pin_dir();
    let dir = tempdir();
    let file = dir.join("services.yaml");
    std::fs::write(
        &file,
        "services:
  - {name: web, vip: 10.96.0.10, port: 80, backends: [{ip: 10.10.2.11, port: 8080}]}
  - {name: broken, vip: 10.96.0.300, port: 80}
",
    )
    .unwrap();

    let mut agent = Agent::start(
        &ns,
        &[
            "run",
            "--services",
            file.to_str().unwrap(),
            "--iface",
            "xlb0",
            "--pin-dir",
            pin_dir.to_str().unwrap(),
            "--min-sync-period",
            "100ms",
        ],
    )
    .unwrap();
    let line = agent.wait_for_sync(1).unwrap();
    assert!(line.contains("source=file services=1 backends=1"), "{line}");
    agent
        .wait_for(&["rejected", "services[1] \"broken\"", "bad_ip"])
        .unwrap();
    assert!(xdp_attached(&ns, "xlb0"));
    assert!(pin_dir.join("link_xlb0").exists(), "the link is pinned");
    assert_eq!(
        pinned_frontends(&pin_dir),
        BTreeSet::from([(Ipv4Addr::new(10, 96, 0, 10), 80, 6)])
    );

    // An editor-style replace (write a new file, rename over the old one) is seen.
    let tmp = dir.join("services.yaml.new");
    std::fs::write(
        &tmp,
        "services:
  - {name: web, vip: 10.96.0.10, port: 80, backends: [{ip: 10.10.2.11, port: 8080}]}
  - {name: dns, vip: 10.96.0.10, port: 53, protocol: UDP, backends: [{ip: 10.10.2.12, port: 53}]}
",
    )
    .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let line = agent.wait_for_sync(2).unwrap();
    assert!(line.contains("services=2 backends=2"), "{line}");
    assert_eq!(
        pinned_frontends(&pin_dir),
        BTreeSet::from([
            (Ipv4Addr::new(10, 96, 0, 10), 80, 6),
            (Ipv4Addr::new(10, 96, 0, 10), 53, 17)
        ])
    );

    // SIGHUP re-reads the file: a new generation, nothing to change.
    agent.signal(libc::SIGHUP);
    let line = agent.wait_for_sync(3).unwrap();
    assert!(line.contains("ops=0"), "{line}");

    // A file that is not YAML keeps the last good state.
    std::fs::write(&file, "services: [ {{{").unwrap();
    agent
        .wait_for(&["services file not applied, keeping the last good state"])
        .unwrap();
    assert_eq!(pinned_frontends(&pin_dir).len(), 2);

    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}");
    assert!(!xdp_attached(&ns, "xlb0"), "SIGTERM detaches");
    assert!(!pin_dir.join("link_xlb0").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn on_exit_keep_leaves_the_program_attached() {
    require_privileges();
    let ns = Netns::new("keep").unwrap();
    ns.ip(&[
        "link", "add", "xlb0", "type", "veth", "peer", "name", "xlb1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "xlb0", "up"]).unwrap();
    let bpffs = BpfFs::new("keep").unwrap();
    let pin_dir = bpffs.pin_dir();
    let dir = tempdir();
    let file = dir.join("services.yaml");
    std::fs::write(&file, "services: []\n").unwrap();
    let args = [
        "run",
        "--services",
        file.to_str().unwrap(),
        "--iface",
        "xlb0",
        "--pin-dir",
        pin_dir.to_str().unwrap(),
        "--on-exit",
        "keep",
    ];
    let mut agent = Agent::start(&ns, &args).unwrap();
    agent.wait_for_sync(1).unwrap();
    assert!(agent.stop().unwrap().success());
    assert!(
        xdp_attached(&ns, "xlb0"),
        "--on-exit keep leaves the program attached"
    );

    // The next agent takes the pinned link over instead of attaching a second time.
    let mut agent = Agent::start(&ns, &args).unwrap();
    agent.wait_for(&["took over the pinned XDP link"]).unwrap();
    agent.wait_for_sync(1).unwrap();
    assert!(agent.stop().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
