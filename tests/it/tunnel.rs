//! `[[tunnel]]` end to end: the real daemon dials a real OpenSSH `sshd`
//! (started by the test, see `support::sshd`), asks it to listen on a high
//! port of its loopback, and carries every connection made to that port to a
//! local upstream (echo servers on 127.0.0.2 / 127.0.0.3, PostgreSQL).
//!
//! Faults are real and aimed at the right process: sshd killed with its
//! session processes and restarted on the same port; a jumpgate frozen with
//! SIGSTOP (so sshd keeps its listener until `ClientAlive` drops it — a
//! SIGKILL would send FIN and free it at once); the sshd child serving the
//! session frozen (the server stops answering, only our keepalives notice);
//! the remote port held by another client; a wrong host key; a database down.
//! Each is asserted within a time bound, never after a bare sleep.

use std::collections::BTreeSet;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::daemon::{ConfigDir, Daemon, config, route, run_cli};
use crate::support::dns::DnsServer;
use crate::support::pg::{ITEMS, Postgres, psql};
use crate::support::ssh::{Lab, SshConfig, UserKey, allow_host};
use crate::support::sshd::{Sshd, client_ports, listener_holders, listeners, quiet_port};
use crate::support::upstream::{
    Behavior, Concurrent, DOWN_SEED, Upstream, concurrent_clients, concurrent_received, hello,
};
use crate::support::{closed_within, echoes, hash_to_eof, ip, pattern_hash, send_pattern, wait_for, wait_until};

/// How long a fresh tunnel may take to come up.
const UP_TIMEOUT: Duration = Duration::from_secs(10);

/// `[[tunnel]] keepalive` in every test config, and `keepalive_max`.
const KEEPALIVE: Duration = Duration::from_secs(1);
const KEEPALIVE_MAX: u32 = 1;

/// Slack on top of `keepalive × (keepalive_max + 1)` for a dead server to be noticed.
const KEEPALIVE_MARGIN: Duration = Duration::from_secs(2);

/// How long a takeover may take once the port is (or is about to be) free:
/// sshd's `ClientAlive` drop (about 3 s) plus the loser's current backoff step.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------ config

/// How a tunnel authenticates the server.
#[derive(Clone, Debug)]
enum HostCheck {
    Fingerprint(String),
    KnownHosts(PathBuf),
}

/// One `[[tunnel.remote]]`.
#[derive(Clone, Debug)]
struct Remote {
    listen: String,
    connect: String,
    on_change: &'static str,
}

/// `listen = "localhost:PORT"`, `connect`, `on_change = "keep"`.
fn remote(port: u16, connect: impl ToString) -> Remote {
    Remote {
        listen: format!("localhost:{port}"),
        connect: connect.to_string(),
        on_change: "keep",
    }
}

/// One `[[tunnel]]` with its remotes.
#[derive(Clone, Debug)]
struct Tunnel {
    name: String,
    server: String,
    user: String,
    identity: PathBuf,
    check: HostCheck,
    remotes: Vec<Remote>,
}

impl Tunnel {
    fn toml(&self) -> String {
        let check = match &self.check {
            HostCheck::Fingerprint(f) => format!("server_fingerprint = \"{f}\"\n"),
            HostCheck::KnownHosts(p) => format!("known_hosts = \"{}\"\n", p.display()),
        };
        let mut text = format!(
            "[[tunnel]]\nname = \"{}\"\nserver = \"{}\"\nuser = \"{}\"\nidentity = \"{}\"\n{check}\
             keepalive = \"{}s\"\nkeepalive_max = {KEEPALIVE_MAX}\n",
            self.name,
            self.server,
            self.user,
            self.identity.display(),
            KEEPALIVE.as_secs(),
        );
        for r in &self.remotes {
            text.push_str(&format!(
                "[[tunnel.remote]]\nlisten = \"{}\"\nconnect = \"{}\"\non_change = \"{}\"\n",
                r.listen, r.connect, r.on_change
            ));
        }
        text.push('\n');
        text
    }
}

/// The service's side: an sshd that accepts our tunnel key, and the key.
struct Site {
    /// Holds the key files.
    dir: tempfile::TempDir,
    key: UserKey,
    sshd: Sshd,
}

impl Site {
    /// A key made by `ssh-keygen` and an sshd that accepts it.
    fn new() -> Self {
        let dir = temp_dir("jumpgate-tunnel-");
        let key = UserKey::generate(dir.path(), "id_ed25519", "ed25519");
        Self::with_key(dir, key)
    }

    /// As [`Site::new`], the key made by `jumpgate keygen --type ed25519`.
    fn with_jumpgate_key() -> Self {
        let dir = temp_dir("jumpgate-tunnel-");
        let path = dir.path().join("tunnel_ed25519");
        let (code, out, err) = run_cli(&["keygen", "--type", "ed25519", "--out", path.to_str().expect("utf-8")]);
        assert_eq!(code, 0, "jumpgate keygen failed:\n{out}\n{err}");
        let key = UserKey::load(&path);
        Self::with_key(dir, key)
    }

    fn with_key(dir: tempfile::TempDir, key: UserKey) -> Self {
        let sshd = Sshd::start(&[key.line("")]);
        Self { dir, key, sshd }
    }

    /// A tunnel named `name` to this sshd, checked by fingerprint.
    fn tunnel(&self, name: &str, remotes: Vec<Remote>) -> Tunnel {
        Tunnel {
            name: name.to_string(),
            server: self.sshd.server(),
            user: self.sshd.user().to_string(),
            identity: self.key.path.clone(),
            check: HostCheck::Fingerprint(self.sshd.fingerprint()),
            remotes,
        }
    }

