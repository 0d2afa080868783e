//! Shutdown and supervision: one root [`CancellationToken`], a [`TaskTracker`], components
//! restarted with backoff when they crash, and a bounded drain.
//!
//! A component is an async function of a child token. Returning `Ok` after the token is
//! cancelled is a clean stop; returning (or panicking) before that is a crash: it is logged,
//! counted in `nexus_component_restarts_total`, and the component starts again after a
//! jittered exponential backoff. More than `max_restarts` crashes within `window` cancel the
//! root token and make [`Supervisor::wait`] return an error, so the process exits non-zero.

use crate::metrics::{self, MetricError};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, Registry};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cancel `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                        _ = token.cancelled() => return,
                    }
                }
                Err(_) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = token.cancelled() => return,
                    }
                }
            }
        }
        #[cfg(not(unix))]
        tokio::select! {
            _ = ctrl_c => {}
            _ = token.cancelled() => return,
        }
        tracing::info!("signal received, shutting down");
        token.cancel();
    });
}

/// Why the supervisor stopped the process.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("component {component} crashed {crashes} times within {window:?}: {last_error}")]
    TooManyCrashes {
        component: String,
        crashes: u32,
        window: Duration,
        last_error: String,
    },
    #[error("components did not stop within {0:?}")]
    DrainTimeout(Duration),
}

/// Restart policy.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Exponential backoff with jitter: attempt n waits a random time in [d/2, d], where
/// d = min(max, min * 2^n).
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = min.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    let d = exp.min(max);
    let half = d / 2;
    half + Duration::from_nanos(
        rand::rng().random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64),
    )
}

pub struct Supervisor {
    root: CancellationToken,
    tracker: TaskTracker,
    policy: RestartPolicy,
    fatal: Arc<Mutex<Option<SupervisorError>>>,
    failed: Arc<AtomicBool>,
    restarts: IntCounterVec,
}

impl Supervisor {
    pub fn new(
        root: CancellationToken,
        policy: RestartPolicy,
        registry: &Registry,
    ) -> Result<Supervisor, MetricError> {
        let restarts = metrics::counter_vec(
            registry,
            "nexus_component_restarts_total",
            "Crashed components restarted by the supervisor",
            &["component"],
        )?;
        Ok(Supervisor {
            root,
            tracker: TaskTracker::new(),
            policy,
            fatal: Arc::new(Mutex::new(None)),
            failed: Arc::new(AtomicBool::new(false)),
            restarts,
        })
    }

    pub fn token(&self) -> CancellationToken {
        self.root.clone()
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Run `component` under supervision until the root token is cancelled.
    pub fn spawn<F, Fut>(&self, name: &str, component: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let root = self.root.clone();
        let policy = self.policy;
        let fatal = self.fatal.clone();
        let failed = self.failed.clone();
        let restarts = self.restarts.with_label_values(&[name]);
        let name = name.to_owned();
        self.tracker.spawn(async move {
            let mut crashes: Vec<Instant> = Vec::new();
            let mut attempt = 0u32;
            loop {
                let started = Instant::now();
                let result = tokio::spawn(component(root.child_token())).await;
                if root.is_cancelled() {
                    if let Ok(Err(e)) = &result {
                        tracing::warn!(component = %name, error = %e, "component failed while stopping");
                    }
                    return;
                }
                let error = match result {
                    Ok(Ok(())) => "returned before shutdown".to_owned(),
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(join) if join.is_panic() => "panicked".to_owned(),
                    Err(join) => join.to_string(),
                };
                let now = Instant::now();
                crashes.retain(|t| now.duration_since(*t) <= policy.window);
                crashes.push(now);
                if started.elapsed() > policy.window {
                    attempt = 0;
                }
                if crashes.len() as u32 > policy.max_restarts {
                    tracing::error!(component = %name, crashes = crashes.len(), error = %error, "component keeps crashing, stopping");
                    let mut f = fatal.lock().unwrap_or_else(|e| e.into_inner());
                    f.get_or_insert(SupervisorError::TooManyCrashes {
                        component: name.clone(),
                        crashes: crashes.len() as u32,
                        window: policy.window,
                        last_error: error,
                    });
                    failed.store(true, Ordering::SeqCst);
                    root.cancel();
                    return;
                }
                restarts.inc();
                let delay = backoff(policy.backoff_min, policy.backoff_max, attempt);
                attempt += 1;
                tracing::error!(component = %name, error = %error, delay_ms = delay.as_millis() as u64, "component crashed, restarting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = root.cancelled() => return,
                }
            }
        });
    }

    /// Wait for the root token, then give components `grace` to stop.
    pub async fn wait(self, grace: Duration) -> Result<(), SupervisorError> {
        self.root.cancelled().await;
        self.tracker.close();
        let drained = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if let Some(e) = self.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        if !drained {
            return Err(SupervisorError::DrainTimeout(grace));
        }
        Ok(())
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test(start_paused = true)]
    async fn crashed_component_is_restarted_then_stops_cleanly() {
        let token = CancellationToken::new();
        let sup =
            Supervisor::new(token.clone(), RestartPolicy::default(), &Registry::new()).unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn("flaky", move |tok| {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    anyhow::bail!("boom");
                }
                tok.cancelled().await;
                Ok(())
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(sup.restarts.with_label_values(&["flaky"]).get(), 2);
        token.cancel();
        sup.wait(Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_crashes_stop_the_process() {
        let token = CancellationToken::new();
        let policy = RestartPolicy {
            max_restarts: 3,
            ..RestartPolicy::default()
        };
        let sup = Supervisor::new(token.clone(), policy, &Registry::new()).unwrap();
        sup.spawn("broken", |_tok| async { panic!("always") });
        let err = sup.wait(Duration::from_secs(1)).await.unwrap_err();
        assert!(
            err.to_string().contains("component broken crashed 4 times"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_is_bounded() {
        let token = CancellationToken::new();
        let sup =
            Supervisor::new(token.clone(), RestartPolicy::default(), &Registry::new()).unwrap();
        sup.spawn("stuck", |_tok| async {
            std::future::pending::<()>().await;
            Ok(())
        });
        token.cancel();
        let err = sup.wait(Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, SupervisorError::DrainTimeout(_)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..30 {
            let d = backoff(min, max, attempt);
            let cap = (min * 2u32.pow(attempt.min(10))).min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs cap {cap:?}"
            );
        }
    }
}
