//! The sync loop: source events in, dataplane operations out.
//!
//! Events are coalesced: a sync runs at most once per `min_sync_period` (kube-proxy's
//! minSyncPeriod), and every `sync_period` a full resync re-reads the dataplane and repairs any
//! drift. Each sync caused by a source logs one line operators and tests rely on:
//! `sync applied source=file services=12 backends=36 generation=7`; in Kubernetes mode it ends
//! with the highest resourceVersion applied, `... generation=7 rv=123456`.
//!
//! Every sync is reported to whoever watches the agent: /healthz ([`Health`]), /metrics
//! ([`Metrics`]: duration, outcome, network-programming latency of the source changes it
//! applied) and the status file ([`StatusBoard`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    sync::mpsc,
    time::{Instant, sleep_until},
};
use tracing::{debug, info, warn};

use crate::{
    dataplane::Dataplane,
    health::Health,
    metrics::Metrics,
    model::{Model, Rejection},
    plan::{self, FrontendKey},
    service_health::ServiceHealthServer,
    source::SourceEvent,
    status::{FrontendStatus, RejectionStatus, StatusBoard, SyncStatus, unix_now},
};

#[derive(Clone, Copy, Debug)]
pub struct SyncPeriods {
    /// Minimum time between two syncs; events arriving meanwhile are coalesced.
    pub min_sync_period: Duration,
    /// Time between full resyncs.
    pub sync_period: Duration,
    /// Time between dataplane housekeeping passes ([`Dataplane::maintain`]).
    pub maintenance_period: Duration,
}

impl Default for SyncPeriods {
    fn default() -> Self {
        Self {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            maintenance_period: Duration::from_secs(5),
        }
    }
}

/// Outcome of one sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub generation: u64,
    pub ops: usize,
    pub failed: usize,
    pub unsupported: usize,
}

/// Drives a dataplane towards the latest model.
pub struct Syncer<'a> {
    dataplane: &'a mut dyn Dataplane,
    source: &'static str,
    generation: u64,
    /// Highest Kubernetes resourceVersion the model reflects (Kubernetes mode only).
    resource_version: Option<String>,
    health: Option<Arc<Health>>,
    metrics: Option<Arc<Metrics>>,
    status: Option<Arc<StatusBoard>>,
    /// Health check node ports (Kubernetes mode).
    service_health: Option<ServiceHealthServer>,
    /// Rejections already reported: a Kubernetes source re-sends the whole state on every change,
    /// and each rejected object is logged and counted once, not once per change.
    reported: BTreeSet<(String, &'static str)>,
    /// What the source rejects now (for the status).
    rejections: Vec<Rejection>,
    /// Frontends already counted as unsupported (they are logged on every sync).
    unsupported_reported: BTreeSet<FrontendKey>,
    /// When the source changes not yet applied were made (network-programming latency).
    pending_changes: Vec<SystemTime>,
    /// Changes made before the agent started are not its latency (they waited for the agent).
    started: SystemTime,
}

impl<'a> Syncer<'a> {
    pub fn new(dataplane: &'a mut dyn Dataplane, source: &'static str) -> Self {
        Self {
            dataplane,
            source,
            generation: 0,
            resource_version: None,
            health: None,
            metrics: None,
            status: None,
            service_health: None,
            reported: BTreeSet::new(),
            rejections: Vec::new(),
            unsupported_reported: BTreeSet::new(),
            pending_changes: Vec::new(),
            started: SystemTime::now(),
        }
    }

    /// Records every sync and rejection in `metrics` (served on /metrics).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Publishes every sync's outcome on `status` (the status file and /status).
    pub fn with_status(mut self, status: Arc<StatusBoard>) -> Self {
        self.status = Some(status);
        self
    }

    /// Source changes made at `times` are in the next model: the sync that applies it observes
    /// their network-programming latency.
    pub fn note_changes(&mut self, times: impl IntoIterator<Item = SystemTime>) {
        self.pending_changes
            .extend(times.into_iter().filter(|t| *t >= self.started));
    }

