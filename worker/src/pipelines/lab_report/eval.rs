//! Scoring a run's `lab_results` against a gold set (`pipelines/lab-report/eval/`).
//!
//! Gold: `gold/NAME.json` = `{"document_id", "results": [{test, value, unit, ref_low,
//! ref_high, flag, evidence}], "non_results": [{kind, evidence}]}` with the report in
//! `reports/NAME.txt`. Rows and gold items are matched per document, one-to-one and greedily
//! in document order, when the row's evidence span overlaps the gold evidence (its first
//! occurrence in the report) and their normalized values are equal. A row left unmatched is
//! put down to the kind of the annotated non-result its evidence overlaps (a pending entry,
//! a vital sign …), else to `result_line` (it overlaps a gold result: a wrong value or a
//! second row) or `unannotated`. The rules are documented in
//! `pipelines/lab-report/eval/README.md`.

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, UInt32Type};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Scored fields, in report order.
pub const FIELDS: [&str; 6] = ["test", "value", "unit", "ref_low", "ref_high", "flag"];

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {reason}")]
    Gold { path: String, reason: String },
    #[error("predictions {path}: {reason}")]
    Pred { path: String, reason: String },
}

/// One result, gold or predicted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub test: Option<String>,
    pub value: Option<String>,
    pub unit: Option<String>,
    pub ref_low: Option<f64>,
    pub ref_high: Option<f64>,
    pub flag: Option<String>,
    /// Gold only: the evidence text.
    #[serde(default)]
    pub evidence: Option<String>,
    /// Character span of the evidence in the document.
    #[serde(skip)]
    pub span: (usize, usize),
    /// Predictions only: how the value was found in its evidence (`exact`, `normalized`,
    /// `fuzzy`, `none`), when the table says.
    #[serde(skip)]
    pub alignment: Option<String>,
    /// Predictions only: the row came from the model (not a deterministic parser).
    #[serde(skip)]
    pub from_model: bool,
}

/// What the error table says about a run's answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// Error rows of the model and parse stages.
    pub rows: usize,
    /// Model answers that did not become a row: unparseable, cut off (`truncated`), or
    /// stopped by the grammar.
    pub invalid_answers: usize,
}

#[derive(Deserialize)]
struct GoldFile {
    document_id: String,
    results: Vec<Item>,
    #[serde(default)]
    non_results: Vec<GoldNonResult>,
}

#[derive(Deserialize)]
struct GoldNonResult {
    kind: String,
    evidence: String,
}

/// An annotated line that is not a result: its kind and the character span of its evidence.
#[derive(Clone, Debug, PartialEq)]
pub struct NonResultSpan {
    pub kind: String,
    pub span: (usize, usize),
}

/// The gold of one report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GoldDoc {
    pub results: Vec<Item>,
    pub non_results: Vec<NonResultSpan>,
}

/// Gold per document id.
pub type Gold = BTreeMap<String, GoldDoc>;

/// Character span of the first occurrence of `evidence` in `text`.
fn find_span(text: &str, evidence: &str) -> Option<(usize, usize)> {
    let at = text.find(evidence).filter(|_| !evidence.is_empty())?;
    let start = text[..at].chars().count();
    Some((start, start + evidence.chars().count()))
}

