//! Selecting events from one archive file with the time range and the filter pushed down into
//! the Parquet reader (what replays and exports run on):
//!
//! 1. **Row groups** whose `received_at` statistics fall outside `[from, to)`, or whose column
//!    statistics show that no row can match the filter, are never read.
//! 2. **Rows**: the reader decodes `received_at` and the typed columns the filter names first
//!    and evaluates the filter on them (a row filter); the `payload` column is then decoded
//!    only for the rows that may match, and its pages that hold none of them are skipped
//!    (the page index is loaded for that).
//! 3. **Exactness**: typed columns cannot always decide a row — a dotted path may also be
//!    reached through an array, a widened string column may hold a number's text, arrays
//!    are kept as JSON text. The typed evaluation is therefore three-valued (in / out / can't
//!    tell), only "out" rows are dropped early, and "can't tell" rows are checked against the
//!    payload with [`crate::query::Expr::matches`]. The result is exactly the events the
//!    filter selects on the payload, whatever the file's columns.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Schema};
use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowPredicateFn, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowFilter,
};
use parquet::file::metadata::{PageIndexPolicy, RowGroupMetaData};
use parquet::file::statistics::Statistics;

use super::read::{ArchivedEvent, ReadError};
use super::schema::RESERVED;
use crate::meta::ArchiveFile;
use crate::query::{CmpOp, Expr, Literal};

/// Three-valued truth: the typed columns say in, out, or cannot tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    Yes,
    No,
    Maybe,
}

impl Tri {
    fn not(self) -> Tri {
        match self {
            Tri::Yes => Tri::No,
            Tri::No => Tri::Yes,
            Tri::Maybe => Tri::Maybe,
        }
    }
}

fn and(parts: impl Iterator<Item = Tri>) -> Tri {
    let mut out = Tri::Yes;
    for p in parts {
        match p {
            Tri::No => return Tri::No,
            Tri::Maybe => out = Tri::Maybe,
            Tri::Yes => {}
        }
    }
    out
}

fn or(parts: impl Iterator<Item = Tri>) -> Tri {
    let mut out = Tri::No;
    for p in parts {
        match p {
            Tri::Yes => return Tri::Yes,
            Tri::Maybe => out = Tri::Maybe,
            Tri::No => {}
        }
    }
    out
}

/// A test on one field.
#[derive(Debug, Clone)]
enum Test {
    Cmp(CmpOp, Literal),
    In(Vec<Literal>),
    Exists,
}

/// The filter compiled against one file's columns.
#[derive(Debug, Clone)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Const(Tri),
    /// A test on the file's column `name`. `exact`: the column holds the only value the path
    /// can have (an undotted top-level key), so a non-match is a real "out".
    Leaf {
        name: String,
        exact: bool,
        test: Test,
        /// Index of the column among the filter's columns (see [`Node::assign`]).
        slot: usize,
    },
}

/// One row's value in a typed column, as far as it tells.
#[derive(Debug, Clone, Copy)]
enum Val<'a> {
    /// Null: the field is absent, `null`, or an object (whose leaves have columns of their own).
    Missing,
    Num(f64),
    Bool(bool),
    Text(&'a str),
    /// JSON text of an array or a deep object: only the payload can tell.
    Opaque,
}

fn text_val(s: &str) -> Val<'_> {
    if s.starts_with('[') || s.starts_with('{') {
        Val::Opaque
    } else {
        Val::Text(s)
    }
}

