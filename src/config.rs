//! The TOML config: `Raw*` structs that mirror the file, then [`Config`], the
//! validated form the rest of the daemon trusts.
//!
//! Every error names the file, the table (with its index and `name` for array
//! tables), the field, what is wrong and how to fix it. Durations and addresses
//! are read as strings and parsed here so their errors can say all of that;
//! unknown fields are refused by serde (`deny_unknown_fields`), whose message
//! carries the line and column.
//!
//! Tables of roles that are not built yet (`[ssh]`, `[[tunnel]]`, `[service]`)
//! and keys whose behaviour is not built yet are
//! refused with a clear error: a config is never silently half-applied.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::{AllowRule, PermitOpen, Policy, parse_cidr};
use crate::service::Secret;
use std::sync::Arc;

/// The default config, embedded so a fresh machine can run `jumpgate run`
/// with no file at all (the repo's `config/jumpgate.toml`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/jumpgate.toml");
/// Where `--config` points when neither the flag nor `$JUMPGATE_CONFIG` is set.
pub const DEFAULT_PATH: &str = "config/jumpgate.toml";

/// A config error: printed as is, then the process exits 1.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source} (check the path given to --config or $JUMPGATE_CONFIG)")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {0}", file = .1)]
    Parse(#[source] toml::de::Error, String),
    #[error("{file}: {table}: {field}: {reason}")]
    Invalid {
        file: String,
        table: String,
        field: &'static str,
        reason: String,
    },
}

// ---------------------------------------------------------------- raw form

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    forward: Vec<RawForward>,
    // Roles built by later versions: parsed only to refuse them clearly.
    ssh: Option<RawSsh>,
    service: Option<RawService>,
    #[serde(default)]
    tunnel: Vec<RawTunnel>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// "text" or "json".
    #[serde(default = "default_log_format")]
    format: String,
    /// A level ("info") or a tracing filter ("info,jumpgate::dns=debug").
    #[serde(default = "default_log_level")]
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint.
    #[serde(default = "default_admin_listen")]
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    /// After SIGTERM: `/readyz` is 503 at once, listeners keep accepting this long.
    #[serde(default = "zero")]
    drain_delay: String,
    /// Then: stop accepting and wait this long for open connections.
    #[serde(default = "default_grace")]
    shutdown_grace: String,
    /// > 0: exit 0 after this long with no open connection.
    #[serde(default = "zero")]
    idle_exit: String,
}

impl Default for RawDaemon {
    fn default() -> Self {
        Self {
            drain_delay: zero(),
            shutdown_grace: default_grace(),
            idle_exit: zero(),
        }
    }
}

fn zero() -> String {
    "0s".into()
}
fn default_grace() -> String {
    "30s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    /// Empty: the system resolver config (/etc/resolv.conf); else "ip" or "ip:port".
    #[serde(default)]
    nameservers: Vec<String>,
    /// Floor of the re-resolve interval, whatever the record's TTL.
    #[serde(default = "default_min_ttl")]
    min_ttl: String,
    /// Ceiling of the re-resolve interval, whatever the record's TTL.
    #[serde(default = "default_max_ttl")]
    max_ttl: String,
}

impl Default for RawDns {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_ttl: default_min_ttl(),
            max_ttl: default_max_ttl(),
        }
    }
}

fn default_min_ttl() -> String {
    "1s".into()
}
fn default_max_ttl() -> String {
    "30s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    name: Option<String>,
    listen: Option<String>,
    target: Option<String>,
    #[serde(default = "default_on_change")]
    on_change: String,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
}

fn default_on_change() -> String {
    "keep".into()
}
fn default_connect_timeout() -> String {
    "5s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    #[serde(default = "default_ssh_listen")]
    listen: String,
    #[serde(default = "default_host_keys")]
    host_keys: Vec<String>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    allowed_sources: Vec<String>,
    deny: Option<Vec<String>>,
    #[serde(default = "default_login_grace")]
    login_grace: String,
    #[serde(default = "default_max_startups")]
    max_startups: usize,
    #[serde(default = "default_max_auth_attempts")]
    max_auth_attempts: usize,
    #[serde(default = "default_max_channels")]
    max_channels_per_session: usize,
    #[serde(default = "default_ssh_keepalive")]
    keepalive: String,
    #[serde(default = "default_keepalive_max")]
    keepalive_max: usize,
    #[serde(default = "default_on_change")]
    on_change: String,
    #[serde(default)]
    user: Vec<RawSshUser>,
    #[serde(default)]
    allow: Vec<RawSshAllow>,
}

fn default_ssh_listen() -> String {
    "127.0.0.1:2222".into()
}
fn default_host_keys() -> Vec<String> {
    vec!["ed25519".into(), "ecdsa".into()]
}
fn default_login_grace() -> String {
    "20s".into()
}
fn default_max_startups() -> usize {
    64
}
fn default_max_auth_attempts() -> usize {
    6
}
fn default_max_channels() -> usize {
    64
}
fn default_ssh_keepalive() -> String {
    "15s".into()
}
fn default_keepalive_max() -> usize {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSshUser {
    name: Option<String>,
    authorized_keys: Option<PathBuf>,
    #[serde(default)]
    permitopen: Vec<String>,
    service_group: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSshAllow {
    host: Option<String>,
    cidr: Option<String>,
    #[serde(default)]
    ports: Vec<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    name: Option<String>,
    server: Option<String>,
    user: Option<String>,
    identity: Option<PathBuf>,
    server_fingerprint: Option<String>,
    known_hosts: Option<PathBuf>,
    #[serde(default = "default_tunnel_keepalive")]
    keepalive: String,
    #[serde(default = "default_tunnel_keepalive_max")]
    keepalive_max: usize,
    #[serde(default)]
    remote: Vec<RawRemote>,
}

fn default_tunnel_keepalive() -> String {
    "10s".into()
}
fn default_tunnel_keepalive_max() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    listen: Option<String>,
    connect: Option<String>,
    #[serde(default = "default_on_change")]
    on_change: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default = "default_api_url")]
    api_url: String,
    api_key_file: Option<PathBuf>,
    api_secret_file: Option<PathBuf>,
    #[serde(default)]
    connection_ids: Vec<String>,
    #[serde(default = "default_refresh")]
    refresh: String,
}

/// An API credential from the environment: set, trimmed, not empty.
pub fn env_credential(var: &str) -> Option<Secret> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| Secret::new(v.trim()))
}

/// `[service] api_url` when not set; also `register-fingerprint`'s default.
pub const DEFAULT_API_URL: &str = "https://api.fivetran.com";

fn default_api_url() -> String {
    DEFAULT_API_URL.into()
}
fn default_refresh() -> String {
    "1h".into()
}

// ----------------------------------------------------------- validated form

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages); "(embedded)" is appended for the built-in one.
    pub file: String,
    pub state_dir: PathBuf,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub daemon: DaemonConfig,
    pub dns: DnsConfig,
    pub forward: Vec<ForwardConfig>,
    /// None: the ssh role is off.
    pub ssh: Option<SshConfig>,
    pub tunnel: Vec<TunnelConfig>,
    /// `[service]`: the pipeline service's API, when configured.
    pub service: Option<ServiceConfig>,
}

