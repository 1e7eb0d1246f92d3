//! Differential packet test: long random sequences of frames (new flows, established flows,
//! replies, traffic that is not for a service, and malformed frames) run through the real program,
//! each outcome compared with a small reference of what the dataplane must do, written here from
//! the specification rather than from the program:
//!
//! * a client's first packet to VIP:port:proto goes to the backend weighted Maglev picks (the
//!   agent's table builder and lb-common's hash are the oracle), later ones to the same backend;
//!   the destination is rewritten and nothing else (source, TTL, payload, valid checksums);
//! * a backend's reply on a tracked flow comes back from VIP:port;
//! * anything else, and every malformed frame, leaves the program byte for byte as it came.
//!
//! Sequences are seeded, so a failure names the seed and step that reproduce it.

use std::{collections::HashMap, net::Ipv4Addr};

use etherparse::{IpFragOffset, IpHeaders, IpNumber, Ipv4Header, PacketBuilder};
use lb_agent::model::Backend;
use lb_common::proto;
use xlb_tests::{
    bench::Rng,
    packet::{
        CLIENT_MAC, Harness, LB_MAC, XDP_DROP, XDP_PASS, decode_checked, flow_key, maglev_choice,
        syn, tcp_frame, udp_frame,
    },
};

/// One frontend of the reference: where it listens and which weighted backends it has.
struct Frontend {
    vip: Ipv4Addr,
    port: u16,
    protocol: u8,
    target_port: u16,
    backends: Vec<(Ipv4Addr, u32)>,
}

impl Frontend {
    fn model_backends(&self) -> Vec<Backend> {
        self.backends
            .iter()
            .map(|&(a, w)| Backend::ready(a.into(), self.target_port, w))
            .collect()
    }
}

fn frontends() -> Vec<Frontend> {
    let b = |last: u8| Ipv4Addr::new(10, 10, 2, last);
    vec![
        Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: proto::TCP,
            target_port: 8080,
            backends: vec![(b(11), 3), (b(12), 1), (b(13), 1)],
        },
        Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 53,
            protocol: proto::UDP,
            target_port: 5353,
            backends: vec![(b(11), 1), (b(12), 1)],
        },
        Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 20),
            port: 443,
            protocol: proto::TCP,
            target_port: 8443,
            backends: vec![(b(21), 1), (b(22), 2), (b(23), 3), (b(24), 4)],
        },
        Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 30),
            port: 9000,
            protocol: proto::UDP,
            target_port: 9000,
            backends: vec![(b(31), 1)],
        },
    ]
}

fn services_file(frontends: &[Frontend]) -> String {
    let mut out = String::from("services:\n");
    for (i, f) in frontends.iter().enumerate() {
        let protocol = if f.protocol == proto::TCP {
            "TCP"
        } else {
            "UDP"
        };
        out += &format!(
            "  - name: svc{i}\n    vip: {}\n    port: {}\n    protocol: {protocol}\n    backends:\n",
            f.vip, f.port
        );
        for (addr, weight) in &f.backends {
            out += &format!(
                "      - {{ip: {addr}, port: {}, weight: {weight}}}\n",
                f.target_port
            );
        }
    }
    out
}

/// A flow the reference tracks: client, frontend index, and the backend it must stick to.
#[derive(Clone, Copy)]
struct Flow {
    client: (Ipv4Addr, u16),
    frontend: usize,
    backend: Ipv4Addr,
}

/// A packet of the client towards a frontend: a SYN or UDP datagram to open, an ACK with data or
/// another datagram on an open flow.
fn client_packet(f: &Frontend, client: (Ipv4Addr, u16), opening: bool, payload: &[u8]) -> Vec<u8> {
    let dst = (f.vip, f.port);
    match (f.protocol, opening) {
        (proto::TCP, true) => syn(client, dst),
        (proto::TCP, false) => tcp_frame(client, dst, |t| t.ack = true, payload),
        _ => udp_frame(client, dst, payload),
    }
}

/// A backend's answer on a flow.
fn reply_packet(f: &Frontend, backend: Ipv4Addr, client: (Ipv4Addr, u16)) -> Vec<u8> {
    let src = (backend, f.target_port);
    if f.protocol == proto::TCP {
        tcp_frame(
            src,
            client,
            |t| {
                t.ack = true;
                t.psh = true
            },
            b"answer",
        )
    } else {
        udp_frame(src, client, b"answer")
    }
}

