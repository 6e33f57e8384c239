//! `[[forward]]` routes end to end: the real daemon between real clients
//! (psql, raw TCP) and real upstreams, with the test's DNS server deciding
//! where a route's name points while connections flow; plus the admin
//! endpoint and the process lifecycle (drain on SIGTERM, idle exit).

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::support::daemon::{Daemon, config, route};
use crate::support::dns::DnsServer;
use crate::support::pg::{ITEMS, Postgres, psql};
use crate::support::upstream::{Behavior, DOWN_SEED, Upstream};
use crate::support::{
    closed_within, echoes, hash_to_eof, ip, pattern_hash, read_line, send_pattern, wait_for, wait_until,
};

const DB: &str = "db.jumpgate.test";

/// Starts the daemon and waits (5 s) until `/readyz` says 200.
fn ready_daemon(config_text: &str) -> Daemon {
    let d = Daemon::start(config_text);
    let ready = wait_until(Duration::from_secs(5), || d.get("/readyz").0 == 200);
    assert!(ready, "/readyz not 200 within 5 s: {:?}", d.get("/readyz"));
    d
}

/// A new client on `route` and the address of the echo upstream it reached
/// (from the upstream's `hello from <ip>` line).
fn connect_reaching(d: &Daemon, route: &str) -> (TcpStream, IpAddr) {
    let mut s = d.connect(route);
    let line = read_line(&mut s).unwrap_or_else(|| panic!("no hello line through route {route}"));
    let reached = line
        .strip_prefix("hello from ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (s, reached)
}

#[test]
fn psql_through_route_returns_the_rows_for_ip_and_dns_targets() {
    let pg = Postgres::start();
    assert_eq!(pg.query(pg.port(), "select id, name from items order by id"), ITEMS);
    let dns = DnsServer::start();
    dns.set_a("pg", &[ip("127.0.0.1")], 30);
    let routes = route("pg_ip", &format!("127.0.0.1:{}", pg.port()), "keep")
        + &route("pg_dns", &format!("pg.jumpgate.test:{}", pg.port()), "keep");
    let d = ready_daemon(&config("", Some(dns.addr()), &routes));

    for name in ["pg_ip", "pg_dns"] {
        let port = d.forward(name).port();
        let rows = psql(port, "select id, name from items order by id")
            .unwrap_or_else(|e| panic!("psql through route {name}: {e}\npg log:\n{}", pg.log()));
        assert_eq!(rows, ITEMS, "rows through route {name}");
        let big = psql(
            port,
            "select count(*), sum(length(repeat('x', g))) from generate_series(1, 2000) g",
        )
        .unwrap_or_else(|e| panic!("psql through route {name}: {e}"));
        assert_eq!(big, "2000|2001000", "aggregate through route {name}");
    }
}

#[test]
fn hundred_mib_each_way_arrives_byte_exact() {
    const LEN: u64 = 100 * 1024 * 1024;
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Stream { down_len: LEN }).expect("bind");
    let d = ready_daemon(&config("", None, &route("db", &up.addr().to_string(), "keep")));

    let mut client = d.connect("db");
    client.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    client
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut writer = client.try_clone().expect("clone");
    let sending = std::thread::spawn(move || {
        let sent = send_pattern(&mut writer, 1, LEN).expect("send 100 MiB up");
        writer.shutdown(Shutdown::Write).expect("shutdown write");
        sent
    });
    let got_down = hash_to_eof(&mut client).expect("read 100 MiB down");
    let sent_up = sending.join().expect("sender thread");

    assert_eq!(got_down, pattern_hash(DOWN_SEED, LEN), "downstream (len, hash) differs");
    let got_up = wait_for(Duration::from_secs(10), || up.received().first().copied());
    assert_eq!(
        got_up,
        Some(sent_up),
        "upstream received (len, hash) differs from what was sent"
    );
}

