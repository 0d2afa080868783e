//! `alerts`: the alarm service and its rules.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, Secret};
use super::Problems;
use crate::topic::TopicFilter;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// HTTP for health, metrics and the alarm API (default 0.0.0.0:6000).
    pub http_listen: SocketAddr,
    /// Longest an operator may shelve an alarm (default 8h).
    #[serde(with = "duration")]
    pub max_shelve: Duration,
    /// Most alarm instances (one per rule and matching topic) held at once (default 100000).
    /// A topic longer than 256 bytes counts once per started 256 bytes. When full, a normal
    /// instance idle the longest is forgotten for a new one; an alarm that is active,
    /// unacknowledged, shelved, out of service or about to activate never is, and when only
    /// those are left a new topic is not evaluated (`nexus_alerts_state_*{map="instances"}`).
    /// Also the bound of the per-topic rule cache and of the chattering windows.
    pub max_instances: usize,
    /// Most operator areas with a flood rate (`nexus_alerts_rate_10m{area}`) at once (default
    /// 1000); the area with the oldest alarm is forgotten for a new one.
    pub max_areas: usize,
    /// Sparkplug B aliases remembered from births, all edge nodes together (default
    /// 1000000), to read the data of rules on `spBv1.0/...` topics (docs/alerts.md).
    pub sparkplug_max_aliases: usize,
    /// Where alarm events are POSTed (JSON), with retries and a rate limit.
    pub webhooks: Vec<Webhook>,
    pub rules: Vec<AlertRule>,
    /// Where the alarm states are kept on disk, so a restart restores acknowledgements,
    /// shelving and out-of-service (default `nexus-data/alerts`).
    pub state_dir: PathBuf,
}

/// An HTTP endpoint notified of alarm events.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// The endpoint. A secret: Slack-style URLs carry their token in the path, so the URL is
    /// never logged, printed in `Debug` or used as a metric label (see [`Webhook::label`]).
    pub url: Secret,
    /// The name in logs and in the `webhook` label of the metrics (default `webhook-<n>`,
    /// its place in the list from 1).
    #[serde(default)]
    pub name: Option<String>,
    /// Only alarms of at least this severity (default 1: all).
    #[serde(default = "one")]
    pub min_severity: u16,
    /// Events sent (default activated, cleared, acknowledged).
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Most requests per minute (default 60); more wait in a queue of 1000.
    #[serde(default = "sixty")]
    pub per_minute: u32,
    /// Attempts per event before it is given up and counted (default 5).
    #[serde(default = "five")]
    pub max_attempts: u32,
    /// Timeout of one request (default 5s).
    #[serde(with = "duration", default = "five_s")]
    pub timeout: Duration,
}

impl Webhook {
    /// What logs and metric labels call webhook `index` (0-based) of the list.
    pub fn label(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("webhook-{}", index + 1))
    }

    /// `scheme://host[:port]` of the URL: enough to find the endpoint in a log, without the
    /// path and query that may carry a token, or a password.
    pub fn origin(&self) -> String {
        let url = self.url.expose();
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        format!("{scheme}://{host}")
    }
}

fn one() -> u16 {
    1
}
fn sixty() -> u32 {
    60
}
fn five() -> u32 {
    5
}
fn five_s() -> Duration {
    Duration::from_secs(5)
}
fn default_events() -> Vec<String> {
    vec!["activated".into(), "cleared".into(), "acknowledged".into()]
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            http_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 6000),
            max_shelve: Duration::from_secs(8 * 3600),
            max_instances: 100_000,
            max_areas: 1000,
            sparkplug_max_aliases: 1_000_000,
            webhooks: Vec::new(),
            rules: Vec::new(),
            state_dir: PathBuf::from("nexus-data/alerts"),
        }
    }
}

/// Severity 1-1000, or a name: low (250), medium (500), high (750), critical (1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Severity(pub u16);

impl<'de> Deserialize<'de> for Severity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(v @ 1..=1000) => Ok(Severity(v as u16)),
                _ => Err(D::Error::custom(format!(
                    "severity {n} is not between 1 and 1000"
                ))),
            },
            serde_json::Value::String(s) => match s.as_str() {
                "low" => Ok(Severity(250)),
                "medium" => Ok(Severity(500)),
                "high" => Ok(Severity(750)),
                "critical" => Ok(Severity(1000)),
                _ => Err(D::Error::custom(format!(
                    "unknown severity {s:?} (1-1000, low, medium, high or critical)"
                ))),
            },
            other => Err(D::Error::custom(format!("invalid severity {other}"))),
        }
    }
}

