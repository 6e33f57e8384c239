//! The `[ssh]` role end to end: the real OpenSSH client (`ssh -W`, `ssh -N
//! -L`, `sftp`, `ssh-keyscan`, `ssh-keygen`) against the real daemon, with the
//! test's DNS server deciding where names point and echo / streaming
//! upstreams (or PostgreSQL) behind it. Every refusal has its own test, and
//! each such test would fail if that check were removed: the same request
//! succeeds when only the checked thing differs.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::daemon::run_cli;
use crate::support::dns::DnsServer;
use crate::support::pg::{ITEMS, Postgres, psql};
use crate::support::ssh::{
    Bastion, Lab, Ran, SshConfig, UserKey, Watched, allow_cidr, allow_host, keygen_fingerprints, parse_fingerprints,
    program, pub_path, run,
};
use crate::support::upstream::{
    Behavior, Concurrent, DOWN_SEED, Upstream, concurrent_clients, concurrent_received, hello,
};
use crate::support::{
    closed_within, echoes, hash_to_eof, ip, pattern_hash, read_line, send_pattern, wait_for, wait_until,
};

const DB: &str = "db.jumpgate.test";

/// The ciphers the server must offer (and nothing else).
const CIPHERS: [&str; 6] = [
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
];

/// What OpenSSH prints when a channel is refused by policy.
const PROHIBITED: &str = "open failed: administratively prohibited";

/// A bound for each one-shot ssh run.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// The usual world before the daemon starts: an echo upstream on 127.0.0.2,
/// `db.jumpgate.test` → 127.0.0.2 (TTL 1 s), and one authorized ed25519 key
/// without options (a test may rewrite `authorized_keys` before starting).
struct Prep {
    up: Upstream,
    dns: DnsServer,
    key: UserKey,
    lab: Lab,
}

impl Prep {
    fn new() -> Self {
        let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind 127.0.0.2");
        let dns = DnsServer::start();
        dns.set_a("db", &[ip("127.0.0.2")], 1);
        let lab = Lab::new();
        let key = lab.key("user_ed25519", "ed25519");
        lab.authorize(&[key.line("")]);
        Self { up, dns, key, lab }
    }

    /// Starts the daemon with the `[ssh]` section `ssh(upstream port)` builds.
    fn start(self, ssh: impl FnOnce(u16) -> SshConfig) -> World {
        let b = self.lab.start(&ssh(self.up.port()), self.dns.addr());
        World {
            up: self.up,
            dns: self.dns,
            key: self.key,
            b,
            lab: self.lab,
        }
    }
}

/// [`Prep`] with its daemon running.
struct World {
    up: Upstream,
    dns: DnsServer,
    key: UserKey,
    b: Bastion,
    lab: Lab,
}

impl World {
    fn start(ssh: impl FnOnce(u16) -> SshConfig) -> Self {
        Prep::new().start(ssh)
    }

    /// `db.jumpgate.test:<upstream port>`.
    fn db(&self) -> String {
        format!("{DB}:{}", self.up.port())
    }
}

/// `ssh -W target` with stdin at EOF: against an echo upstream, stdout is its
/// `hello from <ip>` line and the exit code 0.
fn probe(b: &Bastion, key: &UserKey, target: &str, extra: &[&str]) -> Ran {
    let mut args = vec!["-W", target];
    args.extend_from_slice(extra);
    run(b.ssh(key, &args), RUN_LIMIT)
}

/// Asserts that `ran` reached the echo upstream at `at`.
fn assert_reached(ran: &Ran, at: &str, what: &str) {
    assert!(
        ran.ok() && ran.stdout == format!("hello from {at}\n"),
        "{what}: expected to reach the echo upstream at {at}; got {ran:#?}"
    );
}

/// Asserts that `ran` authenticated, then had its channel refused by policy,
/// and that no byte reached an upstream.
fn assert_prohibited(ran: &Ran, what: &str) {
    assert!(
        !ran.ok() && ran.stdout.is_empty(),
        "{what}: expected a refusal, got {ran:#?}"
    );
    assert!(
        authenticated(&ran.stderr),
        "{what}: should fail after authentication, not before:\n{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains(PROHIBITED),
        "{what}: expected `{PROHIBITED}`:\n{}",
        ran.stderr
    );
}

/// Asserts that `ran` failed at authentication.
fn assert_auth_refused(ran: &Ran, what: &str) {
    assert!(
        !ran.ok() && ran.stdout.is_empty(),
        "{what}: expected authentication to fail, got {ran:#?}"
    );
    assert!(
        !authenticated(&ran.stderr),
        "{what}: authentication succeeded:\n{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("Permission denied"),
        "{what}: expected `Permission denied`:\n{}",
        ran.stderr
    );
}

/// Whether an `ssh -v` log says the client authenticated.
fn authenticated(stderr: &str) -> bool {
    stderr.contains("Authenticated to 127.0.0.1")
}

/// An open `ssh -W` channel to an echo upstream, driven through ssh's stdin and stdout.
struct StdioChannel {
    ssh: Watched,
}

impl StdioChannel {
    fn open(b: &Bastion, key: &UserKey, target: &str) -> (Self, IpAddr) {
        let mut ssh = b.stdio(key, target, &[], Duration::from_secs(60));
        let reached = hello(ssh.stdout.as_mut().expect("stdout"))
            .unwrap_or_else(|| panic!("no hello through ssh -W {target}; ssh stderr:\n{}", ssh.stderr()));
        (Self { ssh }, reached)
    }

    fn echoes(&mut self) -> bool {
        let mut pipes = Pipes {
            r: self.ssh.stdout.as_mut().expect("stdout"),
            w: self.ssh.stdin.as_mut().expect("stdin"),
        };
        echoes(&mut pipes)
    }

    /// Whether ssh's stdout reaches EOF (the channel closed) within `timeout`.
    fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut stdout = self.ssh.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(timeout).is_ok()
    }
}

/// A reader and a writer as one stream.
struct Pipes<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
}

impl<R: Read, W> Read for Pipes<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.r.read(buf)
    }
}

impl<R, W: Write> Write for Pipes<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// A port on 127.0.0.2 where nothing listens.
fn dead_port_on_127_0_0_2() -> u16 {
    let l = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2:0");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------- accepted

#[test]
fn ed25519_ecdsa_and_rsa_user_keys_each_carry_a_channel() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let keys: Vec<UserKey> = ["ed25519", "ecdsa", "rsa"]
        .iter()
        .map(|kind| lab.key(&format!("user_{kind}"), kind))
        .collect();
    lab.authorize(&keys.iter().map(|k| k.line("")).collect::<Vec<_>>());
    let b = lab.start(&SshConfig::allowing(allow_host(DB, &[up.port()])), dns.addr());
    let target = format!("{DB}:{}", up.port());

    for key in &keys {
        let ran = probe(&b, key, &target, &[]);
        assert_reached(&ran, "127.0.0.2", &format!("key {}", key.path.display()));
    }
    // The service's key is RSA: both SHA-2 signature algorithms must work.
    for alg in ["rsa-sha2-512", "rsa-sha2-256"] {
        let opt = format!("PubkeyAcceptedAlgorithms={alg}");
        let ran = probe(&b, &keys[2], &target, &["-o", &opt]);
        assert_reached(&ran, "127.0.0.2", &format!("RSA key signing with {alg}"));
    }
    assert_eq!(up.accepted(), 5);
}

