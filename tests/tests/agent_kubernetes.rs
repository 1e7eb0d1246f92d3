//! The agent as a real process in Kubernetes mode, against the fake API server through a
//! kubeconfig: Services and EndpointSlices become pinned frontends and scheduler tables, scaling
//! and terminating endpoints follow, deletes remove, a 410 Gone relists, a cut watch reconnects,
//! and an API server outage keeps the last good state. Needs root (XDP, namespaces, bpffs).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Service;
use serde_json::json;
use xlb_tests::{
    agent::{Agent, BpfFs, PATIENCE, scratch_dir},
    fake_apiserver::{FakeApiServer, RecordedRequest, Resource},
    k8s_objects::{Endpoint, endpoint_slice, node, node_port_service, service},
    netns::{Netns, require_privileges},
    pinned::{self, BackendV4, FrontendV4},
};

const TCP: u8 = 6;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

/// A namespace with a veth pair to attach to, a bpffs, a fake API server inside the namespace
/// with this node's Node object, and a kubeconfig for it.
struct Cluster {
    ns: Netns,
    bpffs: BpfFs,
    server: FakeApiServer,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn new(tag: &str) -> Self {
        require_privileges();
        let ns = Netns::new(tag).unwrap();
        ns.ip(&[
            "link", "add", "xlb0", "type", "veth", "peer", "name", "xlb1",
        ])
        .unwrap();
        ns.ip(&["link", "set", "xlb0", "up"]).unwrap();
        ns.ip(&["link", "set", "xlb1", "up"]).unwrap();
        let bpffs = BpfFs::new(tag).unwrap();
        let server = FakeApiServer::start_in(&ns).unwrap();
        server.apply(&node("node-a", &NODE_IP.to_string()));
        let dir = scratch_dir();
        let kubeconfig = server.kubeconfig(&dir);
        Self {
            ns,
            bpffs,
            server,
            dir,
            kubeconfig,
        }
    }

    fn pin_dir(&self) -> PathBuf {
        self.bpffs.pin_dir()
    }

    fn start_agent(&self, extra: &[&str]) -> Agent {
        let pin_dir = self.pin_dir();
        let mut args = vec![
            "run",
            "--kubeconfig",
            self.kubeconfig.to_str().unwrap(),
            "--node-name",
            "node-a",
            "--iface",
            "xlb0",
            "--pin-dir",
            pin_dir.to_str().unwrap(),
            "--min-sync-period",
            "200ms",
        ];
        args.extend_from_slice(extra);
        Agent::start(&self.ns, &args).unwrap()
    }

    /// The web Service (ClusterIP 10.96.0.10:80, NodePort 30080) with `endpoints` on 8080.
    fn apply_web(&self, endpoints: &[Endpoint]) -> u64 {
        self.server
            .apply(&node_port_service("web", &CLUSTER_IP.to_string(), 30080));
        self.scale_web(endpoints)
    }

    fn scale_web(&self, endpoints: &[Endpoint]) -> u64 {
        self.server
            .apply(&endpoint_slice("web-abcde", "web", 8080, endpoints))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn backends(addrs: &[&str]) -> BTreeSet<BackendV4> {
    addrs.iter().map(|a| (a.parse().unwrap(), 8080)).collect()
}

/// What the web Service's two frontends should route to.
fn web_routes(addrs: &[&str]) -> BTreeMap<FrontendV4, BTreeSet<BackendV4>> {
    BTreeMap::from([
        ((CLUSTER_IP, 80, TCP), backends(addrs)),
        ((NODE_IP, 30080, TCP), backends(addrs)),
    ])
}

/// GET http://127.0.0.1:10249/healthz from inside the namespace; the status line.
fn healthz(ns: &Netns) -> String {
    ns.run(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:10249").unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines().next().unwrap_or_default().to_owned()
    })
    .unwrap()
}

fn requests_since(
    server: &FakeApiServer,
    since: Instant,
    f: impl Fn(&RecordedRequest) -> bool,
) -> Vec<RecordedRequest> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.at >= since && f(r))
        .collect()
}

