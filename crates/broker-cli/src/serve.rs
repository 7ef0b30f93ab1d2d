//! `--metrics-addr`: Prometheus text at `/metrics` and readiness at `/ready` (200 when ready,
//! else 503), on a small HTTP/1.1 responder for as long as the command runs. The metrics are the
//! ones every backend records through `broker_core::metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use broker_core::EventBroker;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Buckets of `broker_delivery_seconds`, 0.5 ms to 60 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// What `/ready` asks.
#[derive(Clone)]
pub(crate) enum Readiness {
    /// A broker's `is_ready()`.
    Broker(Arc<dyn EventBroker>),
    /// Ready as long as the command runs (a consumer).
    Running,
}

/// Installs the Prometheus recorder (before anything is recorded).
pub(crate) fn install() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(broker_core::metrics::names::DELIVERY_SECONDS.into()), LATENCY_BUCKETS)
        .context("setting the latency buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Binds `addr` and serves until the process ends.
pub(crate) async fn serve(addr: SocketAddr, handle: PrometheusHandle, ready: Readiness) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
    eprintln!("broker: metrics at http://{}/metrics, readiness at /ready", listener.local_addr()?);
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (handle, ready) = (handle.clone(), ready.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                // The request line and headers, within a second and 8 KiB.
                let read = tokio::time::timeout(Duration::from_secs(1), async {
                    while len < buf.len() {
                        match stream.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => len += n,
                        }
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let request = String::from_utf8_lossy(&buf[..len]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", handle.render()),
                    "/ready" => {
                        let up = match &ready {
                            Readiness::Broker(b) => b.is_ready().await,
                            Readiness::Running => true,
                        };
                        if up {
                            ("200 OK", "ready\n".to_owned())
                        } else {
                            ("503 Service Unavailable", "not ready\n".into())
                        }
                    }
                    _ => ("404 Not Found", "try /metrics or /ready\n".into()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    stream.write_all(head.as_bytes()).await?;
                    stream.write_all(body.as_bytes()).await?;
                    stream.shutdown().await
                })
                .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_what_core_records() {
        let handle = super::install().unwrap();
        let meter = broker_core::metrics::Meter::new("file", "out.log");
        meter.accepted();
        meter.depth(1, 2);
        meter.reconnected();
        let text = handle.render();
        assert!(text.contains("broker_events_accepted_total{backend=\"file\",destination=\"out.log\"} 1"), "{text}");
    }
}
