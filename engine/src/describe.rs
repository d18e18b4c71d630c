//! What a model is and what it needs: parameter counts, weight bytes, KV-cache bytes, and
//! the largest batch × context that fits a memory budget. Computed from the config (and the
//! weight files' headers when present), without loading weights.

use crate::load::config::TextConfig;
use crate::load::hf_config::{CheckpointConfig, VisionConfig};
use serde::Serialize;
use std::collections::BTreeMap;

/// Context lengths reported in the capacity table.
pub const CAPACITY_CONTEXTS: [usize; 5] = [2048, 8192, 32_768, 65_536, 131_072];

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Description {
    pub architecture: String,
    pub layers: usize,
    pub global_layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub sliding_window: usize,
    pub vocab_size: usize,
    pub max_context: usize,
    pub params_text: u64,
    pub params_vision: u64,
    pub params_total: u64,
    /// Bytes of weights per stored dtype (`BF16`, `F32`, `Q4K`, …).
    pub weight_bytes: BTreeMap<String, u64>,
    pub weight_bytes_total: u64,
    /// Dtype of the KV cache assumed (bytes per element).
    pub kv_bytes_per_element: u64,
    /// KV bytes each new token adds (global layers; local layers stop growing at the window).
    pub kv_bytes_per_token: u64,
    /// KV bytes of one sequence at `context` tokens.
    pub kv_bytes_at: BTreeMap<usize, u64>,
}

/// The paged KV cache a memory budget gives: its pages and what sequences of each context
/// length take of them (the arithmetic the engine admits sequences by).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KvPool {
    /// Tokens per block (and per page).
    pub block: usize,
    /// Bytes of one page on a device: one block of one layer, keys and values of the KV heads
    /// the device holds.
    pub page_bytes: u64,
    /// Memory left for the pool after the weights, per device.
    pub pool_bytes: u64,
    pub pages: u64,
    pub rows: Vec<PagedCapacity>,
}

/// At `context` tokens: pages a sequence holds (global layers keep every block,
/// sliding-window layers the blocks their window reaches), their bytes, and how many such
/// sequences the pool holds at once.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PagedCapacity {
    pub context: usize,
    pub pages_per_sequence: u64,
    pub kv_bytes_per_sequence: u64,
    pub max_sequences: u64,
    /// Pages a prompt prefix of `context` tokens shared by every sequence saves each one.
    pub pages_saved_by_a_shared_prefix: u64,
}

/// A capacity row: at `context` tokens per sequence, how many sequences fit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Capacity {
    pub context: usize,
    pub kv_bytes_per_sequence: u64,
    pub max_batch: u64,
}

fn text_params(t: &TextConfig, tied: bool) -> u64 {
    let (h, inter, hd) = (t.hidden_size as u64, t.intermediate_size as u64, t.head_dim as u64);
    let q = t.num_heads as u64 * hd;
    let kv = t.num_kv_heads as u64 * hd;
    let per_layer = h * q + 2 * h * kv + q * h + 2 * hd + 4 * h + 3 * h * inter;
    let embed = t.vocab_size as u64 * h;
    embed + t.num_layers as u64 * per_layer + h + if tied { 0 } else { embed }
}

/// SigLIP tower without its head, plus Gemma 3's projector.
fn vision_params(v: &VisionConfig, text_hidden: usize) -> u64 {
    let (hv, iv) = (v.hidden_size as u64, v.intermediate_size as u64);
    let patches = (v.image_size / v.patch_size).pow(2) as u64;
    let patch_embed = v.num_channels as u64 * (v.patch_size as u64).pow(2) * hv + hv;
    let per_layer = 4 * (hv * hv + hv) + 2 * (2 * hv) + (hv * iv + iv) + (iv * hv + hv);
    let projector = hv * text_hidden as u64 + hv;
    patch_embed + patches * hv + v.num_layers as u64 * per_layer + 2 * hv + projector
}

