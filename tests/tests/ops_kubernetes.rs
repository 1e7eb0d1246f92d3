//! Kubernetes mode's operator view, against the fake API server: network-programming latency
//! from the EndpointSlice `endpoints.kubernetes.io/last-change-trigger-time` annotation (changes
//! made before the agent started are not its latency), per-service counters labelled with the
//! Service's model name, and the status with the resourceVersion applied.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use serde_json::Value;
use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir},
    fake_apiserver::FakeApiServer,
    http::{get, sample},
    k8s_objects::{Endpoint, endpoint_slice, node, node_port_service},
    netns::{Netns, require_privileges},
    ops::lb_agent,
};

const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn slice_changed_at(
    name: &str,
    service: &str,
    at: SystemTime,
) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let mut slice = endpoint_slice(name, service, 8080, &[Endpoint::ready("10.10.2.11")]);
    slice.metadata.annotations = Some(
        [(
            TRIGGER.to_owned(),
            humantime::format_rfc3339_nanos(at).to_string(),
        )]
        .into(),
    );
    slice
}

#[test]
fn network_programming_latency_follows_the_trigger_time_annotation() {
    require_privileges();
    let ns = Netns::new("k8sops").unwrap();
    ns.ip(&[
        "link", "add", "xlb0", "type", "veth", "peer", "name", "xlb1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "xlb0", "up"]).unwrap();
    let bpffs = BpfFs::new("k8sops").unwrap();
    let server = FakeApiServer::start_in(&ns).unwrap();
    server.apply(&node("node-a", "192.168.1.10"));
    // A Service whose slice changed long before the agent started.
    server.apply(&node_port_service("old", "10.96.0.20", 30081));
    server.apply(&slice_changed_at(
        "old-abcde",
        "old",
        SystemTime::now() - Duration::from_secs(3600),
    ));
    let dir = scratch_dir();
    let kubeconfig = server.kubeconfig(&dir);
    let status_file = dir.join("status.json");
    let pin_dir = bpffs.pin_dir();
    let listener: SocketAddr = "127.0.0.1:10249".parse().unwrap();
    let mut agent = Agent::start(
        &ns,
        &[
            "run",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            "node-a",
            "--iface",
            "xlb0",
            "--pin-dir",
            pin_dir.to_str().unwrap(),
            "--min-sync-period",
            "200ms",
            "--status-file",
            status_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    agent.wait_for_sync(1).unwrap();
    let metrics = || {
        let (code, body) = get(&ns, listener, "/metrics").unwrap();
        assert_eq!(code, 200);
        body
    };
    let count = |m: &str| sample(m, "xlb_network_programming_duration_seconds_count").unwrap();
    assert_eq!(
        count(&metrics()),
        0.0,
        "a change older than the agent is not its latency"
    );

    // A new Service whose endpoints changed 1.5 s ago: one observation, between 1.5 s and the
    // patience of this test. (The agent must have run longer than that, or the change predates
    // it.)
    std::thread::sleep(Duration::from_secs(2));
    // The Service first, seen by the agent, so the slice's sync is the one that programs it (the
    // watches deliver independently; a sync's rv is the highest seen on any of them).
    let rv = server.apply(&node_port_service("web", "10.96.0.10", 30080));
    agent.wait_for_rv(rv).unwrap();
    let rv = server.apply(&slice_changed_at(
        "web-abcde",
        "web",
        SystemTime::now() - Duration::from_millis(1500),
    ));
    agent.wait_for_rv(rv).unwrap();
    let m = metrics();
    assert_eq!(count(&m), 1.0, "{m}");
    assert_eq!(
        sample(
            &m,
            "xlb_network_programming_duration_seconds_bucket{le=\"1.5\"}"
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "xlb_network_programming_duration_seconds_bucket{le=\"300\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // Per-service counters carry the model's service name.
    assert!(
        m.contains("xlb_service_packets_total{service=\"default/web:http\",frontend=\"10.96.0.10:80/TCP\"} 0"),
        "{m}"
    );

    // The same slice again (no new trigger time): no new observation.
    let rv = server.apply(&node_port_service("web", "10.96.0.10", 30090));
    agent.wait_for_rv(rv).unwrap();
    assert_eq!(count(&metrics()), 1.0);

    let run = lb_agent(
        None,
        &[
            "status",
            "--json",
            "--status-file",
            status_file.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let status: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(status["source"], "kubernetes");
    assert_eq!(status["last_sync"]["resource_version"], rv.to_string());
    assert!(agent.stop().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
