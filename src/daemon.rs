//! [`App`]: binds every listener, then runs the roles, the admin endpoint,
//! the DNS watchers, signals, the drain and the idle exit.
//!
//! Binding and running are separate steps so a start-up error (an address in
//! use) is reported before anything serves, and so tests can bind port 0 and
//! read the real addresses. Shutdown is one `CancellationToken` tree:
//! `stop_accepting` closes the listeners, `cut` closes open connections,
//! `background` stops the admin endpoint and the DNS watchers last.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin::{self, Check, Health};
use crate::config::{Config, Host};
use crate::dns::{self, Watch};
use crate::forward::{self, Forwarder};
use crate::policy::RuleTarget;
use crate::service::ServiceClient;
use crate::ssh::keyfile::GroupKey;
use crate::ssh::server::{SshServer, SshStartError};
use crate::tunnel::Tunnel;

/// A start-up error: printed as is, then the process exits 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{file}: {table}: listen: cannot bind {addr}: {source} ({fix})")]
    Bind {
        file: String,
        table: String,
        addr: SocketAddr,
        source: io::Error,
        fix: &'static str,
    },
    #[error("{file}: [dns]: nameservers: {source}")]
    Dns { file: String, source: dns::DnsError },
    #[error("{file}: [ssh]: host_keys: {source}")]
    HostKey {
        file: String,
        source: crate::ssh::keys::KeyError,
    },
    #[error("{file}: {table}: {source}")]
    Tunnel {
        file: String,
        table: String,
        source: crate::tunnel::TunnelError,
    },
    #[error("{file}: [service]: {why}")]
    Service { file: String, why: String },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot write the ready file {path}: {source} (check --ready-file's directory exists and is writable)")]
    ReadyFile { path: String, source: io::Error },
}

/// Open connections across every role, for the idle exit.
#[derive(Default)]
pub struct Activity {
    open: AtomicUsize,
    changed: Notify,
}

/// Held by a connection while it is open.
pub struct Open<'a>(&'a Activity);

