//! The image side of `Gemma3ForConditionalGeneration` (MedGemma 4B, 1.5 4B, 27B multimodal):
//! a SigLIP vision transformer without its pooling head, and Gemma 3's multi-modal projector.
//!
//! ```text
//! pixels [3, S, S] → patches (conv k = s = patch, with bias) [P², D] + position table
//!   → L × { x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x)))) } → post LayerNorm
//!   → average pool of the P×P grid to T×T (T² = mm_tokens_per_image)
//!   → RMSNorm with (1 + w) → × mm_input_projection_weight [D, text hidden]
//! ```
//! The result is one row per image soft token, scattered into the embedded prompt (after
//! the embedding scale, so image rows are not scaled).
//!
//! Written on candle-core rather than taken from candle-transformers' `siglip`: that module
//! fits the weights but pulls in candle-nn and every model of candle-transformers for about a
//! hundred lines, runs its softmax in the weights' dtype (transformers upcasts to f32), and
//! materialises all heads' 4096×4096 score matrices at once (1 GiB per layer at MedGemma's
//! shape). Here the scores are computed a few heads at a time.

use crate::load::hf_config::VisionConfig;
use crate::models::gemma3::RmsNorm;
use candle_core::{Device, Tensor, D};

/// Score matrices of one attention group are kept under this many bytes: below the
/// largest block the binary's allocator serves from its heap (32 MiB, src/main.rs), so the
/// scores, their exponentials and the probabilities reuse memory instead of fresh pages.
const SCORE_BUDGET_BYTES: usize = 24 << 20;

/// LayerNorm with bias (biased variance, as torch computes it), in f32.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// A linear layer with bias: `weight` `[out, in]`, `bias` `[out]`.
pub struct BiasLinear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl BiasLinear {
    /// `x · Wᵀ + b` for `x` of shape `[rows, in]` or `[batch, rows, in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.rank() == 3 {
            // One matrix product over every row of the batch.
            let (b, rows, inp) = x.dims3()?;
            let y = x.reshape((b * rows, inp))?.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
            return y.reshape((b, rows, self.weight.dim(0)?));
        }
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

pub struct VisionLayer {
    pub layer_norm1: LayerNorm,
    pub q: BiasLinear,
    pub k: BiasLinear,
    pub v: BiasLinear,
    pub out: BiasLinear,
    pub layer_norm2: LayerNorm,
    pub fc1: BiasLinear,
    pub fc2: BiasLinear,
}

/// The SigLIP vision transformer up to its post LayerNorm: the part MedSigLIP's image tower
/// and Gemma 3's vision side share.
pub struct VisionEncoder {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub num_heads: usize,
    /// Patch embedding as a matrix `[hidden, channels·patch·patch]` (the conv kernel
    /// flattened in (channel, row, column) order) and its bias.
    pub patch: BiasLinear,
    /// `[patches, hidden]`, patches in row-major order.
    pub position: Tensor,
    pub layers: Vec<VisionLayer>,
    pub post_layernorm: LayerNorm,
    pub device: Device,
}

impl VisionEncoder {
    /// Patches along one side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The hidden states of one image given as `pixel_values` (CHW f32 of `image_size`²,
    /// already resized and normalised): `[patches, hidden]`.
    pub fn forward(&self, pixel_values: &[f32]) -> candle_core::Result<Tensor> {
        self.forward_batch(&[pixel_values])?.squeeze(0)
    }

    /// The hidden states of several images at once: `[images, patches, hidden]`.
    pub fn forward_batch(&self, images: &[&[f32]]) -> candle_core::Result<Tensor> {
        let (s, p, ch) = (self.image_size, self.patch_size, self.num_channels);
        let n = self.patches_per_side();
        let mut rows = Vec::with_capacity(images.len());
        for pixel_values in images {
            if pixel_values.len() != ch * s * s {
                candle_core::bail!("pixel values hold {} numbers, the tower takes {ch}×{s}×{s}", pixel_values.len());
            }
            // [C, n, p, n, p] → [n(row), n(col), C, p, p] → one row per patch.
            let px = Tensor::from_slice(pixel_values, (ch, n, p, n, p), &self.device)?;
            rows.push(px.permute((1, 3, 0, 2, 4))?.contiguous()?.reshape((n * n, ch * p * p))?);
        }
        let rows = Tensor::stack(&rows, 0)?;
        let x = self.patch.forward(&rows)?.broadcast_add(&self.position)?;
        let x = encoder(&self.layers, self.num_heads, x, "vision_layer")?;
        self.post_layernorm.forward(&x)
    }
}

