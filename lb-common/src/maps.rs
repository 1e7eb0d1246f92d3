//! Names and capacities of every map. The name is the map's symbol in the eBPF object and the file
//! name of its pin under the pin directory, so `bpftool map dump pinned /sys/fs/bpf/xlb/<name>`
//! works with the names below. Kernel map names are limited to 15 characters.

/// Default directory under bpffs where the agent pins every map and the program link.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";

/// Frontends: (VIP, port, protocol) -> [`crate::ServiceValue`]. Hash map.
pub const SERVICES: &str = "xlb_services";
/// Backends: backend id -> [`crate::BackendValue`]. Array indexed by backend id (0 is never used).
pub const BACKENDS: &str = "xlb_backends";
/// Scheduler tables: table id -> [`crate::SchedTable`]. Hash map without preallocation: each table
/// is 64 KiB and only live services own one (two while a table is being replaced).
pub const SCHED_TABLES: &str = "xlb_sched_tabs";
/// Connection tracking: [`crate::FlowKey`] -> [`crate::FlowValue`], both directions of every
/// flow. LRU hash map.
pub const CONNTRACK: &str = "xlb_conntrack";
/// Per-service counters: service id -> [`crate::ServiceStats`]. Per-CPU array.
pub const SERVICE_STATS: &str = "xlb_svc_stats";
/// Program-wide counters: index 0 -> [`crate::GlobalStats`]. Per-CPU array.
pub const GLOBAL_STATS: &str = "xlb_glob_stats";
/// Agent-set knobs: index 0 -> [`crate::Config`]. Array.
pub const CONFIG: &str = "xlb_config";
/// Every frontend address: [`crate::VipKey`] -> [`crate::VipValue`], so ICMP to a VIP can be
/// recognised without a port. Hash map.
pub const VIPS: &str = "xlb_vips";
/// ClientIP session affinity: [`crate::AffinityKey`] -> [`crate::AffinityValue`]. LRU hash map.
pub const AFFINITY: &str = "xlb_affinity";
/// Round-robin position per service: service id -> `u32` index into its table. Per-CPU array,
/// so picks need no atomics and are exact on each CPU.
pub const RR_CURSOR: &str = "xlb_rr_cursor";
/// Active flows per backend for lc/wlc: backend id -> `u64`. Array, updated atomically.
pub const BACKEND_CONNS: &str = "xlb_be_conns";
/// Terminating backends of each frontend: [`crate::DrainingKey`] -> [`crate::DrainingValue`].
/// Hash map without preallocation. Only the agent reads and writes it: a draining backend is in
/// no scheduler table, so this is how an agent that restarts (or re-reads the maps on a resync)
/// learns which backends a frontend keeps for its open flows.
pub const DRAINING: &str = "xlb_draining";

/// Every map pinned under the pin directory, for cleanup and inspection.
pub const ALL: &[&str] = &[
    SERVICES,
    BACKENDS,
    SCHED_TABLES,
    CONNTRACK,
    SERVICE_STATS,
    GLOBAL_STATS,
    CONFIG,
    VIPS,
    AFFINITY,
    RR_CURSOR,
    BACKEND_CONNS,
    DRAINING,
];

/// Name of the XDP program in the object, and of its pinned link under the pin directory
/// (suffixed with the interface name).
pub const XDP_PROGRAM: &str = "xlb_xdp";

/// Default number of frontends (VIP:port:proto entries). Cilium's default LB map size.
pub const MAX_SERVICES: u32 = 65_536;
/// Default number of backends (unique address:port pairs across all services).
pub const MAX_BACKENDS: u32 = 262_144;
/// Default number of scheduler tables. Twice the services: a service being updated briefly owns
/// its old and its new table.
pub const MAX_SCHED_TABLES: u32 = 2 * MAX_SERVICES;
/// Default conntrack capacity (entries; each flow takes two: forward and reply).
pub const CONNTRACK_MAX: u32 = 262_144;
/// Default number of VIP addresses (a VIP usually carries several frontends).
pub const MAX_VIPS: u32 = MAX_SERVICES;
/// Default number of (frontend, draining backend) pairs. Not preallocated, so the size costs
/// nothing until endpoints terminate.
pub const MAX_DRAINING: u32 = MAX_BACKENDS;
/// Default number of (service, client address) affinity entries.
pub const AFFINITY_MAX: u32 = 65_536;
/// Most backends a least-connection (lc/wlc) service may have: the program compares them all
/// in a bounded loop on every new flow.
pub const LEAST_CONN_MAX_BACKENDS: u32 = 64;
/// Number of entries of the single-entry maps ([`CONFIG`], [`GLOBAL_STATS`]).
pub const SINGLETON: u32 = 1;
