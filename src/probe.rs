//! `jumpgate check --probe`: what a database's first exchange says, from here.
//!
//! [`probe`] connects to one address and speaks only the first message of
//! the database's protocol, the one every client sends or reads before any
//! login: PostgreSQL's SSLRequest, MySQL's server greeting, SQL Server's TDS
//! PRELOGIN. The answer says whether a server of that kind is listening and
//! whether it offers TLS. No credentials, user name or database name are ever
//! sent, no TLS handshake is started, and the connection is closed right
//! after. The server may log that much: PostgreSQL with `ssl = on` logs
//! "could not accept SSL connection: EOF detected" (with `ssl = off`,
//! nothing); MySQL counts an aborted connection.
//!
//! This module does not resolve names, pick targets or decide exit codes:
//! `check` does, and prints each [`ProbeResult`] as one line.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// PostgreSQL SSLRequest: Int32 length 8, Int32 code 80877103 (1234 << 16 | 5679), big-endian.
const PG_SSL_REQUEST: [u8; 8] = [0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f];
/// More than PostgreSQL's one-byte answer is read so that a server that
/// speaks first (an SSH banner starts with `S` too) is not taken for one.
const PG_READ: usize = 64;

/// MySQL capability flag: the server can switch to TLS (SSLRequest).
const MYSQL_CLIENT_SSL: u32 = 0x0000_0800;
/// A greeting is under 100 bytes; an error packet's message a few hundred.
/// A larger length means this is not MySQL (e.g. `SSH-` read as a length).
const MYSQL_MAX_GREETING: usize = 4096;

/// TDS PRELOGIN sent to SQL Server, laid out like the sample in MS-TDS §4.1
/// (the options real drivers send), asking for no encryption so that the
/// answer states the server's own setting. All integers big-endian; option
/// offsets count from the start of the data, after the 8-byte header.
#[rustfmt::skip]
const TDS_PRELOGIN: [u8; 47] = [
    // Header: type 0x12 PRELOGIN, status 0x01 end of message, length 47,
    // SPID 0, packet id 1, window 0.
    0x12, 0x01, 0x00, 0x2f, 0x00, 0x00, 0x01, 0x00,
    // Option table: token, offset (2), length (2).
    0x00, 0x00, 0x1a, 0x00, 0x06, // VERSION    at 26, 6 bytes
    0x01, 0x00, 0x20, 0x00, 0x01, // ENCRYPTION at 32, 1 byte
    0x02, 0x00, 0x21, 0x00, 0x01, // INSTOPT    at 33, 1 byte
    0x03, 0x00, 0x22, 0x00, 0x04, // THREADID   at 34, 4 bytes
    0x04, 0x00, 0x26, 0x00, 0x01, // MARS       at 38, 1 byte
    0xff,                         // TERMINATOR
    // 26: our version 0.0.0, sub-build 0 (informational only).
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    // 32: ENCRYPT_OFF.
    0x00,
    // 33: instance name "" (NUL): whichever instance owns this port.
    0x00,
    // 34: client thread id 0.
    0x00, 0x00, 0x00, 0x00,
    // 38: MARS off.
    0x00,
];
/// TDS packet type of a server's reply ("tabular result").
const TDS_REPLY: u8 = 0x04;
/// A PRELOGIN reply is under 100 bytes; TDS packets are at most 32 KiB.
const TDS_MAX_REPLY: usize = 4096;
const TDS_VERSION: u8 = 0x00;
const TDS_ENCRYPTION: u8 = 0x01;
const TDS_TERMINATOR: u8 = 0xff;

/// The database protocol spoken at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Postgres,
    MySql,
    SqlServer,
    Unknown,
}

impl Protocol {
    /// By well-known port: 5432 Postgres, 3306 MySql, 1433 SqlServer, else Unknown.
    pub fn by_port(port: u16) -> Protocol {
        match port {
            5432 => Protocol::Postgres,
            3306 => Protocol::MySql,
            1433 => Protocol::SqlServer,
            _ => Protocol::Unknown,
        }
    }

    /// The product name, as the output line says it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Postgres => "PostgreSQL",
            Protocol::MySql => "MySQL",
            Protocol::SqlServer => "SQL Server",
            Protocol::Unknown => "unknown",
        }
    }
}

