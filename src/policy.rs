//! The one place an SSH `direct-tcpip` channel is allowed or denied.
//!
//! Pure: no I/O, no DNS. [`Policy::decide`] looks at what the client asked
//! for (host string and port) before anything is resolved; the caller then
//! resolves a [`Connect::Name`] itself and asks [`Policy::denied`] about
//! every address it would connect to. Parsing the options of an
//! `authorized_keys` line lives in `ssh::authorized_keys`; this module only
//! owns [`PermitOpen`], the `host:port` pattern those options and
//! `[[ssh.user]] permitopen` share.
//!
//! Names and addresses never cross over: a name matches only host rules,
//! an IP literal only CIDR rules, so allowing `mydb.example.com` never
//! allows the address it happens to resolve to today.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Reads a requested host: an IP literal (`10.0.0.5`, `2001:db8::5`, `[2001:db8::5]`) or a DNS name.
fn target(host: &str) -> Result<Connect, String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Connect::Ip(IpAddr::V6(ip).to_canonical()))
            .map_err(|_| format!("{inner:?} in brackets is not an IPv6 address"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Connect::Ip(ip.to_canonical()));
    }
    dns_name(host).map(Connect::Name)
}

/// Checks a DNS name and returns it lowercased, without its trailing dot.
///
/// Labels are 1 to 63 letters, digits, '-' or '_' (not starting or ending
/// with '-'), 253 characters in all. The last label may not be all digits:
/// no top-level domain is, and resolvers built on `inet_aton` read names
/// such as `127.1` or `2130706433` as addresses.
fn dns_name(host: &str) -> Result<String, String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("empty host".to_string());
    }
    if name.len() > 253 {
        return Err("name longer than 253 characters".to_string());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label in name".to_string());
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters".to_string());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("label starts or ends with '-'".to_string());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("not a DNS name nor an IP address".to_string());
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("numeric last label: neither a DNS name nor an IP address".to_string());
    }
    Ok(name.to_ascii_lowercase())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PermitHost {
    Any,
    Ip(IpAddr),
    Name(String),
}

/// One `permitopen` pattern, from an `authorized_keys` option or `[[ssh.user]] permitopen`.
///
/// The host is an exact name, an IP literal or a lone `*`; the port a number or `*`.
/// As in OpenSSH there is no name resolution and no other wildcard. Unlike
/// OpenSSH's `strcmp`, names compare case-insensitively and without a
/// trailing dot, and IP literals compare as addresses (`2001:db8:0::5` is
/// `2001:db8::5`, `::ffff:10.0.0.5` is `10.0.0.5`): both name the same place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermitOpen {
    host: PermitHost,
    /// `None` is `*`.
    port: Option<u16>,
}