fn as_number(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// `equals` of the filter language (`plugin-sdk/src/filter`) on a typed value; `None` when
/// the typed value cannot tell.
fn equals(v: Val<'_>, lit: &Literal) -> Option<bool> {
    match v {
        Val::Missing => Some(false),
        Val::Opaque => None,
        Val::Num(n) => Some(lit.number.is_some_and(|m| n == m)),
        Val::Bool(b) => Some(if b { "true" } else { "false" } == lit.text),
        // A widened column holds strings and the text of numbers and booleans; all three
        // compare the same way under `equals` (numbers by value, the rest by text).
        Val::Text(t) => Some(
            match lit.number.and_then(|b| as_number(t).map(|a| a == b)) {
                Some(same) => same,
                None => t == lit.text,
            },
        ),
    }
}

fn ordering(op: CmpOp, ord: std::cmp::Ordering) -> bool {
    match op {
        CmpOp::Gt => ord.is_gt(),
        CmpOp::Ge => ord.is_ge(),
        CmpOp::Lt => ord.is_lt(),
        CmpOp::Le => ord.is_le(),
        CmpOp::Eq => ord.is_eq(),
        CmpOp::Ne => ord.is_ne(),
    }
}

/// `compare` (`>`, `>=`, `<`, `<=`) on a typed value; `None` when it cannot tell.
fn compare(v: Val<'_>, op: CmpOp, lit: &Literal) -> Option<bool> {
    match v {
        Val::Missing | Val::Bool(_) => Some(false),
        Val::Opaque => None,
        Val::Num(n) => Some(match lit.number {
            Some(m) => n.partial_cmp(&m).is_some_and(|o| ordering(op, o)),
            None => false,
        }),
        Val::Text(t) => match (as_number(t), lit.number) {
            (Some(a), Some(b)) => Some(a.partial_cmp(&b).is_some_and(|o| ordering(op, o))),
            (None, Some(_)) => Some(false),
            // A string compares by text, but a number's or boolean's text in a widened column
            // stood for a value that does not compare with text at all.
            (Some(_), None) => None,
            (None, None) if t == "true" || t == "false" => None,
            (None, None) => Some(ordering(op, t.cmp(lit.text.as_str()))),
        },
    }
}

/// A leaf's truth for one value. For an inexact column (a dotted path), only "in" is sure:
/// the path may reach other values the column does not hold.
fn leaf(v: Val<'_>, exact: bool, test: &Test) -> Tri {
    let sure = |b: Option<bool>| match b {
        Some(true) => Tri::Yes,
        Some(false) if exact => Tri::No,
        _ => Tri::Maybe,
    };
    match test {
        Test::Exists => match v {
            Val::Missing => Tri::Maybe,
            _ => Tri::Yes,
        },
        Test::Cmp(CmpOp::Eq, lit) => sure(equals(v, lit)),
        Test::Cmp(CmpOp::Ne, lit) => match equals(v, lit) {
            Some(true) => Tri::No,
            Some(false) if exact => Tri::Yes,
            _ => Tri::Maybe,
        },
        Test::Cmp(op, lit) => sure(compare(v, *op, lit)),
        Test::In(lits) => {
            let mut any = Some(false);
            for l in lits {
                match equals(v, l) {
                    Some(true) => return Tri::Yes,
                    None => any = None,
                    Some(false) => {}
                }
            }
            sure(any)
        }
    }
}

/// Compiles a filter against a file's Arrow schema. `capped`: the collection has fields
/// without a column (its column limit was reached), so an absent column proves nothing.
fn compile(expr: &Expr, schema: &Schema, capped: bool) -> Node {
    let field = |path: &str, test: Test| -> Node {
        // Reserved names are stored as `_name`, which a payload key `_name` shares.
        if RESERVED.contains(&path) || path.starts_with('_') || path.is_empty() {
            return Node::Const(Tri::Maybe);
        }
        let exact = !path.contains('.');
        match schema.field_with_name(path) {
            Ok(f)
                if matches!(
                    f.data_type(),
                    DataType::Int64 | DataType::Float64 | DataType::Boolean | DataType::Utf8
                ) =>
            {
                Node::Leaf {
                    name: path.to_string(),
                    exact,
                    test,
                    slot: 0,
                }
            }
            Ok(_) => Node::Const(Tri::Maybe),
            // No row of this file has a value there: every row reads as missing.
            Err(_) if exact && !capped => Node::Const(leaf(Val::Missing, true, &test)),
            Err(_) => Node::Const(Tri::Maybe),
        }
    };
    match expr {
        Expr::And(parts) => Node::And(parts.iter().map(|p| compile(p, schema, capped)).collect()),
        Expr::Or(parts) => Node::Or(parts.iter().map(|p| compile(p, schema, capped)).collect()),
        Expr::Not(inner) => Node::Not(Box::new(compile(inner, schema, capped))),
        Expr::Cmp(path, op, lit) => field(path, Test::Cmp(*op, lit.clone())),
        Expr::In(path, lits) => field(path, Test::In(lits.clone())),
        Expr::Exists(path) => field(path, Test::Exists),
    }
}

impl Node {
    /// Collects the columns the filter reads into `out` and numbers each leaf's column.
    fn assign(&mut self, out: &mut Vec<String>) {
        match self {
            Node::And(p) | Node::Or(p) => p.iter_mut().for_each(|n| n.assign(out)),
            Node::Not(n) => n.assign(out),
            Node::Leaf { name, slot, .. } => {
                *slot = match out.iter().position(|n| n == name) {
                    Some(i) => i,
                    None => {
                        out.push(name.clone());
                        out.len() - 1
                    }
                }
            }
            Node::Const(_) => {}
        }
    }

    /// Truth for a whole row group from its statistics: `No` only when no row can match.
    fn group(&self, rg: &RowGroupMetaData) -> Tri {
        match self {
            Node::And(p) => and(p.iter().map(|n| n.group(rg))),
            Node::Or(p) => or(p.iter().map(|n| n.group(rg))),
            Node::Not(n) => match n.group(rg) {
                Tri::Yes => Tri::No,
                _ => Tri::Maybe,
            },
            Node::Const(t) => *t,
            Node::Leaf {
                name, exact, test, ..
            } => {
                if !exact {
                    return Tri::Maybe;
                }
                let Some(stats) = column_stats(rg, name) else {
                    return Tri::Maybe;
                };
                if group_excludes(stats, test) {
                    Tri::No
                } else {
                    Tri::Maybe
                }
            }
        }
    }
}

fn column_stats<'a>(rg: &'a RowGroupMetaData, name: &str) -> Option<&'a Statistics> {
    rg.columns()
        .iter()
        .find(|c| c.column_path().string() == name)
        .and_then(|c| c.statistics())
}

