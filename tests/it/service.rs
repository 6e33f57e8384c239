//! The service's REST API both ways and host-key continuity, end to end:
//! the real daemon and the real `jumpgate register-fingerprint` against a
//! local stand-in for the API ([`Api`]) that checks method, path, Basic auth
//! and JSON body and answers success, 401, 429-then-success, 500, malformed
//! JSON and a group public key; the real OpenSSH client holding (or not) the
//! private half of the group's RSA key; and `cmd:` / `env:` host-key sources
//! checked with `ssh-keyscan`.

use std::path::Path;
use std::time::Duration;

use crate::support::api::{Api, Recorded, Reply, basic_auth};
use crate::support::daemon::{Daemon, run_cli, run_cli_env};
use crate::support::ssh::{
    Bastion, Lab, Ran, SshConfig, UserKey, allow_cidr, keygen_fingerprints, program, pub_path, run, run_ok,
};
use crate::support::upstream::{Behavior, Upstream};
use crate::support::{addr, wait_for, wait_until};

/// The API key the tests give jumpgate.
const API_KEY: &str = "it-key-5c1d";
/// The API secret: it must never appear in any output.
const API_SECRET: &str = "it-secret-9f8e7d6c5b4a-never-printed";
/// A bound for each one-shot ssh run.
const RUN_LIMIT: Duration = Duration::from_secs(20);
/// What the stand-in answers a good fingerprint registration with.
const APPROVED: &str = "The fingerprint has been approved.";

/// No `[[ssh.allow]]` rule of these tests names a host, so no resolver is
/// built and this address is never asked.
fn no_dns() -> std::net::SocketAddr {
    addr("127.0.0.1:9")
}

/// An `[ssh]` section that validates: one `[[ssh.allow]]` rule (channels are not what these tests are about).
fn base_ssh() -> SshConfig {
    SshConfig::allowing(allow_cidr("127.0.0.2/32", &[5432]))
}

fn fingerprints_path(connection: &str) -> String {
    format!("/v1/connections/{connection}/fingerprints")
}

fn group_path(group: &str) -> String {
    format!("/v1/groups/{group}/public-key")
}

/// A `[service]` table pointing at `api` with the credentials in files of `dir`.
fn service_table(api: &Api, dir: &Path, connection_ids: &[&str]) -> String {
    let (key_file, secret_file) = (dir.join("api_key"), dir.join("api_secret"));
    std::fs::write(&key_file, format!("{API_KEY}\n")).expect("write api_key");
    std::fs::write(&secret_file, format!("{API_SECRET}\n")).expect("write api_secret");
    format!(
        "[service]\napi_url = \"{}\"\napi_key_file = \"{}\"\napi_secret_file = \"{}\"\n\
         connection_ids = {connection_ids:?}\nrefresh = \"1h\"\n",
        api.url(),
        key_file.display(),
        secret_file.display()
    )
}

/// `host_keys = ["PATH", ...]` for these key files.
fn host_keys_line(keys: &[&UserKey]) -> String {
    let entries: Vec<String> = keys.iter().map(|k| format!("\"{}\"", k.path.display())).collect();
    format!("host_keys = [{}]\n", entries.join(", "))
}

/// The hash the service expects for a key: `ssh-keygen -l -f KEY.pub` without `SHA256:`.
fn expected_hash(key: &UserKey) -> String {
    let fp = keygen_fingerprints(&pub_path(&key.path));
    fp[0]
        .hash
        .strip_prefix("SHA256:")
        .unwrap_or_else(|| panic!("not a SHA256 fingerprint: {fp:?}"))
        .to_string()
}

/// Asserts that `text` (some output) holds neither the secret nor the Basic auth header.
fn assert_no_secret(text: &str, what: &str) {
    let header = basic_auth(API_KEY, API_SECRET);
    let encoded = header.trim_start_matches("Basic ");
    assert!(
        !text.contains(API_SECRET) && !text.contains(encoded),
        "{what} shows the API secret:\n{text}"
    );
}

