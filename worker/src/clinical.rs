//! Reading aids for clinical notes, driven by rule files shipped as data (a pipeline's
//! `sections.tsv` and `context.tsv`): the sections of a note (history, past history,
//! medications, family and social history, assessment and plan, impression …) from its
//! heading lines, its sentences, and a ConText-style decision (after Harkema et al. 2009 and
//! NegEx) whether a mention in a sentence is negated, hypothetical, or about a relative.
//!
//! Hand-written rather than a crate: no Rust crate implements ConText or clinical section
//! detection, and both are small (a token matcher over the rule phrases). Offsets are in
//! characters (Unicode scalar values), as every evidence offset of the tables.

use std::collections::HashMap;

/// A rule file that cannot be read, naming the line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct RuleError {
    pub line: usize,
    pub reason: String,
}

/// Lower-case word tokens of `text` with their character ranges: runs of letters, digits
/// and the joiners `/ ' & -` inside a word (`h/o`, `mother's`), and each other non-space
/// character alone (`:`, `,`).
fn tokens(text: &str) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, usize)> = None;
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let joiner = matches!(c, '/' | '\'' | '’' | '&' | '-')
            && cur.is_some()
            && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric());
        if c.is_alphanumeric() || joiner {
            match &mut cur {
                Some((w, _)) => w.extend(c.to_lowercase()),
                None => cur = Some((c.to_lowercase().collect(), i)),
            }
            continue;
        }
        if let Some((w, s)) = cur.take() {
            out.push((w, s, i));
        }
        if !c.is_whitespace() {
            out.push((c.to_lowercase().collect(), i, i + 1));
        }
    }
    if let Some((w, s)) = cur.take() {
        out.push((w, s, chars.len()));
    }
    out
}

/// Phrases as token sequences, matched longest first at each token.
struct Phrases<T> {
    by_first: HashMap<String, Vec<(Vec<String>, T)>>,
}

impl<T: Clone> Phrases<T> {
    fn new(entries: Vec<(String, T)>) -> Self {
        let mut by_first: HashMap<String, Vec<(Vec<String>, T)>> = HashMap::new();
        for (phrase, v) in entries {
            let toks: Vec<String> = tokens(&phrase).into_iter().map(|t| t.0).collect();
            if let Some(first) = toks.first().cloned() {
                by_first.entry(first).or_default().push((toks, v));
            }
        }
        for v in by_first.values_mut() {
            v.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        }
        Self { by_first }
    }

    /// The longest phrase starting at token `at`: its value and length in tokens.
    fn at(&self, toks: &[(String, usize, usize)], at: usize) -> Option<(T, usize)> {
        let cands = self.by_first.get(&toks[at].0)?;
        cands.iter().find_map(|(p, v)| {
            let fits = toks.len() - at >= p.len() && p.iter().zip(&toks[at..]).all(|(a, b)| *a == b.0);
            fits.then(|| (v.clone(), p.len()))
        })
    }
}

/// Non-comment lines of a rule file split at tabs, with their line numbers.
fn rule_lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(k, l)| (k + 1, l.split('\t').map(str::trim).collect()))
}

// ---- sections ----------------------------------------------------------------------------

/// A part of a note under one heading: what it is, and its characters (heading included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// Section headings (`sections.tsv`).
pub struct SectionRules {
    headings: Phrases<String>,
}

/// The sections a heading may open.
const SECTION_KINDS: [&str; 10] = [
    "history",
    "past_history",
    "medications",
    "allergies",
    "family_history",
    "social_history",
    "assessment_plan",
    "impression",
    "findings",
    "other",
];

