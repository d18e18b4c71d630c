//! The localization answer's grammar and thinking trace on the demo model's vocabulary (Gemma
//! 3's, as MedGemma 1.5's): an answer that thinks between `<unused94>` and `<unused95>`,
//! reasons, and ends with `Final Answer: ```json[…]```` is accepted token by token; an answer
//! that skips the fence or gives a box of three numbers is refused; the trace is dropped from
//! the text that is parsed.

use medbatch_engine::constrain::GuidanceFactory;
use medbatch_engine::load::gguf::GgufFile;
use medbatch_engine::tokenizer::Tokenizer;
use medbatch_worker::grammar::localize_grammar;
use medbatch_worker::model_call::after_thinking;
use std::path::PathBuf;
use std::sync::Arc;

fn demo_tokenizer() -> Arc<Tokenizer> {
    let p = std::env::var_os("MEDBATCH_DEMO_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/medbatch/models/gemma-3-270m-q4_k_m.gguf")
    });
    assert!(p.is_file(), "demo model missing at {}: run `bash infra/fetch-demo-model.sh`", p.display());
    Arc::new(Tokenizer::Spm(Box::new(GgufFile::open(&p).unwrap().tokenizer().unwrap())))
}

fn schema() -> serde_json::Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipelines/cxr-localize/schema.json");
    serde_json::from_slice(&std::fs::read(root).unwrap()).unwrap()
}

/// Whether the grammar takes `answer` (tokenized with special tokens) to its end.
fn accepts(factory: &GuidanceFactory, tok: &Tokenizer, grammar: &medbatch_engine::Grammar, answer: &str) -> bool {
    let mut m = factory.matcher(grammar).unwrap();
    for t in tok.encode(answer, false, true) {
        let mask = m.mask().unwrap();
        if !mask.is_allowed(t) || m.consume(t).is_err() {
            return false;
        }
    }
    m.is_accepting()
}

#[test]
fn a_thinking_answer_with_boxes_is_accepted_and_its_trace_dropped() {
    let tok = demo_tokenizer();
    let one = |name: &str| match tok.encode(name, false, true)[..] {
        [id] => id,
        ref other => panic!("{name} is {other:?}"),
    };
    let (start, end) = (one("<unused94>"), one("<unused95>"));
    let special = tok.special().clone();
    let factory = GuidanceFactory::new(tok.clone(), tok.vocab_size(), &[special.eos]).unwrap();
    let grammar = localize_grammar(&schema(), Some((start, end)), 64);
    let answer = "The heart is in the middle of the chest. Final Answer: ```json[{\"box_2d\": [420, 310, 760, 690], \"label\": \"heart\"}]```";
    let thought = format!("<unused94>thought\nThe cardiac silhouette is left of midline.<unused95>{answer}");
    assert!(accepts(&factory, &tok, &grammar, &thought), "a thinking answer");
    assert!(accepts(&factory, &tok, &grammar, answer), "an answer that does not think");
    let two = answer.replace("}]", "}, {\"box_2d\": [1, 2, 3, 4], \"label\": \"apex\"}]");
    assert!(accepts(&factory, &tok, &grammar, &two), "two boxes");
    assert!(!accepts(&factory, &tok, &grammar, "Final Answer: [{\"box_2d\": [1, 2, 3, 4], \"label\": \"x\"}]"));
    assert!(!accepts(&factory, &tok, &grammar, &answer.replace("[420, 310, 760, 690]", "[420, 310, 760]")));
    assert!(!accepts(&factory, &tok, &grammar, &answer.replace("760", "1760")), "0-1000 only");
    // The trace is dropped from what is parsed.
    let ids = tok.encode(&thought, false, true);
    assert_eq!(after_thinking(&ids, end, &tok).as_deref(), Some(answer));
    assert_eq!(after_thinking(&tok.encode(answer, false, true), end, &tok), None);
}
