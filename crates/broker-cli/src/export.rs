//! `broker export`: Rasa's `rasa export`. Reads the conversations of the `tracker_store:` of the
//! endpoints file and publishes their events to its `event_broker:`, as Rasa's exporter does:
//! each event is the stored `as_dict()` with `sender_id` added last; RabbitMQ messages carry
//! `rasa-export-process-id` (one value per run). Same flags and meanings: `--minimum-timestamp`
//! (>=), `--maximum-timestamp` (<), `--conversation-ids a,b`, `--offset-timestamps-by-seconds`.
//!
//! Unlike Rasa, events are streamed from the store in timestamp order across conversations
//! (within each conversation that is Rasa's order) and pipelined into the broker through the
//! same loop as `broker publish`, so the summary, exit codes and undelivered file are the same,
//! and the resume point printed on a failure is exact: every event older than it was delivered.
//! A requested conversation id that is not in the store is an error naming it (Rasa warns and
//! goes on with the others), before anything is published.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use broker_core::tracker::{ExportQuery, StoredEvents, TrackerStore, export_event};
use broker_core::{EventId, PublishOptions};
use indicatif::ProgressBar;
use tokio::sync::mpsc;

use crate::publish::{Chunk, Done, Item, Job, drive};
use crate::{Failure, code};

/// Rasa's header on exported RabbitMQ messages (`rasa.core.constants`).
const PROCESS_ID_HEADER: &str = "rasa-export-process-id";

/// Events per chunk handed to the publish loop.
const CHUNK: usize = 512;

/// `broker export`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Only events with a timestamp >= this (seconds since the epoch).
    #[arg(long, value_name = "TIMESTAMP", allow_negative_numbers = true)]
    pub(crate) minimum_timestamp: Option<f64>,
    /// Only events with a timestamp < this.
    #[arg(long, value_name = "TIMESTAMP", allow_negative_numbers = true)]
    pub(crate) maximum_timestamp: Option<f64>,
    /// Only these conversations (comma-separated); one that is not in the store is an error.
    #[arg(long, value_name = "IDS")]
    pub(crate) conversation_ids: Option<String>,
    /// Add this many seconds to every exported event's timestamp.
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub(crate) offset_timestamps_by_seconds: Option<i64>,
    /// Append every event read and not delivered to PATH (as for publish). Default: a new
    /// undelivered-YYYYMMDDTHHMMSSZ.jsonl in the working directory, named on stderr.
    #[arg(long, value_name = "PATH")]
    pub(crate) undelivered: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics and /ready while exporting.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Count and report stored events that are not events instead of stopping at the first.
    #[arg(long)]
    pub(crate) skip_invalid: bool,
}

/// The endpoints file export reads: `--endpoints`, else `./endpoints.yml` (Rasa's default).
fn endpoints_path(endpoints: Option<&Path>) -> Result<PathBuf, Failure> {
    let path = endpoints.map_or_else(|| PathBuf::from("endpoints.yml"), Path::to_owned);
    if !path.exists() {
        return Err(Failure::new(
            code::CONFIG,
            anyhow!(
                "the endpoints file {} does not exist (export reads its tracker_store and event_broker sections)",
                path.display()
            ),
        ));
    }
    Ok(path)
}

pub(crate) async fn export(endpoints: Option<&Path>, args: Args) -> Result<u8, Failure> {
    if let (Some(min), Some(max)) = (args.minimum_timestamp, args.maximum_timestamp)
        && max < min
    {
        return Err(Failure::new(
            code::CONFIG,
            anyhow!("the maximum timestamp {max} is smaller than the minimum timestamp {min}"),
        ));
    }
    let path = endpoints_path(endpoints)?;
    let registry = broker_config::default_registry();
    let configured_store = broker_config::load_tracker_store(&path, &registry)
        .map_err(|e| Failure::new(code::CONFIG, e))?
        .ok_or_else(|| {
            Failure::new(
                code::CONFIG,
                anyhow!("{} has no tracker_store section: nothing to export from", path.display()),
            )
        })?;
    for warning in &configured_store.warnings {
        eprintln!("warning: {warning}");
    }
    let store = configured_store.store;
    let configured =
        broker_config::load(&path, &registry).map_err(|e| Failure::new(code::CONFIG, e))?.ok_or_else(|| {
            Failure::new(code::CONFIG, anyhow!("{} has no event_broker section: nowhere to export to", path.display()))
        })?;
    for warning in &configured.warnings {
        eprintln!("warning: {warning}");
    }
    let backend = configured.backend;
    // Rasa: split on commas, as written.
    let requested: Option<Vec<String>> =
        args.conversation_ids.as_deref().filter(|s| !s.is_empty()).map(|s| s.split(',').map(str::to_owned).collect());
    let query = ExportQuery::all()
        .minimum_timestamp(args.minimum_timestamp)
        .maximum_timestamp(args.maximum_timestamp)
        .conversation_ids(requested.clone());
    let in_store = store.conversation_ids().await.map_err(|e| store_failure(store.as_ref(), e))?;
    if in_store.is_empty() {
        return Err(Failure::new(code::CONFIG, anyhow!("{} holds no conversations", store.describe())));
    }
    let conversations = match &query.conversation_ids {
        None => in_store.len(),
        Some(ids) => {
            let missing: Vec<&str> =
                ids.iter().filter(|id| in_store.binary_search(id).is_err()).map(String::as_str).collect();
            if !missing.is_empty() {
                return Err(Failure::new(
                    code::CONFIG,
                    anyhow!("conversation ids not in {}: {}", store.describe(), missing.join(", ")),
                ));
            }
            ids.len()
        }
    };
    if let Some(s) = args.offset_timestamps_by_seconds {
        eprintln!("broker: every event timestamp is offset by {s} s");
    }
    eprintln!("broker: exporting {conversations} conversations from {} to {}", store.describe(), backend.describe());
    let mut options = PublishOptions::default();
    if backend.name() == "pika" {
        options = options.header(PROCESS_ID_HEADER, EventId::generate().to_string());
    }
    let events = store.read(&query).await.map_err(|e| store_failure(store.as_ref(), e))?;
    let job =
        Job { undelivered: args.undelivered.clone(), metrics_addr: args.metrics_addr, options, total_bytes: None };
    let offset = args.offset_timestamps_by_seconds;
    let skip_invalid = args.skip_invalid;
    let Done { code, resume_at } =
        drive(backend.as_ref(), job, |bar| spawn_store_reader(events, offset, skip_invalid, bar)).await?;
    if code != code::OK
        && let Some(t) = resume_at
    {
        eprintln!(
            "broker: to export what was not delivered, run:\n\n\t{}\n\n(or publish the undelivered file; not both)",
            continuation(&path, t, &args, requested.as_deref())
        );
    }
    Ok(code)
}