    /// Writes `lines` into a known_hosts file named `name` beside the key.
    fn known_hosts(&self, name: &str, lines: &[String]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").expect("write known_hosts");
        path
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().expect("temp dir")
}

/// The whole config: JSON debug logs, admin on port 0, the DNS server if
/// any, `extra` tables (forward routes), then the tunnels.
fn tunnel_config(tunnels: &[&Tunnel], dns: Option<SocketAddr>, extra: &str) -> String {
    let mut tables = extra.to_string();
    for t in tunnels {
        tables.push_str(&t.toml());
    }
    config("", dns, &tables)
}

/// Starts a daemon with these tunnels (no DNS server, no other role).
fn start(tunnels: &[&Tunnel]) -> Daemon {
    Daemon::start(&tunnel_config(tunnels, None, ""))
}

// ------------------------------------------------------------------ probes

fn readyz_tunnel(d: &Daemon, name: &str) -> (u16, String) {
    d.get(&format!("/readyz/tunnel/{name}"))
}

/// Waits until `/readyz/tunnel/<name>` is 200; panics with what it said
/// (and the sshd log) after `timeout`. Returns how long it took.
fn wait_up(d: &Daemon, sshd: &Sshd, name: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    let up = wait_until(timeout, || readyz_tunnel(d, name).0 == 200);
    assert!(
        up,
        "/readyz/tunnel/{name} not 200 within {timeout:?}: {:?}\nsshd log (tail):\n{}",
        readyz_tunnel(d, name),
        tail(&sshd.log(), 40)
    );
    started.elapsed()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `jumpgate_tunnel_up{tunnel}`; `None` when the series is missing.
fn up_metric(d: &Daemon, tunnel: &str) -> Option<f64> {
    d.metric("jumpgate_tunnel_up", &[("tunnel", tunnel)])
}

fn failures(d: &Daemon, tunnel: &str, reason: &str) -> f64 {
    d.metric_or_zero(
        "jumpgate_tunnel_failures_total",
        &[("tunnel", tunnel), ("reason", reason)],
    )
}

fn reconnects(d: &Daemon, tunnel: &str) -> f64 {
    d.metric_or_zero("jumpgate_tunnel_reconnects_total", &[("tunnel", tunnel)])
}

/// A client of the remote port on sshd's side (127.0.0.1:port), with `timeout` on reads and writes.
fn connect_remote(port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(5))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// A new connection to remote port `port`, and the echo upstream it reached;
/// `None` if it was refused, closed or silent for 2 s.
fn reach(port: u16) -> Option<(TcpStream, IpAddr)> {
    let mut s = connect_remote(port, Duration::from_secs(2)).ok()?;
    let who = hello(&mut s)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    Some((s, who))
}

/// Which echo upstream a new connection to remote port `port` reaches, if any.
fn reached(port: u16) -> Option<IpAddr> {
    reach(port).map(|(_, who)| who)
}

/// Waits until a new connection to remote port `port` reaches `want`;
/// returns how long it took, or `None` after `timeout`.
fn wait_reaching(port: u16, want: IpAddr, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    wait_until(timeout, || reached(port) == Some(want)).then(|| started.elapsed())
}

/// The one connection daemon `d` holds to `sshd` (its local port).
fn tunnel_connection(d: &Daemon, sshd: &Sshd) -> u16 {
    let ports = wait_for(Duration::from_secs(5), || {
        let p = client_ports(d.pid(), sshd.port());
        (p.len() == 1).then_some(p)
    })
    .unwrap_or_else(|| {
        panic!(
            "jumpgate (pid {}) does not hold exactly one connection to sshd port {}: {:?}",
            d.pid(),
            sshd.port(),
            client_ports(d.pid(), sshd.port())
        )
    });
    ports[0]
}

/// All string and number leaves of a JSON value, as strings.
fn json_leaves(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Number(n) => out.push(n.to_string()),
        serde_json::Value::Array(items) => items.iter().for_each(|i| json_leaves(i, out)),
        serde_json::Value::Object(map) => map.values().for_each(|i| json_leaves(i, out)),
        _ => {}
    }
}

// ------------------------------------------------------------------ harness

#[test]
fn sshd_harness_forwards_restarts_and_freezes_sessions() {
    let mut site = Site::new();
    let Site { key, sshd, .. } = &mut site;
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let port = quiet_port();
    let spec = format!("localhost:{port}:{}", up.addr());

    let holder = sshd
        .remote_forward(key, &spec, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("ssh -R against the test sshd failed:\n{e}\nsshd log:\n{}", sshd.log()));
    assert_eq!(listeners(port), vec![SocketAddr::from(([127, 0, 0, 1], port))]);
    assert_eq!(reached(port), Some(ip("127.0.0.2")), "ssh -R carries no traffic");

    // Freeze the session: a new connection is accepted by the kernel but
    // nothing answers; thawed, it is served.
    let sessions = sshd.sessions();
    assert_eq!(sessions.len(), 1, "one ssh client, one session: {sessions:?}");
    let client = sessions[0].1.expect("the session serves a client connection");
    let frozen = sshd.freeze_client(client);
    let mut pending = connect_remote(port, Duration::from_millis(1500)).expect("connect while frozen");
    assert_eq!(hello(&mut pending), None, "a frozen session answered");
    sshd.thaw(&frozen);
    pending.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert_eq!(
        hello(&mut pending),
        Some(ip("127.0.0.2")),
        "thawed session did not serve the pending connection"
    );

    // Stop: listener and sessions die, the client notices, the ports are free.
    sshd.stop();
    assert!(
        holder.wait(Duration::from_secs(5)).is_some(),
        "ssh -R still running after sshd stop"
    );
    assert!(
        listeners(port).is_empty(),
        "remote port still listening after sshd stop: held by {:?}",
        listener_holders(port)
    );
    assert!(
        listeners(sshd.port()).is_empty(),
        "sshd port still listening after stop: {:?} held by {:?}",
        listeners(sshd.port()),
        listener_holders(sshd.port())
    );

    // Restart on the same port with the same host key.
    let fp = sshd.fingerprint();
    sshd.restart();
    assert_eq!(sshd.fingerprint(), fp);
    let again = sshd
        .remote_forward(key, &spec, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("ssh -R after restart failed:\n{e}"));
    assert_eq!(reached(port), Some(ip("127.0.0.2")));
    drop(again);
}

// ------------------------------------------------------------------ traffic

#[test]
fn traffic_and_a_psql_query_reach_the_local_side_through_the_tunnel() {
    let pg = Postgres::start();
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let (echo_port, pg_port) = (quiet_port(), quiet_port());
    let t1 = site.tunnel(
        "t1",
        vec![
            remote(echo_port, up.addr()),
            remote(pg_port, format!("127.0.0.1:{}", pg.port())),
        ],
    );
    let d = start(&[&t1]);

    let state = d.ready["tunnel"]["t1"].as_str().map(str::to_string);
    assert!(
        matches!(state.as_deref(), Some("connecting") | Some("up")),
        "ready file tunnel.t1 should be \"connecting\" or \"up\": {}",
        d.ready
    );
    let took = wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);
    eprintln!("tunnel up {took:?} after the ready file");
    assert_eq!(up_metric(&d, "t1"), Some(1.0), "jumpgate_tunnel_up{{tunnel=\"t1\"}}");
    assert_eq!(d.get("/readyz").0, 200, "/readyz with the tunnel up");
    assert!(
        site.sshd
            .log_has(&format!("Accepted publickey for {}", site.sshd.user()))
    );

