//! `jumpgate check` and `jumpgate run` on bad and good configs: exit codes,
//! and error messages that name the file, the table (with index and name),
//! the field, what is wrong and the fix.

use std::net::TcpListener;

use crate::support::daemon::{ConfigDir, Daemon, run_cli};
use crate::support::dns::DnsServer;

/// A valid first route, so the broken one is `[[forward]] #2`.
fn good_route() -> String {
    "[[forward]]\nname = \"ok\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:5432\"\n\n".to_string()
}

/// `jumpgate check --config <file with text>`: (exit code, stdout, stderr, file path).
fn check(text: &str) -> (i32, String, String, String) {
    let dir = ConfigDir::new(text);
    let path = dir.config_str();
    let (code, out, err) = run_cli(&["check", "--config", &path]);
    (code, out, err, path)
}

/// Asserts exit 1 and that stderr contains every one of `parts`.
fn assert_error(code: i32, stderr: &str, parts: &[&str]) {
    assert_eq!(code, 1, "exit code; stderr:\n{stderr}");
    for part in parts {
        assert!(stderr.contains(part), "stderr should contain {part:?}:\n{stderr}");
    }
}

/// Whether `text` holds a quoted example duration such as `"5s"` or `"500ms"`.
fn has_duration_example(text: &str) -> bool {
    text.split('"').skip(1).step_by(2).any(|q| {
        let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &q[digits.len()..];
        !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) && ["ms", "s", "m", "h"].contains(&unit)
    })
}

#[test]
fn target_without_port_names_file_table_field_and_fix() {
    let text = good_route() + "[[forward]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\ntarget = \"mydb.example.com\"\n";
    let (code, _, err, path) = check(&text);
    let want = format!(
        "{path}: [[forward]] #2 \"db\": target: no port in \"mydb.example.com\" (write \"mydb.example.com:5432\")"
    );
    assert_error(code, &err, &[&want]);
}

#[test]
fn run_refuses_the_same_bad_config_as_check() {
    let text = "[[forward]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\ntarget = \"mydb.example.com\"\n";
    let dir = ConfigDir::new(text);
    let path = dir.config_str();
    let ready = dir.path().join("ready.json");
    let ready = ready.to_str().expect("utf-8");
    let (code, _, err) = run_cli(&["run", "--config", &path, "--ready-file", ready]);
    assert_error(
        code,
        &err,
        &[&path, "[[forward]] #1 \"db\": target: no port in \"mydb.example.com\""],
    );
    assert!(
        !dir.path().join("ready.json").exists(),
        "ready file written for a config that failed"
    );
}

#[test]
fn unknown_field_names_file_field_and_the_valid_ones() {
    let text = good_route()
        + "[[forward]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\ntarget = \"db.example.com:5432\"\nlisen = \"127.0.0.1:0\"\n";
    let (code, _, err, path) = check(&text);
    assert_error(code, &err, &[&path, "lisen", "listen"]);
    // Where: the table, or toml's line and column.
    assert!(
        err.contains("forward") || err.contains("line 10"),
        "unknown field error should say where (table or line 10):\n{err}"
    );
}

#[test]
fn duplicate_route_names_are_refused_naming_the_second() {
    let text = good_route() + &good_route().replace("127.0.0.1:5432", "127.0.0.1:5433");
    let (code, _, err, path) = check(&text);
    assert_error(code, &err, &[&format!("{path}: [[forward]] #2 \"ok\": name:")]);
    let lower = err.to_lowercase();
    assert!(
        lower.contains("duplicate") || lower.contains("already") || lower.contains("used by") || lower.contains("#1"),
        "duplicate name error should say it is taken:\n{err}"
    );
}

