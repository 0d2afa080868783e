//! Publishing: value objects onto their UNS topics, durable before they leave.
//!
//! With `gateway.buffer.durable_publish` (the default) every value is first appended to the
//! live log (a segment log in `<buffer dir>/live`, one fsync for all the batches that
//! waited meanwhile: a group commit), then published from it, and marked done when the broker
//! acknowledges it (PUBACK; PUBCOMP at QoS 2). The live log's client publishes nothing else,
//! so its acknowledgements, in order, match its publishes oldest first. A kill -9 leaves
//! what was not acknowledged in the live log; the next start moves it into the
//! store-and-forward buffer, to be replayed. Without it, values are handed to the client
//! directly and live in its memory until the broker has them.
//!
//! While the broker is away, values go to the store-and-forward buffer instead, and are
//! replayed at a bounded rate once it is back (after live values, and not retained, so the retained "last
//! value" of a topic stays the newest one).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_common::codec::{decode_value_object, encode_value_object, ValueObject};
use nexus_common::metrics::{self, MetricError};
use nexus_common::mqtt::{MqttHandle, QoS};
use nexus_common::DataPoint;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::buffer::{DiskBuffer, Place, Record};
use crate::sparkplug::{self, device_and_tag, EdgeNode, Sample};

/// Most values the live log holds that the broker has not acknowledged. At it, the publisher
/// takes no more batches until acknowledgements make room (the pollers skip polls and count
/// them, as when the MQTT client's queue is full without the live log).
pub const LIVE_MAX: usize = 20_000;

/// Batches from the pollers appended with one fsync, at most.
const GROUP_MAX: usize = 64;

#[derive(Clone)]
pub struct PublisherMetrics {
    pub published: IntCounter,
    pub buffered: IntCounter,
    pub replayed: IntCounter,
    pub buffer_dropped: IntCounter,
    pub buffer_lost: IntCounter,
    pub buffer_bytes: IntGauge,
    pub buffer_points: IntGauge,
    pub unacked: IntGauge,
    pub log_errors: IntCounter,
    pub disk_failing: IntGauge,
}

/// A publisher's series: the name for the UNS output, the name for the Sparkplug output, and
/// the help text.
const SERIES: [(&str, &str, &str); 10] = [
    (
        "nexus_gateway_points_published_total",
        "nexus_gateway_sparkplug_points_published_total",
        "Values handed to the broker live",
    ),
    (
        "nexus_gateway_points_buffered_total",
        "nexus_gateway_sparkplug_points_buffered_total",
        "Values written to the store-and-forward buffer",
    ),
    (
        "nexus_gateway_points_replayed_total",
        "nexus_gateway_sparkplug_points_replayed_total",
        "Buffered values published after the broker came back",
    ),
    (
        "nexus_gateway_buffer_dropped_total",
        "nexus_gateway_sparkplug_buffer_dropped_total",
        "Buffered values dropped because the buffer was full",
    ),
    (
        "nexus_gateway_buffer_lost_total",
        "nexus_gateway_sparkplug_buffer_lost_total",
        "Buffered values lost to damaged buffer files (a torn tail after a crash)",
    ),
    (
        "nexus_gateway_buffer_bytes",
        "nexus_gateway_sparkplug_buffer_bytes",
        "Size of the store-and-forward buffer on disk",
    ),
    (
        "nexus_gateway_buffer_points",
        "nexus_gateway_sparkplug_buffer_points",
        "Values waiting in the store-and-forward buffer",
    ),
    (
        "nexus_gateway_unacked_points",
        "nexus_gateway_sparkplug_unacked_points",
        "Values kept in the live log that the broker has not acknowledged yet",
    ),
    (
        "nexus_gateway_live_log_errors_total",
        "nexus_gateway_sparkplug_live_log_errors_total",
        "Failed writes to the live log (a full or failing disk: the values are published from memory)",
    ),
    (
        "nexus_gateway_disk_failing",
        "nexus_gateway_sparkplug_disk_failing",
        "1 while the live log or the store-and-forward buffer cannot be written",
    ),
];

impl PublisherMetrics {
    /// The series of the UNS output.
    pub fn new(r: &Registry) -> Result<PublisherMetrics, MetricError> {
        Self::register(r, false)
    }

    /// The series of the Sparkplug output (`nexus_gateway_sparkplug_...`).
    pub fn sparkplug(r: &Registry) -> Result<PublisherMetrics, MetricError> {
        Self::register(r, true)
    }

