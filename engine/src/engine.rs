//! A loaded model with its tokenizer: prompt handling and greedy decoding.

use crate::constrain::{Grammar, GuidanceFactory, SeqMatcher};
use crate::gguf::GgufFile;
use crate::hf::ChatTemplate;
use crate::image::{ImageConfig, Rgb8};
use crate::model::{BatchItem, Gemma3, Logits, NumericOptions, SeqCache, LOCAL_CACHE_SLACK};
use crate::sampling::{pick, Sampling, SplitMix64};
use crate::text_tokenizer::{HfTokenizer, Tokenizer};
use crate::vision::VisionTower;
use crate::EngineError;
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Cached prompt prefixes kept at once (pipelines use one or two shared prefixes).
const PREFIX_CACHE_ENTRIES: usize = 4;
/// Prompt tokens run through the model per forward pass, bounding the score matrix.
pub const PREFILL_CHUNK: usize = 512;

/// One device and one communicator per tensor-parallel rank, in rank order.
pub type Ranks = (Vec<Device>, Vec<Arc<dyn crate::comm::Communicator>>);

/// Where a checkpoint's decoder runs and how its weights are held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Tensor-parallel ranks (0 or 1: the whole model on one device). With `devices`, one
    /// rank per device.
    pub tp: usize,
    /// CUDA device ordinals, one rank each, joined by NCCL (builds with the `cuda` feature);
    /// empty: ranks are CPU threads joined in process.
    pub devices: Vec<usize>,
    /// Dtype of the matrices, embedding and KV cache: `None` keeps f32 on the CPU and takes
    /// bf16 on GPUs (as MedGemma is stored).
    pub dtype: Option<candle_core::DType>,
}

impl Placement {
    /// The dtype the weights are held in.
    pub fn weight_dtype(&self) -> candle_core::DType {
        match self.dtype {
            Some(d) => d,
            None if self.devices.is_empty() => candle_core::DType::F32,
            None => candle_core::DType::BF16,
        }
    }

    /// One device and communicator per rank.
    pub fn ranks(&self) -> Result<Ranks, EngineError> {
        if self.devices.is_empty() {
            let world = self.tp.max(1);
            return Ok((vec![Device::Cpu; world], crate::hf::cpu_comms(world)));
        }
        if self.tp > 1 && self.tp != self.devices.len() {
            return Err(EngineError::Load(format!(
                "{} ranks asked on {} devices: give one device per rank",
                self.tp,
                self.devices.len()
            )));
        }
        self.cuda_ranks()
    }

    #[cfg(feature = "cuda")]
    fn cuda_ranks(&self) -> Result<Ranks, EngineError> {
        use crate::comm::Communicator;
        let devs = self.devices.iter().map(|&i| Device::new_cuda(i)).collect::<Result<Vec<_>, _>>()?;
        let comms: Vec<Arc<dyn Communicator>> = if devs.len() == 1 {
            vec![Arc::new(crate::comm::SingleRank)]
        } else {
            crate::comm_nccl::Nccl::group(&devs)?.into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect()
        };
        Ok((devs, comms))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_ranks(&self) -> Result<Ranks, EngineError> {
        Err(EngineError::Load(
            "GPU devices need a build with the `cuda` feature (cargo build --release --features cuda)".into(),
        ))
    }
}

/// What identifies the loaded model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// File name of the weights (or checkpoint folder name).
    pub id: String,
    /// SHA-256 of the weights file.
    pub digest: String,
    pub architecture: String,
    pub num_layers: usize,
    pub vocab_size: usize,
    pub context_length: usize,
}

/// One generation request. Decoding is greedy: the same request gives the same answer.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The complete prompt text, or the user message when `chat` is set.
    pub prompt: String,
    /// Wrap `prompt` as one user turn in the model's chat format (its chat template when the
    /// checkpoint has one, else Gemma's turn format); BOS and special-token parsing then
    /// follow the template, and `add_bos`, `parse_special` and `shared_prefix_len` are
    /// ignored.
    pub chat: bool,
    /// Length in bytes of a prefix of `prompt` shared by many requests; its KV cache is
    /// computed once and reused. 0 disables reuse.
    pub shared_prefix_len: usize,
    /// Prepend BOS as the vocabulary asks.
    pub add_bos: bool,
    /// Let control tokens such as `<start_of_turn>` be written in the prompt text.
    pub parse_special: bool,
    pub max_new_tokens: u32,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Greedy unless a temperature is set; the seed makes sampling reproducible.
    pub sampling: Sampling,
    /// When set, every token is drawn from those the grammar allows and generation ends
    /// when the grammar is complete (stop strings are then not used): the text always
    /// parses unless it is cut by `max_new_tokens` (finish `Length`).
    pub grammar: Option<Grammar>,
    /// Images for a multimodal model, in order: the i-th fills the i-th `<start_of_image>`
    /// written in `prompt`, which is expanded as transformers' Gemma 3 processor does
    /// (`"\n\n<start_of_image>"`, one `<image_soft_token>` per image row, `"<end_of_image>\n\n"`).
    /// The prompt is then always read with control tokens parsed.
    pub images: Vec<Arc<Rgb8>>,
}

