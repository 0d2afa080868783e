//! Polling: one task per device on its interval (plus 0-10% jitter so devices do not poll in
//! lockstep), a bounded pool of workers shared by all devices (a poll due while every worker
//! is busy is skipped and counted, never queued), deadband and heartbeat per tag, and the
//! device's status on `$nexus/status/device/<id>`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nexus_common::breaker::BreakerState;
use nexus_common::config::DeviceConfig;
use nexus_common::metrics::{self, MetricError};
use nexus_common::mqtt::{MqttHandle, QoS};
use nexus_common::{now_ms, DataPoint, Quality};
use prometheus::{HistogramVec, IntCounterVec, IntGauge, Registry};
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use nexus_devices::{Device, PoolError, Pools, Reading};

mod exception;
mod health;

use exception::Exceptions;
use health::{Health, StatusSchedule};

#[derive(Clone)]
pub struct PollMetrics {
    polls: IntCounterVec,
    skipped: IntCounterVec,
    duration: HistogramVec,
    requests: IntCounterVec,
    /// `gateway.workers`: with the poll durations, the utilisation an autoscaler follows.
    pub workers: IntGauge,
}

impl PollMetrics {
    pub fn new(r: &Registry) -> Result<PollMetrics, MetricError> {
        Ok(PollMetrics {
            polls: metrics::counter_vec(
                r,
                "nexus_gateway_polls_total",
                "Polls by device and result",
                &["device", "result"],
            )?,
            skipped: metrics::counter_vec(
                r,
                "nexus_gateway_polls_skipped_total",
                "Polls skipped because every worker was busy or the previous poll overran",
                &["device"],
            )?,
            duration: metrics::histogram_vec(
                r,
                "nexus_gateway_poll_duration_seconds",
                "Time to read a device",
                &["device"],
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )?,
            requests: metrics::counter_vec(
                r,
                "nexus_gateway_read_requests_total",
                "Protocol read requests sent",
                &["device"],
            )?,
            workers: metrics::gauge(
                r,
                "nexus_gateway_workers",
                "Polls that may run at once (gateway.workers)",
            )?,
        })
    }

    /// Create a device's series at 0, so `/metrics` shows a device before its first poll,
    /// skip or failure.
    fn init_device(&self, id: &str) {
        for result in ["ok", "failed"] {
            self.polls.with_label_values(&[id, result]);
        }
        self.skipped.with_label_values(&[id]);
        self.duration.with_label_values(&[id]);
        self.requests.with_label_values(&[id]);
    }
}

/// Live view of a device, for the HTTP API.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DeviceStatus {
    pub state: &'static str,
    pub breaker: &'static str,
    pub last_error: Option<String>,
    pub polls_ok: u64,
    pub polls_failed: u64,
    pub polls_skipped: u64,
    pub last_duration_ms: f64,
    pub requests_per_poll: usize,
}

#[derive(Default)]
pub struct DeviceState {
    pub status: RwLock<DeviceStatus>,
    pub values: RwLock<Vec<Option<DataPoint>>>,
    skipped: AtomicU64,
}

/// Everything the device tasks share.
#[derive(Clone)]
pub struct PollContext {
    pub pools: Arc<Pools>,
    pub workers: Arc<Semaphore>,
    pub out: mpsc::Sender<Vec<DataPoint>>,
    pub mqtt: MqttHandle,
    pub metrics: PollMetrics,
    pub heartbeat: Duration,
    /// Sharded: a poll starts only while this member's lease holds (a member frozen past
    /// its lease must not poll a device another member has taken over).
    pub lease: Option<Arc<crate::shard::Lease>>,
}

/// How often a device's status is published with its poll statistics even when its state has
/// not changed (the control center's overview shows them; a heartbeat shorter than this
/// publishes more often).
pub const STATUS_STATS_EVERY: Duration = Duration::from_secs(10);

/// The retained device status of the contract: state, breaker and last error, with the poll
/// statistics since the device was started (docs/contract.md, "Status topics").
fn status_payload(s: &DeviceStatus) -> String {
    serde_json::json!({
        "state": s.state,
        "breaker": s.breaker,
        "last_error": s.last_error,
        "polls": {"ok": s.polls_ok, "failed": s.polls_failed, "skipped": s.polls_skipped},
        "last_poll_ms": (s.last_duration_ms * 10.0).round() / 10.0,
        "requests_per_poll": s.requests_per_poll,
        "ts": now_ms(),
    })
    .to_string()
}

