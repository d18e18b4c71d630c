//! The blocked kernels against candle's dequantization and row-wise kernel, each other, and
//! themselves under every batch size, tile and split.

use super::*;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

const TYPES: [(WeightType, GgmlDType); 5] = [
    (WeightType::Q8_0, GgmlDType::Q8_0),
    (WeightType::Q4_0, GgmlDType::Q4_0),
    (WeightType::Q4K, GgmlDType::Q4K),
    (WeightType::Q5K, GgmlDType::Q5K),
    (WeightType::Q6K, GgmlDType::Q6K),
];

/// Deterministic values with a spread of magnitudes (and some outliers per block).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            let spike = if i % 97 == 0 { 8.0 } else { 1.0 };
            (u * spike * (1.0 + (i % 7) as f64 * 0.3)) as f32
        })
        .collect()
}

/// A quantized `[n, k]` weight: candle's tensor and the packed panels.
fn weight(ty: GgmlDType, wt: WeightType, n: usize, k: usize, seed: u64) -> (QTensor, Panels) {
    let t = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, ty).unwrap();
    let packed = Panels::pack(wt, n, k, &q.data().unwrap()).unwrap();
    (q, packed)
}

#[test]
fn packed_values_dequantize_like_candle() {
    for (wt, ty) in TYPES {
        let (n, k) = (19, 512);
        let (q, p) = weight(ty, wt, n, k, 1);
        let want = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let (bvals, nsb) = (wt.block().1, p.nsb());
        let sbv = bvals / nsb;
        for (row, want) in want.iter().enumerate() {
            let (pi, r) = (row / PANEL, row % PANEL);
            for (i, &w) in want.iter().enumerate() {
                let (b, v) = (i / bvals, i % bvals);
                let pb = pi * p.blocks() + b;
                let qv = p.value(pb, v / 4, r, v % 4) as f32;
                let s = v / sbv;
                let d = p.d[pb * PANEL + r];
                let got = match wt {
                    WeightType::Q8_0 => d * (qv - 128.0),
                    WeightType::Q4_0 => d * (qv - 8.0),
                    _ => {
                        let (sc, mn) =
                            (p.sc[(pb * nsb + s) * PANEL + r] as f32, p.mn[(pb * nsb + s) * PANEL + r] as f32);
                        d * sc * qv - p.dmin[pb * PANEL + r] * mn
                    }
                };
                assert!((got - w).abs() <= 1e-6 * (1.0 + w.abs()), "{wt:?} row {row} value {i}: {got} vs {w}");
            }
        }
    }
}

#[test]
fn every_kernel_gives_the_portable_kernels_bits() {
    for (wt, ty) in TYPES {
        let (n, k) = (37, 512);
        let (_, p) = weight(ty, wt, n, k, 2);
        let a = p.quantize(&values(9 * k, 3));
        let mut want = vec![0f32; 9 * n];
        p.product_with(scalar, &a, 0..p.panels(), &mut want);
        for (name, kernel) in kernels() {
            let mut got = vec![0f32; 9 * n];
            p.product_with(kernel, &a, 0..p.panels(), &mut got);
            assert!(got == want, "{wt:?}: {name} differs from the portable kernel");
        }
    }
}

#[test]
fn a_row_gets_the_same_bits_in_any_batch_and_any_split() {
    for (wt, ty) in TYPES {
        let (n, k) = (45, 256);
        let (_, p) = weight(ty, wt, n, k, 4);
        let x = values(70 * k, 5);
        let alone: Vec<Vec<f32>> = (0..70).map(|r| p.matmul(&x[r * k..(r + 1) * k])).collect();
        for rows in 1..=70 {
            let together = p.matmul(&x[..rows * k]);
            for r in 0..rows {
                assert!(together[r * n..(r + 1) * n] == alone[r][..], "{wt:?}: row {r} of {rows} differs from alone");
            }
        }
        // Panels computed in any grouping (as threads would take them).
        let a = p.quantize(&x[..13 * k]);
        let mut whole = vec![0f32; 13 * n];
        p.product(&a, 0..p.panels(), &mut whole);
        let mut pieces = vec![0f32; 13 * n];
        for i in 0..p.panels() {
            p.product(&a, i..i + 1, &mut pieces);
        }
        assert!(pieces == whole, "{wt:?}: panel by panel differs");
        // Two threads splitting the panels at every cut, as the pool does with 2 threads.
        for cut in 0..=p.panels() {
            let mut split = vec![0f32; 13 * n];
            let ptr = OutPtr(split.as_mut_ptr(), split.len());
            std::thread::scope(|s| {
                for range in [0..cut, cut..p.panels()] {
                    let (p, a) = (&p, &a);
                    s.spawn(move || {
                        let ptr = ptr;
                        // SAFETY: the two ranges are disjoint panels (disjoint columns).
                        let out = unsafe { std::slice::from_raw_parts_mut(ptr.0, ptr.1) };
                        p.product(a, range, out);
                    });
                }
            });
            assert!(split == whole, "{wt:?}: two threads cut at panel {cut} differ");
        }
    }
}

#[test]
fn products_match_candles_row_wise_kernel() {
    for (wt, ty) in TYPES {
        let (n, k) = (33, 768);
        let (q, p) = weight(ty, wt, n, k, 6);
        let rows = 5;
        let x = values(rows * k, 7);
        let got = p.matmul(&x);
        let want = candle_row_wise(&q, &x).unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 2e-5 * scale, "{wt:?}: {worst} off candle's kernel (scale {scale})");
    }
}
