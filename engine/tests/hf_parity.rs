//! Parity with Hugging Face transformers on random-weight Gemma 3 models
//! (`tests/fixtures/hf/`, made by `make_fixtures.py` with pinned transformers and torch):
//! logits at every position within 1e-4 (f32), the same greedy ids — through the one-sequence
//! path, step-by-step decoding, chunked prefill and the packed batched path — for every
//! config format, weight layout, sharding and tied/untied head in the fixtures.

use candle_core::{Device, Tensor};
use medbatch_engine::load::hf::{load_model, read_config};
use medbatch_engine::models::gemma3::{BatchItem, Gemma3, Logits};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// f32 engine vs f32 transformers; the reference's own cached vs uncached logits differ by
/// ~1.5e-5.
const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn model_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures().join("models"))
        .expect("fixture models")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 6, "expected the six fixture models, found {}", dirs.len());
    dirs
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn read_logits(v: &Value) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(fixtures().join(v["file"].as_str().unwrap())).unwrap();
    let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(floats.len(), shape[0] * shape[1]);
    floats.chunks(shape[1]).map(|r| r.to_vec()).collect()
}

fn load(dir: &Path) -> (Gemma3, Value) {
    let cfg = read_config(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let model = load_model(dir, &cfg, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let reference: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (model, reference)
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn max_diff(name: &str, got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len(), "{name}: row count");
    let mut m = 0f32;
    for (g, w) in got.iter().zip(want) {
        for (a, b) in g.iter().zip(w) {
            m = m.max((a - b).abs());
        }
    }
    assert!(m <= TOLERANCE, "{name}: max |Δlogit| = {m:e} > {TOLERANCE:e}");
    m
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a))).unwrap() as u32
}

#[test]
fn full_prompt_logits_match_transformers() {
    for dir in model_dirs() {
        let (model, r) = load(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        for (k, p) in r["prompts"].as_array().unwrap().iter().enumerate() {
            let mut cache = model.new_cache();
            let got = rows(&model.forward(&ids(&p["input_ids"]), &mut cache, Logits::All).unwrap());
            let m = max_diff(&format!("{name} prompt {k}"), &got, &read_logits(&p["full_logits"]));
            eprintln!("{name} prompt {k}: max |Δ| {m:.2e}");
        }
    }
}

#[test]
fn step_by_step_and_chunked_prefill_match_transformers() {
    for dir in model_dirs() {
        let (model, r) = load(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let p = &r["prompts"][0];
        let prompt = ids(&p["input_ids"]);
        // One token per pass, through the KV cache.
        let mut cache = model.new_cache();
        let step: Vec<Vec<f32>> =
            prompt.iter().flat_map(|&t| rows(&model.forward(&[t], &mut cache, Logits::Last).unwrap())).collect();
        max_diff(&format!("{name} step-by-step"), &step, &read_logits(&p["stepwise_decode_logits"]));
        // Chunks of 7 tokens (chunk boundaries fall inside and across sliding windows).
        for chunk in [3usize, 7] {
            let mut cache = model.new_cache();
            let got: Vec<Vec<f32>> =
                prompt.chunks(chunk).flat_map(|c| rows(&model.forward(c, &mut cache, Logits::All).unwrap())).collect();
            max_diff(&format!("{name} chunks of {chunk}"), &got, &read_logits(&p["full_logits"]));
        }
    }
}

#[test]
fn greedy_continuations_match_transformers_alone_and_batched() {
    for dir in model_dirs() {
        let (model, r) = load(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let prompts: Vec<&Value> = r["prompts"].as_array().unwrap().iter().collect();
        let want: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["greedy"]["tokens"])).collect();
        // Alone.
        for (k, p) in prompts.iter().enumerate() {
            let mut cache = model.new_cache();
            let mut logits = model.forward(&ids(&p["input_ids"]), &mut cache, Logits::Last).unwrap();
            let mut out = Vec::new();
            for _ in 0..want[k].len() {
                let next = argmax(&rows(&logits)[0]);
                out.push(next);
                logits = model.forward(&[next], &mut cache, Logits::Last).unwrap();
            }
            assert_eq!(out, want[k], "{name} prompt {k} alone");
        }
        // Both prompts (different lengths) packed in every pass: prefill together, then
        // decode together.
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
        let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["input_ids"])).collect();
        let mut items: Vec<BatchItem> = prompt_ids
            .iter()
            .zip(caches.iter_mut())
            .map(|(ids, cache)| BatchItem::text(ids, cache, Logits::All))
            .collect();
        let first = model.forward_batch(&mut items).unwrap();
        for (k, l) in first.iter().enumerate() {
            max_diff(
                &format!("{name} batched prompt {k}"),
                &rows(l.as_ref().unwrap()),
                &read_logits(&prompts[k]["full_logits"]),
            );
        }
        let mut next: Vec<[u32; 1]> =
            first.iter().map(|l| [argmax(rows(l.as_ref().unwrap()).last().unwrap())]).collect();
        let mut outs: Vec<Vec<u32>> = next.iter().map(|n| vec![n[0]]).collect();
        for _ in 1..want[0].len() {
            let mut items: Vec<BatchItem> = next
                .iter()
                .zip(caches.iter_mut())
                .map(|(ids, cache)| BatchItem::text(ids, cache, Logits::Last))
                .collect();
            let logits = model.forward_batch(&mut items).unwrap();
            next = logits.iter().map(|l| [argmax(&rows(l.as_ref().unwrap())[0])]).collect();
            for (o, n) in outs.iter_mut().zip(&next) {
                o.push(n[0]);
            }
        }
        assert_eq!(outs, want, "{name} batched greedy");
    }
}

#[test]
fn config_formats_and_layouts_load_the_same_model() {
    // Each variant folder holds the weights of a base model under another config format,
    // key layout or sharding; all must give that base model's logits (checked above) and
    // resolve to the same decoder settings.
    let dirs = model_dirs();
    for d in &dirs {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        if let Some((base, _)) = name.split_once("__") {
            let a = read_config(&fixtures().join("models").join(base)).unwrap();
            let b = read_config(d).unwrap();
            assert_eq!(a.text, b.text, "{name} vs {base}");
            assert_eq!(a.tie_word_embeddings, b.tie_word_embeddings, "{name}");
        }
    }
}