#[test]
fn half_closed_client_still_receives_the_whole_answer() {
    const REQUEST: u64 = 100 * 1024;
    const REPLY: u64 = 1024 * 1024;
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::AnswerAfterEof { reply_len: REPLY }).expect("bind");
    let d = ready_daemon(&config("", None, &route("db", &up.addr().to_string(), "keep")));

    let mut client = d.connect("db");
    let sent = send_pattern(&mut client, 1, REQUEST).expect("send request");
    client.shutdown(Shutdown::Write).expect("shutdown write");
    // The upstream answers only after it has seen our EOF through the route.
    assert_eq!(
        read_line(&mut client).as_deref(),
        Some("got 102400"),
        "upstream did not see the whole request then EOF"
    );
    let answer = hash_to_eof(&mut client).expect("read answer");
    assert_eq!(
        answer,
        pattern_hash(DOWN_SEED, REPLY),
        "answer after half-close incomplete or wrong"
    );
    assert_eq!(up.received(), vec![sent]);
}

#[test]
fn dns_change_moves_new_connections_and_keep_leaves_old_ones_open() {
    let (two, three) = Upstream::pair(Behavior::Echo);
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 1);
    let target = format!("{DB}:{}", two.port());
    let d = ready_daemon(&config("", Some(dns.addr()), &route("db", &target, "keep")));
    let (mut old, reached) = connect_reaching(&d, "db");
    assert_eq!(reached, ip("127.0.0.2"));
    let changes_before = d.metric_or_zero("jumpgate_dns_changes_total", &[("name", DB)]);

    dns.set_a("db", &[ip("127.0.0.3")], 1);
    let changed = Instant::now();
    // TTL 1 s: new connections must reach the new address within TTL + 1 s.
    let moved = wait_for(Duration::from_secs(2), || {
        let (_probe, reached) = connect_reaching(&d, "db");
        (reached == ip("127.0.0.3")).then(Instant::now)
    });
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "new connections still reach 127.0.0.2 {:?} after the change",
            changed.elapsed()
        )
    });
    eprintln!("new connections moved after {:?}", moved - changed);
    for _ in 0..3 {
        assert_eq!(
            connect_reaching(&d, "db").1,
            ip("127.0.0.3"),
            "a later connection went back to the old address"
        );
    }

    let audited = wait_until(Duration::from_secs(2), || !d.audit("dns_change").is_empty());
    assert!(audited, "no dns_change audit line");
    let line = d.audit("dns_change")[0].to_string();
    assert!(
        line.contains("127.0.0.2") && line.contains("127.0.0.3"),
        "dns_change line should show old and new: {line}"
    );
    let changes = d.metric_or_zero("jumpgate_dns_changes_total", &[("name", DB)]);
    assert!(
        changes >= changes_before + 1.0,
        "dns_changes_total {changes_before} -> {changes}"
    );

    // on_change = "keep": the connection on the old address stays and works.
    assert!(
        !closed_within(&mut old, Duration::from_millis(1500)),
        "keep: old connection was closed"
    );
    old.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert!(echoes(&mut old), "keep: old connection no longer relays");
    assert_eq!(two.open(), 1, "the old upstream connection should still be open");
    drop(three);
}