/// Status every heartbeat, and at least every [`STATUS_STATS_EVERY`] for the statistics.
fn status_every(heartbeat: Duration) -> Duration {
    if heartbeat.is_zero() {
        STATUS_STATS_EVERY
    } else {
        heartbeat.min(STATUS_STATS_EVERY)
    }
}

/// Poll one device until `token`: wait for its turn, read it through the pools, publish what
/// report by exception lets through, and keep its status (HTTP view, metrics, retained topic).
pub async fn run_device(
    device: Arc<Device>,
    state: Arc<DeviceState>,
    ctx: PollContext,
    token: CancellationToken,
) {
    let id = device.cfg.id.as_str().to_owned();
    let interval = device.cfg.poll_interval;
    let status_topic = nexus_common::topic::sys::device_status(&id);
    let mut exceptions = Exceptions::new(device.cfg.tags.len(), ctx.heartbeat);
    let mut status = StatusSchedule::new(status_every(ctx.heartbeat), Instant::now());
    ctx.metrics.init_device(&id);
    {
        let mut s = state.status.write().unwrap_or_else(|e| e.into_inner());
        s.state = "unknown";
        s.breaker = "closed";
        s.requests_per_poll = device.plan.requests_per_poll();
    }
    let jitter_max = interval.as_secs_f64() * 0.1;
    let mut clock = PollClock::default();
    let mut base = Instant::now();
    loop {
        let jitter = Duration::from_secs_f64(rand::rng().random_range(0.0..=jitter_max.max(0.0)));
        tokio::select! {
            _ = tokio::time::sleep_until(base + jitter) => {}
            _ = token.cancelled() => break,
        }
        base += interval;
        // A poll that overran its interval: the missed ones are skipped, not queued.
        let now = Instant::now();
        if now > base + interval {
            let missed = ((now - base).as_secs_f64() / interval.as_secs_f64()) as u64;
            base += interval * missed as u32;
            skipped(&state, &ctx, &id, missed);
        }
        if ctx.lease.as_ref().is_some_and(|l| !l.holds()) {
            continue;
        }
        let Ok(permit) = ctx.workers.clone().try_acquire_owned() else {
            skipped(&state, &ctx, &id, 1);
            continue;
        };
        let started = Instant::now();
        let result = match &ctx.lease {
            // Checked again once the endpoint's session is free: this poll may have waited
            // for it (other devices of the endpoint) while the lease ran out.
            Some(lease) => ctx.pools.read_while(&device, None, &|| lease.holds()).await,
            None => ctx.pools.read(&device, None).await,
        };
        drop(permit);
        if matches!(result, Err(PoolError::CalledOff)) {
            continue;
        }
        let elapsed = started.elapsed();
        ctx.metrics
            .duration
            .with_label_values(&[&id])
            .observe(elapsed.as_secs_f64());
        let (readings, error) = match result {
            Ok(r) => {
                let sent = device.plan.requests_per_poll();
                ctx.metrics
                    .requests
                    .with_label_values(&[&id])
                    .inc_by(sent as u64);
                state
                    .status
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .requests_per_poll = sent;
                (r, None)
            }
            Err(e) => (all_bad(device.cfg.tags.len(), &e), Some(e.to_string())),
        };
        let bad_tags = readings
            .iter()
            .filter(|(_, r)| matches!(r, Reading::Bad { .. }))
            .count();
        let ts = clock.stamp(now_ms());
        let out = to_points(&device, &mut exceptions, &state, readings, ts);
        let breaker = ctx.pools.breaker_state(&device);
        let health = Health::after_poll(error.is_some(), breaker, bad_tags);
        record_poll(&state, &ctx, &id, health, breaker, &error, elapsed);
        // Status on change, and again every heartbeat (a restarted broker forgets it).
        let now = Instant::now();
        if status.due(health, breaker, now) && ctx.mqtt.is_connected() {
            let payload = status_payload(&state.status.read().unwrap_or_else(|e| e.into_inner()));
            if ctx
                .mqtt
                .publish(&status_topic, payload, QoS::AtLeastOnce, true)
                .await
                .is_ok()
            {
                if status.changed(health, breaker) {
                    tracing::info!(device = %id, state = health.as_str(), breaker = breaker.as_str(), error = ?error, "device status changed");
                }
                status.published(health, breaker, now);
            }
        }
        if !out.is_empty() && ctx.out.send(out).await.is_err() {
            break;
        }
    }
}

