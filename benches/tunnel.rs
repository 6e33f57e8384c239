//! `cargo bench --bench tunnel`: jumpgate's reverse tunnel (role `tunnel`) against `ssh -N -R`,
//! side by side in one run, both dialled to the same OpenSSH `sshd` (issue 8, "Numbers").
//!
//! One sshd per cipher (its `Ciphers` line names only that cipher, so jumpgate and `ssh`
//! negotiate the same one); each carries one jumpgate tunnel and one `ssh -N -R`, each asking for
//! three remote ports on sshd's loopback, forwarded to three servers in this process on the
//! tunnel client's side (where the database would be): a sink, an echo server and a source.
//! Measured:
//! - throughput both ways, with aes256-gcm and chacha20-poly1305, plus the CPU that sshd and the
//!   tunnel client spend per GiB; each direction in its own phase, the same way: repetitions, in
//!   each every tunnel in turn, back to back; the median reported, and each pair's ratio:
//!   - service → database: bytes pushed into the sink's remote port travel sshd → tunnel client
//!     → sink; the time runs until the sink's count comes back (raw loopback to the sink for
//!     scale);
//!   - database → service, what a sync is made of: a request sent to the source's remote port
//!     asks for N bytes, which travel source → tunnel client → sshd → the bench; the time runs
//!     until the source's half-close arrives after them (raw loopback from the source for scale);
//! - byte-exact checks first, both ways: the pattern pushed to the sink and pulled from the
//!   source, each with its half-close, and one echo round trip, through every tunnel;
//! - connection rate: sequential connect to the echo's remote port, one round trip, half-close,
//!   wait for the close;
//! - recovery after an sshd restart (its own sshd and jumpgate): sshd and every session process
//!   killed, sshd started again on the same port; the time from sshd accepting again to the first
//!   byte echoed through the tunnel, with the backoff pause jumpgate was in at that moment (read
//!   from its debug log) and where the rest of the time went.
//!
//! It prints a table, writes it to `target/bench-tunnel.md`, and exits 1 if jumpgate did not
//! carry something correctly (bytes changed, lost or cut off, a half-close lost, a connection that
//! failed, a tunnel that never came back). A timing target that is missed does not fail the run;
//! it shows as **NOT met**.
//!
//! Without `--bench` (how `cargo test --all-targets` runs it, debug build) it is a smoke run of a
//! few seconds: small sizes, few connections, one restart, every path still exercised and checked.
//! Only 127.0.0.1 is ever listened on or connected to; every child process started here is killed,
//! with every descendant, when its guard drops.

use std::{
    collections::HashSet,
    env,
    fmt::Write as _,
    fs::{self, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::{
    BenchPeer, IO_TIMEOUT, Lab, START_TIMEOUT, cpu_seconds, descendants, free_port, gbit, is_listening, keygen,
    loadavg, median, number, percentile, proc_kb, pub_path, pull, push, ssh_options, tail, wait_ready,
};

#[path = "common/mod.rs"]
mod common;

/// One connection of the rate test (connect, round trip, close), at most.
const CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// sshd must accept again this soon after it is started again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(10);
/// The tunnel must carry a byte again this soon after sshd accepts: longer than the longest
/// backoff pause (30 s cap + 20 % jitter) plus a login.
const RECOVERY_BOUND: Duration = Duration::from_secs(45);
/// How often the recovery phase looks for sshd listening and for the tunnel carrying a byte.
const SSHD_POLL: Duration = Duration::from_millis(1);
const TUNNEL_POLL: Duration = Duration::from_millis(2);
/// What one connection of the rate test sends (and gets back).
const PING: &[u8] = b"ping jumpgate tunnel\n";
/// A connection of the rate test this slow waited for a delayed ACK (40 ms on Linux) somewhere:
/// sshd leaves Nagle on for its client connection when no pty is asked for.
const STALL_MS: f64 = 35.0;
/// jumpgate's backoff: first pause (each later one doubles, ±20 % jitter), src/tunnel.rs.
const BACKOFF_START_S: f64 = 0.5;
/// Issue 8's targets: ≥ 1.0× `ssh -R` for throughput and connection rate; back within 2 s plus
/// the backoff pause in effect after an sshd restart.
const THROUGHPUT_TARGET: f64 = 1.0;
const RATE_TARGET: f64 = 1.0;
const RECOVERY_SLACK_S: f64 = 2.0;
/// jumpgate's log filter for the tunnels measured: warnings only, so the data path logs nothing.
const LOG_QUIET: &str = "warn";
/// For the recovery phase: the supervisor's "re-dialling after a pause" (debug) and the audit
/// lines `tunnel_down` / `tunnel_up`, as JSON, so the bench can see where the time went.
const LOG_RECOVERY: &str = "warn,jumpgate::tunnel=debug,audit=info";

/// (short name, OpenSSH name), in the order.
const CIPHERS: [(&str, &str); 2] = [
    ("aes256-gcm", "aes256-gcm@openssh.com"),
    ("chacha20-poly1305", "chacha20-poly1305@openssh.com"),
];

/// Sizes and bounds of one run.
struct Plan {
    full: bool,
    bytes: u64,
    verify_bytes: u64,
    reps: usize,
    conns: usize,
    conns_bound: Duration,
    restarts: usize,
}

const FULL: Plan = Plan {
    full: true,
    bytes: 2 << 30,
    verify_bytes: 64 << 20,
    // Others share this machine: the median of 5 rides out most of their bursts.
    reps: 5,
    conns: 500,
    conns_bound: Duration::from_secs(60),
    restarts: 3,
};

const SMOKE: Plan = Plan {
    full: false,
    bytes: 32 << 20,
    verify_bytes: 4 << 20,
    reps: 1,
    conns: 20,
    conns_bound: Duration::from_secs(30),
    restarts: 1,
};

/// Which way a throughput phase moves the bytes. The tunnel client runs next to the database; the
/// service connects to sshd's remote port.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    /// Pushed into the sink's remote port: service → sshd → tunnel client → sink (the database).
    ToDatabase,
    /// Pulled from the source's remote port: source (the database) → tunnel client → sshd →
    /// service. What a sync is made of.
    ToService,
}

/// In the order the phases run.
const DIRECTIONS: [Direction; 2] = [Direction::ToDatabase, Direction::ToService];

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToDatabase => 0,
            Direction::ToService => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Direction::ToDatabase => "service → database",
            Direction::ToService => "database → service",
        }
    }

    /// The hops the bytes take.
    fn path(self) -> &'static str {
        match self {
            Direction::ToDatabase => "service → sshd → tunnel client → database",
            Direction::ToService => "database → tunnel client → sshd → service",
        }
    }

    /// The metric of the same transfer over plain loopback to (or from) that server.
    fn raw_metric(self) -> &'static str {
        match self {
            Direction::ToDatabase => M_RAW,
            Direction::ToService => M_RAW_SOURCE,
        }
    }

    /// One transfer of `bytes` through `addr`: its time, from the first byte of the request to the
    /// last byte's arrival confirmed (the sink's count back, or the source's EOF).
    fn transfer(self, addr: SocketAddr, bytes: u64, verify: bool) -> Result<Duration> {
        match self {
            Direction::ToDatabase => push(addr, bytes, verify),
            Direction::ToService => pull(addr, bytes, verify),
        }
    }
}

