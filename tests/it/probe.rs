//! `jumpgate check --probe` against real targets: PostgreSQL with TLS on and
//! off (on its well-known port 5432, where the probe speaks SSLRequest, bound
//! to a random 127.x.y.z address so it cannot collide with a PostgreSQL of
//! the machine on 127.0.0.1), PostgreSQL on a random port (connect only), a
//! port with nothing listening and a name the test's DNS server does not
//! know. One line per target; exit 1 when any target is unreachable.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

use crate::support::daemon::{ConfigDir, config, route, run_cli};
use crate::support::dns::DnsServer;
use crate::support::free_port;
use crate::support::pg::{ITEMS, Postgres, psql_at};
use crate::support::ssh::{Lab, SshConfig, allow_host};

/// PostgreSQL's well-known port: the probe speaks its protocol only there.
const PG_PORT: u16 = 5432;

/// `jumpgate check --probe --config FILE(text)`: (exit code, stdout, stderr).
fn probe(text: &str) -> (i32, String, String) {
    let dir = ConfigDir::new(text);
    run_cli(&["check", "--probe", "--config", &dir.config_str()])
}

/// The `probe ...` line of stdout that starts with `probe    WHAT TARGET:`.
fn line<'a>(out: &'a str, what: &str, target: &str) -> &'a str {
    let prefix = format!("probe    {what} {target}:");
    out.lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

/// An address 127.A.B.C with A in 100..200: not 127.0.0.x, where the other
/// tests and a machine's own PostgreSQL live.
fn random_loopback() -> IpAddr {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let r = h.finish();
    IpAddr::from([127, 100 + (r % 100) as u8, (r >> 8) as u8, 1 + ((r >> 16) % 254) as u8])
}

/// PostgreSQL on RANDOM_LOOPBACK:5432, TLS on or off.
fn pg_on_5432(tls: bool) -> Postgres {
    let mut last = String::new();
    for _ in 0..5 {
        match Postgres::try_start_on(random_loopback(), PG_PORT, tls) {
            Ok(pg) => return pg,
            Err(log) => last = log,
        }
    }
    panic!(
        "PostgreSQL could not bind port {PG_PORT} on 5 random 127.x.y.z addresses \
         (does something listen on *:{PG_PORT}?):\n{last}"
    );
}

#[test]
fn probe_reaches_a_postgresql_forward_target_on_a_random_port() {
    let pg = Postgres::start();
    let target = format!("127.0.0.1:{}", pg.port());
    let (code, out, err) = probe(&config("", None, &route("pg", &target, "keep")));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let l = line(&out, "forward \"pg\"", &target);
    assert!(
        l.contains(&format!("{target} connect")) && l.contains("port open"),
        "a reachable target on a port without a protocol check: {l}"
    );
    assert!(!out.contains("unreachable"), "{out}");
}

