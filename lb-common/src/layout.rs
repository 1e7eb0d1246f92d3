//! Keys and values of every map. All are `#[repr(C)]` with explicit padding fields (named `_pad*`)
//! so that no byte is left to the compiler: the kernel hashes and compares whole keys, and a
//! stray uninitialised padding byte would make two equal keys differ.
//!
//! Addresses are `[u32; 4]`: the 16 address bytes as they appear on the wire, read as native
//! words (so an IPv4 address is `[u32::from_ne_bytes(octets), 0, 0, 0]`). Word alignment lets the
//! program load and compare them with single instructions. Ports are the two wire bytes read as a
//! native `u16` (network byte order).

use crate::hash::MAGLEV_TABLE_SIZE;

/// An IPv4 or IPv6 address in wire byte order (see the module docs).
pub type WireAddr = [u32; 4];

/// Converts IPv4 octets into the key representation.
#[inline(always)]
pub const fn wire_addr_v4(octets: [u8; 4]) -> WireAddr {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// Converts IPv6 octets into the key representation.
#[inline(always)]
pub const fn wire_addr_v6(o: [u8; 16]) -> WireAddr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The first four wire bytes of an address (the whole address for IPv4).
#[inline(always)]
pub const fn wire_addr_v4_octets(addr: &WireAddr) -> [u8; 4] {
    addr[0].to_ne_bytes()
}

/// The sixteen wire bytes of an address.
#[inline(always)]
pub const fn wire_addr_octets(addr: &WireAddr) -> [u8; 16] {
    let [a, b, c, d] = *addr;
    let (a, b, c, d) = (
        a.to_ne_bytes(),
        b.to_ne_bytes(),
        c.to_ne_bytes(),
        d.to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// Scheduler of a service, with the IPVS names in the agent's configuration.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Scheduler {
    /// `mh` / `maglev`: weighted Maglev consistent hashing over the 5-tuple.
    #[default]
    Maglev = 0,
    /// `rr`: round robin, one step per new flow.
    RoundRobin = 1,
    /// `wrr`: smooth weighted round robin.
    WeightedRoundRobin = 2,
    /// `sh`: source hashing, consistent over the client address only.
    SourceHash = 3,
    /// `lc`: fewest active flows.
    LeastConn = 4,
    /// `wlc`: fewest active flows relative to weight.
    WeightedLeastConn = 5,
}

impl Scheduler {
    /// Decodes the byte stored in [`ServiceValue::scheduler`].
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Maglev,
            1 => Self::RoundRobin,
            2 => Self::WeightedRoundRobin,
            3 => Self::SourceHash,
            4 => Self::LeastConn,
            5 => Self::WeightedLeastConn,
            _ => return None,
        })
    }

    /// The IPVS name (`ipvsadm -s`), which is also the name in the services file.
    pub const fn ipvs_name(self) -> &'static str {
        match self {
            Self::Maglev => "mh",
            Self::RoundRobin => "rr",
            Self::WeightedRoundRobin => "wrr",
            Self::SourceHash => "sh",
            Self::LeastConn => "lc",
            Self::WeightedLeastConn => "wlc",
        }
    }
}

/// Key of [`crate::maps::SERVICES`]: one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: WireAddr,
    /// Destination port, network byte order.
    pub port: u16,
    /// [`crate::proto`] number.
    pub proto: u8,
    /// [`crate::family`] tag.
    pub family: u8,
}

/// [`ServiceValue::flags`]: ClientIP session affinity is on (timeout in
/// [`ServiceValue::affinity_timeout_s`]).
pub const SERVICE_F_AFFINITY: u16 = 1 << 0;
/// [`ServiceValue::flags`]: with no usable backend, drop new flows instead of refusing them
/// (Kubernetes drops traffic for a Local traffic policy without a local endpoint, and refuses it
/// for a service without any endpoint).
pub const SERVICE_F_DROP_NO_BACKEND: u16 = 1 << 1;

