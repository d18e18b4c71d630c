//! The patient-notes stage (`[patient_notes]` of a per-document generate pipeline whose
//! input names a patient), run once every job of a run is done and before its manifest: each
//! patient's summaries of the run gathered into one row, the input of a per-patient digest
//! (pipelines/patient-digest reads the table as Parquet records).
//!
//! A row's `text` holds the patient's notes of this run in date order (undated last, ties by
//! document id), each a heading line `Note <document id> (<date>):` followed by its supported
//! sentences, one per line (`- <sentence>`, spacing collapsed, blank ones dropped), notes apart
//! by a blank line. Sentences without
//! support are left out (a digest rests only on grounded sentences); a note none of whose
//! sentences is supported is counted in `notes_left_out` and not written. Only the run's own
//! rows are read, also in an incremental run: the table is "what came in this run" (the day's
//! notes of a nightly run).
//!
//! Deterministic (keys derived from the parts read, time the run's last job's), like every
//! stage.

use crate::parquet_out::{json_batch, ParquetOutError};
use crate::patients::{provenance, put_stage_part, read_stage_rows, stage_provenance};
use crate::pipeline::LoadedPipeline;
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use medbatch_connectors::store::ObjectStore;
use medbatch_coordinator::StageInput;
use medbatch_schemas::OutputPart;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The stage of one generate pipeline.
pub struct PatientNotes {
    table: String,
    note_table: String,
    schema: SchemaRef,
}

impl PatientNotes {
    /// The stage of `pipeline`, when its spec has `[patient_notes]` (the spec's checks have
    /// made sure it is a per-document generate pipeline with a patient).
    pub fn new(pipeline: &LoadedPipeline) -> Option<Self> {
        let spec = pipeline.spec.patient_notes.as_ref()?;
        let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, false)));
        let mut fields = vec![
            Field::new("patient_id", DataType::Utf8, false),
            Field::new("notes", DataType::UInt32, false),
            Field::new("document_ids", list, false),
            Field::new("first_note_date", DataType::Utf8, true),
            Field::new("last_note_date", DataType::Utf8, true),
            Field::new("notes_left_out", DataType::UInt32, false),
            Field::new("text", DataType::Utf8, false),
        ];
        fields.extend(provenance());
        Some(Self {
            table: spec.table.clone(),
            note_table: pipeline.spec.output.table.clone(),
            schema: Arc::new(Schema::new(fields)),
        })
    }

    /// The patient rows (sorted by patient) of summary rows given as JSON objects with the
    /// summary table's columns; the second value counts the rows without a patient.
    pub fn gather(&self, rows: &[Map<String, Value>]) -> (Vec<Value>, u64) {
        let mut by_patient: BTreeMap<&str, Vec<&Map<String, Value>>> = BTreeMap::new();
        let mut unattributed = 0;
        for r in rows {
            match r.get("patient_id").and_then(Value::as_str).filter(|p| !p.trim().is_empty()) {
                Some(p) => by_patient.entry(p).or_default().push(r),
                None => unattributed += 1,
            }
        }
        let text = |r: &Map<String, Value>, k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
        let mut out = Vec::new();
        for (patient, mut notes) in by_patient {
            // Dated notes by date, then undated ones; ties by document id.
            notes.sort_by_key(|r| {
                let date = text(r, "note_date");
                (date.is_none(), date, text(r, "document_id"))
            });
            let (mut blocks, mut ids, mut dates, mut left_out) = (Vec::new(), Vec::new(), Vec::new(), 0u32);
            for r in notes {
                let id = text(r, "document_id").unwrap_or_default();
                let said: Vec<String> = r
                    .get("sentences")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter(|s| s["supported"] == json!(true))
                    .filter_map(|s| s["text"].as_str())
                    .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
                    .filter(|t| !t.is_empty())
                    .map(|t| format!("- {t}"))
                    .collect();
                if said.is_empty() {
                    left_out += 1;
                    continue;
                }
                let date = text(r, "note_date");
                blocks.push(format!("Note {id} ({}):\n{}", date.as_deref().unwrap_or("undated"), said.join("\n")));
                ids.push(id);
                dates.extend(date);
            }
            if blocks.is_empty() {
                continue;
            }
            out.push(json!({
                "patient_id": patient, "notes": ids.len(), "document_ids": ids,
                "first_note_date": dates.iter().min(), "last_note_date": dates.iter().max(),
                "notes_left_out": left_out, "text": blocks.join("\n\n"),
            }));
        }
        (out, unattributed)
    }

    /// The rows as one batch.
    pub fn batch(
        &self,
        rows: &[Value],
        prov: &crate::parquet_out::JobProvenance,
    ) -> Result<RecordBatch, ParquetOutError> {
        json_batch(&self.schema, rows, prov)
    }
}

