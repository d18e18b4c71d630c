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
//!
//! With `extraction.reduce`, a document over `chunk_tokens` is summarized in pieces of whole
//! paragraphs (a paragraph too long for one, in pieces of whole lines), then the pieces'
//! sentences — one per line — are summarized again, in pieces again while they do not fit
//! one prompt (map, then reduce; `levels` counts the rounds). A sentence of a later round
//! quotes the sentences of the round before; its evidence is the quotes of the document that
//! those sentences rest on, so every row's offsets are the document's. With
//! `extraction.source_heading`, each sentence also lists the blocks of the document its
//! evidence lies in (`sources`: the heading's capture above each quote, e.g. a note id).

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
    heading: Option<regex::Regex>,
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
    let mut sentence = vec![
        Field::new("text", DataType::Utf8, false),
        Field::new("supported", DataType::Boolean, false),
        Field::new("evidence", list_of(DataType::Struct(evidence)), false),
    ];
    if pipeline.spec.extraction.source_heading.is_some() {
        sentence.push(Field::new("sources", list_of(DataType::Utf8), false));
    }
    let sentence = Fields::from(sentence);
    let mut fields = vec![Field::new("document_id", DataType::Utf8, false)];
    if pipeline.spec.input.has_patient_or_date() {
        fields.extend([Field::new("patient_id", DataType::Utf8, true), Field::new("note_date", DataType::Utf8, true)]);
    }
    fields.extend([
        Field::new("summary", DataType::Utf8, false),
        Field::new("sentences", list_of(DataType::Struct(sentence)), false),
        Field::new("unsupported_sentences", DataType::UInt32, false),
    ]);
    if pipeline.spec.extraction.reduce {
        fields.push(Field::new("levels", DataType::UInt32, false));
    }
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
        // Checked when the pipeline was loaded.
        let heading = pipeline.spec.extraction.source_heading.as_deref().and_then(|h| regex::Regex::new(h).ok());
        Ok(Self { pipeline, schema, heading })
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

    /// Asks for the document's summary in one prompt (with `extraction.reduce`, a longer
    /// document in rounds); a document over the input budget, or an answer that does not
    /// parse, is an error row.
    async fn run(&self, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError> {
        let (doc, spec) = (&unit.doc, &self.pipeline.spec);
        let budget = spec.extraction.chunk_tokens;
        let count = |t: &str| cx.engine().tokenizer().encode(t, false, false).len();
        let tokens = count(&doc.text);
        let mut out = Outcome::default();
        if tokens > budget && !spec.extraction.reduce {
            let detail = format!(
                "{tokens} tokens exceed extraction.chunk_tokens = {budget}; a summary reads a document in one prompt"
            );
            out.errors.push(ErrorRow::of_document(doc, ErrorStage::Input, ErrorReason::DocumentTooLong, detail, None));
            return Ok(out);
        }
        let Some((sentences, levels)) = self.summarize(unit, cx, tokens, &count, &mut out).await else {
            return Ok(out);
        };
        let sentences: Vec<Value> = sentences.into_iter().map(|s| self.with_sources(s, &doc.text)).collect();
        let unsupported = sentences.iter().filter(|s| s["supported"] == json!(false)).count();
        let summary: Vec<&str> = sentences.iter().filter_map(|s| s["text"].as_str()).collect();
        let mut row = json!({
            "document_id": doc.id, "patient_id": doc.patient_id, "note_date": doc.date,
            "summary": summary.join(" "), "sentences": sentences, "unsupported_sentences": unsupported,
            "source_uri": doc.source_uri, "input_sha256": doc.input_sha256.to_string(),
            "tokens_in": out.tokens_in, "tokens_out": out.tokens_out,
        });
        if spec.extraction.reduce {
            row["levels"] = json!(levels);
        }
        out.batch = Some(json_batch(&self.schema, &[row], cx.provenance)?);
        Ok(out)
    }
}

/// A sentence of a round and the document's quotes it rests on (located, offsets in the
/// document).
#[derive(Clone, Debug)]
struct Said {
    text: String,
    evidence: Vec<Value>,
}

