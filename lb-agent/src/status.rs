//! What the running agent tells `lb-agent status`: the dataplane, the model's size, the last sync
//! and its outcome, and what is wrong. The sync loop updates a [`StatusBoard`] after every sync;
//! the board writes it as JSON to the status file (default `/run/xlb/status.json`, replaced
//! atomically so a reader never sees half a file) and serves it on `/status` of the agent's
//! listener when there is one.
//!
//! A file and not only an endpoint: the listener is off by default in standalone mode, and a file
//! still tells what the agent last did after it died (its pid says whether it still runs).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Default status file.
pub const DEFAULT_STATUS_FILE: &str = "/run/xlb/status.json";

/// Everything `lb-agent status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Process id of the agent that wrote this.
    pub pid: u32,
    /// lb-agent version.
    pub version: String,
    /// Unix time (seconds) the agent started.
    pub started_at: f64,
    /// `file` or `kubernetes`.
    pub source: String,
    pub dataplane: DataplaneStatus,
    /// Services and backends in the model; frontends the dataplane holds.
    pub services: usize,
    pub backends: usize,
    pub frontends: Vec<FrontendStatus>,
    /// Syncs stop being healthy when the last one is older than this many seconds.
    pub stale_after_s: f64,
    pub last_sync: Option<SyncStatus>,
    /// Frontends the last sync could not apply, with why (they keep their previous state).
    pub errors: Vec<String>,
    /// Objects the source currently rejects, each with its location and reason.
    pub rejections: Vec<RejectionStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataplaneStatus {
    /// `xdp` or `ipvs`.
    pub mode: String,
    /// Why this dataplane was chosen.
    pub reason: String,
    /// Scheduler of services that do not name one (IPVS name: mh, rr, wrr, sh, lc, wlc).
    pub default_scheduler: String,
    /// XDP: the pin directory and the interfaces the program is attached to.
    pub pin_dir: Option<PathBuf>,
    pub interfaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrontendStatus {
    /// `address:port/PROTOCOL`.
    pub frontend: String,
    pub service: String,
    pub scheduler: String,
    pub backends: usize,
    pub draining: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Unix time (seconds) the sync finished.
    pub at: f64,
    pub generation: u64,
    /// Operations written (0: the dataplane already matched).
    pub ops: usize,
    /// Frontends that could not be applied.
    pub failed: usize,
    /// Frontends the dataplane cannot program (rejected as unsupported).
    pub unsupported: usize,
    pub duration_s: f64,
    /// Every frontend applied.
    pub ok: bool,
    /// Kubernetes mode: the highest resourceVersion applied.
    pub resource_version: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RejectionStatus {
    pub location: String,
    pub reason: String,
    pub detail: String,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The agent's current status, mirrored into the status file.
#[derive(Debug)]
pub struct StatusBoard {
    file: Option<PathBuf>,
    status: Mutex<AgentStatus>,
}

impl StatusBoard {
    /// `file`: where to write the status after every update (`None`: only in memory).
    pub fn new(initial: AgentStatus, file: Option<PathBuf>) -> Arc<Self> {
        let board = Arc::new(Self {
            file,
            status: Mutex::new(initial),
        });
        board.write_file();
        board
    }

    /// A copy of the current status.
    pub fn get(&self) -> AgentStatus {
        self.status.lock().unwrap().clone()
    }

    /// Changes the status and writes the file.
    pub fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.lock().unwrap());
        self.write_file();
    }

    fn write_file(&self) {
        let Some(path) = &self.file else { return };
        let json = match serde_json::to_vec_pretty(&self.get()) {
            Ok(j) => j,
            Err(e) => {
                warn!("could not encode the status: {e}");
                return;
            }
        };
        if let Err(e) = write_atomically(path, &json) {
            warn!(path = %path.display(), "could not write the status file: {e:#}");
        }
    }
}

/// Writes `data` to a temporary file beside `path` and renames it over `path`.
fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

/// Reads a status file.
pub fn read(path: &Path) -> anyhow::Result<AgentStatus> {
    let data = std::fs::read(path).with_context(|| {
        format!(
            "read the status file {} (is the agent running? it writes the file after every \
             sync; give --status-file if it was started with another)",
            path.display()
        )
    })?;
    serde_json::from_slice(&data).with_context(|| format!("parse {}", path.display()))
}

/// Whether a process with this pid exists.
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as i32, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The verdict on a status: `Ok` when the agent runs and syncs, else why not.
pub fn verdict(status: &AgentStatus, alive: bool, now: f64) -> Result<(), String> {
    if !alive {
        return Err(format!(
            "the agent (pid {}) is not running; this is its last status",
            status.pid
        ));
    }
    let Some(sync) = &status.last_sync else {
        return Err("no sync yet".into());
    };
    if !sync.ok {
        return Err(format!(
            "the last sync failed for {} frontend(s)",
            sync.failed
        ));
    }
    let age = Duration::from_secs_f64((now - sync.at).max(0.0));
    if age.as_secs_f64() > status.stale_after_s {
        return Err(format!(
            "no sync for {} (syncs are expected at least every {})",
            humantime::format_duration(Duration::from_secs(age.as_secs())),
            humantime::format_duration(Duration::from_secs_f64(status.stale_after_s).mul_f64(0.5))
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(ok: bool, at: f64) -> AgentStatus {
        AgentStatus {
            pid: 1,
            stale_after_s: 70.0,
            last_sync: Some(SyncStatus {
                at,
                ok,
                failed: if ok { 0 } else { 2 },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(&status(true, 100.0), true, 110.0), Ok(()));
        assert!(
            verdict(&status(true, 100.0), false, 110.0)
                .unwrap_err()
                .contains("not running")
        );
        assert!(
            verdict(&status(false, 100.0), true, 110.0)
                .unwrap_err()
                .contains("failed for 2")
        );
        assert!(
            verdict(&status(true, 100.0), true, 200.0)
                .unwrap_err()
                .contains("no sync for 1m 40s")
        );
        assert_eq!(
            verdict(&AgentStatus::default(), true, 0.0),
            Err("no sync yet".into())
        );
    }

    #[test]
    fn the_file_round_trips_and_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("xlb-status-test-{}", std::process::id()));
        let path = dir.join("sub/status.json");
        let board = StatusBoard::new(status(true, 5.0), Some(path.clone()));
        assert_eq!(read(&path).unwrap(), status(true, 5.0));
        board.update(|s| s.services = 7);
        assert_eq!(read(&path).unwrap().services, 7);
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file stays: {leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
