//! JSON payload helpers for plugins: parse a payload, and get, set or remove a value by
//! dotted path (`account.email`; a key that itself contains dots is found too, as in
//! filters).

use serde_json::{Map, Value};

/// Parses a payload as JSON; `None` when it is not JSON (raw events pass through plugins
/// untouched unless they say otherwise).
pub fn parse(payload: &[u8]) -> Option<Value> {
    serde_json::from_slice(payload).ok()
}

/// Serializes a value back to bytes.
pub fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a JSON value always serializes")
}

/// Splits `path` at each dot where the prefix is a key of `map`, longest key first.
fn step<'p>(map: &Map<String, Value>, path: &'p str) -> Option<(&'p str, Option<&'p str>)> {
    if map.contains_key(path) {
        return Some((path, None));
    }
    let mut idx: Vec<usize> = path.match_indices('.').map(|(i, _)| i).collect();
    idx.reverse();
    for i in idx {
        let (head, rest) = (&path[..i], &path[i + 1..]);
        if map.contains_key(head) {
            return Some((head, Some(rest)));
        }
    }
    None
}

/// The value at `path`.
pub fn get<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    let map = value.as_object()?;
    match step(map, path)? {
        (key, None) => map.get(key),
        (key, Some(rest)) => get(map.get(key)?, rest),
    }
}

/// Removes and returns the value at `path`.
pub fn remove(value: &mut Value, path: &str) -> Option<Value> {
    let map = value.as_object_mut()?;
    match step(map, path)? {
        (key, None) => map.remove(key),
        (key, Some(rest)) => remove(map.get_mut(key)?, rest),
    }
}

/// The value at `path`, mutable.
pub fn get_mut<'v>(value: &'v mut Value, path: &str) -> Option<&'v mut Value> {
    let map = value.as_object_mut()?;
    match step(map, path)? {
        (key, None) => map.get_mut(key),
        (key, Some(rest)) => get_mut(map.get_mut(key)?, rest),
    }
}

/// Sets the value at `path`, creating objects on the way (a non-object in the way is
/// replaced by an object). `value` must be an object.
pub fn set(value: &mut Value, path: &str, new: Value) -> bool {
    let Some(map) = value.as_object_mut() else {
        return false;
    };
    if let Some((key, rest)) = step(map, path) {
        match rest {
            None => {
                map.insert(key.to_string(), new);
                return true;
            }
            Some(rest) => {
                let child = map.get_mut(key).expect("step found it");
                if !child.is_object() {
                    *child = Value::Object(Map::new());
                }
                return set(child, rest, new);
            }
        }
    }
    match path.split_once('.') {
        None => {
            map.insert(path.to_string(), new);
            true
        }
        Some((head, rest)) => {
            let child = map
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                *child = Value::Object(Map::new());
            }
            set(child, rest, new)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_get_set_remove() {
        let mut v = json!({"a": {"b": 1, "c.d": 2}, "x.y": 3});
        assert_eq!(get(&v, "a.b"), Some(&json!(1)));
        assert_eq!(get(&v, "a.c.d"), Some(&json!(2)));
        assert_eq!(get(&v, "x.y"), Some(&json!(3)));
        assert_eq!(get(&v, "a.z"), None);
        assert_eq!(remove(&mut v, "a.c.d"), Some(json!(2)));
        assert!(set(&mut v, "n.m.o", json!("new")));
        assert_eq!(get(&v, "n.m.o"), Some(&json!("new")));
        assert!(set(&mut v, "a.b", json!(9)));
        assert_eq!(v["a"]["b"], json!(9));
        *get_mut(&mut v, "x.y").unwrap() = json!(4);
        assert_eq!(v["x.y"], json!(4));
        assert!(!set(&mut json!([1]), "a", json!(1)));
    }
}
