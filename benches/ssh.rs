//! `cargo bench --bench ssh`: the SSH role of jumpgate against OpenSSH's `sshd`, side by side in
//! one run, driven by the same OpenSSH client (issue 7, "Numbers").
//!
//! Measured: throughput through `ssh -N -L` with each of aes256-gcm, chacha20-poly1305 and
//! aes128-gcm (raw loopback to the same sink for scale); connection setup rate, sequential
//! `ssh -W` (open, one round trip of a few bytes, close); and memory per idle authenticated
//! session with one open channel, held by a small russh client inside this process (1,000 OpenSSH
//! client processes would swamp the machine). It prints a table, writes it to
//! `target/bench-ssh.md`, and exits 1 if jumpgate did not carry something correctly.
//!
//! Without `--bench` (how `cargo test --all-targets` runs it, debug build) it is a smoke run of a
//! few seconds: small sizes, few sessions, every path still exercised and checked.
//! `JUMPGATE_BENCH_PEERS=jumpgate` leaves sshd out. A peer that is not installed is skipped with a
//! note. Only 127.0.0.1 is ever listened on or connected to; every child process started here is
//! killed, with its process group and every descendant, when its guard drops.

use std::{
    env,
    fmt::Write as _,
    fs, io,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::{
    BenchPeer, Lab, Proc, START_TIMEOUT, cpu_seconds, descendants, free_port, gbit, is_listening, keygen, loadavg,
    median, number, proc_kb, pub_path, push, ssh_options, tail, thousands, wait_ready,
};
use russh::{
    Channel, ChannelMsg,
    client::{self, Handle, Msg},
    keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "common/mod.rs"]
mod common;

/// One `ssh -W` run (open, round trip, close) or one russh session set-up, at most.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// The `[[ssh.user]]` of jumpgate's config; sshd logs in the user running the bench.
const JUMPGATE_USER: &str = "bench";
/// What one `ssh -W` round trip and each idle session's check send (and get back).
const PING: &[u8] = b"ping jumpgate\n";
/// Issue 7's targets.
const THROUGHPUT_TARGET: f64 = 1.0;
const SETUP_TARGET: f64 = 4.0;
const KIB_PER_SESSION_TARGET: f64 = 100.0;

/// (short name, OpenSSH name), in the order: aes256-gcm, chacha20-poly1305 (OpenSSH's
/// default first choice), then aes128-gcm.
const CIPHERS: [(&str, &str); 3] = [
    ("aes256-gcm", "aes256-gcm@openssh.com"),
    ("chacha20-poly1305", "chacha20-poly1305@openssh.com"),
    ("aes128-gcm", "aes128-gcm@openssh.com"),
];

/// Sizes and bounds of one run.
struct Plan {
    full: bool,
    bytes: u64,
    verify_bytes: u64,
    reps: usize,
    setups: usize,
    idle_jumpgate: usize,
    idle_sshd: usize,
    open_workers: usize,
    settle: Duration,
    idle_bound: Duration,
}

const FULL: Plan = Plan {
    full: true,
    bytes: 2 << 30,
    verify_bytes: 64 << 20,
    reps: 5,
    setups: 30,
    idle_jumpgate: 1_000,
    idle_sshd: 50,
    open_workers: 8,
    settle: Duration::from_secs(1),
    idle_bound: Duration::from_secs(120),
};

const SMOKE: Plan = Plan {
    full: false,
    bytes: 32 << 20,
    verify_bytes: 4 << 20,
    reps: 1,
    setups: 5,
    idle_jumpgate: 20,
    idle_sshd: 5,
    open_workers: 4,
    settle: Duration::from_millis(200),
    idle_bound: Duration::from_secs(60),
};

const M_RAW: &str = "raw loopback to the sink, no SSH (Gbit/s)";
const M_SETUP: &str = "`ssh -W` sessions/s (open, round trip, close; sequential)";
const M_SETUP_MS: &str = "`ssh -W` session, p50 (ms)";
const M_KIB_RSS: &str = "KiB RSS per idle session (growth ÷ sessions)";
const M_KIB_PSS: &str = "KiB PSS per idle session (growth ÷ sessions)";
const M_RSS0: &str = "RSS before any session (MiB)";
const M_RSS1: &str = "RSS with the idle sessions open (MiB)";

fn m_throughput(cipher: &str) -> String {
    format!("`ssh -L` throughput, {cipher} (Gbit/s)")
}

fn m_server_cpu(cipher: &str) -> String {
    format!("server CPU per GiB carried, {cipher} (s)")
}

fn m_client_cpu(cipher: &str) -> String {
    format!("`ssh` client CPU per GiB sent, {cipher} (s)")
}

fn main() {
    common::bench_main("ssh", &FULL, &SMOKE, run);
}

fn run(plan: &Plan) -> Result<()> {
    let started = Instant::now();
    let mode = if plan.full {
        "full run"
    } else {
        "smoke run (no --bench)"
    };
    println!("bench ssh: {mode}; load average before: {}", loadavg());
    let mut report = Report::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let lab = Lab::new("jumpgate-bench-ssh-", "bench")?;
    let peers = available_peers(&mut report);
    let sink = start_sink()?;
    let echo = rt.block_on(Echo::start())?;
    let ports = [sink.port(), echo.addr.port()];

    {
        let mut servers = Vec::new();
        for &peer in &peers {
            match Server::start(peer, &lab, ports) {
                Ok(server) => servers.push(server),
                Err(e) => report.fail(peer, "start", &e),
            }
        }
        throughput(plan, &lab, &mut servers, sink, &mut report);
        println!("({:.1} s)", started.elapsed().as_secs_f64());
        connection_setup(plan, &lab, &rt, &mut servers, echo.addr, &mut report);
        println!("({:.1} s)", started.elapsed().as_secs_f64());
    }
    idle_sessions(plan, &lab, &rt, &peers, ports, &echo, &mut report);

    println!(
        "load average after: {}; took {:.1} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    let markdown = report.render(plan, &lab.user);
    println!("\n{markdown}");
    common::write_out("bench-ssh.md", &markdown)?;
    ensure!(
        report.problems.is_empty(),
        "jumpgate did not carry SSH sessions correctly:\n  {}",
        report.problems.join("\n  ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Peers, the processes behind them, and the client key they all accept

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    Raw,
    Jumpgate,
    Sshd,
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
            Peer::Sshd => "sshd",
        }
    }
}

/// The SSH servers to compare (raw loopback is measured alongside, always).
fn available_peers(report: &mut Report) -> Vec<Peer> {
    let only = env::var("JUMPGATE_BENCH_PEERS").ok();
    let mut peers = Vec::new();
    for peer in [Peer::Jumpgate, Peer::Sshd] {
        if let Some(only) = &only
            && !only.split(',').any(|p| p.trim() == peer.name())
        {
            report.note(format!("{}: left out by JUMPGATE_BENCH_PEERS={only}", peer.name()));
            continue;
        }
        if peer == Peer::Sshd && which("sshd").is_none() {
            report.note("sshd: not installed (package openssh-server): skipped".into());
            continue;
        }
        peers.push(peer);
    }
    peers
}

/// The absolute path of `program` in PATH or /usr/sbin, /sbin (sshd refuses a relative path).
fn which(program: &str) -> Option<PathBuf> {
    let path = env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_absolute() && p.is_file())
}

/// Resident memory of a process tree, summed.
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss_kb: u64,
    pss_kb: u64,
    procs: usize,
}

