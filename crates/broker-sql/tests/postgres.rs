//! The SQL backend on the real PostgreSQL (`BROKER_TEST_POSTGRES_URL`, or testcontainers).

use std::time::Duration;

use broker_core::{Backend, Event, Position, SourceOptions, StartFrom, async_trait};
use broker_sql::{SqlBackend, SqlConfig, TableName};
use broker_testkit::Target;
use broker_testkit::scenario::{Hooks, Scene, Skip};

/// Each backend gets its own table; all are dropped at the end.
struct Postgres {
    url: String,
    tables: std::sync::Mutex<Vec<String>>,
    pool_size: usize,
}

impl Postgres {
    fn backend(&self, prefix: &str) -> SqlBackend {
        let table = format!("{prefix}_{}", broker_testkit::services::unique_suffix());
        self.tables.lock().unwrap().push(table.clone());
        SqlBackend::new(
            SqlConfig::postgres_url(&self.url)
                .table(TableName::new(&table).unwrap())
                .max_event_bytes(64 * 1024)
                .pool_size(self.pool_size),
        )
    }

    async fn drop_tables(&self) {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let tables: Vec<String> = self.tables.lock().unwrap().drain(..).collect();
        for t in tables {
            client.batch_execute(&format!("DROP TABLE IF EXISTS \"{t}\"")).await.unwrap();
        }
    }
}

#[async_trait]
impl Target for Postgres {
    fn name(&self) -> String {
        format!("sql postgresql (pool_size {})", self.pool_size)
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        Box::new(self.backend("conformance"))
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
    async fn scene(&self) -> Scene {
        let backend = self.backend("scene");
        let table = self.tables.lock().unwrap().last().cloned().unwrap();
        Scene { backend: Box::new(backend), hooks: Box::new(PgHooks { url: self.url.clone(), table }) }
    }
}

/// What happens to a PostgreSQL table under a consumer: ids lost to rollbacks, transactions
/// elsewhere in the cluster.
struct PgHooks {
    url: String,
    table: String,
}

#[async_trait]
impl Hooks for PgHooks {
    fn resume(&self, after: Option<&broker_core::Received>) -> Result<SourceOptions, Skip> {
        Ok(broker_testkit::scenario::resume_by_position(after))
    }
    async fn gap(&self) -> Result<(), Skip> {
        rolled_back_insert(&self.url, &self.table).await;
        Ok(())
    }
    async fn hold_elsewhere(&self) -> Result<Box<dyn Send + Sync>, Skip> {
        // Another database of the same cluster: it holds the cluster's xmin back and takes no
        // lock on the table. The transaction ends when the client is dropped.
        let long = client(&other_database(&self.url, "postgres")).await;
        long.batch_execute("BEGIN; SELECT txid_current();").await.unwrap();
        Ok(Box::new(long))
    }
}

/// `url` with its database replaced by `db`.
fn other_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let cut = base.rfind('/').filter(|&i| i > "postgres://".len()).unwrap_or(base.len());
    let mut out = format!("{}/{db}", &base[..cut]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_conforms() {
    let Some(service) = broker_testkit::services::postgres("postgres_conforms").await else { return };
    let target = Postgres { url: service.url.clone(), tables: Default::default(), pool_size: 1 };
    broker_testkit::run_all(&target).await;
    target.drop_tables().await;
}

/// Several writer connections: order per sender still holds, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_a_pool_of_writers_conforms() {
    let Some(service) = broker_testkit::services::postgres("postgres_with_a_pool_of_writers_conforms").await else {
        return;
    };
    let target = Postgres { url: service.url.clone(), tables: Default::default(), pool_size: 3 };
    broker_testkit::run_all(&target).await;
    target.drop_tables().await;
}

/// A row committed after a higher id is not skipped: an open transaction holds id N while the
/// broker commits N+1; the consumer must hand over N before N+1, once N commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_id_cursor_never_skips_a_late_commit() {
    let Some(service) = broker_testkit::services::postgres("the_id_cursor_never_skips_a_late_commit").await else {
        return;
    };
    let target = Postgres { url: service.url.clone(), tables: Default::default(), pool_size: 1 };
    let backend = target.backend("gap");
    let table = target.tables.lock().unwrap()[0].clone();
    let broker = backend.connect().await.unwrap();
    broker.publish(broker_testkit::user_event("s", 0)).await.unwrap().await.unwrap();

    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), source.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.position, Position::Row(1));

    // Another writer takes id 2 and keeps its transaction open.
    let (slow, conn) = tokio_postgres::connect(&service.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let late = String::from_utf8(broker_testkit::user_event("late", 1).to_json()).unwrap();
    slow.batch_execute("BEGIN").await.unwrap();
    slow.execute(&format!("INSERT INTO \"{table}\" (sender_id, data) VALUES ('late', $1)"), &[&late]).await.unwrap();

    // The broker commits id 3 meanwhile.
    let third = broker.publish(broker_testkit::user_event("s", 2)).await.unwrap().await.unwrap();
    assert_eq!(third.position, Some(Position::Row(3)));

    // While id 2 is in flight, nothing is handed over.
    let early = tokio::time::timeout(Duration::from_millis(700), source.next()).await;
    assert!(early.is_err(), "handed over a row past an uncommitted one: {early:?}");

    slow.batch_execute("COMMIT").await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), source.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.position, Position::Row(2));
    assert_eq!(second.raw, late.as_bytes());
    let next = tokio::time::timeout(Duration::from_secs(10), source.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.position, Position::Row(3));

    // A rolled-back insert leaves a gap for good; the cursor moves past it.
    slow.batch_execute("BEGIN").await.unwrap();
    slow.execute(&format!("INSERT INTO \"{table}\" (sender_id, data) VALUES ('gone', '{{}}')"), &[]).await.unwrap();
    slow.batch_execute("ROLLBACK").await.unwrap();
    broker.publish(broker_testkit::user_event("s", 3)).await.unwrap().await.unwrap();
    let after_gap = tokio::time::timeout(Duration::from_secs(10), source.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(after_gap.position, Position::Row(5));

    broker.close().await.unwrap();
    target.drop_tables().await;
}

