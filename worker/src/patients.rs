//! The patient-level stage (`[patients]` of a per-document structured pipeline whose input
//! names a patient), run once every job of a run is done and before its manifest
//! ([`medbatch_coordinator::RunStage`]): the run's committed rows grouped by patient.
//!
//! `patient_facts`, one row per patient: the notes counted (`notes`, `document_ids`, first
//! and last note date), then for each scalar field of the note row its latest value — from
//! the most recent note that gives one (null and `"unknown"` give none; notes without a date
//! count as the oldest, ties broken by document id) — with that note's id, date and the
//! evidence offsets; each list of assertions (items with a boolean `negated`, as
//! `diagnoses`) merged over all notes, an item per key (its required text fields, case and
//! spacing aside) with the notes that assert it and those that rule it out; every other list
//! (`current_medications`) as the latest note that lists any gave it.
//!
//! `cohort_members`: a row per patient and cohort whose criteria ([`crate::criteria`]) are
//! true, with the reason (each fact the criteria read, its value and note) and the evidence.
//!
//! The stage is deterministic (rows sorted by patient, its time the run's last job's), so a
//! committer that runs it again writes the same bytes under the same keys.

use crate::criteria::{self, Expr, Val};
use crate::parquet_out::{json_batch, plain_type, to_parquet, JobProvenance, ParquetOutError};
use crate::pipeline::{LoadedPipeline, PipelineError};
use crate::pipelines::structured::row_columns;
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use medbatch_connectors::store::ObjectStore;
use medbatch_coordinator::StageInput;
use medbatch_schemas::pipeline::PatientsSpec;
use medbatch_schemas::{Digest, OutputPart};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A list field of the note row and how it is merged.
struct ListField {
    field: Field,
    items: Fields,
    /// Items carry `negated`: merged over notes with the notes asserting and ruling out each.
    assertions: bool,
}

/// The patient-level stage of one pipeline.
pub struct PatientStage {
    spec: PatientsSpec,
    note_table: String,
    scalars: Vec<Field>,
    lists: Vec<ListField>,
    cohorts: Vec<(String, String, Expr)>,
    facts: SchemaRef,
    members: SchemaRef,
}

fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn list_of(name: &str, item: DataType, nullable: bool) -> Field {
    Field::new(name, DataType::List(Arc::new(Field::new("item", item, false))), nullable)
}

/// Where one note backs a fact: its id, date and the evidence offsets.
fn source_fields() -> Fields {
    Fields::from(vec![
        utf8("document_id", false),
        utf8("note_date", true),
        Field::new("evidence_start", DataType::UInt32, true),
        Field::new("evidence_end", DataType::UInt32, true),
    ])
}

/// The provenance columns of a stage table (those of a job's rows but the input's and the
/// token counts).
pub(crate) fn provenance() -> Vec<Field> {
    medbatch_schemas::tables::provenance_fields().into_iter().skip(2).take(7).collect()
}

