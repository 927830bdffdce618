//! Byte classes of 16- and 64-byte blocks as bit masks (bit k = byte k), the building block
//! of the scanner's fast paths: one SIMD compare per class where the target has SIMD (wasm
//! `simd128`, which the workspace turns on for plugins in `.cargo/config.toml`; SSE2 on
//! x86_64), a plain loop elsewhere ([`portable`], also what the tests compare with).

/// Where the bytes of a block that matter to JSON structure are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Classes {
    /// `"`
    pub quote: u64,
    /// `\`
    pub backslash: u64,
    /// `{` or `[`
    pub open: u64,
    /// `}` or `]`
    pub close: u64,
    /// bytes below 0x20 (not allowed raw inside strings)
    pub control: u64,
}

/// The classes of 64 bytes.
#[inline(always)]
pub fn classes64(c: &[u8; 64]) -> Classes {
    let mut out = Classes::default();
    for (k, chunk) in c.chunks_exact(16).enumerate() {
        let m = imp::classes16(chunk.try_into().expect("16 bytes"));
        let shift = 16 * k as u32;
        out.quote |= u64::from(m[0]) << shift;
        out.backslash |= u64::from(m[1]) << shift;
        out.open |= u64::from(m[2]) << shift;
        out.close |= u64::from(m[3]) << shift;
        out.control |= u64::from(m[4]) << shift;
    }
    out
}

/// Quotes, backslashes and control bytes of 16 bytes, in one mask: where a run of plain
/// string content ends.
#[inline(always)]
pub fn string_stops(c: &[u8; 16]) -> u32 {
    imp::string_stops(c)
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[allow(unsafe_code)]
mod imp {
    use core::arch::wasm32::*;

    #[inline(always)]
    fn load(c: &[u8; 16]) -> v128 {
        // SAFETY: `c` is 16 readable bytes, and wasm loads have no alignment requirement.
        unsafe { v128_load(c.as_ptr().cast()) }
    }

    #[inline(always)]
    fn mask(v: v128) -> u32 {
        u32::from(u8x16_bitmask(v))
    }

    #[inline(always)]
    pub fn string_stops(c: &[u8; 16]) -> u32 {
        let x = load(c);
        mask(v128_or(
            v128_or(
                u8x16_eq(x, u8x16_splat(b'"')),
                u8x16_eq(x, u8x16_splat(b'\\')),
            ),
            u8x16_lt(x, u8x16_splat(0x20)),
        ))
    }

    #[inline(always)]
    pub fn classes16(c: &[u8; 16]) -> [u32; 5] {
        let x = load(c);
        // `{` and `[` (`}` and `]`) differ only in bit 0x20.
        let folded = v128_or(x, u8x16_splat(0x20));
        [
            mask(u8x16_eq(x, u8x16_splat(b'"'))),
            mask(u8x16_eq(x, u8x16_splat(b'\\'))),
            mask(u8x16_eq(folded, u8x16_splat(b'{'))),
            mask(u8x16_eq(folded, u8x16_splat(b'}'))),
            mask(u8x16_lt(x, u8x16_splat(0x20))),
        ]
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod imp {
    use core::arch::x86_64::*;

    #[inline(always)]
    fn load(c: &[u8; 16]) -> __m128i {
        // SAFETY: `c` is 16 readable bytes; `loadu` has no alignment requirement, and SSE2 is
        // part of x86_64.
        unsafe { _mm_loadu_si128(c.as_ptr().cast()) }
    }

    #[inline(always)]
    fn eq(x: __m128i, b: u8) -> __m128i {
        // SAFETY: SSE2 is part of x86_64.
        unsafe { _mm_cmpeq_epi8(x, _mm_set1_epi8(b as i8)) }
    }

    #[inline(always)]
    fn control(x: __m128i) -> __m128i {
        // x <= 0x1f (unsigned) exactly when min(x, 0x1f) == x. SAFETY: SSE2 is part of x86_64.
        unsafe { _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(0x1f)), x) }
    }

    #[inline(always)]
    fn mask(v: __m128i) -> u32 {
        // SAFETY: SSE2 is part of x86_64.
        unsafe { _mm_movemask_epi8(v) as u32 }
    }

    #[inline(always)]
    pub fn string_stops(c: &[u8; 16]) -> u32 {
        let x = load(c);
        mask(eq(x, b'"')) | mask(eq(x, b'\\')) | mask(control(x))
    }

    #[inline(always)]
    pub fn classes16(c: &[u8; 16]) -> [u32; 5] {
        let x = load(c);
        // SAFETY: SSE2 is part of x86_64.
        let folded = unsafe { _mm_or_si128(x, _mm_set1_epi8(0x20)) };
        [
            mask(eq(x, b'"')),
            mask(eq(x, b'\\')),
            mask(eq(folded, b'{')),
            mask(eq(folded, b'}')),
            mask(control(x)),
        ]
    }
}

#[cfg(not(any(
    all(target_arch = "wasm32", target_feature = "simd128"),
    target_arch = "x86_64"
)))]
mod imp {
    pub use super::portable::{classes16, string_stops};
}

