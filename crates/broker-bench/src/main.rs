//! `broker-bench BACKEND...`: publishes a realistic mix of Rasa events through each backend and
//! through a raw-client baseline in the same run, and prints events/s, p50/p99
//! publish-to-confirm latency, peak memory and the ratio ours/raw (docs/contract.md §F). Results also go
//! to `target/bench/<backend>.json`.
//!
//! Each measurement runs in a child process of its own (`broker-bench run VARIANT`), so its peak
//! memory (VmHWM) is its own.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod kafka;
mod pika;
mod sql;

use anyhow::{Context, Result, bail};
use broker_core::{Backend, Event};
use broker_file::{FileBackend, FileConfig, Fsync};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SENDERS: u64 = 1000;
/// The file backend's default `max_batch_events`; the raw loop flushes at the same boundaries.
const BATCH: usize = 4096;
/// One event in this many has its latency recorded.
const SAMPLE_EVERY: usize = 16;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let events = flag(&args, "--events").unwrap_or(200_000);
    let runs = flag(&args, "--runs").unwrap_or(5).max(1) as usize;
    match args.first().map(String::as_str) {
        Some("run") => {
            let variant = args.get(1).context("run VARIANT")?;
            let dir = PathBuf::from(args.get(2).context("run VARIANT DIR")?);
            let result = run_variant(variant, &dir, events)?;
            println!("{result}");
            Ok(())
        }
        Some("file") => bench_file(events, runs),
        Some("sql") => sql::bench(flag(&args, "--events").unwrap_or(100_000), runs),
        // The Kafka goals are on 500,000 events (issue: bulk speed).
        Some("kafka") => kafka::bench(flag(&args, "--events").unwrap_or(500_000), runs),
        Some("pika") => pika::bench(flag(&args, "--events").unwrap_or(100_000), runs),
        Some(other) => bail!("unknown backend {other:?}: this build benchmarks: file, sql, kafka, pika"),
        None => bench_file(events, runs),
    }
}

fn flag(args: &[String], name: &str) -> Option<u64> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

pub(crate) fn peak_rss_mib() -> f64 {
    peak_rss_of("self")
}

fn peak_rss_of(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn result(
    variant: &str,
    events: u64,
    elapsed: Duration,
    mut latencies_us: Vec<u64>,
    peak_mib: f64,
) -> serde_json::Value {
    latencies_us.sort_unstable();
    json!({
        "variant": variant,
        "events": events,
        "seconds": elapsed.as_secs_f64(),
        "events_per_s": events as f64 / elapsed.as_secs_f64(),
        "p50_ms": percentile(&latencies_us, 0.50),
        "p99_ms": percentile(&latencies_us, 0.99),
        "peak_mib": peak_mib,
    })
}

pub(crate) fn dataset(n: u64) -> Vec<Event> {
    (0..n).map(|i| broker_testkit::mixed_event(i, SENDERS)).collect()
}

/// Runs one variant; a name may end in `@N` (the same variant at another size, e.g. `cli@1000000`).
fn run_variant(variant: &str, dir: &Path, n: u64) -> Result<serde_json::Value> {
    let path = dir.join(format!("{variant}.log"));
    let _ = std::fs::remove_file(&path);
    match variant.split('@').next().unwrap_or(variant) {
        "ours-never" => ours(variant, &path, n, Fsync::Never),
        "ours-batch" => ours(variant, &path, n, Fsync::Batch),
        "raw-never" => raw(variant, &path, n, false),
        "raw-batch" => raw(variant, &path, n, true),
        "cli" => cli(variant, dir, n),
        "bridge" => bridge(variant, dir, n),
        "cli-spool-batch" => cli_spool(variant, dir, n, "batch"),
        "cli-spool-never" => cli_spool(variant, dir, n, "never"),
        "lines-raw" => lines_raw(variant, dir, n),
        "encode-only" => encode_only(variant, &path, n),
        "parse-only" => parse_only(variant, n),
        other if other.starts_with("sqlite-") || other.starts_with("pg-") => sql::run(other, dir, n),
        other if other.starts_with("kafka-") => kafka::run(other, variant, dir, n),
        other if other.starts_with("pika-") => pika::run(other, n),
        other => bail!("unknown variant {other}"),
    }
}

/// Our file backend.
fn ours(variant: &str, path: &Path, n: u64, fsync: Fsync) -> Result<serde_json::Value> {
    let backend = FileBackend::new(FileConfig::new(path).fsync(fsync));
    let r = publish_through(variant, Box::new(backend), dataset(n))?;
    check_lines(path, n)?;
    Ok(r)
}

/// Publishes `events` through `backend` without waiting, as a tracker does, and times it until
/// every event is confirmed. Every `SAMPLE_EVERY`-th receipt goes to a collector task that
/// records its publish-to-confirm latency (the others are dropped: `flush` waits for them), so
/// measuring costs little.
pub(crate) fn publish_through(
    variant: &str,
    backend: Box<dyn Backend>,
    events: Vec<Event>,
) -> Result<serde_json::Value> {
    let n = events.len() as u64;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let broker = backend.connect().await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, broker_core::Receipt)>();
        let collector = tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n as usize);
            let mut failed = 0u64;
            while let Some((t0, r)) = rx.recv().await {
                match r.await {
                    Ok(_) => lat.push(t0.elapsed().as_nanos() as u64 / 1000),
                    Err(_) => failed += 1,
                }
            }
            (lat, failed)
        });
        let started = Instant::now();
        for (i, e) in events.into_iter().enumerate() {
            if i % SAMPLE_EVERY == 0 {
                let t0 = Instant::now();
                let r = broker.publish(e).await?;
                let _ = tx.send((t0, r));
            } else {
                drop(broker.publish(e).await?);
            }
        }
        drop(tx);
        let (lat, failed) = collector.await?;
        broker.flush().await?;
        let elapsed = started.elapsed();
        broker.close().await?;
        if failed > 0 {
            bail!("{failed} events failed");
        }
        Ok(result(variant, n, elapsed, lat, peak_rss_mib()))
    })
}

