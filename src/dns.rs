//! The one place names are resolved and watched.
//!
//! A [`Watch`] holds the current answer for one name in a `watch` channel and
//! re-resolves it when the answer's TTL runs out, clamped to
//! `[min_ttl, max_ttl]`. A failed lookup keeps the last good answer
//! (serve-stale), is counted, and is retried with a backoff from `min_ttl`
//! up to `max_ttl`. A caller whose connects all failed can ask for an
//! immediate re-resolve ([`Watch::refresh_now`]), granted at most once per
//! `min_ttl` so a refusing upstream cannot turn into a DNS flood.
//!
//! Roles read answers from here; they never resolve names themselves.
//! hickory's own cache is off (size 0, and cleared before each lookup): this
//! module is the cache, and a forced re-resolve must reach the server.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, ResolverOpts};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as DnsError_, NetError};
use metrics::Counter;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::DnsConfig;
use crate::metrics as m;

/// hickory's default is 5 s x 2 attempts: a connect that waits on a forced
/// re-resolve should not wait that long (hickory-resolver 0.26.3 config.rs
/// `default_timeout`). See docs/dependency-defaults.md.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
const LOOKUP_ATTEMPTS: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read the system resolver config: {0} (set [dns] nameservers = [\"10.0.0.2:53\"])")]
    SystemConfig(String),
    #[error("cannot build the resolver: {0}")]
    Build(String),
}

/// A resolver shared by every watched name: one hickory resolver per address
/// family, so a failing AAAA query never looks like "the IPv6 addresses left"
/// (hickory's `lookup_ip` returns Ok when one family fails: hickory-resolver
/// 0.26.3 `lookup_ip.rs` 285-288).
#[derive(Clone)]
pub struct Resolver {
    v4: TokioResolver,
    v6: TokioResolver,
}

/// The outcome of one lookup of both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// None: this family's query failed (keep its last good addresses).
    pub v4: Option<Vec<IpAddr>>,
    pub v6: Option<Vec<IpAddr>>,
    /// The shortest TTL among the answers that came back.
    pub ttl: Duration,
}

impl Resolved {
    /// The addresses this lookup returned, IPv4 first (families that failed are left out).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4.iter().chain(self.v6.iter()).flatten().copied()
    }
}

/// A lookup that produced nothing usable: `label` is the metric's `result`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{label}: {message}")]
pub struct LookupError {
    pub label: &'static str,
    pub message: String,
}

impl Resolver {
    /// From `[dns] nameservers`, or from the system config when that is empty.
    pub fn new(config: &DnsConfig) -> Result<Resolver, DnsError> {
        Ok(Resolver {
            v4: build(config, LookupIpStrategy::Ipv4Only)?,
            v6: build(config, LookupIpStrategy::Ipv6Only)?,
        })
    }

    /// One lookup of A and AAAA, concurrently.
    pub async fn lookup(&self, name: &str) -> Result<Resolved, LookupError> {
        // A dotted name is absolute: no search-domain walk on failure (and no
        // wildcard in a search domain answering for the wrong host).
        let query = if name.contains('.') && !name.ends_with('.') {
            format!("{name}.")
        } else {
            name.to_string()
        };
        let (v4, v6) = tokio::join!(family(&self.v4, &query), family(&self.v6, &query));
        combine(v4, v6)
    }
}

fn build(config: &DnsConfig, strategy: LookupIpStrategy) -> Result<TokioResolver, DnsError> {
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| DnsError::SystemConfig(e.to_string()))?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for conn in &mut ns.connections {
                    conn.port = addr.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], servers),
            TokioRuntimeProvider::default(),
        )
    };
    // Set after builder_tokio(), which loads resolv.conf's options.
    let opts: &mut ResolverOpts = builder.options_mut();
    // This module caches; hickory's cache would answer a forced re-resolve
    // with the stale record.
    opts.cache_size = 0;
    opts.ip_strategy = strategy;
    opts.timeout = LOOKUP_TIMEOUT;
    opts.attempts = LOOKUP_ATTEMPTS;
    builder.build().map_err(|e| DnsError::Build(e.to_string()))
}

