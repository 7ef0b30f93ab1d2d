//! `broker`: publish, tail and check tracker events through the broker configured in Rasa's
//! `endpoints.yml` (contracts §D).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use broker_core::{Backend, Error, Event, EventBroker, Receipt, SourceOptions, StartFrom};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The embedded default's database (contracts §D).
const DEFAULT_SQLITE: &str = "events.db";

/// Publish, tail and check Rasa tracker events through the broker configured in endpoints.yml.
#[derive(Debug, Parser)]
#[command(name = "broker", version, about, long_about = None)]
struct Cli {
    /// The endpoints file. Default: ./endpoints.yml when it exists, else the embedded default
    /// (SQLite database events.db in the working directory).
    #[arg(long, global = true, value_name = "PATH")]
    endpoints: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish JSON-lines events from files (or stdin) in order.
    Publish {
        /// Input files; none or `-` reads stdin.
        files: Vec<PathBuf>,
        /// Count and report invalid lines instead of stopping at the first one.
        #[arg(long)]
        skip_invalid: bool,
    },
    /// Print consumed events as JSON lines, exactly as stored.
    Tail {
        /// Start at the oldest stored event instead of the backend's resume point.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Stop after this many seconds without an event.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
        /// Consumer group (Kafka).
        #[arg(long, default_value = "broker-cli")]
        group: String,
    },
    /// Validate the configuration, connect, and report readiness.
    Check,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BROKER_LOG").unwrap_or_else(|_| "warn".into()))
        .with_target(false)
        .without_time()
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let backend = resolve_backend(cli.endpoints.as_deref())?;
    match cli.command {
        Command::Publish { files, skip_invalid } => publish(backend.as_ref(), &files, skip_invalid).await,
        Command::Tail { from_beginning, limit, timeout, group } => {
            tail(backend.as_ref(), from_beginning, limit, timeout, group).await
        }
        Command::Check => check(backend.as_ref()).await,
    }
}

/// `--endpoints`, else `./endpoints.yml`, else the embedded default (said once on stderr).
fn resolve_backend(endpoints: Option<&Path>) -> Result<Box<dyn Backend>> {
    let registry = broker_config::default_registry();
    let path = match endpoints {
        Some(p) => {
            if !p.exists() {
                bail!("the endpoints file {} does not exist", p.display());
            }
            Some(p.to_owned())
        }
        None => Some(PathBuf::from("endpoints.yml")).filter(|p| p.exists()),
    };
    let Some(path) = path else {
        eprintln!(
            "broker: no endpoints.yml here; using the embedded default: SQLite database {DEFAULT_SQLITE} in the \
             working directory (type: sql)"
        );
        return Ok(Box::new(broker_sql::SqlBackend::new(broker_sql::SqlConfig::sqlite(DEFAULT_SQLITE))));
    };
    let configured = broker_config::load(&path, &registry)?
        .ok_or_else(|| anyhow!("{} has no event_broker section: no event broker is configured", path.display()))?;
    for warning in &configured.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(configured.backend)
}

fn progress(total_bytes: Option<u64>) -> ProgressBar {
    let on_terminal = io::stderr().is_terminal() && io::stdout().is_terminal();
    if !on_terminal {
        return ProgressBar::hidden();
    }
    let bar = match total_bytes {
        Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Counts of a publish run.
#[derive(Default)]
struct Tally {
    read: u64,
    delivered: u64,
    failed: u64,
    skipped: u64,
    first_failure: Option<String>,
}

impl Tally {
    fn settle(&mut self, outcome: Result<broker_core::Delivered, Error>) {
        match outcome {
            Ok(_) => self.delivered += 1,
            Err(e) => {
                self.failed += 1;
                if self.first_failure.is_none() {
                    self.first_failure = Some(e.to_string());
                }
            }
        }
    }
}

/// How many outcomes may be outstanding before the oldest is awaited; the broker's own buffer
/// bounds memory further down.
const WINDOW: usize = 65_536;

/// Lines the reader thread hands over at once.
const CHUNK: usize = 512;

/// What the reader thread found, in input order.
enum Item {
    Event(Event),
    /// An invalid line skipped under `--skip-invalid`.
    Skipped(String),
    /// An invalid line or unreadable input that ends the run.
    Stop(String),
}

/// Reading and parsing run on their own thread, so on a multi-core machine they overlap with
/// publishing (which encodes nothing for events read from bytes) and with the backend's writer.
fn spawn_reader(
    inputs: Vec<Option<PathBuf>>,
    skip_invalid: bool,
    bar: ProgressBar,
) -> tokio::sync::mpsc::Receiver<Vec<Item>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Item>>(16);
    std::thread::spawn(move || {
        let send = |chunk: Vec<Item>| tx.blocking_send(chunk).is_ok();
        for input in inputs {
            let (name, reader): (String, Box<dyn Read>) = match &input {
                Some(p) => match File::open(p) {
                    Ok(f) => (p.display().to_string(), Box::new(f)),
                    Err(e) => {
                        send(vec![Item::Stop(format!("cannot open {}: {e}", p.display()))]);
                        return;
                    }
                },
                None => ("<stdin>".into(), Box::new(io::stdin().lock())),
            };
            let mut reader = BufReader::with_capacity(1 << 20, reader);
            let mut line = Vec::with_capacity(4096);
            let mut line_no = 0u64;
            let mut chunk = Vec::with_capacity(CHUNK);
            loop {
                line.clear();
                let n = match reader.read_until(b'\n', &mut line) {
                    Ok(n) => n,
                    Err(e) => {
                        chunk.push(Item::Stop(format!("reading {name}: {e}")));
                        send(chunk);
                        return;
                    }
                };
                if n == 0 {
                    break;
                }
                line_no += 1;
                bar.inc(n as u64);
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                if text.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match Event::from_json(text) {
                    Ok(e) => chunk.push(Item::Event(e)),
                    Err(e) if skip_invalid => chunk.push(Item::Skipped(format!("{name}:{line_no}: {e}"))),
                    Err(e) => {
                        chunk.push(Item::Stop(format!(
                            "{name}:{line_no}: invalid event: {e} (use --skip-invalid to skip such lines)"
                        )));
                        send(chunk);
                        return;
                    }
                }
                if chunk.len() >= CHUNK && !send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK))) {
                    return;
                }
            }
            if !chunk.is_empty() && !send(chunk) {
                return;
            }
        }
    });
    rx
}

