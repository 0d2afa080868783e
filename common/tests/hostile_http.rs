//! The HTTP guard every service is served behind, built with the same assembly as the
//! service shell (`http::service_router`) around test routes that misbehave on purpose: a
//! panic is a 500 with a JSON error and counted, a body over the limit a 413, a handler past
//! the timeout a 503, and the port keeps serving after each.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use std::sync::Arc;

use nexus_common::auth::http::Routes;
use nexus_common::auth::Identities;
use nexus_common::config::{AuthConfig, Role};
use nexus_common::http::{service_router, HttpLimits, DEFAULT_MAX_BODY};
use nexus_common::telemetry::{self, Telemetry};
use nexus_common::testing;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Open to the anonymous viewers of 127.0.0.1 (the default `auth`), as the guard must hold
/// before anyone is authenticated.
fn routes() -> Routes {
    Routes::new()
        .get("/panic", Role::Viewer, || async {
            let v: Vec<u8> = Vec::new();
            // An index out of bounds, as a real bug would be.
            v[usize::from(v.is_empty())].to_string()
        })
        .get("/panic-str", Role::Viewer, || async {
            if true {
                panic!("a static message");
            }
            "unreachable"
        })
        .post("/echo", Role::Viewer, |body: String| async move {
            body.len().to_string()
        })
        .get("/slow", Role::Viewer, || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        })
}

fn assemble(t: &Telemetry, routes: Routes, limits: HttpLimits) -> axum::Router {
    let auth = AuthConfig::default();
    let ids = Arc::new(Identities::new(&auth).unwrap());
    service_router(t, routes, limits, ids, &auth).unwrap()
}

/// Serve `routes` behind the guard with `limits`; the address and telemetry.
async fn serve(limits: HttpLimits) -> (std::net::SocketAddr, Telemetry, CancellationToken) {
    let t = Telemetry::new("guarded");
    let app = assemble(&t, routes(), limits);
    let token = CancellationToken::new();
    let (addr, _task) = telemetry::serve("127.0.0.1:0".parse().unwrap(), app, token.clone())
        .await
        .unwrap();
    (addr, t, token)
}

/// `head` then `body` (written alongside the read, so an early answer is seen); the status
/// (0: none) and the body of the answer.
async fn request(addr: std::net::SocketAddr, head: &str, body: Vec<u8>) -> (u16, String) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    w.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&body).await;
        w
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut out)).await;
    drop(writer.await);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned(),
    )
}

async fn get_path(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    request(addr, &format!("GET {path} HTTP/1.0\r\n\r\n"), Vec::new()).await
}

fn metric(t: &Telemetry, name: &str) -> f64 {
    testing::metric_value(&t.render(), name).unwrap_or(-1.0)
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_with_a_json_error_and_is_counted() {
    let (addr, t, token) = serve(HttpLimits::default()).await;
    assert_eq!(metric(&t, "nexus_http_panics_total"), 0.0);
    for (i, path) in ["/panic", "/panic-str"].into_iter().enumerate() {
        let (s, body) = get_path(addr, path).await;
        assert_eq!(s, 500, "{path}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        let e = body["error"].as_str().unwrap();
        assert!(e.starts_with("internal error"), "{e}");
        // The panic's own text stays in the log.
        assert!(!e.contains("static message") && !e.contains("index"), "{e}");
        assert_eq!(metric(&t, "nexus_http_panics_total"), (i + 1) as f64);
    }
    // The port still serves, /metrics included.
    assert_eq!(get_path(addr, "/healthz").await.0, 200);
    let (s, m) = get_path(addr, "/metrics").await;
    assert_eq!(s, 200);
    assert_eq!(
        testing::metric_value(&m, "nexus_http_panics_total"),
        Some(2.0)
    );
    token.cancel();
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_however_it_is_sent() {
    let (addr, t, token) = serve(HttpLimits::default()).await;
    assert_eq!(DEFAULT_MAX_BODY, 1024 * 1024);
    let post = |len: usize| format!("POST /echo HTTP/1.0\r\nContent-Length: {len}\r\n\r\n");
    // At the limit: read in full.
    let (s, body) = request(addr, &post(DEFAULT_MAX_BODY), vec![b'x'; DEFAULT_MAX_BODY]).await;
    assert_eq!((s, body.as_str()), (200, "1048576"));
    // Declared over it: refused from the header.
    let (s, body) = request(addr, &post(DEFAULT_MAX_BODY + 1), Vec::new()).await;
    assert_eq!(s, 413, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["error"],
        "body: larger than the limit of 1048576 bytes"
    );
    // Streamed without a length: cut when it passes the limit.
    let mut chunked = Vec::new();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        chunked.extend_from_slice(&[b'x'; 64 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (s, _) = request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
        chunked,
    )
    .await;
    assert_eq!(s, 413);
    assert_eq!(metric(&t, "nexus_http_body_too_large_total"), 2.0);
    assert_eq!(get_path(addr, "/healthz").await.0, 200);
    token.cancel();
}

#[tokio::test]
async fn a_handler_past_the_timeout_is_a_503_and_is_counted() {
    let limits = HttpLimits {
        request_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    };
    let (addr, t, token) = serve(limits).await;
    let started = std::time::Instant::now();
    let (s, body) = get_path(addr, "/slow").await;
    assert_eq!(s, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(4));
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "the request took longer than 200ms");
    assert_eq!(metric(&t, "nexus_http_timeouts_total"), 1.0);
    assert_eq!(get_path(addr, "/healthz").await.0, 200);
    token.cancel();
}

#[test]
fn the_guard_registers_its_metrics_once_per_telemetry_as_documented() {
    let t = Telemetry::new("twice");
    let _first = assemble(&t, Routes::new(), HttpLimits::default());
    // A second assembly on the same telemetry (a restarted service) shares the counters.
    let _second = assemble(&t, Routes::new(), HttpLimits::default());
    // Every metric the HTTP section of docs/security.md names is served, and those are the
    // guard's three.
    testing::assert_documented_metrics_served("security.md#HTTP robustness", &t.render());
    assert_eq!(
        testing::documented_metrics("security.md#HTTP robustness"),
        [
            "nexus_http_panics_total",
            "nexus_http_body_too_large_total",
            "nexus_http_timeouts_total"
        ]
    );
}
