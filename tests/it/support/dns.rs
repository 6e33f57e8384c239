//! A real authoritative DNS server for the zone `jumpgate.test.`, built on
//! hickory-server and run inside the test process on 127.0.0.1, UDP and TCP on
//! one port. Tests change its A/AAAA records and their TTLs while traffic
//! flows, stop it and start it again on the same port, and count the queries
//! it received.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};

/// The zone every name of the test server lives in.
pub const ZONE: &str = "jumpgate.test.";

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

/// The test's DNS server. Stopped (and its runtime shut down) on drop.
pub struct DnsServer {
    rt: tokio::runtime::Runtime,
    zone: Arc<Zone>,
    queries: Arc<AtomicU64>,
    addr: SocketAddr,
    server: Option<Server<CountingCatalog>>,
}

impl DnsServer {
    /// Starts a server on a fresh port of 127.0.0.1 with an empty zone.
    pub fn start() -> Self {
        let mut dns = Self::reserve();
        dns.resume();
        dns
    }

    /// Picks a port (free for both UDP and TCP a moment ago) but serves
    /// nothing yet: queries to it are refused until [`DnsServer::resume`].
    pub fn reserve() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for the DNS server");
        let origin = Name::from_ascii(ZONE).expect("zone name");
        let mut records = BTreeMap::new();
        let soa = SOA::new(
            Name::from_ascii("ns.jumpgate.test.").expect("ns name"),
            Name::from_ascii("hostmaster.jumpgate.test.").expect("rname"),
            1,
            3600,
            600,
            86_400,
            // Negative answers (NODATA for AAAA) are cached for at most 1 s.
            1,
        );
        let mut soa_set = RecordSet::new(origin.clone(), RecordType::SOA, 1);
        soa_set.insert(Record::from_rdata(origin.clone(), 1, RData::SOA(soa)), 1);
        records.insert(RrKey::new(LowerName::new(&origin), RecordType::SOA), soa_set);
        let zone = Arc::new(Zone::new(origin, records, ZoneType::Primary, AxfrPolicy::Deny).expect("in-memory zone"));
        // Bind UDP and TCP on the same port, then let both go.
        let addr = (0..50)
            .find_map(|_| {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
                let addr = udp.local_addr().ok()?;
                std::net::TcpListener::bind(addr).ok()?;
                Some(addr)
            })
            .expect("a port free for both UDP and TCP on 127.0.0.1");
        Self {
            rt,
            zone,
            queries: Arc::new(AtomicU64::new(0)),
            addr,
            server: None,
        }
    }

    /// The `host:port` both protocols listen on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving again on the same port (after [`DnsServer::stop`] or
    /// [`DnsServer::reserve`]); records are kept.
    pub fn resume(&mut self) {
        assert!(self.server.is_none(), "DNS server already running");
        let handler = CountingCatalog {
            catalog: {
                let mut catalog = Catalog::new();
                let zone: Arc<dyn ZoneHandler> = self.zone.clone();
                catalog.upsert(LowerName::new(&Name::from_ascii(ZONE).expect("zone")), vec![zone]);
                catalog
            },
            queries: self.queries.clone(),
        };
        let addr = self.addr;
        let server = self.rt.block_on(async move {
            // std sets SO_REUSEADDR on listeners, so the same port can be
            // bound again right after a stop.
            let udp = crate::support::wait_for(Duration::from_secs(5), || std::net::UdpSocket::bind(addr).ok())
                .unwrap_or_else(|| panic!("DNS server cannot bind UDP {addr} again"));
            let tcp = crate::support::wait_for(Duration::from_secs(5), || std::net::TcpListener::bind(addr).ok())
                .unwrap_or_else(|| panic!("DNS server cannot bind TCP {addr} again"));
            udp.set_nonblocking(true).expect("nonblocking udp");
            tcp.set_nonblocking(true).expect("nonblocking tcp");
            let mut server = Server::new(handler);
            server.register_socket(tokio::net::UdpSocket::from_std(udp).expect("tokio udp"));
            server.register_listener(
                tokio::net::TcpListener::from_std(tcp).expect("tokio tcp"),
                Duration::from_secs(5),
                64,
            );
            server
        });
        self.server = Some(server);
    }

    /// Stops serving: both sockets are closed, so queries are refused.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            self.rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(5), server.shutdown_gracefully()).await;
            });
        }
    }

    /// Sets the addresses of `name` (`"db"` or `"db.jumpgate.test"`): IPv4
    /// addresses become its A records, IPv6 ones its AAAA records, all with
    /// `ttl` seconds. An empty list removes the name.
    pub fn set_a(&self, name: &str, ips: &[IpAddr], ttl: u32) {
        let name = fqdn(name);
        let serial = 1;
        let mut a = RecordSet::new(name.clone(), RecordType::A, serial);
        let mut aaaa = RecordSet::new(name.clone(), RecordType::AAAA, serial);
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => a.insert(Record::from_rdata(name.clone(), ttl, RData::A(A(*v4))), serial),
                IpAddr::V6(v6) => aaaa.insert(Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(*v6))), serial),
            };
        }
        let lower = LowerName::new(&name);
        let zone = self.zone.clone();
        self.rt.block_on(async move {
            let mut records = zone.records_mut().await;
            for set in [a, aaaa] {
                let key = RrKey::new(lower.clone(), set.record_type());
                if set.is_empty() {
                    records.remove(&key);
                } else {
                    records.insert(key, Arc::new(set));
                }
            }
        });
    }

    /// How many DNS messages (any name, either protocol) the server handled.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `name` under [`ZONE`] as an absolute name, whether it was given relative or in full.
