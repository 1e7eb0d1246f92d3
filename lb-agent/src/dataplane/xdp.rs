//! The XDP dataplane: loads lb-ebpf, pins its maps, attaches it, and writes frontends into the
//! maps laid out in lb-common.
//!
//! Update order keeps every packet's view consistent: backends are written before any table
//! names them; a changed backend set gets a new table under a fresh id, the service entry is
//! flipped to it in one map update, and only then is the old table deleted. Conntrack entries of a
//! backend that left a frontend are deleted right away, so its flows (UDP above all) move to a
//! live backend instead of being blackholed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
    util::nr_cpus,
};
use lb_common::{
    AffinityKey, AffinityValue, BACKEND_F_ACTIVE, BackendValue, Config, DrainingKey, DrainingValue,
    FLOW_F_CLOSING, FLOW_F_COUNTED, FLOW_F_REPLY, FlowKey, FlowValue, GlobalStats, LAYOUT_VERSION,
    SERVICE_F_AFFINITY, SERVICE_F_DROP_NO_BACKEND, SchedTable, Scheduler, ServiceKey, ServiceStats,
    ServiceValue, VipKey, VipValue, family,
    maps::{self, LEAST_CONN_MAX_BACKENDS},
    wire_addr_v4, wire_addr_v6,
};
use tracing::{info, warn};

use super::{
    Dataplane, OpError, batch,
    pinned::{ip_from_wire, sum_over_cpus},
};
use crate::{
    model::{Backend, Protocol},
    plan::{BackendSpec, FrontendKey, FrontendSpec, Op},
    sched_table,
};

/// The lb-ebpf object built alongside this agent (see build.rs).
pub static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How to attach to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    Auto,
    /// Native mode only.
    Driver,
    /// Generic (skb) mode only.
    Generic,
}

/// Everything needed to load the program and its maps.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Object file to load instead of the embedded one.
    pub object: Option<PathBuf>,
    /// Directory on bpffs for the pins; `None` loads private, unpinned maps (packet tests).
    pub pin_dir: Option<PathBuf>,
    pub max_services: u32,
    pub max_backends: u32,
    pub conntrack_max: u32,
    pub config: Config,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            object: None,
            pin_dir: Some(PathBuf::from(maps::DEFAULT_PIN_DIR)),
            max_services: maps::MAX_SERVICES,
            max_backends: maps::MAX_BACKENDS,
            conntrack_max: maps::CONNTRACK_MAX,
            config: Config::default(),
        }
    }
}

/// Hands out small integer ids (service, backend, table ids) in `1..limit`; 0 is never used so a
/// zeroed map slot never looks like a live id.
#[derive(Debug)]
struct IdAllocator {
    limit: u32,
    next: u32,
    free: BTreeSet<u32>,
}

impl IdAllocator {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            next: 1,
            free: BTreeSet::new(),
        }
    }

    fn alloc(&mut self, what: &str) -> anyhow::Result<u32> {
        if let Some(id) = self.free.pop_first() {
            return Ok(id);
        }
        if self.next >= self.limit {
            bail!(
                "no free {what} id: all {} are in use (raise the map size)",
                self.limit - 1
            );
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// Marks ids found in pinned maps as taken.
    fn adopt(&mut self, used: &BTreeSet<u32>) {
        self.next = used.last().map_or(1, |m| m + 1);
        self.free = (1..self.next).filter(|i| !used.contains(i)).collect();
    }
}

/// A backend id and how many frontends use it (actively or draining).
#[derive(Debug, Clone, Copy)]
struct BackendSlot {
    id: u32,
    refs: u32,
    weight: u32,
}

/// What the agent wrote for one frontend.
#[derive(Debug, Clone)]
struct Installed {
    spec: FrontendSpec,
    value: ServiceValue,
}

/// The program's maps, typed, and the agent's record of what it wrote to them.
pub struct XdpMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, BackendValue>,
    tables: HashMap<MapData, u32, SchedTable>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    service_stats: PerCpuArray<MapData, ServiceStats>,
    global_stats: PerCpuArray<MapData, GlobalStats>,
    config: Array<MapData, Config>,
    vips: HashMap<MapData, VipKey, VipValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    rr_cursor: PerCpuArray<MapData, u32>,
    backend_conns: Array<MapData, u64>,
    draining: HashMap<MapData, DrainingKey, DrainingValue>,

    /// The timeouts the program applies, for the agent's conntrack maintenance.
    timeouts: Config,
    installed: BTreeMap<FrontendKey, Installed>,
    current: BTreeMap<FrontendKey, FrontendSpec>,
    /// Backend ids per frontend: a backend shared by two frontends gets an id (and weight, and
    /// least-connection count) in each, as an IPVS real server belongs to one virtual service.
    backend_slots: StdHashMap<(FrontendKey, IpAddr, u16), BackendSlot>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    table_ids: IdAllocator,
    /// Where a table is assembled before it is written (64 KiB, allocated once).
    scratch_table: Box<SchedTable>,
}

/// The scheduler table of a frontend, as indices into its `backends`.
fn table_of(spec: &FrontendSpec) -> Vec<u32> {
    let backends: Vec<Backend> = spec
        .backends
        .iter()
        .map(|b| Backend::ready(b.addr, b.port, b.weight))
        .collect();
    sched_table::build(spec.scheduler, &backends)
}

