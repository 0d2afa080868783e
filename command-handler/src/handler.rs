//! The command path: receive, parse, queue (bounded; full = answered at once), run with a
//! concurrency limit, TTL, duplicate request ids, validation, rate limits, the write through
//! the gateway's pools with a timeout, optional read-back, response and audit.
//!
//! The duplicate table is keyed by request ids requesters choose, so it is bounded
//! (`commands.dedup_max_entries`): when full, the oldest answer is forgotten for a new one
//! (counted); a command still running never is. It is also kept on disk ([`crate::journal`]),
//! so a repeat after a restart is answered, never run again.
//!
//! Messages are acknowledged to the broker (manual acks, in the order they arrived) only once
//! the command is answered: a command the handler had not answered when it stopped comes again
//! from its persistent session after the restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nexus_common::bounded::{text_weight, BoundedMap, MapStats, StateMetrics};
use nexus_common::broker::{Acl, Action};
use nexus_common::codec::json::value_to_json;
use nexus_common::config::CommandsConfig;
use nexus_common::metrics::{self, MetricError};
use nexus_common::mqtt::{Message, MqttHandle, PublishProps, QoS};
use nexus_common::ratelimit::{Rate, RateLimitMetrics, RateLimiter};
use nexus_common::{now_ms, Value};
use nexus_devices::{DeviceDirectory, PoolError, Pools, Reading};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use serde_json::json;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditRecord;
use crate::command::{self, CmdTopic, Command, Rejection, ReplyTopic};
use crate::validate;
use nexus_common::topic::sys;

#[derive(Clone)]
pub struct CommandMetrics {
    pub received: IntCounter,
    pub succeeded: IntCounter,
    pub failed: IntCounter,
    pub rejected: IntCounterVec,
    pub queue_depth: IntGauge,
    pub in_flight: IntGauge,
    pub latency: Histogram,
    pub audit_dropped: IntCounter,
    pub response_topic_refused: IntCounter,
    /// `nexus_commands_state_*{map}`: the duplicate table.
    pub state: StateMetrics,
}

impl CommandMetrics {
    pub fn new(r: &Registry) -> Result<CommandMetrics, MetricError> {
        Ok(CommandMetrics {
            received: metrics::counter(
                r,
                "nexus_commands_received_total",
                "Command messages received",
            )?,
            succeeded: metrics::counter(
                r,
                "nexus_commands_succeeded_total",
                "Writes that succeeded",
            )?,
            failed: metrics::counter(
                r,
                "nexus_commands_failed_total",
                "Writes that reached the device and failed",
            )?,
            rejected: metrics::counter_vec(
                r,
                "nexus_commands_rejected_total",
                "Commands or writes refused before device I/O, by reason",
                &["reason"],
            )?,
            queue_depth: metrics::gauge(
                r,
                "nexus_commands_queue_depth",
                "Commands waiting to run",
            )?,
            in_flight: metrics::gauge(r, "nexus_commands_in_flight", "Writes running")?,
            latency: metrics::histogram(
                r,
                "nexus_commands_latency_seconds",
                "From arrival to response",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )?,
            audit_dropped: metrics::counter(
                r,
                "nexus_commands_audit_dropped_total",
                "Audit rows not queued for the database (queue full)",
            )?,
            response_topic_refused: metrics::counter(
                r,
                "nexus_commands_response_topic_refused_total",
                "MQTT 5 Response Topics not published to (a $ topic, a wildcard, or not a valid topic)",
            )?,
            state: StateMetrics::new(r, "nexus_commands")?,
        })
    }
}

/// One answer, for one tag, or for the whole command when its tag is unknown (published on
/// `$nexus/cmd/response/<device>` then, without a tag level).
#[derive(Debug, Clone)]
pub struct Response {
    pub device: String,
    pub tag: Option<String>,
    pub body: serde_json::Value,
}

/// A command waiting to run.
struct Job {
    cmd: Command,
    arrived: Instant,
    reply_to: Option<(ReplyTopic, Option<Bytes>)>,
    /// Its place in the acknowledgement order.
    ack: u64,
}

enum Dedup {
    Running(watch::Receiver<Option<Arc<Vec<Response>>>>),
    Done(Arc<Vec<Response>>, Instant),
    /// Started before a restart and never answered: whether it reached the device is unknown.
    Interrupted(Instant),
}

