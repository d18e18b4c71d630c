//! Section mode of a note-facts table (`extraction.unit = "section"`), for small models: the
//! note is split into sections at its heading lines; the model copies the mentions of each
//! section word for word (a diagnosis, a medication with its dose, a smoking statement, an
//! LVEF or HbA1c value; copy fields, so nothing is invented); rules decide the rest, in the
//! sentence of each mention: negation, relatives and hedging (ConText), whether a
//! medication is current, the smoking status, the diabetes type
//! ([`crate::clinical::NoteReading`]). The mentions of all sections are gathered into the
//! row of the whole-note mode (docs/cohort-facts.md), each field with the offsets of the
//! words it rests on.

use crate::chunk::chunk_by_tokens;
use crate::clinical::{DiabetesType, NoteReading, Smoking, Status};
use crate::model_call::{ask_each, Prompt, Segment};
use crate::parquet_out::{ErrorReason, ErrorRow, ErrorStage, ParquetOutError};
use crate::pipeline::LoadedPipeline;
use crate::pipelines::structured::{first_json_value, records_batch, Record, Structured};
use crate::pipelines::{Outcome, RunCx, Unit};
use serde_json::{json, Map, Value};

/// The row fields section mode fills (the cohort-facts answer, docs/cohort-facts.md).
pub const FILLED: [&str; 7] = [
    "smoking_status",
    "diabetes",
    "diabetes_type",
    "lvef_percent",
    "hba1c_percent",
    "current_medications",
    "diagnoses",
];

/// What a mention is of (the answer's `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Diagnosis,
    Medication,
    Smoking,
    Lvef,
    Hba1c,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "diagnosis" => Self::Diagnosis,
            "medication" => Self::Medication,
            "smoking" => Self::Smoking,
            "lvef" => Self::Lvef,
            "hba1c" => Self::Hba1c,
            _ => return None,
        })
    }
}

/// A mention the model copied: its kind, its characters in the note, its section's kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mention {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
    pub section: String,
}

/// Checks at load that the row has every field section mode fills and the answer schema
/// lists mentions.
pub fn check(pipeline: &LoadedPipeline) -> Result<(), String> {
    let props = pipeline.row_schema.get("properties").and_then(Value::as_object);
    if let Some(missing) = FILLED.iter().find(|f| !props.is_some_and(|p| p.contains_key(**f))) {
        return Err(format!("section mode fills `{missing}`, which the row schema does not have"));
    }
    let item = pipeline.schema.pointer("/properties/mentions/items/properties");
    if !item.is_some_and(|i| i.get("kind").is_some() && i.get("text").is_some()) {
        return Err("section mode's answer schema needs `mentions`, a list of objects with `kind` and `text`".into());
    }
    Ok(())
}

