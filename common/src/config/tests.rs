use std::path::Path;
use std::time::Duration;

use super::*;

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_str_with_env(text, Some(Path::new("nexus.yaml")), &[])
}

fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_str_with_env(text, Some(Path::new("nexus.yaml")), &env)
}

fn errors(text: &str) -> Vec<String> {
    env_errors(text, &[])
}

/// Every problem of `text`, as printed; empty when it loads (for the sections' own tests).
pub(super) fn problems(text: &str) -> String {
    match Config::from_str_with_env(text, None, &[]) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// Every problem of `text` with the environment `env`, as printed.
fn env_errors(text: &str, env: &[(&str, &str)]) -> Vec<String> {
    load_env(text, env)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn assert_has(errs: &[String], want: &str) {
    assert!(
        errs.iter().any(|e| e.contains(want)),
        "no error containing {want:?} in:\n{}",
        errs.join("\n")
    );
}

const DEVICE: &str = r#"
devices:
  - id: plc-001
    protocol: modbus
    uns_prefix: acme/chicago/bldg-a/line-1
    poll_interval: 1s
    connection: { host: 127.0.0.1, port: 502, unit_id: 1, timeout: 2s }
    tags:
      - id: temperature
        address: "HR:100"
        data_type: float32
        byte_order: ABCD
        scale: 0.1
        offset: 0
        unit: degC
        deadband: 0.2
        access: readwrite
        min: 0
        max: 150
"#;

#[test]
fn defaults_without_a_file() {
    let c = Config::from_str_with_env("", None, &[]).unwrap();
    assert!(c.broker.enabled);
    assert_eq!(c.broker.port, Some(1883));
    assert_eq!(c.broker.ws_port, Some(8083));
    assert_eq!(c.broker.max_inflight, 128);
    assert_eq!(c.broker.service_max_inflight, 1024);
    assert_eq!(c.broker.max_topic_aliases, 10);
    assert!(!c.gateway.sparkplug.enabled);
    assert_eq!(c.gateway.sparkplug.group_id, "nexus");
    assert!(c.gateway.sparkplug.uns);
    assert_eq!(c.gateway.sparkplug.data_qos, 1);
    assert_eq!(c.mqtt.host, "127.0.0.1");
    assert_eq!(c.mqtt.effective_port(), 1883);
    assert!(c.mqtt.persistent_session);
    assert_eq!(c.gateway.http_listen.port(), 4000);
    assert_eq!(c.commands.http_listen.port(), 4100);
    assert_eq!(c.orchestrator.http_listen.port(), 5000);
    assert_eq!(c.alerts.http_listen.port(), 6000);
    assert_eq!(c.ingestion.http_listen.port(), 7000);
    assert!(c.ingestion.database_url.is_none());
    assert!(c.devices.is_empty());
    assert_eq!(c.source_name(), "built-in defaults");
}

#[test]
fn contract_device_example_loads() {
    let c = load(DEVICE).unwrap();
    let d = &c.devices[0];
    assert_eq!(d.id.as_str(), "plc-001");
    assert_eq!(d.protocol, Protocol::Modbus);
    assert_eq!(d.connection.timeout(), Duration::from_secs(2));
    let t = &d.tags[0];
    assert_eq!(t.data_type, DataType::Float32);
    assert_eq!(t.byte_order, ByteOrder::ABCD);
    assert!(t.access.writable());
    assert_eq!(t.max, Some(150.0));
}

#[test]
fn contract_opcua_s7_and_alert_examples_load() {
    let text = r#"
devices:
  - id: ua-1
    protocol: opcua
    uns_prefix: acme/ghent/prd/line-1
    poll_interval: 500ms
    mode: poll
    connection: { endpoint: "opc.tcp://10.0.0.5:4840/", security_policy: None, security_mode: None,
                  auth: anonymous, timeout: 2s }
    tags:
      - { id: temperature, node_id: "ns=2;s=Demo.Temperature", data_type: float64 }
  - id: s7-1
    protocol: s7
    uns_prefix: acme/ghent/prd/line-2
    poll_interval: 200ms
    connection: { host: 10.0.0.6, port: 102, rack: 0, slot: 1, timeout: 2s }
    tags:
      - { id: flow, address: DB10.DBD4, data_type: real }
      - { id: valve, address: DB10.DBX2.3, data_type: bool }
alerts:
  rules:
    - id: hot
      topic: acme/+/+/+/+/temp
      condition: { type: high, limit: 80, deadband: 2 }
      on_delay: 0s
      off_delay: 0s
      severity: 700
      message: "{topic} is {value} above {limit}"
"#;
    let c = load(text).unwrap();
    assert_eq!(c.devices.len(), 2);
    assert_eq!(c.alerts.rules[0].severity, Severity(700));
    assert!(
        matches!(c.alerts.rules[0].condition, Condition::High { limit, deadband } if limit == 80.0 && deadband == 2.0)
    );
}

#[test]
fn env_overrides_any_key() {
    let c = load_env(
        DEVICE,
        &[
            ("NEXUS_MQTT__HOST", "broker.plant"),
            ("NEXUS_MQTT__PORT", "8883"),
            ("NEXUS_MQTT__PASSWORD", "123456"),
            ("NEXUS_MQTT__USERNAME", "svc"),
            ("NEXUS_BROKER__WS_PORT", "null"),
            ("NEXUS_GATEWAY__HTTP_LISTEN", "127.0.0.1:4444"),
            ("NEXUS_DEVICES__0__POLL_INTERVAL", "250ms"),
            ("NEXUS_DATABASE_URL", "postgres://u:pw@db/hist"),
            ("HOME", "/root"),
            ("NEXUS_UNRELATED", "x"),
        ],
    )
    .unwrap();
    assert_eq!(c.mqtt.host, "broker.plant");
    assert_eq!(c.mqtt.port, Some(8883));
    assert_eq!(c.mqtt.password.as_ref().map(Secret::expose), Some("123456"));
    assert_eq!(c.broker.ws_port, None);
    assert_eq!(c.gateway.http_listen.port(), 4444);
    assert_eq!(c.devices[0].poll_interval, Duration::from_millis(250));
    assert_eq!(
        c.database.url.as_ref().map(SecretUrl::expose),
        Some("postgres://u:pw@db/hist")
    );
}

#[test]
fn explicit_section_key_beats_short_database_url() {
    let c = load_env(
        "",
        &[
            ("NEXUS_DATABASE_URL", "postgres://a/x"),
            ("NEXUS_DATABASE__URL", "postgres://b/y"),
        ],
    )
    .unwrap();
    assert_eq!(c.database.url.unwrap().expose(), "postgres://b/y");
}

#[test]
fn the_database_section_and_its_old_keys() {
    let c = load_env(
        "database:\n  url: postgres://nexus@db/h\n  ca_file: /etc/nexus/db-ca.pem\n  pool_size: 8\n  connect_timeout: 3s\n  statement_timeout: 1m\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.database.url.unwrap().expose(), "postgres://nexus@db/h");
    assert_eq!(c.database.pool_size, 8);
    assert_eq!(c.database.connect_timeout, Duration::from_secs(3));
    assert_eq!(c.database.statement_timeout, Duration::from_secs(60));
    let d = DatabaseConfig::default();
    assert_eq!(
        (d.pool_size, d.connect_timeout, d.statement_timeout),
        (4, Duration::from_secs(10), Duration::from_secs(30))
    );
    // The keys of before name their new place, in the file and from the environment.
    let errs = env_errors(
        "ingestion:\n  database_url: postgres://nexus@db/h\n  database_ca_file: /ca.pem\n",
        &[],
    );
    assert_has(
        &errs,
        "nexus.yaml:2:3: ingestion.database_url: moved: set database.url",
    );
    assert_has(
        &errs,
        "nexus.yaml:3:3: ingestion.database_ca_file: moved: set database.ca_file",
    );
    let errs = env_errors("", &[("NEXUS_INGESTION__DATABASE_URL", "postgres://b/y")]);
    assert_has(
        &errs,
        "environment variable NEXUS_INGESTION__DATABASE_URL: ingestion.database_url: moved",
    );
    let errs = env_errors(
        "database:\n  url: mysql://x\n  pool_size: 0\n  statement_timeout: 0s\n",
        &[],
    );
    assert_has(&errs, "database.url: mysql://x is not a postgres:// URL");
    assert_has(&errs, "database.pool_size: must be between 1 and 64");
    assert_has(&errs, "database.statement_timeout: must be at least 100ms");
}

#[test]
fn env_errors_name_the_variable() {
    let errs = env_errors("", &[("NEXUS_MQTT__PORT", "lots"), ("NEXUS_FROB__X", "1")]);
    assert_has(
        &errs,
        "environment variable NEXUS_MQTT__PORT: mqtt.port: invalid type: string \"lots\"",
    );
    assert_has(
        &errs,
        "environment variable NEXUS_FROB__X: frob: unknown section \"frob\"",
    );
}

#[test]
fn unknown_keys_point_at_their_line() {
    let errs = errors("mqtt:\n  host: a\n  hots: b\n");
    assert_has(&errs, "nexus.yaml:3:3: mqtt.hots: unknown field `hots`");
    let errs = errors("brokr:\n  port: 1\n");
    assert_has(&errs, "nexus.yaml:1:1: brokr: unknown section \"brokr\"");
}

#[test]
fn type_errors_point_at_the_value() {
    let errs = errors("broker:\n  port: 99999\n");
    assert_has(
        &errs,
        "nexus.yaml:2:3: broker.port: invalid value: integer `99999`",
    );
    let errs = errors("mqtt:\n  keep_alive: 30\n");
    assert_has(
        &errs,
        "mqtt.keep_alive: invalid duration 30: write it with a unit",
    );
    let errs = errors("mqtt:\n  keep_alive: 30 parsecs\n");
    assert_has(&errs, "invalid duration \"30 parsecs\"");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
broker:
  port: "x"
mqtt:
  inflight: 0
devices:
  - id: a
    protocol: modbus
    uns_prefix: acme/x
    connection: { host: h }
    tags:
      - { id: t1, address: "HR:1", data_type: flot32 }
  - id: b
    protocol: modbus
    uns_prefix: acme//x
    connection: { host: h }
    tags:
      - { id: t1, address: "HR:1", data_type: float32 }
  - id: c
    protocol: modbus
    uns_prefix: acme/x
    connection: { host: h }
    tags:
      - { id: t1, address: "HR:1", data_type: int16, byte_order: ABDC }
"#;
    let errs = errors(text);
    assert_has(
        &errs,
        "devices[2].tags[0].byte_order: unknown variant `ABDC`",
    );
    assert_has(&errs, "nexus.yaml:3:3: broker.port: invalid type");
    assert_has(
        &errs,
        "nexus.yaml:12:36: devices[0].tags[0].data_type: unknown variant `flot32`",
    );
    assert_has(&errs, "nexus.yaml:15:5: devices[1].uns_prefix: topic \"acme//x\" has an empty level at position 2");
    // mqtt parsed fine, so its semantic check runs too.
    assert_has(&errs, "mqtt.inflight: must be at least 1");
}

#[test]
fn in_flight_windows_of_zero_are_refused() {
    let errs = errors("broker: { max_inflight: 0, service_max_inflight: 0 }\n");
    assert_has(&errs, "broker.max_inflight: must be at least 1");
    assert_has(&errs, "broker.service_max_inflight: must be at least 1");
}

#[test]
fn device_rejections_name_device_and_tag() {
    let text = r#"
devices:
  - id: plc-1
    protocol: modbus
    uns_prefix: acme/site
    connection: { host: h, endpoint: "opc.tcp://x" }
    tags:
      - { id: a, address: "HR:10", data_type: float32 }
      - { id: b, address: "HR:11", data_type: int16 }
      - { id: c, address: "HR:65535", data_type: float64 }
      - { id: d, address: "XX:1", data_type: int16 }
      - { id: e, address: "HR:20", data_type: int16, byte_order: CDAB }
      - { id: a, address: "HR:30", data_type: int16 }
      - { id: f, address: "IR:40", data_type: int16, access: readwrite }
      - { id: g, address: "CO:1", data_type: int16 }
      - { id: h, address: "HR:50", data_type: int16, min: 10, max: 5 }
      - { id: i, address: "HR:60", data_type: real }
      - { id: j, address: "HR:70", data_type: string }
      - { id: k, address: "HR:80.1", data_type: bool }
      - { id: l, address: "HR:80.2", data_type: bool }
  - id: plc-1
    protocol: opcua
    uns_prefix: acme/site
    connection: { endpoint: "http://x" }
    tags:
      - { id: x, address: "HR:1", data_type: float64 }
"#;
    let errs = errors(text);
    assert_has(
        &errs,
        "devices[0].connection.endpoint: endpoint does not apply to a Modbus device",
    );
    assert_has(&errs, "devices[0].tags[1].address: device plc-1: tag b overlaps tag a (registers 11..11 and 10..11)");
    assert_has(
        &errs,
        "devices[0].tags[2].address: HR:65535 with 4 registers runs past 65535",
    );
    assert_has(
        &errs,
        "devices[0].tags[3].address: invalid Modbus address \"XX:1\"",
    );
    assert_has(
        &errs,
        "devices[0].tags[5].id: device plc-1: tag a is also tags[0]",
    );
    assert_has(
        &errs,
        "devices[0].tags[6].access: input registers and discrete inputs are read-only",
    );
    assert_has(
        &errs,
        "devices[0].tags[7].data_type: coils and discrete inputs hold bool values",
    );
    assert_has(&errs, "devices[0].tags[8].min: min 10 is above max 5");
    assert_has(
        &errs,
        "devices[0].tags[9].data_type: real is not a modbus data type",
    );
    assert_has(
        &errs,
        "devices[0].tags[10].length: a string tag needs length",
    );
    assert!(
        !errs.iter().any(|e| e.contains("tags[12]")),
        "bits of one register may share it: {errs:?}"
    );
    assert_has(&errs, "devices[1].id: device plc-1 is also devices[0]");
    assert_has(
        &errs,
        "devices[1].connection.endpoint: \"http://x\" is not an opc.tcp:// URL",
    );
    assert_has(
        &errs,
        "devices[1].tags[0].address: an OPC UA tag uses node_id, not address",
    );
    // Each error carries the line of its key.
    assert_has(&errs, "nexus.yaml:9:");
}

#[test]
fn alert_rule_rejections_name_the_rule() {
    let text = r#"
alerts:
  rules:
    - { id: hi, topic: "acme/+/temp", condition: { type: high, limit: 10 } }
    - { id: lo, topic: "acme/+/temp", condition: { type: low, limit: 20 } }
    - { id: bad-filter, topic: "acme/#/x", condition: { type: bad_quality } }
    - { id: weird, topic: "a/b", condition: { type: sideways, limit: 1 } }
    - { id: hi, topic: "a/b", condition: { type: stale, after: 0s } }
    - { id: sev, topic: "a/b", condition: { type: bad_quality }, severity: 5000 }
"#;
    let errs = errors(text);
    assert!(
        errs.iter()
            .any(|e| e.contains("rule hi: high limit 10 must be above low limit 20 of rule lo")),
        "{errs:?}"
    );
    assert_has(&errs, "alerts.rules[2].topic: rule bad-filter: filter \"acme/#/x\": '#' must be a whole level and the last one");
    assert_has(
        &errs,
        "alerts.rules[3].condition.type: unknown variant `sideways`",
    );
    assert_has(&errs, "alerts.rules[4].id: rule hi is also alerts.rules[0]");
    assert_has(&errs, "rule hi: stale needs a positive time");
    assert_has(
        &errs,
        "alerts.rules[5].severity: severity 5000 is not between 1 and 1000",
    );
}

#[test]
fn sparkplug_ids_and_qos_are_checked() {
    let errs = errors(
        "gateway:\n  sparkplug:\n    enabled: true\n    group_id: a/b\n    edge_node_id: \"\"\n    data_qos: 2\n",
    );
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs.iter()
            .any(|e| e.contains("gateway.sparkplug.group_id") && e.contains('/')),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("gateway.sparkplug.edge_node_id")),
        "{errs:?}"
    );
    assert_has(&errs, "gateway.sparkplug.data_qos: must be 0 or 1, not 2");
}

#[test]
fn yaml_syntax_errors_are_located() {
    let errs = errors("mqtt:\n  host: [a\n");
    assert!(errs[0].starts_with("nexus.yaml:"), "{errs:?}");
    assert!(errs[0].contains("YAML syntax"), "{errs:?}");
}

#[test]
fn users_tokens_and_acl_are_checked() {
    let errs = errors(
        "auth:\n  users:\n    - { username: op }\n    - { username: op, password_env: OP_PW, role: operator }\n    - { username: plain, password: hunter2 }\n    - { username: weak, password_hash: \"md5:abc\" }\n    - { username: bridge, password_env: B, role: publisher }\n    - { username: viewer2, password_env: V, publish: [\"a/#\"] }\n    - { username: sys, password_env: S, role: publisher, publish: [\"$nexus/#\"] }\n  tokens:\n    - { name: grafana, sha256: abc }\n    - { name: svc, token_env: T, role: service }\n  max_sessions: 0\nbroker:\n  acl:\n    - { permission: allow, action: publish, topic: \"a/#/b\" }\n",
    );
    for expected in [
        "auth.users[0]: user \"op\" needs password_hash or password_env",
        "auth.users[1].username: user \"op\" is listed twice",
        "auth.users[2].password: plain passwords are not accepted in the file",
        "auth.users[3].password_hash: not a password hash in PHC form",
        "auth.users[4].publish: a publisher needs the topic filters it may publish to",
        "auth.users[5].publish: only the publisher role takes publish filters (this user is viewer)",
        "auth.users[6].publish[0]: a publisher may not publish $ topics",
        "auth.tokens[0].sha256: must be 64 hex digits",
        "auth.tokens[1].role: the service role belongs to Nexus's own services",
        "auth.max_sessions: must be at least 1",
        "broker.acl[0].topic: filter \"a/#/b\"",
    ] {
        assert_has(&errs, expected);
    }
    assert!(
        !errs.iter().any(|e| e.contains("hunter2")),
        "a refused plain password is never echoed: {errs:?}"
    );
}

#[test]
fn moved_broker_keys_say_where_they_went() {
    let errs = errors(
        "broker:\n  users: []\n  allow_anonymous: true\n  anonymous_role: viewer\n  port: null\n  ws_port: null\n",
    );
    assert_has(&errs, "broker.users: moved: list users in auth.users");
    assert_has(&errs, "broker.allow_anonymous: moved: set auth.anonymous");
    assert_has(
        &errs,
        "broker.anonymous_role: gone: anonymous clients are read-only",
    );
    assert_has(&errs, "broker.port: every listener is off");
    let c = load_env(
        "broker:\n  port: null\n  tls: { cert_file: c.pem, key_file: k.pem, ws_port: 8884 }\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.broker.port, None);
    assert_eq!(
        c.broker.tls.map(|t| (t.port, t.ws_port)),
        Some((8883, Some(8884)))
    );
}

#[test]
fn secrets_never_show_in_debug() {
    let c = load_env(
        "mqtt:\n  username: svc\n  password: hunter2\nauth:\n  users:\n    - { username: op, password_hash: \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$opsecretopsecretopsecretopsecretopsecretops\", role: operator }\n",
        &[("NEXUS_DATABASE_URL", "postgres://nexus:dbsecret@db/h")],
    )
    .unwrap();
    let dump = format!("{c:?}");
    for secret in ["hunter2", "opsecret", "dbsecret"] {
        assert!(!dump.contains(secret), "{secret} leaked in {dump}");
    }
    assert!(dump.contains("postgres://nexus:***@db/h"));
}

#[test]
fn devices_file_is_loaded_relative_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let devices = DEVICE.replace("devices:\n", "");
    std::fs::write(dir.path().join("devices.yaml"), &devices).unwrap();
    std::fs::write(
        dir.path().join("nexus.yaml"),
        "devices_file: devices.yaml\n",
    )
    .unwrap();
    let c = Config::load_with_env(Some(&dir.path().join("nexus.yaml")), &[]).unwrap();
    assert_eq!(c.devices.len(), 1);
    // Errors in the devices file name that file and its line.
    std::fs::write(
        dir.path().join("devices.yaml"),
        devices.replace("float32", "float33"),
    )
    .unwrap();
    let errs = Config::load_with_env(Some(&dir.path().join("nexus.yaml")), &[])
        .unwrap_err()
        .to_string();
    assert!(
        errs.contains("devices.yaml:10:9: devices[0].tags[0].data_type: unknown variant `float33`"),
        "{errs}"
    );
    let missing = Config::load_with_env(Some(&dir.path().join("nope.yaml")), &[])
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.yaml: cannot read"), "{missing}");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = Config::from_str_with_env(&text, None, &[]);
        }

        #[test]
        fn yaml_like_text_never_panics(lines in proptest::collection::vec(
            "( {0,4})(broker|mqtt|devices|alerts|rules|- id|port|tags|host|topic|condition)(: )([a-z0-9:/\\[\\]{}, -]{0,20})", 0..12)) {
            let text = lines.join("\n");
            let _ = Config::from_str_with_env(&text, None, &[]);
        }

        #[test]
        fn arbitrary_env_never_panics(key in "NEXUS_[A-Z_]{0,30}", value in "\\PC{0,30}") {
            let _ = Config::from_str_with_env("", None, &[(key, value)]);
        }
    }
}

