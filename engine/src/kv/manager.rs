//! The host side of the paged KV cache: which page holds what, who holds each page, and the
//! prefix cache.
//!
//! - A **page** holds the keys and values of one block of `block` consecutive positions for
//!   one layer. Every rank has the same number of pages (each holding its own KV heads), so
//!   one set of block tables serves all ranks.
//! - A sequence's **block table** maps its logical block `i` (positions `i·block ..`) to one
//!   page per layer. Sliding-window layers give their pages back as soon as no later query
//!   can see them; global layers keep every block.
//! - **Prefix cache**: every full block is keyed by a hash of every token up to its end (and
//!   of the images whose soft tokens lie in it). A new sequence adopts the cached blocks of
//!   its longest cached prefix instead of computing them: pages are reference-counted, and a
//!   cached block nobody uses is evicted, least recently used first, when its pages are
//!   needed (or when idle cached pages exceed a quarter of the pool, so that a long run does
//!   not keep every prompt it ever saw).
//!
//! Pages are handed out last-freed first, and pages never used before only when no freed
//! one is left, so that a pool sized generously is only touched as far as it is used.

use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// A page of the pool.
pub type PageId = u32;
/// The table entry of a layer that holds no page for a block (a sliding-window layer whose
/// block left the window).
pub const NO_PAGE: PageId = u32::MAX;

/// Identifies a full block by everything before and in it.
pub type BlockHash = u128;

/// Identifies an image by its pixels, for the prefix cache.
pub type ImageKey = u128;

/// The shape of the cache: pages, and which layers attend globally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Tokens per block (and per page).
    pub block: usize,
    /// Pages in the pool (of every rank).
    pub pages: usize,
    /// `true` where a layer attends to the whole context.
    pub layer_is_global: Vec<bool>,
    /// Tokens a sliding-window layer attends to, the query included.
    pub window: usize,
    /// Bytes one page takes, over all ranks.
    pub page_bytes: u64,
}

impl KvLayout {
    pub fn num_layers(&self) -> usize {
        self.layer_is_global.len()
    }

    /// Whether block `i` of a sequence is out of every later query's window once `len`
    /// tokens are computed: its last position `p` is seen by a query `q ≥ len` only when
    /// `p + window > q`.
    pub fn block_dead(&self, i: usize, len: usize) -> bool {
        (i + 1) * self.block + self.window <= len + 1
    }

    /// Blocks a sequence of `len` tokens holds on a sliding-window layer at most, while a
    /// chunk of `chunk` more tokens is computed.
    pub fn local_blocks(&self, len: usize, chunk: usize) -> usize {
        len.div_ceil(self.block).min((self.window + chunk).div_ceil(self.block) + 1)
    }

    /// Pages a sequence holds at `len` tokens while a chunk of `chunk` tokens is computed.
    pub fn pages_for(&self, len: usize, chunk: usize) -> usize {
        let global = self.layer_is_global.iter().filter(|g| **g).count();
        let local = self.num_layers() - global;
        global * len.div_ceil(self.block) + local * self.local_blocks(len, chunk)
    }
}

/// Counters of the cache, for step statistics and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Pages in the pool.
    pub pages: usize,
    /// Pages held by sequences or the prefix cache.
    pub pages_used: usize,
    /// Pages held only by the prefix cache (evicted when needed).
    pub pages_cached_idle: usize,
    /// Full blocks in the prefix cache.
    pub cached_blocks: usize,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub lookup_tokens: u64,
    pub hit_tokens: u64,
    /// Cached blocks evicted.
    pub evictions: u64,
    /// The most pages held at once.
    pub pages_peak: usize,
}

struct CachedBlock {
    /// One page per layer (`NO_PAGE` never: a block is cached with all its pages).
    pages: Box<[PageId]>,
    parent: Option<BlockHash>,
    /// Cached blocks that extend this one.
    children: u32,
    /// Sequences whose tables hold this block.
    users: u32,
    last_used: u64,
    /// Blocks before it, for eviction order (deeper first on equal age).
    depth: u32,
}

/// Why pages could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfPages {
    pub needed: usize,
    pub available: usize,
}

/// What identifies the tokens of a chunk beyond their ids, for the prefix cache.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Identity<'a> {
    /// No image soft tokens.
    Text,
    /// The image of each token (`Some` for image soft tokens).
    Images(&'a [Option<ImageKey>]),
    /// Image soft tokens whose images are not known: nothing from here on is cached.
    Unknown,
}

