//! PostgreSQL connections for every service, from the `database` section: credentials from
//! the URL (never logged: [`crate::config::SecretUrl`]), and TLS through rustls when the URL's
//! `sslmode` asks for it (`prefer` tries TLS first, `require` insists). Server certificates are
//! always verified, against the webpki roots plus an optional CA file (`database.ca_file`):
//! Nexus does not offer libpq's unverified `require`.
//!
//! Every connection has a connect timeout, a server-side `statement_timeout`, TCP keepalives
//! and a TCP user timeout, so a database that stops answering (or drops packets) fails calls
//! within the timeouts instead of stalling them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{DatabaseConfig, SecretUrl};

use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid database URL ({0})")]
    Url(String),
    #[error("cannot read the database CA file {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("the database URL asks for no TLS (sslmode=disable) but database.require_tls is set")]
    TlsRequired,
    #[error("cannot connect to the database: {}", describe(.0))]
    Connect(#[from] tokio_postgres::Error),
}

/// A PostgreSQL error with the server's message (tokio-postgres says only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn tls(ca_file: Option<&Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PgError> {
    crate::install_tls_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        use rustls::pki_types::pem::PemObject;
        let err = |reason: String| PgError::Ca {
            path: path.display().to_string(),
            reason,
        };
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?;
        for c in certs {
            roots
                .add(c.map_err(|e| err(e.to_string()))?)
                .map_err(|e| err(e.to_string()))?;
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Where and how to connect: the `database` section with its URL present.
#[derive(Debug, Clone)]
pub struct Database {
    pub url: SecretUrl,
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub require_tls: bool,
}

impl Database {
    /// The configured database, or `None` when `database.url` is not set.
    pub fn from_config(cfg: &DatabaseConfig) -> Option<Database> {
        Some(Database {
            url: cfg.url.clone()?,
            ca_file: cfg.ca_file.clone(),
            pool_size: cfg.pool_size,
            connect_timeout: cfg.connect_timeout,
            statement_timeout: cfg.statement_timeout,
            require_tls: cfg.require_tls,
        })
    }

    /// `url` with the section's defaults (tools and tests).
    pub fn at(url: &str) -> Database {
        let d = DatabaseConfig::default();
        Database {
            url: SecretUrl(crate::config::Secret::new(url)),
            ca_file: None,
            pool_size: d.pool_size,
            connect_timeout: d.connect_timeout,
            statement_timeout: d.statement_timeout,
            require_tls: d.require_tls,
        }
    }

    pub fn with_ca_file(mut self, ca_file: &Path) -> Database {
        self.ca_file = Some(ca_file.to_path_buf());
        self
    }
}

/// Connect; the returned task drives the connection (it ends when the client is dropped or
/// the connection fails).
pub async fn connect(db: &Database) -> Result<(Client, JoinHandle<()>), PgError> {
    let url = db.url.expose();
    let ca_file = db.ca_file.as_deref();
    // The parser's message may quote the URL; keep the password out of it.
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| PgError::Url(crate::config::types::redact_url(url)))?;
    if db.require_tls {
        match config.get_ssl_mode() {
            SslMode::Disable => return Err(PgError::TlsRequired),
            // `prefer` would fall back to plain text when the server offers no TLS.
            _ => {
                config.ssl_mode(SslMode::Require);
            }
        }
    }
    config
        .connect_timeout(db.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(15))
        .tcp_user_timeout(db.statement_timeout + db.connect_timeout);
    // The statement timeout is set once connected, not as a startup parameter: poolers such
    // as PgBouncer refuse `options`, and one the URL sets itself is left as it is.
    let url_sets_timeout = config
        .get_options()
        .is_some_and(|o| o.contains("statement_timeout"));
    let log_err =
        |e: tokio_postgres::Error| tracing::warn!(error = %e, "database connection ended");
    let (client, task) = if config.get_ssl_mode() == SslMode::Disable {
        let (client, conn) = config.connect(NoTls).await?;
        (
            client,
            tokio::spawn(async move { conn.await.unwrap_or_else(log_err) }),
        )
    } else {
        let (client, conn) = config.connect(tls(ca_file)?).await?;
        (
            client,
            tokio::spawn(async move { conn.await.unwrap_or_else(log_err) }),
        )
    };
    if !url_sets_timeout {
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                db.statement_timeout.as_millis()
            ))
            .await?;
    }
    Ok((client, task))
}

/// A background writer of rows to PostgreSQL: rows queue in a bounded channel (`capacity`);
/// the writer (re)connects with backoff, runs `schema` once per connection, and inserts each
/// row with `insert`; a row whose insert failed is retried on the next connection. Senders
/// use `try_send` and count what does not fit.
pub fn spawn_writer<T, F>(
    what: &'static str,
    db: Database,
    schema: &'static str,
    capacity: usize,
    insert: F,
    token: tokio_util::sync::CancellationToken,
) -> tokio::sync::mpsc::Sender<T>
where
    T: Send + 'static,
    F: for<'a> Fn(
            &'a Client,
            &'a T,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>,
        > + Send
        + 'static,
{
    use std::time::Duration;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<T>(capacity.max(1));
    tokio::spawn(async move {
        let mut attempt = 0;
        let mut pending: Option<T> = None;
        let pause = |attempt: u32| {
            crate::supervise::backoff(Duration::from_millis(200), Duration::from_secs(30), attempt)
        };
        'connect: loop {
            let client = match connect(&db).await {
                Ok((c, _task)) => c,
                Err(e) => {
                    tracing::warn!(database = %db.url, error = %e, what, "database unreachable; rows wait in memory");
                    tokio::select! {
                        _ = tokio::time::sleep(pause(attempt)) => {}
                        _ = token.cancelled() => break,
                    }
                    attempt += 1;
                    continue;
                }
            };
            if let Err(e) = client.batch_execute(schema).await {
                tracing::warn!(error = %e, what, "cannot prepare the table; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause(attempt)) => {}
                    _ = token.cancelled() => break,
                }
                attempt += 1;
                continue;
            }
            attempt = 0;
            loop {
                let row = match pending.take() {
                    Some(r) => r,
                    None => tokio::select! {
                        r = rx.recv() => match r { Some(r) => r, None => break 'connect },
                        _ = token.cancelled() => break 'connect,
                    },
                };
                if let Err(e) = insert(&client, &row).await {
                    tracing::warn!(error = %e, what, "row not written; reconnecting");
                    pending = Some(row);
                    continue 'connect;
                }
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_urls_do_not_leak_the_password() {
        let e = connect(&Database::at("postgres://u:hunter2@h:notaport/db"))
            .await
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("invalid database URL"), "{e}");
    }

    #[tokio::test]
    async fn missing_ca_file_is_reported() {
        let e = connect(
            &Database::at("postgres://u@127.0.0.1:1/db?sslmode=require")
                .with_ca_file(Path::new("/nonexistent/ca.pem")),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot read the database CA file /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