/// What the duplicate table says of a request id.
enum Seen {
    Answered(Arc<Vec<Response>>),
    Running(watch::Receiver<Option<Arc<Vec<Response>>>>),
    Interrupted,
}

/// Acknowledgements in the order the messages arrived (MQTT 3.1.1 4.6): a message is acked
/// once it and every message before it are answered.
#[derive(Default)]
struct AckOrder {
    /// Sequence number of the first entry of `waiting`.
    base: u64,
    /// Messages not yet acknowledged, with whether each is answered.
    waiting: std::collections::VecDeque<(Message, bool)>,
}

impl Dedup {
    /// A run whose task is gone (it never answers): as good as absent.
    fn abandoned(&self) -> bool {
        matches!(self, Dedup::Running(rx) if rx.has_changed().is_err())
    }

    /// Whether it may be forgotten to make room: an answer, or an abandoned run; never a
    /// command still running, whose duplicates wait for it.
    fn evictable(&self) -> bool {
        matches!(self, Dedup::Done(..) | Dedup::Interrupted(_)) || self.abandoned()
    }
}

pub struct Handler {
    cfg: CommandsConfig,
    directory: Arc<DeviceDirectory>,
    pools: Arc<Pools>,
    mqtt: MqttHandle,
    limiter: RateLimiter,
    inflight: Arc<Semaphore>,
    /// (device, request id) -> the run or its answer, oldest first.
    dedup: Mutex<BoundedMap<String, Dedup>>,
    dedup_stats: MapStats,
    metrics: CommandMetrics,
    audit: Option<mpsc::Sender<AuditRecord>>,
    /// What the requesters may subscribe to: a Response Topic is published to only where its
    /// requester may.
    acl: Acl,
    /// The request ids on disk (set by [`Handler::restore`]).
    journal: std::sync::OnceLock<Arc<crate::journal::Journal>>,
    acks: tokio::sync::Mutex<AckOrder>,
}

fn response_body(
    request_id: &Option<String>,
    device: &str,
    tag: Option<&str>,
    success: bool,
    error: Option<String>,
    value: Option<&Value>,
    duration: Duration,
) -> serde_json::Value {
    json!({
        "request_id": request_id,
        "device_id": device,
        "tag_id": tag,
        "success": success,
        "error": error,
        "value": value_to_json(value),
        "duration_ms": (duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
        "ts": now_ms(),
    })
}

fn same(a: &Value, b: &Value, scale: Option<f64>) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if !matches!(a, Value::String(_)) => {
            let tol = scale.map_or(1e-6 * x.abs().max(1.0), |s| s.abs() / 2.0 + 1e-9);
            (x - y).abs() <= tol
        }
        _ => a == b,
    }
}

impl Handler {
    pub fn new(
        cfg: CommandsConfig,
        directory: Arc<DeviceDirectory>,
        pools: Arc<Pools>,
        mqtt: MqttHandle,
        registry: &Registry,
        audit: Option<mpsc::Sender<AuditRecord>>,
        acl: Acl,
    ) -> Result<Arc<Handler>, MetricError> {
        let limiter = RateLimiter::new(
            "commands",
            Rate::new(cfg.rate_global, cfg.burst_global),
            Rate::new(cfg.rate_per_device, cfg.burst_per_device),
            Some(RateLimitMetrics::new(registry)?),
        );
        let metrics = CommandMetrics::new(registry)?;
        let dedup_stats = metrics.state.map("dedup", cfg.dedup_max_entries, true);
        Ok(Arc::new(Handler {
            inflight: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            dedup: Mutex::new(BoundedMap::new(cfg.dedup_max_entries)),
            dedup_stats,
            cfg,
            directory,
            pools,
            mqtt,
            limiter,
            metrics,
            audit,
            acl,
            journal: std::sync::OnceLock::new(),
            acks: tokio::sync::Mutex::new(AckOrder::default()),
        }))
    }