#[test]
fn on_change_close_closes_exactly_the_connections_on_the_address_that_left() {
    let (mut two, mut three) = Upstream::pair(Behavior::Echo);
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2"), ip("127.0.0.3")], 1);
    let target = format!("{DB}:{}", two.port());
    let d = ready_daemon(&config("", Some(dns.addr()), &route("db", &target, "close")));

    // Hold connections on both addresses. If the daemon always picks the
    // same one first, make that one refuse for a moment so the next
    // connection goes to the other.
    let mut on_two = Vec::new();
    let mut on_three = Vec::new();
    for _ in 0..4 {
        let (s, reached) = connect_reaching(&d, "db");
        if reached == ip("127.0.0.2") {
            on_two.push(s)
        } else {
            on_three.push(s)
        }
    }
    if on_two.is_empty() || on_three.is_empty() {
        let busy = if on_two.is_empty() { &mut three } else { &mut two };
        busy.stop_listening();
        let (s, reached) = connect_reaching(&d, "db");
        busy.resume_listening();
        if reached == ip("127.0.0.2") {
            on_two.push(s)
        } else {
            on_three.push(s)
        }
    }
    assert!(
        !on_two.is_empty() && !on_three.is_empty(),
        "could not get connections on both addresses"
    );

    dns.set_a("db", &[ip("127.0.0.3")], 1);
    // Seen within the TTL (1 s), closed within 1 s of being seen; 0.5 s slack.
    for (i, s) in on_two.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_millis(2500)),
            "close: connection {i} on 127.0.0.2 still open 2.5 s after .2 left the answer"
        );
    }
    let upstream_closed = wait_until(Duration::from_secs(2), || two.open() == 0);
    assert!(
        upstream_closed,
        "daemon left {} upstream connections to 127.0.0.2 open",
        two.open()
    );
    for (i, s) in on_three.iter_mut().enumerate() {
        assert!(
            !closed_within(s, Duration::from_millis(500)),
            "close: connection {i} on 127.0.0.3 (still in the answer) was closed"
        );
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        assert!(echoes(s), "connection {i} on 127.0.0.3 no longer relays");
    }
    assert!(three.open() >= on_three.len());
}

#[test]
fn refused_connect_on_old_address_reresolves_at_once_and_client_sees_no_failure() {
    let (mut two, three) = Upstream::pair(Behavior::Echo);
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let target = format!("{DB}:{}", two.port());
    let d = ready_daemon(&config("", Some(dns.addr()), &route("db", &target, "keep")));
    let started = Instant::now();
    assert_eq!(connect_reaching(&d, "db").1, ip("127.0.0.2"));

    // Re-resolving on a failed connect is limited to once per min_ttl (1 s),
    // counted from the start-up lookup; in a real failover the cached answer
    // is older than that, so let that much time pass.
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(started.elapsed()));
    // The failover: DNS already points at .3 (TTL still 30 s in the daemon's
    // cache), and the old writer refuses connections.
    dns.set_a("db", &[ip("127.0.0.3")], 30);
    two.stop_listening();
    let queries_before = dns.queries();

    let (mut s, reached) = connect_reaching(&d, "db");
    assert_eq!(reached, ip("127.0.0.3"), "connection should reach the fresh answer");
    assert!(echoes(&mut s));
    assert!(dns.queries() > queries_before, "no DNS query after the failed connect");
    let failed = d.metric_or_zero(
        "jumpgate_forward_connections_total",
        &[("route", "db"), ("result", "connect_failed")],
    );
    assert_eq!(
        failed, 0.0,
        "a client saw a failed connect although DNS had already moved"
    );
    let ok = d.metric_or_zero(
        "jumpgate_forward_connections_total",
        &[("route", "db"), ("result", "ok")],
    );
    assert_eq!(ok, 2.0, "forward_connections_total{{result=\"ok\"}}");
    assert_eq!(three.accepted(), 1);
}

#[test]
fn dns_down_at_start_keeps_route_unready_until_the_first_answer() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let mut dns = DnsServer::reserve();
    dns.set_a("db", &[ip("127.0.0.2")], 30);
    let target = format!("{DB}:{}", up.port());
    let d = Daemon::start(&config("", Some(dns.addr()), &route("db", &target, "keep")));

    let (status, body) = d.get("/readyz");
    assert_eq!(status, 503, "/readyz with no DNS answer yet: {body}");
    assert!(
        body.contains("\"db\""),
        "/readyz reason should name the route: {body:?}"
    );
    let (status, body) = d.get("/readyz/forward/db");
    assert_eq!(status, 503, "/readyz/forward/db with no DNS answer yet: {body}");
    assert!(
        body.contains("\"db\"") && !body.trim().is_empty(),
        "reason should name the route: {body:?}"
    );
    assert_eq!(d.get("/healthz").0, 200, "/healthz while not ready");

    dns.resume();
    let ready = wait_until(Duration::from_secs(5), || d.get("/readyz/forward/db").0 == 200);
    assert!(
        ready,
        "route not ready 5 s after DNS came up: {:?}",
        d.get("/readyz/forward/db")
    );
    assert_eq!(d.get("/readyz").0, 200);
    let (mut s, reached) = connect_reaching(&d, "db");
    assert_eq!(reached, ip("127.0.0.2"));
    assert!(echoes(&mut s));
}

