//! `nexus ingest` as its own process, the way it fails in the field:
//! * killed with SIGKILL at random moments while 200,000 points stream in through Mosquitto
//!   (default window of 20 QoS 1 messages in flight): every point is stored exactly once;
//! * PostgreSQL stopped for 60 s under load (embedded broker): everything arrives, memory
//!   stays bounded, the WAL drains.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_common::config::Secret;
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS};
use nexus_common::testing::{self, free_port, Mosquitto, PgServer};
use tokio_util::sync::CancellationToken;

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");
const T0: i64 = 1_760_000_000_000;

struct Proc {
    config: tempfile::NamedTempFile,
    child: Option<Child>,
    http: u16,
}

impl Proc {
    fn start(mqtt: &str, db: &str, wal: &std::path::Path) -> Proc {
        let http = free_port();
        let mut config = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        write!(
            config,
            "mqtt: {{ {mqtt}, reconnect_min: 50ms, reconnect_max: 500ms }}\n\
             telemetry: {{ instance: proc-test, log_level: warn }}\n\
             database:\n  url: \"{db}\"\ningestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n",
            wal.display()
        )
        .unwrap();
        let mut p = Proc {
            config,
            child: None,
            http,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        self.child = Some(
            Command::new(NEXUS)
                .args(["ingest", "--config"])
                .arg(self.config.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn metric(&self, sample: &str) -> Option<f64> {
        let (_, text) = testing::http(self.http, "GET", "/metrics", "");
        testing::metric_value(&text, sample)
    }

    async fn ready(&self, limit: Duration) {
        let start = Instant::now();
        while testing::http(self.http, "GET", "/readyz", "").0 != 200 {
            assert!(start.elapsed() < limit, "ingest not ready in {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

async fn publisher(port: u16, user: Option<&str>) -> MqttHandle {
    let mut c = testing::mqtt_config(port);
    c.inflight = 1000;
    if let Some(u) = user {
        c.username = Some(u.into());
        c.password = Some(Secret::new(format!("{u}-pw")));
    }
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

async fn sql(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

async fn count(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM points", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

/// A pseudo-random number in `lo..hi` (milliseconds), different each call and run.
fn jitter(lo: u64, hi: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    lo + RandomState::new().hash_one(Instant::now()) % (hi - lo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_stores_nothing_twice() {
    let pg = PgServer::start();
    let url = pg.create_database("kill").await;
    // Mosquitto with its default window of 20 messages in flight per client.
    let mq = Mosquitto::start("max_inflight_messages 20").unwrap();
    let port = mq.addr().port();
    let wal = tempfile::tempdir().unwrap();
    let mut ing = Proc::start(&format!("host: 127.0.0.1, port: {port}"), &url, wal.path());
    ing.ready(Duration::from_secs(30)).await;

    const N: i64 = 200_000;
    let p = publisher(port, None).await;
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            let topic = format!("kill/site/area/line/dev/t{}", i % 200);
            p.publish(
                &topic,
                format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        }
        p
    });
    let db = sql(&url).await;
    let mut kills = Vec::new();
    let mut dups = 0.0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(jitter(150, 1200))).await;
        let stored = count(&db).await;
        dups += ing
            .metric("nexus_ingest_points_duplicate_total")
            .unwrap_or(0.0);
        ing.kill9();
        kills.push(stored);
        tokio::time::sleep(Duration::from_millis(jitter(50, 600))).await;
        ing.spawn();
    }
    let _p = publishing.await.unwrap();
    let start = Instant::now();
    let mut n = count(&db).await;
    while n < N && start.elapsed() < Duration::from_secs(240) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        n = count(&db).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT value), min(value), max(value) FROM points",
            &[],
        )
        .await
        .unwrap();
    let (total, distinct, min, max): (i64, i64, f64, f64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    eprintln!(
        "kill test: killed at {kills:?} stored points; final {total} rows, {distinct} distinct; \
         duplicates dropped (replayed or redelivered after a kill): {}; drained {:.1}s after the last publish",
        dups + ing.metric("nexus_ingest_points_duplicate_total").unwrap_or(0.0),
        start.elapsed().as_secs_f64()
    );
    assert!(
        kills.iter().any(|&k| k > 0 && k < N),
        "at least one kill hit the stream in the middle: {kills:?}"
    );
    assert_eq!(total, N, "no loss, no duplicate");
    assert_eq!(distinct, N);
    assert_eq!((min, max), (0.0, (N - 1) as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60s_database_outage_under_load_loses_nothing_and_the_wal_drains() {
    let mut pg = PgServer::start();
    let url = pg.create_database("outage").await;
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = Proc::start(
        &format!("host: 127.0.0.1, port: {port}, username: svc, password: svc-pw"),
        &url,
        wal.path(),
    );
    ing.ready(Duration::from_secs(30)).await;
    let p = publisher(port, Some("svc")).await;

    // 2,000 points/s for 80 s; the database is away from 10 s to 70 s.
    let rate = 2000;
    let seconds = 80;
    let total = rate * seconds;
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut i: i64 = 0;
        while i < total {
            tick.tick().await;
            for _ in 0..rate / 100 {
                let topic = format!("out/site/area/line/dev/t{}", i % 500);
                p.publish(
                    &topic,
                    format!(r#"{{"v":{i},"ts":{}}}"#, T0 + i),
                    QoS::AtLeastOnce,
                    false,
                )
                .await
                .unwrap();
                i += 1;
            }
        }
        p
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg.stop();
    let outage = Instant::now();
    let (mut max_rss, mut max_wal, mut saw_down, mut max_age) = (0u64, 0f64, false, 0f64);
    while outage.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        max_rss = max_rss.max(ing.rss_kib());
        max_wal = max_wal.max(ing.metric("nexus_ingest_wal_bytes").unwrap_or(0.0));
        max_age = max_age.max(
            ing.metric("nexus_ingest_oldest_unwritten_age_seconds")
                .unwrap_or(0.0),
        );
        saw_down |= ing.metric("nexus_ingest_db_up") == Some(0.0);
    }
    pg.restart();
    let _p = publishing.await.unwrap();
    let db = sql(&url).await;
    let start = Instant::now();
    let mut n = count(&db).await;
    while n < total && start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        n = count(&db).await;
        max_rss = max_rss.max(ing.rss_kib());
    }
    // The WAL drains: nothing uncommitted, the committed segments deleted.
    let drained = Instant::now();
    while ing.metric("nexus_ingest_oldest_unwritten_age_seconds") != Some(0.0)
        && drained.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wal_after = ing.metric("nexus_ingest_wal_bytes").unwrap_or(-1.0);
    eprintln!(
        "outage test: {total} points, {n} stored; WAL peak {:.1} MiB, after {:.1} MiB; oldest unwritten peaked at {max_age:.0} s; RSS peak {:.1} MiB",
        max_wal / 1048576.0,
        wal_after / 1048576.0,
        max_rss as f64 / 1024.0
    );
    assert_eq!(n, total, "everything arrives");
    assert_eq!(count(&db).await, total, "nothing twice");
    assert!(saw_down, "nexus_ingest_db_up showed the outage");
    assert!(
        max_age >= 30.0,
        "the age of the oldest unwritten point grew: {max_age}"
    );
    assert!(max_wal > 1_000_000.0, "the WAL held the outage: {max_wal}");
    assert!(
        wal_after < 16.0 * 1048576.0 + 1.0,
        "the WAL drained to its open segment: {wal_after}"
    );
    assert_eq!(
        ing.metric("nexus_ingest_oldest_unwritten_age_seconds"),
        Some(0.0)
    );
    assert!(
        max_rss < 200 * 1024,
        "memory stays bounded while 120,000 points wait: {max_rss} KiB"
    );
}
