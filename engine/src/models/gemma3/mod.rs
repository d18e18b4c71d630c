//! Gemma 3 text decoder (`Gemma3ForCausalLM`), written to match Hugging Face transformers'
//! `modeling_gemma3.py` and llama.cpp's `gemma3` graph.
//!
//! Per layer, with sandwich norms:
//! ```text
//! h = x + post_attn_norm(attn(input_norm(x)))
//! y = h + post_ff_norm(down(gelu_tanh(gate(pre_ff_norm(h))) * up(pre_ff_norm(h))))
//! ```
//! Attention applies RMS norms to q and k per head before RoPE, scales scores by
//! `query_pre_attn_scalar^-0.5`, uses RoPE base 10k on local layers (a sliding window of
//! exactly `W` tokens, the query included) and the global base with linear scaling on
//! global layers. Embeddings are multiplied by `sqrt(hidden)`; the output head is tied to the
//! embedding unless the checkpoint has its own.
//!
//! The model owns no sequence state: callers pass a [`SeqCache`] per sequence.
//!
//! - [`layers`]: RMSNorm, attention, MLP and the decoder layer, each loading itself;
//! - [`linear`]: quantized and dense linear layers, the embedding table;
//! - [`shard`]: one tensor-parallel rank's share of the weights.

pub mod layers;
pub mod linear;
pub mod shard;

pub use layers::{Attention, Layer, LayerParam, LayerSource, Mlp, RmsNorm};
pub use linear::{Embedding, Linear, QuantBlocks};
pub use shard::Shard;

use crate::kv::{LayerCache, SeqCache};
use crate::load::config::TextConfig;
use candle_core::{DType, Device, Tensor, D};
use layers::LayerPass;

/// Numeric options that trade exactness against one reference or another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumericOptions {
    /// Round q, k, v and attention probabilities to f16, as llama.cpp does with its default
    /// f16 KV cache. Off for parity with transformers in f32.
    pub f16_attention: bool,
    /// Compute GELU as llama.cpp's CPU backend does: from a table indexed by the f16-rounded
    /// input, returning an f16 value, exact (identity/zero) beyond ±10.
    pub f16_gelu: bool,
}

/// The decoder: one shard per tensor-parallel rank (one without tensor parallelism). Ranks
/// run as threads of this process, one forward pass each, in step through their
/// communicator.
pub struct Gemma3 {
    pub cfg: TextConfig,
    pub shards: Vec<Shard>,
    pub embed_scale: f64,
    pub numeric: NumericOptions,
    /// `<image_soft_token>` of a multimodal checkpoint: positions holding it take the rows of
    /// an image instead of an embedding, and each run of them attends to itself both ways
    /// while the prompt is read. `None` for text-only models.
    pub image_token_id: Option<u32>,
    /// Dtype of cached keys and values and of the two attention products (`q·kᵀ`, `p·v`):
    /// f32, or the weights' bf16/f16 on a GPU, where the cache is read whole every step.
    /// Scores are widened to f32 for the mask and softmax either way.
    pub attention_dtype: DType,
    pub device: Device,
}

/// One sequence's part of a batched forward pass.
pub struct BatchItem<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut SeqCache,
    pub logits: Logits,
    /// Rows for the image soft tokens among `ids`, in order (`[count, hidden]`); required
    /// when `ids` holds any. A run of soft tokens must not be split between passes.
    pub images: Option<&'a Tensor>,
}