impl Summary {
    /// The document's sentences (row values, evidence located in the document) and the
    /// number of rounds; `None` when a prompt failed (its error rows are in `out`). `tokens`:
    /// the document's length in tokens.
    async fn summarize(
        &self,
        unit: &Unit,
        cx: &RunCx<'_>,
        tokens: usize,
        count: &(dyn Fn(&str) -> usize + Sync),
        out: &mut Outcome,
    ) -> Option<(Vec<Value>, u32)> {
        let (doc, budget) = (&unit.doc, self.pipeline.spec.extraction.chunk_tokens);
        let too_long =
            |detail: String| ErrorRow::of_document(doc, ErrorStage::Input, ErrorReason::DocumentTooLong, detail, None);
        // Round 1: the document, in pieces when it does not fit one prompt.
        // The document's tokens were counted by the caller: a text that fits is one piece.
        let pieces =
            if tokens <= budget { Ok(vec![(0, doc.text.chars().count())]) } else { pack(&doc.text, budget, count) };
        let pieces = match pieces {
            Ok(p) => p,
            Err(detail) => {
                out.errors.push(too_long(detail));
                return None;
            }
        };
        let answers = self.ask(unit, cx, &doc.text, &pieces, out).await?;
        if pieces.len() == 1 {
            return answers.into_iter().next().map(|a| (a, 1));
        }
        let mut said: Vec<Said> = answers.into_iter().flatten().map(|s| Said::of_document(&s)).collect();
        for level in 2..=MAX_LEVELS {
            // The round's text: the sentences before, one per line.
            let text = said.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join("\n");
            let lines = line_ranges(&text);
            let pieces = match pieces_of(&text, budget, count) {
                Ok(p) => p,
                Err(detail) => {
                    out.errors.push(too_long(format!("round {level}: {detail}")));
                    return None;
                }
            };
            let answers = self.ask(unit, cx, &text, &pieces, out).await?;
            let resolved: Vec<Vec<Value>> =
                answers.into_iter().map(|a| a.into_iter().map(|s| resolve(s, &lines, &said)).collect()).collect();
            if pieces.len() == 1 {
                return resolved.into_iter().next().map(|a| (a, level));
            }
            let next: Vec<Said> = resolved.into_iter().flatten().map(|s| Said::of_document(&s)).collect();
            if next.len() >= said.len() {
                let detail = format!(
                    "round {level}: {} sentences gave {} (the summaries do not get shorter)",
                    said.len(),
                    next.len()
                );
                out.errors.push(too_long(detail));
                return None;
            }
            said = next;
        }
        out.errors.push(too_long(format!("not summarized in {MAX_LEVELS} rounds")));
        None
    }

    /// Asks about each piece (char ranges of `text`) at once; each answer's sentences with
    /// their quotes located in `text` (offsets in `text`). `None` when one failed.
    async fn ask(
        &self,
        unit: &Unit,
        cx: &RunCx<'_>,
        text: &str,
        pieces: &[(usize, usize)],
        out: &mut Outcome,
    ) -> Option<Vec<Vec<Value>>> {
        let doc = &unit.doc;
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let byte = |c: usize| chars.get(c).map_or(text.len(), |x| x.0);
        let segments: Vec<Segment> =
            pieces.iter().map(|&(start, end)| Segment { start, end, text: &text[byte(start)..byte(end)] }).collect();
        let asked = ask_all(cx, &self.pipeline, doc, &segments, &unit.images, None).await;
        out.tokens_in += asked.tokens_in;
        out.tokens_out += asked.tokens_out;
        out.engine_ms += asked.engine_ms;
        let mut answers = Vec::with_capacity(segments.len());
        let mut failed = false;
        for (reply, seg) in asked.replies.into_iter().zip(&segments) {
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    out.errors.push(e);
                    failed = true;
                    continue;
                }
            };
            let parsed = first_json_value(&reply.answer).and_then(|a| sentences(&a, seg.text));
            let Some((mut found, _)) = parsed else {
                let reason = if reply.cut_off { ErrorReason::TruncatedAnswer } else { ErrorReason::UnparseableAnswer };
                let detail = "the answer is not a list of sentences".to_string();
                out.errors.push(ErrorRow::of_document(doc, ErrorStage::Parse, reason, detail, None));
                failed = true;
                continue;
            };
            for s in &mut found {
                shift(s, seg.start);
            }
            answers.push(found);
        }
        (!failed).then_some(answers)
    }

    /// `sentence` with `sources` (the heading above each located quote), when the spec names
    /// a heading.
    fn with_sources(&self, mut sentence: Value, document: &str) -> Value {
        let Some(re) = &self.heading else { return sentence };
        let mut headings: Vec<(usize, &str)> = Vec::new();
        let mut at = 0;
        for line in document.split('\n') {
            if let Some(name) = re.captures(line).and_then(|c| c.get(1)) {
                headings.push((at, name.as_str()));
            }
            at += line.chars().count() + 1;
        }
        let mut sources: Vec<&str> = Vec::new();
        for e in sentence["evidence"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let Some(start) = e["evidence_start"].as_u64() else { continue };
            if let Some((_, name)) = headings.iter().rev().find(|(h, _)| *h as u64 <= start) {
                if !sources.contains(name) {
                    sources.push(name);
                }
            }
        }
        sentence["sources"] = json!(sources);
        sentence
    }
}