#[test]
fn ingestion_settings_load_and_bad_ones_are_named() {
    let c = load(
        "ingestion:\n  filters: [\"acme/#\", \"spBv1.0/#\"]\n  shared_group: hist\n  wal_max_size: 64MiB\n  batch_size: 10000\n  batch_timeout: 250ms\n  retention: {raw: 90d}\n  compress_after: null\n",
    )
    .unwrap();
    assert_eq!(c.ingestion.filters, vec!["acme/#", "spBv1.0/#"]);
    assert_eq!(c.ingestion.wal_max_size.0, 64 * 1024 * 1024);
    assert_eq!(c.ingestion.batch_timeout, Duration::from_millis(250));
    assert_eq!(
        c.ingestion.retention.raw,
        Some(Duration::from_secs(90 * 86_400))
    );
    assert_eq!(c.ingestion.compress_after, None);
    let d = load("{}").unwrap();
    assert_eq!(d.ingestion.batch_size, 5000);
    assert_eq!(d.ingestion.writers, 4);
    assert_eq!(d.ingestion.shared_group, "nexus-ingest");
    assert_eq!(
        d.ingestion.compress_after,
        Some(Duration::from_secs(7 * 86_400))
    );

    let errs = errors(
        "ingestion:\n  filters: [\"a/#/b\"]\n  shared_group: \"a/b\"\n  wal_segment_size: 1kB\n  writers: 0\n  batch_timeout: 0s\n",
    );
    assert_has(&errs, "ingestion.filters[0]: \"a/#/b\"");
    assert_has(&errs, "ingestion.shared_group: must not contain");
    assert_has(&errs, "ingestion.wal_segment_size: must be at least 64KiB");
    assert_has(&errs, "ingestion.writers: must be between 1 and 64");
    assert_has(&errs, "ingestion.batch_timeout: must be more than 0");
    let errs = errors("ingestion:\n  batch_timeout: 5\n");
    assert_has(
        &errs,
        "nexus.yaml:2:3: ingestion.batch_timeout: invalid duration 5",
    );
}