const M_RAW: &str = "raw loopback to the sink, no SSH (Gbit/s)";
const M_RAW_SOURCE: &str = "raw loopback from the source, no SSH (Gbit/s)";

fn m_throughput(dir: Direction, cipher: &str) -> String {
    format!("throughput {}, {cipher} (Gbit/s)", dir.path())
}

fn m_client_cpu(dir: Direction, cipher: &str) -> String {
    format!("tunnel client CPU per GiB, {}, {cipher} (s)", dir.name())
}

fn m_server_cpu(dir: Direction, cipher: &str) -> String {
    format!("sshd CPU per GiB, {}, {cipher} (s)", dir.name())
}

fn m_rate(cipher: &str) -> String {
    format!("connections/s through the tunnel (connect, round trip, close; sequential), {cipher}")
}

fn m_rate_ms(cipher: &str) -> String {
    format!("one connection, p50, {cipher} (ms)")
}

fn m_rate_p10(cipher: &str) -> String {
    format!("one connection, p10 (no stall), {cipher} (ms)")
}

fn m_rate_stalled(cipher: &str) -> String {
    format!("connections that took ≥ {STALL_MS:.0} ms, {cipher} (%)")
}

fn m_client_rss(cipher: &str) -> String {
    format!("peak RSS of the tunnel client, {cipher} (MiB)")
}

fn m_session_rss(cipher: &str) -> String {
    format!("peak RSS of the sshd session serving it, {cipher} (MiB)")
}

fn main() {
    common::bench_main("tunnel", &FULL, &SMOKE, run);
}

