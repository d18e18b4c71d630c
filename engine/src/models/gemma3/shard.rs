//! One tensor-parallel rank's share of the decoder's weights.

use super::layers::{Layer, RmsNorm};
use super::linear::{tensor_bytes, Embedding, Linear};
use crate::comm::{Communicator, SingleRank};
use crate::load::config::TextConfig;
use candle_core::Device;
use std::sync::Arc;

/// One tensor-parallel rank's part of the decoder (the whole decoder without tensor
/// parallelism).
///
/// - q, k, v, gate and up are split by output rows (column-parallel), o and down by input
///   columns (row-parallel), each followed by an all-reduce of the partial sums;
/// - attention heads are split across ranks, and KV heads too; with fewer KV heads than
///   ranks, each rank keeps the KV head its query heads use (replicated);
/// - the embedding table and the output head are split by vocabulary rows: a lookup is an
///   all-reduce of the rank that holds the row (others add zeros), the logits an all-gather;
///   norms are replicated.
pub struct Shard {
    /// This rank's view of the shape: its attention heads, KV heads and MLP width.
    pub cfg: TextConfig,
    /// Rows `vocab_start ..` of the embedding table.
    pub embed: Embedding,
    pub vocab_start: usize,
    pub vocab_rows: usize,
    pub layers: Vec<Layer>,
    /// Rows of the output head for the same vocabulary slice.
    pub lm_head: Linear,
    /// The final norm (replicated).
    pub norm: RmsNorm,
    pub comm: Arc<dyn Communicator>,
    /// Where this rank's weights live and its pass runs.
    pub device: Device,
}

impl Shard {
    /// Bytes of this rank's dense weights: `(split, replicated)`, the replicated part being
    /// its norms. (Quantized GGUF weights, never split, are not counted.)
    pub fn weight_bytes(&self) -> (u64, u64) {
        let norms = |l: &Layer| {
            [&l.input_norm, &l.post_attn_norm, &l.pre_ff_norm, &l.post_ff_norm, &l.attn.q_norm, &l.attn.k_norm]
                .iter()
                .map(|n| tensor_bytes(&n.weight))
                .sum::<u64>()
        };
        let replicated = self.layers.iter().map(norms).sum::<u64>() + tensor_bytes(&self.norm.weight);
        let linears = |l: &Layer| {
            [&l.attn.q, &l.attn.k, &l.attn.v, &l.attn.o, &l.mlp.gate, &l.mlp.up, &l.mlp.down]
                .iter()
                .map(|x| x.bytes())
                .sum::<u64>()
        };
        let embed = match &self.embed {
            Embedding::Dense(t) => tensor_bytes(t),
            Embedding::Quant(_) => 0,
        };
        // A tied head shares the embedding's values but is its own tensor here.
        let split = self.layers.iter().map(linears).sum::<u64>() + embed + self.lm_head.bytes();
        (split, replicated)
    }

    /// Bytes of weights a decode step reads on this rank: every matrix of every layer, the
    /// output head and the norms (the embedding table is only looked up, a row per token; a
    /// tied head is read once, as the head).
    pub fn step_weight_bytes(&self) -> u64 {
        let (split, replicated) = self.weight_bytes();
        let embed = match &self.embed {
            Embedding::Dense(t) => tensor_bytes(t),
            Embedding::Quant(_) => 0,
        };
        split - embed + replicated
    }

    /// The whole decoder as one rank.
    pub fn whole(
        cfg: TextConfig,
        embed: Embedding,
        vocab_rows: usize,
        layers: Vec<Layer>,
        lm_head: Linear,
        norm: RmsNorm,
        device: Device,
    ) -> Self {
        Self { cfg, embed, vocab_start: 0, vocab_rows, layers, lm_head, norm, comm: Arc::new(SingleRank), device }
    }
}
