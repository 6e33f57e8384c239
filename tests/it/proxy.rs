//! PROXY protocol v1/v2 on listeners, end to end: hand-built headers from a
//! raw TCP client, and HAProxy (`send-proxy-v2`, Debian's package) in front
//! of the SSH role with the real OpenSSH client behind it. The header's
//! source is what the audit log, `allowed_sources` and `from=` see; a
//! missing or broken header is refused and counted; a listener without
//! `proxy_protocol` passes a header through as data and trusts nothing in it.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::daemon::{Daemon, config, route};
use crate::support::ssh::{Bastion, Lab, Ran, SshConfig, UserKey, Watched, allow_cidr, program, run};
use crate::support::sshd::listeners;
use crate::support::upstream::{Behavior, Upstream};
use crate::support::{StreamHash, addr, free_port, pattern_fill, pattern_hash, read_line, wait_for, wait_until};

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A bound for each one-shot ssh run.
const RUN_LIMIT: Duration = Duration::from_secs(20);
/// The VPC endpoint id in the AWS TLV of a test header.
const VPCE: &str = "vpce-0a1b2c3d4e5f60718";

// ---------------------------------------------------------------- headers

/// `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n`.
fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A v2 PROXY (command 1) header over TCP with these TLVs (type, value).
fn v2(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x21
        }
        _ => panic!("mixed address families in a v2 header"),
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    for (kind, value) in tlvs {
        body.push(*kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    v2_raw(0x21, family, &body)
}

/// A v2 header with any version/command byte, family byte and body.
fn v2_raw(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(version_command);
    h.push(family);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

/// The AWS TLV (0xEA) carrying a VPC endpoint id (subtype 0x01).
fn aws_vpce_tlv(id: &str) -> (u8, Vec<u8>) {
    let mut value = vec![0x01];
    value.extend_from_slice(id.as_bytes());
    (0xEA, value)
}

// ---------------------------------------------------------------- raw clients

/// What the server did with a connection: closed it after sending these
/// bytes, or kept it open for the whole wait.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Closed(Vec<u8>),
    Open(Vec<u8>),
}

/// Reads `s` until the peer closes it (EOF or reset) or `timeout` passes.
fn until_close(s: &mut TcpStream, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..100_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).expect("set timeout");
        match s.read(&mut buf) {
            Ok(0) => return Outcome::Closed(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Outcome::Closed(got),
        }
    }
    Outcome::Open(got)
}

/// Connects to `to`, sends `bytes` (a write error counts: the server may
/// already have closed), and reports what the server did within `timeout`.
fn send_and_watch(to: SocketAddr, bytes: &[u8], timeout: Duration) -> Outcome {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {to}: {e}"));
    let _ = s.write_all(bytes);
    until_close(&mut s, timeout)
}

// ---------------------------------------------------------------- [[forward]]

/// A route `name` to `target` with `proxy_protocol = true`.
fn proxy_route(name: &str, target: &str) -> String {
    route(name, target, "keep") + "proxy_protocol = true\n"
}

/// Sends `header` and `len` bytes of pattern stream 1 in one write, then
/// EOF; returns the `got N` line of an [`Behavior::AnswerAfterEof`] upstream.
fn send_after_header(to: SocketAddr, header: &[u8], len: usize) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut bytes = header.to_vec();
    let start = bytes.len();
    bytes.resize(start + len, 0);
    pattern_fill(1, 0, &mut bytes[start..]);
    // One write: the payload right behind the header must not be eaten with it.
    s.write_all(&bytes).ok()?;
    s.shutdown(Shutdown::Write).ok()?;
    read_line(&mut s)
}

