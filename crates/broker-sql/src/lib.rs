//! The SQL event broker (`type: sql`): SQLite and PostgreSQL, Rasa's `events` table, many
//! events per transaction, and a consumer that follows the table by `id`.
//!
//! - **Configuration and table** (rasa-compat §5): `dialect` (`sqlite`, default, or
//!   `postgresql`), `url` (host, `host:port`, or a full URL with `://`), `port`, `db` (default
//!   `events.db`; for SQLite a path relative to the working directory, or `:memory:`), `username`,
//!   `password`. The table `events(id, sender_id VARCHAR(255), data TEXT)` is created when missing
//!   (`migrations/<dialect>/`); one Rasa created is used as is. `data` is the event's Rasa
//!   encoding. Ours: `table` (validated identifier), `batch_size` (500), `max_event_bytes`,
//!   `pool_size` (PostgreSQL writer connections, default 1; events are spread by `sender_id`, so
//!   each conversation keeps its order), `retry_delay_in_seconds` (longest reconnect wait, 5), `connect_timeout` (10), TLS for
//!   PostgreSQL with libpq's names (`sslmode`: `disable` (default), `prefer`, `require`,
//!   `verify-ca`, `verify-full`; `sslrootcert`, `sslcert`, `sslkey`; see [`tls`]), and the
//!   delivery options `buffer_size`, `when_full`, `close_timeout`.
//! - **Delivery** (contracts §A): a writer takes up to `batch_size` queued events and commits
//!   them in one transaction; each event's receipt is settled by that commit, with its row id.
//!   PostgreSQL outages are ridden out: reconnect with backoff, nothing accepted is lost, and a
//!   batch whose commit outcome was lost is not inserted twice. SQLite runs in WAL mode.
//! - **Consuming** (contracts §B): by `id` cursor, never skipping a row that a concurrent writer
//!   committed after a higher id: it hands rows over while ids are contiguous, and at a gap waits
//!   until every transaction that could fill it has ended.
//! - A `sender_id` longer than the column's 255 characters is cut to fit *in that column*; `data`
//!   keeps it whole. (Rasa's insert fails on PostgreSQL there.)
//!
//! ```
//! use broker_core::{Backend, Event, EventBroker};
//! use broker_sql::{SqlBackend, SqlConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::Error> {
//! let dir = tempfile::tempdir().expect("temp dir");
//! let backend = SqlBackend::new(SqlConfig::sqlite(dir.path().join("events.db")));
//! let broker = backend.connect().await?;
//! let line = br#"{"sender_id": "a", "event": "restart", "timestamp": 1.5}"#;
//! let delivered = broker.publish(Event::from_json(line).expect("valid")).await?.await?;
//! assert_eq!(delivered.position, Some(broker_core::Position::Row(1)));
//! broker.close().await?;
//! # Ok(())
//! # }
//! ```

mod config;
mod postgres;
mod sqlite;
pub mod tls;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::pipeline::{self, Pending, QueuedBroker};
use broker_core::{
    Backend, BackendFactory, ConfigError, Configured, Error, Event, EventBroker, EventSource, Position, Received,
    SourceOptions, StartFrom, async_trait,
};
use diesel::sql_types::{BigInt, Nullable, Text};

use config::NAME;
pub use config::{Database, PgTarget, SqlConfig, TableName};

/// How often a following consumer looks for new rows.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// One row to insert.
pub(crate) struct Row<'a> {
    pub(crate) sender_id: Option<&'a str>,
    pub(crate) data: &'a str,
}

impl Row<'_> {
    pub(crate) fn of(p: &Pending) -> Row<'_> {
        // The column is VARCHAR(255): keep the first 255 characters there (data has it all).
        let sender_id = p.sender_id.as_deref().map(|s| s.char_indices().nth(255).map_or(s, |(i, _)| &s[..i]));
        // Rasa's encoding is ASCII, hence UTF-8.
        let data = std::str::from_utf8(&p.json).unwrap_or_default();
        Row { sender_id, data }
    }
}

/// Splits `pending` into events to insert and events over `max_event_bytes`.
pub(crate) fn rows_of(pending: &mut Vec<Pending>, max: Option<usize>) -> (Vec<Pending>, Vec<Pending>) {
    match max {
        None => (std::mem::take(pending), Vec::new()),
        Some(m) => std::mem::take(pending).into_iter().partition(|p| p.json.len() <= m),
    }
}

#[derive(diesel::QueryableByName)]
pub(crate) struct IdRow {
    #[diesel(sql_type = BigInt)]
    pub(crate) id: i64,
}

#[derive(diesel::QueryableByName)]
pub(crate) struct EventRow {
    #[diesel(sql_type = BigInt)]
    pub(crate) id: i64,
    #[diesel(sql_type = Nullable<Text>)]
    #[allow(dead_code)]
    pub(crate) sender_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) data: Option<String>,
}

impl EventRow {
    pub(crate) fn into_received(self) -> Result<Received, Error> {
        let position = Position::Row(self.id);
        let Some(data) = self.data else {
            return Err(Error::Malformed { position, reason: "the data column is NULL".into() });
        };
        let raw = data.into_bytes();
        match Event::from_json(&raw) {
            Ok(event) => Ok(Received::new(event, raw, position, Some(self.id as u64))),
            Err(e) => Err(Error::Malformed { position, reason: e.to_string() }),
        }
    }
}