#[test]
fn dns_dying_later_keeps_serving_the_last_good_answer() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let mut dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2")], 1);
    let target = format!("{DB}:{}", up.port());
    let d = ready_daemon(&config("", Some(dns.addr()), &route("db", &target, "keep")));
    assert_eq!(connect_reaching(&d, "db").1, ip("127.0.0.2"));
    // A dead nameserver shows up as `result="timeout"` (no answer: the UDP
    // socket is unconnected, so no ICMP refusal is seen) or `"error"`; the
    // result values are listed in docs/dependency-defaults.md.
    let failures = || {
        ["timeout", "error"]
            .iter()
            .map(|r| d.metric_or_zero("jumpgate_dns_lookups_total", &[("name", DB), ("result", r)]))
            .sum::<f64>()
    };
    let failures_before = failures();

    dns.stop();
    // With the server gone, a lookup fails when the resolver gives up (a
    // timeout of a few seconds, as for a real dead nameserver).
    let failing = wait_until(Duration::from_secs(12), || failures() > failures_before);
    if !failing {
        let (_, metrics) = d.get("/metrics");
        let series: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("jumpgate_dns_lookups_total"))
            .collect();
        panic!(
            "dns_lookups_total{{name=\"{DB}\",result=\"timeout\"|\"error\"}} did not rise within 12 s of the DNS server stopping; series:\n{}",
            series.join("\n")
        );
    }
    // The 1 s TTL ran out before that failed lookup: what follows is served stale.
    for _ in 0..3 {
        let (mut s, reached) = connect_reaching(&d, "db");
        assert_eq!(reached, ip("127.0.0.2"), "last good answer not served");
        assert!(echoes(&mut s));
    }
    assert_eq!(
        d.get("/readyz").0,
        200,
        "route with a last good answer should stay ready"
    );
}

#[test]
fn refused_upstream_closes_the_client_and_counts_connect_failed() {
    let port = crate::support::free_port();
    let d = ready_daemon(&config("", None, &route("db", &format!("127.0.0.1:{port}"), "keep")));
    let mut client = d.connect("db");
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("got {n} bytes from a route whose upstream refuses"),
        Err(e) => assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "client not closed within 5 s: {e}"
        ),
    }
    let counted = wait_until(Duration::from_secs(3), || {
        d.metric_or_zero(
            "jumpgate_forward_connections_total",
            &[("route", "db"), ("result", "connect_failed")],
        ) == 1.0
    });
    assert!(counted, "connect_failed not counted once: {:?}", d.get("/metrics").1);
    assert_eq!(
        d.metric_or_zero(
            "jumpgate_forward_connections_total",
            &[("route", "db"), ("result", "ok")]
        ),
        0.0
    );
}

