//! Every manifest under deploy/ parses into its k8s-openapi type, field for field: each object is
//! deserialized and serialized back, and the round trip must give the same JSON, so a misspelled
//! or misplaced field (which a plain deserialize would drop silently) fails. The kustomize build
//! (`kubectl kustomize deploy/`) is checked the same way, and the shipped KubeProxyConfiguration
//! must be one the agent accepts without ignoring anything. Needs kubectl (fails loudly without
//! it), not root.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::{Serialize, de::DeserializeOwned},
};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `kubectl kustomize deploy/`; panics loudly when kubectl is missing.
fn kustomize() -> String {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
        .expect("kubectl (v1.32, with kustomize) is required by this test; install it");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Removes nulls and empty maps so the comparison ignores how absence is spelled.
fn normalize(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, normalize(v)))
                .filter(|(_, v)| !v.is_null())
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        other => other,
    }
}

fn round_trip<K: Serialize + DeserializeOwned>(doc: &Value, origin: &str) {
    let typed: K = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: not a valid {}: {e}", doc["kind"]));
    let back = normalize(serde_json::to_value(&typed).unwrap());
    let want = normalize(doc.clone());
    assert_eq!(
        back, want,
        "{origin}: {} has fields its k8s-openapi type does not know (typo?)",
        doc["kind"]
    );
}

/// Checks one YAML stream; returns its documents as JSON.
fn check_documents(text: &str, origin: &str) -> Vec<Value> {
    let mut docs = vec![];
    for document in serde_norway::Deserializer::from_str(text) {
        let yaml = serde_norway::Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{origin}: YAML: {e}"));
        if yaml.is_null() {
            continue;
        }
        let doc: Value = serde_json::to_value(&yaml).unwrap();
        match doc["kind"].as_str() {
            Some("Namespace") => round_trip::<Namespace>(&doc, origin),
            Some("ServiceAccount") => round_trip::<ServiceAccount>(&doc, origin),
            Some("ClusterRole") => round_trip::<ClusterRole>(&doc, origin),
            Some("ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(&doc, origin),
            Some("ConfigMap") => round_trip::<ConfigMap>(&doc, origin),
            Some("DaemonSet") => round_trip::<DaemonSet>(&doc, origin),
            other => panic!("{origin}: unexpected kind {other:?}"),
        }
        docs.push(doc);
    }
    docs
}

use serde::Deserialize as _;

#[test]
fn every_manifest_file_parses_into_its_type() {
    let dir = deploy_dir().join("kubernetes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            n += check_documents(&text, &path.display().to_string()).len();
        }
    }
    assert_eq!(
        n, 6,
        "Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding, ConfigMap, DaemonSet"
    );
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the kustomize output"))
}

#[test]
fn the_kustomize_build_is_a_complete_least_privilege_install() {
    let docs = check_documents(&kustomize(), "kubectl kustomize deploy/");

    // RBAC: read-only on exactly the three watched resources.
    let role: ClusterRole = serde_json::from_value(find(&docs, "ClusterRole").clone()).unwrap();
    let mut granted = vec![];
    for rule in role.rules.unwrap() {
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.clone().unwrap() {
                granted.push(format!("{group}/{resource}"));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        ["/nodes", "/services", "discovery.k8s.io/endpointslices"]
    );
    let binding: ClusterRoleBinding =
        serde_json::from_value(find(&docs, "ClusterRoleBinding").clone()).unwrap();
    let ds: DaemonSet = serde_json::from_value(find(&docs, "DaemonSet").clone()).unwrap();
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(Some(&subject.name), pod.service_account_name.as_ref());
    assert_eq!(subject.namespace, ds.metadata.namespace);

    // The pod: host network, every node, bpffs from the host, NODE_NAME from the downward API.
    assert_eq!(pod.host_network, Some(true));
    assert!(
        pod.tolerations
            .as_ref()
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    let bpffs = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|v| v.host_path.as_ref())
        .unwrap();
    assert_eq!(bpffs.path, "/sys/fs/bpf");
    let agent = &pod.containers[0];
    let node_name = agent
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let args = agent.args.as_ref().unwrap();
    assert!(
        args.iter().any(|a| a == "--on-exit=keep"),
        "rolling updates keep the pinned program attached: {args:?}"
    );
    assert!(args.iter().any(|a| a == "--config=/etc/xlb/config.yaml"));
    let security = agent.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(
        caps.add.as_deref(),
        Some(&["BPF".to_string(), "PERFMON".into(), "NET_ADMIN".into()][..])
    );

    // The shipped KubeProxyConfiguration loads without ignored fields, and the probes use the
    // port of its metricsBindAddress.
    let cm: ConfigMap = serde_json::from_value(find(&docs, "ConfigMap").clone()).unwrap();
    let config =
        lb_agent::kube_proxy_config::parse(&cm.data.as_ref().unwrap()["config.yaml"]).unwrap();
    assert!(config.ignored.is_empty(), "{:?}", config.ignored);
    let port = config.metrics_bind_address.unwrap().port();
    for probe in [&agent.liveness_probe, &agent.readiness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port.into())
        );
    }
    // The mounted ConfigMap is the one the --config path reads.
    assert!(
        pod.volumes.as_ref().unwrap().iter().any(|v| v
            .config_map
            .as_ref()
            .map(|c| c.name.as_str())
            == cm.metadata.name.as_deref())
    );
    // The root filesystem is read-only: the status file's directory is a writable volume.
    let status_dir = std::path::Path::new(lb_agent::status::DEFAULT_STATUS_FILE)
        .parent()
        .unwrap();
    let run = agent
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| std::path::Path::new(&m.mount_path) == status_dir)
        .expect("a volume at the status file's directory");
    assert_ne!(run.read_only, Some(true));
    assert!(
        pod.volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.name == run.name && v.empty_dir.is_some())
    );
}