/// `[service]`.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub api_url: String,
    pub api_key: Secret,
    pub api_secret: Secret,
    /// Register our host-key fingerprints for these at start-up.
    pub connection_ids: Vec<String>,
    /// How often `service_group` keys are fetched again.
    pub refresh: Duration,
}

/// How a tunnel authenticates the server it dials: never trust on first use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerKey {
    /// `SHA256:...` as `ssh-keygen -l` prints it.
    Fingerprint(String),
    /// An OpenSSH known_hosts file.
    KnownHosts(PathBuf),
}

/// `[[tunnel]]`: a reverse tunnel to the service's SSH host.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub name: String,
    pub server: Target,
    pub user: String,
    pub identity: PathBuf,
    pub server_key: ServerKey,
    pub keepalive: Duration,
    pub keepalive_max: usize,
    pub remotes: Vec<RemoteConfig>,
}

/// `[[tunnel.remote]]`: one port the server listens on for us.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The bind address sent in `tcpip-forward`, as `ssh -R` sends it
    /// ("localhost" for a bare port).
    pub bind_address: String,
    pub port: u16,
    pub connect: Target,
    pub on_change: OnChange,
}

/// Where a host key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeySource {
    /// Generated in `state_dir` on first start, loaded from there after.
    Generate(HostKeyType),
    /// An OpenSSH private key file.
    Path(PathBuf),
    /// `env:NAME`: an environment variable holding the OpenSSH private key.
    Env(String),
    /// `cmd:COMMAND`: a command (run with `sh -c`) whose standard output is
    /// the key, e.g. `aws ssm get-parameter --with-decryption ...`.
    Cmd(String),
}

impl fmt::Display for HostKeySource {
    /// The entry as written in `host_keys` (never the key itself).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKeySource::Generate(HostKeyType::Ed25519) => f.write_str("ed25519"),
            HostKeySource::Generate(HostKeyType::Ecdsa) => f.write_str("ecdsa"),
            HostKeySource::Generate(HostKeyType::Rsa) => f.write_str("rsa"),
            HostKeySource::Path(p) => write!(f, "{}", p.display()),
            HostKeySource::Env(name) => write!(f, "env:{name}"),
            HostKeySource::Cmd(cmd) => write!(f, "cmd:{cmd}"),
        }
    }
}

/// Also `keygen --type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostKeyType {
    Ed25519,
    Ecdsa,
    Rsa,
}

impl HostKeyType {
    pub fn file_name(self) -> &'static str {
        match self {
            HostKeyType::Ed25519 => "ssh_host_ed25519_key",
            HostKeyType::Ecdsa => "ssh_host_ecdsa_key",
            HostKeyType::Rsa => "ssh_host_rsa_key",
        }
    }
}

/// `[ssh]`: the forwarding-only SSH server.
#[derive(Debug, Clone)]
pub struct SshConfig {
    pub listen: SocketAddr,
    /// Expect a PROXY v1/v2 header: the real client address is what
    /// `allowed_sources`, `from=` and the audit log see.
    pub proxy_protocol: bool,
    pub host_keys: Vec<HostKeySource>,
    /// Client addresses admitted before any SSH byte is read; empty = any.
    pub allowed_sources: Vec<ipnet::IpNet>,
    pub policy: Arc<Policy>,
    pub login_grace: Duration,
    pub max_startups: usize,
    pub max_auth_attempts: usize,
    pub max_channels_per_session: usize,
    pub keepalive: Duration,
    pub keepalive_max: usize,
    pub on_change: OnChange,
    pub users: Vec<SshUser>,
    /// True when `deny` lets channels reach loopback or the metadata address (`check` warns).
    pub deny_is_weak: bool,
}

/// `[[ssh.user]]`.
#[derive(Debug, Clone)]
pub struct SshUser {
    pub name: String,
    /// None when the user's only key is the service's.
    pub authorized_keys: Option<PathBuf>,
    pub permitopen: Vec<PermitOpen>,
    /// Accept the service's public key for this group (fetched from its API).
    pub service_group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter directive, already checked to parse.
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub drain_delay: Duration,
    pub shutdown_grace: Duration,
    /// `None`: never exit for idleness.
    pub idle_exit: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Empty: use the system resolver config.
    pub nameservers: Vec<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

/// What to do with open connections whose upstream address left the DNS answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnChange {
    /// Leave them alone (the default).
    Keep,
    /// Close them within a second of the change being seen (Aurora failover).
    Close,
}

/// Where a route connects: an IP literal (fixed) or a name (watched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

/// The bare address or name (no brackets).
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub target: Target,
    pub on_change: OnChange,
    /// Expect a PROXY v1/v2 header (an NLB with proxy protocol on).
    pub proxy_protocol: bool,
    pub connect_timeout: Duration,
}

impl Config {
    /// Reads and validates the file at `path`; the embedded default stands in
    /// for [`DEFAULT_PATH`] when that file does not exist.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_PATH) => {
                Config::parse(EMBEDDED_DEFAULT, &format!("{DEFAULT_PATH} (embedded)"))
            }
            Err(source) => Err(ConfigError::Read { file, source }),
        }
    }

    /// Parses and validates config text; `file` is only used in messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e, file.to_string()))?;
        raw.validate(file)
    }
}

/// Builds errors that all carry the file name.
struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, table: impl Into<String>, field: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            table: table.into(),
            field,
            reason: reason.into(),
        }
    }

    fn duration(&self, table: &str, field: &'static str, text: &str) -> Result<Duration, ConfigError> {
        parse_duration(text).map_err(|why| {
            self.err(
                table,
                field,
                format!("bad duration {text:?}: {why} (write e.g. \"500ms\", \"5s\", \"2m\")"),
            )
        })
    }

    fn socket_addr(
        &self,
        table: &str,
        field: &'static str,
        text: &str,
        example_port: u16,
    ) -> Result<SocketAddr, ConfigError> {
        text.parse::<SocketAddr>().map_err(|_| {
            let fix = if let Ok(port) = text.parse::<u16>() {
                format!("write \"0.0.0.0:{port}\" or \"127.0.0.1:{port}\"")
            } else if text.parse::<IpAddr>().is_ok() {
                format!("add a port: \"{text}:{example_port}\"")
            } else {
                format!("write an IP address and port, e.g. \"127.0.0.1:{example_port}\"; names are not allowed here")
            };
            self.err(table, field, format!("not an address:port: {text:?} ({fix})"))
        })
    }
}

