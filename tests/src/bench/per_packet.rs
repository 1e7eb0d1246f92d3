//! Stage 1: the cost of one packet in the XDP program, through BPF_PROG_TEST_RUN, at 1 to 100k
//! services of 10 endpoints each, against the floor of a bare XDP_PASS program
//! (lb-ebpf/src/bench.rs) run the same way.
//!
//! What each case measures, and why it is honest:
//!
//! * The kernel runs a repeated frame on the *same* buffer: a rewrite made by one run is what the
//!   next run sees. A DNATed frame would become a non-service packet after its first run. So the
//!   measured service has one endpoint at its own VIP and port, and the measured flow is one the
//!   Maglev table sends there (found with the agent's table builder and lb-common's hash): the
//!   program does all its work (conntrack hit, NAT with checksum updates, FIB lookup) and writes
//!   the same addresses back, so every run sees the same frame. The reply is the same trick in
//!   the other direction. What remains is the TTL: the program forwards like a router and
//!   decrements it, so after 63 runs the TTL is 1 and the runs end at the TTL check with
//!   XDP_PASS instead of rewriting MACs and returning XDP_REDIRECT (a dozen instructions out of
//!   the path). The single-run cross-check below covers the full path.
//! * A new flow cannot be repeated at all: after its first run it is an established one. Instead
//!   every new flow is its own BPF_PROG_TEST_RUN call (repeat 1) on a distinct SYN — a new client
//!   address and port, to a service drawn at random from all of them, into a conntrack table
//!   that never fills. A single run's kernel-reported time includes the test-run timer's own
//!   overhead, so the same frames are also run through the floor program one call each, and
//!   `new flow = mean(new flow, 1 run) - mean(floor, 1 run) + floor (repeated)`. The same frames
//!   run again are established flows with cold caches and the full path including the TX
//!   decision: reported the same way as a cross-check of the repeated established number.
//! * Times are the benchmark thread's CPU time around each repeated call divided by the repeat
//!   count (sub-nanosecond resolution; preemption by other processes does not count), the
//!   median of several rounds; the kernel's own integer-nanosecond figure agrees within its
//!   rounding.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail, ensure};
use aya::{Ebpf, EbpfLoader, programs::Xdp};
use etherparse::TcpHeader;
use lb_agent::{
    dataplane::Dataplane as _,
    dataplane::xdp::{EMBEDDED_OBJECT, LoadOptions},
    model::Backend,
    plan,
};
use lb_common::{Config, maps, proto};

use super::{
    Rng,
    machine::mem_available_bytes,
    median,
    services::{HTTP, ServiceSet, vip},
    thread_cpu_ns,
};
use crate::netns::sh;
use crate::packet::{
    Harness, Router, XDP_PASS, XDP_REDIRECT, decode_checked, flow_key, maglev_choice, run_repeated,
    syn, tcp_frame,
};

/// Name of the floor program in the lb-ebpf object (lb-ebpf/src/bench.rs).
pub const FLOOR_PROGRAM: &str = "xlb_bench_pass";

/// The client of the measured flows, as in the end-to-end topology.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
/// The next hop towards every VIP and endpoint, behind `lbb`.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 254);
/// A destination no service has.
const NOT_A_SERVICE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 10, 3, 3), 22);

#[derive(Clone, Debug)]
pub struct Params {
    /// Service counts to measure at.
    pub scales: Vec<usize>,
    pub endpoints: usize,
    /// Runs per BPF_PROG_TEST_RUN call for the repeatable cases.
    pub repeat: u32,
    /// Rounds of every case; the median is reported.
    pub rounds: usize,
    /// Distinct new flows per round, one call each.
    pub new_flows_per_round: usize,
    /// Share of the available memory the services' kernel state may take.
    pub memory_budget: f64,
}

impl Params {
    pub fn full() -> Self {
        Self {
            scales: vec![1, 1_000, 10_000, 100_000],
            endpoints: 10,
            repeat: 1_000_000,
            rounds: 5,
            new_flows_per_round: 100_000,
            memory_budget: 0.8,
        }
    }

    pub fn smoke() -> Self {
        Self {
            scales: vec![1, 10],
            endpoints: 10,
            repeat: 1_000,
            rounds: 3,
            new_flows_per_round: 200,
            memory_budget: 0.8,
        }
    }
}

