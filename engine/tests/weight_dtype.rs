//! Weights held in bf16 or f16, as a GPU holds MedGemma: the matrices and the KV cache take
//! half the memory, and the logits, whole or split over two ranks, stay within a bound set by
//! the dtype's rounding of the f32 model's (the greedy token is the same wherever f32's top two
//! are further apart than twice that). Also random-weight models of a config's shape, which
//! `medbatch bench --decode-step` times.

use candle_core::{DType, Device};
use medbatch_engine::engine::{Engine, Placement};
use medbatch_engine::models::gemma3::{Gemma3, Linear, Logits};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Largest |Δlogit| allowed against f32, in units of the dtype's unit roundoff times the
/// largest |logit| of the prompt. Measured on the fixtures: up to 7.8 for bf16 (|Δ| 0.16–0.42
/// with logits up to 9–17), up to 7.3 for f16 (|Δ| 0.021–0.057): the error follows the
/// rounding.
const ROUNDOFFS: f32 = 12.0;

/// Unit roundoff: half the gap between 1 and the next number.
fn roundoff(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 2f32.powi(-8),
        DType::F16 => 2f32.powi(-11),
        _ => f32::EPSILON / 2.0,
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn prompts(dir: &Path) -> Vec<Vec<u32>> {
    let r: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

/// A checkpoint folder with a tokenizer: the text fixtures share `tokenizer/`.
fn with_tokenizer(dir: &Path, tmp: &Path) -> PathBuf {
    let out = tmp.join(dir.file_name().unwrap());
    std::fs::create_dir_all(&out).unwrap();
    for d in [dir.to_path_buf(), fixtures().join("tokenizer")] {
        for f in std::fs::read_dir(d).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
        }
    }
    out
}

fn load(dir: &Path, tp: usize, dtype: Option<DType>) -> Engine {
    Engine::load_placed(dir, &Placement { tp, devices: Vec::new(), dtype }).unwrap()
}

/// Logits at every position of `ids`, and the bytes the sequence's KV cache holds after it.
fn all_logits(model: &Gemma3, ids: &[u32]) -> (Vec<Vec<f32>>, usize) {
    let mut cache = model.new_cache();
    let l = model.forward(ids, &mut cache, Logits::All).unwrap();
    (l.to_vec2::<f32>().unwrap(), cache.bytes())
}

fn dense_dtypes(model: &Gemma3) -> Vec<DType> {
    let mut out = Vec::new();
    for s in &model.shards {
        for l in &s.layers {
            for lin in [&l.attn.q, &l.attn.k, &l.attn.v, &l.attn.o, &l.mlp.gate, &l.mlp.up, &l.mlp.down, &s.lm_head] {
                if let Linear::Dense(w) = lin {
                    out.push(w.dtype());
                }
            }
        }
    }
    out
}

#[test]
fn half_precision_weights_halve_memory_and_stay_within_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["gqa_window", "mqa_untied", "kv_eq_heads"] {
        let dir = with_tokenizer(&fixtures().join("models").join(name), tmp.path());
        let f32 = load(&dir, 1, None);
        for dtype in [DType::BF16, DType::F16] {
            let half = load(&dir, 1, Some(dtype));
            assert!(dense_dtypes(&half.model).iter().all(|d| *d == dtype), "{name}: every matrix is {dtype:?}");
            assert_eq!(half.model.attention_dtype, dtype);
            let ((f_split, f_norms), (h_split, h_norms)) =
                (f32.model.shards[0].weight_bytes(), half.model.shards[0].weight_bytes());
            assert_eq!(h_split * 2, f_split, "{name} {dtype:?}: matrices take half the bytes");
            assert_eq!(h_norms, f_norms, "{name} {dtype:?}: norms stay f32");
            // The split model in the same dtype.
            let split = load(&dir, 2, Some(dtype));
            let mut checked = 0;
            for ids in prompts(&dir) {
                let (want, f_kv) = all_logits(&f32.model, &ids);
                let (got, h_kv) = all_logits(&half.model, &ids);
                let (got_split, _) = all_logits(&split.model, &ids);
                assert_eq!(h_kv * 2, f_kv, "{name} {dtype:?}: the KV cache takes half the bytes");
                let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
                let bound = ROUNDOFFS * roundoff(dtype) * scale;
                let diff = |a: &[Vec<f32>]| {
                    a.iter()
                        .zip(&want)
                        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
                        .fold(0f32, f32::max)
                };
                let (d, ds) = (diff(&got), diff(&got_split));
                eprintln!(
                    "{name} {dtype:?}: max |logit| {scale:.2}, |Δlogit| {d:.4} whole, {ds:.4} split (bound {bound:.3})"
                );
                assert!(d <= bound, "{name} {dtype:?}: logits differ from f32 by {d} (bound {bound})");
                assert!(ds <= bound, "{name} {dtype:?}: split logits differ from f32 by {ds} (bound {bound})");
                // Where f32's best token leads the next by more than twice the bound, it stays
                // the best.
                for ((w, g), s) in want.iter().zip(&got).zip(&got_split) {
                    let mut sorted = w.clone();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    if sorted[0] - sorted[1] > 2.0 * bound {
                        assert_eq!(argmax(g), argmax(w), "{name} {dtype:?}: greedy token");
                        assert_eq!(argmax(s), argmax(w), "{name} {dtype:?} split: greedy token");
                        checked += 1;
                    }
                }
            }
            assert!(checked > 0, "{name} {dtype:?}: no position with a clear greedy token");
        }
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

#[test]
fn random_models_take_a_configs_shape() {
    let cfg = medbatch_engine::load::hf::read_config(&fixtures().join("models/mqa_untied")).unwrap();
    let t = &cfg.text;
    // Bytes a decode step reads: every layer's matrices, the untied head and the norms.
    let per_layer = t.hidden_size * (2 * t.q_dim() + 2 * t.kv_dim() + 3 * t.intermediate_size);
    let norms = t.num_layers * (4 * t.hidden_size + 2 * t.head_dim) + t.hidden_size;
    for tp in [1usize, 2] {
        let placement = Placement { tp, devices: Vec::new(), dtype: Some(DType::BF16) };
        let (devices, comms) = placement.ranks().unwrap();
        let model = medbatch_engine::load::hf::random_model(&cfg, devices, comms, DType::BF16).unwrap();
        assert_eq!(model.ranks(), tp);
        for (r, s) in model.shards.iter().enumerate() {
            // One KV head (MQA) is replicated to both ranks; everything else splits.
            let kv_share = t.num_layers * 2 * t.kv_dim() * t.hidden_size * (tp - 1);
            let split = (t.num_layers * per_layer + kv_share + t.vocab_size * t.hidden_size) / tp;
            assert_eq!(s.step_weight_bytes(), (2 * split + 4 * norms) as u64, "tp={tp} rank {r}");
        }
        let mut cache = model.new_cache();
        let logits = model.forward(&[2, 17, 300, 4], &mut cache, Logits::Last).unwrap();
        assert_eq!(logits.dims(), [1, t.vocab_size]);
        let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "tp={tp}: finite logits");
        assert!(v.iter().any(|x| *x != v[0]), "tp={tp}: the logits vary");
        assert!(model.device.same_device(&Device::Cpu));
    }
}