/// Bytes per element of a dtype name as configs and files write it.
pub fn dtype_bytes(name: &str) -> u64 {
    match name.to_ascii_lowercase().as_str() {
        "float32" | "f32" => 4,
        "float16" | "f16" | "bfloat16" | "bf16" => 2,
        "float8_e4m3fn" | "f8_e4m3" | "int8" | "i8" | "u8" => 1,
        _ => 2,
    }
}

impl Description {
    /// Describes a checkpoint from its config. `weight_bytes` are the stored bytes per dtype
    /// when the weight files are at hand; otherwise they are estimated from the config dtype.
    pub fn new(cfg: &CheckpointConfig, weight_bytes: Option<BTreeMap<String, u64>>) -> Self {
        let t = &cfg.text;
        let params_text = text_params(t, cfg.tie_word_embeddings);
        let params_vision = cfg.vision.as_ref().map(|v| vision_params(v, t.hidden_size)).unwrap_or(0);
        let params_total = params_text + params_vision;
        let dtype = cfg.dtype.clone().unwrap_or_else(|| "bfloat16".into());
        let weight_bytes = weight_bytes.unwrap_or_else(|| {
            let mut m = BTreeMap::new();
            m.insert(dtype.to_ascii_uppercase(), params_total * dtype_bytes(&dtype));
            m
        });
        let kv_el = match dtype_bytes(&dtype) {
            4 => 4,
            _ => 2,
        };
        Self::finish(cfg.architecture.clone(), t, params_text, params_vision, weight_bytes, kv_el)
    }

    /// Describes a decoder whose weights sizes are known per type (a GGUF file).
    pub fn from_text(architecture: &str, t: &TextConfig, tied: bool, weight_bytes: BTreeMap<String, u64>) -> Self {
        // GGUF models run on the CPU, where medbatch keeps their f16-rounded keys and values
        // in f32 (read in place by the attention kernel; llama.cpp keeps them in f16).
        Self::finish(architecture.to_string(), t, text_params(t, tied), 0, weight_bytes, 4)
    }

    fn finish(
        architecture: String,
        t: &TextConfig,
        params_text: u64,
        params_vision: u64,
        weight_bytes: BTreeMap<String, u64>,
        kv_el: u64,
    ) -> Self {
        let global_layers = t.layer_is_global.iter().filter(|g| **g).count();
        let per_layer_token = 2 * t.num_kv_heads as u64 * t.head_dim as u64 * kv_el;
        let kv_at = |ctx: usize| {
            let local = (t.num_layers - global_layers) as u64 * per_layer_token * ctx.min(t.sliding_window) as u64;
            global_layers as u64 * per_layer_token * ctx as u64 + local
        };
        let kv_bytes_at =
            CAPACITY_CONTEXTS.iter().filter(|&&c| c <= t.max_position_embeddings).map(|&c| (c, kv_at(c))).collect();
        Self {
            architecture,
            layers: t.num_layers,
            global_layers,
            heads: t.num_heads,
            kv_heads: t.num_kv_heads,
            head_dim: t.head_dim,
            hidden_size: t.hidden_size,
            sliding_window: t.sliding_window,
            vocab_size: t.vocab_size,
            max_context: t.max_position_embeddings,
            params_text,
            params_vision,
            params_total: params_text + params_vision,
            weight_bytes_total: weight_bytes.values().sum(),
            weight_bytes,
            kv_bytes_per_element: kv_el,
            kv_bytes_per_token: global_layers as u64 * per_layer_token,
            kv_bytes_at,
        }
    }

    /// How many sequences of each context length fit in `memory` bytes after the weights.
    pub fn capacity(&self, memory: u64) -> Vec<Capacity> {
        self.capacity_tp(memory, 1)
    }

    /// Weight bytes one device holds with the model split over `tp` tensor-parallel ranks:
    /// the decoder's share (its matrices, embedding and head are split; its norms, a
    /// negligible part, are replicated) plus the whole vision tower, which every rank keeps.
    pub fn weight_bytes_per_rank(&self, tp: usize) -> u64 {
        let tp = tp.max(1) as u64;
        let vision =
            (self.weight_bytes_total as u128 * self.params_vision as u128 / self.params_total.max(1) as u128) as u64;
        (self.weight_bytes_total - vision).div_ceil(tp) + vision
    }

