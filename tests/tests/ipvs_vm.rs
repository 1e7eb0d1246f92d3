//! The IPVS dataplane against a real kernel IPVS. The host kernel has none, so this boots a VM
//! (qemu TCG, Debian's kernel with its ip_vs modules, busybox and ipvsadm from Debian packages,
//! the statically linked agent from this repository) whose /init runs the scenario and reports
//! `ipvsadm -Ln`, the VIPs on kube-ipvs0 and the agent logs on a second serial port:
//!
//! 1. a service made by hand with ipvsadm, then the agent (`--dataplane ipvs`) on a services file:
//!    exactly the configured services, schedulers, persistence, weights, Masq forwarding and VIPs;
//! 2. the file changes (a service added, two removed, a weight changed, a scheduler changed, a
//!    backend marked terminating): exactly that diff in the kernel, and only those writes;
//! 3. a restarted agent adopts the state: no write, `ops=0`, byte-identical `ipvsadm -Ln`;
//! 4. `--dataplane auto` with XDP made unusable (it must attach to `eth9`, an interface the VM
//!    does not have; the program itself loads on this kernel) picks IPVS and logs why;
//! 5. drift made by hand (a real server deleted, a scheduler changed, a VIP unbound) is repaired
//!    by the periodic resync with exactly the writes it needs;
//! 6. `lb-agent preflight` says only IPVS can run (exit code 10), and `lb-agent cleanup` removes
//!    xlb's services, kube-ipvs0 and the pins the failed XDP probe of step 4 left;
//!
//! and the hand-made service survives all of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use xlb_tests::vm::{self, DebianTree, Kernel};

const SERVICES_1: &str = r#"services:
  - name: web
    vip: 10.96.0.10
    port: 80
    scheduler: rr
    backends:
      - {ip: 10.10.2.11, port: 8080}
      - {ip: 10.10.2.12, port: 8080}
  - name: api
    vip: 10.96.0.11
    port: 443
    scheduler: wrr
    sessionAffinity: {clientIP: {timeoutSeconds: 300}}
    backends:
      - {ip: 10.10.2.21, port: 8443, weight: 3}
      - {ip: 10.10.2.22, port: 8443, weight: 1}
  - name: dns
    vip: 10.96.0.53
    port: 53
    protocol: UDP
    scheduler: sh
    backends:
      - {ip: 10.10.2.31, port: 53}
      - {ip: 10.10.2.32, port: 53}
  - name: dns-tcp
    vip: 10.96.0.53
    port: 53
    protocol: TCP
    scheduler: lc
    backends:
      - {ip: 10.10.2.31, port: 53}
  - name: diameter
    vip: 10.96.0.60
    port: 3868
    protocol: SCTP
    scheduler: maglev
    backends:
      - {ip: 10.10.2.41, port: 3868, weight: 2}
  - name: old
    vip: 10.96.0.70
    port: 8080
    scheduler: lc
    backends:
      - {ip: 10.10.2.61, port: 8080}
  - name: web6
    vip: "fd00::10"
    port: 80
    scheduler: wlc
    backends:
      - {ip: "fd00:1::1", port: 8080, weight: 4}
"#;

/// web: rr -> wrr; api: 10.10.2.22 weight 1 -> 5; dns: 10.10.2.32 terminating; dns-tcp and old
/// removed (10.96.0.53 stays, UDP still uses it; 10.96.0.70 goes); new added.
const SERVICES_2: &str = r#"services:
  - name: web
    vip: 10.96.0.10
    port: 80
    scheduler: wrr
    backends:
      - {ip: 10.10.2.11, port: 8080}
      - {ip: 10.10.2.12, port: 8080}
  - name: api
    vip: 10.96.0.11
    port: 443
    scheduler: wrr
    sessionAffinity: {clientIP: {timeoutSeconds: 300}}
    backends:
      - {ip: 10.10.2.21, port: 8443, weight: 3}
      - {ip: 10.10.2.22, port: 8443, weight: 5}
  - name: dns
    vip: 10.96.0.53
    port: 53
    protocol: UDP
    scheduler: sh
    backends:
      - {ip: 10.10.2.31, port: 53}
      - {ip: 10.10.2.32, port: 53, terminating: true}
  - name: diameter
    vip: 10.96.0.60
    port: 3868
    protocol: SCTP
    scheduler: maglev
    backends:
      - {ip: 10.10.2.41, port: 3868, weight: 2}
  - name: web6
    vip: "fd00::10"
    port: 80
    scheduler: wlc
    backends:
      - {ip: "fd00:1::1", port: 8080, weight: 4}
  - name: new
    vip: 10.96.0.80
    port: 80
    scheduler: rr
    backends:
      - {ip: 10.10.2.51, port: 80}
