//! What an operator sees of a running agent, checked against the traffic sent: `/metrics` (exact
//! packet, byte, flow and conntrack deltas for UDP requests, the sync and network-programming
//! histograms, rejections, the dataplane), `/healthz`, `/status` and `lb-agent status`,
//! `lb-agent inspect` in both forms, and every pinned map as `bpftool -j map dump` shows it, with
//! field names from BTF.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    path::Path,
};

use lb_common::{hash::MAGLEV_TABLE_SIZE, maps};
use serde_json::Value;
use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir},
    http::{get, sample},
    netns::{Netns, require_privileges, sh},
    ops::lb_agent,
    topology::{LB_IFACES, Topology, VIP, backend_addr},
    traffic::{TcpClient, udp_ask},
};

const ECHO: SocketAddrV4 = SocketAddrV4::new(VIP, 53);
const LISTENER: &str = "127.0.0.1:10249";

fn services(web_backends: usize) -> String {
    let web: String = (0..web_backends)
        .map(|i| format!("      - {{ip: {}, port: 8080}}\n", backend_addr(i)))
        .collect();
    let udp: String = (0..3)
        .map(|i| format!("      - {{ip: {}, port: 5353}}\n", backend_addr(i)))
        .collect();
    format!(
        "services:
  - name: web
    vip: {VIP}
    port: 80
    backends:
{web}  - name: echo-udp
    vip: {VIP}
    port: 53
    protocol: UDP
    backends:
{udp}  - name: sticky
    vip: {VIP}
    port: 81
    scheduler: rr
    sessionAffinity: {{clientIP: {{timeoutSeconds: 300}}}}
    backends:
      - {{ip: {b1}, port: 8080}}
  - name: drain
    vip: {VIP}
    port: 82
    backends:
      - {{ip: {b1}, port: 8080}}
      - {{ip: {b3}, port: 8080, terminating: true}}
  - name: broken
    vip: 10.96.0.300
    port: 80
",
        b1 = backend_addr(0),
        b3 = backend_addr(2),
    )
}

fn scrape(ns: &Netns) -> String {
    let (status, body) = get(ns, LISTENER.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

fn value(metrics: &str, series: &str) -> f64 {
    sample(metrics, series).unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
}

const UDP_SERIES: &str = "{service=\"echo-udp\",frontend=\"10.96.0.10:53/UDP\"}";

/// Field names of a struct as bpftool formats it.
fn fields(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a struct: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `bpftool -j map dump pinned <map>`: the formatted (BTF) entries.
fn bpftool_dump(pin_dir: &Path, map: &str) -> Vec<Value> {
    let out = sh(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        pin_dir.join(map).to_str().unwrap(),
    ])
    .unwrap();
    let entries: Vec<Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{map}: {e}: {out}"));
    entries
        .into_iter()
        .map(|e| {
            e.get("formatted")
                .cloned()
                .unwrap_or_else(|| panic!("{map}: bpftool printed no BTF-formatted entry: {e}"))
        })
        .collect()
}

/// The value of a formatted entry; per-CPU maps give one per CPU, the first is taken.
fn entry_value(e: &Value) -> &Value {
    match e.get("values") {
        Some(per_cpu) => &per_cpu[0]["value"],
        None => &e["value"],
    }
}

/// A map, its key's field names (`None`: an array index) and its value's (empty: a plain
/// integer).
type MapFields<'a> = (&'a str, Option<&'a [&'a str]>, &'a [&'a str]);

