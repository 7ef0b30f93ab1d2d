//! Rasa's SQL tracker store (`tracker_store:` with `type: sql`), read for `broker export`.
//!
//! Rasa's `SQLTrackerStore` keeps one row per event in `events(id, sender_id, type_name,
//! timestamp, intent_name, action_name, data)`, `data` being `json.dumps(event.as_dict())`. Its
//! keys, as Rasa reads them: `dialect` (`sqlite`, default, or `postgresql`), `url` (host,
//! `host:port` or a full URL), `port`, `db` (default `rasa.db`), `username`, `password`,
//! `login_db` (only used by Rasa to create `db`: warned about, `db` is read) and `query` (URL
//! parameters: here libpq's TLS names `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, which may
//! also be given at the top level). Ours: `connect_timeout` (10 s) and `read_timeout` (the
//! longest one page may take, 60 s).
//!
//! The export reads one statement in `(timestamp, id)` order, the filters pushed down:
//! SQLite on a thread of its own streaming rows from one query; PostgreSQL through a cursor in a
//! read-only repeatable-read transaction (one consistent snapshot), a page per `FETCH`.

use std::path::PathBuf;
use std::time::Duration;

use broker_core::tracker::{
    ConfiguredStore, ExportQuery, StoredEvent, StoredEvents, TrackerStore, TrackerStoreFactory,
};
use broker_core::{ConfigError, Error, Options, Position, async_trait};
use diesel::sql_types::{BigInt, Double, Nullable, Text};
use tokio::sync::mpsc;

use crate::config::{Database, NAME, PgTarget, take_database};

/// The keys `tracker_store: type: sql` accepts.
const KEYS: &[&str] = &[
    "dialect",
    "url",
    "port",
    "db",
    "username",
    "password",
    "login_db",
    "query",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "read_timeout",
];

/// Rasa's tracker table.
const TABLE: &str = "events";

/// `type: sql` under `tracker_store:`.
#[derive(Debug, Clone, Copy)]
pub struct SqlTrackerStoreFactory;

impl TrackerStoreFactory for SqlTrackerStoreFactory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn configure(&self, mut options: Options) -> Result<ConfiguredStore, ConfigError> {
        options.hoist("query")?;
        if options.contains("login_db") {
            options.take_str("login_db")?;
            options.warn("login_db", "`login_db` only matters when Rasa creates the database; the export reads `db`");
        }
        let database = take_database(&mut options, "rasa.db")?;
        let mut store = SqlTrackerStore::new(database);
        if let Some(d) = options.take_seconds("connect_timeout")? {
            store.connect_timeout = d;
        }
        if let Some(d) = options.take_seconds("read_timeout")? {
            store.read_timeout = d.max(Duration::from_millis(1));
        }
        let warnings = options.finish_for("sql tracker store", KEYS)?;
        Ok(ConfiguredStore::new(Box::new(store), warnings))
    }
}

/// Rasa's SQL tracker store, read only.
#[derive(Debug, Clone)]
pub struct SqlTrackerStore {
    database: Database,
    connect_timeout: Duration,
    read_timeout: Duration,
}

impl SqlTrackerStore {
    /// The store in `database`, with the default timeouts.
    pub fn new(database: Database) -> SqlTrackerStore {
        SqlTrackerStore { database, connect_timeout: Duration::from_secs(10), read_timeout: Duration::from_secs(60) }
    }

    /// A SQLite store file.
    pub fn sqlite(path: impl Into<PathBuf>) -> SqlTrackerStore {
        SqlTrackerStore::new(Database::Sqlite { path: path.into() })
    }

    /// A PostgreSQL store at a `postgresql://` URL.
    pub fn postgres_url(url: &str) -> SqlTrackerStore {
        SqlTrackerStore::new(crate::SqlConfig::postgres_url(url).database)
    }
}

#[derive(diesel::QueryableByName)]
struct StoredRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<Text>)]
    sender_id: Option<String>,
    #[diesel(sql_type = Nullable<Double>)]
    timestamp: Option<f64>,
    #[diesel(sql_type = Nullable<Text>)]
    data: Option<String>,
}

impl StoredRow {
    fn into_stored(self) -> Result<StoredEvent, Error> {
        let position = Position::Row(self.id);
        let Some(data) = self.data else {
            return Err(Error::Malformed { position, reason: "the data column is NULL".into() });
        };
        let mut e = StoredEvent::new(self.sender_id.unwrap_or_default(), self.timestamp.unwrap_or(f64::NAN), data);
        e.position = Some(position);
        Ok(e)
    }
}

