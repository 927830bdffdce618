//! The streaming redactor: one pass over a JSON payload's bytes finds the members at the
//! configured paths and rewrites only their spans; every other byte of the event is kept as
//! it was (key order, whitespace, number formatting).
//!
//! Rules, chosen so that nothing a path names can slip through:
//! - every occurrence is redacted: duplicate keys, and every way a dotted path can be read
//!   (`a.b.c` names `{"a":{"b":{"c":…}}}`, `{"a.b":{"c":…}}` and `{"a":{"b.c":…}}`);
//! - keys are compared after JSON unescaping (`"\u0065mail"` is `email`);
//! - values inside arrays are not looked into (paths name object members, as in filters).
//!
//! Values that are not on a path are skipped by bracket counting without being parsed.

use crate::blocks;

/// What happens to a member at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The value is replaced by this JSON text.
    Mask(Vec<u8>),
    /// The member (key and value) is removed.
    Drop,
}

/// The payload is not JSON the scanner can read (the caller decides what to do).
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// One rewrite: bytes `start..end` of the input become the mask, or nothing.
struct Edit {
    start: usize,
    end: usize,
    mask: bool,
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    edits: Vec<Edit>,
    /// The path suffixes still to walk, as (path index, offset of the suffix): a stack, one
    /// range of it per object being read.
    suffixes: Vec<(u32, u32)>,
}

/// Buffers reused from one event to the next (no allocation per event once warm).
#[derive(Default)]
pub struct Scratch {
    edits: Vec<Edit>,
    suffixes: Vec<(u32, u32)>,
    out: Vec<u8>,
}

/// Redacts `paths` in `payload`. `Ok(None)`: a JSON object in which no path is present, or
/// not an object at all (a JSON scalar or array); `Ok(Some(bytes))`: the rewritten event.
#[cfg(test)]
pub fn redact<P: AsRef<[u8]>>(
    payload: &[u8],
    paths: &[P],
    action: &Action,
) -> Result<Option<Vec<u8>>, Malformed> {
    let mut scratch = Scratch::default();
    Ok(redact_with(&mut scratch, payload, paths, action)?.map(<[u8]>::to_vec))
}

/// [`redact`] into reused buffers: the rewritten event borrows from `scratch`.
pub fn redact_with<'s, P: AsRef<[u8]>>(
    scratch: &'s mut Scratch,
    payload: &[u8],
    paths: &[P],
    action: &Action,
) -> Result<Option<&'s [u8]>, Malformed> {
    scratch.edits.clear();
    scratch.suffixes.clear();
    scratch
        .suffixes
        .extend((0..paths.len() as u32).map(|k| (k, 0)));
    let mut s = Scan {
        b: payload,
        i: 0,
        edits: std::mem::take(&mut scratch.edits),
        suffixes: std::mem::take(&mut scratch.suffixes),
    };
    let scanned = (|| {
        s.ws();
        if s.peek() != Some(b'{') {
            // Scalars and arrays have no members; still check that it is JSON.
            s.skip()?;
        } else {
            s.object(paths, 0..paths.len(), action)?;
        }
        s.ws();
        if s.i != s.b.len() {
            return Err(Malformed);
        }
        Ok(())
    })();
    scratch.edits = s.edits;
    scratch.suffixes = s.suffixes;
    scanned?;
    if scratch.edits.is_empty() {
        return Ok(None);
    }
    let mask: &[u8] = match action {
        Action::Mask(m) => m,
        Action::Drop => &[],
    };
    let out = &mut scratch.out;
    out.clear();
    out.reserve(payload.len() + scratch.edits.len() * mask.len());
    let mut at = 0;
    for e in &scratch.edits {
        out.extend_from_slice(&payload[at..e.start]);
        if e.mask {
            out.extend_from_slice(mask);
        }
        at = e.end;
    }
    out.extend_from_slice(&payload[at..]);
    Ok(Some(out))
}

/// The first byte at or after `i` that ends a run of plain string content: a quote, a
/// backslash or a control character; 16 bytes at a time.
fn special(b: &[u8], mut i: usize) -> Option<usize> {
    while let Some(chunk) = b.get(i..i + 16) {
        let hits = blocks::string_stops(chunk.try_into().expect("16 bytes"));
        if hits != 0 {
            return Some(i + hits.trailing_zeros() as usize);
        }
        i += 16;
    }
    while i < b.len() {
        if matches!(b[i], b'"' | b'\\' | 0..0x20) {
            return Some(i);
        }
        i += 1;
    }
    None
}