impl<'a> BatchItem<'a> {
    /// An item without images.
    pub fn text(ids: &'a [u32], cache: &'a mut SeqCache, logits: Logits) -> Self {
        Self { ids, cache, logits, images: None }
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position of the chunk (parity tests).
    All,
    /// None (a prompt chunk that does not end the prompt).
    None,
}

pub(crate) fn round_f16(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

/// cos/sin tables for `positions`, shape `[n, head_dim / 2]`, computed in f64 and rounded
/// once to f32 (both references compute them in f32 from the same formula).
fn rope_tables(
    positions: impl ExactSizeIterator<Item = usize>,
    head_dim: usize,
    base: f64,
    factor: f64,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let n = positions.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in positions {
        for i in 0..half {
            let inv_freq = 1.0 / base.powf((2 * i) as f64 / head_dim as f64) / factor;
            let a = p as f64 * inv_freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((Tensor::from_vec(cos, (n, half), device)?, Tensor::from_vec(sin, (n, half), device)?))
}

/// Rotate-half RoPE on `x`: `[heads, n, d]` with tables `[n, d/2]`.
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

/// cos/sin tables of one item's positions, for local and global layers.
pub(crate) struct Rope {
    pub local: (Tensor, Tensor),
    pub global: (Tensor, Tensor),
}

/// What every rank needs to know of one item of a pass.
pub(crate) struct ItemView<'a> {
    pub ids: &'a [u32],
    pub pos0: usize,
    pub logits: Logits,
    pub images: Option<&'a Tensor>,
}

/// The inputs of a pass shared by every rank.
struct Pass<'a> {
    views: &'a [ItemView<'a>],
    groups: &'a [Vec<Option<u32>>],
}

impl Gemma3 {
    /// Runs `ids` (the next tokens of one sequence) through the model, appending to `cache`.
    /// Returns logits `[1, vocab]` or `[ids.len(), vocab]`.
    pub fn forward(&self, ids: &[u32], cache: &mut SeqCache, which: Logits) -> candle_core::Result<Tensor> {
        let mut out = self.forward_batch(&mut [BatchItem::text(ids, cache, which)])?;
        out.pop().flatten().ok_or_else(|| candle_core::Error::Msg("no logits requested".into()))
    }