impl RawConfig {
    fn validate(self, file: &str) -> Result<Config, ConfigError> {
        let cx = Ctx { file };
        let service = match self.service {
            Some(raw) => Some(raw.validate(&cx)?),
            None => None,
        };

        let format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(cx.err(
                    "[log]",
                    "format",
                    format!("unknown format {other:?} (write \"text\" or \"json\")"),
                ));
            }
        };
        // A bare word must be a level: EnvFilter would take "inof" as a target
        // name and silently log nothing.
        let level = self.log.level.trim();
        let is_directive = level.contains('=') || level.contains(',');
        let known = ["off", "error", "warn", "info", "debug", "trace"].contains(&level.to_ascii_lowercase().as_str());
        let parsed = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string());
        if let Some(why) = match (is_directive, known, parsed) {
            (_, _, Err(e)) => Some(e),
            (false, false, Ok(_)) => Some("not a level".to_string()),
            _ => None,
        } {
            return Err(cx.err(
                "[log]",
                "level",
                format!(
                    "bad level {:?}: {why} (write \"error\", \"warn\", \"info\", \"debug\" or \"trace\", or a filter like \"info,jumpgate::dns=debug\")",
                    self.log.level
                ),
            ));
        }

        let admin = AdminConfig {
            listen: cx.socket_addr("[admin]", "listen", &self.admin.listen, 9090)?,
        };

        let daemon = DaemonConfig {
            drain_delay: cx.duration("[daemon]", "drain_delay", &self.daemon.drain_delay)?,
            shutdown_grace: cx.duration("[daemon]", "shutdown_grace", &self.daemon.shutdown_grace)?,
            idle_exit: Some(cx.duration("[daemon]", "idle_exit", &self.daemon.idle_exit)?).filter(|d| !d.is_zero()),
        };

        let mut nameservers = Vec::new();
        for ns in &self.dns.nameservers {
            let addr = match ns.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, 53),
                Err(_) => ns.parse::<SocketAddr>().map_err(|_| {
                    cx.err(
                        "[dns]",
                        "nameservers",
                        format!(
                            "not an IP address or address:port: {ns:?} (write e.g. \"10.0.0.2\" or \"10.0.0.2:53\")"
                        ),
                    )
                })?,
            };
            nameservers.push(addr);
        }
        let min_ttl = cx.duration("[dns]", "min_ttl", &self.dns.min_ttl)?;
        let max_ttl = cx.duration("[dns]", "max_ttl", &self.dns.max_ttl)?;
        if min_ttl < MIN_TTL_FLOOR {
            return Err(cx.err(
                "[dns]",
                "min_ttl",
                format!(
                    "{:?} would re-resolve too often (write at least \"100ms\"; \"1s\" is the default)",
                    self.dns.min_ttl
                ),
            ));
        }
        if max_ttl < min_ttl {
            return Err(cx.err(
                "[dns]",
                "max_ttl",
                format!(
                    "{:?} is below min_ttl {:?} (make max_ttl at least min_ttl)",
                    self.dns.max_ttl, self.dns.min_ttl
                ),
            ));
        }
        let dns = DnsConfig {
            nameservers,
            min_ttl,
            max_ttl,
        };

        let mut forward = Vec::new();
        let mut names = HashSet::new();
        let mut listens: Vec<(SocketAddr, String)> = Vec::new();
        for (i, raw) in self.forward.into_iter().enumerate() {
            let index = i + 1;
            let Some(name) = raw.name.clone() else {
                return Err(cx.err(
                    format!("[[forward]] #{index}"),
                    "name",
                    "missing (add e.g. name = \"rds\": it labels metrics, logs and /readyz/forward/<name>)",
                ));
            };
            let table = format!("[[forward]] #{index} {name:?}");
            check_name(&name).map_err(|why| cx.err(&table, "name", why))?;
            if !names.insert(name.clone()) {
                return Err(cx.err(
                    &table,
                    "name",
                    format!("{name:?} is used by an earlier [[forward]] (give each route its own name)"),
                ));
            }
            let Some(listen) = raw.listen.as_deref() else {
                return Err(cx.err(&table, "listen", "missing (add e.g. listen = \"0.0.0.0:5432\")"));
            };
            let listen = cx.socket_addr(&table, "listen", listen, 5432)?;
            if listen.port() != 0 {
                if let Some((_, other)) = listens.iter().find(|(a, _)| overlaps(*a, listen)) {
                    return Err(cx.err(&table, "listen", format!("{listen} is also the listen address of [[forward]] {other:?} (give each route its own port)")));
                }
                if listen == admin.listen {
                    return Err(cx.err(
                        &table,
                        "listen",
                        format!("{listen} is also [admin] listen (give the route another port)"),
                    ));
                }
            }
            listens.push((listen, name.clone()));
            let Some(target) = raw.target.as_deref() else {
                return Err(cx.err(
                    &table,
                    "target",
                    "missing (add e.g. target = \"mydb.example.com:5432\")",
                ));
            };
            let target = parse_target(target).map_err(|why| cx.err(&table, "target", why))?;
            let on_change = parse_on_change(&cx, &table, &raw.on_change)?;

            let connect_timeout = cx.duration(&table, "connect_timeout", &raw.connect_timeout)?;
            if connect_timeout.is_zero() {
                return Err(cx.err(&table, "connect_timeout", "must be more than 0 (write e.g. \"5s\")"));
            }
            forward.push(ForwardConfig {
                name,
                listen,
                target,
                on_change,
                proxy_protocol: raw.proxy_protocol,
                connect_timeout,
            });
        }

        let ssh = match self.ssh {
            Some(raw) => Some(raw.validate(&cx, &admin, &listens, service.is_some())?),
            None => None,
        };

        let mut tunnel: Vec<TunnelConfig> = Vec::new();
        for (i, raw) in self.tunnel.into_iter().enumerate() {
            let t = raw.validate(&cx, i + 1)?;
            if tunnel.iter().any(|other| other.name == t.name) {
                return Err(cx.err(
                    format!("[[tunnel]] #{} {:?}", i + 1, t.name),
                    "name",
                    format!(
                        "{:?} is used by an earlier [[tunnel]] (give each tunnel its own name)",
                        t.name
                    ),
                ));
            }
            tunnel.push(t);
        }

        Ok(Config {
            file: file.to_string(),
            state_dir: self.state_dir,
            log: LogConfig {
                format,
                level: self.log.level,
            },
            admin,
            daemon,
            dns,
            forward,
            ssh,
            tunnel,
            service,
        })
    }
}

impl RawService {
    fn validate(self, cx: &Ctx) -> Result<ServiceConfig, ConfigError> {
        const T: &str = "[service]";
        let url = self.api_url.trim_end_matches('/').to_string();
        let loopback_http = ["http://127.", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| url.starts_with(p));
        if !url.starts_with("https://") && !loopback_http {
            return Err(cx.err(T, "api_url", format!("{url:?} is not an https:// URL (credentials never travel in clear text; http:// only to loopback for tests)")));
        }
        let credential = |file: &Option<PathBuf>, field: &'static str, var: &str| -> Result<Secret, ConfigError> {
            match file {
                Some(path) => match std::fs::read_to_string(path) {
                    Ok(text) if !text.trim().is_empty() => Ok(Secret::new(text.trim())),
                    Ok(_) => Err(cx.err(T, field, format!("{} is empty", path.display()))),
                    Err(e) => Err(cx.err(T, field, format!("cannot read {}: {e}", path.display()))),
                },
                None => match env_credential(var) {
                    Some(secret) => Ok(secret),
                    None => Err(cx.err(
                        T,
                        field,
                        format!("no credential: set {var} in the environment or {field} = \"path\""),
                    )),
                },
            }
        };
        let api_key = credential(&self.api_key_file, "api_key_file", "FIVETRAN_API_KEY")?;
        let api_secret = credential(&self.api_secret_file, "api_secret_file", "FIVETRAN_API_SECRET")?;
        for id in &self.connection_ids {
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')) {
                return Err(cx.err(
                    T,
                    "connection_ids",
                    format!("{id:?} is not a connection id (letters, digits, '_' and '-')"),
                ));
            }
        }
        let refresh = cx.duration(T, "refresh", &self.refresh)?;
        if refresh < Duration::from_secs(10) {
            return Err(cx.err(
                T,
                "refresh",
                format!(
                    "{:?} would poll the API too often (write at least \"10s\"; \"1h\" is the default)",
                    self.refresh
                ),
            ));
        }
        Ok(ServiceConfig {
            api_url: url,
            api_key,
            api_secret,
            connection_ids: self.connection_ids,
            refresh,
        })
    }
}