/// VmRSS and PSS (smaps_rollup) of `pid` and its descendants; a descendant that exits meanwhile
/// is left out.
fn memory(pid: i32) -> Result<Memory> {
    let rss = |p: i32| proc_kb(&format!("/proc/{p}/status"), "VmRSS:");
    let pss = |p: i32| proc_kb(&format!("/proc/{p}/smaps_rollup"), "Pss:");
    let mut m = Memory {
        rss_kb: rss(pid).ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?,
        pss_kb: pss(pid).ok_or_else(|| anyhow!("no Pss in /proc/{pid}/smaps_rollup"))?,
        procs: 1,
    };
    for p in descendants(pid) {
        if let (Some(r), Some(s)) = (rss(p), pss(p)) {
            m.rss_kb += r;
            m.pss_kb += s;
            m.procs += 1;
        }
    }
    Ok(m)
}

fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A running SSH server (jumpgate or sshd) and what a client needs to log in.
struct Server {
    peer: Peer,
    addr: SocketAddr,
    user: String,
    known_hosts: PathBuf,
    /// The server's host public keys, for the russh client's check.
    host_keys: Vec<PublicKey>,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Server {
    /// `ports`: the sink's and the echo server's, the only targets jumpgate allows.
    fn start(peer: Peer, lab: &Lab, ports: [u16; 2]) -> Result<Server> {
        match peer {
            Peer::Jumpgate => start_jumpgate(lab, ports),
            Peer::Sshd => start_sshd(lab),
            Peer::Raw => bail!("raw loopback is not an SSH server"),
        }
    }

    /// Writes known_hosts for `[127.0.0.1]:PORT` from `.pub` files and parses the keys.
    fn trust(dir: &Path, addr: SocketAddr, pubs: &[PathBuf]) -> Result<(PathBuf, Vec<PublicKey>)> {
        let (mut lines, mut keys) = (String::new(), Vec::new());
        for path in pubs {
            let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let mut words = text.split_whitespace();
            let (kind, blob) = (words.next(), words.next());
            let (Some(kind), Some(blob)) = (kind, blob) else {
                bail!("{}: not a public key line", path.display());
            };
            let _ = writeln!(lines, "[127.0.0.1]:{} {kind} {blob}", addr.port());
            keys.push(russh::keys::parse_public_key_base64(blob)?);
        }
        let known_hosts = dir.join("known_hosts");
        fs::write(&known_hosts, lines)?;
        Ok((known_hosts, keys))
    }

    /// `ssh <common options> [extra...] -p PORT USER@127.0.0.1`, stdin from /dev/null.
    fn ssh(&self, lab: &Lab, extra: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null"]);
        ssh_options(&mut cmd, &self.known_hosts);
        cmd.arg("-i")
            .arg(&lab.key)
            .args(extra)
            .args(["-p", &self.addr.port().to_string()])
            .arg(format!("{}@127.0.0.1", self.user))
            .stdin(Stdio::null());
        cmd
    }

    fn memory(&self) -> Result<Memory> {
        memory(self.proc.pid())
    }
}

fn start_jumpgate(lab: &Lab, [sink_port, echo_port]: [u16; 2]) -> Result<Server> {
    let dir = tempfile::Builder::new().prefix("jumpgate-").tempdir_in(lab.path())?;
    let state = dir.path().join("state");
    let config = format!(
        "state_dir = \"{state}\"\n\n[log]\nlevel = \"warn\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [ssh]\nlisten = \"127.0.0.1:0\"\n\
         # the bench's targets are on loopback\n\
         deny = []\nmax_startups = 256\n\n\
         [[ssh.user]]\nname = \"{JUMPGATE_USER}\"\nauthorized_keys = \"{keys}\"\n\n\
         [[ssh.allow]]\ncidr = \"127.0.0.1/32\"\nports = [{sink_port}, {echo_port}]\n",
        state = state.display(),
        keys = lab.authorized_keys.display(),
    );
    let config_path = dir.path().join("j.toml");
    let ready = dir.path().join("ready.json");
    fs::write(&config_path, config)?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jumpgate"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .arg("--ready-file")
        .arg(&ready)
        .current_dir(dir.path());
    let mut proc = Proc::spawn_tree("jumpgate", &mut cmd, Some(dir.path().join("jumpgate.log")))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = wait_ready(&ready, &["ssh"], deadline, || proc.alive())?;
    let pubs: Vec<PathBuf> = ["ed25519", "ecdsa"]
        .iter()
        .map(|kind| state.join(format!("ssh_host_{kind}_key.pub")))
        .filter(|p| p.exists())
        .collect();
    ensure!(!pubs.is_empty(), "no host public key in {}", state.display());
    let (known_hosts, host_keys) = Server::trust(dir.path(), addr, &pubs)?;
    Ok(Server {
        peer: Peer::Jumpgate,
        addr,
        user: JUMPGATE_USER.into(),
        known_hosts,
        host_keys,
        proc,
        _dir: dir,
    })
}

fn start_sshd(lab: &Lab) -> Result<Server> {
    let sshd = which("sshd").ok_or_else(|| anyhow!("sshd not found"))?;
    // sshd checks that its privilege-separation directory exists; only root can make it.
    let _ = fs::create_dir_all("/run/sshd");
    let dir = tempfile::Builder::new().prefix("sshd-").tempdir_in(lab.path())?;
    let host_key = dir.path().join("ssh_host_ed25519_key");
    keygen(&host_key, "bench-sshd")?;
    let port = free_port()?;
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {pid}\n\
         AuthorizedKeysFile {keys}\nUsePAM no\nStrictModes no\nAllowTcpForwarding yes\n\
         PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nX11Forwarding no\nAllowAgentForwarding no\nPrintMotd no\n\
         UseDNS no\nMaxStartups 256\nLogLevel ERROR\n",
        host_key = host_key.display(),
        pid = dir.path().join("sshd.pid").display(),
        keys = lab.authorized_keys.display(),
    );
    let config_path = dir.path().join("sshd_config");
    fs::write(&config_path, config)?;
    let mut cmd = Command::new(&sshd);
    cmd.arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config_path)
        .current_dir(dir.path());
    let mut proc = Proc::spawn_tree("sshd", &mut cmd, Some(dir.path().join("sshd.log")))?;
    wait_listening(port, &mut proc)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (known_hosts, host_keys) = Server::trust(dir.path(), addr, &[pub_path(&host_key)])?;
    Ok(Server {
        peer: Peer::Sshd,
        addr,
        user: lab.user.clone(),
        known_hosts,
        host_keys,
        proc,
        _dir: dir,
    })
}

