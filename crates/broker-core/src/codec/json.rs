//! A JSON value model that round-trips Rasa's bytes exactly.
//!
//! Rasa writes events with Python's `json.dumps` defaults. To give those bytes back unchanged we
//! need what `serde_json::Value` does not keep: the order of keys, integers of any size
//! (`18446744073709551616` stays an integer), the bare `NaN`/`Infinity` tokens, and strings that
//! hold unpaired UTF-16 surrogates (Python strings can). [`parse`] reads what Python's `json.loads`
//! reads; [`Value::write_rasa`] writes what `json.dumps(obj)` writes (`ensure_ascii`, separators
//! `", "` and `": "`, floats in `repr` form).

/// A JSON value as Python's `json` module sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// `null` (`None`).
    #[default]
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer or a float.
    Number(Number),
    /// A string of Unicode scalar values.
    String(String),
    /// A string holding at least one unpaired UTF-16 surrogate, kept as UTF-16 code units so it is
    /// written back exactly as Python would (`"\ud800"`). Rare; only produced by the parser.
    Utf16(Vec<u16>),
    /// An array.
    Array(Vec<Value>),
    /// An object, keys in insertion order.
    Object(Map),
}

/// A JSON number with Python's distinction between `int` and `float`.
#[derive(Debug, Clone, PartialEq)]
pub enum Number {
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float, written in Python `repr` form (`1.0`, `1e+16`, `NaN`, `-Infinity`).
    Float(f64),
    /// An integer outside the `i64` range, kept as its canonical decimal text (optional `-`,
    /// digits, no leading zeros), e.g. `18446744073709551616`.
    Big(Box<str>),
}

/// An ordered JSON object. Lookups are linear: event objects are small, and insertion order is
/// what Rasa's encoding is made of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Map {
    entries: Vec<(String, Value)>,
}

impl Map {
    /// An empty object.
    pub fn new() -> Map {
        Map { entries: Vec::new() }
    }

