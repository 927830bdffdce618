//! Decoding of bus records (`BusBatch`, protobuf) on the consumers' hot path.
//!
//! prost's generated decoder reads through the generic `Buf` trait: every varint, key and
//! length goes through `Bytes`' cursor bookkeeping, which made decoding ~4 % of the archiver's
//! CPU (docs/benchmarks.md, "The bulk arena"). [`decode_batch`] reads the layout prost itself
//! writes (fields of the known wire types, varints of at most 10 bytes, unknown fields of
//! the plain wire types) straight from a byte slice; payloads stay slices of the record,
//! without a copy. Anything else (groups, a known field with another wire type, a truncated or
//! malformed record) is handed to prost, so that what is accepted, what is refused and the
//! error a refused record gets are prost's own.

use bytes::Bytes;

use super::{BusBatch, Event};

/// Decodes a record as prost does (see the module doc); the error is prost's.
pub fn decode_batch(bytes: Bytes) -> Result<BusBatch, prost::DecodeError> {
    match fast(&bytes) {
        Some(batch) => Ok(batch),
        None => prost::Message::decode(bytes),
    }
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

struct Reader<'b> {
    buf: &'b [u8],
    at: usize,
}

impl<'b> Reader<'b> {
    #[inline]
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let b = *self.buf.get(self.at)?;
            self.at += 1;
            if i == 9 && b > 1 {
                return None; // more than 64 bits
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(value);
            }
        }
        None
    }

    /// The next field's number and wire type.
    #[inline]
    fn key(&mut self) -> Option<(u64, u8)> {
        let key = self.varint()?;
        let field = key >> 3;
        (field != 0 && field <= u64::from(u32::MAX >> 3)).then_some((field, (key & 7) as u8))
    }

    /// The range of the next length-delimited value.
    #[inline]
    fn span(&mut self) -> Option<std::ops::Range<usize>> {
        let len = usize::try_from(self.varint()?).ok()?;
        let start = self.at;
        let end = start.checked_add(len).filter(|&e| e <= self.buf.len())?;
        self.at = end;
        Some(start..end)
    }

    #[inline]
    fn string(&mut self) -> Option<String> {
        let span = self.span()?;
        simdutf8::basic::from_utf8(&self.buf[span])
            .ok()
            .map(str::to_owned)
    }

    /// Steps over a field of a plain wire type (not a group).
    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            VARINT => self.varint().map(drop),
            LEN => self.span().map(drop),
            FIXED64 | FIXED32 => {
                let n = if wire == FIXED64 { 8 } else { 4 };
                self.at = self.at.checked_add(n).filter(|&e| e <= self.buf.len())?;
                Some(())
            }
            _ => None,
        }
    }

    fn done(&self) -> bool {
        self.at >= self.buf.len()
    }
}

fn fast(bytes: &Bytes) -> Option<BusBatch> {
    let mut r = Reader { buf: bytes, at: 0 };
    let mut batch = BusBatch::default();
    while !r.done() {
        match r.key()? {
            (1, LEN) => batch.team_id = r.string()?,
            (2, LEN) => batch.collection_id = r.string()?,
            (3, LEN) => {
                let span = r.span()?;
                batch.events.push(event(bytes, span)?);
            }
            (1..=3, _) => return None,
            (_, wire) => r.skip(wire)?,
        }
    }
    Some(batch)
}

fn event(bytes: &Bytes, span: std::ops::Range<usize>) -> Option<Event> {
    let mut r = Reader {
        buf: &bytes[..span.end],
        at: span.start,
    };
    let mut e = Event::default();
    while !r.done() {
        match r.key()? {
            (1, LEN) => e.id = r.string()?,
            (2, VARINT) => e.received_at_micros = r.varint()? as i64,
            (3, LEN) => {
                let entry = r.span()?;
                let (k, v) = header(&bytes[..entry.end], entry.start)?;
                e.headers.insert(k, v);
            }
            (4, LEN) => e.payload = bytes.slice(r.span()?),
            (5, LEN) => e.content_type = r.string()?,
            (6, LEN) => e.client_id = r.string()?,
            (1..=6, _) => return None,
            (_, wire) => r.skip(wire)?,
        }
    }
    Some(e)
}

