//! The SSH role under test and the real OpenSSH programs that drive it.
//!
//! A [`Lab`] is one test's temporary directory: user keys made by
//! `ssh-keygen`, the `authorized_keys` file, the daemon's `state_dir` (where
//! it generates its host keys) and a `known_hosts` built from those host keys,
//! so every client runs with `StrictHostKeyChecking=yes`. [`Lab::start`]
//! writes an `[ssh]` config around the test's DNS server and starts the real
//! daemon; [`Bastion::ssh`] builds an `ssh` command line for one user key.
//!
//! Every child process runs under a [`Watched`] guard: a watchdog kills it
//! when its time is up, and dropping the guard kills it too. Only loopback
//! addresses are used.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::daemon::Daemon;
use super::{free_port, wait_for};

/// The one `[[ssh.user]]` of every test config.
pub const USER: &str = "fivetran";

/// How long `ssh` may take to connect (`ConnectTimeout`).
const CONNECT_TIMEOUT_S: u32 = 5;

/// The options every OpenSSH client program gets: no config file, `-v` (so
/// the log shows authentication and forwarding), strict host key checking
/// against `known_hosts`, only the key at `key`, no agent, no prompts, then
/// `more` as further `-o` options; ends with `-i KEY`.
pub fn client_options(known_hosts: &Path, key: impl AsRef<OsStr>, more: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-F".into(), "/dev/null".into(), "-v".into()];
    let common = [
        "StrictHostKeyChecking=yes".to_string(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "GlobalKnownHostsFile=/dev/null".into(),
        "IdentitiesOnly=yes".into(),
        "BatchMode=yes".into(),
        "IdentityAgent=none".into(),
        "ControlPath=none".into(),
        format!("ConnectTimeout={CONNECT_TIMEOUT_S}"),
    ];
    for opt in common.into_iter().chain(more.iter().map(|o| o.to_string())) {
        args.push("-o".into());
        args.push(opt.into());
    }
    args.push("-i".into());
    args.push(key.as_ref().to_owned());
    args
}

/// The path of program `name`, looked up in `PATH`; panics naming the Debian
/// package that provides it when it is missing.
pub fn program(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("`{name}` not found in PATH: install the Debian package `{package}` (scripts/test does)")
        })
}

/// A child process that is killed when its time limit passes (so a hung read
/// on its pipes ends with EOF) and when the guard is dropped. Its stderr is
/// collected line by line as it comes.
pub struct Watched {
    child: Arc<Mutex<Child>>,
    stop_watchdog: Option<mpsc::Sender<()>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Set when stderr reached EOF, so every line is in `stderr`.
    stderr_done: Arc<AtomicBool>,
    /// The child's stdin, if it was piped.
    pub stdin: Option<ChildStdin>,
    /// The child's stdout, if it was piped.
    pub stdout: Option<ChildStdout>,
    what: String,
}

impl Watched {
    /// Spawns `cmd` with stderr piped (stdin and stdout as `cmd` says);
    /// kills it after `limit`.
    pub fn spawn(mut cmd: Command, limit: Duration) -> Self {
        let what = format!("{cmd:?}");
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_done = Arc::new(AtomicBool::new(false));
        {
            let (lines, done) = (stderr.clone(), stderr_done.clone());
            let pipe = child.stderr.take().expect("stderr piped");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().expect("stderr lock").push(line);
                }
                done.store(true, Ordering::SeqCst);
            });
        }
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let child = Arc::new(Mutex::new(child));
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        {
            let child = child.clone();
            std::thread::spawn(move || {
                // A message or a dropped sender means the guard is gone; a
                // timeout means the time is up.
                if let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(limit) {
                    // std's kill does nothing to a child already reaped.
                    let _ = child.lock().expect("child lock").kill();
                }
            });
        }
        Self {
            child,
            stop_watchdog: Some(stop_tx),
            stderr,
            stderr_done,
            stdin,
            stdout,
            what,
        }
    }

    /// Every stderr line so far, joined.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").join("\n")
    }

    /// Whether stderr has a line containing `text` so far.
    pub fn stderr_has(&self, text: &str) -> bool {
        self.stderr
            .lock()
            .expect("stderr lock")
            .iter()
            .any(|l| l.contains(text))
    }

    /// Its exit code if it has exited (`-1` for a signal), without waiting.
    pub fn exited(&self) -> Option<i32> {
        let status = self.child.lock().expect("child lock").try_wait().ok().flatten();
        status.map(|s| s.code().unwrap_or(-1))
    }

    /// Waits up to `timeout` for it to exit; its exit code (`-1` for a signal).
    /// After an exit it also waits (up to 5 s) until all of stderr is read,
    /// so [`Watched::stderr`] has the last lines.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let code = wait_for(timeout, || self.exited());
        if code.is_some() {
            wait_for(Duration::from_secs(5), || {
                self.stderr_done.load(Ordering::SeqCst).then_some(())
            });
        }
        code
    }

    /// Whether it is still running.
    pub fn running(&self) -> bool {
        self.exited().is_none()
    }

    /// Kills it now (if it still runs) and reaps it.
    pub fn kill(&self) {
        let mut child = self.child.lock().expect("child lock");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.stop_watchdog.take();
        self.stdin.take();
        self.kill();
        if std::thread::panicking() {
            // Let the reader thread catch the last lines before they are printed.
            wait_for(Duration::from_secs(2), || {
                self.stderr_done.load(Ordering::SeqCst).then_some(())
            });
            eprintln!("---- stderr of {} ----\n{}\n---- end ----", self.what, self.stderr());
        }
    }
}

