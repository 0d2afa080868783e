//! The gateway's HTTP port against hostile requests, through the real service: a body over
//! the limit is a 413 even on routes that never read one, a browse `node` longer than OPC UA
//! allows is a 400 naming it, the HTTP guard's metrics are served from the start, the device
//! list is a viewer's and browsing a plant server an operator's.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use nexus_common::config::{Anonymous, Role, UserConfig};
use nexus_common::testing::free_port;
use support::OPERATOR;

/// `head` sent as is; the status (0: nothing listens, or no answer within 5 s) and body.
fn request(port: u16, head: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_overlong_nodes_are_refused_and_counted() {
    let broker = support::broker();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let cfg = support::config(broker.ports.tcp().port(), http, dir.path(), "");
    let (stop, task) = support::start_gateway(cfg);
    let start = Instant::now();
    while request(http, "GET /readyz HTTP/1.0\r\n\r\n").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = support::http_get(http, "/metrics");
    for name in [
        "nexus_http_panics_total 0",
        "nexus_http_timeouts_total 0",
        "nexus_http_body_too_large_total 0",
    ] {
        assert!(m.lines().any(|l| l == name), "{name} in\n{m}");
    }

    // GET routes read no body, and still a declared 2 MiB one is refused from the header.
    let (s, body) = request(
        http,
        "GET /api/v1/devices HTTP/1.0\r\nContent-Length: 2097152\r\n\r\n",
    );
    assert_eq!(s, 413, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("1048576"),
        "{body}"
    );
    let m = support::http_get(http, "/metrics");
    assert_eq!(support::metric(&m, "nexus_http_body_too_large_total"), 1.0);

    // OPC UA string node ids end at 4096 characters; a longer one never reaches a device.
    let node = "s".repeat(5000);
    let (s, body) = request(
        http,
        &format!(
            "GET /api/v1/devices/any/browse?node=ns%3D2%3Bs%3D{node} HTTP/1.0\r\n{OPERATOR}\r\n\r\n"
        ),
    );
    assert_eq!(s, 400, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("node: "),
        "{body}"
    );
    // An ordinary one goes on to the device lookup.
    let (s, _) = request(
        http,
        &format!(
            "GET /api/v1/devices/any/browse?node=ns%3D2%3Bs%3Dx HTTP/1.0\r\n{OPERATOR}\r\n\r\n"
        ),
    );
    assert_eq!(s, 404);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("gateway stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_a_viewers_and_browsing_an_operators() {
    let broker = support::broker();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut cfg = support::config(broker.ports.tcp().port(), http, dir.path(), "");
    cfg.auth.anonymous = Anonymous::Off;
    cfg.auth
        .users
        .push(UserConfig::with_password("ann", "ann-pw", Role::Viewer));
    let (stop, task) = support::start_gateway(cfg);
    let start = Instant::now();
    while request(http, "GET /readyz HTTP/1.0\r\n\r\n").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let get = |path: &str, auth: &str| request(http, &format!("GET {path} HTTP/1.0\r\n{auth}\r\n"));
    let viewer = "Authorization: Basic YW5uOmFubi1wdw==\r\n"; // ann:ann-pw
    let operator = format!("{OPERATOR}\r\n");
    let browse = "/api/v1/devices/any/browse?node=ns%3D2%3Bs%3Dx";
    // No credentials, and no anonymous access: nothing but health. All three were open once.
    for path in ["/api/v1/devices", "/api/v1/devices/any/tags", browse] {
        let (s, body) = get(path, "");
        assert_eq!(s, 401, "{path}: {body}");
    }
    assert_eq!(get("/healthz", "").0, 200);
    // A viewer lists devices and tags, and may not make the gateway browse a plant server.
    let (s, body) = get("/api/v1/devices", viewer);
    assert_eq!(s, 200, "{body}");
    assert_eq!(get("/api/v1/devices/any/tags", viewer).0, 404);
    let (s, body) = get(browse, viewer);
    assert_eq!(s, 403, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "this needs the operator role; ann is viewer");
    // An operator gets as far as the device lookup.
    assert_eq!(get(browse, &operator).0, 404);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("gateway stops")
        .unwrap()
        .unwrap();
}
