//! The embedded broker's durable state (docs/broker.md, "Durable state"): persistent sessions
//! with their subscriptions and unacknowledged QoS 1/2 messages, and retained messages, kept
//! in a segment log so that a crash or restart of the broker loses nothing it acknowledged.
//!
//! Every change is a record appended to the log before rmqtt acts on it: a QoS 1/2 publish
//! that a persistent session's subscription matches is written before it is routed, so before
//! its PUBACK; a subscriber's acknowledgement (or rmqtt's drop of the message, counted in
//! `nexus_broker_messages_dropped_total`) writes that the message is done for it. At start the
//! log is replayed, and the sessions are rebuilt in rmqtt as offline sessions with their
//! subscriptions and their undone messages queued, before the listeners accept anyone; a
//! client that comes back finds its session present. When the log grows, its live content is
//! written as a snapshot at the head of a new segment and the old segments are deleted.
//!
//! Records are written to the operating system at once (a killed broker loses nothing) and
//! made durable on the disk every `broker.state_sync` (0s: before each acknowledgement). The
//! one exception is a subscriber's acknowledgement: applied at once, it is written with the
//! next record or at the next sync, which saves a write per message. A crash can lose it,
//! and the broker then sends that message again, as QoS 1 allows (with `state_sync: 0s` it
//! is written at once too).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rmqtt::context::ServerContext;
use rmqtt::session::{Session, SessionState};
use rmqtt::types::{
    ConnectInfo, DisconnectInfo, From, Id, Publish, QoS, Retain, SessionSubMap, SessionSubs,
    SubscriptionOptions, TopicFilter, TopicName,
};
use serde::{Deserialize, Serialize};

use crate::seglog::{Format, Options, SegmentDir, SegmentWriter, Verify};
use crate::topic::filter_matches;

/// A new segment (with a snapshot at its head) once the current one holds this many bytes,
/// or four times the last snapshot if that is more.
const COMPACT_AT: u64 = 64 * 1024 * 1024;

/// Bytes of acknowledgements kept back before they are written anyway.
const DEFERRED_MAX: usize = 64 * 1024;

/// Undone messages kept per subscriber beyond the broker's own queue and in-flight limits;
/// past that the oldest is let go and counted (`nexus_broker_state_overflow_total`).
pub(super) const SLACK: usize = 1024;

/// Who a message is for: one persistent session, or a shared subscription group (any member's
/// acknowledgement settles it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum Target {
    Client(String),
    Group { group: String, filter: String },
}

/// One change, as written to the log.
#[derive(Serialize, Deserialize)]
enum Record {
    /// The first record of a segment; a snapshot of the state follows, then [`Record::Ready`].
    Begin,
    /// The snapshot at the head of the segment is whole.
    Ready,
    /// A persistent session was created (`fresh`: it starts empty) or its client connected.
    Session {
        client: String,
        conn: ConnectInfo,
        created_at: i64,
        fresh: bool,
    },
    Disconnected {
        client: String,
        at: i64,
    },
    /// The session ended (clean start, expiry, or it is no longer persistent).
    Forget {
        client: String,
    },
    Sub {
        client: String,
        filter: String,
        opts: SubscriptionOptions,
    },
    Unsub {
        client: String,
        filter: String,
        group: Option<String>,
    },
    Msg {
        seq: u64,
        from: From,
        publish: Publish,
        targets: Vec<Target>,
    },
    Done {
        target: Target,
        seq: u64,
    },
    Retain {
        topic: String,
        msg: Option<(From, Publish)>,
    },
}

struct Sess {
    conn: Arc<ConnectInfo>,
    created_at: i64,
    disconnected_at: Option<i64>,
    subs: Vec<(String, SubscriptionOptions)>,
}

struct Stored {
    from: From,
    publish: Publish,
    /// Targets that have not settled it yet.
    refs: usize,
}

