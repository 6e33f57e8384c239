//! The russh `Handler` of one SSH connection: it decides, and hands
//! accepted channels to a task that dials the database and relays.
//!
//! Public-key auth only; everything but `direct-tcpip` channels is refused
//! (session channels, so no shell, exec, pty, sftp, env; X11; agent;
//! streamlocal; `tcpip-forward` and every other global request). A
//! direct-tcpip channel is decided by `policy` before any resolution, then
//! every resolved address is checked against `[ssh] deny`, and only then is
//! the database dialled; the channel is confirmed once the database answers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use russh::keys::{Algorithm, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

use crate::dns::Watch;
use crate::metrics as m;
use crate::policy::{Connect, Decision, PermitOpen};
use crate::relay::{InletRx, Inlets, Meter};
use crate::ssh::keys;
use crate::ssh::server::{CHANNEL_CONNECT_TIMEOUT, FIRST_ANSWER_WAIT, Shared};
use crate::upstream::{self, ConnectError};

/// The authenticated identity of a session.
struct Login {
    user: usize,
    /// The key's own permitopen options, when it has any.
    key_permitopen: Option<Vec<PermitOpen>>,
}

pub struct Handler {
    shared: Arc<Shared>,
    peer: SocketAddr,
    authed: Option<oneshot::Sender<()>>,
    login: Option<Login>,
    channels: Arc<AtomicUsize>,
    cut: CancellationToken,
    conns: TaskTracker,
    /// Decremented when the session ends, if it was counted as active.
    active: bool,
    /// The open channels' inbound halves: their data is written to the
    /// database from this (the session's) task.
    inlets: Inlets,
}

impl Handler {
    pub fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        authed: oneshot::Sender<()>,
        cut: CancellationToken,
        conns: TaskTracker,
    ) -> Handler {
        Handler {
            shared,
            peer,
            authed: Some(authed),
            login: None,
            channels: Arc::new(AtomicUsize::new(0)),
            cut,
            conns,
            active: false,
            inlets: Inlets::default(),
        }
    }

    fn reject(&self, reason: &str) -> Auth {
        self.shared.metrics.auth_rejected.increment(1);
        info!(target: "audit", event = "auth_failure", peer = %self.peer, reason);
        Auth::reject()
    }

    /// Why `key` may not log in as `user` now; Ok with the user's index and
    /// the key's permitopen options when it may.
    fn check_key(
        &self,
        user: &str,
        key: &PublicKey,
        algorithm: &Algorithm,
    ) -> Result<(usize, Option<Vec<PermitOpen>>), String> {
        if matches!(algorithm, Algorithm::Rsa { hash: None }) {
            return Err("ssh-rsa (SHA-1) signatures are refused: use rsa-sha2-256 or rsa-sha2-512".into());
        }
        let Some(index) = self.shared.users.iter().position(|u| u.name == user) else {
            return Err(format!("unknown user {user:?}"));
        };
        let user_entry = &self.shared.users[index];
        let file_keys = user_entry.keys.as_ref().map(|k| k.current()).unwrap_or_default();
        let Some(entry) = file_keys.iter().find(|k| k.key.key_data() == key.key_data()) else {
            // The service's group key carries no options: forwarding allowed,
            // no permitopen of its own (the user's and the rules still apply).
            if user_entry
                .group_key
                .as_ref()
                .and_then(|g| g.current())
                .is_some_and(|g| g.key_data() == key.key_data())
            {
                return Ok((index, None));
            }
            return Err(format!("key {} is not authorized for {user:?}", keys::fingerprint(key)));
        };
        entry.admits(self.peer.ip(), SystemTime::now()).map_err(|why| {
            format!(
                "key {} ({}:{}): {why}",
                keys::fingerprint(key),
                user_entry
                    .keys
                    .as_ref()
                    .map_or_else(String::new, |k| k.path().display().to_string()),
                entry.line
            )
        })?;
        if !entry.options.forwarding_allowed {
            return Err(format!(
                "key {} has restrict or no-port-forwarding: it may not forward (add port-forwarding after restrict)",
                keys::fingerprint(key)
            ));
        }
        Ok((index, entry.options.permitopen.clone()))
    }

    /// Refuses a channel of any kind but direct-tcpip: counted, audited, rejected.
    async fn refuse_channel(&self, kind: &str, reply: ChannelOpenHandle) -> Result<(), russh::Error> {
        self.shared.metrics.channels_denied.increment(1);
        info!(target: "audit", event = "channel_open", peer = %self.peer, kind, decision = "denied",
            reason = "only direct-tcpip channels are allowed");
        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if self.active {
            self.shared.metrics.sessions_active.decrement(1.0);
            info!(target: "audit", event = "session_close", peer = %self.peer);
        }
    }
}

