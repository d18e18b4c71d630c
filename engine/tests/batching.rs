//! Batched generation equals one-at-a-time generation on the demo model: sequences of
//! different lengths, joining and leaving between steps, long prompts prefilled in chunks,
//! with and without a shared cached prefix.

use medbatch_engine::{Engine, GenerateRequest};
use std::path::PathBuf;

fn engine() -> Engine {
    let p = std::env::var_os("MEDBATCH_DEMO_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/medbatch/models/gemma-3-270m-q4_k_m.gguf")
    });
    assert!(p.is_file(), "demo model missing at {}: run `bash infra/fetch-demo-model.sh`", p.display());
    Engine::load_gguf(&p, None).unwrap()
}

const PREFIX: &str = "Lab result lines as JSON.\n\nLine: Magnesium: 0.62 mmol/L (ref 0.7-1.0) L\nJSON: {\"test\":\"Magnesium\",\"value\":\"0.62\",\"unit\":\"mmol/L\",\"ref_low\":\"0.7\",\"ref_high\":\"1.0\",\"flag\":\"L\"}\n\nLine: ";

fn requests() -> Vec<GenerateRequest> {
    let lines = [
        "Chloride                104      mmol/L      98-107",
        "Creatinine              0.71     mg/dL       0.51-0.95",
        "RBC: 0-2 /hpf (ref 0-2)",
        "Potassium was elevated at 5.9 mmol/L (3.5-5.1).",
        "WBC 11.8 x10^9/L (4.0-11.0) H",
    ];
    let mut reqs: Vec<GenerateRequest> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| GenerateRequest {
            prompt: format!("{PREFIX}{l}\nJSON: {{\"test\":\""),
            chat: false,
            add_bos: true,
            parse_special: false,
            // Different lengths: sequences leave the batch at different steps.
            max_new_tokens: 12 + 6 * i as u32,
            stop: Vec::new(),
            sampling: Default::default(),
            grammar: None,
            images: Vec::new(),
        })
        .collect();
    // A prompt longer than the 512-token window and the per-step prefill budget.
    let long = "1. Sodium 140 mmol/L, potassium 4.1 mmol/L, chloride 101 mmol/L.\n".repeat(40);
    reqs.push(GenerateRequest {
        prompt: format!("{long}41."),
        chat: false,
        add_bos: true,
        parse_special: false,
        max_new_tokens: 24,
        stop: Vec::new(),
        sampling: Default::default(),
        grammar: None,
        images: Vec::new(),
    });
    reqs
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let mut e = engine();
    let reqs = requests();
    let alone: Vec<_> = reqs.iter().map(|r| e.generate(r).unwrap()).collect();
    let together = e.generate_batch(&reqs);
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let b = b.as_ref().unwrap();
        assert_eq!(a.ids, b.ids, "request {i}: batched ids differ");
        assert_eq!(a.finish, b.finish, "request {i}");
    }
    assert!(alone[5].prompt_tokens > 512, "the long prompt spans several prefill chunks");
    assert!(alone[1].reused_tokens > 0, "the shared prefix was reused");
}

/// The engine thread under tight limits (two sequences, a KV pool smaller than two
/// sequences) still answers every request, each as it would be answered alone.
#[test]
fn engine_thread_respects_limits_and_answers_like_alone() {
    use medbatch_engine::service::{EngineHandle, ServiceLimits};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf");
    let ckpt = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root.join("models/gqa_window").join(f), ckpt.path().join(f)).unwrap();
    }
    std::fs::copy(root.join("tokenizer/tokenizer.json"), ckpt.path().join("tokenizer.json")).unwrap();
    let reqs: Vec<GenerateRequest> = (0..6)
        .map(|i| GenerateRequest {
            prompt: "The patient has a mild fever. ".repeat(i + 1),
            chat: false,
            add_bos: true,
            parse_special: false,
            max_new_tokens: 5 + i as u32,
            stop: Vec::new(),
            sampling: Default::default(),
            grammar: None,
            images: Vec::new(),
        })
        .collect();
    let mut alone_engine = Engine::load(ckpt.path()).unwrap();
    let alone: Vec<_> = reqs.iter().map(|r| alone_engine.generate(r).unwrap()).collect();
    // A KV pool of one and a half of the longest sequence's pages: sequences wait for room.
    let len = alone_engine.prompt_ids(&reqs[5]).unwrap().len() + reqs[5].max_new_tokens as usize;
    let (layout, _) = alone_engine.model.kv_stats().unwrap();
    let one_seq_kv = layout.pages_for(len, 8) as u64 * alone_engine.model.page_bytes();
    let limits =
        ServiceLimits { max_sequences: 2, kv_memory: Some(one_seq_kv + one_seq_kv / 2), prefill_tokens_per_step: 8 };
    let handle = EngineHandle::spawn_with(Engine::load(ckpt.path()).unwrap(), limits);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let served = rt.block_on(async {
        // All six in flight at once; the thread admits two at a time.
        let tasks: Vec<_> = reqs
            .iter()
            .cloned()
            .map(|r| {
                let h = handle.clone();
                tokio::spawn(async move { h.generate(r).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    for (i, (a, b)) in alone.iter().zip(&served).enumerate() {
        assert_eq!(a.ids, b.ids, "request {i}");
        assert_eq!(a.finish, b.finish, "request {i}");
    }
}
