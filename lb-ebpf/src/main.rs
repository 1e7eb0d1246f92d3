//! xlb's XDP program. One stage per module, in the order a packet meets them:
//! [`parse`] -> [`conntrack`] (both directions) -> [`lookup`] (service) -> [`affinity`] /
//! [`schedule`] -> [`nat`] -> [`forward`]; [`reject`] answers for frontends without backends and
//! [`icmp`] handles echo requests to VIPs and ICMP errors about NATed flows. [`stats`] counts
//! along the way. Anything that is neither for a service nor a reply of a tracked flow leaves
//! with XDP_PASS, untouched.
#![no_std]
#![no_main]
// Inline BPF assembly, for the atomic add of the least-connection counters.
#![feature(asm_experimental_arch)]

mod affinity;
mod bench;
mod conntrack;
mod csum;
mod forward;
mod icmp;
mod lookup;
mod maps;
mod nat;
mod parse;
mod reject;
mod schedule;
mod stats;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, programs::XdpContext,
};
use lb_common::{
    Config, FLOW_F_AFFINITY, FLOW_F_COUNTED, FLOW_F_REPLY, SERVICE_F_AFFINITY,
    SERVICE_F_DROP_NO_BACKEND, ServiceValue, proto,
};

use crate::{
    maps::xlb_config,
    nat::Side,
    parse::{Packet, Parsed, Skip},
};

/// GPL-only helpers (bpf_fib_lookup, bpf_redirect) need a GPL-compatible license; loaders read
/// it from this section.
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Index of the single config entry.
const CONFIG_INDEX: u32 = 0;

#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    stats::global(|s| s.packets += 1);
    let parsed = match parse::parse(&ctx) {
        Ok(parsed) => parsed,
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
    match parsed {
        Parsed::Icmp(icmp) => icmp::handle(&ctx, &icmp, config),
        Parsed::Flow(packet) => flow(&ctx, &packet, config),
    }
}

/// A TCP or UDP packet: a tracked flow in either direction, or a new flow to a service.
#[inline(always)]
fn flow(ctx: &XdpContext, packet: &Packet, config: &Config) -> u32 {
    // Coarse time is enough for idle timeouts and much cheaper than the precise clock.
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    if let Some(entry) = conntrack::lookup(packet, now, config) {
        let touch = entry.touch(packet, now);
        // A copy: later map operations must not change what this packet acts on.
        let flow = *entry.value();
        let reply = flow.flags & FLOW_F_REPLY != 0;
        if touch.closed {
            // The flow's least-connection count sits on its forward entry.
            let forward = if reply {
                conntrack::forward_of(&packet.key, &flow)
            } else {
                Some(entry)
            };
            if let Some(forward) = forward
                && forward.take_count()
            {
                conntrack::uncount_flow(flow.backend_id);
            }
        }
        let side = if reply {
            stats::global(|s| s.reverse_nat += 1);
            Side::Source
        } else {
            if touch.refreshed && flow.flags & FLOW_F_AFFINITY != 0 {
                affinity::touch(
                    flow.service_id,
                    &packet.key.src_addr,
                    packet.key.family,
                    now,
                );
            }
            stats::global(|s| s.ct_hits += 1);
            stats::service(flow.service_id, |s| {
                s.packets += 1;
                s.bytes += packet.len;
            });
            Side::Destination
        };
        if nat::rewrite(
            ctx,
            packet,
            packet.key.proto,
            side,
            &flow.nat_addr,
            flow.nat_port,
        )
        .is_none()
        {
            return xdp_action::XDP_PASS;
        }
        return forward::forward(ctx, packet.l3_off, packet.key.proto);
    }

    let Some(service) = lookup::service_for(&packet.key) else {
        stats::global(|s| s.not_service += 1);
        return xdp_action::XDP_PASS;
    };
    stats::service(service.id, |s| {
        s.packets += 1;
        s.bytes += packet.len;
    });
    // The new-flow and refusal paths run as BPF subprograms with their own stack frames, and
    // forwarding happens back here, so no call chain stacks two large frames (the verifier caps
    // a chain at 512 bytes).
    //
    // What a subprogram branches on (the L4 protocol, the L3 offset that says whether there is a
    // VLAN tag) goes in argument registers, never only through `packet`, a pointer into this
    // frame: the 6.1 verifier stops tracking a value's precision at a load through a pointer
    // other than the frame pointer. It pruned the untagged path into `no_backend` as equivalent
    // to the VLAN-tagged one it had already checked, never saw the untagged branch taken there
    // and removed it as dead code, so untagged UDP got a garbled ICMP error (and the protocol
    // could be taken for a constant the same way). Register arguments are tracked across the
    // call.
    match new_flow(ctx, packet, service, now, packet.key.proto) {
        NEW_FLOW_FORWARD => forward::forward(ctx, packet.l3_off, packet.key.proto),
        NEW_FLOW_NO_BACKEND => no_backend(ctx, packet, service, packet.l3_off, packet.key.proto),
        action => action,
    }
}

