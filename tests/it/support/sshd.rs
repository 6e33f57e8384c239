//! A real OpenSSH `sshd` for the tunnel tests: the server a `[[tunnel]]`
//! dials. Each [`Sshd`] has its own temporary directory with its own
//! `sshd_config`, ed25519 host key, `authorized_keys` and pid file, listens on
//! a free high port of 127.0.0.1, and runs in the foreground (`-D -e`) with
//! its debug log appended to a file in that directory.
//!
//! Faults the tests need, each aimed at real processes:
//! - [`Sshd::stop`] kills the listener *and* every session process under it
//!   (a session child outlives its listener otherwise, and keeps holding its
//!   remote-forward ports); [`Sshd::restart`] listens again on the same port.
//! - [`Sshd::freeze_client`] SIGSTOPs the session child (the listener's
//!   direct child, with everything under it) that serves one client
//!   connection, so the server stops answering while the kernel still ACKs;
//!   [`Sshd::thaw`] resumes it.
//!
//! Processes are found through `/proc` (`/proc/<pid>/stat` for parents,
//! `/proc/<pid>/fd` and `/proc/net/tcp` for who holds which connection):
//! this kernel has no `/proc/<pid>/task/*/children`. Everything is killed on
//! drop. When the tests run as root the login user is root
//! (`PermitRootLogin prohibit-password`); otherwise the current user.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::ssh::{UserKey, Watched, client_options, keygen_fingerprints, program, run_ok};
use super::{free_port, wait_for, wait_until};

/// Where Debian's openssh-server installs the daemon (sshd re-executes
/// itself, so it must be started by absolute path).
const SSHD: &str = "/usr/sbin/sshd";

/// How long sshd may take to report that it listens.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One OpenSSH server, killed with all its sessions on drop.
pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    listener: Option<Child>,
    /// Pids this harness stopped (SIGSTOP) and has not resumed.
    frozen: Mutex<Vec<i32>>,
}