#[test]
fn sigterm_turns_unready_at_once_and_drains_open_connections_before_exit_0() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let mut d = ready_daemon(&config("", None, &route("db", &up.addr().to_string(), "keep")));
    let (mut client, _) = connect_reaching(&d, "db");

    d.signal(libc::SIGTERM);
    let unready = wait_until(Duration::from_millis(500), || d.get("/readyz").0 == 503);
    assert!(unready, "/readyz not 503 within 0.5 s of SIGTERM");
    assert_eq!(d.get("/readyz/forward/db").0, 503, "/readyz/forward/db while draining");
    // drain_delay = 0s: the listener closes at once.
    let refusing = wait_until(Duration::from_secs(2), || TcpStream::connect(d.forward("db")).is_err());
    assert!(
        refusing,
        "route still accepts new connections 2 s after SIGTERM with drain_delay 0s"
    );

    // The connection opened before SIGTERM finishes a 1 MiB transfer.
    let mut writer = client.try_clone().expect("clone");
    let sending = std::thread::spawn(move || send_pattern(&mut writer, 1, 1024 * 1024));
    let mut echoed = vec![0u8; 1024 * 1024];
    client.read_exact(&mut echoed).expect("echo during drain");
    let sent = sending.join().expect("sender").expect("send during drain");
    let mut got = crate::support::StreamHash::default();
    got.update(&echoed);
    assert_eq!(got.finish(), sent, "echo during drain differs");
    assert!(d.running(), "daemon exited while a connection was open");
    assert_eq!(d.get("/readyz").0, 503, "/readyz while draining");

    client.shutdown(Shutdown::Write).expect("shutdown");
    assert!(closed_within(&mut client, Duration::from_secs(5)));
    drop(client);
    let status = d
        .wait_exit(Duration::from_secs(5))
        .expect("daemon still running 5 s after its last connection closed");
    assert_eq!(status.code(), Some(0), "exit status after drain: {status}");
}

#[test]
fn second_signal_exits_at_once() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let cfg = config("", None, &route("db", &up.addr().to_string(), "keep"))
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"60s\"");
    let mut d = ready_daemon(&cfg);
    let (_client, _) = connect_reaching(&d, "db");
    d.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(1), || d.get("/readyz").0 == 503));
    assert!(d.running(), "exited with a connection open and 60 s of grace");
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(2));
    assert!(status.is_some(), "second SIGTERM did not end the daemon within 2 s");
}

#[test]
fn idle_exit_waits_for_the_last_connection_then_exits_0() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let mut d = ready_daemon(&config(
        "idle_exit = \"2s\"\n",
        None,
        &route("db", &up.addr().to_string(), "keep"),
    ));
    let (mut client, _) = connect_reaching(&d, "db");

    // Open for longer than idle_exit: the daemon must stay.
    assert_eq!(
        d.wait_exit(Duration::from_secs(3)),
        None,
        "daemon exited while a connection was open"
    );
    assert!(echoes(&mut client), "connection broken while idle_exit was pending");

    client.shutdown(Shutdown::Write).expect("shutdown");
    assert!(closed_within(&mut client, Duration::from_secs(5)));
    drop(client);
    let closed = Instant::now();
    let status = d
        .wait_exit(Duration::from_secs(6))
        .expect("no exit within 6 s of the last connection closing");
    let after = closed.elapsed();
    assert_eq!(status.code(), Some(0), "idle exit status: {status}");
    assert!(
        after >= Duration::from_millis(1800),
        "exited {after:?} after the last close, before idle_exit (2 s)"
    );
    assert!(
        after <= Duration::from_secs(4),
        "exited only {after:?} after the last close (idle_exit 2 s)"
    );
}

#[test]
fn metrics_and_audit_lines_count_what_was_relayed() {
    const UP: u64 = 12_345;
    const REPLY: u64 = 54_321;
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::AnswerAfterEof { reply_len: REPLY }).expect("bind");
    let d = ready_daemon(&config("", None, &route("db", &up.addr().to_string(), "keep")));
    assert_eq!(d.get("/healthz").0, 200);

    let mut client = d.connect("db");
    send_pattern(&mut client, 1, UP).expect("send");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).expect("answer");
    let down = format!("got {UP}\n").len() as u64 + REPLY;
    assert_eq!(answer.len() as u64, down);
    drop(client);

    let bytes = |dir: &str| {
        d.metric_or_zero(
            "jumpgate_relay_bytes_total",
            &[("role", "forward"), ("name", "db"), ("direction", dir)],
        )
    };
    let counted = wait_until(Duration::from_secs(3), || {
        bytes("up") == UP as f64 && bytes("down") == down as f64
    });
    assert!(
        counted,
        "relay_bytes_total up={} down={}, want {UP} and {down}",
        bytes("up"),
        bytes("down")
    );
    let conns = |result: &str| {
        d.metric_or_zero(
            "jumpgate_forward_connections_total",
            &[("route", "db"), ("result", result)],
        )
    };
    assert_eq!(conns("ok"), 1.0);
    assert_eq!(conns("connect_failed"), 0.0);
    let active = wait_until(Duration::from_secs(2), || {
        d.metric("jumpgate_forward_connections_active", &[("route", "db")]) == Some(0.0)
    });
    assert!(
        active,
        "forward_connections_active: {:?}",
        d.metric("jumpgate_forward_connections_active", &[("route", "db")])
    );

    assert_eq!(d.audit("forward_open").len(), 1, "forward_open audit lines");
    let logged = wait_until(Duration::from_secs(2), || d.audit("forward_close").len() == 1);
    assert!(logged, "no forward_close audit line");
    let close = d.audit("forward_close")[0].to_string();
    assert!(
        close.contains(&UP.to_string()) && close.contains(&down.to_string()),
        "forward_close should carry bytes each way: {close}"
    );
}

