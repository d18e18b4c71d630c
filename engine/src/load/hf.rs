//! Loading Hugging Face Gemma 3 / MedGemma checkpoints: safetensors weights (single file or
//! sharded with `model.safetensors.index.json`), under any of the three weight-name layouts,
//! the tokenizer (`tokenizer.json`) and the chat template.
//!
//! | layout | embedding key |
//! |---|---|
//! | original Gemma 3 / MedGemma 1 multimodal uploads | `language_model.model.embed_tokens.weight` |
//! | transformers ≥ 4.52 / 5.x multimodal saves | `model.language_model.embed_tokens.weight` |
//! | text-only `Gemma3ForCausalLM` | `model.embed_tokens.weight` |
//!
//! Norm weights are stored as `w` and applied as `1 + w` (computed in f32); the embedding
//! scale `sqrt(hidden)` is rounded to the weights' dtype, as transformers does.

use crate::comm::Communicator;
use crate::load::hf_config::{parse_config, CheckpointConfig};
use crate::models::gemma3::{
    Embedding, Gemma3, Layer, LayerParam, LayerSource, Linear, NumericOptions, RmsNorm, Shard,
};
use crate::models::siglip::{BiasLinear, LayerNorm, VisionEncoder, VisionLayer, VisionTower};
use crate::EngineError;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const EMBED_KEYS: [(&str, &str); 3] = [
    ("model.language_model.", "model.language_model.embed_tokens.weight"),
    ("language_model.model.", "language_model.model.embed_tokens.weight"),
    ("model.", "model.embed_tokens.weight"),
];
const LM_HEAD_KEYS: [&str; 2] = ["lm_head.weight", "language_model.lm_head.weight"];
/// Where the vision tower's weights live: Google's uploads (`vision_tower.vision_model.*`),
/// transformers 5.x in memory, and transformers 5.x saves (which drop `vision_model.`).
const VISION_PREFIXES: [&str; 4] =
    ["vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower."];
const PROJECTOR_PREFIXES: [&str; 2] = ["multi_modal_projector.", "model.multi_modal_projector."];

fn load_err(what: impl std::fmt::Display) -> EngineError {
    EngineError::Load(what.to_string())
}

/// The safetensors files of a checkpoint folder: those named by the index, else
/// `model.safetensors`, else every `*.safetensors` file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| load_err(format!("{}: {e}", index.display())))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| load_err(format!("{}: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| load_err(format!("{}: no weight_map", index.display())))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        let mut out = Vec::new();
        for f in files {
            if f.contains('/') || f.contains("..") {
                return Err(load_err(format!("{}: shard name {f:?} leaves the folder", index.display())));
            }
            let p = dir.join(f);
            if !p.is_file() {
                return Err(load_err(format!("shard {} named by the index is missing", p.display())));
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| load_err(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    all.sort();
    if all.is_empty() {
        return Err(load_err(format!("{}: no safetensors weights", dir.display())));
    }
    Ok(all)
}

/// Reads `config.json` of a checkpoint folder.
pub fn read_config(dir: &Path) -> Result<CheckpointConfig, EngineError> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| load_err(format!("{}: {e}", p.display())))?;
    parse_config(&text)
}

/// A checkpoint's memory-mapped safetensors files.
struct Weights {
    st: MmapedSafetensors,
}

/// `sqrt(hidden)` as the weights' dtype represents it.
fn embed_scale(hidden: usize, dtype: DType) -> f64 {
    let s = (hidden as f64).sqrt();
    match dtype {
        DType::BF16 => half::bf16::from_f64(s).to_f64(),
        DType::F16 => half::f16::from_f64(s).to_f64(),
        _ => s as f32 as f64,
    }
}

pub(crate) fn open_weights(dir: &Path) -> Result<(MmapedSafetensors, BTreeSet<String>), EngineError> {
    let files = weight_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; medbatch never writes them, and a file
    // changed underneath a running worker is outside what it can guard against.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(load_err)?;
    let names: BTreeSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    Ok((st, names))
}

