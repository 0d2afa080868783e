//! The aggregates on plain PostgreSQL: a backlog published hours late is in every aggregate
//! view and every history answer at once, `sample_count` counts numeric samples only, and a
//! time range on an aggregate view is read through an index, not the whole history; answers
//! say when received points are still waiting for the database.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use nexus_common::mqtt::QoS;
use nexus_common::testing::{self, PgServer};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_published_hours_late_is_in_every_aggregate_and_the_history_api() {
    let pg = PgServer::start();
    let url = pg.create_database("late").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "  history_max_points: 100\n");
    ing.ready().await;
    let p = publisher(port).await;
    let db = sql(&url).await;

    let topic = "acme/late/a/l/d/temp";
    let now = now_ms();
    let (n, numeric, sum) = publish_backlog(&p, topic, now, 3).await;
    assert_eq!(
        wait_count(
            &db,
            "SELECT count(*) FROM points",
            n,
            Duration::from_secs(30)
        )
        .await,
        n
    );
    assert!(numeric < n, "the backlog holds values that are not numbers");

    for view in ["metrics_1min", "metrics_1hour", "metrics_1day"] {
        let (c, s) = view_totals(&db, view, topic).await;
        assert_eq!(
            c, numeric,
            "{view}: sample_count counts the numeric samples"
        );
        assert!(close(s, sum), "{view}: {s} vs {sum}");
    }
    let from = now - 2 * 86_400_000;
    for agg in ["1m", "1h", "1d"] {
        let (status, a) = ing.get(&format!(
            "/api/v1/history?topic={topic}&from={from}&to={now}&agg={agg}"
        ));
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["incomplete"], false, "{a}");
        let (c, s) = bucket_totals(&a);
        // 1m over two days is more than 100 buckets: that answer is cut and says so.
        if a["truncated"] == true {
            assert_eq!(agg, "1m");
            assert!(c < numeric);
        } else {
            assert_eq!(c, numeric, "{agg}");
            assert!(close(s, sum), "{agg}: {s} vs {sum}");
        }
    }
    // auto: too many raw points for 100, so the finest aggregate that fits, complete.
    let (_, a) = ing.get(&format!(
        "/api/v1/history?topic={topic}&from=now-4h&agg=auto"
    ));
    assert_eq!(a["agg"], "1h", "{a}");
    assert_eq!(a["truncated"], false);
    assert_eq!(bucket_totals(&a).0, numeric, "{a}");
    ing.stop().await;
}

/// `metrics_1min/1hour/1day` on plain PostgreSQL group by an immutable bucket expression of
/// `time` that an index covers: a query for the last hour of a year of data reads through
/// it (shown by EXPLAIN), where the views of earlier versions read the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_on_an_aggregate_view_is_read_through_an_index() {
    let pg = PgServer::start();
    let url = pg.create_database("explain").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "  retention: {raw: null}\n");
    ing.ready().await;
    ing.stop().await;
    let db = sql(&url).await;
    // A year of one point a minute for 4 tags, in time order as ingestion writes them.
    db.batch_execute(
        "INSERT INTO tags (topic) SELECT 'acme/x/a/l/d/t' || g FROM generate_series(1, 4) g;
         INSERT INTO points (time, tag_id, value, quality)
             SELECT now() - make_interval(mins => m), t.id, m % 100, 0
             FROM generate_series(525600, 0, -1) m, tags t ORDER BY 1;
         ANALYZE points; ANALYZE tags;",
    )
    .await
    .unwrap();
    for (view, range) in [
        ("metrics_1min", "1 hour"),
        ("metrics_1hour", "1 day"),
        ("metrics_1day", "7 days"),
    ] {
        for filter in ["", "topic = 'acme/x/a/l/d/t2' AND "] {
            let q =
                format!("SELECT * FROM {view} WHERE {filter}bucket >= now() - INTERVAL '{range}'");
            let plan: Vec<String> = db
                .query(&format!("EXPLAIN {q}"), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let plan = plan.join("\n");
            assert!(
                plan.contains("Index Cond: (date_bin("),
                "{q}: the bucket range is an index condition:\n{plan}"
            );
            assert!(!plan.contains("Seq Scan on points"), "{q}:\n{plan}");
        }
    }
    // And the answer is the aggregate of the range: about an hour of one tag (the buckets
    // starting after the cut).
    let n = count(
        &db,
        "SELECT sum(sample_count)::bigint FROM metrics_1min
         WHERE topic = 'acme/x/a/l/d/t2' AND bucket >= now() - INTERVAL '1 hour'",
    )
    .await;
    assert!((58..=62).contains(&n), "{n}");
}

/// Points the service received but could not store yet (the writers are held up by a lock
/// that still lets readers in) make history answers say `incomplete` with `backlog`; once
/// the points are stored the answers are complete again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_say_incomplete_while_received_points_wait_for_the_database() {
    let pg = PgServer::start();
    let url = pg.create_database("backlog").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "");
    ing.ready().await;
    let p = publisher(port).await;
    let db = sql(&url).await;
    let topic = "acme/bl/a/l/d/x";
    let now = now_ms();
    p.publish(
        topic,
        format!(r#"{{"v":1,"ts":{}}}"#, now - 60_000),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        wait_count(
            &db,
            "SELECT count(*) FROM points",
            1,
            Duration::from_secs(20)
        )
        .await,
        1
    );
    let path = format!("/api/v1/history?topic={topic}&from=now-1h&agg=1m");
    assert_eq!(ing.get(&path).1["incomplete"], false);

    // SHARE mode: reads go on, inserts wait.
    let mut locker = sql(&url).await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE points IN SHARE MODE")
        .await
        .unwrap();
    p.publish(
        topic,
        format!(r#"{{"v":2,"ts":{now}}}"#),
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let waited = Instant::now();
    while ing.metric("nexus_ingest_oldest_unwritten_age_seconds") <= 6.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the point never waited"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, a) = ing.get(&path);
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["incomplete"], true, "{a}");
    assert_eq!(
        a["incomplete_reasons"],
        serde_json::json!(["backlog"]),
        "{a}"
    );
    assert_eq!(bucket_totals(&a).0, 1, "only the stored point: {a}");

    tx.rollback().await.unwrap();
    assert_eq!(
        wait_count(
            &db,
            "SELECT count(*) FROM points",
            2,
            Duration::from_secs(30)
        )
        .await,
        2
    );
    let waited = Instant::now();
    loop {
        let (_, a) = ing.get(&path);
        if a["incomplete"] == false {
            assert_eq!(bucket_totals(&a).0, 2, "{a}");
            break;
        }
        assert!(waited.elapsed() < Duration::from_secs(30), "{a}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ing.stop().await;
}
