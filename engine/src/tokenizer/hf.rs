//! A Hugging Face `tokenizer.json`, read by the `tokenizers` crate.

use super::SpecialIds;
use crate::EngineError;
use std::path::Path;

/// A `tokenizer.json` tokenizer with the ids a Gemma model needs.
pub struct HfTokenizer {
    pub(super) inner: tokenizers::Tokenizer,
    pub special: SpecialIds,
    /// Added tokens marked special (control tokens such as `<start_of_turn>`).
    pub(super) control: std::collections::HashSet<u32>,
}

impl HfTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let id = |t: &str| inner.token_to_id(t);
        let special = SpecialIds {
            bos: id("<bos>").unwrap_or(2),
            eos: id("<eos>").unwrap_or(1),
            pad: id("<pad>"),
            unk: id("<unk>"),
            start_of_turn: id("<start_of_turn>"),
            end_of_turn: id("<end_of_turn>"),
        };
        let control =
            inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        Ok(Self { inner, special, control })
    }
}
