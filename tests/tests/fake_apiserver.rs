//! The fake API server speaks real Kubernetes JSON: kubectl, a real Kubernetes client, lists the
//! three resources from it and the output parses back into k8s-openapi types. Also checks the
//! watch protocol the agent tests rely on (replay from a resourceVersion, 410 Gone), over raw
//! HTTP. Needs kubectl (fails loudly without it), not root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use xlb_tests::{
    agent::scratch_dir,
    fake_apiserver::{FakeApiServer, kubectl},
    k8s_objects::{Endpoint, endpoint_slice, node, node_port_service},
};

/// The items of `kubectl get -o json` output (a `v1 List`), as k8s-openapi objects.
fn items<K: serde::de::DeserializeOwned>(out: &str) -> Vec<K> {
    let list: serde_json::Value = serde_json::from_str(out).unwrap();
    assert_eq!(list["kind"], "List", "{out}");
    serde_json::from_value(list["items"].clone()).unwrap()
}

#[test]
fn kubectl_lists_services_endpointslices_and_nodes_from_the_fake() {
    let server = FakeApiServer::start().unwrap();
    server.apply(&node_port_service("web", "10.96.0.10", 30080));
    server.apply(&endpoint_slice(
        "web-abc",
        "web",
        8080,
        &[
            Endpoint::ready("10.1.0.1"),
            Endpoint::terminating("10.1.0.2"),
        ],
    ));
    server.apply(&node("node-a", "192.168.1.10"));
    let dir = scratch_dir();
    let kubeconfig = server.kubeconfig(&dir);

    let out = kubectl(&kubeconfig, &["get", "services", "-A", "-o", "json"]).unwrap();
    let services: Vec<Service> = items(&out);
    assert_eq!(services.len(), 1);
    let web = &services[0];
    assert_eq!(web.metadata.name.as_deref(), Some("web"));
    assert_eq!(web.metadata.namespace.as_deref(), Some("default"));
    assert!(web.metadata.resource_version.is_some());
    assert_eq!(
        web.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port,
        Some(30080)
    );

    let out = kubectl(&kubeconfig, &["get", "endpointslices", "-A", "-o", "json"]).unwrap();
    let slices: Vec<EndpointSlice> = items(&out);
    assert_eq!(slices.len(), 1);
    let conditions: Vec<_> = slices[0]
        .endpoints
        .iter()
        .map(|e| e.conditions.as_ref().unwrap().terminating)
        .collect();
    assert_eq!(conditions, [Some(false), Some(true)]);

    let out = kubectl(&kubeconfig, &["get", "nodes", "-o", "json"]).unwrap();
    let nodes: Vec<Node> = items(&out);
    assert_eq!(nodes[0].metadata.name.as_deref(), Some("node-a"));

    // A namespace and a field selector, as the agent's node watch uses.
    let out = kubectl(
        &kubeconfig,
        &[
            "get",
            "nodes",
            "--field-selector",
            "metadata.name=other",
            "-o",
            "json",
        ],
    )
    .unwrap();
    let nodes: Vec<Node> = items(&out);
    assert!(nodes.is_empty());
    let out = kubectl(
        &kubeconfig,
        &["get", "services", "-n", "kube-system", "-o", "json"],
    )
    .unwrap();
    let services: Vec<Service> = items(&out);
    assert!(services.is_empty());

    // The human table view works too (kubectl asks for it without -o).
    let out = kubectl(&kubeconfig, &["get", "services", "-A"]).unwrap();
    assert!(out.contains("web"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Opens a watch with a raw HTTP/1.1 request and returns a reader over its event lines.
fn raw_watch(server: &FakeApiServer, path_and_query: &str) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\r\n",
        server.addr
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    // Status line and headers.
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    reader
}

/// Next watch event from a chunked stream: skips the chunk-size lines.
fn next_event(reader: &mut BufReader<TcpStream>) -> serde_json::Value {
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "the watch ended");
        let line = line.trim();
        if line.starts_with('{') {
            return serde_json::from_str(line).unwrap();
        }
    }
}

#[test]
fn watches_replay_from_a_resource_version_and_expire_with_410() {
    let server = FakeApiServer::start().unwrap();
    let first = server.apply(&node_port_service("a", "10.96.0.1", 30001));
    server.apply(&node_port_service("b", "10.96.0.2", 30002));

    let mut watch = raw_watch(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={first}&allowWatchBookmarks=true"),
    );
    let event = next_event(&mut watch);
    assert_eq!(event["type"], "ADDED");
    assert_eq!(
        event["object"]["metadata"]["name"], "b",
        "only what came after rv {first}"
    );
    assert_eq!(event["object"]["kind"], "Service");

    server.delete::<Service>("default", "a");
    let event = next_event(&mut watch);
    assert_eq!(event["type"], "DELETED");
    assert_eq!(event["object"]["metadata"]["name"], "a");

    server.bookmark();
    let event = next_event(&mut watch);
    assert_eq!(event["type"], "BOOKMARK");
    assert_eq!(
        event["object"]["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );

    server.expire_watches();
    let event = next_event(&mut watch);
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");

    // An old resourceVersion is gone for good; a current one watches on.
    let mut old = raw_watch(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={first}"),
    );
    assert_eq!(next_event(&mut old)["object"]["code"], 410);
    let now = server.resource_version();
    let mut current = raw_watch(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={now}"),
    );
    server.apply(&node_port_service("c", "10.96.0.3", 30003));
    let event = next_event(&mut current);
    assert_eq!(event["type"], "ADDED");
    assert_eq!(event["object"]["metadata"]["name"], "c");
}
