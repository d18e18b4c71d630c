//! One rank's forward pass over a packed batch: what every rank is given (a [`PassJob`]) and
//! the pass itself ([`forward_shard`]).

use super::{apply_rope, rope_tables, AttentionImpl, Logits, NumericOptions, Shard};
use crate::kv::device::{DeviceTables, TableItem};
use crate::kv::{PageId, PageStore};
use crate::load::config::TextConfig;
use candle_core::{DType, Device, Tensor};

/// The model's constants a pass needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PassConsts {
    pub numeric: NumericOptions,
    pub attention_dtype: DType,
    pub embed_scale: f64,
    pub image_token_id: Option<u32>,
    pub vocab_size: usize,
    pub softcap: Option<f64>,
    pub attention: AttentionImpl,
}

/// One sequence's part of a pass, owned, so that rank threads can share it.
pub(crate) struct PassItem {
    pub ids: Vec<u32>,
    /// Position of the first new token.
    pub pos0: usize,
    pub logits: Logits,
    pub images: Option<Tensor>,
    /// Image run of each new row (empty when there is none).
    pub groups: Vec<Option<u32>>,
    /// Blocks in `tables` per layer.
    pub blocks: usize,
    /// The sequence's page of every block for each layer, `[layer][block]`.
    pub tables: Vec<PageId>,
}

impl PassItem {
    /// The pages of layer `l`, one per block.
    pub fn pages(&self, l: usize) -> &[PageId] {
        &self.tables[l * self.blocks..(l + 1) * self.blocks]
    }
}

/// Everything a rank needs to run a pass.
pub(crate) struct PassJob {
    pub items: Vec<PassItem>,
    pub consts: PassConsts,
}

/// Whether the attention of a model on `device` with keys and values in `kv_dtype` runs
/// candle-flash-attn's paged kernel.
pub(crate) fn uses_flash(attention: AttentionImpl, device: &Device, kv_dtype: DType) -> bool {
    cfg!(feature = "flash-attn")
        && attention == AttentionImpl::Fused
        && device.is_cuda()
        && matches!(kv_dtype, DType::BF16 | DType::F16)
}

/// What a layer of a pass needs besides its input rows.
pub(crate) struct LayerPass<'a> {
    /// This rank's view of the shape (its heads, KV heads and MLP width).
    pub cfg: &'a TextConfig,
    pub consts: &'a PassConsts,
    pub comm: &'a dyn crate::comm::Communicator,
    pub job: &'a PassJob,
    /// cos/sin of every row for local and global layers, `[rows, 1, head_dim / 2]`.
    pub rope_local: (Tensor, Tensor),
    pub rope_global: (Tensor, Tensor),
    /// First row of each item.
    pub offsets: Vec<usize>,
    pub rows: usize,
    pub device: &'a Device,
    /// Per-pass tensors of the device paths (block tables, slots), made once.
    pub device_tables: Option<DeviceTables>,
}

impl LayerPass<'_> {
    /// The slot of every row of the pass in layer `l`'s pages.
    pub fn slots(&self, l: usize, store: &PageStore) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.rows);
        for it in &self.job.items {
            let pages = it.pages(l);
            for p in it.pos0..it.pos0 + it.ids.len() {
                out.push(store.slot(pages[p / store.block], p) as u32);
            }
        }
        out
    }
}