/// The times of one device's polls, in ms since the epoch, strictly increasing. A late poll is
/// followed at once by the next, so two polls can end within the same millisecond; the
/// historian keys a point by its tag and time, and would keep only the first of two different
/// values. A clock stepped back by more than [`PollClock::STEP_MS`] is followed.
#[derive(Default)]
struct PollClock {
    last: i64,
}

impl PollClock {
    const STEP_MS: i64 = 1000;

    fn stamp(&mut self, now: i64) -> i64 {
        let t = if now + Self::STEP_MS < self.last {
            now
        } else {
            now.max(self.last + 1)
        };
        self.last = t;
        t
    }
}

/// Count `n` skipped polls.
fn skipped(state: &DeviceState, ctx: &PollContext, id: &str, n: u64) {
    let total = state.skipped.fetch_add(n, Ordering::Relaxed) + n;
    ctx.metrics.skipped.with_label_values(&[id]).inc_by(n);
    state
        .status
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .polls_skipped = total;
}

/// Every tag bad, as a failed read leaves them: not connected while the breaker is open,
/// a communication failure otherwise.
fn all_bad(tags: usize, e: &PoolError) -> Vec<(usize, Reading)> {
    let quality = match e {
        PoolError::Open(_) => Quality::BadNotConnected,
        _ => Quality::BadCommFailure,
    };
    let reason = e.to_string();
    (0..tags)
        .map(|i| {
            (
                i,
                Reading::Bad {
                    quality,
                    reason: reason.clone(),
                },
            )
        })
        .collect()
}

/// The readings as points: every one becomes the tag's live value (HTTP view); those that
/// report by exception lets through are returned, to be published.
fn to_points(
    device: &Device,
    exceptions: &mut Exceptions,
    state: &DeviceState,
    readings: Vec<(usize, Reading)>,
    ts_ms: i64,
) -> Vec<DataPoint> {
    let cfg = &device.cfg;
    let mut out = Vec::new();
    let mut values = Vec::with_capacity(readings.len());
    let now = Instant::now();
    for (i, reading) in readings {
        let tag = &cfg.tags[i];
        let sample = exceptions.sample(i, reading);
        let due = exceptions.due(i, tag.deadband, &sample, now);
        let point = DataPoint {
            topic: device.topics[i].clone(),
            value: sample.value,
            quality: sample.quality,
            ts_ms,
            source_ts_ms: sample.source_ts_ms,
            unit: tag.unit.clone(),
        };
        if due {
            out.push(point.clone());
        }
        values.push((i, point));
    }
    let mut v = state.values.write().unwrap_or_else(|e| e.into_inner());
    v.resize(cfg.tags.len(), None);
    for (i, p) in values {
        v[i] = Some(p);
    }
    out
}

/// The poll's outcome into the device's counters and live status.
fn record_poll(
    state: &DeviceState,
    ctx: &PollContext,
    id: &str,
    health: Health,
    breaker: BreakerState,
    error: &Option<String>,
    elapsed: Duration,
) {
    let result = if error.is_some() { "failed" } else { "ok" };
    ctx.metrics.polls.with_label_values(&[id, result]).inc();
    let mut s = state.status.write().unwrap_or_else(|e| e.into_inner());
    if error.is_some() {
        s.polls_failed += 1;
        s.last_error = error.clone();
    } else {
        s.polls_ok += 1;
    }
    s.state = health.as_str();
    s.breaker = breaker.as_str();
    s.polls_skipped = state.skipped.load(Ordering::Relaxed);
    s.last_duration_ms = elapsed.as_secs_f64() * 1000.0;
}

/// A running device: its config, stop token, task, live state and compiled form.
type Running = (
    DeviceConfig,
    CancellationToken,
    JoinHandle<()>,
    Arc<DeviceState>,
    Arc<Device>,
);

/// What [`DeviceSet::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    pub started: usize,
    pub stopped: usize,
    pub restarted: usize,
    /// Poll tasks told to stop (removed or restarted devices): await them to know that a
    /// device is no longer polled.
    pub stopping: Vec<JoinHandle<()>>,
}

/// The running set of devices, changed in place when the device list changes.
pub struct DeviceSet {
    ctx: Option<PollContext>,
    running: HashMap<String, Running>,
    parent: CancellationToken,
}

impl DeviceSet {
    pub fn new(parent: CancellationToken) -> DeviceSet {
        DeviceSet {
            ctx: None,
            running: HashMap::new(),
            parent,
        }
    }

