//! `broker`: publish, tail and check tracker events through the broker configured in Rasa's
//! `endpoints.yml` (docs/contract.md §D). Exit codes: see [`code`].

mod bridge;
mod export;
mod publish;
mod serve;
mod spool;
mod tail;

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use broker_core::{Backend, Error, EventBroker, QueueChoice};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The exit codes, the same for every command (README, `--help`).
pub(crate) mod code {
    /// Everything delivered / ready.
    pub const OK: u8 = 0;
    /// Some events not delivered (all written to the undelivered file), or a failure midway.
    pub const UNDELIVERED: u8 = 1;
    /// A usage or configuration error (including refused credentials or certificates): nothing
    /// was published.
    pub const CONFIG: u8 = 2;
    /// The service cannot be reached or is not ready.
    pub const UNAVAILABLE: u8 = 3;
    /// Interrupted (SIGINT, SIGTERM).
    pub const INTERRUPTED: u8 = 130;
}

const EXIT_CODES: &str = "Exit codes: 0 everything delivered (check: ready); 1 some events not delivered \
(written to the undelivered file) or a failure midway; 2 usage or configuration error, refused \
credentials or certificates (nothing was published); 3 the service cannot be reached or is not \
ready; 130 interrupted (SIGINT/SIGTERM).";

/// A failed command: the exit code and what to say on stderr.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    pub(crate) fn new(code: u8, error: impl Into<anyhow::Error>) -> Failure {
        Failure { code, error: error.into() }
    }

    fn config(error: impl Into<anyhow::Error>) -> Failure {
        Failure::new(code::CONFIG, error)
    }
}

/// A backend that could not be opened: a configuration or refused login is code 2, a service
/// that cannot be reached code 3.
pub(crate) fn connect_failure(backend: &dyn Backend, e: Error) -> Failure {
    let code = match &e {
        Error::Config(_) | Error::Denied { .. } => code::CONFIG,
        _ => code::UNAVAILABLE,
    };
    Failure::new(code, anyhow::Error::new(e).context(format!("connecting to {}", backend.describe())))
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The embedded default's database (docs/contract.md §D).
#[cfg(feature = "sql")]
const DEFAULT_SQLITE: &str = "events.db";
#[cfg(not(feature = "sql"))]
const DEFAULT_FILE: &str = "rasa_event.log";

/// Publish, tail and check Rasa tracker events through the broker configured in endpoints.yml.
#[derive(Debug, Parser)]
#[command(name = "broker", version, about, long_about = None, after_help = EXIT_CODES)]
struct Cli {
    /// The endpoints file. Default: ./endpoints.yml when it exists, else the embedded default
    /// (SQLite database events.db in the working directory).
    #[arg(long, global = true, value_name = "PATH", env = "BROKER_ENDPOINTS")]
    endpoints: Option<PathBuf>,

    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG wins when set.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only errors on stderr (the summary is still printed).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,

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
        /// Append every event read and not delivered to PATH (Rasa's bytes, one per line, in
        /// publish order), for a later `broker publish PATH`. Default: a new
        /// undelivered-YYYYMMDDTHHMMSSZ.jsonl (UTC) in the working directory, named on stderr.
        #[arg(long, value_name = "PATH")]
        undelivered: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics and readiness at /ready (200 or
        /// 503) while the command runs, e.g. 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Print consumed events as JSON lines, exactly as stored. On RabbitMQ it shows live events
    /// through a private queue and takes nothing from the configured queues (see --consume).
    Tail {
        /// Start at the oldest stored event instead of the backend's resume point (RabbitMQ:
        /// needs --consume).
        #[arg(long)]
        from_beginning: bool,
        /// RabbitMQ: consume QUEUE (default: the first configured queue) with acks instead of a
        /// private view: the events shown are taken away from that queue's other consumers.
        #[arg(long, value_name = "QUEUE", num_args = 0..=1)]
        consume: Option<Option<String>>,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Stop after this many seconds without an event.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
        /// Consumer group (Kafka).
        #[arg(long, default_value = "broker-cli")]
        group: String,
        /// Stop once caught up with what is stored (file, SQL, Kafka; like kcat -e).
        #[arg(long)]
        until_end: bool,
        /// How each event is printed.
        #[arg(long, value_enum, default_value = "lines")]
        format: tail::Format,
        /// Serve Prometheus metrics at http://ADDR/metrics and /ready while consuming.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Rasa's `rasa export`: publish the events of the endpoints file's tracker_store (sql, redis) to
    /// its event_broker, per conversation in timestamp order, with `sender_id` added last.
    Export(export::Args),
    /// Consume from the event_broker of FROM and publish to the event_broker of TO, any pair of
    /// backends: at least once, in order, acknowledged at the source only once TO confirmed.
    Bridge(bridge::Args),
    /// The disk spool of the endpoints file's event_broker (`spool:`).
    Spool {
        #[command(subcommand)]
        action: SpoolAction,
    },
    /// Validate the configuration, connect, and report readiness and the server's version.
    Check,
    /// Print a shell completion script (e.g. `broker completions bash > /etc/bash_completion.d/broker`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum SpoolAction {
    /// Events waiting in the spool, its bytes and the oldest event's age (exit 0; 3 while a
    /// running broker holds the spool).
    Status,
}

/// Logs to stderr: `RUST_LOG` (or its older name `BROKER_LOG`) when set, else the level of
/// `-q`/`-v`; colours only on a terminal and without `NO_COLOR`.
fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("BROKER_LOG"))
        .unwrap_or_else(|_| level.into());
    let colour = io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_target(false)
        .without_time()
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(code::UNDELIVERED);
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Everything the command owed is done: every event has its outcome, the summary and the
    // undelivered file are written. What may still run is clean-up (a Kafka producer released on
    // the blocking pool): waited for, so no client library is mid-destroy while the process
    // exits, but not for ever.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "broker", &mut script);
        let mut out = io::stdout().lock();
        out.write_all(&script).and_then(|()| out.flush()).map_err(|e| {
            Failure::new(code::UNDELIVERED, anyhow::Error::new(e).context("writing the completion script"))
        })?;
        return Ok(code::OK);
    }
    if let Command::Export(args) = cli.command {
        return export::export(cli.endpoints.as_deref(), args).await;
    }
    if let Command::Bridge(args) = cli.command {
        return bridge::bridge(args).await;
    }
    if let Command::Spool { action: SpoolAction::Status } = cli.command {
        return spool::status(cli.endpoints.as_deref());
    }
    let backend = resolve_backend(cli.endpoints.as_deref()).map_err(Failure::config)?;
    match cli.command {
        Command::Publish { files, skip_invalid, undelivered, metrics_addr } => {
            let args = publish::Args { files, skip_invalid, undelivered, metrics_addr };
            publish::publish(backend.as_ref(), args).await
        }
        Command::Tail { from_beginning, consume, limit, timeout, group, until_end, format, metrics_addr } => {
            if let Some(addr) = metrics_addr {
                let handle = serve::install().map_err(Failure::config)?;
                serve::serve(addr, handle, serve::Readiness::Running).await.map_err(Failure::config)?;
            }
            let queue = match consume {
                None => QueueChoice::Private,
                Some(None) => QueueChoice::Configured,
                Some(Some(q)) => QueueChoice::Named(q),
            };
            let args = tail::TailArgs { from_beginning, queue, limit, timeout, group, until_end, format };
            tail::tail(backend.as_ref(), args).await
        }
        Command::Check => check(backend.as_ref()).await,
        Command::Completions { .. } | Command::Export(_) | Command::Bridge(_) | Command::Spool { .. } => Ok(code::OK),
    }
}

