//! The history API on the ingestion HTTP port (default :7000):
//!
//! * `GET /api/v1/history?topic=T&from=F&to=T&agg=auto|raw|1m|1h|1d`: the points of one topic,
//!   raw or aggregated (`avg, min, max, count, first, last` per bucket). `from`/`to` take RFC
//!   3339 in UTC (`2026-01-02T03:04:05Z`), unix milliseconds, `now` or `now-<duration>`
//!   (default: the last hour). `auto` returns raw points when they fit in
//!   `ingestion.history_max_points`, else the finest aggregate that fits.
//! * `GET /api/v1/latest?filter=F`: the newest point of every stored topic matching the MQTT
//!   filter `F` (`+` and `#` wildcards).
//!
//! Both need the `viewer` role (anonymous clients have it where `auth.anonymous` allows them).
//!
//! Parameters are checked and a 400 says which one is wrong and why; times end at
//! 9999-12-31T23:59:59.999Z. Every answer holds at most `ingestion.history_max_points`
//! points (history) or topics (latest) and says `"truncated": true` when there were more;
//! `latest` reads the topic table a page at a time, so a filter matching every topic costs
//! a page of memory, not the table.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nexus_common::auth::http::Routes;
use nexus_common::config::Role;
use serde_json::{json, Value as JsonValue};
use tokio_postgres::{Client, Row};

use nexus_common::domain::{Quality, ValueType};
use nexus_common::pg::Database;
use nexus_common::topic::TopicFilter;

use crate::model::MAX_TOPIC_BYTES;
use crate::schema::Storage;

/// Lazily (re)connected clients for the API's queries: `database.pool_size` of them, taken in
/// turn, so one slow query does not queue every other request behind it.
pub struct Db {
    database: Database,
    clients: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: std::sync::atomic::AtomicUsize,
    pub storage: RwLock<Option<Storage>>,
    max_points: usize,
    /// The ingestion WAL, to tell whether points received are still waiting to be stored.
    wal: std::sync::OnceLock<crate::wal::Wal>,
}

/// A WAL frame waiting longer than this means the writers are behind (the database is away
/// or slow), not just a batch in flight.
const BACKLOG_AFTER_S: f64 = 5.0;

impl Db {
    pub fn new(database: Database, max_points: usize) -> Db {
        Db {
            clients: (0..database.pool_size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
            database,
            storage: RwLock::new(None),
            max_points,
            wal: std::sync::OnceLock::new(),
        }
    }

    /// Answers say `incomplete` (reason `backlog`) while `wal` holds points the writers are
    /// behind with.
    pub fn watch_wal(&self, wal: crate::wal::Wal) {
        let _ = self.wal.set(wal);
    }

    fn backlog(&self) -> bool {
        self.wal
            .get()
            .is_some_and(|w| w.oldest_uncommitted_age() > BACKLOG_AFTER_S)
    }

    pub async fn client(&self) -> Result<Arc<Client>, ApiError> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.clients.len();
        let mut c = self.clients[i].lock().await;
        if let Some(client) = c.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let (client, _task) = nexus_common::pg::connect(&self.database)
            .await
            .map_err(|e| ApiError::unavailable(format!("database unreachable: {e}")))?;
        let client = Arc::new(client);
        *c = Some(client.clone());
        Ok(client)
    }

    fn continuous_aggregates(&self) -> bool {
        self.storage
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|s| s.continuous_aggregates)
    }
}

/// An answer other than 200: its status and the message of its `{"error": ..}` body.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn status(&self) -> StatusCode {
        self.0
    }
    pub fn message(&self) -> &str {
        &self.1
    }
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
    fn unavailable(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, msg.into())
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::unavailable(format!("database error: {e}"))
    }
}

