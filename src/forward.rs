//! One [`Forwarder`] per `[[forward]]` route: accept, connect to the
//! target's current address, relay, count, audit.
//!
//! The route reads its target's addresses from a [`dns::Watch`] at each
//! connect, so new connections follow DNS at once. When every current
//! address refuses, it asks the watch for an immediate re-resolve and tries
//! the fresh answer before giving up: during a failover the client sees no
//! failed connect once DNS has moved. With `on_change = "close"` a connection
//! whose upstream address leaves the answer is closed as soon as the change
//! is seen.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{ForwardConfig, OnChange};
use crate::daemon::Activity;
use crate::dns::Watch;
use crate::metrics as m;
use crate::proxy_protocol;
use crate::relay::{self, Meter};
use crate::upstream::{self, ConnectError};

/// Accept queue length asked for; the kernel caps it at `net.core.somaxconn`
/// (4096 on current kernels). tokio's `TcpListener::bind` asks for 1024.
const LISTEN_BACKLOG: u32 = 4096;
/// TCP keepalive on both sides: an NLB forgets a flow after 350 s without a
/// packet, and a long query is silent that long. Probes every minute keep the
/// flow alive and find dead peers in about two minutes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_PROBES: u32 = 4;
/// Pause after an accept error such as EMFILE, so a full descriptor table
/// does not turn the accept loop into a busy loop (every listener's).
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A bound forward route, not serving yet.
pub struct Forwarder {
    listener: TcpListener,
    route: Arc<Route>,
}

/// What each connection of a route shares.
struct Route {
    config: ForwardConfig,
    watch: Watch,
    metrics: RouteMetrics,
    activity: Arc<Activity>,
}

struct RouteMetrics {
    ok: Counter,
    connect_failed: Counter,
    proxy_rejected: Counter,
    proxy_rejected_listener: Counter,
    active: Gauge,
    up: Counter,
    down: Counter,
    connect_seconds: Histogram,
}

impl RouteMetrics {
    fn new(route: &str) -> RouteMetrics {
        let result =
            |r: &'static str| metrics::counter!(m::FORWARD_CONNECTIONS, "route" => route.to_string(), "result" => r);
        let bytes = |d: &'static str| metrics::counter!(m::RELAY_BYTES, "role" => "forward", "name" => route.to_string(), "direction" => d);
        RouteMetrics {
            ok: result("ok"),
            connect_failed: result("connect_failed"),
            proxy_rejected: result("proxy_rejected"),
            proxy_rejected_listener: metrics::counter!(m::PROXY_REJECTED, "listener" => format!("forward/{route}")),
            active: metrics::gauge!(m::FORWARD_ACTIVE, "route" => route.to_string()),
            up: bytes("up"),
            down: bytes("down"),
            connect_seconds: metrics::histogram!(m::UPSTREAM_CONNECT_SECONDS, "role" => "forward"),
        }
    }
}

