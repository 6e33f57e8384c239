//! Runs the real `jumpgate` binary as a subprocess: writes its config into a
//! temporary directory, starts `jumpgate run --config ... --ready-file ...`,
//! waits for the ready file, collects stderr lines (logs and audit lines) as
//! they come, talks HTTP/1.1 to its admin endpoint, sends it signals and waits
//! for its exit. The child is killed on drop, and its stderr is printed when
//! the test is failing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{addr, wait_for};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_jumpgate");

/// How long start-up may take before the ready file must exist.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `[[forward]]` table for a test config.
pub fn route(name: &str, target: &str, on_change: &str) -> String {
    format!(
        "[[forward]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{target}\"\n\
         on_change = \"{on_change}\"\nconnect_timeout = \"2s\"\n"
    )
}

/// A whole test config: JSON debug logs, admin and routes on port 0, the
/// given `[daemon]` lines, the test DNS server (if any) as the only nameserver
/// with TTLs clamped to [1 s, 30 s], then `routes`.
pub fn config(daemon: &str, dns: Option<SocketAddr>, routes: &str) -> String {
    let mut text = String::from(
        "[log]\nformat = \"json\"\nlevel = \"debug\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [daemon]\ndrain_delay = \"0s\"\nshutdown_grace = \"5s\"\n",
    );
    text.push_str(daemon);
    text.push('\n');
    if let Some(dns) = dns {
        text.push_str(&format!(
            "[dns]\nnameservers = [\"{dns}\"]\nmin_ttl = \"1s\"\nmax_ttl = \"30s\"\n\n"
        ));
    }
    text.push_str(routes);
    text
}

/// Runs `jumpgate ARGS...` to completion (at most 30 s), no stdin, a clean
/// environment for its own variables. Returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    run_cli_env(args, &[])
}

/// As [`run_cli`], with the environment variables `env` set for the child.
pub fn run_cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut child = command()
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn jumpgate");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let status = wait_for(Duration::from_secs(30), || child.try_wait().ok().flatten());
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("jumpgate {args:?} still running after 30 s");
    };
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    (status.code().unwrap_or(-1), stdout, stderr)
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.stdin(Stdio::null())
        .env_remove("JUMPGATE_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET");
    cmd
}

/// A temporary directory holding one config file, `jumpgate.toml`.
pub struct ConfigDir {
    dir: tempfile::TempDir,
}

impl ConfigDir {
    /// Writes `text` to `<new temp dir>/jumpgate.toml`.
    pub fn new(text: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("jumpgate-it-")
            .tempdir()
            .expect("temp dir");
        std::fs::write(dir.path().join("jumpgate.toml"), text).expect("write config");
        Self { dir }
    }

