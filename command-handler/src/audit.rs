//! The audit trail: every command and its outcome goes to the structured log (target
//! `nexus::audit`), and to the PostgreSQL table `command_audit` when a database is configured.
//! Rows are written in the background; while the database is unreachable they wait in a
//! bounded queue (10,000 rows) and the writer retries with backoff; rows that do not fit are
//! counted in `nexus_commands_audit_dropped_total` by the handler (the log line exists for
//! every command).

use std::time::Duration;

use nexus_common::codec::json::value_to_json;
use nexus_common::pg::Database;
use nexus_common::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub ts_ms: i64,
    pub device: String,
    pub tag: String,
    pub request_id: Option<String>,
    /// Who sent it, as the broker authenticated them (the `nexus-user` property it stamps).
    pub user: Option<String>,
    /// Who the command's payload says sent it: a claim, never proof.
    pub claimed_user: Option<String>,
    pub value: Option<Value>,
    pub old_value: Option<Value>,
    pub read_back: Option<Value>,
    pub success: bool,
    pub error: Option<String>,
    pub duration_ms: f64,
}

impl AuditRecord {
    pub fn log(&self) {
        tracing::info!(
            target: "nexus::audit",
            device = %self.device,
            tag = %self.tag,
            request_id = ?self.request_id,
            user = ?self.user,
            claimed_user = ?self.claimed_user,
            value = %value_to_json(self.value.as_ref()),
            old_value = %value_to_json(self.old_value.as_ref()),
            read_back = %value_to_json(self.read_back.as_ref()),
            success = self.success,
            error = ?self.error,
            duration_ms = self.duration_ms,
            "command"
        );
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS command_audit (
    id bigserial PRIMARY KEY,
    time timestamptz NOT NULL,
    device_id text NOT NULL,
    tag_id text NOT NULL,
    request_id text,
    user_name text,
    claimed_user text,
    value jsonb,
    old_value jsonb,
    read_back jsonb,
    success boolean NOT NULL,
    error text,
    duration_ms double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS command_audit_time ON command_audit (time);
CREATE INDEX IF NOT EXISTS command_audit_device ON command_audit (device_id, time);
ALTER TABLE command_audit ADD COLUMN IF NOT EXISTS user_name text;";

/// Start the database writer; returns the queue to send rows to.
pub fn start_writer(db: Database, token: CancellationToken) -> mpsc::Sender<AuditRecord> {
    nexus_common::pg::spawn_writer(
        "command_audit",
        db,
        SCHEMA,
        10_000,
        |client, rec: &AuditRecord| {
            Box::pin(async move {
                let j = |v: &Option<Value>| v.as_ref().map(|v| value_to_json(Some(v)));
                let time = std::time::UNIX_EPOCH + Duration::from_millis(rec.ts_ms.max(0) as u64);
                client
                .execute(
                    "INSERT INTO command_audit (time, device_id, tag_id, request_id, user_name, claimed_user, value, old_value, read_back, success, error, duration_ms) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
                    &[&time, &rec.device, &rec.tag, &rec.request_id, &rec.user, &rec.claimed_user, &j(&rec.value), &j(&rec.old_value), &j(&rec.read_back), &rec.success, &rec.error, &rec.duration_ms],
                )
                .await
                .map(|_| ())
            })
        },
        token,
    )
}