/// The gold of every report of a split (`gold/*.json` and `reports/`).
pub fn load_gold(dir: &Path) -> Result<Gold, EvalError> {
    let gold_dir = dir.join("gold");
    let err = |p: &Path, reason: String| EvalError::Gold { path: p.display().to_string(), reason };
    let mut entries: Vec<_> = std::fs::read_dir(&gold_dir)
        .map_err(|e| err(&gold_dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    entries.sort();
    let mut out = BTreeMap::new();
    for p in entries {
        let g: GoldFile = serde_json::from_slice(&std::fs::read(&p).map_err(|e| err(&p, e.to_string()))?)
            .map_err(|e| err(&p, e.to_string()))?;
        let report = dir.join("reports").join(&g.document_id);
        let text = std::fs::read_to_string(&report).map_err(|e| err(&report, e.to_string()))?;
        let mut results = g.results;
        for it in &mut results {
            let ev = it.evidence.as_deref().unwrap_or_default();
            it.span = find_span(&text, ev).ok_or_else(|| err(&p, "an evidence string is not in the report".into()))?;
        }
        let non_results = g
            .non_results
            .into_iter()
            .map(|n| match find_span(&text, &n.evidence) {
                Some(span) => Ok(NonResultSpan { kind: n.kind, span }),
                None => Err(err(&p, "a non-result evidence string is not in the report".into())),
            })
            .collect::<Result<_, _>>()?;
        out.insert(g.document_id, GoldDoc { results, non_results });
    }
    if out.is_empty() {
        return Err(err(&gold_dir, "no gold files".into()));
    }
    Ok(out)
}

fn norm_value(s: &str) -> String {
    s.trim().to_lowercase().replace(',', ".").chars().filter(|c| !c.is_whitespace()).collect()
}

fn norm_test(s: &str) -> String {
    s.to_lowercase().chars().filter(|c| !c.is_whitespace() && !matches!(c, '.' | ',')).collect()
}

fn field_eq(field: &str, a: &Item, b: &Item) -> bool {
    let num = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-9,
        (None, None) => true,
        _ => false,
    };
    let text = |x: &Option<String>, y: &Option<String>, f: fn(&str) -> String| match (x, y) {
        (Some(x), Some(y)) => f(x) == f(y),
        (None, None) => true,
        _ => false,
    };
    match field {
        "test" => text(&a.test, &b.test, norm_test),
        "value" => text(&a.value, &b.value, norm_value),
        "unit" => text(&a.unit, &b.unit, norm_value),
        "ref_low" => num(a.ref_low, b.ref_low),
        "ref_high" => num(a.ref_high, b.ref_high),
        _ => text(&a.flag, &b.flag, norm_value),
    }
}

fn has(field: &str, a: &Item) -> bool {
    match field {
        "test" => a.test.is_some(),
        "value" => a.value.is_some(),
        "unit" => a.unit.is_some(),
        "ref_low" => a.ref_low.is_some(),
        "ref_high" => a.ref_high.is_some(),
        _ => a.flag.is_some(),
    }
}

/// Per-field scores.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FieldScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Item scores of one report (each report of a gold set is its own layout).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DocumentScore {
    pub document_id: String,
    pub gold_items: usize,
    pub predicted_rows: usize,
    pub matched: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Unmatched rows by what their evidence is (see [`Report::false_positives`]).
    pub false_positives: BTreeMap<String, usize>,
}

/// The whole evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub documents: usize,
    pub gold_items: usize,
    pub predicted_rows: usize,
    pub matched: usize,
    pub item_precision: f64,
    pub item_recall: f64,
    pub item_f1: f64,
    pub exact_match_rate: f64,
    pub fields: BTreeMap<String, FieldScore>,
    pub error_rows: usize,
    pub error_row_rate: f64,
    /// Model answers that parsed into a row, over all model answers.
    pub schema_valid_rate: f64,
    /// Rows whose value was found in their evidence (alignment other than `none`), over
    /// rows that say.
    pub grounding_rate: f64,
    /// Rows flagged `alignment = none`.
    pub ungrounded_rows: usize,
    /// Rows that matched no gold result, by what their evidence overlaps: the kind of an
    /// annotated non-result (`pending`, `vital_sign`, `metadata` …), `result_line` (a gold
    /// result's line: a wrong value or a second row from it) or `unannotated`.
    pub false_positives: BTreeMap<String, usize>,
    /// Per report, in name order.
    pub per_document: Vec<DocumentScore>,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

