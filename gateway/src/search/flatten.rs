//! An event's JSON payload as index terms, in the shape the embedded index and the filter
//! compiler share. A payload is walked the way [`crate::query::Expr::matches`] looks values
//! up: a field's path is its keys joined by `.` (so `{"a.b":1}` and `{"a":{"b":1}}` both
//! have `a.b`), arrays are looked through. For every path it emits, as `path SEP kind value`:
//!
//! - `s:` + text: a string value (truncated to [`MAX_TERM_TEXT`] bytes);
//! - `b:` + `true`/`false`: a boolean;
//! - `n:` + [`encode_f64`]: a number;
//! - `m:` + [`encode_f64`]: a string that reads as a number (`"100"`), which filters compare as
//!   one (a kind of its own so that facet counts, read from `s:`, `n:` and `b:`, count each
//!   value once);
//! - `e` (no value): the path holds an object, an array or `null`. A path exists when it has
//!   any term at all (`path SEP` is a prefix of every term of the path), so scalars need no
//!   `e` term of their own.
//!
//! Facet values are the display text of scalars: a string's text, `true`/`false`, a number by
//! [`number_display`].

use serde_json::Value;

/// Between a path and the rest of a term. A key containing it cannot be told apart; such
/// keys are not expected in event payloads.
pub const SEP: char = '\u{0}';
/// String values longer than this are indexed by their first bytes (filters on them are then
/// checked event by event).
pub const MAX_TERM_TEXT: usize = 512;

/// An `f64` as 16 hex digits whose byte order is the numbers' order (`-0.0` is `0.0`).
pub fn encode_f64(value: f64) -> String {
    let mut out = String::with_capacity(16);
    push_f64(&mut out, value);
    out
}

fn f64_key(value: f64) -> u64 {
    let v = if value == 0.0 { 0.0 } else { value };
    let bits = v.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

fn push_f64(out: &mut String, value: f64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let key = f64_key(value);
    for i in (0..16).rev() {
        out.push(HEX[((key >> (i * 4)) & 0xf) as usize] as char);
    }
}

/// The number an [`encode_f64`] text stands for.
pub fn decode_f64(text: &str) -> Option<f64> {
    if text.len() != 16 {
        return None;
    }
    let key = u64::from_str_radix(text, 16).ok()?;
    let bits = if key >> 63 == 1 {
        key & !(1 << 63)
    } else {
        !key
    };
    Some(f64::from_bits(bits))
}

/// How a number is shown as a facet value: integers without a fraction (`3`), others as JSON
/// writes them (`12.5`, `1e+300`).
pub fn number_display(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or_else(|| n.to_string(), |n| n.to_string())
    }
}

/// The text of a string value as indexed: at most [`MAX_TERM_TEXT`] bytes, cut on a
/// character boundary.
pub fn term_text(s: &str) -> &str {
    if s.len() <= MAX_TERM_TEXT {
        return s;
    }
    let mut end = MAX_TERM_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn string_term(path: &str, text: &str) -> String {
    format!("{path}{SEP}s:{}", term_text(text))
}
pub fn bool_term(path: &str, b: bool) -> String {
    format!("{path}{SEP}b:{b}")
}
/// A number's term of `kind` (`"n:"` for numbers, `"m:"` for numeric strings).
pub fn number_term(path: &str, kind: &str, n: f64) -> String {
    format!("{path}{SEP}{kind}{}", encode_f64(n))
}
/// The term kinds a numeric literal is compared with.
pub const NUMBER_KINDS: [&str; 2] = ["n:", "m:"];
/// The first term of a path and the first past its last (every term of the path lies
/// between them): the path exists.
pub fn path_bounds(path: &str) -> (String, String) {
    (format!("{path}{SEP}"), format!("{path}\u{1}"))
}
/// The smallest and the first-past-the-end term of a path's kind (`"s:"` or `"n:"`), for ranges.
pub fn kind_bounds(path: &str, kind: &str) -> (String, String) {
    let mut end = kind.to_string();
    end.pop();
    end.push(';'); // ':' + 1
    (format!("{path}{SEP}{kind}"), format!("{path}{SEP}{end}"))
}

/// The facet value a term of a path stands for (`kind value` after `path SEP`): strings,
/// numbers and booleans; `None` for the other kinds.
pub fn facet_of_term(rest: &[u8]) -> Option<String> {
    let (kind, value) = rest.split_at_checked(2)?;
    let value = std::str::from_utf8(value).ok()?;
    match kind {
        b"s:" | b"b:" => Some(value.to_string()),
        b"n:" => decode_f64(value).map(number_display),
        _ => None,
    }
}

/// Calls `emit` with every index term of a payload (a term may come more than once), reusing
/// one buffer: no allocation per term. Numbers in strings are numbers too, as the filter reads
/// them.
pub fn for_each_term(value: &Value, emit: &mut impl FnMut(&str)) {
    let mut path = String::with_capacity(64);
    let mut term = String::with_capacity(128);
    if let Value::Object(map) = value {
        for (k, v) in map {
            path.clear();
            path.push_str(k);
            member(v, &mut path, &mut term, emit);
        }
    }
}

/// A member's value at `path` (non-empty).
fn member(value: &Value, path: &mut String, term: &mut String, emit: &mut impl FnMut(&str)) {
    let start = |term: &mut String, path: &str, kind: &str| {
        term.clear();
        term.push_str(path);
        term.push(SEP);
        term.push_str(kind);
    };
    match value {
        Value::String(s) => {
            start(term, path, "s:");
            term.push_str(term_text(s));
            emit(term);
            if let Some(n) = crate::query::number_of(value) {
                start(term, path, "m:");
                push_f64(term, n);
                emit(term);
            }
        }
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                start(term, path, "n:");
                push_f64(term, f);
                emit(term);
            }
        }
        Value::Bool(b) => {
            start(term, path, if *b { "b:true" } else { "b:false" });
            emit(term);
        }
        Value::Null | Value::Object(_) | Value::Array(_) => {
            start(term, path, "e");
            emit(term);
            inner(value, path, term, emit);
        }
    }
}

