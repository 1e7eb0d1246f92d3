//! xlb's XDP program. One stage per module, in the order a packet meets them:
//! [`parse`] -> [`conntrack`] (both directions) -> [`lookup`] (service) -> [`schedule`] ->
//! [`nat`] -> [`forward`], with [`stats`] counting along the way. Anything that is neither for a
//! service nor a reply of a tracked flow leaves with XDP_PASS, untouched.
#![no_std]
#![no_main]

mod bench;
mod conntrack;
mod forward;
mod lookup;
mod maps;
mod nat;
mod parse;
mod schedule;
mod stats;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, programs::XdpContext,
};
use lb_common::{Config, FLOW_F_REPLY};

use crate::{maps::xlb_config, nat::Side, parse::Skip};

/// Index of the single config entry.
const CONFIG_INDEX: u32 = 0;

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
    let Some(config) = xlb_config.get(CONFIG_INDEX) else {
        return xdp_action::XDP_PASS;
    };
    // Coarse time is enough for idle timeouts and much cheaper than the precise clock.
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    if let Some(entry) = conntrack::lookup(&packet, now, config) {
        entry.touch(&packet, now);
        let flow = entry.value();
        if flow.flags & FLOW_F_REPLY != 0 {
            stats::global(|s| s.reverse_nat += 1);
            if nat::rewrite(&ctx, &packet, Side::Source, &flow.nat_addr, flow.nat_port).is_none() {
                return xdp_action::XDP_PASS;
            }
        } else {
            stats::global(|s| s.ct_hits += 1);
            stats::service(flow.service_id, |s| {
                s.packets += 1;
                s.bytes += packet.len;
            });
            if nat::rewrite(
                &ctx,
                &packet,
                Side::Destination,
                &flow.nat_addr,
                flow.nat_port,
            )
            .is_none()
            {
                return xdp_action::XDP_PASS;
            }
        }
        return forward::forward(&ctx, &packet);
    }

    let Some(service) = lookup::service_for(&packet.key) else {
        stats::global(|s| s.not_service += 1);
        return xdp_action::XDP_PASS;
    };
    stats::service(service.id, |s| {
        s.packets += 1;
        s.bytes += packet.len;
    });
    new_flow(&ctx, &packet, service, config, now)
}

/// Schedules, tracks, rewrites and forwards the first packet of a flow.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    packet: &parse::Packet,
    service: &lb_common::ServiceValue,
    _config: &Config,
    now: u64,
) -> u32 {
    let Some(pick) = schedule::pick(service, packet) else {
        stats::global(|s| s.no_backend += 1);
        stats::service(service.id, |s| s.no_backend += 1);
        return xdp_action::XDP_DROP;
    };
    let backend = &pick.backend;
    if conntrack::insert(
        packet,
        &backend.addr,
        backend.port,
        pick.id,
        service.id,
        now,
    )
    .is_err()
    {
        stats::global(|s| s.ct_insert_failed += 1);
        return xdp_action::XDP_DROP;
    }
    stats::global(|s| s.ct_misses += 1);
    stats::service(service.id, |s| s.new_flows += 1);
    if nat::rewrite(ctx, packet, Side::Destination, &backend.addr, backend.port).is_none() {
        return xdp_action::XDP_PASS;
    }
    forward::forward(ctx, packet)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