/// Builds the tables of a batch of upserts on worker threads, handing them out in order.
///
/// Worker `w` of `n` builds tables `w, w + n, w + 2n, ...` in that order into its own bounded
/// channel, so the consumer, taking table `i` from channel `i % n`, never waits on a worker that
/// is itself blocked, and at most [`TableBuilder::AHEAD`] tables per worker wait in memory.
/// Small batches (one endpoint change) are built inline: a thread costs more than a table.
struct TableBuilder<'a> {
    inline: &'a [&'a FrontendSpec],
    channels: Vec<std::sync::mpsc::Receiver<Vec<u32>>>,
    next: usize,
}

impl<'a> TableBuilder<'a> {
    /// Tables per worker built ahead of the consumer.
    const AHEAD: usize = 8;
    /// Batches smaller than this are built on the calling thread.
    const MIN_PARALLEL: usize = 32;

    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        specs: &'a [&'a FrontendSpec],
    ) -> Self
    where
        'a: 'scope,
    {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        if specs.len() < Self::MIN_PARALLEL || workers < 2 {
            return Self {
                inline: specs,
                channels: vec![],
                next: 0,
            };
        }
        let channels = (0..workers)
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::sync_channel(Self::AHEAD);
                scope.spawn(move || {
                    for spec in specs.iter().skip(w).step_by(workers) {
                        if tx.send(table_of(spec)).is_err() {
                            return; // the consumer stopped early
                        }
                    }
                });
                rx
            })
            .collect();
        Self {
            inline: specs,
            channels,
            next: 0,
        }
    }

    /// The table of the next upsert.
    fn next(&mut self) -> Vec<u32> {
        let i = self.next;
        self.next += 1;
        if self.channels.is_empty() {
            return table_of(self.inline[i]);
        }
        let n = self.channels.len();
        self.channels[i % n]
            .recv()
            .expect("a table-building thread panicked")
    }
}

/// The XDP dataplane: the loaded object, its maps, and the interfaces it is attached to.
pub struct XdpDataplane {
    ebpf: Ebpf,
    pub maps: XdpMaps,
    pin_dir: Option<PathBuf>,
    links: Vec<AttachedLink>,
}

/// An attachment to one interface.
struct AttachedLink {
    iface: String,
    /// Pinned bpf_link (survives the agent); `None` when the kernel only offered a netlink
    /// attachment, which the loaded program owns.
    pinned: Option<PathBuf>,
}

