//! The paged KV cache and its attention:
//!
//! - the CPU kernel (every sequence of a pass in one call per layer) equals the gathered
//!   reference path — the engine's per-sequence arithmetic before pages — within 1e-5 on
//!   every parity fixture, alone, in chunks and batched, with the same greedy ids;
//! - a sequence preempted when the pool runs dry produces exactly the tokens it would have;
//! - prompts that share a prefix share its pages (text and images alike), and a different
//!   image is never mistaken for a cached one.

mod support;

use candle_core::Device;
use medbatch_engine::engine::Placement;
use medbatch_engine::load::hf::{load_model, read_config};
use medbatch_engine::models::gemma3::{AttentionImpl, BatchItem, Gemma3, KvConfig, Logits};
use medbatch_engine::{Engine, GenerateRequest};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Kernel against the reference: the same f32 arithmetic in another order.
const TOLERANCE: f32 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn reference(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0f32, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a))).unwrap() as u32
}

/// Logits at every position of each prompt, read in chunks of `chunk` (0: whole), all
/// prompts packed in the same passes.
fn logits(model: &Gemma3, prompts: &[Vec<u32>], chunk: usize) -> Vec<Vec<Vec<f32>>> {
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut out: Vec<Vec<Vec<f32>>> = prompts.iter().map(|_| Vec::new()).collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let step = if chunk == 0 { longest } else { chunk };
    let mut from = 0;
    while from < longest {
        let mut items = Vec::new();
        let mut which = Vec::new();
        for (i, (p, c)) in prompts.iter().zip(caches.iter_mut()).enumerate() {
            if from < p.len() {
                items.push(BatchItem::text(&p[from..(from + step).min(p.len())], c, Logits::All));
                which.push(i);
            }
        }
        for (i, l) in which.into_iter().zip(model.forward_batch(&mut items).unwrap()) {
            out[i].extend(l.unwrap().to_vec2::<f32>().unwrap());
        }
        from += step;
    }
    out
}

fn greedy(model: &Gemma3, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut l = model.forward(prompt, &mut cache, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        out.push(next);
        l = model.forward(&[next], &mut cache, Logits::Last).unwrap();
    }
    out
}

#[test]
fn the_kernel_equals_the_gathered_path_on_every_parity_fixture() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 6);
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let cfg = read_config(&dir).unwrap();
        let kernel = load_model(&dir, &cfg, &Device::Cpu).unwrap();
        let mut gathered = load_model(&dir, &cfg, &Device::Cpu).unwrap();
        gathered.attention = AttentionImpl::Gathered;
        let prompts: Vec<Vec<u32>> =
            reference(&dir)["prompts"].as_array().unwrap().iter().map(|p| ids(&p["input_ids"])).collect();
        let chunks = [0, 1, 5];
        let ours: Vec<_> = chunks.iter().map(|&c| logits(&kernel, &prompts, c)).collect();
        let theirs: Vec<_> = chunks.iter().map(|&c| logits(&gathered, &prompts, c)).collect();
        for (k, _) in prompts.iter().enumerate() {
            // Against the reference path: within 1e-5, or within the reference's own spread
            // between reading the prompt whole and in chunks, where that is larger (f32
            // summation order; up to 2e-5 on these fixtures).
            let spread = theirs.iter().skip(1).map(|t| max_diff(&t[k], &theirs[0][k])).fold(0f32, f32::max);
            let bound = TOLERANCE.max(spread);
            for ((c, o), t) in chunks.iter().zip(&ours).zip(&theirs) {
                let d = max_diff(&o[k], &t[k]);
                eprintln!("{name} prompt {k}, chunks of {c}: kernel vs reference {d:.2e} (bound {bound:.2e})");
                assert!(d <= bound, "{name} prompt {k}, chunks of {c}: {d:e} > {bound:e}");
            }
        }
        for p in &prompts {
            assert_eq!(greedy(&kernel, p, 12), greedy(&gathered, p, 12), "{name}: greedy ids");
        }
    }
}

/// The multimodal fixture (a checkpoint folder with its own tokenizer).
fn multimodal() -> PathBuf {
    fixtures().join("multimodal/mm_window")
}