/// What a program run to completion left behind.
#[derive(Debug)]
pub struct Ran {
    /// Exit code; `-1` if a signal ended it (the watchdog's kill at the time limit).
    pub code: Option<i32>,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Ran {
    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `cmd` with stdin from /dev/null to completion, for at most `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Ran {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut w = Watched::spawn(cmd, limit);
    let mut stdout = w.stdout.take().expect("stdout piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let code = w.wait(limit + Duration::from_secs(1));
    let stdout = reader.join().expect("stdout reader");
    Ran {
        code,
        stdout,
        stderr: w.stderr(),
    }
}

/// Runs `program args...` (at most 30 s) and panics with its output unless it exits 0.
pub fn run_ok(program: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let ran = run(cmd, Duration::from_secs(30));
    assert!(ran.ok(), "{} {args:?} failed: {ran:?}", program.display());
    ran.stdout
}

/// A key pair made by `ssh-keygen`, no passphrase.
#[derive(Clone, Debug)]
pub struct UserKey {
    /// The private key file (the public one is beside it, `.pub`).
    pub path: PathBuf,
    /// The public key line, `type base64 comment`.
    pub public: String,
}

impl UserKey {
    /// `ssh-keygen -q -t TYPE -N '' -C NAME -f DIR/NAME` (`kind`: ed25519, ecdsa, rsa).
    pub fn generate(dir: &Path, name: &str, kind: &str) -> Self {
        let path = dir.join(name);
        let keygen = program("ssh-keygen", "openssh-client");
        let path_str = path.to_str().expect("utf-8 temp path");
        run_ok(&keygen, &["-q", "-t", kind, "-N", "", "-C", name, "-f", path_str]);
        Self::load(&path)
    }

    /// A key pair already on disk (`path` and `path.pub`).
    pub fn load(path: &Path) -> Self {
        let pub_path = pub_path(path);
        let public = std::fs::read_to_string(&pub_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", pub_path.display()))
            .trim()
            .to_string();
        Self {
            path: path.to_path_buf(),
            public,
        }
    }

    /// Its `authorized_keys` line with `options` (may be empty) in front.
    pub fn line(&self, options: &str) -> String {
        if options.is_empty() {
            self.public.clone()
        } else {
            format!("{options} {}", self.public)
        }
    }

    /// The `SHA256:...` fingerprint, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        keygen_fingerprints(&pub_path(&self.path))
            .into_iter()
            .next()
            .expect("one fingerprint")
            .hash
    }
}

/// `path` with `.pub` appended.
pub fn pub_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// One line of `ssh-keygen -l` output: `BITS SHA256:HASH COMMENT (TYPE)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fingerprint {
    /// Key size in bits.
    pub bits: u32,
    /// `SHA256:...`.
    pub hash: String,
    /// `ED25519`, `ECDSA`, `RSA`.
    pub kind: String,
}

/// Parses `ssh-keygen -l` style lines; the comment (between hash and type) is
/// ignored. Panics on a line that does not have that shape.
pub fn parse_fingerprints(text: &str) -> Vec<Fingerprint> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let bad = || panic!("not an `ssh-keygen -l` line: {l:?}");
            if words.len() < 3 || !words[1].starts_with("SHA256:") {
                bad();
            }
            let kind = words[words.len() - 1];
            if !(kind.starts_with('(') && kind.ends_with(')')) {
                bad();
            }
            Fingerprint {
                bits: words[0].parse().unwrap_or_else(|_| bad()),
                hash: words[1].to_string(),
                kind: kind.trim_matches(['(', ')']).to_string(),
            }
        })
        .collect()
}