impl PatientStage {
    /// The stage of `pipeline`, when its spec has `[patients]`. Fails when a cohort's
    /// criteria do not parse or read a field the patient row lacks.
    pub fn new(pipeline: &LoadedPipeline) -> Result<Option<Self>, PipelineError> {
        let Some(spec) = pipeline.spec.patients.clone() else { return Ok(None) };
        let invalid = |reason: String| PipelineError::Invalid { path: pipeline.dir.display().to_string(), reason };
        let mut columns =
            row_columns(&pipeline.row_schema, &pipeline.spec.output).map_err(|e| invalid(e.to_string()))?;
        columns.retain(|f| Some(f.name()) != pipeline.spec.output.evidence_map.as_ref());
        let (mut scalars, mut lists) = (Vec::new(), Vec::new());
        for f in columns {
            match f.data_type() {
                DataType::List(item) => match item.data_type() {
                    DataType::Struct(items) => {
                        let assertions =
                            items.iter().any(|x| x.name() == "negated" && x.data_type() == &DataType::Boolean);
                        lists.push(ListField { items: items.clone(), field: f.clone(), assertions });
                    }
                    _ => return Err(invalid(format!("patients: list `{}` must hold objects", f.name()))),
                },
                _ => scalars.push(f),
            }
        }
        let mut cohorts = Vec::new();
        for c in &spec.cohorts {
            let e = criteria::parse(&c.criteria).map_err(|e| invalid(format!("cohort {:?}: criteria {e}", c.name)))?;
            for read in e.reads() {
                let ok = match read {
                    Expr::Field(n) => scalars.iter().any(|f| f.name() == n),
                    Expr::Has { list, .. } => lists.iter().any(|l| l.field.name() == list),
                    _ => true,
                };
                if !ok {
                    let fields: Vec<&str> = scalars.iter().map(|f| f.name().as_str()).collect();
                    let tests: Vec<String> = lists.iter().map(|l| format!("{}(\"…\")", l.field.name())).collect();
                    return Err(invalid(format!(
                        "cohort {:?}: criteria read {read:?}; the patient row has the fields {} and the tests {}",
                        c.name,
                        fields.join(", "),
                        tests.join(", ")
                    )));
                }
            }
            cohorts.push((c.name.clone(), c.criteria.clone(), e));
        }
        let mut stage = Self {
            spec,
            note_table: pipeline.spec.output.table.clone(),
            scalars,
            lists,
            cohorts,
            facts: Arc::new(Schema::empty()),
            members: Arc::new(Schema::empty()),
        };
        stage.facts = Arc::new(Schema::new(stage.fact_fields()));
        let mut members = vec![
            utf8("patient_id", false),
            utf8("cohort", false),
            utf8("criteria", false),
            utf8("reason", false),
            list_of(
                "evidence",
                DataType::Struct(Fields::from(
                    [
                        vec![utf8("fact", false), utf8("value", true)],
                        source_fields().iter().map(|f| f.as_ref().clone()).collect(),
                    ]
                    .concat(),
                )),
                false,
            ),
        ];
        members.extend(provenance());
        stage.members = Arc::new(Schema::new(members));
        Ok(Some(stage))
    }

    fn fact_fields(&self) -> Vec<Field> {
        let mut fields = vec![
            utf8("patient_id", false),
            Field::new("notes", DataType::UInt32, false),
            list_of("document_ids", DataType::Utf8, false),
            utf8("first_note_date", true),
            utf8("last_note_date", true),
        ];
        for f in &self.scalars {
            let n = f.name();
            fields.push(f.clone().with_nullable(true));
            fields.push(utf8(&format!("{n}_document_id"), true));
            fields.push(utf8(&format!("{n}_note_date"), true));
            fields.push(Field::new(format!("{n}_evidence_start"), DataType::UInt32, true));
            fields.push(Field::new(format!("{n}_evidence_end"), DataType::UInt32, true));
        }
        for l in &self.lists {
            let n = l.field.name();
            let own: Vec<Field> = l
                .items
                .iter()
                .filter(|x| !matches!(x.name().as_str(), "evidence_start" | "evidence_end" | "alignment"))
                .filter(|x| !(l.assertions && x.name() == "negated"))
                .map(|x| x.as_ref().clone())
                .collect();
            if l.assertions {
                let source = DataType::Struct(source_fields());
                let item =
                    [own, vec![list_of("asserted_in", source.clone(), false), list_of("ruled_out_in", source, false)]]
                        .concat();
                fields.push(list_of(n, DataType::Struct(Fields::from(item)), false));
            } else {
                let item = [
                    own,
                    vec![
                        Field::new("evidence_start", DataType::UInt32, true),
                        Field::new("evidence_end", DataType::UInt32, true),
                    ],
                ]
                .concat();
                fields.push(list_of(n, DataType::Struct(Fields::from(item)), false));
                fields.push(utf8(&format!("{n}_document_id"), true));
                fields.push(utf8(&format!("{n}_note_date"), true));
            }
        }
        fields.extend(provenance());
        fields
    }

