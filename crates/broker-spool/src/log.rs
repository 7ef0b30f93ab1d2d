//! The spool's on-disk log: append-only segments of checksummed records, and the position up to
//! which the service confirmed them.
//!
//! A spool directory holds:
//! - `lock`: held (advisory, exclusive) by the one process using the directory; the kernel
//!   releases it when that process dies, so a crash leaves nothing stale.
//! - `<first sequence, 20 digits>.seg`: segments. Each starts with the 8 bytes `RSPOOL01`, then
//!   records: `length: u32 LE` (of the payload), `crc: u32 LE` (CRC-32 of the sequence bytes and
//!   the payload), `sequence: u64 LE`, payload (opaque here: the layer above encodes the event,
//!   its id and its headers in it).
//!   Sequences are consecutive across segments. A new segment starts once the current one reaches
//!   `max_segment_bytes`.
//! - `acked`: the first sequence not yet confirmed, as text, replaced atomically (temporary file,
//!   fsync, rename, directory fsync). Segments whose records are all below it are deleted.
//!
//! On open every segment is read through: a record whose bytes end early or whose checksum does
//! not match ends the log there (a crash mid-write leaves a torn last record). The file is cut at
//! that point, and what was cut is reported ([`Recovery`]); it is never handed out half.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RSPOOL01";
const HEADER: usize = 4 + 4 + 8;
/// A record larger than this is not one of ours (a corrupt length).
pub(crate) const MAX_RECORD: usize = 256 << 20;

/// A spool log error: which file, what, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// Another process owns the directory.
    #[error("the spool directory {} is in use by another process (its lock is held); one process per spool", .0.display())]
    Locked(PathBuf),
    /// A file operation failed.
    #[error("spool {}: {operation}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A file in the directory is not what the spool wrote.
    #[error("spool {}: {reason}", path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl LogError {
    /// Whether trying again may help (a full disk, a lock another process may release).
    pub fn is_temporary(&self) -> bool {
        match self {
            LogError::Locked(_) => true,
            LogError::Io { source, .. } => !matches!(source.kind(), io::ErrorKind::PermissionDenied),
            LogError::Foreign { .. } => false,
        }
    }
}

fn io_err<'a>(path: &'a Path, operation: &'static str) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io { path: path.to_owned(), operation, source }
}

/// What opening found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Records found, not yet confirmed: they are replayed first.
    pub pending: u64,
    /// Records cut because their bytes were torn or corrupt (a crash mid-write).
    pub torn_records: u64,
    /// Bytes cut with them.
    pub torn_bytes: u64,
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number.
    pub seq: u64,
    /// What was appended.
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct Segment {
    /// One past the last sequence in it.
    end: u64,
    path: PathBuf,
    bytes: u64,
}

/// The log of one spool directory.
#[derive(Debug)]
pub struct SpoolLog {
    dir: PathBuf,
    _lock: File,
    segments: VecDeque<Segment>,
    writer: Option<Writer>,
    /// The current segment's `(bytes, end)` at its last good flush or sync: a failed write is
    /// rolled back to it, so the log never holds half a batch that callers were told failed.
    written: (u64, u64),
    next_seq: u64,
    acked: u64,
    max_segment_bytes: u64,
    /// Whether a finished segment and the acked position are synced to disk (`fsync: batch`);
    /// without (`fsync: never`) they are written and left to the kernel, like the records.
    durable: bool,
    /// Where the last [`SpoolLog::read_from`] stopped: the segment, the offset, the next
    /// sequence there; reading on from it does not scan the segment again.
    cursor: Option<(PathBuf, u64, u64)>,
}

/// The segment being written, and what was appended to it since the last write: records are
/// encoded straight into `buf` (no copy in between), which goes to the file in one write at
/// [`SpoolLog::flush`] or once it holds [`WRITE_AT`] bytes.
#[derive(Debug)]
struct Writer {
    file: File,
    buf: Vec<u8>,
}

/// Appended bytes written to the file once this many are buffered.
const WRITE_AT: usize = 1 << 20;