#[derive(Default)]
struct Data {
    sessions: BTreeMap<String, Sess>,
    pending: HashMap<Target, VecDeque<u64>>,
    msgs: HashMap<u64, Stored>,
    retained: BTreeMap<String, (From, Publish)>,
    next_seq: u64,
}

impl Data {
    fn release(&mut self, seq: u64) {
        if let Some(m) = self.msgs.get_mut(&seq) {
            m.refs = m.refs.saturating_sub(1);
            if m.refs == 0 {
                self.msgs.remove(&seq);
            }
        }
    }

    fn drop_target(&mut self, t: &Target) {
        if let Some(q) = self.pending.remove(t) {
            for seq in q {
                self.release(seq);
            }
        }
    }

    fn apply(&mut self, rec: Record) {
        match rec {
            Record::Begin | Record::Ready => {}
            Record::Session {
                client,
                conn,
                created_at,
                fresh,
            } => {
                if fresh {
                    self.drop_target(&Target::Client(client.clone()));
                }
                let s = self.sessions.entry(client).or_insert_with(|| Sess {
                    conn: Arc::new(conn.clone()),
                    created_at,
                    disconnected_at: None,
                    subs: Vec::new(),
                });
                s.conn = Arc::new(conn);
                s.disconnected_at = None;
                if fresh {
                    s.created_at = created_at;
                    s.subs.clear();
                }
            }
            Record::Disconnected { client, at } => {
                if let Some(s) = self.sessions.get_mut(&client) {
                    s.disconnected_at = Some(at);
                }
            }
            Record::Forget { client } => {
                self.sessions.remove(&client);
                self.drop_target(&Target::Client(client));
            }
            Record::Sub {
                client,
                filter,
                opts,
            } => {
                if let Some(s) = self.sessions.get_mut(&client) {
                    let group = opts.shared_group().map(|g| g.to_string());
                    s.subs.retain(|(f, o)| {
                        !(f == &filter && o.shared_group().map(|g| g.to_string()) == group)
                    });
                    s.subs.push((filter, opts));
                }
            }
            Record::Unsub {
                client,
                filter,
                group,
            } => {
                if let Some(s) = self.sessions.get_mut(&client) {
                    s.subs.retain(|(f, o)| {
                        !(f == &filter && o.shared_group().map(|g| g.to_string()) == group)
                    });
                }
            }
            Record::Msg {
                seq,
                from,
                publish,
                targets,
            } => {
                for t in &targets {
                    self.pending.entry(t.clone()).or_default().push_back(seq);
                }
                self.msgs.insert(
                    seq,
                    Stored {
                        from,
                        publish,
                        refs: targets.len(),
                    },
                );
                self.next_seq = self.next_seq.max(seq + 1);
            }
            Record::Done { target, seq } => {
                if let Some(q) = self.pending.get_mut(&target) {
                    if let Some(i) = q.iter().position(|s| *s == seq) {
                        q.remove(i);
                        if q.is_empty() {
                            self.pending.remove(&target);
                        }
                        self.release(seq);
                    }
                }
            }
            Record::Retain { topic, msg } => match msg {
                Some(m) => {
                    self.retained.insert(topic, m);
                }
                None => {
                    self.retained.remove(&topic);
                }
            },
        }
    }