/// The `peer server KEXINIT proposal` that `ssh -vv` logs: (field, list) pairs
/// such as ("ciphers ctos", ["aes128-ctr", ...]).
fn server_proposal(stderr: &str) -> Vec<(String, Vec<String>)> {
    stderr
        .lines()
        .skip_while(|l| !l.contains("peer server KEXINIT proposal"))
        .skip(1)
        .map_while(|l| {
            let l = l.strip_prefix("debug2: ")?;
            let (field, list) = l.split_once(": ")?;
            Some((field.to_string(), list.split(',').map(str::to_string).collect()))
        })
        .collect()
}

#[test]
fn every_offered_cipher_carries_a_channel_and_nothing_weak_is_offered() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let ran = probe(&w.b, &w.key, &w.db(), &["-vv"]);
    assert_reached(&ran, "127.0.0.2", "ssh -vv");
    let proposal = server_proposal(&ran.stderr);
    let field = |name: &str| {
        proposal
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, list)| list.clone())
            .unwrap_or_else(|| panic!("no `{name}` in the server's KEXINIT proposal:\n{}", ran.stderr))
    };
    for dir in ["ciphers ctos", "ciphers stoc"] {
        let offered: BTreeSet<String> = field(dir).into_iter().collect();
        let want: BTreeSet<String> = CIPHERS.iter().map(|c| c.to_string()).collect();
        assert_eq!(offered, want, "server's {dir}");
    }
    let kex = field("KEX algorithms");
    assert!(
        kex.iter().any(|k| k == "kex-strict-s-v00@openssh.com"),
        "strict kex (CVE-2023-48795) not offered: {kex:?}"
    );
    assert!(
        !kex.iter().any(|k| k.contains("sha1")),
        "a SHA-1 key exchange is offered: {kex:?}"
    );

    let client = run_ok_stdout(&program("ssh", "openssh-client"), &["-Q", "cipher"]);
    let client: BTreeSet<&str> = client.lines().map(str::trim).collect();
    let mut tested = 0;
    for cipher in CIPHERS.iter().filter(|c| client.contains(**c)) {
        let ran = probe(&w.b, &w.key, &w.db(), &["-c", cipher]);
        assert_reached(&ran, "127.0.0.2", &format!("cipher {cipher}"));
        assert!(
            ran.stderr.contains(&format!("kex: server->client cipher: {cipher} "))
                && ran.stderr.contains(&format!("kex: client->server cipher: {cipher} ")),
            "cipher {cipher} was not the one negotiated:\n{}",
            ran.stderr
        );
        tested += 1;
    }
    assert_eq!(tested, CIPHERS.len(), "this OpenSSH client lacks some of {CIPHERS:?}");
}

fn run_ok_stdout(program: &std::path::Path, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let ran = run(cmd, RUN_LIMIT);
    assert!(ran.ok(), "{} {args:?}: {ran:#?}", program.display());
    ran.stdout
}

#[test]
fn psql_through_ssh_local_forward_returns_the_rows() {
    let pg = Postgres::start();
    let dns = DnsServer::start();
    // PostgreSQL listens on 127.0.0.1 only: the name points there, and the
    // test's deny list leaves loopback reachable.
    dns.set_a("db", &[ip("127.0.0.1")], 30);
    let lab = Lab::new();
    let key = lab.key("user_rsa", "rsa");
    lab.authorize(&[key.line("")]);
    let b = lab.start(
        &SshConfig::allowing(allow_host("*.jumpgate.test", &[pg.port()])),
        dns.addr(),
    );

    let fwd = b.local_forward(&key, &[&format!("{DB}:{}", pg.port())], &[], Duration::from_secs(60));
    let rows = psql(fwd.ports[0], "select id, name from items order by id")
        .unwrap_or_else(|e| panic!("psql through ssh -L: {e}\nssh stderr:\n{}", fwd.ssh.stderr()));
    assert_eq!(rows, ITEMS);
    let big = psql(
        fwd.ports[0],
        "select count(*), sum(length(repeat('x', g))) from generate_series(1, 2000) g",
    )
    .unwrap_or_else(|e| panic!("psql through ssh -L: {e}"));
    assert_eq!(big, "2000|2001000");
}

#[test]
fn hundred_mib_each_way_through_one_channel_arrive_byte_exact() {
    const LEN: u64 = 100 * 1024 * 1024;
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Stream { down_len: LEN }).expect("bind");
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let key = lab.key("user_ed25519", "ed25519");
    lab.authorize(&[key.line("")]);
    let b = lab.start(&SshConfig::allowing(allow_host(DB, &[up.port()])), dns.addr());

    let started = Instant::now();
    let mut ssh = b.stdio(&key, &format!("{DB}:{}", up.port()), &[], Duration::from_secs(180));
    let mut stdin = ssh.stdin.take().expect("stdin");
    let sending = std::thread::spawn(move || {
        let sent = send_pattern(&mut stdin, 1, LEN);
        drop(stdin); // EOF: ssh sends the channel's EOF
        sent
    });
    let got_down = hash_to_eof(ssh.stdout.as_mut().expect("stdout")).expect("read ssh stdout");
    let sent_up = sending.join().expect("sender").expect("write 100 MiB to ssh stdin");
    eprintln!("100 MiB each way through one channel in {:?}", started.elapsed());

    assert_eq!(
        got_down,
        pattern_hash(DOWN_SEED, LEN),
        "downstream (len, hash) differs; ssh stderr:\n{}",
        ssh.stderr()
    );
    let got_up = wait_for(Duration::from_secs(10), || up.received().first().copied());
    assert_eq!(
        got_up,
        Some(sent_up),
        "upstream received (len, hash) differs from what was sent"
    );
    assert_eq!(ssh.wait(Duration::from_secs(10)), Some(0), "ssh -W exit");
}

/// An echo upstream reads only while it can write back: if the session's
/// loop waited for the database while the database waited for us to take its
/// echo (which needs the client's window adjust, read by that same loop),
/// the channel would stall for good (`docs/russh-flow-control.md`).
#[test]
fn sixty_four_mib_echoed_through_one_channel_come_back_byte_exact() {
    const LEN: u64 = 64 * 1024 * 1024;
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let key = lab.key("user_ed25519", "ed25519");
    lab.authorize(&[key.line("")]);
    let b = lab.start(&SshConfig::allowing(allow_host(DB, &[up.port()])), dns.addr());

    let started = Instant::now();
    let mut ssh = b.stdio(&key, &format!("{DB}:{}", up.port()), &[], Duration::from_secs(60));
    let mut stdout = ssh.stdout.take().expect("stdout");
    assert_eq!(
        hello(&mut stdout),
        Some(ip("127.0.0.2")),
        "no hello; ssh stderr:\n{}",
        ssh.stderr()
    );
    let mut stdin = ssh.stdin.take().expect("stdin");
    let sending = std::thread::spawn(move || {
        let sent = send_pattern(&mut stdin, 1, LEN);
        drop(stdin);
        sent
    });
    let echoed = hash_to_eof(&mut stdout).expect("read ssh stdout");
    let sent = sending.join().expect("sender");
    eprintln!("64 MiB echoed through one channel in {:?}", started.elapsed());
    assert!(
        matches!(sent, Ok(sent) if sent == echoed),
        "echoed (len, hash) {echoed:?}, sent {sent:?} (a stalled channel ends when ssh is killed at 60 s); \
         ssh stderr:\n{}",
        ssh.stderr()
    );
}

