//! Schema inference for a collection: typed columns from JSON payloads.
//!
//! * Nested objects are **flattened** to dotted column names (`user.address.city`), up to
//!   [`MAX_DEPTH`] levels; deeper objects, and arrays at any level, are kept as their JSON text
//!   as sent (see [`super::json_leaves`]) in a string column. Flat columns are what DuckDB,
//!   Athena and Spark users filter on without struct syntax, and a new nested field only adds
//!   a column instead of changing a struct type.
//! * Types: `bool`, `int64`, `float64`, `string`. A conflict **widens** and never fails a write:
//!   int64 + float64 → float64; anything else mixed → string (numbers and booleans as their JSON
//!   text, objects as JSON). Widening is recorded with its time and the type it replaced.
//! * `null` adds nothing. Names that clash with the archive's own columns get a leading `_`.
//! * At most [`MAX_COLUMNS`] inferred columns per collection: fields first seen after that have
//!   no column (they are still in `payload`, the original bytes).
//! * Non-JSON payloads add no columns.

use std::borrow::Cow;
use std::collections::HashMap;

#[cfg(test)]
use serde_json::Value;

use super::json_leaves::{JsonError, LeafSink, for_each_leaf_hinted, same_bytes};

pub const MAX_COLUMNS: usize = 512;
pub const MAX_DEPTH: usize = 8;
/// Columns every archive file has.
pub const RESERVED: [&str; 6] = [
    "id",
    "received_at",
    "content_type",
    "client_id",
    "headers",
    "payload",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Bool,
    Int64,
    Float64,
    Utf8,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Bool => "bool",
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::Utf8 => "string",
        }
    }

    pub fn parse(s: &str) -> Option<ColumnType> {
        [
            ColumnType::Bool,
            ColumnType::Int64,
            ColumnType::Float64,
            ColumnType::Utf8,
        ]
        .into_iter()
        .find(|t| t.name() == s)
    }

    /// The narrowest type holding both.
    pub fn widen(self, other: ColumnType) -> ColumnType {
        use ColumnType::*;
        match (self, other) {
            (a, b) if a == b => a,
            (Int64, Float64) | (Float64, Int64) => Float64,
            _ => Utf8,
        }
    }
}

/// One scalar of a flattened event; strings borrow from the payload when they can.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
}

impl Scalar<'_> {
    pub fn column_type(&self) -> ColumnType {
        match self {
            Scalar::Bool(_) => ColumnType::Bool,
            Scalar::Int(_) => ColumnType::Int64,
            Scalar::Float(_) => ColumnType::Float64,
            Scalar::Str(_) => ColumnType::Utf8,
        }
    }

    pub fn as_text(&self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Str(s) => s.to_string(),
        }
    }
}

/// The reference reader over a `Value` tree (tests check the streaming reader against it).
/// Walks a JSON object's leaves by value (strings are moved, not copied), calling `emit`
/// with each dotted path and scalar. `path` is a reusable buffer.
#[cfg(test)]
fn walk(
    value: Value,
    path: &mut String,
    depth: usize,
    emit: &mut impl FnMut(&str, Scalar<'static>),
) {
    match value {
        Value::Null => {}
        Value::Bool(b) => emit(path, Scalar::Bool(b)),
        Value::Number(n) => emit(
            path,
            match n.as_i64() {
                Some(i) => Scalar::Int(i),
                None => Scalar::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
        ),
        Value::String(s) => emit(path, Scalar::Str(Cow::Owned(s))),
        Value::Array(_) => emit(path, Scalar::Str(Cow::Owned(value.to_string()))),
        Value::Object(map) if depth < MAX_DEPTH || path.is_empty() => {
            for (k, v) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&k);
                walk(v, path, depth + 1, emit);
                path.truncate(len);
            }
        }
        Value::Object(_) => emit(path, Scalar::Str(Cow::Owned(value.to_string()))),
    }
}

/// The column name of a path: names of the archive's own columns get a leading `_`.
fn column_name(path: &str) -> std::borrow::Cow<'_, str> {
    if RESERVED.contains(&path) {
        std::borrow::Cow::Owned(format!("_{path}"))
    } else {
        std::borrow::Cow::Borrowed(path)
    }
}