    /// Keep request ids in `journal` from now on, and take back what it held at start: the
    /// answers (a repeat gets them), and the commands started and never answered (a repeat
    /// gets "outcome unknown").
    pub fn restore(&self, journal: Arc<crate::journal::Journal>, opened: crate::journal::Opened) {
        let now = now_ms();
        let mut d = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
        let (mut answered, mut interrupted) = (0, 0);
        for e in opened.entries {
            let age = Duration::from_millis(now.saturating_sub(e.at).max(0) as u64);
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let (entry, bytes) = match e.answer {
                Some(a) => {
                    answered += 1;
                    let bytes = a.iter().map(|r| r.body.to_string().len()).sum();
                    (Dedup::Done(Arc::new(a), at), bytes)
                }
                None => {
                    interrupted += 1;
                    (Dedup::Interrupted(at), 0)
                }
            };
            let weight = text_weight(e.key.len() + bytes);
            match d.insert_evicting(e.key, entry, weight, |_, v| v.evictable()) {
                Ok(s) => self.dedup_stats.evicted(s.evicted.len()),
                Err(_) => self.dedup_stats.refused(),
            }
        }
        self.dedup_stats.size(&d);
        drop(d);
        tracing::info!(
            answered,
            interrupted,
            unreadable = opened.unreadable,
            "request ids restored from the journal"
        );
        let _ = self.journal.set(journal);
    }

