//! Counters: per service and program-wide, both per CPU so updates need no atomics.

use lb_common::{GlobalStats, ServiceStats};

use crate::maps::{xlb_glob_stats, xlb_svc_stats};

/// Index of the single [`GlobalStats`] entry.
const GLOBAL_STATS_INDEX: u32 = 0;

/// Applies `f` to this CPU's program-wide counters.
#[inline(always)]
pub fn global(f: impl FnOnce(&mut GlobalStats)) {
    if let Some(stats) = xlb_glob_stats.get_ptr_mut(GLOBAL_STATS_INDEX) {
        // SAFETY: per-CPU value, and XDP programs are not preempted on their CPU.
        f(unsafe { &mut *stats })
    }
}

/// Applies `f` to this CPU's counters of service `service_id`.
#[inline(always)]
pub fn service(service_id: u32, f: impl FnOnce(&mut ServiceStats)) {
    if let Some(stats) = xlb_svc_stats.get_ptr_mut(service_id) {
        // SAFETY: as in `global`.
        f(unsafe { &mut *stats })
    }
}
