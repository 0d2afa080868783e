//! Batcher and COPY writers: frames from the WAL become batches (closed on size or time),
//! and a pool of writers stores each batch in one transaction with binary COPY.
//!
//! * **Exactly once**: `points` has a unique key on `(tag_id, time)`. The fast path COPYs a
//!   batch straight into `points`; if that hits the key (only after a crash: WAL replay or a
//!   broker redelivery), the batch goes again through a temporary staging table and
//!   `INSERT .. ON CONFLICT DO NOTHING`, and what was already there is counted in
//!   `nexus_ingest_points_duplicate_total`.
//! * **Failures**: a batch that fails for a connection or server reason stays with its writer
//!   and is retried with backoff on a new connection; the breaker on the database opens after
//!   repeated failures so writers wait instead of hammering it. Rows the database refuses as
//!   data (class 22/23 errors) are written one by one and the refused ones moved to
//!   `ingest_rejects` with the server's message, so one bad row cannot stall the log.
//! * **Commit position**: batches finish out of order; [`Tracker`] moves the WAL's commit
//!   position to the first frame not yet committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::pin_mut;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use nexus_common::bounded::{text_weight, BoundedMap, MapStats};
use nexus_common::breaker::CircuitBreaker;
use nexus_common::metrics::{self, MetricError};

use crate::model::{approx_bytes, Frame, Point, Reject};
use crate::wal::Wal;

/// A batch: whole frames `first_id..=last_id`.
#[derive(Debug, Default)]
pub struct Batch {
    pub first_id: u64,
    pub last_id: u64,
    pub points: Vec<Point>,
    pub rejects: Vec<Reject>,
}

#[derive(Clone)]
pub struct WriterMetrics {
    pub written: IntCounter,
    pub duplicates: IntCounter,
    pub conflicts: IntCounter,
    pub rejects_stored: IntCounter,
    pub refused: IntCounter,
    pub batches: IntCounter,
    pub batch_rows: Histogram,
    pub batch_bytes: Histogram,
    pub batch_seconds: Histogram,
    pub errors: IntCounterVec,
    pub db_up: IntGauge,
}

/// The kinds of failed write in `nexus_ingest_write_errors_total{kind}`.
pub const WRITE_ERROR_KINDS: [&str; 3] = ["connection", "server", "data"];

impl WriterMetrics {
    /// Register the metrics in `registry`, with a series at 0 for every kind of write error.
    pub fn new(r: &Registry) -> Result<WriterMetrics, MetricError> {
        let m = WriterMetrics {
            written: metrics::counter(
                r,
                "nexus_ingest_points_written_total",
                "Points committed to the database",
            )?,
            duplicates: metrics::counter(
                r,
                "nexus_ingest_points_duplicate_total",
                "Points already stored (WAL replay or broker redelivery after a crash), not stored again",
            )?,
            conflicts: metrics::counter(
                r,
                "nexus_ingest_points_conflict_total",
                "Points with the topic and time of a stored point but another value or quality, moved to ingest_rejects",
            )?,
            rejects_stored: metrics::counter(
                r,
                "nexus_ingest_rejects_stored_total",
                "Rejected messages written to ingest_rejects",
            )?,
            refused: metrics::counter(
                r,
                "nexus_ingest_points_refused_total",
                "Points the database refused as data, moved to ingest_rejects",
            )?,
            batches: metrics::counter(r, "nexus_ingest_batches_total", "Batches committed")?,
            batch_rows: metrics::histogram(
                r,
                "nexus_ingest_batch_rows",
                "Rows per committed batch",
                vec![10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 20000.0, 50000.0],
            )?,
            batch_bytes: metrics::histogram(
                r,
                "nexus_ingest_batch_bytes",
                "Approximate bytes per committed batch",
                // 1 KiB to 64 MiB, times 4 each.
                (0..9).map(|i| 1024.0 * 4f64.powi(i)).collect(),
            )?,
            batch_seconds: metrics::histogram(
                r,
                "nexus_ingest_batch_seconds",
                "Time to commit a batch",
                vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0],
            )?,
            errors: metrics::counter_vec(
                r,
                "nexus_ingest_write_errors_total",
                "Failed batch writes by kind (connection, server, data)",
                &["kind"],
            )?,
            db_up: metrics::gauge(r, "nexus_ingest_db_up", "1 while the database takes writes")?,
        };
        for kind in WRITE_ERROR_KINDS {
            m.errors.with_label_values(&[kind]);
        }
        Ok(m)
    }
}

