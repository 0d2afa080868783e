//! The control API on the orchestrator's port: devices added, changed and removed from the
//! control center (or any client), written to the devices file, which every service watching
//! it applies without touching the other devices (docs/control.md).
//!
//! | route | role |
//! |---|---|
//! | `GET /api/v1/devices`, `GET /api/v1/devices/{id}` | viewer |
//! | `POST /api/v1/devices`, `PUT` and `DELETE /api/v1/devices/{id}` (`?dry_run=true`: validate only) | admin |
//! | `GET /api/openapi.json` (the port's OpenAPI document) | anyone |
//!
//! - Every change is validated as `nexus config check` validates the file, with the same
//!   messages; each problem names its field inside the device (`connection.port`).
//! - Writes are atomic (a new file beside the old one, fsynced, renamed over it, the folder
//!   fsynced) and serialized; the previous content is kept as `<file>.previous`. `version` is
//!   a hash of the file: `If-Match: <version>` refuses a change made over someone else's.
//! - The file is rewritten as YAML from its parsed tree: comments in it are not kept.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nexus_common::auth::http::{Caller, Routes};
use nexus_common::config::{yaml, Config, Role};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::status::StatusBoard;

/// An answer refusing a request: status and `{"error": ..}` (with `problems` when a device is
/// invalid).
#[derive(Debug)]
pub struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, json!({ "error": msg.into() }))
}

/// Most devices the API lets a file hold.
pub const MAX_DEVICES: usize = 10_000;

/// The devices file and who may change it.
pub struct DeviceFile {
    path: Option<PathBuf>,
    /// Why devices cannot be edited here (no file, a read-only folder).
    refused: Option<String>,
    /// The devices of the running configuration (shown when the file cannot be edited).
    running: Vec<Value>,
    lock: tokio::sync::Mutex<()>,
}

/// How the file holds its list.
enum Layout {
    /// A list at the top.
    List,
    /// A mapping with a `devices` key (other keys kept).
    Mapping(Map<String, Value>),
}

struct Snapshot {
    devices: Vec<Value>,
    layout: Layout,
    version: String,
}

impl DeviceFile {
    pub fn new(cfg: &Config) -> DeviceFile {
        let running = cfg
            .devices
            .iter()
            .map(|d| json!({"id": d.id.as_str(), "enabled": d.enabled, "uns_prefix": d.uns_prefix}))
            .collect();
        let (path, refused) = match &cfg.devices_file {
            None => (
                None,
                Some(format!(
                    "the devices are in {}: name a devices_file in it to edit devices here",
                    cfg.source_name()
                )),
            ),
            Some(p) => match writable_folder(p) {
                Ok(()) => (Some(p.clone()), None),
                Err(e) => (Some(p.clone()), Some(e)),
            },
        };
        DeviceFile {
            path,
            refused,
            running,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The configured devices (id, enabled): the file's as it is now, or the running
    /// configuration's when there is no file or it cannot be read.
    pub fn configured(&self) -> Vec<(String, bool)> {
        let entry = |d: &Value| {
            let enabled = d.get("enabled").and_then(Value::as_bool).unwrap_or(true);
            id_of(d).map(|id| (id.to_owned(), enabled))
        };
        match self.path.as_ref().and_then(|_| self.read().ok()) {
            Some(snap) => snap.devices.iter().filter_map(entry).collect(),
            None => self.running.iter().filter_map(entry).collect(),
        }
    }

    fn read(&self) -> Result<Snapshot, ApiError> {
        let path = self.path.as_ref().ok_or_else(|| {
            error(
                StatusCode::CONFLICT,
                self.refused.clone().unwrap_or_default(),
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let version = version_of(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        let (tree, _) = yaml::parse(&text).map_err(|(msg, pos)| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} line {}: YAML syntax: {msg}; fix the file by hand",
                    path.display(),
                    pos.line
                ),
            )
        })?;
        let (list, layout) = match tree {
            Value::Object(mut m) if m.contains_key("devices") => {
                let l = m.remove("devices").unwrap_or(Value::Null);
                (l, Layout::Mapping(m))
            }
            Value::Object(m) if m.is_empty() => (Value::Null, Layout::Mapping(m)),
            Value::Null => (Value::Null, Layout::Mapping(Map::new())),
            other => (other, Layout::List),
        };
        let devices = match list {
            Value::Array(a) => a,
            Value::Null => Vec::new(),
            _ => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "{}: devices is not a list; fix the file by hand",
                        path.display()
                    ),
                ))
            }
        };
        Ok(Snapshot {
            devices,
            layout,
            version,
        })
    }

    /// Replace the file's list with `devices`; returns the new version.
    /// (The file is written and fsynced on a blocking thread.)
    async fn write(&self, layout: Layout, devices: Vec<Value>) -> Result<String, ApiError> {
        let path = self.path.as_ref().ok_or_else(|| {
            error(
                StatusCode::CONFLICT,
                self.refused.clone().unwrap_or_default(),
            )
        })?;
        let tree = match layout {
            Layout::List => Value::Array(devices),
            Layout::Mapping(mut m) => {
                m.insert("devices".into(), Value::Array(devices));
                Value::Object(m)
            }
        };
        let text = yaml::to_yaml(&tree);
        let version = version_of(text.as_bytes());
        let target = path.clone();
        let written =
            tokio::task::spawn_blocking(move || write_atomically(&target, text.as_bytes())).await;
        match written {
            Ok(Ok(())) => Ok(version),
            Ok(Err(e)) => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot write {}: {e}", path.display()),
            )),
            Err(e) => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot write {}: {e}", path.display()),
            )),
        }
    }
}