fn image(rel: &str) -> std::sync::Arc<medbatch_engine::image::Rgb8> {
    let bytes = std::fs::read(fixtures().join(rel)).unwrap();
    std::sync::Arc::new(support::decode(&bytes).unwrap())
}

fn image_request(p: &Value, images: Vec<std::sync::Arc<medbatch_engine::image::Rgb8>>) -> GenerateRequest {
    GenerateRequest {
        prompt: p["text"].as_str().unwrap().to_string(),
        chat: false,
        add_bos: true,
        parse_special: true,
        max_new_tokens: 8,
        stop: Vec::new(),
        sampling: Default::default(),
        grammar: None,
        images,
    }
}

#[test]
fn the_kernel_equals_the_gathered_path_with_images() {
    let dir = multimodal();
    let kernel = Engine::load(&dir).unwrap();
    let mut gathered = Engine::load(&dir).unwrap();
    gathered.model.attention = AttentionImpl::Gathered;
    for p in reference(&fixtures().join("multimodal/mm_window"))["prompts"].as_array().unwrap() {
        let imgs: Vec<_> = p["images"].as_array().unwrap().iter().map(|i| image(i.as_str().unwrap())).collect();
        let rows = kernel.encode_images(&imgs).unwrap();
        let prompt = ids(&p["input_ids"]);
        for chunk in [512, 5, 13] {
            let run = |e: &Engine| -> Vec<Vec<f32>> {
                let mut cache = e.model.new_cache();
                let parts = e.prefill_with(&prompt, rows.as_ref(), &mut cache, Logits::All, chunk).unwrap();
                parts.iter().flat_map(|t| t.to_vec2::<f32>().unwrap()).collect()
            };
            let d = max_diff(&run(&kernel), &run(&gathered));
            eprintln!("{} chunks of {chunk}: max |Δ| {d:.2e}", p["name"]);
            assert!(d <= TOLERANCE, "{} chunks of {chunk}: {d:e}", p["name"]);
        }
        let want = ids(&p["greedy"]["tokens"]);
        assert_eq!(kernel.greedy_ids_with(&prompt, rows.as_ref(), 8).unwrap(), want);
        assert_eq!(gathered.greedy_ids_with(&prompt, rows.as_ref(), 8).unwrap(), want);
    }
}

/// The multimodal fixture with a sliding window wider than its prompts (its 8-token window
/// is shorter than a block: every block but the last leaves the window, gives its
/// sliding-window pages back, and cannot start a later prompt).
fn multimodal_wide_window(tmp: &Path) -> PathBuf {
    let out = tmp.join("mm_wide");
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(multimodal()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
    }
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["sliding_window"] = 256.into();
    std::fs::write(out.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    out
}

#[test]
fn an_image_prefix_is_reused_only_for_the_same_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = multimodal_wide_window(tmp.path());
    let reference = reference(&fixtures().join("multimodal/mm_window"));
    let p = &reference["prompts"][0];
    let paths: Vec<&str> = p["images"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    let mut e = Engine::load(&dir).unwrap();
    let req = image_request(p, paths.iter().map(|i| image(i)).collect());
    let first = e.generate(&req).unwrap();
    let again = e.generate(&req).unwrap();
    let soft = e.model.image_token_id.unwrap();
    let prompt = ids(&p["input_ids"]);
    let image_start = prompt.iter().position(|&t| t == soft).unwrap();
    assert_eq!(first.reused_tokens, 0);
    assert_eq!(again.ids, first.ids, "the same answer from cached blocks");
    assert!(
        again.reused_tokens as usize > image_start,
        "blocks holding the image are reused ({} tokens reused, the image starts at {image_start})",
        again.reused_tokens
    );
    // Another picture in the same place: nothing at or after the image comes from the cache.
    let other: Vec<&str> =
        reference["prompts"][1]["images"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    let swapped = image_request(p, vec![image(other[0])]);
    let alone = Engine::load(&dir).unwrap().generate(&swapped).unwrap();
    let g = e.generate(&swapped).unwrap();
    assert!((g.reused_tokens as usize) <= image_start, "{} tokens reused past the image", g.reused_tokens);
    assert_eq!(g.ids, alone.ids, "a different image gets the answer it gets alone");
}

fn demo() -> PathBuf {
    let p = std::env::var_os("MEDBATCH_DEMO_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/medbatch/models/gemma-3-270m-q4_k_m.gguf")
    });
    assert!(p.is_file(), "demo model missing at {}: run `bash infra/fetch-demo-model.sh`", p.display());
    p
}

