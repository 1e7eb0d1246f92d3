//! Kubernetes objects -> the model. Pure: no I/O, no clock, the same inputs give the same model.
//!
//! This is where kube-proxy's semantics live. One v1 Service becomes one model service per
//! service port (and per IP family when the Service is dual stack):
//!
//! * name `namespace/name:portname`, or `namespace/name:port` when the port is unnamed; a dual-stack
//!   Service gets one per family, suffixed `/IPv4` and `/IPv6` (a frontend must only pick backends
//!   of its own family, and the model keeps one backend list per service);
//! * frontends: every `spec.clusterIPs` entry (scope Internal); for NodePort and LoadBalancer
//!   Services this node's addresses (Node `status.addresses`, InternalIP and ExternalIP, filtered by
//!   nodePortAddresses) on the nodePort; `status.loadBalancer.ingress[].ip` of LoadBalancer Services
//!   (except `ipMode: Proxy`, where the load balancer itself proxies); `spec.externalIPs`. All but
//!   the ClusterIPs are scope External;
//! * backends: the endpoints of every EndpointSlice labelled `kubernetes.io/service-name=<name>` in
//!   the Service's namespace (whoever created the slice), for the slice port whose name and protocol
//!   match the service port (so a named targetPort resolves per slice), deduplicated by
//!   address:port across slices. Conditions follow the EndpointSlice API: an unset `ready` or
//!   `serving` means true, an unset `terminating` false. Endpoints that are neither ready nor
//!   terminating carry no traffic and are left out. `node_local` is `nodeName == this node`;
//! * sessionAffinity ClientIP with its timeout, externalTrafficPolicy/internalTrafficPolicy Local,
//!   and the scheduler: the agent's default, or the [`SCHEDULER_ANNOTATION`] of the Service;
//! * topology-aware routing, as kube-proxy does it from the hints the EndpointSlice controller
//!   writes: cluster-wide frontends keep the ready endpoints hinted for this node, or else for
//!   its zone (Node label `topology.kubernetes.io/zone`), when every ready endpoint has such hints
//!   and one matches; otherwise all;
//! * a LoadBalancer Service with externalTrafficPolicy Local also gets its `healthCheckNodePort`
//!   in [`Model::health_checks`], with the number of this node's ready endpoint addresses (served
//!   by [`crate::service_health`]).
//!
//! Ignored without complaint, as kube-proxy ignores them: ExternalName Services, headless Services
//! (clusterIP `None`) and Services labelled [`SERVICE_PROXY_NAME_LABEL`] (another proxy owns them).
//! A Service that cannot be translated (bad address, protocol, port, annotation, or a frontend
//! another Service already owns) becomes a [`Rejection`] as a whole, never half-applied, and every
//! other Service still loads. When two Services claim one frontend, the older one (by
//! creationTimestamp, then namespace/name) keeps it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Node, Service as KubeService, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::model::{
    Backend, DEFAULT_AFFINITY_TIMEOUT_S, Frontend, HealthCheckPort, Model, Protocol, Rejection,
    Scheduler, Scope, Service, parse_scheduler,
};

/// Node label naming the node's zone (topology-aware routing).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy; kube-proxy skips them too.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Per-Service scheduler override (`maglev`/`mh`, `rr`, `wrr`, `sh`, `lc`, `wlc`).
pub const SCHEDULER_ANNOTATION: &str = "xlb.io/scheduler";

/// Where NodePorts listen (kube-proxy's nodePortAddresses).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every InternalIP and ExternalIP of the node (nodePortAddresses unset).
    #[default]
    All,
    /// The node's primary address of each family: its first InternalIP (kube-proxy's `primary`).
    Primary,
    /// Node addresses inside any of these ranges.
    Cidrs(Vec<IpNet>),
}

impl NodePortAddresses {
    /// Parses kube-proxy's list: empty, `["primary"]`, or CIDRs.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        if values.is_empty() {
            return Ok(Self::All);
        }
        if values.iter().any(|v| v == "primary") {
            if values.len() > 1 {
                return Err("`primary` cannot be combined with CIDRs".into());
            }
            return Ok(Self::Primary);
        }
        values
            .iter()
            .map(|v| {
                v.parse::<IpNet>()
                    .map_err(|e| format!("{v:?} is not a CIDR: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(Self::Cidrs)
    }
}

/// What the translation needs to know about the agent and its node.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// This node's name (endpoints with this nodeName are node-local).
    pub node_name: String,
    pub node_port_addresses: NodePortAddresses,
    /// Scheduler of Services without the annotation.
    pub default_scheduler: Scheduler,
}

/// The model built from the cluster, and what could not be used.
#[derive(Debug, Default)]
pub struct Translated {
    pub model: Model,
    pub rejections: Vec<Rejection>,
}

type Invalid = (&'static str, String);

/// Translates the cluster as the agent's watches see it. `node` is this node's Node object, when
/// it is known (without it there is no address for NodePorts).
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a KubeService>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: Option<&Node>,
    settings: &NodeSettings,
) -> Translated {
    // Slices by (namespace, service name).
    let mut slices_of: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if let (Some(ns), Some(service)) = (
            slice.metadata.namespace.as_deref(),
            label(&slice.metadata, SERVICE_NAME_LABEL),
        ) {
            slices_of.entry((ns, service)).or_default().push(slice);
        }
    }
    let this_node = ThisNode {
        addrs: node.map(node_addresses).unwrap_or_default(),
        zone: node
            .and_then(|n| label(&n.metadata, ZONE_LABEL))
            .map(str::to_owned),
    };

    // Older Services first, so a new Service cannot take a frontend away from an existing one.
    let mut services: Vec<&KubeService> = services.into_iter().collect();
    services.sort_by(|a, b| {
        let key = |s: &'a KubeService| {
            (
                s.metadata.creation_timestamp.as_ref().map(|t| t.0),
                s.metadata.namespace.clone(),
                s.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });

    let mut out = Translated::default();
    let mut claimed: BTreeMap<(IpAddr, u16, Protocol), String> = BTreeMap::new();
    for service in services {
        let ns = service.metadata.namespace.as_deref().unwrap_or_default();
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let location = format!("service {ns}/{name}");
        let slices = slices_of
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let translated = match translate_service(service, slices, &this_node, settings) {
            Ok(Some(translated)) => translated,
            Ok(None) => continue,
            Err((reason, detail)) => {
                out.rejections.push(Rejection {
                    location,
                    reason,
                    detail,
                });
                continue;
            }
        };
        let conflict = translated.iter().find_map(|s| {
            s.frontends.iter().find_map(|f| {
                claimed
                    .get(&(f.addr, f.port, f.protocol))
                    .map(|owner| (f, owner))
            })
        });
        if let Some((frontend, owner)) = conflict {
            out.rejections.push(Rejection {
                location,
                reason: "duplicate_frontend",
                detail: format!("{frontend} is already served by {owner}"),
            });
            continue;
        }
        if let Some(port) = health_check_node_port(service) {
            let check = HealthCheckPort {
                service: format!("{ns}/{name}"),
                addrs: node_port_addrs(&this_node.addrs, settings),
                local_endpoints: translated
                    .iter()
                    .flat_map(|s| &s.backends)
                    .filter(|b| b.ready && b.node_local)
                    .map(|b| b.addr)
                    .collect::<BTreeSet<IpAddr>>()
                    .len(),
            };
            if let Some(owner) = out.model.health_checks.get(&port) {
                // The API server allocates these ports uniquely; keep the first claim, and the
                // later Service's frontends, which do not depend on it.
                out.rejections.push(Rejection {
                    location,
                    reason: "duplicate_health_check_node_port",
                    detail: format!(
                        "healthCheckNodePort {port} is already used by {}",
                        owner.service
                    ),
                });
            } else {
                out.model.health_checks.insert(port, check);
            }
        }
        for s in translated {
            for f in &s.frontends {
                claimed.insert((f.addr, f.port, f.protocol), s.name.clone());
            }
            out.model.services.insert(s.name.clone(), s);
        }
    }
    out
}

/// The health check node port this node must answer for `service`: LoadBalancer Services with
/// externalTrafficPolicy=Local only, as kube-proxy (the API server allocates one for no others).
fn health_check_node_port(service: &KubeService) -> Option<u16> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    spec.health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
}