#[test]
fn forward_route_takes_the_client_address_from_v1_and_v2_headers() {
    const LEN: usize = 256 * 1024;
    let up = Upstream::bind([127, 0, 0, 2].into(), 0, Behavior::AnswerAfterEof { reply_len: 0 }).expect("bind");
    let d = Daemon::start(&config("", None, &proxy_route("pp", &up.addr().to_string())));
    let listen = d.forward("pp");
    let dst = addr(&format!("127.0.0.1:{}", listen.port()));
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("v1 TCP4", v1(addr("127.0.0.77:4242"), dst), "127.0.0.77:4242", "-"),
        (
            "v1 TCP6",
            v1(addr("[::1]:4343"), addr(&format!("[::1]:{}", listen.port()))),
            "[::1]:4343",
            "-",
        ),
        ("v2 TCP4", v2(addr("127.0.0.78:4444"), dst, &[]), "127.0.0.78:4444", "-"),
        (
            "v2 TCP4 with the AWS VPC endpoint TLV",
            v2(addr("127.0.0.79:4545"), dst, &[aws_vpce_tlv(VPCE)]),
            "127.0.0.79:4545",
            VPCE,
        ),
        (
            "v2 TCP6",
            v2(addr("[::1]:4646"), addr(&format!("[::1]:{}", listen.port())), &[]),
            "[::1]:4646",
            "-",
        ),
    ];
    for (i, (what, header, client, vpce)) in cases.iter().enumerate() {
        let got = send_after_header(listen, header, LEN);
        assert_eq!(
            got.as_deref(),
            Some(format!("got {LEN}").as_str()),
            "{what}: upstream's answer"
        );
        let received = wait_for(Duration::from_secs(5), || {
            let r = up.received();
            (r.len() > i).then(|| r[i])
        });
        assert_eq!(
            received,
            Some(pattern_hash(1, LEN as u64)),
            "{what}: the payload after the header must reach the upstream intact"
        );
        let line = wait_for(Duration::from_secs(5), || {
            d.audit("forward_open")
                .into_iter()
                .find(|l| l["fields"]["client"] == *client)
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: no forward_open with client={client}: {:#?}",
                d.audit("forward_open")
            )
        });
        assert_eq!(line["fields"]["route"], "pp", "{what}: {line}");
        assert_eq!(line["fields"]["vpc_endpoint"], *vpce, "{what}: {line}");
        let closed = wait_for(Duration::from_secs(5), || {
            d.audit("forward_close")
                .into_iter()
                .find(|l| l["fields"]["client"] == *client)
        });
        assert!(closed.is_some(), "{what}: no forward_close with client={client}");
    }
    assert!(
        d.audit("forward_open")
            .iter()
            .all(|l| !l["fields"]["client"].as_str().unwrap_or("").starts_with("127.0.0.1:")),
        "the socket's own peer address must not be logged: {:#?}",
        d.audit("forward_open")
    );
    let n = cases.len() as f64;
    assert_eq!(
        d.metric_or_zero(
            "jumpgate_forward_connections_total",
            &[("route", "pp"), ("result", "ok")]
        ),
        n
    );
    assert_eq!(
        d.metric_or_zero(
            "jumpgate_forward_connections_total",
            &[("route", "pp"), ("result", "proxy_rejected")]
        ),
        0.0
    );
}

