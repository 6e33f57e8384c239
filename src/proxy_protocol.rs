//! PROXY protocol v1 and v2 headers (haproxy's `proxy-protocol.txt`), as an
//! NLB or HAProxy puts them in front of a connection: [`parse`] reads one
//! from bytes, [`read_header`] takes exactly one off a fresh connection and
//! leaves what follows (the SSH banner, the database's bytes) in the socket.
//!
//! This module owns the wire format only. Whether a listener expects a
//! header, what the client address is then used for (`allowed_sources`,
//! `from=`, the audit log) and the `proxy_protocol_rejected_total` counter
//! belong to the roles.
//!
//! Strict on purpose: the header is believed only because a load balancer
//! wrote it, so anything one would not send (double spaces, signs or
//! leading zeros in a port, an address of the wrong family, a v2 header over
//! [`V2_MAX_BODY_LEN`] bytes, a TLV running past the header, a wrong
//! CRC32C) is refused rather than guessed at. A prefix that can no longer
//! become a valid header is refused as soon as it is seen, so a client
//! cannot hold a connection open by trickling bytes of a broken one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A client on a proxy_protocol listener must send its header within this
/// (every listener's).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What every v1 header starts with.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// Longest v1 line, CRLF included: the spec's worst case,
/// `PROXY UNKNOWN` followed by two full-width IPv6 addresses and two ports.
pub const V1_MAX_LEN: usize = 107;
/// What every v2 header starts with.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol, 2-byte length.
const V2_FIXED_LEN: usize = 16;
/// Largest v2 address-and-TLV block accepted: Unix socket addresses (216
/// bytes) with room for the TLVs a load balancer adds (AWS's VPC endpoint id
/// is about 25). A bigger one is refused rather than buffered.
pub const V2_MAX_BODY_LEN: usize = 512;
/// Most bytes a header can take: [`parse`] decides on any buffer this long.
pub const MAX_HEADER_LEN: usize = V2_FIXED_LEN + V2_MAX_BODY_LEN;

/// v2 TLV types and subtypes we read; every other type is skipped.
const PP2_TYPE_CRC32C: u8 = 0x03;
const PP2_TYPE_AWS: u8 = 0xEA;
const PP2_SUBTYPE_AWS_VPCE_ID: u8 = 0x01;

/// What a PROXY header says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// The client the load balancer accepted. `None` for v1 `UNKNOWN`, a v2
    /// `LOCAL` command (the load balancer's own health check), v2 `AF_UNSPEC`
    /// and v2 `AF_UNIX`: the connection's peer address stands then.
    pub source: Option<SocketAddr>,
    /// The address the client connected to on the load balancer; `None` when
    /// `source` is.
    pub destination: Option<SocketAddr>,
    /// The VPC endpoint id (`vpce-...`) a PrivateLink connection came
    /// through: v2 TLV `PP2_TYPE_AWS` (0xEA), subtype
    /// `PP2_SUBTYPE_AWS_VPCE_ID` (0x01). Printable ASCII, checked.
    pub aws_vpce_id: Option<String>,
}

/// Why a connection has no usable PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The first bytes are neither the v1 nor the v2 signature.
    #[error("no PROXY protocol header (the connection starts with something else)")]
    NotProxy,
    /// The peer closed the connection before the header was complete.
    #[error("connection closed before the PROXY protocol header was complete")]
    Truncated,
    /// The bytes can never become a valid header; the reason never quotes them.
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    /// No complete header arrived in the time allowed.
    #[error("no complete PROXY protocol header in time")]
    Timeout,
    /// Reading the socket failed.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(reason: impl Into<String>) -> ProxyError {
    ProxyError::Invalid(reason.into())
}

/// Parses a header at the start of `buf`: `Ok(Some((header, consumed_len)))`
/// when complete, `Ok(None)` when more bytes are needed (and could still form
/// a valid header), `Err` when it can never be valid. Bytes after
/// `consumed_len` are the connection's own and are not looked at.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if buf.starts_with(V2_SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(V1_SIGNATURE) {
        parse_v1(buf)
    } else if V2_SIGNATURE.starts_with(buf) || V1_SIGNATURE.starts_with(buf) {
        Ok(None)
    } else {
        Err(ProxyError::NotProxy)
    }
}

/// Reads exactly one header from a fresh connection without consuming any
/// byte after it, bounded by `timeout`: the SSH banner or database bytes that
/// follow stay in the socket. After an error the connection is only fit to
/// be dropped: the bytes of a broken header may have been read.
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> Result<Header, ProxyError> {
    tokio::time::timeout(timeout, read_header_now(stream))
        .await
        .map_err(|_| ProxyError::Timeout)?
}

async fn read_header_now(stream: &mut TcpStream) -> Result<Header, ProxyError> {
    let mut buf = [0u8; MAX_HEADER_LEN];
    // Bytes already taken off the socket: always a strict prefix of the header.
    let mut taken = 0;
    loop {
        // `peek` returns at once while unread bytes wait in the socket, so the
        // bytes of an incomplete header are taken off before peeking again
        // (they are all header bytes): the next peek then waits for new data
        // instead of spinning on the same bytes. `taken` stays below
        // MAX_HEADER_LEN because `parse` decides on any buffer that long.
        let peeked = stream.peek(&mut buf[taken..]).await?;
        if peeked == 0 {
            return Err(ProxyError::Truncated);
        }
        let seen = taken + peeked;
        match parse(&buf[..seen])? {
            Some((header, len)) => {
                let rest = buf
                    .get_mut(taken..len)
                    .ok_or_else(|| invalid("header ended inside bytes already read"))?;
                stream.read_exact(rest).await?;
                return Ok(header);
            }
            None => {
                stream.read_exact(&mut buf[taken..seen]).await?;
                taken = seen;
            }
        }
    }
}

/// The address family a v1 `TCP4` / `TCP6` line promises.
#[derive(Clone, Copy)]
enum V1Family {
    Tcp4,
    Tcp6,
}

/// `buf` starts with `PROXY `.
fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let too_long = || invalid(format!("v1 line longer than {V1_MAX_LEN} bytes"));
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let line_end = window.iter().position(|&b| b == b'\r' || b == b'\n');
    // The signature holds no CR or LF, so a line end lies after it.
    let line = match line_end {
        Some(at) if window[at] == b'\n' => return Err(invalid("v1 line ends in LF without CR")),
        // The CRLF counts towards the 107 bytes too.
        Some(at) if at + 2 > V1_MAX_LEN => return Err(too_long()),
        Some(at) => &buf[V1_SIGNATURE.len()..at],
        None if buf.len() >= V1_MAX_LEN => return Err(too_long()),
        None => &buf[V1_SIGNATURE.len()..],
    };
    let header = v1_line(line, line_end.is_some())?;
    let (Some(header), Some(cr)) = (header, line_end) else {
        return Ok(None);
    };
    match buf.get(cr + 1) {
        Some(b'\n') => Ok(Some((header, cr + 2))),
        Some(_) => Err(invalid("v1 line has a CR not followed by LF")),
        None => Ok(None),
    }
}

