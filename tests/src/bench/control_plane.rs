//! Stage 2: the control plane. How long the agent's own code takes to program 10k services of
//! 10 endpoints into empty maps (`Syncer::sync` on an `XdpDataplane` with private maps) and to
//! apply one endpoint change at that scale, with an empty conntrack table and with many tracked
//! flows (a removed endpoint's flows are deleted from conntrack, which walks the table); the peak
//! RSS of the real `lb-agent run` process on a services file of the same services; and, beside
//! them, `iptables-restore` of the same services as kube-proxy's iptables mode writes them, for
//! both iptables back ends.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_agent::{
    dataplane::xdp::LoadOptions,
    model::{Backend, Model},
    plan,
    sync::Syncer,
};
use lb_common::{Config, maps};

use super::{
    Rng,
    kube_proxy::{self, Backend as Iptables, Restored},
    median_duration,
    services::{HTTP, ServiceSet, vip},
};
use crate::{
    agent::{Agent, BpfFs, scratch_dir},
    netns::Netns,
    packet::{Harness, XDP_PASS, syn},
};

#[derive(Clone, Debug)]
pub struct Params {
    pub services: usize,
    pub endpoints: usize,
    /// Full syncs into fresh maps; the median is reported.
    pub rounds: usize,
    /// Endpoint changes applied one after the other; median and worst are reported.
    pub changes: usize,
    /// Flows tracked in conntrack for the second series of changes.
    pub tracked_flows: usize,
    /// iptables-restore runs of the full ruleset (each into a fresh namespace).
    pub iptables_rounds: usize,
    /// iptables-restore runs of one change.
    pub iptables_changes: usize,
    /// A restore still running after this long is killed and reported as "more than".
    pub iptables_limit: Duration,
}

impl Params {
    pub fn full() -> Self {
        Self {
            services: 10_000,
            endpoints: 10,
            rounds: 3,
            changes: 20,
            tracked_flows: 100_000,
            iptables_rounds: 3,
            iptables_changes: 5,
            iptables_limit: Duration::from_secs(180),
        }
    }

    pub fn smoke() -> Self {
        Self {
            services: 10,
            endpoints: 10,
            rounds: 2,
            changes: 3,
            tracked_flows: 100,
            iptables_rounds: 1,
            iptables_changes: 2,
            iptables_limit: Duration::from_secs(60),
        }
    }
}

/// One iptables back end's times.
#[derive(Clone, Debug)]
pub struct IptablesTimes {
    pub backend: Iptables,
    pub version: String,
    /// Median full restore (or the time limit it exceeded).
    pub full: Restored,
    /// Median restore of one change; `None` when the full ruleset never loaded.
    pub change: Option<Restored>,
    /// Lines of the full ruleset.
    pub rules_lines: usize,
}

/// The real agent process on the services file.
#[derive(Clone, Debug, Default)]
pub struct AgentProcess {
    /// Start to the first `sync applied` line: load, verify and attach the program, parse the
    /// file, program every service.
    pub start_to_synced: Duration,
    /// VmHWM after the first sync, KiB.
    pub peak_rss_kib: u64,
    /// VmHWM after an edit of the file changed one endpoint, KiB.
    pub peak_rss_after_change_kib: u64,
    /// Rewriting the file (one endpoint changed) to the `sync applied` line: inotify, re-parsing
    /// the whole file, the diff and the map writes (log polled every 20 ms).
    pub file_change_to_synced: Duration,
    /// The XDP program attached to the interface, as the kernel names it.
    pub attached_program: String,
}

#[derive(Clone, Debug)]
pub struct ControlPlane {
    pub params: Params,
    pub frontends: usize,
    pub backends: usize,
    /// Median full sync (plan and map writes).
    pub full_sync: Duration,
    pub full_sync_rounds: Vec<Duration>,
    /// Of which `plan::desired` + `plan::diff` (pure, no kernel).
    pub full_sync_plan: Duration,
    /// One endpoint change, empty conntrack: median and worst.
    pub change: Duration,
    pub change_worst: Duration,
    /// One endpoint change with `tracked_flows` flows in conntrack: median and worst.
    pub change_with_flows: Duration,
    pub change_with_flows_worst: Duration,
    pub iptables: Vec<IptablesTimes>,
    pub agent: AgentProcess,
}

impl ControlPlane {
    /// The faster iptables back end's full restore: the baseline to beat.
    pub fn best_iptables_full(&self) -> Option<&IptablesTimes> {
        self.iptables.iter().min_by_key(|t| t.full.time())
    }
}

