//! `lb-agent inspect services|backends|flows|stats [--json]`: the pinned XDP maps as the program
//! sees them, with the agent running or not. Addresses print as IPs, ports in host order,
//! schedulers by their IPVS names, flags by name. `--json` prints the same rows for scripts.
//!
//! Service names are not in the maps; they come from the status file the agent writes, when it
//! describes the same pin directory.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use lb_common::{
    FLOW_F_AFFINITY, FLOW_F_CLOSING, FLOW_F_COUNTED, FLOW_F_REPLY, FlowKey, FlowValue,
    SERVICE_F_AFFINITY, SERVICE_F_DROP_NO_BACKEND, Scheduler, maps, proto,
};
use serde::Serialize;

use super::render_table;
use crate::{
    dataplane::{
        pinned::{FrontendEntry, PinnedMaps, ip_from_wire},
        xdp::coarse_monotonic_ns,
    },
    status::{self, DEFAULT_STATUS_FILE},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// Frontends: scheduler, flags, the backends new flows go to, the draining ones.
    Services,
    /// Backend slots in use, with their weight, lc/wlc flow count and frontends.
    Backends,
    /// Conntrack entries (both directions of every flow).
    Flows,
    /// The program's counters: program-wide, per frontend, conntrack fill.
    Stats,
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    #[arg(value_enum)]
    pub what: What,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// bpffs directory of the pinned maps.
    #[arg(long, default_value = maps::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The agent's status file, for service names.
    #[arg(long, default_value = DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
}