    fn register(r: &Registry, sparkplug: bool) -> Result<PublisherMetrics, MetricError> {
        let pick = |i: usize| {
            let (uns, sp, help) = SERIES[i];
            let help = if sparkplug {
                format!("{help} (Sparkplug output)")
            } else {
                help.to_owned()
            };
            (if sparkplug { sp } else { uns }, help)
        };
        let counter = |i| {
            let (n, h) = pick(i);
            metrics::counter(r, n, &h)
        };
        let gauge = |i| {
            let (n, h) = pick(i);
            metrics::gauge(r, n, &h)
        };
        Ok(PublisherMetrics {
            published: counter(0)?,
            buffered: counter(1)?,
            replayed: counter(2)?,
            buffer_dropped: counter(3)?,
            buffer_lost: counter(4)?,
            buffer_bytes: gauge(5)?,
            buffer_points: gauge(6)?,
            unacked: gauge(7)?,
            log_errors: counter(8)?,
            disk_failing: gauge(9)?,
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
    /// Most live values handed to the client and not yet acknowledged.
    pub window: usize,
}

pub fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn encode(p: &DataPoint) -> Record {
    encode_keeping(p).0
}

/// The record of a point and its value object (kept while the value is in memory, so the
/// Sparkplug output does not read it back from its JSON).
fn encode_keeping(p: &DataPoint) -> (Record, ValueObject) {
    let value = ValueObject::from(p);
    let record = Record {
        topic: p.topic.as_str().to_owned(),
        payload: encode_value_object(&value),
    };
    (record, value)
}

/// A live value not yet handed to the client: its record, its place in the live log unless
/// that could not be written, and its value.
struct Unsent {
    record: Record,
    place: Option<Place>,
    value: ValueObject,
}

/// Values durable before they are published: the live log, what of it is not yet handed
/// to the client, and what is handed but not acknowledged.
pub struct LiveLog {
    disk: Arc<Mutex<DiskBuffer>>,
    /// Waiting to be handed to the client.
    unsent: VecDeque<Unsent>,
    /// Handed to the client, oldest first, each waiting for its acknowledgement.
    inflight: VecDeque<Handed>,
    /// How many of `inflight` are replayed from the store-and-forward buffer.
    replaying: usize,
    acked: watch::Receiver<u64>,
    acked_seen: u64,
}

impl LiveLog {
    /// The live log in `disk`, published through a client whose acknowledgements are
    /// `acked` ([`MqttHandle::acked`]) and that publishes nothing else. `disk` must hold
    /// nothing unread ([`take_over`] moves what a previous run left).
    pub fn new(disk: DiskBuffer, acked: watch::Receiver<u64>) -> LiveLog {
        let acked_seen = *acked.borrow();
        LiveLog {
            disk: Arc::new(Mutex::new(disk)),
            unsent: VecDeque::new(),
            inflight: VecDeque::new(),
            replaying: 0,
            acked,
            acked_seen,
        }
    }

    fn len(&self) -> usize {
        self.unsent.len() + self.inflight.len()
    }
}

/// A value handed to the client: from the live log, or replayed from the store-and-forward
/// buffer (marked replayed there only once acknowledged, too).
#[derive(Debug, Clone)]
enum Handed {
    /// A live value, with its place in the live log unless that could not be written.
    Live(Option<Place>),
    /// Live values published in one message (Sparkplug DDATA), with their places.
    Group(Vec<Place>),
    /// This many values replayed from the store-and-forward buffer in one message.
    Replayed(usize),
}

/// Move what a previous run left in the live log (appended, never acknowledged) into the
/// store-and-forward buffer, to be replayed like values kept during an outage. Returns how
/// many. A crash half way replays some twice, never loses one.
pub fn take_over(
    live: &mut DiskBuffer,
    buffer: &mut DiskBuffer,
) -> Result<u64, nexus_common::seglog::Error> {
    let mut moved = 0;
    loop {
        let batch = live.peek(4096)?;
        if batch.is_empty() {
            return Ok(moved);
        }
        buffer.append(&batch)?;
        live.consume(batch.len())?;
        moved += batch.len() as u64;
    }
}

pub struct Publisher {
    mqtt: MqttHandle,
    buffer: Arc<Mutex<DiskBuffer>>,
    live: Option<LiveLog>,
    settings: PublishSettings,
    metrics: PublisherMetrics,
    dropped_seen: u64,
    /// Readiness condition that fails while the disk cannot be written.
    disk_flag: Option<nexus_common::telemetry::ReadyFlag>,
    /// Publishing as a Sparkplug edge node rather than on UNS topics.
    sparkplug: Option<SparkplugOut>,
}

/// The Sparkplug output: the edge node, the QoS of its data, and its commands.
pub struct SparkplugOut {
    pub node: Arc<Mutex<EdgeNode>>,
    pub data_qos: QoS,
    /// NCMD and DCMD messages for the node.
    pub commands: mpsc::Receiver<nexus_common::mqtt::Message>,
    /// Where a DCMD goes on as a write command (`$nexus/cmd/<device>/write`): a client other
    /// than the data client, whose acknowledgements the live log counts.
    pub command_out: MqttHandle,
    /// `nexus_gateway_sparkplug_commands_total{result}`.
    pub command_results: prometheus::IntCounterVec,
    births_due: bool,
    /// The primary host's STATE topic, when the node waits for it.
    primary_host: Option<String>,
    /// The primary host said it is online (its last STATE), and that STATE's timestamp.
    host_online: bool,
    host_ts: i64,
}

impl SparkplugOut {
    pub fn new(
        node: Arc<Mutex<EdgeNode>>,
        data_qos: QoS,
        commands: mpsc::Receiver<nexus_common::mqtt::Message>,
        command_out: MqttHandle,
        command_results: prometheus::IntCounterVec,
    ) -> SparkplugOut {
        SparkplugOut {
            node,
            data_qos,
            commands,
            command_out,
            command_results,
            births_due: true,
            primary_host: None,
            host_online: true,
            host_ts: i64::MIN,
        }
    }

    /// Publish only while the primary host application `host_id` says it is online
    /// (`spBv1.0/STATE/<host_id>`, which the node's client must subscribe to); meanwhile
    /// values wait in the store-and-forward buffer.
    pub fn with_primary_host(mut self, host_id: &str) -> SparkplugOut {
        self.primary_host = Some(state_topic(host_id));
        self.host_online = false;
        self
    }
}

/// `spBv1.0/STATE/<host_id>`: a Sparkplug host application's state.
pub fn state_topic(host_id: &str) -> String {
    format!(
        "{}/STATE/{host_id}",
        nexus_common::codec::sparkplug::NAMESPACE
    )
}

/// A STATE payload (Sparkplug 3.0: `{"online": bool, "timestamp": ms}`): whether online, and
/// when the host said so.
fn parse_state(payload: &[u8]) -> Option<(bool, i64)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some((v.get("online")?.as_bool()?, v.get("timestamp")?.as_i64()?))
}

/// The write command a DCMD becomes (docs/commands.md): its topic and payload. The request id
/// is a digest of the device and the DCMD's bytes, so a DCMD delivered twice is executed once
/// (the command handler's duplicate check); the DCMD's timestamp is the command's `ts`, from
/// which the handler's TTL counts.
pub fn dcmd_command(
    node: &EdgeNode,
    device: &str,
    payload: &[u8],
) -> Result<(String, Vec<u8>), String> {
    use sha2::{Digest, Sha256};
    let (writes, ts) = node.dcmd_writes(device, payload)?;
    let digest = Sha256::new()
        .chain_update(device.as_bytes())
        .chain_update([0])
        .chain_update(payload)
        .finalize();
    let id: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    let writes: Vec<serde_json::Value> = writes
        .iter()
        .map(|(tag, v)| {
            serde_json::json!({
                "tag_id": tag,
                "value": nexus_common::codec::json::value_to_json(Some(v)),
            })
        })
        .collect();
    let mut cmd = serde_json::json!({
        "writes": writes,
        "request_id": format!("sparkplug-{id}"),
        "user": "sparkplug-host",
    });
    if let Some(ts) = ts.and_then(|t| i64::try_from(t).ok()) {
        cmd["ts"] = ts.into();
    }
    Ok((
        format!("$nexus/cmd/{device}/write"),
        cmd.to_string().into_bytes(),
    ))
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
            live: None,
            settings,
            metrics,
            dropped_seen: 0,
            disk_flag: None,
            sparkplug: None,
        };
        p.update_gauges();
        p
    }

