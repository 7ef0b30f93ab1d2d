//! SQLite: a writer thread with diesel's synchronous connection, one transaction per batch.
//!
//! SQLite is a library in our process; a dedicated thread owning the connection is what
//! diesel-async's `SyncConnectionWrapper` would do per call, without a thread hop per batch.
//! SQLite allows one writer at a time, so rows are committed in `id` order and an `id` cursor
//! never skips one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use broker_core::delivery::{Batch, BlockingSink, Verdict};
use broker_core::{Error, EventSource, Position, Received, async_trait};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::{Sqlite, SqliteConnection};

use crate::config::{NAME, TableName};
use crate::{EventRow, IdRow, Row};

const MIGRATIONS: &[&str] = &[include_str!("../migrations/sqlite/0001_create_events.sql")];

/// Rows per INSERT statement (two bind parameters each; SQLite allows 32766).
const ROWS_PER_STATEMENT: usize = 1000;

fn unavailable(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: NAME, reason: format!("{what} {}: {e}", path.display()), cause: None }
}

/// `SQLite <version>` of the library this program links.
pub(crate) fn library_version(path: &Path) -> Result<String, Error> {
    let mut conn = SqliteConnection::establish(&path.to_string_lossy())
        .map_err(|e| unavailable(path, "cannot open SQLite database", e))?;
    let row = diesel::sql_query("SELECT sqlite_version() AS version")
        .get_result::<crate::VersionRow>(&mut conn)
        .map_err(|e| unavailable(path, "cannot query", e))?;
    Ok(format!("SQLite {}", row.version))
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

/// The SQLite writing side, on its own thread (see [`broker_core::delivery::blocking`]).
pub(crate) struct SqliteSink {
    pub(crate) conn: Option<SqliteConnection>,
    pub(crate) table: TableName,
    pub(crate) path: PathBuf,
}

/// Whose fault a failed SQLite statement is. A locked or busy database, a full disk and I/O
/// errors (SQLITE_BUSY, _LOCKED, _FULL, _IOERR, _CANTOPEN, _READONLY, ...) are not the events':
/// they wait and retry. Only a constraint an event breaks (a table with its own checks) is.
pub(crate) fn classify(e: &diesel::result::Error) -> Option<String> {
    use diesel::result::{DatabaseErrorKind as K, Error as E};
    match e {
        E::DatabaseError(
            K::UniqueViolation | K::ForeignKeyViolation | K::NotNullViolation | K::CheckViolation,
            info,
        ) => Some(info.message().to_owned()),
        _ => None,
    }
}

impl SqliteSink {
    fn error(&self, e: &diesel::result::Error) -> Error {
        Error::Io {
            backend: NAME,
            operation: format!("inserting into {}", self.path.display()),
            reason: e.to_string(),
            cause: None,
        }
    }
}

impl BlockingSink for SqliteSink {
    fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(unavailable(&self.path, "the database is closed:", "closed"));
        };
        let rows: Vec<Row<'_>> = batch.iter().map(Row::of).collect();
        match insert(conn, &self.table, &rows) {
            Ok(ids) if ids.len() == rows.len() => {
                Ok(ids.into_iter().map(|id| Verdict::Delivered(Some(Position::Row(id)))).collect())
            }
            Ok(ids) => Err(Error::Io {
                backend: NAME,
                operation: format!("inserting into {}", self.path.display()),
                reason: format!("inserted {} rows for {} events", ids.len(), rows.len()),
                cause: None,
            }),
            Err(e) => match classify(&e) {
                Some(reason) => Ok(vec![Verdict::Suspect(format!("SQLite refused the event: {reason}")); rows.len()]),
                None => Err(self.error(&e)),
            },
        }
    }

    fn close(&mut self) {
        // Release the database before the close is answered: whoever opens it next must not
        // find our connection still there.
        self.conn = None;
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