impl From<TimeError> for ApiError {
    fn from(e: TimeError) -> Self {
        ApiError::bad(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub fn routes(db: Arc<Db>) -> Routes {
    Routes::new()
        .get("/api/v1/history", Role::Viewer, history)
        .get("/api/v1/latest", Role::Viewer, latest)
        .with_state(db)
}

fn check_params(q: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    for k in q.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad(format!(
                "unknown parameter {k:?} (expected {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

/// A `from`/`to` parameter that is not a time. The message names the parameter and the forms
/// it takes.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {input:?} {problem}; use RFC 3339 in UTC (2026-01-02T03:04:05Z), unix milliseconds, now or now-<duration> (now-1h)")]
pub struct TimeError {
    pub name: String,
    pub input: String,
    #[source]
    pub problem: TimeProblem,
}

/// What is wrong with a time parameter.
#[derive(Debug, thiserror::Error)]
pub enum TimeProblem {
    #[error("is not a duration ({0})")]
    Duration(#[source] humantime::DurationError),
    #[error("is before 1970")]
    Before1970,
    #[error("is after 9999-12-31T23:59:59.999Z, the latest time the API takes")]
    TooLarge,
    #[error("is not a time ({0})")]
    Time(#[source] humantime::TimestampError),
}

/// The last millisecond `from`/`to` may name: 9999-12-31T23:59:59.999Z. Past it RFC 3339 has
/// no four-digit year to print, and far past it PostgreSQL's microseconds overflow.
pub const LATEST_MS: u64 = 253_402_300_799_999;

/// Parse `from`/`to`: a time from 1970 to [`LATEST_MS`].
pub fn parse_time(name: &str, s: &str, now: SystemTime) -> Result<SystemTime, TimeError> {
    let s = s.trim();
    let bad = |problem| TimeError {
        name: name.to_owned(),
        input: s.to_owned(),
        problem,
    };
    let t = if s == "now" {
        now
    } else if let Some(d) = s.strip_prefix("now-") {
        let d = humantime::parse_duration(d.trim()).map_err(|e| bad(TimeProblem::Duration(e)))?;
        now.checked_sub(d)
            .ok_or_else(|| bad(TimeProblem::Before1970))?
    } else if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: it can only fail by being too large.
        let ms: u64 = s.parse().map_err(|_| bad(TimeProblem::TooLarge))?;
        UNIX_EPOCH + Duration::from_millis(ms.min(LATEST_MS + 1))
    } else {
        humantime::parse_rfc3339_weak(s).map_err(|e| bad(TimeProblem::Time(e)))?
    };
    match t.duration_since(UNIX_EPOCH) {
        Err(_) => Err(bad(TimeProblem::Before1970)),
        Ok(d) if d > Duration::from_millis(LATEST_MS) => Err(bad(TimeProblem::TooLarge)),
        Ok(_) => Ok(t),
    }
}

/// Unix milliseconds; 0 before 1970 and `i64::MAX` past its range (a stored point's time
/// comes from the database, which holds years the API does not take).
fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A stored value as JSON in its type: a bool as `true`/`false`, an integer as an integer, a
/// float as a float (`2.0`, never `2`), a string as a string. Rows stored before values had a
/// type (`value_type` NULL) come back as they were stored: a number or a string.
pub fn stored_value(
    value: Option<f64>,
    value_str: Option<String>,
    value_type: Option<i16>,
) -> JsonValue {
    let float = |f: f64| {
        serde_json::Number::from_f64(f)
            .map(JsonValue::Number)
            .unwrap_or(JsonValue::Null)
    };
    match (value_type.and_then(ValueType::from_code), value_str, value) {
        (Some(ValueType::String) | None, Some(s), _) => JsonValue::String(s),
        (Some(ValueType::Bool), _, Some(f)) => JsonValue::Bool(f != 0.0),
        // Exact within ±2^53, which is what a double holds; `as` saturates past i64/u64.
        (Some(ValueType::Integer), _, Some(f)) if f.fract() == 0.0 => {
            if f >= i64::MAX as f64 {
                JsonValue::from(f as u64)
            } else {
                JsonValue::from(f as i64)
            }
        }
        (_, _, Some(f)) => float(f),
        (_, _, None) => JsonValue::Null,
    }
}

/// Unix milliseconds of an optional time.
fn opt_ms(t: Option<SystemTime>) -> Option<i64> {
    t.map(ms)
}

/// A stored point as the APIs return it: `{"ts", "v", "q"}`, plus `"u"` and `"src_ts"` when
/// the point has them (the value object's fields).
fn point_json(r: &Row) -> JsonValue {
    let mut p = json!({
        "ts": ms(r.get("time")),
        "v": stored_value(r.get("value"), r.get("value_str"), r.get("value_type")),
        "q": Quality::from_code(r.get("quality")).as_str(),
    });
    if let Some(u) = r.get::<_, Option<String>>("unit") {
        p["u"] = JsonValue::String(u);
    }
    if let Some(src) = opt_ms(r.get("source_time")) {
        p["src_ts"] = JsonValue::from(src);
    }
    p
}

/// The columns of `points` a raw point is answered from ([`point_json`] reads them by name).
const POINT_COLUMNS: &str = "time, value, value_str, quality, value_type, unit, source_time";

/// Aggregate names, widths (as SQL intervals) and seconds by `agg` name.
fn bucket(agg: &str) -> Option<(&'static str, &'static str, u64)> {
    match agg {
        "1m" => Some(("1min", "1 minute", 60)),
        "1h" => Some(("1hour", "1 hour", 3600)),
        "1d" => Some(("1day", "1 day", 86_400)),
        _ => None,
    }
}

/// The parameters of `GET /api/v1/history`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    /// A topic ingestion could have stored: MQTT's rules, not the UNS's (a Sparkplug metric
    /// name can make one longer than a UNS topic may be).
    pub topic: String,
    pub from: SystemTime,
    pub to: SystemTime,
    /// `auto`, `raw`, `1m`, `1h` or `1d`.
    pub agg: &'static str,
}

impl HistoryQuery {
    /// Check the query string's parameters: a 400 naming the first one that is wrong.
    pub fn parse(q: &HashMap<String, String>, now: SystemTime) -> Result<HistoryQuery, ApiError> {
        check_params(q, &["topic", "from", "to", "agg"])?;
        let topic = q
            .get("topic")
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::bad("topic: required (the full topic of one tag)"))?;
        if topic.contains(['+', '#']) {
            return Err(ApiError::bad(format!(
                "topic: {topic:?} has wildcards; history takes one topic (use /api/v1/latest for filters)"
            )));
        }
        if topic.len() > MAX_TOPIC_BYTES {
            return Err(ApiError::bad(format!(
                "topic: {} bytes, more than an MQTT topic has ({MAX_TOPIC_BYTES})",
                topic.len()
            )));
        }
        if topic.contains('\0') {
            return Err(ApiError::bad(format!(
                "topic: {topic:?} contains NUL, which no MQTT topic does"
            )));
        }
        let topic = topic.clone();
        let from = q
            .get("from")
            .map(|s| parse_time("from", s, now))
            .transpose()?;
        let to = match q.get("to") {
            Some(s) => parse_time("to", s, now)?,
            None => now,
        };
        // The default is the hour before `to`, from 1970 at the earliest.
        let from = from.unwrap_or_else(|| {
            to.checked_sub(Duration::from_secs(3600))
                .filter(|t| *t >= UNIX_EPOCH)
                .unwrap_or(UNIX_EPOCH)
        });
        if from >= to {
            return Err(ApiError::bad(format!(
                "from ({}) must be before to ({})",
                rfc3339(from),
                rfc3339(to)
            )));
        }
        let agg = q.get("agg").map_or("auto", String::as_str);
        let agg = ["auto", "raw", "1m", "1h", "1d"]
            .into_iter()
            .find(|a| *a == agg)
            .ok_or_else(|| {
                ApiError::bad(format!("agg: {agg:?} is not one of auto, raw, 1m, 1h, 1d"))
            })?;
        Ok(HistoryQuery {
            topic,
            from,
            to,
            agg,
        })
    }
}

/// The parameters of `GET /api/v1/latest`, checked.
#[derive(Debug, Clone)]
pub struct LatestQuery {
    pub filter: TopicFilter,
}

impl LatestQuery {
    pub fn parse(q: &HashMap<String, String>) -> Result<LatestQuery, ApiError> {
        check_params(q, &["filter"])?;
        let filter = q.get("filter").ok_or_else(|| {
            ApiError::bad("filter: required (an MQTT topic filter, e.g. acme/+/line-1/#)")
        })?;
        let filter = TopicFilter::parse(filter)
            .map_err(|e| ApiError::bad(format!("filter: {filter:?}: {e}")))?;
        if filter.as_str().starts_with("$share/") {
            return Err(ApiError::bad(format!(
                "filter: {:?} is a shared subscription; give the filter alone",
                filter.as_str()
            )));
        }
        Ok(LatestQuery { filter })
    }
}

/// `LIMIT` of a query that fetches one row past the cap, to tell whether it cut.
fn one_past(max: usize) -> i64 {
    i64::try_from(max).map_or(i64::MAX, |m| m.saturating_add(1))
}

async fn history(
    State(db): State<Arc<Db>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<JsonValue>, ApiError> {
    let HistoryQuery {
        topic,
        from,
        to,
        agg,
    } = HistoryQuery::parse(&q, SystemTime::now())?;
    let topic = topic.as_str();
    let client = db.client().await?;
    let Some(row) = client
        .query_opt("SELECT id FROM tags WHERE topic = $1", &[&topic])
        .await?
    else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("topic: {topic:?} has no stored points"),
        ));
    };
    let tag: i32 = row.get(0);
    let max = db.max_points;
    let span = to.duration_since(from).unwrap_or_default().as_secs();
    let chosen = match agg {
        "auto" => {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM (SELECT 1 FROM points WHERE tag_id = $1 AND time >= $2 AND time < $3 LIMIT $4) s",
                    &[&tag, &from, &to, &one_past(max)],
                )
                .await?
                .get(0);
            if n as usize <= max {
                "raw"
            } else {
                ["1m", "1h", "1d"]
                    .into_iter()
                    .find(|a| bucket(a).is_some_and(|(_, _, w)| span / w < max as u64))
                    .unwrap_or("1d")
            }
        }
        a => a,
    };
    let limit = one_past(max);
    let mut points: Vec<JsonValue> = if chosen == "raw" {
        client
            .query(
                &format!(
                    "SELECT {POINT_COLUMNS} FROM points
                     WHERE tag_id = $1 AND time >= $2 AND time < $3 ORDER BY time LIMIT $4"
                ),
                &[&tag, &from, &to, &limit],
            )
            .await?
            .iter()
            .map(point_json)
            .collect()
    } else {
        let (name, width, _) = bucket(chosen).unwrap_or(("1day", "1 day", 86_400));
        let sql = if db.continuous_aggregates() {
            format!(
                "SELECT bucket, avg_value, min_value, max_value, sample_count, first_value, last_value
                 FROM points_{name} WHERE tag_id = $1 AND bucket >= $2 AND bucket < $3
                 ORDER BY bucket LIMIT $4"
            )
        } else {
            // The same buckets and counts as the `metrics_*` views; the range on `time`
            // uses the (tag_id, time) index.
            let bucket = crate::schema::bucket_expr(width, "time");
            format!(
                "SELECT {bucket} AS bucket,
                        avg(value), min(value), max(value), count(value),
                        (array_agg(value ORDER BY time))[1], (array_agg(value ORDER BY time DESC))[1]
                 FROM points WHERE tag_id = $1 AND time >= $2 AND time < $3
                 GROUP BY 1 ORDER BY 1 LIMIT $4"
            )
        };
        client
            .query(&sql, &[&tag, &from, &to, &limit])
            .await?
            .iter()
            .map(aggregate_json)
            .collect()
    };
    let truncated = points.len() > max;
    points.truncate(max);
    let mut incomplete = Vec::new();
    if db.backlog() {
        incomplete.push("backlog");
    }
    if chosen != "raw" && db.continuous_aggregates() {
        let (name, _, _) = bucket(chosen).unwrap_or(("1day", "1 day", 86_400));
        if refresh_pending(&client, name, from, to).await {
            incomplete.push("refresh_pending");
        }
    }
    Ok(Json(json!({
        "topic": topic,
        "from": rfc3339(from),
        "to": rfc3339(to),
        "agg": chosen,
        "truncated": truncated,
        "incomplete": !incomplete.is_empty(),
        "incomplete_reasons": incomplete,
        "points": points,
    })))
}

/// Unix microseconds: TimescaleDB's internal time of a `timestamptz` in its catalog.
fn internal_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// TimescaleDB: whether raw points in `[from, to)` changed below the aggregate's watermark
/// and the refresh has not taken them in yet (late data waiting for the next policy run;
/// above the watermark real-time aggregation answers from the raw points). Read from the
/// invalidation logs of TimescaleDB's catalog; when they cannot be read, nothing is claimed.
async fn refresh_pending(client: &Client, name: &str, from: SystemTime, to: SystemTime) -> bool {
    let r = client
        .query_one(
            "WITH c AS (
                 SELECT ca.mat_hypertable_id, ca.raw_hypertable_id,
                        _timescaledb_functions.cagg_watermark(ca.mat_hypertable_id) AS watermark
                 FROM _timescaledb_catalog.continuous_agg ca
                 WHERE ca.user_view_name = $1 AND ca.user_view_schema = current_schema())
             SELECT EXISTS (
                 SELECT 1 FROM c JOIN _timescaledb_catalog.continuous_aggs_hypertable_invalidation_log l
                     ON l.hypertable_id = c.raw_hypertable_id
                 WHERE l.greatest_modified_value >= $2
                   AND l.lowest_modified_value < least($3, c.watermark))
             OR EXISTS (
                 SELECT 1 FROM c JOIN _timescaledb_catalog.continuous_aggs_materialization_invalidation_log m
                     ON m.materialization_id = c.mat_hypertable_id
                 WHERE m.greatest_modified_value >= $2
                   AND m.lowest_modified_value < least($3, c.watermark))",
            &[&format!("points_{name}"), &internal_us(from), &internal_us(to)],
        )
        .await;
    match r {
        Ok(row) => row.get(0),
        Err(e) => {
            tracing::debug!(error = %e, "TimescaleDB invalidation logs not readable");
            false
        }
    }
}

fn aggregate_json(r: &Row) -> JsonValue {
    json!({
        "ts": ms(r.get::<_, SystemTime>(0)),
        "avg": r.get::<_, Option<f64>>(1),
        "min": r.get::<_, Option<f64>>(2),
        "max": r.get::<_, Option<f64>>(3),
        "count": r.get::<_, i64>(4),
        "first": r.get::<_, Option<f64>>(5),
        "last": r.get::<_, Option<f64>>(6),
    })
}

/// Rows of `tags` read at a time by `latest`.
const TAG_PAGE: i64 = 1000;

async fn latest(
    State(db): State<Arc<Db>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<JsonValue>, ApiError> {
    let LatestQuery { filter } = LatestQuery::parse(&q)?;
    // The literal levels before the first wildcard narrow the scan of `tags`.
    let prefix: String = if filter.has_wildcards() {
        filter
            .pattern()
            .split('/')
            .take_while(|l| *l != "+" && *l != "#")
            .map(|l| format!("{l}/"))
            .collect()
    } else {
        filter.pattern().to_owned()
    };
    let client = db.client().await?;
    let max = db.max_points;
    let mut ids = Vec::new();
    let mut truncated = false;
    // A page at a time in topic order, from after the last topic of the page before (no
    // topic is empty, so "" is before them all), until the cap is passed or the table ends.
    let mut after = String::new();
    'pages: loop {
        let page = client
            .query(
                "SELECT id, topic FROM tags WHERE left(topic, length($1)) = $1 AND topic > $2
                 ORDER BY topic LIMIT $3",
                &[&prefix, &after, &TAG_PAGE],
            )
            .await?;
        for r in &page {
            if filter.matches(r.get(1)) {
                if ids.len() == max {
                    truncated = true;
                    break 'pages;
                }
                ids.push(r.get::<_, i32>(0));
            }
        }
        match page.last() {
            Some(last) if page.len() as i64 == TAG_PAGE => after = last.get(1),
            _ => break,
        }
    }
    let rows = client
        .query(
            &format!(
                "SELECT t.topic, l.*
                 FROM unnest($1::int[]) AS u(id) JOIN tags t ON t.id = u.id
                 CROSS JOIN LATERAL (SELECT {POINT_COLUMNS} FROM points p
                                     WHERE p.tag_id = u.id ORDER BY time DESC LIMIT 1) l
                 ORDER BY t.topic"
            ),
            &[&ids],
        )
        .await?;
    let values: Vec<JsonValue> = rows
        .iter()
        .map(|r| {
            let mut p = point_json(r);
            p["topic"] = JsonValue::String(r.get("topic"));
            p
        })
        .collect();
    Ok(Json(
        json!({ "filter": filter.as_str(), "truncated": truncated, "values": values }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_form_and_errors_name_the_parameter() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_time("from", "now", now).unwrap(), now);
        assert_eq!(
            parse_time("from", "now-1h", now).unwrap(),
            now - Duration::from_secs(3600)
        );
        assert_eq!(
            parse_time("from", "1700000000000", now).unwrap(),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(
            parse_time("to", "2023-11-14T22:13:20Z", now).unwrap(),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        let e = parse_time("to", "yesterday", now).unwrap_err().to_string();
        assert!(e.starts_with("to: \"yesterday\" is not a time ("), "{e}");
        assert!(e.ends_with("now or now-<duration> (now-1h)"), "{e}");
        let e = parse_time("from", "now-soon", now).unwrap_err();
        assert!(matches!(e.problem, TimeProblem::Duration(_)), "{e:?}");
        assert!(e.to_string().contains("not a duration"), "{e}");
        let e = parse_time("from", "99999999999999999999", now).unwrap_err();
        assert!(matches!(e.problem, TimeProblem::TooLarge), "{e:?}");
    }

    #[test]
    fn stored_values_come_back_in_their_type() {
        let t = |t: ValueType| Some(t.code());
        let text = |v: JsonValue| v.to_string();
        assert_eq!(
            text(stored_value(Some(0.0), None, t(ValueType::Bool))),
            "false"
        );
        assert_eq!(
            text(stored_value(Some(1.0), None, t(ValueType::Bool))),
            "true"
        );
        assert_eq!(
            text(stored_value(Some(42.0), None, t(ValueType::Integer))),
            "42"
        );
        assert_eq!(
            text(stored_value(Some(-5.0), None, t(ValueType::Integer))),
            "-5"
        );
        assert_eq!(
            text(stored_value(
                Some(9_007_199_254_740_992.0),
                None,
                t(ValueType::Integer)
            )),
            "9007199254740992"
        );
        assert_eq!(
            text(stored_value(
                Some(u64::MAX as f64),
                None,
                t(ValueType::Integer)
            )),
            u64::MAX.to_string()
        );
        assert_eq!(
            text(stored_value(Some(2.0), None, t(ValueType::Float))),
            "2.0"
        );
        assert_eq!(
            text(stored_value(Some(21.2), None, t(ValueType::Float))),
            "21.2"
        );
        assert_eq!(
            text(stored_value(None, Some("on".into()), t(ValueType::String))),
            "\"on\""
        );
        assert_eq!(
            text(stored_value(None, None, t(ValueType::Integer))),
            "null"
        );
        // Rows stored before values had a type: as they were stored.
        assert_eq!(text(stored_value(Some(1.0), None, None)), "1.0");
        assert_eq!(text(stored_value(None, Some("x".into()), None)), "\"x\"");
        assert_eq!(text(stored_value(None, None, None)), "null");
        // A code no version writes is read as the stored number.
        assert_eq!(text(stored_value(Some(3.0), None, Some(99))), "3.0");
    }

    #[test]
    fn times_end_with_the_year_9999() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let last = parse_time("to", &LATEST_MS.to_string(), now).unwrap();
        assert_eq!(rfc3339(last), "9999-12-31T23:59:59.999Z");
        assert_eq!(
            parse_time("to", "9999-12-31T23:59:59.999Z", now).unwrap(),
            last
        );
        for past in [
            (LATEST_MS + 1).to_string(),
            u64::MAX.to_string(),
            "18446744073709551616".to_owned(),
        ] {
            let e = parse_time("to", &past, now).unwrap_err();
            assert!(matches!(e.problem, TimeProblem::TooLarge), "{e:?}");
            assert!(
                e.to_string()
                    .starts_with(&format!("to: {past:?} is after 9999-12-31T23:59:59.999Z")),
                "{e}"
            );
        }
        assert_eq!(parse_time("from", "0", now).unwrap(), UNIX_EPOCH);
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_history_query_is_checked_parameter_by_parameter() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let q = HistoryQuery::parse(&query(&[("topic", "a/b")]), now).unwrap();
        assert_eq!(
            (q.from, q.to, q.agg),
            (now - Duration::from_secs(3600), now, "auto")
        );
        let bad = |pairs: &[(&str, &str)]| {
            let e = HistoryQuery::parse(&query(pairs), now).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e:?}");
            e.1
        };
        // The default start an hour before a `to` in 1970's first hour is 1970 itself.
        assert_eq!(
            HistoryQuery::parse(&query(&[("topic", "a"), ("to", "1000")]), now)
                .unwrap()
                .from,
            UNIX_EPOCH
        );
        assert!(bad(&[("topic", "a"), ("to", "0")])
            .starts_with("from (1970-01-01T00:00:00.000Z) must be before to"));
        assert!(bad(&[("topic", "a"), ("from", "253402300800000")]).starts_with("from: "));
        assert!(
            bad(&[("topic", "a"), ("from", "0"), ("to", "253402300800000")]).starts_with("to: ")
        );
        assert!(bad(&[("topic", "a/\0/b")]).starts_with("topic: "));
        assert!(bad(&[("topic", &"x".repeat(65_536))]).starts_with("topic: 65536 bytes"));
        // Stored topics follow MQTT's rules, not the UNS's: these are queried, not refused.
        for stored in ["a//b", "spBv1.0/G/E/D/Temp", "$nexus/x", &"m/".repeat(1000)] {
            let q = HistoryQuery::parse(&query(&[("topic", stored)]), now).unwrap();
            assert_eq!(q.topic, stored);
        }
        assert!(bad(&[("topic", "a"), ("agg", "5m")]).starts_with("agg: \"5m\""));
        let e = LatestQuery::parse(&query(&[("filter", "$share/g/a/#")])).unwrap_err();
        assert!(e.1.starts_with("filter: "), "{e:?}");
        let e = LatestQuery::parse(&query(&[("filter", "a/\0")])).unwrap_err();
        assert!(e.1.starts_with("filter: "), "{e:?}");
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9]{0,24}",
            "now(-[0-9]{0,22}[a-z ]{0,8})?",
            "[0-9]{1,6}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?Z?",
            "[a-z/+#$]{0,24}",
            Just("auto".to_owned()),
            Just("1m".to_owned()),
        ]
    }