fn run(plan: &Plan) -> Result<()> {
    let started = Instant::now();
    let mode = if plan.full {
        "full run"
    } else {
        "smoke run (no --bench)"
    };
    println!("bench tunnel: {mode}; load average before: {}", loadavg());
    ensure!(
        Path::new(SSHD).is_file(),
        "{SSHD} not found: install the Debian package openssh-server (every measurement needs it)"
    );
    let mut report = Report::default();
    let lab = Lab::new("jumpgate-bench-tunnel-", "bench-tunnel")?;
    let sink = start_sink()?;
    let echo = Echo::start()?;
    let source = start_source()?;

    {
        let mut sites = Vec::new();
        for cipher in CIPHERS {
            sites.push(Site::start(&lab, cipher, [sink, echo.addr, source], &mut report)?);
        }
        verify(plan, &mut sites, &echo, &mut report);
        for dir in DIRECTIONS {
            let upstream = match dir {
                Direction::ToDatabase => sink,
                Direction::ToService => source,
            };
            throughput(plan, &mut sites, dir, upstream, &mut report);
            println!("({:.1} s)", started.elapsed().as_secs_f64());
        }
        connection_rate(plan, &mut sites, &echo, &mut report);
        println!("({:.1} s)", started.elapsed().as_secs_f64());
    }
    recovery(plan, &lab, sink, echo.addr, &mut report);

    println!(
        "load average after: {}; took {:.1} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    let markdown = report.render(plan, &lab.user);
    println!("\n{markdown}");
    common::write_out("bench-tunnel.md", &markdown)?;
    ensure!(
        report.problems.is_empty(),
        "jumpgate's tunnel did not carry connections correctly:\n  {}",
        report.problems.join("\n  ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child processes and the lab they share

/// Where Debian's openssh-server installs the daemon (sshd re-executes itself, so it must be
/// started by absolute path).
const SSHD: &str = "/usr/sbin/sshd";

/// A child process, killed on drop with every descendant (sshd's session processes call
/// setsid(), so a process group would not hold them).
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`, stdin from /dev/null.
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        cmd.stdout(out.try_clone()?).stderr(out).stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails with the end of the process's output if it has exited.
    fn alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); its output ends:\n{}",
                self.name,
                tail(&self.log, 20)
            ),
        }
    }

    /// Stops the process first (so it forks nothing new), then every descendant, then kills them
    /// all and waits until they are gone (bounded): their ports are free afterwards.
    fn kill(&mut self) {
        let root = self.pid();
        signal(root, libc::SIGSTOP);
        let mut tree: HashSet<i32> = HashSet::new();
        for _ in 0..50 {
            let new: Vec<i32> = descendants(root).into_iter().filter(|p| !tree.contains(p)).collect();
            if new.is_empty() {
                break;
            }
            for &p in &new {
                signal(p, libc::SIGSTOP);
            }
            tree.extend(new);
        }
        for &p in &tree {
            signal(p, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while tree.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers. The pids are this bench's children and their
    // descendants, read from /proc just before; a descendant's id is not reused while its
    // parent (stopped, in this tree) has not reaped it.
    unsafe { libc::kill(pid, sig) };
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// The peak resident memory of one process (VmHWM), in KiB.
fn peak_rss_kb(pid: i32) -> Option<u64> {
    proc_kb(&format!("/proc/{pid}/status"), "VmHWM:")
}

/// The inodes of the sockets `pid` holds open.
fn socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let link = fs::read_link(fd.path()).ok()?;
            link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// (local port, remote port, inode) of the established IPv4 TCP connections (/proc/net/tcp).
fn tcp_established() -> Vec<(u16, u16, u64)> {
    let text = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "01" {
                return None;
            }
            Some((port(f[1])?, port(f[2])?, f[9].parse().ok()?))
        })
        .collect()
}

/// The sshd session process (a direct child of the listener `sshd_pid`) serving the SSH
/// connection that process `client_pid` holds to `sshd_port`.
fn sshd_session(sshd_pid: i32, sshd_port: u16, client_pid: i32) -> Option<i32> {
    let tcp = tcp_established();
    let client = socket_inodes(client_pid);
    let client_port = tcp
        .iter()
        .find(|(_, remote, inode)| *remote == sshd_port && client.contains(inode))?
        .0;
    let server_side: HashSet<u64> = tcp
        .iter()
        .filter(|(local, remote, _)| *local == sshd_port && *remote == client_port)
        .map(|(_, _, inode)| *inode)
        .collect();
    let children: Vec<i32> = descendants(sshd_pid)
        .into_iter()
        .filter(|&p| parent(p) == Some(sshd_pid))
        .collect();
    children.into_iter().find(|&child| {
        std::iter::once(child)
            .chain(descendants(child))
            .any(|p| !socket_inodes(p).is_disjoint(&server_side))
    })
}

fn parent(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
}

/// `SHA256:...` of a public key file, as `ssh-keygen -l` prints it.
fn fingerprint(pub_key: &Path) -> Result<String> {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pub_key)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen -l")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no SHA256 fingerprint in `ssh-keygen -lf`: {text:?}"))
}

// ---------------------------------------------------------------------------------------------
// Ports

/// A port of 127.0.0.1 free a moment ago, picked at random below the kernel's ephemeral range, so
/// no outgoing connection or `bind(0)` meanwhile can be handed it: sshd listens on it again after
/// a restart, and a tunnel asks for it again after a reconnect.
fn quiet_port() -> Result<u16> {
    const FLOOR: u16 = 10_000;
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if low < FLOOR + 1_000 {
        return free_port();
    }
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u32..200 {
        let r = std::hash::BuildHasher::hash_one(&random, (attempt, std::process::id()));
        let port = FLOOR + (r % u64::from(low - FLOOR)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    free_port()
}

// ---------------------------------------------------------------------------------------------
// sshd

/// One OpenSSH server with its own config, host key and log; killed with its sessions on drop.
struct Sshd {
    dir: PathBuf,
    port: u16,
    known_hosts: PathBuf,
    fingerprint: String,
    proc: Option<Proc>,
}

impl Sshd {
    /// `cipher`: the only cipher it offers (None: OpenSSH's default list).
    fn start(lab: &Lab, name: &str, cipher: Option<&str>) -> Result<Sshd> {
        // sshd's privilege separation needs this directory; a container may not have it.
        let _ = fs::create_dir_all("/run/sshd");
        let dir = lab.subdir(name)?;
        let host_key = dir.join("ssh_host_ed25519_key");
        keygen(&host_key, name)?;
        let fingerprint = fingerprint(&pub_path(&host_key))?;
        let host_pub = fs::read_to_string(pub_path(&host_key))?;
        let host_pub: Vec<&str> = host_pub.split_whitespace().take(2).collect();
        let mut sshd = Sshd {
            known_hosts: dir.join("known_hosts"),
            dir,
            port: 0,
            fingerprint,
            proc: None,
        };
        // A port free a moment ago can be taken meanwhile: try a few.
        for _ in 0..5 {
            sshd.port = quiet_port()?;
            let ciphers = cipher.map(|c| format!("Ciphers {c}\n")).unwrap_or_default();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nAddressFamily inet\nHostKey {host_key}\n\
                 PidFile {pid}\nAuthorizedKeysFile {keys}\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 AllowTcpForwarding yes\nGatewayPorts clientspecified\nX11Forwarding no\n\
                 AllowAgentForwarding no\nPrintMotd no\nUseDNS no\nMaxStartups 100\n\
                 LogLevel INFO\n{ciphers}",
                port = sshd.port,
                host_key = host_key.display(),
                pid = sshd.dir.join("sshd.pid").display(),
                keys = lab.authorized_keys.display(),
            );
            fs::write(sshd.dir.join("sshd_config"), config)?;
            fs::write(
                &sshd.known_hosts,
                format!("[127.0.0.1]:{} {}\n", sshd.port, host_pub.join(" ")),
            )?;
            match sshd.spawn() {
                Ok(_) => return Ok(sshd),
                Err(e) if format!("{e:#}").contains("Address already in use") => continue,
                Err(e) => return Err(e),
            }
        }
        bail!("sshd found no free port in 5 tries")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("sshd.log")
    }

    fn pid(&self) -> i32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// Starts the listener on `self.port` and returns the moment a connect to it first succeeded
    /// (polled every millisecond). Fails with its log if it exits first.
    fn spawn(&mut self) -> Result<Instant> {
        ensure!(self.proc.is_none(), "sshd already running");
        let mut cmd = Command::new(SSHD);
        cmd.args(["-D", "-e", "-f"])
            .arg(self.dir.join("sshd_config"))
            .current_dir(&self.dir);
        let mut proc = Proc::spawn("sshd", &mut cmd, &self.log())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + RESTART_TIMEOUT;
        let accepted = loop {
            if let Ok(probe) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                let at = Instant::now();
                drop(probe);
                break at;
            }
            proc.alive()?;
            ensure!(
                Instant::now() < deadline,
                "sshd did not accept on {addr} within {RESTART_TIMEOUT:?}; its log ends:\n{}",
                tail(&self.log(), 20)
            );
            thread::sleep(SSHD_POLL);
        };
        self.proc = Some(proc);
        Ok(accepted)
    }

    /// Kills the listener and every session process under it, and waits until they are gone.
    fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts it again on the same port after [`Sshd::stop`]: the moment it accepts again.
    fn restart(&mut self) -> Result<Instant> {
        let deadline = Instant::now() + RESTART_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(at) => return Ok(at),
                Err(e) if format!("{e:#}").contains("Address already in use") && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tunnel clients: jumpgate and `ssh -N -R`

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    Raw,
    Jumpgate,
    Ssh,
}

impl BenchPeer for Peer {
    const JUMPGATE: Peer = Peer::Jumpgate;
    fn label(self) -> &'static str {
        self.name()
    }
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Raw => "raw loopback",
            Peer::Jumpgate => "jumpgate",
            Peer::Ssh => "ssh -R",
        }
    }
}

/// One throughput phase's measurements of one tunnel, per repetition: Gbit/s, client CPU s per
/// GiB, sshd CPU s per GiB.
#[derive(Default)]
struct Samples {
    gbit: Vec<f64>,
    client_cpu: Vec<f64>,
    server_cpu: Vec<f64>,
}

/// A running tunnel client and the ports it had sshd listen on.
struct Tunnel {
    peer: Peer,
    cipher: &'static str,
    /// On sshd's side, in the order of the targets it was started with: forwarded to the sink,
    /// to the echo server, and (the tunnels measured, not the recovery one) to the source.
    ports: Vec<u16>,
    proc: Proc,
    /// jumpgate's admin address (for /readyz).
    admin: Option<SocketAddr>,
    /// Per throughput direction ([`Direction::index`]).
    samples: [Samples; 2],
    /// Per connection of the rate test: seconds.
    conns: Vec<f64>,
    failed: bool,
}

impl Tunnel {
    fn new(peer: Peer, cipher: &'static str, ports: Vec<u16>, proc: Proc, admin: Option<SocketAddr>) -> Tunnel {
        Tunnel {
            peer,
            cipher,
            ports,
            proc,
            admin,
            samples: Default::default(),
            conns: Vec::new(),
            failed: false,
        }
    }

    fn remote(&self, i: usize) -> Result<SocketAddr> {
        let port = self
            .ports
            .get(i)
            .ok_or_else(|| anyhow!("the {} tunnel has no remote port #{}", self.peer.name(), i + 1))?;
        Ok(SocketAddr::from(([127, 0, 0, 1], *port)))
    }

    fn echo_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[1]))
    }

    /// The remote port whose bytes go to the sink, or come from the source.
    fn addr_for(&self, dir: Direction) -> Result<SocketAddr> {
        match dir {
            Direction::ToDatabase => self.remote(0),
            Direction::ToService => self.remote(2),
        }
    }

    fn samples(&self, dir: Direction) -> &Samples {
        &self.samples[dir.index()]
    }
}

/// `jumpgate run` with one `[[tunnel]]` "t1" to `sshd`, a remote for each target (sink, echo and
/// for the measured tunnels the source); returns once `/readyz/tunnel/t1` is 200 and sshd listens
/// on every remote port.
fn start_jumpgate(lab: &Lab, sshd: &Sshd, cipher: &'static str, targets: &[SocketAddr], level: &str) -> Result<Tunnel> {
    let dir = lab.subdir(&format!("jumpgate-{cipher}-{}", sshd.port))?;
    let ports = targets.iter().map(|_| quiet_port()).collect::<Result<Vec<u16>>>()?;
    let mut config = format!(
        "[log]\nlevel = \"{level}\"\nformat = \"json\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[tunnel]]\nname = \"t1\"\nserver = \"127.0.0.1:{port}\"\nuser = \"{user}\"\n\
         identity = \"{key}\"\nserver_fingerprint = \"{fp}\"\nkeepalive = \"10s\"\nkeepalive_max = 1\n",
        port = sshd.port,
        user = lab.user,
        key = lab.key.display(),
        fp = sshd.fingerprint,
    );
    for (port, target) in ports.iter().zip(targets) {
        let _ = write!(
            config,
            "\n[[tunnel.remote]]\nlisten = \"localhost:{port}\"\nconnect = \"{target}\"\n"
        );
    }
    let config_path = dir.join("j.toml");
    let ready = dir.join("ready.json");
    fs::write(&config_path, config)?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jumpgate"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .arg("--ready-file")
        .arg(&ready)
        .current_dir(&dir);
    let mut proc = Proc::spawn("jumpgate", &mut cmd, &dir.join("jumpgate.log"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let admin = wait_ready(&ready, &["admin"], deadline, || proc.alive())?;
    let mut tunnel = Tunnel::new(Peer::Jumpgate, cipher, ports, proc, Some(admin));
    wait_tunnel_up(&mut tunnel, deadline)?;
    Ok(tunnel)
}

/// Waits until the tunnel says it is up (jumpgate: `/readyz/tunnel/t1`) and sshd listens on every
/// one of its remote ports.
fn wait_tunnel_up(tunnel: &mut Tunnel, deadline: Instant) -> Result<()> {
    loop {
        tunnel.proc.alive()?;
        let ready = match tunnel.admin {
            Some(admin) => http_get(admin, "/readyz/tunnel/t1").is_ok_and(|(code, _)| code == 200),
            None => true,
        };
        if ready && tunnel.ports.iter().all(|&p| is_listening(p).unwrap_or(false)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = tunnel
                .admin
                .and_then(|a| http_get(a, "/readyz/tunnel/t1").ok())
                .map(|(code, body)| format!("; /readyz/tunnel/t1: {code} {}", body.trim()))
                .unwrap_or_default();
            bail!(
                "{} tunnel not up (sshd listening on {}) in time{why}; its log ends:\n{}",
                tunnel.peer.name(),
                ports(&tunnel.ports),
                tail(&tunnel.proc.log, 20)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// "P1, P2 and P3".
fn ports(ports: &[u16]) -> String {
    let all: Vec<String> = ports.iter().map(u16::to_string).collect();
    match all.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => all.join(""),
    }
}

/// A minimal HTTP/1.1 GET: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((code, body))
}

/// `ssh -N -R localhost:P1:SINK -R localhost:P2:ECHO -R localhost:P3:SOURCE` (one `-R` per
/// target) to `sshd`, with autossh's options from the issue (ServerAlive 10 s × 1,
/// ExitOnForwardFailure); returns once sshd listens on every remote port.
fn start_ssh(lab: &Lab, sshd: &Sshd, cipher: (&'static str, &str), targets: &[SocketAddr]) -> Result<Tunnel> {
    let dir = lab.subdir(&format!("ssh-{}-{}", cipher.0, sshd.port))?;
    // A port free a moment ago can be taken meanwhile: try a few times.
    for attempt in 1..=3 {
        let ports = targets.iter().map(|_| quiet_port()).collect::<Result<Vec<u16>>>()?;
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null", "-N", "-c", cipher.1]);
        ssh_options(&mut cmd, &sshd.known_hosts);
        for opt in [
            "ServerAliveInterval=10",
            "ServerAliveCountMax=1",
            "ExitOnForwardFailure=yes",
        ] {
            cmd.arg("-o").arg(opt);
        }
        for (port, target) in ports.iter().zip(targets) {
            cmd.arg("-R").arg(format!("localhost:{port}:{target}"));
        }
        cmd.arg("-i")
            .arg(&lab.key)
            .args(["-p", &sshd.port.to_string()])
            .arg(format!("{}@127.0.0.1", lab.user));
        let log = dir.join(format!("ssh-{attempt}.log"));
        let proc = Proc::spawn("ssh -N -R", &mut cmd, &log)?;
        let mut tunnel = Tunnel::new(Peer::Ssh, cipher.0, ports, proc, None);
        match wait_tunnel_up(&mut tunnel, Instant::now() + START_TIMEOUT) {
            Ok(()) => return Ok(tunnel),
            Err(_) if tail(&log, 20).contains("forwarding failed") => continue,
            Err(e) => return Err(e),
        }
    }
    bail!("ssh -R found no free remote ports in 3 tries")
}

/// One sshd (one cipher) and the tunnel clients dialled to it.
struct Site {
    cipher: &'static str,
    tunnels: Vec<Tunnel>,
    // Declared last: dropped after the clients, so they do not log a lost server.
    sshd: Sshd,
}

impl Site {
    /// `targets`: the sink, the echo server and the source, in that order.
    fn start(
        lab: &Lab,
        cipher: (&'static str, &'static str),
        targets: [SocketAddr; 3],
        report: &mut Report,
    ) -> Result<Site> {
        let sshd = Sshd::start(lab, &format!("sshd-{}", cipher.0), Some(cipher.1))?;
        let mut tunnels = Vec::new();
        match start_jumpgate(lab, &sshd, cipher.0, &targets, LOG_QUIET) {
            Ok(t) => tunnels.push(t),
            Err(e) => report.fail(Peer::Jumpgate, &format!("tunnel with {}", cipher.0), &e),
        }
        match start_ssh(lab, &sshd, cipher, &targets) {
            Ok(t) => tunnels.push(t),
            Err(e) => report.fail(Peer::Ssh, &format!("tunnel with {}", cipher.0), &e),
        }
        println!(
            "{:<18} sshd on 127.0.0.1:{}; tunnels up: {}",
            cipher.0,
            sshd.port,
            tunnels
                .iter()
                .map(|t| format!(
                    "{} (remote ports {}: sink, echo, source)",
                    t.peer.name(),
                    ports(&t.ports)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Site {
            cipher: cipher.0,
            tunnels,
            sshd,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The bench's three upstreams: a sink that counts (or checks) bytes, an echo server, and a
// source that sends (the pattern, or zeros) as many bytes as it is asked for

fn start_sink() -> Result<SocketAddr> {
    common::serve_sink(TcpListener::bind("127.0.0.1:0")?)
}

fn start_source() -> Result<SocketAddr> {
    common::serve_source(TcpListener::bind("127.0.0.1:0")?)
}

/// A loopback echo server, a thread per connection: echoes until EOF, then closes. Counts the
/// connections it accepted, so the rate test can see each one reach it.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Echo {
    fn start() -> Result<Echo> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        thread::Builder::new().name("echo".into()).spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let spawned = thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || echo_conn(stream));
                if let Err(e) = spawned {
                    eprintln!("echo: {e}");
                }
            }
        })?;
        Ok(Echo { addr, accepted })
    }
}

fn echo_conn(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let mut buf = [0u8; 16 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// One connection through a tunnel to the echo server: connect, PING and its echo, half-close,
/// and the echo server's close back. Returns how long it all took.
fn round_trip(addr: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, CONN_TIMEOUT).context("connect")?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(CONN_TIMEOUT))?;
    stream.set_write_timeout(Some(CONN_TIMEOUT))?;
    stream.write_all(PING)?;
    let mut back = [0u8; PING.len()];
    stream.read_exact(&mut back).context("reading the echo")?;
    ensure!(back == PING, "the echo came back as {back:?}");
    stream.shutdown(Shutdown::Write)?;
    let n = stream.read(&mut [0u8; 1]).context("waiting for the close")?;
    ensure!(n == 0, "data after the echo");
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Byte-exact transfers both ways, each with its half-close, and one echo round trip through every
/// tunnel, first.
fn verify(plan: &Plan, sites: &mut [Site], echo: &Echo, report: &mut Report) {
    println!(
        "\n== byte-exact: {mib} MiB to the sink and {mib} MiB from the source, each with its half-close; \
         one echo round trip ==",
        mib = plan.verify_bytes >> 20
    );
    let mut ok = Vec::new();
    for site in sites.iter_mut() {
        for t in &mut site.tunnels {
            let before = echo.accepted.load(Ordering::SeqCst);
            let checked = t
                .addr_for(Direction::ToDatabase)
                .and_then(|addr| push(addr, plan.verify_bytes, true))
                .context("byte-exact transfer service → database (to the sink) with half-close")
                .and_then(|_| {
                    let addr = t.addr_for(Direction::ToService)?;
                    pull(addr, plan.verify_bytes, true)
                        .context("byte-exact transfer database → service (from the source) with half-close")
                })
                .and_then(|_| round_trip(t.echo_addr()).context("echo round trip"))
                .and_then(|_| {
                    let reached = echo.accepted.load(Ordering::SeqCst) - before;
                    ensure!(reached >= 1, "the echo round trip never reached the echo server");
                    t.proc.alive()
                });
            match checked {
                Ok(()) => {
                    println!("{:<9} {:<18} ok", t.peer.name(), t.cipher);
                    ok.push(format!("{} ({})", t.peer.name(), t.cipher));
                }
                Err(e) => {
                    t.failed = true;
                    report.fail(t.peer, &format!("byte-exact transfer with {}", t.cipher), &e);
                }
            }
        }
    }
    report.note(format!(
        "{mib} MiB arrived byte-exact at the sink, the sink's answer after the pusher's half-close came \
         back, {mib} MiB came byte-exact from the source followed by its half-close (and the reader's close went back to it), and an echo round \
         trip worked, through: {}",
        ok.join(", "),
        mib = plan.verify_bytes >> 20,
    ));
}

/// One direction's throughput: `plan.reps` repetitions, in each every tunnel in turn (and raw
/// loopback to `upstream` first), back to back; the medians go into the report.
fn throughput(plan: &Plan, sites: &mut [Site], dir: Direction, upstream: SocketAddr, report: &mut Report) {
    let how = match dir {
        Direction::ToDatabase => "pushed into sshd's remote port, to the sink",
        Direction::ToService => "pulled from sshd's remote port, from the source",
    };
    println!(
        "\n== throughput {}: {} MiB per transfer {how} at {upstream} ==",
        dir.name(),
        plan.bytes >> 20
    );
    let gib = plan.bytes as f64 / f64::from(1u32 << 30);
    let mut raw = Vec::new();
    // Everything takes turns in each repetition, so a disturbance hits the peers alike.
    for rep in 1..=plan.reps {
        match dir.transfer(upstream, plan.bytes, false) {
            Ok(t) => {
                println!("{:<9} rep {rep}: {:6.2} Gbit/s", "raw", gbit(plan.bytes, t));
                raw.push(gbit(plan.bytes, t));
            }
            Err(e) => report.note(format!("raw loopback, {}: {e:#}", dir.name())),
        }
        for site in sites.iter_mut() {
            let sshd_pid = site.sshd.pid();
            for t in site.tunnels.iter_mut().filter(|t| !t.failed) {
                let (server0, client0) = (cpu_seconds(sshd_pid), cpu_seconds(t.proc.pid()));
                let result = t
                    .addr_for(dir)
                    .and_then(|addr| dir.transfer(addr, plan.bytes, false))
                    .and_then(|d| t.proc.alive().map(|()| d));
                match result {
                    Ok(d) => {
                        let server = (cpu_seconds(sshd_pid) - server0) / gib;
                        let client = (cpu_seconds(t.proc.pid()) - client0) / gib;
                        println!(
                            "{:<9} rep {rep}: {:6.2} Gbit/s  {:<18} CPU s/GiB: sshd {server:.2}, client {client:.2}",
                            t.peer.name(),
                            gbit(plan.bytes, d),
                            t.cipher
                        );
                        let samples = &mut t.samples[dir.index()];
                        samples.gbit.push(gbit(plan.bytes, d));
                        samples.server_cpu.push(server);
                        samples.client_cpu.push(client);
                    }
                    Err(e) => {
                        t.failed = true;
                        report.fail(t.peer, &format!("throughput {} with {}", dir.name(), t.cipher), &e);
                    }
                }
            }
        }
    }
    if !raw.is_empty() {
        report.add(dir.raw_metric(), Peer::Raw, median(&raw), "Gbit/s", true);
    }
    let measured = |sites: &[Site]| -> Vec<(&'static str, Peer, [f64; 3])> {
        let mut out = Vec::new();
        for site in sites {
            for t in site
                .tunnels
                .iter()
                .filter(|t| !t.failed && !t.samples(dir).gbit.is_empty())
            {
                let s = t.samples(dir);
                let values = [median(&s.gbit), median(&s.client_cpu), median(&s.server_cpu)];
                out.push((site.cipher, t.peer, values));
            }
        }
        out
    };
    let rows = measured(sites);
    for (cipher, peer, [g, _, _]) in &rows {
        report.add(&m_throughput(dir, cipher), *peer, *g, "Gbit/s", true);
    }
    for (cipher, peer, [_, c, _]) in &rows {
        report.add(&m_client_cpu(dir, cipher), *peer, *c, "s/GiB", false);
    }
    for (cipher, peer, [_, _, s]) in &rows {
        report.add(&m_server_cpu(dir, cipher), *peer, *s, "s/GiB", false);
    }
    for site in sites.iter() {
        // Peak RSS once, after the first phase (service → database), as before the source existed.
        if dir == Direction::ToDatabase {
            for t in site
                .tunnels
                .iter()
                .filter(|t| !t.failed && !t.samples(dir).gbit.is_empty())
            {
                if let Some(kb) = peak_rss_kb(t.proc.pid()) {
                    report.add(&m_client_rss(site.cipher), t.peer, kb as f64 / 1024.0, "MiB", false);
                }
            }
            for t in site
                .tunnels
                .iter()
                .filter(|t| !t.failed && !t.samples(dir).gbit.is_empty())
            {
                let session = sshd_session(site.sshd.pid(), site.sshd.port, t.proc.pid());
                if let Some(kb) = session.and_then(|pid| {
                    std::iter::once(pid)
                        .chain(descendants(pid))
                        .filter_map(peak_rss_kb)
                        .max()
                }) {
                    report.add(&m_session_rss(site.cipher), t.peer, kb as f64 / 1024.0, "MiB", false);
                }
            }
        }
        let of = |peer| site.tunnels.iter().find(|t| t.peer == peer && !t.failed);
        if let (Some(jg), Some(ssh)) = (of(Peer::Jumpgate), of(Peer::Ssh)) {
            let ratios: Vec<String> = jg
                .samples(dir)
                .gbit
                .iter()
                .zip(&ssh.samples(dir).gbit)
                .map(|(a, b)| format!("{:.2}", a / b))
                .collect();
            report.note(format!(
                "{}, {}: jumpgate ÷ `ssh -R` throughput per repetition (each pair back to back): {}",
                site.cipher,
                dir.name(),
                ratios.join(", ")
            ));
        }
    }
}

fn connection_rate(plan: &Plan, sites: &mut [Site], echo: &Echo, report: &mut Report) {
    println!(
        "\n== connection rate: {} sequential connections per tunnel (connect, {}-byte round trip, close) ==",
        plan.conns,
        PING.len()
    );
    for site in sites.iter_mut() {
        // One unmeasured connection each first.
        for t in site.tunnels.iter_mut().filter(|t| !t.failed) {
            if let Err(e) = round_trip(t.echo_addr()) {
                t.failed = true;
                report.fail(t.peer, &format!("connection through the {} tunnel", t.cipher), &e);
            }
        }
        let started = Instant::now();
        let before = echo.accepted.load(Ordering::SeqCst);
        // Turns, one connection each, so a disturbance hits the peers alike.
        for i in 0..plan.conns {
            if started.elapsed() > plan.conns_bound {
                report.note(format!(
                    "{}: connection rate stopped after {i} rounds ({:?} bound)",
                    site.cipher, plan.conns_bound
                ));
                break;
            }
            for t in site.tunnels.iter_mut().filter(|t| !t.failed) {
                match round_trip(t.echo_addr()) {
                    Ok(d) => t.conns.push(d.as_secs_f64()),
                    Err(e) => {
                        t.failed = true;
                        let what = format!("connection {} through the {} tunnel", i + 1, t.cipher);
                        report.fail(t.peer, &what, &e);
                    }
                }
            }
        }
        let done: usize = site.tunnels.iter().filter(|t| !t.failed).map(|t| t.conns.len()).sum();
        let reached = echo.accepted.load(Ordering::SeqCst) - before;
        if reached < done {
            report.fail(
                Peer::Jumpgate,
                &format!("connection rate with {}", site.cipher),
                &anyhow!("{done} round trips completed but only {reached} connections reached the echo server"),
            );
        }
        for t in site.tunnels.iter_mut().filter(|t| !t.failed && !t.conns.is_empty()) {
            if let Err(e) = t.proc.alive() {
                t.failed = true;
                report.fail(t.peer, &format!("tunnel with {} after the rate test", t.cipher), &e);
                continue;
            }
            let total: f64 = t.conns.iter().sum();
            let per_sec = t.conns.len() as f64 / total;
            let ms: Vec<f64> = t.conns.iter().map(|s| s * 1e3).collect();
            println!(
                "{:<9} {:<18} {} connections in {total:.2} s: {per_sec:.0}/s, p50 {:.2} ms",
                t.peer.name(),
                t.cipher,
                t.conns.len(),
                median(&ms)
            );
            let stalled = ms.iter().filter(|&&m| m >= STALL_MS).count() as f64 * 100.0 / ms.len() as f64;
            report.add(&m_rate(t.cipher), t.peer, per_sec, "/s", true);
            report.add(&m_rate_ms(t.cipher), t.peer, median(&ms), "ms", false);
            report.add(&m_rate_p10(t.cipher), t.peer, percentile(&ms, 0.1), "ms", false);
            report.add(&m_rate_stalled(t.cipher), t.peer, stalled, "%", false);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Recovery after an sshd restart

/// One restart, and where its time went (seconds; None where the log did not say).
struct Recovery {
    /// sshd accepting again → first byte echoed through the tunnel.
    total: f64,
    /// The backoff pause jumpgate was in (or had last finished) when sshd accepted again.
    pause: Option<f64>,
    /// Of `total`: what was left of that pause.
    pause_left: Option<f64>,
    /// Of `total`: from the end of the pause (or sshd accepting, if later) to `tunnel_up`.
    login: Option<f64>,
    /// Of `total`: from `tunnel_up` to the first byte back.
    first_byte: Option<f64>,
    /// `tunnel_down` lines while sshd was down (1 = only the one the kill caused).
    failures: usize,
}

impl Recovery {
    /// The nominal backoff step (0.5 s × 2ⁿ) the jittered pause came from.
    fn step(&self) -> Option<f64> {
        let pause = self.pause?;
        let mut step = BACKOFF_START_S;
        while pause > step * 1.2 + 1e-3 && step < 30.0 {
            step *= 2.0;
        }
        Some(step.min(30.0))
    }

    /// Issue 8: back within 2 s plus the backoff pause in effect.
    fn bound(&self) -> f64 {
        RECOVERY_SLACK_S + self.pause.unwrap_or(0.0)
    }
}

/// Seconds since midnight UTC, now (what jumpgate's log timestamps say, to the microsecond).
fn wall_now() -> f64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs_f64() % 86_400.0
}

/// `a - b` for two times of day, across midnight.
fn wall_diff(a: f64, b: f64) -> f64 {
    (a - b + 43_200.0).rem_euclid(86_400.0) - 43_200.0
}

/// "2026-11-27T10:23:45.123456Z" → seconds since midnight.
fn parse_timestamp(ts: &str) -> Option<f64> {
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// A `Duration`'s Debug form ("512.3ms", "1.02s", "900µs") → seconds.
fn parse_debug_duration(text: &str) -> Option<f64> {
    for (unit, scale) in [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)] {
        if let Some(n) = text.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// What jumpgate's JSON log says happened: (time of day, message or event, pause in seconds).
fn log_events(log: &Path, from: u64) -> Vec<(f64, String, Option<f64>)> {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(log) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    text.lines()
        .filter_map(|line| {
            let json: serde_json::Value = serde_json::from_str(line).ok()?;
            let at = parse_timestamp(json["timestamp"].as_str()?)?;
            let fields = &json["fields"];
            let what = fields["event"].as_str().or(fields["message"].as_str())?.to_string();
            let pause = fields["pause"].as_str().and_then(parse_debug_duration);
            Some((at, what, pause))
        })
        .collect()
}

fn recovery(plan: &Plan, lab: &Lab, sink: SocketAddr, echo: SocketAddr, report: &mut Report) {
    println!(
        "\n== recovery after an sshd restart ({} times; sshd with its default ciphers) ==",
        plan.restarts
    );
    let measured = (|| -> Result<()> {
        let mut sshd = Sshd::start(lab, "sshd-recovery", None)?;
        let mut tunnel = start_jumpgate(lab, &sshd, "default", &[sink, echo], LOG_RECOVERY)?;
        for i in 1..=plan.restarts {
            let echo_addr = tunnel.echo_addr();
            round_trip(echo_addr).with_context(|| format!("the tunnel before restart {i}"))?;
            let log_from = fs::metadata(&tunnel.proc.log).map_or(0, |m| m.len());
            sshd.stop();
            let accepting = sshd.restart()?;
            let accepting_wall = wall_now() - accepting.elapsed().as_secs_f64();
            let deadline = accepting + RECOVERY_BOUND;
            let back = loop {
                if first_byte(echo_addr) {
                    break Instant::now();
                }
                tunnel.proc.alive()?;
                ensure!(
                    Instant::now() < deadline,
                    "restart {i}: no byte through the tunnel {RECOVERY_BOUND:?} after sshd accepted \
                     again; jumpgate's log ends:\n{}",
                    tail(&tunnel.proc.log, 20)
                );
                thread::sleep(TUNNEL_POLL);
            };
            let back_wall = wall_now() - back.elapsed().as_secs_f64();
            // The tunnel_up line is written before the first byte can pass; a moment for the write.
            thread::sleep(Duration::from_millis(50));
            let events = log_events(&tunnel.proc.log, log_from);
            let failures = events.iter().filter(|(_, w, _)| w == "tunnel_down").count();
            // The pause in effect: the last one that started before sshd accepted again.
            let pause = events
                .iter()
                .filter_map(|(at, _, p)| Some((*at, (*p)?)))
                .rfind(|(at, _)| wall_diff(*at, accepting_wall) <= 0.0);
            let up = events
                .iter()
                .find(|(at, w, _)| w == "tunnel_up" && wall_diff(*at, accepting_wall) >= 0.0)
                .map(|(at, _, _)| *at);
            let pause_end = pause.map(|(at, p)| at + p);
            let r = Recovery {
                total: back.duration_since(accepting).as_secs_f64(),
                pause: pause.map(|(_, p)| p),
                pause_left: pause_end.map(|end| wall_diff(end, accepting_wall).max(0.0)),
                login: up.map(|up| {
                    let from = pause_end.map_or(accepting_wall, |end| {
                        if wall_diff(end, accepting_wall) > 0.0 {
                            end
                        } else {
                            accepting_wall
                        }
                    });
                    wall_diff(up, from)
                }),
                first_byte: up.map(|up| wall_diff(back_wall, up)),
                failures,
            };
            println!(
                "restart {i}: back {:.3} s after sshd accepted again; pause in effect {} (step {}), \
                 left of it {}, dial+login+forward {}, first byte {}; {} failed attempt(s)",
                r.total,
                secs(r.pause),
                secs(r.step()),
                secs(r.pause_left),
                secs(r.login),
                secs(r.first_byte),
                r.failures
            );
            report.recoveries.push(r);
        }
        Ok(())
    })();
    if let Err(e) = measured {
        report.fail(Peer::Jumpgate, "recovery after an sshd restart", &e);
    }
}

/// Whether one byte goes through the tunnel's echo port and comes back (short timeouts: the
/// caller polls).
fn first_byte(addr: SocketAddr) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(b == *b"x")
    };
    attempt().unwrap_or(false)
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.3} s"))
}

// ---------------------------------------------------------------------------------------------
// Report: table, targets, Markdown

/// The shared report, and the sshd restarts the recovery phase measured.
#[derive(Default)]
struct Report {
    base: common::Report<Peer>,
    recoveries: Vec<Recovery>,
}

impl std::ops::Deref for Report {
    type Target = common::Report<Peer>;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

impl std::ops::DerefMut for Report {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.base
    }
}

impl Report {
    /// (target, Some((measured, met))).
    fn targets(&self) -> Vec<(String, Option<(String, bool)>)> {
        let ratio = |metric: &str| Some(self.value(metric, Peer::Jumpgate)? / self.value(metric, Peer::Ssh)?);
        let mut targets = Vec::new();
        for dir in DIRECTIONS {
            for (cipher, _) in CIPHERS {
                let r = ratio(&m_throughput(dir, cipher)).map(|r| (format!("{r:.2}×"), r >= THROUGHPUT_TARGET));
                targets.push((
                    format!(
                        "throughput {} with {cipher}: jumpgate ≥ {THROUGHPUT_TARGET:.1}× `ssh -R`",
                        dir.name()
                    ),
                    r,
                ));
            }
        }
        for (cipher, _) in CIPHERS {
            let r = ratio(&m_rate(cipher)).map(|r| (format!("{r:.2}×"), r >= RATE_TARGET));
            targets.push((
                format!("connection rate with {cipher}: jumpgate ≥ {RATE_TARGET:.1}× `ssh -R`"),
                r,
            ));
        }
        for (i, r) in self.recoveries.iter().enumerate() {
            targets.push((
                format!(
                    "recovery after sshd restart {}: < {RECOVERY_SLACK_S:.0} s + the backoff pause in effect",
                    i + 1
                ),
                Some((format!("{:.2} s < {:.2} s", r.total, r.bound()), r.total < r.bound())),
            ));
        }
        targets
    }

    fn render(&self, plan: &Plan, user: &str) -> String {
        let mut md = String::new();
        common::write_header(&mut md, "tunnel", "tunnel", plan.full, &common::openssh_machine());
        let _ = writeln!(
            md,
            "- sizes: {} MiB per transfer × {} reps (median) per cipher and direction, {} MiB checked \
             byte-exact each way first; {} sequential connections per tunnel and cipher; {} sshd \
             restart(s)",
            plan.bytes >> 20,
            plan.reps,
            plan.verify_bytes >> 20,
            plan.conns,
            plan.restarts,
        );
        let _ = writeln!(
            md,
            "- method: one OpenSSH sshd per cipher (its `Ciphers` names only that one), logging in \
             `{user}` with one ed25519 key; on it a jumpgate tunnel (`run`, `[log] level = \"warn\"`, \
             keepalive 10 s × 1) and `ssh -N -R` (ServerAliveInterval 10, ServerAliveCountMax 1, \
             ExitOnForwardFailure), each asking for `localhost:P1` → the sink, `localhost:P2` → \
             the echo server and `localhost:P3` → the source. Throughput service → database: a std \
             thread writes 1 MiB chunks into P1 on sshd's side, half-closes, and the time runs until \
             the sink (a thread of the bench, dropping bytes with recv MSG_TRUNC) answers the count \
             back through the tunnel. Throughput database → service: a std thread connects to P3 on \
             sshd's side and asks for the bytes (9-byte request); the source (a thread of the bench) \
             writes them in 1 MiB chunks and half-closes; the time runs until that EOF arrives, the \
             reader dropping bytes with recv MSG_TRUNC. Each direction is its own phase (service → \
             database first); CPU from /proc/PID/stat of the tunnel client process and of sshd's \
             process tree; peak RSS (VmHWM) of the client and of the sshd session process serving \
             it, after the service → database transfers. Connection rate: connect to P2, {}-byte round trip, half-close, wait for \
             the echo server's close; the two tunnels take turns; a connection of ≥ {STALL_MS:.0} ms \
             waited for a delayed ACK. Recovery: a separate sshd (default ciphers) and jumpgate \
             tunnel; sshd and its session processes SIGKILLed, sshd started again on the same \
             port; from the first successful connect to sshd's port (polled every {} ms) to the \
             first byte echoed through P2 (polled every {} ms); the pause and `tunnel_up` come \
             from jumpgate's JSON log (`{LOG_RECOVERY}`)",
            PING.len(),
            SSHD_POLL.as_millis(),
            TUNNEL_POLL.as_millis(),
        );
        let _ = writeln!(
            md,
            "- \"× raw\": throughput ÷ raw loopback's; \"jumpgate ÷ ssh -R\": jumpgate's value ÷ \
             `ssh -R`'s (above 1 is better for jumpgate where higher is better ↑, below 1 where \
             lower is ↓)\n"
        );
        let _ = writeln!(md, "| metric | peer | value | × raw | jumpgate ÷ ssh -R |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        // The raw loopback transfer of a throughput metric's own direction.
        let raw_of = |metric: &str| {
            let dir = DIRECTIONS
                .into_iter()
                .find(|&d| CIPHERS.iter().any(|(c, _)| m_throughput(d, c) == metric))?;
            self.value(dir.raw_metric(), Peer::Raw)
        };
        for metric in self.metrics() {
            let raw = raw_of(metric);
            for row in self.rows.iter().filter(|r| r.metric == metric) {
                let vs_raw = match raw {
                    Some(raw) if row.unit == "Gbit/s" && row.peer != Peer::Raw => format!("{:.2}", row.value / raw),
                    _ => "—".into(),
                };
                let versus = match (row.peer, self.value(metric, Peer::Jumpgate)) {
                    (Peer::Ssh, Some(jg)) => format!("**{:.2}**", jg / row.value),
                    _ => "—".into(),
                };
                let better = if row.higher_is_better { "↑" } else { "↓" };
                let _ = writeln!(
                    md,
                    "| {metric} {better} | {} | {} {} | {vs_raw} | {versus} |",
                    row.peer.name(),
                    number(row.value),
                    row.unit
                );
            }
        }
        if !self.recoveries.is_empty() {
            let _ = writeln!(md, "\n## Recovery after an sshd restart (jumpgate)\n");
            let _ = writeln!(
                md,
                "| restart | sshd accepting → first byte | backoff pause in effect (step) | of which: rest of \
                 the pause | dial + login + forwards | first byte after `tunnel_up` | failed attempts | target |"
            );
            let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---|");
            for (i, r) in self.recoveries.iter().enumerate() {
                let verdict = if r.total < r.bound() { "met" } else { "**NOT met**" };
                let _ = writeln!(
                    md,
                    "| {} | **{:.3} s** | {} ({}) | {} | {} | {} | {} | < {:.2} s: {verdict} |",
                    i + 1,
                    r.total,
                    secs(r.pause),
                    secs(r.step()),
                    secs(r.pause_left),
                    secs(r.login),
                    secs(r.first_byte),
                    r.failures,
                    r.bound()
                );
            }
        }
        common::write_targets(&mut md, 8, self.targets());
        self.base.write_notes(&mut md);
        md
    }
}
