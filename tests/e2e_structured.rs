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

/// A copy of the shipped pipeline `name` in `dir` whose spec has each `(from, to)` replaced
/// and whose answer schema `shorten` edits (answers sized for the small model); returns its
/// folder and the edited schema's path.
fn shortened_pipeline(dir: &Path, name: &str, spec: &[(&str, &str)], shorten: impl Fn(&mut Value)) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir(&p).unwrap();
    let src = repo_root().join("pipelines").join(name);
    std::fs::copy(src.join("prompt.j2"), p.join("prompt.j2")).unwrap();
    let mut toml = std::fs::read_to_string(src.join("pipeline.toml")).unwrap();
    for (from, to) in spec {
        assert!(toml.contains(from), "{name}: no {from:?} in its spec");
        toml = toml.replace(from, to);
    }
    std::fs::write(p.join("pipeline.toml"), toml).unwrap();
    let mut schema: Value = serde_json::from_slice(&std::fs::read(src.join("schema.json")).unwrap()).unwrap();
    shorten(&mut schema);
    std::fs::write(p.join("schema.json"), serde_json::to_vec_pretty(&schema).unwrap()).unwrap();
    p
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

/// cohort-facts with the demo model over two gold-set notes as JSONL records (one with its
/// patient and date) and one as a file whose name holds them: every note gives a row whose
/// answer validates, its patient and date from the record or the file name, and every
/// evidence offset lies within the note with an alignment (or no quote at all). Answers are
/// shortened for the small model (lists of 2, strings of 40 characters).
#[test]
fn cohort_facts_one_row_per_note_with_patient_date_and_located_evidence() {
    let dir = tempfile::tempdir().unwrap();
    fn shorten(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    match k.as_str() {
                        "maxLength" => *x = Value::from(x.as_u64().unwrap().min(40)),
                        "maxItems" => *x = Value::from(2),
                        // Five scalars' quotes and two of each list's.
                        "maxProperties" => *x = Value::from(9),
                        _ => shorten(x),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(shorten),
            _ => {}
        }
    }
    let date = "date_pattern = \"([0-9]{4}-[0-9]{2}-[0-9]{2})\"";
    let with_patient = format!("{date}\npatient_pattern = \"^([^_]+)_\"");
    let spec = [("max_new_tokens = 3072", "max_new_tokens = 700"), (date, with_patient.as_str())];
    let p = shortened_pipeline(dir.path(), "cohort-facts", &spec, shorten);

    let notes = repo_root().join("pipelines/cohort-facts/eval/dev/notes");
    let note = |n: &str| std::fs::read_to_string(notes.join(format!("{n}.txt"))).unwrap();
    let (a, b, c) = (
        note("telephone-anticoagulant-on-hold"),
        note("paediatric-adolescent-well-visit"),
        note("progress-primary-care-prediabetes"),
    );
    let inputs = dir.path().join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    let jsonl = format!(
        "{}\n{}\n",
        json!({ "id": "n-a", "text": a, "patient_id": "P-1", "note_date": "2025-02-01" }),
        json!({ "id": "n-b", "text": b })
    );
    std::fs::write(inputs.join("notes.jsonl"), jsonl).unwrap();
    std::fs::write(inputs.join("P-9_2025-03-04_progress.txt"), &c).unwrap();
    let out = run(dir.path(), p.to_str().unwrap(), &[inputs.to_str().unwrap()], "cohort");

    let (rows, _, batches) = read_parquet_dir(&out.join("note_facts"));
    let (_, _, eb) = read_parquet_dir(&out.join("_errors"));
    assert_eq!(rows, 3, "errors: {:?}", string_column(&eb, "detail"));
    let ids = string_column(&batches, "document_id");
    let texts: std::collections::BTreeMap<&str, &str> =
        [("n-a", a.as_str()), ("n-b", b.as_str()), ("P-9_2025-03-04_progress.txt", c.as_str())].into();
    let meta: Vec<(Option<String>, Option<String>)> =
        string_column(&batches, "patient_id").into_iter().zip(string_column(&batches, "note_date")).collect();
    for (id, m) in ids.iter().zip(&meta) {
        let want = match id.as_deref().unwrap() {
            "n-a" => (Some("P-1".to_string()), Some("2025-02-01".to_string())),
            "n-b" => (None, None),
            _ => (Some("P-9".to_string()), Some("2025-03-04".to_string())),
        };
        assert_eq!(m, &want, "{id:?}");
    }
    // Every row validates against the (shortened) schema once its evidence columns are set
    // aside; every offset lies within its note.
    let o = std::process::Command::new(python())
        .arg("-c")
        .arg(
            r#"
import json, sys, glob, jsonschema, pyarrow.parquet as pq
out, schema_path, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
schema = json.load(open(schema_path))
del schema["properties"]["evidence"]; schema["required"].remove("evidence")
aligned = flagged = unquoted = 0
def check(span, text):
    global aligned, flagged, unquoted
    s, e, a = span
    if a is None:
        assert s is None and e is None; unquoted += 1
    elif a == "none":
        assert s is None and e is None; flagged += 1
    else:
        assert a in ("exact", "normalized", "fuzzy") and 0 <= s < e <= len(text), span
        aligned += 1
for f in glob.glob(out + "/note_facts/**/*.parquet", recursive=True):
    for r in pq.ParquetFile(f).read().to_pylist():
        text = texts[r["document_id"]]
        answer = {}
        for k in schema["properties"]:
            v = r[k]
            if isinstance(v, list):
                for item in v:
                    check((item.pop("evidence_start"), item.pop("evidence_end"), item.pop("alignment")), text)
            else:
                check((r[k + "_evidence_start"], r[k + "_evidence_end"], r[k + "_alignment"]), text)
            answer[k] = v
        jsonschema.validate(answer, schema)
print(json.dumps({"aligned": aligned, "flagged": flagged, "unquoted": unquoted}))
"#,
        )
        .arg(&out)
        .arg(p.join("schema.json"))
        .arg(serde_json::to_string(&texts).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let counts: Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("evidence: {counts}");

    // `medbatch eval` reads the table back against a gold split of the file note.
    let gold = dir.path().join("gold-split");
    std::fs::create_dir_all(gold.join("gold")).unwrap();
    std::fs::create_dir_all(gold.join("notes")).unwrap();
    std::fs::write(gold.join("notes/P-9_2025-03-04_progress.txt"), &c).unwrap();
    let gold_answer = repo_root().join("pipelines/cohort-facts/eval/dev/gold/progress-primary-care-prediabetes.json");
    std::fs::copy(&gold_answer, gold.join("gold/P-9_2025-03-04_progress.json")).unwrap();
    let o = medbatch(&[
        "eval",
        p.to_str().unwrap(),
        "--gold",
        gold.to_str().unwrap(),
        "--pred",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let want: Value = serde_json::from_slice(&std::fs::read(&gold_answer).unwrap()).unwrap();
    assert_eq!((report["notes"].as_u64(), report["missing"].as_u64()), (Some(1), Some(0)), "{report}");
    assert_eq!(
        report["medications"]["gold"].as_u64(),
        Some(want["current_medications"].as_array().unwrap().len() as u64)
    );
    let quotes: u64 = report["evidence"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(quotes, counts["aligned"].as_u64().unwrap() + counts["flagged"].as_u64().unwrap());
}

/// The cohort-facts gold set holds together: shapes and enums, every quote an exact substring
/// of its note within one line, a quote for every asserted field and item, no held-out line
/// in the dev split (pipelines/cohort-facts/eval/check_gold.py).
#[test]
fn the_cohort_facts_gold_set_is_consistent() {
    let o = std::process::Command::new(python())
        .arg(repo_root().join("pipelines/cohort-facts/eval/check_gold.py"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
}

/// cohort-facts-sections (section mode, rule files) with the demo model over three gold-set
/// notes of two patients as JSONL records: each note gives one row whose every field rests on
/// exact words of the note; the patient stage writes a row per patient whose notes and latest
/// facts pyarrow recomputes from the note rows, and the cohort members its criteria select
/// (recomputed too); the manifest lists the stage's parts, and committing again changes
/// nothing.
#[test]
fn cohort_facts_sections_mode_and_the_patient_tables() {
    let dir = tempfile::tempdir().unwrap();
    let notes = repo_root().join("pipelines/cohort-facts/eval/dev/notes");
    let note = |n: &str| std::fs::read_to_string(notes.join(format!("{n}.txt"))).unwrap();
    let records = [
        ("n1", "P-1", "2025-01-10", note("progress-primary-care-prediabetes")),
        ("n2", "P-1", "2025-02-20", note("telephone-anticoagulant-on-hold")),
        ("n3", "P-2", "2025-01-15", note("paediatric-adolescent-well-visit")),
    ];
    let jsonl: String = records
        .iter()
        .map(|(id, p, d, t)| format!("{}\n", json!({ "id": id, "patient_id": p, "note_date": d, "text": t })))
        .collect();
    let input = dir.path().join("notes.jsonl");
    std::fs::write(&input, jsonl).unwrap();
    let out = run(dir.path(), "cohort-facts-sections", &[input.to_str().unwrap()], "sections");
    let texts: serde_json::Map<String, Value> =
        records.iter().map(|(id, _, _, t)| (id.to_string(), Value::String(t.clone()))).collect();
    let counts = python_json(
        r#"
import json, sys, glob, pyarrow.parquet as pq
out, texts = sys.argv[1], json.loads(sys.argv[2])
def rows(table):
    return [r for f in sorted(glob.glob(f"{out}/{table}/**/*.parquet", recursive=True)) for r in pq.ParquetFile(f).read().to_pylist()]
notes = rows("note_facts")
scalars = ["smoking_status", "diabetes", "diabetes_type", "lvef_percent", "hba1c_percent"]
spans = 0
def span(s, e, a, text):
    global spans
    if a is None:
        assert s is None and e is None
        return
    assert a == "exact" and 0 <= s < e <= len(text) and "\n" not in text[s:e], (s, e, a)
    spans += 1
for r in notes:
    t = texts[r["document_id"]]
    for k in scalars:
        span(r[k + "_evidence_start"], r[k + "_evidence_end"], r[k + "_alignment"], t)
        if r[k] is None or r[k] == "unknown":
            assert r[k + "_alignment"] is None, k
    for lst in ["current_medications", "diagnoses"]:
        for it in r[lst]:
            span(it["evidence_start"], it["evidence_end"], it["alignment"], t)
patients = {r["patient_id"]: r for r in rows("patient_facts")}
members = sorted((r["patient_id"], r["cohort"]) for r in rows("cohort_members"))
# The patient rows recomputed from the note rows.
want_members = []
for pid in sorted({r["patient_id"] for r in notes}):
    mine = sorted((r for r in notes if r["patient_id"] == pid), key=lambda r: (r["note_date"] or "", r["document_id"]))
    p = patients[pid]
    assert p["notes"] == len(mine) and p["document_ids"] == [r["document_id"] for r in mine], p
    facts = {}
    for k in scalars:
        says = [r for r in mine if r[k] is not None and r[k] != "unknown"]
        latest = says[-1] if says else None
        facts[k] = latest[k] if latest else None
        assert p[k] == facts[k] and p[k + "_document_id"] == (latest["document_id"] if latest else None), (k, p[k], facts[k])
    dx = {}
    for r in mine:
        for d in r["diagnoses"]:
            key = (" ".join(d["name"].split()).lower(), d["subject"])
            dx.setdefault(key, [set(), set()])[1 if d["negated"] else 0].add(r["document_id"])
    got = {(" ".join(d["name"].split()).lower(), d["subject"]): [{s["document_id"] for s in d["asserted_in"]}, {s["document_id"] for s in d["ruled_out_in"]}] for d in p["diagnoses"]}
    assert got == dx, (got, dx)
    if facts["diabetes"] is True and facts["lvef_percent"] is not None and facts["lvef_percent"] < 40:
        want_members.append((pid, "diabetes_reduced_ef"))
    copd = any(k[1] == "patient" and a and "copd" in k[0].replace(",", " ").split() for k, (a, _) in dx.items())
    if facts["smoking_status"] == "current" and copd:
        want_members.append((pid, "smokers_with_copd"))
assert members == sorted(want_members), (members, want_members)
print(json.dumps({"notes": len(notes), "patients": len(patients), "members": len(members), "spans": spans,
                  "medications": sum(len(r["current_medications"]) for r in notes), "diagnoses": sum(len(r["diagnoses"]) for r in notes)}))
"#,
        &[out.to_str().unwrap(), &serde_json::to_string(&texts).unwrap()],
    );
    eprintln!("section mode: {counts}");
    assert_eq!((counts["notes"].as_u64(), counts["patients"].as_u64()), (Some(3), Some(2)), "{counts}");
    let manifest_path = out.join("_runs/sections/manifest.json");
    let manifest: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let tables: Vec<&str> =
        manifest["parts"].as_array().unwrap().iter().map(|p| p["table"].as_str().unwrap()).collect();
    for t in ["note_facts", "patient_facts", "cohort_members"] {
        assert!(tables.contains(&t), "{t} not in the manifest: {tables:?}");
    }
    // Running the committed run again does no job and keeps the manifest and the tables.
    let before = std::fs::read(&manifest_path).unwrap();
    run(dir.path(), "cohort-facts-sections", &[input.to_str().unwrap()], "sections");
    assert_eq!(std::fs::read(&manifest_path).unwrap(), before);
    assert_eq!(read_parquet_dir(&out.join("patient_facts")).0, 2);
}

/// note-summary (task generate) with the demo model over the example notes as JSONL records
/// with patients: a row per note; every quote lies in its note at the offsets given, with
/// `supported` true exactly when a quote of the sentence is found and
/// `unsupported_sentences` counting the others; the summary is the sentences joined.
/// Answers are shortened for the small model (two sentences of 80 characters, two quotes).
#[test]
fn note_summaries_cite_their_note_and_patient_digests_the_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let spec = [("max_new_tokens = 1536", "max_new_tokens = 400")];
    let p = shortened_pipeline(dir.path(), "note-summary", &spec, |schema| {
        let sentences = &mut schema["properties"]["sentences"];
        sentences["maxItems"] = json!(2);
        sentences["items"]["properties"]["text"]["maxLength"] = json!(80);
        sentences["items"]["properties"]["evidence"]["maxItems"] = json!(2);
    });
    let notes = example_notes();
    let jsonl: String = notes
        .iter()
        .enumerate()
        .map(|(i, (name, t))| format!("{}\n", json!({ "id": name, "patient_id": format!("P-{}", i % 2), "text": t })))
        .collect();
    let input = dir.path().join("notes.jsonl");
    std::fs::write(&input, jsonl).unwrap();
    // The reduce per patient: the commit gathers each patient's sentences (patient_notes);
    // patient-digest reads that table as Parquet records. Both run as the nightly script
    // chains them.
    let digest = short_digest(dir.path(), None);
    let out = dir.path().join("out");
    let o = std::process::Command::new("bash")
        .arg(repo_root().join("infra/nightly/nightly.sh"))
        .current_dir(repo_root())
        .env("MEDBATCH_BIN", env!("CARGO_BIN_EXE_medbatch"))
        .env("MEDBATCH_PIPELINE", &p)
        .env("MEDBATCH_DIGEST", &digest)
        .env("MEDBATCH_INPUTS", &input)
        .env("MEDBATCH_OUT", &out)
        .env("MEDBATCH_MODEL", demo_model())
        .env("MEDBATCH_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", text(&o.stdout), text(&o.stderr));
    let mut runs: Vec<String> = std::fs::read_dir(out.join("_runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    runs.sort();
    assert!(runs.len() == 2 && runs[1] == format!("{}-digest", runs[0]), "{runs:?}");
    let texts: serde_json::Map<String, Value> =
        notes.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let got = python_json(
        r#"
import json, sys, glob, pyarrow.parquet as pq
out, texts = sys.argv[1], json.loads(sys.argv[2])
rows = [r for f in glob.glob(out + "/note_summaries/**/*.parquet", recursive=True) for r in pq.ParquetFile(f).read().to_pylist()]
quotes = 0
for r in rows:
    t = texts[r["document_id"]]
    assert r["patient_id"] in ("P-0", "P-1")
    assert r["summary"] == " ".join(s["text"] for s in r["sentences"]), r["summary"]
    unsupported = 0
    for s in r["sentences"]:
        found = False
        for e in s["evidence"]:
            quotes += 1
            if e["alignment"] == "none":
                assert e["evidence_start"] is None and e["evidence_end"] is None
                continue
            found = True
            assert 0 <= e["evidence_start"] < e["evidence_end"] <= len(t)
            if e["alignment"] == "exact":
                assert t[e["evidence_start"]:e["evidence_end"]] == e["quote"].strip(), e
        assert s["supported"] == found, s
        unsupported += not found
    assert r["unsupported_sentences"] == unsupported
print(json.dumps({"rows": len(rows), "quotes": quotes, "unsupported": sum(r["unsupported_sentences"] for r in rows)}))
"#,
        &[out.to_str().unwrap(), &serde_json::to_string(&texts).unwrap()],
    );
    eprintln!("summaries: {got}");
    assert_eq!(got["rows"].as_u64(), Some(notes.len() as u64), "{got}");
    // Decoded under the grammar every quote is copied from the note: nothing unsupported.
    assert_eq!(got["unsupported"], 0, "{got}");

    let got = python_json(
        &(CHECK_DIGEST.to_string()
            + r#"
summaries, digests = sys.argv[1], sys.argv[2]
read = lambda d, t: [r for f in glob.glob(f"{d}/{t}/**/*.parquet", recursive=True) for r in pq.ParquetFile(f).read().to_pylist()]
notes = {r["patient_id"]: r for r in read(summaries, "patient_notes")}
by_patient = {}
for r in read(summaries, "note_summaries"):
    by_patient.setdefault(r["patient_id"], []).append(r)
# Each patient's text: a heading per note (date order, undated last) and its supported sentences.
for p, rows in by_patient.items():
    rows.sort(key=lambda r: (r["note_date"] is None, r["note_date"] or "", r["document_id"]))
    said = lambda r: [" ".join(s["text"].split()) for s in r["sentences"] if s["supported"] and s["text"].strip()]
    kept = [r for r in rows if said(r)]
    blocks = ["Note %s (%s):\n" % (r["document_id"], r["note_date"] or "undated") + "\n".join("- " + t for t in said(r)) for r in kept]
    assert notes[p]["text"] == "\n\n".join(blocks), (notes[p]["text"], blocks)
    assert notes[p]["document_ids"] == [r["document_id"] for r in kept]
    assert notes[p]["notes_left_out"] == len(rows) - len(kept)
quotes, levels = 0, {}
for r in read(digests, "patient_digests"):
    t = notes[r["patient_id"]]["text"]
    assert r["document_id"] == r["patient_id"]
    levels[r["patient_id"]] = r["levels"]
    quotes += check_digest(r, t)
    for s in r["sentences"]:
        assert set(s["sources"]) <= set(notes[r["patient_id"]]["document_ids"])
errors = [r["reason"] for r in read(digests, "_errors")]
print(json.dumps({"patients": len(notes), "digests": len(levels), "levels": levels, "quotes": quotes, "errors": errors}))
"#),
        &[out.to_str().unwrap(), out.to_str().unwrap()],
    );
    eprintln!("digests: {got}");
    assert_eq!(got["errors"], json!([]), "{got}");
    assert_eq!(got["digests"], got["patients"], "a digest per patient: {got}");
}

/// The Python check of a `patient_digests` row against its patient's text `t`: every
/// sentence is supported exactly when a quote was found; every found quote lies in `t`
/// (exact ones at their offsets); `sources` are the notes whose headings are above the
/// quotes. Returns the quotes found.
const CHECK_DIGEST: &str = r#"
import json, re, sys, glob, pyarrow.parquet as pq

def check_digest(r, t):
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^Note (\S+) \(", t, re.M)]
    quotes = 0
    for s in r["sentences"]:
        assert s["supported"] == any(e["alignment"] != "none" for e in s["evidence"]), s
        sources = []
        for e in s["evidence"]:
            if e["alignment"] == "none":
                continue
            quotes += 1
            assert 0 <= e["evidence_start"] < e["evidence_end"] <= len(t)
            if e["alignment"] == "exact":
                assert t[e["evidence_start"]:e["evidence_end"]] == e["quote"].strip(), (e, t)
            src = [n for at, n in heads if at <= e["evidence_start"]][-1]
            if src not in sources:
                sources.append(src)
        assert s["sources"] == sources, (s, sources)
    return quotes
"#;

/// patient-digest answers sized for the small model: one short sentence per prompt (so each
/// round shortens the text: a piece holds at least two lines of the round before, and the
/// rounds end), and optionally a smaller prompt budget.
fn short_digest(dir: &Path, chunk_tokens: Option<usize>) -> PathBuf {
    let budget = chunk_tokens.map(|n| format!("chunk_tokens = {n}")).unwrap_or("chunk_tokens = 6000".into());
    let spec = [("max_new_tokens = 1536", "max_new_tokens = 200"), ("chunk_tokens = 6000", budget.as_str())];
    shortened_pipeline(dir, "patient-digest", &spec, |schema| {
        let sentences = &mut schema["properties"]["sentences"];
        sentences["maxItems"] = json!(1);
        sentences["items"]["properties"]["text"]["maxLength"] = json!(40);
        sentences["items"]["properties"]["evidence"]["maxItems"] = json!(2);
    })
}

/// A patient's day too long for one prompt is digested in rounds, and every sentence's
/// evidence still lies in the patient's text, within the notes it names. The input is a
/// Parquet table written by pyarrow (snappy, as pyarrow writes by default) with invented
/// summaries: one patient with five notes, one with one.
#[test]
fn patient_digests_reduce_a_long_day_in_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("patient_notes.parquet");
    let written = python_json(
        r#"
import json, sys, pyarrow as pa, pyarrow.parquet as pq
days = {
  "P-7": [("n1", "2026-12-07", ["Seen in the emergency department for chest pain since this morning.",
                                "Troponin was normal twice and the ECG showed no ischaemia."]),
          ("n2", "2026-12-07", ["Admitted to the ward for observation overnight.",
                                "Aspirin 75 mg daily was started."]),
          ("n3", "2026-12-07", ["Physiotherapy found him walking safely with a stick."]),
          ("n4", "2026-12-07", ["Pharmacy review stopped ibuprofen because of reflux.",
                                "Omeprazole 20 mg daily was added."]),
          ("n5", "2026-12-07", ["Discharged home with a stress test booked in two weeks."])],
  "P-9": [("m1", "2026-12-07", ["Telephone call: the rash is better on the new cream."])],
}
rows = []
for p, notes in days.items():
    text = "\n\n".join("Note %s (%s):\n" % (n, d) + "\n".join("- " + s for s in ss) for n, d, ss in notes)
    rows.append({"patient_id": p, "notes": len(notes), "document_ids": [n for n, _, _ in notes],
                 "last_note_date": "2026-12-07", "text": text})
pq.write_table(pa.Table.from_pylist(rows), sys.argv[1])
print(json.dumps({r["patient_id"]: r["text"] for r in rows}))
"#,
        &[table.to_str().unwrap()],
    );
    let digest = short_digest(dir.path(), Some(48));
    let out = run(dir.path(), digest.to_str().unwrap(), &[table.to_str().unwrap()], "rounds");
    let got = python_json(
        &(CHECK_DIGEST.to_string()
            + r#"
out, texts = sys.argv[1], json.loads(sys.argv[2])
read = lambda t: [r for f in glob.glob(f"{out}/{t}/**/*.parquet", recursive=True) for r in pq.ParquetFile(f).read().to_pylist()]
levels, quotes = {}, 0
for r in read("patient_digests"):
    t = texts[r["patient_id"]]
    levels[r["patient_id"]] = r["levels"]
    quotes += check_digest(r, t)
print(json.dumps({"levels": levels, "quotes": quotes, "errors": [r["reason"] for r in read("_errors")]}))
"#),
        &[out.to_str().unwrap(), &written.to_string()],
    );
    eprintln!("digests in rounds: {got}");
    assert_eq!(got["errors"], json!([]), "{got}");
    assert!(got["levels"]["P-7"].as_u64() >= Some(2), "the five notes do not fit one prompt of 48 tokens: {got}");
    assert!(got["quotes"].as_u64() > Some(0), "{got}");
}
