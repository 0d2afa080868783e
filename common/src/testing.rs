//! Test harness (feature `test-utils`): real parts on free ports, torn down on drop.
//!
//! - [`PgServer`]: a throwaway PostgreSQL from the system's binaries: `initdb` into a temp dir,
//!   started on a free port, as an unprivileged user (`nobody`) when the tests run as root
//!   (PostgreSQL refuses root). [`PgServer::create_database`] gives each test its own database.
//! - [`start_embedded_broker`]: the embedded broker on a free port.
//! - [`Mosquitto`]: the system's Mosquitto as an external broker, configured on purpose
//!   (in-flight and queue limits raised, see docs/adr/0001-embedded-broker.md).
//! - [`unique`]: a unique name for databases and topic roots, so tests run in parallel.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::broker::{Acl, EmbeddedBroker};
use crate::config::{AuthConfig, BrokerConfig, MqttConfig};

/// A free TCP port on 127.0.0.1 (bound and released; a small race is accepted in tests).
///
/// Taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), at random: a
/// port from that range can be taken by any outgoing connection between this check and the
/// server's bind, and tests that open thousands of connections made that happen.
pub fn free_port() -> u16 {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        let mut rng = rand::rng();
        for _ in 0..100 {
            let port = rng.random_range(10_000..low);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A name unique in this machine's test runs: `<prefix>_<pid>_<n>_<start>`, where `<start>`
/// is when the process first asked (microseconds, hex): process ids are reused, and a test
/// that got an earlier test's name found what that one left in its state directory.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64 & 0xffff_ffff)
    });
    format!(
        "{prefix}_{}_{}_{start:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where tests keep the state their services write: `<tmp>/nexus-test-state`. The first use
/// in a process removes what finished runs left there ([`sweep_older_than`], an hour).
fn test_state_root() -> PathBuf {
    static SWEPT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let root = std::env::temp_dir().join("nexus-test-state");
    SWEPT.get_or_init(|| {
        sweep_older_than(&root, Duration::from_secs(3600));
    });
    root
}

/// Removes the entries of `root` last changed more than `age` ago, and returns how many it
/// removed. Tests run for minutes, so an entry an hour old belongs to no running test, while
/// the state of tests running beside this one (other processes) is kept.
pub fn sweep_older_than(root: &Path, age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > age);
        if !old {
            continue;
        }
        let path = e.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A directory of the system's temporary directory for `key` (created): the same for the same
/// key, so a service restarted within a test finds what it left there (state files).
pub fn state_dir(key: &str) -> PathBuf {
    let name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = test_state_root().join(name);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A plain HTTP/1.0 request to 127.0.0.1:`port`: the status (0 when nothing listens) and
/// the body.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with(port, method, path, &[], body)
}

/// [`http`] with extra header lines (`"Authorization: Bearer ..."`).
pub fn http_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut out).is_err() {
        return (0, String::new());
    }
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// The value of a Prometheus sample (`name{labels}` as written) in `/metrics` text.
pub fn metric_value(metrics: &str, sample: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(sample)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The metric names a document of `docs/` names (`nexus_...`; a name ending in `_` is a
/// prefix and left out). `doc` may name one section: `security.md#HTTP robustness` reads
/// only the text under `## HTTP robustness`, up to the next `## ` heading.
pub fn documented_metrics(doc: &str) -> Vec<String> {
    let (file, section) = match doc.split_once('#') {
        Some((f, s)) => (f, Some(s)),
        None => (doc, None),
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(file);
    let whole = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let text = match section {
        None => whole,
        Some(name) => {
            let heading = format!("## {name}");
            let mut lines = whole.lines().skip_while(|l| l.trim_end() != heading);
            assert!(
                lines.next().is_some(),
                "docs/{file} has no section {heading:?}"
            );
            lines
                .take_while(|l| !l.starts_with("## "))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let mut names: Vec<String> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("nexus_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(text.len() - start);
        let before_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric());
        let name = &text[start..end];
        if before_ok && !name.ends_with('_') && !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
        i = end;
    }
    names
}

/// Panic unless every metric `docs/<doc>` names is a family in `metrics_text` (a `/metrics`
/// response), listing the missing ones.
pub fn assert_documented_metrics_served(doc: &str, metrics_text: &str) {
    let documented = documented_metrics(doc);
    assert!(!documented.is_empty(), "docs/{doc} names no metric");
    let served = crate::metrics::families(metrics_text);
    let missing: Vec<&String> = documented.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "docs/{doc} names metrics /metrics does not serve: {missing:?}\nserved: {served:?}"
    );
}

/// MQTT settings for a broker on 127.0.0.1:`port`, reconnecting quickly.
pub fn mqtt_config(port: u16) -> MqttConfig {
    MqttConfig {
        host: "127.0.0.1".into(),
        port: Some(port),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        ..MqttConfig::default()
    }
}

/// [`mqtt_config`] logged in as the `svc` account of [`service_broker`].
pub fn service_mqtt_config(port: u16) -> MqttConfig {
    MqttConfig {
        username: Some(SERVICE_USER.0.into()),
        password: Some(crate::config::Secret::new(SERVICE_USER.1.to_owned())),
        ..mqtt_config(port)
    }
}

/// The service account of the test brokers: `svc` / `svc-pw`.
pub const SERVICE_USER: (&str, &str) = ("svc", "svc-pw");
/// A publisher account of the test brokers, `pub` / `pub-pw`, that may publish any topic
/// outside `$` (test data, as a third-party publisher would send it).
pub const PUBLISHER_USER: (&str, &str) = ("pub", "pub-pw");
/// An operator account of the test brokers: `op` / `op-pw`.
pub const OPERATOR_USER: (&str, &str) = ("op", "op-pw");
/// A viewer account of the test brokers: `view` / `view-pw`.
pub const VIEWER_USER: (&str, &str) = ("view", "view-pw");

/// The users of the test brokers: [`SERVICE_USER`], [`PUBLISHER_USER`], [`OPERATOR_USER`],
/// [`VIEWER_USER`]; anonymous clients from 127.0.0.1 are viewers (the defaults).
pub fn test_auth() -> AuthConfig {
    use crate::config::{Role, UserConfig};
    AuthConfig {
        users: vec![
            UserConfig::with_password(SERVICE_USER.0, SERVICE_USER.1, Role::Service),
            UserConfig {
                publish: vec!["#".into()],
                ..UserConfig::with_password(PUBLISHER_USER.0, PUBLISHER_USER.1, Role::Publisher)
            },
            UserConfig::with_password(OPERATOR_USER.0, OPERATOR_USER.1, Role::Operator),
            UserConfig::with_password(VIEWER_USER.0, VIEWER_USER.1, Role::Viewer),
        ],
        ..AuthConfig::default()
    }
}

/// [`mqtt_config`] logged in as the publisher account of [`test_auth`].
pub fn publisher_mqtt_config(port: u16) -> MqttConfig {
    MqttConfig {
        username: Some(PUBLISHER_USER.0.into()),
        password: Some(crate::config::Secret::new(PUBLISHER_USER.1.to_owned())),
        ..mqtt_config(port)
    }
}

/// The embedded broker on a free port of 127.0.0.1 (no WebSocket listener), with the users of
/// [`test_auth`] and `cfg`'s other settings.
pub fn start_embedded_broker(cfg: BrokerConfig) -> EmbeddedBroker {
    start_broker(cfg, &test_auth(), &[], &prometheus::Registry::new())
}

/// The embedded broker on a free port of 127.0.0.1 (no WebSocket listener), with `auth`'s
/// users, the UNS prefixes of `devices` reserved for the service role, and its metrics in
/// `registry`.
pub fn start_broker(
    cfg: BrokerConfig,
    auth: &AuthConfig,
    devices: &[crate::config::DeviceConfig],
    registry: &prometheus::Registry,
) -> EmbeddedBroker {
    start_broker_at(0, cfg, auth, devices, registry)
}

/// The embedded broker of [`start_embedded_broker`] on `port` of 127.0.0.1 (0: a free one),
/// e.g. to bring a broker back on the port of one that died.
pub fn start_embedded_broker_on(port: u16) -> EmbeddedBroker {
    start_broker_at(
        port,
        BrokerConfig::default(),
        &test_auth(),
        &[],
        &prometheus::Registry::new(),
    )
}

fn start_broker_at(
    port: u16,
    mut cfg: BrokerConfig,
    auth: &AuthConfig,
    devices: &[crate::config::DeviceConfig],
    registry: &prometheus::Registry,
) -> EmbeddedBroker {
    cfg.bind = "127.0.0.1".parse().expect("literal address");
    cfg.port = Some(port);
    cfg.ws_port = None;
    if cfg.state_dir == BrokerConfig::default().state_dir {
        // Each test broker keeps its durable state apart (the default is relative to the
        // working directory, shared by concurrent tests).
        cfg.state_dir = Some(test_state_root().join(unique("broker")));
    }
    let ids = crate::auth::Identities::new(auth).expect("test broker users");
    let acl = Acl::new(std::sync::Arc::new(ids), &cfg, devices);
    EmbeddedBroker::start(&cfg, acl, registry).expect("embedded broker starts")
}

/// `registry`'s metrics as `/metrics` serves them (read a sample with [`metric_value`]).
pub fn registry_text(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The embedded broker with the users of [`test_auth`]; Nexus's services log in as
/// [`SERVICE_USER`] ([`service_mqtt_config`]).
pub fn service_broker() -> EmbeddedBroker {
    start_embedded_broker(BrokerConfig::default())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(
            ["/usr/sbin", "/usr/local/sbin", "/sbin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// PostgreSQL server binaries: `NEXUS_PG_BIN`, then PATH, then the newest
/// /usr/lib/postgresql/<version>/bin.
pub fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("NEXUS_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    if let Some(p) = which("initdb") {
        if let Ok(real) = std::fs::canonicalize(&p) {
            return real.parent().map(Path::to_path_buf);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

/// Whether the TimescaleDB extension is installed for the harness's PostgreSQL (its library
/// in the server's package library directory, as `pg_config --pkglibdir` names it, or
/// `<bin>/../lib` where pg_config is not installed). TimescaleDB is not in Debian's packages:
/// the TimescaleDB tests run where someone built or installed it, and report they were
/// skipped elsewhere.
pub fn timescaledb_installed() -> bool {
    let Some(bin) = pg_bin_dir() else {
        return false;
    };
    let pkglib = Command::new(bin.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .or_else(|| bin.parent().map(|p| p.join("lib")));
    pkglib.is_some_and(|d| d.join("timescaledb.so").is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// uid and gid of `user` from /etc/passwd.
fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// A PostgreSQL server for one test binary or test.
pub struct PgServer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    user: Option<(u32, u32)>,
    server_args: Vec<String>,
}

/// Start `postgres` on an initialised data directory `<dir>/data`.
fn spawn_postgres(
    bin: &Path,
    dir: &Path,
    port: u16,
    user: Option<(u32, u32)>,
    extra: &[impl AsRef<std::ffi::OsStr>],
) -> Result<Child, String> {
    let data = dir.join("data");
    let log_path = dir.join("postgres.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| e.to_string())?;
    if let Some((uid, gid)) = user {
        let _ = std::os::unix::fs::chown(&log_path, Some(uid), Some(gid));
    }
    let mut pg = Command::new(bin.join("postgres"));
    pg.arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(&data)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
        ])
        .args([
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=64MB",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    {
        use std::os::unix::process::CommandExt;
        if let Some((uid, gid)) = user {
            pg.uid(uid).gid(gid);
        }
        pg.env("HOME", dir).env_remove("PGDATA");
    }
    pg.spawn().map_err(|e| format!("postgres: {e}"))
}

impl PgServer {
    /// initdb and start; panics with the server's output if that fails.
    pub fn start() -> PgServer {
        Self::try_start().unwrap_or_else(|e| panic!("cannot start PostgreSQL for tests: {e}"))
    }

    pub fn try_start() -> Result<PgServer, String> {
        Self::try_start_with(None, false, &[])
    }

    /// With server settings (`name=value`) over the harness's own, such as a benchmark's
    /// `shared_buffers`; panics as [`PgServer::start`] does.
    pub fn start_with_settings(settings: &[&str]) -> PgServer {
        Self::try_start_with(None, false, settings)
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL for tests: {e}"))
    }

    /// A server with TimescaleDB preloaded (telemetry off), or `None` where the extension is
    /// not installed ([`timescaledb_installed`]).
    pub fn start_with_timescaledb() -> Option<PgServer> {
        timescaledb_installed().then(|| {
            Self::try_start_with(None, true, &[])
                .unwrap_or_else(|e| panic!("cannot start PostgreSQL with TimescaleDB: {e}"))
        })
    }

    /// With TLS: the server presents `cert_pem` (and its `key_pem`); clients may then use
    /// `sslmode=require`.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> PgServer {
        Self::try_start_with(Some((cert_pem, key_pem)), false, &[])
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL with TLS for tests: {e}"))
    }

    fn try_start_with(
        tls: Option<(&str, &str)>,
        timescaledb: bool,
        settings: &[&str],
    ) -> Result<PgServer, String> {
        let bin = pg_bin_dir().ok_or(
            "PostgreSQL server binaries not found (install postgresql or set NEXUS_PG_BIN)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("nexus-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(|e| e.to_string())?;
        let user = if is_root() {
            Some(
                lookup_user("nobody")
                    .ok_or("running as root and no user nobody to run PostgreSQL")?,
            )
        } else {
            None
        };
        if let Some((uid, gid)) = user {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
            chown_tree(&data, uid, gid).map_err(|e| e.to_string())?;
        }
        let as_user = |cmd: &mut Command| {
            use std::os::unix::process::CommandExt;
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
            cmd.env("HOME", dir.path()).env_remove("PGDATA");
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.args(["-D"]).arg(&data).args([
            "-U",
            "nexus",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ]);
        as_user(&mut initdb);
        let out = initdb.output().map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut server_args: Vec<&str> = Vec::new();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let (c, k) = (data.join("server.crt"), data.join("server.key"));
            std::fs::write(&c, cert).map_err(|e| e.to_string())?;
            std::fs::write(&k, key).map_err(|e| e.to_string())?;
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| e.to_string())?;
            if let Some((uid, gid)) = user {
                for f in [&c, &k] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
                }
            }
            server_args = vec![
                "-c",
                "ssl=on",
                "-c",
                "ssl_cert_file=server.crt",
                "-c",
                "ssl_key_file=server.key",
            ];
        }
        if timescaledb {
            server_args.extend([
                "-c",
                "shared_preload_libraries=timescaledb",
                "-c",
                "timescaledb.telemetry_level=off",
            ]);
        }
        for s in settings {
            server_args.extend(["-c", s]);
        }
        let port = free_port();
        let child = spawn_postgres(&bin, dir.path(), port, user, &server_args)?;
        let mut server = PgServer {
            port,
            child,
            dir,
            user,
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
        };
        server.wait_ready(Duration::from_secs(30))?;
        Ok(server)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("postgres exited with {status}: {}", self.log()));
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Accepting TCP is not yet accepting logins; ask with a query.
                let ok = Command::new(
                    pg_bin_dir()
                        .map(|b| b.join("psql"))
                        .unwrap_or_else(|| "psql".into()),
                )
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "nexus",
                    "-d",
                    "postgres",
                    "-Atc",
                    "select 1",
                ])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
                if ok {
                    return Ok(());
                }
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "postgres not ready after {limit:?}: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://nexus@127.0.0.1:{}/{db}", self.port)
    }

    /// Create a fresh database and return its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to test PostgreSQL: {e}"));
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        drop(client);
        let _ = task.await;
        self.url(name)
    }

    /// The postmaster's process id (its backends are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stop the server (fast shutdown), as an outage would.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the server again after [`PgServer::stop`], on the same port and data.
    pub fn restart(&mut self) {
        let bin = pg_bin_dir().expect("PostgreSQL binaries");
        self.child = spawn_postgres(
            &bin,
            self.dir.path(),
            self.port,
            self.user,
            &self.server_args,
        )
        .unwrap_or_else(|e| panic!("restart PostgreSQL: {e}"));
        self.wait_ready(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("restart PostgreSQL: {e}"));
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Whether the server runs as a dropped-privilege user.
    pub fn runs_unprivileged(&self) -> bool {
        self.user.is_some()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The system's Mosquitto on a free port.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Start with `extra` appended to the generated config (e.g. ACL or password settings).
    pub fn start(extra: &str) -> Result<Mosquitto, String> {
        let bin =
            which("mosquitto").ok_or("mosquitto not installed (apt-get install mosquitto)")?;
        let dir = tempfile::Builder::new()
            .prefix("nexus-mosquitto-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
        }
        let port = free_port();
        let anonymous = if extra.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        // Limits raised on purpose: the defaults (20 in flight, 1000 queued) drop or stall
        // QoS 1 traffic under load (docs/adr/0001-embedded-broker.md).
        let conf = format!(
            "listener {port} 127.0.0.1\n{anonymous}persistence false\nmax_inflight_messages 1000\nmax_queued_messages 1000000\nmax_queued_bytes 0\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n{extra}\n"
        );
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&conf_path, std::fs::Permissions::from_mode(0o644));
        }
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("mosquitto: {e}"))?;
        let mut m = Mosquitto {
            port,
            child,
            _dir: dir,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(s)) = m.child.try_wait() {
                return Err(format!("mosquitto exited with {s}"));
            }
            if start.elapsed() > Duration::from_secs(10) {
                m.stop();
                return Err("mosquitto did not listen within 10s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    /// The directory holding its config (for ACL and password files).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Python interpreter with the test peers (pymodbus, ...): `NEXUS_TEST_PYTHON`, else the
/// virtualenv scripts/test.sh makes in target/test-venv, else `python3`.
pub fn test_python() -> String {
    if let Ok(p) = std::env::var("NEXUS_TEST_PYTHON") {
        return p;
    }
    let venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/test-venv/bin/python"
    );
    if Path::new(venv).exists() {
        return venv.to_owned();
    }
    "python3".to_owned()
}

/// A Python test peer: `tests/peers/<script>` of the repository, run with `args`, killed on
/// drop. Panics with a clear message when `module` is not importable.
pub struct PythonPeer(Child);

impl PythonPeer {
    pub fn start(script: &str, module: &str, args: &[String], port: u16) -> PythonPeer {
        let py = test_python();
        let ok = Command::new(&py)
            .args(["-c", &format!("import {module}")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "{module} is not installed for {py}: run scripts/test.sh (it installs the test peers into target/test-venv)");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/peers/").to_owned() + script;
        let child = Command::new(py)
            .arg(path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python peer");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{script} did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PythonPeer(child)
    }
}

impl Drop for PythonPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A small tmpfs mounted on a new temporary directory, unmounted when dropped: a disk that
/// fills up or turns read-only on demand. Needs the right to mount (root, CAP_SYS_ADMIN), as
/// the test harness has.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mount `size` (`"2m"`).
    pub fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("temporary directory");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fill what is left with `<dir>/filler` (the disk is full afterwards).
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).expect("filler file");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }

    /// Free what [`SmallDisk::fill`] took.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.path().join("filler"));
    }

    /// Read-only (`true`) or writable again. A read-only bind mount over the directory: files
    /// already open for writing stay writable (as on a disk the kernel turned read-only, what
    /// fails is the next file created or opened).
    pub fn read_only(&self, ro: bool) {
        let run = |args: &[&str]| {
            Command::new(args[0])
                .args(&args[1..])
                .arg(self.path())
                .status()
                .is_ok_and(|s| s.success())
        };
        let path = self.path().to_string_lossy().into_owned();
        let ok = if ro {
            run(&["mount", "--bind", &path]) && run(&["mount", "-o", "remount,bind,ro"])
        } else {
            run(&["umount"])
        };
        assert!(ok, "making {path} read-only={ro} failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
