//! The tokenizer a model comes with: built from GGUF metadata (SentencePiece, [`spm`]), or a
//! Hugging Face `tokenizer.json` read by the `tokenizers` crate ([`hf`]), behind one
//! interface.

pub mod hf;
pub mod siglip;
pub mod spm;

pub use hf::HfTokenizer;
pub use spm::{SpecialIds, SpmTokenizer, SpmVocab, TokenType};

use crate::constrain::{piece_bytes, TrieWord};

/// Either kind of tokenizer, behind one interface.
pub enum Tokenizer {
    Spm(Box<SpmTokenizer>),
    Hf(Box<HfTokenizer>),
}

impl Tokenizer {
    pub fn special(&self) -> &SpecialIds {
        match self {
            Self::Spm(t) => &t.special,
            Self::Hf(t) => &t.special,
        }
    }

    /// Token ids of `text`. `add_special` adds BOS as the tokenizer is configured to;
    /// `parse_special` lets control tokens be written in the text (a `tokenizer.json`
    /// always recognizes its added tokens, so it ignores this flag).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        match self {
            Self::Spm(t) => t.encode(text, add_special, parse_special),
            Self::Hf(t) => t.inner.encode(text, add_special).map(|e| e.get_ids().to_vec()).unwrap_or_default(),
        }
    }

    /// Text of `ids`; control tokens are rendered only with `special`.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        match self {
            Self::Spm(t) => t.decode(ids, special),
            Self::Hf(t) => t.inner.decode(ids, !special).unwrap_or_default(),
        }
    }

    /// Bytes of one token (control tokens only with `special`).
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        match self {
            Self::Spm(t) => t.token_bytes(id, special),
            Self::Hf(t) => t.inner.decode(&[id], !special).map(String::into_bytes).unwrap_or_default(),
        }
    }

    /// How token `id` appears in text, for grammars: its bytes, or the name of a control
    /// token; None for an id the tokenizer does not have. Both sources are SentencePiece
    /// vocabularies (`▁` for spaces, `<0xNN>` byte fallback), as Gemma's are.
    pub fn text_piece(&self, id: u32) -> Option<TrieWord> {
        match self {
            Self::Spm(t) => {
                let piece = t.id_to_token(id)?;
                Some(match t.token_type(id)? {
                    TokenType::Control | TokenType::Unknown | TokenType::Unused => TrieWord::Special(piece.to_string()),
                    TokenType::UserDefined => TrieWord::Text(piece.as_bytes().to_vec()),
                    TokenType::Normal | TokenType::Byte => TrieWord::Text(piece_bytes(piece)),
                })
            }
            Self::Hf(t) => {
                let piece = t.inner.id_to_token(id)?;
                Some(if t.control.contains(&id) {
                    TrieWord::Special(piece)
                } else {
                    TrieWord::Text(piece_bytes(&piece))
                })
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Spm(t) => t.vocab_size(),
            Self::Hf(t) => t.inner.get_vocab_size(true),
        }
    }
}
