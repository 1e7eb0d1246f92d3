//! The service sets the benchmarks program, defined once and rendered every way a stage needs:
//! the agent's [`Model`] (programmed through the agent's own sync code), a services file (for the
//! agent as a process) and, in [`super::kube_proxy`], the iptables ruleset kube-proxy would write
//! for the very same services.
//!
//! A services-file entry is one frontend, so a service with two ports is two entries (and two
//! model services) named `<service>-<port name>`, as kube-proxy has one chain per service port.

use std::{fmt::Write as _, net::Ipv4Addr};

use lb_agent::model::{Backend, Frontend, Model, Protocol, Scheduler, Scope, Service};

/// First ClusterIP: service `i` gets `10.96.0.1 + i` (10.96.0.0/12 holds a million).
const VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// First endpoint address of sets with distinct endpoints: 10.128.0.0/9, eight million pods.
const ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);
/// The pod network of the iptables baseline's masquerade rule (`--cluster-cidr`): it holds the
/// benchmark's clients and every endpoint, so, as with xlb, backends see the real client address.
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";

/// One port of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name (`http`, `dns`, ...), part of the frontend's name.
    pub name: &'static str,
    pub port: u16,
    pub protocol: Protocol,
    /// The endpoints' port.
    pub target_port: u16,
}

/// `http`: 80/TCP to 8080.
pub const HTTP: ServicePort = ServicePort {
    name: "http",
    port: 80,
    protocol: Protocol::Tcp,
    target_port: 8080,
};
/// `dns`: 53/UDP to 5353.
pub const DNS: ServicePort = ServicePort {
    name: "dns",
    port: 53,
    protocol: Protocol::Udp,
    target_port: 5353,
};
/// `discard` (RFC 863): 9/UDP to 9, the target of the UDP flood.
pub const DISCARD: ServicePort = ServicePort {
    name: "discard",
    port: 9,
    protocol: Protocol::Udp,
    target_port: 9,
};

/// A Kubernetes-like service: a ClusterIP, its ports, its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchService {
    /// `svc-000042`: zero-padded so that name order is creation order.
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Ipv4Addr>,
}

impl BenchService {
    /// The name of one port's frontend: the services-file entry and the model service.
    pub fn frontend_name(&self, port: &ServicePort) -> String {
        format!("{}-{}", self.name, port.name)
    }
}

/// An ordered set of services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSet {
    pub services: Vec<BenchService>,
}

fn nth_addr(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n as u32)
}

/// The ClusterIP of service `i`.
pub fn vip(i: usize) -> Ipv4Addr {
    nth_addr(VIP_BASE, i)
}

impl ServiceSet {
    /// `count` services with one port (`http`) and `endpoints` endpoints each, no endpoint shared:
    /// a cluster where every service has its own pods (the control-plane and per-packet stages).
    pub fn distinct(count: usize, endpoints: usize) -> Self {
        Self {
            services: (0..count)
                .map(|i| BenchService {
                    name: format!("svc-{i:06}"),
                    vip: vip(i),
                    ports: vec![HTTP],
                    endpoints: (0..endpoints)
                        .map(|j| nth_addr(ENDPOINT_BASE, i * endpoints + j))
                        .collect(),
                })
                .collect(),
        }
    }

    /// `count` services with `ports`, all on the same endpoints: the throughput stage, whose
    /// endpoints are real servers in the backend namespaces.
    pub fn shared(count: usize, ports: &[ServicePort], endpoints: &[Ipv4Addr]) -> Self {
        Self {
            services: (0..count)
                .map(|i| BenchService {
                    name: format!("svc-{i:06}"),
                    vip: vip(i),
                    ports: ports.to_vec(),
                    endpoints: endpoints.to_vec(),
                })
                .collect(),
        }
    }

    /// Adds one more service (for example the flood's `discard` service) after the others.
    pub fn with(mut self, name: &str, ports: &[ServicePort], endpoints: &[Ipv4Addr]) -> Self {
        let i = self.services.len();
        self.services.push(BenchService {
            name: name.to_owned(),
            vip: vip(i),
            ports: ports.to_vec(),
            endpoints: endpoints.to_vec(),
        });
        self
    }

    /// Number of frontends (service ports).
    pub fn frontends(&self) -> usize {
        self.services.iter().map(|s| s.ports.len()).sum()
    }

    /// Number of (frontend, endpoint) pairs: kube-proxy's KUBE-SEP chains.
    pub fn endpoint_pairs(&self) -> usize {
        self.services
            .iter()
            .map(|s| s.ports.len() * s.endpoints.len())
            .sum()
    }

    /// The model the services file of [`ServiceSet::services_file`] parses into, built directly
    /// (parsing 100k entries of YAML would measure the YAML parser).
    pub fn model(&self) -> Model {
        let mut model = Model::default();
        for s in &self.services {
            for port in &s.ports {
                let mut backends: Vec<Backend> = s
                    .endpoints
                    .iter()
                    .map(|&e| Backend::ready(e.into(), port.target_port, 1))
                    .collect();
                backends.sort();
                let name = s.frontend_name(port);
                model.services.insert(
                    name.clone(),
                    Service {
                        name,
                        frontends: vec![Frontend {
                            addr: s.vip.into(),
                            port: port.port,
                            protocol: port.protocol,
                            scope: Scope::Internal,
                        }],
                        scheduler: Scheduler::Maglev,
                        affinity_timeout_s: None,
                        internal_local: false,
                        external_local: false,
                        backends,
                    },
                );
            }
        }
        model
    }

    /// The set as a services file (lb-agent/src/source/file.rs), one entry per service port.
    pub fn services_file(&self) -> String {
        let mut out = String::from("services:\n");
        for s in &self.services {
            for port in &s.ports {
                let _ = write!(
                    out,
                    "  - name: {}\n    vip: {}\n    port: {}\n    protocol: {}\n    backends:\n",
                    s.frontend_name(port),
                    s.vip,
                    port.port,
                    port.protocol
                );
                for e in &s.endpoints {
                    let _ = writeln!(out, "      - {{ip: {e}, port: {}}}", port.target_port);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_file_parses_into_the_same_model() {
        for set in [
            ServiceSet::distinct(7, 10),
            ServiceSet::shared(3, &[HTTP, DNS], &[Ipv4Addr::new(10, 10, 2, 11)]).with(
                "flood",
                &[DISCARD],
                &[Ipv4Addr::new(10, 10, 2, 12)],
            ),
        ] {
            let parsed = lb_agent::source::file::parse(&set.services_file()).unwrap();
            assert!(parsed.rejections.is_empty(), "{:?}", parsed.rejections);
            assert_eq!(parsed.model, set.model());
            assert_eq!(parsed.model.services.len(), set.frontends());
        }
    }

    #[test]
    fn distinct_sets_share_no_endpoint_and_no_vip() {
        let set = ServiceSet::distinct(100, 10);
        let mut endpoints: Vec<Ipv4Addr> = set
            .services
            .iter()
            .flat_map(|s| s.endpoints.clone())
            .collect();
        endpoints.sort();
        endpoints.dedup();
        assert_eq!(endpoints.len(), 1000);
        let mut vips: Vec<Ipv4Addr> = set.services.iter().map(|s| s.vip).collect();
        vips.dedup();
        assert_eq!(vips.len(), 100);
        assert_eq!(set.endpoint_pairs(), 1000);
    }
}
