//! The SQL backend under real faults on the real PostgreSQL (`BROKER_TEST_POSTGRES_URL`): the
//! shared fault suite through a loopback proxy (down, black hole, back), with one connection and
//! with `pool_size: 4`; transient server errors (a read-only session, a lock held past the
//! statement timeout) that must make events wait, never fail; and poison events the server
//! refuses (a CHECK constraint, a value too long for the column) that fail alone.

use std::time::Duration;

use broker_core::{Backend, DeliveryOptions, Error, async_trait};
use broker_sql::{SqlBackend, SqlConfig, TableName};
use broker_testkit::faults::{self, FaultOptions, FaultTarget, Faulty};
use broker_testkit::proxy::Proxy;
use broker_testkit::{seq_of, user_event};

/// `postgres://user@host:port/db` → (`user@`, `host:port`, `/db...`).
fn split_url(url: &str) -> (String, String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (user, rest) = rest.rsplit_once('@').map_or(("".to_owned(), rest), |(u, r)| (format!("{u}@"), r));
    let (host, path) = rest.split_once('/').map_or((rest, String::new()), |(h, p)| (h, format!("/{p}")));
    (user, host.to_owned(), path)
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("admin connection");
    tokio::spawn(conn);
    client
}

struct Postgres {
    url: String,
    pool_size: usize,
    tables: std::sync::Mutex<Vec<String>>,
}

impl Postgres {
    fn config(&self, url: &str, table: &str, options: &FaultOptions) -> SqlConfig {
        let delivery = DeliveryOptions::default().close_timeout(options.close_timeout);
        SqlConfig::postgres_url(url)
            .table(TableName::new(table).unwrap())
            .pool_size(self.pool_size)
            .attempt_timeout(options.attempt_timeout)
            .retry_max_delay(Duration::from_millis(500))
            .delivery(delivery)
    }

    async fn drop_tables(&self) {
        let client = admin(&self.url).await;
        let tables: Vec<String> = self.tables.lock().unwrap().drain(..).collect();
        for t in tables {
            client.batch_execute(&format!("DROP TABLE IF EXISTS \"{t}\"")).await.unwrap();
        }
    }
}

#[async_trait]
impl FaultTarget for Postgres {
    fn name(&self) -> String {
        format!("sql postgresql (pool_size {})", self.pool_size)
    }
    fn exactly_once(&self) -> bool {
        true
    }
    async fn fresh(&self, options: &FaultOptions) -> Faulty {
        let table = format!("faults_{}", broker_testkit::services::unique_suffix());
        self.tables.lock().unwrap().push(table.clone());
        let (user, host, path) = split_url(&self.url);
        let proxy = Proxy::start(&host).await.expect("start the proxy");
        let via = format!("postgres://{user}127.0.0.1:{}{path}", proxy.port());
        Faulty {
            backend: Box::new(SqlBackend::new(self.config(&via, &table, options))),
            outage: Box::new(proxy),
            reader: Box::new(SqlBackend::new(self.config(&self.url, &table, options))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_the_contract_under_faults() {
    let Some(service) = broker_testkit::services::postgres("postgres_keeps_the_contract_under_faults").await else {
        return;
    };
    let target = Postgres { url: service.url.clone(), pool_size: 1, tables: Default::default() };
    faults::run_all(&target).await;
    target.drop_tables().await;
}

/// Scenario 5: `pool_size: 4` with PostgreSQL down: close is bounded and the report complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_four_keeps_the_contract_under_faults() {
    let Some(service) = broker_testkit::services::postgres("a_pool_of_four_keeps_the_contract_under_faults").await
    else {
        return;
    };
    let target = Postgres { url: service.url.clone(), pool_size: 4, tables: Default::default() };
    faults::unreachable_for_the_whole_run(&target).await;
    faults::outage_then_recovery(&target).await;
    target.drop_tables().await;
}

/// Waits for every receipt and returns the errors, in order.
async fn outcomes(receipts: Vec<broker_core::Receipt>) -> Vec<Option<Error>> {
    let mut out = Vec::new();
    for r in receipts {
        out.push(tokio::time::timeout(Duration::from_secs(60), r).await.expect("an outcome within 60 s").err());
    }
    out
}

async fn seqs_in(client: &tokio_postgres::Client, table: &str) -> Vec<u64> {
    let rows = client.query(&format!("SELECT data FROM \"{table}\" ORDER BY id"), &[]).await.unwrap();
    rows.iter()
        .map(|r| {
            let data: String = r.get(0);
            seq_of(&broker_core::Event::from_json(data.as_bytes()).unwrap()).unwrap()
        })
        .collect()
}

/// A read-only session (as after a failover to a standby) and then a lock held past the attempt
/// timeout: the events wait and retry; none is rejected; each lands once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_server_errors_make_events_wait_not_fail() {
    let Some(service) = broker_testkit::services::postgres("transient_server_errors_make_events_wait_not_fail").await
    else {
        return;
    };
    let suffix = broker_testkit::services::unique_suffix();
    let (role, table) = (format!("broker_ro_{suffix}"), format!("transient_{suffix}"));
    let client = admin(&service.url).await;
    client
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; GRANT ALL ON SCHEMA public TO \"{role}\"; \
             CREATE TABLE \"{table}\" (id SERIAL PRIMARY KEY, sender_id VARCHAR(255), data TEXT); \
             GRANT ALL ON \"{table}\" TO \"{role}\"; GRANT ALL ON SEQUENCE \"{table}_id_seq\" TO \"{role}\";"
        ))
        .await
        .expect("set up a role of our own");
    let (_, host, path) = split_url(&service.url);
    let url = format!("postgres://{role}@{host}{path}");
    let mut options = FaultOptions::default();
    options.attempt_timeout = Duration::from_secs(1);
    let target = Postgres { url: url.clone(), pool_size: 1, tables: Default::default() };
    let broker = SqlBackend::new(target.config(&url, &table, &options)).connect().await.expect("connect");
    let kick = format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'");

