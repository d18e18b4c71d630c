//! `generate` pipelines: a short text per document in which every sentence lists the words
//! of the document it rests on (`note-summary`).
//!
//! The answer is decoded under the pipeline's schema: `{"sentences": [{"text": …,
//! "evidence": [quote, …]}]}`, the quotes copy fields (so, decoded under the grammar, they
//! are words of the document). Each quote is located in the document (exact, normalized,
//! fuzzy, else `none` with null offsets, as every evidence column); a sentence none of whose
//! quotes is found — or that gives none — is flagged `supported = false` and counted in
//! `unsupported_sentences`. The row keeps the summary as one text and the sentences with
//! their evidence.

use crate::grounding::{align, Alignment};
use crate::model_call::{ask_all, Segment};
use crate::parquet_out::{json_batch, ErrorReason, ErrorRow, ErrorStage, ParquetOutError};
use crate::pipeline::{LoadedPipeline, PipelineError};
use crate::pipelines::structured::first_json_value;
use crate::pipelines::{Outcome, Pipeline, RunCx, Unit};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use serde_json::{json, Value};
use std::sync::Arc;

/// A `generate` pipeline.
pub struct Summary {
    pipeline: Arc<LoadedPipeline>,
    schema: SchemaRef,
}

fn dict_utf8() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, false)))
}

/// The table: the document (and its patient and date when the input gives them), the
/// summary, its sentences with their evidence, the count of unsupported sentences, and the
/// provenance columns.
fn table_schema(pipeline: &LoadedPipeline) -> Schema {
    let evidence = Fields::from(vec![
        Field::new("quote", DataType::Utf8, false),
        Field::new("evidence_start", DataType::UInt32, true),
        Field::new("evidence_end", DataType::UInt32, true),
        Field::new("alignment", dict_utf8(), false),
    ]);
    let sentence = Fields::from(vec![
        Field::new("text", DataType::Utf8, false),
        Field::new("supported", DataType::Boolean, false),
        Field::new("evidence", list_of(DataType::Struct(evidence)), false),
    ]);
    let mut fields = vec![Field::new("document_id", DataType::Utf8, false)];
    if pipeline.spec.input.has_patient_or_date() {
        fields.extend([Field::new("patient_id", DataType::Utf8, true), Field::new("note_date", DataType::Utf8, true)]);
    }
    fields.extend([
        Field::new("summary", DataType::Utf8, false),
        Field::new("sentences", list_of(DataType::Struct(sentence)), false),
        Field::new("unsupported_sentences", DataType::UInt32, false),
    ]);
    fields.extend(medbatch_schemas::tables::provenance_fields());
    Schema::new(fields)
}

impl Summary {
    /// Fails when the answer schema has no `sentences` of `{text, evidence}`.
    pub fn new(pipeline: Arc<LoadedPipeline>) -> Result<Self, PipelineError> {
        let item = pipeline.schema.pointer("/properties/sentences/items/properties");
        let text = item.and_then(|i| i.pointer("/text/type")) == Some(&Value::from("string"));
        let evidence = item.and_then(|i| i.pointer("/evidence/items/type")) == Some(&Value::from("string"));
        if !(text && evidence) {
            return Err(PipelineError::Invalid {
                path: pipeline.dir.display().to_string(),
                reason: format!(
                    "{}: a generate pipeline's answer is `sentences`, a list of objects with `text` (a string) and `evidence` (a list of strings)",
                    pipeline.spec.prompt.schema
                ),
            });
        }
        let schema = Arc::new(table_schema(&pipeline));
        Ok(Self { pipeline, schema })
    }
}

/// The sentences of an answer with their evidence located in `text`: (row value, number of
/// unsupported sentences).
pub fn sentences(answer: &Value, text: &str) -> Option<(Vec<Value>, u32)> {
    let items = answer.get("sentences")?.as_array()?;
    let mut unsupported = 0;
    let mut out = Vec::with_capacity(items.len());
    for s in items {
        let said = s.get("text").and_then(Value::as_str)?.trim();
        let quotes = s.get("evidence").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let mut evidence = Vec::with_capacity(quotes.len());
        let mut found = false;
        for q in quotes.iter().filter_map(Value::as_str) {
            let l = align(q, text);
            found |= l.is_some();
            let (start, end) = l.map_or((Value::Null, Value::Null), |l| (json!(l.start), json!(l.end)));
            let alignment = l.map_or(Alignment::None, |l| l.alignment);
            evidence.push(
                json!({ "quote": q, "evidence_start": start, "evidence_end": end, "alignment": alignment.as_str() }),
            );
        }
        if !found {
            unsupported += 1;
        }
        out.push(json!({ "text": said, "supported": found, "evidence": evidence }));
    }
    Some((out, unsupported))
}

