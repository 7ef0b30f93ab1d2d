//! endpoints.yml handling, including Rasa's own test endpoint files (docs/rasa-compat.md §8).

use std::path::{Path, PathBuf};

use broker_config::{configure, default_registry, load, parse_with_env, read_file};
use broker_core::{ConfigError, ConfigValue};

fn rasa(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rasa-endpoints").join(name)
}

fn parse(yaml: &str) -> Result<Option<broker_config::BrokerSection>, ConfigError> {
    let env = |n: &str| match n {
        "EVENTS_DIR" => Some("/var/events".to_owned()),
        "PORT" => Some("5673".to_owned()),
        _ => None,
    };
    parse_with_env(yaml, Some(Path::new("endpoints.yml")), &env)
}

fn build(yaml: &str) -> Result<broker_core::Configured, ConfigError> {
    configure(parse(yaml)?.expect("a section"), &default_registry())
}

#[test]
fn rasa_file_endpoint() {
    let c = load(&rasa("file_endpoint.yml"), &default_registry()).unwrap().unwrap();
    assert_eq!(c.backend.describe(), "file rasa_event.log");
    assert!(c.warnings.is_empty());
}

#[test]
fn rasa_files_without_a_broker() {
    assert!(read_file(&rasa("example_endpoints.yml")).unwrap().is_none());
    assert!(read_file(&rasa("does_not_exist.yml")).unwrap().is_none());
    assert!(parse("event_broker:\n").unwrap().is_none());
    assert!(parse("event_broker: null\nnlg:\n  url: x\n").unwrap().is_none());
    assert!(parse("").unwrap().is_none());
}

#[test]
fn rasa_types_are_read_for_every_file() {
    let cases = [
        ("pika_endpoint.yml", "pika"),
        ("event_broker_endpoint.yml", "pika"),
        ("connexion_error_pika_endpoint.yml", "pika"),
        ("sql_endpoint.yml", "sql"),
        ("connexion_error_sql_endpoint.yml", "sql"),
        ("kafka_plaintext_endpoint.yml", "kafka"),
        ("kafka_plaintext_endpoint_no_url.yml", "kafka"),
        ("kafka_sasl_plaintext_endpoint.yml", "kafka"),
        ("kafka_sasl_ssl_endpoint.yml", "kafka"),
        ("kafka_ssl_endpoint.yml", "kafka"),
        ("kafka_invalid_security_protocol.yml", "kafka"),
        ("kafka_invalid_sasl_mechanism.yml", "kafka"),
        ("kafka_lower_case_sasl_mechanism.yml", "kafka"),
        ("kafka_pii_endpoint.yml", "kafka"),
        ("kafka_sasl_plaintext_gssapi_endpoint.yml", "kafka"),
        ("file_endpoint.yml", "file"),
    ];
    for (file, want) in cases {
        let section = read_file(&rasa(file)).unwrap().unwrap_or_else(|| panic!("{file}: no section"));
        assert_eq!(section.type_name, want, "{file}");
    }
}

#[test]
fn types_this_release_lacks_say_so_clearly() {
    let mut files = vec![];
    if cfg!(not(feature = "pika")) {
        files.push("pika_endpoint.yml");
    }
    if cfg!(not(feature = "kafka")) {
        files.push("kafka_plaintext_endpoint.yml");
    }
    if cfg!(not(feature = "sql")) {
        files.push("sql_endpoint.yml");
    }
    for file in files {
        let err = load(&rasa(file), &default_registry()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("is not built in"), "{file}: {text}");
        assert!(
            text.contains(&format!("{file}:")) && text.contains("`type`"),
            "{file}: names file, line and key: {text}"
        );
    }
}

#[test]
fn type_is_case_insensitive_and_store_type_wins() {
    assert_eq!(build("event_broker:\n  type: FILE\n  path: a.log\n").unwrap().backend.describe(), "file a.log");
    let c = build("event_broker:\n  type: kafka\n  store_type: File\n  path: b.log\n").unwrap();
    assert_eq!(c.backend.describe(), "file b.log");
    assert!(c.warnings.iter().any(|w| w.message.contains("`type` is ignored")));
}

#[test]
fn unknown_types_list_the_registered_ones() {
    let err = build("event_broker:\n  type: my_module.MyBroker\n").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unknown event broker type \"my_module.mybroker\""), "{text}");
    assert!(text.contains("registered types: memory, file"), "{text}");
    assert!(text.starts_with("endpoints.yml:2:9"), "{text}");
}

