//! The file backend's own promises, checked on real files.

use std::time::Duration;

use broker_core::{
    Backend, BackendFactory, ConfigValue, Error, EventBroker, Options, Position, SourceOptions, StartFrom,
};
use broker_file::{FileBackend, FileConfig, FileFactory, Fsync};
use broker_testkit::{RASA_SAMPLE, rasa_sample_events, user_event};

async fn publish_all(broker: &dyn EventBroker, events: Vec<broker_core::Event>) {
    let mut receipts = Vec::new();
    for e in events {
        receipts.push(broker.publish(e).await.unwrap());
    }
    for r in receipts {
        r.await.unwrap();
    }
}

#[tokio::test]
async fn output_for_the_rasa_sample_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rasa_event.log");
    for fsync in [Fsync::Never, Fsync::Batch, Fsync::Interval(Duration::from_millis(5))] {
        let _ = std::fs::remove_file(&path);
        let broker = FileBackend::new(FileConfig::new(&path).fsync(fsync)).connect().await.unwrap();
        publish_all(broker.as_ref(), rasa_sample_events()).await;
        assert!(broker.close().await.unwrap().is_clean());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), RASA_SAMPLE, "{fsync:?}");
    }
}

#[tokio::test]
async fn appends_and_never_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.log");
    std::fs::write(&path, "{\"sender_id\": \"old\", \"event\": \"restart\", \"timestamp\": 1.0}\n").unwrap();
    let broker = FileBackend::new(FileConfig::new(&path)).connect().await.unwrap();
    publish_all(broker.as_ref(), vec![user_event("new", 0)]).await;
    broker.close().await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].contains("\"old\""));
    assert_eq!(lines[1].as_bytes(), user_event("new", 0).to_json());
}

#[tokio::test]
async fn a_missing_directory_fails_at_start_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("events.log");
    let err = FileBackend::new(FileConfig::new(&path)).connect().await.expect_err("must fail");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

#[tokio::test]
async fn a_half_written_last_line_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.log");
    // A crash left half an event at the end.
    std::fs::write(
        &path,
        "{\"sender_id\": \"a\", \"event\": \"restart\", \"timestamp\": 1.0}\n{\"sender_id\": \"a\", \"ev",
    )
    .unwrap();
    let broker = FileBackend::new(FileConfig::new(&path)).connect().await.unwrap();
    publish_all(broker.as_ref(), vec![user_event("b", 7)]).await;
    broker.close().await.unwrap();

    let mut source = FileBackend::new(FileConfig::new(&path))
        .source(&SourceOptions::from(StartFrom::Beginning).follow(false))
        .await
        .unwrap();
    let first = source.next().await.unwrap().unwrap();
    assert_eq!(first.event.event_type(), "restart");
    assert_eq!(first.position, Position::Line { line: 1, offset: 0 });
    match source.next().await {
        Err(Error::Malformed { position: Position::Line { line: 2, .. }, .. }) => {}
        other => panic!("expected the broken line 2 to be reported, got {other:?}"),
    }
    let third = source.next().await.unwrap().unwrap();
    assert_eq!(third.raw, user_event("b", 7).to_json());
    assert!(source.next().await.unwrap().is_none());
}

