//! The floor of the per-packet benchmark (`cargo xtask bench`): an XDP program that does
//! nothing but return XDP_PASS. It lives in the same object as [`crate::xlb_xdp`] so both are
//! built by the same toolchain and loaded and run through the same path; the difference between
//! the two is exactly the load balancer's own work. The agent loads and attaches only
//! `xlb_xdp` (by name, `lb_common::maps::XDP_PROGRAM`); aya never loads a program nobody asks for.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xlb_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