#[test]
fn fifty_channels_at_once_on_one_session_arrive_byte_exact() {
    const N: usize = 50;
    const REQUEST: u64 = 256 * 1024;
    const REPLY: u64 = 512 * 1024;
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::AnswerAfterEof { reply_len: REPLY }).expect("bind");
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let key = lab.key("user_ed25519", "ed25519");
    lab.authorize(&[key.line("")]);
    let b = lab.start(&SshConfig::allowing(allow_host(DB, &[up.port()])), dns.addr());
    let fwd = b.local_forward(&key, &[&format!("{DB}:{}", up.port())], &[], Duration::from_secs(120));
    let port = fwd.ports[0];

    let Concurrent {
        all_open,
        open_at_once,
        results,
    } = concurrent_clients(&up, N, REQUEST, REPLY, move || {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
        Ok(s)
    });
    assert!(
        all_open,
        "only {open_at_once} of {N} channels were open at once; ssh stderr:\n{}",
        fwd.ssh.stderr()
    );
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "client {i}: {r:?}; ssh stderr:\n{}", fwd.ssh.stderr());
    }
    let (got, want) = concurrent_received(&up, N, REQUEST);
    assert_eq!(got, want, "what the upstream received differs from what was sent");
    assert!(fwd.ssh.running(), "the ssh session ended");
}

// ---------------------------------------------------------------- refusals

#[test]
fn wrong_key_is_refused() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let stranger = w.lab.key("stranger", "ed25519");
    assert_auth_refused(&probe(&w.b, &stranger, &w.db(), &[]), "unknown key");
    assert_reached(&probe(&w.b, &w.key, &w.db(), &[]), "127.0.0.2", "authorized key");
    assert_eq!(w.up.accepted(), 1);
}

#[test]
fn from_mismatch_is_refused() {
    let prep = Prep::new();
    let outside = prep.lab.key("outside", "ed25519");
    let inside = prep.lab.key("inside", "ed25519");
    prep.lab.authorize(&[
        outside.line("from=\"10.0.0.0/8\""),
        inside.line("from=\"10.0.0.0/8,127.0.0.1\""),
    ]);
    let w = prep.start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    assert_auth_refused(&probe(&w.b, &outside, &w.db(), &[]), "from=10.0.0.0/8 from 127.0.0.1");
    assert_reached(
        &probe(&w.b, &inside, &w.db(), &[]),
        "127.0.0.2",
        "from= listing 127.0.0.1",
    );
    assert_eq!(w.up.accepted(), 1);
}

#[test]
fn expired_key_is_refused() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let expired = lab.key("expired", "ed25519");
    let valid = lab.key("valid", "ed25519");
    lab.authorize(&[
        expired.line("expiry-time=\"20200101\""),
        valid.line("expiry-time=\"20991231\""),
    ]);
    let b = lab.start(&SshConfig::allowing(allow_host(DB, &[up.port()])), dns.addr());
    let target = format!("{DB}:{}", up.port());
    assert_auth_refused(&probe(&b, &expired, &target, &[]), "expiry-time in 2020");
    assert_reached(&probe(&b, &valid, &target, &[]), "127.0.0.2", "expiry-time in 2099");
    assert_eq!(up.accepted(), 1);
}

#[test]
fn key_permitopen_mismatch_is_refused() {
    let (two, three) = Upstream::pair(Behavior::Echo);
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    dns.set_a("other", &[ip("127.0.0.3")], 30);
    let lab = Lab::new();
    let narrow = lab.key("narrow", "ed25519");
    lab.authorize(&[narrow.line(&format!("permitopen=\"other.jumpgate.test:{}\"", three.port()))]);
    let allow = allow_host(DB, &[two.port()]) + &allow_host("other.jumpgate.test", &[three.port()]);
    let b = lab.start(&SshConfig::allowing(allow), dns.addr());

    assert_prohibited(
        &probe(&b, &narrow, &format!("{DB}:{}", two.port()), &[]),
        "outside key permitopen",
    );
    assert_reached(
        &probe(&b, &narrow, &format!("other.jumpgate.test:{}", three.port()), &[]),
        "127.0.0.3",
        "inside key permitopen",
    );
    assert_eq!(two.accepted(), 0, "the refused target was reached");
}

#[test]
fn user_permitopen_mismatch_is_refused() {
    let (two, three) = Upstream::pair(Behavior::Echo);
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    dns.set_a("other", &[ip("127.0.0.3")], 30);
    let lab = Lab::new();
    let key = lab.key("user", "ed25519");
    lab.authorize(&[key.line("")]);
    let mut ssh =
        SshConfig::allowing(allow_host(DB, &[two.port()]) + &allow_host("other.jumpgate.test", &[three.port()]));
    ssh.user_permitopen = vec![format!("other.jumpgate.test:{}", three.port())];
    let b = lab.start(&ssh, dns.addr());

    assert_prohibited(
        &probe(&b, &key, &format!("{DB}:{}", two.port()), &[]),
        "outside user permitopen",
    );
    assert_reached(
        &probe(&b, &key, &format!("other.jumpgate.test:{}", three.port()), &[]),
        "127.0.0.3",
        "inside user permitopen",
    );
    assert_eq!(two.accepted(), 0, "the refused target was reached");
}

#[test]
fn port_outside_the_rule_is_refused() {
    let other = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    assert_prohibited(
        &probe(&w.b, &w.key, &format!("{DB}:{}", other.port()), &[]),
        "port not in the rule",
    );
    assert_reached(&probe(&w.b, &w.key, &w.db(), &[]), "127.0.0.2", "port in the rule");
    assert_eq!(other.accepted(), 0, "the refused port was reached");
}

#[test]
fn ip_literal_of_an_allowed_name_is_refused() {
    let (two, three) = Upstream::pair(Behavior::Echo);
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let key = lab.key("user", "ed25519");
    lab.authorize(&[key.line("")]);
    // The name is allowed; its address only by name. A cidr rule for another
    // address shows IP literals do match cidr rules.
    let allow = allow_host(DB, &[two.port()]) + &allow_cidr("127.0.0.3/32", &[three.port()]);
    let b = lab.start(&SshConfig::allowing(allow), dns.addr());

    assert_prohibited(
        &probe(&b, &key, &format!("127.0.0.2:{}", two.port()), &[]),
        "IP literal of db",
    );
    assert_reached(
        &probe(&b, &key, &format!("{DB}:{}", two.port()), &[]),
        "127.0.0.2",
        "the name",
    );
    assert_reached(
        &probe(&b, &key, &format!("127.0.0.3:{}", three.port()), &[]),
        "127.0.0.3",
        "cidr rule",
    );
    assert_eq!(two.accepted(), 1, "only the channel by name reaches 127.0.0.2");
}