fn fqdn(name: &str) -> Name {
    let name = name.trim_end_matches('.');
    let full = if name.ends_with(ZONE.trim_end_matches('.')) {
        format!("{name}.")
    } else {
        format!("{name}.{ZONE}")
    };
    Name::from_ascii(&full).unwrap_or_else(|e| panic!("bad DNS name {full:?}: {e}"))
}

/// The catalog, counting each request before answering it.
struct CountingCatalog {
    catalog: Catalog,
    queries: Arc<AtomicU64>,
}

// `RequestHandler` is declared with `#[async_trait]`; this is that macro's
// expansion written out, so the tests need no `async-trait` dependency.
impl RequestHandler for CountingCatalog {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.queries.fetch_add(1, Ordering::SeqCst);
            self.catalog.handle_request::<R, T>(request, response_handle).await
        })
    }
}

/// Sends one A query for `name` over UDP to `server` and returns the
/// (address, TTL) pairs of the answer; `None` on timeout or a malformed reply.
/// Used to check this helper itself.
#[cfg(test)]
fn query_a(server: SocketAddr, name: &str) -> Option<Vec<(std::net::Ipv4Addr, u32)>> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.connect(server).ok()?;
    sock.send(&q).ok()?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).ok()?;
    let msg = &buf[..n];
    let answers = u16::from_be_bytes([*msg.get(6)?, *msg.get(7)?]);
    let mut pos = q.len(); // the question is echoed back unchanged
    let mut out = Vec::new();
    for _ in 0..answers {
        // The owner name: labels up to a zero byte, or a 2-byte pointer.
        loop {
            let len = *msg.get(pos)? as usize;
            if len & 0xc0 == 0xc0 {
                pos += 2;
                break;
            }
            pos += 1 + len;
            if len == 0 {
                break;
            }
        }
        let rtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
        let ttl = u32::from_be_bytes(msg.get(pos + 4..pos + 8)?.try_into().ok()?);
        let len = u16::from_be_bytes([*msg.get(pos + 8)?, *msg.get(pos + 9)?]) as usize;
        let data = msg.get(pos + 10..pos + 10 + len)?;
        if rtype == 1 && len == 4 {
            out.push((std::net::Ipv4Addr::new(data[0], data[1], data[2], data[3]), ttl));
        }
        pos += 10 + len;
    }
    Some(out)
}

/// The helper answers what `set_a` set, changes at run time, and stops and
/// starts again on the same port.
#[test]
fn dns_helper_serves_changes_and_restarts() {
    let mut dns = DnsServer::start();
    dns.set_a("db", &["127.0.0.2".parse().expect("ip")], 7);
    assert_eq!(
        query_a(dns.addr(), "db.jumpgate.test"),
        Some(vec![("127.0.0.2".parse().expect("ip"), 7)])
    );
    dns.set_a("db.jumpgate.test", &["127.0.0.3".parse().expect("ip")], 1);
    assert_eq!(
        query_a(dns.addr(), "db.jumpgate.test"),
        Some(vec![("127.0.0.3".parse().expect("ip"), 1)])
    );
    assert_eq!(dns.queries(), 2);
    dns.stop();
    assert_eq!(query_a(dns.addr(), "db.jumpgate.test"), None);
    dns.resume();
    assert_eq!(
        query_a(dns.addr(), "db.jumpgate.test"),
        Some(vec![("127.0.0.3".parse().expect("ip"), 1)])
    );
}
