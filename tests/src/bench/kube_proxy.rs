//! The baseline: the iptables rules kube-proxy's iptables mode writes for a [`ServiceSet`], and
//! `iptables-restore` to load them, timed.
//!
//! The nat table follows kube-proxy (pkg/proxy/iptables): `KUBE-SERVICES` holds one rule per
//! service port matching ClusterIP, protocol and port, jumping to that port's `KUBE-SVC-<hash>`
//! chain, which marks off-cluster sources for masquerade and then picks an endpoint with
//! `-m statistic --mode random --probability 1/(n-i)` rules, each jumping to a `KUBE-SEP-<hash>`
//! chain that DNATs to the endpoint. Chain names are 16 base32 characters of a hash of the
//! service port (and endpoint), the same length kube-proxy uses. The full sync is restored with
//! `--noflush`, as kube-proxy does; a change restores the rewritten top-level chain plus the
//! chains of the changed service, as kube-proxy's partial syncs do.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::services::{BenchService, CLUSTER_CIDR, ServicePort, ServiceSet};
use crate::netns::Netns;

/// Which iptables: Debian's default `iptables-restore` is the nf_tables one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn restore_command(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
        }
    }
}

/// FNV-1a, 64 bits.
fn fnv1a(seed: u64, data: &str) -> u64 {
    data.bytes().fold(seed, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// 16 base32 characters naming `what`, like kube-proxy's chain-name hashes.
fn chain_hash(what: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // 80 bits from two differently seeded hashes.
    let (a, b) = (
        fnv1a(0xcbf2_9ce4_8422_2325, what),
        fnv1a(0x6c62_272e_07bb_0142, what),
    );
    let bits = ((a as u128) << 16) | (b as u128 & 0xffff);
    (0..16)
        .map(|i| ALPHABET[((bits >> (75 - 5 * i)) & 31) as usize] as char)
        .collect()
}

/// kube-proxy's service port name: `namespace/name:port`.
fn port_name(s: &BenchService, p: &ServicePort) -> String {
    format!("default/{}:{}", s.name, p.name)
}

fn proto(p: &ServicePort) -> &'static str {
    match p.protocol {
        lb_agent::model::Protocol::Tcp => "tcp",
        lb_agent::model::Protocol::Udp => "udp",
        lb_agent::model::Protocol::Sctp => "sctp",
    }
}

fn svc_chain(s: &BenchService, p: &ServicePort) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&format!("{}{}", port_name(s, p), proto(p)))
    )
}

fn sep_chain(s: &BenchService, p: &ServicePort, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!("{}{}{endpoint}", port_name(s, p), proto(p)))
    )
}

/// The `KUBE-SERVICES` rule of one service port.
fn services_rule(out: &mut String, s: &BenchService, p: &ServicePort) {
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {pr} -p {pr} -d {}/32 --dport {} -j {}",
        port_name(s, p),
        s.vip,
        p.port,
        svc_chain(s, p),
        pr = proto(p),
    );
}

/// The chain declarations and rules of one service port: its KUBE-SVC chain and its KUBE-SEP
/// chains.
fn service_chains(decl: &mut String, rules: &mut String, s: &BenchService, p: &ServicePort) {
    let name = port_name(s, p);
    let svc = svc_chain(s, p);
    let pr = proto(p);
    let _ = writeln!(decl, ":{svc} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m {pr} -p {pr} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        s.vip, p.port
    );
    let n = s.endpoints.len();
    for (i, e) in s.endpoints.iter().enumerate() {
        let endpoint = format!("{e}:{}", p.target_port);
        let sep = sep_chain(s, p, &endpoint);
        let _ = writeln!(decl, ":{sep} - [0:0]");
        if i + 1 < n {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {endpoint}\" -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {endpoint}\" -j {sep}"
            );
        }
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {name} -s {e}/32 -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {name} -m {pr} -p {pr} -j DNAT --to-destination {endpoint}"
        );
    }
}

const NODEPORTS_RULE: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// The jumps from the built-in chains into kube-proxy's (kube-proxy adds them one by one at
/// start, outside the restore; they are loaded once per namespace, with the first ruleset).
pub const JUMPS: &str = "*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
COMMIT
";

