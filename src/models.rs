//! `medbatch models describe`: what a model is and how much fits in a given memory.

use anyhow::Context;
use medbatch_engine::describe::{parse_memory, Description};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// Architecture, layers, heads, parameters, weight and KV-cache bytes, and the largest
    /// batch × context that fits `--memory`. Reads config.json (and the weight files'
    /// headers, when present) or a GGUF file's metadata; weights are not loaded.
    Describe {
        /// A checkpoint folder (config.json) or a GGUF file; `demo` for the demo model.
        path: String,
        /// Memory for weights and KV cache, e.g. `80GiB`, `141GB` (per device with `--tp`).
        #[arg(long, default_value = "80GiB")]
        memory: String,
        /// Tensor-parallel ranks: the model split over this many devices of `--memory` each.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn human_params(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.1} M", n as f64 / 1e6)
    }
}

pub fn describe(path: &str) -> anyhow::Result<Description> {
    let p = if path == "demo" { crate::model_path::demo_model_path() } else { PathBuf::from(path) };
    if p.is_dir() {
        let cfg = medbatch_engine::load::hf::read_config(&p)?;
        let bytes = medbatch_engine::load::hf::weight_bytes_by_dtype(&p)?;
        return Ok(Description::new(&cfg, bytes));
    }
    anyhow::ensure!(p.is_file(), "model {} not found", p.display());
    let g = medbatch_engine::load::gguf::GgufFile::open(&p)?;
    let t = g.text_config()?;
    let tied = !g.content.tensor_infos.contains_key("output.weight");
    Ok(Description::from_text("gemma3 (GGUF)", &t, tied, g.bytes_by_type().into_iter().collect()))
}

pub fn main(cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelsCommand::Describe { path, memory, tp, json } => {
            anyhow::ensure!(tp >= 1, "--tp must be at least 1");
            let mem =
                parse_memory(&memory).with_context(|| format!("--memory {memory:?}: give e.g. 80GiB or 141GB"))?;
            let d = describe(&path)?;
            let cap = d.capacity_tp(mem, tp);
            let pool = d.kv_pool(mem, tp, medbatch_engine::kv::BLOCK_TOKENS);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "model": d,
                        "memory_bytes": mem,
                        "tp": tp,
                        "weight_bytes_per_device": d.weight_bytes_per_rank(tp),
                        "capacity": cap,
                        "kv_pool": pool
                    }))?
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!("{path}");
            println!("  architecture   {}", d.architecture);
            println!(
                "  layers         {} ({} global, {} sliding-window of {} tokens)",
                d.layers,
                d.global_layers,
                d.layers - d.global_layers,
                d.sliding_window
            );
            println!(
                "  heads          {} query, {} KV, head dim {}, hidden {}",
                d.heads, d.kv_heads, d.head_dim, d.hidden_size
            );
            println!(
                "  parameters     {} (text {}, vision {})",
                human_params(d.params_total),
                human_params(d.params_text),
                human_params(d.params_vision)
            );
            let per_dtype: Vec<String> = d.weight_bytes.iter().map(|(k, v)| format!("{k} {}", gib(*v))).collect();
            println!("  weights        {} ({})", gib(d.weight_bytes_total), per_dtype.join(", "));
            println!(
                "  KV cache       {} bytes per token ({}-byte elements; sliding-window layers stop growing at {} tokens)",
                d.kv_bytes_per_token, d.kv_bytes_per_element, d.sliding_window
            );
            if tp > 1 {
                println!(
                    "  split over {tp} devices: {} of weights and {} of {} KV heads on each",
                    gib(d.weight_bytes_per_rank(tp)),
                    d.kv_heads_per_rank(tp),
                    d.kv_heads
                );
                println!("  fits in {tp} x {memory} (weights + KV, per device):");
            } else {
                println!("  fits in {memory} (weights + KV):");
            }
            println!("    context   KV per sequence   max batch");
            for c in cap {
                println!("    {:>7}   {:>15}   {:>9}", c.context, gib(c.kv_bytes_per_sequence), c.max_batch);
            }
            println!(
                "  paged KV cache: blocks of {} tokens; a page (one block of one layer: {} KV heads × {} × 2 × {} bytes) is {} KiB",
                pool.block,
                d.kv_heads_per_rank(tp),
                d.head_dim,
                d.kv_bytes_per_element,
                pool.page_bytes / 1024
            );
            println!("  pool: {} after the weights = {} pages", gib(pool.pool_bytes), pool.pages);
            println!(
                "    context   pages per sequence ({} global layers × blocks + {} sliding-window layers × their window)   KV per sequence   sequences   pages a shared prompt of this length saves each (at least)",
                d.global_layers,
                d.layers - d.global_layers
            );
            for r in &pool.rows {
                println!(
                    "    {:>7}   {:>18}   {:>15}   {:>9}   {:>9}",
                    r.context,
                    r.pages_per_sequence,
                    gib(r.kv_bytes_per_sequence),
                    r.max_sequences,
                    r.pages_saved_by_a_shared_prefix
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
