//! Packet tests of what the program builds itself: TCP RSTs and ICMP port-unreachables for
//! frontends without backends, echo replies from VIPs, and ICMP errors about NATed flows
//! reverse-NATed (outer and quoted headers). Every frame is checked with etherparse's own
//! checksum computation.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{
    Icmpv4Type, IpNumber, Ipv4Header, PacketBuilder, TransportHeader, icmpv4::DestUnreachableHeader,
};
use lb_agent::{
    dataplane::xdp::LoadOptions,
    model::{Backend, Frontend, Model, Protocol, Scheduler, Scope, Service},
};
use lb_common::Config;
use xlb_tests::packet::{
    CLIENT_MAC, Harness, LB_MAC, XDP_DROP, XDP_PASS, XDP_TX, decode_checked, syn, tcp_frame,
    udp_frame,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 11);

const EMPTY: &str = "
services:
  - {name: web, vip: 10.96.0.10, port: 80, protocol: TCP, backends: []}
  - {name: dns, vip: 10.96.0.10, port: 53, protocol: UDP, backends: []}
";

const ONE_BACKEND: &str = "
services:
  - {name: web, vip: 10.96.0.10, port: 80, protocol: TCP, backends: [{ip: 10.10.2.11, port: 8080}]}
  - {name: dns, vip: 10.96.0.10, port: 53, protocol: UDP, backends: [{ip: 10.10.2.11, port: 5353}]}
";

fn harness(services: &str) -> Harness {
    let mut h = Harness::new();
    h.program(services);
    h
}

#[test]
fn a_syn_to_a_frontend_without_backends_gets_a_rst() {
    let h = harness(EMPTY);
    let frame = tcp_frame(
        (CLIENT, 40000),
        (VIP, 80),
        |t| {
            t.syn = true;
            t.sequence_number = 1000
        },
        &[],
    );
    let out = h.run(&frame);
    assert_eq!(out.action, XDP_TX);
    let d = decode_checked(&out.frame);
    assert_eq!(
        (d.eth_src, d.eth_dst),
        (LB_MAC, CLIENT_MAC),
        "sent back to the client"
    );
    assert_eq!(d.src(), (VIP, 80));
    assert_eq!(d.dst(), (CLIENT, 40000));
    assert_eq!(d.ip.time_to_live, 64);
    assert!(d.ip.dont_fragment);
    let Some(TransportHeader::Tcp(tcp)) = &d.transport else {
        panic!("not TCP")
    };
    assert!(tcp.rst && tcp.ack && !tcp.syn, "{tcp:?}");
    assert_eq!(tcp.sequence_number, 0);
    assert_eq!(tcp.acknowledgment_number, 1001, "acknowledges the SYN");
    assert_eq!(tcp.window_size, 0);
    assert!(d.payload.is_empty());
    assert_eq!(out.frame.len(), 14 + 20 + 20);
    let g = h.dataplane.maps.global_stats().unwrap();
    assert_eq!((g.rejected, g.no_backend), (1, 1));
}

#[test]
fn a_data_segment_gets_a_rst_with_its_ack_as_sequence() {
    let h = harness(EMPTY);
    let frame = tcp_frame(
        (CLIENT, 40000),
        (VIP, 80),
        |t| {
            t.ack = true;
            t.psh = true;
            t.sequence_number = 5000;
            t.acknowledgment_number = 777;
        },
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let out = h.run(&frame);
    assert_eq!(out.action, XDP_TX);
    let d = decode_checked(&out.frame);
    let Some(TransportHeader::Tcp(tcp)) = &d.transport else {
        panic!()
    };
    assert!(tcp.rst && !tcp.ack);
    assert_eq!(tcp.sequence_number, 777);
    assert!(d.payload.is_empty(), "the payload is trimmed");
}

#[test]
fn a_rst_is_never_answered() {
    let h = harness(EMPTY);
    let out = h.run(&tcp_frame(
        (CLIENT, 40000),
        (VIP, 80),
        |t| t.rst = true,
        &[],
    ));
    assert_eq!(out.action, XDP_DROP);
}

#[test]
fn a_datagram_to_a_frontend_without_backends_gets_port_unreachable() {
    let h = harness(EMPTY);
    let frame = udp_frame(
        (CLIENT, 40000),
        (VIP, 53),
        b"a DNS query that is long enough to be cut",
    );
    let out = h.run(&frame);
    assert_eq!(out.action, XDP_TX);
    let d = decode_checked(&out.frame);
    assert_eq!((d.eth_src, d.eth_dst), (LB_MAC, CLIENT_MAC));
    assert_eq!(Ipv4Addr::from(d.ip.source), VIP);
    assert_eq!(Ipv4Addr::from(d.ip.destination), CLIENT);
    assert_eq!(d.ip.protocol, IpNumber::ICMP);
    let Some(TransportHeader::Icmpv4(icmp)) = &d.transport else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.icmp_type,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
    );
    // The quote is the original IP header and the first 8 bytes of its payload (the UDP header).
    assert_eq!(d.payload, frame[14..14 + 28].to_vec());
    assert_eq!(out.frame.len(), 14 + 20 + 8 + 28);
}