/// `--endpoints`, else `./endpoints.yml`, else the embedded default (said once on stderr).
pub(crate) fn resolve_backend(endpoints: Option<&Path>) -> anyhow::Result<Box<dyn Backend>> {
    let registry = broker_config::default_registry();
    let path = match endpoints {
        Some(p) => {
            if !p.exists() {
                anyhow::bail!("the endpoints file {} does not exist", p.display());
            }
            Some(p.to_owned())
        }
        None => Some(PathBuf::from("endpoints.yml")).filter(|p| p.exists()),
    };
    let Some(path) = path else { return embedded_default(&registry) };
    let configured = broker_config::load(&path, &registry)?
        .ok_or_else(|| anyhow!("{} has no event_broker section: no event broker is configured", path.display()))?;
    for warning in &configured.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(configured.backend)
}

/// The backend used without an endpoints file: SQLite `events.db` (`sql`), else the file
/// `rasa_event.log` (Rasa's default path, `file`), said once on stderr.
fn embedded_default(registry: &broker_core::Registry) -> anyhow::Result<Box<dyn Backend>> {
    #[cfg(feature = "sql")]
    {
        let _ = registry;
        eprintln!(
            "broker: no endpoints.yml here; using the embedded default: SQLite database {DEFAULT_SQLITE} in the \
             working directory (type: sql)"
        );
        Ok(Box::new(broker_sql::SqlBackend::new(broker_sql::SqlConfig::sqlite(DEFAULT_SQLITE))))
    }
    #[cfg(not(feature = "sql"))]
    {
        if registry.get("file").is_none() {
            anyhow::bail!(
                "no endpoints.yml here, and this build has no embedded default (it needs the sql or file feature); \
                 give --endpoints PATH"
            );
        }
        eprintln!(
            "broker: no endpoints.yml here; using the embedded default: the file {DEFAULT_FILE} in the working \
             directory (type: file)"
        );
        let section =
            broker_config::parse_str(&format!("event_broker:\n  type: file\n  path: {DEFAULT_FILE}\n"), None)?
                .ok_or_else(|| anyhow!("the embedded default has no event_broker section"))?;
        Ok(broker_config::configure(section, registry)?.backend)
    }
}

pub(crate) fn progress(total_bytes: Option<u64>) -> ProgressBar {
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

async fn check(backend: &dyn Backend) -> Result<u8, Failure> {
    let describe = backend.describe();
    let broker: Box<dyn EventBroker> = match backend.connect().await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("not ready: {describe}: {e}");
            return Ok(connect_failure(backend, e).code);
        }
    };
    let ready = broker.is_ready().await;
    let _ = broker.close().await;
    // What the service says it is, where the protocol tells (asked over a connection of its own;
    // not when it is not ready: that would only wait for another timeout).
    let server = if ready { backend.server_version().await } else { Ok(None) };
    if ready {
        println!("ready: {describe}");
    } else {
        eprintln!("not ready: {describe}");
    }
    match server {
        Ok(Some(version)) => println!("server: {version}"),
        Ok(None) => {}
        Err(e) => eprintln!("server: unknown ({e})"),
    }
    Ok(if ready { code::OK } else { code::UNAVAILABLE })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
