//! The `broker` binary end to end, on real files in a temporary working directory.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;

use common::*;

const SAMPLE: &str = broker_testkit::RASA_SAMPLE;

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

    // --until-end stops once caught up (no --timeout needed); --format envelope wraps each
    // event's unchanged bytes with its position.
    let out = broker(dir.path(), &["tail", "--from-beginning", "--until-end", "--format", "envelope"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 106);
    for (i, (line, event)) in lines.iter().zip(SAMPLE.lines()).enumerate() {
        let want =
            format!("{{\"position\": {{\"row\": {}}}, \"key\": null, \"headers\": {{}}, \"event\": {event}}}", i + 1);
        assert_eq!(*line, want);
    }

    // `check` names what it opened and the SQLite library's version.
    let out = broker(dir.path(), &["check"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ready: sql sqlite events.db table events\nserver: SQLite 3."), "{text}");
}

#[test]
fn an_invalid_line_stops_after_delivering_what_came_before() {
    let dir = tempfile::tempdir().unwrap();
    let input = "{\"sender_id\": \"a\", \"event\": \"restart\", \"timestamp\": 1.0}\n[1, 2]\n{\"sender_id\": \"a\", \"event\": \"undo\", \"timestamp\": 2.0}\n";
    std::fs::write(dir.path().join("endpoints.yml"), "event_broker:\n  type: file\n").unwrap();
    let out = broker(dir.path(), &["publish"], Some(input));
    assert_eq!(out.status.code(), Some(1), "stopped midway is exit code 1");
    assert!(stderr(&out).contains("<stdin>:2: invalid event: an event must be a JSON object"), "{}", stderr(&out));
    let written = std::fs::read_to_string(dir.path().join("rasa_event.log")).unwrap();
    assert_eq!(written, "{\"sender_id\": \"a\", \"event\": \"restart\", \"timestamp\": 1.0}\n");

    let out = broker(dir.path(), &["publish", "--skip-invalid", "-"], Some(input));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("skipped <stdin>:2"), "{}", stderr(&out));
    assert!(stderr(&out).contains("delivered 2, failed 0, undelivered 0, skipped 1 invalid lines"), "{}", stderr(&out));
}

/// Lines are found in the reader's 1 MiB buffer: lines that span its end, a line longer than it,
/// CRLF endings, blank lines and a last line without a newline all come out whole and in order,
/// and an invalid line is still named by its number.
#[test]
fn lines_across_read_buffers_come_out_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), "event_broker:\n  type: file\n").unwrap();
    let long = "x".repeat(1_500_000);
    let mut want = Vec::new();
    let mut input = String::new();
    for i in 0..8_000u32 {
        let text = if i == 4_000 { long.clone() } else { format!("line {i} {}", "y".repeat((i % 97) as usize)) };
        let line = format!(
            "{{\"sender_id\": \"s{}\", \"event\": \"bot\", \"timestamp\": {i}.5, \"text\": \"{text}\"}}",
            i % 7
        );
        input.push_str(&line);
        input.push_str(if i % 3 == 0 { "\r\n" } else { "\n" });
        if i % 1_000 == 0 {
            input.push_str("\n  \r\n");
        }
        want.push(line);
    }
    // The last line has no newline.
    input.truncate(input.trim_end().len());
    std::fs::write(dir.path().join("in.jsonl"), &input).unwrap();
    let out = broker(dir.path(), &["publish", "in.jsonl"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("read 8000 events, delivered 8000, failed 0"), "{}", stderr(&out));
    let written = std::fs::read_to_string(dir.path().join("rasa_event.log")).unwrap();
    let written: Vec<&str> = written.lines().collect();
    assert_eq!(written.len(), want.len());
    assert!(written.iter().zip(&want).all(|(a, b)| a == b), "every line whole and in order");

    // An invalid line after the long one is named by its line number (blank lines count).
    let bad = format!(
        "{{\"sender_id\": \"a\", \"event\": \"bot\", \"text\": \"{long}\"}}\n\n{{\"sender_id\": \"a\", \"event\": \"bot\" 1}}\n"
    );
    std::fs::write(dir.path().join("bad.jsonl"), bad).unwrap();
    let out = broker(dir.path(), &["publish", "bad.jsonl"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("bad.jsonl:3: invalid event"), "{}", stderr(&out));
}

/// `when_full: error` with a buffer smaller than a chunk: the events that found room are
/// delivered, the first refused one is named, and every other event read goes to the
/// undelivered file, in order: none lost, none twice.
#[test]
fn a_refused_publish_names_the_event_and_hands_the_rest_to_the_undelivered_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("endpoints.yml"),
        "event_broker:\n  type: file\n  buffer_size: 10\n  when_full: error\n",
    )
    .unwrap();
    let events = events("r", 1_000);
    std::fs::write(dir.path().join("in.jsonl"), events.join("\n") + "\n").unwrap();
    let out = broker(dir.path(), &["publish", "in.jsonl", "--undelivered", "left.jsonl"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("error: event 11: publish refused: "), "{}", stderr(&out));
    let read = read_count(&stderr(&out));
    let written = std::fs::read_to_string(dir.path().join("rasa_event.log")).unwrap();
    let left = std::fs::read_to_string(dir.path().join("left.jsonl")).unwrap();
    let written: Vec<&str> = written.lines().collect();
    let left: Vec<&str> = left.lines().collect();
    assert_eq!(written, events[..10], "the ten that found room");
    assert_eq!(left, events[10..read], "the rest of what was read, in order");
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
    assert_eq!(out.status.code(), Some(2), "a configuration error is exit code 2");
    assert_eq!(stderr(&out).lines().count(), 1, "one clear line: {}", stderr(&out));
    assert!(stderr(&out).starts_with("error: bad.yml:4:10: `fsync`: \"sometimes\" is not allowed"), "{}", stderr(&out));

    std::fs::write(dir.path().join("none.yml"), "nlg:\n  url: http://localhost:5055/nlg\n").unwrap();
    let out = broker(dir.path(), &["--endpoints", "none.yml", "publish"], Some(""));
    assert!(stderr(&out).contains("none.yml has no event_broker section"), "{}", stderr(&out));
    assert!(!out.status.success());

    let out = broker(dir.path(), &["--endpoints", "missing.yml", "check"], None);
    assert!(stderr(&out).contains("missing.yml does not exist"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(2));

    let out = broker(dir.path(), &["publish", "--no-such-flag"], None);
    assert_eq!(out.status.code(), Some(2), "a usage error is exit code 2");
}

#[test]
fn check_fails_when_the_broker_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), "event_broker:\n  type: file\n  path: no/such/dir/x.log\n")
        .unwrap();
    let out = broker(dir.path(), &["check"], None);
    assert_eq!(out.status.code(), Some(3), "a backend that cannot start is exit code 3");
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
    // A --timeout beyond what a duration holds is a usage error, not a panic.
    let out = broker(dir.path(), &["tail", "--timeout", "1e20"], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--timeout must be a number of seconds from 0 to"), "{}", stderr(&out));
    // Completion scripts, without an endpoints file.
    let out = broker(dir.path(), &["completions", "bash"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_broker()") && script.contains("--metrics-addr") && script.contains("publish"),
        "{script}"
    );
    let out = broker(dir.path(), &["completions", "zsh"], None);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("#compdef broker"));
    let out = broker(dir.path(), &["completions", "tcsh"], None);
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

/// With RabbitMQ (`type: pika`, Rasa's no-type section): a default `tail` shows live events
/// through a private queue and takes nothing from the configured queue; `tail --consume` gives
/// back what `publish` sent byte for byte, and its acknowledgements stick (a second one finds the
/// queue empty); `--from-beginning` without `--consume` is a usage error saying why.
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
    let out = broker(dir.path(), &["check"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ready: pika amqp://") && text.contains(&format!("exchange {exchange}")), "{text}");
    assert!(text.contains("\nserver: RabbitMQ "), "RabbitMQ announces its version: {text}");
    assert!(!text.contains("guest:guest"), "no password in what check prints: {text}");
    let out = broker(dir.path(), &["tail", "--from-beginning", "--timeout", "1"], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--consume"), "the error says what to do: {}", stderr(&out));

    // The default tail: a private queue bound to the exchange (its lag series appears once it is
    // subscribed), live events only.
    let port = free_port();
    let live = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["tail", "--timeout", "3", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let private = ["backend=\"pika\"".to_owned(), format!("destination=\"{exchange}\"")];
    let private = [private[0].as_str(), private[1].as_str()];
    scrape_until(port, "the private queue", |b| sample(b, "broker_consumer_lag_events", &private).is_some());
    let out = broker(dir.path(), &["publish", "in.jsonl"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("delivered 106, failed 0"), "{}", stderr(&out));
    let out = live.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), SAMPLE, "the live view shows Rasa's bytes, in order");

    // The configured queue still holds every event: consumed now, with metrics: the lag is what RabbitMQ counted at subscribe (106 ready), then, at
    // the next count (every 5 s), 0.
    let port = free_port();
    let tail = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["tail", "--consume", "--from-beginning", "--timeout", "7"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lag = ["backend=\"pika\"".to_owned(), format!("destination=\"{queue}\"")];
    let lag = [lag[0].as_str(), lag[1].as_str()];
    scrape_until(port, "a lag of 106", |b| sample(b, "broker_consumer_lag_events", &lag) == Some(106.0));
    scrape_until(port, "a lag of 0", |b| sample(b, "broker_consumer_lag_events", &lag) == Some(0.0));
    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), SAMPLE, "Rasa's bytes, in order");
    let out = broker(dir.path(), &["tail", "--consume", &queue, "--timeout", "1"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "acknowledged events do not come again: {}", String::from_utf8_lossy(&out.stdout));
    // The queue is durable and would outlive the test: remove it.
    let out = Command::new("rabbitmqctl").args(["-q", "delete_queue", &queue]).output();
    if !out.is_ok_and(|o| o.status.success()) {
        eprintln!("note: could not delete the queue {queue} (rabbitmqctl unavailable)");
    }
}

async fn count(url: &str, table: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client.query_one(&format!("SELECT COUNT(*) FROM \"{table}\""), &[]).await.map_or(0, |r| r.get::<_, i64>(0))
}

/// `check` on PostgreSQL: what it connected to (no password) and the server's own version.
#[test]
fn check_names_the_postgresql_server_version() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Some(service) = runtime.block_on(broker_testkit::services::postgres("check_names_the_server_version")) else {
        return;
    };
    let version: String = runtime.block_on(async {
        let (client, conn) = tokio_postgres::connect(&service.url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        client.query_one("SHOW server_version", &[]).await.expect("a version").get(0)
    });
    let dir = tempfile::tempdir().unwrap();
    let table = format!("check_{}", broker_testkit::services::unique_suffix());
    std::fs::write(dir.path().join("endpoints.yml"), endpoints_pg(&service.url, &table)).unwrap();
    let out = broker(dir.path(), &["check"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ready: sql postgres") && text.contains("@127.0.0.1:5432/test table check_"), "{text}");
    assert!(text.ends_with(&format!("\nserver: PostgreSQL {version}\n")), "{text}");
    runtime.block_on(rows(&service.url, &table));
}

/// The `N` of the summary's "read N events".
fn read_count(stderr: &str) -> usize {
    stderr.split("read ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect("a summary")
}

/// PostgreSQL cut mid-stream (a loopback proxy refusing from then on) and never back: `broker
/// publish` from stdin exits 1 within close_timeout + 5 s of the input's end, and the rows stored
/// plus the undelivered file are every event read, byte for byte.
#[test]
fn a_cut_mid_stream_exits_1_and_accounts_for_every_event() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let Some(service) = runtime.block_on(broker_testkit::services::postgres("a_cut_mid_stream_exits_1")) else {
        return;
    };
    let (host, with_host) = split_pg(&service.url);
    let proxy = runtime.block_on(broker_testkit::proxy::Proxy::start(&host)).expect("proxy");
    let table = format!("cli_cut_{}", broker_testkit::services::unique_suffix());
    let dir = tempfile::tempdir().unwrap();
    let endpoints = endpoints_pg(&with_host(&proxy.addr().to_string()), &table);
    std::fs::write(dir.path().join("endpoints.yml"), endpoints).unwrap();
    let input = events("cut", 6000);
    let mut child = spawn_publish(dir.path(), &["publish"]);
    let mut stdin = child.stdin.take().unwrap();
    for line in &input[..3000] {
        writeln!(stdin, "{line}").unwrap();
    }
    stdin.flush().unwrap();
    // Some rows land, then the service goes away for good.
    let direct = with_host(&host);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while runtime.block_on(count(&direct, &table)) == 0 {
        assert!(std::time::Instant::now() < deadline, "no row stored within 30 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    runtime.block_on(proxy.refuse());
    for line in &input[3000..] {
        if writeln!(stdin, "{line}").is_err() {
            break; // it stopped reading: blocked longer than close_timeout
        }
    }
    drop(stdin);
    let ended = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = ended.elapsed();
    let err = stderr(&out);
    println!("{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(took < std::time::Duration::from_secs(2 + 5), "exited {took:?} after the input ended");
    let read = read_count(&err);
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("undelivered-")))
        .expect("an undelivered-<timestamp>.jsonl file");
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&name), "the file is named on stderr: {err}");
    let undelivered: Vec<String> = std::fs::read_to_string(&file).unwrap().lines().map(str::to_owned).collect();
    let stored = runtime.block_on(rows(&direct, &table));
    println!("read {read}: stored {}, undelivered {}", stored.len(), undelivered.len());
    assert!(!undelivered.is_empty(), "the cut left events undelivered");
    // Every event read is stored or in the file, byte for byte; the rows in publish order.
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<&String> = stored.iter().chain(&undelivered).filter(|l| seen.insert(l.as_str())).collect();
    assert_eq!(distinct.len(), read, "stored + undelivered = every event read");
    let expected: std::collections::HashSet<&str> = input[..read].iter().map(String::as_str).collect();
    assert!(distinct.iter().all(|l| expected.contains(l.as_str())), "only events read, in Rasa's bytes");
    assert!(stored.iter().zip(&input).all(|(a, b)| a == b), "stored in publish order");
}

/// The service down before the start: exit code 3, nothing read, the summary printed.
#[test]
fn an_unreachable_service_exits_3_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgresql://postgres@127.0.0.1:{port}/test");
    std::fs::write(dir.path().join("endpoints.yml"), endpoints_pg(&url, "never")).unwrap();
    let input = events("down", 10).join("\n");
    let out = broker(dir.path(), &["publish"], Some(&input));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("read 0 events") && err.contains("cannot connect"), "{err}");
}

/// SIGINT in the middle of a publish: exit 130 with the summary, and the file written plus the
/// undelivered file are exactly the events read, in order.
#[test]
fn sigint_midway_exits_130_and_accounts_for_every_event() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), "event_broker:\n  type: file\n  path: out.log\n").unwrap();
    let input = events("int", 200_000);
    let mut child = spawn_publish(dir.path(), &["publish", "--undelivered", "left.jsonl"]);
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let input = input.clone();
        std::thread::spawn(move || {
            for (i, line) in input.iter().enumerate() {
                if writeln!(stdin, "{line}").is_err() {
                    return;
                }
                if i == 50_000 {
                    let _ = stdin.flush();
                    // Hold the rest back until the signal has gone in.
                    std::thread::sleep(std::time::Duration::from_millis(1500));
                }
            }
        })
    };
    let out_log = dir.path().join("out.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(&out_log).map_or(0, |m| m.len()) == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing written within 30 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    let err = stderr(&out);
    println!("{err}");
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let read = read_count(&err);
    let written = std::fs::read_to_string(&out_log).unwrap();
    let left = std::fs::read_to_string(dir.path().join("left.jsonl")).unwrap_or_default();
    let got: Vec<&str> = written.lines().chain(left.lines()).collect();
    assert!(read > 0 && read < input.len(), "interrupted midway: read {read}");
    let want: Vec<&str> = input[..read].iter().map(String::as_str).collect();
    assert_eq!(got, want, "written + undelivered = the events read, in order");
}

