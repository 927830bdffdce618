//! Events ↔ Parquet. A file holds the archive's own columns (`id`, `received_at` as a UTC
//! microsecond timestamp, `content_type`, `client_id`, `headers` as JSON text, `payload` as
//! the original bytes) followed by the collection's inferred columns that occur in the file,
//! each with its current (widened) type. zstd, page-level statistics (so readers get the page
//! index), a bloom filter on `id`, and row groups of at most 64Ki rows. The payload's chunks
//! are written by [`PayloadColumn`] and the inferred string columns' by [`StringColumn`]
//! (straight from the events, compressed by the archiver); the other columns go through
//! Arrow arrays and Parquet's Arrow column writers.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, BooleanBuilder, Float64Builder,
    Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{ArrowColumnWriter, ArrowRowGroupWriterFactory, compute_leaves};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::file::writer::SerializedFileWriter;

use super::payload_column::PayloadColumn;
use super::schema::{ColumnType, Scalar};
use super::string_column::StringColumn;
use crate::bus::Event;

pub const ROW_GROUP_ROWS: usize = 64 * 1024;

/// An event with its flattened JSON fields as (collection column index, value); empty for
/// non-JSON payloads. The fields are a slice of a buffer that holds all rows' fields (see
/// `CollectionSchema::field_buffer`).
pub struct Row<'a> {
    pub event: &'a Event,
    pub fields: &'a [(u32, Scalar<'a>)],
}

