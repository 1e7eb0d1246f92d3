//! End to end in Kubernetes mode: the agent runs on the LB namespace of the e2e topology and
//! watches the fake API server (inside that namespace, reached through a kubeconfig); a real
//! client sends real TCP to the ClusterIP and to the NodePort on the LB node's address, and real
//! servers in three backend namespaces answer. Needs root.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Service;
use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir},
    fake_apiserver::FakeApiServer,
    http,
    k8s_objects::{Endpoint, endpoint_slice, node, node_port_service, service},
    netns::require_privileges,
    topology::{LB_CLIENT_SIDE, TCP_PORT, Topology, VIP, backend_addr},
    traffic::{Reply, TcpClient, tally, tcp_once},
};

const NODE_PORT: u16 = 30080;
const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const NODE_PORT_ADDR: SocketAddrV4 = SocketAddrV4::new(LB_CLIENT_SIDE, NODE_PORT);

struct Setup {
    topo: Topology,
    server: FakeApiServer,
    agent: Agent,
    _bpffs: BpfFs,
}

fn addrs(backends: &[usize]) -> Vec<String> {
    backends
        .iter()
        .map(|&i| backend_addr(i).to_string())
        .collect()
}

/// The web Service's EndpointSlice: backends `ready` (0-based) ready, `terminating` terminating.
fn apply_slice(server: &FakeApiServer, ready: &[usize], terminating: &[usize]) -> u64 {
    let ready = addrs(ready);
    let terminating = addrs(terminating);
    let endpoints: Vec<Endpoint> = ready
        .iter()
        .map(|a| Endpoint::ready(a))
        .chain(terminating.iter().map(|a| Endpoint::terminating(a)))
        .collect();
    server.apply(&endpoint_slice("web-abcde", "web", TCP_PORT, &endpoints))
}

fn setup() -> Setup {
    require_privileges();
    let topo = Topology::new(3).unwrap();
    let bpffs = BpfFs::new("e2e-k8s").unwrap();
    let server = FakeApiServer::start_in(&topo.lb).unwrap();
    // The LB node's Node object: NodePorts listen on its InternalIP, the client-side address.
    server.apply(&node("node-a", &LB_CLIENT_SIDE.to_string()));
    server.apply(&node_port_service("web", &VIP.to_string(), NODE_PORT));
    let rv = apply_slice(&server, &[0, 1, 2], &[]);
    let kubeconfig = server.kubeconfig(&scratch_dir());
    let source = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        "node-a",
    ];
    let mut agent = topo.start_agent(&source, &bpffs.pin_dir()).unwrap();
    agent.wait_for_rv(rv).unwrap();
    Setup {
        topo,
        server,
        agent,
        _bpffs: bpffs,
    }
}

fn connections(s: &Setup, to: SocketAddrV4, n: usize) -> Vec<Reply> {
    s.topo
        .client
        .run(move || {
            (0..n)
                .map(|i| tcp_once(to).unwrap_or_else(|e| panic!("connection {i} to {to}: {e}")))
                .collect()
        })
        .unwrap()
}

fn backends_used(replies: &[Reply]) -> Vec<String> {
    tally(replies).into_keys().collect()
}

#[test]
fn cluster_ip_and_node_port_follow_the_endpoint_slices() {
    let mut s = setup();
    for to in [CLUSTER_IP, NODE_PORT_ADDR] {
        let replies = connections(&s, to, 60);
        assert_eq!(
            backends_used(&replies),
            ["b1", "b2", "b3"],
            "{to} spreads over every endpoint"
        );
    }

    // Scale down to b1 and b3: new connections follow.
    let rv = apply_slice(&s.server, &[0, 2], &[]);
    s.agent.wait_for_rv(rv).unwrap();
    for to in [CLUSTER_IP, NODE_PORT_ADDR] {
        assert_eq!(backends_used(&connections(&s, to, 40)), ["b1", "b3"]);
    }

    // Scale up again, then make b3 terminate while a connection to it is open: new flows avoid
    // it, the open one still finishes its requests on b3.
    let rv = apply_slice(&s.server, &[0, 1, 2], &[]);
    s.agent.wait_for_rv(rv).unwrap();
    let mut open = s
        .topo
        .client
        .run(|| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                assert!(Instant::now() < deadline, "no connection landed on b3");
                let mut c = TcpClient::connect(CLUSTER_IP).unwrap();
                if c.ask().unwrap().backend == "b3" {
                    return c;
                }
            }
        })
        .unwrap();
    let rv = apply_slice(&s.server, &[0, 1], &[2]);
    s.agent.wait_for_rv(rv).unwrap();
    assert_eq!(
        backends_used(&connections(&s, CLUSTER_IP, 40)),
        ["b1", "b2"]
    );
    let answer = s.topo.client.run(move || open.ask()).unwrap().unwrap();
    assert_eq!(
        answer.backend, "b3",
        "the open connection to the terminating endpoint finishes"
    );

    // Delete the Service: neither address answers any more.
    let rv = s.server.delete::<Service>("default", "web");
    s.agent.wait_for_rv(rv).unwrap();
    for to in [CLUSTER_IP, NODE_PORT_ADDR] {
        let r = s.topo.client.run(move || tcp_once(to)).unwrap();
        assert!(
            r.is_err(),
            "{to} still answers after the Service was deleted: {r:?}"
        );
    }
}