/// This node's addresses that NodePorts (and health check node ports) listen on.
fn node_port_addrs(node_addrs: &[NodeAddress], settings: &NodeSettings) -> Vec<IpAddr> {
    node_addrs
        .iter()
        .filter(|a| listens_for_node_ports(a, &settings.node_port_addresses))
        .map(|a| a.addr)
        .collect()
}

fn label<'m>(meta: &'m ObjectMeta, key: &str) -> Option<&'m str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// A node address NodePorts may listen on, and whether it is the node's primary one of its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NodeAddress {
    addr: IpAddr,
    primary: bool,
}

/// InternalIP and ExternalIP addresses of the node, in the Node's order; the first InternalIP of
/// each family is its primary address (the first address of the family when it has no InternalIP).
fn node_addresses(node: &Node) -> Vec<NodeAddress> {
    let listed = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let parsed: Vec<(IpAddr, bool)> = listed
        .iter()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| Some((a.address.parse().ok()?, a.type_ == "InternalIP")))
        .collect();
    let primary_of = |v4: bool| {
        parsed
            .iter()
            .find(|(a, internal)| a.is_ipv4() == v4 && *internal)
            .or_else(|| parsed.iter().find(|(a, _)| a.is_ipv4() == v4))
            .map(|(a, _)| *a)
    };
    let primaries = [primary_of(true), primary_of(false)];
    let mut out: Vec<NodeAddress> = Vec::new();
    for (addr, _) in parsed {
        if !out.iter().any(|n| n.addr == addr) {
            out.push(NodeAddress {
                addr,
                primary: primaries.contains(&Some(addr)),
            });
        }
    }
    out
}

fn listens_for_node_ports(a: &NodeAddress, allowed: &NodePortAddresses) -> bool {
    match allowed {
        NodePortAddresses::All => true,
        NodePortAddresses::Primary => a.primary,
        NodePortAddresses::Cidrs(cidrs) => cidrs.iter().any(|c| c.contains(&a.addr)),
    }
}

/// IP family of an address, as the model's per-family split needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(addr: &IpAddr) -> Self {
        if addr.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

fn parse_ip(value: &str, field: &str) -> Result<IpAddr, Invalid> {
    value
        .parse()
        .map_err(|_| ("bad_ip", format!("{field} {value:?} is not an IP address")))
}

fn parse_port(value: i32, field: &str) -> Result<u16, Invalid> {
    u16::try_from(value)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(("bad_port", format!("{field} {value} is not in 1..=65535")))
}

fn parse_protocol(value: Option<&str>) -> Result<Protocol, Invalid> {
    let value = value.unwrap_or("TCP");
    Protocol::parse(value).ok_or((
        "bad_protocol",
        format!("protocol {value:?} is not TCP, UDP or SCTP"),
    ))
}

/// One Service, or `None` when kube-proxy semantics say to leave it alone.
/// What the translation knows of this node from its Node object.
struct ThisNode {
    addrs: Vec<NodeAddress>,
    /// `topology.kubernetes.io/zone`, for topology-aware routing.
    zone: Option<String>,
}