/// One logical block of a sequence.
#[derive(Clone, Debug)]
pub(crate) struct SeqBlock {
    /// One page per layer; `NO_PAGE` for sliding-window layers that gave theirs back.
    pub pages: Box<[PageId]>,
    /// The cache entry this block is (registered or adopted), once full.
    pub cached: Option<BlockHash>,
}

/// A sequence's block tables and the hashing state of its partial last block.
#[derive(Clone, Debug, Default)]
pub(crate) struct SeqBlocks {
    pub blocks: Vec<SeqBlock>,
    /// Tokens whose keys and values are written.
    pub len: usize,
    /// Hash of the last full block (the chain so far); `None` before the first.
    pub chain: Option<BlockHash>,
    /// Tokens of the partial last block, with the image of each soft token: what its hash
    /// will be made of. `None` once a token without a known identity (an image soft token
    /// without its image's key) made the rest of the sequence uncacheable.
    pub pending: Option<Vec<(u32, Option<ImageKey>)>>,
    /// Blocks before this index have given back their sliding-window pages.
    pub released: usize,
}

/// Pages, their holders, and the prefix cache of one model (all ranks).
pub struct KvManager {
    layout: KvLayout,
    refs: Vec<u32>,
    /// Whether the prefix cache holds a reference to the page.
    cache_held: Vec<bool>,
    /// Pages given back, reused last-freed first.
    free: Vec<PageId>,
    /// Pages `fresh..` have never been handed out.
    fresh: usize,
    cache: HashMap<BlockHash, CachedBlock>,
    clock: u64,
    stats: KvStats,
}

/// The hash of a full block following `chain`.
pub fn block_hash(chain: Option<BlockHash>, tokens: &[(u32, Option<ImageKey>)]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(chain.unwrap_or(0).to_le_bytes());
    for (t, img) in tokens {
        h.update(t.to_le_bytes());
        if let Some(k) = img {
            h.update(k.to_le_bytes());
        }
    }
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("16 bytes"))
}

/// A key for an image: SHA-256 of its size and pixels.
pub fn image_key(width: usize, height: usize, pixels: &[u8]) -> ImageKey {
    let mut h = Sha256::new();
    h.update((width as u64).to_le_bytes());
    h.update((height as u64).to_le_bytes());
    h.update(pixels);
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("16 bytes"))
}

impl KvManager {
    pub fn new(layout: KvLayout) -> Self {
        let pages = layout.pages;
        Self {
            refs: vec![0; pages],
            cache_held: vec![false; pages],
            free: Vec::new(),
            fresh: 0,
            cache: HashMap::new(),
            clock: 0,
            stats: KvStats { pages, ..KvStats::default() },
            layout,
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn stats(&self) -> KvStats {
        KvStats { pages_used: self.fresh - self.free.len(), cached_blocks: self.cache.len(), ..self.stats }
    }

    /// Holders of page `p` (sequences and the prefix cache).
    pub fn refs(&self, p: PageId) -> u32 {
        self.refs[p as usize]
    }

    /// Pages that can be handed out now: free ones, and those of cached blocks no sequence
    /// uses.
    pub fn available(&self) -> usize {
        self.free.len() + (self.layout.pages - self.fresh) + self.stats.pages_cached_idle
    }

    fn take_ref(&mut self, p: PageId) {
        self.refs[p as usize] += 1;
    }

    fn drop_ref(&mut self, p: PageId) {
        let i = p as usize;
        debug_assert!(self.refs[i] > 0, "page {p} released twice");
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            self.cache_held[i] = false;
            self.free.push(p);
        }
    }

    fn present(pages: &[PageId]) -> usize {
        pages.iter().filter(|p| **p != NO_PAGE).count()
    }

    /// One more sequence uses cached block `h`.
    fn use_entry(&mut self, h: BlockHash) {
        let e = self.cache.get_mut(&h).expect("cached");
        if e.users == 0 {
            self.stats.pages_cached_idle -= Self::present(&e.pages);
        }
        e.users += 1;
        e.last_used = self.clock;
    }

    /// A sequence stops using cached block `h`.
    fn leave_entry(&mut self, h: BlockHash) {
        let Some(e) = self.cache.get_mut(&h) else { return };
        e.users -= 1;
        e.last_used = self.clock;
        if e.users == 0 {
            self.stats.pages_cached_idle += Self::present(&e.pages);
        }
    }

    /// Evicts the least recently used cached block that no sequence uses and no cached
    /// block extends. Returns false when there is none.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .cache
            .iter()
            .filter(|(_, b)| b.users == 0 && b.children == 0)
            .min_by_key(|(h, b)| (b.last_used, std::cmp::Reverse(b.depth), **h))
            .map(|(h, _)| *h);
        let Some(h) = victim else { return false };
        let b = self.cache.remove(&h).expect("victim is cached");
        if let Some(parent) = b.parent.and_then(|p| self.cache.get_mut(&p)) {
            parent.children -= 1;
        }
        self.stats.pages_cached_idle -= Self::present(&b.pages);
        for &p in b.pages.iter().filter(|p| **p != NO_PAGE) {
            debug_assert_eq!(self.refs[p as usize], 1, "an idle cached page is held by the cache alone");
            self.drop_ref(p);
        }
        self.stats.evictions += 1;
        true
    }

