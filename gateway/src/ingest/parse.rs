//! Turning a request body into events: one JSON value, a JSON array of them, NDJSON, or raw
//! bytes. Every JSON event keeps the exact bytes it arrived as (the array element's text, the
//! NDJSON line), so a replay sends what was received. Errors name the line and column, or the
//! array index, of the first bad event.

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::archive::json_leaves;
use crate::config::Limits;

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Ndjson,
    Raw,
}

impl BodyFormat {
    /// `None` for content types we do not take; the message lists the ones we do.
    pub fn from_content_type(content_type: Option<&str>) -> Option<BodyFormat> {
        let essence = content_type?.split(';').next()?.trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(BodyFormat::Json),
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines" => Some(BodyFormat::Ndjson),
            "application/octet-stream" => Some(BodyFormat::Raw),
            _ => None,
        }
    }
}

pub const ACCEPTED_CONTENT_TYPES: &str = "application/json (an object or an array of events), application/x-ndjson (one event per line) or application/octet-stream (one raw event)";

/// One event as parsed from a request, before it gets an id.
#[derive(Debug, Clone)]
pub struct ParsedEvent {
    pub payload: Bytes,
    pub is_json: bool,
    /// Where it came from, for error messages.
    pub origin: Origin,
}

/// Where in a request an event came from; shown in error messages as "line 3", "element 7",
/// "the event" or "the body" (kept as numbers: only an error turns it into text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An NDJSON line (1-based).
    Line(usize),
    /// An element of a JSON array (0-based).
    Element(usize),
    /// The one JSON object of a body.
    Event,
    /// A raw body.
    Body,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Line(n) => write!(f, "line {n}"),
            Origin::Element(i) => write!(f, "element {i}"),
            Origin::Event => f.write_str("the event"),
            Origin::Body => f.write_str("the body"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("the request body is empty: send at least one event")]
    Empty,
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("the JSON body must be an object (one event) or an array of events, not {0}")]
    NotObjectOrArray(&'static str),
    #[error("{origin} is {size} bytes, over the {limit}-byte event limit")]
    EventTooLarge {
        origin: String,
        size: usize,
        limit: usize,
    },
    #[error("the request holds {count} events, over the {limit}-event batch limit: split it")]
    BatchTooLarge { count: usize, limit: usize },
}

fn kind_of(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Parses a body into events, checking the event and batch limits.
pub fn parse_body(
    body: &Bytes,
    format: BodyFormat,
    limits: &Limits,
) -> Result<Vec<ParsedEvent>, ParseError> {
    if body.iter().all(|b| b.is_ascii_whitespace())
        && (format != BodyFormat::Raw || body.is_empty())
    {
        return Err(ParseError::Empty);
    }
    let events = match format {
        BodyFormat::Raw => vec![ParsedEvent {
            payload: body.clone(),
            is_json: false,
            origin: Origin::Body,
        }],
        BodyFormat::Json => parse_json(body, limits)?,
        BodyFormat::Ndjson => parse_ndjson(body, limits)?,
    };
    if events.len() > limits.max_batch_events {
        return Err(ParseError::BatchTooLarge {
            count: events.len(),
            limit: limits.max_batch_events,
        });
    }
    for event in &events {
        if event.payload.len() > limits.max_event_bytes {
            return Err(ParseError::EventTooLarge {
                origin: event.origin.to_string(),
                size: event.payload.len(),
                limit: limits.max_event_bytes,
            });
        }
    }
    Ok(events)
}

fn json_error(e: serde_json::Error, line_offset: usize) -> ParseError {
    ParseError::Json {
        line: e.line() + line_offset,
        column: e.column(),
        message: strip_position(&e.to_string()),
    }
}

/// serde_json appends " at line L column C"; we report those as fields.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

fn parse_json(body: &Bytes, limits: &Limits) -> Result<Vec<ParsedEvent>, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let before = &body[..e.valid_up_to()];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        let column = before.len()
            - before
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        ParseError::Json {
            line,
            column,
            message: "invalid UTF-8".into(),
        }
    })?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        // The strict reader first, serde_json for what it refuses (see `parse_ndjson`).
        let elements: Vec<&str> = match json_leaves::array_element_spans(text) {
            Ok(spans) => spans.into_iter().map(|span| &text[span]).collect(),
            Err(_) => serde_json::from_str::<Vec<&RawValue>>(text)
                .map_err(|e| json_error(e, 0))?
                .into_iter()
                .map(RawValue::get)
                .collect(),
        };
        if elements.is_empty() {
            return Err(ParseError::Empty);
        }
        if elements.len() > limits.max_batch_events {
            return Err(ParseError::BatchTooLarge {
                count: elements.len(),
                limit: limits.max_batch_events,
            });
        }
        Ok(elements
            .into_iter()
            .enumerate()
            .map(|(i, raw)| ParsedEvent {
                payload: body.slice_ref(raw.as_bytes()),
                is_json: true,
                origin: Origin::Element(i),
            })
            .collect())
    } else {
        let raw: &RawValue = serde_json::from_str(text).map_err(|e| json_error(e, 0))?;
        if !raw.get().starts_with('{') {
            return Err(ParseError::NotObjectOrArray(kind_of(raw.get())));
        }
        Ok(vec![ParsedEvent {
            payload: body.slice_ref(raw.get().as_bytes()),
            is_json: true,
            origin: Origin::Event,
        }])
    }
}