/// Loads the vision tower and projector of a multimodal checkpoint (`None` for a text-only
/// one), computing in f32 on `device`.
pub fn load_vision(dir: &Path, cfg: &CheckpointConfig, device: &Device) -> Result<Option<VisionTower>, EngineError> {
    let Some(vc) = cfg.vision.clone() else { return Ok(None) };
    VisionTower::check_shape(&vc).map_err(|e| load_err(format!("config.json: {e}")))?;
    let (st, names) = open_weights(dir)?;
    let find = |prefixes: &[&'static str], probe: &str| {
        prefixes.iter().copied().find(|p| names.contains(&format!("{p}{probe}")))
    };
    let vp = find(&VISION_PREFIXES, "embeddings.patch_embedding.weight").ok_or_else(|| {
        load_err(format!("{}: config has a vision_config but no vision tower weights", dir.display()))
    })?;
    let pp = find(&PROJECTOR_PREFIXES, "mm_input_projection_weight")
        .ok_or_else(|| load_err(format!("{}: no multi_modal_projector weights", dir.display())))?;
    let shape = EncoderShape {
        hidden: vc.hidden_size,
        layers: vc.num_layers,
        heads: vc.num_heads,
        image_size: vc.image_size,
        patch_size: vc.patch_size,
        channels: vc.num_channels,
        eps: vc.layer_norm_eps,
    };
    let encoder = load_vision_encoder(&st, vp, &shape, device)?;
    let get = |name: String| f32_tensor(&st, &name, device);
    let eps = vc.layer_norm_eps;
    let norm_w = (get(format!("{pp}mm_soft_emb_norm.weight"))? + 1.0).map_err(load_err)?;
    let projection = get(format!("{pp}mm_input_projection_weight"))?;
    if projection.dims() != [vc.hidden_size, cfg.text.hidden_size] {
        return Err(load_err(format!(
            "mm_input_projection_weight is {:?}, expected [{}, {}]",
            projection.dims(),
            vc.hidden_size,
            cfg.text.hidden_size
        )));
    }
    Ok(Some(VisionTower { encoder, soft_emb_norm: RmsNorm::new(norm_w, eps), projection, cfg: vc }))
}

/// A tensor of the checkpoint as f32 on `device`.
pub(crate) fn f32_tensor(st: &MmapedSafetensors, name: &str, device: &Device) -> Result<Tensor, EngineError> {
    st.load(name, device).and_then(|t| t.to_dtype(DType::F32)).map_err(|e| load_err(format!("tensor {name}: {e}")))
}

/// The shape of a SigLIP vision encoder, from whichever config describes it.
pub(crate) struct EncoderShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub eps: f64,
}

/// A LayerNorm `{prefix}.weight` / `.bias`.
pub(crate) fn layer_norm(
    st: &MmapedSafetensors,
    prefix: &str,
    eps: f64,
    device: &Device,
) -> Result<LayerNorm, EngineError> {
    Ok(LayerNorm {
        weight: f32_tensor(st, &format!("{prefix}.weight"), device)?,
        bias: f32_tensor(st, &format!("{prefix}.bias"), device)?,
        eps,
    })
}

/// A linear layer with bias `{prefix}.weight` / `.bias`.
pub(crate) fn bias_linear(st: &MmapedSafetensors, prefix: &str, device: &Device) -> Result<BiasLinear, EngineError> {
    Ok(BiasLinear {
        weight: f32_tensor(st, &format!("{prefix}.weight"), device)?,
        bias: f32_tensor(st, &format!("{prefix}.bias"), device)?,
    })
}

/// The pre-norm encoder layers `{prefix}encoder.layers.{i}.*` of a SigLIP tower.
pub(crate) fn encoder_layers(
    st: &MmapedSafetensors,
    prefix: &str,
    n: usize,
    eps: f64,
    device: &Device,
) -> Result<Vec<VisionLayer>, EngineError> {
    let mut layers = Vec::with_capacity(n);
    for i in 0..n {
        let p = |s: &str| format!("{prefix}encoder.layers.{i}.{s}");
        layers.push(VisionLayer {
            layer_norm1: layer_norm(st, &p("layer_norm1"), eps, device)?,
            q: bias_linear(st, &p("self_attn.q_proj"), device)?,
            k: bias_linear(st, &p("self_attn.k_proj"), device)?,
            v: bias_linear(st, &p("self_attn.v_proj"), device)?,
            out: bias_linear(st, &p("self_attn.out_proj"), device)?,
            layer_norm2: layer_norm(st, &p("layer_norm2"), eps, device)?,
            fc1: bias_linear(st, &p("mlp.fc1"), device)?,
            fc2: bias_linear(st, &p("mlp.fc2"), device)?,
        });
    }
    Ok(layers)
}