impl RawTunnel {
    fn validate(self, cx: &Ctx, index: usize) -> Result<TunnelConfig, ConfigError> {
        let Some(name) = self.name else {
            return Err(cx.err(
                format!("[[tunnel]] #{index}"),
                "name",
                "missing (add e.g. name = \"fivetran\")",
            ));
        };
        let table = format!("[[tunnel]] #{index} {name:?}");
        check_name(&name).map_err(|why| cx.err(&table, "name", why))?;
        let Some(server) = self.server else {
            return Err(cx.err(
                &table,
                "server",
                "missing (add e.g. server = \"tunnel.example.com:22\")",
            ));
        };
        // A bare host means port 22, as for ssh.
        let server = parse_target(&server)
            .or_else(|first| {
                if server.contains(':') {
                    Err(first)
                } else {
                    parse_target(&format!("{server}:22"))
                }
            })
            .map_err(|why| cx.err(&table, "server", why))?;
        let Some(user) = self.user.filter(|u| !u.is_empty()) else {
            return Err(cx.err(
                &table,
                "user",
                "missing (add the user the service told you, e.g. user = \"fivetran\")",
            ));
        };
        let Some(identity) = self.identity else {
            return Err(cx.err(
                &table,
                "identity",
                "missing (make a key with `jumpgate keygen --type ed25519 --out state/tunnel_ed25519` and write identity = \"state/tunnel_ed25519\")",
            ));
        };
        let how = format!(
            "get it with `ssh-keyscan -p {port} {host} | ssh-keygen -lf -` and compare it with what the service shows",
            port = server.port,
            host = server.host,
        );
        let server_key = match (self.server_fingerprint, self.known_hosts) {
            (Some(_), Some(_)) => {
                return Err(cx.err(
                    &table,
                    "server_fingerprint",
                    "both server_fingerprint and known_hosts set (keep one)",
                ));
            }
            (Some(fp), None) => {
                let body = fp.strip_prefix("SHA256:").unwrap_or("");
                let valid = body.len() == 43 && body.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
                if !valid {
                    return Err(cx.err(
                        &table,
                        "server_fingerprint",
                        format!("{fp:?} is not a SHA256 fingerprint like \"SHA256:\" + 43 base64 characters ({how})"),
                    ));
                }
                ServerKey::Fingerprint(fp)
            }
            (None, Some(path)) => ServerKey::KnownHosts(path),
            (None, None) => {
                return Err(cx.err(
                    &table,
                    "server_fingerprint",
                    format!("missing: jumpgate never trusts a server key on first use; set server_fingerprint = \"SHA256:...\" or known_hosts = \"path\" ({how})"),
                ));
            }
        };
        let keepalive = cx.duration(&table, "keepalive", &self.keepalive)?;
        if keepalive.is_zero() {
            return Err(cx.err(
                &table,
                "keepalive",
                "must be more than 0: keepalives are how a hung tunnel is found (write e.g. \"10s\")",
            ));
        }
        if self.keepalive_max == 0 {
            return Err(cx.err(&table, "keepalive_max", "must be at least 1"));
        }
        if self.remote.is_empty() {
            return Err(cx.err(
                &table,
                "remote",
                "no [[tunnel.remote]] (add one with listen = \"localhost:11433\" and connect = \"db.internal:1433\")",
            ));
        }
        let mut remotes: Vec<RemoteConfig> = Vec::new();
        for (j, raw) in self.remote.into_iter().enumerate() {
            let rtable = format!("{table} [[tunnel.remote]] #{}", j + 1);
            let Some(listen) = raw.listen else {
                return Err(cx.err(&rtable, "listen", "missing (write e.g. listen = \"localhost:11433\")"));
            };
            let (bind_address, port) = parse_remote_listen(&listen).map_err(|why| cx.err(&rtable, "listen", why))?;
            if remotes.iter().any(|r| r.port == port) {
                return Err(cx.err(
                    &rtable,
                    "listen",
                    format!("port {port} is used by an earlier remote of this tunnel"),
                ));
            }
            let Some(connect) = raw.connect else {
                return Err(cx.err(
                    &rtable,
                    "connect",
                    "missing (write e.g. connect = \"db.internal:1433\")",
                ));
            };
            let connect = parse_target(&connect).map_err(|why| cx.err(&rtable, "connect", why))?;
            let on_change = parse_on_change(cx, &rtable, &raw.on_change)?;
            remotes.push(RemoteConfig {
                bind_address,
                port,
                connect,
                on_change,
            });
        }
        Ok(TunnelConfig {
            name,
            server,
            user,
            identity,
            server_key,
            keepalive,
            keepalive_max: self.keepalive_max,
            remotes,
        })
    }
}

/// `ssh -R` listen forms: "11433" and "localhost:11433" (the server's
/// loopback), "0.0.0.0:11433", "127.0.0.1:11433", "[::1]:11433".
fn parse_remote_listen(text: &str) -> Result<(String, u16), String> {
    let high = |port: u16| -> Result<u16, String> {
        if port == 0 {
            Err(format!(
                "port 0 in {text:?} (write the high port the service expects, e.g. \"localhost:11433\")"
            ))
        } else {
            Ok(port)
        }
    };
    if let Ok(port) = text.parse::<u16>() {
        return Ok(("localhost".into(), high(port)?));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), high(addr.port())?));
    }
    match text.rsplit_once(':') {
        Some(("localhost", port)) => match port.parse::<u16>() {
            Ok(p) => Ok(("localhost".into(), high(p)?)),
            Err(_) => Err(format!("bad port in {text:?} (write e.g. \"localhost:11433\")")),
        },
        Some(("*", port)) => match port.parse::<u16>() {
            Ok(p) => Ok(("".into(), high(p)?)),
            Err(_) => Err(format!("bad port in {text:?} (write e.g. \"0.0.0.0:11433\")")),
        },
        _ => Err(format!(
            "not a remote listen address: {text:?} (write \"localhost:11433\", a bare \"11433\", or \"0.0.0.0:11433\")"
        )),
    }
}

