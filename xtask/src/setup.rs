//! `cargo xtask setup`: installs what a fresh machine lacks, and says what it installs. Each step
//! checks first, so running it again changes nothing.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::run;

/// Debian packages the build, the tests and the demo use.
/// bpftool: map dumps; iproute2: namespaces, veth, addresses; iputils-ping: ping through VIPs;
/// ethtool: veth GRO for XDP_REDIRECT into veth peers; iptables: the bench baseline;
/// qemu-system-x86: the VM tests (the host kernel has no IPVS, and the XDP program must also
/// pass Debian 12's older verifier; the VM's kernel, busybox, ipvsadm and iproute2 are fetched by
/// the tests themselves with `apt-get download`).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "iptables",
    "qemu-system-x86",
    // The static (musl) agent for the VM: ring, under kube's rustls, compiles C with
    // x86_64-linux-musl-gcc.
    "musl-tools",
];

/// Target of the statically linked agent and packet suites that run inside the VM tests.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// bpf-linker release known to build against nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {line}"))?;
    if !out.status.success() {
        bail!("{line} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn setup() -> anyhow::Result<()> {
    rust_src()?;
    static_target()?;
    bpf_linker()?;
    debian_packages()?;
    bpffs()?;
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("the nightly toolchain is required for the eBPF build (rustup toolchain list)")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: installing rust-src for the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The musl target of the stable toolchain, for the static binaries the VM tests boot.
fn static_target() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == STATIC_TARGET) {
        println!("setup: adding the {STATIC_TARGET} target (static binaries for the VM tests)");
        run(Command::new("rustup").args(["target", "add", STATIC_TARGET]))?;
    }
    Ok(())
}

/// LLVM major.minor of the nightly toolchain, e.g. (22, 1).
fn nightly_llvm_version() -> anyhow::Result<(u32, u32)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV prints no LLVM version")?;
    let mut parts = version.trim().split('.');
    let major = parts.next().unwrap_or_default().parse()?;
    let minor = parts.next().unwrap_or("0").parse()?;
    Ok((major, minor))
}

/// Where bpf-linker finds libLLVM. Its rpath points here, so it must outlive the build.
fn llvm_prefix(major: u32) -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(format!(".local/share/xlb/llvm-{major}"))
}

fn bpf_linker_works() -> bool {
    succeeds(Command::new("bpf-linker").arg("--version"))
}

/// bpf-linker needs a libLLVM of the same major version as the nightly rustc; a plain
/// `cargo install` wants a system LLVM that Debian does not ship. The nightly sysroot carries its
/// own libLLVM, so symlink it into a prefix (under its versioned name, which the binary's rpath
/// looks up, and as libLLVM.so, which the build links) and build bpf-linker against that.
fn bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let (major, minor) = nightly_llvm_version()?;
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let libdir = sysroot.join("lib");
    let wanted = format!("libLLVM.so.{major}.{minor}");
    let lib = std::fs::read_dir(&libdir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .find(|n| n.to_string_lossy().starts_with(&wanted))
        .with_context(|| format!("no {wanted}* in {}", libdir.display()))?;
    let prefix = llvm_prefix(major);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in [Path::new(&lib), Path::new("libLLVM.so")] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&lib), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    println!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major}.{minor} ({})",
        prefix.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env(format!("LLVM_SYS_{major}{minor}_PREFIX"), &prefix)
        .env_remove("RUSTUP_TOOLCHAIN"))?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let status = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !status
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (the agent pins its maps there).
pub fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let bpffs_mounted = mounts.lines().any(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        fields.get(1) == Some(&"/sys/fs/bpf") && fields.get(2) == Some(&"bpf")
    });
    if bpffs_mounted {
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