    /// The config file's path.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("jumpgate.toml")
    }

    /// The config file's path as a string.
    pub fn config_str(&self) -> String {
        self.config().to_str().expect("utf-8 temp path").to_string()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A running daemon.
pub struct Daemon {
    child: Child,
    /// Holds the config file (and ready file) until the daemon is gone.
    _dir: ConfigDir,
    stderr: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
    /// The admin endpoint's bound address, from the ready file.
    pub admin: SocketAddr,
    /// Each forward route's bound address, from the ready file.
    pub forwards: HashMap<String, SocketAddr>,
    /// The SSH role's bound address, from the ready file (when `[ssh]` is on).
    pub ssh: Option<SocketAddr>,
    /// The whole ready file as it was first read (e.g. each tunnel's state at start).
    pub ready: serde_json::Value,
}

/// Why a daemon did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    /// Its exit status, if it exited.
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Daemon {
    /// Starts the daemon with `config_text` and waits for its ready file;
    /// panics with its stderr if it exits or is not ready within 20 s.
    pub fn start(config_text: &str) -> Self {
        Self::try_start(config_text).unwrap_or_else(|f| {
            panic!(
                "jumpgate did not become ready (exit: {:?}); config:\n{config_text}\nstderr:\n{}",
                f.status, f.stderr
            )
        })
    }

    /// Starts the daemon; `Err` if it exits before writing its ready file
    /// (or is still not ready after 20 s, in which case it is killed).
    pub fn try_start(config_text: &str) -> Result<Self, StartFailure> {
        Self::try_start_env(config_text, &[])
    }

    /// As [`Daemon::try_start`], with the environment variables `env` set for the daemon.
    pub fn try_start_env(config_text: &str, env: &[(&str, &str)]) -> Result<Self, StartFailure> {
        let dir = ConfigDir::new(config_text);
        let ready = dir.path().join("ready.json");
        let mut child = command()
            .envs(env.iter().copied())
            .arg("run")
            .arg("--config")
            .arg(dir.config())
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn jumpgate");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = stderr.clone();
            let pipe = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().expect("stderr lock").push(line);
                }
            });
            // stdout is read only so the daemon never blocks on a full pipe.
            drain(child.stdout.take().expect("stdout"));
        }
        let collected = |stderr: &Arc<Mutex<Vec<String>>>| stderr.lock().expect("lock").join("\n");
        let parsed = wait_for(READY_TIMEOUT, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            let text = std::fs::read_to_string(&ready).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            Some(Ok(json))
        });
        let json = match parsed {
            Some(Ok(json)) => json,
            Some(Err(status)) => {
                // Let the reader thread catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Err(StartFailure {
                    status: Some(status),
                    stderr: collected(&stderr),
                });
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartFailure {
                    status: None,
                    stderr: collected(&stderr),
                });
            }
        };
        let admin = addr(
            json["admin"]
                .as_str()
                .unwrap_or_else(|| panic!("ready file has no \"admin\": {json}")),
        );
        let forwards = json["forward"]
            .as_object()
            .map(|routes| {
                routes
                    .iter()
                    .map(|(name, a)| {
                        let a = a
                            .as_str()
                            .unwrap_or_else(|| panic!("ready file: forward {name} is {a}"));
                        (name.clone(), addr(a))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ssh = json["ssh"].as_str().map(addr);
        Ok(Self {
            child,
            _dir: dir,
            stderr,
            exit: None,
            admin,
            forwards,
            ssh,
            ready: json,
        })
    }

    /// The bound address of forward route `name`.
    pub fn forward(&self, name: &str) -> SocketAddr {
        *self
            .forwards
            .get(name)
            .unwrap_or_else(|| panic!("ready file has no forward {name:?}: {:?}", self.forwards))
    }

    /// Connects a client to route `name` (5 s timeouts on connect, read, write).
    pub fn connect(&self, name: &str) -> TcpStream {
        let a = self.forward(name);
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to route {name} at {a}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s
    }

    /// `GET path` on the admin endpoint: (status, body). Panics if the
    /// endpoint does not answer within 5 s.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).unwrap_or_else(|e| {
            panic!(
                "GET {path} on admin {}: {e}\nstderr:\n{}",
                self.admin,
                self.stderr_text()
            )
        })
    }

    /// The value of metric `name` whose labels include all of `labels`,
    /// summed over the series that match; `None` if no series matches.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        parse_metric(&body, name, labels)
    }

    /// [`Daemon::metric`], with a missing series read as 0.
    pub fn metric_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metric(name, labels).unwrap_or(0.0)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill on our own child's pid; it has not been reaped while
        // `self.exit` is None, so the pid cannot have been reused.
        assert!(self.exit.is_none(), "signal to a daemon that already exited");
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = wait_for(timeout, || self.child.try_wait().ok().flatten());
        }
        self.exit
    }

    /// Whether the process is still running (without waiting).
    pub fn running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lock").clone()
    }

    fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// The JSON audit lines (target `audit`) whose `event` field is `event`.
    pub fn audit(&self, event: &str) -> Vec<serde_json::Value> {
        self.stderr_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|j| j["target"] == "audit" && j["fields"]["event"] == event)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let lines = self.stderr_lines();
            let from = lines.len().saturating_sub(300);
            eprintln!(
                "---- jumpgate stderr (last {} lines) ----\n{}\n---- end ----",
                lines.len() - from,
                lines[from..].join("\n")
            );
        }
    }
}

/// A minimal HTTP/1.1 GET (Connection: close) with 5 s timeouts; handles
/// Content-Length, chunked and read-to-close bodies.
pub fn http_get(admin: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
    None
}

/// Finds `name{labels...} value` lines in Prometheus text whose labels
/// include all of `want`, and sums their values.
pub fn parse_metric(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let labels = parse_labels(labels);
        if want
            .iter()
            .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        {
            let v: f64 = value.parse().ok()?;
            total = Some(total.unwrap_or(0.0) + v);
        }
    }
    total
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(match e {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').trim().to_string(), value));
        rest = &after[end..];
    }
    out
}
