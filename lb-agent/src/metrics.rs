//! Prometheus metrics, served as text (format 0.0.4) on `/metrics` of the agent's listener
//! (kube-proxy's metricsBindAddress).
//!
//! Two kinds:
//! * What the agent itself does, recorded as it happens: sync duration and network-programming
//!   latency histograms (kube-proxy's `sync_proxy_rules_duration_seconds` and
//!   `network_programming_duration_seconds`, same buckets), rejected objects by reason, the last
//!   sync's outcome, the dataplane in use.
//! * What the XDP program counts, read from the pinned maps at scrape time by
//!   [`DataplaneCollector`]: per-frontend packets, bytes, new flows and no-backend drops (the
//!   per-CPU counters summed), conntrack entries and capacity, the program-wide counters. Reading
//!   at scrape time means the numbers are the kernel's, not a copy that can lag or drift.
//!
//! Every name starts with `xlb_`.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};
use tracing::debug;

use crate::{dataplane::pinned::PinnedMaps, plan::FrontendKey};

/// Help text of each field of [`lb_common::GlobalStats`], exported as `xlb_xdp_<field>_total`.
const GLOBAL_STATS_HELP: [(&str, &str); 14] = [
    ("packets", "Packets the XDP program saw"),
    (
        "not_service",
        "Packets passed untouched: not for a frontend and not a reply of a tracked flow",
    ),
    (
        "malformed",
        "Packets passed untouched: truncated or malformed headers",
    ),
    ("fragments", "IP fragments passed untouched"),
    ("ct_hits", "Forward packets of a tracked flow"),
    ("ct_misses", "New flows scheduled"),
    (
        "ct_insert_failed",
        "New flows dropped because the conntrack entry could not be written",
    ),
    ("reverse_nat", "Reply packets reverse-NATed"),
    (
        "fib_forwarded",
        "Rewritten packets sent out directly (XDP_TX or XDP_REDIRECT)",
    ),
    (
        "fib_to_stack",
        "Rewritten packets handed to the kernel stack (local backend, unresolved neighbour)",
    ),
    (
        "no_backend",
        "Packets for a frontend without a usable backend",
    ),
    (
        "rejected",
        "TCP RSTs and ICMP port-unreachables sent for frontends without backends",
    ),
    ("icmp_echo_replies", "ICMP echo requests to a VIP answered"),
    (
        "icmp_errors_nat",
        "ICMP errors about a NATed flow, reverse-NATed",
    ),
];

/// Labels of per-frontend series.
type FrontendLabels = [(&'static str, String); 2];
/// Labels of rejection counters.
type ReasonLabel = [(&'static str, String); 1];

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    network_programming: Histogram,
    syncs: Family<[(&'static str, &'static str); 1], Counter>,
    last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    rejected: Family<ReasonLabel, Counter>,
    frontends: Gauge,
    services: Gauge,
    backends: Gauge,
    /// Frontend -> service name, for the labels of the dataplane's per-frontend counters.
    names: Arc<Mutex<BTreeMap<FrontendKey, String>>>,
}

/// kube-proxy's buckets for sync_proxy_rules_duration_seconds: 1 ms doubling to ~16 s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's buckets for network_programming_duration_seconds: 0.25 s to 5 s in quarter
/// seconds, then 6 s .. 300 s.
fn programming_buckets() -> Vec<f64> {
    let mut b: Vec<f64> = (1..=20).map(|i| i as f64 * 0.25).collect();
    b.extend([
        6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 25.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0,
    ]);
    b
}

impl Metrics {
    /// `dataplane` and `reason` label `xlb_dataplane_info`; `pin_dir`, when the XDP dataplane
    /// runs, is where the program's counters are read from at scrape time.
    pub fn new(dataplane: &str, reason: &str, pin_dir: Option<PathBuf>) -> Arc<Self> {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(sync_buckets());
        registry.register_with_unit(
            "xlb_sync_proxy_rules_duration",
            "How long one sync took: diffing the model against the dataplane and applying the \
             difference",
            prometheus_client::registry::Unit::Seconds,
            sync_duration.clone(),
        );
        let network_programming = Histogram::new(programming_buckets());
        registry.register_with_unit(
            "xlb_network_programming_duration",
            "From a change at the source (EndpointSlice last-change-trigger-time annotation, \
             services file modification time) to the sync that applied it",
            prometheus_client::registry::Unit::Seconds,
            network_programming.clone(),
        );
        let syncs = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "xlb_syncs",
            "Syncs by outcome: ok (every frontend applied) or failed (some kept their previous \
             state)",
            syncs.clone(),
        );
        let last_sync_timestamp = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "xlb_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last sync (kube-proxy's sync_proxy_rules_last_timestamp_seconds)",
            last_sync_timestamp.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "xlb_rejected_objects",
            "Objects (services file entries, Services, EndpointSlice endpoints, frontends a \
             dataplane cannot program) rejected, by reason; each is counted once per time it \
             appears",
            rejected.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "xlb_frontends",
            "Frontends (address, port, protocol) the model asks for",
            frontends.clone(),
        );
        let services = Gauge::default();
        registry.register("xlb_services", "Services in the model", services.clone());
        let backends = Gauge::default();
        registry.register(
            "xlb_backends",
            "Backends in the model, over all services",
            backends.clone(),
        );
        registry.register(
            "xlb_dataplane",
            "The dataplane in use (xdp or ipvs) and why it was chosen",
            Info::new(vec![
                ("mode".to_owned(), dataplane.to_owned()),
                ("reason".to_owned(), reason.to_owned()),
            ]),
        );
        let names = Arc::new(Mutex::new(BTreeMap::new()));
        if let Some(pin_dir) = pin_dir {
            registry.register_collector(Box::new(DataplaneCollector {
                pin_dir,
                names: names.clone(),
            }));
        }
        Arc::new(Self {
            registry,
            sync_duration,
            network_programming,
            syncs,
            last_sync_timestamp,
            rejected,
            frontends,
            services,
            backends,
            names,
        })
    }

    /// Records one sync: how long it took, whether every frontend applied, the model's size, and
    /// the service name of each frontend (labels of the per-frontend counters).
    pub fn record_sync(
        &self,
        took: Duration,
        ok: bool,
        frontends: BTreeMap<FrontendKey, String>,
        services: usize,
        backends: usize,
    ) {
        self.sync_duration.observe(took.as_secs_f64());
        self.syncs
            .get_or_create(&[("outcome", if ok { "ok" } else { "failed" })])
            .inc();
        self.last_sync_timestamp.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        self.frontends.set(frontends.len() as i64);
        self.services.set(services as i64);
        self.backends.set(backends as i64);
        *self.names.lock().unwrap() = frontends;
    }

    /// Records how long a change took from its source to the dataplane.
    pub fn record_programming_latency(&self, latency: Duration) {
        self.network_programming.observe(latency.as_secs_f64());
    }

    /// Counts one rejected object.
    pub fn record_rejection(&self, reason: &str) {
        self.rejected
            .get_or_create(&[("reason", reason.to_owned())])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            debug!("encoding metrics failed: {e}");
        }
        out
    }
}