#[test]
fn kubernetes_agent_follows_services_and_endpoint_slices() {
    let c = Cluster::new("k8s-follow");
    let rv = c.apply_web(&[Endpoint::ready("10.1.0.1"), Endpoint::ready("10.1.0.2")]);
    let config = c.dir.join("kube-proxy.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
ipvs:
  scheduler: rr
  strictARP: true
  minSyncPeriod: 200ms
conntrack:
  maxPerCore: 0
",
    )
    .unwrap();
    let mut agent = c.start_agent(&["--config", config.to_str().unwrap()]);
    agent
        .wait_for(&[
            "kube-proxy configuration fields ignored",
            "fields=conntrack,ipvs.strictARP",
        ])
        .unwrap();

    let line = agent.wait_for_rv(rv).unwrap();
    assert!(
        line.contains("source=kubernetes services=1 backends=2 generation=1"),
        "{line}"
    );
    let pin = c.pin_dir();
    assert_eq!(pinned::routes(&pin), web_routes(&["10.1.0.1", "10.1.0.2"]));
    let (value, _) = pinned::frontends(&pin)[&(CLUSTER_IP, 80, TCP)];
    assert_eq!(
        value.scheduler,
        lb_common::Scheduler::RoundRobin as u8,
        "ipvs.scheduler of the KubeProxyConfiguration"
    );
    assert!(
        healthz(&c.ns).contains("200"),
        "/healthz answers 200 after a sync"
    );

    // Scale up: the tables follow.
    let rv = c.scale_web(&[
        Endpoint::ready("10.1.0.1"),
        Endpoint::ready("10.1.0.2"),
        Endpoint::ready("10.1.0.3"),
    ]);
    let line = agent.wait_for_rv(rv).unwrap();
    assert!(line.contains("backends=3"), "{line}");
    assert_eq!(
        pinned::routes(&pin),
        web_routes(&["10.1.0.1", "10.1.0.2", "10.1.0.3"])
    );

    // One endpoint terminates: no new flows to it, but it is not flushed (it stays a backend,
    // draining, so its open flows keep their state).
    let rv = c.scale_web(&[
        Endpoint::ready("10.1.0.1"),
        Endpoint::terminating("10.1.0.2"),
        Endpoint::ready("10.1.0.3"),
    ]);
    agent.wait_for_rv(rv).unwrap();
    assert_eq!(pinned::routes(&pin), web_routes(&["10.1.0.1", "10.1.0.3"]));
    assert!(
        pinned::active_backends(&pin).contains(&("10.1.0.2".parse().unwrap(), 8080)),
        "the terminating endpoint is kept as a draining backend"
    );

    // Only terminating endpoints left: they take new flows rather than none.
    let rv = c.scale_web(&[Endpoint::terminating("10.1.0.2")]);
    agent.wait_for_rv(rv).unwrap();
    assert_eq!(pinned::routes(&pin), web_routes(&["10.1.0.2"]));

    // A second Service that cannot be translated is rejected alone.
    let mut bad = node_port_service("bad", "10.96.0.11", 30081);
    bad.metadata.annotations = Some([("xlb.io/scheduler".into(), "fastest".into())].into());
    let rv = c.server.apply(&bad);
    agent.wait_for_rv(rv).unwrap();
    agent
        .wait_for(&["rejected", "service default/bad", "bad_scheduler"])
        .unwrap();
    assert_eq!(pinned::routes(&pin), web_routes(&["10.1.0.2"]));

    // Type change NodePort -> ClusterIP: the NodePort frontend goes.
    let rv = c.server.apply(&service(
        "web",
        json!({
            "type": "ClusterIP",
            "clusterIP": CLUSTER_IP.to_string(),
            "clusterIPs": [CLUSTER_IP.to_string()],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
        }),
    ));
    agent.wait_for_rv(rv).unwrap();
    assert_eq!(
        pinned::routes(&pin),
        BTreeMap::from([((CLUSTER_IP, 80, TCP), backends(&["10.1.0.2"]))])
    );

    // Delete the Service: its frontend is removed.
    let rv = c.server.delete::<Service>("default", "web");
    let line = agent.wait_for_rv(rv).unwrap();
    assert!(line.contains("services=0"), "{line}");
    assert!(pinned::routes(&pin).is_empty());

    assert_eq!(
        agent.log().matches("service default/bad").count(),
        1,
        "a rejected object is reported once, not on every change:\n{}",
        agent.log()
    );
    assert!(agent.stop().unwrap().success());
}

