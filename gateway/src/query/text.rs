//! Free text (`q`): the words of the query must all occur among the words of the event, in
//! any order, case-insensitively. Words are runs of letters and digits (any script), at most
//! 40 bytes long (longer runs are ignored on both sides). An event's words are those of every
//! string, number and boolean value in its JSON payload (keys are not words), or of its bytes
//! read as UTF-8 when it is not JSON. The embedded index tokenizes with this same analyzer,
//! so the index and the archive scan select the same events.

use std::collections::HashSet;

use tantivy::tokenizer::{LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer};

/// Name under which the embedded index registers [`analyzer`].
pub const ANALYZER: &str = "rewind_text";

/// The analyzer that splits text into words.
pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .build()
}

/// The words of a text, in order (duplicates kept).
pub fn words(text: &str) -> Vec<String> {
    let mut analyzer = analyzer();
    let mut stream = analyzer.token_stream(text);
    let mut out = Vec::new();
    while let Some(t) = stream.next() {
        out.push(t.text.clone());
    }
    out
}

/// The searchable text of an event: values of a JSON payload joined by newlines, or the bytes.
pub fn event_text(content_type: &str, payload: &[u8], value: &serde_json::Value) -> String {
    if content_type == "application/json" {
        let mut out = String::new();
        collect_values(value, &mut out);
        out
    } else {
        String::from_utf8_lossy(payload).into_owned()
    }
}

fn collect_values(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Number(n) => {
            out.push_str(&n.to_string());
            out.push('\n');
        }
        Value::Bool(b) => {
            out.push_str(if *b { "true\n" } else { "false\n" });
        }
        Value::Array(items) => items.iter().for_each(|i| collect_values(i, out)),
        Value::Object(map) => map.values().for_each(|i| collect_values(i, out)),
        Value::Null => {}
    }
}

/// Whether every word of `q` is a word of the event. A `q` without words selects everything.
pub fn matches(q: &str, content_type: &str, payload: &[u8], value: &serde_json::Value) -> bool {
    let wanted = words(q);
    if wanted.is_empty() {
        return true;
    }
    let have: HashSet<String> = words(&event_text(content_type, payload, value))
        .into_iter()
        .collect();
    wanted.iter().all(|w| have.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn all_words_must_occur_in_values() {
        let v = json!({"type": "Account_Created", "user": {"name": "Ada Lovelace"}, "n": 42});
        let p = v.to_string();
        let m = |q| matches(q, "application/json", p.as_bytes(), &v);
        assert!(m("ada"));
        assert!(m("LOVELACE ada 42"));
        assert!(m("account_created"));
        assert!(!m("name"), "keys are not words");
        assert!(!m("ada babbage"));
        assert!(m("  !! "), "no words: everything");
        assert!(matches(
            "hello",
            "text/plain",
            b"oh, Hello there",
            &serde_json::Value::Null
        ));
    }
}