    /// The readiness condition (met now) that fails, with the error, while the gateway's
    /// disk cannot be written.
    pub fn with_disk_flag(mut self, flag: nexus_common::telemetry::ReadyFlag) -> Publisher {
        flag.set(true);
        self.disk_flag = Some(flag);
        self
    }

    /// Connected, and (Sparkplug with a primary host) the host is online: values go out live;
    /// otherwise they wait in the store-and-forward buffer.
    fn can_publish(&self) -> bool {
        self.mqtt.is_connected() && self.sparkplug.as_ref().is_none_or(|sp| sp.host_online)
    }

    /// A write of the live log or the buffer failed (`Some(error)`) or succeeded (`None`).
    fn disk_failing(&self, error: Option<&str>) {
        match error {
            Some(e) => {
                if self.metrics.disk_failing.get() == 0 {
                    tracing::error!(error = %e, "the gateway's disk cannot be written: values are published from memory, not durably, until it can");
                }
                self.metrics.disk_failing.set(1);
                if let Some(f) = &self.disk_flag {
                    f.fail(format!(
                        "the live log or store-and-forward buffer cannot be written ({e}); values are not durable"
                    ));
                }
            }
            None if self.metrics.disk_failing.get() != 0 => {
                tracing::info!("the gateway's disk is written again");
                self.metrics.disk_failing.set(0);
                if let Some(f) = &self.disk_flag {
                    f.set(true);
                }
            }
            None => {}
        }
    }

