//! The batch buffer that carries events across the WASM boundary (layout in
//! `plugin-sdk/wit/plugin.wit`): one `list<u8>` per batch instead of a list of records, so a
//! call copies one buffer each way, and [`BatchReader`] hands out borrowed [`Event`] views
//! without allocating. Used by the SDK inside plugins and by the gateway's host.

/// One event, borrowed from a batch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// The event's ULID as text (empty on an output event that keeps its input's id).
    pub id: &'a str,
    /// Microseconds since the Unix epoch (UTC).
    pub received_at: i64,
    headers: &'a [u8],
    header_count: u16,
    /// The payload bytes, exactly as received.
    pub payload: &'a [u8],
}

impl<'a> Event<'a> {
    /// The event's headers as `(name, value)` pairs.
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            buf: self.headers,
            left: self.header_count,
        }
    }

    /// The value of the first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

/// Iterator over an event's headers.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    buf: &'a [u8],
    left: u16,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, &'a str);
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut r = Cursor { buf: self.buf };
        // Validated when the event was read.
        let n = r.str().ok()?;
        let v = r.str().ok()?;
        self.buf = r.buf;
        Some((n, v))
    }
}

/// A buffer that does not follow the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed event batch: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1, "truncated tag")?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2, "truncated header count")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4, "truncated length")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8, "truncated timestamp")?;
        Ok(i64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n, "length past the end of the buffer")
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError("text that is not UTF-8"))
    }
    /// Steps over an event, checking its layout but not its text.
    fn skip_event(&mut self) -> Result<(), DecodeError> {
        self.bytes()?;
        self.i64()?;
        for _ in 0..self.u16()? {
            self.bytes()?;
            self.bytes()?;
        }
        self.bytes()?;
        Ok(())
    }

    fn event(&mut self) -> Result<Event<'a>, DecodeError> {
        let id = self.str()?;
        let received_at = self.i64()?;
        let header_count = self.u16()?;
        let start = self.buf;
        for _ in 0..header_count {
            self.str()?;
            self.str()?;
        }
        let headers = &start[..start.len() - self.buf.len()];
        let payload = self.bytes()?;
        Ok(Event {
            id,
            received_at,
            headers,
            header_count,
            payload,
        })
    }
}

/// Reads the events of a batch buffer in order.
pub struct BatchReader<'a> {
    cur: Cursor<'a>,
    left: u32,
}

impl<'a> BatchReader<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let mut cur = Cursor { buf };
        let left = cur.u32()?;
        Ok(Self { cur, left })
    }

    /// Events still to read.
    pub fn remaining(&self) -> u32 {
        self.left
    }
}

impl<'a> Iterator for BatchReader<'a> {
    type Item = Result<Event<'a>, DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let e = self.cur.event();
        if e.is_err() {
            self.left = 0;
        }
        Some(e)
    }
}

/// Writes a batch buffer: `count` first (patched by [`BatchWriter::finish`]), then events.
#[derive(Debug, Default)]
pub struct BatchWriter {
    buf: Vec<u8>,
    count: u32,
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

impl BatchWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes + 4);
        buf.extend_from_slice(&[0; 4]);
        Self { buf, count: 0 }
    }

    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// Appends one event.
    pub fn push<'h>(
        &mut self,
        id: &str,
        received_at: i64,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        payload: &[u8],
    ) {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0; 4]);
        }
        put_bytes(&mut self.buf, id.as_bytes());
        self.buf.extend_from_slice(&received_at.to_le_bytes());
        let count_at = self.buf.len();
        self.buf.extend_from_slice(&[0; 2]);
        let mut n = 0u16;
        for (k, v) in headers {
            put_bytes(&mut self.buf, k.as_bytes());
            put_bytes(&mut self.buf, v.as_bytes());
            n += 1;
        }
        self.buf[count_at..count_at + 2].copy_from_slice(&n.to_le_bytes());
        put_bytes(&mut self.buf, payload);
        self.count += 1;
    }

    /// Appends an event as read from another batch (headers copied as they are).
    pub fn push_event(&mut self, e: &Event<'_>) {
        self.push_with_payload(e.id, e, e.payload);
    }

    /// Appends `e` with this id and payload: its headers are copied as they are encoded
    /// (not decoded and written again).
    pub fn push_with_payload(&mut self, id: &str, e: &Event<'_>, payload: &[u8]) {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0; 4]);
        }
        put_bytes(&mut self.buf, id.as_bytes());
        self.buf.extend_from_slice(&e.received_at.to_le_bytes());
        self.buf.extend_from_slice(&e.header_count.to_le_bytes());
        self.buf.extend_from_slice(e.headers);
        put_bytes(&mut self.buf, payload);
        self.count += 1;
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn finish(mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0; 4]);
        }
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

