//! `ingestion`: the historian writer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, listen, opt_duration, BreakerSettings, ByteSize};
use super::Problems;
use crate::topic::TopicFilter;

/// `ingestion`: the historian writer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestionConfig {
    /// Moved to `database.url`; still accepted by the parser only to say so.
    #[doc(hidden)]
    pub database_url: Option<serde_json::Value>,
    /// Moved to `database.ca_file`; still accepted by the parser only to say so.
    #[doc(hidden)]
    pub database_ca_file: Option<serde_json::Value>,
    /// HTTP for health, metrics and the history API (default 0.0.0.0:7000).
    pub http_listen: SocketAddr,
    /// Topic filters stored (default `["#"]`, which never matches `$` topics).
    pub filters: Vec<String>,
    /// Shared-subscription group: instances with the same group split the stream
    /// (`$share/<group>/<filter>`). Empty: a plain subscription (default "nexus-ingest").
    pub shared_group: String,
    /// Directory of the write-ahead log (default `nexus-data/ingest-wal`).
    pub wal_dir: PathBuf,
    /// Largest WAL size on disk (default 2GiB). When full, acks to the broker stop
    /// (back-pressure) until the database has taken enough; nothing is discarded.
    pub wal_max_size: ByteSize,
    /// Size at which a WAL segment file is closed and a new one begun (default 16MiB);
    /// committed segments are deleted whole.
    pub wal_segment_size: ByteSize,
    /// Points per COPY batch (default 5000).
    pub batch_size: usize,
    /// Longest wait before a partial batch is written (default 100ms).
    #[serde(with = "duration")]
    pub batch_timeout: Duration,
    /// Parallel COPY writers, one database connection each (default 4).
    pub writers: usize,
    /// How long each tier is kept: raw points and the 1min, 1hour and 1day aggregates
    /// (defaults 30d, 90d, 1825d, none; `null` keeps a tier for ever).
    pub retention: Retention,
    /// TimescaleDB: chunk interval of the hypertable (default 1d).
    #[serde(with = "duration")]
    pub chunk_interval: Duration,
    /// TimescaleDB: chunks older than this are compressed, segmented by tag (default 7d;
    /// none turns compression off).
    #[serde(deserialize_with = "opt_duration::deserialize")]
    pub compress_after: Option<Duration>,
    /// Most points a history response holds; `agg=auto` picks the finest aggregate that
    /// fits (default 10000).
    pub history_max_points: usize,
    /// Ask a Sparkplug edge node for a rebirth when data arrives with aliases not seen in a
    /// birth (default true).
    pub request_rebirth: bool,
    /// Most topics whose tag id is kept in memory (default 200000; a topic longer than 256
    /// bytes counts once per started 256 bytes). The least recently written is forgotten for
    /// a new one and read from the `tags` table again when it comes back
    /// (`nexus_ingest_state_*{map="tag_ids"}`).
    pub max_tags_cached: usize,
    /// Most Sparkplug aliases remembered from births, all edge nodes together (default
    /// 1000000; each node counts one more, and a name longer than 256 bytes once per started
    /// 256 bytes). The node heard from least recently is forgotten for a new one: its data is
    /// then an unknown alias (rejected, counted, a rebirth asked for). A birth with more
    /// aliases than fit is stored, but its extra aliases are not remembered
    /// (`nexus_ingest_state_*{map="sparkplug_aliases"}`).
    pub sparkplug_max_aliases: usize,
    /// Circuit breaker on the database.
    pub breaker: BreakerSettings,
}

impl Default for IngestionConfig {
    fn default() -> Self {
        IngestionConfig {
            database_url: None,
            database_ca_file: None,
            http_listen: listen(7000),
            filters: vec!["#".into()],
            shared_group: "nexus-ingest".into(),
            wal_dir: PathBuf::from("nexus-data/ingest-wal"),
            wal_max_size: ByteSize(2 * 1024 * 1024 * 1024),
            wal_segment_size: ByteSize(16 * 1024 * 1024),
            batch_size: 5000,
            batch_timeout: Duration::from_millis(100),
            writers: 4,
            retention: Retention::default(),
            chunk_interval: Duration::from_secs(86_400),
            compress_after: Some(Duration::from_secs(7 * 86_400)),
            history_max_points: 10_000,
            request_rebirth: true,
            max_tags_cached: 200_000,
            sparkplug_max_aliases: 1_000_000,
            breaker: BreakerSettings {
                open_for: Duration::from_secs(5),
                ..BreakerSettings::default()
            },
        }
    }
}