    /// One page, or `None` when every page is held by a sequence.
    fn alloc(&mut self) -> Option<PageId> {
        let p = self.alloc_page();
        self.stats.pages_peak = self.stats.pages_peak.max(self.fresh - self.free.len());
        p
    }

    fn alloc_page(&mut self) -> Option<PageId> {
        loop {
            if let Some(p) = self.free.pop() {
                self.refs[p as usize] = 1;
                return Some(p);
            }
            // Idle cached pages beyond a quarter of the pool go before untouched pages.
            if self.stats.pages_cached_idle > self.layout.pages / 4 && self.evict_one() {
                continue;
            }
            if self.fresh < self.layout.pages {
                let p = self.fresh as PageId;
                self.fresh += 1;
                self.refs[p as usize] = 1;
                return Some(p);
            }
            if !self.evict_one() {
                return None;
            }
        }
    }

    /// Gives pages for every block of `seq` up to `len` tokens (all layers). On failure
    /// nothing is taken.
    pub(crate) fn reserve(&mut self, seq: &mut SeqBlocks, len: usize) -> Result<(), OutOfPages> {
        let have = seq.blocks.len();
        let want = len.div_ceil(self.layout.block);
        if want <= have {
            return Ok(());
        }
        let n = self.layout.num_layers();
        let needed = (want - have) * n;
        if needed > self.available() {
            return Err(OutOfPages { needed, available: self.available() });
        }
        for _ in have..want {
            let mut pages = Vec::with_capacity(n);
            for _ in 0..n {
                match self.alloc() {
                    Some(p) => pages.push(p),
                    None => {
                        // Cannot happen after the check above; undo to stay consistent.
                        pages.into_iter().for_each(|p| self.drop_ref(p));
                        return Err(OutOfPages { needed, available: self.available() });
                    }
                }
            }
            seq.blocks.push(SeqBlock { pages: pages.into_boxed_slice(), cached: None });
        }
        Ok(())
    }

    /// Records that `tokens` were written after `seq.len`: full blocks enter the prefix cache,
    /// and sliding-window pages that no later query can see are given back.
    pub(crate) fn advance(&mut self, seq: &mut SeqBlocks, tokens: &[u32], identity: Identity<'_>) {
        let b = self.layout.block;
        if matches!(identity, Identity::Unknown) {
            seq.pending = None;
        }
        for (j, &t) in tokens.iter().enumerate() {
            if let Some(p) = seq.pending.as_mut() {
                let img = match identity {
                    Identity::Images(keys) => keys.get(j).copied().flatten(),
                    _ => None,
                };
                p.push((t, img));
            }
            seq.len += 1;
            if seq.len.is_multiple_of(b) {
                let i = seq.len / b - 1;
                if let Some(p) = seq.pending.take() {
                    let h = block_hash(seq.chain, &p);
                    self.register(seq, i, h);
                    seq.chain = Some(h);
                    seq.pending = Some(Vec::with_capacity(b));
                }
            }
        }
        self.release_window(seq);
    }

