//! Channel → TCP bytes written by the SSH session's own task, as OpenSSH's
//! client does in its one loop.
//!
//! With russh's per-channel queue every packet is handed from the session's
//! task to the relay's (often on the other core), which then writes it: a
//! wake-up and a hand-off per packet. Here the session's handler writes each
//! packet to the database socket itself, straight from russh's buffer. What
//! the socket does not take at once is left, in order, to the relay's task,
//! which writes it as the socket drains; until it has, the handler only
//! appends, so bytes never overtake each other. Past [`LIMIT`] unwritten
//! bytes the handler waits, which stops the session reading from the server:
//! that bound, not the SSH window (russh re-opens it on receipt,
//! `docs/russh-flow-control.md`), is what limits a slow database's backlog.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use bytes::{Buf, BytesMut};
use russh::ChannelId;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{Dir, Meter, RelayError, finish};

/// Unwritten bytes one connection may hold before the session waits for its
/// database. Large on purpose: while the session waits it reads nothing from
/// its peer, not even the window adjusts that our other direction needs, so
/// a database that reads only while it can write back (an echo, a server
/// streaming results while it is sent `COPY` data) could stall the channel
/// for good once this much waits. Held only while bytes wait. The old bound,
/// russh's per-channel queue of 4096 packets, was as large or larger.
pub const LIMIT: usize = 128 * 1024 * 1024;

#[derive(Default)]
struct Outbox {
    /// Bytes the socket did not take yet (or that came before it was
    /// attached), in order. While it holds any, the relay's task writes and
    /// the handler only appends. Freed whenever it empties: an idle
    /// connection holds no buffer.
    buf: BytesMut,
    /// The channel's EOF arrived: the socket's write side is shut down once
    /// `buf` is written.
    eof: bool,
    /// The channel closed, or the session carrying it ended.
    closed: bool,
    /// The first write error, for the relay to report.
    failed: Option<io::Error>,
    /// The relay has ended: data for this channel is dropped.
    gone: bool,
}

impl Outbox {
    /// Writes what `tcp` takes of `buf` now; Ok(true) once it is empty.
    fn write(&mut self, tcp: &TcpStream, meter: &Meter) -> io::Result<bool> {
        let n = write_some(tcp, &self.buf, meter)?;
        self.buf.advance(n);
        if !self.buf.is_empty() {
            return Ok(false);
        }
        self.buf = BytesMut::new();
        Ok(true)
    }
}

