//! Constrained decoding on the demo model's 262k vocabulary: the vocabulary as grammar
//! words from both tokenizer sources (GGUF metadata and tokenizer.json), JSON-schema answers
//! that always parse and validate (batched as one at a time), copy grammars that only
//! produce substrings of a source text, and answers cut off by the token limit.

use medbatch_engine::tokenizer::spm::TokenType;
use medbatch_engine::tokenizer::{HfTokenizer, Tokenizer};
use medbatch_engine::{Engine, Finish, GenerateRequest, Grammar};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

fn demo_engine() -> Engine {
    let p = std::env::var_os("MEDBATCH_DEMO_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/medbatch/models/gemma-3-270m-q4_k_m.gguf")
    });
    assert!(p.is_file(), "demo model missing at {}: run `bash infra/fetch-demo-model.sh`", p.display());
    Engine::load_gguf(&p, None).unwrap()
}

fn request(prompt: &str, grammar: Grammar, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        chat: false,
        add_bos: true,
        parse_special: false,
        max_new_tokens,
        stop: vec!["\n".into()],
        sampling: Default::default(),
        grammar: Some(grammar),
        images: Vec::new(),
    }
}

fn note_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "age": { "type": "integer", "minimum": 0, "maximum": 120 },
            "sex": { "enum": ["female", "male", "unknown"] },
            "smoker": { "type": "boolean" },
            "weight_kg": { "type": ["number", "null"] },
            "diagnoses": { "type": "array", "items": { "type": "string", "maxLength": 24 }, "maxItems": 3 },
            "vitals": {
                "type": "object",
                "properties": {
                    "hr": { "type": "integer", "minimum": 20, "maximum": 250 },
                    "bp": { "type": "string", "pattern": "^[0-9]{2,3}/[0-9]{2,3}$" }
                },
                "required": ["hr", "bp"],
                "additionalProperties": false
            }
        },
        "required": ["age", "sex", "smoker", "weight_kg", "diagnoses", "vitals"],
        "additionalProperties": false,
        "x-guidance": { "whitespace_flexible": false }
    })
}

