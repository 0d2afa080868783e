//! Webhook notifications: each configured endpoint gets alarm events as JSON POSTs from its
//! own task, rate-limited (`per_minute`), retried with exponential backoff and jitter up to
//! `max_attempts`. Events wait in a queue of 1000 per endpoint; what does not fit, and what
//! is given up after the last attempt, is counted and logged. The URL is a secret (a token
//! may sit in its path): logs name the webhook by its label and origin, metrics by its label.

use std::time::Duration;

use nexus_common::config::Webhook;
use nexus_common::metrics::{self, MetricError};
use nexus_common::ratelimit::{Rate, RateLimiter};
use nexus_common::supervise::backoff;
use prometheus::{IntCounterVec, Registry};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct WebhookMetrics {
    delivered: IntCounterVec,
    failed: IntCounterVec,
    dropped: IntCounterVec,
}

impl WebhookMetrics {
    pub fn new(r: &Registry) -> Result<WebhookMetrics, MetricError> {
        let c = |name: &str, help: &str| metrics::counter_vec(r, name, help, &["webhook"]);
        Ok(WebhookMetrics {
            delivered: c(
                "nexus_alerts_webhook_delivered_total",
                "Alarm events delivered to a webhook",
            )?,
            failed: c(
                "nexus_alerts_webhook_failed_total",
                "Alarm events given up after every attempt",
            )?,
            dropped: c(
                "nexus_alerts_webhook_dropped_total",
                "Alarm events not queued for a webhook (queue full)",
            )?,
        })
    }
}

/// The senders of every webhook.
pub struct Notifier {
    hooks: Vec<(Webhook, String, mpsc::Sender<Value>)>,
    metrics: WebhookMetrics,
}

impl Notifier {
    pub fn start(
        hooks: &[Webhook],
        registry: &Registry,
        token: CancellationToken,
    ) -> Result<Notifier, MetricError> {
        nexus_common::install_tls_provider();
        let metrics = WebhookMetrics::new(registry)?;
        let hooks = hooks
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let label = h.label(i);
                for c in [&metrics.delivered, &metrics.failed, &metrics.dropped] {
                    c.with_label_values(&[&label]);
                }
                let (tx, rx) = mpsc::channel(1000);
                tokio::spawn(deliver(
                    h.clone(),
                    label.clone(),
                    rx,
                    metrics.clone(),
                    token.clone(),
                ));
                (h.clone(), label, tx)
            })
            .collect();
        Ok(Notifier { hooks, metrics })
    }

    /// Queue an event for every webhook that wants it.
    pub fn notify(&self, event: &str, severity: u16, body: &Value) {
        for (h, label, tx) in &self.hooks {
            if severity < h.min_severity || !h.events.iter().any(|e| e == event) {
                continue;
            }
            if tx.try_send(body.clone()).is_err() {
                self.metrics.dropped.with_label_values(&[label]).inc();
                tracing::error!(webhook = %label, origin = %h.origin(), "webhook queue full: alarm event dropped");
            }
        }
    }
}

async fn deliver(
    hook: Webhook,
    label: String,
    mut rx: mpsc::Receiver<Value>,
    metrics: WebhookMetrics,
    token: CancellationToken,
) {
    let client = match reqwest::Client::builder().timeout(hook.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(webhook = %label, error = %e.without_url(), "cannot build the webhook client");
            return;
        }
    };
    let per_second = (hook.per_minute / 60).max(1);
    let limiter = RateLimiter::new(
        "webhook",
        Rate::new(per_second, hook.per_minute.max(1)),
        None,
        None,
    );
    let origin = hook.origin();
    loop {
        let body = tokio::select! {
            b = rx.recv() => match b { Some(b) => b, None => return },
            _ = token.cancelled() => return,
        };
        while let Err(limited) = limiter.check("") {
            tokio::select! {
                _ = tokio::time::sleep(limited.retry_in.max(Duration::from_millis(10))) => {}
                _ = token.cancelled() => return,
            }
        }
        let mut delivered = false;
        for attempt in 0..hook.max_attempts {
            match client.post(hook.url.expose()).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => {
                    tracing::warn!(webhook = %label, %origin, status = %r.status(), attempt = attempt + 1, "webhook refused an alarm event")
                }
                Err(e) => {
                    tracing::warn!(webhook = %label, %origin, error = %e.without_url(), attempt = attempt + 1, "webhook unreachable")
                }
            }
            if attempt + 1 < hook.max_attempts {
                tokio::select! {
                    _ = tokio::time::sleep(backoff(Duration::from_millis(200), Duration::from_secs(30), attempt)) => {}
                    _ = token.cancelled() => return,
                }
            }
        }
        if delivered {
            metrics.delivered.with_label_values(&[&label]).inc();
        } else {
            metrics.failed.with_label_values(&[&label]).inc();
            tracing::error!(webhook = %label, %origin, attempts = hook.max_attempts, "alarm event not delivered");
        }
    }
}
