//! The one place bytes are copied between two connections: counted,
//! half-closed correctly, and on Linux moved with `splice(2)` through a pipe
//! so they never enter user space.
//!
//! Each direction is a "pump": it waits until its source is readable, takes a
//! pipe from a small process-wide pool, splices socket → pipe → socket until
//! the source would block, then gives the pipe back. An idle connection so
//! holds no pipe and no buffer: only its two sockets (DESIGN.md, "Resource
//! budget": 10,000 idle connections are 20,000 descriptors, not 60,000).
//! When no pipe can be had (descriptor limit, or a non-root user past
//! `fs.pipe-user-pages-soft`, where the kernel hands out one-page pipes) the
//! pump copies through a buffer it holds only while bytes move.
//!
//! When one side ends its stream (EOF), the pump shuts down the other side's
//! write half and the opposite direction keeps flowing: a client that sends
//! its request and shuts down its write side still gets the whole answer.
//! The relay ends when both directions have ended, or at the first error.
//!
//! Cancellation is the caller's: drop the future (e.g. in a `select!` with a
//! `CancellationToken`) and both sockets close when the caller drops them.
//! Bytes are counted into a [`Meter`] as they move, so they survive that.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::Counter;
use tokio::net::TcpStream;

mod inlet;
pub use inlet::{InletRx, Inlets};

/// Which side of a relay failed: a metric label and a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{side}: {source}", side = .side.as_str())]
pub struct RelayError {
    pub side: Side,
    #[source]
    pub source: io::Error,
}

impl RelayError {
    fn upstream(source: io::Error) -> RelayError {
        RelayError {
            side: Side::Upstream,
            source,
        }
    }
}

/// Byte counts of one relayed connection, also fed to the route's counters.
pub struct Meter {
    up_counter: Counter,
    down_counter: Counter,
    up: AtomicU64,
    down: AtomicU64,
}

