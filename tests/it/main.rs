//! The one integration-test binary: it runs the real `jumpgate` executable as a
//! subprocess against real peers (an authoritative DNS server inside this
//! process, TCP upstreams on 127.0.0.2 / 127.0.0.3, PostgreSQL) over loopback.

mod config;
mod drain;
mod forward;
mod probe;
mod proxy;
mod service;
mod ssh;
mod support;
mod tunnel;