#[test]
fn forward_route_refuses_and_counts_a_missing_or_broken_header() {
    let up = Upstream::bind([127, 0, 0, 2].into(), 0, Behavior::Echo).expect("bind");
    let d = Daemon::start(&config("", None, &proxy_route("pp", &up.addr().to_string())));
    let listen = d.forward("pp");
    let dst = addr(&format!("127.0.0.1:{}", listen.port()));

    // A client that sends nothing is dropped when the 5 s header wait runs out.
    let silent_since = Instant::now();
    let mut silent = TcpStream::connect(listen).expect("connect");

    let mut long_v1 = b"PROXY TCP4 ".to_vec();
    long_v1.resize(200, b'1');
    let good_v2 = v2(addr("127.0.0.77:4242"), dst, &[]);
    let mut bad_family = good_v2.clone();
    bad_family[13] = 0x11 | 0x40; // an address family that does not exist
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "no header, database bytes",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f".to_vec(),
        ),
        ("no header, text", b"hello upstream\r\n".to_vec()),
        (
            "v1 with a bad address",
            b"PROXY TCP4 127.0.0.1 notanip 1 2\r\n".to_vec(),
        ),
        (
            "v1 with a port out of range",
            b"PROXY TCP4 127.0.0.1 127.0.0.1 65536 80\r\n".to_vec(),
        ),
        (
            "v1 with an IPv6 source under TCP4",
            b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n".to_vec(),
        ),
        ("v1 longer than 107 bytes", long_v1),
        ("v2 with version 3", v2_raw(0x31, 0x11, &good_v2[16..])),
        ("v2 with an unknown family", bad_family),
        (
            "v2 with a body too short for its family",
            v2_raw(0x21, 0x11, &[127, 0, 0, 1]),
        ),
    ];
    for (what, bytes) in &cases {
        let outcome = send_and_watch(listen, bytes, Duration::from_secs(3));
        assert_eq!(
            outcome,
            Outcome::Closed(Vec::new()),
            "{what}: must be closed at once, nothing sent"
        );
    }
    // A header cut short by the client's EOF.
    let mut cut = TcpStream::connect(listen).expect("connect");
    cut.write_all(&good_v2[..20]).expect("write");
    cut.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(
        until_close(&mut cut, Duration::from_secs(3)),
        Outcome::Closed(Vec::new()),
        "a truncated v2 header"
    );

    assert_eq!(
        until_close(&mut silent, Duration::from_secs(8)),
        Outcome::Closed(Vec::new()),
        "a silent client"
    );
    let waited = silent_since.elapsed();
    assert!(
        waited >= Duration::from_millis(4500),
        "a silent client was dropped after {waited:?}, before the 5 s header wait"
    );

    let refused = cases.len() as f64 + 2.0;
    let counted = wait_until(Duration::from_secs(2), || {
        d.metric_or_zero(
            "jumpgate_forward_connections_total",
            &[("route", "pp"), ("result", "proxy_rejected")],
        ) == refused
    });
    assert!(
        counted,
        "forward_connections_total{{result=proxy_rejected}} = {:?}, expected {refused}",
        d.metric(
            "jumpgate_forward_connections_total",
            &[("route", "pp"), ("result", "proxy_rejected")]
        )
    );
    assert_eq!(
        d.metric_or_zero("jumpgate_proxy_protocol_rejected_total", &[("listener", "forward/pp")]),
        refused
    );
    assert_eq!(up.accepted(), 0, "no refused connection may reach the upstream");
    assert!(d.audit("forward_open").is_empty(), "{:#?}", d.audit("forward_open"));

    // The same route still serves a client with a good header.
    let mut s = TcpStream::connect(listen).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(&good_v2).expect("write header");
    assert_eq!(read_line(&mut s).as_deref(), Some("hello from 127.0.0.2"));
}

#[test]
fn a_listener_without_proxy_protocol_passes_a_header_through_as_data() {
    const LEN: usize = 64 * 1024;
    let up = Upstream::bind([127, 0, 0, 2].into(), 0, Behavior::AnswerAfterEof { reply_len: 0 }).expect("bind");
    let d = Daemon::start(&config("", None, &route("plain", &up.addr().to_string(), "keep")));
    let listen = d.forward("plain");
    let headers = [
        ("v1", v1(addr("127.0.0.77:4242"), listen)),
        ("v2", v2(addr("127.0.0.78:4343"), listen, &[aws_vpce_tlv(VPCE)])),
    ];
    for (i, (what, header)) in headers.iter().enumerate() {
        let got = send_after_header(listen, header, LEN);
        let total = header.len() + LEN;
        assert_eq!(got, Some(format!("got {total}")), "{what}: the header is data here");
        let mut expected = StreamHash::default();
        expected.update(header);
        let mut payload = vec![0u8; LEN];
        pattern_fill(1, 0, &mut payload);
        expected.update(&payload);
        let received = wait_for(Duration::from_secs(5), || {
            let r = up.received();
            (r.len() > i).then(|| r[i])
        });
        assert_eq!(
            received,
            Some(expected.finish()),
            "{what}: the upstream must receive the header bytes and the payload"
        );
    }
    let opens = wait_for(Duration::from_secs(5), || {
        let lines = d.audit("forward_open");
        (lines.len() >= 2).then_some(lines)
    })
    .expect("two forward_open lines");
    for l in &opens {
        let client = l["fields"]["client"].as_str().unwrap_or_default();
        assert!(
            client.starts_with("127.0.0.1:"),
            "a header on a plain listener must not be trusted: {l}"
        );
        assert_eq!(l["fields"]["vpc_endpoint"], "-", "{l}");
    }
    assert_eq!(
        d.metric_or_zero(
            "jumpgate_proxy_protocol_rejected_total",
            &[("listener", "forward/plain")]
        ),
        0.0
    );
}

