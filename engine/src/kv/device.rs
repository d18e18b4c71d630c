//! The per-pass tensors of the device paths, made once per pass and shared by every layer:
//! where each new row's key and value go, and what a fused kernel needs to find every
//! sequence's pages. A pass copies these to the device in a handful of transfers, whatever
//! the number of sequences.

use super::manager::{PageId, NO_PAGE};
use candle_core::{Device, Tensor};

/// One sequence of a pass, as the device tables see it.
pub(crate) struct TableItem<'a> {
    pub pos0: usize,
    pub len: usize,
    /// Blocks per layer in `tables`.
    pub blocks: usize,
    /// `[layer][block]` pages.
    pub tables: &'a [PageId],
    /// Image run of each new row (empty when there is none).
    pub groups: &'a [Option<u32>],
}

/// Block tables, slots and sequence lengths of a pass on a device.
pub struct DeviceTables {
    /// `[layers, rows]` u32: the slot of every new row in each layer's pages.
    slots: Tensor,
    /// `[layers, sequences, max_blocks]` u32 (blocks a sequence lacks point at page 0 and are
    /// never read).
    tables: Tensor,
    /// Cumulative new rows and cumulative keys (cached plus new) per sequence, `[sequences
    /// + 1]` u32.
    pub cu_q: Tensor,
    pub cu_k: Tensor,
    pub max_q: usize,
    pub max_k: usize,
    /// `[sequences, runs, 2]` i32: the positions `[start, end)` of each image run among the
    /// new rows (rows of one run see each other both ways); `None` without images.
    pub image_spans: Option<Tensor>,
}

impl DeviceTables {
    pub(crate) fn new(items: &[TableItem<'_>], layers: usize, block: usize, dev: &Device) -> candle_core::Result<Self> {
        let rows: usize = items.iter().map(|i| i.len).sum();
        let mut slots = Vec::with_capacity(layers * rows);
        for l in 0..layers {
            for it in items {
                let pages = &it.tables[l * it.blocks..(l + 1) * it.blocks];
                for p in it.pos0..it.pos0 + it.len {
                    slots.push(pages[p / block] * block as u32 + (p % block) as u32);
                }
            }
        }
        let max_blocks = items.iter().map(|i| i.blocks).max().unwrap_or(1).max(1);
        let mut tables = vec![0u32; layers * items.len() * max_blocks];
        for l in 0..layers {
            for (s, it) in items.iter().enumerate() {
                let src = &it.tables[l * it.blocks..(l + 1) * it.blocks];
                let dst = &mut tables[(l * items.len() + s) * max_blocks..][..it.blocks];
                for (d, &p) in dst.iter_mut().zip(src) {
                    *d = if p == NO_PAGE { 0 } else { p };
                }
            }
        }
        let (mut cu_q, mut cu_k) = (vec![0u32], vec![0u32]);
        for it in items {
            cu_q.push(cu_q.last().copied().unwrap_or(0) + it.len as u32);
            cu_k.push(cu_k.last().copied().unwrap_or(0) + (it.pos0 + it.len) as u32);
        }
        let spans: Vec<Vec<(i32, i32)>> = items.iter().map(|it| image_spans(it.pos0, it.groups)).collect();
        let most = spans.iter().map(Vec::len).max().unwrap_or(0);
        let image_spans = if most == 0 {
            None
        } else {
            let mut flat = Vec::with_capacity(items.len() * most * 2);
            for s in &spans {
                for j in 0..most {
                    let (a, b) = s.get(j).copied().unwrap_or((0, 0));
                    flat.extend([a, b]);
                }
            }
            Some(Tensor::from_vec(flat, (items.len(), most, 2), dev)?)
        };
        Ok(Self {
            slots: Tensor::from_vec(slots, (layers, rows), dev)?,
            tables: Tensor::from_vec(tables, (layers, items.len(), max_blocks), dev)?,
            cu_q: Tensor::new(cu_q.as_slice(), dev)?,
            cu_k: Tensor::new(cu_k.as_slice(), dev)?,
            max_q: items.iter().map(|i| i.len).max().unwrap_or(0),
            max_k: items.iter().map(|i| i.pos0 + i.len).max().unwrap_or(0),
            image_spans,
        })
    }

    /// The slots of layer `l`'s new rows, `[rows]`.
    pub fn slots(&self, l: usize) -> candle_core::Result<Tensor> {
        self.slots.get(l)
    }

    /// Layer `l`'s block tables, `[sequences, max_blocks]`.
    pub fn table(&self, l: usize) -> candle_core::Result<Tensor> {
        self.tables.get(l)
    }
}

/// The positions `[start, end)` of each image run among a sequence's new rows.
fn image_spans(pos0: usize, groups: &[Option<u32>]) -> Vec<(i32, i32)> {
    let mut out: Vec<(i32, i32)> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let Some(g) = g else { continue };
        let p = (pos0 + i) as i32;
        match out.last_mut() {
            Some(last) if i > 0 && groups[i - 1] == Some(*g) => last.1 = p + 1,
            _ => out.push((p, p + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_slots_follow_the_pages() {
        // Two layers, blocks of 4; a sequence at positions 6..8 holding pages [3, 9] (layer 0)
        // and [5, 7] (layer 1), and a new one with one page per layer.
        let a = [3, 9, 5, 7];
        let b = [11, 12];
        let groups = [Some(0), Some(0), None];
        let items = [
            TableItem { pos0: 6, len: 2, blocks: 2, tables: &a, groups: &[] },
            TableItem { pos0: 0, len: 3, blocks: 1, tables: &b, groups: &groups },
        ];
        let t = DeviceTables::new(&items, 2, 4, &Device::Cpu).unwrap();
        assert_eq!(t.slots(0).unwrap().to_vec1::<u32>().unwrap(), vec![9 * 4 + 2, 9 * 4 + 3, 44, 45, 46]);
        assert_eq!(t.slots(1).unwrap().to_vec1::<u32>().unwrap(), vec![7 * 4 + 2, 7 * 4 + 3, 48, 49, 50]);
        assert_eq!(t.table(1).unwrap().to_vec2::<u32>().unwrap(), vec![vec![5, 7], vec![12, 0]]);
        assert_eq!(t.cu_k.to_vec1::<u32>().unwrap(), vec![0, 8, 11]);
        assert_eq!((t.max_q, t.max_k), (3, 8));
        let spans = t.image_spans.unwrap().to_vec3::<i32>().unwrap();
        assert_eq!(spans, vec![vec![vec![0, 0]], vec![vec![0, 2]]]);
    }
}