/// A SigLIP vision encoder under `vp` (patch embedding, position table, layers, post
/// LayerNorm), shapes checked against `shape`.
pub(crate) fn load_vision_encoder(
    st: &MmapedSafetensors,
    vp: &str,
    shape: &EncoderShape,
    device: &Device,
) -> Result<VisionEncoder, EngineError> {
    let conv = f32_tensor(st, &format!("{vp}embeddings.patch_embedding.weight"), device)?;
    let expect = [shape.hidden, shape.channels, shape.patch_size, shape.patch_size];
    if conv.dims() != expect {
        return Err(load_err(format!("patch embedding is {:?}, config says {expect:?}", conv.dims())));
    }
    let patch = BiasLinear {
        weight: conv.reshape((shape.hidden, shape.channels * shape.patch_size * shape.patch_size)).map_err(load_err)?,
        bias: f32_tensor(st, &format!("{vp}embeddings.patch_embedding.bias"), device)?,
    };
    let position = f32_tensor(st, &format!("{vp}embeddings.position_embedding.weight"), device)?;
    let patches = (shape.image_size / shape.patch_size).pow(2);
    if position.dims() != [patches, shape.hidden] {
        return Err(load_err(format!(
            "position table is {:?}, expected [{patches}, {}]",
            position.dims(),
            shape.hidden
        )));
    }
    Ok(VisionEncoder {
        image_size: shape.image_size,
        patch_size: shape.patch_size,
        num_channels: shape.channels,
        num_heads: shape.heads,
        patch,
        position,
        layers: encoder_layers(st, vp, shape.layers, shape.eps, device)?,
        post_layernorm: layer_norm(st, &format!("{vp}post_layernorm"), shape.eps, device)?,
        device: device.clone(),
    })
}

/// Loads the text decoder of a checkpoint folder, computing in f32 on the CPU.
pub fn load_model(dir: &Path, cfg: &CheckpointConfig, device: &Device) -> Result<Gemma3, EngineError> {
    load_model_tp(dir, cfg, device, 1)
}

/// Which part of a stored matrix a rank keeps.
#[derive(Clone, Copy, Debug)]
enum Part {
    Whole,
    /// Rows `start .. start + len` (output features; vocabulary rows).
    Rows(usize, usize),
    /// Columns `start .. start + len` of every row (input features).
    Cols(usize, usize),
}

/// Bytes of a stored tensor's elements as f32 (f32, bf16 and f16 are stored exactly).
fn to_f32(bytes: &[u8], dtype: DType, name: &str) -> Result<Vec<f32>, EngineError> {
    Ok(match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => return Err(load_err(format!("tensor {name}: dtype {other:?} is not supported"))),
    })
}

/// The shape `part` of a tensor of shape `full` has, or why it does not fit.
fn part_shape(name: &str, full: &[usize], part: Part) -> Result<Vec<usize>, EngineError> {
    let mut s = full.to_vec();
    match part {
        Part::Whole => {}
        Part::Rows(start, len) => {
            if s.is_empty() || start + len > s[0] {
                return Err(load_err(format!("tensor {name} {full:?}: rows {start}..{} out of range", start + len)));
            }
            s[0] = len;
        }
        Part::Cols(start, len) => {
            if s.len() != 2 || start + len > s[1] {
                return Err(load_err(format!("tensor {name} {full:?}: columns {start}..{} out of range", start + len)));
            }
            s[1] = len;
        }
    }
    Ok(s)
}

/// Where a decoder's weights come from: a checkpoint's files, or random values of the right
/// shapes (for measuring speed and memory at a real model's shape without its weights).
enum Source {
    File(Weights),
    /// Normal values of this standard deviation, drawn on the rank's device.
    Random {
        std: f64,
    },
}

