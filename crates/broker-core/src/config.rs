//! Backend options as the config crate hands them over: keys, values and where they were written.
//!
//! Backends never read YAML. `broker-config` turns `endpoints.yml` into [`Options`] (each value
//! with its file, line and column), and each backend takes the keys it knows with the `take_*`
//! methods, then calls [`Options::finish`], which turns every key nobody took into an error with a
//! "did you mean" hint. So every message can name the file, line, key and bad value.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where a value was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// The file, when the options came from one.
    pub file: Option<Arc<PathBuf>>,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "{}", p.display())?,
            None => f.write_str("<options>")?,
        }
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        Ok(())
    }
}

/// A configuration value (YAML 1.2 core schema after environment interpolation).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    /// `null`, `~` or empty.
    Null,
    /// `true`/`false` (any case YAML 1.2 allows).
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A sequence.
    List(Vec<Spanned>),
    /// A mapping, keys in order.
    Map(Vec<(String, Spanned)>),
}

impl ConfigValue {
    fn kind(&self) -> &'static str {
        match self {
            ConfigValue::Null => "null",
            ConfigValue::Bool(_) => "a boolean",
            ConfigValue::Int(_) => "an integer",
            ConfigValue::Float(_) => "a float",
            ConfigValue::Str(_) => "a string",
            ConfigValue::List(_) => "a list",
            ConfigValue::Map(_) => "a mapping",
        }
    }

    fn show(&self) -> String {
        match self {
            ConfigValue::Null => "null".into(),
            ConfigValue::Bool(b) => b.to_string(),
            ConfigValue::Int(i) => i.to_string(),
            ConfigValue::Float(f) => f.to_string(),
            ConfigValue::Str(s) => format!("{s:?}"),
            ConfigValue::List(_) => "a list".into(),
            ConfigValue::Map(_) => "a mapping".into(),
        }
    }
}

/// A value with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned {
    /// The value.
    pub value: ConfigValue,
    /// Where it was written.
    pub at: Location,
}

/// A secret string (password, SASL credential). Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for handing to a client library only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An invalid configuration: where, which key, what is wrong, and what would be right.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{at}: {}{message}{}", key.as_ref().map(|k| format!("`{k}`: ")).unwrap_or_default(), hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
#[non_exhaustive]
pub struct ConfigError {
    /// Where.
    pub at: Location,
    /// The key, when the problem is one key.
    pub key: Option<String>,
    /// What is wrong, naming the bad value (never a secret's value).
    pub message: String,
    /// What is allowed or meant ("did you mean `path`?").
    pub hint: Option<String>,
}

impl ConfigError {
    /// An error at `at` about `key`.
    pub fn new(at: Location, key: Option<&str>, message: impl Into<String>) -> ConfigError {
        ConfigError { at, key: key.map(str::to_owned), message: message.into(), hint: None }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> ConfigError {
        self.hint = Some(hint.into());
        self
    }
}

/// A warning about the configuration (a key Rasa knows that we ignore, a default Rasa warns about).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Where.
    pub at: Location,
    /// The message.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// The options of one backend (the `event_broker:` keys other than `type`), consumed key by key.
#[derive(Clone, Default)]
pub struct Options {
    entries: Vec<(String, Spanned)>,
    /// Where each key was written (same order as `entries`), for errors about the key itself.
    key_at: Vec<Location>,
    taken: Vec<bool>,
    /// Location of the section itself, for errors about missing keys.
    pub section: Location,
    warnings: Vec<Warning>,
}

impl fmt::Debug for Options {
    // Values are not shown: any of them may be a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options").field("keys", &self.entries.iter().map(|(k, _)| k).collect::<Vec<_>>()).finish()
    }
}

/// Keys of the generic endpoint that Rasa reads for every backend type; they are not backend
/// options and are accepted without a warning when a backend does not use them.
pub const GENERIC_ENDPOINT_KEYS: &[&str] = &["params", "headers", "basic_auth", "token", "token_name", "cafile"];

impl Options {
    /// Options from `(key, value)` pairs; `section` is where the section starts.
    pub fn new(entries: Vec<(String, Spanned)>, section: Location) -> Options {
        let key_at = entries.iter().map(|(_, v)| v.at.clone()).collect();
        let taken = vec![false; entries.len()];
        Options { entries, key_at, taken, section, warnings: Vec::new() }
    }