/// A `map<string, string>` entry: key 1, value 2, either missing meaning empty.
fn header(buf: &[u8], start: usize) -> Option<(String, String)> {
    let mut r = Reader { buf, at: start };
    let (mut k, mut v) = (String::new(), String::new());
    while !r.done() {
        match r.key()? {
            (1, LEN) => k = r.string()?,
            (2, LEN) => v = r.string()?,
            (1..=2, _) => return None,
            (_, wire) => r.skip(wire)?,
        }
    }
    Some((k, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use rand::{Rng, SeedableRng};

    fn text(rng: &mut impl Rng) -> String {
        let pool = ["", "a", "application/json", "é", "🎉", "k\"ey", "01JF2X"];
        (0..rng.random_range(0..4))
            .map(|_| pool[rng.random_range(0..pool.len())])
            .collect()
    }

    fn random_batch(rng: &mut impl Rng) -> BusBatch {
        BusBatch {
            team_id: text(rng),
            collection_id: text(rng),
            events: (0..rng.random_range(0..6))
                .map(|_| Event {
                    id: text(rng),
                    received_at_micros: match rng.random_range(0..4) {
                        0 => 0,
                        1 => -rng.random_range(1..i64::MAX),
                        2 => i64::MAX,
                        _ => rng.random_range(0..1 << 52),
                    },
                    headers: (0..rng.random_range(0..3))
                        .map(|_| (text(rng), text(rng)))
                        .collect(),
                    payload: (0..rng.random_range(0..300))
                        .map(|_| rng.random::<u8>())
                        .collect::<Vec<u8>>()
                        .into(),
                    content_type: text(rng),
                    client_id: text(rng),
                })
                .collect(),
        }
    }

    /// Appends a field of an unknown number (7..=20) of a plain wire type.
    fn unknown_field(rng: &mut impl Rng, out: &mut Vec<u8>) {
        let field = rng.random_range(7..=20u64);
        match rng.random_range(0..4) {
            0 => {
                prost::encoding::encode_key(field as u32, prost::encoding::WireType::Varint, out);
                prost::encoding::encode_varint(rng.random(), out);
            }
            1 => {
                prost::encoding::encode_key(
                    field as u32,
                    prost::encoding::WireType::LengthDelimited,
                    out,
                );
                prost::encoding::encode_varint(3, out);
                out.extend_from_slice(b"xyz");
            }
            2 => {
                prost::encoding::encode_key(
                    field as u32,
                    prost::encoding::WireType::SixtyFourBit,
                    out,
                );
                out.extend_from_slice(&[7; 8]);
            }
            _ => {
                prost::encoding::encode_key(
                    field as u32,
                    prost::encoding::WireType::ThirtyTwoBit,
                    out,
                );
                out.extend_from_slice(&[7; 4]);
            }
        }
    }

    fn same_as_prost(bytes: &[u8]) -> bool {
        let ours = decode_batch(Bytes::copy_from_slice(bytes));
        let theirs = BusBatch::decode(Bytes::copy_from_slice(bytes));
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }

    #[test]
    fn reads_what_prost_writes_without_falling_back() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2_000 {
            let batch = random_batch(&mut rng);
            let bytes = Bytes::from(batch.encode_to_vec());
            let read = fast(&bytes).expect("prost's own layout is read by the fast path");
            assert_eq!(read, batch);
            // Payloads are slices of the record, not copies.
            for e in &read.events {
                if !e.payload.is_empty() {
                    let p = e.payload.as_ptr() as usize;
                    let b = bytes.as_ptr() as usize;
                    assert!(p >= b && p + e.payload.len() <= b + bytes.len());
                }
            }
        }
    }

    #[test]
    fn unknown_fields_repeats_and_order_are_read_as_prost_reads_them() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..2_000 {
            // Two batches' encodings concatenated: scalars of the second win, events add up,
            // as in any protobuf decoder; unknown fields in between are skipped.
            let mut bytes = random_batch(&mut rng).encode_to_vec();
            unknown_field(&mut rng, &mut bytes);
            bytes.extend(random_batch(&mut rng).encode_to_vec());
            // An event with its fields reversed, an unknown field and an id given twice.
            let e = &random_batch(&mut rng);
            if let Some(ev) = e.events.first() {
                let mut inner = Vec::new();
                unknown_field(&mut rng, &mut inner);
                // Last field first; the id comes twice and the last one wins.
                use prost::encoding::{bytes as payload, int64, string};
                string::encode(1, &"second".to_string(), &mut inner);
                string::encode(5, &ev.content_type, &mut inner);
                payload::encode(4, &ev.payload, &mut inner);
                int64::encode(2, &ev.received_at_micros, &mut inner);
                string::encode(1, &ev.id, &mut inner);
                prost::encoding::encode_key(
                    3,
                    prost::encoding::WireType::LengthDelimited,
                    &mut bytes,
                );
                prost::encoding::encode_varint(inner.len() as u64, &mut bytes);
                bytes.extend(inner);
            }
            assert!(fast(&Bytes::from(bytes.clone())).is_some());
            assert!(same_as_prost(&bytes));
        }
    }

    #[test]
    fn damaged_records_get_prosts_answer() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut refused = 0;
        for _ in 0..500 {
            let good = random_batch(&mut rng).encode_to_vec();
            // Every truncation.
            for n in 0..good.len() {
                assert!(same_as_prost(&good[..n]), "cut at {n} of {good:?}");
            }
            // Random byte changes (wire types, lengths, varints, UTF-8 all get hit).
            for _ in 0..20 {
                let mut bad = good.clone();
                if bad.is_empty() {
                    break;
                }
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..bad.len());
                    bad[i] = rng.random();
                }
                refused += BusBatch::decode(&bad[..]).is_err() as usize;
                assert!(same_as_prost(&bad), "{bad:?}");
            }
        }
        assert!(
            refused > 1_000,
            "the corruptions must exercise refusals: {refused}"
        );
        // Groups and a known field of another wire type go to prost, which decides.
        for bytes in [
            vec![0x1b, 0x1c],             // field 3 as a group start, then its end
            vec![0x08, 0x01],             // team_id as a varint
            vec![0x1a, 0x02, 0x10, 0x05], // an event whose received_at is fine
            vec![0x1a, 0x02, 0x0a, 0x80], // an event whose id's length runs past it
            vec![0x0a, 0x02, 0xc3, 0x28], // invalid UTF-8 in team_id
            vec![0xff; 11],               // a varint too long
        ] {
            assert!(same_as_prost(&bytes), "{bytes:?}");
        }
    }
}
