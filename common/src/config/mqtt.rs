//! `mqtt`: how every service connects to the broker (embedded or external).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, ByteSize, Secret};
use super::Problems;

/// MQTT protocol version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MqttVersion {
    #[serde(rename = "3.1.1", alias = "v311", alias = "4")]
    V311,
    #[serde(rename = "5", alias = "v5", alias = "5.0")]
    V5,
}

/// `mqtt`: how every service reaches the broker (the embedded one by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host (default 127.0.0.1).
    pub host: String,
    /// Broker port (default 1883, or 8883 with TLS).
    pub port: Option<u16>,
    /// Protocol version: "3.1.1" or "5" (default "3.1.1").
    pub version: MqttVersion,
    /// Client id prefix; each service appends `-<service>-<instance>` (default "nexus").
    pub client_id_prefix: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS to the broker (default off).
    pub tls: Option<MqttTls>,
    /// Keep-alive interval (default 30s).
    #[serde(with = "duration")]
    pub keep_alive: Duration,
    /// Keep the session across reconnects so nothing queued is lost (default true).
    pub persistent_session: bool,
    /// MQTT 5 session expiry for persistent sessions (default 1h).
    #[serde(with = "duration")]
    pub session_expiry: Duration,
    /// First reconnect delay (default 100ms); doubles up to `reconnect_max`, with jitter.
    #[serde(with = "duration")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay (default 30s).
    #[serde(with = "duration")]
    pub reconnect_max: Duration,
    /// Largest packet sent or received (default 1MiB; rumqttc's own default is 10KiB).
    pub max_packet_size: ByteSize,
    /// Unacknowledged QoS 1/2 publishes in flight (default 100).
    pub inflight: u16,
    /// Capacity of the client's request queue (default 10000).
    pub request_capacity: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: None,
            version: MqttVersion::V311,
            client_id_prefix: "nexus".into(),
            username: None,
            password: None,
            tls: None,
            keep_alive: Duration::from_secs(30),
            persistent_session: true,
            session_expiry: Duration::from_secs(3600),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
            max_packet_size: ByteSize(1024 * 1024),
            inflight: 100,
            request_capacity: 10_000,
        }
    }
}

impl MqttConfig {
    pub fn effective_port(&self) -> u16 {
        self.port
            .unwrap_or(if self.tls.is_some() { 8883 } else { 1883 })
    }

    pub(crate) fn validate(&self, p: &mut Problems) {
        if self.host.trim().is_empty() {
            p.push("mqtt.host", "host is empty");
        }
        if self.client_id_prefix.is_empty() || self.client_id_prefix.len() > 64 {
            p.push("mqtt.client_id_prefix", "must be 1 to 64 characters");
        }
        if self.password.is_some() && self.username.is_none() {
            p.push("mqtt.password", "a password needs a username");
        }
        if self.keep_alive < Duration::from_secs(1) {
            p.push("mqtt.keep_alive", "must be at least 1s");
        }
        if self.reconnect_min > self.reconnect_max {
            p.push("mqtt.reconnect_min", "is larger than reconnect_max");
        }
        if self.inflight == 0 {
            p.push("mqtt.inflight", "must be at least 1");
        }
        if self.max_packet_size.0 < 1024 {
            p.push("mqtt.max_packet_size", "must be at least 1KiB");
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// CA bundle (PEM) that signs the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM) for mutual TLS (optional).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}
