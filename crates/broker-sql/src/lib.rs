//! The SQL event broker (`type: sql`): SQLite and PostgreSQL, Rasa's `events` table, many
//! events per transaction, and a consumer that follows the table by `id`.
//!
//! - **Configuration and table** (docs/rasa-compat.md §5): `dialect` (`sqlite`, default, or
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
//! - **Delivery** (docs/contract.md §A): a writer takes up to `batch_size` queued events and commits
//!   them in one transaction; each event's receipt is settled by that commit, with its row id.
//!   PostgreSQL outages are ridden out: reconnect with backoff, nothing accepted is lost, and a
//!   batch whose commit outcome was lost is not inserted twice. SQLite runs in WAL mode.
//! - **Consuming** (docs/contract.md §B): by `id` cursor, never skipping a row that a concurrent writer
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
mod tracker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::delivery::{self, Batch, DriverOptions, Failure, Record, Sink, Verdict};
use broker_core::{
    Backend, BackendFactory, ConfigError, Configured, Error, Event, EventBroker, EventSource, Position, Received,
    SourceOptions, StartFrom, async_trait,
};
use diesel::sql_types::{BigInt, Nullable, Text};

use config::NAME;
pub use config::{Database, PgTarget, SqlConfig, TableName};
pub use tracker::{SqlTrackerStore, SqlTrackerStoreFactory};

/// How often a following consumer looks for new rows.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// One row to insert.
pub(crate) struct Row<'a> {
    pub(crate) sender_id: Option<&'a str>,
    pub(crate) data: &'a str,
}

impl Row<'_> {
    pub(crate) fn of(p: &Record) -> Row<'_> {
        // The column is VARCHAR(255): keep the first 255 characters there (data has it all).
        let sender_id = p.sender_id.as_deref().map(|s| s.char_indices().nth(255).map_or(s, |(i, _)| &s[..i]));
        // Rasa's encoding is ASCII, hence UTF-8.
        let data = std::str::from_utf8(&p.json).unwrap_or_default();
        Row { sender_id, data }
    }
}

#[derive(diesel::QueryableByName)]
pub(crate) struct VersionRow {
    #[diesel(sql_type = Text)]
    pub(crate) version: String,
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
            Ok(event) => Ok(Received::new(event, raw, position, u64::try_from(self.id).ok())),
            Err(e) => Err(Error::Malformed { position, reason: e.to_string() }),
        }
    }
}

/// `pool_size` PostgreSQL connections as one sink: each batch is split by `sender_id` (so each
/// conversation keeps its order on one connection) and the parts are written at once. The
/// driver above it owns retries, deadlines and the close report as for one connection.
struct PoolSink {
    sinks: Vec<postgres::PgSink>,
}

impl PoolSink {
    fn route(&self, sender_id: &Option<String>) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        sender_id.hash(&mut h);
        // The remainder is below the pool size, a usize.
        usize::try_from(h.finish() % self.sinks.len() as u64).unwrap_or(0)
    }
}

