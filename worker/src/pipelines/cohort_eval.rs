//! Scoring a run's `note_facts` against a cohort-facts gold set
//! (`pipelines/cohort-facts/eval/`), as docs/cohort-facts.md says: scalar fields by exact
//! match (LVEF and HbA1c numerically); medications matched one-to-one on the normalised
//! name, then the dose compared (whitespace and case normalised); diagnoses matched
//! one-to-one on the normalised name, a synonym of it (`synonyms.tsv` of the gold folder's
//! parent) or the same ICD-10 code, and counted right only when `negated` and `subject` agree
//! too; the accuracy of `negated` and `subject` over name-matched diagnoses; the share of
//! the run's evidence quotes found exactly in their note.
//!
//! Gold: `gold/NAME.json` (the answer in the conventions' shape) for the note `notes/NAME.txt`,
//! whose row's `document_id` is `NAME.txt`.

use super::lab_report::eval::{parquet_files, partition_ok, read_batches, EvalError};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The scalar fields, in report order.
pub const SCALARS: [&str; 5] = ["smoking_status", "diabetes", "diabetes_type", "lvef_percent", "hba1c_percent"];

/// Gold answers by document id (`NAME.txt`).
pub type Gold = BTreeMap<String, Value>;

/// Reads `dir/gold/*.json`, each the answer for `dir/notes/NAME.txt` (which must exist).
pub fn load_gold(dir: &Path) -> Result<Gold, EvalError> {
    let err = |p: &Path, reason: String| EvalError::Gold { path: p.display().to_string(), reason };
    let gold_dir = dir.join("gold");
    let entries = std::fs::read_dir(&gold_dir).map_err(|e| err(&gold_dir, e.to_string()))?;
    let mut out = Gold::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let stem = p.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let note = dir.join("notes").join(format!("{stem}.txt"));
        if !note.is_file() {
            return Err(err(&p, format!("no note {}", note.display())));
        }
        let text = std::fs::read_to_string(&p).map_err(|e| err(&p, e.to_string()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| err(&p, e.to_string()))?;
        if !v.is_object() {
            return Err(err(&p, "not a JSON object".into()));
        }
        out.insert(format!("{stem}.txt"), v);
    }
    if out.is_empty() {
        return Err(err(&gold_dir, "no gold files".into()));
    }
    Ok(out)
}

/// Groups of names that mean one condition, a tab-separated group a line (`#` comments).
pub fn load_synonyms(path: &Path) -> Result<HashMap<String, usize>, EvalError> {
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(out) };
    for (k, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
        for name in line.split('\t') {
            out.insert(normalise(name), k);
        }
    }
    Ok(out)
}