fn version_of(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Whether files can be created beside `file` (a ConfigMap mount cannot).
fn writable_folder(file: &Path) -> Result<(), String> {
    let dir = folder_of(file);
    let probe = dir.join(format!(".nexus-write-check-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!(
            "the devices file's folder {} is not writable ({e}): devices are edited where that file comes from",
            dir.display()
        )),
    }
}

fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Write `bytes` to `path` so that a reader sees the old file or the new one, never a part,
/// and the new one survives a power cut once this returns. The old content is kept as
/// `<path>.previous`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = folder_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "devices.yaml".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mode = std::fs::metadata(path).ok().map(|m| m.permissions());
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if let Some(m) = mode {
            f.set_permissions(m)?;
        }
        f.sync_all()?;
    }
    if path.exists() {
        std::fs::copy(path, dir.join(format!("{name}.previous")))?;
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&dir)?.sync_all()
}

#[derive(Clone)]
pub struct ControlState {
    pub devices: Arc<DeviceFile>,
    pub board: StatusBoard,
    /// The running configuration (pool and breaker settings for connection tests; the files
    /// a reload checks).
    pub config: Arc<Config>,
    /// The configuration file's sections as they were at start, to tell which changed
    /// settings a reload leaves for the next start.
    at_start: Arc<Option<Map<String, Value>>>,
}

impl ControlState {
    pub fn new(config: Arc<Config>, devices: Arc<DeviceFile>, board: StatusBoard) -> ControlState {
        let at_start = Arc::new(file_sections(config.source.as_deref()));
        ControlState {
            devices,
            board,
            config,
            at_start,
        }
    }
}

/// The top-level sections of the configuration file at `path` as written (without the
/// environment's overrides), if it can be read.
fn file_sections(path: Option<&Path>) -> Option<Map<String, Value>> {
    let text = std::fs::read_to_string(path?).ok()?;
    match yaml::parse(&text).ok()?.0 {
        Value::Object(m) => Some(m),
        Value::Null => Some(Map::new()),
        _ => None,
    }
}

/// What the services apply while running: the devices (from the file or the list) and the
/// alert rules. Every other setting is read at start.
const APPLIED_LIVE: [&str; 3] = ["devices", "devices_file", "alerts.rules"];

/// The settings changed between two versions of the configuration file that the running
/// services do not apply: the top-level sections, and `alerts` apart from its rules.
fn restart_needed(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<String> {
    let without_rules = |v: Option<&Value>| match v {
        Some(Value::Object(m)) => {
            let mut m = m.clone();
            m.remove("rules");
            Value::Object(m)
        }
        other => other.cloned().unwrap_or(Value::Null),
    };
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| {
            if APPLIED_LIVE.contains(&k.as_str()) {
                return false;
            }
            if k.as_str() == "alerts" {
                return without_rules(old.get(*k)) != without_rules(new.get(*k));
            }
            old.get(*k) != new.get(*k)
        })
        .cloned()
        .collect()
}