/// One family: Ok(Some(addrs, ttl)), Ok(None) when the name has no such
/// records, Err when the query failed.
async fn family(resolver: &TokioResolver, query: &str) -> Result<Option<(Vec<IpAddr>, Duration)>, LookupError> {
    let budget = LOOKUP_TIMEOUT * (LOOKUP_ATTEMPTS as u32 + 1) + Duration::from_secs(1);
    resolver.clear_cache();
    match tokio::time::timeout(budget, resolver.lookup_ip(query)).await {
        Ok(Ok(lookup)) => {
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            let mut addrs: Vec<IpAddr> = Vec::new();
            for ip in lookup.iter() {
                if !addrs.contains(&ip) {
                    addrs.push(ip);
                }
            }
            Ok(if addrs.is_empty() { None } else { Some((addrs, ttl)) })
        }
        Ok(Err(e)) if e.is_no_records_found() => Ok(None),
        Ok(Err(e)) => Err(LookupError {
            label: error_label(&e),
            message: e.to_string(),
        }),
        Err(_) => Err(LookupError {
            label: "timeout",
            message: format!("no answer within {budget:?}"),
        }),
    }
}

/// Errors by variant, never by text (docs/dependency-defaults.md). A refused
/// UDP query shows up as a timeout: the socket is never connected.
fn error_label(e: &NetError) -> &'static str {
    match e {
        NetError::Timeout => "timeout",
        NetError::Dns(DnsError_::ResponseCode(_)) => "servfail",
        _ => "error",
    }
}

type Family = Result<Option<(Vec<IpAddr>, Duration)>, LookupError>;

/// Both families into one result: a failed family is `None` (keep its old
/// addresses) as long as the other answered; both failing, or neither having
/// records, is an error (serve-stale).
fn combine(v4: Family, v6: Family) -> Result<Resolved, LookupError> {
    match (v4, v6) {
        (Err(e), Err(_)) => Err(e),
        (Ok(None), Ok(None)) => Err(LookupError {
            label: "nxdomain",
            message: "the name has no A or AAAA records".into(),
        }),
        (Err(e), Ok(None)) | (Ok(None), Err(e)) => Err(e),
        (v4, v6) => {
            let ttl = [&v4, &v6]
                .iter()
                .filter_map(|f| f.as_ref().ok().and_then(|o| o.as_ref()).map(|(_, t)| *t))
                .min()
                .unwrap_or_default();
            let addrs = |f: Family| f.ok().map(|o| o.map(|(a, _)| a).unwrap_or_default());
            Ok(Resolved {
                v4: addrs(v4),
                v6: addrs(v6),
                ttl,
            })
        }
    }
}

/// The current answer for a name.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// Addresses in the order DNS gave them; empty until the first good answer.
    pub addrs: Arc<[IpAddr]>,
    /// Why the last lookup failed, while it keeps failing.
    pub error: Option<Arc<str>>,
}

/// A watched name (or a fixed IP literal, which never changes).
#[derive(Clone)]
pub struct Watch {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    resolver: Option<Resolver>,
    tx: watch::Sender<Answer>,
    state: Mutex<State>,
    min_ttl: Duration,
    max_ttl: Duration,
    /// One counter per entry of [`LOOKUP_RESULTS`].
    results: Vec<Counter>,
    changes: Counter,
}

struct State {
    /// When the last lookup started (`None`: never).
    last: Option<Instant>,
    /// When the background loop should look up next.
    next_due: Instant,
    /// Failures in a row, for the backoff.
    failures: u32,
}

impl Watch {
    /// An IP literal: always that one address, no lookups.
    pub fn fixed(ip: IpAddr) -> Watch {
        let (tx, _) = watch::channel(Answer {
            addrs: Arc::from([ip]),
            error: None,
        });
        let name = ip.to_string();
        Watch::build(name.clone(), &name, None, tx, Duration::ZERO, Duration::ZERO)
    }

    /// A name resolved by `resolver`; nothing happens until [`Watch::run`] runs.
    /// Metrics are labelled with the name itself (a name from the config).
    pub fn new(name: &str, resolver: Resolver, min_ttl: Duration, max_ttl: Duration) -> Watch {
        Watch::labelled(name, name, resolver, min_ttl, max_ttl)
    }

