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

use super::{hash_to_eof, send_pattern};

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