/// Checks the text between `PROXY ` and the CR. Until the CR has arrived
/// (`complete` false) only the fields so far are checked, the last one as the
/// prefix of a valid field, and `Ok(None)` says they still can be.
fn v1_line(line: &[u8], complete: bool) -> Result<Option<Header>, ProxyError> {
    let (protocol, rest) = match line.iter().position(|&b| b == b' ') {
        Some(space) => (&line[..space], Some(&line[space + 1..])),
        None => (line, None),
    };
    if !complete && rest.is_none() {
        let known: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
        if known.iter().any(|p| p.starts_with(protocol)) {
            return Ok(None);
        }
    }
    let family = match protocol {
        // The spec has the receiver ignore whatever follows UNKNOWN.
        b"UNKNOWN" => return Ok(complete.then(Header::default)),
        b"TCP4" => V1Family::Tcp4,
        b"TCP6" => V1Family::Tcp6,
        b"" => return Err(invalid("v1 fields must be separated by single spaces")),
        _ => return Err(invalid("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let Some(rest) = rest else {
        return Err(invalid("v1 TCP4/TCP6 line without addresses and ports"));
    };
    // Source address, destination address, source port, destination port,
    // checked in order so the first fault is the one reported.
    let mut ips = [None; 2];
    let mut ports = [None; 2];
    let mut fields = rest.split(|&b| b == b' ').enumerate().peekable();
    while let Some((i, field)) = fields.next() {
        // A field followed by a space is finished; only the last may still grow.
        let finished = complete || fields.peek().is_some();
        if finished && field.is_empty() {
            return Err(invalid("v1 fields must be separated by single spaces"));
        }
        match i {
            0 | 1 if finished => ips[i] = Some(v1_ip(field, family)?),
            0 | 1 => v1_ip_prefix(field, family)?,
            2 | 3 => ports[i - 2] = v1_port(field)?,
            _ => return Err(invalid("v1 line has more than four fields after the protocol")),
        }
    }
    if !complete {
        return Ok(None);
    }
    match (ips, ports) {
        ([Some(src), Some(dst)], [Some(sport), Some(dport)]) => Ok(Some(Header {
            source: Some(SocketAddr::new(src, sport)),
            destination: Some(SocketAddr::new(dst, dport)),
            aws_vpce_id: None,
        })),
        _ => Err(invalid("v1 line is missing addresses or ports")),
    }
}

fn v1_ip(field: &[u8], family: V1Family) -> Result<IpAddr, ProxyError> {
    let text = std::str::from_utf8(field).unwrap_or_default();
    // std's parsers take exactly the textual forms the spec allows: dotted
    // quads without leading zeros, RFC 4291 IPv6 without zone or brackets.
    match family {
        V1Family::Tcp4 => text
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| invalid("v1 TCP4 address is not a dotted-quad IPv4 address")),
        V1Family::Tcp6 => text
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| invalid("v1 TCP6 address is not an IPv6 address")),
    }
}

/// Could `field` still grow into an address of `family`?
fn v1_ip_prefix(field: &[u8], family: V1Family) -> Result<(), ProxyError> {
    let fits = match family {
        V1Family::Tcp4 => field.len() <= 15 && field.iter().all(|&b| b.is_ascii_digit() || b == b'.'),
        V1Family::Tcp6 => field.len() <= 45 && field.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
    };
    if fits {
        Ok(())
    } else {
        // Same reason as when the field is finished.
        v1_ip(b"", family).map(|_| ())
    }
}

/// A v1 port so far: decimal digits, no sign, no leading zero, at most
/// 65535; `None` while it is empty.
fn v1_port(field: &[u8]) -> Result<Option<u16>, ProxyError> {
    let bad = || invalid("v1 port is not a decimal number from 0 to 65535 without leading zeros");
    if field.len() > 5 || (field.len() > 1 && field[0] == b'0') {
        return Err(bad());
    }
    let mut value = 0u32;
    for &b in field {
        if !b.is_ascii_digit() {
            return Err(bad());
        }
        value = value * 10 + u32::from(b - b'0');
    }
    if field.is_empty() {
        return Ok(None);
    }
    u16::try_from(value).map(Some).map_err(|_| bad())
}

/// Where a v2 header's addresses come from.
#[derive(Clone, Copy, PartialEq)]
enum V2Addresses {
    /// `LOCAL`, or `PROXY` with `AF_UNSPEC`: the whole block is skipped.
    Ignored,
    /// TCP over IPv4: 4 + 4 address bytes, 2 + 2 port bytes.
    Inet,
    /// TCP over IPv6: 16 + 16 address bytes, 2 + 2 port bytes.
    Inet6,
    /// A stream Unix socket: two 108-byte paths, no use to us.
    Unix,
}

impl V2Addresses {
    fn len(self) -> usize {
        match self {
            Self::Ignored => 0,
            Self::Inet => 12,
            Self::Inet6 => 36,
            Self::Unix => 216,
        }
    }

    /// `block` holds at least `self.len()` bytes.
    fn read(self, block: &[u8]) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let port = |at: usize| u16::from_be_bytes(array(block, at));
        match self {
            Self::Ignored | Self::Unix => (None, None),
            Self::Inet => (
                Some(SocketAddr::new(Ipv4Addr::from(array::<4>(block, 0)).into(), port(8))),
                Some(SocketAddr::new(Ipv4Addr::from(array::<4>(block, 4)).into(), port(10))),
            ),
            Self::Inet6 => (
                Some(SocketAddr::new(Ipv6Addr::from(array::<16>(block, 0)).into(), port(32))),
                Some(SocketAddr::new(Ipv6Addr::from(array::<16>(block, 16)).into(), port(34))),
            ),
        }
    }
}

