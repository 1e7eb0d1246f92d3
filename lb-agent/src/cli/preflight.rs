//! `lb-agent preflight [--iface IF,...] [--json]`: can xlb run on this node, and with which
//! dataplane? Every check reports ok, warn, fail or skip, with the fix for anything not ok.
//!
//! | check | why |
//! |---|---|
//! | kernel version | XDP links (5.9) and the helpers lb-ebpf calls (5.11) |
//! | BPF syscall | creating a map proves the syscall exists and is permitted |
//! | kernel BTF | /sys/kernel/btf/vmlinux, for BTF-defined maps and CO-RE |
//! | bpffs | the pin directory must be on a BPF filesystem for restarts to keep state |
//! | XDP program | the embedded program passes this kernel's verifier |
//! | XDP on <iface> | attaching in driver mode, else generic mode, then detaching |
//! | net.ipv4.ip_forward | both dataplanes forward; the XDP FIB lookup refuses when it is 0 |
//! | bridge-nf-call-iptables | when br_netfilter is loaded (as kube-proxy's IPVS mode wants) |
//! | IPVS | the "IPVS" generic netlink family, or the ip_vs modules on disk |
//! | conntrack limits | nf_conntrack_max (IPVS) and xlb's own conntrack map size |
//!
//! Exit code (the verdict): **0** XDP can run here (IPVS may too), **10** only IPVS can, **20**
//! neither. `lb-agent run --dataplane auto` makes the same choice.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::render_table;
use crate::dataplane::{
    ipvs,
    xdp::{self, AttachMode, LoadOptions, XdpDataplane},
};

/// Exit code: XDP can run.
pub const EXIT_XDP: i32 = 0;
/// Exit code: only IPVS can run.
pub const EXIT_IPVS_ONLY: i32 = 10;
/// Exit code: neither can run.
pub const EXIT_NEITHER: i32 = 20;

/// Oldest kernel the XDP dataplane supports: bpf_ktime_get_coarse_ns arrived in 5.11.
const MIN_XDP_KERNEL: (u32, u32) = (5, 11);
/// Modules the IPVS dataplane uses (the core, the schedulers xlb maps to, conntrack for NAT).
const IPVS_MODULES: [&str; 5] = ["ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "nf_conntrack"];

#[derive(clap::Args, Debug)]
pub struct PreflightArgs {
    /// Interfaces to try attaching XDP to, comma separated (as `run --iface`).
    #[arg(long, value_name = "IF[,IF...]", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// bpffs directory the agent will pin to.
    #[arg(long, default_value = lb_common::maps::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Works, but something is worth fixing; does not change the verdict.
    Warn,
    Fail,
    /// Does not apply here.
    Skip,
}

/// Which verdicts a failed check rules out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Needed {
    Xdp,
    Ipvs,
    Both,
    Neither,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
    pub needed_by: Needed,
    pub detail: String,
    /// What to do about it, when not ok.
    pub fix: Option<String>,
}

impl Check {
    fn new(
        name: impl Into<String>,
        needed_by: Needed,
        result: Result<String, (String, String)>,
    ) -> Self {
        let (outcome, detail, fix) = match result {
            Ok(d) => (Outcome::Ok, d, None),
            Err((d, f)) => (Outcome::Fail, d, Some(f)),
        };
        Self {
            name: name.into(),
            outcome,
            needed_by,
            detail,
            fix,
        }
    }

