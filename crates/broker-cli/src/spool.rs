//! `broker spool status`: what the disk spool of the endpoints file's `event_broker:` holds.

use std::path::{Path, PathBuf};

use anyhow::anyhow;

use crate::{Failure, code};

pub(crate) fn status(endpoints: Option<&Path>) -> Result<u8, Failure> {
    let path = endpoints.map_or_else(|| PathBuf::from("endpoints.yml"), Path::to_owned);
    if !path.exists() {
        return Err(Failure::new(code::CONFIG, anyhow!("the endpoints file {} does not exist", path.display())));
    }
    show(&path)
}

#[cfg(feature = "spool")]
fn show(path: &Path) -> Result<u8, Failure> {
    let config = broker_config::load_spool(path).map_err(|e| Failure::new(code::CONFIG, e))?.ok_or_else(|| {
        Failure::new(code::CONFIG, anyhow!("{}: the event_broker section has no spool", path.display()))
    })?;
    let status = match broker_spool::status(&config) {
        Ok(s) => s,
        Err(e @ broker_spool::log::LogError::Locked(_)) => return Err(Failure::new(code::UNAVAILABLE, e)),
        Err(e) => return Err(Failure::new(code::UNDELIVERED, e)),
    };
    let mut line = format!("spool {}: {} events waiting, {} bytes", config.path.display(), status.events, status.bytes);
    if let Some(t) = status.oldest_timestamp {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        line.push_str(&format!(", oldest event from {t} ({:.0} s ago)", (now - t).max(0.0)));
    }
    if status.torn_records > 0 {
        line.push_str(&format!(", {} torn record(s) cut (a crash mid-write)", status.torn_records));
    }
    println!("{line}");
    Ok(code::OK)
}

#[cfg(not(feature = "spool"))]
fn show(_path: &Path) -> Result<u8, Failure> {
    Err(Failure::new(code::CONFIG, anyhow!("this build has no disk spool (the cargo feature `spool`)")))
}
