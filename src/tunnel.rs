//! The reverse-tunnel supervisor, one per `[[tunnel]]`: what
//! `autossh -M 0 -N -R <high port>:<db>:<port> user@service` does, without
//! the silent hangs.
//!
//! Each attempt: dial the server (its name through the shared DNS watch),
//! check its host key against `server_fingerprint` or `known_hosts` (never
//! trusted on first use), authenticate with `identity`, ask for every
//! `[[tunnel.remote]]` port (`tcpip-forward`, with the bind address `ssh -R`
//! would send). Any refused forward fails the attempt (ExitOnForwardFailure).
//! Once up, each `forwarded-tcpip` channel is dialled to its remote's
//! `connect` at that moment and relayed; a database that refuses closes that
//! channel only. Keepalives find a server that stopped answering. Then the
//! supervisor re-dials forever, with exponential backoff and jitter that
//! resets after a connection stayed up a while. A stale listener that the
//! server still holds for a dead session is the normal case after a crash:
//! the forward is refused until the server drops it, and we keep retrying.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Gauge};
use russh::client::{self, Msg};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{Host, RemoteConfig, ServerKey, TunnelConfig};
use crate::daemon::Activity;
use crate::dns::Watch;
use crate::metrics as m;
use crate::relay::{InletRx, Inlets, Meter};
use crate::ssh::keys;
use crate::upstream;

/// First pause after a failure; doubled per failure in a row.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest pause between attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A connection that stayed up this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// TCP connect to the server, each address.
const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Version exchange, key exchange, authentication and forwards together.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest packet the server may send us on a channel.
const TUNNEL_MAX_PACKET: u32 = 65535;
/// Connect to the database for a forwarded connection.
const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The failure reasons counted in `jumpgate_tunnel_failures_total`.
pub const FAILURE_REASONS: [&str; 6] = [
    "host_key",
    "auth",
    "forward_refused",
    "connect",
    "keepalive",
    "disconnected",
];

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("identity: {0}")]
    Identity(#[from] keys::KeyError),
    #[error("known_hosts: {path}: {why}")]
    KnownHosts { path: String, why: String },
}

/// The state a tunnel shows in /readyz and the ready file.
#[derive(Debug, Clone)]
pub enum State {
    Connecting,
    Up { since: SystemTime },
    Down { since: SystemTime, reason: String },
}

/// Why an attempt ended: the metric label and the message.
#[derive(Debug)]
struct Failure {
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }
}

struct Metrics {
    up: Gauge,
    reconnects: Counter,
    failures: Vec<Counter>,
    bytes_up: Counter,
    bytes_down: Counter,
}

/// What the supervisor and every forwarded channel share.
struct Shared {
    config: TunnelConfig,
    key: Arc<PrivateKey>,
    /// Watches of the remotes' `connect` targets, in config order.
    remotes: Vec<(RemoteConfig, Watch)>,
    activity: Arc<Activity>,
    metrics: Metrics,
    /// Forwarded connections open now (the drain waits for them).
    open: AtomicUsize,
}

/// One `[[tunnel]]`, ready to run.
pub struct Tunnel {
    shared: Arc<Shared>,
    server: Watch,
    state: watch::Sender<State>,
}

