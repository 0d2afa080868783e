//! The alarm journal: every change as a row of the `alarm_events` table in PostgreSQL, written
//! by the shared writer (a queue of 10,000 rows, reconnects with backoff). Evaluation never
//! waits on it: a row that does not fit in the queue is dropped and counted
//! (`nexus_alerts_journal_dropped_total`).

use std::time::Duration;

use nexus_common::codec::json::value_to_json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::Change;

/// A row of the `alarm_events` journal.
#[derive(Debug, Clone)]
pub struct JournalRow {
    pub change: Change,
}

pub const JOURNAL_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS alarm_events (
    id bigserial PRIMARY KEY,
    time timestamptz NOT NULL,
    rule_id text NOT NULL,
    topic text NOT NULL,
    event text NOT NULL,
    state text NOT NULL,
    severity smallint NOT NULL,
    value jsonb,
    message text NOT NULL,
    area text NOT NULL,
    username text,
    comment text
);
CREATE INDEX IF NOT EXISTS alarm_events_time ON alarm_events (time);
CREATE INDEX IF NOT EXISTS alarm_events_alarm ON alarm_events (rule_id, topic, time);";

/// Start the `alarm_events` writer.
pub fn start(db: nexus_common::pg::Database, token: CancellationToken) -> mpsc::Sender<JournalRow> {
    nexus_common::pg::spawn_writer(
        "alarm_events",
        db,
        JOURNAL_SCHEMA,
        10_000,
        |client, row: &JournalRow| {
            Box::pin(async move {
                let c = &row.change;
                let time = std::time::UNIX_EPOCH + Duration::from_millis(c.ts_ms.max(0) as u64);
                let value = c.value.as_ref().map(|v| value_to_json(Some(v)));
                client
                .execute(
                    "INSERT INTO alarm_events (time, rule_id, topic, event, state, severity, value, message, area, username, comment) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
                    &[&time, &c.rule_id, &c.topic, &c.event.as_str(), &c.alarm.state.as_str(), &(c.severity as i16), &value, &c.message, &c.area, &c.user, &c.comment],
                )
                .await
                .map(|_| ())
            })
        },
        token,
    )
}

/// Most journal rows one request answers with.
pub const MAX_JOURNAL_ROWS: i64 = 5000;

/// What `GET /api/v1/alarms/journal` asks for (unix ms; an MQTT filter for topics).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalQuery {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub rule: Option<String>,
    pub topic: Option<String>,
    pub user: Option<String>,
    pub kind: Option<String>,
    pub limit: Option<i64>,
}

/// The journal read back for the control center: one connection, made when first needed
/// and made again after an error.
pub struct JournalReader {
    db: Option<nexus_common::pg::Database>,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

/// An MQTT filter as a PostgreSQL regular expression on whole topics.
pub fn filter_regex(filter: &nexus_common::TopicFilter) -> String {
    let levels: Vec<String> = filter
        .pattern()
        .split('/')
        .map(|l| match l {
            "+" => "[^/]*".to_owned(),
            "#" => ".*".to_owned(),
            lit => lit
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' || !c.is_ascii() {
                        c.to_string()
                    } else {
                        format!("\\{c}")
                    }
                })
                .collect(),
        })
        .collect();
    // `a/#` also matches `a` itself.
    let joined = levels.join("/");
    let joined = match joined.strip_suffix("/.*") {
        Some(head) => format!("{head}(/.*)?"),
        None => joined,
    };
    format!("^{joined}$")
}

impl JournalReader {
    pub fn new(db: Option<nexus_common::pg::Database>) -> JournalReader {
        JournalReader {
            db,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The rows asked for, newest first, and whether more matched than `limit`. `Err` is
    /// (is the request at fault, message).
    pub async fn query(
        &self,
        q: &JournalQuery,
    ) -> Result<(Vec<serde_json::Value>, bool), (bool, String)> {
        let Some(db) = &self.db else {
            return Err((
                false,
                "the alarm journal is off: no database is configured".into(),
            ));
        };
        let now = nexus_common::now_ms();
        let to = q.to.unwrap_or(now);
        let from = q.from.unwrap_or(to - 24 * 3_600_000);
        if from >= to {
            return Err((true, "from: must be before to".into()));
        }
        let limit = q.limit.unwrap_or(500);
        if !(1..=MAX_JOURNAL_ROWS).contains(&limit) {
            return Err((true, format!("limit: 1 to {MAX_JOURNAL_ROWS}")));
        }
        let topic_re = match &q.topic {
            Some(f) => Some(filter_regex(
                &nexus_common::TopicFilter::parse(f).map_err(|e| (true, format!("topic: {e}")))?,
            )),
            None => None,
        };
        for (name, v) in [("rule", &q.rule), ("user", &q.user), ("kind", &q.kind)] {
            if v.as_ref().is_some_and(|v| v.len() > 1024) {
                return Err((true, format!("{name}: longer than 1024 bytes")));
            }
        }
        let ts = |ms: i64| std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, _task) = nexus_common::pg::connect(db)
                .await
                .map_err(|e| (false, format!("the journal's database: {e}")))?;
            *guard = Some(client);
        }
        let Some(client) = guard.as_ref() else {
            return Err((false, "the journal's database is unavailable".into()));
        };
        let rows = client
            .query(
                "SELECT (extract(epoch FROM time) * 1000)::bigint, rule_id, topic, event, state, severity, value, message, area, username, comment
                 FROM alarm_events
                 WHERE time >= $1 AND time < $2
                   AND ($3::text IS NULL OR rule_id = $3)
                   AND ($4::text IS NULL OR topic ~ $4)
                   AND ($5::text IS NULL OR username = $5)
                   AND ($6::text IS NULL OR event = $6)
                 ORDER BY time DESC, id DESC
                 LIMIT $7",
                &[&ts(from), &ts(to), &q.rule, &topic_re, &q.user, &q.kind, &(limit + 1)],
            )
            .await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                *guard = None;
                return Err((false, format!("the journal's database: {e}")));
            }
        };
        let truncated = rows.len() as i64 > limit;
        let events = rows
            .iter()
            .take(limit as usize)
            .map(|r| {
                serde_json::json!({
                    "time": r.get::<_, i64>(0),
                    "rule_id": r.get::<_, String>(1),
                    "topic": r.get::<_, String>(2),
                    "kind": r.get::<_, String>(3),
                    "state": r.get::<_, String>(4),
                    "severity": r.get::<_, i16>(5),
                    "value": r.get::<_, Option<serde_json::Value>>(6),
                    "message": r.get::<_, String>(7),
                    "area": r.get::<_, String>(8),
                    "user": r.get::<_, Option<String>>(9),
                    "comment": r.get::<_, Option<String>>(10),
                })
            })
            .collect();
        Ok((events, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_filters_become_whole_topic_regexes() {
        let re = |f: &str| {
            filter_regex(&nexus_common::TopicFilter::parse(f).unwrap_or_else(|e| panic!("{e}")))
        };
        assert_eq!(re("a/+/c"), "^a/[^/]*/c$");
        assert_eq!(re("a/#"), "^a(/.*)?$");
        assert_eq!(re("#"), "^.*$");
        assert_eq!(re("a.b/c*d"), "^a\\.b/c\\*d$");
    }
}
