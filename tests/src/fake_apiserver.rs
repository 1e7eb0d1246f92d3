//! A small fake Kubernetes API server: plain HTTP on 127.0.0.1, real list and watch JSON for v1
//! Services, discovery.k8s.io/v1 EndpointSlices and v1 Nodes, plus the discovery documents kubectl
//! reads. The agent reaches it through a kubeconfig exactly as it would reach a cluster.
//!
//! It does what a real API server does to a watcher, on demand:
//! * lists carry `metadata.resourceVersion`; every change gets the next resourceVersion;
//! * watches (`?watch=1&resourceVersion=R&allowWatchBookmarks=true&timeoutSeconds=T`) stream
//!   newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}`, replaying
//!   what happened after R, and end cleanly after `timeoutSeconds`;
//! * [`FakeApiServer::expire_watches`]: history is compacted, every open watch gets an ERROR event
//!   with a 410 Status ("too old resource version") and a watch from an older R gets it at once,
//!   so clients must relist; [`FakeApiServer::apply_unseen`] makes a change no watch sees, which
//!   only a relist can find;
//! * [`FakeApiServer::drop_watches`]: watch connections are cut mid-stream (no terminating chunk);
//! * [`FakeApiServer::set_delay`]: slow responses;
//! * [`FakeApiServer::set_available`]: an outage, where every connection is accepted, its request
//!   line recorded and the connection closed without an answer.
//!
//! Every request is recorded ([`FakeApiServer::requests`]) so tests can see what a client did.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener as StdTcpListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{io::AsyncReadExt as _, net::TcpListener, sync::mpsc};

use crate::netns::Netns;

/// The resources the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    const ALL: [Resource; 3] = [Self::Services, Self::EndpointSlices, Self::Nodes];

    fn of_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Self::Services),
            "EndpointSlice" => Some(Self::EndpointSlices),
            "Node" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Nodes => "nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Self::Nodes
    }

    /// URL prefix of the group version.
    fn group_path(self) -> &'static str {
        match self {
            Self::EndpointSlices => "/apis/discovery.k8s.io/v1",
            _ => "/api/v1",
        }
    }

    fn short_names(self) -> Value {
        match self {
            Self::Services => json!(["svc"]),
            Self::EndpointSlices => json!([]),
            Self::Nodes => json!(["no"]),
        }
    }
}

/// A request the server saw.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub at: Instant,
    /// Path and query, e.g. `/api/v1/services?watch=true&resourceVersion=12`.
    pub uri: String,
    /// Closed without an answer because the server was unavailable.
    pub refused: bool,
}

impl RecordedRequest {
    pub fn is_watch(&self) -> bool {
        self.uri.contains("watch=true") || self.uri.contains("watch=1")
    }

    pub fn resource(&self) -> Option<Resource> {
        let path = self.uri.split('?').next().unwrap_or_default();
        Resource::ALL
            .into_iter()
            .find(|r| path.ends_with(&format!("/{}", r.plural())))
    }
}

type Key = (Resource, String, String);
type WatchFrame = Result<Frame<Bytes>, std::io::Error>;

struct Watch {
    id: u64,
    resource: Resource,
    /// `fieldSelector=metadata.name=X`.
    name: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<WatchFrame>,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, event type, object) since the last compaction.
    history: Vec<(u64, &'static str, Value)>,
    /// A watch from a resourceVersion below this one gets 410 Gone.
    compacted: u64,
    unavailable: bool,
    delay: Duration,
    watches: Vec<Watch>,
    next_watch: u64,
    requests: Vec<RecordedRequest>,
}