#[test]
fn s7_addresses_parse_and_bad_ones_say_why() {
    let a = S7Address::parse("DB10.DBD4").unwrap();
    assert_eq!(
        (a.area, a.byte, a.bit, a.width),
        (S7Area::Db(10), 4, None, 4)
    );
    let a = S7Address::parse("db10.dbx2.3").unwrap();
    assert_eq!(
        (a.area, a.byte, a.bit, a.width),
        (S7Area::Db(10), 2, Some(3), 0)
    );
    for (s, area, byte, bit, width) in [
        ("MW20", S7Area::Merker, 20, None, 2),
        ("M20.1", S7Area::Merker, 20, Some(1), 0),
        ("I0.1", S7Area::Input, 0, Some(1), 0),
        ("Q0.0", S7Area::Output, 0, Some(0), 0),
        ("IB3", S7Area::Input, 3, None, 1),
        ("QD8", S7Area::Output, 8, None, 4),
        ("DB1.DBB100", S7Area::Db(1), 100, None, 1),
    ] {
        let a = S7Address::parse(s).unwrap();
        assert_eq!(
            (a.area, a.byte, a.bit, a.width),
            (area, byte, bit, width),
            "{s}"
        );
    }
    for (s, why) in [
        ("DB10", "DB<n>.DB"),
        ("DB0.DBW0", "1-65535"),
        ("DB1.DBZ0", "X, B, W or D"),
        ("DB1.DBX0", "needs .<bit>"),
        ("DB1.DBX0.8", "0-7"),
        ("MW2.1", "only X"),
        ("Z10", "unknown area"),
        ("DB1.DBDx", "must be a number"),
    ] {
        let e = S7Address::parse(s).unwrap_err();
        assert!(e.contains(why), "{s}: {e}");
    }
    assert!(S7Address::parse("DB1.DBD0")
        .unwrap()
        .check_type(DataType::Real)
        .is_ok());
    let e = S7Address::parse("DB1.DBW0")
        .unwrap()
        .check_type(DataType::Real)
        .unwrap_err();
    assert!(e.contains("real needs a d address"), "{e}");

    let errs = errors(
        "devices:\n  - id: s7-1\n    protocol: s7\n    uns_prefix: a/b\n    connection: { host: 10.0.0.6, rack: 0, slot: 1 }\n    tags:\n      - { id: flow, address: DB10.DBW4, data_type: real }\n      - { id: x, address: DB10.QQ, data_type: int }\n      - { id: sw, address: I0.1, data_type: bool, access: readwrite }\n",
    );
    assert_has(
        &errs,
        "devices[0].tags[0].data_type: DB10.DBW4: real needs a d address",
    );
    assert_has(
        &errs,
        "devices[0].tags[1].address: invalid S7 address \"DB10.QQ\"",
    );
    assert_has(
        &errs,
        "devices[0].tags[2].access: process inputs (I) are read-only",
    );
    let errs = errors(
        "devices:\n  - id: s7-2\n    protocol: s7\n    uns_prefix: a/b\n    connection: { host: 10.0.0.6, max_register_gap: 4 }\n    tags:\n      - { id: name, address: DB1.DBB0, data_type: string, length: 300 }\n",
    );
    assert_has(
        &errs,
        "devices[0].tags[0].length: an S7 string holds 1 to 254",
    );
    assert_has(&errs, "max_register_gap");
}