/// The raw baseline: serde_json into a BufWriter, flushed (and fsynced for `batch`) every
/// `BATCH` events, which is when those events count as confirmed.
fn raw(variant: &str, path: &Path, n: u64, fsync: bool) -> Result<serde_json::Value> {
    let values: Vec<serde_json::Value> =
        dataset(n).iter().map(|e| serde_json::from_slice(&e.to_json())).collect::<Result<_, _>>()?;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut lat = Vec::with_capacity(n as usize);
    let mut batch_starts: VecDeque<Instant> = VecDeque::with_capacity(BATCH);
    let started = Instant::now();
    for v in &values {
        batch_starts.push_back(Instant::now());
        serde_json::to_writer(&mut w, v)?;
        w.write_all(b"\n")?;
        if batch_starts.len() == BATCH {
            w.flush()?;
            if fsync {
                w.get_ref().sync_data()?;
            }
            lat.extend(batch_starts.drain(..).map(|t| t.elapsed().as_nanos() as u64 / 1000));
        }
    }
    w.flush()?;
    if fsync {
        w.get_ref().sync_data()?;
    }
    lat.extend(batch_starts.drain(..).map(|t| t.elapsed().as_nanos() as u64 / 1000));
    let elapsed = started.elapsed();
    check_lines(path, n)?;
    Ok(result(variant, n, elapsed, lat, peak_rss_mib()))
}

/// Diagnostic: our Rasa encoder into a BufWriter, no pipeline (what the pipeline costs on top).
fn encode_only(variant: &str, path: &Path, n: u64) -> Result<serde_json::Value> {
    let events = dataset(n);
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(1024);
    let started = Instant::now();
    for e in events {
        buf.clear();
        e.write_json(&mut buf);
        buf.push(b'\n');
        w.write_all(&buf)?;
    }
    w.flush()?;
    let elapsed = started.elapsed();
    check_lines(path, n)?;
    Ok(result(variant, n, elapsed, Vec::new(), peak_rss_mib()))
}

/// Diagnostic: parsing JSON lines into events, nothing else (the CLI's extra work).
fn parse_only(variant: &str, n: u64) -> Result<serde_json::Value> {
    let lines: Vec<Vec<u8>> = dataset(n).iter().map(Event::to_json).collect();
    let started = Instant::now();
    let mut kept = 0usize;
    for l in &lines {
        kept += Event::from_json(l)?.event_type().len();
    }
    let elapsed = started.elapsed();
    std::hint::black_box(kept);
    Ok(result(variant, n, elapsed, Vec::new(), peak_rss_mib()))
}

