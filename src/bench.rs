//! `medbatch bench`: prompt (prefill) and generation speed of a model on this machine,
//! measured the way llama.cpp's pp/tg figures are, so the two can be compared.

use crate::model_path;
use medbatch_engine::models::gemma3::{BatchItem, Logits};
use std::process::ExitCode;
use std::time::Instant;

/// Text repeated to build prompts of any length.
const FILLER: &str = "Hemoglobin 13.2 g/dL (ref 12.0-15.5). White blood cells 6.1 x10^9/L. \
Platelets 250 x10^9/L. The patient reports no fever, chills or weight loss. ";

/// What `medbatch bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Prompt (prefill) and generation speed of `--model` (the default).
    Engine,
    /// Aggregate throughput of N parallel sequences through the scheduler; TARGET: the Ns (`1,4,16,64`).
    Parallel,
    /// The cost of constrained decoding (lab-report answers under their grammars).
    Grammar,
    /// Publishing jobs to RabbitMQ; TARGET: how many jobs.
    Publish,
    /// Image preprocessing to `pixel_values`; TARGET: how many images.
    Images,
    /// DICOM decoding and the MedGemma recipes; TARGET: a folder of files.
    Dicom,
    /// The vision tower of MedGemma's shape with random weights.
    Vision,
    /// Decode steps of random weights of a config's shape; TARGET: the config.
    DecodeStep,
    /// The quantized matrix kernels against candle's.
    Kernels,
    /// Whole-slide reading: header, tiles, tissue patches; TARGET: a slide file or `s3://` object.
    Wsi,
    /// Embedding speed of a SigLIP of MedSigLIP-448's shape with random weights (`--runs`
    /// images, four times as many texts; on a GPU, `--devices N`, batches of each size of
    /// `--batches`).
    Siglip,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure (default: `engine`). The options that go with each are below.
    #[arg(value_enum)]
    pub mode: Option<Mode>,
    /// The mode's target: Ns for `parallel`, a job or image count for `publish` and
    /// `images`, a folder for `dicom`, a config for `decode-step`, a slide for `wsi`.
    pub target: Option<String>,
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
    /// Measure the cost of constrained decoding instead: `batch` lab-report answers decoded
    /// together under their grammars (the pipeline's schema, copy fields over each line),
    /// reporting grammar-mask time per token against the decode step.
    #[arg(hide = true, long)]
    pub grammar: bool,
    /// Measure aggregate throughput through the engine's scheduler instead: for each N,
    /// N sequences of `--prompt-tokens` random prompt tokens are admitted together, prefilled
    /// and decoded for `--gen-tokens` greedy tokens each, as
    /// `../shared/bench/llamacpp_batched.py --parallel` does with llama.cpp (e.g.
    /// `--parallel 1,4,16,64 --prompt-tokens 64 --gen-tokens 64`).
    #[arg(hide = true, long, value_delimiter = ',', value_name = "N,...")]
    pub parallel: Vec<usize>,
    /// Measure publishing instead: this many jobs published through medbatch's queue (as
    /// planning does: windows of 256 in flight, each window's confirms awaited) against raw
    /// lapin publishes with every confirm awaited at the end, on the broker at `--amqp`.
    /// Needs no model.
    #[arg(hide = true, long, value_name = "JOBS")]
    pub publish: Option<u32>,
    #[arg(long, env = "MEDBATCH_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp: String,
    /// Measure image preprocessing instead: this many images through the Gemma 3 processor
    /// path to 896×896 `pixel_values` (a 2,048×2,500 grey radiograph-sized image and a
    /// 640×480 colour JPEG), timing decode, resize and normalise separately. Needs no model.
    #[arg(hide = true, long, value_name = "IMAGES")]
    pub images: Option<u32>,
    /// Measure DICOM decoding instead: every file under this folder is read (headers, then
    /// pixels), grouped into series by SeriesInstanceUID, and each series turned into 8-bit
    /// slices (CT: the three windows; otherwise min–max over the series), `--runs` times.
    /// Needs no model.
    #[arg(hide = true, long, value_name = "FOLDER")]
    pub dicom: Option<std::path::PathBuf>,
    /// Measure the vision tower instead: a random-weight SigLIP of MedGemma's real shape
    /// (896/14, 27 layers, hidden 1152, 16 heads; projector to MedGemma 4B's 2,560) in f32
    /// on the CPU, `--runs` images through tower and projector. Needs no model.
    #[arg(hide = true, long)]
    pub vision_tower: bool,
    /// With `vision`: the text width the projector maps to (2,560 for 4B, 5,376 for 27B).
    #[arg(long, default_value_t = 2560)]
    pub text_hidden: usize,
    /// Measure decode steps of random weights instead: a model of the shape in this config
    /// (`config.json` or its folder, e.g. tests/fixtures/medgemma/medgemma-27b-text-it) with
    /// weights drawn on the ranks' devices as `--dtype` (default bf16), split by `--tp` or
    /// `--devices`. Each batch size of `--batches` is prefilled to `--context` tokens, then
    /// `--steps` decode steps are timed (median). Needs no checkpoint.
    #[arg(hide = true, long, value_name = "CONFIG")]
    pub decode_step: Option<std::path::PathBuf>,
    /// With `decode-step` and `siglip` on a GPU: the batch sizes measured; with `kernels`: the
    /// activation rows.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batches: Vec<usize>,
    /// With `decode-step`: tokens in each sequence's cache before the timed steps.
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// With `decode-step`: decode steps timed per batch size.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// With `decode-step`: keep only the first N layers (to fit a smaller device; the floor
    /// counts the same layers).
    #[arg(long)]
    pub layers: Option<usize>,
    /// With `decode-step`: one device's memory bandwidth in GB/s (H200 4800, H100 SXM 3350,
    /// A100 80 GB 2039, L40S 864). The floor of a step is the bytes it reads on a rank (its
    /// weights and KV cache) over this bandwidth.
    #[arg(long)]
    pub hbm_gbps: Option<f64>,
    /// Tensor-parallel ranks, CUDA devices and weight dtype (a checkpoint folder, or
    /// `decode-step`).
    #[command(flatten)]
    pub split: model_path::SplitArgs,
    /// Measure the quantized matrix kernels instead: random weights of each `--shapes` entry
    /// in every GGUF type the blocked kernel takes, times each row count of `--batches`,
    /// against candle's row-wise and repacked kernels. Needs no model.
    #[arg(hide = true, long)]
    pub kernels: bool,
    /// Set from the `wsi` mode's TARGET.
    #[arg(skip)]
    pub slide: Option<String>,
    /// With `kernels`: weight shapes as OUTxIN (defaults: Gemma 3 270M's MLP up and down
    /// projections, MedGemma 4B's MLP up projection).
    #[arg(long, value_delimiter = ',', default_value = "2048x640,640x2048,10240x2560", value_parser = parse_shape)]
    pub shapes: Vec<(usize, usize)>,
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (n, k) = s.split_once('x').ok_or_else(|| format!("{s:?} is not OUTxIN"))?;
    let n = n.trim().parse().map_err(|_| format!("{s:?}: OUT is not a number"))?;
    let k = k.trim().parse().map_err(|_| format!("{s:?}: IN is not a number"))?;
    Ok((n, k))
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
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

