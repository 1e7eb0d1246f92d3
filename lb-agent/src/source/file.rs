//! The services file: standalone mode's source of truth.
//!
//! The schema is a contract other tools write, so it is only ever extended:
//!
//! ```yaml
//! services:
//!   - name: web
//!     vip: 10.96.0.10
//!     port: 80
//!     protocol: TCP          # TCP | UDP | SCTP
//!     scheduler: maglev      # maglev (mh) | rr | wrr | sh | lc | wlc
//!     sessionAffinity: {clientIP: {timeoutSeconds: 10800}}   # optional
//!     backends:
//!       - {ip: 10.10.2.11, port: 8080, weight: 1}
//!       - {ip: 10.10.2.12, port: 8080, terminating: true}  # optional, default false
//! ```
//!
//! `terminating: true` marks an endpoint that is shutting down (an EndpointSlice endpoint with
//! ready=false, serving=true, terminating=true): it gets no new flows while ready backends exist,
//! its open flows may finish (IPVS keeps it at weight 0), and it still takes traffic when no
//! backend is ready.
//!
//! [`parse`] is pure: every entry is checked on its own, an invalid one becomes a [`Rejection`]
//! with its location and reason, and the valid ones still load. [`watch`] re-reads the file when
//! it changes (inotify on its directory, so editors that replace the file are seen) or on SIGHUP.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    model::{
        Backend, DEFAULT_AFFINITY_TIMEOUT_S, Frontend, Model, Protocol, Rejection, Scope, Service,
        parse_scheduler,
    },
    source::SourceEvent,
};

/// Default scheduler of an entry without one.
pub const DEFAULT_SCHEDULER: &str = "maglev";
/// Weight of a backend without one.
pub const DEFAULT_WEIGHT: u32 = 1;

/// The file's top level, `{services: [...]}`, read with every entry handed to `each` as soon as
/// it is read: the YAML tree of all entries never exists at once (at 10k services it would be
/// tens of MB beside the parser's own events, and the agent's peak memory is its parse).
struct File<F> {
    each: F,
}

impl<'de, F: FnMut(serde_norway::Value)> serde::de::DeserializeSeed<'de> for File<F> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(serde_norway::Value)> serde::de::Visitor<'de> for File<F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a mapping with a `services` list")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key != "services" {
                return Err(serde::de::Error::unknown_field(&key, &["services"]));
            }
            map.next_value_seed(Entries {
                each: &mut self.each,
            })?;
        }
        Ok(())
    }
}

/// The `services` list (or null), one entry at a time.
struct Entries<'a, F> {
    each: &'a mut F,
}

impl<'de, F: FnMut(serde_norway::Value)> serde::de::DeserializeSeed<'de> for Entries<'_, F> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: FnMut(serde_norway::Value)> serde::de::Visitor<'de> for Entries<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of services")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<serde_norway::Value>()? {
            (self.each)(entry);
        }
        Ok(())
    }
}

/// One entry as written. Numbers are read wide (i64) so that out-of-range values get our own
/// message instead of a deserializer's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    name: String,
    vip: String,
    port: i64,
    #[serde(default = "default_protocol")]
    protocol: String,
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default)]
    session_affinity: Option<SessionAffinity>,
    #[serde(default)]
    backends: Vec<BackendEntry>,
}