"#;

/// The service made by hand, which no sync may touch.
const HAND_MADE: &str = "
TCP 192.0.2.1:80 rr
  -> 10.20.0.1:80 Masq 2
";

const EXPECTED_1: &str = "
TCP 10.96.0.10:80 rr
  -> 10.10.2.11:8080 Masq 1
  -> 10.10.2.12:8080 Masq 1
TCP 10.96.0.11:443 wrr persistent 300
  -> 10.10.2.21:8443 Masq 3
  -> 10.10.2.22:8443 Masq 1
UDP 10.96.0.53:53 sh
  -> 10.10.2.31:53 Masq 1
  -> 10.10.2.32:53 Masq 1
TCP 10.96.0.53:53 lc
  -> 10.10.2.31:53 Masq 1
SCTP 10.96.0.60:3868 mh
  -> 10.10.2.41:3868 Masq 2
TCP 10.96.0.70:8080 lc
  -> 10.10.2.61:8080 Masq 1
TCP [fd00::10]:80 wlc
  -> [fd00:1::1]:8080 Masq 4
";

const EXPECTED_2: &str = "
TCP 10.96.0.10:80 wrr
  -> 10.10.2.11:8080 Masq 1
  -> 10.10.2.12:8080 Masq 1
TCP 10.96.0.11:443 wrr persistent 300
  -> 10.10.2.21:8443 Masq 3
  -> 10.10.2.22:8443 Masq 5
UDP 10.96.0.53:53 sh
  -> 10.10.2.31:53 Masq 1
  -> 10.10.2.32:53 Masq 0
SCTP 10.96.0.60:3868 mh
  -> 10.10.2.41:3868 Masq 2
TCP [fd00::10]:80 wlc
  -> [fd00:1::1]:8080 Masq 4
TCP 10.96.0.80:80 rr
  -> 10.10.2.51:80 Masq 1
";

/// Every kernel write the file change may cause, and no other.
const EXPECTED_WRITES_1_TO_2: &[&str] = &[
    "ipvs write: set service frontend=10.96.0.10:80/TCP scheduler=wrr persistence_s=0",
    "ipvs write: set dest frontend=10.96.0.11:443/TCP real_server=10.10.2.22:8443 weight=5",
    "ipvs write: set dest frontend=10.96.0.53:53/UDP real_server=10.10.2.32:53 weight=0",
    "ipvs write: bound VIP vip=10.96.0.80 iface=kube-ipvs0",
    "ipvs write: new service frontend=10.96.0.80:80/TCP scheduler=rr persistence_s=0",
    "ipvs write: new dest frontend=10.96.0.80:80/TCP real_server=10.10.2.51:80 weight=1",
    "ipvs write: del service frontend=10.96.0.53:53/TCP",
    "ipvs write: del service frontend=10.96.0.70:8080/TCP",
    "ipvs write: unbound VIP vip=10.96.0.70 iface=kube-ipvs0",
];

/// The writes that repair the drift made by hand in step 5.
const EXPECTED_REPAIR_WRITES: &[&str] = &[
    "ipvs write: new dest frontend=10.96.0.10:80/TCP real_server=10.10.2.11:8080 weight=1",
    "ipvs write: set service frontend=10.96.0.11:443/TCP scheduler=wrr persistence_s=300",
    "ipvs write: bound VIP vip=10.96.0.60 iface=kube-ipvs0",
];