async fn publish(backend: &dyn Backend, files: &[PathBuf], skip_invalid: bool) -> Result<ExitCode> {
    let inputs: Vec<Option<PathBuf>> = if files.is_empty() {
        vec![None]
    } else {
        files.iter().map(|f| Some(f.clone()).filter(|p| p.as_path() != Path::new("-"))).collect()
    };
    let total: Option<u64> =
        inputs.iter().map(|i| i.as_ref().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len())).sum::<Option<u64>>();
    let broker = backend.connect().await.with_context(|| format!("connecting to {}", backend.describe()))?;
    let bar = progress(total);
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut pending: VecDeque<Receipt> = VecDeque::with_capacity(WINDOW);
    let mut stop: Option<String> = None;
    let mut chunks = spawn_reader(inputs, skip_invalid, bar.clone());

    'chunks: while let Some(chunk) = chunks.recv().await {
        for item in chunk {
            let event = match item {
                Item::Event(e) => e,
                Item::Skipped(why) => {
                    tally.skipped += 1;
                    bar.suspend(|| eprintln!("skipped {why}"));
                    continue;
                }
                Item::Stop(why) => {
                    stop = Some(why);
                    break 'chunks;
                }
            };
            tally.read += 1;
            match broker.publish(event).await {
                Ok(receipt) => pending.push_back(receipt),
                Err(e) => {
                    stop = Some(format!("event {}: publish refused: {e}", tally.read));
                    break 'chunks;
                }
            }
            if pending.len() >= WINDOW {
                if let Some(r) = pending.pop_front() {
                    tally.settle(r.await);
                }
            }
        }
        bar.set_message(format!("{} events", tally.read));
    }
    // Stops the reader if it is still going.
    drop(chunks);
    for r in pending.drain(..) {
        tally.settle(r.await);
    }
    let report = broker.close().await.context("closing the broker")?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { tally.delivered as f64 / secs } else { 0.0 };
    let mut summary =
        format!("broker: read {} events, delivered {}, failed {}", tally.read, tally.delivered, tally.failed);
    if tally.skipped > 0 {
        summary.push_str(&format!(", skipped {} invalid lines", tally.skipped));
    }
    summary.push_str(&format!(" in {secs:.2} s ({rate:.0} events/s) to {}", backend.describe()));
    eprintln!("{summary}");
    if !report.is_clean() {
        eprintln!("broker: {} events were not delivered before the close deadline", report.undelivered.len());
    }
    if let Some(first) = &tally.first_failure {
        eprintln!("broker: first failure: {first}");
    }
    if let Some(why) = stop {
        eprintln!("error: {why}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(if tally.failed == 0 && report.is_clean() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn tail(
    backend: &dyn Backend,
    from_beginning: bool,
    limit: Option<u64>,
    timeout: Option<f64>,
    group: String,
) -> Result<ExitCode> {
    let timeout = match timeout {
        Some(t) if t.is_finite() && t >= 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => bail!("--timeout must be a non-negative number of seconds, got {t}"),
        None => None,
    };
    let start = if from_beginning { StartFrom::Beginning } else { StartFrom::Resume };
    let options = SourceOptions::from(start).group(group);
    let mut source =
        backend.source(&options).await.with_context(|| format!("consuming from {}", backend.describe()))?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut count = 0u64;
    while limit.is_none_or(|l| count < l) {
        let next = match timeout {
            Some(t) => match tokio::time::timeout(t, source.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => source.next().await,
        };
        match next {
            Ok(Some(received)) => {
                let written = out.write_all(&received.raw).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush());
                if let Err(e) = written {
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        source.close().await?;
                        return Ok(ExitCode::SUCCESS);
                    }
                    return Err(e).context("writing to stdout");
                }
                source.ack(&received).await?;
                count += 1;
            }
            Ok(None) => break,
            Err(e @ Error::Malformed { .. }) => eprintln!("broker: skipping {e}"),
            Err(e) => return Err(e).context("consuming"),
        }
    }
    // Acknowledgements must reach the service before the process ends.
    source.close().await.context("closing the consumer")?;
    Ok(ExitCode::SUCCESS)
}

async fn check(backend: &dyn Backend) -> Result<ExitCode> {
    let describe = backend.describe();
    let broker: Box<dyn EventBroker> = match backend.connect().await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("not ready: {describe}: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let ready = broker.is_ready().await;
    broker.close().await?;
    if ready {
        println!("ready: {describe}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("not ready: {describe}");
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn reading_stdin_line_splitting_handles_crlf() {
        let data = b"a\r\nb\n";
        let mut r = BufReader::new(&data[..]);
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        assert_eq!(text.strip_suffix(b"\r").unwrap_or(text), b"a");
    }
}
