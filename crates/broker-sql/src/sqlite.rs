//! SQLite: a writer thread with diesel's synchronous connection, one transaction per batch.
//!
//! SQLite is a library in our process; a dedicated thread owning the connection is what
//! diesel-async's `SyncConnectionWrapper` would do per call, without a thread hop per batch.
//! SQLite allows one writer at a time, so rows are committed in `id` order and an `id` cursor
//! never skips one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use broker_core::pipeline::{self, Command, Inbox, Pending, Readiness};
use broker_core::{CloseReport, Error, EventSource, Position, Received, async_trait};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::{Sqlite, SqliteConnection};

use crate::config::{NAME, SqlConfig, TableName};
use crate::{EventRow, IdRow, Row, rows_of};

const MIGRATIONS: &[&str] = &[include_str!("../migrations/sqlite/0001_create_events.sql")];

/// Rows per INSERT statement (two bind parameters each; SQLite allows 32766).
const ROWS_PER_STATEMENT: usize = 1000;

fn unavailable(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: NAME, reason: format!("{what} {}: {e}", path.display()), cause: None }
}

/// Opens the database with WAL, a busy timeout and full sync, and creates the table if missing.
pub(crate) fn open(path: &Path, table: &TableName) -> Result<SqliteConnection, Error> {
    let url = path.to_string_lossy();
    let mut conn =
        SqliteConnection::establish(&url).map_err(|e| unavailable(path, "cannot open SQLite database", e))?;
    let memory = url == ":memory:";
    let pragmas = if memory {
        "PRAGMA busy_timeout = 5000;"
    } else {
        "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"
    };
    conn.batch_execute(pragmas).map_err(|e| unavailable(path, "cannot configure", e))?;
    for m in MIGRATIONS {
        conn.batch_execute(&m.replace("{table}", &table.quoted()))
            .map_err(|e| unavailable(path, "cannot create the table in", e))?;
    }
    Ok(conn)
}

/// Inserts `rows` in one transaction and returns their ids in order.
pub(crate) fn insert(conn: &mut SqliteConnection, table: &TableName, rows: &[Row<'_>]) -> QueryResult<Vec<i64>> {
    conn.immediate_transaction(|c| {
        let mut ids = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut sql = format!("INSERT INTO {} (sender_id, data) VALUES ", table.quoted());
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 { "(?, ?)" } else { ", (?, ?)" });
            }
            sql.push_str(" RETURNING id");
            let mut q = diesel::sql_query(sql).into_boxed::<Sqlite>();
            for r in chunk {
                q = q.bind::<Nullable<Text>, _>(r.sender_id).bind::<Text, _>(r.data);
            }
            let mut got: Vec<i64> = q.load::<IdRow>(c)?.into_iter().map(|r| r.id).collect();
            got.sort_unstable();
            ids.extend(got);
        }
        Ok(ids)
    })
}

pub(crate) struct Writer {
    pub(crate) conn: SqliteConnection,
    pub(crate) config: SqlConfig,
    pub(crate) path: PathBuf,
    pub(crate) ready: Readiness,
}

impl Writer {
    pub(crate) fn run(mut self, mut inbox: Inbox) {
        let mut batch = Vec::with_capacity(self.config.batch_size);
        let mut pending: Vec<Pending> = Vec::with_capacity(self.config.batch_size);
        loop {
            batch.clear();
            if inbox.blocking_recv_batch(&mut batch, self.config.batch_size) == 0 {
                self.write(&mut pending, &inbox);
                return;
            }
            for cmd in batch.drain(..) {
                match cmd {
                    Command::Publish(p) => pending.push(p),
                    Command::Flush(tx) => {
                        self.write(&mut pending, &inbox);
                        let _ = tx.send(());
                    }
                    Command::Close { deadline, reply } => {
                        self.write(&mut pending, &inbox);
                        let report = self.finish(&mut inbox, deadline);
                        // Release the database before saying "closed": whoever opens it next
                        // must not find our connection still there.
                        drop(self);
                        let _ = reply.send(report);
                        return;
                    }
                    _ => {}
                }
            }
            self.write(&mut pending, &inbox);
        }
    }

    fn finish(&mut self, inbox: &mut Inbox, deadline: Instant) -> CloseReport {
        inbox.close();
        let mut undelivered = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        while let Some(cmd) = inbox.try_recv() {
            if Instant::now() >= deadline {
                for p in pending.drain(..) {
                    p.give_up(self.config.delivery.close_timeout, &mut undelivered);
                }
                pipeline::drain_undelivered(inbox, self.config.delivery.close_timeout, &mut undelivered);
                break;
            }
            match cmd {
                Command::Publish(p) => {
                    pending.push(p);
                    if pending.len() >= self.config.batch_size {
                        self.write(&mut pending, inbox);
                    }
                }
                Command::Flush(tx) => {
                    self.write(&mut pending, inbox);
                    let _ = tx.send(());
                }
                Command::Close { reply, .. } => {
                    let _ = reply.send(CloseReport::default());
                }
                _ => {}
            }
        }
        self.write(&mut pending, inbox);
        CloseReport::new(undelivered)
    }