/// Writes what `tcp` takes of `data` without waiting; how much it took.
fn write_some(tcp: &TcpStream, mut data: &[u8], meter: &Meter) -> io::Result<usize> {
    let len = data.len();
    while !data.is_empty() {
        match tcp.try_write(data) {
            Ok(n) => {
                meter.add(Dir::Up, n);
                data = &data[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(len - data.len())
}

struct Shared {
    outbox: Mutex<Outbox>,
    /// The database socket, set before the channel is accepted. Weak: the
    /// socket closes when the relay ends, not when the session forgets it.
    target: OnceLock<(Weak<TcpStream>, Arc<Meter>)>,
    /// The relay has something to do: a batch the socket did not take, the
    /// EOF, the close, a write error.
    wake: Notify,
    /// The relay wrote something: a handler waiting for room goes on.
    drained: Notify,
    /// [`LIMIT`], smaller in tests.
    limit: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what the socket takes of `data` now; 0 before it is attached
    /// (or after the relay dropped it).
    fn write_now(&self, data: &[u8]) -> io::Result<usize> {
        match self.target.get() {
            Some((tcp, meter)) => match tcp.upgrade() {
                Some(tcp) => write_some(&tcp, data, meter),
                None => Ok(0),
            },
            None => Ok(0),
        }
    }
}

/// One SSH session's inlets, by channel: what its handler (the ssh role's
/// or the tunnel's) feeds from russh's `data`, `channel_eof` and
/// `channel_close` callbacks.
#[derive(Default)]
pub struct Inlets(HashMap<ChannelId, Inlet>);

impl Inlets {
    /// A channel being opened: its relay's end. Forgets channels whose relay
    /// has ended (or whose database refused).
    pub fn open(&mut self, channel: ChannelId) -> InletRx {
        self.0.retain(|_, inlet| !inlet.is_gone());
        let (inlet, rx) = inlet();
        self.0.insert(channel, inlet);
        rx
    }

    /// Channel data, in the session's task.
    pub async fn data(&self, channel: ChannelId, data: &[u8]) {
        if let Some(inlet) = self.0.get(&channel) {
            inlet.data(data).await;
        }
    }

    pub fn eof(&self, channel: ChannelId) {
        if let Some(inlet) = self.0.get(&channel) {
            inlet.eof();
        }
    }

    /// The channel closed: dropping its inlet tells the relay.
    pub fn close(&mut self, channel: ChannelId) {
        self.0.remove(&channel);
    }
}

/// The session handler's end of one channel.
struct Inlet {
    shared: Arc<Shared>,
}

/// The relay's end of an [`Inlet`].
pub struct InletRx {
    shared: Arc<Shared>,
}

/// A channel's two ends: the handler's and the relay's.
fn inlet() -> (Inlet, InletRx) {
    with_limit(LIMIT)
}

fn with_limit(limit: usize) -> (Inlet, InletRx) {
    let shared = Arc::new(Shared {
        limit,
        outbox: Mutex::new(Outbox::default()),
        target: OnceLock::new(),
        wake: Notify::new(),
        drained: Notify::new(),
    });
    (Inlet { shared: shared.clone() }, InletRx { shared })
}

impl Inlet {
    /// Channel data: written now as far as the socket takes it, the rest left
    /// to the relay; waits while [`LIMIT`] bytes are unwritten.
    async fn data(&self, mut data: &[u8]) {
        loop {
            let room = self.shared.drained.notified();
            tokio::pin!(room);
            {
                let mut o = self.shared.lock();
                if o.gone || o.closed || o.failed.is_some() {
                    return;
                }
                if o.buf.is_empty() {
                    // Nothing waits to be written: straight to the socket.
                    match self.shared.write_now(data) {
                        Ok(n) => data = &data[n..],
                        Err(e) => {
                            o.failed = Some(e);
                            self.shared.wake.notify_one();
                            return;
                        }
                    }
                    if data.is_empty() {
                        return;
                    }
                    // The rest goes to `buf`: the relay's turn.
                    self.shared.wake.notify_one();
                }
                if o.buf.len() < self.shared.limit {
                    o.buf.extend_from_slice(data);
                    return;
                }
                room.as_mut().enable();
            }
            room.await;
        }
    }

    /// The channel's EOF: the database's write side is shut down after the
    /// bytes before it.
    fn eof(&self) {
        self.shared.lock().eof = true;
        self.shared.wake.notify_one();
    }

    /// Whether the relay has ended (or never started): the inlet can go.
    fn is_gone(&self) -> bool {
        self.shared.lock().gone
    }
}

impl Drop for Inlet {
    /// The channel closed, or the session ended.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

impl InletRx {
    /// Where the handler writes from now on (before the channel is accepted:
    /// no data can arrive earlier).
    pub fn attach(&self, tcp: &Arc<TcpStream>, meter: &Arc<Meter>) {
        let _ = self.shared.target.set((Arc::downgrade(tcp), meter.clone()));
    }

    /// Writes what the handler left to the relay, until the channel's EOF
    /// (Ok(true), `tcp`'s write side shut down) or its close (Ok(false)).
    pub(super) async fn pump(&self, tcp: &TcpStream, meter: &Meter) -> Result<bool, RelayError> {
        let upstream = RelayError::upstream;
        loop {
            let blocked = {
                let mut o = self.shared.lock();
                let before = o.buf.len();
                let blocked = match o.write(tcp, meter) {
                    Ok(all) => !all,
                    Err(e) => return Err(upstream(e)),
                };
                if o.buf.len() != before {
                    self.shared.drained.notify_waiters();
                }
                if let Some(e) = o.failed.take() {
                    return Err(upstream(e));
                }
                if !blocked && o.eof {
                    finish(tcp).map_err(upstream)?;
                    return Ok(true);
                }
                if !blocked && o.closed {
                    return Ok(false);
                }
                blocked
            };
            if blocked {
                tcp.writable().await.map_err(upstream)?;
            } else {
                self.shared.wake.notified().await;
            }
        }
    }

    /// After the EOF: resolves when the channel closes.
    pub(super) async fn closed(&self) {
        while !self.shared.lock().closed {
            self.shared.wake.notified().await;
        }
    }
}

impl Drop for InletRx {
    fn drop(&mut self) {
        let mut o = self.shared.lock();
        o.gone = true;
        o.buf = BytesMut::new();
        drop(o);
        self.shared.drained.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use metrics::Counter;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::relay::Side;

    /// (the relay's socket to the database, the database's end)
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (Arc::new(a.unwrap()), b.unwrap().0)
    }

    const SMALL_LIMIT: usize = 4 * 1024 * 1024;

    struct Attached {
        inlet: Inlet,
        rx: InletRx,
        tcp: Arc<TcpStream>,
        db: TcpStream,
        meter: Arc<Meter>,
    }

    /// An inlet attached to a loopback connection to a "database".
    async fn attached() -> Attached {
        let (tcp, db) = pair().await;
        let meter = Arc::new(Meter::new(Counter::noop(), Counter::noop()));
        let (inlet, rx) = with_limit(SMALL_LIMIT);
        rx.attach(&tcp, &meter);
        Attached {
            inlet,
            rx,
            tcp,
            db,
            meter,
        }
    }

    fn pattern(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_database_that_does_not_read_holds_the_session_at_the_limit_and_gets_every_byte_in_order_then_eof() {
        const PACKET: usize = 32 * 1024;
        // More than the limit plus all the kernel may buffer on loopback (up
        // to 4 MiB sent + 6 MiB received with Linux's default tcp_wmem/rmem).
        const TOTAL: usize = 8 * SMALL_LIMIT;
        let Attached {
            inlet,
            rx,
            tcp,
            mut db,
            meter,
        } = attached().await;
        let relay = {
            let (tcp, meter) = (tcp.clone(), meter.clone());
            tokio::spawn(async move { rx.pump(&tcp, &meter).await.map_err(|e| e.to_string()) })
        };
        let fed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let feeder = {
            let fed = fed.clone();
            tokio::spawn(async move {
                let mut at = 0;
                while at < TOTAL {
                    inlet.data(&pattern(at, PACKET)).await;
                    at += PACKET;
                    fed.store(at, std::sync::atomic::Ordering::SeqCst);
                }
                inlet.eof();
                inlet
            })
        };
        // The database reads nothing for a while: the handler must stop at
        // the limit plus what the kernel buffers, not take everything.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let accepted = fed.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            !feeder.is_finished(),
            "the handler took all {TOTAL} bytes without waiting"
        );
        assert!(accepted < TOTAL, "accepted {accepted} of {TOTAL}");

        let mut got = Vec::with_capacity(TOTAL);
        tokio::time::timeout(Duration::from_secs(20), db.read_to_end(&mut got))
            .await
            .expect("the EOF after the bytes")
            .unwrap();
        assert_eq!(got.len(), TOTAL);
        assert!(got == pattern(0, TOTAL), "bytes arrived out of order or changed");
        assert_eq!(relay.await.unwrap(), Ok(true), "the relay ends at the EOF");
        assert_eq!(meter.bytes().0, TOTAL as u64);
        drop(feeder.await.unwrap());
    }

    #[tokio::test]
    async fn data_after_the_relay_ended_is_dropped_without_waiting() {
        let a = attached().await;
        let (inlet, rx, tcp) = (a.inlet, a.rx, a.tcp);
        drop(rx);
        drop(tcp);
        assert!(inlet.is_gone());
        let packet = vec![7u8; 64 * 1024];
        tokio::time::timeout(Duration::from_secs(5), async {
            for _ in 0..(2 * SMALL_LIMIT / packet.len()) {
                inlet.data(&packet).await;
            }
        })
        .await
        .expect("the session must not wait for a relay that has ended");
    }

    #[tokio::test]
    async fn a_database_that_reset_the_connection_is_reported_by_the_relay() {
        let Attached {
            inlet,
            rx,
            tcp,
            db,
            meter,
        } = attached().await;
        // SO_LINGER 0: close sends a reset.
        socket2::SockRef::from(&db).set_linger(Some(Duration::ZERO)).unwrap();
        drop(db);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let relay = {
            let tcp = tcp.clone();
            tokio::spawn(async move { rx.pump(&tcp, &meter).await.map(|_| ()) })
        };
        let packet = vec![1u8; 1024];
        for _ in 0..4 {
            inlet.data(&packet).await;
        }
        let err = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("the relay ends")
            .unwrap()
            .expect_err("a write error");
        assert_eq!(err.side, Side::Upstream);
    }

    #[tokio::test]
    async fn letting_go_of_the_inlet_at_the_close_or_the_session_end_ends_the_relay() {
        let Attached {
            inlet,
            rx,
            tcp,
            db: _db,
            meter,
        } = attached().await;
        let relay = tokio::spawn(async move { rx.pump(&tcp, &meter).await.map_err(|e| e.to_string()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!relay.is_finished(), "the relay ended early");
        drop(inlet);
        let ended = tokio::time::timeout(Duration::from_secs(5), relay).await;
        assert_eq!(ended.expect("the relay ends").unwrap(), Ok(false));
    }
}
