//! f32 activations times bf16 or f16 weights on the CPU, batch-invariant, without widening
//! the weight first.
//!
//! A dense layer held in bf16/f16 multiplies "in that dtype": the input is rounded to the
//! dtype, the products are summed in f32 and the result is rounded to the dtype (then
//! widened back; see `Linear::forward`). candle's CPU path widens the whole weight to f32 on
//! every call (22× slower than f32 in `bench --decode-step`); here each weight vector is
//! widened in registers as it is read, and one weight row serves up to [`ROW_TILE`]
//! activation rows.
//!
//! Every output is summed in one fixed order, the same in every path: lane `l` of sixteen
//! adds the products of elements `l`, `l + 16`, … in order (a multiply then an add, never
//! fused), the remainder goes to the first lanes, and the lanes are added pairwise — so a
//! row's result does not depend on its batch, the threads or the machine's vector width.

use half::{bf16, f16};

/// Lanes of the fixed summation order.
const LANES: usize = 16;
/// Activation rows computed together against one weight row.
const ROW_TILE: usize = 4;
/// Weight rows per work item of the thread pool.
const CHUNK: usize = 16;

/// A dense `[n, k]` weight in half precision, row-major.
#[derive(Clone, Copy)]
pub enum HalfWeights<'a> {
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl HalfWeights<'_> {
    fn bits(&self) -> &[u16] {
        match self {
            Self::Bf16(w) => half_bits(w),
            Self::F16(w) => half_bits(w),
        }
    }

    fn is_bf16(&self) -> bool {
        matches!(self, Self::Bf16(_))
    }

    fn round(&self, x: f32) -> f32 {
        match self {
            Self::Bf16(_) => bf16::from_f32(x).to_f32(),
            Self::F16(_) => f16::from_f32(x).to_f32(),
        }
    }
}

/// The bit patterns of half-precision values.
fn half_bits<T: Copy>(v: &[T]) -> &[u16] {
    assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: `bf16` and `f16` are `repr(transparent)` over `u16`: same size (asserted) and
    // alignment, every bit pattern valid; the slice covers the same memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) }
}

/// Adds the remainder to `acc` and sums the lanes pairwise.
#[inline(always)]
fn finish(mut acc: [f32; LANES], x: &[f32], w: &[u16], widen: impl Fn(u16) -> f32) -> f32 {
    for (l, (a, &b)) in x.iter().zip(w).enumerate() {
        acc[l] += a * widen(b);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

fn widen_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn widen_f16(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

/// `R` dot products of rows `x[t]` with one weight row: the portable definition.
fn dots_portable<const R: usize>(x: [&[f32]; R], w: &[u16], bf: bool) -> [f32; R] {
    let widen = if bf { widen_bf16 } else { widen_f16 };
    let n = w.len() / LANES * LANES;
    std::array::from_fn(|t| {
        let mut acc = [0f32; LANES];
        for i in (0..n).step_by(LANES) {
            for l in 0..LANES {
                acc[l] += x[t][i + l] * widen(w[i + l]);
            }
        }
        finish(acc, &x[t][n..], &w[n..], widen)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512<const R: usize>(x: [&[f32]; R], w: &[u16], bf: bool) -> [f32; R] {
    use std::arch::x86_64::*;
    let n = w.len() / LANES * LANES;
    let mut lanes = [[0f32; LANES]; R];
    // SAFETY: loads of 16 values at offsets below `n`, inside `w` and every `x[t]` (each as
    // long as `w`, checked by the caller); stores fill `lanes[t]`, 16 floats.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let mut i = 0;
        while i < n {
            let raw = _mm256_loadu_si256(w.as_ptr().add(i) as *const _);
            let wv = if bf {
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
            } else {
                _mm512_cvtph_ps(raw)
            };
            for t in 0..R {
                acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_loadu_ps(x[t].as_ptr().add(i)), wv));
            }
            i += LANES;
        }
        for t in 0..R {
            _mm512_storeu_ps(lanes[t].as_mut_ptr(), acc[t]);
        }
    }
    let widen = if bf { widen_bf16 } else { widen_f16 };
    std::array::from_fn(|t| finish(lanes[t], &x[t][n..], &w[n..], widen))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dots_avx2<const R: usize>(x: [&[f32]; R], w: &[u16], bf: bool) -> [f32; R] {
    use std::arch::x86_64::*;
    let n = w.len() / LANES * LANES;
    let mut lanes = [[0f32; LANES]; R];
    // SAFETY: as in `dots_avx512`, lanes 0–7 and 8–15 in two registers.
    unsafe {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        let mut i = 0;
        while i < n {
            let (r0, r1) =
                (_mm_loadu_si128(w.as_ptr().add(i) as *const _), _mm_loadu_si128(w.as_ptr().add(i + 8) as *const _));
            let (w0, w1) = if bf {
                (
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r0), 16)),
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r1), 16)),
                )
            } else {
                (_mm256_cvtph_ps(r0), _mm256_cvtph_ps(r1))
            };
            for t in 0..R {
                let p = x[t].as_ptr().add(i);
                lo[t] = _mm256_add_ps(lo[t], _mm256_mul_ps(_mm256_loadu_ps(p), w0));
                hi[t] = _mm256_add_ps(hi[t], _mm256_mul_ps(_mm256_loadu_ps(p.add(8)), w1));
            }
            i += LANES;
        }
        for t in 0..R {
            _mm256_storeu_ps(lanes[t].as_mut_ptr(), lo[t]);
            _mm256_storeu_ps(lanes[t].as_mut_ptr().add(8), hi[t]);
        }
    }
    let widen = if bf { widen_bf16 } else { widen_f16 };
    std::array::from_fn(|t| finish(lanes[t], &x[t][n..], &w[n..], widen))
}