/// Most rounds of a reduce.
const MAX_LEVELS: u32 = 6;

impl Said {
    /// A sentence of an answer, keeping only its located quotes; its spacing collapsed, so
    /// that it is one line of the next round's text.
    fn of_document(sentence: &Value) -> Self {
        let evidence = sentence["evidence"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|e| e["evidence_start"].is_u64())
            .cloned()
            .collect();
        let text = sentence["text"].as_str().unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ");
        Self { text, evidence }
    }
}

/// Moves a sentence's located quotes by `by` characters.
fn shift(sentence: &mut Value, by: usize) {
    for e in sentence["evidence"].as_array_mut().into_iter().flatten() {
        for k in ["evidence_start", "evidence_end"] {
            if let Some(v) = e[k].as_u64() {
                e[k] = json!(v + by as u64);
            }
        }
    }
}

/// The char ranges of the lines of `text` (split at `\n`).
fn line_ranges(text: &str) -> Vec<(usize, usize)> {
    let mut at = 0;
    text.split('\n')
        .map(|l| {
            let n = l.chars().count();
            let r = (at, at + n);
            at += n + 1;
            r
        })
        .collect()
}

/// A sentence of a later round with its evidence taken down to the document: the quotes of
/// the sentences of the round before (`said`, one per line at `lines`) that its own located
/// quotes overlap. Supported when that leaves any.
fn resolve(mut sentence: Value, lines: &[(usize, usize)], said: &[Said]) -> Value {
    let mut evidence: Vec<Value> = Vec::new();
    for e in sentence["evidence"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(start), Some(end)) = (e["evidence_start"].as_u64(), e["evidence_end"].as_u64()) else { continue };
        for (i, &(a, b)) in lines.iter().enumerate().take(said.len()) {
            if (a as u64) < end && start < (b as u64).max(a as u64 + 1) {
                for q in &said[i].evidence {
                    let same = |x: &Value| {
                        x["evidence_start"] == q["evidence_start"] && x["evidence_end"] == q["evidence_end"]
                    };
                    if !evidence.iter().any(same) {
                        evidence.push(q.clone());
                    }
                }
            }
        }
    }
    sentence["supported"] = json!(!evidence.is_empty());
    sentence["evidence"] = Value::Array(evidence);
    sentence
}

/// The whole of `text` when it fits `budget` tokens, else [`pack`]'s pieces.
fn pieces_of(text: &str, budget: usize, count: &dyn Fn(&str) -> usize) -> Result<Vec<(usize, usize)>, String> {
    if count(text) <= budget {
        return Ok(vec![(0, text.chars().count())]);
    }
    pack(text, budget, count)
}