/// Whether the server offers TLS, as its first answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    Offered,
    NotOffered,
    Unknown,
}

/// What one probe found.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub addr: SocketAddr,
    /// Time to establish the TCP connection.
    pub connect_ms: u64,
    pub protocol: Protocol,
    /// Some(true): the server answered the protocol's first message as that
    /// protocol does (a MySQL error packet at greeting included). Some(false):
    /// connected, but the answer was something else, or the server closed
    /// without answering. None: no protocol was spoken ([`Protocol::Unknown`]).
    pub answered: Option<bool>,
    pub tls: Tls,
    /// What the server said, e.g. "MySQL 8.0.36 greeting, CLIENT_SSL set";
    /// text from the server is truncated and stripped of control characters.
    pub detail: String,
}

/// Why a probe has no result.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No TCP connection: refused, unreachable, or not established in time
    /// (then the error's kind is `TimedOut`).
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// Connected, but the server said nothing within the time allowed.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// Connects to `addr` (bounded by `timeout`), speaks only the protocol's first message, never sends credentials, closes.
///
/// `timeout` bounds the whole probe, connect and first exchange together.
pub async fn probe(addr: SocketAddr, protocol: Protocol, timeout: Duration) -> Result<ProbeResult, ProbeError> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start) + timeout;
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(ProbeError::Connect(e)),
        Err(_) => {
            return Err(ProbeError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {timeout:?}"),
            )));
        }
    };
    let connect_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    let exchange = async {
        match protocol {
            Protocol::Postgres => Some(postgres(&mut stream).await),
            Protocol::MySql => Some(mysql(&mut stream).await),
            Protocol::SqlServer => Some(sql_server(&mut stream).await),
            Protocol::Unknown => None,
        }
    };
    let answer = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?;
    drop(stream);
    let (answered, tls, detail) = match answer {
        None => (None, Tls::Unknown, String::new()),
        Some(Ok(a)) => (Some(a.answered), a.tls, a.detail),
        Some(Err(e)) => (Some(false), Tls::Unknown, broken(&e)),
    };
    Ok(ProbeResult {
        addr,
        connect_ms,
        protocol,
        answered,
        tls,
        detail,
    })
}

impl fmt::Display for ProbeResult {
    /// One line for `jumpgate check --probe`, e.g. "10.0.0.5:5432 connect 1 ms, PostgreSQL answers, TLS offered".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} connect {} ms, ", self.addr, self.connect_ms)?;
        match self.answered {
            None => f.write_str("port open, no protocol check for this port"),
            Some(false) => write!(f, "does not answer as {}: {}", self.protocol.name(), self.detail),
            Some(true) => {
                let tls = match self.tls {
                    Tls::Offered => "TLS offered",
                    Tls::NotOffered => "TLS not offered",
                    Tls::Unknown => "TLS unknown",
                };
                write!(f, "{} answers, {tls}", self.protocol.name())?;
                if !self.detail.is_empty() {
                    write!(f, " ({})", self.detail)?;
                }
                Ok(())
            }
        }
    }
}

/// The outcome of one protocol's first exchange.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    answered: bool,
    tls: Tls,
    detail: String,
}

impl Answer {
    fn yes(tls: Tls, detail: String) -> Answer {
        Answer {
            answered: true,
            tls,
            detail,
        }
    }

    fn no(detail: String) -> Answer {
        Answer {
            answered: false,
            tls: Tls::Unknown,
            detail,
        }
    }
}

/// The detail for a connection that broke during the exchange.
fn broken(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "closed the connection without answering".to_string(),
        _ => format!("connection failed after connect: {e}"),
    }
}

/// Sends SSLRequest and reads the answer; never starts TLS nor sends a startup packet.
async fn postgres(stream: &mut TcpStream) -> io::Result<Answer> {
    stream.write_all(&PG_SSL_REQUEST).await?;
    let mut buf = [0u8; PG_READ];
    let n = stream.read(&mut buf).await?;
    Ok(postgres_answer(&buf[..n]))
}

