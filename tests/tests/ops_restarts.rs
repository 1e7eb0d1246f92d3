//! Restarts lose nothing: 100 long-lived TCP connections and a steady UDP request stream go
//! through the VIP while the agent is SIGKILLed and restarted ten times. The program stays
//! attached through its pinned link while no agent runs; each new agent adopts the pinned maps,
//! replaces the program atomically (same link, new program) and finds nothing to write; the
//! counters scraped from /metrics carry on across restarts.

use std::{
    collections::BTreeMap,
    net::{SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lb_common::FlowKey;
use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir},
    http::{get, sample},
    netns::require_privileges,
    ops::{FlowDecision, conntrack, link_ids},
    topology::{CLIENT_ADDR, LB_IFACES, Topology, VIP, backend_addr},
    traffic::{TcpClient, udp_ask},
};

const WEB: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const ECHO: SocketAddrV4 = SocketAddrV4::new(VIP, 53);
const RESTARTS: usize = 10;
const CONNECTIONS: usize = 100;

fn services() -> String {
    let backends = |port: u16| -> String {
        (0..3)
            .map(|i| format!("      - {{ip: {}, port: {port}}}\n", backend_addr(i)))
            .collect()
    };
    format!(
        "services:
  - name: web
    vip: {VIP}
    port: 80
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

/// What the UDP stream saw.
#[derive(Debug, Default)]
struct UdpTally {
    sent: usize,
    answered: usize,
    lost: Vec<String>,
}

/// Requests on one long-lived connected socket, plus a fresh socket (a new flow the program
/// schedules on its own) every tenth request, one attempt each: any loss is a failure.
fn udp_stream(stop: Arc<AtomicBool>) -> UdpTally {
    let mut tally = UdpTally::default();
    let steady = UdpSocket::bind("0.0.0.0:0").unwrap();
    steady.connect(ECHO).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let fresh;
        let socket = if tally.sent % 10 == 9 {
            fresh = UdpSocket::bind("0.0.0.0:0").unwrap();
            fresh.connect(ECHO).unwrap();
            &fresh
        } else {
            &steady
        };
        tally.sent += 1;
        match udp_ask(socket, 1) {
            Ok(_) => tally.answered += 1,
            Err(e) => tally.lost.push(format!("request {}: {e}", tally.sent)),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tally
}

/// The conntrack entries of the client's TCP connections to the VIP (forward direction) and of
/// their replies.
fn tcp_flows(pin_dir: &std::path::Path) -> BTreeMap<FlowKey, FlowDecision> {
    let client = lb_common::wire_addr_v4(CLIENT_ADDR.octets());
    conntrack(pin_dir)
        .into_iter()
        .filter(|(k, _)| {
            k.proto == lb_common::proto::TCP && (k.src_addr == client || k.dst_addr == client)
        })
        .collect()
}

#[test]
fn sigkill_and_restart_ten_times_loses_no_connection_and_no_request() {
    require_privileges();
    let topo = Topology::new(3).unwrap();
    let bpffs = BpfFs::new("restart").unwrap();
    let pin_dir = bpffs.pin_dir();
    let dir = scratch_dir();
    let file = dir.join("services.yaml");
    std::fs::write(&file, services()).unwrap();
    let status_file = dir.join("status.json");
    let args = [
        "run",
        "--services",
        file.to_str().unwrap(),
        "--iface",
        LB_IFACES,
        "--pin-dir",
        pin_dir.to_str().unwrap(),
        "--min-sync-period",
        "100ms",
        "--status-file",
        status_file.to_str().unwrap(),
        "--metrics-bind-address",
        "127.0.0.1:10249",
    ];
    let udp_packets = |topo: &Topology| -> f64 {
        let (code, body) = get(&topo.lb, "127.0.0.1:10249".parse().unwrap(), "/metrics").unwrap();
        assert_eq!(code, 200);
        sample(
            &body,
            "xlb_service_packets_total{service=\"echo-udp\",frontend=\"10.96.0.10:53/UDP\"}",
        )
        .unwrap_or_else(|| panic!("no UDP counter in:\n{body}"))
    };
    let mut agent = Agent::start(&topo.lb, &args).unwrap();
    let using = agent.wait_for(&["Using xdp dataplane"]).unwrap();
    assert!(using.contains("scheduler=mh"), "{using}");
    agent.wait_for_sync(1).unwrap();

    // Warm up (neighbours resolved on every path), then the long-lived connections.
    let warm = topo
        .client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(ECHO).unwrap();
            udp_ask(&s, 5).map(|r| r.backend)
        })
        .unwrap();
    assert!(warm.is_ok(), "{warm:?}");
    let mut conns: Vec<(TcpClient, String)> = topo
        .client
        .run(|| {
            (0..CONNECTIONS)
                .map(|i| {
                    let mut c =
                        TcpClient::connect(WEB).unwrap_or_else(|e| panic!("connection {i}: {e}"));
                    let b = c.ask().unwrap().backend;
                    (c, b)
                })
                .collect()
        })
        .unwrap();
    let flows = tcp_flows(&pin_dir);
    assert_eq!(
        flows.len(),
        2 * CONNECTIONS,
        "both directions of every connection are tracked"
    );
    let ifaces: Vec<&str> = LB_IFACES.split(',').collect();
    let first_links: Vec<(u32, u32)> = ifaces.iter().map(|i| link_ids(&pin_dir, i)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let udp = {
        let stop = stop.clone();
        topo.client.spawn(move || udp_stream(stop)).unwrap()
    };

    let mut programs: Vec<u32> = first_links.iter().map(|(_, p)| *p).collect();
    let mut counted = udp_packets(&topo);
    for round in 0..RESTARTS {
        agent.kill().unwrap();
        // No agent: the pinned link keeps the program attached and forwarding.
        conns = topo
            .client
            .run(move || {
                for (i, (c, backend)) in conns.iter_mut().enumerate().step_by(10) {
                    let r = c
                        .ask()
                        .unwrap_or_else(|e| panic!("round {round}, agent down, conn {i}: {e}"));
                    assert_eq!(&r.backend, backend, "connection {i} moved");
                }
                conns
            })
            .unwrap();

        agent = Agent::start(&topo.lb, &args).unwrap();
        agent.wait_for(&["adopted state from pinned maps"]).unwrap();
        for iface in &ifaces {
            agent
                .wait_for(&["took over the pinned XDP link", &format!("link_{iface}")])
                .unwrap();
        }
        let line = agent.wait_for_sync(1).unwrap();
        assert!(
            line.contains("ops=0"),
            "round {round}: the adopted maps already match the model: {line}"
        );
        for (i, iface) in ifaces.iter().enumerate() {
            let (link, program) = link_ids(&pin_dir, iface);
            assert_eq!(
                link, first_links[i].0,
                "round {round}: {iface} keeps its link"
            );
            assert_ne!(
                program, programs[i],
                "round {round}: {iface} runs the new agent's program"
            );
            programs[i] = program;
        }
        // Scraped during the stream: the per-CPU counters live in pinned maps, so they carry on
        // across restarts instead of starting again from zero.
        let now_counted = udp_packets(&topo);
        assert!(
            now_counted > counted,
            "round {round}: UDP packets {now_counted} after {counted}"
        );
        counted = now_counted;
        // Conntrack was adopted, not flushed: every connection's entries decide the same.
        let now = tcp_flows(&pin_dir);
        for (key, decision) in &flows {
            assert_eq!(
                now.get(key),
                Some(decision),
                "round {round}: conntrack entry {key:?} changed or vanished"
            );
        }
    }

    stop.store(true, Ordering::Relaxed);
    let tally = udp.join().unwrap();
    assert!(
        tally.lost.is_empty(),
        "{} of {} UDP requests unanswered: {:?}",
        tally.lost.len(),
        tally.sent,
        tally.lost
    );
    assert_eq!(tally.answered, tally.sent);
    assert!(
        tally.sent >= 50,
        "the stream ran through the restarts: {tally:?}"
    );

    // Every connection still answers, from the backend it started on.
    topo.client
        .run(move || {
            for (i, (c, backend)) in conns.iter_mut().enumerate() {
                let r = c
                    .ask()
                    .unwrap_or_else(|e| panic!("connection {i} after the restarts: {e}"));
                assert_eq!(&r.backend, backend, "connection {i} moved");
                assert_eq!(r.seen_client.ip(), std::net::IpAddr::V4(CLIENT_ADDR));
            }
        })
        .unwrap();
    assert!(agent.stop().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
