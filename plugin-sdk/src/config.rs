//! A plugin's JSON config, as given to the gateway when the plugin was attached (a pipeline
//! step, a destination, a hook), with typed getters whose errors name the key.

use serde_json::Value;

/// The plugin's config: a JSON object (`{}` when none was given).
#[derive(Debug, Clone, Default)]
pub struct Config(pub Value);

impl Config {
    /// Parses the config text the gateway passes to `init`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self(Value::Object(Default::default())));
        }
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("config is not valid JSON: {e}"))?;
        if !v.is_object() {
            return Err("config must be a JSON object".into());
        }
        Ok(Self(v))
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, String> {
        match self.0.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("config `{key}` must be a string, got {other}")),
            None => Err(format!("config `{key}` is required")),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, String> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.str(key).map(Some),
        }
    }

    /// A list of strings (missing = empty).
    pub fn str_list(&self, key: &str) -> Result<Vec<&str>, String> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| format!("config `{key}` must be a list of strings"))
                })
                .collect(),
            Some(_) => Err(format!("config `{key}` must be a list of strings")),
        }
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, String> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("config `{key}` must be a whole number ≥ 0, got {v}")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("config `{key}` must be true or false, got {v}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getters_name_the_key() {
        let c = Config::parse(r#"{"url":"http://x","n":3,"tags":["a","b"],"on":true}"#).unwrap();
        assert_eq!(c.str("url").unwrap(), "http://x");
        assert_eq!(c.opt_u64("n").unwrap(), Some(3));
        assert_eq!(c.str_list("tags").unwrap(), ["a", "b"]);
        assert_eq!(c.opt_bool("on").unwrap(), Some(true));
        assert!(
            c.str("missing")
                .unwrap_err()
                .contains("`missing` is required")
        );
        assert!(c.str("n").unwrap_err().contains("must be a string"));
        assert!(Config::parse("[1]").is_err());
        assert!(Config::parse("{").unwrap_err().contains("not valid JSON"));
        assert!(Config::parse("").unwrap().0.is_object());
    }
}