impl SectionRules {
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let mut entries = Vec::new();
        for (line, cols) in rule_lines(text) {
            let [heading, kind] = cols[..] else {
                return Err(RuleError { line, reason: "expected a heading and a section, tab-separated".into() });
            };
            if !SECTION_KINDS.contains(&kind) {
                return Err(RuleError { line, reason: format!("unknown section {kind:?}") });
            }
            entries.push((heading.to_string(), kind.to_string()));
        }
        Ok(Self { headings: Phrases::new(entries) })
    }

    /// The note's sections in order: a line that begins with a heading followed by `:` (or
    /// by nothing) opens one; text before the first heading is `other`.
    pub fn sections(&self, note: &str) -> Vec<Section> {
        let mut out: Vec<Section> = Vec::new();
        let mut at = 0;
        for line in note.split_inclusive('\n') {
            let len = line.chars().count();
            let toks = tokens(line);
            let opened = (!toks.is_empty()).then(|| self.headings.at(&toks, 0)).flatten().filter(|&(_, n)| {
                // The heading ends the line, or a colon (or dash) follows it.
                toks.get(n).is_none_or(|t| matches!(t.0.as_str(), ":" | "-" | "–"))
            });
            match opened {
                Some((kind, _)) => {
                    if let Some(last) = out.last_mut() {
                        last.end = at;
                    }
                    out.push(Section { kind, start: at, end: at + len });
                }
                None if out.is_empty() => out.push(Section { kind: "other".into(), start: at, end: at + len }),
                None => {}
            }
            at += len;
            if let Some(last) = out.last_mut() {
                last.end = at;
            }
        }
        out
    }
}

/// Sentences of `text` as character ranges: ends at `.`, `?`, `!` or `;` followed by
/// whitespace, and at every line break (notes rarely carry a sentence over a line).
pub fn sentences(text: &str) -> Vec<(usize, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..chars.len() {
        let end = match chars[i] {
            '\n' => Some(i),
            '.' | '?' | '!' | ';' if chars.get(i + 1).is_none_or(|c| c.is_whitespace()) => Some(i + 1),
            _ => None,
        };
        if let Some(e) = end {
            if chars[start..e].iter().any(|c| !c.is_whitespace()) {
                out.push((start, e));
            }
            start = i + 1;
        }
    }
    if chars[start..].iter().any(|c| !c.is_whitespace()) {
        out.push((start, chars.len()));
    }
    out
}

// ---- ConText -------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Negated,
    Family,
    Hypothetical,
    Pseudo,
    Termination,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Forward,
    Backward,
    Both,
}

/// What the rules say of one mention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Assessment {
    pub negated: bool,
    /// About a relative (family history), not the patient.
    pub family: bool,
    /// Hedged, conditional, screened for or prevented: neither asserted nor ruled out.
    pub hypothetical: bool,
}

/// ConText trigger phrases (`context.tsv`).
pub struct ContextRules {
    triggers: Phrases<(Category, Direction)>,
}