    /// Opens each model's health check node ports on `server` after its sync.
    pub fn with_service_health(mut self, server: ServiceHealthServer) -> Self {
        self.service_health = Some(server);
        self
    }

    /// Reports every sync's outcome to `health` (served on /healthz).
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Logs what a source rejected (each object with its location and reason).
    pub fn report_rejections(&self, rejections: &[Rejection]) {
        for r in rejections {
            warn!(location = %r.location, reason = r.reason, "rejected: {}", r.detail);
            if let Some(m) = &self.metrics {
                m.record_rejection(r.reason);
            }
        }
    }

    /// Like [`Self::report_rejections`], but only for rejections not reported before; those no
    /// longer present are forgotten, so an object rejected again later is reported again.
    pub fn report_new_rejections(&mut self, rejections: &[Rejection]) {
        let current: BTreeSet<(String, &'static str)> = rejections
            .iter()
            .map(|r| (r.location.clone(), r.reason))
            .collect();
        let new: Vec<Rejection> = rejections
            .iter()
            .filter(|r| !self.reported.contains(&(r.location.clone(), r.reason)))
            .cloned()
            .collect();
        self.report_rejections(&new);
        self.reported = current;
    }

    /// One sync: diff the model against the dataplane and apply the difference.
    /// `announce` logs the `sync applied` line even when nothing changed (syncs caused by a
    /// source); periodic resyncs only log when they had to repair something.
    pub fn sync(&mut self, model: &Model, announce: bool) -> SyncOutcome {
        let started = std::time::Instant::now();
        let mut desired = BTreeMap::new();
        let mut unsupported = 0;
        let mut unsupported_now = BTreeSet::new();
        let mut problems = Vec::new();
        for (key, spec) in plan::desired(model) {
            match self.dataplane.unsupported(&key) {
                Some(why) => {
                    unsupported += 1;
                    warn!(service = spec.service, frontend = %key, reason = "unsupported", "rejected: {why}");
                    if !self.unsupported_reported.contains(&key)
                        && let Some(m) = &self.metrics
                    {
                        m.record_rejection("unsupported");
                    }
                    unsupported_now.insert(key);
                    problems.push(format!("{key} ({}): unsupported: {why}", spec.service));
                }
                None => {
                    desired.insert(key, spec);
                }
            }
        }
        self.unsupported_reported = unsupported_now;
        let ops = plan::diff(self.dataplane.current(), &desired);
        let n_ops = ops.len();
        let errors = self.dataplane.apply(ops);
        let took = started.elapsed();
        let mut not_applied = Vec::new();
        for e in &errors {
            warn!(frontend = %e.key, "frontend not applied, its previous state is kept: {:#}", e.error);
            not_applied.push(format!("{}: not applied: {:#}", e.key, e.error));
        }
        if let Some(h) = &self.health {
            h.record_sync(errors.is_empty());
        }
        // After the health record: the probes' answers include the agent's health.
        if let Some(server) = &mut self.service_health {
            problems.extend(server.sync(&model.health_checks));
        }
        // Failures first: they are what an operator must act on.
        not_applied.append(&mut problems);
        let problems = not_applied;
        if announce || n_ops > 0 {
            self.generation += 1;
        }
        self.publish(
            model,
            &desired,
            took,
            n_ops,
            errors.len(),
            unsupported,
            problems,
        );
        let services = model.services.len();
        let backends = model.backend_count();
        let generation = self.generation;
        if !errors.is_empty() {
            warn!(
                source = %self.source, services, backends, generation,
                ops = n_ops, failed = errors.len(),
                "sync failed for some frontends"
            );
        } else if announce || n_ops > 0 {
            match &self.resource_version {
                Some(rv) => info!(
                    source = %self.source, services, backends, generation, rv = %rv, ops = n_ops,
                    "sync applied"
                ),
                None => info!(
                    source = %self.source, services, backends, generation, ops = n_ops,
                    "sync applied"
                ),
            }
        } else {
            debug!(source = %self.source, "resync: dataplane matches the model");
        }
        SyncOutcome {
            generation: self.generation,
            ops: n_ops,
            failed: errors.len(),
            unsupported,
        }
    }

    /// Reports a finished sync to the metrics and the status board.
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        model: &Model,
        desired: &BTreeMap<FrontendKey, plan::FrontendSpec>,
        took: Duration,
        ops: usize,
        failed: usize,
        unsupported: usize,
        problems: Vec<String>,
    ) {
        let ok = failed == 0;
        let services = model.services.len();
        let backends = model.backend_count();
        if let Some(m) = &self.metrics {
            let names = desired
                .iter()
                .map(|(k, spec)| (*k, spec.service.clone()))
                .collect();
            m.record_sync(took, ok, names, services, backends);
            if ok {
                let now = SystemTime::now();
                for changed in self.pending_changes.drain(..) {
                    m.record_programming_latency(now.duration_since(changed).unwrap_or_default());
                }
            }
        }
        if ok {
            self.pending_changes.clear();
        }
        if let Some(board) = &self.status {
            let frontends = desired
                .iter()
                .map(|(k, spec)| FrontendStatus {
                    frontend: k.to_string(),
                    service: spec.service.clone(),
                    scheduler: spec.scheduler.ipvs_name().to_owned(),
                    backends: spec.backends.len(),
                    draining: spec.draining.len(),
                })
                .collect();
            let rejections = self
                .rejections
                .iter()
                .map(|r| RejectionStatus {
                    location: r.location.clone(),
                    reason: r.reason.to_owned(),
                    detail: r.detail.clone(),
                })
                .collect();
            let sync = SyncStatus {
                at: unix_now(),
                generation: self.generation,
                ops,
                failed,
                unsupported,
                duration_s: took.as_secs_f64(),
                ok,
                resource_version: self.resource_version.clone(),
            };
            board.update(|s| {
                s.services = services;
                s.backends = backends;
                s.frontends = frontends;
                s.last_sync = Some(sync);
                s.errors = problems;
                s.rejections = rejections;
            });
        }
    }

