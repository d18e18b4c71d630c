//! The x86 paths of the blocked kernel: AVX-512 VNNI (one `vpdpbusd` per four values of
//! sixteen weight rows) and AVX2 (`vpmaddubsw` + `vpmaddwd`, sixteen rows as two halves). Each
//! weight vector is loaded once and multiplied into every activation row of the tile. Both
//! compute the integer dot products exactly (integer sums do not depend on their order) and
//! then do the portable kernel's float operations in its order (`scalar` in `mod.rs`), so all
//! paths give bit-identical results.

use super::{sub_sum, Activations, Kernel, Panels, WeightType, PANEL, ROW_TILE};
use std::arch::x86_64::*;

/// The kernels this CPU runs, fastest first.
pub(super) fn kernels() -> Vec<(&'static str, Kernel)> {
    let mut out: Vec<(&'static str, Kernel)> = Vec::new();
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
    {
        out.push(("avx512-vnni", avx512));
    }
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        out.push(("avx2", avx2));
    }
    out
}

const _: () = assert!(ROW_TILE == 4, "the dispatch below names tiles of 1 to 4 rows");

fn avx512(p: &Panels, a: &Activations, pi: usize, r0: usize, rows: usize, tile: &mut [[f32; PANEL]; ROW_TILE]) {
    // SAFETY: chosen only when the CPU has AVX-512F, BW and VNNI; `r0 + rows <= a.rows`
    // (the caller's tile loop) and `pi < p.panels()`.
    unsafe {
        match rows {
            // Few rows: four partial sums per row to hide the latency of `vpdpbusd`; more
            // rows: two, so that every accumulator stays in a register.
            1 => avx512_impl::<1, 4>(p, a, pi, r0, tile),
            2 => avx512_impl::<2, 4>(p, a, pi, r0, tile),
            3 => avx512_impl::<3, 2>(p, a, pi, r0, tile),
            _ => avx512_impl::<4, 2>(p, a, pi, r0, tile),
        }
    }
}

fn avx2(p: &Panels, a: &Activations, pi: usize, r0: usize, rows: usize, tile: &mut [[f32; PANEL]; ROW_TILE]) {
    // SAFETY: chosen only when the CPU has AVX2 and FMA; bounds as in `avx512`.
    unsafe {
        match rows {
            1 => avx2_impl::<1>(p, a, pi, r0, tile),
            2 => avx2_impl::<2>(p, a, pi, r0, tile),
            3 => avx2_impl::<3>(p, a, pi, r0, tile),
            _ => avx2_impl::<4>(p, a, pi, r0, tile),
        }
    }
}

