//! The alert service around the engine: MQTT in and out, restore at start, REST, metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nexus_common::codec::json::value_to_json;
use nexus_common::codec::{decode_value_object, PayloadError};
use nexus_common::mqtt::{Message, MqttHandle, QoS};
use nexus_common::now_ms;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Deserialize;
use serde_json::{json, Value as JValue};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{ActionError, Change, Engine};
use crate::state::{Alarm, State};

pub const ALARM_PREFIX: &str = "$nexus/alarms/";
pub const ACK_TOPIC: &str = "$nexus/alarms/ack";
pub const EVENTS_TOPIC: &str = "$nexus/alarms/events";

#[derive(Clone)]
pub struct AlertMetrics {
    active: IntGaugeVec,
    events: IntCounterVec,
    values: prometheus::IntCounter,
    malformed: IntCounterVec,
    journal_dropped: prometheus::IntCounter,
    rate_10m: IntGaugeVec,
    flood: IntGaugeVec,
    chattering: prometheus::IntCounter,
}

impl AlertMetrics {
    pub fn new(r: &Registry) -> AlertMetrics {
        let m = AlertMetrics {
            active: IntGaugeVec::new(
                Opts::new(
                    "nexus_alerts_active",
                    "Alarms not in the normal state, by severity",
                ),
                &["severity"],
            )
            .expect("static metric definition"),
            events: IntCounterVec::new(
                Opts::new("nexus_alerts_events_total", "Alarm events by kind"),
                &["event"],
            )
            .expect("static metric definition"),
            values: prometheus::IntCounter::new("nexus_alerts_values_total", "Values evaluated")
                .expect("static metric definition"),
            malformed: IntCounterVec::new(
                Opts::new(
                    "nexus_alerts_malformed_total",
                    "Payloads on watched topics that could not be read, by reason",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            journal_dropped: prometheus::IntCounter::new(
                "nexus_alerts_journal_dropped_total",
                "Alarm events not queued for the alarm_events table (queue full)",
            )
            .expect("static metric definition"),
            rate_10m: IntGaugeVec::new(
                Opts::new("nexus_alerts_rate_10m", "Alarms raised in the last 10 minutes, by operator area"),
                &["area"],
            )
            .expect("static metric definition"),
            flood: IntGaugeVec::new(
                Opts::new("nexus_alerts_flood", "1 while an area is in an alarm flood (ISA-18.2: more than 10 alarms in 10 minutes)"),
                &["area"],
            )
            .expect("static metric definition"),
            chattering: prometheus::IntCounter::new(
                "nexus_alerts_chattering_total",
                "Alarms that chattered: raised 3 times or more within 60 s",
            )
            .expect("static metric definition"),
        };
        let _ = r.register(Box::new(m.active.clone()));
        let _ = r.register(Box::new(m.events.clone()));
        let _ = r.register(Box::new(m.values.clone()));
        let _ = r.register(Box::new(m.malformed.clone()));
        let _ = r.register(Box::new(m.journal_dropped.clone()));
        let _ = r.register(Box::new(m.rate_10m.clone()));
        let _ = r.register(Box::new(m.flood.clone()));
        let _ = r.register(Box::new(m.chattering.clone()));
        m
    }
}

/// `$nexus/alarms/<topic>/<rule id>`.
pub fn state_topic(topic: &str, rule_id: &str) -> String {
    format!("{ALARM_PREFIX}{topic}/{rule_id}")
}

/// The id used by the REST API: `<rule id>:<topic>` (URL-encode it in paths).
pub fn alarm_id(rule_id: &str, topic: &str) -> String {
    format!("{rule_id}:{topic}")
}

pub fn state_payload(c: &Change, now: i64) -> JValue {
    json!({
        "id": alarm_id(&c.rule_id, &c.topic),
        "rule_id": c.rule_id,
        "topic": c.topic,
        "state": c.alarm.state.as_str(),
        "severity": c.severity,
        "value": value_to_json(c.value.as_ref()),
        "message": c.message,
        "since": c.alarm.since_ms,
        "ts": c.ts_ms,
        "shelved_until": c.alarm.shelved_until_ms.filter(|t| *t > now),
        "out_of_service": c.alarm.out_of_service,
        "suppressed": c.alarm.suppressed,
        "area": c.area,
    })
}

/// The shared state of the service.
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

/// Flood and chattering bookkeeping (ISA-18.2 performance metrics).
#[derive(Default)]
struct Rates {
    /// Activation times per operator area, last 10 minutes.
    by_area: HashMap<String, std::collections::VecDeque<i64>>,
    /// Activation times per alarm, last 60 s.
    by_alarm: HashMap<(String, String), std::collections::VecDeque<i64>>,
}

pub struct Alerts {
    pub engine: Mutex<Engine>,
    rates: Mutex<Rates>,
    outbox: Mutex<Option<mpsc::Sender<Vec<Change>>>>,
    gauges_stale: std::sync::atomic::AtomicBool,
    notifier: std::sync::OnceLock<crate::webhook::Notifier>,
    journal: std::sync::OnceLock<mpsc::Sender<JournalRow>>,
    /// Set once the service's MQTT client exists (the HTTP routes are built before it).
    mqtt: std::sync::OnceLock<MqttHandle>,
    metrics: AlertMetrics,
}

impl Alerts {
    pub fn new(engine: Engine, metrics: AlertMetrics) -> Arc<Alerts> {
        Arc::new(Alerts {
            engine: Mutex::new(engine),
            journal: std::sync::OnceLock::new(),
            rates: Mutex::new(Rates::default()),
            outbox: Mutex::new(None),
            gauges_stale: std::sync::atomic::AtomicBool::new(false),
            notifier: std::sync::OnceLock::new(),
            mqtt: std::sync::OnceLock::new(),
            metrics,
        })
    }

    /// Send alarm events to webhooks.
    pub fn set_notifier(&self, n: crate::webhook::Notifier) {
        let _ = self.notifier.set(n);
    }

    /// Journal every change to `alarm_events` through this queue.
    pub fn set_journal(&self, tx: mpsc::Sender<JournalRow>) {
        let _ = self.journal.set(tx);
    }

    pub fn set_mqtt(&self, mqtt: MqttHandle) {
        let _ = self.mqtt.set(mqtt);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish retained state and the event of each change.
    /// Hand changes to the outbox task (so a slow publish never stalls evaluation and the
    /// MQTT receive path), or publish them here when there is no outbox.
    async fn publish(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let tx = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::error::SendError(changes)) = tx.send(changes).await {
                    self.emit(changes).await;
                }
            }
            None => self.emit(changes).await,
        }
    }