impl PermitOpen {
    /// Parses `"db.example.com:5432"`, `"*:5432"`, `"db:*"`, `"10.0.0.5:5432"`, `"[2001:db8::5]:5432"`.
    /// The error says what to write instead.
    pub fn parse(s: &str) -> Result<PermitOpen, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((inner, after)) = rest.split_once(']') else {
                return Err(format!("{s:?}: no closing ']' (write e.g. \"[2001:db8::5]:5432\")"));
            };
            let Some(port) = after.strip_prefix(':') else {
                return Err(format!("{s:?}: no port after ']' (write e.g. \"[{inner}]:5432\")"));
            };
            let Ok(ip) = inner.parse::<Ipv6Addr>() else {
                return Err(format!(
                    "{s:?}: {inner:?} is not an IPv6 address (write e.g. \"[2001:db8::5]:5432\")"
                ));
            };
            (PermitHost::Ip(IpAddr::V6(ip).to_canonical()), port)
        } else {
            let Some((host, port)) = s.rsplit_once(':') else {
                return Err(format!(
                    "{s:?}: no port (write \"{s}:5432\", or \"{s}:*\" for any port)"
                ));
            };
            if host.contains(':') {
                return Err(format!(
                    "{s:?}: an IPv6 address needs brackets (write e.g. \"[{host}]:{port}\")"
                ));
            }
            let host = if host == "*" {
                PermitHost::Any
            } else {
                match target(host) {
                    Ok(Connect::Ip(ip)) => PermitHost::Ip(ip),
                    Ok(Connect::Name(name)) => PermitHost::Name(name),
                    Err(why) => {
                        return Err(format!(
                            "{s:?}: host {host:?}: {why} (write a name, an IP address or \"*\", e.g. \"db.example.com:5432\")"
                        ));
                    }
                }
            };
            (host, port)
        };
        let port = match port {
            "*" => None,
            p => match p.parse::<u16>() {
                Ok(n) if n > 0 && !p.starts_with('+') => Some(n),
                _ => {
                    return Err(format!(
                        "{s:?}: port {p:?} is not 1-65535 nor \"*\" (write e.g. \"db.example.com:5432\")"
                    ));
                }
            },
        };
        Ok(PermitOpen { host, port })
    }

    /// Whether a request for `host:port` is permitted. `host` is what the client sent;
    /// anything that is neither a DNS name nor an IP literal matches only a `*` host.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        match target(host) {
            Ok(t) => self.matches_target(&t, port),
            Err(_) => self.host == PermitHost::Any && self.port.is_none_or(|p| p == port),
        }
    }

    /// [`PermitOpen::matches`] for a host already read by [`target`].
    fn matches_target(&self, target: &Connect, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.host, target) {
            (PermitHost::Any, _) => true,
            (PermitHost::Ip(ip), Connect::Ip(t)) => t == ip,
            (PermitHost::Name(name), Connect::Name(t)) => t == name,
            _ => false,
        }
    }
}

impl fmt::Display for PermitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            PermitHost::Any => f.write_str("*")?,
            PermitHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
            PermitHost::Ip(ip) => write!(f, "{ip}")?,
            PermitHost::Name(name) => f.write_str(name)?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => f.write_str(":*"),
        }
    }
}

/// A host rule's pattern: an exact name (`db.example.com`) or a suffix
/// wildcard (`*.example.internal`), where `*` stands for one or more whole
/// labels, never for the bare suffix itself nor part of a label.
/// Case-insensitive; a trailing dot on either side is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lowercased, no trailing dot; for a wildcard, the suffix after `*.`.
    name: String,
    wildcard: bool,
}

impl HostPattern {
    /// The one name this pattern matches, lowercased; None for a wildcard.
    pub fn exact(&self) -> Option<&str> {
        (!self.wildcard).then_some(self.name.as_str())
    }

    /// Parses `"db.example.com"` or `"*.example.internal"`. The error says what to write instead.
    pub fn parse(pattern: &str) -> Result<HostPattern, String> {
        let (rest, wildcard) = match pattern.strip_prefix("*.") {
            Some(suffix) => (suffix, true),
            None => (pattern, false),
        };
        if pattern == "*" {
            return Err(
                "\"*\" alone would allow every name (write exact names or e.g. \"*.example.internal\")".to_string(),
            );
        }
        if rest.contains('*') {
            return Err(format!(
                "{pattern:?}: '*' is allowed only as the first label (write e.g. \"*.example.internal\" or an exact name)"
            ));
        }
        let bare = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(rest);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            return Err(format!(
                "{pattern:?} is an IP address: write it as a cidr rule (cidr = \"{ip}/{len}\")"
            ));
        }
        let name = dns_name(rest)
            .map_err(|why| format!("{pattern:?}: {why} (write e.g. \"mydb.example.com\" or \"*.example.internal\")"))?;
        Ok(HostPattern { name, wildcard })
    }

    /// Whether `name` (already lowercased, no trailing dot) is matched.
    fn matches_normalised(&self, name: &str) -> bool {
        if !self.wildcard {
            return name == self.name;
        }
        // "a.example.internal": at least one label, then the dot, then the suffix.
        name.len() > self.name.len() + 1
            && name.ends_with(self.name.as_str())
            && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
    }

    /// Whether the DNS name `name` is matched (case-insensitive, trailing dot ignored).
    /// Anything that is not a DNS name (an IP literal, garbage) never matches.
    pub fn matches(&self, name: &str) -> bool {
        match target(name) {
            Ok(Connect::Name(n)) => self.matches_normalised(&n),
            _ => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

/// What an `[[ssh.allow]]` rule matches: names or addresses, never both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleTarget {
    /// `host = "..."`: matches requests that name a host, never IP literals.
    Host(HostPattern),
    /// `cidr = "..."`: matches requests that give an IP literal, never names.
    Cidr(IpNet),
}

/// One `[[ssh.allow]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// What the rule matches.
    pub target: RuleTarget,
    /// The ports it opens; never empty, never 0.
    pub ports: Vec<u16>,
    /// The rule as written (`"mydb.example.com"`, `"*.example.internal"`,
    /// `"10.0.0.0/16"`): a metric label and the rule named in audit lines.
    pub label: String,
}