    /// An empty object with room for `n` keys.
    pub fn with_capacity(n: usize) -> Map {
        Map { entries: Vec::with_capacity(n) }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key`, mutable.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets `key`. An existing key keeps its position and gets the new value (as a Python `dict`
    /// does); a new key goes last. Returns the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: Value) -> Option<Value> {
        let key = key.into();
        if let Some(slot) = self.get_mut(&key) {
            return Some(std::mem::replace(slot, value));
        }
        self.entries.push((key, value));
        None
    }

    /// Appends `key` without looking for it first: for copying a mapping whose keys are known to
    /// be distinct (a Python `dict` with `str` keys), in linear time. A key that is already
    /// there would be written twice.
    pub fn push_new(&mut self, key: String, value: Value) {
        self.entries.push((key, value));
    }

    /// Appends without checking for an existing key. Only for builders that know the key is new.
    pub(crate) fn push_unique(&mut self, key: &str, value: Value) {
        self.entries.push((key.to_owned(), value));
    }

    /// Removes `key`, keeping the order of the others.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(i).1)
    }

    /// Renames `old` to `new` in place, keeping its position.
    pub(crate) fn rename(&mut self, old: &str, new: &str) {
        if let Some(entry) = self.entries.iter_mut().find(|(k, _)| k == old) {
            entry.0 = new.to_owned();
        }
    }

    /// Whether the object has no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Keys and values in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

impl FromIterator<(String, Value)> for Map {
    fn from_iter<T: IntoIterator<Item = (String, Value)>>(iter: T) -> Self {
        let mut map = Map::new();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

impl Value {
    /// The string, if this is a string of Unicode scalar values.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The object, if this is one.
    pub fn as_object(&self) -> Option<&Map> {
        match self {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The number as `f64` (integers converted; big integers approximated).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(Number::Int(i)) => Some(*i as f64),
            Value::Number(Number::Float(f)) => Some(*f),
            Value::Number(Number::Big(b)) => b.parse().ok(),
            _ => None,
        }
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Appends Rasa's encoding (Python `json.dumps` defaults) of this value to `out`.
    pub fn write_rasa(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(true) => out.extend_from_slice(b"true"),
            Value::Bool(false) => out.extend_from_slice(b"false"),
            Value::Number(n) => n.write_python(out),
            Value::String(s) => write_str(s, out),
            Value::Utf16(units) => write_utf16(units, out),
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    item.write_rasa(out);
                }
                out.push(b']');
            }
            Value::Object(map) => map.write_rasa(out),
        }
    }

    /// Rasa's encoding as a `String` (it is always ASCII).
    pub fn to_rasa_string(&self) -> String {
        let mut out = Vec::new();
        self.write_rasa(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Map {
    /// Appends Rasa's encoding of this object to `out`.
    pub fn write_rasa(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            write_str(k, out);
            out.extend_from_slice(b": ");
            v.write_rasa(out);
        }
        out.push(b'}');
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Number(Number::Int(i))
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Number(Number::Float(f))
    }
}
impl From<Map> for Value {
    fn from(m: Map) -> Self {
        Value::Object(m)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::Null, Into::into)
    }
}
impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::Array(v)
    }
}

impl Number {
    /// Appends the number as Python's `json.dumps` writes it.
    pub fn write_python(&self, out: &mut Vec<u8>) {
        match self {
            Number::Int(i) => {
                let mut buf = [0u8; 20];
                out.extend_from_slice(format_i64(*i, &mut buf));
            }
            Number::Big(b) => out.extend_from_slice(b.as_bytes()),
            Number::Float(f) => write_float(*f, out),
        }
    }
}

fn format_i64(value: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = value.unsigned_abs();
    let mut pos = buf.len();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        // i64::MIN has 19 digits, so there is always room for the sign.
        pos -= 1;
        buf[pos] = b'-';
    }
    &buf[pos..]
}

/// Writes `f` as Python's `float.__repr__` does: the shortest digits that round-trip, positional
/// notation for decimal exponents in `-4..16`, scientific (`1e+16`, `1e-05`) outside it.
pub fn write_float(f: f64, out: &mut Vec<u8>) {
    if f.is_nan() {
        out.extend_from_slice(b"NaN");
        return;
    }
    if f.is_infinite() {
        out.extend_from_slice(if f > 0.0 { b"Infinity" } else { b"-Infinity" });
        return;
    }
    // ryu gives the shortest round-trip digits (the same digits as Python's repr) in its own
    // layout; we take the digits and the exponent and lay them out as Python does.
    let mut rb = ryu::Buffer::new();
    let text = rb.format_finite(f).as_bytes();
    let (negative, text) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let e_pos = text.iter().position(|&c| c == b'e').unwrap_or(text.len());
    let mut exp10: i32 = 0;
    if e_pos < text.len() {
        let (sign, digits) = match text[e_pos + 1..].split_first() {
            Some((b'-', d)) => (-1, d),
            _ => (1, &text[e_pos + 1..]),
        };
        exp10 = sign * digits.iter().fold(0i32, |a, &d| a * 10 + (d - b'0') as i32);
    }
    // Collect significant digits; `point` is how many mantissa digits precede the decimal point.
    let mut digits = [0u8; 24];
    let mut nd = 0usize;
    let mut point: i32 = 0;
    let mut seen_point = false;
    for &c in &text[..e_pos] {
        if c == b'.' {
            seen_point = true;
            continue;
        }
        if nd == 0 && c == b'0' {
            // A leading zero: shifts the point when it is after the decimal point.
            if seen_point {
                point -= 1;
            }
            continue;
        }
        if nd < digits.len() {
            digits[nd] = c;
            nd += 1;
        }
        if !seen_point {
            point += 1;
        }
    }
    while nd > 1 && digits[nd - 1] == b'0' {
        nd -= 1;
    }
    if nd == 0 {
        // Zero.
        if negative {
            out.push(b'-');
        }
        out.extend_from_slice(b"0.0");
        return;
    }
    let digits = &digits[..nd];
    // Scientific exponent: value = d.ddd × 10^exp.
    let exp = point + exp10 - 1;
    if negative {
        out.push(b'-');
    }
    if !(-4..16).contains(&exp) {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let abs = exp.unsigned_abs();
        if abs < 10 {
            out.push(b'0');
        }
        let mut buf = [0u8; 20];
        out.extend_from_slice(format_i64(abs as i64, &mut buf));
    } else if exp < 0 {
        out.extend_from_slice(b"0.");
        for _ in 0..(-exp - 1) {
            out.push(b'0');
        }
        out.extend_from_slice(digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.extend_from_slice(digits);
            for _ in digits.len()..int_len {
                out.push(b'0');
            }
            out.extend_from_slice(b".0");
        } else {
            out.extend_from_slice(&digits[..int_len]);
            out.push(b'.');
            out.extend_from_slice(&digits[int_len..]);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_u_escape(unit: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[
        b'\\',
        b'u',
        HEX[(unit >> 12) as usize & 0xf],
        HEX[(unit >> 8) as usize & 0xf],
        HEX[(unit >> 4) as usize & 0xf],
        HEX[unit as usize & 0xf],
    ]);
}

/// Bytes copied unchanged by `ensure_ascii`: printable ASCII except `"` and `\`.
static PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0x20;
    while i < 0x7f {
        t[i] = i != b'"' as usize && i != b'\\' as usize;
        i += 1;
    }
    t
};

#[inline]
fn is_plain(b: u8) -> bool {
    PLAIN[b as usize]
}

fn push_escaped_ascii(b: u8, out: &mut Vec<u8>) {
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => push_u_escape(b as u16, out),
    }
}