/// Modules to load, dependencies resolved from the kernel package. crc32c_generic is a soft
/// dependency of libcrc32c (it asks the crypto API for "crc32c"), so it is named first.
const MODULES: &[&str] = &[
    "crc32c_generic",
    "dummy",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_sh",
    "ip_vs_mh",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /etc/xlb
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export LD_LIBRARY_PATH=@LIBDIR@
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# bpffs, so that the auto probe gets as far as attaching XDP.
mount -t bpf bpf /sys/fs/bpf
exec 3>/dev/ttyS1

report() { echo "$*" >&3; }
section() { name=$1; shift; report "=== BEGIN $name"; "$@" >&3 2>&1; rc=$?; report "=== END $name rc=$rc"; }
fail() { report "=== FAIL $*"; sync; poweroff -f; sleep 10; }

# wait_for LOG PATTERN: the running agent logged PATTERN (at most 120 s).
wait_for() {
    i=0
    while ! grep -q -- "$2" "$1"; do
        if ! kill -0 "$AGENT" 2>/dev/null; then section agent-died cat "$1"; fail "the agent exited before logging '$2'"; fi
        i=$((i+1)); [ "$i" -gt 1200 ] && { section agent-stuck cat "$1"; fail "no '$2' in $1 within 120 s"; }
        usleep 100000
    done
}
start_agent() {
    log=$1; shift
    RUST_LOG=info,lb_agent::dataplane::ipvs=debug RUST_BACKTRACE=0 \
        /lb-agent run --services /etc/xlb/services.yaml --min-sync-period 100ms "$@" >"$log" 2>&1 &
    AGENT=$!
}
stop_agent() { kill "$AGENT"; wait "$AGENT"; report "=== AGENT-EXIT $?"; }

# IPVS refuses real servers ("address not unicast") until the local table exists.
ip link set lo up
for m in @MODULES@; do insmod "/modules/$m" || fail "insmod $m"; done

ipvsadm -A -t 192.0.2.1:80 -s rr || fail "ipvsadm -A"
ipvsadm -a -t 192.0.2.1:80 -r 10.20.0.1:80 -m -w 2 || fail "ipvsadm -a"

cp /services-1.yaml /etc/xlb/services.yaml
start_agent /agent-1.log --dataplane ipvs
wait_for /agent-1.log "sync applied.*generation=1 "
section initial-ipvsadm ipvsadm -Ln
section initial-vips ip addr show kube-ipvs0

# An editor-style replace.
cp /services-2.yaml /etc/xlb/services.yaml.new
mv /etc/xlb/services.yaml.new /etc/xlb/services.yaml
wait_for /agent-1.log "sync applied.*generation=2 "
section changed-ipvsadm ipvsadm -Ln
section changed-vips ip addr show kube-ipvs0
stop_agent
section agent-1-log cat /agent-1.log

start_agent /agent-2.log --dataplane ipvs
wait_for /agent-2.log "sync applied.*generation=1 "
section restarted-ipvsadm ipvsadm -Ln
section restarted-vips ip addr show kube-ipvs0
stop_agent
section agent-2-log cat /agent-2.log

start_agent /agent-3.log --dataplane auto --iface eth9 --sync-period 1s
wait_for /agent-3.log "sync applied.*generation=1 "
section auto-ipvsadm ipvsadm -Ln

# Drift behind the agent's back, which the periodic resync (re-read from the kernel) repairs: a
# real server deleted, a scheduler changed, a VIP unbound (its service, no longer marked as
# xlb's, is taken back when the VIP is bound again).
ipvsadm -Ln | sort > /want-ipvsadm
ip addr show kube-ipvs0 | grep inet | sort > /want-vips
ipvsadm -d -t 10.96.0.10:80 -r 10.10.2.11:8080 || fail "ipvsadm -d"
ipvsadm -E -t 10.96.0.11:443 -s rr -p 300 || fail "ipvsadm -E"
ip addr del 10.96.0.60/32 dev kube-ipvs0 || fail "ip addr del"
i=0
until ipvsadm -Ln | sort | cmp -s - /want-ipvsadm && ip addr show kube-ipvs0 | grep inet | sort | cmp -s - /want-vips; do
    i=$((i+1)); [ "$i" -gt 600 ] && { section not-repaired ipvsadm -Ln; fail "drift not repaired within 60 s"; }
    usleep 100000
done
section repaired-ipvsadm ipvsadm -Ln
section repaired-vips ip addr show kube-ipvs0
stop_agent
section agent-3-log cat /agent-3.log

echo 1 > /proc/sys/net/ipv4/ip_forward
section preflight sh -c '/lb-agent preflight --iface eth9; echo "exit=$?"'
section cleanup /lb-agent cleanup
section cleaned-ipvsadm ipvsadm -Ln
section cleaned-vips sh -c 'ip link show kube-ipvs0 2>&1 || echo "no kube-ipvs0"'
section cleaned-pins sh -c 'ls -a /sys/fs/bpf; echo "end"'

report "=== DONE"
sync
poweroff -f
"#;

fn build_initramfs(kernel: &Kernel, tree: &DebianTree) -> Vec<u8> {
    let packages = [
        "ipvsadm",
        "libnl-3-200",
        "libnl-genl-3-200",
        "libpopt0",
        "libc6",
    ];
    let (mut fs, names) = vm::base_initramfs(kernel, tree, &packages, &["/sbin/ipvsadm"], MODULES)
        .unwrap_or_else(|e| panic!("initramfs: {e:#}"));
    fs.file("/services-1.yaml", 0o644, SERVICES_1.as_bytes());
    fs.file("/services-2.yaml", 0o644, SERVICES_2.as_bytes());
    let init = INIT
        .replace("@MODULES@", &names.join(" "))
        .replace("@LIBDIR@", vm::INITRAMFS_LIB_DIR);
    fs.file("/init", 0o755, init.as_bytes());
    fs.finish()
}

/// `ipvsadm -Ln` (or an expectation in the same shape) as service line -> real server lines,
/// whitespace collapsed, connection counters dropped, order ignored (the kernel lists by hash).
fn ipvs_table(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut service: Option<String> = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.first() {
            Some(&"->") if fields.get(1) != Some(&"RemoteAddress:Port") => {
                let dest = fields[1..fields.len().min(4)].join(" ");
                let svc = service.clone().expect("real server before any service");
                out.get_mut(&svc).unwrap().insert(dest);
            }
            Some(&("TCP" | "UDP" | "SCTP" | "FWM")) => {
                let svc = fields.join(" ");
                out.insert(svc.clone(), BTreeSet::new());
                service = Some(svc);
            }
            _ => {}
        }
    }
    out
}

