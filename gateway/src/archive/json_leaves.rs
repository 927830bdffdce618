//! A JSON reader specialised for the archive's flattening: it walks an object's text once and
//! hands each leaf to a callback as (dotted path, [`Scalar`]), without building a tree and
//! without allocating for strings that have no escapes (they borrow from the input). Arrays,
//! and objects at the depth limit, are handed over as their JSON text exactly as sent (a
//! borrowed slice), since the archive keeps them opaque. With [`for_each_leaf_hinted`] the
//! receiver ([`LeafSink`]) may guess the next leaf's path: a key that is the guess is compared
//! where it stands instead of being scanned and joined into a path. [`walk`] is the same reader for
//! the search index: every node in document order (arrays looked into), so that an event's
//! terms and words come from one pass over its bytes. [`value_span`] is the same reader as a
//! check only, and [`array_element_spans`] its form for an array body: ingest uses them to
//! accept JSON events (serde_json is then called only for what they refuse).
//!
//! It accepts exactly JSON (RFC 8259), like `serde_json` — the same number grammar, string
//! escapes, control characters, surrogate pairs, nesting limit and trailing-data check — and
//! reads numbers the way `serde_json` does (integers that fit as `i64`, the rest as `f64`,
//! correctly rounded as `serde_json` with its `float_roundtrip` feature reads them; the
//! workspace turns that feature on so that both readers agree to the bit).
//! It exists because the generic serde path cost the archiver about half of its CPU time
//! (a `String` per key, a `serde_json::Value` per array, per-byte string scans).

use std::borrow::Cow;

use super::schema::Scalar;

/// Containers nested deeper than this are an error (as in `serde_json`).
const RECURSION_LIMIT: usize = 128;

/// Why a payload is not JSON: what was wrong and the byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON at byte {at}: {what}")]
pub struct JsonError {
    pub at: usize,
    pub what: &'static str,
}

/// Reads `text` (one JSON value) and calls `emit` with every leaf of it when it is an object:
/// nested objects are descended into up to `max_depth` levels (paths joined with `.`); `null`
/// emits nothing; arrays and deeper objects are emitted as their JSON text. A top-level value
/// that is not an object emits nothing (but is still checked).
pub fn for_each_leaf<'a, F>(text: &'a [u8], max_depth: usize, emit: &mut F) -> Result<(), JsonError>
where
    F: FnMut(&str, Scalar<'a>),
{
    struct Unhinted<'f, F>(&'f mut F);
    impl<'a, F: FnMut(&str, Scalar<'a>)> LeafSink<'a> for Unhinted<'_, F> {
        fn expected(&self) -> Option<&str> {
            None
        }
        fn expected_leaf(&mut self, _: Scalar<'a>) {
            unreachable!("nothing is expected")
        }
        fn leaf(&mut self, path: &str, value: Scalar<'a>) {
            (self.0)(path, value)
        }
    }
    for_each_leaf_hinted(text, max_depth, &mut Unhinted(emit))
}

/// Where [`for_each_leaf_hinted`] hands the leaves, and what it expects next.
///
/// Events of a stream mostly have the same fields in the same order. A sink that can guess
/// the next leaf's path saves the reader the work of a key it guessed right: the key's bytes
/// are compared with the guess where they stand instead of being scanned, the path is not
/// built, and the sink is told "your guess" instead of being handed a path to look up.
pub trait LeafSink<'a> {
    /// The full dotted path the sink expects for the next leaf, or `None`. A path with a `"`,
    /// a `\` or a control character is never matched (its raw bytes could not be the key).
    fn expected(&self) -> Option<&str>;
    /// The next leaf, whose path was exactly [`Self::expected`].
    fn expected_leaf(&mut self, value: Scalar<'a>);
    /// The next leaf, at `path` (not the expected one, or nothing was expected).
    fn leaf(&mut self, path: &str, value: Scalar<'a>);
}

/// [`for_each_leaf`] with a sink that may guess the next leaf's path (see [`LeafSink`]). The
/// leaves, their values and what is an error are the same whatever the guesses.
pub fn for_each_leaf_hinted<'a, S: LeafSink<'a>>(
    text: &'a [u8],
    max_depth: usize,
    sink: &mut S,
) -> Result<(), JsonError> {
    let mut r = Reader::new(utf8(text)?);
    let mut path = String::with_capacity(64);
    r.ws();
    if r.peek() == Some(b'{') {
        r.object(&mut path, 0, max_depth, sink)?;
    } else {
        r.skip_value()?;
    }
    r.ws();
    if r.i != r.b.len() {
        return Err(r.err("trailing characters"));
    }
    Ok(())
}

/// Whether `name` has a byte that cannot stand unescaped in a JSON string, or that would
/// stand for something else there (`"`, `\`, control characters).
fn needs_escaping(name: &[u8]) -> bool {
    name.iter().any(|&c| c == b'"' || c == b'\\' || c < 0x20)
}

/// Checks that `text` is one JSON value with nothing but whitespace around it, as strictly as
/// [`for_each_leaf`] (that is, as `serde_json`), and returns where the value starts and ends:
/// the span `serde_json`'s `RawValue` would hold, found without building anything and with
/// the SIMD string scan. Ingest checks every NDJSON event with it.
pub fn value_span(text: &[u8]) -> Result<std::ops::Range<usize>, JsonError> {
    let mut r = Reader::new(utf8(text)?);
    r.ws();
    let start = r.i;
    r.skip_value()?;
    let end = r.i;
    r.ws();
    if r.i != r.b.len() {
        return Err(r.err("trailing characters"));
    }
    Ok(start..end)
}

/// [`value_span`] for a text that is one JSON array: the span of each element (what
/// serde_json reads as a `Vec<&RawValue>`). Ingest checks JSON array bodies with it.
pub fn array_element_spans(text: &str) -> Result<Vec<std::ops::Range<usize>>, JsonError> {
    let mut r = Reader::new(text);
    r.ws();
    if r.peek() != Some(b'[') {
        return Err(r.err("expected an array"));
    }
    let mut spans = Vec::new();
    r.container(b']', |r| {
        let start = r.i;
        r.skip_value()?;
        spans.push(start..r.i);
        Ok(())
    })?;
    r.ws();
    if r.i != r.b.len() {
        return Err(r.err("trailing characters"));
    }
    Ok(spans)
}

/// What [`walk`] found at a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Node<'a> {
    /// A string (borrowed unless it had escapes), a boolean, or a number read as
    /// [`for_each_leaf`] reads it, with the number's text as sent.
    Scalar(Scalar<'a>, &'a str),
    Null,
    /// The start of an object (its members follow, one level deeper).
    Object,
    /// The start of an array (its items follow at the same path, `in_array` set).
    Array,
}

