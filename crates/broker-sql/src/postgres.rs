//! PostgreSQL over diesel-async (tokio-postgres, no libpq).
//!
//! Writing: one `INSERT ... SELECT FROM UNNEST($1, $2)` per batch (two array parameters whatever
//! the batch size), so each batch is one statement and one commit. When the connection fails the
//! writer reconnects with exponential backoff and jitter, checks whether the batch in flight was
//! committed after all (by its exact `data` above the last id it knew), and retries it otherwise,
//! so a restart of PostgreSQL neither loses nor duplicates events.
//!
//! Reading: an `id` cursor that never skips a row committed out of `id` order. Ids come from a
//! sequence when the INSERT runs, but rows become visible at COMMIT, so with several writers id 7
//! can be visible while id 6 is still in flight. The source hands rows over only while ids are
//! contiguous. At a gap it waits until every transaction that was running when it saw the gap has
//! ended (the snapshot's `xmin` passes the `xmax` seen then), or at most a second (a long
//! transaction elsewhere in the cluster holds `xmin` back without being able to fill the gap);
//! then it proves that no insert into the table is in flight (no other session holds `ROW
//! EXCLUSIVE` on it, or a `SHARE` lock is granted within 200 ms) and passes the gap: it was a
//! rolled-back insert. An insert still open keeps the source waiting, however long, since it
//! may commit. A gap never ends a stream that does not follow. A following source reconnects
//! with backoff after a lost connection and goes on at its cursor. The snapshot comes from
//! `txid_current_snapshot()`, which PostgreSQL 12 has too.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use broker_core::delivery::{Batch, Failure, Record, Sink, Verdict};
use broker_core::{Error, EventSource, Position, Received, async_trait};
use diesel::sql_types::{Array, BigInt, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::config::{NAME, PgTarget, SqlConfig, TableName};
use crate::{EventRow, IdRow, Row};

const MIGRATIONS: &[&str] = &[include_str!("../migrations/postgres/0001_create_events.sql")];

/// How often an idle writer checks its connection.
pub(crate) const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

fn cannot_connect(target: &PgTarget, e: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: NAME, reason: format!("{}: {e}", target.describe()), cause: None }
}

/// A failed connect as ours: a refused login (SQLSTATE class 28), a database that does not exist
/// (3D000) or a certificate or TLS setting that cannot work is [`Error::Denied`] (trying again
/// will not help); anything else [`Error::Unavailable`].
fn connect_error(target: &PgTarget, e: &tokio_postgres::Error) -> Error {
    let text = tls_reason(e);
    let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
    let lower = text.to_lowercase();
    let denied = code.starts_with("28")
        || code == "3D000"
        || lower.contains("certificate")
        || lower.contains("server does not support tls");
    let reason = format!("{}: {text}", target.describe());
    if denied {
        Error::Denied { backend: NAME, reason, cause: None }
    } else {
        Error::Unavailable { backend: NAME, reason, cause: None }
    }
}

/// Connects (with TLS per `sslmode`) within `timeout`.
pub(crate) async fn connect(target: &PgTarget, timeout: Duration) -> Result<AsyncPgConnection, Error> {
    let config = target.pg_config().map_err(|e| cannot_connect(target, e))?;
    let attempt = async {
        if target.tls.mode == crate::tls::SslMode::Disable {
            let (client, connection) =
                config.connect(tokio_postgres::NoTls).await.map_err(|e| connect_error(target, &e))?;
            return AsyncPgConnection::try_from_client_and_connection(client, connection)
                .await
                .map_err(|e| cannot_connect(target, e));
        }
        let tls = crate::tls::client_config(&target.tls).map_err(|e| cannot_connect(target, e))?;
        let make = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let (client, connection) = config.connect(make).await.map_err(|e| connect_error(target, &e))?;
        AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .map_err(|e| cannot_connect(target, e))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(cannot_connect(target, format!("no answer within {timeout:?}"))),
    }
}

/// `PostgreSQL <server_version>`, over a connection of its own.
pub(crate) async fn server_version(target: &PgTarget, timeout: Duration) -> Result<String, Error> {
    let mut conn = connect(target, timeout).await?;
    let query = diesel::sql_query("SELECT current_setting('server_version') AS version")
        .get_result::<crate::VersionRow>(&mut conn);
    match tokio::time::timeout(timeout, query).await {
        Ok(Ok(row)) => Ok(format!("PostgreSQL {}", row.version)),
        Ok(Err(e)) => Err(cannot_connect(target, e)),
        Err(_) => Err(cannot_connect(target, format!("no answer within {timeout:?}"))),
    }
}

