//! `lb-agent preflight` on this host's kernel (which has XDP and no IPVS), inside a namespace with
//! a veth pair: the verdict and exit code, each check with its fix, and no trace left behind.

use serde_json::Value;
use xlb_tests::{
    agent::BpfFs,
    netns::{Netns, require_privileges},
    ops::lb_agent,
};

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

#[test]
fn preflight_says_xdp_yes_ipvs_no_here_and_names_the_fixes() {
    require_privileges();
    let ns = Netns::new("preflight").unwrap();
    ns.ip(&[
        "link", "add", "xlb0", "type", "veth", "peer", "name", "xlb1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "xlb0", "up"]).unwrap();
    ns.ip(&["link", "set", "xlb1", "up"]).unwrap();
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let bpffs = BpfFs::new("preflight").unwrap();
    let pin_dir = bpffs.pin_dir();
    let pin = pin_dir.to_str().unwrap();

    let run = lb_agent(
        Some(&ns),
        &["preflight", "--iface", "xlb0", "--pin-dir", pin],
    );
    assert_eq!(run.code, 0, "XDP can run: {run:?}");
    // Columns are aligned; compare with runs of blanks collapsed.
    let squeezed: String = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
        .collect();
    for expected in [
        "XDP on xlb0 OK native (driver) mode",
        "BPF syscall OK bpf(BPF_MAP_CREATE) works",
        "kernel BTF OK /sys/kernel/btf/vmlinux present",
        "XDP program OK the embedded program loads and passes the verifier",
        "net.ipv4.ip_forward OK net.ipv4.ip_forward = 1",
        "verdict: the XDP dataplane can run here (XDP yes, IPVS no; exit code 0)",
    ] {
        assert!(
            squeezed.contains(expected),
            "missing {expected:?}:\n{}",
            run.stdout
        );
    }
    // This host's kernel has no IPVS (no ip_vs, no /lib/modules): the check says so with the fix.
    let ipvs_line = run.stdout.lines().find(|l| l.starts_with("IPVS ")).unwrap();
    assert!(ipvs_line.contains("FAIL"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("  IPVS: install the kernel's IPVS modules"),
        "{}",
        run.stdout
    );
    // The probe attached and detached again, and pinned nothing.
    assert!(!ns.ip(&["link", "show", "xlb0"]).unwrap().contains("xdp"));
    assert!(!pin_dir.exists(), "preflight creates no pin directory");

    let run = lb_agent(
        Some(&ns),
        &["preflight", "--iface", "xlb0", "--pin-dir", pin, "--json"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["verdict"], "xdp");
    assert_eq!(report["xdp"], true);
    assert_eq!(report["ipvs"], false);
    assert_eq!(report["exit_code"], 0);
    assert_eq!(check(&report, "bpffs")["outcome"], "ok");
    assert_eq!(check(&report, "kernel version")["outcome"], "ok");
    assert_eq!(check(&report, "IPVS")["outcome"], "fail");
    assert_eq!(check(&report, "conntrack limits")["outcome"], "ok");

    // Forwarding off: neither dataplane can forward; the fix is named.
    ns.sysctl("net.ipv4.ip_forward", "0").unwrap();
    let run = lb_agent(
        Some(&ns),
        &["preflight", "--iface", "xlb0", "--pin-dir", pin, "--json"],
    );
    assert_eq!(run.code, 20, "{run:?}");
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let forward = check(&report, "net.ipv4.ip_forward");
    assert_eq!(forward["outcome"], "fail");
    assert_eq!(forward["detail"], "net.ipv4.ip_forward = 0");
    assert!(
        forward["fix"]
            .as_str()
            .unwrap()
            .starts_with("sysctl -w net.ipv4.ip_forward=1")
    );
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();

    // An interface XDP cannot attach to, and a pin dir off bpffs.
    let run = lb_agent(
        Some(&ns),
        &["preflight", "--iface", "nope0", "--pin-dir", pin, "--json"],
    );
    assert_eq!(run.code, 20, "{run:?}");
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(check(&report, "XDP on nope0")["outcome"], "fail");
    let run = lb_agent(
        Some(&ns),
        &["preflight", "--pin-dir", "/tmp/xlb-not-bpffs/xlb", "--json"],
    );
    assert_eq!(run.code, 20, "{run:?}");
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let bpffs_check = check(&report, "bpffs");
    assert_eq!(bpffs_check["outcome"], "fail");
    assert!(
        bpffs_check["fix"]
            .as_str()
            .unwrap()
            .contains("mount -t bpf bpf /sys/fs/bpf")
    );
}