fn parse_ndjson(body: &Bytes, limits: &Limits) -> Result<Vec<ParsedEvent>, ParseError> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut line_no = 0;
    while start < body.len() {
        line_no += 1;
        let end = memchr_newline(&body[start..]).map_or(body.len(), |i| start + i);
        let line = &body[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        start = end + 1;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if events.len() == limits.max_batch_events {
            // Count the rest only to report the size of the refused batch.
            let rest = body[start.min(body.len())..]
                .split(|b| *b == b'\n')
                .filter(|l| !l.iter().all(|b| b.is_ascii_whitespace()))
                .count();
            return Err(ParseError::BatchTooLarge {
                count: events.len() + 1 + rest,
                limit: limits.max_batch_events,
            });
        }
        // The fast check (the archive's strict reader, which accepts exactly what serde_json
        // accepts: see `json_leaves` tests); serde_json reads a line only to word the error.
        let payload = match json_leaves::value_span(line) {
            Ok(span) => &line[span],
            Err(_) => {
                let text = std::str::from_utf8(line).map_err(|_| ParseError::Json {
                    line: line_no,
                    column: 1,
                    message: "invalid UTF-8".into(),
                })?;
                let raw: &RawValue =
                    serde_json::from_str(text).map_err(|e| json_error(e, line_no - 1))?;
                raw.get().as_bytes()
            }
        };
        events.push(ParsedEvent {
            payload: body.slice_ref(payload),
            is_json: true,
            origin: Origin::Line(line_no),
        });
    }
    if events.is_empty() {
        return Err(ParseError::Empty);
    }
    Ok(events)
}