/// Four activation values (bytes `4c..4c + 4` of `x`) as one i32.
#[inline(always)]
unsafe fn four(x: *const i8, c: usize) -> i32 {
    // SAFETY (caller): `x` points at a block of the row with at least `4c + 4` values.
    unsafe { std::ptr::read_unaligned(x.add(4 * c) as *const i32) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512_impl<const R: usize, const P: usize>(
    p: &Panels,
    a: &Activations,
    pi: usize,
    r0: usize,
    tile: &mut [[f32; PANEL]; ROW_TILE],
) {
    let (bvals, blocks, nsb) = (p.ty.block().1, p.blocks(), p.nsb());
    let chunks = bvals / nsb / 4;
    let q8 = matches!(p.ty, WeightType::Q8_0 | WeightType::Q4_0);
    let nibbles = p.ty.nibbles();
    debug_assert!(chunks.is_multiple_of(P) && P.is_multiple_of(2));
    // SAFETY: every pointer below is into `p`'s or `a`'s vectors at offsets inside them:
    // panel `pi` < panels, block `b` < blocks, chunk < bvals / 4 (nibble pair < bvals / 8),
    // row < a.rows.
    unsafe {
        let zero = _mm512_setzero_si512();
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let pb = pi * blocks + b;
            let q = p.q.as_ptr().add(pb * p.ty.packed_block());
            let x: [*const i8; R] = std::array::from_fn(|t| a.q.as_ptr().add((r0 + t) * a.k + b * bvals));
            let mut sumi = [zero; R];
            let mut summ = [zero; R];
            for s in 0..nsb {
                // P partial sums per row (chunks c ≡ i mod P) shorten the dependency chain;
                // integer addition makes the split invisible in the result.
                let mut part = [[zero; R]; P];
                let mut c = s * chunks;
                while c < (s + 1) * chunks {
                    let mut w = [zero; P];
                    for i in (0..P).step_by(2) {
                        if nibbles {
                            let v = _mm512_loadu_si512(q.add((c + i) * 32) as *const _);
                            w[i] = _mm512_and_si512(v, low);
                            w[i + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                        } else {
                            w[i] = _mm512_loadu_si512(q.add((c + i) * 64) as *const _);
                            w[i + 1] = _mm512_loadu_si512(q.add((c + i + 1) * 64) as *const _);
                        }
                    }
                    for i in 0..P {
                        for t in 0..R {
                            part[i][t] = _mm512_dpbusd_epi32(part[i][t], w[i], _mm512_set1_epi32(four(x[t], c + i)));
                        }
                    }
                    c += P;
                }
                let dot: [__m512i; R] = std::array::from_fn(|t| {
                    let mut d = part[0][t];
                    for pt in &part[1..] {
                        d = _mm512_add_epi32(d, pt[t]);
                    }
                    d
                });
                if q8 {
                    sumi = dot;
                } else {
                    let sc = _mm512_loadu_si512(p.sc.as_ptr().add((pb * nsb + s) * PANEL) as *const _);
                    let mn = _mm512_loadu_si512(p.mn.as_ptr().add((pb * nsb + s) * PANEL) as *const _);
                    for t in 0..R {
                        sumi[t] = _mm512_add_epi32(sumi[t], _mm512_mullo_epi32(dot[t], sc));
                        let bsum = _mm512_set1_epi32(sub_sum(p, a, r0 + t, b, s));
                        summ[t] = _mm512_add_epi32(summ[t], _mm512_mullo_epi32(mn, bsum));
                    }
                }
            }
            let d = _mm512_loadu_ps(p.d.as_ptr().add(pb * PANEL));
            let dmin = if q8 { d } else { _mm512_loadu_ps(p.dmin.as_ptr().add(pb * PANEL)) };
            for t in 0..R {
                let da = *a.d.get_unchecked((r0 + t) * a.blocks + b);
                if q8 {
                    let isum = _mm512_sub_epi32(sumi[t], _mm512_set1_epi32(sub_sum(p, a, r0 + t, b, 0)));
                    acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(da)), _mm512_cvtepi32_ps(isum), acc[t]);
                } else {
                    let v = _mm512_fnmadd_ps(
                        dmin,
                        _mm512_cvtepi32_ps(summ[t]),
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(sumi[t])),
                    );
                    acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(da), v, acc[t]);
                }
            }
        }
        for t in 0..R {
            _mm512_storeu_ps(tile[t].as_mut_ptr(), acc[t]);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_impl<const R: usize>(
    p: &Panels,
    a: &Activations,
    pi: usize,
    r0: usize,
    tile: &mut [[f32; PANEL]; ROW_TILE],
) {
    let (bvals, blocks, nsb) = (p.ty.block().1, p.blocks(), p.nsb());
    let chunks = bvals / nsb / 4;
    let q8 = matches!(p.ty, WeightType::Q8_0 | WeightType::Q4_0);
    // Q8_0 weights multiply as signed bytes (no correction); the rest are unsigned.
    let signed = p.ty == WeightType::Q8_0;
    let nibbles = p.ty.nibbles();
    debug_assert!(chunks % 2 == 0);
    // SAFETY: as in `avx512_impl`; each 64-byte run is read as two 32-byte halves.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let low = _mm256_set1_epi8(0x0F);
        let zero = _mm256_setzero_si256();
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..blocks {
                let pb = pi * blocks + b;
                let q = p.q.as_ptr().add(pb * p.ty.packed_block() + 32 * h);
                let lanes = pb * PANEL + 8 * h;
                let x: [*const i8; R] = std::array::from_fn(|t| a.q.as_ptr().add((r0 + t) * a.k + b * bvals));
                let mut sumi = [zero; R];
                let mut summ = [zero; R];
                for s in 0..nsb {
                    let mut dot = [zero; R];
                    let mut c = s * chunks;
                    while c < (s + 1) * chunks {
                        let pair = if nibbles {
                            let v = _mm256_loadu_si256(q.add(c * 32) as *const _);
                            [_mm256_and_si256(v, low), _mm256_and_si256(_mm256_srli_epi16(v, 4), low)]
                        } else {
                            [
                                _mm256_loadu_si256(q.add(c * 64) as *const _),
                                _mm256_loadu_si256(q.add(c * 64 + 64) as *const _),
                            ]
                        };
                        for (i, w) in pair.into_iter().enumerate() {
                            if signed {
                                // Signed weights (stored plus 128) against signed activations:
                                // |w| as the unsigned operand, the activation carrying w's sign
                                // (|w| ≤ 128, Q8_0 activations |x| ≤ 127: no saturation).
                                let ws = _mm256_xor_si256(w, flip);
                                let wabs = _mm256_abs_epi8(ws);
                                for t in 0..R {
                                    let xs = _mm256_sign_epi8(_mm256_set1_epi32(four(x[t], c + i)), ws);
                                    let pairs = _mm256_maddubs_epi16(wabs, xs);
                                    dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(pairs, ones));
                                }
                            } else {
                                // Unsigned weights ≤ 63 against |x| ≤ 128: pairs stay below 2^15.
                                for t in 0..R {
                                    let pairs = _mm256_maddubs_epi16(w, _mm256_set1_epi32(four(x[t], c + i)));
                                    dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(pairs, ones));
                                }
                            }
                        }
                        c += 2;
                    }
                    if q8 {
                        sumi = dot;
                    } else {
                        let at = (pb * nsb + s) * PANEL + 8 * h;
                        let sc = _mm256_loadu_si256(p.sc.as_ptr().add(at) as *const _);
                        let mn = _mm256_loadu_si256(p.mn.as_ptr().add(at) as *const _);
                        for t in 0..R {
                            sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(dot[t], sc));
                            let bsum = _mm256_set1_epi32(sub_sum(p, a, r0 + t, b, s));
                            summ[t] = _mm256_add_epi32(summ[t], _mm256_mullo_epi32(mn, bsum));
                        }
                    }
                }
                let d = _mm256_loadu_ps(p.d.as_ptr().add(lanes));
                for t in 0..R {
                    let da = *a.d.get_unchecked((r0 + t) * a.blocks + b);
                    if q8 {
                        // Q8_0's products above are of the signed weights already; Q4_0's
                        // get their correction: the same integers as the VNNI path.
                        let isum = if signed {
                            sumi[t]
                        } else {
                            _mm256_sub_epi32(sumi[t], _mm256_set1_epi32(sub_sum(p, a, r0 + t, b, 0)))
                        };
                        acc[t] =
                            _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(da)), _mm256_cvtepi32_ps(isum), acc[t]);
                    } else {
                        let dmin = _mm256_loadu_ps(p.dmin.as_ptr().add(lanes));
                        let v = _mm256_fnmadd_ps(
                            dmin,
                            _mm256_cvtepi32_ps(summ[t]),
                            _mm256_mul_ps(d, _mm256_cvtepi32_ps(sumi[t])),
                        );
                        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(da), v, acc[t]);
                    }
                }
            }
            for t in 0..R {
                _mm256_storeu_ps(tile[t].as_mut_ptr().add(8 * h), acc[t]);
            }
        }
    }
}
