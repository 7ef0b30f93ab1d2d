//! `type: kafka` options (docs/rasa-compat.md §3) and ours.

use std::time::Duration;

use broker_core::{ConfigError, ConfigValue, DeliveryOptions, Options, Secret, Warning, WhenFull};

pub(crate) const NAME: &str = "kafka";

/// Rasa's default topic.
pub const DEFAULT_TOPIC: &str = "rasa_core_events";

/// `security_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    Plaintext,
    /// SASL without TLS (Rasa's default).
    SaslPlaintext,
    /// TLS.
    Ssl,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    fn librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn sasl(self) -> bool {
        matches!(self, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl)
    }

    fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

/// SASL credentials. `Debug` shows the user and mechanism, never the password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sasl {
    /// `sasl_mechanism` in librdkafka's spelling (`PLAIN`, `SCRAM-SHA-512`, ...).
    pub mechanism: &'static str,
    /// `sasl_username`.
    pub username: String,
    /// `sasl_password`.
    pub password: Secret,
    /// `sasl_kerberos_service_name` (GSSAPI).
    pub kerberos_service_name: Option<String>,
}

impl std::fmt::Debug for Sasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Settings of the Kafka backend. `Debug` shows the `librdkafka:` settings by name only: their
/// values may be secrets (`sasl.password`, `ssl.key.password`).
#[derive(Clone)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub bootstrap: String,
    /// The topic.
    pub topic: String,
    /// `client.id`.
    pub client_id: Option<String>,
    /// Key each message by its `sender_id`, so a conversation stays on one partition.
    pub partition_by_sender: bool,
    /// `security_protocol`.
    pub security_protocol: SecurityProtocol,
    /// SASL, for the SASL protocols.
    pub sasl: Option<Sasl>,
    /// `ssl_cafile`.
    pub ssl_cafile: Option<String>,
    /// `ssl_certfile`.
    pub ssl_certfile: Option<String>,
    /// `ssl_keyfile` (a path; its content is never read by us nor shown).
    pub ssl_keyfile: Option<String>,
    /// Verify the broker's host name (on unless `ssl_check_hostname: false`).
    pub ssl_check_hostname: bool,
    /// `queue_size` (`queue.buffering.max.messages`), else `buffer_size`.
    pub queue_size: Option<u64>,
    /// Create the topic at start when it is missing: (partitions, replication factor).
    pub create_topic: Option<(i32, i32)>,
    /// How long librdkafka keeps trying one message (`message_timeout`, seconds; 0, the
    /// default, means until delivered: an outage makes events wait, never fail).
    pub message_timeout: Duration,
    /// Larger events fail alone (`max_event_bytes` → `message.max.bytes`).
    pub max_event_bytes: Option<u64>,
    /// Extra librdkafka settings, passed through as given (`librdkafka:` mapping).
    pub extra: Vec<(String, String)>,
    /// Buffer bound and policy, close deadline.
    pub delivery: DeliveryOptions,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: Vec<String> = self.extra.iter().map(|(k, _)| format!("{k}=***")).collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("topic", &self.topic)
            .field("client_id", &self.client_id)
            .field("partition_by_sender", &self.partition_by_sender)
            .field("security_protocol", &self.security_protocol)
            .field("sasl", &self.sasl)
            .field("ssl_cafile", &self.ssl_cafile)
            .field("ssl_certfile", &self.ssl_certfile)
            .field("ssl_keyfile", &self.ssl_keyfile)
            .field("ssl_check_hostname", &self.ssl_check_hostname)
            .field("queue_size", &self.queue_size)
            .field("create_topic", &self.create_topic)
            .field("message_timeout", &self.message_timeout)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("librdkafka", &extra)
            .field("delivery", &self.delivery)
            .finish()
    }
}

