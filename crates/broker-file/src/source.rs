//! `FileSource`: reads events from a file and follows the path, as `tail -F` does: growth,
//! truncation, rotation by rename or copy-truncate, deletion and re-creation.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use broker_core::{Error, Event, EventSource, Position, Received, SourceOptions, StartFrom, async_trait};

use crate::NAME;

/// How much one read asks for.
const FILL: usize = 1 << 16;

/// How often a following reader looks for growth.
const POLL: Duration = Duration::from_millis(25);

/// The longest line read as an event (64 MiB); a longer one is reported as malformed with its
/// offset and skipped, so a line without a newline cannot grow memory without limit.
pub const MAX_LINE_BYTES: usize = 64 << 20;

fn too_long() -> String {
    format!("a line longer than {MAX_LINE_BYTES} bytes: skipped up to its newline")
}

/// Which file a path names: device and inode (Unix); a replaced file has another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity(u64, u64);

fn identity(meta: &std::fs::Metadata) -> Identity {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Identity(meta.dev(), meta.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Identity(0, 0)
    }
}

/// Reads events from a file, following its path: when the path is renamed away or deleted, what
/// the old file still holds is read to its end, then the file that takes the path is read from
/// its start; a truncated file is read again from its start; a file that does not exist at open
/// is read from its start once it appears.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    file: Option<File>,
    /// The open file's identity.
    id: Option<Identity>,
    /// Offset of `buf[front]` in the file.
    offset: u64,
    /// What was read; `buf[..front]` is consumed already (dropped at the next fill, so a line
    /// handed over costs no move of the rest).
    buf: Vec<u8>,
    front: usize,
    /// How much of `buf[front..]` is known to hold no newline.
    scanned: usize,
    /// The line number of `buf[front]`, when reading from the start.
    line: Option<u64>,
    follow: bool,
    start: StartFrom,
    /// Inside a line longer than [`MAX_LINE_BYTES`]: bytes are dropped until its newline.
    skipping: bool,
    /// The file's first line (up to 4 KiB), to tell a file truncated and regrown past our
    /// position (same inode, no shorter) from one that only grew.
    head: Vec<u8>,
    /// The last read did not fill its buffer: at or near the end, where the file may be
    /// replaced or rewritten, so the path is checked before the next read.
    near_end: bool,
}

/// How much of the first line identifies a file's content.
const HEAD_BYTES: usize = 4096;

/// The first line of `path` (with its newline, at most [`HEAD_BYTES`]); empty when it has none yet.
fn first_line(path: &Path) -> Vec<u8> {
    let mut head = vec![0; HEAD_BYTES];
    let n = File::open(path).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
    head.truncate(n);
    match head.iter().position(|&b| b == b'\n') {
        Some(nl) => {
            head.truncate(nl + 1);
            head
        }
        None if n == HEAD_BYTES => head,
        None => Vec::new(),
    }
}

impl FileSource {
    /// Opens `path` at `options.start`: the beginning, a byte offset, or the current end.
    pub fn open(path: &Path, options: &SourceOptions) -> Result<FileSource, Error> {
        let mut source = FileSource {
            path: path.to_owned(),
            file: None,
            id: None,
            offset: 0,
            buf: Vec::with_capacity(1 << 16),
            front: 0,
            scanned: 0,
            line: None,
            follow: options.follow,
            start: options.start.clone(),
            skipping: false,
            head: Vec::new(),
            near_end: true,
        };
        if !source.try_open()? {
            if !options.follow {
                return Err(Error::Unavailable {
                    backend: NAME,
                    reason: format!("{} does not exist", path.display()),
                    cause: None,
                });
            }
            // Everything in a file created after this is new: read it from its start.
            source.start = StartFrom::Beginning;
        }
        Ok(source)
    }

