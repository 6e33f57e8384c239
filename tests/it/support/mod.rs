//! Helpers shared by the integration tests: bounded waiting, free ports and
//! the deterministic byte streams used to check relays byte for byte.
//!
//! Everything here talks only to loopback addresses, and every loop is
//! bounded in time.

pub mod api;
pub mod daemon;
pub mod dns;
pub mod pg;
pub mod ssh;
pub mod sshd;
pub mod upstream;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often the waiting helpers look again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` every 20 ms until it holds or `timeout` has passed; returns
/// whether it held. Never waits longer than `timeout` plus one poll.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || cond().then_some(())).is_some()
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` has passed.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let max_polls = timeout.as_millis() / POLL.as_millis() + 2;
    for _ in 0..max_polls {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
    None
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then released).
/// Nothing listens on it, so a connect to it is refused.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Length of the repeating block of [`pattern_fill`]: a prime, so that a
/// relay that drops, repeats or reorders a buffer-sized piece of the stream
/// changes its content, not only its length.
const PATTERN_LEN: usize = 65_537;

fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..PATTERN_LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    })
}

/// Fills `buf` with the deterministic test stream starting at byte `offset`
/// (stream `seed` shifts the start, so the two directions differ).
pub fn pattern_fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let pat = pattern();
    let mut pos = ((offset + seed * 7919) % PATTERN_LEN as u64) as usize;
    let mut filled = 0;
    while filled < buf.len() {
        let n = (PATTERN_LEN - pos).min(buf.len() - filled);
        buf[filled..filled + n].copy_from_slice(&pat[pos..pos + n]);
        filled += n;
        pos = 0;
    }
}

/// A hash of a byte stream that does not depend on how the stream was cut
/// into reads or writes (std's SipHash buffers partial words), plus its length.
#[derive(Default)]
pub struct StreamHash {
    hasher: DefaultHasher,
    len: u64,
}

impl StreamHash {
    /// Adds the next bytes of the stream.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.write(bytes);
        self.len += bytes.len() as u64;
    }

    /// (length, hash) of everything added so far.
    pub fn finish(&self) -> (u64, u64) {
        (self.len, self.hasher.finish())
    }
}

/// Writes `len` bytes of pattern stream `seed` to `w`; returns their (length, hash).
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> io::Result<(u64, u64)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut hash = StreamHash::default();
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        pattern_fill(seed, sent, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        sent += n as u64;
    }
    Ok(hash.finish())
}

/// (length, hash) that [`send_pattern`] reports for the same arguments,
/// computed without a socket.
pub fn pattern_hash(seed: u64, len: u64) -> (u64, u64) {
    send_pattern(&mut io::sink(), seed, len).expect("sink never fails")
}

/// Reads `r` to EOF; returns the (length, hash) of what arrived.
pub fn hash_to_eof(r: &mut impl Read) -> io::Result<(u64, u64)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut hash = StreamHash::default();
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(hash.finish()),
            Ok(n) => hash.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads one `\n`-terminated line byte by byte (so nothing after it is
/// consumed), at most 4 KiB; `None` on EOF, error or timeout before the newline.
pub fn read_line(r: &mut impl Read) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        match r.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    None
}

/// The address a socket address string names; panics with the string if it is not one.
pub fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} is not a socket address: {e}"))
}

/// The IP address literal `s`; panics if it is not one.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

/// Whether an echo round trip works on `s`.
pub fn echoes(s: &mut (impl Read + Write)) -> bool {
    let mut back = [0u8; 5];
    s.write_all(b"ping\n").is_ok() && s.flush().is_ok() && s.read_exact(&mut back).is_ok() && &back == b"ping\n"
}

/// Whether the peer closes `s` (EOF or reset) within `timeout`; data that
/// arrives meanwhile is discarded.
pub fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("set timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    false
}
