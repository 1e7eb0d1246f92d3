//! Stage 3: real traffic through the namespace topology (client -> LB node -> switch -> 10
//! backends, crate::topology), once with xlb on the LB node (the agent as a process, XDP on both
//! LB interfaces) and once with kube-proxy's iptables rules instead (nat DNAT + conntrack in the
//! LB node's stack), at 1, 1k and 10k services, with the same generator: TCP connections per
//! second, UDP requests per second (a fresh socket, so a new flow, per request) and a UDP flood
//! counted on the backends' interfaces.
//!
//! Every service has an `http` (80/TCP) and a `dns` (53/UDP) port on the same ten endpoints,
//! the real servers of the backend namespaces; the generator picks a service at random for
//! every connection or request. The flood goes to one more service, `flood`, whose `discard`
//! port (9/UDP) goes to sockets that never read. All of xlb's runs come first, then all of the
//! iptables runs, so xlb never runs with netfilter state left in the LB namespace.
//!
//! xlb runs twice: in native (driver) XDP mode, what the agent picks on a veth, and in generic
//! (skb) mode. On a veth, native XDP is the driver's emulation of a NIC: the skb a peer sends is
//! turned into an XDP buffer for the program (copied when it lacks the headroom XDP needs), and a
//! redirected frame is turned back into an skb by the veth it goes to. Generic mode runs the same
//! program on the skb inside the stack. Which is faster here says something about veth, not about
//! a physical NIC, where native XDP runs before any skb exists.
//!
//! Everything — generator, LB, bridge, servers — shares the machine's cores: these numbers say
//! how the LB paths compare under the same load on this machine, not what any does with a core
//! of its own.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::Context as _;

use super::{
    generator::{self, Counts},
    kube_proxy::{self, Backend as Iptables},
    services::{DISCARD, DNS, HTTP, ServiceSet},
};
use crate::{
    agent::{Agent, BpfFs, scratch_dir},
    topology::{LB_IFACES, Topology, backend_addr},
    traffic,
};

/// Longest a ruleset may take to load before the stage gives up.
const RESTORE_LIMIT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub struct Params {
    pub scales: Vec<usize>,
    /// Backend namespaces (every service's endpoints).
    pub backends: usize,
    /// Length of each measurement.
    pub duration: Duration,
    /// Traffic before each setup's measurements (neighbours, caches), not counted.
    pub warmup: Duration,
    pub tcp_threads: usize,
    pub udp_threads: usize,
    pub flood_threads: usize,
    pub flood_payload: usize,
}

impl Params {
    pub fn full() -> Self {
        Self {
            scales: vec![1, 1_000, 10_000],
            backends: 10,
            duration: Duration::from_secs(5),
            warmup: Duration::from_millis(500),
            tcp_threads: 4,
            udp_threads: 4,
            flood_threads: 2,
            flood_payload: 64,
        }
    }

    pub fn smoke() -> Self {
        Self {
            scales: vec![1, 10],
            backends: 3,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            tcp_threads: 2,
            udp_threads: 2,
            flood_threads: 1,
            flood_payload: 64,
        }
    }
}

/// One setup's numbers at one scale.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rates {
    pub tcp: Counts,
    pub udp: Counts,
    /// Datagrams the flood's senders handed to the kernel.
    pub flood_sent: Counts,
    /// Datagrams that arrived on the backends' interfaces during the flood.
    pub flood_delivered: u64,
}

impl Rates {
    pub fn flood_delivered_per_second(&self) -> f64 {
        self.flood_delivered as f64 / self.flood_sent.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Clone, Debug)]
pub struct Scale {
    pub services: usize,
    pub frontends: usize,
    /// xlb in native (driver) XDP mode: what the agent attaches on these veths by default.
    pub xlb: Rates,
    /// xlb in generic (skb) XDP mode.
    pub xlb_generic: Rates,
    pub iptables: Rates,
}

#[derive(Clone, Debug)]
pub struct Throughput {
    pub params: Params,
    pub iptables_version: String,
    pub scales: Vec<Scale>,
}

/// The set of one scale: `count` services on the topology's endpoints, plus the flood service.
fn service_set(params: &Params, count: usize) -> ServiceSet {
    let endpoints: Vec<_> = (0..params.backends).map(backend_addr).collect();
    ServiceSet::shared(count, &[HTTP, DNS], &endpoints).with("flood", &[DISCARD], &endpoints)
}

