//! The live namespace for browsers: the orchestrator follows every UNS topic (`#`) and serves
//! it as a snapshot and as server-sent events, batched (docs/control.md, "Live namespace").
//!
//! ```text
//! MQTT # ──> Namespace: last value, quality, unit, time and message count per topic
//!             (bounded: `MAX_TOPICS`; refused topics counted)
//!        ──> every 250 ms the topics changed since the last batch ──> broadcast
//!        ──> GET /api/v1/namespace/stream?filter=..: one `snapshot` event, then `update`
//!            events holding the batch's topics that match the filter; a client too slow
//!            for the batches gets a new snapshot instead (counted)
//! ```

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nexus_common::auth::http::Routes;
use nexus_common::config::Role;
use nexus_common::metrics::{self, MetricError};
use nexus_common::now_ms;
use nexus_common::topic::TopicFilter;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;

/// Most topics followed; messages on more are counted and dropped.
pub const MAX_TOPICS: usize = 200_000;
/// Most browsers streaming at once; more are answered 503.
pub const MAX_STREAMS: usize = 64;
/// How often changed topics are sent.
pub const BATCH_EVERY: Duration = Duration::from_millis(250);
/// Longest text kept of a payload that is not a JSON value.
const MAX_TEXT: usize = 256;

/// One topic as the browser sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    pub topic: String,
    /// The value (`v` of a Nexus value object, the JSON of another payload, or its text).
    pub v: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub u: Option<String>,
    /// The source time (`ts`), when the payload has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    /// When the orchestrator received it (ms since the epoch).
    pub at: i64,
    /// Messages received on the topic (the browser derives the rate).
    pub n: u64,
    /// The topic was cleared (an empty retained message).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

fn entry(topic: &str, payload: &[u8], n: u64) -> Entry {
    let mut e = Entry {
        topic: topic.to_owned(),
        v: Value::Null,
        q: None,
        u: None,
        ts: None,
        at: now_ms(),
        n,
        gone: false,
    };
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(mut m)) if m.contains_key("v") => {
            e.v = m.remove("v").unwrap_or(Value::Null);
            e.q = m.get("q").and_then(Value::as_str).map(str::to_owned);
            e.u = m.get("u").and_then(Value::as_str).map(str::to_owned);
            e.ts = m.get("ts").and_then(Value::as_i64);
        }
        Ok(v) if payload.len() <= MAX_TEXT * 4 => e.v = v,
        _ => {
            let text = String::from_utf8_lossy(payload);
            e.v = Value::String(text.chars().take(MAX_TEXT).collect());
        }
    }
    e
}

#[derive(Clone)]
struct LiveMetrics {
    topics: IntGauge,
    refused: IntCounter,
    streams: IntGauge,
    refused_streams: IntCounter,
    resyncs: IntCounterVec,
}

impl LiveMetrics {
    fn new(r: &Registry) -> Result<LiveMetrics, MetricError> {
        let resyncs = metrics::counter_vec(
            r,
            "nexus_orchestrator_stream_resyncs_total",
            "Streams sent a new snapshot instead of batches they were too slow for",
            &["reason"],
        )?;
        resyncs.with_label_values(&["lagged"]);
        Ok(LiveMetrics {
            topics: metrics::gauge(
                r,
                "nexus_orchestrator_namespace_topics",
                "UNS topics the live namespace holds",
            )?,
            refused: metrics::counter(
                r,
                "nexus_orchestrator_namespace_refused_total",
                "Messages on new topics dropped because the live namespace was full",
            )?,
            streams: metrics::gauge(
                r,
                "nexus_orchestrator_streams",
                "Browsers streaming the live namespace or the status",
            )?,
            refused_streams: metrics::counter(
                r,
                "nexus_orchestrator_streams_refused_total",
                "Streams refused because the most were open",
            )?,
            resyncs,
        })
    }
}

type Batch = Arc<Vec<Arc<Entry>>>;

struct Inner {
    topics: HashMap<String, Arc<Entry>>,
    dirty: HashSet<String>,
}

