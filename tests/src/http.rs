//! A minimal HTTP/1.1 GET for scraping the agent's listener (/metrics, /healthz, /status) from
//! inside a namespace, and a reader for Prometheus text.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
};

use anyhow::{Context as _, bail};

use crate::{netns::Netns, traffic::ANSWER_TIMEOUT};

/// `GET path` on `addr` from inside `ns`: the status code and the body.
pub fn get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    ns.run(move || -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT)
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("HTTP response without a header end")?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .context("no status code")?
            .parse()?;
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            bail!("chunked responses are not expected from the agent");
        }
        Ok((status, body.to_owned()))
    })?
}

/// The value of the sample `series` (name and labels exactly as exposed, e.g.
/// `xlb_service_packets_total{service="web",frontend="10.96.0.10:80/TCP"}`), if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}
