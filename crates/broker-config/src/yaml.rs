//! A small YAML 1.2 tree with positions, scalar styles and Rasa's `${VAR}` interpolation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use broker_core::{ConfigError, ConfigValue, Location, Spanned};
use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A parsed node.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Scalar { value: String, plain: bool, tag: Option<String>, at: Location },
    Seq(Vec<Node>, Location),
    Map(Vec<(Node, Node)>, Location),
}

impl Node {
    pub(crate) fn at(&self) -> &Location {
        match self {
            Node::Scalar { at, .. } | Node::Seq(_, at) | Node::Map(_, at) => at,
        }
    }

    /// The key text of a scalar key.
    pub(crate) fn key_text(&self) -> Option<&str> {
        match self {
            Node::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }
}

fn location(file: &Option<Arc<PathBuf>>, span: &Span) -> Location {
    Location { file: file.clone(), line: span.start.line(), column: span.start.col() + 1 }
}

/// Parses the first document of `text`; `None` for an empty document.
pub(crate) fn parse(text: &str, file: &Option<Arc<PathBuf>>) -> Result<Option<Node>, ConfigError> {
    let mut events = Vec::new();
    for item in Parser::new_from_str(text) {
        match item {
            Ok((ev, span)) => events.push((ev, span)),
            Err(e) => {
                let m = e.marker();
                let at = Location { file: file.clone(), line: m.line(), column: m.col() + 1 };
                return Err(ConfigError::new(at, None, format!("invalid YAML: {}", e.info())));
            }
        }
    }
    let mut b = Builder { events, pos: 0, anchors: HashMap::new(), file: file.clone(), nodes: 0, depth: 0 };
    b.document()
}

/// The deepest nesting accepted: an endpoints file needs a handful of levels.
pub(crate) const MAX_DEPTH: usize = 64;
/// The most nodes a document may expand to, aliases included (a "billion laughs" file is
/// refused at once instead of filling memory).
pub(crate) const MAX_NODES: usize = 100_000;

struct Builder<'a> {
    events: Vec<(Event<'a>, Span)>,
    pos: usize,
    /// Anchored nodes and how many nodes each expands to.
    anchors: HashMap<usize, (Node, usize)>,
    file: Option<Arc<PathBuf>>,
    /// Nodes built so far, aliases counted at their full size.
    nodes: usize,
    depth: usize,
}

impl Builder<'_> {
    fn document(&mut self) -> Result<Option<Node>, ConfigError> {
        while self.pos < self.events.len() {
            match &self.events[self.pos].0 {
                Event::StreamStart | Event::DocumentStart(_) | Event::Nothing => self.pos += 1,
                Event::StreamEnd | Event::DocumentEnd => return Ok(None),
                _ => return self.node().map(Some),
            }
        }
        Ok(None)
    }

    fn node(&mut self) -> Result<Node, ConfigError> {
        let (ev, span) = self.events.get(self.pos).cloned().ok_or_else(|| {
            ConfigError::new(Location { file: self.file.clone(), line: 0, column: 0 }, None, "unexpected end of YAML")
        })?;
        self.pos += 1;
        let at = location(&self.file, &span);
        if self.depth >= MAX_DEPTH {
            return Err(ConfigError::new(at, None, format!("the YAML is nested more than {MAX_DEPTH} levels deep")));
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(ConfigError::new(at, None, format!("the YAML expands to more than {MAX_NODES} nodes"))
                .with_hint("aliases (*name) are expanded in full; an endpoints file needs far fewer"));
        }
        let before = self.nodes;
        self.depth += 1;
        let built = self.build(ev, at);
        self.depth -= 1;
        let (node, anchor) = built?;
        if anchor > 0 {
            self.anchors.insert(anchor, (node.clone(), self.nodes - before + 1));
        }
        Ok(node)
    }

    fn build(&mut self, ev: Event<'_>, at: Location) -> Result<(Node, usize), ConfigError> {
        let (node, anchor) = match ev {
            Event::Scalar(value, style, anchor, tag) => (
                Node::Scalar {
                    value: value.into_owned(),
                    plain: style == ScalarStyle::Plain,
                    tag: tag.map(|t| format!("{}{}", t.handle, t.suffix)),
                    at,
                },
                anchor,
            ),
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                while !matches!(self.events.get(self.pos).map(|e| &e.0), Some(Event::SequenceEnd) | None) {
                    items.push(self.node()?);
                }
                self.pos += 1;
                (Node::Seq(items, at), anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<(Node, Node)> = Vec::new();
                while !matches!(self.events.get(self.pos).map(|e| &e.0), Some(Event::MappingEnd) | None) {
                    let k = self.node()?;
                    let v = self.node()?;
                    if let Some(key) = k.key_text() {
                        if let Some((first, _)) = entries.iter().find(|(e, _)| e.key_text() == Some(key)) {
                            return Err(ConfigError::new(k.at().clone(), Some(key), "duplicate key")
                                .with_hint(format!("first defined at line {}", first.at().line)));
                        }
                    }
                    entries.push((k, v));
                }
                self.pos += 1;
                (Node::Map(entries, at), anchor)
            }
            Event::Alias(id) => {
                let Some((node, size)) = self.anchors.get(&id) else {
                    return Err(ConfigError::new(at, None, "alias to an unknown anchor"));
                };
                self.nodes += size;
                if self.nodes > MAX_NODES {
                    return Err(ConfigError::new(at, None, format!("the YAML expands to more than {MAX_NODES} nodes"))
                        .with_hint("aliases (*name) are expanded in full; an endpoints file needs far fewer"));
                }
                (node.clone(), 0)
            }
            other => return Err(ConfigError::new(at, None, format!("unexpected YAML event {other:?}"))),
        };
        Ok((node, anchor))
    }
}