impl State {
    fn matching<'a>(
        &'a self,
        resource: Resource,
        name: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |((r, _, n), _)| *r == resource && name.is_none_or(|name| name == n))
            .map(|(_, v)| v)
    }

    fn notify(&mut self, kind: &'static str, object: &Value) {
        let resource = Resource::of_kind(object["kind"].as_str().unwrap_or_default()).unwrap();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let line = event_line(kind, object);
        self.watches.retain(|w| {
            if w.resource != resource || w.name.as_deref().is_some_and(|n| n != name) {
                return true;
            }
            w.tx.send(Ok(Frame::data(line.clone()))).is_ok()
        });
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code
    })
}

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 of this process's network namespace.
    pub fn start() -> anyhow::Result<Self> {
        let listener = StdTcpListener::bind("127.0.0.1:0")?;
        Self::serve(listener)
    }

    /// Starts on 127.0.0.1 inside `ns`, where an agent started in `ns` reaches it.
    pub fn start_in(ns: &Netns) -> anyhow::Result<Self> {
        let listener = ns.run(|| StdTcpListener::bind("127.0.0.1:0"))??;
        Self::serve(listener)
    }

    fn serve(listener: StdTcpListener) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()?;
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            ..State::default()
        }));
        let shared = state.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    if state.lock().unwrap().unavailable {
                        refuse(stream, &state).await;
                        return;
                    }
                    let service = service_fn(move |req| handle(req, state.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            state,
            runtime: Some(runtime),
        })
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
current-context: fake
",
                self.addr
            ),
        )
        .unwrap();
        path
    }

    /// Creates or replaces an object (a k8s-openapi type), notifying watches. Returns its new
    /// resourceVersion.
    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(&self, object: &K) -> u64 {
        self.put(serde_json::to_value(object).unwrap(), true)
    }

    /// Like [`Self::apply`], but no watch ever sees the change (as if its event had been
    /// compacted away): only a relist finds it. Call [`Self::expire_watches`] after it.
    pub fn apply_unseen<K: k8s_openapi::Resource + serde::Serialize>(&self, object: &K) -> u64 {
        self.put(serde_json::to_value(object).unwrap(), false)
    }

    fn put(&self, mut object: Value, notify: bool) -> u64 {
        let resource = Resource::of_kind(object["kind"].as_str().unwrap_or_default())
            .expect("a Service, EndpointSlice or Node");
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let meta = object["metadata"].as_object_mut().expect("metadata");
        if resource.namespaced() && !meta.contains_key("namespace") {
            meta.insert("namespace".into(), json!("default"));
        }
        let namespace = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = meta["name"].as_str().expect("metadata.name").to_owned();
        let key = (resource, namespace, name);
        let existing = s.objects.get(&key).cloned();
        let meta = object["metadata"].as_object_mut().unwrap();
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let (uid, created) = match &existing {
            Some(old) => (
                old["metadata"]["uid"].clone(),
                old["metadata"]["creationTimestamp"].clone(),
            ),
            None => (
                json!(format!("00000000-0000-4000-8000-{rv:012}")),
                // Distinct, increasing creation times: the oldest Service wins contested frontends.
                json!(format!("2025-01-01T00:{:02}:{:02}Z", rv / 60 % 60, rv % 60)),
            ),
        };
        if !meta.contains_key("uid") {
            meta.insert("uid".into(), uid);
        }
        if !meta.contains_key("creationTimestamp") {
            meta.insert("creationTimestamp".into(), created);
        }
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, object.clone());
        if notify {
            s.history.push((rv, kind, object.clone()));
            s.notify(kind, &object);
        }
        rv
    }

    /// Deletes an object (`namespace` is ignored for Nodes). Returns the deletion's
    /// resourceVersion. Panics if there is no such object.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> u64 {
        let resource = Resource::of_kind(K::KIND).unwrap();
        let ns = if resource.namespaced() { namespace } else { "" };
        let mut s = self.state.lock().unwrap();
        let mut object = s
            .objects
            .remove(&(resource, ns.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no {} {ns}/{name}", K::KIND));
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push((rv, "DELETED", object.clone()));
        s.notify("DELETED", &object);
        rv
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.lock().unwrap().rv
    }

    /// Compacts the history: every open watch gets an ERROR event with a 410 Gone Status and
    /// ends, and a watch from any resourceVersion before now gets the same at once.
    pub fn expire_watches(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted = s.rv;
        s.history.clear();
        let message = format!("too old resource version: 1 ({})", s.rv);
        let line = event_line("ERROR", &status(410, "Expired", &message));
        for w in s.watches.drain(..) {
            let _ = w.tx.send(Ok(Frame::data(line.clone())));
        }
    }

    /// Cuts every open watch connection mid-stream (no terminating chunk).
    pub fn drop_watches(&self) {
        let mut s = self.state.lock().unwrap();
        for w in s.watches.drain(..) {
            let _ =
                w.tx.send(Err(std::io::Error::other("connection cut by the test")));
        }
    }

    /// Sends a BOOKMARK with the current resourceVersion to every watch that asked for them.
    pub fn bookmark(&self) {
        let mut s = self.state.lock().unwrap();
        let rv = s.rv.to_string();
        s.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let object = json!({
                "kind": w.resource.kind(),
                "apiVersion": w.resource.api_version(),
                "metadata": {"resourceVersion": rv}
            });
            w.tx.send(Ok(Frame::data(event_line("BOOKMARK", &object))))
                .is_ok()
        });
    }

    /// An outage (`false`): open watches are cut and every new connection is closed without an
    /// answer, until `true`.
    pub fn set_available(&self, available: bool) {
        self.state.lock().unwrap().unavailable = !available;
        if !available {
            self.drop_watches();
        }
    }

    /// Delays every answer (lists, watches, discovery) by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Open watch streams.
    pub fn open_watches(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        s.watches.retain(|w| !w.tx.is_closed());
        s.watches.len()
    }

    /// Waits until `n` watches are open (one per resource the agent watches).
    pub fn wait_for_watches(&self, n: usize, patience: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience;
        while self.open_watches() < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} watches open after {patience:?}, expected {n}",
                self.open_watches()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Outage: read the request line so the attempt is recorded, then close without answering.
