//! `orchestrator` and `telemetry`: the platform service and every service's logs and metrics.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, listen};
use super::Problems;

/// `orchestrator`: the `nexus up` supervisor and its API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    /// HTTP for health, metrics and platform status (default 0.0.0.0:5000).
    pub http_listen: SocketAddr,
    /// How long shutdown waits for services to drain (default 10s).
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Crashes of one component within `restart_window` that stop the process (default 5).
    pub max_restarts: u32,
    /// Window for `max_restarts` (default 60s).
    #[serde(with = "duration")]
    pub restart_window: Duration,
    /// Where the orchestrator forwards the control center's calls for other services.
    pub upstreams: Upstreams,
}

/// `orchestrator.upstreams`: base URLs (`http://host:port` or `https://...`) of the services
/// whose APIs the orchestrator serves on its own port (docs/control.md). `nexus up` fills them
/// with its own services; separate pods name their Services (`http://nexus-ingest:7000`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Upstreams {
    /// The history API (`GET /api/v1/history`, `/api/v1/latest`).
    pub ingestion: Option<String>,
    /// The alarm API (`/api/v1/alarms...`, `/api/v1/rules`).
    pub alerts: Option<String>,
}

impl OrchestratorConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        self.upstreams.validate(p);
    }
}

impl Upstreams {
    fn validate(&self, p: &mut Problems) {
        for (field, url) in [
            ("orchestrator.upstreams.ingestion", &self.ingestion),
            ("orchestrator.upstreams.alerts", &self.alerts),
        ] {
            let Some(url) = url else { continue };
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            match rest {
                Some(r) if !r.is_empty() && !r.contains(['?', '#', ' ']) => {}
                _ => p.push(
                    field,
                    format!("{url:?} is not a base URL like http://host:port"),
                ),
            }
        }
    }
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            http_listen: listen(5000),
            shutdown_grace: Duration::from_secs(10),
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            upstreams: Upstreams::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// `telemetry`: logs and identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// A tracing filter such as `info` or `info,nexus_protocol_gateway=debug` (default info;
    /// `RUST_LOG` wins when set).
    pub log_level: String,
    /// pretty (default) or json; `--log-format` wins.
    pub log_format: LogFormat,
    /// Instance name used in status topics and client ids (default: $HOSTNAME, else "local").
    pub instance: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_level: "info".into(),
            log_format: LogFormat::Pretty,
            instance: None,
        }
    }
}

impl TelemetryConfig {
    pub fn instance_name(&self) -> String {
        self.instance
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "local".into())
    }

    pub(crate) fn validate(&self, p: &mut Problems) {
        if let Some(i) = &self.instance {
            if let Err(e) = crate::domain::DeviceId::new(i.clone()) {
                p.push(
                    "telemetry.instance",
                    e.to_string().replace("device id", "instance name"),
                );
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            p.push(
                "telemetry.log_level",
                format!("{:?} is not a valid log filter", self.log_level),
            );
        }
    }
}
