//! Packet tests of the forwarding path: DNAT of new and established flows, reverse NAT of
//! replies, conntrack lifetime, backend removal, and every malformed or unsupported frame
//! passing untouched. The program runs through BPF_PROG_TEST_RUN; frames are built and checked
//! (checksums included) with etherparse.

use std::{net::Ipv4Addr, time::Duration};

use etherparse::{IpFragOffset, IpHeaders, IpNumber, Ipv4Header, PacketBuilder, TransportHeader};
use lb_agent::{dataplane::xdp::LoadOptions, model::Backend};
use lb_common::{Config, FLOW_F_CLOSING, FLOW_F_REPLY, proto};
use xlb_tests::packet::{
    CLIENT_MAC, Harness, LB_MAC, Router, XDP_PASS, XDP_REDIRECT, XDP_TX, decode_checked, flow_key,
    maglev_choice, syn, tcp_frame, udp_frame,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 10, 2, 11),
    Ipv4Addr::new(10, 10, 2, 12),
    Ipv4Addr::new(10, 10, 2, 13),
];

const SERVICES: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    protocol: TCP
    backends:
      - {ip: 10.10.2.11, port: 8080}
      - {ip: 10.10.2.12, port: 8080}
      - {ip: 10.10.2.13, port: 8080}
  - name: dns
    vip: 10.96.0.10
    port: 53
    protocol: UDP
    backends:
      - {ip: 10.10.2.11, port: 5353}
      - {ip: 10.10.2.12, port: 5353}
      - {ip: 10.10.2.13, port: 5353}
";

fn model_backends(port: u16) -> Vec<Backend> {
    BACKENDS
        .iter()
        .map(|&b| Backend::ready(b.into(), port, 1))
        .collect()
}

fn harness() -> Harness {
    let mut h = Harness::new();
    h.program(SERVICES);
    h
}

/// The reply a backend sends to a client.
fn reply_from(backend: (Ipv4Addr, u16), client: (Ipv4Addr, u16)) -> Vec<u8> {
    tcp_frame(
        backend,
        client,
        |t| {
            t.syn = true;
            t.ack = true;
        },
        &[],
    )
}

#[test]
fn new_flow_is_dnated_to_the_maglev_backend_with_valid_checksums() {
    let h = harness();
    for client_port in [40000u16, 40001, 40002, 51515, 65000] {
        let frame = syn((CLIENT, client_port), (VIP, 80));
        let out = h.run(&frame);
        // No route in the test namespace: the rewritten packet goes to the kernel stack.
        assert_eq!(out.action, XDP_PASS);
        let d = decode_checked(&out.frame);
        let want = maglev_choice(
            &model_backends(8080),
            &flow_key((CLIENT, client_port), (VIP, 80), proto::TCP),
        );
        assert_eq!(d.dst(), (want_v4(&want), 8080), "port {client_port}");
        assert_eq!(
            d.src(),
            (CLIENT, client_port),
            "the backend sees the real client"
        );
        assert_eq!(
            d.ip.time_to_live, 64,
            "the stack, not the program, decrements TTL on this path"
        );
        assert_eq!(out.frame.len(), frame.len());
    }
    let g = h.dataplane.maps.global_stats().unwrap();
    assert_eq!(g.ct_misses, 5);
    assert_eq!(
        h.dataplane.maps.flows().unwrap().len(),
        10,
        "forward and reply entry per flow"
    );
}

fn want_v4(b: &Backend) -> Ipv4Addr {
    match b.addr {
        std::net::IpAddr::V4(a) => a,
        _ => unreachable!(),
    }
}

#[test]
fn established_flow_sticks_to_its_backend_and_replies_come_from_the_vip() {
    let h = harness();
    let client = (CLIENT, 40123);
    let first = decode_checked(&h.run(&syn(client, (VIP, 80))).frame);
    let backend = first.dst();
    for i in 0..5u8 {
        let data = tcp_frame(client, (VIP, 80), |t| t.ack = true, &[i; 100]);
        let out = h.run(&data);
        let d = decode_checked(&out.frame);
        assert_eq!(
            d.dst(),
            backend,
            "same backend for every packet of the flow"
        );
        assert_eq!(d.payload, vec![i; 100]);
    }
    let out = h.run(&reply_from(backend, client));
    assert_eq!(out.action, XDP_PASS);
    let d = decode_checked(&out.frame);
    assert_eq!(d.src(), (VIP, 80), "the reply is reverse-NATed to the VIP");
    assert_eq!(d.dst(), client);
    let g = h.dataplane.maps.global_stats().unwrap();
    assert_eq!((g.ct_misses, g.ct_hits, g.reverse_nat), (1, 5, 1));
}