/// `GET path` on 127.0.0.1:`port`: (status line, body), or `None` while nothing listens.
fn http_get(port: u16, path: &str) -> Option<(String, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

/// The value of the first sample `name` in Prometheus text whose labels include each of `labels`
/// (`key="value"`).
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        let have: Vec<&str> = rest.strip_suffix('}')?.split(',').collect();
        (n == name && labels.iter().all(|want| have.contains(want))).then(|| value.parse().ok())?
    })
}

/// `--metrics-addr` during a publish: the delivered count matches the summary, the latency
/// histogram counts every delivered event, and `/ready` answers 200.
#[test]
fn metrics_during_a_publish_match_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), "event_broker:\n  type: file\n  path: out.log\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn_publish(dir.path(), &["publish", "--metrics-addr", &addr]);
    let mut stdin = child.stdin.take().unwrap();
    for line in events("m", 1000) {
        writeln!(stdin, "{line}").unwrap();
    }
    stdin.flush().unwrap();
    // Every series names the backend and the destination (the file).
    let file = ["backend=\"file\"", "destination=\"out.log\""];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let body = loop {
        if let Some((status, body)) = http_get(port, "/metrics") {
            assert_eq!(status, "HTTP/1.1 200 OK");
            if sample(&body, "broker_events_delivered_total", &file) == Some(1000.0) {
                break body;
            }
        }
        assert!(std::time::Instant::now() < deadline, "1000 delivered events never showed in /metrics");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(sample(&body, "broker_events_accepted_total", &file), Some(1000.0), "{body}");
    assert_eq!(sample(&body, "broker_delivery_seconds_count", &file), Some(1000.0), "{body}");
    let bucket = [file[0], file[1], "le=\"0.001\""];
    assert!(sample(&body, "broker_delivery_seconds_bucket", &bucket).is_some(), "{body}");
    assert_eq!(sample(&body, "broker_ready", &file), Some(1.0), "{body}");
    let (status, _) = http_get(port, "/ready").expect("/ready answers");
    assert_eq!(status, "HTTP/1.1 200 OK");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("read 1000 events, delivered 1000, failed 0, undelivered 0"), "{err}");
}

