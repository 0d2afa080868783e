//! Credentials from the command line work as configuration (`nexus auth hash-password`,
//! `nexus auth new-token`), and the orchestrator's status API behind them: a viewer's, and a
//! service that cannot read a password variable does not start, naming it.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::auth::Identities;
use nexus_common::config::{Anonymous, Config, Role, UserConfig};
use nexus_common::testing::{self, free_port};
use tokio_util::sync::CancellationToken;

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

/// `nexus <args>` with `stdin` piped in (so not a terminal).
fn nexus(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(NEXUS)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn config(yaml: &str) -> Config {
    Config::from_str_with_env(yaml, None, &[]).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

#[tokio::test]
async fn a_hashed_password_from_the_command_line_logs_in() {
    // One line of stdin, without its line end; spaces inside the password are kept.
    let out = nexus(&["auth", "hash-password"], "correct horse \r\nignored\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(lines[0].starts_with("$argon2id$v=19$"), "{stdout}");
    let cfg = config(&format!(
        "auth:\n  users:\n    - {{ username: ann, password_hash: \"{}\", role: operator }}\n",
        lines[0]
    ));
    let ids = Identities::new(&cfg.auth).unwrap();
    let ann = ids.login("ann", b"correct horse ").await.unwrap();
    assert_eq!(ann.role, Role::Operator);
    assert!(ids.login("ann", b"correct horse").await.is_none());

    for empty in ["", "\n"] {
        let out = nexus(&["auth", "hash-password"], empty);
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("password"), "{err}");
    }
}

#[test]
fn a_new_token_and_its_entry_work_as_configuration() {
    let out = nexus(
        &[
            "auth",
            "new-token",
            "--name",
            "grafana: main",
            "--role",
            "operator",
        ],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let (token, entry) = (lines[0], lines[1]);
    assert!(token.starts_with("nxs_") && token.len() >= 32, "{token}");
    assert!(
        !entry.contains(token),
        "the file holds only the digest: {entry}"
    );
    let cfg = config(&format!("auth:\n  tokens:\n    {entry}\n"));
    let ids = Identities::new(&cfg.auth).unwrap();
    let id = ids.token(token).unwrap();
    assert_eq!(
        (id.name.as_str(), id.role),
        ("token:grafana: main", Role::Operator)
    );
    assert!(ids.token(&format!("{token}x")).is_none());
    // Two tokens are never the same.
    let again = nexus(&["auth", "new-token"], "");
    let again = String::from_utf8(again.stdout).unwrap();
    assert_ne!(again.lines().next(), Some(token));
    assert!(again.contains("role: viewer"), "{again}");
}

/// `GET /api/v1/status` on `port` with `auth` (an `Authorization: ...` line, or nothing).
fn status(port: u16, auth: &str) -> (u16, String) {
    let head = format!("GET /api/v1/status HTTP/1.0\r\nHost: x\r\n{auth}\r\n");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned(),
    )
}

fn orchestrator_config(mqtt: u16, http: u16) -> Config {
    let mut cfg = config(&format!(
        "mqtt: {{ host: 127.0.0.1, port: {mqtt}, username: svc, password: svc-pw, reconnect_min: 50ms }}\ntelemetry: {{ instance: {} }}\n",
        testing::unique("orch")
    ));
    cfg.orchestrator.http_listen = format!("127.0.0.1:{http}").parse().unwrap();
    cfg.auth = testing::test_auth();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_api_is_a_viewers() {
    let broker = testing::service_broker();
    let http = free_port();
    let mut cfg = orchestrator_config(broker.ports.tcp().port(), http);
    cfg.auth.anonymous = Anonymous::Off;
    cfg.auth
        .users
        .push(UserConfig::with_password("ann", "ann-pw", Role::Viewer));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_orchestrator::status::run(
        Arc::new(cfg),
        token.clone(),
    ));
    let start = Instant::now();
    while testing::http(http, "GET", "/healthz", "").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "not serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It used to answer anyone.
    let (code, body) = status(http, "");
    assert_eq!(code, 401, "{body}");
    let (code, body) = status(http, "Authorization: Basic YW5uOmFubi1wdw==\r\n"); // ann:ann-pw
    assert_eq!(code, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["platform"]["mode"], "standalone");
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("orchestrator stops")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_password_variable_that_is_not_set_stops_the_service_naming_it() {
    let broker = testing::service_broker();
    let mut cfg = orchestrator_config(broker.ports.tcp().port(), free_port());
    cfg.auth.users.push(UserConfig {
        password: None,
        password_env: Some("NEXUS_TEST_UNSET_PASSWORD_1F3A".into()),
        ..UserConfig::with_password("bob", "", Role::Viewer)
    });
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        nexus_orchestrator::status::run(Arc::new(cfg), CancellationToken::new()),
    )
    .await
    .expect("refused at once");
    let e = format!("{:#}", r.unwrap_err());
    assert_eq!(
        e,
        "auth.users: user bob: environment variable NEXUS_TEST_UNSET_PASSWORD_1F3A is not set"
    );
}
