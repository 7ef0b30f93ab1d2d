//! `broker tail`: print consumed events, exactly as stored (or in an envelope with their
//! position, key and headers), following across transient errors.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use broker_core::json::Value;
use broker_core::{Backend, Error, Position, QueueChoice, Received, SourceOptions, StartFrom};

use crate::{Failure, code, connect_failure};

/// How each event is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// The event's bytes as stored, one per line.
    Lines,
    /// One JSON object per line: `{"position": {...}, "key": ..., "headers": {...}, "event": <the event's bytes unchanged>}`.
    Envelope,
}

/// `broker tail`'s arguments.
pub(crate) struct TailArgs {
    pub(crate) from_beginning: bool,
    pub(crate) queue: QueueChoice,
    pub(crate) limit: Option<u64>,
    pub(crate) timeout: Option<f64>,
    pub(crate) group: String,
    pub(crate) until_end: bool,
    pub(crate) format: Format,
}

/// The longest `--timeout` (a year): beyond it a duration cannot be represented everywhere.
const MAX_TIMEOUT_SECS: f64 = 365.0 * 86_400.0;

/// A JSON string (escaped as Rasa's encoder does).
fn json_string(s: &str, out: &mut Vec<u8>) {
    Value::String(s.to_owned()).write_rasa(out);
}

/// The envelope line of `r` (without the newline).
fn envelope(r: &Received) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.raw.len() + 128);
    out.extend_from_slice(b"{\"position\": ");
    let position = match r.position {
        Position::Line { line, offset } => format!("{{\"line\": {line}, \"offset\": {offset}}}"),
        Position::Offset(offset) => format!("{{\"offset\": {offset}}}"),
        Position::Partition { partition, offset } => format!("{{\"partition\": {partition}, \"offset\": {offset}}}"),
        Position::Row(id) => format!("{{\"row\": {id}}}"),
        Position::DeliveryTag(tag) => format!("{{\"delivery_tag\": {tag}}}"),
        // Positions added later print as their debug form, quoted.
        #[allow(unreachable_patterns)]
        ref other => {
            let mut s = Vec::new();
            json_string(&format!("{other:?}"), &mut s);
            String::from_utf8_lossy(&s).into_owned()
        }
    };
    out.extend_from_slice(position.as_bytes());
    out.extend_from_slice(b", \"key\": ");
    match &r.key {
        Some(k) => json_string(&String::from_utf8_lossy(k), &mut out),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b", \"headers\": {");
    for (i, (k, v)) in r.headers.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        json_string(k, &mut out);
        out.extend_from_slice(b": ");
        json_string(&String::from_utf8_lossy(v), &mut out);
    }
    out.extend_from_slice(b"}, \"event\": ");
    out.extend_from_slice(&r.raw);
    out.push(b'}');
    out
}

pub(crate) async fn tail(backend: &dyn Backend, args: TailArgs) -> Result<u8, Failure> {
    let TailArgs { from_beginning, queue, limit, timeout, group, until_end, format } = args;
    let timeout = match timeout {
        Some(t) if t.is_finite() && (0.0..=MAX_TIMEOUT_SECS).contains(&t) => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(Failure::new(
                code::CONFIG,
                anyhow!("--timeout must be a number of seconds from 0 to {MAX_TIMEOUT_SECS} (a year), got {t}"),
            ));
        }
        None => None,
    };
    let midway = |e: anyhow::Error| Failure::new(code::UNDELIVERED, e);
    let start = if from_beginning { StartFrom::Beginning } else { StartFrom::Resume };
    // `--until-end`: the stream ends once it has caught up with what is stored (kcat's -e).
    let options = SourceOptions::from(start).group(group).queue(queue).follow(!until_end);
    let mut source = backend.source(&options).await.map_err(|e| connect_failure(backend, e))?;
    let mut backoff = broker_core::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut count = 0u64;
    let mut last_event = Instant::now();
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
                let line = match format {
                    Format::Lines => None,
                    Format::Envelope => Some(envelope(&received)),
                };
                let bytes = line.as_deref().unwrap_or(&received.raw);
                let written = out.write_all(bytes).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush());
                if let Err(e) = written {
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        source.close().await.map_err(|e| midway(e.into()))?;
                        return Ok(code::OK);
                    }
                    return Err(midway(anyhow::Error::new(e).context("writing to stdout")));
                }
                source.ack(&received).await.map_err(|e| midway(e.into()))?;
                count += 1;
                last_event = Instant::now();
            }
            Ok(None) => break,
            Err(e @ Error::Malformed { .. }) => eprintln!("broker: skipping {e}"),
            // A service that went away: keep following (the source reconnects), say so.
            Err(e) if e.is_temporary() && !until_end => {
                // `--timeout` still bounds the wait for the next event.
                if timeout.is_some_and(|t| last_event.elapsed() >= t) {
                    return Err(midway(anyhow::Error::new(e).context("consuming")));
                }
                let delay = backoff.next_delay();
                eprintln!("broker: {e}; trying again in {delay:.1?}");
                tokio::time::sleep(delay).await;
                continue;
            }
            Err(e) => return Err(midway(anyhow::Error::new(e).context("consuming"))),
        }
        backoff.reset();
    }
    // Acknowledgements must reach the service before the process ends.
    source.close().await.context("closing the consumer").map_err(midway)?;
    Ok(code::OK)
}
