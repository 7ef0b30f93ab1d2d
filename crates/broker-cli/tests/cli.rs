//! The `broker` binary end to end, on real files in a temporary working directory.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const SAMPLE: &str = include_str!("../../broker-testkit/data/rasa-events-sample.jsonl");

fn broker(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_owned();
        std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn publish_then_tail_gives_back_rasas_bytes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), SAMPLE).unwrap();
    let out = broker(dir.path(), &["publish", "in.jsonl"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("embedded default"), "{}", stderr(&out));
    assert!(stderr(&out).contains("read 106 events, delivered 106, failed 0"), "{}", stderr(&out));
    assert!(dir.path().join("events.db").exists(), "the embedded default is SQLite events.db");

    let out = broker(dir.path(), &["tail", "--from-beginning", "--timeout", "0.5"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), SAMPLE);

    let out = broker(dir.path(), &["tail", "--from-beginning", "--limit", "2"], None);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        SAMPLE.lines().take(2).map(|l| format!("{l}\n")).collect::<String>()
    );
}

#[test]
fn an_invalid_line_stops_after_delivering_what_came_before() {
    let dir = tempfile::tempdir().unwrap();
    let input = "{\"sender_id\": \"a\", \"event\": \"restart\", \"timestamp\": 1.0}\n[1, 2]\n{\"sender_id\": \"a\", \"event\": \"undo\", \"timestamp\": 2.0}\n";
    std::fs::write(dir.path().join("endpoints.yml"), "event_broker:\n  type: file\n").unwrap();
    let out = broker(dir.path(), &["publish"], Some(input));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("<stdin>:2: invalid event: an event must be a JSON object"), "{}", stderr(&out));
    let written = std::fs::read_to_string(dir.path().join("rasa_event.log")).unwrap();
    assert_eq!(written, "{\"sender_id\": \"a\", \"event\": \"restart\", \"timestamp\": 1.0}\n");

    let out = broker(dir.path(), &["publish", "--skip-invalid", "-"], Some(input));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("skipped <stdin>:2"), "{}", stderr(&out));
    assert!(stderr(&out).contains("delivered 2, failed 0, undelivered 0, skipped 1 invalid lines"), "{}", stderr(&out));
}

#[test]
fn endpoints_file_is_used_and_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), "event_broker:\n  type: file\n  path: custom.log\n").unwrap();
    let out = broker(dir.path(), &["check"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ready: file custom.log\n");
    assert!(!stderr(&out).contains("embedded default"));

    std::fs::write(dir.path().join("bad.yml"), "event_broker:\n  type: file\n  path: x.log\n  fsync: sometimes\n")
        .unwrap();
    let out = broker(dir.path(), &["--endpoints", "bad.yml", "check"], None);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "one clear line: {}", stderr(&out));
    assert!(stderr(&out).starts_with("error: bad.yml:4:10: `fsync`: \"sometimes\" is not allowed"), "{}", stderr(&out));

    std::fs::write(dir.path().join("none.yml"), "nlg:\n  url: http://localhost:5055/nlg\n").unwrap();
    let out = broker(dir.path(), &["--endpoints", "none.yml", "publish"], Some(""));
    assert!(stderr(&out).contains("none.yml has no event_broker section"), "{}", stderr(&out));
    assert!(!out.status.success());

    let out = broker(dir.path(), &["--endpoints", "missing.yml", "check"], None);
    assert!(stderr(&out).contains("missing.yml does not exist"), "{}", stderr(&out));
}

#[test]
fn check_fails_when_the_broker_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), "event_broker:\n  type: file\n  path: no/such/dir/x.log\n")
        .unwrap();
    let out = broker(dir.path(), &["check"], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not ready: file no/such/dir/x.log"), "{}", stderr(&out));
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [&["--help"][..], &["publish", "--help"], &["tail", "--help"], &["check", "--help"], &["--version"]] {
        let out = broker(dir.path(), cmd, None);
        assert!(out.status.success(), "{cmd:?}");
        assert!(!out.stdout.is_empty());
    }
}

/// With RabbitMQ (`type: pika`, Rasa's no-type section): what `publish` sends, `tail` gives back
/// byte for byte, and its acknowledgements stick (a second `tail` finds the queue empty).
#[test]
fn publish_then_tail_through_rabbitmq() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Some(service) = runtime.block_on(broker_testkit::services::rabbitmq("publish_then_tail_through_rabbitmq"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let suffix = broker_testkit::services::unique_suffix();
    let (queue, exchange) = (format!("q-{suffix}"), format!("x-cli-{suffix}"));
    let endpoints =
        format!("event_broker:\n  url: {}\n  queues: [{queue}]\n  exchange_name: {exchange}\n", service.url);
    std::fs::write(dir.path().join("endpoints.yml"), endpoints).unwrap();
    std::fs::write(dir.path().join("in.jsonl"), SAMPLE).unwrap();
    let out = broker(dir.path(), &["publish", "in.jsonl"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("delivered 106, failed 0"), "{}", stderr(&out));

    let out = broker(dir.path(), &["tail", "--from-beginning", "--limit", "106", "--timeout", "10"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), SAMPLE, "Rasa's bytes, in order");
    let out = broker(dir.path(), &["tail", "--timeout", "1"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "acknowledged events do not come again: {}", String::from_utf8_lossy(&out.stdout));
    // The queue is durable and would outlive the test: remove it.
    let out = Command::new("rabbitmqctl").args(["-q", "delete_queue", &queue]).output();
    if !out.is_ok_and(|o| o.status.success()) {
        eprintln!("note: could not delete the queue {queue} (rabbitmqctl unavailable)");
    }
}
