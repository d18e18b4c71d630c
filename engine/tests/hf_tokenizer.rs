//! `tokenizer.json` through the tokenizers crate and the chat template through minijinja,
//! against what transformers produced for the fixture tokenizer (tests/fixtures/hf/tokenizer,
//! made by make_fixtures.py): the same ids, the same rendered chats, exactly one BOS.

use medbatch_engine::load::hf::ChatTemplate;
use medbatch_engine::tokenizer::{HfTokenizer, Tokenizer};
use medbatch_engine::Engine;
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf/tokenizer")
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(dir().join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn encodes_and_decodes_like_transformers() {
    let tok = Tokenizer::Hf(Box::new(HfTokenizer::from_file(&dir().join("tokenizer.json")).unwrap()));
    let e = expected();
    assert_eq!(tok.special().bos, 2);
    assert_eq!(tok.special().end_of_turn, Some(106));
    for case in e["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true, false), ids(&case["ids_add_special_tokens"]), "{text:?}");
        let plain = ids(&case["ids_no_special_tokens"]);
        assert_eq!(tok.encode(text, false, false), plain, "{text:?}");
        assert_eq!(tok.decode(&plain, false), case["decode_skip_special_tokens"].as_str().unwrap(), "{text:?}");
    }
}

#[test]
fn chat_template_renders_like_transformers_with_one_bos() {
    let template = ChatTemplate::find(&dir()).unwrap().expect("fixture has a template");
    let tok = Tokenizer::Hf(Box::new(HfTokenizer::from_file(&dir().join("tokenizer.json")).unwrap()));
    for (name, case) in expected()["chat"].as_object().unwrap() {
        let rendered = template.render(&case["messages"]).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{name}");
        let without = template.render_with(&case["messages"], false).unwrap();
        assert_eq!(without, case["rendered_without_generation_prompt"].as_str().unwrap(), "{name}");
        // The template writes BOS itself: tokenizing without special tokens gives one BOS.
        assert!(template.writes_bos());
        let got = tok.encode(&rendered, false, true);
        assert_eq!(got, ids(&case["ids"]), "{name}");
        assert_eq!(got.iter().filter(|&&t| t == 2).count(), 1, "{name}: exactly one BOS");
    }
    // Roles must alternate, as the template demands.
    let bad = serde_json::json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    assert!(template.render(&bad).is_err());
}

#[test]
fn a_checkpoint_folder_serves_chat_requests_with_its_template() {
    // A fixture model with the fixture tokenizer beside it, as a user's checkpoint folder.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf");
    let ckpt = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root.join("models/gqa_window").join(f), ckpt.path().join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(dir().join(f), ckpt.path().join(f)).unwrap();
    }
    let mut engine = Engine::load(ckpt.path()).unwrap();
    let (prompt, add_bos) = engine.chat_prompt("List the key findings.").unwrap();
    assert!(prompt.starts_with("<bos><start_of_turn>user\n") && !add_bos, "{prompt:?}");
    let g = engine
        .generate(&medbatch_engine::GenerateRequest {
            prompt: "List the key findings.".into(),
            chat: true,
            add_bos: true,
            parse_special: false,
            max_new_tokens: 4,
            stop: Vec::new(),
            sampling: Default::default(),
            grammar: None,
            images: Vec::new(),
        })
        .unwrap();
    assert!(g.ids.len() <= 4);
    let template_ids = engine.tokenizer.encode(&prompt, false, true);
    assert_eq!(g.prompt_tokens as usize, template_ids.len());
    assert_eq!(template_ids.iter().filter(|&&t| t == 2).count(), 1);
}
