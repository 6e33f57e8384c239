//! A user's authorized_keys file, re-read when it changes (as sshd reads it
//! at each login), so adding or removing a key needs no restart. Parse
//! warnings (a skipped line) are logged once per change of the file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tracing::{info, warn};

use crate::ssh::authorized_keys::{self, AuthorizedKey};

pub struct KeyFile {
    path: PathBuf,
    cache: Mutex<Cache>,
}

struct Cache {
    /// (mtime, length) of the file when last read; None: never read or unreadable.
    stamp: Option<(SystemTime, u64)>,
    keys: Arc<Vec<AuthorizedKey>>,
    /// Why there are no keys, when there are none.
    error: Option<String>,
}

impl KeyFile {
    pub fn new(path: PathBuf) -> KeyFile {
        let file = KeyFile {
            path,
            cache: Mutex::new(Cache {
                stamp: None,
                keys: Arc::new(Vec::new()),
                error: None,
            }),
        };
        file.current();
        file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keys as the file holds them now.
    pub fn current(&self) -> Arc<Vec<AuthorizedKey>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp == cache.stamp {
            return cache.keys.clone();
        }
        match authorized_keys::load(&self.path) {
            Ok(parsed) => {
                for w in &parsed.warnings {
                    warn!(file = %self.path.display(), "{w}");
                }
                let n = parsed.keys.len();
                if cache.stamp.is_some() {
                    info!(file = %self.path.display(), keys = n, "authorized keys re-read");
                }
                cache.error = (n == 0).then(|| format!("{}: no usable key", self.path.display()));
                cache.keys = Arc::new(parsed.keys);
            }
            Err(e) => {
                if cache.error.is_none() || cache.stamp.is_some() {
                    warn!(file = %self.path.display(), error = %e, "cannot read authorized keys");
                }
                cache.error = Some(format!("{}: {e}", self.path.display()));
                cache.keys = Arc::new(Vec::new());
            }
        }
        cache.stamp = stamp;
        cache.keys.clone()
    }

    /// Why `current()` is empty (for /readyz/ssh).
    pub fn why_empty(&self) -> String {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .error
            .clone()
            .unwrap_or_else(|| format!("{}: no usable key", self.path.display()))
    }
}

/// The service's public key for a destination group, fetched from its API
/// (see `crate::service`) and cached in `state_dir`, so a restart without
/// API access still admits the service.
pub struct GroupKey {
    pub group: String,
    cache: PathBuf,
    state: Mutex<GroupState>,
}

struct GroupState {
    key: Option<russh::keys::PublicKey>,
    /// Why there is no key, or why the last refresh failed.
    error: Option<String>,
}

impl GroupKey {
    /// Where the key of `group` is cached between runs.
    pub fn cache_path(state_dir: &Path, group: &str) -> std::path::PathBuf {
        state_dir.join(format!("service_group_{group}.pub"))
    }

    /// Loads the cached key from `state_dir`, if any.
    pub fn new(group: &str, state_dir: &Path) -> GroupKey {
        let cache = GroupKey::cache_path(state_dir, group);
        let (key, error) = match std::fs::read_to_string(&cache) {
            Ok(text) => match russh::keys::PublicKey::from_openssh(text.trim()) {
                Ok(k) => {
                    info!(group, file = %cache.display(), "service key loaded from the cache");
                    (Some(k), None)
                }
                Err(e) => (None, Some(format!("{}: unreadable cached key: {e}", cache.display()))),
            },
            Err(_) => (None, Some(format!("service group {group}: no key fetched yet"))),
        };
        GroupKey {
            group: group.to_string(),
            cache,
            state: Mutex::new(GroupState { key, error }),
        }
    }

    pub fn current(&self) -> Option<russh::keys::PublicKey> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).key.clone()
    }

    pub fn why_empty(&self) -> String {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .error
            .clone()
            .unwrap_or_else(|| format!("service group {}: no key", self.group))
    }

    /// Takes a freshly fetched key line: parsed, cached, served.
    pub fn update(&self, line: &str) -> Result<(), String> {
        let key = russh::keys::PublicKey::from_openssh(line.trim())
            .map_err(|e| format!("the service's key for group {} does not parse: {e}", self.group))?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.key.as_ref().map(|k| k.key_data()) != Some(key.key_data()) {
            info!(group = %self.group, key = %crate::ssh::keys::fingerprint(&key), "service key updated");
            if let Some(dir) = self.cache.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = std::fs::write(&self.cache, format!("{}\n", line.trim())) {
                warn!(file = %self.cache.display(), error = %e, "cannot cache the service key");
            }
        }
        state.key = Some(key);
        state.error = None;
        Ok(())
    }

    /// Records a failed refresh; the last good key keeps serving.
    pub fn failed(&self, why: String) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.key.is_none() {
            state.error = Some(why);
        }
    }
}