    /// Publish live values through `live` (durable before publish); `mqtt` must be the
    /// client whose acknowledgements `live` follows.
    pub fn with_live_log(mut self, live: LiveLog) -> Publisher {
        self.live = Some(live);
        self
    }

    /// Publish as a Sparkplug edge node (needs the live log: values are grouped into DDATA
    /// when they are handed to the client).
    pub fn with_sparkplug(mut self, out: SparkplugOut) -> Publisher {
        self.sparkplug = Some(out);
        self
    }

    fn update_gauges(&self) {
        let b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics.buffer_bytes.set(b.bytes() as i64);
        self.metrics.buffer_points.set(b.len() as i64);
        self.metrics
            .unacked
            .set(self.live.as_ref().map_or(0, |l| l.len()) as i64);
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
        self.blocking_on(self.buffer.clone(), f).await
    }

    async fn buffer_records(&mut self, records: Vec<Record>) {
        let n = records.len() as u64;
        match self
            .blocking(move |b| b.append(&records).map(|_| b.dropped()))
            .await
        {
            Ok(dropped) => {
                self.disk_failing(None);
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
                self.disk_failing(Some(&e.to_string()));
                self.metrics.buffer_dropped.inc_by(n);
                tracing::error!(error = %e, points = n, "cannot write the store-and-forward buffer; values dropped");
            }
        }
        self.update_gauges();
    }

