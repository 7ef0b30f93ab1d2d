//! Rasa's Redis tracker store (`tracker_store:` with `type: redis`), read for `broker export`.
//!
//! Rasa's `RedisTrackerStore` keeps each conversation under the key `tracker:<sender_id>`
//! (`<key_prefix>:tracker:<sender_id>` with an alphanumeric `key_prefix`; any other prefix is
//! warned about and left out, as Rasa does) as the JSON of its dialogue,
//! `{"events": [event.as_dict(), ...], "name": ...}`. Its keys, as Rasa reads them: `url` (the
//! host, default `localhost`), `port` (6379), `db` (0), `username`, `password`, `key_prefix`,
//! `use_ssl` (false), `ssl_keyfile`, `ssl_certfile`, `ssl_ca_certs`; `record_exp` only matters
//! when Rasa writes. Ours: `connect_timeout` and `read_timeout` (10 s each: one connect, one
//! command).
//!
//! Conversations are found with `SCAN` (never `KEYS`, which blocks the server) and read with
//! `MGET` in groups; the events are then put in export order (timestamp, then conversation,
//! then position in the conversation), which holds the selected events in memory for the sort.
//!
//! Rasa 3.6.21's own exporter finds no events in a Redis store at all: its `keys()` returns the
//! keys with their prefix and `retrieve_full_tracker` adds the prefix again. This reader strips
//! it, so `broker export` exports what the store holds.
//!
//! ```no_run
//! use broker_core::tracker::{ExportQuery, TrackerStore};
//! use broker_redis::RedisTrackerStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::Error> {
//! let store = RedisTrackerStore::new("127.0.0.1", 6379);
//! println!("{} conversations", store.conversation_ids().await?.len());
//! let mut events = store.read(&ExportQuery::all()).await?;
//! while let Some(page) = events.next_page().await? {
//!     for stored in page {
//!         let event = broker_core::tracker::export_event(&stored, None).expect("an event");
//!         println!("{}", String::from_utf8_lossy(&event.to_json()));
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use broker_core::json::{self, Value};
use broker_core::tracker::{
    ConfiguredStore, ExportQuery, StoredEvent, StoredEvents, TrackerStore, TrackerStoreFactory,
};
use broker_core::{ConfigError, Error, Options, Position, Secret, async_trait};
use redis::aio::MultiplexedConnection;

/// The type name in `endpoints.yml`.
pub const NAME: &str = "redis";

/// Rasa's key prefix (`DEFAULT_REDIS_TRACKER_STORE_KEY_PREFIX`).
const DEFAULT_PREFIX: &str = "tracker:";

/// Keys per `MGET`.
const MGET_KEYS: usize = 100;

/// The keys `tracker_store: type: redis` accepts.
const KEYS: &[&str] = &[
    "url",
    "port",
    "db",
    "username",
    "password",
    "key_prefix",
    "use_ssl",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_ca_certs",
    "record_exp",
    "connect_timeout",
    "read_timeout",
];

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable { backend: NAME, reason: reason.into(), cause: None }
}

/// `type: redis` under `tracker_store:`.
#[derive(Debug, Clone, Copy)]
pub struct RedisTrackerStoreFactory;

impl TrackerStoreFactory for RedisTrackerStoreFactory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn configure(&self, mut options: Options) -> Result<ConfiguredStore, ConfigError> {
        let host = options.take_str("url")?.unwrap_or_else(|| "localhost".to_owned());
        let mut store = RedisTrackerStore::new(host, 6379);
        if let Some(p) = options.take_u64("port")? {
            store.port = u16::try_from(p).map_err(|_| {
                ConfigError::new(options.location("port"), Some("port"), format!("{p} is not a port number"))
            })?;
        }
        if let Some(db) = options.take_u64("db")? {
            store.db = i64::try_from(db).map_err(|_| {
                ConfigError::new(options.location("db"), Some("db"), format!("{db} is not a database number"))
            })?;
        }
        store.username = options.take_str("username")?;
        store.password = options.take_secret("password")?;
        if let Some(prefix) = options.take_str("key_prefix")? {
            if !prefix.is_empty() && prefix.chars().all(char::is_alphanumeric) {
                store.prefix = format!("{prefix}:{DEFAULT_PREFIX}");
            } else if !prefix.is_empty() {
                options.warn(
                    "key_prefix",
                    format!("not alphanumeric: left out, as Rasa does (keys are read under `{DEFAULT_PREFIX}`)"),
                );
            }
        }
        store.tls = options.take_bool("use_ssl")?.unwrap_or(false);
        store.client_key = options.take_str("ssl_keyfile")?.map(PathBuf::from);
        store.client_cert = options.take_str("ssl_certfile")?.map(PathBuf::from);
        store.ca_certs = options.take_str("ssl_ca_certs")?.map(PathBuf::from);
        if store.client_key.is_some() != store.client_cert.is_some() {
            return Err(ConfigError::new(
                options.location("ssl_certfile"),
                Some("ssl_certfile"),
                "`ssl_certfile` and `ssl_keyfile` go together",
            ));
        }
        options.take_value("record_exp");
        if let Some(d) = options.take_seconds("connect_timeout")? {
            store.connect_timeout = d.max(Duration::from_millis(1));
        }
        if let Some(d) = options.take_seconds("read_timeout")? {
            store.read_timeout = d.max(Duration::from_millis(1));
        }
        let warnings = options.finish_for("redis tracker store", KEYS)?;
        Ok(ConfiguredStore::new(Box::new(store), warnings))
    }
}