/// Asserts that `req` is the fingerprint registration of `key` for `connection`.
fn assert_registration(req: &Recorded, connection: &str, key: &UserKey) {
    assert_eq!(req.method, "POST", "{req:#?}");
    assert_eq!(req.path, fingerprints_path(connection), "{req:#?}");
    assert_eq!(
        req.authorization.as_deref(),
        Some(basic_auth(API_KEY, API_SECRET).as_str()),
        "Authorization must be Basic base64(key:secret): {req:#?}"
    );
    assert!(
        req.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json")),
        "Content-Type must be JSON: {req:#?}"
    );
    let json = req
        .json
        .as_ref()
        .unwrap_or_else(|| panic!("body is not JSON: {:?}", req.body));
    let fields: Vec<&String> = json.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    assert_eq!(fields, ["hash", "public_key"], "body fields: {json}");
    assert_eq!(
        json["hash"].as_str(),
        Some(expected_hash(key).as_str()),
        "hash = ssh-keygen -l without SHA256: ({json})"
    );
    assert_eq!(
        json["public_key"].as_str(),
        Some(key.public.as_str()),
        "public_key = the .pub line, `type base64 comment`"
    );
}

/// The request among `reqs` whose body's hash is `key`'s.
fn request_for<'a>(reqs: &'a [Recorded], key: &UserKey) -> &'a Recorded {
    let hash = expected_hash(key);
    reqs.iter()
        .find(|r| r.json.as_ref().and_then(|j| j["hash"].as_str()) == Some(hash.as_str()))
        .unwrap_or_else(|| {
            panic!(
                "no registration of {} (hash {hash}) among {reqs:#?}",
                key.path.display()
            )
        })
}

// ---------------------------------------------------------------- registration at start-up

#[test]
fn start_up_registers_each_host_key_fingerprint_with_basic_auth() {
    let api = Api::start();
    let connection = "conn_start";
    // The service is busy once: the daemon waits Retry-After and tries again.
    api.script(&fingerprints_path(connection), vec![Reply::TooMany { retry_after: 1 }]);
    api.fallback(&fingerprints_path(connection), Reply::Success(APPROVED.into()));
    let lab = Lab::new();
    let (ed, ec) = (lab.key("host_ed25519", "ed25519"), lab.key("host_ecdsa", "ecdsa"));
    let ssh = SshConfig {
        extra: host_keys_line(&[&ed, &ec]),
        tail: service_table(&api, lab.path(), &[connection]),
        ..base_ssh()
    };
    let d = Daemon::start(&lab.config(&ssh, no_dns()));

    let reqs = api.wait_requests(&fingerprints_path(connection), 3, Duration::from_secs(10));
    for r in &reqs {
        assert!(
            [&ed, &ec]
                .iter()
                .any(|k| r.json.as_ref().and_then(|j| j["hash"].as_str()) == Some(expected_hash(k).as_str())),
            "a registration of neither host key: {r:#?}"
        );
    }
    assert_registration(request_for(&reqs, &ed), connection, &ed);
    assert_registration(request_for(&reqs, &ec), connection, &ec);
    let logged = wait_for(Duration::from_secs(5), || {
        let lines = d.audit("fingerprint_registered");
        (lines.len() >= 2).then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "no 2 fingerprint_registered audit lines: {:?}",
            d.audit("fingerprint_registered")
        )
    });
    for key in [&ed, &ec] {
        let hash = expected_hash(key);
        assert!(
            logged.iter().any(|l| l["fields"]["hash"] == hash.as_str()
                && l["fields"]["connection"] == connection
                && l["fields"]["message"] == APPROVED),
            "no fingerprint_registered line for {hash}: {logged:#?}"
        );
    }
    assert_eq!(
        d.metric_or_zero(
            "jumpgate_service_api_requests_total",
            &[("endpoint", "register_fingerprint"), ("result", "ok")]
        ),
        2.0
    );
    assert_eq!(
        d.metric_or_zero(
            "jumpgate_service_api_requests_total",
            &[("endpoint", "register_fingerprint"), ("result", "retried")]
        ),
        1.0
    );
    // One POST per host key, plus the one answered 429: nothing registered twice.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(api.requests().len(), 3, "{:#?}", api.requests());
    assert_no_secret(&d.stderr_lines().join("\n"), "the daemon's log");
}

