//! `cargo bench --bench forward`: a `[[forward]]` route of jumpgate against raw loopback, socat
//! and HAProxy (`mode tcp`, `option splice-auto`), side by side in one run (issue 6, "Numbers").
//!
//! Measured: single-stream and 16-stream throughput, connections per second (connect + first
//! byte), RSS of the whole forwarder with 1,000 and 9,900 idle connections, and how long a DNS
//! change takes to reach new connections (a hickory-server authority inside this process). It
//! prints a table, writes it to `target/bench-forward.md` with a bar chart in
//! `target/bench-forward.svg`, and exits 1 if jumpgate forwarded anything wrongly.
//!
//! Without `--bench` (how `cargo test --all-targets` runs it, debug build) it is a smoke run of
//! a few seconds: small sizes, few connections, every path still exercised and checked.
//! `JUMPGATE_BENCH_PEERS=raw,socat` limits the run to some peers. A peer that is not installed is
//! skipped with a note. Only loopback addresses are ever targets; every child process started here
//! is killed with its process group when its guard drops.

use std::{
    env,
    fmt::Write as _,
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::{
    BenchPeer, Proc, START_TIMEOUT, free_port, gbit, host, is_listening, loadavg, median, number, push, target_dir,
    thousands, wait_ready, xml,
};
use hickory_server::{
    Server,
    proto::rr::{
        LowerName, Name, RData, Record, RecordSet, RecordType, RrKey,
        rdata::{A, SOA},
    },
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType},
};

#[path = "common/mod.rs"]
mod common;

/// argv[1] that turns this binary into the idle-connection upstream (a child process, so neither
/// it nor the bench holds more than ~10,000 of the 20,000 descriptors a process may have here).
const IDLE_CHILD_ARG: &str = "--idle-upstream-child";
const DNS_ZONE: &str = "jumpgate.test.";
const DNS_NAME: &str = "db.jumpgate.test";
const DNS_TTL_S: u32 = 1;
/// Issue 6: a DNS change must reach new connections within the TTL + 0.5 s.
const DNS_TARGET_MS: f64 = DNS_TTL_S as f64 * 1000.0 + 500.0;
const DNS_POLL: Duration = Duration::from_millis(20);
/// 2 × 9,900 sockets + 2 × 64 pipes + a few listeners stay under HAProxy's `ulimit-n 20000`.
const HAPROXY_MAXCONN: usize = 9_900;

/// Sizes and bounds of one run.
struct Plan {
    full: bool,
    single_bytes: u64,
    streams: usize,
    stream_bytes: u64,
    reps: usize,
    verify_bytes: u64,
    cps_time: Duration,
    cps_max: u64,
    cps_workers: usize,
    idle_steps: [usize; 2],
    settle: Duration,
    dns_trials: usize,
    dns_bound: Duration,
}

const FULL: Plan = Plan {
    full: true,
    single_bytes: 4 << 30,
    streams: 16,
    stream_bytes: 256 << 20,
    reps: 3,
    verify_bytes: 256 << 20,
    cps_time: Duration::from_secs(3),
    cps_max: 100_000,
    cps_workers: 4,
    idle_steps: [1_000, 9_900],
    settle: Duration::from_secs(1),
    dns_trials: 6,
    dns_bound: Duration::from_secs(10),
};

const SMOKE: Plan = Plan {
    full: false,
    single_bytes: 64 << 20,
    streams: 16,
    stream_bytes: 2 << 20,
    reps: 1,
    verify_bytes: 4 << 20,
    cps_time: Duration::from_millis(300),
    cps_max: 300,
    cps_workers: 2,
    idle_steps: [50, 200],
    settle: Duration::from_millis(200),
    dns_trials: 1,
    dns_bound: Duration::from_secs(5),
};

const M_SINGLE: &str = "single-stream throughput (Gbit/s)";
const M_MULTI: &str = "16-stream aggregate throughput (Gbit/s)";
const M_CPS: &str = "connections/s (connect + first byte)";
const M_TTFB: &str = "connect + first byte, p50 (ms)";
const M_RSS0: &str = "RSS before any connection (MiB)";
const M_KB: &str = "KiB per idle connection (RSS growth ÷ connections)";
const M_DNS_MED: &str = "DNS change reaches new connections, median (ms)";
const M_DNS_MAX: &str = "DNS change reaches new connections, max (ms)";

fn m_rss(n: usize) -> String {
    format!("RSS with {} idle connections (MiB)", thousands(n))
}

fn main() {
    if env::args().nth(1).as_deref() == Some(IDLE_CHILD_ARG) {
        idle_child();
        return;
    }
    common::bench_main("forward", &FULL, &SMOKE, run);
}