/// Nanoseconds per packet of every case at one service count.
#[derive(Clone, Debug, Default)]
pub struct Scale {
    /// The service count asked for.
    pub requested: usize,
    /// The service count programmed (less than asked only when memory does not allow it).
    pub services: usize,
    /// Why fewer services were programmed than asked for.
    pub shortfall: Option<String>,
    /// Wall time of the first sync of the services (informational; the control-plane stage
    /// measures this properly).
    pub program_time: Duration,
    /// Drop of MemAvailable while the services were programmed into the loaded program's maps.
    pub kernel_bytes: u64,
    pub floor: f64,
    pub non_service: f64,
    pub established: f64,
    pub reply: f64,
    /// New flow, corrected for the single-run timer overhead (see the module docs).
    pub new_flow: f64,
    /// Established flows on the distinct frames, one call each, corrected the same way.
    pub established_single: f64,
    /// Raw single-run means, before the correction.
    pub new_flow_single_raw: f64,
    pub floor_single_raw: f64,
    /// The kernel's own integer-nanosecond figure for the repeated established case.
    pub established_kernel_ns: f64,
    /// The established flow with no route to its destination: everything but the FIB lookup's
    /// search and the forwarding that follows it.
    pub established_no_route: f64,
    /// Frontends the first sync could not program (a resync then did), and the first error.
    pub first_sync_failures: usize,
    pub first_sync_error: Option<String>,
}

/// The stage's result.
#[derive(Clone, Debug)]
pub struct PerPacket {
    pub params: Params,
    pub scales: Vec<Scale>,
}

/// The floor program, loaded from the same object as xlb_xdp, with its (unused) maps shrunk.
fn load_floor() -> anyhow::Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for name in maps::ALL {
        loader.map_max_entries(name, 1);
    }
    let mut ebpf = loader
        .load(EMBEDDED_OBJECT)
        .context("load the eBPF object")?;
    let program: &mut Xdp = ebpf
        .program_mut(FLOOR_PROGRAM)
        .with_context(|| format!("the eBPF object has no program {FLOOR_PROGRAM}"))?
        .try_into()?;
    program.load()?;
    Ok(ebpf)
}

fn floor_program(ebpf: &Ebpf) -> &Xdp {
    ebpf.program(FLOOR_PROGRAM).unwrap().try_into().unwrap()
}