    let (mut s, who) = reach(echo_port).unwrap_or_else(|| panic!("no hello through remote port {echo_port}"));
    assert_eq!(who, ip("127.0.0.2"));
    assert!(echoes(&mut s), "echo through the tunnel");
    s.shutdown(Shutdown::Write).expect("shutdown");
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "half-close not carried through"
    );

    let rows = psql(pg_port, "select id, name from items order by id")
        .unwrap_or_else(|e| panic!("psql through the tunnel: {e}\npg log:\n{}", pg.log()));
    assert_eq!(rows, ITEMS);
    let big = psql(
        pg_port,
        "select count(*), sum(length(repeat('x', g))) from generate_series(1, 2000) g",
    )
    .unwrap_or_else(|e| panic!("psql through the tunnel: {e}"));
    assert_eq!(big, "2000|2001000");

    let ups = d.audit("tunnel_up");
    assert_eq!(ups.len(), 1, "one tunnel_up audit line: {ups:?}");
    let f = &ups[0]["fields"];
    assert_eq!(f["tunnel"], "t1", "tunnel_up: {f}");
    assert!(
        f["server"].to_string().contains(&site.sshd.port().to_string()),
        "tunnel_up server should name {}: {f}",
        site.sshd.server()
    );
    for p in [echo_port, pg_port] {
        assert!(
            f["remotes"].to_string().contains(&p.to_string()),
            "tunnel_up remotes should list {p}: {f}"
        );
    }
    // Two psql connections and the echo one: 3 opened, all closed, bytes counted.
    let closes = wait_for(Duration::from_secs(5), || {
        let c = d.audit("tunnel_conn_close");
        (c.len() >= 3).then_some(c)
    })
    .unwrap_or_else(|| panic!("tunnel_conn_close lines: {:?}", d.audit("tunnel_conn_close")));
    assert!(
        d.audit("tunnel_conn_open").len() >= 3,
        "tunnel_conn_open lines: {:?}",
        d.audit("tunnel_conn_open")
    );
    for c in &closes {
        let fields = c["fields"].as_object().expect("fields");
        let bytes: Vec<u64> = fields
            .iter()
            .filter(|(k, _)| k.starts_with("bytes"))
            .filter_map(|(_, v)| v.as_u64())
            .collect();
        assert!(
            bytes.len() >= 2 && bytes.iter().sum::<u64>() > 0,
            "tunnel_conn_close should carry the bytes each way: {c}"
        );
        assert_eq!(c["fields"]["tunnel"], "t1", "{c}");
    }
    let relayed = d.metric_or_zero("jumpgate_relay_bytes_total", &[("role", "tunnel"), ("name", "t1")]);
    assert!(
        relayed > 10.0,
        "jumpgate_relay_bytes_total{{role=\"tunnel\",name=\"t1\"}} = {relayed}"
    );
}

#[test]
fn remote_listen_asks_sshd_for_what_ssh_r_would() {
    let site = Site::with_jumpgate_key();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let (p_localhost, p_bare, p_addr) = (quiet_port(), quiet_port(), quiet_port());
    let mut bare = remote(p_bare, up.addr());
    bare.listen = p_bare.to_string();
    let mut explicit = remote(p_addr, up.addr());
    explicit.listen = format!("127.0.0.2:{p_addr}");
    let t1 = site.tunnel("t1", vec![remote(p_localhost, up.addr()), bare, explicit]);
    let d = start(&[&t1]);
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);

    let lo = |p: u16| vec![SocketAddr::from(([127, 0, 0, 1], p))];
    assert_eq!(
        listeners(p_localhost),
        lo(p_localhost),
        "\"localhost:{p_localhost}\" binds sshd's loopback"
    );
    assert_eq!(listeners(p_bare), lo(p_bare), "bare \"{p_bare}\" means localhost");
    assert_eq!(
        listeners(p_addr),
        vec![SocketAddr::from(([127, 0, 0, 2], p_addr))],
        "an explicit address is passed to sshd as given"
    );
    for p in [p_localhost, p_bare] {
        assert_eq!(reached(p), Some(ip("127.0.0.2")), "through remote port {p}");
    }
    let mut s = TcpStream::connect(("127.0.0.2", p_addr)).expect("connect 127.0.0.2");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert_eq!(hello(&mut s), Some(ip("127.0.0.2")));
}

#[test]
fn connect_name_is_resolved_at_each_connection() {
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 1);
    let (two, _three) = Upstream::pair(Behavior::Echo);
    let site = Site::new();
    let port = quiet_port();
    let t1 = site.tunnel("t1", vec![remote(port, format!("db.jumpgate.test:{}", two.port()))]);
    let d = Daemon::start(&tunnel_config(&[&t1], Some(dns.addr()), ""));
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);

    assert_eq!(reached(port), Some(ip("127.0.0.2")));
    dns.set_a("db", &[ip("127.0.0.3")], 1);
    let took = wait_reaching(port, ip("127.0.0.3"), Duration::from_secs(10));
    assert!(
        took.is_some(),
        "new connections still not on 127.0.0.3 10 s after the DNS change"
    );
    assert_eq!(up_metric(&d, "t1"), Some(1.0), "the tunnel stayed up");
}

#[test]
fn on_change_close_closes_tunnel_connections_whose_address_left_the_answer() {
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 1);
    let (two, _three) = Upstream::pair(Behavior::Echo);
    let site = Site::new();
    let (p_keep, p_close) = (quiet_port(), quiet_port());
    let target = format!("db.jumpgate.test:{}", two.port());
    let mut closing = remote(p_close, &target);
    closing.on_change = "close";
    let t1 = site.tunnel("t1", vec![remote(p_keep, &target), closing]);
    let d = Daemon::start(&tunnel_config(&[&t1], Some(dns.addr()), ""));
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);

    let (mut kept, at) = reach(p_keep).expect("connection on the keep remote");
    assert_eq!(at, ip("127.0.0.2"));
    let (mut cut, at) = reach(p_close).expect("connection on the close remote");
    assert_eq!(at, ip("127.0.0.2"));
    dns.set_a("db", &[ip("127.0.0.3")], 1);

    assert!(
        closed_within(&mut cut, Duration::from_secs(10)),
        "on_change = \"close\": the connection to 127.0.0.2 stayed open 10 s after it left the answer"
    );
    kept.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert!(
        echoes(&mut kept),
        "on_change = \"keep\": the old connection should still echo"
    );
    assert!(
        wait_reaching(p_close, ip("127.0.0.3"), Duration::from_secs(10)).is_some(),
        "new connections on the close remote do not reach 127.0.0.3"
    );
    assert_eq!(up_metric(&d, "t1"), Some(1.0), "the tunnel stayed up");
}

