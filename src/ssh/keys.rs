//! Host keys: generated in `state_dir` on first start (OpenSSH format, mode
//! 0600, readable by `ssh-keygen`) or loaded from a path; and fingerprint
//! lines as `ssh-keygen -l` prints them.
//!
//! Every instance behind a load balancer must present the same key, so a
//! key that exists is never replaced: a key file that cannot be read is a
//! start-up error, never a reason to generate a new one.

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKey, PublicKey};

use crate::config::{HostKeySource, HostKeyType};

/// The comment written into generated keys.
pub const COMMENT: &str = "jumpgate";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: cannot read the key: {why} (check the file is an unencrypted OpenSSH private key)")]
    Read { path: String, why: String },
    #[error(
        "{path}: the key is encrypted with a passphrase (jumpgate needs an unencrypted key: ssh-keygen -p -N '' -f {path})"
    )]
    Encrypted { path: String },
    #[error("{path}: holds a {found} key where a {wanted} key belongs (move the file away or fix host_keys)")]
    WrongType {
        path: String,
        found: String,
        wanted: String,
    },
    #[error("{path}: cannot write the key: {source}")]
    Write { path: String, source: io::Error },
    #[error("cannot generate a {0} key: {1}")]
    Generate(String, String),
}

/// A loaded host key and where it came from.
pub struct HostKey {
    pub key: PrivateKey,
    pub path: PathBuf,
    /// True when this start generated it.
    pub generated: bool,
}

/// Loads every configured host key, generating missing `Generate` ones in `state_dir`.
pub fn load_host_keys(sources: &[HostKeySource], state_dir: &Path) -> Result<Vec<HostKey>, KeyError> {
    sources
        .iter()
        .map(|source| match source {
            HostKeySource::Path(path) => Ok(HostKey {
                key: read_private(path)?,
                path: path.clone(),
                generated: false,
            }),
            HostKeySource::Generate(kind) => {
                let path = state_dir.join(kind.file_name());
                if path.exists() {
                    let key = read_private(&path)?;
                    if !same_kind(key.algorithm(), *kind) {
                        return Err(KeyError::WrongType {
                            path: path.display().to_string(),
                            found: key.algorithm().to_string(),
                            wanted: algorithm(*kind).to_string(),
                        });
                    }
                    Ok(HostKey {
                        key,
                        path,
                        generated: false,
                    })
                } else {
                    let key = generate(*kind, &path)?;
                    Ok(HostKey {
                        key,
                        path,
                        generated: true,
                    })
                }
            }
        })
        .collect()
}

fn same_kind(found: Algorithm, kind: HostKeyType) -> bool {
    matches!(
        (found, kind),
        (Algorithm::Ed25519, HostKeyType::Ed25519)
            | (Algorithm::Ecdsa { .. }, HostKeyType::Ecdsa)
            | (Algorithm::Rsa { .. }, HostKeyType::Rsa)
    )
}

fn algorithm(kind: HostKeyType) -> Algorithm {
    match kind {
        HostKeyType::Ed25519 => Algorithm::Ed25519,
        // P-256: what older Java SSH clients know (ssh-audit flags NIST
        // curves; `host_keys = ["ed25519"]` turns it off).
        HostKeyType::Ecdsa => Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
        HostKeyType::Rsa => Algorithm::Rsa { hash: None },
    }
}

/// Reads an unencrypted OpenSSH private key.
pub fn read_private(path: &Path) -> Result<PrivateKey, KeyError> {
    let shown = path.display().to_string();
    let key = PrivateKey::read_openssh_file(path).map_err(|e| KeyError::Read {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(KeyError::Encrypted { path: shown });
    }
    Ok(key)
}

/// Generates a key of `kind` at `path` (0600) with `path.pub` beside it.
/// The private key is written to a temporary file and renamed, so a crash
/// never leaves a half-written key that a restart would refuse.
pub fn generate(kind: HostKeyType, path: &Path) -> Result<PrivateKey, KeyError> {
    let alg = algorithm(kind);
    let mut key = PrivateKey::random(&mut rand::rng(), alg.clone())
        .map_err(|e| KeyError::Generate(alg.to_string(), e.to_string()))?;
    key.set_comment(COMMENT);
    let shown = path.display().to_string();
    let write_err = |source| KeyError::Write {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        fs::create_dir_all(dir).map_err(write_err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(write_err)?;
    }
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| write_err(io::Error::other(e.to_string())))?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write_err)?;
        f.write_all(pem.as_bytes()).map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
    }
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| write_err(io::Error::other(e.to_string())))?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    fs::write(&pub_path, format!("{public}\n")).map_err(write_err)?;
    fs::rename(&tmp, path).map_err(write_err)?;
    Ok(key)
}