#[tokio::test]
async fn tail_resumes_from_a_byte_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.log");
    let backend = FileBackend::new(FileConfig::new(&path));
    let broker = backend.connect().await.unwrap();
    publish_all(broker.as_ref(), (0..10).map(|i| user_event("s", i)).collect()).await;
    broker.close().await.unwrap();

    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning).follow(false)).await.unwrap();
    let mut resume = 0;
    for _ in 0..5 {
        resume = source.next().await.unwrap().unwrap().next_offset.unwrap();
    }
    let mut rest = backend.source(&SourceOptions::from(StartFrom::Offset(resume)).follow(false)).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(r) = rest.next().await.unwrap() {
        assert_eq!(r.position, Position::Offset(resume));
        resume = r.next_offset.unwrap();
        seqs.push(broker_testkit::seq_of(&r.event).unwrap());
    }
    assert_eq!(seqs, vec![5, 6, 7, 8, 9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_growth_from_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.log");
    std::fs::write(&path, user_event("before", 0).to_json().into_iter().chain([b'\n']).collect::<Vec<u8>>()).unwrap();
    let backend = FileBackend::new(FileConfig::new(&path));
    let mut source = backend.source(&SourceOptions::default()).await.unwrap();
    let broker = backend.connect().await.unwrap();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..3 {
            let r = tokio::time::timeout(Duration::from_secs(10), source.next()).await.unwrap().unwrap().unwrap();
            got.push(r.raw);
        }
        got
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events: Vec<_> = (0..3).map(|i| user_event("after", i)).collect();
    let want: Vec<Vec<u8>> = events.iter().map(|e| e.to_json()).collect();
    publish_all(broker.as_ref(), events).await;
    assert_eq!(reader.await.unwrap(), want, "only what was appended after opening, in order");
    broker.close().await.unwrap();
}

#[tokio::test]
async fn a_full_disk_makes_events_wait_not_fail_and_close_reports_them() {
    // /dev/full accepts the open and refuses every write with ENOSPC: a real disk-full.
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full on this system");
        return;
    }
    let delivery = broker_core::DeliveryOptions::default().close_timeout(std::time::Duration::from_millis(500));
    let broker = FileBackend::new(FileConfig::new("/dev/full").delivery(delivery)).connect().await.unwrap();
    let events: Vec<_> = (0..5).map(|i| user_event("x", i)).collect();
    let mut receipts = Vec::new();
    for e in events.clone() {
        receipts.push(broker.publish(e).await.unwrap());
    }
    let t0 = std::time::Instant::now();
    while broker.is_ready().await {
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "not ready once writes fail");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let report = broker.close().await.unwrap();
    let got: Vec<Vec<u8>> = report.undelivered.iter().map(|e| e.to_json()).collect();
    let want: Vec<Vec<u8>> = events.iter().map(|e| e.to_json()).collect();
    assert_eq!(got, want, "every event waited, and close lists them in publish order");
    for r in receipts {
        match r.await {
            Err(Error::Timeout(_)) => {}
            other => panic!("a waiting event ends undelivered at the deadline, not rejected: {other:?}"),
        }
    }
}

#[test]
fn options_are_validated_with_hints() {
    let opts =
        Options::from_pairs([("path", ConfigValue::Str("x.log".into())), ("fsync", ConfigValue::Str("BATCH".into()))]);
    assert!(FileFactory.configure(opts).is_ok());

    let opts = Options::from_pairs([("paht", ConfigValue::Str("x.log".into()))]);
    let err = FileFactory.configure(opts).unwrap_err();
    assert!(err.to_string().contains("did you mean `path`?"), "{err}");

    let opts = Options::from_pairs([("fsync", ConfigValue::Str("sometimes".into()))]);
    let err = FileFactory.configure(opts).unwrap_err();
    assert!(err.to_string().contains("allowed: never, batch, interval"), "{err}");
}

/// A real full disk, then room again: a 256 KiB tmpfs filled up by another file. Writes fail
/// with ENOSPC (a partial one is cut back), the events wait and `is_ready()` is false; once the
/// other file is deleted every event lands, in order, each once, none rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_then_room_again_delivers_everything_in_order() {
    const TEST: &str = "a_full_disk_then_room_again_delivers_everything_in_order";
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        broker_testkit::services::skip(TEST, "cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_owned());
    let filler_path = dir.path().join("filler");
    let mut filler = std::fs::File::create(&filler_path).unwrap();
    use std::io::Write;
    for _ in 0..1000 {
        if filler.write_all(&[b'x'; 1024]).is_err() {
            break;
        }
    }
    drop(filler);
    let path = dir.path().join("rasa_event.log");
    let broker = FileBackend::new(FileConfig::new(&path)).connect().await.unwrap();
    let events: Vec<_> = (0..200).map(|i| user_event("disk", i)).collect();
    let mut receipts = Vec::new();
    for e in events.clone() {
        receipts.push(broker.publish(e).await.unwrap());
    }
    let t0 = std::time::Instant::now();
    while broker.is_ready().await {
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "still ready on a full disk");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    std::fs::remove_file(&filler_path).unwrap();
    for (i, r) in receipts.into_iter().enumerate() {
        match tokio::time::timeout(std::time::Duration::from_secs(30), r).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("event {i} failed on a full disk instead of waiting: {e}"),
            Err(_) => panic!("event {i} not delivered 30 s after room came back"),
        }
    }
    assert!(broker.close().await.unwrap().is_clean());
    let want: Vec<u8> = events.iter().flat_map(|e| [e.to_json(), b"\n".to_vec()].concat()).collect();
    assert_eq!(std::fs::read(&path).unwrap(), want, "every event once, in order, no torn line");
}