#[async_trait::async_trait]
impl Pipeline for Summary {
    fn loaded(&self) -> &LoadedPipeline {
        &self.pipeline
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Asks for the document's summary in one prompt; a document over the input budget, or
    /// an answer that does not parse, is an error row.
    async fn run(&self, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError> {
        let (doc, spec) = (&unit.doc, &self.pipeline.spec);
        let err = |stage, reason, detail: String| ErrorRow::of_document(doc, stage, reason, detail, None);
        let tokens = cx.engine().tokenizer().encode(&doc.text, false, false).len();
        if tokens > spec.extraction.chunk_tokens {
            let detail = format!(
                "{tokens} tokens exceed extraction.chunk_tokens = {}; a summary reads a document in one prompt",
                spec.extraction.chunk_tokens
            );
            let errors = vec![err(ErrorStage::Input, ErrorReason::DocumentTooLong, detail)];
            return Ok(Outcome { errors, ..Outcome::default() });
        }
        let chars = doc.text.chars().count();
        let segments = [Segment { start: 0, end: chars, text: &doc.text }];
        let asked = ask_all(cx, &self.pipeline, doc, &segments, &unit.images, None).await;
        let mut out = Outcome::from_asked(&asked);
        for reply in asked.replies {
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
            let parsed = first_json_value(&reply.answer).and_then(|a| sentences(&a, &doc.text));
            let Some((sentences, unsupported)) = parsed else {
                let reason = if reply.cut_off { ErrorReason::TruncatedAnswer } else { ErrorReason::UnparseableAnswer };
                out.errors.push(err(ErrorStage::Parse, reason, "the answer is not a list of sentences".into()));
                continue;
            };
            let summary: Vec<&str> = sentences.iter().filter_map(|s| s["text"].as_str()).collect();
            let row = json!({
                "document_id": doc.id, "patient_id": doc.patient_id, "note_date": doc.date,
                "summary": summary.join(" "), "sentences": sentences, "unsupported_sentences": unsupported,
                "source_uri": doc.source_uri, "input_sha256": doc.input_sha256.to_string(),
                "tokens_in": reply.tokens_in, "tokens_out": reply.tokens_out,
            });
            out.batch = Some(json_batch(&self.schema, &[row], cx.provenance)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sentence_is_held_to_its_quotes() {
        let note = "Admitted with CHF exacerbation.\nDischarged on furosemide 40 mg daily.";
        let answer = json!({ "sentences": [
            { "text": "Heart failure exacerbation treated.", "evidence": ["CHF exacerbation"] },
            { "text": "Furosemide continued.", "evidence": ["FUROSEMIDE 40 mg", "not in the note at all"] },
            { "text": "Prognosis good.", "evidence": ["an invented quote"] },
            { "text": "Follow up.", "evidence": [] }
        ]});
        let (s, unsupported) = sentences(&answer, note).unwrap();
        assert_eq!(unsupported, 2, "an invented quote and no quote are flagged");
        assert_eq!(s[0]["evidence"][0]["evidence_start"], 14);
        assert_eq!(s[0]["evidence"][0]["alignment"], "exact");
        assert_eq!(
            (s[1]["supported"].clone(), s[1]["evidence"][0]["alignment"].clone()),
            (json!(true), json!("normalized"))
        );
        assert_eq!(s[1]["evidence"][1]["evidence_start"], Value::Null);
        assert_eq!(s[2]["supported"], false);
        assert_eq!(s[3]["supported"], false);
        assert!(sentences(&json!({ "summary": "x" }), note).is_none());
    }

    #[test]
    fn the_shipped_summary_pipeline_builds_its_table() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/note-summary");
        let loaded = Arc::new(LoadedPipeline::load(dir.to_str().unwrap()).unwrap());
        let s = Summary::new(loaded).unwrap();
        let names: Vec<&str> = s.schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names[..6],
            ["document_id", "patient_id", "note_date", "summary", "sentences", "unsupported_sentences"]
        );
        let row = json!({ "document_id": "d", "patient_id": null, "note_date": null, "summary": "S.",
            "sentences": [{ "text": "S.", "supported": true, "evidence": [{ "quote": "q", "evidence_start": 0, "evidence_end": 1, "alignment": "exact" }] }],
            "unsupported_sentences": 0, "source_uri": "file:///d", "input_sha256": "0", "tokens_in": 1, "tokens_out": 1 });
        let batch = json_batch(&s.schema, &[row], &crate::parquet_out::tests::prov()).unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.schema(), s.schema);
    }
}