impl Meter {
    /// `up` counts client → upstream bytes, `down` upstream → client.
    pub fn new(up: Counter, down: Counter) -> Meter {
        Meter {
            up_counter: up,
            down_counter: down,
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    /// (up, down) so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed))
    }

    fn add(&self, dir: Dir, n: usize) {
        let n = n as u64;
        match dir {
            Dir::Up => {
                self.up.fetch_add(n, Ordering::Relaxed);
                self.up_counter.increment(n);
            }
            Dir::Down => {
                self.down.fetch_add(n, Ordering::Relaxed);
                self.down_counter.increment(n);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    Up,
    Down,
}

impl Dir {
    fn sides(self) -> (Side, Side) {
        match self {
            Dir::Up => (Side::Client, Side::Upstream),
            Dir::Down => (Side::Upstream, Side::Client),
        }
    }
}

/// Relays between a client and an upstream TCP connection until both
/// directions have ended (Ok) or one fails (Err names the side).
pub async fn tcp(client: &TcpStream, upstream: &TcpStream, meter: &Meter) -> Result<(), RelayError> {
    let up = pump(client, upstream, meter, Dir::Up);
    let down = pump(upstream, client, meter, Dir::Down);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => { r?; up_done = true; }
            r = &mut down, if !down_done => { r?; down_done = true; }
        }
    }
    Ok(())
}

/// Largest read from a TCP socket into an SSH channel at once; russh cuts it
/// into packets of the channel's maximum packet size.
const CHANNEL_CHUNK: usize = 256 * 1024;

/// Relays between an SSH channel (either side of russh: server or client)
/// and a TCP connection. `up` counts channel → TCP bytes, `down` TCP →
/// channel. The channel's data arrives through `inlet`, whose other end the
/// session's handler feeds ([`inlet`]). A channel EOF half-closes the TCP
/// side and the other direction keeps flowing; a channel close ends the
/// relay. An idle relay holds no buffer: TCP bytes are read only once the
/// socket is readable, and channel data is written as it arrives.
///
/// When `stop` resolves first, the channel is closed properly (the client
/// sees the close) and its reason is returned as `Ok(Some(reason))`.
pub async fn channel<S>(
    inlet: &InletRx,
    tx: russh::ChannelWriteHalf<S>,
    tcp: &TcpStream,
    meter: &Meter,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<Option<&'static str>, RelayError>
where
    S: From<(russh::ChannelId, russh::ChannelMsg)> + Send + Sync + 'static,
{
    let channel_err = |e: russh::Error| RelayError {
        side: Side::Client,
        source: io::Error::other(e.to_string()),
    };
    // Until the channel's EOF (true) or close (false).
    let up = inlet.pump(tcp, meter);
    let down = async {
        loop {
            tcp.readable().await.map_err(RelayError::upstream)?;
            let mut buf = bytes::BytesMut::with_capacity(CHANNEL_CHUNK);
            match tcp.try_read_buf(&mut buf) {
                Ok(0) => {
                    tx.eof().await.map_err(channel_err)?;
                    return Ok::<(), RelayError>(());
                }
                Ok(n) => {
                    tx.data_bytes(buf.freeze()).await.map_err(channel_err)?;
                    meter.add(Dir::Down, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RelayError::upstream(e)),
            }
        }
    };
    tokio::pin!(up, down, stop);
    let (mut up_done, mut down_done) = (false, false);
    let result = loop {
        if up_done && down_done {
            // Both EOFs passed: the server closes first (OpenSSH clients
            // wait for our close before sending theirs).
            break Ok(None);
        }
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(true) => up_done = true,
                Ok(false) => break Ok(None),
                Err(e) => break Err(e),
            },
            // After the EOF the channel's close still ends the relay.
            () = inlet.closed(), if up_done => break Ok(None),
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => break Err(e),
            },
            reason = &mut stop => break Ok(Some(reason)),
        }
    };
    let _ = tx.close().await;
    result
}

/// Size of the copy buffer when no pipe can be had.
const BUFFER_SIZE: usize = 64 * 1024;

/// One direction: `src` → `dst` until EOF on `src` (then `dst`'s write half
/// is shut down) or an error.
async fn pump(src: &TcpStream, dst: &TcpStream, meter: &Meter, dir: Dir) -> Result<(), RelayError> {
    let (src_side, dst_side) = dir.sides();
    let on_src = |source| RelayError { side: src_side, source };
    let on_dst = |source| RelayError { side: dst_side, source };
    #[cfg(target_os = "linux")]
    let mut splice_works = true;
    loop {
        src.readable().await.map_err(on_src)?;
        #[cfg(target_os = "linux")]
        if splice_works {
            // Boxed, like the buffered burst below: the state of a burst
            // lives only while bytes move, so an idle pump is just its
            // readiness wait (DESIGN.md "Resource budget").
            match Box::pin(splice::burst(src, dst, meter, dir)).await {
                Ok(Burst::Eof) => return finish(dst).map_err(on_dst),
                Ok(Burst::Idle) => continue,
                Ok(Burst::NoPipe) => {}
                Ok(Burst::Unsupported) => splice_works = false,
                Err(e) => return Err(e),
            }
        }
        match Box::pin(buffered_burst(src, dst, meter, dir)).await? {
            Burst::Eof => return finish(dst).map_err(on_dst),
            _ => continue,
        }
    }
}

/// What a burst of copying ended with.
enum Burst {
    /// The source ended its stream.
    Eof,
    /// The source has nothing more for now.
    Idle,
    /// No usable pipe: copy through a buffer instead, this time.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    NoPipe,
    /// splice(2) refused these descriptors: use buffers from now on.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Unsupported,
}

/// Copies through a buffer held only for this burst.
async fn buffered_burst(src: &TcpStream, dst: &TcpStream, meter: &Meter, dir: Dir) -> Result<Burst, RelayError> {
    let (src_side, dst_side) = dir.sides();
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Idle),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(RelayError { side: src_side, source });
            }
        };
        write_all(dst, &buf[..n])
            .await
            .map_err(|source| RelayError { side: dst_side, source })?;
        meter.add(dir, n);
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The source ended: pass the EOF on, keep the other direction open.
fn finish(dst: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
        // The peer may be gone already; the other pump will see that.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

#[cfg(target_os = "linux")]
mod splice {
    //! splice(2) through pooled pipes.
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::Mutex;

    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Burst, Dir, Meter, RelayError};

    /// Pipe capacity asked for with F_SETPIPE_SZ: larger pipes mean fewer
    /// syscalls per byte. A non-root user's pipes share
    /// `fs.pipe-user-pages-soft` (16384 pages = 64 MiB): 256 KiB allows 256
    /// pipes moving bytes at once before the kernel refuses to enlarge them.
    pub(super) const PIPE_SIZE: usize = 256 * 1024;
    /// Below this a pipe is not worth using (the kernel's one-page pipes past
    /// the user's soft limit): copy through a buffer instead.
    const MIN_PIPE_SIZE: usize = 16 * 1024;
    /// Empty pipes kept for reuse; more are closed when given back.
    const MAX_IDLE_PIPES: usize = 64;

    pub(super) struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        size: usize,
    }

    static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

    /// An empty pipe from the pool, or a new one; None when none can be had.
    fn take() -> Option<Pipe> {
        if let Some(p) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(p);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).ok()?;
        // Failure (EPERM past the user's pipe pages) leaves the default size.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        let size = fcntl(&write, FcntlArg::F_GETPIPE_SZ).ok()? as usize;
        if size < MIN_PIPE_SIZE {
            return None;
        }
        Some(Pipe { read, write, size })
    }

    /// Returns an empty pipe to the pool (a pipe holding bytes is dropped instead).
    fn give(pipe: Pipe) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_IDLE_PIPES {
            pool.push(pipe);
        }
    }

    fn splice_once(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
        splice(
            from,
            None,
            to,
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )
        .map_err(io::Error::from)
    }

    /// Splices while the source has bytes; holds a pipe only meanwhile.
    pub(super) async fn burst(src: &TcpStream, dst: &TcpStream, meter: &Meter, dir: Dir) -> Result<Burst, RelayError> {
        let (src_side, dst_side) = dir.sides();
        let Some(pipe) = take() else {
            return Ok(Burst::NoPipe);
        };
        loop {
            let n = match src.try_io(Interest::READABLE, || splice_once(src, &pipe.write, pipe.size)) {
                Ok(0) => {
                    give(pipe);
                    return Ok(Burst::Eof);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    give(pipe);
                    return Ok(Burst::Idle);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    give(pipe);
                    return Ok(Burst::Unsupported);
                }
                Err(source) => {
                    give(pipe);
                    return Err(RelayError { side: src_side, source });
                }
            };
            // Drain the pipe completely before reading more, so a pipe given
            // back is always empty. On error the pipe (with bytes) is dropped.
            let mut left = n;
            while left > 0 {
                match dst.try_io(Interest::WRITABLE, || splice_once(&pipe.read, dst, left)) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        dst.writable()
                            .await
                            .map_err(|source| RelayError { side: dst_side, source })?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(RelayError { side: dst_side, source });
                    }
                }
            }
            meter.add(dir, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn meter() -> Meter {
        Meter::new(Counter::noop(), Counter::noop())
    }

    /// client_end <-> [client | relay | upstream] <-> upstream_end
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(Result<(), RelayError>, (u64, u64))>,
    ) {
        let (client_end, client) = pair().await;
        let (upstream, upstream_end) = pair().await;
        let task = tokio::spawn(async move {
            let m = meter();
            let r = tcp(&client, &upstream, &m).await;
            (r, m.bytes())
        });
        (client_end, upstream_end, task)
    }

    #[tokio::test]
    async fn half_close_still_delivers_the_answer() {
        let (mut client, mut upstream, task) = relayed().await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut req = Vec::new();
        upstream.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request", "upstream sees the request then EOF");
        let answer = vec![7u8; 3 * 1024 * 1024];
        upstream.write_all(&answer).await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got.len(),
            answer.len(),
            "client gets the whole answer after its own shutdown"
        );
        let (r, (up, down)) = task.await.unwrap();
        r.unwrap();
        assert_eq!((up, down), (7, answer.len() as u64));
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_exactly() {
        let (mut client, mut upstream, task) = relayed().await;
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "upstream got the bytes in order");
        upstream.write_all(&got).await.unwrap();
        upstream.shutdown().await.unwrap();
        let back = writer.await.unwrap();
        assert!(back == data, "client got them back");
        let (r, (up, down)) = task.await.unwrap();
        r.unwrap();
        assert_eq!((up, down), (data.len() as u64, data.len() as u64));
    }

    #[tokio::test]
    async fn reset_is_reported_with_its_side() {
        let (client, mut upstream, task) = relayed().await;
        // SO_LINGER 0: close sends RST.
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        upstream.write_all(b"data the client never reads").await.unwrap();
        drop(client);
        let (r, _) = task.await.unwrap();
        let err = r.expect_err("a reset client is an error");
        assert_eq!(err.side, Side::Client, "{err}");
    }
}