    /// The patient rows (sorted by patient) and the members (by patient, then cohort) of
    /// note rows given as JSON objects with the note table's columns. Rows without a patient
    /// are not counted (they are the second value).
    pub fn reduce(&self, notes: &[Map<String, Value>]) -> (Vec<Value>, Vec<Value>, u64) {
        let mut by_patient: BTreeMap<&str, Vec<&Map<String, Value>>> = BTreeMap::new();
        let mut unattributed = 0;
        for n in notes {
            match n.get("patient_id").and_then(Value::as_str).filter(|p| !p.is_empty()) {
                Some(p) => by_patient.entry(p).or_default().push(n),
                None => unattributed += 1,
            }
        }
        let (mut facts, mut members) = (Vec::new(), Vec::new());
        for (patient, mut rows) in by_patient {
            let key = |r: &&Map<String, Value>| {
                let date = r.get("note_date").and_then(Value::as_str).unwrap_or("").to_string();
                (date, r.get("document_id").and_then(Value::as_str).unwrap_or("").to_string())
            };
            rows.sort_by_key(key);
            let row = self.patient_row(patient, &rows);
            for (name, text, e) in &self.cohorts {
                if let Some(m) = member(&row, &self.lists, name, text, e) {
                    members.push(m);
                }
            }
            facts.push(row);
        }
        (facts, members, unattributed)
    }

    /// One patient's row from their notes, oldest first.
    fn patient_row(&self, patient: &str, notes: &[&Map<String, Value>]) -> Value {
        let get = |r: &Map<String, Value>, k: &str| r.get(k).cloned().unwrap_or(Value::Null);
        let source = |r: &Map<String, Value>, start: Value, end: Value| {
            json!({ "document_id": get(r, "document_id"), "note_date": get(r, "note_date"),
                    "evidence_start": start, "evidence_end": end })
        };
        let dates: Vec<&str> = notes.iter().filter_map(|r| r.get("note_date").and_then(Value::as_str)).collect();
        let mut row = Map::new();
        row.insert("patient_id".into(), json!(patient));
        row.insert("notes".into(), json!(notes.len()));
        row.insert("document_ids".into(), notes.iter().map(|r| get(r, "document_id")).collect());
        row.insert("first_note_date".into(), json!(dates.iter().min()));
        row.insert("last_note_date".into(), json!(dates.iter().max()));
        for f in &self.scalars {
            let n = f.name();
            let says = |v: &Value| !v.is_null() && v.as_str() != Some("unknown");
            let latest = notes.iter().rev().find(|r| r.get(n).is_some_and(says));
            row.insert(n.clone(), latest.map_or(Value::Null, |r| get(r, n)));
            let at = |k: &str| latest.map_or(Value::Null, |r| get(r, k));
            row.insert(format!("{n}_document_id"), at("document_id"));
            row.insert(format!("{n}_note_date"), at("note_date"));
            row.insert(format!("{n}_evidence_start"), at(&format!("{n}_evidence_start")));
            row.insert(format!("{n}_evidence_end"), at(&format!("{n}_evidence_end")));
        }
        for l in &self.lists {
            let n = l.field.name();
            let items_of = |r: &Map<String, Value>| r.get(n).and_then(Value::as_array).cloned().unwrap_or_default();
            if !l.assertions {
                let latest = notes.iter().rev().find(|r| !items_of(r).is_empty());
                let items: Vec<Value> = latest
                    .map(|r| items_of(r))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|mut it| {
                        if let Value::Object(o) = &mut it {
                            o.remove("alignment");
                        }
                        it
                    })
                    .collect();
                row.insert(n.clone(), Value::Array(items));
                row.insert(format!("{n}_document_id"), latest.map_or(Value::Null, |r| get(r, "document_id")));
                row.insert(format!("{n}_note_date"), latest.map_or(Value::Null, |r| get(r, "note_date")));
                continue;
            }
            // Key: the item's required text fields (name, subject), case and spacing aside.
            let keys: Vec<&str> = l
                .items
                .iter()
                .filter(|x| !x.is_nullable() && matches!(plain_type(x.data_type()), DataType::Utf8))
                .map(|x| x.name().as_str())
                .collect();
            let mut merged: Vec<(Vec<String>, Map<String, Value>)> = Vec::new();
            for r in notes {
                for it in items_of(r) {
                    let Value::Object(it) = it else { continue };
                    let k: Vec<String> =
                        keys.iter().map(|k| normalize(it.get(*k).and_then(Value::as_str).unwrap_or(""))).collect();
                    let at = match merged.iter().position(|m| m.0 == k) {
                        Some(i) => i,
                        None => {
                            let mut o = Map::new();
                            for x in l.items.iter().map(|x| x.name()) {
                                if !matches!(x.as_str(), "negated" | "evidence_start" | "evidence_end" | "alignment") {
                                    o.insert(x.clone(), it.get(x).cloned().unwrap_or(Value::Null));
                                }
                            }
                            o.insert("asserted_in".into(), json!([]));
                            o.insert("ruled_out_in".into(), json!([]));
                            merged.push((k, o));
                            merged.len() - 1
                        }
                    };
                    let o = &mut merged[at].1;
                    // A field the first note left null takes a later note's value.
                    for (x, v) in &it {
                        if o.get(x).is_some_and(Value::is_null) && !v.is_null() {
                            o.insert(x.clone(), v.clone());
                        }
                    }
                    let negated = it.get("negated").and_then(Value::as_bool).unwrap_or(false);
                    let list = if negated { "ruled_out_in" } else { "asserted_in" };
                    let src = source(r, get(&it, "evidence_start"), get(&it, "evidence_end"));
                    if let Some(Value::Array(a)) = o.get_mut(list) {
                        if !a.iter().any(|s| s["document_id"] == src["document_id"]) {
                            a.push(src);
                        }
                    }
                }
            }
            row.insert(n.clone(), merged.into_iter().map(|m| Value::Object(m.1)).collect());
        }
        Value::Object(row)
    }

    /// The stage's two batches.
    pub fn batches(
        &self,
        facts: &[Value],
        members: &[Value],
        prov: &JobProvenance,
    ) -> Result<[RecordBatch; 2], ParquetOutError> {
        Ok([json_batch(&self.facts, facts, prov)?, json_batch(&self.members, members, prov)?])
    }
}

