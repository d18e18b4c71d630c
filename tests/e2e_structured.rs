//! End-to-end: `structured` pipelines with the demo model. Columns come from the answer
//! schema (checked with pyarrow), every row validates against the schema (checked with
//! Python's jsonschema), evidence offsets index the quoted text of the whole document, also
//! when a long note is read in overlapping chunks.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Runs `pipeline` on `inputs` into a fresh output folder; returns it.
fn run(dir: &Path, pipeline: &str, inputs: &[&str], run_id: &str) -> PathBuf {
    let out = dir.join(format!("out-{run_id}"));
    let model = demo_model();
    let mut args = vec!["run", pipeline];
    args.extend_from_slice(inputs);
    args.extend_from_slice(&["--out", out.to_str().unwrap(), "--model", model.to_str().unwrap(), "--run-id", run_id]);
    let o = medbatch(&args);
    assert!(o.status.success(), "exit {:?}\n{}\n{}", o.status, text(&o.stdout), text(&o.stderr));
    out
}

/// The independent check (tests/support/check_structured.py) of a table.
fn check(table: &Path, schema: &Path, items: &str, evidence: &str, docs: &[(String, String)]) -> Value {
    let docs_file = table.parent().unwrap().join("docs.json");
    let map: serde_json::Map<String, Value> = docs.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    std::fs::write(&docs_file, serde_json::to_vec(&map).unwrap()).unwrap();
    let script = repo_root().join("tests/support/check_structured.py");
    let o = std::process::Command::new(python())
        .args([script.to_str().unwrap(), table.to_str().unwrap(), schema.to_str().unwrap(), items, evidence])
        .arg(&docs_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "check failed: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn example_notes() -> Vec<(String, String)> {
    let dir = repo_root().join("examples/notes");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn medication_rows_follow_the_schema_and_quote_the_note() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), "note-medications", &["examples/notes"], "meds");
    let schema = repo_root().join("pipelines/note-medications/schema.json");
    let r = check(&out.join("medications"), &schema, "medications", "evidence", &example_notes());
    eprintln!("{r}");
    assert!(r["rows"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(r["invalid"], json!([]), "{r}");
    assert_eq!(r["evidence_bad"], json!([]), "{r}");
    let types = &r["types"];
    assert_eq!(types["item_index"], "uint32");
    assert_eq!(types["drug"], "string");
    assert_eq!(types["route"], "dictionary<values=string, indices=int32, ordered=0>");
    assert_eq!(types["evidence_start"], "uint32");
    // Evidence is a copy field: found verbatim, unless the model quoted nothing.
    let spans = r["spans"].as_array().unwrap().len();
    let exact = r["alignments"].as_array().unwrap().iter().filter(|a| *a == "exact").count();
    assert_eq!(exact, spans);
    assert!(exact >= 3, "{r}");
}

#[test]
fn a_long_note_is_read_in_chunks_and_evidence_maps_back_to_it() {
    let dir = tempfile::tempdir().unwrap();
    // The medications pipeline with a small input budget.
    let pipeline = dir.path().join("meds-chunked");
    std::fs::create_dir(&pipeline).unwrap();
    for f in ["prompt.j2", "schema.json"] {
        std::fs::copy(repo_root().join("pipelines/note-medications").join(f), pipeline.join(f)).unwrap();
    }
    let spec = std::fs::read_to_string(repo_root().join("pipelines/note-medications/pipeline.toml")).unwrap();
    let spec = spec
        .replace("chunk_tokens = 1024", "chunk_tokens = 120")
        .replace("chunk_overlap_tokens = 64", "chunk_overlap_tokens = 30");
    assert!(spec.contains("chunk_tokens = 120\n"));
    std::fs::write(pipeline.join("pipeline.toml"), spec).unwrap();
    // One long note: the three example notes, twice over.
    let notes = example_notes();
    let long: String = notes.iter().chain(notes.iter().rev()).map(|(_, t)| format!("{t}\n")).collect();
    let input = dir.path().join("long-note.txt");
    std::fs::write(&input, &long).unwrap();
    let out = run(dir.path(), pipeline.to_str().unwrap(), &[input.to_str().unwrap()], "long");
    let r = check(
        &out.join("medications"),
        &pipeline.join("schema.json"),
        "medications",
        "evidence",
        &[("long-note.txt".to_string(), long.clone())],
    );
    eprintln!("{r}");
    assert_eq!(r["invalid"], json!([]), "{r}");
    assert_eq!(r["evidence_bad"], json!([]), "{r}");
    let spans: Vec<(u64, u64)> =
        r["spans"].as_array().unwrap().iter().map(|s| (s[1].as_u64().unwrap(), s[2].as_u64().unwrap())).collect();
    // Rows from overlapping chunks are kept once.
    let mut unique = spans.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), spans.len(), "{spans:?}");
    // Rows were found all along the note, not only in its first chunk.
    let n = long.chars().count() as u64;
    assert!(spans.iter().any(|&(s, _)| s > n / 2), "{spans:?} in {n} characters");
    assert!(spans.len() >= 4, "{spans:?}");
}