    /// Like [`Watch::new`] with metrics labelled `label`: for names a client
    /// asked for, the config rule that admitted them (label values never
    /// come from a client).
    pub fn labelled(name: &str, label: &str, resolver: Resolver, min_ttl: Duration, max_ttl: Duration) -> Watch {
        let (tx, _) = watch::channel(Answer::default());
        Watch::build(name.to_string(), label, Some(resolver), tx, min_ttl, max_ttl)
    }

    fn build(
        name: String,
        label: &str,
        resolver: Option<Resolver>,
        tx: watch::Sender<Answer>,
        min_ttl: Duration,
        max_ttl: Duration,
    ) -> Watch {
        let results = LOOKUP_RESULTS
            .iter()
            .map(|&result| metrics::counter!(m::DNS_LOOKUPS, "name" => label.to_string(), "result" => result))
            .collect();
        let changes = metrics::counter!(m::DNS_CHANGES, "name" => label.to_string());
        Watch {
            inner: Arc::new(Inner {
                name,
                resolver,
                tx,
                state: Mutex::new(State {
                    last: None,
                    next_due: Instant::now(),
                    failures: 0,
                }),
                min_ttl,
                max_ttl,
                results,
                changes,
            }),
        }
    }

    /// The watched name (or the IP literal).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether this is a name that is looked up (not an IP literal).
    pub fn is_dynamic(&self) -> bool {
        self.inner.resolver.is_some()
    }

    /// The addresses to use now (empty before the first good answer).
    pub fn current(&self) -> Arc<[IpAddr]> {
        self.inner.tx.borrow().addrs.clone()
    }

    /// The whole current answer, with the last error if lookups are failing.
    pub fn answer(&self) -> Answer {
        self.inner.tx.borrow().clone()
    }

    /// The addresses once there are any: at once if known, else after the
    /// first lookup (bounded by `within`). Empty if none came in time.
    pub async fn first_answer(&self, within: Duration) -> Arc<[IpAddr]> {
        let mut rx = self.subscribe();
        let wait = async {
            loop {
                {
                    let a = rx.borrow_and_update();
                    if !a.addrs.is_empty() || a.error.is_some() {
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
        self.current()
    }

    /// A receiver that sees every change of the address set.
    pub fn subscribe(&self) -> watch::Receiver<Answer> {
        self.inner.tx.subscribe()
    }

    /// Re-resolves now unless a lookup started less than `min_ttl` ago, and
    /// returns the addresses to use. Callers whose connects all failed use it
    /// so a client sees no failed connect when DNS has already moved.
    pub async fn refresh_now(&self) -> Arc<[IpAddr]> {
        if let Some(resolver) = &self.inner.resolver {
            let mut state = self.inner.state.lock().await;
            let recent = state.last.is_some_and(|t| t.elapsed() < self.inner.min_ttl);
            if !recent {
                debug!(name = %self.inner.name, "re-resolving at once after failed connects");
                self.inner.lookup(resolver, &mut state).await;
            }
        }
        self.current()
    }

    /// Resolves at start, then whenever the answer's TTL runs out, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let Some(resolver) = &self.inner.resolver else {
            return;
        };
        loop {
            let due = self.inner.state.lock().await.next_due;
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = stop.cancelled() => return,
            }
            let mut state = self.inner.state.lock().await;
            // A forced refresh may have moved the schedule while we slept.
            if Instant::now() < state.next_due {
                continue;
            }
            self.inner.lookup(resolver, &mut state).await;
        }
    }
}

impl Inner {
    async fn lookup(&self, resolver: &Resolver, state: &mut State) {
        let started = Instant::now();
        state.last = Some(started);
        match resolver.lookup(&self.name).await {
            Ok(resolved) => {
                self.count("ok");
                state.failures = 0;
                let wait = resolved.ttl.clamp(self.min_ttl, self.max_ttl);
                state.next_due = started + wait;
                let addrs = merge(&self.tx.borrow().addrs, &resolved);
                debug!(name = %self.name, ?resolved, next_in = ?wait, "resolved");
                self.publish(addrs);
            }
            Err(e) => {
                self.count(e.label);
                state.failures = state.failures.saturating_add(1);
                let backoff = self
                    .min_ttl
                    .saturating_mul(1 << (state.failures - 1).min(16))
                    .min(self.max_ttl);
                state.next_due = Instant::now() + backoff;
                let why: Arc<str> = Arc::from(format!("{}: {}", e.label, e.message));
                let mut serving = Vec::new();
                self.tx.send_modify(|a| {
                    a.error = Some(why.clone());
                    serving = a.addrs.to_vec();
                });
                warn!(name = %self.name, error = %why, serving = ?serving, retry_in = ?backoff,
                    "dns lookup failed; keeping the last good answer");
            }
        }
    }

