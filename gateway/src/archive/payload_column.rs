//! The `payload` column of an archive file, compressed by the archiver itself.
//!
//! The payload (each event's original bytes, kept for exact replays) is about 70 % of an
//! archive file and most of the archiver's compression work. Parquet's writer compresses
//! every page with a zstd context of its own at a level of 1–22 and takes no other zstd
//! parameter, and reaches a page through an Arrow column and a page buffer that grows
//! from empty. Here the pages of the payload's column chunk are built, compressed (with
//! [`PAYLOAD_ZSTD`]) and serialized directly, with Parquet's own page writer and metadata
//! types; the file writer splices the chunk into its row group. A reader sees ordinary
//! zstd-compressed pages: zstd frames do not depend on the parameters that made them.
//!
//! Each payload is copied once, from the event into the page, before it is compressed.

use bytes::Bytes;
use parquet::basic::{Compression, Encoding, EncodingMask, PageType, ZstdLevel};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaData, OffsetIndexBuilder, PageEncodingStats};
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

/// The zstd parameters of the payload's pages: level 1 (the level the archiver has always
/// used; its ratio is what keeps the files under a quarter of the NDJSON) with a smaller
/// match-finder hash table (2^12 entries instead of level 1's 2^13 for 1 MiB inputs): the
/// table fits the CPU's L1/L2 better, the matches found are nearly the same. Measured on the
/// bench's payloads: see docs/benchmarks.md, "The payload column compressed by the archiver".
pub struct ZstdParams {
    pub level: i32,
    pub hash_log: u32,
}

pub const PAYLOAD_ZSTD: ZstdParams = ZstdParams {
    level: 1,
    hash_log: 12,
};

/// A zstd compressor set up with [`PAYLOAD_ZSTD`].
fn payload_compressor() -> Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(PAYLOAD_ZSTD.level).map_err(zstd_error)?;
    c.set_parameter(zstd::stream::raw::CParameter::HashLog(
        PAYLOAD_ZSTD.hash_log,
    ))
    .map_err(zstd_error)?;
    Ok(c)
}

/// Writes the payload column of a file's row groups, one column chunk at a time: plain
/// encoded values (a 4-byte little-endian length, then the bytes) in version 2 data pages of
/// at most `page_bytes` (unless one value is larger), no levels (a payload is never null),
/// no dictionary, no statistics (min/max of raw payloads help no reader), an offset index.
pub struct PayloadColumn {
    descr: ColumnDescPtr,
    page_bytes: usize,
    zstd: zstd::bulk::Compressor<'static>,
    /// The open page's encoded values; keeps its capacity from page to page.
    page: Vec<u8>,
    page_values: u32,
    /// The page's compressed values; reused.
    scratch: Vec<u8>,
    chunk: Chunk,
}

/// The open column chunk: its serialized pages and what its metadata will say.
struct Chunk {
    out: TrackedWrite<Vec<u8>>,
    offsets: OffsetIndexBuilder,
    pages: i32,
    values: i64,
    compressed: i64,
    uncompressed: i64,
}

impl Chunk {
    /// An empty chunk with room for `bytes` (the previous chunk's size: saves regrowing).
    fn new(bytes: usize) -> Self {
        Self {
            out: TrackedWrite::new(Vec::with_capacity(bytes)),
            offsets: OffsetIndexBuilder::new(),
            pages: 0,
            values: 0,
            compressed: 0,
            uncompressed: 0,
        }
    }
}

fn zstd_error(e: std::io::Error) -> ParquetError {
    ParquetError::General(format!("zstd, payload column: {e}"))
}

impl PayloadColumn {
    /// A writer for the column `descr` (a required binary column), in pages of about
    /// `page_bytes`, whose first chunk has room for `chunk_bytes` (later chunks get the
    /// size of the one before). Buffers sized up front are not regrown from empty: each
    /// regrowth copies what the buffer holds into memory the process may not have touched
    /// yet (a page fault per 4 KiB).
    pub fn new(descr: ColumnDescPtr, page_bytes: usize, chunk_bytes: usize) -> Result<Self> {
        Ok(Self {
            descr,
            page_bytes,
            zstd: payload_compressor()?,
            page: Vec::with_capacity(page_bytes),
            page_values: 0,
            scratch: Vec::with_capacity(zstd::zstd_safe::compress_bound(page_bytes)),
            chunk: Chunk::new(chunk_bytes),
        })
    }

