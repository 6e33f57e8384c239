//! The drain a load balancer's deregistration relies on, end to end on the
//! SSH role: SIGTERM arrives while an `ssh -N -L` transfer runs; `/readyz/ssh`
//! turns 503 at once, new connections are still accepted for `drain_delay`
//! and refused after it, the open transfer completes byte for byte, and the
//! daemon exits 0 once its last session is gone, well within `shutdown_grace`.

use std::io::{ErrorKind, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::ssh::{Lab, SshConfig, allow_cidr};
use crate::support::upstream::{Behavior, DOWN_SEED, Upstream};
use crate::support::{StreamHash, addr, pattern_hash, read_line, send_pattern, wait_for, wait_until};

const MIB: u64 = 1024 * 1024;
/// What the upstream sends down the forwarded connection.
const DOWN: u64 = 20 * MIB;
/// What the client sends up it.
const UP: u64 = MIB;
/// The client reads no faster than this, so the transfer outlives drain_delay.
const RATE: u64 = 5 * MIB;
const DRAIN_DELAY: Duration = Duration::from_secs(1);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Reads `s` to EOF at most `rate` bytes per second, counting into `progress`.
fn read_throttled(s: &mut TcpStream, rate: u64, progress: &AtomicU64) -> std::io::Result<(u64, u64)> {
    let started = Instant::now();
    let mut hash = StreamHash::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(hash.finish()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        let total = progress.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        let due = Duration::from_secs_f64(total as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

#[test]
fn sigterm_drains_an_open_ssh_local_forward_transfer_then_exits_0() {
    let up = Upstream::bind([127, 0, 0, 2].into(), 0, Behavior::Stream { down_len: DOWN }).expect("bind 127.0.0.2");
    let lab = Lab::new();
    let key = lab.key("user_ed25519", "ed25519");
    lab.authorize(&[key.line("")]);
    let ssh = SshConfig {
        daemon: format!(
            "drain_delay = \"{}s\"\nshutdown_grace = \"{}s\"\n",
            DRAIN_DELAY.as_secs(),
            SHUTDOWN_GRACE.as_secs()
        ),
        ..SshConfig::allowing(allow_cidr("127.0.0.2/32", &[up.port()]))
    };
    // No rule names a host: no resolver is built and this address is never asked.
    let mut b = lab.start(&ssh, addr("127.0.0.1:9"));
    let fwd = b.local_forward(&key, &[&up.addr().to_string()], &[], Duration::from_secs(60));

    let client = fwd.connect(0);
    client.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    client
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut writer = client.try_clone().expect("clone");
    let sending = std::thread::spawn(move || {
        let sent = send_pattern(&mut writer, 1, UP);
        let _ = writer.shutdown(Shutdown::Write);
        sent
    });
    let progress = Arc::new(AtomicU64::new(0));
    let receiving = {
        let progress = progress.clone();
        let mut client = client;
        std::thread::spawn(move || read_throttled(&mut client, RATE, &progress))
    };
    assert!(
        wait_until(Duration::from_secs(10), || progress.load(Ordering::SeqCst) >= MIB),
        "the transfer did not start: {} bytes down",
        progress.load(Ordering::SeqCst)
    );

    b.daemon.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let unready = wait_for(Duration::from_millis(500), || {
        let (status, body) = b.daemon.get("/readyz/ssh");
        (status == 503).then_some(body)
    })
    .unwrap_or_else(|| {
        panic!(
            "/readyz/ssh not 503 within 0.5 s of SIGTERM: {:?}",
            b.daemon.get("/readyz/ssh")
        )
    });
    assert!(unready.contains("draining"), "/readyz/ssh should say why: {unready}");
    assert_eq!(
        b.daemon.get("/healthz").0,
        200,
        "/healthz while the process still serves"
    );

    // Within drain_delay a new connection is accepted: the server's banner comes.
    let mut late = TcpStream::connect(b.addr).expect("connect during drain_delay");
    late.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let banner = read_line(&mut late);
    assert!(
        signalled.elapsed() < DRAIN_DELAY,
        "test too slow to check drain_delay ({:?})",
        signalled.elapsed()
    );
    assert!(
        banner.as_deref().is_some_and(|l| l.starts_with("SSH-2.0-")),
        "a connection during drain_delay must be served: {banner:?}"
    );
    drop(late);

    // After it, the listener is closed.
    let refusing = wait_for(Duration::from_secs(5), || {
        TcpStream::connect(b.addr).is_err().then(|| signalled.elapsed())
    })
    .expect("ssh still accepts 5 s after SIGTERM with drain_delay 1 s");
    assert!(
        refusing >= DRAIN_DELAY - Duration::from_millis(100),
        "stopped accepting after {refusing:?}, before drain_delay ({DRAIN_DELAY:?})"
    );
    let done = progress.load(Ordering::SeqCst);
    assert!(
        done < DOWN,
        "the transfer ended ({done} bytes) before the listener closed: nothing drained"
    );
    assert!(b.daemon.running(), "the daemon exited with a transfer open");

    // The transfer completes byte for byte, both ways.
    let got_down = receiving.join().expect("receiver").expect("read the transfer");
    assert_eq!(
        got_down,
        pattern_hash(DOWN_SEED, DOWN),
        "downstream (len, hash) differs"
    );
    let sent_up = sending.join().expect("sender").expect("send up");
    assert_eq!(sent_up, pattern_hash(1, UP));
    let received = wait_for(Duration::from_secs(5), || up.received().first().copied());
    assert_eq!(received, Some(sent_up), "upstream received (len, hash) differs");
    let closed = wait_for(Duration::from_secs(5), || {
        b.daemon.audit("channel_close").into_iter().next()
    })
    .expect("no channel_close audit line");
    assert_eq!(closed["fields"]["bytes_up"], UP, "{closed}");
    assert_eq!(closed["fields"]["bytes_down"], DOWN, "{closed}");
    assert!(
        signalled.elapsed() > DRAIN_DELAY,
        "the transfer should outlive drain_delay"
    );

    // The client ends its session; the daemon exits 0 without waiting out the grace.
    fwd.ssh.kill();
    let status = b
        .daemon
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no exit within 5 s of the last session ending"));
    assert_eq!(status.code(), Some(0), "exit status after the drain: {status}");
    let total = signalled.elapsed();
    assert!(
        total < SHUTDOWN_GRACE,
        "exited after {total:?}: the grace ran out instead"
    );
    // The last lines reach the stderr reader a moment after the exit.
    let drained = wait_until(Duration::from_secs(2), || {
        b.daemon
            .stderr_lines()
            .iter()
            .any(|l| l.contains("all connections closed"))
    });
    let log = b.daemon.stderr_lines().join("\n");
    assert!(drained, "no `all connections closed` line:\n{log}");
    assert!(!log.contains("shutdown_grace ran out"), "{log}");
}