#[test]
fn bad_duration_names_table_field_value_and_an_example() {
    let text = good_route()
        + "[[forward]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\ntarget = \"db.example.com:5432\"\nconnect_timeout = \"soon\"\n";
    let (code, _, err, path) = check(&text);
    assert_error(code, &err, &[&path, "[[forward]] #2 \"db\"", "connect_timeout", "soon"]);
    assert!(
        has_duration_example(&err),
        "bad duration error should show a valid duration:\n{err}"
    );

    let (code, _, err, path) = check("[daemon]\nshutdown_grace = \"30 parsecs\"\n");
    assert_error(code, &err, &[&path, "[daemon]", "shutdown_grace", "30 parsecs"]);
    assert!(
        has_duration_example(&err),
        "bad duration error should show a valid duration:\n{err}"
    );
}

#[test]
fn listen_address_in_use_fails_run_with_exit_1() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[forward]]\nname = \"db\"\nlisten = \"{taken_addr}\"\ntarget = \"127.0.0.1:5432\"\n"
    );
    let failure = Daemon::try_start(&text)
        .err()
        .expect("daemon started although its listen address is taken");
    let status = failure.status.expect("daemon neither exited nor became ready");
    assert_eq!(status.code(), Some(1), "exit status; stderr:\n{}", failure.stderr);
    for part in ["[[forward]] #1 \"db\"", "listen", &taken_addr] {
        assert!(
            failure.stderr.contains(part),
            "stderr should contain {part:?}:\n{}",
            failure.stderr
        );
    }
    assert!(
        failure.stderr.to_lowercase().contains("in use"),
        "stderr should say the address is in use:\n{}",
        failure.stderr
    );
    drop(taken);
}

#[test]
fn ssh_and_tunnel_tables_are_refused_until_built() {
    let (code, _, err, path) = check("[ssh]\nlisten = \"127.0.0.1:2222\"\n");
    assert_error(code, &err, &[&path, "[ssh]"]);
    let tunnel = "[[tunnel]]\nname = \"fivetran\"\nserver = \"tunnel.example.com:22\"\nuser = \"fivetran\"\n\
                  identity = \"state/tunnel_ed25519\"\nserver_fingerprint = \"SHA256:abc\"\n\
                  [[tunnel.remote]]\nlisten = \"localhost:11433\"\nconnect = \"db.internal:1433\"\n";
    let (code, _, err, path) = check(tunnel);
    assert_error(code, &err, &[&path, "[[tunnel]]"]);
}

#[test]
fn missing_config_file_is_named() {
    let dir = ConfigDir::new("");
    let missing = dir.path().join("nope.toml");
    let missing = missing.to_str().expect("utf-8");
    let (code, _, err) = run_cli(&["check", "--config", missing]);
    assert_error(code, &err, &[missing]);
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run_cli(&["frobnicate"]).0, 2, "unknown subcommand");
    assert_eq!(run_cli(&["run", "--no-such-flag"]).0, 2, "unknown flag");
}

#[test]
fn check_prints_each_route_listen_target_and_resolved_addresses() {
    let dns = DnsServer::start();
    dns.set_a("db", &["127.0.0.2".parse().expect("ip")], 30);
    let text = format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[[forward]]\nname = \"byip\"\nlisten = \"127.0.0.1:15432\"\n\
         target = \"127.0.0.1:5432\"\n\n[[forward]]\nname = \"byname\"\nlisten = \"127.0.0.1:15433\"\n\
         target = \"db.jumpgate.test:6432\"\n",
        dns.addr()
    );
    let (code, out, err, _) = check(&text);
    assert_eq!(code, 0, "check on a good config; stderr:\n{err}");
    let byip = out
        .lines()
        .position(|l| l.contains("byip"))
        .unwrap_or_else(|| panic!("route byip not printed:\n{out}"));
    let byname = out
        .lines()
        .position(|l| l.contains("byname"))
        .unwrap_or_else(|| panic!("route byname not printed:\n{out}"));
    for want in [
        "127.0.0.1:15432",
        "127.0.0.1:5432",
        "127.0.0.1:15433",
        "db.jumpgate.test:6432",
        "127.0.0.2",
    ] {
        assert!(out.contains(want), "check output should contain {want:?}:\n{out}");
    }
    assert!(byip < byname, "routes in config order:\n{out}");
}