/// Lower case, spacing collapsed.
fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Whether the words of `words` appear, in order and whole, in `name`.
fn names(name: &str, words: &str) -> bool {
    let (name, words) = (normalize(name), normalize(words));
    let n: Vec<&str> = name.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let w: Vec<&str> = words.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    !w.is_empty() && n.windows(w.len()).any(|x| x == w.as_slice())
}

/// The criteria's value of a patient-row field.
fn val(v: &Value) -> Val {
    match v {
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => n.as_f64().map_or(Val::Unknown, Val::Number),
        Value::String(s) if s != "unknown" => Val::Text(s.clone()),
        _ => Val::Unknown,
    }
}

/// The items of list `list` whose name holds `words` and (for assertions) that the patient
/// has: asserted in a note, about the patient.
fn matching<'r>(row: &'r Value, lists: &[ListField], list: &str, words: &str) -> Vec<&'r Value> {
    let assertions = lists.iter().any(|l| l.field.name() == list && l.assertions);
    let items = row.get(list).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .filter(|it| it.get("name").and_then(Value::as_str).is_some_and(|n| names(n, words)))
        .filter(|it| {
            !assertions
                || (it["asserted_in"].as_array().is_some_and(|a| !a.is_empty())
                    && it.get("subject").and_then(Value::as_str).is_none_or(|s| s == "patient"))
        })
        .collect()
}

/// The members row of a patient meeting a cohort's criteria.
fn member(row: &Value, lists: &[ListField], cohort: &str, text: &str, e: &Expr) -> Option<Value> {
    let field = |n: &str| val(&row[n]);
    let has = |l: &str, w: &str| Val::Bool(!matching(row, lists, l, w).is_empty());
    if e.eval(&field, &has) != Val::Bool(true) {
        return None;
    }
    let (mut reasons, mut evidence) = (Vec::new(), Vec::new());
    for read in e.reads() {
        match read {
            Expr::Field(n) => {
                let v = field(n);
                let doc = &row[format!("{n}_document_id")];
                let date = &row[format!("{n}_note_date")];
                reasons.push(match doc.as_str() {
                    Some(d) => {
                        format!("{n} = {v} (note {d}{})", date.as_str().map(|x| format!(", {x}")).unwrap_or_default())
                    }
                    None => format!("{n} = {v}"),
                });
                evidence.push(json!({
                    "fact": n, "value": (v != Val::Unknown).then(|| v.to_string().trim_matches('"').to_string()),
                    "document_id": doc, "note_date": date,
                    "evidence_start": row[format!("{n}_evidence_start")], "evidence_end": row[format!("{n}_evidence_end")],
                }));
            }
            Expr::Has { list, words } => {
                let found = matching(row, lists, list, words);
                let fact = format!("{list}({words:?})");
                reasons.push(format!("{fact} = {}", !found.is_empty()));
                let assertions = lists.iter().any(|l| l.field.name() == list && l.assertions);
                for it in found {
                    let name = it.get("name").cloned().unwrap_or(Value::Null);
                    let sources: Vec<Value> = if assertions {
                        it["asserted_in"].as_array().cloned().unwrap_or_default()
                    } else {
                        vec![
                            json!({ "document_id": row[format!("{list}_document_id")], "note_date": row[format!("{list}_note_date")],
                                     "evidence_start": it["evidence_start"], "evidence_end": it["evidence_end"] }),
                        ]
                    };
                    for s in sources {
                        evidence.push(json!({ "fact": fact, "value": name, "document_id": s["document_id"], "note_date": s["note_date"],
                                              "evidence_start": s["evidence_start"], "evidence_end": s["evidence_end"] }));
                    }
                }
            }
            _ => {}
        }
    }
    Some(json!({ "patient_id": row["patient_id"], "cohort": cohort, "criteria": text,
                 "reason": reasons.join("; "), "evidence": evidence }))
}