    /// Runs the next tokens of several sequences in one pass: their rows are packed through
    /// the embedding, projections, norms and MLP; attention runs per sequence with its own
    /// positions, window and cache. Returns each item's logits (`[1, vocab]`, `[n, vocab]`,
    /// or none), in order. Every row is computed as it would be alone. With several ranks,
    /// each runs the pass on its shard in a thread of its own.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> candle_core::Result<Vec<Option<Tensor>>> {
        if items.is_empty() || items.iter().any(|b| b.ids.is_empty()) {
            candle_core::bail!("forward called with no tokens");
        }
        let views: Vec<ItemView<'_>> = items
            .iter()
            .map(|b| ItemView { ids: b.ids, pos0: b.cache.pos, logits: b.logits, images: b.images })
            .collect();
        // Image runs of each item (prefill only: a single-token step never holds an image).
        let groups: Vec<Vec<Option<u32>>> = views.iter().map(|b| self.image_groups(b.ids)).collect();
        let pass = Pass { views: &views, groups: &groups };
        // Each rank's caches of every item.
        let world = self.shards.len();
        let mut per_rank: Vec<Vec<&mut Vec<LayerCache>>> =
            (0..world).map(|_| Vec::with_capacity(items.len())).collect();
        for b in items.iter_mut() {
            if b.cache.ranks.len() != world {
                candle_core::bail!("a cache made for {} ranks used with {world}", b.cache.ranks.len());
            }
            for (r, c) in b.cache.ranks.iter_mut().enumerate() {
                per_rank[r].push(c);
            }
        }
        let logits = if world == 1 {
            let caches = per_rank.pop().expect("one rank");
            self.forward_shard(&self.shards[0], &pass, caches)?
        } else {
            let results: Vec<candle_core::Result<Option<Tensor>>> = std::thread::scope(|sc| {
                let handles: Vec<_> = self
                    .shards
                    .iter()
                    .zip(per_rank)
                    .map(|(shard, caches)| {
                        let pass = &pass;
                        sc.spawn(move || {
                            // A rank that errs or panics breaks the group, so that the others
                            // return from their collectives instead of waiting for it.
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                self.forward_shard(shard, pass, caches)
                            }))
                            .unwrap_or_else(|_| Err(candle_core::Error::Msg("the rank's thread panicked".into())));
                            if let Err(e) = &r {
                                shard.comm.abort(&e.to_string());
                            }
                            r
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(candle_core::Error::Msg("a rank panicked".into()))))
                    .collect()
            });
            // Every rank ends with the same logits; rank 0's are returned.
            let mut first = None;
            for r in results {
                let l = r?;
                first.get_or_insert(l);
            }
            first.flatten()
        };
        let mut out = Vec::with_capacity(items.len());
        let mut off = 0;
        for b in items.iter_mut() {
            let t = b.ids.len();
            b.cache.pos += t;
            let n = match b.logits {
                Logits::Last => 1,
                Logits::All => t,
                Logits::None => 0,
            };
            match &logits {
                Some(l) if n > 0 => {
                    out.push(Some(l.narrow(0, off, n)?));
                    off += n;
                }
                _ => out.push(None),
            }
        }
        Ok(out)
    }

    /// One rank's pass over its shard; returns the logits (whole vocabulary) of the rows
    /// asked for, or none.
    fn forward_shard(
        &self,
        shard: &Shard,
        pass: &Pass<'_>,
        mut caches: Vec<&mut Vec<LayerCache>>,
    ) -> candle_core::Result<Option<Tensor>> {
        let views = pass.views;
        let (cfg, dev) = (&self.cfg, &shard.device);
        // The tables of every row of the pass are made at once (one copy to the device), then
        // each item takes its rows.
        let positions: Vec<usize> = views.iter().flat_map(|b| b.pos0..b.pos0 + b.ids.len()).collect();
        let local = rope_tables(positions.iter().copied(), cfg.head_dim, cfg.rope_local_base, 1.0, dev)?;
        let global =
            rope_tables(positions.iter().copied(), cfg.head_dim, cfg.rope_global_base, cfg.rope_global_factor, dev)?;
        let mut ropes = Vec::with_capacity(views.len());
        let mut off = 0;
        for b in views {
            let t = b.ids.len();
            let rows = |(c, s): &(Tensor, Tensor)| -> candle_core::Result<(Tensor, Tensor)> {
                Ok((c.narrow(0, off, t)?, s.narrow(0, off, t)?))
            };
            ropes.push(Rope { local: rows(&local)?, global: rows(&global)? });
            off += t;
        }
        let all_ids: Vec<u32> = views.iter().flat_map(|b| b.ids.iter().copied()).collect();
        let mut x = self.embed_with_images(shard, views, &all_ids)?;
        let layer_pass = LayerPass {
            cfg: &shard.cfg,
            numeric: self.numeric,
            attention_dtype: self.attention_dtype,
            comm: shard.comm.as_ref(),
            items: views,
            ropes: &ropes,
            groups: pass.groups,
            device: dev,
        };
        for (i, layer) in shard.layers.iter().enumerate() {
            x = layer.forward(i, &x, &layer_pass, &mut caches)?;
        }
        // Only the rows whose logits are wanted go through the output head.
        let mut rows = Vec::with_capacity(views.len());
        let mut off = 0;
        for b in views {
            let t = b.ids.len();
            match b.logits {
                Logits::Last => rows.push(x.narrow(0, off + t - 1, 1)?),
                Logits::All => rows.push(x.narrow(0, off, t)?),
                Logits::None => {}
            }
            off += t;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let x = if rows.len() == 1 { rows.pop().expect("one") } else { Tensor::cat(&rows, 0)? };
        let x = shard.norm.forward(&x)?;
        let mut logits = shard.comm.all_gather_last(&shard.lm_head.forward(&x.contiguous()?)?)?;
        if let Some(cap) = self.cfg.final_logit_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(Some(logits))
    }

    /// The scaled embeddings of every item's ids, with image rows in place of the image soft
    /// tokens (not scaled: transformers scatters the projected image features after the
    /// embedding scale).
    fn embed_with_images(&self, shard: &Shard, items: &[ItemView<'_>], all_ids: &[u32]) -> candle_core::Result<Tensor> {
        let soft = self.image_token_id;
        // A soft-token id outside the vocabulary (tiny test vocabularies) is looked up as 0,
        // as transformers does; its row is replaced anyway.
        let lookup: Vec<u32> =
            all_ids.iter().map(|&t| if Some(t) == soft && t as usize >= self.cfg.vocab_size { 0 } else { t }).collect();
        let x = (self.embed_rows(shard, &lookup)? * self.embed_scale)?;
        let Some(soft) = soft else { return Ok(x) };
        if !all_ids.contains(&soft) {
            return Ok(x);
        }
        // Rows of `x` followed by every image row; each position picks its row by index.
        let n = all_ids.len();
        let mut table = vec![x];
        let mut index = Vec::with_capacity(n);
        let (mut off, mut extra) = (0usize, n);
        for b in items {
            let count = b.ids.iter().filter(|&&t| t == soft).count();
            let rows = match (count, b.images) {
                (0, _) => 0,
                (c, Some(img)) if img.dim(0)? == c => {
                    table.push(img.to_dtype(DType::F32)?.to_device(&shard.device)?);
                    c
                }
                (c, Some(img)) => {
                    candle_core::bail!("{c} image soft tokens in the prompt, {} image rows given", img.dim(0)?)
                }
                (c, None) => candle_core::bail!("{c} image soft tokens in the prompt but no image given"),
            };
            let mut k = 0;
            for (j, &t) in b.ids.iter().enumerate() {
                if t == soft {
                    index.push((extra + k) as u32);
                    k += 1;
                } else {
                    index.push((off + j) as u32);
                }
            }
            off += b.ids.len();
            extra += rows;
        }
        let table = Tensor::cat(&table, 0)?;
        table.index_select(&Tensor::new(index.as_slice(), &shard.device)?, 0)
    }

    /// Embedding rows of `ids` (f32, unscaled). A shard holding part of the vocabulary looks
    /// up its own rows, zeros for the others, and the ranks' rows are summed.
    fn embed_rows(&self, shard: &Shard, ids: &[u32]) -> candle_core::Result<Tensor> {
        if shard.comm.world() == 1 {
            let ids_t = Tensor::new(ids, &shard.device)?;
            return shard.embed.lookup(&ids_t)?.to_dtype(DType::F32);
        }
        let (lo, n) = (shard.vocab_start, shard.vocab_rows);
        let held = |t: u32| (t as usize) >= lo && (t as usize) < lo + n;
        let local: Vec<u32> = ids.iter().map(|&t| if held(t) { t - lo as u32 } else { 0 }).collect();
        let mine: Vec<f32> = ids.iter().map(|&t| if held(t) { 1.0 } else { 0.0 }).collect();
        let rows = shard.embed.lookup(&Tensor::new(local.as_slice(), &shard.device)?)?.to_dtype(DType::F32)?;
        let mask = Tensor::from_vec(mine, (ids.len(), 1), &shard.device)?;
        shard.comm.all_reduce_sum(&rows.broadcast_mul(&mask)?)
    }

    /// For each position of a prompt chunk, the image run it belongs to (numbered from 0
    /// within the chunk), or `None` for text.
    fn image_groups(&self, ids: &[u32]) -> Vec<Option<u32>> {
        let Some(soft) = self.image_token_id else { return Vec::new() };
        if ids.len() < 2 || !ids.contains(&soft) {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut run = 0u32;
        for (i, &t) in ids.iter().enumerate() {
            if t != soft {
                out.push(None);
                continue;
            }
            if i > 0 && ids[i - 1] != soft && out.iter().any(Option::is_some) {
                run += 1;
            }
            out.push(Some(run));
        }
        out
    }

    /// A fresh per-sequence cache for this model.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::with_ranks(self.cfg.num_layers, self.shards.len())
    }

    /// Tensor-parallel ranks the model runs on.
    pub fn ranks(&self) -> usize {
        self.shards.len()
    }

    /// Why the model can no longer run, once a tensor-parallel rank has failed (the group is
    /// broken for good: the process should stop and its work be done elsewhere).
    pub fn broken(&self) -> Option<String> {
        self.shards.iter().find_map(|s| s.comm.failed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &dev).unwrap();
        let (c, s) = rope_tables(5..6, 4, 10_000.0, 1.0, &dev).unwrap();
        let y = apply_rope(&x, &c, &s).unwrap();
        let n0: f32 = x.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        let n1: f32 = y.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!((n0 - n1).abs() < 1e-4);
        // Position 0 is the identity.
        let (c0, s0) = rope_tables(0..1, 4, 10_000.0, 1.0, &dev).unwrap();
        let y0 = apply_rope(&x, &c0, &s0).unwrap();
        assert_eq!(y0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn linear_scaling_divides_frequencies() {
        let dev = Device::Cpu;
        let (c8, _) = rope_tables(8..9, 4, 1e6, 8.0, &dev).unwrap();
        let (c1, _) = rope_tables(1..2, 4, 1e6, 1.0, &dev).unwrap();
        let a = c8.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = c1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn rms_norm_matches_formula() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[2f32, 0.5], &dev).unwrap();
        let n = RmsNorm::new(w, 1e-6);
        let y = n.forward(&Tensor::new(&[[3f32, 4.0]], &dev).unwrap()).unwrap();
        let rms = ((9.0f32 + 16.0) / 2.0 + 1e-6).sqrt();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((got[0] - 3.0 / rms * 2.0).abs() < 1e-5);
        assert!((got[1] - 4.0 / rms * 0.5).abs() < 1e-5);
    }
}
