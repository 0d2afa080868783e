//! One YAML file (`nexus.yaml`) with the sections of the contract, environment overrides
//! (`NEXUS_<SECTION>__<KEY>`, `NEXUS_DATABASE_URL`) and validation that reports every
//! problem at once, each with the file and line (or environment variable) it comes from.
//!
//! Loading is: YAML -> JSON tree with positions ([`yaml`]) -> environment overrides applied
//! to the tree -> each section (and each device) deserialized on its own, so one bad section
//! does not hide the problems of the others -> semantic validation of the typed config.

pub mod alerts;
pub mod auth;
pub mod broker;
pub mod commands;
pub mod database;
pub mod devices;
pub mod gateway;
pub mod http;
pub mod ingestion;
pub mod mqtt;
pub mod payloads;
pub mod service;
pub mod types;
pub mod yaml;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value as Json};

pub use alerts::{AlertRule, AlertsConfig, Condition, Severity, SuppressWhen, Webhook};
pub use auth::{
    Anonymous, AuthConfig, MetricsAccess, Role, TokenConfig, UserConfig, MIN_TOKEN_LEN,
};
pub use broker::{AclAction, AclPermission, AclRule, BrokerConfig, BrokerTls};
pub use commands::CommandsConfig;
pub use database::DatabaseConfig;
pub use devices::{
    Access, AcquisitionMode, ByteOrder, ConnectionConfig, DataType, DeviceConfig, ModbusAddress,
    ModbusTable, ModbusTransport, OpcUaAuth, Parity, Protocol, S7Address, S7Area, TagConfig,
};
pub use gateway::{BufferConfig, GatewayConfig, OpcUaClientConfig, PoolConfig, ShardConfig};
pub use http::{HttpConfig, HttpTls};
pub use ingestion::IngestionConfig;
pub use mqtt::{MqttConfig, MqttTls, MqttVersion};
pub use payloads::{PayloadFormat, PayloadRule, PayloadsConfig, TimestampUnit};
pub use service::{LogFormat, OrchestratorConfig, TelemetryConfig, Upstreams};
pub use types::{BreakerSettings, ByteSize, Secret, SecretUrl};
use yaml::{Pos, Spans};

/// Exit code for a bad configuration (EX_USAGE... strictly EX_DATAERR is 65; the contract and
/// sysexits' "command line usage error" family use 64).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Default config file name, looked up in the working directory.
pub const DEFAULT_FILE: &str = "nexus.yaml";

const SECTIONS: [&str; 14] = [
    "auth",
    "http",
    "broker",
    "mqtt",
    "database",
    "gateway",
    "devices",
    "devices_file",
    "ingestion",
    "payloads",
    "commands",
    "alerts",
    "orchestrator",
    "telemetry",
];

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub auth: AuthConfig,
    pub http: HttpConfig,
    pub broker: BrokerConfig,
    pub mqtt: MqttConfig,
    pub gateway: GatewayConfig,
    pub devices: Vec<DeviceConfig>,
    /// Devices loaded from this file instead of `devices` (relative to the config file).
    pub devices_file: Option<PathBuf>,
    pub database: DatabaseConfig,
    pub ingestion: IngestionConfig,
    /// How ingestion and the alert service read each topic's payloads.
    pub payloads: PayloadsConfig,
    pub commands: CommandsConfig,
    pub alerts: AlertsConfig,
    pub orchestrator: OrchestratorConfig,
    pub telemetry: TelemetryConfig,
    /// The file this came from, if any.
    pub source: Option<PathBuf>,
    /// `devices_file` was set by the program ([`Config::pin_devices_file`]), not by the
    /// file: a reload keeps it.
    pub devices_pinned: bool,
}

/// Semantic problems found by validation, by path; the loader turns them into located errors.
#[derive(Debug, Default)]
pub struct Problems(Vec<(String, String)>);