/// Resolves a plain scalar by the YAML 1.2 core schema.
fn resolve_plain(s: &str) -> ConfigValue {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return ConfigValue::Null,
        "true" | "True" | "TRUE" => return ConfigValue::Bool(true),
        "false" | "False" | "FALSE" => return ConfigValue::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return ConfigValue::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return ConfigValue::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return ConfigValue::Float(f64::NAN),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return ConfigValue::Int(i);
        }
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(oct, 8) {
            return ConfigValue::Int(i);
        }
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return ConfigValue::Int(i);
        }
    }
    let float_like = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && digits.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().any(|b| b.is_ascii_digit());
    if float_like {
        if let Ok(f) = s.parse::<f64>() {
            return ConfigValue::Float(f);
        }
    }
    ConfigValue::Str(s.to_owned())
}

/// Replaces every `${NAME}` in a plain scalar with the variable's value (Rasa's `!env_var`
/// resolver). The result is always a string. An unset variable is an error naming it.
fn interpolate(s: &str, at: &Location, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        match env(name) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(ConfigError::new(
                    at.clone(),
                    None,
                    // The value around it is not quoted: it may hold a secret (`amqp://user:secret@${HOST}`).
                    format!("environment variable `{name}` is not set"),
                )
                .with_hint("set it, or quote the value to keep `${...}` literally"));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Converts a node into a configuration value, interpolating environment variables.
pub(crate) fn to_value(node: &Node, env: &dyn Fn(&str) -> Option<String>) -> Result<Spanned, ConfigError> {
    let at = node.at().clone();
    let value = match node {
        Node::Scalar { value, plain, tag, at } => match tag.as_deref() {
            Some("!!str") => ConfigValue::Str(value.clone()),
            _ if !plain => ConfigValue::Str(value.clone()),
            _ if value.contains("${") => ConfigValue::Str(interpolate(value, at, env)?),
            _ => resolve_plain(value),
        },
        Node::Seq(items, _) => ConfigValue::List(items.iter().map(|n| to_value(n, env)).collect::<Result<_, _>>()?),
        Node::Map(entries, _) => {
            let mut out = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                let Some(key) = k.key_text() else {
                    return Err(ConfigError::new(k.at().clone(), None, "keys must be plain strings"));
                };
                out.push((key.to_owned(), to_value(v, env)?));
            }
            ConfigValue::Map(out)
        }
    };
    Ok(Spanned { value, at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_schema() {
        assert_eq!(resolve_plain("True"), ConfigValue::Bool(true));
        assert_eq!(resolve_plain("yes"), ConfigValue::Str("yes".into()));
        assert_eq!(resolve_plain("5672"), ConfigValue::Int(5672));
        assert_eq!(resolve_plain("0.5"), ConfigValue::Float(0.5));
        assert_eq!(resolve_plain("1e3"), ConfigValue::Float(1000.0));
        assert_eq!(resolve_plain("~"), ConfigValue::Null);
        assert_eq!(resolve_plain("localhost"), ConfigValue::Str("localhost".into()));
        assert_eq!(resolve_plain("0.0.0.0"), ConfigValue::Str("0.0.0.0".into()));
        assert_eq!(resolve_plain("e5"), ConfigValue::Str("e5".into()));
    }

    #[test]
    fn interpolation() {
        let env = |n: &str| match n {
            "U" => Some("bob".to_owned()),
            "P" => Some("5672".to_owned()),
            _ => None,
        };
        let at = Location::default();
        assert_eq!(interpolate("amqp://${U}@host:${P}/x", &at, &env).unwrap(), "amqp://bob@host:5672/x");
        let err = interpolate("db_${NOPE}_admin", &at, &env).unwrap_err();
        assert!(err.to_string().contains("`NOPE` is not set"), "{err}");
        // Rasa's `amqp://user:secret@${HOST}`: the error names the variable, never the value.
        let err = interpolate("amqp://user:s3cret@${NOPE}/", &at, &env).unwrap_err();
        assert!(!err.to_string().contains("s3cret") && !format!("{err:?}").contains("s3cret"), "{err}");
    }

    #[test]
    fn hostile_yaml_fails_fast_and_clearly() {
        let t0 = std::time::Instant::now();
        // A "billion laughs": nine levels of ten aliases each.
        let mut laughs = String::from("a0: &a0 [\"lol\"]\n");
        for i in 1..10 {
            let refs: Vec<String> = (0..10).map(|_| format!("*a{}", i - 1)).collect();
            laughs.push_str(&format!("a{i}: &a{i} [{}]\n", refs.join(", ")));
        }
        let err = parse(&laughs, &None).unwrap_err();
        assert!(err.to_string().contains("expands to more than"), "{err}");
        // 100,000 nested sequences.
        let deep = "- ".repeat(100_000) + "x\n";
        let err = parse(&deep, &None).unwrap_err();
        assert!(err.to_string().contains("nested more than"), "{err}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(1), "took {:?}", t0.elapsed());
    }
}