impl Activity {
    /// Counts a connection as open until the guard drops.
    pub fn enter(&self) -> Open<'_> {
        self.open.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        Open(self)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Returns once no connection has been open for `after`.
    async fn idle_for(&self, after: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open() == 0 {
                tokio::select! {
                    () = tokio::time::sleep(after) => return,
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// What `--ready-file` holds: the real bound addresses.
#[derive(Debug, Clone, Serialize)]
pub struct ReadyInfo {
    pub admin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub forward: BTreeMap<String, String>,
    /// Each tunnel's state at that moment: "connecting" or "up".
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tunnel: BTreeMap<String, String>,
}

/// Why `run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT, drained.
    Signal,
    /// A second signal during the drain: connections were cut at once.
    SecondSignal,
    /// `[daemon] idle_exit` ran out.
    Idle,
}

/// The daemon with every listener bound.
pub struct App {
    config: Config,
    admin: TcpListener,
    forwards: Vec<Forwarder>,
    watches: Vec<Watch>,
    ssh: Option<SshServer>,
    tunnels: Vec<Tunnel>,
    /// Stops the admin endpoint and DNS watchers, last.
    background: CancellationToken,
    health: Arc<Health>,
    activity: Arc<Activity>,
    prometheus: PrometheusHandle,
}

impl App {
    /// Resolvers, listeners, readiness: everything that can fail at start.
    pub async fn bind(config: Config) -> Result<App, StartError> {
        let prometheus = crate::metrics::install();
        raise_nofile_limit();
        let file = config.file.clone();
        let activity = Arc::new(Activity::default());

        let ssh_names = config
            .ssh
            .as_ref()
            .is_some_and(|s| s.policy.allow.iter().any(|r| matches!(r.target, RuleTarget::Host(_))));
        let tunnel_names = config.tunnel.iter().any(|t| {
            matches!(t.server.host, Host::Name(_)) || t.remotes.iter().any(|r| matches!(r.connect.host, Host::Name(_)))
        });
        let needs_resolver =
            ssh_names || tunnel_names || config.forward.iter().any(|f| matches!(f.target.host, Host::Name(_)));
        let resolver = if needs_resolver {
            Some(dns::Resolver::new(&config.dns).map_err(|source| StartError::Dns {
                file: file.clone(),
                source,
            })?)
        } else {
            None
        };
        // One watch per distinct name, shared by every forward route and tunnel
        // that targets it.
        let mut watches: Vec<Watch> = Vec::new();
        let mut watch_for = |host: &Host| -> Watch {
            match (host, &resolver) {
                (Host::Ip(ip), _) => Watch::fixed(*ip),
                (Host::Name(name), Some(resolver)) => {
                    if let Some(w) = watches.iter().find(|w| w.name() == name) {
                        return w.clone();
                    }
                    let w = Watch::new(name, resolver.clone(), config.dns.min_ttl, config.dns.max_ttl);
                    watches.push(w.clone());
                    w
                }
                (Host::Name(_), None) => {
                    unreachable!("a resolver is built whenever a target is a name")
                }
            }
        };

        let mut forwards = Vec::new();
        for (i, route) in config.forward.iter().enumerate() {
            let watch = watch_for(&route.target.host);
            let f = Forwarder::bind(route.clone(), watch, activity.clone()).map_err(|source| StartError::Bind {
                file: file.clone(),
                table: format!("[[forward]] #{} {:?}", i + 1, route.name),
                addr: route.listen,
                fix: bind_fix(&source),
                source,
            })?;
            forwards.push(f);
        }
        let admin = forward::bind_listener(config.admin.listen).map_err(|source| StartError::Bind {
            file: file.clone(),
            table: "[admin]".into(),
            addr: config.admin.listen,
            fix: bind_fix(&source),
            source,
        })?;

        let background = CancellationToken::new();
        let ssh = match &config.ssh {
            Some(ssh_config) => {
                let resolver = if ssh_names { resolver.clone() } else { None };
                let server = SshServer::bind(
                    ssh_config.clone(),
                    &config.state_dir,
                    resolver,
                    (config.dns.min_ttl, config.dns.max_ttl),
                    activity.clone(),
                    background.clone(),
                )
                .map_err(|e| match e {
                    SshStartError::Bind { addr, source } => StartError::Bind {
                        file: file.clone(),
                        table: "[ssh]".into(),
                        addr,
                        fix: bind_fix(&source),
                        source,
                    },
                    SshStartError::Key(e) => StartError::HostKey {
                        file: file.clone(),
                        source: e,
                    },
                })?;
                Some(server)
            }
            None => None,
        };

        let mut tunnels = Vec::new();
        for (i, t) in config.tunnel.iter().enumerate() {
            let tunnel =
                Tunnel::new(t.clone(), &mut watch_for, activity.clone()).map_err(|source| StartError::Tunnel {
                    file: file.clone(),
                    table: format!("[[tunnel]] #{} {:?}", i + 1, t.name),
                    source,
                })?;
            tunnels.push(tunnel);
        }

        let mut parts: Vec<(String, Check)> = forwards
            .iter()
            .map(|f| (format!("forward/{}", f.name()), Box::new(f.readiness()) as Check))
            .collect();
        if let Some(s) = &ssh {
            parts.push(("ssh".into(), Box::new(s.readiness())));
        }
        for t in &tunnels {
            parts.push((format!("tunnel/{}", t.name()), Box::new(t.readiness())));
        }
        Ok(App {
            tunnels,
            ssh,
            background,
            config,
            admin,
            forwards,
            watches,
            health: Arc::new(Health::new(parts)),
            activity,
            prometheus,
        })
    }

    /// The bound addresses, as `--ready-file` writes them.
    pub fn ready_info(&self) -> ReadyInfo {
        let addr = |r: io::Result<SocketAddr>| r.map_or_else(|e| format!("unknown: {e}"), |a| a.to_string());
        ReadyInfo {
            admin: addr(self.admin.local_addr()),
            ssh: self.ssh.as_ref().map(|s| addr(s.local_addr())),
            tunnel: self
                .tunnels
                .iter()
                .map(|t| (t.name().to_string(), t.state_word().to_string()))
                .collect(),
            forward: self
                .forwards
                .iter()
                .map(|f| (f.name().to_string(), addr(f.local_addr())))
                .collect(),
        }
    }

    /// Serves until a signal has drained the daemon or the idle exit fires.
    /// `ready` runs once everything serves (writes the ready file, notifies
    /// systemd); its error stops the daemon.
    pub async fn run(self, ready: impl FnOnce(&ReadyInfo) -> Result<(), StartError>) -> Result<Exit, StartError> {
        let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
        let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
        let info = self.ready_info();
        let App {
            config,
            admin,
            forwards,
            watches,
            health,
            activity,
            prometheus,
            ssh,
            tunnels,
            background,
        } = self;

        let service = match &config.service {
            Some(s) => Some((
                ServiceClient::new(&s.api_url, s.api_key.clone(), s.api_secret.clone()).map_err(|why| {
                    StartError::Service {
                        file: config.file.clone(),
                        why,
                    }
                })?,
                s,
            )),
            None => None,
        };
        let stop_accepting = CancellationToken::new();
        let cut = CancellationToken::new();
        let conns = TaskTracker::new();
        let tasks = TaskTracker::new();

        for w in watches {
            let span = info_span!("dns", name = %w.name());
            tasks.spawn(w.run(background.clone()).instrument(span));
        }
        {
            let (health, prometheus, stop) = (health.clone(), prometheus.clone(), background.clone());
            tasks.spawn(admin::serve(admin, health, prometheus, stop));
        }
        {
            let (prometheus, stop) = (prometheus.clone(), background.clone());
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
                loop {
                    tokio::select! {
                        _ = tick.tick() => prometheus.run_upkeep(),
                        () = stop.cancelled() => return,
                    }
                }
            });
        }
        if let Some(server) = ssh {
            let listen = server.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
            info!(%listen, "ssh listening");
            for line in server.fingerprints() {
                eprintln!("ssh host key: {line}");
            }
            if let Some(cmd) = server.example_command() {
                info!(command = %cmd, "ssh ready to use");
                eprintln!("ssh: try  {cmd}");
            }
            if let Some((client, svc)) = &service {
                for group in server.group_keys() {
                    let span = info_span!("service", group = %group.group);
                    tasks.spawn(
                        refresh_group_key(client.clone(), group, svc.refresh, background.clone()).instrument(span),
                    );
                }
                if !svc.connection_ids.is_empty() {
                    let keys = server.host_public_keys();
                    tasks.spawn(
                        register_fingerprints(client.clone(), svc.connection_ids.clone(), keys)
                            .instrument(info_span!("service")),
                    );
                }
            }
            tasks.spawn(server.serve(stop_accepting.clone(), cut.clone(), conns.clone()));
        }
        for t in tunnels {
            let span = info_span!("tunnel", name = %t.name());
            tasks.spawn(
                t.run(stop_accepting.clone(), cut.clone(), conns.clone())
                    .instrument(span),
            );
        }
        for f in forwards {
            info!(route = %f.name(), listen = %f.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "forward route listening");
            tasks.spawn(f.serve(stop_accepting.clone(), cut.clone(), conns.clone()));
        }
        info!(admin = %info.admin, parts = ?health.part_names().collect::<Vec<_>>(), "ready");
        if let Err(e) = ready(&info) {
            background.cancel();
            stop_accepting.cancel();
            return Err(e);
        }

        let idle_exit = config.daemon.idle_exit;
        let idle = async {
            match idle_exit {
                Some(after) => activity.idle_for(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(idle);
        let first = loop {
            tokio::select! {
                _ = term.recv() => break Exit::Signal,
                _ = int.recv() => break Exit::Signal,
                _ = hup.recv() => warn!("SIGHUP: reload is not built in this version yet; keeping the running config"),
                () = &mut idle => break Exit::Idle,
            }
        };

        let exit = match first {
            Exit::Idle => {
                info!(after = ?idle_exit.unwrap_or_default(), "no open connection for idle_exit: exiting");
                stop_accepting.cancel();
                Exit::Idle
            }
            _ => {
                health.set_draining();
                notify_systemd("STOPPING=1");
                let (drain, grace) = (config.daemon.drain_delay, config.daemon.shutdown_grace);
                info!(drain_delay = ?drain, shutdown_grace = ?grace, open = activity.open(),
                    "signal: draining (/readyz is 503); still accepting for drain_delay");
                let second = async {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                };
                tokio::pin!(second);
                let mut exit = Exit::Signal;
                tokio::select! {
                    () = tokio::time::sleep(drain) => {}
                    () = &mut second => exit = Exit::SecondSignal,
                }
                stop_accepting.cancel();
                conns.close();
                if exit == Exit::Signal {
                    info!(
                        open = activity.open(),
                        "stopped accepting; waiting for open connections"
                    );
                    tokio::select! {
                        () = conns.wait() => info!("all connections closed"),
                        () = tokio::time::sleep(grace) => {
                            warn!(open = activity.open(), shutdown_grace = ?grace, "shutdown_grace ran out: closing the connections still open");
                        }
                        () = &mut second => exit = Exit::SecondSignal,
                    }
                }
                if exit == Exit::SecondSignal {
                    warn!(
                        open = activity.open(),
                        "second signal: exiting now, cutting open connections"
                    );
                }
                exit
            }
        };
        cut.cancel();
        conns.close();
        if exit != Exit::SecondSignal {
            // Connections close at once once cut; bounded anyway.
            let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
        }
        background.cancel();
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
        debug!(?exit, "run finished");
        Ok(exit)
    }
}

/// Keeps a service group's key fresh: fetched now, then every `refresh`;
/// after a failure, again within a minute. The last good key keeps serving.
async fn refresh_group_key(client: ServiceClient, group: Arc<GroupKey>, refresh: Duration, stop: CancellationToken) {
    loop {
        let next = match client.group_public_key(&group.group).await {
            Ok(line) => match group.update(&line) {
                Ok(()) => refresh,
                Err(why) => {
                    warn!(%why, "service key refresh failed; keeping the last good key");
                    group.failed(why);
                    refresh.min(Duration::from_secs(60))
                }
            },
            Err(e) => {
                warn!(error = %e, "service key refresh failed; keeping the last good key");
                group.failed(e.to_string());
                refresh.min(Duration::from_secs(60))
            }
        };
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Registers every host key's fingerprint for each connection at start-up,
/// so a new instance needs no manual approval.
async fn register_fingerprints(client: ServiceClient, connections: Vec<String>, keys: Vec<russh::keys::PublicKey>) {
    for id in &connections {
        for key in &keys {
            let (hash, registered) = client.register_host_key(id, key).await;
            match registered {
                Ok(message) => {
                    info!(target: "audit", event = "fingerprint_registered", connection = %id, hash = %hash, %message)
                }
                Err(e) => warn!(connection = %id, hash = %hash, error = %e, "cannot register the host key fingerprint"),
            }
        }
    }
}

fn bind_fix(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => "another process holds this address: stop it or pick another port",
        io::ErrorKind::AddrNotAvailable => "this machine has no such address: use 0.0.0.0 or one of its own addresses",
        io::ErrorKind::PermissionDenied => {
            "ports below 1024 need CAP_NET_BIND_SERVICE: grant it or pick a port >= 1024"
        }
        _ => "check the address",
    }
}

/// Raises the soft open-file limit to the hard one and logs both: each
/// relayed connection holds two sockets.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(soft_was = soft, soft = hard, hard, "raised the open-file limit"),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok((soft, hard)) => info!(soft, hard, connections_fit = soft / 2, "open-file limit"),
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Writes the ready file atomically (temp file + rename).
pub fn write_ready_file(path: &Path, info: &ReadyInfo) -> io::Result<()> {
    let json = serde_json::to_vec(info).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET`.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = || -> io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            #[cfg(not(target_os = "linux"))]
            let _ = name;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    };
    if let Err(e) = send() {
        warn!(error = %e, state, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_exit_waits_for_the_last_connection() {
        let activity = Arc::new(Activity::default());
        let open = activity.enter();
        let a = activity.clone();
        let idle = tokio::spawn(async move { a.idle_for(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!idle.is_finished(), "no idle exit while a connection is open");
        drop(open);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            !idle.is_finished(),
            "not before idle_exit has passed since the last close"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(idle.is_finished(), "exits once idle_exit has passed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_resets_the_idle_timer() {
        let activity = Arc::new(Activity::default());
        let a = activity.clone();
        let idle = tokio::spawn(async move { a.idle_for(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(8)).await;
        drop(activity.enter());
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(!idle.is_finished(), "the timer restarted at the last close");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(idle.is_finished());
    }

    #[test]
    fn ready_file_is_json_with_real_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        let info = ReadyInfo {
            admin: "127.0.0.1:9090".into(),
            ssh: Some("127.0.0.1:2222".into()),
            forward: [("rds".to_string(), "0.0.0.0:15432".to_string())].into(),
            tunnel: [("fivetran".to_string(), "connecting".to_string())].into(),
        };
        write_ready_file(&path, &info).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            r#"{"admin":"127.0.0.1:9090","ssh":"127.0.0.1:2222","forward":{"rds":"0.0.0.0:15432"},"tunnel":{"fivetran":"connecting"}}"#
        );
    }
}