/// The spool's metrics: events waiting, bytes and the oldest one's age while the service is
/// down (the file backend's directory missing); after a SIGKILL, the next process's replayed
/// count, and nothing waiting once it is delivered.
#[test]
fn spool_metrics_follow_an_outage_and_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = "event_broker:\n  type: file\n  path: out/out.log\n  spool:\n    path: spool\n";
    std::fs::write(dir.path().join("endpoints.yml"), endpoints).unwrap();
    let spool = ["backend=\"file\"", "destination=\"spool\""];
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn_publish(dir.path(), &["publish", "--metrics-addr", &addr]);
    let mut stdin = child.stdin.take().unwrap();
    for line in events("sm", 500) {
        writeln!(stdin, "{line}").unwrap();
    }
    stdin.flush().unwrap();
    let body = scrape_until(port, "500 events waiting for over a second", |b| {
        sample(b, "broker_spool_events", &spool) == Some(500.0)
            && sample(b, "broker_spool_oldest_age_seconds", &spool).is_some_and(|a| a >= 1.0)
    });
    assert!(sample(&body, "broker_spool_bytes", &spool).is_some_and(|b| b > 500.0 * 100.0), "{body}");
    child.kill().unwrap();
    let _ = child.wait();
    drop(stdin);
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn_publish(dir.path(), &["publish", "--metrics-addr", &addr]);
    let stdin = child.stdin.take().unwrap();
    let body = scrape_until(port, "500 replayed, none waiting", |b| {
        sample(b, "broker_spool_replayed_events_total", &spool) == Some(500.0)
            && sample(b, "broker_spool_events", &spool) == Some(0.0)
    });
    assert_eq!(sample(&body, "broker_spool_oldest_age_seconds", &spool), Some(0.0), "{body}");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(dir.path().join("out/out.log")).unwrap().lines().count(), 500);
}

