//! `type: pika` options (docs/rasa-compat.md §4) and ours, and the AMQP URI they make.

use std::path::PathBuf;
use std::time::Duration;

use broker_core::{ConfigError, DeliveryOptions, Location, Options, Secret, Warning};

pub(crate) const NAME: &str = "pika";

/// Rasa's default queue, used (with a warning) when no `queues` are given.
pub const DEFAULT_QUEUE: &str = "rasa_core_events";
/// Rasa's default exchange.
pub const DEFAULT_EXCHANGE: &str = "rasa-exchange";

/// Where and how to connect: the URI (or host) with the `username`/`password`/`port` keys filled
/// in. `Debug` and [`AmqpTarget::describe`] never show the password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpTarget {
    /// `amqps://` (or TLS turned on by the client-certificate variables).
    pub tls: bool,
    /// The user name, percent-decoded.
    pub username: String,
    /// The password, percent-decoded.
    pub password: Secret,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Virtual host, percent-decoded (`/` when the URI has no path).
    pub vhost: String,
    /// Heartbeat in seconds (URI query `heartbeat`, default 60).
    pub heartbeat: u16,
    /// How long opening a connection may take (URI query `connection_timeout`, seconds).
    pub connection_timeout: Duration,
    /// The CA to verify the server with (URI query `cacertfile` or `cafile`, or the `cafile` key);
    /// the system's trust store when none.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key files (URI query `certfile` + `keyfile`, or the variables
    /// `RABBITMQ_SSL_CLIENT_CERTIFICATE` + `RABBITMQ_SSL_CLIENT_KEY`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name to verify the server certificate against (URI query `server_name_indication`;
    /// default: the host).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for AmqpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTarget").field("uri", &self.describe()).finish_non_exhaustive()
    }
}

impl AmqpTarget {
    /// `amqp://user@host:port/vhost` without the password, for messages and logs.
    pub fn describe(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let vhost = if self.vhost == "/" { String::new() } else { format!("/{}", encode(&self.vhost)) };
        format!("{scheme}://{}@{host}:{}{vhost}", encode(&self.username), self.port)
    }

    /// The full URI with the password, as Rasa builds it (for tests that compare with Rasa's
    /// cases). Never log it.
    pub fn uri_with_password(&self) -> String {
        let d = self.describe();
        let (scheme, rest) = d.split_once("://").unwrap_or(("amqp", &d));
        let (user, rest) = rest.split_once('@').unwrap_or(("", rest));
        format!("{scheme}://{user}:{}@{rest}", encode(self.password.expose()))
    }
}

/// Settings of the RabbitMQ backend.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PikaConfig {
    /// Where to connect.
    pub target: AmqpTarget,
    /// Durable queues bound to the exchange (`queues`).
    pub queues: Vec<String>,
    /// The fanout exchange (`exchange_name`).
    pub exchange: String,
    /// Attempts of the first connection (`connection_attempts`, Rasa's default 20).
    pub connection_attempts: u32,
    /// Delay between them, and the longest wait between reconnects later on
    /// (`retry_delay_in_seconds`, default 5).
    pub retry_delay: Duration,
    /// Keep events whose publish failed (the connection dropped before the confirm) and send
    /// them again after reconnecting, in order (`should_keep_unpublished_messages`, default true).
    /// When false, such events fail, and events published during an outage fail at once.
    pub keep_unpublished: bool,
    /// Surface failures to the caller at once: while the broker is not connected, `publish`
    /// itself fails with `Error::Unavailable` (`raise_on_failure`, default false).
    pub raise_on_failure: bool,
    /// Unconfirmed messages allowed at a time (`max_inflight`, default 5,000: the best window of
    /// the benchmark's sweep of 100 to 20,000 against RabbitMQ on loopback; a few MB held).
    pub max_inflight: usize,
    /// How long the oldest unconfirmed message may wait for its confirm before the broker is
    /// considered stalled (blocked by a memory or disk alarm): not ready, no more sends until a
    /// confirm arrives (`confirm_timeout`, seconds, default 30).
    pub confirm_timeout: Duration,
    /// Larger events fail alone (`max_event_bytes`, default 16 MiB, RabbitMQ 4's
    /// `max_message_size`; a larger message would close the channel).
    pub max_event_bytes: u64,
    /// Headers added to every message (set from code, e.g. `rasa export`'s process id).
    pub headers: Vec<(String, String)>,
    /// `app_id` of every message: the variable `RASA_ENVIRONMENT` when set.
    pub app_id: Option<String>,
    /// Buffer bound and policy, close deadline.
    pub delivery: DeliveryOptions,
}