/// Lines of events `from..to` of sender `s`, as the file holds them.
fn lines(s: &str, from: u64, to: u64) -> String {
    (from..to).map(|i| format!("{}\n", String::from_utf8(user_event(s, i).to_json()).unwrap())).collect()
}

fn append(path: &std::path::Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// The next `n` events of a following source as (sender, seq), each within 10 s.
async fn take(source: &mut Box<dyn broker_core::EventSource>, n: usize) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = tokio::time::timeout(Duration::from_secs(10), source.next()).await.expect("an event").unwrap().unwrap();
        out.push((r.event.sender_id().unwrap().to_owned(), broker_testkit::seq_of(&r.event).unwrap()));
    }
    out
}

fn seqs(s: &str, from: u64, to: u64) -> Vec<(String, u64)> {
    (from..to).map(|i| (s.to_owned(), i)).collect()
}

/// Rotation by rename (logrotate's default): the old file's last lines, written after the
/// rename, are read, then the new file from its start, even when it is longer than the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_a_rotation_by_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.log");
    append(&path, &lines("old", 0, 3));
    let backend = FileBackend::new(FileConfig::new(&path));
    let mut source = backend.source(&SourceOptions::from(StartFrom::Beginning)).await.unwrap();
    assert_eq!(take(&mut source, 3).await, seqs("old", 0, 3));
    std::fs::rename(&path, dir.path().join("events.log.1")).unwrap();
    // The writer still had the old file open.
    append(&dir.path().join("events.log.1"), &lines("old", 3, 4));
    append(&path, &lines("new", 0, 10));
    let mut want = seqs("old", 3, 4);
    want.extend(seqs("new", 0, 10));
    assert_eq!(take(&mut source, 11).await, want);
}

/// A line over the cap (no newline for 64 MiB) is reported once, with its offset, and skipped;
/// the events after it come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_line_is_reported_and_skipped_not_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.log");
    append(&path, &lines("a", 0, 1));
    let start_of_long = std::fs::metadata(&path).unwrap().len();
    append(&path, &"x".repeat(broker_file::MAX_LINE_BYTES + 100));
    append(&path, "\n");
    append(&path, &lines("a", 1, 2));
    let mut source = FileBackend::new(FileConfig::new(&path))
        .source(&SourceOptions::from(StartFrom::Beginning).follow(false))
        .await
        .unwrap();
    assert_eq!(broker_testkit::seq_of(&source.next().await.unwrap().unwrap().event), Some(0));
    match source.next().await {
        Err(Error::Malformed { position: Position::Line { line: 2, offset }, reason }) => {
            assert_eq!(offset, start_of_long);
            assert!(reason.contains("longer than"), "{reason}");
        }
        other => panic!("expected the long line to be reported, got {other:?}"),
    }
    let after = source.next().await.unwrap().unwrap();
    assert_eq!(broker_testkit::seq_of(&after.event), Some(1));
    assert_eq!(
        after.position,
        Position::Line { line: 3, offset: start_of_long + broker_file::MAX_LINE_BYTES as u64 + 101 }
    );
    assert!(source.next().await.unwrap().is_none());
}