#[test]
fn traffic_keeps_flowing_while_the_api_server_is_away() {
    let mut s = setup();
    s.server
        .wait_for_watches(3, Duration::from_secs(60))
        .unwrap();
    let down = Instant::now();
    s.server.set_available(false);
    // A change the agent cannot see until the API server is back.
    let rv = apply_slice(&s.server, &[0], &[]);
    while down.elapsed() < Duration::from_secs(30) {
        for to in [CLUSTER_IP, NODE_PORT_ADDR] {
            let replies = connections(&s, to, 10);
            assert!(!replies.is_empty());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(
        backends_used(&connections(&s, CLUSTER_IP, 60)),
        ["b1", "b2", "b3"],
        "the last good state still serves"
    );
    s.server.set_available(true);
    s.agent.wait_for_rv(rv).unwrap();
    assert_eq!(backends_used(&connections(&s, NODE_PORT_ADDR, 30)), ["b1"]);
    assert!(s.agent.is_running());
}

/// A LoadBalancer Service with externalTrafficPolicy Local: the cloud load balancer probes its
/// healthCheckNodePort on every node, and the answer follows this node's ready endpoints.
#[test]
fn health_check_node_port_answers_for_this_nodes_endpoints() {
    const HEALTH_PORT: u16 = 32100;
    let mut s = setup();
    let probe = SocketAddr::from(SocketAddrV4::new(LB_CLIENT_SIDE, HEALTH_PORT));
    s.server.apply(&service(
        "shop",
        serde_json::json!({
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": HEALTH_PORT,
            "clusterIP": "10.96.0.20",
            "clusterIPs": ["10.96.0.20"],
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30090}]
        }),
    ));
    let on = |node| {
        let addrs = addrs(&[0, 1]);
        let endpoints: Vec<Endpoint> = addrs
            .iter()
            .map(|a| Endpoint {
                node,
                ..Endpoint::ready(a)
            })
            .collect();
        endpoint_slice("shop-abcde", "shop", TCP_PORT, &endpoints)
    };

    // Both endpoints on this node (node-a): 200, two local endpoints.
    let rv = s.server.apply(&on("node-a"));
    s.agent.wait_for_rv(rv).unwrap();
    let (status, body) = http::get(&s.topo.client, probe, "/healthz").unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["localEndpoints"], 2);
    assert_eq!(body["service"]["name"], "shop");
    assert_eq!(body["serviceProxyHealthy"], true);

    // The pods move to another node: this one must be taken out of the load balancer.
    let rv = s.server.apply(&on("node-b"));
    s.agent.wait_for_rv(rv).unwrap();
    let (status, body) = http::get(&s.topo.client, probe, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");

    // The Service goes, and its port closes.
    let rv = s.server.delete::<Service>("default", "shop");
    s.agent.wait_for_rv(rv).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http::get(&s.topo.client, probe, "/healthz").is_ok() {
        assert!(
            Instant::now() < deadline,
            "{probe} still answers after its Service was deleted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Topology-aware routing: once the Node carries a zone and the EndpointSlice hints, ClusterIP
/// traffic stays with the endpoints hinted for this node's zone.
#[test]
fn zone_hints_keep_cluster_ip_traffic_in_the_zone() {
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
    let mut s = setup();
    let mut this_node = node("node-a", &LB_CLIENT_SIDE.to_string());
    this_node
        .metadata
        .labels
        .get_or_insert_default()
        .insert("topology.kubernetes.io/zone".into(), "zone-a".into());
    s.server.apply(&this_node);
    let addrs = addrs(&[0, 1, 2]);
    let endpoints: Vec<Endpoint> = addrs.iter().map(|a| Endpoint::ready(a)).collect();
    let mut slice = endpoint_slice("web-abcde", "web", TCP_PORT, &endpoints);
    for (endpoint, zone) in slice
        .endpoints
        .iter_mut()
        .zip(["zone-a", "zone-b", "zone-a"])
    {
        endpoint.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone { name: zone.into() }]),
            ..Default::default()
        });
    }
    let rv = s.server.apply(&slice);
    s.agent.wait_for_rv(rv).unwrap();
    assert_eq!(
        backends_used(&connections(&s, CLUSTER_IP, 60)),
        ["b1", "b3"],
        "only zone-a's endpoints"
    );
}
