//! The SQL backend on SQLite files: conformance, Rasa's table and rows, configuration.

use broker_core::{
    Backend, BackendFactory, ConfigValue, Event, Options, Position, SourceOptions, StartFrom, async_trait,
};
use broker_sql::{SqlBackend, SqlConfig, SqlFactory, TableName};
use broker_testkit::Target;
use broker_testkit::scenario::{Hooks, Scene, Skip};
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};

struct Sqlite {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Target for Sqlite {
    fn name(&self) -> String {
        "sql sqlite".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        let path = self.dir.path().join(format!("events-{}.db", broker_testkit::services::unique_suffix()));
        Box::new(SqlBackend::new(SqlConfig::sqlite(path).max_event_bytes(64 * 1024)))
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
    async fn scene(&self) -> Scene {
        Scene { backend: self.fresh().await, hooks: Box::new(SqliteHooks) }
    }
}

/// A SQLite consumer keeps its row id.
struct SqliteHooks;

#[async_trait]
impl Hooks for SqliteHooks {
    fn resume(&self, after: Option<&broker_core::Received>) -> Result<SourceOptions, Skip> {
        Ok(broker_testkit::scenario::resume_by_position(after))
    }
    async fn gap(&self) -> Result<(), Skip> {
        Err("SQLite gives the next id as the largest plus one under its writer lock: no holes".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_conforms() {
    broker_testkit::run_all(&Sqlite { dir: tempfile::tempdir().unwrap() }).await;
}

#[derive(QueryableByName, Debug, PartialEq)]
struct RasaRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<Text>)]
    sender_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    data: Option<String>,
}

fn rows(path: &std::path::Path, table: &str) -> Vec<RasaRow> {
    let mut c = SqliteConnection::establish(&path.to_string_lossy()).unwrap();
    diesel::sql_query(format!("SELECT id, sender_id, data FROM {table} ORDER BY id")).load(&mut c).unwrap()
}

#[tokio::test]
async fn rows_match_rasas_and_an_existing_rasa_table_is_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    {
        // The table exactly as Rasa's SQLAlchemy model creates it, with a row Rasa wrote.
        let mut c = SqliteConnection::establish(&path.to_string_lossy()).unwrap();
        diesel::sql_query(
            "CREATE TABLE events (id INTEGER NOT NULL, sender_id VARCHAR(255), data TEXT, PRIMARY KEY (id))",
        )
        .execute(&mut c)
        .unwrap();
        diesel::sql_query("INSERT INTO events (sender_id, data) VALUES ('old', '{\"sender_id\": \"old\", \"event\": \"restart\", \"timestamp\": 1.0}')")
            .execute(&mut c)
            .unwrap();
    }
    let backend = SqlBackend::new(SqlConfig::sqlite(&path));
    let broker = backend.connect().await.unwrap();
    let mut receipts = Vec::new();
    for e in broker_testkit::rasa_sample_events() {
        receipts.push(broker.publish(e).await.unwrap());
    }
    let mut ids = Vec::new();
    for r in receipts {
        ids.push(r.await.unwrap().position);
    }
    broker.close().await.unwrap();
    assert_eq!(ids.first(), Some(&Some(Position::Row(2))), "ids continue after Rasa's row");
    let stored = rows(&path, "events");
    assert_eq!(stored.len(), 107);
    for (row, line) in stored[1..].iter().zip(broker_testkit::rasa_sample_lines()) {
        assert_eq!(row.data.as_deref(), Some(line), "data is the Rasa encoding");
        let event = Event::from_json(line.as_bytes()).unwrap();
        let sender = event.sender_id().map(|s| s.chars().take(255).collect::<String>());
        assert_eq!(row.sender_id, sender);
    }
    // A consumer from the beginning sees Rasa's row first, then ours, byte for byte.
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning).follow(false)).await.unwrap();
    let first = source.next().await.unwrap().unwrap();
    assert_eq!(first.position, Position::Row(1));
    let mut n = 1;
    while let Some(r) = source.next().await.unwrap() {
        assert_eq!(r.raw, broker_testkit::rasa_sample_lines()[n - 1].as_bytes());
        n += 1;
    }
    assert_eq!(n, 107);
}

#[tokio::test]
async fn a_custom_table_is_created_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.db");
    let config = SqlConfig::sqlite(&path).table(TableName::new("rasa_events").unwrap());
    let broker = SqlBackend::new(config).connect().await.unwrap();
    broker.publish(broker_testkit::user_event("a", 1)).await.unwrap().await.unwrap();
    broker.close().await.unwrap();
    assert_eq!(rows(&path, "rasa_events").len(), 1);
}