/// Pre-norm transformer layers without a mask (SigLIP's vision and text towers):
/// `x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x))))`.
pub fn encoder(layers: &[VisionLayer], heads: usize, mut x: Tensor, span: &'static str) -> candle_core::Result<Tensor> {
    for (i, layer) in layers.iter().enumerate() {
        let _span = tracing::trace_span!("layer", kind = span, i).entered();
        let h = layer.layer_norm1.forward(&x)?;
        let h = attention([&layer.q, &layer.k, &layer.v, &layer.out], heads, &h, &h)?;
        x = (x + h)?;
        let h = layer.layer_norm2.forward(&x)?;
        let h = layer.fc2.forward(&layer.fc1.forward(&h)?.gelu()?)?;
        x = (x + h)?;
    }
    Ok(x)
}

/// Multi-head attention of the rows of `queries` over those of `keys` (keys and values from
/// the same rows, no mask), a few heads at a time, through the output projection:
/// `[q, k, v, out]` projections with bias. Inputs are `[rows, hidden]` or, for a batch,
/// `[batch, rows, hidden]` (each item attends within itself).
pub fn attention(
    [wq, wk, wv, wo]: [&BiasLinear; 4],
    heads: usize,
    queries: &Tensor,
    keys: &Tensor,
) -> candle_core::Result<Tensor> {
    if queries.rank() == 2 {
        return attention([wq, wk, wv, wo], heads, &queries.unsqueeze(0)?, &keys.unsqueeze(0)?)?.squeeze(0);
    }
    let (b, m, hidden) = queries.dims3()?;
    let n = keys.dim(1)?;
    let hd = hidden / heads;
    let split = |t: Tensor, rows: usize| t.reshape((b, rows, heads, hd))?.transpose(1, 2)?.contiguous();
    let q = (split(wq.forward(queries)?, m)? * (hd as f64).powf(-0.5))?;
    let k = split(wk.forward(keys)?, n)?;
    let v = split(wv.forward(keys)?, n)?;
    let group = (SCORE_BUDGET_BYTES / (b * m * n * 4).max(1)).clamp(1, heads);
    let mut outs = Vec::with_capacity(heads.div_ceil(group));
    for h0 in (0..heads).step_by(group) {
        let g = group.min(heads - h0);
        let (qg, kg, vg) = (q.narrow(1, h0, g)?, k.narrow(1, h0, g)?, v.narrow(1, h0, g)?);
        let scores = qg.matmul(&kg.t()?)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        outs.push(probs.matmul(&vg)?);
    }
    let out = if outs.len() == 1 { outs.pop().expect("one group") } else { Tensor::cat(&outs, 1)? };
    wo.forward(&out.transpose(1, 2)?.reshape((b, m, hidden))?)
}

/// The vision tower and the projector of a multimodal checkpoint.
pub struct VisionTower {
    pub cfg: VisionConfig,
    pub encoder: VisionEncoder,
    /// The projector's `mm_soft_emb_norm`, `1 + w` resolved.
    pub soft_emb_norm: RmsNorm,
    /// `mm_input_projection_weight`, `[vision hidden, text hidden]` (used as is, not
    /// transposed).
    pub projection: Tensor,
}