    /// Run a journal write off the async threads.
    async fn journal_write(
        &self,
        f: impl FnOnce(&crate::journal::Journal) -> std::io::Result<()> + Send + 'static,
    ) -> Option<std::io::Result<()>> {
        let j = self.journal.get()?.clone();
        Some(
            tokio::task::spawn_blocking(move || f(&j))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))),
        )
    }

    /// A message's place in the acknowledgement order.
    async fn arrived(&self, msg: Message) -> u64 {
        let mut a = self.acks.lock().await;
        a.waiting.push_back((msg, false));
        a.base + a.waiting.len() as u64 - 1
    }

    /// The message `seq` is answered: acknowledge it and every answered one before it, in order.
    async fn answered(&self, seq: u64) {
        let mut a = self.acks.lock().await;
        if let Some(i) = seq.checked_sub(a.base) {
            if let Some(e) = a.waiting.get_mut(i as usize) {
                e.1 = true;
            }
        }
        while a.waiting.front().is_some_and(|(_, done)| *done) {
            if let Some((m, _)) = a.waiting.pop_front() {
                a.base += 1;
                if let Err(e) = self.mqtt.ack(&m).await {
                    tracing::warn!(error = %e, "cannot acknowledge a command message");
                }
            }
        }
    }

    async fn send(&self, responses: &[Response], reply_to: &Option<(ReplyTopic, Option<Bytes>)>) {
        for r in responses {
            let topic = sys::cmd_response(&r.device, r.tag.as_deref());
            let payload = r.body.to_string();
            if let Err(e) = self
                .mqtt
                .publish(&topic, payload.clone(), QoS::AtLeastOnce, false)
                .await
            {
                tracing::warn!(%topic, error = %e, "cannot publish a command response");
            }
            if let Some((rt, corr)) = reply_to {
                let props = PublishProps {
                    correlation_data: corr.clone(),
                    ..PublishProps::default()
                };
                if let Err(e) = self
                    .mqtt
                    .publish_with(rt.as_str(), payload, QoS::AtLeastOnce, false, Some(props))
                    .await
                {
                    tracing::warn!(topic = rt.as_str(), error = %e, "cannot publish to the command's response topic");
                }
            }
        }
    }

    fn reject_parse(&self, r: &Rejection) -> Option<Response> {
        self.metrics.rejected.with_label_values(&[r.reason]).inc();
        tracing::warn!(device = ?r.device, tag = ?r.tag, request_id = ?r.request_id, reason = r.reason, error = %r.message, "command refused");
        let device = r.device.clone()?;
        let tag = r.tag.clone();
        let body = response_body(
            &r.request_id,
            &device,
            tag.as_deref(),
            false,
            Some(r.message.clone()),
            None,
            Duration::ZERO,
        );
        Some(Response { device, tag, body })
    }

    /// Take one MQTT message: parse it and queue it, or answer at once.
    async fn accept(&self, msg: Message, queue: &mpsc::Sender<Job>) {
        let seq = self.arrived(msg.clone()).await;
        let Some(topic) = msg.topic() else {
            return self.answered(seq).await;
        };
        if topic.starts_with(sys::CMD_RESPONSE_PREFIX) {
            return self.answered(seq).await;
        }
        self.metrics.received.inc();
        let user = msg.user_property(nexus_common::broker::USER_PROPERTY);
        // A Nexus service writing for a user (the control center through the orchestrator):
        // the audit names the user. Taken only from a publisher stamped as a service.
        let on_behalf = msg
            .user_property(nexus_common::broker::ON_BEHALF_PROPERTY)
            .filter(|_| {
                user.is_some_and(|u| {
                    self.acl.identity(Some(u)).role == nexus_common::config::Role::Service
                })
            });
        let reply_to = msg.response_topic().and_then(|t| {
            match ReplyTopic::parse(t).map_err(str::to_owned).and_then(|rt| {
                // The handler publishes as the service user, which may write a device's
                // values: a Response Topic in a device's namespace would let a requester
                // write there through it.
                if let Some(p) = self.directory.uns_prefix_holding(rt.as_str()) {
                    return Err(format!(
                        "it is in the namespace of configured devices ({p})"
                    ));
                }
                // Only where the requester (as the broker authenticated it) may subscribe.
                if let Some(name) = user {
                    let who = self.acl.identity(Some(name));
                    self.acl
                        .check(&who, Action::Subscribe, rt.as_str())
                        .map_err(|why| format!("{name} may not subscribe there: {why}"))?;
                }
                Ok(rt)
            }) {
                Ok(rt) => Some((rt, msg.correlation_data().cloned())),
                Err(why) => {
                    // Refused, not answered there: the standard answer on $nexus/cmd/response/
                    // still goes out. The requester's topic is logged cut to its first levels.
                    self.metrics.response_topic_refused.inc();
                    tracing::warn!(
                        topic,
                        response_topic = ?command::redact_topic(t),
                        why = %why,
                        "response topic refused; answering on $nexus/cmd/response/ only"
                    );
                    None
                }
            }
        });
        let parsed = command::parse_topic(topic).and_then(|t: CmdTopic| {
            command::parse(&t, msg.payload(), self.cfg.max_payload.0 as usize)
        });
        let cmd = match parsed {
            Ok(mut c) => {
                c.user = on_behalf.or(user).map(str::to_owned);
                c
            }
            Err(r) => {
                if let Some(resp) = self.reject_parse(&r) {
                    self.send(&[resp], &reply_to).await;
                }
                return self.answered(seq).await;
            }
        };
        let job = Job {
            cmd,
            arrived: Instant::now(),
            reply_to,
            ack: seq,
        };
        match queue.try_send(job) {
            Ok(()) => self
                .metrics
                .queue_depth
                .set((self.cfg.queue_size - queue.capacity()) as i64),
            Err(mpsc::error::TrySendError::Full(job))
            | Err(mpsc::error::TrySendError::Closed(job)) => {
                let responses = self.fail_all(
                    &job.cmd,
                    "queue_full",
                    format!(
                        "queue full ({} commands waiting); try again later",
                        self.cfg.queue_size
                    ),
                );
                self.send(&responses, &job.reply_to).await;
                self.answered(job.ack).await;
            }
        }
    }

    fn fail_all(&self, cmd: &Command, reason: &'static str, message: String) -> Vec<Response> {
        self.metrics
            .rejected
            .with_label_values(&[reason])
            .inc_by(cmd.writes.len() as u64);
        tracing::warn!(device = %cmd.device, request_id = ?cmd.request_id, reason, error = %message, "command refused");
        cmd.writes
            .iter()
            .map(|(tag, v)| Response {
                device: cmd.device.clone(),
                tag: Some(tag.clone()),
                body: response_body(
                    &cmd.request_id,
                    &cmd.device,
                    Some(tag),
                    false,
                    Some(message.clone()),
                    Some(v),
                    Duration::ZERO,
                ),
            })
            .collect()
    }

    /// Run one job to its responses, then acknowledge its message.
    async fn execute(self: &Arc<Self>, job: Job) {
        self.run_job(&job).await;
        self.answered(job.ack).await;
    }

    async fn run_job(self: &Arc<Self>, job: &Job) {
        let cmd = &job.cmd;
        let ttl = cmd
            .ttl_ms
            .map(Duration::from_millis)
            .unwrap_or(self.cfg.ttl);
        let age = match cmd.sent_ts_ms {
            Some(ts) => Duration::from_millis(now_ms().saturating_sub(ts).max(0) as u64),
            None => job.arrived.elapsed(),
        };
        if age > ttl {
            let r = self.fail_all(
                cmd,
                "ttl_expired",
                format!(
                    "expired: the command is {} ms old, its ttl is {} ms",
                    age.as_millis(),
                    ttl.as_millis()
                ),
            );
            self.send(&r, &job.reply_to).await;
            return;
        }
        // Duplicate request ids are answered from the first result.
        let key = cmd
            .request_id
            .as_ref()
            .map(|id| format!("{}\u{0}{id}", cmd.device));
        let mut publish_done = None;
        if let Some(k) = &key {
            let existing = {
                let mut d = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
                match d.peek(k.as_str()) {
                    Some(Dedup::Done(r, at)) if at.elapsed() < self.cfg.dedup_window => {
                        Some(Seen::Answered(r.clone()))
                    }
                    Some(Dedup::Interrupted(at)) if at.elapsed() < self.cfg.dedup_window => {
                        Some(Seen::Interrupted)
                    }
                    Some(run @ Dedup::Running(rx)) if !run.abandoned() => {
                        Some(Seen::Running(rx.clone()))
                    }
                    _ => {
                        let (tx, rx) = watch::channel(None);
                        let weight = text_weight(k.len());
                        match d.insert_evicting(k.clone(), Dedup::Running(rx), weight, |_, v| {
                            v.evictable()
                        }) {
                            Ok(s) => {
                                self.dedup_stats.evicted(s.evicted.len());
                                publish_done = Some(tx);
                            }
                            // Full of commands still running: this one runs unprotected.
                            Err(_) => self.dedup_stats.refused(),
                        }
                        self.dedup_stats.size(&d);
                        None
                    }
                }
            };
            match existing {
                Some(Seen::Interrupted) => {
                    let r = self.fail_all(
                        cmd,
                        "interrupted",
                        "outcome unknown: the command handler stopped while running this \
                         command, so it is not run again; read the tag to see whether it was \
                         written"
                            .into(),
                    );
                    self.send(&r, &job.reply_to).await;
                    return;
                }
                Some(Seen::Answered(first)) => {
                    self.metrics
                        .rejected
                        .with_label_values(&["duplicate"])
                        .inc();
                    self.send(&first, &job.reply_to).await;
                    return;
                }
                Some(Seen::Running(mut rx)) => {
                    self.metrics
                        .rejected
                        .with_label_values(&["duplicate"])
                        .inc();
                    // The watch guard must not live across the next await.
                    let first: Option<Arc<Vec<Response>>> = {
                        let r = tokio::time::timeout(
                            self.cfg.write_timeout * 2,
                            rx.wait_for(|v| v.is_some()),
                        )
                        .await;
                        match r {
                            Ok(Ok(v)) => v.clone(),
                            _ => None,
                        }
                    };
                    if let Some(r) = first {
                        self.send(&r, &job.reply_to).await;
                    }
                    return;
                }
                None => {}
            }
        }
        // On disk before the first write reaches the device: after a restart a repeat is
        // answered from the journal, never run again. Without the record it does not run.
        let journaled = match (&key, &publish_done) {
            (Some(k), Some(_)) => {
                let (k, at) = (k.clone(), now_ms());
                self.journal_write(move |j| j.started(&k, at)).await
            }
            _ => None,
        };
        let responses = match journaled {
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot record a command in the journal; not run");
                self.fail_all(
                    cmd,
                    "journal",
                    format!("not run: the command handler cannot record it on disk ({e})"),
                )
            }
            _ => {
                let mut responses = Vec::with_capacity(cmd.writes.len());
                for (tag, value) in &cmd.writes {
                    responses.push(self.write_one(cmd, tag, value, job.arrived).await);
                }
                responses
            }
        };
        if let (Some(k), Some(_)) = (&key, &publish_done) {
            let (k, at, answer) = (k.clone(), now_ms(), responses.clone());
            if let Some(Err(e)) = self.journal_write(move |j| j.done(&k, &answer, at)).await {
                tracing::warn!(error = %e, "cannot record a command's answer in the journal");
            }
        }
        self.send(&responses, &job.reply_to).await;
        self.metrics
            .latency
            .observe(job.arrived.elapsed().as_secs_f64());
        if let (Some(k), Some(tx)) = (key, publish_done) {
            // The answer is kept as well as the key: it counts in the table's bound.
            let bytes: usize = responses.iter().map(|r| r.body.to_string().len()).sum();
            let weight = text_weight(k.len() + bytes);
            let shared = Arc::new(responses);
            {
                let mut d = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
                let done = Dedup::Done(shared.clone(), Instant::now());
                match d.insert_evicting(k, done, weight, |_, v| v.evictable()) {
                    Ok(s) => self.dedup_stats.evicted(s.evicted.len()),
                    // Not kept (the run's entry is gone too): a repeat runs again.
                    Err(_) => self.dedup_stats.refused(),
                }
                self.dedup_stats.size(&d);
            }
            let _ = tx.send(Some(shared));
        }
    }

    async fn write_one(
        &self,
        cmd: &Command,
        tag: &str,
        value: &Value,
        arrived: Instant,
    ) -> Response {
        let device_id = cmd.device.as_str();
        let device = self.directory.get(device_id);
        let mut audit = AuditRecord {
            ts_ms: now_ms(),
            device: device_id.to_owned(),
            tag: tag.to_owned(),
            request_id: cmd.request_id.clone(),
            user: cmd.user.clone(),
            claimed_user: cmd.claimed_user.clone(),
            value: Some(value.clone()),
            old_value: None,
            read_back: None,
            success: false,
            error: None,
            duration_ms: 0.0,
        };
        let done = |audit: &mut AuditRecord,
                    success: bool,
                    error: Option<String>,
                    read_back: Option<Value>,
                    this: &Handler| {
            let duration = arrived.elapsed();
            audit.success = success;
            audit.error = error.clone();
            audit.read_back = read_back.clone();
            audit.duration_ms = duration.as_secs_f64() * 1000.0;
            audit.log();
            if let Some(tx) = &this.audit {
                if tx.try_send(audit.clone()).is_err() {
                    this.metrics.audit_dropped.inc();
                }
            }
            let mut body = response_body(
                &cmd.request_id,
                device_id,
                Some(tag),
                success,
                error,
                Some(value),
                duration,
            );
            if let Some(rb) = &read_back {
                body["read_back"] = value_to_json(Some(rb));
            }
            if let Some(old) = &audit.old_value {
                body["old_value"] = value_to_json(Some(old));
            }
            Response {
                device: device_id.to_owned(),
                tag: Some(tag.to_owned()),
                body,
            }
        };
        let (index, coerced) = match validate::validate(device_id, device.as_deref(), tag, value) {
            Ok(v) => v,
            Err(e) => {
                self.metrics
                    .rejected
                    .with_label_values(&[e.rule.as_str()])
                    .inc();
                return done(
                    &mut audit,
                    false,
                    Some(format!("validation failed: {}", e.message)),
                    None,
                    self,
                );
            }
        };
        let Some(device) = device else {
            return done(
                &mut audit,
                false,
                Some(format!("unknown device {device_id}")),
                None,
                self,
            );
        };
        if let Err(e) = self.limiter.check(device_id) {
            self.metrics
                .rejected
                .with_label_values(&["rate_limited"])
                .inc();
            return done(&mut audit, false, Some(e.to_string()), None, self);
        }
        let Ok(_permit) = self.inflight.clone().acquire_owned().await else {
            return done(
                &mut audit,
                false,
                Some("command handler is stopping".into()),
                None,
                self,
            );
        };
        self.metrics.in_flight.inc();
        let tag_cfg = &device.cfg.tags[index];
        let confirm = cmd.confirm.unwrap_or(tag_cfg.confirm);
        let timeout = self.cfg.write_timeout;
        if confirm {
            if let Ok(Ok(r)) =
                tokio::time::timeout(timeout, self.pools.read(&device, Some(vec![index]))).await
            {
                if let Some((_, Reading::Good { value, .. })) = r.first() {
                    audit.old_value = Some(value.clone());
                }
            }
        }
        let result =
            tokio::time::timeout(timeout, self.pools.write(&device, index, coerced.clone())).await;
        let outcome = match result {
            Err(_) => Err(format!("the device did not answer within {timeout:?}")),
            Ok(Err(PoolError::Open(o))) => Err(format!(
                "device {device_id} is offline (circuit breaker open; retry in {:.1} s)",
                o.retry_in.as_secs_f64()
            )),
            Ok(Err(e)) => Err(format!("device {device_id} unreachable: {e}")),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Ok(Ok(()))) => Ok(()),
        };
        let response = match outcome {
            Err(e) => {
                self.metrics.failed.inc();
                done(&mut audit, false, Some(e), None, self)
            }
            Ok(()) if confirm => {
                let back =
                    tokio::time::timeout(timeout, self.pools.read(&device, Some(vec![index])))
                        .await;
                let read_back = match back {
                    Ok(Ok(r)) => r.into_iter().next().and_then(|(_, r)| match r {
                        Reading::Good { value, .. } | Reading::Uncertain { value, .. } => {
                            Some(value)
                        }
                        Reading::Bad { .. } => None,
                    }),
                    _ => None,
                };
                match read_back {
                    Some(rb) if same(&rb, &coerced, tag_cfg.scale) => {
                        self.metrics.succeeded.inc();
                        done(&mut audit, true, None, Some(rb), self)
                    }
                    Some(rb) => {
                        self.metrics.failed.inc();
                        done(
                            &mut audit,
                            false,
                            Some(format!("read back {rb} after writing {coerced}")),
                            Some(rb),
                            self,
                        )
                    }
                    None => {
                        self.metrics.failed.inc();
                        done(
                            &mut audit,
                            false,
                            Some("written, but the read-back failed".into()),
                            None,
                            self,
                        )
                    }
                }
            }
            Ok(()) => {
                self.metrics.succeeded.inc();
                done(&mut audit, true, None, None, self)
            }
        };
        self.metrics.in_flight.dec();
        response
    }

    fn housekeeping(&self) {
        let window = self.cfg.dedup_window;
        {
            let mut d = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
            // Expired answers and abandoned runs go; they are not evictions.
            d.retain(|_, v| match v {
                Dedup::Done(_, at) | Dedup::Interrupted(at) => at.elapsed() < window,
                run @ Dedup::Running(_) => !run.abandoned(),
            });
            self.dedup_stats.size(&d);
        }
        self.limiter.housekeeping();
    }

    /// Request ids remembered now (running or answered).
    pub fn dedup_entries(&self) -> usize {
        self.dedup.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Run until `incoming` closes or `token` is cancelled; queued commands are answered
    /// before returning.
    pub async fn run(
        self: Arc<Self>,
        mut incoming: mpsc::Receiver<Message>,
        token: CancellationToken,
    ) {
        let (tx, mut rx) = mpsc::channel::<Job>(self.cfg.queue_size.max(1));
        let me = self.clone();
        let dispatcher = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(job) = rx.recv().await {
                me.metrics.queue_depth.set(rx.len() as i64);
                // Bound the tasks waiting for a write permit to the in-flight limit.
                while tasks.len() >= me.cfg.max_in_flight.max(1) {
                    tasks.join_next().await;
                }
                let h = me.clone();
                tasks.spawn(async move { h.execute(job).await });
            }
            while tasks.join_next().await.is_some() {}
        });
        let mut house = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                m = incoming.recv() => match m {
                    Some(m) => self.accept(m, &tx).await,
                    None => break,
                },
                _ = house.tick() => self.housekeeping(),
                _ = token.cancelled() => break,
            }
        }
        drop(tx);
        let _ = dispatcher.await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a requester puts in a command, the answer the handler builds from it is
        /// refused if it comes back as a command, on either topic shape.
        #[test]
        fn an_answer_never_parses_as_a_command(
            request_id in proptest::option::of("\\PC{0,40}"),
            tag in "[a-z0-9_.-]{1,20}",
            value in prop_oneof![any::<i64>().prop_map(Value::Int), any::<bool>().prop_map(Value::Bool), "\\PC{0,20}".prop_map(Value::String)],
            success in any::<bool>(),
            error in proptest::option::of("\\PC{0,40}"),
        ) {
            let body = response_body(&request_id, "plc", Some(&tag), success, error, Some(&value), Duration::from_micros(1234));
            let payload = body.to_string();
            for topic in [CmdTopic::Write { device: "plc".into() }, CmdTopic::Set { device: "plc".into(), tag: tag.clone() }] {
                let e = command::parse(&topic, payload.as_bytes(), 1 << 20).unwrap_err();
                prop_assert_eq!(e.reason, "bad_payload");
            }
        }
    }
}