impl Scan<'_> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    #[inline(always)]
    fn expect(&mut self, c: u8) -> Result<(), Malformed> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(Malformed)
        }
    }

    /// A string starting at the opening quote; returns the span between the quotes and
    /// whether it holds an escape.
    #[inline(always)]
    fn string(&mut self) -> Result<(usize, usize, bool), Malformed> {
        self.expect(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            self.i = special(self.b, self.i).ok_or(Malformed)?;
            match self.b[self.i] {
                b'"' => {
                    self.i += 1;
                    return Ok((start, self.i - 1, escaped));
                }
                b'\\' => {
                    escaped = true;
                    self.i += 2;
                }
                _ => return Err(Malformed),
            }
        }
    }

    /// Skips one value of any kind without looking at what it holds: a string to its closing
    /// quote, a scalar to the next delimiter, an object or array by counting brackets (only
    /// strings are read inside; that is where brackets may not count).
    fn skip(&mut self) -> Result<(), Malformed> {
        self.ws();
        match self.peek().ok_or(Malformed)? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => self.skip_container(),
            b'}' | b']' | b',' | b':' => Err(Malformed),
            _ => {
                let start = self.i;
                while let Some(c) = self.peek() {
                    if matches!(
                        c,
                        b',' | b':'
                            | b'}'
                            | b']'
                            | b'{'
                            | b'['
                            | b'"'
                            | b' '
                            | b'\t'
                            | b'\n'
                            | b'\r'
                    ) {
                        break;
                    }
                    self.i += 1;
                }
                if start == self.i {
                    return Err(Malformed);
                }
                Ok(())
            }
        }
    }

    /// An object or array from its opening bracket to the matching closing one, 64 bytes at
    /// a time: the block's quotes (less escaped ones) give the spans inside strings, and
    /// the brackets outside them are counted. A raw control byte inside a string, an
    /// unbalanced bracket or the end of the input is malformed.
    fn skip_container(&mut self) -> Result<(), Malformed> {
        let mut depth = 0u32;
        let mut in_string = 0u64; // all ones when the previous block ended inside a string
        let mut escape = 0u64; // the previous block's last byte escapes this block's first
        let mut at = self.i;
        let mut padded = [b' '; 64]; // the last, short block, filled out with spaces
        while at < self.b.len() {
            let block: &[u8; 64] = match self.b.get(at..at + 64) {
                Some(full) => full.try_into().expect("64 bytes"),
                None => {
                    let tail = &self.b[at..];
                    padded[..tail.len()].copy_from_slice(tail);
                    &padded
                }
            };
            let c = blocks::classes64(block);
            let escaped = blocks::escaped(c.backslash, &mut escape);
            let quotes = c.quote & !escaped;
            let inside = blocks::prefix_xor(quotes) ^ in_string;
            in_string = ((inside as i64) >> 63) as u64;
            // (An escaped one is let through, as the string reader does.)
            let bad = c.control & inside & !escaped;
            let opens = c.open & !inside;
            let closes = c.close & !inside;
            if depth > closes.count_ones() {
                // The container cannot end in this block.
                if bad != 0 {
                    return Err(Malformed);
                }
                depth = depth + opens.count_ones() - closes.count_ones();
            } else {
                let mut marks = opens | closes;
                while marks != 0 {
                    let bit = marks & marks.wrapping_neg();
                    if opens & bit != 0 {
                        depth += 1;
                    } else {
                        depth = depth.checked_sub(1).ok_or(Malformed)?;
                        if depth == 0 {
                            if bad & (bit - 1) != 0 {
                                return Err(Malformed);
                            }
                            self.i = at + bit.trailing_zeros() as usize + 1;
                            return Ok(());
                        }
                    }
                    marks &= marks - 1;
                }
                if bad != 0 {
                    return Err(Malformed);
                }
            }
            at += 64;
        }
        Err(Malformed)
    }

    /// An object whose members are matched against the path suffixes `self.suffixes[level]`.
    fn object<P: AsRef<[u8]>>(
        &mut self,
        paths: &[P],
        level: std::ops::Range<usize>,
        action: &Action,
    ) -> Result<(), Malformed> {
        self.expect(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        let mut kept_any = false;
        let mut comma_before: Option<usize> = None;
        // This object's members push the suffixes below them from here.
        let base = self.suffixes.len();
        loop {
            self.ws();
            let member_start = self.i;
            let (ks, ke, escaped) = self.string()?;
            let decoded;
            let key: &[u8] = if escaped {
                decoded = serde_json::from_slice::<String>(&self.b[ks - 1..ke + 1])
                    .map_err(|_| Malformed)?;
                decoded.as_bytes()
            } else {
                &self.b[ks..ke]
            };
            let mut target = false;
            self.suffixes.truncate(base);
            for k in level.clone() {
                let (pi, off) = self.suffixes[k];
                let p = &paths[pi as usize].as_ref()[off as usize..];
                // Cheap rejections first: most keys differ from a path in length or in
                // their first byte, and a slice comparison is a call to `memcmp` in WASM.
                if p.len() < key.len() || (!key.is_empty() && p[0] != key[0]) {
                    continue;
                }
                if p.len() == key.len() {
                    target |= p == key;
                } else if p[key.len()] == b'.' && p.starts_with(key) {
                    self.suffixes.push((pi, off + key.len() as u32 + 1));
                }
            }
            self.ws();
            self.expect(b':')?;
            self.ws();
            let value_start = self.i;
            if target {
                self.skip()?;
            } else if self.suffixes.len() > base && self.peek() == Some(b'{') {
                let inner = base..self.suffixes.len();
                self.object(paths, inner, action)?;
            } else {
                self.skip()?;
            }
            let value_end = self.i;
            self.ws();
            let next = self.peek().ok_or(Malformed)?;
            if !matches!(next, b',' | b'}') {
                return Err(Malformed);
            }
            if target {
                match action {
                    Action::Mask(_) => self.edits.push(Edit {
                        start: value_start,
                        end: value_end,
                        mask: true,
                    }),
                    Action::Drop => {
                        // Remove the member with one comma: the one before it when a member
                        // before it stays, otherwise the one after it (if any).
                        let (start, end) = match (kept_any, comma_before) {
                            (true, Some(c)) => (c, value_end),
                            _ if next == b',' => {
                                let mut end = self.i + 1;
                                while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(end) {
                                    end += 1;
                                }
                                (member_start, end)
                            }
                            _ => (member_start, value_end),
                        };
                        self.edits.push(Edit {
                            start,
                            end,
                            mask: false,
                        });
                    }
                }
            } else {
                kept_any = true;
            }
            if next == b'}' {
                self.i += 1;
                return Ok(());
            }
            comma_before = Some(self.i);
            self.i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(payload: &str, paths: &[&str], action: &Action) -> Option<String> {
        let paths: Vec<&[u8]> = paths.iter().map(|p| p.as_bytes()).collect();
        redact(payload.as_bytes(), &paths, action)
            .expect("valid JSON")
            .map(|b| String::from_utf8(b).unwrap())
    }

    fn mask() -> Action {
        Action::Mask(b"\"***\"".to_vec())
    }

    #[test]
    fn the_string_scan_finds_the_first_special_byte_anywhere() {
        for len in 0..70 {
            for at in 0..len {
                for c in [b'"', b'\\', 0x01, 0x1f] {
                    let mut b = vec![b'a'; len];
                    // Bytes that must not count: high bytes (UTF-8), and the ones just above.
                    for (k, x) in b.iter_mut().enumerate() {
                        *x = [b'a', 0xc3, 0xff, b' ', b'#', b']', 0x80][k % 7];
                    }
                    b[at] = c;
                    if at + 1 < len {
                        b[at + 1] = b'"';
                    }
                    assert_eq!(special(&b, 0), Some(at), "{b:?}");
                    assert_eq!(special(&b, at + 1), (at + 1 < len).then_some(at + 1));
                }
            }
            assert_eq!(special(&vec![0xe2; len], 0), None);
        }
    }

    /// The container skip before blocks: one byte at a time, strings read one by one.
    fn skip_container_bytewise(b: &[u8]) -> Result<usize, Malformed> {
        let mut s = Scan {
            b,
            i: 0,
            edits: Vec::new(),
            suffixes: Vec::new(),
        };
        let mut depth = 0usize;
        while let Some(&c) = s.b.get(s.i) {
            match c {
                b'"' => {
                    s.string()?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1).ok_or(Malformed)?;
                    if depth == 0 {
                        return Ok(s.i + 1);
                    }
                }
                _ => {}
            }
            s.i += 1;
        }
        Err(Malformed)
    }

    /// Random containers of 1 to ~400 bytes (strings full of brackets, quotes and runs of
    /// backslashes, nesting, text after the end), whole, cut short and with a raw control
    /// byte: the block skip ends where the byte-wise one does, or fails where it fails.
    #[test]
    fn the_block_skip_agrees_with_reading_byte_by_byte() {
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        fn container(rnd: &mut dyn FnMut(u64) -> u64, out: &mut Vec<u8>, depth: u32) {
            let (open, close) = if rnd(2) == 0 {
                (b'{', b'}')
            } else {
                (b'[', b']')
            };
            out.push(open);
            for _ in 0..rnd(6) {
                match rnd(if depth > 4 { 3 } else { 5 }) {
                    0 => {
                        out.push(b'"');
                        for _ in 0..rnd(40) {
                            let pieces: [&[u8]; 8] =
                                [b"a", b"\\\\", b"\\\"", b"{", b"]", b"\\", b"\xc3\xa9", b" "];
                            let p = pieces[rnd(8) as usize];
                            // A lone backslash escapes the next piece's first byte.
                            out.extend_from_slice(p);
                            if p == b"\\" {
                                out.push(b'n');
                            }
                        }
                        out.push(b'"');
                    }
                    1 => out.extend_from_slice(b"12.5, "),
                    2 => out.extend_from_slice(b":\n\t"),
                    _ => container(rnd, out, depth + 1),
                }
            }
            out.push(close);
        }
        for round in 0..4000 {
            let mut b = Vec::new();
            container(&mut rnd, &mut b, 0);
            b.extend_from_slice(b" ,\"x\"}");
            let cut = match round % 4 {
                0 => b.len(),
                _ => rnd(b.len() as u64 + 1) as usize,
            };
            let mut b = b[..cut].to_vec();
            if round % 7 == 0 && !b.is_empty() {
                // (Not over a quote or backslash: a backslash outside a string is not JSON,
                // and the two readings may then differ.)
                let at = rnd(b.len() as u64) as usize;
                if !matches!(b[at], b'"' | b'\\') {
                    b[at] = 0x01;
                }
            }
            let want = skip_container_bytewise(&b);
            let mut s = Scan {
                b: &b,
                i: 0,
                edits: Vec::new(),
                suffixes: Vec::new(),
            };
            let got = s.skip_container().map(|()| s.i);
            if want.is_ok() || got.is_ok() {
                assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&b));
            }
        }
    }

    #[test]
    fn masks_only_the_value_and_keeps_every_other_byte() {
        let p = r#"{ "z": 1,  "user" : {"id": 7, "email" :"a@b.c" } , "n":[1, {"email":"x"}] }"#;
        assert_eq!(
            run(p, &["user.email"], &mask()).unwrap(),
            r#"{ "z": 1,  "user" : {"id": 7, "email" :"***" } , "n":[1, {"email":"x"}] }"#
        );
        assert_eq!(run(p, &["nope", "user.nope", "z.x"], &mask()), None);
    }

    #[test]
    fn every_duplicate_and_every_reading_of_a_dotted_path_is_redacted() {
        let p = r#"{"a":{"b":{"c":1}},"a.b":{"c":2},"a":{"b.c":3},"a.b.c":4,"a":{"b":{"c":5}}}"#;
        assert_eq!(
            run(p, &["a.b.c"], &mask()).unwrap(),
            r#"{"a":{"b":{"c":"***"}},"a.b":{"c":"***"},"a":{"b.c":"***"},"a.b.c":"***","a":{"b":{"c":"***"}}}"#
        );
    }

    #[test]
    fn escaped_keys_are_compared_unescaped() {
        let p = r#"{"\u0065mail":"a@b.c","em\"ail":1}"#;
        assert_eq!(
            run(p, &["email"], &mask()).unwrap(),
            r#"{"\u0065mail":"***","em\"ail":1}"#
        );
        assert_eq!(
            run(p, &["em\"ail"], &Action::Drop).unwrap(),
            r#"{"\u0065mail":"a@b.c"}"#
        );
    }

    #[test]
    fn drop_removes_members_and_their_commas_wherever_they_are() {
        let cases = [
            (r#"{"a":1,"b":2,"c":3}"#, &["a"][..], r#"{"b":2,"c":3}"#),
            (r#"{"a":1,"b":2,"c":3}"#, &["b"][..], r#"{"a":1,"c":3}"#),
            (r#"{"a":1,"b":2,"c":3}"#, &["c"][..], r#"{"a":1,"b":2}"#),
            (r#"{"a":1,"b":2,"c":3}"#, &["a", "b"][..], r#"{"c":3}"#),
            (r#"{"a":1,"b":2,"c":3}"#, &["b", "c"][..], r#"{"a":1}"#),
            (r#"{"a":1,"b":2,"c":3}"#, &["a", "c"][..], r#"{"b":2}"#),
            (r#"{"a":1,"b":2,"c":3}"#, &["a", "b", "c"][..], r#"{}"#),
            (r#"{ "a" : 1 , "b" : 2 }"#, &["a"][..], r#"{ "b" : 2 }"#),
            (
                r#"{"x":{"a":[1,{"a":2}],"b":2}}"#,
                &["x.a"][..],
                r#"{"x":{"b":2}}"#,
            ),
        ];
        for (p, paths, want) in cases {
            let got = run(p, paths, &Action::Drop).unwrap();
            assert_eq!(got, want, "{p} without {paths:?}");
            serde_json::from_str::<serde_json::Value>(&got).expect("still JSON");
        }
    }

    #[test]
    fn non_objects_pass_and_malformed_json_is_reported() {
        assert_eq!(run(r#"[{"email":1}]"#, &["email"], &mask()), None);
        assert_eq!(run(r#""email""#, &["email"], &mask()), None);
        assert_eq!(run(" 12 ", &["email"], &mask()), None);
        for bad in [
            "",
            "{",
            r#"{"email":}"#,
            r#"{"email" "x"}"#,
            r#"{"email":"x",}"#,
            r#"{"email":"x"} trailing"#,
            "{\"a\":\"unterminated}",
            "{\"a\":\"ctl\u{1}\"}",
            r#"{"a":[1,2}"#,
        ] {
            let paths: [&[u8]; 1] = [b"email"];
            assert!(
                redact(bad.as_bytes(), &paths, &mask()).is_err(),
                "{bad:?} is not JSON"
            );
        }
    }

    /// Random objects (no duplicate keys, no dots in keys): the streaming result, parsed,
    /// equals redacting the parsed value.
    #[test]
    fn agrees_with_redacting_the_parsed_value() {
        use serde_json::{Map, Value, json};
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        fn random_value(rnd: &mut dyn FnMut(u64) -> u64, depth: u32) -> Value {
            match rnd(if depth > 3 { 4 } else { 6 }) {
                0 => json!(rnd(1000) as i64 - 500),
                1 => json!(format!("s{}\"\\\n", rnd(10))),
                2 => Value::Bool(rnd(2) == 0),
                3 => Value::Null,
                4 => Value::Array((0..rnd(3)).map(|_| random_value(rnd, depth + 1)).collect()),
                _ => {
                    let mut m = Map::new();
                    for _ in 0..rnd(4) {
                        m.insert(
                            ["a", "b", "c"][rnd(3) as usize].into(),
                            random_value(rnd, depth + 1),
                        );
                    }
                    Value::Object(m)
                }
            }
        }
        fn reference(v: &mut Value, path: &[&str], drop: bool) {
            let Some(m) = v.as_object_mut() else { return };
            if path.len() == 1 {
                if drop {
                    m.remove(path[0]);
                } else if let Some(x) = m.get_mut(path[0]) {
                    *x = json!("***");
                }
            } else if let Some(x) = m.get_mut(path[0]) {
                reference(x, &path[1..], drop);
            }
        }
        let all = ["a", "b", "a.b", "b.c", "a.a.a", "c.b.a"];
        for round in 0..3000 {
            let mut v = Value::Object(Map::new());
            while !v.is_object() || v.as_object().unwrap().is_empty() {
                v = random_value(&mut rnd, 0);
            }
            let text = if round % 2 == 0 {
                serde_json::to_string(&v).unwrap()
            } else {
                serde_json::to_string_pretty(&v).unwrap()
            };
            let paths: Vec<&str> = (0..1 + rnd(2)).map(|_| all[rnd(6) as usize]).collect();
            let drop = rnd(2) == 0;
            let action = if drop { Action::Drop } else { mask() };
            let mut want = v.clone();
            for p in &paths {
                reference(&mut want, &p.split('.').collect::<Vec<_>>(), drop);
            }
            let got = match run(&text, &paths, &action) {
                Some(t) => serde_json::from_str::<Value>(&t).expect("output is JSON"),
                None => v.clone(),
            };
            assert_eq!(got, want, "{text} {paths:?} drop={drop}");
        }
    }
}