/// The first `\n` (SIMD: this scan over every byte of a batch was a fifth of the request
/// workers' CPU when it went byte by byte).
fn memchr_newline(haystack: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', haystack)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_event_bytes: 64,
            max_request_bytes: 1 << 20,
            max_batch_events: 3,
            max_inflight_bytes: 1 << 20,
        }
    }

    fn parse(body: &str, format: BodyFormat) -> Result<Vec<String>, ParseError> {
        parse_body(&Bytes::copy_from_slice(body.as_bytes()), format, &limits()).map(|evs| {
            evs.into_iter()
                .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
                .collect()
        })
    }

    #[test]
    fn objects_arrays_and_ndjson_keep_their_exact_bytes() {
        assert_eq!(
            parse(" {\"a\": 1} ", BodyFormat::Json).unwrap(),
            vec!["{\"a\": 1}"]
        );
        assert_eq!(
            parse("[{\"a\":1}, {\"b\" :2}]", BodyFormat::Json).unwrap(),
            vec!["{\"a\":1}", "{\"b\" :2}"]
        );
        assert_eq!(
            parse("{\"a\":1}\n\n{\"b\":2}\r\n", BodyFormat::Ndjson).unwrap(),
            vec!["{\"a\":1}", "{\"b\":2}"]
        );
        assert_eq!(
            parse("not json at all", BodyFormat::Raw).unwrap(),
            vec!["not json at all"]
        );
    }

    #[test]
    fn malformed_json_names_the_line() {
        let err = parse("{\"a\":1}\n{\"b\":2}\n{\"c\":", BodyFormat::Ndjson).unwrap_err();
        assert!(matches!(err, ParseError::Json { line: 3, .. }), "{err:?}");
        let err = parse("[\n{\"a\":1},\n{\"b\" 2}\n]", BodyFormat::Json).unwrap_err();
        assert!(matches!(err, ParseError::Json { line: 3, .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("malformed JSON at line 3, column"),
            "{err}"
        );
    }

    #[test]
    fn ndjson_lines_are_taken_and_refused_as_serde_json_takes_and_refuses_them() {
        // What the fast check refuses but serde_json's raw values take (a number past f64, a
        // lone surrogate escape) is still accepted, byte for byte, as before the fast check.
        let body = " {\"a\": 1} \n[1e999]\n\"\\ud800\"\r\n";
        assert_eq!(
            parse(body, BodyFormat::Ndjson).unwrap(),
            vec!["{\"a\": 1}", "[1e999]", "\"\\ud800\""]
        );
        // The same for the elements of a JSON array body.
        assert_eq!(
            parse(" [ {\"a\": 1} , [1e999],\"\\ud800\"]\n", BodyFormat::Json).unwrap(),
            vec!["{\"a\": 1}", "[1e999]", "\"\\ud800\""]
        );
        let err = parse("[{\"a\":1},\n{\"b\":[1,]}]", BodyFormat::Json).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed JSON at line 2, column 9: expected value"
        );
        // A line neither takes is worded by serde_json, with the line and the column.
        let err = parse("{\"a\":1}\n{\"b\":[1,]}", BodyFormat::Ndjson).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed JSON at line 2, column 9: expected value"
        );
        let err = parse("{\"a\":1}\n\"\u{1}\"", BodyFormat::Ndjson).unwrap_err();
        assert!(matches!(err, ParseError::Json { line: 2, .. }), "{err:?}");
        let err = parse_body(
            &Bytes::from_static(b"{}\n{\"a\":\"\xff\"}"),
            BodyFormat::Ndjson,
            &limits(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            ParseError::Json {
                line: 2,
                column: 1,
                message: "invalid UTF-8".into()
            }
        );
    }

    #[test]
    fn bad_shapes_and_limits() {
        assert_eq!(parse("", BodyFormat::Json), Err(ParseError::Empty));
        assert_eq!(parse("  \n", BodyFormat::Ndjson), Err(ParseError::Empty));
        assert_eq!(parse("[]", BodyFormat::Json), Err(ParseError::Empty));
        assert_eq!(parse("", BodyFormat::Raw), Err(ParseError::Empty));
        assert_eq!(
            parse("42", BodyFormat::Json),
            Err(ParseError::NotObjectOrArray("a number"))
        );
        assert!(matches!(
            parse("[1,2,3,4]", BodyFormat::Json),
            Err(ParseError::BatchTooLarge { count: 4, limit: 3 })
        ));
        assert!(matches!(
            parse("1\n2\n3\n4\n5", BodyFormat::Ndjson),
            Err(ParseError::BatchTooLarge { count: 5, limit: 3 })
        ));
        let big = format!("{{\"x\":\"{}\"}}", "y".repeat(80));
        let err = parse(&format!("[{{}}, {big}]"), BodyFormat::Json).unwrap_err();
        assert!(
            matches!(err, ParseError::EventTooLarge { ref origin, .. } if origin == "element 1"),
            "{err:?}"
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            BodyFormat::from_content_type(Some("application/json; charset=utf-8")),
            Some(BodyFormat::Json)
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("application/x-ndjson")),
            Some(BodyFormat::Ndjson)
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("application/octet-stream")),
            Some(BodyFormat::Raw)
        );
        assert_eq!(BodyFormat::from_content_type(Some("text/plain")), None);
        assert_eq!(BodyFormat::from_content_type(None), None);
    }
}