/// The most unconfirmed messages we allow (amqprs buffers 8,192 outgoing frames).
pub const MAX_INFLIGHT_LIMIT: usize = 8000;

impl PikaConfig {
    /// The option keys `type: pika` accepts.
    pub const KEYS: &'static [&'static str] = &[
        "url",
        "username",
        "password",
        "port",
        "queues",
        "exchange_name",
        "connection_attempts",
        "retry_delay_in_seconds",
        "should_keep_unpublished_messages",
        "raise_on_failure",
        "cafile",
        "max_inflight",
        "confirm_timeout",
        "max_event_bytes",
        "buffer_size",
        "when_full",
        "close_timeout",
    ];

    /// A plain connection to `host:port` as `username`, publishing to `queues` through Rasa's
    /// default exchange; other settings at their defaults.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        username: impl Into<String>,
        password: impl Into<String>,
        queues: Vec<String>,
    ) -> PikaConfig {
        PikaConfig {
            target: AmqpTarget {
                tls: false,
                username: username.into(),
                password: Secret::new(password),
                host: host.into(),
                port,
                vhost: "/".into(),
                heartbeat: 60,
                connection_timeout: Duration::from_secs(10),
                ca_file: None,
                client_cert: None,
                server_name: None,
            },
            queues,
            exchange: DEFAULT_EXCHANGE.into(),
            connection_attempts: 20,
            retry_delay: Duration::from_secs(5),
            keep_unpublished: true,
            raise_on_failure: false,
            max_inflight: 5000,
            confirm_timeout: Duration::from_secs(30),
            max_event_bytes: 16 * 1024 * 1024,
            headers: Vec::new(),
            app_id: std::env::var("RASA_ENVIRONMENT").ok(),
            delivery: DeliveryOptions::default(),
        }
    }

    /// Reads the options of an `event_broker:` section; the TLS variables come from the process
    /// environment.
    pub fn from_options(options: Options) -> Result<(PikaConfig, Vec<Warning>), ConfigError> {
        PikaConfig::from_options_with_env(options, &|name| std::env::var(name).ok())
    }

    /// Like [`PikaConfig::from_options`], with `env` as the environment (`RASA_ENVIRONMENT` and
    /// the `RABBITMQ_SSL_*` variables).
    pub fn from_options_with_env(
        mut options: Options,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(PikaConfig, Vec<Warning>), ConfigError> {
        options.ignore_with_warning(&["stream_pii", "anonymization_queues"], "a Rasa Pro feature");
        if options.contains("queue") {
            options.ignore_with_warning(
                &["queue"],
                "Rasa reads `queues` (a list or one name); `queue` is ignored there too",
            );
        }
        let section = options.section.clone();
        let url_at = options.location("url");
        let url = options.take_str("url")?.filter(|u| !u.trim().is_empty()).ok_or_else(|| {
            ConfigError::new(section.clone(), Some("url"), "a RabbitMQ host or amqp:// URI is required")
                .with_hint("e.g. `url: localhost` or `url: amqp://user:password@host:5672/vhost`")
        })?;
        let username = options.take_str("username")?;
        let password = options.take_secret("password")?;
        let port_at = options.location("port");
        let port = match options.take_str("port")? {
            None => None,
            Some(p) => Some(parse_port(&p).ok_or_else(|| {
                ConfigError::new(port_at.clone(), Some("port"), "Port could not be converted to integer.")
                    .with_hint(format!("{p:?} is not a port number between 1 and 65535"))
            })?),
        };
        let mut warnings_later = Vec::new();
        let mut target = parse_url(&url, &url_at, username, password, port, &mut warnings_later)?;
        for (key, message) in warnings_later {
            options.warn(key, message);
        }
        // A `cafile` key (Rasa's generic endpoint key) gives the CA when the URI does not.
        if let Some(ca) = options.take_str("cafile")? {
            target.ca_file.get_or_insert_with(|| PathBuf::from(ca));
        }
        // Rasa's client-certificate variables: with a plain host they turn TLS on.
        let cert = env("RABBITMQ_SSL_CLIENT_CERTIFICATE").filter(|s| !s.is_empty());
        let key = env("RABBITMQ_SSL_CLIENT_KEY").filter(|s| !s.is_empty());
        match (cert, key) {
            (Some(c), Some(k)) => {
                if target.client_cert.is_none() {
                    target.client_cert = Some((c.into(), k.into()));
                }
                // Rasa keeps the given port (5672 unless `port` says otherwise); so do we.
                target.tls = true;
            }
            (Some(_), None) | (None, Some(_)) => {
                options.warn(
                    "url",
                    "RABBITMQ_SSL_CLIENT_CERTIFICATE and RABBITMQ_SSL_CLIENT_KEY work only together; TLS stays off",
                );
            }
            (None, None) => {}
        }
        for var in ["RABBITMQ_SSL_CA_FILE", "RABBITMQ_SSL_KEY_PASSWORD"] {
            if env(var).is_some() {
                options.warn(
                    "url",
                    format!("the variable {var} is no longer supported (as in Rasa) and is ignored; give the CA as `cacertfile` in the amqps:// URI or as `cafile`"),
                );
            }
        }

        let queues = match options.take_str_list("queues")? {
            Some(q) if !q.is_empty() => q,
            _ => {
                options.warn(
                    "queues",
                    format!("no `queues` given; using the default queue {DEFAULT_QUEUE:?} (set `queues` explicitly)"),
                );
                vec![DEFAULT_QUEUE.to_owned()]
            }
        };
        if let Some(q) = queues.iter().find(|q| q.is_empty() || q.len() > 255) {
            return Err(ConfigError::new(
                options.location("queues"),
                Some("queues"),
                format!("invalid queue name {q:?}"),
            )
            .with_hint("1 to 255 bytes"));
        }
        let mut config = PikaConfig::new(target.host.clone(), target.port, "", "", queues);
        config.target = target;
        if let Some(e) = options.take_str("exchange_name")? {
            if e.len() > 255 {
                return Err(ConfigError::new(options.location("exchange_name"), Some("exchange_name"), "too long")
                    .with_hint("at most 255 bytes"));
            }
            config.exchange = e;
        }
        if let Some(n) = options.take_u64("connection_attempts")? {
            if n == 0 {
                return Err(ConfigError::new(
                    options.location("connection_attempts"),
                    Some("connection_attempts"),
                    "must be at least 1",
                ));
            }
            config.connection_attempts = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(d) = options.take_seconds("retry_delay_in_seconds")? {
            config.retry_delay = d;
        }
        if let Some(b) = options.take_bool("should_keep_unpublished_messages")? {
            config.keep_unpublished = b;
        }
        if let Some(b) = options.take_bool("raise_on_failure")? {
            config.raise_on_failure = b;
        }
        if let Some(n) = options.take_usize("max_inflight")? {
            if n == 0 || n > MAX_INFLIGHT_LIMIT {
                return Err(ConfigError::new(
                    options.location("max_inflight"),
                    Some("max_inflight"),
                    format!("{n} is out of range"),
                )
                .with_hint(format!("between 1 and {MAX_INFLIGHT_LIMIT}")));
            }
            config.max_inflight = n;
        }
        if let Some(t) = options.take_seconds("confirm_timeout")? {
            config.confirm_timeout = t.max(Duration::from_millis(100));
        }
        if let Some(n) = options.take_u64("max_event_bytes")? {
            config.max_event_bytes = n;
        }
        config.app_id = env("RASA_ENVIRONMENT");
        if config.app_id.as_ref().is_some_and(|a| a.len() > 255) {
            return Err(ConfigError::new(section, None, "the variable RASA_ENVIRONMENT is over 255 bytes")
                .with_hint("it becomes each message's app_id, an AMQP short string"));
        }
        config.delivery = DeliveryOptions::take(&mut options)?;
        let warnings = options.finish(NAME, PikaConfig::KEYS)?;
        Ok((config, warnings))
    }

    /// Checks what AMQP limits to 255 bytes (names of the exchange, queues, virtual host, user,
    /// headers, the app id), for a configuration built with the builder methods rather than read
    /// by [`PikaConfig::from_options`] (which checks them with file and line). Called by
    /// `connect`, so an over-long name is an error, never a panic inside amqprs.
    pub fn validate(&self) -> Result<(), broker_core::Error> {
        let too_long = |what: &str, name: &str| {
            broker_core::Error::Config(ConfigError::new(
                broker_core::Location::default(),
                Some(what),
                format!("{what} is {} bytes; AMQP allows 1 to 255", name.len()),
            ))
        };
        let check = |what: &str, name: &str, empty_ok: bool| {
            if name.len() > 255 || (!empty_ok && name.is_empty()) { Err(too_long(what, name)) } else { Ok(()) }
        };
        check("exchange", &self.exchange, true)?;
        for q in &self.queues {
            check("queue", q, false)?;
        }
        check("virtual host", &self.target.vhost, true)?;
        check("username", &self.target.username, true)?;
        for (k, _) in &self.headers {
            check("header name", k, false)?;
        }
        if let Some(app) = &self.app_id {
            check("RASA_ENVIRONMENT (app_id)", app, true)?;
        }
        Ok(())
    }

    /// Adds a header to every message of this broker.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> PikaConfig {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the exchange.
    pub fn exchange(mut self, name: impl Into<String>) -> PikaConfig {
        self.exchange = name.into();
        self
    }

    /// Sets the delivery options.
    pub fn delivery(mut self, delivery: DeliveryOptions) -> PikaConfig {
        self.delivery = delivery;
        self
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.trim().parse::<u16>().ok().filter(|p| *p > 0)
}

/// Percent-decodes `s`; `None` for a malformed escape or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes what may not appear as is in a URI's user, password or path segment.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds the target from `url` (a host name or an `amqp(s)://` URI) and the separate keys: the
/// URI's own user, password and port win; the keys fill in what it lacks.
fn parse_url(
    url: &str,
    at: &Location,
    username: Option<String>,
    password: Option<Secret>,
    port: Option<u16>,
    warnings: &mut Vec<(&'static str, String)>,
) -> Result<AmqpTarget, ConfigError> {
    // Never quote the URL in an error: it may hold a password.
    let bad = |what: &str| {
        ConfigError::new(at.clone(), Some("url"), format!("invalid AMQP URI: {what}"))
            .with_hint("amqp://user:password@host:port/vhost?query, with % escapes for reserved characters")
    };
    let mut target = PikaConfig::new("", 5672, "", "", Vec::new()).target;
    let (user, pass, host, uri_port, vhost, query) = match url.split_once("://") {
        None => {
            if url.contains(['/', '@', '?']) {
                return Err(bad("a host name must not contain '/', '@' or '?' (use an amqp:// URI)"));
            }
            (None, None, url.trim().to_owned(), None, None, "")
        }
        Some((scheme, rest)) => {
            target.tls = match scheme.to_ascii_lowercase().as_str() {
                "amqp" => false,
                "amqps" => true,
                _ => return Err(bad("the scheme must be amqp or amqps")),
            };
            let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            let (userinfo, hostport) = match authority.rfind('@') {
                Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
                None => (None, authority),
            };
            let (user, pass) = match userinfo {
                None => (None, None),
                Some(ui) => {
                    let (u, p) = match ui.split_once(':') {
                        Some((u, p)) => (u, Some(p)),
                        None => (ui, None),
                    };
                    let u = decode(u).ok_or_else(|| bad("a bad % escape in the user name"))?;
                    let p = p.map(|p| decode(p).ok_or_else(|| bad("a bad % escape in the password"))).transpose()?;
                    (Some(u).filter(|u| !u.is_empty()), p)
                }
            };
            let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
                let (h, after) = h.split_once(']').ok_or_else(|| bad("an unclosed '[' in the host"))?;
                let port = match after.strip_prefix(':') {
                    Some(p) => Some(parse_port(p).ok_or_else(|| bad("the port is not a number between 1 and 65535"))?),
                    None if after.is_empty() => None,
                    None => return Err(bad("unexpected text after the host")),
                };
                (h.to_owned(), port)
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (
                        h.to_owned(),
                        Some(parse_port(p).ok_or_else(|| bad("the port is not a number between 1 and 65535"))?),
                    ),
                    None => (hostport.to_owned(), None),
                }
            };
            let host = decode(&host).ok_or_else(|| bad("a bad % escape in the host"))?;
            let vhost = match path {
                None | Some("") => None,
                Some(p) => Some(decode(p).ok_or_else(|| bad("a bad % escape in the virtual host"))?),
            };
            (user, pass, host, port, vhost, query)
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    target.host = host;
    target.username = match user.or(username) {
        Some(u) => u,
        None => {
            return Err(ConfigError::new(at.clone(), Some("username"), "a user name is required")
                .with_hint("set `username` (and `password`), or put them in the amqp:// URI"));
        }
    };
    target.password = match pass.map(Secret::new).or(password) {
        Some(p) => p,
        None => {
            return Err(ConfigError::new(at.clone(), Some("password"), "a password is required")
                .with_hint("set `password`, or put it in the amqp:// URI"));
        }
    };
    target.port = uri_port.or(port).unwrap_or(if target.tls && url.contains("://") { 5671 } else { 5672 });
    target.vhost = vhost.unwrap_or_else(|| "/".into());
    if target.vhost.len() > 255 {
        return Err(bad("the virtual host is over 255 bytes"));
    }
    let mut ignored = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v).ok_or_else(|| bad(&format!("a bad % escape in the query parameter {k}")))?;
        match k {
            "heartbeat" => {
                target.heartbeat =
                    v.parse().map_err(|_| bad(&format!("heartbeat={v:?} is not a number of seconds (0 to 65535)")))?;
            }
            "connection_timeout" => {
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s < 1e6)
                    .ok_or_else(|| bad(&format!("connection_timeout={v:?} is not a positive number of seconds")))?;
                target.connection_timeout = Duration::from_secs_f64(secs);
            }
            "cacertfile" | "cafile" => target.ca_file = Some(PathBuf::from(v)),
            "certfile" => {
                let key = target.client_cert.take().map(|(_, k)| k).unwrap_or_default();
                target.client_cert = Some((PathBuf::from(v), key));
            }
            "keyfile" => {
                let cert = target.client_cert.take().map(|(c, _)| c).unwrap_or_default();
                target.client_cert = Some((cert, PathBuf::from(v)));
            }
            "server_name_indication" => target.server_name = Some(v),
            "verify" if v == "verify_peer" => {}
            "verify" => {
                return Err(bad(&format!("verify={v} is not supported: the server certificate is always verified")));
            }
            other => ignored.push(other.to_owned()),
        }
    }
    if let Some((c, k)) = &target.client_cert {
        if c.as_os_str().is_empty() || k.as_os_str().is_empty() {
            return Err(bad("`certfile` and `keyfile` must be given together"));
        }
    }
    if !ignored.is_empty() {
        warnings.push(("url", format!("URI query parameters not supported and ignored: {}", ignored.join(", "))));
    }
    if !target.tls && (target.ca_file.is_some() || target.client_cert.is_some()) && url.contains("://") {
        warnings.push(("url", "TLS files in an amqp:// URI have no effect; use amqps:// for TLS".into()));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_api_refuses_names_amqp_cannot_carry() {
        let ok = PikaConfig::new("localhost", 5672, "guest", "guest", vec!["q".into()]);
        assert!(ok.validate().is_ok());
        let long = "x".repeat(256);
        let bad = [
            PikaConfig::new("localhost", 5672, "guest", "guest", vec![long.clone()]),
            PikaConfig::new("localhost", 5672, "guest", "guest", vec!["q".into()]).exchange(long.clone()),
            PikaConfig::new("localhost", 5672, "guest", "guest", vec!["q".into()]).header(long.clone(), "v"),
            PikaConfig::new("localhost", 5672, &long, "guest", vec!["q".into()]),
        ];
        for config in bad {
            let err = config.validate().expect_err("over 255 bytes");
            assert!(err.to_string().contains("AMQP allows 1 to 255"), "{err}");
        }
    }
    use broker_core::ConfigValue;

    fn options(pairs: &[(&str, &str)]) -> Options {
        Options::from_pairs(pairs.iter().map(|(k, v)| (*k, ConfigValue::Str((*v).into()))))
    }

    fn uri(url: &str) -> String {
        let opts = options(&[("url", url), ("username", "test_user"), ("password", "test_pass"), ("queues", "q")]);
        PikaConfig::from_options_with_env(opts, &|_| None).unwrap().0.target.uri_with_password()
    }

    #[test]
    fn rasa_uri_cases() {
        let full = "amqp://test_user:test_pass@localhost:5672";
        assert_eq!(uri("amqp://localhost"), full);
        assert_eq!(uri("amqp://test_user:test_pass@localhost"), full);
        assert_eq!(uri("amqp://localhost:5672"), full);
        assert_eq!(uri("localhost"), full);
        let vhost = "amqp://test_user:test_pass@localhost:5672/myvhost";
        assert_eq!(uri("amqp://test_user:test_pass@localhost/myvhost?connection_timeout=10"), vhost);
        assert_eq!(uri("amqp://test_user:test_pass@localhost:5672/myvhost?connection_timeout=10"), vhost);
        // Where Rasa mangles: another port, other credentials.
        assert_eq!(uri("amqp://localhost:5673"), "amqp://test_user:test_pass@localhost:5673");
        assert_eq!(uri("amqp://other:secret@localhost"), "amqp://other:secret@localhost:5672");
    }

    #[test]
    fn percent_escapes_are_decoded() {
        let opts = options(&[("url", "amqps://us%40er:p%40ss%2Fw%3Ard@[::1]:5671/%2f?cacertfile=%2Ftmp%2Fca.pem")]);
        let (c, warnings) = PikaConfig::from_options_with_env(opts, &|_| None).unwrap();
        assert_eq!(c.target.username, "us@er");
        assert_eq!(c.target.password.expose(), "p@ss/w:rd");
        assert_eq!(c.target.host, "::1");
        assert_eq!(c.target.vhost, "/");
        assert!(c.target.tls);
        assert_eq!(c.target.ca_file.as_deref(), Some(std::path::Path::new("/tmp/ca.pem")));
        assert_eq!(c.target.describe(), "amqps://us%40er@[::1]:5671");
        assert!(!format!("{c:?}").contains("p@ss"), "{c:?}");
        assert_eq!(warnings.len(), 1, "the default queue warning: {warnings:?}");
    }

    #[test]
    fn ports_must_be_integers() {
        let opts = options(&[("url", "localhost"), ("username", "u"), ("password", "p"), ("port", "five")]);
        let err = PikaConfig::from_options_with_env(opts, &|_| None).unwrap_err();
        assert!(err.to_string().contains("Port could not be converted to integer."), "{err}");
        let opts = options(&[("url", "localhost"), ("username", "u"), ("password", "p"), ("port", "5673")]);
        assert_eq!(PikaConfig::from_options_with_env(opts, &|_| None).unwrap().0.target.port, 5673);
    }

    #[test]
    fn bad_uris_are_errors_that_do_not_show_the_password() {
        for bad in
            ["amqp://u:hunter2@host:99999", "http://u:hunter2@host", "amqp://u:hunter2%zz@host", "amqp://u:hunter2@"]
        {
            let err = PikaConfig::from_options_with_env(options(&[("url", bad)]), &|_| None).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("invalid AMQP URI") && !text.contains("hunter2"), "{bad}: {text}");
        }
        let err = PikaConfig::from_options_with_env(options(&[("url", "localhost")]), &|_| None).unwrap_err();
        assert!(err.to_string().contains("user name is required"), "{err}");
    }

    #[test]
    fn client_certificate_variables_turn_tls_on() {
        let opts = options(&[("url", "localhost"), ("username", "u"), ("password", "p"), ("queues", "q")]);
        let env = |k: &str| match k {
            "RABBITMQ_SSL_CLIENT_CERTIFICATE" => Some("/c.pem".to_owned()),
            "RABBITMQ_SSL_CLIENT_KEY" => Some("/k.pem".to_owned()),
            "RABBITMQ_SSL_CA_FILE" => Some("/ca.pem".to_owned()),
            "RASA_ENVIRONMENT" => Some("production".to_owned()),
            _ => None,
        };
        let (c, warnings) = PikaConfig::from_options_with_env(opts, &env).unwrap();
        assert!(c.target.tls);
        assert_eq!(c.target.client_cert, Some(("/c.pem".into(), "/k.pem".into())));
        assert_eq!(c.app_id.as_deref(), Some("production"));
        assert!(warnings.iter().any(|w| w.message.contains("RABBITMQ_SSL_CA_FILE")), "{warnings:?}");
    }
}
