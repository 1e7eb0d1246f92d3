//! Packet tests of the schedulers and of session affinity: exact pick sequences on one CPU,
//! least-connection counting (including after LRU eviction), and ClientIP pins.

use std::{net::Ipv4Addr, time::Duration};

use lb_agent::{
    dataplane::xdp::LoadOptions,
    model::{Backend, Protocol},
    plan::FrontendKey,
};
use lb_common::{FLOW_F_COUNTED, FLOW_F_REPLY, proto};
use xlb_tests::packet::{Harness, decode_checked, flow_key, syn, tcp_frame};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB: FrontendKey = FrontendKey {
    addr: std::net::IpAddr::V4(VIP),
    port: 80,
    protocol: Protocol::Tcp,
};
const B: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 10, 2, 11),
    Ipv4Addr::new(10, 10, 2, 12),
    Ipv4Addr::new(10, 10, 2, 13),
];

fn service(scheduler: &str, weights: [u32; 3], extra: &str) -> String {
    let backends: Vec<String> = B
        .iter()
        .zip(weights)
        .map(|(b, w)| format!("{{ip: {b}, port: 8080, weight: {w}}}"))
        .collect();
    format!(
        "services:\n  - {{name: web, vip: {VIP}, port: 80, scheduler: {scheduler}, backends: [{}]{extra}}}\n",
        backends.join(", ")
    )
}

fn harness(services: &str) -> Harness {
    let mut h = Harness::new();
    h.pin_to_cpu(0);
    h.program(services);
    h
}

/// Index (0..3) of the backend a new connection from `client` lands on.
fn connect(h: &Harness, client: (Ipv4Addr, u16)) -> usize {
    let d = decode_checked(&h.run(&syn(client, (VIP, 80))).frame);
    B.iter()
        .position(|b| *b == d.dst().0)
        .unwrap_or_else(|| panic!("not a backend: {:?}", d.dst()))
}

fn sequence(h: &Harness, n: u16) -> Vec<usize> {
    (0..n).map(|i| connect(h, (CLIENT, 30000 + i))).collect()
}

#[test]
fn rr_goes_round_in_order_on_one_cpu() {
    let h = harness(&service("rr", [5, 1, 1], ""));
    assert_eq!(
        sequence(&h, 9),
        [0, 1, 2, 0, 1, 2, 0, 1, 2],
        "rr ignores weights"
    );
}

/// Smooth weighted round robin: 3:1:1 interleaves as a b a c a, not IPVS's a a a b c.
#[test]
fn wrr_is_smooth_and_exact_on_one_cpu() {
    let h = harness(&service("wrr", [3, 1, 1], ""));
    assert_eq!(sequence(&h, 10), [0, 1, 0, 2, 0, 0, 1, 0, 2, 0]);
}

#[test]
fn sh_hashes_the_client_address_only() {
    let h = harness(&service("sh", [1, 1, 1], ""));
    let one_client: Vec<usize> = (0..20).map(|p| connect(&h, (CLIENT, 20000 + p))).collect();
    assert!(
        one_client.iter().all(|&b| b == one_client[0]),
        "{one_client:?}"
    );
    // The pick is the Maglev table's slot for the client address: predictable from lb-common's
    // hash and the agent's table builder.
    let backends: Vec<Backend> = B
        .iter()
        .map(|&b| Backend::ready(b.into(), 8080, 1))
        .collect();
    let table = lb_agent::sched_table::maglev(&backends);
    let mut seen = [0usize; 3];
    for i in 0..60u8 {
        let client = Ipv4Addr::new(10, 10, 3, i + 1);
        let got = connect(&h, (client, 40000));
        let key = flow_key((client, 0), (VIP, 0), proto::TCP);
        let slot = lb_common::hash::maglev_slot(lb_common::hash::source_hash(&key.src_addr));
        assert_eq!(got, table[slot as usize] as usize, "client {client}");
        seen[got] += 1;
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "60 clients spread over every backend: {seen:?}"
    );
}

fn conns(h: &Harness) -> [i64; 3] {
    B.map(|b| {
        h.dataplane
            .maps
            .backend_conns(h.dataplane.maps.backend_id(&WEB, b.into(), 8080).unwrap())
            .unwrap()
    })
}

fn close(h: &Harness, client: (Ipv4Addr, u16)) {
    h.run(&tcp_frame(
        client,
        (VIP, 80),
        |t| {
            t.fin = true;
            t.ack = true
        },
        &[],
    ));
}