/// What makes an alarm active.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    HighHigh {
        limit: f64,
        #[serde(default)]
        deadband: f64,
    },
    High {
        limit: f64,
        #[serde(default)]
        deadband: f64,
    },
    Low {
        limit: f64,
        #[serde(default)]
        deadband: f64,
    },
    LowLow {
        limit: f64,
        #[serde(default)]
        deadband: f64,
    },
    /// |value - setpoint| > limit, the setpoint read from another topic.
    Deviation {
        setpoint_topic: String,
        limit: f64,
        #[serde(default)]
        deadband: f64,
    },
    /// |d value / dt| > limit per second.
    RateOfChange {
        limit: f64,
        #[serde(default)]
        deadband: f64,
    },
    /// The value equals this (digital state).
    Equals {
        value: serde_json::Value,
    },
    BadQuality {},
    /// No update for `after`.
    Stale {
        #[serde(with = "duration")]
        after: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub id: String,
    /// MQTT filter; one alarm instance per matching topic.
    pub topic: String,
    pub condition: Condition,
    #[serde(with = "duration", default)]
    pub on_delay: Duration,
    #[serde(with = "duration", default)]
    pub off_delay: Duration,
    #[serde(default = "default_severity")]
    pub severity: Severity,
    /// Template with `{topic}`, `{value}`, `{limit}`.
    #[serde(default = "default_message")]
    pub message: String,
    /// Operator area for flood detection (default: the first four levels of the topic).
    #[serde(default)]
    pub area: Option<String>,
    /// Suppress this rule's alarms while another topic has a value (e.g. the line is stopped).
    #[serde(default)]
    pub suppress_when: Option<SuppressWhen>,
    #[serde(default = "enabled")]
    pub enabled: bool,
}

/// `suppress_when: { topic: acme/site/area/line-1/plc/running, equals: false }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressWhen {
    pub topic: String,
    pub equals: serde_json::Value,
}

fn default_severity() -> Severity {
    Severity(500)
}

fn default_message() -> String {
    "{topic} is {value} (limit {limit})".into()
}

fn enabled() -> bool {
    true
}