/// Gemma 3's image marker, written in prompts where an image goes.
pub const START_OF_IMAGE: &str = "<start_of_image>";
const IMAGE_SOFT_TOKEN: &str = "<image_soft_token>";
const END_OF_IMAGE: &str = "<end_of_image>";

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End-of-sequence or end-of-turn token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The grammar could not continue (a parser error); the text is incomplete.
    Grammar,
}

/// Counters of the decoding loop, for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Forward passes that produced at least one sampled token.
    pub steps: u64,
    /// Wall time of those passes, including sampling and masks.
    pub step_ns: u64,
    /// Grammar masks computed (one per constrained sequence per token).
    pub masks: u64,
    /// Time spent computing and applying them.
    pub mask_ns: u64,
}

/// The result of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub text: String,
    pub ids: Vec<u32>,
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache.
    pub reused_tokens: u32,
    pub finish: Finish,
    pub engine_ms: u64,
}

struct PrefixEntry {
    text: String,
    ids: Vec<u32>,
    cache: SeqCache,
    last_used: u64,
}

/// A model's vision tower and image preprocessing, shareable between threads: images are
/// encoded off the engine thread, so that a long encoding does not hold up the other
/// sequences' steps.
#[derive(Clone)]
pub struct ImageEncoder {
    tower: Arc<VisionTower>,
    config: ImageConfig,
}