impl RawSsh {
    fn validate(
        self,
        cx: &Ctx,
        admin: &AdminConfig,
        forwards: &[(SocketAddr, String)],
        has_service: bool,
    ) -> Result<SshConfig, ConfigError> {
        const T: &str = "[ssh]";
        let listen = cx.socket_addr(T, "listen", &self.listen, 2222)?;
        if listen.port() != 0 {
            if let Some((_, other)) = forwards.iter().find(|(a, _)| overlaps(*a, listen)) {
                return Err(cx.err(
                    T,
                    "listen",
                    format!("{listen} is also the listen address of [[forward]] {other:?} (give each its own port)"),
                ));
            }
            if overlaps(listen, admin.listen) {
                return Err(cx.err(
                    T,
                    "listen",
                    format!("{listen} is also [admin] listen (give the ssh role another port)"),
                ));
            }
        }
        if self.host_keys.is_empty() {
            return Err(cx.err(
                T,
                "host_keys",
                "empty: the server needs a host key (write [\"ed25519\", \"ecdsa\"])",
            ));
        }
        let mut host_keys = Vec::new();
        for entry in &self.host_keys {
            let source = match entry.as_str() {
                "ed25519" => HostKeySource::Generate(HostKeyType::Ed25519),
                "ecdsa" => HostKeySource::Generate(HostKeyType::Ecdsa),
                "rsa" => HostKeySource::Generate(HostKeyType::Rsa),
                e if e.starts_with("env:") => {
                    let name = &e[4..];
                    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return Err(cx.err(
                            T,
                            "host_keys",
                            format!("{e:?}: not an environment variable name (write e.g. \"env:JUMPGATE_HOST_KEY\")"),
                        ));
                    }
                    HostKeySource::Env(name.to_string())
                }
                e if e.starts_with("cmd:") => {
                    if e[4..].trim().is_empty() {
                        return Err(cx.err(T, "host_keys", "\"cmd:\" with no command (write e.g. \"cmd:aws ssm get-parameter --with-decryption --query Parameter.Value --output text --name /jumpgate/host_key\")"));
                    }
                    HostKeySource::Cmd(e[4..].trim().to_string())
                }
                "" => {
                    return Err(cx.err(
                        T,
                        "host_keys",
                        "empty entry (write \"ed25519\", \"ecdsa\" or a key file path)",
                    ));
                }
                path => HostKeySource::Path(PathBuf::from(path)),
            };
            if host_keys.contains(&source) {
                return Err(cx.err(T, "host_keys", format!("{entry:?} is listed twice")));
            }
            host_keys.push(source);
        }

        let cidrs = |field: &'static str, list: &[String]| -> Result<Vec<ipnet::IpNet>, ConfigError> {
            list.iter()
                .map(|c| parse_cidr(c).map_err(|why| cx.err(T, field, why)))
                .collect()
        };
        let allowed_sources = cidrs("allowed_sources", &self.allowed_sources)?;
        let deny = match &self.deny {
            Some(list) => cidrs("deny", list)?,
            None => Policy::default_deny(),
        };
        let must_deny: [std::net::IpAddr; 3] = [
            std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
            std::net::Ipv4Addr::new(169, 254, 169, 254).into(),
        ];
        let deny_is_weak = must_deny.iter().any(|ip| !deny.iter().any(|net| net.contains(ip)));
        let login_grace = cx.duration(T, "login_grace", &self.login_grace)?;
        if login_grace.is_zero() {
            return Err(cx.err(T, "login_grace", "must be more than 0 (write e.g. \"20s\")"));
        }
        let keepalive = cx.duration(T, "keepalive", &self.keepalive)?;
        if keepalive.is_zero() {
            return Err(cx.err(
                T,
                "keepalive",
                "must be more than 0: keepalives are how dead clients are found (write e.g. \"15s\")",
            ));
        }
        for (field, value) in [
            ("max_startups", self.max_startups),
            ("max_auth_attempts", self.max_auth_attempts),
            ("max_channels_per_session", self.max_channels_per_session),
            ("keepalive_max", self.keepalive_max),
        ] {
            if value == 0 {
                return Err(cx.err(T, field, "must be at least 1"));
            }
        }
        let on_change = parse_on_change(cx, T, &self.on_change)?;

        let mut users = Vec::new();
        for (i, raw) in self.user.into_iter().enumerate() {
            let index = i + 1;
            let Some(name) = raw.name else {
                return Err(cx.err(
                    format!("[[ssh.user]] #{index}"),
                    "name",
                    "missing (add e.g. name = \"fivetran\")",
                ));
            };
            let table = format!("[[ssh.user]] #{index} {name:?}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(cx.err(
                    &table,
                    "name",
                    format!("{name:?} may hold only letters, digits, '-', '_' and '.' (e.g. \"fivetran\")"),
                ));
            }
            if users.iter().any(|u: &SshUser| u.name == name) {
                return Err(cx.err(&table, "name", format!("{name:?} is used by an earlier [[ssh.user]] (one table per user; put every key in its authorized_keys)")));
            }
            if let Some(group) = &raw.service_group {
                if group.is_empty()
                    || !group
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
                {
                    return Err(cx.err(
                        &table,
                        "service_group",
                        format!("{group:?} is not a group id (letters, digits, '_' and '-', as the service shows it)"),
                    ));
                }
                if !has_service {
                    return Err(cx.err(&table, "service_group", "needs a [service] table with the API credentials (add [service]; set FIVETRAN_API_KEY and FIVETRAN_API_SECRET)"));
                }
            }
            let authorized_keys = raw.authorized_keys;
            if authorized_keys.is_none() && raw.service_group.is_none() {
                return Err(cx.err(&table, "authorized_keys", "missing (add e.g. authorized_keys = \"config/authorized_keys\", OpenSSH format, or service_group = \"GROUP_ID\")"));
            }
            let permitopen = raw
                .permitopen
                .iter()
                .map(|p| PermitOpen::parse(p).map_err(|why| cx.err(&table, "permitopen", why)))
                .collect::<Result<Vec<_>, _>>()?;
            users.push(SshUser {
                name,
                authorized_keys,
                permitopen,
                service_group: raw.service_group,
            });
        }
        if users.is_empty() {
            return Err(cx.err(
                T,
                "user",
                "no [[ssh.user]]: nobody could log in (add [[ssh.user]] with name and authorized_keys)",
            ));
        }

        let mut allow = Vec::new();
        for (i, raw) in self.allow.into_iter().enumerate() {
            let table = format!("[[ssh.allow]] #{}", i + 1);
            if raw.ports.is_empty() {
                return Err(cx.err(&table, "ports", "missing or empty (write e.g. ports = [5432])"));
            }
            if raw.ports.contains(&0) {
                return Err(cx.err(&table, "ports", "port 0 (write the database's port, e.g. 5432)"));
            }
            let rule = match (raw.host, raw.cidr) {
                (Some(h), None) => AllowRule::host(&h, raw.ports).map_err(|why| cx.err(&table, "host", why))?,
                (None, Some(c)) => AllowRule::cidr(&c, raw.ports).map_err(|why| cx.err(&table, "cidr", why))?,
                (Some(_), Some(_)) => {
                    return Err(cx.err(
                        &table,
                        "host",
                        "both host and cidr set (one rule names either a host or a cidr; write two rules)",
                    ));
                }
                (None, None) => {
                    return Err(cx.err(
                        &table,
                        "host",
                        "neither host nor cidr set (write host = \"mydb.example.com\" or cidr = \"10.0.0.0/16\")",
                    ));
                }
            };
            allow.push(rule);
        }
        if allow.is_empty() {
            return Err(cx.err(
                T,
                "allow",
                "no [[ssh.allow]] rule: no channel could ever open (add [[ssh.allow]] with host or cidr, and ports)",
            ));
        }

        Ok(SshConfig {
            listen,
            proxy_protocol: self.proxy_protocol,
            host_keys,
            allowed_sources,
            policy: Arc::new(Policy { allow, deny }),
            login_grace,
            max_startups: self.max_startups,
            max_auth_attempts: self.max_auth_attempts,
            max_channels_per_session: self.max_channels_per_session,
            keepalive,
            keepalive_max: self.keepalive_max,
            on_change,
            users,
            deny_is_weak,
        })
    }
}