/// A name or dose compared: lower case, inner whitespace collapsed, outer punctuation off.
pub fn normalise(s: &str) -> String {
    let s = s.trim().trim_matches(|c: char| matches!(c, '.' | ',' | ';' | ':')).to_lowercase();
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Predicted answers (rows of `note_facts` read back into the conventions' shape, evidence
/// columns set aside) by document id, and the alignments of their quotes.
pub struct Predictions {
    pub answers: BTreeMap<String, Value>,
    /// Quotes by alignment (`exact`, `normalized`, `fuzzy`, `none`).
    pub alignments: BTreeMap<String, u64>,
}

/// Reads `out/TABLE` (one run, or every run under `out`).
pub fn load_predictions(out: &Path, table: &str, run_id: Option<&str>) -> Result<Predictions, EvalError> {
    let err = |p: &Path, reason: String| EvalError::Pred { path: p.display().to_string(), reason };
    let dir = out.join(table);
    let files: Vec<_> = parquet_files(&dir).into_iter().filter(|p| partition_ok(p, run_id)).collect();
    if files.is_empty() {
        return Err(err(&dir, "no Parquet parts (wrong --pred or --run-id?)".into()));
    }
    let mut p = Predictions { answers: BTreeMap::new(), alignments: BTreeMap::new() };
    for f in files {
        for b in read_batches(&f)? {
            // The answer's columns and their alignments only (the provenance's timestamps
            // have no JSON form here).
            let keep: Vec<usize> = b
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, fd)| {
                    let n = fd.name().as_str();
                    n == "document_id"
                        || n == "current_medications"
                        || n == "diagnoses"
                        || SCALARS.iter().any(|k| n == *k || n == format!("{k}_alignment"))
                })
                .map(|(i, _)| i)
                .collect();
            let b = b.project(&keep).map_err(|e| err(&f, e.to_string()))?;
            let mut w = arrow_json::ArrayWriter::new(Vec::new());
            w.write(&b).map_err(|e| err(&f, e.to_string()))?;
            w.finish().map_err(|e| err(&f, e.to_string()))?;
            let rows: Vec<serde_json::Map<String, Value>> =
                serde_json::from_slice(&w.into_inner()).map_err(|e| err(&f, e.to_string()))?;
            for mut row in rows {
                let id = row.get("document_id").and_then(Value::as_str).unwrap_or_default().to_string();
                let mut answer = serde_json::Map::new();
                for k in SCALARS {
                    if let Some(Value::String(a)) = row.get(&format!("{k}_alignment")) {
                        *p.alignments.entry(a.clone()).or_default() += 1;
                    }
                    answer.insert(k.into(), row.remove(k).unwrap_or(Value::Null));
                }
                for k in ["current_medications", "diagnoses"] {
                    let mut items = match row.remove(k) {
                        Some(Value::Array(a)) => a,
                        _ => Vec::new(),
                    };
                    for item in items.iter_mut().filter_map(Value::as_object_mut) {
                        if let Some(Value::String(a)) = item.remove("alignment") {
                            *p.alignments.entry(a).or_default() += 1;
                        }
                        item.remove("evidence_start");
                        item.remove("evidence_end");
                    }
                    answer.insert(k.into(), Value::Array(items));
                }
                p.answers.insert(id, Value::Object(answer));
            }
        }
    }
    Ok(p)
}

/// Matched, predicted and gold counts, and what follows from them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    pub matched: u64,
    pub predicted: u64,
    pub gold: u64,
}

impl Counts {
    pub fn precision(&self) -> f64 {
        ratio(self.matched, self.predicted)
    }
    pub fn recall(&self) -> f64 {
        ratio(self.matched, self.gold)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// The scores of a run against a gold split.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub notes: u64,
    /// Notes of the gold set without a row (error rows, or not run).
    pub missing: u64,
    /// Notes right, per scalar field (of `notes`).
    pub scalars: BTreeMap<String, u64>,
    pub medications: Counts,
    /// Doses right among matched medications.
    pub doses_right: u64,
    /// Diagnoses matched on name with `negated` and `subject` agreeing.
    pub diagnoses: Counts,
    /// Diagnoses matched on name alone, and among them those whose `negated`, and whose
    /// `subject`, agree.
    pub diagnoses_by_name: u64,
    pub negated_right: u64,
    pub subject_right: u64,
    pub evidence: BTreeMap<String, u64>,
}

impl Report {
    /// Share of quotes found exactly in their note.
    pub fn evidence_exact(&self) -> f64 {
        let total: u64 = self.evidence.values().sum();
        ratio(self.evidence.get("exact").copied().unwrap_or(0), total)
    }
}

fn scalar_equal(k: &str, a: &Value, b: &Value) -> bool {
    match (k, a, b) {
        ("lvef_percent" | "hba1c_percent", Value::Number(x), Value::Number(y)) => {
            (x.as_f64().unwrap_or(f64::NAN) - y.as_f64().unwrap_or(f64::NAN)).abs() < 1e-6
        }
        _ => a == b,
    }
}

fn items<'a>(v: &'a Value, k: &str) -> Vec<&'a Value> {
    v.get(k).and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default()
}