/// The same classes one byte at a time.
#[cfg_attr(
    any(
        all(target_arch = "wasm32", target_feature = "simd128"),
        target_arch = "x86_64"
    ),
    allow(dead_code)
)]
pub mod portable {
    fn mask(c: &[u8; 16], f: impl Fn(u8) -> bool) -> u32 {
        c.iter()
            .enumerate()
            .fold(0, |m, (k, &b)| m | (u32::from(f(b)) << k))
    }

    pub fn string_stops(c: &[u8; 16]) -> u32 {
        mask(c, |b| matches!(b, b'"' | b'\\' | 0..0x20))
    }

    pub fn classes16(c: &[u8; 16]) -> [u32; 5] {
        [
            mask(c, |b| b == b'"'),
            mask(c, |b| b == b'\\'),
            mask(c, |b| matches!(b, b'{' | b'[')),
            mask(c, |b| matches!(b, b'}' | b']')),
            mask(c, |b| b < 0x20),
        ]
    }
}

/// The characters escaped by a backslash: the byte after each odd-length run of
/// backslashes. `carry` says whether the previous block's last byte escapes this block's
/// first, and is updated for the next block. (The carry-propagating addition of simdjson's
/// stage 1.)
#[inline(always)]
pub fn escaped(backslash: u64, carry: &mut u64) -> u64 {
    const EVEN: u64 = 0x5555_5555_5555_5555;
    let backslash = backslash & !*carry;
    let follows_escape = (backslash << 1) | *carry;
    let odd_starts = backslash & !EVEN & !follows_escape;
    let (even_starts, overflow) = odd_starts.overflowing_add(backslash);
    *carry = u64::from(overflow);
    (EVEN ^ (even_starts << 1)) & follows_escape
}

/// Bit k set when an odd number of bits 0..=k of `x` are set (inside a quoted span, for a
/// mask of unescaped quotes).
#[inline(always)]
pub fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    #[test]
    fn simd_classes_match_the_byte_definitions() {
        // Every byte value at every position, over random and near-miss backgrounds.
        let mut next = rng(0x2545_f491_4f6c_dd1d);
        for v in 0..=255u8 {
            for k in 0..16 {
                let mut random = [0u8; 16];
                random.iter_mut().for_each(|x| *x = next() as u8);
                for mut c in [random, [v ^ 0x20; 16], [v ^ 0x01; 16]] {
                    c[k] = v;
                    assert_eq!(imp::classes16(&c), portable::classes16(&c), "{c:?}");
                    assert_eq!(imp::string_stops(&c), portable::string_stops(&c), "{c:?}");
                }
            }
        }
        let mut c = [0u8; 64];
        c.iter_mut().for_each(|x| *x = next() as u8);
        c[0] = b'"';
        c[63] = b']';
        c[40] = b'\\';
        let got = classes64(&c);
        assert_eq!(got.quote & 1, 1);
        assert_eq!(got.close >> 63, 1);
        assert_eq!((got.backslash >> 40) & 1, 1);
    }

    #[test]
    fn escapes_are_found_across_runs_and_blocks() {
        // Against a byte-at-a-time reading of the same bytes, split into 64-byte blocks.
        let mut next = rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let len = 64 * (1 + next() % 3) as usize;
            let bytes: Vec<bool> = (0..len).map(|_| next().is_multiple_of(3)).collect();
            let mut want = vec![false; len];
            let mut i = 0;
            while i < len {
                if bytes[i] {
                    if i + 1 < len {
                        want[i + 1] = true;
                    }
                    i += 2;
                } else {
                    i += 1;
                }
            }
            let mut carry = 0;
            for (b, block) in bytes.chunks(64).enumerate() {
                let mask = block
                    .iter()
                    .enumerate()
                    .fold(0u64, |m, (k, &x)| m | (u64::from(x) << k));
                let got = escaped(mask, &mut carry);
                for k in 0..64 {
                    assert_eq!(
                        got >> k & 1 == 1,
                        want[b * 64 + k],
                        "{bytes:?} at {}",
                        b * 64 + k
                    );
                }
            }
        }
    }

    #[test]
    fn prefix_xor_marks_quoted_spans() {
        assert_eq!(prefix_xor(0b1001_0010), 0b1110 | (!0u64 << 7));
        assert_eq!(prefix_xor(1 << 63), 1 << 63);
        assert_eq!(prefix_xor(0b11), 0b01);
    }
}
