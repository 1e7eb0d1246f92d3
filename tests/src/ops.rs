//! Helpers for the operations tests: the agent's other commands as processes, the pinned links'
//! kernel ids, and conntrack snapshots.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Output, Stdio},
};

use aya::programs::links::{FdLink, PinnedLink};
use lb_agent::dataplane::pinned::PinnedMaps;
use lb_common::FlowKey;

use crate::{agent::agent_bin, netns::Netns};

/// The outcome of one `lb-agent <args>` run.
#[derive(Debug)]
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for CliRun {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `lb-agent <args>` to completion, inside `ns` when given.
pub fn lb_agent(ns: Option<&Netns>, args: &[&str]) -> CliRun {
    let bin = agent_bin();
    let mut cmd = match ns {
        Some(ns) => ns.command(bin.to_str().unwrap()),
        None => Command::new(&bin),
    };
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", bin.display()))
        .into()
}

/// (link id, program id) of the pinned link `link_<iface>`.
pub fn link_ids(pin_dir: &Path, iface: &str) -> (u32, u32) {
    let link = FdLink::from(
        PinnedLink::from_pin(pin_dir.join(format!("link_{iface}"))).expect("pinned link"),
    );
    let info = link.info().expect("link info");
    (info.id(), info.program_id())
}

/// What a conntrack entry decides: NAT address and port, backend id, service id.
pub type FlowDecision = ([u32; 4], u16, u32, u32);

/// Every conntrack entry's decision (not its timestamps, which packets refresh).
pub fn conntrack(pin_dir: &Path) -> BTreeMap<FlowKey, FlowDecision> {
    PinnedMaps::open(pin_dir)
        .expect("pinned maps")
        .flows()
        .expect("conntrack")
        .into_iter()
        .map(|(k, v)| (k, (v.nat_addr, v.nat_port, v.backend_id, v.service_id)))
        .collect()
}
