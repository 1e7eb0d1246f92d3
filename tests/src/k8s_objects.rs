//! Kubernetes objects for tests, as k8s-openapi types (built from the JSON a user would write, so
//! the fixtures read like manifests).

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};

/// A Service `default/<name>` from its `spec` (and optional `status`).
pub fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec
    }))
    .expect("a valid Service")
}

/// A NodePort Service `default/<name>` on `cluster_ip`: port 80 (named `http`, target 8080)
/// exposed on `node_port`.
pub fn node_port_service(name: &str, cluster_ip: &str, node_port: u16) -> Service {
    service(
        name,
        json!({
            "type": "NodePort",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": node_port}]
        }),
    )
}

/// An endpoint of an EndpointSlice.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub addr: &'a str,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: &'a str,
}

impl<'a> Endpoint<'a> {
    pub fn ready(addr: &'a str) -> Self {
        Self {
            addr,
            ready: true,
            serving: true,
            terminating: false,
            node: "node-b",
        }
    }

    /// A pod being deleted that still serves (ready=false, serving=true, terminating=true).
    pub fn terminating(addr: &'a str) -> Self {
        Self {
            ready: false,
            terminating: true,
            ..Self::ready(addr)
        }
    }
}

/// An IPv4 EndpointSlice `default/<name>` of Service `service`, port `http`/`port`.
pub fn endpoint_slice(
    name: &str,
    service: &str,
    port: u16,
    endpoints: &[Endpoint],
) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.addr],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": e.node
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "xlb-tests"}
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    }))
    .expect("a valid EndpointSlice")
}

/// A Node with one InternalIP.
pub fn node(name: &str, internal_ip: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"addresses": [
            {"type": "InternalIP", "address": internal_ip},
            {"type": "Hostname", "address": name}
        ]}
    }))
    .expect("a valid Node")
}
