//! Gemma 3 text-decoder hyper-parameters, whatever file they come from.

/// Number of layers in a local/global cycle: every 6th layer attends globally.
pub const GEMMA3_SLIDING_WINDOW_PATTERN: usize = 6;
/// RoPE base of the sliding-window (local) layers; GGUF files do not record it.
pub const GEMMA3_LOCAL_ROPE_BASE: f64 = 10_000.0;

/// The text decoder's shape and conventions (HF `Gemma3TextConfig`, resolved).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE base of global layers.
    pub rope_global_base: f64,
    /// Linear RoPE scaling factor of global layers (1 = none).
    pub rope_global_factor: f64,
    /// RoPE base of local layers (never scaled).
    pub rope_local_base: f64,
    /// Tokens a local layer attends to, the query included.
    pub sliding_window: usize,
    /// `true` where a layer attends to the whole context.
    pub layer_is_global: Vec<bool>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
    pub final_logit_softcap: Option<f64>,
    pub max_position_embeddings: usize,
}

impl TextConfig {
    /// Gemma 3's default layer pattern: layer `i` is global when `(i + 1) % 6 == 0`.
    pub fn default_layer_pattern(num_layers: usize) -> Vec<bool> {
        (0..num_layers).map(|i| (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0).collect()
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
