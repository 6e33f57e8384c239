//! OpenSSH `authorized_keys` files: the keys a user may log in with and
//! the options that restrict each key.
//!
//! Pure apart from [`load`], which reads one file. This module says which
//! keys exist and what their options mean; the SSH handler decides with
//! them ([`AuthorizedKey::admits`] at login, `crate::policy` for channels).
//!
//! Fail closed: a line with an option jumpgate does not understand, a
//! malformed option value or a key it cannot use is skipped whole, with a
//! warning naming the file and line, never half-honoured (a skipped
//! `command=` key must not become a key without a forced command).
//!
//! Semantics follow sshd(8) (auth-options.c, match.c, addrmatch.c), with
//! three deliberate differences, all fail-closed or neutral:
//! - `from=` is matched against the client's IP address only: there is no
//!   reverse DNS (as with sshd's default `UseDNS no`), so host-name
//!   patterns such as `*.example.com` never match.
//! - `expiry-time=` is always read as UTC, with or without its `Z` suffix
//!   (sshd reads it in the system time zone unless suffixed; servers run in
//!   UTC).
//! - security-key (`sk-*`), DSA and certificate lines are skipped.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use ipnet::IpNet;
use russh::keys::PublicKey;

use crate::policy::PermitOpen;

/// The key types jumpgate accepts (for `ssh-rsa` the name of the key type: SHA-1
/// signatures are refused by the server's algorithm list, not here).
const KEY_TYPES: [&str; 5] = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
];

/// As sshd's `RequiredRSASize` default (OpenSSH 9.1+).
const MIN_RSA_BITS: u32 = 1024;

const HONOURED: &str = "jumpgate honours from=, permitopen=, restrict, expiry-time=, port-forwarding, \
                        no-port-forwarding, no-pty, no-agent-forwarding, no-x11-forwarding, no-user-rc";

/// Options that only take away (or give back) what jumpgate never grants:
/// accepted and ignored.
const HARMLESS_FLAGS: [&str; 8] = [
    "no-pty",
    "pty",
    "no-agent-forwarding",
    "agent-forwarding",
    "no-x11-forwarding",
    "x11-forwarding",
    "no-user-rc",
    "user-rc",
];

/// One usable line of an `authorized_keys` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    /// The public key (with the line's comment).
    pub key: PublicKey,
    /// Its options.
    pub options: KeyOptions,
    /// Line number in the file, 1-based.
    pub line: usize,
}

/// The options of one key line that jumpgate acts on.
///
/// `KeyOptions::default()` is what a line without options gets:
/// no `from=`, no `permitopen=`, no expiry, forwarding allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOptions {
    /// `from="pattern-list"`: the client addresses this key may log in from.
    pub from: Option<FromPatterns>,
    /// `permitopen="host:port"`, repeatable, all collected; `None` when absent.
    pub permitopen: Option<Vec<PermitOpen>>,
    /// `expiry-time="YYYYMMDD[HHMM[SS]][Z]"`, read as UTC; the earliest if given twice.
    /// The key is refused after this instant.
    pub expiry: Option<SystemTime>,
    /// False after `restrict` (unless a later `port-forwarding`) or
    /// `no-port-forwarding`; options apply left to right, as in sshd.
    pub forwarding_allowed: bool,
}

