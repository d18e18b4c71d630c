//! Loading Gemma 3 from a GGUF file: hyper-parameters, weights and tokenizer.
//!
//! GGUF files converted by llama.cpp leave out what llama.cpp hard-codes for Gemma 3, so we do
//! the same: the local RoPE base (10k), the layer pattern (every 6th layer global), the query
//! scale (`1/sqrt(head_dim)`, or `1/sqrt(hidden/heads)` for the 27B shape, as llama.cpp does),
//! GELU-tanh, and the output head tied to `token_embd` when `output.weight` is absent. Norm
//! weights in GGUF already contain Gemma's `+1`, so they are used as they are.

use crate::load::config::{TextConfig, GEMMA3_LOCAL_ROPE_BASE};
use crate::models::gemma3::{
    Embedding, Gemma3, Layer, LayerParam, LayerSource, Linear, NumericOptions, RmsNorm, Shard,
};
use crate::tokenizer::spm::{SpmTokenizer, SpmVocab, TokenType};
use crate::EngineError;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Layer count of the 27B shape, for which llama.cpp scales queries by `hidden/heads`.
const GEMMA3_27B_LAYERS: usize = 62;

/// A GGUF file opened: metadata and tensor directory, weights not yet read.
pub struct GgufFile {
    pub content: Content,
    file: std::fs::File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let mut file =
            std::fs::File::open(path).map_err(|e| EngineError::Load(format!("cannot open {}: {e}", path.display())))?;
        let content = Content::read(&mut file)
            .map_err(|e| EngineError::Load(format!("{} is not a readable GGUF file: {e}", path.display())))?;
        Ok(Self { content, file })
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u32(&self, key: &str) -> Result<u32, EngineError> {
        let v = self.meta(key).ok_or_else(|| EngineError::Load(format!("GGUF lacks {key}")))?;
        value_u32(v).ok_or_else(|| EngineError::Load(format!("GGUF {key} is not an integer")))
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(|v| match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            other => value_u32(other).map(f64::from),
        })
    }

    pub fn meta_string(&self, key: &str) -> Option<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    fn tensor(&mut self, name: &str, device: &Device) -> Result<Arc<QTensor>, EngineError> {
        self.content
            .tensor(&mut self.file, name, device)
            .map(Arc::new)
            .map_err(|e| EngineError::Load(format!("tensor {name}: {e}")))
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Hyper-parameters of a `gemma3` GGUF.
    pub fn text_config(&self) -> Result<TextConfig, EngineError> {
        let arch = self.meta_string("general.architecture").unwrap_or("");
        if arch != "gemma3" {
            return Err(EngineError::Load(format!(
                "GGUF architecture is {arch:?}; medbatch runs Gemma 3 (\"gemma3\") models"
            )));
        }
        let k = |s: &str| format!("gemma3.{s}");
        let hidden = self.meta_u32(&k("embedding_length"))? as usize;
        let layers = self.meta_u32(&k("block_count"))? as usize;
        let heads = self.meta_u32(&k("attention.head_count"))? as usize;
        let kv_heads = self.meta_u32(&k("attention.head_count_kv")).unwrap_or(heads as u32) as usize;
        let head_dim = self.meta_u32(&k("attention.key_length")).map(|v| v as usize).unwrap_or(hidden / heads);
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => return Err(EngineError::Load("GGUF lacks token_embd.weight".into())),
        };
        let factor = match self.meta_string(&k("rope.scaling.type")) {
            Some("linear") => self.meta_f64(&k("rope.scaling.factor")).unwrap_or(1.0),
            _ => 1.0,
        };
        let query_pre_attn_scalar = if layers == GEMMA3_27B_LAYERS { (hidden / heads) as f64 } else { head_dim as f64 };
        Ok(TextConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.meta_u32(&k("feed_forward_length"))? as usize,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.meta_f64(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            rope_global_base: self.meta_f64(&k("rope.freq_base")).unwrap_or(1e6),
            rope_global_factor: factor,
            rope_local_base: GEMMA3_LOCAL_ROPE_BASE,
            sliding_window: self.meta_u32(&k("attention.sliding_window")).unwrap_or(4096) as usize,
            layer_is_global: TextConfig::default_layer_pattern(layers),
            query_pre_attn_scalar,
            final_logit_softcap: self.meta_f64(&k("final_logit_softcapping")),
            max_position_embeddings: self.meta_u32(&k("context_length")).unwrap_or(131_072) as usize,
        })
    }

    /// Builds the tokenizer from `tokenizer.ggml.*`.
    pub fn tokenizer(&self) -> Result<SpmTokenizer, EngineError> {
        let model = self.meta_string("tokenizer.ggml.model").unwrap_or("");
        if model != "llama" {
            return Err(EngineError::Load(format!(
                "GGUF tokenizer model {model:?} is not the SentencePiece (\"llama\") kind Gemma uses"
            )));
        }
        let arr = |key: &str| -> Result<&Vec<Value>, EngineError> {
            match self.meta(key) {
                Some(Value::Array(a)) => Ok(a),
                _ => Err(EngineError::Load(format!("GGUF lacks {key}"))),
            }
        };
        let tokens: Vec<String> = arr("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                _ => String::new(),
            })
            .collect();
        let scores: Vec<f32> = match self.meta("tokenizer.ggml.scores") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::F32(x) => *x,
                    _ => 0.0,
                })
                .collect(),
            _ => vec![0.0; tokens.len()],
        };
        let types: Vec<TokenType> = match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| TokenType::from_gguf(value_i32(v).unwrap_or(1))).collect(),
            _ => vec![TokenType::Normal; tokens.len()],
        };
        let opt = |key: &str| self.meta(key).and_then(value_u32);
        let flag = |key: &str, default: bool| match self.meta(key) {
            Some(Value::Bool(b)) => *b,
            _ => default,
        };
        SpmTokenizer::new(SpmVocab {
            bos: opt("tokenizer.ggml.bos_token_id").unwrap_or(2),
            eos: opt("tokenizer.ggml.eos_token_id").unwrap_or(1),
            pad: opt("tokenizer.ggml.padding_token_id"),
            unk: opt("tokenizer.ggml.unknown_token_id"),
            add_bos: flag("tokenizer.ggml.add_bos_token", true),
            add_eos: flag("tokenizer.ggml.add_eos_token", false),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
            tokens,
            scores,
            types,
        })
        .map_err(|e| EngineError::Load(e.to_string()))
    }

    fn norm(&mut self, name: &str, eps: f64, device: &Device) -> Result<RmsNorm, EngineError> {
        let t = self.tensor(name, device)?;
        let w = t
            .dequantize(device)
            .and_then(|w| w.to_dtype(DType::F32))
            .map_err(|e| EngineError::Load(format!("tensor {name}: {e}")))?;
        Ok(RmsNorm::new(w, eps))
    }

    fn linear(&mut self, name: &str, device: &Device) -> Result<Linear, EngineError> {
        let t = self.tensor(name, device)?;
        let t = if t.dtype() == GgmlDType::Q5_0 { Arc::new(q5_0_to_q8_0(&t, device)?) } else { t };
        Linear::from_qtensor(t).map_err(|e| EngineError::Load(format!("tensor {name}: {e}")))
    }

    /// Reads every weight and builds the model.
    pub fn load_model(&mut self, device: &Device, numeric: NumericOptions) -> Result<Gemma3, EngineError> {
        let cfg = self.text_config()?;
        let eps = cfg.rms_norm_eps;
        let embed_q = self.tensor("token_embd.weight", device)?;
        let lm_head = if self.has_tensor("output.weight") {
            self.linear("output.weight", device)?
        } else {
            Linear::from_qtensor(embed_q.clone()).map_err(|e| EngineError::Load(e.to_string()))?
        };
        let mut source = GgufLayers { file: self, device, eps };
        let layers = (0..cfg.num_layers).map(|i| Layer::load(&mut source, i)).collect::<Result<Vec<_>, _>>()?;
        let norm = self.norm("output_norm.weight", eps, device)?;
        let vocab_rows = cfg.vocab_size;
        let shard =
            Shard::whole(cfg.clone(), Embedding::Quant(embed_q), vocab_rows, layers, lm_head, norm, device.clone());
        Ok(Gemma3 {
            embed_scale: (cfg.hidden_size as f64).sqrt(),
            shards: vec![Arc::new(shard)],
            cfg,
            numeric,
            // Gemma 3 GGUF files hold the text decoder only (llama.cpp keeps the vision
            // tower in a separate projector file).
            image_token_id: None,
            attention_dtype: candle_core::DType::F32,
            device: device.clone(),
            attention: Default::default(),
            runtime: Default::default(),
        })
    }

    /// Bytes of each tensor type, for `describe`-style summaries.
    pub fn bytes_by_type(&self) -> HashMap<String, u64> {
        let mut m = HashMap::new();
        for info in self.content.tensor_infos.values() {
            let n = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            *m.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += n as u64;
        }
        m
    }
}