#[derive(diesel::QueryableByName)]
struct SenderRow {
    #[diesel(sql_type = Nullable<Text>)]
    sender_id: Option<String>,
}

/// The WHERE clause for `query` with `$n` or `?` placeholders, and whether each filter is bound.
fn where_clause(query: &ExportQuery, postgres: bool) -> String {
    // A row without a conversation is not one Rasa exports (it has no tracker to load it into).
    let mut parts = vec!["sender_id IS NOT NULL".to_owned()];
    let mut n = 0;
    let mut param = |cast: &str| {
        n += 1;
        if postgres { format!("${n}{cast}") } else { "?".to_owned() }
    };
    if query.minimum_timestamp.is_some() {
        parts.push(format!("timestamp >= {}", param("::float8")));
    }
    if query.maximum_timestamp.is_some() {
        parts.push(format!("timestamp < {}", param("::float8")));
    }
    if query.conversation_ids.is_some() {
        parts.push(if postgres {
            format!("sender_id = ANY({})", param("::text[]"))
        } else {
            format!("sender_id IN (SELECT value FROM json_each({}))", param(""))
        });
    }
    format!(" WHERE {}", parts.join(" AND "))
}

/// Export order: by timestamp, then id; a row without a timestamp first on both databases
/// (SQLite sorts NULL first, PostgreSQL last unless told).
const ORDER: &str = " ORDER BY timestamp NULLS FIRST, id";

fn select(query: &ExportQuery, postgres: bool) -> String {
    let ts = if postgres { "CAST(timestamp AS float8)" } else { "CAST(timestamp AS REAL)" };
    format!(
        "SELECT CAST(id AS BIGINT) AS id, sender_id, {ts} AS timestamp, data FROM {TABLE}{}{ORDER}",
        where_clause(query, postgres)
    )
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: NAME, reason: format!("tracker store: {what}: {e}"), cause: None }
}

#[async_trait]
impl TrackerStore for SqlTrackerStore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        format!("sql tracker store {:?}", self.database)
    }

    async fn conversation_ids(&self) -> Result<Vec<String>, Error> {
        let sql = format!("SELECT DISTINCT sender_id FROM {TABLE}");
        let rows: Vec<SenderRow> = match &self.database {
            Database::Sqlite { path } => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    use diesel::RunQueryDsl;
                    let mut conn = sqlite::open(&path)?;
                    diesel::sql_query(sql).load(&mut conn).map_err(|e| unavailable("cannot list conversations", e))
                })
                .await
                .map_err(|e| unavailable("the reader thread failed", e))??
            }
            Database::Postgres(target) => {
                use diesel_async::RunQueryDsl;
                let mut conn = crate::postgres::connect(target, self.connect_timeout).await?;
                let load = diesel::sql_query(sql).load(&mut conn);
                match tokio::time::timeout(self.read_timeout, load).await {
                    Ok(r) => r.map_err(|e| unavailable("cannot list conversations", e))?,
                    Err(_) => return Err(Error::Timeout(self.read_timeout)),
                }
            }
        };
        let mut ids: Vec<String> = rows.into_iter().filter_map(|r| r.sender_id).collect();
        ids.sort();
        Ok(ids)
    }

    async fn read(&self, query: &ExportQuery) -> Result<Box<dyn StoredEvents>, Error> {
        match &self.database {
            Database::Sqlite { path } => sqlite::read(path.clone(), query.clone()),
            Database::Postgres(target) => {
                let reader = postgres::Reader::open(target, query, self.connect_timeout, self.read_timeout).await?;
                Ok(Box::new(reader))
            }
        }
    }
}

/// The conversation filter as one JSON array (SQLite's `json_each`).
fn ids_json(ids: &[String]) -> String {
    let mut out = Vec::with_capacity(ids.len() * 16 + 2);
    out.push(b'[');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        broker_core::json::write_str(id, &mut out);
    }
    out.push(b']');
    String::from_utf8(out).unwrap_or_default()
}

mod sqlite {
    use std::path::{Path, PathBuf};

    use diesel::connection::{DefaultLoadingMode, SimpleConnection};
    use diesel::prelude::*;
    use diesel::sqlite::{Sqlite, SqliteConnection};

    use super::*;