#[test]
fn name_moved_into_deny_list_is_refused_while_the_session_is_up() {
    let (two, three) = Upstream::pair(Behavior::Echo);
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 1);
    let lab = Lab::new();
    let key = lab.key("user", "ed25519");
    lab.authorize(&[key.line("")]);
    let mut ssh = SshConfig::allowing(allow_host(DB, &[two.port()]));
    ssh.deny = vec!["127.0.0.3/32".into()];
    let b = lab.start(&ssh, dns.addr());

    let fwd = b.local_forward(&key, &[&format!("{DB}:{}", two.port())], &[], Duration::from_secs(60));
    let mut first = fwd.connect(0);
    assert_eq!(hello(&mut first), Some(ip("127.0.0.2")), "first channel");
    assert!(echoes(&mut first), "first channel echoes");

    dns.set_a("db", &[ip("127.0.0.3")], 1);
    let changed = Instant::now();
    // TTL 1 s: within a few seconds a new channel must be refused, and no
    // channel may ever reach the denied address.
    let refused = wait_until(Duration::from_secs(5), || {
        let mut s = fwd.connect(0);
        match hello(&mut s) {
            Some(a) if a == ip("127.0.0.3") => panic!("a channel reached the denied address 127.0.0.3"),
            Some(_) => false,
            None => true,
        }
    });
    assert!(
        refused,
        "new channels still open {:?} after the name moved into deny",
        changed.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(2), || fwd
            .open_failures("administratively prohibited")
            >= 1),
        "no `{PROHIBITED}` from ssh:\n{}",
        fwd.ssh.stderr()
    );
    assert_eq!(three.accepted(), 0, "the denied address was reached");
    assert!(fwd.ssh.running(), "the session ended after the refusal");
}

#[test]
fn session_stays_up_after_a_denied_channel() {
    let other = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let denied = format!("{DB}:{}", other.port());
    let fwd =
        w.b.local_forward(&w.key, &[&denied, &w.db()], &[], Duration::from_secs(60));

    let mut refused = fwd.connect(0);
    assert!(
        closed_within(&mut refused, Duration::from_secs(5)),
        "denied channel not closed"
    );
    assert!(
        wait_until(Duration::from_secs(2), || fwd
            .open_failures("administratively prohibited")
            == 1),
        "expected one `{PROHIBITED}`:\n{}",
        fwd.ssh.stderr()
    );
    assert!(fwd.ssh.running(), "the session ended after a denied channel");
    let mut allowed = fwd.connect(1);
    assert_eq!(
        hello(&mut allowed),
        Some(ip("127.0.0.2")),
        "allowed channel after a denied one"
    );
    assert!(echoes(&mut allowed));
    assert_eq!(other.accepted(), 0);
}

/// Asserts `ran` authenticated and then failed.
fn assert_failed_after_auth(ran: &Ran, what: &str) {
    assert!(
        ran.code.is_some_and(|c| c >= 0),
        "{what}: still running at the time limit: {ran:#?}"
    );
    assert!(!ran.ok(), "{what}: succeeded: {ran:#?}");
    assert!(
        authenticated(&ran.stderr),
        "{what}: should fail after authentication:\n{}",
        ran.stderr
    );
}

#[test]
fn exec_is_refused() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let mut cmd = w.b.ssh(&w.key, &[]);
    cmd.args(["echo", "exec-ran"]);
    let ran = run(cmd, RUN_LIMIT);
    assert_failed_after_auth(&ran, "ssh ... echo");
    assert!(!ran.stdout.contains("exec-ran"), "the command ran: {ran:#?}");
    let mut cmd = w.b.ssh(&w.key, &[]);
    cmd.arg("true");
    assert_failed_after_auth(&run(cmd, RUN_LIMIT), "ssh ... true");
}

#[test]
fn shell_is_refused() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let ran = run(w.b.ssh(&w.key, &["-tt"]), RUN_LIMIT);
    assert_failed_after_auth(&ran, "ssh -tt");
}

#[test]
fn sftp_is_refused() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let ran = run(w.b.sftp(&w.key, "ls /\n"), RUN_LIMIT);
    assert_failed_after_auth(&ran, "sftp -b");
    assert!(!ran.stdout.contains("sftp>"), "sftp got a session: {ran:#?}");
}

#[test]
fn remote_forward_is_refused() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let remote_port = crate::support::free_port();
    let spec = format!("127.0.0.1:{remote_port}:127.0.0.2:{}", w.up.port());
    let ran = run(
        w.b.ssh(&w.key, &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &spec]),
        RUN_LIMIT,
    );
    assert_failed_after_auth(&ran, "ssh -R");
    assert!(
        ran.stderr.contains("remote port forwarding failed"),
        "expected `remote port forwarding failed`:\n{}",
        ran.stderr
    );
    assert!(
        TcpStream::connect(("127.0.0.1", remote_port)).is_err(),
        "something listens on the port -R asked for"
    );
    assert_eq!(w.up.accepted(), 0);
}

#[test]
fn password_auth_fails() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let ran = probe(
        &w.b,
        &w.key,
        &w.db(),
        &[
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "PubkeyAuthentication=no",
        ],
    );
    assert_auth_refused(&ran, "password with BatchMode");
    assert_eq!(w.up.accepted(), 0);
}

#[test]
fn password_keyboard_interactive_and_none_are_refused_even_when_sent() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    // Sent whether or not the server advertises them.
    assert!(
        !russh_auth(&w.lab, &w.b, Attempt::None),
        "`none` authentication succeeded"
    );
    assert!(!russh_auth(&w.lab, &w.b, Attempt::Password), "a password was accepted");
    assert!(
        !russh_auth(&w.lab, &w.b, Attempt::KeyboardInteractive),
        "keyboard-interactive answers were accepted"
    );
    assert!(
        russh_auth(&w.lab, &w.b, Attempt::PublicKey(&w.key, None)),
        "the same russh client with the authorized key was refused"
    );
    // BatchMode=no with a forced askpass program, so the client really sends
    // a password (and keyboard-interactive answers) when the server asks.
    let log = w.lab.path().join("askpass.log");
    let askpass = w.lab.path().join("askpass");
    std::fs::write(
        &askpass,
        format!("#!/bin/sh\necho \"$1\" >> '{}'\necho hunter2\n", log.display()),
    )
    .expect("write askpass");
    std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for method in ["password", "keyboard-interactive"] {
        let pref = format!("PreferredAuthentications={method}");
        let mut cmd = w.b.ssh(
            &w.key,
            &[
                "-W",
                &w.db(),
                "-o",
                "BatchMode=no",
                "-o",
                &pref,
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "NumberOfPasswordPrompts=2",
            ],
        );
        cmd.env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0");
        let ran = run(cmd, RUN_LIMIT);
        assert_auth_refused(&ran, method);
        let advertised = ran
            .stderr
            .lines()
            .rev()
            .find_map(|l| l.split("Authentications that can continue: ").nth(1))
            .unwrap_or("")
            .to_string();
        eprintln!(
            "{method}: server advertises {advertised:?}; askpass log: {:?}",
            std::fs::read_to_string(&log).ok()
        );
        if advertised.split(',').any(|m| m == method) {
            // The server asked for it: the client answered, was refused
            // anyway, and the refusal is audited.
            assert!(
                log.exists(),
                "{method} advertised but askpass never ran:\n{}",
                ran.stderr
            );
            assert!(
                !w.b.daemon.audit("auth_failure").is_empty(),
                "{method} answer refused without an auth_failure audit line"
            );
        }
    }
    assert_eq!(w.up.accepted(), 0);
}

