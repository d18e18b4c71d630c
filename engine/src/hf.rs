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

use crate::hf_config::{parse_config, CheckpointConfig};
use crate::model::{Attention, Embedding, Gemma3, Layer, Linear, Mlp, NumericOptions, RmsNorm, Shard};
use crate::vision::{BiasLinear, LayerNorm, VisionLayer, VisionTower};
use crate::EngineError;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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

struct Weights {
    st: MmapedSafetensors,
    prefix: &'static str,
    device: Device,
}

impl Weights {
    fn get(&self, name: &str) -> Result<Tensor, EngineError> {
        self.st.load(name, &self.device).map_err(|e| load_err(format!("tensor {name}: {e}")))
    }

    fn f32(&self, name: &str) -> Result<Tensor, EngineError> {
        self.get(&format!("{}{name}", self.prefix))?.to_dtype(DType::F32).map_err(load_err)
    }

    fn norm(&self, name: &str, eps: f64) -> Result<RmsNorm, EngineError> {
        let w = (self.f32(name)? + 1.0).map_err(load_err)?;
        Ok(RmsNorm::new(w, eps))
    }
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

fn open_weights(dir: &Path) -> Result<(MmapedSafetensors, BTreeSet<String>), EngineError> {
    let files = weight_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; medbatch never writes them, and a file
    // changed underneath a running worker is outside what it can guard against.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(load_err)?;
    let names: BTreeSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    Ok((st, names))
}

/// Loads the vision tower and projector of a multimodal checkpoint (`None` for a text-only
/// one), computing in f32 on the CPU.
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
    let get = |name: String| -> Result<Tensor, EngineError> {
        st.load(&name, device).and_then(|t| t.to_dtype(DType::F32)).map_err(|e| load_err(format!("tensor {name}: {e}")))
    };
    let eps = vc.layer_norm_eps;
    let ln = |p: &str| -> Result<LayerNorm, EngineError> {
        Ok(LayerNorm { weight: get(format!("{vp}{p}.weight"))?, bias: get(format!("{vp}{p}.bias"))?, eps })
    };
    let lin = |p: &str| -> Result<BiasLinear, EngineError> {
        Ok(BiasLinear { weight: get(format!("{vp}{p}.weight"))?, bias: get(format!("{vp}{p}.bias"))? })
    };
    let conv = get(format!("{vp}embeddings.patch_embedding.weight"))?;
    let expect = [vc.hidden_size, vc.num_channels, vc.patch_size, vc.patch_size];
    if conv.dims() != expect {
        return Err(load_err(format!("patch embedding is {:?}, config says {expect:?}", conv.dims())));
    }
    let patch = BiasLinear {
        weight: conv.reshape((vc.hidden_size, vc.num_channels * vc.patch_size * vc.patch_size)).map_err(load_err)?,
        bias: get(format!("{vp}embeddings.patch_embedding.bias"))?,
    };
    let position = get(format!("{vp}embeddings.position_embedding.weight"))?;
    let patches = (vc.image_size / vc.patch_size).pow(2);
    if position.dims() != [patches, vc.hidden_size] {
        return Err(load_err(format!(
            "position table is {:?}, expected [{patches}, {}]",
            position.dims(),
            vc.hidden_size
        )));
    }
    let mut layers = Vec::with_capacity(vc.num_layers);
    for i in 0..vc.num_layers {
        let p = |s: &str| format!("encoder.layers.{i}.{s}");
        layers.push(VisionLayer {
            layer_norm1: ln(&p("layer_norm1"))?,
            q: lin(&p("self_attn.q_proj"))?,
            k: lin(&p("self_attn.k_proj"))?,
            v: lin(&p("self_attn.v_proj"))?,
            out: lin(&p("self_attn.out_proj"))?,
            layer_norm2: ln(&p("layer_norm2"))?,
            fc1: lin(&p("mlp.fc1"))?,
            fc2: lin(&p("mlp.fc2"))?,
        });
    }
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
    Ok(Some(VisionTower {
        post_layernorm: ln("post_layernorm")?,
        soft_emb_norm: RmsNorm::new(norm_w, eps),
        projection,
        patch,
        position,
        layers,
        cfg: vc,
        device: device.clone(),
    }))
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

impl Weights {
    /// The f32 values of `part` of a tensor, reading only that part's bytes from the
    /// memory-mapped file (a rank of a split model never holds the whole matrix).
    fn part(&self, name: &str, part: Part) -> Result<Tensor, EngineError> {
        let view = self.st.get(name).map_err(|e| load_err(format!("tensor {name}: {e}")))?;
        let dtype = DType::try_from(view.dtype()).map_err(|e| load_err(format!("tensor {name}: {e}")))?;
        let shape = view.shape().to_vec();
        let data = view.data();
        let e = dtype.size_in_bytes();
        let inner: usize = shape.iter().skip(1).product();
        let (values, new_shape) = match part {
            Part::Whole => (to_f32(data, dtype, name)?, shape.clone()),
            Part::Rows(start, len) => {
                if shape.is_empty() || start + len > shape[0] {
                    return Err(load_err(format!(
                        "tensor {name} {shape:?}: rows {start}..{} out of range",
                        start + len
                    )));
                }
                let mut s = shape.clone();
                s[0] = len;
                (to_f32(&data[start * inner * e..(start + len) * inner * e], dtype, name)?, s)
            }
            Part::Cols(start, len) => {
                let [rows, cols] = shape[..] else {
                    return Err(load_err(format!("tensor {name} {shape:?}: columns of a non-matrix")));
                };
                if start + len > cols {
                    return Err(load_err(format!(
                        "tensor {name} {shape:?}: columns {start}..{} out of range",
                        start + len
                    )));
                }
                let mut v = Vec::with_capacity(rows * len);
                for r in 0..rows {
                    let at = (r * cols + start) * e;
                    v.extend(to_f32(&data[at..at + len * e], dtype, name)?);
                }
                (v, vec![rows, len])
            }
        };
        Tensor::from_vec(values, new_shape, &self.device).map_err(load_err)
    }

