//! The alarm API against hostile requests, through real HTTP to the real service: only an
//! operator acts on an alarm, and the event names the authenticated caller whatever the body
//! says; a shelve duration that overflows is a 400 naming `duration_s` instead of a dropped
//! connection, bodies over the limit are a 413 (counted), and arbitrary paths, queries and
//! bodies either work or get a 4xx with a JSON error.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::auth::token_sha256;
use nexus_common::config::{AuthConfig, Config, Role, TokenConfig, UserConfig};
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, QoS};
use nexus_common::testing::{self, free_port};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

struct Alerts {
    _broker: nexus_common::broker::EmbeddedBroker,
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: u16,
    mqtt: u16,
    /// The UNS root of this test's topics: the rule `hot` watches `<root>/+/temp`.
    root: String,
}

/// An operator's API token (acts as `token:ops`).
const OPS_TOKEN: &str = "nxs_5e1f0a3b7c9d2e4f6a8b0c1d3e5f7a9b5e1f0a3b7c9d2e4f6a8b0c1d3e5f7a9b";

/// The users of `testing::test_auth` (`op` / `op-pw` is the operator, `pub` / `pub-pw` a
/// publisher), a viewer `ann` / `ann-pw` and the operator token [`OPS_TOKEN`].
fn auth() -> AuthConfig {
    let mut a = testing::test_auth();
    a.users
        .push(UserConfig::with_password("ann", "ann-pw", Role::Viewer));
    a.tokens.push(TokenConfig {
        name: "ops".into(),
        sha256: Some(token_sha256(OPS_TOKEN)),
        token_env: None,
        role: Role::Operator,
    });
    a
}

const OPERATOR: &str = "Authorization: Basic b3A6b3AtcHc="; // op:op-pw
const VIEWER: &str = "Authorization: Basic YW5uOmFubi1wdw=="; // ann:ann-pw
const PUBLISHER: &str = "Authorization: Basic cHViOnB1Yi1wdw=="; // pub:pub-pw

impl Alerts {
    async fn start() -> Alerts {
        let broker = testing::service_broker();
        let port = broker.ports.tcp().port();
        let http = free_port();
        let root = testing::unique("plant");
        let text = format!(
            "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\ntelemetry: {{ instance: {} }}\nalerts:\n  http_listen: 127.0.0.1:{http}\n  max_shelve: 1h\n  rules:\n    - {{ id: hot, topic: \"{root}/+/temp\", condition: {{ type: high, limit: 80 }} }}\n",
            testing::unique("alerts"),
        );
        let mut cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
        cfg.auth = auth();
        cfg.alerts.state_dir = testing::state_dir(&format!("hostile-{root}"));
        let token = CancellationToken::new();
        let task = tokio::spawn(nexus_alert_service::run(Arc::new(cfg), token.clone()));
        let start = Instant::now();
        while request(http, "GET", "/readyz", &[], b"").0 != 200 {
            assert!(start.elapsed() < Duration::from_secs(10), "not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Alerts {
            _broker: broker,
            token,
            task,
            http,
            mqtt: port,
            root,
        }
    }

    /// A service-account MQTT client subscribed to `subs`.
    async fn client(&self, subs: &[&str]) -> (MqttHandle, tokio::sync::mpsc::Receiver<Message>) {
        let mut c = testing::service_mqtt_config(self.mqtt);
        c.persistent_session = false;
        let mut s = ClientSettings::new(testing::unique("t"));
        s.subscriptions = subs
            .iter()
            .map(|f| (f.to_string(), QoS::AtLeastOnce))
            .collect();
        let (h, mut rx) = mqtt::connect(&c, s, None, CancellationToken::new()).unwrap();
        h.wait_connected(Duration::from_secs(10)).await.unwrap();
        // Connected is not subscribed: until a probe on each (literal) topic comes back, an
        // event published now could reach the broker before the subscription does.
        for topic in subs {
            let probe = format!("{{\"probe\":\"{}\"}}", testing::unique("p"));
            let start = Instant::now();
            'wait: loop {
                h.publish(topic, probe.clone(), QoS::AtLeastOnce, false)
                    .await
                    .unwrap();
                let until = Instant::now() + Duration::from_millis(200);
                while let Ok(Some(m)) =
                    tokio::time::timeout(until.saturating_duration_since(Instant::now()), rx.recv())
                        .await
                {
                    if m.payload().as_ref() == probe.as_bytes() {
                        break 'wait;
                    }
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "not subscribed to {topic}"
                );
            }
        }
        (h, rx)
    }

