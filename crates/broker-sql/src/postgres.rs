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
//! contiguous; at a gap it waits until every transaction that was running when it saw the gap has
//! ended (the snapshot's `xmin` passes the `xmax` seen then), and confirms a gap that is still
//! there with a brief `SHARE` lock (which waits for in-flight inserts) before skipping it: such a
//! gap is a rolled-back insert.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use broker_core::backoff::Backoff;
use broker_core::pipeline::{self, Command, Inbox, Pending, Readiness};
use broker_core::{CloseReport, Error, EventSource, Position, Received, async_trait};
use diesel::sql_types::{Array, BigInt, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::config::{NAME, PgTarget, SqlConfig, TableName};
use crate::{EventRow, IdRow, Row, rows_of};

const MIGRATIONS: &[&str] = &[include_str!("../migrations/postgres/0001_create_events.sql")];

/// How often an idle writer checks its connection.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

fn cannot_connect(target: &PgTarget, e: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: NAME, reason: format!("{}: {e}", target.describe()), cause: None }
}

/// Connects (with TLS per `sslmode`) within `timeout`.
pub(crate) async fn connect(target: &PgTarget, timeout: Duration) -> Result<AsyncPgConnection, Error> {
    let config = target.pg_config().map_err(|e| cannot_connect(target, e))?;
    let attempt = async {
        if target.tls.mode == crate::tls::SslMode::Disable {
            let (client, connection) =
                config.connect(tokio_postgres::NoTls).await.map_err(|e| cannot_connect(target, e))?;
            return AsyncPgConnection::try_from_client_and_connection(client, connection)
                .await
                .map_err(|e| cannot_connect(target, e));
        }
        let tls = crate::tls::client_config(&target.tls).map_err(|e| cannot_connect(target, e))?;
        let make = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let (client, connection) = config.connect(make).await.map_err(|e| cannot_connect(target, tls_reason(&e)))?;
        AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .map_err(|e| cannot_connect(target, e))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
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

pub(crate) struct Writer {
    pub(crate) conn: Option<AsyncPgConnection>,
    pub(crate) target: PgTarget,
    pub(crate) config: SqlConfig,
    pub(crate) ready: Readiness,
    /// The highest id this writer knows to be committed (by anyone) before its next batch.
    pub(crate) last_id: i64,
}

impl Writer {
    pub(crate) async fn run(mut self, mut inbox: Inbox) {
        let mut batch = Vec::with_capacity(self.config.batch_size);
        let mut pending: Vec<Pending> = Vec::with_capacity(self.config.batch_size);
        loop {
            batch.clear();
            let received = tokio::select! {
                n = inbox.recv_batch(&mut batch, self.config.batch_size) => n,
                // Idle: look at the connection, so `is_ready` tells the truth between events.
                _ = tokio::time::sleep(HEALTH_INTERVAL) => {
                    self.check_health().await;
                    continue;
                }
            };
            if received == 0 {
                self.write(&mut pending, &inbox).await;
                return;
            }
            for cmd in batch.drain(..) {
                match cmd {
                    Command::Publish(p) => pending.push(p),
                    Command::Flush(tx) => {
                        self.write(&mut pending, &inbox).await;
                        let _ = tx.send(());
                    }
                    Command::Close { deadline, reply } => {
                        self.write(&mut pending, &inbox).await;
                        let report = self.finish(&mut inbox, deadline).await;
                        let _ = reply.send(report);
                        return;
                    }
                    _ => {}
                }
            }
            self.write(&mut pending, &inbox).await;
        }
    }

    async fn finish(&mut self, inbox: &mut Inbox, deadline: Instant) -> CloseReport {
        inbox.close();
        let mut undelivered = Vec::new();
        let mut pending = Vec::new();
        while let Some(cmd) = inbox.try_recv() {
            match cmd {
                Command::Publish(p) => {
                    pending.push(p);
                    if pending.len() >= self.config.batch_size {
                        self.write(&mut pending, inbox).await;
                    }
                }
                Command::Flush(tx) => {
                    self.write(&mut pending, inbox).await;
                    let _ = tx.send(());
                }
                Command::Close { reply, .. } => {
                    let _ = reply.send(CloseReport::default());
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        self.write(&mut pending, inbox).await;
        // Whatever the deadline left behind (the write above gives up at the deadline too).
        for p in pending.drain(..) {
            p.give_up(self.config.delivery.close_timeout, &mut undelivered);
        }
        pipeline::drain_undelivered(inbox, self.config.delivery.close_timeout, &mut undelivered);
        if let Some(conn) = self.conn.take() {
            drop(conn);
        }
        CloseReport::new(undelivered)
    }

    /// While idle: pings the connection (or tries once to get one back) and records the result.
    async fn check_health(&mut self) {
        match self.conn.as_mut() {
            Some(conn) => {
                let ping =
                    tokio::time::timeout(Duration::from_secs(2), diesel::sql_query("SELECT 1").execute(conn)).await;
                if !matches!(ping, Ok(Ok(_))) {
                    tracing::warn!("sql: lost the connection to {}", self.target.describe());
                    self.conn = None;
                    self.ready.set(false);
                }
            }
            None => {
                if let Ok(mut c) = connect(&self.target, self.config.connect_timeout).await {
                    if migrate(&mut c, &self.config.table).await.is_ok() {
                        self.conn = Some(c);
                        self.ready.set(true);
                    }
                }
            }
        }
    }

    /// A live connection, reconnecting with exponential backoff and jitter until it works or
    /// the close deadline passes.
    async fn connection(&mut self, inbox: &Inbox) -> Option<&mut AsyncPgConnection> {
        let mut backoff = Backoff::new(self.config.retry_max_delay / 10, self.config.retry_max_delay);
        while self.conn.is_none() {
            let delay = backoff.next_delay();
            match connect(&self.target, self.config.connect_timeout).await {
                Ok(mut c) => {
                    if let Err(e) = migrate(&mut c, &self.config.table).await {
                        tracing::warn!("sql: reconnected to {} but cannot use the table: {e}", self.target.describe());
                    } else {
                        tracing::info!("sql: reconnected to {}", self.target.describe());
                        self.conn = Some(c);
                        self.ready.set(true);
                        break;
                    }
                }
                Err(e) => {
                    self.ready.set(false);
                    tracing::warn!("{e}; retrying in {delay:?}");
                }
            }
            if inbox.close_deadline().is_some_and(|d| Instant::now() + delay >= d) {
                return None;
            }
            tokio::time::sleep(delay).await;
        }
        self.conn.as_mut()
    }

    /// Commits `pending` (one statement) and settles each event. A lost connection is
    /// re-established and the batch retried (unless it turns out to have been committed); a
    /// statement error on a live connection is narrowed down to the events that cause it, which
    /// fail alone.
    async fn write(&mut self, pending: &mut Vec<Pending>, inbox: &Inbox) {
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
        let rows: Vec<Row<'_>> = ok.iter().map(Row::of).collect();
        let mut uncertain = false;
        let outcome: Result<Vec<i64>, String> = loop {
            let table = self.config.table.clone();
            let last_id = self.last_id;
            let Some(conn) = self.connection(inbox).await else {
                break Err("PostgreSQL is unreachable and the close deadline passed".into());
            };
            if uncertain {
                // The previous attempt may have committed before the connection died.
                match find_committed(conn, &table, last_id, &rows).await {
                    Ok(ids) if ids.len() == rows.len() => break Ok(ids),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("sql: checking the batch in flight failed: {e}");
                        self.conn = None;
                        continue;
                    }
                }
            }
            match insert(conn, &table, &rows).await {
                Ok(ids) => break Ok(ids),
                Err(e) => {
                    let alive = diesel::sql_query("SELECT 1").execute(conn).await.is_ok();
                    if alive {
                        break Err(e.to_string());
                    }
                    tracing::warn!("sql: connection lost while inserting ({e}); reconnecting");
                    self.ready.set(false);
                    self.conn = None;
                    uncertain = true;
                }
            }
        };
        match outcome {
            Ok(ids) if ids.len() == ok.len() => {
                self.last_id = self.last_id.max(ids.last().copied().unwrap_or(0));
                for (p, id) in ok.into_iter().zip(ids) {
                    p.settle.delivered(Some(Position::Row(id)));
                }
            }
            Ok(ids) => {
                let reason = format!("inserted {} rows for {} events", ids.len(), ok.len());
                for p in ok {
                    p.settle.settle(Err(Error::Io {
                        backend: NAME,
                        operation: "inserting".into(),
                        reason: reason.clone(),
                        cause: None,
                    }));
                }
            }
            Err(reason) if self.conn.is_none() => {
                for p in ok {
                    p.settle.settle(Err(Error::Unavailable { backend: NAME, reason: reason.clone(), cause: None }));
                }
            }
            Err(reason) => {
                tracing::warn!("sql: batch refused ({reason}); trying its events one by one");
                self.one_by_one(ok).await;
            }
        }
    }

    async fn one_by_one(&mut self, ok: Vec<Pending>) {
        for p in ok {
            let row = [Row::of(&p)];
            let Some(conn) = self.conn.as_mut() else {
                p.settle.settle(Err(Error::Unavailable {
                    backend: NAME,
                    reason: "connection lost".into(),
                    cause: None,
                }));
                continue;
            };
            match insert(conn, &self.config.table, &row).await {
                Ok(ids) => {
                    self.last_id = self.last_id.max(<[_]>::first(&ids).copied().unwrap_or(0));
                    p.settle.delivered(<[_]>::first(&ids).copied().map(Position::Row));
                }
                Err(e) => {
                    let reason = format!("PostgreSQL refused the event: {e}");
                    p.reject(NAME, reason);
                }
            }
        }
    }
}

/// Starts a writer: connects (failing fast when the first connection does not work), creates the
/// table, and learns the current last id.
pub(crate) async fn start_writer(target: PgTarget, config: SqlConfig, ready: Readiness) -> Result<Writer, Error> {
    let mut conn = connect(&target, config.connect_timeout).await?;
    migrate(&mut conn, &config.table).await.map_err(|e| cannot_connect(&target, format!("creating the table: {e}")))?;
    let last_id = max_id(&mut conn, &config.table).await.map_err(|e| cannot_connect(&target, e))?;
    Ok(Writer { conn: Some(conn), target, config, ready, last_id })
}

/// A gap in ids seen after `cursor`, waiting to be settled.
struct Gap {
    after: i64,
    /// The snapshot's `xmax` when the gap was first seen: once every transaction below it has
    /// ended, nothing still running can fill the gap.
    horizon: u64,
}

/// Reads rows in `id` order without skipping rows committed late (see the module docs).
pub(crate) struct PgSource {
    pub(crate) conn: AsyncPgConnection,
    pub(crate) table: TableName,
    pub(crate) cursor: i64,
    pub(crate) follow: bool,
    buffered: VecDeque<EventRow>,
    gap: Option<Gap>,
}

#[derive(diesel::QueryableByName)]
struct Snapshot {
    #[diesel(sql_type = Text)]
    snap: String,
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
        let mut conn = connect(target, config.connect_timeout).await?;
        migrate(&mut conn, &config.table)
            .await
            .map_err(|e| cannot_connect(target, format!("creating the table: {e}")))?;
        let cursor = match start {
            broker_core::StartFrom::Beginning => 0,
            broker_core::StartFrom::Offset(id) => *id as i64,
            _ => max_id(&mut conn, &config.table).await.map_err(|e| cannot_connect(target, e))?,
        };
        Ok(PgSource { conn, table: config.table.clone(), cursor, follow, buffered: VecDeque::new(), gap: None })
    }

    fn io(e: diesel::result::Error) -> Error {
        Error::Io { backend: NAME, operation: "reading events".into(), reason: e.to_string(), cause: None }
    }

    async fn snapshot(&mut self) -> Result<(u64, u64), Error> {
        let s: Vec<Snapshot> = diesel::sql_query("SELECT pg_current_snapshot()::text AS snap")
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

    /// Waits (briefly) for in-flight inserts to finish: `SHARE` conflicts with the writers'
    /// `ROW EXCLUSIVE`, so taking it means none is in progress.
    async fn confirm_gap(&mut self) -> Result<(), Error> {
        let sql = format!("BEGIN; LOCK TABLE {} IN SHARE MODE; COMMIT;", self.table.quoted());
        if let Err(e) = self.conn.batch_execute(&sql).await {
            // No privilege to lock: the horizon alone has to do.
            tracing::debug!("sql source: cannot lock the table to confirm a gap: {e}");
            let _ = self.conn.batch_execute("ROLLBACK").await;
        }
        Ok(())
    }

    /// Moves rows that are safe to hand over into `buffered`.
    async fn poll(&mut self) -> Result<(), Error> {
        // The snapshot comes first: when its xmin has passed a gap's horizon, every transaction
        // that could fill the gap ended before the rows below are read.
        let (xmin, xmax) = self.snapshot().await?;
        let rows = self.rows_after(self.cursor).await?;
        for row in rows {
            if row.id == self.cursor + 1 {
                self.cursor = row.id;
                self.gap = None;
                self.buffered.push_back(row);
                continue;
            }
            // A gap before `row`: a rolled-back insert, or one still in flight.
            match &self.gap {
                Some(g) if g.after == self.cursor && xmin >= g.horizon => {
                    // Still there after everything running at first sight ended. Wait for any
                    // insert still between its id and its commit, then look once more: what is
                    // missing now was rolled back, and later inserts get larger ids.
                    self.confirm_gap().await?;
                    self.gap = None;
                    if let Some(first) = <[_]>::first(&self.rows_after(self.cursor).await?) {
                        if first.id != self.cursor + 1 {
                            self.cursor = first.id - 1;
                        }
                    }
                }
                Some(g) if g.after == self.cursor => {}
                _ => self.gap = Some(Gap { after: self.cursor, horizon: xmax }),
            }
            return Ok(());
        }
        Ok(())
    }
}

#[async_trait]
impl EventSource for PgSource {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn next(&mut self) -> Result<Option<Received>, Error> {
        loop {
            if let Some(row) = self.buffered.pop_front() {
                return row.into_received().map(Some);
            }
            self.poll().await?;
            if self.buffered.is_empty() {
                if !self.follow && self.gap.is_none() {
                    return Ok(None);
                }
                tokio::time::sleep(crate::POLL).await;
            }
        }
    }
}