/// One rank's pass over its shard: keys and values go to `store`; returns the logits (whole
/// vocabulary) of the rows asked for, stacked in item order, or none.
pub(crate) fn forward_shard(
    shard: &Shard,
    job: &PassJob,
    store: &mut PageStore,
) -> candle_core::Result<Option<Tensor>> {
    let (cfg, dev) = (&shard.cfg, &shard.device);
    let positions: Vec<usize> = job.items.iter().flat_map(|b| b.pos0..b.pos0 + b.ids.len()).collect();
    let rows = positions.len();
    // Tables for every row of the pass at once (one copy to the device), broadcast over heads.
    let half = cfg.head_dim / 2;
    let shaped = |(c, s): (Tensor, Tensor)| -> candle_core::Result<(Tensor, Tensor)> {
        Ok((c.reshape((rows, 1, half))?, s.reshape((rows, 1, half))?))
    };
    let rope_local = shaped(rope_tables(positions.iter().copied(), cfg.head_dim, cfg.rope_local_base, 1.0, dev)?)?;
    let rope_global = shaped(rope_tables(
        positions.iter().copied(),
        cfg.head_dim,
        cfg.rope_global_base,
        cfg.rope_global_factor,
        dev,
    )?)?;
    let mut offsets = Vec::with_capacity(job.items.len());
    let mut off = 0;
    for b in &job.items {
        offsets.push(off);
        off += b.ids.len();
    }
    let device_tables = if dev.is_cpu() {
        None
    } else {
        let items: Vec<TableItem<'_>> = job
            .items
            .iter()
            .map(|b| TableItem {
                pos0: b.pos0,
                len: b.ids.len(),
                blocks: b.blocks,
                tables: &b.tables,
                groups: &b.groups,
            })
            .collect();
        Some(DeviceTables::new(&items, cfg.num_layers, store.block, dev)?)
    };
    let pass = LayerPass {
        cfg,
        consts: &job.consts,
        comm: shard.comm.as_ref(),
        job,
        rope_local,
        rope_global,
        offsets,
        rows,
        device: dev,
        device_tables,
    };
    let all_ids: Vec<u32> = job.items.iter().flat_map(|b| b.ids.iter().copied()).collect();
    let mut x = embed_with_images(shard, job, &all_ids)?;
    for (i, layer) in shard.layers.iter().enumerate() {
        x = layer.forward(i, &x, &pass, store)?;
    }
    // Only the rows whose logits are wanted go through the output head.
    let mut keep = Vec::new();
    for (b, &off) in job.items.iter().zip(&pass.offsets) {
        let t = b.ids.len();
        match b.logits {
            Logits::Last => keep.push(off + t - 1),
            Logits::All => keep.extend(off..off + t),
            Logits::None => {}
        }
    }
    if keep.is_empty() {
        return Ok(None);
    }
    let x = if keep.len() == rows {
        x
    } else if keep.len() == 1 {
        x.narrow(0, keep[0], 1)?
    } else {
        let idx: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
        x.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?
    };
    let x = shard.norm.forward(&x)?;
    let mut logits = shard.comm.all_gather_last(&shard.lm_head.forward(&x.contiguous()?)?)?;
    if let Some(cap) = job.consts.softcap {
        logits = ((logits / cap)?.tanh()? * cap)?;
    }
    Ok(Some(logits))
}

/// The scaled embeddings of every item's ids, with image rows in place of the image soft
/// tokens (not scaled: transformers scatters the projected image features after the
/// embedding scale).
fn embed_with_images(shard: &Shard, job: &PassJob, all_ids: &[u32]) -> candle_core::Result<Tensor> {
    let c = &job.consts;
    let soft = c.image_token_id;
    // A soft-token id outside the vocabulary (tiny test vocabularies) is looked up as 0,
    // as transformers does; its row is replaced anyway.
    let lookup: Vec<u32> =
        all_ids.iter().map(|&t| if Some(t) == soft && t as usize >= c.vocab_size { 0 } else { t }).collect();
    let x = (embed_rows(shard, &lookup)? * c.embed_scale)?;
    let Some(soft) = soft else { return Ok(x) };
    if !all_ids.contains(&soft) {
        return Ok(x);
    }
    // Rows of `x` followed by every image row; each position picks its row by index.
    let n = all_ids.len();
    let mut table = vec![x];
    let mut index = Vec::with_capacity(n);
    let (mut off, mut extra) = (0usize, n);
    for b in &job.items {
        let count = b.ids.iter().filter(|&&t| t == soft).count();
        let rows = match (count, &b.images) {
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

/// Embedding rows of `ids` (f32, unscaled). A shard holding part of the vocabulary looks up
/// its own rows, zeros for the others, and the ranks' rows are summed.
fn embed_rows(shard: &Shard, ids: &[u32]) -> candle_core::Result<Tensor> {
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

/// Applies RoPE to `[rows, heads, head_dim]` with a pass's tables.
pub(crate) fn rotate(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    apply_rope(x, cos, sin)
}