#[derive(Deserialize)]
struct WriteQuery {
    #[serde(default)]
    dry_run: bool,
}

fn status_of(board: &StatusBoard, id: &str) -> Value {
    board.device(id).unwrap_or(Value::Null)
}

fn id_of(d: &Value) -> Option<&str> {
    d.get("id").and_then(Value::as_str)
}

async fn list(State(s): State<ControlState>) -> Result<Response, ApiError> {
    let f = &s.devices;
    if f.refused.is_some() && f.path.is_none() {
        let devices: Vec<Value> = f
            .running
            .iter()
            .map(|d| {
                let id = id_of(d).unwrap_or_default();
                json!({"id": id, "config": Value::Null, "summary": d, "status": status_of(&s.board, id)})
            })
            .collect();
        return Ok(Json(json!({"version": Value::Null, "editable": false, "reason": f.refused, "devices": devices}))
            .into_response());
    }
    let snap = f.read()?;
    let devices: Vec<Value> = snap
        .devices
        .iter()
        .map(|d| {
            let id = id_of(d).unwrap_or_default();
            json!({"id": id, "config": d, "status": status_of(&s.board, id)})
        })
        .collect();
    Ok(Json(json!({"version": snap.version, "editable": f.refused.is_none(), "reason": f.refused, "devices": devices}))
        .into_response())
}

async fn get_one(
    State(s): State<ControlState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let snap = s.devices.read()?;
    let d = snap
        .devices
        .iter()
        .find(|d| id_of(d) == Some(&id))
        .ok_or_else(|| no_device(&id))?;
    Ok(
        Json(json!({"version": snap.version, "config": d, "status": status_of(&s.board, &id)}))
            .into_response(),
    )
}

fn no_device(id: &str) -> ApiError {
    error(
        StatusCode::NOT_FOUND,
        format!("no device {:?} in the devices file", truncate(id)),
    )
}

/// At most 64 characters of a client's text in a message.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn problems(status: StatusCode, msg: &str, list: Vec<(String, String)>) -> ApiError {
    let items: Vec<Value> = list
        .into_iter()
        .map(|(field, message)| json!({"field": field, "message": message}))
        .collect();
    ApiError(status, json!({"error": msg, "problems": items}))
}

/// The body as a device object, or the answer refusing it.
fn device_body(body: Result<Json<Value>, JsonRejection>) -> Result<Value, ApiError> {
    let Json(v) = body.map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not a JSON device: {}", e.body_text()),
        )
    })?;
    if !v.is_object() {
        return Err(problems(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the device is not valid",
            vec![(String::new(), "a device is a JSON object".into())],
        ));
    }
    if id_of(&v).is_none() {
        return Err(problems(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the device is not valid",
            vec![("id".into(), "is required (text)".into())],
        ));
    }
    Ok(v)
}

/// Check the whole new list; the problems of device `index` are given with paths inside it,
/// others with their full path.
fn check(list: &[Value], index: usize) -> Result<(), ApiError> {
    if list.len() > MAX_DEVICES {
        return Err(problems(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too many devices",
            vec![(
                String::new(),
                format!("a devices file edited here holds at most {MAX_DEVICES} devices"),
            )],
        ));
    }
    Config::check_devices(list).map(|_| ()).map_err(|found| {
        let prefix = format!("devices[{index}]");
        let mapped = found
            .into_iter()
            .map(|(path, msg)| match path.strip_prefix(&prefix) {
                Some(rest) => (rest.trim_start_matches('.').to_owned(), msg),
                None => (path, msg),
            })
            .collect();
        problems(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the device is not valid",
            mapped,
        )
    })
}

fn if_match(headers: &HeaderMap, version: &str) -> Result<(), ApiError> {
    match headers
        .get("if-match")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        Some(want) if want.trim_matches('"') != version && want != "*" => Err(error(
            StatusCode::PRECONDITION_FAILED,
            "the devices file changed since you read it: load it again and redo the change",
        )),
        _ => Ok(()),
    }
}

