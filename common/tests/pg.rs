//! Database connections carry the `database` section's statement timeout, set once
//! connected (a startup parameter would be refused by poolers such as PgBouncer), unless
//! the URL sets one itself.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use nexus_common::pg::{connect, Database};
use nexus_common::testing::PgServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_the_timeout_is_cancelled() {
    let pg = PgServer::start();
    let url = pg.create_database("timeouts").await;
    let mut db = Database::at(&url);
    db.statement_timeout = Duration::from_millis(300);
    let (client, _task) = connect(&db).await.unwrap();
    let shown: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "300ms");
    let e = client.execute("SELECT pg_sleep(2)", &[]).await.unwrap_err();
    let cause = e.as_db_error().map(|d| d.message().to_owned());
    assert_eq!(
        cause.as_deref(),
        Some("canceling statement due to statement timeout"),
        "{e:?}"
    );
    // The connection stays usable.
    client.execute("SELECT 1", &[]).await.unwrap();

    // A timeout the URL sets wins.
    let sep = if url.contains('?') { '&' } else { '?' };
    let own = format!("{url}{sep}options=-c%20statement_timeout%3D5000");
    let (client, _task) = connect(&Database::at(&own)).await.unwrap();
    let shown: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "5s");
}
