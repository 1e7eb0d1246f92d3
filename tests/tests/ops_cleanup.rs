//! `lb-agent cleanup` removes everything xlb made: after a `--on-exit keep` stop and after a
//! SIGKILL, no link, no pin, no pin directory and no XDP program stay; the VIP interface goes;
//! a second run finds nothing; and it refuses while the agent runs.

use std::path::Path;

use xlb_tests::{
    agent::{Agent, BpfFs, scratch_dir},
    netns::{Netns, require_privileges},
    ops::lb_agent,
};

fn xdp_attached(ns: &Netns, iface: &str) -> bool {
    ns.ip(&["link", "show", iface])
        .unwrap()
        .contains("prog/xdp")
}

fn namespace() -> Netns {
    let ns = Netns::new("cleanup").unwrap();
    for (a, b) in [("xlb0", "xlb1"), ("xlb2", "xlb3")] {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])
            .unwrap();
        ns.ip(&["link", "set", a, "up"]).unwrap();
        ns.ip(&["link", "set", b, "up"]).unwrap();
    }
    ns
}

fn start(ns: &Netns, file: &Path, pin_dir: &Path, status: &Path, extra: &[&str]) -> Agent {
    let mut args = vec![
        "run",
        "--services",
        file.to_str().unwrap(),
        "--iface",
        "xlb0,xlb2",
        "--pin-dir",
        pin_dir.to_str().unwrap(),
        "--status-file",
        status.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut agent = Agent::start(ns, &args).unwrap();
    agent.wait_for_sync(1).unwrap();
    agent
}

fn assert_clean(ns: &Netns, pin_dir: &Path, status: &Path) {
    assert!(!pin_dir.exists(), "the pin directory is gone");
    assert!(!status.exists(), "the status file is gone");
    for iface in ["xlb0", "xlb2"] {
        assert!(!xdp_attached(ns, iface), "{iface} has no XDP program");
    }
}

#[test]
fn cleanup_leaves_no_pin_and_no_program() {
    require_privileges();
    let ns = namespace();
    let bpffs = BpfFs::new("cleanup").unwrap();
    let pin_dir = bpffs.pin_dir();
    let dir = scratch_dir();
    let file = dir.join("services.yaml");
    let status = dir.join("status.json");
    std::fs::write(
        &file,
        "services:\n  - {name: web, vip: 10.96.0.10, port: 80, backends: [{ip: 10.10.2.11, port: 8080}]}\n",
    )
    .unwrap();
    let cleanup = |ns: &Netns| {
        lb_agent(
            Some(ns),
            &[
                "cleanup",
                "--pin-dir",
                pin_dir.to_str().unwrap(),
                "--status-file",
                status.to_str().unwrap(),
            ],
        )
    };

    // A running agent: refused, nothing removed.
    let agent = start(&ns, &file, &pin_dir, &status, &[]);
    let run = cleanup(&ns);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("is still running; stop it first"),
        "{run:?}"
    );
    assert!(pin_dir.join("link_xlb0").exists() && xdp_attached(&ns, "xlb0"));

    // Stopped with --on-exit keep: still attached until cleanup.
    drop(agent);
    let agent = start(&ns, &file, &pin_dir, &status, &["--on-exit", "keep"]);
    assert!(agent.stop().unwrap().success());
    assert!(xdp_attached(&ns, "xlb0") && xdp_attached(&ns, "xlb2"));
    // A VIP interface as the IPVS dataplane leaves it, with a VIP on it. This kernel has neither
    // IPVS to hold services nor the dummy driver, so a bridge stands in for the dummy interface:
    // cleanup removes the interface by name, whatever its kind.
    ns.ip(&["link", "add", "kube-ipvs0", "type", "bridge"])
        .unwrap();
    ns.ip(&["addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0"])
        .unwrap();
    let run = cleanup(&ns);
    assert_eq!(run.code, 0, "{run:?}");
    for expected in [
        "xdp: detached the XDP program (prog id ",
        ") from xlb0: link ",
        ") from xlb2: link ",
        &format!(
            "xdp: removed the pinned map {}/xlb_conntrack",
            pin_dir.display()
        ),
        &format!("xdp: removed {}", pin_dir.display()),
        "ipvs: removed the VIP interface kube-ipvs0 and its addresses",
        "removed the status file",
    ] {
        assert!(
            run.stdout.contains(expected),
            "missing {expected:?}:\n{}",
            run.stdout
        );
    }
    assert_clean(&ns, &pin_dir, &status);
    assert!(
        ns.ip(&["link", "show", "kube-ipvs0"]).is_err(),
        "kube-ipvs0 is gone"
    );

    // Again: nothing left to do, and that is success.
    let run = cleanup(&ns);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("xdp: nothing pinned in"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("ipvs: this kernel has no IPVS; nothing to remove"),
        "{}",
        run.stdout
    );

    // After a SIGKILL (nothing cleaned up by the agent itself).
    let agent = start(&ns, &file, &pin_dir, &status, &[]);
    agent.kill().unwrap();
    assert!(xdp_attached(&ns, "xlb0"));
    let run = cleanup(&ns);
    assert_eq!(run.code, 0, "{run:?}");
    assert_clean(&ns, &pin_dir, &status);

    // A fresh agent starts from nothing afterwards.
    let mut agent = start(&ns, &file, &pin_dir, &status, &[]);
    assert!(!agent.log().contains("adopted state from pinned maps"));
    agent.wait_for(&["attached; link pinned"]).unwrap();
    assert!(agent.stop().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
