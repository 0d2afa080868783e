//! The gateway's device API: `GET /api/v1/devices` (config and live status) and
//! `GET /api/v1/devices/{id}/tags` (last values).

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use nexus_common::codec::json::value_to_json;
use serde_json::{json, Value};

use crate::poller::DeviceSet;

pub type SharedDevices = Arc<Mutex<DeviceSet>>;

async fn devices(State(set): State<SharedDevices>) -> Json<Value> {
    let views = set.lock().unwrap_or_else(|e| e.into_inner()).views();
    let list: Vec<Value> = views
        .iter()
        .map(|(cfg, state, device)| {
            let status = state
                .status
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            json!({
                "id": cfg.id,
                "protocol": format!("{:?}", cfg.protocol).to_lowercase(),
                "uns_prefix": cfg.uns_prefix,
                "poll_interval_ms": cfg.poll_interval.as_millis() as u64,
                "endpoint": device.endpoint(),
                "tags": cfg.tags.len(),
                "status": status,
            })
        })
        .collect();
    Json(json!({ "devices": list }))
}

async fn tags(State(set): State<SharedDevices>, Path(id): Path<String>) -> Response {
    let views = set.lock().unwrap_or_else(|e| e.into_inner()).views();
    let Some((cfg, state, device)) = views.into_iter().find(|(c, _, _)| c.id.as_str() == id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no device {id:?}")})),
        )
            .into_response();
    };
    let values = state
        .values
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let list: Vec<Value> = cfg
        .tags
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let p = values.get(i).cloned().flatten();
            json!({
                "id": t.id,
                "topic": device.topics[i].as_str(),
                "v": p.as_ref().map(|p| value_to_json(p.value.as_ref())),
                "q": p.as_ref().map(|p| p.quality.as_str()),
                "ts": p.as_ref().map(|p| p.ts_ms),
                "u": t.unit,
                "access": format!("{:?}", t.access).to_lowercase(),
            })
        })
        .collect();
    Json(json!({ "device": id, "tags": list })).into_response()
}

pub fn routes(set: SharedDevices) -> Router {
    Router::new()
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}/tags", get(tags))
        .with_state(set)
}
