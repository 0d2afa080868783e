//! `database`: the PostgreSQL/TimescaleDB that ingestion writes the history to, and where the
//! command audit (`command_audit`) and the alarm journal (`alarm_events`) are kept.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, SecretUrl};
use super::Problems;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://` URL or `key=value` string (default none: no historian, no audit table, no
    /// alarm journal table). `NEXUS_DATABASE_URL` sets it too.
    pub url: Option<SecretUrl>,
    /// Extra CA certificates (PEM) to verify the database's TLS certificate with, when the URL
    /// asks for TLS (`sslmode=require` or `prefer`); the webpki roots are always trusted.
    pub ca_file: Option<PathBuf>,
    /// Connections a service keeps for queries (the history API), default 4. Ingestion's COPY
    /// writers (`ingestion.writers`) and the audit and journal writers hold one each besides.
    pub pool_size: usize,
    /// Longest wait for a connection to open (default 10s).
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Longest a statement may run before the server cancels it (default 30s), so a stuck
    /// database cannot hold an API call or a writer for ever.
    #[serde(with = "duration")]
    pub statement_timeout: Duration,
    /// Refuse a connection that is not encrypted (default false): `sslmode=prefer` (the
    /// default) becomes `require`, and a URL with `sslmode=disable` is a configuration error.
    pub require_tls: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            ca_file: None,
            pool_size: 4,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            require_tls: false,
        }
    }
}

impl DatabaseConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        if let Some(url) = &self.url {
            let u = url.expose();
            let is_url = u.starts_with("postgres://") || u.starts_with("postgresql://");
            let is_kv = u.contains('=');
            if !is_url && !is_kv {
                p.push(
                    "database.url",
                    format!(
                        "{} is not a postgres:// URL or key=value string",
                        url.redacted()
                    ),
                );
            }
        }
        if self.require_tls {
            if let Some(url) = &self.url {
                if url.expose().contains("sslmode=disable") {
                    p.push(
                        "database.url",
                        "sslmode=disable contradicts database.require_tls: true",
                    );
                }
            }
        }
        if !(1..=64).contains(&self.pool_size) {
            p.push("database.pool_size", "must be between 1 and 64");
        }
        if self.connect_timeout < Duration::from_millis(100) {
            p.push("database.connect_timeout", "must be at least 100ms");
        }
        if self.statement_timeout < Duration::from_millis(100) {
            p.push("database.statement_timeout", "must be at least 100ms");
        }
    }
}
