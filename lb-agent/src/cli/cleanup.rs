//! `lb-agent cleanup`: removes everything xlb created on this node, for a clean rollback (to
//! kube-proxy, say):
//! * XDP: every pinned link `link_<iface>` is unpinned and closed, which detaches the program
//!   from the interface; then every map pin, then the pin directory itself. This drops the
//!   conntrack state: open connections through VIPs break, as they would with any other switch of
//!   load balancer.
//! * IPVS: xlb's virtual services (those whose VIP is on the VIP interface) and the VIP interface
//!   (`kube-ipvs0`) with its addresses. Other IPVS services are left alone.
//! * The status file.
//!
//! It refuses while the agent that wrote the status file still runs (stop it first: a running
//! agent would recreate what was removed). Running it again finds nothing and succeeds.
//!
//! Exit code: 0 when everything xlb made is gone, 1 when something could not be removed.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::programs::links::{FdLink, PinnedLink};
use lb_common::maps;

use crate::{
    dataplane::ipvs::{self, DEFAULT_VIP_IFACE},
    status::{self, DEFAULT_STATUS_FILE},
};

#[derive(clap::Args, Debug)]
pub struct CleanupArgs {
    /// bpffs directory of the pinned maps and links.
    #[arg(long, default_value = maps::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// IPVS: the dummy interface holding xlb's VIPs.
    #[arg(long, value_name = "IF", default_value = DEFAULT_VIP_IFACE)]
    pub ipvs_vip_iface: String,
    /// The agent's status file.
    #[arg(long, default_value = DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
}

/// Detaches and unpins every link, removes every map pin and the directory. Returns what it
/// did, one line each; fails on the first thing it cannot remove.
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("read {}", pin_dir.display())),
    };
    let mut names: Vec<String> = entries
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    // Links first: with the program detached, nothing reads the maps any more.
    for name in names.iter().filter(|n| n.starts_with("link_")) {
        let path = pin_dir.join(name);
        let link = PinnedLink::from_pin(&path)
            .with_context(|| format!("open the pinned link {}", path.display()))?;
        let fd_link: FdLink = link
            .unpin()
            .with_context(|| format!("unpin {}", path.display()))?;
        let info = fd_link.info().ok();
        // Closing the last descriptor of an XDP bpf_link detaches its program.
        drop(fd_link);
        let iface = name.trim_start_matches("link_");
        done.push(match info {
            Some(i) => format!(
                "detached the XDP program (prog id {}) from {iface}: link {} removed",
                i.program_id(),
                i.id()
            ),
            None => format!("detached the XDP program from {iface}"),
        });
    }
    let mut unknown = Vec::new();
    for name in names.iter().filter(|n| !n.starts_with("link_")) {
        if !maps::ALL.contains(&name.as_str()) {
            unknown.push(name.clone());
            continue;
        }
        let path = pin_dir.join(name);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        done.push(format!("removed the pinned map {}", path.display()));
    }
    if !unknown.is_empty() {
        bail!(
            "{} holds pins xlb does not know ({}); left them and the directory in place",
            pin_dir.display(),
            unknown.join(", ")
        );
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("remove {}", pin_dir.display()))?;
    done.push(format!("removed {}", pin_dir.display()));
    Ok(done)
}

/// Runs the command; prints what it removed.
pub fn run(args: &CleanupArgs) -> anyhow::Result<i32> {
    if let Ok(s) = status::read(&args.status_file)
        && status::process_alive(s.pid)
        && s.pid != std::process::id()
    {
        bail!(
            "the agent (pid {}) is still running; stop it first, or it recreates what cleanup \
             removes",
            s.pid
        );
    }
    let mut failed = false;
    match remove_pins(&args.pin_dir) {
        Ok(done) if done.is_empty() => {
            println!("xdp: nothing pinned in {}", args.pin_dir.display())
        }
        Ok(done) => done.iter().for_each(|d| println!("xdp: {d}")),
        Err(e) => {
            eprintln!("xdp: {e:#}");
            failed = true;
        }
    }
    match ipvs::cleanup(&args.ipvs_vip_iface) {
        Ok(done) => {
            for key in &done.services_removed {
                println!("ipvs: removed the virtual service {key}");
            }
            if done.vip_iface_removed {
                println!(
                    "ipvs: removed the VIP interface {} and its addresses",
                    args.ipvs_vip_iface
                );
            } else if done.ipvs_present {
                println!(
                    "ipvs: no {} interface: no xlb services",
                    args.ipvs_vip_iface
                );
            } else {
                println!("ipvs: this kernel has no IPVS; nothing to remove");
            }
        }
        Err(e) => {
            eprintln!("ipvs: {e:#}");
            failed = true;
        }
    }
    match std::fs::remove_file(&args.status_file) {
        Ok(()) => println!("removed the status file {}", args.status_file.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            eprintln!("could not remove {}: {e}", args.status_file.display());
            failed = true;
        }
    }
    Ok(if failed { 1 } else { 0 })
}
