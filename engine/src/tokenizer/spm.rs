//! SentencePiece-style tokenizer built from GGUF metadata, matching llama.cpp's `SPM` vocab.
//!
//! GGUF files of Gemma 3 carry the vocabulary as `tokenizer.ggml.tokens` with per-token
//! `scores` and `token_type`, and no merges. llama.cpp tokenizes such vocabularies in three
//! steps, reproduced here exactly because the tests hold us to llama.cpp's ids:
//!
//! 1. Special-token partition: control, user-defined and unknown tokens are cut out of the
//!    text, longest token text first; control and unknown tokens only when the caller asks to
//!    parse special tokens, user-defined tokens always.
//! 2. Each remaining raw fragment has spaces replaced by `▁` and is split into UTF-8
//!    characters; adjacent symbols are merged greedily, always taking the pair whose merged
//!    text is a vocabulary token with the highest score (leftmost on ties).
//! 3. A symbol that is not a token falls back to its bytes (`<0xXX>` tokens).
//!
//! Hand-written rather than taken from the `tokenizers` crate: that crate needs merges (a BPE
//! model) or a Unigram lattice, and GGUF has neither; converting scores to merges is what
//! transformers does at a cost of 20+ seconds per load.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// Token types as stored in `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    pub fn from_gguf(v: i32) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Errors building a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
}

/// The special ids a model needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: u32,
    pub eos: u32,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub start_of_turn: Option<u32>,
    pub end_of_turn: Option<u32>,
}

/// A vocabulary with scores and types, and llama.cpp's SPM algorithm over it.
pub struct SpmTokenizer {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
    index: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<u32>,
    byte_tokens: [Option<u32>; 256],
    add_space_prefix: bool,
    pub add_bos: bool,
    pub add_eos: bool,
    pub special: SpecialIds,
}

const SPACE_ESCAPE: char = '\u{2581}';

impl std::fmt::Debug for SpmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpmTokenizer")
            .field("vocab", &self.tokens.len())
            .field("specials", &self.specials.len())
            .field("special", &self.special)
            .finish()
    }
}

/// Inputs for [`SpmTokenizer::new`].
pub struct SpmVocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<TokenType>,
    pub bos: u32,
    pub eos: u32,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then_with(|| other.left.cmp(&self.left))
    }
}

enum Fragment {
    Raw(std::ops::Range<usize>),
    Token(u32),
}