#[test]
fn rsa_key_offered_only_with_sha1_signatures_is_refused() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let key = lab.key("user_rsa", "rsa");
    lab.authorize(&[key.line("")]);
    let b = lab.start(&SshConfig::allowing(allow_host(DB, &[up.port()])), dns.addr());
    let target = format!("{DB}:{}", up.port());

    let ran = probe(
        &b,
        &key,
        &target,
        &[
            "-o",
            "PubkeyAcceptedAlgorithms=ssh-rsa",
            "-o",
            "HostKeyAlgorithms=+ssh-rsa",
        ],
    );
    assert_auth_refused(&ran, "RSA key with ssh-rsa (SHA-1) signatures only");
    assert_reached(
        &probe(&b, &key, &target, &[]),
        "127.0.0.2",
        "same RSA key with SHA-2 signatures",
    );
    assert_eq!(up.accepted(), 1);
}

/// A russh client that checks the server's host key against the lab's
/// `state_dir` public keys.
struct PinnedHostKey(Vec<russh::keys::PublicKey>);

impl russh::client::Handler for PinnedHostKey {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(
            matches!(key, russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } if self.0.iter().any(|k| k.key_data() == key.key_data())),
        )
    }
}

/// One authentication attempt made with russh's client, which sends what it
/// is told whatever the server advertises (OpenSSH's client does not).
enum Attempt<'a> {
    /// Public key `key`, signed with `hash` (for RSA, `None` is SHA-1 `ssh-rsa`).
    PublicKey(&'a UserKey, Option<russh::keys::HashAlg>),
    None,
    Password,
    /// Answers every prompt the server sends, for up to three rounds.
    KeyboardInteractive,
}

/// Whether `attempt` as user `fivetran` succeeds, on a new connection.
fn russh_auth(lab: &Lab, b: &Bastion, attempt: Attempt<'_>) -> bool {
    use russh::client::KeyboardInteractiveAuthResponse as Kbd;
    let pinned = lab
        .host_public_keys()
        .iter()
        .map(|k| russh::keys::PublicKey::from_openssh(k).expect("host public key"))
        .collect();
    let user = crate::support::ssh::USER;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let run = async {
            let config = Arc::new(russh::client::Config::default());
            let mut session = russh::client::connect(config, b.addr, PinnedHostKey(pinned))
                .await
                .expect("russh client connects and accepts the host key");
            match attempt {
                Attempt::PublicKey(key, hash) => {
                    let private = russh::keys::load_secret_key(&key.path, None).expect("load user key");
                    let key = russh::keys::PrivateKeyWithHashAlg::new(Arc::new(private), hash);
                    let result = session.authenticate_publickey(user, key).await;
                    result.is_ok_and(|r| r.success())
                }
                Attempt::None => session.authenticate_none(user).await.is_ok_and(|r| r.success()),
                Attempt::Password => session
                    .authenticate_password(user, "hunter2")
                    .await
                    .is_ok_and(|r| r.success()),
                Attempt::KeyboardInteractive => {
                    let mut reply = session.authenticate_keyboard_interactive_start(user, None).await;
                    for _ in 0..3 {
                        match reply {
                            Ok(Kbd::InfoRequest { prompts, .. }) => {
                                let answers = prompts.iter().map(|_| "hunter2".to_string()).collect();
                                reply = session.authenticate_keyboard_interactive_respond(answers).await;
                            }
                            _ => break,
                        }
                    }
                    matches!(reply, Ok(Kbd::Success))
                }
            }
        };
        tokio::time::timeout(RUN_LIMIT, run)
            .await
            .expect("russh authentication within the time limit")
    })
}

/// OpenSSH's client will not send a SHA-1 signature to a server that does not
/// advertise `ssh-rsa`; this client does, and the server must still refuse it.
#[test]
fn rsa_sha1_signature_sent_anyway_is_refused() {
    let dns = DnsServer::start();
    let lab = Lab::new();
    let key = lab.key("user_rsa", "rsa");
    lab.authorize(&[key.line("")]);
    let b = lab.start(&SshConfig::allowing(allow_host(DB, &[5432])), dns.addr());
    assert!(
        !russh_auth(&lab, &b, Attempt::PublicKey(&key, None)),
        "an ssh-rsa (SHA-1) signature was accepted"
    );
    assert!(
        russh_auth(&lab, &b, Attempt::PublicKey(&key, Some(russh::keys::HashAlg::Sha512))),
        "the same key signed with rsa-sha2-512 was refused"
    );
    assert!(
        wait_until(Duration::from_secs(2), || !b.daemon.audit("auth_failure").is_empty()),
        "the refused SHA-1 signature left no auth_failure audit line"
    );
    eprintln!("auth_failure: {:?}", b.daemon.audit("auth_failure"));
}

// ---------------------------------------------------------------- DNS changes

/// Opens a `-W` channel to db (→ 127.0.0.2), moves db to 127.0.0.3 and waits
/// until new channels reach 127.0.0.3. Returns the old channel and the world.
fn move_db_with_channel_open(on_change: &str) -> (StdioChannel, Upstream, Upstream, DnsServer, Bastion, Lab) {
    let (two, three) = Upstream::pair(Behavior::Echo);
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 1);
    let lab = Lab::new();
    let key = lab.key("user", "ed25519");
    lab.authorize(&[key.line("")]);
    let mut ssh = SshConfig::allowing(allow_host(DB, &[two.port()]));
    ssh.on_change = on_change.into();
    let b = lab.start(&ssh, dns.addr());
    let target = format!("{DB}:{}", two.port());

    let (mut old, reached) = StdioChannel::open(&b, &key, &target);
    assert_eq!(reached, ip("127.0.0.2"));
    assert!(old.echoes(), "the first channel echoes");
    dns.set_a("db", &[ip("127.0.0.3")], 1);
    let changed = Instant::now();
    let moved = wait_until(Duration::from_secs(6), || {
        let ran = probe(&b, &key, &target, &[]);
        ran.ok() && ran.stdout == "hello from 127.0.0.3\n"
    });
    assert!(
        moved,
        "new channels do not reach 127.0.0.3 {:?} after the change",
        changed.elapsed()
    );
    (old, two, three, dns, b, lab)
}

