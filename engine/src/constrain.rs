//! Constrained decoding with llguidance: a grammar (a JSON schema, or a Lark grammar that may
//! embed JSON schemas and substring terminals) decides which tokens may come next; every
//! other token's logit is masked out before sampling, so the answer always parses.
//!
//! The vocabulary is handed to llguidance as the bytes each token stands for, built from
//! either tokenizer source (GGUF metadata or `tokenizer.json`); control tokens are marked
//! special so that no grammar can produce them inside text.

use crate::tokenizer::Tokenizer;
use crate::EngineError;
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// What a constrained answer must be.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON schema (llguidance's dialect: `x-guidance` options are honoured).
    JsonSchema(serde_json::Value),
    /// A Lark grammar in llguidance's syntax (`%json { … }`, `%regex { "substring_chunks": … }`).
    Lark(String),
}

impl Grammar {
    fn to_top_level(&self) -> TopLevelGrammar {
        match self {
            Self::JsonSchema(s) => TopLevelGrammar::from_json_schema(s.clone()),
            Self::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// The vocabulary as llguidance sees it, tokenizing with the model's own tokenizer.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false, false),
            // Grammar literals are text; a split character falls back to the trie.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles grammars against one model's vocabulary. Built once per engine (the token trie
/// over a 262k vocabulary takes a moment), shared by every sequence.
pub struct GuidanceFactory {
    factory: ParserFactory,
    vocab_size: usize,
    eos: u32,
    /// Tokens that end a sequence besides the trie's EOS (end of turn); allowed whenever
    /// the grammar allows EOS.
    also_stop: Vec<u32>,
}

impl GuidanceFactory {
    /// `vocab_size` is the model's logit width (it may exceed the tokenizer's vocabulary);
    /// `stop_ids` are the tokens that end generation.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, stop_ids: &[u32]) -> Result<Self, EngineError> {
        let words = tokenizer.trie_words(vocab_size);
        let special = tokenizer.special().clone();
        let info = TokRxInfo {
            vocab_size: vocab_size as u32,
            tok_eos: special.eos,
            tok_bos: Some(special.bos),
            tok_pad: special.pad,
            tok_unk: special.unk,
            tok_end_of_turn: special.end_of_turn,
        };
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(VocabEnv { trie, tokenizer });
        let mut factory =
            ParserFactory::new(&env, InferenceCapabilities::default(), &SlicedBiasComputer::general_slices())
                .map_err(|e| EngineError::Load(format!("grammar engine: {e}")))?;
        // llguidance logs lexemes (document text under copy grammars): keep it silent.
        factory.quiet();
        Ok(Self {
            factory,
            vocab_size,
            eos: special.eos,
            also_stop: stop_ids.iter().copied().filter(|&t| t != special.eos).collect(),
        })
    }

    /// A matcher for one sequence. Errors name the grammar problem; copy grammars may hold
    /// document text, so callers must not pass these messages on verbatim.
    pub fn matcher(&self, grammar: &Grammar) -> Result<SeqMatcher, EngineError> {
        let parser =
            self.factory.create_parser(grammar.to_top_level()).map_err(|e| EngineError::Grammar(e.to_string()))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(EngineError::Grammar(e));
        }
        Ok(SeqMatcher { m })
    }

    /// Sets every token the matcher forbids to −∞ in `logits` (one row of the vocabulary).
    /// Returns false when the grammar allows nothing (the parser failed).
    pub fn apply_mask(&self, mask: &SimpleVob, logits: &mut [f32]) -> bool {
        let eos_ok = mask.is_allowed(self.eos);
        let mut any = false;
        for (t, l) in logits.iter_mut().enumerate().take(self.vocab_size) {
            let ok = mask.is_allowed(t as u32) || (eos_ok && self.also_stop.contains(&(t as u32)));
            if ok {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        for l in logits.iter_mut().skip(self.vocab_size) {
            *l = f32::NEG_INFINITY;
        }
        any
    }
}

impl GuidanceFactory {
    /// The tokens `mask` allows as packed bits (bit `t % 8` of byte `t / 8`), over
    /// `bits.len() × 8` token ids; ids beyond the vocabulary are never allowed. Returns
    /// false when the grammar allows nothing (the parser failed).
    pub fn mask_bits(&self, mask: &SimpleVob, bits: &mut [u8]) -> bool {
        let eos_ok = mask.is_allowed(self.eos);
        bits.fill(0);
        let mut any = false;
        for t in 0..(bits.len() * 8).min(self.vocab_size) {
            if mask.is_allowed(t as u32) || (eos_ok && self.also_stop.contains(&(t as u32))) {
                bits[t / 8] |= 1 << (t % 8);
                any = true;
            }
        }
        any
    }
}

/// One sequence's grammar state.
pub struct SeqMatcher {
    m: Matcher,
}

impl SeqMatcher {
    /// Tokens allowed next.
    pub fn mask(&mut self) -> Result<SimpleVob, EngineError> {
        self.m.compute_mask().map_err(|e| EngineError::Grammar(e.to_string()))
    }

    /// Advances past a sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), EngineError> {
        self.m.consume_token(token).map_err(|e| EngineError::Grammar(e.to_string()))
    }

    /// The answer so far is complete.
    pub fn is_accepting(&mut self) -> bool {
        self.m.is_accepting().unwrap_or(false)
    }

    /// Nothing more can follow: the answer is complete.
    pub fn is_stopped(&self) -> bool {
        self.m.is_stopped()
    }
}

impl Tokenizer {
    /// The bytes of every token id below `vocab_size`, as llguidance's token trie wants
    /// them: text tokens as their UTF-8 bytes (SentencePiece's `▁` as a space, `<0xNN>` as
    /// that byte), control tokens as a 0xFF marker followed by their name, ids the
    /// tokenizer does not know (logit padding) as special tokens that never match text.
    pub fn trie_words(&self, vocab_size: usize) -> Vec<Vec<u8>> {
        (0..vocab_size as u32)
            .map(|id| match self.text_piece(id) {
                Some(TrieWord::Text(b)) => b,
                Some(TrieWord::Special(name)) => special_word(&name),
                None => special_word(&format!("<[{id}]>")),
            })
            .collect()
    }
}

/// How one token appears to the grammar.
pub enum TrieWord {
    /// Text bytes.
    Text(Vec<u8>),
    /// A control token, by name.
    Special(String),
}

fn special_word(name: &str) -> Vec<u8> {
    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    w.extend_from_slice(name.as_bytes());
    w
}

/// Bytes of a SentencePiece-style piece: `<0xNN>` is that byte, `▁` a space.
pub fn piece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|s| s.strip_suffix('>')) {
        if hex.len() == 2 {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_map_to_bytes() {
        assert_eq!(piece_bytes("<0x0A>"), b"\n");
        assert_eq!(piece_bytes("\u{2581}the"), b" the");
        assert_eq!(piece_bytes("<0xZZ>"), b"<0xZZ>");
        assert_eq!(piece_bytes("<start_of_turn>"), b"<start_of_turn>");
        assert_eq!(special_word("<eos>")[0], 0xFF);
    }
}
