//! `cargo xtask`: every command sets up what it needs first (see `setup`), so each works on a
//! fresh machine as root.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "xlb's build, test and demo commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent): rust-src for nightly, bpf-linker built
    /// against nightly's own LLVM, Debian packages, bpffs.
    Setup,
    /// Build the eBPF object (lb-ebpf) with BTF.
    BuildEbpf {
        /// Release profile (what `cargo build --release` of the agent embeds).
        #[arg(long)]
        release: bool,
    },
    /// Build the eBPF object and the agent.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Everything CI checks: fmt, clippy, unit tests, packet tests, the privileged
    /// end-to-end tests, and the qemu VM tests: IPVS, and XDP on Debian 12's 6.1 kernel
    /// (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Build the demo topology, run the agent on the example services file, show it working.
    Demo,
    /// Measure per-packet cost, control-plane sync and throughput beside kube-proxy's iptables
    /// mode (release build, needs root); write docs/benchmarks.md and the README's summary.
    Bench {
        /// Tiny sizes (seconds): check the benchmark runs, numbers mean nothing.
        #[arg(long)]
        smoke: bool,
        /// Run only these stages: per-packet, control-plane, throughput (comma separated).
        #[arg(long, value_name = "STAGE,..")]
        only: Option<String>,
    },
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command, failing with its command line if it does not succeed.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {line}"))?;
    if !status.success() {
        bail!("{line} failed with {status}");
    }
    Ok(())
}

/// Path of the eBPF object for a profile.
pub fn ebpf_object(release: bool) -> PathBuf {
    workspace_root()
        .join("target/ebpf/bpfel-unknown-none")
        .join(if release { "release" } else { "debug" })
        .join("lb-ebpf")
}

/// `cargo +nightly build` of lb-ebpf for bpfel-unknown-none. `-C debuginfo=2 -C link-arg=--btf`
/// make bpf-linker emit the .BTF section every BTF map needs.
fn build_ebpf(release: bool) -> anyhow::Result<()> {
    let root = workspace_root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("lb-ebpf"))
        .args([
            "+nightly",
            "build",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
        );
    if release {
        cmd.arg("--release");
    }
    // The outer (stable) cargo's settings must not leak into the nightly build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd).context("building the eBPF program")?;
    println!("xtask: eBPF object at {}", ebpf_object(release).display());
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()).args(args);
    cmd
}

fn build(release: bool) -> anyhow::Result<()> {
    build_ebpf(release)?;
    let mut args = vec!["build", "--package", "lb-agent"];
    if release {
        args.push("--release");
    }
    run(&mut cargo(&args))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} must run as root: loading XDP programs and building network namespaces need CAP_BPF and CAP_NET_ADMIN"
        );
    }
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    build(false)?;
    // The demo runs the release object: build it too, so the tests check it has no panic paths.
    build_ebpf(true)?;
    run(&mut cargo(&["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    run(Command::new("cargo")
        .current_dir(workspace_root().join("lb-ebpf"))
        .args(["+nightly", "fmt", "--", "--check"]))
    .context("lb-ebpf is not formatted: run `cargo +nightly fmt` in lb-ebpf")?;
    run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The VM tests boot a VM around a statically linked agent; the XDP one also runs the packet
    // suites, built statically, on the VM's older kernel.
    run(&mut cargo(&[
        "build",
        "--package",
        "lb-agent",
        "--target",
        setup::STATIC_TARGET,
    ]))?;
    let suites = static_packet_suites()?;
    let agent = workspace_root().join("target/debug/lb-agent");
    let static_agent = workspace_root()
        .join("target")
        .join(setup::STATIC_TARGET)
        .join("debug/lb-agent");
    let mut cmd = cargo(&["test", "--workspace", "--no-fail-fast"]);
    cmd.env("XLB_AGENT_BIN", &agent)
        .env("XLB_AGENT_STATIC_BIN", &static_agent)
        .env("XLB_EBPF_OBJECT_PATH", ebpf_object(false))
        .env("XLB_VM_PACKET_SUITES", suites);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    run(&mut cmd)
}

/// Builds the packet test suites (`tests/tests/packet_*.rs`) statically and returns them as
/// `name=path` lines, for the XDP VM test to run inside the VM.
fn static_packet_suites() -> anyhow::Result<String> {
    let out = cargo(&[
        "test",
        "--package",
        "xlb-tests",
        "--target",
        setup::STATIC_TARGET,
        "--no-run",
        "--test",
        "packet_*",
        "--message-format=json",
    ])
    .stderr(std::process::Stdio::inherit())
    .output()
    .context("could not start cargo test --no-run for the static packet suites")?;
    if !out.status.success() {
        bail!(
            "building the static packet suites failed with {}",
            out.status
        );
    }
    let mut suites = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if name.starts_with("packet_") {
            suites.push(format!("{name}={exe}"));
        }
    }
    if suites.is_empty() {
        bail!(
            "cargo built no packet_* test suite for {}",
            setup::STATIC_TARGET
        );
    }
    Ok(suites.join("\n"))
}

fn demo() -> anyhow::Result<()> {
    require_root("cargo xtask demo")?;
    build(true)?;
    let agent = workspace_root().join("target/release/lb-agent");
    let mut cmd = cargo(&[
        "run",
        "--release",
        "--quiet",
        "--package",
        "xlb-tests",
        "--bin",
        "xlb-demo",
    ]);
    cmd.env("XLB_AGENT_BIN", agent);
    run(&mut cmd)
}

/// Builds the release agent and runs the bench binary (tests/src/bin/xlb-bench.rs). A full run
/// overwrites docs/benchmarks.md and the README's summary; a smoke or partial run only prints.
fn bench(smoke: bool, only: Option<&str>) -> anyhow::Result<()> {
    require_root("cargo xtask bench")?;
    build(true)?;
    let root = workspace_root();
    let mut cmd = cargo(&[
        "run",
        "--release",
        "--quiet",
        "--package",
        "xlb-tests",
        "--bin",
        "xlb-bench",
        "--",
    ]);
    cmd.env("XLB_AGENT_BIN", root.join("target/release/lb-agent"));
    if smoke {
        cmd.arg("--smoke");
    }
    if let Some(only) = only {
        cmd.args(["--only", only]);
    }
    if smoke || only.is_some() {
        cmd.args(["--command", "cargo xtask bench (partial run)"]);
    } else {
        cmd.args(["--command", "cargo xtask bench"])
            .arg("--out")
            .arg(root.join("docs/benchmarks.md"))
            .arg("--readme")
            .arg(root.join("README.md"));
    }
    run(&mut cmd)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf { release } => {
            setup::setup()?;
            build_ebpf(release)
        }
        Cmd::Build { release } => {
            setup::setup()?;
            build(release)
        }
        Cmd::Test { cargo_test_args } => {
            setup::setup()?;
            test(&cargo_test_args)
        }
        Cmd::Demo => {
            setup::setup()?;
            demo()
        }
        Cmd::Bench { smoke, only } => {
            setup::setup()?;
            bench(smoke, only.as_deref())
        }
    }
}
