//! Kubernetes mode's source: kube-rs watchers and reflectors on v1 Services,
//! discovery.k8s.io/v1 EndpointSlices and this node's v1 Node, turned into a complete model by
//! [`translate`] after every burst of changes.
//!
//! Why it is shaped like this:
//! * Reflector stores keep the last listed state while a watch is down, and a relist (after a
//!   410 Gone, or a reconnect the server cannot resume) replaces a store only once the new list is
//!   complete. So while the API server is away nothing is sent, the sync loop keeps resyncing the
//!   last good model, and the dataplane keeps serving it.
//! * Nothing is sent before all three watches have listed once: a partial first view would
//!   remove the frontends a restarted agent adopted from its pinned maps.
//! * Watches reconnect with [`FastBackoff`] (capped at 1 s), not kube-rs's default (which grows to
//!   30 s): a node proxy that misses endpoint changes for long breaks traffic.

pub mod translate;

use std::{
    fmt,
    path::{Path, PathBuf},
    pin::Pin,
    time::Duration,
};

use anyhow::Context as _;
use futures::{FutureExt as _, Stream, StreamExt as _, stream::select_all};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        utils::Backoff,
        watcher,
    },
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::translate::{NodeSettings, Translated};
use crate::{model::Rejection, source::SourceEvent};

/// A new desired state built from the cluster.
#[derive(Debug)]
pub struct Snapshot {
    pub model: crate::model::Model,
    pub rejections: Vec<Rejection>,
    /// Highest resourceVersion among the objects applied so far (resourceVersions are opaque
    /// strings, but every API server in practice uses etcd's increasing revision numbers).
    pub resource_version: String,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of the EndpointSlices that changed since
    /// the previous snapshot: when the change that made them happened (network-programming
    /// latency, as kube-proxy measures it).
    pub change_triggers: Vec<std::time::SystemTime>,
}

/// The EndpointSlice annotation the endpoint controllers set to the time of the change (a Pod or
/// Service update) that caused the slice's last update.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Trigger times not seen before: `seen` maps each slice (namespace/name) to the annotation value
/// of its last snapshot.
fn new_change_triggers(
    slices: &[std::sync::Arc<EndpointSlice>],
    seen: &mut std::collections::HashMap<String, String>,
) -> Vec<std::time::SystemTime> {
    let mut now_seen = std::collections::HashMap::new();
    let mut out = Vec::new();
    for slice in slices {
        let meta = &slice.metadata;
        let Some(value) = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
        else {
            continue;
        };
        let id = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        );
        if seen.get(&id) != Some(value)
            && let Ok(t) = humantime::parse_rfc3339_weak(value)
        {
            out.push(t);
        }
        now_seen.insert(id, value.clone());
    }
    *seen = now_seen;
    out
}

/// Where the API server is.
#[derive(Clone, Debug)]
pub enum ClusterAccess {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (KUBERNETES_SERVICE_HOST and the mounted token).
    InCluster,
}

/// How long connecting to the API server may take before the watch retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds a client the way `kubectl` would reach the cluster.
pub async fn client(access: &ClusterAccess) -> anyhow::Result<Client> {
    let mut config = match access {
        ClusterAccess::Kubeconfig(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        ClusterAccess::InCluster => Config::incluster().context("in-cluster configuration")?,
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    Client::try_from(config).context("build the Kubernetes client")
}

/// Whether a kubeconfig path was given or the agent runs in a pod.
pub fn access(kubeconfig: Option<&Path>) -> Option<ClusterAccess> {
    match kubeconfig {
        Some(path) => Some(ClusterAccess::Kubeconfig(path.to_owned())),
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            Some(ClusterAccess::InCluster)
        }
        None => None,
    }
}

/// Watch reconnect delays: 100 ms doubling to a 1 s cap, with up to 10% jitter so that the agents
/// of a whole cluster do not reconnect in lockstep after an API server restart. Reset after every
/// successful event, like kube-rs's own backoffs.
#[derive(Clone, Debug, Default)]
pub struct FastBackoff {
    attempt: u32,
}

impl FastBackoff {
    pub const INITIAL: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(1);
}

impl Iterator for FastBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = Self::INITIAL
            .saturating_mul(1 << self.attempt.min(10))
            .min(Self::MAX);
        self.attempt = self.attempt.saturating_add(1);
        // Cheap jitter without a random number generator: the clock's nanoseconds.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 10_000.0);
        Some((base - jitter).max(Duration::from_millis(10)))
    }
}