/// Value of [`crate::maps::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Agent-assigned id, 1..max services; index of the service's [`ServiceStats`].
    pub id: u32,
    /// Key of this service's table in [`crate::maps::SCHED_TABLES`]; replaced (never edited in
    /// place) when the backend set changes.
    pub table_id: u32,
    /// Backends in the table. 0 means the service has no usable endpoint.
    pub backend_count: u32,
    /// ClientIP affinity timeout in seconds, when [`SERVICE_F_AFFINITY`] is set.
    pub affinity_timeout_s: u32,
    /// `SERVICE_F_*`.
    pub flags: u16,
    /// [`Scheduler`] as `u8`.
    pub scheduler: u8,
    pub _pad: u8,
}

/// [`BackendValue::flags`]: the slot holds a backend (array slots are zero until written).
pub const BACKEND_F_ACTIVE: u8 = 1 << 0;

/// Value of [`crate::maps::BACKENDS`], indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    pub addr: WireAddr,
    /// Port, network byte order.
    pub port: u16,
    /// [`crate::family`] tag.
    pub family: u8,
    /// `BACKEND_F_*`.
    pub flags: u8,
    /// Scheduler weight (wlc reads it; Maglev and wrr have it baked into the table).
    pub weight: u32,
}

/// Value of [`crate::maps::SCHED_TABLES`]: the backends a service picks from.
///
/// * Maglev and source hashing: `len == MAGLEV_TABLE_SIZE` slots filled by the weighted Maglev
///   algorithm; slot `hash % len` names the backend.
/// * Round robin and weighted round robin: the repeating pick sequence (`len` = sum of the
///   weights divided by their gcd); a per-CPU cursor walks it.
/// * Least connections: the `len` backends to compare.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedTable {
    pub len: u32,
    pub backend_ids: [u32; MAGLEV_TABLE_SIZE as usize],
}

impl Default for SchedTable {
    fn default() -> Self {
        Self {
            len: 0,
            backend_ids: [0; MAGLEV_TABLE_SIZE as usize],
        }
    }
}

/// Key of [`crate::maps::CONNTRACK`]: the 5-tuple of a packet as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub src_addr: WireAddr,
    pub dst_addr: WireAddr,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    /// [`crate::proto`] number.
    pub proto: u8,
    /// [`crate::family`] tag.
    pub family: u8,
    pub _pad: u16,
}

/// [`FlowValue::flags`]: this entry is the reply direction (backend -> client); its NAT address
/// and port are the VIP to put back as source.
pub const FLOW_F_REPLY: u16 = 1 << 0;
/// [`FlowValue::flags`]: a TCP FIN or RST was seen; the entry expires after the short closing
/// timeout instead of the established one.
pub const FLOW_F_CLOSING: u16 = 1 << 1;
/// [`FlowValue::flags`] of a forward entry: the flow holds one count in its backend's
/// [`crate::maps::BACKEND_CONNS`] counter (lc/wlc services), to give back when it closes.
pub const FLOW_F_COUNTED: u16 = 1 << 2;
/// [`FlowValue::flags`]: the flow's service has ClientIP affinity; packets keep the client's
/// affinity entry fresh.
pub const FLOW_F_AFFINITY: u16 = 1 << 3;

/// Value of [`crate::maps::CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_ns()` of the last packet, refreshed at most every
    /// [`crate::hash::CT_TOUCH_INTERVAL_NS`] to keep established flows write-free.
    pub last_seen_ns: u64,
    /// Forward entry: the backend address to write as destination. Reply entry: the VIP to write
    /// as source.
    pub nat_addr: WireAddr,
    /// Port that goes with `nat_addr`, network byte order.
    pub nat_port: u16,
    /// `FLOW_F_*`.
    pub flags: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub _pad: u32,
}