/// Binds `addr` with a deliberate backlog (and SO_REUSEADDR, so a restart
/// is not refused by connections in TIME_WAIT).
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Forwarder {
    /// Binds the route's listener; the error is the bind's.
    pub fn bind(config: ForwardConfig, watch: Watch, activity: Arc<Activity>) -> io::Result<Forwarder> {
        let listener = bind_listener(config.listen)?;
        let metrics = RouteMetrics::new(&config.name);
        Ok(Forwarder {
            listener,
            route: Arc::new(Route {
                config,
                watch,
                metrics,
                activity,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.route.config.name
    }

    /// The bound address (the real port when the config said port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Readiness: bound (always, once this exists) and an address to send to.
    pub fn readiness(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let route = self.route.clone();
        move || {
            let answer = route.watch.answer();
            if !answer.addrs.is_empty() {
                return Ok(());
            }
            let name = &route.config.name;
            match answer.error {
                Some(e) => Err(format!("forward {name:?}: no address yet: {e}")),
                None => Err(format!("forward {name:?}: no address yet")),
            }
        }
    }

    /// Accepts until `stop` fires, then closes the listener (new connections
    /// are refused). Each connection is tracked by `conns` for the drain and
    /// closed when `cut` fires.
    pub async fn serve(self, stop: CancellationToken, cut: CancellationToken, conns: TaskTracker) {
        let Forwarder { listener, route } = self;
        loop {
            let (client, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(route = %route.config.name, error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
                () = stop.cancelled() => break,
            };
            let span = info_span!("forward", route = %route.config.name, %peer);
            conns.spawn(route.clone().connection(client, peer, cut.clone()).instrument(span));
        }
        debug!(route = %route.config.name, "stopped accepting");
    }
}

impl Route {
    async fn connection(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr, cut: CancellationToken) {
        let _open = self.activity.enter();
        let started = Instant::now();
        tune(&client);
        // Behind a load balancer with proxy protocol on, the header says who
        // the client really is; without a valid one the connection is dropped.
        let (peer, endpoint) = if self.config.proxy_protocol {
            match Box::pin(proxy_protocol::read_header(&mut client, proxy_protocol::HEADER_TIMEOUT)).await {
                Ok(h) => (h.source.unwrap_or(peer), h.aws_vpce_id),
                Err(e) => {
                    self.metrics.proxy_rejected.increment(1);
                    self.metrics.proxy_rejected_listener.increment(1);
                    warn!(error = %e, "no valid PROXY header: connection dropped");
                    return;
                }
            }
        } else {
            (peer, None)
        };
        // Boxed: dialling (DNS re-resolve included) needs far more state
        // than relaying, and an unboxed future is as large as its largest
        // stage for its whole life: idle connections would pay for it.
        let upstream = tokio::select! {
            r = Box::pin(self.connect()) => r,
            () = cut.cancelled() => return,
        };
        let upstream = match upstream {
            Ok(s) => s,
            Err(why) => {
                self.metrics.connect_failed.increment(1);
                warn!(target = %self.config.target, error = %why, "connect failed; closing the client");
                return;
            }
        };
        self.metrics.connect_seconds.record(started.elapsed().as_secs_f64());
        self.metrics.ok.increment(1);
        tune(&upstream);
        let upstream_addr = upstream.peer_addr().ok();
        info!(target: "audit", event = "forward_open", route = %self.config.name, client = %peer,
            vpc_endpoint = endpoint.as_deref().unwrap_or("-"),upstream = %display_addr(upstream_addr));

        self.metrics.active.increment(1.0);
        let meter = Meter::new(self.metrics.up.clone(), self.metrics.down.clone());
        let left = match (self.config.on_change, upstream_addr) {
            (OnChange::Close, Some(addr)) => Some((self.watch.subscribe(), addr.ip())),
            _ => None,
        };
        let reason = tokio::select! {
            r = relay::tcp(&client, &upstream, &meter) => match r {
                Ok(()) => "closed".to_string(),
                Err(e) => format!("{} error: {}", e.side.as_str(), e.source),
            },
            () = cut.cancelled() => "shutdown".to_string(),
            () = upstream::address_left(left) => "upstream address left the DNS answer".to_string(),
        };
        self.metrics.active.decrement(1.0);
        let (up, down) = meter.bytes();
        info!(target: "audit", event = "forward_close", route = %self.config.name, client = %peer,
            upstream = %display_addr(upstream_addr), bytes_up = up, bytes_down = down,
            duration_ms = started.elapsed().as_millis() as u64, reason = %reason);
    }

    async fn connect(&self) -> Result<TcpStream, ConnectError> {
        upstream::connect(
            &self.watch,
            self.config.target.port,
            self.config.connect_timeout,
            |_| Ok(()),
        )
        .await
    }
}

/// Database protocols are request/response: no Nagle delay on either side;
/// and keepalives, so idle sessions survive middleboxes.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        debug!(error = %e, "cannot set TCP keepalive");
    }
}

fn display_addr(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "unknown".to_string(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle forwarded connection costs in task state (DESIGN.md,
    /// "Resource budget"): the bench measures the whole RSS; this pins the
    /// part we control.
    #[test]
    fn idle_connection_state_stays_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let config = crate::config::Config::parse(
                &format!("[[forward]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{addr}\"\n"),
                "test",
            )
            .unwrap();
            let route_config = config.forward[0].clone();
            let ip = addr.ip();
            let route = Arc::new(Route {
                config: route_config,
                watch: Watch::fixed(ip),
                metrics: RouteMetrics::new("t"),
                activity: Arc::new(Activity::default()),
            });
            let client = TcpStream::connect(addr).await.unwrap();
            let fut = route.connection(client, addr, CancellationToken::new());
            let size = std::mem::size_of_val(&fut);
            // 3.3 KB before the dial and the copy bursts were boxed (heaptrack,
            // 3,000 idle connections); about 1.25 KB after.
            assert!(size <= 1400, "a connection's future is {size} bytes");
        });
    }
}