    fn params() -> impl Strategy<Value = HashMap<String, String>> {
        let key = prop_oneof![
            Just("topic".to_owned()),
            Just("from".to_owned()),
            Just("to".to_owned()),
            Just("agg".to_owned()),
            Just("filter".to_owned()),
            any::<String>(),
        ];
        proptest::collection::hash_map(key, text(), 0..5)
    }

    /// A 400's message starts with the parameter it is about.
    fn names_a_parameter(msg: &str, names: &[&str]) -> bool {
        msg.starts_with("unknown parameter ")
            || msg.starts_with("from (")
            || names.iter().any(|n| msg.starts_with(&format!("{n}: ")))
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_history_query_parses_or_is_a_400_naming_the_parameter(
            q in params(),
            now_ms in 0u64..=LATEST_MS,
        ) {
            let now = UNIX_EPOCH + Duration::from_millis(now_ms);
            match HistoryQuery::parse(&q, now) {
                Ok(h) => {
                    prop_assert!(h.from < h.to);
                    prop_assert!(h.to <= UNIX_EPOCH + Duration::from_millis(LATEST_MS));
                    prop_assert!(h.from >= UNIX_EPOCH);
                    // What the answer prints of them.
                    let _ = (rfc3339(h.from), rfc3339(h.to), ms(h.from), ms(h.to));
                }
                Err(e) => {
                    prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                    prop_assert!(names_a_parameter(&e.1, &["topic", "from", "to", "agg"]), "{}", e.1);
                }
            }
        }

        #[test]
        fn any_latest_query_parses_or_is_a_400_naming_the_parameter(q in params()) {
            if let Err(e) = LatestQuery::parse(&q) {
                prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                prop_assert!(names_a_parameter(&e.1, &["filter"]), "{}", e.1);
            }
        }

        #[test]
        fn any_time_text_parses_within_range_or_is_an_error_naming_it(s in text()) {
            let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            match parse_time("from", &s, now) {
                Ok(t) => {
                    prop_assert!(t >= UNIX_EPOCH);
                    let _ = rfc3339(t);
                }
                Err(e) => prop_assert!(e.to_string().starts_with("from: "), "{}", e),
            }
        }
    }
}
