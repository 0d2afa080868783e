//! `http`: what every HTTP port of Nexus shares.

use std::path::PathBuf;

use serde::Deserialize;

use super::Problems;

/// `http`: settings of every service's HTTP port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve HTTPS instead of HTTP on every port (default off). With it set no port answers
    /// plain HTTP.
    pub tls: Option<HttpTls>,
}

/// A server certificate (chain) and its key, PEM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl HttpConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        if let Some(t) = &self.tls {
            for (key, path) in [("cert_file", &t.cert_file), ("key_file", &t.key_file)] {
                if path.as_os_str().is_empty() {
                    p.push(format!("http.tls.{key}"), "is empty");
                }
            }
        }
    }
}