/// Scores predicted rows (per document id, in any order) against the gold set. Rows of
/// documents outside the gold set are ignored.
pub fn score(gold: &Gold, pred: &BTreeMap<String, Vec<Item>>, errors: ErrorCounts) -> Report {
    let error_rows = errors.rows;
    let mut r = Report { documents: gold.len(), error_rows, ..Default::default() };
    let (mut aligned, mut model_rows) = (0, 0);
    let mut correct: BTreeMap<&str, (usize, usize, usize)> = FIELDS.iter().map(|f| (*f, (0, 0, 0))).collect(); // (correct, predicted non-null, gold non-null)
    let mut exact = 0;
    for (doc, gold_doc) in gold {
        let gold_items = &gold_doc.results;
        let matched_before = r.matched;
        r.gold_items += gold_items.len();
        let mut rows: Vec<&Item> = pred.get(doc).map(|v| v.iter().collect()).unwrap_or_default();
        rows.sort_by_key(|i| i.span);
        r.predicted_rows += rows.len();
        let mut used = vec![false; rows.len()];
        let mut gold_items: Vec<&Item> = gold_items.iter().collect();
        gold_items.sort_by_key(|g| g.span);
        for g in &gold_items {
            for f in FIELDS {
                if has(f, g) {
                    correct.get_mut(f).expect("field").2 += 1;
                }
            }
            let found = rows
                .iter()
                .enumerate()
                .position(|(i, p)| !used[i] && p.span.0 < g.span.1 && g.span.0 < p.span.1 && field_eq("value", p, g));
            if let Some(i) = found {
                used[i] = true;
                r.matched += 1;
                let mut all = true;
                for f in FIELDS {
                    let ok = field_eq(f, rows[i], g);
                    all &= ok;
                    if ok && has(f, rows[i]) {
                        correct.get_mut(f).expect("field").0 += 1;
                    }
                }
                exact += usize::from(all);
            }
        }
        let overlaps = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
        let mut false_positives: BTreeMap<String, usize> = BTreeMap::new();
        for (p, _) in rows.iter().zip(&used).filter(|(_, u)| !**u) {
            let kind = match gold_doc.non_results.iter().find(|n| overlaps(n.span, p.span)) {
                Some(n) => n.kind.as_str(),
                None if gold_doc.results.iter().any(|g| overlaps(g.span, p.span)) => "result_line",
                None => "unannotated",
            };
            *false_positives.entry(kind.to_string()).or_default() += 1;
        }
        for (k, n) in &false_positives {
            *r.false_positives.entry(k.clone()).or_default() += n;
        }
        let matched = r.matched - matched_before;
        let (precision, recall) = (ratio(matched, rows.len()), ratio(matched, gold_items.len()));
        r.per_document.push(DocumentScore {
            document_id: doc.clone(),
            gold_items: gold_items.len(),
            predicted_rows: rows.len(),
            matched,
            precision,
            recall,
            f1: f1(precision, recall),
            false_positives,
        });
        for p in &rows {
            model_rows += usize::from(p.from_model);
            if let Some(a) = &p.alignment {
                aligned += 1;
                r.ungrounded_rows += usize::from(a == "none");
            }
            for f in FIELDS {
                if has(f, p) {
                    correct.get_mut(f).expect("field").1 += 1;
                }
            }
        }
    }
    r.item_precision = ratio(r.matched, r.predicted_rows);
    r.item_recall = ratio(r.matched, r.gold_items);
    r.item_f1 = f1(r.item_precision, r.item_recall);
    r.exact_match_rate = ratio(exact, r.gold_items);
    r.error_row_rate = ratio(error_rows, error_rows + r.predicted_rows);
    r.schema_valid_rate = ratio(model_rows, model_rows + errors.invalid_answers);
    r.grounding_rate = ratio(aligned - r.ungrounded_rows, aligned);
    for (f, (c, p, g)) in correct {
        let (precision, recall) = (ratio(c, p), ratio(c, g));
        r.fields.insert(f.to_string(), FieldScore { precision, recall, f1: f1(precision, recall) });
    }
    r
}

pub(crate) fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every record batch of one Parquet file.
pub(crate) fn read_batches(f: &Path) -> Result<Vec<arrow::record_batch::RecordBatch>, EvalError> {
    let err = |reason: String| EvalError::Pred { path: f.display().to_string(), reason };
    let file = std::fs::File::open(f).map_err(|e| err(e.to_string()))?;
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| err(e.to_string()))?
        .map(|b| b.map_err(|e| err(e.to_string())))
        .collect()
}

pub(crate) fn partition_ok(p: &Path, run_id: Option<&str>) -> bool {
    run_id.is_none_or(|r| p.components().any(|c| c.as_os_str().to_string_lossy() == format!("run_id={r}")))
}

