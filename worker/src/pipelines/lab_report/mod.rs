//! The `lab-report` pipeline (`task = "extract"`): from a lab report's text to
//! `lab_results` rows.
//!
//! A report reaches the model only where code cannot read it reliably. The order is:
//!
//! 1. Deterministic parsers read standard structured formats: HL7 v2 OBX segments
//!    ([`hl7`]), delimited tables with a header row ([`table`]) and fixed-width tables with
//!    a header row ([`fixed`]). Each returns its items, the entries it set aside (pending,
//!    cancelled …) and the character spans it claimed; a second parser never re-reads a
//!    claimed span.
//! 2. [`segment`] cuts the rest into candidate result lines (prose sentences into phrases),
//!    skipping claimed spans, headers, addresses, dates, signatures and comments.
//! 3. [`classify`] keeps the candidates that name a laboratory test of the pipeline's
//!    lexicon and hold a current value; metadata, entries without a result (pending,
//!    cancelled, not reported), earlier values, targets, interpretation tables and vital
//!    signs are set aside with a reason and counted. A pipeline reading whole documents
//!    sends token-budgeted chunks of whole lines instead, and keeps only answers grounded on
//!    a kept line.
//! 4. The model answers one JSON object per candidate (`pipelines/lab-report/prompt.j2`);
//!    [`answer`] turns it into a [`LabItem`], recomputing numbers ([`numbers`]) and the flag in
//!    code and refusing values that do not occur in the candidate.
//!
//! Every offset is in characters (Unicode scalar values) of the document text, the unit of
//! the `evidence_start`/`evidence_end` columns. Only this file calls the model (through
//! [`crate::model_call`]), and no error message carries document text (it would be PHI in
//! logs). [`eval`] scores a run's rows against a gold set.

pub mod answer;
pub mod classify;
pub mod eval;
pub mod fixed;
pub mod hl7;
pub mod items;
mod lines;
pub mod numbers;
pub mod output;
pub mod segment;
pub mod table;

pub use answer::{parse_answer, parse_document_answer, AnswerError, ANSWER_FIELDS, ANSWER_PRIMER};
pub use classify::{Classifier, Lexicon, NonResult, ResultStatus, SetAside};
pub use fixed::parse_fixed_width_table;
pub use hl7::parse_hl7_obx;
pub use items::{Candidate, Flag, LabItem, Method, Parsed, Span};
pub use numbers::{compute_flag, parse_range, parse_value};
pub use output::{lab_results_batch, LabRow};
pub use segment::segment;
pub use table::parse_delimited_table;

use crate::grounding::{from_examples, Alignment};
use crate::model_call::{ask_all, Segment};
use crate::parquet_out::{ErrorStage, ParquetOutError};
use crate::pipeline::LoadedPipeline;
use crate::pipelines::{Outcome, Pipeline, RunCx, Unit};
use arrow::datatypes::SchemaRef;
use medbatch_schemas::pipeline::{ExtractionUnit, ParserKind};
use medbatch_schemas::tables::lab_results_schema;
use std::sync::Arc;

/// The lab-report pipeline.
pub struct LabReport {
    pipeline: Arc<LoadedPipeline>,
    /// The prompt's shared part (instructions and examples), to tell answers copied from the
    /// examples from invented ones.
    examples: String,
    /// The result classifier, when the pipeline names a lexicon (else every candidate is
    /// read).
    classifier: Option<Classifier>,
}

impl LabReport {
    pub fn new(pipeline: Arc<LoadedPipeline>) -> Self {
        let examples = pipeline.render("").map(|r| r.text[..r.shared_prefix_len].to_string()).unwrap_or_default();
        let classifier = pipeline.lexicon.clone().map(Classifier::new);
        Self { pipeline, examples, classifier }
    }
}

#[async_trait::async_trait]
impl Pipeline for LabReport {
    fn loaded(&self) -> &LoadedPipeline {
        &self.pipeline
    }

    fn schema(&self) -> SchemaRef {
        lab_results_schema()
    }