#[test]
fn start_up_registration_refused_is_logged_and_counted_and_ssh_still_serves() {
    let api = Api::start();
    let connection = "conn_refused";
    api.fallback(
        &fingerprints_path(connection),
        Reply::Unauthorized("Invalid API credentials (marker-startup-401)".into()),
    );
    let lab = Lab::new();
    let user = lab.key("user_ed25519", "ed25519");
    lab.authorize(&[user.line("")]);
    let ed = lab.key("host_ed25519", "ed25519");
    let ssh = SshConfig {
        extra: host_keys_line(&[&ed]),
        tail: service_table(&api, lab.path(), &[connection]),
        ..base_ssh()
    };
    let d = Daemon::start(&lab.config(&ssh, no_dns()));

    let counted = wait_until(Duration::from_secs(10), || {
        d.metric_or_zero(
            "jumpgate_service_api_requests_total",
            &[("endpoint", "register_fingerprint"), ("result", "unauthorized")],
        ) >= 1.0
    });
    assert!(counted, "a 401 at start-up is not counted as unauthorized");
    let logged = wait_until(Duration::from_secs(5), || {
        d.stderr_lines()
            .iter()
            .any(|l| l.contains("marker-startup-401") && l.contains("401"))
    });
    assert!(
        logged,
        "no log line with the service's 401 message:\n{}",
        d.stderr_lines().join("\n")
    );
    assert_eq!(
        d.get("/readyz/ssh").0,
        200,
        "a failed registration must not unready the SSH role"
    );
    assert!(d.audit("fingerprint_registered").is_empty());
    // 401 is not retried.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        api.requests_to(&fingerprints_path(connection)).len(),
        1,
        "{:#?}",
        api.requests()
    );
    assert_no_secret(&d.stderr_lines().join("\n"), "the daemon's log");
}

// ---------------------------------------------------------------- jumpgate register-fingerprint

/// A lab with host keys `kinds` (as key files) and a `[service]` table
/// pointing at `api`; the config file's path and the host keys.
fn cli_lab(api: &Api, kinds: &[&str]) -> (Lab, String, Vec<UserKey>) {
    let lab = Lab::new();
    let keys: Vec<UserKey> = kinds.iter().map(|k| lab.key(&format!("host_{k}"), k)).collect();
    let ssh = SshConfig {
        extra: host_keys_line(&keys.iter().collect::<Vec<_>>()),
        tail: service_table(api, lab.path(), &[]),
        ..base_ssh()
    };
    let path = lab.write_config(&ssh, no_dns());
    let path = path.to_str().expect("utf-8 path").to_string();
    (lab, path, keys)
}

/// `jumpgate register-fingerprint --config PATH --connection-id ID`: (exit code, stdout, stderr).
fn register(config: &str, connection: &str) -> (i32, String, String) {
    run_cli(&[
        "register-fingerprint",
        "--config",
        config,
        "--connection-id",
        connection,
    ])
}

#[test]
fn register_fingerprint_posts_each_host_key_and_exits_0_on_success() {
    let api = Api::start();
    let connection = "conn_cli_ok";
    api.fallback(&fingerprints_path(connection), Reply::Success(APPROVED.into()));
    let (_lab, config, keys) = cli_lab(&api, &["ed25519", "ecdsa"]);

    let (code, out, err) = register(&config, connection);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let reqs = api.requests();
    assert_eq!(reqs.len(), 2, "one POST per host key: {reqs:#?}");
    for key in &keys {
        assert_registration(request_for(&reqs, key), connection, key);
        let hash = expected_hash(key);
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("SHA256:{hash}")) && l.contains(APPROVED)),
            "stdout should name SHA256:{hash} with the service's message:\n{out}"
        );
    }
    assert_no_secret(&out, "stdout");
    assert_no_secret(&err, "stderr");
}

