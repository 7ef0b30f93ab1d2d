//! `broker tail` while PostgreSQL itself stops and starts: the tail keeps following, says on
//! stderr that it reconnects, and hands over every event once, in order, across the restart.
//!
//! The commands come from `BROKER_TEST_POSTGRES_STOP` / `BROKER_TEST_POSTGRES_START` (`.ci/run`
//! sets them), or the test stops and starts its own container. Its own test binary, so no other
//! test sees the outage.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SAMPLE: &str = broker_testkit::RASA_SAMPLE;

/// `broker publish` of `lines` in `dir`; panics unless every one is delivered.
fn publish(dir: &std::path::Path, lines: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("publish")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "publish: {err}");
    assert!(err.contains(&format!("delivered {}, failed 0", lines.len())), "publish: {err}");
}

#[test]
fn tail_follows_across_a_postgres_restart() {
    let test = "tail_follows_across_a_postgres_restart";
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Some((service, restart)) = runtime.block_on(broker_testkit::services::postgres_to_restart(test)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let table = format!("tail_restart_{}", broker_testkit::services::unique_suffix());
    let endpoints = format!(
        "event_broker:\n  type: sql\n  dialect: postgresql\n  url: {}\n  table: {table}\n  close_timeout: 20\n",
        service.url
    );
    std::fs::write(dir.path().join("endpoints.yml"), endpoints).unwrap();
    let lines: Vec<&str> = SAMPLE.lines().take(10).collect();
    publish(dir.path(), &lines[..5]);

    let mut tail = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["tail", "--from-beginning", "--limit", "10", "--timeout", "60"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = tail.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(rx.recv_timeout(Duration::from_secs(20)).expect("the first events"));
    }

    restart.stop_blocking().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    restart.start_blocking().unwrap();
    publish(dir.path(), &lines[5..]);
    for _ in 5..10 {
        got.push(rx.recv_timeout(Duration::from_secs(60)).expect("the events after the restart"));
    }

    // --limit 10 ends the tail; bounded wait, then a kill.
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = tail.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(status) = status else {
        let _ = tail.kill();
        panic!("tail did not end at --limit 10");
    };
    reader.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut tail.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "tail: {err}");
    assert_eq!(got, lines, "every event once, in order, across the restart");
    assert!(err.contains("reconnecting"), "the tail says it reconnects: {err}");

    let drop = format!("DROP TABLE IF EXISTS \"{table}\"");
    runtime.block_on(async {
        let (client, conn) = tokio_postgres::connect(&service.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute(&drop).await.unwrap();
    });
}
