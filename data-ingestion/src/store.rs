//! The storing side: the WAL reader feeds the batcher from the first frame not yet in the
//! database; once the historian schema is in place (retried while the database is away: the
//! WAL holds the data meanwhile) the writers take the batches, and on plain PostgreSQL a
//! retention task deletes old points. It outlives the receiving side a little on shutdown,
//! to commit what is in flight.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use nexus_common::config::IngestionConfig;
use nexus_common::pg::{Database, PgError};

use crate::history::Db;
use crate::schema::{self, Storage};
use crate::wal::Wal;
use crate::writer::{self, Batch, WriterCtx};

/// Why a database task of the storing side failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Connect(#[from] PgError),
    #[error("setting up the historian schema: {0}")]
    Schema(#[source] tokio_postgres::Error),
    #[error("deleting expired points: {0}")]
    Retention(#[source] tokio_postgres::Error),
}

/// What the database half is made of.
pub struct Historian {
    pub cfg: IngestionConfig,
    pub writers: Arc<WriterCtx>,
    /// The history API's handle, told what storage the schema set up.
    pub api: Arc<Db>,
}

/// The running storing side.
pub struct Store {
    wal: Wal,
    reader: std::thread::JoinHandle<()>,
    batcher: JoinHandle<()>,
    /// Sets the schema up, then starts the writers (and retention); gives their handles.
    setup: JoinHandle<Vec<JoinHandle<()>>>,
    token: CancellationToken,
}

impl Store {
    /// Read `wal` from frame `start` on, batch, and write once the schema is set up.
    pub fn start(wal: &Wal, start: u64, historian: Historian) -> std::io::Result<Store> {
        let token = CancellationToken::new();
        let (frame_tx, frame_rx) = mpsc::channel(8);
        let reader = wal.spawn_reader(start, frame_tx)?;
        let (batch_tx, batch_rx) = mpsc::channel(historian.cfg.writers);
        let batcher = tokio::spawn(writer::batcher(
            frame_rx,
            batch_tx,
            historian.cfg.batch_size,
            historian.cfg.batch_timeout,
            token.clone(),
        ));
        let setup = tokio::spawn(historian.run(batch_rx, token.clone()));
        Ok(Store {
            wal: wal.clone(),
            reader,
            batcher,
            setup,
            token,
        })
    }

    /// Cancelled when the storing side stops (for tasks that live as long).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Give running writers up to `grace` to commit what the WAL holds, then stop reading,
    /// batching and writing. What is left stays in the WAL for the next start.
    pub async fn stop(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.wal.pending_frames() > 0
            && tokio::time::Instant::now() < deadline
            && self.setup.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.token.cancel();
        self.wal.close();
        let _ = self.batcher.await;
        if let Ok(tasks) = self.setup.await {
            for t in tasks {
                let _ = t.await;
            }
        }
        let reader = self.reader;
        let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    }
}

impl Historian {
    /// Set the schema up, tell the history API what storage it is, then start the writers on
    /// `batches` and, on plain PostgreSQL with a retention, the retention task. Returns their
    /// handles (none when `token` ends the wait for the database).
    async fn run(
        self,
        batches: mpsc::Receiver<Batch>,
        token: CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let Some(storage) = schema_when_ready(&self.writers.db, &self.cfg, &token).await else {
            return Vec::new();
        };
        let plain_retention = storage
            .timescale
            .is_none()
            .then_some(self.cfg.retention.raw)
            .flatten();
        let retention_now = storage.retention_changed;
        *self
            .api
            .storage
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(storage);
        let batches = Arc::new(tokio::sync::Mutex::new(batches));
        let mut tasks: Vec<_> = (0..self.cfg.writers)
            .map(|i| {
                tokio::spawn(writer::writer(
                    i,
                    self.writers.clone(),
                    batches.clone(),
                    token.clone(),
                ))
            })
            .collect();
        if let Some(keep) = plain_retention {
            tasks.push(tokio::spawn(retention(
                self.writers.db.clone(),
                keep,
                retention_now,
                token.clone(),
            )));
        }
        tasks
    }
}

/// Set the historian schema up, on a connection of its own.
async fn set_up_schema(db: &Database, cfg: &IngestionConfig) -> Result<Storage, StoreError> {
    let (client, _task) = nexus_common::pg::connect(db).await?;
    match schema::ensure(&client, cfg, true).await {
        // A failed CREATE EXTENSION can end the connection (a library the server does not
        // preload): the plain layout, on a fresh one.
        Err(e) if client.is_closed() => {
            tracing::warn!(error = %e, "TimescaleDB could not be set up and the connection ended; using plain PostgreSQL");
            let (client, _task) = nexus_common::pg::connect(db).await?;
            schema::ensure(&client, cfg, false)
                .await
                .map_err(StoreError::Schema)
        }
        r => r.map_err(StoreError::Schema),
    }
}

/// [`set_up_schema`] until it works, with backoff; `None` when `token` ends the wait.
async fn schema_when_ready(
    db: &Database,
    cfg: &IngestionConfig,
    token: &CancellationToken,
) -> Option<Storage> {
    let mut attempt = 0;
    loop {
        match set_up_schema(db, cfg).await {
            Ok(s) => return Some(s),
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!(error = %e, "historian schema not ready; retrying (points wait in the WAL)");
                }
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(nexus_common::supervise::backoff(Duration::from_millis(200), Duration::from_secs(10), attempt)) => {}
                    _ = token.cancelled() => return None,
                }
            }
        }
    }
}

/// One retention run: delete points older than `keep`; returns how many.
async fn delete_expired(db: &Database, keep: Duration) -> Result<u64, StoreError> {
    let (client, _task) = nexus_common::pg::connect(db).await?;
    schema::delete_expired(&client, keep)
        .await
        .map_err(StoreError::Retention)
}

/// How often the plain PostgreSQL retention runs.
const RETENTION_PERIOD: Duration = Duration::from_secs(600);

/// Plain PostgreSQL retention: every 10 minutes, delete points older than `keep`. The first
/// run is at once when the retention changed since the last start (`now`), else after a
/// period: a service restarting in a loop does not delete at every start, and a newly
/// configured retention does not wait.
async fn retention(db: Database, keep: Duration, now: bool, token: CancellationToken) {
    let first = if now {
        tokio::time::Instant::now()
    } else {
        tokio::time::Instant::now() + RETENTION_PERIOD
    };
    if now {
        tracing::info!(keep = ?keep, "retention.raw changed: deleting older points now");
    }
    let mut tick = tokio::time::interval_at(first, RETENTION_PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        match delete_expired(&db, keep).await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "retention: old points deleted"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention run failed; next in 10 minutes"),
        }
    }
}
