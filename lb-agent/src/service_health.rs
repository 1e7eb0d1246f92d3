//! Health check node ports: for each LoadBalancer Service with externalTrafficPolicy=Local, an
//! HTTP listener on its `healthCheckNodePort` that the cloud load balancer probes on every node.
//! It answers as kube-proxy does, so load balancers configured for kube-proxy work unchanged:
//!
//! * 200 when this node has ready endpoints of the Service and the agent is healthy, else 503
//!   (the load balancer then stops sending to this node, whose Local policy would drop it);
//! * headers `Content-Type: application/json`, `X-Content-Type-Options: nosniff` and
//!   `X-Load-Balancing-Endpoint-Weight: <local endpoints>` (weighted load balancers use it);
//! * body `{"service": {"namespace", "name"}, "localEndpoints", "serviceProxyHealthy"}`.
//!
//! The sync loop calls [`ServiceHealthServer::sync`] with every model: listeners open and close
//! with their Services, and counts change in place without reopening anything.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{health::Health, model::HealthCheckPort};

/// What a port answers: the Service and its local endpoint count.
type Answers = Arc<Mutex<BTreeMap<u16, (String, usize)>>>;

/// The listeners of every health check node port of the current model.
pub struct ServiceHealthServer {
    agent: Arc<Health>,
    answers: Answers,
    listeners: BTreeMap<SocketAddr, JoinHandle<()>>,
}

impl ServiceHealthServer {
    /// `agent`: the agent's own health, reported as `serviceProxyHealthy`.
    pub fn new(agent: Arc<Health>) -> Self {
        Self {
            agent,
            answers: Arc::default(),
            listeners: BTreeMap::new(),
        }
    }

    /// Opens and closes listeners to match `checks` and updates the answers. Must run inside a
    /// tokio runtime. Returns the ports that could not be opened (retried at the next sync).
    pub fn sync(&mut self, checks: &BTreeMap<u16, HealthCheckPort>) -> Vec<String> {
        *self.answers.lock().unwrap() = checks
            .iter()
            .map(|(&port, c)| (port, (c.service.clone(), c.local_endpoints)))
            .collect();
        let wanted: BTreeMap<SocketAddr, &str> = checks
            .iter()
            .flat_map(|(&port, c)| {
                c.addrs
                    .iter()
                    .map(move |&addr| (SocketAddr::new(addr, port), c.service.as_str()))
            })
            .collect();
        self.listeners.retain(|addr, task| {
            let keep = wanted.contains_key(addr);
            if !keep {
                task.abort();
                info!(%addr, "closed health check node port");
            }
            keep
        });
        let mut problems = Vec::new();
        for (addr, service) in wanted {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            match listen(addr, self.answers.clone(), self.agent.clone()) {
                Ok(task) => {
                    info!(%addr, service, "serving health check node port");
                    self.listeners.insert(addr, task);
                }
                Err(e) => {
                    warn!(%addr, service, "cannot open health check node port: {e}");
                    problems.push(format!("health check node port {addr} of {service}: {e}"));
                }
            }
        }
        problems
    }

    /// Where listeners are open now.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.keys().copied().collect()
    }
}

impl Drop for ServiceHealthServer {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

/// Binds `addr` now (so a conflict is reported at this sync) and serves it in the background.
fn listen(
    addr: SocketAddr,
    answers: Answers,
    agent: Arc<Health>,
) -> std::io::Result<JoinHandle<()>> {
    let socket = std::net::TcpListener::bind(addr)?;
    socket.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(socket)?;
    let port = addr.port();
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (answers, agent) = (answers.clone(), agent.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_: Request<hyper::body::Incoming>| {
                    let response = respond(&answers, &agent, port);
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("health check connection: {e}");
                }
            });
        }
    }))
}

/// kube-proxy's answer for the Service on `port` (any path).
fn respond(answers: &Answers, agent: &Health, port: u16) -> Response<Full<Bytes>> {
    let (service, count) = answers
        .lock()
        .unwrap()
        .get(&port)
        .cloned()
        .unwrap_or_default();
    let healthy = agent.check().is_ok();
    let (namespace, name) = service.split_once('/').unwrap_or(("", &service));
    let body = serde_json::json!({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": count,
        "serviceProxyHealthy": healthy,
    });
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_string_pretty(&body).unwrap_or_default(),
    )));
    *response.status_mut() = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let headers = response.headers_mut();
    let value = hyper::header::HeaderValue::from;
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "x-content-type-options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-load-balancing-endpoint-weight", value(count));
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::net::IpAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A loopback port nothing listens on right now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// One plain HTTP/1.1 GET: (status, lower-cased head, body).
    async fn get(addr: SocketAddr) -> std::io::Result<(u16, String, serde_json::Value)> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Ok((
            status,
            head.to_lowercase(),
            serde_json::from_str(body).expect("a JSON body"),
        ))
    }

    fn checks(port: u16, local_endpoints: usize) -> BTreeMap<u16, HealthCheckPort> {
        BTreeMap::from([(
            port,
            HealthCheckPort {
                service: "shop/web".into(),
                addrs: vec![IpAddr::from([127, 0, 0, 1])],
                local_endpoints,
            },
        )])
    }

    #[tokio::test]
    async fn answers_as_kube_proxy_and_follows_the_model() {
        let agent = Health::new(Duration::from_secs(30));
        let mut server = ServiceHealthServer::new(agent.clone());
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));

        // Endpoints, but the agent has not synced yet: not healthy.
        assert!(server.sync(&checks(port, 2)).is_empty());
        assert_eq!(server.listening(), vec![addr]);
        let (status, _, body) = get(addr).await.unwrap();
        assert_eq!(status, 503);
        assert_eq!(body["serviceProxyHealthy"], false);

        agent.record_sync(true);
        let (status, head, body) = get(addr).await.unwrap();
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(
            head.contains("x-load-balancing-endpoint-weight: 2"),
            "{head}"
        );
        assert_eq!(
            body,
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );

        // The node's last local endpoint goes: the load balancer must stop sending here.
        assert!(server.sync(&checks(port, 0)).is_empty());
        let (status, head, body) = get(addr).await.unwrap();
        assert_eq!(status, 503);
        assert!(
            head.contains("x-load-balancing-endpoint-weight: 0"),
            "{head}"
        );
        assert_eq!(body["localEndpoints"], 0);

        // The Service goes: so does its listener (closed once its task is cancelled).
        assert!(server.sync(&BTreeMap::new()).is_empty());
        assert!(server.listening().is_empty());
        let mut refused = false;
        for _ in 0..200 {
            if get(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "{addr} still answers after its Service went");
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_and_retried() {
        let mut server = ServiceHealthServer::new(Health::new(Duration::from_secs(30)));
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let problems = server.sync(&checks(port, 1));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("shop/web"), "{problems:?}");
        assert!(server.listening().is_empty());
        drop(taken);
        assert!(server.sync(&checks(port, 1)).is_empty());
        assert_eq!(server.listening().len(), 1);
    }
}
