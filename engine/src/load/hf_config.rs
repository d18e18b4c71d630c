//! `config.json` of Hugging Face Gemma 3 checkpoints, in the three on-disk formats:
//!
//! | saved by transformers | keys |
//! |---|---|
//! | ≤ 4.51 (original Gemma 3 / MedGemma uploads) | `rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern` |
//! | 4.55 – 4.57 | adds `layer_types` (and `_sliding_window_pattern`) |
//! | 5.x | `rope_parameters` per layer type, `layer_types` |
//!
//! Text-only (`Gemma3ForCausalLM`) configs hold the text keys at the top level; multimodal
//! (`Gemma3ForConditionalGeneration`) configs nest them in `text_config`, often keeping only
//! the keys that differ from `Gemma3TextConfig`'s class defaults, which apply to every key
//! that is absent.

use crate::load::config::{TextConfig, GEMMA3_LOCAL_ROPE_BASE, GEMMA3_SLIDING_WINDOW_PATTERN};
use crate::EngineError;
use serde_json::Value;

// Gemma3TextConfig class defaults (transformers), used for absent keys.
const DEFAULT_VOCAB: usize = 262_208;
const DEFAULT_HIDDEN: usize = 2304;
const DEFAULT_INTERMEDIATE: usize = 9216;
const DEFAULT_LAYERS: usize = 26;
const DEFAULT_HEADS: usize = 8;
const DEFAULT_KV_HEADS: usize = 4;
const DEFAULT_HEAD_DIM: usize = 256;
const DEFAULT_EPS: f64 = 1e-6;
const DEFAULT_ROPE_THETA: f64 = 1_000_000.0;
const DEFAULT_QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
const DEFAULT_SLIDING_WINDOW: usize = 4096;
const DEFAULT_MAX_POSITIONS: usize = 131_072;

/// Vision side of a multimodal checkpoint: the SigLIP tower (`vision_config`) and the image
/// token settings kept at the top level of `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    /// Soft tokens per image after pooling (a square number).
    pub mm_tokens_per_image: usize,
    /// `<image_soft_token>`: the placeholder each image row replaces.
    pub image_token_id: u32,
    /// `<start_of_image>`, written where an image goes.
    pub boi_token_id: u32,
    /// `<end_of_image>`.
    pub eoi_token_id: u32,
}

impl VisionConfig {
    /// The tower of Gemma 3 4B/12B/27B and every MedGemma multimodal model: SigLIP 896/14,
    /// 27 layers, 256 soft tokens per image.
    pub fn siglip_896() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_layers: 27,
            num_heads: 16,
            image_size: 896,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            mm_tokens_per_image: 256,
            image_token_id: 262_144,
            boi_token_id: 255_999,
            eoi_token_id: 256_000,
        }
    }
}

/// A parsed checkpoint config.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointConfig {
    pub architecture: String,
    pub text: TextConfig,
    pub tie_word_embeddings: bool,
    /// `torch_dtype` / `dtype` as recorded (`bfloat16`, `float32`, …).
    pub dtype: Option<String>,
    pub vision: Option<VisionConfig>,
    /// End-of-generation ids (`eos_token_id`, a number or a list).
    pub eos_token_ids: Vec<u32>,
}

fn bad(msg: impl Into<String>) -> EngineError {
    EngineError::Load(format!("config.json: {}", msg.into()))
}

fn get_usize(o: &Value, key: &str, default: usize) -> Result<usize, EngineError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| bad(format!("{key} is not a whole number"))),
    }
}

fn get_f64(o: &Value, key: &str) -> Result<Option<f64>, EngineError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(format!("{key} is not a number"))),
    }
}