#[test]
fn port_unreachable_keeps_the_vlan_tag() {
    let h = harness(EMPTY);
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .single_vlan(etherparse::VlanId::try_new(7).unwrap())
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .udp(40000, 53);
    let mut frame = Vec::new();
    builder.write(&mut frame, b"query").unwrap();
    let out = h.run(&frame);
    assert_eq!(out.action, XDP_TX);
    let headers = etherparse::PacketHeaders::from_ethernet_slice(&out.frame).unwrap();
    assert_eq!(headers.link_exts.len(), 1, "VLAN tag kept");
    let Some(etherparse::NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!()
    };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    let Some(TransportHeader::Icmpv4(icmp)) = &headers.transport else {
        panic!()
    };
    let payload = headers.payload.slice();
    assert_eq!(
        icmp.checksum,
        etherparse::Icmpv4Header::with_checksum(icmp.icmp_type.clone(), payload).checksum
    );
    assert_eq!(payload, &frame[18..18 + 28]);
}

/// Kubernetes drops, rather than refuses, traffic to an externalTrafficPolicy=Local frontend on
/// a node without a local endpoint.
#[test]
fn a_local_policy_without_local_endpoints_drops() {
    let mut h = Harness::new();
    let remote = Backend {
        node_local: false,
        ..Backend::ready(IpAddr::V4(BACKEND), 8080, 1)
    };
    let service = Service {
        name: "default/web:http".into(),
        frontends: vec![Frontend {
            addr: VIP.into(),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::External,
        }],
        scheduler: Scheduler::Maglev,
        affinity_timeout_s: None,
        internal_local: false,
        external_local: true,
        backends: vec![remote],
    };
    h.program_model(&Model {
        services: [(service.name.clone(), service)].into(),
        ..Model::default()
    });
    let out = h.run(&syn((CLIENT, 40000), (VIP, 80)));
    assert_eq!(out.action, XDP_DROP);
}

fn echo_request(dst: Ipv4Addr) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT.octets(), dst.octets(), 61)
        .icmpv4_echo_request(0x1234, 7);
    let mut frame = Vec::new();
    builder.write(&mut frame, b"ping payload").unwrap();
    frame
}

#[test]
fn echo_requests_to_a_vip_are_answered() {
    let h = harness(ONE_BACKEND);
    let out = h.run(&echo_request(VIP));
    assert_eq!(out.action, XDP_TX);
    let d = decode_checked(&out.frame);
    assert_eq!((d.eth_src, d.eth_dst), (LB_MAC, CLIENT_MAC));
    assert_eq!(Ipv4Addr::from(d.ip.source), VIP);
    assert_eq!(Ipv4Addr::from(d.ip.destination), CLIENT);
    assert_eq!(d.ip.time_to_live, 64);
    let Some(TransportHeader::Icmpv4(icmp)) = &d.transport else {
        panic!()
    };
    let Icmpv4Type::EchoReply(echo) = &icmp.icmp_type else {
        panic!("{icmp:?}")
    };
    assert_eq!((echo.id, echo.seq), (0x1234, 7));
    assert_eq!(d.payload, b"ping payload");
    assert_eq!(
        h.dataplane.maps.global_stats().unwrap().icmp_echo_replies,
        1
    );

    // Not a VIP: the stack answers (or not).
    let other = echo_request(Ipv4Addr::new(10, 96, 0, 99));
    let out = h.run(&other);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &other));
}

#[test]
fn echo_replies_can_be_switched_off() {
    let config = Config {
        flags: 0,
        ..Config::default()
    };
    let mut h = Harness::with_options(LoadOptions {
        pin_dir: None,
        config,
        ..LoadOptions::default()
    });
    h.program(ONE_BACKEND);
    let frame = echo_request(VIP);
    let out = h.run(&frame);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &frame));
}