impl Writer {
    /// The buffer's size: `WRITE_AT` and room for the record that crosses it.
    const CAPACITY: usize = WRITE_AT + (64 << 10);

    fn new(file: File) -> Writer {
        Writer { file, buf: Vec::with_capacity(Writer::CAPACITY) }
    }

    fn write_buf(&mut self) -> io::Result<()> {
        let done = self.file.write_all(&self.buf);
        self.buf.clear();
        // A group with one huge record does not keep its memory.
        if self.buf.capacity() > 4 * WRITE_AT {
            self.buf = Vec::with_capacity(Writer::CAPACITY);
        }
        done
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// Reads records from `r` (after the magic) until the end or a bad record; returns them and the
/// offset where the good part ends.
fn scan(path: &Path, mut r: impl Read, mut on_record: impl FnMut(Record) -> bool) -> Result<(u64, bool), LogError> {
    scan_from(path, r.by_ref(), MAGIC.len() as u64, &mut on_record)
}

/// [`scan`] from `offset` (where `r` is); stops after a record `on_record` says false to.
fn scan_from(
    path: &Path,
    mut r: impl Read,
    offset: u64,
    mut on_record: impl FnMut(Record) -> bool,
) -> Result<(u64, bool), LogError> {
    let mut offset = offset;
    let mut header = [0u8; HEADER];
    loop {
        match read_full(&mut r, &mut header).map_err(io_err(path, "reading"))? {
            0 => return Ok((offset, false)),
            n if n < HEADER => return Ok((offset, true)),
            _ => {}
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let seq_bytes: [u8; 8] = header[8..16].try_into().unwrap_or_default();
        if len > MAX_RECORD {
            return Ok((offset, true));
        }
        let mut payload = vec![0u8; len];
        if read_full(&mut r, &mut payload).map_err(io_err(path, "reading"))? < len {
            return Ok((offset, true));
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq_bytes);
        hasher.update(&payload);
        if hasher.finalize() != crc {
            return Ok((offset, true));
        }
        offset += (HEADER + len) as u64;
        if !on_record(Record { seq: u64::from_le_bytes(seq_bytes), payload }) {
            return Ok((offset, false));
        }
    }
}

/// Reads until `buf` is full or the end; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Cuts the file at `path` to `len` bytes, durably.
fn cut_at(path: &Path, len: u64, operation: &'static str) -> Result<(), LogError> {
    let f = OpenOptions::new().write(true).open(path).map_err(io_err(path, "opening"))?;
    f.set_len(len).map_err(io_err(path, operation))?;
    f.sync_all().map_err(io_err(path, "syncing"))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir, "syncing the directory"))
}

impl SpoolLog {
    /// Opens (or creates) the spool in `dir`, takes its lock, reads what a previous process left
    /// and cuts a torn end.
    pub fn open(dir: &Path, max_segment_bytes: u64) -> Result<(SpoolLog, Recovery), LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir, "creating the directory"))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "opening the lock"))?;
        // Fully qualified: std's own `File::try_lock` (1.89+) would shadow the trait method.
        match fs4::FileExt::try_lock(&lock) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => return Err(LogError::Locked(dir.to_owned())),
            Err(fs4::TryLockError::Error(e)) => return Err(io_err(&lock_path, "locking")(e)),
        }
        let acked_path = dir.join("acked");
        let acked = match fs::read_to_string(&acked_path) {
            // Empty after a power cut (`fsync: never` does not sync it): everything still in the
            // segments is sent again (repeats, never a loss).
            Ok(t) if t.trim().is_empty() => {
                tracing::warn!(
                    "spool {}: the acked position is empty (a power cut?); what is in the segments is sent again",
                    acked_path.display()
                );
                0
            }
            Ok(t) => t.trim().parse::<u64>().map_err(|_| LogError::Foreign {
                path: acked_path.clone(),
                reason: format!("not a sequence number: {:?}", t.trim()),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&acked_path, "reading")(e)),
        };
        let mut firsts: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir, "listing"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse().ok()))
            .collect();
        firsts.sort_unstable();
        let mut log = SpoolLog {
            dir: dir.to_owned(),
            _lock: lock,
            segments: VecDeque::new(),
            writer: None,
            written: (0, 0),
            next_seq: acked,
            acked,
            max_segment_bytes: max_segment_bytes.max(4096),
            durable: true,
            cursor: None,
        };
        let mut recovery = Recovery::default();
        let count = firsts.len();
        for (i, &first) in firsts.iter().enumerate() {
            let path = dir.join(segment_name(first));
            let file = File::open(&path).map_err(io_err(&path, "opening"))?;
            let len = file.metadata().map_err(io_err(&path, "reading the size of"))?.len();
            let mut r = BufReader::with_capacity(1 << 16, file);
            let mut magic = [0u8; 8];
            if read_full(&mut r, &mut magic).map_err(io_err(&path, "reading"))? < 8 || &magic != MAGIC {
                let zeros = magic.iter().all(|b| *b == 0);
                if len < MAGIC.len() as u64 || zeros {
                    // Created, then the crash: nothing in it. Or, at any position, a power cut
                    // under `fsync: never` (an unsynced segment comes back short or zeroed): its
                    // records are gone, and reported lost when their turn comes.
                    if i + 1 != count || len > 0 {
                        recovery.torn_records += 1;
                        recovery.torn_bytes += len;
                        tracing::warn!("spool {}: an empty or zeroed segment (a power cut?) removed", path.display());
                    }
                    fs::remove_file(&path).map_err(io_err(&path, "removing"))?;
                    continue;
                }
                return Err(LogError::Foreign { path, reason: "not a spool segment (no RSPOOL01 header)".into() });
            }
            let mut end = first;
            let mut out_of_order = false;
            // Records from the next segment's first sequence on were appended past a failed
            // write that could not be cut back (`roll_back`): they were handed back to their
            // publishers, and the next segment holds the events that took their sequences.
            let next_first = firsts.get(i + 1).copied().unwrap_or(u64::MAX);
            // The end of the records kept: where the scan stopped, unless records past a cut
            // followed them.
            let mut good = MAGIC.len() as u64;
            let mut past_cut = 0u64;
            let (_, torn) = scan(&path, r, |rec| {
                if rec.seq >= next_first {
                    past_cut += 1;
                    return true;
                }
                if rec.seq != end {
                    out_of_order = true;
                }
                end = rec.seq + 1;
                good += (HEADER + rec.payload.len()) as u64;
                if rec.seq >= acked {
                    recovery.pending += 1;
                }
                true
            })?;
            if out_of_order {
                return Err(LogError::Foreign { path, reason: "sequence numbers out of order".into() });
            }
            if past_cut > 0 {
                tracing::warn!(
                    "spool {}: {past_cut} record(s) past a failed write's cut removed (they were handed back \
                     when the write failed; their sequences are in the next segment)",
                    path.display()
                );
                cut_at(&path, good, "cutting what a failed write left in")?;
            } else if torn {
                // Cut at the last good record; what follows cannot be trusted.
                let cut = len - good;
                recovery.torn_records += 1;
                recovery.torn_bytes += cut;
                cut_at(&path, good, "cutting the torn end of")?;
                tracing::warn!("spool {}: cut {cut} bytes of a torn or corrupt record", path.display());
            }
            if end == first {
                // No record in it (created, then the crash, or all of it torn): nothing to keep,
                // and its name would be taken again by the next segment.
                fs::remove_file(&path).map_err(io_err(&path, "removing"))?;
                continue;
            }
            log.next_seq = log.next_seq.max(end);
            log.segments.push_back(Segment { end, path, bytes: good });
        }
        log.drop_confirmed()?;
        Ok((log, recovery))
    }

    /// Appends one record; returns its sequence number. Buffered: [`sync`](SpoolLog::sync) makes
    /// it durable.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, LogError> {
        self.append_with(|out| out.extend_from_slice(payload))
    }

    /// Appends one record whose payload `write` appends to the buffer it is given (encoded in
    /// place: no copy); returns its sequence number. Buffered like [`SpoolLog::append`].
    pub fn append_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<u64, LogError> {
        let need_new = match self.segments.back() {
            None => true,
            Some(s) => self.writer.is_none() || s.bytes >= self.max_segment_bytes,
        };
        if need_new {
            self.start_segment()?;
        }
        let seq = self.next_seq;
        let Some(segment) = self.segments.back_mut() else { return unreachable_segment() };
        let Some(writer) = self.writer.as_mut() else {
            return Err(LogError::Foreign { path: segment.path.clone(), reason: "no open segment".into() });
        };
        let start = writer.buf.len();
        writer.buf.extend_from_slice(&[0; HEADER]);
        writer.buf[start + 8..start + HEADER].copy_from_slice(&seq.to_le_bytes());
        write(&mut writer.buf);
        let len = writer.buf.len() - start - HEADER;
        let Some(len32) = u32::try_from(len).ok().filter(|l| (*l as usize) <= MAX_RECORD) else {
            writer.buf.truncate(start);
            return Err(LogError::Io {
                path: segment.path.clone(),
                operation: "appending",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("an event of {len} bytes is too large to spool"),
                ),
            });
        };
        let crc = crc32fast::hash(&writer.buf[start + 8..]);
        writer.buf[start..start + 4].copy_from_slice(&len32.to_le_bytes());
        writer.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        segment.bytes += (HEADER + len) as u64;
        segment.end = seq + 1;
        self.next_seq = seq + 1;
        if writer.buf.len() >= WRITE_AT
            && let Err(e) = writer.write_buf()
        {
            let path = segment.path.clone();
            self.roll_back();
            return Err(io_err(&path, "appending")(e));
        }
        Ok(seq)
    }

    /// Drops what was appended since the last good flush: the buffer is discarded unwritten and
    /// the file cut back, so the next append continues right after the last good record.
    fn roll_back(&mut self) {
        let (bytes, end) = self.written;
        if let Some(Writer { mut file, buf: _unwritten }) = self.writer.take() {
            if file.set_len(bytes).is_ok() && file.sync_data().is_ok() && file.seek(SeekFrom::End(0)).is_ok() {
                // The segment goes on where it was good.
                self.writer = Some(Writer::new(file));
            }
        }
        if let Some(segment) = self.segments.back_mut() {
            segment.bytes = bytes;
            segment.end = end;
        }
        self.next_seq = end;
        if self.writer.is_none() {
            // The file could not be cut: a new segment starts now, named after the good end, so
            // the next open cuts what this one holds past it (handed back, never replayed).
            tracing::warn!("spool: could not cut a failed write back; the next events go to a new segment");
            if let Err(e) = self.start_segment() {
                tracing::warn!("spool: starting a new segment after a failed cut: {e}");
            }
        }
    }

    fn start_segment(&mut self) -> Result<(), LogError> {
        // The finished segment written out (and synced when durable); rolled back on failure.
        self.write_out(self.durable)?;
        let first = self.next_seq;
        let path = self.dir.join(segment_name(first));
        // A segment of that name with no record in it (a failed first write) is replaced.
        if self.segments.back().is_some_and(|s| s.path == path) {
            self.segments.pop_back();
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "creating"))?;
        // Written at once (not buffered), so a roll-back to the segment's start keeps it.
        if let Err(e) = file.write_all(MAGIC) {
            let _ = fs::remove_file(&path);
            return Err(io_err(&path, "writing")(e));
        }
        self.writer = Some(Writer::new(file));
        self.segments.push_back(Segment { end: first, path, bytes: MAGIC.len() as u64 });
        self.written = (MAGIC.len() as u64, first);
        if self.durable { sync_dir(&self.dir) } else { Ok(()) }
    }

    /// Writes what was appended and makes it durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.write_out(true)
    }

    /// Writes what was appended, without waiting for the disk.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.write_out(false)
    }

    fn write_out(&mut self, sync: bool) -> Result<(), LogError> {
        // Nothing open: nothing appended since the last good write (a failed one was rolled back).
        let Some(w) = self.writer.as_mut() else { return Ok(()) };
        let path = self.segments.back().map(|s| s.path.clone()).unwrap_or_default();
        let done = w.write_buf().and_then(|()| if sync { w.file.sync_data() } else { Ok(()) });
        match done {
            Ok(()) => {
                if let Some(s) = self.segments.back() {
                    self.written = (s.bytes, s.end);
                }
                Ok(())
            }
            Err(e) => {
                let operation = if sync { "syncing" } else { "writing" };
                self.roll_back();
                Err(io_err(&path, operation)(e))
            }
        }
    }

    /// Records that every sequence below `upto` is confirmed, and deletes the segments that hold
    /// only confirmed records.
    pub fn ack(&mut self, upto: u64) -> Result<(), LogError> {
        let upto = upto.min(self.next_seq);
        if upto <= self.acked {
            return Ok(());
        }
        let path = self.dir.join("acked");
        let tmp = self.dir.join(".acked.tmp");
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp, "creating"))?;
            f.write_all(format!("{upto}\n").as_bytes()).map_err(io_err(&tmp, "writing"))?;
            if self.durable {
                f.sync_all().map_err(io_err(&tmp, "syncing"))?;
            }
        }
        fs::rename(&tmp, &path).map_err(io_err(&path, "replacing"))?;
        if self.durable {
            sync_dir(&self.dir)?;
        }
        self.acked = upto;
        // The segment being written, all of it confirmed: closed, so it can go (the next event
        // starts a new one); otherwise a spool smaller than a segment would fill up for good.
        if let Some(back) = self.segments.back()
            && back.end <= self.acked
            && back.bytes > MAGIC.len() as u64
            && self.writer.is_some()
        {
            self.write_out(false)?;
            self.writer = None;
        }
        self.drop_confirmed()
    }

    fn drop_confirmed(&mut self) -> Result<(), LogError> {
        while let Some(front) = self.segments.front() {
            // The segment being written stays, even when all of it is confirmed.
            let writing = self.writer.is_some() && self.segments.len() == 1;
            if writing || front.end > self.acked {
                break;
            }
            fs::remove_file(&front.path).map_err(io_err(&front.path, "removing"))?;
            self.segments.pop_front();
        }
        Ok(())
    }

    /// The records not yet confirmed, in order (what a new process replays).
    pub fn pending(&mut self) -> Result<Vec<Record>, LogError> {
        self.flush()?;
        let mut out = Vec::new();
        for s in &self.segments {
            if s.end <= self.acked {
                continue;
            }
            let mut file = File::open(&s.path).map_err(io_err(&s.path, "opening"))?;
            file.seek(SeekFrom::Start(MAGIC.len() as u64)).map_err(io_err(&s.path, "seeking"))?;
            let r = BufReader::with_capacity(1 << 16, file.take(s.bytes - MAGIC.len() as u64));
            let acked = self.acked;
            scan(&s.path, r, |rec| {
                if rec.seq >= acked {
                    out.push(rec);
                }
                true
            })?;
        }
        Ok(out)
    }

    /// Up to `max` records from sequence `from` on, in order (sequences missing from the log are
    /// skipped). Reading on from where the last call stopped goes on from there in its segment.
    pub fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        // No flush here (a failed one would roll back appends of the caller's group): the live
        // segment is read up to its last good write, which holds every record handed out.
        let mut out = Vec::new();
        let cursor = self.cursor.take().filter(|(_, _, next)| *next == from);
        let live = self.segments.len().saturating_sub(1);
        for (i, s) in self.segments.iter().enumerate() {
            if s.end <= from || out.len() >= max {
                continue;
            }
            let good = if i == live && self.writer.is_some() { self.written.0.min(s.bytes) } else { s.bytes };
            let offset = match &cursor {
                Some((path, offset, _)) if *path == s.path => *offset,
                _ => MAGIC.len() as u64,
            };
            if offset >= good {
                continue;
            }
            let mut file = File::open(&s.path).map_err(io_err(&s.path, "opening"))?;
            file.seek(SeekFrom::Start(offset)).map_err(io_err(&s.path, "seeking"))?;
            let r = BufReader::with_capacity(1 << 16, file.take(good - offset));
            let mut next = from;
            let (at, _) = scan_from(&s.path, r, offset, |rec| {
                next = rec.seq + 1;
                if rec.seq >= from {
                    out.push(rec);
                }
                out.len() < max
            })?;
            self.cursor = Some((s.path.clone(), at, next));
        }
        Ok(out)
    }

    /// The oldest record not yet confirmed.
    pub fn first_pending(&mut self) -> Result<Option<Record>, LogError> {
        self.flush()?;
        for s in &self.segments {
            if s.end <= self.acked {
                continue;
            }
            let mut file = File::open(&s.path).map_err(io_err(&s.path, "opening"))?;
            file.seek(SeekFrom::Start(MAGIC.len() as u64)).map_err(io_err(&s.path, "seeking"))?;
            let r = BufReader::with_capacity(1 << 16, file.take(s.bytes - MAGIC.len() as u64));
            let mut first = None;
            let acked = self.acked;
            scan(&s.path, r, |rec| {
                if rec.seq >= acked {
                    first = Some(rec);
                    return false;
                }
                true
            })?;
            if first.is_some() {
                return Ok(first);
            }
        }
        Ok(None)
    }

    /// With `false` (`fsync: never`), finishing a segment and recording the acked position
    /// write without syncing: after a power loss (not a process crash) the last records may be
    /// gone, or confirmed events sent again. Default `true`.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Events appended and not confirmed.
    pub fn pending_events(&self) -> u64 {
        self.next_seq - self.acked
    }

    /// Bytes on disk in segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The next sequence number.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The first sequence not yet confirmed.
    pub fn acked(&self) -> u64 {
        self.acked
    }
}

