//! Stage 5: rewrite addresses and ports, updating the IPv4 header checksum and the TCP/UDP
//! checksum incrementally ([`crate::csum`]).

use aya_ebpf::programs::XdpContext;
use lb_common::{WireAddr, proto};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    csum::Delta,
    parse::{Packet, ptr_at},
};

/// Which end of the packet gets rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Destination address and port (DNAT of a client's packet to a backend).
    Destination,
    /// Source address and port (reverse NAT of a backend's reply back to the VIP).
    Source,
}

/// The L4 header whose port and checksum a rewrite touches.
enum L4 {
    Tcp(*mut TcpHdr),
    Udp(*mut UdpHdr),
}

/// Rewrites one side's IPv4 address and L4 port. Every header pointer is obtained before the
/// first write, so the frame is either fully rewritten or (`None`) not touched at all.
/// `l4_proto` is `packet.key.proto`, passed apart so a BPF subprogram can use the copy in its
/// argument register (see `flow` in main.rs).
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    packet: &Packet,
    l4_proto: u8,
    side: Side,
    addr: &WireAddr,
    port: u16,
) -> Option<()> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, packet.l3_off)?;
    let l4 = match l4_proto {
        proto::TCP => L4::Tcp(ptr_at(ctx, packet.l4_off)?),
        proto::UDP => L4::Udp(ptr_at(ctx, packet.l4_off)?),
        _ => return None,
    };
    let new_addr = addr[0];
    // SAFETY: `ptr_at` proved the headers lie inside the frame.
    unsafe {
        let addr_field = match side {
            Side::Destination => &mut (*ip).dst_addr,
            Side::Source => &mut (*ip).src_addr,
        };
        let old_addr = u32::from_ne_bytes(*addr_field);
        *addr_field = new_addr.to_ne_bytes();
        (*ip).check = Delta::new((*ip).check)
            .replace32(old_addr, new_addr)
            .finish();

        match l4 {
            L4::Tcp(tcp) => {
                let port_field = match side {
                    Side::Destination => &mut (*tcp).dest,
                    Side::Source => &mut (*tcp).source,
                };
                let old_port = u16::from_ne_bytes(*port_field);
                *port_field = port.to_ne_bytes();
                // The TCP checksum covers the pseudo-header (addresses) and the port.
                (*tcp).check = Delta::new((*tcp).check)
                    .replace32(old_addr, new_addr)
                    .replace16(old_port, port)
                    .finish();
            }
            L4::Udp(udp) => {
                let port_field = match side {
                    Side::Destination => &mut (*udp).dst,
                    Side::Source => &mut (*udp).src,
                };
                let old_port = u16::from_ne_bytes(*port_field);
                *port_field = port.to_ne_bytes();
                // A zero UDP checksum means "none" and stays zero; a computed zero is sent as
                // all ones (RFC 768).
                if (*udp).check != [0, 0] {
                    let check = Delta::new((*udp).check)
                        .replace32(old_addr, new_addr)
                        .replace16(old_port, port)
                        .finish();
                    (*udp).check = if check == [0, 0] { [0xff, 0xff] } else { check };
                }
            }
        }
    }
    Some(())
}

/// Decrements the TTL (the LB forwards like a router), fixing the header checksum. Returns
/// `false` when the TTL would expire: the kernel stack must handle it (ICMP time exceeded).
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, l3_off: usize) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
        return false;
    };
    // SAFETY: inside the frame, see `ptr_at`.
    unsafe {
        let ttl = (*ip).ttl;
        if ttl <= 1 {
            return false;
        }
        // TTL and protocol form one 16-bit word of the header.
        let old = u16::from_ne_bytes([ttl, (*ip).proto]);
        let new = u16::from_ne_bytes([ttl - 1, (*ip).proto]);
        (*ip).ttl = ttl - 1;
        (*ip).check = Delta::new((*ip).check).replace16(old, new).finish();
    }
    true
}
