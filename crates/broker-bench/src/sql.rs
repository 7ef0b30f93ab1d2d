//! `broker-bench sql`: the SQL backend on SQLite (a file on disk) and PostgreSQL, against diesel
//! with the same batch size and commit policy, and against diesel committing every event alone
//! (what Rasa's SQL broker does).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use broker_sql::{SqlBackend, SqlConfig, TableName};
use diesel::prelude::{Connection, Insertable, QueryDsl, SqliteConnection};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

use crate::{Plan, dataset, peak_rss_mib, publish_through, result, run_plan};

/// Rows per transaction: the SQL backend's default `batch_size`.
const BATCH: usize = 500;
/// One commit per event is slow; fewer events keep the bench short (rates are per second).
const PER_EVENT: u64 = 3000;

diesel::table! {
    bench_events (id) {
        id -> Integer,
        sender_id -> Nullable<Varchar>,
        data -> Nullable<Text>,
    }
}

#[derive(Insertable)]
#[diesel(table_name = bench_events)]
// A real multi-row INSERT on SQLite (diesel would otherwise insert row by row).
#[diesel(treat_none_as_default_value = false)]
struct NewRow {
    sender_id: Option<String>,
    data: Option<String>,
}

fn pg_url() -> String {
    std::env::var("BROKER_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub(crate) fn bench(events: u64, runs: usize) -> Result<()> {
    run_plan(
        Plan {
            backend: "sql",
            describe: format!(
                "{events} events (per-event baselines: {PER_EVENT}), SQLite on disk (WAL, synchronous=FULL) and PostgreSQL at {}",
                redact(&pg_url())
            ),
            variants: vec![
                ("sqlite-raw", events),
                ("sqlite-ours", events),
                ("sqlite-per-event", PER_EVENT),
                ("pg-raw", events),
                ("pg-ours", events),
                ("pg-ours-pool2", events),
                ("pg-per-event", PER_EVENT),
                ("pg-cli", events),
                ("pg-cli-spool-batch", events),
                ("pg-cli-spool-never", events),
            ],
            rates: vec![],
            comparisons: vec![
                ("sqlite-ours", "sqlite-raw", 0.7),
                ("sqlite-ours", "sqlite-per-event", 20.0),
                ("pg-ours", "pg-raw", 0.7),
                ("pg-ours", "pg-per-event", 20.0),
                ("pg-cli-spool-batch", "pg-cli", 0.5),
                ("pg-cli-spool-never", "pg-cli", 0.8),
            ],
            note: "raw: diesel, serde_json-encoded rows, 500 per transaction; per-event: diesel, one commit per event; ours: the sql backend (batch_size 500; pool2: pool_size 2); \
                   pg-cli: `broker publish` of a JSON-lines file to PostgreSQL, whole process; pg-cli-spool-*: the same with a disk spool (fsync batch/never)",
        },
        runs,
    )
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(a)) if url[s + 3..a].contains(':') => {
            let user_end = s + 3 + url[s + 3..a].find(':').unwrap_or(0);
            format!("{}:***{}", &url[..user_end], &url[a..])
        }
        _ => url.to_owned(),
    }
}

/// The dataset as a raw client would hold it: serde_json values.
fn values(n: u64) -> Result<Vec<serde_json::Value>> {
    dataset(n).iter().map(|e| serde_json::from_slice(&e.to_json()).context("dataset")).collect()
}

fn row(v: &serde_json::Value) -> Result<NewRow> {
    Ok(NewRow { sender_id: v["sender_id"].as_str().map(str::to_owned), data: Some(serde_json::to_string(v)?) })
}

const SQLITE_DDL: &str = "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
    CREATE TABLE IF NOT EXISTS bench_events (id INTEGER NOT NULL, sender_id VARCHAR(255), data TEXT, PRIMARY KEY (id))";
const PG_DDL: &str = "CREATE TABLE IF NOT EXISTS bench_events (id SERIAL NOT NULL, sender_id VARCHAR(255), data TEXT, PRIMARY KEY (id)); \
    TRUNCATE bench_events";