/// One input event's outcome in a transform's result buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Zero or more events out.
    Events(BatchReaderOwned<'a>),
    /// The event failed, with the plugin's reason.
    Failed(&'a str),
    /// The input event, kept exactly as it came in (one byte in the buffer: the host reuses
    /// the event it already holds instead of copying it back out of the plugin).
    Unchanged,
}

/// The events of one outcome (a nested batch inside the result buffer).
#[derive(Debug, PartialEq, Eq)]
pub struct BatchReaderOwned<'a> {
    buf: &'a [u8],
}

impl<'a> BatchReaderOwned<'a> {
    /// The events, each checked (text that is not UTF-8 is an error) as it is read.
    pub fn events(&self) -> BatchReader<'a> {
        BatchReader::new(self.buf).expect("the count was read with the outcome")
    }
}

/// Reads a transform's result buffer: one [`Outcome`] per input event.
pub struct OutcomeReader<'a> {
    cur: Cursor<'a>,
    left: u32,
}

impl<'a> OutcomeReader<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let mut cur = Cursor { buf };
        let left = cur.u32()?;
        Ok(Self { cur, left })
    }
    pub fn remaining(&self) -> u32 {
        self.left
    }
}

impl<'a> Iterator for OutcomeReader<'a> {
    type Item = Result<Outcome<'a>, DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = (|| match self.cur.u8()? {
            0 => {
                let start = self.cur.buf;
                let n = self.cur.u32()?;
                for _ in 0..n {
                    // The layout only: the text is checked when the events are read.
                    self.cur.skip_event()?;
                }
                let used = start.len() - self.cur.buf.len();
                Ok(Outcome::Events(BatchReaderOwned {
                    buf: &start[..used],
                }))
            }
            1 => Ok(Outcome::Failed(self.cur.str()?)),
            2 => Ok(Outcome::Unchanged),
            _ => Err(DecodeError("unknown outcome tag")),
        })();
        if r.is_err() {
            self.left = 0;
        }
        Some(r)
    }
}

/// Writes a transform's result buffer.
#[derive(Debug)]
pub struct OutcomeWriter {
    buf: Vec<u8>,
    count: u32,
}