/// Key of [`crate::maps::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr: WireAddr,
    /// [`crate::family`] tag.
    pub family: u8,
    // Scalar padding fields: an array of zeros makes LLVM zero the whole key with a memset call,
    // which in eBPF is a byte loop the verifier walks on every path.
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Value of [`crate::maps::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipValue {
    /// Frontends (port, protocol) on this address.
    pub frontends: u32,
}

/// Key of [`crate::maps::AFFINITY`]: one client of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKey {
    pub client_addr: WireAddr,
    pub service_id: u32,
    /// [`crate::family`] tag.
    pub family: u8,
    /// Scalar padding, as in [`VipKey`].
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Value of [`crate::maps::AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// Coarse time of the client's last new flow or (at most every touch interval) packet.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Key of [`crate::maps::DRAINING`]: a backend that a frontend keeps only for its open flows
/// (a terminating endpoint: in no scheduler table, but its conntrack entries stay).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DrainingKey {
    /// [`ServiceValue::id`] of the frontend.
    pub service_id: u32,
    /// Index of the backend in [`crate::maps::BACKENDS`].
    pub backend_id: u32,
}

/// Value of [`crate::maps::DRAINING`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainingValue {
    /// The backend's weight in the agent's model (0 for a terminating endpoint today; kept so the
    /// record round-trips exactly).
    pub weight: u32,
}

/// Value of [`crate::maps::SERVICE_STATS`] (per CPU), indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets to the frontend (both new and established flows).
    pub packets: u64,
    /// Bytes of those packets, L2 header included.
    pub bytes: u64,
    /// Flows the scheduler placed (conntrack misses).
    pub new_flows: u64,
    /// Packets dropped or refused because the service had no usable backend.
    pub no_backend: u64,
}

/// Value of [`crate::maps::GLOBAL_STATS`] (per CPU, one entry): why packets took each exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Every packet the program saw.
    pub packets: u64,
    /// Passed untouched: not IPv4/IPv6 TCP/UDP to a frontend and not a reply of a tracked flow.
    pub not_service: u64,
    /// Passed untouched: a header was truncated or malformed.
    pub malformed: u64,
    /// Passed untouched: an IP fragment (the ports of non-first fragments are unknown).
    pub fragments: u64,
    /// Forward packets of a tracked flow.
    pub ct_hits: u64,
    /// New flows scheduled.
    pub ct_misses: u64,
    /// New flows that could not be tracked (conntrack update failed); the packet is dropped
    /// rather than sent somewhere its replies cannot be reverse-NATed.
    pub ct_insert_failed: u64,
    /// Reply packets reverse-NATed.
    pub reverse_nat: u64,
    /// Rewritten packets sent out directly (XDP_TX or XDP_REDIRECT).
    pub fib_forwarded: u64,
    /// Rewritten packets handed to the kernel stack (local backend, unresolved neighbour).
    pub fib_to_stack: u64,
    /// Packets for a frontend with no usable backend.
    pub no_backend: u64,
    /// TCP RSTs and ICMP port-unreachables sent for frontends without backends.
    pub rejected: u64,
    /// ICMP echo requests to a VIP answered.
    pub icmp_echo_replies: u64,
    /// ICMP errors about a NATed flow, reverse-NATed (outer and quoted headers).
    pub icmp_errors_nat: u64,
}

impl core::ops::AddAssign for ServiceStats {
    /// Sums per-CPU values.
    fn add_assign(&mut self, o: Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
        self.no_backend += o.no_backend;
    }
}