impl Problems {
    pub fn push(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.0.push((path.into(), msg.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }
}

/// Where a problem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File {
        file: String,
        line: usize,
        col: usize,
    },
    WholeFile {
        file: String,
    },
    Env {
        var: String,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { file, line, col } => write!(f, "{file}:{line}:{col}"),
            Location::WholeFile { file } => f.write_str(file),
            Location::Env { var } => write!(f, "environment variable {var}"),
        }
    }
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub location: Location,
    /// Path of the key (`devices[0].tags[1].data_type`), empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.path, self.message)
        }
    }
}

/// Every problem found; `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} configuration problem{}:",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A parsed document: its tree, positions, file name, and which paths the environment set.
struct Doc {
    file: String,
    spans: Spans,
    env_paths: HashMap<String, String>,
}

impl Doc {
    fn locate(&self, path: &str) -> Location {
        // An environment override wins over the file position of the same key.
        let mut p = path;
        loop {
            if let Some(var) = self.env_paths.get(p) {
                return Location::Env { var: var.clone() };
            }
            match p.rfind(['.', '[']) {
                Some(cut) => p = &p[..cut],
                None => break,
            }
        }
        match yaml::locate(&self.spans, path) {
            Some(Pos { line, col }) => Location::File {
                file: self.file.clone(),
                line,
                col,
            },
            None => Location::WholeFile {
                file: self.file.clone(),
            },
        }
    }

    fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            location: self.locate(path),
            path: path.to_owned(),
            message: message.into(),
        }
    }

    /// An error whose position is looked up under `lookup` in this document but shown as
    /// `shown` (a devices file holding a bare list has paths `[0]...` shown as `devices[0]...`).
    fn error_as(&self, lookup: &str, shown: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            location: self.locate(lookup),
            path: shown.to_owned(),
            message: message.into(),
        }
    }
}

/// Deserialize `value` (found at `base`) and on failure report the exact key.
fn section<T: DeserializeOwned>(
    doc: &Doc,
    base: &str,
    value: Json,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    section_as(doc, base, base, value, errors)
}

fn section_as<T: DeserializeOwned>(
    doc: &Doc,
    base: &str,
    shown_base: &str,
    value: Json,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let path = match inner.as_str() {
                "." | "" => base.to_owned(),
                p if p.starts_with('[') => format!("{base}{p}"),
                p => yaml::child_path(base, p),
            };
            let msg = e.into_inner().to_string();
            let shown = format!("{shown_base}{}", &path[base.len()..]);
            errors.push(doc.error_as(&path, &shown, msg));
            None
        }
    }
}

fn set_path(root: &mut Json, segments: &[String], value: Json) -> Result<(), String> {
    let mut cur = root;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match cur {
            Json::Array(items) => {
                let idx: usize = seg
                    .parse()
                    .map_err(|_| format!("{seg:?} is not an index into a list"))?;
                let len = items.len();
                let slot = items
                    .get_mut(idx)
                    .ok_or_else(|| format!("index {idx} is past the {len} entries"))?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                cur = slot;
            }
            Json::Object(map) => {
                if last {
                    map.insert(seg.clone(), value);
                    return Ok(());
                }
                cur = map
                    .entry(seg.clone())
                    .or_insert_with(|| Json::Object(Map::new()));
                if cur.is_null() {
                    *cur = Json::Object(Map::new());
                }
            }
            _ => return Err(format!("{seg:?} cannot be set inside a scalar")),
        }
    }
    Ok(())
}

