//! jumpgate lets a managed data-pipeline service (Fivetran, Airbyte, Stitch,
//! ...) reach databases inside private networks, replacing the shell scripts
//! people glue together for it.
//!
//! One binary, three roles, one TOML config:
//! - `forward`: a DNS-watching TCP port forwarder for an NLB / PrivateLink
//!   target: new connections follow the database's current address, and
//!   connections left on an old one can be closed after a failover.
//! - `ssh`: a forwarding-only SSH server: public keys only, `direct-tcpip`
//!   channels only, and only to allow-listed databases.
//! - `tunnel`: an autossh-style reverse tunnel client that reconnects forever.
//!
//! Roles share [`relay`] (bytes), [`dns`] (names) and, later, `policy`; they
//! never call each other. [`daemon::App`] binds and runs them with the admin
//! endpoint ([`admin`]), signals, drain and idle exit.

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod forward;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod proxy_protocol;
pub mod relay;
pub mod service;
pub mod ssh;
pub mod tunnel;
pub mod upstream;