/// The mode asked for: the positional MODE [TARGET], or one of the older mode flags
/// (`--kernels`, `--dicom FOLDER` …, kept as hidden aliases), or `engine`.
fn resolve(mut args: BenchArgs) -> anyhow::Result<(Mode, BenchArgs)> {
    let target = args.target.take();
    let need = |what: &str| target.clone().ok_or_else(|| anyhow::anyhow!("`medbatch bench {what}` needs a TARGET"));
    let count = |what: &str| -> anyhow::Result<u32> {
        need(what)?.parse().map_err(|_| anyhow::anyhow!("`medbatch bench {what}`: TARGET is not a count"))
    };
    let mode = match args.mode {
        Some(Mode::Parallel) => {
            args.parallel = need("parallel")?
                .split(',')
                .map(|n| n.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("`medbatch bench parallel`: TARGET is not a list of numbers"))?;
            Mode::Parallel
        }
        Some(Mode::Publish) => {
            args.publish = Some(count("publish")?);
            Mode::Publish
        }
        Some(Mode::Images) => {
            args.images = Some(count("images")?);
            Mode::Images
        }
        Some(Mode::Dicom) => {
            args.dicom = Some(need("dicom")?.into());
            Mode::Dicom
        }
        Some(Mode::DecodeStep) => {
            args.decode_step = Some(need("decode-step")?.into());
            Mode::DecodeStep
        }
        Some(Mode::Wsi) => {
            args.slide = Some(need("wsi")?);
            Mode::Wsi
        }
        Some(m) => {
            let name = clap::ValueEnum::to_possible_value(&m).map(|v| v.get_name().to_string()).unwrap_or_default();
            anyhow::ensure!(target.is_none(), "`medbatch bench {name}` takes no TARGET");
            m
        }
        None if args.kernels => Mode::Kernels,
        None if args.vision_tower => Mode::Vision,
        None if args.dicom.is_some() => Mode::Dicom,
        None if args.images.is_some() => Mode::Images,
        None if args.publish.is_some() => Mode::Publish,
        None if args.decode_step.is_some() => Mode::DecodeStep,
        None if args.grammar => Mode::Grammar,
        None if !args.parallel.is_empty() => Mode::Parallel,
        None => Mode::Engine,
    };
    Ok((mode, args))
}