    /// Publish retained state and the event of each change, journal and notify.
    async fn emit(&self, changes: Vec<Change>) {
        let now = now_ms();
        let Some(mqtt) = self.mqtt.get() else { return };
        for c in &changes {
            self.metrics
                .events
                .with_label_values(&[c.event.as_str()])
                .inc();
            if let Some(j) = self.journal.get() {
                if j.try_send(JournalRow { change: c.clone() }).is_err() {
                    self.metrics.journal_dropped.inc();
                }
            }
            if c.event == crate::state::Event::Activated {
                self.count_activation(c);
            }
            let topic = state_topic(&c.topic, &c.rule_id);
            // Normal, acknowledged and not shelved/out of service: the retained state is cleared.
            let cleared = c.alarm.state == State::Normal
                && !c.alarm.is_shelved(now)
                && !c.alarm.out_of_service;
            let body = if cleared {
                Vec::new()
            } else {
                state_payload(c, now).to_string().into_bytes()
            };
            if let Err(e) = mqtt.publish(&topic, body, QoS::AtLeastOnce, true).await {
                tracing::warn!(%topic, error = %e, "cannot publish alarm state");
            }
            let mut ev = state_payload(c, now);
            ev["event"] = json!(c.event.as_str());
            ev["user"] = json!(c.user);
            ev["comment"] = json!(c.comment);
            if let Some(n) = self.notifier.get() {
                n.notify(c.event.as_str(), c.severity, &ev);
            }
            let _ = mqtt
                .publish(EVENTS_TOPIC, ev.to_string(), QoS::AtLeastOnce, false)
                .await;
            tracing::info!(rule = %c.rule_id, topic = %c.topic, event = c.event.as_str(), state = c.alarm.state.as_str(), severity = c.severity, user = ?c.user, "alarm");
        }
        if !changes.is_empty() {
            // Gauges are recomputed on the next tick, not per change (that is O(alarms)).
            self.gauges_stale
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn count_activation(&self, c: &Change) {
        let mut r = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        let area = r.by_area.entry(c.area.clone()).or_default();
        area.push_back(c.ts_ms);
        while area.front().is_some_and(|t| c.ts_ms - t > 600_000) {
            area.pop_front();
        }
        let n = area.len() as i64;
        self.metrics.rate_10m.with_label_values(&[&c.area]).set(n);
        self.metrics
            .flood
            .with_label_values(&[&c.area])
            .set(i64::from(n > 10));
        let alarm = r
            .by_alarm
            .entry((c.rule_id.clone(), c.topic.clone()))
            .or_default();
        alarm.push_back(c.ts_ms);
        while alarm.front().is_some_and(|t| c.ts_ms - t > 60_000) {
            alarm.pop_front();
        }
        if alarm.len() == 3 {
            self.metrics.chattering.inc();
            tracing::warn!(rule = %c.rule_id, topic = %c.topic, "alarm is chattering: raised 3 times within 60 s");
        }
    }

    fn update_gauges(&self) {
        let now = now_ms();
        let mut by_sev: HashMap<u16, i64> = HashMap::new();
        for c in self.lock().alarms(now) {
            if c.alarm.state != State::Normal {
                *by_sev.entry(c.severity).or_default() += 1;
            }
        }
        self.metrics.active.reset();
        for (s, n) in by_sev {
            self.metrics
                .active
                .with_label_values(&[&s.to_string()])
                .set(n);
        }
    }

    async fn on_message(&self, m: &Message) {
        let Some(topic) = m.topic() else { return };
        if topic == ACK_TOPIC {
            self.on_ack(m.payload()).await;
            return;
        }
        if topic.starts_with(ALARM_PREFIX) {
            return; // our own state and events
        }
        self.metrics.values.inc();
        let obj = match decode_value_object(m.payload()) {
            Ok(o) => o,
            Err(e) => {
                let e: PayloadError = e;
                self.metrics
                    .malformed
                    .with_label_values(&[e.reason()])
                    .inc();
                tracing::debug!(%topic, error = %e, "value not evaluated");
                return;
            }
        };
        let changes = self.lock().on_value(topic, &obj, now_ms());
        self.publish(changes).await;
    }

    async fn on_ack(&self, payload: &[u8]) {
        #[derive(Deserialize)]
        struct Ack {
            rule_id: String,
            topic: String,
            user: Option<String>,
            comment: Option<String>,
        }
        match serde_json::from_slice::<Ack>(payload) {
            Ok(a) => {
                let r = self
                    .lock()
                    .acknowledge(&a.rule_id, &a.topic, now_ms(), a.user, a.comment);
                match r {
                    Ok(c) => self.publish(vec![c]).await,
                    Err(e) => {
                        tracing::warn!(rule = %a.rule_id, topic = %a.topic, error = %e, "acknowledge refused")
                    }
                }
            }
            Err(e) => {
                self.metrics.malformed.with_label_values(&["bad_ack"]).inc();
                tracing::warn!(error = %e, "malformed acknowledge on $nexus/alarms/ack");
            }
        }
    }

    /// Read retained `$nexus/alarms/<topic>/<rule>` states back into the engine.
    fn restore(&self, m: &Message) -> bool {
        let Some(topic) = m.topic() else { return false };
        if topic == ACK_TOPIC
            || topic == EVENTS_TOPIC
            || !topic.starts_with(ALARM_PREFIX)
            || m.payload().is_empty()
        {
            return false;
        }
        let Ok(v) = serde_json::from_slice::<JValue>(m.payload()) else {
            return false;
        };
        let (Some(rule), Some(t), Some(state)) = (
            v["rule_id"].as_str(),
            v["topic"].as_str(),
            v["state"].as_str().and_then(State::parse),
        ) else {
            return false;
        };
        let alarm = Alarm {
            state,
            since_ms: v["since"].as_i64().unwrap_or(0),
            shelved_until_ms: v["shelved_until"].as_i64(),
            suppressed: v["suppressed"].as_bool().unwrap_or(false),
            out_of_service: v["out_of_service"].as_bool().unwrap_or(false),
        };
        self.lock().restore(rule, t, alarm)
    }

    /// Apply reloaded rules: keep the alarms of unchanged rules, clear the retained state of
    /// the others, subscribe to new filters.
    pub async fn reload(&self, rules: &[nexus_common::config::AlertRule]) {
        let (removed, filters) = {
            let mut e = self.lock();
            let removed = e.replace_rules(rules);
            (removed, e.filters())
        };
        if let Some(mqtt) = self.mqtt.get() {
            for (rule, topic) in &removed {
                let _ = mqtt
                    .publish(
                        &state_topic(topic, rule),
                        Vec::new(),
                        QoS::AtLeastOnce,
                        true,
                    )
                    .await;
            }
            for f in &filters {
                if let Err(e) = mqtt.subscribe(f, QoS::AtLeastOnce).await {
                    tracing::warn!(filter = %f, error = %e, "cannot subscribe to a rule's topics");
                }
            }
        }
        self.update_gauges();
        tracing::info!(
            rules = rules.len(),
            alarms_dropped = removed.len(),
            "alarm rules reloaded"
        );
    }

    /// Run: restore retained states first (until the broker has sent them), then evaluate.
    pub async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Message>, token: CancellationToken) {
        let mut restored = 0;
        let mut early = Vec::new();
        let quiet = Duration::from_millis(500);
        while let Ok(Some(m)) = tokio::time::timeout(quiet, rx.recv()).await {
            if self.restore(&m) {
                restored += 1;
            } else {
                early.push(m);
            }
        }
        tracing::info!(restored, "alarm states restored from retained topics");
        let (otx, mut orx) = mpsc::channel::<Vec<Change>>(1024);
        *self.outbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(otx);
        let me = self.clone();
        let outbox = tokio::spawn(async move {
            while let Some(c) = orx.recv().await {
                me.emit(c).await;
            }
        });
        self.update_gauges();
        for m in early {
            self.on_message(&m).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.on_message(&m).await,
                    None => break,
                },
                _ = tick.tick() => {
                    let changes = self.lock().tick(now_ms());
                    self.publish(changes).await;
                    if self.gauges_stale.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        self.update_gauges();
                    }
                }
                _ = token.cancelled() => break,
            }
        }
        // Drain the outbox before returning.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = outbox.await;
    }
}