/// What [`walk`] saw besides the nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walked {
    /// Some object had a key twice (a tree reader keeps only the last; a caller that must
    /// agree with one can fall back to it). May be set spuriously (keys are compared by a
    /// 64-bit hash), never missed.
    pub duplicate_keys: bool,
}

/// Reads `text` (one JSON value, checked as strictly as [`for_each_leaf`]) and calls `visit`
/// with every node in document order: `(path, depth, in_array, node)`. A member's path is its
/// keys joined with `.`; an array's items have the array's path and `in_array` set; `depth`
/// counts objects entered (0 for the top-level value).
pub fn walk<'a, F>(text: &'a [u8], visit: &mut F) -> Result<Walked, JsonError>
where
    F: FnMut(&str, usize, bool, Node<'a>),
{
    let mut r = Reader::new(utf8(text)?);
    let mut w = TreeWalk {
        path: String::with_capacity(64),
        keys: Vec::new(),
        walked: Walked::default(),
    };
    r.ws();
    r.node(&mut w, 0, false, visit)?;
    r.ws();
    if r.i != r.b.len() {
        return Err(r.err("trailing characters"));
    }
    Ok(w.walked)
}

/// The state of one [`walk`]: the current path and the key hashes of the open objects.
struct TreeWalk {
    path: String,
    keys: Vec<u64>,
    walked: Walked,
}

/// `text` as a `str`, or where it stops being UTF-8. Checked with SIMD first (`simdutf8`:
/// AVX2 or SSE4.2 as the CPU has them; std's check was 1.3 % of the archiver's work); std's
/// check says where invalid text stops being UTF-8.
fn utf8(text: &[u8]) -> Result<&str, JsonError> {
    match simdutf8::basic::from_utf8(text) {
        Ok(s) => Ok(s),
        Err(_) => std::str::from_utf8(text).map_err(|e| JsonError {
            at: e.valid_up_to(),
            what: "not UTF-8",
        }),
    }
}

fn key_hash(key: &str) -> u64 {
    // FNV-1a: keys are short, and a collision only costs the caller a slower path.
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `a == b`, without a call into `memcmp` for the short strings field names mostly are
/// (the field-order hint compares one or two per field of every archived event).
#[inline(always)]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
    match n {
        // Two overlapping loads cover 8..=16 bytes (4..=8 with the 4-byte ones).
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        0..=3 => a == b,
        // Four overlapping loads cover 17..=32 bytes (`attributes.attr_12`, `session.user_agent`).
        17..=32 => {
            word(a, 0) == word(b, 0)
                && word(a, 8) == word(b, 8)
                && word(a, n - 16) == word(b, n - 16)
                && word(a, n - 8) == word(b, n - 8)
        }
        _ => {
            word(a, 0) == word(b, 0)
                && word(a, n - 8) == word(b, n - 8)
                && a[8..n - 8] == b[8..n - 8]
        }
    }
}

struct Reader<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
    nesting: usize,
}

