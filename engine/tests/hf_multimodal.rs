//! Parity with Hugging Face transformers' `Gemma3ForConditionalGeneration` on a tiny
//! random-weight model with a working vision tower (`tests/fixtures/hf/multimodal/`, made by
//! `make_fixtures.py`): the processor's pixel values, the projected image features, logits at
//! every position (max |Δ| ≤ 1e-4 in f32) and greedy ids, for prompts with one and with two
//! images — through the one-sequence path, chunked prefill that never splits an image, and
//! continuous batching with the prompt text expanded by the engine.

use medbatch_engine::engine::{Engine, GenerateRequest};
mod support;

use medbatch_engine::image::{pixel_values, Rgb8};
use medbatch_engine::models::gemma3::Logits;
use medbatch_engine::scheduler::chunk_end;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use support::decode;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn model_dir() -> PathBuf {
    fixtures().join("multimodal/mm_window")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(model_dir().join("reference.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixtures().join(v["file"].as_str().unwrap())).unwrap();
    let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let f: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(f.len(), shape.iter().product::<usize>());
    (shape, f)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn images(p: &Value) -> Vec<Arc<Rgb8>> {
    p["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rel| {
            let path = fixtures().join(rel.as_str().unwrap());
            Arc::new(decode(&std::fs::read(&path).unwrap()).unwrap())
        })
        .collect()
}

fn max_diff(name: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let m = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(m <= TOLERANCE, "{name}: max |Δ| = {m:e} > {TOLERANCE:e}");
    m
}

fn engine() -> Engine {
    Engine::load(&model_dir()).expect("multimodal fixture loads")
}

fn request(p: &Value, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: p["text"].as_str().unwrap().to_string(),
        chat: false,
        add_bos: true,
        parse_special: true,
        max_new_tokens,
        stop: Vec::new(),
        sampling: Default::default(),
        grammar: None,
        images: images(p),
    }
}

#[test]
fn pixel_values_and_image_features_match() {
    let e = engine();
    assert_eq!(e.image_config.size, 42);
    for p in reference()["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let (_, want_pv) = floats(&p["pixel_values"]);
        let got_pv: Vec<f32> = images(p).iter().flat_map(|img| pixel_values(img, &e.image_config)).collect();
        let d = got_pv.iter().zip(&want_pv).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // The same 8-bit pixels (one step is 2/255); transformers rescales and normalises in
        // another order, which moves a value by at most one float ulp.
        assert!(d <= 1e-6, "{name}: pixel values differ from the processor's by {d}");
        let (shape, want) = floats(&p["image_features"]);
        let per_image = 3 * 42 * 42;
        let tower = e.vision.as_ref().unwrap();
        let mut got = Vec::new();
        for img in want_pv.chunks(per_image) {
            got.extend(tower.encode(img).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        assert_eq!(got.len(), shape.iter().product::<usize>());
        let m = max_diff(&format!("{name} image features"), &got, &want);
        eprintln!("{name}: image features max |Δ| {m:.2e}");
    }
}

#[test]
fn prompt_expansion_matches_the_processor() {
    let e = engine();
    for p in reference()["prompts"].as_array().unwrap() {
        assert_eq!(e.prompt_ids(&request(p, 1)).unwrap(), ids(&p["input_ids"]), "{}", p["name"]);
    }
    // One marker, two images: refused with the counts.
    let one = &reference()["prompts"][0];
    let mut r = request(one, 1);
    r.images.push(r.images[0].clone());
    let err = e.prompt_ids(&r).unwrap_err().to_string();
    assert!(err.contains("1 <start_of_image> markers for 2 images"), "{err}");
}

#[test]
fn logits_match_in_one_pass_and_in_chunks() {
    let e = engine();
    for p in reference()["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["input_ids"]);
        let rows = e.encode_images(&images(p)).unwrap();
        let (_, want) = floats(&p["full_logits"]);
        let got: Vec<f32> = e.all_logits_with(&prompt, rows.as_ref()).unwrap().concat();
        let m = max_diff(&format!("{name} full"), &got, &want);
        eprintln!("{name}: full-prompt logits max |Δ| {m:.2e}");
        // Chunks of 1, 5 and 13 tokens: every image run is read in one pass with itself.
        for chunk in [1, 5, 13] {
            let mut cache = e.model.new_cache();
            let parts = e.prefill_with(&prompt, rows.as_ref(), &mut cache, Logits::All, chunk).unwrap();
            let got: Vec<f32> = parts.iter().flat_map(|t| t.to_vec2::<f32>().unwrap().concat()).collect();
            max_diff(&format!("{name} chunks of {chunk}"), &got, &want);
        }
    }
}

#[test]
fn greedy_ids_match_alone_and_batched() {
    let mut e = engine();
    let prompts: Vec<Value> = reference()["prompts"].as_array().unwrap().clone();
    let reqs: Vec<GenerateRequest> = prompts.iter().map(|p| request(p, 8)).collect();
    for (p, r) in prompts.iter().zip(&reqs) {
        let want = ids(&p["greedy"]["tokens"]);
        let rows = e.encode_images(&r.images).unwrap();
        assert_eq!(e.greedy_ids_with(&ids(&p["input_ids"]), rows.as_ref(), 8).unwrap(), want, "{}", p["name"]);
        assert_eq!(e.generate(r).unwrap().ids, want, "{} through the engine loop", p["name"]);
    }
    let both = e.generate_batch(&reqs);
    for (p, g) in prompts.iter().zip(both) {
        assert_eq!(g.unwrap().ids, ids(&p["greedy"]["tokens"]), "{} batched", p["name"]);
    }
    // A small token budget per step: prompts advance in pieces that never split an image.
    let mut active: Vec<_> = reqs.iter().map(|r| e.admit(r).unwrap()).collect();
    while active.iter().any(|a| !a.is_done()) {
        e.step(&mut active, 7).unwrap();
    }
    for (p, a) in prompts.iter().zip(active) {
        assert_eq!(a.into_generation().ids, ids(&p["greedy"]["tokens"]), "{} with budget 7", p["name"]);
    }
}

#[test]
fn chunk_boundaries_fall_outside_images() {
    let e = engine();
    let soft = e.model.image_token_id;
    for p in reference()["prompts"].as_array().unwrap() {
        let prompt = ids(&p["input_ids"]);
        for budget in 1..20 {
            let mut from = 0;
            while from < prompt.len() {
                let to = chunk_end(&prompt, from, budget, soft);
                assert!(to > from);
                if to < prompt.len() {
                    assert!(!(Some(prompt[to - 1]) == soft && Some(prompt[to]) == soft), "split at {to}");
                }
                from = to;
            }
        }
    }
}

#[test]
fn vision_weights_load_from_every_layout() {
    // The text fixtures' multimodal folders carry a stub tower under the names transformers
    // 5.x saves (`vision_tower.*` and `model.vision_tower.*`); the multimodal fixture uses
    // Google's `vision_tower.vision_model.*`.
    for folder in ["gqa_window__v451_mm_orig_sharded", "mqa_untied__v5_mm_v5layout"] {
        let dir = fixtures().join("models").join(folder);
        let cfg = medbatch_engine::load::hf::read_config(&dir).unwrap();
        let tower = medbatch_engine::load::hf::load_vision(&dir, &cfg, &candle_core::Device::Cpu).unwrap().unwrap();
        let pixels = vec![0.25f32; 3 * 28 * 28];
        let rows = tower.encode(&pixels).unwrap();
        assert_eq!(rows.dims(), [4, 64], "{folder}");
    }
}

#[test]
fn text_only_models_refuse_images() {
    let dir = fixtures().join("models/gqa_window");
    let tok = fixtures().join("tokenizer");
    let tmp = tempfile::tempdir().unwrap();
    for d in [&dir, &tok] {
        for f in std::fs::read_dir(d).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut e = Engine::load(tmp.path()).unwrap();
    let r = GenerateRequest {
        images: vec![Arc::new(Rgb8::new(1, 1, vec![0, 0, 0]))],
        ..request(&reference()["prompts"][0], 1)
    };
    let err = e.generate(&r).unwrap_err().to_string();
    assert!(err.contains("has no vision tower"), "{err}");
}
