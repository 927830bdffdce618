//! An event's JSON payload as index terms, in the shape the embedded index and the filter
//! compiler share. A payload is walked the way [`crate::query::Expr::matches`] looks values
//! up: a field's path is its keys joined by `.` (so `{"a.b":1}` and `{"a":{"b":1}}` both
//! have `a.b`), arrays are looked through. For every path it emits, as `path SEP kind value`:
//!
//! - `e` (no value): the path exists (any value, also `null`, objects and arrays);
//! - `s:` + text: a string value (truncated to [`MAX_TERM_TEXT`] bytes);
//! - `b:` + `true`/`false`: a boolean;
//! - `n:` + [`encode_f64`]: a number, or a string that reads as one (`"100"`), encoded so that
//!   byte order is numeric order.
//!
//! Facet values (`path SEP display text`) are emitted for every scalar.

use serde_json::Value;

/// Between a path and the rest of a term. A key containing it cannot be told apart; such
/// keys are not expected in event payloads.
pub const SEP: char = '\u{0}';
/// String values longer than this are indexed by their first bytes (filters on them are then
/// checked event by event).
pub const MAX_TERM_TEXT: usize = 512;

/// An `f64` as 16 hex digits whose byte order is the numbers' order (`-0.0` is `0.0`).
pub fn encode_f64(value: f64) -> String {
    let v = if value == 0.0 { 0.0 } else { value };
    let bits = v.to_bits();
    let key = if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    };
    format!("{key:016x}")
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

pub fn exists_term(path: &str) -> String {
    format!("{path}{SEP}e")
}
pub fn string_term(path: &str, text: &str) -> String {
    format!("{path}{SEP}s:{}", term_text(text))
}
pub fn bool_term(path: &str, b: bool) -> String {
    format!("{path}{SEP}b:{b}")
}
pub fn number_term(path: &str, n: f64) -> String {
    format!("{path}{SEP}n:{}", encode_f64(n))
}
/// The smallest and the first-past-the-end term of a path's kind (`"s:"` or `"n:"`), for ranges.
pub fn kind_bounds(path: &str, kind: &str) -> (String, String) {
    let mut end = kind.to_string();
    end.pop();
    end.push(';'); // ':' + 1
    (format!("{path}{SEP}{kind}"), format!("{path}{SEP}{end}"))
}

/// Terms and facet values of one payload.
#[derive(Debug, Default)]
pub struct Flattened {
    pub terms: Vec<String>,
    pub facets: Vec<String>,
}

/// Flattens a JSON payload. Numbers in strings are numbers too, as the filter reads them.
pub fn flatten(value: &Value) -> Flattened {
    let mut out = Flattened::default();
    walk(value, None, &mut out);
    out.terms.sort_unstable();
    out.terms.dedup();
    out.facets.sort_unstable();
    out.facets.dedup();
    out
}

fn walk(value: &Value, path: Option<&str>, out: &mut Flattened) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let p = match path {
                    Some(p) => format!("{p}.{k}"),
                    None => k.clone(),
                };
                out.terms.push(exists_term(&p));
                walk(v, Some(&p), out);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, path, out);
            }
        }
        Value::String(s) => {
            if let Some(p) = path {
                out.terms.push(string_term(p, s));
                if let Some(n) = crate::query::number_of(value) {
                    out.terms.push(number_term(p, n));
                }
                out.facets.push(format!("{p}{SEP}{}", term_text(s)));
            }
        }
        Value::Number(n) => {
            if let Some(p) = path {
                if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                    out.terms.push(number_term(p, f));
                }
                out.facets.push(format!("{p}{SEP}{n}"));
            }
        }
        Value::Bool(b) => {
            if let Some(p) = path {
                out.terms.push(bool_term(p, *b));
                out.facets.push(format!("{p}{SEP}{b}"));
            }
        }
        Value::Null => {}
    }
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
        assert!(has(exists_term("a")));
        assert!(has(exists_term("a.b")));
        assert!(has(exists_term("a.b.c")));
        assert!(has(exists_term("n")));
        assert!(has(number_term("a.b", 1.0)));
        assert!(has(number_term("a.b", 2.0)));
        assert!(has(string_term("a.b", "2")));
        assert!(has(string_term("a.b.c", "x")));
        assert!(has(bool_term("t", true)));
        assert!(f.facets.contains(&format!("a.b{SEP}1")));
    }

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(400);
        let t = term_text(&s);
        assert!(t.len() <= MAX_TERM_TEXT && s.starts_with(t));
    }
}