fn parse_on_change(cx: &Ctx, table: &str, text: &str) -> Result<OnChange, ConfigError> {
    match text {
        "keep" => Ok(OnChange::Keep),
        "close" => Ok(OnChange::Close),
        other => Err(cx.err(
            table,
            "on_change",
            format!("unknown value {other:?} (write \"keep\" or \"close\")"),
        )),
    }
}

/// Below this the watcher could spin on a TTL-0 record.
const MIN_TTL_FLOOR: Duration = Duration::from_millis(100);

/// Two listen addresses that cannot both be bound (same port, same or wildcard IP).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Route names appear in metric labels and URLs: keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?} must be 1 to 64 characters (e.g. \"rds\")"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{name:?} may hold only letters, digits, '-', '_' and '.' (e.g. \"rds-writer\")"
        ));
    }
    Ok(())
}

/// Parses `host:port`, `[v6]:port` or `ipv4:port`; the error says what to write.
pub fn parse_target(text: &str) -> Result<Target, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "port 0 in {text:?} (write the database's port, e.g. \"{}:5432\")",
                addr.ip()
            ));
        }
        return Ok(Target {
            host: Host::Ip(addr.ip()),
            port: addr.port(),
        });
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        let shown = match ip {
            IpAddr::V6(_) => format!("[{ip}]"),
            IpAddr::V4(_) => ip.to_string(),
        };
        return Err(format!("no port in {text:?} (write \"{shown}:5432\")"));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("no port in {text:?} (write \"{text}:5432\")"));
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(format!(
            "bad IPv6 address in {text:?} (write e.g. \"[2001:db8::5]:5432\")"
        ));
    }
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(format!(
                "bad port {port:?} in {text:?} (write a port from 1 to 65535, e.g. \"{host}:5432\")"
            ));
        }
    };
    check_hostname(host).map_err(|why| format!("{why} in {text:?}"))?;
    Ok(Target {
        host: Host::Name(host.trim_end_matches('.').to_ascii_lowercase()),
        port,
    })
}

fn check_hostname(host: &str) -> Result<(), String> {
    let bare = host.trim_end_matches('.');
    if bare.is_empty() {
        return Err("no host name (write e.g. \"mydb.example.com:5432\")".into());
    }
    if bare.len() > 253 {
        return Err("host name longer than 253 characters".into());
    }
    for label in bare.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "bad host name {host:?} (letters, digits and '-' between dots, e.g. \"mydb.example.com\")"
            ));
        }
    }
    Ok(())
}

