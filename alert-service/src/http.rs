//! The alarm REST API: list alarms and rules, and operator actions (acknowledge, shelve,
//! unshelve, out of service, in service), published like any other change.
//!
//! Roles: reading needs `viewer`, an action `operator`. The user an action is journaled and
//! published under is the authenticated caller; a body's `user` that names anyone else is a
//! 400 (it used to decide the name, so a client still sending it learns it no longer does).
//!
//! Every refusal is `{"error": ..}` naming what is wrong: a path, query or body that does not
//! parse is a 4xx saying which field, and a `duration_s` too large to be a deadline in unix
//! milliseconds is a 400 before it reaches the engine (which bounds it by `alerts.max_shelve`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nexus_common::auth::http::{Caller, Routes};
use nexus_common::config::Role;
use nexus_common::now_ms;
use serde::Deserialize;
use serde_json::{json, Value as JValue};

use crate::engine::ActionError;
use crate::service::Alerts;
use crate::topics::state_payload;

#[derive(Deserialize)]
struct ListQuery {
    severity: Option<u16>,
    topic: Option<String>,
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({"error": msg}))).into_response()
}

async fn list(
    AxState(a): AxState<Arc<Alerts>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let now = now_ms();
    let filter = match &q.topic {
        Some(f) => match nexus_common::TopicFilter::parse(f) {
            Ok(f) => Some(f),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("topic: {e}")),
        },
        None => None,
    };
    let alarms: Vec<JValue> = a
        .lock()
        .alarms(now)
        .iter()
        .filter(|c| q.severity.is_none_or(|s| c.severity >= s))
        .filter(|c| filter.as_ref().is_none_or(|f| f.matches(&c.topic)))
        .map(|c| state_payload(c, now))
        .collect();
    Json(json!({ "alarms": alarms })).into_response()
}

async fn rules(AxState(a): AxState<Arc<Alerts>>) -> Json<JValue> {
    let e = a.lock();
    let list: Vec<JValue> = e
        .rules()
        .iter()
        .map(|r| json!({"id": r.id, "topic": r.topic, "severity": r.severity.0, "condition": format!("{:?}", r.condition), "message": r.message, "on_delay_ms": r.on_delay.as_millis() as u64, "off_delay_ms": r.off_delay.as_millis() as u64}))
        .collect();
    Json(json!({ "rules": list }))
}

const ACTIONS: &str = "ack, shelve, unshelve, out_of_service, in_service";

#[derive(Deserialize, Default, Debug, PartialEq)]
struct ActionBody {
    user: Option<String>,
    comment: Option<String>,
    duration_s: Option<u64>,
}

/// A JSON body when the request says it sends one (anything else, and an empty body, reads
/// as no body, as axum's optional `Json` did); the message of a 400 naming the field that does
/// not parse.
fn action_body(headers: &HeaderMap, body: &[u8]) -> Result<ActionBody, String> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .is_some_and(|m| {
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        });
    if !json || body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ActionBody::default());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let b = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        match e.path().to_string().as_str() {
            "." => format!("body: {}", e.inner()),
            field => format!("{field}: {}", e.inner()),
        }
    })?;
    de.end().map_err(|e| format!("body: {e}"))?;
    Ok(b)
}

/// `duration_s` in milliseconds, if a deadline `now_ms` plus that many fits in an `i64`.
fn shelve_ms(duration_s: u64, now_ms: i64) -> Result<i64, String> {
    i64::try_from(duration_s)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .filter(|ms| now_ms.checked_add(*ms).is_some())
        .ok_or_else(|| {
            format!("duration_s: {duration_s} is too large (seconds from now; alerts.max_shelve bounds it)")
        })
}

/// The name an action is recorded under: the caller's. A body's `user` may only repeat it.
fn acting_user(caller: &str, body_user: Option<&str>) -> Result<String, String> {
    match body_user {
        Some(u) if u != caller => Err(format!(
            "user: actions are recorded under the authenticated user ({caller}), not {u:?}; leave user out"
        )),
        _ => Ok(caller.to_owned()),
    }
}

