//! The command line: `jumpgate run` and `jumpgate check`.
//!
//! Exit codes: 0 clean exit (signal, idle exit), 1 config or start-up error
//! (the message names the file, the table, the field and the fix), 2 usage
//! (clap's own code for a bad command line).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing::{error, info};

use crate::config::{Config, DEFAULT_PATH, Host, HostKeyType, OnChange};
use crate::daemon::{self, App, StartError};
use crate::dns;
use crate::ssh::keys;

/// jumpgate: let a data-pipeline service reach databases in a private network.
#[derive(Debug, Parser)]
#[command(name = "jumpgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: every role the config turns on, plus the admin endpoint.
    Run {
        /// Config file; the embedded default stands in for config/jumpgate.toml when that file is missing.
        #[arg(long, env = "JUMPGATE_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Once every listener is bound, write their addresses here as JSON (atomically).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate the config, resolve its names and print the plan; exit 1 on a config error.
    Check {
        /// Config file, as for `run`.
        #[arg(long, env = "JUMPGATE_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Also connect to every target (forward targets, SSH allow rules that name a host, tunnel
        /// `connect`s) and say whether its database answers and offers TLS; exit 1 if any is unreachable.
        #[arg(long)]
        probe: bool,
    },
    /// Write a new OpenSSH key pair: PATH (private, mode 0600) and PATH.pub.
    Keygen {
        /// Key type.
        #[arg(long = "type", value_enum, default_value_t = HostKeyType::Ed25519)]
        key_type: HostKeyType,
        /// Where to write the private key; the public key goes to PATH.pub. An existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print what the service's connector form needs for each configured role, and what to send the service.
    SetupInfo {
        /// Config file, as for `run`.
        #[arg(long, env = "JUMPGATE_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Approve this bastion's host keys for a connection through the service's API (no manual approval).
    RegisterFingerprint {
        /// Config whose [ssh] host keys to register (and whose [service] credentials to use).
        #[arg(long, env = "JUMPGATE_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// The service's connection id.
        #[arg(long)]
        connection_id: String,
        /// The API base URL (default: [service] api_url, else https://api.fivetran.com).
        #[arg(long)]
        api_url: Option<String>,
    },
    /// Print host key fingerprints like `ssh-keygen -l`: the configured host keys, or one key file.
    Fingerprint {
        /// Config whose [ssh] host keys to show (generated ones are read from state_dir).
        #[arg(long, env = "JUMPGATE_CONFIG", default_value = DEFAULT_PATH, conflicts_with = "key")]
        config: PathBuf,
        /// A public or private key file instead.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

/// Runs the parsed command and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config, ready_file } => run(&config, ready_file),
        Command::Check { config, probe } => check(&config, probe),
        Command::Keygen { key_type, out } => keygen(key_type, &out),
        Command::Fingerprint { config, key } => fingerprint(&config, key.as_deref()),
        Command::SetupInfo { config, json } => setup_info(&config, json),
        Command::RegisterFingerprint {
            config,
            connection_id,
            api_url,
        } => register_fingerprint(&config, &connection_id, api_url.as_deref()),
    }
}

/// How long one probe may take (connect and first exchange).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// `check --probe`: what the service's setup test will find, from this host;
/// the number of targets that could not be reached.
async fn probe_targets(config: &Config, resolver: &mut LazyResolver) -> usize {
    let mut targets: Vec<(String, crate::config::Target)> = Vec::new();
    for f in &config.forward {
        targets.push((format!("forward {:?}", f.name), f.target.clone()));
    }
    if let Some(ssh) = &config.ssh {
        for rule in &ssh.policy.allow {
            match &rule.target {
                crate::policy::RuleTarget::Host(pattern) if pattern.exact().is_some() => {
                    for &port in &rule.ports {
                        targets.push((
                            format!("ssh allow {}", rule.label),
                            crate::config::Target {
                                host: Host::Name(rule.label.clone()),
                                port,
                            },
                        ));
                    }
                }
                _ => println!(
                    "probe    ssh allow {}: not probed (a wildcard or CIDR names no single host)",
                    rule.label
                ),
            }
        }
    }
    for t in &config.tunnel {
        for r in &t.remotes {
            targets.push((format!("tunnel {:?}", t.name), r.connect.clone()));
        }
    }
    let mut unreachable = 0;
    for (what, target) in &targets {
        let addrs: Vec<std::net::IpAddr> = match &target.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => match resolver.lookup(&config.dns, name).await {
                Ok(res) => res.addresses().collect(),
                Err(Unresolved::NoResolver(e)) => {
                    unreachable += 1;
                    println!("probe    {what} {target}: cannot resolve: {e}");
                    continue;
                }
                Err(Unresolved::Lookup(e)) => {
                    unreachable += 1;
                    println!("probe    {what} {target}: does not resolve: {e}");
                    continue;
                }
            },
        };
        let protocol = crate::probe::Protocol::by_port(target.port);
        for ip in addrs {
            let addr = std::net::SocketAddr::new(ip, target.port);
            match crate::probe::probe(addr, protocol, PROBE_TIMEOUT).await {
                Ok(result) => println!("probe    {what} {target}: {result}"),
                Err(e) => {
                    unreachable += 1;
                    println!("probe    {what} {target}: {addr} {e}");
                }
            }
        }
    }
    unreachable
}

/// A resolver made at the first name to look up (none is needed for a
/// config of addresses only); one for all of `check`'s lookups.
#[derive(Default)]
struct LazyResolver(Option<Result<dns::Resolver, String>>);

enum Unresolved {
    /// No resolver could be made from `[dns]`.
    NoResolver(String),
    /// The name does not resolve now.
    Lookup(String),
}

impl LazyResolver {
    async fn lookup(&mut self, config: &crate::config::DnsConfig, name: &str) -> Result<dns::Resolved, Unresolved> {
        let resolver = self
            .0
            .get_or_insert_with(|| dns::Resolver::new(config).map_err(|e| e.to_string()));
        match resolver {
            Err(e) => Err(Unresolved::NoResolver(e.clone())),
            Ok(r) => r.lookup(name).await.map_err(|e| Unresolved::Lookup(e.to_string())),
        }
    }
}

fn keygen(kind: HostKeyType, out: &Path) -> ExitCode {
    let pub_path = keys::pub_path(out);
    if out.exists() || pub_path.exists() {
        eprintln!(
            "error: {} or its .pub exists already: jumpgate never overwrites a key (move it away or pick another --out)",
            out.display()
        );
        return ExitCode::from(1);
    }
    match keys::generate(kind, out) {
        Ok(key) => {
            println!("{}", keys::fingerprint_line(key.public_key()));
            println!("private key: {} (mode 0600)", out.display());
            println!("public key:  {}", pub_path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn setup_info(path: &Path, json: bool) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(1);
    };
    let mut failed = false;
    let mut tunnels = Vec::new();
    for t in &config.tunnel {
        let public_key = keys::read_any_public(&t.identity)
            .or_else(|_| keys::read_any_public(&keys::pub_path(&t.identity)))
            .and_then(|k| {
                k.to_openssh().map_err(|e| keys::KeyError::Read {
                    path: t.identity.display().to_string(),
                    why: e.to_string(),
                })
            });
        let public_key = match public_key {
            Ok(k) => k,
            Err(e) => {
                failed = true;
                eprintln!("error: tunnel {:?}: {e}", t.name);
                continue;
            }
        };
        for r in &t.remotes {
            tunnels.push(serde_json::json!({
                "tunnel": t.name,
                "host": "localhost",
                "port": r.port,
                "ssh_host": t.server.host.to_string(),
                "ssh_port": t.server.port,
                "ssh_server": t.server.to_string(),
                "ssh_user": t.user,
                "public_key": public_key,
                "connect": r.connect.to_string(),
            }));
        }
    }
    let mut ssh = serde_json::Value::Null;
    if let Some(s) = &config.ssh {
        let fingerprints: Vec<String> = s
            .host_keys
            .iter()
            .filter_map(|source| keys::configured_public(source, &config.state_dir).ok())
            .map(|k| keys::fingerprint_line(&k))
            .collect();
        ssh = serde_json::json!({
            "ssh_host": "<this host's public DNS name or its load balancer's>",
            "ssh_port": s.listen.port(),
            "ssh_users": s.users.iter().map(|u| u.name.clone()).collect::<Vec<_>>(),
            "expected_keys": s.users.iter().map(|u| {
                let mut keys = Vec::new();
                if let Some(path) = &u.authorized_keys {
                    keys.push(format!("keys in {}", path.display()));
                }
                if let Some(group) = &u.service_group {
                    let cached = crate::ssh::keyfile::GroupKey::cache_path(&config.state_dir, group);
                    match std::fs::read_to_string(&cached) {
                        Ok(line) => keys.push(format!("the service's key for group {group}: {}", line.trim())),
                        Err(_) => keys.push(format!("the service's key for group {group} (fetched from its API at start)")),
                    }
                }
                serde_json::json!({ "user": u.name, "keys": keys })
            }).collect::<Vec<_>>(),
            "host_key_fingerprints": fingerprints,
            "registered_by_api": config.service.as_ref().is_some_and(|svc| !svc.connection_ids.is_empty()),"databases": s.policy.allow.iter().map(|r| format!("{} ports {:?}", r.label, r.ports)).collect::<Vec<_>>(),
        });
    }
    if json {
        println!("{}", serde_json::json!({ "tunnels": tunnels, "ssh": ssh }));
    } else {
        for t in &tunnels {
            let field = |k: &str| t[k].as_str().map(str::to_string).unwrap_or_else(|| t[k].to_string());
            println!(
                "tunnel {:?}: the service reaches {} through it; in its connector form:",
                field("tunnel"),
                field("connect")
            );
            println!("  Host:       localhost");
            println!("  Port:       {}", field("port"));
            println!("  SSH host:   {}:{}", field("ssh_host"), field("ssh_port"));
            println!("  SSH user:   {}", field("ssh_user"));
            println!("  public key: {}", field("public_key"));
            println!("  (send the service this public key, jumpgate's identity, and the port above)");
        }
        if !ssh.is_null() {
            println!("ssh bastion (the service connects to jumpgate over SSH)");
            println!("  in the service's connector form:");
            println!("    SSH host:  {}", ssh["ssh_host"].as_str().unwrap_or_default());
            println!("    SSH port:  {}", ssh["ssh_port"]);
            for u in ssh["ssh_users"].as_array().into_iter().flatten() {
                println!("    SSH user:  {}", u.as_str().unwrap_or_default());
            }
            for u in ssh["expected_keys"].as_array().into_iter().flatten() {
                for k in u["keys"].as_array().into_iter().flatten() {
                    println!("  user {} logs in with {}", u["user"], k.as_str().unwrap_or_default());
                }
            }
            if ssh["registered_by_api"].as_bool() == Some(true) {
                println!("  host keys: registered with the service's API at start-up ([service] connection_ids)");
            } else {
                println!(
                    "  no API key at hand: in the service's setup test, approve the host key only if it is one of these"
                );
                println!("  (the service shows the part after SHA256:):");
            }
            let fps = ssh["host_key_fingerprints"].as_array().cloned().unwrap_or_default();
            if fps.is_empty() {
                println!("    (no host key yet: `jumpgate run` generates them on first start)");
            }
            for f in fps {
                println!("    {}", f.as_str().unwrap_or_default());
            }
        }
        if tunnels.is_empty() && ssh.is_null() {
            println!("nothing to set up: the config has neither [ssh] nor [[tunnel]]");
        }
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

/// The public halves of the configured host keys (generated ones from state_dir).
fn host_public_keys(config: &Config) -> Result<Vec<russh::keys::PublicKey>, String> {
    let Some(ssh) = &config.ssh else {
        return Err(format!("{}: no [ssh] table: no host keys", config.file));
    };
    ssh.host_keys
        .iter()
        .map(|source| {
            keys::configured_public(source, &config.state_dir)
                .map_err(|e| format!("{e} (generated keys exist after the first `jumpgate run`)"))
        })
        .collect()
}

fn register_fingerprint(path: &Path, connection: &str, api_url: Option<&str>) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(1);
    };
    let keys_found = match host_public_keys(&config) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let (url, key, secret) = match &config.service {
        Some(s) => (s.api_url.clone(), s.api_key.clone(), s.api_secret.clone()),
        None => {
            let var = crate::config::env_credential;
            match (var("FIVETRAN_API_KEY"), var("FIVETRAN_API_SECRET")) {
                (Some(k), Some(s)) => (crate::config::DEFAULT_API_URL.to_string(), k, s),
                _ => {
                    eprintln!(
                        "error: no API credentials: set FIVETRAN_API_KEY and FIVETRAN_API_SECRET, or add a [service] table"
                    );
                    return ExitCode::from(1);
                }
            }
        }
    };
    let url = api_url.map_or(url, str::to_string);
    let client = match crate::service::ServiceClient::new(&url, key, secret) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut failed = false;
    rt.block_on(async {
        for k in &keys_found {
            let (hash, registered) = client.register_host_key(connection, k).await;
            match registered {
                Ok(message) => println!("{} SHA256:{hash}: {message}", k.algorithm()),
                Err(e) => {
                    failed = true;
                    eprintln!("error: {} SHA256:{hash}: {e}", k.algorithm());
                }
            }
        }
    });
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

fn fingerprint(config: &Path, key: Option<&Path>) -> ExitCode {
    if let Some(path) = key {
        return match keys::read_any_public(path) {
            Ok(k) => {
                println!("{}", keys::fingerprint_line(&k));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    let Some(config) = load(config) else {
        return ExitCode::from(1);
    };
    let Some(ssh) = &config.ssh else {
        eprintln!(
            "error: {}: no [ssh] table: no host keys to show (or use --key PATH)",
            config.file
        );
        return ExitCode::from(1);
    };
    let mut failed = false;
    for source in &ssh.host_keys {
        match keys::configured_public(source, &config.state_dir) {
            Ok(k) => println!("{}", keys::fingerprint_line(&k)),
            Err(e) => {
                failed = true;
                eprintln!("error: {e} (generated keys exist after the first `jumpgate run`)");
            }
        }
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

fn load(path: &Path) -> Option<Config> {
    match Config::load(path) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

fn run(path: &Path, ready_file: Option<PathBuf>) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(1);
    };
    crate::logging::init(&config.log);
    info!(config = %config.file, version = env!("CARGO_PKG_VERSION"), "starting");
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        let app = App::bind(config).await?;
        app.run(|info| {
            if let Some(path) = &ready_file {
                daemon::write_ready_file(path, info).map_err(|source| StartError::ReadyFile {
                    path: path.display().to_string(),
                    source,
                })?;
            }
            daemon::notify_systemd("READY=1");
            Ok(())
        })
        .await
    });
    // Connections were cut or drained by `run`; do not wait on stragglers.
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(exit) => {
            info!(?exit, "exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = %e, "start-up failed");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &Path, probe: bool) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(1);
    };
    println!("{}: ok", config.file);
    println!("admin    listen {}  (/metrics /healthz /readyz)", config.admin.listen);
    let d = &config.daemon;
    println!(
        "daemon   drain_delay {:?}, shutdown_grace {:?}, idle_exit {}",
        d.drain_delay,
        d.shutdown_grace,
        d.idle_exit.map_or_else(|| "off".to_string(), |t| format!("{t:?}"))
    );
    let ns = if config.dns.nameservers.is_empty() {
        "system resolver".to_string()
    } else {
        config
            .dns
            .nameservers
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "dns      {ns}; re-resolve after the TTL clamped to [{:?}, {:?}]",
        config.dns.min_ttl, config.dns.max_ttl
    );
    let mut warnings = 0;
    if let Some(ssh) = &config.ssh {
        println!("ssh      listen {}  (/readyz/ssh)", ssh.listen);
        for u in &ssh.users {
            let Some(path) = &u.authorized_keys else {
                println!(
                    "ssh      user {:?}: the service's key for group {}",
                    u.name,
                    u.service_group.as_deref().unwrap_or("?")
                );
                continue;
            };
            let keys = crate::ssh::authorized_keys::load(path);
            let n = match &keys {
                Ok(p) => {
                    for w in &p.warnings {
                        warnings += 1;
                        println!("warning: {w}");
                    }
                    format!("{} key(s)", p.keys.len())
                }
                Err(e) => {
                    warnings += 1;
                    format!("cannot read: {e}")
                }
            };
            println!("ssh      user {:?}: {} ({n})", u.name, path.display());
        }
        for rule in &ssh.policy.allow {
            println!("ssh      allow {} ports {:?}", rule.label, rule.ports);
        }
        let deny: Vec<String> = ssh.policy.deny.iter().map(|n| n.to_string()).collect();
        println!(
            "ssh      deny {}",
            if deny.is_empty() {
                "(nothing)".to_string()
            } else {
                deny.join(", ")
            }
        );
        if ssh.deny_is_weak {
            warnings += 1;
            println!(
                "warning: [ssh] deny lets channels reach loopback or the instance metadata address (169.254.169.254): \
                 fine for a local demo, dangerous on a bastion (remove `deny` to get the safe default)"
            );
        }
    }
    for t in &config.tunnel {
        let server_key = match &t.server_key {
            crate::config::ServerKey::Fingerprint(fp) => format!("server key {fp}"),
            crate::config::ServerKey::KnownHosts(p) => format!("server key from {}", p.display()),
        };
        println!(
            "tunnel   {:?}  {}@{}  ({server_key}; keepalive {:?} x {})",
            t.name, t.user, t.server, t.keepalive, t.keepalive_max
        );
        if let Err(e) = keys::read_private(&t.identity) {
            warnings += 1;
            println!("warning: tunnel {:?}: identity: {e}", t.name);
        }
        for r in &t.remotes {
            let bind = if r.bind_address.is_empty() {
                "*"
            } else {
                r.bind_address.as_str()
            };
            println!(
                "tunnel   {:?}  server listens on {bind}:{} -> {}  (/readyz/tunnel/{})",
                t.name, r.port, r.connect, t.name
            );
        }
    }
    if config.forward.is_empty() {
        println!("(no [[forward]] routes)");
        if !probe {
            if warnings > 0 {
                println!("{warnings} warning(s): see above");
            }
            return ExitCode::SUCCESS;
        }
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut resolver = LazyResolver::default();
    rt.block_on(async {
        for f in &config.forward {
            let resolved = match &f.target.host {
                Host::Ip(ip) => format!("fixed address {ip}"),
                Host::Name(name) => match resolver.lookup(&config.dns, name).await {
                    Ok(resolved) => {
                        let list: Vec<String> = resolved.addresses().map(|a| a.to_string()).collect();
                        format!("resolves to {} (ttl {}s)", list.join(", "), resolved.ttl.as_secs())
                    }
                    Err(Unresolved::NoResolver(e)) => {
                        warnings += 1;
                        format!("cannot resolve: {e}")
                    }
                    Err(Unresolved::Lookup(e)) => {
                        warnings += 1;
                        format!("does NOT resolve now: {e} (the daemon starts anyway; /readyz stays 503 until it does)")
                    }
                },
            };
            let on_change = match f.on_change {
                OnChange::Keep => "keep",
                OnChange::Close => "close",
            };
            println!(
                "forward  {:?}  listen {} -> {}  {}  [on_change {on_change}, connect_timeout {:?}, /readyz/forward/{}]",
                f.name, f.listen, f.target, resolved, f.connect_timeout, f.name
            );
        }
    });
    if warnings > 0 {
        println!("{warnings} warning(s): see above");
    }
    if probe {
        let unreachable = rt.block_on(probe_targets(&config, &mut resolver));
        if unreachable > 0 {
            println!("{unreachable} target(s) unreachable");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