/// Checks an answer against `note_schema` by hand (every keyword the schema uses).
fn check_note(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    let keys: Vec<&str> = o.keys().map(String::as_str).collect();
    if keys != ["age", "sex", "smoker", "weight_kg", "diagnoses", "vitals"] {
        return Err(format!("keys {keys:?}"));
    }
    let age = o["age"].as_i64().ok_or("age not an integer")?;
    if !(0..=120).contains(&age) {
        return Err(format!("age {age}"));
    }
    if !["female", "male", "unknown"].contains(&o["sex"].as_str().ok_or("sex not a string")?) {
        return Err("sex not in enum".into());
    }
    o["smoker"].as_bool().ok_or("smoker not a boolean")?;
    if !(o["weight_kg"].is_null() || o["weight_kg"].is_number()) {
        return Err("weight_kg".into());
    }
    let d = o["diagnoses"].as_array().ok_or("diagnoses not an array")?;
    if d.len() > 3 || d.iter().any(|x| x.as_str().is_none_or(|s| s.chars().count() > 24)) {
        return Err("diagnoses".into());
    }
    let vit = o["vitals"].as_object().ok_or("vitals not an object")?;
    let hr = vit.get("hr").and_then(Value::as_i64).ok_or("hr")?;
    let bp = vit.get("bp").and_then(Value::as_str).ok_or("bp")?;
    let (sys, dia) = bp.split_once('/').ok_or("bp pattern")?;
    let digits = |s: &str| (2..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    if vit.len() != 2 || !(20..=250).contains(&hr) || !digits(sys) || !digits(dia) {
        return Err("vitals".into());
    }
    Ok(())
}

const NOTES: [&str; 4] = [
    "67-year-old man, current smoker, BP 142/88, HR 91, weight 82 kg. COPD, hypertension.",
    "Woman aged 34, never smoked. Pulse 72, blood pressure 118/76. Asthma.",
    "Pt 80 yo F, ex-smoker, HR 58 BP 160/95, wt 61.5kg, dx: atrial fibrillation, CKD stage 3",
    "Newborn, 3 days old, weight 3.2 kg, heart rate 140, BP 65/40, jaundice.",
];

fn note_prompt(note: &str) -> String {
    format!("Clinical notes as JSON.\n\nNote: {note}\nJSON: ")
}

#[test]
fn json_schema_answers_parse_and_validate_batched_as_alone() {
    let mut engine = demo_engine();
    let grammar = Grammar::JsonSchema(note_schema());
    let reqs: Vec<GenerateRequest> = NOTES.iter().map(|n| request(&note_prompt(n), grammar.clone(), 200)).collect();
    let batched = engine.generate_batch(&reqs);
    for (r, g) in reqs.iter().zip(&batched) {
        let g = g.as_ref().unwrap();
        assert_eq!(g.finish, Finish::Stop, "{:?}", g.text);
        let v: Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {}", g.text));
        check_note(&v).unwrap_or_else(|e| panic!("{e}: {}", g.text));
        // Masks do not depend on what else is in the batch.
        let alone = engine.generate(r).unwrap();
        assert_eq!(alone.ids, g.ids);
    }
    assert!(engine.stats.masks > 0 && engine.stats.mask_ns > 0);
    // The unconstrained model does not write valid answers on its own for these prompts,
    // which is what the grammar is for.
    let free: Vec<GenerateRequest> = reqs.iter().map(|r| GenerateRequest { grammar: None, ..r.clone() }).collect();
    let valid_free = engine
        .generate_batch(&free)
        .into_iter()
        .filter(|g| {
            serde_json::from_str::<Value>(&g.as_ref().unwrap().text).ok().is_some_and(|v| check_note(&v).is_ok())
        })
        .count();
    assert!(valid_free < NOTES.len(), "every free answer already valid: the test shows nothing");
}

#[test]
fn answer_cut_by_the_token_limit_finishes_with_length() {
    let mut engine = demo_engine();
    let g = engine.generate(&request(&note_prompt(NOTES[0]), Grammar::JsonSchema(note_schema()), 6)).unwrap();
    assert_eq!(g.finish, Finish::Length);
    assert_eq!(g.ids.len(), 6);
    assert!(serde_json::from_str::<Value>(&g.text).is_err(), "{}", g.text);
    assert!(g.text.starts_with('{'), "{}", g.text);
}

#[test]
fn copy_grammar_only_produces_substrings_of_the_source() {
    let mut engine = demo_engine();
    let sources = ["Amoxicillin 500 mg three times daily for 7 days", "Metformin 1 g twice a day with meals"];
    for source in sources {
        let chunks: Vec<String> = source.chars().map(|c| c.to_string()).collect();
        let lark = format!(
            "start: \"{{\\\"drug\\\":\" COPY \",\\\"dose\\\":\" COPY \"}}\"\nCOPY: \"\\\"\" %regex {{ \"substring_chunks\": {} }} \"\\\"\"\n",
            serde_json::to_string(&chunks).unwrap()
        );
        let prompt = format!(
            "Prescriptions as JSON.\n\nText: Lisinopril 10 mg once daily\nJSON: {{\"drug\":\"Lisinopril\",\"dose\":\"10 mg\"}}\n\nText: {source}\nJSON: "
        );
        let g = engine.generate(&request(&prompt, Grammar::Lark(lark), 48)).unwrap();
        assert_eq!(g.finish, Finish::Stop, "{}", g.text);
        let v: Value = serde_json::from_str(&g.text).unwrap();
        for field in ["drug", "dose"] {
            let s = v[field].as_str().unwrap();
            assert!(source.contains(s), "{field} {s:?} is not in the source");
        }
        assert!(!v["drug"].as_str().unwrap().is_empty());
    }
}

#[test]
fn bad_grammar_is_a_request_error() {
    let mut engine = demo_engine();
    let e = engine.generate(&request("x", Grammar::Lark("start: undefined_rule".into()), 4)).unwrap_err();
    assert_eq!(e.label(), "grammar");
}

/// A tokenizer.json with the GGUF's 262k vocabulary (SentencePiece pieces, control tokens
/// as special added tokens, user-defined ones as plain added tokens).
fn tokenizer_json_from_gguf(tok: &Tokenizer) -> Value {
    let Tokenizer::Spm(spm) = tok else { panic!("GGUF tokenizer expected") };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for id in 0..spm.vocab_size() as u32 {
        let piece = spm.id_to_token(id).unwrap();
        vocab.insert(piece.to_string(), json!(id));
        match spm.token_type(id).unwrap() {
            TokenType::Control | TokenType::Unknown | TokenType::Unused => {
                added.push(json!({ "id": id, "content": piece, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true }));
            }
            TokenType::UserDefined => {
                added.push(json!({ "id": id, "content": piece, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": false }));
            }
            _ => {}
        }
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": { "type": "Replace", "pattern": { "String": " " }, "content": "\u{2581}" },
        "pre_tokenizer": { "type": "Split", "pattern": { "String": "\u{2581}" }, "behavior": "MergedWithNext", "invert": false },
        "post_processor": null,
        "decoder": { "type": "Sequence", "decoders": [
            { "type": "Replace", "pattern": { "String": "\u{2581}" }, "content": " " },
            { "type": "ByteFallback" }, { "type": "Fuse" }
        ] },
        "model": { "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": [] }
    })
}

#[test]
fn the_262k_vocabulary_is_the_same_from_gguf_and_tokenizer_json() {
    let mut engine = demo_engine();
    let n = engine.model.cfg.vocab_size;
    assert_eq!(n, 262_144);
    let from_gguf = engine.tokenizer.trie_words(n);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, serde_json::to_vec(&tokenizer_json_from_gguf(&engine.tokenizer)).unwrap()).unwrap();
    let hf = Tokenizer::Hf(Box::new(HfTokenizer::from_file(&path).unwrap()));
    let from_json = hf.trie_words(n);
    assert_eq!(from_gguf.len(), n);
    let differ: Vec<usize> = (0..n).filter(|&i| from_gguf[i] != from_json[i]).take(5).collect();
    assert!(differ.is_empty(), "tokens {differ:?} differ");
    // Spot checks: byte fallback, a word with its space, control tokens marked special.
    let id = |t: &str| engine.tokenizer.encode(t, false, true)[0] as usize;
    assert_eq!(from_gguf[id("\n")], b"\n");
    assert_eq!(from_gguf[id(" the")], b" the");
    assert_eq!(from_gguf[id("<start_of_turn>")][0], 0xFF);
    assert_eq!(&from_gguf[1][1..], b"<eos>");
    // The engine decodes under a grammar with the tokenizer.json vocabulary too.
    engine.tokenizer = Arc::new(hf);
    let g = engine.generate(&request(&note_prompt(NOTES[1]), Grammar::JsonSchema(note_schema()), 200)).unwrap();
    assert_eq!(g.finish, Finish::Stop, "{}", g.text);
    check_note(&serde_json::from_str(&g.text).unwrap()).unwrap();
}
