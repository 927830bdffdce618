//! Identifiers: every object gets a prefixed, lowercase ULID (`tm_…`, `col_…`, `tok_…`), so an
//! id says what it names, sorts by creation time, and is safe in paths and NATS subjects.
//! Events get a plain ULID (26 characters, Crockford base32) as the contract says.

use ulid::Ulid;

/// A new id for an object of the given kind, e.g. `new_id("col")` → `col_01j…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", Ulid::new().to_string().to_ascii_lowercase())
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// RFC 3339 (UTC, microsecond precision) of a microsecond timestamp.
pub fn micros_to_rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A name for a team or collection: 1–64 characters of letters, digits, `_`, `-` and `.`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{what} name must be 1 to 64 characters long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "{what} name {name:?} contains {c:?}: use letters, digits, '_', '-' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_lowercase_and_unique() {
        let a = new_id("col");
        let b = new_id("col");
        assert!(a.starts_with("col_") && a.len() == 30, "{a}");
        assert_eq!(a, a.to_ascii_lowercase());
        assert_ne!(a, b);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("team", "acme-prod.eu_1").is_ok());
        assert!(validate_name("team", "").is_err());
        assert!(validate_name("team", &"x".repeat(65)).is_err());
        assert!(validate_name("team", "a b").unwrap_err().contains("' '"));
        assert!(validate_name("team", "a/b").is_err());
    }
}