impl ContextRules {
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let mut entries = Vec::new();
        for (line, cols) in rule_lines(text) {
            let [phrase, category, direction] = cols[..] else {
                return Err(RuleError { line, reason: "expected a phrase, a category and a direction".into() });
            };
            let category = match category {
                "negated" => Category::Negated,
                "family" => Category::Family,
                "hypothetical" => Category::Hypothetical,
                "pseudo" => Category::Pseudo,
                "termination" => Category::Termination,
                other => return Err(RuleError { line, reason: format!("unknown category {other:?}") }),
            };
            let direction = match direction {
                "forward" => Direction::Forward,
                "backward" => Direction::Backward,
                "both" => Direction::Both,
                other => return Err(RuleError { line, reason: format!("unknown direction {other:?}") }),
            };
            entries.push((phrase.to_string(), (category, direction)));
        }
        Ok(Self { triggers: Phrases::new(entries) })
    }

    /// The mention at characters `mention` (end exclusive) of `sentence`: each trigger's
    /// scope runs from it to the end (forward) or start (backward) of the sentence, stopping
    /// at a termination phrase; a pseudo-trigger is matched first and hides the triggers
    /// inside it; the mention's own words are never its triggers.
    pub fn assess(&self, sentence: &str, mention: (usize, usize)) -> Assessment {
        let toks = tokens(sentence);
        // Triggers found left to right, longest first, without overlaps.
        let mut found: Vec<(Category, Direction, usize, usize)> = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            match self.triggers.at(&toks, i) {
                Some(((cat, dir), n)) => {
                    let (s, e) = (toks[i].1, toks[i + n - 1].2);
                    // A trigger inside the mention is part of what is mentioned.
                    if e <= mention.0 || s >= mention.1 {
                        found.push((cat, dir, i, i + n));
                    }
                    i += n;
                }
                None => i += 1,
            }
        }
        // The mention's tokens.
        let first = toks.iter().position(|t| t.2 > mention.0).unwrap_or(toks.len());
        let last = toks.iter().rposition(|t| t.1 < mention.1).map_or(first, |k| k + 1);
        let terminations: Vec<(usize, usize)> =
            found.iter().filter(|t| t.0 == Category::Termination).map(|t| (t.2, t.3)).collect();
        let mut a = Assessment::default();
        for &(cat, dir, s, e) in &found {
            if matches!(cat, Category::Pseudo | Category::Termination) {
                continue;
            }
            let ahead = e <= first
                && matches!(dir, Direction::Forward | Direction::Both)
                && !terminations.iter().any(|&(ts, _)| ts >= e && ts < first);
            let behind = s >= last
                && matches!(dir, Direction::Backward | Direction::Both)
                && !terminations.iter().any(|&(_, te)| te <= s && te > last);
            if ahead || behind {
                match cat {
                    Category::Negated => a.negated = true,
                    Category::Family => a.family = true,
                    Category::Hypothetical => a.hypothetical = true,
                    Category::Pseudo | Category::Termination => {}
                }
            }
        }
        a
    }
}

impl ContextRules {
    /// The mention `mention` of `sentence` without the triggers (and `:`/`-`) it starts
    /// with: a copied "No h/o CAD" is the mention "CAD" under its negation.
    pub fn trim_triggers(&self, sentence: &str, mention: (usize, usize)) -> (usize, usize) {
        let toks = tokens(sentence);
        let mut i = toks.iter().position(|t| t.1 >= mention.0).unwrap_or(toks.len());
        let mut start = mention.0;
        while i < toks.len() && toks[i].2 <= mention.1 {
            let n = match self.triggers.at(&toks, i) {
                Some(((Category::Negated | Category::Family | Category::Hypothetical, _), n)) => n,
                _ if matches!(toks[i].0.as_str(), ":" | "-" | "–" | "," | "of") => 1,
                _ => break,
            };
            // Never trim the whole mention away.
            match toks.get(i + n) {
                Some(next) if next.2 <= mention.1 => {
                    start = next.1;
                    i += n;
                }
                _ => break,
            }
        }
        (start, mention.1)
    }
}

// ---- status --------------------------------------------------------------------------------

/// What a status phrase says (`status.tsv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A medication stopped, held, declined, only recommended, or given once.
    NotCurrent,
    /// A tobacco status.
    Smoking(Smoking),
    /// Diabetes, of a type where the phrase names one.
    Diabetes(Option<DiabetesType>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Smoking {
    Current,
    Former,
    Never,
    /// The clause names tobacco (cigarettes, pack-years): it is about tobacco whatever else
    /// it names.
    Tobacco,
    /// The clause names another substance smoked (cannabis): not tobacco unless it also
    /// names tobacco.
    NotTobacco,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiabetesType {
    Type1,
    Type2,
    Gestational,
    Other,
}

impl Smoking {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Former => "former",
            Self::Never => "never",
            Self::Tobacco => "tobacco",
            Self::NotTobacco => "not_tobacco",
        }
    }
}