    async fn run(&self, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError> {
        let (doc, spec) = (&unit.doc, &self.pipeline.spec);
        let mut rows: Vec<LabRow> = Vec::new();
        let row = |item: LabItem, tokens_in: u32, tokens_out: u32| LabRow {
            document_id: doc.id.clone(),
            source_uri: doc.source_uri.clone(),
            input_sha256: doc.input_sha256.to_string(),
            item,
            tokens_in,
            tokens_out,
        };
        let mut claimed: Vec<Span> = Vec::new();
        let mut set_aside: Vec<SetAside> = Vec::new();
        for parser in &spec.extraction.parsers {
            let parsed = match parser {
                ParserKind::Hl7Obx => parse_hl7_obx(&doc.text),
                ParserKind::DelimitedTable => parse_delimited_table(&doc.text),
                ParserKind::FixedWidthTable => parse_fixed_width_table(&doc.text),
            };
            if let Some(p) = parsed {
                let new = |s: usize, e: usize| !claimed.iter().any(|&(a, b)| s >= a && e <= b);
                for it in p.items {
                    if !new(it.evidence_start, it.evidence_end) {
                        continue;
                    }
                    // A table of observations (`Weight (kg)   74.6   72.3`) is read like one of
                    // results; the lexicon tells the vital signs apart.
                    let vital = self.classifier.as_ref().is_some_and(|cl| cl.names_vital_sign(it.test.as_deref()));
                    if vital {
                        set_aside.push(SetAside {
                            reason: NonResult::VitalSign,
                            start: it.evidence_start,
                            end: it.evidence_end,
                        });
                    } else {
                        rows.push(row(it, 0, 0));
                    }
                }
                set_aside.extend(p.set_aside.into_iter().filter(|x| new(x.start, x.end)));
                claimed.extend(p.claimed);
            }
        }
        let mut segmented = segment(&doc.text, &claimed);
        // Candidates that are not results, kept for grounding whole-document answers on them
        // (an answer borne out only by such a line gives no row).
        let mut not_results: Vec<Candidate> = Vec::new();
        let lines: Vec<Candidate> = match &self.classifier {
            None => segmented,
            Some(cl) => {
                // Rows of interpretation tables (under a header of category names).
                let tables = classify::interpretation_tables(&doc.text);
                segmented.retain(|c| {
                    let inside = lines::overlaps_any(&tables, c.start, c.end);
                    if inside {
                        set_aside.push(SetAside { reason: NonResult::Interpretation, start: c.start, end: c.end });
                    }
                    !inside
                });
                set_aside.extend(cl.unresulted_lines(&doc.text, &claimed, &segmented));
                let mut kept = Vec::with_capacity(segmented.len());
                for mut c in segmented {
                    match cl.classify(&mut c) {
                        Ok(()) => kept.push(c),
                        Err(reason) => {
                            set_aside.push(SetAside { reason, start: c.start, end: c.end });
                            not_results.push(c);
                        }
                    }
                }
                // A test named again later in the letter, its first value dated to
                // admission (`à l'entrée, natrémie à 124 … à la sortie, natrémie à 134`).
                for k in cl.earlier_mentions(&doc.text, &kept).into_iter().rev() {
                    let c = kept.remove(k);
                    set_aside.push(SetAside { reason: NonResult::Previous, start: c.start, end: c.end });
                    not_results.push(c);
                }
                kept
            }
        };
        let results_at: Vec<Span> = claimed.iter().copied().chain(lines.iter().map(|c| (c.start, c.end))).collect();
        let marks = classify::StatusMarks::read(&doc.text, &results_at);
        for r in &mut rows {
            r.item.status = Some(r.item.status.unwrap_or_else(|| marks.at(r.item.evidence_start)));
        }
        let candidates: Vec<Candidate> = match spec.extraction.unit {
            ExtractionUnit::Line => lines.clone(),
            // The model reads the whole report; its answers are grounded on the lines below.
            ExtractionUnit::Document | ExtractionUnit::Section if lines.is_empty() => Vec::new(),
            // Long reports are read in token-budgeted chunks of whole lines.
            ExtractionUnit::Document | ExtractionUnit::Section => {
                let tokenizer = cx.engine().tokenizer();
                let count = |s: &str| tokenizer.encode(s, false, false).len();
                let (budget, overlap) = (spec.extraction.chunk_tokens, spec.extraction.chunk_overlap_tokens);
                crate::chunk::chunk_by_tokens(&doc.text, budget, overlap, &count)
                    .into_iter()
                    .map(|c| Candidate { start: c.start, end: c.end, text: c.text })
                    .collect()
            }
        };
        let segments: Vec<Segment> =
            candidates.iter().map(|c| Segment { start: c.start, end: c.end, text: &c.text }).collect();
        let asked = ask_all(cx, &self.pipeline, doc, &segments, &unit.images, Some(ANSWER_PRIMER)).await;
        let mut out = Outcome::from_asked(&asked);
        for (c, reply) in candidates.iter().zip(asked.replies) {
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
            let results = match spec.extraction.unit {
                ExtractionUnit::Line => vec![parse_answer(&reply.answer, c)],
                ExtractionUnit::Document | ExtractionUnit::Section => {
                    // Grounded on the lines of this chunk only; an answer that only a line
                    // set aside bears out (a pending entry, an earlier value) is dropped.
                    let within = |l: &&Candidate| l.start >= c.start && l.end <= c.end;
                    let inside: Vec<Candidate> = lines.iter().filter(within).cloned().collect();
                    let aside: Vec<Candidate> = not_results.iter().filter(within).cloned().collect();
                    let mut results = parse_document_answer(&reply.answer, &inside);
                    if !aside.is_empty() {
                        let ungrounded: Vec<usize> = (0..results.len())
                            .filter(|&k| results[k].as_ref().is_ok_and(|i| i.alignment == Alignment::None))
                            .collect();
                        for k in ungrounded.into_iter().rev() {
                            let object = answer::nth_answer_object(&reply.answer, k);
                            let borne_out = object.is_some_and(|o| {
                                aside.iter().any(|l| parse_answer(&o, l).is_ok_and(|i| i.alignment != Alignment::None))
                            });
                            if borne_out {
                                drop(results.remove(k));
                            }
                        }
                    }
                    results
                }
            };
            for result in results {
                match result {
                    Ok(mut item) => {
                        // The line the row came from may say corrected or preliminary.
                        let line = match spec.extraction.unit {
                            ExtractionUnit::Line => Some(c),
                            ExtractionUnit::Document | ExtractionUnit::Section => {
                                lines.iter().find(|l| (l.start, l.end) == (item.evidence_start, item.evidence_end))
                            }
                        };
                        let section = marks.at(item.evidence_start);
                        item.status = Some(line.map_or(section, |l| classify::line_status(&l.text, section)));
                        if item.alignment == Alignment::None {
                            let copied = |s: &Option<String>| {
                                s.as_deref().is_some_and(|s| from_examples(s, &self.examples, &doc.text))
                            };
                            item.from_examples = copied(&item.value) || copied(&item.test);
                        }
                        // Overlapping chunks read some lines twice: one row per line and value.
                        let seen = rows.iter().any(|r| {
                            r.item.alignment != Alignment::None
                                && (r.item.evidence_start, r.item.evidence_end, &r.item.value)
                                    == (item.evidence_start, item.evidence_end, &item.value)
                        });
                        if !seen {
                            rows.push(row(item, reply.tokens_in, reply.tokens_out))
                        }
                    }
                    Err(e) => {
                        let mut detail = e.to_string();
                        if reply.cut_off {
                            detail.push_str(" (answer cut off at max_new_tokens)");
                        }
                        let span = Some((c.start, c.end));
                        out.errors.push(crate::parquet_out::ErrorRow::of_document(
                            doc,
                            ErrorStage::Parse,
                            e.reason(),
                            detail,
                            span,
                        ));
                    }
                }
            }
        }
        // A result history (one row per date): only the latest date's rows are results.
        if let Some(cl) = &self.classifier {
            let doc_lines = lines::split_lines(&doc.text);
            let line_of = |at: usize| {
                doc_lines.iter().find(|l| l.start <= at && at < l.char_end().max(l.start + 1)).map_or("", |l| l.text)
            };
            let keys: Vec<(&str, Option<&str>)> =
                rows.iter().map(|r| (line_of(r.item.evidence_start), r.item.test.as_deref())).collect();
            let earlier = cl.earlier_dated(&keys);
            for k in earlier.into_iter().rev() {
                let r = rows.remove(k);
                set_aside.push(SetAside {
                    reason: NonResult::Previous,
                    start: r.item.evidence_start,
                    end: r.item.evidence_end,
                });
            }
        }
        if !rows.is_empty() {
            out.batch = Some(lab_results_batch(&rows, cx.provenance)?);
        }
        out.set_aside = classify::count_set_aside(&set_aside);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::lines::{overlaps_any, span_text};
    use super::segment::looks_like_result;
    use super::*;
    use serde_json::{Map, Value};

    #[test]
    fn labels_and_names_are_stable() {
        assert_eq!(Flag::Critical.as_str(), "critical");
        assert_eq!(Flag::Abnormal.as_str(), "abnormal");
        assert_eq!(Method::Hl7Obx.as_str(), "hl7_obx");
        assert_eq!(Method::DelimitedTable.as_str(), "delimited_table");
        assert_eq!(Method::FixedWidthTable.as_str(), "fixed_width_table");
        assert_eq!(Method::Model.as_str(), "model");
        assert_eq!(AnswerError::NotJson { at: 0 }.label(), "unparseable_answer");
        assert_eq!(AnswerError::MissingValue.label(), "missing_value");
    }
    // ---- pipeline files ----

    const PIPELINE_TOML: &str = include_str!("../../../../pipelines/lab-report/pipeline.toml");
    const PROMPT: &str = include_str!("../../../../pipelines/lab-report/prompt.j2");
    const SCHEMA: &str = include_str!("../../../../pipelines/lab-report/schema.json");
    const EXAMPLES: [(&str, &str); 12] = [
        ("amended-result.txt", include_str!("../../../../examples/lab-reports/amended-result.txt")),
        ("cbc-fixed-width.txt", include_str!("../../../../examples/lab-reports/cbc-fixed-width.txt")),
        ("chemistry-colon-lines.txt", include_str!("../../../../examples/lab-reports/chemistry-colon-lines.txt")),
        ("critical-value-call.txt", include_str!("../../../../examples/lab-reports/critical-value-call.txt")),
        ("european-decimal-comma.txt", include_str!("../../../../examples/lab-reports/european-decimal-comma.txt")),
        ("hl7-oru.txt", include_str!("../../../../examples/lab-reports/hl7-oru.txt")),
        ("liver-pipe-table.txt", include_str!("../../../../examples/lab-reports/liver-pipe-table.txt")),
        ("multi-panel.txt", include_str!("../../../../examples/lab-reports/multi-panel.txt")),
        ("prose-narrative.txt", include_str!("../../../../examples/lab-reports/prose-narrative.txt")),
        ("urinalysis-qualitative.txt", include_str!("../../../../examples/lab-reports/urinalysis-qualitative.txt")),
        ("records.jsonl", include_str!("../../../../examples/lab-reports/records.jsonl")),
        ("records.csv", include_str!("../../../../examples/lab-reports/records.csv")),
    ];

    #[test]
    fn pipeline_spec_loads() {
        use medbatch_schemas::pipeline::{ExtractionUnit, ParserKind, PromptFormat, RowMode, Task};
        let spec = medbatch_schemas::PipelineSpec::from_toml(PIPELINE_TOML).unwrap();
        assert_eq!(spec.name, "lab-report");
        assert_eq!(spec.task, Task::Extract);
        assert_eq!(spec.output.table, medbatch_schemas::tables::LAB_RESULTS_TABLE);
        assert_eq!(spec.output.rows, RowMode::PerItem);
        assert_eq!(spec.prompt.format, PromptFormat::Raw);
        assert_eq!(spec.generation.stop, vec!["\n".to_string()]);
        assert_eq!(
            spec.extraction.parsers,
            vec![ParserKind::Hl7Obx, ParserKind::DelimitedTable, ParserKind::FixedWidthTable]
        );
        assert_eq!(spec.extraction.lexicon.as_deref(), Some("analytes.tsv"));
        assert_eq!(spec.extraction.unit, ExtractionUnit::Line);
    }

    #[test]
    fn schema_lists_the_answer_fields() {
        let schema: Value = serde_json::from_str(SCHEMA).unwrap();
        let required: Vec<&str> = schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(required, ANSWER_FIELDS);
        for f in ANSWER_FIELDS {
            assert!(schema["properties"][f].is_object(), "{f}");
        }
    }

    fn render(line: &str) -> String {
        let mut env = minijinja::Environment::new();
        env.add_template("prompt.j2", PROMPT).unwrap();
        env.get_template("prompt.j2").unwrap().render(minijinja::context! { line => line }).unwrap()
    }

    #[test]
    fn prompt_prefix_is_shared_and_ends_before_the_answer() {
        let a = render("Sodium 139 mmol/L");
        let b = render("Kalium 3,4 mmol/l {{ x }}");
        let prefix = &PROMPT[..PROMPT.find("{{ line }}").unwrap()];
        assert!(a.starts_with(prefix) && b.starts_with(prefix));
        // The answer grammar writes the whole object, after one space (` {"` is one token).
        assert!(a.ends_with("Line: Sodium 139 mmol/L\nJSON:"));
        assert!(b.ends_with("Line: Kalium 3,4 mmol/l {{ x }}\nJSON:"));
    }

    /// The few-shot examples, as (line, answer) pairs.
    fn shots() -> Vec<(String, String)> {
        let prefix = &PROMPT[..PROMPT.find("Line: {{ line }}").unwrap()];
        let mut out = Vec::new();
        let mut lines = prefix.lines();
        while let Some(l) = lines.next() {
            if let Some(line) = l.strip_prefix("Line: ") {
                let answer = lines.next().and_then(|a| a.strip_prefix("JSON: ")).unwrap();
                out.push((line.to_string(), answer.to_string()));
            }
        }
        out
    }

    #[test]
    fn prompt_examples_follow_the_rules() {
        let shots = shots();
        assert!(shots.len() >= 6, "{} shots", shots.len());
        for (line, answer) in &shots {
            assert!(answer.starts_with(ANSWER_PRIMER), "{answer}");
            let object: Map<String, Value> = serde_json::from_str(answer).unwrap();
            // In the schema's order: the answer grammar writes properties in that order.
            let keys: Vec<&str> = object.keys().map(String::as_str).collect();
            assert_eq!(keys, ANSWER_FIELDS.to_vec(), "{answer}");
            let c = Candidate { start: 0, end: line.chars().count(), text: line.clone() };
            let item = parse_answer(answer, &c).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(item.alignment, Alignment::Exact, "{line}");
            // Every field is a copy field: the examples copy from their line too.
            for v in object.values().filter_map(Value::as_str) {
                assert!(line.contains(v), "{v:?} is not in {line:?}");
            }
            assert!(looks_like_result(line), "{line}");
        }
    }

    #[test]
    fn prompt_examples_do_not_occur_in_the_example_reports() {
        // Copying a shot is then visible as a test name no report contains.
        for (_, answer) in shots() {
            let object: Map<String, Value> = serde_json::from_str(&answer).unwrap();
            let test = object["test"].as_str().unwrap().to_lowercase();
            for (name, report) in EXAMPLES {
                assert!(!report.to_lowercase().contains(&test), "shot test {test:?} occurs in {name}");
            }
        }
    }

    /// The example documents: each `.txt` file, and each record of the `.jsonl` and `.csv`
    /// files (named `file#id`).
    fn example_documents() -> Vec<(String, String)> {
        let mut docs = Vec::new();
        for (name, content) in EXAMPLES {
            if name.ends_with(".jsonl") {
                for line in content.lines() {
                    let record: Value = serde_json::from_str(line).unwrap();
                    docs.push((
                        format!("{name}#{}", record["id"].as_str().unwrap()),
                        record["text"].as_str().unwrap().into(),
                    ));
                }
            } else if name.ends_with(".csv") {
                for record in csv::Reader::from_reader(content.as_bytes()).records() {
                    let record = record.unwrap();
                    docs.push((format!("{name}#{}", &record[0]), record[1].to_string()));
                }
            } else {
                docs.push((name.to_string(), content.to_string()));
            }
        }
        docs
    }

    #[test]
    fn example_reports_route_as_intended() {
        let docs = example_documents();
        assert_eq!(docs.len(), 14);
        let mut model_lines = 0;
        for (name, report) in &docs {
            let mut claimed = Vec::new();
            let mut parsed = 0;
            for parser in [parse_hl7_obx, parse_delimited_table, parse_fixed_width_table] {
                if let Some(p) = parser(report) {
                    parsed += p.items.len();
                    claimed.extend(p.claimed);
                }
            }
            let candidates = segment(report, &claimed);
            for c in &candidates {
                assert_eq!(span_text(report, c.start, c.end).replace(['\r', '\n'], " "), c.text, "{name}");
                assert!(!overlaps_any(&claimed, c.start, c.end), "{name}");
            }
            match name.as_str() {
                "hl7-oru.txt" => assert_eq!((parsed, candidates.len()), (8, 0)),
                "liver-pipe-table.txt" => assert_eq!((parsed, candidates.len()), (7, 0)),
                "cbc-fixed-width.txt" => assert_eq!((parsed, candidates.len()), (11, 0)),
                "records.csv#csv-semicolon-003" => assert_eq!((parsed, candidates.len()), (4, 0)),
                _ => assert!(parsed == 0 && !candidates.is_empty(), "{name}"),
            }
            model_lines += candidates.len();
        }
        assert!(model_lines > 60, "{model_lines}");
    }
}