#[test]
fn environment_variables_in_unquoted_values_only() {
    let c = build("event_broker:\n  type: file\n  path: ${EVENTS_DIR}/rasa_${PORT}.log\n").unwrap();
    assert_eq!(c.backend.describe(), "file /var/events/rasa_5673.log");
    let c = build("event_broker:\n  type: file\n  path: \"${EVENTS_DIR}/x.log\"\n").unwrap();
    assert_eq!(c.backend.describe(), "file ${EVENTS_DIR}/x.log");
    // The result is a string that still works as a number.
    let mut s = parse("event_broker:\n  port: ${PORT}\n  queues:\n    - q_${PORT}\n").unwrap().unwrap();
    assert_eq!(s.options.take_u64("port").unwrap(), Some(5673));
    assert_eq!(s.options.take_str_list("queues").unwrap(), Some(vec!["q_5673".to_owned()]));
    let err = parse("event_broker:\n  type: file\n  path: ${NOT_SET_ANYWHERE}\n").unwrap_err();
    assert!(err.to_string().contains("`NOT_SET_ANYWHERE` is not set"), "{err}");
    assert!(err.to_string().starts_with("endpoints.yml:3:9"), "{err}");
}

#[test]
fn unknown_keys_are_errors_with_a_hint_and_position() {
    let err = build("event_broker:\n  type: file\n  paht: x.log\n").unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("endpoints.yml:3:3: `paht`: unknown key for the file event broker"), "{text}");
    assert!(text.contains("did you mean `path`?"), "{text}");
}

#[test]
fn generic_endpoint_keys_warn_instead() {
    let c = build("event_broker:\n  type: file\n  token: abc\n").unwrap();
    assert!(c.warnings.iter().any(|w| w.message.contains("`token` has no effect")), "{:?}", c.warnings);
}

#[test]
fn yaml_1_2_scalars_and_strict_booleans() {
    let mut s = parse("event_broker:\n  a: True\n  b: yes\n  c: \"false\"\n  d: 1.5\n").unwrap().unwrap();
    assert_eq!(s.options.take_bool("a").unwrap(), Some(true));
    assert_eq!(s.options.take_str("b").unwrap(), Some("yes".into()));
    let err = s.options.take_bool("c").unwrap_err();
    assert!(err.to_string().contains("endpoints.yml:4:6: `c`: expected a boolean"), "{err}");
    assert_eq!(s.options.take_value("d").unwrap().value, ConfigValue::Float(1.5));
}

#[test]
fn bad_yaml_and_duplicates_name_the_position() {
    let err = parse("event_broker:\n  type: file\n  path: [unclosed\n").unwrap_err();
    assert!(err.to_string().starts_with("endpoints.yml:"), "{err}");
    assert!(err.to_string().contains("invalid YAML"), "{err}");
    let err = parse("event_broker:\n  type: file\n  type: sql\n").unwrap_err();
    assert!(err.to_string().contains("endpoints.yml:3:3: `type`: duplicate key"), "{err}");
}