impl Source {
    /// `part` of the stored tensor `name` (of shape `full`), as `dtype` on `device`. A file's
    /// tensor is read only where the part lies in the memory-mapped file: a rank of a split
    /// model never holds the whole matrix.
    fn part(
        &self,
        name: &str,
        full: &[usize],
        part: Part,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, EngineError> {
        let shape = part_shape(name, full, part)?;
        match self {
            Self::Random { std } => Tensor::randn(0f32, *std as f32, shape, device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| load_err(format!("tensor {name}: {e}"))),
            Self::File(w) => w.part(name, full, part, &shape, dtype, device),
        }
    }

    /// An RMSNorm weight (stored as `w`, applied as `1 + w` in f32).
    fn norm(&self, name: &str, width: usize, eps: f64, device: &Device) -> Result<RmsNorm, EngineError> {
        let w = self.part(name, &[width], Part::Whole, DType::F32, device)?;
        Ok(RmsNorm::new((w + 1.0).map_err(load_err)?, eps))
    }
}

impl Weights {
    fn part(
        &self,
        name: &str,
        full: &[usize],
        part: Part,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, EngineError> {
        let err = |e: &dyn std::fmt::Display| load_err(format!("tensor {name}: {e}"));
        let view = self.st.get(name).map_err(|e| err(&e))?;
        if view.shape() != full {
            return Err(err(&format!("shape {:?} in the checkpoint, the config implies {full:?}", view.shape())));
        }
        let stored = DType::try_from(view.dtype()).map_err(|e| err(&e))?;
        let data = view.data();
        let e = stored.size_in_bytes();
        let inner: usize = full.iter().skip(1).product();
        // The bytes of a whole tensor or of a block of rows lie in one run.
        let run = match part {
            Part::Whole => Some(data),
            Part::Rows(start, len) => Some(&data[start * inner * e..(start + len) * inner * e]),
            Part::Cols(..) => None,
        };
        let host = match (run, part) {
            (Some(bytes), _) if stored == dtype => Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu),
            (Some(bytes), _) => Tensor::from_vec(to_f32(bytes, stored, name)?, shape, &Device::Cpu),
            (None, Part::Cols(start, len)) => {
                let (rows, cols) = (full[0], full[1]);
                let mut v = Vec::with_capacity(rows * len);
                for r in 0..rows {
                    let at = (r * cols + start) * e;
                    v.extend(to_f32(&data[at..at + len * e], stored, name)?);
                }
                Tensor::from_vec(v, shape, &Device::Cpu)
            }
            (None, _) => unreachable!("only columns are read row by row"),
        };
        host.and_then(|t| t.to_dtype(dtype)).and_then(|t| t.to_device(device)).map_err(|e| err(&e))
    }
}

/// How a decoder of `cfg` splits over `world` ranks, or why it cannot.
struct Split {
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
}

fn split(t: &crate::load::config::TextConfig, world: usize) -> Result<Split, EngineError> {
    let (h, kv, inter) = (t.num_heads, t.num_kv_heads, t.intermediate_size);
    if world == 0
        || !h.is_multiple_of(world)
        || !inter.is_multiple_of(world)
        || !(kv.is_multiple_of(world) || world.is_multiple_of(kv))
    {
        return Err(load_err(format!(
            "{h} attention heads, {kv} KV heads and an MLP of {inter} do not split over {world} ranks \
             (heads and MLP width must be multiples of the ranks; KV heads a multiple or a divisor)"
        )));
    }
    Ok(Split { heads: h / world, kv_heads: (kv / world).max(1), intermediate: inter / world })
}

/// Loads the text decoder split over `world` tensor-parallel ranks (threads of this process
/// joined by an in-process communicator), each rank reading only its slices of the weights,
/// in f32. `world = 1` is the whole model.
pub fn load_model_tp(dir: &Path, cfg: &CheckpointConfig, device: &Device, world: usize) -> Result<Gemma3, EngineError> {
    load_model_ranks(dir, cfg, vec![device.clone(); world.max(1)], crate::comm::cpu_comms(world), DType::F32)
}

/// Names of the decoder's tensors in one checkpoint.
struct Keys {
    /// Prefix of `layers.*` and `norm.weight`.
    prefix: &'static str,
    embed: String,
    /// `None`: the head is tied to the embedding.
    lm_head: Option<String>,
    /// Rows of the stored embedding (at least the config's vocabulary; some uploads pad it).
    embed_rows: usize,
}

/// Loads the text decoder split over one rank per entry of `devices`, joined by `comms`
/// (one communicator per rank, in rank order). Matrices and the embedding are held as
/// `dtype` (f32, bf16 or f16); norms in f32.
pub fn load_model_ranks(
    dir: &Path,
    cfg: &CheckpointConfig,
    devices: Vec<Device>,
    comms: Vec<Arc<dyn Communicator>>,
    dtype: DType,
) -> Result<Gemma3, EngineError> {
    let (st, names) = open_weights(dir)?;
    let (prefix, embed_key) = EMBED_KEYS
        .iter()
        .find(|(_, k)| names.contains(*k))
        .copied()
        .ok_or_else(|| load_err(format!("{}: no embed_tokens weight under a known layout", dir.display())))?;
    let t = &cfg.text;
    let view = st.get(embed_key).map_err(|e| load_err(format!("tensor {embed_key}: {e}")))?;
    let stored_dtype = DType::try_from(view.dtype()).map_err(load_err)?;
    let rows = match view.shape() {
        [r, c] if *c == t.hidden_size && *r >= t.vocab_size => *r,
        other => {
            return Err(load_err(format!(
                "embedding has shape {other:?}, config says vocabulary {} × hidden {}",
                t.vocab_size, t.hidden_size
            )))
        }
    };
    let lm_head = match (cfg.tie_word_embeddings, LM_HEAD_KEYS.iter().find(|k| names.contains(**k))) {
        (true, _) => None,
        (false, Some(k)) => Some(k.to_string()),
        (false, None) => return Err(load_err("tie_word_embeddings is false but the checkpoint has no lm_head.weight")),
    };
    let keys = Keys { prefix, embed: embed_key.to_string(), lm_head, embed_rows: rows };
    let source = Source::File(Weights { st });
    build(&source, &keys, cfg, devices, comms, dtype, embed_scale(t.hidden_size, stored_dtype))
}

/// A decoder of `cfg`'s shape with random weights (normal, σ = 0.02; norms 1 + N(0, 0.02)),
/// drawn directly on each rank's device as `dtype`, split over `devices` joined by `comms`.
/// For timing and memory at a real model's shape: its outputs mean nothing, and the same
/// model split differently gets different weights.
pub fn random_model(
    cfg: &CheckpointConfig,
    devices: Vec<Device>,
    comms: Vec<Arc<dyn Communicator>>,
    dtype: DType,
) -> Result<Gemma3, EngineError> {
    let t = &cfg.text;
    let keys = Keys {
        prefix: "model.",
        embed: "model.embed_tokens.weight".into(),
        lm_head: (!cfg.tie_word_embeddings).then(|| "lm_head.weight".into()),
        embed_rows: t.vocab_size,
    };
    build(&Source::Random { std: 0.02 }, &keys, cfg, devices, comms, dtype, embed_scale(t.hidden_size, dtype))
}

/// Builds each rank's shard of the decoder from `source`.
fn build(
    source: &Source,
    keys: &Keys,
    cfg: &CheckpointConfig,
    devices: Vec<Device>,
    comms: Vec<Arc<dyn Communicator>>,
    dtype: DType,
    embed_scale: f64,
) -> Result<Gemma3, EngineError> {
    let world = devices.len();
    if world == 0 || comms.len() != world {
        return Err(load_err(format!("{} devices for {} communicators", world, comms.len())));
    }
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(load_err(format!("weights can be held as f32, bf16 or f16, not {dtype:?}")));
    }
    let device = devices[0].clone();
    let t = &cfg.text;
    let eps = t.rms_norm_eps;
    let sp = split(t, world)?;
    let (hd, hidden, rows) = (t.head_dim, t.hidden_size, keys.embed_rows);
    let per_rank_vocab = rows.div_ceil(world);
    let mut shards = Vec::with_capacity(world);
    for (r, (comm, dev)) in comms.into_iter().zip(devices).enumerate() {
        let whole_if_one = |p: Part| if world == 1 { Part::Whole } else { p };
        let q_rows = Part::Rows(r * sp.heads * hd, sp.heads * hd);
        // With fewer KV heads than ranks, a rank keeps the KV head its query heads use.
        let kv_first =
            if t.num_kv_heads >= world { r * sp.kv_heads } else { r * sp.heads / (t.num_heads / t.num_kv_heads) };
        let kv_rows = Part::Rows(kv_first * hd, sp.kv_heads * hd);
        let o_cols = Part::Cols(r * sp.heads * hd, sp.heads * hd);
        let up_rows = Part::Rows(r * sp.intermediate, sp.intermediate);
        let down_cols = Part::Cols(r * sp.intermediate, sp.intermediate);
        let vocab_start = (r * per_rank_vocab).min(rows);
        let vocab_rows = per_rank_vocab.min(rows - vocab_start);
        let vocab = whole_if_one(Part::Rows(vocab_start, vocab_rows));
        let embed = source.part(&keys.embed, &[rows, hidden], vocab, dtype, &dev)?;
        let lm_head = match &keys.lm_head {
            None => Linear::Dense(embed.clone()),
            Some(k) => Linear::Dense(source.part(k, &[rows, hidden], vocab, dtype, &dev)?),
        };
        let parts = RankParts { q_rows, kv_rows, o_cols, up_rows, down_cols };
        let mut layer_source =
            HfLayers { source, prefix: keys.prefix, cfg: t, parts, whole: world == 1, dtype, device: &dev };
        let layers = (0..t.num_layers).map(|i| Layer::load(&mut layer_source, i)).collect::<Result<Vec<_>, _>>()?;
        let local = crate::load::config::TextConfig {
            num_heads: sp.heads,
            num_kv_heads: sp.kv_heads,
            intermediate_size: sp.intermediate,
            ..t.clone()
        };
        shards.push(Arc::new(Shard {
            cfg: local,
            embed: Embedding::Dense(embed),
            vocab_start,
            vocab_rows,
            layers,
            lm_head,
            norm: source.norm(&format!("{}norm.weight", keys.prefix), hidden, eps, &dev)?,
            comm,
            device: dev,
        }));
    }
    Ok(Gemma3 {
        cfg: t.clone(),
        shards,
        embed_scale,
        numeric: NumericOptions { f16_attention: false, f16_gelu: false },
        image_token_id: cfg.vision.as_ref().map(|v| v.image_token_id),
        attention_dtype: dtype,
        device,
        attention: Default::default(),
        runtime: Default::default(),
    })
}

