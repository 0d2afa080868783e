//! A circuit breaker with the semantics Nexus needs, which failsafe's built-in policy does not
//! give (docs/adr/0002-circuit-breaker.md): CLOSED -> OPEN when at least `failure_ratio` of the last `window` calls
//! failed and at least `min_requests` were made; OPEN refuses calls for `open_for`; then
//! HALF_OPEN admits `half_open_trials` trial calls at once: all succeeding closes it, any
//! failing opens it again.
//!
//! A call is a [`Permit`]: record its outcome with [`Permit::success`] / [`Permit::failure`];
//! a permit dropped without an outcome (its call was cancelled) counts as a failure, so a
//! timeout must sit inside the permit, as [`CircuitBreaker::call`] does.

use crate::metrics::{self, MetricError};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Registry};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Outcomes remembered (default 20).
    pub window: usize,
    /// Calls needed in the window before it can open (default 5).
    pub min_requests: usize,
    /// Failure share that opens it (default 0.6).
    pub failure_ratio: f64,
    /// Time spent open before trying again (default 30s).
    pub open_for: Duration,
    /// Trial calls admitted when half open (default 3).
    pub half_open_trials: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            min_requests: 5,
            failure_ratio: 0.6,
            open_for: Duration::from_secs(30),
            half_open_trials: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];
}

/// Metrics shared by the breakers of one service: `nexus_breaker_state{breaker,state}` (one
/// series per state, 1 for the breaker's current one and 0 for the others, so a dashboard
/// or an alert names the state instead of decoding a number),
/// `nexus_breaker_transitions_total{breaker,to}`, `nexus_breaker_rejected_total{breaker}`.
#[derive(Clone)]
pub struct BreakerMetrics {
    state: IntGaugeVec,
    transitions: IntCounterVec,
    rejected: IntCounterVec,
}

impl BreakerMetrics {
    pub fn new(r: &Registry) -> Result<BreakerMetrics, MetricError> {
        Ok(BreakerMetrics {
            state: metrics::gauge_vec(
                r,
                "nexus_breaker_state",
                "Circuit breaker state: 1 on the series of the current state (closed, open, half_open), 0 on the others",
                &["breaker", "state"],
            )?,
            transitions: metrics::counter_vec(
                r,
                "nexus_breaker_transitions_total",
                "Circuit breaker state changes",
                &["breaker", "to"],
            )?,
            rejected: metrics::counter_vec(
                r,
                "nexus_breaker_rejected_total",
                "Calls refused by an open circuit breaker",
                &["breaker"],
            )?,
        })
    }
}

impl BreakerMetrics {
    fn set_state(&self, breaker: &str, current: BreakerState) {
        for s in BreakerState::ALL {
            self.state
                .with_label_values(&[breaker, s.as_str()])
                .set(i64::from(s == current));
        }
    }
}

/// The breaker refused the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker {name} is open; retry in {:.1} s", .retry_in.as_secs_f64())]
pub struct BreakerOpen {
    pub name: String,
    pub retry_in: Duration,
}

/// Outcome of [`CircuitBreaker::call`].
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    #[error(transparent)]
    Open(BreakerOpen),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Inner(E),
}

struct Inner {
    state: BreakerState,
    outcomes: VecDeque<bool>,
    failures: usize,
    opened_at: Instant,
    trials_started: usize,
    trials_ok: usize,
}

pub struct CircuitBreaker {
    name: String,
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
    tx: watch::Sender<BreakerState>,
    metrics: Option<BreakerMetrics>,
}

impl CircuitBreaker {
    pub fn new(
        name: impl Into<String>,
        cfg: BreakerConfig,
        metrics: Option<BreakerMetrics>,
    ) -> Arc<CircuitBreaker> {
        let name = name.into();
        if let Some(m) = &metrics {
            m.set_state(&name, BreakerState::Closed);
        }
        Arc::new(CircuitBreaker {
            name,
            cfg,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                outcomes: VecDeque::with_capacity(cfg.window),
                failures: 0,
                opened_at: Instant::now(),
                trials_started: 0,
                trials_ok: 0,
            }),
            tx: watch::channel(BreakerState::Closed).0,
            metrics,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state (an open breaker whose time is up reports half open).
    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        self.advance(&mut inner);
        inner.state
    }