/// Whether min/max statistics prove that no value of the group passes an (exact) test. Null
/// rows never pass `=`, `IN` or an ordering, so only the values' range matters.
fn group_excludes(stats: &Statistics, test: &Test) -> bool {
    let lits: Vec<&Literal> = match test {
        Test::Cmp(CmpOp::Eq, l) => vec![l],
        Test::In(ls) => ls.iter().collect(),
        Test::Cmp(CmpOp::Ne, _) | Test::Exists => return false,
        Test::Cmp(op, l) => {
            // Orderings: numeric columns only.
            let Some(m) = l.number else {
                return matches!(stats, Statistics::Int64(_) | Statistics::Double(_));
            };
            let range = match stats {
                Statistics::Int64(s) => s
                    .min_opt()
                    .zip(s.max_opt())
                    .map(|(a, b)| (*a as f64, *b as f64)),
                Statistics::Double(s) => s.min_opt().zip(s.max_opt()).map(|(a, b)| (*a, *b)),
                _ => None,
            };
            let Some((min, max)) = range else {
                return false;
            };
            return match op {
                CmpOp::Gt => max <= m,
                CmpOp::Ge => max < m,
                CmpOp::Lt => min >= m,
                CmpOp::Le => min > m,
                _ => false,
            };
        }
    };
    lits.iter().all(|l| literal_outside(stats, l))
}

/// Whether no value in the group equals the literal.
fn literal_outside(stats: &Statistics, lit: &Literal) -> bool {
    match stats {
        Statistics::Int64(s) => match (lit.number, s.min_opt(), s.max_opt()) {
            (None, _, _) => true,
            (Some(m), Some(a), Some(b)) => m < *a as f64 || m > *b as f64,
            _ => false,
        },
        Statistics::Double(s) => match (lit.number, s.min_opt(), s.max_opt()) {
            (None, _, _) => true,
            (Some(m), Some(a), Some(b)) => m < *a || m > *b,
            _ => false,
        },
        Statistics::ByteArray(s) => {
            // Text equality only when the literal is not a number (numbers compare by value
            // with numeric text), and only when no value can be an array's JSON text.
            if lit.number.is_some() {
                return false;
            }
            let (Some(min), Some(max)) = (s.min_bytes_opt(), s.max_bytes_opt()) else {
                return false;
            };
            let overlaps = |lo: &[u8], hi: &[u8]| min < hi && max >= lo;
            if overlaps(b"[", b"\\") || overlaps(b"{", b"|") {
                return false;
            }
            let t = lit.text.as_bytes();
            t < min || t > max
        }
        _ => false,
    }
}

