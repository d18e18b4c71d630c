//! Tensor parallelism on the CPU: a model split over 2 and 4 ranks (threads joined by the
//! in-process communicator) gives logits within 1e-4 of the unsplit model and the same
//! greedy ids through the batched engine loop, on the random-weight fixtures of
//! `tests/fixtures/hf` — GQA with fewer KV heads than ranks, MQA, an untied head, a final
//! softcap, and the multimodal model with images.

use medbatch_engine::engine::{Engine, GenerateRequest};
mod support;

use medbatch_engine::image::Rgb8;
use medbatch_engine::models::gemma3::{BatchItem, Gemma3, Logits};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use support::decode;

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

fn reference(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn images(p: &Value) -> Vec<Arc<Rgb8>> {
    p.get("images")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|rel| Arc::new(decode(&std::fs::read(fixtures().join(rel.as_str().unwrap())).unwrap()).unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

/// A checkpoint folder with a tokenizer: the text fixtures share `tokenizer/`.
fn with_tokenizer(dir: &Path, tmp: &Path) -> PathBuf {
    if dir.join("tokenizer.json").is_file() {
        return dir.to_path_buf();
    }
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

/// Greedy ids of several prompts decoded together: one packed forward pass per step over
/// every sequence (prompts first, then one token each).
fn batched_greedy(
    model: &Gemma3,
    prompts: &[Vec<u32>],
    images: &[Option<candle_core::Tensor>],
    n: usize,
) -> Vec<Vec<u32>> {
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut items: Vec<BatchItem<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .zip(images)
        .map(|((p, c), img)| BatchItem { ids: p, cache: c, logits: Logits::Last, images: img.as_ref() })
        .collect();
    let mut logits = model.forward_batch(&mut items).unwrap();
    drop(items);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for step in 0..n {
        let next: Vec<[u32; 1]> = logits.iter().map(|l| [Engine::argmax(l.as_ref().unwrap()).unwrap()]).collect();
        for (o, t) in out.iter_mut().zip(&next) {
            o.push(t[0]);
        }
        if step + 1 == n {
            break;
        }
        let mut items: Vec<BatchItem<'_>> =
            next.iter().zip(caches.iter_mut()).map(|(t, c)| BatchItem::text(t, c, Logits::Last)).collect();
        logits = model.forward_batch(&mut items).unwrap();
    }
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0f32, f32::max)
}

fn check(dir: &Path, ranks: &[usize]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_tokenizer(dir, tmp.path());
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let r = reference(&dir);
    let prompts = r["prompts"].as_array().unwrap();
    let mut whole = Engine::load_checkpoint_tp(&dir, 1).unwrap();
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .map(|p| {
            let imgs = images(p);
            GenerateRequest {
                // The multimodal fixture's prompts are texts with image markers; the text
                // fixtures' are token ids only (see `batched_greedy`).
                prompt: p.get("text").and_then(Value::as_str).unwrap_or("").to_string(),
                chat: false,
                add_bos: true,
                parse_special: true,
                max_new_tokens: 8,
                stop: Vec::new(),
                sampling: Default::default(),
                grammar: None,
                images: imgs,
            }
        })
        .collect();
    let base: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let rows = whole.encode_images(&images(p)).unwrap();
            whole.all_logits_with(&ids(&p["input_ids"]), rows.as_ref()).unwrap()
        })
        .collect();
    let base_greedy: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let rows = whole.encode_images(&images(p)).unwrap();
            whole.greedy_ids_with(&ids(&p["input_ids"]), rows.as_ref(), 8).unwrap()
        })
        .collect();
    let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["input_ids"])).collect();
    let multimodal = prompts.iter().all(|p| p.get("text").is_some());
    let base_batched = if multimodal { Some(whole.generate_batch(&reqs)) } else { None };
    for &tp in ranks {
        let mut split = Engine::load_checkpoint_tp(&dir, tp).unwrap();
        assert_eq!(split.model.ranks(), tp);
        for (k, p) in prompts.iter().enumerate() {
            let rows = split.encode_images(&images(p)).unwrap();
            let got = split.all_logits_with(&ids(&p["input_ids"]), rows.as_ref()).unwrap();
            let d = max_diff(&got, &base[k]);
            eprintln!("{name} tp={tp} prompt {k}: max |Δlogit| vs tp=1 {d:.2e}");
            assert!(d <= TOLERANCE, "{name} tp={tp} prompt {k}: {d:e}");
            let g = split.greedy_ids_with(&ids(&p["input_ids"]), rows.as_ref(), 8).unwrap();
            assert_eq!(g, base_greedy[k], "{name} tp={tp} prompt {k}: greedy ids");
        }
        let rows: Vec<_> = prompts.iter().map(|p| split.encode_images(&images(p)).unwrap()).collect();
        assert_eq!(batched_greedy(&split.model, &prompt_ids, &rows, 8), base_greedy, "{name} tp={tp} packed");
        if let Some(want) = &base_batched {
            // Both prompts together through continuous batching.
            let got = split.generate_batch(&reqs);
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.as_ref().unwrap().ids, w.as_ref().unwrap().ids, "{name} tp={tp} batched");
            }
        }
    }
}