impl Tunnel {
    /// Loads the identity key (a start-up error if unreadable); `watch_for`
    /// gives the DNS watch of a host (the daemon's, shared with every role
    /// that names it). Nothing is dialled until [`Tunnel::run`].
    pub fn new(
        config: TunnelConfig,
        watch_for: &mut impl FnMut(&Host) -> Watch,
        activity: Arc<Activity>,
    ) -> Result<Tunnel, TunnelError> {
        let key = keys::read_private(&config.identity)?;
        if let ServerKey::KnownHosts(path) = &config.server_key {
            std::fs::metadata(path).map_err(|e| TunnelError::KnownHosts {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
        }

        let server = watch_for(&config.server.host);
        let remotes = config
            .remotes
            .iter()
            .map(|r| (r.clone(), watch_for(&r.connect.host)))
            .collect();
        let name = config.name.clone();
        let metrics = Metrics {
            up: metrics::gauge!(m::TUNNEL_UP, "tunnel" => name.clone()),
            reconnects: metrics::counter!(m::TUNNEL_RECONNECTS, "tunnel" => name.clone()),
            failures: FAILURE_REASONS
                .iter()
                .map(|&r| metrics::counter!(m::TUNNEL_FAILURES, "tunnel" => name.clone(), "reason" => r))
                .collect(),
            bytes_up: metrics::counter!(m::RELAY_BYTES, "role" => "tunnel", "name" => name.clone(), "direction" => "up"),
            bytes_down: metrics::counter!(m::RELAY_BYTES, "role" => "tunnel", "name" => name.clone(), "direction" => "down"),
        };
        metrics.up.set(0.0);
        Ok(Tunnel {
            shared: Arc::new(Shared {
                config,
                key: Arc::new(key),
                remotes,
                activity,
                metrics,
                open: AtomicUsize::new(0),
            }),
            server,
            state: watch::channel(State::Connecting).0,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// "connecting" or "up", for the ready file (a tunnel that is down is
    /// trying again: "connecting"; /readyz/tunnel/<name> says why).
    pub fn state_word(&self) -> &'static str {
        match &*self.state.borrow() {
            State::Up { .. } => "up",
            State::Connecting | State::Down { .. } => "connecting",
        }
    }

    /// Ready while up; the reason otherwise.
    pub fn readiness(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let rx = self.state.subscribe();
        let name = self.shared.config.name.clone();
        move || match &*rx.borrow() {
            State::Up { .. } => Ok(()),
            State::Connecting => Err(format!("tunnel {name:?}: connecting")),
            State::Down { since, reason } => Err(format!("tunnel {name:?}: down since {}: {reason}", clock(*since))),
        }
    }

    /// Dials, serves and re-dials until `stop`; forwarded connections end when `cut` fires.
    pub async fn run(self, stop: CancellationToken, cut: CancellationToken, conns: TaskTracker) {
        let shared = &self.shared;
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_CAP);
        let mut first = true;
        loop {
            if !first {
                shared.metrics.reconnects.increment(1);
            }
            first = false;
            let session = Session {
                shared: shared.clone(),
                server: &self.server,
                state: &self.state,
            };
            let (result, up_for) = session.attempt(&stop, &cut, &conns).await;
            shared.metrics.up.set(0.0);
            match result {
                Ok(()) => return,
                Err(f) => {
                    if let Some(i) = FAILURE_REASONS.iter().position(|r| *r == f.reason) {
                        shared.metrics.failures[i].increment(1);
                    }
                    let reason = format!("{}: {}", human(f.reason), f.message);
                    if f.reason == "host_key" {
                        tracing::error!(tunnel = %shared.config.name, %reason, "SERVER HOST KEY MISMATCH: not connecting");
                    }
                    info!(target: "audit", event = "tunnel_down", tunnel = %shared.config.name, reason = %reason);
                    self.state.send_replace(State::Down {
                        since: SystemTime::now(),
                        reason,
                    });
                }
            }
            if up_for.is_some_and(|d| d >= HEALTHY_AFTER) {
                backoff.reset();
            }
            let pause = backoff.next();
            debug!(tunnel = %shared.config.name, ?pause, "re-dialling after a pause");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

fn human(reason: &str) -> &'static str {
    match reason {
        "host_key" => "host key mismatch",
        "auth" => "authentication refused",
        "forward_refused" => "remote forward refused",
        "connect" => "cannot connect",
        "keepalive" => "server stopped answering keepalives",
        _ => "disconnected",
    }
}

/// HH:MM:SS (UTC) of a moment, for one-line readiness reasons.
fn clock(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}

/// Exponential backoff with ±20% jitter.
struct Backoff {
    start: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    fn new(start: Duration, cap: Duration) -> Backoff {
        Backoff {
            start,
            cap,
            next: start,
        }
    }

    fn reset(&mut self) {
        self.next = self.start;
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.cap);
        let jitter = rand::random_range(0.8..1.2);
        base.mul_f64(jitter).min(self.cap)
    }
}

/// One connection attempt and its life.
struct Session<'a> {
    shared: Arc<Shared>,
    server: &'a Watch,
    state: &'a watch::Sender<State>,
}

/// Set by the russh client handler; read by the supervisor.
#[derive(Default)]
struct Events {
    /// Why the server's key was refused, if it was.
    host_key: Mutex<Option<String>>,
    /// Why the session ended, as russh told the handler.
    ended: Mutex<Option<Failure>>,
    closed: Notify,
}

impl Session<'_> {
    /// Ok(()) only when `stop` fired; also how long the tunnel was up.
    async fn attempt(
        &self,
        stop: &CancellationToken,
        cut: &CancellationToken,
        conns: &TaskTracker,
    ) -> (Result<(), Failure>, Option<Duration>) {
        let config = &self.shared.config;
        let events = Arc::new(Events::default());
        let login = async {
            let tcp = upstream::connect(self.server, config.server.port, SERVER_CONNECT_TIMEOUT, |_| Ok(()))
                .await
                .map_err(|e| Failure::new("connect", e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let dead_after = config.keepalive * (config.keepalive_max as u32 + 1);
            let _ = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(dead_after));
            let handler = ClientHandler {
                shared: self.shared.clone(),
                events: events.clone(),
                cut: cut.clone(),
                conns: conns.clone(),
                inlets: Inlets::default(),
            };
            let mut handle = client::connect_stream(Arc::new(client_config(config)), SshSocket::new(tcp), handler)
                .await
                .map_err(
                    |e| match events.host_key.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        Some(why) => Failure::new("host_key", why),
                        None => Failure::new("disconnected", format!("ssh handshake with {}: {e}", config.server)),
                    },
                )?;
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .ok()
                .flatten()
                .flatten()
                .or(Some(HashAlg::Sha512));
            let auth = handle
                .authenticate_publickey(&config.user, PrivateKeyWithHashAlg::new(self.shared.key.clone(), hash))
                .await
                .map_err(|e| Failure::new("disconnected", format!("during authentication: {e}")))?;
            if !auth.success() {
                return Err(Failure::new(
                    "auth",
                    format!(
                        "{}@{} refused key {} ({})",
                        config.user,
                        config.server,
                        keys::fingerprint(self.shared.key.public_key()),
                        config.identity.display()
                    ),
                ));
            }
            for r in &config.remotes {
                if let Err(e) = handle.tcpip_forward(r.bind_address.as_str(), u32::from(r.port)).await {
                    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
                    return Err(Failure::new(
                        "forward_refused",
                        format!(
                            "{}:{}: {e} (another session may still hold the port: retrying)",
                            show_bind(&r.bind_address),
                            r.port
                        ),
                    ));
                }
            }
            Ok(handle)
        };
        let handle = tokio::select! {
            r = tokio::time::timeout(LOGIN_TIMEOUT, login) => match r {
                Ok(Ok(h)) => h,
                Ok(Err(f)) => return (Err(f), None),
                Err(_) => return (Err(Failure::new("connect", format!("no login within {LOGIN_TIMEOUT:?}"))), None),
            },
            () = stop.cancelled() => return (Ok(()), None),
        };

        let since = Instant::now();
        self.shared.metrics.up.set(1.0);
        self.state.send_replace(State::Up {
            since: SystemTime::now(),
        });
        let remotes: Vec<String> = config
            .remotes
            .iter()
            .map(|r| format!("{}:{} -> {}", show_bind(&r.bind_address), r.port, r.connect))
            .collect();
        info!(target: "audit", event = "tunnel_up", tunnel = %config.name, server = %config.server,
            user = %config.user, remotes = ?remotes);

        let closed = async {
            loop {
                let notified = events.closed.notified();
                if handle.is_closed() {
                    return;
                }
                tokio::select! {
                    () = notified => {}
                    // The handler is told of most endings; this catches the rest.
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        };
        tokio::select! {
            () = closed => {}
            () = stop.cancelled() => {
                // Give the ports back at once (a standby takes over), but let
                // the connections in flight finish, until `cut`.
                for r in &config.remotes {
                    let _ = handle.cancel_tcpip_forward(r.bind_address.as_str(), u32::from(r.port)).await;
                }
                info!(tunnel = %config.name, open = self.shared.open.load(Ordering::SeqCst),
                    "stopping: remote ports released; waiting for open connections");
                self.state.send_replace(State::Down {
                    since: SystemTime::now(),
                    reason: "shutting down".into(),
                });
                while self.shared.open.load(Ordering::SeqCst) > 0 && !handle.is_closed() {
                    tokio::select! {
                        () = cut.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                let _ = handle.disconnect(russh::Disconnect::ByApplication, "shutting down", "en").await;
                return (Ok(()), Some(since.elapsed()));
            }
        }
        let failure = events
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| Failure::new("disconnected", "the connection ended"));
        (Err(failure), Some(since.elapsed()))
    }
}

/// The tunnel's SSH socket, as russh reads it.
///
/// - Buffered: russh reads each packet in two steps (its first block, then
///   the rest), straight from the socket; a buffer turns that into one
///   `recv` for many packets.
/// - Quick ACKs after small reads: OpenSSH's sshd leaves Nagle on for its SSH
///   connection, so after a small packet (a CHANNEL_CLOSE) it holds the next
///   one until we ACK, and Linux delays that ACK up to 40 ms. Sequential
///   connections through the tunnel stalled ~44 ms each (docs/bench-tunnel.md).
struct SshSocket {
    inner: tokio::io::BufReader<tokio::net::TcpStream>,
}

/// Reads below this size re-arm TCP_QUICKACK (bulk data arrives in large reads).
const QUICKACK_BELOW: usize = 1024;
/// Read buffer of the tunnel's SSH socket.
const SSH_READ_BUFFER: usize = 64 * 1024;

impl SshSocket {
    fn new(tcp: tokio::net::TcpStream) -> SshSocket {
        SshSocket {
            inner: tokio::io::BufReader::with_capacity(SSH_READ_BUFFER, tcp),
        }
    }
}

impl tokio::io::AsyncRead for SshSocket {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let buffered = self.inner.buffer().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        // A read served from the socket (not from the buffer) that was small.
        if read > 0 && buffered == 0 && read < QUICKACK_BELOW {
            let _ = socket2::SockRef::from(self.inner.get_ref()).set_tcp_quickack(true);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for SshSocket {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn show_bind(bind: &str) -> &str {
    if bind.is_empty() { "*" } else { bind }
}

/// The russh client config: same algorithm rules as the server role.
fn client_config(config: &TunnelConfig) -> client::Config {
    client::Config {
        client_id: russh::SshId::Standard("SSH-2.0-jumpgate".into()),
        preferred: crate::ssh::server::preferred(),
        inactivity_timeout: None,
        keepalive_interval: Some(config.keepalive),
        keepalive_max: config.keepalive_max,
        window_size: crate::ssh::server::WINDOW_SIZE,
        // The server fills forwarded-tcpip channels with packets up to this
        // size: bigger packets mean fewer decodes, wakeups and writes per byte.
        // russh logs an error above 65535 (russh-0.65.1 src/client/mod.rs:1232).
        maximum_packet_size: TUNNEL_MAX_PACKET,
        channel_buffer_size: crate::ssh::server::CHANNEL_BUFFER,
        nodelay: true,
        ..client::Config::default()
    }
}

struct ClientHandler {
    shared: Arc<Shared>,
    events: Arc<Events>,
    cut: CancellationToken,
    conns: TaskTracker,
    /// The forwarded connections' inbound halves: their data is written to
    /// the database from this (the session's) task.
    inlets: Inlets,
}

impl ClientHandler {
    fn check_key(&self, key: &PublicKey) -> Result<(), String> {
        let config = &self.shared.config;
        let seen = keys::fingerprint(key);
        match &config.server_key {
            ServerKey::Fingerprint(want) if *want == seen => Ok(()),
            ServerKey::Fingerprint(want) => Err(format!("{} presented {seen}, expected {want}", config.server)),
            ServerKey::KnownHosts(path) => {
                let host = config.server.host.to_string();
                match russh::keys::check_known_hosts_path(&host, config.server.port, key, path) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "{} presented {seen}, which {} does not list for it",
                        config.server,
                        path.display()
                    )),
                    Err(e) => Err(format!(
                        "{} presented {seen}: {} says: {e}",
                        config.server,
                        path.display()
                    )),
                }
            }
        }
    }
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, server_public_key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let verdict = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.check_key(key),
            PublicKeyOrCertificate::Certificate(_) => {
                Err("the server presented a certificate; jumpgate pins keys".into())
            }
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(why) => {
                *self.events.host_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                Ok(false)
            }
        }
    }

    async fn disconnected(&mut self, reason: client::DisconnectReason<Self::Error>) -> Result<(), Self::Error> {
        let failure = match &reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                Failure::new("disconnected", format!("the server disconnected: {info:?}"))
            }
            client::DisconnectReason::Error(russh::Error::KeepaliveTimeout) => Failure::new(
                "keepalive",
                format!(
                    "no answer to {} keepalives {:?} apart",
                    self.shared.config.keepalive_max, self.shared.config.keepalive
                ),
            ),
            client::DisconnectReason::Error(e) => Failure::new("disconnected", e.to_string()),
        };
        *self.events.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure);
        self.events.closed.notify_waiters();
        match reason {
            client::DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            client::DisconnectReason::Error(e) => Err(e),
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some((remote, watch)) = self
            .shared
            .remotes
            .iter()
            .find(|(r, _)| u32::from(r.port) == connected_port)
            .map(|(r, w)| (r.clone(), w.clone()))
        else {
            warn!(tunnel = %self.shared.config.name, connected_address, connected_port,
                "the server opened a channel for a port we did not ask for; refused");
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let inlet_rx = self.inlets.open(channel.id());
        let origin = format!("{originator_address}:{originator_port}");
        let span = info_span!("tunnel_conn", tunnel = %self.shared.config.name, port = remote.port, %origin);
        let task = Forwarded {
            shared: self.shared.clone(),
            remote,
            watch,
            origin,
            cut: self.cut.clone(),
        };
        self.conns.spawn(task.run(channel, inlet_rx, reply).instrument(span));
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.inlets.data(channel, data).await;
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, _session: &mut client::Session) -> Result<(), Self::Error> {
        self.inlets.eof(channel);
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut client::Session) -> Result<(), Self::Error> {
        self.inlets.close(channel);
        Ok(())
    }
}

/// One connection the server forwarded to us.
struct Forwarded {
    shared: Arc<Shared>,
    remote: RemoteConfig,
    watch: Watch,
    origin: String,
    cut: CancellationToken,
}

impl Forwarded {
    async fn run(self, channel: Channel<Msg>, inlet: InletRx, reply: client::ChannelOpenHandle) {
        let started = Instant::now();
        let tunnel = &self.shared.config.name;
        if self.watch.current().is_empty() {
            self.watch.first_answer(Duration::from_secs(5)).await;
        }
        let tcp = match Box::pin(upstream::connect(
            &self.watch,
            self.remote.connect.port,
            DB_CONNECT_TIMEOUT,
            |_| Ok(()),
        ))
        .await
        {
            Ok(tcp) => tcp,
            Err(e) => {
                warn!(target: "audit", event = "tunnel_conn_failed", tunnel = %tunnel, connect = %self.remote.connect,
                    error = %e, "database unreachable: closing this connection only");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let upstream_addr: Option<SocketAddr> = tcp.peer_addr().ok();
        let meter = Arc::new(Meter::new(
            self.shared.metrics.bytes_up.clone(),
            self.shared.metrics.bytes_down.clone(),
        ));
        reply.accept().await;
        let _open = self.shared.activity.enter();
        self.shared.open.fetch_add(1, Ordering::SeqCst);
        info!(target: "audit", event = "tunnel_conn_open", tunnel = %tunnel, origin = %self.origin,
            upstream = %upstream_addr.map_or_else(|| "unknown".into(), |a| a.to_string()));
        let reason = upstream::relay_channel(
            inlet,
            channel,
            tcp,
            &meter,
            &self.watch,
            self.remote.on_change,
            &self.cut,
        )
        .await;
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
        let (up, down) = meter.bytes();
        info!(target: "audit", event = "tunnel_conn_close",tunnel = %tunnel, origin = %self.origin,
            bytes_up = up, bytes_down = down, duration_ms = started.elapsed().as_millis() as u64, reason = %reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let expected = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0];
        for want in expected {
            let got = b.next().as_secs_f64();
            assert!(
                got >= want * 0.8 - 1e-9 && got <= (want * 1.2).min(30.0) + 1e-9,
                "want ~{want}, got {got}"
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(600), "reset starts over");
    }

    #[test]
    fn clock_is_utc_hh_mm_ss() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(3600 * 26 + 60 * 3 + 4);
        assert_eq!(clock(t), "02:03:04");
    }
}