#[test]
fn a_reply_without_a_tracked_flow_is_left_alone() {
    let h = harness();
    let frame = reply_from((BACKENDS[0], 8080), (CLIENT, 40000));
    let out = h.run(&frame);
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(out.frame, frame);
}

#[test]
fn udp_checksums_are_updated_and_a_zero_checksum_stays_zero() {
    let h = harness();
    let client = (CLIENT, 33333);
    let frame = udp_frame(client, (VIP, 53), b"query");
    let d = decode_checked(&h.run(&frame).frame);
    let want = maglev_choice(
        &model_backends(5353),
        &flow_key(client, (VIP, 53), proto::UDP),
    );
    assert_eq!(d.dst(), (want_v4(&want), 5353));
    let Some(TransportHeader::Udp(udp)) = &d.transport else {
        panic!()
    };
    assert_ne!(udp.checksum, 0);

    // The same datagram without a checksum (legal for UDP over IPv4).
    let mut no_sum = udp_frame(client, (VIP, 53), b"query");
    let udp_check = 14 + 20 + 6;
    no_sum[udp_check..udp_check + 2].copy_from_slice(&[0, 0]);
    let d = decode_checked(&h.run(&no_sum).frame);
    let Some(TransportHeader::Udp(udp)) = &d.transport else {
        panic!()
    };
    assert_eq!(
        udp.checksum, 0,
        "a zero UDP checksum means none, and stays zero"
    );
    assert_eq!(d.dst().1, 5353);

    let reply = udp_frame(d.dst(), client, b"answer");
    let r = decode_checked(&h.run(&reply).frame);
    assert_eq!(r.src(), (VIP, 53));
}

#[test]
fn ipv4_options_are_skipped_correctly() {
    let h = harness();
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT.octets(), VIP.octets()).unwrap();
    // Four NOPs and an end-of-options list: an 8-byte option area (IHL 7).
    ip.options = [1u8, 1, 1, 1, 0, 0, 0, 0].into();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(40000, 80, 1, 1000)
        .syn();
    let mut frame = Vec::new();
    builder.write(&mut frame, b"hello").unwrap();
    let out = h.run(&frame);
    let d = decode_checked(&out.frame);
    assert_eq!(d.ip.options.as_slice(), &[1, 1, 1, 1, 0, 0, 0, 0]);
    assert_eq!(d.dst().1, 8080, "ports found after the options");
    assert!(BACKENDS.contains(&d.dst().0));
    assert_eq!(d.payload, b"hello");
}

#[test]
fn fragments_pass_untouched() {
    let h = harness();
    let fragment = |more: bool, offset: u16| {
        let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, CLIENT.octets(), VIP.octets()).unwrap();
        ip.more_fragments = more;
        ip.fragment_offset = IpFragOffset::try_new(offset).unwrap();
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .udp(40000, 53);
        let mut frame = Vec::new();
        builder.write(&mut frame, &[7; 64]).unwrap();
        frame
    };
    for (name, frame) in [
        ("first", fragment(true, 0)),
        ("middle", fragment(true, 100)),
        ("last", fragment(false, 200)),
    ] {
        let out = h.run(&frame);
        assert_eq!(out.action, XDP_PASS, "{name} fragment");
        assert_eq!(out.frame, frame, "{name} fragment untouched");
    }
    let g = h.dataplane.maps.global_stats().unwrap();
    assert_eq!(g.fragments, 3);
    assert_eq!(g.ct_misses, 0);
}

/// Every prefix of a valid frame (from the shortest the kernel accepts) passes untouched.
#[test]
fn truncated_headers_at_every_layer_pass_untouched() {
    let h = harness();
    for full in [
        syn((CLIENT, 40000), (VIP, 80)),
        udp_frame((CLIENT, 40000), (VIP, 53), b""),
    ] {
        // Ethernet (14) is the minimum BPF_PROG_TEST_RUN takes; then IPv4, then TCP/UDP.
        for len in 14..full.len() {
            let mut frame = full[..len].to_vec();
            // Keep the IP total length consistent with what is left, so the L4 truncation is
            // what gets tested too (a lying total length is tested below).
            if len >= 14 + 20 {
                let tot = (len - 14) as u16;
                frame[16..18].copy_from_slice(&tot.to_be_bytes());
            }
            let out = h.run(&frame);
            assert_eq!(out.action, XDP_PASS, "length {len}");
            assert_eq!(out.frame, frame, "length {len} rewritten");
        }
    }
    assert_eq!(h.dataplane.maps.global_stats().unwrap().ct_misses, 0);
    assert!(h.dataplane.maps.global_stats().unwrap().malformed > 0);
}

