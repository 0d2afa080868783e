//! The service core: the engine behind a lock, fed by MQTT (values, acknowledges, and the
//! retained states read back at start), with an outbox task that publishes each change's
//! retained state and event, journals it and notifies webhooks. Flood and chattering are
//! counted here, in windows bounded per area and per alarm and in tables of bounded size; the
//! HTTP API acts through the same engine and outbox.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_common::bounded::{text_weight, BoundedMap, MapStats, StateMetrics};
use nexus_common::codec::json::ValueObject;
use nexus_common::codec::payload::{self, Decoder};
use nexus_common::codec::sparkplug_host::SparkplugNames;
use nexus_common::metrics::{self, MetricError};
use nexus_common::mqtt::{Message, MqttHandle, QoS};
use nexus_common::now_ms;
use nexus_common::Quality;
use prometheus::{IntCounterVec, IntGaugeVec, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{Change, Engine, Limits, Restore};
use crate::journal::JournalRow;
use crate::state::State;
use crate::topics::{
    event_payload, parse_state, state_payload, state_topic, Ack, ACK_TOPIC, ALARM_PREFIX,
    EVENTS_TOPIC,
};

#[derive(Clone)]
pub struct AlertMetrics {
    active: IntGaugeVec,
    events: IntCounterVec,
    values: prometheus::IntCounter,
    malformed: IntCounterVec,
    journal_dropped: prometheus::IntCounter,
    state_file_errors: prometheus::IntCounter,
    rate_10m: IntGaugeVec,
    flood: IntGaugeVec,
    chattering: prometheus::IntCounter,
    /// `nexus_alerts_state_*{map}`: the bounded tables.
    state: StateMetrics,
}

impl AlertMetrics {
    pub fn new(r: &Registry) -> Result<AlertMetrics, MetricError> {
        let m = AlertMetrics {
            active: metrics::gauge_vec(
                r,
                "nexus_alerts_active",
                "Alarms not in the normal state, by severity",
                &["severity"],
            )?,
            events: metrics::counter_vec(
                r,
                "nexus_alerts_events_total",
                "Alarm events by kind",
                &["event"],
            )?,
            values: metrics::counter(r, "nexus_alerts_values_total", "Values evaluated")?,
            malformed: metrics::counter_vec(
                r,
                "nexus_alerts_malformed_total",
                "Payloads on watched topics that could not be read, by reason",
                &["reason"],
            )?,
            journal_dropped: metrics::counter(
                r,
                "nexus_alerts_journal_dropped_total",
                "Alarm events not queued for the alarm_events table (queue full)",
            )?,
            state_file_errors: metrics::counter(
                r,
                "nexus_alerts_state_file_errors_total",
                "Saves of the alarm states to alerts.state_dir that failed (the next change tries again)",
            )?,
            rate_10m: metrics::gauge_vec(
                r,
                "nexus_alerts_rate_10m",
                "Alarms raised in the last 10 minutes, by operator area",
                &["area"],
            )?,
            flood: metrics::gauge_vec(
                r,
                "nexus_alerts_flood",
                "1 while an area is in an alarm flood (ISA-18.2: more than 10 alarms in 10 minutes)",
                &["area"],
            )?,
            chattering: metrics::counter(
                r,
                "nexus_alerts_chattering_total",
                "Alarms that chattered: raised 3 times or more within 60 s",
            )?,
            state: StateMetrics::new(r, "nexus_alerts")?,
        };
        // Every reason's series from the start, at 0.
        for reason in payload::REASONS
            .iter()
            .chain(&["bad_ack", "unknown_alias", "sparkplug_metric"])
            .chain(&["sparkplug_topic", "sparkplug_decode"])
        {
            m.malformed.with_label_values(&[reason]);
        }
        Ok(m)
    }

    /// The engine's bounds, counted in `nexus_alerts_state_*`: `max_instances` units each for
    /// the alarm instances and the per-topic rule cache.
    pub fn engine_limits(&self, max_instances: usize) -> Limits {
        Limits {
            instances: self.state.map("instances", max_instances, true),
            topics: self.state.map("topics", max_instances, false),
        }
    }
}

/// The flood window of an area: activations per second of the last 10 minutes, so an area
/// holds at most 601 buckets however many alarms it raises.
const AREA_WINDOW_S: i64 = 600;
/// Chattering: 3 activations within 60 s. A window keeps the last 4, which tells 3 from more.
const CHATTER_WINDOW_MS: i64 = 60_000;
const CHATTER_KEEP: usize = 4;

/// Flood and chattering bookkeeping (ISA-18.2 performance metrics), in bounded tables: an area
/// or alarm heard from least recently is forgotten for a new one (counted).
struct Rates {
    /// Activations per operator area and second, last 10 minutes: (unix second, count).
    by_area: BoundedMap<String, VecDeque<(i64, u32)>>,
    /// Activation times per alarm (rule id, topic), last 60 s, at most 4.
    by_alarm: BoundedMap<(String, String), VecDeque<i64>>,
    areas: MapStats,
    chatter: MapStats,
}

impl Rates {
    fn new(areas: MapStats, chatter: MapStats) -> Rates {
        Rates {
            by_area: BoundedMap::new(areas.capacity()),
            by_alarm: BoundedMap::new(chatter.capacity()),
            areas,
            chatter,
        }
    }

    /// Count an activation of `area` at `ts_ms`: the activations of the last 10 minutes, or
    /// `None` when the area cannot be tracked (a name longer than the whole table). Areas
    /// forgotten to make room are pushed to `evicted`.
    fn area(&mut self, area: &str, ts_ms: i64, evicted: &mut Vec<String>) -> Option<u32> {
        if !self.by_area.contains_key(area) {
            match self
                .by_area
                .insert(area.to_owned(), VecDeque::new(), text_weight(area.len()))
            {
                Ok(s) => {
                    self.areas.evicted(s.evicted.len());
                    evicted.extend(s.evicted.into_iter().map(|(a, _)| a));
                }
                Err(_) => {
                    self.areas.refused();
                    return None;
                }
            }
            self.areas.size(&self.by_area);
        }
        let w = self.by_area.get_mut(area)?;
        let sec = ts_ms.div_euclid(1000);
        match w.back_mut() {
            // Times out of order (a clock step) join the newest second.
            Some((last, n)) if *last >= sec => *n = n.saturating_add(1),
            _ => w.push_back((sec, 1)),
        }
        while w.front().is_some_and(|(t, _)| sec - t > AREA_WINDOW_S) {
            w.pop_front();
        }
        Some(w.iter().map(|(_, n)| n).sum())
    }

    /// Count an activation of alarm (`rule`, `topic`): true when it has now been raised 3
    /// times within 60 s (once per such run).
    fn chattering(&mut self, rule: &str, topic: &str, ts_ms: i64) -> bool {
        let key = (rule.to_owned(), topic.to_owned());
        if !self.by_alarm.contains_key(&key) {
            let weight = text_weight(rule.len() + topic.len());
            match self.by_alarm.insert(key.clone(), VecDeque::new(), weight) {
                Ok(s) => self.chatter.evicted(s.evicted.len()),
                Err(_) => {
                    self.chatter.refused();
                    return false;
                }
            }
            self.chatter.size(&self.by_alarm);
        }
        let Some(w) = self.by_alarm.get_mut(&key) else {
            return false;
        };
        w.push_back(ts_ms);
        while w.len() > CHATTER_KEEP || w.front().is_some_and(|t| ts_ms - t > CHATTER_WINDOW_MS) {
            w.pop_front();
        }
        w.len() == 3
    }
}

/// The shared state of the service.
pub struct Alerts {
    pub engine: Mutex<Engine>,
    rates: Mutex<Rates>,
    outbox: Mutex<Option<mpsc::Sender<Vec<Change>>>>,
    gauges_stale: std::sync::atomic::AtomicBool,
    notifier: std::sync::OnceLock<crate::webhook::Notifier>,
    journal: std::sync::OnceLock<mpsc::Sender<JournalRow>>,
    /// Set once the service's MQTT client exists (the HTTP routes are built before it).
    mqtt: std::sync::OnceLock<MqttHandle>,
    /// How each topic's payloads are read (`payloads`); value objects until set.
    payloads: std::sync::OnceLock<Decoder>,
    /// The Sparkplug births seen, to name data metrics (rules on `spBv1.0/...`).
    sparkplug: Mutex<SparkplugNames>,
    metrics: AlertMetrics,
    /// The alarm states on disk, the retained payloads they mirror, and what the file held at
    /// start (taken by [`Alerts::run`]).
    state_file: std::sync::OnceLock<Arc<crate::statefile::StateFile>>,
    states: Mutex<crate::statefile::States>,
    loaded: Mutex<Option<crate::statefile::States>>,
}

impl Alerts {
    /// The service around `engine`; the flood rates keep `max_areas` areas, and the chattering
    /// windows as many alarms as the engine holds instances.
    pub fn new(
        engine: Engine,
        metrics: AlertMetrics,
        max_areas: usize,
        sparkplug_aliases: usize,
    ) -> Arc<Alerts> {
        let chatter = engine.limits().instances.capacity();
        let sparkplug = SparkplugNames::new(metrics.state.map(
            "sparkplug_aliases",
            sparkplug_aliases,
            true,
        ));
        let rates = Rates::new(
            metrics.state.map("areas", max_areas, false),
            metrics.state.map("chattering", chatter, false),
        );
        Arc::new(Alerts {
            engine: Mutex::new(engine),
            journal: std::sync::OnceLock::new(),
            rates: Mutex::new(rates),
            outbox: Mutex::new(None),
            gauges_stale: std::sync::atomic::AtomicBool::new(false),
            notifier: std::sync::OnceLock::new(),
            mqtt: std::sync::OnceLock::new(),
            payloads: std::sync::OnceLock::new(),
            sparkplug: Mutex::new(sparkplug),
            metrics,
            state_file: std::sync::OnceLock::new(),
            states: Mutex::new(Default::default()),
            loaded: Mutex::new(None),
        })
    }

    /// Keep the alarm states in `file`; `loaded` is what it held (restored by [`Alerts::run`]
    /// before anything else).
    pub fn set_state_file(
        &self,
        file: crate::statefile::StateFile,
        loaded: Option<crate::statefile::States>,
    ) {
        if let Some(l) = &loaded {
            *self.states.lock().unwrap_or_else(|e| e.into_inner()) = l.clone();
        }
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = loaded;
        let _ = self.state_file.set(Arc::new(file));
    }

    /// Note the retained payload of a state topic (`None`: cleared) for the state file.
    fn mirror(&self, topic: &str, payload: Option<&[u8]>) {
        let mut s = self.states.lock().unwrap_or_else(|e| e.into_inner());
        match payload {
            Some(p) if !p.is_empty() => {
                s.insert(topic.to_owned(), String::from_utf8_lossy(p).into_owned());
            }
            _ => {
                s.remove(topic);
            }
        }
    }

    /// Write the alarm states to the state file, off the async threads.
    async fn save_states(&self) {
        let Some(file) = self.state_file.get().cloned() else {
            return;
        };
        let states = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let r = tokio::task::spawn_blocking(move || file.save(&states))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = r {
            self.metrics.state_file_errors.inc();
            tracing::warn!(error = %e, "cannot save the alarm states to alerts.state_dir");
        }
    }

    /// Read payloads with `d` (the `payloads` rules) instead of as value objects only.
    pub fn set_payloads(&self, d: Decoder) {
        let _ = self.payloads.set(d);
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

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish retained state and the event of each change.
    /// Hand changes to the outbox task (so a slow publish never stalls evaluation and the
    /// MQTT receive path), or publish them here when there is no outbox.
    pub(crate) async fn publish(&self, changes: Vec<Change>) {
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
        // The state file first: nobody sees a state (an acknowledgement, a shelve) that a
        // kill right after could take back.
        let mut bodies = Vec::with_capacity(changes.len());
        for c in &changes {
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
            self.mirror(&topic, Some(&body));
            bodies.push((topic, body));
        }
        if !changes.is_empty() {
            self.save_states().await;
        }
        for (c, (topic, body)) in changes.iter().zip(bodies) {
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
            if let Err(e) = mqtt.publish(&topic, body, QoS::AtLeastOnce, true).await {
                tracing::warn!(%topic, error = %e, "cannot publish alarm state");
            }
            let ev = event_payload(c, now);
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
        let mut forgotten = Vec::new();
        if let Some(n) = r.area(&c.area, c.ts_ms, &mut forgotten) {
            let n = i64::from(n);
            self.metrics.rate_10m.with_label_values(&[&c.area]).set(n);
            self.metrics
                .flood
                .with_label_values(&[&c.area])
                .set(i64::from(n > 10));
        }
        // A forgotten area's series go too, so the label sets stay as bounded as the table.
        for area in &forgotten {
            let _ = self.metrics.rate_10m.remove_label_values(&[area]);
            let _ = self.metrics.flood.remove_label_values(&[area]);
        }
        if r.chattering(&c.rule_id, &c.topic, c.ts_ms) {
            self.metrics.chattering.inc();
            tracing::warn!(rule = %c.rule_id, topic = %c.topic, "alarm is chattering: raised 3 times within 60 s");
        }
    }

    fn update_gauges(&self) {
        let now = now_ms();
        let mut by_sev: HashMap<u16, i64> = HashMap::new();
        {
            let engine = self.lock();
            // Every configured severity is shown, at 0 when none of its alarms is active.
            for rule in engine.rules() {
                by_sev.insert(rule.severity.0, 0);
            }
            for c in engine.alarms(now) {
                if c.alarm.state != State::Normal {
                    *by_sev.entry(c.severity).or_default() += 1;
                }
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
            let stamped = m.user_property(nexus_common::broker::USER_PROPERTY);
            self.on_ack(m.payload(), stamped).await;
            return;
        }
        if topic.starts_with(ALARM_PREFIX) {
            return; // our own state and events
        }
        if topic.starts_with("spBv1.0/") {
            return self.on_sparkplug(topic, m.payload()).await;
        }
        let decoded = match self.payloads.get() {
            Some(d) => d.decode(topic, m.payload()),
            None => Decoder::default().decode(topic, m.payload()),
        };
        // One count per message, whatever part of it was refused (the reason says why).
        if let Some(e) = &decoded.error {
            self.metrics
                .malformed
                .with_label_values(&[e.reason()])
                .inc();
            tracing::debug!(%topic, error = %e, "value not evaluated");
        }
        if decoded.samples.is_empty() {
            return;
        }
        self.metrics.values.inc_by(decoded.samples.len() as u64);
        let now = now_ms();
        let changes = {
            let mut engine = self.lock();
            let mut changes = Vec::new();
            for s in &decoded.samples {
                changes.extend(engine.on_value(s.topic(topic), &s.value, now));
            }
            changes
        };
        self.publish(changes).await;
    }

    /// A Sparkplug B message: each metric of a birth or data message is evaluated under its
    /// name `spBv1.0/<group>/<edge node>[/<device>]/<metric>`, as ingestion stores it. Values
    /// marked historical (sent late by store-and-forward) are not current and are not
    /// evaluated. Data by an alias no birth announced is counted (`unknown_alias`) and the node
    /// is asked for a rebirth.
    async fn on_sparkplug(&self, topic: &str, payload: &[u8]) {
        let read = self
            .sparkplug
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(topic, payload);
        let malformed = |reason: &str| self.metrics.malformed.with_label_values(&[reason]).inc();
        if let Some((reason, detail)) = &read.refused {
            malformed(reason);
            tracing::debug!(%topic, error = %detail, "Sparkplug message not evaluated");
        }
        if read.bad_metric.is_some() {
            malformed("sparkplug_metric");
        }
        if !read.unknown_aliases.is_empty() {
            malformed("unknown_alias");
            tracing::debug!(%topic, aliases = ?read.unknown_aliases, "Sparkplug aliases no birth announced");
        }
        if let (Some((t, p)), Some(mqtt)) = (read.rebirth, self.mqtt.get()) {
            if let Err(e) = mqtt.publish(&t, p, QoS::AtLeastOnce, false).await {
                tracing::debug!(error = %e, "cannot ask for a Sparkplug rebirth");
            }
        }
        let now = now_ms();
        let current: Vec<_> = read.metrics.into_iter().filter(|m| !m.historical).collect();
        if current.is_empty() {
            return;
        }
        self.metrics.values.inc_by(current.len() as u64);
        let changes = {
            let mut engine = self.lock();
            let mut changes = Vec::new();
            for m in current {
                let value = ValueObject {
                    quality: if m.value.is_some() {
                        Quality::Good
                    } else {
                        Quality::Bad
                    },
                    value: m.value,
                    ts_ms: m.ts_ms.and_then(|t| i64::try_from(t).ok()),
                    source_ts_ms: None,
                    unit: None,
                };
                changes.extend(engine.on_value(&m.topic, &value, now));
            }
            changes
        };
        self.publish(changes).await;
    }

    /// An acknowledgement over MQTT. The journal's user is the one the broker authenticated
    /// (`stamped`); the payload's `user` counts only where no broker says (an external broker).
    async fn on_ack(&self, payload: &[u8], stamped: Option<&str>) {
        match serde_json::from_slice::<Ack>(payload) {
            Ok(a) => {
                let user = stamped.map(str::to_owned).or(a.user);
                let r = self
                    .lock()
                    .acknowledge(&a.rule_id, &a.topic, now_ms(), user, a.comment);
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

    /// Acknowledge a message to the broker once it is evaluated (manual acks, in the order
    /// messages arrived): one the service took but had not evaluated when it stopped comes
    /// again after the restart.
    async fn ack(&self, m: &Message) {
        if let Some(mqtt) = self.mqtt.get() {
            if let Err(e) = mqtt.ack(m).await {
                tracing::debug!(error = %e, "cannot acknowledge a message");
            }
        }
    }

    /// Read a retained `$nexus/alarms/<topic>/<rule>` state back into the engine.
    fn restore(&self, m: &Message) -> bool {
        let Some(topic) = m.topic() else { return false };
        self.restore_state(topic, m.payload())
    }

    fn restore_state(&self, topic: &str, payload: &[u8]) -> bool {
        let Some((rule, t, alarm)) = parse_state(topic, payload) else {
            return false;
        };
        match self.lock().restore(&rule, &t, alarm) {
            Restore::Restored => {
                self.mirror(topic, Some(payload));
                true
            }
            Restore::UnknownRule => false,
            Restore::Refused => {
                tracing::warn!(%rule, topic = %t, "alarm state not restored: the instance table (alerts.max_instances) is full of alarms that may not be forgotten");
                false
            }
        }
    }

    /// Apply reloaded rules: keep the alarms of unchanged rules, clear the retained state of
    /// the others, subscribe to new filters.
    pub async fn reload(&self, rules: &[nexus_common::config::AlertRule]) {
        let (removed, mut filters) = {
            let mut e = self.lock();
            let removed = e.replace_rules(rules);
            (removed, e.filters())
        };
        // As at start: messages that may hold values of topics below their own (UMH).
        if let (Some(d), false) = (self.payloads.get(), filters.is_empty()) {
            filters.extend(d.splitting_filters());
        }
        if let Some(mqtt) = self.mqtt.get() {
            for (rule, topic) in &removed {
                let st = state_topic(topic, rule);
                self.mirror(&st, None);
                let _ = mqtt.publish(&st, Vec::new(), QoS::AtLeastOnce, true).await;
            }
            if !removed.is_empty() {
                self.save_states().await;
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
    ///
    /// The broker sends what a subscription finds retained before anything live, marked
    /// retained: the restore ends at the first live message, after 500 ms without messages,
    /// or after 5 s at most (a topic that changes more often than every 500 ms never leaves a
    /// quiet moment). What arrived meanwhile is evaluated right after, in order.
    pub async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Message>, token: CancellationToken) {
        // The state file first: it is the last word on every alarm (the broker's retained
        // states may be older, or gone).
        let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).take();
        let from_file = loaded.is_some();
        let mut from_disk = 0;
        for (topic, payload) in loaded.unwrap_or_default() {
            if self.restore_state(&topic, payload.as_bytes()) {
                from_disk += 1;
            } else {
                self.mirror(&topic, None);
            }
        }
        let mut restored = 0;
        let mut early = Vec::new();
        let quiet = Duration::from_millis(500);
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let Ok(Some(m)) = tokio::time::timeout(quiet.min(left), rx.recv()).await else {
                break;
            };
            let live = !m.retain();
            let done = !from_file && self.restore(&m);
            if done {
                restored += 1;
            }
            early.push((m, done));
            if live || left.is_zero() {
                break;
            }
        }
        tracing::info!(from_disk, from_retained = restored, "alarm states restored");
        let (otx, mut orx) = mpsc::channel::<Vec<Change>>(1024);
        *self.outbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(otx);
        let me = self.clone();
        let outbox = tokio::spawn(async move {
            while let Some(c) = orx.recv().await {
                me.emit(c).await;
            }
        });
        self.update_gauges();
        for (m, restored) in early {
            if !restored {
                self.on_message(&m).await;
            }
            self.ack(&m).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        self.on_message(&m).await;
                        self.ack(&m).await;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(areas: usize, alarms: usize) -> Rates {
        Rates::new(
            MapStats::detached("areas", areas),
            MapStats::detached("chattering", alarms),
        )
    }

    #[test]
    fn flood_windows_are_bounded_per_area_and_in_number() {
        let mut r = rates(2, 10);
        let mut gone = Vec::new();
        // 100,000 activations in one area within a minute: at most 61 buckets, exact count.
        for i in 0..100_000 {
            assert_eq!(
                r.area("a", i * 60_000 / 100_000, &mut gone),
                Some(i as u32 + 1)
            );
        }
        assert!(r.by_area.peek("a").is_some_and(|w| w.len() <= 61));
        // At 630 s those of the first 30 s have left the window.
        assert_eq!(r.area("a", 630_500, &mut gone), Some(1 + 50_000));
        // New areas push the least recent out, and say which.
        r.area("b", 700_000, &mut gone);
        r.area("c", 700_001, &mut gone);
        assert_eq!(gone, vec!["a".to_string()]);
        assert_eq!(r.by_area.len(), 2);
        assert_eq!(r.areas.evicted_total(), 1);
    }

    #[test]
    fn chattering_is_three_within_a_minute_once_per_run() {
        let mut r = rates(2, 2);
        let hits: Vec<bool> = [0, 10_000, 20_000, 30_000, 40_000, 200_000, 201_000, 202_000]
            .into_iter()
            .map(|t| r.chattering("hot", "t/x", t))
            .collect();
        assert_eq!(
            hits,
            vec![false, false, true, false, false, false, false, true]
        );
        assert!(r
            .by_alarm
            .peek(&("hot".to_owned(), "t/x".to_owned()))
            .is_some_and(|w| w.len() <= CHATTER_KEEP));
        // Alarms beyond the bound push the least recent out.
        r.chattering("hot", "t/y", 0);
        r.chattering("hot", "t/z", 0);
        assert_eq!(r.by_alarm.len(), 2);
        assert_eq!(r.chatter.evicted_total(), 1);
    }
}