#[test]
fn hundred_mib_each_way_through_the_tunnel_arrive_byte_exact() {
    const LEN: u64 = 100 * 1024 * 1024;
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Stream { down_len: LEN }).expect("bind");
    let port = quiet_port();
    let t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    let d = start(&[&t1]);
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);

    let started = Instant::now();
    let mut client = connect_remote(port, Duration::from_secs(60)).expect("connect to the remote port");
    let mut writer = client.try_clone().expect("clone");
    let sending = std::thread::spawn(move || {
        let sent = send_pattern(&mut writer, 1, LEN);
        let _ = writer.shutdown(Shutdown::Write);
        sent
    });
    let got_down = hash_to_eof(&mut client).expect("read 100 MiB down");
    let sent_up = sending.join().expect("sender").expect("send 100 MiB up");
    eprintln!("100 MiB each way through the tunnel in {:?}", started.elapsed());

    assert_eq!(got_down, pattern_hash(DOWN_SEED, LEN), "downstream (len, hash) differs");
    let got_up = wait_for(Duration::from_secs(10), || up.received().first().copied());
    assert_eq!(
        got_up,
        Some(sent_up),
        "upstream received (len, hash) differs from what was sent"
    );
    let relayed = d.metric_or_zero("jumpgate_relay_bytes_total", &[("role", "tunnel"), ("name", "t1")]);
    assert!(
        relayed >= (2 * LEN) as f64,
        "jumpgate_relay_bytes_total{{role=\"tunnel\",name=\"t1\"}} = {relayed}, want >= {}",
        2 * LEN
    );
}

/// The session must never wait for a database that waits for it: an echo
/// reads only while it can write back (`docs/russh-flow-control.md`).
#[test]
fn sixty_four_mib_echoed_through_one_tunnel_connection_come_back_byte_exact() {
    const LEN: u64 = 64 * 1024 * 1024;
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let port = quiet_port();
    let t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    let d = start(&[&t1]);
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);

    let started = Instant::now();
    // A stalled connection ends at the read timeout.
    let mut client = connect_remote(port, Duration::from_secs(30)).expect("connect to the remote port");
    assert_eq!(hello(&mut client), Some(ip("127.0.0.2")), "no hello through the tunnel");
    let mut writer = client.try_clone().expect("clone");
    let sending = std::thread::spawn(move || {
        let sent = send_pattern(&mut writer, 1, LEN);
        let _ = writer.shutdown(Shutdown::Write);
        sent
    });
    let echoed = hash_to_eof(&mut client);
    let sent = sending.join().expect("sender");
    eprintln!("64 MiB echoed through the tunnel in {:?}", started.elapsed());
    assert!(
        matches!((&sent, &echoed), (Ok(s), Ok(e)) if s == e),
        "echoed (len, hash) {echoed:?}, sent {sent:?}"
    );
    assert_eq!(up_metric(&d, "t1"), Some(1.0), "the tunnel stayed up");
}

#[test]
fn fifty_connections_at_once_through_the_tunnel_arrive_byte_exact() {
    const N: usize = 50;
    const REQUEST: u64 = 256 * 1024;
    const REPLY: u64 = 512 * 1024;
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::AnswerAfterEof { reply_len: REPLY }).expect("bind");
    let port = quiet_port();
    let t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    let d = start(&[&t1]);
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);

    let Concurrent {
        all_open,
        open_at_once,
        results,
    } = concurrent_clients(&up, N, REQUEST, REPLY, move || {
        connect_remote(port, Duration::from_secs(30)).map_err(|e| format!("connect: {e}"))
    });
    assert!(all_open, "only {open_at_once} of {N} connections were open at once");
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "client {i}: {r:?}");
    }
    let (got, want) = concurrent_received(&up, N, REQUEST);
    assert_eq!(got, want, "what the upstream received differs from what was sent");
    assert_eq!(up_metric(&d, "t1"), Some(1.0), "the tunnel stayed up");
}

// ------------------------------------------------------------------ faults

#[test]
fn tunnel_comes_back_after_sshd_is_killed_and_restarted() {
    let mut site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let port = quiet_port();
    let t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    let d = start(&[&t1]);
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);
    assert_eq!(reached(port), Some(ip("127.0.0.2")));
    let reconnects_before = reconnects(&d, "t1");

    site.sshd.stop();
    let down = wait_until(Duration::from_secs(5), || {
        up_metric(&d, "t1") == Some(0.0) && readyz_tunnel(&d, "t1").0 == 503
    });
    assert!(
        down,
        "5 s after sshd died: tunnel_up = {:?}, /readyz/tunnel/t1 = {:?}",
        up_metric(&d, "t1"),
        readyz_tunnel(&d, "t1")
    );
    let (_, body) = readyz_tunnel(&d, "t1");
    assert!(
        body.contains("tunnel \"t1\""),
        "/readyz/tunnel/t1 reason should name the tunnel: {body:?}"
    );
    assert_eq!(d.get("/readyz").0, 503, "/readyz with the tunnel down");
    assert!(
        failures(&d, "t1", "disconnected") >= 1.0,
        "tunnel_failures_total{{reason=\"disconnected\"}} after the server went away: {}",
        d.get("/metrics").1
    );
    let downs = d.audit("tunnel_down");
    assert!(!downs.is_empty(), "no tunnel_down audit line");
    assert_eq!(downs[0]["fields"]["tunnel"], "t1", "{}", downs[0]);
    assert!(
        downs[0]["fields"]["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "tunnel_down should give a reason: {}",
        downs[0]
    );
    // While sshd is away, redials fail to connect: it keeps trying.
    let retried = wait_until(Duration::from_secs(5), || failures(&d, "t1", "connect") >= 1.0);
    assert!(
        retried,
        "no tunnel_failures_total{{reason=\"connect\"}} within 5 s of sshd dying"
    );

    site.sshd.restart();
    let back = wait_reaching(port, ip("127.0.0.2"), Duration::from_secs(10));
    let back = back.unwrap_or_else(|| {
        panic!(
            "traffic not back through the tunnel 10 s after sshd restarted; /readyz/tunnel/t1 = {:?}",
            readyz_tunnel(&d, "t1")
        )
    });
    eprintln!("traffic back {back:?} after sshd restarted");
    assert!(
        reconnects(&d, "t1") > reconnects_before,
        "jumpgate_tunnel_reconnects_total did not rise ({reconnects_before} before)"
    );
    assert_eq!(readyz_tunnel(&d, "t1").0, 200);
    assert_eq!(up_metric(&d, "t1"), Some(1.0));
}