/// The median of restore times; unfinished if any run was (its time is then the limit).
fn median_restored(runs: &[Restored]) -> Restored {
    let time = median_duration(&runs.iter().map(|r| r.time()).collect::<Vec<_>>());
    if runs.iter().all(|r| r.finished()) {
        Restored::In(time)
    } else {
        Restored::Unfinished(time)
    }
}

fn load_options(params: &Params, conntrack_max: u32) -> LoadOptions {
    LoadOptions {
        object: None,
        pin_dir: None,
        max_services: maps::MAX_SERVICES.max(params.services as u32 + 2),
        max_backends: maps::MAX_BACKENDS.max((params.services * params.endpoints) as u32 * 2),
        conntrack_max,
        config: Config::default(),
    }
}

/// A new pod address for change `k` (outside every generated range).
fn new_endpoint(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + k as u32)
}

/// Replaces endpoint 0 of service `index` with `endpoint`, in the set and in the model.
fn change_endpoint(set: &mut ServiceSet, model: &mut Model, index: usize, endpoint: Ipv4Addr) {
    let service = &mut set.services[index];
    service.endpoints[0] = endpoint;
    let entry = model
        .services
        .get_mut(&service.frontend_name(&HTTP))
        .unwrap();
    entry.backends = service
        .endpoints
        .iter()
        .map(|&e| Backend::ready(e.into(), HTTP.target_port, 1))
        .collect();
    entry.backends.sort();
}

/// Applies `changes` endpoint changes one by one through `Syncer::sync`, timing each.
fn time_changes(
    syncer: &mut Syncer<'_>,
    set: &mut ServiceSet,
    model: &mut Model,
    changes: usize,
    first: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(changes);
    for k in first..first + changes {
        let index = (k * 7919) % set.services.len();
        change_endpoint(set, model, index, new_endpoint(k));
        let started = Instant::now();
        let outcome = syncer.sync(model, true);
        times.push(started.elapsed());
        ensure!(
            outcome.ops == 1 && outcome.failed == 0,
            "one endpoint change gave {outcome:?}"
        );
    }
    Ok(times)
}

