//! Arrow schemas of the output tables, and the output layout.
//!
//! Every row carries provenance: where the input came from (URI and digest), which job, run,
//! pipeline and model produced it, when, and at what token cost. Extracted values carry
//! evidence spans: offsets, in Unicode scalar values (characters), into the document text.

use arrow_schema::{DataType, Field, Schema, TimeUnit};
use std::sync::Arc;

/// Name of the error table (one row per input, record or item that could not be processed).
pub const ERRORS_TABLE: &str = "_errors";
/// Name of the accounting table (one row per input document, record, archive member and
/// image file, whatever became of it).
pub const DOCUMENTS_TABLE: &str = "_documents";
/// Name of the lab-report results table.
pub const LAB_RESULTS_TABLE: &str = "lab_results";

/// Key of a job's Parquet part: `TABLE/run_id=RUN/part-JOB-ATTEMPT.parquet`, where `ATTEMPT`
/// tags one attempt at the job. Two deliveries of a job that race each write their own part;
/// the completion marker, written once, names the parts that count, and committing the run
/// removes the others, so no reader ever sees both.
pub fn part_key(table: &str, run_id: &crate::RunId, job_id: &crate::JobId, attempt_tag: &str) -> String {
    format!("{table}/run_id={run_id}/part-{job_id}-{attempt_tag}.parquet")
}
/// Prefix of a run's parts in a table.
pub fn run_table_prefix(table: &str, run_id: &crate::RunId) -> String {
    format!("{table}/run_id={run_id}/")
}
/// Key of a job's completion marker: `_runs/RUN/done/JOB.json`.
pub fn done_key(run_id: &crate::RunId, job_id: &crate::JobId) -> String {
    format!("_runs/{run_id}/done/{job_id}.json")
}
/// Prefix under which completion markers of a run live.
pub fn done_prefix(run_id: &crate::RunId) -> String {
    format!("_runs/{run_id}/done/")
}
/// Key of a run's plan (every job planned), written before any job is published.
pub fn plan_key(run_id: &crate::RunId) -> String {
    format!("_runs/{run_id}/plan.json")
}
/// Key of a run's manifest.
pub fn manifest_key(run_id: &crate::RunId) -> String {
    format!("_runs/{run_id}/manifest.json")
}
/// Key of a run's success marker.
pub fn success_key(run_id: &crate::RunId) -> String {
    format!("_runs/{run_id}/_SUCCESS")
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn dict_utf8() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Provenance columns present on every output row.
pub fn provenance_fields() -> Vec<Field> {
    vec![
        Field::new("source_uri", DataType::Utf8, false),
        Field::new("input_sha256", DataType::Utf8, false),
        Field::new("job_id", DataType::Utf8, false),
        Field::new("run_id", DataType::Utf8, false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("pipeline_digest", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("model_digest", DataType::Utf8, false),
        Field::new("generated_at", utc_micros(), false),
        Field::new("tokens_in", DataType::UInt32, false),
        Field::new("tokens_out", DataType::UInt32, false),
    ]
}

/// `lab_results`: one row per reported result.
pub fn lab_results_schema() -> Arc<Schema> {
    let mut fields = vec![
        Field::new("document_id", DataType::Utf8, false),
        Field::new("test", DataType::Utf8, true),
        Field::new("value", DataType::Utf8, true),
        Field::new("value_numeric", DataType::Float64, true),
        Field::new("unit", DataType::Utf8, true),
        Field::new("ref_low", DataType::Float64, true),
        Field::new("ref_high", DataType::Float64, true),
        Field::new("flag", dict_utf8(), true),
        Field::new("evidence_start", DataType::UInt32, false),
        Field::new("evidence_end", DataType::UInt32, false),
        // How the row was obtained: a deterministic parser (`hl7_obx`, `delimited_table`) or
        // the model (`model`).
        Field::new("method", dict_utf8(), false),
        // How the value was found in the evidence text: `exact`, `normalized` (case, spacing,
        // decimal comma), `fuzzy`, or `none` (not found: kept, flagged, not to be trusted).
        Field::new("alignment", dict_utf8(), false),
        // The value is not in the document but is in the prompt's examples.
        Field::new("from_examples", DataType::Boolean, false),
        // `final`, `preliminary` or `corrected`, as the report says (HL7 OBX-11, a status
        // column, a marked line or a preliminary report). Entries without a result (pending,
        // cancelled, not reported) have no row; the run summary counts them.
        Field::new("status", dict_utf8(), false),
    ];
    fields.extend(provenance_fields());
    Arc::new(Schema::new(fields))
}

/// The job columns of the tables medbatch keeps about a run (the model is named by id only).
fn run_fields() -> [Field; 6] {
    [
        Field::new("job_id", DataType::Utf8, false),
        Field::new("run_id", DataType::Utf8, false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("pipeline_digest", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("generated_at", utc_micros(), false),
    ]
}

/// `_errors`: one row per input, record or item that could not be processed.
pub fn errors_schema() -> Arc<Schema> {
    let mut fields = vec![
        Field::new("source_uri", DataType::Utf8, false),
        Field::new("member", DataType::Utf8, true),
        Field::new("record", DataType::Utf8, true),
        Field::new("document_id", DataType::Utf8, true),
        // Where it failed: `input`, `model`, `parse`.
        Field::new("stage", dict_utf8(), false),
        // Stable reason label (`invalid_utf8`, `unparseable_answer`, ...).
        Field::new("reason", dict_utf8(), false),
        // Human-readable detail: positions, sizes, formats; never document text.
        Field::new("detail", DataType::Utf8, false),
        Field::new("evidence_start", DataType::UInt32, true),
        Field::new("evidence_end", DataType::UInt32, true),
        Field::new("input_sha256", DataType::Utf8, true),
    ];
    fields.extend(run_fields());
    Arc::new(Schema::new(fields))
}

/// `_documents`: one row per input document, record, archive member and image file: its
/// status, the reason when it failed or was skipped, the rows it gave per table and its tokens.
/// An imaging prompt made of several files has a row for each file; its rows and tokens are
/// on its first file's row (null on the others), so sums over the table are right.
pub fn documents_schema() -> Arc<Schema> {
    let mut fields = vec![
        // The input file or archive (members and records have columns of their own).
        Field::new("source_uri", DataType::Utf8, false),
        Field::new("member", DataType::Utf8, true),
        // The record a failed record was (`line N` or its id); null for documents read.
        Field::new("record", DataType::Utf8, true),
        // The document it was read into (an imaging prompt's study or series id).
        Field::new("document_id", DataType::Utf8, true),
        // `ok`, `failed`, `skipped`.
        Field::new("status", dict_utf8(), false),
        // Failed: the first error row's reason label; skipped: why it was left out.
        Field::new("reason", dict_utf8(), true),
        // Images this file gave its prompt (imaging pipelines only).
        Field::new("images", DataType::UInt32, true),
        // Rows in the pipeline's table and in `_errors`.
        Field::new("rows", DataType::UInt32, true),
        Field::new("error_rows", DataType::UInt32, true),
        Field::new("input_sha256", DataType::Utf8, true),
    ];
    fields.extend(run_fields());
    fields.extend([Field::new("tokens_in", DataType::UInt64, true), Field::new("tokens_out", DataType::UInt64, true)]);
    Arc::new(Schema::new(fields))
}

/// Whether a table is one medbatch keeps about a run (`_errors`, `_documents`) rather than a
/// pipeline's output.
pub fn is_system_table(table: &str) -> bool {
    table.starts_with('_')
}

/// The schema of a named output table.
pub fn table_schema(table: &str) -> Option<Arc<Schema>> {
    match table {
        LAB_RESULTS_TABLE => Some(lab_results_schema()),
        ERRORS_TABLE => Some(errors_schema()),
        DOCUMENTS_TABLE => Some(documents_schema()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobId, RunId};

    #[test]
    fn layout_keys() {
        let r = RunId::new("r1").unwrap();
        let j = JobId::derive(&r, "x");
        assert_eq!(part_key("lab_results", &r, &j, "a1b2"), format!("lab_results/run_id=r1/part-{j}-a1b2.parquet"));
        assert!(part_key("t", &r, &j, "a").starts_with(&run_table_prefix("t", &r)));
        assert_eq!(done_key(&r, &j), format!("_runs/r1/done/{j}.json"));
        assert_eq!(manifest_key(&r), "_runs/r1/manifest.json");
        assert_eq!(success_key(&r), "_runs/r1/_SUCCESS");
    }

    #[test]
    fn lab_results_has_required_columns() {
        let s = lab_results_schema();
        for c in [
            "document_id",
            "source_uri",
            "test",
            "value",
            "value_numeric",
            "unit",
            "ref_low",
            "ref_high",
            "flag",
            "evidence_start",
            "evidence_end",
            "run_id",
            "job_id",
            "pipeline_digest",
            "model_id",
            "model_digest",
            "generated_at",
            "tokens_in",
            "tokens_out",
        ] {
            assert!(s.field_with_name(c).is_ok(), "missing {c}");
        }
    }
}