    /// Like [`Options::new`], with where each key itself was written.
    pub fn with_key_locations(entries: Vec<(String, Location, Spanned)>, section: Location) -> Options {
        let key_at = entries.iter().map(|(_, at, _)| at.clone()).collect();
        let entries: Vec<(String, Spanned)> = entries.into_iter().map(|(k, _, v)| (k, v)).collect();
        let taken = vec![false; entries.len()];
        Options { entries, key_at, taken, section, warnings: Vec::new() }
    }

    /// Options from plain `(key, value)` pairs with no file position (for code and tests).
    pub fn from_pairs<K: Into<String>>(pairs: impl IntoIterator<Item = (K, ConfigValue)>) -> Options {
        let entries =
            pairs.into_iter().map(|(k, v)| (k.into(), Spanned { value: v, at: Location::default() })).collect();
        Options::new(entries, Location::default())
    }

    /// Moves the keys of the mapping under `key` to the top level, where `take_*` finds them
    /// (Rasa's `query:` of a SQL tracker store holds connection parameters such as `sslmode`).
    /// A key given both there and at the top level is an error; a `key` that is not a mapping too.
    pub fn hoist(&mut self, key: &str) -> Result<(), ConfigError> {
        let Some(v) = self.take_raw(key) else { return Ok(()) };
        let ConfigValue::Map(entries) = v.value else {
            return Err(self.wrong(key, &v, "a mapping"));
        };
        for (k, value) in entries {
            if self.contains(&k) {
                return Err(ConfigError::new(
                    value.at.clone(),
                    Some(&k),
                    format!("is given both at the top level and under `{key}`"),
                ));
            }
            self.key_at.push(value.at.clone());
            self.taken.push(false);
            self.entries.push((k, value));
        }
        Ok(())
    }

