//! Pieces the three benches share: the sink and its client, the source and its client, the report
//! table's rows, notes and target list, Markdown helpers, machine facts, /proc readers, loopback
//! ports, and the OpenSSH client key and options. Each bench is its own crate and uses only some
//! of this.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    env,
    fmt::Write as _,
    fs,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

pub const CHUNK: usize = 1 << 20;
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process the bench starts may take to be ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A bench's `main`: the full plan with `--bench`, else the smoke plan; exits 1 when `run` fails.
pub fn bench_main<P>(name: &str, full: &P, smoke: &P, run: impl FnOnce(&P) -> Result<()>) {
    let plan = if env::args().any(|a| a == "--bench") {
        full
    } else {
        smoke
    };
    if let Err(e) = run(plan) {
        eprintln!("bench {name}: FAILED: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Report rows, notes and problems

/// What the report needs to know about a bench's peers.
pub trait BenchPeer: Copy + PartialEq {
    const JUMPGATE: Self;
    fn label(self) -> &'static str;
}

pub struct Row<P> {
    pub metric: String,
    pub peer: P,
    pub value: f64,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

pub struct Report<P> {
    pub rows: Vec<Row<P>>,
    pub notes: Vec<String>,
    pub problems: Vec<String>,
}

impl<P> Default for Report<P> {
    fn default() -> Self {
        Report {
            rows: Vec::new(),
            notes: Vec::new(),
            problems: Vec::new(),
        }
    }
}

impl<P: BenchPeer> Report<P> {
    pub fn add(&mut self, metric: &str, peer: P, value: f64, unit: &'static str, higher: bool) {
        self.rows.push(Row {
            metric: metric.to_string(),
            peer,
            value,
            unit,
            higher_is_better: higher,
        });
    }

    pub fn note(&mut self, note: String) {
        println!("note: {note}");
        self.notes.push(note);
    }

    pub fn fail(&mut self, peer: P, what: &str, e: &anyhow::Error) {
        let line = format!("{}: {what}: {e:#}", peer.label());
        if peer == P::JUMPGATE {
            eprintln!("PROBLEM: {line}");
            self.problems.push(line);
        } else {
            self.note(format!("{line} (left out of the table)"));
        }
    }

    pub fn value(&self, metric: &str, peer: P) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.metric == metric && r.peer == peer)
            .map(|r| r.value)
    }

    pub fn metrics(&self) -> Vec<&str> {
        let mut metrics: Vec<&str> = Vec::new();
        for row in &self.rows {
            if !metrics.contains(&row.metric.as_str()) {
                metrics.push(&row.metric);
            }
        }
        metrics
    }

    /// The "Notes" and "PROBLEMS (jumpgate)" sections, each only when it has lines.
    pub fn write_notes(&self, md: &mut String) {
        if !self.notes.is_empty() {
            let _ = writeln!(md, "\n## Notes\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        if !self.problems.is_empty() {
            let _ = writeln!(md, "\n## PROBLEMS (jumpgate)\n");
            for problem in &self.problems {
                let _ = writeln!(md, "- {problem}");
            }
        }
    }
}

/// The report's title and its date and machine lines.
pub fn write_header(md: &mut String, title: &str, bench: &str, full: bool, machine: &str) {
    let kind = if full {
        format!("full run (`cargo bench --bench {bench}`)")
    } else {
        "SMOKE run (debug build, small sizes: the numbers mean nothing)".to_string()
    };
    let _ = writeln!(md, "# jumpgate {title} bench: {kind}\n");
    let _ = writeln!(md, "- date: {}", date());
    let _ = writeln!(md, "- machine: {machine}");
}

/// The "Targets (issue N)" section: (target, Some((measured, met))).
pub fn write_targets(md: &mut String, issue: u32, targets: Vec<(String, Option<(String, bool)>)>) {
    let _ = writeln!(md, "\n## Targets (issue {issue})\n");
    for (name, result) in targets {
        let verdict = match result {
            Some((v, true)) => format!("**met** ({v})"),
            Some((v, false)) => format!("**NOT met** ({v})"),
            None => "not measured".into(),
        };
        let _ = writeln!(md, "- {name}: {verdict}");
    }
}

/// Targets measured as plain numbers, shown with [`number`].
pub fn numbered(targets: Vec<(String, Option<(f64, bool)>)>) -> Vec<(String, Option<(String, bool)>)> {
    targets
        .into_iter()
        .map(|(name, r)| (name, r.map(|(v, met)| (number(v), met))))
        .collect()
}

/// Writes `markdown` to target/`name`, saying where.
pub fn write_out(name: &str, markdown: &str) -> Result<PathBuf> {
    let out = target_dir();
    fs::create_dir_all(&out)?;
    fs::write(out.join(name), markdown)?;
    println!("wrote {}", out.join(name).display());
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Formatting and machine facts

pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn xml(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// "N cores, CPU model, Linux KERNEL": the start of every bench's machine line.
pub fn host() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {}", kernel.trim())
}

/// The machine line of the benches that run OpenSSH: [`host`] and `ssh -V`.
pub fn openssh_machine() -> String {
    // `ssh -V` prints its version on stderr.
    let openssh = Command::new("ssh")
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_else(|| "ssh: not installed".into());
    format!("{}; {openssh} (client and sshd)", host())
}

/// `target/` of this build: a bench runs as target/<profile>/deps/<bench>-<hash>.
pub fn target_dir() -> PathBuf {
    env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|dir| dir.join("CACHEDIR.TAG").exists() || dir.ends_with("target"))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process in a process group of its own, killed with that group on drop (socat's forked
/// children too); made by [`Proc::spawn_tree`], with every descendant too (sshd's per-connection
/// processes call setsid(), so they leave the group).
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    log: Option<PathBuf>,
    /// Kill every descendant on drop, not only the process group.
    tree: bool,
}

impl Proc {
    /// Starts `cmd` in a new process group; with `log`, stdout and stderr go to that file and
    /// stdin comes from /dev/null.
    pub fn spawn(name: &'static str, cmd: &mut Command, log: Option<PathBuf>) -> Result<Proc> {
        if let Some(log) = &log {
            let out = fs::File::create(log)?;
            cmd.stdout(out.try_clone()?).stderr(out).stdin(Stdio::null());
        }
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Proc {
            name,
            child,
            log,
            tree: false,
        })
    }

    /// [`Proc::spawn`], killed on drop with every descendant as well as its process group.
    pub fn spawn_tree(name: &'static str, cmd: &mut Command, log: Option<PathBuf>) -> Result<Proc> {
        let mut proc = Proc::spawn(name, cmd, log)?;
        proc.tree = true;
        Ok(proc)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails with the process's output if it has exited.
    pub fn alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                let out = self.log.as_deref().map(|log| tail(log, 20)).unwrap_or_default();
                bail!("{} exited ({status}); its output ends:\n{out}", self.name)
            }
        }
    }

    pub fn rss_kb(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        kb_field(&status, "VmRSS:").ok_or_else(|| anyhow!("no VmRSS in /proc/{}/status", self.pid()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.tree {
            for pid in descendants(self.pid()) {
                // SAFETY: kill(2) takes plain integers. A descendant found a moment ago may have
                // exited, but its id is not reused while its parent (in this tree) has not reaped it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // SAFETY: kill(2) takes plain integers; the group is the one `process_group(0)` made for
        // this child, which is not reaped before this point, so its id cannot have been reused.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// The number of a `Field:   N kB` line of a /proc file's `text` (`field` with its colon).
pub fn kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// [`kb_field`] of the file at `path`; None if it cannot be read.
pub fn proc_kb(path: &str, field: &str) -> Option<u64> {
    kb_field(&fs::read_to_string(path).ok()?, field)
}

/// Polls jumpgate's `--ready-file` every 10 ms until it holds an address at `key` (a path of
/// JSON object keys) and returns it; fails as soon as `alive` does (the process exited), or after
/// `deadline`, naming the key as `"admin"` (one key) or `forward.bench` (a path).
pub fn wait_ready(
    ready: &Path,
    key: &[&str],
    deadline: Instant,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<SocketAddr> {
    loop {
        alive()?;
        let bound = fs::read_to_string(ready).ok().and_then(|text| {
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            key.iter()
                .fold(&json, |v, k| &v[*k])
                .as_str()?
                .parse::<SocketAddr>()
                .ok()
        });
        if let Some(addr) = bound {
            return Ok(addr);
        }
        let what = match key {
            [one] => format!("\"{one}\""),
            path => path.join("."),
        };
        ensure!(
            Instant::now() < deadline,
            "jumpgate wrote no ready file with {what} within {START_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Every process below `pid` (not `pid` itself), from the parent ids in /proc/*/stat.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may contain anything.
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|s| s.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// User + system CPU time of a process tree so far, in seconds (/proc/PID/stat, clock ticks;
/// a process's own line includes its exited threads).
pub fn cpu_seconds(pid: i32) -> f64 {
    // SAFETY: sysconf(3) only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    for p in std::iter::once(pid).chain(descendants(pid)) {
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
        let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
        let fields: Vec<&str> = after.split_whitespace().collect();
        for i in [11, 12] {
            total += fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total as f64 / ticks
}

// ---------------------------------------------------------------------------------------------
// Loopback ports

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether something listens on 127.0.0.1:`port`, read from /proc/net/tcp so that no probe
/// connection is made.
pub fn is_listening(port: u16) -> io::Result<bool> {
    let listener = format!(": 0100007F:{port:04X} 00000000:0000 0A ");
    Ok(fs::read_to_string("/proc/net/tcp")?.contains(&listener))
}

// ---------------------------------------------------------------------------------------------
// OpenSSH: the client key and options

/// The bench's temporary directory and the one ed25519 client key every server accepts.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub authorized_keys: PathBuf,
    /// Who sshd logs in: the user running the bench (root when the bench runs as root).
    pub user: String,
}

impl Lab {
    /// A temporary directory named `prefix`..., with the client key (comment `comment`) and an
    /// authorized_keys holding it.
    pub fn new(prefix: &str, comment: &str) -> Result<Lab> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let key = dir.path().join("id_ed25519");
        keygen(&key, comment)?;
        let authorized_keys = dir.path().join("authorized_keys");
        fs::copy(pub_path(&key), &authorized_keys)?;
        let out = Command::new("id").arg("-un").output().context("id -un")?;
        let user = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(!user.is_empty(), "`id -un` printed no user name");
        Ok(Lab {
            dir,
            key,
            authorized_keys,
            user,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A new directory for one process.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.path().join(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

pub fn pub_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// `ssh-keygen -q -t ed25519 -N '' -C COMMENT -f PATH`.
pub fn keygen(path: &Path, comment: &str) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (package openssh-client)")?;
    ensure!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Adds `-o OPTION` for each option every OpenSSH client of the benches runs with: host keys
/// checked against `known_hosts` only, the given identity only, no agent, no prompt, no
/// multiplexing, a 10 s connect timeout.
pub fn ssh_options<'a>(cmd: &'a mut Command, known_hosts: &Path) -> &'a mut Command {
    for opt in [
        "StrictHostKeyChecking=yes".to_string(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "GlobalKnownHostsFile=/dev/null".into(),
        "IdentitiesOnly=yes".into(),
        "BatchMode=yes".into(),
        "IdentityAgent=none".into(),
        "ControlPath=none".into(),
        "ConnectTimeout=10".into(),
    ] {
        cmd.arg("-o").arg(opt);
    }
    cmd
}

// ---------------------------------------------------------------------------------------------
// Throughput: a sink that counts (or checks) bytes and answers with the count after EOF

/// Serves the sink on `listener`, a thread per connection; returns its address.
pub fn serve_sink(listener: TcpListener) -> Result<SocketAddr> {
    serve(listener, "sink", sink_conn)
}

/// Accepts on `listener` in a thread named `name`, and runs `conn` on each connection in a thread
/// of its own, printing its error if any; returns the listener's address.
fn serve(listener: TcpListener, name: &'static str, conn: fn(TcpStream) -> io::Result<()>) -> Result<SocketAddr> {
    let addr = listener.local_addr()?;
    thread::Builder::new().name(name.into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    let spawned = thread::Builder::new().name(format!("{name}-conn")).spawn(move || {
                        if let Err(e) = conn(stream) {
                            eprintln!("{name}: {e}");
                        }
                    });
                    if let Err(e) = spawned {
                        eprintln!("{name}: {e}");
                    }
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })?;
    Ok(addr)
}

/// First byte `T`: count bytes, discarding them in the kernel; `V`: check them against the
/// pattern. After the client's EOF, answer the count (8 bytes LE) and 1 if the bytes were intact.
pub fn sink_conn(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode)?;
    let verify = match mode[0] {
        b'T' => false,
        b'V' => true,
        other => return Err(io::Error::other(format!("unknown sink mode {other}"))),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut expect = if verify { vec![0u8; CHUNK] } else { Vec::new() };
    let (mut total, mut intact) = (0u64, true);
    loop {
        let n = if verify {
            stream.read(&mut buf)?
        } else {
            recv_discard(&stream, &mut buf)?
        };
        if n == 0 {
            break;
        }
        if verify && intact {
            fill_pattern(&mut expect[..n], total);
            intact = buf[..n] == expect[..n];
        }
        total += n as u64;
    }
    let mut reply = [0u8; 9];
    reply[..8].copy_from_slice(&total.to_le_bytes());
    reply[8] = u8::from(intact);
    stream.write_all(&reply)
}

/// recv(2) with MSG_TRUNC: on TCP the kernel drops the bytes instead of copying them out, so the
/// sink costs almost nothing per byte and the bench subject gets the CPU.
pub fn recv_discard(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
        let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The byte stream of a checked transfer: splitmix64 of the word index, little-endian.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    let (mut pos, mut i) = (offset, 0);
    while i < buf.len() {
        let mut z = (pos / 8).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let word = (z ^ (z >> 31)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// A loopback connection with the bench's I/O timeouts.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends `bytes` to the sink through `addr`, half-closes, and waits for the sink's count: the
/// time covers the bytes arriving, not just leaving.
pub fn push(addr: SocketAddr, bytes: u64, verify: bool) -> Result<Duration> {
    let mut stream = connect(addr)?;
    let start = Instant::now();
    stream.write_all(if verify { b"V" } else { b"T" })?;
    let mut buf = vec![0x5au8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = CHUNK.min((bytes - sent) as usize);
        if verify {
            fill_pattern(&mut buf[..n], sent);
        }
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("writing at byte {sent}"))?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 9];
    stream
        .read_exact(&mut reply)
        .context("no count from the sink after half-close")?;
    let elapsed = start.elapsed();
    let got = u64::from_le_bytes(reply[..8].try_into()?);
    ensure!(got == bytes, "the sink received {got} of {bytes} bytes");
    ensure!(reply[8] == 1, "bytes arrived altered (pattern mismatch)");
    let n = stream
        .read(&mut [0u8; 1])
        .context("waiting for the close after the count")?;
    ensure!(n == 0, "data after the sink's count");
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------------
// Throughput the other way: a source that sends as many bytes as it is asked for, then closes

/// A transfer of the source that takes longer than this failed (a floor of 4 MiB/s on average,
/// after [`IO_TIMEOUT`] of slack): the source and [`pull`] stop there.
pub fn transfer_bound(bytes: u64) -> Duration {
    IO_TIMEOUT + Duration::from_secs(bytes >> 22)
}

/// Serves the source on `listener`, a thread per connection; returns its address.
pub fn serve_source(listener: TcpListener) -> Result<SocketAddr> {
    serve(listener, "source", source_conn)
}

/// The request: the mode byte (`T`: any bytes, here zeros; `V`: the bytes of [`fill_pattern`]) and
/// the length (8 bytes LE). Writes exactly that many bytes in [`CHUNK`] writes, half-closes, and
/// waits (at most [`IO_TIMEOUT`]) for the peer to close after it has read them all.
pub fn source_conn(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = [0u8; 9];
    stream.read_exact(&mut request)?;
    let verify = match request[0] {
        b'T' => false,
        b'V' => true,
        other => return Err(io::Error::other(format!("unknown source mode {other}"))),
    };
    let mut length = [0u8; 8];
    length.copy_from_slice(&request[1..]);
    let bytes = u64::from_le_bytes(length);
    let deadline = Instant::now() + transfer_bound(bytes);
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "sent only {sent} of {bytes} bytes in {:?}",
                transfer_bound(bytes)
            )));
        }
        let n = CHUNK.min((bytes - sent) as usize);
        if verify {
            fill_pattern(&mut buf[..n], sent);
        }
        stream.write_all(&buf[..n])?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    // The peer closes once it has read to the EOF; closing first could cut what is still on its way.
    match stream.read(&mut [0u8; 1])? {
        0 => {
            SOURCE_CLOSES.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        _ => Err(io::Error::other("data from the peer after its request")),
    }
}

/// Connections whose peer's close reached the source after all their bytes.
static SOURCE_CLOSES: AtomicUsize = AtomicUsize::new(0);
/// How long the reader's close may take to reach the source.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// Asks the source behind `addr` for `bytes` (`verify`: the pattern, checked here; else any bytes,
/// discarded in the kernel) and reads to the EOF. The time runs from the request to the EOF, so it
/// covers every byte arriving and the half-close behind them; fails unless exactly `bytes` came.
pub fn pull(addr: SocketAddr, bytes: u64, verify: bool) -> Result<Duration> {
    let closes = SOURCE_CLOSES.load(Ordering::SeqCst);
    let mut stream = connect(addr)?;
    let start = Instant::now();
    let deadline = start + transfer_bound(bytes);
    let mut request = [0u8; 9];
    request[0] = if verify { b'V' } else { b'T' };
    request[1..].copy_from_slice(&bytes.to_le_bytes());
    stream
        .write_all(&request)
        .context("sending the request to the source")?;
    let mut buf = vec![0u8; CHUNK];
    let mut expect = if verify { vec![0u8; CHUNK] } else { Vec::new() };
    let mut got = 0u64;
    loop {
        let n = if verify {
            stream.read(&mut buf)
        } else {
            recv_discard(&stream, &mut buf)
        }
        .with_context(|| format!("reading at byte {got} of {bytes}"))?;
        if n == 0 {
            break;
        }
        if verify {
            fill_pattern(&mut expect[..n], got);
            if buf[..n] != expect[..n] {
                let at = buf[..n].iter().zip(&expect[..n]).position(|(a, b)| a != b).unwrap_or(0);
                bail!("bytes arrived altered (pattern mismatch at byte {})", got + at as u64);
            }
        }
        got += n as u64;
        ensure!(got <= bytes, "more than the {bytes} bytes asked for arrived");
        ensure!(
            Instant::now() < deadline,
            "only {got} of {bytes} bytes arrived in {:?}",
            transfer_bound(bytes)
        );
    }
    let elapsed = start.elapsed();
    ensure!(got == bytes, "the EOF came after {got} of {bytes} bytes");
    // Our close must travel back to the source too (pulls run one at a time).
    drop(stream);
    let deadline = Instant::now() + CLOSE_BOUND;
    while SOURCE_CLOSES.load(Ordering::SeqCst) == closes {
        ensure!(
            Instant::now() < deadline,
            "the reader's close did not reach the source within {CLOSE_BOUND:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
    Ok(elapsed)
}

pub fn gbit(bytes: u64, time: Duration) -> f64 {
    bytes as f64 * 8.0 / time.as_secs_f64() / 1e9
}

pub fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..1) of `values`, nearest rank.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n => values[((n as f64 * q) as usize).min(n - 1)],
    }
}
