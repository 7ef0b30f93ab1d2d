//! `type: sql` options (docs/rasa-compat.md §5) and our extras.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use broker_core::{ConfigError, DeliveryOptions, Options, Secret, Warning};

use crate::tls::{SslMode, TlsSettings};

pub(crate) const NAME: &str = "sql";

/// Where the events table lives.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Database {
    /// A SQLite file (relative to the working directory) or `:memory:`.
    Sqlite {
        /// The file.
        path: PathBuf,
    },
    /// A PostgreSQL database.
    Postgres(PgTarget),
}

/// How to reach PostgreSQL. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PgTarget {
    /// A full URL given as `url:` (used as is), or none when built from the parts.
    pub url: Option<Secret>,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database name.
    pub db: String,
    /// User.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// TLS (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
    pub tls: TlsSettings,
}

impl PgTarget {
    /// The tokio-postgres configuration.
    pub(crate) fn pg_config(&self) -> Result<tokio_postgres::Config, String> {
        let ssl = match self.tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        };
        if let Some(url) = &self.url {
            let mut c =
                url.expose().parse::<tokio_postgres::Config>().map_err(|e| format!("invalid PostgreSQL URL: {e}"))?;
            if self.tls.mode != SslMode::Disable {
                c.ssl_mode(ssl);
            }
            return Ok(c);
        }
        let mut c = tokio_postgres::Config::new();
        c.ssl_mode(ssl);
        c.host(&self.host).port(self.port).dbname(&self.db).application_name("rasa-event-broker");
        if let Some(u) = &self.username {
            c.user(u);
        }
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        c.connect_timeout(Duration::from_secs(10));
        Ok(c)
    }

    /// `host:port/db` for messages.
    pub fn describe(&self) -> String {
        let base = match &self.url {
            Some(url) => redact_url(url.expose()),
            None => format!(
                "postgresql://{}{}:{}/{}",
                self.username.as_deref().map(|u| format!("{u}@")).unwrap_or_default(),
                self.host,
                self.port,
                self.db
            ),
        };
        match self.tls.mode {
            SslMode::Disable => base,
            mode => format!("{base} (TLS {mode:?})"),
        }
    }
}

/// A URL with its password (user info or `password=` parameter) replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let url = &match url.find("password=") {
        Some(i) => {
            let end = url[i..].find('&').map_or(url.len(), |e| i + e);
            format!("{}password=***{}", &url[..i], &url[end..])
        }
        None => url.to_owned(),
    };
    let Some(scheme_end) = url.find("://") else { return url.to_owned() };
    let rest = &url[scheme_end + 3..];
    // The user info ends at the last `@`: a password may hold `/`, `?` or `#` unescaped, so the
    // authority's usual end cannot be trusted before it (an `@` later in the URL only hides more).
    match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let user = if user.contains(['/', '?', '#']) { "***" } else { user };
            let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_owned() };
            format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..])
        }
        None => url.to_owned(),
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite { path } => write!(f, "sqlite {}", path.display()),
            Database::Postgres(pg) => write!(f, "{pg:?}"),
        }
    }
}

/// A table name checked to be a plain identifier, so it can be quoted into SQL safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName(String);

impl TableName {
    /// Checks `name`: a letter or `_`, then letters, digits or `_`, at most 63 bytes.
    pub fn new(name: &str) -> Result<TableName, String> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok { Ok(TableName(name.to_owned())) } else { Err(format!("{name:?} is not a valid table name")) }
    }

    /// The name, double-quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Settings of the SQL backend.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqlConfig {
    /// The database.
    pub database: Database,
    /// The table (`table`, default `events`).
    pub table: TableName,
    /// Most events per transaction (`batch_size`, default 500).
    pub batch_size: usize,
    /// PostgreSQL connections writing in parallel (`pool_size`, default 1). Events are spread
    /// over them by `sender_id`, so each conversation keeps its order.
    pub pool_size: usize,
    /// Events whose encoding is longer are rejected alone (`max_event_bytes`).
    pub max_event_bytes: Option<usize>,
    /// First and longest wait between reconnection attempts (`retry_delay_in_seconds`: the
    /// longest; the first is a tenth of it, doubling with jitter). Default 5 s.
    pub retry_max_delay: Duration,
    /// How long the first connection may take before `connect` fails (`connect_timeout`, 10 s).
    pub connect_timeout: Duration,
    /// Buffer bound and policy, close deadline.
    pub delivery: DeliveryOptions,
    /// The longest one statement (a batch's insert and commit) may take before the connection
    /// counts as lost (`attempt_timeout`, default 10 s).
    pub attempt_timeout: Duration,
}

