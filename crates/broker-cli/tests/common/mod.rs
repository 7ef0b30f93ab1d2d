//! Helpers the `broker` binary's test files share.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

pub fn broker(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
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

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `broker ARGS` (a publish) in `dir` with stdin piped (for the test to feed) and stderr captured.
pub fn spawn_publish(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Lines of `n` distinct events in Rasa's bytes (what `broker publish` sends unchanged).
pub fn events(sender: &str, n: u64) -> Vec<String> {
    (0..n).map(|i| String::from_utf8(broker_testkit::user_event(sender, i).to_json()).unwrap()).collect()
}

/// The `data` column of `table` in id order on the PostgreSQL at `url`; the table is dropped.
pub async fn rows(url: &str, table: &str) -> Vec<String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let rows = client.query(&format!("SELECT data FROM \"{table}\" ORDER BY id"), &[]).await.unwrap_or_default();
    let out = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    let _ = client.batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\"")).await;
    out
}

pub fn endpoints_pg(url: &str, table: &str) -> String {
    format!(
        "event_broker:\n  type: sql\n  dialect: postgresql\n  url: {url}\n  table: {table}\n  close_timeout: 2\n  attempt_timeout: 1\n  buffer_size: 1000\n"
    )
}

/// A `postgres://user@host:port/db` URL as (`host:port`, the URL with `host:port` replaced).
pub fn split_pg(url: &str) -> (String, impl Fn(&str) -> String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r).to_owned();
    let (user, hostpath) =
        rest.rsplit_once('@').map_or((String::new(), rest.clone()), |(u, h)| (format!("{u}@"), h.to_owned()));
    let (host, path) =
        hostpath.split_once('/').map_or((hostpath.clone(), String::new()), |(h, p)| (h.to_owned(), format!("/{p}")));
    (host, move |via: &str| format!("postgresql://{user}{via}{path}"))
}