#[test]
fn on_change_close_closes_a_channel_whose_name_moved() {
    let (mut old, two, _three, _dns, _b, _lab) = move_db_with_channel_open("close");
    assert!(
        old.closed_within(Duration::from_secs(3)),
        "close: the channel to the old address is still open; ssh stderr:\n{}",
        old.ssh.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(2), || two.open() == 0),
        "close: the upstream connection on the old address is still open"
    );
}

#[test]
fn on_change_keep_leaves_a_channel_whose_name_moved() {
    let (mut old, two, _three, _dns, _b, _lab) = move_db_with_channel_open("keep");
    std::thread::sleep(Duration::from_millis(1500)); // what "close" would have used to act
    assert!(old.ssh.running(), "keep: ssh -W exited:\n{}", old.ssh.stderr());
    assert!(old.echoes(), "keep: the old channel no longer relays");
    assert_eq!(two.open(), 1, "keep: the upstream connection on the old address closed");
}

// ---------------------------------------------------------------- host keys and the CLI

/// `ssh-keyscan -p PORT -t TYPES 127.0.0.1` → `ssh-keygen -l -f FILE`.
fn keyscan(lab: &Lab, port: u16, types: &str) -> Vec<crate::support::ssh::Fingerprint> {
    let scan = run_ok_stdout(
        &program("ssh-keyscan", "openssh-client"),
        &["-T", "5", "-p", &port.to_string(), "-t", types, "127.0.0.1"],
    );
    let file = lab.path().join("keyscan");
    std::fs::write(&file, &scan).expect("write keyscan");
    let mut fps = keygen_fingerprints(&file);
    fps.sort();
    fps
}

#[test]
fn fingerprint_command_equals_ssh_keygen_of_what_ssh_keyscan_sees() {
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let seen = keyscan(&w.lab, w.b.port(), "ed25519,ecdsa");
    let kinds: BTreeSet<&str> = seen.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["ECDSA", "ED25519"]), "ssh-keyscan saw {seen:?}");

    let config = w
        .lab
        .write_config(&SshConfig::allowing(allow_host(DB, &[w.up.port()])), w.dns.addr());
    let (code, out, err) = run_cli(&["fingerprint", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "jumpgate fingerprint --config: {err}");
    let mut printed = parse_fingerprints(&out);
    printed.sort();
    assert_eq!(
        printed, seen,
        "jumpgate fingerprint --config vs ssh-keyscan | ssh-keygen -l"
    );

    // The same lines at start-up, before ready.
    let stderr = w.b.daemon.stderr_lines();
    for fp in &seen {
        assert!(
            stderr
                .iter()
                .any(|l| l.contains(&fp.hash) && l.contains(&format!("({})", fp.kind))),
            "no start-up line with {} ({})",
            fp.hash,
            fp.kind
        );
    }
    // --key, on each public and private host key file.
    for kind in ["ed25519", "ecdsa"] {
        let private = w.lab.state_dir().join(format!("ssh_host_{kind}_key"));
        for path in [pub_path(&private), private.clone()] {
            let (code, out, err) = run_cli(&["fingerprint", "--key", path.to_str().expect("utf-8")]);
            assert_eq!(code, 0, "jumpgate fingerprint --key {}: {err}", path.display());
            assert_eq!(
                parse_fingerprints(&out),
                keygen_fingerprints(&path),
                "jumpgate fingerprint --key vs ssh-keygen -l -f {}",
                path.display()
            );
        }
    }
}

#[test]
fn host_keys_persist_across_restarts_and_are_private_openssh_files() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let key = lab.key("user", "ecdsa");
    lab.authorize(&[key.line("")]);
    let ssh = SshConfig::allowing(allow_host(DB, &[up.port()]));
    let target = format!("{DB}:{}", up.port());

    let b = lab.start(&ssh, dns.addr());
    let first_scan = keyscan(&lab, b.port(), "ed25519,ecdsa");
    let keyfiles: Vec<(std::path::PathBuf, Vec<u8>)> = ["ed25519", "ecdsa"]
        .iter()
        .flat_map(|kind| {
            let private = lab.state_dir().join(format!("ssh_host_{kind}_key"));
            [pub_path(&private), private]
        })
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (p, bytes)
        })
        .collect();
    let keygen = program("ssh-keygen", "openssh-client");
    for kind in ["ed25519", "ecdsa"] {
        let private = lab.state_dir().join(format!("ssh_host_{kind}_key"));
        let mode = std::fs::metadata(&private).expect("stat host key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", private.display());
        let text = std::fs::read_to_string(&private).expect("read host key");
        assert!(
            text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
            "{} is not an OpenSSH private key",
            private.display()
        );
        // ssh-keygen derives the public key from the private file: it must
        // read it and agree with the .pub beside it.
        let derived = run_ok_stdout(&keygen, &["-y", "-f", private.to_str().expect("utf-8")]);
        let public = std::fs::read_to_string(pub_path(&private)).expect("read .pub");
        let blob = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(blob(&derived), blob(&public), "{kind}: private and .pub disagree");
        assert_eq!(keygen_fingerprints(&private).len(), 1);
    }
    let first_keys = lab.host_public_keys();
    drop(b);

    let b = lab.start(&ssh, dns.addr());
    assert_eq!(
        keyscan(&lab, b.port(), "ed25519,ecdsa"),
        first_scan,
        "host keys changed on restart"
    );
    for (path, bytes) in &keyfiles {
        assert_eq!(
            &std::fs::read(path).expect("read"),
            bytes,
            "{} rewritten on restart",
            path.display()
        );
    }
    // A client that trusts only the first run's keys connects to the second.
    b.write_known_hosts(&first_keys);
    assert_reached(&probe(&b, &key, &target, &[]), "127.0.0.2", "after restart");
}