impl Default for KeyOptions {
    fn default() -> Self {
        KeyOptions {
            from: None,
            permitopen: None,
            expiry: None,
            forwarding_allowed: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternKind {
    /// A CIDR, or a bare address as a /32 or /128.
    Net(IpNet),
    /// `*` and `?` wildcards against the address text, lowercased.
    Wildcard(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FromPattern {
    negated: bool,
    kind: PatternKind,
}

/// A `from=` pattern list: comma-separated CIDRs (`10.0.0.0/8`), addresses,
/// wildcards (`10.0.*`, `192.168.1.?`), each optionally negated with `!`.
///
/// As sshd: a client matching any negated pattern is refused even if another
/// pattern matches; otherwise it is admitted if any pattern matches. Matched
/// against the client's IP only (IPv4-mapped IPv6 read as IPv4): with no
/// reverse DNS, host-name patterns like `*.example.com` never match, which
/// fails closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromPatterns {
    text: String,
    patterns: Vec<FromPattern>,
}

impl FromPatterns {
    /// Parses the value of `from=` (without its quotes). Empty patterns, CIDRs
    /// with a bad prefix or host bits set (which sshd refuses too), and
    /// characters no address or host pattern has (spaces, quotes) are errors.
    pub fn parse(s: &str) -> Result<FromPatterns, String> {
        let mut patterns = Vec::new();
        for item in s.split(',') {
            let (negated, p) = match item.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            if p.is_empty() {
                return Err(format!("empty pattern in {s:?} (write e.g. \"10.0.0.0/8,!10.0.0.5\")"));
            }
            let kind = if p.contains('/') {
                match p.parse::<IpNet>() {
                    Ok(net) if net.trunc() != net => {
                        return Err(format!("{p:?} has host bits set (write {:?})", net.trunc().to_string()));
                    }
                    Ok(net) => PatternKind::Net(net),
                    Err(_) => return Err(format!("{p:?} is not a CIDR (write e.g. \"10.0.0.0/8\")")),
                }
            } else if let Ok(ip) = p.parse::<IpAddr>() {
                PatternKind::Net(IpNet::from(ip.to_canonical()))
            } else if p.bytes().all(|b| b.is_ascii_alphanumeric() || b".:-_*?".contains(&b)) {
                PatternKind::Wildcard(p.to_ascii_lowercase())
            } else {
                return Err(format!(
                    "{p:?} is not an address, CIDR or wildcard (write e.g. \"10.0.*\" or \"10.0.0.0/8\")"
                ));
            };
            patterns.push(FromPattern { negated, kind });
        }
        Ok(FromPatterns {
            text: s.to_string(),
            patterns,
        })
    }

    /// Whether a client at `ip` may use the key.
    pub fn matches(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let text = ip.to_string();
        let mut admitted = false;
        for p in &self.patterns {
            let hit = match &p.kind {
                PatternKind::Net(net) => net.contains(&ip),
                PatternKind::Wildcard(w) => wildcard(w.as_bytes(), text.as_bytes()),
            };
            if hit && p.negated {
                return false;
            }
            admitted |= hit;
        }
        admitted
    }
}

impl fmt::Display for FromPatterns {
    /// The list as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// sshd's `match_pattern`: `*` is any run of characters (also empty), `?` exactly one.
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last '*' was, and the text position it currently swallows up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

impl AuthorizedKey {
    /// Whether this key may log in from `ip` at `now` (`from=` and `expiry-time=`).
    /// `Err(reason)` is for the `auth_failure` audit line.
    pub fn admits(&self, ip: IpAddr, now: SystemTime) -> Result<(), String> {
        if let Some(expiry) = self.options.expiry
            && now > expiry
        {
            return Err(format!(
                "key expired at {} (expiry-time on authorized_keys line {})",
                humantime::format_rfc3339_seconds(expiry),
                self.line
            ));
        }
        if let Some(from) = &self.options.from
            && !from.matches(ip)
        {
            return Err(format!(
                "source address {} not allowed by from=\"{from}\" (authorized_keys line {})",
                ip.to_canonical(),
                self.line
            ));
        }
        Ok(())
    }
}

/// The result of reading an `authorized_keys` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The usable lines, in file order.
    pub keys: Vec<AuthorizedKey>,
    /// One line per skipped line: `"FILE:LINE: skipped: REASON"`.
    pub warnings: Vec<String>,
}

impl Parsed {
    /// The line that lets `key` log in from `ip` at `now`. As in sshd, a key
    /// listed on several lines is admitted by the first line whose options
    /// admit it. `Err(reason)` for the `auth_failure` audit line: the last
    /// refusal, or that the key is not listed.
    pub fn admitting(&self, key: &PublicKey, ip: IpAddr, now: SystemTime) -> Result<&AuthorizedKey, String> {
        let mut refusal = None;
        for entry in self.keys.iter().filter(|k| k.key.key_data() == key.key_data()) {
            match entry.admits(ip, now) {
                Ok(()) => return Ok(entry),
                Err(why) => refusal = Some(why),
            }
        }
        Err(refusal.unwrap_or_else(|| "key not in authorized_keys".to_string()))
    }
}

/// Parses `authorized_keys` text; `file` is used only in warnings, e.g.
/// `config/authorized_keys:3: skipped: unknown option "command" (jumpgate honours from=, permitopen=, ...)`.
/// Blank lines and `#` comments are ignored.
pub fn parse(text: &str, file: &str) -> Parsed {
    let mut parsed = Parsed::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_matches([' ', '\t', '\r']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Ok((key, options)) => parsed.keys.push(AuthorizedKey {
                key,
                options,
                line: i + 1,
            }),
            Err(why) => parsed.warnings.push(format!("{file}:{}: skipped: {why}", i + 1)),
        }
    }
    parsed
}

/// Reads and parses one `authorized_keys` file. Bytes that are not UTF-8
/// become U+FFFD, so they spoil only the line they are on.
pub fn load(path: &Path) -> std::io::Result<Parsed> {
    let bytes = std::fs::read(path)?;
    Ok(parse(&String::from_utf8_lossy(&bytes), &path.display().to_string()))
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Splits at the first space or tab: (field, rest without leading blanks).
fn field(s: &str) -> (&str, &str) {
    match s.find([' ', '\t']) {
        Some(i) => (&s[..i], s[i..].trim_start_matches([' ', '\t'])),
        None => (s, ""),
    }
}

/// A key line starts with its type unless it has options: no option name
/// begins like a key type.
fn starts_with_key_type(first: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-", "rsa-sha2-"]
        .iter()
        .any(|p| first.starts_with(p))
}

fn parse_line(line: &str) -> Result<(PublicKey, KeyOptions), String> {
    let (first, _) = field(line);
    let (options, rest) = if starts_with_key_type(first) {
        (KeyOptions::default(), line)
    } else {
        let (list, rest) = split_options(line)?;
        (apply_options(list)?, rest.trim_start_matches([' ', '\t']))
    };
    Ok((parse_key(rest)?, options))
}

/// An option as written: name (lowercased) and unquoted value.
type RawOption = (String, Option<String>);

/// Reads the comma-separated options at the start of `line`, up to the first
/// blank outside double quotes, as sshd does: names end at `=`, `,` or a
/// blank; a value is `"..."` where `\"` is a quote. Returns the options
/// (lowercased names) and the rest of the line.
fn split_options(line: &str) -> Result<(Vec<RawOption>, &str), String> {
    let b = line.as_bytes();
    let mut i = 0;
    let mut options = Vec::new();
    loop {
        let start = i;
        while i < b.len() && !matches!(b[i], b'=' | b',') && !is_blank(b[i]) {
            i += 1;
        }
        let name = &line[start..i];
        if name.is_empty() {
            return Err("empty option (two commas, or a comma before the key)".to_string());
        }
        let value = if b.get(i) == Some(&b'=') {
            i += 1;
            if b.get(i) != Some(&b'"') {
                return Err(format!(
                    "option {name:?}: the value must be in double quotes ({name}=\"...\")"
                ));
            }
            i += 1;
            let mut value = String::new();
            loop {
                match b.get(i) {
                    None => return Err(format!("option {name:?}: no closing double quote")),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if b.get(i + 1) == Some(&b'"') => {
                        value.push('"');
                        i += 2;
                    }
                    Some(_) => {
                        let Some(c) = line[i..].chars().next() else {
                            return Err(format!("option {name:?}: bad character"));
                        };
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
            Some(value)
        } else {
            None
        };
        options.push((name.to_ascii_lowercase(), value));
        match b.get(i) {
            None => return Err("no key after the options".to_string()),
            Some(&c) if is_blank(c) => return Ok((options, &line[i..])),
            Some(b',') => i += 1,
            Some(_) => return Err(format!("option {name:?}: unexpected text after its value")),
        }
    }
}

fn apply_options(list: Vec<RawOption>) -> Result<KeyOptions, String> {
    let mut o = KeyOptions::default();
    for (name, value) in list {
        let flag = matches!(name.as_str(), "restrict" | "port-forwarding" | "no-port-forwarding")
            || HARMLESS_FLAGS.contains(&name.as_str());
        let valued = matches!(name.as_str(), "from" | "permitopen" | "expiry-time" | "permitlisten");
        if !flag && !valued {
            return Err(format!("unknown option {name:?} ({HONOURED})"));
        }
        let value = match (flag, value) {
            (true, Some(_)) => return Err(format!("option {name:?} takes no value")),
            (true, None) => String::new(),
            (false, None) => return Err(format!("option {name:?} needs a value ({name}=\"...\")")),
            (false, Some(v)) => v,
        };
        match name.as_str() {
            "restrict" | "no-port-forwarding" => o.forwarding_allowed = false,
            "port-forwarding" => o.forwarding_allowed = true,
            "from" => {
                if o.from.is_some() {
                    return Err("from= given twice (put every pattern in one list)".to_string());
                }
                o.from = Some(FromPatterns::parse(&value).map_err(|why| format!("from=: {why}"))?);
            }
            "permitopen" => {
                let p = PermitOpen::parse(&value).map_err(|why| format!("permitopen=: {why}"))?;
                o.permitopen.get_or_insert_with(Vec::new).push(p);
            }
            "expiry-time" => {
                let t = parse_expiry(&value).map_err(|why| format!("expiry-time=: {why}"))?;
                o.expiry = Some(o.expiry.map_or(t, |e| e.min(t)));
            }
            "permitlisten" => {
                // Never granted (remote forwarding is refused), but a malformed value fails the line, as in sshd.
                let spec = if value.contains(':') {
                    value
                } else {
                    format!("localhost:{value}")
                };
                PermitOpen::parse(&spec).map_err(|why| format!("permitlisten=: {why}"))?;
            }
            _ => {} // the harmless flags
        }
    }
    Ok(o)
}

/// `YYYYMMDD`, `YYYYMMDDHHMM` or `YYYYMMDDHHMMSS`, optionally ending in `Z` or `UTC`; always UTC.
fn parse_expiry(v: &str) -> Result<SystemTime, String> {
    let fix = "write YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS, optionally followed by Z; read as UTC";
    let digits = if let Some(d) = v.strip_suffix(['Z', 'z']) {
        d
    } else if v.len() > 3 && v.get(v.len() - 3..).is_some_and(|s| s.eq_ignore_ascii_case("utc")) {
        &v[..v.len() - 3]
    } else {
        v
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{v:?} is not a time ({fix})"));
    }
    let d = digits;
    let (hh, mm, ss) = match d.len() {
        8 => ("00", "00", "00"),
        12 => (&d[8..10], &d[10..12], "00"),
        14 => (&d[8..10], &d[10..12], &d[12..14]),
        _ => return Err(format!("{v:?} has {} digits ({fix})", d.len())),
    };
    let rfc3339 = format!("{}-{}-{}T{hh}:{mm}:{ss}Z", &d[..4], &d[4..6], &d[6..8]);
    humantime::parse_rfc3339(&rfc3339).map_err(|e| format!("{v:?}: {e} ({fix})"))
}

fn parse_key(rest: &str) -> Result<PublicKey, String> {
    let (kind, rest) = field(rest);
    let (base64, comment) = field(rest);
    if kind.is_empty() {
        return Err("no key after the options".to_string());
    }
    if !KEY_TYPES.contains(&kind) {
        return Err(format!(
            "unsupported key type {kind:?} (jumpgate accepts {})",
            KEY_TYPES.join(", ")
        ));
    }
    if base64.is_empty() {
        return Err(format!("no key data after {kind:?}"));
    }
    let mut key = PublicKey::from_openssh(&format!("{kind} {base64}")).map_err(|e| format!("bad {kind} key: {e}"))?;
    if let Some(rsa) = key.key_data().rsa()
        && rsa.key_size() < MIN_RSA_BITS
    {
        return Err(format!(
            "RSA key of {} bits is too short (at least {MIN_RSA_BITS})",
            rsa.key_size()
        ));
    }
    key.set_comment(comment);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdJQp/roeJgAwmMrT9tFIaPrgKToLxMbwO3lGS/NnOt ed25519@test";
    const ECDSA256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNoAdEbKSJHuoxsaMyAT0E6k5buR2cNyoexWd9ax3aU8lnsAU2sswNKB/TGwQeDm3w1lOh1VeBgg+HnD2Twz8GU= ecdsa256@test";
    const ECDSA384: &str = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBM/P+Vylucjg2dvpFC4OTr8eqdkNtbf9SFtorqQ79ArsgytAVvZ7b8EGcXkf/1U2VqtRKQElrgoMVOqtGy/cGrOOQxML8E3LqXbi783UHyBW9m9BHlTgVrvqm+2q/XbUwQ== ecdsa384@test";
    const ECDSA521: &str = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBACqRolqU1hRUWnizILqtEfFX8AoR0y/P2QWQ8dlVXjCa00xV13yyVE1eC9NliKlzi5yEFLiGwHP+RZ6VhKXJm2bagBux1cSwVvvwX7IQfC9zobv1oKfb/H5qYg/F+XMOZd/q5WPvnphQkswsTMqUF85i4AtB7aD8yT47p7crnwTGQtnCQ== ecdsa521@test";
    const RSA2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDRG1yNuKV8atjiKQrbZwUzwJ/8ZbjmVa4zNwsklf0dAqk9OU6wWyZKf5dr1FyEHc6IInaOtLzM1oAXL9F3c+eF3h9dfMWLEFmlEPbElq48/bLRN0Oci8tP2LPPjqt6EvhoVfMARkJljByRjBv1bZpX+n14vnc/jV6AInU0BUHbTAbM5xTdIbCxXIhKObq+uMTqVVBFpLqHhtrXMjz8trGBMo/XDMxaeKzjMj0WInUrQkJnwna+r8oFh96MwpjvC274aU7ZSz3N8nC8lCI7W0L0OZTf6X/le1X/H1lYMm8YIWzbZ7ioYAr0X8O/LtGojjPtQPk8ZPmy36l8ueq8jInf rsa2048@test";
    const RSA1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDiz3zY87841L1tzf6o420aqRfakkGHIcaSmOJ/SvxNUmv000H93zgjevt7pRp6AIw6J1ikQ4vstBJkHb37jHg5gU/OD21z36YV3Xd0lNjj+UDJFKOgQGaE6z483UnsWXJnqpB12Qop5Lrw2G0W54XoTKZLYv4ig/5uispJEIt1pw== rsa1024@test";
    /// Synthetic (random modulus): ssh-keygen refuses to make RSA keys this short.
    const RSA512: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAQQDD7+tfxeOok406cFUmTtYpZzaCaUaLvVIC9rix/5HG6gb4xaFbIngLASVBHcITPRl0qnJnxVjJQRdbcYBigKBl rsa512@test";
    /// The ed25519 key's base64 under other type names.
    const ED25519_B64: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIGdJQp/roeJgAwmMrT9tFIaPrgKToLxMbwO3lGS/NnOt";
    const ED25519_B64_LINE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdJQp/roeJgAwmMrT9tFIaPrgKToLxMbwO3lGS/NnOt";

    fn utc(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    /// One line per field, so a table row states every option at once.
    fn summary(o: &KeyOptions) -> String {
        let from = o.from.as_ref().map_or("-".to_string(), |f| f.to_string());
        let permitopen = o.permitopen.as_ref().map_or("-".to_string(), |list| {
            list.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")
        });
        let expiry = o
            .expiry
            .map_or("-".to_string(), |t| humantime::format_rfc3339_seconds(t).to_string());
        format!(
            "fwd={} from={from} permitopen={permitopen} expiry={expiry}",
            o.forwarding_allowed
        )
    }

    #[test]
    fn options_table() {
        // (line with KEY standing for the ed25519 key, Ok(summary) or Err(part of the warning))
        #[rustfmt::skip]
        let rows: &[(&str, Result<&str, &str>)] = &[
            ("KEY", Ok("fwd=true from=- permitopen=- expiry=-")),
            ("restrict KEY", Ok("fwd=false from=- permitopen=- expiry=-")),
            ("restrict,port-forwarding KEY", Ok("fwd=true from=- permitopen=- expiry=-")),
            ("port-forwarding,restrict KEY", Ok("fwd=false from=- permitopen=- expiry=-")),
            ("no-port-forwarding KEY", Ok("fwd=false from=- permitopen=- expiry=-")),
            ("no-port-forwarding,port-forwarding KEY", Ok("fwd=true from=- permitopen=- expiry=-")),
            ("RESTRICT,Port-Forwarding KEY", Ok("fwd=true from=- permitopen=- expiry=-")),
            ("No-Port-Forwarding KEY", Ok("fwd=false from=- permitopen=- expiry=-")),
            ("restrict,no-pty,pty,no-agent-forwarding,agent-forwarding,no-x11-forwarding,x11-forwarding,no-user-rc,user-rc KEY", Ok("fwd=false from=- permitopen=- expiry=-")),
            ("permitlisten=\"8080\",permitlisten=\"localhost:*\" KEY", Ok("fwd=true from=- permitopen=- expiry=-")),
            ("permitopen=\"db:5432\" KEY", Ok("fwd=true from=- permitopen=db:5432 expiry=-")),
            ("permitopen=\"db:5432\",PermitOpen=\"[2001:db8::5]:*\",permitopen=\"*:3306\" KEY", Ok("fwd=true from=- permitopen=db:5432 [2001:db8::5]:* *:3306 expiry=-")),
            ("from=\"10.0.0.0/8,!10.0.0.5\" KEY", Ok("fwd=true from=10.0.0.0/8,!10.0.0.5 permitopen=- expiry=-")),
            ("FROM=\"10.0.*,192.168.1.?\",restrict KEY", Ok("fwd=false from=10.0.*,192.168.1.? permitopen=- expiry=-")),
            ("expiry-time=\"20300101\" KEY", Ok("fwd=true from=- permitopen=- expiry=2030-01-01T00:00:00Z")),
            ("expiry-time=\"203001021230Z\" KEY", Ok("fwd=true from=- permitopen=- expiry=2030-01-02T12:30:00Z")),
            ("expiry-time=\"20300102123045utc\" KEY", Ok("fwd=true from=- permitopen=- expiry=2030-01-02T12:30:45Z")),
            ("expiry-time=\"20310101\",expiry-time=\"20300101\" KEY", Ok("fwd=true from=- permitopen=- expiry=2030-01-01T00:00:00Z")),
            ("expiry-time=\"20300101\",expiry-time=\"20310101\" KEY", Ok("fwd=true from=- permitopen=- expiry=2030-01-01T00:00:00Z")),
            ("from=\"10.0.0.0/8\",permitopen=\"db:5432\",expiry-time=\"20300101\",restrict\tKEY", Ok("fwd=false from=10.0.0.0/8 permitopen=db:5432 expiry=2030-01-01T00:00:00Z")),
            // Unknown options: the whole line goes.
            ("command=\"/bin/true\" KEY", Err("unknown option \"command\" (jumpgate honours from=")),
            ("command=\"echo \\\"a b\\\", c\",restrict KEY", Err("unknown option \"command\"")),
            ("restrict,environment=\"A=B\" KEY", Err("unknown option \"environment\"")),
            ("tunnel=\"0\" KEY", Err("unknown option \"tunnel\"")),
            ("principals=\"alice\" KEY", Err("unknown option \"principals\"")),
            ("cert-authority KEY", Err("unknown option \"cert-authority\"")),
            ("no-touch-required KEY", Err("unknown option \"no-touch-required\"")),
            ("verify-required KEY", Err("unknown option \"verify-required\"")),
            ("no-restrict KEY", Err("unknown option \"no-restrict\"")),
            ("bogus KEY", Err("unknown option \"bogus\"")),
            // Malformed values: the whole line goes.
            ("from=10.0.0.0/8 KEY", Err("option \"from\": the value must be in double quotes")),
            ("from=\"10.0.0.0/8 KEY", Err("option \"from\": no closing double quote")),
            ("from=\"10.0.0.0/8\"x KEY", Err("option \"from\": unexpected text after its value")),
            ("from KEY", Err("option \"from\" needs a value")),
            ("restrict=\"yes\" KEY", Err("option \"restrict\" takes no value")),
            ("no-pty=\"\" KEY", Err("option \"no-pty\" takes no value")),
            ("restrict,,no-pty KEY", Err("empty option")),
            ("restrict, KEY", Err("empty option")),
            ("from=\"\" KEY", Err("from=: empty pattern")),
            ("from=\"10.0.0.0/8,\" KEY", Err("from=: empty pattern")),
            ("from=\"!\" KEY", Err("from=: empty pattern")),
            ("from=\"10.0.0.1/8\" KEY", Err("from=: \"10.0.0.1/8\" has host bits set (write \"10.0.0.0/8\")")),
            ("from=\"10.0.0.0/33\" KEY", Err("from=: \"10.0.0.0/33\" is not a CIDR")),
            ("from=\"10.0.0.1, 10.0.0.2\" KEY", Err("from=: \" 10.0.0.2\" is not an address")),
            ("from=\"[2001:db8::1]\" KEY", Err("from=: \"[2001:db8::1]\" is not an address")),
            ("from=\"10.0.0.0/8\",from=\"192.168.0.0/16\" KEY", Err("from= given twice")),
            ("permitopen=\"db\" KEY", Err("permitopen=: \"db\": no port")),
            ("permitopen=\"db:0\" KEY", Err("permitopen=: \"db:0\": port \"0\"")),
            ("permitopen=\"none\" KEY", Err("permitopen=: \"none\": no port")),
            ("permitlisten=\"0\" KEY", Err("permitlisten=:")),
            ("expiry-time=\"2030\" KEY", Err("expiry-time=: \"2030\" has 4 digits")),
            ("expiry-time=\"20301301\" KEY", Err("expiry-time=: \"20301301\":")),
            ("expiry-time=\"20300101250000\" KEY", Err("expiry-time=: \"20300101250000\":")),
            ("expiry-time=\"2030-01-01\" KEY", Err("expiry-time=: \"2030-01-01\" is not a time")),
            ("expiry-time=\"\" KEY", Err("expiry-time=: \"\" has 0 digits")),
            ("restrict", Err("no key after the options")),
            ("restrict ", Err("no key after the options")),
        ];
        let key = PublicKey::from_openssh(ED25519).unwrap();
        for (line, want) in rows {
            let text = line.replace("KEY", ED25519);
            let parsed = parse(&text, "f");
            match want {
                Ok(summary_want) => {
                    assert_eq!(parsed.warnings, Vec::<String>::new(), "{line}");
                    assert_eq!(parsed.keys.len(), 1, "{line}");
                    assert_eq!(parsed.keys[0].key.key_data(), key.key_data(), "{line}");
                    assert_eq!(summary(&parsed.keys[0].options), *summary_want, "{line}");
                }
                Err(part) => {
                    assert!(parsed.keys.is_empty(), "{line}: a key survived");
                    assert_eq!(parsed.warnings.len(), 1, "{line}");
                    let w = &parsed.warnings[0];
                    assert!(w.starts_with("f:1: skipped: "), "{line}: {w}");
                    assert!(w.contains(part), "{line}: {w:?} lacks {part:?}");
                }
            }
        }
    }

    #[test]
    fn keys_table() {
        // (line, Ok(comment) or Err(part of the warning))
        let sk = format!("sk-ssh-ed25519@openssh.com {ED25519_B64} sk");
        let cert = format!("ssh-ed25519-cert-v01@openssh.com {ED25519_B64} cert");
        let dss = format!("ssh-dss {ED25519_B64} dss");
        let mismatch = format!("ssh-rsa {ED25519_B64} liar");
        let bad_b64 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdJQp!roeJgAwmMrT9tFIaPrgKToLxMbwO3lGS/NnOt x".to_string();
        let truncated = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdJQp/roeJgAwmMrT9tFIaPrgKToLxMbw x".to_string();
        let comment = format!("{ED25519_B64}  alice's laptop  ");
        let comment = format!("ssh-ed25519 {comment}");
        let tab = format!("ssh-ed25519\t{ED25519_B64}\ttab");
        #[rustfmt::skip]
        let rows: Vec<(&str, Result<&str, &str>)> = vec![
            (ED25519, Ok("ed25519@test")),
            (ECDSA256, Ok("ecdsa256@test")),
            (ECDSA384, Ok("ecdsa384@test")),
            (ECDSA521, Ok("ecdsa521@test")),
            (RSA2048, Ok("rsa2048@test")),
            (RSA1024, Ok("rsa1024@test")),
            (&comment, Ok("alice's laptop")),
            (&tab, Ok("tab")),
            (RSA512, Err("RSA key of 512 bits is too short")),
            (&sk, Err("unsupported key type \"sk-ssh-ed25519@openssh.com\"")),
            (&cert, Err("unsupported key type \"ssh-ed25519-cert-v01@openssh.com\"")),
            (&dss, Err("unsupported key type \"ssh-dss\"")),
            (&mismatch, Err("bad ssh-rsa key")),
            (&bad_b64, Err("bad ssh-ed25519 key")),
            (&truncated, Err("bad ssh-ed25519 key")),
            ("ssh-ed25519", Err("no key data after \"ssh-ed25519\"")),
            ("restrict ssh-foo AAAA", Err("unsupported key type \"ssh-foo\"")),
        ];
        for (line, want) in rows {
            let parsed = parse(line, "f");
            match want {
                Ok(comment) => {
                    assert_eq!(parsed.warnings, Vec::<String>::new(), "{line}");
                    assert_eq!(parsed.keys.len(), 1, "{line}");
                    assert_eq!(parsed.keys[0].key.comment().to_string(), comment, "{line}");
                }
                Err(part) => {
                    assert!(parsed.keys.is_empty(), "{line}: a key survived");
                    assert_eq!(parsed.warnings.len(), 1, "{line}");
                    assert!(
                        parsed.warnings[0].contains(part),
                        "{line}: {:?} lacks {part:?}",
                        parsed.warnings[0]
                    );
                }
            }
        }
    }

    #[test]
    fn file_lines_comments_and_warnings() {
        let text = format!(
            "# team keys\n\n{ED25519}\r\n   \ncommand=\"x\" {ECDSA256}\n  # indented comment\n\trestrict {RSA2048}\nnot a key\n"
        );
        let parsed = parse(&text, "config/authorized_keys");
        let lines: Vec<usize> = parsed.keys.iter().map(|k| k.line).collect();
        assert_eq!(lines, [3, 7]);
        assert!(parsed.keys[0].options.forwarding_allowed);
        assert!(!parsed.keys[1].options.forwarding_allowed);
        assert_eq!(parsed.warnings.len(), 2, "{:?}", parsed.warnings);
        assert_eq!(
            parsed.warnings[0],
            "config/authorized_keys:5: skipped: unknown option \"command\" (jumpgate honours from=, permitopen=, \
             restrict, expiry-time=, port-forwarding, no-port-forwarding, no-pty, no-agent-forwarding, \
             no-x11-forwarding, no-user-rc)"
        );
        assert!(parsed.warnings[1].starts_with("config/authorized_keys:8: skipped: unknown option \"not\""));
    }

    #[test]
    fn split_options_table() {
        // (input, options as "name=value" or "name", rest)
        #[rustfmt::skip]
        let rows: &[(&str, &[&str], &str)] = &[
            ("a K", &["a"], " K"),
            ("a,b\tK", &["a", "b"], "\tK"),
            ("A=\"x,y\" K", &["a=x,y"], " K"),
            ("a=\"x y\",b K", &["a=x y", "b"], " K"),
            ("a=\"x\\\"y\" K", &["a=x\"y"], " K"),
            ("a=\"x\\y\" K", &["a=x\\y"], " K"),
            ("a=\"é\" K", &["a=é"], " K"),
            ("a=\"\" K", &["a="], " K"),
        ];
        for (input, want, rest) in rows {
            let (got, got_rest) = split_options(input).unwrap();
            let got: Vec<String> = got
                .into_iter()
                .map(|(n, v)| v.map_or(n.clone(), |v| format!("{n}={v}")))
                .collect();
            assert_eq!(got, *want, "{input}");
            assert_eq!(got_rest, *rest, "{input}");
        }
    }

    #[test]
    fn from_matches_table() {
        #[rustfmt::skip]
        let rows: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8,!10.0.0.5", "10.0.0.5", false),
            ("10.0.0.0/8,!10.0.0.5", "10.0.0.6", true),
            ("10.0.0.0/8,!10.0.0.5", "11.0.0.1", false),
            ("!10.0.0.5,10.0.0.0/8", "10.0.0.5", false),
            ("!10.0.0.5", "10.0.0.6", false),
            ("10.0.0.5", "10.0.0.5", true),
            ("10.0.0.5", "10.0.0.50", false),
            ("10.0.0.5", "::ffff:10.0.0.5", true),
            ("::ffff:10.0.0.5", "10.0.0.5", true),
            ("10.0.*", "10.0.3.4", true),
            ("10.0.*", "10.1.0.1", false),
            ("192.168.1.?", "192.168.1.7", true),
            ("192.168.1.?", "192.168.1.17", false),
            ("10.*.5", "10.1.2.5", true),
            ("10.*.5", "10.1.2.50", false),
            ("!10.0.*,10.0.0.0/8", "10.0.1.1", false),
            ("!10.0.*,10.0.0.0/8", "10.1.0.1", true),
            ("*", "203.0.113.9", true),
            ("*.example.com", "10.0.0.1", false),
            ("bastion.example.com", "10.0.0.1", false),
            ("2001:db8::/32", "2001:db8::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("2001:DB8::*", "2001:db8::1", true),
        ];
        for (patterns, ip, want) in rows {
            let f = FromPatterns::parse(patterns).unwrap_or_else(|e| panic!("{patterns}: {e}"));
            assert_eq!(f.matches(ip.parse().unwrap()), *want, "from=\"{patterns}\" vs {ip}");
        }
    }

    #[test]
    fn wildcard_table() {
        #[rustfmt::skip]
        let rows: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("a*", "a", true),
            ("*a", "ba", true),
            ("*a", "ab", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("**", "x", true),
        ];
        for (p, t, want) in rows {
            assert_eq!(wildcard(p.as_bytes(), t.as_bytes()), *want, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn admits_table() {
        // (options, client, now, Ok or Err(part of the reason))
        #[rustfmt::skip]
        let rows: &[(&str, &str, &str, Result<(), &str>)] = &[
            ("", "203.0.113.9", "2029-06-01T00:00:00Z", Ok(())),
            ("expiry-time=\"20300101\"", "10.0.0.6", "2029-12-31T23:59:59Z", Ok(())),
            ("expiry-time=\"20300101\"", "10.0.0.6", "2030-01-01T00:00:00Z", Ok(())),
            ("expiry-time=\"20300101\"", "10.0.0.6", "2030-01-01T00:00:01Z", Err("key expired at 2030-01-01T00:00:00Z (expiry-time on authorized_keys line 1)")),
            ("from=\"10.0.0.0/8,!10.0.0.5\"", "10.0.0.6", "2029-06-01T00:00:00Z", Ok(())),
            ("from=\"10.0.0.0/8,!10.0.0.5\"", "10.0.0.5", "2029-06-01T00:00:00Z", Err("source address 10.0.0.5 not allowed by from=\"10.0.0.0/8,!10.0.0.5\" (authorized_keys line 1)")),
            ("from=\"10.0.0.0/8\"", "::ffff:192.0.2.1", "2029-06-01T00:00:00Z", Err("source address 192.0.2.1 not allowed")),
            ("from=\"10.0.0.0/8\",expiry-time=\"20300101\"", "10.0.0.6", "2031-01-01T00:00:00Z", Err("key expired")),
            ("from=\"10.0.0.0/8\",expiry-time=\"20300101\"", "192.0.2.1", "2029-01-01T00:00:00Z", Err("not allowed by from=")),
        ];
        for (options, client, now, want) in rows {
            let parsed = parse(&format!("{options} {ED25519}"), "f");
            assert_eq!(parsed.warnings, Vec::<String>::new(), "{options}");
            let got = parsed.keys[0].admits(client.parse().unwrap(), utc(now));
            match (got, want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(part)) => assert!(e.contains(part), "{options} {client} {now}: {e:?} lacks {part:?}"),
                (got, want) => panic!("{options} {client} {now}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn expiry_against_the_clock() {
        let past = parse(&format!("expiry-time=\"20200101\" {ED25519}"), "f");
        let future = parse(&format!("expiry-time=\"99991231\" {ED25519}"), "f");
        let ip = "10.0.0.1".parse().unwrap();
        assert!(past.keys[0].admits(ip, SystemTime::now()).is_err());
        assert!(future.keys[0].admits(ip, SystemTime::now()).is_ok());
    }

    #[test]
    fn admitting_takes_the_first_line_that_admits() {
        let text = format!(
            "from=\"10.0.0.0/8\" {ED25519}\nfrom=\"192.168.0.0/16\",restrict {ED25519}\n{ECDSA256}\nexpiry-time=\"20200101\" {RSA2048}\n"
        );
        let parsed = parse(&text, "f");
        let ed = PublicKey::from_openssh(ED25519).unwrap();
        let rsa = PublicKey::from_openssh(RSA2048).unwrap();
        let other = PublicKey::from_openssh(ECDSA384).unwrap();
        let now = utc("2029-01-01T00:00:00Z");
        #[rustfmt::skip]
        let rows: &[(&PublicKey, &str, Result<usize, &str>)] = &[
            (&ed, "10.1.2.3", Ok(1)),
            (&ed, "192.168.1.1", Ok(2)),
            (&ed, "172.16.0.1", Err("not allowed by from=\"192.168.0.0/16\" (authorized_keys line 2)")),
            (&rsa, "10.1.2.3", Err("key expired")),
            (&other, "10.1.2.3", Err("key not in authorized_keys")),
        ];
        for (key, ip, want) in rows {
            let got = parsed.admitting(key, ip.parse().unwrap(), now).map(|k| k.line);
            match (got, want) {
                (Ok(line), Ok(want)) => assert_eq!(line, *want, "{ip}"),
                (Err(e), Err(part)) => assert!(e.contains(part), "{ip}: {e:?} lacks {part:?}"),
                (got, want) => panic!("{ip}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn load_reads_one_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        let mut bytes = format!("{ED25519}\ntunnel=\"1\" {ECDSA256}\n").into_bytes();
        bytes.extend_from_slice(format!("{ED25519_B64_LINE} caf\u{e9} ").as_bytes());
        bytes.extend_from_slice(b"\xff\xfe\n");
        std::fs::write(&path, bytes).unwrap();
        let parsed = load(&path).unwrap();
        assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
        let lines: Vec<usize> = parsed.keys.iter().map(|k| k.line).collect();
        assert_eq!(lines, [1, 3], "a byte that is not UTF-8 in a comment costs nothing");
        assert_eq!(parsed.keys[1].key.comment().to_string(), "caf\u{e9} \u{fffd}\u{fffd}");
        assert!(parsed.warnings[0].starts_with(&format!("{}:2: skipped: unknown option \"tunnel\"", path.display())));
        let missing = load(&dir.path().join("nope")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    }
}