    /// Appends the payloads to the open chunk.
    pub fn write<'a, I: IntoIterator<Item = &'a [u8]>>(&mut self, payloads: I) -> Result<()> {
        for p in payloads {
            if self.page_values > 0 && self.page.len() + 4 + p.len() > self.page_bytes {
                self.flush_page()?;
            }
            if self.page.capacity() == 0 {
                self.page.reserve(self.page_bytes.max(4 + p.len()));
            }
            let len = u32::try_from(p.len())
                .map_err(|_| ParquetError::General("a payload over 4 GiB".into()))?;
            self.page.extend_from_slice(&len.to_le_bytes());
            self.page.extend_from_slice(p);
            self.page_values += 1;
        }
        Ok(())
    }

    /// Compresses and serializes the open page into the chunk.
    fn flush_page(&mut self) -> Result<()> {
        if self.page_values == 0 {
            return Ok(());
        }
        let values = self.page.as_slice();
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(values.len()));
        self.zstd
            .compress_to_buffer(values, &mut self.scratch)
            .map_err(zstd_error)?;
        // As Parquet's own writer does: a page that does not get smaller stays uncompressed.
        let is_compressed = self.scratch.len() < values.len();
        let buf = Bytes::copy_from_slice(if is_compressed { &self.scratch } else { values });
        let num_values = self.page_values;
        let page = Page::DataPageV2 {
            buf,
            num_values,
            encoding: Encoding::PLAIN,
            num_nulls: 0,
            num_rows: num_values,
            def_levels_byte_len: 0,
            rep_levels_byte_len: 0,
            is_compressed,
            statistics: None,
        };
        let chunk = &mut self.chunk;
        let spec = SerializedPageWriter::new(&mut chunk.out)
            .write_page(CompressedPage::new(page, values.len()))?;
        chunk
            .offsets
            .append_offset_and_size(spec.offset as i64, spec.compressed_size as i32);
        chunk.offsets.append_row_count(num_values as i64);
        chunk.pages += 1;
        chunk.values += num_values as i64;
        chunk.compressed += spec.compressed_size as i64;
        chunk.uncompressed += spec.uncompressed_size as i64;
        self.page.clear();
        self.page_values = 0;
        Ok(())
    }

    /// Closes the open chunk: its bytes and its close result (offsets relative to the
    /// bytes), for `SerializedRowGroupWriter::append_column`.
    pub fn close_chunk(&mut self) -> Result<(Bytes, ColumnCloseResult)> {
        self.flush_page()?;
        let room = self.chunk.out.bytes_written() + self.chunk.out.bytes_written() / 8;
        let chunk = std::mem::replace(&mut self.chunk, Chunk::new(room));
        let metadata = ColumnChunkMetaData::builder(self.descr.clone())
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(PAYLOAD_ZSTD.level)?))
            // What Parquet's column writer lists for such a chunk: RLE (its level
            // encoding, declared even without levels) and the values' PLAIN.
            .set_encodings_mask(EncodingMask::new_from_encodings(
                [Encoding::PLAIN, Encoding::RLE].iter(),
            ))
            .set_page_encoding_stats(if chunk.pages > 0 {
                vec![PageEncodingStats {
                    page_type: PageType::DATA_PAGE_V2,
                    encoding: Encoding::PLAIN,
                    count: chunk.pages,
                }]
            } else {
                Vec::new()
            })
            .set_total_compressed_size(chunk.compressed)
            .set_total_uncompressed_size(chunk.uncompressed)
            .set_num_values(chunk.values)
            .set_data_page_offset(0)
            .build()?;
        let bytes = chunk.out.into_inner()?;
        Ok((
            Bytes::from(bytes),
            ColumnCloseResult {
                bytes_written: chunk.compressed as u64,
                rows_written: chunk.values as u64,
                metadata,
                bloom_filter: None,
                column_index: None,
                offset_index: Some(chunk.offsets.build()),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::parquet::{FileWriter, PAYLOAD_COLUMN, ROW_GROUP_ROWS, Row, file_schema};
    use crate::archive::schema::ColumnType;
    use crate::bus::Event;
    use arrow::array::{Array, AsArray, BinaryArray};
    use parquet::arrow::arrow_reader::{
        ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
    };
    use parquet::file::metadata::PageIndexPolicy;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    /// Payloads of every kind the column must keep byte for byte: empty, tiny, compressible
    /// JSON, incompressible noise (its page may stay uncompressed), and one larger than a
    /// page.
    fn payloads(n: usize) -> Vec<Bytes> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |len: usize| -> Bytes {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect::<Vec<u8>>()
                .into()
        };
        (0..n)
            .map(|i| match i % 7 {
                0 => Bytes::new(),
                1 => noise(3000),
                2 if i == 2 => noise((1 << 20) + 12345),
                _ => format!("{{\"i\":{i},\"text\":\"{}\"}}", "abc ".repeat(i % 300)).into(),
            })
            .collect()
    }

    fn write_file(payloads: &[Bytes]) -> Bytes {
        let events: Vec<Event> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Event {
                id: format!("ev{i:07}"),
                payload: p.clone(),
                content_type: "application/octet-stream".into(),
                ..Default::default()
            })
            .collect();
        let rows: Vec<Row<'_>> = events
            .iter()
            .map(|event| Row { event, fields: &[] })
            .collect();
        let schema = file_schema(&[("n", ColumnType::Int64)]);
        let mut w = FileWriter::new(schema, vec![Some(0)]).unwrap();
        // Uneven chunks, so that chunks straddle pages and the row group boundary.
        for chunk in rows.chunks(1000) {
            w.write(chunk).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_payloads(file: Bytes, selection: Option<RowSelection>) -> Vec<Bytes> {
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let mut builder =
            ParquetRecordBatchReaderBuilder::try_new_with_options(file, options).unwrap();
        if let Some(selection) = selection {
            builder = builder.with_row_selection(selection);
        }
        let mut out = Vec::new();
        for batch in builder.build().unwrap() {
            let batch = batch.unwrap();
            let col: &BinaryArray = batch.column(PAYLOAD_COLUMN).as_binary();
            assert_eq!(col.null_count(), 0);
            out.extend(col.iter().map(|v| Bytes::copy_from_slice(v.unwrap())));
        }
        out
    }

    #[test]
    fn payloads_come_back_byte_for_byte_across_pages_and_row_groups() {
        let sent = payloads(ROW_GROUP_ROWS + 5000);
        let file = write_file(&sent);
        assert_eq!(read_payloads(file.clone(), None), sent);

        let reader = SerializedFileReader::new(file).unwrap();
        let meta = reader.metadata();
        assert_eq!(meta.num_row_groups(), 2);
        let mut pages = 0;
        let mut compressed = 0;
        for g in 0..meta.num_row_groups() {
            let chunk = meta.row_group(g).column(PAYLOAD_COLUMN);
            assert_eq!(chunk.compression(), Compression::ZSTD(ZstdLevel::default()));
            assert!(chunk.dictionary_page_offset().is_none());
            for page in reader
                .get_row_group(g)
                .unwrap()
                .get_column_page_reader(PAYLOAD_COLUMN)
                .unwrap()
            {
                let page = page.unwrap();
                assert_eq!(page.page_type(), PageType::DATA_PAGE_V2);
                assert_eq!(page.encoding(), Encoding::PLAIN);
                pages += 1;
                if let Page::DataPageV2 { is_compressed, .. } = page {
                    compressed += is_compressed as usize;
                }
            }
        }
        // ~75 MiB of payloads in pages of at most 1 MiB (and the one larger payload).
        assert!(pages > 40, "{pages} pages");
        assert!(compressed > 40, "{compressed} of {pages} pages compressed");
    }

    #[test]
    fn a_reader_that_skips_pages_by_the_offset_index_gets_the_right_rows() {
        let sent = payloads(ROW_GROUP_ROWS + 5000);
        let file = write_file(&sent);
        // Skips whole pages of both row groups: the reader seeks by the offset index.
        let selection = RowSelection::from(vec![
            RowSelector::skip(20_000),
            RowSelector::select(10),
            RowSelector::skip(ROW_GROUP_ROWS - 20_010 + 3000),
            RowSelector::select(2000),
        ]);
        let got = read_payloads(file, Some(selection));
        let mut want: Vec<Bytes> = sent[20_000..20_010].to_vec();
        let start = ROW_GROUP_ROWS + 3000;
        want.extend_from_slice(&sent[start..start + 2000]);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "payloads differ after skipping pages");
    }

    #[test]
    fn record_batches_rewritten_by_compaction_keep_their_payloads() {
        let sent = payloads(3000);
        let file = write_file(&sent);
        let batches: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        let schema = batches[0].schema();
        let mut w = FileWriter::new(schema, Vec::new()).unwrap();
        for b in &batches {
            w.write_batch(b).unwrap();
        }
        assert_eq!(read_payloads(w.finish().unwrap(), None), sent);
    }
}