    fn linear_part(&self, name: &str, part: Part) -> Result<Linear, EngineError> {
        Ok(Linear::Dense(self.part(&format!("{}{name}", self.prefix), part)?))
    }
}

/// How a decoder of `cfg` splits over `world` ranks, or why it cannot.
struct Split {
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
}

fn split(t: &crate::config::TextConfig, world: usize) -> Result<Split, EngineError> {
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
/// joined by an in-process communicator), each rank reading only its slices of the weights.
/// `world = 1` is the whole model.
pub fn load_model_tp(dir: &Path, cfg: &CheckpointConfig, device: &Device, world: usize) -> Result<Gemma3, EngineError> {
    let comms: Vec<std::sync::Arc<dyn crate::comm::Communicator>> = if world == 1 {
        vec![std::sync::Arc::new(crate::comm::SingleRank)]
    } else {
        crate::comm::InProcess::group(world)
            .into_iter()
            .map(|c| std::sync::Arc::new(c) as std::sync::Arc<dyn crate::comm::Communicator>)
            .collect()
    };
    load_model_ranks(dir, cfg, vec![device.clone(); world.max(1)], comms)
}

/// Loads the text decoder split over one rank per entry of `devices`, joined by `comms`
/// (one communicator per rank, in rank order).
pub fn load_model_ranks(
    dir: &Path,
    cfg: &CheckpointConfig,
    devices: Vec<Device>,
    comms: Vec<std::sync::Arc<dyn crate::comm::Communicator>>,
) -> Result<Gemma3, EngineError> {
    let world = devices.len();
    if world == 0 || comms.len() != world {
        return Err(load_err(format!("{} devices for {} communicators", world, comms.len())));
    }
    let device = devices[0].clone();
    let (st, names) = open_weights(dir)?;
    let (prefix, embed_key) = EMBED_KEYS
        .iter()
        .find(|(_, k)| names.contains(*k))
        .copied()
        .ok_or_else(|| load_err(format!("{}: no embed_tokens weight under a known layout", dir.display())))?;
    let mut w = Weights { st, prefix, device: device.clone() };
    let t = &cfg.text;
    let eps = t.rms_norm_eps;
    let sp = split(t, world)?;
    let view = w.st.get(embed_key).map_err(|e| load_err(format!("tensor {embed_key}: {e}")))?;
    let stored_dtype = DType::try_from(view.dtype()).map_err(load_err)?;
    let (rows, cols) = match view.shape() {
        [r, c] => (*r, *c),
        other => return Err(load_err(format!("embedding has shape {other:?}"))),
    };
    if cols != t.hidden_size || rows < t.vocab_size.min(rows) {
        return Err(load_err(format!("embedding is {rows}x{cols}, config says hidden {}", t.hidden_size)));
    }
    let head_key = match (cfg.tie_word_embeddings, LM_HEAD_KEYS.iter().find(|k| names.contains(**k))) {
        (true, _) => None,
        (false, Some(k)) => Some(*k),
        (false, None) => return Err(load_err("tie_word_embeddings is false but the checkpoint has no lm_head.weight")),
    };
    let hd = t.head_dim;
    let per_rank_vocab = rows.div_ceil(world);
    let mut shards = Vec::with_capacity(world);
    for (r, (comm, dev)) in comms.into_iter().zip(devices).enumerate() {
        w.device = dev.clone();
        let part = |whole: bool, p: Part| if world == 1 || whole { Part::Whole } else { p };
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
        let vocab = part(false, Part::Rows(vocab_start, vocab_rows));
        let embed = w.part(embed_key, vocab)?;
        let lm_head = match head_key {
            None => Linear::Dense(embed.clone()),
            Some(k) => Linear::Dense(w.part(k, vocab)?),
        };
        let mut layers = Vec::with_capacity(t.num_layers);
        for i in 0..t.num_layers {
            let p = |s: &str| format!("layers.{i}.{s}.weight");
            layers.push(Layer {
                input_norm: w.norm(&p("input_layernorm"), eps)?,
                attn: Attention {
                    q: w.linear_part(&p("self_attn.q_proj"), part(false, q_rows))?,
                    k: w.linear_part(&p("self_attn.k_proj"), part(false, kv_rows))?,
                    v: w.linear_part(&p("self_attn.v_proj"), part(false, kv_rows))?,
                    o: w.linear_part(&p("self_attn.o_proj"), part(false, o_cols))?,
                    q_norm: w.norm(&p("self_attn.q_norm"), eps)?,
                    k_norm: w.norm(&p("self_attn.k_norm"), eps)?,
                },
                post_attn_norm: w.norm(&p("post_attention_layernorm"), eps)?,
                pre_ff_norm: w.norm(&p("pre_feedforward_layernorm"), eps)?,
                mlp: Mlp {
                    gate: w.linear_part(&p("mlp.gate_proj"), part(false, up_rows))?,
                    up: w.linear_part(&p("mlp.up_proj"), part(false, up_rows))?,
                    down: w.linear_part(&p("mlp.down_proj"), part(false, down_cols))?,
                },
                post_ff_norm: w.norm(&p("post_feedforward_layernorm"), eps)?,
            });
        }
        let local = crate::config::TextConfig {
            num_heads: sp.heads,
            num_kv_heads: sp.kv_heads,
            intermediate_size: sp.intermediate,
            ..t.clone()
        };
        shards.push(Shard {
            cfg: local,
            embed: Embedding::Dense(embed),
            vocab_start,
            vocab_rows,
            layers,
            lm_head,
            norm: w.norm("norm.weight", eps)?,
            comm,
            device: dev,
        });
    }
    Ok(Gemma3 {
        cfg: t.clone(),
        shards,
        embed_scale: embed_scale(t.hidden_size, stored_dtype),
        numeric: NumericOptions { f16_attention: false, f16_gelu: false },
        image_token_id: cfg.vision.as_ref().map(|v| v.image_token_id),
        device: device.clone(),
    })
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