/// Tag ids by topic, shared by the writers: a cache of the `tags` table holding
/// `ingestion.max_tags_cached` units (a topic counts once per started 256 bytes). The topic
/// written least recently is evicted for a new one (counted), and read from the table again
/// when it comes back; a batch works on the ids it resolved, so an eviction by another writer
/// in the meantime changes nothing.
pub struct TagCache {
    ids: Mutex<BoundedMap<String, i32>>,
    stats: MapStats,
}

impl TagCache {
    pub fn new(stats: MapStats) -> TagCache {
        TagCache {
            ids: Mutex::new(BoundedMap::new(stats.capacity())),
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedMap<String, i32>> {
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The tag id of each of `points`, in order: from the cache, else from the `tags` table,
    /// where new topics are inserted first.
    async fn resolve(
        &self,
        client: &Client,
        points: &[Point],
    ) -> Result<Vec<i32>, tokio_postgres::Error> {
        let mut ids: Vec<Option<i32>> = {
            let mut cache = self.lock();
            points
                .iter()
                .map(|p| cache.get(p.topic.as_str()).copied())
                .collect()
        };
        let mut missing: Vec<&str> = points
            .iter()
            .zip(&ids)
            .filter(|(_, id)| id.is_none())
            .map(|(p, _)| p.topic.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(ids.into_iter().map(|id| id.unwrap_or(0)).collect());
        }
        missing.sort_unstable();
        missing.dedup();
        let mut found: HashMap<String, i32> = HashMap::with_capacity(missing.len());
        for chunk in missing.chunks(10_000) {
            client
                .execute(
                    "INSERT INTO tags (topic) SELECT unnest($1::text[]) ON CONFLICT (topic) DO NOTHING",
                    &[&chunk],
                )
                .await?;
            let rows = client
                .query(
                    "SELECT id, topic FROM tags WHERE topic = ANY($1)",
                    &[&chunk],
                )
                .await?;
            found.extend(rows.into_iter().map(|r| (r.get(1), r.get(0))));
        }
        {
            let mut cache = self.lock();
            let mut evicted = 0;
            for (topic, id) in &found {
                let weight = text_weight(topic.len());
                match cache.insert(topic.clone(), *id, weight) {
                    Ok(s) => evicted += s.evicted.len(),
                    // Longer than the whole cache: read from the table each time.
                    Err(_) => self.stats.refused(),
                }
            }
            self.stats.evicted(evicted);
            self.stats.size(&cache);
        }
        for (id, p) in ids.iter_mut().zip(points) {
            if id.is_none() {
                *id = found.get(&p.topic).copied();
            }
        }
        // Every topic was inserted just before; one without an id would be a bug, not data.
        Ok(ids.into_iter().map(|id| id.unwrap_or(0)).collect())
    }

    /// The cached id of a topic, if known (its place in the cache unchanged).
    pub fn id(&self, topic: &str) -> Option<i32> {
        self.lock().peek(topic).copied()
    }

    /// Topics cached now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Moves the WAL's commit position as batches finish, in any order.
pub struct Tracker {
    state: Mutex<(u64, BTreeMap<u64, u64>)>,
    wal: Wal,
}

impl Tracker {
    pub fn new(wal: Wal, start: u64) -> Tracker {
        Tracker {
            state: Mutex::new((start, BTreeMap::new())),
            wal,
        }
    }

    pub fn done(&self, first: u64, last: u64) {
        let below = {
            let mut st = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.1.insert(first, last);
            loop {
                let lw = st.0;
                match st.1.remove(&lw) {
                    Some(l) => st.0 = l + 1,
                    None => break,
                }
            }
            st.0
        };
        self.wal.commit_below(below);
    }
}

/// Gather frames into batches: a batch closes at `batch_size` rows or `batch_timeout` after
/// its first frame. Ends when `frames` closes or on `token`.
pub async fn batcher(
    mut frames: mpsc::Receiver<Frame>,
    batches: mpsc::Sender<Batch>,
    batch_size: usize,
    batch_timeout: Duration,
    token: CancellationToken,
) {
    enum Next {
        Frame(Frame),
        Deadline,
    }
    let mut cur: Option<Batch> = None;
    let mut deadline = tokio::time::Instant::now();
    loop {
        let next = tokio::select! {
            f = frames.recv() => match f { Some(f) => Next::Frame(f), None => break },
            _ = tokio::time::sleep_until(deadline), if cur.is_some() => Next::Deadline,
            _ = token.cancelled() => return,
        };
        if let Next::Frame(frame) = next {
            let b = cur.get_or_insert_with(|| {
                deadline = tokio::time::Instant::now() + batch_timeout;
                Batch {
                    first_id: frame.first_id,
                    ..Batch::default()
                }
            });
            b.last_id = frame.last_id;
            b.points.extend(frame.points);
            b.rejects.extend(frame.rejects);
            if b.points.len() + b.rejects.len() < batch_size {
                continue;
            }
        }
        if let Some(b) = cur.take() {
            tokio::select! {
                r = batches.send(b) => if r.is_err() { return },
                _ = token.cancelled() => return,
            }
        }
    }
    // The WAL reader ended: hand on what is gathered.
    if let Some(b) = cur.take() {
        let _ = batches.send(b).await;
    }
}

fn to_time(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

/// How a failed write is handled.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The connection is gone or the server is unhappy: retry the batch later.
    Retry,
    /// The database refuses a row's data: go row by row.
    Data,
}

fn classify(e: &tokio_postgres::Error) -> Failure {
    match e.code() {
        Some(c) => {
            let class = &c.code()[..2];
            if (class == "22" || class == "23") && *c != SqlState::UNIQUE_VIOLATION {
                Failure::Data
            } else {
                Failure::Retry
            }
        }
        None => Failure::Retry,
    }
}

/// The columns of `points` a writer fills, in COPY order, and their types (public for the
/// ingestion benchmark's raw COPY baseline, which writes the same rows).
pub const COLUMNS: &str = "time, tag_id, value, value_str, quality, value_type, unit, source_time";
pub const COPY_TYPES: [Type; 8] = [
    Type::TIMESTAMPTZ,
    Type::INT4,
    Type::FLOAT8,
    Type::TEXT,
    Type::INT2,
    Type::INT2,
    Type::TEXT,
    Type::TIMESTAMPTZ,
];

/// A point's row (after its time and tag id): value, value_str, quality, value_type, unit,
/// source_time.
struct Row<'a> {
    time: SystemTime,
    value_type: Option<i16>,
    source_time: Option<SystemTime>,
    p: &'a Point,
}

impl<'a> Row<'a> {
    fn of(p: &'a Point) -> Row<'a> {
        Row {
            time: to_time(p.ts_us),
            value_type: p.value_type.map(|t| t.code()),
            source_time: p.source_ts_us.map(to_time),
            p,
        }
    }

    fn params<'b>(&'b self, id: &'b i32) -> [&'b (dyn ToSql + Sync); 8] {
        [
            &self.time,
            id,
            &self.p.value,
            &self.p.value_str,
            &self.p.quality,
            &self.value_type,
            &self.p.unit,
            &self.source_time,
        ]
    }
}

/// COPY `points` into `table`, with `ids[i]` the tag id of `points[i]`.
async fn copy_points(
    client: &Client,
    table: &str,
    ids: &[i32],
    points: &[Point],
) -> Result<(), tokio_postgres::Error> {
    let sink = client
        .copy_in(&format!(
            "COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    pin_mut!(writer);
    for (p, id) in points.iter().zip(ids) {
        writer.as_mut().write(&Row::of(p).params(id)).await?;
    }
    writer.finish().await?;
    Ok(())
}

async fn insert_rejects(client: &Client, rejects: &[Reject]) -> Result<(), tokio_postgres::Error> {
    if rejects.is_empty() {
        return Ok(());
    }
    let times: Vec<SystemTime> = rejects.iter().map(|r| to_time(r.ts_us)).collect();
    let topics: Vec<&str> = rejects.iter().map(|r| r.topic.as_str()).collect();
    let reasons: Vec<&str> = rejects.iter().map(|r| r.reason.as_str()).collect();
    let payloads: Vec<&[u8]> = rejects.iter().map(|r| r.payload.as_slice()).collect();
    client
        .execute(
            "INSERT INTO ingest_rejects (time, topic, reason, payload)
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::bytea[])",
            &[&times, &topics, &reasons, &payloads],
        )
        .await?;
    Ok(())
}

/// One database connection writing batches.
struct Conn {
    client: Client,
    staging: bool,
    /// Opened for the batch at hand (a failure then is the database's, not a stale link's).
    fresh: bool,
}

/// The reason in `ingest_rejects` of a point whose topic and time are stored with another
/// value.
pub const CONFLICT_REASON: &str = "conflict: another value is stored for this topic and time";

/// Write `batch` in one transaction; returns (written, duplicates). Points that conflict with
/// a stored one (same topic and time, another value) are moved to `ingest_rejects` and counted
/// in `conflicts_seen`.
async fn write_batch(
    conn: &mut Conn,
    tags: &TagCache,
    batch: &Batch,
    conflicts_seen: &IntCounter,
) -> Result<(u64, u64), tokio_postgres::Error> {
    let ids = tags.resolve(&conn.client, &batch.points).await?;
    let client = &conn.client;
    client.batch_execute("BEGIN").await?;
    let fast = async {
        copy_points(client, "points", &ids, &batch.points).await?;
        insert_rejects(client, &batch.rejects).await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    match fast {
        Ok(()) => return Ok((batch.points.len() as u64, 0)),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            if e.code() != Some(&SqlState::UNIQUE_VIOLATION) {
                return Err(e);
            }
        }
    }
    // Some rows are already stored: stage and insert what is new.
    if !conn.staging {
        client
            .batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS points_stage (LIKE points) ON COMMIT DELETE ROWS",
            )
            .await?;
        conn.staging = true;
    }
    client.batch_execute("BEGIN").await?;
    let slow = async {
        copy_points(client, "points_stage", &ids, &batch.points).await?;
        let n = client
            .execute(
                &format!(
                    // Duplicates are filtered out before the insert (the first of a batch
                    // wins, as with the fast path): on TimescaleDB before 2.18.1 an insert
                    // with ON CONFLICT DO NOTHING into a compressed chunk loses the new rows
                    // of a statement that also meets a conflict. The ON CONFLICT stays for
                    // a row another writer commits meanwhile.
                    "INSERT INTO points ({COLUMNS})
                     SELECT DISTINCT ON (tag_id, time) {COLUMNS} FROM points_stage s
                     WHERE NOT EXISTS (SELECT 1 FROM points p
                                       WHERE p.tag_id = s.tag_id AND p.time = s.time)
                     ORDER BY tag_id, time, ctid
                     ON CONFLICT (tag_id, time) DO NOTHING"
                ),
                &[],
            )
            .await?;
        // A point with the topic and time of a stored one but another value or quality is
        // no repeat of it: it is kept in ingest_rejects and counted, not dropped as one.
        let conflicts = client
            .execute(
                "INSERT INTO ingest_rejects (time, topic, reason, payload)
                 SELECT s.time, t.topic, $1,
                        convert_to(json_build_object('v', coalesce(to_jsonb(s.value), to_jsonb(s.value_str)),
                                                     'quality', s.quality)::text, 'UTF8')
                 FROM points_stage s
                 JOIN points p ON p.tag_id = s.tag_id AND p.time = s.time
                 JOIN tags t ON t.id = s.tag_id
                 WHERE (p.value, p.value_str, p.quality) IS DISTINCT FROM (s.value, s.value_str, s.quality)",
                &[&CONFLICT_REASON],
            )
            .await?;
        insert_rejects(client, &batch.rejects).await?;
        client.batch_execute("COMMIT").await?;
        Ok::<(u64, u64), tokio_postgres::Error>((n, conflicts))
    }
    .await;
    match slow {
        Ok((n, conflicts)) => {
            conflicts_seen.inc_by(conflicts);
            Ok((n, batch.points.len() as u64 - n - conflicts))
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Row by row, for a batch the database refused as data: refused rows go to the
/// dead-letter table with the server's reason. Each statement is idempotent.
async fn write_rows(
    conn: &Conn,
    tags: &TagCache,
    batch: &Batch,
    m: &WriterMetrics,
) -> Result<(), tokio_postgres::Error> {
    let client = &conn.client;
    let ids = tags.resolve(client, &batch.points).await?;
    let stmt = client
        .prepare(&format!(
            "INSERT INTO points ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (tag_id, time) DO NOTHING"
        ))
        .await?;
    let mut refused = Vec::new();
    for (p, id) in batch.points.iter().zip(&ids) {
        match client.execute(&stmt, &Row::of(p).params(id)).await {
            Ok(1) => m.written.inc(),
            Ok(_) => m.duplicates.inc(),
            Err(e) if classify(&e) == Failure::Data => {
                m.refused.inc();
                refused.push(Reject {
                    ts_us: p.ts_us,
                    topic: p.topic.clone(),
                    reason: format!(
                        "database_refused: {}",
                        e.as_db_error()
                            .map_or_else(|| e.to_string(), |d| d.message().to_owned())
                    ),
                    payload: format!("{p:?}").into_bytes(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    refused.extend(batch.rejects.iter().cloned());
    insert_rejects(client, &refused).await?;
    m.rejects_stored.inc_by(refused.len() as u64);
    Ok(())
}

/// Everything a writer needs.
pub struct WriterCtx {
    pub db: nexus_common::pg::Database,
    pub tags: Arc<TagCache>,
    pub tracker: Arc<Tracker>,
    pub breaker: Arc<CircuitBreaker>,
    pub metrics: WriterMetrics,
    /// Signalled when a write succeeds, so writers waiting out a backoff try again at once
    /// when the database is back.
    pub recovered: tokio::sync::Notify,
}

/// A writer: takes batches until `batches` closes or `token` is cancelled; a batch it
/// holds is retried until it is committed (or the token ends the run, leaving it in the WAL).
pub async fn writer(
    id: usize,
    ctx: Arc<WriterCtx>,
    batches: Arc<tokio::sync::Mutex<mpsc::Receiver<Batch>>>,
    token: CancellationToken,
) {
    let mut conn: Option<Conn> = None;
    let mut attempt = 0u32;
    loop {
        let batch = {
            let mut rx = batches.lock().await;
            tokio::select! {
                b = rx.recv() => match b { Some(b) => b, None => return },
                _ = token.cancelled() => return,
            }
        };
        let started = Instant::now();
        loop {
            if token.is_cancelled() {
                return;
            }
            let permit = match ctx.breaker.try_acquire() {
                Ok(p) => p,
                Err(open) => {
                    tokio::select! {
                        _ = tokio::time::sleep(open.retry_in.max(Duration::from_millis(50))) => continue,
                        _ = ctx.recovered.notified() => continue,
                        _ = token.cancelled() => return,
                    }
                }
            };
            if conn.is_none() {
                match nexus_common::pg::connect(&ctx.db).await {
                    Ok((client, _task)) => {
                        conn = Some(Conn {
                            client,
                            staging: false,
                            fresh: true,
                        })
                    }
                    Err(e) => {
                        permit.failure();
                        ctx.metrics.db_up.set(0);
                        ctx.metrics.errors.with_label_values(&["connection"]).inc();
                        if attempt == 0 {
                            tracing::warn!(writer = id, database = %ctx.db.url, error = %e, "database unreachable; points wait in the WAL");
                        }
                        attempt += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(nexus_common::supervise::backoff(Duration::from_millis(100), Duration::from_secs(5), attempt)) => continue,
                            _ = ctx.recovered.notified() => continue,
                            _ = token.cancelled() => return,
                        }
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let result = write_batch(c, &ctx.tags, &batch, &ctx.metrics.conflicts).await;
            match result {
                Ok((written, dup)) => {
                    c.fresh = false;
                    permit.success();
                    ctx.metrics.written.inc_by(written);
                    ctx.metrics.duplicates.inc_by(dup);
                    ctx.metrics
                        .rejects_stored
                        .inc_by(batch.rejects.len() as u64);
                    break;
                }
                Err(e) if classify(&e) == Failure::Data => {
                    permit.success();
                    ctx.metrics.errors.with_label_values(&["data"]).inc();
                    tracing::warn!(writer = id, error = %e, rows = batch.points.len(), "the database refused a batch as data; writing it row by row");
                    if let Err(e) = write_rows(c, &ctx.tags, &batch, &ctx.metrics).await {
                        tracing::warn!(writer = id, error = %e, "row-by-row write failed; retrying");
                        conn = None;
                        continue;
                    }
                    break;
                }
                Err(e) => {
                    permit.failure();
                    let stale = !c.fresh;
                    let kind = if e.is_closed() || e.code().is_none() {
                        conn = None;
                        "connection"
                    } else {
                        "server"
                    };
                    ctx.metrics.errors.with_label_values(&[kind]).inc();
                    if stale && kind == "connection" {
                        // A link from before an outage: try a new one at once.
                        continue;
                    }
                    ctx.metrics.db_up.set(0);
                    if attempt == 0 {
                        tracing::warn!(writer = id, error = %e, rows = batch.points.len(), "batch not written; it stays in the WAL and is retried");
                    }
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(nexus_common::supervise::backoff(Duration::from_millis(100), Duration::from_secs(5), attempt)) => {}
                        _ = ctx.recovered.notified() => {}
                        _ = token.cancelled() => return,
                    }
                }
            }
        }
        if attempt > 0 {
            tracing::info!(writer = id, "database writes resumed");
            ctx.recovered.notify_waiters();
        }
        attempt = 0;
        ctx.metrics.db_up.set(1);
        ctx.metrics.batches.inc();
        ctx.metrics
            .batch_rows
            .observe((batch.points.len() + batch.rejects.len()) as f64);
        ctx.metrics
            .batch_bytes
            .observe(approx_bytes(&batch.points, &batch.rejects) as f64);
        ctx.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        ctx.tracker.done(batch.first_id, batch.last_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_close_on_size_and_on_time() {
        let (ftx, frx) = mpsc::channel(16);
        let (btx, mut brx) = mpsc::channel(16);
        let token = CancellationToken::new();
        tokio::spawn(batcher(
            frx,
            btx,
            3,
            Duration::from_millis(50),
            token.clone(),
        ));
        let frame = |id: u64, n: usize| Frame {
            first_id: id,
            last_id: id,
            points: (0..n)
                .map(|i| Point::new("t", i as i64, None, 192))
                .collect(),
            ..Frame::default()
        };
        ftx.send(frame(1, 2)).await.unwrap();
        ftx.send(frame(2, 2)).await.unwrap();
        let b = brx.recv().await.unwrap();
        assert_eq!((b.first_id, b.last_id, b.points.len()), (1, 2, 4));
        let t = Instant::now();
        ftx.send(frame(3, 1)).await.unwrap();
        let b = brx.recv().await.unwrap();
        assert_eq!((b.first_id, b.last_id, b.points.len()), (3, 3, 1));
        assert!(t.elapsed() >= Duration::from_millis(45));
        token.cancel();
    }

    #[test]
    fn times_convert() {
        assert_eq!(to_time(1_000_000), UNIX_EPOCH + Duration::from_secs(1));
    }
}