/// The members of an object, or the items of an array, under `path`.
fn inner(value: &Value, path: &mut String, term: &mut String, emit: &mut impl FnMut(&str)) {
    match value {
        Value::Object(map) => {
            let len = path.len();
            for (k, v) in map {
                path.truncate(len);
                path.push('.');
                path.push_str(k);
                member(v, path, term, emit);
            }
            path.truncate(len);
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(_) | Value::Array(_) => inner(item, path, term, emit),
                    Value::Null => {}
                    scalar => member(scalar, path, term, emit),
                }
            }
        }
        _ => {}
    }
}

/// An event's index terms and searchable text, read in one pass over the payload's bytes
/// (no `serde_json::Value`): the same terms as [`for_each_term`] and the same text as
/// [`crate::query::text::event_text`] (the words in another order). Buffers are kept between
/// events.
#[derive(Debug, Default)]
pub struct PayloadTerms {
    /// The terms, one after another; `ends[i]` is where term `i` ends.
    buf: String,
    ends: Vec<usize>,
    /// The event's searchable text (values separated by newlines).
    pub text: String,
}

impl PayloadTerms {
    /// Reads one event's payload (`content_type` as stored).
    pub fn read(&mut self, content_type: &str, payload: &[u8]) {
        self.buf.clear();
        self.ends.clear();
        self.text.clear();
        if content_type != "application/json" {
            self.text.push_str(&String::from_utf8_lossy(payload));
            return;
        }
        let (buf, ends, text) = (&mut self.buf, &mut self.ends, &mut self.text);
        let mut first = true;
        let mut top_object = false;
        let walked = crate::archive::json_leaves::walk(payload, &mut |path, _, in_array, node| {
            use crate::archive::json_leaves::Node;
            use crate::archive::schema::Scalar;
            let is_top = std::mem::take(&mut first);
            if is_top {
                top_object = matches!(node, Node::Object);
            }
            // The text: every scalar's display, as `event_text` writes it.
            if let Node::Scalar(scalar, raw) = &node {
                use std::fmt::Write;
                match scalar {
                    Scalar::Str(s) => text.push_str(s),
                    Scalar::Bool(b) => text.push_str(if *b { "true" } else { "false" }),
                    Scalar::Int(i) => {
                        let _ = write!(text, "{i}");
                    }
                    Scalar::Float(f) => {
                        // An integer too big for i64 that fits u64 is one for serde_json.
                        match raw.parse::<u64>() {
                            Ok(u) => {
                                let _ = write!(text, "{u}");
                            }
                            Err(_) => {
                                if let Some(n) = serde_json::Number::from_f64(*f) {
                                    let _ = write!(text, "{n}");
                                }
                            }
                        }
                    }
                }
                text.push('\n');
            }
            if is_top || !top_object {
                return;
            }
            let term = |buf: &mut String, kind: &str| {
                buf.push_str(path);
                buf.push(SEP);
                buf.push_str(kind);
            };
            match node {
                Node::Scalar(Scalar::Str(s), _) => {
                    term(buf, "s:");
                    buf.push_str(term_text(&s));
                    ends.push(buf.len());
                    if let Some(n) = s.parse::<f64>().ok().filter(|n| n.is_finite()) {
                        term(buf, "m:");
                        push_f64(buf, n);
                        ends.push(buf.len());
                    }
                }
                Node::Scalar(Scalar::Int(i), _) => {
                    term(buf, "n:");
                    push_f64(buf, i as f64);
                    ends.push(buf.len());
                }
                Node::Scalar(Scalar::Float(f), _) => {
                    term(buf, "n:");
                    push_f64(buf, f);
                    ends.push(buf.len());
                }
                Node::Scalar(Scalar::Bool(b), _) => {
                    term(buf, if b { "b:true" } else { "b:false" });
                    ends.push(buf.len());
                }
                Node::Null | Node::Object | Node::Array => {
                    // Items of arrays that are containers or null have no term of their own.
                    if !in_array {
                        term(buf, "e");
                        ends.push(buf.len());
                    }
                }
            }
        });
        if !matches!(walked, Ok(w) if !w.duplicate_keys) {
            // Not JSON (no terms, no text, as a tree reader sees it) or repeated keys (a tree
            // keeps the last value of a key): read it as a tree.
            self.buf.clear();
            self.ends.clear();
            self.text.clear();
            let value: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
            for_each_term(&value, &mut |t| {
                self.buf.push_str(t);
                self.ends.push(self.buf.len());
            });
            self.text = crate::query::text::event_text(content_type, payload, &value);
        }
    }