/// Reads a note section by section and gives its one row (no row when a section's answer
/// failed: its error rows say which).
pub async fn run(p: &Structured, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError> {
    let (pipeline, doc) = (p.loaded_pipeline(), &unit.doc);
    let spec = &pipeline.spec;
    let Some(reading) = pipeline.reading.as_deref() else {
        return Err(ParquetOutError::Schema("section mode without its rule files".into()));
    };
    let tokenizer = cx.engine().tokenizer();
    let count = |s: &str| tokenizer.encode(s, false, false).len();
    let chars: Vec<char> = doc.text.chars().collect();
    // Each section, or each piece of a long one, with its kind and place in the note.
    let mut pieces: Vec<(String, usize, usize, String)> = Vec::new();
    for section in reading.sections.sections(&doc.text) {
        let text: String = chars[section.start..section.end].iter().collect();
        if text.trim().is_empty() {
            continue;
        }
        for c in chunk_by_tokens(&text, spec.extraction.chunk_tokens, spec.extraction.chunk_overlap_tokens, &count) {
            pieces.push((section.kind.clone(), section.start + c.start, section.start + c.end, c.text));
        }
    }
    let segments: Vec<Segment> = pieces.iter().map(|(_, s, e, t)| Segment { start: *s, end: *e, text: t }).collect();
    let prepare = |k: usize, s: &Segment<'_>| {
        let rendered = pipeline
            .render_with(s.text, "", &pieces[k].0)
            .map_err(|e| (ErrorReason::PromptRender, format!("template error: {}", e.kind())))?;
        let grammar = match spec.generation.constrained {
            true => Some(
                crate::grammar::answer_grammar(&pipeline.schema, s.text)
                    .map_err(|e| (ErrorReason::Grammar, format!("answer grammar: {e}")))?,
            ),
            false => None,
        };
        Ok(Prompt { rendered, grammar, images: Vec::new() })
    };
    let asked = ask_each(cx, pipeline, doc, &segments, None, prepare).await;
    let mut out = Outcome::from_asked(&asked);
    let mut mentions = Vec::new();
    let (mut tokens_in, mut tokens_out) = (0u32, 0u32);
    for ((kind, start, end, text), reply) in pieces.iter().zip(asked.replies) {
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                out.errors.push(e);
                continue;
            }
        };
        tokens_in = tokens_in.saturating_add(reply.tokens_in);
        tokens_out = tokens_out.saturating_add(reply.tokens_out);
        match section_mentions(&reply.answer, text, *start, kind) {
            Ok(m) => mentions.extend(m),
            Err((reason, detail)) => {
                let reason = if reply.cut_off { ErrorReason::TruncatedAnswer } else { reason };
                out.errors.push(ErrorRow::of_document(doc, ErrorStage::Parse, reason, detail, Some((*start, *end))));
            }
        }
    }
    if !out.errors.is_empty() {
        return Ok(out);
    }
    let record = Record {
        document_id: doc.id.clone(),
        patient_id: doc.patient_id.clone(),
        note_date: doc.date.clone(),
        source_uri: doc.source_uri.clone(),
        input_sha256: doc.input_sha256.to_string(),
        item_index: 0,
        value: gather(&chars, &mentions, reading),
        evidence: None,
        from_examples: false,
        tokens_in,
        tokens_out,
    };
    out.batch = Some(records_batch(pipeline, &p.table_schema(), &[record], &unit.slides, cx.provenance)?);
    Ok(out)
}

/// The mentions of one section's answer, placed in the note: each copied text is found in
/// the section (`text`, starting at character `start` of the note), after the mention before
/// it where it occurs again.
fn section_mentions(
    answer: &str,
    text: &str,
    start: usize,
    section: &str,
) -> Result<Vec<Mention>, (ErrorReason, String)> {
    let value = first_json_value(answer).ok_or((ErrorReason::UnparseableAnswer, "the answer is not JSON".into()))?;
    let items = value
        .get("mentions")
        .and_then(Value::as_array)
        .ok_or((ErrorReason::BadAnswerField, "`mentions` is not a list".into()))?;
    let mut out = Vec::new();
    let mut cursor = 0; // bytes of `text`
    for item in items {
        let kind = item.get("kind").and_then(Value::as_str).and_then(Kind::parse);
        let copied = item.get("text").and_then(Value::as_str).map(str::trim).unwrap_or("");
        let Some(kind) = kind.filter(|_| !copied.is_empty()) else {
            return Err((ErrorReason::BadAnswerField, "a mention without a known kind or text".into()));
        };
        let at = text[cursor..].find(copied).map(|b| b + cursor).or_else(|| text.find(copied));
        let Some(at) = at else {
            // Only possible unconstrained: a copy field's grammar admits substrings alone.
            return Err((ErrorReason::BadAnswerField, "a mention is not a copy of its section".into()));
        };
        cursor = at + copied.len();
        let s = start + text[..at].chars().count();
        out.push(Mention { kind, start: s, end: s + copied.chars().count(), section: section.to_string() });
    }
    Ok(out)
}

/// The characters `a..b` of the note.
fn slice(chars: &[char], a: usize, b: usize) -> String {
    chars[a.min(chars.len())..b.min(chars.len())].iter().collect()
}

/// A mention in its sentence: the mention without its leading triggers, the sentence's
/// characters, the clause around the mention (between the commas nearest it), and what the
/// ConText rules say.
struct Placed {
    start: usize,
    end: usize,
    clause: String,
    negated: bool,
    family: bool,
    hypothetical: bool,
}