/// A GGUF file's decoder layers, by llama.cpp's tensor names (`blk.N.*`).
struct GgufLayers<'a> {
    file: &'a mut GgufFile,
    device: &'a Device,
    eps: f64,
}

impl GgufLayers<'_> {
    fn name(layer: usize, p: LayerParam) -> String {
        let s = match p {
            LayerParam::InputNorm => "attn_norm",
            LayerParam::Q => "attn_q",
            LayerParam::K => "attn_k",
            LayerParam::V => "attn_v",
            LayerParam::O => "attn_output",
            LayerParam::QNorm => "attn_q_norm",
            LayerParam::KNorm => "attn_k_norm",
            LayerParam::PostAttentionNorm => "post_attention_norm",
            LayerParam::PreFeedForwardNorm => "ffn_norm",
            LayerParam::Gate => "ffn_gate",
            LayerParam::Up => "ffn_up",
            LayerParam::Down => "ffn_down",
            LayerParam::PostFeedForwardNorm => "post_ffw_norm",
        };
        format!("blk.{layer}.{s}.weight")
    }
}

impl LayerSource for GgufLayers<'_> {
    fn linear(&mut self, layer: usize, p: LayerParam) -> Result<Linear, EngineError> {
        self.file.linear(&Self::name(layer, p), self.device)
    }

    fn norm(&mut self, layer: usize, p: LayerParam) -> Result<RmsNorm, EngineError> {
        self.file.norm(&Self::name(layer, p), self.eps, self.device)
    }
}