impl Backoff for FastBackoff {
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The three watched kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
    Node,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Node => "node",
        })
    }
}

/// What a watch event means to the source loop.
enum Change {
    /// The store changed (object applied or deleted) or a (re)list completed.
    Applied {
        kind: Kind,
        listed: bool,
        resource_version: Option<String>,
    },
    /// A list is in progress: the store is unchanged until it completes.
    Listing {
        kind: Kind,
        resource_version: Option<String>,
    },
    Failed {
        kind: Kind,
        error: watcher::Error,
    },
}

type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;

fn watch_kind<K>(api: Api<K>, config: watcher::Config, kind: Kind) -> (Store<K>, ChangeStream)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let rv = |meta: &ObjectMeta| meta.resource_version.clone();
    let stream = watcher(api, config)
        .backoff(FastBackoff::default())
        .reflect(writer)
        .map(move |event| match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => Change::Applied {
                kind,
                listed: false,
                resource_version: rv(o.meta()),
            },
            Ok(watcher::Event::InitDone) => Change::Applied {
                kind,
                listed: true,
                resource_version: None,
            },
            Ok(watcher::Event::Init) => Change::Listing {
                kind,
                resource_version: None,
            },
            Ok(watcher::Event::InitApply(o)) => Change::Listing {
                kind,
                resource_version: rv(o.meta()),
            },
            Err(error) => Change::Failed { kind, error },
        })
        .boxed();
    (reader, stream)
}

/// Keeps the highest resourceVersion seen: numerically when both are numbers, else the latest.
fn newer_rv(current: &mut String, seen: String) {
    match (current.parse::<u64>(), seen.parse::<u64>()) {
        (Ok(a), Ok(b)) if b <= a => {}
        (Ok(_), Err(_)) if seen.is_empty() => {}
        _ => *current = seen,
    }
}