#[test]
fn lc_sends_new_flows_to_the_backend_with_fewest_open_ones() {
    let h = harness(&service("lc", [1, 1, 1], ""));
    // Ties go to the first backend, so six flows fill the three evenly.
    assert_eq!(sequence(&h, 6), [0, 1, 2, 0, 1, 2]);
    assert_eq!(conns(&h), [2, 2, 2]);
    // Close both flows on the second backend (FIN from the client; then one from the backend's
    // side, which must not count twice).
    close(&h, (CLIENT, 30001));
    close(&h, (CLIENT, 30004));
    h.run(&tcp_frame(
        (B[1], 8080),
        (CLIENT, 30001),
        |t| {
            t.fin = true;
            t.ack = true
        },
        &[],
    ));
    assert_eq!(conns(&h), [2, 0, 2]);
    assert_eq!(
        (0..4)
            .map(|i| connect(&h, (CLIENT, 31000 + i)))
            .collect::<Vec<_>>(),
        [1, 1, 0, 1]
    );
    // A RST from the backend's side closes a flow too.
    let reply_side = (B[2], 8080);
    h.run(&tcp_frame(
        reply_side,
        (CLIENT, 30002),
        |t| t.rst = true,
        &[],
    ));
    assert_eq!(conns(&h)[2], 1);
}

#[test]
fn wlc_weighs_the_counts() {
    let h = harness(&service("wlc", [2, 1, 1], ""));
    sequence(&h, 8);
    assert_eq!(conns(&h), [4, 2, 2], "flows follow the weights 2:1:1");
}

/// The LRU map evicts flows the program never sees close; the agent's recount makes the counts
/// true again.
#[test]
fn lc_counts_stay_honest_under_lru_eviction() {
    let mut h = Harness::with_options(LoadOptions {
        pin_dir: None,
        conntrack_max: 64,
        ..LoadOptions::default()
    });
    h.pin_to_cpu(0);
    h.program(&service("lc", [1, 1, 1], ""));
    for i in 0..300 {
        connect(&h, (CLIENT, 10000 + i));
    }
    let counted_before: i64 = conns(&h).iter().sum();
    assert_eq!(
        counted_before, 300,
        "the program counted every flow it opened"
    );
    let flows = h.dataplane.maps.flows().unwrap();
    assert!(
        flows.len() < 300,
        "the LRU map evicted flows ({} left)",
        flows.len()
    );

    h.dataplane.maps.maintain().unwrap();
    let mut live = [0i64; 3];
    for (_, v) in h.dataplane.maps.flows().unwrap() {
        if v.flags & FLOW_F_REPLY == 0 && v.flags & FLOW_F_COUNTED != 0 {
            let b = B
                .iter()
                .position(|b| {
                    h.dataplane.maps.backend_id(&WEB, (*b).into(), 8080) == Some(v.backend_id)
                })
                .unwrap();
            live[b] += 1;
        }
    }
    assert_eq!(
        conns(&h),
        live,
        "after the recount, counts equal the tracked open flows"
    );
    assert!(live.iter().sum::<i64>() > 0);
}

#[test]
fn affinity_pins_a_client_until_it_idles_out() {
    // rr makes every fresh pick predictable: the cursor only moves when the scheduler runs.
    let h = harness(&service(
        "rr",
        [1, 1, 1],
        ", sessionAffinity: {clientIP: {timeoutSeconds: 1}}",
    ));
    let first = connect(&h, (CLIENT, 30000));
    for p in 1..10 {
        assert_eq!(
            connect(&h, (CLIENT, 30000 + p)),
            first,
            "same client, same backend"
        );
    }
    let other = Ipv4Addr::new(10, 10, 1, 3);
    let second = connect(&h, (other, 30000));
    assert_ne!(second, first, "a second client gets its own pick");
    assert_eq!(connect(&h, (other, 30001)), second);

    // Idle past the 1 s timeout (coarse clock): the next flow is scheduled afresh.
    std::thread::sleep(Duration::from_millis(2500));
    let after = connect(&h, (CLIENT, 31000));
    assert_ne!(after, first, "the pin expired, rr moved on");
    assert_eq!(
        connect(&h, (CLIENT, 31001)),
        after,
        "and the new pick is pinned"
    );
}

#[test]
fn affinity_works_with_maglev_and_rebalances_when_the_backend_goes() {
    let extra = ", sessionAffinity: {clientIP: {timeoutSeconds: 600}}";
    let mut h = harness(&service("maglev", [1, 1, 1], extra));
    let picks: Vec<usize> = (0..20).map(|p| connect(&h, (CLIENT, 20000 + p))).collect();
    assert!(
        picks.iter().all(|&b| b == picks[0]),
        "maglev alone would spread these: {picks:?}"
    );
    // Remove the pinned backend: the client is re-balanced at once.
    let gone = picks[0];
    let weights: [u32; 3] = std::array::from_fn(|i| if i == gone { 0 } else { 1 });
    let without: String = service("maglev", weights, extra)
        .replace(&format!("{{ip: {}, port: 8080, weight: 0}}, ", B[gone]), "")
        .replace(&format!(", {{ip: {}, port: 8080, weight: 0}}", B[gone]), "");
    assert!(!without.contains(&B[gone].to_string()), "{without}");
    h.program(&without);
    let now: Vec<usize> = (0..10).map(|p| connect(&h, (CLIENT, 21000 + p))).collect();
    assert!(now.iter().all(|&b| b != gone), "{now:?}");
    assert!(
        now.iter().all(|&b| b == now[0]),
        "and pinned to its new backend: {now:?}"
    );
}
