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

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(400);
        let t = term_text(&s);
        assert!(t.len() <= MAX_TERM_TEXT && s.starts_with(t));
    }
}