#[test]
fn a_vip_stops_answering_pings_when_its_last_frontend_goes() {
    let mut h = harness(ONE_BACKEND);
    h.program(
        "services:\n  - {name: web, vip: 10.96.0.10, port: 80, protocol: TCP, backends: []}\n",
    );
    assert_eq!(
        h.run(&echo_request(VIP)).action,
        XDP_TX,
        "one frontend left"
    );
    h.program("services: []\n");
    assert_eq!(h.run(&echo_request(VIP)).action, XDP_PASS);
}

/// An ICMP error a backend (or a router on the way) sends about a client -> backend packet.
fn icmp_error(outer_src: Ipv4Addr, icmp_type: Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 2, 11], LB_MAC)
        .ipv4(outer_src.octets(), CLIENT.octets(), 64)
        .icmpv4(icmp_type);
    let mut frame = Vec::new();
    builder.write(&mut frame, quoted).unwrap();
    frame
}

#[test]
fn fragmentation_needed_from_a_backend_is_reverse_natted_inner_header_included() {
    let h = harness(ONE_BACKEND);
    let client = (CLIENT, 45000);
    // The flow exists: its first packet was DNATed to the backend.
    let dnat = h.run(&tcp_frame(
        client,
        (VIP, 80),
        |t| {
            t.ack = true;
            t.sequence_number = 42
        },
        &[9; 1400],
    ));
    let sent = decode_checked(&dnat.frame);
    assert_eq!(sent.dst(), (BACKEND, 8080));
    // The backend's path can't take 1400 bytes: it quotes the packet as it received it.
    let quoted = &dnat.frame[14..14 + 20 + 20 + 8];
    let mtu = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1280,
    });
    let out = h.run(&icmp_error(BACKEND, mtu.clone(), quoted));
    assert_eq!(
        out.action, XDP_PASS,
        "forwarded (through the stack here: no routes in the test namespace)"
    );
    let d = decode_checked(&out.frame);
    assert_eq!(
        Ipv4Addr::from(d.ip.source),
        VIP,
        "the backend's own error now comes from the VIP"
    );
    assert_eq!(Ipv4Addr::from(d.ip.destination), CLIENT);
    let Some(TransportHeader::Icmpv4(icmp)) = &d.transport else {
        panic!()
    };
    assert_eq!(icmp.icmp_type, mtu, "type, code and MTU kept");
    // The quoted packet is what the client sent: to the VIP, with its original checksums.
    let (inner, rest) = Ipv4Header::from_slice(&d.payload).unwrap();
    assert_eq!(Ipv4Addr::from(inner.destination), VIP);
    assert_eq!(Ipv4Addr::from(inner.source), CLIENT);
    assert_eq!(
        inner.header_checksum,
        inner.calc_header_checksum(),
        "quoted IP checksum"
    );
    assert_eq!(
        u16::from_be_bytes([rest[2], rest[3]]),
        80,
        "quoted destination port"
    );
    let original = tcp_frame(
        client,
        (VIP, 80),
        |t| {
            t.ack = true;
            t.sequence_number = 42
        },
        &[9; 1400],
    );
    assert_eq!(
        &rest[..20],
        &original[14 + 20..14 + 40],
        "quoted TCP header, checksum included, as the client sent it"
    );
    assert_eq!(h.dataplane.maps.global_stats().unwrap().icmp_errors_nat, 1);
}

#[test]
fn time_exceeded_from_a_router_keeps_the_routers_address() {
    let h = harness(ONE_BACKEND);
    let client = (CLIENT, 45001);
    let dnat = h.run(&udp_frame(client, (VIP, 53), b"query"));
    let quoted = &dnat.frame[14..14 + 28];
    let router = Ipv4Addr::new(10, 10, 2, 254);
    let out = h.run(&icmp_error(
        router,
        Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
        quoted,
    ));
    let d = decode_checked(&out.frame);
    assert_eq!(Ipv4Addr::from(d.ip.source), router);
    let (inner, rest) = Ipv4Header::from_slice(&d.payload).unwrap();
    assert_eq!(Ipv4Addr::from(inner.destination), VIP);
    assert_eq!(inner.header_checksum, inner.calc_header_checksum());
    assert_eq!(u16::from_be_bytes([rest[2], rest[3]]), 53);
    let original = udp_frame(client, (VIP, 53), b"query");
    assert_eq!(
        &rest[..8],
        &original[14 + 20..14 + 28],
        "quoted UDP header as the client sent it"
    );
}

#[test]
fn icmp_errors_about_unknown_flows_pass_untouched() {
    let h = harness(ONE_BACKEND);
    let stranger = udp_frame((CLIENT, 50000), (BACKEND, 5353), b"x");
    let frame = icmp_error(
        BACKEND,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &stranger[14..14 + 28],
    );
    let out = h.run(&frame);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &frame));
}