#[derive(Deserialize)]
struct ListQuery {
    severity: Option<u16>,
    topic: Option<String>,
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({"error": msg}))).into_response()
}

async fn list(AxState(a): AxState<Arc<Alerts>>, Query(q): Query<ListQuery>) -> Response {
    let now = now_ms();
    let filter = match &q.topic {
        Some(f) => match nexus_common::TopicFilter::parse(f) {
            Ok(f) => Some(f),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("topic: {e}")),
        },
        None => None,
    };
    let alarms: Vec<JValue> = a
        .lock()
        .alarms(now)
        .iter()
        .filter(|c| q.severity.is_none_or(|s| c.severity >= s))
        .filter(|c| filter.as_ref().is_none_or(|f| f.matches(&c.topic)))
        .map(|c| state_payload(c, now))
        .collect();
    Json(json!({ "alarms": alarms })).into_response()
}

async fn rules(AxState(a): AxState<Arc<Alerts>>) -> Json<JValue> {
    let e = a.lock();
    let list: Vec<JValue> = e
        .rules()
        .iter()
        .map(|r| json!({"id": r.id, "topic": r.topic, "severity": r.severity.0, "condition": format!("{:?}", r.condition), "message": r.message, "on_delay_ms": r.on_delay.as_millis() as u64, "off_delay_ms": r.off_delay.as_millis() as u64}))
        .collect();
    Json(json!({ "rules": list }))
}

