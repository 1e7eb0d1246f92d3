//! Every map the program uses. Layouts, names and default sizes come from lb-common; the agent
//! may resize them at load time (`EbpfLoader::map_max_entries`).
#![allow(non_upper_case_globals)] // symbol names are the map names users see in bpftool

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, Config, DrainingKey, DrainingValue, FlowKey,
    FlowValue, GlobalStats, SchedTable, ServiceKey, ServiceStats, ServiceValue, VipKey, VipValue,
    maps::{
        AFFINITY_MAX, CONNTRACK_MAX, MAX_BACKENDS, MAX_DRAINING, MAX_SCHED_TABLES, MAX_SERVICES,
        MAX_VIPS, SINGLETON,
    },
};

#[btf_map]
pub static xlb_services: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> =
    HashMap::new();

#[btf_map]
pub static xlb_backends: Array<BackendValue, { MAX_BACKENDS as usize }> = Array::new();

/// Not preallocated: tables are 64 KiB and allocated only for live services. Entries are replaced
/// whole (never edited), and non-preallocated hash elements are freed after an RCU grace period,
/// so a packet holding a pointer to a table always sees a complete one.
#[btf_map]
pub static xlb_sched_tabs: HashMap<
    u32,
    SchedTable,
    { MAX_SCHED_TABLES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
pub static xlb_conntrack: LruHashMap<FlowKey, FlowValue, { CONNTRACK_MAX as usize }> =
    LruHashMap::new();

#[btf_map]
pub static xlb_svc_stats: PerCpuArray<ServiceStats, { MAX_SERVICES as usize }> = PerCpuArray::new();

#[btf_map]
pub static xlb_glob_stats: PerCpuArray<GlobalStats, { SINGLETON as usize }> = PerCpuArray::new();

#[btf_map]
pub static xlb_config: Array<Config, { SINGLETON as usize }> = Array::new();

#[btf_map]
pub static xlb_vips: HashMap<VipKey, VipValue, { MAX_VIPS as usize }> = HashMap::new();

#[btf_map]
pub static xlb_affinity: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAX as usize }> =
    LruHashMap::new();

#[btf_map]
pub static xlb_rr_cursor: PerCpuArray<u32, { MAX_SERVICES as usize }> = PerCpuArray::new();

#[btf_map]
pub static xlb_be_conns: Array<u64, { MAX_BACKENDS as usize }> = Array::new();

/// Never touched by the program: the agent's record of which backends each frontend keeps for
/// draining flows. Declared here so it is created and pinned with the other maps.
#[btf_map]
pub static xlb_draining: HashMap<
    DrainingKey,
    DrainingValue,
    { MAX_DRAINING as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();