    /// Opens the store read-only (a missing file is an error, not a new empty store).
    pub(super) fn open(path: &Path) -> Result<SqliteConnection, Error> {
        if !path.exists() {
            return Err(Error::Unavailable {
                backend: NAME,
                reason: format!("tracker store: no SQLite database at {}", path.display()),
                cause: None,
            });
        }
        let url = format!("file:{}?mode=ro", uri_path(path));
        let mut conn = SqliteConnection::establish(&url).map_err(|e| unavailable("cannot open", e))?;
        conn.batch_execute("PRAGMA busy_timeout = 5000;").map_err(|e| unavailable("cannot configure", e))?;
        Ok(conn)
    }

    /// Pages from the reader thread; `Ok(None)` is its explicit end, so a thread that dies
    /// without one is an error, not a short export.
    /// `path` for a `file:` URI: the characters URIs give a meaning to, percent-encoded.
    fn uri_path(path: &Path) -> String {
        let mut out = String::new();
        for c in path.to_string_lossy().chars() {
            match c {
                '%' | '?' | '#' => out.push_str(&format!("%{:02X}", c as u32)),
                c => out.push(c),
            }
        }
        out
    }

    struct Pages(mpsc::Receiver<Result<Option<Vec<StoredEvent>>, Error>>);

    #[async_trait]
    impl StoredEvents for Pages {
        async fn next_page(&mut self) -> Result<Option<Vec<StoredEvent>>, Error> {
            match self.0.recv().await {
                Some(page) => page,
                None => Err(unavailable("reading", "the reader thread stopped before the end")),
            }
        }
    }

    /// Streams the query's rows from a thread of their own, a page at a time (two pages ahead).
    pub(super) fn read(path: PathBuf, query: ExportQuery) -> Result<Box<dyn StoredEvents>, Error> {
        let mut conn = open(&path)?;
        let (tx, rx) = mpsc::channel(2);
        std::thread::Builder::new()
            .name("sql-export".into())
            .spawn(move || {
                if let Err(e) = stream(&mut conn, &query, &tx) {
                    let _ = tx.blocking_send(Err(e));
                }
            })
            .map_err(|e| unavailable("cannot start the reader thread", e))?;
        Ok(Box::new(Pages(rx)))
    }

    #[derive(diesel::QueryableByName)]
    struct OrderRow {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }

    /// Two short statements per page instead of one long one: first the ids in export order (8
    /// bytes an event, held here), then each page's rows by id. A long-running SELECT would hold
    /// SQLite's read lock for the whole export, and with Rasa's rollback journal that blocks a
    /// running Rasa's writes.
    fn stream(
        conn: &mut SqliteConnection,
        query: &ExportQuery,
        tx: &mpsc::Sender<Result<Option<Vec<StoredEvent>>, Error>>,
    ) -> Result<(), Error> {
        let sql = format!("SELECT CAST(id AS BIGINT) AS id FROM {TABLE}{}{ORDER}", where_clause(query, false));
        let mut q = diesel::sql_query(sql).into_boxed::<Sqlite>();
        if let Some(t) = query.minimum_timestamp {
            q = q.bind::<Double, _>(t);
        }
        if let Some(t) = query.maximum_timestamp {
            q = q.bind::<Double, _>(t);
        }
        if let Some(ids) = &query.conversation_ids {
            q = q.bind::<Text, _>(ids_json(ids));
        }
        let order: Vec<i64> = q
            .load_iter::<OrderRow, DefaultLoadingMode>(conn)
            .map_err(|e| unavailable("cannot read", e))?
            .map(|r| r.map(|r| r.id))
            .collect::<Result<_, _>>()
            .map_err(|e| unavailable("cannot read", e))?;
        let page_sql = format!(
            "SELECT CAST(id AS BIGINT) AS id, sender_id, CAST(timestamp AS REAL) AS timestamp, data FROM {TABLE} \
             WHERE id IN (SELECT value FROM json_each(?))"
        );
        for ids in order.chunks(query.page_size.max(1)) {
            let list = format!("[{}]", ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
            let rows: Vec<StoredRow> = diesel::sql_query(&page_sql)
                .bind::<Text, _>(list)
                .load(conn)
                .map_err(|e| unavailable("cannot read", e))?;
            let mut by_id: std::collections::HashMap<i64, StoredRow> = rows.into_iter().map(|r| (r.id, r)).collect();
            // A row deleted since the first statement is gone: nothing to export for it.
            let page = ids
                .iter()
                .filter_map(|id| by_id.remove(id))
                .map(StoredRow::into_stored)
                .collect::<Result<Vec<_>, _>>()?;
            if tx.blocking_send(Ok(Some(page))).is_err() {
                return Ok(()); // the export stopped reading
            }
        }
        let _ = tx.blocking_send(Ok(None));
        Ok(())
    }
}

mod postgres {
    use diesel::pg::Pg;
    use diesel::sql_types::Array;
    use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