/// The note rows of Parquet `bytes` as JSON objects.
pub(crate) fn json_rows(bytes: bytes::Bytes) -> Result<Vec<Map<String, Value>>, String> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for b in reader {
        // Times are not read (the stage's rows have their own); arrow-json writes only
        // offset time zones.
        let b = b.map_err(|e| e.to_string())?;
        let keep: Vec<usize> = (0..b.num_columns())
            .filter(|&i| !matches!(b.schema().field(i).data_type(), DataType::Timestamp(..)))
            .collect();
        let b = b.project(&keep).map_err(|e| e.to_string())?;
        let mut w = arrow_json::ArrayWriter::new(Vec::new());
        w.write(&b).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
        let text = w.into_inner();
        if text.is_empty() {
            continue;
        }
        let rows: Vec<Map<String, Value>> = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
        out.extend(rows);
    }
    Ok(out)
}

/// Whether a note row counts under `current` (an incremental run's current content of each
/// input): its input's URI — the row's source URI without an archive member's `#name` — has
/// the row's content digest.
fn is_current(row: &Map<String, Value>, current: &BTreeMap<String, Digest>) -> bool {
    let uri = row.get("source_uri").and_then(Value::as_str).unwrap_or("");
    let sha = row.get("input_sha256").and_then(Value::as_str).unwrap_or("");
    let input = match current.get(uri) {
        Some(d) => Some(d),
        None => uri.rsplit_once('#').and_then(|(u, _)| current.get(u)),
    };
    input.is_some_and(|d| d.as_str() == sha)
}

/// The rows of the `parts` of `table` read by a stage (sorted by key; an incremental run's
/// rows of superseded content left out), and a tag derived from what was read (the stage's
/// part keys carry it, so a committer running the stage again writes the same keys).
pub(crate) async fn read_stage_rows(
    input: &StageInput<'_>,
    parts: Vec<&OutputPart>,
    store: &dyn ObjectStore,
) -> Result<(Vec<Map<String, Value>>, String), String> {
    let mut rows = Vec::new();
    let mut h = Sha256::new();
    let mut parts = parts;
    parts.sort_by(|a, b| a.key.cmp(&b.key));
    for p in parts {
        let bytes = store.get(&p.key).await.map_err(|e| e.to_string())?.ok_or(format!("part {} is missing", p.key))?;
        h.update(p.key.as_bytes());
        h.update(p.sha256.to_string().as_bytes());
        let read = json_rows(bytes).map_err(|e| format!("part {}: {e}", p.key))?;
        rows.extend(read.into_iter().filter(|r| input.current.as_ref().is_none_or(|c| is_current(r, c))));
    }
    if let Some(c) = &input.current {
        for (uri, d) in c {
            h.update(uri.as_bytes());
            h.update(d.as_str().as_bytes());
        }
    }
    Ok((rows, hex::encode(h.finalize())[..16].to_string()))
}

