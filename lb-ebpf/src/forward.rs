//! Stage 6: send a rewritten packet on its way. `bpf_fib_lookup` finds the next hop for the new
//! destination; with a resolved neighbour the program rewrites the MACs itself and transmits
//! (XDP_TX out the same interface, XDP_REDIRECT out another). Anything else — a local
//! destination, an unresolved neighbour, no route, forwarding disabled — goes to the kernel
//! stack, which handles it (and resolves the neighbour for the next packets).

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, bpf_fib_lookup__bindgen_ty_1,
        bpf_fib_lookup__bindgen_ty_2, bpf_fib_lookup__bindgen_ty_3, bpf_fib_lookup__bindgen_ty_4,
        bpf_fib_lookup__bindgen_ty_5, xdp_action,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{nat, parse::ptr_at, stats};

/// AF_INET, the FIB lookup family for IPv4.
const AF_INET: u8 = 2;

/// Forwards a packet whose headers are final: its IPv4 header is at `l3_off`, carrying
/// `l4_proto`.
#[inline(always)]
pub fn forward(ctx: &XdpContext, l3_off: usize, l4_proto: u8) -> u32 {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
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
    // Every byte written explicitly (unions through their widest member): `mem::zeroed()` would
    // become a call to a byte-looping memset that the verifier walks on every path.
    let mut params = bpf_fib_lookup {
        family: AF_INET,
        l4_protocol: l4_proto,
        sport: 0,
        dport: 0,
        __bindgen_anon_1: bpf_fib_lookup__bindgen_ty_1 { tot_len },
        ifindex: ctx.ingress_ifindex() as u32,
        // tos is the first byte of this 4-byte union (little-endian BPF).
        __bindgen_anon_2: bpf_fib_lookup__bindgen_ty_2 {
            flowinfo: tos as u32,
        },
        __bindgen_anon_3: bpf_fib_lookup__bindgen_ty_3 {
            ipv6_src: [u32::from_ne_bytes(src), 0, 0, 0],
        },
        __bindgen_anon_4: bpf_fib_lookup__bindgen_ty_4 {
            ipv6_dst: [u32::from_ne_bytes(dst), 0, 0, 0],
        },
        __bindgen_anon_5: bpf_fib_lookup__bindgen_ty_5 { tbid: 0 },
        smac: [0; 6],
        dmac: [0; 6],
    };

    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || !nat::decrement_ttl(ctx, l3_off) {
        stats::global(|s| s.fib_to_stack += 1);
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: inside the frame, see `ptr_at`.
    unsafe {
        // copy_nonoverlapping lowers to inline stores; a plain assignment became a memmove call.
        core::ptr::copy_nonoverlapping(params.dmac.as_ptr(), (*eth).dst_addr.as_mut_ptr(), 6);
        core::ptr::copy_nonoverlapping(params.smac.as_ptr(), (*eth).src_addr.as_mut_ptr(), 6);
    }
    stats::global(|s| s.fib_forwarded += 1);
    if params.ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(params.ifindex, 0) as u32 }
}