#[test]
fn new_instance_wins_the_port_once_sshd_drops_the_frozen_one() {
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let port = quiet_port();
    let t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    let old = start(&[&t1]);
    wait_up(&old, &site.sshd, "t1", UP_TIMEOUT);
    assert_eq!(reached(port), Some(ip("127.0.0.2")));

    // Frozen, its TCP connection stays open: sshd keeps the session and its
    // listener until ClientAlive gives up on it.
    old.signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    let new = start(&[&t1]);
    let refused = wait_until(Duration::from_secs(5), || {
        failures(&new, "t1", "forward_refused") >= 1.0
    });
    assert!(
        refused,
        "the new instance was never refused while the frozen one's listener was held ({:?} after the freeze); \
         /readyz/tunnel/t1 = {:?}",
        frozen_at.elapsed(),
        readyz_tunnel(&new, "t1")
    );
    let took = frozen_at.elapsed() + wait_up(&new, &site.sshd, "t1", TAKEOVER_TIMEOUT);
    eprintln!("new instance up {took:?} after the old one froze");
    assert!(
        site.sshd.log_has("Timeout, client not responding"),
        "sshd should have dropped the frozen client by ClientAlive"
    );
    assert_eq!(reached(port), Some(ip("127.0.0.2")), "traffic through the new instance");
    assert!(
        wait_until(Duration::from_secs(5), || !new.audit("tunnel_conn_open").is_empty()),
        "the new instance did not carry the connection"
    );
}

#[test]
fn standby_takes_the_port_and_the_traffic_when_the_active_is_frozen() {
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let port = quiet_port();
    let t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    let active = start(&[&t1]);
    wait_up(&active, &site.sshd, "t1", UP_TIMEOUT);
    let standby = start(&[&t1]);

    // The standby is refused while the active holds the port, and retries.
    let retried = wait_until(Duration::from_secs(5), || {
        failures(&standby, "t1", "forward_refused") >= 2.0
    });
    assert!(
        retried,
        "standby: tunnel_failures_total{{reason=\"forward_refused\"}} = {} after 5 s, want >= 2",
        failures(&standby, "t1", "forward_refused")
    );
    let (code, body) = readyz_tunnel(&standby, "t1");
    assert_eq!(code, 503, "standby /readyz/tunnel/t1: {body}");
    assert!(body.contains("tunnel \"t1\""), "standby reason: {body:?}");
    assert_eq!(up_metric(&standby, "t1"), Some(0.0));
    assert_eq!(readyz_tunnel(&active, "t1").0, 200, "the active stays up");

    assert_eq!(reached(port), Some(ip("127.0.0.2")));
    assert!(
        wait_until(Duration::from_secs(5), || !active.audit("tunnel_conn_open").is_empty()),
        "the active did not carry the connection"
    );
    assert!(
        standby.audit("tunnel_conn_open").is_empty(),
        "the standby carried a connection"
    );

    active.signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    let took = wait_up(&standby, &site.sshd, "t1", TAKEOVER_TIMEOUT);
    eprintln!("standby up {took:?} after the active froze");
    assert_eq!(reached(port), Some(ip("127.0.0.2")), "traffic through the standby");
    assert!(
        wait_until(Duration::from_secs(5), || !standby.audit("tunnel_conn_open").is_empty()),
        "the standby did not carry the connection ({:?} after the freeze)",
        frozen_at.elapsed()
    );
}

#[test]
fn server_that_stops_answering_is_declared_dead_by_keepalive() {
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let port = quiet_port();
    let t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    let d = start(&[&t1]);
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);
    assert_eq!(reached(port), Some(ip("127.0.0.2")));
    let before = failures(&d, "t1", "keepalive");

    let client = tunnel_connection(&d, &site.sshd);
    let frozen = site.sshd.freeze_client(client);
    let frozen_at = Instant::now();
    let bound = KEEPALIVE * (KEEPALIVE_MAX + 1) + KEEPALIVE_MARGIN;
    let dead = wait_until(bound, || up_metric(&d, "t1") == Some(0.0));
    let took = frozen_at.elapsed();
    assert!(
        dead,
        "tunnel_up still {:?} {took:?} after the server froze (bound keepalive {KEEPALIVE:?} × \
         (keepalive_max {KEEPALIVE_MAX} + 1) + {KEEPALIVE_MARGIN:?} = {bound:?})",
        up_metric(&d, "t1")
    );
    eprintln!("dead server noticed {took:?} after the freeze");
    assert!(
        wait_until(Duration::from_secs(1), || failures(&d, "t1", "keepalive") > before),
        "tunnel_failures_total{{reason=\"keepalive\"}} did not rise: {}",
        d.get("/metrics").1
    );
    let (code, body) = readyz_tunnel(&d, "t1");
    assert_eq!(code, 503, "/readyz/tunnel/t1 with a dead server: {body}");
    assert!(
        body.contains("tunnel \"t1\""),
        "reason should name the tunnel: {body:?}"
    );
    assert_eq!(d.get("/readyz").0, 503);

    // Thawed, the stale session sees its client gone and frees the port: the tunnel comes back.
    site.sshd.thaw(&frozen);
    wait_up(&d, &site.sshd, "t1", TAKEOVER_TIMEOUT);
    assert_eq!(
        reached(port),
        Some(ip("127.0.0.2")),
        "traffic after the server recovered"
    );
}

#[test]
fn wrong_server_fingerprint_never_connects_and_leaves_other_roles_ready() {
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let dns = DnsServer::start();
    let port = quiet_port();
    let other = UserKey::generate(site.dir.path(), "not_the_host_key", "ed25519");
    let mut t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    t1.check = HostCheck::Fingerprint(other.fingerprint());
    // A bastion and a forward route in the same process.
    let lab = Lab::new();
    let user = lab.key("user_ed25519", "ed25519");
    lab.authorize(&[user.line("")]);
    let text = lab.config(
        &SshConfig::allowing(allow_host("db.jumpgate.test", &[5432])),
        dns.addr(),
    ) + "\n"
        + &route("fwd", &up.addr().to_string(), "keep")
        + "\n"
        + &t1.toml();
    let d = Daemon::start(&text);

    let mut listened = false;
    let retried = wait_until(Duration::from_secs(8), || {
        listened |= !listeners(port).is_empty();
        failures(&d, "t1", "host_key") >= 2.0
    });
    assert!(
        retried,
        "tunnel_failures_total{{reason=\"host_key\"}} = {} after 8 s, want >= 2 (counted and retried)",
        failures(&d, "t1", "host_key")
    );
    assert!(
        !listened && listeners(port).is_empty(),
        "sshd listened on the remote port: the tunnel connected"
    );
    assert!(
        !site.sshd.log_has("Accepted publickey"),
        "the tunnel authenticated to a server whose key does not match"
    );
    assert_eq!(up_metric(&d, "t1"), Some(0.0));
    let (code, body) = readyz_tunnel(&d, "t1");
    assert_eq!(code, 503, "/readyz/tunnel/t1: {body}");
    assert!(
        body.contains("tunnel \"t1\"") && body.to_lowercase().contains("host key"),
        "/readyz/tunnel/t1 should name the tunnel and the host key: {body:?}"
    );
    assert_eq!(d.get("/readyz").0, 503, "/readyz with the tunnel down");
    let (code, body) = d.get("/readyz/forward/fwd");
    assert_eq!(code, 200, "/readyz/forward/fwd unaffected by the down tunnel: {body}");
    assert!(
        wait_until(Duration::from_secs(5), || d.get("/readyz/ssh").0 == 200),
        "/readyz/ssh unaffected by the down tunnel: {:?}",
        d.get("/readyz/ssh")
    );
    let mut s = d.connect("fwd");
    assert_eq!(
        hello(&mut s),
        Some(ip("127.0.0.2")),
        "the forward route carries traffic"
    );
    let loud = d.stderr_lines().iter().any(|l| {
        let Ok(j) = serde_json::from_str::<serde_json::Value>(l) else {
            return false;
        };
        matches!(j["level"].as_str(), Some("WARN") | Some("ERROR")) && l.to_lowercase().contains("host key")
    });
    assert!(loud, "a host key mismatch should be logged at WARN or ERROR");
}