fn translate_service(
    service: &KubeService,
    slices: &[&EndpointSlice],
    this_node: &ThisNode,
    settings: &NodeSettings,
) -> Result<Option<Vec<Service>>, Invalid> {
    if label(&service.metadata, SERVICE_PROXY_NAME_LABEL).is_some() {
        return Ok(None);
    }
    let Some(spec) = &service.spec else {
        return Ok(None);
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Ok(None);
    }
    if !matches!(kind, "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(("bad_type", format!("type {kind:?} is not supported")));
    }
    let cluster_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.as_str()],
        _ => vec![],
    };
    if cluster_ips.contains(&"None") {
        return Ok(None); // headless: DNS only
    }
    let cluster_ips = cluster_ips
        .into_iter()
        .map(|ip| parse_ip(ip, "clusterIP"))
        .collect::<Result<Vec<_>, _>>()?;
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .map(|ip| parse_ip(ip, "externalIP"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ingress_ips = vec![];
    if kind == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for i in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer delivers to the node with its own address as the
            // destination, so the ingress IP must not be captured here.
            if i.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &i.ip {
                ingress_ips.push(parse_ip(ip, "loadBalancer ingress IP")?);
            }
        }
    }
    // Families the Service serves: those of its ClusterIPs, else its ipFamilies, else any.
    let mut families: BTreeSet<Family> = cluster_ips.iter().map(Family::of).collect();
    if families.is_empty() {
        for f in spec.ip_families.iter().flatten() {
            families.insert(if f == "IPv6" { Family::V6 } else { Family::V4 });
        }
    }
    if families.is_empty() {
        families = BTreeSet::from([Family::V4, Family::V6]);
    }

    let scheduler = match service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SCHEDULER_ANNOTATION))
    {
        None => settings.default_scheduler,
        Some(name) => parse_scheduler(name).ok_or((
            "bad_scheduler",
            format!("annotation {SCHEDULER_ANNOTATION} {name:?} is not a known scheduler"),
        ))?,
    };
    let affinity_timeout_s = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        Some(match timeout {
            None => DEFAULT_AFFINITY_TIMEOUT_S,
            Some(t) if (1..=86_400).contains(&t) => t as u32,
            Some(t) => {
                return Err((
                    "bad_affinity_timeout",
                    format!("sessionAffinityConfig timeoutSeconds {t} is not in 1..=86400"),
                ));
            }
        })
    } else {
        None
    };
    let node_ports = kind == "NodePort" || kind == "LoadBalancer";
    let node_port_addrs = node_port_addrs(&this_node.addrs, settings);

    let ports = spec.ports.as_deref().unwrap_or_default();
    let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let mut out = vec![];
    for port in ports {
        let protocol = parse_protocol(port.protocol.as_deref())?;
        let number = parse_port(port.port, "port")?;
        let mut frontends = vec![];
        let mut add = |addr: IpAddr, port: u16, scope: Scope| {
            frontends.push(Frontend {
                addr,
                port,
                protocol,
                scope,
            })
        };
        for &ip in &cluster_ips {
            add(ip, number, Scope::Internal);
        }
        for &ip in external_ips.iter().chain(&ingress_ips) {
            add(ip, number, Scope::External);
        }
        if node_ports && let Some(node_port) = port.node_port.filter(|&p| p != 0) {
            let node_port = parse_port(node_port, "nodePort")?;
            for &ip in &node_port_addrs {
                if families.contains(&Family::of(&ip)) {
                    add(ip, node_port, Scope::External);
                }
            }
        }
        let backends = backends(port, protocol, slices, &settings.node_name)?;
        let port_name = match port.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => number.to_string(),
        };
        let base = format!("{namespace}/{name}:{port_name}");
        let present: BTreeSet<Family> = frontends.iter().map(|f| Family::of(&f.addr)).collect();
        for &family in &present {
            let mut frontends: Vec<Frontend> = frontends
                .iter()
                .filter(|f| Family::of(&f.addr) == family)
                .copied()
                .collect();
            frontends.sort();
            frontends.dedup();
            out.push(Service {
                name: if present.len() > 1 {
                    format!("{base}/{}", family.suffix())
                } else {
                    base.clone()
                },
                frontends,
                scheduler,
                affinity_timeout_s,
                internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                backends: with_topology(
                    backends
                        .iter()
                        .filter(|e| Family::of(&e.backend.addr) == family),
                    &settings.node_name,
                    this_node.zone.as_deref(),
                ),
            });
        }
    }
    Ok(Some(out))
}

/// An endpoint and the topology hints its slice gives it.
#[derive(Clone, Debug)]
struct HintedBackend {
    backend: Backend,
    /// `hints.forZones[].name`.
    zones: BTreeSet<String>,
    /// `hints.forNodes[].name`.
    nodes: BTreeSet<String>,
}

/// The endpoints serving one service port, merged across the Service's slices.
fn backends(
    port: &ServicePort,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    node_name: &str,
) -> Result<Vec<HintedBackend>, Invalid> {
    let wanted_name = port.name.as_deref().unwrap_or_default();
    let mut merged: BTreeMap<(IpAddr, u16), HintedBackend> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices name no address to forward to
        }
        let slice_port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == wanted_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol.to_string()
        });
        let Some(number) = slice_port.and_then(|p| p.port) else {
            continue;
        };
        let slice_name = slice.metadata.name.as_deref().unwrap_or_default();
        let number = parse_port(number, &format!("EndpointSlice {slice_name} port"))?;
        for endpoint in &slice.endpoints {
            // Addresses are fungible; consumers use the first, as kube-proxy does.
            let Some(first) = endpoint.addresses.first() else {
                continue;
            };
            let addr = parse_ip(first, &format!("EndpointSlice {slice_name} address"))?;
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready && !terminating {
                continue;
            }
            let hints = endpoint.hints.as_ref();
            let hinted = HintedBackend {
                backend: Backend {
                    addr,
                    port: number,
                    weight: 1,
                    ready,
                    serving,
                    terminating,
                    node_local: endpoint.node_name.as_deref() == Some(node_name),
                    in_topology: true,
                },
                zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            };
            // The same endpoint in two slices (during a slice rebalancing): keep the better view.
            let rank = |h: &HintedBackend| {
                let b = &h.backend;
                (b.ready, b.serving, !b.terminating, b.node_local)
            };
            merged
                .entry((addr, number))
                .and_modify(|old| {
                    if rank(&hinted) > rank(old) {
                        *old = hinted.clone();
                    }
                })
                .or_insert(hinted);
        }
    }
    Ok(merged.into_values().collect())
}

