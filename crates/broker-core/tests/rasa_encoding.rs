//! The Rasa encoding, checked against lines Rasa wrote and against Python's own `json.dumps`.

use broker_core::Event;
use broker_core::event::EventError;
use broker_core::json::{self, Map, Number, Value};
use proptest::prelude::*;

const SAMPLE: &str = include_str!("data/rasa-events-sample.jsonl");

#[test]
fn every_sample_line_round_trips_byte_for_byte() {
    let mut n = 0;
    for (i, line) in SAMPLE.lines().enumerate() {
        let event = Event::from_json(line.as_bytes()).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        assert_eq!(String::from_utf8(event.to_json()).unwrap(), line, "line {}", i + 1);
        // Every known type also reads as its typed form.
        event.typed().unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        n += 1;
    }
    assert_eq!(n, 106);
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z _]{0,12}",
        any::<String>(),
        proptest::collection::vec(
            prop_oneof![Just('"'), Just('\\'), Just('\n'), Just('\u{7f}'), Just('\u{1F600}'), Just('é'), Just('\u{0}')],
            0..6
        )
        .prop_map(|v| v.into_iter().collect()),
    ]
}

fn arb_number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<i64>().prop_map(Number::Int),
        any::<f64>().prop_map(Number::Float),
        (-1e6f64..1e6).prop_map(Number::Float),
        prop_oneof![Just(1e16), Just(1e-5), Just(0.0001), Just(-0.0), Just(5e-324), Just(1e22)].prop_map(Number::Float),
        "-?[1-9][0-9]{19,40}".prop_map(|s| Number::Big(s.into())),
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_number().prop_map(|n| match n {
            // A big integer that fits i64 is an Int once parsed; keep the model canonical.
            Number::Big(b) => match b.parse::<i64>() {
                Ok(i) => Value::Number(Number::Int(i)),
                Err(_) => Value::Number(Number::Big(b)),
            },
            n => Value::Number(n),
        }),
        arb_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((arb_string(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map>())),
        ]
    })
}

fn same(a: &Value, b: &Value) -> bool {
    // NaN != NaN; compare encodings instead, which is what matters here.
    a.to_rasa_string() == b.to_rasa_string()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn write_then_parse_is_identity(v in arb_value()) {
        let text = v.to_rasa_string();
        let back = json::parse(text.as_bytes()).unwrap();
        prop_assert!(same(&v, &back), "{text}");
        prop_assert_eq!(back.to_rasa_string(), text);
    }

    #[test]
    fn output_is_ascii_and_one_line(v in arb_value()) {
        let text = v.to_rasa_string();
        prop_assert!(text.bytes().all(|b| (0x20..0x7f).contains(&b)), "{text}");
    }

    #[test]
    fn events_round_trip(sender in arb_string(), ts in arb_number(), extra in proptest::collection::vec((arb_string(), arb_value()), 0..4)) {
        let mut body = Map::new();
        body.insert("sender_id", Value::String(sender));
        body.insert("event", Value::String("slot".into()));
        body.insert("timestamp", Value::Number(ts));
        for (k, v) in extra { body.insert(k, v); }
        let text = Value::Object(body).to_rasa_string();
        if let Ok(event) = Event::from_json(text.as_bytes()) {
            prop_assert_eq!(String::from_utf8(event.to_json()).unwrap(), text);
        }
    }
}