    use super::*;

    const CURSOR: &str = "broker_export";

    pub(super) struct Reader {
        conn: AsyncPgConnection,
        page_size: usize,
        read_timeout: Duration,
        done: bool,
    }

    impl Reader {
        pub(super) async fn open(
            target: &PgTarget,
            query: &ExportQuery,
            connect_timeout: Duration,
            read_timeout: Duration,
        ) -> Result<Reader, Error> {
            let mut conn = crate::postgres::connect(target, connect_timeout).await?;
            let begin = conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
            bounded(read_timeout, begin).await?.map_err(|e| unavailable("cannot begin", e))?;
            let sql = format!("DECLARE {CURSOR} NO SCROLL CURSOR FOR {}", select(query, true));
            let mut q = diesel::sql_query(sql).into_boxed::<Pg>();
            if let Some(t) = query.minimum_timestamp {
                q = q.bind::<Double, _>(t);
            }
            if let Some(t) = query.maximum_timestamp {
                q = q.bind::<Double, _>(t);
            }
            if let Some(ids) = &query.conversation_ids {
                q = q.bind::<Array<Text>, _>(ids.clone());
            }
            bounded(read_timeout, q.execute(&mut conn)).await?.map_err(|e| unavailable("cannot read", e))?;
            Ok(Reader { conn, page_size: query.page_size, read_timeout, done: false })
        }
    }

    async fn bounded<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> Result<T, Error> {
        tokio::time::timeout(limit, f).await.map_err(|_| Error::Timeout(limit))
    }

    #[async_trait]
    impl StoredEvents for Reader {
        async fn next_page(&mut self) -> Result<Option<Vec<StoredEvent>>, Error> {
            if self.done {
                return Ok(None);
            }
            let fetch = format!("FETCH FORWARD {} FROM {CURSOR}", self.page_size);
            let rows: Vec<StoredRow> = bounded(self.read_timeout, diesel::sql_query(fetch).load(&mut self.conn))
                .await?
                .map_err(|e| unavailable("cannot read", e))?;
            if rows.len() < self.page_size {
                self.done = true;
                // Ends the read-only transaction; the connection closes when dropped anyway.
                let _ = bounded(self.read_timeout, self.conn.batch_execute("COMMIT")).await;
            }
            if rows.is_empty() {
                return Ok(None);
            }
            rows.into_iter().map(StoredRow::into_stored).collect::<Result<Vec<_>, _>>().map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_pushed_down() {
        let q = ExportQuery::all()
            .minimum_timestamp(Some(1.0))
            .maximum_timestamp(Some(2.0))
            .conversation_ids(Some(vec!["a".into()]));
        assert_eq!(
            where_clause(&q, true),
            " WHERE sender_id IS NOT NULL AND timestamp >= $1::float8 AND timestamp < $2::float8 AND sender_id = ANY($3::text[])"
        );
        assert_eq!(
            where_clause(&q, false),
            " WHERE sender_id IS NOT NULL AND timestamp >= ? AND timestamp < ? AND sender_id IN (SELECT value FROM json_each(?))"
        );
        assert_eq!(where_clause(&ExportQuery::all(), true), " WHERE sender_id IS NOT NULL");
        assert_eq!(ids_json(&["a\"b".into(), "\u{e9}".into()]), r#"["a\"b","\u00e9"]"#);
    }

    #[test]
    fn keys_are_rasas() {
        let options = Options::from_pairs([
            ("db", broker_core::ConfigValue::Str("x.db".into())),
            ("login_db", broker_core::ConfigValue::Str("postgres".into())),
        ]);
        let configured = SqlTrackerStoreFactory.configure(options).expect("valid");
        assert_eq!(configured.store.describe(), "sql tracker store sqlite x.db");
        assert_eq!(configured.warnings.len(), 1, "{:?}", configured.warnings);
        let bad = Options::from_pairs([("table", broker_core::ConfigValue::Str("t".into()))]);
        let err = SqlTrackerStoreFactory.configure(bad).expect_err("unknown key");
        assert!(err.to_string().contains("unknown key for the sql tracker store"), "{err}");
        let configured = SqlTrackerStoreFactory.configure(Options::new(vec![], Default::default())).expect("defaults");
        assert_eq!(configured.store.describe(), "sql tracker store sqlite rasa.db");
    }
}
