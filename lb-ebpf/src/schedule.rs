//! Stage 4: pick a backend for a new flow from the service's scheduler table, which the agent
//! builds (lb-agent/src/sched_table.rs); the program only indexes it.
//!
//! * `mh` (Maglev): slot `flow_hash % 16381` of the weighted Maglev table.
//! * `sh`: the same table, slot chosen by the client address alone.
//! * `rr`, `wrr`: the table is one period of the (smooth weighted) round-robin sequence; a
//!   per-CPU cursor walks it, so picks are exact per CPU and need no atomics.
//! * `lc`, `wlc`: the table lists the backends; the one with the fewest active flows (relative to
//!   its weight for wlc) wins, ties to the first. Counts live in `xlb_be_conns`.

use core::ffi::c_void;

use aya_ebpf::helpers::bpf_loop;
use lb_common::{
    BACKEND_F_ACTIVE, BackendValue, SchedTable, Scheduler, ServiceValue,
    hash::{MAGLEV_TABLE_SIZE, flow_hash, maglev_slot, source_hash},
    maps::LEAST_CONN_MAX_BACKENDS,
};

use crate::{
    maps::{xlb_backends, xlb_be_conns, xlb_rr_cursor, xlb_sched_tabs},
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
    let slot = match Scheduler::from_u8(service.scheduler)? {
        Scheduler::Maglev => {
            verifier_bounded(maglev_slot(flow_hash(&packet.key)), MAGLEV_TABLE_SIZE)?
        }
        Scheduler::SourceHash => verifier_bounded(
            maglev_slot(source_hash(&packet.key.src_addr)),
            MAGLEV_TABLE_SIZE,
        )?,
        Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => round_robin(service.id, table)?,
        Scheduler::LeastConn => return backend(least_conn::<false>(table)?),
        Scheduler::WeightedLeastConn => return backend(least_conn::<true>(table)?),
    };
    if slot >= table.len as usize {
        return None;
    }
    backend(*table.backend_ids.get(slot)?)
}

/// The backend with id `id`, if it is active.
#[inline(always)]
fn backend(id: u32) -> Option<Pick> {
    let backend = *xlb_backends.get(id)?;
    if backend.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    Some(Pick { id, backend })
}

/// The next slot of this CPU's walk through the round-robin sequence.
#[inline(always)]
fn round_robin(service_id: u32, table: &SchedTable) -> Option<usize> {
    let cursor = xlb_rr_cursor.get_ptr_mut(service_id)?;
    // SAFETY: per-CPU value; XDP runs without preemption on its CPU.
    let position = unsafe { *cursor };
    // A table that shrank since the last pick restarts the walk.
    let slot = match verifier_bounded(position, MAGLEV_TABLE_SIZE) {
        Some(slot) if slot < table.len as usize => slot,
        _ => 0,
    };
    let next = slot as u32 + 1;
    // SAFETY: as above.
    unsafe { *cursor = if next >= table.len { 0 } else { next } };
    Some(slot)
}

/// The id of the backend with the fewest active flows (`WEIGHTED`: fewest per unit of weight;
/// `a/wa < b/wb` is compared as `a*wb < b*wa`, as IPVS does, to stay in integers); ties go to
/// the first.
///
/// The scan runs under `bpf_loop`, so the verifier checks one iteration once instead of
/// unrolling up to [`LEAST_CONN_MAX_BACKENDS`] iterations times every branch in them.
///
/// Older verifiers (6.1) check a `bpf_loop` callback once, in the state of its first call, and
/// then delete as dead code every branch that check never took. Started from the constant
/// "nothing yet" state, the comparison with the best so far was always decided the same way,
/// was removed, and every scan picked the last backend. So the first slot is scanned by a plain
/// call, and the loop starts at the second with a best-so-far read from the maps, which the
/// verifier cannot predict: it checks both outcomes. (It also loses track of values the
/// callback reads through its context pointer, so `WEIGHTED` is a separate callback rather
/// than a field it branches on, which it could take for a constant the same way.) Newer
/// kernels check callbacks until their state converges.
#[inline(always)]
fn least_conn<const WEIGHTED: bool>(table: &SchedTable) -> Option<u32> {
    let mut scan = LeastConnScan {
        table: table as *const SchedTable,
        len: table.len,
        first_slot: 0,
        best_id: 0,
        best_conns: 0,
        best_weight: 0,
    };
    let ctx = &mut scan as *mut LeastConnScan as *mut c_void;
    least_conn_step::<WEIGHTED>(0, ctx);
    scan.first_slot = 1;
    // SAFETY: the callback only reads `scan` (on this stack frame) and the table, both live for
    // the whole call.
    unsafe {
        bpf_loop(
            LEAST_CONN_MAX_BACKENDS - 1,
            least_conn_step::<WEIGHTED> as *mut c_void,
            ctx,
            0,
        )
    };
    (scan.best_id != 0).then_some(scan.best_id)
}

/// The state of a least-connection scan, shared with the `bpf_loop` callback.
#[repr(C)]
struct LeastConnScan {
    table: *const SchedTable,
    len: u32,
    /// The slot of the callback's index 0.
    first_slot: u32,
    /// Backend ids start at 1, so 0 means "none yet".
    best_id: u32,
    best_conns: u64,
    best_weight: u64,
}

/// One step of the scan: looks at slot `first_slot + index`. Returns 1 to stop, 0 to go on.
#[inline(never)]
extern "C" fn least_conn_step<const WEIGHTED: bool>(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `LeastConnScan` of `least_conn`.
    let scan = unsafe { &mut *(ctx as *mut LeastConnScan) };
    let Some(slot) = verifier_bounded(
        (index as u32).wrapping_add(scan.first_slot),
        MAGLEV_TABLE_SIZE,
    ) else {
        return 1;
    };
    if slot >= scan.len as usize {
        return 1;
    }
    // SAFETY: the table pointer came from a map lookup in the caller, valid for this run.
    let Some(&id) = (unsafe { &*scan.table }).backend_ids.get(slot) else {
        return 1;
    };
    let Some(conns) = xlb_be_conns.get_ptr(id) else {
        return 0;
    };
    // SAFETY: valid, aligned array value pointer. Writers use atomic adds; an aligned 8-byte
    // load sees either the old or the new count (volatile: it must be re-read each time).
    let raw = unsafe { core::ptr::read_volatile(conns) };
    // Read as signed: a close racing the agent's recount may take a count below zero for a
    // moment, which means "idle", not "2^64 flows".
    let conns = (raw as i64).max(0) as u64;
    let weight = if WEIGHTED {
        match xlb_backends.get(id) {
            Some(b) if b.weight > 0 => b.weight as u64,
            _ => return 0,
        }
    } else {
        1
    };
    if scan.best_id == 0 || conns * scan.best_weight < scan.best_conns * weight {
        scan.best_id = id;
        scan.best_conns = conns;
        scan.best_weight = weight;
    }
    0
}

/// Whether the scheduler counts active flows per backend.
#[inline(always)]
pub fn counts_flows(service: &ServiceValue) -> bool {
    service.scheduler == Scheduler::LeastConn as u8
        || service.scheduler == Scheduler::WeightedLeastConn as u8
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