/// Key size in bits as `ssh-keygen -l` shows it.
pub fn bits(key: &PublicKey) -> usize {
    match key.key_data() {
        KeyData::Ed25519(_) => 256,
        KeyData::Ecdsa(e) => match e.curve() {
            EcdsaCurve::NistP256 => 256,
            EcdsaCurve::NistP384 => 384,
            EcdsaCurve::NistP521 => 521,
        },
        KeyData::Rsa(rsa) => {
            let n = rsa.n().as_positive_bytes().unwrap_or_default();
            let lead = n.first().map_or(0, |b| b.leading_zeros() as usize);
            n.len() * 8 - lead
        }
        _ => 0,
    }
}

/// The type in parentheses at the end of an `ssh-keygen -l` line.
fn type_name(key: &PublicKey) -> &'static str {
    match key.algorithm() {
        Algorithm::Ed25519 => "ED25519",
        Algorithm::Ecdsa { .. } => "ECDSA",
        Algorithm::Rsa { .. } => "RSA",
        Algorithm::Dsa => "DSA",
        _ => "OTHER",
    }
}

/// `SHA256:...` of a public key.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// `256 SHA256:... comment (ED25519)`, as `ssh-keygen -l` prints it.
pub fn fingerprint_line(key: &PublicKey) -> String {
    let comment = key.comment().to_string();
    let comment = if comment.is_empty() {
        "no comment".to_string()
    } else {
        comment
    };
    format!("{} {} {} ({})", bits(key), fingerprint(key), comment, type_name(key))
}

/// Reads a public key file, or the public half of a private key file.
pub fn read_any_public(path: &Path) -> Result<PublicKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|e| KeyError::Read {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    if text.contains("PRIVATE KEY") {
        // The public half is readable even from an encrypted private key.
        let key = PrivateKey::from_openssh(&text).map_err(|e| KeyError::Read {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        return Ok(key.public_key().clone());
    }
    PublicKey::from_openssh(text.trim()).map_err(|e| KeyError::Read {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_persist_with_mode_0600_and_a_pub_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let sources = [
            HostKeySource::Generate(HostKeyType::Ed25519),
            HostKeySource::Generate(HostKeyType::Ecdsa),
        ];
        let first = load_host_keys(&sources, &state).unwrap();
        assert!(first.iter().all(|k| k.generated));
        for k in &first {
            let mode = fs::metadata(&k.path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.path.display());
            let public = read_any_public(&PathBuf::from(format!("{}.pub", k.path.display()))).unwrap();
            assert_eq!(&public.key_data(), &k.key.public_key().key_data());
        }
        let again = load_host_keys(&sources, &state).unwrap();
        assert!(
            again.iter().all(|k| !k.generated),
            "the second start loads, never regenerates"
        );
        for (a, b) in first.iter().zip(&again) {
            assert_eq!(fingerprint(a.key.public_key()), fingerprint(b.key.public_key()));
        }
        assert!(fingerprint_line(first[0].key.public_key()).starts_with("256 SHA256:"));
        assert!(fingerprint_line(first[0].key.public_key()).ends_with(" jumpgate (ED25519)"));
        assert!(fingerprint_line(first[1].key.public_key()).ends_with(" jumpgate (ECDSA)"));
    }

    #[test]
    fn an_unreadable_key_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ssh_host_ed25519_key"), "garbage").unwrap();
        let err = load_host_keys(&[HostKeySource::Generate(HostKeyType::Ed25519)], dir.path())
            .err()
            .expect("garbage is refused");
        assert!(
            err.to_string().contains("ssh_host_ed25519_key: cannot read the key"),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("ssh_host_ed25519_key")).unwrap(),
            "garbage"
        );
    }

    #[test]
    fn a_key_of_the_wrong_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        generate(HostKeyType::Ed25519, &dir.path().join("ssh_host_ecdsa_key")).unwrap();
        let err = load_host_keys(&[HostKeySource::Generate(HostKeyType::Ecdsa)], dir.path())
            .err()
            .expect("wrong type refused");
        assert!(err.to_string().contains("holds a ssh-ed25519 key"), "{err}");
    }
}
