//! `cloudevents`: receives CloudEvents 1.0 over HTTP on a hook URL, or from NATS through a
//! source (the NATS protocol binding: the same modes, attributes in `ce-` headers for binary
//! mode; a message without a content type is read as a structured event).
//!
//! - structured mode (`Content-Type: application/cloudevents+json`): one event;
//! - batched mode (`application/cloudevents-batch+json`): a JSON array, one event each;
//! - binary mode (`ce-specversion`, `ce-id`, `ce-source`, `ce-type` headers, the body is the
//!   data): one event.
//!
//! Each event is stored in structured form (`{"specversion","id","source","type",…,"data"}`)
//! so it can be searched by its attributes (`type = "com.example.order.created"`). An event
//! without `specversion` 1.0, `id`, `source` or `type` is rejected with 400 naming what is
//! missing; a batch is all or nothing. Config: `{}`.

use rewind_plugin_sdk::{Config, Ingress, Message, NewEvent, Rejection, Request};
use serde_json::{Map, Value};

pub struct CloudEvents;

fn check(v: &Value, at: &str) -> Result<(), Rejection> {
    let obj = v
        .as_object()
        .ok_or_else(|| Rejection::new(400, format!("{at}is not a JSON object")))?;
    if obj.get("specversion").and_then(Value::as_str) != Some("1.0") {
        return Err(Rejection::new(
            400,
            format!("{at}needs \"specversion\": \"1.0\""),
        ));
    }
    for attr in ["id", "source", "type"] {
        match obj.get(attr).and_then(Value::as_str) {
            Some(s) if !s.is_empty() => {}
            _ => {
                return Err(Rejection::new(
                    400,
                    format!("{at}has no `{attr}` (a non-empty string)"),
                ));
            }
        }
    }
    Ok(())
}

fn event(v: Value) -> NewEvent {
    let ty = v["type"].as_str().unwrap_or_default().to_string();
    NewEvent {
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("ce-type".into(), ty),
        ],
        payload: serde_json::to_vec(&v).expect("JSON serializes"),
    }
}

impl Ingress for CloudEvents {
    fn new(_config: Config) -> Result<Self, String> {
        Ok(CloudEvents)
    }

    fn handle(&mut self, request: &Request) -> Result<Vec<NewEvent>, Rejection> {
        decode(&request.headers, &request.body, "")
    }

    fn handle_message(&mut self, message: &Message) -> Result<Vec<NewEvent>, Rejection> {
        decode(
            &message.headers,
            &message.body,
            "application/cloudevents+json",
        )
    }
}

/// One request or message: `default_ct` stands in for a missing content type.
fn decode(
    headers: &[(String, String)],
    body: &[u8],
    default_ct: &str,
) -> Result<Vec<NewEvent>, Rejection> {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let binary = header("ce-specversion").is_some();
    {
        let ct = header("content-type")
            .unwrap_or(if binary { "" } else { default_ct })
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let parse = |body: &[u8]| {
            serde_json::from_slice::<Value>(body)
                .map_err(|e| Rejection::new(400, format!("the body is not valid JSON: {e}")))
        };
        match ct.as_str() {
            "application/cloudevents+json" => {
                let v = parse(body)?;
                check(&v, "the event ")?;
                Ok(vec![event(v)])
            }
            "application/cloudevents-batch+json" => {
                let Value::Array(items) = parse(body)? else {
                    return Err(Rejection::new(
                        400,
                        "a batch must be a JSON array of CloudEvents",
                    ));
                };
                for (i, v) in items.iter().enumerate() {
                    check(v, &format!("event {i} of the batch "))?;
                }
                Ok(items.into_iter().map(event).collect())
            }
            _ if binary => {
                let mut obj = Map::new();
                for (k, v) in headers {
                    if let Some(attr) = k.to_ascii_lowercase().strip_prefix("ce-") {
                        obj.insert(attr.to_string(), Value::String(v.clone()));
                    }
                }
                if !ct.is_empty() {
                    obj.insert("datacontenttype".into(), Value::String(ct.clone()));
                }
                let data = if ct.ends_with("json") {
                    parse(body)?
                } else {
                    Value::String(String::from_utf8_lossy(body).into_owned())
                };
                obj.insert("data".into(), data);
                let v = Value::Object(obj);
                check(&v, "the event ")?;
                Ok(vec![event(v)])
            }
            _ => Err(Rejection::new(
                415,
                "send CloudEvents as application/cloudevents+json, application/cloudevents-batch+json, or in binary mode with ce-* headers",
            )),
        }
    }
}

rewind_plugin_sdk::export_ingress!(CloudEvents);

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ct: &str, headers: &[(&str, &str)], body: &str) -> Request {
        let mut h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        h.push(("content-type".into(), ct.into()));
        Request {
            method: "POST".into(),
            path: String::new(),
            headers: h,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn modes() {
        let mut c = CloudEvents;
        let one =
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t.created","data":{"a":1}}"#;
        assert_eq!(
            c.handle(&req("application/cloudevents+json", &[], one))
                .unwrap()
                .len(),
            1
        );
        let batch = format!("[{one},{one}]");
        assert_eq!(
            c.handle(&req("application/cloudevents-batch+json", &[], &batch))
                .unwrap()
                .len(),
            2
        );
        let bin = c
            .handle(&req(
                "application/json",
                &[
                    ("ce-specversion", "1.0"),
                    ("ce-id", "9"),
                    ("ce-source", "/x"),
                    ("ce-type", "t"),
                ],
                r#"{"b":2}"#,
            ))
            .unwrap();
        let v: Value = serde_json::from_slice(&bin[0].payload).unwrap();
        assert_eq!(v["data"]["b"], 2);
        assert_eq!(v["id"], "9");
        let bad = c.handle(&req(
            "application/cloudevents+json",
            &[],
            r#"{"specversion":"1.0","id":"1","source":"/s"}"#,
        ));
        assert!(bad.unwrap_err().reason.contains("`type`"));
        assert_eq!(
            c.handle(&req("text/plain", &[], "x")).unwrap_err().status,
            415
        );
        // NATS: no content type means a structured event; binary mode by ce- headers.
        let msg = |headers: &[(&str, &str)], body: &str| Message {
            bus: "nats".into(),
            subject: "orders.created".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        };
        assert_eq!(c.handle_message(&msg(&[], one)).unwrap().len(), 1);
        let bin = c
            .handle_message(&msg(
                &[
                    ("ce-specversion", "1.0"),
                    ("ce-id", "7"),
                    ("ce-source", "/n"),
                    ("ce-type", "t"),
                ],
                "plain data",
            ))
            .unwrap();
        let v: Value = serde_json::from_slice(&bin[0].payload).unwrap();
        assert_eq!(v["data"], "plain data");
        assert_eq!(c.handle_message(&msg(&[], "{}")).unwrap_err().status, 400);
    }
}