/// `N` bytes of `bytes` from `at`; the caller has checked they are there.
fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// `buf` starts with the v2 signature.
fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let Some(&version_command) = buf.get(12) else {
        return Ok(None);
    };
    if version_command >> 4 != 2 {
        return Err(invalid(format!("v2 version {} is not 2", version_command >> 4)));
    }
    let local = match version_command & 0x0f {
        0x0 => true,
        0x1 => false,
        other => return Err(invalid(format!("v2 command {other:#x} is neither LOCAL nor PROXY"))),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // The spec has the receiver of LOCAL ignore the family and the block.
    let addresses = match family {
        _ if local => V2Addresses::Ignored,
        0x00 => V2Addresses::Ignored,
        0x11 => V2Addresses::Inet,
        0x21 => V2Addresses::Inet6,
        0x31 => V2Addresses::Unix,
        other => {
            return Err(invalid(format!(
                "v2 family/protocol {other:#04x} is not TCP over IPv4 or IPv6, a Unix stream or UNSPEC"
            )));
        }
    };
    let Some(&[high, low]) = buf.get(14..16) else {
        return Ok(None);
    };
    let body_len = usize::from(u16::from_be_bytes([high, low]));
    if body_len > V2_MAX_BODY_LEN {
        return Err(invalid(format!("v2 length {body_len} is over {V2_MAX_BODY_LEN}")));
    }
    let address_len = addresses.len();
    if body_len < address_len {
        return Err(invalid(format!(
            "v2 length {body_len} is shorter than its {address_len} address bytes"
        )));
    }
    let total = V2_FIXED_LEN + body_len;
    let body = &buf[V2_FIXED_LEN..buf.len().min(total)];
    if addresses == V2Addresses::Ignored {
        return Ok((buf.len() >= total).then(|| (Header::default(), total)));
    }
    let tlvs = v2_tlvs(
        body.get(address_len..).unwrap_or_default(),
        body_len - address_len,
        V2_FIXED_LEN + address_len,
    )?;
    if buf.len() < total {
        return Ok(None);
    }
    if let Some((at, expected)) = tlvs.crc32c {
        // The checksum covers the whole header with its own value zeroed.
        let zeroed = buf[..total]
            .iter()
            .enumerate()
            .map(|(i, &b)| if (at..at + 4).contains(&i) { 0 } else { b });
        if crc32c(zeroed) != expected {
            return Err(invalid("v2 CRC32C does not match the header"));
        }
    }
    let (source, destination) = addresses.read(body);
    Ok(Some((
        Header {
            source,
            destination,
            aws_vpce_id: tlvs.aws_vpce_id,
        },
        total,
    )))
}

/// What the TLVs of a v2 header told us.
#[derive(Default)]
struct Tlvs {
    aws_vpce_id: Option<String>,
    /// Offset of the CRC32C value in the header, and the value.
    crc32c: Option<(usize, u32)>,
}

/// Walks the TLVs in `region`, the part received so far of a TLV block that
/// is `declared` bytes long and starts `offset` bytes into the header. TLVs
/// not yet complete are left for the next call; one that cannot fit the
/// block is refused at once.
fn v2_tlvs(region: &[u8], declared: usize, offset: usize) -> Result<Tlvs, ProxyError> {
    let mut found = Tlvs::default();
    let mut at = 0;
    while at < declared {
        if declared - at < 3 {
            return Err(invalid("v2 header ends inside a TLV's type and length"));
        }
        let Some(&[kind, high, low]) = region.get(at..at + 3) else {
            break;
        };
        let value_at = at + 3;
        let end = value_at + usize::from(u16::from_be_bytes([high, low]));
        if end > declared {
            return Err(invalid("v2 TLV runs past the end of the header"));
        }
        let Some(value) = region.get(value_at..end) else {
            break;
        };
        match kind {
            PP2_TYPE_CRC32C => {
                let sum = <[u8; 4]>::try_from(value).map_err(|_| invalid("v2 CRC32C TLV is not 4 bytes long"))?;
                if found
                    .crc32c
                    .replace((offset + value_at, u32::from_be_bytes(sum)))
                    .is_some()
                {
                    return Err(invalid("v2 header has two CRC32C TLVs"));
                }
            }
            PP2_TYPE_AWS => {
                let Some((&subtype, id)) = value.split_first() else {
                    return Err(invalid("v2 AWS TLV has no subtype"));
                };
                if subtype == PP2_SUBTYPE_AWS_VPCE_ID {
                    // It goes into logs: printable ASCII only.
                    if id.is_empty() || !id.iter().all(u8::is_ascii_graphic) {
                        return Err(invalid("v2 AWS VPC endpoint id is empty or not printable ASCII"));
                    }
                    let id = String::from_utf8_lossy(id).into_owned();
                    if found.aws_vpce_id.replace(id).is_some() {
                        return Err(invalid("v2 header has two AWS VPC endpoint ids"));
                    }
                }
            }
            // NOOP padding, ALPN, TLS details, other vendors': not ours to read.
            _ => {}
        }
        at = end;
    }
    Ok(found)
}