fn run(plan: &Plan) -> Result<()> {
    let started = Instant::now();
    let mode = if plan.full {
        "full run"
    } else {
        "smoke run (no --bench)"
    };
    println!("bench forward: {mode}; load average before: {}", loadavg());
    let mut report = Report::default();
    let peers = available_peers(&mut report);
    let sink = start_sink()?;
    let one_byte = start_one_byte()?;

    streams(plan, &peers, sink, &mut report);
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    connections_per_second(plan, &peers, one_byte, &mut report);
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    idle(plan, &peers, &mut report);
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    dns_change(plan, &peers, &mut report)?;

    println!(
        "load average after: {}; took {:.1} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    let markdown = report.render(plan);
    println!("\n{markdown}");
    let out = target_dir();
    fs::create_dir_all(&out)?;
    fs::write(out.join("bench-forward.md"), &markdown)?;
    fs::write(out.join("bench-forward.svg"), report.svg())?;
    println!("wrote {} and bench-forward.svg", out.join("bench-forward.md").display());
    ensure!(
        report.problems.is_empty(),
        "jumpgate did not forward correctly:\n  {}",
        report.problems.join("\n  ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Peers and the processes behind them

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    Raw,
    Jumpgate,
    Socat,
    Haproxy,
}

impl BenchPeer for Peer {
    const JUMPGATE: Peer = Peer::Jumpgate;
    fn label(self) -> &'static str {
        self.name()
    }
}

const ALL_PEERS: [Peer; 4] = [Peer::Raw, Peer::Jumpgate, Peer::Socat, Peer::Haproxy];

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Raw => "raw loopback",
            Peer::Jumpgate => "jumpgate",
            Peer::Socat => "socat",
            Peer::Haproxy => "haproxy",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Peer::Raw => "raw",
            other => other.name(),
        }
    }

    fn color(self) -> &'static str {
        match self {
            Peer::Raw => "#9e9e9e",
            Peer::Jumpgate => "#1f77b4",
            Peer::Socat => "#ff7f0e",
            Peer::Haproxy => "#2ca02c",
        }
    }
}

fn available_peers(report: &mut Report) -> Vec<Peer> {
    let only = env::var("JUMPGATE_BENCH_PEERS").ok();
    let mut peers = Vec::new();
    for peer in ALL_PEERS {
        if let Some(only) = &only
            && !only.split(',').any(|p| p.trim() == peer.key())
        {
            report.note(format!("{}: left out by JUMPGATE_BENCH_PEERS={only}", peer.name()));
            continue;
        }
        let program = match peer {
            Peer::Socat => Some("socat"),
            Peer::Haproxy => Some("haproxy"),
            _ => None,
        };
        match program {
            Some(p) if which(p).is_none() => {
                report.note(format!("{}: not installed (`{p}` not on PATH): skipped", peer.name()))
            }
            _ => peers.push(peer),
        }
    }
    peers
}