fn check_bpftool_field_names(pin_dir: &Path) {
    let global_fields = lb_common::GlobalStats::default().fields().map(|(n, _)| n);
    let expect: [MapFields; 12] = [
        (
            maps::SERVICES,
            Some(&["addr", "port", "proto", "family"]),
            &[
                "id",
                "table_id",
                "backend_count",
                "affinity_timeout_s",
                "flags",
                "scheduler",
                "_pad",
            ],
        ),
        (
            maps::BACKENDS,
            None,
            &["addr", "port", "family", "flags", "weight"],
        ),
        (maps::SCHED_TABLES, None, &["len", "backend_ids"]),
        (
            maps::CONNTRACK,
            Some(&[
                "src_addr", "dst_addr", "src_port", "dst_port", "proto", "family", "_pad",
            ]),
            &[
                "last_seen_ns",
                "nat_addr",
                "nat_port",
                "flags",
                "backend_id",
                "service_id",
                "_pad",
            ],
        ),
        (
            maps::SERVICE_STATS,
            None,
            &["packets", "bytes", "new_flows", "no_backend"],
        ),
        (maps::GLOBAL_STATS, None, &global_fields),
        (
            maps::CONFIG,
            None,
            &[
                "layout_version",
                "flags",
                "tcp_timeout_s",
                "tcp_closing_timeout_s",
                "udp_timeout_s",
                "_pad",
            ],
        ),
        (
            maps::VIPS,
            Some(&["addr", "family", "_pad0", "_pad1"]),
            &["frontends"],
        ),
        (
            maps::AFFINITY,
            Some(&["client_addr", "service_id", "family", "_pad0", "_pad1"]),
            &["last_seen_ns", "backend_id", "_pad"],
        ),
        (maps::RR_CURSOR, None, &[]),
        (maps::BACKEND_CONNS, None, &[]),
        (
            maps::DRAINING,
            Some(&["service_id", "backend_id"]),
            &["weight"],
        ),
    ];
    assert_eq!(
        expect.iter().map(|e| e.0).collect::<BTreeSet<_>>(),
        maps::ALL.iter().copied().collect::<BTreeSet<_>>(),
        "every map is checked"
    );
    for (map, key_fields, value_fields) in expect {
        let entries = bpftool_dump(pin_dir, map);
        assert!(!entries.is_empty(), "{map} has entries in this scenario");
        for e in &entries {
            match key_fields {
                Some(k) => assert_eq!(fields(&e["key"]), names(k), "{map} key"),
                // Arrays: the key is the index.
                None => assert!(e["key"].is_u64(), "{map} key: {e}"),
            }
            let v = entry_value(e);
            if value_fields.is_empty() {
                assert!(v.is_u64(), "{map} value is a plain integer: {e}");
            } else {
                assert_eq!(fields(v), names(value_fields), "{map} value");
            }
        }
    }
    // Values as numbers: the config's timeouts in host order.
    let config = &bpftool_dump(pin_dir, maps::CONFIG)[0]["value"];
    assert_eq!(config["layout_version"], lb_common::LAYOUT_VERSION);
    assert_eq!(config["udp_timeout_s"], 120);
}