/// What the bytes read after an SSLRequest mean (empty: the server closed).
fn postgres_answer(bytes: &[u8]) -> Answer {
    match bytes {
        [] => Answer::no("closed the connection without answering".to_string()),
        [b'S'] => Answer::yes(Tls::Offered, "SSLRequest answered 'S'".to_string()),
        [b'N'] => Answer::yes(Tls::NotOffered, "SSLRequest answered 'N'".to_string()),
        other => Answer::no(format!("SSLRequest answered {}, not 'S' or 'N'", glimpse(other))),
    }
}

/// Reads the server's greeting packet; never replies to it.
async fn mysql(stream: &mut TcpStream) -> io::Result<Answer> {
    // Packet header: payload length (3 bytes, little-endian), sequence id.
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    if len == 0 || len > MYSQL_MAX_GREETING {
        return Ok(Answer::no(format!(
            "not a MySQL greeting: the server sent {}",
            glimpse(&header)
        )));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(mysql_greeting(&payload))
}

/// What a greeting packet's payload says: Protocol::HandshakeV10, or ERR_Packet.
fn mysql_greeting(payload: &[u8]) -> Answer {
    match payload.first() {
        Some(0x0a) => mysql_handshake_v10(&payload[1..])
            .unwrap_or_else(|| Answer::no("truncated MySQL greeting (protocol 10)".to_string())),
        Some(0xff) => mysql_error(&payload[1..])
            .unwrap_or_else(|| Answer::no("truncated MySQL error packet at greeting".to_string())),
        _ => Answer::no(format!("not a MySQL greeting: {}", glimpse(payload))),
    }
}

/// Protocol::HandshakeV10 after its protocol version byte:
/// server version (NUL-terminated), thread id (4), auth-plugin-data-part-1 (8),
/// filler (1), capability_flags_1 (2, LE), then, when present, character set (1),
/// status flags (2), capability_flags_2 (2, LE), and the rest (ignored).
fn mysql_handshake_v10(rest: &[u8]) -> Option<Answer> {
    let nul = rest.iter().position(|&b| b == 0)?;
    let version = &rest[..nul];
    let after = &rest[nul + 1..];
    let lower = after.get(13..15)?;
    let mut caps = u32::from(u16::from_le_bytes([lower[0], lower[1]]));
    // Servers before 4.1 end the packet after the lower flags.
    if let Some(upper) = after.get(18..20) {
        caps |= u32::from(u16::from_le_bytes([upper[0], upper[1]])) << 16;
    }
    // MariaDB prefixes "5.5.5-" so that old replication clients accept it.
    let version = text(version, 64);
    let version = version.strip_prefix("5.5.5-").unwrap_or(&version);
    let product = if version.contains("MariaDB") {
        "MariaDB"
    } else {
        "MySQL"
    };
    Some(if caps & MYSQL_CLIENT_SSL != 0 {
        Answer::yes(Tls::Offered, format!("{product} {version} greeting, CLIENT_SSL set"))
    } else {
        Answer::yes(
            Tls::NotOffered,
            format!("{product} {version} greeting, CLIENT_SSL not set"),
        )
    })
}

/// ERR_Packet after its 0xff header: error code (2, LE), then either
/// `#` + SQL state (5) + message (4.1 format) or the message alone: at
/// greeting the server does not know the client's format yet, and e.g.
/// "Host '...' is not allowed to connect" (1130) comes without a SQL state.
fn mysql_error(rest: &[u8]) -> Option<Answer> {
    let code = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]);
    let mut message = &rest[2..];
    if message.first() == Some(&b'#') && message.len() >= 6 {
        message = &message[6..];
    }
    Some(Answer::yes(
        Tls::Unknown,
        format!("MySQL error {code} at greeting: {}", text(message, 200)),
    ))
}