impl SqlConfig {
    /// The option keys `type: sql` accepts.
    pub const KEYS: &'static [&'static str] = &[
        "dialect",
        "url",
        "port",
        "db",
        "username",
        "password",
        "table",
        "batch_size",
        "pool_size",
        "max_event_bytes",
        "retry_delay_in_seconds",
        "connect_timeout",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "buffer_size",
        "when_full",
        "close_timeout",
        "attempt_timeout",
    ];

    /// A SQLite database at `path` with defaults.
    pub fn sqlite(path: impl Into<PathBuf>) -> SqlConfig {
        SqlConfig::with(Database::Sqlite { path: path.into() })
    }

    /// A PostgreSQL database at a URL (`postgres://user@host:port/db`) with defaults.
    pub fn postgres_url(url: &str) -> SqlConfig {
        SqlConfig::with(Database::Postgres(PgTarget {
            url: Some(Secret::new(url)),
            host: String::new(),
            port: 5432,
            db: String::new(),
            username: None,
            password: None,
            tls: TlsSettings::default(),
        }))
    }

    fn with(database: Database) -> SqlConfig {
        SqlConfig {
            database,
            table: TableName("events".into()),
            batch_size: 500,
            pool_size: 1,
            max_event_bytes: None,
            retry_max_delay: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            delivery: DeliveryOptions::default(),
            attempt_timeout: broker_core::delivery::driver::DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// Sets TLS for PostgreSQL (no effect on SQLite).
    pub fn tls(mut self, tls: TlsSettings) -> SqlConfig {
        if let Database::Postgres(pg) = &mut self.database {
            pg.tls = tls;
        }
        self
    }

    /// Sets the number of PostgreSQL writer connections.
    pub fn pool_size(mut self, n: usize) -> SqlConfig {
        self.pool_size = n.max(1);
        self
    }

    /// Uses `table` instead of `events`.
    pub fn table(mut self, table: TableName) -> SqlConfig {
        self.table = table;
        self
    }

    /// Sets the size limit per event.
    pub fn max_event_bytes(mut self, bytes: usize) -> SqlConfig {
        self.max_event_bytes = Some(bytes);
        self
    }

    /// Sets the longest wait between reconnection attempts.
    pub fn retry_max_delay(mut self, d: Duration) -> SqlConfig {
        self.retry_max_delay = d;
        self
    }

    /// Sets how long one statement may take.
    pub fn attempt_timeout(mut self, d: Duration) -> SqlConfig {
        self.attempt_timeout = d;
        self
    }

    /// Sets the delivery options.
    pub fn delivery(mut self, delivery: DeliveryOptions) -> SqlConfig {
        self.delivery = delivery;
        self
    }

    /// Reads the options of an `event_broker:` section.
    pub fn from_options(mut options: Options) -> Result<(SqlConfig, Vec<Warning>), ConfigError> {
        let database = take_database(&mut options, "events.db")?;
        let mut config = SqlConfig::with(database);
        if let Some(t) = options.take_str("table")? {
            config.table = TableName::new(&t).map_err(|e| {
                ConfigError::new(options.location("table"), Some("table"), e)
                    .with_hint("letters, digits and _, starting with a letter or _")
            })?;
        }
        if let Some(n) = options.take_usize("batch_size")? {
            if n == 0 || n > 100_000 {
                return Err(ConfigError::new(
                    options.location("batch_size"),
                    Some("batch_size"),
                    format!("{n} is out of range"),
                )
                .with_hint("between 1 and 100000"));
            }
            config.batch_size = n;
        }
        if let Some(n) = options.take_usize("pool_size")? {
            if n == 0 || n > 64 {
                return Err(ConfigError::new(
                    options.location("pool_size"),
                    Some("pool_size"),
                    format!("{n} is out of range"),
                )
                .with_hint("between 1 and 64 connections"));
            }
            if matches!(config.database, Database::Sqlite { .. }) && n > 1 {
                options.warn("pool_size", "SQLite has one writer at a time; `pool_size` is ignored");
            } else {
                config.pool_size = n;
            }
        }
        config.max_event_bytes = options.take_usize("max_event_bytes")?;
        if let Some(d) = options.take_seconds("retry_delay_in_seconds")? {
            config.retry_max_delay = d.max(Duration::from_millis(10));
        }
        if let Some(d) = options.take_seconds("connect_timeout")? {
            config.connect_timeout = d;
        }
        config.delivery = DeliveryOptions::take(&mut options)?;
        config.attempt_timeout = broker_core::delivery::DriverOptions::default().take(&mut options)?.attempt_timeout;
        let warnings = options.finish(NAME, SqlConfig::KEYS)?;
        Ok((config, warnings))
    }
}

/// The database keys (docs/rasa-compat.md §5), shared by the event broker and the tracker store:
/// `dialect`, `url`, `port`, `db` (default `default_db`), `username`, `password` and the TLS keys.
pub(crate) fn take_database(options: &mut Options, default_db: &str) -> Result<Database, ConfigError> {
    let dialect = options.take_choice("dialect", &["sqlite", "postgresql", "postgres"])?.unwrap_or("sqlite");
    let db = options.take_str("db")?.unwrap_or_else(|| default_db.to_owned());
    let url = options.take_str("url")?;
    let port = options.take_u64("port")?;
    let username = options.take_str("username")?;
    let password = options.take_secret("password")?;
    let mut database = match dialect {
        "sqlite" => {
            for key in ["url", "port", "username", "password"] {
                if options.contains(key) {
                    options.warn(key, format!("`{key}` has no effect with dialect sqlite"));
                }
            }
            Database::Sqlite { path: PathBuf::from(db) }
        }
        _ => {
            let url_at = options.location("url");
            let mut target = PgTarget {
                url: None,
                host: "localhost".into(),
                port: 5432,
                db,
                username,
                password,
                tls: TlsSettings::default(),
            };
            if let Some(p) = port {
                target.port = u16::try_from(p).map_err(|_| {
                    ConfigError::new(options.location("port"), Some("port"), format!("{p} is not a port number"))
                })?;
            }
            match url {
                Some(u) if u.contains("://") => {
                    // Checked now, not at connect; the message never quotes the URL (it may
                    // hold a password).
                    if let Err(e) = u.parse::<tokio_postgres::Config>() {
                        return Err(ConfigError::new(url_at, Some("url"), format!("not a valid PostgreSQL URL: {e}"))
                            .with_hint("postgresql://user:password@host:port/db (percent-encode special characters)"));
                    }
                    target.url = Some(Secret::new(u));
                }
                Some(u) if u.contains('@') => {
                    // `user:secret@db`: credentials in a bare host. Said without the value.
                    return Err(ConfigError::new(
                        url_at,
                        Some("url"),
                        "a host with user info (`user@host`) is not a host",
                    )
                    .with_hint("set `username` and `password`, or give a full postgresql:// URL"));
                }
                Some(u) => {
                    // `host` or `host:port`; a port here wins over `port`.
                    match u.rsplit_once(':') {
                        Some((h, p)) if !h.is_empty() && !h.contains(':') => {
                            target.host = h.to_owned();
                            target.port = p.parse().map_err(|_| {
                                ConfigError::new(url_at.clone(), Some("url"), format!("{p:?} is not a port"))
                                    .with_hint("host or host:port, with a port from 1 to 65535")
                            })?;
                        }
                        _ => target.host = u,
                    }
                }
                None => {}
            }
            Database::Postgres(target)
        }
    };
    let mode = options.take_choice("sslmode", &["disable", "prefer", "require", "verify-ca", "verify-full"])?;
    let tls = TlsSettings {
        mode: mode.and_then(SslMode::parse).unwrap_or_default(),
        root_cert: options.take_str("sslrootcert")?.map(PathBuf::from),
        client_cert: options.take_str("sslcert")?.map(PathBuf::from),
        client_key: options.take_str("sslkey")?.map(PathBuf::from),
    };
    match &mut database {
        Database::Postgres(pg) => {
            if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root_cert.is_none() {
                return Err(ConfigError::new(
                    options.location("sslmode"),
                    Some("sslrootcert"),
                    "is required with this sslmode",
                )
                .with_hint("the CA certificate (PEM) the server's certificate must chain to"));
            }
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                return Err(ConfigError::new(
                    options.location("sslcert"),
                    Some("sslcert"),
                    "`sslcert` and `sslkey` go together",
                ));
            }
            pg.tls = tls;
        }
        Database::Sqlite { .. } => {
            if tls != TlsSettings::default() {
                options.warn("sslmode", "TLS settings have no effect with dialect sqlite");
            }
        }
    }
    Ok(database)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers() {
        assert!(TableName::new("events").is_ok());
        assert!(TableName::new("_rasa_events2").is_ok());
        for bad in ["", "1events", "events; DROP TABLE x", "a\"b", "schema.table", &"x".repeat(64)] {
            assert!(TableName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://bob:secret@db:5432/x"), "postgres://bob:***@db:5432/x");
        assert_eq!(redact_url("postgres://bob@db/x"), "postgres://bob@db/x");
        assert_eq!(redact_url("postgres://db/x?password=1&a=b"), "postgres://db/x?password=***&a=b");
        // Configuration errors never echo a secret written where it does not belong.
        for url in ["bob:hunter2@db", "postgresql://bob:hunter2@db:notaport/x"] {
            let options = Options::from_pairs([
                ("dialect", broker_core::ConfigValue::Str("postgresql".into())),
                ("url", broker_core::ConfigValue::Str(url.into())),
            ]);
            let err = SqlConfig::from_options(options).expect_err(url);
            assert!(!err.to_string().contains("hunter2") && !format!("{err:?}").contains("hunter2"), "{url}: {err}");
        }
        // A password holding `/` or `?` (not percent-encoded) is still hidden.
        for url in ["postgres://bob:se/cret@db/x", "postgres://bob:se?cret@db/x", "postgres://bob:a@b/c?d@db:5432/x"] {
            let shown = redact_url(url);
            assert!(!shown.contains("cret") && !shown.contains("a@b/c"), "{url} -> {shown}");
            assert!(shown.starts_with("postgres://bob:***@"), "{url} -> {shown}");
        }
    }
}