/// Writes `s` as a JSON string with Python's `ensure_ascii=True` escaping.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = scan_plain(bytes, 0);
    while i < bytes.len() {
        let b = bytes[i];
        out.extend_from_slice(&bytes[start..i]);
        if b < 0x80 {
            push_escaped_ascii(b, out);
            i += 1;
        } else {
            // A multi-byte UTF-8 sequence: `s` is valid UTF-8, so decoding cannot fail.
            let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                push_u_escape(*unit, out);
            }
            i += ch.len_utf8();
        }
        start = i;
        i = scan_plain(bytes, i);
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn write_utf16(units: &[u16], out: &mut Vec<u8>) {
    out.push(b'"');
    for &u in units {
        if u < 0x80 {
            let b = u as u8;
            if is_plain(b) {
                out.push(b);
            } else {
                push_escaped_ascii(b, out);
            }
        } else {
            push_u_escape(u, out);
        }
    }
    out.push(b'"');
}

/// Why a text is not JSON that Python's `json.loads` would accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at byte {offset}")]
#[non_exhaustive]
pub struct ParseError {
    /// What is wrong.
    pub message: &'static str,
    /// Byte offset in the input where it was found.
    pub offset: usize,
}

/// Parses one JSON document as Python's `json.loads` does (also `NaN`, `Infinity`, `-Infinity`).
/// Leading and trailing whitespace is allowed; anything else after the value is an error.
pub fn parse(input: &[u8]) -> Result<Value, ParseError> {
    let mut p = Parser { s: input, i: 0, depth: 0 };
    p.skip_ws();
    let v = p.value()?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(p.err("extra data after the JSON value"));
    }
    Ok(v)
}

