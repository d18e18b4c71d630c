//! Reading models from their files: GGUF ([`gguf`]), Hugging Face checkpoints ([`hf`],
//! [`hf_config`]) and the decoder's resolved hyper-parameters ([`config`]).

pub mod config;
pub mod gguf;
pub mod hf;
pub mod hf_config;
pub mod siglip;