/// [`new_flow`] outcome: tracked and rewritten, forward it. (Plain `u32` codes beside the XDP
/// actions rather than an enum: a subprogram returning an enum may leave a stack address in R0,
/// which the verifier refuses.)
const NEW_FLOW_FORWARD: u32 = u32::MAX;
/// [`new_flow`] outcome: the service has no usable backend.
const NEW_FLOW_NO_BACKEND: u32 = u32::MAX - 1;

/// Picks a backend (affinity first, then the scheduler), tracks the flow and rewrites its first
/// packet. Returns an XDP action, or one of the `NEW_FLOW_*` codes. `l4_proto` is
/// `packet.key.proto`, in a register for the verifier (see [`flow`]).
#[inline(never)]
fn new_flow(
    ctx: &XdpContext,
    packet: &Packet,
    service: &ServiceValue,
    now: u64,
    l4_proto: u8,
) -> u32 {
    let (src, family) = (&packet.key.src_addr, packet.key.family);
    let sticky = service.flags & SERVICE_F_AFFINITY != 0;
    let pinned = if sticky {
        affinity::lookup(service, src, family, now)
    } else {
        None
    };
    let (backend_id, backend) = match pinned {
        Some(pinned) => pinned,
        None => match schedule::pick(service, packet) {
            Some(pick) => {
                if sticky {
                    affinity::pin(service.id, src, family, pick.id, now);
                }
                (pick.id, pick.backend)
            }
            None => return NEW_FLOW_NO_BACKEND,
        },
    };
    let counted = schedule::counts_flows(service);
    let flags = if counted { FLOW_F_COUNTED } else { 0 } | if sticky { FLOW_F_AFFINITY } else { 0 };
    if conntrack::insert(
        packet,
        &backend.addr,
        backend.port,
        backend_id,
        service.id,
        flags,
        now,
    )
    .is_err()
    {
        stats::global(|s| s.ct_insert_failed += 1);
        return xdp_action::XDP_DROP;
    }
    if counted {
        conntrack::count_flow(backend_id);
    }
    stats::global(|s| s.ct_misses += 1);
    stats::service(service.id, |s| s.new_flows += 1);
    match nat::rewrite(
        ctx,
        packet,
        l4_proto,
        Side::Destination,
        &backend.addr,
        backend.port,
    ) {
        Some(()) => NEW_FLOW_FORWARD,
        None => xdp_action::XDP_PASS,
    }
}

/// A frontend without a usable backend: refuse (TCP RST, ICMP port unreachable), or drop where
/// Kubernetes drops (a Local traffic policy with no local endpoint). `l3_off` and `l4_proto` are
/// `packet.l3_off` and `packet.key.proto`, in registers for the verifier (see [`flow`]).
#[inline(never)]
fn no_backend(
    ctx: &XdpContext,
    packet: &Packet,
    service: &ServiceValue,
    l3_off: usize,
    l4_proto: u8,
) -> u32 {
    stats::global(|s| s.no_backend += 1);
    stats::service(service.id, |s| s.no_backend += 1);
    if service.flags & SERVICE_F_DROP_NO_BACKEND != 0 {
        return xdp_action::XDP_DROP;
    }
    let action = if l4_proto == proto::TCP {
        reject::tcp_reset(ctx, packet, l3_off)
    } else {
        reject::udp_unreachable(ctx, packet, l3_off)
    };
    if action == xdp_action::XDP_TX {
        stats::global(|s| s.rejected += 1);
    }
    action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