fn text_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Pairs gold and predicted items one-to-one, greedily in gold order, by `same`.
fn pair<'a>(gold: &[&'a Value], pred: &[&'a Value], same: impl Fn(&Value, &Value) -> bool) -> Vec<(usize, usize)> {
    let mut taken = vec![false; pred.len()];
    let mut out = Vec::new();
    for (i, g) in gold.iter().enumerate() {
        if let Some(j) = (0..pred.len()).find(|&j| !taken[j] && same(g, pred[j])) {
            taken[j] = true;
            out.push((i, j));
        }
    }
    out
}

/// Scores `pred` against `gold`.
pub fn score(gold: &Gold, pred: &Predictions, synonyms: &HashMap<String, usize>) -> Report {
    let mut r = Report { evidence: pred.alignments.clone(), ..Report::default() };
    let empty = Value::Object(Default::default());
    for (id, g) in gold {
        r.notes += 1;
        let p = pred.answers.get(id).unwrap_or_else(|| {
            r.missing += 1;
            &empty
        });
        for k in SCALARS {
            let (a, b) = (g.get(k).unwrap_or(&Value::Null), p.get(k).unwrap_or(&Value::Null));
            if pred.answers.contains_key(id) && scalar_equal(k, a, b) {
                *r.scalars.entry(k.into()).or_default() += 1;
            }
        }
        let (gm, pm) = (items(g, "current_medications"), items(p, "current_medications"));
        let meds = pair(&gm, &pm, |a, b| normalise(text_of(a, "name")) == normalise(text_of(b, "name")));
        r.medications.matched += meds.len() as u64;
        r.medications.gold += gm.len() as u64;
        r.medications.predicted += pm.len() as u64;
        r.doses_right += meds
            .iter()
            .filter(|&&(i, j)| {
                let dose = |v: &Value| v.get("dose").and_then(Value::as_str).map(normalise);
                dose(gm[i]) == dose(pm[j])
            })
            .count() as u64;
        let (gd, pd) = (items(g, "diagnoses"), items(p, "diagnoses"));
        let same_name = |a: &Value, b: &Value| {
            let (x, y) = (normalise(text_of(a, "name")), normalise(text_of(b, "name")));
            let code = |v: &Value| v.get("icd10").and_then(Value::as_str).map(str::to_uppercase);
            x == y || synonyms.get(&x).is_some_and(|s| synonyms.get(&y) == Some(s)) || {
                let (c, d) = (code(a), code(b));
                c.is_some() && c == d
            }
        };
        let agree = |a: &Value, b: &Value, k: &str| a.get(k) == b.get(k);
        let by_name = pair(&gd, &pd, same_name);
        r.diagnoses_by_name += by_name.len() as u64;
        r.negated_right += by_name.iter().filter(|&&(i, j)| agree(gd[i], pd[j], "negated")).count() as u64;
        r.subject_right += by_name.iter().filter(|&&(i, j)| agree(gd[i], pd[j], "subject")).count() as u64;
        let full = pair(&gd, &pd, |a, b| same_name(a, b) && agree(a, b, "negated") && agree(a, b, "subject"));
        r.diagnoses.matched += full.len() as u64;
        r.diagnoses.gold += gd.len() as u64;
        r.diagnoses.predicted += pd.len() as u64;
    }
    r
}

/// `a/b` to three places, or `–` where there is nothing to divide by.
fn shown(a: u64, b: u64) -> String {
    if b == 0 {
        "–".into()
    } else {
        format!("{:.3}", a as f64 / b as f64)
    }
}