    /// KV heads one rank keeps with `tp` ranks (split, or one replicated when there are fewer
    /// KV heads than ranks).
    pub fn kv_heads_per_rank(&self, tp: usize) -> usize {
        (self.kv_heads / tp.max(1)).max(1)
    }

    /// [`Self::capacity`] for each of `tp` devices of `memory` bytes holding one split model:
    /// a device keeps its share of the weights and of every sequence's KV cache.
    pub fn capacity_tp(&self, memory: u64, tp: usize) -> Vec<Capacity> {
        let free = memory.saturating_sub(self.weight_bytes_per_rank(tp));
        let (kv_rank, kv_all) = (self.kv_heads_per_rank(tp) as u64, self.kv_heads.max(1) as u64);
        self.kv_bytes_at
            .iter()
            .map(|(&context, &whole)| {
                let per_seq = whole * kv_rank / kv_all;
                Capacity { context, kv_bytes_per_sequence: per_seq, max_batch: free / per_seq.max(1) }
            })
            .collect()
    }
}

impl Description {
    /// The paged KV pool of `tp` devices of `memory` bytes each with blocks of `block` tokens.
    pub fn kv_pool(&self, memory: u64, tp: usize, block: usize) -> KvPool {
        let pool_bytes = memory.saturating_sub(self.weight_bytes_per_rank(tp));
        let page_bytes = (2 * block * self.kv_heads_per_rank(tp) * self.head_dim) as u64 * self.kv_bytes_per_element;
        let pages = pool_bytes / page_bytes.max(1);
        let layout = crate::kv::KvLayout {
            block,
            pages: pages as usize,
            layer_is_global: (0..self.layers).map(|i| i < self.global_layers).collect(),
            window: self.sliding_window,
            page_bytes,
        };
        let rows = self
            .kv_bytes_at
            .keys()
            .map(|&context| {
                let per_seq = layout.pages_for(context, 0) as u64;
                PagedCapacity {
                    context,
                    pages_per_sequence: per_seq,
                    kv_bytes_per_sequence: per_seq * page_bytes,
                    max_sequences: pages / per_seq.max(1),
                    pages_saved_by_a_shared_prefix: (self.global_layers * (context / block)) as u64,
                }
            })
            .collect();
        KvPool { block, page_bytes, pool_bytes, pages, rows }
    }
}

/// Parses a memory size: `80GiB`, `141GB`, `24G`, `512MiB`, or a number of bytes.
pub fn parse_memory(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024f64.powi(2),
        "mb" => 1e6,
        "g" | "gib" => 1024f64.powi(3),
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        _ => return None,
    };
    Some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_parallel_shares() {
        let cfg = crate::load::hf_config::parse_config(
            r#"{"architectures":["Gemma3ForCausalLM"],"model_type":"gemma3_text","hidden_size":5376,
                "intermediate_size":21504,"num_hidden_layers":62,"num_attention_heads":32,
                "num_key_value_heads":16,"head_dim":128,"vocab_size":262208,"sliding_window":1024}"#,
        )
        .unwrap();
        let d = Description::new(&cfg, None);
        assert_eq!(d.weight_bytes_per_rank(1), d.weight_bytes_total);
        assert_eq!(d.weight_bytes_per_rank(4), d.weight_bytes_total.div_ceil(4));
        assert_eq!((d.kv_heads_per_rank(4), d.kv_heads_per_rank(32)), (4, 1));
        let one = d.capacity_tp(80 << 30, 1);
        let two = d.capacity_tp(80 << 30, 2);
        assert_eq!(two[0].kv_bytes_per_sequence * 2, one[0].kv_bytes_per_sequence);
        assert!(two[0].max_batch > 2 * one[0].max_batch, "freed weight memory holds more sequences");
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("80GiB"), Some(80 << 30));
        assert_eq!(parse_memory("141GB"), Some(141_000_000_000));
        assert_eq!(parse_memory("1.5G"), Some(3 << 29));
        assert_eq!(parse_memory("12"), Some(12));
        assert_eq!(parse_memory("lots"), None);
    }
}
