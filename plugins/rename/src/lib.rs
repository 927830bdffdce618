//! `rename`: moves or renames fields of JSON payloads by dotted path.
//!
//! Config: `{"fields": {"old.path": "new.path", "userId": "user.id"}}`. Moves happen in
//! the order given; a missing source is skipped; an existing target is overwritten.
//! Events that are not JSON objects pass unchanged.

use rewind_plugin_sdk::{Config, Emit, Event, Transform, json};

pub struct Rename {
    moves: Vec<(String, String)>,
}

impl Transform for Rename {
    fn new(config: Config) -> Result<Self, String> {
        let Some(serde_json::Value::Object(fields)) = config.get("fields") else {
            return Err(r#"config `fields` must be an object of {"from.path": "to.path"}"#.into());
        };
        let mut moves = Vec::new();
        for (from, to) in fields {
            let to = to
                .as_str()
                .ok_or_else(|| format!("config `fields.{from}` must be a string (the new path)"))?;
            if to.is_empty() || from.is_empty() {
                return Err("config `fields`: paths may not be empty".into());
            }
            moves.push((from.clone(), to.to_string()));
        }
        if moves.is_empty() {
            return Err("config `fields` is empty: nothing to rename".into());
        }
        Ok(Self { moves })
    }

    fn transform(&mut self, event: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String> {
        let Some(mut value) = json::parse(event.payload).filter(|v| v.is_object()) else {
            out.keep();
            return Ok(());
        };
        let mut changed = false;
        for (from, to) in &self.moves {
            if let Some(v) = json::remove(&mut value, from) {
                json::set(&mut value, to, v);
                changed = true;
            }
        }
        if changed {
            out.payload(&json::to_bytes(&value));
        } else {
            out.keep();
        }
        Ok(())
    }
}

rewind_plugin_sdk::export_transform!(Rename);

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_plugin_sdk::testing::run_transform;

    #[test]
    fn moves_fields() {
        let config = r#"{"fields":{"userId":"user.id","a.b":"c"}}"#;
        let out = run_transform::<Rename>(config, &[br#"{"userId":7,"a":{"b":1,"x":2}}"#, b"[1]"])
            .unwrap();
        assert_eq!(
            out[0].as_ref().unwrap()[0],
            br#"{"a":{"x":2},"c":1,"user":{"id":7}}"#
        );
        assert_eq!(out[1].as_ref().unwrap()[0], b"[1]");
        assert!(run_transform::<Rename>(r#"{"fields":{}}"#, &[]).is_err());
        assert!(
            run_transform::<Rename>(r#"{"fields":{"a":1}}"#, &[])
                .unwrap_err()
                .contains("fields.a")
        );
    }
}