/// Which dot-product path runs: 0 portable, 1 AVX2 + F16C, 2 AVX-512F (`MEDBATCH_KERNEL`
/// set to `portable` or `avx2` picks a narrower one, as for the quantized kernels).
fn level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let wanted = std::env::var("MEDBATCH_KERNEL").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            if wanted != "portable" {
                if wanted != "avx2" && is_x86_feature_detected!("avx512f") {
                    return 2;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
                    return 1;
                }
            }
        }
        let _ = wanted;
        0
    })
}

#[inline(always)]
fn dots<const R: usize>(level: u8, x: [&[f32]; R], w: &[u16], bf: bool) -> [f32; R] {
    match level {
        // SAFETY: level 2 only where the CPU has AVX-512F.
        #[cfg(target_arch = "x86_64")]
        2 => unsafe { dots_avx512(x, w, bf) },
        // SAFETY: level 1 only where the CPU has AVX2 and F16C.
        #[cfg(target_arch = "x86_64")]
        1 => unsafe { dots_avx2(x, w, bf) },
        _ => dots_portable(x, w, bf),
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: work items write disjoint columns of the output (see `matmul_level`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `x · Wᵀ` for `x` `[rows, k]` f32 and `w` `[n, k]`: the input rounded to the weight's
/// dtype, products summed in f32 in the fixed order, each result rounded to the dtype and
/// returned in f32 (`[rows, n]`). Weight rows are split over candle's CPU threads.
pub fn matmul(x: &[f32], k: usize, w: HalfWeights<'_>) -> Vec<f32> {
    matmul_level(level(), x, k, w)
}

pub(crate) fn matmul_level(level: u8, x: &[f32], k: usize, w: HalfWeights<'_>) -> Vec<f32> {
    let bits = w.bits();
    assert!(k > 0 && x.len().is_multiple_of(k) && bits.len().is_multiple_of(k), "shapes do not match");
    let (rows, n, bf) = (x.len() / k, bits.len() / k, w.is_bf16());
    let xr: Vec<f32> = x.iter().map(|&v| w.round(v)).collect();
    let mut out = vec![0f32; rows * n];
    let ptr = OutPtr(out.as_mut_ptr());
    let work = |range: std::ops::Range<usize>| {
        let ptr = ptr;
        for c in range {
            for j in c * CHUNK..((c + 1) * CHUNK).min(n) {
                let wj = &bits[j * k..(j + 1) * k];
                let row = |r: usize| &xr[r * k..(r + 1) * k];
                let mut r = 0;
                while r < rows {
                    let take = (rows - r).min(ROW_TILE);
                    let put = |t: usize, v: f32| {
                        // SAFETY: element (r + t, j) lies inside `out`, and column `j`
                        // belongs to this work item alone.
                        unsafe { *ptr.0.add((r + t) * n + j) = w.round(v) };
                    };
                    match take {
                        4 => dots(level, [row(r), row(r + 1), row(r + 2), row(r + 3)], wj, bf)
                            .into_iter()
                            .enumerate()
                            .for_each(|(t, v)| put(t, v)),
                        _ => (0..take).for_each(|t| put(t, dots(level, [row(r + t)], wj, bf)[0])),
                    }
                    r += take;
                }
            }
        }
    };
    let chunks = n.div_ceil(CHUNK);
    if rows * n * k < 1 << 16 {
        work(0..chunks);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(chunks, work);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.731 + seed as f32).sin() * 2.0) * if i % 53 == 0 { 9.0 } else { 1.0 }).collect()
    }

    #[test]
    fn every_path_gives_the_portable_bits_and_rows_do_not_depend_on_the_batch() {
        for k in [1, 15, 16, 17, 100, 256] {
            let (n, rows) = (37, 9);
            let wf = values(n * k, 1);
            let x = values(rows * k, 2);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            for w in [HalfWeights::Bf16(&wb), HalfWeights::F16(&wh)] {
                let want = matmul_level(0, &x, k, w);
                for level in 1..=level() {
                    assert!(matmul_level(level, &x, k, w) == want, "k {k}: path {level} differs");
                }
                for r in 0..rows {
                    let alone = matmul(&x[r * k..(r + 1) * k], k, w);
                    assert!(alone[..] == want[r * n..(r + 1) * n], "k {k}: row {r} alone differs");
                }
                // Against an f64 sum of the same rounded values: within the dtype's rounding.
                for r in 0..rows {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|i| {
                                let a = w.round(x[r * k + i]) as f64;
                                let b = match w {
                                    HalfWeights::Bf16(v) => v[j * k + i].to_f64(),
                                    HalfWeights::F16(v) => v[j * k + i].to_f64(),
                                };
                                a * b
                            })
                            .sum();
                        let got = want[r * n + j] as f64;
                        let unit = if w.is_bf16() { 1.0 / 128.0 } else { 1.0 / 1024.0 };
                        assert!((got - exact).abs() <= unit * exact.abs() + 1e-3, "k {k}: {got} vs {exact}");
                    }
                }
            }
        }
    }
}