/// Ways to make a service frame malformed, each of which the program must leave untouched.
fn malform(rng: &mut Rng, frame: &mut Vec<u8>) -> &'static str {
    const ETH: usize = 14;
    match rng.below(5) {
        0 => {
            // Cut inside the IPv4 or L4 header, total length kept consistent with the cut.
            let ihl = (frame[ETH] & 0x0f) as usize * 4;
            let l4_min = if frame[ETH + 9] == proto::TCP { 20 } else { 8 };
            let len = ETH + rng.below(ihl + l4_min);
            frame.truncate(len);
            if len >= ETH + 20 {
                let tot = (len - ETH) as u16;
                frame[ETH + 2..ETH + 4].copy_from_slice(&tot.to_be_bytes());
            }
            "truncated"
        }
        1 => {
            let beyond = (frame.len() - ETH + 1 + rng.below(1000)) as u16;
            frame[ETH + 2..ETH + 4].copy_from_slice(&beyond.to_be_bytes());
            "total length beyond the frame"
        }
        2 => {
            frame[ETH] = 0x40 | rng.below(5) as u8;
            "header length below 5 words"
        }
        3 => {
            let version = [0u8, 1, 5, 6, 7, 15][rng.below(6)];
            frame[ETH] = version << 4 | (frame[ETH] & 0x0f);
            "IP version other than 4"
        }
        _ => {
            // Flags and fragment offset: more fragments and/or a non-zero offset.
            let more = rng.below(2) == 0;
            let offset = if more {
                rng.below(100)
            } else {
                1 + rng.below(100)
            } as u16;
            let word = (u16::from(more) << 13) | offset;
            frame[ETH + 6..ETH + 8].copy_from_slice(&word.to_be_bytes());
            "fragment"
        }
    }
}

fn a_fragment(f: &Frontend, client: (Ipv4Addr, u16)) -> Vec<u8> {
    // Also through etherparse, with a valid header checksum, so only the offset is "wrong".
    let mut ip = Ipv4Header::new(
        0,
        64,
        IpNumber(f.protocol),
        client.0.octets(),
        f.vip.octets(),
    )
    .unwrap();
    ip.more_fragments = true;
    ip.fragment_offset = IpFragOffset::try_new(0).unwrap();
    let builder =
        PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ip(IpHeaders::Ipv4(ip, Default::default()));
    let mut frame = Vec::new();
    if f.protocol == proto::TCP {
        builder
            .tcp(client.1, f.port, 1, 1000)
            .syn()
            .write(&mut frame, &[1; 32])
            .unwrap();
    } else {
        builder
            .udp(client.1, f.port)
            .write(&mut frame, &[1; 32])
            .unwrap();
    }
    frame
}

/// Counts of what one sequence sent, to check the program's own counters against.
#[derive(Default, Debug)]
struct Sent {
    new_flows: u64,
    established: u64,
    replies: u64,
    not_service: u64,
    untouched: u64,
}