fn store_failure(store: &dyn TrackerStore, e: broker_core::Error) -> Failure {
    let code = match &e {
        broker_core::Error::Config(_) | broker_core::Error::Denied { .. } => code::CONFIG,
        // The store answered with something that is not what Rasa writes.
        broker_core::Error::Malformed { .. } => code::UNDELIVERED,
        _ => code::UNAVAILABLE,
    };
    Failure::new(code, anyhow::Error::new(e).context(format!("reading {}", store.describe())))
}

/// The command that exports from `t` on with the same flags (Rasa prints its own likewise).
fn continuation(path: &Path, t: f64, args: &Args, requested: Option<&[String]>) -> String {
    let repr = |f: f64| {
        let mut out = Vec::new();
        broker_core::json::write_float(f, &mut out);
        String::from_utf8(out).unwrap_or_default()
    };
    let mut command = format!(
        "broker --endpoints {} export --minimum-timestamp {}",
        shell_word(&path.display().to_string()),
        repr(t)
    );
    if let Some(max) = args.maximum_timestamp {
        command.push_str(&format!(" --maximum-timestamp {}", repr(max)));
    }
    if let Some(ids) = requested {
        command.push_str(&format!(" --conversation-ids {}", shell_word(&ids.join(","))));
    }
    if let Some(s) = args.offset_timestamps_by_seconds {
        command.push_str(&format!(" --offset-timestamps-by-seconds {s}"));
    }
    command
}

/// `s` quoted for a POSIX shell when it needs it.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./,:=@%+".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Reads the store's pages on a task of its own and hands their events over as chunks; a read
/// error or a stored event that is not one ends the input (the publish loop reports it).
fn spawn_store_reader(
    mut events: Box<dyn StoredEvents>,
    offset: Option<i64>,
    skip_invalid: bool,
    bar: ProgressBar,
) -> mpsc::Receiver<Chunk> {
    let (tx, rx) = mpsc::channel::<Chunk>(8);
    tokio::spawn(async move {
        loop {
            let page = match events.next_page().await {
                Ok(Some(page)) => page,
                Ok(None) => {
                    let _ = tx.send(vec![Item::End]).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(vec![Item::Stop(format!("reading the tracker store: {e}"))]).await;
                    return;
                }
            };
            let mut chunk = Vec::with_capacity(CHUNK);
            for stored in &page {
                match export_event(stored, offset) {
                    Ok(event) => chunk.push(Item::Event(event, stored.timestamp)),
                    Err(e) => {
                        let at = stored.position.as_ref().map_or_else(String::new, |p| format!(" at {p}"));
                        let why = format!(
                            "the tracker store's event{at} (conversation {:?}) is not an event: {e}",
                            stored.sender_id
                        );
                        if skip_invalid {
                            chunk.push(Item::Skipped(why));
                            continue;
                        }
                        chunk.push(Item::Stop(format!("{why} (use --skip-invalid to skip such events)")));
                        let _ = tx.send(chunk).await;
                        return;
                    }
                }
                if chunk.len() >= CHUNK
                    && tx.send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK))).await.is_err()
                {
                    return;
                }
            }
            bar.inc(page.len() as u64);
            if !chunk.is_empty() && tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_continuation_keeps_the_flags() {
        let args = Args {
            minimum_timestamp: Some(1.0),
            maximum_timestamp: Some(1700000000.5),
            conversation_ids: Some("a,b c".into()),
            offset_timestamps_by_seconds: Some(-60),
            undelivered: None,
            metrics_addr: None,
            skip_invalid: false,
        };
        let ids = ["a".to_owned(), "b c".to_owned()];
        assert_eq!(
            continuation(Path::new("my endpoints.yml"), 1528402837.6, &args, Some(&ids)),
            "broker --endpoints 'my endpoints.yml' export --minimum-timestamp 1528402837.6 --maximum-timestamp \
             1700000000.5 --conversation-ids 'a,b c' --offset-timestamps-by-seconds -60"
        );
    }
}