    /// Publish a batch live, or buffer what cannot be published.
    async fn publish_batch(&mut self, points: Vec<DataPoint>) {
        if self.live.is_some() {
            let (records, values) = points.iter().map(encode_keeping).unzip();
            return self.log_batch(records, values).await;
        }
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

    /// Durable before publish: append to the live log (one fsync), then hand out what the
    /// window allows. While the broker is away, to the store-and-forward buffer instead.
    async fn log_batch(&mut self, records: Vec<Record>, values: Vec<ValueObject>) {
        let Some(live) = &self.live else { return };
        if !self.can_publish() {
            return self.buffer_records(records).await;
        }
        let disk = live.disk.clone();
        // The records go to the blocking thread and come back: no copy of them.
        let (records, appended) = self
            .blocking_on(disk, move |d| {
                let r = d.append_placed(&records);
                (records, r)
            })
            .await;
        // `None` when the log could not be written: such values are published all the same.
        let places: Vec<Option<Option<Place>>> = match appended {
            Ok(places) => {
                self.disk_failing(None);
                // A record too large to keep was dropped and counted by the log.
                places.into_iter().map(|p| p.map(Some)).collect()
            }
            Err(e) => {
                // The disk is full or failing: the values are published all the same, held in
                // memory until acknowledged (the store-and-forward buffer is on the same
                // disk). Polls stop once LIVE_MAX are held.
                self.metrics.log_errors.inc();
                self.disk_failing(Some(&e.to_string()));
                vec![Some(None); records.len()]
            }
        };
        if let Some(live) = &mut self.live {
            live.unsent
                .extend(records.into_iter().zip(values).zip(places).filter_map(
                    |((record, value), place)| {
                        Some(Unsent {
                            record,
                            place: place?,
                            value,
                        })
                    },
                ));
        }
        self.pump().await;
        self.update_gauges();
    }

    /// Whether to take the pollers' next batch: always while the broker is away (to the
    /// store-and-forward buffer), else while the live log has room.
    fn takes_batches(&self) -> bool {
        self.live
            .as_ref()
            .is_none_or(|l| l.len() < LIVE_MAX || !self.can_publish())
    }

    /// Hand live values to the client while it is connected and the window has room.
    async fn pump(&mut self) {
        if self.sparkplug.is_some() {
            return self.pump_sparkplug().await;
        }
        let (qos, retain, window) = (
            self.settings.qos,
            self.settings.retain,
            self.settings.window,
        );
        let mut handed = 0u64;
        let mut done = Vec::new();
        while let Some(live) = &mut self.live {
            if !self.mqtt.is_connected() || live.inflight.len() >= window {
                break;
            }
            let Some(u) = live.unsent.pop_front() else {
                break;
            };
            let r = &u.record;
            if self
                .mqtt
                .publish(&r.topic, r.payload.clone(), qos, retain)
                .await
                .is_err()
            {
                // The client is stopping: the value stays in the log for the next start.
                if let Some(live) = &mut self.live {
                    live.unsent.push_front(u);
                }
                break;
            }
            handed += 1;
            if let Some(live) = &mut self.live {
                if qos == QoS::AtMostOnce {
                    // No acknowledgement will come: done once handed.
                    done.extend(u.place);
                } else {
                    live.inflight.push_back(Handed::Live(u.place));
                }
            }
        }
        self.metrics.published.inc_by(handed);
        if !done.is_empty() {
            self.ack_places(done);
        }
    }

    /// Sparkplug: births when due (QoS 0, as Sparkplug asks; they carry no values that are
    /// not also in data), then the live values of one device at a time as one DDATA.
    async fn pump_sparkplug(&mut self) {
        let window = self.settings.window;
        let mut handed = 0u64;
        loop {
            if !self.can_publish() || !self.publish_births().await {
                break;
            }
            let (Some(live), Some(sp)) = (&mut self.live, &self.sparkplug) else {
                break;
            };
            if live.inflight.len() >= window {
                break;
            }
            let group = take_group(&mut live.unsent, |u| &u.record.topic);
            if group.is_empty() {
                break;
            }
            let records: Vec<(&Record, Option<&ValueObject>)> =
                group.iter().map(|u| (&u.record, Some(&u.value))).collect();
            let outs = sparkplug_messages(&sp.node, &records, false);
            let data_qos = sp.data_qos;
            if outs.is_empty() {
                // Nothing publishable in them (logged): no acknowledgement will come.
                self.ack_places(group.into_iter().filter_map(|u| u.place).collect());
                continue;
            }
            if !self.publish_sparkplug(outs, data_qos).await {
                // The client is stopping: the values stay in the log for the next start.
                if let Some(live) = &mut self.live {
                    for g in group.into_iter().rev() {
                        live.unsent.push_front(g);
                    }
                }
                break;
            }
            handed += group.len() as u64;
            let places: Vec<Place> = group.into_iter().filter_map(|u| u.place).collect();
            if data_qos == QoS::AtMostOnce {
                self.ack_places(places);
            } else if let Some(live) = &mut self.live {
                live.inflight.push_back(Handed::Group(places));
            }
        }
        self.metrics.published.inc_by(handed);
    }

    /// The node's births, if due; false if the client refused them (it is stopping).
    async fn publish_births(&mut self) -> bool {
        let Some(sp) = &mut self.sparkplug else {
            return true;
        };
        if !sp.births_due {
            return true;
        }
        let births = sp.node.lock().unwrap_or_else(|e| e.into_inner()).births();
        sp.births_due = false;
        for (topic, payload) in births {
            if self
                .mqtt
                .publish(&topic, payload, QoS::AtMostOnce, false)
                .await
                .is_err()
            {
                if let Some(sp) = &mut self.sparkplug {
                    sp.births_due = true;
                }
                return false;
            }
        }
        true
    }

    /// Publish the messages of one group: any DBIRTH at QoS 0, the DDATA (last) at
    /// `data_qos`. False if the client refused the DDATA.
    async fn publish_sparkplug(&self, outs: Vec<(String, Vec<u8>)>, data_qos: QoS) -> bool {
        let n = outs.len();
        for (i, (topic, payload)) in outs.into_iter().enumerate() {
            let qos = if i + 1 == n {
                data_qos
            } else {
                QoS::AtMostOnce
            };
            if self
                .mqtt
                .publish(&topic, payload, qos, false)
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Match the acknowledgements that arrived to the oldest handed values.
    async fn take_acks(&mut self) {
        let Some(live) = &mut self.live else { return };
        let now = *live.acked.borrow_and_update();
        let n = now.saturating_sub(live.acked_seen) as usize;
        live.acked_seen = now;
        if n == 0 {
            return;
        }
        if n > live.inflight.len() {
            tracing::error!(
                acks = n,
                handed = live.inflight.len(),
                "more acknowledgements than values handed to the broker"
            );
        }
        let mut places = Vec::new();
        let mut replayed = 0;
        for h in live.inflight.drain(..n.min(live.inflight.len())) {
            match h {
                Handed::Live(p) => places.extend(p),
                Handed::Group(p) => places.extend(p),
                Handed::Replayed(n) => replayed += n,
            }
        }
        live.replaying -= replayed;
        if !places.is_empty() {
            self.ack_places(places);
        }
        if replayed > 0 {
            if let Err(e) = self.blocking(move |b| b.consume(replayed)).await {
                tracing::error!(error = %e, "cannot advance the store-and-forward buffer");
            }
            self.update_gauges();
        }
    }

    fn ack_places(&mut self, places: Vec<Place>) {
        let Some(live) = &self.live else { return };
        let r = live
            .disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ack(&places);
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot advance the live log");
        }
    }

    /// Save the live log's read position (a restart then replays less twice).
    async fn save_live_position(&self) {
        let Some(live) = &self.live else { return };
        if let Err(e) = self
            .blocking_on(live.disk.clone(), |d| d.save_position())
            .await
        {
            tracing::error!(error = %e, "cannot save the live log's position");
        }
    }

    async fn blocking_on<T: Send + 'static>(
        &self,
        disk: Arc<Mutex<DiskBuffer>>,
        f: impl FnOnce(&mut DiskBuffer) -> T + Send + 'static,
    ) -> T {
        let run = move || f(&mut disk.lock().unwrap_or_else(|e| e.into_inner()));
        match tokio::task::spawn_blocking(run).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => std::future::pending().await,
        }
    }