fn unreachable_segment<T>() -> Result<T, LogError> {
    Err(LogError::Foreign { path: PathBuf::new(), reason: "no segment to append to".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(i: u64) -> Vec<u8> {
        format!(r#"{{"sender_id": "s", "event": "action", "timestamp": {i}.5, "name": "a{i}"}}"#).into_bytes()
    }

    #[test]
    fn appended_records_come_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, recovery) = SpoolLog::open(dir.path(), 4096).unwrap();
            assert_eq!(recovery, Recovery::default());
            for i in 0..500 {
                assert_eq!(log.append(&json(i)).unwrap(), i);
            }
            log.sync().unwrap();
            assert!(log.segments.len() > 3, "small segments roll over: {}", log.segments.len());
        }
        let (mut log, recovery) = SpoolLog::open(dir.path(), 4096).unwrap();
        assert_eq!(recovery.pending, 500);
        let records = log.pending().unwrap();
        assert_eq!(records.len(), 500);
        for (i, r) in records.iter().enumerate() {
            assert_eq!((r.seq, &r.payload), (i as u64, &json(i as u64)));
        }
        assert_eq!(log.append(b"{}").unwrap(), 500, "sequences go on");
    }

    #[test]
    fn confirmed_segments_are_deleted_and_stay_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SpoolLog::open(dir.path(), 4096).unwrap();
        for i in 0..300 {
            log.append(&json(i)).unwrap();
        }
        log.sync().unwrap();
        let before = log.segments.len();
        log.ack(250).unwrap();
        assert!(log.segments.len() < before);
        assert_eq!(log.pending_events(), 50);
        drop(log);
        let (mut log, recovery) = SpoolLog::open(dir.path(), 4096).unwrap();
        assert_eq!(recovery.pending, 50);
        let seqs: Vec<u64> = log.pending().unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (250..300).collect::<Vec<_>>());
        log.ack(300).unwrap();
        assert_eq!(log.pending().unwrap(), vec![]);
    }

    #[test]
    fn a_torn_last_record_is_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10 {
            log.append(&json(i)).unwrap();
        }
        log.sync().unwrap();
        let path = log.segments.back().unwrap().path.clone();
        drop(log);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 5).unwrap();
        let (mut log, recovery) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((recovery.pending, recovery.torn_records), (9, 1));
        assert!(recovery.torn_bytes > 0);
        assert_eq!(log.pending().unwrap().len(), 9);
        assert_eq!(log.append(&json(9)).unwrap(), 9, "the cut record's sequence is reused");
        log.sync().unwrap();
        drop(log);
        let (_, recovery) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((recovery.pending, recovery.torn_records), (10, 0));
    }

    #[test]
    fn a_corrupt_byte_ends_the_log_there() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10 {
            log.append(&json(i)).unwrap();
        }
        log.sync().unwrap();
        let path = log.segments.back().unwrap().path.clone();
        drop(log);
        let mut bytes = fs::read(&path).unwrap();
        let third = MAGIC.len() + 2 * (HEADER + json(0).len()) + HEADER + 3;
        bytes[third] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let (mut log, recovery) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((recovery.pending, recovery.torn_records), (2, 1));
        assert_eq!(log.pending().unwrap().len(), 2);
    }

    #[test]
    fn a_power_cut_under_fsync_never_leaves_a_spool_that_opens() {
        // Unsynced files come back empty or zeroed: an earlier segment and the acked position.
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SpoolLog::open(dir.path(), 4096).unwrap();
        log.set_durable(false);
        for i in 0..100 {
            log.append(&json(i)).unwrap();
        }
        log.flush().unwrap();
        log.ack(1).unwrap();
        let paths: Vec<PathBuf> = log.segments.iter().map(|s| s.path.clone()).collect();
        assert!(paths.len() >= 3, "several segments");
        drop(log);
        let zeroed = fs::metadata(&paths[0]).unwrap().len() as usize;
        fs::write(&paths[0], vec![0u8; zeroed]).unwrap();
        fs::write(&paths[1], b"").unwrap();
        fs::write(dir.path().join("acked"), b"").unwrap();
        let (mut log, recovery) = SpoolLog::open(dir.path(), 4096).unwrap();
        assert_eq!(recovery.torn_records, 2, "both segments reported");
        let kept = log.pending().unwrap();
        assert!(!kept.is_empty() && kept.last().unwrap().seq == 99, "the later segments are kept");
        assert_eq!(log.next_seq(), 100, "sequences go on after them");
    }

    /// A record's bytes as the log writes them.
    fn raw_record(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(payload);
        let mut out = (payload.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&hasher.finalize().to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn records_a_failed_cut_left_past_the_next_segments_start_are_removed() {
        // A failed write whose cut (`set_len`) failed too: its records stay in the file, and the
        // next segment starts at the first of their sequences, with other events.
        let dir = tempfile::tempdir().unwrap();
        let mut first = MAGIC.to_vec();
        for seq in 0..10 {
            first.extend(raw_record(seq, &json(seq)));
        }
        let good_len = MAGIC.len() + (0..6).map(|s| HEADER + json(s).len()).sum::<usize>();
        fs::write(dir.path().join(segment_name(0)), &first).unwrap();
        let mut second = MAGIC.to_vec();
        for seq in 6..8 {
            second.extend(raw_record(seq, &json(100 + seq)));
        }
        fs::write(dir.path().join(segment_name(6)), &second).unwrap();
        let (mut log, recovery) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((recovery.pending, recovery.torn_records), (8, 0), "the removed ones were handed back, not lost");
        let got: Vec<(u64, Vec<u8>)> = log.pending().unwrap().into_iter().map(|r| (r.seq, r.payload)).collect();
        let want: Vec<(u64, Vec<u8>)> =
            (0..6).map(|s| (s, json(s))).chain((6..8).map(|s| (s, json(100 + s)))).collect();
        assert_eq!(got, want, "each sequence once: the next segment's events after the good part");
        assert_eq!(fs::metadata(dir.path().join(segment_name(0))).unwrap().len() as usize, good_len, "cut");
        assert_eq!(log.append(b"{}").unwrap(), 8);
    }

    #[test]
    fn one_process_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, _) = SpoolLog::open(dir.path(), 4096).unwrap();
        let second = SpoolLog::open(dir.path(), 4096).unwrap_err();
        assert!(matches!(second, LogError::Locked(_)), "{second}");
        assert!(second.to_string().contains("in use by another process"));
    }
}
