//! The paged KV cache.
//!
//! - [`manager`]: pages, their reference counts, sequences' block tables, the prefix cache
//!   (host side, one for all ranks);
//! - [`pages`]: one rank's pages in host or device memory;
//! - [`cpu`]: attention over pages on the CPU, every sequence of a pass in one call;
//! - [`device`]: a pass's block tables and slots on a device, copied once per pass;
//! - [`gathered`]: attention over gathered keys with candle operations (the reference, and
//!   the path of devices without a fused kernel);
//! - `flash` (feature `flash-attn`): candle-flash-attn's paged, windowed varlen kernel.
//!
//! A [`SeqCache`] is one sequence's place in a model's cache: its pages go back when it is
//! dropped.

pub mod cpu;
pub mod device;
#[cfg(feature = "flash-attn")]
pub mod flash;
pub mod gathered;
pub mod manager;
pub mod pages;

pub use manager::{image_key, ImageKey, KvLayout, KvManager, KvStats, OutOfPages, PageId, NO_PAGE};
pub use pages::PageStore;

use manager::{Identity, SeqBlocks};
use std::sync::{Arc, Mutex, MutexGuard};

/// Tokens per block (and per page) on the CPU and by default.
pub const BLOCK_TOKENS: usize = 16;
/// Tokens per block for candle-flash-attn's paged kernel, which needs a multiple of 32.
pub const FLASH_BLOCK_TOKENS: usize = 32;
/// KV memory per rank when none is given (the pool is touched only as far as it is used on
/// the CPU; taken at once on a GPU).
pub const DEFAULT_KV_MEMORY: u64 = 2 << 30;

/// Locks the manager; a panic while it was held leaves counts that may be off, but never
/// memory that is unsafe to use, so the lock is taken anyway.
pub(crate) fn lock(kv: &Mutex<KvManager>) -> MutexGuard<'_, KvManager> {
    kv.lock().unwrap_or_else(|e| e.into_inner())
}

/// One sequence's place in a model's KV cache: block tables (one page per layer and block)
/// and the state that names its blocks for the prefix cache. Its pages go back to the pool
/// when it is dropped.
pub struct SeqCache {
    kv: Arc<Mutex<KvManager>>,
    pub(crate) blocks: SeqBlocks,
    /// Keys of the sequence's images, in order: the `n`-th run of image soft tokens belongs
    /// to the `n`-th image.
    image_keys: Vec<ImageKey>,
    /// Image runs started so far, and whether the last token was an image soft token.
    runs: usize,
    in_run: bool,
}

impl SeqCache {
    pub(crate) fn new(kv: Arc<Mutex<KvManager>>, blocks: SeqBlocks, image_keys: Vec<ImageKey>) -> Self {
        Self { kv, blocks, image_keys, runs: 0, in_run: false }
    }

    /// Tokens whose keys and values are in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.blocks.len
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.len == 0
    }

    /// Pages the sequence holds (shared ones included).
    pub fn pages_held(&self) -> usize {
        self.blocks.blocks.iter().flat_map(|b| b.pages.iter()).filter(|p| **p != NO_PAGE).count()
    }

    /// Bytes of keys and values the sequence holds (over all ranks, shared pages included).
    pub fn bytes(&self) -> usize {
        self.pages_held() * lock(&self.kv).layout().page_bytes as usize
    }

    /// Pages the sequence holds that no one else does (what it costs the pool).
    pub fn pages_own(&self) -> usize {
        let kv = lock(&self.kv);
        self.blocks.blocks.iter().flat_map(|b| b.pages.iter()).filter(|p| **p != NO_PAGE && kv.refs(**p) == 1).count()
    }

    /// Whether this sequence lives in the cache `kv` manages.
    pub(crate) fn belongs_to(&self, kv: &Arc<Mutex<KvManager>>) -> bool {
        Arc::ptr_eq(&self.kv, kv)
    }

    /// Counts the image runs among tokens adopted from the prefix cache.
    pub(crate) fn skip_adopted(&mut self, ids: &[u32], soft: Option<u32>) {
        let Some(s) = soft else { return };
        for &t in ids {
            if t == s {
                if !self.in_run {
                    self.runs += 1;
                }
                self.in_run = true;
            } else {
                self.in_run = false;
            }
        }
    }

    /// Gives pages for positions up to `len`.
    pub(crate) fn reserve(&mut self, len: usize) -> Result<(), OutOfPages> {
        lock(&self.kv).reserve(&mut self.blocks, len)
    }

    /// Records that `ids` were computed: full blocks go to the prefix cache, sliding-window
    /// pages out of reach go back. `soft` is the image soft token of a multimodal model.
    pub(crate) fn advance(&mut self, ids: &[u32], soft: Option<u32>) {
        let keys: Option<Vec<Option<ImageKey>>> = match soft {
            Some(s) if ids.contains(&s) || self.in_run => {
                let mut out = Vec::with_capacity(ids.len());
                let mut known = true;
                for &t in ids {
                    if t == s {
                        if !self.in_run {
                            self.runs += 1;
                            self.in_run = true;
                        }
                        let k = self.image_keys.get(self.runs - 1).copied();
                        known &= k.is_some();
                        out.push(k);
                    } else {
                        self.in_run = false;
                        out.push(None);
                    }
                }
                known.then_some(out)
            }
            _ => Some(Vec::new()),
        };
        let identity = match &keys {
            Some(k) if k.is_empty() => Identity::Text,
            Some(k) => Identity::Images(k),
            None => Identity::Unknown,
        };
        let kv = self.kv.clone();
        lock(&kv).advance(&mut self.blocks, ids, identity);
    }

    /// The page of every block for each layer, layer-major: `[layer][block]`.
    pub(crate) fn tables(&self, layers: usize) -> Vec<PageId> {
        let nb = self.blocks.blocks.len();
        let mut out = vec![NO_PAGE; layers * nb];
        for (i, b) in self.blocks.blocks.iter().enumerate() {
            for (l, &p) in b.pages.iter().enumerate() {
                out[l * nb + i] = p;
            }
        }
        out
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        let kv = self.kv.clone();
        lock(&kv).release(&mut self.blocks);
    }
}