    /// Replay up to `n` buffered values. Returns how many went out.
    async fn replay(&mut self, n: usize) -> usize {
        if self.live.is_some() {
            return self.replay_acked(n).await;
        }
        let Ok(batch) = self.blocking(move |b| b.peek(n)).await else {
            return 0;
        };
        let mut sent = 0;
        for r in &batch {
            if !self.hand_replayed(r).await {
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

    /// Hand a replayed value to the client (not retained): false when it is not connected or
    /// is stopping.
    async fn hand_replayed(&self, r: &Record) -> bool {
        self.mqtt.is_connected()
            && self
                .mqtt
                .publish(&r.topic, r.payload.clone(), self.settings.qos, false)
                .await
                .is_ok()
    }

    /// Replay through the live log's client: each value stays in the store-and-forward
    /// buffer until the broker acknowledges it.
    async fn replay_acked(&mut self, n: usize) -> usize {
        let Some(live) = &self.live else { return 0 };
        let skip = live.replaying;
        let room = self
            .settings
            .window
            .saturating_sub(live.inflight.len())
            .min(n);
        if room == 0 {
            return 0;
        }
        let Ok(batch) = self.blocking(move |b| b.peek(skip + room)).await else {
            return 0;
        };
        if self.sparkplug.is_some() {
            return self
                .replay_sparkplug(batch.into_iter().skip(skip).collect())
                .await;
        }
        let mut sent = 0;
        for r in batch.iter().skip(skip) {
            if !self.hand_replayed(r).await {
                break;
            }
            sent += 1;
            if let Some(live) = &mut self.live {
                if self.settings.qos == QoS::AtMostOnce {
                    if let Err(e) = self.blocking(|b| b.consume(1)).await {
                        tracing::error!(error = %e, "cannot advance the store-and-forward buffer");
                    }
                } else {
                    live.inflight.push_back(Handed::Replayed(1));
                    live.replaying += 1;
                }
            }
        }
        self.metrics.replayed.inc_by(sent as u64);
        self.update_gauges();
        sent
    }

    /// Sparkplug: replayed values as DDATA marked historical, a device at a time.
    async fn replay_sparkplug(&mut self, batch: Vec<Record>) -> usize {
        let mut batch: VecDeque<Record> = batch.into();
        let mut sent = 0;
        while self.can_publish() && self.publish_births().await {
            let group = take_group(&mut batch, |r| &r.topic);
            let Some(sp) = &self.sparkplug else { break };
            if group.is_empty() {
                break;
            }
            let records: Vec<(&Record, Option<&ValueObject>)> =
                group.iter().map(|r| (r, None)).collect();
            let outs = sparkplug_messages(&sp.node, &records, true);
            let data_qos = sp.data_qos;
            let nothing = outs.is_empty();
            if !nothing && !self.publish_sparkplug(outs, data_qos).await {
                break;
            }
            let n = group.len();
            sent += n;
            if data_qos == QoS::AtMostOnce || nothing {
                if let Err(e) = self.blocking(move |b| b.consume(n)).await {
                    tracing::error!(error = %e, "cannot advance the store-and-forward buffer");
                }
            } else if let Some(live) = &mut self.live {
                live.inflight.push_back(Handed::Replayed(n));
                live.replaying += n;
            }
        }
        self.metrics.replayed.inc_by(sent as u64);
        self.update_gauges();
        sent
    }

    /// A Sparkplug command: an NCMD rebirth request makes new births due; a DCMD becomes a
    /// write command for the command handler, which validates, rate-limits, audits and runs it
    /// as any other (the broker lets only operators publish a DCMD).
    async fn sparkplug_command(&mut self, msg: nexus_common::mqtt::Message) -> bool {
        use nexus_common::codec::sparkplug::{MessageType, SparkplugTopic};
        let Some(sp) = &mut self.sparkplug else {
            return false;
        };
        let topic = msg.topic().unwrap_or_default().to_owned();
        if sp.primary_host.as_deref() == Some(topic.as_str()) {
            return self.host_state(msg.payload()).await;
        }
        let count = |sp: &SparkplugOut, r: &str| sp.command_results.with_label_values(&[r]).inc();
        let parsed = SparkplugTopic::parse(&topic);
        match parsed
            .as_ref()
            .map(|t| (t.message_type, t.device.as_deref()))
        {
            Ok((MessageType::NCmd, None)) => {
                if EdgeNode::is_rebirth_request(msg.payload()) {
                    tracing::info!(topic = %topic, "Sparkplug rebirth requested");
                    count(sp, "rebirth");
                    sp.births_due = true;
                    self.pump().await;
                } else {
                    count(sp, "refused");
                    tracing::warn!(topic = %topic, "Sparkplug node command not understood (only Node Control/Rebirth is); ignored");
                }
            }
            Ok((MessageType::DCmd, Some(device))) => {
                let cmd = {
                    let node = sp.node.lock().unwrap_or_else(|e| e.into_inner());
                    dcmd_command(&node, device, msg.payload())
                };
                let sent = match cmd {
                    Ok((cmd_topic, payload)) => sp
                        .command_out
                        .publish(&cmd_topic, payload, QoS::AtLeastOnce, false)
                        .await
                        .map(|_| cmd_topic)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(cmd_topic) => {
                        count(sp, "forwarded");
                        tracing::info!(topic = %topic, command = %cmd_topic, "Sparkplug DCMD forwarded to the command handler");
                    }
                    Err(e) => {
                        count(sp, "refused");
                        tracing::warn!(topic = %topic, error = %e, "Sparkplug DCMD refused");
                    }
                }
            }
            _ => {
                count(sp, "refused");
                tracing::warn!(topic = %topic, "not a command for this Sparkplug node; ignored");
            }
        }
        false
    }

    /// The primary host's STATE. Online: births, then what waited is published. Offline:
    /// NDEATH, and values wait in the store-and-forward buffer. A STATE older than the last
    /// one taken (a stale retained message) is ignored. Returns whether the host came online.
    async fn host_state(&mut self, payload: &[u8]) -> bool {
        let Some(sp) = &mut self.sparkplug else {
            return false;
        };
        let Some((online, ts)) = parse_state(payload) else {
            tracing::warn!(
                "primary host STATE is not {{\"online\": bool, \"timestamp\": ms}}; ignored"
            );
            return false;
        };
        if ts < sp.host_ts || online == sp.host_online {
            sp.host_ts = sp.host_ts.max(ts);
            return false;
        }
        sp.host_ts = ts;
        sp.host_online = online;
        if online {
            tracing::info!("Sparkplug primary host online: births, then the values kept meanwhile");
            sp.births_due = true;
            self.pump().await;
            true
        } else {
            tracing::warn!("Sparkplug primary host offline: the node publishes NDEATH and keeps values until it returns");
            let (topic, payload) = sp.node.lock().unwrap_or_else(|e| e.into_inner()).ndeath();
            let _ = self
                .mqtt
                .publish(&topic, payload, QoS::AtMostOnce, false)
                .await;
            false
        }
    }

    /// Run until `rx` closes (the pollers stopped), then flush.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<DataPoint>>) {
        let mut connected = self.mqtt.connected();
        let mut connected_since = (*connected.borrow()).then(Instant::now);
        let mut acks = self.live.as_ref().map(|l| l.acked.clone());
        let tick = Duration::from_millis(100);
        let per_tick =
            ((self.settings.replay_rate as u64 * tick.as_millis() as u64) / 1000).max(1) as usize;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut ticks = 0u64;
        let mut waiting = !self
            .buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        loop {
            tokio::select! {
                biased;
                // Acknowledgements first: they make room in the window.
                r = async {
                    match &mut acks {
                        Some(a) => a.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if r.is_err() {
                        acks = None;
                    }
                    self.take_acks().await;
                    self.pump().await;
                }
                batch = rx.recv(), if self.takes_batches() => match batch {
                    Some(mut points) => {
                        // Whatever else is waiting goes with it: one fsync for all (group
                        // commit).
                        let mut more = 1;
                        while more < GROUP_MAX {
                            let Ok(next) = rx.try_recv() else { break };
                            points.extend(next);
                            more += 1;
                        }
                        self.publish_batch(points).await;
                        waiting = waiting || !self.buffer.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
                    }
                    None => break,
                },
                r = connected.changed() => {
                    if r.is_err() { break; }
                    connected_since = (*connected.borrow_and_update()).then(Instant::now);
                    // A new connection: the Sparkplug node is born again on it.
                    if let (Some(sp), Some(_)) = (&mut self.sparkplug, connected_since) {
                        sp.births_due = true;
                    }
                    self.pump().await;
                }
                cmd = async {
                    match &mut self.sparkplug {
                        Some(sp) => sp.commands.recv().await,
                        None => std::future::pending().await,
                    }
                } => match cmd {
                    Some(msg) => {
                        // The primary host came online: what waited is replayed after the
                        // births, as after a reconnect.
                        if self.sparkplug_command(msg).await && self.mqtt.is_connected() {
                            connected_since = Some(Instant::now());
                            waiting = true;
                        }
                    }
                    None => {
                        // No more commands (the client stopped); keep publishing.
                        if let Some(sp) = &mut self.sparkplug {
                            let (_, rx) = mpsc::channel(1);
                            sp.commands = rx;
                        }
                    }
                },
                _ = ticker.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(10) {
                        self.save_live_position().await;
                    }
                    let ready = connected_since.is_some_and(|t| t.elapsed() >= self.settings.replay_delay);
                    if waiting && ready {
                        // Live values go first: replay only when no batch is waiting.
                        if rx.is_empty() {
                            self.replay(per_tick).await;
                        }
                        waiting = !self.buffer.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
                    }
                }
            }
        }
        // The pollers stopped: what is handed may still be acknowledged, briefly. The rest
        // stays in the live log for the next start.
        if let Some(a) = &mut acks {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    self.pump().await;
                    self.take_acks().await;
                    if self.live.as_ref().is_none_or(|l| l.len() == 0) || a.changed().await.is_err()
                    {
                        break;
                    }
                }
            })
            .await;
            self.take_acks().await;
        }
        // A clean stop: the node says it is going (the will is for an unclean one).
        if let Some(sp) = &self.sparkplug {
            let (topic, payload) = sp.node.lock().unwrap_or_else(|e| e.into_inner()).ndeath();
            let _ = self
                .mqtt
                .publish(&topic, payload, QoS::AtMostOnce, false)
                .await;
        }
        self.save_live_position().await;
        self.update_gauges();
    }
}