/// Spreads one queue over several writers by `sender_id`, keeping flush and close semantics.
async fn route(mut inbox: pipeline::Inbox, outboxes: Vec<pipeline::Outbox>) {
    let outboxes: Vec<Arc<pipeline::Outbox>> = outboxes.into_iter().map(Arc::new).collect();
    use std::hash::{Hash, Hasher};
    let mut batch = Vec::with_capacity(512);
    loop {
        batch.clear();
        let n = inbox.recv_batch(&mut batch, 512).await;
        for cmd in batch.drain(..) {
            match cmd {
                pipeline::Command::Publish(p) => {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    p.sender_id.hash(&mut h);
                    let target = &outboxes[(h.finish() % outboxes.len() as u64) as usize];
                    if let Err(p) = target.forward(p).await {
                        p.settle.settle(Err(Error::Closed));
                    }
                }
                pipeline::Command::Flush(tx) => {
                    for o in &outboxes {
                        let _ = o.flush().await;
                    }
                    let _ = tx.send(());
                }
                pipeline::Command::Close { reply, .. } => {
                    // All writers close at once, each within the same deadline.
                    let closing: Vec<_> = outboxes
                        .iter()
                        .map(|o| {
                            let o = o.clone();
                            tokio::spawn(async move { o.close().await })
                        })
                        .collect();
                    let mut undelivered = Vec::new();
                    for c in closing {
                        if let Ok(Ok(mut report)) = c.await {
                            undelivered.append(&mut report.undelivered);
                        }
                    }
                    let _ = reply.send(broker_core::CloseReport::new(undelivered));
                    return;
                }
                _ => {}
            }
        }
        if n == 0 {
            return;
        }
    }
}

/// A configured SQL backend.
#[derive(Debug, Clone)]
pub struct SqlBackend {
    config: SqlConfig,
}

impl SqlBackend {
    /// A backend with `config`.
    pub fn new(config: SqlConfig) -> SqlBackend {
        SqlBackend { config }
    }

    /// The settings.
    pub fn config(&self) -> &SqlConfig {
        &self.config
    }
}

/// Factory for `type: sql`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SqlFactory;

impl BackendFactory for SqlFactory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn configure(&self, options: broker_core::Options) -> Result<Configured, ConfigError> {
        let (config, warnings) = SqlConfig::from_options(options)?;
        Ok(Configured::new(Box::new(SqlBackend::new(config)), warnings))
    }
}

#[async_trait]
impl Backend for SqlBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        match &self.config.database {
            Database::Sqlite { path } => format!("sql sqlite {} table {}", path.display(), self.config.table.as_str()),
            Database::Postgres(pg) => format!("sql {} table {}", pg.describe(), self.config.table.as_str()),
        }
    }

    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        let (outbox, inbox) = pipeline::channel(NAME, self.config.delivery.clone());
        let (broker, ready) = QueuedBroker::new(outbox);
        match &self.config.database {
            Database::Sqlite { path } => {
                let (db, table) = (path.clone(), self.config.table.clone());
                let conn = tokio::task::spawn_blocking(move || sqlite::open(&db, &table)).await.map_err(|e| {
                    Error::Io { backend: NAME, operation: "opening".into(), reason: e.to_string(), cause: None }
                })??;
                let writer = sqlite::Writer { conn, config: self.config.clone(), path: path.clone(), ready };
                std::thread::Builder::new()
                    .name("broker-sqlite-writer".into())
                    .spawn(move || writer.run(inbox))
                    .map_err(|e| Error::io(NAME, "starting the writer thread", e))?;
            }
            Database::Postgres(target) if self.config.pool_size <= 1 => {
                let writer = postgres::start_writer(target.clone(), self.config.clone(), ready).await?;
                tokio::spawn(writer.run(inbox));
            }
            Database::Postgres(target) => {
                // One writer per connection, each with its own queue; a router sends each event
                // to the writer its sender_id hashes to.
                let n = self.config.pool_size;
                let mut sub = self.config.delivery.clone();
                sub.buffer_size = (sub.buffer_size / n).max(1);
                let mut outboxes = Vec::with_capacity(n);
                for _ in 0..n {
                    let (o, i) = pipeline::channel(NAME, sub.clone());
                    let writer = postgres::start_writer(target.clone(), self.config.clone(), ready.clone()).await?;
                    tokio::spawn(writer.run(i));
                    outboxes.push(o);
                }
                tokio::spawn(route(inbox, outboxes));
            }
        }
        Ok(Box::new(broker))
    }

    async fn source(&self, options: &SourceOptions) -> Result<Box<dyn EventSource>, Error> {
        match &self.config.database {
            Database::Sqlite { path } => {
                let (path, table) = (path.clone(), self.config.table.clone());
                let start = options.start.clone();
                let (conn, cursor) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
                    let mut conn = sqlite::open(&path, &table)?;
                    let cursor = match start {
                        StartFrom::Beginning => 0,
                        StartFrom::Offset(id) => id as i64,
                        _ => sqlite::SqliteSource::max_id(&mut conn, &table)?,
                    };
                    Ok((conn, cursor))
                })
                .await
                .map_err(|e| Error::Io {
                    backend: NAME,
                    operation: "opening".into(),
                    reason: e.to_string(),
                    cause: None,
                })??;
                Ok(Box::new(sqlite::SqliteSource {
                    conn: Arc::new(Mutex::new(conn)),
                    table: self.config.table.clone(),
                    cursor,
                    follow: options.follow,
                    buffered: Default::default(),
                }))
            }
            Database::Postgres(target) => {
                let source = postgres::PgSource::open(target, &self.config, &options.start, options.follow).await?;
                Ok(Box::new(source))
            }
        }
    }
}