    fn with(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub xdp: bool,
    pub ipvs: bool,
    /// `xdp`, `ipvs` or `none`.
    pub verdict: &'static str,
    pub exit_code: i32,
}

/// Computes the verdict from the checks.
pub fn verdict(checks: Vec<Check>) -> Report {
    let blocks = |d: Needed| {
        checks.iter().any(|c| {
            c.outcome == Outcome::Fail && (c.needed_by == d || c.needed_by == Needed::Both)
        })
    };
    let xdp = !blocks(Needed::Xdp);
    let ipvs = !blocks(Needed::Ipvs);
    let (verdict, exit_code) = match (xdp, ipvs) {
        (true, _) => ("xdp", EXIT_XDP),
        (false, true) => ("ipvs", EXIT_IPVS_ONLY),
        (false, false) => ("none", EXIT_NEITHER),
    };
    Report {
        checks,
        xdp,
        ipvs,
        verdict,
        exit_code,
    }
}

/// `major.minor` of a kernel release string such as `6.1.0-18-amd64`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel_release() -> String {
    // SAFETY: uname fills the struct we own.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn check_kernel(release: &str) -> Check {
    let result = match parse_kernel_version(release) {
        Some(v) if v >= MIN_XDP_KERNEL => Ok(format!("Linux {release}")),
        Some(_) => Err((
            format!(
                "Linux {release} is older than {}.{}, which the XDP program needs (XDP links, \
                 bpf_ktime_get_coarse_ns)",
                MIN_XDP_KERNEL.0, MIN_XDP_KERNEL.1
            ),
            "upgrade the kernel, or run with --dataplane ipvs".into(),
        )),
        None => Err((
            format!("cannot read the kernel version from {release:?}"),
            "check uname -r".into(),
        )),
    };
    Check::new("kernel version", Needed::Xdp, result)
}

/// Creates (and closes) a one-entry array map: proves the bpf() syscall exists and is allowed.
fn check_bpf_syscall() -> Check {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, then
    // fields that must be zero.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: bpf(BPF_MAP_CREATE = 0) reads `size_of_val(&attr)` bytes of attr we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    let result = if fd >= 0 {
        // SAFETY: fd is a descriptor we just got and own.
        unsafe { libc::close(fd as i32) };
        Ok("bpf(BPF_MAP_CREATE) works".to_owned())
    } else {
        let e = std::io::Error::last_os_error();
        Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => (
                "the kernel has no bpf() syscall".into(),
                "use a kernel built with CONFIG_BPF_SYSCALL=y".into(),
            ),
            Some(libc::EPERM) => (
                format!("bpf() is not permitted: {e}"),
                "run as root, or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (the DaemonSet's \
                 capabilities); check the memlock limit on kernels before 5.11"
                    .into(),
            ),
            _ => (
                format!("bpf(BPF_MAP_CREATE) failed: {e}"),
                "see the error".into(),
            ),
        })
    };
    Check::new("BPF syscall", Needed::Xdp, result)
}

fn check_btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    let result = if path.exists() {
        Ok(format!("{} present", path.display()))
    } else {
        Err((
            format!("{} is missing", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's \
             kernel since 2020 is)"
                .into(),
        ))
    };
    Check::new("kernel BTF", Needed::Xdp, result)
}

fn check_bpffs(pin_dir: &Path) -> Check {
    let result = xdp::check_bpffs(pin_dir)
        .map(|()| {
            format!(
                "{} is on bpffs",
                pin_dir
                    .parent()
                    .filter(|p| p.exists())
                    .unwrap_or(pin_dir)
                    .display()
            )
        })
        .map_err(|e| {
            (
                format!("{e:#}"),
                "mount -t bpf bpf /sys/fs/bpf (and mount it into the agent's container)".into(),
            )
        });
    Check::new("bpffs", Needed::Xdp, result)
}

/// A private copy of the program with tiny maps: nothing pinned, nothing left behind.
fn load_probe() -> anyhow::Result<XdpDataplane> {
    XdpDataplane::load(&LoadOptions {
        pin_dir: None,
        max_services: 16,
        max_backends: 16,
        conntrack_max: 16,
        ..LoadOptions::default()
    })
}

fn check_program() -> Check {
    let result = load_probe()
        .map(|_| "the embedded program loads and passes the verifier".to_owned())
        .map_err(|e| {
            let full = format!("{e:#}");
            let first = full
                .split(" Verifier output:")
                .next()
                .unwrap_or(&full)
                .to_owned();
            (
                first,
                "needs root/CAP_BPF and a kernel the program was built for; run the agent with \
                 RUST_LOG=debug to see the verifier log, or use --dataplane ipvs"
                    .into(),
            )
        });
    Check::new("XDP program", Needed::Xdp, result)
}