#[test]
fn register_fingerprint_takes_env_credentials_and_the_api_url_flag() {
    let api = Api::start();
    let connection = "conn_cli_env";
    api.fallback(&fingerprints_path(connection), Reply::Success(APPROVED.into()));
    let lab = Lab::new();
    let key = lab.key("host_ed25519", "ed25519");
    // No [service] table: credentials from the environment, URL from the flag.
    let ssh = SshConfig {
        extra: host_keys_line(&[&key]),
        ..base_ssh()
    };
    let config = lab.write_config(&ssh, no_dns());
    let (code, out, err) = run_cli_env(
        &[
            "register-fingerprint",
            "--config",
            config.to_str().expect("utf-8 path"),
            "--connection-id",
            connection,
            "--api-url",
            &api.url(),
        ],
        &[("FIVETRAN_API_KEY", API_KEY), ("FIVETRAN_API_SECRET", API_SECRET)],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let reqs = api.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_registration(&reqs[0], connection, &key);
    assert_no_secret(&out, "stdout");
    assert_no_secret(&err, "stderr");
}

#[test]
fn register_fingerprint_exits_1_with_the_services_message_on_401_and_403() {
    for (status, reply) in [
        (
            401,
            Reply::Unauthorized("Invalid API credentials (marker-cli-401)".into()),
        ),
        (
            403,
            Reply::Raw {
                status: 403,
                body: r#"{"code":"Forbidden","message":"marker-cli-403"}"#.into(),
            },
        ),
    ] {
        let api = Api::start();
        let connection = "conn_cli_denied";
        api.fallback(&fingerprints_path(connection), reply);
        let (_lab, config, keys) = cli_lab(&api, &["ed25519"]);

        let (code, out, err) = register(&config, connection);
        assert_eq!(code, 1, "{status}: stdout:\n{out}\nstderr:\n{err}");
        assert!(
            err.contains(&format!("marker-cli-{status}"))
                && err.contains(&format!("HTTP {status}"))
                && err.contains("refused our credentials"),
            "{status}: stderr should say the credentials were refused, with the service's message:\n{err}"
        );
        let reqs = api.requests();
        assert_eq!(reqs.len(), 1, "{status} is not retried: {reqs:#?}");
        assert_registration(&reqs[0], connection, &keys[0]);
        assert_no_secret(&out, "stdout");
        assert_no_secret(&err, "stderr");
    }
}

#[test]
fn register_fingerprint_exits_1_on_malformed_json_and_on_a_refusal_code() {
    for (what, reply, expect) in [
        ("malformed JSON", Reply::Malformed, "not the JSON"),
        (
            "a non-Success code",
            Reply::Raw {
                status: 200,
                body: r#"{"code":"InvalidInput","message":"marker-invalid-input"}"#.into(),
            },
            "marker-invalid-input",
        ),
        (
            "JSON without a code",
            Reply::Raw {
                status: 200,
                body: r#"{"message":"marker-no-code"}"#.into(),
            },
            "code",
        ),
    ] {
        let api = Api::start();
        let connection = "conn_cli_bad";
        api.fallback(&fingerprints_path(connection), reply);
        let (_lab, config, _keys) = cli_lab(&api, &["ed25519"]);

        let (code, out, err) = register(&config, connection);
        assert_eq!(code, 1, "{what}: stdout:\n{out}\nstderr:\n{err}");
        assert!(err.contains(expect), "{what}: stderr should say {expect:?}:\n{err}");
        assert_eq!(api.requests().len(), 1, "{what}: not retried: {:#?}", api.requests());
        assert_no_secret(&out, "stdout");
        assert_no_secret(&err, "stderr");
    }
}

#[test]
fn register_fingerprint_waits_retry_after_on_429_then_succeeds() {
    let api = Api::start();
    let connection = "conn_cli_429";
    let path = fingerprints_path(connection);
    api.script(&path, vec![Reply::TooMany { retry_after: 1 }]);
    api.fallback(&path, Reply::Success(APPROVED.into()));
    let (_lab, config, keys) = cli_lab(&api, &["ed25519"]);

    let (code, out, err) = register(&config, connection);
    assert_eq!(code, 0, "429 then success must succeed; stdout:\n{out}\nstderr:\n{err}");
    let reqs = api.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    for r in &reqs {
        assert_registration(r, connection, &keys[0]);
    }
    let gap = reqs[1].at - reqs[0].at;
    // The first retry pause is 0.5 s; Retry-After: 1 must stretch it.
    assert!(
        gap >= Duration::from_millis(900),
        "retried after {gap:?}, before the 1 s Retry-After"
    );
    assert_no_secret(&out, "stdout");
    assert_no_secret(&err, "stderr");
}

#[test]
fn register_fingerprint_gives_up_after_retries_on_repeated_500() {
    let api = Api::start();
    let connection = "conn_cli_500";
    api.fallback(
        &fingerprints_path(connection),
        Reply::ServerError("marker-internal-error".into()),
    );
    let (_lab, config, _keys) = cli_lab(&api, &["ed25519"]);

    let (code, out, err) = register(&config, connection);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("500") && err.contains("marker-internal-error"),
        "stderr should say HTTP 500 and the service's message:\n{err}"
    );
    let reqs = api.requests();
    assert_eq!(reqs.len(), 4, "4 attempts in all: {reqs:#?}");
    let spread = reqs[3].at - reqs[0].at;
    assert!(
        spread >= Duration::from_millis(3000),
        "backoff (0.5 s, 1 s, 2 s) not waited: attempts spread over {spread:?}"
    );
    assert_no_secret(&out, "stdout");
    assert_no_secret(&err, "stderr");
}