fn map_data(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<MapData> {
    match ebpf.take_map(name) {
        Some(aya::maps::Map::HashMap(m))
        | Some(aya::maps::Map::LruHashMap(m))
        | Some(aya::maps::Map::Array(m))
        | Some(aya::maps::Map::PerCpuArray(m)) => Ok(m),
        Some(_) => bail!("map {name} has an unexpected type in the eBPF object"),
        None => bail!("the eBPF object has no map {name}"),
    }
}

/// Fails unless `dir` is on bpffs: pins anywhere else would fail with a confusing error.
pub fn check_bpffs(dir: &Path) -> anyhow::Result<()> {
    let probe = dir.parent().filter(|p| p.exists()).unwrap_or(dir);
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("statfs {}", probe.display()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`",
            probe.display()
        );
    }
    Ok(())
}

/// Pinned maps were written by an agent with another map layout. Adopting them would misread
/// every entry, and replacing them would drop every open connection, so the agent refuses to
/// start and touches nothing: no fallback to another dataplane either (that would run two
/// load balancers at once).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LayoutMismatch(String);

/// Refuses pinned maps written with another layout: adopting them would misread every entry.
/// Reads only: runs before anything is created, loaded or written.
pub fn check_pinned_layout(pin_dir: &Path) -> anyhow::Result<()> {
    let path = pin_dir.join(maps::CONFIG);
    if !path.exists() {
        return Ok(());
    }
    let data =
        MapData::from_pin(&path).with_context(|| format!("open pinned {}", path.display()))?;
    let info = data.info()?;
    if info.value_size() as usize != size_of::<Config>() {
        return Err(LayoutMismatch(format!(
            "pinned maps in {} have an incompatible layout (config value is {} bytes, this agent \
             expects {}); refusing to touch them. Run `lb-agent cleanup` to remove them (this drops \
             conntrack state), or run the agent version that created them.",
            pin_dir.display(),
            info.value_size(),
            size_of::<Config>()
        ))
        .into());
    }
    let config: Array<MapData, Config> = Array::try_from(aya::maps::Map::Array(data))?;
    let found = config.get(&0, 0)?.layout_version;
    // 0: created by a program load that never got its config written; safe to initialise.
    if found != 0 && found != LAYOUT_VERSION {
        return Err(LayoutMismatch(format!(
            "pinned maps in {} have layout version {found}, this agent uses {LAYOUT_VERSION}; \
             refusing to adopt them and leaving the running dataplane alone. Run the matching agent, \
             or `lb-agent cleanup` to start afresh (this drops conntrack state).",
            pin_dir.display()
        ))
        .into());
    }
    Ok(())
}

impl XdpDataplane {
    /// Loads the object, creating or adopting pinned maps, and writes the config. Does not attach.
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                check_bpffs(dir)?;
                // Before anything is created: a refused layout leaves the pin dir as it was.
                check_pinned_layout(dir)?;
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
                maps::ALL.iter().map(|&m| (m, dir.join(m))).collect()
            }
            None => vec![],
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(maps::SERVICES, opts.max_services)
            .map_max_entries(maps::SERVICE_STATS, opts.max_services)
            .map_max_entries(maps::SCHED_TABLES, 2 * opts.max_services)
            .map_max_entries(maps::BACKENDS, opts.max_backends)
            .map_max_entries(maps::CONNTRACK, opts.conntrack_max)
            .map_max_entries(maps::VIPS, opts.max_services)
            .map_max_entries(maps::RR_CURSOR, opts.max_services)
            .map_max_entries(maps::BACKEND_CONNS, opts.max_backends);
        let mut ebpf = match &opts.object {
            Some(path) => loader
                .load_file(path)
                .with_context(|| format!("load {}", path.display()))?,
            None => loader
                .load(EMBEDDED_OBJECT)
                .context("load the embedded eBPF object")?,
        };

        let program: &mut Xdp = ebpf
            .program_mut(maps::XDP_PROGRAM)
            .ok_or_else(|| anyhow!("the eBPF object has no program {}", maps::XDP_PROGRAM))?
            .try_into()?;
        program
            .load()
            .context("the kernel rejected the XDP program")?;
        if let Ok(info) = program.info() {
            info!(
                verified_insns = info.verified_instruction_count(),
                "XDP program loaded"
            );
        }

        let mut maps = XdpMaps {
            services: HashMap::try_from(aya::maps::Map::HashMap(map_data(
                &mut ebpf,
                maps::SERVICES,
            )?))?,
            backends: Array::try_from(aya::maps::Map::Array(map_data(&mut ebpf, maps::BACKENDS)?))?,
            tables: HashMap::try_from(aya::maps::Map::HashMap(map_data(
                &mut ebpf,
                maps::SCHED_TABLES,
            )?))?,
            conntrack: HashMap::try_from(aya::maps::Map::LruHashMap(map_data(
                &mut ebpf,
                maps::CONNTRACK,
            )?))?,
            service_stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map_data(
                &mut ebpf,
                maps::SERVICE_STATS,
            )?))?,
            global_stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map_data(
                &mut ebpf,
                maps::GLOBAL_STATS,
            )?))?,
            config: Array::try_from(aya::maps::Map::Array(map_data(&mut ebpf, maps::CONFIG)?))?,
            vips: HashMap::try_from(aya::maps::Map::HashMap(map_data(&mut ebpf, maps::VIPS)?))?,
            affinity: HashMap::try_from(aya::maps::Map::LruHashMap(map_data(
                &mut ebpf,
                maps::AFFINITY,
            )?))?,
            rr_cursor: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map_data(
                &mut ebpf,
                maps::RR_CURSOR,
            )?))?,
            backend_conns: Array::try_from(aya::maps::Map::Array(map_data(
                &mut ebpf,
                maps::BACKEND_CONNS,
            )?))?,
            draining: HashMap::try_from(aya::maps::Map::HashMap(map_data(
                &mut ebpf,
                maps::DRAINING,
            )?))?,
            timeouts: opts.config,
            installed: BTreeMap::new(),
            current: BTreeMap::new(),
            backend_slots: StdHashMap::new(),
            service_ids: IdAllocator::new(opts.max_services),
            backend_ids: IdAllocator::new(opts.max_backends),
            table_ids: IdAllocator::new(2 * opts.max_services),
            scratch_table: Box::default(),
        };
        maps.config
            .set(0, opts.config, 0)
            .context("write the config map")?;
        maps.adopt()
            .context("read the state left in the pinned maps")?;
        Ok(Self {
            ebpf,
            maps,
            pin_dir: opts.pin_dir.clone(),
            links: vec![],
        })
    }

    /// The loaded program, for BPF_PROG_TEST_RUN.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(maps::XDP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap()
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(maps::XDP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// Attaches to every interface. A link pinned by an earlier agent is taken over and pointed at
    /// this program in one atomic update, so traffic never sees a gap.
    pub fn attach(&mut self, ifaces: &[String], mode: AttachMode) -> anyhow::Result<()> {
        for iface in ifaces {
            let link = self
                .attach_one(iface, mode)
                .with_context(|| format!("XDP attach on {iface} failed"))?;
            self.links.push(link);
        }
        Ok(())
    }

    fn attach_one(&mut self, iface: &str, mode: AttachMode) -> anyhow::Result<AttachedLink> {
        let pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link_{iface}")));
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            let pinned = PinnedLink::from_pin(pin)?;
            let link = XdpLink::try_from(FdLink::from(pinned))?;
            let program = self.program_mut();
            let id = program
                .attach_to_link(link)
                .context("replace the program of the pinned link")?;
            // Keep the link pinned: dropping our handle must not detach it.
            let _ = FdLink::try_from(program.take_link(id)?)?;
            info!(iface, pin = %pin.display(), "took over the pinned XDP link; program replaced atomically");
            return Ok(AttachedLink {
                iface: iface.to_owned(),
                pinned: Some(pin.clone()),
            });
        }
        let program = self.program_mut();
        let id = match mode {
            AttachMode::Driver => program.attach(iface, XdpMode::Driver)?,
            AttachMode::Generic => program.attach(iface, XdpMode::Skb)?,
            AttachMode::Auto => match program.attach(iface, XdpMode::Driver) {
                Ok(id) => id,
                Err(e) => {
                    warn!(iface, error = %e, "native XDP attach failed, using generic (skb) mode, which is much slower");
                    program.attach(iface, XdpMode::Skb)?
                }
            },
        };
        let Some(pin) = pin else {
            return Ok(AttachedLink {
                iface: iface.to_owned(),
                pinned: None,
            });
        };
        let link = program.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                let _ = fd_link
                    .pin(&pin)
                    .with_context(|| format!("pin the link at {}", pin.display()))?;
                info!(iface, pin = %pin.display(), "attached; link pinned");
                Ok(AttachedLink {
                    iface: iface.to_owned(),
                    pinned: Some(pin),
                })
            }
            Err(e) => {
                warn!(iface, error = %e, "kernel has no XDP bpf_link; attached through netlink, which a restart cannot take over");
                Ok(AttachedLink {
                    iface: iface.to_owned(),
                    pinned: None,
                })
            }
        }
    }

    /// Detaches from every interface (unpinning the links). Maps stay pinned, so a later agent
    /// still finds the conntrack state.
    pub fn detach(&mut self) {
        for link in self.links.drain(..) {
            if let Some(pin) = &link.pinned {
                match PinnedLink::from_pin(pin).map(|p| p.unpin()) {
                    Ok(Ok(_fd_link)) => info!(iface = link.iface, "detached"),
                    Ok(Err(e)) => {
                        warn!(iface = link.iface, error = %e, "could not unpin the XDP link")
                    }
                    Err(e) => {
                        warn!(iface = link.iface, error = %e, "could not open the pinned XDP link")
                    }
                }
            }
        }
        // Netlink attachments are owned by the program and go when `self.ebpf` is dropped.
    }

    /// Leaves the pinned links in place so the dataplane keeps forwarding after the agent exits.
    pub fn keep_attached(&mut self) {
        for link in self.links.drain(..) {
            if link.pinned.is_some() {
                info!(
                    iface = link.iface,
                    "left attached (pinned); traffic keeps flowing"
                );
            } else {
                warn!(iface = link.iface, "netlink attachment ends with the agent");
            }
        }
    }
}

impl Dataplane for XdpDataplane {
    fn kind(&self) -> &'static str {
        "xdp"
    }

    fn current(&self) -> &BTreeMap<FrontendKey, FrontendSpec> {
        &self.maps.current
    }

    fn unsupported(&self, key: &FrontendKey) -> Option<String> {
        if key.protocol == Protocol::Sctp {
            return Some("SCTP frontends are not supported by the XDP dataplane yet".into());
        }
        if key.addr.is_ipv6() {
            return Some("IPv6 frontends are not supported by the XDP dataplane yet".into());
        }
        None
    }

    fn apply(&mut self, ops: Vec<Op>) -> Vec<OpError> {
        self.maps.apply(ops)
    }

    fn refresh(&mut self) -> anyhow::Result<()> {
        self.maps.adopt()
    }

    fn maintain(&mut self) -> anyhow::Result<()> {
        let done = self.maps.maintain()?;
        if done.expired_flows + done.expired_pins > 0 {
            tracing::debug!(?done, "conntrack maintenance");
        }
        Ok(())
    }
}

fn wire_addr(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(a) => (wire_addr_v4(a.octets()), family::IPV4),
        IpAddr::V6(a) => (wire_addr_v6(a.octets()), family::IPV6),
    }
}

/// The map key of a frontend.
pub fn service_key(key: &FrontendKey) -> ServiceKey {
    let (addr, family) = wire_addr(key.addr);
    ServiceKey {
        addr,
        port: key.port.to_be(),
        proto: key.protocol.number(),
        family,
    }
}

fn frontend_key(key: &ServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        addr: ip_from_wire(&key.addr, key.family),
        port: u16::from_be(key.port),
        protocol: Protocol::from_number(key.proto)?,
    })
}

fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
}

impl XdpMaps {
    /// Rebuilds the agent's record from the maps (after a restart, or to repair drift).
    ///
    /// Everything a [`FrontendSpec`] holds is in the maps: the service entry, the backends its
    /// table names, and the draining backends in [`maps::DRAINING`]. Only the service name is
    /// not; it is carried over from the previous record of the same frontend (a restarted agent
    /// learns it from its first sync, which does not compare names).
    fn adopt(&mut self) -> anyhow::Result<()> {
        let previous_names: StdHashMap<FrontendKey, String> = self
            .installed
            .iter()
            .map(|(k, i)| (*k, i.spec.service.clone()))
            .collect();
        let first = previous_names.is_empty();
        self.installed.clear();
        self.current.clear();
        self.backend_slots.clear();
        let mut service_ids = BTreeSet::new();
        let mut table_ids = BTreeSet::new();
        let mut backend_ids = BTreeSet::new();
        let entries: Vec<(ServiceKey, ServiceValue)> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .context("iterate services")?;
        let markers: Vec<(DrainingKey, DrainingValue)> = self
            .draining
            .iter()
            .collect::<Result<_, _>>()
            .context("iterate draining backends")?;
        let mut draining_of: StdHashMap<u32, Vec<(u32, DrainingValue)>> = StdHashMap::new();
        for (k, v) in &markers {
            draining_of
                .entry(k.service_id)
                .or_default()
                .push((k.backend_id, *v));
        }
        let mut live_markers = BTreeSet::new();
        for (skey, value) in entries {
            let Some(key) = frontend_key(&skey) else {
                warn!(?skey, "removing a service entry with an unknown protocol");
                self.services.remove(&skey)?;
                continue;
            };
            service_ids.insert(value.id);
            let mut ids = BTreeSet::new();
            if value.table_id != 0 {
                table_ids.insert(value.table_id);
                match self.tables.get(&value.table_id, 0) {
                    Ok(table) => {
                        ids.extend(table.backend_ids[..table.len as usize].iter().copied())
                    }
                    Err(e) if is_not_found(&e) => warn!(%key, "service names a missing table"),
                    Err(e) => return Err(e.into()),
                }
            }
            let mut backends = Vec::new();
            for id in &ids {
                if let Some(b) = self.adopt_backend(key, *id, None)? {
                    backend_ids.insert(*id);
                    backends.push(b);
                }
            }
            // A marker only counts for a live backend outside the table: anything else is a
            // leftover (of an interrupted update, or of an agent that did not keep markers).
            let mut draining = Vec::new();
            for (id, marker) in draining_of.get(&value.id).into_iter().flatten() {
                if ids.contains(id) {
                    continue;
                }
                if let Some(b) = self.adopt_backend(key, *id, Some(marker.weight))? {
                    backend_ids.insert(*id);
                    live_markers.insert(DrainingKey {
                        service_id: value.id,
                        backend_id: *id,
                    });
                    draining.push(b);
                }
            }
            backends.sort();
            draining.sort();
            let spec = FrontendSpec {
                service: previous_names.get(&key).cloned().unwrap_or_default(),
                scheduler: Scheduler::from_u8(value.scheduler).unwrap_or_default(),
                affinity_timeout_s: (value.flags & SERVICE_F_AFFINITY != 0)
                    .then_some(value.affinity_timeout_s),
                backends,
                draining,
                drop_when_empty: value.flags & SERVICE_F_DROP_NO_BACKEND != 0,
            };
            self.current.insert(key, spec.clone());
            self.installed.insert(key, Installed { spec, value });
        }
        for (k, _) in &markers {
            if !live_markers.contains(k) {
                match self.draining.remove(k) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // Tables no service points at are leftovers of an interrupted update.
        let stale_tables: Vec<u32> = self
            .tables
            .keys()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|id| !table_ids.contains(id))
            .collect();
        for id in stale_tables {
            self.tables.remove(&id)?;
        }
        self.service_ids.adopt(&service_ids);
        self.table_ids.adopt(&table_ids);
        self.backend_ids.adopt(&backend_ids);
        if first && !self.current.is_empty() {
            info!(
                frontends = self.current.len(),
                backends = self.backend_slots.len(),
                draining = live_markers.len(),
                "adopted state from pinned maps"
            );
        }
        Ok(())
    }

    /// Reads backend `id` of frontend `key` into the record, holding one reference, and returns it as the spec
    /// names it (`weight` overrides the slot's weight for a draining backend). `None` for a
    /// free slot.
    fn adopt_backend(
        &mut self,
        key: FrontendKey,
        id: u32,
        weight: Option<u32>,
    ) -> anyhow::Result<Option<BackendSpec>> {
        let b = self.backends.get(&id, 0)?;
        if b.flags & BACKEND_F_ACTIVE == 0 {
            return Ok(None);
        }
        let addr = ip_from_wire(&b.addr, b.family);
        let port = u16::from_be(b.port);
        let slot = self
            .backend_slots
            .entry((key, addr, port))
            .or_insert(BackendSlot {
                id,
                refs: 0,
                weight: b.weight,
            });
        slot.refs += 1;
        Ok(Some(BackendSpec {
            addr,
            port,
            weight: weight.unwrap_or(b.weight),
        }))
    }

    fn apply(&mut self, ops: Vec<Op>) -> Vec<OpError> {
        let mut errors = Vec::new();
        let mut flush = ConntrackFlush::default();
        let upserts: Vec<&FrontendSpec> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Upsert(_, spec) => Some(spec),
                Op::Remove(_) => None,
            })
            .collect();
        // Scheduler tables are pure functions of each upsert's backends and most of a large
        // sync's CPU time: other threads build them, in op order, while this one writes maps.
        std::thread::scope(|scope| {
            let mut tables = TableBuilder::start(scope, &upserts);
            for op in &ops {
                let key = *op.key();
                let result = match op {
                    Op::Upsert(key, spec) => {
                        let slots = tables.next();
                        self.upsert(*key, spec, &slots, &mut flush)
                    }
                    Op::Remove(key) => self.remove(*key, &mut flush),
                };
                if let Err(error) = result {
                    errors.push(OpError { key, error });
                }
            }
        });
        if let Err(error) = self.flush_conntrack(&flush) {
            warn!(error = %error, "could not delete conntrack entries of removed backends");
        }
        errors
    }

    /// Gets (or creates) the backend id of `b` in frontend `key`, holding one reference.
    fn acquire_backend(&mut self, key: FrontendKey, b: &BackendSpec) -> anyhow::Result<u32> {
        if let Some(slot) = self.backend_slots.get_mut(&(key, b.addr, b.port)) {
            if slot.weight != b.weight && b.weight != 0 {
                let mut value = self.backends.get(&slot.id, 0)?;
                value.weight = b.weight;
                self.backends.set(slot.id, value, 0)?;
                slot.weight = b.weight;
            }
            slot.refs += 1;
            return Ok(slot.id);
        }
        let id = self.backend_ids.alloc("backend")?;
        let (addr, family) = wire_addr(b.addr);
        let value = BackendValue {
            addr,
            port: b.port.to_be(),
            family,
            flags: BACKEND_F_ACTIVE,
            weight: b.weight,
        };
        // A recycled id must not inherit its previous owner's flow count.
        let written = self
            .backend_conns
            .set(id, 0, 0)
            .and_then(|()| self.backends.set(id, value, 0));
        if let Err(e) = written {
            self.backend_ids.release(id);
            return Err(e).context("write backend");
        }
        self.backend_slots.insert(
            (key, b.addr, b.port),
            BackendSlot {
                id,
                refs: 1,
                weight: b.weight,
            },
        );
        Ok(id)
    }

    /// Drops one reference; the last one clears the backend's slot.
    fn release_backend(&mut self, key: FrontendKey, addr: IpAddr, port: u16) -> anyhow::Result<()> {
        let Some(slot) = self.backend_slots.get_mut(&(key, addr, port)) else {
            return Ok(());
        };
        slot.refs -= 1;
        if slot.refs == 0 {
            let id = slot.id;
            self.backend_slots.remove(&(key, addr, port));
            self.backends.set(id, BackendValue::default(), 0)?;
            self.backend_ids.release(id);
        }
        Ok(())
    }

    /// Installs `spec` for `key`; `slots` is its scheduler table (from [`table_of`]).
    fn upsert(
        &mut self,
        key: FrontendKey,
        spec: &FrontendSpec,
        slots: &[u32],
        flush: &mut ConntrackFlush,
    ) -> anyhow::Result<()> {
        let skey = service_key(&key);
        let previous = self.installed.get(&key).cloned();
        let least_conn = matches!(
            spec.scheduler,
            Scheduler::LeastConn | Scheduler::WeightedLeastConn
        );
        if least_conn && spec.backends.len() > LEAST_CONN_MAX_BACKENDS as usize {
            bail!(
                "{} has {} backends; the XDP dataplane compares at most {LEAST_CONN_MAX_BACKENDS} \
                 for lc/wlc (use mh or wrr for larger services)",
                spec.service,
                spec.backends.len()
            );
        }

        // 1. Backends first, so any table written below only names live entries.
        let mut acquired: Vec<(IpAddr, u16)> = Vec::new();
        let mut active_ids = Vec::with_capacity(spec.backends.len());
        for (i, b) in spec.backends.iter().chain(&spec.draining).enumerate() {
            match self.acquire_backend(key, b) {
                Ok(id) => {
                    acquired.push((b.addr, b.port));
                    if i < spec.backends.len() {
                        active_ids.push(id);
                    }
                }
                Err(e) => {
                    for (addr, port) in acquired {
                        let _ = self.release_backend(key, addr, port);
                    }
                    return Err(e);
                }
            }
        }

        // 2. A new table under a fresh id.
        let result = (|| -> anyhow::Result<ServiceValue> {
            let table_id = if slots.is_empty() {
                0
            } else {
                let table = &mut self.scratch_table;
                table.len = slots.len() as u32;
                for (dst, &i) in table.backend_ids.iter_mut().zip(slots) {
                    *dst = active_ids[i as usize];
                }
                // Shorter (round-robin, least-conn) tables leave no ids of an earlier table.
                table.backend_ids[slots.len()..].fill(0);
                let id = self.table_ids.alloc("scheduler table")?;
                // By reference: by value would copy the 64 KiB table onto the stack first.
                let table: &SchedTable = table;
                if let Err(e) = self.tables.insert(id, table, 0) {
                    self.table_ids.release(id);
                    return Err(e).context("write scheduler table");
                }
                id
            };
            let id = match &previous {
                Some(p) => p.value.id,
                None => {
                    let id = self.service_ids.alloc("service")?;
                    // A recycled id must not inherit the counters of its previous owner.
                    let zeros = PerCpuValues::try_from(vec![
                        ServiceStats::default();
                        nr_cpus().map_err(|(_, e)| e)?
                    ])?;
                    self.service_stats.set(id, zeros, 0)?;
                    let cursors =
                        PerCpuValues::try_from(vec![0u32; nr_cpus().map_err(|(_, e)| e)?])?;
                    self.rr_cursor.set(id, cursors, 0)?;
                    id
                }
            };
            let value = ServiceValue {
                id,
                table_id,
                backend_count: spec.backends.iter().filter(|b| b.weight > 0).count() as u32,
                affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
                flags: if spec.affinity_timeout_s.is_some() {
                    SERVICE_F_AFFINITY
                } else {
                    0
                } | if spec.drop_when_empty {
                    SERVICE_F_DROP_NO_BACKEND
                } else {
                    0
                },
                scheduler: spec.scheduler as u8,
                _pad: 0,
            };
            // 3. Flip the frontend to the new table in one update (a new frontend first makes
            // its address known as a VIP, for ICMP).
            let vip_added = previous.is_none() && self.acquire_vip(key.addr).is_ok();
            if let Err(e) = self.services.insert(skey, value, 0) {
                if vip_added {
                    let _ = self.release_vip(key.addr);
                }
                if previous.is_none() {
                    self.service_ids.release(id);
                }
                if table_id != 0 {
                    let _ = self.tables.remove(&table_id);
                    self.table_ids.release(table_id);
                }
                return Err(e).context("write service entry (is the services map full?)");
            }
            Ok(value)
        })();
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                for (addr, port) in acquired {
                    let _ = self.release_backend(key, addr, port);
                }
                return Err(e);
            }
        };

        // 4. Record the draining backends (the program never reads this; a later adopt does).
        let draining_ids: Vec<u32> = spec
            .draining
            .iter()
            .filter_map(|b| self.backend_slots.get(&(key, b.addr, b.port)).map(|s| s.id))
            .collect();
        for (b, id) in spec.draining.iter().zip(&draining_ids) {
            let marker = DrainingKey {
                service_id: value.id,
                backend_id: *id,
            };
            // The service is flipped already, so a failure here must not fail the op (the record
            // would then disagree with the kernel); without the record the next adoption only
            // rewrites this frontend's table once.
            if let Err(e) = self
                .draining
                .insert(marker, DrainingValue { weight: b.weight }, 0)
            {
                warn!(frontend = %key, backend = %b.addr, error = %e, "could not record a draining backend");
            }
        }

        // 5. Retire what the previous state held.
        if let Some(prev) = previous {
            for b in &prev.spec.draining {
                if let Some(slot) = self.backend_slots.get(&(key, b.addr, b.port))
                    && !draining_ids.contains(&slot.id)
                {
                    self.forget_draining(value.id, slot.id);
                }
            }
            if prev.value.table_id != 0 {
                self.tables
                    .remove(&prev.value.table_id)
                    .or_else(|e| if is_not_found(&e) { Ok(()) } else { Err(e) })?;
                self.table_ids.release(prev.value.table_id);
            }
            for b in prev.spec.backends.iter().chain(&prev.spec.draining) {
                let still_used = spec
                    .backends
                    .iter()
                    .chain(&spec.draining)
                    .any(|n| (n.addr, n.port) == (b.addr, b.port));
                if !still_used && let Some(slot) = self.backend_slots.get(&(key, b.addr, b.port)) {
                    flush.service_backend.insert((value.id, slot.id));
                }
                self.release_backend(key, b.addr, b.port)?;
            }
        }
        self.installed.insert(
            key,
            Installed {
                spec: spec.clone(),
                value,
            },
        );
        self.current.insert(key, spec.clone());
        Ok(())
    }

    fn remove(&mut self, key: FrontendKey, flush: &mut ConntrackFlush) -> anyhow::Result<()> {
        let Some(prev) = self.installed.remove(&key) else {
            return Ok(());
        };
        self.current.remove(&key);
        match self.services.remove(&service_key(&key)) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e).context("delete service entry"),
        }
        if prev.value.table_id != 0 {
            let _ = self.tables.remove(&prev.value.table_id);
            self.table_ids.release(prev.value.table_id);
        }
        flush.services.insert(prev.value.id);
        for b in &prev.spec.draining {
            if let Some(slot) = self.backend_slots.get(&(key, b.addr, b.port)) {
                self.forget_draining(prev.value.id, slot.id);
            }
        }
        self.service_ids.release(prev.value.id);
        self.release_vip(key.addr)?;
        for b in prev.spec.backends.iter().chain(&prev.spec.draining) {
            self.release_backend(key, b.addr, b.port)?;
        }
        Ok(())
    }

    /// Deletes a draining record. Runs after the service entry changed, so a failure is only
    /// logged: the next adoption drops records that name no draining backend.
    fn forget_draining(&mut self, service_id: u32, backend_id: u32) {
        let marker = DrainingKey {
            service_id,
            backend_id,
        };
        match self.draining.remove(&marker) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                warn!(service_id, backend_id, error = %e, "could not delete a draining record")
            }
        }
    }

    /// Deletes the conntrack entries (both directions) of removed services and of backends that
    /// left a service, in one pass over the table.
    fn flush_conntrack(&mut self, flush: &ConntrackFlush) -> anyhow::Result<()> {
        if flush.is_empty() {
            return Ok(());
        }
        let doomed: Vec<FlowKey> = batch::dump(&self.conntrack)
            .context("read conntrack")?
            .into_iter()
            .filter(|(_, v)| {
                flush.services.contains(&v.service_id)
                    || flush
                        .service_backend
                        .contains(&(v.service_id, v.backend_id))
            })
            .map(|(k, _)| k)
            .collect();
        let deleted = batch::delete(&mut self.conntrack, &doomed).context("delete conntrack")?;
        if deleted > 0 {
            info!(
                entries = deleted,
                "deleted conntrack entries of removed backends"
            );
        }
        // Clients pinned to a backend that left the service are re-balanced at once.
        let backend_of_service: BTreeSet<(u32, u32)> = flush.service_backend.clone();
        let unpinned: Vec<AffinityKey> = batch::dump(&self.affinity)
            .context("read affinity")?
            .into_iter()
            .filter(|(k, v)| {
                flush.services.contains(&k.service_id)
                    || backend_of_service.contains(&(k.service_id, v.backend_id))
            })
            .map(|(k, _)| k)
            .collect();
        batch::delete(&mut self.affinity, &unpinned).context("delete affinity pins")?;
        Ok(())
    }

    /// Counts one more frontend on `addr`, registering it as a VIP.
    fn acquire_vip(&mut self, addr: IpAddr) -> anyhow::Result<()> {
        let key = vip_key(addr);
        let frontends = match self.vips.get(&key, 0) {
            Ok(v) => v.frontends + 1,
            Err(e) if is_not_found(&e) => 1,
            Err(e) => return Err(e.into()),
        };
        self.vips
            .insert(key, VipValue { frontends }, 0)
            .context("write VIP")?;
        Ok(())
    }

    /// Counts one frontend less on `addr`; the last one unregisters the VIP.
    fn release_vip(&mut self, addr: IpAddr) -> anyhow::Result<()> {
        let key = vip_key(addr);
        match self.vips.get(&key, 0) {
            Ok(v) if v.frontends > 1 => self.vips.insert(
                key,
                VipValue {
                    frontends: v.frontends - 1,
                },
                0,
            )?,
            Ok(_) => self.vips.remove(&key)?,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Conntrack and affinity housekeeping, run periodically by the sync loop:
    /// * deletes expired conntrack entries (both directions) and expired affinity pins, so dead
    ///   flows do not crowd live ones out of the LRU maps;
    /// * recounts the active flows of every backend for lc/wlc. The program counts flows up and
    ///   down as they open and close, but cannot see entries the LRU map evicts or flows that end
    ///   without FIN/RST; the recount overwrites its counters with the truth: open (not closing),
    ///   unexpired, counted forward entries. Counts are thus honest to within one interval.
    pub fn maintain(&mut self) -> anyhow::Result<Maintenance> {
        let now = coarse_monotonic_ns();
        // Entries are only removed well past their timeout, so a flow the program is refreshing
        // right now (it writes last_seen at most once per touch interval) is never cut.
        let grace = 2 * lb_common::hash::CT_TOUCH_INTERVAL_NS;
        let mut expired = Vec::new();
        let mut active: StdHashMap<u32, u64> = StdHashMap::new();
        for (key, value) in batch::dump(&self.conntrack).context("read conntrack")? {
            let timeout_s = if key.proto == lb_common::proto::TCP {
                if value.flags & FLOW_F_CLOSING != 0 {
                    self.timeouts.tcp_closing_timeout_s
                } else {
                    self.timeouts.tcp_timeout_s
                }
            } else {
                self.timeouts.udp_timeout_s
            };
            if now.saturating_sub(value.last_seen_ns) > timeout_s as u64 * 1_000_000_000 + grace {
                expired.push(key);
            } else if value.flags & (FLOW_F_REPLY | FLOW_F_CLOSING) == 0
                && value.flags & FLOW_F_COUNTED != 0
            {
                *active.entry(value.backend_id).or_default() += 1;
            }
        }
        let expired_flows =
            batch::delete(&mut self.conntrack, &expired).context("delete expired flows")?;
        for slot in self.backend_slots.values() {
            let count = active.get(&slot.id).copied().unwrap_or(0);
            self.backend_conns.set(slot.id, count, 0)?;
        }

        let timeouts: StdHashMap<u32, u32> = self
            .installed
            .values()
            .map(|i| (i.value.id, i.value.affinity_timeout_s))
            .collect();
        let stale_pins: Vec<AffinityKey> = batch::dump(&self.affinity)
            .context("read affinity")?
            .into_iter()
            .filter(|(k, v)| match timeouts.get(&k.service_id) {
                Some(&t) => now.saturating_sub(v.last_seen_ns) > t as u64 * 1_000_000_000 + grace,
                None => true,
            })
            .map(|(k, _)| k)
            .collect();
        let expired_pins =
            batch::delete(&mut self.affinity, &stale_pins).context("delete expired pins")?;
        Ok(Maintenance {
            expired_flows,
            expired_pins,
        })
    }

    /// The active-flow count the program sees for a backend (lc/wlc).
    pub fn backend_conns(&self, backend_id: u32) -> anyhow::Result<i64> {
        Ok(self.backend_conns.get(&backend_id, 0)? as i64)
    }

    /// The service entry of a frontend, as the program sees it.
    pub fn service_value(&self, key: &FrontendKey) -> Option<ServiceValue> {
        self.installed.get(key).map(|i| i.value)
    }

    /// Sum over CPUs of a service's counters.
    pub fn service_stats(&self, service_id: u32) -> anyhow::Result<ServiceStats> {
        Ok(sum_over_cpus(&self.service_stats.get(&service_id, 0)?))
    }

    /// Sum over CPUs of the program-wide counters.
    pub fn global_stats(&self) -> anyhow::Result<GlobalStats> {
        Ok(sum_over_cpus(&self.global_stats.get(&0, 0)?))
    }

    /// Every conntrack entry.
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        Ok(batch::dump(&self.conntrack)?)
    }

    /// The backend id of an address:port in a frontend.
    pub fn backend_id(&self, frontend: &FrontendKey, addr: IpAddr, port: u16) -> Option<u32> {
        self.backend_slots
            .get(&(*frontend, addr, port))
            .map(|s| s.id)
    }
}

/// What one [`XdpMaps::maintain`] pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub expired_flows: usize,
    pub expired_pins: usize,
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock `bpf_ktime_get_coarse_ns` reads.
pub fn coarse_monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn vip_key(addr: IpAddr) -> VipKey {
    let (addr, family) = wire_addr(addr);
    VipKey {
        addr,
        family,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Conntrack entries (and affinity pins) to delete after a batch of operations.
#[derive(Default)]
struct ConntrackFlush {
    services: BTreeSet<u32>,
    service_backend: BTreeSet<(u32, u32)>,
}

impl ConntrackFlush {
    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.service_backend.is_empty()
    }
}
