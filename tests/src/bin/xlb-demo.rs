//! `cargo xtask demo`: builds the end-to-end topology (a client, an LB node, three backends, each
//! in its own network namespace), runs the agent on the LB node with the example services file,
//! sends real TCP and UDP through the VIP, and shows where it went: hits per backend, a few
//! conntrack entries, and the services map as bpftool reads it (field names from BTF).
//! Everything it creates is removed on exit, also on failure or Ctrl-C.

use std::{net::SocketAddrV4, path::Path};

use anyhow::Context as _;
use lb_agent::dataplane::pinned::PinnedMaps;
use lb_common::{FLOW_F_REPLY, FlowKey, FlowValue, maps, wire_addr_v4_octets};
use xlb_tests::{
    agent::{Agent, BpfFs},
    netns::{remove_leftovers, require_privileges, sh},
    topology::{LB_IFACES, Topology, VIP},
    traffic::{Reply, tally, tcp_once, udp_once},
};

const CONNECTIONS: usize = 30;

fn main() -> anyhow::Result<()> {
    require_privileges();
    ctrlc::set_handler(|| {
        eprintln!("\ndemo: interrupted, removing namespaces and pins");
        remove_leftovers();
        std::process::exit(130);
    })?;
    let services = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/services.yaml");
    let services = services
        .canonicalize()
        .context("deploy/examples/services.yaml")?;

    println!(
        "demo: building namespaces: client 10.10.1.2 -> LB 10.10.1.1|10.10.2.1 -> backends b1..b3 10.10.2.11-13"
    );
    let topo = Topology::new(3)?;
    let bpffs = BpfFs::new("demo")?;
    let pin_dir = bpffs.pin_dir();

    println!(
        "demo: starting lb-agent on the LB node with {}",
        services.display()
    );
    let mut agent = Agent::start(
        &topo.lb,
        &[
            "run",
            "--services",
            services.to_str().unwrap(),
            "--iface",
            LB_IFACES,
            "--pin-dir",
            pin_dir.to_str().unwrap(),
        ],
    )?;
    println!("demo: agent: {}", agent.wait_for_sync(1)?.trim());

    let web = SocketAddrV4::new(VIP, 80);
    let tcp: Vec<Reply> = topo.client.run(move || {
        (0..CONNECTIONS)
            .map(|_| tcp_once(web))
            .collect::<Result<_, _>>()
    })??;
    let echo = SocketAddrV4::new(VIP, 53);
    let udp: Vec<Reply> = topo.client.run(move || {
        (0..CONNECTIONS)
            .map(|_| udp_once(echo))
            .collect::<Result<_, _>>()
    })??;

    println!(
        "\ndemo: {CONNECTIONS} TCP connections to {web} and {CONNECTIONS} UDP requests to {echo}, answered by:"
    );
    let (tcp_hits, udp_hits) = (tally(&tcp), tally(&udp));
    for backend in tcp_hits
        .keys()
        .chain(udp_hits.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        println!(
            "  {backend}: {:>3} TCP  {:>3} UDP",
            tcp_hits.get(backend).unwrap_or(&0),
            udp_hits.get(backend).unwrap_or(&0)
        );
    }
    println!(
        "  every backend saw the client's own address: {}",
        tcp.iter()
            .chain(&udp)
            .all(|r| r.seen_client.ip() == std::net::Ipv4Addr::new(10, 10, 1, 2))
    );

    println!(
        "\ndemo: a few conntrack entries (forward: client -> VIP => backend; reply: backend -> client => VIP)"
    );
    let flows = conntrack(&pin_dir)?;
    let (replies, forwards): (Vec<_>, Vec<_>) =
        flows.iter().partition(|(_, v)| v.flags & FLOW_F_REPLY != 0);
    for (key, value) in forwards.iter().take(3).chain(replies.iter().take(3)) {
        println!("  {}", describe(key, value));
    }
    println!("  ({} entries in all)", flows.len());

    let map = pin_dir.join(maps::SERVICES);
    println!("\ndemo: bpftool map dump pinned {}", map.display());
    println!(
        "{}",
        sh(&["bpftool", "map", "dump", "pinned", map.to_str().unwrap()])?
    );
    agent.stop()?;
    println!("demo: done; namespaces and pins removed");
    Ok(())
}

fn conntrack(pin_dir: &Path) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
    let mut flows = PinnedMaps::open(pin_dir)?.flows()?;
    flows.sort_by_key(|(k, v)| (v.flags & FLOW_F_REPLY, k.proto, u16::from_be(k.src_port)));
    Ok(flows)
}

fn describe(key: &FlowKey, value: &FlowValue) -> String {
    let addr = |a: &[u32; 4], port: u16| {
        format!(
            "{}:{}",
            std::net::Ipv4Addr::from(wire_addr_v4_octets(a)),
            u16::from_be(port)
        )
    };
    let proto = if key.proto == lb_common::proto::TCP {
        "TCP"
    } else {
        "UDP"
    };
    let kind = if value.flags & FLOW_F_REPLY != 0 {
        "reply  "
    } else {
        "forward"
    };
    format!(
        "{kind} {proto} {} -> {} => {}",
        addr(&key.src_addr, key.src_port),
        addr(&key.dst_addr, key.dst_port),
        addr(&value.nat_addr, value.nat_port)
    )
}