    /// Runs until `events` closes or `shutdown` resolves.
    pub async fn run(
        &mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        periods: SyncPeriods,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut model: Option<Model> = None;
        let mut pending = false;
        let mut last_sync = Instant::now() - periods.min_sync_period;
        let mut next_resync = Instant::now() + periods.sync_period;
        let mut maintenance = tokio::time::interval(periods.maintenance_period);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sync_at = if pending {
                last_sync + periods.min_sync_period
            } else {
                next_resync
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = maintenance.tick() => {
                    if let Err(e) = self.dataplane.maintain() {
                        warn!("dataplane maintenance failed: {e:#}");
                    }
                }
                event = events.recv() => match event {
                    None => return,
                    Some(SourceEvent::File(parsed)) => {
                        self.report_rejections(&parsed.rejections);
                        self.note_changes(parsed.modified);
                        self.rejections = parsed.rejections;
                        model = Some(parsed.model);
                        pending = true;
                    }
                    Some(SourceEvent::Kubernetes(snapshot)) => {
                        self.report_new_rejections(&snapshot.rejections);
                        self.note_changes(snapshot.change_triggers);
                        self.rejections = snapshot.rejections;
                        self.resource_version = Some(snapshot.resource_version);
                        model = Some(snapshot.model);
                        pending = true;
                    }
                },
                _ = sleep_until(sync_at) => {
                    let Some(model) = &model else {
                        next_resync = Instant::now() + periods.sync_period;
                        continue;
                    };
                    if !pending && let Err(e) = self.dataplane.refresh() {
                        warn!("resync could not re-read the dataplane: {e:#}");
                    }
                    if self.sync(model, pending).ops > 0 {
                        release_free_heap();
                    }
                    pending = false;
                    last_sync = Instant::now();
                    next_resync = last_sync + periods.sync_period;
                }
            }
        }
    }
}

/// Hands the heap memory that the allocator keeps after a large source update back to the
/// kernel. Reading a services file of 10k services builds ~100 MB of YAML parser events that are
/// freed before the sync; glibc keeps such memory for reuse, so the agent's resident size would
/// stay at its parse peak instead of what it holds (measured by `cargo xtask bench`). Called
/// after a sync rather than inside it, so sync timings do not include the heap walk.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reorganises the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