/// Where device `id` is in the file, once `If-Match` (if sent) holds.
fn locate(snap: &Snapshot, headers: &HeaderMap, id: &str) -> Result<usize, ApiError> {
    if_match(headers, &snap.version)?;
    snap.devices
        .iter()
        .position(|d| id_of(d) == Some(id))
        .ok_or_else(|| no_device(id))
}

fn editable(s: &ControlState) -> Result<(), ApiError> {
    match &s.devices.refused {
        Some(why) => Err(error(StatusCode::CONFLICT, why.clone())),
        None => Ok(()),
    }
}

async fn create(
    State(s): State<ControlState>,
    Caller(who): Caller,
    Query(q): Query<WriteQuery>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let device = device_body(body)?;
    editable(&s)?;
    let _guard = s.devices.lock.lock().await;
    let snap = s.devices.read()?;
    let id = id_of(&device).unwrap_or_default().to_owned();
    if snap.devices.iter().any(|d| id_of(d) == Some(&id)) {
        return Err(problems(
            StatusCode::CONFLICT,
            "the device exists",
            vec![(
                "id".into(),
                format!("a device {:?} exists already", truncate(&id)),
            )],
        ));
    }
    let mut list = snap.devices;
    list.push(device.clone());
    check(&list, list.len() - 1)?;
    if q.dry_run {
        return Ok(Json(json!({"valid": true})).into_response());
    }
    let version = s.devices.write(snap.layout, list).await?;
    s.board.touch();
    tracing::info!(user = %who.name, device = %id, "device added to the devices file");
    Ok((
        StatusCode::CREATED,
        Json(json!({"version": version, "config": device})),
    )
        .into_response())
}

async fn replace(
    State(s): State<ControlState>,
    Caller(who): Caller,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let device = device_body(body)?;
    editable(&s)?;
    if id_of(&device) != Some(id.as_str()) {
        return Err(problems(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the device is not valid",
            vec![(
                "id".into(),
                "must be the id in the URL (to rename a device, add the new one and delete the old)"
                    .into(),
            )],
        ));
    }
    let _guard = s.devices.lock.lock().await;
    let snap = s.devices.read()?;
    let index = locate(&snap, &headers, &id)?;
    let mut list = snap.devices;
    list[index] = device.clone();
    check(&list, index)?;
    if q.dry_run {
        return Ok(Json(json!({"valid": true})).into_response());
    }
    let version = s.devices.write(snap.layout, list).await?;
    s.board.touch();
    tracing::info!(user = %who.name, device = %id, "device changed in the devices file");
    Ok(Json(json!({"version": version, "config": device})).into_response())
}