/// Sends PRELOGIN and reads the server's PRELOGIN reply; never logs in.
async fn sql_server(stream: &mut TcpStream) -> io::Result<Answer> {
    stream.write_all(&TDS_PRELOGIN).await?;
    // Header: type, status, length (2, BE, header included), SPID (2), packet id, window.
    let mut header = [0u8; 8];
    if let Err(e) = stream.read_exact(&mut header).await {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // SQL Server with strict encryption (TDS 8.0) wants TLS before any TDS.
            return Ok(Answer::no(
                "closed the connection without answering PRELOGIN \
                 (SQL Server with strict encryption, TDS 8.0, expects TLS first)"
                    .to_string(),
            ));
        }
        return Err(e);
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if header[0] != TDS_REPLY || !(8..=TDS_MAX_REPLY).contains(&len) {
        return Ok(Answer::no(format!(
            "not a TDS PRELOGIN reply: the server sent {}",
            glimpse(&header)
        )));
    }
    let mut data = vec![0u8; len - 8];
    stream.read_exact(&mut data).await?;
    Ok(prelogin_reply(&data))
}

/// What a PRELOGIN reply's data (after the 8-byte header) says: the option
/// table (token, offset (2, BE), length (2, BE))... 0xff, then the options.
/// VERSION is major (1), minor (1), build (2, BE), sub-build (2);
/// ENCRYPTION one byte.
fn prelogin_reply(data: &[u8]) -> Answer {
    let mut options = Vec::new();
    let mut i = 0;
    loop {
        let Some(&token) = data.get(i) else {
            return Answer::no("PRELOGIN reply without TERMINATOR".to_string());
        };
        if token == TDS_TERMINATOR {
            break;
        }
        let Some(entry) = data.get(i + 1..i + 5) else {
            return Answer::no("truncated PRELOGIN reply".to_string());
        };
        let offset = usize::from(u16::from_be_bytes([entry[0], entry[1]]));
        let len = usize::from(u16::from_be_bytes([entry[2], entry[3]]));
        options.push((token, offset, len));
        i += 5;
    }
    let mut version = None;
    let mut encryption = None;
    for (token, offset, len) in options {
        let Some(value) = data.get(offset..offset + len) else {
            return Answer::no(format!("PRELOGIN reply option 0x{token:02x} points outside the packet"));
        };
        match (token, value) {
            (TDS_VERSION, [major, minor, b0, b1, ..]) => {
                version = Some(format!("{major}.{minor}.{}", u16::from_be_bytes([*b0, *b1])));
            }
            (TDS_ENCRYPTION, [e, ..]) => encryption = Some(*e),
            _ => {}
        }
    }
    let server = match version {
        Some(v) => format!("SQL Server {v}"),
        None => "SQL Server".to_string(),
    };
    let (tls, what) = match encryption {
        None => return Answer::no("PRELOGIN reply without ENCRYPTION".to_string()),
        Some(0x00) => (Tls::Offered, "ENCRYPT_OFF, TLS for the login only".to_string()),
        Some(0x01) => (Tls::Offered, "ENCRYPT_ON".to_string()),
        Some(0x02) => (Tls::NotOffered, "ENCRYPT_NOT_SUP".to_string()),
        Some(0x03) => (Tls::Offered, "ENCRYPT_REQ, TLS required".to_string()),
        Some(other) => (Tls::Unknown, format!("ENCRYPTION 0x{other:02x} (unknown)")),
    };
    Answer::yes(tls, format!("{server} prelogin: {what}"))
}

/// Up to `max` characters of text from the server, control characters replaced.
fn text(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push_str("...");
    }
    out
}