async fn refuse(mut stream: tokio::net::TcpStream, state: &Mutex<State>) {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    let uri = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    state.lock().unwrap().requests.push(RecordedRequest {
        at: Instant::now(),
        uri,
        refused: true,
    });
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(serde_json::to_vec(body).unwrap()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap()
}

fn query_map(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which resource a path lists, and in which namespace (`None`: all namespaces).
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    for r in Resource::ALL {
        let base = r.group_path();
        let Some(rest) = path.strip_prefix(base) else {
            continue;
        };
        if rest == format!("/{}", r.plural()) {
            return Some((r, None));
        }
        if r.namespaced()
            && let Some(rest) = rest.strip_prefix("/namespaces/")
            && let Some((ns, plural)) = rest.split_once('/')
            && plural == r.plural()
        {
            return Some((r, Some(ns.to_owned())));
        }
    }
    None
}

fn discovery(path: &str, addr: &str) -> Option<Value> {
    let resource = |r: Resource| {
        json!({
            "name": r.plural(),
            "singularName": r.kind().to_lowercase(),
            "namespaced": r.namespaced(),
            "kind": r.kind(),
            "verbs": ["get", "list", "watch"],
            "shortNames": r.short_names()
        })
    };
    Some(match path {
        "/version" => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-xlb-fake",
            "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"
        }),
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]
        }),
        "/apis" => json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [{
                "name": "discovery.k8s.io",
                "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
            }]
        }),
        "/api/v1" => json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [resource(Resource::Services), resource(Resource::Nodes)]
        }),
        "/apis/discovery.k8s.io/v1" => json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "discovery.k8s.io/v1",
            "resources": [resource(Resource::EndpointSlices)]
        }),
        _ => return None,
    })
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Body>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let query = query_map(req.uri().query().unwrap_or_default());
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let delay = {
        let mut s = state.lock().unwrap();
        let unavailable = s.unavailable;
        s.requests.push(RecordedRequest {
            at: Instant::now(),
            uri: req.uri().to_string(),
            refused: unavailable,
        });
        if unavailable {
            // An error from the service makes hyper close the connection without an answer.
            return Err(std::io::Error::other("unavailable"));
        }
        s.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if req.method() != hyper::Method::GET {
        return Ok(json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "the fake API server is read-only"),
        ));
    }
    if let Some(doc) = discovery(&path, &host) {
        return Ok(json_response(StatusCode::OK, &doc));
    }
    let Some((resource, namespace)) = route(&path) else {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            ),
        ));
    };
    let name = query
        .get("fieldSelector")
        .filter(|f| !f.is_empty())
        .map(|f| {
            f.strip_prefix("metadata.name=")
                .map(str::to_owned)
                .ok_or_else(|| f.clone())
        })
        .transpose();
    let name = match name {
        Ok(name) => name,
        Err(selector) => {
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &status(
                    400,
                    "BadRequest",
                    &format!("unsupported field selector {selector:?}"),
                ),
            ));
        }
    };
    let in_namespace = |v: &Value| {
        namespace
            .as_deref()
            .is_none_or(|ns| v["metadata"]["namespace"].as_str() == Some(ns))
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    if !watching {
        let s = state.lock().unwrap();
        let items: Vec<Value> = s
            .matching(resource, name.as_deref())
            .filter(|v| in_namespace(v))
            .map(|v| {
                // Like a real API server, list items carry no kind or apiVersion.
                let mut v = v.clone();
                let o = v.as_object_mut().unwrap();
                o.remove("kind");
                o.remove("apiVersion");
                v
            })
            .collect();
        return Ok(json_response(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", resource.kind()),
                "apiVersion": resource.api_version(),
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": items
            }),
        ));
    }

    // A watch. Replay and registration happen under one lock, so no event falls in between.
    let (tx, rx) = mpsc::unbounded_channel::<WatchFrame>();
    let from: Option<u64> = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .map(|v| v.parse().unwrap_or(0));
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs);
    {
        let mut s = state.lock().unwrap();
        match from {
            Some(from) if from < s.compacted => {
                let message = format!("too old resource version: {from} ({})", s.rv);
                let _ = tx.send(Ok(Frame::data(event_line(
                    "ERROR",
                    &status(410, "Expired", &message),
                ))));
                drop(tx);
                return Ok(stream_response(rx));
            }
            Some(from) => {
                for (_, kind, object) in s.history.iter().filter(|(rv, _, o)| {
                    *rv > from
                        && o["kind"] == resource.kind()
                        && in_namespace(o)
                        && name
                            .as_deref()
                            .is_none_or(|n| o["metadata"]["name"].as_str() == Some(n))
                }) {
                    let _ = tx.send(Ok(Frame::data(event_line(kind, object))));
                }
            }
            // No resourceVersion: the current state as ADDED events, then changes.
            None => {
                for object in s.matching(resource, name.as_deref()) {
                    if in_namespace(object) {
                        let _ = tx.send(Ok(Frame::data(event_line("ADDED", object))));
                    }
                }
            }
        }
        if namespace.is_some() {
            // Namespaced watches are not used by the agent or the tests; serve the replay only.
            drop(tx);
            return Ok(stream_response(rx));
        }
        s.next_watch += 1;
        let id = s.next_watch;
        s.watches.push(Watch {
            id,
            resource,
            name,
            bookmarks,
            tx,
        });
        if let Some(timeout) = timeout {
            let state = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                // Dropping the sender ends the stream cleanly, as a real server's timeout does.
                state.lock().unwrap().watches.retain(|w| w.id != id);
            });
        }
    }
    Ok(stream_response(rx))
}

fn stream_response(rx: mpsc::UnboundedReceiver<WatchFrame>) -> Response<Body> {
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(StreamBody::new(frames).boxed_unsync())
        .unwrap()
}

/// The requests a test made while the server was in some state, for one resource.
pub fn count(requests: &[RecordedRequest], f: impl Fn(&RecordedRequest) -> bool) -> usize {
    requests.iter().filter(|r| f(r)).count()
}

/// Runs kubectl against a kubeconfig, failing loudly if kubectl is missing.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let cache = kubeconfig.parent().unwrap().join("kubectl-cache");
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args(args)
        .output()
        .context(
            "kubectl is required (v1.32 with kustomize): install it, e.g. from Kubernetes' Debian packages",
        )?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}