/// CRC-32C (Castagnoli), as the v2 `PP2_TYPE_CRC32C` TLV carries it. Bitwise:
/// it runs over at most one header per connection.
fn crc32c(bytes: impl IntoIterator<Item = u8>) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;
    use std::net::SocketAddrV6;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    // ---- builders ----

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn header(src: &str, dst: &str) -> Header {
        Header {
            source: addr(src),
            destination: addr(dst),
            aws_vpce_id: None,
        }
    }

    fn with_vpce(mut h: Header, id: &str) -> Header {
        h.aws_vpce_id = Some(id.to_owned());
        h
    }

    /// A v2 header: version 2, `command`, `family`, the length of `body`, `body`.
    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        v2_len(command, family, u16::try_from(body.len()).unwrap(), body)
    }

    /// A v2 header whose length field says `len` whatever `body` holds.
    fn v2_len(command: u8, family: u8, len: u16, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn inet(src: &str, dst: &str) -> Vec<u8> {
        let (s, d): (SocketAddrV4, SocketAddrV4) = (src.parse().unwrap(), dst.parse().unwrap());
        [
            &s.ip().octets()[..],
            &d.ip().octets(),
            &s.port().to_be_bytes(),
            &d.port().to_be_bytes(),
        ]
        .concat()
    }

    fn inet6(src: &str, dst: &str) -> Vec<u8> {
        let (s, d): (SocketAddrV6, SocketAddrV6) = (src.parse().unwrap(), dst.parse().unwrap());
        [
            &s.ip().octets()[..],
            &d.ip().octets(),
            &s.port().to_be_bytes(),
            &d.port().to_be_bytes(),
        ]
        .concat()
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    fn aws(subtype: u8, id: &[u8]) -> Vec<u8> {
        tlv(PP2_TYPE_AWS, &[&[subtype][..], id].concat())
    }

    /// `header` with a CRC32C TLV appended (length fixed up) holding its checksum, plus `delta`.
    fn with_crc(header: &[u8], delta: u32) -> Vec<u8> {
        let mut out = header.to_vec();
        let at = out.len() + 3;
        out.extend_from_slice(&tlv(PP2_TYPE_CRC32C, &[0; 4]));
        let len = u16::try_from(out.len() - V2_FIXED_LEN).unwrap();
        out[14..16].copy_from_slice(&len.to_be_bytes());
        let sum = crc32c(out.iter().copied()).wrapping_add(delta);
        out[at..at + 4].copy_from_slice(&sum.to_be_bytes());
        out
    }

    const VPCE: &str = "vpce-08d2bf15fac5001c9";
    const FULL6: &str = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";

    fn v1_unknown_of_len(len: usize) -> Vec<u8> {
        let mut out = b"PROXY UNKNOWN ".to_vec();
        out.resize(len - 2, b'x');
        out.extend_from_slice(b"\r\n");
        out
    }

    // ---- valid headers ----

    /// (what, bytes, what they say)
    fn valid_rows() -> Vec<(&'static str, Vec<u8>, Header)> {
        let ip4 = || header("192.0.2.1:56324", "198.51.100.7:22");
        let ip6 = || header("[2001:db8::1]:56324", "[2001:db8:ffff::7]:5432");
        vec![
            (
                "v1 TCP4",
                b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 22\r\n".to_vec(),
                ip4(),
            ),
            (
                "v1 TCP6",
                b"PROXY TCP6 2001:db8::1 2001:db8:ffff::7 56324 5432\r\n".to_vec(),
                ip6(),
            ),
            (
                "v1 TCP6 IPv4-mapped",
                b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n".to_vec(),
                header("[::ffff:192.0.2.1]:1", "[::1]:2"),
            ),
            (
                "v1 TCP6 widest addresses and ports",
                format!("PROXY TCP6 {FULL6} {FULL6} 65535 65535\r\n").into_bytes(),
                header(&format!("[{FULL6}]:65535"), &format!("[{FULL6}]:65535")),
            ),
            (
                "v1 TCP4 ports zero",
                b"PROXY TCP4 0.0.0.0 255.255.255.255 0 0\r\n".to_vec(),
                header("0.0.0.0:0", "255.255.255.255:0"),
            ),
            ("v1 UNKNOWN bare", b"PROXY UNKNOWN\r\n".to_vec(), Header::default()),
            (
                "v1 UNKNOWN with addresses",
                b"PROXY UNKNOWN 192.0.2.1 198.51.100.7 56324 22\r\n".to_vec(),
                Header::default(),
            ),
            (
                "v1 UNKNOWN with anything",
                b"PROXY UNKNOWN  \x01 anything\tat  all \xff\r\n".to_vec(),
                Header::default(),
            ),
            (
                "v1 UNKNOWN worst case, exactly 107 bytes",
                format!("PROXY UNKNOWN {FULL6} {FULL6} 65535 65535\r\n").into_bytes(),
                Header::default(),
            ),
            ("v1 107 bytes", v1_unknown_of_len(107), Header::default()),
            (
                "v2 IPv4",
                v2(1, 0x11, &inet("192.0.2.1:56324", "198.51.100.7:22")),
                ip4(),
            ),
            (
                "v2 IPv6",
                v2(1, 0x21, &inet6("[2001:db8::1]:56324", "[2001:db8:ffff::7]:5432")),
                ip6(),
            ),
            ("v2 LOCAL", v2(0, 0x00, &[]), Header::default()),
            (
                "v2 LOCAL ignores its family and addresses",
                v2(0, 0x11, &inet("192.0.2.1:56324", "198.51.100.7:22")),
                Header::default(),
            ),
            (
                "v2 LOCAL ignores an unknown family",
                v2(0, 0xff, &[1, 2, 3]),
                Header::default(),
            ),
            ("v2 UNSPEC", v2(1, 0x00, &[]), Header::default()),
            ("v2 UNSPEC ignores its block", v2(1, 0x00, &[9; 20]), Header::default()),
            ("v2 Unix stream", v2(1, 0x31, &[b'/'; 216]), Header::default()),
            (
                "v2 Unix stream with AWS TLV",
                v2(1, 0x31, &[&[0u8; 216][..], &aws(1, VPCE.as_bytes())].concat()),
                with_vpce(Header::default(), VPCE),
            ),
            (
                "v2 IPv4 + unknown TLV + AWS TLV",
                v2(
                    1,
                    0x11,
                    &[
                        inet("192.0.2.1:56324", "198.51.100.7:22"),
                        tlv(0x30, b"netns"),
                        aws(PP2_SUBTYPE_AWS_VPCE_ID, VPCE.as_bytes()),
                    ]
                    .concat(),
                ),
                with_vpce(ip4(), VPCE),
            ),
            (
                "v2 IPv6 + AWS TLV + NOOP padding + empty TLV",
                v2(
                    1,
                    0x21,
                    &[
                        inet6("[2001:db8::1]:56324", "[2001:db8:ffff::7]:5432"),
                        aws(PP2_SUBTYPE_AWS_VPCE_ID, VPCE.as_bytes()),
                        tlv(0x04, &[0; 7]),
                        tlv(0x01, b""),
                    ]
                    .concat(),
                ),
                with_vpce(ip6(), VPCE),
            ),
            (
                "v2 other AWS subtype is skipped",
                v2(
                    1,
                    0x11,
                    &[
                        inet("192.0.2.1:56324", "198.51.100.7:22"),
                        aws(0x02, b"\x00\x01whatever"),
                    ]
                    .concat(),
                ),
                ip4(),
            ),
            (
                "v2 TLS TLV with sub-TLVs is skipped",
                v2(
                    1,
                    0x11,
                    &[
                        inet("192.0.2.1:56324", "198.51.100.7:22"),
                        tlv(0x20, &[&[0x07, 0, 0, 0, 0][..], &tlv(0x21, b"TLSv1.3")].concat()),
                    ]
                    .concat(),
                ),
                ip4(),
            ),
            (
                "v2 IPv4 + CRC32C",
                with_crc(&v2(1, 0x11, &inet("192.0.2.1:56324", "198.51.100.7:22")), 0),
                ip4(),
            ),
            (
                "v2 at the length cap",
                v2(
                    1,
                    0x11,
                    &[
                        inet("192.0.2.1:56324", "198.51.100.7:22"),
                        tlv(0x04, &[0; V2_MAX_BODY_LEN - 12 - 3]),
                    ]
                    .concat(),
                ),
                ip4(),
            ),
        ]
    }

    #[test]
    fn valid_headers_parse_and_leave_what_follows() {
        for (what, bytes, want) in valid_rows() {
            let got = parse(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(got, Some((want.clone(), bytes.len())), "{what}");
            let followed = [&bytes[..], b"SSH-2.0-OpenSSH_9.6\r\n"].concat();
            let got = parse(&followed).unwrap_or_else(|e| panic!("{what} + banner: {e}"));
            assert_eq!(got, Some((want, bytes.len())), "{what} + banner");
        }
    }

    #[test]
    fn every_prefix_of_a_valid_header_asks_for_more() {
        for (what, bytes, _) in valid_rows() {
            for len in 0..bytes.len() {
                match parse(&bytes[..len]) {
                    Ok(None) => {}
                    other => panic!("{what}: prefix of {len} bytes: {other:?}"),
                }
            }
        }
    }

    // ---- invalid headers ----

    enum Want {
        NotProxy,
        /// `Invalid` whose reason contains this.
        Invalid(&'static str),
    }

    fn invalid_rows() -> Vec<(&'static str, Vec<u8>, Want)> {
        use Want::{Invalid, NotProxy};
        let ip4 = || inet("192.0.2.1:56324", "198.51.100.7:22");
        let b = |s: &str| s.as_bytes().to_vec();
        vec![
            // Not a PROXY header at all.
            ("SSH banner", b("SSH-2.0-OpenSSH_9.6\r\n"), NotProxy),
            ("PostgreSQL SSLRequest", vec![0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f], NotProxy),
            ("HTTP", b("GET / HTTP/1.1\r\n"), NotProxy),
            ("lowercase proxy", b("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), NotProxy),
            ("PROXY without its space", b("PROXYTCP4"), NotProxy),
            ("v1 signature cut by other byte", b("PROX\r\n"), NotProxy),
            (
                "v2 bad signature",
                [&b"\r\n\r\n\0\r\nQUIT\r"[..], &[0x21, 0x11, 0, 12], &ip4()].concat(),
                NotProxy,
            ),
            ("v2 signature cut by other byte", b("\r\n\r\nX"), NotProxy),
            // v1, bad family or protocol.
            ("v1 TCP5", b("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"), Invalid("protocol")),
            (
                "v1 lowercase tcp4",
                b("PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
                Invalid("protocol"),
            ),
            ("v1 UDP4", b("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"), Invalid("protocol")),
            ("v1 UNKNOWNX", b("PROXY UNKNOWNX\r\n"), Invalid("protocol")),
            ("v1 TCP5 before CRLF", b("PROXY TCP5"), Invalid("protocol")),
            (
                "v1 TCP4 without fields",
                b("PROXY TCP4\r\n"),
                Invalid("without addresses"),
            ),
            ("v1 empty protocol", b("PROXY \r\n"), Invalid("single spaces")),
            // v1, line ends.
            (
                "v1 LF only",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
                Invalid("LF without CR"),
            ),
            (
                "v1 CR then other byte",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"),
                Invalid("CR not followed"),
            ),
            ("v1 CR CR LF", b("PROXY UNKNOWN\r\r\n"), Invalid("CR not followed")),
            (
                "v1 LF inside UNKNOWN",
                b("PROXY UNKNOWN a\nb\r\n"),
                Invalid("LF without CR"),
            ),
            (
                "v1 no CRLF in 107 bytes",
                b(&format!("PROXY UNKNOWN {}", "x".repeat(93))),
                Invalid("longer than"),
            ),
            ("v1 CRLF at 108 bytes", v1_unknown_of_len(108), Invalid("longer than")),
            (
                "v1 CR at byte 107",
                v1_unknown_of_len(108)[..107].to_vec(),
                Invalid("longer than"),
            ),
            ("v1 much too long", v1_unknown_of_len(300), Invalid("longer than")),
            // v1, ports.
            (
                "v1 port 65536",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
                Invalid("port"),
            ),
            (
                "v1 port 99999",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),
                Invalid("port"),
            ),
            (
                "v1 port six digits",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n"),
                Invalid("port"),
            ),
            (
                "v1 port with plus",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n"),
                Invalid("port"),
            ),
            (
                "v1 port negative",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
                Invalid("port"),
            ),
            (
                "v1 port leading zero",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n"),
                Invalid("port"),
            ),
            ("v1 port 00", b("PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n"), Invalid("port")),
            (
                "v1 port hex",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n"),
                Invalid("port"),
            ),
            (
                "v1 port with letter",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 8a 2\r\n"),
                Invalid("port"),
            ),
            (
                "v1 port too big before CRLF",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1 65536"),
                Invalid("port"),
            ),
            // v1, spaces and field counts.
            (
                "v1 two spaces after PROXY",
                b("PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
                Invalid("single spaces"),
            ),
            (
                "v1 two spaces after TCP4",
                b("PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
                Invalid("single spaces"),
            ),
            (
                "v1 two spaces between ports",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n"),
                Invalid("single spaces"),
            ),
            (
                "v1 trailing space",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
                Invalid("single spaces"),
            ),
            (
                "v1 space after the last port before CRLF",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 "),
                Invalid("more than four"),
            ),
            (
                "v1 tab separator",
                b("PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n"),
                Invalid("address"),
            ),
            (
                "v1 two spaces before CRLF",
                b("PROXY TCP4 1.2.3.4  "),
                Invalid("single spaces"),
            ),
            (
                "v1 missing port",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
                Invalid("missing"),
            ),
            (
                "v1 missing both ports",
                b("PROXY TCP4 1.2.3.4 5.6.7.8\r\n"),
                Invalid("missing"),
            ),
            (
                "v1 fifth field",
                b("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
                Invalid("more than four"),
            ),
            // v1, addresses.
            (
                "v1 IPv6 under TCP4",
                b("PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n"),
                Invalid("TCP4 address"),
            ),
            (
                "v1 IPv4 under TCP6",
                b("PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"),
                Invalid("TCP6 address"),
            ),
            (
                "v1 IPv6 destination under TCP4",
                b("PROXY TCP4 1.2.3.4 ::1 1 2\r\n"),
                Invalid("TCP4 address"),
            ),
            (
                "v1 IPv4 leading zero",
                b("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
                Invalid("TCP4 address"),
            ),
            (
                "v1 IPv4 octet 256",
                b("PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
                Invalid("TCP4 address"),
            ),
            (
                "v1 IPv4 three octets",
                b("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"),
                Invalid("TCP4 address"),
            ),
            (
                "v1 IPv4 as a name",
                b("PROXY TCP4 localhost 5.6.7.8 1 2\r\n"),
                Invalid("TCP4 address"),
            ),
            (
                "v1 IPv6 in brackets",
                b("PROXY TCP6 [::1] ::1 1 2\r\n"),
                Invalid("TCP6 address"),
            ),
            (
                "v1 IPv6 with zone",
                b("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
                Invalid("TCP6 address"),
            ),
            (
                "v1 IPv6 letter before CRLF",
                b("PROXY TCP6 fe80::g"),
                Invalid("TCP6 address"),
            ),
            (
                "v1 IPv4 letter before CRLF",
                b("PROXY TCP4 1.2.3.4x"),
                Invalid("TCP4 address"),
            ),
            (
                "v1 IPv4 too long before CRLF",
                b("PROXY TCP4 1111.2222.3333.44"),
                Invalid("TCP4 address"),
            ),
            // v2, fixed part.
            (
                "v2 version 1",
                v2_len(0, 0, 0, &[])
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| if i == 12 { 0x11 } else { b })
                    .collect(),
                Invalid("version 1"),
            ),
            ("v2 version 3", [V2_SIGNATURE, &[0x31]].concat(), Invalid("version 3")),
            (
                "v2 version 0 LOCAL",
                [V2_SIGNATURE, &[0x00, 0x00, 0, 0]].concat(),
                Invalid("version 0"),
            ),
            ("v2 command 2", v2(2, 0x11, &ip4()), Invalid("command 0x2")),
            (
                "v2 command 15",
                [V2_SIGNATURE, &[0x2f]].concat(),
                Invalid("command 0xf"),
            ),
            ("v2 UDP over IPv4", v2(1, 0x12, &ip4()), Invalid("family")),
            ("v2 UDP over IPv6", v2(1, 0x22, &[0; 36]), Invalid("family")),
            ("v2 Unix datagram", v2(1, 0x32, &[0; 216]), Invalid("family")),
            ("v2 IPv4 without protocol", v2(1, 0x10, &ip4()), Invalid("family")),
            ("v2 family 4", v2(1, 0x41, &ip4()), Invalid("family")),
            (
                "v2 bad family before length",
                [V2_SIGNATURE, &[0x21, 0x13]].concat(),
                Invalid("family"),
            ),
            // v2, lengths.
            (
                "v2 length 513",
                v2(1, 0x11, &[&ip4()[..], &tlv(0x04, &[0; 498])].concat()),
                Invalid("length 513"),
            ),
            (
                "v2 length 65535, no body yet",
                v2_len(1, 0x11, 0xffff, &[]),
                Invalid("length 65535"),
            ),
            (
                "v2 LOCAL length 513, no body yet",
                v2_len(0, 0x00, 513, &[]),
                Invalid("length 513"),
            ),
            ("v2 IPv4 length 11", v2(1, 0x11, &ip4()[..11]), Invalid("address bytes")),
            ("v2 IPv6 length 12", v2(1, 0x21, &ip4()), Invalid("address bytes")),
            ("v2 Unix length 215", v2(1, 0x31, &[0; 215]), Invalid("address bytes")),
            // v2, TLVs.
            (
                "v2 TLV length overflow",
                v2(1, 0x11, &[&ip4()[..], &[0x04, 0, 5, 0, 0]].concat()),
                Invalid("runs past"),
            ),
            (
                "v2 TLV length overflow before the body arrives",
                v2_len(1, 0x11, 12 + 4, &[&ip4()[..], &[0x04, 0, 2]].concat()),
                Invalid("runs past"),
            ),
            (
                "v2 TLV length 65535",
                v2(1, 0x11, &[&ip4()[..], &[0xEA, 0xff, 0xff, 1]].concat()),
                Invalid("runs past"),
            ),
            (
                "v2 second TLV overflows",
                v2(1, 0x11, &[&ip4()[..], &tlv(0x04, &[0; 3]), &[0x30, 0, 9, 1]].concat()),
                Invalid("runs past"),
            ),
            (
                "v2 one byte after addresses",
                v2(1, 0x11, &[&ip4()[..], &[0x04]].concat()),
                Invalid("inside a TLV"),
            ),
            (
                "v2 two bytes after the last TLV",
                v2(1, 0x11, &[&ip4()[..], &tlv(0x04, b"ab"), &[0x04, 0]].concat()),
                Invalid("inside a TLV"),
            ),
            (
                "v2 AWS TLV empty",
                v2(1, 0x11, &[&ip4()[..], &tlv(0xEA, b"")].concat()),
                Invalid("no subtype"),
            ),
            (
                "v2 AWS VPCE id empty",
                v2(1, 0x11, &[&ip4()[..], &aws(1, b"")].concat()),
                Invalid("VPC endpoint"),
            ),
            (
                "v2 AWS VPCE id with a newline",
                v2(1, 0x11, &[&ip4()[..], &aws(1, b"vpce-1\nforged log line")].concat()),
                Invalid("VPC endpoint"),
            ),
            (
                "v2 AWS VPCE id with a space",
                v2(1, 0x11, &[&ip4()[..], &aws(1, b"vpce 1")].concat()),
                Invalid("VPC endpoint"),
            ),
            (
                "v2 AWS VPCE id not ASCII",
                v2(1, 0x11, &[&ip4()[..], &aws(1, "vpce-é".as_bytes())].concat()),
                Invalid("VPC endpoint"),
            ),
            (
                "v2 two AWS VPCE ids",
                v2(1, 0x11, &[&ip4()[..], &aws(1, b"vpce-1"), &aws(1, b"vpce-2")].concat()),
                Invalid("two AWS"),
            ),
            (
                "v2 CRC32C wrong",
                with_crc(&v2(1, 0x11, &ip4()), 1),
                Invalid("CRC32C does not match"),
            ),
            (
                "v2 CRC32C of a changed header",
                {
                    let mut h = with_crc(&v2(1, 0x11, &ip4()), 0);
                    h[V2_FIXED_LEN] ^= 1;
                    h
                },
                Invalid("CRC32C does not match"),
            ),
            (
                "v2 CRC32C TLV of 3 bytes",
                v2(1, 0x11, &[&ip4()[..], &tlv(PP2_TYPE_CRC32C, &[0; 3])].concat()),
                Invalid("not 4 bytes"),
            ),
            (
                "v2 two CRC32C TLVs",
                v2(
                    1,
                    0x11,
                    &[
                        &ip4()[..],
                        &tlv(PP2_TYPE_CRC32C, &[0; 4]),
                        &tlv(PP2_TYPE_CRC32C, &[0; 4]),
                    ]
                    .concat(),
                ),
                Invalid("two CRC32C"),
            ),
        ]
    }

    #[test]
    fn invalid_headers_are_refused_and_stay_refused() {
        for (what, bytes, want) in invalid_rows() {
            match (parse(&bytes), &want) {
                (Err(ProxyError::NotProxy), Want::NotProxy) => {}
                (Err(ProxyError::Invalid(reason)), Want::Invalid(part)) => {
                    assert!(reason.contains(part), "{what}: reason {reason:?} lacks {part:?}");
                }
                (got, _) => panic!("{what}: got {got:?}"),
            }
            // Once refused, no further bytes make it valid (a later fault may be named).
            let extended = [&bytes[..], b"\r\n", &[0; 600]].concat();
            match (parse(&extended), &want) {
                (Err(ProxyError::NotProxy), Want::NotProxy) | (Err(ProxyError::Invalid(_)), Want::Invalid(_)) => {}
                (got, _) => panic!("{what}, extended: got {got:?}"),
            }
        }
    }

    #[test]
    fn crc32c_matches_the_check_value() {
        assert_eq!(crc32c(*b"123456789"), 0xE306_9283);
        assert_eq!(crc32c([]), 0);
    }

    #[test]
    fn error_messages_say_what_failed() {
        let e = parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid PROXY protocol header: v1 port is not a decimal number from 0 to 65535 without leading zeros"
        );
        assert_eq!(
            ProxyError::NotProxy.to_string(),
            "no PROXY protocol header (the connection starts with something else)"
        );
    }

    // ---- read_header over real sockets ----

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        let a = a.unwrap();
        a.set_nodelay(true).unwrap();
        (a, b.unwrap().0)
    }

    const BANNER: &[u8] = b"SSH-2.0-OpenSSH_9.6\r\n";
    const WAIT: Duration = Duration::from_secs(10);

    /// Sends `header` then the banner, one byte at a time with pauses when
    /// `trickle`, else in one write; checks `read_header` gets `want` and
    /// leaves the banner in the socket.
    async fn header_then_banner(header: Vec<u8>, want: Header, trickle: bool) {
        let (mut client, mut server) = pair().await;
        let writer = tokio::spawn(async move {
            if trickle {
                for b in &header {
                    client.write_all(&[*b]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                client.write_all(BANNER).await.unwrap();
            } else {
                client.write_all(&[&header[..], BANNER].concat()).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        let got = read_header(&mut server, WAIT).await.unwrap();
        assert_eq!(got, want);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, BANNER, "the bytes after the header are still there");
        drop(writer.await.unwrap());
    }

    fn aws_v2() -> (Vec<u8>, Header) {
        let h = v2(
            1,
            0x11,
            &[
                inet("203.0.113.9:40000", "10.0.0.5:2222"),
                aws(PP2_SUBTYPE_AWS_VPCE_ID, VPCE.as_bytes()),
            ]
            .concat(),
        );
        (h, with_vpce(header("203.0.113.9:40000", "10.0.0.5:2222"), VPCE))
    }

    #[tokio::test]
    async fn v2_header_in_one_write_leaves_the_banner() {
        let (h, want) = aws_v2();
        header_then_banner(h, want, false).await;
    }

    #[tokio::test]
    async fn v1_header_in_one_write_leaves_the_banner() {
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 22\r\n".to_vec();
        header_then_banner(h, header("[2001:db8::1]:40000", "[2001:db8::2]:22"), false).await;
    }

    #[tokio::test]
    async fn v1_header_byte_by_byte_leaves_the_banner() {
        let h = b"PROXY TCP4 203.0.113.9 10.0.0.5 40000 2222\r\n".to_vec();
        header_then_banner(h, header("203.0.113.9:40000", "10.0.0.5:2222"), true).await;
    }

    #[tokio::test]
    async fn v2_header_byte_by_byte_leaves_the_banner() {
        let (h, want) = aws_v2();
        header_then_banner(h, want, true).await;
    }

    #[tokio::test]
    async fn v2_local_health_check_has_no_source() {
        header_then_banner(v2(0, 0, &[]), Header::default(), true).await;
    }

    #[tokio::test]
    async fn silence_times_out() {
        let (_client, mut server) = pair().await;
        let started = std::time::Instant::now();
        let err = read_header(&mut server, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, ProxyError::Timeout), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn half_a_header_then_silence_times_out() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        let err = read_header(&mut server, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, ProxyError::Timeout), "{err:?}");
    }

    #[tokio::test]
    async fn close_inside_the_header_is_truncated() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2.3.4 ").await.unwrap();
        client.shutdown().await.unwrap();
        let err = read_header(&mut server, WAIT).await.unwrap_err();
        assert!(matches!(err, ProxyError::Truncated), "{err:?}");
    }

    #[tokio::test]
    async fn close_before_any_byte_is_truncated() {
        let (client, mut server) = pair().await;
        drop(client);
        let err = read_header(&mut server, WAIT).await.unwrap_err();
        assert!(matches!(err, ProxyError::Truncated), "{err:?}");
    }

    #[tokio::test]
    async fn banner_without_header_is_not_proxy_and_not_consumed() {
        let (mut client, mut server) = pair().await;
        client.write_all(BANNER).await.unwrap();
        client.shutdown().await.unwrap();
        let err = read_header(&mut server, WAIT).await.unwrap_err();
        assert!(matches!(err, ProxyError::NotProxy), "{err:?}");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, BANNER);
    }

    #[tokio::test]
    async fn broken_header_arriving_slowly_is_refused_early() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2.3.4  ").await.unwrap();
        // No CRLF ever comes: the double space alone decides.
        let err = read_header(&mut server, WAIT).await.unwrap_err();
        assert!(matches!(err, ProxyError::Invalid(_)), "{err:?}");
    }

    // ---- deterministic fuzzing ----

    /// xorshift64: deterministic, no crate.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            self.next_u64() as u8
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.byte()).collect()
        }

        fn chance(&mut self, one_in: usize) -> bool {
            self.below(one_in) == 0
        }
    }

    /// A random valid header and what it says.
    fn random_valid(rng: &mut Rng) -> (Vec<u8>, Header) {
        let v4 = |rng: &mut Rng| SocketAddr::new(Ipv4Addr::from(rng.next_u64() as u32).into(), rng.next_u64() as u16);
        let v6 = |rng: &mut Rng| {
            let ip = Ipv6Addr::from(u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()));
            // Runs of zero groups, so `::` forms come up too.
            let ip = if rng.chance(2) {
                Ipv6Addr::from(u128::from(ip) & (u128::MAX << (16 * rng.below(8))))
            } else {
                ip
            };
            SocketAddr::new(ip.into(), rng.next_u64() as u16)
        };
        let v1 = |proto: &str, s: SocketAddr, d: SocketAddr| {
            let line = format!("PROXY {proto} {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port());
            let h = Header {
                source: Some(s),
                destination: Some(d),
                aws_vpce_id: None,
            };
            (line.into_bytes(), h)
        };
        match rng.below(6) {
            0 => {
                let (s, d) = (v4(rng), v4(rng));
                v1("TCP4", s, d)
            }
            1 => {
                let (s, d) = (v6(rng), v6(rng));
                v1("TCP6", s, d)
            }
            2 => {
                let mut line = b"PROXY UNKNOWN".to_vec();
                if rng.chance(2) {
                    line.push(b' ');
                    let n = rng.below(V1_MAX_LEN - line.len() - 1);
                    line.extend((0..n).map(|_| {
                        loop {
                            let b = rng.byte();
                            if b != b'\r' && b != b'\n' {
                                break b;
                            }
                        }
                    }));
                }
                line.extend_from_slice(b"\r\n");
                (line, Header::default())
            }
            3 | 4 => {
                let (family, mut body, source, destination) = if rng.chance(2) {
                    let (s, d) = (v4(rng), v4(rng));
                    let (SocketAddr::V4(s4), SocketAddr::V4(d4)) = (s, d) else {
                        unreachable!()
                    };
                    (0x11, inet(&s4.to_string(), &d4.to_string()), s, d)
                } else {
                    let (s, d) = (v6(rng), v6(rng));
                    let (SocketAddr::V6(s6), SocketAddr::V6(d6)) = (s, d) else {
                        unreachable!()
                    };
                    (0x21, inet6(&s6.to_string(), &d6.to_string()), s, d)
                };
                let mut vpce = None;
                for _ in 0..rng.below(5) {
                    let kind = match rng.byte() {
                        PP2_TYPE_AWS | PP2_TYPE_CRC32C => 0x04,
                        k => k,
                    };
                    let n = rng.below(40);
                    let value = rng.bytes(n);
                    body.extend_from_slice(&tlv(kind, &value));
                }
                if rng.chance(2) {
                    let id = format!("vpce-{:017x}", rng.next_u64() >> 0x8);
                    body.extend_from_slice(&aws(PP2_SUBTYPE_AWS_VPCE_ID, id.as_bytes()));
                    vpce = Some(id);
                }
                let h = Header {
                    source: Some(source),
                    destination: Some(destination),
                    aws_vpce_id: vpce,
                };
                let bytes = v2(1, family, &body);
                (if rng.chance(4) { with_crc(&bytes, 0) } else { bytes }, h)
            }
            _ => {
                let (command, family) = if rng.chance(2) { (0, rng.byte()) } else { (1, 0x00) };
                let n = rng.below(64);
                (v2(command, family, &rng.bytes(n)), Header::default())
            }
        }
    }

    const INTERESTING: &[u8] = b" \r\n\x00:.0159afAF+-PROXYTCP46UNKNOWN\x21\x11\xea\x01\x03\xff";

    fn mutate(rng: &mut Rng, buf: &mut Vec<u8>) {
        for _ in 0..=rng.below(4) {
            match rng.below(7) {
                0 if !buf.is_empty() => {
                    let i = rng.below(buf.len());
                    buf[i] ^= 1 << rng.below(8);
                }
                1 if !buf.is_empty() => {
                    let i = rng.below(buf.len());
                    buf[i] = INTERESTING[rng.below(INTERESTING.len())];
                }
                2 => buf.truncate(rng.below(buf.len() + 1)),
                3 => {
                    let n = rng.below(64);
                    buf.extend(rng.bytes(n));
                }
                4 => {
                    let i = rng.below(buf.len() + 1);
                    buf.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
                }
                5 if !buf.is_empty() => {
                    buf.remove(rng.below(buf.len()));
                }
                // The v2 length field, or a TLV length soon after it.
                _ if buf.len() > 16 => {
                    let i = if rng.chance(2) {
                        14
                    } else {
                        16 + rng.below(buf.len() - 16)
                    };
                    let value = [rng.byte(), rng.byte()];
                    for (k, v) in value.into_iter().enumerate() {
                        if let Some(b) = buf.get_mut(i + k) {
                            *b = v;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The properties every answer of `parse` must have.
    fn check(rng: &mut Rng, buf: &[u8], prefixes_checked: &mut usize) {
        match parse(buf) {
            Ok(Some((header, n))) => {
                assert!(n > 0 && n <= buf.len(), "consumed {n} of {} bytes: {buf:?}", buf.len());
                assert!(n <= MAX_HEADER_LEN);
                let again = parse(&buf[..n]).unwrap();
                assert_eq!(again, Some((header.clone(), n)), "the header alone: {buf:?}");
                if let Some(id) = &header.aws_vpce_id {
                    assert!(id.bytes().all(|b| b.is_ascii_graphic()));
                }
                if rng.chance(8) {
                    *prefixes_checked += 1;
                    for k in 0..n {
                        assert!(matches!(parse(&buf[..k]), Ok(None)), "prefix {k} of {buf:?}");
                    }
                }
            }
            Ok(None) => {
                assert!(
                    buf.len() < MAX_HEADER_LEN,
                    "undecided after {} bytes: {buf:?}",
                    buf.len()
                );
                let head = V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)])
                    || V1_SIGNATURE.starts_with(&buf[..buf.len().min(6)]);
                assert!(head, "asks for more without a signature: {buf:?}");
            }
            Err(ProxyError::NotProxy | ProxyError::Invalid(_)) => {
                let mut more = buf.to_vec();
                let n = rng.below(64);
                more.extend(rng.bytes(n));
                assert!(parse(&more).is_err(), "refused, then accepted with more bytes: {buf:?}");
            }
            Err(e) => panic!("parse never gives {e:?}"),
        }
    }

    #[test]
    fn fuzz_never_panics_and_stays_consistent() {
        const ROUNDS: usize = 100_000;
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let rows: Vec<Vec<u8>> = valid_rows().into_iter().map(|(_, b, _)| b).collect();
        let (mut parsed, mut asked, mut refused, mut prefixes) = (0, 0, 0, 0);
        for round in 0..ROUNDS {
            let buf = match round % 5 {
                // Noise.
                0 => {
                    let n = rng.below(600);
                    rng.bytes(n)
                }
                // Noise after a signature.
                1 => {
                    let mut buf = if rng.chance(2) {
                        V2_SIGNATURE.to_vec()
                    } else {
                        V1_SIGNATURE.to_vec()
                    };
                    let n = rng.below(600);
                    buf.extend(rng.bytes(n));
                    if buf[0] == b'\r' && rng.chance(2) {
                        buf.truncate(12);
                        buf.extend_from_slice(&[0x20 | rng.below(2) as u8, [0x00, 0x11, 0x21, 0x31][rng.below(4)]]);
                        buf.extend_from_slice(&u16::try_from(rng.below(600)).unwrap().to_be_bytes());
                        let n = rng.below(600);
                        buf.extend(rng.bytes(n));
                    }
                    buf
                }
                // A random valid header, followed by payload: must parse to exactly what it says.
                2 => {
                    let (mut bytes, want) = random_valid(&mut rng);
                    let len = bytes.len();
                    let n = rng.below(32);
                    bytes.extend(rng.bytes(n));
                    let got = parse(&bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}"));
                    assert_eq!(got, Some((want, len)), "{bytes:?}");
                    bytes
                }
                // A mutated table row or random valid header.
                _ => {
                    let mut bytes = if rng.chance(2) {
                        rows[rng.below(rows.len())].clone()
                    } else {
                        random_valid(&mut rng).0
                    };
                    mutate(&mut rng, &mut bytes);
                    bytes
                }
            };
            check(&mut rng, &buf, &mut prefixes);
            match parse(&buf) {
                Ok(Some(_)) => parsed += 1,
                Ok(None) => asked += 1,
                Err(_) => refused += 1,
            }
        }
        // The generator reaches every outcome, so the properties were exercised.
        assert!(parsed > ROUNDS / 5, "parsed {parsed}");
        assert!(asked > ROUNDS / 100, "asked for more {asked}");
        assert!(refused > ROUNDS / 5, "refused {refused}");
        assert!(prefixes > 1_000, "prefix walks {prefixes}");
    }
}