#[test]
fn kubernetes_agent_relists_after_410_and_resumes_cut_watches() {
    let c = Cluster::new("k8s-relist");
    let rv = c.apply_web(&[Endpoint::ready("10.1.0.1")]);
    let mut agent = c.start_agent(&[]);
    agent.wait_for_rv(rv).unwrap();
    c.server.wait_for_watches(3, PATIENCE).unwrap();
    let pin = c.pin_dir();

    // Cut every watch mid-stream: the agent watches again (from where it was, no relist needed)
    // and sees the next change.
    let cut = Instant::now();
    c.server.drop_watches();
    c.server.wait_for_watches(3, PATIENCE).unwrap();
    let rewatched = requests_since(&c.server, cut, RecordedRequest::is_watch);
    for resource in [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
    ] {
        assert!(
            rewatched.iter().any(|r| r.resource() == Some(resource)),
            "{resource:?} is watched again: {rewatched:?}"
        );
    }
    let rv = c.scale_web(&[Endpoint::ready("10.1.0.1"), Endpoint::ready("10.1.0.2")]);
    agent.wait_for_rv(rv).unwrap();
    assert_eq!(pinned::routes(&pin), web_routes(&["10.1.0.1", "10.1.0.2"]));

    // A change no watch sees, then 410 Gone on every watch: only a relist finds it.
    let expired = Instant::now();
    let rv = c.server.apply_unseen(&endpoint_slice(
        "web-abcde",
        "web",
        8080,
        &[Endpoint::ready("10.1.0.3")],
    ));
    c.server.expire_watches();
    agent.wait_for_rv(rv).unwrap();
    assert_eq!(pinned::routes(&pin), web_routes(&["10.1.0.3"]));
    let relists = requests_since(&c.server, expired, |r| !r.is_watch() && !r.refused);
    assert!(
        relists
            .iter()
            .any(|r| r.resource() == Some(Resource::EndpointSlices)),
        "410 Gone makes the agent list again: {relists:?}"
    );

    // The same with a slow API server: until the relist completes, the old state stays.
    c.server.set_delay(Duration::from_secs(2));
    let rv = c.server.apply_unseen(&endpoint_slice(
        "web-abcde",
        "web",
        8080,
        &[Endpoint::ready("10.1.0.4"), Endpoint::ready("10.1.0.5")],
    ));
    c.server.expire_watches();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        pinned::routes(&pin),
        web_routes(&["10.1.0.3"]),
        "a relist in progress does not empty the tables"
    );
    agent.wait_for_rv(rv).unwrap();
    assert_eq!(pinned::routes(&pin), web_routes(&["10.1.0.4", "10.1.0.5"]));
    c.server.set_delay(Duration::ZERO);
    assert!(agent.stop().unwrap().success());
}

#[test]
fn kubernetes_agent_keeps_the_last_good_state_while_the_api_server_is_away() {
    let c = Cluster::new("k8s-outage");
    let rv = c.apply_web(&[Endpoint::ready("10.1.0.1"), Endpoint::ready("10.1.0.2")]);
    // A short syncPeriod so that several full resyncs run during the outage.
    let mut agent = c.start_agent(&["--sync-period", "2s"]);
    agent.wait_for_rv(rv).unwrap();
    c.server.wait_for_watches(3, PATIENCE).unwrap();
    let pin = c.pin_dir();
    let good = web_routes(&["10.1.0.1", "10.1.0.2"]);
    assert_eq!(pinned::routes(&pin), good);

    let outage = Duration::from_secs(30);
    let down = Instant::now();
    c.server.set_available(false);
    // Changes made while the agent cannot see them; it must pick them up afterwards.
    let rv = c.scale_web(&[Endpoint::ready("10.1.0.7")]);
    while down.elapsed() < outage {
        assert_eq!(
            pinned::routes(&pin),
            good,
            "the dataplane keeps the last good state during the outage"
        );
        assert!(
            agent.is_running(),
            "the agent keeps running:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    agent
        .wait_for(&["watch failed, retrying (the dataplane keeps the last good state)"])
        .unwrap();
    // Reconnect attempts kept coming through the outage: with the 1 s backoff cap each watch
    // retries about 30 times in 30 s; kube-rs's default backoff (up to 30 s) would give ~6.
    let attempts = requests_since(&c.server, down, |r| r.refused);
    for resource in [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
    ] {
        let n = attempts
            .iter()
            .filter(|r| r.resource() == Some(resource))
            .count();
        assert!(
            n >= 12,
            "{resource:?}: only {n} reconnect attempts in {outage:?}: {attempts:?}"
        );
    }

    c.server.set_available(true);
    agent.wait_for_rv(rv).unwrap();
    assert_eq!(pinned::routes(&pin), web_routes(&["10.1.0.7"]));
    assert!(healthz(&c.ns).contains("200"));
    assert!(agent.stop().unwrap().success());
}