/// Where a number's parts are in the text (see `Reader::number_text`).
struct NumberText {
    start: usize,
    int_start: usize,
    int_end: usize,
    fraction: bool,
    exponent: bool,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// A mask with the high bit set in the lowest byte of `v` that is `"`, `\` or a control
/// character (bytes above it may be flagged spuriously; the lowest is exact).
#[inline]
fn special_bytes(v: u64) -> u64 {
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    zero(v ^ (ONES * b'"' as u64))
        | zero(v ^ (ONES * b'\\' as u64))
        | (v.wrapping_sub(ONES * 0x20) & !v & HIGH)
}

/// A mask with bit `k` set where byte `k` of `block` is `"`, `\\` or a control character.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(unsafe_code)] // SSE2 intrinsics: one load from a 16-byte array, then register operations
fn special_bytes_16(block: &[u8; 16]) -> u32 {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86_64 baseline (every x86_64 CPU has it, and Rust's
    // x86_64 targets enable it); the unaligned load reads exactly the 16 bytes of `block`.
    unsafe {
        let v = _mm_loadu_si128(block.as_ptr().cast());
        let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        // Unsigned v <= 0x1f  <=>  min(v, 0x1f) == v.
        let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
    }
}

impl<'a> Reader<'a> {
    fn new(text: &'a str) -> Self {
        Reader {
            s: text,
            b: text.as_bytes(),
            i: 0,
            nesting: 0,
        }
    }

    fn err(&self, what: &'static str) -> JsonError {
        JsonError { at: self.i, what }
    }

    /// Steps over whitespace. Compact JSON has none between tokens: one compare says so
    /// (every whitespace byte is at most b' '; the loop sorts out the rest).
    #[inline(always)]
    fn ws(&mut self) {
        if let Some(&c) = self.b.get(self.i)
            && c > b' '
        {
            return;
        }
        self.ws_loop();
    }

    #[inline]
    fn ws_loop(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), JsonError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    /// A member's value at `depth` (1 = a member of the top-level object), whose dotted path
    /// is in `path`: descended into when it is an object above `max_depth`, otherwise handed
    /// to `sink` (nothing for `null`).
    fn member_value<S: LeafSink<'a>>(
        &mut self,
        path: &mut String,
        depth: usize,
        max_depth: usize,
        sink: &mut S,
    ) -> Result<(), JsonError> {
        match self.peek() {
            // (Under an empty path, i.e. keys that are all "", objects are always descended
            // into: the archive has read them so from the start.)
            Some(b'{') if depth < max_depth || path.is_empty() => {
                self.object(path, depth, max_depth, sink)
            }
            Some(b'n') => self.literal(b"null"),
            _ => {
                let v = self.leaf_value()?;
                sink.leaf(path, v);
                Ok(())
            }
        }
    }

    /// A value kept whole as a leaf: a scalar, or the text of an array or object.
    #[inline]
    fn leaf_value(&mut self) -> Result<Scalar<'a>, JsonError> {
        match self.peek() {
            Some(b'{' | b'[') => {
                let start = self.i;
                self.skip_value()?;
                Ok(Scalar::Str(Cow::Borrowed(&self.s[start..self.i])))
            }
            _ => self.scalar(),
        }
    }