/// `broker publish FILE` on a JSON-lines file of the same events: parsing, publishing, closing.
/// The CLI's input: `n` events as JSON lines, in Rasa's encoding.
fn cli_input(dir: &Path, n: u64) -> Result<PathBuf> {
    let input = dir.join("cli-input.jsonl");
    let mut w = BufWriter::new(File::create(&input)?);
    for e in dataset(n) {
        w.write_all(&e.to_json())?;
        w.write_all(b"\n")?;
    }
    // On disk before the measured run: otherwise the kernel writes it back during that run.
    w.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
    Ok(input)
}

/// The limit of relaying JSON lines to a file: read lines, write them, flush every `BATCH`
/// lines; no parsing, in this process (the CLI's time includes its start).
fn lines_raw(variant: &str, dir: &Path, n: u64) -> Result<serde_json::Value> {
    use std::io::BufRead;
    let input = cli_input(dir, n)?;
    let output = dir.join("lines-raw.log");
    let _ = std::fs::remove_file(&output);
    let started = Instant::now();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, File::open(&input)?);
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&output)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(4096);
    let mut count = 0usize;
    while reader.read_until(b'\n', &mut line)? > 0 {
        w.write_all(&line)?;
        line.clear();
        count += 1;
        if count % BATCH == 0 {
            w.flush()?;
        }
    }
    w.flush()?;
    let elapsed = started.elapsed();
    if count as u64 != n || std::fs::read(&output)? != std::fs::read(&input)? {
        bail!("the raw relay's output differs from its input");
    }
    Ok(result(variant, n, elapsed, Vec::new(), peak_rss_mib()))
}

fn cli(variant: &str, dir: &Path, n: u64) -> Result<serde_json::Value> {
    let (r, input, work) = cli_publish(variant, dir, n, "event_broker:\n  type: file\n  path: rasa_event.log\n")?;
    if std::fs::read(work.join("rasa_event.log"))? != std::fs::read(&input)? {
        bail!("the CLI's output differs from its input");
    }
    Ok(r)
}

/// `broker publish` to the file backend behind a disk spool (`fsync` of the spool: batch or
/// never), whole process: compared with `cli`, the same without the spool.
fn cli_spool(variant: &str, dir: &Path, n: u64, fsync: &str) -> Result<serde_json::Value> {
    let spool = dir.join("cli-spool");
    let _ = std::fs::remove_dir_all(&spool);
    let endpoints = format!(
        "event_broker:\n  type: file\n  path: rasa_event.log\n  spool:\n    path: {}\n    fsync: {fsync}\n",
        spool.display()
    );
    let (r, input, work) = cli_publish(variant, dir, n, &endpoints)?;
    if std::fs::read(work.join("rasa_event.log"))? != std::fs::read(&input)? {
        bail!("the spooled CLI's output differs from its input");
    }
    let _ = std::fs::remove_dir_all(&spool);
    Ok(r)
}

/// `broker bridge` from a file of the `n` events to the file backend, whole process: compared
/// with `broker publish` of the same file (`cli`).
fn bridge(variant: &str, dir: &Path, n: u64) -> Result<serde_json::Value> {
    let endpoints = "event_broker:\n  type: file\n  path: rasa_event.log\n";
    let (r, input, work) = cli_run(variant, dir, n, endpoints, |input, work| {
        let from = format!("event_broker:\n  type: file\n  path: {}\n", input.display());
        std::fs::write(work.join("from.yml"), from)?;
        Ok(["bridge", "--from", "from.yml", "--to", "endpoints.yml", "--checkpoint", "cp.json", "--until-end"]
            .map(String::from)
            .to_vec())
    })?;
    if std::fs::read(work.join("rasa_event.log"))? != std::fs::read(&input)? {
        bail!("the bridge's output differs from its input");
    }
    Ok(r)
}

