//! `filter`: keeps the events that match a filter expression (the language of
//! `docs/query.md`, the same implementation the gateway uses) and drops the rest.
//!
//! Config: `{"filter": "type = \"account_created\" AND amount > 100"}`; `"invert": true`
//! keeps the events that do *not* match. The content type comes from the event's
//! `content-type` header (JSON when absent).

use rewind_plugin_sdk::filter::{Expr, parse, payload_matches};
use rewind_plugin_sdk::{Config, Emit, Event, Transform};

pub struct Filter {
    expr: Expr,
    invert: bool,
}

impl Transform for Filter {
    fn new(config: Config) -> Result<Self, String> {
        let text = config.str("filter")?;
        let expr = parse(text)
            .map_err(|e| format!("config `filter`: {e}"))?
            .ok_or("config `filter` is empty")?;
        Ok(Self {
            expr,
            invert: config.opt_bool("invert")?.unwrap_or(false),
        })
    }

    fn transform(&mut self, event: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String> {
        let ct = event.header("content-type").unwrap_or("application/json");
        if payload_matches(Some(&self.expr), ct, event.payload) != self.invert {
            out.keep();
        }
        Ok(())
    }
}

rewind_plugin_sdk::export_transform!(Filter);

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_plugin_sdk::testing::run_transform;

    #[test]
    fn keeps_matching_events() {
        let config = r#"{"filter":"amount > 100 AND type = paid"}"#;
        let out = run_transform::<Filter>(
            config,
            &[
                br#"{"amount":150,"type":"paid"}"#,
                br#"{"amount":50,"type":"paid"}"#,
            ],
        )
        .unwrap();
        assert_eq!(out[0].as_ref().unwrap().len(), 1);
        assert_eq!(out[1].as_ref().unwrap().len(), 0);
        let out = run_transform::<Filter>(
            r#"{"filter":"amount > 100","invert":true}"#,
            &[br#"{"amount":50}"#],
        )
        .unwrap();
        assert_eq!(out[0].as_ref().unwrap().len(), 1);
        assert!(
            run_transform::<Filter>(r#"{"filter":"amount >"}"#, &[])
                .unwrap_err()
                .contains("column")
        );
    }
}