/// Typed columns of a record batch, by name.
enum Col<'a> {
    Int(&'a Int64Array),
    Float(&'a Float64Array),
    Bool(&'a BooleanArray),
    Str(&'a StringArray),
    None,
}

impl Col<'_> {
    fn of(a: Option<&ArrayRef>) -> Col<'_> {
        let Some(a) = a else { return Col::None };
        let any = a.as_any();
        if let Some(x) = any.downcast_ref::<Int64Array>() {
            Col::Int(x)
        } else if let Some(x) = any.downcast_ref::<Float64Array>() {
            Col::Float(x)
        } else if let Some(x) = any.downcast_ref::<BooleanArray>() {
            Col::Bool(x)
        } else if let Some(x) = any.downcast_ref::<StringArray>() {
            Col::Str(x)
        } else {
            Col::None
        }
    }

    fn get(&self, i: usize) -> Val<'_> {
        match self {
            Col::Int(a) if !a.is_null(i) => Val::Num(a.value(i) as f64),
            Col::Float(a) if !a.is_null(i) => Val::Num(a.value(i)),
            Col::Bool(a) if !a.is_null(i) => Val::Bool(a.value(i)),
            Col::Str(a) if !a.is_null(i) => text_val(a.value(i)),
            Col::None => Val::Opaque,
            Col::Int(_) | Col::Float(_) | Col::Bool(_) | Col::Str(_) => Val::Missing,
        }
    }
}

/// The node tree with leaves bound to a batch's columns (in [`Node::assign`] order).
struct Bound<'a> {
    node: &'a Node,
    cols: Vec<Col<'a>>,
}

impl<'a> Bound<'a> {
    fn new(node: &'a Node, names: &[String], batch: &'a RecordBatch) -> Self {
        let cols = names
            .iter()
            .map(|n| Col::of(batch.column_by_name(n)))
            .collect();
        Self { node, cols }
    }

    fn row(&self, i: usize) -> Tri {
        self.eval(self.node, i)
    }

    fn eval(&self, node: &Node, i: usize) -> Tri {
        match node {
            Node::And(p) => and(p.iter().map(|n| self.eval(n, i))),
            Node::Or(p) => or(p.iter().map(|n| self.eval(n, i))),
            Node::Not(n) => self.eval(n, i).not(),
            Node::Const(t) => *t,
            Node::Leaf {
                exact, test, slot, ..
            } => match &self.cols[*slot] {
                Col::None => Tri::Maybe,
                c => leaf(c.get(i), *exact, test),
            },
        }
    }
}

/// What a file read did, for benchmarks and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct SelectStats {
    pub row_groups: usize,
    pub row_groups_read: usize,
    /// Rows whose payload had to be parsed because the typed columns could not tell.
    pub payload_checks: usize,
}

/// The events of one archive file in `[from, to)` (µs) that `filter` selects, in file order.
/// The file is fetched whole (files are bounded by the archive's target size) and decoded
/// off the async runtime.
pub async fn read_selected(
    store: &Arc<dyn ObjectStore>,
    file: &ArchiveFile,
    from: i64,
    to: i64,
    filter: Option<Arc<Expr>>,
    capped: bool,
) -> Result<(Vec<ArchivedEvent>, SelectStats), ReadError> {
    let err = |message: String| ReadError {
        path: file.path.clone(),
        message,
        not_found: false,
    };
    let bytes = store
        .get(&file.path.as_str().into())
        .await
        .map_err(|e| ReadError {
            not_found: matches!(e, object_store::Error::NotFound { .. }),
            ..err(e.to_string())
        })?
        .bytes()
        .await
        .map_err(|e| err(e.to_string()))?;
    tokio::task::spawn_blocking(move || select_bytes(bytes, from, to, filter.as_deref(), capped))
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(err)
}