/// `ssh-keygen -l -f PATH`, parsed (a public or private key file, or a known_hosts / keyscan file).
pub fn keygen_fingerprints(path: &Path) -> Vec<Fingerprint> {
    let keygen = program("ssh-keygen", "openssh-client");
    let out = run_ok(&keygen, &["-l", "-f", path.to_str().expect("utf-8 path")]);
    parse_fingerprints(&out)
}

/// One `[[ssh.allow]]` table for a name (exact or `*.suffix`).
pub fn allow_host(host: &str, ports: &[u16]) -> String {
    format!("[[ssh.allow]]\nhost = \"{host}\"\nports = {ports:?}\n\n")
}

/// One `[[ssh.allow]]` table for a CIDR.
pub fn allow_cidr(cidr: &str, ports: &[u16]) -> String {
    format!("[[ssh.allow]]\ncidr = \"{cidr}\"\nports = {ports:?}\n\n")
}

/// The `[ssh]` part of a test config.
#[derive(Clone, Debug)]
pub struct SshConfig {
    /// `[ssh] deny`. Tests run on loopback, so the default is only the
    /// link-local / metadata range.
    pub deny: Vec<String>,
    /// `[ssh] on_change`.
    pub on_change: String,
    /// `[[ssh.user]] permitopen` of user `fivetran`.
    pub user_permitopen: Vec<String>,
    /// Extra lines inside `[ssh]` (limits, `allowed_sources`, `host_keys`).
    pub extra: String,
    /// `[[ssh.allow]]` tables (see [`allow_host`], [`allow_cidr`]).
    pub allow: String,
    /// The `[daemon]` lines; empty: `drain_delay = "0s"`, `shutdown_grace = "2s"`.
    pub daemon: String,
    /// Extra lines inside `[[ssh.user]]` of user `fivetran` (e.g. `service_group`).
    pub user_extra: String,
    /// Tables after everything else (e.g. `[service]`).
    pub tail: String,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            deny: vec!["169.254.0.0/16".into()],
            on_change: "keep".into(),
            user_permitopen: Vec::new(),
            extra: String::new(),
            allow: String::new(),
            daemon: String::new(),
            user_extra: String::new(),
            tail: String::new(),
        }
    }
}

impl SshConfig {
    /// With these `[[ssh.allow]]` tables.
    pub fn allowing(allow: impl Into<String>) -> Self {
        Self {
            allow: allow.into(),
            ..Self::default()
        }
    }
}

/// One test's directory: keys, `authorized_keys`, `state_dir`, `known_hosts`.
pub struct Lab {
    dir: tempfile::TempDir,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// A new empty lab (and an empty `authorized_keys`).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("jumpgate-ssh-")
            .tempdir()
            .expect("temp dir");
        let lab = Self { dir };
        lab.authorize(&[]);
        lab
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's `state_dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    /// The `authorized_keys` file of user `fivetran`.
    pub fn authorized_keys(&self) -> PathBuf {
        self.path().join("authorized_keys")
    }

    /// A new user key of `kind` (ed25519, ecdsa, rsa) named `name` in this lab.
    pub fn key(&self, name: &str, kind: &str) -> UserKey {
        UserKey::generate(self.path(), name, kind)
    }