/// Topology-aware routing, as kube-proxy decides it from the hints the EndpointSlice
/// controller writes (for `trafficDistribution` or the topology-mode annotation): if every ready
/// endpoint has node hints and one names this node, only endpoints hinted for this node are
/// kept; else if every ready endpoint has zone hints and one names this node's zone, only those
/// hinted for the zone; else every endpoint. The result marks [`Backend::in_topology`].
fn with_topology<'e>(
    endpoints: impl Iterator<Item = &'e HintedBackend> + Clone,
    node_name: &str,
    zone: Option<&str>,
) -> Vec<Backend> {
    type Hints = fn(&HintedBackend) -> &BTreeSet<String>;
    let nodes: Hints = |e| &e.nodes;
    let zones: Hints = |e| &e.zones;
    // Hints apply when every ready endpoint has some and at least one names `this`.
    let apply = |hints: Hints, this: &str| {
        let mut ready = endpoints.clone().filter(|e| e.backend.ready);
        ready.clone().all(|e| !hints(e).is_empty()) && ready.any(|e| hints(e).contains(this))
    };
    let keep = if apply(nodes, node_name) {
        Some((nodes, node_name))
    } else {
        zone.filter(|&zone| apply(zones, zone))
            .map(|zone| (zones, zone))
    };
    endpoints
        .map(|e| Backend {
            in_topology: keep.is_none_or(|(hints, this)| hints(e).contains(this)),
            ..e.backend
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;
    use serde_json::json;

    fn settings() -> NodeSettings {
        NodeSettings {
            node_name: "node-a".into(),
            node_port_addresses: NodePortAddresses::All,
            default_scheduler: Scheduler::Maglev,
        }
    }

    fn service(v: serde_json::Value) -> KubeService {
        serde_json::from_value(v).unwrap()
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn node(addresses: &[(&str, &str)]) -> Node {
        let addresses: Vec<_> = addresses
            .iter()
            .map(|(t, a)| json!({"type": t, "address": a}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": addresses}
        }))
        .unwrap()
    }

    /// A ClusterIP Service `default/web` with one TCP port 80 -> 8080 named `http`.
    fn web(spec: serde_json::Value) -> serde_json::Value {
        let mut base = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
            }
        });
        merge(&mut base["spec"], spec);
        base
    }

    fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        if let (Some(b), serde_json::Value::Object(p)) = (base.as_object_mut(), patch) {
            for (k, v) in p {
                b.insert(k, v);
            }
        }
    }

    /// `(address, ready, serving, terminating, nodeName)`.
    type Ep<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>, &'a str);

    /// An EndpointSlice of `default/<service>` with endpoints on port `http`/8080.
    fn endpoints(name: &str, service: &str, eps: &[Ep]) -> serde_json::Value {
        let eps: Vec<_> = eps
            .iter()
            .map(|(a, r, s, t, n)| {
                json!({"addresses": [a], "conditions": {"ready": r, "serving": s, "terminating": t}, "nodeName": n})
            })
            .collect();
        json!({
            "metadata": {"name": name, "namespace": "default", "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        })
    }

    fn ready(addr: &str) -> Ep<'_> {
        (addr, Some(true), Some(true), Some(false), "node-b")
    }

    fn run(services: &[serde_json::Value], slices: &[serde_json::Value]) -> Translated {
        run_on(services, slices, None, &settings())
    }

    fn run_on(
        services: &[serde_json::Value],
        slices: &[serde_json::Value],
        node: Option<&Node>,
        settings: &NodeSettings,
    ) -> Translated {
        let services: Vec<KubeService> = services.iter().cloned().map(service).collect();
        let slices: Vec<EndpointSlice> = slices.iter().cloned().map(slice).collect();
        translate(&services, &slices, node, settings)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn frontends(t: &Translated, name: &str) -> Vec<(IpAddr, u16, Protocol, Scope)> {
        t.model.services[name]
            .frontends
            .iter()
            .map(|f| (f.addr, f.port, f.protocol, f.scope))
            .collect()
    }

    fn backend_addrs(t: &Translated, name: &str) -> Vec<(IpAddr, u16)> {
        t.model.services[name]
            .backends
            .iter()
            .map(|b| (b.addr, b.port))
            .collect()
    }

    #[test]
    fn cluster_ip_service_with_its_endpoints() {
        let t = run(
            &[web(json!({}))],
            &[endpoints(
                "web-1",
                "web",
                &[ready("10.1.0.1"), ready("10.1.0.2")],
            )],
        );
        assert!(t.rejections.is_empty(), "{:?}", t.rejections);
        let names: Vec<&String> = t.model.services.keys().collect();
        assert_eq!(names, ["default/web:http"]);
        let s = &t.model.services["default/web:http"];
        assert_eq!(
            frontends(&t, "default/web:http"),
            [(ip("10.96.0.10"), 80, Protocol::Tcp, Scope::Internal)]
        );
        assert_eq!(
            backend_addrs(&t, "default/web:http"),
            [(ip("10.1.0.1"), 8080), (ip("10.1.0.2"), 8080)]
        );
        assert_eq!(s.scheduler, Scheduler::Maglev);
        assert_eq!(s.affinity_timeout_s, None);
        assert!(!s.internal_local && !s.external_local);
        assert!(s.backends.iter().all(|b| b.ready && b.weight == 1));
    }

    #[test]
    fn a_service_without_endpoints_still_has_its_frontend() {
        let t = run(&[web(json!({}))], &[]);
        assert_eq!(t.model.services["default/web:http"].frontends.len(), 1);
        assert!(t.model.services["default/web:http"].backends.is_empty());
    }

    #[test]
    fn dual_stack_gets_one_service_per_family_with_backends_of_that_family() {
        let mut v6 = endpoints("web-v6", "web", &[ready("fd00::1")]);
        v6["addressType"] = json!("IPv6");
        let t = run(
            &[web(json!({
                "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "PreferDualStack"
            }))],
            &[endpoints("web-v4", "web", &[ready("10.1.0.1")]), v6],
        );
        assert!(t.rejections.is_empty(), "{:?}", t.rejections);
        assert_eq!(
            frontends(&t, "default/web:http/IPv4"),
            [(ip("10.96.0.10"), 80, Protocol::Tcp, Scope::Internal)]
        );
        assert_eq!(
            frontends(&t, "default/web:http/IPv6"),
            [(ip("fd00:96::10"), 80, Protocol::Tcp, Scope::Internal)]
        );
        assert_eq!(
            backend_addrs(&t, "default/web:http/IPv4"),
            [(ip("10.1.0.1"), 8080)]
        );
        assert_eq!(
            backend_addrs(&t, "default/web:http/IPv6"),
            [(ip("fd00::1"), 8080)]
        );
    }

    #[test]
    fn node_port_listens_on_this_nodes_addresses_of_the_service_family() {
        let n = node(&[
            ("Hostname", "node-a"),
            ("InternalIP", "192.168.1.10"),
            ("ExternalIP", "203.0.113.10"),
            ("InternalIP", "fd00:1::10"),
            ("InternalDNS", "node-a.local"),
        ]);
        let svc = web(json!({"type": "NodePort", "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}
        ]}));
        let t = run_on(std::slice::from_ref(&svc), &[], Some(&n), &settings());
        assert_eq!(
            frontends(&t, "default/web:http"),
            [
                (ip("10.96.0.10"), 80, Protocol::Tcp, Scope::Internal),
                (ip("192.168.1.10"), 30080, Protocol::Tcp, Scope::External),
                (ip("203.0.113.10"), 30080, Protocol::Tcp, Scope::External),
            ],
            "IPv6 node addresses are not used by an IPv4-only Service"
        );

        // nodePortAddresses CIDRs restrict the addresses.
        let mut s = settings();
        s.node_port_addresses = NodePortAddresses::parse(&["192.168.0.0/16".into()]).unwrap();
        let t = run_on(std::slice::from_ref(&svc), &[], Some(&n), &s);
        assert_eq!(
            frontends(&t, "default/web:http")[1..],
            [(ip("192.168.1.10"), 30080, Protocol::Tcp, Scope::External)]
        );
        // `primary`: the first InternalIP.
        s.node_port_addresses = NodePortAddresses::parse(&["primary".into()]).unwrap();
        let t = run_on(std::slice::from_ref(&svc), &[], Some(&n), &s);
        assert_eq!(
            frontends(&t, "default/web:http")[1..],
            [(ip("192.168.1.10"), 30080, Protocol::Tcp, Scope::External)]
        );
        // Without the Node object there is no address to listen on, the ClusterIP still works.
        let t = run_on(&[svc], &[], None, &settings());
        assert_eq!(frontends(&t, "default/web:http").len(), 1);
    }

    #[test]
    fn node_port_addresses_parsing() {
        assert_eq!(NodePortAddresses::parse(&[]), Ok(NodePortAddresses::All));
        assert!(NodePortAddresses::parse(&["primary".into(), "10.0.0.0/8".into()]).is_err());
        assert!(NodePortAddresses::parse(&["10.0.0.1".into()]).is_err());
    }

    #[test]
    fn load_balancer_ingress_ips_and_node_ports() {
        let n = node(&[("InternalIP", "192.168.1.10")]);
        let mut svc = web(json!({"type": "LoadBalancer", "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}
        ]}));
        svc["status"] = json!({"loadBalancer": {"ingress": [
            {"ip": "198.51.100.7"},
            {"hostname": "lb.example.com"},
            {"ip": "198.51.100.8", "ipMode": "Proxy"},
            {"ip": "198.51.100.9", "ipMode": "VIP"}
        ]}});
        let t = run_on(std::slice::from_ref(&svc), &[], Some(&n), &settings());
        assert!(t.rejections.is_empty(), "{:?}", t.rejections);
        assert_eq!(
            frontends(&t, "default/web:http"),
            [
                (ip("10.96.0.10"), 80, Protocol::Tcp, Scope::Internal),
                (ip("192.168.1.10"), 30080, Protocol::Tcp, Scope::External),
                (ip("198.51.100.7"), 80, Protocol::Tcp, Scope::External),
                (ip("198.51.100.9"), 80, Protocol::Tcp, Scope::External),
            ]
        );
        // allocateLoadBalancerNodePorts=false: no nodePort in the spec, no NodePort frontend.
        svc["spec"]["ports"][0]
            .as_object_mut()
            .unwrap()
            .remove("nodePort");
        let t = run_on(&[svc], &[], Some(&n), &settings());
        assert_eq!(frontends(&t, "default/web:http").len(), 3);
    }

    #[test]
    fn external_ips_are_external_frontends_of_any_type() {
        let t = run(&[web(json!({"externalIPs": ["203.0.113.5"]}))], &[]);
        assert_eq!(
            frontends(&t, "default/web:http"),
            [
                (ip("10.96.0.10"), 80, Protocol::Tcp, Scope::Internal),
                (ip("203.0.113.5"), 80, Protocol::Tcp, Scope::External),
            ]
        );
    }

    #[test]
    fn several_ports_named_and_unnamed_with_their_protocols() {
        let svc = web(json!({"ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"},
            {"name": "sig", "port": 3868, "protocol": "SCTP"},
        ]}));
        let unnamed = json!({
            "metadata": {"name": "plain", "namespace": "kube-system"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 8443}]}
        });
        let mut s = endpoints("web-1", "web", &[ready("10.1.0.1")]);
        s["ports"] = json!([
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
            {"name": "sig", "port": 3868, "protocol": "SCTP"}
        ]);
        let mut p = endpoints("plain-1", "plain", &[ready("10.1.0.9")]);
        p["metadata"]["namespace"] = json!("kube-system");
        p["ports"] = json!([{"port": 443, "protocol": "TCP"}]);
        let t = run(&[svc, unnamed], &[s, p]);
        assert!(t.rejections.is_empty(), "{:?}", t.rejections);
        let names: Vec<&str> = t.model.services.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "default/web:dns",
                "default/web:dns-tcp",
                "default/web:sig",
                "kube-system/plain:8443"
            ]
        );
        assert_eq!(
            frontends(&t, "default/web:dns")[0].2,
            Protocol::Udp,
            "protocol per port"
        );
        assert_eq!(frontends(&t, "default/web:sig")[0].2, Protocol::Sctp);
        assert_eq!(
            backend_addrs(&t, "default/web:dns"),
            [(ip("10.1.0.1"), 5353)]
        );
        assert_eq!(
            backend_addrs(&t, "default/web:dns-tcp"),
            [(ip("10.1.0.1"), 5354)]
        );
        assert_eq!(
            backend_addrs(&t, "kube-system/plain:8443"),
            [(ip("10.1.0.9"), 443)]
        );
    }

    #[test]
    fn a_named_target_port_resolves_per_slice() {
        // Two pods of one Service whose `http` container port differs: each slice says which.
        let svc = web(json!({"ports": [{"name": "http", "port": 80, "targetPort": "http"}]}));
        let a = endpoints("web-a", "web", &[ready("10.1.0.1")]);
        let mut b = endpoints("web-b", "web", &[ready("10.1.0.2")]);
        b["ports"] = json!([{"name": "http", "port": 9090, "protocol": "TCP"}]);
        let t = run(&[svc], &[a, b]);
        assert_eq!(
            backend_addrs(&t, "default/web:http"),
            [(ip("10.1.0.1"), 8080), (ip("10.1.0.2"), 9090)]
        );
    }

    #[test]
    fn a_slice_port_must_match_name_and_protocol() {
        let svc = web(json!({}));
        let mut s = endpoints("web-1", "web", &[ready("10.1.0.1")]);
        s["ports"] = json!([
            {"name": "metrics", "port": 9100, "protocol": "TCP"},
            {"name": "http", "port": 8080, "protocol": "UDP"}
        ]);
        let t = run(&[svc], &[s]);
        assert!(t.model.services["default/web:http"].backends.is_empty());
    }

    #[test]
    fn session_affinity_client_ip_with_and_without_timeout() {
        let t = run(&[web(json!({"sessionAffinity": "ClientIP"}))], &[]);
        assert_eq!(
            t.model.services["default/web:http"].affinity_timeout_s,
            Some(DEFAULT_AFFINITY_TIMEOUT_S)
        );
        let t = run(
            &[web(json!({
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}
            }))],
            &[],
        );
        assert_eq!(
            t.model.services["default/web:http"].affinity_timeout_s,
            Some(60)
        );
        let t = run(
            &[web(json!({
                "sessionAffinity": "None",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}
            }))],
            &[],
        );
        assert_eq!(
            t.model.services["default/web:http"].affinity_timeout_s,
            None
        );
        let t = run(
            &[web(json!({
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}
            }))],
            &[],
        );
        assert_eq!(t.rejections[0].reason, "bad_affinity_timeout");
    }

    #[test]
    fn traffic_policies_local_use_this_nodes_endpoints() {
        let n = node(&[("InternalIP", "192.168.1.10")]);
        let svc = web(json!({
            "type": "NodePort",
            "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]
        }));
        let s = endpoints(
            "web-1",
            "web",
            &[
                ("10.1.0.1", Some(true), Some(true), Some(false), "node-a"),
                ready("10.1.0.2"),
            ],
        );
        let t = run_on(&[svc], std::slice::from_ref(&s), Some(&n), &settings());
        let service = &t.model.services["default/web:http"];
        assert!(service.external_local && !service.internal_local);
        assert_eq!(
            service
                .backends
                .iter()
                .map(|b| b.node_local)
                .collect::<Vec<_>>(),
            [true, false]
        );
        let desired = plan::desired(&t.model);
        let backends_of = |addr: &str, port| {
            desired
                .iter()
                .find(|(k, _)| k.addr == ip(addr) && k.port == port)
                .unwrap()
                .1
                .backends
                .iter()
                .map(|b| b.addr)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            backends_of("10.96.0.10", 80),
            [ip("10.1.0.1"), ip("10.1.0.2")]
        );
        assert_eq!(backends_of("192.168.1.10", 30080), [ip("10.1.0.1")]);

        let t = run(&[web(json!({"internalTrafficPolicy": "Local"}))], &[s]);
        let service = &t.model.services["default/web:http"];
        assert!(service.internal_local && !service.external_local);
        assert_eq!(
            plan::desired(&t.model)
                .values()
                .next()
                .unwrap()
                .backends
                .len(),
            1
        );
    }

    #[test]
    fn health_check_node_port_counts_this_nodes_ready_endpoint_addresses() {
        let n = node(&[("InternalIP", "192.168.1.10")]);
        let lb = |policy: &str| {
            web(json!({
                "type": "LoadBalancer",
                "externalTrafficPolicy": policy,
                "healthCheckNodePort": 32000,
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                    {"name": "alt", "port": 81, "targetPort": 8080, "nodePort": 30081}
                ]
            }))
        };
        let mut slice = endpoints(
            "web-1",
            "web",
            &[
                ("10.1.0.1", Some(true), Some(true), Some(false), "node-a"),
                ("10.1.0.2", Some(true), Some(true), Some(false), "node-a"),
                // Terminating on this node: serving, but the probe must not count it.
                ("10.1.0.3", Some(false), Some(true), Some(true), "node-a"),
                ready("10.1.0.4"),
            ],
        );
        // Both service ports on the same pods: each pod is one endpoint, not two.
        slice["ports"] = json!([
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "alt", "port": 8080, "protocol": "TCP"}
        ]);
        let t = run_on(
            &[lb("Local")],
            std::slice::from_ref(&slice),
            Some(&n),
            &settings(),
        );
        assert_eq!(
            t.model.health_checks,
            BTreeMap::from([(
                32000,
                HealthCheckPort {
                    service: "default/web".into(),
                    addrs: vec![ip("192.168.1.10")],
                    local_endpoints: 2,
                }
            )])
        );
        // Only Local LoadBalancers have one (the API server allocates no other).
        let t = run_on(
            &[lb("Cluster")],
            std::slice::from_ref(&slice),
            Some(&n),
            &settings(),
        );
        assert!(t.model.health_checks.is_empty());
        let mut node_port = lb("Local");
        node_port["spec"]["type"] = json!("NodePort");
        let t = run_on(
            &[node_port],
            std::slice::from_ref(&slice),
            Some(&n),
            &settings(),
        );
        assert!(t.model.health_checks.is_empty());
        // No endpoint here: the port is still served, with nothing to count.
        let t = run_on(&[lb("Local")], &[], Some(&n), &settings());
        assert_eq!(t.model.health_checks[&32000].local_endpoints, 0);
    }

    #[test]
    fn a_health_check_node_port_in_use_is_reported_and_the_service_still_loads() {
        let n = node(&[("InternalIP", "192.168.1.10")]);
        let lb = |name: &str, ip: &str, node_port: u16| {
            let mut s = web(json!({
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "healthCheckNodePort": 32000,
                "clusterIP": ip,
                "clusterIPs": [ip],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": node_port}]
            }));
            s["metadata"]["name"] = json!(name);
            s
        };
        let t = run_on(
            &[lb("a", "10.96.0.1", 30001), lb("b", "10.96.0.2", 30002)],
            &[],
            Some(&n),
            &settings(),
        );
        assert_eq!(t.model.health_checks[&32000].service, "default/a");
        assert_eq!(t.rejections.len(), 1, "{:?}", t.rejections);
        assert_eq!(t.rejections[0].reason, "duplicate_health_check_node_port");
        assert!(t.model.services.contains_key("default/b:http"));
    }

    /// Node `node-a` in `zone` (if any), with one InternalIP.
    fn node_in_zone(zone: Option<&str>) -> Node {
        let mut n = node(&[("InternalIP", "192.168.1.10")]);
        if let Some(zone) = zone {
            n.metadata.labels = Some([(ZONE_LABEL.to_owned(), zone.to_owned())].into());
        }
        n
    }

    /// A slice of ready endpoints 10.1.0.1.. with the given hints: (zones, nodes) per endpoint.
    fn hinted_slice(hints: &[(&[&str], &[&str])]) -> serde_json::Value {
        let addrs: Vec<String> = (1..=hints.len()).map(|i| format!("10.1.0.{i}")).collect();
        let eps: Vec<Ep> = addrs.iter().map(|a| ready(a)).collect();
        let mut slice = endpoints("web-1", "web", &eps);
        for (i, (zones, nodes)) in hints.iter().enumerate() {
            let mut h = json!({});
            if !zones.is_empty() {
                h["forZones"] = zones.iter().map(|z| json!({"name": z})).collect();
            }
            if !nodes.is_empty() {
                h["forNodes"] = nodes.iter().map(|n| json!({"name": n})).collect();
            }
            slice["endpoints"][i]["hints"] = h;
        }
        slice
    }

    /// The backend addresses new flows to `frontend_port` may use.
    fn usable(t: &Translated, frontend_port: u16) -> Vec<IpAddr> {
        plan::desired(&t.model)
            .into_iter()
            .find(|(k, _)| k.port == frontend_port)
            .unwrap()
            .1
            .backends
            .iter()
            .map(|b| b.addr)
            .collect()
    }

    #[test]
    fn zone_hints_keep_cluster_traffic_in_this_nodes_zone() {
        let a: &[&str] = &["zone-a"];
        let b: &[&str] = &["zone-b"];
        let none: &[&str] = &[];
        let slice = hinted_slice(&[(a, none), (b, none), (a, none)]);
        let run_in = |zone: Option<&str>, slice: &serde_json::Value| {
            run_on(
                &[web(json!({}))],
                std::slice::from_ref(slice),
                Some(&node_in_zone(zone)),
                &settings(),
            )
        };
        let t = run_in(Some("zone-a"), &slice);
        assert_eq!(usable(&t, 80), [ip("10.1.0.1"), ip("10.1.0.3")]);
        assert_eq!(
            usable(&run_in(Some("zone-b"), &slice), 80),
            [ip("10.1.0.2")]
        );
        // Every endpoint stays when the hints cannot be used: no zone label on the node, no
        // endpoint for this zone, or a ready endpoint without hints.
        let all = [ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.3")];
        assert_eq!(usable(&run_in(None, &slice), 80), all);
        assert_eq!(usable(&run_in(Some("zone-c"), &slice), 80), all);
        let partly = hinted_slice(&[(a, none), (b, none), (none, none)]);
        assert_eq!(usable(&run_in(Some("zone-a"), &partly), 80), all);
    }

    #[test]
    fn node_hints_win_over_zone_hints() {
        let a: &[&str] = &["zone-a"];
        let slice = hinted_slice(&[(a, &["node-b"]), (a, &["node-a"]), (a, &["node-c"])]);
        let t = run_on(
            &[web(json!({}))],
            &[slice],
            Some(&node_in_zone(Some("zone-a"))),
            &settings(),
        );
        assert_eq!(usable(&t, 80), [ip("10.1.0.2")]);
    }

    #[test]
    fn topology_applies_to_cluster_wide_frontends_only_and_not_to_the_fallback() {
        let a: &[&str] = &["zone-a"];
        let b: &[&str] = &["zone-b"];
        let none: &[&str] = &[];
        // Endpoint 2 (zone-b) runs on this node; the node is in zone-a.
        let mut slice = hinted_slice(&[(a, none), (b, none)]);
        slice["endpoints"][1]["nodeName"] = json!("node-a");
        let svc = web(json!({
            "type": "NodePort",
            "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]
        }));
        let node = node_in_zone(Some("zone-a"));
        let t = run_on(
            std::slice::from_ref(&svc),
            std::slice::from_ref(&slice),
            Some(&node),
            &settings(),
        );
        assert_eq!(usable(&t, 80), [ip("10.1.0.1")], "ClusterIP: this zone");
        assert_eq!(
            usable(&t, 30080),
            [ip("10.1.0.2")],
            "Local NodePort: this node"
        );

        // No ready endpoint: the serving-terminating fallback ignores hints.
        for i in 0..2 {
            slice["endpoints"][i]["conditions"] =
                json!({"ready": false, "serving": true, "terminating": true});
        }
        let t = run_on(&[svc], &[slice], Some(&node), &settings());
        assert_eq!(usable(&t, 80), [ip("10.1.0.1"), ip("10.1.0.2")]);
    }

    #[test]
    fn terminating_endpoints_are_a_fallback_and_otherwise_drain() {
        let eps = [
            ready("10.1.0.1"),
            ("10.1.0.2", Some(false), Some(true), Some(true), "node-b"),
            ("10.1.0.3", Some(false), Some(false), Some(true), "node-b"),
            ("10.1.0.4", Some(false), Some(false), Some(false), "node-b"),
        ];
        let t = run(&[web(json!({}))], &[endpoints("web-1", "web", &eps)]);
        let s = &t.model.services["default/web:http"];
        assert_eq!(
            s.backends
                .iter()
                .map(|b| (b.ready, b.serving, b.terminating))
                .collect::<Vec<_>>(),
            [
                (true, true, false),
                (false, true, true),
                (false, false, true)
            ],
            "an endpoint neither ready nor terminating is left out"
        );
        let spec = plan::desired(&t.model).into_values().next().unwrap();
        assert_eq!(
            spec.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
            [ip("10.1.0.1")],
            "new flows only go to the ready endpoint"
        );
        assert_eq!(
            spec.draining.iter().map(|b| b.addr).collect::<Vec<_>>(),
            [ip("10.1.0.2"), ip("10.1.0.3")],
            "terminating endpoints keep their open flows"
        );

        // No ready endpoint left: serving-and-terminating ones take new flows.
        let t = run(&[web(json!({}))], &[endpoints("web-1", "web", &eps[1..])]);
        let spec = plan::desired(&t.model).into_values().next().unwrap();
        assert_eq!(
            spec.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
            [ip("10.1.0.2")]
        );
        assert_eq!(
            spec.draining.iter().map(|b| b.addr).collect::<Vec<_>>(),
            [ip("10.1.0.3")]
        );
    }

    #[test]
    fn unset_conditions_mean_ready() {
        let mut s = endpoints("web-1", "web", &[ready("10.1.0.1")]);
        s["endpoints"][0]
            .as_object_mut()
            .unwrap()
            .remove("conditions");
        let t = run(&[web(json!({}))], &[s]);
        let b = t.model.services["default/web:http"].backends[0];
        assert!(b.ready && b.serving && !b.terminating);
    }

    #[test]
    fn endpoints_merge_across_slices_without_duplicates() {
        let a = endpoints("web-1", "web", &[ready("10.1.0.1"), ready("10.1.0.2")]);
        let b = endpoints(
            "web-2",
            "web",
            &[
                ("10.1.0.2", Some(false), Some(false), Some(false), "node-b"),
                ready("10.1.0.3"),
            ],
        );
        let mut other_ns = endpoints("web-x", "web", &[ready("10.9.9.9")]);
        other_ns["metadata"]["namespace"] = json!("other");
        let mut unlabelled = endpoints("web-y", "web", &[ready("10.9.9.8")]);
        unlabelled["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("labels");
        let t = run(&[web(json!({}))], &[b, a, other_ns, unlabelled]);
        let s = &t.model.services["default/web:http"];
        assert_eq!(
            backend_addrs(&t, "default/web:http"),
            [
                (ip("10.1.0.1"), 8080),
                (ip("10.1.0.2"), 8080),
                (ip("10.1.0.3"), 8080)
            ]
        );
        assert!(s.backends[1].ready, "the ready view of a duplicate wins");
    }

    #[test]
    fn headless_external_name_and_other_proxies_services_are_ignored() {
        let headless = json!({
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}]}
        });
        let external = json!({
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]}
        });
        let mut other = web(json!({}));
        other["metadata"]["labels"] = json!({SERVICE_PROXY_NAME_LABEL: "other-proxy"});
        let t = run(
            &[headless, external, other],
            &[endpoints("db-1", "db", &[ready("10.1.0.1")])],
        );
        assert!(t.model.services.is_empty());
        assert!(t.rejections.is_empty());
    }

    #[test]
    fn a_type_change_changes_the_frontends() {
        let n = node(&[("InternalIP", "192.168.1.10")]);
        let np = web(json!({"type": "NodePort", "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}
        ]}));
        let t = run_on(std::slice::from_ref(&np), &[], Some(&n), &settings());
        assert_eq!(frontends(&t, "default/web:http").len(), 2);
        // Back to ClusterIP: Kubernetes clears the nodePort, and even if it lingered the type
        // decides.
        let mut cip = np.clone();
        cip["spec"]["type"] = json!("ClusterIP");
        let t = run_on(&[cip], &[], Some(&n), &settings());
        assert_eq!(frontends(&t, "default/web:http").len(), 1);
        // To ExternalName: gone.
        let mut ext = np;
        ext["spec"] = json!({"type": "ExternalName", "externalName": "example.com"});
        let t = run_on(&[ext], &[], Some(&n), &settings());
        assert!(t.model.services.is_empty());
    }

    #[test]
    fn scheduler_is_the_default_or_the_annotation() {
        let mut s = settings();
        s.default_scheduler = Scheduler::RoundRobin;
        let t = run_on(&[web(json!({}))], &[], None, &s);
        assert_eq!(
            t.model.services["default/web:http"].scheduler,
            Scheduler::RoundRobin
        );
        let mut svc = web(json!({}));
        svc["metadata"]["annotations"] = json!({SCHEDULER_ANNOTATION: "sh"});
        let t = run_on(std::slice::from_ref(&svc), &[], None, &s);
        assert_eq!(
            t.model.services["default/web:http"].scheduler,
            Scheduler::SourceHash
        );
        svc["metadata"]["annotations"] = json!({SCHEDULER_ANNOTATION: "fastest"});
        let t = run_on(&[svc], &[], None, &s);
        assert_eq!(t.rejections[0].reason, "bad_scheduler");
        assert!(t.model.services.is_empty());
    }

    #[test]
    fn a_bad_service_is_rejected_alone_and_whole() {
        let good = web(json!({}));
        let mut bad_ip = web(json!({"clusterIPs": ["10.96.0.300"], "clusterIP": "10.96.0.300"}));
        bad_ip["metadata"]["name"] = json!("bad-ip");
        // The second port is bad: the first must not load either.
        let mut bad_proto = web(json!({"clusterIPs": ["10.96.0.12"], "ports": [
            {"name": "ok", "port": 80},
            {"name": "bad", "port": 81, "protocol": "ICMP"}
        ]}));
        bad_proto["metadata"]["name"] = json!("bad-proto");
        let mut bad_port = web(json!({"clusterIPs": ["10.96.0.13"], "ports": [{"port": 70000}]}));
        bad_port["metadata"]["name"] = json!("bad-port");
        let mut bad_ext = web(json!({"clusterIPs": ["10.96.0.14"], "externalIPs": ["x"]}));
        bad_ext["metadata"]["name"] = json!("bad-ext");
        let mut bad_slice_svc = web(json!({"clusterIPs": ["10.96.0.15"]}));
        bad_slice_svc["metadata"]["name"] = json!("bad-slice");
        let bad_slice = endpoints("bad-slice-1", "bad-slice", &[ready("not-an-ip")]);
        let t = run(
            &[bad_ip, good, bad_proto, bad_port, bad_ext, bad_slice_svc],
            &[bad_slice],
        );
        let names: Vec<&str> = t.model.services.keys().map(String::as_str).collect();
        assert_eq!(names, ["default/web:http"]);
        let mut got: Vec<(String, &str)> = t
            .rejections
            .iter()
            .map(|r| (r.location.clone(), r.reason))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("service default/bad-ext".to_string(), "bad_ip"),
                ("service default/bad-ip".to_string(), "bad_ip"),
                ("service default/bad-port".to_string(), "bad_port"),
                ("service default/bad-proto".to_string(), "bad_protocol"),
                ("service default/bad-slice".to_string(), "bad_ip"),
            ]
        );
    }

    #[test]
    fn the_older_service_keeps_a_contested_frontend() {
        let mut old = web(json!({"externalIPs": ["203.0.113.5"]}));
        old["metadata"]["name"] = json!("zzz-old");
        old["metadata"]["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
        let mut new = web(json!({"clusterIPs": ["10.96.0.11"], "externalIPs": ["203.0.113.5"]}));
        new["metadata"]["name"] = json!("aaa-new");
        new["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
        let t = run(&[new, old], &[]);
        assert!(t.model.services.contains_key("default/zzz-old:http"));
        assert!(!t.model.services.contains_key("default/aaa-new:http"));
        assert_eq!(t.rejections.len(), 1);
        assert_eq!(t.rejections[0].reason, "duplicate_frontend");
        assert_eq!(t.rejections[0].location, "service default/aaa-new");
    }

    #[test]
    fn the_same_inputs_give_the_same_model() {
        let svcs = [web(json!({}))];
        let slices = [
            endpoints("web-2", "web", &[ready("10.1.0.2")]),
            endpoints("web-1", "web", &[ready("10.1.0.1")]),
        ];
        let mut reversed = slices.clone();
        reversed.reverse();
        assert_eq!(run(&svcs, &slices).model, run(&svcs, &reversed).model);
    }
}