#[test]
fn probe_says_whether_postgresql_offers_tls() {
    let (tls, plain) = std::thread::scope(|s| {
        let tls = s.spawn(|| pg_on_5432(true));
        let plain = s.spawn(|| pg_on_5432(false));
        (tls.join().expect("tls pg"), plain.join().expect("plain pg"))
    });
    // Both really are PostgreSQL, and TLS really is on (resp. off).
    for pg in [&tls, &plain] {
        assert_eq!(
            psql_at(pg.host(), PG_PORT, "select id, name from items order by id").as_deref(),
            Ok(ITEMS)
        );
    }
    assert_eq!(psql_at(tls.host(), PG_PORT, "show ssl").as_deref(), Ok("on"));
    assert_eq!(psql_at(plain.host(), PG_PORT, "show ssl").as_deref(), Ok("off"));

    let dns = DnsServer::start();
    dns.set_a("pgtls", &[tls.host()], 30);
    let lab = Lab::new();
    let (tls_target, plain_target) = (
        format!("{}:{PG_PORT}", tls.host()),
        format!("{}:{PG_PORT}", plain.host()),
    );
    let tunnel_key = lab.key("tunnel_ed25519", "ed25519");
    let ssh = SshConfig {
        tail: route("pg_tls", &tls_target, "keep")
            + &route("pg_plain", &plain_target, "keep")
            + &format!(
                "[[tunnel]]\nname = \"tn\"\nserver = \"127.0.0.1:{}\"\nuser = \"fivetran\"\nidentity = \"{}\"\n\
                 server_fingerprint = \"{}\"\n[[tunnel.remote]]\nlisten = \"localhost:15432\"\nconnect = \"{plain_target}\"\n",
                free_port(),
                tunnel_key.path.display(),
                lab.key("server_ed25519", "ed25519").fingerprint(),
            ),
        ..SshConfig::allowing(
            allow_host("pgtls.jumpgate.test", &[PG_PORT]) + &allow_host("*.jumpgate.test", &[PG_PORT]),
        )
    };
    // Only what the servers log from here on is the probe's doing (the
    // start-up's readiness poll may log "the database system is starting up").
    let logged_before = [tls.log().len(), plain.log().len()];
    let (code, out, err) = probe(&lab.config(&ssh, dns.addr()));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");

    let l = line(&out, "forward \"pg_tls\"", &tls_target);
    assert!(l.contains("PostgreSQL answers, TLS offered"), "{l}");
    let l = line(&out, "forward \"pg_plain\"", &plain_target);
    assert!(l.contains("PostgreSQL answers, TLS not offered"), "{l}");
    let l = line(
        &out,
        "ssh allow pgtls.jumpgate.test",
        &format!("pgtls.jumpgate.test:{PG_PORT}"),
    );
    assert!(
        l.contains(&tls_target) && l.contains("PostgreSQL answers, TLS offered"),
        "an [[ssh.allow]] host is resolved and probed: {l}"
    );
    let l = line(&out, "tunnel \"tn\"", &plain_target);
    assert!(
        l.contains("PostgreSQL answers, TLS not offered"),
        "a tunnel's connect is probed: {l}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("probe    ssh allow *.jumpgate.test") && l.contains("not probed")),
        "a wildcard rule is named as not probed:\n{out}"
    );
    // Neither server saw a login: the probe sends no startup packet.
    for (pg, before) in [&tls, &plain].into_iter().zip(logged_before) {
        let log = pg.log();
        let since = log.get(before..).unwrap_or("");
        assert!(
            !since.contains("FATAL"),
            "the probe must not send credentials or a startup packet:\n{since}"
        );
    }
}

#[test]
fn probe_exits_1_for_a_closed_port_and_a_name_that_does_not_resolve() {
    let dns = DnsServer::start();
    dns.set_a("db", &["127.0.0.1".parse().expect("ip")], 30);
    let closed = format!("127.0.0.1:{}", free_port());
    let missing = "nx.jumpgate.test:5432";

    let (code, out, err) = probe(&config("", None, &route("down", &closed, "keep")));
    assert_eq!(code, 1, "nothing listens on {closed}; stdout:\n{out}\nstderr:\n{err}");
    let l = line(&out, "forward \"down\"", &closed);
    assert!(l.contains("cannot connect"), "{l}");

    let (code, out, err) = probe(&config("", Some(dns.addr()), &route("nx", missing, "keep")));
    assert_eq!(
        code, 1,
        "{missing} is unknown to the DNS server; stdout:\n{out}\nstderr:\n{err}"
    );
    let l = line(&out, "forward \"nx\"", missing);
    assert!(l.contains("does not resolve"), "{l}");

    // One good target does not hide the bad ones.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let open = listener.local_addr().expect("addr").to_string();
    let routes = route("up", &open, "keep") + &route("down", &closed, "keep") + &route("nx", missing, "keep");
    let (code, out, err) = probe(&config("", Some(dns.addr()), &routes));
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(line(&out, "forward \"up\"", &open).contains("port open"), "{out}");
    assert!(
        line(&out, "forward \"down\"", &closed).contains("cannot connect"),
        "{out}"
    );
    assert!(
        line(&out, "forward \"nx\"", missing).contains("does not resolve"),
        "{out}"
    );
    assert!(out.contains("2 target(s) unreachable"), "{out}");
    drop(listener);
}