impl IngestionConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        // The database serves the audit and the alarm journal too: it has its own section.
        if self.database_url.is_some() {
            p.push(
                "ingestion.database_url",
                "moved: set database.url (or NEXUS_DATABASE_URL) instead",
            );
        }
        if self.database_ca_file.is_some() {
            p.push(
                "ingestion.database_ca_file",
                "moved: set database.ca_file instead",
            );
        }
        self.retention.validate(p);
        if self.filters.is_empty() {
            p.push("ingestion.filters", "must list at least one topic filter");
        }
        for (i, f) in self.filters.iter().enumerate() {
            if let Err(e) = TopicFilter::parse(f) {
                p.push(format!("ingestion.filters[{i}]"), format!("{f:?}: {e}"));
            }
        }
        if self.shared_group.contains(['/', '+', '#']) {
            p.push("ingestion.shared_group", "must not contain '/', '+' or '#'");
        }
        if self.wal_segment_size.0 < 64 * 1024 {
            p.push("ingestion.wal_segment_size", "must be at least 64KiB");
        }
        if self.wal_max_size.0 < 2 * self.wal_segment_size.0 {
            p.push(
                "ingestion.wal_max_size",
                "must be at least twice wal_segment_size",
            );
        }
        if !(1..=1_000_000).contains(&self.batch_size) {
            p.push("ingestion.batch_size", "must be between 1 and 1000000");
        }
        if self.batch_timeout.is_zero() {
            p.push("ingestion.batch_timeout", "must be more than 0");
        }
        if !(1..=64).contains(&self.writers) {
            p.push("ingestion.writers", "must be between 1 and 64");
        }
        if self.chunk_interval < Duration::from_secs(60) {
            p.push("ingestion.chunk_interval", "must be at least 1m");
        }
        if self.history_max_points < 10 {
            p.push("ingestion.history_max_points", "must be at least 10");
        }
        for (key, v) in [
            ("max_tags_cached", self.max_tags_cached),
            ("sparkplug_max_aliases", self.sparkplug_max_aliases),
        ] {
            if v == 0 {
                p.push(format!("ingestion.{key}"), "must be at least 1");
            }
        }
    }
}

/// `ingestion.retention`: how long each tier is kept, `None` for ever. A tier's rows older
/// than its retention are deleted (TimescaleDB: a retention policy per hypertable and
/// continuous aggregate; plain PostgreSQL: see docs/ingestion.md, raw points bound every tier
/// there since the aggregates are computed from them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionTiers {
    #[serde(deserialize_with = "opt_duration::deserialize")]
    pub raw: Option<Duration>,
    #[serde(rename = "1min", deserialize_with = "opt_duration::deserialize")]
    pub min1: Option<Duration>,
    #[serde(rename = "1hour", deserialize_with = "opt_duration::deserialize")]
    pub hour1: Option<Duration>,
    #[serde(rename = "1day", deserialize_with = "opt_duration::deserialize")]
    pub day1: Option<Duration>,
}

const DAY: u64 = 86_400;

impl Default for RetentionTiers {
    /// Raw points for a month (a month of fault finding at full resolution), minutes for a
    /// quarter, hours for five years (trends over several years of operation), days for ever.
    fn default() -> Self {
        RetentionTiers {
            raw: Some(Duration::from_secs(30 * DAY)),
            min1: Some(Duration::from_secs(90 * DAY)),
            hour1: Some(Duration::from_secs(1825 * DAY)),
            day1: None,
        }
    }
}

impl RetentionTiers {
    /// The tiers with their names and bucket widths (raw: 0), finest first.
    pub fn tiers(&self) -> [(&'static str, u64, Option<Duration>); 4] {
        [
            ("raw", 0, self.raw),
            ("1min", 60, self.min1),
            ("1hour", 3600, self.hour1),
            ("1day", DAY, self.day1),
        ]
    }
}

/// `ingestion.retention`: the tiers, or (until the configuration is changed) the single
/// duration of earlier versions, which is refused with a message saying where it went.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Retention {
    pub tiers: RetentionTiers,
    /// The old form (`retention: 90d`), kept only to say where it went.
    moved: Option<String>,
}

