//! Stage 3: connection tracking. Both directions of a flow have an entry in one LRU map: the
//! forward entry (keyed by the client's 5-tuple towards the VIP) holds the backend to DNAT to,
//! the reply entry (keyed by the backend's 5-tuple towards the client) holds the VIP to put back.
//!
//! Established flows only read: the entry is looked up and updated in place, and `last_seen_ns`
//! is rewritten at most once per [`CT_TOUCH_INTERVAL_NS`], so the hot path does no map update.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    Config, FLOW_F_CLOSING, FLOW_F_COUNTED, FLOW_F_REPLY, FlowKey, FlowValue, WireAddr,
    hash::CT_TOUCH_INTERVAL_NS, proto,
};

use crate::{
    maps::{xlb_be_conns, xlb_conntrack},
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

    /// Records a packet: refreshes the idle timer (coarsely) and notes FIN/RST. Returns what
    /// changed, so the caller can refresh affinity and give back a least-connection count.
    #[inline(always)]
    pub fn touch(&self, packet: &Packet, now: u64) -> Touch {
        // SAFETY: as in `value`. Concurrent writers on other CPUs write the same kind of values;
        // a lost update only shifts an idle timer by one touch interval.
        let v = unsafe { &mut *self.0 };
        let mut touch = Touch {
            refreshed: false,
            closed: false,
        };
        if now.wrapping_sub(v.last_seen_ns) > CT_TOUCH_INTERVAL_NS {
            v.last_seen_ns = now;
            touch.refreshed = true;
        }
        if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 && v.flags & FLOW_F_CLOSING == 0 {
            v.flags |= FLOW_F_CLOSING;
            v.last_seen_ns = now;
            touch.closed = true;
        }
        touch
    }

    /// Clears the entry's least-connection count, returning whether it held one. Two CPUs may
    /// both see the flag in a race and give back two counts; the agent's periodic recount repairs
    /// that (see lb-agent's conntrack maintenance).
    #[inline(always)]
    pub fn take_count(&self) -> bool {
        // SAFETY: as in `value`.
        let v = unsafe { &mut *self.0 };
        if v.flags & FLOW_F_COUNTED == 0 {
            return false;
        }
        v.flags &= !FLOW_F_COUNTED;
        true
    }
}

/// What [`Entry::touch`] changed.
pub struct Touch {
    /// The idle timer was rewritten (at most once per touch interval).
    pub refreshed: bool,
    /// This packet is the first FIN or RST the entry saw.
    pub closed: bool,
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
        // The flow died idle; it is about to be replaced, so give back its count now.
        let stale = Entry(ptr);
        if stale.take_count() {
            uncount_flow(stale.value().backend_id);
        }
        return None;
    }
    if v.flags & FLOW_F_CLOSING != 0 && packet.tcp_flags & TCP_SYN != 0 {
        return None;
    }
    Some(Entry(ptr))
}

/// The forward entry of the flow a reply entry belongs to.
#[inline(always)]
pub fn forward_of(reply_key: &FlowKey, reply: &FlowValue) -> Option<Entry> {
    let key = FlowKey {
        src_addr: reply_key.dst_addr,
        dst_addr: reply.nat_addr,
        src_port: reply_key.dst_port,
        dst_port: reply.nat_port,
        proto: reply_key.proto,
        family: reply_key.family,
        _pad: 0,
    };
    xlb_conntrack.get_ptr_mut(&key).map(Entry)
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

/// Tracks a new flow in both directions; `forward_flags` (`FLOW_F_COUNTED`, `FLOW_F_AFFINITY`)
/// go on the forward entry. Fails if the map refused an entry; the caller then drops the packet
/// rather than send it where its replies could not be reverse-NATed.
#[inline(always)]
pub fn insert(
    packet: &Packet,
    backend_addr: &WireAddr,
    backend_port: u16,
    backend_id: u32,
    service_id: u32,
    forward_flags: u16,
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
        flags: forward_flags,
        backend_id,
        service_id,
        _pad: 0,
    };
    xlb_conntrack.insert(packet.key, forward, BPF_ANY as u64)
}

/// Counts a new flow against its backend (lc/wlc).
///
/// How the counts stay honest: the program adds one per new counted flow and gives it back on the
/// first FIN/RST (either direction) or when it finds the entry expired. What it cannot see is an
/// entry the LRU map evicts, or a flow that ends silently and is never looked up again; so the
/// agent periodically recounts the live, open, counted forward entries per backend and overwrites
/// the counters (lb-agent's conntrack maintenance). Between recounts a count can only be off by
/// the evictions and races of one interval.
#[inline(always)]
pub fn count_flow(backend_id: u32) {
    if let Some(conns) = xlb_be_conns.get_ptr_mut(backend_id) {
        // SAFETY: valid array value pointer; shared across CPUs, hence the atomic add.
        unsafe { atomic_add(conns, 1) };
    }
}

/// Gives back a flow's count when it closes or expires.
#[inline(always)]
pub fn uncount_flow(backend_id: u32) {
    if let Some(conns) = xlb_be_conns.get_ptr_mut(backend_id) {
        // SAFETY: as in `count_flow`. A count the agent already recounted may dip below zero;
        // readers clamp it, and the next recount sets it right.
        unsafe { atomic_add(conns, u64::MAX) };
    }
}

/// `*counter += delta` as one BPF atomic instruction (`lock xadd`). Rust's `AtomicU64` offers no
/// read-modify-write on the BPF target, so this is the instruction itself.
///
/// # Safety
/// `counter` must point to a valid, 8-byte aligned map value.
#[inline(always)]
unsafe fn atomic_add(counter: *mut u64, delta: u64) {
    // SAFETY: per the function contract.
    unsafe { core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) counter, in(reg) delta) };
}
