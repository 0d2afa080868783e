//! The receiving side: each message is parsed, counted and handed to the WAL writer
//! (`Intake`); once the WAL has made it durable, the acker acknowledges it to the broker, in
//! order.

use prometheus::{Gauge, IntCounter, IntCounterVec, Registry};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nexus_common::bounded::StateMetrics;
use nexus_common::config::IngestionConfig;
use nexus_common::metrics::{self, MetricError};
use nexus_common::mqtt::{Message, MqttHandle};

use crate::parse::{self, Parser};
use crate::wal::Append;

/// Counters of what arrives, and the gauges of what waits in the WAL.
#[derive(Clone)]
pub struct IngestMetrics {
    pub messages: IntCounter,
    pub points: IntCounter,
    pub rejected: IntCounterVec,
    pub ignored: IntCounterVec,
    pub rebirths: IntCounter,
    pub ack_errors: IntCounter,
    pub oldest_age: Gauge,
    pub usage: Gauge,
    /// `nexus_ingest_state_*{map}`: the tag-id cache and the Sparkplug alias table.
    pub state: StateMetrics,
}

impl IngestMetrics {
    /// Register the metrics in `registry`; the labelled ones start with a series at 0 for
    /// every label the parser can give, so `/metrics` shows them before the first reject.
    pub fn new(r: &Registry) -> Result<IngestMetrics, MetricError> {
        let m = IngestMetrics {
            messages: metrics::counter(
                r,
                "nexus_ingest_messages_received_total",
                "MQTT messages received",
            )?,
            points: metrics::counter(
                r,
                "nexus_ingest_points_received_total",
                "Points parsed from messages",
            )?,
            rejected: metrics::counter_vec(
                r,
                "nexus_ingest_rejected_total",
                "Messages (or Sparkplug metrics) not stored as points, by reason; kept in ingest_rejects",
                &["reason"],
            )?,
            ignored: metrics::counter_vec(
                r,
                "nexus_ingest_messages_ignored_total",
                "Messages that carry no values (Sparkplug deaths, commands, host state), by kind",
                &["kind"],
            )?,
            rebirths: metrics::counter(
                r,
                "nexus_ingest_rebirth_requests_total",
                "Sparkplug rebirth requests sent for unknown aliases",
            )?,
            ack_errors: metrics::counter(
                r,
                "nexus_ingest_ack_errors_total",
                "Acks that could not be handed to the MQTT client (the broker resends; duplicates are dropped)",
            )?,
            oldest_age: metrics::gauge_f64(
                r,
                "nexus_ingest_oldest_unwritten_age_seconds",
                "Age of the oldest point durable in the WAL but not yet in the database",
            )?,
            usage: metrics::gauge_f64(
                r,
                "nexus_ingest_buffer_usage_ratio",
                "WAL size over wal_max_size (the autoscaling signal)",
            )?,
            state: StateMetrics::new(r, "nexus_ingest")?,
        };
        for reason in parse::reject_labels() {
            m.rejected.with_label_values(&[reason]);
        }
        for kind in parse::IGNORED_KINDS {
            m.ignored.with_label_values(&[kind]);
        }
        Ok(m)
    }
}

/// Turns messages into WAL appends: the parser's state (Sparkplug births) and the counters.
pub struct Intake {
    parser: Parser,
    metrics: IngestMetrics,
    /// For rebirth requests.
    mqtt: MqttHandle,
    request_rebirth: bool,
}

impl Intake {
    /// Its Sparkplug alias table holds `cfg.sparkplug_max_aliases` units.
    pub fn new(metrics: IngestMetrics, mqtt: MqttHandle, cfg: &IngestionConfig) -> Intake {
        let aliases = metrics
            .state
            .map("sparkplug_aliases", cfg.sparkplug_max_aliases, true);
        Intake {
            parser: Parser::with_limit(aliases),
            metrics,
            mqtt,
            request_rebirth: cfg.request_rebirth,
        }
    }

    /// Read UNS payloads by the `payloads` rules of `d` (value objects until set).
    pub fn with_payloads(mut self, d: nexus_common::codec::payload::Decoder) -> Intake {
        self.parser.set_payloads(d);
        self
    }

    /// Hand every message of `incoming` to the WAL writer (`to_wal`), until `shutdown`, the
    /// end of `incoming`, or the WAL writer is gone. Messages still in `incoming` then are
    /// not acknowledged: the broker sends them again.
    pub async fn run(
        mut self,
        incoming: &mut mpsc::Receiver<Message>,
        to_wal: mpsc::Sender<Append<Message>>,
        shutdown: &CancellationToken,
    ) {
        loop {
            let msg = tokio::select! {
                m = incoming.recv() => match m { Some(m) => m, None => break },
                _ = shutdown.cancelled() => break,
            };
            let append = self.take(msg).await;
            tokio::select! {
                r = to_wal.send(append) => if r.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// Parse and count one message, and ask for a Sparkplug rebirth when the parser says so.
    async fn take(&mut self, msg: Message) -> Append<Message> {
        let m = &self.metrics;
        m.messages.inc();
        let parsed = self
            .parser
            .parse(msg.topic(), msg.payload(), crate::model::now_us());
        m.points.inc_by(parsed.points.len() as u64);
        for r in &parsed.rejects {
            m.rejected.with_label_values(&[r.label()]).inc();
            tracing::debug!(topic = %r.topic, reason = %r.reason, "message rejected");
        }
        if let Some(kind) = parsed.ignored {
            m.ignored.with_label_values(&[kind]).inc();
        }
        if let (Some((topic, payload)), true) = (parsed.rebirth, self.request_rebirth) {
            m.rebirths.inc();
            if let Err(e) = self
                .mqtt
                .publish(&topic, payload, QoS::AtLeastOnce, false)
                .await
            {
                tracing::warn!(%topic, error = %e, "cannot request a Sparkplug rebirth");
            }
        }
        Append {
            points: parsed.points,
            rejects: parsed.rejects,
            token: msg,
        }
    }
}

/// Acknowledge messages to the broker once the WAL has made them durable, in the order they
/// come; an ack the client does not take is counted in `errors`. Ends when the WAL writer
/// does.
pub async fn acker(
    mut durable: mpsc::UnboundedReceiver<Vec<Message>>,
    mqtt: MqttHandle,
    errors: IntCounter,
) {
    while let Some(msgs) = durable.recv().await {
        for m in &msgs {
            if mqtt.ack(m).await.is_err() {
                errors.inc();
            }
        }
    }
}