/// Waits until 127.0.0.1:`port` listens, read from /proc/net/tcp so that no probe connection is
/// made; fails if `proc` exits first.
fn wait_listening(port: u16, proc: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        proc.alive()?;
        if is_listening(port)? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{} did not listen on {port}", proc.name);
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` once per server, recording a failure as a problem for jumpgate and as a note for sshd.
fn each_server(
    servers: &mut [Server],
    report: &mut Report,
    what: &str,
    mut f: impl FnMut(&mut Server, &mut Report) -> Result<()>,
) {
    for server in servers {
        if let Err(e) = f(server, report) {
            report.fail(server.peer, what, &e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput: a sink that counts (or checks) bytes and answers with the count after EOF

fn start_sink() -> Result<SocketAddr> {
    common::serve_sink(TcpListener::bind("127.0.0.1:0")?)
}

/// An `ssh -N -L 127.0.0.1:PORT:SINK` process with one cipher forced.
struct LocalForward {
    peer: Peer,
    cipher: &'static str,
    addr: SocketAddr,
    proc: Proc,
    server_pid: i32,
    /// Per repetition: Gbit/s, server CPU s per GiB, client CPU s per GiB.
    gbit: Vec<f64>,
    server_cpu: Vec<f64>,
    client_cpu: Vec<f64>,
    failed: bool,
}

impl LocalForward {
    fn start(server: &Server, lab: &Lab, cipher: (&'static str, &str), target: SocketAddr) -> Result<LocalForward> {
        // A port free a moment ago can be taken meanwhile: try a few times.
        for attempt in 1..=3 {
            let port = free_port()?;
            let forward = format!("127.0.0.1:{port}:{target}");
            let mut cmd = server.ssh(
                lab,
                &["-N", "-o", "ExitOnForwardFailure=yes", "-c", cipher.1, "-L", &forward],
            );
            let log = lab
                .path()
                .join(format!("ssh-L-{}-{}-{attempt}.log", server.peer.name(), cipher.0));
            let mut proc = Proc::spawn_tree("ssh -N -L", &mut cmd, Some(log.clone()))?;
            match wait_listening(port, &mut proc) {
                Ok(()) => {
                    return Ok(LocalForward {
                        peer: server.peer,
                        cipher: cipher.0,
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        proc,
                        server_pid: server.proc.pid(),
                        gbit: Vec::new(),
                        server_cpu: Vec::new(),
                        client_cpu: Vec::new(),
                        failed: false,
                    });
                }
                Err(_) if tail(&log, 20).contains("Address already in use") => continue,
                Err(e) => return Err(e),
            }
        }
        bail!("ssh -L found no free local port in 3 tries")
    }
}

fn throughput(plan: &Plan, lab: &Lab, servers: &mut [Server], sink: SocketAddr, report: &mut Report) {
    println!(
        "\n== `ssh -N -L` throughput, {} MiB per transfer (sink at {sink}) ==",
        plan.bytes >> 20
    );
    let mut forwards = Vec::new();
    for cipher in CIPHERS {
        each_server(servers, report, &format!("ssh -L with {}", cipher.0), |server, _| {
            let mut fwd = LocalForward::start(server, lab, cipher, sink)?;
            push(fwd.addr, plan.verify_bytes, true).context("byte-exact transfer with half-close")?;
            fwd.proc.alive()?;
            println!(
                "{:<9} {:<18} {} MiB byte-exact, half-close ok",
                server.peer.name(),
                cipher.0,
                plan.verify_bytes >> 20
            );
            forwards.push(fwd);
            Ok(())
        });
    }
    report.note(format!(
        "{} MiB arrived byte-exact through `ssh -L`, and the sink's answer after the client's \
         half-close came back, with each cipher through: {}",
        plan.verify_bytes >> 20,
        servers.iter().map(|s| s.peer.name()).collect::<Vec<_>>().join(", ")
    ));
    let mut raw = Vec::new();
    // Everything takes turns in each repetition, so a disturbance hits the peers alike.
    for rep in 1..=plan.reps {
        match push(sink, plan.bytes, false) {
            Ok(t) => {
                println!("{:<9} rep {rep}: {:6.2} Gbit/s", "raw", gbit(plan.bytes, t));
                raw.push(gbit(plan.bytes, t));
            }
            Err(e) => report.note(format!("raw loopback: {e:#}")),
        }
        for fwd in forwards.iter_mut().filter(|f| !f.failed) {
            let gib = plan.bytes as f64 / f64::from(1u32 << 30);
            let (server0, client0) = (cpu_seconds(fwd.server_pid), cpu_seconds(fwd.proc.pid()));
            let result = push(fwd.addr, plan.bytes, false).and_then(|t| {
                fwd.proc.alive()?;
                Ok(t)
            });
            match result {
                Ok(t) => {
                    let server = (cpu_seconds(fwd.server_pid) - server0) / gib;
                    let client = (cpu_seconds(fwd.proc.pid()) - client0) / gib;
                    println!(
                        "{:<9} rep {rep}: {:6.2} Gbit/s  {:<18} CPU s/GiB: server {server:.2}, ssh client {client:.2}",
                        fwd.peer.name(),
                        gbit(plan.bytes, t),
                        fwd.cipher
                    );
                    fwd.gbit.push(gbit(plan.bytes, t));
                    fwd.server_cpu.push(server);
                    fwd.client_cpu.push(client);
                }
                Err(e) => {
                    fwd.failed = true;
                    report.fail(fwd.peer, &format!("throughput with {}", fwd.cipher), &e);
                }
            }
        }
    }
    if !raw.is_empty() {
        report.add(M_RAW, Peer::Raw, median(&raw), "Gbit/s", true);
    }
    let done = |f: &&mut LocalForward, cipher: &str| f.cipher == cipher && !f.failed;
    for (cipher, _) in CIPHERS {
        for fwd in forwards.iter_mut().filter(|f| done(f, cipher)) {
            let gbit = median(&fwd.gbit);
            report.add(&m_throughput(cipher), fwd.peer, gbit, "Gbit/s", true);
        }
    }
    for (cipher, _) in CIPHERS {
        for fwd in forwards.iter_mut().filter(|f| done(f, cipher)) {
            let cpu = median(&fwd.server_cpu);
            report.add(&m_server_cpu(cipher), fwd.peer, cpu, "s/GiB", false);
        }
    }
    for (cipher, _) in CIPHERS {
        for fwd in forwards.iter_mut().filter(|f| done(f, cipher)) {
            let cpu = median(&fwd.client_cpu);
            report.add(&m_client_cpu(cipher), fwd.peer, cpu, "s/GiB", false);
        }
    }
    for (cipher, _) in CIPHERS {
        // Paired: each jumpgate transfer against the sshd transfer right after it.
        let of = |peer| {
            forwards
                .iter()
                .find(|f| f.cipher == cipher && f.peer == peer && !f.failed)
        };
        if let (Some(jg), Some(sshd)) = (of(Peer::Jumpgate), of(Peer::Sshd)) {
            let ratios: Vec<String> = jg
                .gbit
                .iter()
                .zip(&sshd.gbit)
                .map(|(a, b)| format!("{:.2}", a / b))
                .collect();
            report.note(format!(
                "{cipher}: jumpgate ÷ sshd throughput per repetition (each pair back to back): {}",
                ratios.join(", ")
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection setup: sequential `ssh -W` to an echo server, one round trip each

/// A loopback echo server on the bench's runtime: echoes until EOF, then closes. Counts the
/// connections open now, so the idle-session phase can see its channels reach it.
struct Echo {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
}

impl Echo {
    async fn start() -> Result<Echo> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let count = count.clone();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = stream.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = wr.shutdown().await;
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Echo { addr, open })
    }
}

/// One `ssh -W`: start, send PING, read it back, close stdin, wait for a clean exit. Returns
/// the time from start to exit and ssh's stderr.
async fn setup_once(cmd: Command) -> Result<(Duration, String)> {
    let start = Instant::now();
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("starting ssh -W")?;
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("ssh -W without pipes");
    };
    let exchange = async {
        stdin.write_all(PING).await?;
        let mut back = vec![0u8; PING.len()];
        stdout.read_exact(&mut back).await?;
        drop(stdin);
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).await?;
        Ok::<_, io::Error>((back, rest))
    };
    let outcome = tokio::time::timeout(SESSION_TIMEOUT, async {
        let exchanged = exchange.await;
        let output = child.wait_with_output().await?;
        Ok::<_, io::Error>((exchanged, output))
    })
    .await;
    let (exchanged, output) = outcome.map_err(|_| anyhow!("ssh -W took over {SESSION_TIMEOUT:?}"))??;
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let (back, rest) = exchanged.with_context(|| format!("ssh -W exchange; stderr: {stderr}"))?;
    ensure!(back == PING, "the echo came back as {back:?}; stderr: {stderr}");
    ensure!(rest.is_empty(), "{} bytes after the echo", rest.len());
    ensure!(
        output.status.success(),
        "ssh -W exited {}; stderr: {stderr}",
        output.status
    );
    Ok((elapsed, stderr.into_owned()))
}

/// What `ssh -v` says it negotiated: "KEX, cipher" (or "?" for a part it did not print).
fn negotiated(verbose: &str) -> String {
    let find = |prefix: &str| {
        verbose
            .lines()
            .find_map(|l| {
                l.split_once(prefix)
                    .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("?"))
            })
            .unwrap_or("?")
            .to_string()
    };
    format!("{}, {}", find("kex: algorithm: "), find("kex: client->server cipher: "))
}

fn connection_setup(
    plan: &Plan,
    lab: &Lab,
    rt: &tokio::runtime::Runtime,
    servers: &mut [Server],
    echo: SocketAddr,
    report: &mut Report,
) {
    println!(
        "\n== connection setup: {} sequential `ssh -W {echo}` (open, round trip, close) ==",
        plan.setups
    );
    let target = echo.to_string();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); servers.len()];
    let mut failed = vec![false; servers.len()];
    // One unmeasured run each first (the ssh binary and libraries into the page cache), with -v
    // to see what the client negotiated with its default algorithms.
    let mut algorithms = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        match rt.block_on(setup_once(server.ssh(lab, &["-v", "-W", &target]))) {
            Ok((_, verbose)) => algorithms.push(format!("{} {}", server.peer.name(), negotiated(&verbose))),
            Err(e) => {
                failed[i] = true;
                report.fail(server.peer, "ssh -W", &e);
            }
        }
    }
    report.note(format!(
        "`ssh -W` negotiated (key exchange, cipher) with the client's defaults: {}",
        algorithms.join("; ")
    ));
    for _ in 0..plan.setups {
        for (i, server) in servers.iter_mut().enumerate() {
            if failed[i] {
                continue;
            }
            let result = rt
                .block_on(setup_once(server.ssh(lab, &["-W", &target])))
                .and_then(|(t, _)| server.proc.alive().map(|()| t));
            match result {
                Ok(t) => times[i].push(t.as_secs_f64()),
                Err(e) => {
                    failed[i] = true;
                    report.fail(server.peer, "ssh -W", &e);
                }
            }
        }
    }
    for (i, server) in servers.iter().enumerate() {
        if failed[i] {
            continue;
        }
        let total: f64 = times[i].iter().sum();
        let per_sec = times[i].len() as f64 / total;
        let ms: Vec<f64> = times[i].iter().map(|t| t * 1e3).collect();
        println!(
            "{:<9} {} sessions in {total:.2} s: {per_sec:.1}/s",
            server.peer.name(),
            times[i].len()
        );
        report.add(M_SETUP, server.peer, per_sec, "/s", true);
        report.add(M_SETUP_MS, server.peer, median(&ms), "ms", false);
    }
}

// ---------------------------------------------------------------------------------------------
// Idle sessions: a russh client in this process holds N sessions with one channel each

/// Accepts exactly the server's host keys (the russh twin of StrictHostKeyChecking=yes).
struct BenchClient {
    host_keys: Arc<Vec<PublicKey>>,
}

impl client::Handler for BenchClient {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                self.host_keys.iter().any(|k| k.key_data() == key.key_data())
            }
            PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

/// One authenticated session and its open direct-tcpip channel to the echo server.
struct Held {
    handle: Handle<BenchClient>,
    channel: Channel<Msg>,
}

/// What every session of one server needs.
struct Target {
    config: Arc<client::Config>,
    addr: SocketAddr,
    user: String,
    host_keys: Arc<Vec<PublicKey>>,
    key: Arc<PrivateKey>,
    echo: SocketAddr,
}

async fn open_session(t: &Target) -> Result<Held> {
    let client = BenchClient {
        host_keys: t.host_keys.clone(),
    };
    let mut handle = client::connect(t.config.clone(), t.addr, client).await?;
    let auth = handle
        .authenticate_publickey(&t.user, PrivateKeyWithHashAlg::new(t.key.clone(), None))
        .await?;
    ensure!(auth.success(), "public key refused: {auth:?}");
    let ip = t.echo.ip().to_string();
    let mut channel = handle
        .channel_open_direct_tcpip(ip, u32::from(t.echo.port()), "127.0.0.1", 0)
        .await?;
    round_trip(&mut channel).await?;
    Ok(Held { handle, channel })
}

/// PING through the channel to the echo server and back.
async fn round_trip(channel: &mut Channel<Msg>) -> Result<()> {
    channel.data_bytes(PING).await?;
    let mut back = Vec::new();
    while back.len() < PING.len() {
        match channel.wait().await {
            Some(ChannelMsg::Data { data }) => back.extend_from_slice(&data),
            Some(ChannelMsg::WindowAdjusted { .. }) => {}
            Some(other) => bail!("expected the echo, got {other:?}"),
            None => bail!("channel closed before the echo"),
        }
    }
    ensure!(back == PING, "the echo came back as {back:?}");
    Ok(())
}

/// Opens `n` sessions with `workers` at a time, each with its channel checked by a round trip.
async fn open_sessions(t: Arc<Target>, n: usize, workers: usize, bound: Duration) -> Result<Vec<Held>> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + bound;
    let mut tasks: tokio::task::JoinSet<Result<Vec<Held>>> = tokio::task::JoinSet::new();
    for _ in 0..workers.min(n) {
        let (t, next) = (t.clone(), next.clone());
        tasks.spawn(async move {
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return Ok(held);
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let opened = tokio::time::timeout(SESSION_TIMEOUT.min(left), open_session(&t))
                    .await
                    .map_err(|_| anyhow!("session {} not open in time ({bound:?} for all)", i + 1))?;
                held.push(opened.with_context(|| format!("session {}", i + 1))?);
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        all.extend(joined??);
    }
    Ok(all)
}

/// A round trip on every held channel, `workers` at a time.
async fn check_sessions(held: &mut [Held], workers: usize) -> Result<()> {
    let size = held.len().div_ceil(workers.max(1)).max(1);
    let checks = held.chunks_mut(size).map(|chunk| async move {
        for (i, h) in chunk.iter_mut().enumerate() {
            let checked = tokio::time::timeout(SESSION_TIMEOUT, round_trip(&mut h.channel)).await;
            checked
                .map_err(|_| anyhow!("no echo within {SESSION_TIMEOUT:?}"))?
                .with_context(|| format!("held channel {i} of its group"))?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let results: Vec<Result<()>> = join_all(checks.collect()).await;
    results.into_iter().collect()
}

/// Awaits every future, concurrently on this task.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

fn idle_sessions(
    plan: &Plan,
    lab: &Lab,
    rt: &tokio::runtime::Runtime,
    peers: &[Peer],
    ports: [u16; 2],
    echo: &Echo,
    report: &mut Report,
) {
    println!("\n== idle authenticated sessions, one direct-tcpip channel each (russh client) ==");
    let key = match russh::keys::load_secret_key(&lab.key, None) {
        Ok(key) => Arc::new(key),
        Err(e) => {
            report.fail(Peer::Jumpgate, "idle sessions", &anyhow!("loading the client key: {e}"));
            return;
        }
    };
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        nodelay: true,
        ..client::Config::default()
    });
    for &peer in peers {
        let n = match peer {
            Peer::Sshd => plan.idle_sshd,
            _ => plan.idle_jumpgate,
        };
        let measured = (|| -> Result<()> {
            // A fresh server: nothing left over from the other phases.
            let mut server = Server::start(peer, lab, ports)?;
            let target = Arc::new(Target {
                config: config.clone(),
                addr: server.addr,
                user: server.user.clone(),
                host_keys: Arc::new(server.host_keys.clone()),
                key: key.clone(),
                echo: echo.addr,
            });
            thread::sleep(plan.settle);
            let before = server.memory()?;
            let echo_before = echo.open.load(Ordering::SeqCst);
            let started = Instant::now();
            let mut held = rt.block_on(open_sessions(target, n, plan.open_workers, plan.idle_bound))?;
            let opened_in = started.elapsed();
            thread::sleep(plan.settle);
            server.proc.alive()?;
            let after = server.memory()?;
            let fds = open_fds(server.proc.pid());
            let upstream = echo.open.load(Ordering::SeqCst) - echo_before;
            ensure!(
                upstream >= n,
                "{n} sessions open but only {upstream} connections reached the echo server"
            );
            rt.block_on(check_sessions(&mut held, plan.open_workers))
                .context("round trip on the held channels after measuring")?;
            println!(
                "{:<9} {n} sessions opened in {:.1} s; RSS {:.1} -> {:.1} MiB, PSS {:.1} -> {:.1} MiB \
                 ({} processes), {fds} descriptors; every channel still echoes",
                peer.name(),
                opened_in.as_secs_f64(),
                before.rss_kb as f64 / 1024.0,
                after.rss_kb as f64 / 1024.0,
                before.pss_kb as f64 / 1024.0,
                after.pss_kb as f64 / 1024.0,
                after.procs,
            );
            let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
            report.add(M_RSS0, peer, before.rss_kb as f64 / 1024.0, "MiB", false);
            report.add(M_RSS1, peer, after.rss_kb as f64 / 1024.0, "MiB", false);
            report.add(M_KIB_RSS, peer, per(after.rss_kb, before.rss_kb), "KiB", false);
            report.add(M_KIB_PSS, peer, per(after.pss_kb, before.pss_kb), "KiB", false);
            if peer == Peer::Sshd {
                report.note(format!(
                    "sshd: memory summed over the listener and its {} per-session processes",
                    after.procs - 1
                ));
            }
            rt.block_on(async move {
                for h in &held {
                    let _ = h.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
                }
                drop(held);
            });
            Ok(())
        })();
        if let Err(e) = measured {
            report.fail(peer, &format!("{n} idle sessions"), &e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report: table, targets, Markdown

type Report = common::Report<Peer>;

impl Report {
    /// (target, Some((measured, met))).
    fn targets(&self) -> Vec<(String, Option<(f64, bool)>)> {
        let ratio = |metric: &str| Some(self.value(metric, Peer::Jumpgate)? / self.value(metric, Peer::Sshd)?);
        let mut targets = Vec::new();
        for (cipher, _) in CIPHERS {
            let r = ratio(&m_throughput(cipher)).map(|r| (r, r >= THROUGHPUT_TARGET));
            targets.push((
                format!("`ssh -L` throughput with {cipher}: jumpgate ≥ {THROUGHPUT_TARGET:.1}× sshd"),
                r,
            ));
        }
        targets.push((
            format!("connection setup (`ssh -W`): jumpgate ≥ {SETUP_TARGET:.0}× sshd's rate"),
            ratio(M_SETUP).map(|r| (r, r >= SETUP_TARGET)),
        ));
        for (metric, kind) in [(M_KIB_PSS, "PSS"), (M_KIB_RSS, "RSS")] {
            let kib = self.value(metric, Peer::Jumpgate);
            targets.push((
                format!("memory per idle session with a channel ({kind}): jumpgate ≤ {KIB_PER_SESSION_TARGET:.0} KiB"),
                kib.map(|k| (k, k <= KIB_PER_SESSION_TARGET)),
            ));
        }
        targets
    }

    fn render(&self, plan: &Plan, sshd_user: &str) -> String {
        let mut md = String::new();
        common::write_header(&mut md, "SSH", "ssh", plan.full, &common::openssh_machine());
        let _ = writeln!(
            md,
            "- sizes: {} MiB per `ssh -L` transfer × {} reps (median) per cipher, {} MiB checked \
             byte-exact first; {} sequential `ssh -W`; {} idle sessions on jumpgate, {} on sshd (each on a fresh \
             server process)",
            plan.bytes >> 20,
            plan.reps,
            plan.verify_bytes >> 20,
            plan.setups,
            thousands(plan.idle_jumpgate),
            thousands(plan.idle_sshd),
        );
        let _ = writeln!(
            md,
            "- method: one OpenSSH client for both servers (`ssh -F /dev/null`, StrictHostKeyChecking=yes, \
             one ed25519 user key). Throughput: `ssh -N -L 127.0.0.1:P:SINK -c CIPHER`; a std thread \
             writes 1 MiB chunks into P, half-closes, and the time runs until the sink (a thread of \
             the bench, dropping bytes with recv MSG_TRUNC) answers the count; CPU per GiB is the user + system time (/proc/PID/stat) the server's process \
             tree and the ssh client spent during the timed transfer, ÷ GiB. Setup: `ssh -W \
             127.0.0.1:ECHO` with the client's default algorithms, timed from spawn to clean exit \
             after one {}-byte round trip. Memory: a russh 0.65 client in the bench opens the \
             sessions ({} at a time), authenticates with the same key, opens one direct-tcpip \
             channel each to the echo server and checks a round trip on it; RSS (VmRSS) and PSS \
             (smaps_rollup) of a fresh server process tree before and after, ÷ sessions",
            PING.len(),
            plan.open_workers,
        );
        let _ = writeln!(
            md,
            "- peers: jumpgate `run` with `[log] level = \"warn\"`, `deny = []`, one `[[ssh.allow]]` \
             cidr 127.0.0.1/32 for the two ports; OpenSSH `sshd -D -e -f` with its own config (high port, \
             ed25519 host key, UsePAM no, AllowTcpForwarding yes, LogLevel ERROR), logging in `{sshd_user}` \
             (the user running the bench)"
        );
        let _ = writeln!(
            md,
            "- \"× raw\": throughput ÷ raw loopback's; \"jumpgate ÷ sshd\": jumpgate's value ÷ sshd's \
             (above 1 is better for jumpgate where higher is better ↑, below 1 where lower is ↓)\n"
        );
        let _ = writeln!(md, "| metric | peer | value | × raw | jumpgate ÷ sshd |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        let raw = self.value(M_RAW, Peer::Raw);
        for metric in self.metrics() {
            for row in self.rows.iter().filter(|r| r.metric == metric) {
                let vs_raw = match raw {
                    Some(raw) if row.unit == "Gbit/s" && row.peer != Peer::Raw => format!("{:.2}", row.value / raw),
                    _ => "—".into(),
                };
                let versus = match (row.peer, self.value(metric, Peer::Jumpgate)) {
                    (Peer::Sshd, Some(jg)) => format!("**{:.2}**", jg / row.value),
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
        common::write_targets(&mut md, 7, common::numbered(self.targets()));
        self.write_notes(&mut md);
        md
    }
}