// ---------------------------------------------------------------- [ssh]

/// An echo upstream on 127.0.0.2, a lab with `plain` (no options) and
/// `from12` (`from="127.0.0.12"`) authorized, and the daemon with
/// `proxy_protocol = true` and `allowed_sources` 127.0.0.9 and 127.0.0.12.
struct ProxiedSsh {
    up: Upstream,
    _lab: Lab,
    plain: UserKey,
    from12: UserKey,
    b: Bastion,
}

impl ProxiedSsh {
    fn start() -> Self {
        let up = Upstream::bind([127, 0, 0, 2].into(), 0, Behavior::Echo).expect("bind 127.0.0.2");
        let lab = Lab::new();
        let plain = lab.key("plain_ed25519", "ed25519");
        let from12 = lab.key("from12_ed25519", "ed25519");
        lab.authorize(&[plain.line(""), from12.line("from=\"127.0.0.12\"")]);
        let ssh = SshConfig {
            extra: "proxy_protocol = true\nallowed_sources = [\"127.0.0.9/32\", \"127.0.0.12/32\"]\n".into(),
            ..SshConfig::allowing(allow_cidr("127.0.0.2/32", &[up.port()]))
        };
        let b = lab.start(&ssh, addr("127.0.0.1:9"));
        Self {
            up,
            _lab: lab,
            plain,
            from12,
            b,
        }
    }

    fn target(&self) -> String {
        self.up.addr().to_string()
    }
}

/// `session_open` / `auth_failure` / `connection_refused` audit lines whose peer is `ip:*`.
fn audit_from(d: &Daemon, event: &str, ip: &str) -> Vec<serde_json::Value> {
    let prefix = format!("{ip}:");
    d.audit(event)
        .into_iter()
        .filter(|l| l["fields"]["peer"].as_str().is_some_and(|p| p.starts_with(&prefix)))
        .collect()
}

/// [`audit_from`], waiting up to 5 s for at least `n` lines (audit lines
/// reach the daemon's stderr reader a moment after the effect they record).
fn wait_audit_from(d: &Daemon, event: &str, ip: &str, n: usize) -> Vec<serde_json::Value> {
    wait_for(Duration::from_secs(5), || {
        let lines = audit_from(d, event, ip);
        (lines.len() >= n).then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "expected {n} {event} line(s) with peer {ip}:*; got {:#?}",
            d.audit(event)
        )
    })
}