pub(crate) fn run(variant: &str, dir: &Path, n: u64) -> Result<serde_json::Value> {
    let table = format!("bench_ours_{}", std::process::id());
    match variant {
        "sqlite-ours" => {
            let path = dir.join(format!("{variant}.db"));
            remove_db(&path);
            let r = publish_through(variant, Box::new(SqlBackend::new(SqlConfig::sqlite(&path))), dataset(n));
            remove_db(&path);
            r
        }
        "sqlite-raw" | "sqlite-per-event" => {
            let path = dir.join(format!("{variant}.db"));
            remove_db(&path);
            let r = sqlite_raw(variant, &path, n, if variant == "sqlite-raw" { BATCH } else { 1 });
            remove_db(&path);
            r
        }
        "pg-ours" | "pg-ours-pool2" => {
            let pool = if variant == "pg-ours" { 1 } else { 2 };
            let name = TableName::new(&table).map_err(anyhow::Error::msg)?;
            let backend = SqlBackend::new(SqlConfig::postgres_url(&pg_url()).table(name).pool_size(pool));
            let r = publish_through(variant, Box::new(backend), dataset(n));
            drop_pg_table(&table)?;
            r
        }
        "pg-raw" | "pg-per-event" => pg_raw(variant, n, if variant == "pg-raw" { BATCH } else { 1 }),
        "pg-cli" | "pg-cli-spool-batch" | "pg-cli-spool-never" => {
            let spool = dir.join("pg-cli-spool");
            let _ = std::fs::remove_dir_all(&spool);
            let mut endpoints =
                format!("event_broker:\n  type: sql\n  dialect: postgresql\n  url: {}\n  table: {table}\n", pg_url());
            if let Some(fsync) = variant.strip_prefix("pg-cli-spool-") {
                endpoints.push_str(&format!("  spool:\n    path: {}\n    fsync: {fsync}\n", spool.display()));
            }
            let (r, _, _) = crate::cli_publish(variant, dir, n, &endpoints)?;
            let stored = count_pg_rows(&table)?;
            drop_pg_table(&table)?;
            let _ = std::fs::remove_dir_all(&spool);
            if stored != n {
                bail!("{variant}: {stored} rows stored of {n}");
            }
            Ok(r)
        }
        other => bail!("unknown variant {other}"),
    }
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn percent_latencies(lat: &mut Vec<u64>, starts: &[Instant]) {
    lat.extend(starts.iter().map(|t| t.elapsed().as_nanos() as u64 / 1000));
}

fn sqlite_raw(variant: &str, path: &Path, n: u64, batch: usize) -> Result<serde_json::Value> {
    use diesel::connection::SimpleConnection;
    let values = values(n)?;
    let mut conn = SqliteConnection::establish(&path.to_string_lossy())?;
    conn.batch_execute(SQLITE_DDL)?;
    let mut lat = Vec::with_capacity(n as usize);
    let started = Instant::now();
    for chunk in values.chunks(batch) {
        let starts: Vec<Instant> = chunk.iter().map(|_| Instant::now()).collect();
        let rows: Vec<NewRow> = chunk.iter().map(row).collect::<Result<_>>()?;
        if batch == 1 {
            // Autocommit: one transaction per event.
            diesel::RunQueryDsl::execute(diesel::insert_into(bench_events::table).values(&rows), &mut conn)?;
        } else {
            conn.immediate_transaction(|c| {
                diesel::RunQueryDsl::execute(diesel::insert_into(bench_events::table).values(&rows), c)
            })?;
        }
        percent_latencies(&mut lat, &starts);
    }
    let elapsed = started.elapsed();
    let count: i64 = diesel::RunQueryDsl::get_result(bench_events::table.count(), &mut conn)?;
    if count != n as i64 {
        bail!("{variant}: {count} rows, expected {n}");
    }
    Ok(result(variant, n, elapsed, lat, peak_rss_mib()))
}

fn pg_raw(variant: &str, n: u64, batch: usize) -> Result<serde_json::Value> {
    let values = values(n)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let mut conn = AsyncPgConnection::establish(&pg_url()).await?;
        conn.batch_execute(PG_DDL).await?;
        let mut lat = Vec::with_capacity(n as usize);
        let started = Instant::now();
        for chunk in values.chunks(batch) {
            let starts: Vec<Instant> = chunk.iter().map(|_| Instant::now()).collect();
            let rows: Vec<NewRow> = chunk.iter().map(row).collect::<Result<_>>()?;
            // One statement: one transaction, committed when it returns.
            diesel_async::RunQueryDsl::execute(diesel::insert_into(bench_events::table).values(&rows), &mut conn)
                .await?;
            percent_latencies(&mut lat, &starts);
        }
        let elapsed = started.elapsed();
        let count: i64 = diesel_async::RunQueryDsl::get_result(bench_events::table.count(), &mut conn).await?;
        conn.batch_execute("DROP TABLE bench_events").await?;
        if count != n as i64 {
            bail!("{variant}: {count} rows, expected {n}");
        }
        Ok(result(variant, n, elapsed, lat, peak_rss_mib()))
    })
}

fn count_pg_rows(table: &str) -> Result<u64> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        use diesel_async::RunQueryDsl;
        let mut conn = AsyncPgConnection::establish(&pg_url()).await?;
        let c: Count =
            diesel::sql_query(format!("SELECT COUNT(*) AS n FROM \"{table}\"")).get_result(&mut conn).await?;
        Ok(u64::try_from(c.n).unwrap_or(0))
    })
}

fn drop_pg_table(table: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut conn = AsyncPgConnection::establish(&pg_url()).await?;
        conn.batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\"")).await?;
        Ok(())
    })
}
