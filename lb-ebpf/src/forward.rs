//! Stage 6: send a rewritten packet on its way. `bpf_fib_lookup` finds the next hop for the new
//! destination; with a resolved neighbour the program rewrites the MACs itself and transmits
//! (XDP_TX out the same interface, XDP_REDIRECT out another). Anything else — a local
//! destination, an unresolved neighbour, no route, forwarding disabled — goes to the kernel
//! stack, which handles it (and resolves the neighbour for the next packets).

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{nat, parse::ptr_at, stats};

/// AF_INET, the FIB lookup family for IPv4.
const AF_INET: u8 = 2;

/// Forwards a packet whose headers are final: its IPv4 header is at `l3_off`, carrying
/// `l4_proto`.
///
/// A BPF subprogram with its own stack frame (the FIB lookup parameters alone are 64 bytes):
/// inlined at its three call sites, it made the callers' frames so large that the 6.1 verifier,
/// which rounds every frame of a call chain up to 32 bytes, counted more than the 512 bytes a
/// chain may use (xlb_xdp -> new_flow -> memset, xlb_xdp -> no_backend). Newer kernels round
/// to 16 bytes when the program is JITed, which is why they accepted the inlined version.
#[inline(never)]
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
    let mut slot = MaybeUninit::uninit();
    let params = zeroed_params(&mut slot);
    // Only the IPv4 fields; everything else stays zero. (The unions' IPv4 members are their
    // first bytes: the rest of each union stays zero too.)
    params.family = AF_INET;
    params.l4_protocol = l4_proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_2.tos = tos;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);

    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), params, size_of::<bpf_fib_lookup>() as i32, 0) };
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

/// `bpf_fib_lookup` on an 8-byte aligned stack slot.
#[repr(C, align(8))]
struct Params(bpf_fib_lookup);

/// Zeroes `slot` with eight 8-byte stores and returns it as FIB lookup parameters. Volatile, so
/// LLVM cannot merge them (or `mem::zeroed()`, or zero-filled array fields) into a call to
/// `memset`: that BPF call clobbers registers, so the caller's values spill around it, and those
/// spills grew this frame to 168 bytes, too much for the 6.1 verifier's 512 bytes per call chain
/// (it rounds every frame up to 32 bytes; newer kernels to 16 when JITing).
#[inline(always)]
fn zeroed_params(slot: &mut MaybeUninit<Params>) -> &mut bpf_fib_lookup {
    const WORDS: usize = size_of::<bpf_fib_lookup>() / 8;
    const _: () = assert!(size_of::<Params>() == WORDS * 8);
    let words = slot.as_mut_ptr() as *mut u64;
    let mut i = 0;
    while i < WORDS {
        // SAFETY: `i < WORDS` words of an 8-byte aligned value of exactly that size.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written; all-zero is a valid bpf_fib_lookup (integers and unions of
    // integers).
    unsafe { &mut slot.assume_init_mut().0 }
}