/// Python's default recursion guard is about 1000 frames; we stop nesting at the same depth so a
/// hostile line cannot exhaust the stack.
const MAX_DEPTH: usize = 1000;

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, message: &'static str) -> ParseError {
        ParseError { message, offset: self.i }
    }

    fn skip_ws(&mut self) {
        while let Some(&b) = self.s.get(self.i) {
            if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn eat(&mut self, lit: &[u8]) -> bool {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        match self.s.get(self.i) {
            None => Err(self.err("expected a value, found the end")),
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string(),
            Some(b't') if self.eat(b"true") => Ok(Value::Bool(true)),
            Some(b'f') if self.eat(b"false") => Ok(Value::Bool(false)),
            Some(b'n') if self.eat(b"null") => Ok(Value::Null),
            Some(b'N') if self.eat(b"NaN") => Ok(Value::Number(Number::Float(f64::NAN))),
            Some(b'I') if self.eat(b"Infinity") => Ok(Value::Number(Number::Float(f64::INFINITY))),
            Some(b'-') if self.s[self.i..].starts_with(b"-Infinity") => {
                self.i += 9;
                Ok(Value::Number(Number::Float(f64::NEG_INFINITY)))
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("expected a value")),
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        Ok(())
    }

    fn object(&mut self) -> Result<Value, ParseError> {
        self.enter()?;
        self.i += 1;
        let mut map = Map::new();
        self.skip_ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            self.depth -= 1;
            return Ok(Value::Object(map));
        }
        loop {
            self.skip_ws();
            if self.s.get(self.i) != Some(&b'"') {
                return Err(self.err("expected a string key"));
            }
            let key = match self.string()? {
                Value::String(s) => s,
                // A key with a lone surrogate: Python accepts it; we keep it lossy, as a key
                // cannot hold UTF-16 here. Such keys do not occur in Rasa's events.
                Value::Utf16(u) => String::from_utf16_lossy(&u),
                _ => String::new(),
            };
            self.skip_ws();
            if self.s.get(self.i) != Some(&b':') {
                return Err(self.err("expected ':' after a key"));
            }
            self.i += 1;
            self.skip_ws();
            let value = self.value()?;
            map.insert(key, value);
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(Value::Object(map));
                }
                _ => return Err(self.err("expected ',' or '}' in an object")),
            }
        }
    }

    fn array(&mut self) -> Result<Value, ParseError> {
        self.enter()?;
        self.i += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.s.get(self.i) == Some(&b']') {
            self.i += 1;
            self.depth -= 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value()?);
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.err("expected ',' or ']' in an array")),
            }
        }
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.i;
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.s.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                while matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
                    self.i += 1;
                }
            }
            _ => return Err(self.err("expected a digit")),
        }
        let mut is_float = false;
        if self.s.get(self.i) == Some(&b'.') && matches!(self.s.get(self.i + 1), Some(b'0'..=b'9')) {
            is_float = true;
            self.i += 1;
            while matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
                self.i += 1;
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            let mut j = self.i + 1;
            if matches!(self.s.get(j), Some(b'+' | b'-')) {
                j += 1;
            }
            if matches!(self.s.get(j), Some(b'0'..=b'9')) {
                is_float = true;
                while matches!(self.s.get(j), Some(b'0'..=b'9')) {
                    j += 1;
                }
                self.i = j;
            }
        }
        // The slice holds only ASCII digits and signs, so it is valid UTF-8.
        let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| self.err("bad number"))?;
        if is_float {
            let f: f64 = text.parse().map_err(|_| self.err("bad number"))?;
            return Ok(Value::Number(Number::Float(f)));
        }
        if let Ok(i) = text.parse::<i64>() {
            return Ok(Value::Number(Number::Int(i)));
        }
        // Python prints ints of up to 4300 digits (the sign not counted); so do we.
        if text.trim_start_matches('-').len() > 4300 {
            return Err(ParseError { message: "integer longer than 4300 digits", offset: start });
        }
        Ok(Value::Number(Number::Big(text.into())))
    }

    fn hex4(&mut self) -> Result<u16, ParseError> {
        let digits = self.s.get(self.i..self.i + 4).ok_or_else(|| self.err("truncated \\u escape"))?;
        let mut v: u16 = 0;
        for &d in digits {
            let n = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.err("invalid \\u escape")),
            };
            v = (v << 4) | n as u16;
        }
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<Value, ParseError> {
        self.i += 1;
        let mut out = String::new();
        let mut start = self.i;
        loop {
            let Some(&b) = self.s.get(self.i) else {
                return Err(self.err("unterminated string"));
            };
            match b {
                b'"' => {
                    let chunk = std::str::from_utf8(&self.s[start..self.i])
                        .map_err(|_| ParseError { message: "invalid UTF-8 in a string", offset: start })?;
                    out.push_str(chunk);
                    self.i += 1;
                    return Ok(Value::String(out));
                }
                b'\\' => {
                    let chunk = std::str::from_utf8(&self.s[start..self.i])
                        .map_err(|_| ParseError { message: "invalid UTF-8 in a string", offset: start })?;
                    out.push_str(chunk);
                    self.i += 1;
                    let Some(&esc) = self.s.get(self.i) else {
                        return Err(self.err("unterminated string"));
                    };
                    self.i += 1;
                    match esc {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let u = self.hex4()?;
                            match u {
                                0xD800..=0xDBFF => {
                                    let save = self.i;
                                    if self.eat(b"\\u") {
                                        let lo = self.hex4()?;
                                        if (0xDC00..=0xDFFF).contains(&lo) {
                                            let c = 0x10000 + (((u as u32) - 0xD800) << 10) + (lo as u32 - 0xDC00);
                                            out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                                        } else {
                                            self.i = save;
                                            return self.string_utf16(out, u);
                                        }
                                    } else {
                                        return self.string_utf16(out, u);
                                    }
                                }
                                0xDC00..=0xDFFF => return self.string_utf16(out, u),
                                _ => out.push(char::from_u32(u as u32).unwrap_or('\u{fffd}')),
                            }
                        }
                        _ => {
                            self.i -= 1;
                            return Err(self.err("invalid escape"));
                        }
                    }
                    start = self.i;
                }
                0x00..=0x1f => return Err(self.err("control character in a string")),
                _ => self.i += 1,
            }
        }
    }

    /// Continues a string that turned out to hold an unpaired surrogate, as UTF-16 code units.
    fn string_utf16(&mut self, prefix: String, lone: u16) -> Result<Value, ParseError> {
        let mut units: Vec<u16> = prefix.encode_utf16().collect();
        units.push(lone);
        loop {
            let Some(&b) = self.s.get(self.i) else {
                return Err(self.err("unterminated string"));
            };
            match b {
                b'"' => {
                    self.i += 1;
                    return Ok(Value::Utf16(units));
                }
                b'\\' => {
                    self.i += 1;
                    let Some(&esc) = self.s.get(self.i) else {
                        return Err(self.err("unterminated string"));
                    };
                    self.i += 1;
                    let unit = match esc {
                        b'"' => b'"' as u16,
                        b'\\' => b'\\' as u16,
                        b'/' => b'/' as u16,
                        b'b' => 8,
                        b'f' => 12,
                        b'n' => 10,
                        b'r' => 13,
                        b't' => 9,
                        b'u' => self.hex4()?,
                        _ => {
                            self.i -= 1;
                            return Err(self.err("invalid escape"));
                        }
                    };
                    units.push(unit);
                }
                0x00..=0x1f => return Err(self.err("control character in a string")),
                _ => {
                    let rest = &self.s[self.i..];
                    let len = utf8_len(b);
                    let ch = rest
                        .get(..len)
                        .and_then(|c| std::str::from_utf8(c).ok())
                        .and_then(|c| c.chars().next())
                        .ok_or_else(|| self.err("invalid UTF-8 in a string"))?;
                    let mut buf = [0u16; 2];
                    units.extend_from_slice(ch.encode_utf16(&mut buf));
                    self.i += len;
                }
            }
        }
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float(f: f64) -> String {
        let mut out = Vec::new();
        write_float(f, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn floats_follow_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (1e-7, "1e-07"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (1528402837.6, "1528402837.6"),
            (253402300799.999, "253402300799.999"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
            (1e22, "1e+22"),
            (9999999999999998.0, "9999999999999998.0"),
        ];
        for (f, want) in cases {
            assert_eq!(float(f), want, "{f:e}");
        }
    }

    #[test]
    fn strings_use_ensure_ascii() {
        let v = Value::String("a\"b\\c/\n\r\t\u{8}\u{c}\u{0}\u{7f}ü😀".into());
        assert_eq!(v.to_rasa_string(), r#""a\"b\\c/\n\r\t\b\f\u0000\u007f\u00fc\ud83d\ude00""#);
    }

    #[test]
    fn lone_surrogates_survive() {
        let text = r#"["a\ud800b", "\udc00", "x\ud83d"]"#;
        let v = parse(text.as_bytes()).unwrap();
        assert_eq!(v.to_rasa_string(), text);
    }

    #[test]
    fn duplicate_keys_keep_first_position_last_value() {
        let v = parse(br#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(v.to_rasa_string(), r#"{"a": 3, "b": 2}"#);
    }

    #[test]
    fn numbers_keep_python_types() {
        let text = r#"[1, -0, 1.0, 1E5, 18446744073709551616, -9223372036854775808, NaN, Infinity, -Infinity, 1e400]"#;
        let v = parse(text.as_bytes()).unwrap();
        assert_eq!(
            v.to_rasa_string(),
            "[1, 0, 1.0, 100000.0, 18446744073709551616, -9223372036854775808, NaN, Infinity, -Infinity, Infinity]"
        );
    }

    #[test]
    fn rejects_what_python_rejects() {
        for bad in ["{", "[1,]", "{\"a\" 1}", "01", "\"\t\"", "1 2", "'a'", "{\"a\":1,}", "tru"] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(parse(deep.as_bytes()).is_err());
    }
}

/// A string value [`transcode`] extracted: where its text is in the output (plain ASCII, written
/// as it is: no allocation), or the decoded text.
#[derive(Debug, Clone)]
pub(crate) enum Text {
    /// `json[start..end]`, plain ASCII.
    Span(usize, usize),
    /// The decoded text.
    Owned(String),
}

impl Text {
    /// The text, given the output it points into.
    pub(crate) fn get<'a>(&'a self, json: &'a [u8]) -> &'a str {
        match self {
            Text::Span(a, b) => json.get(*a..*b).and_then(|t| std::str::from_utf8(t).ok()).unwrap_or_default(),
            Text::Owned(t) => t,
        }
    }

    /// The text as an owned string.
    pub(crate) fn into_string(self, json: &[u8]) -> String {
        match self {
            Text::Owned(t) => t,
            span => span.get(json).to_owned(),
        }
    }
}

/// What [`transcode`] learned about a top-level object.
#[derive(Debug, Default)]
pub(crate) struct TopLevel {
    /// The `event` value, when a string.
    pub event_type: Option<Text>,
    /// The `sender_id` value, when a string.
    pub sender_id: Option<Text>,
    /// The input needs the tree path: a duplicate key (Python keeps the last value in the first
    /// position) or a string with an unpaired surrogate in a place we extract.
    pub needs_tree: bool,
}

/// Writes the Rasa encoding of a JSON object text straight to `out`, without building a tree:
/// the fast path for publishing JSON lines. Same acceptance rules as [`parse`].
pub(crate) fn transcode(input: &[u8], out: &mut Vec<u8>) -> Result<TopLevel, ParseError> {
    // The keys' scratch space is kept per thread, so transcoding allocates only its output.
    thread_local! {
        static KEYS: std::cell::Cell<Vec<(At, u64)>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let keys = Keys(KEYS.take());
    let mut t = Transcoder { s: input, i: 0, mark: 0, depth: 0, out, top: TopLevel::default(), keys };
    let done = t.event();
    let mut keys = t.keys.0;
    keys.clear();
    KEYS.set(keys);
    done.map(|()| t.top)
}

/// The transcoder copies lazily: input already in Rasa's encoding (what Rasa and this crate
/// write) is not copied token by token but as one span. `mark` is where the input not yet
/// copied to `out` starts; everything from `mark` to `i` is already canonical. Where the input
/// differs (whitespace, another separator, an escape or number written another way), the span
/// before it is copied, the canonical form is written, and `mark` moves past the token.
struct Transcoder<'a, 'o> {
    s: &'a [u8],
    i: usize,
    mark: usize,
    depth: usize,
    out: &'o mut Vec<u8>,
    top: TopLevel,
    /// The keys of the objects being transcoded, innermost last.
    keys: Keys,
}

/// Bytes a string scan stops at: `"`, `\`, control characters and non-ASCII.
static STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i < 0x20 || i >= 0x7f || i == b'"' as usize || i == b'\\' as usize;
        i += 1;
    }
    t
};

/// The index of the first byte at or after `from` that is not plain printable ASCII (or the
/// length). Eight bytes at a time: a word is all plain when no byte is a control character,
/// non-ASCII, `"` or `\`.
#[inline]
fn scan_plain(s: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    #[inline]
    fn has_byte(w: u64, b: u8) -> u64 {
        let x = w ^ (ONES * b as u64);
        x.wrapping_sub(ONES) & !x & HIGHS
    }
    let mut j = from;
    while j + 8 <= s.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&s[j..j + 8]);
        let w = u64::from_le_bytes(word);
        // Bytes below 0x20 (control), 0x7f and above (DEL, non-ASCII), '"' and '\\'.
        let low = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
        let high = (w & HIGHS) | has_byte(w, 0x7f);
        if (low | high | has_byte(w, b'"') | has_byte(w, b'\\')) != 0 {
            break;
        }
        j += 8;
    }
    while j < s.len() && !STRING_STOP[s[j] as usize] {
        j += 1;
    }
    j
}

/// Where a key's canonical encoding is: in the input (copied as it is) or in the output
/// (rewritten).
#[derive(Clone, Copy)]
enum At {
    Input(usize, usize),
    Output(usize, usize),
}

impl At {
    fn bytes<'b>(self, input: &'b [u8], output: &'b [u8]) -> &'b [u8] {
        match self {
            At::Input(a, b) => input.get(a..b).unwrap_or_default(),
            At::Output(a, b) => output.get(a..b).unwrap_or_default(),
        }
    }
}

/// The keys of the objects open in a transcode, for the duplicate check: where each key's
/// encoding is and a fingerprint (length and first bytes), so keys are compared byte by byte
/// only when the fingerprints match. Each object checks the keys from where it started.
struct Keys(Vec<(At, u64)>);

impl Keys {
    /// Records the key at `at` for the object whose keys start at `from`; says whether it has
    /// an equal key already.
    fn insert_is_duplicate(&mut self, from: usize, input: &[u8], output: &[u8], at: At) -> bool {
        let key = at.bytes(input, output);
        let mut head = [0u8; 8];
        let n = key.len().min(8);
        head[..n].copy_from_slice(&key[..n]);
        let print = u64::from_le_bytes(head) ^ ((key.len() as u64) << 56);
        let seen = self.0.get(from..).unwrap_or_default();
        let duplicate = seen.iter().any(|&(a, p)| p == print && a.bytes(input, output) == key);
        self.0.push((at, print));
        duplicate
    }
}

impl Transcoder<'_, '_> {
    /// The whole input: one object, whitespace around it.
    fn event(&mut self) -> Result<(), ParseError> {
        self.skip_ws();
        if self.s.get(self.i) != Some(&b'{') {
            return Err(self.err("an event must be a JSON object"));
        }
        self.object(true)?;
        self.skip_ws();
        if self.i != self.s.len() {
            return Err(self.err("extra data after the JSON value"));
        }
        self.flush(self.i);
        Ok(())
    }

    fn err(&self, message: &'static str) -> ParseError {
        ParseError { message, offset: self.i }
    }

    /// Copies the input from `mark` up to `upto` (canonical as it is) to the output.
    fn flush(&mut self, upto: usize) {
        if let Some(span) = self.s.get(self.mark..upto) {
            self.out.extend_from_slice(span);
        }
        self.mark = upto;
    }

    /// Whitespace is never part of the canonical form outside separators: it is dropped.
    fn skip_ws(&mut self) {
        if !matches!(self.s.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            return;
        }
        self.flush(self.i);
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
        self.mark = self.i;
    }

    /// At a `,` or `:` (at `i`): moves past it and the whitespace after it, writing it and one
    /// space, as Python writes them. (More whitespace after `, ` is dropped by the `skip_ws`
    /// that follows.)
    fn separator(&mut self) {
        if self.s.get(self.i + 1) == Some(&b' ') {
            self.i += 2;
            return;
        }
        let sep = self.s[self.i];
        self.flush(self.i);
        self.out.extend_from_slice(&[sep, b' ']);
        self.i += 1;
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
        self.mark = self.i;
    }

    /// Writes `v` in place of the input from `start` to `i`.
    fn rewrite(&mut self, start: usize, v: &Value) {
        self.flush(start);
        v.write_rasa(self.out);
        self.mark = self.i;
    }

    fn value(&mut self) -> Result<(), ParseError> {
        match self.s.get(self.i) {
            None => Err(self.err("expected a value, found the end")),
            Some(b'{') => self.object(false),
            Some(b'[') => self.array(),
            Some(b'"') => self.string().map(|_| ()),
            Some(b'-' | b'0'..=b'9') if self.verbatim_number() => Ok(()),
            Some(b't') if self.literal(b"true") => Ok(()),
            Some(b'f') if self.literal(b"false") => Ok(()),
            Some(b'n') if self.literal(b"null") => Ok(()),
            Some(_) => {
                // Other scalars: reuse the tree parser on this one token, then write it
                // canonically.
                let start = self.i;
                let mut p = Parser { s: self.s, i: self.i, depth: 0 };
                let v = p.value()?;
                self.i = p.i;
                self.rewrite(start, &v);
                Ok(())
            }
        }
    }

    /// Moves past `lit` when it comes next (it is canonical as it is), and says whether it did.
    fn literal(&mut self, lit: &[u8]) -> bool {
        if !self.s[self.i..].starts_with(lit) {
            return false;
        }
        self.i += lit.len();
        true
    }

    /// Moves past the number at `i` when it is already how Python writes it, and says whether
    /// it did; otherwise nothing is consumed (the tree parser then handles it).
    ///
    /// An integer is written with the same digits (JSON has no leading zeros), except `-0`. A
    /// float in positional notation with at most 15 significant digits is exactly the decimal
    /// of the double it rounds to (15 digits always survive the round trip, so no shorter
    /// decimal rounds to the same double), hence Python's shortest `repr` has the same digits;
    /// it is written the same way when it has no trailing zero after the point (except `.0`)
    /// and lies in `repr`'s positional range (at least `1e-4`: at most three zeros after `0.`).
    fn verbatim_number(&mut self) -> bool {
        let s = self.s;
        let start = self.i;
        let mut j = start;
        if s.get(j) == Some(&b'-') {
            j += 1;
        }
        let int_start = j;
        while matches!(s.get(j), Some(b'0'..=b'9')) {
            j += 1;
        }
        let int_digits = &s[int_start..j];
        if int_digits.is_empty() || (int_digits.len() > 1 && int_digits[0] == b'0') {
            return false;
        }
        let frac = if s.get(j) == Some(&b'.') {
            let f_start = j + 1;
            j = f_start;
            while matches!(s.get(j), Some(b'0'..=b'9')) {
                j += 1;
            }
            Some(&s[f_start..j])
        } else {
            None
        };
        if matches!(s.get(j), Some(b'e' | b'E' | b'.')) {
            return false;
        }
        match frac {
            None => {
                if &s[start..j] == b"-0" || int_digits.len() > 4300 {
                    return false;
                }
            }
            Some([]) => return false,
            Some(frac) => {
                let significant = if frac == b"0" {
                    int_digits.len()
                } else if frac.last() == Some(&b'0') {
                    return false;
                } else if int_digits == b"0" {
                    let zeros = frac.iter().take_while(|&&d| d == b'0').count();
                    if zeros > 3 {
                        return false;
                    }
                    frac.len() - zeros
                } else {
                    int_digits.len() + frac.len()
                };
                if significant > 15 {
                    return false;
                }
            }
        }
        self.i = j;
        true
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        Ok(())
    }

    fn object(&mut self, top: bool) -> Result<(), ParseError> {
        self.enter()?;
        self.i += 1;
        // This object's keys, to detect duplicates (their canonical encodings are equal exactly
        // when the keys are), are recorded from here; they are dropped when it closes.
        let keys_from = self.keys.0.len();
        self.skip_ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            if self.s.get(self.i) != Some(&b'"') {
                return Err(self.err("expected a string key"));
            }
            let (at, _) = self.string()?;
            if self.keys.insert_is_duplicate(keys_from, self.s, self.out, at) {
                self.top.needs_tree = true;
            }
            let which = if top {
                match at.bytes(self.s, self.out) {
                    b"\"event\"" => 1,
                    b"\"sender_id\"" => 2,
                    _ => 0,
                }
            } else {
                0
            };
            self.skip_ws();
            if self.s.get(self.i) != Some(&b':') {
                return Err(self.err("expected ':' after a key"));
            }
            self.separator();
            self.skip_ws();
            if which != 0 && self.s.get(self.i) == Some(&b'"') {
                self.extracted_string(which == 1)?;
            } else {
                if which == 1 {
                    self.top.event_type = None;
                } else if which == 2 {
                    self.top.sender_id = None;
                }
                self.value()?;
            }
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b',') => self.separator(),
                Some(b'}') => {
                    self.i += 1;
                    self.depth -= 1;
                    self.keys.0.truncate(keys_from);
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or '}' in an object")),
            }
        }
    }

    /// The string value of the top-level `event` (`is_type`) or `sender_id` key, written and
    /// kept in `top`.
    fn extracted_string(&mut self, is_type: bool) -> Result<(), ParseError> {
        let text = match self.string()? {
            // Plain ASCII: canonical as it is, and the text is the bytes between the quotes, at
            // the same distance from `mark` in the output. (`mark` may be past `out.len()`:
            // dropped whitespace is in the input only.)
            (At::Input(a, b), _) => {
                let at = self.out.len();
                Text::Span(at + (a + 1 - self.mark), at + (b - 1 - self.mark))
            }
            (_, Some(Value::String(text))) => Text::Owned(text),
            _ => {
                // A lone surrogate: the tree path handles it.
                self.top.needs_tree = true;
                return Ok(());
            }
        };
        if is_type {
            self.top.event_type = Some(text);
        } else {
            self.top.sender_id = Some(text);
        }
        Ok(())
    }

    fn array(&mut self) -> Result<(), ParseError> {
        self.enter()?;
        self.i += 1;
        self.skip_ws();
        if self.s.get(self.i) == Some(&b']') {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            self.value()?;
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b',') => self.separator(),
                Some(b']') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or ']' in an array")),
            }
        }
    }

    /// A string: runs of plain ASCII are canonical as they are; anything else is decoded and
    /// written again. Says where its canonical encoding is, and gives the decoded value when it
    /// was written again.
    fn string(&mut self) -> Result<(At, Option<Value>), ParseError> {
        let start = self.i;
        let j = scan_plain(self.s, self.i + 1);
        if self.s.get(j) == Some(&b'"') {
            // The common case: nothing to escape or decode.
            self.i = j + 1;
            return Ok((At::Input(start, self.i), None));
        }
        let mut p = Parser { s: self.s, i: start, depth: 0 };
        let v = p.string()?;
        self.i = p.i;
        self.flush(start);
        let from = self.out.len();
        v.write_rasa(self.out);
        self.mark = self.i;
        Ok((At::Output(from, self.out.len()), Some(v)))
    }
}