const PREFIX: &str = "Lab result lines as JSON.\n\nLine: Magnesium: 0.62 mmol/L (ref 0.7-1.0) L\nJSON: {\"test\":\"Magnesium\",\"value\":\"0.62\",\"unit\":\"mmol/L\",\"ref_low\":\"0.7\",\"ref_high\":\"1.0\",\"flag\":\"L\"}\n\nLine: Sodium 139 mmol/L (135-145)\nJSON: {\"test\":\"Sodium\",\"value\":\"139\",\"unit\":\"mmol/L\",\"ref_low\":\"135\",\"ref_high\":\"145\",\"flag\":\"\"}\n\nLine: ";

fn requests(n: usize, new_tokens: u32) -> Vec<GenerateRequest> {
    let lines = [
        "Chloride                104      mmol/L      98-107",
        "Creatinine              0.71     mg/dL       0.51-0.95",
        "Potassium was elevated at 5.9 mmol/L (3.5-5.1).",
        "WBC 11.8 x10^9/L (4.0-11.0) H",
        "Hemoglobin A1c ........ 7.9 %  [4.0-5.6]  HIGH",
        "TSH 0.02 mIU/L (0.4-4.0) L",
    ];
    (0..n)
        .map(|i| GenerateRequest {
            prompt: format!("{PREFIX}{}\nJSON: {{\"test\":\"", lines[i % lines.len()]),
            chat: false,
            add_bos: true,
            parse_special: false,
            max_new_tokens: new_tokens + i as u32 % 3,
            stop: Vec::new(),
            sampling: Default::default(),
            grammar: None,
            images: Vec::new(),
        })
        .collect()
}

#[test]
fn the_kernel_and_the_gathered_path_pick_the_same_tokens_on_the_demo_model() {
    let mut kernel = Engine::load_gguf(&demo(), None).unwrap();
    let mut gathered = Engine::load_gguf(&demo(), None).unwrap();
    gathered.model.attention = AttentionImpl::Gathered;
    let reqs = requests(4, 16);
    let a = kernel.generate_batch(&reqs);
    let b = gathered.generate_batch(&reqs);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.as_ref().unwrap().ids, y.as_ref().unwrap().ids, "request {i}");
    }
}

#[test]
fn a_preempted_sequence_produces_the_tokens_it_would_have() {
    let reqs = requests(6, 24);
    let mut roomy = Engine::load_gguf(&demo(), None).unwrap();
    let alone: Vec<_> = reqs.iter().map(|r| roomy.generate(r).unwrap()).collect();
    // A pool where all six prompts fit but not their answers: sequences are admitted, run
    // out of pages while decoding, give theirs back and are recomputed.
    let mut tight = Engine::load_placed(&demo(), &Placement::default()).unwrap();
    let page = tight.model.page_bytes();
    let (layout, _) = tight.model.kv_stats().unwrap();
    let prompt = tight.prompt_ids(&reqs[0]).unwrap().len();
    let one = layout.pages_for(prompt + 24, 512) as u64;
    tight.model.configure_kv(KvConfig { memory: Some(page * (one * 5 / 2)) }).unwrap();
    let together = tight.generate_batch(&reqs);
    assert!(tight.stats.preemptions > 0, "the pool was small enough to preempt");
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let b = b.as_ref().unwrap();
        assert_eq!(a.ids, b.ids, "request {i}");
        assert_eq!(a.finish, b.finish, "request {i}");
    }
    eprintln!("{} preemptions", tight.stats.preemptions);
}