/// Attaches in driver mode, then in generic mode, and detaches (dropping the probe detaches).
fn check_iface(iface: &str, pin_dir: &Path) -> Check {
    let name = format!("XDP on {iface}");
    if pin_dir.join(format!("link_{iface}")).exists() {
        return Check::new(
            name,
            Needed::Xdp,
            Ok("xlb's program is attached already (pinned link)".into()),
        );
    }
    let attempt = |mode| -> anyhow::Result<()> {
        let mut probe = load_probe()?;
        probe.attach(&[iface.to_owned()], mode)
    };
    match attempt(AttachMode::Driver) {
        Ok(()) => Check::new(name, Needed::Xdp, Ok("native (driver) mode".into())),
        Err(driver) => match attempt(AttachMode::Generic) {
            Ok(()) => Check::new(
                name,
                Needed::Xdp,
                Err((
                    format!("generic (skb) mode only; driver mode failed: {driver:#}"),
                    "works, but much slower: use a NIC driver with native XDP, or accept generic \
                     mode (the agent falls back to it with a warning)"
                        .into(),
                )),
            )
            .with(Outcome::Warn),
            Err(generic) => Check::new(
                name,
                Needed::Xdp,
                Err((
                    format!("cannot attach: {generic:#}"),
                    format!(
                        "check that {iface} exists and has no other XDP program (ip link show \
                         {iface}; ip link set dev {iface} xdp off)"
                    ),
                )),
            ),
        },
    }
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn check_ip_forward() -> Check {
    let result = match read_sysctl("/proc/sys/net/ipv4/ip_forward").as_deref() {
        Some("1") => Ok("net.ipv4.ip_forward = 1".into()),
        other => Err((
            format!("net.ipv4.ip_forward = {}", other.unwrap_or("unreadable")),
            "sysctl -w net.ipv4.ip_forward=1 (and set it in /etc/sysctl.d/): the node forwards \
             traffic to backends"
                .into(),
        )),
    };
    Check::new("net.ipv4.ip_forward", Needed::Both, result)
}

fn check_bridge_nf() -> Check {
    let name = "bridge-nf-call-iptables";
    match read_sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables").as_deref() {
        None => Check::new(
            name,
            Needed::Neither,
            Ok("br_netfilter is not loaded".into()),
        )
        .with(Outcome::Skip),
        Some("1") => Check::new(
            name,
            Needed::Neither,
            Ok("net.bridge.bridge-nf-call-iptables = 1".into()),
        ),
        Some(v) => Check::new(
            name,
            Needed::Ipvs,
            Err((
                format!("net.bridge.bridge-nf-call-iptables = {v} while br_netfilter is loaded"),
                "sysctl -w net.bridge.bridge-nf-call-iptables=1: bridged pod traffic must pass \
                 netfilter for IPVS NAT replies"
                    .into(),
            )),
        )
        .with(Outcome::Warn),
    }
}

