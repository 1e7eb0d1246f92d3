//! The agent as a real process inside a namespace, with its log captured so tests can wait for
//! `sync applied ... generation=N`.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{Netns, sh};

/// How long a test waits for the agent to reach a state before declaring it stuck. Generous: it
/// guards against hangs, it does not measure speed.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The lb-agent binary: `XLB_AGENT_BIN` (set by `cargo xtask test`) or the debug build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("XLB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent"))
}

/// A fresh directory under the system temp dir for a test's files.
pub fn scratch_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "xlb-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A private bpffs instance, mounted outside /sys so that every `ip netns exec` (which remounts
/// /sys) still sees it: agents started one after the other share its pins, as on a real node.
pub struct BpfFs {
    pub path: PathBuf,
}

impl BpfFs {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        // Unique per instance: tests run concurrently in one process.
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("xlb-bpffs-{tag}{n}-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        sh(&["mount", "-t", "bpf", "bpf", path.to_str().unwrap()])?;
        Ok(Self { path })
    }

    /// The pin directory an agent should use.
    pub fn pin_dir(&self) -> PathBuf {
        self.path.join("xlb")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = sh(&["umount", "-l", self.path.to_str().unwrap()]);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A running `lb-agent`.
pub struct Agent {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `lb-agent <args>` inside `ns`.
    pub fn start(ns: &Netns, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_wrapped(ns, &[], args)
    }

    /// Starts `<wrapper...> lb-agent <args>` inside `ns`, e.g. under `setpriv` to drop
    /// capabilities. The wrapper must exec the agent (so the child is the agent itself).
    pub fn start_wrapped(ns: &Netns, wrapper: &[&str], args: &[&str]) -> anyhow::Result<Self> {
        let bin = agent_bin();
        if !bin.is_file() {
            bail!(
                "{} does not exist: build it with `cargo xtask build`",
                bin.display()
            );
        }
        let mut cmd = match wrapper.split_first() {
            None => ns.command(bin.to_str().unwrap()),
            Some((program, rest)) => {
                let mut cmd = ns.command(program);
                cmd.args(rest).arg(&bin);
                cmd
            }
        };
        // SAFETY: prctl is async-signal-safe. The agent gets SIGKILL if this process dies, so an
        // interrupted test or demo leaves no agent behind.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start lb-agent")?;
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("XLB_TEST_VERBOSE").is_some() {
                        eprintln!("agent| {line}");
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        Ok(Self { child, log })
    }

    /// The agent's process id (`ip netns exec` execs the agent in place, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains every one of `needles`; fails if the agent exits first.
    pub fn wait_for(&mut self, needles: &[&str]) -> anyhow::Result<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self
                .log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Ok(line.to_owned());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "lb-agent exited ({status}) before logging {needles:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "lb-agent did not log {needles:?} within {PATIENCE:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the `sync applied` line of generation `n`.
    pub fn wait_for_sync(&mut self, generation: u64) -> anyhow::Result<String> {
        self.wait_for(&["sync applied", &format!("generation={generation} ")])
    }

    /// Whether the agent is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the `sync applied` line that reflects Kubernetes resourceVersion `rv`.
    pub fn wait_for_rv(&mut self, rv: u64) -> anyhow::Result<String> {
        self.wait_for(&["sync applied", "source=kubernetes", &format!(" rv={rv} ")])
    }

    /// Sends a signal.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        Ok(self.child.wait()?)
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Waits for the agent to exit on its own.
    pub fn wait(mut self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let status = self.child.wait()?;
        // Let the reader threads drain the pipes.
        std::thread::sleep(Duration::from_millis(50));
        Ok((status, self.log()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