fn expected_table(xlb: &str) -> BTreeMap<String, BTreeSet<String>> {
    ipvs_table(&format!("{HAND_MADE}{xlb}"))
}

/// Addresses in `ip addr show` output.
fn addresses(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            match f.next() {
                Some("inet" | "inet6") => f.next().map(str::to_owned),
                _ => None,
            }
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The `ipvs write: ...` lines of a log between two `sync applied` generations.
fn writes_between(log: &str, from_generation: u64, to_generation: u64) -> Vec<String> {
    let from = format!("generation={from_generation} ");
    let to = format!("generation={to_generation} ");
    let mut inside = false;
    let mut out = Vec::new();
    for line in log.lines() {
        if line.contains("sync applied") && line.contains(&from) {
            inside = true;
        } else if line.contains("sync applied") && line.contains(&to) {
            break;
        } else if inside && let Some(at) = line.find("ipvs write: ") {
            out.push(line[at..].trim_end().to_owned());
        }
    }
    out.sort();
    out
}

fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
}

#[test]
fn ipvs_dataplane_in_a_vm() {
    let tree = DebianTree::open().unwrap();
    let kernel = Kernel::fetch(&tree).unwrap_or_else(|e| panic!("Debian kernel: {e:#}"));
    let initramfs = build_initramfs(&kernel, &tree);
    let work = vm::cache_dir().join(format!("ipvs-run-{}", std::process::id()));
    let run = vm::boot(&kernel, &initramfs, 768, Duration::from_secs(600), &work)
        .unwrap_or_else(|e| panic!("VM: {e:#}"));
    eprintln!(
        "ipvs VM: booted, ran the scenario and powered off in {:.1?}",
        run.elapsed
    );
    let context = || format!("report:\n{}\nconsole:\n{}", run.report, run.console);
    if std::env::var_os("XLB_TEST_VERBOSE").is_some() {
        eprintln!("{}", context());
    }
    assert!(
        !run.report.contains("=== FAIL") && run.report.contains("=== DONE"),
        "the VM scenario did not finish; {}",
        context()
    );
    let s = vm::sections(&run.report);
    let body = |name: &str| -> &str {
        let (body, rc) = s
            .get(name)
            .unwrap_or_else(|| panic!("no section {name}; {}", context()));
        assert_eq!(rc, "0", "{name} failed:\n{body}");
        body
    };
    for exit in run
        .report
        .lines()
        .filter(|l| l.starts_with("=== AGENT-EXIT"))
    {
        assert_eq!(
            exit.trim(),
            "=== AGENT-EXIT 0",
            "the agent exits cleanly on SIGTERM; {}",
            context()
        );
    }
    let log1 = body("agent-1-log");
    let log2 = body("agent-2-log");
    let log3 = body("agent-3-log");

    // 1. Exactly the configured services, next to the hand-made one.
    assert!(
        line_with(log1, "Using ipvs dataplane")
            .contains(r#"dataplane=ipvs reason="--dataplane ipvs""#),
        "{log1}"
    );
    assert_eq!(
        ipvs_table(body("initial-ipvsadm")),
        expected_table(EXPECTED_1),
        "initial services; agent log:\n{log1}"
    );
    assert_eq!(
        addresses(body("initial-vips")),
        set(&[
            "10.96.0.10/32",
            "10.96.0.11/32",
            "10.96.0.53/32",
            "10.96.0.60/32",
            "10.96.0.70/32",
            "fd00::10/128"
        ]),
        "VIPs on kube-ipvs0"
    );

    // 2. The file change: exactly the diff, and only the writes it needs.
    assert_eq!(
        ipvs_table(body("changed-ipvsadm")),
        expected_table(EXPECTED_2),
        "changed services; agent log:\n{log1}"
    );
    assert_eq!(
        addresses(body("changed-vips")),
        set(&[
            "10.96.0.10/32",
            "10.96.0.11/32",
            "10.96.0.53/32",
            "10.96.0.60/32",
            "10.96.0.80/32",
            "fd00::10/128"
        ])
    );
    let mut expected_writes: Vec<String> = EXPECTED_WRITES_1_TO_2
        .iter()
        .map(|s| s.to_string())
        .collect();
    expected_writes.sort();
    assert_eq!(writes_between(log1, 1, 2), expected_writes, "{log1}");
    assert!(line_with(log1, "generation=2 ").contains("ops=6"), "{log1}");

    // 3. A restarted agent adopts everything and writes nothing.
    assert!(
        line_with(log2, "adopted the IPVS services").contains("services=6 real_servers=9"),
        "{log2}"
    );
    assert!(
        line_with(log2, "sync applied").contains("generation=1 ops=0"),
        "{log2}"
    );
    assert!(
        !log2.contains("ipvs write:"),
        "a restart must not write:\n{log2}"
    );
    assert_eq!(
        body("restarted-ipvsadm"),
        body("changed-ipvsadm"),
        "ipvsadm -Ln before and after the restart"
    );
    assert_eq!(body("restarted-vips"), body("changed-vips"));

    // 4. auto without a usable XDP picks IPVS and says why: the program loads on this 6.1
    // kernel (xdp_vm.rs proves it works there), but it would have to attach to eth9, which does
    // not exist.
    let choice = line_with(log3, "Using ipvs dataplane");
    assert!(
        choice.contains(r#"dataplane=ipvs reason="XDP attach on eth9 failed: "#),
        "{choice}"
    );
    assert!(
        choice.len() < 400,
        "the reason is a gist, not a verifier log: {choice}"
    );
    line_with(log3, "XDP cannot run here, falling back to IPVS");
    assert!(
        line_with(log3, "sync applied").contains("generation=1 ops=0"),
        "{log3}"
    );
    assert!(
        !log3
            .lines()
            .take_while(|l| !l.contains("generation=1 "))
            .any(|l| l.contains("ipvs write:")),
        "{log3}"
    );
    assert_eq!(body("auto-ipvsadm"), body("changed-ipvsadm"));

    // 5. Drift repaired (possibly over several resyncs, as the hand edits land), and the
    // hand-made service still untouched by every one of them.
    assert_eq!(
        ipvs_table(body("repaired-ipvsadm")),
        expected_table(EXPECTED_2),
        "{log3}"
    );
    assert_eq!(
        addresses(body("repaired-vips")),
        addresses(body("changed-vips"))
    );
    let mut repair: Vec<String> = EXPECTED_REPAIR_WRITES
        .iter()
        .map(|s| s.to_string())
        .collect();
    repair.sort();
    assert_eq!(writes_between(log3, 1, u64::MAX), repair, "{log3}");
    line_with(
        log3,
        "took over an existing IPVS service on a VIP xlb now holds frontend=10.96.0.60:3868/SCTP",
    );

    // 6. preflight and cleanup.
    let preflight = body("preflight");
    assert!(
        preflight.contains(
            "verdict: only the IPVS dataplane can run here (XDP no, IPVS yes; exit code 10)"
        ) && preflight.contains("exit=10"),
        "{preflight}"
    );
    let cleanup = body("cleanup");
    for frontend in [
        "10.96.0.10:80/TCP",
        "10.96.0.11:443/TCP",
        "10.96.0.53:53/UDP",
        "10.96.0.60:3868/SCTP",
        "10.96.0.80:80/TCP",
        "[fd00::10]:80/TCP",
    ] {
        assert!(
            cleanup.contains(&format!("ipvs: removed the virtual service {frontend}\n")),
            "{frontend}: {cleanup}"
        );
    }
    assert!(
        cleanup.contains("ipvs: removed the VIP interface kube-ipvs0 and its addresses"),
        "{cleanup}"
    );
    assert!(
        cleanup.contains("xdp: removed /sys/fs/bpf/xlb\n"),
        "the pins of the failed XDP probe go too: {cleanup}"
    );
    assert_eq!(
        ipvs_table(body("cleaned-ipvsadm")),
        expected_table(""),
        "only the hand-made service stays"
    );
    assert!(body("cleaned-vips").contains("no kube-ipvs0"));
    assert!(
        !body("cleaned-pins").contains("xlb"),
        "{}",
        body("cleaned-pins")
    );

    std::fs::remove_dir_all(&work).ok();
}
