//! `medbatch bench --decode-step CONFIG`: the time of one decode step of a model of a real
//! shape (MedGemma 27B, 4B …) with random weights, at several batch sizes, against the floor
//! a step cannot beat: the bytes it must read (this rank's weights and KV cache) over the
//! device's memory bandwidth.
//!
//! The weights are drawn on each rank's device, so no checkpoint is needed: the 27B shape in
//! bf16 on one 141 GB GPU, or split over several with `--devices`.

use crate::bench::{median, peak_rss_mib};
use crate::model_path::SplitArgs;
use candle_core::{DType, D};
use medbatch_engine::kv::SeqCache;
use medbatch_engine::models::gemma3::{BatchItem, Gemma3, Logits};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Rows packed into one prefill pass (several sequences share a pass when they are short).
const PREFILL_ROWS: usize = 4096;

/// What one decode-step measurement needs.
pub struct DecodeBench<'a> {
    pub config: &'a Path,
    pub split: &'a SplitArgs,
    pub batches: &'a [usize],
    pub context: usize,
    pub steps: usize,
    pub layers: Option<usize>,
    pub hbm_gbps: Option<f64>,
}

/// `config.json`, or the folder holding it.
fn config_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("config.json")
    } else {
        p.to_path_buf()
    }
}

/// Bytes of keys and values one rank reads for a decode step of a sequence of `len` tokens.
fn kv_read_bytes(model: &Gemma3, len: usize) -> u64 {
    let cfg = &model.shards[0].cfg;
    let per_position = 2 * cfg.num_kv_heads * cfg.head_dim * model.kv_dtype().size_in_bytes();
    let positions: usize = cfg.layer_is_global.iter().map(|&g| if g { len } else { len.min(cfg.sliding_window) }).sum();
    (positions * per_position) as u64
}

/// Waits until every rank's device has finished its queued work (a no-op on the CPU).
fn synchronize(model: &Gemma3) -> anyhow::Result<()> {
    for s in &model.shards {
        s.device.synchronize()?;
    }
    Ok(())
}