    /// Opens the file if it exists; false when it does not (yet).
    fn try_open(&mut self) -> Result<bool, Error> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(NAME, format!("opening {}", self.path.display()), e)),
        };
        let meta = file.metadata().map_err(|e| Error::io(NAME, "reading file size", e))?;
        let len = meta.len();
        let (offset, line) = match self.start {
            StartFrom::Beginning => (0, Some(1)),
            StartFrom::Offset(o) => (o.min(len), None),
            // Following from "now": only what is appended from here on.
            _ => (len, None),
        };
        file.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(NAME, "seeking", e))?;
        self.offset = offset;
        self.line = line;
        self.id = Some(identity(&meta));
        self.file = Some(file);
        self.clear();
        self.skipping = false;
        self.head = first_line(&self.path);
        Ok(true)
    }

    /// Reads more bytes; Ok(0) at the current end.
    fn fill(&mut self) -> Result<usize, Error> {
        let Some(file) = self.file.as_mut() else { return Ok(0) };
        if self.front > 0 {
            self.buf.drain(..self.front);
            self.front = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + FILL, 0);
        let n = file.read(&mut self.buf[old..]);
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(old);
                return Err(Error::io(NAME, format!("reading {}", self.path.display()), e));
            }
        };
        self.buf.truncate(old + n);
        Ok(n)
    }

    /// At the end of the open file: whether the path now names another file (renamed away and
    /// re-created, deleted and re-created) or a shorter one (truncated). Then what the path names
    /// is read from its start; a path that names nothing yet keeps the old file (a writer may
    /// still append to it) until a new one appears.
    fn follow_path(&mut self) -> Result<(), Error> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(NAME, format!("checking {}", self.path.display()), e)),
        };
        let replaced = self.id.is_some_and(|id| id != identity(&meta));
        let shorter = meta.len() < self.offset + self.pending().len() as u64;
        // Truncated and written again past our position: the first line changed.
        let rewritten = !replaced && !shorter && self.offset > 0 && {
            if self.head.is_empty() {
                self.head = first_line(&self.path);
                false
            } else {
                let now = first_line(&self.path);
                !now.is_empty() && now != self.head
            }
        };
        let truncated = !replaced && (shorter || rewritten);
        // Renamed away: what a writer still appended to the old file comes first.
        if replaced && self.fill()? > 0 {
            return Ok(());
        }
        if replaced || truncated {
            let what = if replaced { "was replaced (rotated or re-created)" } else { "was truncated" };
            tracing::warn!("{} {what}; reading it from the start", self.path.display());
            if !self.pending().is_empty() && !self.skipping {
                tracing::warn!(
                    "{}: the old file ended with {} bytes and no newline: not an event, dropped",
                    self.path.display(),
                    self.pending().len()
                );
            }
            self.start = StartFrom::Beginning;
            self.try_open()?;
        }
        Ok(())
    }

    /// The position of the line that starts at `buf[0]`.
    fn position(&self) -> Position {
        match self.line {
            Some(line) => Position::Line { line, offset: self.offset },
            None => Position::Offset(self.offset),
        }
    }

    /// What is read and not consumed.
    fn pending(&self) -> &[u8] {
        &self.buf[self.front..]
    }

    /// Drops everything read.
    fn clear(&mut self) {
        self.buf.clear();
        self.front = 0;
        self.scanned = 0;
    }

    /// Drops `n` bytes (a line and its newline) from the front of what is pending.
    fn consume(&mut self, n: usize) {
        self.front += n;
        self.scanned = 0;
        self.offset += n as u64;
        self.line = self.line.map(|l| l + 1);
    }
}

#[async_trait]
impl EventSource for FileSource {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn next(&mut self) -> Result<Option<Received>, Error> {
        loop {
            if let Some(nl) = self.pending()[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + nl;
                if self.skipping {
                    // The end of a line too long to be an event (reported when it passed the cap).
                    self.skipping = false;
                    self.consume(end + 1);
                    continue;
                }
                let position = self.position();
                if end > MAX_LINE_BYTES {
                    self.consume(end + 1);
                    return Err(Error::Malformed { position, reason: too_long() });
                }
                let raw: Vec<u8> = self.pending()[..end].to_vec();
                self.consume(end + 1);
                if raw.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return match Event::from_json(&raw) {
                    Ok(event) => Ok(Some(Received::new(event, raw, position, Some(self.offset)))),
                    Err(e) => Err(Error::Malformed { position, reason: e.to_string() }),
                };
            }
            self.scanned = self.pending().len();
            if self.pending().len() > MAX_LINE_BYTES && !self.skipping {
                // Reported once, at its start; the rest of it is dropped as it comes.
                let position = self.position();
                self.skipping = true;
                let n = self.pending().len();
                self.clear();
                self.offset += n as u64;
                return Err(Error::Malformed { position, reason: too_long() });
            }
            if self.skipping && !self.pending().is_empty() {
                let n = self.pending().len();
                self.clear();
                self.offset += n as u64;
            }
            if self.file.is_none() && !self.try_open()? {
                if !self.follow {
                    return Ok(None);
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
            // Near the end, before reading what came since: is it still the same file, and not
            // truncated or rewritten? (While reading full buffers nothing is checked.)
            if self.follow && self.near_end {
                self.follow_path()?;
            }
            let n = self.fill()?;
            self.near_end = n < FILL;
            if n > 0 {
                continue;
            }
            // At the end. An unterminated last line is still being written (or was cut by a
            // crash); it is not an event until its newline arrives.
            if !self.follow {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