/// `broker publish` of `n` events, whole process, with `endpoints` as its endpoints.yml; exit
/// code 0 (everything delivered) or an error. Returns the result, the input and the working
/// directory.
pub(crate) fn cli_publish(
    variant: &str,
    dir: &Path,
    n: u64,
    endpoints: &str,
) -> Result<(serde_json::Value, PathBuf, PathBuf)> {
    cli_run(variant, dir, n, endpoints, |input, _| Ok(vec!["publish".to_owned(), input.display().to_string()]))
}

/// `broker ARGS` on `n` events, whole process, in a fresh working directory with `endpoints` as
/// its endpoints.yml; `args` gets the input file and that directory.
fn cli_run(
    variant: &str,
    dir: &Path,
    n: u64,
    endpoints: &str,
    args: impl FnOnce(&Path, &Path) -> Result<Vec<String>>,
) -> Result<(serde_json::Value, PathBuf, PathBuf)> {
    let input = cli_input(dir, n)?;
    let work = dir.join("cli-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("endpoints.yml"), endpoints)?;
    let args = args(&input, &work)?;
    let exe = std::env::current_exe()?.with_file_name("broker");
    if !exe.exists() {
        bail!("{} not found: build it with `cargo build --release -p broker-cli`", exe.display());
    }
    let started = Instant::now();
    let mut child = Command::new(&exe)
        .args(&args)
        .current_dir(&work)
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    let pid = child.id().to_string();
    let mut peak = 0.0f64;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        peak = peak.max(peak_rss_of(&pid));
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    if !status.success() {
        bail!("broker {} failed: {status}", args.first().map_or("", String::as_str));
    }
    Ok((result(variant, n, elapsed, Vec::new(), peak), input, work))
}

fn check_lines(path: &Path, n: u64) -> Result<()> {
    let data = std::fs::read(path)?;
    let lines = data.iter().filter(|&&b| b == b'\n').count() as u64;
    if lines != n {
        bail!("{} has {lines} lines, expected {n}", path.display());
    }
    Ok(())
}

fn run_child(variant: &str, dir: &Path, events: u64) -> Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .args(["run", variant, &dir.display().to_string(), "--events", &events.to_string()])
        .output()?;
    if !out.status.success() {
        bail!("{variant}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// What one backend's bench runs and compares.
pub(crate) struct Plan {
    pub(crate) backend: &'static str,
    pub(crate) describe: String,
    /// Variant names with their event counts.
    pub(crate) variants: Vec<(&'static str, u64)>,
    /// (ours, baseline, target ratio).
    pub(crate) comparisons: Vec<(&'static str, &'static str, f64)>,
    /// (variant, the least events/s it must reach): goals that are a rate, not a ratio.
    pub(crate) rates: Vec<(&'static str, f64)>,
    pub(crate) note: &'static str,
}

fn bench_file(events: u64, runs: usize) -> Result<()> {
    let avg = dataset(1000).iter().map(|e| e.to_json().len() + 1).sum::<usize>() / 1000;
    run_plan(
        Plan {
            backend: "file",
            describe: format!("{events} events (mix of user/bot/action/slot, {avg} bytes on average)"),
            variants: [
                "raw-never",
                "ours-never",
                "raw-batch",
                "ours-batch",
                "lines-raw",
                "cli",
                "bridge",
                "cli-spool-batch",
                "cli-spool-never",
            ]
            .iter()
            .map(|v| (*v, events))
            .chain([("cli@50000", 50_000), ("cli@500000", 500_000), ("cli@1000000", 1_000_000)])
            .collect(),
            rates: vec![("cli@500000", 1_000_000.0)],
            comparisons: vec![
                ("ours-never", "raw-never", 0.8),
                ("ours-batch", "raw-batch", 0.8),
                ("cli", "raw-never", 0.5),
                ("cli", "lines-raw", 0.25),
                ("bridge", "cli", 0.25),
                ("cli-spool-batch", "cli", 0.5),
                ("cli-spool-never", "cli", 0.8),
            ],
            note: "raw-*: serde_json into a BufWriter flushed every 4096 events (batch: + fdatasync), ours-*: \
                   the file backend with fsync never/batch; lines-raw: JSON lines read and written unparsed, in-process; \
                   cli: `broker publish` of a JSON-lines file, whole process, parsing included (cli@N: of N events; its peak MiB is the whole process's); \
                   cli-spool-*: `broker publish` with a disk spool (fsync batch/never) in front of the file backend; \
                   bridge: `broker bridge` from that file (a file source) to the file backend, whole process, acknowledged in order with a checkpoint",
        },
        runs,
    )
}

pub(crate) fn run_plan(plan: Plan, runs: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("broker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "{}: {}, {runs} rounds; each round runs every variant once, in its own process, so machine noise hits all alike",
        plan.backend, plan.describe
    );
    let mut all: Vec<Vec<serde_json::Value>> = vec![Vec::new(); plan.variants.len()];
    for round in 0..runs {
        let mut line = format!("  round {}:", round + 1);
        for (i, (variant, n)) in plan.variants.iter().enumerate() {
            let r = run_child(variant, &dir, *n)?;
            line.push_str(&format!(" {variant} {:.0}/s", r["events_per_s"].as_f64().unwrap_or(0.0)));
            all[i].push(r);
        }
        eprintln!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let index = |v: &str| plan.variants.iter().position(|(n, _)| *n == v).unwrap_or(0);
    let rate = |i: usize, round: usize| all[i][round]["events_per_s"].as_f64().unwrap_or(0.0);
    let rows: Vec<serde_json::Value> = plan
        .variants
        .iter()
        .enumerate()
        .map(|(i, (v, n))| {
            let pick = |k: &str| median(all[i].iter().map(|r| r[k].as_f64().unwrap_or(0.0)).collect());
            json!({"variant": v, "events": n, "events_per_s": pick("events_per_s"), "p50_ms": pick("p50_ms"),
                   "p99_ms": pick("p99_ms"), "peak_mib": pick("peak_mib"), "rounds": all[i]})
        })
        .collect();
    // Ratios are medians of per-round ratios: a slow moment of the machine hits both sides.
    let comparisons: Vec<serde_json::Value> = plan
        .comparisons
        .iter()
        .map(|(ours, raw, target)| {
            let ratio = median((0..runs).map(|r| rate(index(ours), r) / rate(index(raw), r)).collect());
            json!({"ours": ours, "raw": raw, "ratio": ratio, "target": target, "met": ratio >= *target})
        })
        .collect();
    println!();
    println!(
        "{:<16} {:>9} {:>12} {:>9} {:>9} {:>10}",
        plan.backend, "events", "events/s", "p50 ms", "p99 ms", "peak MiB"
    );
    for r in &rows {
        println!(
            "{:<16} {:>9} {:>12.0} {:>9.2} {:>9.2} {:>10.1}",
            r["variant"].as_str().unwrap_or(""),
            r["events"],
            r["events_per_s"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["peak_mib"].as_f64().unwrap_or(0.0),
        );
    }
    println!("({}; p50/p99: publish-to-confirm)", plan.note);
    println!();
    for c in &comparisons {
        println!(
            "ratio {} / {}: {:.2} (target >= {}{})",
            c["ours"].as_str().unwrap_or(""),
            c["raw"].as_str().unwrap_or(""),
            c["ratio"].as_f64().unwrap_or(0.0),
            c["target"],
            if c["met"].as_bool().unwrap_or(false) { ", met" } else { ", NOT MET" }
        );
    }
    let rates: Vec<serde_json::Value> = plan
        .rates
        .iter()
        .map(|(variant, target)| {
            let rate = rows[index(variant)]["events_per_s"].as_f64().unwrap_or(0.0);
            json!({"variant": variant, "events_per_s": rate, "target": target, "met": rate >= *target})
        })
        .collect();
    for r in &rates {
        println!(
            "rate {}: {:.0} events/s (target >= {:.0}{})",
            r["variant"].as_str().unwrap_or(""),
            r["events_per_s"].as_f64().unwrap_or(0.0),
            r["target"].as_f64().unwrap_or(0.0),
            if r["met"].as_bool().unwrap_or(false) { ", met" } else { ", NOT MET" }
        );
    }
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let report = json!({"backend": plan.backend, "workload": plan.describe, "rounds": runs,
                        "results": rows, "comparisons": comparisons, "rates": rates, "note": plan.note});
    let path = out_dir.join(format!("{}.json", plan.backend));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

/// `target/` of this workspace: two levels above the binary (`target/release/broker-bench`).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("target"))
}