#[test]
fn metrics_status_inspect_and_bpftool_show_what_the_traffic_did() {
    require_privileges();
    let topo = Topology::new(3).unwrap();
    let bpffs = BpfFs::new("observe").unwrap();
    let pin_dir = bpffs.pin_dir();
    let dir = scratch_dir();
    let file = dir.join("services.yaml");
    std::fs::write(&file, services(3)).unwrap();
    let status_file = dir.join("status.json");
    let status_arg = status_file.to_str().unwrap();
    let pin_arg = pin_dir.to_str().unwrap();
    let mut agent = Agent::start(
        &topo.lb,
        &[
            "run",
            "--services",
            file.to_str().unwrap(),
            "--iface",
            LB_IFACES,
            "--pin-dir",
            pin_arg,
            "--min-sync-period",
            "100ms",
            "--status-file",
            status_arg,
            "--metrics-bind-address",
            LISTENER,
            // Small maps, so bpftool dumps of the arrays stay small.
            "--max-services",
            "32",
            "--max-backends",
            "32",
            "--conntrack-max",
            "1024",
        ],
    )
    .unwrap();
    agent.wait_for_sync(1).unwrap();
    let listener: SocketAddr = LISTENER.parse().unwrap();

    // Warm up every path, and leave one affinity pin and one open connection on a draining
    // frontend's ready backend.
    let _open = topo
        .client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(ECHO).unwrap();
            udp_ask(&s, 5).unwrap();
            let mut sticky = TcpClient::connect(SocketAddrV4::new(VIP, 81)).unwrap();
            sticky.ask().unwrap();
            let mut drain = TcpClient::connect(SocketAddrV4::new(VIP, 82)).unwrap();
            drain.ask().unwrap();
            (sticky, drain)
        })
        .unwrap();

    // Health and status.
    let (code, body) = get(&topo.lb, listener, "/healthz").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = get(&topo.lb, listener, "/status").unwrap();
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["pid"], agent.pid());
    assert_eq!(status["dataplane"]["mode"], "xdp");

    let run = lb_agent(None, &["status", "--status-file", status_arg]);
    assert_eq!(run.code, 0, "{run:?}");
    for expected in [
        format!("agent:      running (pid {}", agent.pid()),
        "health:     ok".into(),
        "dataplane:  xdp (XDP attached on lbc,lbb), default scheduler mh".into(),
        "model:      4 services, 4 frontends, 9 backends".into(),
        "rejected:   1".into(),
        "  services[4] \"broken\" [bad_ip]".into(),
        "10.96.0.10:82/TCP  drain     mh     1         1".into(),
    ] {
        assert!(
            run.stdout.contains(&expected),
            "missing {expected:?}:\n{}",
            run.stdout
        );
    }
    let run = lb_agent(None, &["status", "--json", "--status-file", status_arg]);
    assert_eq!(run.code, 0, "{run:?}");
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["running"], true);
    assert_eq!(json["healthy"], true);
    assert_eq!(json["dataplane"]["default_scheduler"], "mh");
    assert_eq!(json["last_sync"]["ok"], true);
    assert_eq!(json["services"], 4);
    assert_eq!(json["rejections"][0]["reason"], "bad_ip");

    // Metrics move exactly with 10 UDP requests on 10 fresh sockets (10 new flows).
    let before = scrape(&topo.lb);
    assert_eq!(
        value(
            &before,
            "xlb_dataplane_info{mode=\"xdp\",reason=\"XDP attached on lbc,lbb\"}"
        ),
        1.0
    );
    assert_eq!(value(&before, "xlb_conntrack_capacity"), 1024.0);
    assert_eq!(
        value(&before, "xlb_rejected_objects_total{reason=\"bad_ip\"}"),
        1.0
    );
    assert_eq!(value(&before, "xlb_frontends"), 4.0);
    assert_eq!(
        value(&before, "xlb_network_programming_duration_seconds_count"),
        0.0,
        "the file predates the agent: not a latency of this agent"
    );
    let answered = topo
        .client
        .run(|| {
            (0..10)
                .filter(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.connect(ECHO).unwrap();
                    udp_ask(&s, 1).is_ok()
                })
                .count()
        })
        .unwrap();
    assert_eq!(answered, 10);
    let after = scrape(&topo.lb);
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        delta(&format!("xlb_service_packets_total{UDP_SERIES}")),
        10.0
    );
    // Ethernet 14 + IPv4 20 + UDP 8 + "hello" 5.
    assert_eq!(
        delta(&format!("xlb_service_bytes_total{UDP_SERIES}")),
        470.0
    );
    assert_eq!(
        delta(&format!("xlb_service_new_flows_total{UDP_SERIES}")),
        10.0
    );
    assert_eq!(
        delta(&format!("xlb_service_no_backend_packets_total{UDP_SERIES}")),
        0.0
    );
    assert_eq!(delta("xlb_xdp_ct_misses_total"), 10.0);
    assert_eq!(delta("xlb_xdp_reverse_nat_total"), 10.0);
    assert_eq!(delta("xlb_conntrack_entries"), 20.0, "two entries per flow");
    assert!(delta("xlb_xdp_packets_total") >= 20.0);

    // A change to the file: one more sync, one network-programming latency observed.
    let syncs = value(&after, "xlb_sync_proxy_rules_duration_seconds_count");
    std::fs::write(&file, services(2)).unwrap();
    agent.wait_for_sync(2).unwrap();
    let changed = scrape(&topo.lb);
    assert_eq!(
        value(&changed, "xlb_network_programming_duration_seconds_count"),
        1.0
    );
    assert!(value(&changed, "xlb_sync_proxy_rules_duration_seconds_count") > syncs);
    assert!(value(&changed, "xlb_syncs_total{outcome=\"ok\"}") >= 2.0);
    assert_eq!(value(&changed, "xlb_backends"), 8.0);
    assert!(changed.contains("# TYPE xlb_network_programming_duration_seconds histogram"));

    // inspect services, as a table and as JSON.
    let run = lb_agent(
        None,
        &[
            "inspect",
            "services",
            "--pin-dir",
            pin_arg,
            "--status-file",
            status_arg,
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        "\
FRONTEND           SERVICE   ID  SCHED  FLAGS           BACKENDS                                         DRAINING
10.96.0.10:53/UDP  echo-udp  1   mh     -               10.10.2.11:5353,10.10.2.12:5353,10.10.2.13:5353  -
10.96.0.10:80/TCP  web       2   mh     -               10.10.2.11:8080,10.10.2.12:8080                  -
10.96.0.10:81/TCP  sticky    3   rr     affinity(300s)  10.10.2.11:8080                                  -
10.96.0.10:82/TCP  drain     4   mh     -               10.10.2.11:8080                                  10.10.2.13:8080
"
    );

    let run = lb_agent(
        None,
        &[
            "inspect",
            "services",
            "--json",
            "--pin-dir",
            pin_arg,
            "--status-file",
            status_arg,
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let rows: Vec<Value> = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(rows.len(), 4);
    let by_frontend = |f: &str| rows.iter().find(|r| r["frontend"] == f).unwrap().clone();
    let web = by_frontend("10.96.0.10:80/TCP");
    assert_eq!(web["service"], "web");
    assert_eq!(web["scheduler"], "mh");
    assert_eq!(web["port"], 80);
    assert_eq!(web["protocol"], "TCP");
    let slots: u64 = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["slots"].as_u64().unwrap())
        .sum();
    assert_eq!(slots, u64::from(MAGLEV_TABLE_SIZE), "a full Maglev table");
    assert_eq!(web["backends"].as_array().unwrap().len(), 2);
    let sticky = by_frontend("10.96.0.10:81/TCP");
    assert_eq!(sticky["flags"], serde_json::json!(["affinity"]));
    assert_eq!(sticky["affinity_timeout_s"], 300);
    let drain = by_frontend("10.96.0.10:82/TCP");
    assert_eq!(drain["draining"], serde_json::json!(["10.10.2.13:8080"]));

    // inspect backends.
    let run = lb_agent(
        None,
        &["inspect", "backends", "--json", "--pin-dir", pin_arg],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let rows: Vec<Value> = serde_json::from_str(&run.stdout).unwrap();
    let b3 = rows
        .iter()
        .find(|r| r["address"] == "10.10.2.13:8080")
        .unwrap();
    assert_eq!(b3["frontends"], serde_json::json!([]));
    assert_eq!(b3["draining_in"], serde_json::json!(["10.96.0.10:82/TCP"]));
    let run = lb_agent(None, &["inspect", "backends", "--pin-dir", pin_arg]);
    assert!(
        run.stdout
            .starts_with("ID  ADDRESS          WEIGHT  ACTIVE_FLOWS  FRONTENDS\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("10.96.0.10:82/TCP(draining)"),
        "{}",
        run.stdout
    );

    // inspect flows: the UDP flows in both directions.
    let run = lb_agent(None, &["inspect", "flows", "--json", "--pin-dir", pin_arg]);
    assert_eq!(run.code, 0, "{run:?}");
    let flows: Vec<Value> = serde_json::from_str(&run.stdout).unwrap();
    let udp_forward: Vec<&Value> = flows
        .iter()
        .filter(|f| f["dst"] == "10.96.0.10:53" && f["direction"] == "forward")
        .collect();
    assert_eq!(
        udp_forward.len(),
        11,
        "the warm-up flow and the ten new ones"
    );
    for f in &udp_forward {
        assert_eq!(f["protocol"], "UDP");
        assert_eq!(f["frontend"], "10.96.0.10:53/UDP");
        assert!(f["src"].as_str().unwrap().starts_with("10.10.1.2:"), "{f}");
        assert!(f["nat"].as_str().unwrap().ends_with(":5353"), "{f}");
    }
    let replies = flows
        .iter()
        .filter(|f| f["src"].as_str().unwrap().ends_with(":5353") && f["direction"] == "reply")
        .count();
    assert_eq!(replies, 11);
    assert!(
        flows.iter().any(|f| f["frontend"] == "10.96.0.10:81/TCP"
            && f["flags"] == serde_json::json!(["affinity"]))
    );
    let run = lb_agent(None, &["inspect", "flows", "--pin-dir", pin_arg]);
    assert!(run.stdout.starts_with("PROTO  SRC"), "{}", run.stdout);
    assert!(
        run.stdout.contains("  forward  10.10.2.1"),
        "{}",
        run.stdout
    );

    // inspect stats agrees with the metrics.
    let run = lb_agent(
        None,
        &[
            "inspect",
            "stats",
            "--json",
            "--pin-dir",
            pin_arg,
            "--status-file",
            status_arg,
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let stats: Value = serde_json::from_str(&run.stdout).unwrap();
    let now = scrape(&topo.lb);
    assert_eq!(
        stats["global"]["ct_misses"].as_f64().unwrap(),
        value(&now, "xlb_xdp_ct_misses_total")
    );
    assert_eq!(stats["conntrack_capacity"], 1024);
    let udp = stats["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == "10.96.0.10:53/UDP")
        .unwrap();
    assert_eq!(udp["service"], "echo-udp");
    assert_eq!(
        udp["packets"].as_f64().unwrap(),
        value(&now, &format!("xlb_service_packets_total{UDP_SERIES}"))
    );
    let run = lb_agent(None, &["inspect", "stats", "--pin-dir", pin_arg]);
    assert!(run.stdout.starts_with("conntrack: "), "{}", run.stdout);
    assert!(run.stdout.contains("\nCOUNTER"), "{}", run.stdout);

    // Every map through bpftool, field names from BTF.
    check_bpftool_field_names(&pin_dir);

    // inspect fails clearly where nothing is pinned.
    let run = lb_agent(
        None,
        &["inspect", "services", "--pin-dir", dir.to_str().unwrap()],
    );
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("no xlb maps are pinned"), "{run:?}");

    assert!(agent.stop().unwrap().success());
    // Stopped: status says so and fails.
    let run = lb_agent(None, &["status", "--status-file", status_arg]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("NOT RUNNING"), "{}", run.stdout);
    std::fs::remove_dir_all(&dir).unwrap();
}