    fn metric(&self, name: &str) -> f64 {
        let text = request(self.http, "GET", "/metrics", &[], b"").1;
        let text = String::from_utf8_lossy(&text);
        testing::metric_value(&text, name).unwrap_or(-1.0)
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("alerts stop")
            .unwrap()
            .unwrap();
    }
}

/// An HTTP/1.1 request (one per connection) with `headers` as given (no Content-Length added) and `body` written
/// from another thread while the answer is read, so a server that answers before reading
/// the whole body is seen answering. Status 0: no answer within 5 s, or the connection
/// closed without one.
fn request(port: u16, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, Vec<u8>) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, Vec::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    if s.write_all(head.as_bytes()).is_err() {
        return (0, Vec::new());
    }
    let writer = {
        let (mut w, body) = (s.try_clone().unwrap(), body.to_vec());
        std::thread::spawn(move || {
            let _ = w.write_all(&body);
        })
    };
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match out.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => out[i + 4..].to_vec(),
        None => Vec::new(),
    };
    (status, body)
}

/// A JSON request with its Content-Length, as the operator `op`.
fn json(port: u16, method: &str, path: &str, body: &str) -> (u16, Value) {
    json_as(port, Some(OPERATOR), method, path, body)
}

/// A JSON request with its Content-Length, with the `Authorization` header `auth`.
fn json_as(port: u16, auth: Option<&str>, method: &str, path: &str, body: &str) -> (u16, Value) {
    let len = format!("Content-Length: {}", body.len());
    let mut headers = vec!["Content-Type: application/json", len.as_str()];
    headers.extend(auth);
    let (s, b) = request(port, method, path, &headers, body.as_bytes());
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// The next event on `$nexus/alarms/events`.
async fn next_event(rx: &mut tokio::sync::mpsc::Receiver<Message>) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an alarm event within 10 s")
            .unwrap();
        if m.topic() == Some("$nexus/alarms/events") {
            return serde_json::from_slice(m.payload()).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_operator_acts_on_an_alarm_and_the_event_names_the_caller() {
    let a = Alerts::start().await;
    let (svc, mut rx) = a.client(&["$nexus/alarms/events"]).await;
    let topic = format!("{}/m1/temp", a.root);
    // Retained: readiness follows the broker connection, not the subscriptions, so a live
    // value sent right after could reach the broker before the service has subscribed.
    svc.publish(&topic, "{\"v\":90}", QoS::AtLeastOnce, true)
        .await
        .unwrap();
    assert_eq!(next_event(&mut rx).await["event"], "activated");
    let path = |op: &str| format!("/api/v1/alarms/hot:{}/{op}", encode(&topic));
    let state = || {
        let (s, list) = json_as(a.http, None, "GET", "/api/v1/alarms", "");
        assert_eq!(s, 200, "{list}");
        list["alarms"][0]["state"].as_str().unwrap().to_owned()
    };
    assert_eq!(state(), "active_unacked");

    // Anyone on this machine reads; acting needs an operator. These were all 200 once.
    for (who, auth) in [
        ("anonymous", None),
        ("ann", Some(VIEWER)),
        ("pub", Some(PUBLISHER)),
    ] {
        for op in ["ack", "shelve", "out_of_service"] {
            // Naming the operator in the body, as the old API let anyone do.
            let body = "{\"user\":\"op\",\"duration_s\":60}";
            let (s, e) = json_as(a.http, auth, "POST", &path(op), body);
            assert_eq!(s, 403, "{who} {op}: {e}");
            let e = e["error"].as_str().unwrap();
            assert!(e.starts_with("this needs the operator role"), "{e}");
            assert!(e.contains(who), "{e}");
        }
    }
    let (s, _) = json_as(
        a.http,
        Some("Authorization: Basic b3A6d3Jvbmc="),
        "POST",
        &path("ack"),
        "{}",
    );
    assert_eq!(s, 401, "op with a wrong password");
    assert_eq!(state(), "active_unacked");

    // An operator naming someone else in the body: refused, nothing done.
    let (s, e) = json(
        a.http,
        "POST",
        &path("ack"),
        "{\"user\":\"ann\",\"comment\":\"x\"}",
    );
    assert_eq!(s, 400, "{e}");
    assert_eq!(
        e["error"],
        "user: actions are recorded under the authenticated user (op), not \"ann\"; leave user out"
    );
    assert_eq!(state(), "active_unacked");

    // The operator acts; the event (journal, webhooks) names the operator.
    let (s, body) = json(a.http, "POST", &path("ack"), "{\"comment\":\"on it\"}");
    assert_eq!(
        (s, body["state"].as_str()),
        (200, Some("active_acked")),
        "{body}"
    );
    let ev = next_event(&mut rx).await;
    assert_eq!(
        (&ev["event"], &ev["user"], &ev["comment"]),
        (&json!("acknowledged"), &json!("op"), &json!("on it"))
    );
    // A token acts under its name; a body repeating the caller's own name is fine.
    let auth = format!("Authorization: Bearer {OPS_TOKEN}");
    let (s, _) = json_as(
        a.http,
        Some(&auth),
        "POST",
        &path("shelve"),
        "{\"duration_s\":60}",
    );
    assert_eq!(s, 200);
    let ev = next_event(&mut rx).await;
    assert_eq!(
        (&ev["event"], &ev["user"]),
        (&json!("shelved"), &json!("token:ops"))
    );
    let (s, _) = json(a.http, "POST", &path("unshelve"), "{\"user\":\"op\"}");
    assert_eq!(s, 200);
    let ev = next_event(&mut rx).await;
    assert_eq!(
        (&ev["event"], &ev["user"]),
        (&json!("unshelved"), &json!("op"))
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shelve_duration_that_overflows_is_a_400_naming_duration_s() {
    let a = Alerts::start().await;
    let path = "/api/v1/alarms/hot:plant%2Fm1%2Ftemp/shelve";
    // 10^16 s is 10^19 ms, past i64; u64::MAX used to wrap to -1 s.
    for d in [10u64.pow(16), i64::MAX as u64, u64::MAX] {
        let (s, body) = json(a.http, "POST", path, &format!("{{\"duration_s\":{d}}}"));
        assert_eq!(s, 400, "{d}: {body}");
        let e = body["error"].as_str().unwrap();
        assert!(e.starts_with("duration_s: "), "{d}: {e}");
        assert!(e.contains(&d.to_string()), "{d}: {e}");
    }
    // Not a number at all: still a 4xx naming the field, as JSON.
    let (s, body) = json(a.http, "POST", path, "{\"duration_s\":-5}");
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("duration_s"),
        "{body}"
    );
    // Within bounds the request reaches the engine (no such alarm here).
    let (s, body) = json(a.http, "POST", path, "{\"duration_s\":60}");
    assert_eq!(s, 404, "{body}");
    assert_eq!(a.metric("nexus_http_panics_total"), 0.0);
    assert_eq!(json(a.http, "GET", "/api/v1/alarms", "").0, 200);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_one_mib_is_a_413_on_every_route() {
    let a = Alerts::start().await;
    let path = "/api/v1/alarms/hot:plant%2Fm1%2Ftemp/ack";
    // Declared too large: answered from the header, before any of the body is read.
    let (s, body) = request(
        a.http,
        "POST",
        path,
        &["Content-Type: application/json", "Content-Length: 2097152"],
        b"",
    );
    assert_eq!(s, 413, "{}", String::from_utf8_lossy(&body));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("1048576"),
        "{body}"
    );
    // A route that never reads its body is no way around it.
    let (s, _) = request(
        a.http,
        "GET",
        "/api/v1/alarms",
        &["Content-Length: 2097152"],
        b"",
    );
    assert_eq!(s, 413);
    // Valid JSON of 1.5 MiB, sent in full: under axum's own 2 MB default, over ours.
    let big = format!("{{\"comment\":\"{}\"}}", "x".repeat(1536 * 1024));
    let (s, body) = json(a.http, "POST", path, &big);
    assert_eq!(s, 413, "{body}");
    // Streamed without a length by an operator (anyone else is refused unread): cut once it
    // passes the limit.
    let mut chunked = Vec::new();
    for piece in big.as_bytes().chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (s, _) = request(
        a.http,
        "POST",
        path,
        &[
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
            OPERATOR,
        ],
        &chunked,
    );
    assert_eq!(s, 413);
    assert_eq!(a.metric("nexus_http_body_too_large_total"), 4.0);
    // Just under the limit is an ordinary request.
    let ok = format!("{{\"comment\":\"{}\"}}", "x".repeat(1000 * 1024));
    assert_eq!(json(a.http, "POST", path, &ok).0, 404);
    a.stop().await;
}

/// Every byte but the unreserved ones as `%XX`.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Anything that is not empty (an empty path segment matches no route, so it is a plain 404).
fn segment() -> impl Strategy<Value = String> {
    any::<String>().prop_filter("not empty", |s| !s.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_paths_queries_and_bodies_either_work_or_get_a_4xx() {
    let a = Alerts::start().await;
    let port = a.http;
    tokio::task::spawn_blocking(move || {
        let number = prop_oneof![
            any::<String>(),
            "-?[0-9]{1,30}(\\.[0-9]{0,3})?(e[0-9]{1,3})?",
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
        ];
        let action = (
            prop_oneof![segment(), "[a-z]{1,6}:[a-z/]{1,12}"],
            prop_oneof![
                segment(),
                Just("ack".to_owned()),
                Just("shelve".to_owned()),
                Just("unshelve".to_owned()),
                Just("out_of_service".to_owned()),
            ],
            prop_oneof![
                any::<String>(),
                number.prop_map(|d| format!("{{\"duration_s\":{d}}}")),
                "\\{\"(user|comment|duration_s)\":\"[^\"]{0,20}\"\\}",
            ],
        )
            .prop_map(|(id, op, body)| {
                (
                    "POST",
                    format!("/api/v1/alarms/{}/{}", encode(&id), encode(&op)),
                    body,
                )
            });
        let list = (
            proptest::option::of(prop_oneof![any::<String>(), "-?[0-9]{1,8}"]),
            proptest::option::of(prop_oneof![any::<String>(), "[a-z/+#$]{0,16}"]),
        )
            .prop_map(|(sev, topic)| {
                let mut q = Vec::new();
                if let Some(s) = sev {
                    q.push(format!("severity={}", encode(&s)));
                }
                if let Some(t) = topic {
                    q.push(format!("topic={}", encode(&t)));
                }
                (
                    "GET",
                    format!("/api/v1/alarms?{}", q.join("&")),
                    String::new(),
                )
            });
        let cases = prop_oneof![action, list];
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 400,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        runner
            .run(&cases, |(method, path, body)| {
                let (s, answer) = json(port, method, &path, &body);
                prop_assert!(
                    (200..500).contains(&s),
                    "{method} {path} {body:?}: {s} {answer}"
                );
                if s >= 400 {
                    prop_assert!(
                        answer["error"].is_string(),
                        "{method} {path} {body:?}: {s} {answer}"
                    );
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    })
    .await
    .unwrap();
    assert_eq!(a.metric("nexus_http_panics_total"), 0.0);
    a.stop().await;
}