#[test]
fn inconsistent_headers_pass_untouched() {
    let h = harness();
    let good = syn((CLIENT, 40000), (VIP, 80));
    type Mutation = (&'static str, fn(&mut Vec<u8>));
    let mutations: [Mutation; 5] = [
        ("IP total length beyond the frame", |f| {
            f[16..18].copy_from_slice(&200u16.to_be_bytes())
        }),
        ("IP header length below 5 words", |f| f[14] = 0x44),
        ("IP version 6 in an IPv4 EtherType", |f| f[14] = 0x65),
        ("TCP data offset below 5 words", |f| f[14 + 20 + 12] = 0x40),
        ("IP header length beyond the datagram", |f| f[14] = 0x4f),
    ];
    for (what, mutate) in mutations {
        let mut frame = good.clone();
        mutate(&mut frame);
        let out = h.run(&frame);
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(out.frame, frame, "{what}: rewritten");
    }
    assert_eq!(h.dataplane.maps.global_stats().unwrap().ct_misses, 0);
}

#[test]
fn vlan_tagged_frames_are_load_balanced() {
    let h = harness();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .single_vlan(etherparse::VlanId::try_new(42).unwrap())
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .tcp(40000, 80, 1, 1000)
        .syn();
    let mut frame = Vec::new();
    builder.write(&mut frame, &[]).unwrap();
    let out = h.run(&frame);
    let headers = etherparse::PacketHeaders::from_ethernet_slice(&out.frame).unwrap();
    assert_eq!(headers.link_exts.len(), 1, "the tag stays");
    let Some(etherparse::NetHeaders::Ipv4(ip, _)) = headers.net else {
        panic!()
    };
    assert!(BACKENDS.iter().any(|b| b.octets() == ip.destination));
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
}

#[test]
fn fin_makes_a_flow_expire_after_the_closing_timeout() {
    let config = Config {
        tcp_timeout_s: 3600,
        tcp_closing_timeout_s: 1,
        udp_timeout_s: 1,
        ..Config::default()
    };
    let mut h = Harness::with_options(LoadOptions {
        pin_dir: None,
        config,
        ..LoadOptions::default()
    });
    h.program(SERVICES);
    let open = (CLIENT, 41000);
    let closed = (CLIENT, 41001);
    let udp = (CLIENT, 41002);
    h.run(&syn(open, (VIP, 80)));
    h.run(&syn(closed, (VIP, 80)));
    h.run(&udp_frame(udp, (VIP, 53), b"q"));
    h.run(&tcp_frame(
        closed,
        (VIP, 80),
        |t| {
            t.fin = true;
            t.ack = true
        },
        &[],
    ));
    let closing: Vec<_> = h
        .dataplane
        .maps
        .flows()
        .unwrap()
        .into_iter()
        .filter(|(_, v)| v.flags & FLOW_F_CLOSING != 0)
        .collect();
    assert_eq!(
        closing.len(),
        1,
        "the FIN marked only its own direction's entry"
    );
    assert_eq!(closing[0].1.flags & FLOW_F_REPLY, 0);

    // Coarse clock + 1 s timeouts: 2.5 s is past both the closing and the UDP timeout.
    std::thread::sleep(Duration::from_millis(2500));
    let misses = || h.dataplane.maps.global_stats().unwrap().ct_misses;
    let before = misses();
    h.run(&tcp_frame(open, (VIP, 80), |t| t.ack = true, &[1]));
    assert_eq!(
        misses(),
        before,
        "an established flow is within its 1 h timeout"
    );
    h.run(&tcp_frame(closed, (VIP, 80), |t| t.ack = true, &[1]));
    assert_eq!(
        misses(),
        before + 1,
        "a closed flow expired and was scheduled afresh"
    );
    h.run(&udp_frame(udp, (VIP, 53), b"q"));
    assert_eq!(misses(), before + 2, "an idle UDP flow expired");
}

#[test]
fn a_new_syn_on_a_closed_flow_reschedules_it() {
    let h = harness();
    let client = (CLIENT, 42000);
    h.run(&syn(client, (VIP, 80)));
    h.run(&tcp_frame(client, (VIP, 80), |t| t.rst = true, &[]));
    let before = h.dataplane.maps.global_stats().unwrap().ct_misses;
    h.run(&syn(client, (VIP, 80)));
    assert_eq!(
        h.dataplane.maps.global_stats().unwrap().ct_misses,
        before + 1
    );
}

#[test]
fn removing_a_backend_deletes_its_flows_and_moves_them_to_live_backends() {
    let mut h = harness();
    // Enough UDP flows that every backend gets some.
    let clients: Vec<(Ipv4Addr, u16)> = (0..60).map(|i| (CLIENT, 20000 + i)).collect();
    let mut first_backend = Vec::new();
    for &c in &clients {
        first_backend.push(
            decode_checked(&h.run(&udp_frame(c, (VIP, 53), b"q")).frame)
                .dst()
                .0,
        );
    }
    let gone = BACKENDS[1];
    assert!(first_backend.contains(&gone));
    let udp = frontend(53, lb_agent::model::Protocol::Udp);
    let gone_id = h
        .dataplane
        .maps
        .backend_id(&udp, gone.into(), 5353)
        .unwrap();
    let old_table = h
        .dataplane
        .maps
        .service_value(&frontend(53, lb_agent::model::Protocol::Udp))
        .unwrap()
        .table_id;

    h.program(&SERVICES.replace("      - {ip: 10.10.2.12, port: 5353}\n", ""));
    let value = h
        .dataplane
        .maps
        .service_value(&frontend(53, lb_agent::model::Protocol::Udp))
        .unwrap();
    assert_ne!(
        value.table_id, old_table,
        "a changed backend set gets a new table"
    );
    assert_eq!(value.backend_count, 2);
    assert!(
        h.dataplane
            .maps
            .flows()
            .unwrap()
            .iter()
            .all(|(_, v)| !(v.backend_id == gone_id && v.service_id == value.id)),
        "no conntrack entry of the removed backend survives"
    );
    // The TCP service still uses 10.10.2.12.
    let tcp = frontend(80, lb_agent::model::Protocol::Tcp);
    assert!(
        h.dataplane
            .maps
            .backend_id(&tcp, gone.into(), 8080)
            .is_some()
    );
    assert!(
        h.dataplane
            .maps
            .backend_id(&udp, gone.into(), 5353)
            .is_none()
    );

    for (i, &c) in clients.iter().enumerate() {
        let now = decode_checked(&h.run(&udp_frame(c, (VIP, 53), b"q")).frame)
            .dst()
            .0;
        assert_ne!(now, gone, "flow {c:?} still goes to the removed backend");
        if first_backend[i] != gone {
            assert_eq!(
                now, first_backend[i],
                "flow {c:?} on a surviving backend must stay"
            );
        }
    }
}

fn frontend(port: u16, protocol: lb_agent::model::Protocol) -> lb_agent::plan::FrontendKey {
    lb_agent::plan::FrontendKey {
        addr: VIP.into(),
        port,
        protocol,
    }
}

/// With a route and a resolved neighbour, the program forwards by itself: MACs from the FIB,
/// TTL decremented (checksum fixed), XDP_REDIRECT to another interface or XDP_TX to the same.
#[test]
fn fib_hit_rewrites_macs_decrements_ttl_and_redirects() {
    let h = harness();
    // The harness thread lives in its own empty namespace; build a small router there.
    let router = Router::build().unwrap();
    for b in BACKENDS {
        router.neighbour(b, "02:00:00:00:02:0b", "lbb").unwrap();
    }
    router
        .neighbour(CLIENT, "02:00:00:00:00:01", "lbc")
        .unwrap();
    let index_of = |dev: &str| Router::index_of(dev).unwrap();
    let mac_of = |dev: &str| Router::mac_of(dev).unwrap();

    let client = (CLIENT, 43000);
    let out = h.run_on(&syn(client, (VIP, 80)), index_of("lbc"));
    assert_eq!(
        out.action, XDP_REDIRECT,
        "backend is behind another interface"
    );
    let d = decode_checked(&out.frame);
    assert_eq!(d.ip.time_to_live, 63);
    assert_eq!(d.eth_dst, [0x02, 0, 0, 0, 0x02, 0x0b]);
    assert_eq!(d.eth_src, mac_of("lbb"));
    let backend = d.dst();

    // The reply arrives on the backend side and goes back out the client side.
    let out = h.run_on(&reply_from(backend, client), index_of("lbb"));
    assert_eq!(out.action, XDP_REDIRECT);
    let d = decode_checked(&out.frame);
    assert_eq!(d.src(), (VIP, 80));
    assert_eq!(d.eth_src, mac_of("lbc"));
    assert_eq!(d.eth_dst, [0x02, 0, 0, 0, 0, 0x01]);

    // A client on the backend side: in and out the same interface.
    let near_client = (Ipv4Addr::new(10, 10, 2, 50), 44000);
    router
        .neighbour(near_client.0, "02:00:00:00:02:32", "lbb")
        .unwrap();
    let out = h.run_on(&syn(near_client, (VIP, 80)), index_of("lbb"));
    assert_eq!(out.action, XDP_TX);

    // TTL 1 cannot be forwarded: the stack must answer with ICMP time exceeded.
    let mut dying = syn((CLIENT, 43001), (VIP, 80));
    dying[14 + 8] = 1;
    let check = Ipv4Header::from_slice(&dying[14..])
        .unwrap()
        .0
        .calc_header_checksum();
    dying[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    let out = h.run_on(&dying, index_of("lbc"));
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(decode_checked(&out.frame).ip.time_to_live, 1);
}