    /// Commits `pending` as one transaction and settles each event. A failed transaction is
    /// retried with backoff (a locked database) until the close deadline; what still fails is
    /// tried one event at a time so a bad event fails alone.
    fn write(&mut self, pending: &mut Vec<Pending>, inbox: &Inbox) {
        if pending.is_empty() {
            return;
        }
        let (ok, rejected) = rows_of(pending, self.config.max_event_bytes);
        for p in rejected {
            let len = p.json.len();
            p.reject(NAME, format!("{len} bytes is over max_event_bytes {}", self.config.max_event_bytes.unwrap_or(0)));
        }
        if ok.is_empty() {
            return;
        }
        let mut delay = Duration::from_millis(50);
        let mut last_error = String::new();
        for _ in 0..6 {
            let rows: Vec<Row<'_>> = ok.iter().map(Row::of).collect();
            match insert(&mut self.conn, &self.config.table, &rows) {
                Ok(ids) if ids.len() == ok.len() => {
                    self.ready.set(true);
                    for (p, id) in ok.into_iter().zip(ids) {
                        p.settle.delivered(Some(Position::Row(id)));
                    }
                    return;
                }
                Ok(ids) => last_error = format!("inserted {} rows for {} events", ids.len(), ok.len()),
                Err(e) => last_error = e.to_string(),
            }
            if inbox.close_deadline().is_some_and(|d| Instant::now() + delay >= d) {
                break;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(self.config.retry_max_delay);
        }
        tracing::warn!("sqlite {}: batch failed ({last_error}); trying its events one by one", self.path.display());
        for p in ok {
            let row = [Row::of(&p)];
            match insert(&mut self.conn, &self.config.table, &row) {
                Ok(ids) => {
                    let id = <[_]>::first(&ids).copied();
                    p.settle.delivered(id.map(Position::Row));
                }
                Err(e) => {
                    self.ready.set(false);
                    let reason = e.to_string();
                    p.settle.settle(Err(Error::Io {
                        backend: NAME,
                        operation: format!("inserting into {}", self.path.display()),
                        reason,
                        cause: None,
                    }));
                }
            }
        }
    }
}

/// Reads rows in `id` order, polling for new ones when following.
pub(crate) struct SqliteSource {
    pub(crate) conn: Arc<Mutex<SqliteConnection>>,
    pub(crate) table: TableName,
    pub(crate) cursor: i64,
    pub(crate) follow: bool,
    pub(crate) buffered: std::collections::VecDeque<EventRow>,
}

impl SqliteSource {
    /// The highest id now in the table (where a consumer "from now" starts).
    pub(crate) fn max_id(conn: &mut SqliteConnection, table: &TableName) -> Result<i64, Error> {
        let rows: Vec<IdRow> = diesel::sql_query(format!("SELECT COALESCE(MAX(id), 0) AS id FROM {}", table.quoted()))
            .load(conn)
            .map_err(|e| Error::Io {
                backend: NAME,
                operation: "reading the last id".into(),
                reason: e.to_string(),
                cause: None,
            })?;
        Ok(<[_]>::first(&rows).map_or(0, |r| r.id))
    }

    async fn poll(&mut self) -> Result<(), Error> {
        let conn = self.conn.clone();
        let sql = format!("SELECT id, sender_id, data FROM {} WHERE id > ? ORDER BY id LIMIT 500", self.table.quoted());
        let cursor = self.cursor;
        let rows = tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
            diesel::sql_query(sql).bind::<BigInt, _>(cursor).load::<EventRow>(&mut *c)
        })
        .await
        .map_err(|e| Error::Io { backend: NAME, operation: "polling".into(), reason: e.to_string(), cause: None })?
        .map_err(|e| Error::Io {
            backend: NAME,
            operation: "reading events".into(),
            reason: e.to_string(),
            cause: None,
        })?;
        self.buffered.extend(rows);
        Ok(())
    }
}

#[async_trait]
impl EventSource for SqliteSource {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn next(&mut self) -> Result<Option<Received>, Error> {
        loop {
            if let Some(row) = self.buffered.pop_front() {
                self.cursor = row.id;
                return row.into_received().map(Some);
            }
            self.poll().await?;
            if self.buffered.is_empty() {
                if !self.follow {
                    return Ok(None);
                }
                tokio::time::sleep(crate::POLL).await;
            }
        }
    }
}