pub fn main(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let (mode, args) = resolve(args)?;
    match mode {
        Mode::Kernels => return crate::kernel_bench::run(&args.shapes, &args.batches, args.runs.max(1)),
        Mode::Vision => return vision_bench(args.runs.max(1), args.text_hidden),
        Mode::Siglip => return crate::siglip_bench::run(args.runs.max(1), &args.split.devices, &args.batches),
        Mode::Dicom => return dicom_bench(args.dicom.as_deref().expect("resolved"), args.runs.max(1)),
        Mode::Images => return image_bench(args.images.expect("resolved").max(1)),
        Mode::Wsi => return crate::wsi_bench::run(args.slide.as_deref().expect("resolved")),
        Mode::Publish => {
            let rt = crate::runtime()?;
            return rt.block_on(publish_bench(args.publish.expect("resolved").max(1), &args.amqp));
        }
        Mode::DecodeStep => {
            return crate::decode_bench::run(crate::decode_bench::DecodeBench {
                config: args.decode_step.as_deref().expect("resolved"),
                split: &args.split,
                batches: &args.batches,
                context: args.context.max(1),
                steps: args.steps.max(1),
                layers: args.layers,
                hbm_gbps: args.hbm_gbps,
            })
        }
        Mode::Engine | Mode::Grammar | Mode::Parallel => {}
    }
    let engine = args.split.load(&args.model)?;
    match mode {
        Mode::Grammar => return grammar_bench(engine, &args),
        Mode::Parallel => return parallel_bench(engine, &args),
        _ => {}
    }
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
                caches.iter_mut().map(|cache| BatchItem::text(chunk, cache, Logits::Last)).collect();
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
            caches.iter_mut().map(|cache| BatchItem::text(short, cache, Logits::Last)).collect();
        let logits = engine.model.forward_batch(&mut items)?;
        let t = Instant::now();
        decode_steps(&engine.model, &mut caches, logits, args.gen_tokens)?;
        tg_short.push((batch * args.gen_tokens) as f64 / t.elapsed().as_secs_f64());
        eprintln!("run {}/{runs}: pp {:.1} tok/s, tg {:.1} / {:.1} tok/s", r + 1, pp[r], tg_long[r], tg_short[r]);
    }
    // candle's CPU kernels honour CANDLE_NUM_THREADS (`--threads`), else use every core.
    let threads = medbatch_engine::kernels::threads();
    let (pp, tgl, tgs) = (median(pp), median(tg_long), median(tg_short));
    println!(
        "{}",
        serde_json::json!({
            "model": engine.info.id,
            "threads": threads,
            "kernel": medbatch_engine::kernels::kernel_name(),
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
    model: &medbatch_engine::models::gemma3::Gemma3,
    caches: &mut [medbatch_engine::kv::SeqCache],
    mut logits: Vec<Option<candle_core::Tensor>>,
    steps: usize,
) -> anyhow::Result<()> {
    for _ in 0..steps {
        let next = logits
            .iter()
            .map(|l| medbatch_engine::Engine::argmax(l.as_ref().expect("logits")).map(|n| [n]))
            .collect::<Result<Vec<[u32; 1]>, _>>()?;
        let mut items: Vec<BatchItem> =
            next.iter().zip(caches.iter_mut()).map(|(ids, cache)| BatchItem::text(ids, cache, Logits::Last)).collect();
        logits = model.forward_batch(&mut items)?;
    }
    Ok(())
}

/// Aggregate prefill and decode speed with N sequences served together by the scheduler
/// (admission, paged KV, one pass per step over all of them), median of `--runs`.
fn parallel_bench(mut engine: medbatch_engine::Engine, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    use medbatch_engine::sampling::SplitMix64;
    let vocab = engine.model.cfg.vocab_size as u64;
    let bos = engine.tokenizer.special().bos;
    let threads = medbatch_engine::kernels::threads();
    let runs = args.runs.max(1);
    for &n in &args.parallel {
        anyhow::ensure!(n >= 1, "--parallel takes sequence counts of at least 1");
        let (mut pf, mut dc, mut per_step) = (Vec::new(), Vec::new(), Vec::new());
        let mut generated_total = 0;
        for r in 0..runs {
            // Distinct random prompts (ids in 1,000..200,000 after BOS, as the llama.cpp
            // script draws them), a fresh seed per run so the prefix cache never helps.
            let mut rng = SplitMix64::new(1 + r as u64 * 1000 + n as u64);
            let prompts: Vec<Vec<u32>> = (0..n)
                .map(|_| {
                    let mut ids = vec![bos];
                    ids.extend(
                        (1..args.prompt_tokens).map(|_| (1000 + rng.next_u64() % 199_000).min(vocab - 1) as u32),
                    );
                    ids
                })
                .collect();
            let req = medbatch_engine::GenerateRequest {
                prompt: String::new(),
                chat: false,
                add_bos: false,
                parse_special: false,
                max_new_tokens: args.gen_tokens as u32,
                stop: Vec::new(),
                sampling: Default::default(),
                grammar: None,
                images: Vec::new(),
            };
            let t = Instant::now();
            let mut active =
                prompts.into_iter().map(|ids| engine.admit_tokens(&req, ids)).collect::<Result<Vec<_>, _>>()?;
            while active.iter().any(|a| a.generated() == 0 && !a.is_done()) {
                engine.step(&mut active, medbatch_engine::engine::PREFILL_CHUNK)?;
            }
            pf.push((n * args.prompt_tokens) as f64 / t.elapsed().as_secs_f64());
            let before: usize = active.iter().map(|a| a.generated()).sum();
            let passes = engine.stats.passes;
            let t = Instant::now();
            while active.iter().any(|a| !a.is_done()) {
                engine.step(&mut active, medbatch_engine::engine::PREFILL_CHUNK)?;
            }
            let generated: usize = active.iter().map(|a| a.generated()).sum::<usize>() - before;
            dc.push(generated as f64 / t.elapsed().as_secs_f64());
            per_step.push(generated as f64 / (engine.stats.passes - passes).max(1) as f64);
            generated_total = generated + before;
            eprintln!("parallel {n} run {}/{runs}: prefill {:.1} tok/s, decode {:.1} tok/s", r + 1, pf[r], dc[r]);
        }
        let (_, kv) = engine.model.kv_stats()?;
        println!(
            "{}",
            serde_json::json!({
                "engine": "medbatch",
                "model": engine.info.id,
                "threads": threads,
                "kernel": medbatch_engine::kernels::kernel_name(),
                "parallel": n,
                "prompt": args.prompt_tokens,
                "gen": args.gen_tokens,
                "generated_last_run": generated_total,
                "prefill_tok_s": (median(pf) * 10.0).round() / 10.0,
                "decode_tok_s_aggregate": (median(dc) * 10.0).round() / 10.0,
                "tokens_per_step": (median(per_step) * 10.0).round() / 10.0,
                "kv_pages_used_after": kv.pages_used,
                "peak_rss_mib": peak_rss_mib().map(|m| m.round()),
            })
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Result lines the grammar benchmark decodes (a few layouts, repeated to fill the batch).
const BENCH_LINES: [&str; 8] = [
    "Sodium                   139      mmol/L     135-145",
    "Kalium 3,4 mmol/l (3,5 - 5,1) L",
    "Hemoglobin A1c ........ 7.9 %  [4.0-5.6]  HIGH",
    "Troponin I was 0.31 ng/mL (normal <0.04)",
    "CRP                      48.2     mg/L       <5.0         H",
    "Urine protein            2+       Negative",
    "Harnstoff                9,8      mg/dl      2,4–5,7      H",
    "TSH 0.02 mIU/L (0.4-4.0) L",
];

/// Decodes `batch` constrained answers together, several times, and reports the grammar
/// masks' share of the decode steps (prefill excluded).
fn grammar_bench(mut engine: medbatch_engine::Engine, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let pipeline = medbatch_worker::pipeline::LoadedPipeline::load("lab-report")?;
    let batch = args.batch.max(1);
    let t = Instant::now();
    engine.guidance()?;
    let trie_ms = t.elapsed().as_secs_f64() * 1e3;
    let reqs = (0..batch)
        .map(|i| {
            let line = BENCH_LINES[i % BENCH_LINES.len()];
            let r = pipeline.render(line)?;
            Ok(medbatch_engine::GenerateRequest {
                prompt: r.text,
                chat: false,
                add_bos: true,
                parse_special: false,
                max_new_tokens: pipeline.spec.generation.max_new_tokens,
                stop: Vec::new(),
                sampling: Default::default(),
                grammar: Some(medbatch_worker::grammar::answer_grammar(&pipeline.schema, line)?),
                images: Vec::new(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (mut shares, mut mask_us, mut step_ms) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..args.runs.max(1) {
        let mut active = reqs.iter().map(|q| engine.admit(q)).collect::<Result<Vec<_>, _>>()?;
        // Prefill (and the first token) first; then only decode steps are counted.
        while active.iter().any(|a| a.generated() == 0 && !a.is_done()) {
            engine.step(&mut active, medbatch_engine::engine::PREFILL_CHUNK)?;
        }
        engine.stats = Default::default();
        let started = Instant::now();
        while active.iter().any(|a| !a.is_done()) {
            engine.step(&mut active, medbatch_engine::engine::PREFILL_CHUNK)?;
        }
        let s = engine.stats;
        let tokens: usize = active.iter().map(|a| a.generated()).sum();
        let share = s.mask_ns as f64 / s.step_ns.max(1) as f64;
        shares.push(share);
        mask_us.push(s.mask_ns as f64 / s.masks.max(1) as f64 / 1e3);
        step_ms.push(s.step_ns as f64 / s.steps.max(1) as f64 / 1e6);
        eprintln!(
            "run {}/{}: {} decode steps, {} masks, {tokens} tokens in {:.1} s; mask {:.0} µs/token, step {:.1} ms, share {:.2}%",
            r + 1,
            args.runs.max(1),
            s.steps,
            s.masks,
            started.elapsed().as_secs_f64(),
            mask_us[r],
            step_ms[r],
            share * 100.0
        );
    }
    let (share, mask_us, step_ms) = (median(shares), median(mask_us), median(step_ms));
    println!(
        "{}",
        serde_json::json!({
            "model": engine.info.id,
            "vocab": engine.model.cfg.vocab_size,
            "batch": batch,
            "runs": args.runs.max(1),
            "grammar_setup_ms": trie_ms.round(),
            "mask_us_per_token": mask_us.round(),
            "decode_step_ms": (step_ms * 10.0).round() / 10.0,
            "mask_share_of_step": (share * 1000.0).round() / 1000.0,
        })
    );
    println!(
        "batch {batch}: grammar mask {mask_us:.0} µs per token over a {}-token vocabulary; decode step {step_ms:.1} ms; masks are {:.1}% of the step",
        engine.model.cfg.vocab_size,
        share * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

/// Publishing rate: medbatch's confirmed publishes against raw lapin on the same broker, in
/// broker objects of their own (deleted afterwards).
async fn publish_bench(n: u32, url: &str) -> anyhow::Result<ExitCode> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
    use medbatch_connectors::amqp::{model_route, AmqpConfig, RabbitQueue, Topology};
    use medbatch_connectors::queue::JobQueue;
    use medbatch_schemas::{Digest, InputKind, InputRef, Job, ModelRef, PipelineRef, RunId, Selection};

    let suffix = format!("-bench-{}", std::process::id());
    let mut cfg = AmqpConfig::new(url);
    cfg.topology = Topology::default().with_suffix(&suffix);
    let model = ModelRef { id: "bench".into(), digest: Digest::of_bytes(b"bench-model") };
    let route = model_route(model.digest.as_str());
    let queue = RabbitQueue::connect(cfg.clone(), &route).await?;
    let run = RunId::new("bench")?;
    let pipeline = PipelineRef { name: "bench".into(), version: "1".into(), digest: Digest::of_bytes(b"p") };
    let jobs: Vec<Job> = (0..n)
        .map(|i| {
            let input = InputRef {
                uri: format!("s3://bucket/archive/{i:07}.tar.gz"),
                size: 1 << 20,
                sha256: Digest::of_bytes(&i.to_le_bytes()),
                kind: InputKind::TarGz,
                selection: Selection::Whole,
                etag: None,
                case: None,
            };
            Job::new(run.clone(), pipeline.clone(), model.clone(), vec![input], "s3://bucket/out".into())
        })
        .collect();
    let payload_bytes = serde_json::to_vec(&jobs[0])?.len();
    let t = Instant::now();
    queue.publish_batch(&jobs).await?;
    let ours = n as f64 / t.elapsed().as_secs_f64();

    // Raw lapin: the same payloads, confirms awaited after all are sent.
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let raw_queue = format!("medbatch.bench-raw{suffix}");
    // A quorum queue, as the job queues are: the comparison isolates how publishes are confirmed.
    let mut quorum = lapin::types::FieldTable::default();
    quorum.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(raw_queue.as_str().into(), durable, quorum).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let payloads: Vec<Vec<u8>> = jobs.iter().map(serde_json::to_vec).collect::<Result<_, _>>()?;
    let t = Instant::now();
    let mut confirms = Vec::with_capacity(payloads.len());
    for p in &payloads {
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
        confirms.push(
            ch.basic_publish("".into(), raw_queue.as_str().into(), BasicPublishOptions::default(), p, props).await?,
        );
    }
    for c in confirms {
        c.await?;
    }
    let raw = n as f64 / t.elapsed().as_secs_f64();

    ch.queue_delete(raw_queue.as_str().into(), QueueDeleteOptions::default()).await?;
    let t = &cfg.topology;
    for q in [t.queue(&route), t.dead_letter_queue.clone()] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
    }
    for x in [&t.exchange, &t.dead_letter_exchange] {
        ch.exchange_delete(x.as_str().into(), Default::default()).await?;
    }
    println!(
        "{}",
        serde_json::json!({
            "jobs": n,
            "payload_bytes": payload_bytes,
            "medbatch_jobs_per_s": ours.round(),
            "raw_lapin_msgs_per_s": raw.round(),
        })
    );
    println!(
        "publishing {n} jobs ({payload_bytes} bytes each): medbatch {ours:.0} jobs/s (confirmed in windows of 256); raw lapin {raw:.0} msgs/s into a quorum queue (confirms awaited at the end)"
    );
    Ok(ExitCode::SUCCESS)
}

/// Encodes a synthetic image (smooth gradients and edges, like a scan) with the `image` crate.
pub(crate) fn synthetic_image(
    width: u32,
    height: u32,
    gray: bool,
    format: image::ImageFormat,
) -> anyhow::Result<Vec<u8>> {
    let value = |x: u32, y: u32, c: u32| {
        let v = 127.0 + 90.0 * ((x as f64 * 0.013 + c as f64).sin() * (y as f64 * 0.009).cos());
        (v + if (x / 37 + y / 29).is_multiple_of(2) { 20.0 } else { 0.0 }) as u8
    };
    let img = if gray {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(width, height, |x, y| image::Luma([value(x, y, 0)])))
    } else {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([value(x, y, 0), value(x, y, 1), value(x, y, 2)])
        }))
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format)?;
    Ok(out.into_inner())
}

fn image_bench(n: u32) -> anyhow::Result<ExitCode> {
    use medbatch_engine::image::{normalize, resize_bilinear, to_rgb, ImageConfig};
    let cfg = ImageConfig::default();
    let inputs = [
        ("2048x2500 grey PNG", synthetic_image(2048, 2500, true, image::ImageFormat::Png)?),
        ("640x480 colour JPEG", synthetic_image(640, 480, false, image::ImageFormat::Jpeg)?),
    ];
    println!("image preprocessing to {0}x{0} pixel_values, {n} images each, one thread", cfg.size);
    for (name, bytes) in &inputs {
        let (mut t_decode, mut t_resize, mut t_norm) = (0.0, 0.0, 0.0);
        let mut checksum = 0f64;
        for _ in 0..n {
            let t = Instant::now();
            let img = to_rgb(medbatch_formats::image::decode(bytes, &Default::default())?)?;
            t_decode += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let r = resize_bilinear(&img, cfg.size, cfg.size);
            t_resize += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let v = normalize(&r, &cfg);
            t_norm += t.elapsed().as_secs_f64();
            checksum += f64::from(v[v.len() / 2]);
        }
        let total = t_decode + t_resize + t_norm;
        println!(
            "  {name:<20} {:>6.1} images/s   decode {:>6.1} ms  resize {:>6.1} ms  normalise {:>5.1} ms  (per image; checksum {checksum:.3})",
            f64::from(n) / total,
            t_decode * 1e3 / f64::from(n),
            t_resize * 1e3 / f64::from(n),
            t_norm * 1e3 / f64::from(n),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A random-weight tower of MedGemma's shape: weights N(0, 1/fan_in), norms near one, so
/// activations keep a realistic scale through 27 layers.
fn random_tower(text_hidden: usize) -> anyhow::Result<medbatch_engine::models::siglip::VisionTower> {
    use candle_core::{Device, Tensor};
    use medbatch_engine::models::gemma3::RmsNorm;
    use medbatch_engine::models::siglip::{BiasLinear, LayerNorm, VisionEncoder, VisionLayer, VisionTower};
    let cfg = medbatch_engine::load::hf_config::VisionConfig::siglip_896();
    let dev = Device::Cpu;
    let (d, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let lin = |out: usize, inp: usize| -> anyhow::Result<BiasLinear> {
        Ok(BiasLinear {
            weight: Tensor::randn(0f32, (1.0 / inp as f64).sqrt() as f32, (out, inp), &dev)?,
            bias: Tensor::randn(0f32, 0.02, out, &dev)?,
        })
    };
    let ln = || -> anyhow::Result<LayerNorm> {
        Ok(LayerNorm {
            weight: (Tensor::randn(0f32, 0.1, d, &dev)? + 1.0)?,
            bias: Tensor::zeros(d, candle_core::DType::F32, &dev)?,
            eps: cfg.layer_norm_eps,
        })
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        layers.push(VisionLayer {
            layer_norm1: ln()?,
            q: lin(d, d)?,
            k: lin(d, d)?,
            v: lin(d, d)?,
            out: lin(d, d)?,
            layer_norm2: ln()?,
            fc1: lin(inter, d)?,
            fc2: lin(d, inter)?,
        });
    }
    let patch_in = cfg.num_channels * cfg.patch_size * cfg.patch_size;
    let patches = (cfg.image_size / cfg.patch_size).pow(2);
    let encoder = VisionEncoder {
        image_size: cfg.image_size,
        patch_size: cfg.patch_size,
        num_channels: cfg.num_channels,
        num_heads: cfg.num_heads,
        patch: lin(d, patch_in)?,
        position: Tensor::randn(0f32, 0.02, (patches, d), &dev)?,
        layers,
        post_layernorm: ln()?,
        device: dev.clone(),
    };
    Ok(VisionTower {
        encoder,
        soft_emb_norm: RmsNorm::new((Tensor::randn(0f32, 0.1, d, &dev)? + 1.0)?, cfg.layer_norm_eps),
        projection: Tensor::randn(0f32, (1.0 / d as f64).sqrt() as f32, (d, text_hidden), &dev)?,
        cfg,
    })
}

fn vision_bench(runs: usize, text_hidden: usize) -> anyhow::Result<ExitCode> {
    let t = Instant::now();
    let tower = random_tower(text_hidden)?;
    let c = &tower.cfg;
    println!(
        "vision tower: SigLIP {}/{} ({} patches), {} layers, hidden {}, {} heads, projector to {} x {text_hidden}; f32, CPU, {} threads; weights made in {:.1} s",
        c.image_size,
        c.patch_size,
        (c.image_size / c.patch_size).pow(2),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.mm_tokens_per_image,
        medbatch_engine::kernels::threads(),
        t.elapsed().as_secs_f64()
    );
    let img = synthetic_image(2048, 2500, true, image::ImageFormat::Png)?;
    let pixels = medbatch_engine::image::pixel_values(
        &medbatch_engine::image::to_rgb(medbatch_formats::image::decode(&img, &Default::default())?)?,
        &medbatch_engine::image::ImageConfig::default(),
    );
    let mut times = Vec::with_capacity(runs);
    for r in 0..runs {
        let t = Instant::now();
        let rows = tower.encode(&pixels)?;
        let secs = t.elapsed().as_secs_f64();
        let finite = rows.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
        anyhow::ensure!(finite, "the tower produced non-finite values");
        println!("  run {}: {secs:.1} s per image ({:?} rows)", r + 1, rows.dims());
        times.push(secs);
    }
    println!(
        "median {:.1} s per image, {:.3} images/s; peak memory {:.0} MiB",
        median(times.clone()),
        1.0 / median(times),
        peak_rss_mib().unwrap_or(0.0)
    );
    Ok(ExitCode::SUCCESS)
}

fn dicom_bench(dir: &std::path::Path, runs: usize) -> anyhow::Result<ExitCode> {
    use medbatch_formats::dicom::{read_frames, read_header};
    use medbatch_worker::imaging::recipes::{ct_rgb, minmax_u8, rescaled};
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut times = Vec::new();
    let (mut series_n, mut decoded, mut skipped, mut pixels) = (0usize, 0usize, 0usize, 0u64);
    for _ in 0..runs {
        let t = Instant::now();
        // Group by series from headers alone, then decode series by series.
        let mut series: std::collections::BTreeMap<String, Vec<(i64, std::path::PathBuf)>> = Default::default();
        skipped = 0;
        for f in &files {
            match read_header(f) {
                Ok(h) if h.rows > 0 && !h.series_uid.is_empty() => {
                    series.entry(h.series_uid.clone()).or_default().push((h.instance_number.unwrap_or(0), f.clone()))
                }
                _ => skipped += 1,
            }
        }
        (series_n, decoded, pixels) = (0, 0, 0);
        for (_, mut members) in series {
            members.sort();
            let mut slices = Vec::new();
            let mut ct = false;
            for (_, p) in &members {
                let Ok(fr) = read_frames(p, &Default::default()) else { continue };
                if fr.samples_per_pixel != 1 {
                    continue;
                }
                ct = fr.header.modality == "CT";
                for frame in &fr.frames {
                    pixels += frame.len() as u64;
                    slices.push(rescaled(frame, &fr.header));
                }
                decoded += 1;
            }
            if slices.is_empty() {
                continue;
            }
            let out: usize = if ct {
                slices.iter().map(|s| ct_rgb(s).len()).sum()
            } else {
                minmax_u8(&slices).iter().map(Vec::len).sum()
            };
            std::hint::black_box(out);
            series_n += 1;
        }
        times.push(t.elapsed().as_secs_f64());
    }
    let s = median(times);
    println!(
        "{} files under {}: {series_n} greyscale series from {decoded} files ({skipped} not DICOM or without pixels), \
         {:.1} Mpixels",
        files.len(),
        dir.display(),
        pixels as f64 / 1e6
    );
    println!(
        "  {:.3} s per pass (median of {runs}): {:.1} series/s, {:.1} files/s, {:.1} Mpixels/s",
        s,
        series_n as f64 / s,
        decoded as f64 / s,
        pixels as f64 / 1e6 / s
    );
    Ok(ExitCode::SUCCESS)
}
