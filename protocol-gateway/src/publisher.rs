//! Publishing: value objects onto their UNS topics, or into the disk buffer while the broker
//! is away, and the buffered backlog replayed at a bounded rate once it is back (after live
//! values, and not retained, so the retained "last value" of a topic stays the newest one).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_common::codec::{encode_value_object, ValueObject};
use nexus_common::metrics::{self, MetricError};
use nexus_common::mqtt::{MqttHandle, QoS};
use nexus_common::DataPoint;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::buffer::{DiskBuffer, Record};

#[derive(Clone)]
pub struct PublisherMetrics {
    pub published: IntCounter,
    pub buffered: IntCounter,
    pub replayed: IntCounter,
    pub buffer_dropped: IntCounter,
    pub buffer_lost: IntCounter,
    pub buffer_bytes: IntGauge,
    pub buffer_points: IntGauge,
}

impl PublisherMetrics {
    pub fn new(r: &Registry) -> Result<PublisherMetrics, MetricError> {
        Ok(PublisherMetrics {
            published: metrics::counter(
                r,
                "nexus_gateway_points_published_total",
                "Values handed to the broker live",
            )?,
            buffered: metrics::counter(
                r,
                "nexus_gateway_points_buffered_total",
                "Values written to the store-and-forward buffer",
            )?,
            replayed: metrics::counter(
                r,
                "nexus_gateway_points_replayed_total",
                "Buffered values published after the broker came back",
            )?,
            buffer_dropped: metrics::counter(
                r,
                "nexus_gateway_buffer_dropped_total",
                "Buffered values dropped because the buffer was full",
            )?,
            buffer_lost: metrics::counter(
                r,
                "nexus_gateway_buffer_lost_total",
                "Buffered values lost to damaged buffer files (a torn tail after a crash)",
            )?,
            buffer_bytes: metrics::gauge(
                r,
                "nexus_gateway_buffer_bytes",
                "Size of the store-and-forward buffer on disk",
            )?,
            buffer_points: metrics::gauge(
                r,
                "nexus_gateway_buffer_points",
                "Values waiting in the store-and-forward buffer",
            )?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PublishSettings {
    pub qos: QoS,
    pub retain: bool,
    /// Buffered values replayed per second.
    pub replay_rate: u32,
    /// Wait after a reconnect before replaying, so subscribers that lost their session with
    /// a restarted broker can subscribe again first.
    pub replay_delay: Duration,
}

pub fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn encode(p: &DataPoint) -> Record {
    Record {
        topic: p.topic.as_str().to_owned(),
        payload: encode_value_object(&ValueObject::from(p)),
    }
}

pub struct Publisher {
    mqtt: MqttHandle,
    buffer: Arc<Mutex<DiskBuffer>>,
    settings: PublishSettings,
    metrics: PublisherMetrics,
    dropped_seen: u64,
}

impl Publisher {
    pub fn new(
        mqtt: MqttHandle,
        buffer: DiskBuffer,
        settings: PublishSettings,
        metrics: PublisherMetrics,
    ) -> Publisher {
        let p = Publisher {
            mqtt,
            buffer: Arc::new(Mutex::new(buffer)),
            settings,
            metrics,
            dropped_seen: 0,
        };
        p.update_gauges();
        p
    }

    fn update_gauges(&self) {
        let b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics.buffer_bytes.set(b.bytes() as i64);
        self.metrics.buffer_points.set(b.len() as i64);
        // The buffer counts what its files lost (at open and while replaying); the counter
        // follows it.
        let seen = self.metrics.buffer_lost.get();
        if b.lost() > seen {
            self.metrics.buffer_lost.inc_by(b.lost() - seen);
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DiskBuffer) -> T + Send + 'static,
    ) -> T {
        let b = self.buffer.clone();
        let run = move || f(&mut b.lock().unwrap_or_else(|e| e.into_inner()));
        match tokio::task::spawn_blocking(run).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down and this task with it.
            Err(_) => std::future::pending().await,
        }
    }

    async fn buffer_records(&mut self, records: Vec<Record>) {
        let n = records.len() as u64;
        match self
            .blocking(move |b| b.append(&records).map(|_| b.dropped()))
            .await
        {
            Ok(dropped) => {
                self.metrics.buffered.inc_by(n);
                if dropped > self.dropped_seen {
                    let lost = dropped - self.dropped_seen;
                    self.metrics.buffer_dropped.inc_by(lost);
                    tracing::error!(
                        dropped = lost,
                        "store-and-forward buffer full: oldest values dropped"
                    );
                    self.dropped_seen = dropped;
                }
            }
            Err(e) => {
                // Nowhere left to keep them: count them as dropped, loudly.
                self.metrics.buffer_dropped.inc_by(n);
                tracing::error!(error = %e, points = n, "cannot write the store-and-forward buffer; values dropped");
            }
        }
        self.update_gauges();
    }

    /// Publish a batch live, or buffer what cannot be published.
    async fn publish_batch(&mut self, points: Vec<DataPoint>) {
        let mut records: Vec<Record> = points.iter().map(encode).collect();
        if self.mqtt.is_connected() {
            let mut sent = 0;
            for r in &records {
                // A refused request means the client is stopping; keep the rest.
                if self
                    .mqtt
                    .publish(
                        &r.topic,
                        r.payload.clone(),
                        self.settings.qos,
                        self.settings.retain,
                    )
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            self.metrics.published.inc_by(sent as u64);
            records.drain(..sent);
        }
        if !records.is_empty() {
            self.buffer_records(records).await;
        }
    }

    /// Replay up to `n` buffered values. Returns how many went out.
    async fn replay(&mut self, n: usize) -> usize {
        let Ok(batch) = self.blocking(move |b| b.peek(n)).await else {
            return 0;
        };
        let mut sent = 0;
        for r in &batch {
            if !self.mqtt.is_connected() {
                break;
            }
            if self
                .mqtt
                .publish(&r.topic, r.payload.clone(), self.settings.qos, false)
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        if sent > 0 {
            if let Err(e) = self.blocking(move |b| b.consume(sent)).await {
                tracing::error!(error = %e, "cannot advance the store-and-forward buffer");
            }
            self.metrics.replayed.inc_by(sent as u64);
            self.update_gauges();
        }
        sent
    }

    /// Run until `rx` closes (the pollers stopped), then flush.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<DataPoint>>) {
        let mut connected = self.mqtt.connected();
        let mut connected_since = (*connected.borrow()).then(Instant::now);
        let tick = Duration::from_millis(100);
        let per_tick =
            ((self.settings.replay_rate as u64 * tick.as_millis() as u64) / 1000).max(1) as usize;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut waiting = !self
            .buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        loop {
            tokio::select! {
                biased;
                batch = rx.recv() => match batch {
                    Some(points) => {
                        self.publish_batch(points).await;
                        waiting = waiting || !self.buffer.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
                    }
                    None => break,
                },
                r = connected.changed() => {
                    if r.is_err() { break; }
                    connected_since = (*connected.borrow_and_update()).then(Instant::now);
                }
                _ = ticker.tick(), if waiting => {
                    let ready = connected_since.is_some_and(|t| t.elapsed() >= self.settings.replay_delay);
                    if ready {
                        // Live values go first: replay only when no batch is waiting.
                        if rx.is_empty() {
                            self.replay(per_tick).await;
                        }
                        waiting = !self.buffer.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
                    }
                }
            }
        }
        self.update_gauges();
    }
}
