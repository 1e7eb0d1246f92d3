//! The agent's HTTP listener (kube-proxy's metricsBindAddress, 127.0.0.1:10249 by default):
//! * `/healthz` answers 200 while syncs succeed, 503 otherwise; kubelet probes it;
//! * `/metrics`: Prometheus text ([`crate::metrics`]);
//! * `/status`: the agent's status as JSON ([`crate::status`], what `lb-agent status` shows).
//!
//! Healthy means: a sync has run, the last one applied every frontend, and one ran recently
//! (the sync loop resyncs every syncPeriod, so a silent loop is a stuck agent). While the API
//! server is away the agent stays healthy: it keeps serving the last good state, and restarting
//! it would not bring the API server back.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::{metrics::Metrics, status::StatusBoard};

/// What the sync loop reports and the listener serves.
#[derive(Debug)]
pub struct Health {
    /// A sync older than this means the loop is stuck.
    stale_after: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_sync: Option<Instant>,
    last_sync_ok: bool,
}

impl Health {
    /// `sync_period`: how often the sync loop runs at the least.
    pub fn new(sync_period: Duration) -> Arc<Self> {
        Arc::new(Self {
            stale_after: 2 * sync_period + Duration::from_secs(10),
            state: Mutex::default(),
        })
    }

    /// How old the last sync may be before the agent counts as stuck.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// Records the outcome of a sync (every frontend applied or not).
    pub fn record_sync(&self, ok: bool) {
        let mut s = self.state.lock().unwrap();
        s.last_sync = Some(Instant::now());
        s.last_sync_ok = ok;
    }

    /// `Ok` when healthy, else why not.
    pub fn check(&self) -> Result<(), String> {
        let s = self.state.lock().unwrap();
        match s.last_sync {
            None => Err("no sync yet".into()),
            Some(_) if !s.last_sync_ok => Err("the last sync failed for some frontends".into()),
            Some(at) if at.elapsed() > self.stale_after => {
                Err(format!("no sync for {:?}", at.elapsed()))
            }
            Some(_) => Ok(()),
        }
    }
}

/// What the listener serves.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub health: Arc<Health>,
    pub metrics: Option<Arc<Metrics>>,
    pub status: Option<Arc<StatusBoard>>,
}

fn respond(endpoints: &Endpoints, path: &str) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    let (status, content_type, body) = match path {
        "/healthz" => match endpoints.health.check() {
            Ok(()) => (StatusCode::OK, text, "ok\n".to_string()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, text, format!("{why}\n")),
        },
        "/metrics" if endpoints.metrics.is_some() => (
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            endpoints.metrics.as_ref().unwrap().encode(),
        ),
        "/status" if endpoints.status.is_some() => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&endpoints.status.as_ref().unwrap().get())
                .unwrap_or_default(),
        ),
        _ => (StatusCode::NOT_FOUND, text, "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Binds `addr` now (so a port conflict fails the start) and serves in the background.
pub async fn serve(addr: SocketAddr, endpoints: Endpoints) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the metrics and health listener on {addr}"))?;
    info!(%addr, "serving /healthz, /metrics and /status");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let response = respond(&endpoints, req.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("health connection: {e}");
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_after_a_successful_recent_sync() {
        let h = Health::new(Duration::from_secs(30));
        assert!(h.check().is_err(), "no sync yet");
        h.record_sync(true);
        assert_eq!(h.check(), Ok(()));
        h.record_sync(false);
        assert!(h.check().is_err());
        let h = Health {
            stale_after: Duration::ZERO,
            state: Mutex::default(),
        };
        h.record_sync(true);
        std::thread::sleep(Duration::from_millis(2));
        assert!(h.check().unwrap_err().contains("no sync for"));
    }

    #[test]
    fn paths() {
        let h = Health::new(Duration::from_secs(30));
        let mut e = Endpoints {
            health: h.clone(),
            metrics: None,
            status: None,
        };
        assert_eq!(
            respond(&e, "/healthz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.record_sync(true);
        assert_eq!(respond(&e, "/healthz").status(), StatusCode::OK);
        assert_eq!(respond(&e, "/other").status(), StatusCode::NOT_FOUND);
        assert_eq!(respond(&e, "/metrics").status(), StatusCode::NOT_FOUND);
        e.metrics = Some(Metrics::new("xdp", "test", None));
        e.status = Some(StatusBoard::new(Default::default(), None));
        let m = respond(&e, "/metrics");
        assert_eq!(m.status(), StatusCode::OK);
        assert!(
            m.headers()[hyper::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        assert_eq!(respond(&e, "/status").status(), StatusCode::OK);
    }
}
