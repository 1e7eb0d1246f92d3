//! Foundation packet tests: a frame to a configured frontend counts against that service; any
//! other frame counts nowhere and passes untouched.

use std::net::Ipv4Addr;

use lb_agent::model::Protocol;
use lb_agent::plan::FrontendKey;
use xlb_tests::packet::{Harness, XDP_PASS, syn, udp_frame};

const SERVICES: &str = "
services:
  - {name: web, vip: 10.96.0.10, port: 80, protocol: TCP, backends: [{ip: 10.10.2.11, port: 8080}]}
  - {name: dns, vip: 10.96.0.10, port: 53, protocol: UDP, backends: [{ip: 10.10.2.11, port: 5353}]}
";

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn service_id(h: &Harness, port: u16, protocol: Protocol) -> u32 {
    h.dataplane
        .maps
        .service_value(&FrontendKey {
            addr: VIP.into(),
            port,
            protocol,
        })
        .expect("frontend programmed")
        .id
}

#[test]
fn frames_to_a_frontend_count_against_that_service_only() {
    let mut h = Harness::new();
    h.program(SERVICES);
    let web = service_id(&h, 80, Protocol::Tcp);
    let dns = service_id(&h, 53, Protocol::Udp);

    let frame = syn((CLIENT, 40000), (VIP, 80));
    for _ in 0..3 {
        h.run(&frame);
    }
    let web_stats = h.dataplane.maps.service_stats(web).unwrap();
    assert_eq!(web_stats.packets, 3);
    assert_eq!(web_stats.bytes, 3 * frame.len() as u64);
    assert_eq!(h.dataplane.maps.service_stats(dns).unwrap().packets, 0);

    let dgram = udp_frame((CLIENT, 40000), (VIP, 53), b"query");
    h.run(&dgram);
    assert_eq!(h.dataplane.maps.service_stats(dns).unwrap().packets, 1);
    assert_eq!(h.dataplane.maps.service_stats(web).unwrap().packets, 3);
}

#[test]
fn frames_to_anything_else_count_nowhere_and_pass_untouched() {
    let mut h = Harness::new();
    h.program(SERVICES);
    let web = service_id(&h, 80, Protocol::Tcp);
    let dns = service_id(&h, 53, Protocol::Udp);
    let before = h.dataplane.maps.global_stats().unwrap();
    let others = [
        syn((CLIENT, 40000), (VIP, 81)), // other port
        syn((CLIENT, 40000), (Ipv4Addr::new(10, 96, 0, 11), 80)), // other address
        udp_frame((CLIENT, 40000), (VIP, 80), b"x"), // other protocol
        syn((CLIENT, 40000), (VIP, 53)), // UDP port over TCP
    ];
    for frame in &others {
        let out = h.run(frame);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(&out.frame, frame, "non-service frames are not rewritten");
    }
    assert_eq!(h.dataplane.maps.service_stats(web).unwrap().packets, 0);
    assert_eq!(h.dataplane.maps.service_stats(dns).unwrap().packets, 0);
    let after = h.dataplane.maps.global_stats().unwrap();
    assert_eq!(after.packets - before.packets, others.len() as u64);
    assert_eq!(after.not_service - before.not_service, others.len() as u64);
}
