//! The XDP dataplane on an older kernel: Debian 12's 6.1 (what `linux-image-amd64` of the host's
//! Debian release resolves to), whose verifier is stricter than the host's and, worse, may delete
//! branches it wrongly believes dead, so loading is not enough: the program must also behave.
//! This boots a VM (qemu TCG, see `xlb_tests::vm`) whose /init:
//!
//! 1. runs every packet suite (`tests/tests/packet_*.rs`, built statically by `cargo xtask test`,
//!    which passes them in `XLB_VM_PACKET_SUITES`) against the 6.1 kernel, once with the debug
//!    object the agent embeds and once with the release object (`XLB_TEST_EBPF_OBJECT`): the
//!    same frames and assertions as on the host, through BPF_PROG_TEST_RUN;
//! 2. creates a veth pair (iproute2 from Debian) and runs the static agent with
//!    `--dataplane xdp --iface xlb0` on the release object: it must log `sync applied`,
//!    `ip link show` must show the program attached, and after SIGTERM detached again.

use std::{path::Path, time::Duration};

use xlb_tests::vm::{self, DebianTree, Kernel};

/// One service, so the agent has something to sync.
const SERVICES: &str = r#"services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - {ip: 10.10.2.11, port: 8080}
      - {ip: 10.10.2.12, port: 8080}
"#;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /etc/xlb
/bin/busybox --install -s
# /bin/ip is iproute2's: busybox's applet cannot create veths or show XDP programs. This shell
# runs its own applets for bare command names, so the script names it in full; the test suites
# find it first in PATH.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=@LIBDIR@
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
exec 3>/dev/ttyS1

report() { echo "$*" >&3; }
section() { name=$1; shift; report "=== BEGIN $name"; "$@" >&3 2>&1; rc=$?; report "=== END $name rc=$rc"; }
fail() { report "=== FAIL $*"; sync; poweroff -f; sleep 10; }

# wait_for LOG PATTERN: the running agent logged PATTERN (at most 300 s: TCG is slow).
wait_for() {
    i=0
    while ! grep -q -- "$2" "$1"; do
        if ! kill -0 "$AGENT" 2>/dev/null; then section agent-died cat "$1"; fail "the agent exited before logging '$2'"; fi
        i=$((i+1)); [ "$i" -gt 3000 ] && { section agent-stuck cat "$1"; fail "no '$2' in $1 within 300 s"; }
        usleep 100000
    done
}

section uname uname -r
section ip-version /bin/ip -V
/bin/ip link set lo up
for m in @MODULES@; do insmod "/modules/$m" || fail "insmod $m"; done

# RUST_BACKTRACE=0: a failure's message, not pages of frames, in the report.
export RUST_BACKTRACE=0
for suite in @SUITES@; do
    section "debug/$suite" "/suites/$suite" --test-threads=1
    section "release/$suite" env XLB_TEST_EBPF_OBJECT=/lb-ebpf-release "/suites/$suite" --test-threads=1
done

/bin/ip link add xlb0 type veth peer name xlb1 || fail "ip link add veth"
/bin/ip link set xlb0 up || fail "xlb0 up"
/bin/ip link set xlb1 up || fail "xlb1 up"
cp /services.yaml /etc/xlb/services.yaml
RUST_LOG=info /lb-agent run --dataplane xdp --services /etc/xlb/services.yaml --iface xlb0 \
    --pin-dir /sys/fs/bpf/xlb --bpf-object /lb-ebpf-release >/agent.log 2>&1 &
AGENT=$!
wait_for /agent.log "sync applied"
section attached /bin/ip -d link show xlb0
kill "$AGENT"; wait "$AGENT"; report "=== AGENT-EXIT $?"
section detached /bin/ip -d link show xlb0
section agent-log cat /agent.log

report "=== DONE"
sync
poweroff -f
"#;

fn ebpf_object(profile: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ebpf/bpfel-unknown-none")
        .join(profile)
        .join("lb-ebpf");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Build it with `cargo xtask build-ebpf{}` (`cargo xtask test` builds both)",
            path.display(),
            if profile == "release" {
                " --release"
            } else {
                ""
            }
        )
    })
}

/// The static packet suites `cargo xtask test` built: (name, executable).
fn packet_suites() -> Vec<(String, String)> {
    let list = std::env::var("XLB_VM_PACKET_SUITES").unwrap_or_else(|_| {
        panic!(
            "XLB_VM_PACKET_SUITES is not set: it lists the packet suites built for \
             x86_64-unknown-linux-musl as name=path lines. Run this test through \
             `cargo xtask test` (alone: `cargo xtask test -- xdp_dataplane_on_debian`)"
        )
    });
    let suites: Vec<(String, String)> = list
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, path) = l.split_once('=').expect("name=path");
            (name.to_owned(), path.to_owned())
        })
        .collect();
    assert!(!suites.is_empty(), "XLB_VM_PACKET_SUITES lists no suite");
    suites
}