impl std::ops::Deref for Retention {
    type Target = RetentionTiers;
    fn deref(&self) -> &RetentionTiers {
        &self.tiers
    }
}

impl From<RetentionTiers> for Retention {
    fn from(tiers: RetentionTiers) -> Self {
        Retention { tiers, moved: None }
    }
}

impl<'de> Deserialize<'de> for Retention {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        if v.is_object() {
            let tiers = RetentionTiers::deserialize(v).map_err(serde::de::Error::custom)?;
            return Ok(tiers.into());
        }
        let moved = match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        Ok(Retention {
            tiers: RetentionTiers::default(),
            moved: Some(moved),
        })
    }
}

impl Retention {
    fn validate(&self, p: &mut Problems) {
        if let Some(old) = &self.moved {
            p.push(
                "ingestion.retention",
                format!(
                    "moved: retention is per tier now; for raw points write `retention: {{raw: {old}}}` \
                     (tiers raw, 1min, 1hour, 1day; see docs/ingestion.md)"
                ),
            );
            return;
        }
        for (name, width, keep) in self.tiers() {
            // At least an hour, and two buckets: a tier shorter than that keeps next to nothing.
            let least = (2 * width).max(3600);
            if keep.is_some_and(|k| k.as_secs() < least) {
                p.push(
                    format!("ingestion.retention.{name}"),
                    format!(
                        "must be at least {} (or null to keep it for ever)",
                        humantime::format_duration(Duration::from_secs(least))
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod retention_tests {
    use crate::config::Config;
    use std::time::Duration;

    const DAY: u64 = 86_400;

    #[test]
    fn retention_tiers_have_defaults_and_take_null_for_ever() {
        let d = Config::from_str_with_env("{}", None, &[]).unwrap();
        let r = &d.ingestion.retention;
        assert_eq!(r.raw, Some(Duration::from_secs(30 * DAY)));
        assert_eq!(r.min1, Some(Duration::from_secs(90 * DAY)));
        assert_eq!(r.hour1, Some(Duration::from_secs(1825 * DAY)));
        assert_eq!(r.day1, None);
        let c = Config::from_str_with_env(
            "ingestion:\n  retention:\n    raw: 7d\n    1hour: null\n    1day: 3650d\n",
            None,
            &[],
        )
        .unwrap();
        let r = &c.ingestion.retention;
        assert_eq!(r.raw, Some(Duration::from_secs(7 * DAY)));
        assert_eq!(
            r.min1,
            Some(Duration::from_secs(90 * DAY)),
            "a tier not named keeps its default"
        );
        assert_eq!(r.hour1, None);
        assert_eq!(r.day1, Some(Duration::from_secs(3650 * DAY)));
    }

    #[test]
    fn the_single_retention_of_earlier_versions_is_refused_saying_where_it_went() {
        let e = Config::from_str_with_env("ingestion:\n  retention: 90d\n", None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ingestion.retention: moved: retention is per tier now; for raw points write `retention: {raw: 90d}`"),
            "{e}"
        );
        let e = Config::from_str_with_env(
            "ingestion:\n  retention:\n    raw: 30m\n    1day: 1d\n    5min: 1d\n",
            None,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("5min"), "an unknown tier is named: {e}");
        let e = Config::from_str_with_env(
            "ingestion:\n  retention:\n    raw: 30m\n    1day: 1d\n",
            None,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ingestion.retention.raw: must be at least 1h"),
            "{e}"
        );
        assert!(
            e.contains("ingestion.retention.1day: must be at least 2days"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod bound_tests {
    use crate::config::Config;

    fn problems(text: &str) -> String {
        match Config::from_str_with_env(text, None, &[]) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn state_bounds_have_defaults_and_refuse_zero() {
        let c = Config::from_str_with_env("ingestion:\n  max_tags_cached: 7\n", None, &[]).unwrap();
        assert_eq!(c.ingestion.max_tags_cached, 7);
        assert_eq!(c.ingestion.sparkplug_max_aliases, 1_000_000);
        assert_eq!(super::IngestionConfig::default().max_tags_cached, 200_000);
        let e = problems("ingestion:\n  max_tags_cached: 0\n  sparkplug_max_aliases: 0\n");
        assert!(
            e.contains("ingestion.max_tags_cached: must be at least 1"),
            "{e}"
        );
        assert!(
            e.contains("ingestion.sparkplug_max_aliases: must be at least 1"),
            "{e}"
        );
    }
}
