//! `lb-agent status [--json]`: what the agent last reported in its status file (written after
//! every sync, see [`crate::status`]): whether it runs, the dataplane, the model's size, the
//! last sync and its outcome, errors and rejections.
//!
//! Exit code: 0 when the agent runs and its syncs succeed and are recent, 1 otherwise (not
//! running, no sync yet, the last sync failed for some frontends, or syncs stopped).

use std::{path::PathBuf, time::Duration};

use serde::Serialize;

use super::render_table;
use crate::status::{self, AgentStatus, DEFAULT_STATUS_FILE, unix_now};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The status file the agent writes (`lb-agent run --status-file`).
    #[arg(long, default_value = DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
}

/// `status --json`: the verdict and the agent's own report.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub running: bool,
    pub healthy: bool,
    /// Why not healthy.
    pub problem: Option<String>,
    #[serde(flatten)]
    pub status: AgentStatus,
}

fn ago(now: f64, at: f64) -> String {
    let secs = (now - at).max(0.0).round() as u64;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

/// The text for people.
pub fn render(report: &StatusReport, now: f64) -> String {
    let s = &report.status;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    line(
        "agent:",
        if report.running {
            format!(
                "running (pid {}, lb-agent {}, started {})",
                s.pid,
                s.version,
                ago(now, s.started_at)
            )
        } else {
            format!("NOT RUNNING (pid {} is gone; last status below)", s.pid)
        },
    );
    line(
        "health:",
        match &report.problem {
            None => "ok".into(),
            Some(p) => format!("FAILING: {p}"),
        },
    );
    let mut dataplane = format!(
        "{} ({}), default scheduler {}",
        s.dataplane.mode, s.dataplane.reason, s.dataplane.default_scheduler
    );
    if let Some(pin) = &s.dataplane.pin_dir {
        dataplane.push_str(&format!(", pin dir {}", pin.display()));
    }
    if !s.dataplane.interfaces.is_empty() {
        dataplane.push_str(&format!(", on {}", s.dataplane.interfaces.join(",")));
    }
    line("dataplane:", dataplane);
    line("source:", s.source.clone());
    line(
        "model:",
        format!(
            "{} services, {} frontends, {} backends",
            s.services,
            s.frontends.len(),
            s.backends
        ),
    );
    line(
        "last sync:",
        match &s.last_sync {
            None => "none yet".into(),
            Some(sync) => {
                let mut l = format!(
                    "{}, generation {}, {} ops, {}, took {:.1} ms",
                    ago(now, sync.at),
                    sync.generation,
                    sync.ops,
                    if sync.ok {
                        "ok".to_owned()
                    } else {
                        format!("FAILED for {} frontends", sync.failed)
                    },
                    sync.duration_s * 1e3
                );
                if let Some(rv) = &sync.resource_version {
                    l.push_str(&format!(", resourceVersion {rv}"));
                }
                l
            }
        },
    );
    line(
        "errors:",
        if s.errors.is_empty() {
            "none".into()
        } else {
            s.errors.len().to_string()
        },
    );
    for e in &s.errors {
        out.push_str(&format!("  {e}\n"));
    }
    out.push_str(&format!(
        "{:<12}{}\n",
        "rejected:",
        if s.rejections.is_empty() {
            "none".into()
        } else {
            s.rejections.len().to_string()
        }
    ));
    for r in &s.rejections {
        out.push_str(&format!("  {} [{}]: {}\n", r.location, r.reason, r.detail));
    }
    if !s.frontends.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = s
            .frontends
            .iter()
            .map(|f| {
                vec![
                    f.frontend.clone(),
                    f.service.clone(),
                    f.scheduler.clone(),
                    f.backends.to_string(),
                    f.draining.to_string(),
                ]
            })
            .collect();
        out.push_str(&render_table(
            &["FRONTEND", "SERVICE", "SCHED", "BACKENDS", "DRAINING"],
            &rows,
        ));
    }
    out
}

/// Runs the command. Exit code 0 when healthy, 1 otherwise.
pub fn run(args: &StatusArgs) -> anyhow::Result<i32> {
    let status = status::read(&args.status_file)?;
    let running = status::process_alive(status.pid);
    let now = unix_now();
    let problem = status::verdict(&status, running, now).err();
    let report = StatusReport {
        running,
        healthy: problem.is_none(),
        problem,
        status,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, now));
    }
    Ok(if report.healthy { 0 } else { 1 })
}