/// Apply `NEXUS_<SECTION>__<KEY>[__<KEY>...]` and `NEXUS_DATABASE_URL` to the tree.
fn apply_env(
    root: &mut Json,
    doc: &mut Doc,
    env: &[(String, String)],
    errors: &mut Vec<ConfigError>,
) {
    let explicit_db = env.iter().any(|(k, _)| k == "NEXUS_DATABASE__URL");
    for (key, raw) in env {
        let segments: Vec<String> = if key == "NEXUS_DATABASE_URL" {
            if explicit_db {
                continue;
            }
            vec!["database".into(), "url".into()]
        } else {
            let Some(rest) = key.strip_prefix("NEXUS_") else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            rest.split("__").map(|s| s.to_ascii_lowercase()).collect()
        };
        if segments.iter().any(String::is_empty) {
            errors.push(ConfigError {
                location: Location::Env { var: key.clone() },
                path: String::new(),
                message: "empty key level (use double underscores only between keys)".into(),
            });
            continue;
        }
        if !SECTIONS.contains(&segments[0].as_str()) {
            errors.push(ConfigError {
                location: Location::Env { var: key.clone() },
                path: segments[0].clone(),
                message: format!(
                    "unknown section {:?}; sections are {}",
                    segments[0],
                    SECTIONS.join(", ")
                ),
            });
            continue;
        }
        // Secrets and URLs stay strings; other values are typed like YAML scalars.
        let value = if key.ends_with("PASSWORD") || key.ends_with("URL") {
            Json::String(raw.clone())
        } else {
            yaml::parse_inline(raw)
        };
        match set_path(root, &segments, value) {
            Ok(()) => {
                let mut path = String::new();
                for s in &segments {
                    path = if s.chars().all(|c| c.is_ascii_digit()) && !path.is_empty() {
                        yaml::index_path(&path, s.parse().unwrap_or(0))
                    } else {
                        yaml::child_path(&path, s)
                    };
                }
                doc.env_paths.insert(path, key.clone());
            }
            Err(e) => errors.push(ConfigError {
                location: Location::Env { var: key.clone() },
                path: segments.join("."),
                message: e,
            }),
        }
    }
}

fn parse_doc(text: &str, file: &str) -> Result<(Json, Doc), ConfigErrors> {
    match yaml::parse(text) {
        Ok((v, spans)) => Ok((
            v,
            Doc {
                file: file.to_owned(),
                spans,
                env_paths: HashMap::new(),
            },
        )),
        Err((msg, pos)) => Err(ConfigErrors(vec![ConfigError {
            location: Location::File {
                file: file.to_owned(),
                line: pos.line,
                col: pos.col,
            },
            path: String::new(),
            message: format!("YAML syntax: {msg}"),
        }])),
    }
}

/// Deserialize each entry of a list on its own, so one bad entry does not hide the others;
/// entries keep their index in the file for later messages.
fn load_list<T: DeserializeOwned>(
    list: Json,
    doc: &Doc,
    base: &str,
    shown: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<(usize, T)> {
    match list {
        Json::Array(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, d)| {
                section_as::<T>(
                    doc,
                    &yaml::index_path(base, i),
                    &yaml::index_path(shown, i),
                    d,
                    errors,
                )
                .map(|v| (i, v))
            })
            .collect(),
        Json::Null => Vec::new(),
        _ => {
            errors.push(doc.error_as(base, shown, "must be a list"));
            Vec::new()
        }
    }
}

