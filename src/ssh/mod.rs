//! The ssh role: a forwarding-only SSH server. `server` accepts and applies
//! pre-auth limits, `handler` authenticates and decides channels (through
//! `crate::policy`), `keys` owns host keys and fingerprints,
//! `authorized_keys` parses users' keys and their options, `keyfile`
//! re-reads a user's file when it changes.

pub mod authorized_keys;
pub mod handler;
pub mod keyfile;
pub mod keys;
pub mod server;