/// The first bytes of an unexpected answer, escaped, for a detail message.
fn glimpse(bytes: &[u8]) -> String {
    const SHOWN: usize = 24;
    let more = if bytes.len() > SHOWN { "..." } else { "" };
    format!(
        "\"{}\"{more} ({} bytes)",
        bytes[..bytes.len().min(SHOWN)].escape_ascii(),
        bytes.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    const T: Duration = Duration::from_secs(5);

    /// A one-connection server on 127.0.0.1:0: reads exactly `expect.len()`
    /// bytes and checks them, writes `reply`, then reads until the client
    /// closes and returns whatever else the client sent (must be nothing).
    async fn fake(expect: &'static [u8], reply: Vec<u8>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = vec![0u8; expect.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, expect, "first message");
            s.write_all(&reply).await.unwrap();
            let mut rest = Vec::new();
            // A reset instead of a FIN is fine: the client closed either way.
            let _ = s.read_to_end(&mut rest).await;
            rest
        });
        (addr, task)
    }

    /// A MySQL packet: payload length (3, LE), sequence id 0, payload.
    fn mysql_packet(payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_le_bytes();
        let mut p = vec![len[0], len[1], len[2], 0x00];
        p.extend_from_slice(payload);
        p
    }

    /// The payload of a MySQL 8.0.36 Protocol::HandshakeV10 greeting (74 bytes),
    /// as the server sends it, with or without CLIENT_SSL.
    fn mysql8_greeting(ssl: bool) -> Vec<u8> {
        let mut p = vec![0x0a]; // protocol version 10
        p.extend_from_slice(b"8.0.36\0"); // server version, NUL-terminated
        p.extend_from_slice(&[0x0c, 0x00, 0x00, 0x00]); // thread id 12
        p.extend_from_slice(&[0x1b, 0x3f, 0x52, 0x29, 0x0e, 0x6d, 0x4c, 0x07]); // auth-plugin-data-part-1
        p.push(0x00); // filler
        // capability_flags_1 (LE): 0xffff, or 0xf7ff without CLIENT_SSL (0x0800).
        p.extend_from_slice(if ssl { &[0xff, 0xff] } else { &[0xff, 0xf7] });
        p.push(0xff); // character set 255, utf8mb4_0900_ai_ci
        p.extend_from_slice(&[0x02, 0x00]); // status flags: SERVER_STATUS_AUTOCOMMIT
        p.extend_from_slice(&[0xff, 0xdf]); // capability_flags_2 (LE): 0xdfff, CLIENT_PLUGIN_AUTH set
        p.push(21); // auth_plugin_data_len
        p.extend_from_slice(&[0x00; 10]); // reserved
        // auth-plugin-data-part-2: max(13, 21 - 8) = 13 bytes, the last a NUL.
        p.extend_from_slice(&[
            0x13, 0x5a, 0x21, 0x6b, 0x0f, 0x7e, 0x44, 0x30, 0x61, 0x1c, 0x25, 0x58, 0x00,
        ]);
        p.extend_from_slice(b"caching_sha2_password\0"); // auth_plugin_name
        assert_eq!(p.len(), 74, "layout of the canned greeting");
        p
    }

    /// ERR_Packet as MySQL sends it at greeting to a host it does not admit:
    /// 0xff, error code 1130 (LE), message without SQL state.
    fn mysql_host_not_allowed() -> Vec<u8> {
        let mut p = vec![0xff, 0x6a, 0x04];
        p.extend_from_slice(b"Host '127.0.0.1' is not allowed to connect to this MySQL server");
        p
    }

    /// A PRELOGIN reply as SQL Server 2019 (15.0.2000) sends it, with the
    /// given ENCRYPTION value.
    #[rustfmt::skip]
    fn tds_reply(encryption: u8) -> Vec<u8> {
        vec![
            // Header: type 0x04 reply, status 0x01 end of message, length 43,
            // SPID 0, packet id 1, window 0.
            0x04, 0x01, 0x00, 0x2b, 0x00, 0x00, 0x01, 0x00,
            0x00, 0x00, 0x1a, 0x00, 0x06, // VERSION    at 26, 6 bytes
            0x01, 0x00, 0x20, 0x00, 0x01, // ENCRYPTION at 32, 1 byte
            0x02, 0x00, 0x21, 0x00, 0x01, // INSTOPT    at 33, 1 byte
            0x03, 0x00, 0x22, 0x00, 0x00, // THREADID   at 34, empty in a reply
            0x04, 0x00, 0x22, 0x00, 0x01, // MARS       at 34, 1 byte
            0xff,                         // TERMINATOR
            0x0f, 0x00, 0x07, 0xd0, 0x00, 0x00, // 26: version 15.0.2000, sub-build 0
            encryption,                         // 32
            0x00,                               // 33: instance matches
            0x00,                               // 34: MARS off
        ]
    }

    #[test]
    fn protocol_by_port() {
        let rows = [
            (5432, Protocol::Postgres),
            (3306, Protocol::MySql),
            (1433, Protocol::SqlServer),
            (15432, Protocol::Unknown),
            (22, Protocol::Unknown),
            (0, Protocol::Unknown),
        ];
        for (port, expected) in rows {
            assert_eq!(Protocol::by_port(port), expected, "port {port}");
        }
    }

    #[test]
    fn canned_packets_are_self_consistent() {
        let len = usize::from(u16::from_be_bytes([TDS_PRELOGIN[2], TDS_PRELOGIN[3]]));
        assert_eq!(len, TDS_PRELOGIN.len(), "PRELOGIN length field");
        let reply = tds_reply(0);
        let len = usize::from(u16::from_be_bytes([reply[2], reply[3]]));
        assert_eq!(len, reply.len(), "reply length field");
        // Our request, parsed as a reply would be, says ENCRYPT_OFF and version 0.0.0.
        assert_eq!(
            prelogin_reply(&TDS_PRELOGIN[8..]).detail,
            "SQL Server 0.0.0 prelogin: ENCRYPT_OFF, TLS for the login only"
        );
        assert_eq!(u32::from_be_bytes([0x04, 0xd2, 0x16, 0x2f]), 80877103);
    }

    #[test]
    fn postgres_answers() {
        let rows: &[(&str, &[u8], bool, Tls)] = &[
            ("S offers TLS", b"S", true, Tls::Offered),
            ("N does not", b"N", true, Tls::NotOffered),
            ("closed", b"", false, Tls::Unknown),
            ("other byte", b"E", false, Tls::Unknown),
            (
                "SSH banner starts with S",
                b"SSH-2.0-OpenSSH_9.6\r\n",
                false,
                Tls::Unknown,
            ),
            ("S followed by more", b"SN", false, Tls::Unknown),
        ];
        for (what, bytes, answered, tls) in rows {
            let a = postgres_answer(bytes);
            assert_eq!((a.answered, &a.tls), (*answered, tls), "{what}: {}", a.detail);
        }
    }

    #[test]
    fn mysql_greetings() {
        let mut v41_error = vec![0xff, 0x10, 0x04, b'#'];
        v41_error.extend_from_slice(b"08004Too many connections");
        let mut mariadb = vec![0x0a];
        mariadb.extend_from_slice(b"5.5.5-10.11.6-MariaDB\0");
        mariadb.extend_from_slice(&mysql8_greeting(true)[8..]);
        let mut pre41 = mysql8_greeting(false);
        pre41.truncate(1 + 7 + 15); // ends after capability_flags_1
        let rows: Vec<(&str, Vec<u8>, bool, Tls, &str)> = vec![
            (
                "8.0 with TLS",
                mysql8_greeting(true),
                true,
                Tls::Offered,
                "MySQL 8.0.36 greeting, CLIENT_SSL set",
            ),
            (
                "8.0 without TLS",
                mysql8_greeting(false),
                true,
                Tls::NotOffered,
                "MySQL 8.0.36 greeting, CLIENT_SSL not set",
            ),
            (
                "MariaDB",
                mariadb,
                true,
                Tls::Offered,
                "MariaDB 10.11.6-MariaDB greeting, CLIENT_SSL set",
            ),
            (
                "lower flags only",
                pre41,
                true,
                Tls::NotOffered,
                "MySQL 8.0.36 greeting, CLIENT_SSL not set",
            ),
            (
                "host not allowed",
                mysql_host_not_allowed(),
                true,
                Tls::Unknown,
                "MySQL error 1130 at greeting: Host '127.0.0.1' is not allowed to connect to this MySQL server",
            ),
            (
                "4.1 error with SQL state",
                v41_error,
                true,
                Tls::Unknown,
                "MySQL error 1040 at greeting: Too many connections",
            ),
            (
                "truncated greeting",
                mysql8_greeting(true)[..12].to_vec(),
                false,
                Tls::Unknown,
                "truncated MySQL greeting (protocol 10)",
            ),
            (
                "truncated error",
                vec![0xff, 0x6a],
                false,
                Tls::Unknown,
                "truncated MySQL error packet at greeting",
            ),
            (
                "protocol 9",
                vec![0x09, b'3', 0],
                false,
                Tls::Unknown,
                "not a MySQL greeting: \"\\t3\\x00\" (3 bytes)",
            ),
        ];
        for (what, payload, answered, tls, detail) in rows {
            let a = mysql_greeting(&payload);
            assert_eq!(
                a,
                Answer {
                    answered,
                    tls,
                    detail: detail.to_string()
                },
                "{what}"
            );
        }
    }

    #[test]
    fn prelogin_replies() {
        let mut no_encryption = tds_reply(0);
        no_encryption[13] = 0x05; // ENCRYPTION's token becomes TRACEID
        let mut outside = tds_reply(0);
        outside[15] = 0x40; // ENCRYPTION's offset (low byte) past the end
        let rows: Vec<(&str, Vec<u8>, bool, Tls, &str)> = vec![
            (
                "off",
                tds_reply(0x00),
                true,
                Tls::Offered,
                "SQL Server 15.0.2000 prelogin: ENCRYPT_OFF, TLS for the login only",
            ),
            (
                "on",
                tds_reply(0x01),
                true,
                Tls::Offered,
                "SQL Server 15.0.2000 prelogin: ENCRYPT_ON",
            ),
            (
                "not supported",
                tds_reply(0x02),
                true,
                Tls::NotOffered,
                "SQL Server 15.0.2000 prelogin: ENCRYPT_NOT_SUP",
            ),
            (
                "required",
                tds_reply(0x03),
                true,
                Tls::Offered,
                "SQL Server 15.0.2000 prelogin: ENCRYPT_REQ, TLS required",
            ),
            (
                "unknown value",
                tds_reply(0x42),
                true,
                Tls::Unknown,
                "SQL Server 15.0.2000 prelogin: ENCRYPTION 0x42 (unknown)",
            ),
            (
                "no ENCRYPTION",
                no_encryption,
                false,
                Tls::Unknown,
                "PRELOGIN reply without ENCRYPTION",
            ),
            (
                "offset outside",
                outside,
                false,
                Tls::Unknown,
                "PRELOGIN reply option 0x01 points outside the packet",
            ),
            (
                "no terminator",
                tds_reply(0)[..18].to_vec(),
                false,
                Tls::Unknown,
                "PRELOGIN reply without TERMINATOR",
            ),
            (
                "truncated table",
                tds_reply(0)[..10].to_vec(),
                false,
                Tls::Unknown,
                "truncated PRELOGIN reply",
            ),
        ];
        for (what, packet, answered, tls, detail) in rows {
            let a = prelogin_reply(&packet[8..]);
            assert_eq!(
                a,
                Answer {
                    answered,
                    tls,
                    detail: detail.to_string()
                },
                "{what}"
            );
        }
    }

    #[test]
    fn server_text_is_truncated_and_has_no_control_characters() {
        assert_eq!(text(b"a\x1b[31mb\r\n", 64), "a?[31mb??");
        assert_eq!(text(b"abcdef", 3), "abc...");
        assert_eq!(text(b"caf\xc3\xa9", 64), "café");
    }

    #[test]
    fn display_lines() {
        let result = |protocol, answered, tls, detail: &str| ProbeResult {
            addr: "10.0.0.5:5432".parse().unwrap(),
            connect_ms: 1,
            protocol,
            answered,
            tls,
            detail: detail.to_string(),
        };
        let rows = [
            (
                result(Protocol::Postgres, Some(true), Tls::Offered, ""),
                "10.0.0.5:5432 connect 1 ms, PostgreSQL answers, TLS offered",
            ),
            (
                result(
                    Protocol::MySql,
                    Some(true),
                    Tls::NotOffered,
                    "MySQL 8.0.36 greeting, CLIENT_SSL not set",
                ),
                "10.0.0.5:5432 connect 1 ms, MySQL answers, TLS not offered \
                 (MySQL 8.0.36 greeting, CLIENT_SSL not set)",
            ),
            (
                result(
                    Protocol::SqlServer,
                    Some(false),
                    Tls::Unknown,
                    "closed the connection without answering",
                ),
                "10.0.0.5:5432 connect 1 ms, does not answer as SQL Server: \
                 closed the connection without answering",
            ),
            (
                result(Protocol::Unknown, None, Tls::Unknown, ""),
                "10.0.0.5:5432 connect 1 ms, port open, no protocol check for this port",
            ),
        ];
        for (r, line) in rows {
            assert_eq!(r.to_string(), line);
        }
    }

    #[tokio::test]
    async fn postgres_probe_reads_tls_offer_and_sends_nothing_more() {
        for (reply, tls) in [(b'S', Tls::Offered), (b'N', Tls::NotOffered)] {
            let (addr, server) = fake(&PG_SSL_REQUEST, vec![reply]).await;
            let r = probe(addr, Protocol::Postgres, T).await.unwrap();
            assert_eq!((r.answered, &r.tls), (Some(true), &tls), "{r}");
            assert_eq!(r.protocol, Protocol::Postgres);
            assert_eq!(r.addr, addr);
            assert_eq!(server.await.unwrap(), b"", "no startup packet after SSLRequest");
        }
    }

    #[tokio::test]
    async fn mysql_probe_reads_greeting_and_never_replies() {
        let rows = [
            (mysql8_greeting(true), Some(true), Tls::Offered),
            (mysql8_greeting(false), Some(true), Tls::NotOffered),
            (mysql_host_not_allowed(), Some(true), Tls::Unknown),
        ];
        for (payload, answered, tls) in rows {
            let (addr, server) = fake(b"", mysql_packet(&payload)).await;
            let r = probe(addr, Protocol::MySql, T).await.unwrap();
            assert_eq!((r.answered, &r.tls), (answered, &tls), "{r}");
            assert_eq!(server.await.unwrap(), b"", "no handshake response");
        }
    }

    #[tokio::test]
    async fn sql_server_probe_reads_prelogin_encryption() {
        let rows = [
            (0x00, Tls::Offered),
            (0x01, Tls::Offered),
            (0x02, Tls::NotOffered),
            (0x03, Tls::Offered),
        ];
        for (encryption, tls) in rows {
            let (addr, server) = fake(&TDS_PRELOGIN, tds_reply(encryption)).await;
            let r = probe(addr, Protocol::SqlServer, T).await.unwrap();
            assert_eq!((r.answered, &r.tls), (Some(true), &tls), "{r}");
            assert_eq!(server.await.unwrap(), b"", "no LOGIN7 after PRELOGIN");
        }
    }

    #[tokio::test]
    async fn server_closing_at_once_did_not_answer() {
        for protocol in [Protocol::Postgres, Protocol::MySql, Protocol::SqlServer] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                drop(s);
            });
            let r = probe(addr, protocol, T).await.unwrap();
            assert_eq!(r.answered, Some(false), "{r}");
            assert_eq!(r.tls, Tls::Unknown);
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn wrong_server_behind_the_port_does_not_answer() {
        // An SSH server speaks first; its banner is neither 'S' nor a MySQL length.
        let banner = b"SSH-2.0-OpenSSH_9.6\r\n".to_vec();
        for protocol in [Protocol::Postgres, Protocol::MySql] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let banner = banner.clone();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(&banner).await.unwrap();
                let _ = s.read_to_end(&mut Vec::new()).await;
            });
            let r = probe(addr, protocol, T).await.unwrap();
            assert_eq!(r.answered, Some(false), "{r}");
            assert!(r.detail.contains("SSH-"), "{r}");
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let short = Duration::from_millis(200);
        for protocol in [Protocol::Postgres, Protocol::MySql, Protocol::SqlServer] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                // Reads what the probe sends, says nothing, until the probe gives up.
                let _ = s.read_to_end(&mut Vec::new()).await;
            });
            let err = probe(addr, protocol, short).await.unwrap_err();
            assert!(matches!(err, ProbeError::Timeout(d) if d == short), "{err}");
            assert_eq!(err.to_string(), "no answer within 200ms");
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn closed_port_cannot_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = probe(addr, Protocol::Postgres, T).await.unwrap_err();
        match err {
            ProbeError::Connect(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!("expected a connect error, got {other}"),
        }
    }

    #[tokio::test]
    async fn unknown_protocol_only_connects() {
        let (addr, server) = fake(b"", Vec::new()).await;
        let r = probe(addr, Protocol::Unknown, T).await.unwrap();
        assert_eq!((r.answered, &r.tls), (None, &Tls::Unknown));
        assert_eq!(server.await.unwrap(), b"", "nothing sent");
    }
}
