//! A loaded model with its tokenizer: where it runs ([`Placement`]), loading, the request
//! API and prompt handling. Serving requests (admission and steps) is in
//! [`crate::scheduler`].

use crate::constrain::{Grammar, GuidanceFactory};
use crate::image::{ImageConfig, Rgb8};
use crate::kv::SeqCache;
use crate::load::gguf::GgufFile;
use crate::load::hf::ChatTemplate;
use crate::models::gemma3::{BatchItem, Gemma3, Logits, NumericOptions};
use crate::models::siglip::VisionTower;
use crate::sampling::Sampling;
use crate::scheduler::{chunk_end, image_rows, DecodeStats};
use crate::tokenizer::{HfTokenizer, Tokenizer};
use crate::EngineError;
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, OnceLock};

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
            return Ok((vec![Device::Cpu; world], crate::comm::cpu_comms(world)));
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

/// One generation request. Decoding is greedy: the same request gives the same answer. A
/// prompt that starts like earlier ones (few-shot examples, instructions, a system prompt)
/// reuses their cached keys and values, block by block, without asking.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The complete prompt text, or the user message when `chat` is set.
    pub prompt: String,
    /// Wrap `prompt` as one user turn in the model's chat format (its chat template when the
    /// checkpoint has one, else Gemma's turn format); BOS and special-token parsing then
    /// follow the template, and `add_bos` and `parse_special` are ignored.
    pub chat: bool,
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
pub(crate) const IMAGE_SOFT_TOKEN: &str = "<image_soft_token>";
pub(crate) const END_OF_IMAGE: &str = "<end_of_image>";

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

/// A request's images as the engine takes them: their rows for the text decoder and their
/// keys for the prefix cache.
#[derive(Clone, Debug)]
pub struct EncodedImages {
    /// `[images × tokens, hidden]`.
    pub rows: Tensor,
    pub keys: Vec<crate::kv::ImageKey>,
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

    /// The rows of `images` and their keys (hashing the pixels here, off the engine thread).
    pub fn encode_with_keys(&self, images: &[Arc<Rgb8>]) -> Result<EncodedImages, EngineError> {
        Ok(EncodedImages { rows: self.encode(images)?, keys: crate::scheduler::image_keys(images) })
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
    pub(crate) stop_ids: Vec<u32>,
    /// Grammar compiler over this vocabulary, built at the first constrained request.
    pub(crate) guidance: OnceLock<Arc<GuidanceFactory>>,
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
    let files = crate::load::hf::weight_files(dir).map_err(|e| std::io::Error::other(e.to_string()))?;
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
    /// process on the CPU; see [`crate::models::gemma3::Shard`]).
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
        let cfg = crate::load::hf::read_config(path)?;
        let (devices, comms) = placement.ranks()?;
        let model = crate::load::hf::load_model_ranks(path, &cfg, devices, comms, placement.weight_dtype())?;
        Self::from_checkpoint(path, &cfg, model)
    }

    /// The engine around a loaded decoder: vision tower (in f32, on the first rank's device),
    /// tokenizer, chat template.
    fn from_checkpoint(
        dir: &Path,
        cfg: &crate::load::hf_config::CheckpointConfig,
        model: Gemma3,
    ) -> Result<Self, EngineError> {
        let vision = crate::load::hf::load_vision(dir, cfg, &model.device)?;
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
}