#[test]
fn ssh_allowed_sources_uses_the_header_address() {
    let w = ProxiedSsh::start();
    let to = w.b.addr;
    let dst = addr(&format!("127.0.0.1:{}", to.port()));
    for (what, header) in [
        ("v1 from 127.0.0.9", v1(addr("127.0.0.9:50001"), dst)),
        (
            "v2 from 127.0.0.9",
            v2(addr("127.0.0.9:50002"), dst, &[aws_vpce_tlv(VPCE)]),
        ),
    ] {
        let mut s = TcpStream::connect(to).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.write_all(&header).expect("write header");
        let banner = read_line(&mut s);
        assert!(
            banner.as_deref().is_some_and(|b| b.starts_with("SSH-2.0-")),
            "{what}: admitted, the server's banner must come: {banner:?}"
        );
    }
    for (what, header) in [
        ("v1 from 127.0.0.10", v1(addr("127.0.0.10:50003"), dst)),
        ("v2 from 127.0.0.10", v2(addr("127.0.0.10:50004"), dst, &[])),
    ] {
        assert_eq!(
            send_and_watch(to, &header, Duration::from_secs(3)),
            Outcome::Closed(Vec::new()),
            "{what}: refused before any SSH byte"
        );
    }
    let counted = wait_until(Duration::from_secs(2), || {
        w.b.daemon
            .metric_or_zero("jumpgate_ssh_connections_total", &[("result", "source_refused")])
            == 2.0
    });
    assert!(
        counted,
        "ssh_connections_total{{result=source_refused}} = {:?}, expected 2",
        w.b.daemon
            .metric("jumpgate_ssh_connections_total", &[("result", "source_refused")])
    );
    let refused = wait_audit_from(&w.b.daemon, "connection_refused", "127.0.0.10", 2);
    assert_eq!(
        refused.len(),
        2,
        "connection_refused lines for 127.0.0.10: {refused:#?}"
    );
    assert!(
        audit_from(&w.b.daemon, "connection_refused", "127.0.0.9").is_empty(),
        "127.0.0.9 is allowed"
    );
    // The header itself is audited: the load balancer's address, the client's, the VPC endpoint.
    let line = wait_for(Duration::from_secs(5), || {
        w.b.daemon
            .audit("proxy_header")
            .into_iter()
            .find(|l| l["fields"]["client"] == "127.0.0.9:50002")
    })
    .unwrap_or_else(|| {
        panic!(
            "no proxy_header line for 127.0.0.9:50002: {:#?}",
            w.b.daemon.audit("proxy_header")
        )
    });
    assert_eq!(line["fields"]["vpc_endpoint"], VPCE, "{line}");
    assert!(
        line["fields"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "peer is the socket's address: {line}"
    );
}

#[test]
fn ssh_listener_refuses_and_counts_a_missing_or_broken_header() {
    let w = ProxiedSsh::start();
    let to = w.b.addr;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an SSH client banner, no header", b"SSH-2.0-OpenSSH_9.2p1\r\n".to_vec()),
        ("v1 with a bad address", b"PROXY TCP4 127.0.0.9 nope 1 22\r\n".to_vec()),
        (
            "v2 with version 3",
            v2_raw(0x31, 0x11, &[127, 0, 0, 9, 127, 0, 0, 1, 0, 1, 0, 22]),
        ),
    ];
    for (what, bytes) in &cases {
        assert_eq!(
            send_and_watch(to, bytes, Duration::from_secs(3)),
            Outcome::Closed(Vec::new()),
            "{what}: dropped before the server's banner"
        );
    }
    // The real client straight to the listener, without a header, gets nowhere.
    let ran = run(w.b.ssh(&w.plain, &["-W", &w.target()]), RUN_LIMIT);
    assert!(
        !ran.ok() && ran.stdout.is_empty() && !ran.stderr.contains("Authenticated to"),
        "ssh without a PROXY header: {ran:#?}"
    );
    let refused = cases.len() as f64 + 1.0;
    let counted = wait_until(Duration::from_secs(2), || {
        w.b.daemon
            .metric_or_zero("jumpgate_ssh_connections_total", &[("result", "proxy_rejected")])
            == refused
    });
    assert!(
        counted,
        "ssh_connections_total{{result=proxy_rejected}} = {:?}, expected {refused}",
        w.b.daemon
            .metric("jumpgate_ssh_connections_total", &[("result", "proxy_rejected")])
    );
    assert_eq!(
        w.b.daemon
            .metric_or_zero("jumpgate_proxy_protocol_rejected_total", &[("listener", "ssh")]),
        refused
    );
    assert!(w.b.daemon.audit("session_open").is_empty());
    assert_eq!(w.up.accepted(), 0);
}

// ---------------------------------------------------------------- HAProxy in front