impl VisionTower {
    /// Patches along one side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.encoder.patches_per_side()
    }

    /// Soft tokens per image along one side (the pooled grid).
    pub fn tokens_per_side(&self) -> usize {
        (self.cfg.mm_tokens_per_image as f64).sqrt().round() as usize
    }

    /// Checks that the shapes fit together (square token grid dividing the patch grid).
    pub fn check_shape(cfg: &VisionConfig) -> Result<(), String> {
        let side = (cfg.mm_tokens_per_image as f64).sqrt().round() as usize;
        let patches = cfg.image_size / cfg.patch_size.max(1);
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(format!("image size {} is not a multiple of patch size {}", cfg.image_size, cfg.patch_size));
        }
        if side * side != cfg.mm_tokens_per_image || side == 0 || !patches.is_multiple_of(side) {
            return Err(format!(
                "mm_tokens_per_image {} is not a square whose side divides the {patches}×{patches} patch grid",
                cfg.mm_tokens_per_image
            ));
        }
        if cfg.num_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            return Err(format!("vision hidden size {} is not a multiple of {} heads", cfg.hidden_size, cfg.num_heads));
        }
        Ok(())
    }

    /// The soft-token embeddings of one image given as `pixel_values` (CHW f32 of
    /// `image_size`², already resized and normalised): `[mm_tokens_per_image, text hidden]`.
    pub fn encode(&self, pixel_values: &[f32]) -> candle_core::Result<Tensor> {
        let x = self.encoder.forward(pixel_values)?;
        self.project(&x)
    }

    /// Average-pools the patch grid to the token grid, normalises and projects.
    fn project(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = self.patches_per_side();
        let t = self.tokens_per_side();
        let k = n / t;
        let d = x.dim(1)?;
        let pooled = (x.reshape((t, k, t, k, d))?.sum(3)?.sum(1)? / (k * k) as f64)?.reshape((t * t, d))?;
        self.soft_emb_norm.forward(&pooled)?.matmul(&self.projection)
    }
}

/// SigLIP's attention-pooling head: a learned probe attends over the tower's hidden states,
/// then `x + mlp(LN(x))`; the pooled image vector.
pub struct PoolingHead {
    /// `[1, hidden]`.
    pub probe: Tensor,
    pub q: BiasLinear,
    pub k: BiasLinear,
    pub v: BiasLinear,
    pub out: BiasLinear,
    pub layernorm: LayerNorm,
    pub fc1: BiasLinear,
    pub fc2: BiasLinear,
}

impl PoolingHead {
    /// The pooled vectors of a batch of hidden states `[batch, patches, hidden]`:
    /// `[batch, hidden]`.
    pub fn forward(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let probe = self.probe.unsqueeze(0)?.broadcast_as((b, 1, self.probe.dim(1)?))?.contiguous()?;
        let h = attention([&self.q, &self.k, &self.v, &self.out], heads, &probe, x)?;
        let m = self.fc2.forward(&self.fc1.forward(&self.layernorm.forward(&h)?)?.gelu()?)?;
        (h + m)?.squeeze(1)
    }
}

/// SigLIP's text tower: token and position embeddings, the encoder (no mask: pad tokens take
/// part, as in the reference), the final LayerNorm, the last position's state through the
/// head.
pub struct TextTower {
    /// `[vocab, hidden]`.
    pub token: Tensor,
    /// `[max_length, hidden]`.
    pub position: Tensor,
    pub layers: Vec<VisionLayer>,
    pub final_layer_norm: LayerNorm,
    pub head: BiasLinear,
    pub num_heads: usize,
}

impl TextTower {
    /// The sequence length the tower reads (its position table).
    pub fn max_length(&self) -> usize {
        self.position.dim(0).unwrap_or(0)
    }

    /// The pooled (unnormalised) embedding of one token sequence.
    pub fn forward(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        self.forward_batch(&[ids])?.squeeze(0)
    }

