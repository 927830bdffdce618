//! `redact`: masks or drops fields of JSON payloads by dotted path, before events are
//! archived, indexed or delivered.
//!
//! Config: `{"paths": ["user.email", "card.number"], "action": "mask" | "drop", "mask": "***"}`
//! (`action` defaults to `mask`, `mask` to `"[REDACTED]"`). Events that are not JSON objects,
//! or lack every path, pass unchanged (byte for byte); in a redacted event only the redacted
//! members change (see [`scan`] for how paths are matched: every duplicate key, every reading
//! of a dotted path and escaped keys are redacted).

mod blocks;
mod scan;

use rewind_plugin_sdk::{Config, Emit, Event, Transform, json};
pub use scan::Action;

pub struct Redact {
    scratch: scan::Scratch,
    paths: Vec<String>,
    action: Action,
    mask: serde_json::Value,
}

impl Transform for Redact {
    fn new(config: Config) -> Result<Self, String> {
        let paths: Vec<String> = config
            .str_list("paths")?
            .into_iter()
            .map(String::from)
            .collect();
        if paths.is_empty() {
            return Err("config `paths` must list at least one field to redact".into());
        }
        if let Some(p) = paths.iter().find(|p| p.is_empty()) {
            return Err(format!("config `paths` has an empty path ({p:?})"));
        }
        let mask = config
            .get("mask")
            .cloned()
            .unwrap_or_else(|| serde_json::Value::String("[REDACTED]".into()));
        let action = match config.opt_str("action")?.unwrap_or("mask") {
            "mask" => Action::Mask(json::to_bytes(&mask)),
            "drop" => Action::Drop,
            other => {
                return Err(format!(
                    "config `action` must be \"mask\" or \"drop\", got {other:?}"
                ));
            }
        };
        Ok(Self {
            scratch: scan::Scratch::default(),
            paths,
            action,
            mask,
        })
    }

    fn transform(&mut self, event: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String> {
        match scan::redact_with(&mut self.scratch, event.payload, &self.paths, &self.action) {
            Ok(Some(redacted)) => out.payload(redacted),
            Ok(None) => out.keep(),
            // Not JSON the scanner reads: if it is JSON after all, redact the parsed value
            // (never let a path through); raw events pass unchanged.
            Err(scan::Malformed) => match json::parse(event.payload) {
                Some(value) => self.redact_value(value, out),
                None => out.keep(),
            },
        }
        Ok(())
    }
}

impl Redact {
    fn redact_value(&self, mut value: serde_json::Value, out: &mut Emit<'_>) {
        let mut changed = false;
        for path in &self.paths {
            if self.action == Action::Drop {
                changed |= json::remove(&mut value, path).is_some();
            } else if let Some(v) = json::get_mut(&mut value, path) {
                *v = self.mask.clone();
                changed = true;
            }
        }
        if changed {
            out.payload(&json::to_bytes(&value));
        } else {
            out.keep();
        }
    }
}

rewind_plugin_sdk::export_transform!(Redact);

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_plugin_sdk::testing::run_transform;

    #[test]
    fn masks_and_drops() {
        let config = r#"{"paths":["user.email","card"]}"#;
        let out = run_transform::<Redact>(
            config,
            &[br#"{"user":{"email":"a@b.c","id":1},"card":"4242","n":2}"#],
        )
        .unwrap();
        assert_eq!(
            out[0].as_ref().unwrap()[0],
            br#"{"user":{"email":"[REDACTED]","id":1},"card":"[REDACTED]","n":2}"#,
            "only the values change; key order and the other bytes stay"
        );
        let config = r#"{"paths":["user.email"],"action":"drop"}"#;
        let out = run_transform::<Redact>(
            config,
            &[
                br#"{"user":{"email":"a@b.c","id":1}}"#,
                b"not json \"email",
                br#"{"other":1}"#,
            ],
        )
        .unwrap();
        assert_eq!(out[0].as_ref().unwrap()[0], br#"{"user":{"id":1}}"#);
        assert_eq!(
            out[1].as_ref().unwrap()[0],
            b"not json \"email",
            "raw events pass unchanged"
        );
        assert_eq!(
            out[2].as_ref().unwrap()[0],
            br#"{"other":1}"#,
            "untouched events keep their bytes"
        );
        assert!(
            run_transform::<Redact>(r#"{"paths":[]}"#, &[])
                .unwrap_err()
                .contains("at least one")
        );
        assert!(
            run_transform::<Redact>(r#"{"paths":["a"],"action":"zap"}"#, &[])
                .unwrap_err()
                .contains("action")
        );
    }
}
