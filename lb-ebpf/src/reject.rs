//! Refusals for a frontend without usable backends, built in place and sent back out the
//! receiving interface (XDP_TX), so clients fail fast instead of timing out: a TCP segment gets a
//! RST, a UDP datagram gets ICMP port unreachable (what kube-proxy's REJECT rules do). Checksums
//! are computed from scratch over the headers written here.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::proto;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, vlan::VlanHdr};

use crate::{
    csum::{finish, sum_words},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
};

/// TTL of packets the program originates (Linux's default).
pub const ORIGIN_TTL: u8 = 64;
/// IPv4 header without options.
const IPV4_HDR_LEN: usize = 20;
const TCP_HDR_LEN: usize = 20;
const ICMP_HDR_LEN: usize = 8;
/// Version 4, 5-word header.
const IPV4_VIHL: u8 = 0x45;
/// Don't Fragment, no offset.
const IPV4_DF: [u8; 2] = [0x40, 0];
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// What an ICMP error quotes of the offending datagram: its header and 8 bytes (RFC 792).
const ICMP_QUOTE_LEN: usize = IPV4_HDR_LEN + 8;

/// Swaps the Ethernet source and destination.
#[inline(always)]
pub fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: inside the frame (`ptr_at`).
    unsafe { core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr) };
    Some(())
}

/// A fresh IPv4 header (no options) from `src` to `dst`, checksum included.
#[inline(always)]
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4], l4_proto: u8, tot_len: u16) -> Ipv4Hdr {
    let len = tot_len.to_be_bytes();
    let words: [[u8; 2]; 10] = [
        [IPV4_VIHL, 0],
        len,
        [0, 0],
        IPV4_DF,
        [ORIGIN_TTL, l4_proto],
        [0, 0],
        [src[0], src[1]],
        [src[2], src[3]],
        [dst[0], dst[1]],
        [dst[2], dst[3]],
    ];
    Ipv4Hdr {
        vihl: IPV4_VIHL,
        tos: 0,
        tot_len: len,
        id: [0, 0],
        frags: IPV4_DF,
        ttl: ORIGIN_TTL,
        proto: l4_proto,
        check: finish(sum_words(&words)),
        src_addr: src,
        dst_addr: dst,
    }
}

/// Shrinks the frame to `len` bytes. The last step of a rewrite: it invalidates packet pointers.
#[inline(always)]
fn truncate(ctx: &XdpContext, len: usize) -> Option<()> {
    let delta = len as i64 - (ctx.data_end() - ctx.data()) as i64;
    // SAFETY: plain helper call on our context.
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return None;
    }
    Some(())
}

/// Answers a TCP segment with a RST (RFC 793 "Reset Generation"): if the segment carried an
/// ACK, the RST takes its sequence number from it; otherwise the RST has sequence 0 and
/// acknowledges everything the segment occupied. A RST is never answered, and segments with IP
/// options are dropped instead (the program does not reflect options). `l3_off` is
/// `packet.l3_off`, in a register for the verifier (see `flow` in main.rs).
#[inline(always)]
pub fn tcp_reset(ctx: &XdpContext, packet: &Packet, l3_off: usize) -> u32 {
    if packet.tcp_flags & TCP_RST != 0 || packet.l4_off != l3_off + IPV4_HDR_LEN {
        return xdp_action::XDP_DROP;
    }
    match build_tcp_reset(ctx, packet) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn build_tcp_reset(ctx: &XdpContext, packet: &Packet) -> Option<()> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, packet.l3_off)?;
    let tcp: *mut TcpHdr = ptr_at(ctx, packet.l4_off)?;
    // SAFETY: both headers lie inside the frame (`ptr_at`).
    let (src, dst, tot_len, sport, dport, seq, ack_seq, doff) = unsafe {
        (
            (*ip).src_addr,
            (*ip).dst_addr,
            u16::from_be_bytes((*ip).tot_len) as u32,
            (*tcp).source,
            (*tcp).dest,
            u32::from_be_bytes((*tcp).seq),
            u32::from_be_bytes((*tcp).ack_seq),
            (*tcp).doff() as u32,
        )
    };
    let flags = packet.tcp_flags;
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_ACK != 0 {
        (ack_seq, 0, TCP_RST)
    } else {
        let payload = tot_len.wrapping_sub(IPV4_HDR_LEN as u32 + doff * 4);
        let occupied = payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    let (s, a) = (rst_seq.to_be_bytes(), rst_ack.to_be_bytes());
    // Header words: ports, seq, ack, data offset 5 + flags, window 0, checksum, urgent 0.
    let words: [[u8; 2]; 10] = [
        dport,
        sport,
        [s[0], s[1]],
        [s[2], s[3]],
        [a[0], a[1]],
        [a[2], a[3]],
        [0x50, rst_flags],
        [0, 0],
        [0, 0],
        [0, 0],
    ];
    // Pseudo-header: source (the VIP), destination (the client), protocol, TCP length.
    let pseudo: [[u8; 2]; 6] = [
        [dst[0], dst[1]],
        [dst[2], dst[3]],
        [src[0], src[1]],
        [src[2], src[3]],
        [0, proto::TCP],
        (TCP_HDR_LEN as u16).to_be_bytes(),
    ];
    let check = finish(sum_words(&words) + sum_words(&pseudo));

    swap_macs(ctx)?;
    // SAFETY: as above; the frame is at least this long (parse checked both headers).
    unsafe {
        *ip = ipv4_header(dst, src, proto::TCP, (IPV4_HDR_LEN + TCP_HDR_LEN) as u16);
        let raw = tcp as *mut [[u8; 2]; 10];
        *raw = words;
        (*raw)[8] = check;
    }
    truncate(ctx, packet.l4_off + TCP_HDR_LEN)
}

