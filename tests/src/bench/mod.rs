//! `cargo xtask bench`: what xlb costs, measured on the real kernel with the real program and the
//! agent's own code, beside kube-proxy's iptables mode on the same machine in the same run.
//!
//! One module per stage, each with its `Params` (full or smoke-test size), a `run` and a result
//! type; [`report`] turns the results into docs/benchmarks.md and the README's summary.
//!
//! * [`per_packet`]: nanoseconds per packet through BPF_PROG_TEST_RUN, against a bare XDP_PASS
//!   program, at 1 to 100k services.
//! * [`control_plane`]: programming 10k services, one endpoint change, the agent's peak RSS, and
//!   `iptables-restore` of the same services.
//! * [`throughput`]: TCP connections, UDP requests and a UDP flood through the namespace
//!   topology, through xlb and through kube-proxy's iptables rules.
//!
//! Numbers are printed, never asserted: the smoke test (tests/tests/bench_smoke.rs) only checks
//! that every stage still produces sane numbers and a well-formed report.

pub mod control_plane;
pub mod generator;
pub mod kube_proxy;
pub mod machine;
pub mod per_packet;
pub mod report;
pub mod services;
pub mod throughput;

use std::time::Duration;

/// Sizes of every stage.
#[derive(Clone, Debug)]
pub struct Params {
    pub per_packet: per_packet::Params,
    pub control_plane: control_plane::Params,
    pub throughput: throughput::Params,
}

impl Params {
    /// What `cargo xtask bench` measures.
    pub fn full() -> Self {
        Self {
            per_packet: per_packet::Params::full(),
            control_plane: control_plane::Params::full(),
            throughput: throughput::Params::full(),
        }
    }

    /// Tiny sizes, for the smoke test: seconds, not minutes.
    pub fn smoke() -> Self {
        Self {
            per_packet: per_packet::Params::smoke(),
            control_plane: control_plane::Params::smoke(),
            throughput: throughput::Params::smoke(),
        }
    }
}

/// Median of `values` (mean of the two middle ones for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Median of durations.
pub fn median_duration(values: &[Duration]) -> Duration {
    Duration::from_secs_f64(median(
        &values.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
    ))
}

/// CPU time the calling thread has used (user and kernel, e.g. inside BPF_PROG_TEST_RUN), in
/// nanoseconds. Unlike wall time it does not count time the thread was preempted, which on a
/// shared two-core machine is most of the noise.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A small deterministic generator (xorshift64*), so every run picks the same services.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough in `0..n` (n far below 2^32).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 32) as usize * n) >> 32
    }
}

/// Runs `f` on a fresh thread and returns its result: stages that move their thread into a
/// private network namespace (the packet harness does) leave the caller's alone.
pub fn on_own_thread<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    std::thread::spawn(f)
        .join()
        .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?
}

/// Where a stage reports what it is doing (stderr in the bench binary).
pub type Progress = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// The stages, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    PerPacket,
    ControlPlane,
    Throughput,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::PerPacket, Stage::ControlPlane, Stage::Throughput];
}

impl std::str::FromStr for Stage {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "per-packet" => Ok(Stage::PerPacket),
            "control-plane" => Ok(Stage::ControlPlane),
            "throughput" => Ok(Stage::Throughput),
            _ => anyhow::bail!("unknown stage {s:?}: per-packet, control-plane or throughput"),
        }
    }
}

/// Runs `stages`, each on a thread of its own, and gathers the results. A stage that fails is
/// recorded in [`report::Results::failures`] and the others still run.
pub fn run(
    params: &Params,
    stages: &[Stage],
    command: &str,
    progress: Progress,
) -> report::Results {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut results = report::Results {
        machine: machine::Machine::describe(),
        command: command.to_owned(),
        date,
        per_packet: None,
        control_plane: None,
        throughput: None,
        failures: vec![],
    };
    for &stage in stages {
        let pr = progress.clone();
        let failed = match stage {
            Stage::PerPacket => {
                let p = params.per_packet.clone();
                on_own_thread(move || per_packet::run(&p, &*pr))
                    .map(|r| results.per_packet = Some(r))
            }
            Stage::ControlPlane => {
                let p = params.control_plane.clone();
                on_own_thread(move || control_plane::run(&p, &*pr))
                    .map(|r| results.control_plane = Some(r))
            }
            Stage::Throughput => {
                let p = params.throughput.clone();
                on_own_thread(move || throughput::run(&p, &*pr))
                    .map(|r| results.throughput = Some(r))
            }
        }
        .err();
        if let Some(e) = failed {
            results
                .failures
                .push((format!("{stage:?}"), format!("{e:#}")));
        }
    }
    results
}