/// Parses "500ms", "5s", "2m", "1h30m", "0" (humantime syntax).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "config/jumpgate.toml";

    fn err(text: &str) -> String {
        match Config::parse(text, FILE) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::parse(EMBEDDED_DEFAULT, "embedded").expect("embedded default parses");
        assert!(!config.forward.is_empty(), "the embedded default has a forward route");
    }

    #[test]
    fn examples_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config/examples exists") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen > 0, "no example configs found in {}", dir.display());
    }

    #[test]
    fn defaults_fill_every_optional_field() {
        let c = Config::parse(
            "[[forward]]\nname = \"rds\"\nlisten = \"0.0.0.0:5432\"\ntarget = \"db.example.com:5432\"\n",
            FILE,
        )
        .unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.daemon.drain_delay, Duration::ZERO);
        assert_eq!(c.daemon.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.daemon.idle_exit, None);
        assert_eq!(c.dns.min_ttl, Duration::from_secs(1));
        assert_eq!(c.dns.max_ttl, Duration::from_secs(30));
        assert!(c.dns.nameservers.is_empty());
        let f = &c.forward[0];
        assert_eq!(f.on_change, OnChange::Keep);
        assert_eq!(f.connect_timeout, Duration::from_secs(5));
        assert_eq!(
            f.target,
            Target {
                host: Host::Name("db.example.com".into()),
                port: 5432
            }
        );
        assert_eq!(c.log.format, LogFormat::Text);
    }

    const FP: &str = "server_fingerprint = \"SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8\"\n";
    const REMOTE: &str = "[[tunnel.remote]]\nlisten = \"localhost:11433\"\nconnect = \"db.internal:1433\"\n";

    /// A [[tunnel]] with `extra` keys, then `remotes`.
    fn tunnel(extra: &str, remotes: &str) -> String {
        format!(
            "[[tunnel]]\nname = \"t\"\nserver = \"tunnel.example.com\"\nuser = \"fivetran\"\nidentity = \"state/id\"\n{extra}{remotes}"
        )
    }

    #[test]
    fn tunnel_remote_listen_forms() {
        let cases: &[(&str, (&str, u16))] = &[
            ("11433", ("localhost", 11433)),
            ("localhost:11433", ("localhost", 11433)),
            ("0.0.0.0:11433", ("0.0.0.0", 11433)),
            ("127.0.0.1:11434", ("127.0.0.1", 11434)),
            ("[::1]:11433", ("::1", 11433)),
            ("*:11433", ("", 11433)),
        ];
        for (text, (addr, port)) in cases {
            assert_eq!(parse_remote_listen(text), Ok((addr.to_string(), *port)), "{text}");
        }
        let c = Config::parse(&tunnel(FP, REMOTE), FILE).unwrap();
        let t = &c.tunnel[0];
        assert_eq!(
            t.server,
            Target {
                host: Host::Name("tunnel.example.com".into()),
                port: 22
            },
            "a bare host is port 22"
        );
        assert_eq!((t.keepalive, t.keepalive_max), (Duration::from_secs(10), 1));
        assert_eq!(t.remotes[0].connect.port, 1433);
    }

    const RULE: &str = "[[ssh.allow]]\nhost = \"db.example.com\"\nports = [5432]\n";

    /// An [ssh] table with one user, `extra` keys in [ssh] and `rules` after.
    fn ssh(extra: &str, rules: &str) -> String {
        format!(
            "[ssh]\n{extra}[[ssh.user]]\nname = \"fivetran\"\nauthorized_keys = \"config/authorized_keys\"\n{rules}"
        )
    }

    #[test]
    fn ssh_defaults_are_the_safe_ones() {
        let c = Config::parse(&ssh("", RULE), FILE).unwrap();
        let s = c.ssh.expect("ssh role on");
        assert_eq!(s.listen, "127.0.0.1:2222".parse().unwrap());
        assert_eq!(
            s.host_keys,
            vec![
                HostKeySource::Generate(HostKeyType::Ed25519),
                HostKeySource::Generate(HostKeyType::Ecdsa)
            ]
        );
        assert_eq!(s.policy.deny, Policy::default_deny());
        assert!(!s.deny_is_weak, "the default deny list covers loopback and metadata");
        assert_eq!(
            (s.max_startups, s.max_auth_attempts, s.max_channels_per_session),
            (64, 6, 64)
        );
        assert_eq!((s.keepalive, s.keepalive_max), (Duration::from_secs(15), 3));
        assert_eq!(s.login_grace, Duration::from_secs(20));
        assert_eq!(s.on_change, OnChange::Keep);
        assert!(s.allowed_sources.is_empty());
        let weak = Config::parse(&ssh("deny = []\n", RULE), FILE).unwrap();
        assert!(
            weak.ssh.unwrap().deny_is_weak,
            "an empty deny list is flagged for check"
        );
    }

    #[test]
    fn errors_name_file_table_field_and_fix() {
        let route = |extra: &str| {
            format!(
                "[[forward]]\nname = \"a\"\nlisten = \"127.0.0.1:1001\"\ntarget = \"a.example.com:1\"\n[[forward]]\nname = \"rds\"\nlisten = \"127.0.0.1:1002\"\n{extra}\n"
            )
        };
        let cases: &[(&str, String, &str)] = &[
            ("target without port", route("target = \"mydb.example.com\""),
             "config/jumpgate.toml: [[forward]] #2 \"rds\": target: no port in \"mydb.example.com\" (write \"mydb.example.com:5432\")"),
            ("target port zero", route("target = \"mydb.example.com:0\""), "[[forward]] #2 \"rds\": target: bad port \"0\""),
            ("target bad host", route("target = \"my db:5432\""), "[[forward]] #2 \"rds\": target: bad host name"),
            ("target missing", route(""), "[[forward]] #2 \"rds\": target: missing"),
            ("ip without port", route("target = \"10.0.0.5\""), "target: no port in \"10.0.0.5\" (write \"10.0.0.5:5432\")"),
            ("bad on_change", route("target = \"x.example.com:1\"\non_change = \"drop\""), "[[forward]] #2 \"rds\": on_change: unknown value \"drop\" (write \"keep\" or \"close\")"),
            ("bad connect_timeout", route("target = \"x.example.com:1\"\nconnect_timeout = \"5 parsecs\""), "[[forward]] #2 \"rds\": connect_timeout: bad duration \"5 parsecs\""),
            ("duplicate name", "[[forward]]\nname = \"rds\"\nlisten = \"127.0.0.1:1\"\ntarget = \"a.b:1\"\n[[forward]]\nname = \"rds\"\nlisten = \"127.0.0.1:2\"\ntarget = \"a.b:1\"\n".into(),
             "[[forward]] #2 \"rds\": name: \"rds\" is used by an earlier [[forward]]"),
            ("same listen twice", "[[forward]]\nname = \"a\"\nlisten = \"0.0.0.0:5432\"\ntarget = \"a.b:1\"\n[[forward]]\nname = \"b\"\nlisten = \"127.0.0.1:5432\"\ntarget = \"a.b:1\"\n".into(),
             "[[forward]] #2 \"b\": listen: 127.0.0.1:5432 is also the listen address of [[forward]] \"a\""),
            ("listen is a bare port", route("listen = \"5432\""), "duplicate key"),
            ("name missing", "[[forward]]\nlisten = \"127.0.0.1:1\"\ntarget = \"a.b:1\"\n".into(), "[[forward]] #1: name: missing"),
            ("bad name", "[[forward]]\nname = \"r d s\"\nlisten = \"127.0.0.1:1\"\ntarget = \"a.b:1\"\n".into(), "[[forward]] #1 \"r d s\": name: \"r d s\" may hold only"),
            ("listen without port", "[[forward]]\nname = \"a\"\nlisten = \"0.0.0.0\"\ntarget = \"a.b:1\"\n".into(), "[[forward]] #1 \"a\": listen: not an address:port: \"0.0.0.0\" (add a port: \"0.0.0.0:5432\")"),
            ("listen bare port", "[[forward]]\nname = \"a\"\nlisten = \"5432\"\ntarget = \"a.b:1\"\n".into(), "listen: not an address:port: \"5432\" (write \"0.0.0.0:5432\" or \"127.0.0.1:5432\")"),
            ("bad drain_delay", "[daemon]\ndrain_delay = \"soon\"\n".into(), "config/jumpgate.toml: [daemon]: drain_delay: bad duration \"soon\""),
            ("bad idle_exit", "[daemon]\nidle_exit = \"10\"\n".into(), "[daemon]: idle_exit: bad duration \"10\""),
            ("min_ttl too small", "[dns]\nmin_ttl = \"0s\"\n".into(), "[dns]: min_ttl: \"0s\" would re-resolve too often"),
            ("max below min", "[dns]\nmin_ttl = \"10s\"\nmax_ttl = \"5s\"\n".into(), "[dns]: max_ttl: \"5s\" is below min_ttl \"10s\""),
            ("bad nameserver", "[dns]\nnameservers = [\"ns1.example.com\"]\n".into(), "[dns]: nameservers: not an IP address or address:port: \"ns1.example.com\""),
            ("bad admin", "[admin]\nlisten = \"localhost:9090\"\n".into(), "[admin]: listen: not an address:port: \"localhost:9090\""),
            ("bad log format", "[log]\nformat = \"xml\"\n".into(), "[log]: format: unknown format \"xml\" (write \"text\" or \"json\")"),
            ("bad log level", "[log]\nlevel = \"loud\"\n".into(), "[log]: level: bad level \"loud\": not a level"),
            ("bad log filter", "[log]\nlevel = \"info,jumpgate=loud\"\n".into(), "[log]: level: bad level \"info,jumpgate=loud\""),
            ("unknown top-level field", "colour = \"blue\"\n".into(), "config/jumpgate.toml: TOML parse error at line 1, column 1"),
            ("unknown forward field", route("target = \"a.b:1\"\ntimeout = \"5s\""), "unknown field `timeout`"),
            ("ssh without users", "[ssh]\nlisten = \"127.0.0.1:2222\"\n".into(), "config/jumpgate.toml: [ssh]: user: no [[ssh.user]]: nobody could log in"),
            ("ssh without rules", ssh("", ""), "[ssh]: allow: no [[ssh.allow]] rule: no channel could ever open"),
            ("ssh rule without ports", ssh("", "[[ssh.allow]]\nhost = \"db.example.com\"\n"), "[[ssh.allow]] #1: ports: missing or empty (write e.g. ports = [5432])"),
            ("ssh rule with host and cidr", ssh("", "[[ssh.allow]]\nhost = \"a.b\"\ncidr = \"10.0.0.0/8\"\nports = [1]\n"), "[[ssh.allow]] #1: host: both host and cidr set"),
            ("ssh bad cidr", ssh("", "[[ssh.allow]]\ncidr = \"10.0.0.0/33\"\nports = [1]\n"), "[[ssh.allow]] #1: cidr:"),
            ("ssh bad host", ssh("", "[[ssh.allow]]\nhost = \"a b\"\nports = [1]\n"), "[[ssh.allow]] #1: host:"),
            ("ssh bad deny", ssh("deny = [\"localhost\"]\n", RULE), "[ssh]: deny: not a CIDR: \"localhost\""),
            ("ssh cidr host bits", ssh("allowed_sources = [\"10.0.0.1/8\"]\n", RULE), "[ssh]: allowed_sources: \"10.0.0.1/8\" has host bits set (write \"10.0.0.0/8\")"),
            ("ssh bad login_grace", ssh("login_grace = \"soon\"\n", RULE), "[ssh]: login_grace: bad duration \"soon\""),
            ("ssh zero keepalive", ssh("keepalive = \"0s\"\n", RULE), "[ssh]: keepalive: must be more than 0"),
            ("ssh zero max_startups", ssh("max_startups = 0\n", RULE), "[ssh]: max_startups: must be at least 1"),
            ("ssh bad env host key", ssh("host_keys = [\"env:MY-KEY\"]\n", RULE), "[ssh]: host_keys: \"env:MY-KEY\": not an environment variable name"),
            ("ssh empty cmd host key", ssh("host_keys = [\"cmd: \"]\n", RULE), "[ssh]: host_keys: \"cmd:\" with no command"),
            ("ssh no host keys", ssh("host_keys = []\n", RULE), "[ssh]: host_keys: empty"),
            ("ssh same port as admin", ssh("listen = \"127.0.0.1:9090\"\n", RULE), "[ssh]: listen: 127.0.0.1:9090 is also [admin] listen"),
            ("ssh duplicate user", format!("{}[[ssh.user]]\nname = \"fivetran\"\nauthorized_keys = \"k\"\n", ssh("", RULE)), "[[ssh.user]] #2 \"fivetran\": name: \"fivetran\" is used by an earlier [[ssh.user]]"),
            ("ssh user without keys", "[ssh]\n[[ssh.user]]\nname = \"fivetran\"\n".into(), "[[ssh.user]] #1 \"fivetran\": authorized_keys: missing"),
            ("ssh service_group without [service]", "[ssh]\n[[ssh.user]]\nname = \"fivetran\"\nservice_group = \"g\"\n".into(), "[[ssh.user]] #1 \"fivetran\": service_group: needs a [service] table"),
            ("service plain http", "[service]\napi_url = \"http://api.fivetran.com\"\n".into(), "[service]: api_url: \"http://api.fivetran.com\" is not an https:// URL"),
            ("service missing key file", "[service]\napi_key_file = \"/nonexistent/key\"\n".into(), "[service]: api_key_file: cannot read /nonexistent/key"),
            ("service bad refresh", "[service]\napi_key_file = \"Cargo.toml\"\napi_secret_file = \"Cargo.toml\"\nrefresh = \"1s\"\n".into(), "[service]: refresh: \"1s\" would poll the API too often"),("ssh bad user permitopen", "[ssh]\n[[ssh.user]]\nname = \"fivetran\"\nauthorized_keys = \"k\"\npermitopen = [\"db\"]\n".into(), "[[ssh.user]] #1 \"fivetran\": permitopen:"),
            ("ssh unknown field", ssh("shell = true\n", RULE), "unknown field `shell`"),
            ("tunnel without server", "[[tunnel]]\nname = \"t\"\n".into(), "[[tunnel]] #1 \"t\": server: missing"),
            ("tunnel without fingerprint", tunnel("", REMOTE), "[[tunnel]] #1 \"t\": server_fingerprint: missing: jumpgate never trusts a server key on first use; set server_fingerprint = \"SHA256:...\" or known_hosts = \"path\" (get it with `ssh-keyscan -p 22 tunnel.example.com | ssh-keygen -lf -`"),
            ("tunnel bad fingerprint", tunnel("server_fingerprint = \"MD5:aa\"\n", REMOTE), "[[tunnel]] #1 \"t\": server_fingerprint: \"MD5:aa\" is not a SHA256 fingerprint"),
            ("tunnel both keys", tunnel(&format!("{FP}known_hosts = \"k\"\n"), REMOTE), "[[tunnel]] #1 \"t\": server_fingerprint: both"),
            ("tunnel without remote", tunnel(FP, ""), "[[tunnel]] #1 \"t\": remote: no [[tunnel.remote]]"),
            ("tunnel remote port 0", tunnel(FP, "[[tunnel.remote]]\nlisten = \"localhost:0\"\nconnect = \"db:1\"\n"), "[[tunnel.remote]] #1: listen: port 0"),
            ("tunnel remote bad listen", tunnel(FP, "[[tunnel.remote]]\nlisten = \"db.example.com:11433\"\nconnect = \"db:1\"\n"), "[[tunnel]] #1 \"t\" [[tunnel.remote]] #1: listen: not a remote listen address"),
            ("tunnel remote without connect", tunnel(FP, "[[tunnel.remote]]\nlisten = \"11433\"\n"), "[[tunnel.remote]] #1: connect: missing"),
            ("tunnel remote connect without port", tunnel(FP, "[[tunnel.remote]]\nlisten = \"11433\"\nconnect = \"db.internal\"\n"), "[[tunnel.remote]] #1: connect: no port in \"db.internal\""),
            ("tunnel zero keepalive", tunnel(&format!("{FP}keepalive = \"0s\"\n"), REMOTE), "[[tunnel]] #1 \"t\": keepalive: must be more than 0"),
            ("tunnel without identity", "[[tunnel]]\nname = \"t\"\nserver = \"a.b:22\"\nuser = \"u\"\n".into(), "identity: missing (make a key with `jumpgate keygen"),
            ("tunnel duplicate name", format!("{}{}", tunnel(FP, REMOTE), tunnel(FP, REMOTE)), "[[tunnel]] #2 \"t\": name: \"t\" is used by an earlier [[tunnel]]"),
            ];
        for (case, text, want) in cases {
            let got = err(text);
            assert!(got.contains(want), "{case}:\n got: {got}\nwant: {want}");
            assert!(
                got.starts_with(FILE),
                "{case}: message does not start with the file: {got}"
            );
        }
    }

    #[test]
    fn targets_parse() {
        let ok: &[(&str, Target)] = &[
            (
                "db.example.com:5432",
                Target {
                    host: Host::Name("db.example.com".into()),
                    port: 5432,
                },
            ),
            (
                "DB.Example.COM.:5432",
                Target {
                    host: Host::Name("db.example.com".into()),
                    port: 5432,
                },
            ),
            (
                "10.0.0.5:3306",
                Target {
                    host: Host::Ip("10.0.0.5".parse().unwrap()),
                    port: 3306,
                },
            ),
            (
                "[2001:db8::5]:5432",
                Target {
                    host: Host::Ip("2001:db8::5".parse().unwrap()),
                    port: 5432,
                },
            ),
            (
                "localhost:5432",
                Target {
                    host: Host::Name("localhost".into()),
                    port: 5432,
                },
            ),
        ];
        for (text, want) in ok {
            assert_eq!(&parse_target(text).unwrap(), want, "{text}");
        }
        for bad in [
            "",
            ":5432",
            "db",
            "db:",
            "db:99999",
            "2001:db8::5",
            "[2001:db8::5]",
            "a..b:1",
            "-a.b:1",
            "a b:1",
        ] {
            assert!(parse_target(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("").is_err());
    }
}
