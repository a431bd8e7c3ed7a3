//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (process alive),
//! `/readyz` (the last checkpoint committed, Redis holds the fences, no actor is
//! restarting, no partition stalled, Redis cannot evict anchorflow's keys; when not
//! ready, the reasons one per line; `runtime/health.rs`) and `/checkpoints` (the durations in milliseconds
//! of the recent checkpoints, one per line, oldest first; `anchorflow bench` reads its
//! percentiles here, exact where the histogram has buckets). It runs on its
//! own thread with a small synchronous server; scrapes are rare and cheap.

use std::thread::JoinHandle;

use anyhow::Context as _;
use tiny_http::{Header, Response, Server};
use tracing::warn;

use crate::pipeline::Telemetry;

fn checkpoints(telemetry: &Telemetry) -> String {
    telemetry
        .health
        .recent_checkpoints()
        .iter()
        .map(|d| format!("{:.3}\n", d.as_secs_f64() * 1000.0))
        .collect()
}

/// Starts serving on `listen`; returns the bound address and the server thread.
pub fn serve(
    listen: &str,
    telemetry: Telemetry,
) -> anyhow::Result<(std::net::SocketAddr, JoinHandle<()>)> {
    let server = Server::http(listen)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("binding the metrics endpoint to {listen}"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("metrics endpoint is not on an IP address")?;
    let thread = std::thread::Builder::new()
        .name("anchorflow-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, body, content_type) = match request.url() {
                    "/metrics" => {
                        let ready = telemetry.health.is_ready();
                        telemetry.metrics.ready.set(i64::from(ready));
                        (
                            200,
                            telemetry.metrics.encode(),
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                    }
                    "/healthz" => (200, "ok\n".to_string(), "text/plain"),
                    "/checkpoints" => (200, checkpoints(&telemetry), "text/plain"),
                    "/readyz" => match telemetry.health.not_ready_because() {
                        reasons if reasons.is_empty() => (200, "ready\n".to_string(), "text/plain"),
                        reasons => {
                            let body = format!("not ready:\n{}\n", reasons.join("\n"));
                            (503, body, "text/plain")
                        }
                    },
                    _ => (404, "not found\n".to_string(), "text/plain"),
                };
                let header = Header::from_bytes("Content-Type", content_type)
                    .expect("static header is valid");
                let response = Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                if let Err(e) = request.respond(response) {
                    warn!(error = %e, "metrics response failed");
                }
            }
        })
        .context("spawning the metrics thread")?;
    Ok((addr, thread))
}
