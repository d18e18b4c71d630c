//! `medbatch models describe` on the MedGemma config fixtures and the demo model.

mod common;

use common::*;

fn describe(path: &str, memory: &str) -> serde_json::Value {
    let o = medbatch(&["models", "describe", path, "--memory", memory, "--json"]);
    assert!(o.status.success(), "{path}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn billions(v: &serde_json::Value, key: &str) -> f64 {
    v["model"][key].as_u64().unwrap() as f64 / 1e9
}

#[test]
fn medgemma_parameter_counts() {
    for (name, total, text_only) in [
        ("medgemma-4b-it", 4.30, 3.88),
        ("medgemma-1.5-4b-it", 4.30, 3.88),
        ("medgemma-27b-it", 27.43, 27.01),
        ("medgemma-27b-text-it", 27.01, 27.01),
    ] {
        let v = describe(&format!("tests/fixtures/medgemma/{name}"), "80GiB");
        let (got, got_text) = (billions(&v, "params_total"), billions(&v, "params_text"));
        assert!((got - total).abs() < 0.05, "{name}: {got:.3} B parameters, expected ≈ {total}");
        assert!((got_text - text_only).abs() < 0.05, "{name}: {got_text:.3} B text parameters");
        // Every 6th layer attends globally.
        assert_eq!(v["model"]["global_layers"].as_u64().unwrap(), v["model"]["layers"].as_u64().unwrap() / 6);
    }
}

#[test]
fn kv_budget_and_capacity() {
    // 27B: 16 KV heads × 128 × 2 (K and V) × 2 bytes = 8 KiB per layer per token; 10 global
    // layers grow with the context, 52 local layers stop at the 1024-token window.
    let v = describe("tests/fixtures/medgemma/medgemma-27b-text-it", "141GB");
    assert_eq!(v["model"]["kv_bytes_per_token"].as_u64().unwrap(), 10 * 8192);
    let cap = v["capacity"].as_array().unwrap();
    let at = |ctx: u64| cap.iter().find(|c| c["context"].as_u64() == Some(ctx)).unwrap().clone();
    let per_seq_8k = at(8192)["kv_bytes_per_sequence"].as_u64().unwrap();
    assert_eq!(per_seq_8k, 10 * 8192 * 8192 + 52 * 8192 * 1024);
    let weights = v["model"]["weight_bytes_total"].as_u64().unwrap();
    assert_eq!(at(8192)["max_batch"].as_u64().unwrap(), (141_000_000_000 - weights) / per_seq_8k);
    // Nothing fits when the weights alone exceed the memory.
    let small = describe("tests/fixtures/medgemma/medgemma-27b-text-it", "40GiB");
    assert!(small["capacity"].as_array().unwrap().iter().all(|c| c["max_batch"] == 0));
}

#[test]
fn paged_pool_arithmetic() {
    // 27B on 141 GB: pages of 16 tokens × 16 KV heads × 128 × 2 (K and V) × 2 bytes; a
    // sequence of 8,192 tokens holds 512 blocks on each of the 10 global layers and the 1,024
    // -token window (64 blocks, plus the one its start may straddle) on each of the 52 others.
    let v = describe("tests/fixtures/medgemma/medgemma-27b-text-it", "141GB");
    let pool = &v["kv_pool"];
    assert_eq!(pool["block"], 16);
    assert_eq!(pool["page_bytes"].as_u64().unwrap(), 16 * 16 * 128 * 2 * 2);
    let weights = v["model"]["weight_bytes_total"].as_u64().unwrap();
    let pages = (141_000_000_000 - weights) / (16 * 16 * 128 * 2 * 2);
    assert_eq!(pool["pages"].as_u64().unwrap(), pages);
    let row = pool["rows"].as_array().unwrap().iter().find(|r| r["context"] == 8192).unwrap().clone();
    assert_eq!(row["pages_per_sequence"].as_u64().unwrap(), 10 * 512 + 52 * 65);
    assert_eq!(row["max_sequences"].as_u64().unwrap(), pages / (10 * 512 + 52 * 65));
    assert_eq!(row["pages_saved_by_a_shared_prefix"].as_u64().unwrap(), 10 * 512);
    // With two devices, each holds half the KV heads: pages of half the bytes.
    let o = medbatch(&[
        "models",
        "describe",
        "tests/fixtures/medgemma/medgemma-27b-text-it",
        "--memory",
        "80GiB",
        "--tp",
        "2",
        "--json",
    ]);
    let split: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(split["kv_pool"]["page_bytes"].as_u64().unwrap(), 16 * 8 * 128 * 2 * 2);
}

#[test]
fn demo_model_is_described_from_gguf_metadata() {
    let model = demo_model();
    let v = describe(model.to_str().unwrap(), "1GiB");
    let params = v["model"]["params_total"].as_u64().unwrap();
    assert!((268_000_000..268_200_000).contains(&params), "{params}");
    assert_eq!(v["model"]["global_layers"], 3);
}
