//! A real PostgreSQL server for the tests: `initdb` in a temporary directory,
//! `postgres` on a free 127.0.0.1 port with its unix socket in that directory,
//! a table `items` with known rows, stopped on drop. Queries go through the
//! real `psql` client. [`Postgres::try_start_on`] picks the address and can
//! turn TLS on. As root, PostgreSQL refuses to run, so the server runs
//! as the `postgres` user (or `nobody`) through `setpriv`.

use std::ffi::CString;
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{free_port, wait_for};

/// The rows of table `items`, as `psql -At` prints `select id, name from items order by id`.
pub const ITEMS: &str = "1|alpha\n2|beta\n3|gamma";

/// A running PostgreSQL; killed (immediate shutdown) and its files removed on drop.
pub struct Postgres {
    child: Child,
    host: IpAddr,
    port: u16,
    dir: tempfile::TempDir,
}

/// Where a PostgreSQL program lives: `PATH` first, then the newest
/// `/usr/lib/postgresql/*/bin`. Panics naming the Debian package if absent.
pub fn program(name: &str, package: &str) -> PathBuf {
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }) {
        return found;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().map(|d| d.path().join("bin").join(name)).collect())
        .unwrap_or_default();
    versions.retain(|p| p.is_file());
    // Newest major version last ("9" < "15" needs a numeric sort).
    versions.sort_by_key(|p| {
        p.ancestors()
            .nth(2)
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().unwrap_or_else(|| {
        panic!(
            "`{name}` not found in PATH nor /usr/lib/postgresql/*/bin: \
             install the Debian package `{package}` (scripts/test does)"
        )
    })
}

/// The unprivileged (uid, gid, user name) the server runs as when the tests run as root.
fn server_user() -> Option<(u32, u32, &'static str)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in ["postgres", "nobody"] {
        let cname = CString::new(name).expect("no NUL");
        // SAFETY: getpwnam reads a NUL-terminated name; the result is copied at once.
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: pw is non-null and points to a valid passwd entry.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Some((uid, gid, name));
        }
    }
    panic!("running as root and neither user `postgres` nor `nobody` exists to run PostgreSQL");
}