/// IPVS modules present under /lib/modules/<release>, built in or as files.
fn ipvs_modules_on_disk(release: &str) -> (Vec<&'static str>, Vec<&'static str>) {
    let dir = Path::new("/lib/modules").join(release);
    let listed = [
        std::fs::read_to_string(dir.join("modules.dep")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default(),
    ]
    .concat();
    IPVS_MODULES.iter().partition(|m| {
        listed.lines().any(|l| {
            let path = l.split(':').next().unwrap_or_default();
            let file = path.rsplit('/').next().unwrap_or_default();
            file.strip_suffix(".ko")
                .or_else(|| file.strip_suffix(".ko.xz"))
                .or_else(|| file.strip_suffix(".ko.zst"))
                .or_else(|| file.strip_suffix(".ko.gz"))
                == Some(m)
        })
    })
}

fn check_ipvs(release: &str) -> Check {
    let result = match ipvs::probe() {
        Ok(()) => Ok("the \"IPVS\" generic netlink family resolves".into()),
        Err(e) => {
            let (present, missing) = ipvs_modules_on_disk(release);
            if missing.is_empty() {
                Ok(format!(
                    "not loaded, but its modules are installed ({}); the kernel loads ip_vs on \
                     first use",
                    present.join(", ")
                ))
            } else {
                Err((
                    format!(
                        "{e:#}; modules missing under /lib/modules/{release}: {}",
                        missing.join(", ")
                    ),
                    "install the kernel's IPVS modules (modprobe ip_vs ip_vs_rr ip_vs_wrr \
                     ip_vs_sh nf_conntrack) or use a kernel with CONFIG_IP_VS"
                        .into(),
                ))
            }
        }
    };
    Check::new("IPVS", Needed::Ipvs, result)
}

fn check_conntrack_limits() -> Check {
    let mut detail = match read_sysctl("/proc/sys/net/netfilter/nf_conntrack_max") {
        Some(v) => format!("nf_conntrack_max = {v} (IPVS NAT flows)"),
        None => "nf_conntrack is not loaded".into(),
    };
    detail.push_str(&format!(
        "; xlb's XDP conntrack holds {} entries ({} flows), --conntrack-max",
        lb_common::maps::CONNTRACK_MAX,
        lb_common::maps::CONNTRACK_MAX / 2
    ));
    Check::new("conntrack limits", Needed::Neither, Ok(detail))
}

/// Runs every check.
pub fn checks(args: &PreflightArgs) -> Vec<Check> {
    let release = kernel_release();
    let mut checks = vec![
        check_kernel(&release),
        check_bpf_syscall(),
        check_btf(),
        check_bpffs(&args.pin_dir),
        check_program(),
    ];
    if args.iface.is_empty() {
        checks.push(
            Check::new(
                "XDP on interfaces",
                Needed::Neither,
                Ok("no --iface given: attaching not tried".into()),
            )
            .with(Outcome::Skip),
        );
    }
    for iface in &args.iface {
        checks.push(check_iface(iface, &args.pin_dir));
    }
    checks.extend([
        check_ip_forward(),
        check_bridge_nf(),
        check_ipvs(&release),
        check_conntrack_limits(),
    ]);
    checks
}

/// The report for people.
pub fn render(report: &Report) -> String {
    let rows: Vec<Vec<String>> = report
        .checks
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                format!("{:?}", c.outcome).to_uppercase(),
                c.detail.clone(),
            ]
        })
        .collect();
    let mut out = render_table(&["CHECK", "RESULT", "DETAIL"], &rows);
    let fixes: Vec<&Check> = report.checks.iter().filter(|c| c.fix.is_some()).collect();
    if !fixes.is_empty() {
        out.push_str("\nTo fix:\n");
        for c in fixes {
            out.push_str(&format!(
                "  {}: {}\n",
                c.name,
                c.fix.as_deref().unwrap_or_default()
            ));
        }
    }
    out.push_str(&format!(
        "\nverdict: {} (XDP {}, IPVS {}; exit code {})\n",
        match report.verdict {
            "xdp" => "the XDP dataplane can run here",
            "ipvs" => "only the IPVS dataplane can run here",
            _ => "neither dataplane can run here",
        },
        if report.xdp { "yes" } else { "no" },
        if report.ipvs { "yes" } else { "no" },
        report.exit_code
    ));
    out
}

/// Runs the command. The exit code is the verdict.
pub fn run(args: &PreflightArgs) -> anyhow::Result<i32> {
    let report = verdict(checks(args));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(report.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(needed_by: Needed, outcome: Outcome) -> Check {
        Check {
            name: "x".into(),
            outcome,
            needed_by,
            detail: String::new(),
            fix: None,
        }
    }

    #[test]
    fn verdicts_and_exit_codes() {
        let r = verdict(vec![check(Needed::Neither, Outcome::Fail)]);
        assert_eq!((r.verdict, r.exit_code), ("xdp", 0));
        let r = verdict(vec![check(Needed::Ipvs, Outcome::Fail)]);
        assert_eq!(
            (r.verdict, r.exit_code, r.xdp, r.ipvs),
            ("xdp", 0, true, false)
        );
        let r = verdict(vec![check(Needed::Xdp, Outcome::Fail)]);
        assert_eq!((r.verdict, r.exit_code), ("ipvs", 10));
        let r = verdict(vec![check(Needed::Both, Outcome::Fail)]);
        assert_eq!((r.verdict, r.exit_code), ("none", 20));
        // Warnings never change the verdict.
        let r = verdict(vec![
            check(Needed::Xdp, Outcome::Warn),
            check(Needed::Ipvs, Outcome::Warn),
        ]);
        assert_eq!((r.verdict, r.ipvs), ("xdp", true));
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("5.10.0"), Some((5, 10)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert_eq!(check_kernel("5.10.0-28-amd64").outcome, Outcome::Fail);
        assert_eq!(check_kernel("5.11.0").outcome, Outcome::Ok);
        assert_eq!(check_kernel("6.18.44-fc").outcome, Outcome::Ok);
    }
}