/// HAProxy in TCP mode on a free port of 127.0.0.1, sending a PROXY v2
/// header to `backend` on each connection. Killed on drop.
struct Haproxy {
    process: Watched,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(backend: SocketAddr) -> Self {
        let haproxy = program("haproxy", "haproxy");
        let dir = tempfile::Builder::new()
            .prefix("jumpgate-haproxy-")
            .tempdir()
            .expect("temp dir");
        let cfg: PathBuf = dir.path().join("haproxy.cfg");
        let mut last = String::new();
        // A port free a moment ago can be taken meanwhile: try a few.
        for _ in 0..3 {
            let port = free_port();
            std::fs::write(
                &cfg,
                format!(
                    "global\n    maxconn 256\n\n\
                     defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
                     frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n\n\
                     backend be\n    server s1 {backend} send-proxy-v2\n"
                ),
            )
            .expect("write haproxy.cfg");
            let mut cmd = Command::new(&haproxy);
            cmd.arg("-db").arg("-f").arg(&cfg);
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            let process = Watched::spawn(cmd, Duration::from_secs(120));
            let up = wait_for(Duration::from_secs(10), || {
                if process.exited().is_some() {
                    return Some(false);
                }
                listeners(port)
                    .contains(&SocketAddr::from(([127, 0, 0, 1], port)))
                    .then_some(true)
            });
            match up {
                Some(true) => {
                    return Self {
                        process,
                        port,
                        _dir: dir,
                    };
                }
                Some(false) => {
                    process.wait(Duration::from_secs(2));
                    last = process.stderr();
                }
                None => panic!(
                    "haproxy did not listen on 127.0.0.1:{port} within 10 s:\n{}",
                    process.stderr()
                ),
            }
        }
        panic!("haproxy could not start in 3 tries:\n{last}")
    }
}

/// `ssh -W target` through HAProxy, from source address `from`.
fn via_haproxy(w: &ProxiedSsh, h: &Haproxy, key: &UserKey, from: &str) -> Ran {
    let port = format!("Port={}", h.port);
    // known_hosts names the daemon's own [127.0.0.1]:PORT.
    let alias = format!("HostKeyAlias=[127.0.0.1]:{}", w.b.port());
    let target = w.target();
    run(
        w.b.ssh(key, &["-W", &target, "-b", from, "-o", &port, "-o", &alias]),
        RUN_LIMIT,
    )
}

#[test]
fn haproxy_send_proxy_v2_gives_ssh_the_real_client_address() {
    let w = ProxiedSsh::start();
    let h = Haproxy::start(w.b.addr);
    let d = &w.b.daemon;

    let ran = via_haproxy(&w, &h, &w.plain, "127.0.0.9");
    assert!(
        ran.ok() && ran.stdout == "hello from 127.0.0.2\n",
        "ssh -W through HAProxy from 127.0.0.9: {ran:#?}"
    );
    let opened = wait_audit_from(d, "session_open", "127.0.0.9", 1);
    assert_eq!(
        opened.len(),
        1,
        "session_open with peer 127.0.0.9: {:#?}",
        d.audit("session_open")
    );
    assert!(
        audit_from(d, "session_open", "127.0.0.1").is_empty(),
        "HAProxy's own address must not be the peer: {:#?}",
        d.audit("session_open")
    );

    // allowed_sources sees the address HAProxy saw: 127.0.0.10 is not in it.
    let ran = via_haproxy(&w, &h, &w.plain, "127.0.0.10");
    assert!(
        !ran.ok() && ran.stdout.is_empty() && !ran.stderr.contains("Authenticated to"),
        "ssh through HAProxy from 127.0.0.10 must be refused: {ran:#?}"
    );
    wait_audit_from(d, "connection_refused", "127.0.0.10", 1);

    // from="127.0.0.12" is checked against the header's address too.
    let ran = via_haproxy(&w, &h, &w.from12, "127.0.0.9");
    assert!(
        !ran.ok() && ran.stderr.contains("Permission denied"),
        "a from=127.0.0.12 key from 127.0.0.9 must be refused: {ran:#?}"
    );
    // auth_failure names the header's address.
    wait_audit_from(d, "auth_failure", "127.0.0.9", 1);
    let ran = via_haproxy(&w, &h, &w.from12, "127.0.0.12");
    assert!(
        ran.ok() && ran.stdout == "hello from 127.0.0.2\n",
        "a from=127.0.0.12 key from 127.0.0.12: {ran:#?}"
    );
    assert_eq!(wait_audit_from(d, "session_open", "127.0.0.12", 1).len(), 1);

    assert_eq!(
        w.up.accepted(),
        2,
        "exactly the two admitted sessions reached the upstream"
    );
    assert_eq!(
        d.metric_or_zero("jumpgate_proxy_protocol_rejected_total", &[("listener", "ssh")]),
        0.0,
        "HAProxy's headers must all parse"
    );
    assert!(h.process.running(), "haproxy exited:\n{}", h.process.stderr());
}