#[test]
fn keygen_writes_openssh_key_pairs_that_ssh_uses() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let lab = Lab::new();
    let keygen = program("ssh-keygen", "openssh-client");
    let mut keys = Vec::new();
    for kind in ["ed25519", "ecdsa", "rsa"] {
        let out = lab.path().join(format!("made_{kind}"));
        let out_str = out.to_str().expect("utf-8");
        // RSA-4096 prime search in a debug build takes 2-10 s idle, more
        // under a parallel test run: a wider bound than run_cli's 30 s.
        let mut keygen_cmd = Command::new(crate::support::daemon::BIN);
        keygen_cmd
            .args(["keygen", "--type", kind, "--out", out_str])
            .env_remove("JUMPGATE_CONFIG")
            .env_remove("RUST_LOG");
        let started = Instant::now();
        let made = run(keygen_cmd, Duration::from_secs(120));
        eprintln!("jumpgate keygen --type {kind}: {:?}", started.elapsed());
        assert!(made.ok(), "jumpgate keygen --type {kind}: {made:#?}");
        let mode = std::fs::metadata(&out).expect("stat key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{kind}: private key mode {mode:o}");
        let derived = run_ok_stdout(&keygen, &["-y", "-f", out_str]);
        let key = UserKey::load(&out);
        let blob = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(
            blob(&derived),
            blob(&key.public),
            "{kind}: private key and .pub disagree"
        );
        let fps = keygen_fingerprints(&out);
        assert_eq!(fps[0].kind, kind.to_uppercase(), "{kind}: ssh-keygen -l says {fps:?}");
        let (code, printed, err) = run_cli(&["fingerprint", "--key", out_str]);
        assert_eq!(code, 0, "jumpgate fingerprint --key: {err}");
        assert_eq!(
            parse_fingerprints(&printed),
            fps,
            "{kind}: jumpgate fingerprint vs ssh-keygen -l"
        );
        keys.push(key);
    }
    lab.authorize(&keys.iter().map(|k| k.line("")).collect::<Vec<_>>());
    let b = lab.start(&SshConfig::allowing(allow_host(DB, &[up.port()])), dns.addr());
    for key in &keys {
        let ran = probe(&b, key, &format!("{DB}:{}", up.port()), &[]);
        assert_reached(&ran, "127.0.0.2", &format!("jumpgate-made key {}", key.path.display()));
    }
}

// ---------------------------------------------------------------- authorized_keys and readiness

#[test]
fn authorized_keys_line_with_an_unknown_option_is_skipped() {
    let prep = Prep::new();
    // The first line has an option we do not know, next to one we do: the
    // whole line is skipped, never half-honoured.
    let odd = prep.lab.key("odd", "ed25519");
    let db = format!("{DB}:{}", prep.up.port());
    prep.lab
        .authorize(&[odd.line(&format!("frobnicate,permitopen=\"{db}\"")), prep.key.line("")]);
    let w = prep.start(|port| SshConfig::allowing(allow_host(DB, &[port])));
    let b = &w.b;
    assert_auth_refused(&probe(b, &odd, &w.db(), &[]), "key on a line with an unknown option");
    assert_reached(&probe(b, &w.key, &w.db(), &[]), "127.0.0.2", "key on the next line");
    let file = w.lab.authorized_keys().display().to_string();
    let warned = b.daemon.stderr_lines().into_iter().find(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .map(|j| j["level"] == "WARN")
            .unwrap_or(false)
            && l.contains(&file)
    });
    let warned = warned.unwrap_or_else(|| panic!("no warning naming {file}"));
    assert!(
        warned.contains(&format!("{file}:1")) || warned.contains("\"line\":1"),
        "the warning should name line 1: {warned}"
    );
}

#[test]
fn readyz_ssh_is_503_without_any_user_key() {
    let dns = DnsServer::start();
    let lab = Lab::new();
    let odd = lab.key("odd", "ed25519");
    lab.authorize(&[odd.line("frobnicate")]);
    let b = lab.start_unready(&SshConfig::allowing(allow_host(DB, &[5432])), dns.addr());
    let (status, body) = b.daemon.get("/readyz/ssh");
    assert_eq!(status, 503, "/readyz/ssh with no usable user key: {body}");
    assert!(
        body.to_lowercase().contains("key"),
        "the reason should say a key is missing: {body:?}"
    );
}

// ---------------------------------------------------------------- limits

#[test]
fn allowed_sources_refuses_other_sources_before_any_ssh_byte() {
    let w = World::start(|port| {
        let mut c = SshConfig::allowing(allow_host(DB, &[port]));
        c.extra = "allowed_sources = [\"10.0.0.0/8\"]\n".into();
        c
    });
    let mut raw = TcpStream::connect(w.b.addr).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut got = Vec::new();
    let _ = raw.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "a refused source got bytes: {:?}",
        String::from_utf8_lossy(&got)
    );
    let ran = probe(&w.b, &w.key, &w.db(), &[]);
    assert!(
        !ran.ok() && !authenticated(&ran.stderr),
        "a refused source got in: {ran:#?}"
    );
    assert!(
        w.b.daemon
            .metric_or_zero("jumpgate_ssh_connections_total", &[("result", "source_refused")])
            >= 2.0,
        "source_refused not counted"
    );
    assert_eq!(w.up.accepted(), 0);
}

#[test]
fn login_grace_closes_a_silent_connection() {
    let w = World::start(|port| {
        let mut c = SshConfig::allowing(allow_host(DB, &[port]));
        c.extra = "login_grace = \"1s\"\n".into();
        c
    });
    let mut raw = TcpStream::connect(w.b.addr).expect("connect");
    let started = Instant::now();
    assert!(
        closed_within(&mut raw, Duration::from_secs(4)),
        "a silent connection outlived login_grace = 1s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed before login_grace"
    );
    assert!(
        wait_until(Duration::from_secs(2), || {
            w.b.daemon
                .metric_or_zero("jumpgate_ssh_connections_total", &[("result", "login_timeout")])
                >= 1.0
        }),
        "login_timeout not counted"
    );
}

#[test]
fn max_startups_drops_connections_beyond_the_limit() {
    let w = World::start(|port| {
        let mut c = SshConfig::allowing(allow_host(DB, &[port]));
        c.extra = "max_startups = 2\nlogin_grace = \"20s\"\n".into();
        c
    });
    let mut held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(w.b.addr).expect("connect")).collect();
    // Both are counted as unauthenticated once the server has greeted them.
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let banner = read_line(s).unwrap_or_default();
        assert!(banner.starts_with("SSH-2.0-"), "no banner: {banner:?}");
    }
    let mut third = TcpStream::connect(w.b.addr).expect("connect");
    assert!(
        closed_within(&mut third, Duration::from_secs(3)),
        "a third unauthenticated connection was kept"
    );
    for s in &mut held {
        assert!(
            !closed_within(s, Duration::from_millis(300)),
            "a connection within the limit was closed"
        );
    }
    assert!(
        w.b.daemon
            .metric_or_zero("jumpgate_ssh_connections_total", &[("result", "startups_full")])
            >= 1.0,
        "startups_full not counted"
    );
    drop(held);
    let ok = wait_until(Duration::from_secs(5), || probe(&w.b, &w.key, &w.db(), &[]).ok());
    assert!(ok, "no login possible after the held connections closed");
}

#[test]
fn max_auth_attempts_stops_a_client_offering_many_keys() {
    let w = World::start(|port| {
        let mut c = SshConfig::allowing(allow_host(DB, &[port]));
        c.extra = "max_auth_attempts = 3\n".into();
        c
    });
    let wrong: Vec<UserKey> = (0..5).map(|i| w.lab.key(&format!("wrong{i}"), "ed25519")).collect();
    // Five wrong keys first, the right one last.
    let mut extra: Vec<String> = Vec::new();
    for k in wrong.iter().skip(1) {
        extra.push("-i".into());
        extra.push(k.path.to_str().expect("utf-8").into());
    }
    extra.push("-i".into());
    extra.push(w.key.path.to_str().expect("utf-8").into());
    extra.push("-W".into());
    extra.push(w.db());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let ran = run(w.b.ssh(&wrong[0], &extra), RUN_LIMIT);
    assert!(
        !ran.ok() && !authenticated(&ran.stderr),
        "the sixth key got in: {ran:#?}"
    );
    assert_eq!(w.up.accepted(), 0);
    assert_reached(&probe(&w.b, &w.key, &w.db(), &[]), "127.0.0.2", "the right key alone");
}

