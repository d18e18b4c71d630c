//! `medbatch bench --kernels`: the quantized matrix products on their own, for each GGUF
//! weight type the blocked kernel takes and each row count: the blocked kernel against
//! candle's row-wise kernel (which it replaced) and candle's `QMatMul` (its repacked tile
//! kernels, not batch-invariant), on random weights of the given shapes. It also checks
//! that each row of the batched product has the bits it has alone.

use crate::bench::median;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use medbatch_engine::kernels::{self, Panels, WeightType};
use std::process::ExitCode;
use std::time::Instant;

const TYPES: [WeightType; 5] = [WeightType::Q8_0, WeightType::Q4_0, WeightType::Q4K, WeightType::Q5K, WeightType::Q6K];

/// Seconds one call of `f` takes: the median of repetitions filling about `budget` seconds.
fn time(budget: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-6);
    let reps = ((budget / once) as usize).clamp(3, 200);
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Deterministic values in [-1, 1) (the scale does not matter to the speed).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 52) as f64 - 1.0) as f32
        })
        .collect()
}

pub fn run(shapes: &[(usize, usize)], rows: &[usize], runs: usize) -> anyhow::Result<ExitCode> {
    let threads = kernels::threads();
    eprintln!("kernel in use: {}; {threads} thread(s)", kernels::kernel_name());
    let budget = 0.2 * runs as f64;
    let mut mismatches = 0;
    for &(n, k) in shapes {
        for ty in TYPES {
            let (_, bvals) = ty.block();
            if !k.is_multiple_of(bvals) {
                eprintln!("skipping {ty:?} at {n}x{k}: {k} is not a multiple of {bvals}");
                continue;
            }
            let w = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu)?;
            let q = std::sync::Arc::new(QTensor::quantize(&w, kernels::ggml_type(ty))?);
            let panels = Panels::pack(ty, n, k, &q.data()?).map_err(anyhow::Error::msg)?;
            let qmm = QMatMul::from_arc(q.clone())?;
            for &m in rows {
                let x = values(m * k, 2 + m as u64);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
                let blocked = time(budget, || {
                    std::hint::black_box(panels.matmul(&x));
                });
                let row_wise = time(budget, || {
                    std::hint::black_box(kernels::candle_row_wise(&q, &x).unwrap());
                });
                let repacked = time(budget, || {
                    std::hint::black_box(qmm.forward(&xt).unwrap());
                });
                // Batch invariance: every row of the batched product as computed alone.
                let together = panels.matmul(&x);
                let invariant =
                    (0..m).all(|r| panels.matmul(&x[r * k..(r + 1) * k])[..] == together[r * n..(r + 1) * n]);
                if !invariant {
                    mismatches += 1;
                }
                let gmacs = |s: f64| ((m * n * k) as f64 / s / 1e9 * 100.0).round() / 100.0;
                println!(
                    "{}",
                    serde_json::json!({
                        "type": format!("{ty:?}"),
                        "n": n,
                        "k": k,
                        "rows": m,
                        "threads": threads,
                        "kernel": kernels::kernel_name(),
                        "blocked_gmac_s": gmacs(blocked),
                        "candle_row_wise_gmac_s": gmacs(row_wise),
                        "candle_qmatmul_gmac_s": gmacs(repacked),
                        "speedup_vs_row_wise": ((row_wise / blocked) * 100.0).round() / 100.0,
                        "batch_invariant": invariant,
                    })
                );
            }
        }
    }
    if mismatches > 0 {
        eprintln!("{mismatches} product(s) were not batch-invariant");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