fn which(program: &str) -> Option<PathBuf> {
    let path = env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Where a forwarder sends its connections.
enum Target {
    Addr(SocketAddr),
    Dns { port: u16, server: SocketAddr },
}

/// One forwarder instance with one route (or raw loopback: no process at all).
struct Forwarder {
    peer: Peer,
    addr: SocketAddr,
    proc: Option<Proc>,
    _dir: Option<tempfile::TempDir>,
}

impl Forwarder {
    fn start(peer: Peer, target: &Target) -> Result<Forwarder> {
        match (peer, target) {
            (Peer::Raw, Target::Addr(addr)) => Ok(Forwarder {
                peer,
                addr: *addr,
                proc: None,
                _dir: None,
            }),
            (Peer::Jumpgate, _) => start_jumpgate(target),
            (Peer::Socat, Target::Addr(addr)) => {
                let dir = tempfile::tempdir()?;
                let port = free_port()?;
                let mut cmd = Command::new("socat");
                cmd.arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096"))
                    .arg(format!("TCP:{addr}"))
                    .current_dir(dir.path());
                let proc = Proc::spawn("socat", &mut cmd, Some(dir.path().join("socat.log")))?;
                Forwarder::listening(peer, port, proc, dir)
            }
            (Peer::Haproxy, _) => {
                let dir = tempfile::tempdir()?;
                let port = free_port()?;
                let cfg = dir.path().join("haproxy.cfg");
                fs::write(&cfg, haproxy_config(port, target))?;
                let mut cmd = Command::new("haproxy");
                cmd.arg("-db").arg("-f").arg(&cfg).current_dir(dir.path());
                let proc = Proc::spawn("haproxy", &mut cmd, Some(dir.path().join("haproxy.log")))?;
                Forwarder::listening(peer, port, proc, dir)
            }
            _ => bail!("{} cannot forward to a DNS name here", peer.name()),
        }
    }

    /// Waits until the process listens on `port`, read from /proc/net/tcp so that no probe
    /// connection reaches the upstream.
    fn listening(peer: Peer, port: u16, mut proc: Proc, dir: tempfile::TempDir) -> Result<Self> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            proc.alive()?;
            if is_listening(port)? {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let (proc, _dir) = (Some(proc), Some(dir));
                return Ok(Forwarder { peer, addr, proc, _dir });
            }
            ensure!(Instant::now() < deadline, "{} did not listen on {port}", peer.name());
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn rss_kb(&self) -> Result<u64> {
        self.proc.as_ref().ok_or_else(|| anyhow!("no process"))?.rss_kb()
    }

    fn alive(&mut self) -> Result<()> {
        self.proc.as_mut().map_or(Ok(()), Proc::alive)
    }
}

fn start_jumpgate(target: &Target) -> Result<Forwarder> {
    let dir = tempfile::tempdir()?;
    let (target, nameservers) = match target {
        Target::Addr(addr) => (addr.to_string(), String::new()),
        Target::Dns { port, server } => (format!("{DNS_NAME}:{port}"), format!("nameservers = [\"{server}\"]\n")),
    };
    let config = format!(
        "[log]\nlevel = \"warn\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [dns]\n{nameservers}min_ttl = \"1s\"\nmax_ttl = \"30s\"\n\
         [[forward]]\nname = \"bench\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{target}\"\n"
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
    let mut proc = Proc::spawn("jumpgate", &mut cmd, Some(dir.path().join("jumpgate.log")))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = wait_ready(&ready, &["forward", "bench"], deadline, || proc.alive())?;
    Ok(Forwarder {
        peer: Peer::Jumpgate,
        addr,
        proc: Some(proc),
        _dir: Some(dir),
    })
}

fn haproxy_config(port: u16, target: &Target) -> String {
    let (server, resolvers) = match target {
        Target::Addr(addr) => (format!("server up {addr}"), String::new()),
        Target::Dns { port, server } => (
            format!("server up {DNS_NAME}:{port} resolvers bench resolve-prefer ipv4 init-addr none"),
            format!(
                "resolvers bench\n    nameserver ns {server}\n    hold valid 1s\n    \
                 timeout resolve 1s\n    timeout retry 1s\n"
            ),
        ),
    };
    format!(
        "global\n    maxconn {HAPROXY_MAXCONN}\n    ulimit-n 20000\n    maxpipes 64\n\
         defaults\n    mode tcp\n    option splice-auto\n    maxconn {HAPROXY_MAXCONN}\n    \
         timeout connect 5s\n    timeout client 10m\n    timeout server 10m\n\
         frontend bench\n    bind 127.0.0.1:{port}\n    default_backend up\n\
         backend up\n    {server}\n{resolvers}"
    )
}

/// A loopback listener with a deep accept queue (std asks for 128), so bursts of connects do not
/// wait for SYN retransmits.
fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    // SAFETY: listen(2) on a socket this function owns; a second listen() only resizes the queue.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    ensure!(rc == 0, "listen: {}", io::Error::last_os_error());
    Ok(listener)
}

/// Runs `f` once per peer (a fresh forwarder each), recording a failure as a problem for jumpgate
/// and as a note for the others.
fn each_peer(peers: &[Peer], report: &mut Report, what: &str, mut f: impl FnMut(Peer, &mut Report) -> Result<()>) {
    for &peer in peers {
        if let Err(e) = f(peer, report) {
            report.fail(peer, what, &e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput: a sink that counts (or checks) bytes and answers with the count after EOF

fn start_sink() -> Result<SocketAddr> {
    common::serve_sink(listen(SocketAddr::from(([127, 0, 0, 1], 0)))?)
}

/// `streams` pushes at once; the time runs from the first start to the last count received.
fn push_parallel(addr: SocketAddr, streams: usize, bytes: u64) -> Result<Duration> {
    let barrier = Barrier::new(streams);
    let spans = thread::scope(|scope| {
        let workers: Vec<_> = (0..streams)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    push(addr, bytes, false).map(|time| (start, start + time))
                })
            })
            .collect();
        let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        joined
            .into_iter()
            .map(|r| r.map_err(|_| anyhow!("stream thread panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;
    let first = spans.iter().map(|s| s.0).min().ok_or_else(|| anyhow!("no streams"))?;
    let last = spans.iter().map(|s| s.1).max().ok_or_else(|| anyhow!("no streams"))?;
    Ok(last - first)
}

fn streams(plan: &Plan, peers: &[Peer], sink: SocketAddr, report: &mut Report) {
    println!("\n== throughput (sink at {sink}) ==");
    let (mut fwds, mut checked) = (Vec::new(), Vec::new());
    each_peer(peers, report, "throughput", |peer, _| {
        let fwd = Forwarder::start(peer, &Target::Addr(sink))?;
        push(fwd.addr, plan.verify_bytes, true).context("byte-exact transfer with half-close")?;
        println!(
            "{:<13} {} MiB byte-exact, half-close ok",
            peer.name(),
            plan.verify_bytes >> 20
        );
        checked.push(peer.name());
        fwds.push(fwd);
        Ok(())
    });
    report.note(format!(
        "{} MiB arrived byte-exact, and the answer after the client's half-close came back, \
         through: {}",
        plan.verify_bytes >> 20,
        checked.join(", ")
    ));
    let mut single: Vec<Vec<f64>> = vec![Vec::new(); fwds.len()];
    let mut multi: Vec<Vec<f64>> = vec![Vec::new(); fwds.len()];
    let mut failed = vec![false; fwds.len()];
    // Peers take turns in each repetition, so a disturbance hits them alike.
    for rep in 1..=plan.reps {
        for (i, fwd) in fwds.iter_mut().enumerate() {
            if failed[i] {
                continue;
            }
            let result = push(fwd.addr, plan.single_bytes, false).and_then(|t1| {
                let tn = push_parallel(fwd.addr, plan.streams, plan.stream_bytes)?;
                fwd.alive()?;
                Ok((
                    gbit(plan.single_bytes, t1),
                    gbit(plan.stream_bytes * plan.streams as u64, tn),
                ))
            });
            match result {
                Ok((one, many)) => {
                    println!(
                        "{:<13} rep {rep}: single {one:6.2} Gbit/s, {} streams {many:6.2} Gbit/s",
                        fwd.peer.name(),
                        plan.streams
                    );
                    single[i].push(one);
                    multi[i].push(many);
                }
                Err(e) => {
                    failed[i] = true;
                    report.fail(fwd.peer, "throughput", &e);
                }
            }
        }
    }
    for (i, fwd) in fwds.iter().enumerate() {
        if !failed[i] {
            report.add(M_SINGLE, fwd.peer, median(&single[i]), "Gbit/s", true);
            report.add(M_MULTI, fwd.peer, median(&multi[i]), "Gbit/s", true);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections per second: an upstream that writes one byte on accept and closes

fn start_one_byte() -> Result<SocketAddr> {
    let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = listener.local_addr()?;
    thread::Builder::new().name("one-byte".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                // A fresh socket's send buffer always takes one byte; closing first here keeps
                // TIME_WAIT on the server side, so the clients' ephemeral ports do not run out.
                Ok(mut stream) => drop(stream.write_all(b"!")),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })?;
    Ok(addr)
}

/// Connect, read the upstream's byte (the time to here is returned), then read the EOF.
fn one_connection(addr: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2];
    let n = stream.read(&mut buf)?;
    ensure!(
        n == 1 && buf[0] == b'!',
        "expected the upstream's \"!\", got {:?}",
        &buf[..n]
    );
    let first_byte = start.elapsed();
    let n = stream.read(&mut buf)?;
    ensure!(n == 0, "expected EOF after the upstream's byte, got {n} more bytes");
    Ok(first_byte)
}

fn connections_per_second(plan: &Plan, peers: &[Peer], upstream: SocketAddr, report: &mut Report) {
    println!(
        "\n== connections per second ({} clients in a loop) ==",
        plan.cps_workers
    );
    each_peer(peers, report, "connections/s", |peer, report| {
        let fwd = Forwarder::start(peer, &Target::Addr(upstream))?;
        one_connection(fwd.addr).context("first connection")?;
        let attempts = AtomicU64::new(0);
        let start = Instant::now();
        let stop_at = start + plan.cps_time;
        let results: Vec<(Vec<Duration>, u64, Option<String>)> = thread::scope(|scope| {
            let workers: Vec<_> = (0..plan.cps_workers)
                .map(|_| {
                    scope.spawn(|| {
                        let (mut times, mut errors, mut first_error) = (Vec::new(), 0, None);
                        while Instant::now() < stop_at && attempts.fetch_add(1, Ordering::Relaxed) < plan.cps_max {
                            match one_connection(fwd.addr) {
                                Ok(t) => times.push(t),
                                Err(e) => {
                                    errors += 1;
                                    first_error.get_or_insert(format!("{e:#}"));
                                }
                            }
                        }
                        (times, errors, first_error)
                    })
                })
                .collect();
            workers.into_iter().filter_map(|w| w.join().ok()).collect()
        });
        let elapsed = start.elapsed();
        let times: Vec<f64> = results
            .iter()
            .flat_map(|r| &r.0)
            .map(|t| t.as_secs_f64() * 1e3)
            .collect();
        let errors: u64 = results.iter().map(|r| r.1).sum();
        let per_sec = times.len() as f64 / elapsed.as_secs_f64();
        println!(
            "{:<13} {} connections in {:.2} s: {per_sec:.0}/s, {errors} errors",
            peer.name(),
            times.len(),
            elapsed.as_secs_f64()
        );
        if let Some(e) = results.iter().find_map(|r| r.2.clone()) {
            bail!(
                "{errors} of {} connections failed, first: {e}",
                times.len() as u64 + errors
            );
        }
        report.add(M_CPS, peer, per_sec, "/s", true);
        report.add(M_TTFB, peer, median(&times), "ms", false);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// RSS with idle connections; the upstream that holds them is a child process

/// The child: accept and hold every connection; answer the count on each line read from stdin;
/// exit at stdin's EOF (so it never outlives the bench).
fn idle_child() {
    let listener = match listen(SocketAddr::from(([127, 0, 0, 1], 0))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("idle upstream: {e:#}");
            std::process::exit(1);
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("{port}");
    let _ = io::stdout().flush();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    held.push(stream);
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        println!("{}", count.load(Ordering::SeqCst));
        let _ = io::stdout().flush();
    }
}

struct IdleUpstream {
    addr: SocketAddr,
    to_child: ChildStdin,
    from_child: BufReader<ChildStdout>,
    _proc: Proc,
}

impl IdleUpstream {
    fn start() -> Result<IdleUpstream> {
        let mut cmd = Command::new(env::current_exe()?);
        cmd.arg(IDLE_CHILD_ARG).stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut proc = Proc::spawn("idle upstream", &mut cmd, None)?;
        let to_child = proc.child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let mut from_child = BufReader::new(proc.child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
        let mut line = String::new();
        from_child.read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .parse()
            .with_context(|| format!("idle upstream said {line:?}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(IdleUpstream {
            addr,
            to_child,
            from_child,
            _proc: proc,
        })
    }

    fn count(&mut self) -> Result<usize> {
        self.to_child.write_all(b"?\n")?;
        let mut line = String::new();
        self.from_child.read_line(&mut line)?;
        line.trim()
            .parse()
            .with_context(|| format!("idle upstream said {line:?}"))
    }

    fn wait_for(&mut self, n: usize, deadline: Instant) -> Result<()> {
        loop {
            let count = self.count()?;
            if count >= n {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "only {count} of {n} connections reached the upstream"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn idle(plan: &Plan, peers: &[Peer], report: &mut Report) {
    let [small, large] = plan.idle_steps;
    println!(
        "\n== RSS with {} and {} idle connections ==",
        thousands(small),
        thousands(large)
    );
    if peers.contains(&Peer::Socat) {
        report.note(format!(
            "socat: RSS with idle connections not measured: it forks one process per connection \
             ({} processes), so there is no single process to read",
            thousands(large)
        ));
    }
    let measured: Vec<Peer> = peers
        .iter()
        .copied()
        .filter(|p| matches!(p, Peer::Jumpgate | Peer::Haproxy))
        .collect();
    each_peer(&measured, report, "idle connections", |peer, report| {
        let mut upstream = IdleUpstream::start()?;
        let mut fwd = Forwarder::start(peer, &Target::Addr(upstream.addr))?;
        thread::sleep(plan.settle);
        let rss0 = fwd.rss_kb()?;
        report.add(M_RSS0, peer, rss0 as f64 / 1024.0, "MiB", false);
        let base = upstream.count()?;
        let mut clients: Vec<TcpStream> = Vec::with_capacity(large);
        let mut rss_last = rss0;
        for n in plan.idle_steps {
            let deadline = Instant::now() + Duration::from_secs(90);
            while clients.len() < n {
                ensure!(Instant::now() < deadline, "opening {n} connections took too long");
                let client = TcpStream::connect_timeout(&fwd.addr, Duration::from_secs(5))
                    .with_context(|| format!("connection {} to {}", clients.len() + 1, peer.name()))?;
                clients.push(client);
                // Let the forwarder keep up instead of overflowing its accept queue.
                if clients.len().is_multiple_of(500) {
                    upstream.wait_for(base + clients.len() - 500, deadline)?;
                }
            }
            upstream.wait_for(base + n, deadline)?;
            thread::sleep(plan.settle);
            fwd.alive()?;
            for (i, client) in clients.iter().enumerate() {
                client.set_nonblocking(true)?;
                match client.peek(&mut [0u8; 1]) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => bail!("idle connection {i} was closed or got data: {other:?}"),
                }
            }
            rss_last = fwd.rss_kb()?;
            println!("{:<13} {n} idle: RSS {:.1} MiB", peer.name(), rss_last as f64 / 1024.0);
            report.add(&m_rss(n), peer, rss_last as f64 / 1024.0, "MiB", false);
        }
        report.add(
            M_KB,
            peer,
            rss_last.saturating_sub(rss0) as f64 / large as f64,
            "KiB",
            false,
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// DNS change: an authoritative server for jumpgate.test and upstreams on 127.0.0.2 / 127.0.0.3

struct Dns {
    // Dropped before the runtime: the server's tasks end with it.
    _server: Server<Catalog>,
    zone: Arc<InMemoryZoneHandler>,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
}

fn a_record(ip: Ipv4Addr) -> Result<Record> {
    let name = Name::from_ascii(format!("{DNS_NAME}."))?;
    Ok(Record::from_rdata(name, DNS_TTL_S, RData::A(A(ip))))
}

impl Dns {
    fn start(first: Ipv4Addr) -> Result<Dns> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (server, zone, addr) = rt.block_on(async {
            let origin = Name::from_ascii(DNS_ZONE)?;
            let mut zone: InMemoryZoneHandler =
                InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
            let soa = SOA::new(
                Name::from_ascii(format!("ns.{DNS_ZONE}"))?,
                Name::from_ascii(format!("admin.{DNS_ZONE}"))?,
                1,
                3600,
                600,
                86400,
                DNS_TTL_S,
            );
            ensure!(zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1));
            ensure!(zone.upsert_mut(a_record(first)?, 1));
            let zone = Arc::new(zone);
            let mut catalog = Catalog::new();
            catalog.upsert(LowerName::new(&origin), vec![zone.clone() as Arc<dyn ZoneHandler>]);
            // UDP and TCP on the same port (TCP for truncated answers); retry if TCP's is taken.
            for _ in 0..20 {
                let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                let addr = udp.local_addr()?;
                let Ok(tcp) = tokio::net::TcpListener::bind(addr).await else {
                    continue;
                };
                let mut server = Server::new(catalog);
                server.register_socket(udp);
                server.register_listener(tcp, Duration::from_secs(5), 4096);
                return Ok((server, zone, addr));
            }
            bail!("no port free for both UDP and TCP")
        })?;
        Ok(Dns {
            _server: server,
            zone,
            addr,
            rt,
        })
    }

    fn set(&self, ip: Ipv4Addr) -> Result<()> {
        let record = a_record(ip)?;
        let key = RrKey::new(LowerName::new(&record.name), RecordType::A);
        self.rt.block_on(async {
            self.zone
                .records_mut()
                .await
                .insert(key, Arc::new(RecordSet::from(record)));
        });
        Ok(())
    }
}

/// Upstreams on 127.0.0.2:P and 127.0.0.3:P that write their address and close.
fn start_announcers() -> Result<u16> {
    for _ in 0..20 {
        let a = listen(SocketAddr::from(([127, 0, 0, 2], 0)))?;
        let port = a.local_addr()?.port();
        let Ok(b) = listen(SocketAddr::from(([127, 0, 0, 3], port))) else {
            continue;
        };
        for (listener, ip) in [(a, "127.0.0.2"), (b, "127.0.0.3")] {
            thread::Builder::new().name(format!("announce-{ip}")).spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(mut stream) => drop(stream.write_all(format!("{ip}\n").as_bytes())),
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?;
        }
        return Ok(port);
    }
    bail!("no port free on both 127.0.0.2 and 127.0.0.3")
}

/// Which upstream a new connection through `addr` reaches, if any.
fn reached(addr: SocketAddr) -> Option<Ipv4Addr> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn dns_change(plan: &Plan, peers: &[Peer], report: &mut Report) -> Result<()> {
    let (first, second) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let dns = Dns::start(first)?;
    let port = start_announcers()?;
    println!(
        "\n== DNS change ({DNS_NAME} A, TTL {DNS_TTL_S} s, server {}) ==",
        dns.addr
    );
    if peers.contains(&Peer::Socat) {
        report.note(
            "socat: DNS change not measured: it resolves through the system resolver (not the \
             bench's DNS server) at each connection"
                .into(),
        );
    }
    let target = Target::Dns { port, server: dns.addr };
    let mut fwds = Vec::new();
    let measured = peers
        .iter()
        .copied()
        .filter(|p| matches!(p, Peer::Jumpgate | Peer::Haproxy));
    for peer in measured.collect::<Vec<_>>() {
        let started = Forwarder::start(peer, &target).and_then(|fwd| {
            let deadline = Instant::now() + plan.dns_bound;
            while reached(fwd.addr) != Some(first) {
                ensure!(
                    Instant::now() < deadline,
                    "no connection reached {first} within {:?}",
                    plan.dns_bound
                );
                thread::sleep(DNS_POLL);
            }
            Ok(fwd)
        });
        match started {
            Ok(fwd) => fwds.push((fwd, Vec::new())),
            Err(e) => report.fail(peer, "DNS change", &e),
        }
    }
    // Changes at fixed times, one every 3 TTL + TTL / trials: each lands TTL / trials later in
    // the forwarders' re-resolution cycles than the one before, so together they cover the cycle
    // evenly, its worst point included, whatever phase each forwarder's timer has.
    let ttl = Duration::from_secs(u64::from(DNS_TTL_S));
    let interval = ttl * 3 + ttl / plan.dns_trials as u32;
    let bound = plan.dns_bound.min(interval - Duration::from_millis(200));
    let schedule = Instant::now();
    let mut current = first;
    for trial in 1..=plan.dns_trials {
        let at = schedule + interval * (trial - 1) as u32;
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let next = if current == first { second } else { first };
        dns.set(next)?;
        let changed = Instant::now();
        let mut pending: Vec<usize> = (0..fwds.len()).collect();
        while !pending.is_empty() && changed.elapsed() < bound {
            let tick = Instant::now();
            pending.retain(|&i| {
                let seen = reached(fwds[i].0.addr) == Some(next);
                if seen {
                    fwds[i].1.push(Some(changed.elapsed()));
                }
                !seen
            });
            thread::sleep(DNS_POLL.saturating_sub(tick.elapsed()));
        }
        for &i in &pending {
            fwds[i].1.push(None);
        }
        let line: Vec<String> = fwds
            .iter()
            .map(|(f, t)| match t.last() {
                Some(Some(t)) => format!("{} {:.0} ms", f.peer.name(), t.as_secs_f64() * 1e3),
                _ => format!("{} not within {bound:?}", f.peer.name()),
            })
            .collect();
        println!("trial {trial}: {current} -> {next}: {}", line.join(", "));
        current = next;
    }
    for (fwd, times) in &fwds {
        let missed = times.iter().filter(|t| t.is_none()).count();
        if missed > 0 {
            let e = anyhow!("{missed} of {} changes not seen within {bound:?}", times.len());
            report.fail(fwd.peer, "DNS change", &e);
            continue;
        }
        let ms: Vec<f64> = times.iter().flatten().map(|t| t.as_secs_f64() * 1e3).collect();
        let max = ms.iter().copied().fold(0.0, f64::max);
        report.add(M_DNS_MED, fwd.peer, median(&ms), "ms", false);
        report.add(M_DNS_MAX, fwd.peer, max, "ms", false);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report: table, targets, Markdown, SVG

type Report = common::Report<Peer>;
type Row = common::Row<Peer>;

impl Report {
    fn targets(&self, plan: &Plan) -> Vec<(String, Option<(f64, bool)>)> {
        let ratio = |metric: &str, peer| Some(self.value(metric, Peer::Jumpgate)? / self.value(metric, peer)?);
        let [small, large] = plan.idle_steps;
        let mut targets = vec![
            ("single-stream throughput: jumpgate ≥ 1.0× HAProxy".to_string(), {
                ratio(M_SINGLE, Peer::Haproxy).map(|r| (r, r >= 1.0))
            }),
            ("single-stream throughput: jumpgate ≥ 1.4× socat".to_string(), {
                ratio(M_SINGLE, Peer::Socat).map(|r| (r, r >= 1.4))
            }),
        ];
        for n in [small, large] {
            let name = format!("RSS with {} idle connections: jumpgate ≤ 1.0× HAProxy", thousands(n));
            targets.push((name, ratio(&m_rss(n), Peer::Haproxy).map(|r| (r, r <= 1.0))));
        }
        let dns = self
            .value(M_DNS_MAX, Peer::Jumpgate)
            .map(|ms| (ms, ms <= DNS_TARGET_MS));
        targets.push((
            format!("DNS change: jumpgate max ≤ TTL + 0.5 s = {DNS_TARGET_MS:.0} ms"),
            dns,
        ));
        targets
    }

    fn render(&self, plan: &Plan) -> String {
        let mut md = String::new();
        common::write_header(&mut md, "forward", "forward", plan.full, &machine());
        let _ = writeln!(
            md,
            "- sizes: single stream {} MiB × {} reps (median), {} streams × {} MiB, \
             connections/s for {:?} with {} clients, idle {} / {}, {} DNS changes",
            plan.single_bytes >> 20,
            plan.reps,
            plan.streams,
            plan.stream_bytes >> 20,
            plan.cps_time,
            plan.cps_workers,
            thousands(plan.idle_steps[0]),
            thousands(plan.idle_steps[1]),
            plan.dns_trials
        );
        let _ = writeln!(
            md,
            "- method: client and sink are std threads in the bench process; the client writes 1 MiB \
             chunks, the sink drops bytes in the kernel (recv MSG_TRUNC) and answers the count after \
             the client's half-close; connections/s clients connect, read the upstream's one byte, \
             then its EOF; RSS is VmRSS of the forwarder process, the idle upstream a child process"
        );
        let _ = writeln!(
            md,
            "- peers: socat `TCP-LISTEN:P,bind=127.0.0.1,reuseaddr,fork,backlog=4096 TCP:127.0.0.1:S`; \
             HAProxy `-db`, `mode tcp`, `option splice-auto`, maxconn {HAPROXY_MAXCONN}, ulimit-n 20000, \
             maxpipes 64, default threads; jumpgate `run --config` with `[log] level = \"warn\"`"
        );
        let _ = writeln!(
            md,
            "- \"× raw\": value ÷ raw loopback's; \"jumpgate ÷ peer\": jumpgate's value ÷ this \
             peer's (above 1 is better for jumpgate where higher is better, below 1 where lower is)\n"
        );
        let _ = writeln!(md, "| metric | peer | value | × raw | jumpgate ÷ peer |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        for metric in self.metrics() {
            for row in self.rows.iter().filter(|r| r.metric == metric) {
                let raw = match self.value(metric, Peer::Raw) {
                    Some(raw) if row.peer != Peer::Raw => format!("{:.2}", row.value / raw),
                    _ => "—".into(),
                };
                let versus = match self.value(metric, Peer::Jumpgate) {
                    Some(jg) if row.peer != Peer::Jumpgate => format!("{:.2}", jg / row.value),
                    _ => "—".into(),
                };
                let better = if row.higher_is_better { "↑" } else { "↓" };
                let _ = writeln!(
                    md,
                    "| {metric} {better} | {} | {} {} | {raw} | {versus} |",
                    row.peer.name(),
                    number(row.value),
                    row.unit
                );
            }
        }
        common::write_targets(&mut md, 6, common::numbered(self.targets(plan)));
        self.write_notes(&mut md);
        md
    }

    /// One group of horizontal bars per metric, each scaled to that metric's largest value.
    fn svg(&self) -> String {
        let (label_w, bar_w, line_h) = (110.0, 520.0, 18.0);
        let mut body = String::new();
        let mut y = 30.0;
        for metric in self.metrics() {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.metric == metric).collect();
            let max = rows.iter().map(|r| r.value).fold(0.0, f64::max);
            let better = if rows[0].higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            };
            let _ = writeln!(
                body,
                r#"<text x="10" y="{y}" font-weight="bold">{} ({better})</text>"#,
                xml(metric)
            );
            y += 6.0;
            for row in rows {
                let w = if max > 0.0 { row.value / max * bar_w } else { 0.0 };
                let _ = writeln!(
                    body,
                    r#"<text x="10" y="{ty}">{name}</text><rect x="{label_w}" y="{y}" width="{w:.1}" height="14" fill="{color}"/><text x="{tx:.1}" y="{ty}">{value} {unit}</text>"#,
                    ty = y + 12.0,
                    name = row.peer.name(),
                    color = row.peer.color(),
                    tx = label_w + w + 6.0,
                    value = number(row.value),
                    unit = row.unit,
                );
                y += line_h;
            }
            y += 22.0;
        }
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{h}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n",
            h = y + 10.0
        )
    }
}

fn machine() -> String {
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find(|l| l.contains("version"))
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| format!("{cmd}: not installed"))
    };
    format!("{}; {}; {}", host(), version("haproxy", "-v"), version("socat", "-V"))
}