fn place(chars: &[char], sentences: &[(usize, usize)], m: &Mention, reading: &NoteReading) -> Placed {
    let (ss, se) =
        sentences.iter().copied().find(|&(a, b)| a <= m.start && m.start < b).unwrap_or((m.start, m.end.max(m.start)));
    let sentence = slice(chars, ss, se);
    let rel = (m.start - ss, m.end.min(se).max(m.start) - ss);
    let (ts, te) = reading.context.trim_triggers(&sentence, rel);
    let a = reading.context.assess(&sentence, (ts, te));
    let sc: Vec<char> = sentence.chars().collect();
    let from = sc[..ts].iter().rposition(|&c| c == ',').map_or(0, |k| k + 1);
    let to = sc[te.min(sc.len())..].iter().position(|&c| c == ',').map_or(sc.len(), |k| k + te);
    Placed {
        start: ss + ts,
        end: ss + te,
        clause: sc[from..to].iter().collect(),
        negated: a.negated,
        family: a.family || m.section == "family_history",
        hypothetical: a.hypothetical,
    }
}

/// Lower case, without list markers and the punctuation around it.
fn clean_name(s: &str) -> String {
    let t =
        s.trim_matches(|c: char| c.is_whitespace() || matches!(c, '-' | '*' | '•' | ',' | ';' | ':' | '.' | '(' | ')'));
    t.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// `text` without a leading list marker (`-`, `*`, `•`, `3.`, `2)`).
fn strip_marker(text: &str) -> &str {
    let t = text.trim_start().trim_start_matches(['-', '*', '•']).trim_start();
    let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    match t[digits..].chars().next() {
        Some('.' | ')') if digits > 0 && t[digits + 1..].starts_with(' ') => t[digits + 1..].trim_start(),
        _ => t,
    }
}

/// A medication name without the words of the sentence around it (English: what starts,
/// changes or continues a medication, and the prepositions before a dose). Hand-listed: a
/// copied mention may take them along ("Increase lisinopril to 20 mg").
fn bare_name(name: &str) -> String {
    const BEFORE: [&str; 24] = [
        "start",
        "started",
        "starting",
        "continue",
        "continued",
        "continuing",
        "increase",
        "increased",
        "decrease",
        "decreased",
        "resume",
        "resumed",
        "restart",
        "restarted",
        "take",
        "takes",
        "taking",
        "on",
        "add",
        "added",
        "begin",
        "titrate",
        "uptitrate",
        "new",
    ];
    const AFTER: [&str; 7] = ["to", "at", "from", "of", "by", "with", "@"];
    let mut words: Vec<&str> = name.split_whitespace().collect();
    while words.len() > 1 && BEFORE.contains(&words[0]) {
        words.remove(0);
    }
    while words.len() > 1 && words.last().is_some_and(|w| AFTER.contains(w)) {
        words.pop();
    }
    words.join(" ")
}

/// A copied medication's name and dose: the dose is the first amount with a unit (`40 mg`,
/// `2 puffs`, `24/26 mg`, `14 mg/24 h`); the name is the words before it, or before the
/// first route, frequency or bracket when there is no dose.
pub fn split_medication(text: &str) -> (String, Option<String>) {
    static DOSE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let dose = DOSE.get_or_init(|| {
        regex::Regex::new(
            r"(?i)\b\d+(?:[.,]\d+)?(?:\s?/\s?\d+(?:[.,]\d+)?)?\s?(?:mg|mcg|µg|micrograms?|g|units?|iu|ml|meq|mmol|puffs?|tablets?|tabs?|capsules?|drops?|sprays?|patch(?:es)?)\b(?:\s?/\s?(?:\d+\s?)?(?:h|hr|hours?|kg|dose)\b)?",
        )
        .expect("the dose pattern is valid")
    });
    // Routes and frequencies end a name (hand-listed: what follows a drug name in a
    // medication line, not clinical knowledge).
    const AFTER_NAME: [&str; 22] = [
        "po", "iv", "im", "sc", "sq", "subq", "sl", "pr", "inh", "daily", "bid", "tid", "qid", "qd", "qhs", "prn",
        "nightly", "weekly", "once", "every", "q", "x",
    ];
    let text = strip_marker(text);
    match dose.find(text) {
        Some(m) => {
            let name = bare_name(&clean_name(&text[..m.start()]));
            let name = if name.is_empty() { bare_name(&clean_name(&text[m.end()..])) } else { name };
            (name, Some(m.as_str().split_whitespace().collect::<Vec<_>>().join(" ")))
        }
        None => {
            let mut words = Vec::new();
            for w in text.split_whitespace() {
                let bare = w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
                if w.starts_with('(')
                    || AFTER_NAME.contains(&bare.as_str())
                    || bare.starts_with(|c: char| c.is_ascii_digit())
                {
                    break;
                }
                words.push(w);
            }
            (bare_name(&clean_name(&words.join(" "))), None)
        }
    }
}

/// A number as an LVEF or HbA1c value: the last number of the copied text; none for a range
/// (`55-60%`, `30 to 35`) or an HbA1c in mmol/mol.
pub fn value_of(text: &str, kind: Kind) -> Option<f64> {
    static RANGE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    static NUMBER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let range = RANGE.get_or_init(|| regex::Regex::new(r"\d\s*%?\s*(?:-|–|to)\s*\d").expect("valid"));
    let number = NUMBER.get_or_init(|| regex::Regex::new(r"\d+(?:[.,]\d+)?").expect("valid"));
    if range.is_match(text) || (kind == Kind::Hba1c && text.to_lowercase().contains("mmol/mol")) {
        return None;
    }
    // The number that follows the name (`HbA1c 8.2%`): the last one; a name with a digit in
    // it (`HbA1c`, `A1c`) holds none of its own since the pattern needs a word break.
    let last = number.find_iter(text).filter(|m| !text[..m.start()].ends_with(|c: char| c.is_alphabetic())).last()?;
    let v: f64 = last.as_str().replace(',', ".").parse().ok()?;
    let max = if kind == Kind::Lvef { 100.0 } else { 30.0 };
    (v > 0.0 && v <= max).then_some(v)
}

/// Offsets and alignment of a field resting on characters `a..b` of the note.
fn offsets(prefix: &str, at: Option<(usize, usize)>) -> [(String, Value); 3] {
    let (start, end, alignment) = match at {
        Some((a, b)) => (json!(a), json!(b), json!("exact")),
        None => (Value::Null, Value::Null, Value::Null),
    };
    [
        (format!("{prefix}evidence_start"), start),
        (format!("{prefix}evidence_end"), end),
        (format!("{prefix}alignment"), alignment),
    ]
}

/// Diagnoses and medications copied as a list ("HTN, T2DM"), each item a mention of its
/// own (split at commas and semicolons, spaces trimmed).
fn split_lists(chars: &[char], mentions: &[Mention]) -> Vec<Mention> {
    let mut out = Vec::with_capacity(mentions.len());
    for m in mentions {
        if !matches!(m.kind, Kind::Diagnosis | Kind::Medication) {
            out.push(m.clone());
            continue;
        }
        let mut start = m.start;
        for at in m.start..=m.end.min(chars.len()) {
            if at == m.end.min(chars.len()) || matches!(chars[at], ',' | ';') {
                let (mut a, mut b) = (start, at);
                while a < b && chars[a].is_whitespace() {
                    a += 1;
                }
                while b > a && chars[b - 1].is_whitespace() {
                    b -= 1;
                }
                if a < b {
                    out.push(Mention { start: a, end: b, ..m.clone() });
                }
                start = at + 1;
            }
        }
    }
    out
}

/// The note's row from its mentions (in note order), laid out as the whole-note mode's
/// evidence map would lay it out.
pub fn gather(chars: &[char], mentions: &[Mention], reading: &NoteReading) -> Value {
    let mentions = split_lists(chars, mentions);
    let mentions = &mentions[..];
    let note: String = chars.iter().collect();
    let sentences = crate::clinical::sentences(&note);
    let has_impression = mentions.iter().any(|m| m.section == "impression");
    let mut smoking: Option<(Smoking, (usize, usize), bool)> = None;
    let mut lvef: Option<(f64, (usize, usize))> = None;
    let mut hba1c: Option<(f64, (usize, usize))> = None;
    // Diabetes asserted (with its type's mention) or ruled out.
    let (mut dm_yes, mut dm_type, mut dm_no) = (None, None, None);
    let mut meds: Vec<(String, Option<String>, (usize, usize))> = Vec::new();
    let mut diagnoses: Vec<(String, bool, bool, (usize, usize))> = Vec::new();
    for m in mentions {
        let p = place(chars, &sentences, m, reading);
        let text = slice(chars, p.start, p.end);
        let at = (p.start, p.end);
        let clause = reading.status.find(&p.clause);
        match m.kind {
            Kind::Diagnosis => {
                if p.hypothetical || m.section == "allergies" || (m.section == "findings" && has_impression) {
                    continue;
                }
                let name = clean_name(strip_marker(&text));
                if name.is_empty() {
                    continue;
                }
                if !p.family {
                    for s in reading.status.find(&text) {
                        if let Status::Diabetes(t) = s {
                            match p.negated {
                                false => {
                                    dm_yes.get_or_insert(at);
                                    if let (Some(t), None) = (t, dm_type) {
                                        dm_type = Some((t, at));
                                    }
                                }
                                true => {
                                    dm_no.get_or_insert(at);
                                }
                            }
                        }
                    }
                }
                if !diagnoses.iter().any(|d| d.0 == name && d.1 == p.negated && d.2 == p.family) {
                    diagnoses.push((name, p.negated, p.family, at));
                }
            }
            Kind::Medication => {
                let stopped = clause.contains(&Status::NotCurrent);
                let away = matches!(m.section.as_str(), "allergies" | "family_history");
                if stopped || away || p.negated || p.hypothetical || p.family {
                    continue;
                }
                let (name, dose) = split_medication(&text);
                if name.is_empty() {
                    continue;
                }
                // A later mention of the same medication (a changed dose) replaces it.
                match meds.iter_mut().find(|x| x.0 == name) {
                    Some(x) if dose.is_some() => *x = (name, dose, at),
                    Some(_) => {}
                    None => meds.push((name, dose, at)),
                }
            }
            Kind::Smoking => {
                let said: Vec<Smoking> =
                    clause.iter().filter_map(|s| if let Status::Smoking(x) = s { Some(*x) } else { None }).collect();
                let other_substance = said.contains(&Smoking::NotTobacco) && !said.contains(&Smoking::Tobacco);
                if p.family || p.hypothetical || other_substance {
                    continue;
                }
                let status = if said.contains(&Smoking::Never) {
                    Smoking::Never
                } else if said.contains(&Smoking::Former) {
                    Smoking::Former
                } else if p.negated {
                    Smoking::Never
                } else {
                    Smoking::Current
                };
                // The social history's statement wins; otherwise the last.
                let social = m.section == "social_history";
                if smoking.is_none_or(|(_, _, was_social)| social || !was_social) {
                    smoking = Some((status, at, social));
                }
            }
            Kind::Lvef | Kind::Hba1c => {
                if p.family || p.hypothetical || p.negated {
                    continue;
                }
                // A copy that is the value alone (`35%`) reads the same as `LVEF 35%`.
                if let Some(v) = value_of(&slice(chars, m.start, m.end), m.kind) {
                    let slot = if m.kind == Kind::Lvef { &mut lvef } else { &mut hba1c };
                    *slot = Some((v, (m.start, m.end)));
                }
            }
        }
    }
    let mut row = Map::new();
    let mut scalar = |name: &str, value: Value, at: Option<(usize, usize)>| {
        row.insert(name.into(), value);
        row.extend(offsets(&format!("{name}_"), at));
    };
    let (status, at) = match smoking {
        Some((s, at, _)) => (s.as_str(), Some(at)),
        None => ("unknown", None),
    };
    scalar("smoking_status", status.into(), at);
    let diabetes = match (dm_yes, dm_no) {
        (Some(at), _) => (Value::Bool(true), Some(at)),
        (None, Some(at)) => (Value::Bool(false), Some(at)),
        (None, None) => (Value::Null, None),
    };
    scalar("diabetes", diabetes.0, diabetes.1);
    let dtype = dm_type.filter(|_| dm_yes.is_some());
    scalar(
        "diabetes_type",
        dtype.map_or(Value::Null, |(t, _): (DiabetesType, _)| t.as_str().into()),
        dtype.map(|x| x.1),
    );
    scalar("lvef_percent", lvef.map_or(Value::Null, |v| json!(v.0)), lvef.map(|v| v.1));
    scalar("hba1c_percent", hba1c.map_or(Value::Null, |v| json!(v.0)), hba1c.map(|v| v.1));
    let meds = meds.into_iter().map(|(name, dose, at)| {
        let mut o = Map::from_iter([("name".to_string(), json!(name)), ("dose".to_string(), json!(dose))]);
        o.extend(offsets("", Some(at)));
        Value::Object(o)
    });
    row.insert("current_medications".into(), Value::Array(meds.collect()));
    let diagnoses = diagnoses.into_iter().map(|(name, negated, family, at)| {
        let mut o = Map::from_iter([
            ("name".to_string(), json!(name)),
            ("icd10".to_string(), Value::Null),
            ("negated".to_string(), json!(negated)),
            ("subject".to_string(), json!(if family { "family" } else { "patient" })),
        ]);
        o.extend(offsets("", Some(at)));
        Value::Object(o)
    });
    row.insert("diagnoses".into(), Value::Array(diagnoses.collect()));
    Value::Object(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> NoteReading {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/cohort-facts-sections");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        NoteReading::parse(&read("sections.tsv"), &read("context.tsv"), &read("status.tsv")).unwrap()
    }

    /// Mentions of `note` as (kind, copied text), each found after the one before; sections
    /// from the rules.
    fn mentions(note: &str, r: &NoteReading, copies: &[(Kind, &str)]) -> Vec<Mention> {
        let sections = r.sections.sections(note);
        let mut from = 0;
        copies
            .iter()
            .map(|&(kind, text)| {
                let b = note[from..].find(text).unwrap() + from;
                from = b + text.len();
                let start = note[..b].chars().count();
                let section = sections.iter().find(|s| s.start <= start && start < s.end).unwrap().kind.clone();
                Mention { kind, start, end: start + text.chars().count(), section }
            })
            .collect()
    }

    #[test]
    fn medication_names_and_doses_are_split_as_the_conventions_write_them() {
        assert_eq!(split_medication("Furosemide 40 mg PO daily"), ("furosemide".into(), Some("40 mg".into())));
        assert_eq!(split_medication("metoprolol succinate 25mg"), ("metoprolol succinate".into(), Some("25mg".into())));
        assert_eq!(split_medication("sacubitril/valsartan 24/26 mg BID").1, Some("24/26 mg".into()));
        assert_eq!(split_medication("- nicotine patch 14 mg/24 h").1, Some("14 mg/24 h".into()));
        assert_eq!(split_medication("albuterol 2 puffs q4h prn"), ("albuterol".into(), Some("2 puffs".into())));
        assert_eq!(split_medication("insulin lispro via pump"), ("insulin lispro via pump".into(), None));
        assert_eq!(split_medication("Aspirin (81)"), ("aspirin".into(), None));
        assert_eq!(split_medication("3. Metformin ER daily"), ("metformin er".into(), None));
    }

    #[test]
    fn values_are_the_last_number_and_never_a_range() {
        assert_eq!(value_of("LVEF 35%", Kind::Lvef), Some(35.0));
        assert_eq!(value_of("EF improved from 25% to 40%", Kind::Lvef), None, "`25% to 40%` reads as a range");
        assert_eq!(value_of("EF 25%, now 40%", Kind::Lvef), Some(40.0));
        assert_eq!(value_of("LVEF 55-60%", Kind::Lvef), None);
        assert_eq!(value_of("HbA1c 8,2 %", Kind::Hba1c), Some(8.2));
        assert_eq!(value_of("HbA1c 64 mmol/mol", Kind::Hba1c), None);
        assert_eq!(value_of("A1c", Kind::Hba1c), None, "the digit of the name is no value");
        assert_eq!(value_of("EF 140", Kind::Lvef), None);
    }

    #[test]
    fn rules_decide_negation_relatives_status_and_type_per_mention() {
        let r = reading();
        let note = "PMH: T2DM, HTN. No h/o CAD or stroke.\n\
                    Family History:\nMother with breast cancer. Father - DM.\n\
                    Social History:\nEx-smoker, quit 2012. Smokes marijuana occasionally.\n\
                    Medications:\nmetformin 500 mg BID, lisinopril 10 mg daily.\nAspirin 81 mg held for surgery.\n\
                    Echo: LVEF 35%. Likely a renal cyst.\n\
                    A/P:\nIncrease lisinopril to 20 mg daily. Consider empagliflozin 10 mg.\n";
        let copies = [
            (Kind::Diagnosis, "T2DM, HTN"),
            (Kind::Diagnosis, "No h/o CAD"),
            (Kind::Diagnosis, "stroke"),
            (Kind::Diagnosis, "breast cancer"),
            (Kind::Diagnosis, "DM"),
            (Kind::Smoking, "Ex-smoker, quit 2012"),
            (Kind::Smoking, "Smokes marijuana occasionally"),
            (Kind::Medication, "metformin 500 mg BID"),
            (Kind::Medication, "lisinopril 10 mg"),
            (Kind::Medication, "Aspirin 81 mg"),
            (Kind::Lvef, "LVEF 35%"),
            (Kind::Diagnosis, "renal cyst"),
            (Kind::Medication, "lisinopril to 20 mg"),
            (Kind::Medication, "empagliflozin 10 mg"),
        ];
        let ms = mentions(note, &r, &copies);
        let chars: Vec<char> = note.chars().collect();
        let row = gather(&chars, &ms, &r);
        assert_eq!(row["smoking_status"], "former", "cannabis is no tobacco: {row}");
        assert_eq!((row["diabetes"].clone(), row["diabetes_type"].clone()), (json!(true), json!("type2")));
        assert_eq!(row["lvef_percent"], json!(35.0));
        assert_eq!(row["hba1c_percent"], Value::Null);
        let meds: Vec<(String, String)> = row["current_medications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].as_str().unwrap().into(), m["dose"].as_str().unwrap().into()))
            .collect();
        assert_eq!(
            meds,
            [("metformin".to_string(), "500 mg".to_string()), ("lisinopril".into(), "20 mg".into())],
            "held and only considered medications are not current; the new dose counts"
        );
        let dx: Vec<(String, bool, String)> = row["diagnoses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().unwrap().into(),
                    d["negated"].as_bool().unwrap(),
                    d["subject"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            dx,
            [
                ("t2dm".to_string(), false, "patient".to_string()),
                ("htn".into(), false, "patient".into()),
                ("cad".into(), true, "patient".into()),
                ("stroke".into(), true, "patient".into()),
                ("breast cancer".into(), false, "family".into()),
                ("dm".into(), false, "family".into()),
            ],
            "the hedged cyst is left out"
        );
        // Every field rests on the words it was read from.
        let cad = &row["diagnoses"][2];
        let (a, b) = (cad["evidence_start"].as_u64().unwrap() as usize, cad["evidence_end"].as_u64().unwrap() as usize);
        assert_eq!(slice(&chars, a, b), "CAD");
        let s = row["smoking_status_evidence_start"].as_u64().unwrap() as usize;
        assert_eq!(
            slice(&chars, s, row["smoking_status_evidence_end"].as_u64().unwrap() as usize),
            "Ex-smoker, quit 2012"
        );
        assert_eq!(row["hba1c_percent_alignment"], Value::Null);
    }

    #[test]
    fn a_note_saying_nothing_gives_unknown_and_nulls() {
        let r = reading();
        let row = gather(&"Seen today.".chars().collect::<Vec<_>>(), &[], &r);
        assert_eq!(row["smoking_status"], "unknown");
        assert_eq!(row["diabetes"], Value::Null);
        assert_eq!(row["current_medications"], json!([]));
        let ruled_out = "PMH: No diabetes. Denies tobacco use.\n";
        let ms = mentions(ruled_out, &r, &[(Kind::Diagnosis, "diabetes"), (Kind::Smoking, "tobacco use")]);
        let row = gather(&ruled_out.chars().collect::<Vec<_>>(), &ms, &r);
        assert_eq!((row["diabetes"].clone(), row["diabetes_type"].clone()), (json!(false), Value::Null));
        assert_eq!(row["smoking_status"], "never");
    }

    #[test]
    fn answers_are_placed_in_their_section_and_bad_ones_named() {
        let text = "Meds: aspirin 81 mg, aspirin 81 mg\n";
        let answer = r#"{"mentions":[{"kind":"medication","text":"aspirin 81 mg"},{"kind":"medication","text":"aspirin 81 mg"}]}"#;
        let got = section_mentions(answer, text, 10, "medications").unwrap();
        assert_eq!((got[0].start, got[1].start), (16, 31), "a repeated copy is the next occurrence");
        assert_eq!(section_mentions("nope", text, 0, "x").unwrap_err().0, ErrorReason::UnparseableAnswer);
        let invented = r#"{"mentions":[{"kind":"medication","text":"warfarin"}]}"#;
        assert_eq!(section_mentions(invented, text, 0, "x").unwrap_err().0, ErrorReason::BadAnswerField);
    }
}