/// The live namespace.
#[derive(Clone)]
pub struct Namespace {
    inner: Arc<Mutex<Inner>>,
    tx: broadcast::Sender<Batch>,
    streams: Arc<Semaphore>,
    metrics: LiveMetrics,
    max_topics: usize,
}

impl Namespace {
    pub fn new(registry: &Registry) -> Result<Namespace, MetricError> {
        Self::with_limit(registry, MAX_TOPICS)
    }

    pub fn with_limit(registry: &Registry, max_topics: usize) -> Result<Namespace, MetricError> {
        let (tx, _) = broadcast::channel(16);
        Ok(Namespace {
            inner: Arc::new(Mutex::new(Inner {
                topics: HashMap::new(),
                dirty: HashSet::new(),
            })),
            tx,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            metrics: LiveMetrics::new(registry)?,
            max_topics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take one message of a UNS topic.
    pub fn update(&self, topic: &str, payload: &[u8]) {
        let mut inner = self.lock();
        let n = match inner.topics.get(topic) {
            Some(e) => e.n + 1,
            None if payload.is_empty() => return,
            None if inner.topics.len() >= self.max_topics => {
                self.metrics.refused.inc();
                return;
            }
            None => 1,
        };
        if payload.is_empty() {
            inner.topics.remove(topic);
        } else {
            inner
                .topics
                .insert(topic.to_owned(), Arc::new(entry(topic, payload, n)));
        }
        inner.dirty.insert(topic.to_owned());
        self.metrics.topics.set(inner.topics.len() as i64);
    }

    /// The topics matching `filter`, sorted.
    pub fn snapshot(&self, filter: &TopicFilter) -> Vec<Arc<Entry>> {
        let inner = self.lock();
        let mut v: Vec<Arc<Entry>> = inner
            .topics
            .values()
            .filter(|e| filter.matches(&e.topic))
            .cloned()
            .collect();
        drop(inner);
        v.sort_by(|a, b| a.topic.cmp(&b.topic));
        v
    }

    /// A slot for a browser stream, or none when [`MAX_STREAMS`] are open (counted in
    /// `nexus_orchestrator_streams_refused_total`; answer [`streams_busy`]).
    pub fn stream_slot(&self) -> Option<StreamSlot> {
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            self.metrics.refused_streams.inc();
            return None;
        };
        self.metrics.streams.inc();
        Some(StreamSlot {
            _permit: permit,
            gauge: self.metrics.streams.clone(),
        })
    }

    /// Send what changed since the last batch.
    pub fn flush(&self) {
        let batch: Vec<Arc<Entry>> = {
            let mut inner = self.lock();
            let dirty: Vec<String> = inner.dirty.drain().collect();
            dirty
                .into_iter()
                .map(|t| match inner.topics.get(&t) {
                    Some(e) => e.clone(),
                    None => Arc::new(Entry {
                        topic: t,
                        v: Value::Null,
                        q: None,
                        u: None,
                        ts: None,
                        at: now_ms(),
                        n: 0,
                        gone: true,
                    }),
                })
                .collect()
        };
        if !batch.is_empty() {
            // No receiver: nobody is streaming.
            let _ = self.tx.send(Arc::new(batch));
        }
    }

    /// Flush every [`BATCH_EVERY`] until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(BATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(),
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[derive(Deserialize)]
struct FilterQuery {
    filter: Option<String>,
}

fn parse_filter(q: &FilterQuery) -> Result<TopicFilter, String> {
    let f = q.filter.as_deref().unwrap_or("#");
    TopicFilter::parse(f).map_err(|e| format!("filter: {e}"))
}

fn bad_filter(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": msg }))).into_response()
}

fn plain(entries: &[Arc<Entry>]) -> Vec<&Entry> {
    entries.iter().map(Arc::as_ref).collect()
}

fn event(kind: &str, entries: &[Arc<Entry>]) -> Event {
    Event::default()
        .event(kind)
        .data(serde_json::to_string(&plain(entries)).unwrap_or_else(|_| "[]".into()))
}

async fn snapshot(State(ns): State<Namespace>, Query(q): Query<FilterQuery>) -> Response {
    match parse_filter(&q) {
        Ok(f) => Json(plain(&ns.snapshot(&f))).into_response(),
        Err(msg) => bad_filter(msg),
    }
}

struct StreamState {
    ns: Namespace,
    filter: TopicFilter,
    rx: broadcast::Receiver<Batch>,
    first: bool,
    _slot: StreamSlot,
}

/// The answer when [`MAX_STREAMS`] streams are open.
pub fn streams_busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": format!("at most {MAX_STREAMS} streams at once; try again later")})),
    )
        .into_response()
}

/// One of the [`MAX_STREAMS`] browser streams (the live namespace's and the status's), held
/// while the stream is open.
pub struct StreamSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn stream(State(ns): State<Namespace>, Query(q): Query<FilterQuery>) -> Response {
    let filter = match parse_filter(&q) {
        Ok(f) => f,
        Err(msg) => return bad_filter(msg),
    };
    let Some(slot) = ns.stream_slot() else {
        return streams_busy();
    };
    let state = StreamState {
        rx: ns.tx.subscribe(),
        filter,
        first: true,
        _slot: slot,
        ns,
    };
    let s = futures::stream::unfold(state, |mut st| async move {
        if st.first {
            st.first = false;
            let ev = event("snapshot", &st.ns.snapshot(&st.filter));
            return Some((Ok::<Event, Infallible>(ev), st));
        }
        loop {
            match st.rx.recv().await {
                Ok(batch) => {
                    let mine: Vec<Arc<Entry>> = batch
                        .iter()
                        .filter(|e| st.filter.matches(&e.topic))
                        .cloned()
                        .collect();
                    if !mine.is_empty() {
                        return Some((Ok(event("update", &mine)), st));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    st.ns.metrics.resyncs.with_label_values(&["lagged"]).inc();
                    let ev = event("snapshot", &st.ns.snapshot(&st.filter));
                    return Some((Ok(ev), st));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(s)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The live namespace's routes (viewer).
pub fn routes(ns: Namespace) -> Routes {
    Routes::new()
        .get("/api/v1/namespace", Role::Viewer, snapshot)
        .get("/api/v1/namespace/stream", Role::Viewer, stream)
        .with_state(ns)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payloads_become_entries() {
        let e = entry("a/b", br#"{"v":21.5,"q":"good","ts":17,"u":"degC"}"#, 3);
        assert_eq!(
            (e.v, e.q.as_deref(), e.u.as_deref(), e.ts, e.n),
            (json!(21.5), Some("good"), Some("degC"), Some(17), 3)
        );
        assert_eq!(entry("a", b"42", 1).v, json!(42));
        assert_eq!(entry("a", b"not json", 1).v, json!("not json"));
        let long = vec![b'x'; 10_000];
        assert_eq!(entry("a", &long, 1).v.as_str().unwrap().len(), MAX_TEXT);
    }

    #[test]
    fn the_namespace_is_bounded_and_batches_what_changed() {
        let ns = Namespace::with_limit(&Registry::new(), 3).unwrap();
        let mut rx = ns.tx.subscribe();
        for t in ["a/1", "a/2", "a/3", "a/4"] {
            ns.update(t, b"1");
        }
        assert_eq!(ns.snapshot(&TopicFilter::parse("#").unwrap()).len(), 3);
        assert_eq!(ns.metrics.refused.get(), 1);
        ns.update("a/1", b"2");
        ns.update("a/1", b"3");
        ns.update("a/2", b"");
        ns.flush();
        let batch = rx.try_recv().unwrap();
        let mut topics: Vec<(&str, u64, bool)> = batch
            .iter()
            .map(|e| (e.topic.as_str(), e.n, e.gone))
            .collect();
        topics.sort();
        assert_eq!(
            topics,
            [("a/1", 3, false), ("a/2", 0, true), ("a/3", 1, false)]
        );
        // A cleared topic frees its place.
        ns.update("a/4", b"1");
        assert_eq!(ns.snapshot(&TopicFilter::parse("a/+").unwrap()).len(), 3);
        // Nothing changed: nothing sent.
        ns.flush();
        let b = rx.try_recv().unwrap();
        assert_eq!(b.len(), 1);
        ns.flush();
        assert!(rx.try_recv().is_err());
    }
}