/// Reads predicted rows (`OUT/lab_results`) and counts model/parse error rows
/// (`OUT/_errors`), of one run or of all runs under `out`.
pub fn load_predictions(
    out: &Path,
    table: &str,
    run_id: Option<&str>,
) -> Result<(BTreeMap<String, Vec<Item>>, ErrorCounts), EvalError> {
    let err = |p: &Path, reason: String| EvalError::Pred { path: p.display().to_string(), reason };
    let mut pred: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    let tdir = out.join(table);
    let files: Vec<_> = parquet_files(&tdir).into_iter().filter(|p| partition_ok(p, run_id)).collect();
    if files.is_empty() {
        return Err(err(&tdir, "no Parquet parts (wrong --pred or --run-id?)".into()));
    }
    for f in files {
        for b in read_batches(&f)? {
            let col = |n: &str| b.column_by_name(n).cloned().ok_or_else(|| err(&f, format!("no column {n}")));
            let s = |n: &str| -> Result<arrow::array::ArrayRef, EvalError> {
                arrow::compute::cast(&col(n)?, &DataType::Utf8).map_err(|e| err(&f, e.to_string()))
            };
            let (doc, test, value, unit, flag) = (s("document_id")?, s("test")?, s("value")?, s("unit")?, s("flag")?);
            let (lo, hi) = (col("ref_low")?, col("ref_high")?);
            let (es, ee) = (col("evidence_start")?, col("evidence_end")?);
            // Tables written before these columns existed read as unknown.
            let alignment = b.column_by_name("alignment").map(|a| arrow::compute::cast(a, &DataType::Utf8)).transpose();
            let alignment = alignment.map_err(|e| err(&f, e.to_string()))?;
            let method = s("method")?;
            let text = |a: &arrow::array::ArrayRef, i: usize| {
                let a = a.as_string::<i32>();
                (!a.is_null(i)).then(|| a.value(i).to_string())
            };
            let num = |a: &arrow::array::ArrayRef, i: usize| {
                let a = a.as_primitive::<Float64Type>();
                (!a.is_null(i)).then(|| a.value(i))
            };
            for i in 0..b.num_rows() {
                let item = Item {
                    test: text(&test, i),
                    value: text(&value, i),
                    unit: text(&unit, i),
                    ref_low: num(&lo, i),
                    ref_high: num(&hi, i),
                    flag: text(&flag, i),
                    evidence: None,
                    span: (
                        es.as_primitive::<UInt32Type>().value(i) as usize,
                        ee.as_primitive::<UInt32Type>().value(i) as usize,
                    ),
                    alignment: alignment.as_ref().and_then(|a| text(a, i)),
                    from_model: text(&method, i).as_deref() == Some("model"),
                };
                pred.entry(text(&doc, i).unwrap_or_default()).or_default().push(item);
            }
        }
    }
    let mut errors = ErrorCounts::default();
    for f in
        parquet_files(&out.join(medbatch_schemas::tables::ERRORS_TABLE)).into_iter().filter(|p| partition_ok(p, run_id))
    {
        for b in read_batches(&f)? {
            let stage = b.column_by_name("stage").ok_or_else(|| err(&f, "no column stage".into()))?;
            let stage = arrow::compute::cast(stage, &DataType::Utf8).map_err(|e| err(&f, e.to_string()))?;
            let stage = stage.as_string::<i32>();
            let reason = b.column_by_name("reason").ok_or_else(|| err(&f, "no column reason".into()))?;
            let reason = arrow::compute::cast(reason, &DataType::Utf8).map_err(|e| err(&f, e.to_string()))?;
            let reason = reason.as_string::<i32>();
            for i in 0..stage.len() {
                let (st, re) = (stage.value(i), reason.value(i));
                errors.rows += usize::from(matches!(st, "model" | "parse"));
                errors.invalid_answers += usize::from(st == "parse" || matches!(re, "truncated" | "grammar"));
            }
        }
    }
    Ok((pred, errors))
}