/// Reads the XDP program's counters from the pinned maps on every scrape.
#[derive(Debug)]
struct DataplaneCollector {
    pin_dir: PathBuf,
    names: Arc<Mutex<BTreeMap<FrontendKey, String>>>,
}

impl DataplaneCollector {
    fn counter(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: u64,
    ) -> Result<(), std::fmt::Error> {
        let c = ConstCounter::new(value);
        c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
    }

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: i64,
    ) -> Result<(), std::fmt::Error> {
        let g = ConstGauge::new(value);
        g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
    }
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = match PinnedMaps::open(&self.pin_dir) {
            Ok(m) => m,
            Err(e) => {
                debug!("metrics: cannot read the pinned maps: {e:#}");
                return Ok(());
            }
        };
        match maps.flow_count() {
            Ok(entries) => Self::gauge(
                &mut encoder,
                "xlb_conntrack_entries",
                "Entries in the XDP conntrack map (two per flow: forward and reply)",
                entries as i64,
            )?,
            Err(e) => debug!("metrics: cannot count conntrack entries: {e:#}"),
        }
        Self::gauge(
            &mut encoder,
            "xlb_conntrack_capacity",
            "Size of the XDP conntrack map (entries); the least recently used go when it is full",
            maps.conntrack_capacity() as i64,
        )?;
        if let Ok(global) = maps.global_stats() {
            for ((field, value), (help_field, help)) in
                global.fields().iter().zip(GLOBAL_STATS_HELP)
            {
                debug_assert_eq!(*field, help_field);
                // "_total" is added by the encoder for counters.
                Self::counter(&mut encoder, &format!("xlb_xdp_{field}"), help, *value)?;
            }
        }

        let Ok(frontends) = maps.frontends() else {
            return Ok(());
        };
        let names = self.names.lock().unwrap().clone();
        let rows: Vec<(FrontendLabels, lb_common::ServiceStats)> = frontends
            .iter()
            .filter_map(|f| {
                let stats = maps.service_stats(f.value.id).ok()?;
                let labels = [
                    ("service", names.get(&f.key).cloned().unwrap_or_default()),
                    ("frontend", f.key.to_string()),
                ];
                Some((labels, stats))
            })
            .collect();
        type Field = fn(&lb_common::ServiceStats) -> u64;
        let per_frontend: [(&str, &str, Field); 4] = [
            (
                "xlb_service_packets",
                "Packets to a frontend (new and established flows), counted by the XDP program",
                |s| s.packets,
            ),
            (
                "xlb_service_bytes",
                "Bytes of those packets, L2 header included",
                |s| s.bytes,
            ),
            (
                "xlb_service_new_flows",
                "Flows the scheduler placed (conntrack misses)",
                |s| s.new_flows,
            ),
            (
                "xlb_service_no_backend_packets",
                "Packets dropped or refused because the frontend had no usable backend",
                |s| s.no_backend,
            ),
        ];
        for (name, help, field) in per_frontend {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (labels, stats) in &rows {
                ConstCounter::new(field(stats)).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_metrics_are_exposed_in_prometheus_text() {
        let m = Metrics::new("xdp", "XDP attached on eth0", None);
        let key = FrontendKey {
            addr: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: crate::model::Protocol::Tcp,
        };
        m.record_sync(
            Duration::from_millis(3),
            true,
            BTreeMap::from([(key, "web".to_owned())]),
            1,
            3,
        );
        m.record_programming_latency(Duration::from_millis(600));
        m.record_rejection("bad_ip");
        m.record_rejection("bad_ip");
        let text = m.encode();
        for line in [
            "# TYPE xlb_sync_proxy_rules_duration_seconds histogram",
            "xlb_sync_proxy_rules_duration_seconds_count 1",
            "xlb_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "xlb_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0",
            "xlb_network_programming_duration_seconds_bucket{le=\"0.5\"} 0",
            "xlb_network_programming_duration_seconds_bucket{le=\"0.75\"} 1",
            "xlb_syncs_total{outcome=\"ok\"} 1",
            "xlb_rejected_objects_total{reason=\"bad_ip\"} 2",
            "xlb_frontends 1",
            "xlb_services 1",
            "xlb_backends 3",
            "xlb_dataplane_info{mode=\"xdp\",reason=\"XDP attached on eth0\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }
}
