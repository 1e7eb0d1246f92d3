//! ClientIP session affinity: every new flow from one client address to one service goes to the
//! backend its first flow got, until the client has been idle for the service's timeout.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    AffinityKey, AffinityValue, BACKEND_F_ACTIVE, BackendValue, ServiceValue, WireAddr,
    hash::CT_TOUCH_INTERVAL_NS,
};

use crate::maps::{xlb_affinity, xlb_backends};

const NS_PER_S: u64 = 1_000_000_000;

#[inline(always)]
fn key(service_id: u32, client: &WireAddr, family: u8) -> AffinityKey {
    AffinityKey {
        client_addr: *client,
        service_id,
        family,
        _pad0: 0,
        _pad1: 0,
    }
}

/// The backend this client is pinned to, if the pin is fresh and its backend still active.
/// (The agent deletes the pins to a backend the moment it leaves the service, so a client is
/// re-balanced at once.)
#[inline(always)]
pub fn lookup(
    service: &ServiceValue,
    client: &WireAddr,
    family: u8,
    now: u64,
) -> Option<(u32, BackendValue)> {
    // SAFETY: read-only use of the value within this program run.
    let pin = unsafe { xlb_affinity.get(key(service.id, client, family)) }?;
    if now.wrapping_sub(pin.last_seen_ns) > service.affinity_timeout_s as u64 * NS_PER_S {
        return None;
    }
    let backend = *xlb_backends.get(pin.backend_id)?;
    if backend.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    Some((pin.backend_id, backend))
}

/// Pins (or re-pins) the client to `backend_id`, stamped now.
#[inline(always)]
pub fn pin(service_id: u32, client: &WireAddr, family: u8, backend_id: u32, now: u64) {
    let value = AffinityValue {
        last_seen_ns: now,
        backend_id,
        _pad: 0,
    };
    // A full LRU map evicts its oldest pin; an error here only costs stickiness.
    let _ = xlb_affinity.insert(key(service_id, client, family), value, BPF_ANY as u64);
}

/// Keeps the pin of a client with traffic fresh (at most once per touch interval).
#[inline(always)]
pub fn touch(service_id: u32, client: &WireAddr, family: u8, now: u64) {
    if let Some(pin) = xlb_affinity.get_ptr_mut(key(service_id, client, family)) {
        // SAFETY: valid map value pointer; a racing write only moves the timestamp.
        unsafe {
            if now.wrapping_sub((*pin).last_seen_ns) > CT_TOUCH_INTERVAL_NS {
                (*pin).last_seen_ns = now;
            }
        }
    }
}