fn default_protocol() -> String {
    "TCP".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SessionAffinity {
    #[serde(rename = "clientIP")]
    client_ip: ClientIp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClientIp {
    #[serde(default)]
    timeout_seconds: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendEntry {
    ip: String,
    port: i64,
    #[serde(default)]
    weight: Option<serde_norway::Value>,
    #[serde(default)]
    terminating: Option<serde_norway::Value>,
}

/// The outcome of reading a services file: what loads, and what was rejected.
#[derive(Debug, Default)]
pub struct Parsed {
    pub model: Model,
    pub rejections: Vec<Rejection>,
    /// The file's modification time, when this read saw new content (not for a SIGHUP re-read of
    /// an unchanged file): the start of its network-programming latency.
    pub modified: Option<std::time::SystemTime>,
}

/// Parses a whole services file. Only a file that is not YAML at all, or not a mapping with a
/// `services` list, is an error; a bad entry only rejects that entry.
pub fn parse(text: &str) -> anyhow::Result<Parsed> {
    let mut parsed = Parsed::default();
    // Frontend -> name of the entry that claimed it first.
    let mut claimed: BTreeMap<Frontend, String> = BTreeMap::new();
    let mut index = 0;
    if !text.trim().is_empty() {
        let file = File {
            each: |value| {
                add_entry(&mut parsed, &mut claimed, index, value);
                index += 1;
            },
        };
        serde::de::DeserializeSeed::deserialize(file, serde_norway::Deserializer::from_str(text))
            .context("services file is not a mapping with a `services` list")?;
    }
    Ok(parsed)
}

/// Translates entry `index` of the file into `parsed`: a service, or a rejection.
fn add_entry(
    parsed: &mut Parsed,
    claimed: &mut BTreeMap<Frontend, String>,
    index: usize,
    value: serde_norway::Value,
) {
    let name = value
        .get("name")
        .and_then(|n| n.as_str())
        .map(str::to_owned);
    let location = match &name {
        Some(name) => format!("services[{index}] {name:?}"),
        None => format!("services[{index}]"),
    };
    let reject = |reason: &'static str, detail: String| Rejection {
        location: location.clone(),
        reason,
        detail,
    };
    let service = match translate(value) {
        Ok(service) => service,
        Err((reason, detail)) => {
            parsed.rejections.push(reject(reason, detail));
            return;
        }
    };
    if parsed.model.services.contains_key(&service.name) {
        parsed.rejections.push(reject(
            "duplicate_name",
            format!(
                "name {:?} is already used by an earlier entry",
                service.name
            ),
        ));
        return;
    }
    if let Some(owner) = service.frontends.iter().find_map(|f| claimed.get(f)) {
        parsed.rejections.push(reject(
            "duplicate_frontend",
            format!(
                "{} is already served by entry {owner:?}",
                service.frontends[0]
            ),
        ));
        return;
    }
    for frontend in &service.frontends {
        claimed.insert(*frontend, service.name.clone());
    }
    parsed.model.services.insert(service.name.clone(), service);
}

type Invalid = (&'static str, String);

fn translate(value: serde_norway::Value) -> Result<Service, Invalid> {
    let entry: Entry = serde_norway::from_value(value).map_err(|e| ("malformed", e.to_string()))?;
    if entry.name.is_empty() {
        return Err(("malformed", "name must not be empty".into()));
    }
    let vip: IpAddr = entry.vip.parse().map_err(|_| {
        (
            "bad_ip",
            format!("vip {:?} is not an IP address", entry.vip),
        )
    })?;
    let port = parse_port(entry.port, "port")?;
    let protocol = Protocol::parse(&entry.protocol).ok_or((
        "unknown_protocol",
        format!("protocol {:?} is not one of TCP, UDP, SCTP", entry.protocol),
    ))?;
    let scheduler_name = entry.scheduler.as_deref().unwrap_or(DEFAULT_SCHEDULER);
    let scheduler = parse_scheduler(scheduler_name).ok_or((
        "unknown_scheduler",
        format!("scheduler {scheduler_name:?} is not one of maglev, mh, rr, wrr, sh, lc, wlc"),
    ))?;
    let affinity_timeout_s = match entry.session_affinity {
        None => None,
        Some(SessionAffinity {
            client_ip: ClientIp {
                timeout_seconds: None,
            },
        }) => Some(DEFAULT_AFFINITY_TIMEOUT_S),
        Some(SessionAffinity {
            client_ip: ClientIp {
                timeout_seconds: Some(v),
            },
        }) => {
            match v.as_u64() {
                // Kubernetes' own bounds for sessionAffinityConfig.clientIP.timeoutSeconds.
                Some(t @ 1..=86_400) => Some(t as u32),
                _ => {
                    return Err((
                        "bad_affinity_timeout",
                        format!(
                            "timeoutSeconds {} is not an integer in 1..=86400",
                            yaml_text(&v)
                        ),
                    ));
                }
            }
        }
    };

    let mut backends = Vec::with_capacity(entry.backends.len());
    for (i, b) in entry.backends.into_iter().enumerate() {
        let addr: IpAddr = b.ip.parse().map_err(|_| {
            (
                "bad_ip",
                format!("backends[{i}].ip {:?} is not an IP address", b.ip),
            )
        })?;
        if addr.is_ipv4() != vip.is_ipv4() {
            return Err((
                "family_mismatch",
                format!("backends[{i}].ip {addr} is not of the same IP family as vip {vip}"),
            ));
        }
        let port = parse_port(b.port, &format!("backends[{i}].port"))?;
        let weight = match b.weight {
            None => DEFAULT_WEIGHT,
            Some(v) => match v.as_u64() {
                Some(w) if w <= u32::MAX as u64 => w as u32,
                _ => {
                    return Err((
                        "bad_weight",
                        format!(
                            "backends[{i}].weight {} is not a non-negative integer",
                            yaml_text(&v)
                        ),
                    ));
                }
            },
        };
        let terminating = match b.terminating {
            None => false,
            Some(serde_norway::Value::Bool(t)) => t,
            Some(v) => {
                return Err((
                    "bad_terminating",
                    format!(
                        "backends[{i}].terminating {} is not true or false",
                        yaml_text(&v)
                    ),
                ));
            }
        };
        backends.push(if terminating {
            Backend {
                ready: false,
                serving: true,
                terminating: true,
                ..Backend::ready(addr, port, weight)
            }
        } else {
            Backend::ready(addr, port, weight)
        });
    }
    backends.sort();
    if let Some(w) = backends
        .windows(2)
        .find(|w| (w[0].addr, w[0].port) == (w[1].addr, w[1].port))
    {
        return Err((
            "duplicate_backend",
            format!("backend {}:{} is listed twice", w[0].addr, w[0].port),
        ));
    }

    Ok(Service {
        name: entry.name,
        frontends: vec![Frontend {
            addr: vip,
            port,
            protocol,
            scope: Scope::Internal,
        }],
        scheduler,
        affinity_timeout_s,
        internal_local: false,
        external_local: false,
        backends,
    })
}

fn parse_port(value: i64, field: &str) -> Result<u16, Invalid> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(("bad_port", format!("{field} {value} is not in 1..=65535"))),
    }
}

fn yaml_text(v: &serde_norway::Value) -> String {
    serde_norway::to_string(v)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| format!("{v:?}"))
}

