//! `medbatch bench`: prompt (prefill) and generation speed of a model on this machine,
//! measured the way llama.cpp's pp/tg figures are, so the two can be compared.

use crate::model_path;
use medbatch_engine::model::{BatchItem, Logits};
use std::process::ExitCode;
use std::time::Instant;

/// Text repeated to build prompts of any length.
const FILLER: &str = "Hemoglobin 13.2 g/dL (ref 12.0-15.5). White blood cells 6.1 x10^9/L. \
Platelets 250 x10^9/L. The patient reports no fever, chills or weight loss. ";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model: a Gemma 3 GGUF file, a checkpoint folder, or `demo`.
    #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
    pub model: String,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated for the decode measurement.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Sequences run together (packed in each forward pass); speeds are aggregate tokens/s.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn main(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let engine = model_path::load_engine(&args.model)?;
    let tok = &engine.tokenizer;
    let mut ids = vec![tok.special().bos];
    while ids.len() < args.prompt_tokens {
        ids.extend(tok.encode(FILLER, false, false));
    }
    ids.truncate(args.prompt_tokens);
    let runs = args.runs.max(1);
    let (mut pp, mut tg_long, mut tg_short) = (Vec::new(), Vec::new(), Vec::new());
    let batch = args.batch.max(1);
    for r in 0..runs {
        // Prefill `batch` prompts of `prompt_tokens` in one packed pass per chunk.
        let mut caches: Vec<_> = (0..batch).map(|_| engine.model.new_cache()).collect();
        let t = Instant::now();
        let mut logits = Vec::new();
        for chunk_start in (0..ids.len()).step_by(medbatch_engine::engine::PREFILL_CHUNK) {
            let chunk = &ids[chunk_start..(chunk_start + medbatch_engine::engine::PREFILL_CHUNK).min(ids.len())];
            let mut items: Vec<BatchItem> =
                caches.iter_mut().map(|cache| BatchItem { ids: chunk, cache, logits: Logits::Last }).collect();
            logits = engine.model.forward_batch(&mut items)?;
        }
        pp.push((batch * ids.len()) as f64 / t.elapsed().as_secs_f64());
        // Generation after the long prompt (context prompt_tokens → prompt_tokens + gen).
        let t = Instant::now();
        decode_steps(&engine.model, &mut caches, logits, args.gen_tokens)?;
        tg_long.push((batch * args.gen_tokens) as f64 / t.elapsed().as_secs_f64());
        // Generation after a short prompt.
        let short = &ids[..16.min(ids.len())];
        let mut caches: Vec<_> = (0..batch).map(|_| engine.model.new_cache()).collect();
        let mut items: Vec<BatchItem> =
            caches.iter_mut().map(|cache| BatchItem { ids: short, cache, logits: Logits::Last }).collect();
        let logits = engine.model.forward_batch(&mut items)?;
        let t = Instant::now();
        decode_steps(&engine.model, &mut caches, logits, args.gen_tokens)?;
        tg_short.push((batch * args.gen_tokens) as f64 / t.elapsed().as_secs_f64());
        eprintln!("run {}/{runs}: pp {:.1} tok/s, tg {:.1} / {:.1} tok/s", r + 1, pp[r], tg_long[r], tg_short[r]);
    }
    // candle's CPU kernels honour CANDLE_NUM_THREADS, else use every core.
    let threads = std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(candle_core::utils::get_num_threads);
    let (pp, tgl, tgs) = (median(pp), median(tg_long), median(tg_short));
    println!(
        "{}",
        serde_json::json!({
            "model": engine.info.id,
            "threads": threads,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "runs": runs,
            "batch": batch,
            "pp_tok_s": (pp * 10.0).round() / 10.0,
            "tg_tok_s_after_prompt": (tgl * 10.0).round() / 10.0,
            "tg_tok_s_short_ctx": (tgs * 10.0).round() / 10.0,
            "peak_rss_mib": peak_rss_mib().map(|m| m.round()),
        })
    );
    println!(
        "batch {batch}: pp{}: {pp:.1} tok/s; tg{}: {tgl:.1} tok/s (ctx {}→{}), {tgs:.1} tok/s (short ctx); {threads} threads",
        args.prompt_tokens,
        args.gen_tokens,
        args.prompt_tokens,
        args.prompt_tokens + args.gen_tokens
    );
    Ok(ExitCode::SUCCESS)
}

/// `steps` greedy decode steps for every sequence at once, starting from `logits`.
fn decode_steps(
    model: &medbatch_engine::model::Gemma3,
    caches: &mut [medbatch_engine::model::SeqCache],
    mut logits: Vec<Option<candle_core::Tensor>>,
    steps: usize,
) -> anyhow::Result<()> {
    for _ in 0..steps {
        let next = logits
            .iter()
            .map(|l| medbatch_engine::Engine::argmax(l.as_ref().expect("logits")).map(|n| [n]))
            .collect::<Result<Vec<[u32; 1]>, _>>()?;
        let mut items: Vec<BatchItem> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(ids, cache)| BatchItem { ids, cache, logits: Logits::Last })
            .collect();
        logits = model.forward_batch(&mut items)?;
    }
    Ok(())
}
