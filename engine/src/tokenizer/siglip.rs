//! SigLIP's text tokenizer (MedSigLIP): a `tokenizer.json` (SentencePiece Unigram) read by
//! the `tokenizers` crate, with SigLIP's fixed-length framing: `</s>` closes the text, which
//! is cut to `max_length - 1` tokens before it and padded with the pad id (`</s>`, id 1, as
//! SigLIP's tokenizer pads) to exactly `max_length` (64) — the text tower reads the last
//! position.

use crate::EngineError;
use std::path::Path;

pub struct SiglipTokenizer {
    inner: tokenizers::Tokenizer,
    max_length: usize,
    eos: u32,
}

impl SiglipTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, EngineError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let eos =
            inner.token_to_id("</s>").ok_or_else(|| EngineError::Load(format!("{}: no </s> token", path.display())))?;
        if max_length < 2 {
            return Err(EngineError::Load(format!("a text length of {max_length} tokens")));
        }
        Ok(Self { inner, max_length, eos })
    }

    /// The longest text the tower reads whole, in tokens (`max_length` less the `</s>`).
    pub fn capacity(&self) -> usize {
        self.max_length - 1
    }

    /// Tokens of `text` before `</s>`, unpadded and uncut (to split long texts in chunks
    /// that fit [`Self::capacity`]).
    pub fn count(&self, text: &str) -> Result<usize, EngineError> {
        let canonical: String = text.chars().filter(|c| !c.is_ascii_punctuation()).collect();
        let enc = self.inner.encode(canonical, false).map_err(|e| EngineError::Request(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().iter().filter(|&&i| i != self.eos).count())
    }

    /// Exactly `max_length` token ids for `text`. Every ASCII punctuation mark is removed
    /// first, as the reference tokenizer's text canonicalization does (the `tokenizer.json`
    /// Google ships leaves `/`, `<` and `>` in); the tokenizer's normalizer then lower-cases
    /// and collapses spaces.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let canonical: String = text.chars().filter(|c| !c.is_ascii_punctuation()).collect();
        let enc = self.inner.encode(canonical, true).map_err(|e| EngineError::Request(format!("tokenizer: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.last() != Some(&self.eos) {
            ids.push(self.eos);
        }
        if ids.len() > self.max_length {
            ids.truncate(self.max_length - 1);
            ids.push(self.eos);
        }
        ids.resize(self.max_length, self.eos);
        Ok(ids)
    }
}