fn chown(path: &Path, uid: u32, gid: u32) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL in temp path");
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
    assert_eq!(
        rc,
        0,
        "chown {} failed: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// `program args...`, as the server user when running as root.
fn as_server_user(program: &Path) -> Command {
    match server_user() {
        Some((uid, gid, _)) => {
            let mut cmd = Command::new("setpriv");
            cmd.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".to_string(),
                "--".to_string(),
            ]);
            cmd.arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: cannot run: {e} (is util-linux installed?)"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Postgres {
    /// initdb, start on a free port of 127.0.0.1, wait until it answers,
    /// create `items`. Panics with PostgreSQL's own log if it does not come
    /// up within 30 s.
    pub fn start() -> Self {
        // A port free a moment ago can be taken meanwhile: try a few.
        for _ in 0..5 {
            if let Ok(pg) = Self::try_start_on(IpAddr::from([127, 0, 0, 1]), free_port(), false) {
                return pg;
            }
        }
        panic!("postgres could not bind a free port in 5 tries");
    }

    /// As [`Postgres::start`], listening on `ip:port`, with TLS on (a
    /// self-signed certificate made by `openssl`) or off. `Err` with the
    /// server's log when that address cannot be bound; any other failure panics.
    pub fn try_start_on(ip: IpAddr, port: u16, tls: bool) -> Result<Self, String> {
        let initdb = program("initdb", "postgresql");
        let postgres = program("postgres", "postgresql");
        program("psql", "postgresql-client");
        let dir = tempfile::Builder::new()
            .prefix("jumpgate-pg-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        if let Some((uid, gid, _)) = server_user() {
            chown(dir.path(), uid, gid);
        }
        check(
            "initdb",
            as_server_user(&initdb)
                .current_dir(dir.path())
                .args(["-D"])
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .stdin(Stdio::null())
                .output(),
        );
        let mut settings: Vec<String> = Vec::new();
        if tls {
            let (cert, key) = self_signed_certificate(dir.path());
            settings.extend([
                "-c".into(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", cert.display()),
                "-c".into(),
                format!("ssl_key_file={}", key.display()),
            ]);
        }
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("log file");
        if let Some((uid, gid, _)) = server_user() {
            chown(&dir.path().join("postgres.log"), uid, gid);
        }
        let child = as_server_user(&postgres)
            .current_dir(dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-h", &ip.to_string(), "-F", "-k"])
            .arg(dir.path())
            .args(&settings)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        let mut pg = Postgres {
            child,
            host: ip,
            port,
            dir,
        };
        let up = wait_for(Duration::from_secs(30), || {
            if pg.child.try_wait().ok().flatten().is_some() {
                return Some(false);
            }
            psql_at(ip, port, "select 1")
                .ok()
                .filter(|out| out == "1")
                .map(|_| true)
        });
        match up {
            Some(true) => {
                psql_at(
                    ip,
                    port,
                    "create table items (id int primary key, name text not null); \
                     insert into items values (1, 'alpha'), (2, 'beta'), (3, 'gamma');",
                )
                .unwrap_or_else(|e| panic!("psql on {ip}:{port} failed: {e}\nserver log:\n{}", pg.log()));
                Ok(pg)
            }
            Some(false) => {
                // Exited: most likely the address was taken.
                let log = pg.log();
                if !log.contains("could not bind") && !log.contains("in use") {
                    panic!("postgres exited at start:\n{log}");
                }
                Err(log)
            }
            None => panic!("postgres did not answer within 30 s:\n{}", pg.log()),
        }
    }

    /// The address PostgreSQL listens on.
    pub fn host(&self) -> IpAddr {
        self.host
    }

    /// The port PostgreSQL listens on (at 127.0.0.1 for [`Postgres::start`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Runs `sql` through `psql -h 127.0.0.1 -p port -At` (tuples only,
    /// `|`-separated) and returns its trimmed output; panics on failure.
    pub fn query(&self, port: u16, sql: &str) -> String {
        self.try_query(port, sql)
            .unwrap_or_else(|e| panic!("psql on port {port} failed: {e}\nserver log:\n{}", self.log()))
    }

    /// As [`Postgres::query`], but returns psql's stderr as the error.
    pub fn try_query(&self, port: u16, sql: &str) -> Result<String, String> {
        psql(port, sql)
    }
}

/// `psql -h 127.0.0.1 -p PORT -U postgres -d postgres -Atc SQL` with a 5 s
/// connect timeout; its trimmed stdout, or its stderr as the error.
pub fn psql(port: u16, sql: &str) -> Result<String, String> {
    psql_at(IpAddr::from([127, 0, 0, 1]), port, sql)
}

/// As [`psql`], to `host:port`.
pub fn psql_at(host: IpAddr, port: u16, sql: &str) -> Result<String, String> {
    let psql = program("psql", "postgresql-client");
    let out = Command::new(psql)
        .args([
            "-h",
            &host.to_string(),
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGSSLMODE", "disable")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A self-signed certificate and its key for `localhost`, made by `openssl`
/// in `dir`, readable by the server user only; (certificate, key) paths.
fn self_signed_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let openssl = super::ssh::program("openssl", "openssl");
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    check(
        "openssl req",
        Command::new(openssl)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdin(Stdio::null())
            .output(),
    );
    // PostgreSQL refuses a key file that others can read.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod key");
    if let Some((uid, gid, _)) = server_user() {
        chown(&cert, uid, gid);
        chown(&key, uid, gid);
    }
    (cert, key)
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Never signal a pid that was already reaped (it may belong to another process now).
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SIGQUIT is PostgreSQL's immediate shutdown; the data dir is thrown away anyway.
        // SAFETY: kill on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGQUIT);
        }
        let exited = wait_for(Duration::from_secs(10), || self.child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