#[test]
fn secrets_never_appear_in_errors_or_debug() {
    let s = parse("event_broker:\n  type: file\n  password: hunter2\n").unwrap().unwrap();
    assert!(!format!("{s:?}").contains("hunter2"));
    let err = configure(s, &default_registry()).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[cfg(feature = "sql")]
#[test]
fn rasa_sql_endpoints() {
    let c = load(&rasa("sql_endpoint.yml"), &default_registry()).unwrap().unwrap();
    assert_eq!(c.backend.describe(), "sql sqlite :memory: table events");
    // Configured without connecting (the address is not on loopback, so no test connects to it).
    let c = load(&rasa("connexion_error_sql_endpoint.yml"), &default_registry()).unwrap().unwrap();
    assert_eq!(c.backend.describe(), "sql postgresql://user@0.0.0.0:42/boom table events");
    assert!(!format!("{:?}", c.backend).contains("pw"));
}

#[cfg(feature = "kafka")]
#[test]
fn rasa_kafka_endpoints() {
    let registry = default_registry();
    let ok = |file: &str| load(&rasa(file), &registry).unwrap_or_else(|e| panic!("{file}: {e}")).unwrap();
    let err = |file: &str| load(&rasa(file), &registry).err().unwrap_or_else(|| panic!("{file} must fail")).to_string();

    let c = ok("kafka_plaintext_endpoint.yml");
    assert_eq!(c.backend.describe(), "kafka localhost topic topic");
    let c = ok("kafka_sasl_plaintext_endpoint.yml");
    assert!(!format!("{:?}", c.backend).contains("password\""), "no secret in Debug");
    ok("kafka_ssl_endpoint.yml");
    ok("kafka_sasl_ssl_endpoint.yml");
    let c = ok("kafka_lower_case_sasl_mechanism.yml");
    assert!(format!("{:?}", c.backend).contains("SCRAM-SHA-512"), "{:?}", c.backend);

    let text = err("kafka_invalid_security_protocol.yml");
    // The file has no url either; the protocol is checked first only when a url is present, so
    // accept either clear error here, and check the protocol error on its own below.
    assert!(text.contains("bootstrap address is required") || text.contains("SOMETHING"), "{text}");
    let text = err("kafka_invalid_sasl_mechanism.yml");
    assert!(text.contains("\"SOMETHING\" is not allowed") && text.contains("sasl_mechanism"), "{text}");
    let text = err("kafka_plaintext_endpoint_no_url.yml");
    assert!(text.contains("`url`: a bootstrap address is required"), "{text}");

    let c = ok("kafka_pii_endpoint.yml");
    let warned: Vec<String> = c.warnings.iter().map(|w| w.message.clone()).collect();
    assert!(
        warned.iter().any(|w| w.contains("stream_pii")) && warned.iter().any(|w| w.contains("anonymization_topics")),
        "{warned:?}"
    );

    // Accepted when broker-kafka's `gssapi` feature is built, else a clear error naming it.
    if let Err(e) = load(&rasa("kafka_sasl_plaintext_gssapi_endpoint.yml"), &registry) {
        let text = e.to_string();
        assert!(text.contains("GSSAPI is not built in") && text.contains("`gssapi`"), "{text}");
    }

    let section =
        parse("event_broker:\n  type: kafka\n  url: [a:1, b:2]\n  security_protocol: something\n").unwrap().unwrap();
    let text = configure(section, &registry).unwrap_err().to_string();
    assert!(
        text.contains("\"something\" is not allowed") && text.contains("PLAINTEXT, SASL_PLAINTEXT, SSL, SASL_SSL"),
        "{text}"
    );
    let section = parse("event_broker:\n  type: kafka\n  url: localhost\n").unwrap().unwrap();
    let text = configure(section, &registry).unwrap_err().to_string();
    assert!(
        text.contains("needs `sasl_username` and `sasl_password`"),
        "Rasa's default protocol is SASL_PLAINTEXT: {text}"
    );
}

#[cfg(feature = "pika")]
#[test]
fn rasa_pika_endpoints() {
    let registry = default_registry();
    let ok = |file: &str| load(&rasa(file), &registry).unwrap_or_else(|e| panic!("{file}: {e}")).unwrap();

    let c = ok("pika_endpoint.yml");
    assert_eq!(c.backend.describe(), "pika amqp://username@localhost:5672 exchange exchange queues queue-1");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let debug = format!("{:?}", c.backend);
    assert!(debug.contains("connection_attempts: 20") && debug.contains("retry_delay: 5s"), "{debug}");
    assert!(!debug.contains("password\""), "no secret in Debug: {debug}");

    // No type: pika; the legacy `queue` key is named in a warning and Rasa's default queue used.
    let c = ok("event_broker_endpoint.yml");
    assert_eq!(
        c.backend.describe(),
        "pika amqp://username@localhost:5672 exchange rasa-exchange queues rasa_core_events"
    );
    let warned: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    assert!(warned.iter().any(|w| w.contains("`queue` is not supported")), "{warned:?}");
    assert!(warned.iter().any(|w| w.contains("no `queues` given")), "{warned:?}");

    let c = ok("connexion_error_pika_endpoint.yml");
    let debug = format!("{:?}", c.backend);
    assert!(debug.contains("connection_attempts: 1") && debug.contains("retry_delay: 0ns"), "{debug}");

    // A string port works; anything else is Rasa's message, with the file and line.
    let section =
        parse("event_broker:\n  url: localhost\n  username: u\n  password: p\n  queues: q\n  port: \"5673\"\n")
            .unwrap()
            .unwrap();
    assert_eq!(
        configure(section, &registry).unwrap().backend.describe(),
        "pika amqp://u@localhost:5673 exchange rasa-exchange queues q"
    );
    let section =
        parse("event_broker:\n  url: localhost\n  username: u\n  password: p\n  port: abc\n").unwrap().unwrap();
    let text = configure(section, &registry).unwrap_err().to_string();
    assert!(text.contains("Port could not be converted to integer.") && text.starts_with("endpoints.yml:5:"), "{text}");
    // Pro keys are named in warnings; booleans are strict.
    let section = parse(
        "event_broker:\n  url: localhost\n  username: u\n  password: p\n  queues: [q]\n  anonymization_queues: [a]\n",
    )
    .unwrap()
    .unwrap();
    let c = configure(section, &registry).unwrap();
    assert!(c.warnings.iter().any(|w| w.message.contains("anonymization_queues")), "{:?}", c.warnings);
    let section = parse(
        "event_broker:\n  url: localhost\n  username: u\n  password: p\n  queues: [q]\n  raise_on_failure: \"false\"\n",
    )
    .unwrap()
    .unwrap();
    let text = configure(section, &registry).unwrap_err().to_string();
    assert!(text.contains("raise_on_failure") && text.contains("expected a boolean"), "{text}");
}