    /// Watch state changes (e.g. to publish device status).
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.tx.subscribe()
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        if inner.state == to {
            return;
        }
        tracing::info!(breaker = %self.name, from = inner.state.as_str(), to = to.as_str(), "circuit breaker changed state");
        inner.state = to;
        match to {
            BreakerState::Open => inner.opened_at = Instant::now(),
            BreakerState::HalfOpen => {
                inner.trials_started = 0;
                inner.trials_ok = 0;
            }
            BreakerState::Closed => {
                inner.outcomes.clear();
                inner.failures = 0;
            }
        }
        if let Some(m) = &self.metrics {
            m.set_state(&self.name, to);
            m.transitions
                .with_label_values(&[&self.name, to.as_str()])
                .inc();
        }
        self.tx.send_replace(to);
    }

    fn advance(&self, inner: &mut Inner) {
        if inner.state == BreakerState::Open && inner.opened_at.elapsed() >= self.cfg.open_for {
            self.transition(inner, BreakerState::HalfOpen);
        }
    }

    /// Ask to make a call.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, BreakerOpen> {
        let mut inner = self.lock();
        self.advance(&mut inner);
        let trial = match inner.state {
            BreakerState::Closed => false,
            BreakerState::HalfOpen if inner.trials_started < self.cfg.half_open_trials => {
                inner.trials_started += 1;
                true
            }
            _ => {
                if let Some(m) = &self.metrics {
                    m.rejected.with_label_values(&[&self.name]).inc();
                }
                let retry_in = match inner.state {
                    BreakerState::Open => {
                        self.cfg.open_for.saturating_sub(inner.opened_at.elapsed())
                    }
                    _ => Duration::ZERO,
                };
                return Err(BreakerOpen {
                    name: self.name.clone(),
                    retry_in,
                });
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            trial,
            done: false,
        })
    }

    fn record(&self, trial: bool, ok: bool) {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed if !trial => {
                if inner.outcomes.len() == self.cfg.window {
                    if let Some(false) = inner.outcomes.pop_front() {
                        inner.failures -= 1;
                    }
                }
                inner.outcomes.push_back(ok);
                if !ok {
                    inner.failures += 1;
                }
                let n = inner.outcomes.len();
                if n >= self.cfg.min_requests
                    && inner.failures as f64 >= self.cfg.failure_ratio * n as f64
                {
                    self.transition(&mut inner, BreakerState::Open);
                }
            }
            BreakerState::HalfOpen if trial => {
                if ok {
                    inner.trials_ok += 1;
                    if inner.trials_ok >= self.cfg.half_open_trials {
                        self.transition(&mut inner, BreakerState::Closed);
                    }
                } else {
                    self.transition(&mut inner, BreakerState::Open);
                }
            }
            // Outcomes of calls admitted in an earlier state no longer say anything.
            _ => {}
        }
    }

    /// Run `fut` under the breaker with a timeout inside it.
    pub async fn call<T, E, F>(
        self: &Arc<Self>,
        timeout: Duration,
        fut: F,
    ) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire().map_err(CallError::Open)?;
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => {
                permit.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                permit.failure();
                Err(CallError::Inner(e))
            }
            Err(_) => {
                permit.failure();
                Err(CallError::Timeout(timeout))
            }
        }
    }
}

/// Leave to make one call; record how it went.
pub struct Permit {
    breaker: Arc<CircuitBreaker>,
    trial: bool,
    done: bool,
}

impl Permit {
    pub fn success(mut self) {
        self.done = true;
        self.breaker.record(self.trial, true);
    }

    pub fn failure(mut self) {
        self.done = true;
        self.breaker.record(self.trial, false);
    }