    /// Writes `authorized_keys` (mode 0600) with these lines.
    pub fn authorize(&self, lines: &[String]) {
        let path = self.authorized_keys();
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&path, text).expect("write authorized_keys");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod authorized_keys");
    }

    /// The whole config text for `ssh` and the DNS server at `dns`.
    pub fn config(&self, ssh: &SshConfig, dns: SocketAddr) -> String {
        let quoted = |v: &[String]| {
            let items: Vec<String> = v.iter().map(|s| format!("\"{s}\"")).collect();
            format!("[{}]", items.join(", "))
        };
        format!(
            "state_dir = \"{state}\"\n\n\
             [log]\nformat = \"json\"\nlevel = \"debug\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [daemon]\n{daemon}\n\
             [dns]\nnameservers = [\"{dns}\"]\nmin_ttl = \"1s\"\nmax_ttl = \"30s\"\n\n\
             [ssh]\nlisten = \"127.0.0.1:0\"\ndeny = {deny}\non_change = \"{on_change}\"\n{extra}\n\
             [[ssh.user]]\nname = \"{USER}\"\nauthorized_keys = \"{keys}\"\npermitopen = {permitopen}\n{user_extra}\n\
             {allow}{tail}",
            state = self.state_dir().display(),
            deny = quoted(&ssh.deny),
            on_change = ssh.on_change,
            extra = ssh.extra,
            keys = self.authorized_keys().display(),
            permitopen = quoted(&ssh.user_permitopen),
            allow = ssh.allow,
            daemon = if ssh.daemon.is_empty() {
                "drain_delay = \"0s\"\nshutdown_grace = \"2s\"\n"
            } else {
                &ssh.daemon
            },
            user_extra = ssh.user_extra,
            tail = ssh.tail,
        )
    }

    /// Writes the config into the lab (for the CLI commands) and returns its path.
    pub fn write_config(&self, ssh: &SshConfig, dns: SocketAddr) -> PathBuf {
        let path = self.path().join("jumpgate.toml");
        std::fs::write(&path, self.config(ssh, dns)).expect("write config");
        path
    }

    /// Starts the daemon with `ssh` and the DNS server at `dns`, waits until
    /// `/readyz/ssh` is 200, and writes `known_hosts` from the host keys it
    /// generated.
    pub fn start(&self, ssh: &SshConfig, dns: SocketAddr) -> Bastion {
        let bastion = self.start_unready(ssh, dns);
        let ready = super::wait_until(Duration::from_secs(5), || bastion.daemon.get("/readyz/ssh").0 == 200);
        assert!(
            ready,
            "/readyz/ssh not 200 within 5 s: {:?}",
            bastion.daemon.get("/readyz/ssh")
        );
        bastion
    }

    /// As [`Lab::start`] without waiting for `/readyz/ssh`.
    pub fn start_unready(&self, ssh: &SshConfig, dns: SocketAddr) -> Bastion {
        let bastion = self.bastion(Daemon::start(&self.config(ssh, dns)));
        bastion.write_known_hosts(&self.host_public_keys());
        bastion
    }

    /// A daemon started from this lab's config (possibly edited), without a
    /// `known_hosts` yet (see [`Bastion::write_known_hosts`]).
    pub fn bastion(&self, daemon: Daemon) -> Bastion {
        let addr = daemon.ssh.unwrap_or_else(|| {
            panic!(
                "ready file has no \"ssh\" address; stderr:\n{}",
                daemon.stderr_lines().join("\n")
            )
        });
        Bastion {
            daemon,
            addr,
            known_hosts: self.path().join("known_hosts"),
            lab_dir: self.path().to_path_buf(),
        }
    }

    /// The daemon's host public keys (`type base64 comment` lines), ed25519 then ecdsa.
    pub fn host_public_keys(&self) -> Vec<String> {
        ["ed25519", "ecdsa"]
            .iter()
            .filter_map(|kind| {
                let path = self.state_dir().join(format!("ssh_host_{kind}_key.pub"));
                std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
            })
            .collect()
    }
}

/// A running daemon with its SSH role, and what a client needs to reach it.
pub struct Bastion {
    /// The daemon.
    pub daemon: Daemon,
    /// Where its SSH role listens.
    pub addr: SocketAddr,
    known_hosts: PathBuf,
    lab_dir: PathBuf,
}

impl Bastion {
    /// Its SSH port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Writes `known_hosts` with `keys` (`type base64 [comment]` lines) for `[127.0.0.1]:PORT`.
    pub fn write_known_hosts(&self, keys: &[String]) {
        assert!(
            !keys.is_empty(),
            "no host public keys found in the state dir; stderr:\n{}",
            self.daemon.stderr_lines().join("\n")
        );
        let lines: Vec<String> = keys
            .iter()
            .map(|k| {
                let mut words = k.split_whitespace();
                let (kind, blob) = (words.next().expect("key type"), words.next().expect("key blob"));
                format!("[127.0.0.1]:{} {kind} {blob}\n", self.port())
            })
            .collect();
        std::fs::write(&self.known_hosts, lines.concat()).expect("write known_hosts");
    }

    /// [`client_options`] for this bastion: its `known_hosts` and only `key`.
    fn client_options(&self, key: &UserKey) -> Vec<OsString> {
        client_options(&self.known_hosts, key.path.to_str().expect("utf-8 key path"), &[])
    }