// ---------------------------------------------------------------- the service's group key

/// A one-shot `ssh -W target` signing with rsa-sha2-512 only.
fn through(b: &Bastion, key: &UserKey, target: &str) -> Ran {
    run(
        b.ssh(key, &["-W", target, "-o", "PubkeyAcceptedAlgorithms=rsa-sha2-512"]),
        RUN_LIMIT,
    )
}

fn assert_reached(ran: &Ran, what: &str) {
    assert!(
        ran.ok() && ran.stdout == "hello from 127.0.0.2\n",
        "{what}: expected to reach the echo upstream on 127.0.0.2; got {ran:#?}"
    );
    assert!(
        ran.stderr.contains("Authenticated to 127.0.0.1") && ran.stderr.contains("rsa-sha2-512"),
        "{what}: expected publickey authentication with rsa-sha2-512:\n{}",
        ran.stderr
    );
}

fn assert_refused(ran: &Ran, what: &str) {
    assert!(
        !ran.ok() && ran.stdout.is_empty() && !ran.stderr.contains("Authenticated to"),
        "{what}: expected authentication to fail, got {ran:#?}"
    );
    assert!(
        ran.stderr.contains("Permission denied"),
        "{what}: expected `Permission denied`:\n{}",
        ran.stderr
    );
}