/// The full ruleset of a sync of `set`, as kube-proxy writes it to `iptables-restore --noflush`.
pub fn full_ruleset(set: &ServiceSet) -> String {
    let mut decl = String::new();
    let mut rules = String::new();
    let mut services = String::new();
    for s in &set.services {
        for p in &s.ports {
            services_rule(&mut services, s, p);
            service_chains(&mut decl, &mut rules, s, p);
        }
    }
    let mut out = String::with_capacity(decl.len() + rules.len() + services.len() + 2048);
    out.push_str(
        "*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
",
    );
    out.push_str(&decl);
    out.push_str(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
",
    );
    out.push_str(&services);
    out.push_str(NODEPORTS_RULE);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// What kube-proxy restores after one endpoint of service `index` changed from `before` to
/// `after` (a partial sync): the whole `KUBE-SERVICES` chain, the service's KUBE-SVC chain and
/// KUBE-SEP chains rewritten, the departed endpoint's KUBE-SEP chain deleted.
pub fn change_ruleset(before: &ServiceSet, after: &ServiceSet, index: usize) -> String {
    let mut services = String::new();
    for s in &after.services {
        for p in &s.ports {
            services_rule(&mut services, s, p);
        }
    }
    let mut decl = String::from(":KUBE-SERVICES - [0:0]\n");
    let mut rules = String::new();
    let (old, new) = (&before.services[index], &after.services[index]);
    for p in &new.ports {
        service_chains(&mut decl, &mut rules, new, p);
    }
    let mut deletes = String::new();
    for p in &old.ports {
        for e in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
            let sep = sep_chain(old, p, &format!("{e}:{}", p.target_port));
            let _ = writeln!(decl, ":{sep} - [0:0]");
            let _ = writeln!(deletes, "-X {sep}");
        }
    }
    format!("*nat\n{decl}{services}{NODEPORTS_RULE}{rules}{deletes}COMMIT\n")
}

/// How a timed `iptables-restore` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restored {
    /// It finished in this wall time.
    In(Duration),
    /// It was still running at the time limit and was killed: the time is a lower bound.
    Unfinished(Duration),
}

impl Restored {
    /// The time, or the time limit it exceeded.
    pub fn time(self) -> Duration {
        match self {
            Restored::In(d) | Restored::Unfinished(d) => d,
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, Restored::In(_))
    }
}

/// Runs `<backend>-restore --noflush -w` in `ns` on `rules` and measures the wall time of the
/// whole command, as kube-proxy waits for it. A restore still running after `limit` is killed
/// (iptables-nft needs time quadratic in the number of chains).
pub fn restore(
    ns: &Netns,
    backend: Backend,
    rules: &str,
    limit: Duration,
) -> anyhow::Result<Restored> {
    let started = Instant::now();
    let mut child = ns
        .command(backend.restore_command())
        .args(["--noflush", "-w"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", backend.restore_command()))?;
    // Fed from another thread: a slow restore reads slowly, and the time limit must still hold.
    let mut stdin = child.stdin.take().unwrap();
    let rules = rules.to_owned();
    let feeder = std::thread::spawn(move || stdin.write_all(rules.as_bytes()));
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = started.elapsed();
            let _ = feeder.join();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("{} failed ({status}): {err}", backend.restore_command());
            }
            return Ok(Restored::In(elapsed));
        }
        if started.elapsed() >= limit {
            child.kill()?;
            child.wait()?;
            let _ = feeder.join();
            return Ok(Restored::Unfinished(limit));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Removes every rule and user chain of the nat and filter tables in `ns`.
pub fn flush(ns: &Netns, backend: Backend) -> anyhow::Result<()> {
    let cmd = match backend {
        Backend::Nft => "iptables-nft",
        Backend::Legacy => "iptables-legacy",
    };
    for table in ["nat", "filter"] {
        ns.exec(&[cmd, "-w", "-t", table, "-F"])?;
        ns.exec(&[cmd, "-w", "-t", table, "-X"])?;
    }
    Ok(())
}

/// `iptables-restore --version`, e.g. `iptables-restore v1.8.9 (nf_tables)`.
pub fn version(backend: Backend) -> String {
    Command::new(backend.restore_command())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::services::{HTTP, ServiceSet};

    #[test]
    fn the_ruleset_has_kube_proxys_shape() {
        let set = ServiceSet::distinct(3, 4);
        let rules = full_ruleset(&set);
        let count = |needle: &str| rules.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(
            count("-A KUBE-SERVICES -m comment --comment \"default/svc-"),
            3
        );
        assert_eq!(count("-m statistic --mode random --probability"), 3 * 3);
        assert_eq!(count("-j DNAT --to-destination"), 12);
        assert!(rules.contains("--probability 0.2500000000"));
        assert!(rules.contains("--probability 0.5000000000"));
        assert_eq!(rules.matches("COMMIT").count(), 2);
        // The nat table's chain names are unique and at most 28 characters (the iptables limit).
        let nat = &rules[rules.find("*nat").unwrap()..];
        let mut chains: Vec<&str> = nat
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert!(chains.iter().all(|c| c.len() <= 28));
        let n = chains.len();
        chains.sort();
        chains.dedup();
        assert_eq!(chains.len(), n);
        let _ = HTTP;
    }

    #[test]
    fn a_change_rewrites_the_top_chain_and_the_changed_service_only() {
        let before = ServiceSet::distinct(5, 3);
        let mut after = before.clone();
        after.services[2].endpoints[0] = "10.200.0.1".parse().unwrap();
        let rules = change_ruleset(&before, &after, 2);
        assert_eq!(
            rules
                .lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES"))
                .count(),
            6
        );
        assert_eq!(
            rules
                .lines()
                .filter(|l| l.starts_with("-X KUBE-SEP-"))
                .count(),
            1
        );
        assert!(rules.contains("10.200.0.1:8080"));
        assert!(!rules.contains("svc-000001 ->") && !rules.contains("svc-000001:http ->"));
    }
}