#[test]
fn webhook_urls_are_secrets() {
    let c = load_env(
        "alerts:\n  webhooks:\n    - { url: \"https://hooks.example.com/services/T0/B0/SECRETTOKEN?x=1\" }\n    - { url: \"https://u:pw@example.org:8443/h\", name: pager }\n",
        &[],
    )
    .unwrap();
    let hooks = &c.alerts.webhooks;
    assert_eq!(hooks[0].label(0), "webhook-1");
    assert_eq!(hooks[1].label(1), "pager");
    assert_eq!(hooks[0].origin(), "https://hooks.example.com");
    assert_eq!(hooks[1].origin(), "https://example.org:8443");
    let dump = format!("{c:?}");
    assert!(!dump.contains("SECRETTOKEN"), "{dump}");
    let errs =
        errors("alerts:\n  webhooks:\n    - { url: \"ftp://x/SECRETTOKEN\", name: \"a b\" }\n");
    assert_has(
        &errs,
        "alerts.webhooks[0].url: is not an http:// or https:// URL",
    );
    assert_has(&errs, "alerts.webhooks[0].name: \"a b\"");
    assert!(errs.iter().all(|e| !e.contains("SECRETTOKEN")), "{errs:?}");
}

#[test]
fn required_database_tls_refuses_a_url_without_it() {
    let errs =
        errors("database:\n  url: postgres://nexus@db/h?sslmode=disable\n  require_tls: true\n");
    assert_has(
        &errs,
        "database.url: sslmode=disable contradicts database.require_tls: true",
    );
    assert!(load_env(
        "database:\n  url: postgres://nexus@db/h\n  require_tls: true\n",
        &[]
    )
    .is_ok());
}