/// Rasa's sample: `data` is Rasa's encoding; a sender_id over 255 characters fits the column
/// cut, and stays whole in `data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_hold_rasas_bytes() {
    let Some(service) = broker_testkit::services::postgres("rows_hold_rasas_bytes").await else { return };
    let target = Postgres { url: service.url.clone(), tables: Default::default(), pool_size: 1 };
    let backend = target.backend("rows");
    let table = target.tables.lock().unwrap()[0].clone();
    let broker = backend.connect().await.unwrap();
    let mut receipts = Vec::new();
    for e in broker_testkit::rasa_sample_events() {
        receipts.push(broker.publish(e).await.unwrap());
    }
    for r in receipts {
        r.await.unwrap();
    }
    broker.close().await.unwrap();
    let (client, conn) = tokio_postgres::connect(&service.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = client.query(&format!("SELECT sender_id, data FROM \"{table}\" ORDER BY id"), &[]).await.unwrap();
    let lines = broker_testkit::rasa_sample_lines();
    assert_eq!(rows.len(), lines.len());
    for (row, line) in rows.iter().zip(lines) {
        let data: String = row.get(1);
        assert_eq!(data, line);
        let sender: Option<String> = row.get(0);
        let want =
            Event::from_json(line.as_bytes()).unwrap().sender_id().map(|s| s.chars().take(255).collect::<String>());
        assert_eq!(sender, want);
    }
    target.drop_tables().await;
}

/// A login PostgreSQL refuses (a role that does not exist) and a database that does not exist are
/// permanent (`Error::Denied`: trying again will not help); a closed port is temporary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_and_missing_databases_are_permanent() {
    let Some(service) = broker_testkit::services::postgres("refused_logins_are_permanent").await else { return };
    let rest = service.url.split_once("://").map_or(service.url.as_str(), |(_, r)| r);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let (host, db) = host.split_once('/').unwrap_or((host, "test"));
    let connect = |url: String| async move {
        let config = SqlConfig::postgres_url(&url).table(TableName::new("never_created").unwrap());
        SqlBackend::new(config).connect().await.expect_err("must fail")
    };
    let err = connect(format!("postgres://no_such_role_9f1c@{host}/{db}")).await;
    assert!(matches!(err, broker_core::Error::Denied { .. }) && !err.is_temporary(), "unknown role: {err:?}");
    assert!(err.to_string().contains("no_such_role_9f1c"), "{err}");
    let err = connect(format!("postgres://postgres@{host}/no_such_database_9f1c")).await;
    assert!(matches!(err, broker_core::Error::Denied { .. }), "unknown database: {err:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = connect(format!("postgres://postgres@127.0.0.1:{port}/{db}")).await;
    assert!(matches!(err, broker_core::Error::Unavailable { .. }) && err.is_temporary(), "closed port: {err:?}");
}

/// Rows read with a new connection of the test's own.
async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Takes the next id of `table` in a transaction that rolls back: a gap for good.
async fn rolled_back_insert(url: &str, table: &str) {
    let c = client(url).await;
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(&format!("INSERT INTO \"{table}\" (sender_id, data) VALUES ('gone', '{{}}')"), &[]).await.unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
}

/// The source's connection is terminated by the server: a following source reconnects and goes
/// on at its cursor, skipping and repeating nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_source_reconnects_at_its_cursor() {
    let Some(service) = broker_testkit::services::postgres("a_following_source_reconnects").await else { return };
    let target = Postgres { url: service.url.clone(), tables: Default::default(), pool_size: 1 };
    let backend = target.backend("reconn");
    let table = target.tables.lock().unwrap()[0].clone();
    let broker = backend.connect().await.unwrap();
    for seq in 0..3 {
        broker.publish(broker_testkit::user_event("r", seq)).await.unwrap().await.unwrap();
    }
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.unwrap();
    for id in 1..=3 {
        let r = tokio::time::timeout(Duration::from_secs(10), source.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(r.position, Position::Row(id));
    }
    // Only the source's connection reads `table` with `WHERE id >`.
    let admin = client(&service.url).await;
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND query LIKE $1 AND query LIKE '%WHERE id >%'",
            &[&format!("%\"{table}\"%")],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 1, "the source's connection was found");
    for seq in 3..6 {
        broker.publish(broker_testkit::user_event("r", seq)).await.unwrap().await.unwrap();
    }
    for id in 4..=6 {
        let r = tokio::time::timeout(Duration::from_secs(15), source.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(r.position, Position::Row(id));
    }
    broker.close().await.unwrap();
    target.drop_tables().await;
}