/// `type base64` of a key line, without its comment.
fn key_blob(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

#[test]
fn service_group_key_admits_its_holder_and_a_restart_without_the_api_uses_the_cache() {
    let up = Upstream::bind([127, 0, 0, 2].into(), 0, Behavior::Echo).expect("bind 127.0.0.2");
    let target = up.addr().to_string();
    let mut api = Api::start();
    let lab = Lab::new();
    let service = lab.key("service_rsa", "rsa");
    let other = lab.key("other_rsa", "rsa");
    let group = "grp_main";
    api.fallback(&group_path(group), Reply::GroupKey(service.public.clone()));
    let ssh = SshConfig {
        allow: allow_cidr("127.0.0.2/32", &[up.port()]),
        user_extra: format!("service_group = \"{group}\"\n"),
        tail: service_table(&api, lab.path(), &[]),
        ..base_ssh()
    };

    let b = lab.start(&ssh, no_dns());
    let reqs = api.wait_requests(&group_path(group), 1, Duration::from_secs(5));
    assert_eq!(reqs[0].method, "GET", "{reqs:#?}");
    assert_eq!(
        reqs[0].authorization.as_deref(),
        Some(basic_auth(API_KEY, API_SECRET).as_str()),
        "{reqs:#?}"
    );
    assert_reached(&through(&b, &service, &target), "the group's RSA key");
    assert_refused(&through(&b, &other, &target), "another RSA key");
    let cache = lab.state_dir().join(format!("service_group_{group}.pub"));
    let cached = std::fs::read_to_string(&cache).unwrap_or_else(|e| panic!("no cache at {}: {e}", cache.display()));
    assert_eq!(key_blob(&cached), key_blob(&service.public), "cached key");
    assert!(
        b.daemon.metric_or_zero(
            "jumpgate_service_api_requests_total",
            &[("endpoint", "group_public_key"), ("result", "ok")]
        ) >= 1.0
    );
    assert_no_secret(&b.daemon.stderr_lines().join("\n"), "the daemon's log");
    drop(b);

    // The API is gone: the same state_dir still admits the service.
    api.stop();
    let b = lab.start(&ssh, no_dns());
    assert_reached(&through(&b, &service, &target), "the cached group key after a restart");
    assert_refused(&through(&b, &other, &target), "another RSA key after a restart");
    let counted = wait_until(Duration::from_secs(5), || {
        b.daemon.metric_or_zero(
            "jumpgate_service_api_requests_total",
            &[("endpoint", "group_public_key"), ("result", "network")],
        ) >= 1.0
    });
    assert!(counted, "the unreachable API is not counted as a network failure");
    assert_eq!(
        up.accepted(),
        2,
        "only the group key's two sessions reached the upstream"
    );
}

#[test]
fn service_group_key_is_fetched_again_every_refresh() {
    let up = Upstream::bind([127, 0, 0, 2].into(), 0, Behavior::Echo).expect("bind 127.0.0.2");
    let target = up.addr().to_string();
    let api = Api::start();
    let lab = Lab::new();
    let (old, new) = (lab.key("old_rsa", "rsa"), lab.key("new_rsa", "rsa"));
    let group = "grp_rotate";
    let path = group_path(group);
    api.script(&path, vec![Reply::GroupKey(old.public.clone())]);
    api.fallback(&path, Reply::GroupKey(new.public.clone()));
    let ssh = SshConfig {
        allow: allow_cidr("127.0.0.2/32", &[up.port()]),
        user_extra: format!("service_group = \"{group}\"\n"),
        tail: service_table(&api, lab.path(), &[]).replace("refresh = \"1h\"", "refresh = \"10s\""),
        ..base_ssh()
    };
    let b = lab.start(&ssh, no_dns());
    assert_reached(&through(&b, &old, &target), "the group key before the rotation");
    assert_refused(&through(&b, &new, &target), "the next key before the refresh");

    let reqs = api.wait_requests(&path, 2, Duration::from_secs(15));
    let gap = reqs[1].at - reqs[0].at;
    assert!(
        gap >= Duration::from_millis(9500),
        "fetched again after {gap:?}, before refresh = 10s"
    );
    let rotated = wait_until(Duration::from_secs(5), || through(&b, &new, &target).ok());
    assert!(rotated, "the rotated key is not accepted after the refresh");
    assert_refused(&through(&b, &old, &target), "the old key after the rotation");
}

#[test]
fn without_any_service_key_nobody_is_admitted_and_readyz_ssh_says_why() {
    let up = Upstream::bind([127, 0, 0, 2].into(), 0, Behavior::Echo).expect("bind 127.0.0.2");
    let target = up.addr().to_string();
    let mut api = Api::start();
    let lab = Lab::new();
    let service = lab.key("service_rsa", "rsa");
    let group = "grp_none";
    api.fallback(
        &group_path(group),
        Reply::Unauthorized("Invalid API credentials (marker-group-401)".into()),
    );
    let ssh = SshConfig {
        allow: allow_cidr("127.0.0.2/32", &[up.port()]),
        user_extra: format!("service_group = \"{group}\"\n"),
        tail: service_table(&api, lab.path(), &[]),
        ..base_ssh()
    };
    // The user's only key is the group's: no authorized_keys at all.
    let text: String = lab
        .config(&ssh, no_dns())
        .lines()
        .filter(|l| !l.starts_with("authorized_keys"))
        .map(|l| format!("{l}\n"))
        .collect();
    let b = lab.bastion(Daemon::start(&text));
    b.write_known_hosts(&lab.host_public_keys());

    let why = wait_for(Duration::from_secs(5), || {
        let (status, body) = b.daemon.get("/readyz/ssh");
        (status == 503 && body.contains("401")).then_some(body)
    })
    .unwrap_or_else(|| {
        panic!(
            "/readyz/ssh should be 503 naming the 401: {:?}",
            b.daemon.get("/readyz/ssh")
        )
    });
    assert!(
        why.contains("credentials") && why.contains("marker-group-401"),
        "/readyz/ssh should say the credentials were refused, with the service's message: {why}"
    );
    assert_eq!(b.daemon.get("/readyz").0, 503);
    assert_refused(
        &through(&b, &service, &target),
        "the group's key that was never fetched",
    );
    assert!(
        b.daemon.metric_or_zero(
            "jumpgate_service_api_requests_total",
            &[("endpoint", "group_public_key"), ("result", "unauthorized")]
        ) >= 1.0
    );
    assert_no_secret(&why, "/readyz/ssh");
    drop(b);

    // The API down and nothing cached: still nobody, and /readyz/ssh says so.
    api.stop();
    let lab = Lab::new();
    let ssh = SshConfig {
        tail: service_table(&api, lab.path(), &[]),
        ..ssh
    };
    let b = lab.bastion(Daemon::start(&lab.config(&ssh, no_dns())));
    let (status, body) = b.daemon.get("/readyz/ssh");
    assert_eq!(status, 503, "{body}");
    let why = wait_for(Duration::from_secs(10), || {
        let (status, body) = b.daemon.get("/readyz/ssh");
        (status == 503 && body.contains("cannot reach")).then_some(body)
    })
    .unwrap_or_else(|| {
        panic!(
            "/readyz/ssh should say the API cannot be reached: {:?}",
            b.daemon.get("/readyz/ssh")
        )
    });
    assert!(why.contains(&api.url()) || why.contains("127.0.0.1"), "{why}");
    assert_eq!(up.accepted(), 0);
}

// ---------------------------------------------------------------- host keys from cmd: and env:

/// `ssh-keyscan -p PORT -t ed25519 127.0.0.1`, fingerprinted by `ssh-keygen -l`.
fn keyscan(dir: &Path, port: u16) -> Vec<String> {
    let scan = run_ok(
        &program("ssh-keyscan", "openssh-client"),
        &[
            "-T",
            "5",
            "-p",
            &port.to_string(),
            "-t",
            "ed25519,ecdsa,rsa",
            "127.0.0.1",
        ],
    );
    let file = dir.join(format!("keyscan-{port}"));
    std::fs::write(&file, &scan).expect("write keyscan");
    keygen_fingerprints(&file).into_iter().map(|f| f.hash).collect()
}

/// The base64 body lines of an OpenSSH private key file: none may ever be printed.
fn private_key_lines(key: &UserKey) -> Vec<String> {
    std::fs::read_to_string(&key.path)
        .expect("read private key")
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
        .map(str::to_string)
        .collect()
}

fn assert_no_key_material(text: &str, key: &UserKey, what: &str) {
    for line in private_key_lines(key) {
        assert!(!text.contains(&line), "{what} shows private key material:\n{text}");
    }
}

#[test]
fn daemons_from_one_cmd_or_env_source_present_the_same_host_key() {
    let keys = Lab::new();
    let shared = keys.key("shared_host_ed25519", "ed25519");
    let expected = shared.fingerprint();
    let source = format!("cmd:cat {}", shared.path.display());
    let ssh = SshConfig {
        extra: format!("host_keys = [\"{source}\"]\n"),
        ..base_ssh()
    };
    let (lab_a, lab_b, lab_c) = (Lab::new(), Lab::new(), Lab::new());
    let a = Daemon::start(&lab_a.config(&ssh, no_dns()));
    let b = Daemon::start(&lab_b.config(&ssh, no_dns()));
    let key_text = std::fs::read_to_string(&shared.path).expect("read key");
    let env_ssh = SshConfig {
        extra: "host_keys = [\"env:JUMPGATE_IT_HOST_KEY\"]\n".into(),
        ..base_ssh()
    };
    let c = Daemon::try_start_env(
        &lab_c.config(&env_ssh, no_dns()),
        &[("JUMPGATE_IT_HOST_KEY", &key_text)],
    )
    .unwrap_or_else(|f| panic!("env: source did not start: {f:?}"));

    for (name, d, lab) in [
        ("cmd: daemon A", &a, &lab_a),
        ("cmd: daemon B", &b, &lab_b),
        ("env: daemon", &c, &lab_c),
    ] {
        let port = d.ssh.expect("ssh address").port();
        assert_eq!(keyscan(lab.path(), port), [expected.as_str()], "{name}: ssh-keyscan");
        // Never a silently generated key beside the configured one.
        let generated: Vec<_> = std::fs::read_dir(lab.state_dir())
            .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            !generated.iter().any(|f| f.to_string_lossy().starts_with("ssh_host_")),
            "{name}: a host key was generated: {generated:?}"
        );
        assert_no_key_material(&d.stderr_lines().join("\n"), &shared, name);
    }

    // check and fingerprint read the same source and never print the key.
    let config = lab_a.write_config(&ssh, no_dns());
    let config = config.to_str().expect("utf-8 path");
    let (code, out, err) = run_cli(&["check", "--config", config]);
    assert_eq!(code, 0, "check: {out}\n{err}");
    assert_no_key_material(&format!("{out}\n{err}"), &shared, "check");
    let (code, out, err) = run_cli(&["fingerprint", "--config", config]);
    assert_eq!(code, 0, "fingerprint: {out}\n{err}");
    assert!(out.contains(&expected), "fingerprint should print {expected}:\n{out}");
    assert_no_key_material(&format!("{out}\n{err}"), &shared, "fingerprint");
}

