//! TimescaleDB, where the harness finds the extension installed for its PostgreSQL (it is
//! not in Debian's packages; build it from source to run these): hypertable, compression,
//! real-time continuous aggregates, policies reconciled in place, retention by tier, a
//! backlog published hours late into compressed chunks, job health; and a server that has
//! the extension installed but not preloaded, which falls back to plain PostgreSQL. Where
//! TimescaleDB is absent each test says it was skipped and passes: the plain PostgreSQL tests
//! carry the proof there.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nexus_common::mqtt::QoS;
use nexus_common::testing::{self, PgServer};
use support::*;
use tokio_postgres::Client;

fn skipped(test: &str) {
    eprintln!("{test}: skipped, TimescaleDB is not installed for this PostgreSQL");
}

/// The historian's jobs: (relation, policy) -> (job id, config as text, schedule).
async fn jobs(db: &Client) -> BTreeMap<(String, String), (i32, String, String)> {
    db.query(
        "SELECT coalesce(c.view_name::text, j.hypertable_name::text),
                CASE j.proc_name WHEN 'policy_compression' THEN 'compression'
                                 WHEN 'policy_retention' THEN 'retention' ELSE 'refresh' END,
                j.job_id, (j.config - 'hypertable_id' - 'mat_hypertable_id')::text,
                j.schedule_interval::text
         FROM timescaledb_information.jobs j
         LEFT JOIN timescaledb_information.continuous_aggregates c
                ON c.materialization_hypertable_name = j.hypertable_name
         WHERE j.proc_name LIKE 'policy_%' AND j.hypertable_name IS NOT NULL",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4))))
    .collect()
}

/// Run a job now, in this session (what its schedule would do).
async fn run_job(db: &Client, id: i32) {
    db.batch_execute(&format!("CALL run_job({id})"))
        .await
        .unwrap_or_else(|e| panic!("job {id}: {e}"));
}

async fn run_refreshes(db: &Client) {
    for ((_, policy), (id, _, _)) in jobs(db).await {
        if policy == "refresh" {
            run_job(db, id).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_policies_realtime_aggregates_compression_retention_and_a_late_backlog() {
    let Some(pg) = PgServer::start_with_timescaledb() else {
        return skipped(
            "timescaledb_policies_realtime_aggregates_compression_retention_and_a_late_backlog",
        );
    };
    let url = pg.create_database("tsdb").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let config = "  chunk_interval: 1h\n  compress_after: 2h\n  history_max_points: 100\n";
    let ing = start(port, &url, wal.path(), config);
    ing.ready().await;
    let db = sql(&url).await;
    let version: String = db
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!("TimescaleDB {version}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'points'").await,
        1
    );
    // Real-time aggregation on every tier.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM timescaledb_information.continuous_aggregates
                    WHERE view_name IN ('points_1min', 'points_1hour', 'points_1day')
                      AND NOT materialized_only"
        )
        .await,
        3
    );
    // The policies the default retention asks for: raw 30d, 1min 90d, 1hour 1825d, 1day none;
    // refreshes reach back as far as raw points are kept.
    let j = jobs(&db).await;
    let cfg = |rel: &str, policy: &str| {
        j.get(&(rel.to_owned(), policy.to_owned()))
            .map(|(_, c, _)| c.clone())
            .unwrap_or_default()
    };
    assert_eq!(cfg("points", "retention"), r#"{"drop_after": "720:00:00"}"#);
    assert_eq!(
        cfg("points", "compression"),
        r#"{"compress_after": "02:00:00"}"#
    );
    assert_eq!(
        cfg("points_1min", "retention"),
        r#"{"drop_after": "2160:00:00"}"#
    );
    assert_eq!(
        cfg("points_1hour", "retention"),
        r#"{"drop_after": "43800:00:00"}"#
    );
    assert!(
        !j.contains_key(&("points_1day".into(), "retention".into())),
        "{j:?}"
    );
    for (tier, every) in [
        ("points_1min", "00:00:30"),
        ("points_1hour", "00:05:00"),
        ("points_1day", "00:15:00"),
    ] {
        assert!(
            cfg(tier, "refresh").contains(r#""start_offset": "720:00:00""#),
            "{tier}: {j:?}"
        );
        assert_eq!(
            j[&(tier.to_owned(), "refresh".to_owned())].2,
            every,
            "{tier}"
        );
    }

    // First wave: every other value of a 6-hour backlog; materialised, then the chunks older
    // than 2 hours compressed.
    let p = publisher(port).await;
    let topic = "acme/ts/a/l/d/temp";
    let now = now_ms();
    let (first, _, _) = publish_backlog_every(&p, topic, now, 6, 2).await;
    assert_eq!(
        wait_count(
            &db,
            "SELECT count(*) FROM points",
            first,
            Duration::from_secs(30)
        )
        .await,
        first
    );
    run_refreshes(&db).await;
    let (compress_job, _, _) = j[&("points".to_owned(), "compression".to_owned())].clone();
    run_job(&db, compress_job).await;
    let compressed = count(
        &db,
        "SELECT count(*) FROM timescaledb_information.chunks
         WHERE hypertable_name = 'points' AND is_compressed",
    )
    .await;
    assert!(
        compressed >= 3,
        "chunks older than 2h compressed: {compressed}"
    );

    // The whole backlog, hours late: its new values land in compressed chunks in the same
    // batches as duplicates of the first wave (the path TimescaleDB before 2.18.1 lost rows
    // on). Every new value is stored and every duplicate counted.
    let (n, numeric, sum) = publish_backlog(&p, topic, now, 6).await;
    assert_eq!(
        wait_count(
            &db,
            "SELECT count(*) FROM points",
            n,
            Duration::from_secs(60)
        )
        .await,
        n,
        "every value of the backlog stored"
    );
    let start_t = Instant::now();
    while ing.metric("nexus_ingest_points_duplicate_total") < first as f64
        && start_t.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ing.metric("nexus_ingest_points_duplicate_total"),
        first as f64
    );
    assert_eq!(count(&db, "SELECT count(*) FROM points").await, n);

    // Below the watermark the late values wait for a refresh: the API says so.
    let from = now - 2 * 86_400_000;
    let (_, a) = ing.get(&format!("/api/v1/history?topic={topic}&from={from}&agg=1h"));
    assert_eq!(a["incomplete"], true, "{a}");
    assert_eq!(a["incomplete_reasons"][0], "refresh_pending", "{a}");
    assert!(bucket_totals(&a).0 < numeric, "{a}");

    // The refresh policies reach back hours (as far as raw points are kept): after their
    // run, every aggregate holds every numeric sample, and every answer is complete.
    run_refreshes(&db).await;
    for view in ["metrics_1min", "metrics_1hour", "metrics_1day"] {
        let (c, s) = view_totals(&db, view, topic).await;
        assert_eq!(
            c, numeric,
            "{view}: sample_count counts the numeric samples"
        );
        assert!(close(s, sum), "{view}: {s} vs {sum}");
    }
    for agg in ["1h", "1d"] {
        let (status, a) = ing.get(&format!(
            "/api/v1/history?topic={topic}&from={from}&agg={agg}"
        ));
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["incomplete"], false, "{agg}: {a}");
        let (c, s) = bucket_totals(&a);
        assert_eq!(c, numeric, "{agg}: {a}");
        assert!(close(s, sum), "{agg}: {s} vs {sum}");
    }
    let (_, a) = ing.get(&format!(
        "/api/v1/history?topic={topic}&from=now-7h&agg=auto"
    ));
    assert_eq!(a["agg"], "1h", "{a}");
    assert_eq!(bucket_totals(&a).0, numeric, "{a}");

    // Real time: a value of this minute is in every aggregate without a refresh.
    p.publish("acme/ts/a/l/d/now", r#"{"v":7.5}"#, QoS::AtLeastOnce, false)
        .await
        .unwrap();
    wait_count(
        &db,
        "SELECT count(*) FROM points p JOIN tags t ON t.id = p.tag_id WHERE t.topic = 'acme/ts/a/l/d/now'",
        1,
        Duration::from_secs(20),
    )
    .await;
    for view in ["metrics_1min", "metrics_1hour", "metrics_1day"] {
        assert_eq!(
            view_totals(&db, view, "acme/ts/a/l/d/now").await,
            (1, 7.5),
            "{view}"
        );
    }
    ing.stop().await;

    // Same config again: the same jobs, unchanged (their history kept).
    let ing = start(port, &url, wal.path(), config);
    ing.ready().await;
    assert_eq!(jobs(&db).await, j, "policies kept in place");
    ing.stop().await;

    // A changed retention changes the policies in place: the same job ids.
    let changed =
        format!("{config}  retention: {{raw: 10d, 1min: 20d, 1hour: null, 1day: 3650d}}\n");
    let ing = start(port, &url, wal.path(), &changed);
    ing.ready().await;
    let k = jobs(&db).await;
    let id = |m: &BTreeMap<(String, String), (i32, String, String)>, rel: &str, policy: &str| {
        m.get(&(rel.to_owned(), policy.to_owned())).map(|v| v.0)
    };
    assert_eq!(id(&k, "points", "retention"), id(&j, "points", "retention"));
    assert_eq!(
        k[&("points".into(), "retention".into())].1,
        r#"{"drop_after": "240:00:00"}"#
    );
    assert_eq!(
        id(&k, "points_1min", "retention"),
        id(&j, "points_1min", "retention")
    );
    assert_eq!(
        k[&("points_1min".into(), "retention".into())].1,
        r#"{"drop_after": "480:00:00"}"#
    );
    assert_eq!(
        id(&k, "points_1hour", "retention"),
        None,
        "1hour kept for ever now"
    );
    assert_eq!(
        k[&("points_1day".into(), "retention".into())].1,
        r#"{"drop_after": "87600:00:00"}"#
    );
    assert_eq!(
        id(&k, "points_1min", "refresh"),
        id(&j, "points_1min", "refresh")
    );
    assert!(k[&("points_1min".into(), "refresh".into())]
        .1
        .contains(r#""start_offset": "240:00:00""#));

    // Retention by tier at work: raw points older than 10 days go, 1min buckets older than
    // 20 days go, the 1day tier keeps its buckets.
    for stmt in [
        "INSERT INTO points (time, tag_id, value, quality)
             SELECT now() - INTERVAL '25 days', id, 1, 0 FROM tags WHERE topic = 'acme/ts/a/l/d/temp'",
        "CALL refresh_continuous_aggregate('points_1min', now() - INTERVAL '26 days', now() - INTERVAL '24 days')",
        "CALL refresh_continuous_aggregate('points_1day', now() - INTERVAL '27 days', now() - INTERVAL '23 days')",
    ] {
        db.batch_execute(stmt).await.unwrap();
    }
    let old = |v: &str| {
        format!(
            "SELECT count(*) FROM {v} WHERE {} < now() - INTERVAL '15 days'",
            if v == "points" { "time" } else { "bucket" }
        )
    };
    assert_eq!(count(&db, &old("points")).await, 1);
    assert_eq!(count(&db, &old("points_1min")).await, 1);
    assert_eq!(count(&db, &old("points_1day")).await, 1);
    run_job(&db, id(&k, "points", "retention").unwrap()).await;
    run_job(&db, id(&k, "points_1min", "retention").unwrap()).await;
    assert_eq!(
        count(&db, &old("points")).await,
        0,
        "raw points past 10 days dropped"
    );
    assert_eq!(
        count(&db, &old("points_1min")).await,
        0,
        "1min buckets past 20 days dropped"
    );
    assert_eq!(
        count(&db, &old("points_1day")).await,
        1,
        "1day keeps its buckets"
    );
    // The refresh reaches back only as far as raw points are kept: the day bucket stays.
    run_refreshes(&db).await;
    assert_eq!(count(&db, &old("points_1day")).await, 1);

    // Job health: what the monitor shows agrees with TimescaleDB's job statistics.
    let failing_sql = "SELECT count(*) FROM timescaledb_information.job_stats s
         JOIN timescaledb_information.jobs j USING (job_id)
         WHERE s.last_run_status = 'Failed' AND j.proc_name LIKE 'policy_%' AND j.hypertable_name IS NOT NULL";
    let start_t = Instant::now();
    loop {
        let failing = count(&db, failing_sql).await;
        let text = ing.metrics_text();
        let shown: f64 = text
            .lines()
            .filter(|l| l.starts_with("nexus_ingest_timescaledb_job_failing{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let (_, ready) = ing.get("/readyz");
        let condition = ready["conditions"]["timescaledb_jobs"].as_bool();
        if shown == failing as f64 && condition == Some(failing == 0) {
            eprintln!("failing jobs: {failing}");
            break;
        }
        assert!(
            start_t.elapsed() < Duration::from_secs(90),
            "metrics show {shown} failing jobs, TimescaleDB {failing}; readiness {ready}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ing.stop().await;
}

/// The state right after installing the package: the extension is available but the server
/// does not preload it. Ingestion sets up plain PostgreSQL on a live connection and stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_installed_but_not_preloaded_falls_back_to_plain_postgresql() {
    if !testing::timescaledb_installed() {
        return skipped("timescaledb_installed_but_not_preloaded_falls_back_to_plain_postgresql");
    }
    let pg = PgServer::start();
    let url = pg.create_database("notloaded").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "");
    ing.ready().await;
    let db = sql(&url).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        .await,
        1
    );
    let p = publisher(port).await;
    let (n, numeric, _) = publish_backlog(&p, "acme/nl/a/l/d/x", now_ms(), 1).await;
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
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        )
        .await,
        0
    );
    assert_eq!(
        view_totals(&db, "metrics_1hour", "acme/nl/a/l/d/x").await.0,
        numeric
    );
    ing.stop().await;
}

/// A database whose `points_1min` an earlier version made (every row counted, materialised
/// only, its policy removed and added at each start): the next start defines it again with
/// `sample_count` counting numeric samples and real-time aggregation on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_aggregates_of_an_earlier_version_are_defined_again() {
    let Some(pg) = PgServer::start_with_timescaledb() else {
        return skipped("timescaledb_aggregates_of_an_earlier_version_are_defined_again");
    };
    let url = pg.create_database("oldcagg").await;
    let b = testing::service_broker();
    let port = b.ports.tcp().port();
    let wal = tempfile::tempdir().unwrap();
    let ing = start(port, &url, wal.path(), "");
    ing.ready().await;
    ing.stop().await;
    let db = sql(&url).await;
    // The earlier definition, as that version created it.
    db.batch_execute(
        "DROP VIEW metrics_1min;
         DROP MATERIALIZED VIEW points_1min;
         CREATE MATERIALIZED VIEW points_1min WITH (timescaledb.continuous) AS
         SELECT time_bucket(INTERVAL '1 minute', time) AS bucket, tag_id,
                avg(value) AS avg_value, min(value) AS min_value, max(value) AS max_value,
                count(*) AS sample_count,
                first(value, time) AS first_value, last(value, time) AS last_value
         FROM points GROUP BY 1, 2 WITH NO DATA;
         ALTER MATERIALIZED VIEW points_1min SET (timescaledb.materialized_only = true);
         CREATE VIEW metrics_1min AS
             SELECT c.bucket, t.topic, c.avg_value, c.min_value, c.max_value,
                    c.sample_count, c.first_value, c.last_value
             FROM points_1min c JOIN tags t ON t.id = c.tag_id;",
    )
    .await
    .unwrap();
    let ing = start(port, &url, wal.path(), "");
    ing.ready().await;
    let p = publisher(port).await;
    let topic = "acme/old/a/l/d/x";
    let (n, numeric, sum) = publish_backlog(&p, topic, now_ms(), 1).await;
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
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM timescaledb_information.continuous_aggregates
                    WHERE view_name = 'points_1min' AND NOT materialized_only
                      AND view_definition NOT ILIKE '%count(*)%'"
        )
        .await,
        1
    );
    // Nothing materialised yet: real-time aggregation answers, numeric samples only.
    let (c, s) = view_totals(&db, "metrics_1min", topic).await;
    assert_eq!(c, numeric);
    assert!(close(s, sum), "{s} vs {sum}");
    ing.stop().await;
}