    /// The call was not made after all: no outcome is recorded, and a trial gives its place
    /// back (in the same half-open period), so that another call can make it.
    pub fn withdraw(mut self) {
        self.done = true;
        if self.trial {
            let mut inner = self.breaker.lock();
            if inner.state == BreakerState::HalfOpen {
                inner.trials_started = inner.trials_started.saturating_sub(1);
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.trial, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            window: 10,
            min_requests: 5,
            failure_ratio: 0.6,
            open_for: Duration::from_secs(30),
            half_open_trials: 2,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_ratio_after_min_requests() {
        let b = CircuitBreaker::new("dev", cfg(), None);
        for _ in 0..4 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(b.state(), BreakerState::Closed, "below min_requests");
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        let e = b.try_acquire().err().unwrap();
        assert_eq!(e.retry_in, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn mixed_outcomes_below_ratio_stay_closed() {
        let b = CircuitBreaker::new("dev", cfg(), None);
        for i in 0..50 {
            let p = b.try_acquire().unwrap();
            if i % 2 == 1 {
                p.failure()
            } else {
                p.success()
            }
        }
        assert_eq!(b.state(), BreakerState::Closed, "50% < 60%");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_trials_and_closes_on_success() {
        let b = CircuitBreaker::new("dev", cfg(), None);
        let mut rx = b.subscribe();
        for _ in 0..5 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(*rx.borrow_and_update(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let t1 = b.try_acquire().unwrap();
        let t2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err(), "only two trials at once");
        t1.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        t2.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(*rx.borrow_and_update(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_withdrawn_call_counts_nothing_and_a_withdrawn_trial_frees_its_place() {
        let b = CircuitBreaker::new("dev", cfg(), None);
        for _ in 0..20 {
            b.try_acquire().unwrap().withdraw();
        }
        for _ in 0..4 {
            b.try_acquire().unwrap().failure();
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "withdrawn calls are no outcomes: 4 failures stay below min_requests"
        );
        b.try_acquire().unwrap().failure();
        tokio::time::advance(Duration::from_secs(30)).await;
        let t1 = b.try_acquire().unwrap();
        let t2 = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err(), "only two trials at once");
        t1.withdraw();
        let t3 = b
            .try_acquire()
            .expect("the withdrawn trial's place is free again");
        t2.success();
        t3.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_trial_reopens() {
        let b = CircuitBreaker::new("dev", cfg(), None);
        for _ in 0..5 {
            b.try_acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(31)).await;
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_call_counts_as_failure_and_timeout_is_inside() {
        let b = CircuitBreaker::new("dev", cfg(), None);
        for _ in 0..5 {
            let r: Result<(), CallError<()>> = b
                .call(Duration::from_millis(10), std::future::pending())
                .await;
            assert!(matches!(r, Err(CallError::Timeout(_))));
        }
        assert_eq!(b.state(), BreakerState::Open);
        let r: Result<(), CallError<()>> = b.call(Duration::from_secs(1), async { Ok(()) }).await;
        assert!(matches!(r, Err(CallError::Open(_))));
        let b2 = CircuitBreaker::new("dev2", cfg(), None);
        for _ in 0..5 {
            drop(b2.try_acquire().unwrap());
        }
        assert_eq!(b2.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_follow_state() {
        let reg = Registry::new();
        let m = BreakerMetrics::new(&reg).unwrap();
        let b = CircuitBreaker::new("plc-1", cfg(), Some(m.clone()));
        for _ in 0..5 {
            b.try_acquire().unwrap().failure();
        }
        let _ = b.try_acquire();
        let state = |s: &str| m.state.with_label_values(&["plc-1", s]).get();
        assert_eq!(
            (state("closed"), state("open"), state("half_open")),
            (0, 1, 0)
        );
        assert_eq!(m.transitions.with_label_values(&["plc-1", "open"]).get(), 1);
        assert_eq!(m.rejected.with_label_values(&["plc-1"]).get(), 1);
    }
}