/// The error with its causes, so a TLS failure says why (unknown issuer, wrong name).
fn tls_reason(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Creates the table when missing (an existing one, Rasa's included, is used as is).
pub(crate) async fn migrate(conn: &mut AsyncPgConnection, table: &TableName) -> Result<(), diesel::result::Error> {
    for m in MIGRATIONS {
        conn.batch_execute(&m.replace("{table}", &table.quoted())).await?;
    }
    Ok(())
}

async fn max_id(conn: &mut AsyncPgConnection, table: &TableName) -> Result<i64, diesel::result::Error> {
    let rows: Vec<IdRow> =
        diesel::sql_query(format!("SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) AS id FROM {}", table.quoted()))
            .load(conn)
            .await?;
    Ok(<[_]>::first(&rows).map_or(0, |r| r.id))
}

/// Inserts `rows` with one statement and returns their ids in order.
pub(crate) async fn insert(
    conn: &mut AsyncPgConnection,
    table: &TableName,
    rows: &[Row<'_>],
) -> Result<Vec<i64>, diesel::result::Error> {
    let senders: Vec<Option<&str>> = rows.iter().map(|r| r.sender_id).collect();
    let data: Vec<&str> = rows.iter().map(|r| r.data).collect();
    let sql = format!(
        "INSERT INTO {} (sender_id, data) SELECT s, d FROM UNNEST($1::varchar[], $2::text[]) WITH ORDINALITY AS t(s, d, n) \
         ORDER BY n RETURNING CAST(id AS BIGINT) AS id",
        table.quoted()
    );
    let mut ids: Vec<i64> = diesel::sql_query(sql)
        .bind::<Array<Nullable<Text>>, _>(senders)
        .bind::<Array<Text>, _>(data)
        .load::<IdRow>(conn)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    // The sequence hands out ids in row order; RETURNING's order is not promised, ours is.
    ids.sort_unstable();
    Ok(ids)
}

/// The ids of rows above `after` whose data is one of `rows`' (a batch whose commit outcome was
/// lost with the connection).
async fn find_committed(
    conn: &mut AsyncPgConnection,
    table: &TableName,
    after: i64,
    rows: &[Row<'_>],
) -> Result<Vec<i64>, diesel::result::Error> {
    let data: Vec<&str> = rows.iter().map(|r| r.data).collect();
    let sql = format!(
        "SELECT CAST(id AS BIGINT) AS id FROM {} WHERE id > $1 AND data = ANY($2::text[]) ORDER BY id",
        table.quoted()
    );
    Ok(diesel::sql_query(sql)
        .bind::<BigInt, _>(after)
        .bind::<Array<Text>, _>(data)
        .load::<IdRow>(conn)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect())
}

/// Whose fault a failed statement is, by SQLSTATE class.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Blame {
    /// Data (22), integrity (23) or a size limit (54): something in the batch; an event alone
    /// with it is rejected.
    Events,
    /// Everything else (read-only after a failover, disk full, lock or statement timeouts,
    /// deadlocks, shutdowns): the events wait and retry.
    Service,
}

/// The blame for a SQLSTATE.
pub(crate) fn blame(sqlstate: &str) -> Blame {
    match sqlstate.get(..2) {
        Some("22" | "23" | "54") => Blame::Events,
        _ => Blame::Service,
    }
}

/// A `pg_temp` function that runs the batch's insert inside an exception block, always rolls it
/// back, and returns the SQLSTATE it failed with (`RB000` when it would succeed now).
/// diesel-async keeps the SQLSTATE of only eight codes; this gets the real one on the error path.
fn probe_sql(table: &TableName) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION pg_temp.rasa_broker_sqlstate(s varchar[], d text[]) RETURNS text \
         LANGUAGE plpgsql AS $f$ BEGIN \
         INSERT INTO {} (sender_id, data) SELECT x, y FROM UNNEST(s, d) AS t(x, y); \
         RAISE SQLSTATE 'RB000'; \
         EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $f$",
        table.quoted()
    )
}

#[derive(diesel::QueryableByName)]
struct SqlStateRow {
    #[diesel(sql_type = Text)]
    code: String,
}

/// The SQLSTATE `rows` fail with on `conn`, found by the probe; None when that cannot be told.
async fn sqlstate_of(conn: &mut AsyncPgConnection, table: &TableName, rows: &[Row<'_>]) -> Option<String> {
    conn.batch_execute(&probe_sql(table)).await.ok()?;
    let senders: Vec<Option<&str>> = rows.iter().map(|r| r.sender_id).collect();
    let data: Vec<&str> = rows.iter().map(|r| r.data).collect();
    let got: Vec<SqlStateRow> =
        diesel::sql_query("SELECT pg_temp.rasa_broker_sqlstate($1::varchar[], $2::text[]) AS code")
            .bind::<Array<Nullable<Text>>, _>(senders)
            .bind::<Array<Text>, _>(data)
            .load(conn)
            .await
            .ok()?;
    got.into_iter().next().map(|r| r.code)
}

/// One PostgreSQL writer connection, run by the shared driver.
pub(crate) struct PgSink {
    conn: Option<AsyncPgConnection>,
    target: PgTarget,
    config: SqlConfig,
    /// The highest id this writer knows to be committed (by anyone) before its next batch.
    last_id: i64,
    /// The last batch may have committed without our hearing it (the connection died or the
    /// attempt was abandoned mid-statement): check before inserting it again.
    uncertain: bool,
    /// A statement is running (set while inserting): abandoned there, the connection is unusable.
    in_statement: bool,
    /// The connection needs replacing before the next write.
    broken: bool,
}

impl PgSink {
    fn lost(&mut self, why: impl std::fmt::Display) -> Error {
        self.conn = None;
        self.broken = true;
        Error::Unavailable { backend: NAME, reason: format!("{}: {why}", self.target.describe()), cause: None }
    }

    /// Connects (bounded by `connect_timeout`) and makes sure the table is there.
    async fn reconnect(&mut self) -> Result<(), Error> {
        if let Some(conn) = self.conn.take() {
            if self.in_statement {
                // Ask the server to stop the abandoned statement (over a new connection).
                let token = conn.cancel_token();
                let _ = tokio::time::timeout(Duration::from_secs(2), token.cancel_query(tokio_postgres::NoTls)).await;
            }
            drop(conn);
        }
        self.in_statement = false;
        let mut c = connect(&self.target, self.config.connect_timeout).await?;
        migrate(&mut c, &self.config.table)
            .await
            .map_err(|e| cannot_connect(&self.target, format!("reconnected but cannot use the table: {e}")))?;
        tracing::info!("sql: connected to {}", self.target.describe());
        self.conn = Some(c);
        self.broken = false;
        Ok(())
    }

    /// Writes `records` in one statement; for the pool, which runs several sinks at once.
    pub(crate) async fn write_records(&mut self, records: &[Record]) -> Result<Vec<Verdict>, Error> {
        if self.broken || self.conn.is_none() {
            return Err(self.lost("not connected"));
        }
        let rows: Vec<Row<'_>> = records.iter().map(Row::of).collect();
        let table = self.config.table.clone();
        let last_id = self.last_id;
        let Some(conn) = self.conn.as_mut() else { return Err(self.lost("not connected")) };
        self.in_statement = true;
        if self.uncertain {
            // The previous attempt may have committed before the connection died.
            match find_committed(conn, &table, last_id, &rows).await {
                Ok(ids) if ids.len() == rows.len() => {
                    self.in_statement = false;
                    self.uncertain = false;
                    return Ok(self.delivered(ids));
                }
                Ok(_) => self.uncertain = false,
                Err(e) => return Err(self.lost(format!("checking the batch in flight: {e}"))),
            }
        }
        let result = insert(conn, &table, &rows).await;
        self.in_statement = false;
        match result {
            Ok(ids) if ids.len() == rows.len() => Ok(self.delivered(ids)),
            Ok(ids) => Err(Error::Io {
                backend: NAME,
                operation: "inserting".into(),
                reason: format!("inserted {} rows for {} events", ids.len(), rows.len()),
                cause: None,
            }),
            Err(e) => self.failed(e, &rows).await,
        }
    }

    fn delivered(&mut self, ids: Vec<i64>) -> Vec<Verdict> {
        self.last_id = self.last_id.max(ids.last().copied().unwrap_or(0));
        ids.into_iter().map(|id| Verdict::Delivered(Some(Position::Row(id)))).collect()
    }

    /// Classifies a failed insert: `Ok(verdicts)` when the events are to blame (each suspect),
    /// `Err(error)` to retry.
    async fn failed(&mut self, e: diesel::result::Error, rows: &[Row<'_>]) -> Result<Vec<Verdict>, Error> {
        use diesel::result::{DatabaseErrorKind as K, Error as E};
        let text = e.to_string();
        let code = match &e {
            E::DatabaseError(
                K::UniqueViolation | K::ForeignKeyViolation | K::NotNullViolation | K::CheckViolation,
                _,
            )
            | E::DatabaseError(K::RestrictViolation | K::ExclusionViolation, _) => Some("23000".to_owned()),
            E::DatabaseError(K::SerializationFailure, _) => Some("40001".to_owned()),
            E::DatabaseError(K::ReadOnlyTransaction, _) => Some("25006".to_owned()),
            E::DatabaseError(K::UnableToSendCommand | K::ClosedConnection, _) | E::BrokenTransactionManager => None,
            E::DatabaseError(..) => match self.conn.as_mut() {
                Some(conn) => sqlstate_of(conn, &self.config.table, rows).await,
                None => None,
            },
            _ => None,
        };
        match code {
            Some(code) if blame(&code) == Blame::Events => {
                let reason = format!("PostgreSQL refused the event: {text} (SQLSTATE {code})");
                Ok(vec![Verdict::Suspect(reason); rows.len()])
            }
            Some(code) => {
                // The service's trouble: retry, on a new connection (after a failover that is
                // what reaches the new primary).
                self.broken = true;
                Err(Error::Io {
                    backend: NAME,
                    operation: "inserting".into(),
                    reason: format!("{text} (SQLSTATE {code})"),
                    cause: None,
                })
            }
            None => {
                tracing::warn!("sql: connection lost while inserting ({text}); reconnecting");
                self.uncertain = true;
                Err(self.lost(text))
            }
        }
    }
}

#[async_trait]
impl Sink for PgSink {
    async fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
        self.write_records(batch).await
    }

    async fn recover(&mut self, failure: &Failure) -> Result<(), Error> {
        if matches!(failure, Failure::TimedOut(_)) && self.in_statement {
            self.uncertain = true;
            self.broken = true;
        }
        if self.broken || self.conn.is_none() {
            self.reconnect().await?;
        }
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), Error> {
        if self.broken || self.conn.is_none() {
            self.reconnect().await?;
        }
        let Some(conn) = self.conn.as_mut() else { return Err(self.lost("not connected")) };
        match tokio::time::timeout(Duration::from_secs(2), diesel::sql_query("SELECT 1").execute(conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.lost(format!("lost the connection: {e}"))),
            Err(_) => Err(self.lost("lost the connection: no answer to a ping within 2s")),
        }
    }

    async fn close(&mut self) {
        self.conn = None;
    }
}

/// Connects a writer (failing fast when the first connection does not work), creates the
/// table, and learns the current last id.
pub(crate) async fn start_sink(target: PgTarget, config: SqlConfig) -> Result<PgSink, Error> {
    let mut conn = connect(&target, config.connect_timeout).await?;
    migrate(&mut conn, &config.table).await.map_err(|e| cannot_connect(&target, format!("creating the table: {e}")))?;
    let last_id = max_id(&mut conn, &config.table).await.map_err(|e| cannot_connect(&target, e))?;
    Ok(PgSink { conn: Some(conn), target, config, last_id, uncertain: false, in_statement: false, broken: false })
}

struct Gap {
    after: i64,
    /// The snapshot's `xmax` when the gap was first seen: once every transaction below it has
    /// ended, the gap is probably permanent (worth proving now).
    horizon: u64,
    /// When it was first seen: after [`GAP_WAIT`] it is proven whatever the horizon says (a long
    /// transaction elsewhere in the cluster holds `xmin` back but cannot fill this gap).
    seen: Instant,
    /// No proof attempt before this (a failed one waits [`GAP_RETRY`]).
    next_proof: Instant,
}

/// How long a gap may wait for the cluster's `xmin` before it is proven anyway.
const GAP_WAIT: Duration = Duration::from_secs(1);
/// After a failed proof (an insert into the table still in flight), the next one.
const GAP_RETRY: Duration = Duration::from_secs(1);

/// Reads rows in `id` order without skipping rows committed late (see the module docs), and
/// reconnects (with backoff, resuming at its cursor) when following.
///
/// A poll (a snapshot and a query, or a reconnect) runs in a task of its own that owns the
/// [`Poller`] until it is done: a `next()` dropped meanwhile (a timeout, a `select!`) loses no
/// work, and the next call picks up the same poll. Without that, a caller that cancels often
/// would restart the round trips forever and never see a row.
pub(crate) struct PgSource {
    /// `None` while a poll runs (the task has it) or after the task failed.
    poller: Option<Box<Poller>>,
    polling: Option<tokio::task::JoinHandle<Polled>>,
}

/// What a poll task gives back: the state, and whether it passed a gap (or its error).
type Polled = (Box<Poller>, Result<bool, Error>);

/// The source's state: its connection, cursor, the rows ready to hand over, the gap it waits on.
struct Poller {
    conn: AsyncPgConnection,
    table: TableName,
    cursor: i64,
    follow: bool,
    buffered: VecDeque<EventRow>,
    gap: Option<Gap>,
    target: PgTarget,
    connect_timeout: Duration,
    backoff: broker_core::backoff::Backoff,
}

#[derive(diesel::QueryableByName)]
struct Snapshot {
    #[diesel(sql_type = Text)]
    snap: String,
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// `xmin:xmax:xip,...` → (xmin, xmax).
fn parse_snapshot(s: &str) -> (u64, u64) {
    let mut it = s.split(':');
    let xmin = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let xmax = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    (xmin, xmax)
}

impl PgSource {
    pub(crate) async fn open(
        target: &PgTarget,
        config: &SqlConfig,
        start: &broker_core::StartFrom,
        follow: bool,
    ) -> Result<PgSource, Error> {
        let poller = Poller::open(target, config, start, follow).await?;
        Ok(PgSource { poller: Some(Box::new(poller)), polling: None })
    }
}

impl Drop for PgSource {
    fn drop(&mut self) {
        if let Some(task) = self.polling.take() {
            task.abort();
        }
    }
}

impl Poller {
    async fn open(
        target: &PgTarget,
        config: &SqlConfig,
        start: &broker_core::StartFrom,
        follow: bool,
    ) -> Result<Poller, Error> {
        let mut conn = connect(target, config.connect_timeout).await?;
        migrate(&mut conn, &config.table)
            .await
            .map_err(|e| cannot_connect(target, format!("creating the table: {e}")))?;
        let cursor = match start {
            broker_core::StartFrom::Beginning => 0,
            broker_core::StartFrom::Offset(id) => i64::try_from(*id).unwrap_or(i64::MAX),
            _ => max_id(&mut conn, &config.table).await.map_err(|e| cannot_connect(target, e))?,
        };
        Ok(Poller {
            conn,
            table: config.table.clone(),
            cursor,
            follow,
            buffered: VecDeque::new(),
            gap: None,
            target: target.clone(),
            connect_timeout: config.connect_timeout,
            backoff: broker_core::backoff::Backoff::new(Duration::from_millis(100), config.retry_max_delay),
        })
    }

    fn io(e: diesel::result::Error) -> Error {
        Error::Io { backend: NAME, operation: "reading events".into(), reason: e.to_string(), cause: None }
    }

    /// The snapshot's `xmin` and `xmax`. `txid_current_snapshot` rather than
    /// `pg_current_snapshot`: the same on PostgreSQL 13+, and it exists on 12 too.
    async fn snapshot(&mut self) -> Result<(u64, u64), Error> {
        let s: Vec<Snapshot> = diesel::sql_query("SELECT txid_current_snapshot()::text AS snap")
            .load(&mut self.conn)
            .await
            .map_err(Self::io)?;
        Ok(<[_]>::first(&s).map_or((0, 0), |s| parse_snapshot(&s.snap)))
    }

    async fn rows_after(&mut self, cursor: i64) -> Result<Vec<EventRow>, Error> {
        let sql = format!(
            "SELECT CAST(id AS BIGINT) AS id, sender_id, data FROM {} WHERE id > $1 ORDER BY id LIMIT 500",
            self.table.quoted()
        );
        diesel::sql_query(sql).bind::<BigInt, _>(cursor).load::<EventRow>(&mut self.conn).await.map_err(Self::io)
    }

    /// Whether no insert into the table can still be in flight, so that an id missing now is
    /// missing for good (a rolled-back insert). Every insert takes `ROW EXCLUSIVE` on the table
    /// before it draws its id and keeps it until its transaction ends, so: proven when no other
    /// session holds that lock (`pg_locks`, readable by every role, waits for nothing), or else
    /// when a `SHARE` lock, which waits for those holders, is granted within 200 ms (writers
    /// wait behind it at most that long).
    async fn gap_is_permanent(&mut self) -> Result<bool, Error> {
        let quoted = self.table.quoted().replace('\'', "''");
        let holders = format!(
            "SELECT COUNT(*) AS n FROM pg_locks WHERE locktype = 'relation' AND relation = '{quoted}'::regclass \
             AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()"
        );
        let n: Vec<Count> = diesel::sql_query(holders).load(&mut self.conn).await.map_err(Self::io)?;
        if <[_]>::first(&n).is_some_and(|c| c.n == 0) {
            return Ok(true);
        }
        let lock = format!(
            "BEGIN; SET LOCAL lock_timeout = '200ms'; LOCK TABLE {} IN SHARE MODE; COMMIT;",
            self.table.quoted()
        );
        match self.conn.batch_execute(&lock).await {
            Ok(()) => Ok(true),
            Err(e) => {
                // Timed out behind an insert still in flight, or no privilege to lock.
                tracing::debug!("sql source: an insert may still fill the gap: {e}");
                let _ = self.conn.batch_execute("ROLLBACK").await;
                Ok(false)
            }
        }
    }

    /// Moves rows that are safe to hand over into `buffered`. Returns whether it passed a gap
    /// (then polling again at once may find more).
    async fn poll(&mut self) -> Result<bool, Error> {
        // The snapshot comes first: its xmin says whether every transaction running when a gap
        // was first seen has ended.
        let (xmin, xmax) = self.snapshot().await?;
        let rows = self.rows_after(self.cursor).await?;
        let now = Instant::now();
        for row in rows {
            if row.id == self.cursor + 1 {
                self.cursor = row.id;
                self.gap = None;
                self.buffered.push_back(row);
                continue;
            }
            // A gap before `row`: a rolled-back insert, or one still in flight.
            let prove = match &self.gap {
                Some(g) if g.after == self.cursor => {
                    (xmin >= g.horizon || now.duration_since(g.seen) >= GAP_WAIT) && now >= g.next_proof
                }
                _ => {
                    self.gap = Some(Gap { after: self.cursor, horizon: xmax, seen: now, next_proof: now });
                    false
                }
            };
            if !prove {
                return Ok(false);
            }
            if !self.gap_is_permanent().await? {
                if let Some(g) = self.gap.as_mut() {
                    g.next_proof = Instant::now() + GAP_RETRY;
                }
                return Ok(false);
            }
            // Nothing can fill it now: look once more (what committed meanwhile is visible) and
            // move the cursor to just before the first row there.
            self.gap = None;
            if let Some(first) = <[_]>::first(&self.rows_after(self.cursor).await?) {
                if first.id != self.cursor + 1 {
                    self.cursor = first.id - 1;
                }
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// One poll; a temporary failure while following becomes a reconnect (then nothing new).
    async fn poll_or_reconnect(&mut self) -> Result<bool, Error> {
        match self.poll().await {
            Ok(passed_gap) => {
                self.backoff.reset();
                Ok(passed_gap)
            }
            Err(e) if self.follow && e.is_temporary() => {
                self.reconnect(&e).await;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// A new connection after a lost one; the cursor stays, so nothing is skipped or repeated.
    async fn reconnect(&mut self, why: &Error) {
        let delay = self.backoff.next_delay();
        tracing::warn!("sql source: {why}; reconnecting in {delay:?}");
        tokio::time::sleep(delay).await;
        match connect(&self.target, self.connect_timeout).await {
            Ok(conn) => {
                self.conn = conn;
                self.gap = None;
            }
            Err(e) => tracing::warn!("sql source: {e}"),
        }
    }
}

#[async_trait]
impl EventSource for PgSource {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn next(&mut self) -> Result<Option<Received>, Error> {
        loop {
            if let Some(row) = self.poller.as_mut().and_then(|p| p.buffered.pop_front()) {
                return row.into_received().map(Some);
            }
            if self.polling.is_none() {
                let Some(mut poller) = self.poller.take() else {
                    return Err(Error::Closed);
                };
                self.polling = Some(tokio::spawn(async move {
                    let result = poller.poll_or_reconnect().await;
                    (poller, result)
                }));
            }
            // Awaiting the task through `&mut` is cancel-safe: dropped here, it runs on.
            let joined = self.polling.as_mut().expect("a poll runs").await;
            self.polling = None;
            let (poller, result) = joined.map_err(|e| Error::Io {
                backend: NAME,
                operation: "reading events".into(),
                reason: format!("the polling task failed: {e}"),
                cause: None,
            })?;
            let done = !poller.follow && poller.gap.is_none();
            let empty = poller.buffered.is_empty();
            self.poller = Some(poller);
            let idle = empty && !result?;
            if idle {
                if done {
                    return Ok(None);
                }
                tokio::time::sleep(crate::POLL).await;
            }
        }
    }
}