#[test]
fn gqa_with_fewer_kv_heads_than_ranks() {
    // 4 query heads, 2 KV heads: at 4 ranks each KV head is kept by two ranks.
    check(&fixtures().join("models/gqa_window"), &[2, 4]);
}

#[test]
fn mqa_with_an_untied_head() {
    // 2 query heads, 1 KV head (replicated), lm_head.weight split by vocabulary rows.
    check(&fixtures().join("models/mqa_untied"), &[2]);
}

#[test]
fn kv_heads_equal_to_heads_with_a_softcap() {
    check(&fixtures().join("models/kv_eq_heads"), &[2]);
}

#[test]
fn multimodal_with_images_batched() {
    check(&fixtures().join("multimodal/mm_window"), &[2, 4]);
}

#[test]
fn shapes_that_do_not_split_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_tokenizer(&fixtures().join("models/mqa_untied"), tmp.path());
    let err = Engine::load_checkpoint_tp(&dir, 4).err().expect("2 heads over 4 ranks").to_string();
    assert!(err.contains("do not split over 4 ranks"), "{err}");
}

#[test]
fn a_failed_rank_stops_the_engine_instead_of_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_tokenizer(&fixtures().join("models/gqa_window"), tmp.path());
    let engine = Engine::load_checkpoint_tp(&dir, 2).unwrap();
    let prompt: Vec<u32> = ids(&reference(&dir)["prompts"][0]["input_ids"]);
    assert!(engine.greedy_ids(&prompt, 2).is_ok());
    // Rank 1 fails (as a rank whose device died would): the other rank's collective returns
    // an error naming it, and the model stays unusable.
    engine.model.shards[1].comm.abort("injected failure");
    let err = engine.all_logits(&prompt).unwrap_err().to_string();
    assert!(err.contains("rank 1: injected failure"), "{err}");
    assert!(engine.model.broken().is_some());
    // Behind the engine thread: every request is answered `Stopped`, and the thread ends.
    let handle = medbatch_engine::EngineHandle::spawn(engine);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let req = GenerateRequest {
        prompt: "Hello world".into(),
        chat: false,
        add_bos: true,
        parse_special: false,
        max_new_tokens: 4,
        stop: Vec::new(),
        sampling: Default::default(),
        grammar: None,
        images: Vec::new(),
    };
    for _ in 0..2 {
        let e = rt.block_on(handle.generate(req.clone())).unwrap_err();
        assert!(matches!(e, medbatch_engine::EngineError::Stopped), "{e}");
    }
}

#[test]
fn each_rank_holds_its_share_of_the_weights() {
    // GQA at 4 ranks replicates KV heads (4 query heads over 2 KV heads: each rank keeps one KV
    // head, as does each of 2 ranks); everything else splits evenly.
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_tokenizer(&fixtures().join("models/gqa_window"), tmp.path());
    let cfg = medbatch_engine::load::hf::read_config(&dir).unwrap();
    let whole = medbatch_engine::load::hf::load_model_tp(&dir, &cfg, &candle_core::Device::Cpu, 1).unwrap();
    let (all, norms) = whole.shards[0].weight_bytes();
    let t = &cfg.text;
    let kv_bytes = (2 * t.num_layers * t.num_kv_heads * t.head_dim * t.hidden_size * 4) as u64;
    for tp in [2usize, 4] {
        let split = medbatch_engine::load::hf::load_model_tp(&dir, &cfg, &candle_core::Device::Cpu, tp).unwrap();
        let kv_per_rank = kv_bytes / t.num_kv_heads as u64 * (t.num_kv_heads / tp).max(1) as u64;
        for (r, shard) in split.shards.iter().enumerate() {
            let (mine, replicated) = shard.weight_bytes();
            assert_eq!(replicated, norms, "tp={tp} rank {r}: norms are replicated");
            assert_eq!(mine, (all - kv_bytes) / tp as u64 + kv_per_rank, "tp={tp} rank {r}: its share");
        }
    }
}