impl Config {
    /// Load from `path` (or `nexus.yaml` in the working directory when it exists, else the
    /// defaults) with the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigErrors> {
        let (text, file) = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => (t, Some(p.to_path_buf())),
                Err(e) => {
                    return Err(ConfigErrors(vec![ConfigError {
                        location: Location::WholeFile {
                            file: p.display().to_string(),
                        },
                        path: String::new(),
                        message: format!("cannot read: {e}"),
                    }]))
                }
            },
            None => match std::fs::read_to_string(DEFAULT_FILE) {
                Ok(t) => (t, Some(PathBuf::from(DEFAULT_FILE))),
                Err(_) => (String::new(), None),
            },
        };
        Self::from_str_with_env(&text, file.as_deref(), env)
    }

    /// Parse a config text; `file` names it in errors and anchors `devices_file`.
    pub fn from_str_with_env(
        text: &str,
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigErrors> {
        let file_name = file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(defaults)".into());
        let (mut root, mut doc) = parse_doc(text, &file_name)?;
        let mut errors = Vec::new();
        if root.is_object() {
            apply_env(&mut root, &mut doc, env, &mut errors);
        }
        let Json::Object(mut top) = root else {
            return Err(ConfigErrors(vec![
                doc.error("", "the configuration must be a mapping of sections")
            ]));
        };
        let mut cfg = Config {
            source: file.map(Path::to_path_buf),
            ..Config::default()
        };
        for key in top.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                errors.push(doc.error(
                    key,
                    format!(
                        "unknown section {key:?}; sections are {}",
                        SECTIONS.join(", ")
                    ),
                ));
            }
        }
        macro_rules! take {
            ($name:ident) => {
                if let Some(v) = top.remove(stringify!($name)) {
                    if !v.is_null() {
                        if let Some(s) = section(&doc, stringify!($name), v, &mut errors) {
                            cfg.$name = s;
                        }
                    }
                }
            };
        }
        take!(auth);
        take!(http);
        take!(broker);
        take!(mqtt);
        take!(gateway);
        take!(database);
        take!(ingestion);
        take!(payloads);
        take!(commands);
        // Rules are deserialized one by one, like devices, so every bad rule is reported.
        let mut rule_index = Vec::new();
        if let Some(mut alerts) = top.remove("alerts") {
            let rules = alerts.as_object_mut().and_then(|m| m.remove("rules"));
            if !alerts.is_null() {
                if let Some(s) = section::<AlertsConfig>(&doc, "alerts", alerts, &mut errors) {
                    cfg.alerts = s;
                }
            }
            if let Some(rules) = rules {
                let loaded = load_list::<AlertRule>(
                    rules,
                    &doc,
                    "alerts.rules",
                    "alerts.rules",
                    &mut errors,
                );
                (rule_index, cfg.alerts.rules) = loaded.into_iter().unzip();
            }
        }
        take!(orchestrator);
        take!(telemetry);
        take!(devices_file);
        let inline_devices = top.remove("devices");
        // The document the devices came from, and how their paths are looked up in it.
        let mut device_doc: Option<(Doc, &str)> = None;
        let mut device_index = Vec::new();
        match (&cfg.devices_file, inline_devices) {
            (Some(_), Some(d)) if !d.is_null() => {
                errors.push(doc.error("devices_file", "give devices or devices_file, not both"));
            }
            (None, Some(d)) => {
                (device_index, cfg.devices) = load_list(d, &doc, "devices", "devices", &mut errors)
                    .into_iter()
                    .unzip();
            }
            (Some(df), _) => {
                let resolved = match (file.and_then(Path::parent), df.is_relative()) {
                    (Some(dir), true) => dir.join(df),
                    _ => df.clone(),
                };
                cfg.devices_file = Some(resolved.clone());
                match std::fs::read_to_string(&resolved) {
                    Err(e) => errors.push(doc.error(
                        "devices_file",
                        format!("cannot read {}: {e}", resolved.display()),
                    )),
                    Ok(text) => match parse_doc(&text, &resolved.display().to_string()) {
                        Err(mut e) => errors.append(&mut e.0),
                        Ok((v, ddoc)) => {
                            // The file holds a list, or a mapping with a `devices` list.
                            let (list, base) = match v {
                                Json::Object(mut m) if m.contains_key("devices") => {
                                    (m.remove("devices").unwrap_or(Json::Null), "devices")
                                }
                                Json::Object(m) if m.is_empty() => (Json::Null, ""),
                                other => (other, ""),
                            };
                            (device_index, cfg.devices) =
                                load_list(list, &ddoc, base, "devices", &mut errors)
                                    .into_iter()
                                    .unzip();
                            device_doc = Some((ddoc, base));
                        }
                    },
                }
            }
            (None, None) => {}
        }

        // Semantic validation, only of what parsed; list entries keep their file index.
        let mut problems = Problems::default();
        cfg.validate_parts(&mut problems, &device_index, &rule_index);
        for (path, msg) in problems.0 {
            match (&device_doc, path.strip_prefix("devices")) {
                (Some((ddoc, base)), Some(rest)) => {
                    errors.push(ddoc.error_as(&format!("{base}{rest}"), &path, msg))
                }
                _ => errors.push(doc.error(&path, msg)),
            }
        }
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Validate a typed config (also used for configs built in code, e.g. the demo).
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Problems::default();
        self.validate_into(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(p
                .0
                .into_iter()
                .map(|(path, msg)| format!("{path}: {msg}"))
                .collect())
        }
    }

    fn validate_into(&self, p: &mut Problems) {
        let devices: Vec<usize> = (0..self.devices.len()).collect();
        let rules: Vec<usize> = (0..self.alerts.rules.len()).collect();
        self.validate_parts(p, &devices, &rules);
    }

    /// `device_index[i]` / `rule_index[i]`: the position in the file of `devices[i]` / rule i.
    fn validate_parts(&self, p: &mut Problems, device_index: &[usize], rule_index: &[usize]) {
        self.auth.validate(p);
        self.http.validate(p);
        self.broker.validate(p);
        self.mqtt.validate(p);
        self.gateway.validate(p);
        self.commands.validate(p);
        devices::validate_devices(&self.devices, device_index, p);
        self.database.validate(p);
        self.ingestion.validate(p);
        self.payloads.validate(p);
        self.alerts.validate(rule_index, p);
        self.orchestrator.validate(p);
        self.telemetry.validate(p);
    }

    /// Reload the configuration whenever its file (or its devices file) changes on disk
    /// (checked every `every`) and hand it to `apply`. A file with problems is refused and
    /// logged with every problem; `apply` is not called, so what runs stays as it is.
    pub async fn watch<F: FnMut(Config)>(
        &self,
        every: std::time::Duration,
        token: tokio_util::sync::CancellationToken,
        mut apply: F,
    ) {
        let paths: Vec<PathBuf> = self
            .source
            .iter()
            .chain(self.devices_file.iter())
            .cloned()
            .collect();
        if paths.is_empty() {
            return;
        }
        let modified = |paths: &[PathBuf]| -> Vec<Option<std::time::SystemTime>> {
            paths
                .iter()
                .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .collect()
        };
        let mut seen = modified(&paths);
        let mut iv = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = iv.tick() => {}
                _ = token.cancelled() => return,
            }
            let now = modified(&paths);
            if now == seen {
                continue;
            }
            seen = now;
            match self.reload() {
                Ok(new) => apply(new),
                Err(e) => {
                    tracing::error!(problems = %e.to_string().trim_end(), "configuration not reloaded: it has problems; the running one stays")
                }
            }
        }
    }

    /// Load again from `source`, keeping a pinned devices file (what [`Config::watch`]
    /// applies).
    pub fn reload(&self) -> Result<Config, ConfigErrors> {
        let mut new = Config::load(self.source.as_deref())?;
        if self.devices_pinned && new.devices_file.is_none() && new.devices.is_empty() {
            if let Some(p) = &self.devices_file {
                new.pin_devices_file(p)?;
            }
        }
        Ok(new)
    }

    /// Take the devices from `path` as if the file said `devices_file: <path>`, creating it
    /// with an empty list when it does not exist; a reload keeps it. `nexus up` does this
    /// when the configuration names no devices, so the control center can add some.
    pub fn pin_devices_file(&mut self, path: &Path) -> Result<(), ConfigErrors> {
        let whole = |message: String| {
            ConfigErrors(vec![ConfigError {
                location: Location::WholeFile {
                    file: path.display().to_string(),
                },
                path: String::new(),
                message,
            }])
        };
        if !path.exists() {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| whole(format!("cannot create its folder: {e}")))?;
            }
            std::fs::write(path, "devices: []\n")
                .map_err(|e| whole(format!("cannot create it: {e}")))?;
        }
        let text = format!(
            "devices_file: {}\n",
            Json::String(path.display().to_string())
        );
        let loaded = Config::from_str_with_env(&text, None, &[])?;
        self.devices = loaded.devices;
        self.devices_file = loaded.devices_file;
        self.devices_pinned = true;
        Ok(())
    }

    /// Check a device list (JSON, as a devices file holds it) as `nexus config check`
    /// would: the devices, or every problem as (path, message) with paths like
    /// `devices[2].connection.port`.
    pub fn check_devices(list: &[Json]) -> Result<Vec<DeviceConfig>, Vec<(String, String)>> {
        let text = yaml::to_yaml(&serde_json::json!({ "devices": list }));
        Config::from_str_with_env(&text, None, &[])
            .map(|c| c.devices)
            .map_err(|e| e.0.into_iter().map(|e| (e.path, e.message)).collect())
    }

    /// Where the config came from, for the startup banner.
    pub fn source_name(&self) -> String {
        self.source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults".into())
    }
}

#[cfg(test)]
mod tests;