/// The parts of each matrix one rank keeps.
struct RankParts {
    q_rows: Part,
    kv_rows: Part,
    o_cols: Part,
    up_rows: Part,
    down_cols: Part,
}

/// A checkpoint's decoder layers under transformers' names (`{prefix}layers.N.*`), read for
/// one rank.
struct HfLayers<'a> {
    source: &'a Source,
    prefix: &'static str,
    cfg: &'a crate::load::config::TextConfig,
    parts: RankParts,
    /// The whole model on one rank: every matrix read whole.
    whole: bool,
    dtype: DType,
    device: &'a Device,
}

impl HfLayers<'_> {
    fn name(&self, layer: usize, p: LayerParam) -> String {
        let s = match p {
            LayerParam::InputNorm => "input_layernorm",
            LayerParam::Q => "self_attn.q_proj",
            LayerParam::K => "self_attn.k_proj",
            LayerParam::V => "self_attn.v_proj",
            LayerParam::O => "self_attn.o_proj",
            LayerParam::QNorm => "self_attn.q_norm",
            LayerParam::KNorm => "self_attn.k_norm",
            LayerParam::PostAttentionNorm => "post_attention_layernorm",
            LayerParam::PreFeedForwardNorm => "pre_feedforward_layernorm",
            LayerParam::Gate => "mlp.gate_proj",
            LayerParam::Up => "mlp.up_proj",
            LayerParam::Down => "mlp.down_proj",
            LayerParam::PostFeedForwardNorm => "post_feedforward_layernorm",
        };
        format!("{}layers.{layer}.{s}.weight", self.prefix)
    }
}

