//! Where in a stream chunk are the bytes the SSE fast path must look at?
//!
//! One SIMD pass over a stream chunk that finds what the SSE fast path needs:
//! every line terminator (CR, LF) and every place a quoted five-letter word
//! starting with `u` or `e` starts (`"u`/`"e` with another `"` six bytes
//! later), which is where the JSON keys `"usage"` and `"error"` can be. Everything else (the bulk of a stream:
//! content text and the envelope around it) is skipped 32 bytes at a time.
//!
//! wasm32 with `simd128` (how `wasm-build.sh` builds the filter) and x86_64
//! (SSE2, always present) use vector code; other targets a scalar loop. All
//! of them produce the same positions (tested against the scalar reference).

/// Positions of CR, LF and `"u....."`/`"e....."` starts in a slice, in
/// increasing order.
#[derive(Debug, Clone)]
pub struct Hits<'a> {
    hay: &'a [u8],
    /// Start of the 32-byte block `mask` describes.
    block: usize,
    /// Hits in the current block not yet returned, one bit per byte.
    mask: u32,
}

const BLOCK: usize = 32;
/// The pair test looks this far ahead.
const PAIR: usize = 6;

impl<'a> Hits<'a> {
    /// Hits in `hay` at or after `from`.
    pub fn new(hay: &'a [u8], from: usize) -> Self {
        let block = from - from % BLOCK;
        let mut hits = Hits { hay, block, mask: 0 };
        if block < hay.len() {
            hits.mask = block_mask(hay, block) & (u32::MAX << (from - block));
        }
        hits
    }
}

impl Iterator for Hits<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        loop {
            if self.mask != 0 {
                let bit = self.mask.trailing_zeros() as usize;
                self.mask &= self.mask.wrapping_sub(1);
                return Some(self.block.saturating_add(bit));
            }
            self.block = self.block.saturating_add(BLOCK);
            if self.block >= self.hay.len() {
                return None;
            }
            self.mask = block_mask(self.hay, self.block);
        }
    }
}

/// Whether byte `i` of `hay` is a hit (the scalar definition).
#[inline]
fn is_hit(hay: &[u8], i: usize) -> bool {
    match hay.get(i) {
        Some(b'\n' | b'\r') => true,
        Some(b'"') => {
            matches!(hay.get(i.saturating_add(1)), Some(b'u' | b'e')) && hay.get(i.saturating_add(PAIR)) == Some(&b'"')
        }
        _ => false,
    }
}

fn scalar_mask(hay: &[u8], block: usize) -> u32 {
    let mut m = 0u32;
    for j in 0..BLOCK {
        if is_hit(hay, block.saturating_add(j)) {
            m |= 1 << j;
        }
    }
    m
}

/// The bytes one vector step reads: a block and the pair test's look-ahead.
type Window = [u8; BLOCK + PAIR];

#[inline]
fn block_mask(hay: &[u8], block: usize) -> u32 {
    let window = hay.get(block..block.saturating_add(BLOCK + PAIR)).and_then(|w| <&Window>::try_from(w).ok());
    match window {
        Some(w) => simd_mask(w),
        None => scalar_mask(hay, block),
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline]
fn simd_mask(w: &Window) -> u32 {
    use core::arch::wasm32::*;
    let p = w.as_ptr();
    let half = |at: usize| -> u32 {
        // SAFETY: at <= 16, so every 16-byte load below ends within the
        // 38-byte window (at + PAIR + 16 <= 38); v128_load allows unaligned loads.
        let (v, x, y) = unsafe {
            (v128_load(p.add(at).cast()), v128_load(p.add(at + 1).cast()), v128_load(p.add(at + PAIR).cast()))
        };
        let q = u8x16_splat(b'"');
        let letter = v128_or(u8x16_eq(x, u8x16_splat(b'u')), u8x16_eq(x, u8x16_splat(b'e')));
        let t = v128_or(
            v128_or(u8x16_eq(v, u8x16_splat(b'\n')), u8x16_eq(v, u8x16_splat(b'\r'))),
            v128_and(v128_and(u8x16_eq(v, q), u8x16_eq(y, q)), letter),
        );
        u32::from(u8x16_bitmask(t))
    };
    half(0) | (half(16) << 16)
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn simd_mask(w: &Window) -> u32 {
    use core::arch::x86_64::*;
    let p = w.as_ptr();
    let half = |at: usize| -> u32 {
        // SAFETY: SSE2 is part of x86_64. at <= 16, so every 16-byte load
        // ends within the 38-byte window; _mm_loadu_si128 allows unaligned loads.
        unsafe {
            let v = _mm_loadu_si128(p.add(at).cast());
            let x = _mm_loadu_si128(p.add(at + 1).cast());
            let y = _mm_loadu_si128(p.add(at + PAIR).cast());
            let q = _mm_set1_epi8(b'"' as i8);
            let letter = _mm_or_si128(
                _mm_cmpeq_epi8(x, _mm_set1_epi8(b'u' as i8)),
                _mm_cmpeq_epi8(x, _mm_set1_epi8(b'e' as i8)),
            );
            let t = _mm_or_si128(
                _mm_or_si128(
                    _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8)),
                    _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\r' as i8)),
                ),
                _mm_and_si128(_mm_and_si128(_mm_cmpeq_epi8(v, q), _mm_cmpeq_epi8(y, q)), letter),
            );
            (_mm_movemask_epi8(t) as u32) & 0xFFFF
        }
    };
    half(0) | (half(16) << 16)
}

#[cfg(not(any(all(target_arch = "wasm32", target_feature = "simd128"), target_arch = "x86_64")))]
#[inline]
fn simd_mask(w: &Window) -> u32 {
    scalar_mask(w, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(hay: &[u8], from: usize) -> Vec<usize> {
        (from..hay.len()).filter(|&i| is_hit(hay, i)).collect()
    }

    #[test]
    fn finds_terminators_and_quoted_words() {
        let hay = b"data: {\"usage\":null,\"x\":\"ab\",\"model\":1}\r\n\n";
        let got: Vec<usize> = Hits::new(hay, 0).collect();
        assert_eq!(got, reference(hay, 0));
        assert_eq!(got, vec![7, 39, 40, 41]);
    }

    #[test]
    fn matches_the_scalar_definition_everywhere() {
        // A pseudo-random mix rich in quotes and line ends, every length and start.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let alphabet = b"\"\"\r\n uexb{}:,";
        let hay: Vec<u8> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                alphabet[(x % alphabet.len() as u64) as usize]
            })
            .collect();
        for len in 0..hay.len() {
            let h = &hay[..len];
            for from in [0, 1, 5, 31, 32, 33, 63, 64, 100] {
                if from > len {
                    continue;
                }
                assert_eq!(Hits::new(h, from).collect::<Vec<_>>(), reference(h, from), "len {len} from {from}");
            }
        }
    }
}