/// Watches the cluster and sends a [`Snapshot`] after every burst of changes, once all three
/// watches have listed. Runs until `events` closes.
pub async fn watch(
    client: Client,
    settings: NodeSettings,
    events: mpsc::Sender<SourceEvent>,
) -> anyhow::Result<()> {
    let (services, services_changes) = watch_kind(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        Kind::Services,
    );
    let (slices, slices_changes) = watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        Kind::EndpointSlices,
    );
    let (nodes, node_changes) = watch_kind(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={}", settings.node_name)),
        Kind::Node,
    );
    let mut changes = select_all([services_changes, slices_changes, node_changes]);
    let mut listed = [false; 3];
    let mut failing = [false; 3];
    let mut resource_version = String::new();
    // Highest resourceVersion of each list in progress; it counts once the list is complete.
    let mut listing_rv: [String; 3] = Default::default();
    let mut dirty = false;
    let mut warned_no_node = false;
    let mut seen_triggers = std::collections::HashMap::new();
    info!(node = %settings.node_name, "watching services, endpointslices and the node");
    loop {
        let Some(first) = changes.next().await else {
            anyhow::bail!("the Kubernetes watches ended");
        };
        // Take every change that is already there, so a burst becomes one translation.
        let mut batch = vec![first];
        while let Some(Some(change)) = changes.next().now_or_never() {
            batch.push(change);
        }
        for change in batch {
            match change {
                Change::Applied {
                    kind,
                    listed: list_done,
                    resource_version: rv,
                } => {
                    let i = kind as usize;
                    if failing[i] {
                        info!(watch = %kind, "watch resumed");
                        failing[i] = false;
                    }
                    if list_done {
                        debug!(watch = %kind, "list complete");
                        listed[i] = true;
                        let listed_rv = std::mem::take(&mut listing_rv[i]);
                        if !listed_rv.is_empty() {
                            newer_rv(&mut resource_version, listed_rv);
                        }
                    }
                    if let Some(rv) = rv {
                        newer_rv(&mut resource_version, rv);
                    }
                    dirty = true;
                }
                Change::Listing {
                    kind,
                    resource_version: rv,
                } => match rv {
                    Some(rv) => newer_rv(&mut listing_rv[kind as usize], rv),
                    None => listing_rv[kind as usize].clear(),
                },
                Change::Failed { kind, error } => {
                    let i = kind as usize;
                    // One warning per outage; the retries every second stay at debug.
                    if failing[i] {
                        debug!(watch = %kind, "watch still failing: {error}");
                    } else {
                        warn!(watch = %kind, "watch failed, retrying (the dataplane keeps the last good state): {error}");
                        failing[i] = true;
                    }
                }
            }
        }
        if !dirty || !listed.iter().all(|&l| l) {
            continue;
        }
        dirty = false;
        let node = nodes.state().into_iter().next();
        if node.is_none() && !warned_no_node {
            warn!(node = %settings.node_name, "no Node object with this name: NodePort frontends have no node address");
            warned_no_node = true;
        }
        let services = services.state();
        let slices = slices.state();
        let Translated { model, rejections } = translate::translate(
            services.iter().map(|s| s.as_ref()),
            slices.iter().map(|s| s.as_ref()),
            node.as_deref(),
            &settings,
        );
        let snapshot = Snapshot {
            model,
            rejections,
            resource_version: resource_version.clone(),
            change_triggers: new_change_triggers(&slices, &mut seen_triggers),
        };
        if events
            .send(SourceEvent::Kubernetes(snapshot))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_fast_and_is_capped_near_one_second() {
        let mut b = FastBackoff::default();
        let delays: Vec<Duration> = (0..30).map(|_| b.next().unwrap()).collect();
        assert!(delays[0] <= FastBackoff::INITIAL, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= FastBackoff::MAX), "{delays:?}");
        assert!(
            delays[29] >= FastBackoff::MAX.mul_f64(0.9),
            "it does reach the cap: {delays:?}"
        );
        b.reset();
        assert!(b.next().unwrap() <= FastBackoff::INITIAL);
    }

    #[test]
    fn change_triggers_are_reported_once_per_new_value() {
        use std::{collections::BTreeMap, sync::Arc, time::UNIX_EPOCH};
        let slice = |name: &str, at: Option<&str>| {
            Arc::new(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("default".into()),
                    annotations: at.map(|at| {
                        BTreeMap::from([(LAST_CHANGE_TRIGGER_TIME.to_owned(), at.to_owned())])
                    }),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints: vec![],
                ports: None,
            })
        };
        let secs = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let mut seen = Default::default();
        let a = slice("a", Some("2026-01-01T00:00:01.5Z"));
        let b = slice("b", None);
        let first = new_change_triggers(&[a.clone(), b.clone()], &mut seen);
        assert_eq!(
            first.iter().map(|t| secs(*t)).collect::<Vec<_>>(),
            vec![1767225601.5]
        );
        assert!(new_change_triggers(&[a.clone(), b], &mut seen).is_empty());
        let a2 = slice("a", Some("2026-01-01T00:00:03Z"));
        let c = slice("c", Some("garbage"));
        let next = new_change_triggers(&[a2, c], &mut seen);
        assert_eq!(
            next.iter().map(|t| secs(*t)).collect::<Vec<_>>(),
            vec![1767225603.0]
        );
    }

    #[test]
    fn resource_versions_compare_as_numbers() {
        let mut rv = String::new();
        newer_rv(&mut rv, "9".into());
        newer_rv(&mut rv, "10".into());
        newer_rv(&mut rv, "8".into());
        assert_eq!(rv, "10");
    }
}
