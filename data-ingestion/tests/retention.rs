//! Retention by tier on plain PostgreSQL: raw points past `retention.raw` are deleted by the
//! scheduled delete (it runs at start, then every 10 minutes), the aggregates, computed from
//! the raw points there, lose them with it; `raw: null` keeps everything; a changed
//! retention takes effect at the next start.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use nexus_common::mqtt::QoS;
use nexus_common::testing::{self, PgServer};
use support::*;

/// The test's points: the historian keys them by the topic below (a stray point another
/// process published to this broker's port would be reported, not counted).
const OWN: &str = "SELECT count(*) FROM points p JOIN tags t ON t.id = p.tag_id \
                   WHERE t.topic = 'acme/ret/a/l/d/x'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_points_past_their_retention_are_deleted_and_a_changed_retention_applies_at_start() {
    let pg = PgServer::start();
    let url = pg.create_database("retention").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let db = sql(&url).await;
    let topic = "acme/ret/a/l/d/x";
    let hour = 3_600_000;
    let now = now_ms();

    // Kept for ever: nothing is deleted.
    let ing = start(port, &url, wal.path(), "  retention: {raw: null}\n");
    ing.ready().await;
    let p = publisher(port).await;
    for (i, age) in [50, 26, 5, 3, 1, 0].into_iter().enumerate() {
        let body = format!(r#"{{"v":{i},"ts":{}}}"#, now - age * hour);
        p.publish(topic, body, QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    assert_eq!(wait_count(&db, OWN, 6, Duration::from_secs(20)).await, 6);
    ing.stop().await;
    let ing = start(port, &url, wal.path(), "  retention: {raw: null}\n");
    ing.ready().await;
    ing.stop().await;
    assert_eq!(count(&db, OWN).await, 6);
    let stray = db
        .query("SELECT topic FROM tags WHERE topic <> $1", &[&topic])
        .await
        .unwrap();
    if !stray.is_empty() {
        let topics: Vec<String> = stray.iter().map(|r| r.get(0)).collect();
        eprintln!("points of other topics reached this test's historian: {topics:?}");
    }

    // A day: the two older points go at start.
    let ing = start(port, &url, wal.path(), "  retention: {raw: 1d}\n");
    ing.ready().await;
    let deleted = wait_gone(&db, 4).await;
    assert_eq!(deleted, 4, "points younger than a day stay");
    assert_eq!(view_totals(&db, "metrics_1day", topic).await.0, 4);
    ing.stop().await;

    // Two hours: only the points of the last two hours are left.
    let ing = start(port, &url, wal.path(), "  retention: {raw: 2h}\n");
    ing.ready().await;
    assert_eq!(wait_gone(&db, 2).await, 2);
    let (status, a) = ing.get(&format!(
        "/api/v1/history?topic={topic}&from={}&agg=raw",
        now - 100 * hour
    ));
    assert_eq!(status, 200);
    assert_eq!(a["points"].as_array().unwrap().len(), 2, "{a}");
    ing.stop().await;
}

/// Until `points` holds `want` rows (or 20 s); returns the count.
async fn wait_gone(db: &tokio_postgres::Client, want: i64) -> i64 {
    let start = Instant::now();
    loop {
        let n = count(db, OWN).await;
        if n <= want || start.elapsed() > Duration::from_secs(20) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