/// Take the records at the front of `q` that belong to the same device (the UNS topic's
/// level before the tag), at most [`sparkplug::MAX_METRICS`].
fn take_group<T>(q: &mut VecDeque<T>, topic: impl Fn(&T) -> &String) -> Vec<T> {
    let Some(first) = q.front() else {
        return Vec::new();
    };
    let device = device_and_tag(topic(first)).map(|(d, _)| d.to_owned());
    let mut group = Vec::new();
    while let Some(next) = q.front() {
        let same = device_and_tag(topic(next)).map(|(d, _)| d) == device.as_deref();
        if !same || group.len() >= sparkplug::MAX_METRICS {
            break;
        }
        group.extend(q.pop_front());
    }
    group
}

/// The Sparkplug messages (a DBIRTH if needed, then the DDATA) for records of one device,
/// each with its value when it is still in memory (else it is read from the record).
fn sparkplug_messages(
    node: &Mutex<EdgeNode>,
    records: &[(&Record, Option<&ValueObject>)],
    historical: bool,
) -> Vec<(String, Vec<u8>)> {
    let mut samples = Vec::with_capacity(records.len());
    let mut device = "";
    for (r, kept) in records {
        let Some((d, tag)) = device_and_tag(&r.topic) else {
            tracing::error!(topic = %r.topic, "not a device's tag topic; not published as Sparkplug");
            continue;
        };
        let value = match kept {
            Some(v) => std::borrow::Cow::Borrowed(*v),
            None => match decode_value_object(&r.payload) {
                Ok(v) => std::borrow::Cow::Owned(v),
                Err(e) => {
                    tracing::error!(topic = %r.topic, error = %e, "value not decodable; not published as Sparkplug");
                    continue;
                }
            },
        };
        device = d;
        samples.push(Sample {
            device: d,
            tag,
            value,
        });
    }
    if samples.is_empty() {
        return Vec::new();
    }
    node.lock()
        .unwrap_or_else(|e| e.into_inner())
        .data(device, &samples, historical)
}