    /// `ssh [extra...] <common options> -p PORT fivetran@127.0.0.1`, stdin
    /// and stdout from/to /dev/null. `extra` comes first because the first
    /// value of an ssh option wins, so a test can override a common one
    /// (`-o BatchMode=no`). A command to run goes after the destination: `.arg(...)`.
    pub fn ssh(&self, key: &UserKey, extra: &[&str]) -> Command {
        let mut cmd = Command::new(program("ssh", "openssh-client"));
        cmd.args(extra)
            .args(self.client_options(key))
            .args(["-p", &self.port().to_string()])
            .arg(self.dest());
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        cmd
    }

    /// `sftp <common options> -P PORT -b BATCH fivetran@127.0.0.1`.
    pub fn sftp(&self, key: &UserKey, batch: &str) -> Command {
        let batch_file = self.lab_dir.join("sftp-batch");
        std::fs::write(&batch_file, batch).expect("write sftp batch");
        let mut cmd = Command::new(program("sftp", "openssh-client"));
        cmd.args(self.client_options(key))
            .args(["-P", &self.port().to_string(), "-b"])
            .arg(&batch_file)
            .arg(self.dest());
        cmd
    }

    /// `fivetran@127.0.0.1`.
    pub fn dest(&self) -> String {
        format!("{USER}@127.0.0.1")
    }

    /// Starts `ssh -W target` with its stdin and stdout piped (the channel's
    /// two directions), killed after `limit`.
    pub fn stdio(&self, key: &UserKey, target: &str, extra: &[&str], limit: Duration) -> Watched {
        let mut args = vec!["-W", target];
        args.extend_from_slice(extra);
        let mut cmd = self.ssh(key, &args);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        Watched::spawn(cmd, limit)
    }

    /// Starts `ssh -N` with one `-L 127.0.0.1:LPORT:TARGET` per target (free
    /// local ports) and waits until every local port listens. Returns the
    /// ssh process and the local ports, in the order of `targets`. Panics with
    /// ssh's stderr if it exits first (auth refused, say).
    pub fn local_forward(&self, key: &UserKey, targets: &[&str], extra: &[&str], limit: Duration) -> LocalForward {
        let mut last = String::new();
        // A port free a moment ago can be taken meanwhile: try a few times.
        for _ in 0..3 {
            let ports: Vec<u16> = targets.iter().map(|_| free_port()).collect();
            let mut args: Vec<String> = vec!["-N".into(), "-o".into(), "ExitOnForwardFailure=yes".into()];
            for (port, target) in ports.iter().zip(targets) {
                args.push("-L".into());
                args.push(format!("127.0.0.1:{port}:{target}"));
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let ssh = Watched::spawn(self.ssh(key, &args), limit);
            let listening = wait_for(Duration::from_secs(10), || {
                if ssh.exited().is_some() {
                    return Some(false);
                }
                ports
                    .iter()
                    .all(|p| ssh.stderr_has(&format!("Local forwarding listening on 127.0.0.1 port {p}.")))
                    .then_some(true)
            });
            match listening {
                Some(true) => return LocalForward { ssh, ports },
                Some(false) if ssh.stderr_has("Address already in use") => last = ssh.stderr(),
                _ => panic!(
                    "ssh -L did not come up (exit {:?}); stderr:\n{}\ndaemon stderr:\n{}",
                    ssh.exited(),
                    ssh.stderr(),
                    self.daemon.stderr_lines().join("\n")
                ),
            }
        }
        panic!("ssh -L could not bind free local ports in 3 tries:\n{last}")
    }
}

/// An `ssh -N -L ...` process and its local ports.
pub struct LocalForward {
    /// The ssh process.
    pub ssh: Watched,
    /// The local ports, in the order of the targets.
    pub ports: Vec<u16>,
}

impl LocalForward {
    /// A new TCP connection to local forward `i` (5 s timeouts).
    pub fn connect(&self, i: usize) -> TcpStream {
        let port = self.ports[i];
        let s = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to ssh -L port {port}: {e}; ssh stderr:\n{}", self.ssh.stderr()));
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s
    }

    /// How many `open failed: <reason>` lines ssh printed so far.
    pub fn open_failures(&self, reason: &str) -> usize {
        let needle = format!("open failed: {reason}");
        self.ssh
            .stderr
            .lock()
            .expect("stderr lock")
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }
}
