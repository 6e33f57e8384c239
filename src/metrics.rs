//! Every metric name, described once at start, and the Prometheus recorder.
//!
//! Names follow DESIGN.md ("Observability"): `jumpgate_` prefix, base units,
//! counters end in `_total`. Label values come from the config (route names,
//! the watched DNS name), never from what a client sent.
//!
//! `metrics-exporter-prometheus` is used as the recorder only; `admin.rs`
//! renders it. Histograms get explicit buckets, else the exporter renders
//! them as summaries (metrics-exporter-prometheus 0.18.3,
//! `src/exporter/builder.rs` `set_buckets_for_metric`).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const FORWARD_CONNECTIONS: &str = "jumpgate_forward_connections_total";
pub const FORWARD_ACTIVE: &str = "jumpgate_forward_connections_active";
pub const RELAY_BYTES: &str = "jumpgate_relay_bytes_total";
pub const UPSTREAM_CONNECT_SECONDS: &str = "jumpgate_upstream_connect_seconds";
pub const DNS_LOOKUPS: &str = "jumpgate_dns_lookups_total";
pub const DNS_CHANGES: &str = "jumpgate_dns_changes_total";
pub const BUILD_INFO: &str = "jumpgate_build_info";
pub const PROXY_REJECTED: &str = "jumpgate_proxy_protocol_rejected_total";
pub const SERVICE_API_REQUESTS: &str = "jumpgate_service_api_requests_total";
pub const TUNNEL_UP: &str = "jumpgate_tunnel_up";
pub const TUNNEL_RECONNECTS: &str = "jumpgate_tunnel_reconnects_total";
pub const TUNNEL_FAILURES: &str = "jumpgate_tunnel_failures_total";
pub const SSH_CONNECTIONS: &str = "jumpgate_ssh_connections_total";
pub const SSH_AUTH: &str = "jumpgate_ssh_auth_total";
pub const SSH_SESSIONS_ACTIVE: &str = "jumpgate_ssh_sessions_active";
pub const SSH_CHANNELS: &str = "jumpgate_ssh_channels_total";
pub const SSH_CHANNELS_ACTIVE: &str = "jumpgate_ssh_channels_active";

/// Connect latencies from loopback (sub-millisecond) to a slow cross-AZ
/// handshake near `connect_timeout`.
const CONNECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often the recorder's upkeep (histogram buffer drain) runs.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle; later
/// calls (a second `App` in the same process, as in tests) share it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(UPSTREAM_CONNECT_SECONDS.into()), CONNECT_BUCKETS)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed: then ours stays
            // unused and /metrics shows only what it registered, so say so.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be incomplete");
            }
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        FORWARD_CONNECTIONS,
        "Connections accepted by a forward route, by result (ok, connect_failed, proxy_rejected)."
    );
    describe_gauge!(FORWARD_ACTIVE, "Forwarded connections open now.");
    describe_counter!(
        RELAY_BYTES,
        Unit::Bytes,
        "Bytes relayed, by role, route and direction (up: client to upstream, down: upstream to client)."
    );
    describe_histogram!(
        UPSTREAM_CONNECT_SECONDS,
        Unit::Seconds,
        "Time to connect to an upstream, all addresses tried."
    );
    describe_counter!(DNS_LOOKUPS, "DNS lookups of watched names, by result (ok, error).");
    describe_counter!(DNS_CHANGES, "Changes of a watched name's address set.");
    describe_counter!(
        SSH_CONNECTIONS,
        "SSH connections by result (accepted, source_refused, startups_full, login_timeout, proxy_rejected)."
    );
    describe_counter!(SSH_AUTH, "SSH authentication attempts by result (accepted, rejected).");
    describe_gauge!(SSH_SESSIONS_ACTIVE, "Authenticated SSH sessions open now.");
    describe_counter!(
        SSH_CHANNELS,
        "direct-tcpip channel requests by result (opened, denied, connect_failed)."
    );
    describe_gauge!(SSH_CHANNELS_ACTIVE, "SSH channels open now.");
    describe_gauge!(
        TUNNEL_UP,
        "1 while the tunnel is connected with every remote forward granted, else 0."
    );
    describe_counter!(
        TUNNEL_RECONNECTS,
        "Times a tunnel dialled again after its previous connection ended or failed."
    );
    describe_counter!(
        TUNNEL_FAILURES,
        "Tunnel connection failures by reason (host_key, auth, forward_refused, connect, keepalive, disconnected)."
    );
    describe_counter!(
        SERVICE_API_REQUESTS,
        "Calls to the service's REST API by endpoint and result (ok, retried, unauthorized, http_error, refused, malformed, network)."
    );
    describe_counter!(
        PROXY_REJECTED,
        "Connections dropped on a proxy_protocol listener for a missing or invalid PROXY header."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which build runs.");
}
