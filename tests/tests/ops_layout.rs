//! A layout-version mismatch is refused with a clear message, before anything is created or
//! written, without falling back to IPVS, and the running dataplane is left alone: same pins,
//! same maps (by kernel id and content), same program on the same link, traffic still flowing.

use std::{collections::BTreeMap, net::SocketAddrV4, path::Path};

use aya::maps::{Array, Map, MapData};
use lb_agent::dataplane::pinned::PinnedMaps;
use lb_common::{Config, LAYOUT_VERSION, maps};
use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir},
    netns::require_privileges,
    ops::link_ids,
    topology::{LB_IFACES, Topology, VIP, backend_addr},
    traffic::{TcpClient, tcp_once, udp_once},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);

/// Everything observable about the pinned dataplane except counters and conntrack timestamps.
#[derive(Debug, PartialEq)]
struct Snapshot {
    pins: BTreeMap<String, u32>,
    frontends: String,
    backends: String,
    config: Config,
    links: Vec<(u32, u32)>,
}

fn snapshot(pin_dir: &Path) -> Snapshot {
    let mut pins = BTreeMap::new();
    for entry in std::fs::read_dir(pin_dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !name.starts_with("link_") {
            let id = MapData::from_pin(pin_dir.join(&name))
                .unwrap()
                .info()
                .unwrap()
                .id();
            pins.insert(name, id);
        } else {
            pins.insert(name, 0);
        }
    }
    let maps = PinnedMaps::open(pin_dir).unwrap();
    Snapshot {
        pins,
        frontends: format!("{:?}", maps.frontends().unwrap()),
        backends: format!(
            "{:?}",
            maps.backends()
                .unwrap()
                .iter()
                .map(|b| (b.id, b.addr, b.weight))
                .collect::<Vec<_>>()
        ),
        config: maps.config().unwrap(),
        links: LB_IFACES.split(',').map(|i| link_ids(pin_dir, i)).collect(),
    }
}

fn set_layout_version(pin_dir: &Path, version: u32) {
    let data = MapData::from_pin(pin_dir.join(maps::CONFIG)).unwrap();
    let mut config: Array<MapData, Config> = Array::try_from(Map::Array(data)).unwrap();
    let mut value = config.get(&0, 0).unwrap();
    value.layout_version = version;
    config.set(0, value, 0).unwrap();
}

#[test]
fn another_layout_version_is_refused_and_the_running_dataplane_left_alone() {
    require_privileges();
    let topo = Topology::new(2).unwrap();
    let bpffs = BpfFs::new("layout").unwrap();
    let pin_dir = bpffs.pin_dir();
    let dir = scratch_dir();
    let file = dir.join("services.yaml");
    std::fs::write(
        &file,
        format!(
            "services:
  - name: web
    vip: {VIP}
    port: 80
    backends: [{{ip: {}, port: 8080}}, {{ip: {}, port: 8080}}]
  - name: echo-udp
    vip: {VIP}
    port: 53
    protocol: UDP
    backends: [{{ip: {}, port: 5353}}]
",
            backend_addr(0),
            backend_addr(1),
            backend_addr(0)
        ),
    )
    .unwrap();
    let status_file = dir.join("status.json");
    let args = [
        "run",
        "--services",
        file.to_str().unwrap(),
        "--iface",
        LB_IFACES,
        "--pin-dir",
        pin_dir.to_str().unwrap(),
        "--status-file",
        status_file.to_str().unwrap(),
    ];
    let mut agent = Agent::start(&topo.lb, &args).unwrap();
    agent.wait_for_sync(1).unwrap();
    let (kept, backend) = topo
        .client
        .run(|| {
            let mut c = TcpClient::connect(WEB).unwrap();
            let b = c.ask().unwrap().backend;
            (c, b)
        })
        .unwrap();
    // As after an upgrade from (or a rollback to) an agent with another layout: the old one is
    // gone, its dataplane runs on.
    agent.kill().unwrap();
    set_layout_version(&pin_dir, LAYOUT_VERSION + 98);
    let before = snapshot(&pin_dir);

    // `--dataplane auto` (the default): a refusal must not fall back to IPVS either.
    let refused = Agent::start(&topo.lb, &args).unwrap();
    let (status, log) = refused.wait().unwrap();
    assert!(!status.success(), "the agent must refuse: {log}");
    let expected = format!(
        "have layout version {}, this agent uses {LAYOUT_VERSION}; refusing to adopt them and \
         leaving the running dataplane alone",
        LAYOUT_VERSION + 98
    );
    assert!(log.contains(&expected), "{log}");
    assert!(
        log.contains("lb-agent cleanup"),
        "the message names the way out: {log}"
    );
    assert!(!log.contains("IPVS"), "no fallback was tried: {log}");
    assert!(!log.contains("sync applied"), "{log}");

    let after = snapshot(&pin_dir);
    assert_eq!(before, after, "pins, maps, program and link are untouched");

    // Traffic still flows: the open connection, new connections, UDP.
    let answered = topo
        .client
        .run(move || {
            let mut kept = kept;
            let r = kept.ask().unwrap().backend;
            (
                r,
                tcp_once(WEB).unwrap(),
                udp_once(SocketAddrV4::new(VIP, 53)).unwrap(),
            )
        })
        .unwrap();
    assert_eq!(answered.0, backend);
    assert_eq!(answered.2.backend, "b1");

    // With the matching version back, an agent adopts the same dataplane again.
    set_layout_version(&pin_dir, LAYOUT_VERSION);
    let mut agent = Agent::start(&topo.lb, &args).unwrap();
    let line = agent.wait_for_sync(1).unwrap();
    assert!(line.contains("ops=0"), "{line}");
    assert!(agent.stop().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
