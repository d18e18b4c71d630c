//! Loading a Hugging Face `SiglipModel` checkpoint (MedSigLIP-448's layout and names):
//! `config.json` with `text_config` and `vision_config`, safetensors weights under
//! `vision_model.` (tower and attention-pooling head) and `text_model.`, `logit_scale` and
//! `logit_bias`, and the tokenizer (`tokenizer.json`).

use crate::load::hf::{
    bias_linear, encoder_layers, f32_tensor, layer_norm, load_vision_encoder, open_weights, EncoderShape,
};
use crate::models::siglip::{PoolingHead, SiglipModel, TextTower};
use crate::tokenizer::siglip::SiglipTokenizer;
use crate::EngineError;
use candle_core::Device;
use serde_json::Value;
use std::path::Path;

fn load_err(what: impl std::fmt::Display) -> EngineError {
    EngineError::Load(what.to_string())
}

/// The fields of one tower's config.
struct Tower {
    hidden: usize,
    layers: usize,
    heads: usize,
    eps: f64,
}

fn tower(v: &Value, which: &str, defaults: (usize, usize)) -> Result<Tower, EngineError> {
    let c = v.get(which).ok_or_else(|| load_err(format!("config.json: no {which}")))?;
    let int = |k: &str, d: usize| c.get(k).and_then(Value::as_u64).map_or(d, |x| x as usize);
    let t = Tower {
        hidden: int("hidden_size", 768),
        layers: int("num_hidden_layers", defaults.0),
        heads: int("num_attention_heads", defaults.1),
        eps: c.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
    };
    let act = c.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu_pytorch_tanh");
    if act != "gelu_pytorch_tanh" {
        return Err(load_err(format!("config.json: {which}.hidden_act {act:?} (SigLIP uses gelu_pytorch_tanh)")));
    }
    if t.heads == 0 || !t.hidden.is_multiple_of(t.heads) {
        return Err(load_err(format!("config.json: {which}: hidden size {} over {} heads", t.hidden, t.heads)));
    }
    Ok(t)
}

/// A SigLIP model and its tokenizer, computing in f32 on `device`.
pub fn load_siglip(dir: &Path, device: &Device) -> Result<(SiglipModel, SiglipTokenizer), EngineError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| load_err(format!("{}: {e}", path.display())))?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| load_err(format!("{}: {e}", path.display())))?;
    let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "siglip" {
        return Err(load_err(format!("{}: model_type {model_type:?}, not a SiglipModel (\"siglip\")", path.display())));
    }
    let (vt, tt) = (tower(&cfg, "vision_config", (12, 12))?, tower(&cfg, "text_config", (12, 12))?);
    let vc = &cfg["vision_config"];
    let int = |k: &str, d: usize| vc.get(k).and_then(Value::as_u64).map_or(d, |x| x as usize);
    if vc.get("vision_use_head").and_then(Value::as_bool) == Some(false) {
        return Err(load_err("config.json: vision_use_head is false: the tower has no pooling head"));
    }
    let shape = EncoderShape {
        hidden: vt.hidden,
        layers: vt.layers,
        heads: vt.heads,
        image_size: int("image_size", 224),
        patch_size: int("patch_size", 16),
        channels: int("num_channels", 3),
        eps: vt.eps,
    };
    if shape.patch_size == 0 || !shape.image_size.is_multiple_of(shape.patch_size) {
        return Err(load_err(format!(
            "config.json: image size {} over patch size {}",
            shape.image_size, shape.patch_size
        )));
    }
    let (st, _) = open_weights(dir)?;
    let get = |name: &str| f32_tensor(&st, name, device);
    let vision = load_vision_encoder(&st, "vision_model.", &shape, device)?;
    let h = "vision_model.head.";
    // nn.MultiheadAttention keeps q, k, v stacked in one matrix, in that order.
    let in_w = get(&format!("{h}attention.in_proj_weight"))?;
    let in_b = get(&format!("{h}attention.in_proj_bias"))?;
    if in_w.dims() != [3 * vt.hidden, vt.hidden] {
        return Err(load_err(format!("{h}attention.in_proj_weight is {:?}", in_w.dims())));
    }
    let part = |k: usize| -> Result<crate::models::siglip::BiasLinear, EngineError> {
        Ok(crate::models::siglip::BiasLinear {
            weight: in_w.narrow(0, k * vt.hidden, vt.hidden).map_err(load_err)?.contiguous().map_err(load_err)?,
            bias: in_b.narrow(0, k * vt.hidden, vt.hidden).map_err(load_err)?.contiguous().map_err(load_err)?,
        })
    };
    let probe = get(&format!("{h}probe"))?;
    let head = PoolingHead {
        probe: probe.reshape((1, vt.hidden)).map_err(|e| load_err(format!("{h}probe {:?}: {e}", probe.dims())))?,
        q: part(0)?,
        k: part(1)?,
        v: part(2)?,
        out: bias_linear(&st, &format!("{h}attention.out_proj"), device)?,
        layernorm: layer_norm(&st, &format!("{h}layernorm"), vt.eps, device)?,
        fc1: bias_linear(&st, &format!("{h}mlp.fc1"), device)?,
        fc2: bias_linear(&st, &format!("{h}mlp.fc2"), device)?,
    };
    let t = "text_model.";
    let token = get(&format!("{t}embeddings.token_embedding.weight"))?;
    let position = get(&format!("{t}embeddings.position_embedding.weight"))?;
    if token.dim(1).ok() != Some(tt.hidden) || position.dim(1).ok() != Some(tt.hidden) {
        return Err(load_err(format!("text embeddings are {:?} and {:?}", token.dims(), position.dims())));
    }
    let text = TextTower {
        token,
        position,
        layers: encoder_layers(&st, t, tt.layers, tt.eps, device)?,
        final_layer_norm: layer_norm(&st, &format!("{t}final_layer_norm"), tt.eps, device)?,
        head: bias_linear(&st, &format!("{t}head"), device)?,
        num_heads: tt.heads,
    };
    let scalar = |name: &str| -> Result<f32, EngineError> {
        get(name)?
            .flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(load_err)?
            .first()
            .copied()
            .ok_or_else(|| load_err(format!("{name} is empty")))
    };
    let model =
        SiglipModel { vision, head, text, logit_scale: scalar("logit_scale")?, logit_bias: scalar("logit_bias")? };
    let tokenizer = SiglipTokenizer::from_file(&dir.join("tokenizer.json"), model.text.max_length())?;
    Ok((model, tokenizer))
}