    /// Puts block `i` of `seq` in the prefix cache under `h`. When a block with that hash is
    /// cached already (another sequence computed the same tokens), `seq` takes the cached
    /// pages and gives its own copy back. Only a block whose predecessor is cached is
    /// registered, so that whoever uses a cached block uses its whole chain.
    fn register(&mut self, seq: &mut SeqBlocks, i: usize, h: BlockHash) {
        self.clock += 1;
        if seq.blocks[i].cached.is_some() || (i > 0 && seq.blocks[i - 1].cached != seq.chain) {
            return;
        }
        if self.cache.contains_key(&h) {
            self.use_entry(h);
            let cached = self.cache[&h].pages.clone();
            for (l, &c) in cached.iter().enumerate() {
                let own = seq.blocks[i].pages[l];
                if c == NO_PAGE {
                    // The cached block gave this layer's page back; the sequence's fills it.
                    if own != NO_PAGE {
                        self.take_ref(own);
                        self.cache_held[own as usize] = true;
                        self.cache.get_mut(&h).expect("cached").pages[l] = own;
                    }
                } else if own != c {
                    self.take_ref(c);
                    if own != NO_PAGE {
                        self.drop_ref(own);
                    }
                    seq.blocks[i].pages[l] = c;
                }
            }
            seq.blocks[i].cached = Some(h);
            return;
        }
        let pages = seq.blocks[i].pages.clone();
        for &p in pages.iter().filter(|p| **p != NO_PAGE) {
            self.take_ref(p);
            self.cache_held[p as usize] = true;
        }
        let parent = seq.chain;
        if let Some(pb) = parent.and_then(|p| self.cache.get_mut(&p)) {
            pb.children += 1;
        }
        self.cache
            .insert(h, CachedBlock { pages, parent, children: 0, users: 1, last_used: self.clock, depth: i as u32 });
        seq.blocks[i].cached = Some(h);
    }

    /// Gives back the sliding-window pages of blocks out of every later query's window. When
    /// only the prefix cache still holds such a page, it goes too: a cached block then serves
    /// prefixes that end far enough beyond it, and the window's memory is really freed.
    fn release_window(&mut self, seq: &mut SeqBlocks) {
        while seq.released < seq.blocks.len() && self.layout.block_dead(seq.released, seq.len) {
            let i = seq.released;
            for l in 0..self.layout.num_layers() {
                if self.layout.layer_is_global[l] {
                    continue;
                }
                let p = std::mem::replace(&mut seq.blocks[i].pages[l], NO_PAGE);
                if p == NO_PAGE {
                    continue;
                }
                self.drop_ref(p);
                if let Some(e) = seq.blocks[i].cached.and_then(|h| self.cache.get_mut(&h)) {
                    if e.pages[l] == p && self.refs[p as usize] == 1 {
                        e.pages[l] = NO_PAGE;
                        self.drop_ref(p);
                    }
                }
            }
            seq.released += 1;
        }
    }

    /// Tokens of the longest cached prefix [`Self::adopt_prefix`] would adopt now, without
    /// adopting it or counting the lookup.
    pub(crate) fn cached_prefix_len(&self, tokens: &[u32], images: Option<&[Option<ImageKey>]>, limit: usize) -> usize {
        self.find_prefix(tokens, images, limit).1 * self.layout.block
    }

    /// The cached blocks matching `tokens` from the start, and how many of them can be
    /// adopted (those a later query still sees have all their sliding-window pages).
    fn find_prefix(
        &self,
        tokens: &[u32],
        images: Option<&[Option<ImageKey>]>,
        limit: usize,
    ) -> (Vec<BlockHash>, usize) {
        let b = self.layout.block;
        let mut found = Vec::new();
        let mut chain = None;
        for i in 0..limit.min(tokens.len()) / b {
            let block: Vec<(u32, Option<ImageKey>)> =
                (i * b..(i + 1) * b).map(|j| (tokens[j], images.and_then(|v| v.get(j).copied()).flatten())).collect();
            let h = block_hash(chain, &block);
            if !self.cache.contains_key(&h) {
                break;
            }
            found.push(h);
            chain = Some(h);
        }
        let local: Vec<usize> = (0..self.layout.num_layers()).filter(|&l| !self.layout.layer_is_global[l]).collect();
        let complete = |n: usize| {
            (0..n)
                .filter(|&i| !self.layout.block_dead(i, n * b))
                .all(|i| local.iter().all(|&l| self.cache[&found[i]].pages[l] != NO_PAGE))
        };
        let mut n = found.len();
        while n > 0 && !complete(n) {
            n -= 1;
        }
        (found, n)
    }

