//! xlb's XDP program. One stage per module, in the order a packet meets them:
//! [`parse`] -> [`lookup`] -> [`stats`]. Anything that is not service traffic leaves with
//! XDP_PASS, untouched.
#![no_std]
#![no_main]

mod lookup;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::parse::Skip;

#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    stats::global(|s| s.packets += 1);
    let packet = match parse::parse(&ctx) {
        Ok(packet) => packet,
        Err(skip) => {
            stats::global(|s| match skip {
                Skip::NotService => s.not_service += 1,
                Skip::Malformed => s.malformed += 1,
                Skip::Fragment => s.fragments += 1,
            });
            return xdp_action::XDP_PASS;
        }
    };
    let Some(service) = lookup::service_for(&packet.key) else {
        stats::global(|s| s.not_service += 1);
        return xdp_action::XDP_PASS;
    };
    stats::service(service.id, |s| {
        s.packets += 1;
        s.bytes += packet.len;
    });
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