#[test]
fn max_channels_per_session_refuses_one_more() {
    let w = World::start(|port| {
        let mut c = SshConfig::allowing(allow_host(DB, &[port]));
        c.extra = "max_channels_per_session = 2\n".into();
        c
    });
    let fwd = w.b.local_forward(&w.key, &[&w.db()], &[], Duration::from_secs(60));
    let mut first = fwd.connect(0);
    let mut second = fwd.connect(0);
    assert_eq!(hello(&mut first), Some(ip("127.0.0.2")));
    assert_eq!(hello(&mut second), Some(ip("127.0.0.2")));
    let mut third = fwd.connect(0);
    assert_eq!(
        hello(&mut third),
        None,
        "a third channel opened with max_channels_per_session = 2"
    );
    assert!(
        wait_until(Duration::from_secs(2), || fwd.ssh.stderr_has("open failed")),
        "no `open failed` for the third channel:\n{}",
        fwd.ssh.stderr()
    );
    assert_eq!(w.up.accepted(), 2);
    drop(first);
    let reopened = wait_until(Duration::from_secs(5), || hello(&mut fwd.connect(0)).is_some());
    assert!(reopened, "no channel possible after one closed");
    assert!(echoes(&mut second));
}

// ---------------------------------------------------------------- metrics and audit

#[test]
fn metrics_and_audit_lines_count_what_happened() {
    const UP: usize = 12_345;
    let denied_up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let dead = dead_port_on_127_0_0_2();
    let w = World::start(|port| SshConfig::allowing(allow_host(DB, &[port, dead])));
    let b = &w.b;

    // 1. A wrong key: one rejected authentication.
    let stranger = w.lab.key("stranger", "ed25519");
    assert_auth_refused(&probe(b, &stranger, &w.db(), &[]), "stranger");
    // 2. An allowed channel carrying known bytes each way.
    let mut ssh = b.stdio(&w.key, &w.db(), &[], Duration::from_secs(30));
    let payload = vec![b'x'; UP];
    let mut stdin = ssh.stdin.take().expect("stdin");
    stdin.write_all(&payload).expect("write");
    drop(stdin);
    let mut down = Vec::new();
    ssh.stdout
        .as_mut()
        .expect("stdout")
        .read_to_end(&mut down)
        .expect("read");
    let hello_len = "hello from 127.0.0.2\n".len();
    assert_eq!(down.len(), hello_len + UP, "echo through the channel");
    assert_eq!(ssh.wait(Duration::from_secs(10)), Some(0));
    // 3. A denied channel (port outside the rule).
    assert_prohibited(&probe(b, &w.key, &format!("{DB}:{}", denied_up.port()), &[]), "denied");
    // 4. An allowed channel whose upstream refuses.
    let ran = probe(b, &w.key, &format!("{DB}:{dead}"), &[]);
    assert!(
        !ran.ok() && ran.stderr.contains("open failed: connect failed"),
        "dead upstream: expected `open failed: connect failed`: {ran:#?}"
    );

    let m = |name: &str, labels: &[(&str, &str)]| b.daemon.metric_or_zero(name, labels);
    let settled = wait_until(Duration::from_secs(3), || {
        m("jumpgate_ssh_sessions_active", &[]) == 0.0 && m("jumpgate_ssh_channels_active", &[]) == 0.0
    });
    assert!(
        settled,
        "sessions_active {} channels_active {} after every client left",
        m("jumpgate_ssh_sessions_active", &[]),
        m("jumpgate_ssh_channels_active", &[])
    );
    assert_eq!(m("jumpgate_ssh_connections_total", &[("result", "accepted")]), 4.0);
    assert_eq!(m("jumpgate_ssh_auth_total", &[("result", "accepted")]), 3.0);
    assert!(
        m("jumpgate_ssh_auth_total", &[("result", "rejected")]) >= 1.0,
        "auth rejected not counted"
    );
    assert_eq!(m("jumpgate_ssh_channels_total", &[("result", "opened")]), 1.0);
    assert_eq!(m("jumpgate_ssh_channels_total", &[("result", "denied")]), 1.0);
    assert_eq!(m("jumpgate_ssh_channels_total", &[("result", "connect_failed")]), 1.0);
    let bytes = |dir: &str| {
        m(
            "jumpgate_relay_bytes_total",
            &[("role", "ssh"), ("name", "fivetran"), ("direction", dir)],
        )
    };
    let counted = wait_until(Duration::from_secs(3), || {
        bytes("up") == UP as f64 && bytes("down") == (hello_len + UP) as f64
    });
    assert!(
        counted,
        "relay_bytes_total up={} down={}, want {UP} and {}",
        bytes("up"),
        bytes("down"),
        hello_len + UP
    );

    let audit = |event: &str| b.daemon.audit(event);
    let opens = audit("session_open");
    assert_eq!(opens.len(), 3, "session_open lines: {opens:#?}");
    let fingerprint = w.key.fingerprint();
    for line in &opens {
        let text = line.to_string();
        assert!(
            text.contains("fivetran") && text.contains("127.0.0.1") && text.contains(&fingerprint),
            "session_open should carry user, peer and {fingerprint}: {text}"
        );
    }
    let failures = audit("auth_failure");
    assert!(
        failures.iter().any(|l| l.to_string().contains("127.0.0.1")),
        "auth_failure with the peer: {failures:#?}"
    );
    let channels = audit("channel_open");
    assert_eq!(channels.len(), 3, "channel_open lines: {channels:#?}");
    let find = |port: u16| {
        channels
            .iter()
            .find(|l| l.to_string().contains(&format!(":{port}")))
            .unwrap_or_else(|| panic!("no channel_open for port {port}: {channels:#?}"))
    };
    let opened = find(w.up.port());
    let denied = find(denied_up.port());
    assert!(
        opened.to_string().contains(DB),
        "channel_open should name the target: {opened}"
    );
    assert!(
        opened.to_string().contains(&format!("127.0.0.2:{}", w.up.port())),
        "channel_open should carry the resolved address: {opened}"
    );
    assert!(
        !opened["fields"]["decision"].is_null() && opened["fields"]["decision"] != denied["fields"]["decision"],
        "channel_open decisions should differ: opened {opened} denied {denied}"
    );
    let closes = wait_for(Duration::from_secs(3), || {
        let c = audit("channel_close");
        (!c.is_empty()).then_some(c)
    })
    .unwrap_or_default();
    assert!(
        closes.iter().any(|l| {
            let t = l.to_string();
            t.contains(&UP.to_string()) && t.contains(&(hello_len + UP).to_string())
        }),
        "channel_close should carry the bytes each way ({UP}, {}): {closes:#?}",
        hello_len + UP
    );
    assert_eq!(denied_up.accepted(), 0);
}