    /// For a sequence that adopted `before` tokens earlier and has computed nothing since:
    /// [`Self::adopt_prefix`] again, its lookup counted once and its hit as what it adopts now.
    pub(crate) fn readopt_prefix(
        &mut self,
        tokens: &[u32],
        images: Option<&[Option<ImageKey>]>,
        limit: usize,
        before: usize,
    ) -> SeqBlocks {
        let seq = self.adopt_prefix(tokens, images, limit);
        self.stats.lookup_tokens = self.stats.lookup_tokens.saturating_sub(tokens.len() as u64);
        self.stats.hit_tokens = self.stats.hit_tokens.saturating_sub(before as u64);
        seq
    }

    /// A sequence that starts with the cached blocks of the longest cached prefix of
    /// `tokens` (at most `limit` tokens, a whole number of blocks), and how many tokens that
    /// is. `images` gives the image of each soft token; without it, only blocks free of
    /// images can be matched. The prefix ends where a block a later query can still see has
    /// given back a sliding-window page.
    pub(crate) fn adopt_prefix(
        &mut self,
        tokens: &[u32],
        images: Option<&[Option<ImageKey>]>,
        limit: usize,
    ) -> SeqBlocks {
        let b = self.layout.block;
        let mut seq = SeqBlocks { pending: Some(Vec::with_capacity(b)), ..SeqBlocks::default() };
        self.stats.lookup_tokens += tokens.len() as u64;
        self.clock += 1;
        let (found, n) = self.find_prefix(tokens, images, limit);
        let len = n * b;
        for (i, h) in found.iter().take(n).enumerate() {
            self.use_entry(*h);
            let mut mine = self.cache[h].pages.to_vec();
            let dead = self.layout.block_dead(i, len);
            for (l, p) in mine.iter_mut().enumerate() {
                if (dead && !self.layout.layer_is_global[l]) || *p == NO_PAGE {
                    *p = NO_PAGE;
                } else {
                    self.take_ref(*p);
                }
            }
            seq.blocks.push(SeqBlock { pages: mine.into_boxed_slice(), cached: Some(*h) });
        }
        seq.len = len;
        seq.chain = if n > 0 { Some(found[n - 1]) } else { None };
        seq.released = (0..n).take_while(|&i| self.layout.block_dead(i, len)).count();
        self.stats.hit_tokens += len as u64;
        seq
    }

