//! The medbatch inference engine: Gemma 3 / MedGemma on candle.
//!
//! It owns model loading (GGUF files and Hugging Face safetensors checkpoints), tokenizers
//! and chat templates, the
//! per-sequence KV caches, greedy decoding with stop conditions, reuse of a cached prompt
//! prefix, and the engine thread that async callers talk to through [`EngineHandle`].
//! It never touches queues, object stores or output files.

pub mod comm;
#[cfg(feature = "cuda")]
pub mod comm_nccl;
pub mod constrain;
pub mod describe;
pub mod embed;
pub mod engine;
pub mod image;
pub mod kernels;
pub mod kv;
pub mod load;
pub mod models;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod tokenizer;

pub use constrain::Grammar;
pub use engine::{Engine, Finish, GenerateRequest, Generation, ModelInfo};
pub use scheduler::Active;
pub use service::EngineHandle;

/// Errors at the engine boundary.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model could not be loaded (missing file, wrong architecture, bad tensor).
    #[error("model load failed: {0}")]
    Load(String),
    /// A forward pass failed.
    #[error("inference failed: {0}")]
    Compute(String),
    /// The request is invalid (empty prompt, prompt longer than the context).
    #[error("invalid request: {0}")]
    Request(String),
    /// A grammar could not be compiled or could not continue.
    #[error("grammar: {0}")]
    Grammar(String),
    /// The engine thread is gone.
    #[error("engine stopped")]
    Stopped,
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Compute(e.to_string())
    }
}

impl EngineError {
    /// Stable label for error rows and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Load(_) => "model_load",
            Self::Compute(_) => "inference",
            Self::Request(_) => "invalid_request",
            Self::Grammar(_) => "grammar",
            Self::Stopped => "engine_stopped",
        }
    }
}
