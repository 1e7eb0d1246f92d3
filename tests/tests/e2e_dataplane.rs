//! End to end: the agent as a real process on the LB namespace, real TCP and UDP from a client
//! namespace to the VIP, real servers in three backend namespaces.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddrV4},
};

use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir},
    netns::require_privileges,
    topology::{CLIENT_ADDR, Topology, VIP, backend_addr},
    traffic::{Reply, TcpClient, tally, tcp_once, udp_once},
};

fn services(weights: &[u32]) -> String {
    let backends = |port: u16| -> String {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "      - {{ip: {}, port: {port}, weight: {w}}}\n",
                    backend_addr(i)
                )
            })
            .collect()
    };
    format!(
        "services:
  - name: web
    vip: {VIP}
    port: 80
    protocol: TCP
    backends:
{}  - name: echo-udp
    vip: {VIP}
    port: 53
    protocol: UDP
    backends:
{}",
        backends(8080),
        backends(5353)
    )
}

struct Setup {
    topo: Topology,
    agent: Agent,
    file: std::path::PathBuf,
    _bpffs: BpfFs,
}

fn setup(weights: &[u32]) -> Setup {
    require_privileges();
    let topo = Topology::new(3).unwrap();
    let bpffs = BpfFs::new("e2e").unwrap();
    let file = scratch_dir().join("services.yaml");
    std::fs::write(&file, services(weights)).unwrap();
    let mut agent = topo
        .start_agent(&["--services", file.to_str().unwrap()], &bpffs.pin_dir())
        .unwrap();
    agent.wait_for_sync(1).unwrap();
    Setup {
        topo,
        agent,
        file,
        _bpffs: bpffs,
    }
}

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const ECHO: SocketAddrV4 = SocketAddrV4::new(VIP, 53);

fn connections(s: &Setup, n: usize) -> Vec<Reply> {
    s.topo
        .client
        .run(move || {
            (0..n)
                .map(|i| tcp_once(WEB).unwrap_or_else(|e| panic!("connection {i}: {e}")))
                .collect()
        })
        .unwrap()
}

#[test]
fn tcp_and_udp_through_the_vip_reach_every_backend_and_see_the_client() {
    let s = setup(&[1, 1, 1]);
    let replies = connections(&s, 300);
    let counts = tally(&replies);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, n) in &counts {
        assert!(
            (65..=135).contains(n),
            "backend {backend} got {n} of 300 connections: {counts:?}"
        );
    }
    for r in &replies {
        assert_eq!(
            r.seen_client.ip(),
            IpAddr::V4(CLIENT_ADDR),
            "backends see the client's real address"
        );
    }

    // Several requests on one connection all land on the same backend.
    let sticky: Vec<Vec<String>> = s
        .topo
        .client
        .run(|| {
            (0..20)
                .map(|_| {
                    let mut c = TcpClient::connect(WEB).unwrap();
                    (0..5).map(|_| c.ask().unwrap().backend).collect()
                })
                .collect()
        })
        .unwrap();
    for requests in &sticky {
        assert!(
            requests.iter().all(|b| b == &requests[0]),
            "a connection moved between backends: {requests:?}"
        );
    }

    // UDP: the connected socket only accepts datagrams from the VIP, so an answer proves the
    // reply was reverse-NATed.
    let udp: Vec<Reply> = s
        .topo
        .client
        .run(|| (0..60).map(|_| udp_once(ECHO).unwrap()).collect())
        .unwrap();
    assert_eq!(tally(&udp).len(), 3, "{:?}", tally(&udp));
    assert!(
        udp.iter()
            .all(|r| r.seen_client.ip() == IpAddr::V4(CLIENT_ADDR))
    );
}

#[test]
fn traffic_not_for_a_service_is_untouched() {
    let s = setup(&[1, 1, 1]);
    // Ping between namespaces, routed by the LB node.
    s.topo
        .client
        .exec(&["ping", "-c", "2", "-W", "5", &backend_addr(0).to_string()])
        .unwrap();
    // Direct TCP and UDP to a backend, through the LB, not NATed.
    let direct = SocketAddrV4::new(backend_addr(1), 8080);
    let r = s
        .topo
        .client
        .run(move || tcp_once(direct))
        .unwrap()
        .unwrap();
    assert_eq!(r.backend, "b2");
    let r = s
        .topo
        .client
        .run(move || udp_once(SocketAddrV4::new(backend_addr(2), 5353)))
        .unwrap()
        .unwrap();
    assert_eq!(r.backend, "b3");
    // Another port on the VIP is not a service: nothing answers (the VIP is nobody's address).
    let other = SocketAddrV4::new(VIP, 81);
    let refused = s.topo.client.run(move || tcp_once(other)).unwrap();
    assert!(
        refused.is_err(),
        "port 81 on the VIP is not a service: {refused:?}"
    );
}

#[test]
fn removing_a_backend_moves_new_connections_and_keeps_open_ones() {
    let mut s = setup(&[1, 1, 1]);
    // Open connections and keep them; find one on a backend that survives (b1 or b3).
    let (kept, kept_backend) = s
        .topo
        .client
        .run(|| {
            loop {
                let mut c = TcpClient::connect(WEB).unwrap();
                let b = c.ask().unwrap().backend;
                if b != "b2" {
                    return (c, b);
                }
            }
        })
        .unwrap();

    let removed = services(&[1, 1, 1])
        .lines()
        .filter(|l| !l.contains(&backend_addr(1).to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&s.file, removed + "\n").unwrap();
    s.agent.wait_for_sync(2).unwrap();

    let replies = connections(&s, 150);
    let counts = tally(&replies);
    assert!(
        !counts.contains_key("b2"),
        "new connections still reach the removed backend: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    // UDP moves too: its flows to b2 were deleted from conntrack, none is blackholed.
    let udp: Vec<Reply> = s
        .topo
        .client
        .run(|| (0..30).map(|_| udp_once(ECHO).unwrap()).collect())
        .unwrap();
    assert!(!tally(&udp).contains_key("b2"));

    let still = s
        .topo
        .client
        .run(move || {
            let mut kept = kept;
            (0..3)
                .map(|_| kept.ask().unwrap().backend)
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(
        still.iter().all(|b| *b == kept_backend),
        "the open connection to {kept_backend} moved: {still:?}"
    );
}

#[test]
fn weights_3_1_1_give_about_60_20_20() {
    let s = setup(&[3, 1, 1]);
    let replies = connections(&s, 500);
    let counts: BTreeMap<String, usize> = tally(&replies);
    let share = |b: &str| *counts.get(b).unwrap_or(&0) as f64 / 500.0;
    assert!((share("b1") - 0.6).abs() <= 0.08, "{counts:?}");
    assert!((share("b2") - 0.2).abs() <= 0.08, "{counts:?}");
    assert!((share("b3") - 0.2).abs() <= 0.08, "{counts:?}");
}