    /// The targets a publish from `publisher` must reach, from the persistent sessions'
    /// subscriptions.
    fn targets(&self, publisher: &str, p: &Publish) -> Vec<Target> {
        let mut out: Vec<Target> = Vec::new();
        if p.qos == QoS::AtMostOnce {
            return out;
        }
        for (client, s) in &self.sessions {
            for (filter, opts) in &s.subs {
                if opts.qos() == QoS::AtMostOnce
                    || (opts.no_local() == Some(true) && client == publisher)
                    || !filter_matches(filter, &p.topic)
                {
                    continue;
                }
                let t = match opts.shared_group() {
                    Some(g) => Target::Group {
                        group: g.to_string(),
                        filter: filter.clone(),
                    },
                    None => Target::Client(client.clone()),
                };
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
        out
    }

    /// The undone message a delivery of `p` to `client` was: the oldest with the same topic
    /// and payload for the client itself, else for a shared group the client's session is a
    /// member of whose filter matches. (Two undone messages with the same topic and payload are
    /// interchangeable.) Another client's acknowledgement settles nothing of a group's: the
    /// group's message may not have reached any member yet.
    fn find(&self, client: &str, p: &Publish) -> Option<(Target, u64)> {
        let same = |seq: &u64| {
            self.msgs
                .get(seq)
                .is_some_and(|m| m.publish.topic == p.topic && m.publish.payload == p.payload)
        };
        let own = Target::Client(client.to_owned());
        if let Some(seq) = self
            .pending
            .get(&own)
            .and_then(|q| q.iter().find(|s| same(s)))
        {
            return Some((own, *seq));
        }
        let subs = &self.sessions.get(client)?.subs;
        let member = |group: &str, filter: &str| {
            subs.iter().any(|(f, o)| {
                f == filter
                    && o.shared_group()
                        .is_some_and(|g| g.as_ref() as &str == group)
            })
        };
        self.pending.iter().find_map(|(t, q)| match t {
            Target::Group { group, filter }
                if member(group, filter) && filter_matches(filter, &p.topic) =>
            {
                q.iter().find(|s| same(s)).map(|s| (t.clone(), *s))
            }
            _ => None,
        })
    }

    /// Records that rebuild this state, in a new segment's snapshot.
    fn snapshot(&self) -> Vec<Record> {
        let mut out = Vec::new();
        for (client, s) in &self.sessions {
            out.push(Record::Session {
                client: client.clone(),
                conn: (*s.conn).clone(),
                created_at: s.created_at,
                fresh: true,
            });
            if let Some(at) = s.disconnected_at {
                out.push(Record::Disconnected {
                    client: client.clone(),
                    at,
                });
            }
            for (filter, opts) in &s.subs {
                out.push(Record::Sub {
                    client: client.clone(),
                    filter: filter.clone(),
                    opts: opts.clone(),
                });
            }
        }
        let mut targets: BTreeMap<u64, Vec<Target>> = BTreeMap::new();
        for (t, q) in &self.pending {
            for seq in q {
                targets.entry(*seq).or_default().push(t.clone());
            }
        }
        for (seq, mut ts) in targets {
            if let Some(m) = self.msgs.get(&seq) {
                ts.sort();
                out.push(Record::Msg {
                    seq,
                    from: m.from.clone(),
                    publish: m.publish.clone(),
                    targets: ts,
                });
            }
        }
        for (topic, (from, publish)) in &self.retained {
            out.push(Record::Retain {
                topic: topic.clone(),
                msg: Some((from.clone(), publish.clone())),
            });
        }
        out
    }
}

/// What [`BrokerState`] counts, for the broker's metrics.
#[derive(Clone)]
pub(super) struct StateMetrics {
    pub sessions: prometheus::IntGauge,
    pub messages: prometheus::IntGauge,
    pub errors: prometheus::IntCounter,
    pub overflow: prometheus::IntCounter,
}

/// Why the state could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("broker.state_dir: {0}")]
    Log(#[from] crate::seglog::Error),
    #[error("broker.state_dir: {path}: record at offset {offset} does not decode ({error}); the directory was written by another version, or is damaged")]
    Decode {
        path: PathBuf,
        offset: u64,
        error: String,
    },
    #[error("broker.state_dir: {}: no segment holds a whole snapshot; move the directory away to start without the saved state", path.display())]
    NoSnapshot { path: PathBuf },
}

struct Inner {
    data: Data,
    dir: SegmentDir,
    writer: SegmentWriter,
    compact_at: u64,
    /// The least `compact_at` after a compaction ([`COMPACT_AT`]).
    compact_min: u64,
    /// Per-target limit of undone messages.
    cap: usize,
    sync_now: bool,
    /// Acknowledgements (`Done` records) applied but not written yet: they go out with the
    /// next record, at the next sync, or when the state is closed (not with `sync_now`).
    deferred: Vec<u8>,
    /// The connection each persistent session last had (not saved): an old connection's
    /// end must not end the session a new one has taken over.
    ids: HashMap<String, Id>,
}

/// The broker's durable state; see the module documentation.
pub(super) struct BrokerState {
    inner: Mutex<Inner>,
    /// The current segment's file, synced by [`BrokerState::sync`] without the lock.
    sync_file: Mutex<Option<File>>,
    format: Format,
    metrics: StateMetrics,
}

impl Drop for BrokerState {
    fn drop(&mut self) {
        // A broker that stops writes its acknowledgements: it will not send those again.
        self.flush_deferred();
    }
}

fn encode(format: &Format, out: &mut Vec<u8>, rec: &Record) -> bool {
    let start = out.len();
    let mut serialized = false;
    let framed = format.encode(out, |e| serialized = e.postcard(rec)).is_ok();
    if framed && !serialized {
        out.truncate(start);
    }
    framed && serialized
}

/// A written buffer, emptied for the next records: it keeps its capacity (no allocation
/// per record) unless a large record made it large.
fn reuse(mut buf: Vec<u8>) -> Vec<u8> {
    if buf.capacity() > 1 << 20 {
        return Vec::new();
    }
    buf.clear();
    buf
}

fn now_ms() -> i64 {
    rmqtt::utils::timestamp_millis()
}

/// The connection's details as kept on disk: without its password or authentication data
/// (a restored session is taken over by a client that authenticates again).
fn without_secrets(conn: &ConnectInfo) -> ConnectInfo {
    let mut c = conn.clone();
    match &mut c {
        ConnectInfo::V3(_, v3) => v3.password = None,
        ConnectInfo::V5(_, v5) => {
            v5.password = None;
            v5.auth_data = None;
        }
    }
    c
}

/// Is a session of this connection kept after its client disconnects?
fn persistent(conn: &ConnectInfo, expiry: Duration) -> bool {
    match conn {
        ConnectInfo::V3(_, c) => !c.clean_session,
        ConnectInfo::V5(..) => !expiry.is_zero(),
    }
}

impl BrokerState {
    /// Open (or create) the state in `dir` and replay it. `max_body`: the largest record
    /// (a publish of the largest packet); `cap`: undone messages kept per subscriber.
    pub(super) fn open(
        dir: &Path,
        max_body: u32,
        cap: usize,
        sync: Duration,
        metrics: StateMetrics,
    ) -> Result<BrokerState, StateError> {
        let format = Format {
            magic: 0x4e58_4253,
            extension: "state",
            max_body,
        };
        let (sdir, segments, recovery) = SegmentDir::open(
            dir,
            Options {
                format,
                verify: Verify::All,
                fsync: true,
            },
        )?;
        if !recovery.is_clean() {
            tracing::warn!(dir = %dir.display(), bytes = recovery.bytes(), "broker state: cut a torn tail (a write the crash interrupted)");
        }
        let mut data = None;
        let mut discard = Vec::new();
        let mut keep = None;
        for seg in segments.iter().rev() {
            if data.is_some() {
                discard.push(seg.base);
                continue;
            }
            match replay(&sdir, seg.base)? {
                Some(d) => {
                    data = Some(d);
                    keep = Some(*seg);
                }
                None => discard.push(seg.base),
            }
        }
        if data.is_none() && segments.iter().any(|s| s.bytes > 0) {
            // Only a segment whose snapshot a crash cut short, and no older one: that can
            // only be the very first one, which holds nothing yet.
            if segments.len() > 1 {
                return Err(StateError::NoSnapshot {
                    path: dir.to_path_buf(),
                });
            }
        }
        let (data, writer, compact_at) = match (data, keep) {
            (Some(d), Some(seg)) => {
                let w = sdir.append_to(seg.base, seg.bytes)?;
                (d, w, COMPACT_AT.max(seg.bytes.saturating_mul(2)))
            }
            _ => {
                let next = segments.last().map_or(0, |s| s.base + 1);
                let mut w = sdir.create(next)?;
                let mut buf = Vec::new();
                encode(&format, &mut buf, &Record::Begin);
                encode(&format, &mut buf, &Record::Ready);
                w.append(&buf)?;
                (Data::default(), w, COMPACT_AT)
            }
        };
        sdir.remove(&discard)?;
        let sync_file = writer.sync_handle()?;
        let state = BrokerState {
            inner: Mutex::new(Inner {
                data,
                dir: sdir,
                writer,
                compact_at,
                compact_min: COMPACT_AT,
                cap,
                sync_now: sync.is_zero(),
                deferred: Vec::new(),
                ids: HashMap::new(),
            }),
            sync_file: Mutex::new(Some(sync_file)),
            format,
            metrics,
        };
        state.update_gauges(&state.lock().data);
        Ok(state)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_gauges(&self, d: &Data) {
        self.metrics.sessions.set(d.sessions.len() as i64);
        self.metrics.messages.set(d.msgs.len() as i64);
    }

    /// Write `recs` and apply them; false (counted) when the write failed, in which case
    /// nothing is applied.
    fn record(&self, inner: &mut Inner, recs: Vec<Record>) -> bool {
        // The acknowledgements waiting go first, in the same write.
        let mut buf = std::mem::take(&mut inner.deferred);
        let waiting = buf.len();
        for r in &recs {
            if !encode(&self.format, &mut buf, r) {
                self.metrics.errors.inc();
                tracing::error!("broker state: a record is over the size limit");
                buf.truncate(waiting);
                inner.deferred = buf;
                return false;
            }
        }
        let written = if inner.sync_now {
            inner.writer.append(&buf)
        } else {
            inner.writer.write(&buf)
        };
        if let Err(e) = written {
            self.metrics.errors.inc();
            tracing::error!(error = %e, "broker state: write failed");
            buf.truncate(waiting);
            inner.deferred = buf;
            return false;
        }
        inner.deferred = reuse(buf);
        for r in recs {
            inner.data.apply(r);
        }
        if inner.writer.len() > inner.compact_at {
            self.compact(inner);
        }
        true
    }

    /// Start a new segment with a snapshot of the state, then delete the older ones.
    fn compact(&self, inner: &mut Inner) {
        let mut buf = Vec::new();
        encode(&self.format, &mut buf, &Record::Begin);
        for r in inner.data.snapshot() {
            encode(&self.format, &mut buf, &r);
        }
        encode(&self.format, &mut buf, &Record::Ready);
        let old = inner.writer.base();
        let res = inner.dir.create(old + 1).and_then(|mut w| {
            w.append(&buf)?;
            Ok(w)
        });
        match res {
            Ok(w) => {
                if let Ok(f) = w.sync_handle() {
                    *self.sync_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
                }
                inner.writer = w;
                inner.compact_at = inner.compact_min.max(buf.len() as u64 * 4);
                if let Err(e) = inner.dir.remove(&[old]) {
                    tracing::warn!(error = %e, "broker state: old segment not deleted");
                }
            }
            Err(e) => {
                self.metrics.errors.inc();
                // Try again after as much more data.
                inner.compact_at = inner.writer.len() + inner.compact_min;
                tracing::error!(error = %e, "broker state: compaction failed");
            }
        }
    }

    /// Write the acknowledgements waiting, if any.
    fn flush_deferred(&self) {
        let mut inner = self.lock();
        if inner.deferred.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut inner.deferred);
        match inner.writer.write(&buf) {
            Ok(()) => buf = reuse(buf),
            Err(e) => {
                self.metrics.errors.inc();
                tracing::error!(error = %e, "broker state: write failed");
            }
        }
        inner.deferred = buf;
    }

    /// Write the acknowledgements waiting and make what was written durable (`fdatasync`);
    /// called every `broker.state_sync`.
    pub(super) fn sync(&self) {
        self.flush_deferred();
        let file = self
            .sync_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|f| f.try_clone().ok());
        if let Some(f) = file {
            if let Err(e) = f.sync_data() {
                self.metrics.errors.inc();
                tracing::error!(error = %e, "broker state: sync failed");
            }
        }
    }

    /// A session was created, or its client connected again.
    pub(super) fn session(&self, s: &Session, conn: &ConnectInfo, fresh: bool) {
        let client = s.id.client_id.to_string();
        let mut inner = self.lock();
        if !persistent(conn, s.fitter.session_expiry_interval(None)) {
            inner.ids.remove(&client);
            if inner.data.sessions.contains_key(&client) {
                self.record(&mut inner, vec![Record::Forget { client }]);
            }
        } else {
            inner.ids.insert(client.clone(), s.id.clone());
            let created_at = s.id.create_time;
            self.record(
                &mut inner,
                vec![Record::Session {
                    client,
                    conn: without_secrets(conn),
                    created_at,
                    fresh,
                }],
            );
        }
        self.update_gauges(&inner.data);
    }

    pub(super) fn disconnected(&self, client: &str) {
        let mut inner = self.lock();
        if inner.data.sessions.contains_key(client) {
            let rec = Record::Disconnected {
                client: client.to_owned(),
                at: now_ms(),
            };
            self.record(&mut inner, vec![rec]);
        }
    }

    /// The session of connection `id` ended.
    pub(super) fn terminated(&self, id: &Id) {
        let client = &*id.client_id;
        if self.lock().ids.get(client).is_some_and(|cur| cur != id) {
            return;
        }
        self.forget(client);
    }

    fn forget(&self, client: &str) {
        let mut inner = self.lock();
        inner.ids.remove(client);
        if inner.data.sessions.contains_key(client) {
            let rec = Record::Forget {
                client: client.to_owned(),
            };
            self.record(&mut inner, vec![rec]);
            self.update_gauges(&inner.data);
        }
    }

    pub(super) fn subscribed(&self, client: &str, filter: &str, opts: &SubscriptionOptions) {
        let mut inner = self.lock();
        if inner.data.sessions.contains_key(client) {
            let rec = Record::Sub {
                client: client.to_owned(),
                filter: filter.to_owned(),
                opts: opts.clone(),
            };
            self.record(&mut inner, vec![rec]);
        }
    }

    pub(super) fn unsubscribed(&self, client: &str, filter: &str, group: Option<&str>) {
        let mut inner = self.lock();
        if inner.data.sessions.contains_key(client) {
            let rec = Record::Unsub {
                client: client.to_owned(),
                filter: filter.to_owned(),
                group: group.map(str::to_owned),
            };
            self.record(&mut inner, vec![rec]);
        }
    }

    /// A publish the broker is about to route (and acknowledge). False when it could not be
    /// made durable: it must then be refused.
    pub(super) fn publish(&self, from: &From, publisher: &str, p: &Publish) -> bool {
        let mut inner = self.lock();
        let targets = inner.data.targets(publisher, p);
        let mut recs = Vec::new();
        if p.retain {
            recs.push(Record::Retain {
                topic: p.topic.to_string(),
                msg: (!p.payload.is_empty()).then(|| (from.clone(), p.clone())),
            });
        }
        if !targets.is_empty() {
            for t in &targets {
                let full = inner.data.pending.get(t).filter(|q| q.len() >= inner.cap);
                if let Some(q) = full {
                    // The broker's own queue for it is smaller: this one it has dropped
                    // already without saying which; let the oldest go, counted.
                    if let Some(seq) = q.front() {
                        recs.push(Record::Done {
                            target: t.clone(),
                            seq: *seq,
                        });
                        self.metrics.overflow.inc();
                    }
                }
            }
            let seq = inner.data.next_seq;
            recs.push(Record::Msg {
                seq,
                from: from.clone(),
                publish: p.clone(),
                targets,
            });
        }
        if recs.is_empty() {
            return true;
        }
        let ok = self.record(&mut inner, recs);
        self.update_gauges(&inner.data);
        ok
    }

    /// `client` acknowledged `p`, or the broker dropped it for `client`.
    pub(super) fn settled(&self, client: &str, p: &Publish) {
        if p.qos == QoS::AtMostOnce {
            return;
        }
        let mut inner = self.lock();
        if inner.data.pending.is_empty() {
            return;
        }
        if let Some((target, seq)) = inner.data.find(client, p) {
            let done = Record::Done { target, seq };
            if inner.sync_now {
                self.record(&mut inner, vec![done]);
            } else {
                // Written with the next record or at the next sync, not on its own: one
                // write per message instead of two. Lost in a crash, it only makes the
                // broker send the message again, which QoS 1 allows (docs/broker.md).
                let mut buf = std::mem::take(&mut inner.deferred);
                if encode(&self.format, &mut buf, &done) {
                    inner.data.apply(done);
                }
                inner.deferred = buf;
            }
            self.update_gauges(&inner.data);
            let full = inner.deferred.len() >= DEFERRED_MAX;
            drop(inner);
            if full {
                self.flush_deferred();
            }
        }
    }

    /// Put the saved sessions (with their subscriptions and undone messages, oldest first)
    /// and retained messages back into rmqtt. Runs before the listeners accept anyone.
    pub(super) async fn restore(&self, scx: &ServerContext) -> Restored {
        struct Plan {
            client: String,
            conn: Arc<ConnectInfo>,
            created_at: i64,
            disconnected_at: Option<i64>,
            subs: Vec<(String, SubscriptionOptions)>,
            queue: Vec<(From, Publish)>,
        }
        let (plans, retained) = {
            let inner = self.lock();
            let d = &inner.data;
            let mut groups_taken: Vec<&Target> = Vec::new();
            let mut plans = Vec::new();
            for (client, s) in &d.sessions {
                let mut seqs: Vec<u64> = d
                    .pending
                    .get(&Target::Client(client.clone()))
                    .map(|q| q.iter().copied().collect())
                    .unwrap_or_default();
                // A shared group's undone messages go to its first member.
                for (t, q) in &d.pending {
                    if let Target::Group { group, filter } = t {
                        let member = s.subs.iter().any(|(f, o)| {
                            f == filter && o.shared_group().is_some_and(|g| &**g == group)
                        });
                        if member && !groups_taken.contains(&t) {
                            groups_taken.push(t);
                            seqs.extend(q.iter().copied());
                        }
                    }
                }
                seqs.sort_unstable();
                seqs.dedup();
                let queue = seqs
                    .iter()
                    .filter_map(|seq| d.msgs.get(seq))
                    .map(|m| (m.from.clone(), m.publish.clone()))
                    .collect();
                plans.push(Plan {
                    client: client.clone(),
                    conn: s.conn.clone(),
                    created_at: s.created_at,
                    disconnected_at: s.disconnected_at,
                    subs: s.subs.clone(),
                    queue,
                });
            }
            let retained: Vec<(String, From, Publish)> = d
                .retained
                .iter()
                .map(|(t, (f, p))| (t.clone(), f.clone(), p.clone()))
                .collect();
            (plans, retained)
        };

        let mut out = Restored::default();
        for (topic, from, publish) in retained {
            out.retained.push((topic.clone(), publish.payload.len()));
            let r = Retain {
                msg_id: None,
                from,
                publish,
            };
            if let Err(e) = scx
                .extends
                .retain()
                .await
                .set(&TopicName::from(topic), r, None)
                .await
            {
                tracing::error!(error = %e, "broker state: a retained message was not restored");
            }
        }

        let mut expired = Vec::new();
        for plan in plans {
            let id = plan.conn.id().clone();
            let Some(listen_cfg) = scx.listen_cfgs.get(&id.lid).map(|c| c.value().clone()) else {
                tracing::warn!(client_id = %plan.client, "broker state: the session's listener is gone; session dropped");
                expired.push(plan.client);
                continue;
            };
            let fitter = scx.extends.fitter_mgr().await.create(
                plan.conn.clone(),
                id.clone(),
                listen_cfg.clone(),
            );
            let expiry = fitter.session_expiry_interval(None);
            let since = plan
                .disconnected_at
                .map_or(0, |at| now_ms().saturating_sub(at).max(0) as u64);
            let Some(left) = expiry.checked_sub(Duration::from_millis(since)) else {
                expired.push(plan.client);
                continue;
            };
            if left.is_zero() {
                expired.push(plan.client);
                continue;
            }
            let mut map = SessionSubMap::default();
            for (f, o) in &plan.subs {
                map.insert(TopicFilter::from(f.clone()), o.clone());
            }
            let session = match Session::new(
                id.clone(),
                scx.clone(),
                fitter.max_mqueue_len(),
                listen_cfg,
                fitter.clone(),
                None,
                fitter.max_inflight(),
                plan.created_at,
                plan.conn.clone(),
                false,
                false,
                false,
                plan.created_at,
                SessionSubs::from(map),
                Some(DisconnectInfo::new(
                    plan.disconnected_at.unwrap_or_else(now_ms),
                )),
                None,
            )
            .await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(client_id = %plan.client, error = %e, "broker state: session not restored");
                    continue;
                }
            };
            let queued = plan.queue.len();
            let mut refused = 0usize;
            for item in plan.queue {
                if session.deliver_queue().push(item).is_err() {
                    refused += 1;
                }
            }
            if refused > 0 {
                self.metrics.overflow.inc_by(refused as u64);
                tracing::warn!(client_id = %plan.client, refused, "broker state: the session's queue is smaller than what it had undone");
            }
            let tx = match SessionState::offline_restart(session.clone(), left).await {
                Ok(tx) => tx,
                Err(e) => {
                    tracing::error!(client_id = %plan.client, error = %e, "broker state: session not restored");
                    continue;
                }
            };
            let mut entry = scx.extends.shared().await.entry(id.clone());
            if let Err(e) = entry.set(session, tx).await {
                tracing::error!(client_id = %plan.client, error = %e, "broker state: session not restored");
                continue;
            }
            for (f, o) in &plan.subs {
                if let Err(e) = scx
                    .extends
                    .router()
                    .await
                    .add(f, id.clone(), o.clone())
                    .await
                {
                    tracing::error!(client_id = %plan.client, filter = %f, error = %e, "broker state: subscription not restored");
                }
            }
            tracing::info!(client_id = %plan.client, subscriptions = plan.subs.len(), queued, "broker state: session restored");
            out.sessions.push(plan.client);
        }
        for client in expired {
            self.forget(&client);
        }
        out
    }
}