impl russh::server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        // The OpenSSH client's probe for methods: not a failure.
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.reject("password authentication is disabled"))
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        _user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.reject("keyboard-interactive authentication is disabled"))
    }

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        match self.check_key(user, offer.public_key, offer.algorithm) {
            Ok(_) => Ok(Auth::Accept),
            Err(why) => Ok(self.reject(&why)),
        }
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        // Checked again: a client may sign without offering first.
        match self.check_key(user, key.public_key, key.algorithm) {
            Ok((index, key_permitopen)) => {
                self.login = Some(Login {
                    user: index,
                    key_permitopen,
                });
                self.shared.metrics.auth_accepted.increment(1);
                self.shared.metrics.sessions_active.increment(1.0);
                self.active = true;
                info!(target: "audit", event = "session_open", peer = %self.peer, user,
                    key = %keys::fingerprint(key.public_key), algorithm = %key.algorithm);
                if let Some(tx) = self.authed.take() {
                    let _ = tx.send(());
                }
                Ok(Auth::Accept)
            }
            Err(why) => Ok(self.reject(&why)),
        }
    }

    async fn auth_openssh_certificate(
        &mut self,
        _user: &str,
        _certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        Ok(self.reject("certificates are not accepted"))
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel("session", reply).await
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel("x11", reply).await
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel("forwarded-tcpip", reply).await
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel("direct-streamlocal", reply).await
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        info!(target: "audit", event = "global_request", peer = %self.peer, kind = "tcpip-forward",
            address, port = *port, decision = "denied", reason = "remote forwarding is not allowed");
        Ok(false)
    }

    async fn streamlocal_forward(&mut self, socket_path: &str, _session: &mut Session) -> Result<bool, Self::Error> {
        info!(target: "audit", event = "global_request", peer = %self.peer, kind = "streamlocal-forward",
            socket_path, decision = "denied", reason = "remote forwarding is not allowed");
        Ok(false)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let shared = &self.shared;
        let Some(login) = &self.login else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let user = &shared.users[login.user];
        let target = format!("{host_to_connect}:{port_to_connect}");
        let deny = |reason: String, rule: Option<&str>| {
            shared.metrics.channels_denied.increment(1);
            info!(target: "audit", event = "channel_open", peer = %self.peer, user = %user.name, target = %target,
                decision = "denied", rule = rule.unwrap_or("-"), reason = %reason);
        };
        let Ok(port) = u16::try_from(port_to_connect) else {
            deny("port out of range".into(), None);
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let open = self.channels.load(Ordering::SeqCst);
        if open >= shared.config.max_channels_per_session {
            deny(
                format!(
                    "max_channels_per_session ({}) reached",
                    shared.config.max_channels_per_session
                ),
                None,
            );
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let decision =
            shared
                .config
                .policy
                .decide(host_to_connect, port, login.key_permitopen.as_deref(), &user.permitopen);
        let (rule, connect) = match decision {
            Decision::Allow { rule, connect } => (rule.label.clone(), connect),
            Decision::Deny(why) => {
                deny(why.to_string(), None);
                reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
                return Ok(());
            }
        };
        let watch = match connect {
            Connect::Ip(ip) => Watch::fixed(ip),
            Connect::Name(name) => match shared.registry.as_ref().and_then(|r| r.watch(&name, &rule)) {
                Some(w) => w,
                None => {
                    deny("too many names watched (or no resolver)".into(), Some(&rule));
                    reply.reject(ChannelOpenFailure::ResourceShortage).await;
                    return Ok(());
                }
            },
        };
        // Dialling waits on DNS and the database: not in the session loop.
        self.channels.fetch_add(1, Ordering::SeqCst);
        let task = ChannelTask {
            shared: shared.clone(),
            peer: self.peer,
            user: user.name.clone(),
            target,
            rule,
            port,
            watch,
            channels: self.channels.clone(),
            cut: self.cut.clone(),
        };
        let span = info_span!("channel", user = %user.name, target = %task.target);
        let inlet_rx = self.inlets.open(channel.id());
        self.conns.spawn(task.run(channel, inlet_rx, reply).instrument(span));
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _session: &mut Session) -> Result<(), Self::Error> {
        self.inlets.data(channel, data).await;
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.inlets.eof(channel);
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.inlets.close(channel);
        Ok(())
    }
}

/// One accepted-by-policy direct-tcpip channel: resolve, check deny, dial,
/// confirm, relay.
struct ChannelTask {
    shared: Arc<Shared>,
    peer: SocketAddr,
    user: String,
    target: String,
    rule: String,
    port: u16,
    watch: Watch,
    channels: Arc<AtomicUsize>,
    cut: CancellationToken,
}

impl ChannelTask {
    async fn run(self, channel: Channel<Msg>, inlet: InletRx, reply: ChannelOpenHandle) {
        let started = Instant::now();
        let metrics = &self.shared.metrics;
        let policy = self.shared.config.policy.clone();
        let admit = |ip: IpAddr| match policy.denied(ip) {
            Some(net) => Err(format!("in [ssh] deny ({net})")),
            None => Ok(()),
        };
        if self.watch.current().is_empty() {
            self.watch.first_answer(FIRST_ANSWER_WAIT).await;
        }
        let dialled = tokio::select! {
            r = upstream::connect(&self.watch, self.port, CHANNEL_CONNECT_TIMEOUT, admit) => r,
            () = self.cut.cancelled() => Err(ConnectError::Failed("shutting down".into())),
        };
        let tcp = match dialled {
            Ok(tcp) => tcp,
            Err(e) => {
                let (failure, decision) = match &e {
                    ConnectError::Refused { .. } => {
                        metrics.channels_denied.increment(1);
                        (ChannelOpenFailure::AdministrativelyProhibited, "denied")
                    }
                    _ => {
                        metrics.channels_connect_failed.increment(1);
                        (ChannelOpenFailure::ConnectFailed, "connect_failed")
                    }
                };
                info!(target: "audit", event = "channel_open", peer = %self.peer, user = %self.user, target = %self.target,
                    rule = %self.rule, decision, reason = %e);
                reply.reject(failure).await;
                self.channels.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        metrics.connect_seconds.record(started.elapsed().as_secs_f64());
        let upstream_addr = tcp.peer_addr().ok();
        reply.accept().await;
        metrics.channels_opened.increment(1);
        metrics.channels_active.increment(1.0);
        let _open = self.shared.activity.enter();
        info!(target: "audit", event = "channel_open", peer = %self.peer, user = %self.user, target = %self.target,
            resolved = %upstream_addr.map_or_else(|| "unknown".into(), |a| a.to_string()), rule = %self.rule, decision = "allowed");

        let meter = Arc::new(Meter::new(
            metrics::counter!(m::RELAY_BYTES, "role" => "ssh", "name" => self.user.clone(), "direction" => "up"),
            metrics::counter!(m::RELAY_BYTES, "role" => "ssh", "name" => self.user.clone(), "direction" => "down"),
        ));
        let reason = upstream::relay_channel(
            inlet,
            channel,
            tcp,
            &meter,
            &self.watch,
            self.shared.on_change,
            &self.cut,
        )
        .await;
        let (up, down) = meter.bytes();
        metrics.channels_active.decrement(1.0);
        self.channels.fetch_sub(1, Ordering::SeqCst);
        debug!(%reason, "channel closed");
        info!(target: "audit", event = "channel_close", peer = %self.peer, user = %self.user, target = %self.target,
            bytes_up = up, bytes_down = down, duration_ms = started.elapsed().as_millis() as u64, reason = %reason);
    }
}