/// Runs the stage. Call it on a thread of its own: the harness moves its thread into a private
/// network namespace.
pub fn run(params: &Params, progress: &dyn Fn(&str)) -> anyhow::Result<ControlPlane> {
    let base = ServiceSet::distinct(params.services, params.endpoints);
    let model = base.model();
    progress(&format!(
        "control plane: full sync of {} services x {} endpoints, {} rounds",
        params.services, params.endpoints, params.rounds
    ));

    // Full syncs into fresh, empty maps.
    let conntrack_max = (4 * params.tracked_flows + 1024).next_power_of_two() as u32;
    let mut full_sync_rounds = Vec::new();
    let mut harness = None;
    for _ in 0..params.rounds {
        drop(harness.take());
        let mut h = Harness::with_options(load_options(params, conntrack_max));
        let started = Instant::now();
        let outcome = Syncer::new(&mut h.dataplane, "bench").sync(&model, true);
        full_sync_rounds.push(started.elapsed());
        ensure!(outcome.failed == 0, "full sync failed: {outcome:?}");
        harness = Some(h);
    }
    progress(&format!(
        "control plane: full syncs took {full_sync_rounds:?}"
    ));
    let mut h = harness.context("no round ran")?;
    let plan_started = Instant::now();
    let desired = plan::desired(&model);
    let ops = plan::diff(&Default::default(), &desired);
    let full_sync_plan = plan_started.elapsed();
    ensure!(ops.len() == base.frontends(), "plan of {} ops", ops.len());

    // One endpoint change at a time: empty conntrack, then with tracked flows.
    progress("control plane: endpoint changes");
    let (mut set, mut model) = (base.clone(), model);
    let empty = time_changes(
        &mut Syncer::new(&mut h.dataplane, "bench"),
        &mut set,
        &mut model,
        params.changes,
        0,
    )?;
    let mut rng = Rng::new(7);
    for n in 0..params.tracked_flows {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 10, 16, 0)) + (n / 50_000) as u32);
        let frame = syn(
            (src, 10_000 + (n % 50_000) as u16),
            (vip(rng.below(params.services)), HTTP.port),
        );
        // No route in the harness namespace: tracked, then passed to the stack.
        let out = h.run(&frame);
        ensure!(
            out.action == XDP_PASS,
            "tracking flow {n}: action {}",
            out.action
        );
    }
    let tracked = h.dataplane.maps.global_stats()?.ct_misses;
    ensure!(
        tracked as usize >= params.tracked_flows,
        "only {tracked} flows tracked"
    );
    let with_flows = time_changes(
        &mut Syncer::new(&mut h.dataplane, "bench"),
        &mut set,
        &mut model,
        params.changes,
        params.changes,
    )?;
    drop(h);

    progress(&format!(
        "control plane: one change took {:?} (median, empty conntrack), {:?} ({} flows)",
        median_duration(&empty),
        median_duration(&with_flows),
        params.tracked_flows
    ));

    // The baseline.
    let mut iptables = Vec::new();
    let full_rules = kube_proxy::full_ruleset(&base);
    for backend in [Iptables::Nft, Iptables::Legacy] {
        progress(&format!(
            "control plane: {} of the same services",
            backend.restore_command()
        ));
        let mut full = Vec::new();
        let mut change = Vec::new();
        for round in 0..params.iptables_rounds {
            let ns = Netns::new("ipt")?;
            let restored = kube_proxy::restore(&ns, backend, &full_rules, params.iptables_limit)?;
            full.push(restored);
            progress(&format!(
                "control plane: {} full, round {}: {restored:?}",
                backend.restore_command(),
                round + 1
            ));
            if !restored.finished() {
                break; // another round would only hit the limit again
            }
            if round + 1 == params.iptables_rounds {
                let mut set = base.clone();
                for k in 0..params.iptables_changes {
                    let before = set.clone();
                    let index = (k * 7919) % set.services.len();
                    set.services[index].endpoints[0] = new_endpoint(k);
                    let rules = kube_proxy::change_ruleset(&before, &set, index);
                    change.push(kube_proxy::restore(
                        &ns,
                        backend,
                        &rules,
                        params.iptables_limit,
                    )?);
                }
            }
        }
        iptables.push(IptablesTimes {
            backend,
            version: kube_proxy::version(backend),
            full: median_restored(&full),
            change: (!change.is_empty()).then(|| median_restored(&change)),
            rules_lines: full_rules.lines().count(),
        });
    }

    progress("control plane: the agent process on a services file");
    let agent = agent_process(&base)?;

    let worst = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    Ok(ControlPlane {
        params: params.clone(),
        frontends: base.frontends(),
        backends: base.endpoint_pairs(),
        full_sync: median_duration(&full_sync_rounds),
        full_sync_rounds,
        full_sync_plan,
        change: median_duration(&empty),
        change_worst: worst(&empty),
        change_with_flows: median_duration(&with_flows),
        change_with_flows_worst: worst(&with_flows),
        iptables,
        agent,
    })
}

/// A `/proc/<pid>/status` field in KiB.
fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Runs `lb-agent run` on the set's services file in a namespace with one veth, and measures it.
fn agent_process(set: &ServiceSet) -> anyhow::Result<AgentProcess> {
    let ns = Netns::new("agent")?;
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
    ns.ip(&["link", "set", "v0", "up"])?;
    ns.ip(&["link", "set", "v1", "up"])?;
    let bpffs = BpfFs::new("bench")?;
    let pin_dir = bpffs.pin_dir();
    let file = scratch_dir().join("services.yaml");
    std::fs::write(&file, set.services_file())?;
    let started = Instant::now();
    let mut agent = Agent::start(
        &ns,
        &[
            "run",
            "--services",
            file.to_str().unwrap(),
            "--iface",
            "v0",
            "--pin-dir",
            pin_dir.to_str().unwrap(),
            "--min-sync-period",
            "0s",
        ],
    )?;
    agent.wait_for_sync(1)?;
    let start_to_synced = started.elapsed();
    let peak_rss_kib = proc_status_kib(agent.pid(), "VmHWM")?;
    let link = ns.ip(&["-d", "link", "show", "v0"])?;
    let attached_program = link
        .split("prog/xdp")
        .nth(1)
        .and_then(|rest| rest.split(" name ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("none")
        .to_owned();

    let mut changed = set.clone();
    changed.services[0].endpoints[0] = new_endpoint(1_000_000);
    let tmp = file.with_extension("new");
    std::fs::write(&tmp, changed.services_file())?;
    let edited = Instant::now();
    std::fs::rename(&tmp, &file)?;
    agent.wait_for_sync(2)?;
    let file_change_to_synced = edited.elapsed();
    let peak_rss_after_change_kib = proc_status_kib(agent.pid(), "VmHWM")?;
    agent.stop()?;
    drop(bpffs);
    Ok(AgentProcess {
        start_to_synced,
        peak_rss_kib,
        peak_rss_after_change_kib,
        file_change_to_synced,
        attached_program,
    })
}
