//! The XDP dataplane on an older kernel: Debian 12's 6.1 (whatever `linux-image-amd64` of the
//! host's Debian release resolves to), whose verifier is stricter than the host's. The host tests
//! only prove the program on the host kernel; this boots a VM (qemu TCG, see `xlb_tests::vm`)
//! whose /init:
//!
//! 1. runs `xlb-vm-packet` (a static binary of this crate) on the debug and the release object:
//!    each loads through the 6.1 verifier, is programmed through the agent's sync code, and runs
//!    frames through BPF_PROG_TEST_RUN (new-flow DNAT, established flow and reverse NAT,
//!    least-connection under `bpf_loop`, RST and ICMP refusals, a malformed frame);
//! 2. creates a veth pair (iproute2 from Debian) and runs the static agent with
//!    `--dataplane xdp --iface xlb0`: it must log `sync applied`, `ip link show` must show the
//!    program attached, and after SIGTERM detached again.

use std::time::Duration;

use xlb_tests::vm::{self, DebianTree, Initramfs, Kernel};

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
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
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
# /bin/ip is iproute2's (busybox's applet cannot show XDP programs).
section ip-version /bin/ip -V
ip link set lo up
for m in @MODULES@; do insmod "/modules/$m" || fail "insmod $m"; done

section packet-debug /xlb-vm-packet /lb-ebpf-debug
section packet-release /xlb-vm-packet /lb-ebpf-release

/bin/ip link add xlb0 type veth peer name xlb1 || fail "ip link add veth"
/bin/ip link set xlb0 up || fail "xlb0 up"
/bin/ip link set xlb1 up || fail "xlb1 up"
cp /services.yaml /etc/xlb/services.yaml
RUST_LOG=info RUST_BACKTRACE=0 /lb-agent run --dataplane xdp --services /etc/xlb/services.yaml \
    --iface xlb0 --pin-dir /sys/fs/bpf/xlb >/agent.log 2>&1 &
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
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
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

fn build_initramfs(kernel: &Kernel, tree: &DebianTree) -> Vec<u8> {
    // iproute2's ip and the libraries it links (its other dependencies are for tools not used).
    for package in [
        "busybox-static",
        "iproute2",
        "libbpf1",
        "libelf1",
        "libmnl0",
        "libbsd0",
        "libmd0",
        "libcap2",
        "zlib1g",
        "libc6",
    ] {
        tree.unpack(package, &[])
            .unwrap_or_else(|e| panic!("Debian package {package}: {e:#}"));
    }
    let mut fs = Initramfs::new();
    fs.copy("/bin/busybox", 0o755, &tree.path("/bin/busybox"))
        .unwrap();
    fs.executable_from(tree, "/bin/ip").unwrap();
    let agent = vm::static_agent().unwrap_or_else(|e| panic!("{e:#}"));
    fs.file("/lb-agent", 0o755, &agent);
    let packet = vm::static_binary("XLB_VM_PACKET_STATIC_BIN", "xlb-tests", "xlb-vm-packet")
        .unwrap_or_else(|e| panic!("{e:#}"));
    fs.file("/xlb-vm-packet", 0o755, &packet);
    fs.file("/lb-ebpf-debug", 0o644, &ebpf_object("debug"));
    fs.file("/lb-ebpf-release", 0o644, &ebpf_object("release"));

    let order = kernel.load_order(&["veth"]).unwrap();
    let mut names = Vec::new();
    for path in &order {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        fs.copy(&format!("/modules/{name}"), 0o644, path).unwrap();
        names.push(name);
    }
    fs.file("/services.yaml", 0o644, SERVICES.as_bytes());
    let init = INIT
        .replace("@MODULES@", &names.join(" "))
        .replace("@LIBDIR@", vm::INITRAMFS_LIB_DIR);
    fs.file("/init", 0o755, init.as_bytes());
    fs.finish()
}

/// The checks `xlb-vm-packet` runs; each must be reported as passed.
const PACKET_CHECKS: &[&str] = &[
    "new-flow-dnat",
    "established-and-reply",
    "least-conn",
    "no-backend-tcp-rst",
    "no-backend-udp-unreachable",
    "malformed-passes-untouched",
];

#[test]
fn xdp_dataplane_on_debian_12_kernel_in_a_vm() {
    let tree = DebianTree::open().unwrap();
    let kernel = Kernel::fetch(&tree).unwrap_or_else(|e| panic!("Debian kernel: {e:#}"));
    let initramfs = build_initramfs(&kernel, &tree);
    let work = vm::cache_dir().join(format!("xdp-run-{}", std::process::id()));
    let run = vm::boot(&kernel, &initramfs, 1024, Duration::from_secs(900), &work)
        .unwrap_or_else(|e| panic!("VM: {e:#}"));
    eprintln!(
        "xdp VM: booted, ran the scenario and powered off in {:.1?}",
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
        "/bin/ip is iproute2"
    );

    // 1. Both objects load through this verifier and handle packets as on the host.
    for profile in ["debug", "release"] {
        let name = format!("packet-{profile}");
        let (out, rc) = section(&name);
        for check in PACKET_CHECKS {
            assert!(
                out.lines().any(|l| l.trim() == format!("PASS {check}")),
                "{profile} object on {release}: check {check} did not pass:\n{out}"
            );
        }
        assert_eq!(rc, "0", "{profile} object on {release}:\n{out}");
    }

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