    fn count(&self, label: &str) {
        if let Some(i) = LOOKUP_RESULTS.iter().position(|l| *l == label) {
            self.results[i].increment(1);
        }
    }

    /// Publishes a good answer; a change of the address *set* is audited and
    /// counted (a reordered round-robin answer is not a change).
    fn publish(&self, addrs: Vec<IpAddr>) {
        let new: Arc<[IpAddr]> = Arc::from(addrs);
        let mut old: Option<Arc<[IpAddr]>> = None;
        self.tx.send_if_modified(|a| {
            let had_error = a.error.take().is_some();
            if same_set(&a.addrs, &new) {
                // Keep the answer's order fresh without waking subscribers.
                a.addrs = new.clone();
                return had_error;
            }
            old = Some(std::mem::replace(&mut a.addrs, new.clone()));
            true
        });
        match old {
            Some(old) if old.is_empty() => {
                info!(name = %self.name, addrs = ?new, "first answer");
            }
            Some(old) => {
                self.changes.increment(1);
                info!(target: "audit", event = "dns_change", name = %self.name, old = ?old, new = ?new);
            }
            None => {}
        }
    }
}

/// Watches for names that clients ask for at run time (SSH channels, tunnel
/// targets): one watch per name, created on first use, shared by every
/// channel to that name, and dropped after [`Registry::IDLE`] without use.
/// At most [`Registry::MAX_NAMES`] names are watched at once, so a wildcard
/// rule cannot make a client grow it without bound.
pub struct Registry {
    resolver: Resolver,
    min_ttl: Duration,
    max_ttl: Duration,
    stop: CancellationToken,
    names: std::sync::Mutex<std::collections::HashMap<String, Entry>>,
}

struct Entry {
    watch: Watch,
    stop: CancellationToken,
    last_used: Instant,
}

impl Registry {
    /// A name unused this long stops being watched.
    pub const IDLE: Duration = Duration::from_secs(600);
    pub const MAX_NAMES: usize = 1024;

