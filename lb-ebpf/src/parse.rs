//! Stage 1: parse Ethernet (+ one 802.1Q/802.1ad tag), IPv4 and TCP/UDP into a [`Packet`]
//! (or ICMP into an [`IcmpPacket`]).
//!
//! Every header access goes through [`ptr_at`], which proves to the verifier that the header lies
//! inside the frame. Anything unexpected is reported as a [`Skip`] reason, and the caller passes
//! the frame on untouched: a frame this stage cannot fully understand is never rewritten.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, WireAddr, family, proto, wire_addr_v4};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// IPv4 flags/fragment-offset field: More Fragments bit and the 13-bit offset. Any of them set
/// means the frame is a fragment.
const IPV4_MF_AND_OFFSET: u16 = 0x3fff;
/// Minimum IPv4 header length in 32-bit words (no options).
const IPV4_MIN_IHL: u8 = 5;
/// EtherTypes in network byte order, as network-types defines them and as read from the frame.
const ETH_P_8021Q: u16 = EtherType::Ieee8021q as u16;
const ETH_P_8021AD: u16 = EtherType::Ieee8021ad as u16;
const ETH_P_IPV4: u16 = EtherType::Ipv4 as u16;

/// TCP flags the later stages care about, as bits of [`Packet::tcp_flags`].
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Why a frame is left alone.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not IPv4, or not TCP/UDP/ICMP: not something a service can match.
    NotService,
    /// A header is truncated or inconsistent.
    Malformed,
    /// An IPv4 fragment: non-first fragments carry no ports, so none of them can be matched.
    Fragment,
}

/// What the later stages need to know about a TCP/UDP over IPv4 frame.
pub struct Packet {
    /// Offset of the IPv4 header from the start of the frame.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
    /// The 5-tuple as it arrived.
    pub key: FlowKey,
    /// TCP flags (`TCP_*`), 0 for UDP.
    pub tcp_flags: u8,
    /// Frame length in bytes, for the byte counters.
    pub len: u64,
}

/// An ICMP message over IPv4 (echo requests to a VIP, errors about NATed flows).
pub struct IcmpPacket {
    pub l3_off: usize,
    /// Offset of the ICMP header.
    pub l4_off: usize,
    pub dst: WireAddr,
    pub icmp_type: u8,
}

/// A frame the later stages may act on.
pub enum Parsed {
    /// TCP or UDP.
    Flow(Packet),
    Icmp(IcmpPacket),
}

/// Pointer to a `T` at `off` bytes into the frame, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Skip> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Skip::Malformed)?;
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_off = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, l3_off).ok_or(Skip::Malformed)?;
        ether_type = unsafe { (*vlan).ether_type };
        l3_off += VlanHdr::LEN;
    }
    if ether_type != ETH_P_IPV4 {
        return Err(Skip::NotService);
    }

    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Skip::Malformed)?;
    let (vihl, ip_proto, frags, tot_len) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            u16::from_be_bytes((*ip).frags),
            u16::from_be_bytes((*ip).tot_len) as usize,
        )
    };
    let ihl = vihl & 0x0f;
    if vihl >> 4 != 4 || ihl < IPV4_MIN_IHL {
        return Err(Skip::Malformed);
    }
    let ip_hdr_len = (ihl as usize) * 4;
    // The IP datagram must fit in the frame (Ethernet padding may follow it) and hold its header.
    // Compared as lengths, never as `data + l3_off + tot_len > data_end`: LLVM reads the
    // big-endian field with a byte swap, after which the 6.1 verifier knows nothing of its range
    // ("math between pkt pointer and register with unbounded min value"); scalars compare fine.
    // `l3_off` (at most 18) is below the frame length: the IPv4 header is inside the frame.
    let frame_len = ctx.data_end() - ctx.data();
    if tot_len < ip_hdr_len || tot_len > frame_len - l3_off {
        return Err(Skip::Malformed);
    }
    if frags & IPV4_MF_AND_OFFSET != 0 {
        return Err(Skip::Fragment);
    }
    let l4_off = l3_off + ip_hdr_len;

    let (src_port, dst_port, tcp_flags) = match ip_proto {
        proto::TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4_off).ok_or(Skip::Malformed)?;
            // doff counts 32-bit words; less than the 20-byte fixed header is malformed.
            let doff = unsafe { (*tcp).doff() } as usize;
            if doff < 5 || ip_hdr_len + doff * 4 > tot_len {
                return Err(Skip::Malformed);
            }
            // SAFETY: `ptr_at` proved the whole fixed header lies inside the frame.
            unsafe {
                let flags = ((*tcp).fin() as u8 * TCP_FIN)
                    | ((*tcp).syn() as u8 * TCP_SYN)
                    | ((*tcp).rst() as u8 * TCP_RST)
                    | ((*tcp).ack() as u8 * TCP_ACK);
                (
                    u16::from_ne_bytes((*tcp).source),
                    u16::from_ne_bytes((*tcp).dest),
                    flags,
                )
            }
        }
        proto::UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4_off).ok_or(Skip::Malformed)?;
            if ip_hdr_len + UdpHdr::LEN > tot_len {
                return Err(Skip::Malformed);
            }
            unsafe {
                (
                    u16::from_ne_bytes((*udp).src),
                    u16::from_ne_bytes((*udp).dst),
                    0,
                )
            }
        }
        proto::ICMP => {
            let icmp: *const Icmpv4Hdr = ptr_at(ctx, l4_off).ok_or(Skip::Malformed)?;
            if ip_hdr_len + size_of::<Icmpv4Hdr>() > tot_len {
                return Err(Skip::Malformed);
            }
            // SAFETY: both headers lie inside the frame (`ptr_at`).
            let (dst, icmp_type) = unsafe { ((*ip).dst_addr, (*icmp).type_) };
            return Ok(Parsed::Icmp(IcmpPacket {
                l3_off,
                l4_off,
                dst: wire_addr_v4(dst),
                icmp_type,
            }));
        }
        _ => return Err(Skip::NotService),
    };

    let (src, dst) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
    Ok(Parsed::Flow(Packet {
        l3_off,
        l4_off,
        key: FlowKey {
            src_addr: wire_addr_v4(src),
            dst_addr: wire_addr_v4(dst),
            src_port,
            dst_port,
            proto: ip_proto,
            family: family::IPV4,
            _pad: 0,
        },
        tcp_flags,
        len: (ctx.data_end() - ctx.data()) as u64,
    }))
}