#[test]
fn sigterm_keeps_accepting_for_drain_delay_then_refuses() {
    let up = Upstream::bind(ip("127.0.0.2"), 0, Behavior::Echo).expect("bind");
    let cfg = config("", None, &route("db", &up.addr().to_string(), "keep"))
        .replace("drain_delay = \"0s\"", "drain_delay = \"1500ms\"");
    let mut d = ready_daemon(&cfg);

    d.signal(libc::SIGTERM);
    let signalled = Instant::now();
    assert!(
        wait_until(Duration::from_millis(500), || d.get("/readyz").0 == 503),
        "/readyz not 503 within 0.5 s of SIGTERM"
    );
    // Within drain_delay a load balancer may still send new connections: they are served.
    let (mut late, _) = connect_reaching(&d, "db");
    assert!(
        signalled.elapsed() < Duration::from_millis(1500),
        "test too slow to check drain_delay"
    );
    assert!(
        echoes(&mut late),
        "connection accepted during drain_delay is not relayed"
    );
    drop(late);
    let refusing = wait_for(Duration::from_secs(3), || {
        TcpStream::connect(d.forward("db"))
            .is_err()
            .then(|| signalled.elapsed())
    })
    .expect("route still accepts 3 s after SIGTERM with drain_delay 1.5 s");
    assert!(
        refusing >= Duration::from_millis(1400),
        "stopped accepting after {refusing:?}, before drain_delay (1.5 s)"
    );
    let status = d.wait_exit(Duration::from_secs(5)).expect("no exit after the drain");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn connect_tries_each_address_of_the_answer_in_turn() {
    let (mut two, three) = Upstream::pair(Behavior::Echo);
    two.stop_listening();
    let dns = DnsServer::start();
    dns.set_a("db", &[ip("127.0.0.2"), ip("127.0.0.3")], 30);
    let target = format!("{DB}:{}", three.port());
    let d = ready_daemon(&config("", Some(dns.addr()), &route("db", &target, "keep")));
    for _ in 0..4 {
        let (mut s, reached) = connect_reaching(&d, "db");
        assert_eq!(reached, ip("127.0.0.3"));
        assert!(echoes(&mut s));
    }
    let failed = d.metric_or_zero(
        "jumpgate_forward_connections_total",
        &[("route", "db"), ("result", "connect_failed")],
    );
    assert_eq!(
        failed, 0.0,
        "an address that refuses while another answers is not a failed connection"
    );
}

#[test]
fn aaaa_only_name_is_reached_over_ipv6() {
    let up = Upstream::bind(ip("::1"), 0, Behavior::Echo).expect("bind [::1]:0");
    let dns = DnsServer::start();
    dns.set_a("db6", &[ip("::1")], 30);
    let target = format!("db6.jumpgate.test:{}", up.port());
    let d = ready_daemon(&config("", Some(dns.addr()), &route("db", &target, "keep")));
    let (mut s, reached) = connect_reaching(&d, "db");
    assert_eq!(reached, ip("::1"));
    assert!(echoes(&mut s));
}
