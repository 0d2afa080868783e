//! The history API against hostile requests, through real HTTP to the real service (real
//! PostgreSQL and broker): times past the year 9999 are a 400 naming the parameter instead
//! of a dropped connection, every query shape stays within `ingestion.history_max_points`
//! and says when it cut, arbitrary parameters either work or get a 4xx, and without anonymous
//! access the history is a viewer's.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_common::config::{Anonymous, Config, Role, UserConfig};
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::testing::{self, free_port, PgServer};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

const T0: i64 = 1_750_000_000_000;
/// The cap the service runs with in these tests.
const MAX: usize = 10;
/// A topic with 25 points, one a minute from `T0`.
const DENSE: &str = "acme/s/a/l/d/dense";
/// 9999-12-31T23:59:59.999Z, the last millisecond the API takes.
const LAST_MS: u64 = 253_402_300_799_999;

struct Ingest {
    _pg: PgServer,
    _broker: nexus_common::broker::EmbeddedBroker,
    _wal: tempfile::TempDir,
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: u16,
}

impl Ingest {
    /// Ingestion with `history_max_points: 10`, holding `DENSE` and 15 one-point topics
    /// `acme/s/a/l/d/t<i>`; anonymous viewers from loopback (the default).
    async fn start() -> Ingest {
        Ingest::start_with(Anonymous::Loopback).await
    }