impl LayerSource for HfLayers<'_> {
    fn linear(&mut self, layer: usize, p: LayerParam) -> Result<Linear, EngineError> {
        let t = self.cfg;
        let (hidden, pr) = (t.hidden_size, &self.parts);
        let (full, part) = match p {
            LayerParam::Q => ([t.q_dim(), hidden], pr.q_rows),
            LayerParam::K | LayerParam::V => ([t.kv_dim(), hidden], pr.kv_rows),
            LayerParam::O => ([hidden, t.q_dim()], pr.o_cols),
            LayerParam::Gate | LayerParam::Up => ([t.intermediate_size, hidden], pr.up_rows),
            LayerParam::Down => ([hidden, t.intermediate_size], pr.down_cols),
            other => return Err(load_err(format!("{other:?} is not a matrix"))),
        };
        let part = if self.whole { Part::Whole } else { part };
        Ok(Linear::Dense(self.source.part(&self.name(layer, p), &full, part, self.dtype, self.device)?))
    }

    fn norm(&mut self, layer: usize, p: LayerParam) -> Result<RmsNorm, EngineError> {
        let width = match p {
            LayerParam::QNorm | LayerParam::KNorm => self.cfg.head_dim,
            _ => self.cfg.hidden_size,
        };
        self.source.norm(&self.name(layer, p), width, self.cfg.rms_norm_eps, self.device)
    }
}

