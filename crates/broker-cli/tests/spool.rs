//! The disk spool through `broker publish`, for real (issue 15): each service unreachable behind
//! the loopback proxy while 100,000 events are spooled, the process killed with SIGKILL during
//! the outage, the service back, and a `broker publish` of nothing delivering every spooled
//! event; a torn last record cut and reported; a full disk under the spool.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use broker_testkit::proxy::Proxy;
use common::*;

/// Events per fault run.
const N: u64 = 100_000;

/// Conversations the events are spread over.
const SENDERS: u64 = 10;

/// The forwarder's window plus one publish: the most a first run can have had at the service
/// unconfirmed when it was killed, so the most repeats a recovery may bring.
const REPEATS_BOUND: usize = 8_192 + 2_048;

/// `N` events over `SENDERS` conversations, each numbered (`metadata.seq`) in its order.
fn input() -> Vec<String> {
    (0..N)
        .map(|i| {
            let event = broker_testkit::user_event(&format!("spool-{}", i % SENDERS), i);
            String::from_utf8(event.to_json()).unwrap()
        })
        .collect()
}

/// Records in the spool's segments that hold `pattern` (the test's sender ids).
fn spooled(dir: &Path) -> usize {
    let pattern = b"\"sender_id\": \"spool-";
    std::fs::read_dir(dir.join("spool"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .map(|e| {
                    std::fs::read(e.path()).unwrap_or_default().windows(pattern.len()).filter(|w| w == pattern).count()
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The whole fault run against one service: `through` is its `event_broker:` section through
/// `proxy` (with `close_timeout: 2`), `reader` the same straight to the service.
fn outage_sigkill_then_recovery(
    name: &str,
    proxy: &Proxy,
    through: &str,
    reader: &str,
    runtime: &tokio::runtime::Runtime,
) {
    runtime.block_on(proxy.refuse());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), format!("{through}  spool:\n    path: spool\n")).unwrap();
    let input = input();
    let mut child = spawn_publish(dir.path(), &["publish"]);
    let mut stdin = child.stdin.take().unwrap();
    let feed = std::thread::spawn(move || {
        for line in &input {
            if writeln!(stdin, "{line}").is_err() {
                break;
            }
        }
        let _ = stdin.flush();
        stdin // kept open: the run goes on until it is killed
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while spooled(dir.path()) < N as usize {
        assert!(Instant::now() < deadline, "{name}: not all spooled within 120 s: {}", spooled(dir.path()));
        assert!(child.try_wait().unwrap().is_none(), "{name}: the first run ended during the outage");
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap(); // SIGKILL, the service still unreachable
    let _ = child.wait();
    drop(feed.join());
    let status = broker(dir.path(), &["spool", "status"], None);
    assert_eq!(status.status.code(), Some(0), "{name}: {}", stderr(&status));
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(text.starts_with(&format!("spool spool: {N} events waiting, ")), "{name}: {text}");
    proxy.restore();
    // The next run, with time enough to send the spool (close_timeout bounds how long it tries).
    let endpoints = std::fs::read_to_string(dir.path().join("endpoints.yml")).unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), endpoints.replace("close_timeout: 2", "close_timeout: 120"))
        .unwrap();
    let started = Instant::now();
    let out = broker(dir.path(), &["publish"], Some(""));
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
    // What the service holds, per conversation, in the order it holds it.
    let configured = broker_config::configure(
        broker_config::parse_str(reader, None).unwrap().unwrap(),
        &broker_config::default_registry(),
    )
    .unwrap();
    let stored: BTreeMap<String, Vec<u64>> = runtime.block_on(broker_testkit::faults::stored(&*configured.backend));
    let total: usize = stored.values().map(Vec::len).sum();
    let mut missing = 0;
    for s in 0..SENDERS {
        let seqs = stored.get(&format!("spool-{s}")).cloned().unwrap_or_default();
        // First sightings in order: a repeat may come late, never a first one.
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<u64> = seqs.iter().copied().filter(|q| seen.insert(*q)).collect();
        let expected: Vec<u64> = (0..N).filter(|i| i % SENDERS == s).collect();
        missing += expected.iter().filter(|q| !seen.contains(q)).count();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{name}: conversation spool-{s} out of order");
    }
    assert_eq!(missing, 0, "{name}: events lost");
    let repeats = total - N as usize;
    println!(
        "{name}: {N} events spooled during the outage, SIGKILL, all {N} delivered after in {took:.1?}, {repeats} repeats"
    );
    assert!(repeats <= REPEATS_BOUND, "{name}: {repeats} repeats, more than the window allows");
    let status = broker(dir.path(), &["spool", "status"], None);
    assert!(
        String::from_utf8_lossy(&status.stdout).starts_with("spool spool: 0 events waiting"),
        "{name}: {}",
        stderr(&status)
    );
}

#[test]
fn postgresql_unreachable_then_sigkill_loses_nothing_spooled() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let test = "postgresql_unreachable_then_sigkill";
    let Some(service) = runtime.block_on(broker_testkit::services::postgres(test)) else { return };
    let (host, with_host) = split_pg(&service.url);
    let proxy = runtime.block_on(Proxy::start(&host)).expect("proxy");
    let table = format!("spool_{}", broker_testkit::services::unique_suffix());
    let through = endpoints_pg(&with_host(&proxy.addr().to_string()), &table);
    let reader = endpoints_pg(&with_host(&host), &table);
    outage_sigkill_then_recovery("postgresql", &proxy, &through, &reader, &runtime);
    runtime.block_on(rows(&with_host(&host), &table)); // drops it
}

#[test]
fn rabbitmq_unreachable_then_sigkill_loses_nothing_spooled() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let test = "rabbitmq_unreachable_then_sigkill";
    let Some(service) = runtime.block_on(broker_testkit::services::rabbitmq(test)) else { return };
    // amqp://user:pass@host:port/vhost
    let (scheme_auth, rest) = service.url.rsplit_once('@').expect("an AMQP URL with credentials");
    let (host, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let proxy = runtime.block_on(Proxy::start(host)).expect("proxy");
    let queue = format!("spool-{}", broker_testkit::services::unique_suffix());
    let section = |at: &str| {
        format!(
            "event_broker:\n  type: pika\n  url: {scheme_auth}@{at}/{vhost}\n  queues: [{queue}]\n  close_timeout: 2\n"
        )
    };
    outage_sigkill_then_recovery("rabbitmq", &proxy, &section(&proxy.addr().to_string()), &section(host), &runtime);
    let _ = std::process::Command::new("rabbitmqctl").args(["-q", "delete_queue", &queue]).output();
}

#[test]
fn kafka_unreachable_then_sigkill_loses_nothing_spooled() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let test = "kafka_unreachable_then_sigkill";
    let Some(root) = broker_testkit::tansu::Tansu::root(test) else { return };
    // A broker of the test's own, advertising the proxy, so every connection goes through it.
    let mut tansu = broker_testkit::tansu::Tansu::new(root, None);
    let proxy = runtime.block_on(Proxy::start(&format!("127.0.0.1:{}", tansu.port))).expect("proxy");
    tansu.advertised = proxy.addr().to_string();
    tansu.run(&["start", "memory"]);
    let topic = format!("spool-{}", broker_testkit::services::unique_suffix());
    let section = |at: &str| {
        format!(
            "event_broker:\n  type: kafka\n  url: {at}\n  topic: {topic}\n  security_protocol: PLAINTEXT\n  create_topic: true\n  close_timeout: 2\n"
        )
    };
    let direct = format!("127.0.0.1:{}", tansu.port);
    outage_sigkill_then_recovery("kafka", &proxy, &section(&proxy.addr().to_string()), &section(&direct), &runtime);
    drop(tansu);
}

/// `n` events of one conversation, as lines.
fn lines(n: u64) -> Vec<String> {
    (0..n).map(|i| String::from_utf8(broker_testkit::user_event("spool-f", i).to_json()).unwrap()).collect()
}

/// A spool whose last record is torn (its segment cut by a few bytes, as a crash mid-write
/// leaves it): the record is cut and reported, every event before it is delivered, in order.
#[test]
fn a_torn_last_record_is_cut_and_the_events_before_it_delivered() {
    let dir = tempfile::tempdir().unwrap();
    // The file backend's directory does not exist yet: the service is "down".
    let endpoints =
        "event_broker:\n  type: file\n  path: out/rasa_event.log\n  close_timeout: 1\n  spool:\n    path: spool\n";
    std::fs::write(dir.path().join("endpoints.yml"), endpoints).unwrap();
    let input = lines(1000);
    let out = broker(dir.path(), &["publish"], Some(&(input.join("\n") + "\n")));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("1000 wait in the disk spool"), "{}", stderr(&out));
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("spool"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment");
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(last).unwrap().set_len(len - 5).unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::fs::write(dir.path().join("endpoints.yml"), endpoints.replace("close_timeout: 1", "close_timeout: 30"))
        .unwrap();
    let out = broker(dir.path(), &["publish"], Some(""));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 torn record(s) cut"), "reported: {}", stderr(&out));
    let got = std::fs::read_to_string(dir.path().join("out/rasa_event.log")).unwrap();
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(got, input[..999].iter().map(String::as_str).collect::<Vec<_>>(), "all before the torn one, in order");
}

/// The disk under the spool fills up (a small tmpfs, in a mount namespace of the test's own)
/// while the service is down: publishes fail saying so, the events that did not fit go to the
/// undelivered file, what is spooled is intact; once there is room and the service is back,
/// everything is delivered, once, in order.
#[test]
fn a_full_disk_fails_publishes_clearly_and_recovers_once_there_is_room() {
    let test = "a_full_disk_under_the_spool";
    let can = std::process::Command::new("unshare").args(["-m", "true"]).output().is_ok_and(|o| o.status.success());
    if !can {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: `unshare -m` (a mount namespace) is not allowed here"
        );
        broker_testkit::services::skip(test, "`unshare -m` is not allowed (needs root or user namespaces)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let endpoints =
        "event_broker:\n  type: file\n  path: out/rasa_event.log\n  close_timeout: 2\n  spool:\n    path: spool\n";
    std::fs::write(dir.path().join("endpoints.yml"), endpoints).unwrap();
    std::fs::write(dir.path().join("later.yml"), endpoints.replace("close_timeout: 2", "close_timeout: 30")).unwrap();
    // Three publishes' worth (4,096 events each, what the spool takes at once); room for one.
    let input = lines(12_000);
    let bytes: usize = input.iter().map(|l| l.len() + 1).sum();
    let size_kib = bytes / 1024 + 2048;
    let free_kib = bytes * 45 / 100 / 1024;
    std::fs::write(dir.path().join("input.jsonl"), input.join("\n") + "\n").unwrap();
    std::fs::create_dir(dir.path().join("spool")).unwrap();
    // The tmpfs lives as long as the script. The second run publishes what the first did not
    // accept, then what it did not read.
    let script = format!(
        r#"set -u
mount -t tmpfs -o size={size_kib}k tmpfs spool || exit 90
dd if=/dev/zero of=spool/filler bs=1024 count={filler} 2>/dev/null
"$BROKER" publish --undelivered undelivered.jsonl input.jsonl 2> first.err; echo $? > first.code
"$BROKER" spool status > status.out 2>&1
rm spool/filler
mkdir out
read=$(sed -n 's/^broker: read \([0-9]*\) events.*/\1/p' first.err)
tail -n +$((read + 1)) input.jsonl > unread.jsonl
"$BROKER" --endpoints later.yml publish undelivered.jsonl unread.jsonl 2> second.err; echo $? > second.code
"$BROKER" --endpoints later.yml spool status > status2.out 2>&1
"#,
        filler = size_kib - free_kib
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .current_dir(dir.path())
        .env("BROKER", env!("CARGO_BIN_EXE_broker"))
        .output()
        .unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    assert_ne!(out.status.code(), Some(90), "mounting a tmpfs failed: {}", String::from_utf8_lossy(&out.stderr));
    let first = read("first.err");
    println!("first run: {first}\nstatus: {}\nsecond run: {}", read("status.out"), read("second.err"));
    assert_eq!(read("first.code").trim(), "1", "{first}");
    assert!(first.contains("No space left on device"), "the reason is said: {first}");
    let undelivered = read("undelivered.jsonl").lines().count();
    let unread = read("unread.jsonl").lines().count();
    let waiting = input.len() - undelivered - unread;
    assert!(waiting > 0 && undelivered > 0, "some fit, some did not: {waiting} spooled, {undelivered} undelivered");
    let status = read("status.out");
    assert!(
        status.starts_with(&format!("spool spool: {waiting} events waiting")),
        "the spooled ones are intact: {status}"
    );
    assert!(!status.contains("torn"), "no corruption: {status}");
    assert_eq!(read("second.code").trim(), "0", "{}", read("second.err"));
    let got = read("out/rasa_event.log");
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        input.iter().map(String::as_str).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert!(read("status2.out").starts_with("spool spool: 0 events waiting"), "{}", read("status2.out"));
}