/// Answers a UDP datagram with ICMP port unreachable, quoting its IP header and first 8 bytes.
/// The frame grows at the front by the new IP and ICMP headers; the L2 header (with its VLAN tag,
/// if any) moves to the new start. Datagrams with IP options are dropped instead. `l3_off` is
/// `packet.l3_off`, in a register for the verifier (see `flow` in main.rs).
#[inline(always)]
pub fn udp_unreachable(ctx: &XdpContext, packet: &Packet, l3_off: usize) -> u32 {
    if packet.l4_off != l3_off + IPV4_HDR_LEN {
        return xdp_action::XDP_DROP;
    }
    let vlan = l3_off != EthHdr::LEN;
    let built = if vlan {
        build_udp_unreachable::<{ EthHdr::LEN + VlanHdr::LEN }>(ctx)
    } else {
        build_udp_unreachable::<{ EthHdr::LEN }>(ctx)
    };
    match built {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_DROP,
    }
}

/// `L2` is the length of the L2 header (Ethernet, plus a VLAN tag).
#[inline(always)]
fn build_udp_unreachable<const L2: usize>(ctx: &XdpContext) -> Option<()> {
    const GROWTH: usize = IPV4_HDR_LEN + ICMP_HDR_LEN;
    let l2: [u8; L2] = unsafe { *ptr_at::<[u8; L2]>(ctx, 0)? };
    let ip: *const Ipv4Hdr = ptr_at(ctx, L2)?;
    // SAFETY: inside the frame (`ptr_at`).
    let (client, vip) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };

    // SAFETY: plain helper call; every packet pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROWTH as i32)) } != 0 {
        return None;
    }
    // New layout: [L2][IPv4 20][ICMP 8][quoted IPv4 20 + UDP 8][rest, trimmed below].
    let quote: [[u8; 2]; ICMP_QUOTE_LEN / 2] = unsafe { *ptr_at(ctx, L2 + GROWTH)? };
    let icmp_words: [[u8; 2]; 4] = [
        [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH],
        [0, 0],
        [0, 0],
        [0, 0],
    ];
    let check = finish(sum_words(&icmp_words) + sum_words(&quote));
    // SAFETY: the frame is at least L2 + 28 + 28 bytes long (`ptr_at` above proved it).
    unsafe {
        let head: *mut [u8; L2] = ptr_at(ctx, 0)?;
        *head = l2;
        let ip: *mut Ipv4Hdr = ptr_at(ctx, L2)?;
        *ip = ipv4_header(vip, client, proto::ICMP, (GROWTH + ICMP_QUOTE_LEN) as u16);
        let icmp: *mut [[u8; 2]; 4] = ptr_at(ctx, L2 + IPV4_HDR_LEN)?;
        *icmp = icmp_words;
        (*icmp)[1] = check;
    }
    swap_macs(ctx)?;
    truncate(ctx, L2 + GROWTH + ICMP_QUOTE_LEN)
}