async fn remove(
    State(s): State<ControlState>,
    Caller(who): Caller,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    editable(&s)?;
    let _guard = s.devices.lock.lock().await;
    let snap = s.devices.read()?;
    let index = locate(&snap, &headers, &id)?;
    let mut list = snap.devices;
    list.remove(index);
    if q.dry_run {
        return Ok(Json(json!({"valid": true})).into_response());
    }
    s.devices.write(snap.layout, list).await?;
    s.board.touch();
    tracing::info!(user = %who.name, device = %id, "device removed from the devices file");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Longest a connection test or a browse may take (a first OPC UA session also makes the
/// client's key pair).
pub const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A device sent for a connection test or a browse: validated as a write would be, compiled,
/// with pools of its own (the running gateway's sessions and breakers are not touched).
fn probe(
    s: &ControlState,
    device: Value,
) -> Result<(Arc<nexus_devices::Device>, Arc<nexus_devices::Pools>), ApiError> {
    let list = [device];
    check(&list, 0)?;
    let cfg = Config::check_devices(&list)
        .map_err(|_| error(StatusCode::UNPROCESSABLE_ENTITY, "the device is not valid"))?
        .into_iter()
        .next()
        .ok_or_else(|| error(StatusCode::UNPROCESSABLE_ENTITY, "no device"))?;
    let compiled = nexus_devices::Device::compile(cfg)
        .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let pools = nexus_devices::Pools::from_config(&s.config.gateway, &prometheus::Registry::new())
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok((Arc::new(compiled), pools))
}

/// `POST /api/v1/test-connection` (admin): validate a device as a write would, then open a
/// session to it and read every tag once, on pools of its own (the running gateway's
/// sessions and breakers are not touched). What each tag read, or why the device did not.
async fn test_connection(
    State(s): State<ControlState>,
    Caller(who): Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (compiled, pools) = probe(&s, device_body(body)?)?;
    let started = std::time::Instant::now();
    tracing::info!(user = %who.name, device = %compiled.cfg.id, "device connection test");
    let read = tokio::time::timeout(TEST_TIMEOUT, pools.read(&compiled, None)).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let answer = match read {
        Err(_) => {
            json!({"ok": false, "error": format!("no answer in {} s", TEST_TIMEOUT.as_secs()), "duration_ms": ms, "tags": []})
        }
        Ok(Err(e)) => json!({"ok": false, "error": e.to_string(), "duration_ms": ms, "tags": []}),
        Ok(Ok(readings)) => {
            let tags: Vec<Value> = readings
                .into_iter()
                .map(|(i, r)| {
                    let id = compiled
                        .cfg
                        .tags
                        .get(i)
                        .map(|t| t.id.to_string())
                        .unwrap_or_default();
                    let (value, quality, reason) = match r {
                        nexus_devices::driver::Reading::Good { value, .. } => {
                            (Some(value), nexus_common::Quality::Good, None)
                        }
                        nexus_devices::driver::Reading::Uncertain { value, quality, .. } => {
                            (Some(value), quality, None)
                        }
                        nexus_devices::driver::Reading::Bad { quality, reason } => {
                            (None, quality, Some(reason))
                        }
                    };
                    let obj = nexus_common::codec::json::ValueObject {
                        value,
                        quality,
                        ts_ms: None,
                        source_ts_ms: None,
                        unit: None,
                    };
                    let mut v: Value = serde_json::from_slice(
                        &nexus_common::codec::json::encode_value_object(&obj),
                    )
                    .unwrap_or(Value::Null);
                    v["tag"] = json!(id);
                    if let Some(r) = reason {
                        v["error"] = json!(r);
                    }
                    v
                })
                .collect();
            let ok = tags.iter().all(|t| t["q"] == "good");
            json!({"ok": ok, "error": Value::Null, "duration_ms": ms, "tags": tags})
        }
    };
    Ok(Json(answer).into_response())
}

/// Most children a browse answers with; past it the answer says `truncated`.
pub const MAX_BROWSE: usize = 10_000;

#[derive(Deserialize)]
struct BrowseQuery {
    node: Option<String>,
}

/// `POST /api/v1/browse?node=<node id>` (admin): the children of `node` (default: the Objects
/// folder) on the OPC UA server of the device in the body (validated as a write would be),
/// to pick tags from while the device is being configured. Pools of its own.
async fn browse(
    State(s): State<ControlState>,
    Caller(who): Caller,
    Query(q): Query<BrowseQuery>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let device = device_body(body)?;
    if let Some(n) = &q.node {
        if n.is_empty() || n.chars().count() > 4096 + 32 {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "node: an OPC UA node id of 1 to 4128 characters",
            ));
        }
    }
    let (compiled, pools) = probe(&s, device)?;
    tracing::info!(user = %who.name, device = %compiled.cfg.id, node = ?q.node, "OPC UA browse for the control center");
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let task = tokio::spawn(async move { pools.browse(&compiled, q.node, tx).await });
    let mut children = Vec::new();
    let mut truncated = false;
    let collect = async {
        while let Some(e) = rx.recv().await {
            if children.len() >= MAX_BROWSE {
                truncated = true;
                break;
            }
            children.push(e);
        }
    };
    if tokio::time::timeout(TEST_TIMEOUT, collect).await.is_err() {
        task.abort();
        return Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the server did not finish browsing in {} s",
                TEST_TIMEOUT.as_secs()
            ),
        ));
    }
    if !truncated {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e @ nexus_devices::BrowseError::Pool(_))) => {
                return Err(error(StatusCode::BAD_GATEWAY, e.to_string()))
            }
            // Not an OPC UA device, or a node the server refuses.
            Ok(Err(e)) => return Err(error(StatusCode::BAD_REQUEST, e.to_string())),
            Err(_) => return Err(error(StatusCode::BAD_GATEWAY, "the browse stopped")),
        }
    } else {
        task.abort();
    }
    Ok(Json(json!({"children": children, "truncated": truncated})).into_response())
}