#[test]
fn known_hosts_with_the_key_is_accepted_and_without_it_refused() {
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let other = UserKey::generate(site.dir.path(), "not_the_host_key", "ed25519");
    let other_pub: Vec<&str> = other.public.split_whitespace().take(2).collect();
    let host = format!("[127.0.0.1]:{}", site.sshd.port());

    let with_key = site.known_hosts("kh_ok", &[site.sshd.known_hosts_line()]);
    let wrong_key = site.known_hosts("kh_wrong", &[format!("{host} {}", other_pub.join(" "))]);
    let other_host = site.known_hosts(
        "kh_other_host",
        &[format!("[127.0.0.1]:{} {}", quiet_port(), site.sshd.host_public_key())],
    );
    let (p_ok, p_wrong, p_other) = (quiet_port(), quiet_port(), quiet_port());
    let mut ok = site.tunnel("ok", vec![remote(p_ok, up.addr())]);
    ok.check = HostCheck::KnownHosts(with_key);
    let mut wrong = site.tunnel("wrong", vec![remote(p_wrong, up.addr())]);
    wrong.check = HostCheck::KnownHosts(wrong_key);
    let mut absent = site.tunnel("absent", vec![remote(p_other, up.addr())]);
    absent.check = HostCheck::KnownHosts(other_host);
    let d = start(&[&ok, &wrong, &absent]);

    wait_up(&d, &site.sshd, "ok", UP_TIMEOUT);
    assert_eq!(
        reached(p_ok),
        Some(ip("127.0.0.2")),
        "through the known_hosts-checked tunnel"
    );
    for (name, port) in [("wrong", p_wrong), ("absent", p_other)] {
        let counted = wait_until(Duration::from_secs(5), || failures(&d, name, "host_key") >= 1.0);
        assert!(
            counted,
            "tunnel {name}: no tunnel_failures_total{{reason=\"host_key\"}} within 5 s"
        );
        assert!(listeners(port).is_empty(), "tunnel {name} got its remote port");
        let (code, body) = readyz_tunnel(&d, name);
        assert_eq!(code, 503, "/readyz/tunnel/{name}: {body}");
        assert!(
            body.to_lowercase().contains("host key"),
            "/readyz/tunnel/{name}: {body:?}"
        );
    }
    assert_eq!(
        site.sshd.log().matches("Accepted publickey").count(),
        1,
        "only the tunnel with the right known_hosts should authenticate"
    );
}

#[test]
fn hashed_known_hosts_entry_is_accepted() {
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    // `ssh-keyscan -H` and HashKnownHosts write `|1|salt|hash` host fields.
    let kh = site.known_hosts("kh_hashed", &[site.sshd.known_hosts_line()]);
    let keygen = crate::support::ssh::program("ssh-keygen", "openssh-client");
    crate::support::ssh::run_ok(&keygen, &["-q", "-H", "-f", kh.to_str().expect("utf-8")]);
    let text = std::fs::read_to_string(&kh).expect("read hashed known_hosts");
    assert!(text.starts_with("|1|"), "ssh-keygen -H did not hash: {text:?}");
    let port = quiet_port();
    let mut t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    t1.check = HostCheck::KnownHosts(kh);
    let d = start(&[&t1]);
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);
    assert_eq!(reached(port), Some(ip("127.0.0.2")));
}

#[test]
fn ecdsa_and_rsa_identities_authenticate_too() {
    let dir = temp_dir("jumpgate-tunnel-");
    let ecdsa = UserKey::generate(dir.path(), "id_ecdsa", "ecdsa");
    let rsa = UserKey::generate(dir.path(), "id_rsa", "rsa");
    let sshd = Sshd::start(&[ecdsa.line(""), rsa.line("")]);
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let (p_ecdsa, p_rsa) = (quiet_port(), quiet_port());
    let tunnel = |name: &str, key: &UserKey, port: u16| Tunnel {
        name: name.to_string(),
        server: sshd.server(),
        user: sshd.user().to_string(),
        identity: key.path.clone(),
        check: HostCheck::Fingerprint(sshd.fingerprint()),
        remotes: vec![remote(port, up.addr())],
    };
    let (t_ecdsa, t_rsa) = (tunnel("ecdsa", &ecdsa, p_ecdsa), tunnel("rsa", &rsa, p_rsa));
    let d = start(&[&t_ecdsa, &t_rsa]);
    for (name, port) in [("ecdsa", p_ecdsa), ("rsa", p_rsa)] {
        wait_up(&d, &sshd, name, UP_TIMEOUT);
        assert_eq!(reached(port), Some(ip("127.0.0.2")), "through tunnel {name}");
    }
}

#[test]
fn key_the_server_refuses_counts_auth_and_is_retried() {
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let stranger = UserKey::generate(site.dir.path(), "not_authorized", "ed25519");
    let port = quiet_port();
    let mut t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    t1.identity = stranger.path.clone();
    let d = start(&[&t1]);

    let mut listened = false;
    let retried = wait_until(Duration::from_secs(8), || {
        listened |= !listeners(port).is_empty();
        failures(&d, "t1", "auth") >= 2.0
    });
    assert!(
        retried,
        "tunnel_failures_total{{reason=\"auth\"}} = {} after 8 s, want >= 2 (counted and retried)",
        failures(&d, "t1", "auth")
    );
    assert!(!listened, "the remote port listened without authentication");
    assert_eq!(failures(&d, "t1", "host_key"), 0.0, "the host key was right");
    let (code, body) = readyz_tunnel(&d, "t1");
    assert_eq!(code, 503, "/readyz/tunnel/t1: {body}");
    assert!(
        body.contains("tunnel \"t1\""),
        "/readyz/tunnel/t1 should name the tunnel: {body:?}"
    );
}