/// Bytes of one Q5_0 block: f16 scale, 32 high bits, 16 bytes of low nibbles.
const Q5_0_BLOCK_BYTES: usize = 22;
/// Bytes of one Q8_0 block: f16 scale, 32 signed bytes.
const Q8_0_BLOCK_BYTES: usize = 34;
const QK: usize = 32;

/// Re-encodes a Q5_0 tensor as Q8_0, losslessly: both formats are `scale × small integer`
/// per block of 32 with the same f16 scale, and every Q5_0 value (-16..=15) fits in an i8.
/// The dot product with Q8_0 activations is then the same integer sum llama.cpp computes
/// for Q5_0, but candle has a SIMD kernel for Q8_0 and only a scalar one for Q5_0 (about
/// 10x slower on the attention and MLP projections of Gemma 3 270M).
fn q5_0_to_q8_0(t: &QTensor, device: &Device) -> Result<QTensor, EngineError> {
    let src = t.data().map_err(|e| EngineError::Load(e.to_string()))?;
    if src.len() % Q5_0_BLOCK_BYTES != 0 {
        return Err(EngineError::Load("Q5_0 tensor size is not a whole number of blocks".into()));
    }
    let mut out = Vec::with_capacity(src.len() / Q5_0_BLOCK_BYTES * Q8_0_BLOCK_BYTES);
    for b in src.chunks_exact(Q5_0_BLOCK_BYTES) {
        let (d, rest) = b.split_at(2);
        let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let qs = &rest[4..];
        out.extend_from_slice(d);
        let mut q = [0i8; QK];
        for j in 0..QK / 2 {
            let hi0 = (((qh >> j) << 4) & 0x10) as u8;
            let hi1 = ((qh >> (j + 12)) & 0x10) as u8;
            q[j] = ((qs[j] & 0x0f) | hi0) as i8 - 16;
            q[j + QK / 2] = ((qs[j] >> 4) | hi1) as i8 - 16;
        }
        out.extend(q.iter().map(|&x| x as u8));
    }
    candle_core::quantized::ggml_file::qtensor_from_ggml(GgmlDType::Q8_0, &out, t.shape().dims().to_vec(), device)
        .map_err(|e| EngineError::Load(e.to_string()))
}

fn value_u32(v: &Value) -> Option<u32> {
    match v {
        Value::U8(x) => Some(*x as u32),
        Value::I8(x) => u32::try_from(*x).ok(),
        Value::U16(x) => Some(*x as u32),
        Value::I16(x) => u32::try_from(*x).ok(),
        Value::U32(x) => Some(*x),
        Value::I32(x) => u32::try_from(*x).ok(),
        Value::U64(x) => u32::try_from(*x).ok(),
        Value::I64(x) => u32::try_from(*x).ok(),
        _ => None,
    }
}

fn value_i32(v: &Value) -> Option<i32> {
    match v {
        Value::I32(x) => Some(*x),
        Value::U32(x) => i32::try_from(*x).ok(),
        Value::I8(x) => Some(*x as i32),
        Value::U8(x) => Some(*x as i32),
        Value::I16(x) => Some(*x as i32),
        Value::U16(x) => Some(*x as i32),
        Value::I64(x) => i32::try_from(*x).ok(),
        Value::U64(x) => i32::try_from(*x).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn q5_0_repack_is_lossless() {
        let dev = Device::Cpu;
        let vals: Vec<f32> = (0..64 * 4).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let x = Tensor::from_vec(vals, (4, 64), &dev).unwrap();
        let q5 = QTensor::quantize(&x, GgmlDType::Q5_0).unwrap();
        let q8 = q5_0_to_q8_0(&q5, &dev).unwrap();
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        let a = q5.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = q8.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
    }
}
