//! Authentication on every HTTP port, through real HTTP to the assembly the service shell
//! serves (`http::service_router`) with test routes of each role: no credentials, Basic,
//! bearer tokens, session login and logout, wrong passwords that do not tell whether the user
//! exists, the session cap, the Origin check on writes with a browser's credentials, `/metrics`
//! open or not, anonymous viewers from loopback only, and arbitrary `Authorization` headers.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::MockConnectInfo;
use axum::Json;
use nexus_common::auth::http::{Caller, Routes, SESSION_COOKIE};
use nexus_common::auth::{hash_password, token_sha256, Identities};
use nexus_common::config::{
    Anonymous, AuthConfig, MetricsAccess, Role, Secret, TokenConfig, UserConfig,
};
use nexus_common::http::{service_router, HttpLimits};
use nexus_common::telemetry::{self, Telemetry};
use nexus_common::testing;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const OPS_TOKEN: &str = "nxs_0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// Users: those of `testing::test_auth` (op / op-pw is the operator), a viewer ann / ann-pw,
/// an admin whose password is an argon2 hash (boss / boss-pw); a token of the operator role.
fn auth(anonymous: Anonymous, metrics: MetricsAccess, max_sessions: usize) -> AuthConfig {
    let mut a = testing::test_auth();
    a.users
        .push(UserConfig::with_password("ann", "ann-pw", Role::Viewer));
    a.users.push(UserConfig {
        password: None,
        password_hash: Some(Secret::new(hash_password("boss-pw"))),
        ..UserConfig::with_password("boss", "", Role::Admin)
    });
    a.tokens.push(TokenConfig {
        name: "ops".into(),
        sha256: Some(token_sha256(OPS_TOKEN)),
        token_env: None,
        role: Role::Operator,
    });
    a.anonymous = anonymous;
    a.metrics = metrics;
    a.max_sessions = max_sessions;
    a
}

async fn me(Caller(id): Caller) -> Json<Value> {
    Json(json!({"name": id.name, "role": id.role.as_str()}))
}

async fn page() -> &'static str {
    "<html>login first</html>"
}

fn routes() -> Routes {
    Routes::new()
        .public_get("/", page)
        .public_get("/app", page)
        .public_get("/app/assets/{*file}", page)
        .post("/app/assets/{*file}", Role::Viewer, me)
        .get("/api/v1/read", Role::Viewer, me)
        .post("/api/v1/act", Role::Operator, me)
        .post("/api/v1/configure", Role::Admin, me)
}

struct Port {
    addr: SocketAddr,
    t: Telemetry,
    _stop: tokio_util::sync::DropGuard,
}

impl Port {
    fn metric(&self, name: &str) -> f64 {
        testing::metric_value(&self.t.render(), name).unwrap_or(-1.0)
    }
}

fn app(cfg: &AuthConfig, t: &Telemetry) -> axum::Router {
    let ids = Arc::new(Identities::new(cfg).unwrap());
    service_router(t, routes(), HttpLimits::default(), ids, cfg).unwrap()
}

/// The port as a service serves it, on 127.0.0.1.
async fn serve(cfg: AuthConfig) -> Port {
    let t = Telemetry::new("authtest");
    let token = CancellationToken::new();
    let (addr, _task) =
        telemetry::serve("127.0.0.1:0".parse().unwrap(), app(&cfg, &t), token.clone())
            .await
            .unwrap();
    Port {
        addr,
        t,
        _stop: token.drop_guard(),
    }
}

