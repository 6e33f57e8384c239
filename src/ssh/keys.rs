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
    /// An `env:` or `cmd:` source failed. The message never holds the key.
    #[error("{entry}: {why}")]
    Source { entry: String, why: String },
}

/// How long a `cmd:` host-key source may run.
const SOURCE_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
            HostKeySource::Env(_) | HostKeySource::Cmd(_) => Ok(HostKey {
                key: read_source(source)?,
                path: PathBuf::from(source.to_string()),
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

/// The public half of a configured host key, without generating anything
/// (a generated key is read from `state_dir`, where the first start wrote it).
pub fn configured_public(source: &HostKeySource, state_dir: &Path) -> Result<PublicKey, KeyError> {
    match source {
        HostKeySource::Path(p) => read_any_public(p),
        HostKeySource::Generate(kind) => read_any_public(&state_dir.join(kind.file_name())),
        HostKeySource::Env(_) | HostKeySource::Cmd(_) => read_source(source).map(|k| k.public_key().clone()),
    }
}

/// Reads the key of an `env:` or `cmd:` source. A source that fails is an
/// error naming the entry, never a reason to generate a key: every instance
/// behind a load balancer must present the same one.
pub fn read_source(source: &HostKeySource) -> Result<PrivateKey, KeyError> {
    let entry = source.to_string();
    let fail = |why: String| KeyError::Source {
        entry: entry.clone(),
        why,
    };
    let text = match source {
        HostKeySource::Env(name) => std::env::var(name).map_err(|e| match e {
            std::env::VarError::NotPresent => fail("the variable is not set".into()),
            std::env::VarError::NotUnicode(_) => fail("the variable is not UTF-8".into()),
        })?,
        HostKeySource::Cmd(command) => run_source_command(command).map_err(fail)?,
        other => return Err(fail(format!("{other} is not an env: or cmd: source"))),
    };
    // ssh_key's errors describe the format, never the bytes.
    let key = PrivateKey::from_openssh(text.trim())
        .map_err(|e| fail(format!("not an unencrypted OpenSSH private key ({e})")))?;
    if key.is_encrypted() {
        return Err(fail("the key is encrypted with a passphrase".into()));
    }
    Ok(key)
}

/// Runs `sh -c command` with a deadline; its stdout on success.
fn run_source_command(command: &str) -> Result<String, String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the command: {e}"))?;
    let deadline = std::time::Instant::now() + SOURCE_COMMAND_TIMEOUT;
    // Read stdout on a thread so a large output cannot block the child.
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the command did not finish within {SOURCE_COMMAND_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("cannot wait for the command: {e}")),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        // Only the first line, shortened: enough to diagnose, too little to leak.
        let first: String = err.lines().next().unwrap_or("").chars().take(200).collect();
        return Err(format!(
            "the command failed ({status}){}",
            if first.is_empty() {
                String::new()
            } else {
                format!(": {first}")
            }
        ));
    }
    Ok(out)
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
    fs::write(pub_path(path), format!("{public}\n")).map_err(write_err)?;
    fs::rename(&tmp, path).map_err(write_err)?;
    Ok(key)
}

/// Where OpenSSH keeps a private key's public half: `PATH.pub`.
pub fn pub_path(private: &Path) -> std::path::PathBuf {
    let mut path = private.as_os_str().to_owned();
    path.push(".pub");
    path.into()
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
    fn cmd_and_env_sources_load_the_same_key_and_failures_name_the_entry_without_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = generate(HostKeyType::Ed25519, &path).unwrap();
        let cmd = HostKeySource::Cmd(format!("cat {}", path.display()));
        let a = load_host_keys(std::slice::from_ref(&cmd), dir.path()).unwrap();
        let b = load_host_keys(std::slice::from_ref(&cmd), dir.path()).unwrap();
        assert_eq!(fingerprint(a[0].key.public_key()), fingerprint(key.public_key()));
        assert_eq!(
            fingerprint(b[0].key.public_key()),
            fingerprint(key.public_key()),
            "same source, same key"
        );

        let failing = HostKeySource::Cmd("echo oops >&2; exit 3".into());
        let err = load_host_keys(&[failing], dir.path())
            .err()
            .expect("a failing command stops start-up")
            .to_string();
        assert!(
            err.starts_with("cmd:echo oops >&2; exit 3: the command failed"),
            "{err}"
        );
        assert!(err.contains("oops"), "{err}");

        // The output holds "SECRETSTUFF"; the command text does not.
        let garbage = HostKeySource::Cmd(
            "echo -----BEGIN OPENSSH PRIVATE KEY-----; echo U0VDUkVUU1RVRkY= | base64 -d; echo -----END OPENSSH PRIVATE KEY-----"
                .into(),
        );
        let err = load_host_keys(&[garbage], dir.path())
            .err()
            .expect("unparsable")
            .to_string();
        assert!(err.contains("not an unencrypted OpenSSH private key"), "{err}");
        assert!(!err.contains("SECRETSTUFF"), "the message must not hold the key: {err}");

        let unset = HostKeySource::Env("JUMPGATE_TEST_SURELY_UNSET_VAR".into());
        let err = load_host_keys(&[unset], dir.path()).err().expect("unset").to_string();
        assert_eq!(err, "env:JUMPGATE_TEST_SURELY_UNSET_VAR: the variable is not set");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() == 2,
            "no key was generated for a failing source"
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