/// Received packets on every backend's interface.
fn delivered(topo: &Topology) -> anyhow::Result<u64> {
    let mut total = 0;
    for ns in &topo.backends {
        let json = ns.ip(&["-s", "-j", "link", "show", "b0"])?;
        let links: serde_json::Value = serde_json::from_str(&json)?;
        total += links[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no rx packet counter on b0")?;
    }
    Ok(total)
}

/// The three measurements against the services of `set` (all but its last, the flood service).
fn measure(topo: &Topology, params: &Params, set: &ServiceSet) -> anyhow::Result<Rates> {
    let services = &set.services[..set.services.len() - 1];
    let flood = set.services.last().unwrap();
    let tcp_targets: Vec<SocketAddrV4> = services
        .iter()
        .map(|s| SocketAddrV4::new(s.vip, HTTP.port))
        .collect();
    let udp_targets: Vec<SocketAddrV4> = services
        .iter()
        .map(|s| SocketAddrV4::new(s.vip, DNS.port))
        .collect();
    generator::tcp_connections(
        &topo.client,
        tcp_targets.clone(),
        params.tcp_threads,
        params.warmup,
    )?;
    let tcp = generator::tcp_connections(
        &topo.client,
        tcp_targets,
        params.tcp_threads,
        params.duration,
    )?;
    let udp = generator::udp_requests(
        &topo.client,
        udp_targets,
        params.udp_threads,
        params.duration,
    )?;
    let before = delivered(topo)?;
    let flood_sent = generator::udp_flood(
        &topo.client,
        SocketAddrV4::new(flood.vip, DISCARD.port),
        params.flood_threads,
        params.duration,
        params.flood_payload,
    )?;
    // Let queued datagrams land before reading the counters.
    std::thread::sleep(Duration::from_millis(200));
    let flood_delivered = delivered(topo)?.saturating_sub(before);
    Ok(Rates {
        tcp,
        udp,
        flood_sent,
        flood_delivered,
    })
}

/// Runs the stage.
pub fn run(params: &Params, progress: &dyn Fn(&str)) -> anyhow::Result<Throughput> {
    let topo = Topology::new(params.backends)?;
    // Many short connections from one client: the whole port range, and TIME_WAIT ports reused
    // (as load generators configure a client).
    topo.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    topo.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let _sinks = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| traffic::discard(ns, backend_addr(i), DISCARD.target_port))
        .collect::<Result<Vec<_>, _>>()?;

    let sets: Vec<ServiceSet> = params
        .scales
        .iter()
        .map(|&n| service_set(params, n))
        .collect();
    let mut xlb = Vec::new();
    let mut xlb_generic = Vec::new();
    for (mode, results) in [("driver", &mut xlb), ("generic", &mut xlb_generic)] {
        for (set, &n) in sets.iter().zip(&params.scales) {
            progress(&format!("throughput: xlb ({mode} XDP), {n} services"));
            let bpffs = BpfFs::new(&format!("tp-{mode}-{n}"))?;
            let pin_dir = bpffs.pin_dir();
            let file = scratch_dir().join("services.yaml");
            std::fs::write(&file, set.services_file())?;
            let mut agent = Agent::start(
                &topo.lb,
                &[
                    "run",
                    "--services",
                    file.to_str().unwrap(),
                    "--iface",
                    LB_IFACES,
                    "--pin-dir",
                    pin_dir.to_str().unwrap(),
                    "--xdp-mode",
                    mode,
                ],
            )?;
            agent.wait_for_sync(1)?;
            results.push(measure(&topo, params, set)?);
            agent.stop()?;
        }
    }

    // iptables-nft cannot load 10k services in any reasonable time (see the control-plane
    // stage), so the baseline runs on the legacy back end: kube-proxy's classic iptables mode.
    let backend = Iptables::Legacy;
    let mut iptables = Vec::new();
    for (set, &n) in sets.iter().zip(&params.scales) {
        progress(&format!("throughput: iptables, {n} services"));
        kube_proxy::flush(&topo.lb, backend)?;
        for rules in [kube_proxy::JUMPS, &kube_proxy::full_ruleset(set)] {
            let restored = kube_proxy::restore(&topo.lb, backend, rules, RESTORE_LIMIT)?;
            anyhow::ensure!(
                restored.finished(),
                "{} did not load {n} services within {RESTORE_LIMIT:?}",
                backend.restore_command()
            );
        }
        iptables.push(measure(&topo, params, set)?);
    }
    kube_proxy::flush(&topo.lb, backend)?;

    Ok(Throughput {
        params: params.clone(),
        iptables_version: kube_proxy::version(backend),
        scales: params
            .scales
            .iter()
            .zip(sets.iter())
            .zip(xlb.into_iter().zip(xlb_generic).zip(iptables))
            .map(|((&services, set), ((xlb, xlb_generic), iptables))| Scale {
                services,
                frontends: set.frontends(),
                xlb,
                xlb_generic,
                iptables,
            })
            .collect(),
    })
}
