//! The inferred string columns of an archive file, encoded by the archiver itself.
//!
//! Most inferred columns are strings, and most of those take a few distinct values (event
//! types, plans, regions, pages). Through Parquet's Arrow writer each value was copied into
//! an Arrow array, then hashed again by Parquet's dictionary interner and compared with the
//! page's minimum and maximum. Here a value goes from the event's bytes to its column
//! once: hashed into the chunk's dictionary (a short string costs two loads and a multiply),
//! and a page's statistics are taken over the distinct dictionary entries it uses, not over
//! every value. Columns whose values are mostly distinct (see `parquet::high_cardinality`),
//! or whose dictionary outgrows [`DICTIONARY_BYTES`], are written plain.
//!
//! What a reader sees is what Parquet's own writer makes of such a column: an optional
//! BYTE_ARRAY (UTF-8) column chunk of version 2 data pages (definition levels in the RLE /
//! bit-packed hybrid, values RLE_DICTIONARY or PLAIN, compressed with zstd level 1), a PLAIN
//! dictionary page first when there is a dictionary, chunk statistics (min, max, null count;
//! min and max cut to 64 bytes as Parquet's writer cuts them), a column index and an offset
//! index. The file writer splices each chunk into its row group, as it does the payload's.

use bytes::Bytes;
use parquet::basic::{Compression, Encoding, EncodingMask, PageType, Type, ZstdLevel};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::ByteArray;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{
    ColumnChunkMetaData, ColumnIndexBuilder, OffsetIndexBuilder, PageEncodingStats,
};
use parquet::file::statistics::{Statistics, ValueStatistics};
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

/// A dictionary larger than this (its PLAIN page, in bytes) is given up for the rest of
/// the chunk, which goes on in plain pages: Parquet's default dictionary page limit.
pub const DICTIONARY_BYTES: usize = 1 << 20;
/// A data page is closed at this many rows (Parquet's default: small enough for the page
/// index to skip most of a chunk)...
const PAGE_ROWS: usize = 20_000;
/// ...or at this many bytes of plain values.
const PAGE_BYTES: usize = 1 << 20;
/// Statistics and column index bounds longer than this are cut (as Parquet's writer does).
const STATS_BYTES: usize = 64;
const ZSTD_LEVEL: i32 = 1;

/// The chunk's dictionary: distinct values in first-seen order, as the PLAIN bytes of the
/// dictionary page (a 4-byte length, then the bytes), found through an open-addressing
/// table of entry numbers.
struct Dictionary {
    /// Entry number + 1 per slot, 0 for an empty slot; the length is a power of two.
    slots: Vec<u32>,
    /// Start and length of each entry's bytes in `page`.
    entries: Vec<(u32, u32)>,
    page: Vec<u8>,
    /// Per entry, the number (+ 1) of the last data page that used it.
    last_page: Vec<u32>,
}