fn configure(pairs: Vec<(&str, ConfigValue)>) -> Result<broker_core::Configured, broker_core::ConfigError> {
    SqlFactory.configure(Options::from_pairs(pairs))
}

#[test]
fn options_follow_rasa() {
    let s = |v: &str| ConfigValue::Str(v.into());
    let c = configure(vec![("db", s(":memory:")), ("dialect", s("sqlite"))]).unwrap();
    assert_eq!(c.backend.describe(), "sql sqlite :memory: table events");
    let c = configure(vec![]).unwrap();
    assert_eq!(c.backend.describe(), "sql sqlite events.db table events");
    let c = configure(vec![
        ("dialect", s("postgresql")),
        ("url", s("db.example:6543")),
        ("port", ConfigValue::Int(42)),
        ("db", s("rasa")),
        ("username", s("bob")),
        ("password", s("p@ss/word")),
    ])
    .unwrap();
    assert_eq!(c.backend.describe(), "sql postgresql://bob@db.example:6543/rasa table events", "a port in url wins");
    assert!(!format!("{:?}", c.backend).contains("p@ss"), "no password in Debug");
    let c = configure(vec![("dialect", s("postgresql")), ("url", s("postgres://u:secret@h:1/d"))]).unwrap();
    assert_eq!(c.backend.describe(), "sql postgres://u:***@h:1/d table events");
    let err = configure(vec![("dialect", s("mysql"))]).unwrap_err();
    assert!(err.to_string().contains("allowed: sqlite, postgresql"), "{err}");
    let err = configure(vec![("table", s("events; DROP TABLE x"))]).unwrap_err();
    assert!(err.to_string().contains("not a valid table name"), "{err}");
    let err = configure(vec![("dbb", s("x"))]).unwrap_err();
    assert!(err.to_string().contains("did you mean `db`?"), "{err}");
}

#[tokio::test]
async fn an_unreachable_postgres_fails_quickly_saying_so() {
    // Rasa's connexion_error_sql_endpoint.yml, pointed at a closed port on loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let s = |v: &str| ConfigValue::Str(v.into());
    let c = configure(vec![
        ("dialect", s("postgresql")),
        ("url", s("127.0.0.1")),
        ("port", ConfigValue::Int(port as i64)),
        ("db", s("boom")),
        ("username", s("user")),
        ("password", s("pw")),
    ])
    .unwrap();
    let started = std::time::Instant::now();
    let err = c.backend.connect().await.expect_err("must fail");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let text = err.to_string();
    assert!(text.contains("cannot connect") && text.contains(&format!("127.0.0.1:{port}/boom")), "{text}");
    assert!(!text.contains("pw"), "{text}");
}

/// A lock held for 40 s by another connection (`BEGIN EXCLUSIVE`): the events wait (SQLITE_BUSY
/// is the database's state, not theirs), `is_ready()` is false meanwhile, and once the lock goes
/// every event is committed, in order, each once. (Before the shared driver, some failed after
/// ~33 s while later ones committed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_for_40_seconds_makes_events_wait_not_fail() {
    use diesel::Connection;
    use diesel::connection::SimpleConnection;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let broker = SqlBackend::new(SqlConfig::sqlite(&db)).connect().await.unwrap();
    broker.publish(broker_testkit::user_event("lock", 0)).await.unwrap().await.expect("delivered before the lock");
    let url = db.to_string_lossy().into_owned();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let mut conn = diesel::sqlite::SqliteConnection::establish(&url).unwrap();
        conn.batch_execute("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(40));
        conn.batch_execute("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    let mut receipts = Vec::new();
    for seq in 1..=100 {
        receipts.push(broker.publish(broker_testkit::user_event("lock", seq)).await.unwrap());
    }
    let t0 = std::time::Instant::now();
    while broker.is_ready().await {
        assert!(t0.elapsed() < Duration::from_secs(20), "still ready while the database is locked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder.join().unwrap();
    for (i, r) in receipts.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(30), r).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("event {} failed behind a lock instead of waiting: {e}", i + 1),
            Err(_) => panic!("event {} not committed 30 s after the lock went", i + 1),
        }
    }
    assert!(broker.close().await.unwrap().is_clean());
    let backend = SqlBackend::new(SqlConfig::sqlite(&db));
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning).follow(false)).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(r) = source.next().await.unwrap() {
        seqs.push(broker_testkit::seq_of(&r.event).unwrap());
    }
    assert_eq!(seqs, (0..=100).collect::<Vec<_>>(), "each event once, in order");
}