#[test]
fn a_shared_prefix_costs_its_pages_once() {
    let mut e = Engine::load_gguf(&demo(), None).unwrap();
    let reqs = requests(6, 4);
    let mut active: Vec<_> = reqs.iter().map(|r| e.admit(r).unwrap()).collect();
    // Prompts are read one step at a time; the first registers the shared blocks.
    e.step(&mut active[..1], 4096).unwrap();
    let rest: Vec<_> = reqs[1..].iter().map(|r| e.admit(r).unwrap()).collect();
    active.truncate(1);
    active.extend(rest);
    e.step(&mut active, 4096).unwrap();
    let (layout, stats) = e.model.kv_stats().unwrap();
    let shared = e.prompt_ids(&reqs[0]).unwrap().len() / layout.block * layout.block;
    for (i, a) in active.iter().enumerate().skip(1) {
        let (held, own) = a.pages();
        eprintln!("sequence {i}: {held} pages held, {own} its own");
        assert!(own < held, "sequence {i} shares pages");
        let whole = layout.pages_for(a.prompt_tokens() + 1, 512);
        let prefix = layout.pages_for(shared - layout.block, 512);
        assert!(own + prefix <= whole, "sequence {i}: {own} own pages, {whole} for the whole prompt");
    }
    assert!(stats.hit_tokens as usize >= 5 * (shared - layout.block), "{stats:?}");
    for (i, a) in active.into_iter().enumerate().skip(1) {
        assert!(a.into_generation().reused_tokens as usize >= shared - layout.block, "sequence {i}");
    }
}

#[test]
fn a_prefix_admitted_together_is_computed_once() {
    // Six prompts with one few-shot prefix, admitted in the same step with nothing cached:
    // the first computes the prefix, the others wait a step and adopt it, and every answer
    // is the one the request gets alone.
    let reqs = requests(6, 8);
    let mut solo = Engine::load_gguf(&demo(), None).unwrap();
    let alone: Vec<_> = reqs.iter().map(|r| solo.generate(r).unwrap()).collect();
    let mut e = Engine::load_gguf(&demo(), None).unwrap();
    let together = e.generate_batch(&reqs);
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.ids, b.as_ref().unwrap().ids, "request {i}");
    }
    let prompts: Vec<Vec<u32>> = reqs.iter().map(|r| e.prompt_ids(r).unwrap()).collect();
    let common = (0..prompts[0].len()).take_while(|&j| prompts.iter().all(|p| p.get(j) == prompts[0].get(j))).count();
    let (layout, _) = e.model.kv_stats().unwrap();
    let shared = common / layout.block * layout.block;
    let generated: usize = together.iter().map(|g| g.as_ref().unwrap().ids.len()).sum();
    // Rows computed: the first prompt whole, the others past the shared blocks (at most one
    // block more each), and the generated tokens.
    let bound =
        prompts[0].len() + prompts[1..].iter().map(|p| p.len() - shared + layout.block).sum::<usize>() + generated;
    eprintln!(
        "{} rows computed (bound {bound}; prompts {:?}, {shared} shared), {} chunks deferred",
        e.stats.rows,
        prompts.iter().map(Vec::len).collect::<Vec<_>>(),
        e.stats.deferred
    );
    assert!(shared >= 4 * layout.block, "the prompts share {common} tokens");
    assert!(e.stats.deferred >= 5, "{:?}", e.stats);
    assert!((e.stats.rows as usize) <= bound, "{} rows computed, bound {bound}", e.stats.rows);
}

#[test]
fn demo_model_rows_are_the_same_however_a_prompt_is_cut() {
    // Activation rows are quantized on their own and every output is summed over K in one
    // fixed order (engine/src/kernels), and attention is per row: a prompt read whole, in
    // chunks or beside others gives bit-identical logits. Recomputing a preempted
    // sequence rests on this.
    let e = Engine::load_gguf(&demo(), None).unwrap();
    let prompts: Vec<Vec<u32>> = requests(3, 1).iter().map(|r| e.prompt_ids(r).unwrap()).collect();
    let whole = logits(&e.model, &prompts, 0);
    for chunk in [1, 7, 64] {
        assert!(logits(&e.model, &prompts, chunk) == whole, "chunks of {chunk}");
    }
    let alone = logits(&e.model, &prompts[..1], 0);
    assert!(alone[0] == whole[0], "alone and batched");
}
