//! What the worker's job tests share: the tiny random-weight model, a one-note job of the
//! `note-medications` pipeline, and a worker context over a store.

use medbatch_connectors::inputs::InputSource;
use medbatch_connectors::store::ObjectStore;
use medbatch_engine::{EngineHandle, ModelInfo};
use medbatch_schemas::{Digest, InputKind, InputRef, Job, ModelRef, RunId, Selection};
use medbatch_worker::{LoadedPipeline, WorkerContext};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The tiny text model (`gqa_window`) with the fixture tokenizer, copied into `dir/model`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf");
    let model_dir = dir.join("model");
    std::fs::create_dir(&model_dir).unwrap();
    for d in [fixtures.join("models/gqa_window"), fixtures.join("tokenizer")] {
        for f in std::fs::read_dir(d).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, model_dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    model_dir
}

/// The shipped `note-medications` pipeline.
pub fn note_pipeline() -> LoadedPipeline {
    LoadedPipeline::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/note-medications").to_str().unwrap())
        .unwrap()
}

/// A job of run `run` over one note written into `dir`, for `pipeline` on the model `info`
/// describes, with its output under `dir/out` (returned).
pub fn one_note_job(dir: &Path, run: &str, pipeline: &LoadedPipeline, info: &ModelInfo) -> (Job, PathBuf) {
    let note = dir.join("note.txt");
    std::fs::write(&note, "Started metformin 500 mg twice daily.\n").unwrap();
    let bytes = std::fs::read(&note).unwrap();
    let input = InputRef {
        uri: format!("file://{}", note.display()),
        size: bytes.len() as u64,
        sha256: Digest::of_bytes(&bytes),
        kind: InputKind::Text,
        selection: Selection::Whole,
        etag: None,
        case: None,
    };
    let out = dir.join("out");
    let job = Job::new(
        RunId::new(run).unwrap(),
        pipeline.reference(),
        ModelRef { id: info.id.clone(), digest: Digest::parse(&info.digest).unwrap() },
        vec![input],
        out.display().to_string(),
    );
    (job, out)
}

/// A worker context running `pipeline` on `engine` into `store`, reading local files.
pub fn context(store: Arc<dyn ObjectStore>, engine: EngineHandle, pipeline: LoadedPipeline) -> WorkerContext {
    WorkerContext {
        store,
        engine: Some(engine),
        embedder: None,
        pipeline: medbatch_worker::pipelines::for_spec(Arc::new(pipeline)).unwrap(),
        worker_id: "w".into(),
        events: None,
        inputs: InputSource::local(),
    }
}