/// How many tests a suite has: its `#[test]` functions, counted in its source, so a suite that
/// runs fewer (or none) in the VM fails.
fn tests_in(suite: &str) -> usize {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(format!("{suite}.rs"));
    let text =
        std::fs::read_to_string(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    text.lines().filter(|l| l.trim() == "#[test]").count()
}

fn build_initramfs(kernel: &Kernel, tree: &DebianTree, suites: &[(String, String)]) -> Vec<u8> {
    // iproute2's ip and the libraries it links (its other dependencies serve tools not used).
    let packages = [
        "iproute2", "libbpf1", "libelf1", "libmnl0", "libbsd0", "libmd0", "libcap2", "zlib1g",
        "libc6",
    ];
    let (mut fs, names) = vm::base_initramfs(kernel, tree, &packages, &["/bin/ip"], &["veth"])
        .unwrap_or_else(|e| panic!("initramfs: {e:#}"));
    for (name, path) in suites {
        let exe = vm::stripped(Path::new(path)).unwrap_or_else(|e| panic!("suite {name}: {e:#}"));
        fs.file(&format!("/suites/{name}"), 0o755, &exe);
    }
    fs.file("/lb-ebpf-release", 0o644, &ebpf_object("release"));
    fs.file("/services.yaml", 0o644, SERVICES.as_bytes());
    let suite_names: Vec<&str> = suites.iter().map(|(n, _)| n.as_str()).collect();
    let init = INIT
        .replace("@MODULES@", &names.join(" "))
        .replace("@SUITES@", &suite_names.join(" "))
        .replace("@LIBDIR@", vm::INITRAMFS_LIB_DIR);
    fs.file("/init", 0o755, init.as_bytes());
    fs.finish()
}

#[test]
fn xdp_dataplane_on_debian_12_kernel_in_a_vm() {
    let suites = packet_suites();
    let tree = DebianTree::open().unwrap();
    let kernel = Kernel::fetch(&tree).unwrap_or_else(|e| panic!("Debian kernel: {e:#}"));
    let initramfs = build_initramfs(&kernel, &tree, &suites);
    let work = vm::cache_dir().join(format!("xdp-run-{}", std::process::id()));
    let run = vm::boot(&kernel, &initramfs, 1536, Duration::from_secs(1800), &work)
        .unwrap_or_else(|e| panic!("VM: {e:#}"));
    eprintln!(
        "xdp VM: booted, ran the packet suites and the agent, powered off in {:.1?}",
        run.elapsed
    );
    let context = || format!("report:\n{}\nconsole:\n{}", run.report, run.console);
    if std::env::var_os("XLB_TEST_VERBOSE").is_some() {
        eprintln!("{}", context());
    }
    let s = vm::sections(&run.report);
    let section = |name: &str| -> (&str, &str) {
        let (body, rc) = s
            .get(name)
            .unwrap_or_else(|| panic!("no section {name}; {}", context()));
        (body.as_str(), rc.as_str())
    };
    let body = |name: &str| -> &str {
        let (body, rc) = section(name);
        assert_eq!(rc, "0", "{name} failed:\n{body}");
        body
    };

    // The kernel under test is the old one, not the host's.
    let release = body("uname").trim().to_owned();
    assert!(
        release.starts_with("6.1."),
        "the VM runs Debian 12's 6.1 kernel, not {release}"
    );
    assert!(
        body("ip-version").contains("iproute2"),
        "/bin/ip is iproute2's"
    );

    // 1. Every packet test passes on this kernel, with both objects.
    let mut failures = Vec::new();
    for (suite, _) in &suites {
        let want = tests_in(suite);
        assert!(want > 0, "{suite} has no #[test]");
        for profile in ["debug", "release"] {
            let name = format!("{profile}/{suite}");
            let (out, rc) = section(&name);
            let ok = format!("test result: ok. {want} passed; 0 failed");
            if rc != "0" || !out.lines().any(|l| l.starts_with(&ok)) {
                failures.push(format!(
                    "--- {name} on {release} (rc={rc}, want `{ok}`):\n{out}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "packet suites failed in the VM:\n{}",
        failures.join("\n")
    );

    // 2. The agent attaches to a veth and syncs; SIGTERM detaches.
    assert!(
        !run.report.contains("=== FAIL") && run.report.contains("=== DONE"),
        "the VM scenario did not finish; {}",
        context()
    );
    let log = body("agent-log");
    assert!(
        log.contains("sync applied") && log.contains(r#"dataplane=xdp reason="--dataplane xdp""#),
        "{log}"
    );
    let attached = body("attached");
    assert!(
        attached.contains("prog/xdp id"),
        "no XDP program on xlb0:\n{attached}\nagent log:\n{log}"
    );
    assert!(
        run.report.contains("=== AGENT-EXIT 0"),
        "the agent exits cleanly on SIGTERM; {}",
        context()
    );
    let detached = body("detached");
    assert!(
        !detached.contains("xdp"),
        "the agent detaches on exit:\n{detached}"
    );

    std::fs::remove_dir_all(&work).ok();
}