#[test]
fn a_failing_host_key_source_stops_start_up_naming_it_without_the_key() {
    let keys = Lab::new();
    let real = keys.key("real_host_ed25519", "ed25519");
    let marker = "MARKERq8Z3kP0wNvX7yT2";
    let garbage = keys.path().join("garbage_key");
    std::fs::write(
        &garbage,
        format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE{marker}AAAA\n-----END OPENSSH PRIVATE KEY-----\n"
        ),
    )
    .expect("write garbage key");
    let unset = "JUMPGATE_IT_HOST_KEY_NEVER_SET";
    // (entry, the value of JUMPGATE_IT_HOST_KEY if set, what the message says)
    let var = "JUMPGATE_IT_HOST_KEY";
    let cases: Vec<(String, Option<String>, &str)> = vec![
        ("cmd:false".into(), None, "failed"),
        (
            format!("cmd:cat {}", garbage.display()),
            None,
            "not an unencrypted OpenSSH private key",
        ),
        (format!("cmd:cat {}; exit 3", real.path.display()), None, "failed"),
        (format!("env:{unset}"), None, "not set"),
        (
            format!("env:{var}"),
            Some(std::fs::read_to_string(&garbage).expect("read")),
            "not an unencrypted OpenSSH private key",
        ),
    ];
    for (entry, value, why) in &cases {
        let lab = Lab::new();
        let ssh = SshConfig {
            extra: format!("host_keys = [\"{entry}\"]\n"),
            ..base_ssh()
        };
        let env: Vec<(&str, &str)> = value.iter().map(|v| (var, v.as_str())).collect();
        let failure = match Daemon::try_start_env(&lab.config(&ssh, no_dns()), &env) {
            Ok(_) => panic!("{entry}: the daemon started"),
            Err(f) => f,
        };
        assert_eq!(failure.status.and_then(|s| s.code()), Some(1), "{entry}: {failure:?}");
        assert!(
            failure.stderr.contains(entry.as_str()) && failure.stderr.contains("host_keys"),
            "{entry}: the message should name the entry and the field:\n{}",
            failure.stderr
        );
        assert!(
            failure.stderr.contains(why),
            "{entry}: should say {why:?}:\n{}",
            failure.stderr
        );
        assert!(
            !failure.stderr.contains(marker),
            "{entry}: the message shows the key:\n{}",
            failure.stderr
        );
        assert_no_key_material(&failure.stderr, &real, entry);
        let generated = std::fs::read_dir(lab.state_dir()).map(|d| d.count()).unwrap_or(0);
        assert_eq!(generated, 0, "{entry}: nothing may be generated in state_dir");
    }
}