/// The report as a table.
pub fn render_table(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "documents {}  gold items {}  predicted rows {}  matched {}\n",
        r.documents, r.gold_items, r.predicted_rows, r.matched
    ));
    s.push_str(&format!(
        "items      precision {:.3}  recall {:.3}  F1 {:.3}  exact-match rate {:.3}\n",
        r.item_precision, r.item_recall, r.item_f1, r.exact_match_rate
    ));
    s.push_str(&format!("error rows {} (rate {:.3})\n", r.error_rows, r.error_row_rate));
    s.push_str(&format!(
        "answers    schema-valid rate {:.3}  grounding rate {:.3}  ungrounded rows {}\n",
        r.schema_valid_rate, r.grounding_rate, r.ungrounded_rows
    ));
    s.push_str("field      precision  recall  F1\n");
    for f in FIELDS {
        let x = &r.fields[f];
        s.push_str(&format!("{f:<10} {:>9.3}  {:>6.3}  {:.3}\n", x.precision, x.recall, x.f1));
    }
    s.push_str(&format!("rows matching no result: {}\n", kinds_line(&r.false_positives)));
    let width = r.per_document.iter().map(|d| d.document_id.len()).max().unwrap_or(0).max(6);
    s.push_str(&format!("{:<width$}  gold  rows  matched  precision  recall     F1  unmatched rows\n", "report"));
    for d in &r.per_document {
        s.push_str(&format!(
            "{:<width$}  {:>4}  {:>4}  {:>7}  {:>9.3}  {:>6.3}  {:.3}  {}\n",
            d.document_id,
            d.gold_items,
            d.predicted_rows,
            d.matched,
            d.precision,
            d.recall,
            d.f1,
            kinds_line(&d.false_positives)
        ));
    }
    s
}

fn kinds_line(kinds: &BTreeMap<String, usize>) -> String {
    if kinds.is_empty() {
        return "none".into();
    }
    kinds.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(test: &str, value: &str, span: (usize, usize), flag: Option<&str>) -> Item {
        Item {
            test: Some(test.into()),
            value: Some(value.into()),
            unit: Some("mmol/L".into()),
            ref_low: Some(3.5),
            ref_high: Some(5.1),
            flag: flag.map(str::to_string),
            evidence: None,
            span,
            alignment: Some("exact".into()),
            from_model: true,
        }
    }

    #[test]
    fn scoring_rules() {
        let mut gold = Gold::new();
        gold.insert(
            "d".to_string(),
            GoldDoc {
                results: vec![item("Potassium", "5,9", (0, 30), Some("high")), item("Sodium", "139", (31, 60), None)],
                non_results: vec![NonResultSpan { kind: "pending".into(), span: (65, 90) }],
            },
        );
        let mut pred = BTreeMap::new();
        // Matches the first gold item (decimal comma vs point), wrong flag; an invented row.
        pred.insert(
            "d".to_string(),
            vec![item("potassium", "5.9", (2, 28), Some("low")), item("Glucose", "5.5", (70, 80), None)],
        );
        pred.get_mut("d").unwrap()[1].alignment = Some("none".into());
        let r = score(&gold, &pred, ErrorCounts { rows: 1, invalid_answers: 1 });
        assert_eq!((r.gold_items, r.predicted_rows, r.matched), (2, 2, 1));
        assert_eq!((r.item_precision, r.item_recall), (0.5, 0.5));
        assert_eq!(r.exact_match_rate, 0.0);
        assert_eq!(r.fields["test"].recall, 0.5);
        assert_eq!(r.fields["flag"].precision, 0.0);
        assert_eq!(r.fields["flag"].recall, 0.0);
        assert!((r.error_row_rate - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.schema_valid_rate - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!((r.grounding_rate, r.ungrounded_rows), (0.5, 1));
        // The invented row lies on a line annotated as pending.
        assert_eq!(r.false_positives, BTreeMap::from([("pending".to_string(), 1)]));
        assert_eq!(r.per_document.len(), 1);
        assert_eq!((r.per_document[0].matched, r.per_document[0].f1), (1, 0.5));
        let table = render_table(&r);
        assert!(table.contains("rows matching no result: pending 1"), "{table}");
        // A second row from a result's line, and one from a line nobody annotated.
        pred.get_mut("d").unwrap()[1].span = (40, 50);
        pred.get_mut("d").unwrap().push(item("Urea", "7", (200, 210), None));
        let r = score(&gold, &pred, ErrorCounts::default());
        let kinds = BTreeMap::from([("result_line".to_string(), 1), ("unannotated".to_string(), 1)]);
        assert_eq!(r.false_positives, kinds);
        // A perfect prediction scores 1 everywhere.
        let perfect: BTreeMap<String, Vec<Item>> = gold.iter().map(|(d, g)| (d.clone(), g.results.clone())).collect();
        let r = score(&gold, &perfect, ErrorCounts::default());
        assert_eq!((r.item_f1, r.exact_match_rate, r.fields["unit"].f1), (1.0, 1.0, 1.0));
        assert!(r.false_positives.is_empty());
    }
}