    /// An object or array at its opening bracket: checks the nesting limit, then calls
    /// `member` once per member (after any leading whitespace) and handles the separators
    /// and the closing bracket.
    fn container(
        &mut self,
        close: u8,
        mut member: impl FnMut(&mut Self) -> Result<(), JsonError>,
    ) -> Result<(), JsonError> {
        self.nesting += 1;
        if self.nesting > RECURSION_LIMIT {
            return Err(self.err("nested too deeply"));
        }
        self.i += 1; // '{' or '['
        self.ws();
        if self.peek() != Some(close) {
            loop {
                member(self)?;
                self.ws();
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        self.ws();
                    }
                    Some(c) if c == close => break,
                    _ if close == b'}' => return Err(self.err("expected ',' or '}'")),
                    _ => return Err(self.err("expected ',' or ']'")),
                }
            }
        }
        self.i += 1;
        self.nesting -= 1;
        Ok(())
    }

    /// An object member's key and the `:` after it.
    fn key(&mut self) -> Result<Cow<'a, str>, JsonError> {
        if self.peek() != Some(b'"') {
            return Err(self.err("expected a key"));
        }
        let key = self.string()?;
        self.colon()?;
        Ok(key)
    }

    /// The `:` after a member's key, with the whitespace around it.
    #[inline]
    fn colon(&mut self) -> Result<(), JsonError> {
        self.ws();
        self.expect(b':', "expected ':'")?;
        self.ws();
        Ok(())
    }

    /// An object at `depth` (0 = the top level) whose path is in `path`: each member's
    /// value with the member's path (see [`LeafSink`] for the keys that were expected).
    fn object<S: LeafSink<'a>>(
        &mut self,
        path: &mut String,
        depth: usize,
        max_depth: usize,
        sink: &mut S,
    ) -> Result<(), JsonError> {
        self.container(b'}', |r| {
            if let Some(key_len) = r.expected_key(path, sink) {
                // The key is the rest of the expected path: `path` is not needed for a leaf.
                r.colon()?;
                return match r.peek() {
                    Some(b'{') if depth + 1 < max_depth => {
                        let len = path.len();
                        let name = sink.expected().expect("the key was expected");
                        if len > 0 {
                            path.push('.');
                        }
                        path.push_str(&name[name.len() - key_len..]);
                        r.object(path, depth + 1, max_depth, sink)?;
                        path.truncate(len);
                        Ok(())
                    }
                    Some(b'n') => r.literal(b"null"),
                    _ => {
                        let v = r.leaf_value()?;
                        sink.expected_leaf(v);
                        Ok(())
                    }
                };
            }
            let key = r.key()?;
            let len = path.len();
            if len > 0 {
                path.push('.');
            }
            path.push_str(&key);
            r.member_value(path, depth + 1, max_depth, sink)?;
            path.truncate(len);
            Ok(())
        })
    }

    /// At a member's key in the object at `path`: when the sink expects `path.key` and the
    /// key's raw bytes are that `key` with no escape, followed by the closing quote, steps
    /// past the key and returns its length. Otherwise leaves the position as it was.
    #[inline(always)]
    fn expected_key<S: LeafSink<'a>>(&mut self, path: &str, sink: &S) -> Option<usize> {
        let name = sink.expected()?.as_bytes();
        let prefix = path.len() + usize::from(!path.is_empty());
        if name.len() <= prefix
            || (prefix > 0
                && (name[path.len()] != b'.' || !same_bytes(&name[..path.len()], path.as_bytes())))
        {
            return None;
        }
        let key = &name[prefix..];
        let at = self.i + 1;
        match self.b.get(self.i..at + key.len()) {
            Some([b'"', raw @ ..]) if same_bytes(raw, key) => {}
            _ => return None,
        }
        // The key's bytes are the expected ones; the first byte after them that a string
        // scan stops at must be the closing quote right after them (no escape, no control
        // character, no quote inside).
        let end = at + key.len();
        #[cfg(target_arch = "x86_64")]
        if key.len() < 16
            && let Some(block) = self.b.get(at..at + 16)
        {
            let m = special_bytes_16(block.try_into().expect("16 bytes"));
            if m.trailing_zeros() as usize != key.len() || self.b[end] != b'"' {
                return None;
            }
            self.i = end + 1;
            return Some(key.len());
        }
        if self.b.get(end) != Some(&b'"') || needs_escaping(key) {
            return None;
        }
        self.i = end + 1;
        Some(key.len())
    }

    /// One value for [`walk`], at `depth` and with the path in `w.path`.
    fn node<F>(
        &mut self,
        w: &mut TreeWalk,
        depth: usize,
        in_array: bool,
        visit: &mut F,
    ) -> Result<(), JsonError>
    where
        F: FnMut(&str, usize, bool, Node<'a>),
    {
        match self.peek() {
            Some(b'{') => {
                visit(&w.path, depth, in_array, Node::Object);
                let first_key = w.keys.len();
                self.container(b'}', |r| {
                    let key = r.key()?;
                    w.keys.push(key_hash(&key));
                    let len = w.path.len();
                    if depth > 0 {
                        w.path.push('.');
                    }
                    w.path.push_str(&key);
                    r.node(w, depth + 1, false, visit)?;
                    w.path.truncate(len);
                    Ok(())
                })?;
                let keys = &mut w.keys[first_key..];
                if keys.len() > 1 {
                    keys.sort_unstable();
                    if keys.windows(2).any(|k| k[0] == k[1]) {
                        w.walked.duplicate_keys = true;
                    }
                }
                w.keys.truncate(first_key);
                Ok(())
            }
            Some(b'[') => {
                visit(&w.path, depth, in_array, Node::Array);
                self.container(b']', |r| r.node(w, depth, true, visit))
            }
            Some(b'n') => {
                self.literal(b"null")?;
                visit(&w.path, depth, in_array, Node::Null);
                Ok(())
            }
            _ => {
                let start = self.i;
                let scalar = self.scalar()?;
                visit(
                    &w.path,
                    depth,
                    in_array,
                    Node::Scalar(scalar, &self.s[start..self.i]),
                );
                Ok(())
            }
        }
    }

    /// A string, boolean or number (anything else is an error).
    fn scalar(&mut self) -> Result<Scalar<'a>, JsonError> {
        match self.peek() {
            Some(b'"') => self.string().map(Scalar::Str),
            Some(b't') => self.literal(b"true").map(|()| Scalar::Bool(true)),
            Some(b'f') => self.literal(b"false").map(|()| Scalar::Bool(false)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("expected a value")),
            None => Err(self.err("unexpected end of input")),
        }
    }

    /// Checks and steps over one value without emitting anything.
    fn skip_value(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'{') => self.container(b'}', |r| {
                r.key()?;
                r.skip_value()
            }),
            Some(b'[') => self.container(b']', Self::skip_value),
            Some(b'"') => self.string().map(drop),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.skip_number(),
            Some(_) => Err(self.err("expected a value")),
            None => Err(self.err("unexpected end of input")),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), JsonError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    /// Steps to the next `"`, `\` or control character of a string (or the end): 16 bytes
    /// at a time with SSE2 on x86_64 (a quarter of the instructions per byte of the 8-byte
    /// SWAR loop below, which other targets use and which finishes the last bytes).
    #[inline(always)]
    fn skip_plain(&mut self) {
        let b = self.b;
        #[cfg(target_arch = "x86_64")]
        while let Some(block) = b.get(self.i..self.i + 16) {
            let m = special_bytes_16(block.try_into().expect("16 bytes"));
            if m != 0 {
                self.i += m.trailing_zeros() as usize;
                return;
            }
            self.i += 16;
        }
        while self.i + 8 <= b.len() {
            let v = u64::from_le_bytes(b[self.i..self.i + 8].try_into().expect("8 bytes"));
            let m = special_bytes(v);
            if m != 0 {
                self.i += (m.trailing_zeros() / 8) as usize;
                return;
            }
            self.i += 8;
        }
        while let Some(&c) = b.get(self.i) {
            if c == b'"' || c == b'\\' || c < 0x20 {
                return;
            }
            self.i += 1;
        }
    }

    /// `self.s[start..end]` where both ends are next to a `"` (an ASCII byte, so both are
    /// character boundaries), without the boundary checks of `str` indexing: a string's
    /// text is taken this way for every key and string value.
    #[inline(always)]
    #[allow(unsafe_code)] // an unchecked slice of ranges that are checked below
    fn plain_str(&self, start: usize, end: usize) -> &'a str {
        assert!(start <= end && end <= self.b.len());
        debug_assert!(self.b[start - 1] == b'"' && self.b[end] == b'"');
        // SAFETY: `start` follows and `end` is the position of a `"` (checked by the callers:
        // `string` took the opening quote and stopped at the closing one), so both are char
        // boundaries of the valid UTF-8 `self.s`, and the assert keeps the range in bounds.
        unsafe { self.s.get_unchecked(start..end) }
    }

    /// A string starting at its opening quote: borrowed when it has no escapes. The common
    /// case (no escape) is inlined; [`Self::escaped_string`] takes the rest.
    #[inline(always)]
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.i += 1; // '"'
        let start = self.i;
        self.skip_plain();
        if self.peek() == Some(b'"') {
            let s = self.plain_str(start, self.i);
            self.i += 1;
            return Ok(Cow::Borrowed(s));
        }
        self.escaped_string(start)
    }

    /// The rest of a string that started at `start` and whose scan stopped at something
    /// other than its closing quote: an escape, a control character or the end.
    #[inline(never)]
    fn escaped_string(&mut self, start: usize) -> Result<Cow<'a, str>, JsonError> {
        match self.peek() {
            Some(b'\\') => {}
            Some(_) => return Err(self.err("control character in a string")),
            None => return Err(self.err("unterminated string")),
        }
        let mut out = String::with_capacity(self.i - start + 16);
        out.push_str(&self.s[start..self.i]);
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or_else(|| self.err("unterminated string"))?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => out.push(self.unicode_escape()?),
                        _ => {
                            self.i -= 1;
                            return Err(self.err("invalid escape"));
                        }
                    }
                }
                Some(_) => return Err(self.err("control character in a string")),
                None => return Err(self.err("unterminated string")),
            }
            let from = self.i;
            self.skip_plain();
            out.push_str(&self.s[from..self.i]);
        }
    }

    fn hex4(&mut self) -> Result<u16, JsonError> {
        let digits = self
            .b
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.err("unterminated \\u escape"))?;
        let mut n = 0u16;
        for &d in digits {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.err("invalid \\u escape")),
            };
            n = n * 16 + v as u16;
        }
        self.i += 4;
        Ok(n)
    }

    /// After `\u`: one code point, reading the low half of a surrogate pair when needed.
    fn unicode_escape(&mut self) -> Result<char, JsonError> {
        let n = self.hex4()?;
        let code = match n {
            0xD800..=0xDBFF => {
                if !self.b[self.i..].starts_with(b"\\u") {
                    return Err(self.err("lone leading surrogate in a \\u escape"));
                }
                self.i += 2;
                let low = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return Err(self.err("invalid low surrogate in a \\u escape"));
                }
                0x10000 + (((n as u32) - 0xD800) << 10) + ((low as u32) - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.err("lone trailing surrogate in a \\u escape")),
            n => n as u32,
        };
        char::from_u32(code).ok_or_else(|| self.err("invalid \\u escape"))
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    /// Steps over a number, checking its grammar (RFC 8259, as `serde_json`): where it starts,
    /// where its integer digits are, and whether it has a fraction or an exponent.
    fn number_text(&mut self) -> Result<NumberText, JsonError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        match self.peek() {
            Some(b'0') => {
                self.i += 1;
                if matches!(self.peek(), Some(b'0'..=b'9')) {
                    return Err(self.err("invalid number"));
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        let int_end = self.i;
        let mut fraction = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
            fraction = true;
        }
        let mut exponent = false;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
            exponent = true;
        }
        Ok(NumberText {
            start,
            int_start,
            int_end,
            fraction,
            exponent,
        })
    }

    /// Checks and steps over a number without converting it: a number is an error only for
    /// its grammar or for a magnitude past `f64`, which needs an exponent or more than 308
    /// integer digits, so only such numbers are converted to be checked. Arrays are skipped
    /// this way, and correctly rounded float conversion was most of the cost of skipping them.
    fn skip_number(&mut self) -> Result<(), JsonError> {
        let t = self.number_text()?;
        if t.exponent || t.int_end - t.int_start > 308 {
            self.convert_number(&t)?;
        }
        Ok(())
    }

    /// A number, read as `serde_json` reads it: an integer that fits `u64` is an `Int` when it
    /// also fits `i64` (negative ones down to `i64::MIN`, `-0` excepted) and a `Float`
    /// otherwise; fractions and exponents are `Float`s; a number too big for `f64` is an error.
    fn number(&mut self) -> Result<Scalar<'a>, JsonError> {
        let t = self.number_text()?;
        self.convert_number(&t)
    }

    /// The value of the number [`Self::number_text`] just stepped over.
    fn convert_number(&self, t: &NumberText) -> Result<Scalar<'a>, JsonError> {
        let negative = self.b[t.start] == b'-';
        if !t.fraction && !t.exponent {
            let mut significand: u64 = 0;
            let mut fits = true;
            for &d in &self.b[t.int_start..t.int_end] {
                match significand
                    .checked_mul(10)
                    .and_then(|s| s.checked_add((d - b'0') as u64))
                {
                    Some(s) => significand = s,
                    None => {
                        fits = false;
                        break;
                    }
                }
            }
            if fits {
                return Ok(if !negative {
                    match i64::try_from(significand) {
                        Ok(i) => Scalar::Int(i),
                        Err(_) => Scalar::Float(significand as f64),
                    }
                } else {
                    let neg = (significand as i64).wrapping_neg();
                    if neg >= 0 {
                        Scalar::Float(-(significand as f64))
                    } else {
                        Scalar::Int(neg)
                    }
                });
            }
        }
        let f: f64 = self.s[t.start..self.i].parse().map_err(|_| JsonError {
            at: t.start,
            what: "invalid number",
        })?;
        if f.is_infinite() {
            return Err(JsonError {
                at: t.start,
                what: "number out of range",
            });
        }
        Ok(Scalar::Float(f))
    }
}

