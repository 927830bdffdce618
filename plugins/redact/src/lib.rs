//! `redact`: masks or drops fields of JSON payloads by dotted path, before events are
//! archived, indexed or delivered.
//!
//! Config: `{"paths": ["user.email", "card.number"], "action": "mask" | "drop", "mask": "***"}`
//! (`action` defaults to `mask`, `mask` to `"[REDACTED]"`). Events that are not JSON objects,
//! or lack every path, pass unchanged (byte for byte); a redacted event is re-serialized.

use rewind_plugin_sdk::{Config, Emit, Event, Transform, json};

pub struct Redact {
    paths: Vec<String>,
    /// The last segment of each path, quoted, to skip events that cannot contain it.
    needles: Vec<Vec<u8>>,
    drop: bool,
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
        let drop = match config.opt_str("action")?.unwrap_or("mask") {
            "mask" => false,
            "drop" => true,
            other => {
                return Err(format!(
                    "config `action` must be \"mask\" or \"drop\", got {other:?}"
                ));
            }
        };
        let mask = config
            .get("mask")
            .cloned()
            .unwrap_or_else(|| serde_json::Value::String("[REDACTED]".into()));
        let needles = paths
            .iter()
            .map(|p| format!("\"{}", p.rsplit('.').next().unwrap_or(p)).into_bytes())
            .collect();
        Ok(Self {
            paths,
            needles,
            drop,
            mask,
        })
    }

    fn transform(&mut self, event: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String> {
        let payload = event.payload;
        let may_contain = self
            .needles
            .iter()
            .any(|n| payload.windows(n.len()).any(|w| w == n.as_slice()));
        if !may_contain {
            out.keep();
            return Ok(());
        }
        let Some(mut value) = json::parse(payload) else {
            out.keep();
            return Ok(());
        };
        let mut changed = false;
        for path in &self.paths {
            if self.drop {
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
        Ok(())
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
            br#"{"card":"[REDACTED]","n":2,"user":{"email":"[REDACTED]","id":1}}"#
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
