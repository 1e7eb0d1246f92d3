//! The desired state: a sorted, validated set of services. Pure data, no I/O.
//!
//! Every source (the services file, Kubernetes) produces a [`Model`]; nothing downstream knows
//! which one did. The Kubernetes-specific choices (which endpoints a frontend may use) live here
//! too, in [`Service::usable_backends`], so every dataplane applies them the same way.

use std::{collections::BTreeMap, fmt, net::IpAddr};

pub use lb_common::Scheduler;

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::proto::TCP,
            Self::Udp => lb_common::proto::UDP,
            Self::Sctp => lb_common::proto::SCTP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::proto::TCP => Some(Self::Tcp),
            lb_common::proto::UDP => Some(Self::Udp),
            lb_common::proto::SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Parses a scheduler name as IPVS users write it (`ipvs.scheduler`, `ipvsadm -s`), plus
/// `maglev` for `mh`.
pub fn parse_scheduler(name: &str) -> Option<Scheduler> {
    Some(match name {
        "mh" | "maglev" => Scheduler::Maglev,
        "rr" => Scheduler::RoundRobin,
        "wrr" => Scheduler::WeightedRoundRobin,
        "sh" => Scheduler::SourceHash,
        "lc" => Scheduler::LeastConn,
        "wlc" => Scheduler::WeightedLeastConn,
        _ => return None,
    })
}

/// Which traffic policy governs a frontend: cluster-internal addresses (ClusterIP) follow
/// internalTrafficPolicy, externally reachable ones (NodePort, LoadBalancer, externalIPs) follow
/// externalTrafficPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Scope {
    #[default]
    Internal,
    External,
}

/// An address:port:protocol a service answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// One endpoint of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// EndpointSlice `conditions.ready` (always true in the services file).
    pub ready: bool,
    /// `conditions.serving`: able to take traffic, possibly while terminating.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// The endpoint runs on this node (for the Local traffic policies).
    pub node_local: bool,
    /// Topology-aware routing keeps the endpoint for this node: its EndpointSlice hints name this
    /// node or its zone, or the Service's endpoints carry no usable hints (then every endpoint
    /// is kept). Cluster-wide frontends send new flows only to ready endpoints kept here.
    pub in_topology: bool,
}

impl Backend {
    /// A ready backend, as the services file describes them.
    pub const fn ready(addr: IpAddr, port: u16, weight: u32) -> Self {
        Self {
            addr,
            port,
            weight,
            ready: true,
            serving: true,
            terminating: false,
            node_local: false,
            in_topology: true,
        }
    }
}

/// ClientIP session affinity timeout, as Kubernetes defaults it (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// A load-balanced service: frontends, how to pick among backends, and the backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Unique name: `name` in the services file, `namespace/name:port` in Kubernetes.
    pub name: String,
    /// Sorted, no duplicates.
    pub frontends: Vec<Frontend>,
    pub scheduler: Scheduler,
    /// ClientIP session affinity timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// internalTrafficPolicy=Local: internal frontends use only node-local endpoints.
    pub internal_local: bool,
    /// externalTrafficPolicy=Local: external frontends use only node-local endpoints.
    pub external_local: bool,
    /// Sorted, no duplicate address:port.
    pub backends: Vec<Backend>,
}

impl Service {
    /// The backends a frontend of `scope` sends new flows to, following Kubernetes: ready
    /// endpoints; if there are none, serving-and-terminating ones (so a rolling update of the last
    /// pods does not blackhole traffic); restricted to this node's endpoints under a Local policy.
    ///
    /// Under a Cluster policy, ready endpoints are also filtered by topology-aware routing
    /// ([`Backend::in_topology`]); as in kube-proxy, Local policies and the terminating fallback
    /// ignore topology.
    pub fn usable_backends(&self, scope: Scope) -> Vec<Backend> {
        let by_topology = !self.local_only(scope);
        let ready: Vec<Backend> = self
            .candidates(scope)
            .filter(|b| b.ready && (b.in_topology || !by_topology))
            .copied()
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        self.candidates(scope)
            .filter(|b| b.serving && b.terminating)
            .copied()
            .collect()
    }

    /// Terminating endpoints a frontend of `scope` no longer sends new flows to, but whose open
    /// flows may finish.
    pub fn draining_backends(&self, scope: Scope) -> Vec<Backend> {
        let usable = self.usable_backends(scope);
        self.candidates(scope)
            .filter(|b| b.terminating && !usable.contains(b))
            .copied()
            .collect()
    }

