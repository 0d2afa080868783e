//! Small value types used across config sections: durations with explicit units, byte sizes,
//! and secrets that never show in `Debug` or logs.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Serde for durations written with a unit (`2s`, `100ms`, `5m`, `1h 30m`). A bare number is
/// refused: `timeout: 2` is ambiguous.
pub mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::String(s) => humantime::parse_duration(s.trim()).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?}: {e} (write it with a unit, e.g. 2s or 100ms)"
                ))
            }),
            other => Err(serde::de::Error::custom(format!(
                "invalid duration {other}: write it with a unit, e.g. 2s or 100ms"
            ))),
        }
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Optional duration with units.
pub mod opt_duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::duration")] Duration);
        Option::<W>::deserialize(d).map(|o| o.map(|w| w.0))
    }
}

/// A size in bytes, written as a number or with a unit (`64MiB`, `1GB`, `512kB`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}B", self.0)
    }
}

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number with an optional unit like 64MiB")
        })?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "k" => 1000,
            "kib" => 1024,
            "mb" | "m" => 1000 * 1000,
            "mib" => 1024 * 1024,
            "gb" | "g" => 1000 * 1000 * 1000,
            "gib" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use B, kB, KiB, MB, MiB, GB, GiB)"
                ))
            }
        };
        Ok(ByteSize((n * mult as f64) as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => n.as_u64().map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {n}: must be a whole number of bytes"
                ))
            }),
            serde_json::Value::String(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!("invalid size {other}"))),
        }
    }
}

/// A credential. `Debug` and `Display` print `***`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Environment values like `123456` arrive as numbers; a secret is always text.
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(Secret(s)),
            serde_json::Value::Number(n) => Ok(Secret(n.to_string())),
            serde_json::Value::Bool(b) => Ok(Secret(b.to_string())),
            _ => Err(serde::de::Error::custom("a secret must be a string")),
        }
    }
}

/// A URL that may carry a password (`postgres://user:pass@host/db`): `Debug`/`Display` hide
/// the password.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(pub Secret);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(self.0.expose())
    }
}

/// Replace the password of `scheme://user:password@host...` and any `password=` parameter.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        if let Some(at_rel) = out[rest_start..].find('@') {
            let creds = &out[rest_start..rest_start + at_rel];
            if let Some(colon) = creds.find(':') {
                let pw_start = rest_start + colon + 1;
                out.replace_range(pw_start..rest_start + at_rel, "***");
            }
        }
    }
    if let Some(i) = out.find("password=") {
        let start = i + "password=".len();
        let end = out[start..]
            .find(['&', ' '])
            .map(|e| start + e)
            .unwrap_or(out.len());
        out.replace_range(start..end, "***");
    }
    out
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "hunter2");
        let u = SecretUrl(Secret::new(
            "postgres://nexus:hunter2@db:5432/hist?sslmode=require",
        ));
        assert_eq!(
            u.to_string(),
            "postgres://nexus:***@db:5432/hist?sslmode=require"
        );
        assert!(!format!("{u:?}").contains("hunter2"));
        assert_eq!(
            redact_url("host=db user=x password=hunter2 dbname=h"),
            "host=db user=x password=*** dbname=h"
        );
        assert_eq!(redact_url("postgres://db/h"), "postgres://db/h");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("64MiB").unwrap().0, 64 * 1024 * 1024);
        assert_eq!(ByteSize::parse("1GB").unwrap().0, 1_000_000_000);
        assert_eq!(ByteSize::parse("512").unwrap().0, 512);
        assert!(ByteSize::parse("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
    }
}

/// `0.0.0.0:<port>`: the default listen address of every service's HTTP port.
pub(crate) fn listen(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port)
}

/// A circuit breaker (`gateway.breaker`, `ingestion.breaker`): opens at `failure_ratio` of the last `window` calls (once
/// `min_requests` were made), stays open `open_for`, then admits `half_open_trials` trials.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    pub window: usize,
    pub min_requests: usize,
    pub failure_ratio: f64,
    #[serde(with = "duration")]
    pub open_for: Duration,
    pub half_open_trials: usize,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            window: 20,
            min_requests: 5,
            failure_ratio: 0.6,
            open_for: Duration::from_secs(30),
            half_open_trials: 3,
        }
    }
}

impl From<BreakerSettings> for crate::breaker::BreakerConfig {
    fn from(b: BreakerSettings) -> Self {
        crate::breaker::BreakerConfig {
            window: b.window,
            min_requests: b.min_requests,
            failure_ratio: b.failure_ratio,
            open_for: b.open_for,
            half_open_trials: b.half_open_trials,
        }
    }
}
