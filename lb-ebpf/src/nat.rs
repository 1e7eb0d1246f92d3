//! Stage 5: rewrite addresses and ports, updating the IPv4 header checksum and the TCP/UDP
//! checksum incrementally (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Every value here is the packet's own bytes read as native integers. One's-complement sums are
//! byte-order independent as long as all operands are read the same way, so no byte swapping is
//! needed.

use aya_ebpf::programs::XdpContext;
use lb_common::{WireAddr, proto};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::parse::{Packet, ptr_at};

/// Folds a 64-bit one's-complement accumulator into 16 bits.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds a 32-bit word as two 16-bit words.
#[inline(always)]
fn add32(sum: u64, v: u32) -> u64 {
    sum + (v & 0xffff) as u64 + (v >> 16) as u64
}

/// A checksum after replacing `old` by `new` (32-bit field) and `old16` by `new16` (16-bit
/// field) in the covered data.
#[inline(always)]
fn updated(check: [u8; 2], old: u32, new: u32, old16: u16, new16: u16) -> u16 {
    let mut sum = (!u16::from_ne_bytes(check)) as u64;
    sum = add32(sum, !old);
    sum = add32(sum, new);
    sum += (!old16) as u64 + new16 as u64;
    !fold(sum)
}

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
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    packet: &Packet,
    side: Side,
    addr: &WireAddr,
    port: u16,
) -> Option<()> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, packet.l3_off)?;
    let l4 = match packet.key.proto {
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
        (*ip).check = updated((*ip).check, old_addr, new_addr, 0, 0).to_ne_bytes();

        match l4 {
            L4::Tcp(tcp) => {
                let port_field = match side {
                    Side::Destination => &mut (*tcp).dest,
                    Side::Source => &mut (*tcp).source,
                };
                let old_port = u16::from_ne_bytes(*port_field);
                *port_field = port.to_ne_bytes();
                // The TCP checksum covers the pseudo-header (addresses) and the port.
                (*tcp).check =
                    updated((*tcp).check, old_addr, new_addr, old_port, port).to_ne_bytes();
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
                    let check = updated((*udp).check, old_addr, new_addr, old_port, port);
                    (*udp).check = if check == 0 { 0xffff } else { check }.to_ne_bytes();
                }
            }
        }
    }
    Some(())
}

/// Decrements the TTL (the LB forwards like a router), fixing the header checksum. Returns
/// `false` when the TTL would expire: the kernel stack must handle it (ICMP time exceeded).
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, packet: &Packet) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, packet.l3_off) else {
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
        (*ip).check = updated((*ip).check, 0, 0, old, new).to_ne_bytes();
    }
    true
}