/// What [`BrokerState::restore`] put back.
#[derive(Default)]
pub(super) struct Restored {
    /// Client ids of the sessions.
    pub sessions: Vec<String>,
    /// Retained topics and their payload sizes.
    pub retained: Vec<(String, usize)>,
}

/// The state a segment holds, if its snapshot is whole.
fn replay(dir: &SegmentDir, base: u64) -> Result<Option<Data>, StateError> {
    let mut r = dir.reader(base, 0)?;
    let mut data = Data::default();
    let mut ready = false;
    let mut first = true;
    loop {
        let offset = r.offset();
        let frame = match r.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(e.into()),
        };
        let bad = |error: String| StateError::Decode {
            path: dir.segment_path(base),
            offset,
            error,
        };
        let mut dec = crate::seglog::Decoder::new(frame);
        let body = dec.bytes().map_err(|e| bad(e.to_string()))?;
        let rec: Record = postcard::from_bytes(body).map_err(|e| bad(e.to_string()))?;
        if first {
            if !matches!(rec, Record::Begin) {
                return Err(bad("the segment does not start with a snapshot".into()));
            }
            first = false;
            continue;
        }
        if matches!(rec, Record::Ready) {
            ready = true;
        }
        data.apply(rec);
    }
    Ok(ready.then_some(data))
}

#[cfg(test)]
mod tests;