/// `POST /api/v1/reload` (admin): check the configuration file and the devices file now, as
/// every service will when it sees them change (they watch them every 2 s): what they will
/// apply (the devices and the alert rules), which changed settings wait for the next start,
/// or every problem, in which case the running configuration stays.
async fn reload(State(s): State<ControlState>, Caller(who): Caller) -> Result<Response, ApiError> {
    let cfg = s.config.clone();
    let checked = tokio::task::spawn_blocking(move || {
        cfg.reload()
            .map(|new| (file_sections(new.source.as_deref()), new))
    })
    .await
    .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(user = %who.name, ok = checked.is_ok(), "configuration checked for a reload");
    match checked {
        Ok((sections, new)) => {
            let restart = match (s.at_start.as_ref(), &sections) {
                (Some(old), Some(now)) => restart_needed(old, now),
                _ => Vec::new(),
            };
            if !restart.is_empty() {
                tracing::warn!(user = %who.name, sections = ?restart, "changed settings wait for the next start");
            }
            Ok(Json(json!({
                "ok": true,
                "source": new.source_name(),
                "devices_file": new.devices_file.as_ref().map(|p| p.display().to_string()),
                "devices": new.devices.len(),
                "enabled_devices": new.devices.iter().filter(|d| d.enabled).count(),
                "rules": new.alerts.rules.len(),
                "applied_live": APPLIED_LIVE,
                "applied_by": "every service watching the files, within 2 s",
                "restart_needed": restart,
            }))
            .into_response())
        }
        Err(e) => Err(problems(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the configuration has problems: the running one stays",
            e.0.into_iter()
                .map(|p| (p.path.clone(), p.to_string()))
                .collect(),
        )),
    }
}

/// The OpenAPI document of the orchestrator's port (`GET /api/openapi.json`, open to all).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

/// The control API's routes.
pub fn routes(state: ControlState) -> Routes {
    Routes::new()
        .public_get("/api/openapi.json", openapi)
        .get("/api/v1/devices", Role::Viewer, list)
        .post("/api/v1/devices", Role::Admin, create)
        .post("/api/v1/test-connection", Role::Admin, test_connection)
        .post("/api/v1/browse", Role::Admin, browse)
        .post("/api/v1/reload", Role::Admin, reload)
        .get("/api/v1/devices/{id}", Role::Viewer, get_one)
        .put("/api/v1/devices/{id}", Role::Admin, replace)
        .delete("/api/v1/devices/{id}", Role::Admin, remove)
        .with_state(state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_the_changed_settings_that_wait_for_a_restart() {
        let tree = |text: &str| match yaml::parse(text).unwrap().0 {
            Value::Object(m) => m,
            other => panic!("{other}"),
        };
        let old = tree(
            "mqtt: { host: a }\nalerts: { rules: [], state_dir: s }\ndevices: []\ntelemetry: { instance: x }\n",
        );
        // Devices and alert rules are applied live; nothing else changed.
        let live = tree(
            "mqtt: { host: a }\nalerts: { rules: [{ id: r }], state_dir: s }\ndevices: [{ id: d }]\ntelemetry: { instance: x }\n",
        );
        assert!(restart_needed(&old, &live).is_empty());
        let later = tree(
            "mqtt: { host: b }\nalerts: { rules: [], state_dir: t }\ndevices: []\nbroker: { port: 1884 }\n",
        );
        assert_eq!(
            restart_needed(&old, &later),
            ["alerts", "broker", "mqtt", "telemetry"]
        );
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_keeps_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("devices.yaml");
        std::fs::write(&p, "devices: []\n").unwrap();
        write_atomically(&p, b"devices:\n  - id: a\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "devices:\n  - id: a\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("devices.yaml.previous")).unwrap(),
            "devices: []\n"
        );
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