    /// Gives back every page of `seq`.
    pub(crate) fn release(&mut self, seq: &mut SeqBlocks) {
        self.clock += 1;
        for block in std::mem::take(&mut seq.blocks) {
            for &p in block.pages.iter() {
                if p != NO_PAGE {
                    self.drop_ref(p);
                }
            }
            if let Some(h) = block.cached {
                self.leave_entry(h);
            }
        }
        seq.len = 0;
        seq.released = 0;
        seq.chain = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(pages: usize) -> KvLayout {
        // 3 layers: local, local, global; window 8, blocks of 4.
        KvLayout { block: 4, pages, layer_is_global: vec![false, false, true], window: 8, page_bytes: 64 }
    }

    fn seq(m: &mut KvManager, tokens: &[u32]) -> SeqBlocks {
        let mut s = m.adopt_prefix(tokens, None, tokens.len().saturating_sub(1));
        let from = s.len;
        m.reserve(&mut s, tokens.len()).unwrap();
        m.advance(&mut s, &tokens[from..], Identity::Text);
        s
    }

    #[test]
    fn windows_give_pages_back_and_globals_keep_them() {
        let mut m = KvManager::new(layout(100));
        let s = seq(&mut m, &(0..20).collect::<Vec<_>>());
        // 5 blocks; at len 20, blocks 0..2 end at positions 3, 7, 11: dead when p + 8 <= 20.
        let local_live = s.blocks.iter().filter(|b| b.pages[0] != NO_PAGE).count();
        assert_eq!(local_live, 2, "blocks 3 and 4 (positions 12..20) stay on local layers");
        assert!(s.blocks.iter().all(|b| b.pages[2] != NO_PAGE), "global layers keep every block");
        // 5 global + 2 × 2 local pages: the cache gave back the dead local pages too.
        assert_eq!(m.stats().pages_used, 9);
        assert_eq!(m.stats().pages_cached_idle, 0);
        let first = &m.cache[&s.blocks[0].cached.unwrap()];
        assert_eq!(first.pages[..2], [NO_PAGE, NO_PAGE], "the cached block keeps only its global page");
    }

    #[test]
    fn a_prefix_stops_where_a_visible_block_lost_its_window_pages() {
        let mut m = KvManager::new(layout(100));
        let long: Vec<u32> = (0..20).collect();
        let _a = seq(&mut m, &long);
        // Reusing 12 tokens needs the local pages of blocks 1 and 2, which a gave back.
        let b = m.adopt_prefix(&long, None, 12);
        assert_eq!(b.len, 0);
        // A short prefix still within a's last window is whole.
        let short: Vec<u32> = (0..9).collect();
        let mut c = seq(&mut m, &short);
        let d = m.adopt_prefix(&short, None, 8);
        assert_eq!(d.len, 8);
        m.release(&mut c);
    }

    #[test]
    fn a_block_computed_twice_is_kept_once() {
        let mut m = KvManager::new(layout(100));
        let t: Vec<u32> = (0..8).collect();
        // Both start before either has a cached block.
        let mut a = m.adopt_prefix(&t, None, 7);
        let mut b = m.adopt_prefix(&t, None, 7);
        for s in [&mut a, &mut b] {
            m.reserve(s, 8).unwrap();
        }
        assert_eq!(m.stats().pages_used, 12);
        m.advance(&mut a, &t, Identity::Text);
        m.advance(&mut b, &t, Identity::Text);
        assert_eq!(a.blocks[1].pages, b.blocks[1].pages, "b took a's cached pages");
        assert_eq!(m.stats().pages_used, 6, "b's own copy went back");
    }

    #[test]
    fn a_shared_prefix_is_adopted_and_counted_once() {
        let mut m = KvManager::new(layout(100));
        let a: Vec<u32> = (0..14).collect();
        let mut sa = seq(&mut m, &a);
        let used_one = m.stats().pages_used;
        let mut b = a[..12].to_vec();
        b.extend([99, 98, 97]);
        let sb = seq(&mut m, &b);
        assert_eq!(sb.blocks[0].pages, sa.blocks[0].pages, "the first block is shared");
        assert_eq!(sb.blocks[2].pages[2], sa.blocks[2].pages[2]);
        assert_ne!(sb.blocks[3].pages[2], sa.blocks[3].pages[2], "the blocks after the prefix are its own");
        // b holds 12 adopted tokens and one new block: 3 new pages.
        assert_eq!(m.stats().pages_used, used_one + 3);
        assert_eq!(m.stats().hit_tokens, 12);
        m.release(&mut sa);
        assert!(m.stats().pages_used >= 9, "the cache keeps a's blocks");
    }

    #[test]
    fn idle_cached_blocks_are_evicted_least_recent_first_when_pages_run_out() {
        let mut m = KvManager::new(layout(12));
        let mut a = seq(&mut m, &(0..8).collect::<Vec<_>>());
        m.release(&mut a);
        assert_eq!(m.stats().cached_blocks, 2);
        // 12 pages: a's two blocks (6 pages) are idle; a new 16-token sequence needs 12.
        let mut c = seq(&mut m, &(100..116).collect::<Vec<_>>());
        assert_eq!(m.stats().evictions, 2);
        assert_eq!(m.stats().pages_used, 8, "c gave back the window pages of its first two blocks");
        let mut d = SeqBlocks { pending: Some(Vec::new()), ..SeqBlocks::default() };
        assert!(m.reserve(&mut d, 8).is_err(), "6 pages needed, 4 free");
        m.release(&mut c);
        assert!(m.reserve(&mut d, 8).is_ok());
    }

    #[test]
    fn adopted_blocks_keep_their_pages_while_used() {
        let mut m = KvManager::new(layout(100));
        let t: Vec<u32> = (0..9).collect();
        let mut a = seq(&mut m, &t);
        let mut b = seq(&mut m, &t);
        assert_eq!(b.len, 9);
        m.release(&mut a);
        // b still references the two cached blocks: nothing of them is idle.
        let idle = m.stats().pages_cached_idle;
        assert_eq!(idle, 0);
        m.release(&mut b);
        assert_eq!(m.stats().pages_cached_idle, 6);
        assert_eq!(m.available(), 100);
    }
}
