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