impl Default for OutcomeWriter {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl OutcomeWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes + 4);
        buf.extend_from_slice(&[0; 4]);
        Self { buf, count: 0 }
    }

    /// Starts the outcome "events" of the next input event; push its events with
    /// [`OutcomeWriter::event`] and close it with [`OutcomeWriter::end_events`].
    pub fn begin_events(&mut self) -> usize {
        self.buf.push(0);
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        at
    }

    /// Appends an event to the open outcome.
    pub fn event<'h>(
        &mut self,
        open: &mut (usize, u32),
        id: &str,
        received_at: i64,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        payload: &[u8],
    ) {
        let mut w = BatchWriter {
            buf: std::mem::take(&mut self.buf),
            count: 0,
        };
        w.push(id, received_at, headers, payload);
        self.buf = w.buf;
        open.1 += 1;
    }

    /// Appends an input event with a new payload (its id left empty: the input's) to the
    /// open outcome.
    pub fn event_with_payload(&mut self, open: &mut (usize, u32), e: &Event<'_>, payload: &[u8]) {
        let mut w = BatchWriter {
            buf: std::mem::take(&mut self.buf),
            count: 0,
        };
        w.push_with_payload("", e, payload);
        self.buf = w.buf;
        open.1 += 1;
    }

    /// Appends an input event unchanged (headers and all) to the open outcome.
    pub fn event_unchanged(&mut self, open: &mut (usize, u32), e: &Event<'_>) {
        let mut w = BatchWriter {
            buf: std::mem::take(&mut self.buf),
            count: 0,
        };
        w.push_event(e);
        self.buf = w.buf;
        open.1 += 1;
    }

    pub fn end_events(&mut self, open: (usize, u32)) {
        self.buf[open.0..open.0 + 4].copy_from_slice(&open.1.to_le_bytes());
        self.count += 1;
    }

    /// Cuts the buffer back to `len` bytes (drops an outcome being written).
    #[doc(hidden)]
    pub fn truncate_to(&mut self, len: usize) {
        self.buf.truncate(len);
    }

    /// The next input event is kept unchanged (and is its only output).
    pub fn unchanged(&mut self) {
        self.buf.push(2);
        self.count += 1;
    }

    /// The next input event failed.
    pub fn failed(&mut self, reason: &str) {
        self.buf.push(1);
        put_bytes(&mut self.buf, reason.as_bytes());
        self.count += 1;
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let mut w = BatchWriter::new();
        w.push("01A", 5, [("k", "v"), ("x-y", "z")], b"{\"a\":1}");
        w.push("01B", -1, [], b"");
        let buf = w.finish();
        let events: Vec<Event> = BatchReader::new(&buf)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].id, "01A");
        assert_eq!(events[0].received_at, 5);
        assert_eq!(
            events[0].headers().collect::<Vec<_>>(),
            [("k", "v"), ("x-y", "z")]
        );
        assert_eq!(events[0].header("X-Y"), Some("z"));
        assert_eq!(events[0].payload, b"{\"a\":1}");
        assert_eq!(events[1].headers().count(), 0);
        // Copy through push_event: identical bytes.
        let mut w2 = BatchWriter::new();
        for e in &events {
            w2.push_event(e);
        }
        assert_eq!(w2.finish(), buf);
        assert_eq!(
            BatchReader::new(&BatchWriter::new().finish())
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn outcomes_round_trip() {
        let mut w = OutcomeWriter::default();
        let at = w.begin_events();
        let mut open = (at, 0);
        w.event(&mut open, "", 1, [("h", "1")], b"one");
        w.event(&mut open, "02", 2, [], b"two");
        w.end_events(open);
        w.failed("bad input");
        let at = w.begin_events();
        w.end_events((at, 0));
        let buf = w.finish();
        let out: Vec<Outcome> = OutcomeReader::new(&buf)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(out.len(), 3);
        let Outcome::Events(e) = &out[0] else {
            panic!()
        };
        let evs: Vec<Event> = e.events().map(Result::unwrap).collect();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].payload, b"one");
        assert_eq!(evs[0].header("h"), Some("1"));
        assert_eq!(evs[1].id, "02");
        assert_eq!(out[1], Outcome::Failed("bad input"));
        let Outcome::Events(e) = &out[2] else {
            panic!()
        };
        assert_eq!(e.events().count(), 0);
    }

    #[test]
    fn text_that_is_not_utf8_is_an_error_when_the_events_are_read() {
        let mut w = OutcomeWriter::with_capacity(0);
        let mut open = (w.begin_events(), 0);
        w.event(&mut open, "", 1, [("k", "v")], b"p");
        w.end_events(open);
        let mut buf = w.finish();
        let at = buf.iter().rposition(|&b| b == b'k').unwrap();
        buf[at] = 0xff;
        let Ok(Outcome::Events(batch)) = OutcomeReader::new(&buf).unwrap().next().unwrap() else {
            panic!("the layout is fine");
        };
        assert!(batch.events().next().unwrap().is_err());
    }

    #[test]
    fn malformed_buffers_are_errors_not_panics() {
        let mut w = BatchWriter::new();
        w.push("01A", 5, [("k", "v")], b"payload");
        let buf = w.finish();
        for cut in 0..buf.len() {
            let r: Result<Vec<_>, _> = match BatchReader::new(&buf[..cut]) {
                Ok(r) => r.collect(),
                Err(e) => Err(e),
            };
            assert!(r.is_err(), "a batch cut at {cut} must not decode");
        }
        // A count that promises more than there is.
        let mut bad = buf.clone();
        bad[0] = 200;
        assert!(BatchReader::new(&bad).unwrap().any(|e| e.is_err()));
        assert!(
            OutcomeReader::new(&[1, 0, 0, 0, 9])
                .unwrap()
                .next()
                .unwrap()
                .is_err()
        );
        // Random bytes never panic.
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            if let Ok(r) = BatchReader::new(&bytes) {
                let _ = r.take(100).count();
            }
            if let Ok(r) = OutcomeReader::new(&bytes) {
                let _ = r.take(100).count();
            }
        }
    }
}
