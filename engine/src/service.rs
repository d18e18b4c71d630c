//! The engine thread. The model owns a thread: async code sends it a command carrying its
//! tracing span and a reply channel, and never blocks the runtime on tensor work.

use crate::engine::{Engine, GenerateRequest, Generation, ModelInfo};
use crate::EngineError;
use std::sync::mpsc;
use tokio::sync::oneshot;

enum Command {
    Generate { req: GenerateRequest, span: tracing::Span, reply: oneshot::Sender<Result<Generation, EngineError>> },
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    info: ModelInfo,
}

impl EngineHandle {
    /// Moves `engine` onto its own thread and returns a handle to it. The thread ends when
    /// every handle is dropped.
    pub fn spawn(engine: Engine) -> Self {
        let info = engine.info.clone();
        let (tx, rx) = mpsc::channel::<Command>();
        std::thread::Builder::new()
            .name("medbatch-engine".into())
            .spawn(move || {
                let mut engine = engine;
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Command::Generate { req, span, reply } => {
                            let _g = span.entered();
                            let out = engine.generate(&req);
                            // The caller may have gone away; nothing to do then.
                            let _ = reply.send(out);
                        }
                    }
                }
            })
            .expect("spawn engine thread");
        Self { tx, info }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Generates on the engine thread.
    pub async fn generate(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Generate { req, span: tracing::Span::current(), reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}
