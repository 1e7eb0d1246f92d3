//! Stage 3: connection tracking. Both directions of a flow have an entry in one LRU map: the
//! forward entry (keyed by the client's 5-tuple towards the VIP) holds the backend to DNAT to,
//! the reply entry (keyed by the backend's 5-tuple towards the client) holds the VIP to put back.
//!
//! Established flows only read: the entry is looked up and updated in place, and `last_seen_ns`
//! is rewritten at most once per [`CT_TOUCH_INTERVAL_NS`], so the hot path does no map update.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    Config, FLOW_F_CLOSING, FLOW_F_REPLY, FlowKey, FlowValue, WireAddr, hash::CT_TOUCH_INTERVAL_NS,
    proto,
};

use crate::{
    maps::xlb_conntrack,
    parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS_PER_S: u64 = 1_000_000_000;

/// A live conntrack entry, writable in place.
pub struct Entry(*mut FlowValue);

impl Entry {
    #[inline(always)]
    pub fn value(&self) -> &FlowValue {
        // SAFETY: a pointer returned by bpf_map_lookup_elem stays valid for the whole program run.
        unsafe { &*self.0 }
    }

    /// Records a packet: refreshes the idle timer (coarsely) and notes FIN/RST.
    #[inline(always)]
    pub fn touch(&self, packet: &Packet, now: u64) {
        // SAFETY: as in `value`. Concurrent writers on other CPUs write the same kind of values;
        // a lost update only shifts an idle timer by one touch interval.
        let v = unsafe { &mut *self.0 };
        if now.wrapping_sub(v.last_seen_ns) > CT_TOUCH_INTERVAL_NS {
            v.last_seen_ns = now;
        }
        if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 && v.flags & FLOW_F_CLOSING == 0 {
            v.flags |= FLOW_F_CLOSING;
            v.last_seen_ns = now;
        }
    }
}

/// Idle timeout of an entry, from the agent's config.
#[inline(always)]
fn timeout_ns(v: &FlowValue, proto_number: u8, config: &Config) -> u64 {
    let seconds = if proto_number == proto::TCP {
        if v.flags & FLOW_F_CLOSING != 0 {
            config.tcp_closing_timeout_s
        } else {
            config.tcp_timeout_s
        }
    } else {
        config.udp_timeout_s
    };
    seconds as u64 * NS_PER_S
}

/// The live entry for this packet's 5-tuple. An expired entry, or a closed TCP flow that sees a
/// new SYN (the client reused the port), counts as absent: the flow is scheduled afresh.
#[inline(always)]
pub fn lookup(packet: &Packet, now: u64, config: &Config) -> Option<Entry> {
    let ptr = xlb_conntrack.get_ptr_mut(&packet.key)?;
    // SAFETY: valid map value pointer, see `Entry::value`.
    let v = unsafe { &*ptr };
    if now.wrapping_sub(v.last_seen_ns) > timeout_ns(v, packet.key.proto, config) {
        return None;
    }
    if v.flags & FLOW_F_CLOSING != 0 && packet.tcp_flags & TCP_SYN != 0 {
        return None;
    }
    Some(Entry(ptr))
}

/// The key replies of a forward flow arrive with: from the backend to the client.
#[inline(always)]
pub fn reply_key(forward: &FlowKey, backend_addr: &WireAddr, backend_port: u16) -> FlowKey {
    FlowKey {
        src_addr: *backend_addr,
        dst_addr: forward.src_addr,
        src_port: backend_port,
        dst_port: forward.src_port,
        proto: forward.proto,
        family: forward.family,
        _pad: 0,
    }
}

/// Tracks a new flow in both directions. Fails if the map refused an entry; the caller then
/// drops the packet rather than send it where its replies could not be reverse-NATed.
#[inline(always)]
pub fn insert(
    packet: &Packet,
    backend_addr: &WireAddr,
    backend_port: u16,
    backend_id: u32,
    service_id: u32,
    now: u64,
) -> Result<(), i32> {
    let reply = FlowValue {
        last_seen_ns: now,
        nat_addr: packet.key.dst_addr,
        nat_port: packet.key.dst_port,
        flags: FLOW_F_REPLY,
        backend_id,
        service_id,
        _pad: 0,
    };
    xlb_conntrack.insert(
        reply_key(&packet.key, backend_addr, backend_port),
        reply,
        BPF_ANY as u64,
    )?;
    let forward = FlowValue {
        last_seen_ns: now,
        nat_addr: *backend_addr,
        nat_port: backend_port,
        flags: 0,
        backend_id,
        service_id,
        _pad: 0,
    };
    xlb_conntrack.insert(packet.key, forward, BPF_ANY as u64)
}
