//! kube-proxy's `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1), so xlb can take the
//! ConfigMap a cluster already has for kube-proxy (`--config FILE`).
//!
//! Used fields:
//! * `mode`: `""` or `ipvs` (xlb is an IPVS-compatible proxy; it programs its own dataplane), `xdp`;
//!   any other mode is an error, since the operator asked for a proxy xlb is not;
//! * `ipvs.scheduler`: the default scheduler (`rr`, `wrr`, `lc`, `wlc`, `sh`, `mh`, or `maglev`);
//!   empty keeps xlb's default, Maglev;
//! * `ipvs.syncPeriod`, `ipvs.minSyncPeriod`: the sync loop's periods (Go durations, `0s` = default);
//! * `ipvs.excludeCIDRs`: ranges whose IPVS virtual servers kube-proxy must never clean up. Parsed
//!   and checked; xlb's XDP dataplane only ever touches its own pinned maps, so there is nothing
//!   to exclude there;
//! * `metricsBindAddress`: the `/healthz` listener (`host:port`, `:port`);
//! * `nodePortAddresses`: CIDRs or `primary`;
//! * `clusterCIDR`: parsed and checked; xlb does not masquerade yet, which is what kube-proxy uses
//!   it for.
//!
//! Every other field is listed, in one log line at start, as ignored.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use serde_norway::{Mapping, Value};

use crate::{
    model::{Scheduler, parse_scheduler},
    source::kubernetes::translate::NodePortAddresses,
};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// The fields xlb uses, checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubeProxyConfig {
    pub mode: String,
    pub scheduler: Option<Scheduler>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub exclude_cidrs: Vec<IpNet>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub node_port_addresses: NodePortAddresses,
    pub cluster_cidrs: Vec<IpNet>,
    /// Fields present in the file that xlb does not use, as dotted paths.
    pub ignored: Vec<String>,
}

const TOP_LEVEL: &[&str] = &[
    "apiVersion",
    "kind",
    "mode",
    "ipvs",
    "metricsBindAddress",
    "nodePortAddresses",
    "clusterCIDR",
];
const IPVS: &[&str] = &["scheduler", "syncPeriod", "minSyncPeriod", "excludeCIDRs"];

/// Reads and parses a KubeProxyConfiguration file.
pub fn load(path: &std::path::Path) -> anyhow::Result<KubeProxyConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read kube-proxy configuration {}", path.display()))?;
    parse(&text).with_context(|| format!("kube-proxy configuration {}", path.display()))
}

pub fn parse(text: &str) -> anyhow::Result<KubeProxyConfig> {
    let value: Value = serde_norway::from_str(text).context("not YAML")?;
    let Some(top) = value.as_mapping() else {
        bail!("not a mapping");
    };
    let api_version = string(top, "apiVersion")?.unwrap_or_default();
    let kind = string(top, "kind")?.unwrap_or_default();
    if api_version != API_VERSION || kind != KIND {
        bail!("expected apiVersion {API_VERSION} kind {KIND}, got {api_version:?} {kind:?}");
    }
    let mut config = KubeProxyConfig::default();
    config.ignored.extend(unknown_keys(top, TOP_LEVEL, ""));

    config.mode = string(top, "mode")?.unwrap_or_default();
    if !matches!(config.mode.as_str(), "" | "ipvs" | "xdp") {
        bail!(
            "mode {:?}: xlb is an ipvs-style proxy (mode \"\", \"ipvs\" or \"xdp\")",
            config.mode
        );
    }
    if let Some(ipvs) = top.get("ipvs").filter(|v| !v.is_null()) {
        let Some(ipvs) = ipvs.as_mapping() else {
            bail!("ipvs is not a mapping");
        };
        config.ignored.extend(unknown_keys(ipvs, IPVS, "ipvs."));
        config.scheduler = match string(ipvs, "scheduler")?.as_deref() {
            None | Some("") => None,
            Some(name) => Some(
                parse_scheduler(name)
                    .with_context(|| format!("ipvs.scheduler {name:?} is not a known scheduler"))?,
            ),
        };
        config.sync_period = duration(ipvs, "syncPeriod")?;
        config.min_sync_period = duration(ipvs, "minSyncPeriod")?;
        config.exclude_cidrs = string_list(ipvs, "excludeCIDRs")?
            .iter()
            .map(|c| cidr(c, "ipvs.excludeCIDRs"))
            .collect::<anyhow::Result<_>>()?;
    }
    config.metrics_bind_address = match string(top, "metricsBindAddress")?.as_deref() {
        None | Some("") => None,
        Some(addr) => Some(bind_address(addr)?),
    };
    config.node_port_addresses = NodePortAddresses::parse(&string_list(top, "nodePortAddresses")?)
        .map_err(|e| anyhow::anyhow!("nodePortAddresses: {e}"))?;
    config.cluster_cidrs = string(top, "clusterCIDR")?
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| cidr(c, "clusterCIDR"))
        .collect::<anyhow::Result<_>>()?;
    Ok(config)
}