/// Runs every future to completion at once and returns their outputs in order.
async fn join_all<T>(mut futures: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut out: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[async_trait]
impl Sink for PoolSink {
    async fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
        let mut parts: Vec<(Vec<usize>, Vec<Record>)> =
            (0..self.sinks.len()).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, r) in batch.iter().enumerate() {
            let (idx, recs) = &mut parts[self.route(&r.sender_id)];
            idx.push(i);
            recs.push(r.clone());
        }
        let writes = self
            .sinks
            .iter_mut()
            .zip(parts.iter())
            .map(|(sink, (_, recs))| {
                Box::pin(async move { if recs.is_empty() { Ok(Vec::new()) } else { sink.write_records(recs).await } })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Verdict>, Error>> + Send + '_>>
            })
            .collect();
        let results: Vec<Result<Vec<Verdict>, Error>> = join_all(writes).await;
        let mut verdicts: Vec<Option<Verdict>> = vec![None; batch.len()];
        for ((idx, _), result) in parts.iter().zip(results) {
            match result {
                Ok(v) => {
                    for (i, verdict) in idx.iter().zip(v) {
                        verdicts[*i] = Some(verdict);
                    }
                }
                Err(e) => {
                    for i in idx {
                        verdicts[*i] = Some(Verdict::Retry(e.clone()));
                    }
                }
            }
        }
        let missing = || {
            Verdict::Retry(Error::Io {
                backend: NAME,
                operation: "inserting".into(),
                reason: "no verdict".into(),
                cause: None,
            })
        };
        Ok(verdicts.into_iter().map(|v| v.unwrap_or_else(missing)).collect())
    }

    async fn recover(&mut self, failure: &Failure) -> Result<(), Error> {
        let recovers = self
            .sinks
            .iter_mut()
            .map(|s| {
                Box::pin(s.recover(failure)) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>>
            })
            .collect();
        join_all(recovers).await.into_iter().collect::<Result<Vec<()>, Error>>().map(|_| ())
    }

    async fn ping(&mut self) -> Result<(), Error> {
        let pings = self
            .sinks
            .iter_mut()
            .map(|s| Box::pin(s.ping()) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>>)
            .collect();
        join_all(pings).await.into_iter().collect::<Result<Vec<()>, Error>>().map(|_| ())
    }

    async fn close(&mut self) {
        for s in &mut self.sinks {
            s.close().await;
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

    fn close_timeout(&self) -> std::time::Duration {
        self.config.delivery.close_timeout
    }

    #[tracing::instrument(name = "connect", level = "error", skip_all, fields(backend = NAME, destination = %self.config.table.as_str()))]
    async fn connect(&self) -> Result<Box<dyn EventBroker>, Error> {
        let config = &self.config;
        let options = DriverOptions::default()
            .batch_size(config.batch_size)
            .max_event_bytes(config.max_event_bytes)
            .attempt_timeout(config.attempt_timeout)
            .retry(config.retry_max_delay / 10, config.retry_max_delay);
        let delivery = config.delivery.clone();
        let meter = broker_core::metrics::Meter::new(NAME, config.table.as_str());
        let broker = match &config.database {
            Database::Sqlite { path } => {
                let (db, table) = (path.clone(), config.table.clone());
                let conn = tokio::task::spawn_blocking(move || sqlite::open(&db, &table)).await.map_err(|e| {
                    Error::Io { backend: NAME, operation: "opening".into(), reason: e.to_string(), cause: None }
                })??;
                let sink = sqlite::SqliteSink { conn: Some(conn), table: config.table.clone(), path: path.clone() };
                delivery::start(meter.clone(), delivery::on_thread("broker-sqlite-writer", sink)?, delivery, options)
            }
            Database::Postgres(target) => {
                let options = options.ping_interval(Some(postgres::HEALTH_INTERVAL));
                if config.pool_size <= 1 {
                    let sink = postgres::start_sink(target.clone(), config.clone()).await?;
                    delivery::start(meter.clone(), sink, delivery, options)
                } else {
                    let mut sinks = Vec::with_capacity(config.pool_size);
                    for _ in 0..config.pool_size {
                        sinks.push(postgres::start_sink(target.clone(), config.clone()).await?);
                    }
                    // Each connection commits up to `batch_size` rows of every batch.
                    let options = options.batch_size(config.batch_size * config.pool_size);
                    delivery::start(meter.clone(), PoolSink { sinks }, delivery, options)
                }
            }
        };
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
                        // Past every id a table can hold: the end.
                        StartFrom::Offset(id) => i64::try_from(id).unwrap_or(i64::MAX),
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

    async fn server_version(&self) -> Result<Option<String>, Error> {
        match &self.config.database {
            Database::Sqlite { path } => {
                let path = path.clone();
                let version =
                    tokio::task::spawn_blocking(move || sqlite::library_version(&path)).await.map_err(|e| {
                        Error::Io { backend: NAME, operation: "opening".into(), reason: e.to_string(), cause: None }
                    })??;
                Ok(Some(version))
            }
            Database::Postgres(target) => {
                Ok(Some(postgres::server_version(target, self.config.connect_timeout).await?))
            }
        }
    }
}

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