/// Flattens a JSON object into `(column name, scalar)` pairs (the reference, for tests).
#[cfg(test)]
pub fn flatten(value: &Value) -> Vec<(String, Scalar<'static>)> {
    let mut out = Vec::new();
    if value.is_object() {
        walk(value.clone(), &mut String::new(), 0, &mut |path, scalar| {
            out.push((column_name(path).into_owned(), scalar))
        });
    }
    out
}

/// A column of a collection's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    pub first_seen: i64,
    pub widened_at: Option<i64>,
    pub widened_from: Option<ColumnType>,
}

/// The evolving schema of one collection.
#[derive(Debug, Clone, Default)]
pub struct CollectionSchema {
    pub columns: Vec<Column>,
    index: HashMap<String, usize>,
    /// Fields seen that got no column because of [`MAX_COLUMNS`].
    pub overflowed: bool,
    /// Per column, the column of the field that followed it in the last event read (slot 0:
    /// the first field; `u32::MAX`: none yet). Events of a stream mostly have the same
    /// fields in the same order, so a field is first checked against the column that came
    /// after its predecessor last time (a string compare) before its name is hashed. Unlike a
    /// prediction by position, this gets back in step right after a part of varying length
    /// (a map with a different number of keys from one event to the next).
    next_after: Vec<u32>,
    /// Per column: (the event stamp that last gave it a value, its slot in that event's
    /// fields), for [`Self::observe_json`].
    slots: Vec<(u32, u32)>,
    event_stamp: u32,
}

