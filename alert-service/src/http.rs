//! The alarm REST API: list alarms and rules, and operator actions (acknowledge, shelve,
//! unshelve, out of service, in service), published like any other change.

use std::sync::Arc;

use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
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

async fn list(AxState(a): AxState<Arc<Alerts>>, Query(q): Query<ListQuery>) -> Response {
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

#[derive(Deserialize, Default)]
struct ActionBody {
    user: Option<String>,
    comment: Option<String>,
    duration_s: Option<u64>,
}

async fn action(
    AxState(a): AxState<Arc<Alerts>>,
    Path((id, op)): Path<(String, String)>,
    body: Option<Json<ActionBody>>,
) -> Response {
    let Some((rule, topic)) = id.split_once(':') else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("alarm id {id:?} is not <rule id>:<topic>"),
        );
    };
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let now = now_ms();
    let r = {
        let mut e = a.lock();
        match op.as_str() {
            "ack" => e.acknowledge(rule, topic, now, b.user.clone(), b.comment.clone()),
            "shelve" => match b.duration_s {
                Some(s) => e.shelve(rule, topic, s as i64 * 1000, now, b.user.clone()),
                None => return error(StatusCode::BAD_REQUEST, "shelve needs duration_s".into()),
            },
            "unshelve" => e.unshelve(rule, topic, now, b.user.clone()),
            "out_of_service" => e.set_out_of_service(rule, topic, true, now, b.user.clone()),
            "in_service" => e.set_out_of_service(rule, topic, false, now, b.user.clone()),
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

pub fn routes(a: Arc<Alerts>) -> Router {
    Router::new()
        .route("/api/v1/alarms", get(list))
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/alarms/{id}/{op}", post(action))
        .with_state(a)
}