fn run_sequence(seed: u64, steps: usize) {
    let fronts = frontends();
    let mut h = Harness::new();
    h.program(&services_file(&fronts));
    let choices: Vec<Vec<Backend>> = fronts.iter().map(Frontend::model_backends).collect();
    let mut rng = Rng::new(seed);
    let mut flows: Vec<Flow> = Vec::new();
    let mut by_client: HashMap<((Ipv4Addr, u16), usize), usize> = HashMap::new();
    let mut sent = Sent::default();

    for step in 0..steps {
        let at = format!("seed {seed}, step {step}");
        let fi = rng.below(fronts.len());
        let f = &fronts[fi];
        match rng.below(10) {
            // A new flow (a fresh client address:port never used with this frontend).
            0..=2 => {
                let client = (
                    Ipv4Addr::new(10, 10, 1 + rng.below(3) as u8, 2 + rng.below(250) as u8),
                    1024 + rng.below(60_000) as u16,
                );
                if by_client.contains_key(&(client, fi)) {
                    continue;
                }
                let frame = client_packet(f, client, true, b"");
                let out = h.run(&frame);
                assert_eq!(out.action, XDP_PASS, "{at}: new flow (no route here)");
                let d = decode_checked(&out.frame);
                let want =
                    maglev_choice(&choices[fi], &flow_key(client, (f.vip, f.port), f.protocol));
                let std::net::IpAddr::V4(want) = want.addr else {
                    unreachable!()
                };
                assert_eq!(d.dst(), (want, f.target_port), "{at}: Maglev's backend");
                assert_eq!(d.src(), client, "{at}: the backend sees the client");
                assert_eq!(d.ip.time_to_live, 64, "{at}: TTL is the stack's business");
                assert_eq!(out.frame.len(), frame.len(), "{at}: length");
                by_client.insert((client, fi), flows.len());
                flows.push(Flow {
                    client,
                    frontend: fi,
                    backend: want,
                });
                sent.new_flows += 1;
            }
            // More of an open flow.
            3..=4 if !flows.is_empty() => {
                let flow = flows[rng.below(flows.len())];
                let f = &fronts[flow.frontend];
                let payload: Vec<u8> = (0..rng.below(200)).map(|_| rng.below(256) as u8).collect();
                let out = h.run(&client_packet(f, flow.client, false, &payload));
                assert_eq!(out.action, XDP_PASS, "{at}: established");
                let d = decode_checked(&out.frame);
                assert_eq!(
                    d.dst(),
                    (flow.backend, f.target_port),
                    "{at}: an open flow sticks to its backend"
                );
                assert_eq!(d.payload, payload, "{at}: payload");
                sent.established += 1;
            }
            // The backend answers.
            5..=6 if !flows.is_empty() => {
                let flow = flows[rng.below(flows.len())];
                let f = &fronts[flow.frontend];
                let out = h.run(&reply_packet(f, flow.backend, flow.client));
                assert_eq!(out.action, XDP_PASS, "{at}: reply");
                let d = decode_checked(&out.frame);
                assert_eq!(
                    d.src(),
                    (f.vip, f.port),
                    "{at}: the reply comes from the VIP"
                );
                assert_eq!(d.dst(), flow.client, "{at}: to the client");
                assert_eq!(d.payload, b"answer", "{at}: payload");
                sent.replies += 1;
            }
            // Not for a service: another address, or the VIP on a port nobody serves.
            7 => {
                let client = (Ipv4Addr::new(10, 10, 9, 9), 4000 + rng.below(1000) as u16);
                let dst = if rng.below(2) == 0 {
                    (Ipv4Addr::new(10, 97, rng.below(256) as u8, 1), f.port)
                } else {
                    (f.vip, f.port.wrapping_add(1 + rng.below(100) as u16))
                };
                let frame = if f.protocol == proto::TCP {
                    syn(client, dst)
                } else {
                    udp_frame(client, dst, b"x")
                };
                let out = h.run(&frame);
                assert_eq!(out.action, XDP_PASS, "{at}: not service traffic");
                assert_eq!(out.frame, frame, "{at}: not service traffic is untouched");
                sent.not_service += 1;
            }
            // Malformed, or a fragment.
            _ => {
                let client = (Ipv4Addr::new(10, 10, 8, 8), 5000 + rng.below(1000) as u16);
                let (frame, what) = if rng.below(4) == 0 {
                    (a_fragment(f, client), "first fragment")
                } else {
                    let mut frame = client_packet(f, client, true, b"");
                    let what = malform(&mut rng, &mut frame);
                    (frame, what)
                };
                let out = h.run(&frame);
                assert!(
                    out.action == XDP_PASS || out.action == XDP_DROP,
                    "{at}: {what}: action {}",
                    out.action
                );
                assert_eq!(out.frame, frame, "{at}: {what} frame rewritten");
                sent.untouched += 1;
            }
        }
    }

    let g = h.dataplane.maps.global_stats().unwrap();
    assert_eq!(g.ct_misses, sent.new_flows, "seed {seed}: {sent:?}");
    assert_eq!(g.ct_hits, sent.established, "seed {seed}: {sent:?}");
    assert_eq!(g.reverse_nat, sent.replies, "seed {seed}: {sent:?}");
    assert_eq!(g.not_service, sent.not_service, "seed {seed}: {sent:?}");
    assert!(
        sent.new_flows > 0
            && sent.established > 0
            && sent.replies > 0
            && sent.not_service > 0
            && sent.untouched > 0,
        "seed {seed}: every kind of step ran: {sent:?}"
    );
}

#[test]
fn random_frames_match_the_reference() {
    for seed in [1, 0x5eed, 20261125] {
        run_sequence(seed, 1000);
    }
}
