//! ICMP at the VIP: echo requests are answered from XDP (so `ping <ClusterIP>` works), and ICMP
//! errors about a NATed flow (destination unreachable, including "fragmentation needed", and time
//! exceeded) coming from the backend side are reverse-NATed, outer and quoted headers both, so
//! the client's stack matches them to its connection to the VIP and path-MTU discovery works.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    CONFIG_F_ICMP_ECHO, Config, FLOW_F_REPLY, FlowKey, VipKey, family, proto, wire_addr_v4,
};
use network_types::{icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    csum::Delta,
    forward,
    maps::{xlb_conntrack, xlb_vips},
    parse::{IcmpPacket, ptr_at},
    reject::{ORIGIN_TTL, swap_macs},
    stats,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Version 4, 5-word header: quoted headers with options are left alone.
const IPV4_VIHL: u8 = 0x45;
const IPV4_HDR_LEN: usize = 20;

/// Handles an ICMP message; anything that is neither an echo request to a VIP nor an error
/// about a tracked flow passes untouched.
// A BPF subprogram with its own stack frame: its locals do not add to the hot path's.
#[inline(never)]
pub fn handle(ctx: &XdpContext, icmp: &IcmpPacket, config: &Config) -> u32 {
    let action = match icmp.icmp_type {
        ICMP_ECHO_REQUEST if config.flags & CONFIG_F_ICMP_ECHO != 0 => echo_reply(ctx, icmp),
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED => reverse_nat_error(ctx, icmp),
        _ => None,
    };
    action.unwrap_or_else(|| {
        stats::global(|s| s.not_service += 1);
        xdp_action::XDP_PASS
    })
}

/// Turns an echo request to a VIP into the reply, in place.
#[inline(always)]
fn echo_reply(ctx: &XdpContext, icmp: &IcmpPacket) -> Option<u32> {
    let vip = VipKey {
        addr: icmp.dst,
        family: family::IPV4,
        _pad0: 0,
        _pad1: 0,
    };
    // SAFETY: existence check only.
    unsafe { xlb_vips.get(vip) }?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, icmp.l3_off)?;
    let hdr: *mut Icmpv4Hdr = ptr_at(ctx, icmp.l4_off)?;
    swap_macs(ctx)?;
    // SAFETY: both headers lie inside the frame (`ptr_at`).
    unsafe {
        // Swapping the addresses leaves the header sum unchanged; the TTL is reset.
        core::mem::swap(&mut (*ip).src_addr, &mut (*ip).dst_addr);
        let old = u16::from_ne_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl = ORIGIN_TTL;
        let new = u16::from_ne_bytes([ORIGIN_TTL, (*ip).proto]);
        (*ip).check = Delta::new((*ip).check).replace16(old, new).finish();
        let code = (*hdr).code;
        (*hdr).type_ = ICMP_ECHO_REPLY;
        (*hdr).check = Delta::new((*hdr).check)
            .replace16(
                u16::from_ne_bytes([ICMP_ECHO_REQUEST, code]),
                u16::from_ne_bytes([ICMP_ECHO_REPLY, code]),
            )
            .finish();
    }
    stats::global(|s| s.icmp_echo_replies += 1);
    Some(xdp_action::XDP_TX)
}

/// Reverse-NATs an ICMP error about a client -> backend packet: the quoted destination (the
/// backend) becomes the VIP again, and so does the outer source if the backend itself sent the
/// error. Quoted IP and L4 checksums, the ICMP checksum and the outer IP checksum are updated.
#[inline(always)]
fn reverse_nat_error(ctx: &XdpContext, icmp: &IcmpPacket) -> Option<u32> {
    let inner_off = icmp.l4_off + size_of::<Icmpv4Hdr>();
    let inner: *mut Ipv4Hdr = ptr_at(ctx, inner_off)?;
    let ports: *mut [[u8; 2]; 2] = ptr_at(ctx, inner_off + IPV4_HDR_LEN)?;
    // SAFETY: the quoted header and ports lie inside the frame (`ptr_at`).
    let (vihl, inner_proto, client, backend, client_port, backend_port) = unsafe {
        (
            (*inner).vihl,
            (*inner).proto,
            (*inner).src_addr,
            (*inner).dst_addr,
            (*ports)[0],
            (*ports)[1],
        )
    };
    if vihl != IPV4_VIHL || !(inner_proto == proto::TCP || inner_proto == proto::UDP) {
        return None;
    }
    // The quoted packet went client -> backend; its flow's reply entry knows the VIP.
    let reply_key = FlowKey {
        src_addr: wire_addr_v4(backend),
        dst_addr: wire_addr_v4(client),
        src_port: u16::from_ne_bytes(backend_port),
        dst_port: u16::from_ne_bytes(client_port),
        proto: inner_proto,
        family: family::IPV4,
        _pad: 0,
    };
    // SAFETY: read-only use of the value within this program run.
    let flow = unsafe { xlb_conntrack.get(reply_key) }?;
    if flow.flags & FLOW_F_REPLY == 0 {
        return None;
    }
    let (vip, vip_port) = (flow.nat_addr[0], flow.nat_port);
    let backend_word = u32::from_ne_bytes(backend);
    let outer: *mut Ipv4Hdr = ptr_at(ctx, icmp.l3_off)?;
    let hdr: *mut Icmpv4Hdr = ptr_at(ctx, icmp.l4_off)?;

    // SAFETY: every pointer was checked by `ptr_at`.
    unsafe {
        let mut icmp_sum = Delta::new((*hdr).check)
            .replace32(backend_word, vip)
            .replace16(u16::from_ne_bytes(backend_port), vip_port);

        (*inner).dst_addr = vip.to_ne_bytes();
        (*ports)[1] = vip_port.to_ne_bytes();
        let old_check = (*inner).check;
        (*inner).check = Delta::new(old_check).replace32(backend_word, vip).finish();
        icmp_sum = icmp_sum.replace16(
            u16::from_ne_bytes(old_check),
            u16::from_ne_bytes((*inner).check),
        );

        // The quoted L4 checksum, when quoted: UDP's sits in the first 8 bytes, TCP's needs 18.
        let l4_off = inner_off + IPV4_HDR_LEN;
        let l4_check: Option<*mut [u8; 2]> = if inner_proto == proto::UDP {
            ptr_at::<UdpHdr>(ctx, l4_off).map(|u| core::ptr::addr_of_mut!((*u).check))
        } else {
            ptr_at::<TcpHdr>(ctx, l4_off).map(|t| core::ptr::addr_of_mut!((*t).check))
        };
        if let Some(field) = l4_check {
            let old = *field;
            if !(inner_proto == proto::UDP && old == [0, 0]) {
                *field = Delta::new(old)
                    .replace32(backend_word, vip)
                    .replace16(u16::from_ne_bytes(backend_port), vip_port)
                    .finish();
                icmp_sum = icmp_sum.replace16(u16::from_ne_bytes(old), u16::from_ne_bytes(*field));
            }
        }
        (*hdr).check = icmp_sum.finish();

        if (*outer).src_addr == backend {
            (*outer).src_addr = vip.to_ne_bytes();
            (*outer).check = Delta::new((*outer).check)
                .replace32(backend_word, vip)
                .finish();
        }
    }
    stats::global(|s| s.icmp_errors_nat += 1);
    Some(forward::forward(ctx, icmp.l3_off, proto::ICMP))
}
