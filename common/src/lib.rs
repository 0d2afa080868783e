//! # nexus-common
//!
//! What two or more Nexus services share:
//!
//! - [`domain`]: `Value`, `Quality` (OPC UA classes, historian codes), `DataPoint`, ids.
//! - [`topic`]: UNS topics and MQTT filters: build, parse, validate, match.
//! - [`codec`]: the contract's JSON value object and Sparkplug B payloads.
//! - [`config`]: `nexus.yaml` with environment overrides and located validation errors.
//! - [`mqtt`]: the rumqttc helper (3.1.1 and 5, TLS, persistent sessions, last will,
//!   jittered reconnect) every service connects with.
//! - [`auth`]: users, API tokens and roles, for the broker and every HTTP port.
//! - [`broker`]: the embedded rmqtt broker with its ACL.
//! - [`telemetry`]: logging, Prometheus registry, `/healthz` `/readyz` `/metrics`.
//! - [`http`]: the guard of every HTTP port (panics caught, body limit, request timeout).
//! - [`supervise`]: shutdown token, restart-with-backoff supervisor, bounded drain.
//! - [`breaker`], [`ratelimit`]: resilience wrappers with metrics.
//! - [`bounded`]: maps keyed by what clients choose, bounded, with counted evictions.
//! - [`service`]: the shell every service runs in (status topic, HTTP, MQTT client).
//! - `testing` (feature `test-utils`): throwaway PostgreSQL, brokers and Mosquitto for tests.

pub mod codec;
pub mod config;
pub mod domain;
pub mod topic;

pub use domain::{now_ms, DataPoint, DeviceId, Quality, QualityClass, TagId, Value};
pub use topic::{Topic, TopicFilter};
pub mod auth;
pub mod bounded;
pub mod breaker;
pub mod broker;
pub mod http;
pub mod http_tls;
pub mod metrics;
pub mod mqtt;
pub mod ratelimit;
pub mod seglog;
pub mod service;
pub mod supervise;
pub mod telemetry;
#[cfg(feature = "test-utils")]
pub mod testing;

/// Select rustls's crypto provider for the process. Dependencies enable both ring and
/// aws-lc-rs, and rustls then refuses to guess (it panics at the first TLS handshake), so every
/// TLS user calls this first. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
pub mod pg;