/// Reads and parses the file.
pub fn load(path: &Path) -> anyhow::Result<Parsed> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read services file {}", path.display()))?;
    parse(&text).with_context(|| format!("services file {}", path.display()))
}

/// Waits for editors to finish writing before re-reading (several inotify events arrive for one
/// save).
const SETTLE: Duration = Duration::from_millis(50);

/// Sends the parsed file now, then again whenever it changes or SIGHUP arrives. A file that
/// cannot be read or parsed is reported and the last good state stays.
pub async fn watch(path: PathBuf, events: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
    use notify::{RecursiveMode, Watcher as _};
    use tokio::signal::unix::{SignalKind, signal};

    let (tx, mut changed) = mpsc::unbounded_channel();
    let file_name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads of the file (our own included) raise access events; only writes, creations,
        // renames and removals mean new content.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
            && event
                .paths
                .iter()
                .any(|p| p.file_name() == file_name.as_deref())
        {
            let _ = tx.send(());
        }
    })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    let mut hangup = signal(SignalKind::hangup())?;

    let mut last_modified = None;
    loop {
        match load(&path) {
            Ok(mut parsed) => {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                if modified != last_modified {
                    parsed.modified = modified;
                    last_modified = modified;
                }
                if events.send(SourceEvent::File(parsed)).await.is_err() {
                    return Ok(());
                }
            }
            Err(e) => warn!("services file not applied, keeping the last good state: {e:#}"),
        }
        tokio::select! {
            Some(()) = changed.recv() => info!(path = %path.display(), "services file changed"),
            _ = hangup.recv() => info!("SIGHUP: re-reading the services file"),
        }
        tokio::time::sleep(SETTLE).await;
        while changed.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::Scheduler;

    const GOOD: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    protocol: TCP
    scheduler: maglev
    sessionAffinity: {clientIP: {timeoutSeconds: 300}}
    backends:
      - {ip: 10.10.2.11, port: 8080, weight: 3}
      - {ip: 10.10.2.12, port: 8080}
  - name: dns
    vip: 10.96.0.53
    port: 53
    protocol: UDP
    scheduler: rr
    backends: []
";

    #[test]
    fn a_valid_file_loads_every_entry() {
        let parsed = parse(GOOD).unwrap();
        assert!(parsed.rejections.is_empty(), "{:?}", parsed.rejections);
        let web = &parsed.model.services["web"];
        assert_eq!(web.frontends.len(), 1);
        assert_eq!(
            web.frontends[0].addr,
            "10.96.0.10".parse::<IpAddr>().unwrap()
        );
        assert_eq!(web.frontends[0].port, 80);
        assert_eq!(web.frontends[0].protocol, Protocol::Tcp);
        assert_eq!(web.scheduler, Scheduler::Maglev);
        assert_eq!(web.affinity_timeout_s, Some(300));
        assert_eq!(
            web.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            vec![3, 1]
        );
        let dns = &parsed.model.services["dns"];
        assert_eq!(dns.scheduler, Scheduler::RoundRobin);
        assert_eq!(dns.frontends[0].protocol, Protocol::Udp);
        assert!(dns.backends.is_empty());
        assert_eq!(dns.affinity_timeout_s, None);
    }

    #[test]
    fn terminating_backends_are_serving_but_not_ready() {
        let parsed = parse(
            "services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - {ip: 10.10.2.11, port: 8080, weight: 2}
      - {ip: 10.10.2.12, port: 8080, weight: 3, terminating: true}
      - {ip: 10.10.2.13, port: 8080, terminating: false}
",
        )
        .unwrap();
        assert!(parsed.rejections.is_empty(), "{:?}", parsed.rejections);
        let backends = &parsed.model.services["web"].backends;
        let flags: Vec<(bool, bool, bool, u32)> = backends
            .iter()
            .map(|b| (b.ready, b.serving, b.terminating, b.weight))
            .collect();
        assert_eq!(
            flags,
            vec![
                (true, true, false, 2),
                (false, true, true, 3),
                (true, true, false, 1)
            ]
        );
    }

    #[test]
    fn affinity_without_timeout_uses_the_kubernetes_default() {
        let parsed = parse(
            "services:\n- {name: a, vip: 10.0.0.1, port: 1, sessionAffinity: {clientIP: {}}}\n",
        )
        .unwrap();
        assert_eq!(
            parsed.model.services["a"].affinity_timeout_s,
            Some(DEFAULT_AFFINITY_TIMEOUT_S)
        );
    }

    /// Each bad entry sits between two good ones; it alone is rejected, with the reason.
    #[test]
    fn each_invalid_entry_is_rejected_alone_with_a_reason() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "vip: 10.96.0.300, port: 80",
                "bad_ip",
                "vip \"10.96.0.300\"",
            ),
            ("vip: not-an-ip, port: 80", "bad_ip", "not an IP address"),
            (
                "vip: 10.96.1.1, port: 0",
                "bad_port",
                "port 0 is not in 1..=65535",
            ),
            ("vip: 10.96.1.1, port: 65536", "bad_port", "port 65536"),
            ("vip: 10.96.1.1, port: -1", "bad_port", "port -1"),
            (
                "vip: 10.96.1.1, port: 80, protocol: ICMP",
                "unknown_protocol",
                "\"ICMP\"",
            ),
            (
                "vip: 10.96.1.1, port: 80, scheduler: random",
                "unknown_scheduler",
                "\"random\"",
            ),
            (
                "vip: 10.96.1.1, port: 80, backends: [{ip: 10.1.1.1, port: 80, weight: -1}]",
                "bad_weight",
                "backends[0].weight -1 is not a non-negative integer",
            ),
            (
                "vip: 10.96.1.1, port: 80, backends: [{ip: 10.1.1.1, port: 80, weight: 1.5}]",
                "bad_weight",
                "weight 1.5",
            ),
            (
                "vip: 10.96.1.1, port: 80, backends: [{ip: 10.1.1.1, port: 80, weight: heavy}]",
                "bad_weight",
                "weight heavy",
            ),
            (
                "vip: 10.96.1.1, port: 80, backends: [{ip: 10.1.1.1, port: 70000}]",
                "bad_port",
                "backends[0].port 70000",
            ),
            (
                "vip: 10.96.1.1, port: 80, backends: [{ip: 10.1.1, port: 80}]",
                "bad_ip",
                "backends[0].ip",
            ),
            (
                "vip: 10.96.1.1, port: 80, colour: red",
                "malformed",
                "colour",
            ),
            (
                "vip: 10.96.0.10, port: 80",
                "duplicate_frontend",
                "10.96.0.10:80/TCP",
            ),
            (
                "vip: 10.96.1.1, port: 80, backends: [{ip: 10.1.1.1, port: 80, terminating: yes}]",
                "bad_terminating",
                "backends[0].terminating yes is not true or false",
            ),
            (
                "vip: 10.96.1.1, port: 80, sessionAffinity: {clientIP: {timeoutSeconds: 0}}",
                "bad_affinity_timeout",
                "timeoutSeconds 0",
            ),
        ];
        for (fields, reason, detail) in cases {
            let text = format!(
                "services:
  - {{name: first, vip: 10.96.0.10, port: 80, backends: [{{ip: 10.1.0.1, port: 80}}]}}
  - {{name: bad, {fields}}}
  - {{name: last, vip: 10.96.0.11, port: 80, protocol: UDP}}
"
            );
            let parsed = parse(&text).unwrap();
            assert_eq!(
                parsed.model.services.keys().collect::<Vec<_>>(),
                vec!["first", "last"],
                "{fields}"
            );
            assert_eq!(
                parsed.rejections.len(),
                1,
                "{fields}: {:?}",
                parsed.rejections
            );
            let r = &parsed.rejections[0];
            assert_eq!(r.location, "services[1] \"bad\"", "{fields}");
            assert_eq!(r.reason, *reason, "{fields}: {r}");
            assert!(
                r.detail.contains(detail),
                "{fields}: {:?} does not mention {detail:?}",
                r.detail
            );
        }
    }

    #[test]
    fn same_vip_and_port_on_another_protocol_is_not_a_duplicate() {
        let parsed = parse(
            "services:
  - {name: tcp, vip: 10.0.0.1, port: 53, protocol: TCP}
  - {name: udp, vip: 10.0.0.1, port: 53, protocol: UDP}
",
        )
        .unwrap();
        assert!(parsed.rejections.is_empty());
        assert_eq!(parsed.model.services.len(), 2);
    }

    #[test]
    fn duplicate_names_and_backends_are_rejected() {
        let parsed = parse(
            "services:
  - {name: a, vip: 10.0.0.1, port: 1}
  - {name: a, vip: 10.0.0.2, port: 1}
  - {name: b, vip: 10.0.0.3, port: 1, backends: [{ip: 10.1.1.1, port: 1}, {ip: 10.1.1.1, port: 1}]}
",
        )
        .unwrap();
        let reasons: Vec<_> = parsed.rejections.iter().map(|r| r.reason).collect();
        assert_eq!(reasons, vec!["duplicate_name", "duplicate_backend"]);
        assert_eq!(parsed.model.services.len(), 1);
    }

    #[test]
    fn an_entry_without_a_name_is_located_by_index() {
        let parsed = parse("services:\n  - {vip: 10.0.0.1, port: 1}\n").unwrap();
        assert_eq!(parsed.rejections[0].location, "services[0]");
        assert_eq!(parsed.rejections[0].reason, "malformed");
    }

    #[test]
    fn a_file_that_is_not_a_services_mapping_is_an_error() {
        assert!(parse("- just\n- a list\n").is_err());
        assert!(parse("services: {a: 1}\n").is_err());
        assert!(parse("").unwrap().model.services.is_empty());
        let err = format!("{:#}", parse("service:\n  - name: typo\n").unwrap_err());
        assert!(err.contains("unknown field `service`"), "{err}");
        assert!(parse("services:\n").unwrap().model.services.is_empty());
        assert!(parse("{}\n").unwrap().model.services.is_empty());
    }

    #[test]
    fn the_shipped_example_file_is_valid() {
        let text = include_str!("../../../deploy/examples/services.yaml");
        let parsed = parse(text).unwrap();
        assert!(parsed.rejections.is_empty(), "{:?}", parsed.rejections);
        assert!(!parsed.model.services.is_empty());
    }
}
