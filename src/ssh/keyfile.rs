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