fn check_ports(ports: &[u16]) -> Result<(), String> {
    if ports.is_empty() {
        return Err("no ports (write e.g. ports = [5432])".to_string());
    }
    if ports.contains(&0) {
        return Err("port 0 (write the database's port, e.g. ports = [5432])".to_string());
    }
    Ok(())
}

/// "10.0.0.0/16", "2001:db8::/32", or a bare address (a /32 or /128); host
/// bits set are an error. One parser for every CIDR in the config.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has host bits set (write {:?})",
                net.trunc().to_string()
            ));
        }
        return Ok(net);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "not a CIDR: {text:?} (write e.g. \"10.0.0.0/16\" or \"203.0.113.7/32\")"
    ))
}

impl AllowRule {
    /// A host rule: `"mydb.example.com"` or `"*.example.internal"`. The error says what to write instead.
    pub fn host(pattern: &str, ports: Vec<u16>) -> Result<AllowRule, String> {
        check_ports(&ports)?;
        let target = RuleTarget::Host(HostPattern::parse(pattern)?);
        Ok(AllowRule {
            target,
            ports,
            label: pattern.to_string(),
        })
    }

    /// A CIDR rule: `"10.0.0.0/16"`, `"2001:db8::/32"`, or a bare address (a /32 or /128).
    /// Host bits set (`"10.0.0.1/16"`) are an error, as in the rest of the config.
    pub fn cidr(cidr: &str, ports: Vec<u16>) -> Result<AllowRule, String> {
        check_ports(&ports)?;
        let net = parse_cidr(cidr)?;
        Ok(AllowRule {
            target: RuleTarget::Cidr(net),
            ports,
            label: cidr.to_string(),
        })
    }

    fn matches(&self, target: &Connect, port: u16) -> bool {
        if !self.ports.contains(&port) {
            return false;
        }
        match (&self.target, target) {
            (RuleTarget::Host(pattern), Connect::Name(name)) => pattern.matches_normalised(name),
            (RuleTarget::Cidr(net), Connect::Ip(ip)) => net.contains(ip),
            _ => false,
        }
    }
}

/// Every `[[ssh.allow]]` rule and the `[ssh] deny` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// A channel opens only if one of these matches (first match wins).
    pub allow: Vec<AllowRule>,
    /// Addresses refused after resolution, whatever `allow` says.
    pub deny: Vec<IpNet>,
}

/// The answer of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Every check passed; `rule` is the first allow rule that matched.
    /// The caller still checks each address it connects to with [`Policy::denied`].
    Allow {
        /// The rule that allowed the channel (its label goes in the audit line).
        rule: &'a AllowRule,
        /// Where to connect.
        connect: Connect,
    },
    /// Refused: answer SSH_OPEN_ADMINISTRATIVELY_PROHIBITED.
    Deny(Denied),
}

/// Where an allowed channel connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    /// The client gave an IP literal (IPv4-mapped IPv6 folded to IPv4).
    Ip(IpAddr),
    /// The client gave a name, lowercased, without a trailing dot: the caller resolves it.
    Name(String),
}

impl fmt::Display for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Connect::Ip(ip) => write!(f, "{ip}"),
            Connect::Name(name) => f.write_str(name),
        }
    }
}