impl AlertsConfig {
    /// `index[n]` is the position of rule n in the file.
    pub(crate) fn validate(&self, index: &[usize], p: &mut Problems) {
        const EVENTS: [&str; 9] = [
            "activated",
            "cleared",
            "acknowledged",
            "shelved",
            "unshelved",
            "suppressed",
            "unsuppressed",
            "out_of_service",
            "in_service",
        ];
        for (key, v) in [
            ("max_instances", self.max_instances),
            ("max_areas", self.max_areas),
            ("sparkplug_max_aliases", self.sparkplug_max_aliases),
        ] {
            if v == 0 {
                p.push(format!("alerts.{key}"), "must be at least 1");
            }
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            let url = w.url.expose();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                p.push(
                    format!("alerts.webhooks[{i}].url"),
                    "is not an http:// or https:// URL",
                );
            }
            if let Some(name) = &w.name {
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !ok {
                    p.push(
                        format!("alerts.webhooks[{i}].name"),
                        format!("{name:?}: 1 to 64 letters, digits, '-' or '_'"),
                    );
                }
            }
            if w.per_minute == 0 || w.max_attempts == 0 {
                p.push(
                    format!("alerts.webhooks[{i}]"),
                    "per_minute and max_attempts must be at least 1",
                );
            }
            for e in &w.events {
                if !EVENTS.contains(&e.as_str()) {
                    p.push(
                        format!("alerts.webhooks[{i}].events"),
                        format!("unknown event {e:?} ({})", EVENTS.join(", ")),
                    );
                }
            }
        }
        let mut ids: HashMap<&str, usize> = HashMap::new();
        // Per topic filter: the limits of each analog kind, to check their order.
        let mut limits: HashMap<&str, Vec<(usize, usize, &'static str, f64)>> = HashMap::new();
        for (n, (r, &i)) in self.rules.iter().zip(index).enumerate() {
            let at = format!("alerts.rules[{i}]");
            if r.id.is_empty() || r.id.contains(['/', '+', '#']) {
                p.push(
                    format!("{at}.id"),
                    format!(
                        "rule id {:?} must be non-empty without '/', '+' or '#'",
                        r.id
                    ),
                );
            }
            if let Some(first) = ids.insert(r.id.as_str(), i) {
                p.push(
                    format!("{at}.id"),
                    format!("rule {} is also alerts.rules[{first}]", r.id),
                );
            }
            match TopicFilter::parse(&r.topic) {
                Ok(f) if f.as_str().starts_with('$') => p.push(
                    format!("{at}.topic"),
                    format!("rule {}: alarms watch UNS topics, not {}", r.id, r.topic),
                ),
                Ok(_) => {}
                Err(e) => p.push(format!("{at}.topic"), format!("rule {}: {e}", r.id)),
            }
            let (limit, deadband, kind) = match &r.condition {
                Condition::HighHigh { limit, deadband } => {
                    (Some(*limit), *deadband, Some("high_high"))
                }
                Condition::High { limit, deadband } => (Some(*limit), *deadband, Some("high")),
                Condition::Low { limit, deadband } => (Some(*limit), *deadband, Some("low")),
                Condition::LowLow { limit, deadband } => (Some(*limit), *deadband, Some("low_low")),
                Condition::Deviation {
                    limit,
                    deadband,
                    setpoint_topic,
                } => {
                    if let Err(e) = crate::topic::Topic::parse(setpoint_topic) {
                        p.push(
                            format!("{at}.condition.setpoint_topic"),
                            format!("rule {}: {e}", r.id),
                        );
                    }
                    if *limit <= 0.0 {
                        p.push(
                            format!("{at}.condition.limit"),
                            format!("rule {}: a deviation limit must be positive", r.id),
                        );
                    }
                    (Some(*limit), *deadband, None)
                }
                Condition::RateOfChange { limit, deadband } => {
                    if *limit <= 0.0 {
                        p.push(
                            format!("{at}.condition.limit"),
                            format!("rule {}: a rate limit must be positive", r.id),
                        );
                    }
                    (Some(*limit), *deadband, None)
                }
                Condition::Equals { value } => {
                    if !(value.is_boolean() || value.is_number() || value.is_string()) {
                        p.push(
                            format!("{at}.condition.value"),
                            format!("rule {}: equals needs a number, bool or string", r.id),
                        );
                    }
                    (None, 0.0, None)
                }
                Condition::BadQuality {} => (None, 0.0, None),
                Condition::Stale { after } => {
                    if after.is_zero() {
                        p.push(
                            format!("{at}.condition.after"),
                            format!("rule {}: stale needs a positive time", r.id),
                        );
                    }
                    (None, 0.0, None)
                }
            };
            if let Some(sw) = &r.suppress_when {
                if let Err(e) = crate::topic::Topic::parse(&sw.topic) {
                    p.push(
                        format!("{at}.suppress_when.topic"),
                        format!("rule {}: {e}", r.id),
                    );
                }
            }
            if let Some(l) = limit {
                if !l.is_finite() {
                    p.push(
                        format!("{at}.condition.limit"),
                        format!("rule {}: limit is not a finite number", r.id),
                    );
                }
            }
            if deadband.is_nan() || deadband < 0.0 || !deadband.is_finite() {
                p.push(
                    format!("{at}.condition.deadband"),
                    format!("rule {}: deadband must be zero or positive", r.id),
                );
            }
            if let (Some(l), Some(k)) = (limit, kind) {
                limits
                    .entry(r.topic.as_str())
                    .or_default()
                    .push((n, i, k, l));
            }
        }
        // Analog limits on one topic must be ordered: high_high >= high > low >= low_low.
        const RANK: [&str; 4] = ["low_low", "low", "high", "high_high"];
        for entries in limits.values() {
            for (n, i, ka, la) in entries {
                for (m, _, kb, lb) in entries {
                    let ra = RANK.iter().position(|k| k == ka).unwrap_or(0);
                    let rb = RANK.iter().position(|k| k == kb).unwrap_or(0);
                    let wrong = if ra > rb { la < lb } else { false };
                    let equal_opposed =
                        ka.contains("high") != kb.contains("high") && la == lb && ra > rb;
                    if wrong || equal_opposed {
                        p.push(
                            format!("alerts.rules[{i}].condition.limit"),
                            format!(
                                "rule {}: {ka} limit {la} must be above {kb} limit {lb} of rule {} on the same topic",
                                self.rules[*n].id, self.rules[*m].id
                            ),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod bound_tests {
    use crate::config::tests::problems;
    use crate::config::Config;

    #[test]
    fn state_bounds_have_defaults_and_refuse_zero() {
        let c = Config::from_str_with_env("alerts:\n  max_instances: 50\n", None, &[]).unwrap();
        assert_eq!((c.alerts.max_instances, c.alerts.max_areas), (50, 1000));
        let d = super::AlertsConfig::default();
        assert_eq!((d.max_instances, d.max_areas), (100_000, 1000));
        let e = problems("alerts:\n  max_instances: 0\n  max_areas: 0\n");
        assert!(
            e.contains("alerts.max_instances: must be at least 1"),
            "{e}"
        );
        assert!(e.contains("alerts.max_areas: must be at least 1"), "{e}");
    }
}