/// The provenance of a stage's rows: the pipeline and model of the rows read, the time of the
/// run's last job.
pub(crate) fn stage_provenance(first: Option<&Map<String, Value>>, input: &StageInput<'_>) -> JobProvenance {
    let text = |k: &str| first.and_then(|r| r.get(k)).and_then(Value::as_str).unwrap_or("").to_string();
    let generated_at_us =
        chrono::DateTime::parse_from_rfc3339(input.finished_at).map(|t| t.timestamp_micros()).unwrap_or(0);
    JobProvenance {
        job_id: "patients".into(),
        run_id: input.run_id.to_string(),
        pipeline: text("pipeline"),
        pipeline_digest: text("pipeline_digest"),
        model_id: text("model_id"),
        model_digest: text("model_digest"),
        generated_at_us,
    }
}

/// Writes a stage's `batch` of `table` as the run's part `part-patients-<tag>.parquet`.
pub(crate) async fn put_stage_part(
    store: &dyn ObjectStore,
    table: &str,
    input: &StageInput<'_>,
    tag: &str,
    batch: &RecordBatch,
) -> Result<OutputPart, String> {
    let bytes = to_parquet(batch).map_err(|e| e.to_string())?;
    let prefix = medbatch_schemas::tables::run_table_prefix(table, input.run_id);
    let key = format!("{prefix}part-patients-{tag}.parquet");
    let sha256 = Digest::of_bytes(&bytes);
    let n = bytes.len() as u64;
    store.put(&key, bytes.into()).await.map_err(|e| e.to_string())?;
    Ok(OutputPart { table: table.to_string(), key, rows: batch.num_rows() as u64, bytes: n, sha256 })
}

/// The stage a pipeline runs at commit, if any: the patient facts and cohorts of a
/// structured pipeline's `[patients]`, or the gathered summaries of a generate pipeline's
/// `[patient_notes]`.
pub fn stage(pipeline: &LoadedPipeline) -> Result<Option<Box<dyn medbatch_coordinator::RunStage>>, PipelineError> {
    if let Some(s) = PatientStage::new(pipeline)? {
        return Ok(Some(Box::new(s)));
    }
    Ok(crate::patient_notes::PatientNotes::new(pipeline)
        .map(|s| Box::new(s) as Box<dyn medbatch_coordinator::RunStage>))
}

#[async_trait::async_trait]
impl medbatch_coordinator::RunStage for PatientStage {
    fn tables(&self) -> Vec<&str> {
        vec![&self.spec.table, &self.spec.members_table]
    }