#[cfg(test)]
impl<'a> Row<'a> {
    /// Rows of `events` with the fields of the same position (tests build their fields one
    /// vector per event).
    pub(crate) fn zip(events: &'a [Event], fields: &'a [Vec<(u32, Scalar<'a>)>]) -> Vec<Self> {
        events
            .iter()
            .zip(fields)
            .map(|(event, fields)| Row { event, fields })
            .collect()
    }
}

fn base_fields() -> Vec<Field> {
    vec![
        Field::new("id", DataType::Utf8, false),
        Field::new(
            "received_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("content_type", DataType::Utf8, false),
        Field::new("client_id", DataType::Utf8, true),
        Field::new("headers", DataType::Utf8, true),
        Field::new("payload", DataType::Binary, false),
    ]
}

/// The position of `payload` among a file's columns (and Parquet leaves).
pub const PAYLOAD_COLUMN: usize = 5;

/// The Arrow type of an inferred column.
pub(crate) fn arrow_type(t: ColumnType) -> DataType {
    match t {
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Utf8 => DataType::Utf8,
    }
}

/// The Arrow schema of a file holding the given inferred columns (in schema order).
pub fn file_schema(columns: &[(&str, ColumnType)]) -> Arc<Schema> {
    let mut fields = base_fields();
    for (name, ty) in columns {
        fields.push(Field::new(*name, arrow_type(*ty), true));
    }
    Arc::new(Schema::new(fields))
}

/// Builds the Arrow record batch of `rows` under `schema` (from [`file_schema`]): the
/// archive's own columns, then one column per inferred field of the schema. `slot_of[c]` is
/// the position among the file's inferred columns of the collection's column `c`.
/// `text_hint` holds the text bytes each inferred column took in the previous chunk (and is
/// updated to this chunk's), so that string columns are allocated once at about their size
/// without a pass over the rows to count them.
pub fn to_record_batch(
    rows: &[Row<'_>],
    schema: &Arc<Schema>,
    slot_of: &[Option<u32>],
    text_hint: &mut Vec<usize>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let columns = build_columns(rows, schema, slot_of, text_hint, true, None)
        .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// The inferred string columns a [`FileWriter`] encodes itself (see [`StringColumn`]).
struct Strings {
    /// Per inferred column of the file (its position among them), its index in `columns`.
    of_slot: Vec<Option<usize>>,
    /// The file column index and the writer of each.
    columns: Vec<(usize, StringColumn)>,
    zstd: zstd::bulk::Compressor<'static>,
}

impl Strings {
    /// The own string column (its index in `columns`) of inferred column `slot`.
    fn at_slot(&self, slot: usize) -> Option<usize> {
        self.of_slot.get(slot).copied().flatten()
    }

    /// The own string column (its index in `columns`) of file column `i`.
    fn at_column(&self, i: usize) -> Option<usize> {
        self.at_slot(i.checked_sub(base_fields().len())?)
    }
}

/// The columns of [`to_record_batch`], without the payload column unless `with_payload`
/// (the file writer writes payloads straight from the events, see [`PayloadColumn`]), and
/// without the string columns of `strings`, whose values are appended to them instead
/// (rows numbered from `strings`' first row).
fn build_columns(
    rows: &[Row<'_>],
    schema: &Arc<Schema>,
    slot_of: &[Option<u32>],
    text_hint: &mut Vec<usize>,
    with_payload: bool,
    mut strings: Option<(&mut Strings, usize)>,
) -> Result<Vec<ArrayRef>, parquet::errors::ParquetError> {
    let inferred = &schema.fields()[base_fields().len()..];
    let n = rows.len();
    text_hint.resize(inferred.len(), 0);
    let own = |slot: usize, strings: &Option<(&mut Strings, usize)>| {
        strings.as_ref().and_then(|(s, _)| s.at_slot(slot))
    };
    // One pass over the rows' fields, each value appended to its column's builder (nulls
    // filled in for the rows that lack the field).
    let mut builders: Vec<Option<ColumnBuilder>> = inferred
        .iter()
        .zip(text_hint.iter())
        .enumerate()
        .map(|(slot, (field, &hint))| {
            own(slot, &strings)
                .is_none()
                .then(|| ColumnBuilder::new(field.data_type(), n, hint + hint / 4))
        })
        .collect();
    for (r, row) in rows.iter().enumerate() {
        for (col, value) in row.fields {
            if let Some(Some(i)) = slot_of.get(*col as usize) {
                match &mut builders[*i as usize] {
                    Some(builder) => builder.push(r, value),
                    None => {
                        let (s, first) = strings.as_mut().expect("an own string column");
                        let k = s.at_slot(*i as usize).expect("an own string column");
                        let column = &mut s.columns[k].1;
                        column.pad_to(*first + r, &mut s.zstd)?;
                        match value {
                            Scalar::Str(text) => column.push(text.as_bytes(), &mut s.zstd)?,
                            other => column.push(other.as_text().as_bytes(), &mut s.zstd)?,
                        }
                    }
                }
            }
        }
    }
    if let Some((s, first)) = strings.as_mut() {
        for (_, column) in &mut s.columns {
            column.pad_to(*first + n, &mut s.zstd)?;
        }
    }
    let payload_bytes: usize = if with_payload {
        rows.iter().map(|r| r.event.payload.len()).sum()
    } else {
        0
    };
    let mut id = StringBuilder::with_capacity(n, n * 26);
    let mut received = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut content_type = StringBuilder::with_capacity(n, n * 16);
    let mut client_id = StringBuilder::new();
    let mut headers = StringBuilder::new();
    let mut payload = BinaryBuilder::with_capacity(n, payload_bytes);
    for row in rows {
        let e = row.event;
        id.append_value(&e.id);
        received.append_value(e.received_at_micros);
        content_type.append_value(&e.content_type);
        if e.client_id.is_empty() {
            client_id.append_null()
        } else {
            client_id.append_value(&e.client_id)
        }
        if e.headers.is_empty() {
            headers.append_null()
        } else {
            headers.append_value(serde_json::to_string(&e.headers).unwrap_or_default())
        }
        if with_payload {
            payload.append_value(&e.payload);
        }
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(received.finish()),
        Arc::new(content_type.finish()),
        Arc::new(client_id.finish()),
        Arc::new(headers.finish()),
    ];
    if with_payload {
        columns.insert(PAYLOAD_COLUMN, Arc::new(payload.finish()));
    }
    for (builder, hint) in builders.into_iter().zip(text_hint.iter_mut()) {
        if let Some(builder) = builder {
            let (array, text) = builder.finish(n);
            *hint = text;
            columns.push(array);
        }
    }
    Ok(columns)
}

/// The builder of one inferred column of a chunk. Values come row by row; `rows` is the
/// number of rows it holds so far, so a row without the field becomes a null. A value whose
/// type is narrower than the column's (the column was widened by other events of the file)
/// is converted: an integer into a float column as a float, anything into a string column
/// as its JSON text; other mismatches cannot occur (the column's type is the widest of its
/// values) and would be null.
struct ColumnBuilder {
    rows: usize,
    values: Values,
}

enum Values {
    Bool(BooleanBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Str(StringBuilder),
}

impl Values {
    fn append_nulls(&mut self, n: usize) {
        match self {
            Self::Bool(b) => b.append_nulls(n),
            Self::Int(b) => b.append_nulls(n),
            Self::Float(b) => b.append_nulls(n),
            Self::Str(b) => b.append_nulls(n),
        }
    }
}

impl ColumnBuilder {
    fn new(ty: &DataType, rows: usize, text_bytes: usize) -> Self {
        let values = match ty {
            DataType::Boolean => Values::Bool(BooleanBuilder::with_capacity(rows)),
            DataType::Int64 => Values::Int(Int64Builder::with_capacity(rows)),
            DataType::Float64 => Values::Float(Float64Builder::with_capacity(rows)),
            _ => Values::Str(StringBuilder::with_capacity(rows, text_bytes)),
        };
        Self { rows: 0, values }
    }

    /// Sets row `row` (rows come in order, each at most once: a field given twice in one
    /// event reaches here once, see `CollectionSchema::observe_json`).
    #[inline]
    fn push(&mut self, row: usize, value: &Scalar<'_>) {
        if row > self.rows {
            self.values.append_nulls(row - self.rows);
        }
        self.rows = row + 1;
        match (&mut self.values, value) {
            (Values::Str(b), Scalar::Str(s)) => b.append_value(s),
            (Values::Str(b), other) => b.append_value(other.as_text()),
            (Values::Int(b), Scalar::Int(v)) => b.append_value(*v),
            (Values::Float(b), Scalar::Float(v)) => b.append_value(*v),
            (Values::Float(b), Scalar::Int(v)) => b.append_value(*v as f64),
            (Values::Bool(b), Scalar::Bool(v)) => b.append_value(*v),
            (values, _) => values.append_nulls(1),
        }
    }

    /// The column of `rows` rows (trailing rows without the field are null), and the text
    /// bytes it holds (0 for non-string columns).
    fn finish(mut self, rows: usize) -> (ArrayRef, usize) {
        if rows > self.rows {
            self.values.append_nulls(rows - self.rows);
        }
        match self.values {
            Values::Bool(mut b) => (Arc::new(b.finish()), 0),
            Values::Int(mut b) => (Arc::new(b.finish()), 0),
            Values::Float(mut b) => (Arc::new(b.finish()), 0),
            Values::Str(mut b) => {
                let text = b.values_slice().len();
                (Arc::new(b.finish()), text)
            }
        }
    }
}

/// Rows per Arrow batch handed to the Parquet writer: what bounds the Arrow copy of a file
/// in memory (the writer keeps only encoded, compressed pages of the open row group). Small
/// enough (about 1 MiB of payload) that the copy stays in the CPU's cache between being
/// built and being encoded, and that the allocator reuses its memory instead of asking the
/// kernel for fresh zeroed pages every chunk.
pub const CHUNK_ROWS: usize = 1024;

fn writer_properties(
    plain_columns: &[String],
    own_columns: &[&str],
) -> Result<WriterProperties, parquet::errors::ParquetError> {
    let mut builder = WriterProperties::builder();
    for c in plain_columns {
        builder = builder.set_column_dictionary_enabled(c.as_str().into(), false);
    }
    // The inferred string columns are written by `string_column`; as for the payload, the
    // Arrow writers Parquet sets up for them are never used and allocate nothing.
    for c in own_columns {
        builder = builder
            .set_column_dictionary_enabled((*c).into(), false)
            .set_column_compression((*c).into(), Compression::UNCOMPRESSED);
    }
    Ok(builder
        // Data page v2: the page writer compresses the values straight into the page buffer.
        // With v1 it first copies levels and values into one buffer, then compresses it into
        // a second buffer allocated at the uncompressed size and regrown to zstd's bound (a
        // realloc that copies the whole page again). Every engine that reads Parquet 2 pages
        // reads these (DuckDB, Spark, Trino/Athena; the DuckDB test reads them). The
        // encodings stay those of v1 (plain, dictionary): v2's default fallbacks
        // (delta encodings) cost CPU for little here.
        .set_writer_version(WriterVersion::PARQUET_2_0)
        .set_encoding(Encoding::PLAIN)
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        // The payload's chunks are written by `payload_column` (its own pages, statistics and
        // zstd parameters); the Arrow writer Parquet sets up for the column is never used,
        // and without a codec or a dictionary it allocates neither.
        .set_column_dictionary_enabled("payload".into(), false)
        .set_column_compression("payload".into(), Compression::UNCOMPRESSED)
        .set_column_dictionary_enabled("id".into(), false)
        .set_column_bloom_filter_enabled("id".into(), true)
        .set_created_by("rewind".into())
        .build())
}

const ZSTD_LEVEL: i32 = 1;
/// Payload pages of 1 MiB: zstd level 1 looks back at most 512 KiB, so 4 MiB pages gained
/// 0.1 point of ratio (18.4 vs 18.5 % of the NDJSON) and cost multi-MiB page buffers the
/// allocator got from the kernel as fresh zeroed memory.
const PAYLOAD_PAGE_BYTES: usize = 1 << 20;

/// Rows sampled per column by [`high_cardinality`].
const CARDINALITY_SAMPLE: usize = 256;

/// The inferred string and number columns (by collection column index) whose values are
/// mostly distinct in a sample of `rows`: ids, e-mails, free text, sequence numbers,
/// timestamps. Dictionary encoding only costs there (every value is hashed and interned
/// until the dictionary overflows and the writer falls back to plain pages; a 64Ki-row
/// chunk of distinct integers fits a dictionary whole, and is then written twice: the
/// values in the dictionary, their indexes in the pages), so the archiver writes them plain.
pub fn high_cardinality(rows: &[Row<'_>], columns: &[ColumnType]) -> Vec<usize> {
    let state = std::hash::RandomState::new();
    let mut seen: Vec<std::collections::HashSet<u64>> = Vec::new();
    let mut counts: Vec<usize> = vec![0; columns.len()];
    seen.resize_with(columns.len(), Default::default);
    let step = (rows.len() / CARDINALITY_SAMPLE).max(1);
    for row in rows.iter().step_by(step).take(CARDINALITY_SAMPLE) {
        for (col, value) in row.fields {
            let c = *col as usize;
            // A value as the column stores it (a string column's widened numbers are
            // rare enough to leave out; an integer in a float column is that float).
            let key = match (columns.get(c), value) {
                (Some(ColumnType::Utf8), Scalar::Str(s)) => {
                    std::hash::BuildHasher::hash_one(&state, s.as_bytes())
                }
                (Some(ColumnType::Int64), Scalar::Int(v)) => *v as u64,
                (Some(ColumnType::Float64), Scalar::Float(v)) => v.to_bits(),
                (Some(ColumnType::Float64), Scalar::Int(v)) => (*v as f64).to_bits(),
                _ => continue,
            };
            counts[c] += 1;
            seen[c].insert(key);
        }
    }
    (0..columns.len())
        .filter(|&c| counts[c] >= 64 && seen[c].len() * 2 > counts[c])
        .collect()
}

/// Writes one Parquet file chunk by chunk into memory: the archive's own columns and the
/// inferred columns through Parquet's Arrow column writers, the payload through
/// [`PayloadColumn`] (compressed with the archiver's own zstd parameters), one row group of
/// at most [`ROW_GROUP_ROWS`] rows at a time.
pub struct FileWriter {
    schema: Arc<Schema>,
    slot_of: Vec<Option<u32>>,
    file: SerializedFileWriter<Vec<u8>>,
    factory: ArrowRowGroupWriterFactory,
    /// The open row group's column writers (the payload's slot is never written).
    columns: Option<Vec<ArrowColumnWriter>>,
    payload: PayloadColumn,
    strings: Strings,
    rows_in_group: usize,
    /// Text bytes per inferred column in the last chunk (see [`to_record_batch`]).
    text_hint: Vec<usize>,
}

impl FileWriter {
    /// A writer for files of `schema`; `slot_of` maps the collection's column indexes of
    /// [`Row::fields`] to the file's inferred columns (see [`to_record_batch`]).
    pub fn new(
        schema: Arc<Schema>,
        slot_of: Vec<Option<u32>>,
    ) -> Result<Self, parquet::errors::ParquetError> {
        Self::with_capacity(schema, slot_of, 1 << 20, &[])
    }

    /// As [`Self::new`], with room for a file of about `bytes` (saves regrowing the buffer),
    /// and `plain_columns` written without dictionary encoding (see [`high_cardinality`]).
    pub fn with_capacity(
        schema: Arc<Schema>,
        slot_of: Vec<Option<u32>>,
        bytes: usize,
        plain_columns: &[String],
    ) -> Result<Self, parquet::errors::ParquetError> {
        if schema
            .fields()
            .get(PAYLOAD_COLUMN)
            .map(|f| f.name().as_str())
            != Some("payload")
        {
            return Err(parquet::errors::ParquetError::General(format!(
                "not an archive file's schema (column {PAYLOAD_COLUMN} is not `payload`): {schema}"
            )));
        }
        // The inferred string columns (after the archive's own columns; their names are
        // the dotted paths of JSON fields, so never those of the archive's own columns).
        let base = base_fields().len();
        let own: Vec<usize> = (base..schema.fields().len())
            .filter(|&i| schema.field(i).data_type() == &DataType::Utf8)
            .collect();
        let own_names: Vec<&str> = own
            .iter()
            .map(|&i| schema.field(i).name().as_str())
            .collect();
        // ArrowWriter sets the file up (the Arrow schema in the footer's metadata, the
        // Parquet schema); the row groups are then written column by column.
        let (file, factory) = ArrowWriter::try_new(
            Vec::with_capacity(bytes),
            schema.clone(),
            Some(writer_properties(plain_columns, &own_names)?),
        )?
        .into_serialized_writer()?;
        let payload = PayloadColumn::new(
            file.schema_descr().column(PAYLOAD_COLUMN),
            PAYLOAD_PAGE_BYTES,
            // Most of a file is its payload chunk.
            bytes,
        )?;
        let mut of_slot = vec![None; schema.fields().len() - base];
        let columns = own
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                of_slot[i - base] = Some(k);
                let dictionary = !plain_columns.iter().any(|c| c == schema.field(i).name());
                (
                    i,
                    StringColumn::new(file.schema_descr().column(i), dictionary),
                )
            })
            .collect();
        let strings = Strings {
            of_slot,
            columns,
            zstd: super::string_column::compressor()?,
        };
        Ok(Self {
            schema,
            slot_of,
            file,
            factory,
            columns: None,
            payload,
            strings,
            rows_in_group: 0,
            text_hint: Vec::new(),
        })
    }

    /// The open row group's column writers.
    fn columns(&mut self) -> Result<&mut Vec<ArrowColumnWriter>, parquet::errors::ParquetError> {
        if self.columns.is_none() {
            let index = self.file.flushed_row_groups().len();
            self.columns = Some(self.factory.create_column_writers(index)?);
        }
        Ok(self.columns.as_mut().expect("just set"))
    }

    /// Whether file column `i` is written by its own writer (the payload, the inferred
    /// string columns) rather than by an Arrow column writer.
    fn own_column(&self, i: usize) -> bool {
        i == PAYLOAD_COLUMN || self.strings.at_column(i).is_some()
    }

    /// Writes every column of `columns` (the file's columns written by Arrow column writers,
    /// see [`Self::own_column`], in order) to the open row group.
    fn write_columns(&mut self, columns: &[ArrayRef]) -> Result<(), parquet::errors::ParquetError> {
        let schema = self.schema.clone();
        let arrow: Vec<usize> = (0..schema.fields().len())
            .filter(|&i| !self.own_column(i))
            .collect();
        let writers = self.columns()?;
        let fields = arrow.iter().map(|&i| (i, schema.field(i)));
        for ((i, field), array) in fields.zip(columns) {
            for leaf in compute_leaves(field, array)? {
                writers[i].write(&leaf)?;
            }
        }
        Ok(())
    }

    /// Appends rows (at most [`CHUNK_ROWS`] at a time keeps memory low).
    pub fn write(&mut self, mut rows: &[Row<'_>]) -> Result<(), parquet::errors::ParquetError> {
        while !rows.is_empty() {
            let take = rows.len().min(ROW_GROUP_ROWS - self.rows_in_group);
            let (now, rest) = rows.split_at(take);
            let columns = build_columns(
                now,
                &self.schema,
                &self.slot_of,
                &mut self.text_hint,
                false,
                Some((&mut self.strings, self.rows_in_group)),
            )?;
            self.write_columns(&columns)?;
            self.payload
                .write(now.iter().map(|r| &r.event.payload[..]))?;
            self.advance(take)?;
            rows = rest;
        }
        Ok(())
    }

    /// Appends a record batch already in the file's schema.
    pub fn write_batch(
        &mut self,
        batch: &RecordBatch,
    ) -> Result<(), parquet::errors::ParquetError> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let take = (batch.num_rows() - offset).min(ROW_GROUP_ROWS - self.rows_in_group);
            let part = batch.slice(offset, take);
            let columns: Vec<ArrayRef> = (0..part.num_columns())
                .filter(|&i| !self.own_column(i))
                .map(|i| part.column(i).clone())
                .collect();
            self.write_columns(&columns)?;
            let strings = &mut self.strings;
            for (i, column) in &mut strings.columns {
                let values = part.column(*i).as_string_opt::<i32>().ok_or_else(|| {
                    parquet::errors::ParquetError::General(format!(
                        "column {} is {}, not a string",
                        self.schema.field(*i).name(),
                        part.column(*i).data_type()
                    ))
                })?;
                for v in values.iter() {
                    match v {
                        Some(v) => column.push(v.as_bytes(), &mut strings.zstd)?,
                        None => column.push_null(&mut strings.zstd)?,
                    }
                }
            }
            let payload = part.column(PAYLOAD_COLUMN);
            let payload = payload
                .as_any()
                .downcast_ref::<BinaryArray>()
                .ok_or_else(|| {
                    parquet::errors::ParquetError::General(format!(
                        "payload column is {}, not binary",
                        payload.data_type()
                    ))
                })?;
            self.payload
                .write((0..payload.len()).map(|i| payload.value(i)))?;
            self.advance(take)?;
            offset += take;
        }
        Ok(())
    }

    /// Counts `rows` written; closes the row group when it is full.
    fn advance(&mut self, rows: usize) -> Result<(), parquet::errors::ParquetError> {
        self.rows_in_group += rows;
        if self.rows_in_group >= ROW_GROUP_ROWS {
            self.end_row_group()?;
        }
        Ok(())
    }

    /// Ends the current row group (the next rows start a new one).
    pub fn end_row_group(&mut self) -> Result<(), parquet::errors::ParquetError> {
        let Some(columns) = self.columns.take() else {
            return Ok(());
        };
        let mut payload = Some(self.payload.close_chunk()?);
        let mut group = self.file.next_row_group()?;
        for (i, writer) in columns.into_iter().enumerate() {
            let own = self.strings.at_column(i);
            if i == PAYLOAD_COLUMN {
                let (bytes, close) = payload.take().ok_or_else(|| {
                    parquet::errors::ParquetError::General("row group without payloads".into())
                })?;
                group.append_column(&bytes, close)?;
            } else if let Some(k) = own {
                let strings = &mut self.strings;
                let (bytes, close) = strings.columns[k].1.close_chunk(&mut strings.zstd)?;
                group.append_column(&bytes, close)?;
            } else {
                writer.close()?.append_to_row_group(&mut group)?;
            }
        }
        group.close()?;
        self.rows_in_group = 0;
        Ok(())
    }

    pub fn finish(mut self) -> Result<Bytes, parquet::errors::ParquetError> {
        self.end_row_group()?;
        Ok(Bytes::from(self.file.into_inner()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::basic::Encoding;

    #[test]
    fn rows_become_columns_with_nulls_for_missing_fields_and_widened_values() {
        use arrow::array::{Array, AsArray};
        use arrow::datatypes::{Float64Type, Int64Type};
        let events: Vec<Event> = (0..6)
            .map(|i| Event {
                id: format!("ev{i}"),
                payload: Bytes::from_static(b"{}"),
                content_type: "application/json".into(),
                ..Default::default()
            })
            .collect();
        // Collection columns: 0 flag (bool), 1 n (float64: ints widened), 2 s (string:
        // numbers and booleans as text), 3 k (int64), 4 unused by this file.
        let fields: Vec<Vec<(u32, Scalar<'_>)>> = vec![
            vec![
                (0, Scalar::Bool(true)),
                (1, Scalar::Int(3)),
                (2, Scalar::Str("a".into())),
            ],
            vec![],
            vec![
                (3, Scalar::Int(-7)),
                (2, Scalar::Int(12)),
                (1, Scalar::Float(0.5)),
            ],
            vec![(2, Scalar::Bool(false))],
            vec![(4, Scalar::Int(1)), (0, Scalar::Bool(false))],
            vec![(2, Scalar::Float(2.5)), (3, Scalar::Int(9))],
        ];
        let rows = Row::zip(&events, &fields);
        let schema = file_schema(&[
            ("flag", ColumnType::Bool),
            ("n", ColumnType::Float64),
            ("s", ColumnType::Utf8),
            ("k", ColumnType::Int64),
        ]);
        let slot_of = vec![Some(0), Some(1), Some(2), Some(3), None];
        let mut hint = Vec::new();
        for round in 0..2 {
            let batch = to_record_batch(&rows, &schema, &slot_of, &mut hint).unwrap();
            assert_eq!(batch.num_rows(), 6);
            let col = |name: &str| batch.column_by_name(name).unwrap().clone();
            let flags: Vec<Option<bool>> = col("flag").as_boolean().iter().collect();
            assert_eq!(flags, [Some(true), None, None, None, Some(false), None]);
            let n = col("n");
            let n: Vec<Option<f64>> = n.as_primitive::<Float64Type>().iter().collect();
            assert_eq!(n, [Some(3.0), None, Some(0.5), None, None, None]);
            let s = col("s");
            let s: Vec<Option<&str>> = s.as_string::<i32>().iter().collect();
            let expected = [
                Some("a"),
                None,
                Some("12"),
                Some("false"),
                None,
                Some("2.5"),
            ];
            assert_eq!(s, expected);
            let k = col("k");
            let k: Vec<Option<i64>> = k.as_primitive::<Int64Type>().iter().collect();
            assert_eq!(k, [None, None, Some(-7), None, None, Some(9)]);
            assert_eq!(batch.column_by_name("payload").unwrap().len(), 6);
            // The string column's text size is kept for the next chunk's allocation.
            assert_eq!(hint, [0, 0, "a12false2.5".len(), 0], "round {round}");
        }
    }

    #[test]
    fn mostly_distinct_string_columns_are_written_without_a_dictionary() {
        let events: Vec<Event> = (0..5000)
            .map(|i| Event {
                id: format!("ev{i:06}"),
                payload: format!("{{\"n\":{i}}}").into(),
                content_type: "application/json".into(),
                ..Default::default()
            })
            .collect();
        let ids: Vec<String> = (0..5000).map(|i| format!("user-{i}")).collect();
        let fields: Vec<Vec<(u32, Scalar<'_>)>> = (0..events.len())
            .map(|i| {
                vec![
                    (0, Scalar::Str(ids[i].as_str().into())),
                    (1, Scalar::Str(["eu", "us", "ap"][i % 3].into())),
                    (2, Scalar::Int(i as i64 % 7)),
                    (3, Scalar::Int(i as i64)),
                    (4, Scalar::Float(i as f64 / 4.0)),
                    (5, Scalar::Float((i % 5) as f64)),
                ]
            })
            .collect();
        let rows = Row::zip(&events, &fields);
        let types = [
            ColumnType::Utf8,
            ColumnType::Utf8,
            ColumnType::Int64,
            ColumnType::Int64,
            ColumnType::Float64,
            ColumnType::Float64,
        ];
        assert_eq!(high_cardinality(&rows, &types), vec![0, 3, 4]);

        let schema = file_schema(&[
            ("user", ColumnType::Utf8),
            ("region", ColumnType::Utf8),
            ("n", ColumnType::Int64),
        ]);
        let slot_of = vec![Some(0), Some(1), Some(2)];
        let mut w = FileWriter::with_capacity(schema, slot_of, 1 << 20, &["user".into()]).unwrap();
        for chunk in rows.chunks(CHUNK_ROWS) {
            w.write(chunk).unwrap();
        }
        let bytes = w.finish().unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
        let rg = reader.metadata().row_group(0);
        let encodings = |name: &str| {
            let c = rg
                .columns()
                .iter()
                .find(|c| c.column_path().string() == name)
                .unwrap();
            c.encodings().collect::<Vec<_>>()
        };
        assert!(!encodings("user").contains(&Encoding::RLE_DICTIONARY));
        assert!(encodings("region").contains(&Encoding::RLE_DICTIONARY));
        // Version 2 data pages, with v1's plain encoding where there is no dictionary (not
        // the delta encodings v2 would default to).
        for name in ["user", "payload", "n"] {
            assert!(
                encodings(name).contains(&Encoding::PLAIN),
                "{name}: {:?}",
                encodings(name)
            );
            assert!(!encodings(name).iter().any(|e| matches!(
                e,
                Encoding::DELTA_BYTE_ARRAY
                    | Encoding::DELTA_LENGTH_BYTE_ARRAY
                    | Encoding::DELTA_BINARY_PACKED
            )));
        }
        {
            use parquet::file::reader::{FileReader, SerializedFileReader};
            let file = SerializedFileReader::new(bytes.clone()).unwrap();
            let rg = file.get_row_group(0).unwrap();
            let payload = file
                .metadata()
                .file_metadata()
                .schema_descr()
                .columns()
                .iter()
                .position(|c| c.name() == "payload")
                .unwrap();
            let pages: Vec<_> = rg
                .get_column_page_reader(payload)
                .unwrap()
                .map(|p| p.unwrap().page_type())
                .collect();
            assert!(!pages.is_empty());
            assert!(
                pages
                    .iter()
                    .all(|t| *t == parquet::basic::PageType::DATA_PAGE_V2),
                "{pages:?}"
            );
        }
        let batches: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(total, 5000);
        let users = batches[0]
            .column_by_name("user")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .value(7)
            .to_string();
        assert_eq!(users, "user-7");
    }
}