    /// Whether a key is present (taken or not).
    pub fn contains(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k == key)
    }

    fn take_raw(&mut self, key: &str) -> Option<Spanned> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        self.taken[i] = true;
        let v = self.entries[i].1.clone();
        // A null value means "not set", as in Rasa (`url:` with nothing after it).
        if v.value == ConfigValue::Null { None } else { Some(v) }
    }

    /// The location of `key`, or of the section when absent.
    pub fn location(&self, key: &str) -> Location {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.at.clone()).unwrap_or_else(|| self.section.clone())
    }

    fn wrong(&self, key: &str, v: &Spanned, want: &str) -> ConfigError {
        ConfigError::new(v.at.clone(), Some(key), format!("expected {want}, found {}", v.value.show()))
    }

    /// A string option. Numbers are accepted as their text (YAML `port: 5672` read as a string).
    pub fn take_str(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        let Some(v) = self.take_raw(key) else { return Ok(None) };
        match &v.value {
            ConfigValue::Str(s) => Ok(Some(s.clone())),
            ConfigValue::Int(i) => Ok(Some(i.to_string())),
            ConfigValue::Float(f) => Ok(Some(f.to_string())),
            _ => Err(self.wrong(key, &v, "a string")),
        }
    }

    /// A secret option; errors never show its value.
    pub fn take_secret(&mut self, key: &str) -> Result<Option<Secret>, ConfigError> {
        let Some(v) = self.take_raw(key) else { return Ok(None) };
        match v.value {
            ConfigValue::Str(s) => Ok(Some(Secret(s))),
            ConfigValue::Int(i) => Ok(Some(Secret(i.to_string()))),
            other => Err(ConfigError::new(v.at, Some(key), format!("expected a string, found {}", other.kind()))),
        }
    }

    /// A strict boolean: only YAML booleans; the string `"false"` is an error (Rasa would read it
    /// as true).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        let Some(v) = self.take_raw(key) else { return Ok(None) };
        match &v.value {
            ConfigValue::Bool(b) => Ok(Some(*b)),
            _ => Err(self.wrong(key, &v, "a boolean (true or false, unquoted)")),
        }
    }

    /// A non-negative integer; a numeric string is accepted (`port: "5672"`, `port: ${PORT}`).
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        let Some(v) = self.take_raw(key) else { return Ok(None) };
        match &v.value {
            ConfigValue::Int(i) if *i >= 0 => Ok(u64::try_from(*i).ok()),
            ConfigValue::Str(s) if s.trim().parse::<u64>().is_ok() => Ok(s.trim().parse().ok()),
            _ => Err(self.wrong(key, &v, "a non-negative integer")),
        }
    }

    /// A non-negative integer that fits a `usize` (a count or a size in bytes).
    pub fn take_usize(&mut self, key: &str) -> Result<Option<usize>, ConfigError> {
        let at = self.location(key);
        match self.take_u64(key)? {
            None => Ok(None),
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| ConfigError::new(at, Some(key), format!("{n} is out of range"))),
        }
    }

    /// A non-negative number of seconds (integer or float, or a numeric string).
    pub fn take_seconds(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        let Some(v) = self.take_raw(key) else { return Ok(None) };
        let secs = match &v.value {
            ConfigValue::Int(i) => Some(*i as f64),
            ConfigValue::Float(f) => Some(*f),
            ConfigValue::Str(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match secs {
            Some(s) if (0.0..1e9).contains(&s) => Ok(Some(Duration::from_secs_f64(s))),
            _ => Err(self.wrong(key, &v, "a non-negative number of seconds")),
        }
    }

    /// A list of strings; a single string is a list of one (Rasa's `queues: q`). Numbers become
    /// their text. A comma-separated string is *not* split here; backends decide.
    pub fn take_str_list(&mut self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(v) = self.take_raw(key) else { return Ok(None) };
        match &v.value {
            ConfigValue::Str(s) => Ok(Some(vec![s.clone()])),
            ConfigValue::List(items) => items
                .iter()
                .map(|item| match &item.value {
                    ConfigValue::Str(s) => Ok(s.clone()),
                    ConfigValue::Int(i) => Ok(i.to_string()),
                    _ => Err(self.wrong(key, item, "a string")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            _ => Err(self.wrong(key, &v, "a string or a list of strings")),
        }
    }

    /// A string restricted to `allowed` (compared case-insensitively); returns the allowed spelling.
    pub fn take_choice(&mut self, key: &str, allowed: &[&'static str]) -> Result<Option<&'static str>, ConfigError> {
        let Some(v) = self.take_raw(key) else { return Ok(None) };
        let ConfigValue::Str(s) = &v.value else {
            return Err(self.wrong(key, &v, &format!("one of {}", allowed.join(", "))));
        };
        if let Some(a) = allowed.iter().find(|a| a.eq_ignore_ascii_case(s)) {
            return Ok(Some(a));
        }
        let mut err = ConfigError::new(v.at.clone(), Some(key), format!("{s:?} is not allowed"));
        err.hint = Some(match did_you_mean(s, allowed) {
            Some(m) => format!("did you mean {m:?}? allowed: {}", allowed.join(", ")),
            None => format!("allowed: {}", allowed.join(", ")),
        });
        Err(err)
    }

    /// The raw value of a key the backend interprets itself (a mapping of pass-through settings).
    pub fn take_value(&mut self, key: &str) -> Option<Spanned> {
        self.take_raw(key)
    }

    /// Records a warning about `key`.
    pub fn warn(&mut self, key: &str, message: impl Into<String>) {
        let at = self.location(key);
        let message = message.into();
        tracing::warn!("{at}: {message}");
        self.warnings.push(Warning { at, message });
    }

    /// Marks keys that Rasa knows for this backend but we do not implement: each present one is
    /// taken with a warning naming it.
    pub fn ignore_with_warning(&mut self, keys: &[&str], why: &str) {
        for key in keys {
            if self.contains(key) {
                let _ = self.take_raw(key);
                self.warn(key, format!("`{key}` is not supported and is ignored: {why}"));
            }
        }
    }

    /// Ends option parsing: every key no `take_*` call consumed is an error, with the closest
    /// known key as a hint. Generic endpoint keys are accepted with a warning. Returns warnings.
    pub fn finish(self, backend: &str, known: &[&str]) -> Result<Vec<Warning>, ConfigError> {
        self.finish_for(&format!("{backend} event broker"), known)
    }

    /// [`finish`](Options::finish) for a section that is not an event broker; `what` names it in
    /// messages (`"sql tracker store"`).
    pub fn finish_for(mut self, what: &str, known: &[&str]) -> Result<Vec<Warning>, ConfigError> {
        for i in 0..self.entries.len() {
            if self.taken[i] {
                continue;
            }
            let key = self.entries[i].0.clone();
            if GENERIC_ENDPOINT_KEYS.contains(&key.as_str()) {
                self.warn(&key, format!("`{key}` has no effect on the {what}"));
                continue;
            }
            let mut err = ConfigError::new(self.key_at[i].clone(), Some(&key), format!("unknown key for the {what}"));
            err.hint = Some(match did_you_mean(&key, known) {
                Some(m) => format!("did you mean `{m}`? known keys: {}", known.join(", ")),
                None => format!("known keys: {}", known.join(", ")),
            });
            return Err(err);
        }
        Ok(self.warnings)
    }
}

/// The closest candidate by edit distance, when it is close enough to be a typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&word, &c.to_ascii_lowercase()), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// What `publish` does when the buffer is full (docs/contract.md §A.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenFull {
    /// Wait for room (back-pressure). The default.
    #[default]
    Block,
    /// Fail the publish at once with [`crate::Error::BufferFull`].
    Error,
}

/// Delivery settings every backend accepts, with safe defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryOptions {
    /// Events accepted but not yet handed to the service (`buffer_size`, default 10,000).
    pub buffer_size: usize,
    /// What a publish does when the buffer is full (`when_full`: `block` or `error`).
    pub when_full: WhenFull,
    /// How long `close` waits for outstanding events (`close_timeout`, seconds, default 30).
    pub close_timeout: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions { buffer_size: 10_000, when_full: WhenFull::Block, close_timeout: Duration::from_secs(30) }
    }
}

impl DeliveryOptions {
    /// With `buffer_size` events accepted but not yet handed over.
    pub fn buffer_size(mut self, events: usize) -> DeliveryOptions {
        self.buffer_size = events;
        self
    }

    /// With `when_full`.
    pub fn when_full(mut self, when_full: WhenFull) -> DeliveryOptions {
        self.when_full = when_full;
        self
    }

    /// With `close_timeout`.
    pub fn close_timeout(mut self, timeout: Duration) -> DeliveryOptions {
        self.close_timeout = timeout;
        self
    }

    /// The option keys this reads.
    pub const KEYS: &'static [&'static str] = &["buffer_size", "when_full", "close_timeout"];

    /// Takes `buffer_size`, `when_full` and `close_timeout` from `options`.
    pub fn take(options: &mut Options) -> Result<DeliveryOptions, ConfigError> {
        let mut d = DeliveryOptions::default();
        if let Some(n) = options.take_usize("buffer_size")? {
            if n == 0 || n > 10_000_000 {
                return Err(ConfigError::new(
                    options.location("buffer_size"),
                    Some("buffer_size"),
                    format!("{n} is out of range"),
                )
                .with_hint("between 1 and 10000000 events"));
            }
            d.buffer_size = n;
        }
        if let Some(p) = options.take_choice("when_full", &["block", "error"])? {
            d.when_full = if p == "block" { WhenFull::Block } else { WhenFull::Error };
        }
        if let Some(t) = options.take_seconds("close_timeout")? {
            d.close_timeout = t;
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_get_a_hint() {
        let opts = Options::from_pairs([("pth", ConfigValue::Str("x".into()))]);
        let err = opts.finish("file", &["path"]).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("pth"));
        assert!(err.to_string().contains("did you mean `path`?"), "{err}");
    }

    #[test]
    fn strict_booleans() {
        let mut opts = Options::from_pairs([("flag", ConfigValue::Str("false".into()))]);
        let err = opts.take_bool("flag").unwrap_err();
        assert!(err.to_string().contains("expected a boolean"), "{err}");
    }

    #[test]
    fn secrets_are_not_shown() {
        let mut opts = Options::from_pairs([("password", ConfigValue::Str("hunter2".into()))]);
        assert!(!format!("{opts:?}").contains("hunter2"));
        let s = opts.take_secret("password").unwrap().unwrap();
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        let mut opts = Options::from_pairs([("password", ConfigValue::List(vec![]))]);
        assert!(!opts.take_secret("password").unwrap_err().to_string().contains("hunter2"));
    }

    #[test]
    fn numeric_strings_are_numbers() {
        let mut opts = Options::from_pairs([("port", ConfigValue::Str("5672".into()))]);
        assert_eq!(opts.take_u64("port").unwrap(), Some(5672));
    }
}