impl ImageEncoder {
    /// The image rows of `images` for the text decoder, `[images × tokens, hidden]`.
    pub fn encode(&self, images: &[Arc<Rgb8>]) -> Result<Tensor, EngineError> {
        let mut rows = Vec::with_capacity(images.len());
        for img in images {
            let _span = tracing::debug_span!("vision_tower").entered();
            rows.push(self.tower.encode(&crate::image::pixel_values(img, &self.config))?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

/// A loaded model, its tokenizer and its prefix cache. Not shared between threads: the
/// engine thread owns it (see [`crate::service`]).
pub struct Engine {
    pub model: Gemma3,
    /// The vision tower and projector of a multimodal checkpoint.
    pub vision: Option<Arc<VisionTower>>,
    /// How images are prepared for the tower (size from the tower, the rest from
    /// `preprocessor_config.json` when the checkpoint has one).
    pub image_config: ImageConfig,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub info: ModelInfo,
    stop_ids: Vec<u32>,
    prefixes: Vec<PrefixEntry>,
    clock: u64,
    /// Grammar compiler over this vocabulary, built at the first constrained request.
    guidance: OnceLock<Arc<GuidanceFactory>>,
    pub stats: DecodeStats,
}

/// Bytes hashed from each end of a weight file for a checkpoint's fingerprint.
const FINGERPRINT_SAMPLE: u64 = 1 << 20;

/// A digest identifying a checkpoint folder without reading tens of gigabytes: SHA-256 over
/// config.json, the index, and for each weight file its name, size, and its first and last
/// MiB (the safetensors header, with every tensor's name, dtype and offsets, is at the start).
pub fn checkpoint_fingerprint(dir: &Path) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut h = Sha256::new();
    for f in ["config.json", "model.safetensors.index.json"] {
        if let Ok(b) = std::fs::read(dir.join(f)) {
            h.update(f.as_bytes());
            h.update(&b);
        }
    }
    let files = crate::hf::weight_files(dir).map_err(|e| std::io::Error::other(e.to_string()))?;
    for p in files {
        let mut f = std::fs::File::open(&p)?;
        let size = f.metadata()?.len();
        h.update(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(size.to_le_bytes());
        let mut buf = vec![0u8; FINGERPRINT_SAMPLE.min(size) as usize];
        f.read_exact(&mut buf)?;
        h.update(&buf);
        if size > FINGERPRINT_SAMPLE {
            f.seek(SeekFrom::Start(size - FINGERPRINT_SAMPLE.min(size)))?;
            f.read_exact(&mut buf)?;
            h.update(&buf);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// SHA-256 of a file, streamed.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl Engine {
    /// Loads a Gemma 3 GGUF on the CPU. `digest` may be given when already known.
    pub fn load_gguf(path: &Path, digest: Option<String>) -> Result<Self, EngineError> {
        let device = Device::Cpu;
        let mut file = GgufFile::open(path)?;
        let tokenizer = file.tokenizer()?;
        // GGUF models are held to llama.cpp, which keeps K and V in f16 by default and
        // computes GELU through an f16 table on the CPU.
        let model = file.load_model(&device, NumericOptions { f16_attention: true, f16_gelu: true })?;
        let digest = match digest {
            Some(d) => d,
            None => file_sha256(path).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?,
        };
        let info = ModelInfo {
            id: path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            digest,
            architecture: "gemma3".into(),
            num_layers: model.cfg.num_layers,
            vocab_size: model.cfg.vocab_size,
            context_length: model.cfg.max_position_embeddings,
        };
        let mut stop_ids = vec![tokenizer.special.eos];
        stop_ids.extend(tokenizer.special.end_of_turn);
        Ok(Self::assemble(model, None, Tokenizer::Spm(Box::new(tokenizer)), None, info, stop_ids))
    }

    fn assemble(
        model: Gemma3,
        vision: Option<VisionTower>,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        info: ModelInfo,
        stop_ids: Vec<u32>,
    ) -> Self {
        let image_config = ImageConfig {
            size: vision.as_ref().map(|v| v.cfg.image_size).unwrap_or(ImageConfig::default().size),
            ..ImageConfig::default()
        };
        Self {
            model,
            vision: vision.map(Arc::new),
            image_config,
            tokenizer: Arc::new(tokenizer),
            chat_template,
            info,
            stop_ids,
            prefixes: Vec::new(),
            clock: 0,
            guidance: OnceLock::new(),
            stats: DecodeStats::default(),
        }
    }

    /// Loads a Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json,
    /// chat template), computing in f32 on the CPU.
    pub fn load_checkpoint(dir: &Path) -> Result<Self, EngineError> {
        Self::load_checkpoint_tp(dir, 1)
    }

    /// Loads a checkpoint folder split over `tp` tensor-parallel ranks (threads of this
    /// process on the CPU; see [`crate::model::Shard`]).
    pub fn load_checkpoint_tp(dir: &Path, tp: usize) -> Result<Self, EngineError> {
        Self::load_placed(dir, &Placement { tp, ..Placement::default() })
    }

    /// Loads a GGUF file (on the CPU, as stored) or a checkpoint folder placed as asked.
    pub fn load_placed(path: &Path, placement: &Placement) -> Result<Self, EngineError> {
        if !path.is_dir() {
            if placement.tp > 1 || !placement.devices.is_empty() || placement.dtype.is_some() {
                return Err(EngineError::Load(format!(
                    "{}: splitting a model, GPU devices and a weight dtype need a safetensors checkpoint \
                     folder, not a GGUF file",
                    path.display()
                )));
            }
            return Self::load_gguf(path, None);
        }
        let cfg = crate::hf::read_config(path)?;
        let (devices, comms) = placement.ranks()?;
        let model = crate::hf::load_model_ranks(path, &cfg, devices, comms, placement.weight_dtype())?;
        Self::from_checkpoint(path, &cfg, model)
    }

    /// The engine around a loaded decoder: vision tower (in f32, on the first rank's device),
    /// tokenizer, chat template.
    fn from_checkpoint(
        dir: &Path,
        cfg: &crate::hf_config::CheckpointConfig,
        model: Gemma3,
    ) -> Result<Self, EngineError> {
        let vision = crate::hf::load_vision(dir, cfg, &model.device)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::Hf(Box::new(HfTokenizer::from_file(&tok_path)?));
        let chat_template = ChatTemplate::find(dir)?;
        let digest = checkpoint_fingerprint(dir).map_err(|e| EngineError::Load(format!("{}: {e}", dir.display())))?;
        let info = ModelInfo {
            id: dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            digest,
            architecture: cfg.architecture.clone(),
            num_layers: model.cfg.num_layers,
            vocab_size: model.cfg.vocab_size,
            context_length: model.cfg.max_position_embeddings,
        };
        let mut stop_ids = cfg.eos_token_ids.clone();
        stop_ids.extend(tokenizer.special().end_of_turn);
        stop_ids.push(tokenizer.special().eos);
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let mut engine = Self::assemble(model, vision, tokenizer, chat_template, info, stop_ids);
        if engine.vision.is_some() {
            engine.image_config = crate::image::read_preprocessor_config(dir, engine.image_config.size)?;
            engine.check_image_tokens()?;
        }
        Ok(engine)
    }

    /// Checks that the tokenizer reads Gemma's image markers as the config's ids, so that
    /// prompts written with `<start_of_image>` expand correctly.
    fn check_image_tokens(&self) -> Result<(), EngineError> {
        let v = &self.vision.as_ref().expect("vision tower").cfg;
        for (text, id) in
            [(START_OF_IMAGE, v.boi_token_id), (IMAGE_SOFT_TOKEN, v.image_token_id), (END_OF_IMAGE, v.eoi_token_id)]
        {
            let got = self.tokenizer.encode(text, false, true);
            if got != [id] {
                return Err(EngineError::Load(format!(
                    "the tokenizer reads {text} as {got:?}, but config.json gives its id as {id}"
                )));
            }
        }
        Ok(())
    }

    /// Soft tokens one image takes in the prompt (`None` for text-only models).
    pub fn image_tokens(&self) -> Option<usize> {
        self.vision.as_ref().map(|v| v.cfg.mm_tokens_per_image)
    }

    /// The image rows of `images` for the text decoder, `[images × tokens, hidden]`.
    pub fn encode_images(&self, images: &[Arc<Rgb8>]) -> Result<Option<Tensor>, EngineError> {
        if images.is_empty() {
            return Ok(None);
        }
        let encoder = self.image_encoder().ok_or_else(|| {
            EngineError::Request(format!("{} has no vision tower; it cannot read images", self.info.id))
        })?;
        Ok(Some(encoder.encode(images)?))
    }

    /// The vision tower with its preprocessing, for encoding images on another thread than
    /// the engine's (`None` for text-only models).
    pub fn image_encoder(&self) -> Option<ImageEncoder> {
        self.vision.as_ref().map(|tower| ImageEncoder { tower: tower.clone(), config: self.image_config.clone() })
    }

    /// `prompt` with every `<start_of_image>` expanded to the full image block.
    fn expand_images(&self, prompt: &str, images: usize) -> Result<String, EngineError> {
        let n = self.image_tokens().ok_or_else(|| {
            EngineError::Request(format!("{} has no vision tower; it cannot read images", self.info.id))
        })?;
        let markers = prompt.matches(START_OF_IMAGE).count();
        if markers != images {
            return Err(EngineError::Request(format!(
                "the prompt has {markers} {START_OF_IMAGE} markers for {images} images"
            )));
        }
        let block = format!("\n\n{START_OF_IMAGE}{}{END_OF_IMAGE}\n\n", IMAGE_SOFT_TOKEN.repeat(n));
        Ok(prompt.replace(START_OF_IMAGE, &block))
    }

    /// Loads a GGUF file or a checkpoint folder.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        Self::load_tp(path, 1)
    }

    /// Loads a GGUF file or a checkpoint folder, a checkpoint split over `tp` ranks.
    pub fn load_tp(path: &Path, tp: usize) -> Result<Self, EngineError> {
        Self::load_placed(path, &Placement { tp, ..Placement::default() })
    }

    /// A prompt for one user message in the model's turn format, and whether BOS must still
    /// be added when tokenizing it. A checkpoint's own chat template is rendered when it has
    /// one (it writes BOS itself, so none is added: no double BOS); otherwise Gemma's turn
    /// format is used. The prompt must be encoded with `parse_special`.
    ///
    /// A message with `<start_of_image>` markers is given to the template as a list of text
    /// and image items, split at the markers, as a multimodal chat is: the template trims
    /// each text item and writes the marker for each image.
    pub fn chat_prompt(&self, user: &str) -> Result<(String, bool), EngineError> {
        match &self.chat_template {
            Some(t) => {
                let content = if user.contains(START_OF_IMAGE) {
                    let mut items = Vec::new();
                    for (i, piece) in user.split(START_OF_IMAGE).enumerate() {
                        if i > 0 {
                            items.push(serde_json::json!({ "type": "image" }));
                        }
                        if !piece.is_empty() {
                            items.push(serde_json::json!({ "type": "text", "text": piece }));
                        }
                    }
                    serde_json::Value::Array(items)
                } else {
                    serde_json::Value::String(user.to_string())
                };
                let messages = serde_json::json!([{ "role": "user", "content": content }]);
                Ok((t.render(&messages)?, !t.writes_bos()))
            }
            None => Ok((format!("<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"), true)),
        }
    }

    /// Runs `ids` into `cache` in chunks; returns the last position's logits.
    pub fn prefill(&self, ids: &[u32], cache: &mut SeqCache) -> Result<Tensor, EngineError> {
        let mut out = self.prefill_with(ids, None, cache, Logits::Last, PREFILL_CHUNK)?;
        out.pop().ok_or_else(|| EngineError::Request("empty prompt".into()))
    }

    /// Runs `ids` (with `images`: rows for its image soft tokens, in order) into `cache` in
    /// chunks of about `chunk` tokens that never split an image; returns each chunk's logits.
    pub fn prefill_with(
        &self,
        ids: &[u32],
        images: Option<&Tensor>,
        cache: &mut SeqCache,
        which: Logits,
        chunk: usize,
    ) -> Result<Vec<Tensor>, EngineError> {
        let soft = self.model.image_token_id;
        let mut out = Vec::new();
        let mut from = 0;
        while from < ids.len() {
            let to = chunk_end(ids, from, chunk, soft);
            let rows = image_rows(ids, from, to, soft, images)?;
            let mut item =
                [BatchItem { ids: &ids[from..to], cache: &mut *cache, logits: which, images: rows.as_ref() }];
            if let Some(l) = self.model.forward_batch(&mut item)?.pop().flatten() {
                out.push(l);
            }
            from = to;
        }
        Ok(out)
    }

    /// The greedy choice from a `[1, vocab]` logits tensor.
    pub fn argmax(logits: &Tensor) -> Result<u32, EngineError> {
        Ok(crate::sampling::argmax(&logits.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Greedy continuation of `prompt_ids` for up to `max_new` tokens, stopping after an
    /// end-of-sequence or end-of-turn token (which is included). Used by fidelity tests.
    pub fn greedy_ids(&self, prompt_ids: &[u32], max_new: usize) -> Result<Vec<u32>, EngineError> {
        self.greedy_ids_with(prompt_ids, None, max_new)
    }

    /// [`Self::greedy_ids`] with image rows for the prompt's soft tokens.
    pub fn greedy_ids_with(
        &self,
        prompt_ids: &[u32],
        images: Option<&Tensor>,
        max_new: usize,
    ) -> Result<Vec<u32>, EngineError> {
        let mut cache = self.model.new_cache();
        let mut logits = self
            .prefill_with(prompt_ids, images, &mut cache, Logits::Last, PREFILL_CHUNK)?
            .pop()
            .ok_or_else(|| EngineError::Request("empty prompt".into()))?;
        let mut out = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let next = Self::argmax(&logits)?;
            out.push(next);
            if self.stop_ids.contains(&next) {
                break;
            }
            logits = self.model.forward(&[next], &mut cache, Logits::Last)?;
        }
        Ok(out)
    }

    /// Logits at every position of `ids` (a fresh sequence), `[n, vocab]`.
    pub fn all_logits(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.all_logits_with(ids, None)
    }

    /// [`Self::all_logits`] with image rows for the prompt's soft tokens.
    pub fn all_logits_with(&self, ids: &[u32], images: Option<&Tensor>) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut cache = self.model.new_cache();
        let mut rows = Vec::with_capacity(ids.len());
        for l in self.prefill_with(ids, images, &mut cache, Logits::All, PREFILL_CHUNK)? {
            rows.extend(l.to_vec2::<f32>()?);
        }
        Ok(rows)
    }

    /// A cache holding `prefix`'s KV, computed once per distinct prefix.
    fn prefix_cache(&mut self, prefix: &str, req: &GenerateRequest) -> Result<(Vec<u32>, SeqCache), EngineError> {
        self.clock += 1;
        if let Some(e) = self.prefixes.iter_mut().find(|e| e.text == prefix) {
            e.last_used = self.clock;
            return Ok((e.ids.clone(), e.cache.clone()));
        }
        let ids = self.tokenizer.encode(prefix, req.add_bos, req.parse_special);
        let mut cache = self.model.new_cache();
        if !ids.is_empty() {
            self.prefill(&ids, &mut cache)?;
        }
        if self.prefixes.len() >= PREFIX_CACHE_ENTRIES {
            let oldest = (0..self.prefixes.len()).min_by_key(|&i| self.prefixes[i].last_used).unwrap_or(0);
            self.prefixes.swap_remove(oldest);
        }
        self.prefixes.push(PrefixEntry {
            text: prefix.to_string(),
            ids: ids.clone(),
            cache: cache.clone(),
            last_used: self.clock,
        });
        Ok((ids, cache))
    }

    /// The grammar compiler for this model's vocabulary (built on first use).
    pub fn guidance(&self) -> Result<Arc<GuidanceFactory>, EngineError> {
        if let Some(g) = self.guidance.get() {
            return Ok(g.clone());
        }
        let g = Arc::new(GuidanceFactory::new(self.tokenizer.clone(), self.model.cfg.vocab_size, &self.stop_ids)?);
        Ok(self.guidance.get_or_init(|| g).clone())
    }

    /// The token ids a request's prompt is read as (not wrapped in the chat format): its
    /// `<start_of_image>` markers expanded when it carries images.
    pub fn prompt_ids(&self, req: &GenerateRequest) -> Result<Vec<u32>, EngineError> {
        Ok(if req.images.is_empty() {
            self.tokenizer.encode(&req.prompt, req.add_bos, req.parse_special)
        } else {
            let text = self.expand_images(&req.prompt, req.images.len())?;
            self.tokenizer.encode(&text, req.add_bos, true)
        })
    }

    /// Tokenizes a request and sets up its sequence (reusing a cached prompt prefix).
    pub fn admit(&mut self, req: &GenerateRequest) -> Result<Active, EngineError> {
        self.admit_encoded(req, None)
    }

    /// [`Self::admit`] with the request's image rows already encoded (by an
    /// [`ImageEncoder`]); `None` encodes them here.
    pub fn admit_encoded(&mut self, req: &GenerateRequest, image_rows: Option<Tensor>) -> Result<Active, EngineError> {
        if req.chat {
            let (prompt, add_bos) = self.chat_prompt(&req.prompt)?;
            let wrapped = GenerateRequest {
                prompt,
                chat: false,
                add_bos,
                parse_special: true,
                shared_prefix_len: 0,
                ..req.clone()
            };
            return self.admit_encoded(&wrapped, image_rows);
        }
        let ids = self.prompt_ids(req)?;
        if ids.is_empty() {
            return Err(EngineError::Request("prompt has no tokens".into()));
        }
        let limit = self.model.cfg.max_position_embeddings;
        if ids.len() + req.max_new_tokens as usize > limit {
            return Err(EngineError::Request(format!(
                "prompt of {} tokens plus {} new tokens exceeds the context of {limit}",
                ids.len(),
                req.max_new_tokens
            )));
        }
        let matcher = match &req.grammar {
            Some(g) => Some(self.guidance()?.matcher(g)?),
            None => None,
        };
        let image_rows = match image_rows {
            Some(rows) => Some(rows),
            None => self.encode_images(&req.images)?,
        };
        let mut cache = self.model.new_cache();
        let mut reused = 0usize;
        if req.shared_prefix_len > 0 && req.prompt.is_char_boundary(req.shared_prefix_len) {
            let (pids, pcache) = self.prefix_cache(&req.prompt[..req.shared_prefix_len], req)?;
            // Tokens can merge across the prefix boundary, so reuse the common token prefix,
            // and never past the first image (its rows are not in the cached prefix).
            let first_image = self.model.image_token_id.and_then(|t| ids.iter().position(|&x| x == t));
            let common = pids
                .iter()
                .zip(&ids)
                .take_while(|(a, b)| a == b)
                .count()
                .min(ids.len() - 1)
                .min(first_image.unwrap_or(usize::MAX));
            let mut c = pcache;
            if common > 0 && c.truncate(common, &self.model.cfg)? {
                cache = c;
                reused = common;
            }
        }
        Ok(Active {
            rng: SplitMix64::new(req.sampling.seed),
            req: req.clone(),
            next_prefill: reused,
            reused,
            ids,
            image_rows,
            cache,
            pending: None,
            out: Vec::new(),
            text: String::new(),
            started: Instant::now(),
            finish: None,
            matcher,
        })
    }

    /// KV bytes a sequence will hold at its longest (prompt plus all new tokens), for
    /// admission against a memory budget.
    pub fn projected_kv_bytes(&self, a: &Active) -> u64 {
        let cfg = &self.model.cfg;
        let len = (a.ids.len() + a.req.max_new_tokens as usize) as u64;
        let per_layer_token = 2 * cfg.kv_dim() as u64 * 4;
        let local_len = len.min((cfg.sliding_window + LOCAL_CACHE_SLACK) as u64);
        cfg.layer_is_global.iter().map(|&g| per_layer_token * if g { len } else { local_len }).sum()
    }

    /// One step of continuous batching: every active sequence advances by one forward pass
    /// — a prompt chunk (prompt tokens of all sequences together within `token_budget`) or
    /// one generated token. Sequences that finish get their `finish` set.
    pub fn step(&mut self, active: &mut [Active], token_budget: usize) -> Result<(), EngineError> {
        let mut budget = token_budget.max(1);
        let mut plan: Vec<(usize, usize, usize, bool)> = Vec::new(); // (index, from, to, wants logits)
        for (i, a) in active.iter().enumerate() {
            if a.finish.is_some() {
                continue;
            }
            if a.next_prefill < a.ids.len() {
                if budget == 0 {
                    continue;
                }
                let to = chunk_end(&a.ids, a.next_prefill, budget, self.model.image_token_id);
                budget = budget.saturating_sub(to - a.next_prefill);
                plan.push((i, a.next_prefill, to, to == a.ids.len()));
            } else if a.pending.is_some() {
                plan.push((i, 0, 0, true));
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let samples = plan.iter().filter(|p| p.3).count();
        let logits = {
            let mut pending_tok: Vec<[u32; 1]> = Vec::with_capacity(plan.len());
            for &(i, _, _, _) in &plan {
                pending_tok.push([active[i].pending.unwrap_or(0)]);
            }
            let soft = self.model.image_token_id;
            let mut rows = Vec::with_capacity(plan.len());
            for &(i, from, to, _) in &plan {
                let a = &active[i];
                rows.push(if to > from { image_rows(&a.ids, from, to, soft, a.image_rows.as_ref())? } else { None });
            }
            let mut by_index: Vec<Option<&mut Active>> = active.iter_mut().map(Some).collect();
            let mut items = Vec::with_capacity(plan.len());
            for (k, &(i, from, to, wants)) in plan.iter().enumerate() {
                let a = by_index[i].take().expect("each sequence once");
                let ids: &[u32] = if to > from { &a.ids[from..to] } else { &pending_tok[k] };
                items.push(BatchItem {
                    ids,
                    cache: &mut a.cache,
                    logits: if wants { Logits::Last } else { Logits::None },
                    images: rows[k].as_ref(),
                });
            }
            self.model.forward_batch(&mut items)?
        };
        for (&(i, from, to, _), l) in plan.iter().zip(logits) {
            let a = &mut active[i];
            if to > from {
                a.next_prefill = to;
                if to == a.ids.len() {
                    a.image_rows = None;
                }
            }
            let Some(l) = l else { continue };
            let mut row: Vec<f32> = l.flatten_all()?.to_vec1()?;
            a.pending = None;
            if let Some(m) = a.matcher.as_mut() {
                let t = Instant::now();
                let allowed = match (m.mask(), self.guidance.get()) {
                    (Ok(mask), Some(g)) => g.apply_mask(&mask, &mut row),
                    _ => false,
                };
                self.stats.masks += 1;
                self.stats.mask_ns += t.elapsed().as_nanos() as u64;
                if !allowed {
                    a.finish = Some(Finish::Grammar);
                    continue;
                }
            }
            let next = pick(&row, &a.req.sampling, &mut a.rng);
            if self.stop_ids.contains(&next) {
                a.finish = Some(Finish::Eos);
                continue;
            }
            a.out.push(next);
            a.text = self.tokenizer.decode(&a.out, false);
            if let Some(m) = a.matcher.as_mut() {
                if m.consume(next).is_err() {
                    a.finish = Some(Finish::Grammar);
                } else if m.is_stopped() {
                    a.finish = Some(Finish::Stop);
                } else if a.out.len() >= a.req.max_new_tokens as usize {
                    a.finish = Some(Finish::Length);
                } else {
                    a.pending = Some(next);
                }
                continue;
            }
            if let Some(cut) = a.req.stop.iter().filter_map(|s| a.text.find(s.as_str())).min() {
                a.text.truncate(cut);
                a.finish = Some(Finish::Stop);
            } else if a.out.len() >= a.req.max_new_tokens as usize {
                a.finish = Some(Finish::Length);
            } else {
                a.pending = Some(next);
            }
        }
        if samples > 0 {
            self.stats.steps += 1;
            self.stats.step_ns += started.elapsed().as_nanos() as u64;
        }
        Ok(())
    }

    /// Serves one request.
    pub fn generate(&mut self, req: &GenerateRequest) -> Result<Generation, EngineError> {
        let mut out = self.generate_batch(std::slice::from_ref(req));
        out.pop().expect("one result")
    }

    /// Serves several requests together with continuous batching; results in order.
    pub fn generate_batch(&mut self, reqs: &[GenerateRequest]) -> Vec<Result<Generation, EngineError>> {
        let mut results: Vec<Option<Result<Generation, EngineError>>> = (0..reqs.len()).map(|_| None).collect();
        let mut active = Vec::new();
        let mut slots = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match self.admit(r) {
                Ok(a) if r.max_new_tokens == 0 => results[i] = Some(Ok(a.into_generation())),
                Ok(a) => {
                    active.push(a);
                    slots.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while active.iter().any(|a| a.finish.is_none()) {
            if let Err(e) = self.step(&mut active, PREFILL_CHUNK) {
                for &i in &slots {
                    results[i].get_or_insert_with(|| Err(EngineError::Compute(e.to_string())));
                }
                break;
            }
        }
        for (a, i) in active.into_iter().zip(slots) {
            if results[i].is_none() {
                results[i] = Some(Ok(a.into_generation()));
            }
        }
        results.into_iter().map(|r| r.expect("every request answered")).collect()
    }
}

/// A sequence being served: its prompt, cache and output so far.
pub struct Active {
    pub req: GenerateRequest,
    ids: Vec<u32>,
    /// Rows for the prompt's image soft tokens, until the prompt has been read.
    image_rows: Option<Tensor>,
    next_prefill: usize,
    reused: usize,
    cache: SeqCache,
    /// The token sampled last, to be fed at the next step.
    pending: Option<u32>,
    out: Vec<u32>,
    text: String,
    rng: SplitMix64,
    started: Instant,
    pub finish: Option<Finish>,
    matcher: Option<SeqMatcher>,
}

impl Active {
    pub fn is_done(&self) -> bool {
        self.finish.is_some()
    }

    /// Tokens generated so far (0 while the prompt is still being read).
    pub fn generated(&self) -> usize {
        self.out.len() + usize::from(self.pending.is_some() && self.out.is_empty())
    }

    /// KV bytes the sequence holds now.
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }

    pub fn into_generation(self) -> Generation {
        Generation {
            text: self.text,
            ids: self.out,
            prompt_tokens: self.ids.len() as u32,
            reused_tokens: self.reused as u32,
            finish: self.finish.unwrap_or(Finish::Length),
            engine_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// The end of a prompt chunk starting at `from` of about `budget` tokens that does not split
/// a run of image soft tokens: a run that would be cut is left for the next chunk, or taken
/// whole when the chunk would otherwise be empty.
pub fn chunk_end(ids: &[u32], from: usize, budget: usize, soft: Option<u32>) -> usize {
    let mut to = (from + budget.max(1)).min(ids.len());
    let Some(soft) = soft else { return to };
    if to < ids.len() && ids[to - 1] == soft && ids[to] == soft {
        let mut start = to - 1;
        while start > from && ids[start - 1] == soft {
            start -= 1;
        }
        if start > from {
            to = start;
        } else {
            while to < ids.len() && ids[to] == soft {
                to += 1;
            }
        }
    }
    to
}

/// The rows of `images` for the soft tokens in `ids[from..to]`.
fn image_rows(
    ids: &[u32],
    from: usize,
    to: usize,
    soft: Option<u32>,
    images: Option<&Tensor>,
) -> Result<Option<Tensor>, EngineError> {
    let Some(soft) = soft else { return Ok(None) };
    let count = ids[from..to].iter().filter(|&&t| t == soft).count();
    if count == 0 {
        return Ok(None);
    }
    let images = images.ok_or_else(|| EngineError::Request(format!("{count} image soft tokens but no image")))?;
    let before = ids[..from].iter().filter(|&&t| t == soft).count();
    if before + count > images.dim(0)? {
        return Err(EngineError::Request(format!(
            "the prompt holds {} image soft tokens, the images give {} rows",
            ids.iter().filter(|&&t| t == soft).count(),
            images.dim(0)?
        )));
    }
    Ok(Some(images.narrow(0, before, count)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_never_split_an_image() {
        let s = 9;
        let ids = [1, 2, 9, 9, 9, 9, 3, 4, 9, 9, 5];
        assert_eq!(chunk_end(&ids, 0, 4, Some(s)), 2, "a run cut at 4 moves to the next chunk");
        assert_eq!(chunk_end(&ids, 2, 2, Some(s)), 6, "a run at the chunk start is taken whole");
        assert_eq!(chunk_end(&ids, 0, 6, Some(s)), 6);
        assert_eq!(chunk_end(&ids, 6, 3, Some(s)), 8);
        assert_eq!(chunk_end(&ids, 0, 4, None), 4);
        assert_eq!(chunk_end(&ids, 10, 4, Some(s)), 11);
    }
}