/// Rasa's Redis tracker store, read only.
#[derive(Clone)]
pub struct RedisTrackerStore {
    host: String,
    port: u16,
    db: i64,
    username: Option<String>,
    password: Option<Secret>,
    prefix: String,
    tls: bool,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    ca_certs: Option<PathBuf>,
    connect_timeout: Duration,
    read_timeout: Duration,
}

impl fmt::Debug for RedisTrackerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl RedisTrackerStore {
    /// The store at `host:port`, database 0, Rasa's default prefix, no TLS.
    pub fn new(host: impl Into<String>, port: u16) -> RedisTrackerStore {
        RedisTrackerStore {
            host: host.into(),
            port,
            db: 0,
            username: None,
            password: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            tls: false,
            client_cert: None,
            client_key: None,
            ca_certs: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
        }
    }

    /// Database `db` (`SELECT`).
    pub fn db(mut self, db: i64) -> RedisTrackerStore {
        self.db = db;
        self
    }

    /// Rasa's `key_prefix` (alphanumeric): keys are `<prefix>:tracker:<sender_id>`.
    pub fn key_prefix(mut self, prefix: &str) -> RedisTrackerStore {
        self.prefix = format!("{prefix}:{DEFAULT_PREFIX}");
        self
    }

    fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>, Error> {
        std::fs::read(path).map_err(|e| {
            Error::Config(ConfigError::new(
                Default::default(),
                Some(what),
                format!("cannot read {}: {e}", path.display()),
            ))
        })
    }