const ACTIONS: &str = "ack, shelve, unshelve, out_of_service, in_service";

#[derive(Deserialize, Default)]
struct ActionBody {
    user: Option<String>,
    comment: Option<String>,
    duration_s: Option<u64>,
}

async fn action(
    AxState(a): AxState<Arc<Alerts>>,
    Path((id, op)): Path<(String, String)>,
    body: Option<Json<ActionBody>>,
) -> Response {
    let Some((rule, topic)) = id.split_once(':') else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("alarm id {id:?} is not <rule id>:<topic>"),
        );
    };
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let now = now_ms();
    let r = {
        let mut e = a.lock();
        match op.as_str() {
            "ack" => e.acknowledge(rule, topic, now, b.user.clone(), b.comment.clone()),
            "shelve" => match b.duration_s {
                Some(s) => e.shelve(rule, topic, s as i64 * 1000, now, b.user.clone()),
                None => return error(StatusCode::BAD_REQUEST, "shelve needs duration_s".into()),
            },
            "unshelve" => e.unshelve(rule, topic, now, b.user.clone()),
            "out_of_service" => e.set_out_of_service(rule, topic, true, now, b.user.clone()),
            "in_service" => e.set_out_of_service(rule, topic, false, now, b.user.clone()),
            other => {
                let msg = format!("unknown action {other:?} ({ACTIONS})");
                return error(StatusCode::NOT_FOUND, msg);
            }
        }
    };
    match r {
        Ok(c) => {
            let body = state_payload(&c, now);
            a.publish(vec![c]).await;
            Json(body).into_response()
        }
        Err(e @ ActionError::NotFound { .. }) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ ActionError::Refused(_)) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

pub fn routes(a: Arc<Alerts>) -> Router {
    Router::new()
        .route("/api/v1/alarms", get(list))
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/alarms/{id}/{op}", post(action))
        .with_state(a)
}

/// Start the `alarm_events` writer.
pub fn start_journal(
    db: nexus_common::pg::Database,
    token: CancellationToken,
) -> mpsc::Sender<JournalRow> {
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