    /// Whether a frontend of `scope` with no usable backend drops traffic rather than refusing
    /// it: Kubernetes drops under a Local traffic policy when the service has endpoints, just none
    /// on this node; a service with no endpoints at all is refused.
    pub fn drops_when_empty(&self, scope: Scope) -> bool {
        self.local_only(scope)
            && self
                .backends
                .iter()
                .any(|b| b.ready || (b.serving && b.terminating))
    }

    /// Whether the traffic policy of `scope` is Local.
    fn local_only(&self, scope: Scope) -> bool {
        match scope {
            Scope::Internal => self.internal_local,
            Scope::External => self.external_local,
        }
    }

    /// Endpoints the traffic policy of `scope` allows at all.
    fn candidates(&self, scope: Scope) -> impl Iterator<Item = &Backend> {
        let local_only = self.local_only(scope);
        self.backends
            .iter()
            .filter(move |b| !local_only || b.node_local)
    }
}

/// The whole desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub services: BTreeMap<String, Service>,
    /// Health check node ports to answer, by port (Kubernetes mode only).
    pub health_checks: BTreeMap<u16, HealthCheckPort>,
}

/// A Service's health check node port. The cloud load balancer of a LoadBalancer Service with
/// externalTrafficPolicy=Local probes it on every node and sends traffic only to nodes that
/// answer 200, the nodes with ready endpoints of the Service (the others would drop it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckPort {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Addresses to listen on: this node's NodePort addresses.
    pub addrs: Vec<IpAddr>,
    /// This node's ready endpoints of the Service, counted by address across all its ports (as
    /// kube-proxy counts them: a pod serving two ports is one endpoint).
    pub local_endpoints: usize,
}

impl Model {
    pub fn backend_count(&self) -> usize {
        self.services.values().map(|s| s.backends.len()).sum()
    }
}

/// An object a source could not turn into a service, and why. Reported (log, metric) and
/// skipped; every other service still loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Where the object is: `services[3] "web"` in a file, `default/web` in Kubernetes.
    pub location: String,
    /// Short machine-friendly reason, the metric label.
    pub reason: &'static str,
    /// Human explanation.
    pub detail: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.location, self.detail, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(last: u8, ready: bool, serving: bool, terminating: bool, local: bool) -> Backend {
        Backend {
            addr: IpAddr::from([10, 0, 0, last]),
            port: 80,
            weight: 1,
            ready,
            serving,
            terminating,
            node_local: local,
            in_topology: true,
        }
    }

    fn service(backends: Vec<Backend>) -> Service {
        Service {
            name: "s".into(),
            frontends: vec![],
            scheduler: Scheduler::Maglev,
            affinity_timeout_s: None,
            internal_local: false,
            external_local: false,
            backends,
        }
    }

    #[test]
    fn ready_backends_win_over_terminating_ones() {
        let s = service(vec![
            backend(1, true, true, false, false),
            backend(2, false, true, true, false),
        ]);
        let got = s.usable_backends(Scope::Internal);
        assert_eq!(got, vec![s.backends[0]]);
    }

    #[test]
    fn serving_terminating_backends_are_the_fallback_when_none_is_ready() {
        let s = service(vec![
            backend(1, false, true, true, false),
            backend(2, false, false, true, false),
            backend(3, false, false, false, false),
        ]);
        assert_eq!(s.usable_backends(Scope::Internal), vec![s.backends[0]]);
    }

    #[test]
    fn local_policy_restricts_its_scope_only() {
        let mut s = service(vec![
            backend(1, true, true, false, true),
            backend(2, true, true, false, false),
        ]);
        s.external_local = true;
        assert_eq!(s.usable_backends(Scope::External), vec![s.backends[0]]);
        assert_eq!(s.usable_backends(Scope::Internal).len(), 2);
        s.backends[0].node_local = false;
        assert!(
            s.usable_backends(Scope::External).is_empty(),
            "no local endpoint: drop, per Kubernetes"
        );
    }

    #[test]
    fn scheduler_names_follow_ipvs() {
        for (name, sched) in [
            ("mh", Scheduler::Maglev),
            ("maglev", Scheduler::Maglev),
            ("rr", Scheduler::RoundRobin),
            ("wrr", Scheduler::WeightedRoundRobin),
            ("sh", Scheduler::SourceHash),
            ("lc", Scheduler::LeastConn),
            ("wlc", Scheduler::WeightedLeastConn),
        ] {
            assert_eq!(parse_scheduler(name), Some(sched), "{name}");
        }
        assert_eq!(parse_scheduler("random"), None);
        assert_eq!(parse_scheduler("RR"), None);
    }
}