impl CollectionSchema {
    pub fn from_columns(columns: Vec<Column>) -> Self {
        let index = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        Self {
            columns,
            index,
            overflowed: false,
            next_after: Vec::new(),
            slots: Vec::new(),
            event_stamp: 0,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Column> {
        self.index.get(name).map(|i| &self.columns[*i])
    }

    /// Like [`Self::observe_value`], straight from JSON text without a `Value` tree (see
    /// [`super::json_leaves`]); string values borrow from `payload` where they have no
    /// escapes, and arrays and objects past [`MAX_DEPTH`] are their JSON text as sent. A field
    /// given twice keeps its last value. An error leaves the schema possibly extended by the
    /// fields read before it.
    pub fn observe_json<'a>(
        &mut self,
        payload: &'a [u8],
        now: i64,
        changed: &mut Vec<String>,
    ) -> Result<Vec<(u32, Scalar<'a>)>, JsonError> {
        let mut out = Vec::new();
        self.observe_json_into(payload, now, changed, &mut out)
            .map(|_| out)
    }

    /// [`Self::observe_json`] appending the event's fields to `out`, which may hold other
    /// events' fields before them (the archiver reads a whole flush into one buffer, see
    /// [`FieldBuffer`]). On an error `out` is left as it was. Returns how many of the values
    /// it added own their text (strings with escapes; an upper bound when a field repeats),
    /// which [`FieldBuffer::keep`] uses to skip dropping values that own nothing.
    pub fn observe_json_into<'a>(
        &mut self,
        payload: &'a [u8],
        now: i64,
        changed: &mut Vec<String>,
        out: &mut Vec<(u32, Scalar<'a>)>,
    ) -> Result<usize, JsonError> {
        // Which slot of `out` each column got in this event: `stamp` tells this event's
        // entries from stale ones, so a repeated field is found without a search.
        self.event_stamp = self.event_stamp.wrapping_add(1);
        if self.event_stamp == 0 {
            self.slots.clear();
            self.event_stamp = 1;
        }
        self.size_lookups();
        let start = out.len();
        let mut sink = Observer {
            out,
            owned: 0,
            stamp: self.event_stamp,
            prev: 0,
            now,
            changed,
            schema: self,
        };
        let result = for_each_leaf_hinted(payload, MAX_DEPTH, &mut sink);
        let owned = sink.owned;
        if result.is_err() {
            out.truncate(start);
        }
        result.map(|()| owned)
    }

    /// The reference for [`Self::observe_json`], over a `Value` tree (tests only).
    /// Takes one JSON payload into account (adding and widening columns, recording their
    /// names in `changed`) and returns its fields as (column index, value); fields without a
    /// column (past [`MAX_COLUMNS`]) are left out.
    #[cfg(test)]
    pub fn observe_value(
        &mut self,
        value: Value,
        now: i64,
        changed: &mut Vec<String>,
    ) -> Vec<(u32, Scalar<'static>)> {
        let mut out = Vec::new();
        if !value.is_object() {
            return out;
        }
        let mut path = String::with_capacity(64);
        walk(value, &mut path, 0, &mut |path, scalar| {
            let name = column_name(path);
            if let Some(i) = self.observe_one(&name, scalar.column_type(), now, changed) {
                out.push((i as u32, scalar));
            }
        });
        out
    }

    /// Sizes the per-column lookups of [`Self::observe_json`] to the columns (done when a
    /// column is added, so that the per-field path does no resizing).
    fn size_lookups(&mut self) {
        let n = self.columns.len();
        if self.next_after.len() <= n {
            self.next_after.resize(n + 1, u32::MAX);
        }
        if self.slots.len() < n {
            self.slots.resize(n, (0, 0));
        }
    }

    /// Widens column `i` to hold a value of type `ty` (recording the change).
    fn widen(&mut self, i: usize, ty: ColumnType, now: i64, changed: &mut Vec<String>) {
        let col = &mut self.columns[i];
        let wide = col.ty.widen(ty);
        if wide != col.ty {
            col.widened_from = Some(col.ty);
            col.widened_at = Some(now);
            col.ty = wide;
            changed.push(col.name.clone());
        }
    }

    /// Adds or widens the column `name` for a value of type `ty`; its index, if it has one.
    fn observe_one(
        &mut self,
        name: &str,
        ty: ColumnType,
        now: i64,
        changed: &mut Vec<String>,
    ) -> Option<usize> {
        match self.index.get(name) {
            Some(&i) => {
                self.widen(i, ty, now, changed);
                Some(i)
            }
            None if self.columns.len() < MAX_COLUMNS => {
                let i = self.columns.len();
                self.index.insert(name.to_string(), i);
                self.columns.push(Column {
                    name: name.to_string(),
                    ty,
                    first_seen: now,
                    widened_at: None,
                    widened_from: None,
                });
                changed.push(name.to_string());
                Some(i)
            }
            None => {
                self.overflowed = true;
                None
            }
        }
    }

    /// Takes one flattened event into account; returns the names of columns added or widened.
    #[cfg(test)]
    pub fn observe(
        &mut self,
        fields: &[(String, Scalar<'_>)],
        now: i64,
        changed: &mut Vec<String>,
    ) {
        for (name, value) in fields {
            self.observe_one(name, value.column_type(), now, changed);
        }
    }
}

/// The allocation of a vector of fields kept from one use to the next, for
/// [`CollectionSchema::observe_json_into`]. The archiver reads each flush into one such
/// buffer: one allocation for all of a flush's fields instead of one per event, whose pages
/// stay with the process (the per-event vectors were freed and faulted in again flush after
/// flush: about half of the archiver's page faults). What is kept is capped at
/// [`FieldBuffer::MAX_KEPT_BYTES`].
#[derive(Default)]
pub struct FieldBuffer(Vec<(u32, Scalar<'static>)>);

impl FieldBuffer {
    /// The most a kept buffer holds on to between uses (about 800,000 fields).
    pub const MAX_KEPT_BYTES: usize = 32 << 20;

    /// An empty vector on the kept allocation (a new one when none is kept).
    pub fn take<'a>(&mut self) -> Vec<(u32, Scalar<'a>)> {
        relabel(std::mem::take(&mut self.0))
    }

    /// Keeps `fields`' allocation (emptied, and shrunk to [`Self::MAX_KEPT_BYTES`]).
    /// `owned` is how many of its values may own their text (the sum of what
    /// [`CollectionSchema::observe_json_into`] returned): with none, the values are let go
    /// without visiting them (a flush's buffer is ~16 MiB out of cache by now, and dropping
    /// it value by value was 1.4 % of the archiver's time); otherwise each one is dropped.
    pub fn keep(&mut self, mut fields: Vec<(u32, Scalar<'_>)>, owned: usize) {
        debug_assert!(
            owned > 0
                || !fields
                    .iter()
                    .any(|(_, v)| matches!(v, Scalar::Str(Cow::Owned(_)))),
            "a value owns its text but `owned` says none does"
        );
        if owned == 0 {
            // SAFETY: a length of 0 is within the capacity, and the values no longer
            // reachable need no drop: without an owned string (Bool, Int, Float and
            // borrowed Str) dropping one does nothing. Were `owned` wrong, the owned
            // strings would leak, which is not unsound.
            #[allow(unsafe_code)]
            unsafe {
                fields.set_len(0)
            };
        }
        let mut kept = relabel(fields);
        kept.shrink_to(Self::MAX_KEPT_BYTES / std::mem::size_of::<(u32, Scalar<'_>)>());
        self.0 = kept;
    }
}

/// `v` emptied, as a vector of fields borrowing for another lifetime, on the same
/// allocation (the standard library collects a mapped `IntoIter` in place when the element
/// layouts agree, as they do here; checked by a test).
fn relabel<'b>(mut v: Vec<(u32, Scalar<'_>)>) -> Vec<(u32, Scalar<'b>)> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

/// One event's reading by [`CollectionSchema::observe_json`]: the leaves go to their
/// columns (added or widened as needed) and into `out`; the column that followed the
/// previous leaf's column last time is the guess for the next leaf (see [`LeafSink`]).
struct Observer<'s, 'c, 'o, 'a> {
    schema: &'s mut CollectionSchema,
    out: &'o mut Vec<(u32, Scalar<'a>)>,
    /// How many values given to `out` own their text.
    owned: usize,
    stamp: u32,
    /// Slot of `next_after` for the previous leaf's column (0: none yet).
    prev: usize,
    now: i64,
    changed: &'c mut Vec<String>,
}

impl<'a> Observer<'_, '_, '_, 'a> {
    /// Records that column `i` holds `value` in this event (a field given twice keeps its
    /// last value; `slots` finds the earlier one without a search).
    #[inline(always)]
    fn record(&mut self, i: usize, value: Scalar<'a>) {
        if let Scalar::Str(Cow::Owned(_)) = value {
            self.owned += 1;
        }
        self.schema.next_after[self.prev] = i as u32;
        self.prev = i + 1;
        let slot = &mut self.schema.slots[i];
        if slot.0 == self.stamp {
            self.out[slot.1 as usize].1 = value;
        } else {
            *slot = (self.stamp, self.out.len() as u32);
            self.out.push((i as u32, value));
        }
    }
}

impl<'a> LeafSink<'a> for Observer<'_, '_, '_, 'a> {
    #[inline]
    fn expected(&self) -> Option<&str> {
        let hinted = self.schema.next_after[self.prev] as usize;
        self.schema.columns.get(hinted).map(|c| c.name.as_str())
    }

    #[inline(always)]
    fn expected_leaf(&mut self, value: Scalar<'a>) {
        // The path is the hinted column's name, so the column is that one: no column has a
        // reserved name (those get a `_`), so `column_name` is not needed.
        let i = self.schema.next_after[self.prev] as usize;
        let ty = value.column_type();
        if self.schema.columns[i].ty != ty {
            self.schema.widen(i, ty, self.now, self.changed);
        }
        self.record(i, value);
    }

    fn leaf(&mut self, path: &str, value: Scalar<'a>) {
        // The reader may not have matched a guess that is still right (a key with an escape).
        if self
            .expected()
            .is_some_and(|name| same_bytes(name.as_bytes(), path.as_bytes()))
        {
            return self.expected_leaf(value);
        }
        let ty = value.column_type();
        if let Some(i) = self
            .schema
            .observe_one(&column_name(path), ty, self.now, self.changed)
        {
            self.schema.size_lookups();
            self.record(i, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flattens_nested_objects_and_keeps_arrays_and_deep_objects_as_json() {
        let v = json!({"a": 1, "b": {"c": "x", "d": {"e": true}}, "arr": [1, 2], "n": null, "id": "clash"});
        let f: HashMap<String, Scalar> = flatten(&v).into_iter().collect();
        assert_eq!(f["a"], Scalar::Int(1));
        assert_eq!(f["b.c"], Scalar::Str("x".into()));
        assert_eq!(f["b.d.e"], Scalar::Bool(true));
        assert_eq!(f["arr"], Scalar::Str("[1,2]".into()));
        assert_eq!(f["_id"], Scalar::Str("clash".into()));
        assert!(!f.contains_key("n"));
        let mut deep = json!("leaf");
        for _ in 0..20 {
            deep = json!({ "k": deep });
        }
        let f = flatten(&deep);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0.matches('.').count(), MAX_DEPTH - 1);
        assert!(matches!(&f[0].1, Scalar::Str(s) if s.starts_with('{')));
    }

    #[test]
    fn same_bytes_agrees_with_eq() {
        let words: Vec<String> = (0..40)
            .flat_map(|n| {
                let base: String = (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect();
                let mut variants = vec![base.clone()];
                for at in 0..n {
                    let mut b = base.clone().into_bytes();
                    b[at] = b'Z';
                    variants.push(String::from_utf8(b).unwrap());
                }
                variants
            })
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(
                    same_bytes(a.as_bytes(), b.as_bytes()),
                    a == b,
                    "{a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn reserved_names_take_the_slow_path_to_their_prefixed_column() {
        let mut schema = CollectionSchema::default();
        let mut changed = Vec::new();
        for _ in 0..3 {
            let fields = schema
                .observe_json(br#"{"_id":1,"id":"a","payload":2,"x":3}"#, 0, &mut changed)
                .unwrap();
            let names: Vec<&str> = fields
                .iter()
                .map(|(c, _)| schema.columns[*c as usize].name.as_str())
                .collect();
            // "id" and "_id" are the same column ("id" is reserved); its last value wins.
            assert_eq!(names, ["_id", "_payload", "x"]);
            assert_eq!(fields[0].1, Scalar::Str("a".into()));
        }
    }

    #[test]
    fn conflicts_widen_and_are_recorded() {
        let mut s = CollectionSchema::default();
        let mut changed = Vec::new();
        s.observe(&flatten(&json!({"amount": 1})), 1, &mut changed);
        s.observe(&flatten(&json!({"amount": 1.5})), 2, &mut changed);
        assert_eq!(s.get("amount").unwrap().ty, ColumnType::Float64);
        s.observe(&flatten(&json!({"amount": "lots"})), 3, &mut changed);
        let c = s.get("amount").unwrap();
        assert_eq!(
            (c.ty, c.widened_from, c.widened_at, c.first_seen),
            (ColumnType::Utf8, Some(ColumnType::Float64), Some(3), 1)
        );
        assert_eq!(changed, vec!["amount", "amount", "amount"]);
    }

    #[test]
    fn the_column_count_is_bounded() {
        let mut s = CollectionSchema::default();
        let mut changed = Vec::new();
        let mut obj = serde_json::Map::new();
        for i in 0..10_000 {
            obj.insert(format!("f{i}"), json!(i));
        }
        s.observe(&flatten(&Value::Object(obj)), 1, &mut changed);
        assert_eq!(s.columns.len(), MAX_COLUMNS);
        assert!(s.overflowed);
    }

    #[test]
    fn the_streaming_reader_agrees_with_the_value_tree() {
        let docs = [
            r#"{"a": 1, "b": {"c": "x", "d": [1, {"e": 2}]}, "id": 3, "n": null}"#,
            r#"{"esc": "line\nbreak \"q\" \u00e9", "big": 18446744073709551615, "neg": -5, "f": 1.5e3}"#,
            r#"{"l1": {"l2": {"l3": {"l4": {"l5": {"l6": {"l7": {"l8": {"l9": 1}}}}}}}}}"#,
            r#"{"名前": "テスト", "emoji 🎉": true, "": "empty key", "dup": 1, "dup": "two"}"#,
            r#"[1, 2, 3]"#,
            r#""just a string""#,
            r#"{"o": {}, "arr": [], "t": true}"#,
            r#"{"items": [ {"sku": "A-1", "qty": 2, "z": 1, "a": [true, null]} ], "deep": {"x": 1.25}}"#,
        ];
        for doc in docs {
            let mut a = CollectionSchema::default();
            let mut b = CollectionSchema::default();
            let mut changed = Vec::new();
            let streamed = a.observe_json(doc.as_bytes(), 1, &mut changed).unwrap();
            let v: Value = serde_json::from_str(doc).unwrap();
            let tree = b.observe_value(v, 1, &mut changed);
            let named =
                |s: &CollectionSchema, f: Vec<(u32, Scalar<'_>)>| -> HashMap<String, String> {
                    f.into_iter()
                        .map(|(i, v)| {
                            // Arrays and deep objects are JSON text: as sent (streamed) or
                            // re-serialised (tree); compare them as JSON.
                            let v = match v {
                                Scalar::Str(t) if t.starts_with('[') || t.starts_with('{') => {
                                    let parsed: Value = serde_json::from_str(&t).unwrap();
                                    Scalar::Str(Cow::Owned(parsed.to_string()))
                                }
                                v => v,
                            };
                            (
                                s.columns[i as usize].name.clone(),
                                format!("{v:?}").replace("Borrowed", "Owned"),
                            )
                        })
                        .collect()
                };
            assert_eq!(named(&a, streamed), named(&b, tree), "{doc}");
            let types = |s: &CollectionSchema| -> HashMap<String, ColumnType> {
                s.columns.iter().map(|c| (c.name.clone(), c.ty)).collect()
            };
            assert_eq!(types(&a), types(&b), "{doc}");
        }
        let mut s = CollectionSchema::default();
        assert!(s.observe_json(b"{\"a\": ", 1, &mut Vec::new()).is_err());
        assert!(s.observe_json(b"{} trailing", 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_flush_reads_into_one_buffer_that_outlives_its_payloads() {
        let mut s = CollectionSchema::default();
        let mut changed = Vec::new();
        let docs = [
            r#"{"a":1,"b":"x","a":2}"#.to_string(),
            r#"{"b":"y", "c": [1]}"#.to_string(),
            r#"{"a": 3, "b": "#.to_string(),
            r#"{"a":4}"#.to_string(),
        ];
        let mut kept = FieldBuffer::default();
        let mut fields = kept.take();
        let mut ends = Vec::new();
        for doc in &docs {
            let before = fields.len();
            let result = s.observe_json_into(doc.as_bytes(), 1, &mut changed, &mut fields);
            // None of these values owns its text.
            assert!(result.as_ref().map_or(true, |owned| *owned == 0), "{doc}");
            // Each event's fields are what it read alone; a refused one adds none.
            match s.clone().observe_json(doc.as_bytes(), 1, &mut Vec::new()) {
                Ok(alone) => {
                    assert!(result.is_ok());
                    assert_eq!(fields[before..], alone[..], "{doc}");
                }
                Err(_) => {
                    assert!(result.is_err());
                    assert_eq!(fields.len(), before, "{doc}");
                }
            }
            ends.push(fields.len());
        }
        let a = s.get("a").map(|_| s.index["a"] as u32).unwrap();
        // The repeated `a` of the first event kept its last value in place.
        assert_eq!(fields[..ends[0]].len(), 2);
        assert!(fields[..ends[0]].contains(&(a, Scalar::Int(2))));
        assert_eq!(ends, [2, 4, 4, 5]);
        // The buffer's allocation survives the payloads it borrowed from.
        let (ptr, capacity) = (fields.as_ptr() as usize, fields.capacity());
        kept.keep(fields, 0);
        drop(docs);
        let again = kept.take();
        assert!(again.is_empty());
        assert_eq!((again.as_ptr() as usize, again.capacity()), (ptr, capacity));
        // Strings with escapes own their text and are counted (a repeated one each time),
        // so that keeping the buffer drops them; a refused event's are dropped with it.
        let mut fields = again;
        let escaped = [
            (r#"{"b":"x\"y","d":"\u00e9t\u00e9","a":5}"#, Ok(2)),
            (r#"{"b":"1\n","b":"2\n"}"#, Ok(2)),
            (r#"{"b":"\t", "a": }"#, Err(())),
        ];
        for (doc, owned) in escaped {
            let result = s.observe_json_into(doc.as_bytes(), 1, &mut changed, &mut fields);
            assert_eq!(result.map_err(|_| ()), owned, "{doc}");
        }
        assert_eq!(fields.len(), 3 + 1);
        assert_eq!(
            fields
                .iter()
                .filter(|(_, v)| matches!(v, Scalar::Str(Cow::Owned(_))))
                .count(),
            3
        );
        kept.keep(fields, 4);
        assert!(kept.take().is_empty());
        // What is kept is capped.
        let field = std::mem::size_of::<(u32, Scalar<'_>)>();
        kept.keep(
            Vec::with_capacity(2 * FieldBuffer::MAX_KEPT_BYTES / field),
            0,
        );
        assert!(kept.take().capacity() * field <= FieldBuffer::MAX_KEPT_BYTES);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "owns its text")]
    fn keeping_owned_values_as_if_borrowed_is_caught_in_debug_builds() {
        let mut s = CollectionSchema::default();
        let mut kept = FieldBuffer::default();
        let mut fields = kept.take();
        let owned = s
            .observe_json_into(br#"{"b":"x\ny"}"#, 1, &mut Vec::new(), &mut fields)
            .unwrap();
        assert_eq!(owned, 1);
        kept.keep(fields, 0);
    }

    #[test]
    fn one_schema_reads_a_stream_of_changing_shapes_as_each_event_alone() {
        // The field-order prediction must only save lookups, never change a result: a stream
        // whose events differ in how many keys a map has, in key order, in repeated keys and
        // in new fields, read by one schema, gives each event the fields it gives alone.
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut shared = CollectionSchema::default();
        for e in 0..400 {
            let mut fields: Vec<String> = vec![
                format!(r#""type": "t{}""#, next(3)),
                format!(r#""amount": {}"#, next(1000)),
            ];
            let attrs: Vec<String> = (0..next(6))
                .map(|k| format!(r#""attr_{k}": "v{}""#, next(9)))
                .collect();
            fields.push(format!(r#""attributes": {{{}}}"#, attrs.join(", ")));
            fields.push(format!(
                r#""session": {{"id": "s{e}", "page": "/p{}"}}"#,
                next(4)
            ));
            if next(5) == 0 {
                fields.push(format!(r#""amount": "{}""#, next(10)));
            }
            if next(7) == 0 {
                fields.push(format!(r#""new_{}": true"#, next(50)));
            }
            if next(4) == 0 {
                let i = next(fields.len() as u64) as usize;
                let j = next(fields.len() as u64) as usize;
                fields.swap(i, j);
            }
            let doc = format!("{{{}}}", fields.join(", "));
            let mut alone = CollectionSchema::default();
            let by_name = |s: &CollectionSchema, f: Vec<(u32, Scalar<'_>)>| {
                let mut v: Vec<(String, String)> = f
                    .into_iter()
                    .map(|(i, v)| (s.columns[i as usize].name.clone(), format!("{v:?}")))
                    .collect();
                v.sort();
                v
            };
            let got = shared
                .observe_json(doc.as_bytes(), 1, &mut Vec::new())
                .unwrap();
            let got = by_name(&shared, got);
            let want = alone
                .observe_json(doc.as_bytes(), 1, &mut Vec::new())
                .unwrap();
            assert_eq!(got, by_name(&alone, want), "event {e}: {doc}");
        }
    }

    #[test]
    fn guessed_keys_change_no_result_and_accept_no_bad_json() {
        // After a few events of one shape every key of the next one is guessed right. Each
        // document below breaks a guess in another way; read by the primed schema it must
        // give what it gives to a fresh schema (no guesses) and to the value-tree reference.
        let shape = r#"{"a":1,"b":{"c":"x","d":true},"e":[1,{"k":2}],"f":null,"g":"s"}"#;
        let docs = [
            shape,
            r#"{"a":"text now","b":{"c":{"deep":1},"d":false},"g":"s"}"#,
            r#"{"a":2,"b.c":"dotted","b":{"d":true}}"#,
            r#"{"a":3,"b":{"\u0063":"c escaped","d":true}}"#,
            r#"{"a":3,"b":{"c\n":"c and an escape","d":true}}"#,
            r#"{"a":4,"b":{"cc":"longer key","c":"y"}}"#,
            r#"{"a":5,"b":{"c":"first","c":"second"}}"#,
            r#"{"id":1,"_id":2,"payload":3,"a":6}"#,
            r#"{"":{"":{"x":1}},"a":7}"#,
            r#"{ "a" : 8 , "b" : { "c" : "spaced" , "d" : false } , "g" : "s" }"#,
            r#"{"a":9,"b":{"c":"x","d":true},"e":[],"f":{"now":"an object"},"g":1.5}"#,
            r#"{"a":10,"b":{"c":"a long value past sixteen bytes","d":true},"g":"s"}"#,
        ];
        let by_name = |s: &CollectionSchema, f: Vec<(u32, Scalar<'_>)>| {
            let mut v: Vec<(String, String)> = f
                .into_iter()
                .map(|(i, v)| {
                    let v = format!("{v:?}").replace("Borrowed", "Owned");
                    (s.columns[i as usize].name.clone(), v)
                })
                .collect();
            v.sort();
            v
        };
        for doc in docs {
            let mut primed = CollectionSchema::default();
            for _ in 0..3 {
                primed
                    .observe_json(shape.as_bytes(), 1, &mut Vec::new())
                    .unwrap();
            }
            let got = primed
                .observe_json(doc.as_bytes(), 1, &mut Vec::new())
                .unwrap();
            let got = by_name(&primed, got);
            let mut fresh = CollectionSchema::default();
            let want = fresh
                .observe_json(doc.as_bytes(), 1, &mut Vec::new())
                .unwrap();
            assert_eq!(got, by_name(&fresh, want), "{doc}");
            let mut tree = CollectionSchema::default();
            let v: Value = serde_json::from_str(doc).unwrap();
            // (The reference lists a column twice where two keys map to it, `id` and `_id`.)
            let names = |f: &[(String, String)]| {
                let mut n: Vec<String> = f.iter().map(|(n, _)| n.clone()).collect();
                n.dedup();
                n
            };
            let from_tree = tree.observe_value(v, 1, &mut Vec::new());
            let from_tree = names(&by_name(&tree, from_tree));
            assert_eq!(names(&got), from_tree, "{doc}");
        }
        // Bad JSON right where a key is guessed: refused as serde_json refuses it.
        let bad = [
            "{\"a\":1,\"b\":{\"c\n\":\"raw newline in a key\"}}",
            r#"{"a" 1}"#,
            r#"{"a":}"#,
            r#"{"a":1,"b":{"c":"x","d":tru}}"#,
            r#"{"a":1,"b":{"c"#,
            r#"{"a"#,
            r#"{"a":1,"b":{"c":"x""#,
            r#"{"a":1,"b":{"c":"x","d":true},"e":[1,{"k":2}],"f":null,"g":"s"} x"#,
        ];
        for doc in bad {
            assert!(serde_json::from_str::<Value>(doc).is_err(), "{doc}");
            let mut primed = CollectionSchema::default();
            for _ in 0..3 {
                primed
                    .observe_json(shape.as_bytes(), 1, &mut Vec::new())
                    .unwrap();
            }
            assert!(
                primed
                    .observe_json(doc.as_bytes(), 1, &mut Vec::new())
                    .is_err(),
                "{doc}"
            );
        }
        // A column whose name has a quote or a control character (from an escaped key) is
        // never guessed from raw bytes that spell it: those are not JSON.
        for (shape, doc) in [
            (r#"{"q\"x":1}"#, r#"{"q"x":1}"#),
            (r#"{"n\nl":1}"#, "{\"n\nl\":1}"),
            (r#"{"b\\s":1}"#, r#"{"b\s":1}"#),
        ]
        .into_iter()
        .flat_map(|(shape, doc)| {
            // Short and long texts: the check of the key's bytes differs near the end.
            let pad = r#","pad":"a value of more than sixteen bytes"}"#;
            let long = |d: &str| format!("{}{pad}", &d[..d.len() - 1]);
            [
                (shape.to_string(), doc.to_string()),
                (long(shape), long(doc)),
            ]
        }) {
            let mut primed = CollectionSchema::default();
            for _ in 0..3 {
                primed
                    .observe_json(shape.as_bytes(), 1, &mut Vec::new())
                    .unwrap();
            }
            assert!(serde_json::from_str::<Value>(&doc).is_err(), "{doc}");
            assert!(
                primed
                    .observe_json(doc.as_bytes(), 1, &mut Vec::new())
                    .is_err(),
                "{doc}"
            );
        }
    }

    #[test]
    fn observe_value_agrees_with_flatten() {
        let v = json!({"a": 1, "b": {"c": "x", "d": [1]}, "id": 3, "n": null});
        let mut s = CollectionSchema::default();
        let mut changed = Vec::new();
        let fields = s.observe_value(v.clone(), 1, &mut changed);
        let named: HashMap<String, Scalar> = fields
            .into_iter()
            .map(|(i, v)| (s.columns[i as usize].name.clone(), v))
            .collect();
        let flat: HashMap<String, Scalar> = flatten(&v).into_iter().collect();
        assert_eq!(named, flat);
        assert_eq!(changed.len(), 4);
    }
}
