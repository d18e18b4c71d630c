//! Behind the engine thread, a request's images go through the vision tower on a blocking
//! thread of the runtime, not on the engine thread (which goes on stepping the other
//! sequences meanwhile), and the answers are those the engine gives when it encodes them
//! itself. Checked on the multimodal fixture, with a tracing layer noting the thread each
//! `vision_tower` span is made on.

use medbatch_engine::engine::{Engine, GenerateRequest};
mod support;

use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use support::decode;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Names of the threads the vision tower ran on.
#[derive(Clone, Default)]
struct TowerThreads(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for TowerThreads {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _: &tracing::span::Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "vision_tower" {
            let name = std::thread::current().name().unwrap_or("unnamed").to_string();
            self.0.lock().unwrap().push(name);
        }
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

#[test]
fn images_are_encoded_off_the_engine_thread() {
    let threads = TowerThreads::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(threads.clone())).unwrap();
    let dir = fixtures().join("multimodal/mm_window");
    let r: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let reqs: Vec<GenerateRequest> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| GenerateRequest {
            prompt: p["text"].as_str().unwrap().to_string(),
            chat: false,
            add_bos: true,
            parse_special: true,
            max_new_tokens: 8,
            stop: Vec::new(),
            sampling: Default::default(),
            grammar: None,
            images: p["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| Arc::new(decode(&std::fs::read(fixtures().join(i.as_str().unwrap())).unwrap()).unwrap()))
                .collect(),
        })
        .collect();
    let mut engine = Engine::load(&dir).unwrap();
    let want: Vec<Vec<u32>> = reqs.iter().map(|q| engine.generate(q).unwrap().ids).collect();
    let here = threads.0.lock().unwrap().drain(..).count();
    assert_eq!(here, 3, "the engine alone encodes the three images on the calling thread");

    let handle = medbatch_engine::EngineHandle::spawn(engine);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let got: Vec<Vec<u32>> = rt.block_on(async {
        // Both requests at once, as a worker's jobs send them.
        let tasks: Vec<_> = reqs
            .iter()
            .map(|q| {
                let (h, q) = (handle.clone(), q.clone());
                tokio::spawn(async move { h.generate(q).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap().ids);
        }
        out
    });
    assert_eq!(got, want, "the same answers when the images are encoded before admission");
    let names = threads.0.lock().unwrap().clone();
    assert_eq!(names.len(), 3, "each image encoded once: {names:?}");
    assert!(names.iter().all(|n| n != "medbatch-engine"), "the tower ran on the engine thread: {names:?}");
    assert!(handle.busy_for().is_none(), "nothing is under way after the answers");
}