/// A frontend in `inspect services`.
#[derive(Debug, Serialize)]
pub struct ServiceRow {
    /// `address:port/PROTOCOL`.
    pub frontend: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// From the agent's status file; `null` when unknown.
    pub service: Option<String>,
    pub id: u32,
    /// IPVS name: mh, rr, wrr, sh, lc, wlc.
    pub scheduler: String,
    pub flags: Vec<&'static str>,
    pub affinity_timeout_s: Option<u32>,
    pub table_id: u32,
    /// Backends new flows go to.
    pub backends: Vec<TableBackend>,
    /// Backends kept only for their open flows.
    pub draining: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TableBackend {
    pub id: u32,
    pub address: String,
    /// Table slots naming this backend (out of the table's length).
    pub slots: u32,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub weight: u32,
    /// Active flows counted for lc/wlc.
    pub active_flows: u64,
    /// Frontends whose table names it.
    pub frontends: Vec<String>,
    /// Frontends that keep it only for open flows.
    pub draining_in: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct FlowRow {
    pub protocol: String,
    /// Source and destination of the packets this entry matches, as they arrive.
    pub src: String,
    pub dst: String,
    /// `forward` (client -> VIP, rewritten to the backend) or `reply` (backend -> client,
    /// rewritten to come from the VIP).
    pub direction: &'static str,
    /// Forward: the backend written as destination. Reply: the VIP written as source.
    pub nat: String,
    pub backend_id: u32,
    pub service_id: u32,
    pub frontend: Option<String>,
    pub flags: Vec<&'static str>,
    /// Seconds since the last packet refreshed the entry (refreshed at most once per second).
    pub idle_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    /// Program-wide counters by field name.
    pub global: BTreeMap<&'static str, u64>,
    pub conntrack_entries: usize,
    pub conntrack_capacity: u32,
    pub frontends: Vec<FrontendStats>,
}

#[derive(Debug, Serialize)]
pub struct FrontendStats {
    pub frontend: String,
    pub service: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub no_backend: u64,
}

fn protocol_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

fn service_flags(f: &FrontendEntry) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if f.value.flags & SERVICE_F_AFFINITY != 0 {
        flags.push("affinity");
    }
    if f.value.flags & SERVICE_F_DROP_NO_BACKEND != 0 {
        flags.push("drop-when-empty");
    }
    flags
}

fn flow_flags(v: &FlowValue) -> Vec<&'static str> {
    [
        (FLOW_F_CLOSING, "closing"),
        (FLOW_F_COUNTED, "counted"),
        (FLOW_F_AFFINITY, "affinity"),
    ]
    .into_iter()
    .filter(|(bit, _)| v.flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// Service names by frontend, from the status file of an agent using the same pin dir.
fn service_names(status_file: &Path, pin_dir: &Path) -> BTreeMap<String, String> {
    match status::read(status_file) {
        Ok(s) if s.dataplane.pin_dir.as_deref() == Some(pin_dir) => s
            .frontends
            .into_iter()
            .map(|f| (f.frontend, f.service))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The `services` rows.
pub fn services(
    maps: &PinnedMaps,
    names: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<ServiceRow>> {
    let addr_of: BTreeMap<u32, SocketAddr> = maps
        .backends()?
        .into_iter()
        .map(|b| (b.id, b.addr))
        .collect();
    let show = |id: &u32| {
        addr_of
            .get(id)
            .map_or_else(|| format!("#{id} (free slot)"), |a| a.to_string())
    };
    Ok(maps
        .frontends()?
        .into_iter()
        .map(|f| {
            let frontend = f.key.to_string();
            ServiceRow {
                service: names.get(&frontend).cloned(),
                address: f.key.addr.to_string(),
                port: f.key.port,
                protocol: f.key.protocol.to_string(),
                id: f.value.id,
                scheduler: Scheduler::from_u8(f.value.scheduler).map_or_else(
                    || format!("unknown({})", f.value.scheduler),
                    |s| s.ipvs_name().to_owned(),
                ),
                flags: service_flags(&f),
                affinity_timeout_s: (f.value.flags & SERVICE_F_AFFINITY != 0)
                    .then_some(f.value.affinity_timeout_s),
                table_id: f.value.table_id,
                backends: f
                    .table
                    .iter()
                    .map(|(id, slots)| TableBackend {
                        id: *id,
                        address: show(id),
                        slots: *slots,
                    })
                    .collect(),
                draining: f.draining.iter().map(show).collect(),
                frontend,
            }
        })
        .collect())
}

/// The `backends` rows.
pub fn backends(maps: &PinnedMaps) -> anyhow::Result<Vec<BackendRow>> {
    let frontends = maps.frontends()?;
    Ok(maps
        .backends()?
        .into_iter()
        .map(|b| BackendRow {
            id: b.id,
            address: b.addr.to_string(),
            weight: b.weight,
            active_flows: b.active_flows,
            frontends: frontends
                .iter()
                .filter(|f| f.table.contains_key(&b.id))
                .map(|f| f.key.to_string())
                .collect(),
            draining_in: frontends
                .iter()
                .filter(|f| f.draining.contains(&b.id))
                .map(|f| f.key.to_string())
                .collect(),
        })
        .collect())
}

fn flow_row(k: &FlowKey, v: &FlowValue, frontend_of: &BTreeMap<u32, String>, now: u64) -> FlowRow {
    let sock = |addr: &[u32; 4], port: u16| {
        SocketAddr::new(ip_from_wire(addr, k.family), u16::from_be(port)).to_string()
    };
    FlowRow {
        protocol: protocol_name(k.proto),
        src: sock(&k.src_addr, k.src_port),
        dst: sock(&k.dst_addr, k.dst_port),
        direction: if v.flags & FLOW_F_REPLY != 0 {
            "reply"
        } else {
            "forward"
        },
        nat: sock(&v.nat_addr, v.nat_port),
        backend_id: v.backend_id,
        service_id: v.service_id,
        frontend: frontend_of.get(&v.service_id).cloned(),
        flags: flow_flags(v),
        idle_s: now.saturating_sub(v.last_seen_ns) as f64 / 1e9,
    }
}

/// The `flows` rows.
pub fn flows(maps: &PinnedMaps) -> anyhow::Result<Vec<FlowRow>> {
    let frontend_of: BTreeMap<u32, String> = maps
        .frontends()?
        .into_iter()
        .map(|f| (f.value.id, f.key.to_string()))
        .collect();
    let now = coarse_monotonic_ns();
    Ok(maps
        .flows()?
        .iter()
        .map(|(k, v)| flow_row(k, v, &frontend_of, now))
        .collect())
}

/// The `stats` report.
pub fn stats(maps: &PinnedMaps, names: &BTreeMap<String, String>) -> anyhow::Result<Stats> {
    let global = maps.global_stats()?;
    let mut frontends = Vec::new();
    for f in maps.frontends()? {
        let s = maps.service_stats(f.value.id)?;
        let frontend = f.key.to_string();
        frontends.push(FrontendStats {
            service: names.get(&frontend).cloned(),
            frontend,
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
            no_backend: s.no_backend,
        });
    }
    Ok(Stats {
        global: global.fields().into_iter().collect(),
        conntrack_entries: maps.flow_count()?,
        conntrack_capacity: maps.conntrack_capacity(),
        frontends,
    })
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

/// Renders the rows for people.
fn render(
    what: What,
    maps: &PinnedMaps,
    names: &BTreeMap<String, String>,
) -> anyhow::Result<String> {
    Ok(match what {
        What::Services => {
            let rows: Vec<Vec<String>> = services(maps, names)?
                .into_iter()
                .map(|r| {
                    let mut flags = r.flags.join(",");
                    if let Some(t) = r.affinity_timeout_s {
                        flags = flags.replace("affinity", &format!("affinity({t}s)"));
                    }
                    vec![
                        r.frontend,
                        or_dash(r.service.as_deref().unwrap_or_default()),
                        r.id.to_string(),
                        r.scheduler,
                        or_dash(&flags),
                        or_dash(
                            &r.backends
                                .iter()
                                .map(|b| b.address.clone())
                                .collect::<Vec<_>>()
                                .join(","),
                        ),
                        or_dash(&r.draining.join(",")),
                    ]
                })
                .collect();
            render_table(
                &[
                    "FRONTEND", "SERVICE", "ID", "SCHED", "FLAGS", "BACKENDS", "DRAINING",
                ],
                &rows,
            )
        }
        What::Backends => {
            let rows: Vec<Vec<String>> = backends(maps)?
                .into_iter()
                .map(|r| {
                    let mut used = r.frontends.clone();
                    used.extend(r.draining_in.iter().map(|f| format!("{f}(draining)")));
                    vec![
                        r.id.to_string(),
                        r.address,
                        r.weight.to_string(),
                        r.active_flows.to_string(),
                        or_dash(&used.join(",")),
                    ]
                })
                .collect();
            render_table(
                &["ID", "ADDRESS", "WEIGHT", "ACTIVE_FLOWS", "FRONTENDS"],
                &rows,
            )
        }
        What::Flows => {
            let rows: Vec<Vec<String>> = flows(maps)?
                .into_iter()
                .map(|r| {
                    vec![
                        r.protocol,
                        r.src,
                        r.dst,
                        r.direction.to_owned(),
                        r.nat,
                        r.backend_id.to_string(),
                        or_dash(r.frontend.as_deref().unwrap_or_default()),
                        or_dash(&r.flags.join(",")),
                        format!("{:.0}s", r.idle_s),
                    ]
                })
                .collect();
            render_table(
                &[
                    "PROTO", "SRC", "DST", "DIR", "NAT", "BACKEND", "FRONTEND", "FLAGS", "IDLE",
                ],
                &rows,
            )
        }
        What::Stats => {
            let s = stats(maps, names)?;
            let mut out = format!(
                "conntrack: {} of {} entries\n\n",
                s.conntrack_entries, s.conntrack_capacity
            );
            let global: Vec<Vec<String>> = s
                .global
                .iter()
                .map(|(k, v)| vec![k.to_string(), v.to_string()])
                .collect();
            out.push_str(&render_table(&["COUNTER", "VALUE"], &global));
            out.push('\n');
            let rows: Vec<Vec<String>> = s
                .frontends
                .into_iter()
                .map(|f| {
                    vec![
                        f.frontend,
                        or_dash(f.service.as_deref().unwrap_or_default()),
                        f.packets.to_string(),
                        f.bytes.to_string(),
                        f.new_flows.to_string(),
                        f.no_backend.to_string(),
                    ]
                })
                .collect();
            out.push_str(&render_table(
                &[
                    "FRONTEND",
                    "SERVICE",
                    "PACKETS",
                    "BYTES",
                    "NEW_FLOWS",
                    "NO_BACKEND",
                ],
                &rows,
            ));
            out
        }
    })
}

/// Runs the command; prints to stdout. Exit code 0.
pub fn run(args: &InspectArgs) -> anyhow::Result<i32> {
    let maps = PinnedMaps::open(&args.pin_dir)?;
    let names = service_names(&args.status_file, &args.pin_dir);
    let out = if args.json {
        let value = match args.what {
            What::Services => serde_json::to_value(services(&maps, &names)?)?,
            What::Backends => serde_json::to_value(backends(&maps)?)?,
            What::Flows => serde_json::to_value(flows(&maps)?)?,
            What::Stats => serde_json::to_value(stats(&maps, &names)?)?,
        };
        serde_json::to_string_pretty(&value)? + "\n"
    } else {
        render(args.what, &maps, &names)?
    };
    print!("{out}");
    Ok(0)
}
