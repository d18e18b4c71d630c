//! Model families: each loads itself from its weights and runs its own forward pass.
//!
//! - [`gemma3`]: the Gemma 3 / MedGemma text decoder, split over tensor-parallel ranks;
//! - [`siglip`]: the SigLIP vision tower and Gemma 3's multimodal projector.

pub mod gemma3;
pub mod siglip;