    /// Give the set what its device tasks need; `None` drops it (closing the value channel
    /// once every device task has stopped).
    pub fn set_context(&mut self, ctx: Option<PollContext>) {
        self.ctx = ctx;
    }

    /// Start added devices, stop removed ones, restart changed ones; leave the rest alone.
    pub fn apply(&mut self, devices: &[DeviceConfig]) -> Applied {
        let wanted: HashMap<String, &DeviceConfig> = devices
            .iter()
            .filter(|d| d.enabled)
            .map(|d| (d.id.to_string(), d))
            .collect();
        let mut a = Applied::default();
        let ids: Vec<String> = self.running.keys().cloned().collect();
        for id in ids {
            match wanted.get(&id) {
                None => {
                    if let Some((_, tok, task, _, _)) = self.running.remove(&id) {
                        tok.cancel();
                        a.stopping.push(task);
                        a.stopped += 1;
                    }
                }
                Some(cfg) if self.running.get(&id).is_some_and(|(old, ..)| old != *cfg) => {
                    if let Some((_, tok, task, _, _)) = self.running.remove(&id) {
                        tok.cancel();
                        a.stopping.push(task);
                    }
                    if self.start(cfg) {
                        a.restarted += 1;
                    }
                }
                Some(_) => {}
            }
        }
        for (id, cfg) in &wanted {
            if !self.running.contains_key(id) && self.start(cfg) {
                a.started += 1;
            }
        }
        a
    }

    fn start(&mut self, cfg: &DeviceConfig) -> bool {
        let Some(ctx) = self.ctx.clone() else {
            return false;
        };
        let device = match Device::compile(cfg.clone()) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::error!(error = %e, "device not started");
                return false;
            }
        };
        let state = Arc::new(DeviceState::default());
        let tok = self.parent.child_token();
        let task = tokio::spawn(run_device(device.clone(), state.clone(), ctx, tok.clone()));
        self.running
            .insert(cfg.id.to_string(), (cfg.clone(), tok, task, state, device));
        true
    }

    /// Config, compiled device and live state of each running device.
    pub fn views(&self) -> Vec<(DeviceConfig, Arc<DeviceState>, Arc<Device>)> {
        let mut v: Vec<_> = self
            .running
            .values()
            .map(|(c, _, _, s, d)| (c.clone(), s.clone(), d.clone()))
            .collect();
        v.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        v
    }

    /// Stop every device; the caller awaits the returned tasks (outside any lock).
    pub fn stop_all(&mut self) -> Vec<JoinHandle<()>> {
        self.running
            .drain()
            .map(|(_, (_, tok, task, _, _))| {
                tok.cancel();
                task
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn poll_times_increase_within_a_millisecond_and_follow_a_clock_step() {
        let mut c = super::PollClock::default();
        assert_eq!(c.stamp(5_000), 5_000);
        assert_eq!(c.stamp(5_000), 5_001);
        assert_eq!(c.stamp(5_000), 5_002);
        assert_eq!(c.stamp(5_020), 5_020);
        // Back by less than a second: still after the last one.
        assert_eq!(c.stamp(4_500), 5_021);
        // Stepped back: followed.
        assert_eq!(c.stamp(3_000), 3_000);
        assert_eq!(c.stamp(3_000), 3_001);
    }

    use super::*;

    #[test]
    fn status_carries_the_poll_statistics() {
        let s = DeviceStatus {
            state: "degraded",
            breaker: "half_open",
            last_error: Some("timeout".into()),
            polls_ok: 7,
            polls_failed: 2,
            polls_skipped: 1,
            last_duration_ms: 12.345,
            requests_per_poll: 3,
        };
        let v: serde_json::Value = serde_json::from_str(&status_payload(&s)).unwrap();
        assert_eq!(v["state"], "degraded");
        assert_eq!(v["breaker"], "half_open");
        assert_eq!(v["last_error"], "timeout");
        assert_eq!(
            v["polls"],
            serde_json::json!({"ok": 7, "failed": 2, "skipped": 1})
        );
        assert_eq!(v["last_poll_ms"], 12.3);
        assert_eq!(v["requests_per_poll"], 3);
        assert!(v["ts"].as_u64().unwrap() > 1_700_000_000_000);
    }

    #[test]
    fn statistics_at_least_every_ten_seconds() {
        let s = Duration::from_secs;
        assert_eq!(status_every(s(60)), s(10));
        assert_eq!(status_every(s(2)), s(2));
        assert_eq!(status_every(Duration::ZERO), s(10));
    }
}