/// `(base, linear factor)` of one RoPE parameter object (`rope_scaling` or an entry of
/// `rope_parameters`).
fn rope_entry(o: &Value, default_base: f64) -> Result<(f64, f64), EngineError> {
    let base = get_f64(o, "rope_theta")?.unwrap_or(default_base);
    let kind = o.get("rope_type").or_else(|| o.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = match kind {
        "default" => 1.0,
        "linear" => get_f64(o, "factor")?.ok_or_else(|| bad("linear RoPE scaling without a factor"))?,
        other => return Err(bad(format!("RoPE type {other:?} is not supported (Gemma 3 uses default and linear)"))),
    };
    Ok((base, factor))
}

/// Parses a `config.json` document.
pub fn parse_config(json: &str) -> Result<CheckpointConfig, EngineError> {
    let root: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let architecture = root
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("Gemma3ForCausalLM")
        .to_string();
    let model_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
    let nested = root.get("text_config").filter(|v| v.is_object());
    if !matches!(model_type, "gemma3" | "gemma3_text" | "") {
        return Err(bad(format!("model_type {model_type:?} is not Gemma 3")));
    }
    let empty = Value::Object(Default::default());
    let t = nested.unwrap_or(if nested.is_none() && architecture.contains("ConditionalGeneration") {
        &empty
    } else {
        &root
    });

    let act = t
        .get("hidden_activation")
        .or_else(|| t.get("hidden_act"))
        .and_then(Value::as_str)
        .unwrap_or("gelu_pytorch_tanh");
    if !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh") {
        return Err(bad(format!("hidden_activation {act:?} is not supported (Gemma 3 uses gelu_pytorch_tanh)")));
    }
    if t.get("use_bidirectional_attention").and_then(Value::as_bool).unwrap_or(false) {
        return Err(bad("use_bidirectional_attention (embedding models) is not supported"));
    }
    let num_layers = get_usize(t, "num_hidden_layers", DEFAULT_LAYERS)?;
    let layer_is_global = match t.get("layer_types").filter(|v| !v.is_null()) {
        Some(Value::Array(types)) => {
            let v: Result<Vec<bool>, _> = types
                .iter()
                .map(|x| match x.as_str() {
                    Some("full_attention") => Ok(true),
                    Some("sliding_attention") => Ok(false),
                    other => Err(bad(format!("unknown layer type {other:?}"))),
                })
                .collect();
            v?
        }
        Some(_) => return Err(bad("layer_types is not a list")),
        None => {
            let pattern = get_usize(
                t,
                "sliding_window_pattern",
                get_usize(t, "_sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)?,
            )?;
            if pattern == 0 {
                return Err(bad("sliding_window_pattern is 0"));
            }
            (0..num_layers).map(|i| (i + 1) % pattern == 0).collect()
        }
    };
    if layer_is_global.len() != num_layers {
        return Err(bad(format!("{} layer_types for {num_layers} layers", layer_is_global.len())));
    }
    let ((global_base, global_factor), (local_base, local_factor)) = match t.get("rope_parameters") {
        Some(p) if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() => (
            rope_entry(p.get("full_attention").unwrap_or(&empty), DEFAULT_ROPE_THETA)?,
            rope_entry(p.get("sliding_attention").unwrap_or(&empty), GEMMA3_LOCAL_ROPE_BASE)?,
        ),
        Some(p) if p.is_object() => (
            rope_entry(p, DEFAULT_ROPE_THETA)?,
            (get_f64(t, "rope_local_base_freq")?.unwrap_or(GEMMA3_LOCAL_ROPE_BASE), 1.0),
        ),
        _ => {
            let base = get_f64(t, "rope_theta")?.unwrap_or(DEFAULT_ROPE_THETA);
            let factor = match t.get("rope_scaling").filter(|v| !v.is_null()) {
                Some(s) => rope_entry(s, base)?.1,
                None => 1.0,
            };
            ((base, factor), (get_f64(t, "rope_local_base_freq")?.unwrap_or(GEMMA3_LOCAL_ROPE_BASE), 1.0))
        }
    };
    if local_factor != 1.0 {
        return Err(bad("RoPE scaling on sliding-window layers is not supported"));
    }
    let hidden_size = get_usize(t, "hidden_size", DEFAULT_HIDDEN)?;
    let num_heads = get_usize(t, "num_attention_heads", DEFAULT_HEADS)?;
    let num_kv_heads = get_usize(t, "num_key_value_heads", DEFAULT_KV_HEADS)?;
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(bad(format!("{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")));
    }
    let text = TextConfig {
        vocab_size: get_usize(t, "vocab_size", DEFAULT_VOCAB)?,
        hidden_size,
        intermediate_size: get_usize(t, "intermediate_size", DEFAULT_INTERMEDIATE)?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim: get_usize(t, "head_dim", DEFAULT_HEAD_DIM)?,
        rms_norm_eps: get_f64(t, "rms_norm_eps")?.unwrap_or(DEFAULT_EPS),
        rope_global_base: global_base,
        rope_global_factor: global_factor,
        rope_local_base: local_base,
        sliding_window: get_usize(t, "sliding_window", DEFAULT_SLIDING_WINDOW)?,
        layer_is_global,
        query_pre_attn_scalar: get_f64(t, "query_pre_attn_scalar")?.unwrap_or(DEFAULT_QUERY_PRE_ATTN_SCALAR),
        final_logit_softcap: get_f64(t, "final_logit_softcapping")?,
        max_position_embeddings: get_usize(t, "max_position_embeddings", DEFAULT_MAX_POSITIONS)?,
    };
    if get_f64(t, "attn_logit_softcapping")?.is_some() {
        return Err(bad("attn_logit_softcapping is not supported (null for every Gemma 3)"));
    }
    // Multimodal configs keep `tie_word_embeddings` at the top level.
    let tie = t
        .get("tie_word_embeddings")
        .or_else(|| root.get("tie_word_embeddings"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let dtype = ["torch_dtype", "dtype"]
        .iter()
        .find_map(|k| t.get(*k).or_else(|| root.get(*k)).and_then(Value::as_str))
        .map(str::to_string);
    let vision = match root.get("vision_config").filter(|v| v.is_object()) {
        Some(v) => {
            let d = VisionConfig::siglip_896();
            let act = v.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu_pytorch_tanh");
            if !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh") {
                return Err(bad(format!("vision hidden_act {act:?} is not supported (SigLIP uses gelu_pytorch_tanh)")));
            }
            if v.get("vision_use_head").and_then(Value::as_bool).unwrap_or(false) {
                return Err(bad("vision_use_head is set; Gemma 3's tower has no pooling head"));
            }
            // Older configs name the token ids `*_index`, newer ones `*_id`.
            let token = |a: &str, b: &str, default: u32| -> Result<u32, EngineError> {
                let key = if root.get(a).is_some_and(|x| !x.is_null()) { a } else { b };
                Ok(get_usize(&root, key, default as usize)? as u32)
            };
            Some(VisionConfig {
                hidden_size: get_usize(v, "hidden_size", d.hidden_size)?,
                intermediate_size: get_usize(v, "intermediate_size", d.intermediate_size)?,
                num_layers: get_usize(v, "num_hidden_layers", d.num_layers)?,
                num_heads: get_usize(v, "num_attention_heads", d.num_heads)?,
                image_size: get_usize(v, "image_size", d.image_size)?,
                patch_size: get_usize(v, "patch_size", d.patch_size)?,
                num_channels: get_usize(v, "num_channels", d.num_channels)?,
                layer_norm_eps: get_f64(v, "layer_norm_eps")?.unwrap_or(d.layer_norm_eps),
                mm_tokens_per_image: get_usize(&root, "mm_tokens_per_image", d.mm_tokens_per_image)?,
                image_token_id: token("image_token_index", "image_token_id", d.image_token_id)?,
                boi_token_id: token("boi_token_index", "boi_token_id", d.boi_token_id)?,
                eoi_token_id: token("eoi_token_index", "eoi_token_id", d.eoi_token_id)?,
            })
        }
        None => None,
    };
    let eos_token_ids = match t.get("eos_token_id").or_else(|| root.get("eos_token_id")) {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        Some(v) => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        None => vec![1],
    };
    Ok(CheckpointConfig { architecture, text, tie_word_embeddings: tie, dtype, vision, eos_token_ids })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_multimodal_text_config_takes_class_defaults() {
        let c = parse_config(
            r#"{"architectures":["Gemma3ForConditionalGeneration"],"model_type":"gemma3",
                "text_config":{"hidden_size":2560,"intermediate_size":10240,"num_hidden_layers":34,
                "rope_scaling":{"factor":8.0,"rope_type":"linear"},"sliding_window":1024},
                "vision_config":{"model_type":"siglip_vision_model"},"torch_dtype":"bfloat16"}"#,
        )
        .unwrap();
        let t = &c.text;
        assert_eq!((t.num_heads, t.num_kv_heads, t.head_dim, t.vocab_size), (8, 4, 256, 262_208));
        assert_eq!((t.rope_global_base, t.rope_global_factor, t.rope_local_base), (1e6, 8.0, 1e4));
        assert_eq!(t.layer_is_global.iter().filter(|g| **g).count(), 5);
        assert!(t.layer_is_global[5] && !t.layer_is_global[4]);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.vision, Some(VisionConfig::siglip_896()));
    }

    #[test]
    fn three_formats_agree() {
        let old = r#"{"model_type":"gemma3_text","num_hidden_layers":4,"sliding_window_pattern":2,
            "rope_theta":1000000.0,"rope_local_base_freq":10000.0,"rope_scaling":{"rope_type":"linear","factor":8.0}}"#;
        let mid = r#"{"model_type":"gemma3_text","num_hidden_layers":4,
            "layer_types":["sliding_attention","full_attention","sliding_attention","full_attention"],
            "rope_theta":1000000.0,"rope_local_base_freq":10000.0,"rope_scaling":{"rope_type":"linear","factor":8.0}}"#;
        let new = r#"{"model_type":"gemma3_text","num_hidden_layers":4,
            "layer_types":["sliding_attention","full_attention","sliding_attention","full_attention"],
            "rope_parameters":{"full_attention":{"rope_type":"linear","rope_theta":1000000.0,"factor":8.0},
                               "sliding_attention":{"rope_type":"default","rope_theta":10000.0}}}"#;
        let a = parse_config(old).unwrap();
        assert_eq!(a.text.layer_is_global, vec![false, true, false, true]);
        assert_eq!(a, parse_config(mid).unwrap());
        assert_eq!(a, parse_config(new).unwrap());
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        assert!(parse_config(r#"{"model_type":"llama"}"#).is_err());
        assert!(parse_config(r#"{"hidden_activation":"silu"}"#).is_err());
        assert!(parse_config(r#"{"rope_scaling":{"rope_type":"yarn","factor":4}}"#).is_err());
        assert!(parse_config(r#"{"num_hidden_layers":2,"layer_types":["full_attention"]}"#).is_err());
        assert!(parse_config("not json").is_err());
    }
}
