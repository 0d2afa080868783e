//! What the historian tests share: an ingestion service on a real broker and PostgreSQL,
//! a publisher, SQL helpers, and the late backlog they publish.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS};
use nexus_common::testing::{self, free_port};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

pub async fn publisher(port: u16) -> MqttHandle {
    let mut c = testing::service_mqtt_config(port);
    c.inflight = 1000;
    let (h, _rx) = mqtt::connect(
        &c,
        ClientSettings::new(testing::unique("pub")),
        None,
        CancellationToken::new(),
    )
    .unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    h
}

pub struct Ingest {
    token: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub http: u16,
}

/// Ingestion on broker `port` and database `db`, with `extra` lines of its section.
pub fn start(port: u16, db: &str, wal: &std::path::Path, extra: &str) -> Ingest {
    let http = free_port();
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {port}, username: svc, password: svc-pw, reconnect_min: 50ms }}\n\
         telemetry: {{ instance: hist }}\n\
         database:\n  url: \"{db}\"\ningestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n  batch_timeout: 20ms\n{extra}",
        wal.display()
    );
    let cfg = Config::from_str_with_env(&text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let token = CancellationToken::new();
    let task = tokio::spawn(nexus_data_ingestion::run(Arc::new(cfg), token.clone()));
    Ingest { token, task, http }
}

impl Ingest {
    /// Until every readiness condition holds but `timescaledb_jobs` (whose failures some
    /// tests expect).
    pub async fn ready(&self) {
        let start = Instant::now();
        loop {
            let (_, body) = self.get("/readyz");
            let ready = body["conditions"].as_object().is_some_and(|c| {
                c.iter()
                    .all(|(k, v)| k == "timescaledb_jobs" || v.as_bool() == Some(true))
            });
            if ready {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "ingest not ready: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The subscription is in place once the client is connected; give it a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    pub fn metrics_text(&self) -> String {
        testing::http(self.http, "GET", "/metrics", "").1
    }

    pub fn metric(&self, sample: &str) -> f64 {
        testing::metric_value(&self.metrics_text(), sample).unwrap_or(0.0)
    }

    pub fn get(&self, path: &str) -> (u16, Json) {
        let (status, body) = testing::http(self.http, "GET", path, "");
        (status, serde_json::from_str(&body).unwrap_or(Json::Null))
    }

    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("ingest stops")
            .unwrap()
            .unwrap();
    }
}

pub async fn sql(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

pub async fn count(c: &tokio_postgres::Client, q: &str) -> i64 {
    c.query_one(q, &[]).await.map(|r| r.get(0)).unwrap_or(-1)
}

pub async fn wait_count(c: &tokio_postgres::Client, q: &str, want: i64, limit: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let n = count(c, q).await;
        if n >= want || start.elapsed() > limit {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A store-and-forward backlog: one value every 10 s from `hours` ago to 10 minutes ago,
/// published now. Every 50th is a string and every 70th a null with bad quality (not
/// numeric samples). Returns (points, numeric samples, sum of the numeric values).
pub async fn publish_backlog(
    p: &MqttHandle,
    topic: &str,
    end_ms: i64,
    hours: i64,
) -> (i64, i64, f64) {
    publish_backlog_every(p, topic, end_ms, hours, 1).await
}

/// [`publish_backlog`], only every `every`th value of it (the same values at the same times).
pub async fn publish_backlog_every(
    p: &MqttHandle,
    topic: &str,
    end_ms: i64,
    hours: i64,
    every: i64,
) -> (i64, i64, f64) {
    let start = end_ms - hours * 3_600_000;
    let (mut n, mut numeric, mut sum) = (0, 0, 0.0);
    let mut t = start - start % 10_000;
    let mut i = 0i64;
    while t < end_ms - 600_000 {
        if i % every != 0 {
            i += 1;
            t += 10_000;
            continue;
        }
        let body = if i % 50 == 0 {
            format!(r#"{{"v":"state-{i}","ts":{t}}}"#)
        } else if i % 70 == 0 {
            format!(r#"{{"v":null,"q":"bad","ts":{t}}}"#)
        } else {
            let v = (i % 97) as f64 * 0.5;
            numeric += 1;
            sum += v;
            format!(r#"{{"v":{v},"ts":{t}}}"#)
        };
        p.publish(topic, body, QoS::AtLeastOnce, false)
            .await
            .unwrap();
        n += 1;
        i += 1;
        t += 10_000;
    }
    (n, numeric, sum)
}

/// Sum of `count` and of `avg * count` over a history answer's buckets.
pub fn bucket_totals(answer: &Json) -> (i64, f64) {
    let points = answer["points"].as_array().unwrap();
    points.iter().fold((0, 0.0), |(n, s), b| {
        let c = b["count"].as_i64().unwrap();
        (n + c, s + b["avg"].as_f64().unwrap_or(0.0) * c as f64)
    })
}

/// Sum of `sample_count` and of `avg_value * sample_count` of `topic` in `view`.
pub async fn view_totals(db: &tokio_postgres::Client, view: &str, topic: &str) -> (i64, f64) {
    let r = db
        .query_one(
            &format!(
                "SELECT coalesce(sum(sample_count), 0)::bigint,
                        coalesce(sum(avg_value * sample_count), 0)::float8
                 FROM {view} WHERE topic = $1"
            ),
            &[&topic],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}