impl DiabetesType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Type1 => "type1",
            Self::Type2 => "type2",
            Self::Gestational => "gestational",
            Self::Other => "other",
        }
    }
}

/// Status phrases: a medication's sentence saying it is not current, a smoker's status,
/// the names of diabetes and its types.
pub struct StatusRules {
    phrases: Phrases<Status>,
}

impl StatusRules {
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let mut entries = Vec::new();
        for (line, cols) in rule_lines(text) {
            let [phrase, kind, value] = cols[..] else {
                return Err(RuleError { line, reason: "expected a phrase, a kind and a value".into() });
            };
            let status = match (kind, value) {
                ("medication", "not_current") => Status::NotCurrent,
                ("smoking", "current") => Status::Smoking(Smoking::Current),
                ("smoking", "former") => Status::Smoking(Smoking::Former),
                ("smoking", "never") => Status::Smoking(Smoking::Never),
                ("smoking", "tobacco") => Status::Smoking(Smoking::Tobacco),
                ("smoking", "not_tobacco") => Status::Smoking(Smoking::NotTobacco),
                ("diabetes", "any") => Status::Diabetes(None),
                ("diabetes", "type1") => Status::Diabetes(Some(DiabetesType::Type1)),
                ("diabetes", "type2") => Status::Diabetes(Some(DiabetesType::Type2)),
                ("diabetes", "gestational") => Status::Diabetes(Some(DiabetesType::Gestational)),
                ("diabetes", "other") => Status::Diabetes(Some(DiabetesType::Other)),
                _ => return Err(RuleError { line, reason: format!("unknown kind and value {kind:?} {value:?}") }),
            };
            entries.push((phrase.to_string(), status));
        }
        Ok(Self { phrases: Phrases::new(entries) })
    }

    /// Every status phrase in `text`, left to right (longest first at each place).
    pub fn find(&self, text: &str) -> Vec<Status> {
        let toks = tokens(text);
        let mut out = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            match self.phrases.at(&toks, i) {
                Some((st, n)) => {
                    out.push(st);
                    i += n;
                }
                None => i += 1,
            }
        }
        out
    }
}

/// The three rule sets section mode reads a note with.
pub struct NoteReading {
    pub sections: SectionRules,
    pub context: ContextRules,
    pub status: StatusRules,
}

impl std::fmt::Debug for NoteReading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoteReading { .. }")
    }
}