    /// Reads the note parts (an incremental run: only the rows of current content), writes
    /// one part of each stage table under a key derived from the parts read.
    async fn run(&self, input: &StageInput<'_>, store: &dyn ObjectStore) -> Result<Vec<OutputPart>, String> {
        let parts: Vec<&OutputPart> = input.parts.iter().filter(|p| p.table == self.note_table).collect();
        let (notes, tag) = read_stage_rows(input, parts, store).await?;
        let (facts, members, unattributed) = self.reduce(&notes);
        if unattributed > 0 {
            tracing::warn!(rows = unattributed, "note rows without a patient are not in the patient table");
        }
        let prov = stage_provenance(notes.first(), input);
        let mut out = Vec::new();
        let batches = self.batches(&facts, &members, &prov).map_err(|e| e.to_string())?;
        for (table, batch) in self.tables().into_iter().zip(batches) {
            out.push(put_stage_part(store, table, input, &tag, &batch).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medbatch_schemas::pipeline::CohortSpec;
    use medbatch_schemas::RunId;

    fn stage(cohorts: &[(&str, &str)]) -> Result<PatientStage, PipelineError> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/cohort-facts");
        let mut p = LoadedPipeline::load(dir.to_str().unwrap()).unwrap();
        let spec = p.spec.patients.get_or_insert(PatientsSpec {
            table: "patient_facts".into(),
            members_table: "cohort_members".into(),
            cohorts: vec![],
        });
        spec.cohorts =
            cohorts.iter().map(|(n, c)| CohortSpec { name: n.to_string(), criteria: c.to_string() }).collect();
        PatientStage::new(&p).map(Option::unwrap)
    }

    fn note(id: &str, patient: &str, date: Option<&str>, extra: Value) -> Map<String, Value> {
        let mut m = json!({ "document_id": id, "patient_id": patient, "note_date": date,
            "smoking_status": "unknown", "diabetes": null, "diabetes_type": null, "lvef_percent": null, "hba1c_percent": null,
            "current_medications": [], "diagnoses": [] });
        m.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        m.as_object().unwrap().clone()
    }

    fn dx(name: &str, negated: bool, start: u32) -> Value {
        json!({ "name": name, "icd10": null, "negated": negated, "subject": "patient", "evidence_start": start, "evidence_end": start + 3, "alignment": "exact" })
    }

    #[test]
    fn the_latest_value_of_each_fact_wins_and_assertions_merge_over_notes() {
        let s = stage(&[("hfref_dm", "diabetes and lvef_percent < 40"), ("ckd", r#"diagnoses("kidney disease")"#)])
            .unwrap();
        let notes = [
            note(
                "n3",
                "P1",
                Some("2024-03-01"),
                json!({ "lvef_percent": 35.0, "lvef_percent_evidence_start": 10, "lvef_percent_evidence_end": 18,
                "current_medications": [{ "name": "metformin", "dose": "1000 mg", "evidence_start": 1, "evidence_end": 5, "alignment": "exact" }],
                "diagnoses": [dx("Heart failure", false, 4)] }),
            ),
            note(
                "n1",
                "P1",
                Some("2024-01-01"),
                json!({ "lvef_percent": 55.0, "diabetes": true, "smoking_status": "former",
                "current_medications": [{ "name": "metformin", "dose": "500 mg", "evidence_start": 1, "evidence_end": 5, "alignment": "exact" }],
                "diagnoses": [dx("heart  failure", false, 9), dx("chronic kidney disease", true, 20)] }),
            ),
            note("n2", "P1", None, json!({ "diagnoses": [dx("chronic kidney disease", false, 2)] })),
            note("n4", "P1", Some("2024-04-01"), json!({ "smoking_status": "unknown" })),
            note("m1", "P2", Some("2024-02-02"), json!({ "lvef_percent": 30.0 })),
            note("x", "", None, json!({})),
        ];
        let (facts, members, unattributed) = s.reduce(&notes);
        assert_eq!((facts.len(), unattributed), (2, 1));
        let p1 = &facts[0];
        assert_eq!(p1["notes"], 4);
        assert_eq!(p1["document_ids"], json!(["n2", "n1", "n3", "n4"]), "a note without a date counts as the oldest");
        assert_eq!(
            (p1["first_note_date"].clone(), p1["last_note_date"].clone()),
            (json!("2024-01-01"), json!("2024-04-01"))
        );
        assert_eq!((p1["lvef_percent"].clone(), p1["lvef_percent_document_id"].clone()), (json!(35.0), json!("n3")));
        assert_eq!(p1["lvef_percent_evidence_start"], 10);
        assert_eq!(p1["smoking_status"], "former", "`unknown` says nothing");
        assert_eq!(p1["current_medications"][0]["dose"], "1000 mg", "from the latest note listing any");
        assert_eq!(p1["current_medications_document_id"], "n3");
        let dxs = p1["diagnoses"].as_array().unwrap();
        assert_eq!(dxs.len(), 2, "{dxs:?}");
        let hf = &dxs[1];
        assert_eq!(hf["asserted_in"].as_array().unwrap().len(), 2, "one item over both notes, case and spacing aside");
        let ckd = &dxs[0];
        assert_eq!(ckd["ruled_out_in"][0]["document_id"], "n1");
        assert_eq!(ckd["asserted_in"][0]["document_id"], "n2");
        // P1 meets both cohorts; P2 has no diabetes fact: unknown, not a member.
        let got: Vec<(String, String)> = members
            .iter()
            .map(|m| (m["patient_id"].as_str().unwrap().into(), m["cohort"].as_str().unwrap().into()))
            .collect();
        assert_eq!(got, [("P1".to_string(), "hfref_dm".to_string()), ("P1".into(), "ckd".into())]);
        assert_eq!(
            members[0]["reason"],
            "diabetes = true (note n1, 2024-01-01); lvef_percent = 35 (note n3, 2024-03-01)"
        );
        assert_eq!(members[0]["evidence"][1]["evidence_start"], 10);
        assert_eq!(members[1]["evidence"][0]["document_id"], "n2");
        // The rows make the tables' batches.
        let prov = crate::parquet_out::tests::prov();
        let [f, m] = s.batches(&facts, &members, &prov).unwrap();
        assert_eq!((f.num_rows(), m.num_rows()), (2, 2));
        let [f, m] = s.batches(&[], &[], &prov).unwrap();
        assert_eq!((f.num_rows(), m.num_rows()), (0, 0));
    }

    /// Committing a run twice (two committers, or one that died before the manifest) runs the
    /// stage twice: the same keys, the same bytes.
    #[tokio::test]
    async fn the_stage_writes_the_same_parts_every_time() {
        use medbatch_coordinator::RunStage;
        let s = stage(&[("hfref_dm", "diabetes and lvef_percent < 40")]).unwrap();
        let out = tempfile::tempdir().unwrap();
        let store = medbatch_connectors::store::LocalStore::create(out.path()).unwrap();
        // A note part as a job writes it: the pipeline's own table schema and batch.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/cohort-facts");
        let loaded = Arc::new(LoadedPipeline::load(dir.to_str().unwrap()).unwrap());
        let schema = crate::pipelines::structured::table_schema(&loaded).unwrap();
        let rows: Vec<Map<String, Value>> = vec![
            note("n1", "P1", Some("2024-01-01"), json!({ "diabetes": true, "lvef_percent": 30.0 })),
            note("n2", "P2", Some("2024-01-02"), json!({})),
        ];
        let records: Vec<crate::pipelines::structured::Record> = rows
            .iter()
            .map(|r| crate::pipelines::structured::Record {
                document_id: r["document_id"].as_str().unwrap().into(),
                patient_id: r["patient_id"].as_str().map(Into::into),
                note_date: r["note_date"].as_str().map(Into::into),
                source_uri: "file:///n".into(),
                input_sha256: "0".repeat(64),
                item_index: 0,
                value: Value::Object(r.clone()),
                evidence: None,
                from_examples: false,
                tokens_in: 1,
                tokens_out: 1,
            })
            .collect();
        let prov = crate::parquet_out::tests::prov();
        let batch = crate::pipelines::structured::records_batch(&loaded, &schema, &records, &[], &prov).unwrap();
        let bytes = to_parquet(&batch).unwrap();
        let key = "note_facts/run_id=r/part-j.parquet";
        store.put(key, bytes.clone().into()).await.unwrap();
        let parts = [OutputPart {
            table: "note_facts".into(),
            key: key.into(),
            rows: 2,
            bytes: bytes.len() as u64,
            sha256: Digest::of_bytes(&bytes),
        }];
        let run = RunId::new("r").unwrap();
        let input =
            StageInput { run_id: &run, parts: parts.to_vec(), current: None, finished_at: "2026-01-01T00:00:00Z" };
        let first = s.run(&input, &store).await.unwrap();
        let again = s.run(&input, &store).await.unwrap();
        assert_eq!(first, again);
        // Incremental: rows of content that is no longer current do not count.
        let current = [("file:///n".to_string(), Digest::of_bytes(b"other"))].into();
        let later = StageInput { current: Some(current), ..input.clone() };
        let superseded = s.run(&later, &store).await.unwrap();
        assert_eq!(superseded[0].rows, 0, "both notes' input changed since");
        assert_ne!(superseded[0].key, first[0].key);
        assert_eq!(
            first.iter().map(|p| (p.table.as_str(), p.rows)).collect::<Vec<_>>(),
            [("patient_facts", 2), ("cohort_members", 1)]
        );
        assert!(first[0].key.starts_with("patient_facts/run_id=r/part-patients-"), "{}", first[0].key);
    }

    #[test]
    fn criteria_reading_what_the_row_lacks_are_refused_at_load() {
        let e = stage(&[("x", "ejection_fraction < 40")]).err().unwrap().to_string();
        assert!(e.contains("lvef_percent") && e.contains("diagnoses(\"…\")"), "{e}");
        assert!(stage(&[("x", "lvef_percent <")]).err().unwrap().to_string().contains("character"));
        assert!(stage(&[("x", r#"medications("x")"#)]).is_err());
        assert!(stage(&[("x", r#"current_medications("insulin") or not diabetes"#)]).is_ok());
    }

    #[test]
    fn names_match_whole_words_in_order() {
        assert!(names("Chronic kidney disease, stage 3", "kidney disease"));
        assert!(!names("kidneys", "kidney"));
        assert!(!names("disease of kidney", "kidney disease"));
    }
}