    /// [`Ingest::start`] with `auth.anonymous: anonymous` and the users of
    /// `testing::test_auth` plus a viewer ann / ann-pw.
    async fn start_with(anonymous: Anonymous) -> Ingest {
        let pg = PgServer::start();
        let url = pg.create_database("hostile").await;
        let broker = testing::service_broker();
        let port = broker.ports.tcp().port();
        let wal = tempfile::tempdir().unwrap();
        let http = free_port();
        let text = format!(
            "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
             telemetry: {{ instance: {} }}\n\
             database:\n  url: \"{url}\"\ningestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n  batch_timeout: 20ms\n  history_max_points: {MAX}\n",
            testing::unique("ing"),
            wal.path().display()
        );
        let mut cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
        cfg.auth = testing::test_auth();
        cfg.auth
            .users
            .push(UserConfig::with_password("ann", "ann-pw", Role::Viewer));
        cfg.auth.anonymous = anonymous;
        let token = CancellationToken::new();
        let task = tokio::spawn(nexus_data_ingestion::run(Arc::new(cfg), token.clone()));
        let ing = Ingest {
            _pg: pg,
            _broker: broker,
            _wal: wal,
            token,
            task,
            http,
        };
        let start = Instant::now();
        while testing::http(http, "GET", "/readyz", "").0 != 200 {
            assert!(start.elapsed() < Duration::from_secs(20), "not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        let c = testing::service_mqtt_config(port);
        let (p, _rx) = mqtt::connect(
            &c,
            ClientSettings::new(testing::unique("pub")),
            None,
            CancellationToken::new(),
        )
        .unwrap();
        p.wait_connected(Duration::from_secs(10)).await.unwrap();
        for i in 0..25i64 {
            let body = format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i * 60_000);
            p.publish(DENSE, body, QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
        for i in 0..15 {
            let body = format!(r#"{{"v":{i},"ts":{T0}}}"#);
            p.publish(&format!("acme/s/a/l/d/t{i}"), body, QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let start = Instant::now();
        loop {
            let n: i64 = db
                .query_one("SELECT count(*) FROM points", &[])
                .await
                .map_or(0, |r| r.get(0));
            if n == 40 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "40 points stored, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ing
    }

    fn get(&self, path: &str) -> (u16, Json) {
        let (status, body) = testing::http(self.http, "GET", path, "");
        (status, serde_json::from_str(&body).unwrap_or(Json::Null))
    }

    /// `GET path` with the header `auth` (none: no credentials); the status and JSON body.
    fn get_as(&self, path: &str, auth: Option<&str>) -> (u16, Json) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let auth = auth.map_or(String::new(), |a| format!("{a}\r\n"));
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, serde_json::from_str(body).unwrap_or(Json::Null))
    }

    fn panics(&self) -> f64 {
        let text = testing::http(self.http, "GET", "/metrics", "").1;
        testing::metric_value(&text, "nexus_http_panics_total").unwrap_or(-1.0)
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("ingest stops")
            .unwrap()
            .unwrap();
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_past_the_year_9999_are_a_400_naming_the_parameter() {
    let ing = Ingest::start().await;
    let past = LAST_MS + 1;
    for (query, names) in [
        // The end of the range past 9999, on a stored topic: the response echoes `to`.
        (format!("from=0&to={past}"), "to: "),
        // `from` past 9999 and so after `to` (now): the error message prints both.
        (format!("from={past}"), "from: "),
        // Far enough that the microseconds PostgreSQL takes overflow 64 bits.
        (format!("from=0&to={}", u64::MAX), "to: "),
        (format!("from={}&to={}", u64::MAX - 1, u64::MAX), "from: "),
    ] {
        let path = format!("/api/v1/history?topic={DENSE}&{query}");
        let (s, body) = ing.get(&path);
        assert_eq!(s, 400, "{path}: {body}");
        let e = body["error"].as_str().unwrap();
        assert!(e.starts_with(names), "{path}: {e}");
        assert!(e.contains("9999"), "{path}: {e}");
    }
    // The last millisecond of 9999 is still a time.
    let (s, body) = ing.get(&format!(
        "/api/v1/history?topic={DENSE}&from=9999-12-31T00:00:00Z&to={LAST_MS}"
    ));
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["to"], "9999-12-31T23:59:59.999Z");
    assert_eq!(body["points"], serde_json::json!([]));
    // Nothing panicked, and the service still answers.
    assert_eq!(ing.panics(), 0.0);
    assert_eq!(testing::http(ing.http, "GET", "/healthz", "").0, 200);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_shape_stays_within_history_max_points_and_says_truncated() {
    let ing = Ingest::start().await;
    let range = format!("from={}&to={}", T0 - 1000, T0 + 2 * 3_600_000);
    // Raw: 25 points in the range, 10 served.
    let (s, h) = ing.get(&format!("/api/v1/history?topic={DENSE}&{range}&agg=raw"));
    assert_eq!(s, 200, "{h}");
    assert_eq!(h["points"].as_array().unwrap().len(), MAX, "{h}");
    assert_eq!(h["truncated"], true);
    assert_eq!(h["points"][MAX - 1]["ts"], T0 + 9 * 60_000);
    // Minute buckets: 25 of them, 10 served.
    let (_, h) = ing.get(&format!("/api/v1/history?topic={DENSE}&{range}&agg=1m"));
    assert_eq!(h["points"].as_array().unwrap().len(), MAX, "{h}");
    assert_eq!(h["truncated"], true);
    // Auto: too many raw points, so the finest aggregate with at most 10 buckets (1h).
    let (_, h) = ing.get(&format!("/api/v1/history?topic={DENSE}&{range}"));
    assert_eq!(h["agg"], "1h", "{h}");
    assert!(h["points"].as_array().unwrap().len() <= MAX, "{h}");
    assert_eq!(h["truncated"], false);
    // Auto over centuries: even day buckets do not fit; cut and said.
    let (_, h) = ing.get(&format!(
        "/api/v1/history?topic={DENSE}&from=0&to={LAST_MS}"
    ));
    assert_eq!(h["agg"], "1d", "{h}");
    assert!(h["points"].as_array().unwrap().len() <= MAX, "{h}");
    // Latest with a filter matching every topic (16 of them): 10 served, in topic order.
    for filter in ["#", "acme/#", "acme/s/a/l/d/+", "+/+/+/+/+/+"] {
        let (s, h) = ing.get(&format!("/api/v1/latest?filter={}", encode(filter)));
        assert_eq!(s, 200, "{filter}: {h}");
        let values = h["values"].as_array().unwrap();
        assert_eq!(values.len(), MAX, "{filter}: {h}");
        assert_eq!(h["truncated"], true, "{filter}");
        assert_eq!(values[0]["topic"], DENSE, "{filter}");
        assert_eq!(values[1]["topic"], "acme/s/a/l/d/t0", "{filter}");
    }
    // Under the cap: all of them, not truncated.
    let (_, h) = ing.get(&format!("/api/v1/latest?filter={DENSE}"));
    assert_eq!(h["values"].as_array().unwrap().len(), 1, "{h}");
    assert_eq!(h["truncated"], false, "{h}");
    ing.stop().await;
}

/// Values a client could send as `from`/`to`: anything, and the shapes close to valid ones,
/// unix milliseconds of 13 to 16 digits (today to past the year 9999) most of all.
fn time_text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => any::<String>(),
        3 => "[0-9]{0,24}",
        3 => "[1-9][0-9]{12,15}",
        1 => "now-[0-9]{0,22}[a-z ]{0,8}",
        1 => "[0-9]{1,6}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?Z?",
        1 => Just("now".to_owned()),
    ]
}

/// `name=<value>`, there with probability `p`.
fn param(
    name: &'static str,
    p: f64,
    value: BoxedStrategy<String>,
) -> BoxedStrategy<Option<String>> {
    let pair = value.prop_map(move |v| format!("{name}={}", encode(&v)));
    proptest::option::weighted(p, pair).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_parameters_either_work_or_get_a_4xx() {
    let ing = Ingest::start().await;
    let port = ing.http;
    tokio::task::spawn_blocking(move || {
        let history = (
            param(
                "topic",
                0.9,
                prop_oneof![
                    1 => any::<String>(),
                    3 => Just(DENSE.to_owned()),
                    1 => "[a-z/+#]{0,24}"
                ]
                .boxed(),
            ),
            param("from", 0.7, time_text().boxed()),
            param("to", 0.7, time_text().boxed()),
            param(
                "agg",
                0.5,
                prop_oneof![any::<String>(), "auto|raw|1m|1h|1d|[0-9]{1,3}[smhd]"].boxed(),
            ),
            param("x", 0.1, any::<String>().boxed()),
        )
            .prop_map(|(a, b, c, d, e)| {
                let q: Vec<String> = [a, b, c, d, e].into_iter().flatten().collect();
                format!("/api/v1/history?{}", q.join("&"))
            });
        let latest = param(
            "filter",
            0.9,
            prop_oneof![any::<String>(), "[a-z/+#$]{0,24}"].boxed(),
        )
        .prop_map(|f| format!("/api/v1/latest?{}", f.unwrap_or_default()));
        let path = prop_oneof![3 => history, 1 => latest];
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 300,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        runner
            .run(&path, |path| {
                let (s, body) = testing::http(port, "GET", &path, "");
                prop_assert!(matches!(s, 200 | 400 | 404), "{path}: {s} {body}");
                let json: Json = serde_json::from_str(&body).unwrap_or(Json::Null);
                if s != 200 {
                    prop_assert!(json["error"].is_string(), "{path}: {s} {body}");
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    })
    .await
    .unwrap();
    assert_eq!(ing.panics(), 0.0);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_anonymous_access_history_and_latest_need_a_viewer() {
    let ing = Ingest::start_with(Anonymous::Off).await;
    let history = format!(
        "/api/v1/history?topic={DENSE}&from={T0}&to={}&agg=raw",
        T0 + 3 * 60_000
    );
    for path in [history.as_str(), "/api/v1/latest?filter=acme/%23"] {
        // Both were open to anyone once.
        let (s, body) = ing.get_as(path, None);
        assert_eq!(s, 401, "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("authentication required"),
            "{body}"
        );
        let (s, body) = ing.get_as(path, Some("Authorization: Basic YW5uOndyb25n")); // ann:wrong
        assert_eq!(
            (s, &body["error"]),
            (401, &Json::from("the user name or password is wrong"))
        );
        // A viewer, and a publisher (a viewer over HTTP), read.
        for who in [
            "Authorization: Basic YW5uOmFubi1wdw==", // ann:ann-pw
            "Authorization: Basic cHViOnB1Yi1wdw==", // pub:pub-pw
        ] {
            let (s, body) = ing.get_as(path, Some(who));
            assert_eq!(s, 200, "{path} {who}: {body}");
        }
    }
    let (_, h) = ing.get_as(&history, Some("Authorization: Basic YW5uOmFubi1wdw=="));
    // The points of [from, to): the answer is the data, not only a 200.
    assert_eq!(h["points"].as_array().map(Vec::len), Some(3), "{h}");
    // Health stays open for probes.
    assert_eq!(ing.get_as("/healthz", None).0, 200);
    ing.stop().await;
}