#[test]
fn per_document_rows_have_a_column_of_each_schema_type() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("note-facts");
    std::fs::create_dir(&pipeline).unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "age": { "type": ["integer", "null"], "minimum": 0, "maximum": 120 },
            "sex": { "enum": ["female", "male", "unknown"] },
            "anticoagulated": { "type": "boolean" },
            "weight_kg": { "type": ["number", "null"] },
            "problems": { "type": "array", "items": { "type": "string", "copy": true }, "maxItems": 3 },
            "follow_up": {
                "type": "object",
                "properties": {
                    "needed": { "type": "boolean" },
                    "with": { "type": ["string", "null"], "copy": true }
                },
                "required": ["needed", "with"],
                "additionalProperties": false
            }
        },
        "required": ["age", "sex", "anticoagulated", "weight_kg", "problems", "follow_up"],
        "additionalProperties": false
    });
    std::fs::write(pipeline.join("schema.json"), serde_json::to_vec_pretty(&schema).unwrap()).unwrap();
    std::fs::write(
        pipeline.join("pipeline.toml"),
        "name = \"note-facts\"\nversion = \"1\"\ntask = \"structured\"\n\n[input]\n\n[output]\ntable = \"note_facts\"\n\
         rows = \"per_document\"\n\n[prompt]\ntemplate = \"prompt.j2\"\nschema = \"schema.json\"\n\n[generation]\n\
         max_new_tokens = 200\n\n[extraction]\nunit = \"document\"\n",
    )
    .unwrap();
    std::fs::write(
        pipeline.join("prompt.j2"),
        "Facts of clinical notes as JSON.\n\nNote: 58-year-old woman, 71 kg, on warfarin for a mechanical valve. \
         Review in anticoagulation clinic.\nJSON: {\"age\":58,\"sex\":\"female\",\"anticoagulated\":true,\"weight_kg\":71,\
         \"problems\":[\"mechanical valve\"],\"follow_up\":{\"needed\":true,\"with\":\"anticoagulation clinic\"}}\n\n\
         Note: {{ document }}\nJSON:",
    )
    .unwrap();
    let out = run(dir.path(), pipeline.to_str().unwrap(), &["examples/notes"], "facts");
    let r = check(&out.join("note_facts"), &pipeline.join("schema.json"), "-", "-", &example_notes());
    eprintln!("{r}");
    assert_eq!(r["rows"], 3, "{r}");
    assert_eq!(r["invalid"], json!([]), "{r}");
    let t = &r["types"];
    assert_eq!(t["age"], "int64");
    assert_eq!(t["sex"], "dictionary<values=string, indices=int32, ordered=0>");
    assert_eq!(t["anticoagulated"], "bool");
    assert_eq!(t["weight_kg"], "double");
    assert_eq!(t["problems"], "list<item: string not null>");
    assert_eq!(t["follow_up"], "struct<needed: bool not null, with: string>");
    assert!(t.get("item_index").is_none());
}
