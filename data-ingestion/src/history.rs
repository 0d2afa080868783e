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
//! Parameters are checked and a 400 says which one is wrong and why.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value as JsonValue};
use tokio_postgres::{Client, Row};

use nexus_common::domain::Quality;
use nexus_common::pg::Database;
use nexus_common::topic::{filter_matches, TopicFilter};

use crate::schema::Storage;

/// Lazily (re)connected clients for the API's queries: `database.pool_size` of them, taken in
/// turn, so one slow query does not queue every other request behind it.
pub struct Db {
    database: Database,
    clients: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: std::sync::atomic::AtomicUsize,
    pub storage: RwLock<Option<Storage>>,
    max_points: usize,
}

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
        }
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

pub struct ApiError(StatusCode, String);

impl ApiError {
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

pub fn routes(db: Arc<Db>) -> Router {
    Router::new()
        .route("/api/v1/history", get(history))
        .route("/api/v1/latest", get(latest))
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
    #[error("is too large")]
    TooLarge,
    #[error("is not a time ({0})")]
    Time(#[source] humantime::TimestampError),
}

/// Parse `from`/`to`.
pub fn parse_time(name: &str, s: &str, now: SystemTime) -> Result<SystemTime, TimeError> {
    let s = s.trim();
    let bad = |problem| TimeError {
        name: name.to_owned(),
        input: s.to_owned(),
        problem,
    };
    if s == "now" {
        return Ok(now);
    }
    if let Some(d) = s.strip_prefix("now-") {
        let d = humantime::parse_duration(d.trim()).map_err(|e| bad(TimeProblem::Duration(e)))?;
        return now
            .checked_sub(d)
            .ok_or_else(|| bad(TimeProblem::Before1970));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: it can only fail by overflowing.
        let ms: u64 = s.parse().map_err(|_| bad(TimeProblem::TooLarge))?;
        return UNIX_EPOCH
            .checked_add(Duration::from_millis(ms))
            .ok_or_else(|| bad(TimeProblem::TooLarge));
    }
    humantime::parse_rfc3339_weak(s).map_err(|e| bad(TimeProblem::Time(e)))
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn point_json(
    time: SystemTime,
    value: Option<f64>,
    value_str: Option<String>,
    quality: i16,
) -> JsonValue {
    let v = match (value_str, value) {
        (Some(s), _) => JsonValue::String(s),
        (None, Some(f)) => json!(f),
        (None, None) => JsonValue::Null,
    };
    json!({ "ts": ms(time), "v": v, "q": Quality::from_code(quality).as_str() })
}

/// Aggregate widths by `agg` name.
fn bucket(agg: &str) -> Option<(&'static str, u64)> {
    match agg {
        "1m" => Some(("1min", 60)),
        "1h" => Some(("1hour", 3600)),
        "1d" => Some(("1day", 86_400)),
        _ => None,
    }
}

async fn history(
    State(db): State<Arc<Db>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<JsonValue>, ApiError> {
    check_params(&q, &["topic", "from", "to", "agg"])?;
    let topic = q
        .get("topic")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad("topic: required (the full topic of one tag)"))?;
    if topic.contains(['+', '#']) {
        return Err(ApiError::bad(format!(
            "topic: {topic:?} has wildcards; history takes one topic (use /api/v1/latest for filters)"
        )));
    }
    let now = SystemTime::now();
    let to = match q.get("to") {
        Some(s) => parse_time("to", s, now)?,
        None => now,
    };
    let from = match q.get("from") {
        Some(s) => parse_time("from", s, now)?,
        None => to
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or(UNIX_EPOCH),
    };
    if from >= to {
        return Err(ApiError::bad(format!(
            "from ({}) must be before to ({})",
            rfc3339(from),
            rfc3339(to)
        )));
    }
    let agg = q.get("agg").map_or("auto", String::as_str);
    if !matches!(agg, "auto" | "raw") && bucket(agg).is_none() {
        return Err(ApiError::bad(format!(
            "agg: {agg:?} is not one of auto, raw, 1m, 1h, 1d"
        )));
    }
    let client = db.client().await?;
    let Some(row) = client
        .query_opt("SELECT id FROM tags WHERE topic = $1", &[topic])
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
                    &[&tag, &from, &to, &(max as i64 + 1)],
                )
                .await?
                .get(0);
            if n as usize <= max {
                "raw"
            } else {
                ["1m", "1h", "1d"]
                    .into_iter()
                    .find(|a| bucket(a).is_some_and(|(_, w)| span / w < max as u64))
                    .unwrap_or("1d")
            }
        }
        a => a,
    };
    let limit = max as i64 + 1;
    let mut points: Vec<JsonValue> = if chosen == "raw" {
        client
            .query(
                "SELECT time, value, value_str, quality FROM points
                 WHERE tag_id = $1 AND time >= $2 AND time < $3 ORDER BY time LIMIT $4",
                &[&tag, &from, &to, &limit],
            )
            .await?
            .iter()
            .map(|r| point_json(r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    } else {
        let (name, width) = bucket(chosen).unwrap_or(("1day", 86_400));
        let sql = if db.continuous_aggregates() {
            format!(
                "SELECT bucket, avg_value, min_value, max_value, sample_count, first_value, last_value
                 FROM points_{name} WHERE tag_id = $1 AND bucket >= $2 AND bucket < $3
                 ORDER BY bucket LIMIT $4"
            )
        } else {
            format!(
                "SELECT to_timestamp(floor(extract(epoch FROM time) / {width}) * {width}) AS bucket,
                        avg(value), min(value), max(value), count(*),
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
    Ok(Json(json!({
        "topic": topic,
        "from": rfc3339(from),
        "to": rfc3339(to),
        "agg": chosen,
        "truncated": truncated,
        "points": points,
    })))
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

async fn latest(
    State(db): State<Arc<Db>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<JsonValue>, ApiError> {
    check_params(&q, &["filter"])?;
    let filter = q.get("filter").ok_or_else(|| {
        ApiError::bad("filter: required (an MQTT topic filter, e.g. acme/+/line-1/#)")
    })?;
    TopicFilter::parse(filter).map_err(|e| ApiError::bad(format!("filter: {filter:?}: {e}")))?;
    // The literal levels before the first wildcard narrow the scan of `tags`.
    let prefix: String = filter
        .split('/')
        .take_while(|l| *l != "+" && *l != "#")
        .map(|l| format!("{l}/"))
        .collect();
    let prefix = if filter.contains(['+', '#']) {
        prefix
    } else {
        filter.clone()
    };
    let client = db.client().await?;
    let max = db.max_points;
    let mut ids = Vec::new();
    let mut truncated = false;
    for r in client
        .query(
            "SELECT id, topic FROM tags WHERE left(topic, length($1)) = $1 ORDER BY topic",
            &[&prefix],
        )
        .await?
    {
        let topic: &str = r.get(1);
        if filter_matches(filter, topic) {
            if ids.len() == max {
                truncated = true;
                break;
            }
            ids.push(r.get::<_, i32>(0));
        }
    }
    let rows = client
        .query(
            "SELECT t.topic, l.time, l.value, l.value_str, l.quality
             FROM unnest($1::int[]) AS u(id) JOIN tags t ON t.id = u.id
             CROSS JOIN LATERAL (SELECT time, value, value_str, quality FROM points p
                                 WHERE p.tag_id = u.id ORDER BY time DESC LIMIT 1) l
             ORDER BY t.topic",
            &[&ids],
        )
        .await?;
    let values: Vec<JsonValue> = rows
        .iter()
        .map(|r| {
            let mut p = point_json(r.get(1), r.get(2), r.get(3), r.get(4));
            p["topic"] = JsonValue::String(r.get(0));
            p
        })
        .collect();
    Ok(Json(
        json!({ "filter": filter, "truncated": truncated, "values": values }),
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
}