#[test]
fn server_named_in_dns_is_dialled() {
    let dns = DnsServer::start();
    dns.set_a("sshd", &[ip("127.0.0.1")], 30);
    let site = Site::new();
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let port = quiet_port();
    let mut t1 = site.tunnel("t1", vec![remote(port, up.addr())]);
    t1.server = format!("sshd.jumpgate.test:{}", site.sshd.port());
    let d = Daemon::start(&tunnel_config(&[&t1], Some(dns.addr()), ""));
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);
    assert_eq!(reached(port), Some(ip("127.0.0.2")));
}

#[test]
fn database_down_closes_that_channel_only_and_the_tunnel_stays_up() {
    let site = Site::new();
    let mut db = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let other = Upstream::bind(ip("127.0.0.3"), 0, Behavior::Echo).expect("bind");
    let (p_db, p_other) = (quiet_port(), quiet_port());
    let t1 = site.tunnel("t1", vec![remote(p_db, db.addr()), remote(p_other, other.addr())]);
    let d = start(&[&t1]);
    wait_up(&d, &site.sshd, "t1", UP_TIMEOUT);
    let (mut open, at) = reach(p_other).expect("connection through the other remote");
    assert_eq!(at, ip("127.0.0.3"));
    let reconnects_before = reconnects(&d, "t1");

    db.stop_listening();
    let mut refused = connect_remote(p_db, Duration::from_secs(5)).expect("sshd still accepts on the remote port");
    assert!(
        closed_within(&mut refused, Duration::from_secs(5)),
        "the connection to a refused database was not closed within 5 s"
    );
    assert_eq!(readyz_tunnel(&d, "t1").0, 200, "the tunnel stays ready");
    assert_eq!(up_metric(&d, "t1"), Some(1.0));
    assert!(
        d.audit("tunnel_down").is_empty(),
        "tunnel_down after a refused database: {:?}",
        d.audit("tunnel_down")
    );
    assert_eq!(reconnects(&d, "t1"), reconnects_before, "the tunnel reconnected");
    assert!(echoes(&mut open), "the other connection should still echo");

    db.resume_listening();
    assert_eq!(
        reached(p_db),
        Some(ip("127.0.0.2")),
        "a later connection works once the database is back"
    );
}

#[test]
fn remote_port_held_by_another_client_is_refused_then_taken_when_freed() {
    let site = Site::new();
    let ours = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let theirs = Upstream::bind(ip("127.0.0.3"), 0, Behavior::Echo).expect("bind");
    let (held, free) = (quiet_port(), quiet_port());
    let holder = site
        .sshd
        .remote_forward(
            &site.key,
            &format!("localhost:{held}:{}", theirs.addr()),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("ssh -R holder failed:\n{e}"));
    assert_eq!(reached(held), Some(ip("127.0.0.3")));

    // Two remotes, one of them held: the whole connection fails (as ssh's ExitOnForwardFailure).
    let t1 = site.tunnel("t1", vec![remote(free, ours.addr()), remote(held, ours.addr())]);
    let started = Instant::now();
    let d = start(&[&t1]);
    let mut was_up = false;
    let refused = wait_until(Duration::from_secs(5), || {
        was_up |= up_metric(&d, "t1") == Some(1.0);
        failures(&d, "t1", "forward_refused") >= 2.0
    });
    assert!(
        refused,
        "tunnel_failures_total{{reason=\"forward_refused\"}} = {} after 5 s, want >= 2 (counted and retried)",
        failures(&d, "t1", "forward_refused")
    );
    // It stays down while the port is held, without spinning.
    let came_up = wait_until(Duration::from_secs(3), || up_metric(&d, "t1") == Some(1.0));
    assert!(
        !was_up && !came_up,
        "tunnel_up was 1 while one of its remote ports was held"
    );
    let elapsed = started.elapsed();
    let tries = failures(&d, "t1", "forward_refused");
    // Backoff 0.5 s doubling, -20% jitter: attempts at >= 0, 0.4, 1.2, 2.8, 6.0, 12.4 s.
    let most = 1
        + (0..10)
            .filter(|&k| 0.4 * (2f64.powi(k + 1) - 1.0) <= elapsed.as_secs_f64())
            .count();
    assert!(
        tries <= most as f64 + 1.0,
        "{tries} forward_refused attempts in {elapsed:?}: the backoff is not respected (at most {most})"
    );
    let (code, body) = readyz_tunnel(&d, "t1");
    assert_eq!(code, 503, "/readyz/tunnel/t1 while refused: {body}");
    assert_eq!(reached(held), Some(ip("127.0.0.3")), "the holder keeps its port");

    // The holder goes away (SIGKILL: its FIN frees the port at once).
    holder.kill();
    let freed_at = Instant::now();
    let took = wait_up(&d, &site.sshd, "t1", TAKEOVER_TIMEOUT);
    eprintln!(
        "tunnel up {took:?} after the holder left ({:?} after start)",
        freed_at.duration_since(started)
    );
    assert_eq!(
        reached(held),
        Some(ip("127.0.0.2")),
        "the freed port now reaches our upstream"
    );
    assert_eq!(reached(free), Some(ip("127.0.0.2")));
}

// ------------------------------------------------------------------ config and CLI

/// A key pair for config tests (files only; nothing connects).
fn config_key(dir: &Path) -> PathBuf {
    let key = UserKey::generate(dir, "id_ed25519", "ed25519");
    key.path
}

#[test]
fn tunnel_without_host_key_check_is_a_config_error_with_the_hint() {
    let dir = temp_dir("jumpgate-tunnel-cfg-");
    let identity = config_key(dir.path());
    let text = format!(
        "[[tunnel]]\nname = \"t1\"\nserver = \"127.0.0.1:2222\"\nuser = \"fivetran\"\nidentity = \"{}\"\n\
         [[tunnel.remote]]\nlisten = \"localhost:11433\"\nconnect = \"127.0.0.1:1433\"\n",
        identity.display()
    );
    let cfg = ConfigDir::new(&text);
    let path = cfg.config_str();
    for cmd in ["check", "run"] {
        let ready = cfg.path().join("ready.json");
        let mut args = vec![cmd, "--config", &path];
        let ready_str = ready.to_str().expect("utf-8").to_string();
        if cmd == "run" {
            args.extend(["--ready-file", &ready_str]);
        }
        let (code, _, err) = run_cli(&args);
        assert_eq!(code, 1, "jumpgate {cmd}: exit code; stderr:\n{err}");
        for part in [
            path.as_str(),
            "[[tunnel]] #1",
            "\"t1\"",
            "server_fingerprint",
            "known_hosts",
            "ssh-keyscan",
            "ssh-keygen -lf -",
        ] {
            assert!(
                err.contains(part),
                "jumpgate {cmd}: stderr should contain {part:?}:\n{err}"
            );
        }
        assert!(!ready.exists(), "ready file written for a config that failed");
    }
}