/// A chat template (Jinja) from `chat_template.jinja` or `tokenizer_config.json`.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Finds the checkpoint's template: `chat_template.jinja`, else the `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of named templates: `default` is used).
    pub fn find(dir: &Path) -> Result<Option<Self>, EngineError> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| load_err(format!("{}: {e}", cfg_path.display())))?,
            Err(_) => serde_json::Value::Null,
        };
        let token = |key: &str, default: &str| match cfg.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.get("content").and_then(|c| c.as_str()).unwrap_or(default).to_string(),
            None => default.to_string(),
        };
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(s) => Some(s),
            Err(_) => match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            },
        };
        Ok(source.map(|source| Self {
            source,
            bos_token: token("bos_token", "<bos>"),
            eos_token: token("eos_token", "<eos>"),
        }))
    }

    /// Renders `messages` (`{"role", "content"}` objects) with the generation prompt.
    pub fn render(&self, messages: &serde_json::Value) -> Result<String, EngineError> {
        self.render_with(messages, true)
    }

    /// Renders `messages`, with or without the generation prompt.
    pub fn render_with(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let tmpl =
            env.template_from_str(&self.source).map_err(|e| EngineError::Request(format!("chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(|e| EngineError::Request(format!("chat template: {e}")))
    }

    /// Whether the rendered text carries BOS itself (then it must be tokenized without
    /// adding another).
    pub fn writes_bos(&self) -> bool {
        self.source.contains("bos_token")
    }
}

/// Largest safetensors header accepted (the format allows 100 MB; real ones are ~100 KB).
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// Stored weight bytes per dtype, from the headers of a checkpoint's safetensors files (the
/// weights themselves are not read). `None` when the folder has no weight files.
pub fn weight_bytes_by_dtype(dir: &Path) -> Result<Option<std::collections::BTreeMap<String, u64>>, EngineError> {
    use std::io::Read;
    let Ok(files) = weight_files(dir) else { return Ok(None) };
    let mut out = std::collections::BTreeMap::new();
    for p in files {
        let err = |e: &dyn std::fmt::Display| load_err(format!("{}: {e}", p.display()));
        let mut f = std::fs::File::open(&p).map_err(|e| err(&e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| err(&e))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_SAFETENSORS_HEADER {
            return Err(err(&"safetensors header too large"));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| err(&e))?;
        let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| err(&e))?;
        for (name, t) in v.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let dtype = t.get("dtype").and_then(|d| d.as_str()).unwrap_or("?").to_string();
            let off = t.get("data_offsets").and_then(|o| o.as_array());
            let bytes = match off.map(|o| (o.first().and_then(|x| x.as_u64()), o.get(1).and_then(|x| x.as_u64()))) {
                Some((Some(a), Some(b))) if b >= a => b - a,
                _ => return Err(err(&format!("tensor {name} has no data_offsets"))),
            };
            *out.entry(dtype).or_insert(0) += bytes;
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embed_scale_rounds_to_the_weight_dtype() {
        assert_eq!(embed_scale(3072, DType::BF16), 55.5);
        assert_eq!(embed_scale(5376, DType::BF16), 73.5);
        assert_eq!(embed_scale(2560, DType::BF16), 50.5);
        assert!((embed_scale(640, DType::F32) - 25.298_221).abs() < 1e-5);
    }
}