/// The port as a client at `peer` sees it: served without the real peer address, which the
/// middleware then takes from `MockConnectInfo`.
async fn serve_as_seen_from(cfg: AuthConfig, peer: SocketAddr) -> Port {
    let t = Telemetry::new("authtest");
    let app = app(&cfg, &t).layer(MockConnectInfo(peer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    Port {
        addr,
        t,
        _stop: token.drop_guard(),
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }

    /// The session cookie this answer sets, `name=value`.
    fn cookie(&self) -> String {
        let set = self.header("set-cookie").expect("a Set-Cookie header");
        set.split(';').next().unwrap().to_owned()
    }
}

/// One HTTP/1.1 request (`Host` is the port's address) with `headers`; the body, if any, is
/// sent as JSON.
async fn send(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body);
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

fn basic(user: &str, password: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{password}").into_bytes();
    let mut out = String::from("Authorization: Basic ");
    for c in raw.chunks(3) {
        let n = u32::from(c[0]) << 16
            | u32::from(*c.get(1).unwrap_or(&0)) << 8
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                A[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn login_body(user: &str, password: &str) -> String {
    json!({"username": user, "password": password}).to_string()
}

/// Logged in as `user`: the `Cookie:` header to send.
async fn log_in(addr: SocketAddr, user: &str, password: &str) -> String {
    let a = send(
        addr,
        "POST",
        "/api/v1/login",
        &[],
        &login_body(user, password),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    format!("Cookie: {}", a.cookie())
}

fn assert_401(a: &Answer) {
    assert_eq!(a.status, 401, "{a:?}");
    assert_eq!(
        a.header("www-authenticate"),
        Some("Basic realm=\"nexus\""),
        "{a:?}"
    );
    assert!(!a.error().is_empty(), "{a:?}");
}

#[tokio::test]
async fn without_credentials_only_health_metrics_and_login_are_open_when_anonymous_access_is_off() {
    let p = serve(auth(Anonymous::Off, MetricsAccess::Open, 10)).await;
    for path in [
        "/api/v1/read",
        "/api/v1/whoami",
        "/no/such/route",
        "/index.html",
    ] {
        let a = send(p.addr, "GET", path, &[], "").await;
        assert_401(&a);
        assert!(a.error().starts_with("authentication required"), "{a:?}");
    }
    for (method, path) in [("POST", "/api/v1/act"), ("POST", "/api/v1/logout")] {
        assert_401(&send(p.addr, method, path, &[], "").await);
    }
    // Open: health, readiness, metrics (auth.metrics: open) and the login itself.
    assert_eq!(send(p.addr, "GET", "/healthz", &[], "").await.status, 200);
    assert_eq!(send(p.addr, "GET", "/readyz", &[], "").await.status, 200);
    assert_eq!(send(p.addr, "GET", "/metrics", &[], "").await.status, 200);
    let a = send(p.addr, "POST", "/api/v1/login", &[], "{}").await;
    assert_eq!(a.status, 400, "{a:?}");
    // Asking without credentials is no failed login.
    assert_eq!(p.metric("nexus_http_auth_failures_total"), 0.0);
}

#[tokio::test]
async fn only_a_service_may_act_for_a_user_and_then_has_only_that_users_role() {
    let p = serve(auth(Anonymous::Off, MetricsAccess::Open, 10)).await;
    let svc = basic(testing::SERVICE_USER.0, testing::SERVICE_USER.1);
    let as_ann = [
        "X-Nexus-On-Behalf-Of: ann",
        "X-Nexus-On-Behalf-Role: viewer",
    ];
    let a = send(
        p.addr,
        "GET",
        "/api/v1/whoami",
        &[&svc, as_ann[0], as_ann[1]],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        (a.body["name"].clone(), a.body["role"].clone()),
        (json!("ann"), json!("viewer"))
    );
    // The role checked is the user's, not the service's.
    let a = send(
        p.addr,
        "POST",
        "/api/v1/act",
        &[&svc, as_ann[0], as_ann[1]],
        "{}",
    )
    .await;
    assert_eq!(a.status, 403, "{a:?}");
    let a = send(
        p.addr,
        "POST",
        "/api/v1/act",
        &[
            &svc,
            "X-Nexus-On-Behalf-Of: olga",
            "X-Nexus-On-Behalf-Role: operator",
        ],
        "{}",
    )
    .await;
    assert_eq!(
        (a.status, a.body["name"].clone()),
        (200, json!("olga")),
        "{a:?}"
    );
    // Nobody else may, and nobody acts as a service.
    let op = basic(testing::OPERATOR_USER.0, testing::OPERATOR_USER.1);
    let a = send(
        p.addr,
        "GET",
        "/api/v1/whoami",
        &[&op, as_ann[0], as_ann[1]],
        "",
    )
    .await;
    assert_eq!(a.status, 403, "{a:?}");
    for bad in [
        ["X-Nexus-On-Behalf-Of: x", "X-Nexus-On-Behalf-Role: service"],
        ["X-Nexus-On-Behalf-Of: x", "X-Nexus-On-Behalf-Role: root"],
        ["X-Nexus-On-Behalf-Of: ", "X-Nexus-On-Behalf-Role: viewer"],
    ] {
        let a = send(p.addr, "GET", "/api/v1/whoami", &[&svc, bad[0], bad[1]], "").await;
        assert_eq!(a.status, 403, "{bad:?}: {a:?}");
    }
}

#[tokio::test]
async fn a_pages_own_script_gets_its_401_without_a_browser_login_dialog() {
    let p = serve(auth(Anonymous::Off, MetricsAccess::Open, 10)).await;
    let xhr = "X-Requested-With: XMLHttpRequest";
    for (method, path, body) in [
        ("GET", "/api/v1/whoami", ""),
        (
            "POST",
            "/api/v1/login",
            r#"{"username":"ann","password":"wrong"}"#,
        ),
    ] {
        let a = send(p.addr, method, path, &[xhr], body).await;
        assert_eq!(a.status, 401, "{a:?}");
        assert_eq!(a.header("www-authenticate"), None, "{a:?}");
        // Anyone else is challenged as before.
        assert_401(&send(p.addr, method, path, &[], body).await);
    }
}

#[tokio::test]
async fn public_pages_are_open_to_get_only_and_nothing_beside_them_is() {
    let p = serve(auth(Anonymous::Off, MetricsAccess::Viewer, 10)).await;
    for path in ["/", "/app", "/app/assets/app.js", "/app/assets/deep/x.css"] {
        let a = send(p.addr, "GET", path, &[], "").await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        assert_eq!(send(p.addr, "HEAD", path, &[], "").await.status, 200);
    }
    // Not the same path written otherwise, not a neighbour, not another method.
    for path in [
        "/app/",
        "/appx",
        "/app/assets",
        "/app/assets/../../api/v1/read",
    ] {
        assert_401(&send(p.addr, "GET", path, &[], "").await);
    }
    assert_401(&send(p.addr, "POST", "/app/assets/app.js", &[], "").await);
}

#[tokio::test]
async fn anonymous_viewers_come_from_loopback_only_unless_any_is_configured() {
    let loopback = auth(Anonymous::Loopback, MetricsAccess::Open, 10);
    let p = serve(loopback.clone()).await;
    let a = send(p.addr, "GET", "/api/v1/read", &[], "").await;
    assert_eq!(
        (a.status, &a.body),
        (200, &json!({"name": "anonymous", "role": "viewer"}))
    );
    let a = send(p.addr, "GET", "/api/v1/whoami", &[], "").await;
    assert_eq!(a.body["via"], "anonymous");
    // A viewer writes nothing.
    let a = send(p.addr, "POST", "/api/v1/act", &[], "").await;
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(
        a.error(),
        "this needs the operator role; anonymous is viewer"
    );

    let lan: SocketAddr = "10.1.2.3:50000".parse().unwrap();
    let p = serve_as_seen_from(loopback.clone(), lan).await;
    assert_401(&send(p.addr, "GET", "/api/v1/read", &[], "").await);
    // Credentials work from anywhere.
    let a = send(
        p.addr,
        "GET",
        "/api/v1/read",
        &[&basic("ann", "ann-pw")],
        "",
    )
    .await;
    assert_eq!(a.body["name"], "ann");
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:50000".parse().unwrap();
    let p = serve_as_seen_from(loopback, mapped).await;
    assert_eq!(
        send(p.addr, "GET", "/api/v1/read", &[], "").await.status,
        200
    );

    let p = serve_as_seen_from(auth(Anonymous::Any, MetricsAccess::Open, 10), lan).await;
    assert_eq!(
        send(p.addr, "GET", "/api/v1/read", &[], "").await.status,
        200
    );
    assert_eq!(
        send(p.addr, "POST", "/api/v1/act", &[], "").await.status,
        403
    );
}

#[tokio::test]
async fn basic_credentials_and_bearer_tokens_carry_their_roles() {
    let p = serve(auth(Anonymous::Off, MetricsAccess::Open, 10)).await;
    let op = basic("op", "op-pw");
    let a = send(p.addr, "POST", "/api/v1/act", &[&op], "").await;
    assert_eq!(
        (a.status, &a.body),
        (200, &json!({"name": "op", "role": "operator"}))
    );
    let a = send(p.addr, "POST", "/api/v1/configure", &[&op], "").await;
    assert_eq!(a.status, 403);
    assert_eq!(a.error(), "this needs the admin role; op is operator");
    let a = send(
        p.addr,
        "POST",
        "/api/v1/act",
        &[&basic("ann", "ann-pw")],
        "",
    )
    .await;
    assert_eq!(a.status, 403);
    assert!(
        a.error().starts_with("this needs the operator role"),
        "{a:?}"
    );
    // A publisher is a viewer over HTTP.
    let a = send(
        p.addr,
        "GET",
        "/api/v1/read",
        &[&basic("pub", "pub-pw")],
        "",
    )
    .await;
    assert_eq!(a.body["role"], "publisher");
    assert_eq!(
        send(
            p.addr,
            "POST",
            "/api/v1/act",
            &[&basic("pub", "pub-pw")],
            ""
        )
        .await
        .status,
        403
    );
    // The argon2 hash: checked once, then remembered; still the same answers.
    for _ in 0..2 {
        let a = send(
            p.addr,
            "POST",
            "/api/v1/configure",
            &[&basic("boss", "boss-pw")],
            "",
        )
        .await;
        assert_eq!((a.status, &a.body["name"]), (200, &json!("boss")));
    }
    assert_401(
        &send(
            p.addr,
            "GET",
            "/api/v1/read",
            &[&basic("boss", "boss-pw ")],
            "",
        )
        .await,
    );
    // The token: its name in the audit is token:<name>.
    let a = send(p.addr, "POST", "/api/v1/act", &[&bearer(OPS_TOKEN)], "").await;
    assert_eq!(
        (a.status, &a.body),
        (200, &json!({"name": "token:ops", "role": "operator"}))
    );
    let a = send(p.addr, "GET", "/api/v1/whoami", &[&bearer(OPS_TOKEN)], "").await;
    assert_eq!(
        a.body,
        json!({"name": "token:ops", "role": "operator", "via": "token"})
    );
    let wrong = format!("{}1", &OPS_TOKEN[..OPS_TOKEN.len() - 1]);
    let a = send(p.addr, "GET", "/api/v1/read", &[&bearer(&wrong)], "").await;
    assert_401(&a);
    assert_eq!(a.error(), "the token is not valid");
    assert_eq!(p.metric("nexus_http_auth_failures_total"), 2.0);
}

#[tokio::test]
async fn a_wrong_password_is_a_401_that_does_not_tell_whether_the_user_exists() {
    // Anonymous access allowed: wrong credentials are still refused, not read as anonymous.
    let p = serve(auth(Anonymous::Loopback, MetricsAccess::Open, 10)).await;
    let wrong_password = send(p.addr, "GET", "/api/v1/read", &[&basic("op", "nope")], "").await;
    let no_such_user = send(
        p.addr,
        "GET",
        "/api/v1/read",
        &[&basic("nobody", "nope")],
        "",
    )
    .await;
    let hashed_user = send(p.addr, "GET", "/api/v1/read", &[&basic("boss", "nope")], "").await;
    for a in [&wrong_password, &no_such_user, &hashed_user] {
        assert_401(a);
        assert_eq!(
            a.body,
            json!({"error": "the user name or password is wrong"})
        );
    }
    let login_wrong = send(
        p.addr,
        "POST",
        "/api/v1/login",
        &[],
        &login_body("op", "nope"),
    )
    .await;
    let login_nobody = send(
        p.addr,
        "POST",
        "/api/v1/login",
        &[],
        &login_body("nobody", "x"),
    )
    .await;
    for a in [&login_wrong, &login_nobody] {
        assert_401(a);
        assert_eq!(
            a.body,
            json!({"error": "the user name or password is wrong"})
        );
        assert_eq!(a.header("set-cookie"), None);
    }
    assert_eq!(p.metric("nexus_http_auth_failures_total"), 5.0);
    // Refused logins hold nothing.
    assert_eq!(p.metric("nexus_http_sessions"), 0.0);
}

#[tokio::test]
async fn a_session_logs_in_with_a_cookie_and_logs_out() {
    let p = serve(auth(Anonymous::Off, MetricsAccess::Open, 10)).await;
    let a = send(
        p.addr,
        "POST",
        "/api/v1/login",
        &[],
        &login_body("op", "op-pw"),
    )
    .await;
    assert_eq!(
        (a.status, &a.body),
        (200, &json!({"name": "op", "role": "operator"}))
    );
    let set = a.header("set-cookie").unwrap();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    assert!(attrs[0].starts_with(&format!("{SESSION_COOKIE}=")), "{set}");
    assert_eq!(
        attrs[0].len(),
        SESSION_COOKIE.len() + 1 + 64,
        "256 random bits in hex: {set}"
    );
    for want in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(attrs.contains(&want), "{want} in {set}");
    }
    let cookie = format!("Cookie: {}", a.cookie());
    assert_eq!(p.metric("nexus_http_sessions"), 1.0);
    let a = send(p.addr, "GET", "/api/v1/whoami", &[&cookie], "").await;
    assert_eq!(
        a.body,
        json!({"name": "op", "role": "operator", "via": "session"})
    );
    // A write with the cookie and no Origin (not a browser's cross-site request).
    assert_eq!(
        send(p.addr, "POST", "/api/v1/act", &[&cookie], "")
            .await
            .status,
        200
    );
    assert_eq!(
        send(p.addr, "POST", "/api/v1/configure", &[&cookie], "")
            .await
            .status,
        403
    );

    let a = send(p.addr, "POST", "/api/v1/logout", &[&cookie], "").await;
    assert_eq!((a.status, &a.body), (200, &json!({"logged_out": true})));
    assert!(
        a.header("set-cookie").unwrap().contains("Max-Age=0"),
        "{a:?}"
    );
    assert_eq!(p.metric("nexus_http_sessions"), 0.0);
    // The cookie is dead; the answer clears it.
    let a = send(p.addr, "GET", "/api/v1/read", &[&cookie], "").await;
    assert_401(&a);
    assert!(a.error().starts_with("the session has ended"), "{a:?}");
    assert!(a.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(p.metric("nexus_http_auth_failures_total"), 1.0);
    // A cookie and valid Basic credentials: the credentials decide.
    let a = send(
        p.addr,
        "GET",
        "/api/v1/read",
        &[&cookie, &basic("ann", "ann-pw")],
        "",
    )
    .await;
    assert_eq!(a.body["name"], "ann");

    // Bodies the login refuses.
    let a = send(
        p.addr,
        "POST",
        "/api/v1/login",
        &[],
        r#"{"username":"op","password":"op-pw","role":"admin"}"#,
    )
    .await;
    assert_eq!(a.status, 400);
    assert!(a.error().starts_with("role: unknown field"), "{a:?}");
    let a = send(p.addr, "POST", "/api/v1/login", &[], r#"{"username":"op"}"#).await;
    assert_eq!(a.status, 400);
    assert!(a.error().contains("password"), "{a:?}");
    let form = "username=op&password=op-pw";
    let len = format!("Content-Length: {}", form.len());
    let head = [
        "Content-Type: application/x-www-form-urlencoded",
        len.as_str(),
    ];
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let req = format!(
        "POST /api/v1/login HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{}\r\n{}\r\n\r\n{form}",
        p.addr, head[0], head[1]
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 415"), "{out}");
    assert_eq!(p.metric("nexus_http_sessions"), 0.0);
}

#[tokio::test]
async fn a_full_session_store_logs_out_the_session_idle_the_longest_and_counts_it() {
    let p = serve(auth(Anonymous::Off, MetricsAccess::Open, 2)).await;
    let first = log_in(p.addr, "op", "op-pw").await;
    let second = log_in(p.addr, "ann", "ann-pw").await;
    // `first` used again: `second` is now idle the longest.
    assert_eq!(
        send(p.addr, "GET", "/api/v1/read", &[&first], "")
            .await
            .status,
        200
    );
    assert_eq!(p.metric("nexus_http_sessions_evicted_total"), 0.0);
    let third = log_in(p.addr, "op", "op-pw").await;
    assert_eq!(p.metric("nexus_http_sessions_evicted_total"), 1.0);
    assert_eq!(p.metric("nexus_http_sessions"), 2.0);
    assert_401(&send(p.addr, "GET", "/api/v1/read", &[&second], "").await);
    for c in [&first, &third] {
        assert_eq!(
            send(p.addr, "GET", "/api/v1/read", &[c], "").await.status,
            200
        );
    }
    // However many logins, never more than the cap.
    for _ in 0..5 {
        log_in(p.addr, "ann", "ann-pw").await;
    }
    assert_eq!(p.metric("nexus_http_sessions"), 2.0);
    assert_eq!(p.metric("nexus_http_sessions_evicted_total"), 6.0);
}

#[tokio::test]
async fn writes_with_a_browsers_credentials_need_an_origin_naming_this_host() {
    let p = serve(auth(Anonymous::Off, MetricsAccess::Open, 10)).await;
    let cookie = log_in(p.addr, "op", "op-pw").await;
    let here = format!("Origin: http://{}", p.addr);
    let evil = "Origin: http://evil.example";
    // Cookie: a cross-site write is refused, a same-site one and any read are not.
    let a = send(p.addr, "POST", "/api/v1/act", &[&cookie, evil], "").await;
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.error().starts_with("cross-site request refused"), "{a:?}");
    assert_eq!(
        send(
            p.addr,
            "POST",
            "/api/v1/act",
            &[&cookie, "Origin: null"],
            ""
        )
        .await
        .status,
        403
    );
    assert_eq!(
        send(p.addr, "POST", "/api/v1/act", &[&cookie, &here], "")
            .await
            .status,
        200
    );
    assert_eq!(
        send(p.addr, "GET", "/api/v1/read", &[&cookie, evil], "")
            .await
            .status,
        200
    );
    // Logging out is a write too.
    assert_eq!(
        send(p.addr, "POST", "/api/v1/logout", &[&cookie, evil], "")
            .await
            .status,
        403
    );
    // Basic credentials, which a browser caches and sends by itself: the same.
    let op = basic("op", "op-pw");
    assert_eq!(
        send(p.addr, "POST", "/api/v1/act", &[&op, evil], "")
            .await
            .status,
        403
    );
    assert_eq!(
        send(p.addr, "POST", "/api/v1/act", &[&op, &here], "")
            .await
            .status,
        200
    );
    // A bearer token is never sent by a browser on its own: no Origin check.
    assert_eq!(
        send(
            p.addr,
            "POST",
            "/api/v1/act",
            &[&bearer(OPS_TOKEN), evil],
            ""
        )
        .await
        .status,
        200
    );
    // Nor may another site log a browser in.
    let a = send(
        p.addr,
        "POST",
        "/api/v1/login",
        &[evil],
        &login_body("op", "op-pw"),
    )
    .await;
    assert_eq!((a.status, a.header("set-cookie")), (403, None));
    // The session still works from its own origin.
    assert_eq!(
        send(p.addr, "POST", "/api/v1/act", &[&cookie, &here], "")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn metrics_are_open_or_need_a_viewer_as_configured() {
    let open = serve(auth(Anonymous::Off, MetricsAccess::Open, 10)).await;
    assert_eq!(
        send(open.addr, "GET", "/metrics", &[], "").await.status,
        200
    );
    let closed = serve(auth(Anonymous::Off, MetricsAccess::Viewer, 10)).await;
    assert_401(&send(closed.addr, "GET", "/metrics", &[], "").await);
    assert_eq!(
        send(closed.addr, "GET", "/metrics", &[&bearer(OPS_TOKEN)], "")
            .await
            .status,
        200
    );
    assert_eq!(
        send(
            closed.addr,
            "GET",
            "/metrics",
            &[&basic("ann", "ann-pw")],
            ""
        )
        .await
        .status,
        200
    );
    assert_eq!(
        send(closed.addr, "GET", "/healthz", &[], "").await.status,
        200
    );
    assert_eq!(
        send(closed.addr, "GET", "/readyz", &[], "").await.status,
        200
    );
    // `viewer` is the role, which the anonymous clients auth.anonymous lets in have.
    let local = serve(auth(Anonymous::Loopback, MetricsAccess::Viewer, 10)).await;
    assert_eq!(
        send(local.addr, "GET", "/metrics", &[], "").await.status,
        200
    );
    let lan: SocketAddr = "192.168.7.7:40000".parse().unwrap();
    let remote =
        serve_as_seen_from(auth(Anonymous::Loopback, MetricsAccess::Viewer, 10), lan).await;
    assert_401(&send(remote.addr, "GET", "/metrics", &[], "").await);
}

#[test]
fn every_route_carries_its_declared_role() {
    let policy: Vec<(String, String, Role)> = routes()
        .policy()
        .iter()
        .map(|(m, p, r)| (m.to_string(), p.clone(), *r))
        .collect();
    assert_eq!(
        policy,
        [
            ("POST".into(), "/app/assets/{*file}".into(), Role::Viewer),
            ("GET".into(), "/api/v1/read".into(), Role::Viewer),
            ("POST".into(), "/api/v1/act".into(), Role::Operator),
            ("POST".into(), "/api/v1/configure".into(), Role::Admin),
        ]
    );
    assert_eq!(
        routes().public_paths(),
        [
            "/".to_owned(),
            "/app".to_owned(),
            "/app/assets/*".to_owned()
        ]
    );
}

#[test]
fn the_documented_metrics_are_served() {
    let t = Telemetry::new("authdoc");
    let _ = app(&AuthConfig::default(), &t);
    let served = nexus_common::metrics::families(&t.render());
    // The section names the session cookie too, which is no metric.
    let mut documented: Vec<String> =
        testing::documented_metrics("security.md#HTTP authentication")
            .into_iter()
            .filter(|n| n != SESSION_COOKIE)
            .collect();
    documented.sort();
    assert_eq!(
        documented,
        [
            "nexus_http_auth_failures_total",
            "nexus_http_sessions",
            "nexus_http_sessions_evicted_total",
        ]
    );
    for name in &documented {
        assert!(served.contains(name), "{name} not served: {served:?}");
    }
}

/// Header values as a client can send them: visible ASCII, spaces, tabs and bytes past ASCII.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![0x20u8..0x7f, Just(b'\t'), 0x80u8..=0xff];
    proptest::collection::vec(byte, 1..200).prop_map(|mut v| {
        // Leading and trailing whitespace is no part of a value on the wire.
        while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.remove(0);
        }
        while v.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.pop();
        }
        if v.is_empty() {
            v.push(b'x');
        }
        v
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_authorization_header_that_is_not_credentials_is_a_401() {
    // Anonymous access allowed: a header that does not check is refused all the same.
    let p = serve(auth(Anonymous::Loopback, MetricsAccess::Open, 10)).await;
    let addr = p.addr;
    let sent = tokio::task::spawn_blocking(move || {
        let values = prop_oneof![
            header_value(),
            (
                "(Basic|basic|BASIC|Bearer|bearer) {1,3}",
                "[A-Za-z0-9+/=._~-]{0,80}"
            )
                .prop_map(|(s, v)| format!("{s}{v}").into_bytes()),
            (prop_oneof![Just("Basic "), Just("Bearer ")], header_value()).prop_map(|(s, v)| {
                let mut out = s.as_bytes().to_vec();
                out.extend(v);
                out
            }),
        ];
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 300,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let n = std::cell::Cell::new(0u32);
        runner
            .run(&values, |value| {
                n.set(n.get() + 1);
                let (status, body) = rt.block_on(raw_get(addr, &value));
                prop_assert_eq!(
                    status,
                    401,
                    "{:?}: {}",
                    String::from_utf8_lossy(&value),
                    body
                );
                let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                prop_assert!(
                    json["error"].is_string(),
                    "{:?}: {}",
                    String::from_utf8_lossy(&value),
                    body
                );
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        n.get()
    })
    .await
    .unwrap();
    assert_eq!(p.metric("nexus_http_auth_failures_total"), f64::from(sent));
    assert_eq!(p.metric("nexus_http_panics_total"), 0.0);
}

/// `GET /api/v1/read` with `Authorization: <value>` as raw bytes; the status and body.
async fn raw_get(addr: SocketAddr, value: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET /api/v1/read HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: "
    )
    .into_bytes();
    req.extend_from_slice(value);
    req.extend_from_slice(b"\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        text.split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned(),
    )
}