/// Our writer against Python's: Python parses each line we wrote and writes it again with
/// `json.dumps`; the bytes must be the same. Skipped only when python3 is absent and not in CI.
#[test]
fn python_json_dumps_agrees() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::io::Write;
    use std::process::{Command, Stdio};

    if Command::new("python3").arg("-c").arg("pass").status().is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "python3 is required in CI");
        eprintln!("SKIPPED python_json_dumps_agrees: python3 not found");
        return;
    }
    let mut runner = TestRunner::deterministic();
    let strategy = arb_value();
    let mut lines: Vec<String> = SAMPLE.lines().map(str::to_owned).collect();
    for _ in 0..3000 {
        lines.push(strategy.new_tree(&mut runner).unwrap().current().to_rasa_string());
    }
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(concat!(
            "import sys, json\n",
            "for line in sys.stdin:\n",
            "    v = json.loads(line)\n",
            "    w = {'sender_id': 's', 'event': 'x', 'v': v}\n",
            "    sys.stdout.write(json.dumps(v) + '\\n')\n",
            "    sys.stdout.write(json.dumps(w) + '\\n')\n",
            "    sys.stdout.write(json.dumps(w, ensure_ascii=False, separators=(',', ':'), indent=None) + '\\n')\n",
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = lines.join("\n") + "\n";
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    let python = String::from_utf8(out.stdout).unwrap();
    let python: Vec<&str> = python.lines().collect();
    assert_eq!(python.len(), lines.len() * 3);
    for (i, ours) in lines.iter().enumerate() {
        let (canonical, wrapped, compact) = (python[3 * i], python[3 * i + 1], python[3 * i + 2]);
        // Our writer writes what Python writes.
        assert_eq!(ours, canonical);
        // Reading Python's compact, non-ASCII form (the fast transcoding path) gives Python's
        // default encoding, as does the tree path.
        let fast = Event::from_json(compact.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(fast.to_json()).unwrap(), wrapped, "transcoded from {compact}");
        let tree = Event::from_value(json::parse(compact.as_bytes()).unwrap()).unwrap();
        assert_eq!(String::from_utf8(tree.to_json()).unwrap(), wrapped);
        assert_eq!(fast.sender_id(), Some("s"));
        assert_eq!(fast.event_type(), "x");
    }
}

/// A JSON number literal in any form JSON allows: sign, leading `0` or digits, a fraction with
/// trailing zeros or not, an exponent of either case and sign.
fn arb_number_literal() -> impl Strategy<Value = String> {
    let int = prop_oneof![Just("0".to_owned()), "[1-9][0-9]{0,20}"];
    let frac = proptest::option::of("[0-9]{1,20}");
    let exp = proptest::option::of("[eE][+-]?[0-9]{1,3}");
    (proptest::bool::ANY, int, frac, exp).prop_map(|(neg, i, f, e)| {
        format!(
            "{}{i}{}{}",
            if neg { "-" } else { "" },
            f.map(|f| format!(".{f}")).unwrap_or_default(),
            e.unwrap_or_default()
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    /// Numbers the transcoder copies as they are must be what the tree path writes (Python's
    /// repr, checked against Python itself above), whatever form they come in.
    #[test]
    fn transcoded_numbers_are_written_as_python_writes_them(lit in arb_number_literal()) {
        number_agrees(&lit)?;
    }
}

fn number_agrees(lit: &str) -> Result<(), proptest::test_runner::TestCaseError> {
    let text = format!(r#"{{"sender_id": "s", "event": "slot", "value": {lit}, "list": [{lit}, {{"n": {lit}}}]}}"#);
    let fast = Event::from_json(text.as_bytes());
    let tree = json::parse(text.as_bytes()).map_err(EventError::from).and_then(Event::from_value);
    match (fast, tree) {
        (Ok(f), Ok(t)) => {
            prop_assert_eq!(String::from_utf8(f.to_json()).unwrap(), String::from_utf8(t.to_json()).unwrap(), "{}", lit)
        }
        (Err(_), Err(_)) => {}
        (f, t) => {
            prop_assert!(false, "{lit}: transcoded {:?}, tree {:?}", f.map(|e| e.to_json()), t.map(|e| e.to_json()))
        }
    }
    Ok(())
}

#[test]
fn number_edge_cases_transcode_as_python_writes_them() {
    for lit in [
        "0",
        "-0",
        "0.0",
        "-0.0",
        "1.0",
        "1.50",
        "1.5",
        "0.0001",
        "0.00001",
        "0.00012",
        "1e5",
        "1E5",
        "1e-5",
        "123456789012345.6",
        "12345678901234.5",
        "1234567890123456",
        "99999999999999999999",
        "1e16",
        "1000000000000000.0",
        "100000000000000.0",
        "9007199254740993",
        "0.1",
        "0.30000000000000004",
        "1700000000.001",
        "1528402837.617225",
        "0.9876543210123",
        "1e400",
        "-1e400",
        "5e-324",
        "01",
        "1.",
        "-",
        "1.2.3",
        "-01.5",
    ] {
        number_agrees(lit).unwrap();
    }
}

/// Writes `v` as JSON with whitespace of `ws` (cycled) around every token and separator, so the
/// transcoder's rewriting of each position is exercised.
fn spaced(v: &Value, ws: &[&str], k: &mut usize, out: &mut String) {
    fn pad(ws: &[&str], k: &mut usize, out: &mut String) {
        out.push_str(ws[*k % ws.len()]);
        *k += 1;
    }
    match v {
        Value::Array(items) => {
            out.push('[');
            pad(ws, k, out);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    pad(ws, k, out);
                }
                spaced(item, ws, k, out);
                pad(ws, k, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            pad(ws, k, out);
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    pad(ws, k, out);
                }
                out.push_str(&Value::String(key.to_owned()).to_rasa_string());
                pad(ws, k, out);
                out.push(':');
                pad(ws, k, out);
                spaced(item, ws, k, out);
                pad(ws, k, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_rasa_string()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whitespace anywhere JSON allows it (none, one space, tabs, newlines, several) gives the
    /// same bytes as the canonical text.
    #[test]
    fn whitespace_anywhere_transcodes_to_the_canonical_bytes(
        v in arb_value(),
        ws in proptest::collection::vec(prop_oneof![Just(""), Just(" "), Just("  "), Just("\t"), Just("\r\n "), Just(" \n")], 1..6),
    ) {
        let mut body = Map::new();
        body.insert("sender_id", Value::String("s".into()));
        body.insert("event", Value::String("slot".into()));
        body.insert("v", v);
        let body = Value::Object(body);
        let canonical = body.to_rasa_string();
        let mut text = String::new();
        spaced(&body, &ws, &mut 0, &mut text);
        let event = Event::from_json(text.as_bytes()).unwrap();
        prop_assert_eq!(String::from_utf8(event.to_json()).unwrap(), canonical, "from {}", text);
        prop_assert_eq!(event.sender_id(), Some("s"));
        prop_assert_eq!(event.event_type(), "slot");
    }
}

/// Duplicate keys (Python keeps the first position and the last value) are found at every
/// depth, also when written differently (`"a"` and `"\u0061"`) and past many keys; the same
/// key in a nested object and around it is no duplicate.
#[test]
fn duplicate_keys_are_found_at_every_depth() {
    let many: String = (0..40).map(|i| format!(r#""k{i}": {i}, "#)).collect();
    for (text, duplicate) in [
        (r#"{"sender_id": "s", "event": "slot", "a": 1, "b": {"a": 2}, "c": 3}"#.to_owned(), false),
        (r#"{"sender_id": "s", "event": "slot", "a": 1, "b": {"a": 2}, "a": 3}"#.to_owned(), true),
        (r#"{"sender_id": "s", "event": "slot", "b": {"x": 1, "y": [{"x": 1}], "x": 2}}"#.to_owned(), true),
        (r#"{"sender_id": "s", "event": "slot", "a": 1, "\u0061": 2}"#.to_owned(), true),
        (format!(r#"{{"sender_id": "s", "event": "slot", {many}"k3": "again"}}"#), true),
        (format!(r#"{{"sender_id": "s", "event": "slot", {many}"k40": "new"}}"#), false),
        (r#"{"sender_id": "s", "event": "slot", "sender_id": "t"}"#.to_owned(), true),
    ] {
        let fast = Event::from_json(text.as_bytes()).unwrap();
        let tree = Event::from_value(json::parse(text.as_bytes()).unwrap()).unwrap();
        assert_eq!(String::from_utf8(fast.to_json()).unwrap(), String::from_utf8(tree.to_json()).unwrap(), "{text}");
        assert_eq!(fast.sender_id(), tree.sender_id(), "{text}");
        let collapsed = tree.to_json().len() < text.len() - 3;
        assert_eq!(collapsed, duplicate, "{text}");
    }
}

/// Whitespace before the extracted `event` and `sender_id` values (dropped from the output, so
/// the output lags the input) leaves them read right; integers of 4300 digits and a sign are
/// read as Python reads them on both paths, 4301 digits refused on both.
#[test]
fn extracted_strings_after_whitespace_and_long_negative_integers() {
    for text in [
        r#"{ "event": "user", "sender_id" :  "s1"}"#,
        "{\n  \"sender_id\"\t:\t\"s1\" ,\r\n  \"event\" : \"user\" ,\"text\":\"hi\" }",
        r#"{"text": "a  b", "event":"user","sender_id":"s1"}"#,
    ] {
        let e = Event::from_json(text.as_bytes()).unwrap();
        assert_eq!((e.event_type(), e.sender_id()), ("user", Some("s1")), "{text}");
        let tree = Event::from_value(json::parse(text.as_bytes()).unwrap()).unwrap();
        assert_eq!(e.to_json(), tree.to_json(), "{text}");
    }
    for digits in [4300, 4301] {
        for sign in ["", "-"] {
            number_agrees(&format!("{sign}{}", "7".repeat(digits))).unwrap();
        }
    }
    let long = format!(r#"{{"sender_id": "s", "event": "slot", "v": -{}}}"#, "7".repeat(4300));
    assert!(Event::from_json(long.as_bytes()).is_ok(), "Python reads a 4300-digit negative integer");
}
