//! The one place an upstream (a database) is dialled, for every role.
//!
//! [`connect`] tries each current address of a [`Watch`] in turn, each
//! bounded by a timeout; when all fail it asks the watch for an immediate
//! re-resolve (rate-limited there) and tries the addresses that are new, so
//! a client sees no failed connect when DNS has already moved. A caller can
//! veto addresses (the SSH role's deny list) with `admit`.
//! [`address_left`] is how `on_change = "close"` notices that a connection's
//! address left the answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::info;

use crate::dns::{Answer, Watch};

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The name has no address (yet, or any more).
    #[error("no address for {name}{}", .why.as_ref().map(|w| format!(": {w}")).unwrap_or_default())]
    NoAddress { name: String, why: Option<String> },
    /// `admit` refused an address: the caller's policy, not a network error.
    #[error("{addr} refused: {why}")]
    Refused { addr: IpAddr, why: String },
    /// Every address was tried and failed.
    #[error("{0}")]
    Failed(String),
}

/// Connects to `port` on the watch's current addresses; see the module doc.
/// `admit` returns Err(reason) for an address that must not be dialled: then
/// nothing is dialled at all (fail closed), whatever the other addresses.
pub async fn connect(
    watch: &Watch,
    port: u16,
    timeout: Duration,
    admit: impl Fn(IpAddr) -> Result<(), String>,
) -> Result<TcpStream, ConnectError> {
    let mut tried: Vec<IpAddr> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let first = watch.current();
    check(&first, &admit)?;
    for &ip in first.iter() {
        tried.push(ip);
        match connect_one(SocketAddr::new(ip, port), timeout).await {
            Ok(s) => return Ok(s),
            Err(e) => errors.push(e),
        }
    }
    if watch.is_dynamic() {
        let fresh = watch.refresh_now().await;
        check(&fresh, &admit)?;
        let new: Vec<IpAddr> = fresh.iter().copied().filter(|ip| !tried.contains(ip)).collect();
        for ip in new {
            match connect_one(SocketAddr::new(ip, port), timeout).await {
                Ok(s) => {
                    info!(upstream = %SocketAddr::new(ip, port), "connected after re-resolving");
                    return Ok(s);
                }
                Err(e) => errors.push(e),
            }
        }
    }
    if errors.is_empty() {
        return Err(ConnectError::NoAddress {
            name: watch.name().to_string(),
            why: watch.answer().error.map(|e| e.to_string()),
        });
    }
    Err(ConnectError::Failed(errors.join("; ")))
}

fn check(addrs: &[IpAddr], admit: &impl Fn(IpAddr) -> Result<(), String>) -> Result<(), ConnectError> {
    for &addr in addrs {
        admit(addr).map_err(|why| ConnectError::Refused { addr, why })?;
    }
    Ok(())
}

async fn connect_one(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("{addr}: {e}")),
        Err(_) => Err(format!("{addr}: no answer within {timeout:?}")),
    }
}

/// Resolves when `ip` is no longer in a (non-empty) answer; never when `None`.
pub async fn address_left(watch: Option<(watch::Receiver<Answer>, IpAddr)>) {
    let Some((mut rx, ip)) = watch else {
        return std::future::pending().await;
    };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let answer = rx.borrow_and_update();
        if !answer.addrs.is_empty() && !answer.addrs.contains(&ip) {
            info!(upstream = %ip, now = ?answer.addrs, "closing: upstream address left the DNS answer");
            return;
        }
    }
}

/// Relays an SSH channel, just accepted, to its database connection until
/// either side ends it, the connection's address leaves the DNS answer
/// (`on_change = "close"`), or `cut` fires; returns the reason for the close
/// audit line. The channel's data comes through `inlet`, fed by the
/// session's handler; `channel`'s read half is not used. Shared by the ssh
/// role's channels and the tunnel's forwarded connections.
pub async fn relay_channel<S>(
    inlet: crate::relay::InletRx,
    channel: russh::Channel<S>,
    tcp: TcpStream,
    meter: &Arc<crate::relay::Meter>,
    watch: &Watch,
    on_change: crate::config::OnChange,
    cut: &tokio_util::sync::CancellationToken,
) -> String
where
    S: From<(russh::ChannelId, russh::ChannelMsg)> + Send + Sync + 'static,
{
    let tcp = Arc::new(tcp);
    // Data that arrived before this is waiting in the inlet; from now on the
    // handler writes straight to the socket.
    inlet.attach(&tcp, meter);
    let (_, channel) = channel.split();
    let left = match (on_change, tcp.peer_addr()) {
        (crate::config::OnChange::Close, Ok(a)) if watch.is_dynamic() => Some((watch.subscribe(), a.ip())),
        _ => None,
    };
    let stop = async {
        tokio::select! {
            () = address_left(left) => "upstream address left the DNS answer",
            () = cut.cancelled() => "shutdown",
        }
    };
    match crate::relay::channel(&inlet, channel, &tcp, meter, stop).await {
        Ok(None) => "closed".to_string(),
        Ok(Some(why)) => why.to_string(),
        Err(e) => format!("{} error: {}", e.side.as_str(), e.source),
    }
}
