//! The admin HTTP endpoint: `/metrics`, `/healthz`, `/readyz` and
//! `/readyz/<part>` (e.g. `/readyz/forward/rds`), the target of a load
//! balancer's health check.
//!
//! `/healthz` is 200 while the process serves. `/readyz` is 200 when every
//! part is ready, else 503 with one line per part that is not; a part's own
//! path answers for that part alone, so a load balancer checks only what it
//! fronts. Everything is 503 while draining.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A readiness check: `Err` carries the one-line reason.
pub type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Readiness of the whole process, part by part.
pub struct Health {
    draining: AtomicBool,
    parts: Vec<(String, Check)>,
}

impl Health {
    /// `parts`: (path under /readyz/, check), e.g. ("forward/rds", ...).
    pub fn new(parts: Vec<(String, Check)>) -> Health {
        Health {
            draining: AtomicBool::new(false),
            parts,
        }
    }

    /// From now on every readiness answer is 503.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// None: no such part. Some(Ok) ready, Some(Err(reason)) not.
    pub fn check(&self, part: Option<&str>) -> Option<Result<(), String>> {
        let selected: Vec<&(String, Check)> = match part {
            None => self.parts.iter().collect(),
            Some(p) => {
                let found: Vec<_> = self.parts.iter().filter(|(path, _)| path == p).collect();
                if found.is_empty() {
                    return None;
                }
                found
            }
        };
        if self.is_draining() {
            return Some(Err("draining: shutting down".into()));
        }
        let reasons: Vec<String> = selected.iter().filter_map(|(_, check)| check().err()).collect();
        Some(if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("\n"))
        })
    }

    pub fn part_names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|(p, _)| p.as_str())
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    prometheus: PrometheusHandle,
}

/// Admin connections served at once; more are closed at accept. A load
/// balancer's health checks and a Prometheus scraper need a handful.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this (hyper's own timeout
/// is off under `axum::serve`, which sets no timer).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one (keep-alive) admin connection.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves the admin endpoint on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, health: Arc<Health>, prometheus: PrometheusHandle, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz_all))
        .route("/readyz/{*part}", get(readyz_part))
        .with_state(AdminState { health, prometheus });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(crate::forward::ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "admin: too many connections; closing this one");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            // An NLB with proxy protocol on sends the header on its health
            // checks too. HTTP never starts with a PROXY signature, so a
            // header is read and discarded (never trusted: the admin
            // endpoint makes no decision on the client's address).
            match crate::proxy_protocol::read_header(&mut stream, HEADER_READ_TIMEOUT).await {
                Ok(_) | Err(crate::proxy_protocol::ProxyError::NotProxy) => {}
                Err(e) => {
                    debug!(%peer, error = %e, "admin: broken PROXY header; closing");
                    return;
                }
            }
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%peer, error = %e, "admin connection ended"); },
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                () = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.prometheus.render(),
    )
        .into_response()
}

async fn readyz_all(State(s): State<AdminState>) -> Response {
    answer(s.health.check(None))
}

async fn readyz_part(State(s): State<AdminState>, Path(part): Path<String>) -> Response {
    answer(s.health.check(Some(part.trim_end_matches('/'))))
}

fn answer(result: Option<Result<(), String>>) -> Response {
    match result {
        None => (StatusCode::NOT_FOUND, "no such part (see /readyz)\n").into_response(),
        Some(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Some(Err(reason)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(vec![
            ("forward/a".into(), Box::new(|| Ok(()))),
            (
                "forward/b".into(),
                Box::new(|| Err("forward \"b\": no address yet".into())),
            ),
        ])
    }

    #[test]
    fn readiness_by_part_and_overall() {
        let h = health();
        assert_eq!(h.check(Some("forward/a")), Some(Ok(())));
        assert_eq!(
            h.check(Some("forward/b")),
            Some(Err("forward \"b\": no address yet".into()))
        );
        assert_eq!(
            h.check(None),
            Some(Err("forward \"b\": no address yet".into())),
            "overall needs every part"
        );
        assert_eq!(h.check(Some("forward/c")), None, "unknown part");
    }

    async fn start() -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(health()), prometheus, stop.clone()));
        (addr, stop)
    }

    #[tokio::test]
    async fn answers_readiness_over_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, stop) = start().await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /readyz/forward/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.ends_with("forward \"b\": no address yet\n"), "{text}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_is_closed() {
        use tokio::io::AsyncReadExt;
        let (addr, stop) = start().await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(HEADER_READ_TIMEOUT + Duration::from_secs(3), c.read(&mut buf))
            .await
            .expect("the admin endpoint closes a silent connection after the header timeout")
            .unwrap_or(0);
        // hyper answers 408 or just closes; either way the connection ends.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "{:?}",
            &buf[..n]
        );
        stop.cancel();
    }

    #[test]
    fn draining_makes_every_part_unready() {
        let h = health();
        h.set_draining();
        assert!(h.check(Some("forward/a")).unwrap().is_err());
        assert!(h.check(None).unwrap().unwrap_err().contains("draining"));
        assert_eq!(h.check(Some("nope")), None);
    }
}
