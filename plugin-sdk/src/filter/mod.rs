//! The one `filter` language of search, export, replay and the `filter` plugin
//! (Meilisearch-style), shared by the gateway and plugins: its syntax
//! tree, its parser ([`parse`]) and its meaning over a JSON payload ([`Expr::matches`]).
//! Every backend compiles the same [`Expr`] (the archive scan evaluates it on the payload;
//! the search backends translate it), so they select the same events. `docs/query.md`
//! documents it for users.
//!
//! Semantics, chosen to match Meilisearch's so that both backends agree:
//! - a path is dotted (`account.plan`) and also matches keys that contain dots;
//! - a value literal is text; when it reads as a number it also compares numerically with
//!   numeric fields (`amount = 100` matches `100`, `100.0` and `"100"`), `true`/`false`
//!   also match booleans;
//! - `>`, `>=`, `<`, `<=` compare numbers numerically, and strings lexicographically when
//!   the literal is not a number (RFC 3339 times compare correctly that way);
//! - a field holding an array matches when any element does;
//! - `!=`, `NOT IN` and `NOT` also select events that do not have the field;
//! - `EXISTS` is true when the field is present, even when it is `null`.

pub mod parse;

pub use parse::{ParseError, parse};

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
        }
    }
}

/// A value in a filter: its text, and its number when the text reads as one.
#[derive(Debug, Clone, PartialEq)]
pub struct Literal {
    pub text: String,
    pub number: Option<f64>,
}

impl Literal {
    pub fn new(text: String) -> Self {
        let number = text.parse::<f64>().ok().filter(|n| n.is_finite());
        Self { text, number }
    }
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Cmp(String, CmpOp, Literal),
    In(String, Vec<Literal>),
    Exists(String),
}

/// The values at a dotted path: every way of splitting the path into keys is tried (so a key
/// may itself contain dots), and arrays on the way are looked through.
fn lookup<'a>(value: &'a Value, path: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            if let Some(v) = map.get(path) {
                out.push(v);
            }
            for (i, _) in path.match_indices('.') {
                if let Some(v) = map.get(&path[..i]) {
                    lookup(v, &path[i + 1..], out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                lookup(item, path, out);
            }
        }
        _ => {}
    }
}

/// Scalars of a field value, arrays flattened (one level of nesting per level of array).
fn scalars<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| scalars(i, out)),
        other => out.push(other),
    }
}

/// The number a value reads as: a JSON number, or a string holding a finite one.
pub fn number_of(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

fn text_of(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Bool(b) => Some(std::borrow::Cow::Owned(b.to_string())),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        _ => None,
    }
}

fn equals(v: &Value, lit: &Literal) -> bool {
    if let (Some(a), Some(b)) = (number_of(v), lit.number) {
        return a == b;
    }
    text_of(v).is_some_and(|t| t == lit.text)
}

fn compare(v: &Value, op: CmpOp, lit: &Literal) -> bool {
    let ord = match (number_of(v), lit.number) {
        (Some(a), Some(b)) => a.partial_cmp(&b),
        (_, Some(_)) => None,
        (_, None) => match v {
            Value::String(s) => Some(s.as_str().cmp(lit.text.as_str())),
            _ => None,
        },
    };
    let Some(ord) = ord else { return false };
    match op {
        CmpOp::Gt => ord.is_gt(),
        CmpOp::Ge => ord.is_ge(),
        CmpOp::Lt => ord.is_lt(),
        CmpOp::Le => ord.is_le(),
        CmpOp::Eq => ord.is_eq(),
        CmpOp::Ne => ord.is_ne(),
    }
}

impl Expr {
    /// Whether an event with this JSON payload is selected. Non-JSON payloads are passed as
    /// `Value::Null`: they have no fields.
    pub fn matches(&self, payload: &Value) -> bool {
        match self {
            Expr::And(parts) => parts.iter().all(|p| p.matches(payload)),
            Expr::Or(parts) => parts.iter().any(|p| p.matches(payload)),
            Expr::Not(inner) => !inner.matches(payload),
            Expr::Exists(path) => {
                let mut found = Vec::new();
                lookup(payload, path, &mut found);
                !found.is_empty()
            }
            Expr::Cmp(path, op, lit) => {
                let mut found = Vec::new();
                lookup(payload, path, &mut found);
                let mut values = Vec::new();
                found.iter().for_each(|v| scalars(v, &mut values));
                match op {
                    CmpOp::Eq => values.iter().any(|v| equals(v, lit)),
                    CmpOp::Ne => !values.iter().any(|v| equals(v, lit)),
                    _ => values.iter().any(|v| compare(v, *op, lit)),
                }
            }
            Expr::In(path, lits) => {
                let mut found = Vec::new();
                lookup(payload, path, &mut found);
                let mut values = Vec::new();
                found.iter().for_each(|v| scalars(v, &mut values));
                values.iter().any(|v| lits.iter().any(|l| equals(v, l)))
            }
        }
    }

    /// Every field path the filter mentions.
    pub fn paths(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_paths(&mut out);
        out
    }

    fn collect_paths<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::And(p) | Expr::Or(p) => p.iter().for_each(|e| e.collect_paths(out)),
            Expr::Not(e) => e.collect_paths(out),
            Expr::Cmp(path, _, _) | Expr::In(path, _) | Expr::Exists(path) => out.push(path),
        }
    }
}

/// A compiled filter for an event payload: `None` selects everything.
pub fn payload_matches(filter: Option<&Expr>, content_type: &str, payload: &[u8]) -> bool {
    let Some(filter) = filter else { return true };
    let value = if content_type == "application/json" {
        serde_json::from_slice(payload).unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    filter.matches(&value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(filter: &str, v: Value) -> bool {
        parse(filter).unwrap().unwrap().matches(&v)
    }

    #[test]
    fn comparisons_follow_the_documented_rules() {
        let e = json!({"type": "account_created", "amount": 150, "plan": "pro", "ok": true,
                        "account": {"region": "eu"}, "a.b": 1, "tags": ["x", "y"],
                        "at": "2026-11-25T10:00:00Z", "n": null, "s": "100"});
        assert!(sel(
            r#"type = "account_created" AND amount >= 100"#,
            e.clone()
        ));
        assert!(!sel("amount > 150", e.clone()));
        assert!(sel("amount = 150.0", e.clone()));
        assert!(sel("s = 100", e.clone()));
        assert!(sel("s > 99", e.clone()));
        assert!(sel("ok = true", e.clone()));
        assert!(sel("account.region = eu", e.clone()));
        assert!(sel("a.b = 1", e.clone()));
        assert!(sel("tags = y AND tags IN [z, x]", e.clone()));
        assert!(sel("at >= '2026-11-25' AND at < '2026-11-26'", e.clone()));
        assert!(sel("n EXISTS AND missing NOT EXISTS", e.clone()));
        assert!(sel("missing != 3 AND plan NOT IN [free, team]", e.clone()));
        assert!(!sel("missing = 3 OR plan IN [free]", e.clone()));
        assert!(!sel("type > 5", e.clone()));
        assert!(sel("NOT (plan = free OR amount < 10)", e));
    }

    #[test]
    fn non_json_payloads_have_no_fields() {
        let f = parse("a = 1").unwrap();
        assert!(!payload_matches(
            f.as_ref(),
            "application/octet-stream",
            b"a=1"
        ));
        let f = parse("a NOT EXISTS").unwrap();
        assert!(payload_matches(
            f.as_ref(),
            "application/octet-stream",
            b"a=1"
        ));
        assert!(payload_matches(None, "application/json", b"{}"));
    }
}