impl Sshd {
    /// Starts sshd on a free port of 127.0.0.1, accepting exactly the public
    /// key lines in `authorized` for [`Sshd::user`]. Panics with sshd's log if
    /// it does not listen within 10 s.
    pub fn start(authorized: &[String]) -> Self {
        if !Path::new(SSHD).is_file() {
            panic!("`{SSHD}` not found: install the Debian package `openssh-server` (scripts/test does)");
        }
        // sshd's privilege separation needs this directory; the package's
        // unit creates it at boot, a container may not have it.
        if !Path::new("/run/sshd").is_dir() {
            std::fs::create_dir_all("/run/sshd").unwrap_or_else(|e| {
                panic!("sshd needs the directory /run/sshd and it cannot be created ({e}): create it as root")
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("jumpgate-sshd-")
            .tempdir()
            .expect("temp dir");
        let keygen = program("ssh-keygen", "openssh-client");
        let host_key = dir.path().join("ssh_host_ed25519_key");
        run_ok(
            &keygen,
            &[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "test-sshd",
                "-f",
                host_key.to_str().expect("utf-8 temp path"),
            ],
        );
        let mut text = authorized.join("\n");
        text.push('\n');
        std::fs::write(dir.path().join("authorized_keys"), text).expect("write authorized_keys");
        let mut sshd = Self {
            dir,
            port: 0,
            user: current_user(),
            listener: None,
            frozen: Mutex::new(Vec::new()),
        };
        // A port free a moment ago can be taken meanwhile: try a few.
        for _ in 0..5 {
            sshd.port = quiet_port();
            sshd.write_config();
            match sshd.spawn() {
                Ok(()) => {
                    std::fs::write(sshd.known_hosts(), format!("{}\n", sshd.known_hosts_line()))
                        .expect("write known_hosts");
                    return sshd;
                }
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("sshd did not start:\n{log}"),
            }
        }
        panic!("sshd could not bind a free port in 5 tries:\n{}", sshd.log());
    }

    /// Its directory (config, keys, log).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as a `[[tunnel]] server` value.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The user it authenticates (the current user: root when tests run as root).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Its host public key file.
    pub fn host_key_pub(&self) -> PathBuf {
        self.path().join("ssh_host_ed25519_key.pub")
    }

    /// Its host public key, `ssh-ed25519 AAAA...` (no comment).
    pub fn host_public_key(&self) -> String {
        let text = std::fs::read_to_string(self.host_key_pub()).expect("read host key .pub");
        let words: Vec<&str> = text.split_whitespace().take(2).collect();
        assert_eq!(words.len(), 2, "host key .pub has no `type base64`: {text:?}");
        words.join(" ")
    }

    /// The host key's fingerprint, `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        keygen_fingerprints(&self.host_key_pub())
            .into_iter()
            .next()
            .expect("one host key fingerprint")
            .hash
    }

    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA...`: its known_hosts line.
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}", self.port, self.host_public_key())
    }

    /// A known_hosts file holding [`Sshd::known_hosts_line`] (what the
    /// OpenSSH clients of [`Sshd::ssh`] check against).
    pub fn known_hosts(&self) -> PathBuf {
        self.path().join("known_hosts")
    }

    /// Everything sshd logged so far (all its runs).
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.path().join("sshd.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Whether its log has a line containing `text`.
    pub fn log_has(&self, text: &str) -> bool {
        self.log().lines().any(|l| l.contains(text))
    }

    /// The listener's pid, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.listener.as_ref().map(|c| c.id() as i32)
    }

    fn write_config(&self) {
        let d = self.path();
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             AddressFamily inet\n\
             HostKey {host_key}\n\
             AuthorizedKeysFile {authorized}\n\
             PidFile {pid}\n\
             UsePAM no\n\
             StrictModes no\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\n\
             GatewayPorts clientspecified\n\
             ClientAliveInterval 1\n\
             ClientAliveCountMax 2\n\
             UseDNS no\n\
             MaxStartups 100\n\
             LogLevel DEBUG1\n",
            port = self.port,
            host_key = d.join("ssh_host_ed25519_key").display(),
            authorized = d.join("authorized_keys").display(),
            pid = d.join("sshd.pid").display(),
        );
        std::fs::write(d.join("sshd_config"), config).expect("write sshd_config");
    }

    /// Starts the listener on `self.port` and waits until it says it
    /// listens; `Err(its log)` if it exits first.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.listener.is_none(), "sshd already running");
        let log_path = self.path().join("sshd.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open sshd.log");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(self.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {SSHD}: {e}"));
        self.listener = Some(child);
        let listening = format!("Server listening on 127.0.0.1 port {}.", self.port);
        let up = wait_for(LISTEN_TIMEOUT, || {
            let this_run = self.log().get(log_start..).unwrap_or_default().to_string();
            if this_run.contains(&listening) {
                return Some(Ok(()));
            }
            let exited = self.listener.as_mut().and_then(|c| c.try_wait().ok().flatten());
            exited.map(|status| Err(format!("sshd exited ({status}):\n{this_run}")))
        });
        match up {
            Some(Ok(())) => Ok(()),
            Some(Err(log)) => {
                self.listener = None;
                Err(log)
            }
            None => {
                self.stop();
                panic!("sshd did not listen within {LISTEN_TIMEOUT:?}:\n{}", self.log());
            }
        }
    }

    /// Kills the listener and every session process under it (SIGKILL), and
    /// waits until they are gone, so their ports are free.
    pub fn stop(&mut self) {
        let Some(mut listener) = self.listener.take() else {
            return;
        };
        let root = listener.id() as i32;
        // Stop the listener first so it forks no new session meanwhile, then
        // stop the whole tree (sessions can fork too) before killing it.
        signal(root, libc::SIGSTOP);
        let mut tree: HashSet<i32> = HashSet::new();
        for _ in 0..50 {
            let now: HashSet<i32> = descendants(root).into_iter().collect();
            let new: Vec<i32> = now.difference(&tree).copied().collect();
            if new.is_empty() {
                break;
            }
            for &pid in &new {
                signal(pid, libc::SIGSTOP);
            }
            tree.extend(new);
        }
        for &pid in &tree {
            signal(pid, libc::SIGKILL);
        }
        let _ = listener.kill();
        let _ = listener.wait();
        self.frozen.lock().expect("frozen lock").clear();
        let gone = wait_until(Duration::from_secs(5), || tree.iter().all(|&p| !alive(p)));
        assert!(gone, "sshd session processes {tree:?} still alive 5 s after SIGKILL");
    }

    /// Starts sshd again on the same port (after [`Sshd::stop`]), with the
    /// same host key; retries for 5 s while the port is still taken.
    pub fn restart(&mut self) {
        self.stop();
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(5), || match self.spawn() {
            Ok(()) => true,
            Err(log) if log.contains("Address already in use") => {
                last = log;
                false
            }
            Err(log) => panic!("sshd did not restart:\n{log}"),
        });
        assert!(
            ok,
            "sshd could not listen again on port {} within 5 s:\n{last}",
            self.port
        );
    }

    /// The session processes: for each direct child of the listener, its pid
    /// and the client's port on 127.0.0.1 of the connection it serves (None
    /// when it holds no such connection, e.g. while it exits).
    pub fn sessions(&self) -> Vec<(i32, Option<u16>)> {
        let Some(root) = self.pid() else {
            return Vec::new();
        };
        let tcp = tcp_table();
        children(root)
            .into_iter()
            .map(|child| {
                let mut tree = descendants(child);
                tree.push(child);
                let inodes: HashSet<u64> = tree.iter().flat_map(|&p| socket_inodes(p)).collect();
                let client = tcp
                    .iter()
                    .find(|e| e.local.port() == self.port && e.state == TCP_ESTABLISHED && inodes.contains(&e.inode))
                    .map(|e| e.remote.port());
                (child, client)
            })
            .collect()
    }

    /// The session child (a direct child of the listener) serving the client
    /// connection from 127.0.0.1:`client_port`.
    pub fn session_of(&self, client_port: u16) -> Option<i32> {
        self.sessions()
            .into_iter()
            .find(|(_, c)| *c == Some(client_port))
            .map(|(pid, _)| pid)
    }

    /// SIGSTOPs the session child serving the client connection from
    /// 127.0.0.1:`client_port`, with every process under it; returns their
    /// pids. Panics (with the sessions it saw) if there is no such session.
    pub fn freeze_client(&self, client_port: u16) -> Vec<i32> {
        let Some(child) = self.session_of(client_port) else {
            panic!(
                "no sshd session serves client port {client_port}; sessions (pid, client port): {:?}",
                self.sessions()
            );
        };
        let mut pids = vec![child];
        pids.extend(descendants(child));
        for &pid in &pids {
            signal(pid, libc::SIGSTOP);
        }
        let stopped = wait_until(Duration::from_secs(2), || {
            pids.iter().all(|&p| proc_state(p).is_none_or(|s| s == 'T' || s == 't'))
        });
        assert!(stopped, "sshd session {pids:?} not stopped 2 s after SIGSTOP");
        self.frozen.lock().expect("frozen lock").extend(&pids);
        pids
    }

    /// SIGCONTs processes frozen by [`Sshd::freeze_client`].
    pub fn thaw(&self, pids: &[i32]) {
        let mut frozen = self.frozen.lock().expect("frozen lock");
        for pid in pids {
            if let Some(i) = frozen.iter().position(|p| p == pid) {
                frozen.remove(i);
                signal(*pid, libc::SIGCONT);
            }
        }
    }

    /// An OpenSSH client command for this server: no config file, `-v`,
    /// strict host key checking against [`Sshd::known_hosts`], only `key`,
    /// no agent, no prompts; `extra` first (the first value of an ssh option
    /// wins); stdin and stdout /dev/null. Add a command with `.arg(...)`.
    pub fn ssh(&self, key: &UserKey, extra: &[&str]) -> Command {
        let mut cmd = Command::new(program("ssh", "openssh-client"));
        cmd.args(extra)
            .args(client_options(
                &self.known_hosts(),
                &key.path,
                &["ServerAliveInterval=1", "ServerAliveCountMax=3"],
            ))
            .args(["-p", &self.port.to_string()])
            .arg(format!("{}@127.0.0.1", self.user));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        cmd
    }

    /// Starts `ssh -N -o ExitOnForwardFailure=yes -R SPEC` (e.g.
    /// `localhost:PORT:127.0.0.2:UP`) and waits (10 s) until sshd confirmed
    /// the forward; `Err(ssh's stderr)` if ssh exits first (forward refused).
    /// Killed after `limit`.
    pub fn remote_forward(&self, key: &UserKey, spec: &str, limit: Duration) -> Result<Watched, String> {
        let cmd = self.ssh(key, &["-N", "-o", "ExitOnForwardFailure=yes", "-R", spec]);
        let ssh = Watched::spawn(cmd, limit);
        let up = wait_for(Duration::from_secs(10), || {
            if ssh.stderr_has("remote forward success") {
                return Some(true);
            }
            ssh.exited().map(|_| false)
        });
        match up {
            Some(true) => Ok(ssh),
            Some(false) => Err(ssh.stderr()),
            None => panic!(
                "ssh -R {spec} neither forwarded nor exited within 10 s:\n{}\nsshd log:\n{}",
                ssh.stderr(),
                self.log()
            ),
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(200);
            eprintln!(
                "---- sshd log (port {}, last {} lines) ----\n{}\n---- end ----",
                self.port,
                lines.len() - from,
                lines[from..].join("\n")
            );
        }
    }
}

/// The current user's name (`id -un`).
fn current_user() -> String {
    let out = Command::new("id")
        .arg("-un")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `id -un` ({e}): install the Debian package `coreutils`"));
    assert!(out.status.success(), "id -un failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions. The pids come from
    // our own sshd's process tree, read from /proc just before.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The state letter of `/proc/<pid>/stat` (R, S, T, Z, ...); `None` if gone.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// Every (pid, parent pid) in /proc.
fn parents() -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid: i32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// The direct children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    parents()
        .into_iter()
        .filter(|&(_, pp)| pp == pid)
        .map(|(p, _)| p)
        .collect()
}

/// Every process under `root` (not `root` itself).
pub fn descendants(root: i32) -> Vec<i32> {
    let all = parents();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, pp) in &all {
            if pp == parent && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// The inodes of the sockets `pid` holds open.
fn socket_inodes(pid: i32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            let link = link.to_str()?;
            link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// `/proc/net/tcp` state of an established connection.
const TCP_ESTABLISHED: u8 = 0x01;
/// `/proc/net/tcp` state of a listening socket.
const TCP_LISTEN: u8 = 0x0A;

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Clone, Debug)]
struct TcpEntry {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    inode: u64,
}

/// Parses `/proc/net/tcp` and `/proc/net/tcp6` (this network namespace).
fn tcp_table() -> Vec<TcpEntry> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let (Some(local), Some(remote), Ok(state), Ok(inode)) = (
                hex_addr(f[1]),
                hex_addr(f[2]),
                u8::from_str_radix(f[3], 16),
                f[9].parse(),
            ) else {
                continue;
            };
            out.push(TcpEntry {
                local,
                remote,
                state,
                inode,
            });
        }
    }
    out
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6), as /proc/net/tcp*
/// writes them: each 32-bit word in host (little-endian) byte order.
fn hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.as_slice() {
        [a] => IpAddr::V4(Ipv4Addr::from(a.to_be_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The local addresses listening on TCP `port` right now (any process).
pub fn listeners(port: u16) -> Vec<SocketAddr> {
    tcp_table()
        .into_iter()
        .filter(|e| e.state == TCP_LISTEN && e.local.port() == port)
        .map(|e| e.local)
        .collect()
}

/// Lowest port of the kernel's ephemeral range (bind to port 0, outgoing connections).
fn ephemeral_low() -> Option<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// A TCP port of 127.0.0.1 that was free a moment ago, picked at random
/// *below* the kernel's ephemeral range: no `bind(0)` nor outgoing
/// connection anywhere else in the test run can be handed it, so it stays
/// ours across a stop (sshd restarted on the same port, a remote port asked
/// for again after a reconnect). Falls back to [`free_port`] when the
/// ephemeral range starts too low to leave room.
pub fn quiet_port() -> u16 {
    const FLOOR: u16 = 10_000;
    let low = ephemeral_low().unwrap_or(32_768);
    if low < FLOOR + 1_000 {
        return free_port();
    }
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u32..200 {
        let r = std::hash::BuildHasher::hash_one(&random, (attempt, std::process::id()));
        let port = FLOOR + (r % u64::from(low - FLOOR)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

/// The processes (pid, command line) holding a socket listening on TCP
/// `port`, for failure messages.
pub fn listener_holders(port: u16) -> Vec<(i32, String)> {
    let inodes: HashSet<u64> = tcp_table()
        .into_iter()
        .filter(|e| e.state == TCP_LISTEN && e.local.port() == port)
        .map(|e| e.inode)
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| socket_inodes(pid).iter().any(|i| inodes.contains(i)))
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (pid, cmd.trim().to_string())
        })
        .collect()
}

/// The local ports of the established TCP connections that process `pid`
/// holds to `server_port` (e.g. a jumpgate's connections to an sshd).
pub fn client_ports(pid: u32, server_port: u16) -> Vec<u16> {
    let inodes: HashSet<u64> = socket_inodes(pid as i32).into_iter().collect();
    tcp_table()
        .into_iter()
        .filter(|e| e.state == TCP_ESTABLISHED && e.remote.port() == server_port && inodes.contains(&e.inode))
        .map(|e| e.local.port())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::hex_addr;

    #[test]
    fn proc_net_tcp_addresses_parse() {
        assert_eq!(hex_addr("0100007F:9D81"), Some("127.0.0.1:40321".parse().unwrap()));
        assert_eq!(
            hex_addr("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
    }
}
