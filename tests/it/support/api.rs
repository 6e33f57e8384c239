//! A stand-in for the pipeline service's REST API (the one stand-in the
//! tests allow): an HTTP/1.1 server on 127.0.0.1, one thread per connection,
//! that records every request (method, path, `Authorization` header, body)
//! and answers from a script per path: queued replies first, in order, then
//! the path's fallback reply for as long as it is asked. A path with neither
//! answers 404. Every answer closes its connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wait_for;

/// The largest request head or body accepted.
const MAX_REQUEST: usize = 1024 * 1024;

/// One answer of the stand-in.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 `{"code":"Success","message":MESSAGE}` (the fingerprint API's answer).
    Success(String),
    /// 200 `{"code":"Success","data":{"public_key":LINE}}` (the group key API's answer).
    GroupKey(String),
    /// 401 `{"code":"AuthFailed","message":MESSAGE}`.
    Unauthorized(String),
    /// 429 with `Retry-After: SECONDS` and a JSON error body.
    TooMany {
        /// The `Retry-After` value, in seconds.
        retry_after: u64,
    },
    /// 500 `{"code":"InternalError","message":MESSAGE}`.
    ServerError(String),
    /// 200 with a body that is not JSON.
    Malformed,
    /// Anything else.
    Raw {
        /// HTTP status code.
        status: u16,
        /// The body (sent as `application/json` whatever it holds).
        body: String,
    },
}

impl Reply {
    /// (status, extra header lines, body).
    fn render(&self) -> (u16, String, String) {
        let json = |v: serde_json::Value| v.to_string();
        match self {
            Reply::Success(message) => (
                200,
                String::new(),
                json(serde_json::json!({"code": "Success", "message": message})),
            ),
            Reply::GroupKey(line) => (
                200,
                String::new(),
                json(serde_json::json!({"code": "Success", "data": {"public_key": line}})),
            ),
            Reply::Unauthorized(message) => (
                401,
                String::new(),
                json(serde_json::json!({"code": "AuthFailed", "message": message})),
            ),
            Reply::TooMany { retry_after } => (
                429,
                format!("Retry-After: {retry_after}\r\n"),
                json(serde_json::json!({"code": "TooManyRequests", "message": "slow down"})),
            ),
            Reply::ServerError(message) => (
                500,
                String::new(),
                json(serde_json::json!({"code": "InternalError", "message": message})),
            ),
            Reply::Malformed => (200, String::new(), "<html>this is not json {".to_string()),
            Reply::Raw { status, body } => (*status, String::new(), body.clone()),
        }
    }
}

/// One request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target, e.g. `/v1/groups/g1/public-key`.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body as text.
    pub body: String,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<serde_json::Value>,
    /// When the request was complete.
    pub at: Instant,
}

#[derive(Default)]
struct Script {
    queued: HashMap<String, Vec<Reply>>,
    fallback: HashMap<String, Reply>,
}

#[derive(Default)]
struct Shared {
    script: Mutex<Script>,
    requests: Mutex<Vec<Recorded>>,
    stopping: AtomicBool,
}

/// The running stand-in; stops on drop.
pub struct Api {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<(JoinHandle<()>, TcpListener)>,
}

impl Api {
    /// Listens on a fresh port of 127.0.0.1 with an empty script.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the API stand-in on 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared::default());
        let accepting = listener.try_clone().expect("clone listener");
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                loop {
                    let stream = match accepting.accept() {
                        Ok((s, _)) => s,
                        Err(_) if shared.stopping.load(Ordering::SeqCst) => return,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    if shared.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, &shared);
                    });
                }
            })
        };
        Self {
            addr,
            shared,
            acceptor: Some((thread, listener)),
        }
    }

    /// `http://127.0.0.1:PORT`, for `api_url` / `--api-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `replies` for `path`, answered in order before its fallback.
    pub fn script(&self, path: &str, replies: Vec<Reply>) {
        let mut script = self.shared.script.lock().expect("script lock");
        script.queued.entry(path.to_string()).or_default().extend(replies);
    }

    /// The answer for `path` once its queue is empty, as often as it is asked.
    pub fn fallback(&self, path: &str, reply: Reply) {
        let mut script = self.shared.script.lock().expect("script lock");
        script.fallback.insert(path.to_string(), reply);
    }

    /// Every request so far, in order of arrival.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// The requests to `path` so far.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }

    /// Waits up to `timeout` until at least `n` requests reached `path`; returns them all.
    pub fn wait_requests(&self, path: &str, n: usize, timeout: Duration) -> Vec<Recorded> {
        wait_for(timeout, || {
            let got = self.requests_to(path);
            (got.len() >= n).then_some(got)
        })
        .unwrap_or_else(|| {
            panic!(
                "expected {n} request(s) to {path} within {timeout:?}; the API saw {:#?}",
                self.requests()
            )
        })
    }

    /// Stops listening: from now on a connect to it is refused.
    pub fn stop(&mut self) {
        if let Some((thread, listener)) = self.acceptor.take() {
            self.shared.stopping.store(true, Ordering::SeqCst);
            // shutdown(2) on a listening socket wakes the blocked accept(2).
            // SAFETY: the fd belongs to `listener`, alive until after the join.
            unsafe {
                libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
            }
            let _ = thread.join();
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `Basic base64(key:secret)`, as the service expects the `Authorization` header.
pub fn basic_auth(key: &str, secret: &str) -> String {
    format!("Basic {}", base64(format!("{key}:{secret}").as_bytes()))
}

/// Standard base64 with padding (RFC 4648).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads one request, records it, answers it and closes.
fn serve(mut s: TcpStream, shared: &Shared) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if raw.len() > MAX_REQUEST {
            return Err(io::Error::other("request head too large"));
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::other("closed before the end of the head"));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let path = words.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if length > MAX_REQUEST {
        return Err(io::Error::other("request body too large"));
    }
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < length {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(length);
    let body = String::from_utf8_lossy(&body).into_owned();
    let recorded = Recorded {
        method,
        json: serde_json::from_str(&body).ok(),
        authorization: header("authorization"),
        content_type: header("content-type"),
        body,
        path: path.clone(),
        at: Instant::now(),
    };
    shared.requests.lock().expect("requests lock").push(recorded);
    let reply = {
        let mut script = shared.script.lock().expect("script lock");
        let queued = script
            .queued
            .get_mut(&path)
            .filter(|q| !q.is_empty())
            .map(|q| q.remove(0));
        queued.or_else(|| script.fallback.get(&path).cloned())
    };
    let (status, extra, body) = match reply {
        Some(r) => r.render(),
        None => (
            404,
            String::new(),
            serde_json::json!({"code": "NotFound", "message": format!("no script for {path}")}).to_string(),
        ),
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    };
    write!(
        s,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

/// The helper's own encoder against RFC 4648's test vectors.
#[test]
fn base64_matches_rfc_4648() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), encoded, "base64({plain:?})");
    }
    assert_eq!(
        basic_auth("Aladdin", "open sesame"),
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    );
}