    // 1. Read-only: new sessions of the role refuse writes (SQLSTATE 25006).
    client.batch_execute(&format!("ALTER ROLE \"{role}\" SET default_transaction_read_only = on")).await.unwrap();
    client.batch_execute(&kick).await.unwrap();
    let mut receipts = Vec::new();
    for seq in 0..100 {
        receipts.push(broker.publish(user_event("t", seq)).await.unwrap());
    }
    let t0 = std::time::Instant::now();
    while broker.is_ready().await {
        assert!(t0.elapsed() < Duration::from_secs(10), "still ready while every insert fails");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(seqs_in(&client, &table).await, Vec::<u64>::new(), "nothing lands while read-only");
    client.batch_execute(&format!("ALTER ROLE \"{role}\" RESET default_transaction_read_only")).await.unwrap();
    let errors = outcomes(receipts).await;
    assert!(errors.iter().all(Option::is_none), "read-only is the server's state, not the events' fault: {errors:?}");

    // 2. A lock held for 4 s while the attempt timeout is 1 s: attempts are abandoned (and the
    //    statement cancelled), the events wait, and land once the lock goes.
    let locker = admin(&service.url).await;
    locker.batch_execute(&format!("BEGIN; LOCK TABLE \"{table}\" IN ACCESS EXCLUSIVE MODE")).await.unwrap();
    let mut receipts = Vec::new();
    for seq in 100..200 {
        receipts.push(broker.publish(user_event("t", seq)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!broker.is_ready().await, "not ready while statements hang");
    tokio::time::sleep(Duration::from_secs(1)).await;
    locker.batch_execute("COMMIT").await.unwrap();
    let errors = outcomes(receipts).await;
    assert!(errors.iter().all(Option::is_none), "a lock is the server's state, not the events' fault: {errors:?}");
    assert!(broker.close().await.unwrap().is_clean());
    assert_eq!(seqs_in(&client, &table).await, (0..200).collect::<Vec<_>>(), "each event once, in order");

    client
        .batch_execute(&format!("DROP TABLE \"{table}\"; DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""))
        .await
        .unwrap();
}

/// Events the server refuses for what they are (a CHECK constraint: SQLSTATE 23514; a
/// `sender_id` too long for the column: 22001, known only through the SQLSTATE probe) fail
/// alone, as Rejected; their neighbours in the same batch land once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_the_server_refuses_fail_alone() {
    let Some(service) = broker_testkit::services::postgres("poison_events_the_server_refuses_fail_alone").await else {
        return;
    };
    let table = format!("poison_{}", broker_testkit::services::unique_suffix());
    let client = admin(&service.url).await;
    client
        .batch_execute(&format!(
            "CREATE TABLE \"{table}\" (id SERIAL PRIMARY KEY, sender_id VARCHAR(8), \
             data TEXT CHECK (data NOT LIKE '%\"seq\": 13,%'))"
        ))
        .await
        .unwrap();
    let target = Postgres { url: service.url.clone(), pool_size: 1, tables: Default::default() };
    let broker =
        SqlBackend::new(target.config(&service.url, &table, &FaultOptions::default())).connect().await.unwrap();
    let mut receipts = Vec::new();
    for seq in 0..30 {
        // seq 13 breaks the CHECK; seq 21's sender does not fit VARCHAR(8).
        let sender = if seq == 21 { "a-sender-far-too-long" } else { "short" };
        receipts.push(broker.publish(user_event(sender, seq)).await.unwrap());
    }
    let errors = outcomes(receipts).await;
    for (seq, e) in errors.iter().enumerate() {
        match (seq, e) {
            (13 | 21, Some(Error::Rejected { reason, .. })) => {
                let code = if seq == 13 { "23" } else { "22001" };
                assert!(reason.contains(&format!("SQLSTATE {code}")), "{seq}: {reason}");
            }
            (13 | 21, other) => panic!("event {seq} must be rejected, got {other:?}"),
            (_, None) => {}
            (_, Some(e)) => panic!("event {seq} is innocent, got {e}"),
        }
    }
    assert!(broker.close().await.unwrap().is_clean());
    let want: Vec<u64> = (0..30).filter(|s| *s != 13 && *s != 21).collect();
    assert_eq!(seqs_in(&client, &table).await, want, "neighbours land once, in order");
    client.batch_execute(&format!("DROP TABLE \"{table}\"")).await.unwrap();
}
