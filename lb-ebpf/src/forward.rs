//! Stage 6: send a rewritten packet on its way. `bpf_fib_lookup` finds the next hop for the new
//! destination; with a resolved neighbour the program rewrites the MACs itself and transmits
//! (XDP_TX out the same interface, XDP_REDIRECT out another). Anything else — a local
//! destination, an unresolved neighbour, no route, forwarding disabled — goes to the kernel
//! stack, which handles it (and resolves the neighbour for the next packets).

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    nat,
    parse::{Packet, ptr_at},
    stats,
};

/// AF_INET, the FIB lookup family for IPv4.
const AF_INET: u8 = 2;

/// Forwards a packet whose headers are final.
#[inline(always)]
pub fn forward(ctx: &XdpContext, packet: &Packet) -> u32 {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, packet.l3_off) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: `ptr_at` proved the header lies inside the frame.
    let (src, dst, tos, tot_len) = unsafe {
        (
            (*ip).src_addr,
            (*ip).dst_addr,
            (*ip).tos,
            u16::from_be_bytes((*ip).tot_len),
        )
    };
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented initial state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = packet.key.proto;
    params.sport = 0;
    params.dport = 0;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_2.tos = tos;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    params.ifindex = ctx.ingress_ifindex() as u32;

    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || !nat::decrement_ttl(ctx, packet) {
        stats::global(|s| s.fib_to_stack += 1);
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: inside the frame, see `ptr_at`.
    unsafe {
        (*eth).dst_addr = params.dmac;
        (*eth).src_addr = params.smac;
    }
    stats::global(|s| s.fib_forwarded += 1);
    if params.ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(params.ifindex, 0) as u32 }
}
