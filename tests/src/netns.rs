//! Network namespaces for tests and the demo: created with iproute2, removed on drop, and
//! entered from Rust threads (setns) so test clients and servers are real sockets in them.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Fails loudly unless the process can do what privileged tests need: root, kernel BTF.
/// (bpffs is mounted by the harness itself where needed.)
pub fn require_privileges() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run it through `cargo xtask test` as root"
    );
    assert!(
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "this test needs a kernel with BTF (/sys/kernel/btf/vmlinux is missing)"
    );
}

/// Runs a command; fails with its output if it does not succeed.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {args:?}"))?;
    check(args, out)
}

fn check(args: &[&str], out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "{args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace named `xlb-<role>-<pid>-<n>`, with loopback up.
    pub fn new(role: &str) -> anyhow::Result<Self> {
        let name = format!(
            "xlb-{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command that will run inside the namespace (for long-running processes).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a new thread that has joined this namespace, so sockets it opens live here.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let handle = self.spawn(f)?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))
    }

    /// Starts `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<T>> {
        let file = File::open(format!("/var/run/netns/{}", self.name))
            .with_context(|| format!("open netns {}", self.name))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns on a thread only changes that thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes every namespace and bpffs mount this process created (for Ctrl-C handlers; the
/// normal path relies on the guards' destructors). Agents die with the process (PDEATHSIG).
pub fn remove_leftovers() {
    let tag = format!("-{}-", std::process::id());
    if let Ok(list) = sh(&["ip", "netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with("xlb-") && name.contains(&tag) {
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        let suffix = format!("-{}", std::process::id());
        for path in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if path.contains("xlb-bpffs-") && path.ends_with(&suffix) {
                let _ = sh(&["umount", "-l", path]);
            }
        }
    }
}

/// Moves the calling thread into a fresh, empty network namespace (only `lo`, down). Packet tests
/// use it so the program's FIB lookups see no routes and give the same answer on every machine.
pub fn isolate_thread() -> anyhow::Result<()> {
    // SAFETY: unshare(CLONE_NEWNET) affects only the calling thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    Ok(())
}

/// Pins the calling thread to one CPU. Packets a thread sends through a veth are processed on
/// its CPU, so pinning fixes which per-CPU state (round-robin cursors) they meet.
pub fn pin_thread_to_cpu(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is empty; the calls only touch it and this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}