#[test]
fn bad_remote_listen_is_a_config_error() {
    let dir = temp_dir("jumpgate-tunnel-cfg-");
    let identity = config_key(dir.path());
    let fingerprint = UserKey::load(&identity).fingerprint();
    for listen in ["localhost:99999", "localhost:port", "localhost:", "", "11433:localhost"] {
        let text = format!(
            "[[tunnel]]\nname = \"t1\"\nserver = \"127.0.0.1:2222\"\nuser = \"fivetran\"\nidentity = \"{}\"\n\
             server_fingerprint = \"{fingerprint}\"\n\
             [[tunnel.remote]]\nlisten = \"{listen}\"\nconnect = \"127.0.0.1:1433\"\n",
            identity.display()
        );
        let cfg = ConfigDir::new(&text);
        let path = cfg.config_str();
        let (code, _, err) = run_cli(&["check", "--config", &path]);
        assert_eq!(code, 1, "listen = {listen:?}: exit code; stderr:\n{err}");
        for part in [path.as_str(), "[[tunnel]] #1", "\"t1\"", "listen"] {
            assert!(
                err.contains(part),
                "listen = {listen:?}: stderr should contain {part:?}:\n{err}"
            );
        }
        if !listen.is_empty() {
            assert!(
                err.contains(listen),
                "listen = {listen:?}: stderr should quote the value:\n{err}"
            );
        }
    }
    // The same config is refused by `run`.
    let text = format!(
        "[[tunnel]]\nname = \"t1\"\nserver = \"127.0.0.1:2222\"\nuser = \"fivetran\"\nidentity = \"{}\"\n\
         server_fingerprint = \"{fingerprint}\"\n\
         [[tunnel.remote]]\nlisten = \"localhost:99999\"\nconnect = \"127.0.0.1:1433\"\n",
        identity.display()
    );
    let cfg = ConfigDir::new(&text);
    let ready = cfg.path().join("ready.json");
    let (code, _, err) = run_cli(&[
        "run",
        "--config",
        &cfg.config_str(),
        "--ready-file",
        ready.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 1, "run: exit code; stderr:\n{err}");
    assert!(!ready.exists(), "ready file written for a config that failed");
}

#[test]
fn setup_info_prints_what_the_service_form_needs() {
    let dir = temp_dir("jumpgate-tunnel-setup-");
    let id1 = dir.path().join("tunnel1_ed25519");
    let id2 = dir.path().join("tunnel2_ed25519");
    for id in [&id1, &id2] {
        let (code, out, err) = run_cli(&["keygen", "--type", "ed25519", "--out", id.to_str().expect("utf-8")]);
        assert_eq!(code, 0, "keygen: {out}\n{err}");
    }
    let pub1 = UserKey::load(&id1).public;
    let pub2 = UserKey::load(&id2).public;
    let key_of = |public: &str| public.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let fp = UserKey::load(&id1).fingerprint();
    let text = format!(
        "[[tunnel]]\nname = \"t1\"\nserver = \"127.0.0.1:2222\"\nuser = \"fivetran\"\nidentity = \"{}\"\n\
         server_fingerprint = \"{fp}\"\n\
         [[tunnel.remote]]\nlisten = \"localhost:11433\"\nconnect = \"127.0.0.1:1433\"\n\n\
         [[tunnel]]\nname = \"t2\"\nserver = \"127.0.0.1:2223\"\nuser = \"svc\"\nidentity = \"{}\"\n\
         server_fingerprint = \"{fp}\"\n\
         [[tunnel.remote]]\nlisten = \"12345\"\nconnect = \"127.0.0.1:5432\"\n",
        id1.display(),
        id2.display()
    );
    let cfg = ConfigDir::new(&text);
    let path = cfg.config_str();

    let (code, out, err) = run_cli(&["setup-info", "--config", &path]);
    assert_eq!(code, 0, "setup-info failed:\n{out}\n{err}");
    // Column alignment is free: runs of blanks count as one.
    let squeeze = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let lines: Vec<String> = out.lines().map(squeeze).collect();
    let has = |want: &str| lines.iter().any(|l| l.to_lowercase().starts_with(&want.to_lowercase()));
    let mut missing: Vec<String> = [
        "Host: localhost".to_string(),
        "Port: 11433".into(),
        "SSH host: 127.0.0.1:2222".into(),
        "SSH user: fivetran".into(),
        "Port: 12345".into(),
        "SSH host: 127.0.0.1:2223".into(),
        "SSH user: svc".into(),
        format!("public key: {}", key_of(&pub1)),
        format!("public key: {}", key_of(&pub2)),
    ]
    .into_iter()
    .filter(|want| !has(want))
    .collect();
    // t1's fields come before t2's.
    let t1_at = out.find("11433").expect("t1 port");
    let t2_at = out.find("12345").expect("t2 port");
    assert!(t1_at < t2_at, "tunnels out of order:\n{out}");
    assert!(
        out[..t2_at].contains(&key_of(&pub1)) && !out[..t2_at].contains(&key_of(&pub2)),
        "each tunnel's public key belongs with its own fields:\n{out}"
    );
    let text_out = out;

    let (code, out, err) = run_cli(&["setup-info", "--config", &path, "--json"]);
    assert_eq!(code, 0, "setup-info --json failed:\n{out}\n{err}");
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("setup-info --json is not JSON ({e}):\n{out}"));
    let mut leaves = Vec::new();
    json_leaves(&json, &mut leaves);
    let leaves: BTreeSet<String> = leaves.into_iter().collect();
    for want in [
        "t1",
        "t2",
        "localhost",
        "11433",
        "12345",
        "127.0.0.1:2222",
        "127.0.0.1:2223",
        "fivetran",
        "svc",
    ] {
        if !leaves.contains(want) {
            missing.push(format!("--json value {want:?}"));
        }
    }
    for public in [&pub1, &pub2] {
        let key = key_of(public);
        if !leaves.iter().any(|l| l.starts_with(&key)) {
            missing.push(format!("--json public key {key:?}"));
        }
    }
    assert!(
        missing.is_empty(),
        "setup-info lacks {missing:#?}\ntext output:\n{text_out}\njson output:\n{json:#}"
    );
}