/// Why [`Policy::decide`] refused a channel; `Display` is the reason in the audit line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The key has `permitopen` options and none matches.
    #[error("key permitopen does not match")]
    KeyPermitOpen,
    /// The user has a `permitopen` list and nothing in it matches.
    #[error("user permitopen does not match")]
    UserPermitOpen,
    /// No `[[ssh.allow]]` rule matches the host and port.
    #[error("no [[ssh.allow]] rule matches")]
    NoRule,
    /// The requested host is neither a DNS name nor an IP literal; the text says
    /// what is wrong with it (it never repeats the client's string).
    #[error("bad host: {0}")]
    BadHost(String),
}

impl Policy {
    /// The decision before resolution. A channel opens only if `key_permitopen`
    /// (when `Some`; `Some(&[])` permits nothing) AND `user_permitopen` (when not
    /// empty) AND one allow rule match.
    ///
    /// A request whose host parses as an IP literal (v4, v6, or `"[v6]"`)
    /// matches only CIDR rules (never a host rule, even if a name resolving to
    /// it is allowed); a name matches only host rules (never CIDR rules). The
    /// port must be in the rule's ports. Hosts that are neither valid DNS names
    /// nor IP literals are [`Denied::BadHost`]. Checks run in that order: bad
    /// host, key, user, rules; the first failing one is the reason.
    pub fn decide(
        &self,
        host: &str,
        port: u16,
        key_permitopen: Option<&[PermitOpen]>,
        user_permitopen: &[PermitOpen],
    ) -> Decision<'_> {
        let target = match target(host) {
            Ok(t) => t,
            Err(why) => return Decision::Deny(Denied::BadHost(why)),
        };
        if let Some(list) = key_permitopen
            && !list.iter().any(|p| p.matches_target(&target, port))
        {
            return Decision::Deny(Denied::KeyPermitOpen);
        }
        if !user_permitopen.is_empty() && !user_permitopen.iter().any(|p| p.matches_target(&target, port)) {
            return Decision::Deny(Denied::UserPermitOpen);
        }
        let Some(rule) = self.allow.iter().find(|r| r.matches(&target, port)) else {
            return Decision::Deny(Denied::NoRule);
        };
        Decision::Allow { rule, connect: target }
    }

    /// After resolution: the deny entry that contains `ip`, if any (checked for
    /// every address, whatever the rules said).
    ///
    /// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is also checked as the
    /// IPv4 address it reaches. An unspecified address (`0.0.0.0`, `::`) is
    /// checked as loopback: on Linux, connecting to it reaches the local host.
    pub fn denied(&self, ip: IpAddr) -> Option<&IpNet> {
        let canonical = match ip.to_canonical() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => other,
        };
        self.deny
            .iter()
            .find(|net| net.contains(&ip) || net.contains(&canonical))
    }

    /// Default `[ssh] deny`: 127.0.0.0/8, ::1/128, 169.254.0.0/16, fe80::/10, fd00:ec2::254/128
    /// (loopback, link-local, and the cloud instance metadata addresses).
    pub fn default_deny() -> Vec<IpNet> {
        [
            "127.0.0.0/8",
            "::1/128",
            "169.254.0.0/16",
            "fe80::/10",
            "fd00:ec2::254/128",
        ]
        .iter()
        .map(|s| s.parse().expect("constant CIDR"))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn po(list: &[&str]) -> Vec<PermitOpen> {
        list.iter().map(|s| PermitOpen::parse(s).unwrap()).collect()
    }

    fn policy() -> Policy {
        Policy {
            allow: vec![
                AllowRule::host("mydb.example.com", vec![5432]).unwrap(),
                AllowRule::host("*.example.internal", vec![5432, 3306]).unwrap(),
                AllowRule::host("Mixed.Example.ORG.", vec![1433]).unwrap(),
                AllowRule::cidr("10.0.0.0/16", vec![5432]).unwrap(),
                AllowRule::cidr("2001:db8::/32", vec![5432]).unwrap(),
            ],
            deny: Policy::default_deny(),
        }
    }

    /// (what, host, port, key permitopen, user permitopen, expected: Ok((rule label, connect)) or Err(denied))
    type Row = (
        &'static str,
        &'static str,
        u16,
        Option<&'static [&'static str]>,
        &'static [&'static str],
        Result<(&'static str, Connect), Denied>,
    );

    fn name(s: &str) -> Connect {
        Connect::Name(s.to_string())
    }
    fn ip(s: &str) -> Connect {
        Connect::Ip(s.parse().unwrap())
    }

    #[test]
    fn decide_table() {
        use Denied::*;
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("exact name", "mydb.example.com", 5432, None, &[], Ok(("mydb.example.com", name("mydb.example.com")))),
            ("exact name, other name", "otherdb.example.com", 5432, None, &[], Err(NoRule)),
            ("exact name is not a suffix", "x.mydb.example.com", 5432, None, &[], Err(NoRule)),
            ("case-insensitive request", "MyDB.Example.COM", 5432, None, &[], Ok(("mydb.example.com", name("mydb.example.com")))),
            ("case-insensitive rule", "mixed.example.org", 1433, None, &[], Ok(("Mixed.Example.ORG.", name("mixed.example.org")))),
            ("trailing dot ignored", "mydb.example.com.", 5432, None, &[], Ok(("mydb.example.com", name("mydb.example.com")))),
            ("port outside the rule", "mydb.example.com", 3306, None, &[], Err(NoRule)),
            ("wildcard one label", "a.example.internal", 3306, None, &[], Ok(("*.example.internal", name("a.example.internal")))),
            ("wildcard two labels", "a.b.example.internal", 5432, None, &[], Ok(("*.example.internal", name("a.b.example.internal")))),
            ("wildcard not the bare suffix", "example.internal", 5432, None, &[], Err(NoRule)),
            ("wildcard not part of a label", "evilexample.internal", 5432, None, &[], Err(NoRule)),
            ("wildcard suffix must end the name", "a.example.internal.evil.com", 5432, None, &[], Err(NoRule)),
            ("wildcard port outside the rule", "a.example.internal", 22, None, &[], Err(NoRule)),
            ("IP literal of an allowed name, no cidr rule", "192.0.2.10", 5432, None, &[], Err(NoRule)),
            ("IP literal inside a cidr rule", "10.0.3.4", 5432, None, &[], Ok(("10.0.0.0/16", ip("10.0.3.4")))),
            ("IP literal outside every cidr rule", "10.1.0.1", 5432, None, &[], Err(NoRule)),
            ("IP literal inside a cidr rule, port outside", "10.0.3.4", 3306, None, &[], Err(NoRule)),
            ("IPv4-mapped literal inside a v4 cidr rule", "::ffff:10.0.3.4", 5432, None, &[], Ok(("10.0.0.0/16", ip("10.0.3.4")))),
            ("bracketed v6 literal in a cidr rule", "[2001:db8::5]", 5432, None, &[], Ok(("2001:db8::/32", ip("2001:db8::5")))),
            ("bare v6 literal in a cidr rule", "2001:db8::5", 5432, None, &[], Ok(("2001:db8::/32", ip("2001:db8::5")))),
            ("bracketed IPv4-mapped literal inside a v4 cidr rule", "[::ffff:10.0.3.4]", 5432, None, &[], Ok(("10.0.0.0/16", ip("10.0.3.4")))),
            ("bracketed loopback literal, no rule", "[::1]", 5432, None, &[], Err(NoRule)),
            ("name never matches a cidr rule", "10-0-3-4.example.com", 5432, None, &[], Err(NoRule)),
            ("bracketed v4 is a bad host", "[10.0.3.4]", 5432, None, &[], Err(BadHost("\"10.0.3.4\" in brackets is not an IPv6 address".into()))),
            ("v6 zone id is a bad host", "fe80::1%eth0", 5432, None, &[], Err(BadHost("not a DNS name nor an IP address".into()))),
            ("empty host", "", 5432, None, &[], Err(BadHost("empty host".into()))),
            ("empty label", "a..example.internal", 5432, None, &[], Err(BadHost("empty label in name".into()))),
            ("space in host", "mydb.example.com ", 5432, None, &[], Err(BadHost("not a DNS name nor an IP address".into()))),
            ("leading hyphen", "-a.example.internal", 5432, None, &[], Err(BadHost("label starts or ends with '-'".into()))),
            ("inet_aton shorthand is a bad host", "10.0.3", 5432, None, &[], Err(BadHost("numeric last label: neither a DNS name nor an IP address".into()))),
            ("decimal address is a bad host", "167772164", 5432, None, &[], Err(BadHost("numeric last label: neither a DNS name nor an IP address".into()))),
            ("key permitopen matches", "mydb.example.com", 5432, Some(&["mydb.example.com:5432"]), &[], Ok(("mydb.example.com", name("mydb.example.com")))),
            ("key permitopen mismatch", "mydb.example.com", 5432, Some(&["other.example.com:5432"]), &[], Err(KeyPermitOpen)),
            ("key permitopen port mismatch", "mydb.example.com", 5432, Some(&["mydb.example.com:5433"]), &[], Err(KeyPermitOpen)),
            ("key permitopen present but empty", "mydb.example.com", 5432, Some(&[]), &[], Err(KeyPermitOpen)),
            ("key permitopen, second entry matches", "a.example.internal", 3306, Some(&["x:1", "A.example.internal:*"]), &[], Ok(("*.example.internal", name("a.example.internal")))),
            ("user permitopen mismatch", "mydb.example.com", 5432, None, &["other.example.com:5432"], Err(UserPermitOpen)),
            ("user permitopen matches", "mydb.example.com", 5432, None, &["*:5432"], Ok(("mydb.example.com", name("mydb.example.com")))),
            ("both present and matching", "mydb.example.com", 5432, Some(&["mydb.example.com:*"]), &["*:5432"], Ok(("mydb.example.com", name("mydb.example.com")))),
            ("both present, user mismatch", "mydb.example.com", 5432, Some(&["mydb.example.com:*"]), &["*:3306"], Err(UserPermitOpen)),
            ("permitopen matches, no rule", "db.elsewhere.com", 5432, Some(&["*:*"]), &["*:*"], Err(NoRule)),
            ("permitopen literal does not allow the name", "mydb.example.com", 5432, Some(&["10.0.3.4:5432"]), &[], Err(KeyPermitOpen)),
            ("permitopen v6 literal matches bracketed request", "[2001:db8::5]", 5432, Some(&["[2001:db8:0::5]:5432"]), &[], Ok(("2001:db8::/32", ip("2001:db8::5")))),
        ];
        let p = policy();
        for (what, host, port, key, user, want) in rows {
            let key = key.map(po);
            let got = p.decide(host, port, key.as_deref(), &po(user));
            let got = match got {
                Decision::Allow { rule, connect } => Ok((rule.label.as_str(), connect)),
                Decision::Deny(d) => Err(d),
            };
            assert_eq!(got, want, "{what}: {host}:{port}");
        }
    }

    #[test]
    fn name_length_table() {
        let label = |n: usize| "a".repeat(n);
        // (what, host, Ok(()) or Err(reason))
        #[rustfmt::skip]
        let rows: Vec<(&str, String, Result<(), &str>)> = vec![
            ("63-character label", format!("{}.example.com", label(63)), Ok(())),
            (
                "64-character label",
                format!("{}.example.com", label(64)),
                Err("label longer than 63 characters"),
            ),
            (
                "253 characters",
                format!("{0}.{0}.{0}.{1}", label(63), label(61)),
                Ok(()),
            ),
            (
                "253 characters and a trailing dot",
                format!("{0}.{0}.{0}.{1}.", label(63), label(61)),
                Ok(()),
            ),
            (
                "254 characters",
                format!("{0}.{0}.{0}.{1}", label(63), label(62)),
                Err("name longer than 253 characters"),
            ),
        ];
        for (what, host, want) in rows {
            assert_eq!(dns_name(&host).map(|_| ()), want.map_err(str::to_string), "{what}");
        }
    }

    #[test]
    fn host_pattern_matches_table() {
        #[rustfmt::skip]
        let rows: &[(&str, &str, bool)] = &[
            ("db.example.com", "db.example.com", true),
            ("db.example.com", "DB.example.com.", true),
            ("db.example.com", "db.example.co", false),
            ("*.example.internal", "A.Example.Internal.", true),
            ("*.example.internal", "example.internal", false),
            ("*.example.internal", ".example.internal", false),
            ("*.example.internal", "evilexample.internal", false),
            ("*.example.internal", "not a name.example.internal", false),
        ];
        for (pattern, name, want) in rows {
            assert_eq!(
                HostPattern::parse(pattern).unwrap().matches(name),
                *want,
                "{pattern} vs {name}"
            );
        }
    }

    #[test]
    fn denied_table() {
        #[rustfmt::skip]
        let rows: &[(&str, &str, Option<&str>)] = &[
            ("loopback v4", "127.0.0.1", Some("127.0.0.0/8")),
            ("loopback v4, not .1", "127.3.2.1", Some("127.0.0.0/8")),
            ("loopback v6", "::1", Some("::1/128")),
            ("metadata v4", "169.254.169.254", Some("169.254.0.0/16")),
            ("metadata v6", "fd00:ec2::254", Some("fd00:ec2::254/128")),
            ("link-local v6", "fe80::1", Some("fe80::/10")),
            ("mapped loopback", "::ffff:127.0.0.1", Some("127.0.0.0/8")),
            ("mapped metadata", "::ffff:169.254.169.254", Some("169.254.0.0/16")),
            ("unspecified v4 reaches loopback", "0.0.0.0", Some("127.0.0.0/8")),
            ("unspecified v6 reaches loopback", "::", Some("::1/128")),
            ("private address", "10.0.0.5", None),
            ("mapped private address", "::ffff:10.0.0.5", None),
            ("neighbour of the metadata v6", "fd00:ec2::253", None),
        ];
        let p = policy();
        for (what, addr, want) in rows {
            let got = p.denied(addr.parse().unwrap()).map(|n| n.to_string());
            assert_eq!(got.as_deref(), *want, "{what}: {addr}");
        }
    }

    #[test]
    fn denied_checks_the_mapped_form_too() {
        let p = Policy {
            allow: vec![],
            deny: vec!["::ffff:0:0/96".parse().unwrap()],
        };
        assert!(p.denied("::ffff:10.0.0.5".parse().unwrap()).is_some());
        assert!(p.denied("10.0.0.5".parse().unwrap()).is_none());
    }

    #[test]
    fn permitopen_parse_table() {
        // (input, Ok(display) or Err(substring of the error))
        #[rustfmt::skip]
        let rows: &[(&str, Result<&str, &str>)] = &[
            ("db.example.com:5432", Ok("db.example.com:5432")),
            ("DB.Example.com.:5432", Ok("db.example.com:5432")),
            ("*:5432", Ok("*:5432")),
            ("db:*", Ok("db:*")),
            ("*:*", Ok("*:*")),
            ("10.0.0.5:5432", Ok("10.0.0.5:5432")),
            ("[2001:db8::5]:5432", Ok("[2001:db8::5]:5432")),
            ("[::ffff:10.0.0.5]:5432", Ok("10.0.0.5:5432")),
            ("db.example.com", Err("write \"db.example.com:5432\"")),
            ("2001:db8::5:5432", Err("needs brackets")),
            ("[2001:db8::5]", Err("no port after ']'")),
            ("[2001:db8::5:5432", Err("no closing ']'")),
            ("[db.example.com]:5432", Err("not an IPv6 address")),
            ("db:0", Err("not 1-65535")),
            ("db:65536", Err("not 1-65535")),
            ("db:+5432", Err("not 1-65535")),
            ("db:", Err("not 1-65535")),
            (":5432", Err("empty host")),
            ("*.example.com:5432", Err("not a DNS name")),
            ("db_1.example.com:5432", Ok("db_1.example.com:5432")),
            ("db example:5432", Err("not a DNS name")),
            ("none", Err("no port")),
        ];
        for (input, want) in rows {
            match (PermitOpen::parse(input), want) {
                (Ok(p), Ok(display)) => assert_eq!(p.to_string(), *display, "{input}"),
                (Err(e), Err(part)) => assert!(e.contains(part), "{input}: {e:?} lacks {part:?}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn permitopen_matches_table() {
        #[rustfmt::skip]
        let rows: &[(&str, &str, u16, bool)] = &[
            ("db.example.com:5432", "db.example.com", 5432, true),
            ("db.example.com:5432", "DB.EXAMPLE.COM", 5432, true),
            ("db.example.com:5432", "db.example.com.", 5432, true),
            ("db.example.com:5432", "db.example.com", 5433, false),
            ("db.example.com:5432", "x.db.example.com", 5432, false),
            ("db.example.com:*", "db.example.com", 1, true),
            ("*:5432", "anything.example", 5432, true),
            ("*:5432", "anything.example", 22, false),
            ("*:*", "not a host!", 22, true),
            ("10.0.0.5:5432", "10.0.0.5", 5432, true),
            ("10.0.0.5:5432", "::ffff:10.0.0.5", 5432, true),
            ("10.0.0.5:5432", "10.0.0.6", 5432, false),
            ("[::1]:22", "::1", 22, true),
            ("[::1]:22", "[::1]", 22, true),
            ("[::1]:22", "[0:0::1]", 22, true),
            ("[::1]:22", "localhost", 22, false),
            ("localhost:22", "::1", 22, false),
        ];
        for (pattern, host, port, want) in rows {
            let p = PermitOpen::parse(pattern).unwrap();
            assert_eq!(p.matches(host, *port), *want, "{pattern} vs {host}:{port}");
        }
    }

    /// (host or cidr, input, ports, Ok(()) or Err(part of the error))
    type ConstructorRow = (&'static str, &'static str, &'static [u16], Result<(), &'static str>);

    #[test]
    fn allow_rule_constructors_table() {
        #[rustfmt::skip]
        let rows: &[ConstructorRow] = &[
            ("host", "mydb.example.com", &[5432], Ok(())),
            ("host", "*.example.internal", &[5432], Ok(())),
            ("host", "mydb.example.com", &[], Err("no ports")),
            ("host", "mydb.example.com", &[0], Err("port 0")),
            ("host", "*", &[5432], Err("alone would allow every name")),
            ("host", "*.", &[5432], Err("empty host")),
            ("host", "db.*.internal", &[5432], Err("only as the first label")),
            ("host", "*db.example.com", &[5432], Err("only as the first label")),
            ("host", "*.*.example.com", &[5432], Err("only as the first label")),
            ("host", "10.0.0.5", &[5432], Err("cidr = \"10.0.0.5/32\"")),
            ("host", "2001:db8::5", &[5432], Err("cidr = \"2001:db8::5/128\"")),
            ("host", "[2001:db8::5]", &[5432], Err("cidr = \"2001:db8::5/128\"")),
            ("host", "bad host", &[5432], Err("not a DNS name")),
            ("cidr", "10.0.0.0/16", &[5432], Ok(())),
            ("cidr", "10.0.0.5", &[5432], Ok(())),
            ("cidr", "2001:db8::/32", &[5432], Ok(())),
            ("cidr", "10.0.0.1/16", &[5432], Err("host bits set (write \"10.0.0.0/16\")")),
            ("cidr", "10.0.0.0/33", &[5432], Err("not a CIDR")),
            ("cidr", "mydb.example.com", &[5432], Err("not a CIDR")),
            ("cidr", "10.0.0.0/16", &[], Err("no ports")),
            ("cidr", "10.0.0.0/16", &[3306, 0], Err("port 0")),
        ];
        for (kind, input, ports, want) in rows {
            let got = match *kind {
                "host" => AllowRule::host(input, ports.to_vec()),
                _ => AllowRule::cidr(input, ports.to_vec()),
            };
            match (got, want) {
                (Ok(rule), Ok(())) => assert_eq!(rule.label, *input),
                (Err(e), Err(part)) => assert!(e.contains(part), "{kind} {input}: {e:?} lacks {part:?}"),
                (got, want) => panic!("{kind} {input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn denied_reasons_read_as_audit_text() {
        #[rustfmt::skip]
        let rows: &[(Denied, &str)] = &[
            (Denied::KeyPermitOpen, "key permitopen does not match"),
            (Denied::UserPermitOpen, "user permitopen does not match"),
            (Denied::NoRule, "no [[ssh.allow]] rule matches"),
            (Denied::BadHost("empty host".into()), "bad host: empty host"),
        ];
        for (d, want) in rows {
            assert_eq!(d.to_string(), *want);
        }
    }
}