fn unknown_keys(map: &Mapping, known: &[&str], prefix: &str) -> Vec<String> {
    map.keys()
        .map(|k| {
            k.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{k:?}"))
        })
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| format!("{prefix}{k}"))
        .collect()
}

fn string(map: &Mapping, key: &str) -> anyhow::Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{key} is not a string: {other:?}"),
    }
}

fn string_list(map: &Mapping, key: &str) -> anyhow::Result<Vec<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{key} holds a non-string: {i:?}"))
            })
            .collect(),
        Some(other) => bail!("{key} is not a list: {other:?}"),
    }
}

fn duration(map: &Mapping, key: &str) -> anyhow::Result<Option<Duration>> {
    let Some(text) = string(map, key)? else {
        return Ok(None);
    };
    let d = parse_go_duration(&text).with_context(|| format!("ipvs.{key} {text:?}"))?;
    Ok((!d.is_zero()).then_some(d))
}

fn cidr(text: &str, field: &str) -> anyhow::Result<IpNet> {
    text.parse()
        .with_context(|| format!("{field}: {text:?} is not a CIDR"))
}

/// `host:port` or `:port` (all addresses), as kube-proxy takes it.
fn bind_address(text: &str) -> anyhow::Result<SocketAddr> {
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_owned(),
    };
    full.parse()
        .with_context(|| format!("metricsBindAddress {text:?} is not host:port"))
}

/// Parses a Go `time.Duration` string (`30s`, `1m0s`, `1.5h`, `500ms`, `0`), the format of
/// Kubernetes' metav1.Duration fields.
pub fn parse_go_duration(text: &str) -> anyhow::Result<Duration> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        bail!("empty duration");
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .with_context(|| format!("missing unit in {text:?}"))?;
        let number: f64 = rest[..number_len]
            .parse()
            .with_context(|| format!("bad number in {text:?}"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => bail!("unknown unit {unit:?} in {text:?}"),
        };
        total += Duration::from_secs_f64(number * seconds);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        for (text, want) in [
            ("30s", Duration::from_secs(30)),
            ("1m0s", Duration::from_secs(60)),
            ("1h2m3s", Duration::from_secs(3723)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
        ] {
            assert_eq!(parse_go_duration(text).unwrap(), want, "{text}");
        }
        for bad in ["", "30", "3x", "s", "1..2s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_full_kube_proxy_configuration() {
        let c = parse(
            "
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
bindAddress: 0.0.0.0
clusterCIDR: 10.244.0.0/16,fd00:244::/56
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [192.168.0.0/16]
conntrack: {maxPerCore: 32768}
ipvs:
  scheduler: wrr
  syncPeriod: 30s
  minSyncPeriod: 1s
  excludeCIDRs: [10.0.0.0/24]
  strictARP: true
  tcpTimeout: 0s
",
        )
        .unwrap();
        assert_eq!(c.mode, "ipvs");
        assert_eq!(c.scheduler, Some(Scheduler::WeightedRoundRobin));
        assert_eq!(c.sync_period, Some(Duration::from_secs(30)));
        assert_eq!(c.min_sync_period, Some(Duration::from_secs(1)));
        assert_eq!(c.exclude_cidrs, ["10.0.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(
            c.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(
            c.node_port_addresses,
            NodePortAddresses::Cidrs(vec!["192.168.0.0/16".parse().unwrap()])
        );
        assert_eq!(c.cluster_cidrs.len(), 2);
        assert_eq!(
            c.ignored,
            [
                "bindAddress",
                "conntrack",
                "ipvs.strictARP",
                "ipvs.tcpTimeout"
            ]
        );
    }

    #[test]
    fn empty_values_keep_the_defaults() {
        let c = parse(
            "
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ''
metricsBindAddress: ''
ipvs: {scheduler: '', syncPeriod: 0s, minSyncPeriod: 0s}
",
        )
        .unwrap();
        assert_eq!(c.scheduler, None);
        assert_eq!(c.sync_period, None);
        assert_eq!(c.metrics_bind_address, None);
        assert_eq!(c.node_port_addresses, NodePortAddresses::All);
        assert!(c.ignored.is_empty());
    }

    #[test]
    fn bind_address_forms() {
        assert_eq!(
            bind_address(":10249").unwrap(),
            "0.0.0.0:10249".parse().unwrap()
        );
        assert!(bind_address("localhost").is_err());
    }

    #[test]
    fn wrong_documents_and_values_are_errors() {
        let header = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        for bad in [
            "apiVersion: v1\nkind: ConfigMap\n".to_string(),
            format!("{header}mode: iptables\n"),
            format!("{header}ipvs: {{scheduler: fastest}}\n"),
            format!("{header}ipvs: {{syncPeriod: soon}}\n"),
            format!("{header}ipvs: {{excludeCIDRs: [10.0.0.1]}}\n"),
            format!("{header}metricsBindAddress: nowhere\n"),
            format!("{header}nodePortAddresses: [primary, 10.0.0.0/8]\n"),
            format!("{header}clusterCIDR: 10.244.0.0/33\n"),
            "[1, 2]".to_string(),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }
}