async fn action(
    AxState(a): AxState<Arc<Alerts>>,
    Caller(caller): Caller,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (id, op) = match path {
        Ok(Path(p)) => p,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let Some((rule, topic)) = id.split_once(':') else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("alarm id {id:?} is not <rule id>:<topic>"),
        );
    };
    let b = match action_body(&headers, &body) {
        Ok(b) => b,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let user = match acting_user(&caller.name, b.user.as_deref()) {
        Ok(u) => Some(u),
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let now = now_ms();
    let shelve_for = match (op.as_str(), b.duration_s) {
        ("shelve", None) => {
            return error(StatusCode::BAD_REQUEST, "shelve needs duration_s".into())
        }
        ("shelve", Some(s)) => match shelve_ms(s, now) {
            Ok(ms) => ms,
            Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
        },
        _ => 0,
    };
    let r = {
        let mut e = a.lock();
        match op.as_str() {
            "ack" => e.acknowledge(rule, topic, now, user, b.comment.clone()),
            "shelve" => e.shelve(rule, topic, shelve_for, now, user),
            "unshelve" => e.unshelve(rule, topic, now, user),
            "out_of_service" => e.set_out_of_service(rule, topic, true, now, user),
            "in_service" => e.set_out_of_service(rule, topic, false, now, user),
            other => {
                let msg = format!("unknown action {other:?} ({ACTIONS})");
                return error(StatusCode::NOT_FOUND, msg);
            }
        }
    };
    match r {
        Ok(c) => {
            let body = state_payload(&c, now);
            a.publish(vec![c]).await;
            Json(body).into_response()
        }
        Err(e @ ActionError::NotFound { .. }) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ ActionError::Refused(_)) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

/// `GET /api/v1/alarms/journal` (viewer): the `alarm_events` journal, newest first, with
/// filters (docs/alerts.md, "Journal").
async fn journal(
    AxState(j): AxState<Arc<crate::journal::JournalReader>>,
    q: Result<Query<crate::journal::JournalQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match j.query(&q).await {
        Ok((events, truncated)) => {
            Json(json!({"events": events, "truncated": truncated})).into_response()
        }
        Err((true, msg)) => error(StatusCode::BAD_REQUEST, msg),
        Err((false, msg)) => error(StatusCode::SERVICE_UNAVAILABLE, msg),
    }
}

/// The journal's route.
pub fn journal_routes(j: Arc<crate::journal::JournalReader>) -> Routes {
    Routes::new()
        .get("/api/v1/alarms/journal", Role::Viewer, journal)
        .with_state(j)
}

pub fn routes(a: Arc<Alerts>) -> Routes {
    Routes::new()
        .get("/api/v1/alarms", Role::Viewer, list)
        .get("/api/v1/rules", Role::Viewer, rules)
        .post("/api/v1/alarms/{id}/{op}", Role::Operator, action)
        .with_state(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h
    }

    #[test]
    fn bodies_parse_or_name_the_field() {
        let h = json_headers();
        assert_eq!(
            action_body(&h, br#"{"duration_s":60,"user":"ann"}"#),
            Ok(ActionBody {
                user: Some("ann".into()),
                comment: None,
                duration_s: Some(60),
            })
        );
        assert_eq!(action_body(&h, b" "), Ok(ActionBody::default()));
        // Not said to be JSON: no body, as before.
        assert_eq!(
            action_body(&HeaderMap::new(), b"duration_s=5"),
            Ok(ActionBody::default())
        );
        let e = action_body(&h, br#"{"duration_s":-5}"#).unwrap_err();
        assert!(
            e.starts_with("duration_s: invalid value: integer `-5`"),
            "{e}"
        );
        let e = action_body(&h, br#"{"user":1}"#).unwrap_err();
        assert!(e.starts_with("user: "), "{e}");
        let e = action_body(&h, br#"{"duration_s":1} x"#).unwrap_err();
        assert!(e.starts_with("body: trailing characters"), "{e}");
        let e = action_body(&h, b"[").unwrap_err();
        assert!(e.starts_with("body: "), "{e}");
    }

    #[test]
    fn the_acting_user_is_the_caller() {
        assert_eq!(acting_user("op", None), Ok("op".to_owned()));
        assert_eq!(acting_user("op", Some("op")), Ok("op".to_owned()));
        let e = acting_user("op", Some("ann")).unwrap_err();
        assert!(
            e.starts_with("user: ") && e.contains("(op)") && e.contains("\"ann\""),
            "{e}"
        );
    }

    #[test]
    fn shelve_durations_become_deadlines_or_a_400() {
        assert_eq!(shelve_ms(60, 1_700_000_000_000), Ok(60_000));
        for d in [10u64.pow(16), i64::MAX as u64, u64::MAX] {
            let e = shelve_ms(d, 0).unwrap_err();
            assert!(
                e.starts_with(&format!("duration_s: {d} is too large")),
                "{e}"
            );
        }
        // Fits alone, but not added to now.
        assert!(shelve_ms(i64::MAX as u64 / 1000, 1_700_000_000_000).is_err());
    }

    proptest! {
        #[test]
        fn any_duration_is_a_deadline_or_a_400(d in any::<u64>(), now in 0i64..=i64::MAX) {
            match shelve_ms(d, now) {
                Ok(ms) => {
                    prop_assert_eq!(ms as u64, d * 1000);
                    prop_assert!(now.checked_add(ms).is_some());
                }
                Err(e) => prop_assert!(e.starts_with("duration_s: "), "{}", e),
            }
        }

        #[test]
        fn any_body_parses_or_names_what_is_wrong(
            body in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                "\\{\"(duration_s|user|comment|x)\":(-?[0-9]{1,25}|\"[a-z]{0,5}\"|null|true|\\[\\])\\}"
                    .prop_map(String::into_bytes),
            ]
        ) {
            if let Err(e) = action_body(&json_headers(), &body) {
                // `body: ...` or `<field>: ...` (unknown fields too: `{"x":-}`).
                let (place, _) = e.split_once(": ").unwrap_or_default();
                prop_assert!(!place.is_empty(), "{}", e);
            }
        }
    }
}