impl NoteReading {
    /// Parses the three files' texts; an error says which (0, 1, 2) and where.
    pub fn parse(sections: &str, context: &str, status: &str) -> Result<Self, (usize, RuleError)> {
        Ok(Self {
            sections: SectionRules::parse(sections).map_err(|e| (0, e))?,
            context: ContextRules::parse(context).map_err(|e| (1, e))?,
            status: StatusRules::parse(status).map_err(|e| (2, e))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> (SectionRules, ContextRules) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/cohort-facts-sections");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        (SectionRules::parse(&read("sections.tsv")).unwrap(), ContextRules::parse(&read("context.tsv")).unwrap())
    }

    /// The assessment of the first occurrence of `mention` in `sentence`.
    fn assess(c: &ContextRules, sentence: &str, mention: &str) -> Assessment {
        let b = sentence.find(mention).unwrap();
        let s = sentence[..b].chars().count();
        c.assess(sentence, (s, s + mention.chars().count()))
    }

    fn neg(c: &ContextRules, sentence: &str, mention: &str) -> bool {
        assess(c, sentence, mention).negated
    }

    #[test]
    fn negation_follows_its_trigger_to_the_end_of_the_sentence_or_a_termination() {
        let (_, c) = rules();
        assert!(neg(&c, "No h/o CAD or stroke.", "CAD"));
        assert!(neg(&c, "No h/o CAD or stroke.", "stroke"));
        assert!(neg(&c, "There is no focal consolidation to suggest pneumonia.", "pneumonia"));
        assert!(neg(&c, "DCIS: not identified", "DCIS"));
        assert!(neg(&c, "Pulmonary embolism was ruled out by CTPA", "Pulmonary embolism"));
        assert!(neg(&c, "Patient denies chest pain but reports dyspnea", "chest pain"));
        assert!(!neg(&c, "Patient denies chest pain but reports dyspnea", "dyspnea"), "`but` ends the scope");
        assert!(!neg(&c, "Hypertension, well controlled.", "Hypertension"));
        assert!(!neg(&c, "No increase in the size of the thyroid nodule", "thyroid nodule"), "a pseudo-trigger");
        assert!(!neg(&c, "Pneumonia, resolved after antibiotics.", "Pneumonia"), "past conditions are not negated");
        assert!(neg(&c, "Diabetes: no.", "Diabetes"));
        assert!(neg(&c, "Keine KHK bekannt.", "KHK"));
        assert!(neg(&c, "Niega diabetes.", "diabetes"));
    }

    #[test]
    fn relatives_and_hedges_are_told_apart_from_the_patient() {
        let (_, c) = rules();
        let fam = |s: &str, m: &str| assess(&c, s, m);
        assert_eq!(
            fam("Mother with breast cancer at 52.", "breast cancer"),
            Assessment { family: true, ..Default::default() }
        );
        assert!(fam("Breast cancer in her mother.", "Breast cancer").family, "a backward experiencer");
        let both = fam("No family history of sudden cardiac death.", "sudden cardiac death");
        assert!(both.family && both.negated, "{both:?}");
        assert!(
            !fam("Father's MI at 60; patient has hypertension.", "hypertension").family,
            "`patient` ends the scope"
        );
        assert!(fam("Findings likely a cyst.", "cyst").hypothetical);
        assert!(fam("r/o ACS", "ACS").hypothetical);
        assert!(fam("Aspirin 81 mg for preeclampsia prevention.", "preeclampsia").hypothetical);
        assert!(fam("Heparin for DVT prophylaxis.", "DVT").hypothetical);
        assert!(!fam("Screening colonoscopy ordered.", "colonoscopy").family);
    }

    #[test]
    fn sections_open_at_heading_lines() {
        let (s, _) = rules();
        let note = "Seen today.\nPMH: CAD, HTN.\nFamily History:\nMother - DM2.\nMeds\nmetformin 500 mg\nA/P: stable.\nPlan was discussed.\n";
        let kinds: Vec<(String, String)> = s
            .sections(note)
            .iter()
            .map(|x| (x.kind.clone(), note.chars().skip(x.start).take(x.end - x.start).collect()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("other".to_string(), "Seen today.\n".to_string()),
                ("past_history".into(), "PMH: CAD, HTN.\n".into()),
                ("family_history".into(), "Family History:\nMother - DM2.\n".into()),
                ("medications".into(), "Meds\nmetformin 500 mg\n".into()),
                ("assessment_plan".into(), "A/P: stable.\nPlan was discussed.\n".into()),
            ],
            "a heading word inside a sentence (`Plan was`) opens nothing"
        );
    }

    #[test]
    fn sentences_end_at_stops_and_line_breaks() {
        let t = "BP 120/80. No DM; no CAD.\nPlan: f/u 2.5 weeks";
        let got: Vec<String> =
            sentences(t).iter().map(|&(a, b)| t.chars().skip(a).take(b - a).collect::<String>()).collect();
        assert_eq!(got, ["BP 120/80.", " No DM;", " no CAD.", "Plan: f/u 2.5 weeks"]);
    }

    #[test]
    fn bad_rule_lines_are_named() {
        assert_eq!(ContextRules::parse("# c\nno\tnegated\n").err().unwrap().line, 2);
        assert!(ContextRules::parse("no\tmaybe\tforward\n").is_err());
        assert!(SectionRules::parse("pmh\tpast\n").err().unwrap().reason.contains("unknown section"));
    }
}