/// [`read_selected`] on a file's bytes.
pub fn select_bytes(
    bytes: Bytes,
    from: i64,
    to: i64,
    filter: Option<&Expr>,
    capped: bool,
) -> Result<(Vec<ArchivedEvent>, SelectStats), String> {
    let err = |e: parquet::errors::ParquetError| e.to_string();
    let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(
        bytes,
        ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional),
    )
    .map_err(err)?;
    let schema = builder.schema().clone();
    let mut node = filter.map(|f| compile(f, &schema, capped));
    let mut names: Vec<String> = Vec::new();
    if let Some(n) = &mut node {
        n.assign(&mut names);
    }

    let metadata = builder.metadata().clone();
    let mut stats = SelectStats {
        row_groups: metadata.num_row_groups(),
        ..Default::default()
    };
    let mut groups = Vec::new();
    for (i, rg) in metadata.row_groups().iter().enumerate() {
        if let Some(Statistics::Int64(s)) = column_stats(rg, "received_at")
            && let (Some(min), Some(max)) = (s.min_opt(), s.max_opt())
            && (*max < from || *min >= to)
        {
            continue;
        }
        if let Some(n) = &node
            && n.group(rg) == Tri::No
        {
            continue;
        }
        groups.push(i);
    }
    stats.row_groups_read = groups.len();
    if groups.is_empty() {
        return Ok((Vec::new(), stats));
    }
    let descr = builder.parquet_schema();
    let mut predicate_cols = vec!["received_at".to_string()];
    predicate_cols.extend(names.iter().cloned());
    let predicate_mask = ProjectionMask::columns(descr, predicate_cols.iter().map(String::as_str));
    let mut output_cols = vec![
        "id".to_string(),
        "received_at".to_string(),
        "content_type".to_string(),
        "payload".to_string(),
    ];
    output_cols.extend(names.iter().cloned());
    let output_mask = ProjectionMask::columns(descr, output_cols.iter().map(String::as_str));

    let pred_node = node.clone();
    let pred_names = names.clone();
    let predicate = ArrowPredicateFn::new(predicate_mask, move |batch: RecordBatch| {
        let times = batch.column_by_name("received_at").and_then(|c| {
            c.as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .cloned()
        });
        let bound = pred_node
            .as_ref()
            .map(|n| Bound::new(n, &pred_names, &batch));
        let keep: BooleanArray = (0..batch.num_rows())
            .map(|i| {
                let in_time = times
                    .as_ref()
                    .is_none_or(|t| (from..to).contains(&t.value(i)));
                Some(in_time && bound.as_ref().is_none_or(|b| b.row(i) != Tri::No))
            })
            .collect();
        Ok(keep)
    });
    let reader = builder
        .with_row_groups(groups)
        .with_projection(output_mask)
        .with_row_filter(RowFilter::new(vec![Box::new(predicate)]))
        .with_batch_size(8192)
        .build()
        .map_err(err)?;

    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| format!("column {name} missing"))
        };
        let ids = downcast::<StringArray>(col("id")?, "id")?;
        let times = downcast::<TimestampMicrosecondArray>(col("received_at")?, "received_at")?;
        let types = downcast::<StringArray>(col("content_type")?, "content_type")?;
        let payloads = downcast::<BinaryArray>(col("payload")?, "payload")?;
        let bound = node.as_ref().map(|n| Bound::new(n, &names, &batch));
        for i in 0..batch.num_rows() {
            let t = times.value(i);
            if t < from || t >= to {
                continue;
            }
            let content_type = if types.is_null(i) { "" } else { types.value(i) };
            let payload = payloads.value(i);
            let selected = match bound.as_ref().map(|b| b.row(i)) {
                None | Some(Tri::Yes) => true,
                Some(Tri::No) => false,
                Some(Tri::Maybe) => {
                    stats.payload_checks += 1;
                    crate::query::payload_matches(filter, content_type, payload)
                }
            };
            if selected {
                out.push(ArchivedEvent {
                    id: ids.value(i).to_string(),
                    received_at: t,
                    content_type: content_type.to_string(),
                    payload: Bytes::copy_from_slice(payload),
                });
            }
        }
    }
    Ok((out, stats))
}

