//! A read-only view of the XDP dataplane's pinned maps, with the agent running or not: what
//! `lb-agent inspect` prints and what `/metrics` reports. Opens the pins by path (BPF_OBJ_GET),
//! never loads a program and never writes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    BACKEND_F_ACTIVE, BackendValue, Config, DrainingKey, DrainingValue, FlowKey, FlowValue,
    GlobalStats, SchedTable, ServiceKey, ServiceStats, ServiceValue, family, maps,
    wire_addr_octets,
};

use crate::{model::Protocol, plan::FrontendKey};

/// The pinned maps of one pin directory.
pub struct PinnedMaps {
    pub pin_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, BackendValue>,
    tables: HashMap<MapData, u32, SchedTable>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    conntrack_capacity: u32,
    service_stats: PerCpuArray<MapData, ServiceStats>,
    global_stats: PerCpuArray<MapData, GlobalStats>,
    config: Array<MapData, Config>,
    backend_conns: Array<MapData, u64>,
    /// Absent in pin dirs made by agents older than the draining record.
    draining: Option<HashMap<MapData, DrainingKey, DrainingValue>>,
}

/// One frontend as the program sees it.
#[derive(Clone, Debug)]
pub struct FrontendEntry {
    pub key: FrontendKey,
    pub value: ServiceValue,
    /// Backend ids new flows may go to, each with the number of table slots naming it (its
    /// share of new flows under Maglev / sh, its picks per round under rr / wrr).
    pub table: BTreeMap<u32, u32>,
    /// Backend ids kept only for open flows.
    pub draining: Vec<u32>,
}

/// One backend slot in use.
#[derive(Clone, Copy, Debug)]
pub struct BackendEntry {
    pub id: u32,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Active flows counted for lc/wlc (recounted by the agent's maintenance).
    pub active_flows: u64,
}

fn open(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("open the pinned map {}", path.display()))
}

/// An address stored in wire form with its family tag.
pub fn ip_from_wire(addr: &[u32; 4], fam: u8) -> IpAddr {
    let o = wire_addr_octets(addr);
    if fam == family::IPV6 {
        IpAddr::from(o)
    } else {
        IpAddr::from([o[0], o[1], o[2], o[3]])
    }
}

impl PinnedMaps {
    /// Opens every map under `pin_dir`. Fails with a hint when there is nothing pinned there.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        if !pin_dir.join(maps::SERVICES).exists() {
            bail!(
                "no xlb maps are pinned in {}: the XDP dataplane has not run here (or `lb-agent \
                 cleanup` removed it); give --pin-dir if the agent uses another directory",
                pin_dir.display()
            );
        }
        let conntrack = open(pin_dir, maps::CONNTRACK)?;
        let conntrack_capacity = conntrack.info()?.max_entries();
        let draining_pin = pin_dir.join(maps::DRAINING);
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            services: HashMap::try_from(Map::HashMap(open(pin_dir, maps::SERVICES)?))?,
            backends: Array::try_from(Map::Array(open(pin_dir, maps::BACKENDS)?))?,
            tables: HashMap::try_from(Map::HashMap(open(pin_dir, maps::SCHED_TABLES)?))?,
            conntrack: HashMap::try_from(Map::LruHashMap(conntrack))?,
            conntrack_capacity,
            service_stats: PerCpuArray::try_from(Map::PerCpuArray(open(
                pin_dir,
                maps::SERVICE_STATS,
            )?))?,
            global_stats: PerCpuArray::try_from(Map::PerCpuArray(open(
                pin_dir,
                maps::GLOBAL_STATS,
            )?))?,
            config: Array::try_from(Map::Array(open(pin_dir, maps::CONFIG)?))?,
            backend_conns: Array::try_from(Map::Array(open(pin_dir, maps::BACKEND_CONNS)?))?,
            draining: if draining_pin.exists() {
                Some(HashMap::try_from(Map::HashMap(open(
                    pin_dir,
                    maps::DRAINING,
                )?))?)
            } else {
                None
            },
        })
    }

    /// The agent-set configuration (layout version, timeouts).
    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Every frontend, sorted by address, port and protocol.
    pub fn frontends(&self) -> anyhow::Result<Vec<FrontendEntry>> {
        let mut draining_of: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        if let Some(d) = &self.draining {
            for entry in d.keys() {
                let k = entry?;
                draining_of
                    .entry(k.service_id)
                    .or_default()
                    .push(k.backend_id);
            }
        }
        let mut out = Vec::new();
        for entry in self.services.iter() {
            let (skey, value) = entry?;
            let Some(protocol) = Protocol::from_number(skey.proto) else {
                continue;
            };
            let key = FrontendKey {
                addr: ip_from_wire(&skey.addr, skey.family),
                port: u16::from_be(skey.port),
                protocol,
            };
            let mut table = BTreeMap::new();
            if value.table_id != 0
                && let Ok(t) = self.tables.get(&value.table_id, 0)
            {
                for id in t.backend_ids.iter().take(t.len as usize) {
                    *table.entry(*id).or_insert(0) += 1;
                }
            }
            let mut draining = draining_of.remove(&value.id).unwrap_or_default();
            draining.sort();
            out.push(FrontendEntry {
                key,
                value,
                table,
                draining,
            });
        }
        out.sort_by_key(|f| f.key);
        Ok(out)
    }

    /// Every backend slot in use, by id.
    pub fn backends(&self) -> anyhow::Result<Vec<BackendEntry>> {
        let mut out = Vec::new();
        for (id, entry) in self.backends.iter().enumerate() {
            let b = entry?;
            if b.flags & BACKEND_F_ACTIVE == 0 {
                continue;
            }
            let id = id as u32;
            out.push(BackendEntry {
                id,
                addr: SocketAddr::new(ip_from_wire(&b.addr, b.family), u16::from_be(b.port)),
                weight: b.weight,
                active_flows: self.backend_conns.get(&id, 0).unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Every conntrack entry (both directions of each flow).
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        let mut flows = super::batch::dump(&self.conntrack).context("read conntrack")?;
        flows.sort_by_key(|(k, _)| *k);
        Ok(flows)
    }

    /// Number of conntrack entries.
    pub fn flow_count(&self) -> anyhow::Result<usize> {
        Ok(super::batch::dump(&self.conntrack)
            .context("read conntrack")?
            .len())
    }

    /// Size of the conntrack map (entries; each flow takes two).
    pub fn conntrack_capacity(&self) -> u32 {
        self.conntrack_capacity
    }

    /// A frontend's counters, summed over CPUs.
    pub fn service_stats(&self, service_id: u32) -> anyhow::Result<ServiceStats> {
        Ok(sum_over_cpus(&self.service_stats.get(&service_id, 0)?))
    }

    /// The program-wide counters, summed over CPUs.
    pub fn global_stats(&self) -> anyhow::Result<GlobalStats> {
        Ok(sum_over_cpus(&self.global_stats.get(&0, 0)?))
    }
}

/// A per-CPU counter value summed over every CPU (the program counts on each CPU apart).
pub fn sum_over_cpus<T: aya::Pod + Default + std::ops::AddAssign>(
    values: &aya::maps::PerCpuValues<T>,
) -> T {
    let mut sum = T::default();
    for v in values.iter() {
        sum += *v;
    }
    sum
}