/// JSON number literals at the edges of how readers take them: `-0`, the `i64`/`u64` bounds
/// and past them, exponents, and decimals a fast float parser reads one unit off (`2.5e-30`:
/// exact only with serde_json's `float_roundtrip`, on in this workspace).
#[cfg(test)]
pub(crate) const NUMBER_LITERALS: [&str; 26] = [
    "0",
    "-0",
    "7",
    "-7",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "123456789012345678901234567890",
    "1.5",
    "1.50",
    "-12.000",
    "-2.25e3",
    "1E2",
    "1e2",
    "-1E-3",
    "1e-400",
    "1e308",
    "0.1",
    "2.5e-300",
    "3.141592653589793",
    "2.5e-30",
    "0.30000000000000004",
    "123.456789012345678901",
];

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn leaves(text: &str, max_depth: usize) -> Result<Vec<(String, Scalar<'_>)>, JsonError> {
        let mut out = Vec::new();
        for_each_leaf(text.as_bytes(), max_depth, &mut |p, s| {
            out.push((p.to_string(), s))
        })?;
        Ok(out)
    }

    #[test]
    fn reads_leaves_with_borrowed_strings_and_raw_arrays() {
        let doc = r#" { "a" : 1, "b": {"c": "x", "d": [1, {"e": 2}]}, "n": null, "t": true, "f": false } "#;
        let got = leaves(doc, 8).unwrap();
        assert_eq!(
            got,
            vec![
                ("a".into(), Scalar::Int(1)),
                ("b.c".into(), Scalar::Str("x".into())),
                ("b.d".into(), Scalar::Str(r#"[1, {"e": 2}]"#.into())),
                ("t".into(), Scalar::Bool(true)),
                ("f".into(), Scalar::Bool(false)),
            ]
        );
        assert!(matches!(&got[1].1, Scalar::Str(Cow::Borrowed(_))));
        // Past the depth limit an object is kept as its text.
        let got = leaves(r#"{"a": {"b": {"c": 1}}}"#, 2).unwrap();
        assert_eq!(got, vec![("a.b".into(), Scalar::Str(r#"{"c": 1}"#.into()))]);
        // Top-level non-objects have no leaves.
        for doc in ["[1, 2]", "\"s\"", "3", "null", "true"] {
            assert_eq!(leaves(doc, 8).unwrap(), vec![], "{doc}");
        }
    }

    #[test]
    fn unescapes_strings_and_keys() {
        let got = leaves(r#"{"k\"ey": "a\nb\t\"\\\/ \u00e9 \ud83c\udf89 é"}"#, 8).unwrap();
        assert_eq!(
            got,
            vec![("k\"ey".into(), Scalar::Str("a\nb\t\"\\/ é 🎉 é".into()))]
        );
    }

    #[test]
    fn reads_numbers_as_serde_json_does() {
        let cases = NUMBER_LITERALS;
        for n in cases {
            let doc = format!("{{\"n\": {n}}}");
            let got = leaves(&doc, 8).unwrap().remove(0).1;
            let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
            let n_json = &v["n"];
            let want = match n_json.as_i64() {
                Some(i) => Scalar::Int(i),
                None => Scalar::Float(n_json.as_f64().unwrap()),
            };
            match (&got, &want) {
                (Scalar::Float(a), Scalar::Float(b)) => {
                    assert_eq!(a.to_bits(), b.to_bits(), "{n}: {a} vs {b}")
                }
                _ => assert_eq!(got, want, "{n}"),
            }
        }
    }

    #[test]
    fn numbers_inside_kept_arrays_and_deep_objects_are_checked_as_serde_json_checks_them() {
        // Skipped values are not converted, only checked; the checks must still agree,
        // including magnitudes past f64 (by exponent or by 309+ integer digits).
        let big = format!("1{}", "0".repeat(308)); // 1e308: fits
        let too_big = format!("1{}", "0".repeat(309)); // 1e309: out of range
        let mut literals: Vec<String> = NUMBER_LITERALS.iter().map(|s| s.to_string()).collect();
        literals.extend(
            [
                "1e309",
                "-1e309",
                "1e-999",
                "1.7976931348623157e308",
                "1.8e308",
                "00",
                "-01",
                "1.",
                ".5",
                "1e+",
                "-",
                "1.5e",
                "2E-2",
                "0.0e0",
            ]
            .map(String::from),
        );
        literals.extend([
            big,
            too_big.clone(),
            format!("-{too_big}"),
            format!("{too_big}.5"),
        ]);
        for n in &literals {
            for doc in [
                format!("{{\"a\": [{n}]}}"),
                format!("{{\"a\": [1, {{\"b\": {n}}}, 2]}}"),
                format!("{{\"a\": {{\"b\": {{\"c\": {n}}}}}}}"),
            ] {
                let serde_ok = serde_json::from_str::<serde_json::Value>(&doc).is_ok();
                // max_depth 1: the inner object of the third form is kept whole (skipped).
                let ours = leaves(&doc, 1);
                assert_eq!(ours.is_ok(), serde_ok, "{doc}: {ours:?}");
                if let Ok(l) = ours {
                    let text = doc["{\"a\": ".len()..doc.len() - 1].to_string();
                    assert_eq!(
                        l,
                        vec![("a".to_string(), Scalar::Str(text.into()))],
                        "{doc}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_what_serde_json_rejects() {
        let bad = [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":1e}",
            "{\"a\":-}",
            "{\"a\":+1}",
            "{\"a\":tru}",
            "{\"a\":nul}",
            "{\"a\":\"x}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\ud800\"}",
            "{\"a\":\"\\udc00\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"tab\there\"}",
            "{\"a\":1} x",
            "{\"a\":[1,]}",
            "{\"a\":[1 2]}",
            "{a:1}",
            "{\"a\":1e999}",
            "[",
            "{\"a\":1}}",
        ];
        for doc in bad {
            assert!(
                serde_json::from_str::<serde_json::Value>(doc).is_err(),
                "serde accepts {doc:?}"
            );
            assert!(leaves(doc, 8).is_err(), "accepted {doc:?}");
        }
        assert!(for_each_leaf(b"{\"a\": \"\xff\"}", 8, &mut |_, _| {}).is_err());
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        assert!(serde_json::from_str::<serde_json::Value>(&deep).is_err());
        assert!(leaves(&deep, 8).is_err());
        let ok = format!("{{\"a\":{}1{}}}", "[".repeat(100), "]".repeat(100));
        assert!(leaves(&ok, 8).is_ok());
    }

    #[test]
    fn the_string_scan_stops_at_every_special_byte() {
        // Positions across the 16- and 8-byte blocks of both scans; raw control characters
        // (0x01, 0x1f) stop a string as errors; DEL, space and non-ASCII bytes (UTF-8 of é,
        // high bit set: signed compares would take them for control bytes) do not stop it.
        for pos in 0..40 {
            for special in [
                "\\n", "\\\"", "\"", "\u{1}", "\u{1f}", "\u{7f}", " ", "é", "\t",
            ] {
                let mut s: String = "é".repeat(pos / 2) + &"x".repeat(pos % 2);
                s.push_str(special);
                s.push_str("yyyyyyyyyyy");
                let doc = format!("{{\"k\": \"{s}\"}}");
                let serde: Result<serde_json::Value, _> = serde_json::from_str(&doc);
                let ours = leaves(&doc, 8);
                assert_eq!(serde.is_ok(), ours.is_ok(), "{doc}");
                if let (Ok(v), Ok(l)) = (serde, ours) {
                    assert_eq!(
                        l[0].1,
                        Scalar::Str(v["k"].as_str().unwrap().to_string().into())
                    );
                }
            }
        }
    }

    /// The reference: the same leaves from a `serde_json::Value` tree.
    fn reference(
        v: &serde_json::Value,
        path: &mut String,
        depth: usize,
        max: usize,
        out: &mut Vec<(String, String)>,
    ) {
        use serde_json::Value;
        match v {
            Value::Object(m) if depth < max || path.is_empty() => {
                for (k, v) in m {
                    let len = path.len();
                    if len > 0 {
                        path.push('.');
                    }
                    path.push_str(k);
                    reference(v, path, depth + 1, max, out);
                    path.truncate(len);
                }
            }
            _ if depth == 0 => {}
            Value::Null => {}
            other => out.push((path.clone(), canonical(other))),
        }
    }

    fn canonical(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => format!("int {i}"),
                None => format!("float {:?}", n.as_f64().unwrap()),
            },
            // Through text and back, as the reader's opaque values are compared.
            other => serde_json::from_str::<serde_json::Value>(&other.to_string())
                .unwrap()
                .to_string(),
        }
    }

    fn scalar_canonical(s: &Scalar<'_>) -> String {
        match s {
            Scalar::Int(i) => format!("int {i}"),
            Scalar::Float(f) => format!("float {f:?}"),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Str(t) if t.starts_with('[') || t.starts_with('{') => {
                serde_json::from_str::<serde_json::Value>(t)
                    .unwrap()
                    .to_string()
            }
            Scalar::Str(t) => serde_json::Value::String(t.to_string()).to_string(),
        }
    }

    fn random_value(rng: &mut impl rand::Rng, depth: usize) -> serde_json::Value {
        use serde_json::{Value, json};
        let keys = [
            "a",
            "b",
            "id",
            "k.dot",
            "é",
            "q\"x",
            "tab\t",
            "🎉",
            "",
            "long_key_name_here",
        ];
        match rng.random_range(0..if depth > 4 { 6 } else { 9 }) {
            0 => Value::Null,
            1 => json!(rng.random_bool(0.5)),
            2 => json!(rng.random::<i64>() >> rng.random_range(0..64)),
            3 => json!(rng.random::<u64>()),
            4 => json!(rng.random::<f64>() * 10f64.powi(rng.random_range(-20..20))),
            5 => {
                let alphabet = ['a', ' ', '"', '\\', '\n', '\u{1}', 'é', '𝄞', '/', 'z'];
                let n = rng.random_range(0..24);
                Value::String(
                    (0..n)
                        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                        .collect(),
                )
            }
            6 | 7 => {
                let n = rng.random_range(0..5);
                Value::Object(
                    (0..n)
                        .map(|_| {
                            (
                                keys[rng.random_range(0..keys.len())].to_string(),
                                random_value(rng, depth + 1),
                            )
                        })
                        .collect(),
                )
            }
            _ => {
                let n = rng.random_range(0..4);
                Value::Array((0..n).map(|_| random_value(rng, depth + 1)).collect())
            }
        }
    }

    #[test]
    fn agrees_with_serde_json_on_random_documents_and_their_corruptions() {
        let mut rng = rand::rng();
        for round in 0..3000 {
            let mut v = random_value(&mut rng, 0);
            if round % 2 == 0 && !v.is_object() {
                v = serde_json::json!({ "wrapped": v });
            }
            let text = if round % 3 == 0 {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            };
            let max = 1 + round % 4;
            let mut want = Vec::new();
            reference(&v, &mut String::new(), 0, max, &mut want);
            let mut got = Vec::new();
            for_each_leaf(text.as_bytes(), max, &mut |p, s| {
                got.push((p.to_string(), scalar_canonical(&s)))
            })
            .unwrap_or_else(|e| panic!("{e} in {text}"));
            // The tree keeps the last of duplicate keys; compare as maps of the last values.
            let last = |l: Vec<(String, String)>| {
                l.into_iter().collect::<std::collections::BTreeMap<_, _>>()
            };
            assert_eq!(last(got), last(want), "{text}");
            // One byte changed: accepted or rejected exactly as serde_json does.
            let mut bad = text.clone().into_bytes();
            if !bad.is_empty() {
                let at = rng.random_range(0..bad.len());
                bad[at] = b"{}[]\",:0-e.\\ tx\x01\xc3"[rng.random_range(0..17)];
                let serde_ok = serde_json::from_slice::<serde_json::Value>(&bad).is_ok();
                let ours_ok = for_each_leaf(&bad, max, &mut |_, _| {}).is_ok();
                assert_eq!(ours_ok, serde_ok, "{}", String::from_utf8_lossy(&bad));
                assert_same_span(&bad);
            }
            // With whitespace around it, as an NDJSON line may have: accepted.
            assert!(assert_same_span(format!(" \t{text}\r\n ").as_bytes()));
            // As elements of an array body, and that body with one byte changed.
            let body = format!("\n[ {text},\n{text} ]\n");
            assert!(assert_same_elements(&body));
            let mut bad = body.into_bytes();
            let at = rng.random_range(0..bad.len());
            bad[at] = b"{}[]\",:0-e.\\ tx\x01"[rng.random_range(0..16)];
            if let Ok(bad) = std::str::from_utf8(&bad) {
                assert_same_elements(bad);
            }
        }
    }

    /// Long texts go through the SIMD check: invalid bytes anywhere are refused with their
    /// position, valid multi-byte text is read.
    #[test]
    fn invalid_utf8_is_refused_where_it_is_in_long_texts() {
        let good = format!("{{\"k\":\"{}\",\"n\":1}}", "añ€😀x".repeat(100));
        let mut n = 0;
        for_each_leaf(good.as_bytes(), 4, &mut |_, _| n += 1).unwrap();
        assert_eq!(n, 2);
        for at in [8, 9, 63, 64, 65, 200, good.len() - 12] {
            for bad_byte in [0xffu8, 0xc3, 0x80] {
                let mut bad = good.clone().into_bytes();
                // A lone byte that cannot start or continue a character where it is.
                let at = (at..).find(|&i| good.is_char_boundary(i)).unwrap();
                bad.insert(at, bad_byte);
                bad.insert(at + 1, b'x');
                let err = for_each_leaf(&bad, 4, &mut |_, _| {}).unwrap_err();
                assert_eq!(
                    (err.at, err.what),
                    (at, "not UTF-8"),
                    "byte {bad_byte:#x} at {at}"
                );
            }
        }
    }

    /// What `value_span` accepts, `serde_json` reads as a `RawValue` with the same span; returns
    /// whether it accepted. (It may reject what a `RawValue` takes: serde_json skips a raw
    /// value without checking number ranges or `\u` surrogates, which `Value` does check;
    /// ingest then asks serde_json, so the two together accept exactly what it accepts.)
    fn assert_same_span(text: &[u8]) -> bool {
        let serde = std::str::from_utf8(text)
            .ok()
            .and_then(|t| serde_json::from_str::<&serde_json::value::RawValue>(t).ok());
        match (value_span(text), serde) {
            (Ok(span), Some(raw)) => {
                assert_eq!(&text[span], raw.get().as_bytes());
                true
            }
            (Err(_), _) => false,
            (ours, serde) => panic!(
                "{}: ours {ours:?}, serde_json {serde:?}",
                String::from_utf8_lossy(text)
            ),
        }
    }

    /// What `array_element_spans` accepts, serde_json reads as a `Vec<&RawValue>` with the
    /// same elements; returns whether it accepted.
    fn assert_same_elements(text: &str) -> bool {
        let serde = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text).ok();
        match (array_element_spans(text), serde) {
            (Ok(spans), Some(raws)) => {
                let ours: Vec<&str> = spans.into_iter().map(|r| &text[r]).collect();
                let theirs: Vec<&str> = raws.iter().map(|r| r.get()).collect();
                assert_eq!(ours, theirs);
                true
            }
            (Err(_), _) => false,
            (ours, serde) => panic!("{text}: ours {ours:?}, serde_json {serde:?}"),
        }
    }

    #[test]
    fn array_element_spans_agree_with_serde_json() {
        for (doc, accepted) in [
            ("[]", true),
            (" [ ] ", true),
            ("[{}, [1, 2], \"s\", 3, null]", true),
            ("[1,]", false),
            ("[1 2]", false),
            ("[1] x", false),
            ("{}", false),
            ("[", false),
            ("", false),
        ] {
            assert_eq!(assert_same_elements(doc), accepted, "{doc:?}");
        }
        for depth in [100, 126, 127, 128, 129, 200] {
            let doc = format!("[{}1{}]", "[".repeat(depth), "]".repeat(depth));
            assert_eq!(assert_same_elements(&doc), depth < 128, "{depth}");
        }
    }

    #[test]
    fn value_span_agrees_with_serde_json_raw_values() {
        for n in NUMBER_LITERALS {
            for doc in [n.to_string(), format!("[{n}]"), format!("{{\"a\": {n}}}")] {
                assert!(assert_same_span(doc.as_bytes()), "{doc}");
            }
        }
        for (doc, accepted) in [
            ("{}", true),
            (" {} ", true),
            ("[]", true),
            ("\"s\"", true),
            ("true", true),
            ("null", true),
            ("", false),
            (" ", false),
            ("{\"a\":1} x", false),
            ("{\"a\":1}}", false),
            ("{\"a\":[1,]}", false),
            ("\"\\ud800\"", false),
            ("{\"a\":1e999}", false),
            ("{\"a\": \"\u{1}\"}", false),
        ] {
            assert_eq!(assert_same_span(doc.as_bytes()), accepted, "{doc:?}");
        }
        assert!(!assert_same_span(b"{\"a\": \"\xff\"}"));
        for depth in [100, 127, 128, 129, 200] {
            let doc = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            assert_eq!(assert_same_span(doc.as_bytes()), depth <= 128, "{depth}");
        }
    }
}