fn downcast<'a, T: 'static>(a: &'a ArrayRef, name: &str) -> Result<&'a T, String> {
    a.as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| format!("column {name} has an unexpected type"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::parquet::{FileWriter, Row, file_schema};
    use crate::archive::schema::{CollectionSchema, Scalar, flatten};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::{Value, json};

    /// Writes events to a Parquet file the way the archiver does (schema inferred from them),
    /// with small row groups so that pruning has something to prune.
    fn write_file(payloads: &[Value]) -> (Bytes, Vec<crate::bus::Event>) {
        let mut schema = CollectionSchema::default();
        let mut changed = Vec::new();
        let events: Vec<crate::bus::Event> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| crate::bus::Event {
                id: format!("{:026}", i),
                received_at_micros: 1_000_000 + i as i64,
                headers: Default::default(),
                payload: Bytes::from(p.to_string()),
                content_type: if p.is_string() {
                    "text/plain".into()
                } else {
                    "application/json".into()
                },
                client_id: String::new(),
            })
            .collect();
        let flat: Vec<Vec<(String, Scalar<'static>)>> = payloads.iter().map(flatten).collect();
        for f in &flat {
            schema.observe(f, 0, &mut changed);
        }
        let columns: Vec<(&str, _)> = schema
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.ty))
            .collect();
        let arrow_schema = file_schema(&columns);
        let slot_of: Vec<Option<u32>> = (0..columns.len() as u32).map(Some).collect();
        let fields: Vec<Vec<(u32, Scalar<'_>)>> = flat
            .iter()
            .map(|f| {
                f.iter()
                    .filter_map(|(name, v)| {
                        schema
                            .columns
                            .iter()
                            .position(|c| &c.name == name)
                            .map(|i| (i as u32, v.clone()))
                    })
                    .collect()
            })
            .collect();
        let rows = Row::zip(&events, &fields);
        let mut w = FileWriter::new(arrow_schema, slot_of).unwrap();
        for chunk in rows.chunks(50) {
            w.write(chunk).unwrap();
            w.end_row_group().unwrap();
        }
        (w.finish().unwrap(), events)
    }

    async fn select(bytes: Bytes, filter: &str, from: i64, to: i64) -> (Vec<String>, SelectStats) {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        use object_store::ObjectStoreExt;
        store
            .put(&"f.parquet".into(), bytes.clone().into())
            .await
            .unwrap();
        let file = ArchiveFile {
            id: "f".into(),
            team_id: String::new(),
            collection_id: String::new(),
            path: "f.parquet".into(),
            rows: 0,
            bytes: bytes.len() as i64,
            min_received_at: 0,
            max_received_at: 0,
            min_position: 0,
            max_position: 0,
            schema_version: 0,
            created_at: 0,
        };
        let expr = crate::query::parse(filter).unwrap().map(Arc::new);
        let (events, stats) = read_selected(&store, &file, from, to, expr, false)
            .await
            .unwrap();
        (events.into_iter().map(|e| e.id).collect(), stats)
    }

    fn expected(events: &[crate::bus::Event], filter: &str, from: i64, to: i64) -> Vec<String> {
        let expr = crate::query::parse(filter).unwrap();
        events
            .iter()
            .filter(|e| (from..to).contains(&e.received_at_micros))
            .filter(|e| crate::query::payload_matches(expr.as_ref(), &e.content_type, &e.payload))
            .map(|e| e.id.clone())
            .collect()
    }

    #[tokio::test]
    async fn prunes_row_groups_and_reads_payloads_only_where_needed() {
        // Types sorted in blocks, so a row group holds one type only.
        let payloads: Vec<Value> = (0..500)
            .map(|i| json!({"type": format!("t{}", i / 100), "n": i, "user": {"plan": if i % 2 == 0 {"pro"} else {"free"}}}))
            .collect();
        let (bytes, events) = write_file(&payloads);
        let (ids, stats) = select(bytes.clone(), r#"type = "t3""#, 0, i64::MAX).await;
        assert_eq!(ids, expected(&events, r#"type = "t3""#, 0, i64::MAX));
        assert_eq!(ids.len(), 100);
        assert_eq!(stats.row_groups, 10);
        assert_eq!(stats.row_groups_read, 2, "only t3's row groups are read");
        assert_eq!(
            stats.payload_checks, 0,
            "an undotted typed column decides alone"
        );

        let (ids, stats) = select(bytes.clone(), "n >= 490 OR n < 3", 0, i64::MAX).await;
        assert_eq!(ids.len(), 13);
        assert_eq!(stats.row_groups_read, 2);

        // A time range prunes by received_at.
        let (ids, stats) = select(bytes.clone(), "", 1_000_100, 1_000_150).await;
        assert_eq!(ids.len(), 50);
        assert_eq!(stats.row_groups_read, 1);

        // A dotted path: matches are sure from the column, the rest checked on the payload.
        let (ids, _) = select(bytes, "user.plan = pro", 0, i64::MAX).await;
        assert_eq!(ids.len(), 250);
    }

    fn random_value(rng: &mut StdRng, depth: u32) -> Value {
        match rng.random_range(0..if depth > 1 { 7 } else { 9 }) {
            0 => json!(rng.random_range(-5..20)),
            1 => json!(rng.random_range(-5..20) as f64 + 0.5),
            2 => json!(["a", "b", "c", "10", "true"][rng.random_range(0..5)]),
            3 => json!(rng.random_bool(0.5)),
            4 => Value::Null,
            5 => json!(rng.random_range(0..15).to_string()),
            6 => json!([rng.random_range(0..12), "b"]),
            _ => {
                let mut m = serde_json::Map::new();
                for _ in 0..rng.random_range(0..3) {
                    m.insert(
                        ["x", "y", "a.b"][rng.random_range(0..3)].into(),
                        random_value(rng, depth + 1),
                    );
                }
                Value::Object(m)
            }
        }
    }

    fn random_payload(rng: &mut StdRng) -> Value {
        if rng.random_range(0..30) == 0 {
            return json!("not json at all");
        }
        let mut m = serde_json::Map::new();
        for key in ["a", "b", "c", "a.b", "id", "nested"] {
            if rng.random_bool(0.7) {
                m.insert(key.into(), random_value(rng, 0));
            }
        }
        Value::Object(m)
    }

    fn random_filter(rng: &mut StdRng, depth: u32) -> String {
        let path =
            ["a", "b", "c", "a.b", "a.x", "nested.y", "id", "missing"][rng.random_range(0..8)];
        let lit = ["1", "10", "a", "b", "true", "2.5", "\"c\"", "-3"][rng.random_range(0..8)];
        let op = ["=", "!=", ">", ">=", "<", "<="][rng.random_range(0..6)];
        match rng.random_range(0..if depth > 2 { 3 } else { 7 }) {
            0 => format!("{path} {op} {lit}"),
            1 => format!("{path} IN [{lit}, b, 7]"),
            2 => format!("{path} EXISTS"),
            3 => format!("NOT ({})", random_filter(rng, depth + 1)),
            4 => format!(
                "({}) OR ({})",
                random_filter(rng, depth + 1),
                random_filter(rng, depth + 1)
            ),
            _ => format!(
                "({}) AND ({})",
                random_filter(rng, depth + 1),
                random_filter(rng, depth + 1)
            ),
        }
    }

    /// The pushed-down selection picks exactly what the filter picks on the payload, for
    /// random events (widened columns, arrays, dotted keys, nulls, non-JSON) and filters.
    #[tokio::test]
    async fn pushdown_selects_exactly_what_the_payload_filter_selects() {
        let mut rng = StdRng::seed_from_u64(7);
        for round in 0..8 {
            let payloads: Vec<Value> = (0..300).map(|_| random_payload(&mut rng)).collect();
            let (bytes, events) = write_file(&payloads);
            for _ in 0..40 {
                let f = random_filter(&mut rng, 0);
                let (ids, _) = select(bytes.clone(), &f, 0, i64::MAX).await;
                assert_eq!(
                    ids,
                    expected(&events, &f, 0, i64::MAX),
                    "round {round}, filter {f}"
                );
            }
        }
    }
}