    /// The terms read by the last [`PayloadTerms::read`] (a term may come more than once).
    pub fn terms(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let t = &self.buf[start..end];
            start = end;
            t
        })
    }
}

/// Terms and facet values of one payload.
#[derive(Debug, Default)]
pub struct Flattened {
    pub terms: Vec<String>,
    /// `path SEP display text` of every scalar.
    pub facets: Vec<String>,
}

/// Flattens a JSON payload (sorted, without duplicates).
pub fn flatten(value: &Value) -> Flattened {
    let mut out = Flattened::default();
    for_each_term(value, &mut |t| out.terms.push(t.to_string()));
    for t in &out.terms {
        let (path, rest) = t.split_once(SEP).expect("every term has a path");
        if let Some(v) = facet_of_term(rest.as_bytes()) {
            out.facets.push(format!("{path}{SEP}{v}"));
        }
    }
    out.terms.sort_unstable();
    out.terms.dedup();
    out.facets.sort_unstable();
    out.facets.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn number_encoding_keeps_order() {
        let xs = [
            f64::MIN,
            -1e10,
            -1.5,
            -0.0,
            0.0,
            1e-300,
            1.0,
            2.5,
            100.0,
            1e300,
        ];
        for w in xs.windows(2) {
            assert!(encode_f64(w[0]) <= encode_f64(w[1]), "{w:?}");
        }
        assert_eq!(encode_f64(-0.0), encode_f64(0.0));
    }

    #[test]
    fn paths_join_keys_and_look_through_arrays() {
        let f = flatten(&json!({"a": {"b": [1, {"c": "x"}]}, "a.b": "2", "t": true, "n": null}));
        let has = |t: String| f.terms.contains(&t);
        let e = |p: &str| format!("{p}{SEP}e");
        assert!(has(e("a")));
        assert!(has(e("a.b")));
        assert!(has(e("n")));
        assert!(
            !has(e("a.b.c")),
            "scalars carry no exists term: {:?}",
            f.terms
        );
        assert!(has(string_term("a.b.c", "x")));
        assert!(has(number_term("a.b", "n:", 1.0)));
        assert!(has(number_term("a.b", "m:", 2.0)));
        assert!(!has(number_term("a.b", "n:", 2.0)));
        assert!(has(string_term("a.b", "2")));
        assert!(has(bool_term("t", true)));
        assert!(f.facets.contains(&format!("a.b{SEP}1")));
        assert!(f.facets.contains(&format!("a.b{SEP}2")));
        // Every term of a path lies within its bounds, and no other path's term does.
        let (lo, hi) = path_bounds("a.b");
        let inside: Vec<&String> = f
            .terms
            .iter()
            .filter(|t| t.as_str() >= lo.as_str() && t.as_str() < hi.as_str())
            .collect();
        assert_eq!(inside.len(), 4, "{inside:?}");
    }

    #[test]
    fn numbers_round_trip_and_display() {
        for x in [0.0, -0.0, 1.0, -2.5, 12.5, 1e300, -1e-300, 123456789.0] {
            assert_eq!(
                decode_f64(&encode_f64(x)),
                Some(if x == 0.0 { 0.0 } else { x })
            );
        }
        assert_eq!(number_display(3.0), "3");
        assert_eq!(number_display(-12.5), "-12.5");
        assert_eq!(number_display(1e300), "1e+300");
        assert_eq!(
            facet_of_term(format!("n:{}", encode_f64(42.0)).as_bytes()),
            Some("42".into())
        );
        assert_eq!(facet_of_term(b"m:0000000000000000"), None);
        assert_eq!(facet_of_term(b"e"), None);
    }

    /// A random JSON text: nested objects (keys may repeat), arrays, and number and string
    /// literals chosen for their edge cases.
    fn random_json(rng: &mut impl rand::Rng, depth: usize, out: &mut String) {
        use crate::archive::json_leaves::NUMBER_LITERALS as NUMBERS;
        const STRINGS: [&str; 14] = [
            "\"\"",
            "\"plain words Here\"",
            "\"100\"",
            "\" 5\"",
            "\"1e3\"",
            "\"inf\"",
            "\"NaN\"",
            "\"-0\"",
            "\"esc\\\"aped\\n\\u00e9\\ud83c\\udf89 ok\"",
            "\"ünïcödé 🎉 mixed_words-and.dots\"",
            "\"2026-11-25T10:11:12.123Z\"",
            "\"averyveryveryveryveryverylongwordthatisoverfortybytes short\"",
            "\"true\"",
            "\"10.1.2.3\"",
        ];
        const KEYS: [&str; 8] = ["a", "b", "id", "k.dot", "é", "", "q\\\"x", "amount"];
        match rng.random_range(0..if depth > 3 { 5 } else { 8 }) {
            0 => out.push_str("null"),
            1 => out.push_str(if rng.random_bool(0.5) {
                "true"
            } else {
                "false"
            }),
            2 => out.push_str(NUMBERS[rng.random_range(0..NUMBERS.len())]),
            3 => out.push_str(STRINGS[rng.random_range(0..STRINGS.len())]),
            4 => {
                let long = "é".repeat(rng.random_range(250..300));
                out.push_str(&serde_json::Value::String(long).to_string());
            }
            5 | 6 => {
                out.push('{');
                for i in 0..rng.random_range(0..5) {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&format!("\"{}\": ", KEYS[rng.random_range(0..KEYS.len())]));
                    random_json(rng, depth + 1, out);
                }
                out.push('}');
            }
            _ => {
                out.push('[');
                for i in 0..rng.random_range(0..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    random_json(rng, depth + 1, out);
                }
                out.push(']');
            }
        }
    }

    #[test]
    fn one_pass_terms_and_text_equal_the_tree_readers() {
        let mut rng = rand::rng();
        let mut scratch = PayloadTerms::default();
        let mut streamed = 0;
        for round in 0..4000 {
            let mut text = String::new();
            if round % 4 != 0 {
                text.push_str("{\"top\": ");
                random_json(&mut rng, 0, &mut text);
                text.push_str(", \"x\": ");
                random_json(&mut rng, 0, &mut text);
                text.push('}');
            } else {
                random_json(&mut rng, 0, &mut text);
            }
            if round % 7 == 0 {
                // Sometimes broken: a byte cut off.
                text.pop();
            }
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let mut want_terms = Vec::new();
            for_each_term(&value, &mut |t| want_terms.push(t.to_string()));
            want_terms.sort();
            let mut want_words = crate::query::text::words(&crate::query::text::event_text(
                "application/json",
                text.as_bytes(),
                &value,
            ));
            want_words.sort();
            scratch.read("application/json", text.as_bytes());
            let mut got_terms: Vec<String> = scratch.terms().map(str::to_string).collect();
            got_terms.sort();
            let mut got_words = crate::query::text::words(&scratch.text);
            got_words.sort();
            assert_eq!(got_terms, want_terms, "terms of {text}");
            assert_eq!(got_words, want_words, "words of {text}");
            if crate::archive::json_leaves::walk(text.as_bytes(), &mut |_, _, _, _| {})
                .is_ok_and(|w| !w.duplicate_keys)
            {
                streamed += 1;
            }
        }
        assert!(
            streamed > 1500,
            "most documents take the one-pass path: {streamed}"
        );
        // Not JSON: the bytes are the text.
        scratch.read("text/plain", b"Hello there");
        assert_eq!(scratch.terms().count(), 0);
        assert_eq!(scratch.text, "Hello there");
    }

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(400);
        let t = term_text(&s);
        assert!(t.len() <= MAX_TERM_TEXT && s.starts_with(t));
    }
}