    async fn connect(&self) -> Result<MultiplexedConnection, Error> {
        let addr = if self.tls {
            redis::ConnectionAddr::TcpTls {
                host: self.host.clone(),
                port: self.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            redis::ConnectionAddr::Tcp(self.host.clone(), self.port)
        };
        let info = redis::ConnectionInfo {
            addr,
            redis: redis::RedisConnectionInfo {
                db: self.db,
                username: self.username.clone(),
                password: self.password.as_ref().map(|p| p.expose().to_owned()),
                ..Default::default()
            },
        };
        let client = if self.tls && (self.ca_certs.is_some() || self.client_cert.is_some()) {
            let root_cert = self.ca_certs.as_ref().map(|p| Self::read_file(p, "ssl_ca_certs")).transpose()?;
            let client_tls = match (&self.client_cert, &self.client_key) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: Self::read_file(cert, "ssl_certfile")?,
                    client_key: Self::read_file(key, "ssl_keyfile")?,
                }),
                _ => None,
            };
            redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert })
        } else {
            redis::Client::open(info)
        }
        .map_err(|e| self.error("invalid connection settings", &e))?;
        match tokio::time::timeout(self.connect_timeout, client.get_multiplexed_tokio_connection()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.error("cannot connect", &e)),
            Err(_) => Err(unavailable(format!("{}: no answer within {:?}", self.describe(), self.connect_timeout))),
        }
    }

    /// A client error as ours: a refused login is [`Error::Denied`].
    fn error(&self, what: &str, e: &redis::RedisError) -> Error {
        let reason = format!("{}: {what}: {e}", self.describe());
        let text = e.to_string();
        if matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
            || text.contains("WRONGPASS")
            || text.contains("NOAUTH")
            || text.contains("NOPERM")
        {
            Error::Denied { backend: NAME, reason, cause: None }
        } else {
            unavailable(reason)
        }
    }

    /// One command under the read timeout.
    async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
        cmd: &redis::Cmd,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.read_timeout, cmd.query_async::<T>(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error("command failed", &e)),
            Err(_) => Err(Error::Timeout(self.read_timeout)),
        }
    }

    /// Every conversation key's sender id, by `SCAN`.
    async fn scan(&self, conn: &mut MultiplexedConnection) -> Result<Vec<String>, Error> {
        let pattern = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        let mut ids = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000);
            let (next, keys): (u64, Vec<Vec<u8>>) = self.query(conn, &cmd).await?;
            for key in keys {
                if let Some(id) = key.strip_prefix(self.prefix.as_bytes()) {
                    // Rasa's client decodes keys as UTF-8; one that is not cannot be a sender id.
                    if let Ok(id) = std::str::from_utf8(id) {
                        ids.push(id.to_owned());
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// The events of one stored dialogue, in its order, as (timestamp, data).
fn dialogue_events(key: &str, stored: &[u8]) -> Result<Vec<(f64, Vec<u8>)>, Error> {
    let malformed =
        |reason: String| Error::Malformed { position: Position::Offset(0), reason: format!("{key}: {reason}") };
    let value = json::parse(stored).map_err(|e| malformed(format!("not a stored tracker: {e}")))?;
    let events = match &value {
        Value::Object(map) => match map.get("events") {
            Some(Value::Array(events)) => events,
            Some(Value::Null) | None => return Ok(Vec::new()),
            Some(_) => return Err(malformed("`events` is not a list".into())),
        },
        _ => return Err(malformed("not a stored tracker (a JSON object)".into())),
    };
    Ok(events
        .iter()
        .map(|e| {
            let timestamp = e.as_object().and_then(|o| o.get("timestamp")).and_then(Value::as_f64).unwrap_or(f64::NAN);
            let mut data = Vec::new();
            e.write_rasa(&mut data);
            (timestamp, data)
        })
        .collect())
}

/// The sorted export, handed out a page at a time.
struct Sorted {
    events: std::vec::IntoIter<StoredEvent>,
    page_size: usize,
}

#[async_trait]
impl StoredEvents for Sorted {
    async fn next_page(&mut self) -> Result<Option<Vec<StoredEvent>>, Error> {
        let page: Vec<StoredEvent> = self.events.by_ref().take(self.page_size).collect();
        Ok((!page.is_empty()).then_some(page))
    }
}

#[async_trait]
impl TrackerStore for RedisTrackerStore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let user = self.username.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("redis tracker store {scheme}://{user}{}:{}/{} ({}*)", self.host, self.port, self.db, self.prefix)
    }

    async fn conversation_ids(&self) -> Result<Vec<String>, Error> {
        let mut conn = self.connect().await?;
        self.scan(&mut conn).await
    }

    async fn read(&self, query: &ExportQuery) -> Result<Box<dyn StoredEvents>, Error> {
        let mut conn = self.connect().await?;
        let ids = match &query.conversation_ids {
            Some(ids) => ids.clone(),
            None => self.scan(&mut conn).await?,
        };
        // (timestamp, conversation, position): the conversation's order breaks ties.
        let mut all: Vec<(f64, usize, usize, StoredEvent)> = Vec::new();
        let mut conversation = 0;
        for group in ids.chunks(MGET_KEYS) {
            let mut cmd = redis::cmd("MGET");
            for id in group {
                cmd.arg(format!("{}{id}", self.prefix));
            }
            let values: Vec<Option<Vec<u8>>> = self.query(&mut conn, &cmd).await?;
            for (id, value) in group.iter().zip(values) {
                conversation += 1;
                // Gone since the scan (expired, deleted): nothing to export, as in Rasa.
                let Some(stored) = value else { continue };
                let key = format!("{}{id}", self.prefix);
                for (i, (timestamp, data)) in dialogue_events(&key, &stored)?.into_iter().enumerate() {
                    if !query.admits_timestamp(timestamp) {
                        continue;
                    }
                    let mut event = StoredEvent::new(id.clone(), timestamp, data);
                    event.position = Some(Position::Offset(i as u64));
                    all.push((timestamp, conversation, i, event));
                }
            }
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let events: Vec<StoredEvent> = all.into_iter().map(|(_, _, _, e)| e).collect();
        Ok(Box::new(Sorted { events: events.into_iter(), page_size: query.page_size.max(1) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::ConfigValue;

    #[test]
    fn keys_are_rasas() {
        let options = Options::from_pairs([
            ("url", ConfigValue::Str("10.0.0.1".into())),
            ("port", ConfigValue::Int(6380)),
            ("db", ConfigValue::Int(2)),
            ("password", ConfigValue::Str("hunter2".into())),
            ("key_prefix", ConfigValue::Str("bot1".into())),
            ("record_exp", ConfigValue::Int(30)),
        ]);
        let configured = RedisTrackerStoreFactory.configure(options).expect("valid");
        let described = configured.store.describe();
        assert_eq!(described, "redis tracker store redis://10.0.0.1:6380/2 (bot1:tracker:*)");
        assert!(!format!("{:?}", configured.store).contains("hunter2"));
        assert!(configured.warnings.is_empty(), "{:?}", configured.warnings);

        let odd = Options::from_pairs([("key_prefix", ConfigValue::Str("not-alnum".into()))]);
        let configured = RedisTrackerStoreFactory.configure(odd).expect("valid");
        assert!(configured.store.describe().ends_with("(tracker:*)"));
        assert_eq!(configured.warnings.len(), 1);

        let bad = Options::from_pairs([("host", ConfigValue::Str("x".into()))]);
        let err = RedisTrackerStoreFactory.configure(bad).expect_err("unknown key");
        assert!(err.to_string().contains("unknown key for the redis tracker store"), "{err}");
    }

    #[test]
    fn dialogues_become_events_in_their_order() {
        let stored =
            br#"{"events": [{"event": "action", "timestamp": 2.5, "name": "x"}, {"event": "restart"}], "name": "a"}"#;
        let events = dialogue_events("tracker:a", stored).expect("a dialogue");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].0, 2.5);
        assert_eq!(events[0].1, br#"{"event": "action", "timestamp": 2.5, "name": "x"}"#);
        assert!(events[1].0.is_nan());
        assert!(dialogue_events("tracker:a", b"[1]").is_err());
    }
}
