//! Events ↔ Parquet. A file holds the archive's own columns (`id`, `received_at` as a UTC
//! microsecond timestamp, `content_type`, `client_id`, `headers` as JSON text, `payload` as
//! the original bytes) followed by the collection's inferred columns that occur in the file,
//! each with its current (widened) type. zstd, page-level statistics (so readers get the page
//! index), a bloom filter on `id`, and row groups of at most 64Ki rows.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use super::schema::{CollectionSchema, ColumnType, Scalar};
use crate::bus::Event;

pub const ROW_GROUP_ROWS: usize = 64 * 1024;

/// An event with its flattened JSON fields (empty for non-JSON payloads).
pub struct Row<'a> {
    pub event: &'a Event,
    pub fields: Vec<(String, Scalar)>,
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

fn arrow_type(t: ColumnType) -> DataType {
    match t {
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Utf8 => DataType::Utf8,
    }
}

/// Builds the Arrow record batch of `rows` under the collection's current schema.
pub fn to_record_batch(
    rows: &[Row<'_>],
    schema: &CollectionSchema,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    // Which inferred columns occur here, in schema order, with their values sparse by row.
    let mut present: HashMap<&str, Vec<(usize, &Scalar)>> = HashMap::new();
    for (r, row) in rows.iter().enumerate() {
        for (name, value) in &row.fields {
            if schema.get(name).is_some() {
                present.entry(name.as_str()).or_default().push((r, value));
            }
        }
    }
    let mut fields = base_fields();
    let mut id = StringBuilder::new();
    let mut received = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut content_type = StringBuilder::new();
    let mut client_id = StringBuilder::new();
    let mut headers = StringBuilder::new();
    let mut payload = BinaryBuilder::new();
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
        payload.append_value(&e.payload);
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(received.finish()),
        Arc::new(content_type.finish()),
        Arc::new(client_id.finish()),
        Arc::new(headers.finish()),
        Arc::new(payload.finish()),
    ];
    for col in &schema.columns {
        let Some(values) = present.get(col.name.as_str()) else {
            continue;
        };
        fields.push(Field::new(&col.name, arrow_type(col.ty), true));
        columns.push(build_column(col.ty, values, rows.len()));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

fn build_column(ty: ColumnType, values: &[(usize, &Scalar)], len: usize) -> ArrayRef {
    macro_rules! fill {
        ($builder:expr, $convert:expr) => {{
            let mut b = $builder;
            let mut next = 0;
            for (row, value) in values {
                while next < *row {
                    b.append_null();
                    next += 1;
                }
                match $convert(*value) {
                    Some(v) => b.append_value(v),
                    None => b.append_null(),
                }
                next += 1;
            }
            while next < len {
                b.append_null();
                next += 1;
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    match ty {
        ColumnType::Bool => fill!(BooleanBuilder::new(), |s: &Scalar| match s {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }),
        ColumnType::Int64 => fill!(Int64Builder::new(), |s: &Scalar| match s {
            Scalar::Int(i) => Some(*i),
            _ => None,
        }),
        ColumnType::Float64 => fill!(Float64Builder::new(), |s: &Scalar| match s {
            Scalar::Int(i) => Some(*i as f64),
            Scalar::Float(f) => Some(*f),
            _ => None,
        }),
        ColumnType::Utf8 => fill!(StringBuilder::new(), |s: &Scalar| Some(s.as_text())),
    }
}

/// Encodes a record batch as one Parquet file.
pub fn encode(batch: &RecordBatch) -> Result<Bytes, parquet::errors::ParquetError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_column_bloom_filter_enabled("id".into(), true)
        .set_created_by("rewind".into())
        .build();
    let mut out = Vec::with_capacity(1 << 20);
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(Bytes::from(out))
}