    /// The pooled embeddings of several sequences of one length: `[texts, hidden]`.
    pub fn forward_batch(&self, texts: &[&[u32]]) -> candle_core::Result<Tensor> {
        let (vocab, hidden) = self.token.dims2()?;
        let len = texts.first().map_or(0, |t| t.len());
        if len == 0 || len > self.max_length() || texts.iter().any(|t| t.len() != len) {
            candle_core::bail!("texts of 1 to {} tokens, all of one length, are read", self.max_length());
        }
        let flat: Vec<u32> = texts.iter().flat_map(|t| t.iter().copied()).collect();
        if let Some(bad) = flat.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        let idx = Tensor::from_slice(&flat, flat.len(), self.token.device())?;
        let x = self.token.index_select(&idx, 0)?.reshape((texts.len(), len, hidden))?;
        let x = x.broadcast_add(&self.position.narrow(0, 0, len)?)?;
        let x = encoder(&self.layers, self.num_heads, x, "text_layer")?;
        let x = self.final_layer_norm.forward(&x)?;
        let last = x.narrow(1, len - 1, 1)?.squeeze(1)?;
        self.head.forward(&last)
    }
}

/// A whole SigLIP model (MedSigLIP): image and text towers in one space, with the logit
/// scale (stored as its log) and bias of the sigmoid loss.
pub struct SiglipModel {
    pub vision: VisionEncoder,
    pub head: PoolingHead,
    pub text: TextTower,
    pub logit_scale: f32,
    pub logit_bias: f32,
}

impl SiglipModel {
    /// The pooled, unnormalised embedding of one image (`pixel_values`: CHW f32 of the
    /// tower's size, normalised to [-1, 1]).
    pub fn image_features(&self, pixel_values: &[f32]) -> candle_core::Result<Vec<f32>> {
        Ok(self.image_features_batch(&[pixel_values])?.pop().expect("one image"))
    }

    /// The pooled, unnormalised embeddings of several images in one batch.
    pub fn image_features_batch(&self, images: &[&[f32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let x = self.vision.forward_batch(images)?;
        self.head.forward(&x, self.vision.num_heads)?.to_vec2()
    }

    /// The pooled, unnormalised embedding of one token sequence.
    pub fn text_features(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        Ok(self.text_features_batch(&[ids])?.pop().expect("one text"))
    }

    /// The pooled, unnormalised embeddings of several token sequences of one length (the
    /// tokenizer's fixed length) in one batch.
    pub fn text_features_batch(&self, texts: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        self.text.forward_batch(texts)?.to_vec2()
    }

    /// `logit_scale.exp() · ⟨text, image⟩ + logit_bias` of two L2-normalised embeddings: the
    /// logit whose sigmoid is the probability that the text describes the image.
    pub fn logit(&self, image: &[f32], text: &[f32]) -> f32 {
        let dot: f32 = image.iter().zip(text).map(|(a, b)| a * b).sum();
        self.logit_scale.exp() * dot + self.logit_bias
    }
}

/// `v / ‖v‖₂` (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_formula() {
        let dev = Device::Cpu;
        let ln = LayerNorm {
            weight: Tensor::new(&[1f32, 2.0, 0.5], &dev).unwrap(),
            bias: Tensor::new(&[0f32, 1.0, -1.0], &dev).unwrap(),
            eps: 1e-6,
        };
        let y = ln.forward(&Tensor::new(&[[1f32, 2.0, 6.0]], &dev).unwrap()).unwrap();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = 3.0f32;
        let var = ((1.0f32 - mean).powi(2) + (2.0f32 - mean).powi(2) + (6.0f32 - mean).powi(2)) / 3.0;
        let sd = (var + 1e-6).sqrt();
        let want = [(1.0 - mean) / sd, (2.0 - mean) / sd * 2.0 + 1.0, (6.0 - mean) / sd * 0.5 - 1.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn shapes_must_pool_evenly() {
        let mut cfg = VisionConfig::siglip_896();
        assert!(VisionTower::check_shape(&cfg).is_ok());
        cfg.mm_tokens_per_image = 255;
        assert!(VisionTower::check_shape(&cfg).is_err());
        cfg.mm_tokens_per_image = 9; // 3 does not divide 64
        assert!(VisionTower::check_shape(&cfg).is_err());
        cfg.mm_tokens_per_image = 256;
        cfg.patch_size = 15;
        assert!(VisionTower::check_shape(&cfg).is_err());
    }
}