impl KafkaConfig {
    /// The option keys `type: kafka` accepts.
    pub const KEYS: &'static [&'static str] = &[
        "url",
        "topic",
        "client_id",
        "partition_by_sender",
        "security_protocol",
        "sasl_username",
        "sasl_password",
        "sasl_mechanism",
        "sasl_kerberos_service_name",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "queue_size",
        "create_topic",
        "partitions",
        "replication_factor",
        "message_timeout",
        "max_event_bytes",
        "librdkafka",
        "buffer_size",
        "when_full",
        "close_timeout",
    ];

    /// PLAINTEXT to `bootstrap`, topic `topic`, other settings at their defaults.
    pub fn plaintext(bootstrap: impl Into<String>, topic: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            bootstrap: bootstrap.into(),
            topic: topic.into(),
            client_id: None,
            partition_by_sender: false,
            security_protocol: SecurityProtocol::Plaintext,
            sasl: None,
            ssl_cafile: None,
            ssl_certfile: None,
            ssl_keyfile: None,
            ssl_check_hostname: true,
            queue_size: None,
            create_topic: None,
            message_timeout: Duration::ZERO,
            max_event_bytes: None,
            extra: Vec::new(),
            delivery: DeliveryOptions::default(),
        }
    }

    /// Keys messages by `sender_id`.
    pub fn partition_by_sender(mut self, on: bool) -> KafkaConfig {
        self.partition_by_sender = on;
        self
    }

    /// Creates the topic at start when missing.
    pub fn create_topic(mut self, partitions: i32, replication: i32) -> KafkaConfig {
        self.create_topic = Some((partitions, replication));
        self
    }

    /// Sets the size limit per event.
    pub fn max_event_bytes(mut self, bytes: u64) -> KafkaConfig {
        self.max_event_bytes = Some(bytes);
        self
    }

    /// Sets the delivery options.
    pub fn delivery(mut self, delivery: DeliveryOptions) -> KafkaConfig {
        self.delivery = delivery;
        self
    }

    /// Reads the options of an `event_broker:` section.
    pub fn from_options(mut options: Options) -> Result<(KafkaConfig, Vec<Warning>), ConfigError> {
        // Rasa Pro keys we do not implement: named in a warning, never silently ignored.
        options.ignore_with_warning(
            &["stream_pii", "anonymization_topics", "partition_key"],
            "a Rasa Pro feature this broker does not implement",
        );
        let section = options.section.clone();
        let url_at = options.location("url");
        let bootstrap = match options.take_value("url") {
            None => {
                return Err(ConfigError::new(section, Some("url"), "a bootstrap address is required")
                    .with_hint("e.g. `url: localhost:9092` or a list of host:port"));
            }
            Some(v) => match v.value {
                ConfigValue::Str(s) => s,
                ConfigValue::List(items) => items
                    .into_iter()
                    .map(|i| match i.value {
                        ConfigValue::Str(s) => Ok(s),
                        ConfigValue::Int(n) => Ok(n.to_string()),
                        _ => Err(ConfigError::new(i.at, Some("url"), "each bootstrap address must be a string")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                _ => {
                    return Err(ConfigError::new(
                        url_at,
                        Some("url"),
                        "expected host:port, a comma-separated string or a list",
                    ));
                }
            },
        };
        if bootstrap.trim().is_empty() {
            return Err(ConfigError::new(url_at, Some("url"), "a bootstrap address is required"));
        }
        let mut config = KafkaConfig::plaintext(bootstrap, DEFAULT_TOPIC);
        if let Some(t) = options.take_str("topic")? {
            config.topic = t;
        }
        config.client_id = options.take_str("client_id")?;
        config.partition_by_sender = options.take_bool("partition_by_sender")?.unwrap_or(false);
        let protocol = options
            .take_choice("security_protocol", &["PLAINTEXT", "SASL_PLAINTEXT", "SSL", "SASL_SSL"])?
            .unwrap_or("SASL_PLAINTEXT");
        config.security_protocol = match protocol {
            "PLAINTEXT" => SecurityProtocol::Plaintext,
            "SASL_PLAINTEXT" => SecurityProtocol::SaslPlaintext,
            "SSL" => SecurityProtocol::Ssl,
            _ => SecurityProtocol::SaslSsl,
        };
        let mechanism_at = options.location("sasl_mechanism");
        let mechanism = options
            .take_choice("sasl_mechanism", &["PLAIN", "GSSAPI", "OAUTHBEARER", "SCRAM-SHA-256", "SCRAM-SHA-512"])?;
        let username = options.take_str("sasl_username")?;
        let password = options.take_secret("sasl_password")?;
        let kerberos = options.take_str("sasl_kerberos_service_name")?;
        if config.security_protocol.sasl() {
            let mechanism = mechanism.unwrap_or("PLAIN");
            if mechanism == "GSSAPI" && !cfg!(feature = "gssapi") {
                return Err(ConfigError::new(mechanism_at, Some("sasl_mechanism"), "GSSAPI is not built in")
                    .with_hint("enable the cargo feature `gssapi` of broker-kafka (needs libsasl2-dev)"));
            }
            let needs_credentials = mechanism != "GSSAPI" && mechanism != "OAUTHBEARER";
            let (username, password) = match (username, password) {
                (Some(u), Some(p)) => (u, p),
                (u, p) if !needs_credentials => (u.unwrap_or_default(), p.unwrap_or_else(|| Secret::new(""))),
                _ => {
                    return Err(ConfigError::new(
                        options.section.clone(),
                        Some("sasl_username"),
                        format!("{protocol} with {mechanism} needs `sasl_username` and `sasl_password`"),
                    )
                    .with_hint("or set `security_protocol: PLAINTEXT` (Rasa's default is SASL_PLAINTEXT)"));
                }
            };
            config.sasl = Some(Sasl { mechanism, username, password, kerberos_service_name: kerberos });
        } else if username.is_some() || password.is_some() {
            options.warn("sasl_username", format!("SASL credentials have no effect with security_protocol {protocol}"));
        }
        config.ssl_cafile = options.take_str("ssl_cafile")?;
        config.ssl_certfile = options.take_str("ssl_certfile")?;
        config.ssl_keyfile = options.take_str("ssl_keyfile")?;
        if let Some(check) = options.take_bool("ssl_check_hostname")? {
            config.ssl_check_hostname = check;
            if !check {
                options.warn(
                    "ssl_check_hostname",
                    "host name verification is off: any certificate from the CA is accepted",
                );
            }
        }
        if !config.security_protocol.tls() && (config.ssl_cafile.is_some() || config.ssl_certfile.is_some()) {
            options.warn("ssl_cafile", format!("TLS files have no effect with security_protocol {protocol}"));
        }
        config.queue_size = options.take_u64("queue_size")?;
        let mut count = |key: &str| -> Result<Option<i32>, ConfigError> {
            let at = options.location(key);
            match options.take_u64(key)? {
                None => Ok(None),
                Some(n) => match i32::try_from(n) {
                    Ok(n) if n >= 1 => Ok(Some(n)),
                    _ => Err(ConfigError::new(at, Some(key), format!("{n} is out of range"))
                        .with_hint("between 1 and 2147483647")),
                },
            }
        };
        let partitions = count("partitions")?;
        let replication = count("replication_factor")?;
        if options.take_bool("create_topic")?.unwrap_or(false) {
            config.create_topic = Some((partitions.unwrap_or(1), replication.unwrap_or(1)));
        } else if partitions.is_some() || replication.is_some() {
            options.warn("partitions", "`partitions`/`replication_factor` only apply with `create_topic: true`");
        }
        if let Some(t) = options.take_seconds("message_timeout")? {
            config.message_timeout = t;
        }
        config.max_event_bytes = options.take_u64("max_event_bytes")?;
        if let Some(v) = options.take_value("librdkafka") {
            let ConfigValue::Map(entries) = v.value else {
                return Err(ConfigError::new(v.at, Some("librdkafka"), "expected a mapping of librdkafka settings"));
            };
            for (k, v) in entries {
                let value = match v.value {
                    ConfigValue::Str(s) => s,
                    ConfigValue::Int(i) => i.to_string(),
                    ConfigValue::Float(f) => f.to_string(),
                    ConfigValue::Bool(b) => b.to_string(),
                    _ => return Err(ConfigError::new(v.at, Some("librdkafka"), format!("`{k}` must be a scalar"))),
                };
                // librdkafka checks the name and the value without connecting; its message names
                // the property, and the value is left out (it may be a secret).
                let mut probe = rdkafka::ClientConfig::new();
                probe.set(&k, &value);
                if let Err(e) = probe.create_native_config() {
                    // librdkafka's text quotes the value: masked, it may be a secret.
                    let why = match e {
                        rdkafka::error::KafkaError::ClientConfig(_, desc, _, _) if !value.is_empty() => {
                            desc.replace(&value, "***")
                        }
                        rdkafka::error::KafkaError::ClientConfig(_, desc, _, _) => desc,
                        _ => "librdkafka refuses it".to_owned(),
                    };
                    return Err(ConfigError::new(v.at, Some("librdkafka"), format!("`{k}`: {why}"))
                        .with_hint("a librdkafka property (CONFIGURATION.md) and a valid value for it"));
                }
                config.extra.push((k, value));
            }
        }
        config.delivery = DeliveryOptions::take(&mut options)?;
        let warnings = options.finish(NAME, KafkaConfig::KEYS)?;
        Ok((config, warnings))
    }

    /// The librdkafka settings shared by producer, consumer and admin client.
    pub(crate) fn client_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c.set("security.protocol", self.security_protocol.librdkafka());
        if let Some(id) = &self.client_id {
            c.set("client.id", id);
        }
        if let Some(s) = &self.sasl {
            c.set("sasl.mechanism", s.mechanism);
            if !s.username.is_empty() {
                c.set("sasl.username", &s.username);
                c.set("sasl.password", s.password.expose());
            }
            if let Some(k) = &s.kerberos_service_name {
                c.set("sasl.kerberos.service.name", k);
            }
        }
        if let Some(ca) = &self.ssl_cafile {
            c.set("ssl.ca.location", ca);
        }
        if let Some(cert) = &self.ssl_certfile {
            c.set("ssl.certificate.location", cert);
        }
        if let Some(key) = &self.ssl_keyfile {
            c.set("ssl.key.location", key);
        }
        c.set("ssl.endpoint.identification.algorithm", if self.ssl_check_hostname { "https" } else { "none" });
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// librdkafka's statistics, which become metrics (crate::stats), for the long-lived
    /// clients (producer, consumer); a `librdkafka:` setting of the interval wins.
    pub(crate) fn with_statistics(&self, c: &mut rdkafka::ClientConfig) {
        if !self.extra.iter().any(|(k, _)| k == "statistics.interval.ms") {
            c.set("statistics.interval.ms", crate::stats::INTERVAL_MS);
        }
    }

    /// The producer settings: `acks=all` and idempotence, so order per key survives retries.
    pub(crate) fn producer_config(&self) -> rdkafka::ClientConfig {
        let mut c = self.client_config();
        self.with_statistics(&mut c);
        c.set("acks", "all");
        c.set("enable.idempotence", "true");
        // librdkafka (2.10+) sends the producer-id request only over the connection to a broker
        // it learned from metadata, and opens that connection after a random part of
        // `reconnect.backoff.ms / 2` (sparse connections): 50 ms of every start with the default
        // 100 ms, in which no event goes out. 10 ms (then doubling, with jitter, up to
        // `reconnect.backoff.max.ms`, 10 s) makes a 1,000-event `broker publish` about 35 ms
        // faster and adds a handful of attempts in the first second of an outage.
        c.set("reconnect.backoff.ms", "10");
        c.set("message.timeout.ms", self.message_timeout.as_millis().min(i32::MAX as u128).to_string());
        let queue = self.queue_size.unwrap_or(self.delivery.buffer_size as u64);
        c.set("queue.buffering.max.messages", queue.to_string());
        if self.partition_by_sender {
            // librdkafka's default (consistent_random) places an empty key, like a null one, on a
            // random partition, which breaks order for `sender_id: ""`. `consistent` is the same
            // CRC32 placement for every other key (so Rasa's producers agree) and keeps empty
            // keys on one partition.
            c.set("partitioner", "consistent");
        }
        if let Some(max) = self.max_event_bytes {
            c.set("message.max.bytes", max.to_string());
        }
        // Extra settings last: an explicit librdkafka setting wins over ours.
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// Whether a full queue blocks (`when_full: block`).
    pub(crate) fn blocks_when_full(&self) -> bool {
        self.delivery.when_full == WhenFull::Block
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::{ConfigValue, Spanned};

    fn with_librdkafka(entries: Vec<(&str, &str)>) -> Options {
        let map = entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Spanned { value: ConfigValue::Str(v.into()), at: Default::default() }))
            .collect();
        Options::from_pairs([
            ("url", ConfigValue::Str("127.0.0.1:9092".into())),
            ("security_protocol", ConfigValue::Str("PLAINTEXT".into())),
            ("librdkafka", ConfigValue::Map(map)),
        ])
    }

    #[test]
    fn debug_never_shows_librdkafka_values() {
        let (config, _) = KafkaConfig::from_options(with_librdkafka(vec![("sasl.password", "hunter2")])).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && shown.contains("sasl.password"), "{shown}");
    }

    #[test]
    fn librdkafka_settings_are_checked_at_configuration_time() {
        let err = KafkaConfig::from_options(with_librdkafka(vec![("no.such.property", "1")])).unwrap_err();
        assert!(err.to_string().contains("no.such.property"), "{err}");
        let err = KafkaConfig::from_options(with_librdkafka(vec![("linger.ms", "hunter2")])).unwrap_err();
        assert!(err.to_string().contains("linger.ms") && !err.to_string().contains("hunter2"), "{err}");
        assert!(KafkaConfig::from_options(with_librdkafka(vec![("linger.ms", "5")])).is_ok());
    }

    #[test]
    fn partition_counts_out_of_range_are_errors_not_casts() {
        let options = Options::from_pairs([
            ("url", ConfigValue::Str("127.0.0.1:9092".into())),
            ("security_protocol", ConfigValue::Str("PLAINTEXT".into())),
            ("create_topic", ConfigValue::Bool(true)),
            ("partitions", ConfigValue::Int(4_294_967_297)),
        ]);
        let err = KafkaConfig::from_options(options).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }
}
