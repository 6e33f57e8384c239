//! The SSH listener: source checks and pre-auth limits before any SSH byte,
//! the russh configuration, one russh session per accepted socket.
//!
//! Order per connection, cheapest refusal first: `allowed_sources` (the
//! socket is closed before anything is read), `max_startups` (a permit held
//! until authentication succeeds), then russh under `login_grace` (russh has
//! no login timeout of its own, and with its inactivity timeout off it would
//! wait for a client's version line forever).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use russh::keys::{Algorithm, EcdsaCurve, HashAlg};
use russh::server::Config as RusshConfig;
use russh::{MethodKind, MethodSet, Preferred, SshId, cipher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{OnChange, SshConfig};
use crate::daemon::Activity;
use crate::dns::{Registry, Resolver};
use crate::metrics as m;
use crate::ssh::handler::Handler;
use crate::ssh::keyfile::{GroupKey, KeyFile};
use crate::ssh::keys::{self, HostKey, KeyError};

/// What the server sends as its version: no russh version to fingerprint.
const SERVER_ID: &str = "SSH-2.0-jumpgate";
/// Per-channel flow-control window: 2 MiB, russh's default
/// (russh-0.65.1 src/server/mod.rs:118) and OpenSSH's. 8 MiB was tried: the
/// OpenSSH client then queues a whole window in its output buffer and spends
/// 1.5-1.7 CPU-s/GiB compacting it (page faults, memmove) against 0.8-1.0
/// with 2 MiB, which made jumpgate slower than sshd (docs/bench-ssh.md).
pub const WINDOW_SIZE: u32 = 2 * 1024 * 1024;
/// Largest packet we accept; OpenSSH clients send at most 32 KiB of data
/// per packet on a forwarding channel anyway (russh default: 32768).
pub const MAX_PACKET_SIZE: u32 = 32 * 1024;
/// Size of russh's per-channel message queue. Channel data does not travel
/// through it: the session's handler hands it to [`crate::relay::inlet`],
/// and the relay drops the queue's read half as it starts (russh then stops
/// queueing). Until then a full queue would make russh's session loop wait
/// (russh-0.65.1 src/server/encrypted.rs:1502-1517), so it stays large; it
/// holds memory only while messages wait in it.
pub const CHANNEL_BUFFER: usize = 4096;
/// How long a channel waits for the first DNS answer of a name.
pub const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// Connect timeout to a database for a channel.
pub const CHANNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the daemon cuts sessions, how long to wait for them to end.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

/// Ciphers, strongest-first. russh 0.65 implements aes128-gcm but leaves it
/// out of its default list (src/negotiation.rs:188); many clients prefer it.
/// No CBC, no 3DES: nothing weaker than a stock OpenSSH 9 sshd offers.
const CIPHERS: &[cipher::Name] = &[
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

/// Host and user key algorithms: russh's default list without SHA-1
/// `ssh-rsa` (src/negotiation.rs:233). A client that offers an RSA key only
/// with SHA-1 signatures is also refused in the handler, because russh does
/// not check a client's signature algorithm against this list.
const KEY_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn russh_config_has_no_inactivity_timeout_and_only_modern_algorithms() {
        let text = "[ssh]\nkeepalive = \"7s\"\nkeepalive_max = 4\nmax_auth_attempts = 5\n[[ssh.user]]\nname = \"u\"\nauthorized_keys = \"k\"\n[[ssh.allow]]\ncidr = \"10.0.0.0/8\"\nports = [5432]\n";
        let config = Config::parse(text, "test").unwrap().ssh.unwrap();
        let c = russh_config(&config, &[]);
        assert_eq!(
            c.inactivity_timeout, None,
            "a silent database connection must not be cut"
        );
        assert_eq!(c.keepalive_interval, Some(Duration::from_secs(7)));
        assert_eq!(c.keepalive_max, 4);
        assert_eq!(c.max_auth_attempts, 6, "5 keys, plus the none probe that russh counts");
        assert_eq!(
            c.auth_rejection_time_initial,
            Some(Duration::ZERO),
            "the none probe is not delayed"
        );
        assert!(
            !c.preferred.key.contains(&Algorithm::Rsa { hash: None }),
            "no SHA-1 ssh-rsa"
        );
        assert!(c.preferred.cipher.contains(&cipher::AES_128_GCM));
        let kex: Vec<&str> = c.preferred.kex.iter().map(|k| k.as_ref()).collect();
        assert_eq!(kex.first(), Some(&"mlkem768x25519-sha256"));
        assert!(
            kex.contains(&"kex-strict-s-v00@openssh.com"),
            "strict kex (Terrapin) stays on"
        );
        assert_eq!(c.methods.iter().count(), 1, "public key only");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshStartError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Algorithm lists for both the server and the tunnel client: russh's
/// defaults (kex with strict-kex and ext-info kept) with our ciphers and
/// key algorithms.
pub fn preferred() -> Preferred {
    Preferred {
        key: KEY_ALGORITHMS.into(),
        cipher: CIPHERS.into(),
        ..Preferred::DEFAULT
    }
}

/// The russh server config built from `[ssh]`.
pub fn russh_config(config: &SshConfig, host_keys: &[HostKey]) -> RusshConfig {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    RusshConfig {
        server_id: SshId::Standard(SERVER_ID.into()),
        methods,
        // Rejections take a constant time (no timing oracle on which users
        // exist), except the OpenSSH client's first `none` probe, which
        // would otherwise delay every login by a second.
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: host_keys.iter().map(|k| k.key.clone()).collect(),
        window_size: WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET_SIZE,
        channel_buffer_size: CHANNEL_BUFFER,
        preferred: preferred(),
        // russh counts the OpenSSH client's first `none` probe as an attempt;
        // sshd does not. +1 keeps `max_auth_attempts` meaning what sshd's does.
        max_auth_attempts: config.max_auth_attempts + 1,
        // Off: a database connection silent through a long query must live
        // as long as the client answers keepalives (russh default 600 s,
        // src/server/mod.rs:125).
        inactivity_timeout: None,
        keepalive_interval: Some(config.keepalive),
        keepalive_max: config.keepalive_max,
        nodelay: true,
        ..RusshConfig::default()
    }
}

/// Metrics of the ssh role, registered once.
pub struct SshMetrics {
    pub conn_accepted: Counter,
    pub conn_source_refused: Counter,
    pub conn_startups_full: Counter,
    pub conn_login_timeout: Counter,
    pub conn_proxy_rejected: Counter,
    pub proxy_rejected_listener: Counter,
    pub auth_accepted: Counter,
    pub auth_rejected: Counter,
    pub sessions_active: Gauge,
    pub channels_opened: Counter,
    pub channels_denied: Counter,
    pub channels_connect_failed: Counter,
    pub channels_active: Gauge,
    pub connect_seconds: Histogram,
}

impl SshMetrics {
    fn new() -> SshMetrics {
        let conn = |r: &'static str| metrics::counter!(m::SSH_CONNECTIONS, "result" => r);
        let auth = |r: &'static str| metrics::counter!(m::SSH_AUTH, "result" => r);
        let chan = |r: &'static str| metrics::counter!(m::SSH_CHANNELS, "result" => r);
        SshMetrics {
            conn_accepted: conn("accepted"),
            conn_source_refused: conn("source_refused"),
            conn_startups_full: conn("startups_full"),
            conn_login_timeout: conn("login_timeout"),
            conn_proxy_rejected: conn("proxy_rejected"),
            proxy_rejected_listener: metrics::counter!(m::PROXY_REJECTED, "listener" => "ssh"),
            auth_accepted: auth("accepted"),
            auth_rejected: auth("rejected"),
            sessions_active: metrics::gauge!(m::SSH_SESSIONS_ACTIVE),
            channels_opened: chan("opened"),
            channels_denied: chan("denied"),
            channels_connect_failed: chan("connect_failed"),
            channels_active: metrics::gauge!(m::SSH_CHANNELS_ACTIVE),
            connect_seconds: metrics::histogram!(m::UPSTREAM_CONNECT_SECONDS, "role" => "ssh"),
        }
    }
}

/// A user with their key file and/or the service's group key.
pub struct User {
    pub name: String,
    pub keys: Option<KeyFile>,
    pub group_key: Option<Arc<GroupKey>>,
    pub permitopen: Vec<crate::policy::PermitOpen>,
}

impl User {
    /// Whether any key of this user can log in now.
    pub fn has_key(&self) -> bool {
        self.keys.as_ref().is_some_and(|k| !k.current().is_empty())
            || self.group_key.as_ref().is_some_and(|g| g.current().is_some())
    }

    /// Why nobody can log in as this user (for /readyz/ssh).
    pub fn why_no_key(&self) -> String {
        let mut why = Vec::new();
        if let Some(k) = &self.keys {
            why.push(k.why_empty());
        }
        if let Some(g) = &self.group_key {
            why.push(g.why_empty());
        }
        why.join("; ")
    }
}

/// What every session of the server shares.
pub struct Shared {
    pub config: SshConfig,
    pub users: Vec<User>,
    /// Watches for names that channels ask for; None when no rule names a host.
    pub registry: Option<Registry>,
    pub activity: Arc<Activity>,
    pub metrics: SshMetrics,
    pub on_change: OnChange,
}

/// The bound SSH server, not serving yet.
pub struct SshServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    russh: Arc<RusshConfig>,
    fingerprints: Vec<String>,
}

impl SshServer {
    /// Loads (or generates) host keys, loads users' keys, binds.
    pub fn bind(
        config: SshConfig,
        state_dir: &Path,
        resolver: Option<Resolver>,
        min_max_ttl: (Duration, Duration),
        activity: Arc<Activity>,
        background: CancellationToken,
    ) -> Result<SshServer, SshStartError> {
        let host_keys = keys::load_host_keys(&config.host_keys, state_dir)?;
        let mut fingerprints = Vec::new();
        for k in &host_keys {
            let line = keys::fingerprint_line(k.key.public_key());
            let how = if k.generated { "generated" } else { "loaded" };
            info!(key = %k.path.display(), fingerprint = %line, "host key {how}");
            fingerprints.push(line);
        }
        let users: Vec<User> = config
            .users
            .iter()
            .map(|u| User {
                name: u.name.clone(),
                keys: u.authorized_keys.clone().map(KeyFile::new),
                group_key: u.service_group.as_ref().map(|g| Arc::new(GroupKey::new(g, state_dir))),
                permitopen: u.permitopen.clone(),
            })
            .collect();
        for u in &users {
            if let Some(keys) = &u.keys {
                let n = keys.current().len();
                info!(user = %u.name, file = %keys.path().display(), keys = n, "authorized keys loaded");
            }
        }
        let registry = resolver.map(|r| Registry::new(r, min_max_ttl.0, min_max_ttl.1, background));
        let listener = crate::forward::bind_listener(config.listen).map_err(|source| SshStartError::Bind {
            addr: config.listen,
            source,
        })?;
        let russh = Arc::new(russh_config(&config, &host_keys));
        let on_change = config.on_change;
        Ok(SshServer {
            listener,
            russh,
            fingerprints,
            shared: Arc::new(Shared {
                config,
                users,
                registry,
                activity,
                metrics: SshMetrics::new(),
                on_change,
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The service group keys to keep fresh (user name, key).
    pub fn group_keys(&self) -> Vec<Arc<GroupKey>> {
        self.shared.users.iter().filter_map(|u| u.group_key.clone()).collect()
    }

    /// The host keys' public halves (for fingerprint registration).
    pub fn host_public_keys(&self) -> Vec<russh::keys::PublicKey> {
        self.russh.keys.iter().map(|k| k.public_key().clone()).collect()
    }

    /// `256 SHA256:... jumpgate (ED25519)` per host key.
    pub fn fingerprints(&self) -> &[String] {
        &self.fingerprints
    }

    /// A ready-to-paste `ssh -N -L` line for the first user and allow rule.
    pub fn example_command(&self) -> Option<String> {
        let addr = self.local_addr().ok()?;
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        let user = self.shared.users.first()?;
        let rule = self.shared.config.policy.allow.first()?;
        let port = *rule.ports.first()?;
        let target = match &rule.target {
            crate::policy::RuleTarget::Host(pattern) if pattern.exact().is_some() => rule.label.clone(),
            _ => "<database-host>".to_string(),
        };
        let local = port.checked_add(20000).unwrap_or(port);
        Some(format!(
            "ssh -N -L {local}:{target}:{port} -p {} {}@{host}   # then connect your client to 127.0.0.1:{local}",
            addr.port(),
            user.name
        ))
    }

    /// Ready when bound (always, once this exists), host keys loaded (ditto)
    /// and at least one user key loaded.
    pub fn readiness(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || {
            if shared.users.iter().any(User::has_key) {
                return Ok(());
            }
            let why: Vec<String> = shared
                .users
                .iter()
                .map(|u| format!("user {:?}: {}", u.name, u.why_no_key()))
                .collect();
            Err(format!("ssh: no user key loaded ({})", why.join("; ")))
        }
    }

    /// Accepts until `stop`; sessions end when `cut` fires.
    pub async fn serve(self, stop: CancellationToken, cut: CancellationToken, conns: TaskTracker) {
        let SshServer {
            listener,
            shared,
            russh,
            ..
        } = self;
        let startups = Arc::new(Semaphore::new(shared.config.max_startups));
        loop {
            let (socket, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(error = %e, "ssh accept failed");
                        tokio::time::sleep(crate::forward::ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
                () = stop.cancelled() => break,
            };
            // Without PROXY protocol the socket's peer is the client: refuse it
            // before reading anything. With it, the check waits for the header.
            if !shared.config.proxy_protocol && !source_allowed(&shared, peer) {
                continue;
            }
            let Ok(permit) = startups.clone().try_acquire_owned() else {
                shared.metrics.conn_startups_full.increment(1);
                warn!(%peer, max_startups = shared.config.max_startups, "refused: too many unauthenticated connections");
                continue;
            };
            // Behind PROXY protocol a connection is accepted once its header is.
            if !shared.config.proxy_protocol {
                shared.metrics.conn_accepted.increment(1);
            }
            let span = info_span!("ssh", %peer);
            let session = connection(
                shared.clone(),
                russh.clone(),
                socket,
                peer,
                permit,
                cut.child_token(),
                conns.clone(),
            );
            conns.spawn(session.instrument(span));
        }
        debug!("ssh: stopped accepting");
    }
}

/// `allowed_sources` for a client address; counts and audits a refusal.
fn source_allowed(shared: &Shared, peer: SocketAddr) -> bool {
    let sources = &shared.config.allowed_sources;
    let ip = peer.ip().to_canonical();
    if sources.is_empty() || sources.iter().any(|net| net.contains(&ip)) {
        return true;
    }
    shared.metrics.conn_source_refused.increment(1);
    info!(target: "audit", event = "connection_refused", %peer, reason = "source not in allowed_sources");
    false
}

async fn connection(
    shared: Arc<Shared>,
    russh: Arc<RusshConfig>,
    mut socket: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    cut: CancellationToken,
    conns: TaskTracker,
) {
    let _open = shared.activity.enter();
    let _ = socket.set_nodelay(true);
    // With russh's inactivity timeout off, a write to a client that vanished
    // would wait forever; bound it like the keepalives bound a silent one.
    let dead_after = shared.config.keepalive * (shared.config.keepalive_max as u32 + 1);
    if let Err(e) = socket2::SockRef::from(&socket).set_tcp_user_timeout(Some(dead_after)) {
        debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
    let grace = shared.config.login_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let peer = if shared.config.proxy_protocol {
        let wait = grace.min(crate::proxy_protocol::HEADER_TIMEOUT);
        match crate::proxy_protocol::read_header(&mut socket, wait).await {
            Ok(h) => {
                let real = h.source.unwrap_or(peer);
                info!(target: "audit", event = "proxy_header", peer = %peer, client = %real,
                    vpc_endpoint = h.aws_vpce_id.as_deref().unwrap_or("-"));
                if !source_allowed(&shared, real) {
                    return;
                }
                shared.metrics.conn_accepted.increment(1);
                real
            }
            Err(e) => {
                shared.metrics.conn_proxy_rejected.increment(1);
                shared.metrics.proxy_rejected_listener.increment(1);
                warn!(%peer, error = %e, "no valid PROXY header: connection dropped");
                return;
            }
        }
    } else {
        peer
    };
    let (authed_tx, authed_rx) = oneshot::channel();
    let handler = Handler::new(shared.clone(), peer, authed_tx, cut.clone(), conns);
    let running = tokio::select! {
        r = tokio::time::timeout_at(deadline, russh::server::run_stream(russh, socket, handler)) => match r {
            Ok(Ok(running)) => running,
            Ok(Err(e)) => {
                debug!(error = %e, "ssh handshake failed");
                return;
            }
            Err(_) => {
                shared.metrics.conn_login_timeout.increment(1);
                info!(target: "audit", event = "auth_failure", %peer, reason = "login_grace ran out before the version exchange");
                return;
            }
        },
        () = cut.cancelled() => return,
    };
    let handle = running.handle();
    tokio::pin!(running);
    // Until authenticated: login_grace and the startup permit apply.
    let authed = tokio::select! {
        r = &mut running => {
            if let Err(e) = r {
                debug!(error = %e, "ssh session ended before authentication");
            }
            return;
        }
        r = authed_rx => r.is_ok(),
        () = tokio::time::sleep_until(deadline) => {
            shared.metrics.conn_login_timeout.increment(1);
            info!(target: "audit", event = "auth_failure", %peer, reason = "login_grace ran out");
            false
        }
        () = cut.cancelled() => false,
    };
    drop(permit);
    if authed {
        tokio::select! {
            r = &mut running => {
                if let Err(e) = r {
                    debug!(error = %e, "ssh session ended with an error");
                }
                return;
            }
            () = cut.cancelled() => {}
        }
    }
    let _ = handle
        .disconnect(
            russh::Disconnect::ByApplication,
            "server shutting down".into(),
            "en".into(),
        )
        .await;
    let _ = tokio::time::timeout(DISCONNECT_WAIT, &mut running).await;
}
