//! `medbatch bench --decode-step`: random weights of a config's shape, split over CPU ranks,
//! timed at several batch sizes; the bytes behind the floor are checked against the config.

mod common;

use common::*;

#[test]
fn decode_step_rows_count_the_bytes_a_step_reads() {
    let config = repo_root().join("tests/fixtures/hf/models/gqa_window/config.json");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    let n = |k: &str| cfg[k].as_u64().unwrap();
    let (hidden, inter, layers, heads, kv, hd, vocab) = (
        n("hidden_size"),
        n("intermediate_size"),
        n("num_hidden_layers"),
        n("num_attention_heads"),
        n("num_key_value_heads"),
        n("head_dim"),
        n("vocab_size"),
    );
    let (context, steps) = (20u64, 3u64);
    let o = medbatch(&[
        "bench",
        "decode-step",
        config.to_str().unwrap(),
        "--batches",
        "1,3",
        "--context",
        &context.to_string(),
        "--steps",
        &steps.to_string(),
        "--tp",
        "2",
        "--hbm-gbps",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let rows: Vec<serde_json::Value> =
        out.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "{out}");
    // Per rank, bf16: half the heads and MLP of every layer and half the (tied) head's rows;
    // the norms in f32.
    let matrices = layers * hidden * (2 * heads * hd + 2 * kv * hd + 3 * inter) / 2 + vocab * hidden / 2;
    let norms = layers * (4 * hidden + 2 * hd) + hidden;
    let weights = 2 * matrices + 4 * norms;
    for (row, batch) in rows.iter().zip([1u64, 3]) {
        assert_eq!(row["batch"], batch);
        assert_eq!(row["ranks"], 2);
        assert_eq!(row["dtype"], "bf16");
        assert_eq!(row["weight_bytes_read_per_rank"], weights);
        // Each sequence cached its context, two untimed steps and the timed ones; a step reads
        // all of them on global layers and the window of 8 on sliding-window layers: one of
        // the two KV heads per rank, bf16 keys and values.
        let tokens = context + 2 + steps;
        let window = n("sliding_window");
        let positions: u64 = cfg["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| if t == "full_attention" { tokens } else { tokens.min(window) })
            .sum();
        let kv_bytes = batch * positions * 2 * (kv / 2) * hd * 2;
        assert_eq!(row["kv_bytes_per_rank"], kv_bytes);
        let floor = (weights + kv_bytes) as f64 / 2e9 * 1e3;
        assert!((row["floor_ms"].as_f64().unwrap() - floor).abs() < 1e-3, "{row}");
        assert!(row["step_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(out.contains("batch   3:"), "{out}");
}

#[test]
fn decode_step_refuses_a_shape_that_does_not_split() {
    let config = repo_root().join("tests/fixtures/hf/models/kv_eq_heads");
    // The mode as a word, and as the older flag (kept as a hidden alias).
    for mode in ["decode-step", "--decode-step"] {
        let o = medbatch(&["bench", mode, config.to_str().unwrap(), "--tp", "4", "--steps", "1"]);
        assert!(!o.status.success());
        assert!(text(&o.stderr).contains("do not split over 4 ranks"), "{}", text(&o.stderr));
    }
    let o = medbatch(&["bench", "decode-step"]);
    assert!(text(&o.stderr).contains("needs a TARGET"), "{}", text(&o.stderr));
}