/// Nanoseconds per run of `repeat` runs of `frame`, by thread CPU time, and the kernel's figure.
fn repeated_ns(program: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> (f64, f64, u32) {
    let before = thread_cpu_ns();
    let result = run_repeated(program, frame, ifindex, repeat);
    let cpu = thread_cpu_ns() - before;
    (
        cpu as f64 / repeat as f64,
        result.duration.as_nanos() as f64,
        result.return_value,
    )
}

/// Mean kernel-reported nanoseconds of one run per call over `frames`, checking every action.
fn single_runs_ns(
    program: &Xdp,
    frames: &[Vec<u8>],
    ifindex: u32,
    expect: u32,
) -> anyhow::Result<f64> {
    let mut total = 0u128;
    for frame in frames {
        let result = run_repeated(program, frame, ifindex, 1);
        if result.return_value != expect {
            bail!(
                "a single run returned XDP action {} instead of {expect}",
                result.return_value
            );
        }
        total += result.duration.as_nanos();
    }
    Ok(total as f64 / frames.len().max(1) as f64)
}

/// An ACK of an established connection.
fn ack(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    tcp_frame(src, dst, |t: &mut TcpHeader| t.ack = true, &[])
}

/// How many services the memory allows, given what `per_service` bytes each took at a smaller
/// scale: `requested` if they fit in the budget, else the largest multiple of 10k (of 1k below
/// 10k) that does.
pub fn affordable(requested: usize, per_service: f64, available: u64, budget: f64) -> usize {
    if per_service <= 0.0 {
        return requested;
    }
    let fits = (available as f64 * budget / per_service) as usize;
    if fits >= requested {
        return requested;
    }
    let step = if fits >= 10_000 { 10_000 } else { 1_000 };
    (fits / step * step).max(1)
}

/// Waits (up to 30 s) for memory freed by the previous scale's maps to come back: the kernel
/// frees map memory from a workqueue after the last reference is gone.
fn settle_memory(baseline: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while mem_available_bytes() + (256 << 20) < baseline && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the stage. Call it on a thread of its own: the harness moves its thread into a private
/// network namespace.
pub fn run(params: &Params, progress: &dyn Fn(&str)) -> anyhow::Result<PerPacket> {
    let floor = load_floor()?;
    let baseline = mem_available_bytes();
    let mut scales = Vec::new();
    let mut per_service_bytes = 0.0f64;
    for &requested in &params.scales {
        settle_memory(baseline);
        let available = mem_available_bytes();
        let services = affordable(
            requested,
            per_service_bytes,
            available,
            params.memory_budget,
        );
        let shortfall = (services < requested).then(|| {
            format!(
                "{requested} services would need about {:.1} GiB of kernel memory \
                 ({:.0} KiB per service measured at the previous scale: mostly its 64 KiB Maglev \
                 table), more than {:.0}% of the {:.1} GiB available; {services} were programmed",
                per_service_bytes * requested as f64 / (1u64 << 30) as f64,
                per_service_bytes / 1024.0,
                params.memory_budget * 100.0,
                available as f64 / (1u64 << 30) as f64,
            )
        });
        progress(&format!(
            "per-packet: {services} services x {} endpoints",
            params.endpoints
        ));
        let scale = measure_scale(params, requested, services, shortfall, &floor)?;
        if services >= 1_000 {
            per_service_bytes = scale.kernel_bytes as f64 / services as f64;
        }
        scales.push(scale);
    }
    Ok(PerPacket {
        params: params.clone(),
        scales,
    })
}

fn measure_scale(
    params: &Params,
    requested: usize,
    services: usize,
    shortfall: Option<String>,
    floor_ebpf: &Ebpf,
) -> anyhow::Result<Scale> {
    let floor = floor_program(floor_ebpf);
    let set = ServiceSet::distinct(services, params.endpoints);
    let mut model = set.model();

    // The measured service, in the middle of the set, gets an endpoint at its own VIP:port.
    let probe = &set.services[services / 2];
    let probe_vip = probe.vip;
    let probe_service = model.services.get_mut(&probe.frontend_name(&HTTP)).unwrap();
    probe_service.backends[0] = Backend::ready(probe_vip.into(), HTTP.port, 1);
    probe_service.backends.sort();
    let probe_backends = probe_service.backends.clone();
    let client_port = (40_000u16..)
        .find(|&p| {
            let key = flow_key((CLIENT, p), (probe_vip, HTTP.port), proto::TCP);
            maglev_choice(&probe_backends, &key).addr == std::net::IpAddr::V4(probe_vip)
        })
        .context("no client port maps to the VIP's own endpoint")?;
    let client = (CLIENT, client_port);
    let frontend = (probe_vip, HTTP.port);

    let new_flows = params.rounds * params.new_flows_per_round;
    let mut harness = Harness::with_options(LoadOptions {
        object: None,
        pin_dir: None,
        max_services: services as u32 + 2,
        max_backends: (services * params.endpoints) as u32 + 2,
        // Two entries per flow, and room to spare so the LRU never evicts.
        conntrack_max: (4 * new_flows + 1024).next_power_of_two() as u32,
        config: Config::default(),
    });
    let router = Router::build()?;
    router.neighbour(GATEWAY, "02:00:00:00:02:fe", "lbb")?;
    router.neighbour(CLIENT, "02:00:00:00:00:01", "lbc")?;
    router.route("10.96.0.0/12", GATEWAY)?;
    router.route("10.128.0.0/9", GATEWAY)?;

    // After the load: what the services themselves take, not the preallocated conntrack table.
    // Programmed through the agent's plan and dataplane code (Syncer::sync without its logging),
    // so a frontend that fails can be reported with its error; failed ones are retried as the
    // agent's periodic resync would.
    let mem_before = mem_available_bytes();
    let desired = plan::desired(&model);
    let started = std::time::Instant::now();
    let mut errors = harness
        .dataplane
        .apply(plan::diff(harness.dataplane.current(), &desired));
    let program_time = started.elapsed();
    let first_sync_failures = errors.len();
    let first_sync_error = errors.first().map(|e| format!("{}: {:#}", e.key, e.error));
    for _ in 0..5 {
        if errors.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        errors = harness
            .dataplane
            .apply(plan::diff(harness.dataplane.current(), &desired));
    }
    ensure!(
        errors.is_empty(),
        "{} of {services} services could not be programmed, even after 5 resyncs: {:#}",
        errors.len(),
        errors[0].error
    );
    let kernel_bytes = mem_before.saturating_sub(mem_available_bytes());
    let xlb = harness.dataplane.program();

    // Open the measured flow, check the rewrite is the identity, and that its reply is too.
    let forward = ack(client, frontend);
    let out = harness.run_on(&forward, router.client_side);
    ensure!(
        out.action == XDP_REDIRECT,
        "new flow: action {}",
        out.action
    );
    ensure!(
        decode_checked(&out.frame).dst() == frontend,
        "the measured flow was not sent to the VIP's own endpoint"
    );
    let reply = ack(frontend, client);
    let out = harness.run_on(&reply, router.backend_side);
    ensure!(out.action == XDP_REDIRECT, "reply: action {}", out.action);
    ensure!(
        decode_checked(&out.frame).src() == frontend,
        "reply not NATed"
    );
    let non_service = ack(client, NOT_A_SERVICE);

    let mut samples: [Vec<f64>; 5] = Default::default();
    let mut kernel_established = Vec::new();
    for _ in 0..params.rounds {
        let cases: [(&Xdp, &[u8], u32); 5] = [
            (floor, &forward, router.client_side),
            (xlb, &non_service, router.client_side),
            (xlb, &forward, router.client_side),
            (xlb, &reply, router.backend_side),
            (floor, &forward, router.client_side),
        ];
        for (i, (program, frame, ifindex)) in cases.into_iter().enumerate() {
            let (ns, kernel_ns, action) = repeated_ns(program, frame, ifindex, params.repeat);
            if i == 1 {
                ensure!(action == XDP_PASS, "non-service packet: action {action}");
            }
            if i == 2 {
                kernel_established.push(kernel_ns);
            }
            samples[i].push(ns);
        }
    }
    // How much of the established path is the FIB lookup and the forwarding decision: the same
    // flow with no route to its destination (the lookup fails at once and the packet passes).
    sh(&["ip", "route", "del", "10.96.0.0/12"])?;
    let mut no_route = Vec::new();
    for _ in 0..params.rounds {
        let (ns, _, action) = repeated_ns(xlb, &forward, router.client_side, params.repeat);
        ensure!(
            action == XDP_PASS,
            "established without a route: action {action}"
        );
        no_route.push(ns);
    }
    router.route("10.96.0.0/12", GATEWAY)?;

    // The floor runs first and last in every round; both count.
    let floor_all: Vec<f64> = samples[0].iter().chain(&samples[4]).copied().collect();
    let floor_ns = median(&floor_all);

    // New flows: distinct SYNs, one call each, to services drawn at random.
    let mut rng = Rng::new(0x786c_6221 ^ services as u64);
    let (mut new_single, mut est_single, mut floor_single) = (vec![], vec![], vec![]);
    for round in 0..params.rounds {
        let frames: Vec<Vec<u8>> = (0..params.new_flows_per_round)
            .map(|k| {
                let n = round * params.new_flows_per_round + k;
                let src =
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 10, 16, 0)) + (n / 50_000) as u32);
                let port = 10_000 + (n % 50_000) as u16;
                syn((src, port), (vip(rng.below(services)), HTTP.port))
            })
            .collect();
        new_single.push(single_runs_ns(
            xlb,
            &frames,
            router.client_side,
            XDP_REDIRECT,
        )?);
        est_single.push(single_runs_ns(
            xlb,
            &frames,
            router.client_side,
            XDP_REDIRECT,
        )?);
        floor_single.push(single_runs_ns(
            floor,
            &frames,
            router.client_side,
            XDP_PASS,
        )?);
    }
    let stats = harness.dataplane.maps.global_stats()?;
    ensure!(
        stats.ct_insert_failed == 0,
        "conntrack refused {} flows",
        stats.ct_insert_failed
    );
    let timer_overhead = median(&floor_single) - floor_ns;

    Ok(Scale {
        requested,
        services,
        shortfall,
        program_time,
        kernel_bytes,
        floor: floor_ns,
        non_service: median(&samples[1]),
        established: median(&samples[2]),
        reply: median(&samples[3]),
        new_flow: median(&new_single) - timer_overhead,
        established_single: median(&est_single) - timer_overhead,
        new_flow_single_raw: median(&new_single),
        floor_single_raw: median(&floor_single),
        established_kernel_ns: median(&kernel_established),
        established_no_route: median(&no_route),
        first_sync_failures,
        first_sync_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_caps_the_scale_at_a_round_number() {
        let gib = 1u64 << 30;
        assert_eq!(affordable(100_000, 0.0, 10 * gib, 0.8), 100_000);
        assert_eq!(affordable(100_000, 70_000.0, 20 * gib, 0.8), 100_000);
        // 8 GiB / 128 KiB = 65536 -> 60k.
        assert_eq!(affordable(100_000, 131_072.0, 10 * gib, 0.8), 60_000);
        assert_eq!(affordable(100_000, 131_072.0, gib, 0.8), 6_000);
    }
}
