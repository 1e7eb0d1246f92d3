//! Packet checks for a VM: loads an lb-ebpf object (the path given, with private maps), programs
//! it through the agent's sync code and runs a few frames through it with BPF_PROG_TEST_RUN, as
//! the host's packet tests do. `tests/tests/xdp_vm.rs` builds it statically (musl) and runs it
//! inside a VM with an older kernel, so the program is not only accepted by that kernel's
//! verifier but also does what it should there.
//!
//! Prints `PASS <check>` or `FAIL <check>: <why>` per check (a panic, such as a load the kernel
//! refuses, ends the run), then `done: passed=N failed=M`, and exits non-zero on any failure.
//! The test on the host asserts on every check by name, so a check that never ran fails too.

use std::{
    net::{IpAddr, Ipv4Addr},
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
};

use etherparse::{Icmpv4Type, TransportHeader};
use lb_agent::{dataplane::xdp::LoadOptions, model::Backend};
use lb_common::proto;
use xlb_tests::packet::{
    CLIENT_MAC, Harness, LB_MAC, XDP_PASS, XDP_TX, decode_checked, flow_key, maglev_choice, syn,
    tcp_frame, udp_frame,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 10, 2, 11),
    Ipv4Addr::new(10, 10, 2, 12),
    Ipv4Addr::new(10, 10, 2, 13),
];

/// web: Maglev over three backends; lc: least-connection (the `bpf_loop` scan); empty TCP and
/// UDP frontends for the refusals.
const SERVICES: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - {ip: 10.10.2.11, port: 8080}
      - {ip: 10.10.2.12, port: 8080}
      - {ip: 10.10.2.13, port: 8080}
  - name: lc
    vip: 10.96.0.10
    port: 81
    scheduler: lc
    backends:
      - {ip: 10.10.2.11, port: 8081}
      - {ip: 10.10.2.12, port: 8081}
  - {name: empty-tcp, vip: 10.96.0.10, port: 82, protocol: TCP, backends: []}
  - {name: empty-udp, vip: 10.96.0.10, port: 53, protocol: UDP, backends: []}
";

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!("IPv4 backends only"),
    }
}

/// Each check: a name and a body that panics (assert!) on failure.
type Check = (&'static str, fn(&Harness));

const CHECKS: &[Check] = &[
    ("new-flow-dnat", |h| {
        let client = (CLIENT, 40000);
        let out = h.run(&syn(client, (VIP, 80)));
        assert_eq!(
            out.action, XDP_PASS,
            "no route in the namespace: to the stack"
        );
        let d = decode_checked(&out.frame);
        let backends: Vec<Backend> = BACKENDS
            .iter()
            .map(|&b| Backend::ready(b.into(), 8080, 1))
            .collect();
        let want = maglev_choice(&backends, &flow_key(client, (VIP, 80), proto::TCP));
        assert_eq!(d.dst(), (v4(want.addr), 8080), "DNAT to the Maglev choice");
        assert_eq!(d.src(), client, "the backend sees the real client");
    }),
    ("established-and-reply", |h| {
        let client = (CLIENT, 40001);
        let backend = decode_checked(&h.run(&syn(client, (VIP, 80))).frame).dst();
        let data = tcp_frame(client, (VIP, 80), |t| t.ack = true, &[7; 100]);
        let d = decode_checked(&h.run(&data).frame);
        assert_eq!(d.dst(), backend, "an established flow keeps its backend");
        assert_eq!(d.payload, vec![7; 100]);
        let reply = tcp_frame(
            backend,
            client,
            |t| {
                t.syn = true;
                t.ack = true;
            },
            &[],
        );
        let out = h.run(&reply);
        assert_eq!(out.action, XDP_PASS);
        let d = decode_checked(&out.frame);
        assert_eq!(d.src(), (VIP, 80), "the reply is reverse-NATed to the VIP");
        assert_eq!(d.dst(), client);
    }),
    ("least-conn", |h| {
        // Two new flows: the first to the first backend (ties go first), the second to the
        // other one, which has fewer flows then.
        let first = decode_checked(&h.run(&syn((CLIENT, 41000), (VIP, 81))).frame).dst();
        let second = decode_checked(&h.run(&syn((CLIENT, 41001), (VIP, 81))).frame).dst();
        assert_eq!(first, (BACKENDS[0], 8081));
        assert_eq!(second, (BACKENDS[1], 8081));
    }),
    ("no-backend-tcp-rst", |h| {
        let out = h.run(&syn((CLIENT, 42000), (VIP, 82)));
        assert_eq!(out.action, XDP_TX);
        let d = decode_checked(&out.frame);
        assert_eq!((d.eth_src, d.eth_dst), (LB_MAC, CLIENT_MAC));
        assert_eq!((d.src(), d.dst()), ((VIP, 82), (CLIENT, 42000)));
        match &d.transport {
            Some(TransportHeader::Tcp(t)) => assert!(t.rst && t.ack, "{t:?}"),
            other => panic!("not a TCP RST: {other:?}"),
        }
    }),
    ("no-backend-udp-unreachable", |h| {
        let out = h.run(&udp_frame((CLIENT, 43000), (VIP, 53), b"query"));
        assert_eq!(out.action, XDP_TX);
        let d = decode_checked(&out.frame);
        assert_eq!(Ipv4Addr::from(d.ip.source), VIP);
        assert_eq!(Ipv4Addr::from(d.ip.destination), CLIENT);
        match &d.transport {
            Some(TransportHeader::Icmpv4(i)) => assert!(
                matches!(i.icmp_type, Icmpv4Type::DestinationUnreachable(_)),
                "{i:?}"
            ),
            other => panic!("not ICMP: {other:?}"),
        }
    }),
    ("malformed-passes-untouched", |h| {
        // The IPv4 total length claims more than the frame holds (the check the 6.1 verifier
        // first objected to): passed on, not rewritten.
        let mut frame = syn((CLIENT, 44000), (VIP, 80));
        frame[16..18].copy_from_slice(&1500u16.to_be_bytes());
        let out = h.run(&frame);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame, frame);
    }),
];

fn main() {
    let object = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .expect("usage: xlb-vm-packet LB_EBPF_OBJECT"),
    );
    let mut harness = Harness::with_options(LoadOptions {
        object: Some(object.clone()),
        pin_dir: None,
        ..LoadOptions::default()
    });
    harness.program(SERVICES);
    println!("loaded {}", object.display());
    let (mut passed, mut failed) = (0, 0);
    for (name, check) in CHECKS {
        match catch_unwind(AssertUnwindSafe(|| check(&harness))) {
            Ok(()) => {
                passed += 1;
                println!("PASS {name}");
            }
            Err(panic) => {
                failed += 1;
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("FAIL {name}: {}", why.replace('\n', " | "));
            }
        }
    }
    println!("done: passed={passed} failed={failed}");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