    /// Watches stop when `stop` fires.
    pub fn new(resolver: Resolver, min_ttl: Duration, max_ttl: Duration, stop: CancellationToken) -> Registry {
        Registry {
            resolver,
            min_ttl,
            max_ttl,
            stop,
            names: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The watch for `name` (metrics labelled `label`), started if new.
    /// None when [`Registry::MAX_NAMES`] names are watched already.
    pub fn watch(&self, name: &str, label: &str) -> Option<Watch> {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = names.get_mut(name) {
            e.last_used = now;
            return Some(e.watch.clone());
        }
        // Forget names nobody used for a while (their channels hold their own
        // clones of the watch; only the re-resolving stops).
        names.retain(|_, e| {
            let keep = now.duration_since(e.last_used) < Self::IDLE;
            if !keep {
                e.stop.cancel();
            }
            keep
        });
        if names.len() >= Self::MAX_NAMES {
            return None;
        }
        let watch = Watch::labelled(name, label, self.resolver.clone(), self.min_ttl, self.max_ttl);
        let stop = self.stop.child_token();
        let span = tracing::info_span!("dns", name = %name);
        tokio::spawn(tracing::Instrument::instrument(watch.clone().run(stop.clone()), span));
        names.insert(
            name.to_string(),
            Entry {
                watch: watch.clone(),
                stop,
                last_used: now,
            },
        );
        Some(watch)
    }
}

/// The `result` label values of `jumpgate_dns_lookups_total`.
pub const LOOKUP_RESULTS: [&str; 5] = ["ok", "nxdomain", "servfail", "timeout", "error"];

/// The new address list: each family from this lookup, or, where that
/// family's query failed, its addresses from the previous answer. IPv4 first.
fn merge(previous: &[IpAddr], resolved: &Resolved) -> Vec<IpAddr> {
    let keep = |v6: bool| {
        previous
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv6() == v6)
            .collect::<Vec<_>>()
    };
    let mut out = resolved.v4.clone().unwrap_or_else(|| keep(false));
    out.extend(resolved.v6.clone().unwrap_or_else(|| keep(true)));
    out
}

fn same_set(a: &[IpAddr], b: &[IpAddr]) -> bool {
    a.len() == b.len() && a.iter().all(|ip| b.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn set_comparison_ignores_order() {
        let cases: &[(&[&str], &[&str], bool)] = &[
            (&["10.0.0.1", "10.0.0.2"], &["10.0.0.2", "10.0.0.1"], true),
            (&["10.0.0.1"], &["10.0.0.1"], true),
            (&["10.0.0.1"], &["10.0.0.2"], false),
            (&["10.0.0.1", "10.0.0.2"], &["10.0.0.1"], false),
            (&[], &["10.0.0.1"], false),
        ];
        for (a, b, want) in cases {
            assert_eq!(same_set(&ips(a), &ips(b)), *want, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn publish_counts_only_real_changes() {
        let (tx, _) = watch::channel(Answer::default());
        let w = Watch::build(
            "db.example".into(),
            "db.example",
            None,
            tx,
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        let mut rx = w.subscribe();
        w.inner.publish(ips(&["10.0.0.1", "10.0.0.2"]));
        assert!(rx.has_changed().unwrap(), "first answer wakes subscribers");
        rx.borrow_and_update();
        w.inner.publish(ips(&["10.0.0.2", "10.0.0.1"]));
        assert!(!rx.has_changed().unwrap(), "a reordered answer is not a change");
        assert_eq!(
            &*w.current(),
            &ips(&["10.0.0.2", "10.0.0.1"])[..],
            "but the new order is served"
        );
        w.inner.publish(ips(&["10.0.0.3"]));
        assert!(rx.has_changed().unwrap(), "a new set wakes subscribers");
        assert_eq!(&*w.current(), &ips(&["10.0.0.3"])[..]);
    }

    fn fam(addrs: &[&str], ttl: u64) -> Family {
        Ok(Some((ips(addrs), Duration::from_secs(ttl))))
    }
    fn failed(label: &'static str) -> Family {
        Err(LookupError {
            label,
            message: "x".into(),
        })
    }

    #[test]
    fn families_combine_and_a_failed_family_keeps_its_old_addresses() {
        let prev = ips(&["10.0.0.1", "2001:db8::1"]);
        // (v4, v6) -> Ok(merged addresses, ttl) or Err(label)
        type Want = Result<(Vec<IpAddr>, u64), &'static str>;
        let cases: Vec<(&str, Family, Family, Want)> = vec![
            (
                "both answer",
                fam(&["10.0.0.2"], 5),
                fam(&["2001:db8::2"], 3),
                Ok((ips(&["10.0.0.2", "2001:db8::2"]), 3)),
            ),
            (
                "v4 only, no AAAA",
                fam(&["10.0.0.2"], 5),
                Ok(None),
                Ok((ips(&["10.0.0.2"]), 5)),
            ),
            (
                "AAAA query failed",
                fam(&["10.0.0.2"], 5),
                failed("timeout"),
                Ok((ips(&["10.0.0.2", "2001:db8::1"]), 5)),
            ),
            (
                "A query failed",
                failed("timeout"),
                fam(&["2001:db8::2"], 7),
                Ok((ips(&["10.0.0.1", "2001:db8::2"]), 7)),
            ),
            ("both failed", failed("timeout"), failed("servfail"), Err("timeout")),
            ("no records at all", Ok(None), Ok(None), Err("nxdomain")),
            ("no A, AAAA failed", Ok(None), failed("servfail"), Err("servfail")),
        ];
        for (case, v4, v6, want) in cases {
            let got = combine(v4, v6)
                .map(|r| (merge(&prev, &r), r.ttl.as_secs()))
                .map_err(|e| e.label);
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn fixed_watch_has_its_address() {
        let w = Watch::fixed("192.0.2.7".parse().unwrap());
        assert!(!w.is_dynamic());
        assert_eq!(&*w.current(), &ips(&["192.0.2.7"])[..]);
    }
}