impl SpmTokenizer {
    pub fn new(v: SpmVocab) -> Result<Self, TokenizerError> {
        let n = v.tokens.len();
        if v.scores.len() != n || v.types.len() != n {
            return Err(TokenizerError::Metadata(format!(
                "{} tokens but {} scores and {} types",
                n,
                v.scores.len(),
                v.types.len()
            )));
        }
        let mut index = HashMap::with_capacity(n);
        for (i, t) in v.tokens.iter().enumerate() {
            // First occurrence wins on duplicates, as in llama.cpp's token_to_id map.
            index.entry(t.clone()).or_insert(i as u32);
        }
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                matches!(v.types[i as usize], TokenType::Control | TokenType::UserDefined | TokenType::Unknown)
                    && !v.tokens[i as usize].is_empty()
            })
            .collect();
        specials.sort_by(|&a, &b| v.tokens[b as usize].len().cmp(&v.tokens[a as usize].len()));
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = index.get(&format!("<0x{b:02X}>")).copied();
        }
        let start_of_turn = index.get("<start_of_turn>").copied();
        let end_of_turn = index.get("<end_of_turn>").copied();
        for id in [Some(v.bos), Some(v.eos), v.pad, v.unk].into_iter().flatten() {
            if id as usize >= n {
                return Err(TokenizerError::Metadata(format!("special id {id} outside vocab of {n}")));
            }
        }
        Ok(Self {
            special: SpecialIds { bos: v.bos, eos: v.eos, pad: v.pad, unk: v.unk, start_of_turn, end_of_turn },
            tokens: v.tokens,
            scores: v.scores,
            types: v.types,
            index,
            specials,
            byte_tokens,
            add_space_prefix: v.add_space_prefix,
            add_bos: v.add_bos,
            add_eos: v.add_eos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Tokenizes `text`. `add_special` adds BOS (and EOS) as the vocabulary asks;
    /// `parse_special` lets control tokens such as `<start_of_turn>` be written in the text.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.push(self.special.bos);
        }
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Raw(r) => {
                    let mut s = String::with_capacity(r.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(&text[r]);
                    let escaped = s.replace(' ', "\u{2581}");
                    self.encode_raw(&escaped, &mut out);
                    prev_special = false;
                }
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        if add_special && self.add_eos {
            out.push(self.special.eos);
        }
        out
    }

    /// Splits text around special tokens, longest token text first (llama.cpp's
    /// `tokenizer_st_partition`).
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Raw(0..text.len())];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.specials {
            let ty = self.types[id as usize];
            if !parse_special && matches!(ty, TokenType::Control | TokenType::Unknown) {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            // Cheap rejection before walking the fragments.
            if !text.contains(needle) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Token(_) => next.push(f),
                    Fragment::Raw(r) => {
                        let mut pos = r.start;
                        while let Some(found) = text[pos..r.end].find(needle) {
                            let at = pos + found;
                            if at > pos {
                                next.push(Fragment::Raw(pos..at));
                            }
                            next.push(Fragment::Token(id));
                            pos = at + needle.len();
                        }
                        if pos < r.end {
                            next.push(Fragment::Raw(pos..r.end));
                        }
                    }
                }
            }
            frags = next;
        }
        frags
    }

    fn encode_raw(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, ch)) in text.char_indices().enumerate() {
            let len = ch.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
            });
        }
        let mut heap = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.try_add_bigram(text, &symbols, i - 1, i, &mut heap);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            // Skip pairs whose symbols changed since the pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            if let Some(p) = symbols[b.left].prev {
                self.try_add_bigram(text, &symbols, p, b.left, &mut heap);
            }
            if let Some(n) = symbols[b.left].next {
                self.try_add_bigram(text, &symbols, b.left, n, &mut heap);
            }
        }
        let mut i = Some(0);
        while let Some(idx) = i {
            let s = symbols[idx];
            let piece = &text[s.start..s.start + s.len];
            match self.index.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    // Merged symbols are always tokens, so only single characters get here.
                    for b in piece.bytes() {
                        match self.byte_tokens[b as usize] {
                            Some(id) => out.push(id),
                            None => out.extend(self.special.unk),
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    fn try_add_bigram(&self, text: &str, symbols: &[Symbol], left: usize, right: usize, heap: &mut BinaryHeap<Bigram>) {
        let (l, r) = (symbols[left], symbols[right]);
        let merged = &text[l.start..r.start + r.len];
        if let Some(&id) = self.index.get(merged) {
            heap.push(Bigram { left, right, score: self.scores[id as usize], size: merged.len() });
        }
    }

    /// The bytes a token stands for. Control and unknown tokens render as their text only
    /// when `special` is set (llama.cpp's `token_to_piece`).
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unknown if !special => Vec::new(),
            TokenType::Control | TokenType::Unknown | TokenType::UserDefined => text.as_bytes().to_vec(),
            TokenType::Normal => text.replace(SPACE_ESCAPE, " ").into_bytes(),
            TokenType::Byte => {
                let hex = text.trim_start_matches("<0x").trim_end_matches('>');
                u8::from_str_radix(hex, 16).map(|b| vec![b]).unwrap_or_default()
            }
            TokenType::Unused => Vec::new(),
        }
    }

    /// Decodes ids to text; invalid UTF-8 (a split multi-byte character) is replaced.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id, special));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Score of a token (for diagnostics and tests).
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> SpmTokenizer {
        // A toy vocabulary: ids 0..3 special, then pieces with scores, then bytes.
        let mut tokens: Vec<String> =
            ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<b>"].iter().map(|s| s.to_string()).collect();
        let mut types = vec![
            TokenType::Control,
            TokenType::Control,
            TokenType::Control,
            TokenType::Unknown,
            TokenType::Control,
            TokenType::UserDefined,
        ];
        let mut scores = vec![0.0; tokens.len()];
        for (t, s) in [("a", -1.0), ("b", -1.0), ("c", -1.0), ("ab", -2.0), ("bc", -0.5), ("▁", -1.0), ("▁a", -3.0)]
        {
            tokens.push(t.into());
            types.push(TokenType::Normal);
            scores.push(s);
        }
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TokenType::Byte);
            scores.push(0.0);
        }
        SpmTokenizer::new(SpmVocab {
            tokens,
            scores,
            types,
            bos: 2,
            eos: 1,
            pad: Some(0),
            unk: Some(3),
            add_bos: true,
            add_eos: false,
            add_space_prefix: false,
        })
        .unwrap()
    }

    #[test]
    fn merges_highest_score_first() {
        let t = toy();
        // "abc": "bc" (-0.5) beats "ab" (-2.0).
        let ids = t.encode("abc", false, false);
        assert_eq!(ids, vec![t.token_to_id("a").unwrap(), t.token_to_id("bc").unwrap()]);
    }

    #[test]
    fn byte_fallback_and_bos() {
        let t = toy();
        let ids = t.encode("é", true, false);
        assert_eq!(ids[0], 2);
        assert_eq!(&ids[1..], &[t.token_to_id("<0xC3>").unwrap(), t.token_to_id("<0xA9>").unwrap()]);
        assert_eq!(t.decode(&ids, false), "é");
    }

    #[test]
    fn special_tokens_only_when_asked_user_defined_always() {
        let t = toy();
        let sot = t.encode("<start_of_turn>", false, true);
        assert_eq!(sot, vec![4]);
        let plain = t.encode("<start_of_turn>", false, false);
        assert!(plain.len() > 1);
        let ud = t.encode("a<b>c", false, false);
        assert_eq!(ud, vec![t.token_to_id("a").unwrap(), 5, t.token_to_id("c").unwrap()]);
        assert_eq!(t.decode(&sot, false), "");
        assert_eq!(t.decode(&sot, true), "<start_of_turn>");
    }

    #[test]
    fn spaces_are_escaped() {
        let t = toy();
        let ids = t.encode(" a", false, false);
        assert_eq!(ids, vec![t.token_to_id("▁a").unwrap()]);
        assert_eq!(t.decode(&ids, false), " a");
        assert!(t.encode("", false, false).is_empty());
    }
}