/// Char ranges of `text` in pieces of at most `budget` tokens (by `count`), of whole
/// paragraphs (apart by blank lines) where they fit, else of whole lines; the text between
/// pieces (the blank lines) belongs to none. Fails on a line over the budget.
fn pack(text: &str, budget: usize, count: &dyn Fn(&str) -> usize) -> Result<Vec<(usize, usize)>, String> {
    // Units: (char start, char end, tokens); a unit is a paragraph, or a line of one too long.
    let mut units: Vec<(usize, usize, usize)> = Vec::new();
    let lines = line_ranges(text);
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let slice = |a: usize, b: usize| {
        let byte = |c: usize| chars.get(c).map_or(text.len(), |x| x.0);
        &text[byte(a)..byte(b)]
    };
    let mut i = 0;
    while i < lines.len() {
        if slice(lines[i].0, lines[i].1).trim().is_empty() {
            i += 1;
            continue;
        }
        let first = i;
        while i + 1 < lines.len() && !slice(lines[i + 1].0, lines[i + 1].1).trim().is_empty() {
            i += 1;
        }
        let (a, b) = (lines[first].0, lines[i].1);
        let n = count(slice(a, b));
        if n <= budget {
            units.push((a, b, n));
        } else {
            for &(la, lb) in &lines[first..=i] {
                let n = count(slice(la, lb));
                if n > budget {
                    return Err(format!("a line of {n} tokens exceeds extraction.chunk_tokens = {budget}"));
                }
                units.push((la, lb, n));
            }
        }
        i += 1;
    }
    let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
    for (a, b, n) in units {
        match pieces.last_mut() {
            // The separator between two units counts as about a token.
            Some(p) if p.2 + 1 + n <= budget => {
                p.1 = b;
                p.2 += 1 + n;
            }
            _ => pieces.push((a, b, n)),
        }
    }
    if pieces.is_empty() {
        pieces.push((0, text.chars().count(), 0));
    }
    Ok(pieces.into_iter().map(|(a, b, _)| (a, b)).collect())
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
    fn long_documents_are_packed_in_whole_paragraphs_then_lines() {
        let words = |t: &str| t.split_whitespace().count();
        let text = "a b c\nd e\n\nf g h i\n\n\nj k l m n o p q\nr s";
        let slices = |p: Vec<(usize, usize)>| -> Vec<String> {
            p.iter().map(|&(a, b)| text.chars().skip(a).take(b - a).collect()).collect()
        };
        // Paragraphs of 5 and 4 words do not share a piece of 8; one of 10 goes by lines.
        assert_eq!(slices(pack(text, 8, &words).unwrap()), ["a b c\nd e", "f g h i", "j k l m n o p q", "r s"]);
        assert_eq!(slices(pack(text, 10, &words).unwrap()), ["a b c\nd e\n\nf g h i", "j k l m n o p q\nr s"]);
        assert_eq!(pieces_of(text, 19, &words).unwrap(), [(0, text.chars().count())], "a text that fits is one piece");
        assert!(pack(text, 7, &words).unwrap_err().contains("8 tokens"), "a line over the budget");
    }

    #[test]
    fn a_later_rounds_sentence_rests_on_the_documents_quotes_of_the_sentences_it_quotes() {
        let q = |start: u64, quote: &str| json!({ "quote": quote, "evidence_start": start, "evidence_end": start + quote.chars().count() as u64, "alignment": "exact" });
        let said = [
            Said::of_document(
                &json!({ "text": "Admitted  for\npneumonia.", "evidence": [q(10, "pneumonia"), { "evidence_start": null }] }),
            ),
            Said { text: "Started ceftriaxone.".into(), evidence: vec![q(40, "ceftriaxone 1 g"), q(10, "pneumonia")] },
            Said { text: "Unsupported.".into(), evidence: vec![] },
        ];
        let text = said.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join("\n");
        assert_eq!(said[0].text, "Admitted for pneumonia.", "one line per sentence");
        assert_eq!(said[0].evidence, [q(10, "pneumonia")], "only located quotes");
        let lines = line_ranges(&text);
        let answer = json!({ "sentences": [
            { "text": "Pneumonia treated with ceftriaxone.", "evidence": ["pneumonia.", "ceftriaxone"] },
            { "text": "Nothing to go on.", "evidence": ["Unsupported"] },
            { "text": "Made up.", "evidence": ["xylophone quartet"] }
        ]});
        let (found, _) = sentences(&answer, &text).unwrap();
        let resolved: Vec<Value> = found.into_iter().map(|s| resolve(s, &lines, &said)).collect();
        assert_eq!(resolved[0]["evidence"], json!([q(10, "pneumonia"), q(40, "ceftriaxone 1 g")]), "union, once each");
        assert_eq!(resolved[0]["supported"], true);
        assert_eq!((resolved[1]["supported"].clone(), resolved[1]["evidence"].clone()), (json!(false), json!([])));
        assert_eq!(resolved[2]["supported"], false);
        let mut moved = json!({ "evidence": [q(3, "abc"), { "quote": "x", "evidence_start": null, "evidence_end": null, "alignment": "none" }] });
        shift(&mut moved, 7);
        assert_eq!(moved["evidence"][0]["evidence_start"], 10);
        assert_eq!(moved["evidence"][1]["evidence_start"], Value::Null);
    }

    #[test]
    fn the_digest_pipeline_names_the_notes_each_sentence_rests_on() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/patient-digest");
        let s = Summary::new(Arc::new(LoadedPipeline::load(dir.to_str().unwrap()).unwrap())).unwrap();
        let doc = "Note n1 (2026-12-06):\n- Admitted with pneumonia.\n\nNote n2 (2026-12-07):\n- Discharged home.";
        let at = |w: &str| doc.find(w).unwrap() as u64;
        let e = |start: u64| json!({ "quote": "q", "evidence_start": start, "evidence_end": start + 1, "alignment": "exact" });
        let sentence = json!({ "text": "t", "supported": true, "evidence": [e(at("Discharged")), e(at("pneumonia")), e(at("Admitted"))] });
        assert_eq!(s.with_sources(sentence, doc)["sources"], json!(["n2", "n1"]));
        let names: Vec<&str> = s.schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert!(names.contains(&"levels"), "{names:?}");
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