pub fn run(b: DecodeBench<'_>) -> anyhow::Result<ExitCode> {
    let path = config_file(b.config);
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut cfg = medbatch_engine::load::hf_config::parse_config(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Some(n) = b.layers {
        anyhow::ensure!(n >= 1 && n <= cfg.text.num_layers, "--layers {n}: the model has {}", cfg.text.num_layers);
        cfg.text.num_layers = n;
        cfg.text.layer_is_global.truncate(n);
    }
    let mut placement = b.split.placement()?;
    placement.dtype.get_or_insert(DType::BF16);
    let dtype = placement.weight_dtype();
    let (devices, comms) = placement.ranks()?;
    let where_ = if placement.devices.is_empty() {
        format!("{} CPU rank(s)", devices.len())
    } else {
        format!("CUDA devices {:?}", placement.devices)
    };
    eprintln!(
        "drawing random {dtype:?} weights of {} ({} layers, hidden {}) on {where_} …",
        path.display(),
        cfg.text.num_layers,
        cfg.text.hidden_size
    );
    let t = Instant::now();
    let model = medbatch_engine::load::hf::random_model(&cfg, devices, comms, dtype)?;
    synchronize(&model)?;
    let made_s = t.elapsed().as_secs_f64();
    let ranks = model.ranks();
    let weight_step = model.shards.iter().map(|s| s.step_weight_bytes()).max().unwrap_or(0);
    // A tied head is the embedding's storage: held once.
    let weight_held = model
        .shards
        .iter()
        .map(|s| match cfg.tie_word_embeddings {
            true => s.step_weight_bytes(),
            false => s.weight_bytes().0 + s.weight_bytes().1,
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "made in {made_s:.1} s: {ranks} rank(s), {:.2} GB of weights per rank, {:.2} GB read per step",
        weight_held as f64 / 1e9,
        weight_step as f64 / 1e9
    );
    let vocab = cfg.text.vocab_size as u32;
    let prompt: Vec<u32> = (0..b.context as u32).map(|i| 2 + (i * 7919 + 13) % (vocab - 2)).collect();
    let mut rows = Vec::new();
    for &batch in b.batches {
        anyhow::ensure!(batch >= 1, "--batches must be at least 1");
        let mut caches: Vec<SeqCache> = (0..batch).map(|_| model.new_cache()).collect();
        // Prefill every sequence to `context` tokens, several sequences per pass.
        let t = Instant::now();
        let mut last = vec![2u32; batch];
        for start in (0..prompt.len()).step_by(medbatch_engine::engine::PREFILL_CHUNK) {
            let chunk = &prompt[start..(start + medbatch_engine::engine::PREFILL_CHUNK).min(prompt.len())];
            let per_pass = (PREFILL_ROWS / chunk.len()).max(1);
            for (g, group) in caches.chunks_mut(per_pass).enumerate() {
                let mut items: Vec<BatchItem> =
                    group.iter_mut().map(|c| BatchItem::text(chunk, c, Logits::Last)).collect();
                let logits = model.forward_batch(&mut items)?;
                for (i, l) in logits.into_iter().enumerate() {
                    last[g * per_pass + i] = argmax(l)?;
                }
            }
        }
        let prefill_s = t.elapsed().as_secs_f64();
        // Two untimed steps (first-use allocations and kernel loads), then the timed ones.
        let mut times = Vec::with_capacity(b.steps);
        for step in 0..b.steps + 2 {
            let ids: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let mut items: Vec<BatchItem> =
                ids.iter().zip(caches.iter_mut()).map(|(id, c)| BatchItem::text(id, c, Logits::Last)).collect();
            let t = Instant::now();
            let logits = model.forward_batch(&mut items)?;
            synchronize(&model)?;
            if step >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
            for (i, l) in logits.into_iter().enumerate() {
                last[i] = argmax(l)?;
            }
        }
        let step_s = median(times);
        // What a step reads of the cache on one rank: every cached position on global
        // layers, the window on sliding-window layers (the pages it holds may be more: whole
        // blocks).
        let kv = caches.iter().map(|c| kv_read_bytes(&model, c.len())).sum::<u64>();
        let kv_held = caches.iter().map(|c| c.bytes() as u64).sum::<u64>() / ranks as u64;
        let floor_ms = b.hbm_gbps.map(|g| (weight_step + kv) as f64 / (g * 1e9) * 1e3);
        let row = serde_json::json!({
            "config": path.display().to_string(),
            "layers": cfg.text.num_layers,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "ranks": ranks,
            "devices": placement.devices,
            "batch": batch,
            "context": b.context,
            "prefill_s": round(prefill_s, 3),
            "prefill_tok_s": round((batch * b.context) as f64 / prefill_s, 1),
            "step_ms": round(step_s * 1e3, 3),
            "tok_s": round(batch as f64 / step_s, 1),
            "weight_bytes_read_per_rank": weight_step,
            "kv_bytes_per_rank": kv,
            "kv_bytes_held_per_rank": kv_held,
            "hbm_gbps": b.hbm_gbps,
            "floor_ms": floor_ms.map(|f| round(f, 3)),
            "step_over_floor": floor_ms.map(|f| round(step_s * 1e3 / f, 2)),
        });
        println!("{row}");
        rows.push((batch, step_s, floor_ms));
    }
    println!(
        "decode step of random {dtype:?} weights, {} layers, {ranks} rank(s), context {}:",
        cfg.text.num_layers, b.context
    );
    for (batch, step_s, floor) in rows {
        let floor = floor.map(|f| format!("; floor {f:.2} ms, {:.1}× it", step_s * 1e3 / f)).unwrap_or_default();
        println!("  batch {batch:>3}: {:.2} ms per step, {:.1} tok/s{floor}", step_s * 1e3, batch as f64 / step_s);
    }
    if let Some(m) = peak_rss_mib() {
        println!("  peak host memory {m:.0} MiB");
    }
    Ok(ExitCode::SUCCESS)
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// The greedy next token of one item's logits, taken on the device.
fn argmax(logits: Option<candle_core::Tensor>) -> anyhow::Result<u32> {
    let l = logits.ok_or_else(|| anyhow::anyhow!("no logits returned"))?;
    Ok(l.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0])
}