/// The report as a table.
pub fn render_table(r: &Report) -> String {
    let mut s = format!("notes {} (without a row: {})\n", r.notes, r.missing);
    for k in SCALARS {
        let right = r.scalars.get(k).copied().unwrap_or(0);
        s.push_str(&format!("  {k:<22} {right:>3}/{:<3} {}\n", r.notes, shown(right, r.notes)));
    }
    let counts = |label: &str, c: &Counts, what: &str| {
        format!(
            "{label:<12} precision {} recall {} ({} matched of {} predicted, {} gold{what})",
            shown(c.matched, c.predicted),
            shown(c.matched, c.gold),
            c.matched,
            c.predicted,
            c.gold
        )
    };
    let m = &r.medications;
    s.push_str(&counts("medications", m, ""));
    s.push_str(&format!("; doses right {}/{}\n", r.doses_right, m.matched));
    s.push_str(&counts("diagnoses", &r.diagnoses, "; negated and subject agreeing"));
    s.push('\n');
    s.push_str(&format!(
        "  matched by name {}: negated right {}, subject right {}\n",
        r.diagnoses_by_name,
        shown(r.negated_right, r.diagnoses_by_name),
        shown(r.subject_right, r.diagnoses_by_name)
    ));
    let total: u64 = r.evidence.values().sum();
    let exact = r.evidence.get("exact").copied().unwrap_or(0);
    s.push_str(&format!("evidence     {total} quotes, exact {} ({:?})\n", shown(exact, total), r.evidence));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(meds: Value, dx: Value) -> Value {
        json!({ "smoking_status": "former", "diabetes": true, "diabetes_type": "type2", "lvef_percent": 35,
                "hba1c_percent": 8.1, "current_medications": meds, "diagnoses": dx })
    }

    #[test]
    fn scores_follow_the_conventions() {
        let gold: Gold = [(
            "a.txt".to_string(),
            answer(
                json!([{ "name": "Metoprolol succinate", "dose": "25 MG" }, { "name": "insulin glargine", "dose": "30 units" }]),
                json!([
                    { "name": "coronary artery disease", "icd10": "I25.10", "negated": true, "subject": "patient" },
                    { "name": "breast cancer", "icd10": "C50.919", "negated": false, "subject": "family" },
                    { "name": "heart failure", "icd10": "I50.22", "negated": false, "subject": "patient" }
                ]),
            ),
        )]
        .into();
        let mut p = answer(
            json!([{ "name": "metoprolol  succinate", "dose": "25 mg" }, { "name": "insulin glargine", "dose": "20 units" },
                   { "name": "aspirin", "dose": "81 mg" }]),
            json!([
                { "name": "CAD", "icd10": null, "negated": true, "subject": "patient" },
                { "name": "breast cancer", "icd10": null, "negated": false, "subject": "patient" },
                { "name": "chronic systolic heart failure", "icd10": "I50.22", "negated": false, "subject": "patient" }
            ]),
        );
        p["lvef_percent"] = json!(35.0);
        p["hba1c_percent"] = json!(8.0);
        let pred = Predictions {
            answers: [("a.txt".to_string(), p)].into(),
            alignments: [("exact".to_string(), 3), ("none".to_string(), 1)].into(),
        };
        let synonyms: HashMap<String, usize> =
            [("cad".to_string(), 0), ("coronary artery disease".to_string(), 0)].into();
        let r = score(&gold, &pred, &synonyms);
        assert_eq!(r.scalars.get("lvef_percent"), Some(&1), "35 and 35.0 are one value");
        assert_eq!(r.scalars.get("hba1c_percent"), None);
        assert_eq!(r.medications, Counts { matched: 2, predicted: 3, gold: 2 });
        assert_eq!(r.doses_right, 1, "25 MG is 25 mg; 20 units is not 30");
        // CAD by synonym, heart failure by code; breast cancer given to the patient is wrong.
        assert_eq!(r.diagnoses_by_name, 3);
        assert_eq!(r.diagnoses, Counts { matched: 2, predicted: 3, gold: 3 });
        assert_eq!((r.negated_right, r.subject_right), (3, 2));
        assert_eq!(r.evidence_exact(), 0.75);
        // A note without a row scores nothing right.
        let none = Predictions { answers: BTreeMap::new(), alignments: BTreeMap::new() };
        let r = score(&gold, &none, &synonyms);
        assert_eq!((r.missing, r.scalars.len(), r.medications.recall()), (1, 0, 0.0));
    }
}
