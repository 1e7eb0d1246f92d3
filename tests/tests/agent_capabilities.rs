//! The DaemonSet's capabilities are enough: the agent, started with exactly the capabilities
//! deploy/kubernetes/daemonset.yaml grants (and no others, bounding set included), loads the
//! program, attaches, syncs from the (fake) cluster, and a second agent takes the pinned link
//! over, as in a rolling update. Needs root (to create the namespace and drop to those
//! capabilities) and setpriv (util-linux).

use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir},
    fake_apiserver::FakeApiServer,
    k8s_objects::{Endpoint, endpoint_slice, node, node_port_service},
    netns::{Netns, require_privileges},
};

/// `+bpf,+perfmon,+net_admin` from the DaemonSet's `capabilities.add`.
fn daemonset_capabilities() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml");
    let ds: DaemonSet = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let caps = pod.containers[0]
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap()
        .add
        .clone()
        .unwrap();
    caps.iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn the_daemonset_capabilities_are_enough_for_the_agent() {
    require_privileges();
    let caps = daemonset_capabilities();
    assert!(!caps.contains("sys_admin"), "{caps}");
    let ns = Netns::new("caps").unwrap();
    ns.ip(&[
        "link", "add", "xlb0", "type", "veth", "peer", "name", "xlb1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "xlb0", "up"]).unwrap();
    let bpffs = BpfFs::new("caps").unwrap();
    let server = FakeApiServer::start_in(&ns).unwrap();
    server.apply(&node("node-a", "192.168.1.10"));
    server.apply(&node_port_service("web", "10.96.0.10", 30080));
    let rv = server.apply(&endpoint_slice(
        "web-1",
        "web",
        8080,
        &[Endpoint::ready("10.1.0.1")],
    ));
    let dir = scratch_dir();
    let kubeconfig = server.kubeconfig(&dir);
    let pin_dir = bpffs.pin_dir();
    let drop_to = [
        "setpriv",
        &format!("--inh-caps=-all,{caps}"),
        &format!("--ambient-caps=-all,{caps}"),
        &format!("--bounding-set=-all,{caps}"),
        "--",
    ]
    .map(str::to_owned);
    let args = [
        "run",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        "node-a",
        "--iface",
        "xlb0",
        "--pin-dir",
        pin_dir.to_str().unwrap(),
        "--on-exit",
        "keep",
    ];
    let wrapper: Vec<&str> = drop_to.iter().map(String::as_str).collect();
    let mut agent = Agent::start_wrapped(&ns, &wrapper, &args).unwrap();
    agent.wait_for_rv(rv).unwrap();
    // The agent really ran with only these capabilities (CapEff of its process).
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    assert_eq!(
        effective,
        1 << CAP_NET_ADMIN | 1 << CAP_PERFMON | 1 << CAP_BPF,
        "{status}"
    );
    assert!(agent.stop().unwrap().success());

    let mut agent = Agent::start_wrapped(&ns, &wrapper, &args).unwrap();
    agent.wait_for(&["took over the pinned XDP link"]).unwrap();
    agent.wait_for_rv(rv).unwrap();
    assert!(agent.stop().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