/// Polls `/metrics` on `port` until `done` holds for the body (at most 30 s); the body then.
fn scrape_until(port: u16, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some((_, body)) = http_get(port, "/metrics") {
            if done(&body) {
                return body;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{what} never showed in /metrics");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kafka through the CLI: `check` names the cluster's brokers; a publish with `--metrics-addr`
/// shows the delivered count, readiness and librdkafka's statistics (queue depth, round trip),
/// all labelled with the topic; a `tail` shows its consumer lag per partition.
#[test]
fn kafka_metrics_carry_librdkafka_statistics_and_consumer_lag() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Some(service) = runtime.block_on(broker_testkit::services::kafka("kafka_metrics_carry_librdkafka_statistics"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("cli-metrics-{}", broker_testkit::services::unique_suffix());
    let endpoints = format!(
        "event_broker:\n  type: kafka\n  url: {}\n  topic: {topic}\n  security_protocol: PLAINTEXT\n  create_topic: true\n  librdkafka:\n    statistics.interval.ms: 100\n",
        service.url
    );
    std::fs::write(dir.path().join("endpoints.yml"), endpoints).unwrap();

    let out = broker(dir.path(), &["check"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("ready: kafka {} topic {topic}\n", service.url)), "{text}");
    assert!(text.contains("\nserver: Kafka cluster of 1 broker: "), "{text}");

    let port = free_port();
    let mut child = spawn_publish(dir.path(), &["publish", "--metrics-addr", &format!("127.0.0.1:{port}")]);
    let mut stdin = child.stdin.take().unwrap();
    for line in events("k", 1000) {
        writeln!(stdin, "{line}").unwrap();
    }
    stdin.flush().unwrap();
    let labels = ["backend=\"kafka\"".to_owned(), format!("destination=\"{topic}\"")];
    let labels = [labels[0].as_str(), labels[1].as_str()];
    let body = scrape_until(port, "1000 delivered events and librdkafka's statistics", |b| {
        sample(b, "broker_events_delivered_total", &labels) == Some(1000.0)
            && sample(b, "broker_kafka_rtt_seconds", &labels).is_some()
    });
    assert_eq!(sample(&body, "broker_ready", &labels), Some(1.0), "{body}");
    assert!(sample(&body, "broker_kafka_queue_events", &labels).is_some_and(|n| n >= 0.0), "{body}");
    assert!(sample(&body, "broker_kafka_rtt_seconds", &labels).is_some_and(|s| s > 0.0 && s < 5.0), "{body}");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("read 1000 events, delivered 1000, failed 0"), "{}", stderr(&out));

    // An envelope per message, with its partition/offset and Rasa's headers; --until-end stops
    // at the end of the topic.
    let group = format!("{topic}-envelope");
    let out = broker(
        dir.path(),
        &["tail", "--from-beginning", "--until-end", "--format", "envelope", "--group", &group, "--timeout", "30"],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let sent = events("k", 1000);
    assert_eq!(text.lines().count(), 1000, "every message, then the end");
    for (i, (line, event)) in text.lines().zip(&sent).enumerate() {
        let head = format!(
            "{{\"position\": {{\"partition\": 0, \"offset\": {i}}}, \"key\": null, \"headers\": {{\"RASA_ENVIRONMENT\": \"RASA_ENVIRONMENT_NOT_SET\", \"rasa-event-id\": \""
        );
        assert!(line.starts_with(&head), "{line}");
        assert!(line.ends_with(&format!("\"}}, \"event\": {event}}}")), "{line}");
    }

    // A consumer that read everything: its lag on the one partition is known and 0.
    let port = free_port();
    let mut tail = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["tail", "--from-beginning", "--timeout", "20", "--group", &topic])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lag = [labels[0], labels[1], "partition=\"0\""];
    let body = scrape_until(port, "the consumer's lag", |b| sample(b, "broker_consumer_lag_events", &lag).is_some());
    assert!(sample(&body, "broker_consumer_lag_events", &lag).is_some_and(|n| (0.0..=1000.0).contains(&n)), "{body}");
    let _ = tail.kill();
    let _ = tail.wait();
}

/// `broker bridge A B` in `dir`, with a deadline (a bridge that hangs fails the test).
fn bridge(dir: &Path, from: &str, to: &str, extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["bridge", "--from", from, "--to", to])
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("bridge {from} -> {to} still running after 120 s: {}", stderr(&child.wait_with_output().unwrap()));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Lines grouped by sender, each in its order.
fn by_sender(lines: &[String]) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::<String, Vec<String>>::new();
    for l in lines {
        let e = broker_core::Event::from_json(l.as_bytes()).expect("an event");
        out.entry(e.sender_id().unwrap_or_default().to_owned()).or_default().push(l.clone());
    }
    out
}

/// file -> Kafka -> PostgreSQL -> RabbitMQ -> file, one bridge per hop on the real services: the
/// last file holds every event of the first, byte for byte, each conversation in its order; a
/// second run of each hop finds nothing new (positions were kept: checkpoint, group, acks).
#[test]
fn bridges_across_every_backend_keep_the_bytes_and_the_count() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let test = "bridges_across_every_backend";
    let Some(kafka) = runtime.block_on(broker_testkit::services::kafka(test)) else { return };
    let Some(pg) = runtime.block_on(broker_testkit::services::postgres(test)) else { return };
    let Some(rabbit) = runtime.block_on(broker_testkit::services::rabbitmq(test)) else { return };
    let dir = tempfile::tempdir().unwrap();
    let suffix = broker_testkit::services::unique_suffix();
    let (topic, table, queue) = (format!("bridge-{suffix}"), format!("bridge_{suffix}"), format!("bridge-q-{suffix}"));
    let mut input: Vec<String> = SAMPLE.lines().map(str::to_owned).collect();
    input.extend(events("bridge", 3000));
    std::fs::write(dir.path().join("src.jsonl"), input.join("\n") + "\n").unwrap();
    let files = [
        ("file.yml", "event_broker:\n  type: file\n  path: src.jsonl\n".to_owned()),
        (
            "kafka.yml",
            format!(
                "event_broker:\n  type: kafka\n  url: {}\n  topic: {topic}\n  security_protocol: PLAINTEXT\n  create_topic: true\n",
                kafka.url
            ),
        ),
        ("pg.yml", endpoints_pg(&pg.url, &table)),
        (
            "rabbit.yml",
            format!("event_broker:\n  url: {}\n  queues: [{queue}]\n  exchange_name: x-{queue}\n", rabbit.url),
        ),
        ("dst.yml", "event_broker:\n  type: file\n  path: dst.jsonl\n".to_owned()),
    ];
    for (name, text) in &files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let n = input.len().to_string();
    let hops: [(&str, &str, Vec<&str>); 4] = [
        ("file.yml", "kafka.yml", vec!["--checkpoint", "file.cp", "--until-end"]),
        ("kafka.yml", "pg.yml", vec!["--group", &topic, "--from-beginning", "--until-end"]),
        ("pg.yml", "rabbit.yml", vec!["--checkpoint", "pg.cp", "--until-end"]),
        ("rabbit.yml", "dst.yml", vec!["--limit", &n]),
    ];
    for (from, to, extra) in &hops {
        let out = bridge(dir.path(), from, to, extra);
        let err = stderr(&out);
        println!("{from} -> {to}: {err}");
        assert_eq!(out.status.code(), Some(0), "{from} -> {to}: {err}");
        assert!(err.contains(&format!("consumed {n} events, delivered {n}, filtered out 0, rejected 0 in")), "{err}");
    }
    let got: Vec<String> =
        std::fs::read_to_string(dir.path().join("dst.jsonl")).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(got.len(), input.len(), "exactly the events of the source");
    assert_eq!(by_sender(&got), by_sender(&input), "the same bytes, each conversation in its order");
    // Positions were kept: nothing comes again.
    let out = bridge(dir.path(), "file.yml", "kafka.yml", &["--checkpoint", "file.cp", "--until-end"]);
    assert!(stderr(&out).contains("consumed 0 events"), "{}", stderr(&out));
    let out = bridge(dir.path(), "kafka.yml", "pg.yml", &["--group", &topic, "--until-end"]);
    assert!(stderr(&out).contains("consumed 0 events"), "{}", stderr(&out));
    let out = bridge(dir.path(), "pg.yml", "rabbit.yml", &["--checkpoint", "pg.cp", "--until-end"]);
    assert!(stderr(&out).contains("consumed 0 events"), "{}", stderr(&out));
    // A filter: only `bot` events go through; the rest are acknowledged and skipped.
    let out = bridge(dir.path(), "file.yml", "dst.yml", &["--checkpoint", "bot.cp", "--until-end", "--events", "bot"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let bots = input.iter().filter(|l| l.contains("\"event\": \"bot\"")).count();
    assert!(
        bots > 0 && stderr(&out).contains(&format!("delivered {bots}, filtered out {}", input.len() - bots)),
        "{}",
        stderr(&out)
    );
    runtime.block_on(rows(&pg.url, &table));
    let _ = Command::new("rabbitmqctl").args(["-q", "delete_queue", &queue]).output();
}

/// A bridge file -> PostgreSQL killed with SIGKILL mid-stream and started again: every event is
/// stored, each conversation in its order; the repeats are bounded by the events in flight plus
/// one checkpoint interval.
#[test]
fn a_bridge_killed_mid_stream_loses_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Some(pg) = runtime.block_on(broker_testkit::services::postgres("a_bridge_killed_mid_stream")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let table = format!("bridge_kill_{}", broker_testkit::services::unique_suffix());
    let mut input = events("a", 20_000);
    input.extend(events("b", 20_000));
    // Interleaved senders, so order per sender is a real check.
    input.sort_by_key(|l| l.len());
    std::fs::write(dir.path().join("src.jsonl"), input.join("\n") + "\n").unwrap();
    std::fs::write(dir.path().join("file.yml"), "event_broker:\n  type: file\n  path: src.jsonl\n").unwrap();
    std::fs::write(dir.path().join("pg.yml"), endpoints_pg(&pg.url, &table)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["bridge", "--from", "file.yml", "--to", "pg.yml", "--checkpoint", "cp.json", "--until-end"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while runtime.block_on(count(&pg.url, &table)) < 8_000 {
        assert!(std::time::Instant::now() < deadline, "not 8,000 rows within 60 s");
        assert!(child.try_wait().unwrap().is_none(), "the bridge ended before it was killed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let at_kill = runtime.block_on(count(&pg.url, &table));
    assert!((at_kill as usize) < input.len(), "killed mid-stream ({at_kill} rows)");
    let out = bridge(dir.path(), "file.yml", "pg.yml", &["--checkpoint", "cp.json", "--until-end"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stored = runtime.block_on(rows(&pg.url, &table));
    let distinct: std::collections::HashSet<&str> = stored.iter().map(String::as_str).collect();
    assert_eq!(distinct.len(), input.len(), "every event stored");
    let duplicates = stored.len() - input.len();
    println!("killed at {at_kill} rows; {duplicates} events stored twice");
    assert!(duplicates <= 4_096 + 1_024, "repeats bounded by the window and one checkpoint interval: {duplicates}");
    // Each conversation in its order, once the repeats are dropped (a repeat comes later).
    let mut seen = std::collections::HashSet::new();
    let first_copies: Vec<String> = stored.into_iter().filter(|l| seen.insert(l.clone())).collect();
    assert_eq!(by_sender(&first_copies), by_sender(&input));
}

/// Events TO rejects as their own fault (over `max_event_bytes`) go to the dead-letter file,
/// synced, before they are acknowledged: the stream goes on, the run exits 1, and the delivered
/// plus the dead-lettered events are the source's, each in its order.
#[test]
fn a_bridge_dead_letters_rejected_events_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let input: Vec<String> = SAMPLE.lines().map(str::to_owned).collect();
    let mut sizes: Vec<usize> = input.iter().map(String::len).collect();
    sizes.sort_unstable();
    let limit = sizes[sizes.len() / 2];
    std::fs::write(dir.path().join("src.jsonl"), SAMPLE).unwrap();
    std::fs::write(dir.path().join("from.yml"), "event_broker:\n  type: file\n  path: src.jsonl\n").unwrap();
    std::fs::write(
        dir.path().join("to.yml"),
        format!("event_broker:\n  type: file\n  path: dst.jsonl\n  max_event_bytes: {limit}\n"),
    )
    .unwrap();
    let args = ["--checkpoint", "cp.json", "--until-end", "--undelivered", "dead.jsonl"];
    let out = bridge(dir.path(), "from.yml", "to.yml", &args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let read = |name: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join(name)).unwrap_or_default().lines().map(str::to_owned).collect()
    };
    let (delivered, dead) = (read("dst.jsonl"), read("dead.jsonl"));
    assert!(!dead.is_empty() && dead.iter().all(|l| l.len() > limit), "{err}");
    assert!(err.contains(&format!("rejected {} (written to dead.jsonl)", dead.len())), "{err}");
    assert_eq!(delivered.len() + dead.len(), input.len());
    let big: Vec<String> = input.iter().filter(|l| l.len() > limit).cloned().collect();
    let small: Vec<String> = input.iter().filter(|l| l.len() <= limit).cloned().collect();
    assert_eq!((delivered, dead), (small, big), "each in source order");
    // Acknowledged: a second run has nothing to do.
    let out = bridge(dir.path(), "from.yml", "to.yml", &args);
    assert!(stderr(&out).contains("consumed 0 events"), "{}", stderr(&out));
    // Filters that cannot match anything are refused before anything is acknowledged.
    let out = bridge(dir.path(), "from.yml", "to.yml", &["--checkpoint", "other.cp", "--events", ","]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let reversed = ["--checkpoint", "other.cp", "--minimum-timestamp", "2", "--maximum-timestamp", "1"];
    let out = bridge(dir.path(), "from.yml", "to.yml", &reversed);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = bridge(dir.path(), "from.yml", "from.yml", &["--checkpoint", "other.cp"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!dir.path().join("other.cp").exists());
}

/// SIGINT while following: the bridge stops reading, delivers what is in flight, acknowledges
/// it and exits 130; started again it goes on from there, and together the runs delivered every
/// event once.
#[test]
fn sigint_stops_a_following_bridge_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let input = events("int", 30_000);
    std::fs::write(dir.path().join("src.jsonl"), input.join("\n") + "\n").unwrap();
    std::fs::write(dir.path().join("from.yml"), "event_broker:\n  type: file\n  path: src.jsonl\n").unwrap();
    std::fs::write(dir.path().join("to.yml"), "event_broker:\n  type: file\n  path: dst.jsonl\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["bridge", "--from", "from.yml", "--to", "to.yml", "--checkpoint", "cp.json"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let dst = dir.path().join("dst.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::metadata(&dst).map_or(0, |m| m.len()) == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing bridged within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let first = std::fs::read_to_string(&dst).unwrap().lines().count();
    let out = bridge(dir.path(), "from.yml", "to.yml", &["--checkpoint", "cp.json", "--until-end"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got: Vec<String> = std::fs::read_to_string(&dst).unwrap().lines().map(str::to_owned).collect();
    println!("first run delivered {first} of {}", input.len());
    assert_eq!(got, input, "every event once, in order: what was delivered was acknowledged");
}
