//! Stage 4: pick a backend for a new flow from the service's scheduler table, which the agent
//! builds (lb-agent/src/sched_table.rs) and the program only indexes.

use lb_common::{
    BACKEND_F_ACTIVE, BackendValue, ServiceValue,
    hash::{MAGLEV_TABLE_SIZE, flow_hash, maglev_slot},
};

use crate::{
    maps::{xlb_backends, xlb_sched_tabs},
    parse::Packet,
};

/// The chosen backend and its id.
pub struct Pick {
    pub id: u32,
    pub backend: BackendValue,
}

/// The backend a new flow goes to, or `None` when the service has no usable backend.
#[inline(always)]
pub fn pick(service: &ServiceValue, packet: &Packet) -> Option<Pick> {
    if service.backend_count == 0 {
        return None;
    }
    // SAFETY: tables are replaced whole and freed only after an RCU grace period (the map is not
    // preallocated), so the table stays complete and valid while this program runs.
    let table = unsafe { xlb_sched_tabs.get(service.table_id) }?;
    let slot = verifier_bounded(maglev_slot(flow_hash(&packet.key)), MAGLEV_TABLE_SIZE)?;
    if slot >= table.len as usize {
        return None;
    }
    let id = *table.backend_ids.get(slot)?;
    let backend = *xlb_backends.get(id)?;
    if backend.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    Some(Pick { id, backend })
}

/// `index` if it is below `limit`, in a form the verifier can check. LLVM knows that
/// `hash % SIZE < SIZE` and would delete a plain comparison, but the verifier does not track
/// ranges through modulo; a volatile read hides the value from LLVM so the comparison stays.
#[inline(always)]
fn verifier_bounded(index: u32, limit: u32) -> Option<usize> {
    // SAFETY: reading a local through a valid reference.
    let index = unsafe { core::ptr::read_volatile(&index) };
    if index < limit {
        Some(index as usize)
    } else {
        None
    }
}
