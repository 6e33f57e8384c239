//! TCP servers that stand in for databases behind a route: bound on
//! 127.0.0.2 and 127.0.0.3 with the same port (so a DNS answer decides which
//! one a connection reaches), each telling who it is, echoing, answering after
//! EOF, or streaming a large known payload. Each counts its open connections
//! and can stop and resume listening on the same address.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{hash_to_eof, pattern_hash, read_line, send_pattern, wait_for, wait_until};

/// The pattern stream seed that upstreams send (clients send seed 1).
pub const DOWN_SEED: u64 = 2;

/// What an upstream does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behavior {
    /// Writes `hello from <ip>\n`, then echoes everything until EOF, then closes.
    Echo,
    /// Reads until EOF, then writes `got <n>\n` and `reply_len` bytes of
    /// pattern stream [`DOWN_SEED`], then closes.
    AnswerAfterEof {
        /// Bytes of pattern after the `got` line.
        reply_len: u64,
    },
    /// Reads to EOF while writing `down_len` bytes of pattern stream
    /// [`DOWN_SEED`] at the same time, then closes.
    Stream {
        /// Bytes to send.
        down_len: u64,
    },
}

/// The `hello from <ip>` line an echo upstream sent on `s`, or `None` if `s`
/// closed (or stayed silent for its read timeout) first.
pub fn hello(s: &mut impl Read) -> Option<IpAddr> {
    read_line(s).map(|line| {
        line.strip_prefix("hello from ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
    })
}

#[derive(Default)]
struct Shared {
    open: AtomicUsize,
    accepted: AtomicUsize,
    stopping: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    received: Mutex<Vec<(u64, u64)>>,
}

/// One upstream server.
pub struct Upstream {
    addr: SocketAddr,
    behavior: Behavior,
    shared: Arc<Shared>,
    acceptor: Option<(JoinHandle<()>, TcpListener)>,
}

impl Upstream {
    /// Listens on `ip:port` (`port` 0: any free port).
    pub fn bind(ip: IpAddr, port: u16, behavior: Behavior) -> io::Result<Self> {
        let listener = TcpListener::bind((ip, port))?;
        let addr = listener.local_addr()?;
        let mut up = Self {
            addr,
            behavior,
            shared: Arc::default(),
            acceptor: None,
        };
        up.serve(listener);
        Ok(up)
    }

    /// Two upstreams, on 127.0.0.2:P and 127.0.0.3:P (same P).
    pub fn pair(behavior: Behavior) -> (Self, Self) {
        for _ in 0..20 {
            let two = Self::bind([127, 0, 0, 2].into(), 0, behavior).expect("bind 127.0.0.2:0");
            if let Ok(three) = Self::bind([127, 0, 0, 3].into(), two.port(), behavior) {
                return (two, three);
            }
        }
        panic!("no port free on both 127.0.0.2 and 127.0.0.3 in 20 tries");
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections open right now (accepted and not yet fully closed).
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// (length, hash) of what each finished connection received, in order of completion
    /// ([`Behavior::AnswerAfterEof`] and [`Behavior::Stream`]).
    pub fn received(&self) -> Vec<(u64, u64)> {
        self.shared.received.lock().expect("lock").clone()
    }

    /// Stops listening, so connects are refused; open connections go on.
    pub fn stop_listening(&mut self) {
        if let Some((thread, listener)) = self.acceptor.take() {
            self.shared.stopping.store(true, Ordering::SeqCst);
            // shutdown(2) on a listening socket wakes the blocked accept(2).
            // SAFETY: the fd belongs to `listener`, alive until after the join.
            unsafe {
                libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
            }
            let _ = thread.join();
            drop(listener);
        }
    }

    /// Listens again on the same address after [`Upstream::stop_listening`].
    pub fn resume_listening(&mut self) {
        assert!(self.acceptor.is_none(), "already listening");
        let listener = TcpListener::bind(self.addr).unwrap_or_else(|e| panic!("listen again on {}: {e}", self.addr));
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        self.shared.stopping.store(false, Ordering::SeqCst);
        let shared = self.shared.clone();
        let behavior = self.behavior;
        let ip = self.addr.ip();
        let accepting = listener.try_clone().expect("clone listener");
        let thread = std::thread::spawn(move || {
            loop {
                let stream = match accepting.accept() {
                    Ok((s, _)) => s,
                    Err(_) if shared.stopping.load(Ordering::SeqCst) => return,
                    Err(_) => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                };
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                shared.open.fetch_add(1, Ordering::SeqCst);
                if let Ok(c) = stream.try_clone() {
                    shared.conns.lock().expect("lock").push(c);
                }
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = handle(stream, behavior, ip, &shared);
                    shared.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        self.acceptor = Some((thread, listener));
    }
}

fn handle(mut s: TcpStream, behavior: Behavior, ip: IpAddr, shared: &Shared) -> io::Result<()> {
    s.set_nodelay(true)?;
    match behavior {
        Behavior::Echo => {
            s.write_all(format!("hello from {ip}\n").as_bytes())?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n])?;
            }
        }
        Behavior::AnswerAfterEof { reply_len } => {
            let got = hash_to_eof(&mut s)?;
            shared.received.lock().expect("lock").push(got);
            s.write_all(format!("got {}\n", got.0).as_bytes())?;
            send_pattern(&mut s, DOWN_SEED, reply_len)?;
        }
        Behavior::Stream { down_len } => {
            let mut writer = s.try_clone()?;
            let sending = std::thread::spawn(move || {
                let r = send_pattern(&mut writer, DOWN_SEED, down_len);
                let _ = writer.shutdown(Shutdown::Write);
                r
            });
            let got = hash_to_eof(&mut s)?;
            shared.received.lock().expect("lock").push(got);
            let _ = sending.join();
        }
    }
    s.shutdown(Shutdown::Write)
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop_listening();
        for c in self.shared.conns.lock().expect("lock").drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// What [`concurrent_clients`] saw.
pub struct Concurrent {
    /// Whether every client had sent its request and was open at the upstream
    /// at the same time (within 30 s).
    pub all_open: bool,
    /// Connections open at the upstream when that wait ended.
    pub open_at_once: usize,
    /// Each client's outcome, in client order.
    pub results: Vec<Result<(), String>>,
}

/// Runs `n` clients at once against `up`, a [`Behavior::AnswerAfterEof`]
/// upstream answering `reply_len` bytes. Client `i` opens its connection with
/// `connect`, sends `request_len` bytes of pattern stream `10 + i`, holds the
/// connection open until all `n` are open at `up` (at most 30 s), then
/// half-closes and checks the `got` line and the answer.
pub fn concurrent_clients<C>(up: &Upstream, n: usize, request_len: u64, reply_len: u64, connect: C) -> Concurrent
where
    C: Fn() -> Result<TcpStream, String> + Clone + Send + 'static,
{
    let sent = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..n as u64)
        .map(|i| {
            let (sent, go, connect) = (sent.clone(), go.clone(), connect.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut s = connect()?;
                send_pattern(&mut s, 10 + i, request_len).map_err(|e| format!("send: {e}"))?;
                sent.fetch_add(1, Ordering::SeqCst);
                // Hold the connection open until all of them are.
                wait_until(Duration::from_secs(30), || go.load(Ordering::SeqCst));
                s.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
                let line = read_line(&mut s).ok_or("no `got` line")?;
                if line != format!("got {request_len}") {
                    return Err(format!("upstream says {line:?}"));
                }
                let answer = hash_to_eof(&mut s).map_err(|e| format!("read answer: {e}"))?;
                if answer != pattern_hash(DOWN_SEED, reply_len) {
                    return Err(format!("answer (len, hash) {answer:?} differs"));
                }
                Ok(())
            })
        })
        .collect();
    let all_open = wait_until(Duration::from_secs(30), || {
        sent.load(Ordering::SeqCst) == n && up.open() == n
    });
    let open_at_once = up.open();
    go.store(true, Ordering::SeqCst);
    let results = clients.into_iter().map(|c| c.join().expect("client thread")).collect();
    Concurrent {
        all_open,
        open_at_once,
        results,
    }
}

/// (length, hash) of each of several streams.
type Hashes = Vec<(u64, u64)>;

/// What `up` received from the `n` clients of [`concurrent_clients`] and what
/// they sent, each sorted: `(received, sent)`. Waits up to 5 s for `up` to
/// finish all `n` connections, and panics if it does not.
pub fn concurrent_received(up: &Upstream, n: usize, request_len: u64) -> (Hashes, Hashes) {
    let mut want: Vec<(u64, u64)> = (0..n as u64).map(|i| pattern_hash(10 + i, request_len)).collect();
    let mut got = wait_for(Duration::from_secs(5), || {
        let r = up.received();
        (r.len() == n).then_some(r)
    })
    .unwrap_or_else(|| panic!("upstream finished {} of {n} connections", up.received().len()));
    want.sort_unstable();
    got.sort_unstable();
    (got, want)
}