impl GlobalStats {
    /// Every counter with its field name (the name BTF and bpftool show), in declaration order.
    pub const fn fields(&self) -> [(&'static str, u64); 14] {
        [
            ("packets", self.packets),
            ("not_service", self.not_service),
            ("malformed", self.malformed),
            ("fragments", self.fragments),
            ("ct_hits", self.ct_hits),
            ("ct_misses", self.ct_misses),
            ("ct_insert_failed", self.ct_insert_failed),
            ("reverse_nat", self.reverse_nat),
            ("fib_forwarded", self.fib_forwarded),
            ("fib_to_stack", self.fib_to_stack),
            ("no_backend", self.no_backend),
            ("rejected", self.rejected),
            ("icmp_echo_replies", self.icmp_echo_replies),
            ("icmp_errors_nat", self.icmp_errors_nat),
        ]
    }
}

impl core::ops::AddAssign for GlobalStats {
    /// Sums per-CPU values.
    fn add_assign(&mut self, o: Self) {
        self.packets += o.packets;
        self.not_service += o.not_service;
        self.malformed += o.malformed;
        self.fragments += o.fragments;
        self.ct_hits += o.ct_hits;
        self.ct_misses += o.ct_misses;
        self.ct_insert_failed += o.ct_insert_failed;
        self.reverse_nat += o.reverse_nat;
        self.fib_forwarded += o.fib_forwarded;
        self.fib_to_stack += o.fib_to_stack;
        self.no_backend += o.no_backend;
        self.rejected += o.rejected;
        self.icmp_echo_replies += o.icmp_echo_replies;
        self.icmp_errors_nat += o.icmp_errors_nat;
    }
}

/// [`Config::flags`]: answer ICMP echo requests to a VIP from XDP.
pub const CONFIG_F_ICMP_ECHO: u32 = 1 << 0;

/// Value of [`crate::maps::CONFIG`] (one entry), written by the agent at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// [`crate::LAYOUT_VERSION`] of the agent that created the pinned maps.
    pub layout_version: u32,
    /// `CONFIG_F_*`.
    pub flags: u32,
    /// Idle timeout of an established TCP flow.
    pub tcp_timeout_s: u32,
    /// Idle timeout of a TCP flow after FIN or RST.
    pub tcp_closing_timeout_s: u32,
    /// Idle timeout of a UDP flow.
    pub udp_timeout_s: u32,
    pub _pad: u32,
}

/// Established TCP idle timeout (kube-proxy's conntrack tcp-timeout-established is 24 h; IPVS uses
/// 15 min, which we follow: flows idle that long are almost always dead).
pub const DEFAULT_TCP_TIMEOUT_S: u32 = 900;
/// TCP idle timeout once FIN or RST was seen (IPVS tcpfin is 2 min; a short value frees the entry
/// quickly, a late segment after it only reschedules to the same Maglev backend).
pub const DEFAULT_TCP_CLOSING_TIMEOUT_S: u32 = 10;
/// UDP idle timeout (IPVS udp: 5 min; kube-proxy's nf_conntrack_udp_timeout_stream: 120 s).
pub const DEFAULT_UDP_TIMEOUT_S: u32 = 120;

impl Default for Config {
    fn default() -> Self {
        Self {
            layout_version: crate::LAYOUT_VERSION,
            flags: CONFIG_F_ICMP_ECHO,
            tcp_timeout_s: DEFAULT_TCP_TIMEOUT_S,
            tcp_closing_timeout_s: DEFAULT_TCP_CLOSING_TIMEOUT_S,
            udp_timeout_s: DEFAULT_UDP_TIMEOUT_S,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made only of integers and integer arrays, and has explicit
    // padding fields, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for SchedTable {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for GlobalStats {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for DrainingKey {}
    unsafe impl aya::Pod for DrainingValue {}
}

/// Compile-time proof that the layouts have no implicit padding (sizes are the sum of the
/// fields) and that the kernel's 8-byte value alignment limit holds.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<ServiceKey>() == 20);
    assert!(size_of::<ServiceValue>() == 20);
    assert!(size_of::<BackendValue>() == 24);
    assert!(size_of::<SchedTable>() == 4 + 4 * MAGLEV_TABLE_SIZE as usize);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<FlowValue>() == 40);
    assert!(size_of::<ServiceStats>() == 32);
    assert!(size_of::<GlobalStats>() == 112);
    assert!(size_of::<Config>() == 24);
    assert!(size_of::<VipKey>() == 20);
    assert!(size_of::<VipValue>() == 4);
    assert!(size_of::<AffinityKey>() == 24);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<DrainingKey>() == 8);
    assert!(size_of::<DrainingValue>() == 4);
    assert!(align_of::<FlowValue>() <= 8);
};