impl Dictionary {
    fn new() -> Self {
        Self {
            slots: vec![0; 256],
            entries: Vec::new(),
            page: Vec::new(),
            last_page: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.slots.resize(256, 0);
        self.entries.clear();
        self.page.clear();
        self.last_page.clear();
    }

    fn value(&self, entry: u32) -> &[u8] {
        let (start, len) = self.entries[entry as usize];
        &self.page[start as usize..(start + len) as usize]
    }

    /// The entry of `v`, added if new.
    #[inline]
    fn intern(&mut self, v: &[u8]) -> u32 {
        let mask = self.slots.len() - 1;
        let mut at = hash(v) as usize & mask;
        loop {
            let slot = self.slots[at];
            if slot == 0 {
                break;
            }
            let (start, len) = self.entries[slot as usize - 1];
            if super::json_leaves::same_bytes(&self.page[start as usize..(start + len) as usize], v)
            {
                return slot - 1;
            }
            at = (at + 1) & mask;
        }
        let entry = self.entries.len() as u32;
        self.page.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.entries.push((self.page.len() as u32, v.len() as u32));
        self.page.extend_from_slice(v);
        self.last_page.push(0);
        self.slots[at] = entry + 1;
        if self.entries.len() * 2 > self.slots.len() {
            self.grow();
        }
        entry
    }

    fn grow(&mut self) {
        let size = self.slots.len() * 2;
        self.slots.clear();
        self.slots.resize(size, 0);
        for (e, &(start, len)) in self.entries.iter().enumerate() {
            let v = &self.page[start as usize..(start + len) as usize];
            let mut at = hash(v) as usize & (size - 1);
            while self.slots[at] != 0 {
                at = (at + 1) & (size - 1);
            }
            self.slots[at] = e as u32 + 1;
        }
    }

    /// The bit width of an entry number: as Parquet's writer computes it, at least 1.
    fn bit_width(&self) -> u8 {
        let n = self.entries.len() as u64;
        if n <= 1 {
            1
        } else {
            (64 - (n - 1).leading_zeros()) as u8
        }
    }
}

/// A hash of a value: its first and last 8 bytes (overlapping for short values, 4-byte
/// loads under 8) and its length, then every 8 bytes between them; one multiply to mix.
#[inline(always)]
fn hash(v: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let n = v.len();
    let word = |at: usize| u64::from_le_bytes(v[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| u32::from_le_bytes(v[at..at + 4].try_into().expect("4 bytes")) as u64;
    let mut h = match n {
        8.. => word(0) ^ word(n - 8).rotate_left(29),
        4..=7 => half(0) | (half(n - 4) << 32),
        1..=3 => (v[0] as u64) | ((v[n / 2] as u64) << 8) | ((v[n - 1] as u64) << 16),
        0 => 0,
    };
    let mut at = 8;
    while at + 8 < n {
        h = (h ^ word(at)).wrapping_mul(K).rotate_left(31);
        at += 8;
    }
    h ^= n as u64;
    let m = (h as u128).wrapping_mul(K as u128);
    (m as u64) ^ ((m >> 64) as u64)
}

/// Appends `values` (each below 2^`bit_width`) in Parquet's RLE / bit-packed hybrid
/// encoding: runs of 8 or more equal values as RLE runs, the rest in bit-packed groups of 8
/// (a bit-packed run that meets a long run takes the few values it needs from it to end on
/// a group of 8; the last group is padded with zeros).
pub(crate) fn rle_hybrid<T: Copy + Into<u32> + PartialEq>(
    values: &[T],
    bit_width: u8,
    out: &mut Vec<u8>,
) {
    let bw = bit_width as usize;
    let value_bytes = bw.div_ceil(8);
    let mut i = 0;
    while i < values.len() {
        let run = run_length(values, i);
        if run >= 8 {
            varint((run as u64) << 1, out);
            out.extend_from_slice(&values[i].into().to_le_bytes()[..value_bytes]);
            i += run;
            continue;
        }
        // Bit-packed: up to the next run of 8 or more that starts on a group boundary of
        // this run, or the end.
        let mut end = i;
        loop {
            end += 8;
            if end >= values.len() {
                break;
            }
            if run_length(values, end) >= 8 {
                break;
            }
        }
        let end = end.min(values.len());
        let groups = (end - i).div_ceil(8);
        varint(((groups as u64) << 1) | 1, out);
        let start = out.len();
        // Values are packed from the lowest bit up, 8 values to `bw` bytes.
        let mut acc = 0u64;
        let mut bits = 0usize;
        for &v in &values[i..end] {
            acc |= (v.into() as u64) << bits;
            bits += bw;
            while bits >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(acc as u8);
        }
        out.resize(start + groups * bw, 0);
        i = end;
    }
}

/// The number of values equal to `values[i]` from `i` on, counted up to 2^20.
#[inline]
fn run_length<T: Copy + PartialEq>(values: &[T], i: usize) -> usize {
    let v = values[i];
    let limit = values.len().min(i + (1 << 20));
    let mut j = i + 1;
    while j < limit && values[j] == v {
        j += 1;
    }
    j - i
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The length of the longest prefix of `v` (longer than [`STATS_BYTES`]) of at most
/// [`STATS_BYTES`] bytes that ends on a character boundary.
fn stats_cut(v: &[u8]) -> usize {
    let mut cut = STATS_BYTES;
    while cut > 0 && (v[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    cut
}

/// A lower bound of `v` of at most [`STATS_BYTES`] bytes (a prefix cut on a character
/// boundary), and whether it is `v` itself.
fn lower_bound(v: &[u8]) -> (Vec<u8>, bool) {
    if v.len() <= STATS_BYTES {
        return (v.to_vec(), true);
    }
    (v[..stats_cut(v)].to_vec(), false)
}

/// An upper bound of `v` of at most [`STATS_BYTES`] bytes (a prefix whose last character
/// that can be is incremented, keeping it UTF-8), and whether it is `v` itself.
fn upper_bound(v: &[u8]) -> (Vec<u8>, bool) {
    if v.len() <= STATS_BYTES {
        return (v.to_vec(), true);
    }
    if let Ok(prefix) = std::str::from_utf8(&v[..stats_cut(v)]) {
        for (at, c) in prefix.char_indices().rev() {
            if let Some(next) = char::from_u32(c as u32 + 1)
                && next.len_utf8() == c.len_utf8()
            {
                let mut out = prefix.as_bytes()[..at + c.len_utf8()].to_vec();
                next.encode_utf8(&mut out[at..]);
                return (out, false);
            }
        }
    }
    (v.to_vec(), true)
}

/// `a < b` in byte order, deciding on the first 8 bytes (one big-endian load each) when
/// they differ, which they mostly do for the high-cardinality values of plain columns.
#[inline(always)]
fn less(a: &[u8], b: &[u8]) -> bool {
    let head = |s: &[u8]| {
        if s.len() >= 8 {
            u64::from_be_bytes(s[..8].try_into().expect("8 bytes"))
        } else {
            let mut w = [0u8; 8];
            w[..s.len()].copy_from_slice(s);
            u64::from_be_bytes(w)
        }
    };
    let (x, y) = (head(a), head(b));
    if x != y { x < y } else { a < b }
}

/// The open data page.
#[derive(Default)]
struct OpenPage {
    /// 1 per row with a value, 0 per null.
    levels: Vec<u8>,
    /// Dictionary entries of the values (dictionary pages).
    keys: Vec<u32>,
    /// PLAIN values (plain pages).
    plain: Vec<u8>,
    /// Distinct dictionary entries used by the page.
    distinct: Vec<u32>,
    /// Smallest and largest value of a plain page, as ranges of `plain`.
    min: Option<(usize, usize)>,
    max: Option<(usize, usize)>,
    nulls: u32,
}

/// The open column chunk: its serialized data pages and what its metadata will say.
struct OpenChunk {
    pages: TrackedWrite<Vec<u8>>,
    /// Per data page: its offset in `pages`, its size and its rows.
    locations: Vec<(u64, i32, i64)>,
    index: ColumnIndexBuilder,
    dictionary_pages: i32,
    plain_pages: i32,
    rows: i64,
    nulls: u64,
    min: Option<Vec<u8>>,
    max: Option<Vec<u8>>,
    compressed: i64,
    uncompressed: i64,
    /// Whether the chunk's pages use the dictionary (it falls back to plain at most once).
    dictionary: bool,
}

impl OpenChunk {
    fn new(dictionary: bool) -> Self {
        Self {
            pages: TrackedWrite::new(Vec::new()),
            locations: Vec::new(),
            index: ColumnIndexBuilder::new(Type::BYTE_ARRAY),
            dictionary_pages: 0,
            plain_pages: 0,
            rows: 0,
            nulls: 0,
            min: None,
            max: None,
            compressed: 0,
            uncompressed: 0,
            dictionary,
        }
    }

    fn widen(&mut self, min: &[u8], max: &[u8]) {
        if self.min.as_deref().is_none_or(|m| min < m) {
            self.min = Some(min.to_vec());
        }
        if self.max.as_deref().is_none_or(|m| max > m) {
            self.max = Some(max.to_vec());
        }
    }
}

/// Writes one optional UTF-8 column of a file's row groups, one chunk at a time.
pub struct StringColumn {
    descr: ColumnDescPtr,
    /// Whether chunks start with a dictionary.
    dictionary: bool,
    dict: Dictionary,
    page: OpenPage,
    chunk: OpenChunk,
    /// Encoded levels and values of the page being flushed; reused.
    levels_buf: Vec<u8>,
    values_buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl StringColumn {
    /// A writer for the column `descr`; `dictionary` is false for the columns written
    /// plain from the start.
    pub fn new(descr: ColumnDescPtr, dictionary: bool) -> Self {
        Self {
            descr,
            dictionary,
            dict: Dictionary::new(),
            page: OpenPage::default(),
            chunk: OpenChunk::new(dictionary),
            levels_buf: Vec::new(),
            values_buf: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Rows in the open chunk so far (flushed pages and the open page).
    pub fn rows(&self) -> usize {
        self.chunk.rows as usize + self.page.levels.len()
    }

    /// Appends nulls up to row `rows` of the open chunk.
    #[inline]
    pub fn pad_to(&mut self, rows: usize, zstd: &mut zstd::bulk::Compressor<'_>) -> Result<()> {
        while self.rows() < rows {
            let room = PAGE_ROWS - self.page.levels.len();
            let n = (rows - self.rows()).min(room);
            self.page.levels.extend(std::iter::repeat_n(0, n));
            self.page.nulls += n as u32;
            if self.page.levels.len() >= PAGE_ROWS {
                self.flush_page(zstd)?;
            }
        }
        Ok(())
    }

    /// Appends a null.
    pub fn push_null(&mut self, zstd: &mut zstd::bulk::Compressor<'_>) -> Result<()> {
        let rows = self.rows() + 1;
        self.pad_to(rows, zstd)
    }

    /// Appends a value.
    #[inline]
    pub fn push(&mut self, v: &[u8], zstd: &mut zstd::bulk::Compressor<'_>) -> Result<()> {
        let page = &mut self.page;
        if page.levels.capacity() == 0 {
            page.levels.reserve(PAGE_ROWS);
        }
        page.levels.push(1);
        if self.chunk.dictionary {
            let key = self.dict.intern(v);
            let serial = self.chunk.locations.len() as u32 + 1;
            let last = &mut self.dict.last_page[key as usize];
            if *last != serial {
                *last = serial;
                page.distinct.push(key);
            }
            if page.keys.capacity() == 0 {
                page.keys.reserve(PAGE_ROWS);
            }
            page.keys.push(key);
            if self.dict.page.len() > DICTIONARY_BYTES {
                // Too many distinct values: this page ends with the dictionary, the next
                // ones are plain.
                self.flush_page(zstd)?;
                self.chunk.dictionary = false;
                return Ok(());
            }
        } else {
            if page.plain.capacity() == 0 {
                // Room for a page of values about this long: regrowing a buffer of up to
                // 1 MiB copied it ~5 times (a writer's buffers live for one file).
                page.plain
                    .reserve(((v.len() + 4) * PAGE_ROWS).min(PAGE_BYTES) + v.len() + 4);
            }
            let start = page.plain.len() + 4;
            page.plain
                .extend_from_slice(&(v.len() as u32).to_le_bytes());
            page.plain.extend_from_slice(v);
            let range = (start, v.len());
            let at = |r: (usize, usize)| &page.plain[r.0..r.0 + r.1];
            if page.min.is_none_or(|m| less(v, at(m))) {
                page.min = Some(range);
            }
            if page.max.is_none_or(|m| less(at(m), v)) {
                page.max = Some(range);
            }
        }
        if page.levels.len() >= PAGE_ROWS || page.plain.len() >= PAGE_BYTES {
            self.flush_page(zstd)?;
        }
        Ok(())
    }

    /// Encodes, compresses and serializes the open page into the chunk.
    fn flush_page(&mut self, zstd: &mut zstd::bulk::Compressor<'_>) -> Result<()> {
        let rows = self.page.levels.len();
        if rows == 0 {
            return Ok(());
        }
        let page = &mut self.page;
        let chunk = &mut self.chunk;
        let values = rows - page.nulls as usize;
        self.levels_buf.clear();
        rle_hybrid(&page.levels, 1, &mut self.levels_buf);
        self.values_buf.clear();
        // A page without values is PLAIN (and empty): no reader needs a dictionary for it.
        let dictionary = chunk.dictionary && values > 0;
        let bounds = if dictionary {
            let bw = self.dict.bit_width();
            self.values_buf.push(bw);
            rle_hybrid(&page.keys, bw, &mut self.values_buf);
            let mut distinct = page.distinct.iter().map(|&e| self.dict.value(e));
            let first = distinct.next().expect("a page with values uses an entry");
            let (min, max) = distinct.fold((first, first), |(lo, hi), v| {
                (if v < lo { v } else { lo }, if v > hi { v } else { hi })
            });
            Some((min, max))
        } else {
            self.values_buf.extend_from_slice(&page.plain);
            page.min.zip(page.max).map(|(lo, hi)| {
                (
                    &page.plain[lo.0..lo.0 + lo.1],
                    &page.plain[hi.0..hi.0 + hi.1],
                )
            })
        };
        match bounds {
            Some((min, max)) => {
                chunk.index.append(
                    false,
                    lower_bound(min).0,
                    upper_bound(max).0,
                    page.nulls as i64,
                );
                chunk.widen(min, max);
            }
            None => chunk
                .index
                .append(true, Vec::new(), Vec::new(), page.nulls as i64),
        }
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(self.values_buf.len()));
        zstd.compress_to_buffer(&self.values_buf, &mut self.scratch)
            .map_err(zstd_error)?;
        let is_compressed = self.scratch.len() < self.values_buf.len();
        let mut buf = Vec::with_capacity(
            self.levels_buf.len()
                + if is_compressed {
                    self.scratch.len()
                } else {
                    self.values_buf.len()
                },
        );
        buf.extend_from_slice(&self.levels_buf);
        buf.extend_from_slice(if is_compressed {
            &self.scratch
        } else {
            &self.values_buf
        });
        let encoding = if dictionary {
            Encoding::RLE_DICTIONARY
        } else {
            Encoding::PLAIN
        };
        let data_page = Page::DataPageV2 {
            buf: Bytes::from(buf),
            num_values: rows as u32,
            encoding,
            num_nulls: page.nulls,
            num_rows: rows as u32,
            def_levels_byte_len: self.levels_buf.len() as u32,
            rep_levels_byte_len: 0,
            is_compressed,
            statistics: None,
        };
        let spec = SerializedPageWriter::new(&mut chunk.pages).write_page(CompressedPage::new(
            data_page,
            self.levels_buf.len() + self.values_buf.len(),
        ))?;
        chunk
            .locations
            .push((spec.offset, spec.compressed_size as i32, rows as i64));
        if dictionary {
            chunk.dictionary_pages += 1;
        } else {
            chunk.plain_pages += 1;
        }
        chunk.rows += rows as i64;
        chunk.nulls += page.nulls as u64;
        chunk.compressed += spec.compressed_size as i64;
        chunk.uncompressed += spec.uncompressed_size as i64;
        page.levels.clear();
        page.keys.clear();
        page.plain.clear();
        page.distinct.clear();
        page.min = None;
        page.max = None;
        page.nulls = 0;
        Ok(())
    }

    /// Closes the open chunk: its bytes (the dictionary page, if any, then the data pages)
    /// and its close result (offsets relative to the bytes), for
    /// `SerializedRowGroupWriter::append_column`.
    pub fn close_chunk(
        &mut self,
        zstd: &mut zstd::bulk::Compressor<'_>,
    ) -> Result<(Bytes, ColumnCloseResult)> {
        self.flush_page(zstd)?;
        let chunk = std::mem::replace(&mut self.chunk, OpenChunk::new(self.dictionary));
        let mut out = TrackedWrite::new(Vec::with_capacity(
            self.dict.page.len() / 2 + chunk.pages.bytes_written(),
        ));
        let mut compressed = chunk.compressed;
        let mut uncompressed = chunk.uncompressed;
        let dictionary_page = chunk.dictionary_pages > 0;
        if dictionary_page {
            self.scratch.clear();
            self.scratch
                .reserve(zstd::zstd_safe::compress_bound(self.dict.page.len()));
            zstd.compress_to_buffer(&self.dict.page, &mut self.scratch)
                .map_err(zstd_error)?;
            // Unlike a v2 data page, a dictionary page has no flag for "stored as is".
            let page = Page::DictionaryPage {
                buf: Bytes::copy_from_slice(&self.scratch),
                num_values: self.dict.entries.len() as u32,
                encoding: Encoding::PLAIN,
                is_sorted: false,
            };
            let spec = SerializedPageWriter::new(&mut out)
                .write_page(CompressedPage::new(page, self.dict.page.len()))?;
            compressed += spec.compressed_size as i64;
            uncompressed += spec.uncompressed_size as i64;
        }
        self.dict.clear();
        let shift = out.bytes_written() as i64;
        let mut offsets = OffsetIndexBuilder::new();
        for &(offset, size, rows) in &chunk.locations {
            offsets.append_offset_and_size(offset as i64 + shift, size);
            offsets.append_row_count(rows);
        }
        let pages = chunk.pages.into_inner()?;
        std::io::Write::write_all(&mut out, &pages)?;
        let mut encodings = vec![Encoding::PLAIN, Encoding::RLE];
        let mut page_stats = Vec::new();
        if dictionary_page {
            encodings.push(Encoding::RLE_DICTIONARY);
            page_stats.push(PageEncodingStats {
                page_type: PageType::DICTIONARY_PAGE,
                encoding: Encoding::PLAIN,
                count: 1,
            });
            page_stats.push(PageEncodingStats {
                page_type: PageType::DATA_PAGE_V2,
                encoding: Encoding::RLE_DICTIONARY,
                count: chunk.dictionary_pages,
            });
        }
        if chunk.plain_pages > 0 {
            page_stats.push(PageEncodingStats {
                page_type: PageType::DATA_PAGE_V2,
                encoding: Encoding::PLAIN,
                count: chunk.plain_pages,
            });
        }
        let statistics = match (&chunk.min, &chunk.max) {
            (Some(min), Some(max)) => {
                let (min, min_exact) = lower_bound(min);
                let (max, max_exact) = upper_bound(max);
                ValueStatistics::new(
                    Some(ByteArray::from(min)),
                    Some(ByteArray::from(max)),
                    None,
                    Some(chunk.nulls),
                    false,
                )
                .with_min_is_exact(min_exact)
                .with_max_is_exact(max_exact)
            }
            _ => ValueStatistics::new(None, None, None, Some(chunk.nulls), false),
        };
        let metadata = ColumnChunkMetaData::builder(self.descr.clone())
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
            .set_encodings_mask(EncodingMask::new_from_encodings(encodings.iter()))
            .set_page_encoding_stats(page_stats)
            .set_total_compressed_size(compressed)
            .set_total_uncompressed_size(uncompressed)
            .set_num_values(chunk.rows)
            .set_dictionary_page_offset(dictionary_page.then_some(0))
            .set_data_page_offset(shift)
            .set_statistics(Statistics::ByteArray(statistics))
            .build()?;
        let column_index = chunk.index.build()?;
        Ok((
            Bytes::from(out.into_inner()?),
            ColumnCloseResult {
                bytes_written: compressed as u64,
                rows_written: chunk.rows as u64,
                metadata,
                bloom_filter: None,
                column_index: Some(column_index),
                offset_index: Some(offsets.build()),
            },
        ))
    }
}

fn zstd_error(e: std::io::Error) -> ParquetError {
    ParquetError::General(format!("zstd, string column: {e}"))
}

/// A zstd compressor at the level of the archive's other columns.
pub fn compressor() -> Result<zstd::bulk::Compressor<'static>> {
    zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(zstd_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::parquet::{FileWriter, ROW_GROUP_ROWS, Row, file_schema};
    use crate::archive::schema::{ColumnType, Scalar};
    use crate::bus::Event;
    use arrow::array::{AsArray, RecordBatch};
    use parquet::arrow::arrow_reader::{
        ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
    };
    use parquet::file::metadata::PageIndexPolicy;
    use parquet::file::page_index::column_index::ColumnIndexMetaData;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use std::borrow::Cow;

    /// The file's inferred columns: `low` (a few values, unicode, empty, nulls in runs of
    /// every length), `unique` (every value distinct and ~100 bytes: its dictionary outgrows
    /// its limit mid-chunk), `sparse` (null but for a few rows: whole pages without values),
    /// `mixed` (numbers and booleans widened to their text), `plain` (written plain from the
    /// start) and `n` (an integer column, still Arrow's).
    const COLUMNS: [(&str, ColumnType); 6] = [
        ("low", ColumnType::Utf8),
        ("n", ColumnType::Int64),
        ("unique", ColumnType::Utf8),
        ("sparse", ColumnType::Utf8),
        ("mixed", ColumnType::Utf8),
        ("plain", ColumnType::Utf8),
    ];

    fn value(col: usize, i: usize) -> Option<Scalar<'static>> {
        let text = |s: String| Some(Scalar::Str(Cow::Owned(s)));
        match col {
            0 => {
                // Nulls in runs of 0..=12 rows, every 13th block.
                if (i / 7) % 13 == 3 || i.is_multiple_of(11) {
                    None
                } else {
                    text(["a", "", "zäh \u{1F600}", "b\"q", "plan-pro"][i % 5].to_string())
                }
            }
            1 => Some(Scalar::Int(i as i64)),
            // Distinct from the first bytes on, so that bounds cut to 64 bytes still tell
            // pages apart.
            2 => text(format!(
                "{:032x}{}-{i}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834),
                "u".repeat(60)
            )),
            3 => (i % 9_000 == 17).then(|| Scalar::Str(Cow::Owned(format!("s{i}")))),
            4 => match i % 3 {
                0 => Some(Scalar::Int(i as i64 - 5)),
                1 => Some(Scalar::Bool(i.is_multiple_of(2))),
                _ => text(format!("t{}", i % 40)),
            },
            _ if i.is_multiple_of(3) => text(format!("{}{}", "\u{FFFF}".repeat(30), i % 1000)),
            _ => text(format!("{:04}-{}", i % 9973, "é".repeat(40))),
        }
    }

    fn expected(col: usize, i: usize) -> Option<String> {
        value(col, i).map(|v| v.as_text())
    }

    fn write_file(n: usize) -> bytes::Bytes {
        let events: Vec<Event> = (0..n)
            .map(|i| Event {
                id: format!("ev{i:07}"),
                payload: bytes::Bytes::from_static(b"{}"),
                content_type: "application/json".into(),
                ..Default::default()
            })
            .collect();
        let fields: Vec<Vec<(u32, Scalar<'_>)>> = (0..events.len())
            .map(|i| {
                (0..COLUMNS.len())
                    .filter_map(|c| value(c, i).map(|v| (c as u32, v)))
                    .collect()
            })
            .collect();
        let rows = Row::zip(&events, &fields);
        let schema = file_schema(&COLUMNS);
        let slots = (0..COLUMNS.len() as u32).map(Some).collect();
        let mut w = FileWriter::with_capacity(schema, slots, 1 << 20, &["plain".into()]).unwrap();
        // Uneven chunks, so that chunks straddle pages and the row group boundary.
        for chunk in rows.chunks(777) {
            w.write(chunk).unwrap();
        }
        w.finish().unwrap()
    }

    fn read(file: bytes::Bytes, selection: Option<RowSelection>) -> Vec<RecordBatch> {
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let mut builder =
            ParquetRecordBatchReaderBuilder::try_new_with_options(file, options).unwrap();
        if let Some(selection) = selection {
            builder = builder.with_row_selection(selection);
        }
        builder.build().unwrap().map(|b| b.unwrap()).collect()
    }

    /// The string columns of `batches`, by name, as owned options.
    fn strings(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
        batches
            .iter()
            .flat_map(|b| {
                b.column_by_name(name)
                    .unwrap()
                    .as_string::<i32>()
                    .iter()
                    .map(|v| v.map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn check_all(batches: &[RecordBatch], rows: &[usize]) {
        for (c, (name, ty)) in COLUMNS.iter().enumerate() {
            if *ty != ColumnType::Utf8 {
                continue;
            }
            let got = strings(batches, name);
            assert_eq!(got.len(), rows.len(), "{name}");
            for (k, &i) in rows.iter().enumerate() {
                assert_eq!(got[k], expected(c, i), "column {name}, row {i}");
            }
        }
    }

    #[test]
    fn values_and_nulls_come_back_across_pages_row_groups_and_a_dictionary_overflow() {
        let n = ROW_GROUP_ROWS + 5000;
        let file = write_file(n);
        check_all(&read(file.clone(), None), &(0..n).collect::<Vec<_>>());

        let reader = SerializedFileReader::new(file).unwrap();
        let meta = reader.metadata();
        assert_eq!(meta.num_row_groups(), 2);
        let schema = meta.file_metadata().schema_descr();
        let column = |name: &str| {
            (0..schema.num_columns())
                .find(|&i| schema.column(i).name() == name)
                .unwrap()
        };
        for g in 0..2 {
            let encodings = |name: &str| {
                let mut pages = Vec::new();
                for page in reader
                    .get_row_group(g)
                    .unwrap()
                    .get_column_page_reader(column(name))
                    .unwrap()
                {
                    let page = page.unwrap();
                    pages.push((page.page_type(), page.encoding()));
                }
                pages
            };
            let low = encodings("low");
            assert_eq!(
                low[0],
                (PageType::DICTIONARY_PAGE, Encoding::PLAIN),
                "{low:?}"
            );
            assert!(
                low[1..]
                    .iter()
                    .all(|p| *p == (PageType::DATA_PAGE_V2, Encoding::RLE_DICTIONARY))
            );
            // `unique`: a dictionary, pages that use it, then plain pages once it is full
            // (the second row group's 5,000 values fit in one dictionary).
            let unique = encodings("unique");
            assert_eq!(unique[0].0, PageType::DICTIONARY_PAGE);
            assert_eq!(
                unique[1],
                (PageType::DATA_PAGE_V2, Encoding::RLE_DICTIONARY),
                "{unique:?}"
            );
            let fell_back = unique.contains(&(PageType::DATA_PAGE_V2, Encoding::PLAIN));
            assert_eq!(fell_back, g == 0, "{unique:?}");
            let plain = encodings("plain");
            assert!(
                plain
                    .iter()
                    .all(|p| *p == (PageType::DATA_PAGE_V2, Encoding::PLAIN)),
                "{plain:?}"
            );
        }
    }

    /// Chunk statistics and the column index bound every value of their chunk and page,
    /// count its nulls, and mark pages without values.
    #[test]
    fn statistics_and_the_column_index_bound_the_values() {
        let n = ROW_GROUP_ROWS + 5000;
        let file = write_file(n);
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let builder =
            ParquetRecordBatchReaderBuilder::try_new_with_options(file.clone(), options).unwrap();
        let meta = builder.metadata().clone();
        let batches = read(file, None);
        let schema = meta.file_metadata().schema_descr();
        let mut empty_pages = 0;
        for (name, ty) in COLUMNS.iter() {
            if *ty != ColumnType::Utf8 {
                continue;
            }
            let col = (0..schema.num_columns())
                .find(|&i| schema.column(i).name() == *name)
                .unwrap();
            let values = strings(&batches, name);
            let mut first = 0usize;
            for g in 0..meta.num_row_groups() {
                let rows = meta.row_group(g).num_rows() as usize;
                let chunk = &values[first..first + rows];
                let stats = meta.row_group(g).column(col).statistics().unwrap();
                let Statistics::ByteArray(stats) = stats else {
                    panic!("{stats:?}")
                };
                assert_eq!(
                    stats.null_count_opt(),
                    Some(chunk.iter().filter(|v| v.is_none()).count() as u64),
                    "{name}"
                );
                let present: Vec<&[u8]> = chunk.iter().flatten().map(|v| v.as_bytes()).collect();
                if let (Some(lo), Some(hi)) = (present.iter().min(), present.iter().max()) {
                    let (min, max) = (
                        stats.min_opt().unwrap().data(),
                        stats.max_opt().unwrap().data(),
                    );
                    assert!(min <= *lo && max >= *hi, "{name}: {min:?}..{max:?}");
                    // A long maximum stays whole when no character of its cut can be
                    // incremented (`plain`: U+FFFF cannot become a 4-byte character).
                    assert!(min.len() <= STATS_BYTES, "{name}");
                    assert!(max.len() <= STATS_BYTES || max == *hi, "{name}");
                    assert!(std::str::from_utf8(max).is_ok(), "{name}: max is not UTF-8");
                    if hi.len() <= STATS_BYTES {
                        assert_eq!(max, *hi, "{name}");
                        assert!(stats.max_is_exact());
                    }
                    if lo.len() <= STATS_BYTES {
                        assert_eq!(min, *lo, "{name}");
                    }
                }
                let index = &meta.column_index().unwrap()[g][col];
                let ColumnIndexMetaData::BYTE_ARRAY(index) = index else {
                    panic!("{name}: {index:?}")
                };
                let locations = &meta.offset_index().unwrap()[g][col].page_locations;
                for (p, loc) in locations.iter().enumerate() {
                    let start = loc.first_row_index as usize;
                    let end = locations
                        .get(p + 1)
                        .map_or(rows, |l| l.first_row_index as usize);
                    let page = &chunk[start..end];
                    let nulls = page.iter().filter(|v| v.is_none()).count();
                    assert_eq!(index.null_count(p), Some(nulls as i64), "{name} page {p}");
                    if nulls == page.len() {
                        empty_pages += 1;
                        assert!(index.min_value(p).is_none(), "{name} page {p}");
                        continue;
                    }
                    let (min, max) = (index.min_value(p).unwrap(), index.max_value(p).unwrap());
                    for v in page.iter().flatten() {
                        let (min, max): (&[u8], &[u8]) = (min, max);
                        assert!(
                            min <= v.as_bytes() && max >= v.as_bytes(),
                            "{name} page {p}"
                        );
                    }
                }
                first += rows;
            }
            assert_eq!(first, values.len());
        }
        assert!(
            empty_pages > 0,
            "the sparse column has pages without values"
        );
    }

    #[test]
    fn a_reader_that_skips_pages_by_the_index_gets_the_right_rows() {
        let n = ROW_GROUP_ROWS + 5000;
        let file = write_file(n);
        let selection = RowSelection::from(vec![
            RowSelector::skip(20_003),
            RowSelector::select(10),
            RowSelector::skip(ROW_GROUP_ROWS - 20_013 + 3000),
            RowSelector::select(1500),
        ]);
        let mut rows: Vec<usize> = (20_003..20_013).collect();
        rows.extend(ROW_GROUP_ROWS + 3000..ROW_GROUP_ROWS + 4500);
        check_all(&read(file, Some(selection)), &rows);
    }

    #[test]
    fn record_batches_rewritten_by_compaction_keep_their_strings() {
        let n = 30_000;
        let batches = read(write_file(n), None);
        let mut w = FileWriter::new(batches[0].schema(), Vec::new()).unwrap();
        for b in &batches {
            w.write_batch(b).unwrap();
        }
        check_all(
            &read(w.finish().unwrap(), None),
            &(0..n).collect::<Vec<_>>(),
        );
    }

    #[test]
    fn bounds_cut_long_values_and_stay_bounds() {
        let long = "é".repeat(40); // 80 bytes
        let (lo, exact) = lower_bound(long.as_bytes());
        assert!(!exact && lo.len() <= STATS_BYTES && long.as_bytes().starts_with(&lo));
        assert!(std::str::from_utf8(&lo).is_ok());
        let (hi, exact) = upper_bound(long.as_bytes());
        assert!(!exact && hi.len() <= STATS_BYTES && hi.as_slice() > long.as_bytes());
        assert!(std::str::from_utf8(&hi).is_ok());
        // Nothing can be incremented: the value itself is the bound.
        let top = "\u{10FFFF}".repeat(20);
        assert_eq!(upper_bound(top.as_bytes()), (top.as_bytes().to_vec(), true));
        assert_eq!(upper_bound(b"short"), (b"short".to_vec(), true));
    }

    #[test]
    fn the_hash_table_finds_every_value_after_growing() {
        let mut d = Dictionary::new();
        let values: Vec<String> = (0..5000)
            .map(|i| format!("{}{i}", "x".repeat(i % 40)))
            .collect();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(d.intern(v.as_bytes()), i as u32);
        }
        for (i, v) in values.iter().enumerate() {
            assert_eq!(d.intern(v.as_bytes()), i as u32);
            assert_eq!(d.value(i as u32), v.as_bytes());
        }
        assert_eq!(d.entries.len(), 5000);
    }
}