#[async_trait::async_trait]
impl medbatch_coordinator::RunStage for PatientNotes {
    fn tables(&self) -> Vec<&str> {
        vec![&self.table]
    }

    /// Reads the run's own summary parts (not an incremental run's earlier ones) and writes
    /// one part of the patient-notes table.
    async fn run(&self, input: &StageInput<'_>, store: &dyn ObjectStore) -> Result<Vec<OutputPart>, String> {
        let own = medbatch_schemas::tables::run_table_prefix(&self.note_table, input.run_id);
        let parts: Vec<&OutputPart> =
            input.parts.iter().filter(|p| p.table == self.note_table && p.key.starts_with(&own)).collect();
        // The run's rows are all current; no filter on content.
        let own_input = StageInput { current: None, ..input.clone() };
        let (rows, tag) = read_stage_rows(&own_input, parts, store).await?;
        let (patients, unattributed) = self.gather(&rows);
        if unattributed > 0 {
            tracing::warn!(rows = unattributed, "summary rows without a patient are not in the patient-notes table");
        }
        let batch = self.batch(&patients, &stage_provenance(rows.first(), input)).map_err(|e| e.to_string())?;
        Ok(vec![put_stage_part(store, &self.table, input, &tag, &batch).await?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> PatientNotes {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/note-summary");
        let p = LoadedPipeline::load(dir.to_str().unwrap()).unwrap();
        PatientNotes::new(&p).expect("note-summary gathers patient notes")
    }

    fn summary(id: &str, patient: Option<&str>, date: Option<&str>, sentences: &[(&str, bool)]) -> Map<String, Value> {
        let s: Vec<Value> =
            sentences.iter().map(|(t, ok)| json!({ "text": t, "supported": ok, "evidence": [] })).collect();
        json!({ "document_id": id, "patient_id": patient, "note_date": date, "sentences": s })
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn a_patients_supported_sentences_are_gathered_in_date_order() {
        let rows = [
            summary(
                "n2",
                Some("P1"),
                Some("2026-12-07"),
                &[("Chest pain   resolved.", true), ("Invented.", false), ("  ", true)],
            ),
            summary("n9", Some("P1"), None, &[("Phone call about results.", true)]),
            summary("n1", Some("P1"), Some("2026-12-06"), &[("Admitted with chest pain.", true)]),
            summary("n3", Some("P1"), Some("2026-12-07"), &[("Nothing grounded.", false)]),
            summary("m1", Some("P0"), Some("2026-12-07"), &[("Seen for cough.", true)]),
            summary("x", None, None, &[("No patient.", true)]),
        ];
        let (out, unattributed) = stage().gather(&rows);
        assert_eq!(unattributed, 1);
        assert_eq!(out.iter().map(|r| r["patient_id"].as_str().unwrap()).collect::<Vec<_>>(), ["P0", "P1"]);
        let p1 = &out[1];
        assert_eq!(p1["document_ids"], json!(["n1", "n2", "n9"]));
        assert_eq!((p1["notes"].clone(), p1["notes_left_out"].clone()), (json!(3), json!(1)));
        assert_eq!(
            (p1["first_note_date"].as_str(), p1["last_note_date"].as_str()),
            (Some("2026-12-06"), Some("2026-12-07"))
        );
        assert_eq!(
            p1["text"],
            "Note n1 (2026-12-06):\n- Admitted with chest pain.\n\nNote n2 (2026-12-07):\n- Chest pain resolved.\n\nNote n9 (undated):\n- Phone call about results."
        );
        let batch = stage().batch(&out, &crate::parquet_out::tests::prov()).unwrap();
        assert_eq!(batch.num_rows(), 2);
    }

    #[test]
    fn the_shipped_digest_pipeline_reads_this_table_and_its_headings() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/patient-digest");
        let p = LoadedPipeline::load(dir.to_str().unwrap()).unwrap();
        let s = stage();
        for f in [&p.spec.input.id_field, &p.spec.input.text_field] {
            assert!(s.schema.field_with_name(f).is_ok(), "{f}");
        }
        for f in [&p.spec.input.patient_field, &p.spec.input.date_field] {
            assert!(s.schema.field_with_name(f.as_deref().unwrap()).is_ok(), "{f:?}");
        }
        let heading = regex::Regex::new(p.spec.extraction.source_heading.as_deref().unwrap()).unwrap();
        let (out, _) = s.gather(&[summary("d-7", Some("P"), Some("2026-12-07"), &[("Seen.", true)])]);
        let first = out[0]["text"].as_str().unwrap().lines().next().unwrap();
        assert_eq!(heading.captures(first).unwrap().get(1).unwrap().as_str(), "d-7");
    }
}
