//! The result classifier: which candidate lines are lab results, before the model sees them.
//!
//! A candidate is a result when it names a laboratory test (an entry of the pipeline's
//! analyte lexicon, `analytes.tsv`, or a number followed by a laboratory unit) and holds a
//! value that is not an earlier value of a trend. Everything else is set aside with a reason
//! ([`NonResult`]): identification and other metadata, entries with no result (pending,
//! cancelled, not reported, withdrawn), earlier values, therapeutic targets, interpretation
//! tables and vital signs. Pending, cancelled and not-reported entries are counted in the run
//! summary; none of them gives a row.
//!
//! The word lists here are patterns of report *structure* (status words, trend words, labels
//! of metadata) in the languages the pipeline reads; test names live in the lexicon, which is
//! data a laboratory can extend without a new build.

use super::items::{Candidate, Span};
use aho_corasick::AhoCorasick;
use regex::Regex;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

/// Why a piece of a report gives no `lab_results` row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NonResult {
    /// Identification, dates, addresses, instrument, operator, price and payment lines.
    Metadata,
    /// The result is still to come.
    Pending,
    /// Not measured: cancelled, not performed, insufficient, clotted or haemolysed sample.
    Cancelled,
    /// Measured but not given: not reported, see comment, withheld.
    NotReported,
    /// Withdrawn by the laboratory (HL7 `D`/`W`: deleted, posted in error).
    Withdrawn,
    /// An earlier value (the start of a trend, a superseded value).
    Previous,
    /// A therapeutic target, toxic threshold or decision limit printed on its own.
    Target,
    /// A row of an interpretation or risk-category table.
    Interpretation,
    /// A vital sign, body measurement or analyser input setting.
    VitalSign,
    /// No laboratory test named.
    NoAnalyte,
    /// A test named with no value: only a reference range, a limit or a threshold.
    NoValue,
}

impl NonResult {
    /// The label used in summaries and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            NonResult::Metadata => "metadata",
            NonResult::Pending => "pending",
            NonResult::Cancelled => "cancelled",
            NonResult::NotReported => "not_reported",
            NonResult::Withdrawn => "withdrawn",
            NonResult::Previous => "previous",
            NonResult::Target => "target",
            NonResult::Interpretation => "interpretation",
            NonResult::VitalSign => "vital_sign",
            NonResult::NoAnalyte => "no_analyte",
            NonResult::NoValue => "no_value",
        }
    }
}

/// A piece of the document set aside, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetAside {
    pub reason: NonResult,
    pub start: usize,
    pub end: usize,
}

/// Counts of set-aside pieces by reason label.
pub fn count_set_aside(set_aside: &[SetAside]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in set_aside {
        *out.entry(s.reason.as_str().to_string()).or_insert(0) += 1;
    }
    out
}

/// The status of a reported result (the `status` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ResultStatus {
    #[default]
    Final,
    Preliminary,
    Corrected,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Final => "final",
            ResultStatus::Preliminary => "preliminary",
            ResultStatus::Corrected => "corrected",
        }
    }
}

/// What a status cell or an HL7 OBX-11 code says: a result status, or that the entry is not
/// a result. `None` when the text is not a status.
pub fn read_status(cell: &str) -> Option<Result<ResultStatus, NonResult>> {
    let c = cell.trim();
    match c.to_uppercase().as_str() {
        "F" => return Some(Ok(ResultStatus::Final)),
        "P" | "R" | "S" => return Some(Ok(ResultStatus::Preliminary)),
        "C" => return Some(Ok(ResultStatus::Corrected)),
        "I" | "O" => return Some(Err(NonResult::Pending)),
        "X" => return Some(Err(NonResult::Cancelled)),
        "N" => return Some(Err(NonResult::NotReported)),
        "D" | "W" => return Some(Err(NonResult::Withdrawn)),
        _ => {}
    }
    if let Some(reason) = unresulted(c) {
        return Some(Err(reason));
    }
    if CORRECTED.is_match(c) {
        Some(Ok(ResultStatus::Corrected))
    } else if PRELIMINARY.is_match(c) {
        Some(Ok(ResultStatus::Preliminary))
    } else if FINAL.is_match(c) {
        Some(Ok(ResultStatus::Final))
    } else {
        None
    }
}

static PENDING: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:pending|to\ follow|result\ to\ follow|in\ progress|in\ process|processing|awaited|awaiting
        |not\ yet\ (?:available|reported|resulted)
        |ordered|ausstehend|folgt|in\ bearbeitung|en\ cours|à\ suivre|a\ suivre|en\ attente|pendiente|en\ curso
        |en\ proceso|in\ corso|in\ attesa|da\ eseguire|volgt|in\ behandeling|pendente|em\ curso)\b",
    )
    .unwrap()
});

static CANCELLED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:cancell?ed|not\ performed|not\ done|not\ sent|not\ received|not\ collected|not\ tested|not\ processed|not\ requested|unable\ to\ (?:perform|process|analy[sz]e)
        |insufficient|qns|clotted|coagulated|ha?emoly[sz]ed|lipa?emic|icteric|rejected|unsuitable|sample\ lost|specimen\ lost
        |storniert|nicht\ durchgeführt|nicht\ bestimmt|nicht\ messbar|hämolytisch|geronnen|material\ fehlt
        |annulée?|non\ réalisée?|non\ fait|non\ effectuée?|échantillon\ insuffisant|hémolysée?|coagulée?
        |anulad[oa]|cancelad[oa]|no\ realizad[oa]|muestra\ insuficiente|hemolizad[oa]|coagulad[oa]
        |annullat[oa]|non\ eseguit[oa]|campione\ insufficiente|emolizzat[oa]
        |geannuleerd|niet\ uitgevoerd|onvoldoende|gehemolyseerd|gestold)\b",
    )
    .unwrap()
});

static NOT_REPORTED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:not\ reported|see\ (?:comment|note|below|report)|result\ withheld|withheld|not\ available|n/a
        |siehe\ (?:kommentar|bemerkung|befund)|nicht\ berichtet|voir\ (?:commentaire|remarque|ci-dessous)|non\ rendu
        |ver\ (?:comentario|nota)|no\ informad[oa]|vedi\ (?:nota|commento)|non\ refertat[oa]|zie\ (?:opmerking|commentaar))(?:\b|$)",
    )
    .unwrap()
});

static PRELIMINARY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:prelim(?:inary)?|provisional|unverified|not\ (?:yet\ )?validated|vorläufig(?:e[rns]?)?|provisoires?
        |preliminar(?:es)?|provvisori[oa]|voorlopig(?:e)?|preliminares?)\b",
    )
    .unwrap()
});

static CORRECTED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:corrected|amended|revised|korrigiert(?:e[rns]?)?|berichtigt|corrigée?s?|rectifiée?s?|corregid[oa]s?
        |rectificad[oa]s?|corrett[oa]|rettificat[oa]|gecorrigeerd(?:e)?)\b",
    )
    .unwrap()
});

static FINAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?ix)\b(?:final|validated|verified|endgültig|validiert|validée?|définitif|definitiv[oa]|validad[oa]|definitief)\b")
        .unwrap()
});

/// Which kind of entry without a result a text says it is, if any.
pub fn unresulted(text: &str) -> Option<NonResult> {
    if PENDING.is_match(text) {
        Some(NonResult::Pending)
    } else if NOT_REPORTED.is_match(text) {
        Some(NonResult::NotReported)
    } else if CANCELLED.is_match(text) {
        Some(NonResult::Cancelled)
    } else {
        None
    }
}

/// A number standing as a value: not inside a word (`B12`, `CA125`), not a range.
static VALUE_NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[\s:=(\[])[<>≤≥]?=?\s?\d+(?:[.,]\d+)?(?:\s*[-–]\s*\d)?").unwrap());

/// Whether `text` holds a value number (a date, a time or a range is not one).
fn has_value_number(text: &str) -> bool {
    value_number_in(&super::segment::DATE_OR_TIME.replace_all(text, " "))
}

/// [`has_value_number`] of a text whose dates and times are already blanked.
fn value_number_in(t: &str) -> bool {
    VALUE_NUMBER.find_iter(t).any(|m| {
        let s = m.as_str();
        // A number glued to a word after it is part of a name (`25-OH`, `17-OHP`).
        let mut next = t[m.end()..].chars();
        let glued = match next.next() {
            Some(c) if c.is_alphabetic() => true,
            Some('-' | '–') => next.next().is_some_and(char::is_alphabetic),
            _ => false,
        };
        !glued && (!(s.contains('-') || s.contains('–')) || s.trim_start().starts_with(['<', '>', '≤', '≥']))
    })
}

/// A number given as a limit: `6.5% or greater`, `200 and above`, `or less`.
static THRESHOLD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\d\s*(?:%|\S*/\S+)?\s+(?:or|and)\s+(?:greater|higher|above|more|over|less|lower|below|under)\b
        |\d\s*(?:%|\S*/\S+)?\s+(?:et\s+plus|ou\s+plus|o\s+m[aá]s|oder\s+mehr|und\s+mehr|o\s+superiore|of\s+hoger)\b",
    )
    .unwrap()
});

/// A range-shaped value of microscopy (`5-10 /hpf`, cells per field).
static FIELD_COUNT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\d\s*[-–]\s*\d+\s*(?:/\s*(?:hpf|lpf|field|champ|campo|veld|gf)|per\s+(?:high|low)[-\s]power)")
        .unwrap()
});

/// Whether `text` holds a value: a number outside dates, times and two-sided ranges (a
/// range-shaped count per microscope field aside), or a qualitative result word.
fn has_value_outside_ranges(text: &str) -> bool {
    if FIELD_COUNT.is_match(text) || super::segment::is_qualitative(text) {
        return true;
    }
    // Dates first: a range pattern would eat part of `12-11-2026`.
    let t = super::segment::DATE_OR_TIME.replace_all(text, " ");
    value_number_in(&super::numbers::RANGE_BOTH.replace_all(&t, " "))
}

/// Labels of metadata lines the segmentation does not already skip: instruments and their
/// software, operators, quality control, locations, identifiers, money. Matched at the start
/// of a line or as a `label:` anywhere. `Total` is a receipt's sum only before a number
/// (`Total 3 items`): before a word it opens a test name (`Total Kolesterol  238 mg/dL`).
static METADATA: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)^\s*(?:
            (?:s/n|serial|serial\ (?:no|number)|instrument|analy[sz]er|device|software|firmware|version|operator|user
            |technician|tech\ id|qc|quality\ control|control\ lot|lot|reagent|calibrat\w*|cartridge|barcode|sample\ id
            |specimen\ id|order\ (?:no|number|id)|request\ (?:no|number)|episode|ward|unit\ no|bed|room|clinic|location
            |consultant|gp|hospital\ (?:no|number)|nhs\ (?:no|number)|id|ref\ no|invoice|receipt|total\s*[:=]?\s*\d+|subtotal|amount
            |price|paid|payment|card|cash|change|vat|tax|fee|till|served\ by|cashier|register|terminal|transaction|station|zimmer|gerät|geraet|bediener|charge|rechnung|betrag
            |numéro|n°|dossier|service|appareil|opérateur|montant|prix|número|historia|servicio|equipo|operador|importe
            |precio|reparto|strumento|operatore|importo|prezzo|afdeling|apparaat|bedrag|prijs)\b
        )",
    )
    .unwrap()
});

/// A price or a payment: a currency sign or code next to a number.
static MONEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)[€$£¥]\s?\d|\d\s?[€$£¥]|\b(?:eur|usd|gbp|chf)\s?\d|\d\s?(?:eur|usd|gbp|chf)\b").unwrap()
});

/// Openers of therapeutic targets, toxic thresholds and decision limits printed on their own.
static TARGET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)^\s*[(\[*-]?\s*(?:therapeutic|target|toxic|toxicity|potentially\ toxic|trough\ target|peak\ target|desired
        |decision\ limit|cut-?off|action\ limit|alert\ (?:level|limit)|zielbereich|therapeutisch\w*|toxisch\w*|grenzwert
        |entscheidungsgrenze|zone\ thérapeutique|cible|seuil|toxique|objetivo|diana|rango\ terap\w*|tóxic\w*|umbral
        |bersaglio|intervallo\ terap\w*|tossic\w*|soglia|streef\w*|therapeutisch\ bereik|toxisch)\b",
    )
    .unwrap()
});

/// A threshold named before the line's first number (`Phototherapy threshold at 62 hours:
/// 300 umol/L`, `Exchange transfusion limit 450`), outside brackets (a result may print its
/// cut-off in brackets: `Troponin (99th percentile cut-off 14 ng/L)  45`).
fn target_label(text: &str) -> bool {
    let first_digit = text.find(|c: char| c.is_ascii_digit()).unwrap_or(text.len());
    let label = &text[..first_digit];
    let label = label.split_once(['(', '[']).map_or(label, |(a, _)| a);
    THRESHOLD_WORD.is_match(label)
}

static THRESHOLD_WORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:threshold|cut-?off|action\ limit|decision\ limit|treatment\ line|schwelle|schwellenwert|seuil|umbral
        |soglia|drempel(?:waarde)?|limiar)\b",
    )
    .unwrap()
});

/// Category words of interpretation tables, in the lexicon's languages.
const CATEGORY: &str = r"desirable|borderline|optimal|near\ optimal|above\ optimal|very\ high|high\ risk|low\ risk
        |moderate\ risk|intermediate\ risk|average\ risk|increased\ risk|prediabetes|pre-diabetes|diabetes|deficien\w*
        |insufficien\w*|sufficien\w*|adequate|elevated\ risk|euthyroid|non-?diabetic|pre-?diabetic|diabetic
        |(?:possible\ |potential\ |posible\ |possible\ )?toxi\w*
        |wünschenswert|grenzwertig|erhöhtes\ risiko|mangel|insuffizienz|ausreichend
        |souhaitable|limite|risque|carence|insuffisance|suffisance|déficit|deficit|deseable|límite|riesgo|deficiencia
        |insuficiencia|suficiencia|óptimo|optimo|casi\ óptimo|desiderabile|rischio|carenza|insufficienza|sufficienza
        |ottimale|wenselijk|grenswaarde|risico|tekort|onvoldoende|voldoende|optimaal|deficiência|insuficiência
        |suficiência|desejável|limítrofe|risco";

/// A category label with its limit after it, at the start of a line (`Déficit: < 20 ng/mL`,
/// `Optimal >= 30`, `Very high: >= 190`): a row of an interpretation table even where it
/// names the test. Plain `high`/`low` count only as a label (with `:`).
static CATEGORY_LIMIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?ix)^\s*[(\[*-]?\s*(?:(?:{CATEGORY})\w*\s*:?|(?:very\ |muy\ |sehr\ |très\ |molto\ |zeer\ )?(?:high|low|alto|bajo|hoch|niedrig|élevé|bas|alta|baixo|hoog|laag)\s*:)
        \s*(?:[<>≤≥]=?|from|between|de|entre|von|zwischen)?\s*\d"
    ))
    .unwrap()
});

/// A line of category names only (`Normal   Prediabetes   Diabetes`): the header of an
/// interpretation table, whose rows follow it up to a blank line.
static CATEGORY_WORD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?ix)\b(?:{CATEGORY}|normal|normale?|normaal|high|low)\b")).unwrap());

/// A category name of its own (not `normal`, `high` or `low`, which also head flag and
/// limit columns).
static STRONG_CATEGORY: LazyLock<Regex> = LazyLock::new(|| Regex::new(&format!(r"(?ix)\b(?:{CATEGORY})\b")).unwrap());

/// Category words of interpretation tables (`Desirable < 200`, `Prediabetes 5.7-6.4`).
static INTERPRETATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)^\s*[(\[*-]?\s*(?:desirable|borderline|optimal|near\ optimal|above\ optimal|very\ high|high\ risk|low\ risk
        |moderate\ risk|intermediate\ risk|average\ risk|increased\ risk|prediabetes|pre-diabetes|diabetes|deficien\w*
        |insufficien\w*|sufficien\w*|adequate|elevated\ risk|interpretation|category|risk|stage|grade|euthyroid
        |wünschenswert|grenzwertig|optimal|erhöhtes\ risiko|mangel|souhaitable|limite|risque|carence|deseable|límite
        |riesgo|deficiencia|desiderabile|rischio|carenza|wenselijk|grenswaarde|risico|tekort)\b",
    )
    .unwrap()
});

/// Where a trend's earlier value is written: `from 128` (… to 96), `previously 120`,
/// `(was 4.1)`, `compared with 5.1`, `vs 4.2`, `peaked at 286`, `initially 168`, `on
/// admission 7.8`, `128 → 96`, a value dated in the past (`5.9 mmol/L last month`, `126 in
/// June`, `3 weeks ago`, with its unit), and the same in German, French, Spanish, Italian,
/// Dutch and Portuguese. The match covers the earlier value, which is blanked out before the
/// model reads the candidate. (`peak` alone is no such word: drug monitoring reports peak
/// levels.)
static EARLIER_VALUE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?ix)
        (?P<a>(?:(?:\b(?:from|previously|previous|prior|earlier|baseline|last|compared\ (?:with|to)|vs\.?|versus|vorher|zuvor
            |vorwert|précédemment|auparavant|antérieurement|anteriormente|previamente|precedentemente|eerder|voorheen
            |peaked|highest|lowest|worst)
            | (?:{EARLY_TIME}))
            (?:\ (?:of|value|result|was|at|being|à|a|de|di|bei|op|em|von|van))?:?
          | \(\s*(?:was|previously|prev\.?|prior))
          \s+[<>]?\d+(?:[.,]\d+)?)
        | (?P<b>\b(?:von|de|da|van|desde)\s+[<>]?\d+(?:[.,]\d+)?)(?:\s*\S+)?\s+(?:auf|à|a|al|naar|para|to)\s+[<>]?\d
        | (?P<c>[<>]?\d+(?:[.,]\d+)?\s*(?:→|->|=>|⟶))\s*[<>]?\d
        | (?P<d>[<>]?\d+(?:[.,]\d+)?(?:\s*[^\s\d,;()][^\s,;()]*)?)\s+(?:last\ (?:week|month|year|time|visit)|yesterday
            |(?:\d+|a|one|two|three|six)\ (?:days?|weeks?|months?|years?)\ ago
            |in\ (?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\b|at\ baseline|on\ admission
            |letzte[nr]?\ (?:woche|monat|jahr)|im\ vormonat|vor\ \d+\ (?:tagen|wochen|monaten)
            |le\ mois\ dernier|la\ semaine\ dernière|il\ y\ a\ \d+|el\ mes\ pasado|hace\ \d+
            |il\ mese\ scorso|vorige\ (?:week|maand))"
    ))
    .unwrap()
});

/// Byte offsets where clauses start, in order: after each `;`, `:`, sentence end or blank
/// line (found once per document).
fn clause_starts(text: &str) -> Vec<usize> {
    let mut starts: Vec<usize> = CLAUSE_END.find_iter(text).map(|m| m.end()).collect();
    starts.extend(text.match_indices("\n\n").map(|(k, _)| k + 2));
    starts.sort_unstable();
    starts
}

static CLAUSE_END: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[;:]|[.!?]\s").unwrap());

/// Words that date a value to the start of a stay or course, in the lexicon's languages:
/// earlier than a value beside it or named again later, but the result when it is the only
/// one.
const EARLY_TIME: &str = r"\b(?:on|at)\s+(?:admission|presentation|arrival|baseline)\b|\binitial(?:ly)?\b|à\s+l['’]entrée
        |à\s+l['’]admission|à\s+l['’]arrivée|initialement|bei\s+aufnahme|anfangs|zu\s+beginn|al\s+ingreso|inicialmente
        |all['’]ingresso|inizialmente|bij\s+opname|aanvankelijk|na\s+admissão";

static EARLY_MARK: LazyLock<Regex> = LazyLock::new(|| Regex::new(&format!("(?ix){EARLY_TIME}")).unwrap());

/// Words that date a value to the end of a stay or to now (also what opens a phrase that
/// continues the previous one, in segmentation).
pub(super) const LATE_TIME: &str = r"\b(?:at|on)\s+discharge\b|\btoday\b|\bnow\b|\blatest\b|\bmost\s+recent|à\s+la\s+sortie
        |bei\s+entlassung|al\s+alta|alla\s+dimissione|bij\s+ontslag|na\s+alta|aujourd['’]hui|heute|hoy|oggi|vandaag";

static LATE_MARK: LazyLock<Regex> = LazyLock::new(|| Regex::new(&format!("(?ix){LATE_TIME}")).unwrap());

/// Lines that give an earlier result (`Previous result: 4.1`, `Vorwert 3,9`).
static PREVIOUS_LINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)^\s*[(\[]?\s*(?:previous|prior|earlier|last|old|vorwert|vorbefund|vorherige[rs]?|précédent|antérieur|anterior
        |previo|precedente|vorige|eerdere|anterior)\b",
    )
    .unwrap()
});

/// A laboratory unit right after a number (`5.9 mmol/L`, `12 g/dL`, `7.2 x10^9/L`, `34 U/L`):
/// a test that the lexicon does not know is still read when it prints such a unit.
static NUMBER_WITH_LAB_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\d\s*(?:(?:[HL]{1,2}|\*|↑|↓|!)\s+)?(?:[mµunp]?mol/[lmd]?l|[mµunp]?mol/(?:kg|mmol|24\ ?h|d)|[mµunpk]?g/[mdµu]?l|[mµunp]?g/(?:kg|g|24\ ?h|d|mmol)
        |(?:m|k)?i?u/[mµ]?l|[mµ]?iu/[mµ]?l|u/g\ ?hb|x\ ?10\^?\*?\d+/[lµu]?l|10\^?\*?\d+/[lµu]?l|/[nµu]l|/hpf|/lpf|fl\b|pg\b
        |mosm(?:ol)?/kg|meq/l|mg/mmol|ml/min(?:/1\.73\ ?m2)?|kpa\b|mm\ ?hg\b|sec\b|s\b|ratio\b)",
    )
    .unwrap()
});

/// An entry of the analyte lexicon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analyte {
    /// The canonical name.
    pub name: String,
    /// A laboratory test (`true`) or a vital sign, body measurement or input setting.
    pub is_lab_test: bool,
}

/// Laboratory test names and their synonyms (`pipelines/lab-report/analytes.tsv`): rows of
/// `name<TAB>kind<TAB>synonym|synonym|…`, `kind` being `analyte` or `vital`. A synonym
/// matches whole words, ignoring case, except synonyms of at most three characters with an
/// upper-case letter (`K`, `Na`, `Hb`, `PT`), which match only as written.
#[derive(Debug, Clone)]
pub struct Lexicon {
    entries: Vec<Analyte>,
    /// Lower-cased synonyms and, per pattern, its entry.
    folded: AhoCorasick,
    folded_entry: Vec<usize>,
    /// Case-sensitive abbreviations and their entries.
    exact: AhoCorasick,
    exact_entry: Vec<usize>,
}

/// Lower-cases a text character by character, keeping a character whose lower case has
/// another UTF-8 length, so byte offsets in the result are offsets in the input.
fn fold(s: &str) -> String {
    s.chars()
        .map(|c| {
            let mut l = c.to_lowercase();
            match (l.next(), l.next()) {
                (Some(x), None) if x.len_utf8() == c.len_utf8() => x,
                _ => c,
            }
        })
        .collect()
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric()
}

impl Lexicon {
    /// Parses the lexicon file; the error names the line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let (mut folded, mut folded_entry, mut exact, mut exact_entry) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            let [name, kind, synonyms] = cols[..] else {
                return Err(format!("line {}: expected 3 tab-separated columns, found {}", n + 1, cols.len()));
            };
            let is_lab_test = match kind.trim() {
                "analyte" => true,
                "vital" => false,
                other => return Err(format!("line {}: unknown kind {other:?} (analyte or vital)", n + 1)),
            };
            let id = entries.len();
            entries.push(Analyte { name: name.trim().to_string(), is_lab_test });
            let written = synonyms.split('|').map(str::trim).filter(|s| !s.is_empty()).chain([name.trim()]);
            // An abbreviation of capitals is also printed with dots (`V.G.M.`, `M.C.V.`).
            let dotted =
                written.clone().filter(|s| (2..=5).contains(&s.len()) && s.chars().all(|c| c.is_ascii_uppercase()));
            let dotted: Vec<String> = dotted.map(|s| s.chars().flat_map(|c| [c, '.']).collect()).collect();
            for s in written.chain(dotted.iter().map(String::as_str)) {
                if s.chars().count() <= 3 && s.chars().any(char::is_uppercase) {
                    exact.push(s.to_string());
                    exact_entry.push(id);
                } else {
                    folded.push(fold(s));
                    folded_entry.push(id);
                }
            }
        }
        if entries.is_empty() {
            return Err("no entries".into());
        }
        let build = |p: &[String]| AhoCorasick::new(p).map_err(|e| format!("building the matcher: {e}"));
        Ok(Self { entries, folded: build(&folded)?, folded_entry, exact: build(&exact)?, exact_entry })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The leftmost (then longest) whole-word mention of an entry in `text`, with its byte
    /// offset.
    pub fn first(&self, text: &str) -> Option<(usize, &Analyte)> {
        let folded = fold(text);
        let whole_word = |s: &str, a: usize, b: usize| {
            !s[..a].chars().next_back().is_some_and(is_word_char) && !s[b..].chars().next().is_some_and(is_word_char)
        };
        let mut best: Option<(usize, usize, usize)> = None;
        let mut consider = |a: usize, b: usize, entry: usize| {
            if best.is_none_or(|(ba, bb, _)| a < ba || (a == ba && b > bb)) {
                best = Some((a, b, entry));
            }
        };
        for m in self.folded.find_overlapping_iter(&folded) {
            if whole_word(&folded, m.start(), m.end()) {
                consider(m.start(), m.end(), self.folded_entry[m.pattern().as_usize()]);
            }
        }
        for m in self.exact.find_overlapping_iter(text) {
            if whole_word(text, m.start(), m.end()) {
                consider(m.start(), m.end(), self.exact_entry[m.pattern().as_usize()]);
            }
        }
        best.map(|(a, _, e)| (a, &self.entries[e]))
    }
}

/// Decides, for each candidate, whether it is a result.
#[derive(Debug, Clone)]
pub struct Classifier {
    lexicon: Arc<Lexicon>,
}

impl Classifier {
    pub fn new(lexicon: Arc<Lexicon>) -> Self {
        Self { lexicon }
    }

    /// `Ok` when the candidate is a result (its earlier values of a trend blanked out, so the
    /// model reads the current one), else why it is not.
    pub fn classify(&self, c: &mut Candidate) -> Result<(), NonResult> {
        // Durations, days of a stay and a method's year are no values (`no growth at 5 days`,
        // `weaned day 2`, `CKD-EPI 2021`).
        c.text = blank_counts(&c.text);
        let text = c.text.as_str();
        if let Some(reason) = self.unresulted_entry(text) {
            return Err(reason);
        }
        // Blanking earlier values (below) keeps every offset and touches no test name, so the
        // lexicon is searched once.
        let analyte = self.lexicon.first(text).map(|(at, a)| (at, a.is_lab_test));
        // A line that starts with a test name is not a label line (`Total protein`,
        // `Charge` of a German lot number aside).
        let leading = text.len() - text.trim_start().len();
        let starts_with_test = analyte.is_some_and(|(at, lab)| lab && at == leading);
        if (METADATA.is_match(text) && !starts_with_test) || MONEY.is_match(text) {
            return Err(NonResult::Metadata);
        }
        if TARGET.is_match(text) || target_label(text) {
            return Err(NonResult::Target);
        }
        if CATEGORY_LIMIT.is_match(text) {
            return Err(NonResult::Interpretation);
        }
        if PREVIOUS_LINE.is_match(text) {
            return Err(NonResult::Previous);
        }
        let masked = blank_earlier_values(text);
        // A value dated on admission with no later one beside it (`Hemoglobin was 8.7 g/dL on
        // admission`) is this stay's result, kept as printed.
        let admission_only = !has_value_number(&masked) && EARLY_MARK.is_match(text);
        if masked != c.text && !admission_only {
            if !has_value_number(&masked) && !super::segment::looks_like_result(&masked) {
                return Err(NonResult::Previous);
            }
            c.text = masked;
        }
        // A value of 6.5 % or greater, 25 to 50 nmol/L: limits of an interpretation, no value.
        if THRESHOLD.is_match(&c.text) {
            return Err(NonResult::Interpretation);
        }
        match analyte {
            None if INTERPRETATION.is_match(&c.text) => Err(NonResult::Interpretation),
            _ if !has_value_outside_ranges(&c.text) => Err(NonResult::NoValue),
            Some((_, true)) => Ok(()),
            Some((_, false)) => Err(NonResult::VitalSign),
            None if NUMBER_WITH_LAB_UNIT.is_match(&c.text) => Ok(()),
            None => Err(NonResult::NoAnalyte),
        }
    }

    /// Indices (ascending) of the candidates whose value is an earlier one of a test the
    /// document gives again: a value dated to the start of the stay or course, in the
    /// candidate or earlier in its clause (`on admission`, `initially`, `à l'entrée`, `bei
    /// Aufnahme`), when another candidate names the same lexicon entry without such a date.
    /// A value beside its later one in the same candidate is blanked by `classify` instead.
    pub fn earlier_mentions(&self, text: &str, kept: &[Candidate]) -> Vec<usize> {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let byte_at = |at: usize| chars.get(at).map_or(text.len(), |&(b, _)| b);
        let starts = clause_starts(text);
        let early: Vec<Option<(&str, bool)>> = kept
            .iter()
            .map(|c| {
                let (_, analyte) = self.lexicon.first(&c.text)?;
                let start = byte_at(c.start);
                let clause_start = starts[..starts.partition_point(|&s| s <= start)].last().copied().unwrap_or(0);
                let clause = &text[clause_start..start];
                let dated_early =
                    (EARLY_MARK.is_match(clause) || EARLY_MARK.is_match(&c.text)) && !LATE_MARK.is_match(&c.text);
                Some((analyte.name.as_str(), dated_early))
            })
            .collect();
        (0..kept.len())
            .filter(|&k| {
                let Some((name, true)) = early[k] else { return false };
                early.iter().any(|e| matches!(e, Some((n, false)) if *n == name))
            })
            .collect()
    }

    /// Whether a test name read by a parser names a vital sign, body measurement or input
    /// setting of the lexicon (its first mention) rather than a laboratory test.
    pub fn names_vital_sign(&self, test: Option<&str>) -> bool {
        test.and_then(|t| self.lexicon.first(t)).is_some_and(|(_, a)| !a.is_lab_test)
    }

    /// A line that names a test and says it has no result (`Potassium   pending`): the kind
    /// of entry, when no value is printed before the status words.
    pub fn unresulted_entry(&self, text: &str) -> Option<NonResult> {
        let reason = unresulted(text)?;
        let at =
            [&*PENDING, &*NOT_REPORTED, &*CANCELLED].iter().filter_map(|r| r.find(text)).map(|m| m.start()).min()?;
        (!has_value_number(&text[..at])).then_some(reason)
    }

    /// Lines outside claimed spans and candidates that name a test and say it has no result
    /// (no value, so segmentation did not make them candidates).
    pub fn unresulted_lines(&self, text: &str, claimed: &[Span], candidates: &[Candidate]) -> Vec<SetAside> {
        let mut out = Vec::new();
        for line in super::lines::split_lines(text) {
            let (start, end, t) = line.trimmed();
            if t.is_empty()
                || super::lines::overlaps_any(claimed, start, end)
                || candidates.iter().any(|c| c.start < end && start < c.end)
            {
                continue;
            }
            if let Some(reason) = self.unresulted_entry(t) {
                if self.lexicon.first(t).is_some_and(|(at, a)| a.is_lab_test && at < t.len()) {
                    out.push(SetAside { reason, start, end });
                }
            }
        }
        out
    }
}

/// The rows of interpretation tables headed by a line of category names only (`Normal
/// Prediabetes   Diabetes`, at least two of them and no digit): character spans of the lines
/// from the header to the next blank line.
pub fn interpretation_tables(text: &str) -> Vec<Span> {
    let lines = super::lines::split_lines(text);
    let mut out = Vec::new();
    let mut k = 0;
    while k < lines.len() {
        let t = lines[k].text;
        let words = t.split_whitespace().count();
        let categories = CATEGORY_WORD.find_iter(t).count();
        let strong = STRONG_CATEGORY.is_match(t);
        let header = categories >= 2
            && strong
            && !t.chars().any(|c| c.is_ascii_digit())
            && CATEGORY_WORD.replace_all(t, " ").split_whitespace().count() * 2 < words;
        if !header {
            k += 1;
            continue;
        }
        let start = lines[k].start;
        let mut end = lines[k].char_end();
        k += 1;
        while k < lines.len() && !lines[k].text.trim().is_empty() {
            end = lines[k].char_end();
            k += 1;
        }
        out.push((start, end));
    }
    out
}

/// A date opening a line: `02/09/2026`, `2.9.26`, `2026-09-02`.
static LEADING_DATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^\s*(?:(\d{1,2})[./-](\d{1,2})[./-](\d{2}|\d{4})|(\d{4})-(\d{1,2})-(\d{1,2})|(\d{1,2})[-\s]([A-Za-z]{3})[a-z]*\.?[-\s](\d{2}|\d{4}))\b",
    )
    .unwrap()
});

/// The date opening a line: its year and two other numbers, day and month in an order to
/// be told (`iso` dates are year-month-day).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LeadingDate {
    year: u32,
    a: u32,
    b: u32,
    iso: bool,
}

impl LeadingDate {
    fn read(line: &str) -> Option<Self> {
        let c = LEADING_DATE.captures(line)?;
        let n = |i: usize| c.get(i).and_then(|m| m.as_str().parse::<u32>().ok());
        let year = |y: u32| if y < 100 { 2000 + y } else { y };
        if let Some(name) = c.get(8) {
            // `02-Dec-2026`: the month named, so the order is known (kept as year-month-day).
            let month = super::numbers::month_number(name.as_str())?;
            return Some(Self { year: year(n(9)?), a: month, b: n(7)?, iso: true });
        }
        match (n(1), n(2), n(3)) {
            (Some(a), Some(b), Some(y)) => Some(Self { year: year(y), a, b, iso: false }),
            _ => Some(Self { year: n(4)?, a: n(5)?, b: n(6)?, iso: true }),
        }
    }

    /// (year, month, day), the first number read as the day when `day_first`.
    fn key(self, day_first: bool) -> (u32, u32, u32) {
        if day_first && !self.iso {
            (self.year, self.b, self.a)
        } else {
            (self.year, self.a, self.b)
        }
    }
}

impl Classifier {
    /// The rows of a result history, one row per date (`02/09/2026   INR   1.7`): of the
    /// rows of one test whose lines open with a date, all but those of the latest date are
    /// earlier values. `rows` are (line text, test name) pairs; the answer is their indices
    /// of earlier values. Day and month are read in the order that makes every date valid
    /// (day first when both do). Tests are told apart by their lexicon entry.
    pub fn earlier_dated(&self, rows: &[(&str, Option<&str>)]) -> Vec<usize> {
        let dated: Vec<(usize, LeadingDate, String)> = rows
            .iter()
            .enumerate()
            .filter_map(|(k, (line, test))| {
                let date = LeadingDate::read(line)?;
                let test = test.filter(|t| !t.trim().is_empty())?;
                let key = self.lexicon.first(test).map_or_else(|| test.trim().to_lowercase(), |(_, a)| a.name.clone());
                Some((k, date, key))
            })
            .collect();
        let day_first = !dated.iter().any(|(_, d, _)| !d.iso && d.b > 12 && d.a <= 12);
        // Per test: its latest date and how many dated rows it has.
        let mut latest: BTreeMap<&str, ((u32, u32, u32), usize)> = BTreeMap::new();
        for (_, d, key) in &dated {
            let e = latest.entry(key.as_str()).or_insert((d.key(day_first), 0));
            *e = (e.0.max(d.key(day_first)), e.1 + 1);
        }
        dated
            .iter()
            .filter(|(_, d, key)| latest[key.as_str()].1 >= 2 && d.key(day_first) < latest[key.as_str()].0)
            .map(|&(k, _, _)| k)
            .collect()
    }
}

/// A number of days, hours, weeks, months or years after a preposition (`at 5 days`, `over
/// 12 hours`, `nach 3 Tagen`), or after the word for a day, week, cycle or visit (`day 2`,
/// `Tag 3`): a duration or a time point, in the lexicon's languages; a count of blood
/// products (`2 units`, `2 unità di emazie`); a dose with its frequency (`210 mg twice
/// daily`, `1 g par jour`).
static DURATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:at|after|for|over|within|in|since|during|until|by|nach|seit|für|innerhalb|après|pendant|depuis|en|à
            |tras|durante|desde|a\ los|dopo|per|entro|da|na|gedurende|binnen|após|em)\s+(?P<n>\d+)\s+
            (?:days?|hours?|hrs?|weeks?|wks?|months?|years?|minutes?|mins?|tagen?|stunden?|wochen?|monaten?|jahren?|jours?
            |heures?|semaines?|mois|ans|días|dias|horas?|semanas?|meses|años|anos|giorni|ore|settimane|mesi|anni|dagen
            |uur|weken|maanden|jaren)\b
        | \b(?:day|week|cycle|visit|tag|woche|jour|semaine|día|dia|semana|giorno|settimana|dag)\s+(?P<d>\d{1,3})\b
        | (?P<u>\d+)\s+(?:units?|unità|unidades|unités|einheiten|eenheden|bags?|pools?)\b
        | (?P<m>\d+(?:[.,]\d+)?)\s*(?:mg|g|mcg|µg|micrograms?|iu|ml|mmol)\s+(?:once|twice|three\ times|four\ times|daily
            |bd|b\.d\.|tds|t\.d\.s\.|qds|od|o\.d\.|nocte|mane|weekly|at\ night|per\ day|a\ day|every|prn|stat|fois\ par
            |par\ jour|täglich|taeglich|al\ día|al\ dia|al\ giorno|per\ dag|por\ dia)\b",
    )
    .unwrap()
});

/// The year of a method or guideline after its acronym (`CKD-EPI 2021`, `(KDIGO 2012)`),
/// followed by a word or a bracket rather than a unit.
static METHOD_YEAR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b\p{Lu}{2,}(?:-\p{Lu}+)*\s+(?P<y>(?:19|20)\d{2})(?:\s*\)|\s+(?:without|with|equation|formula|criteria|guidelines?|recommendations?|ohne|mit|sans|avec|sin|con|senza|zonder|met|sem)\b)").unwrap()
});

/// `text` with the numbers of [`DURATION`] and [`METHOD_YEAR`] blanked out (same length, so
/// offsets still hold).
fn blank_counts(text: &str) -> String {
    let mut spans: Vec<(usize, usize)> = DURATION
        .captures_iter(text)
        .filter_map(|c| {
            // `45 units/L` is a value with its unit, not a count of blood products.
            let units = c.name("u").filter(|_| !text[c.get(0).expect("the match").end()..].starts_with('/'));
            c.name("n").or(c.name("d")).or(units).or(c.name("m"))
        })
        // `Tag 3,5` is no day: a decimal number after the word.
        .filter(|m| {
            let mut next = text[m.end()..].chars();
            !(matches!(next.next(), Some('.' | ',')) && next.next().is_some_and(|c| c.is_ascii_digit()))
        })
        .chain(METHOD_YEAR.captures_iter(text).filter_map(|c| c.name("y")))
        .map(|m| (m.start(), m.end()))
        .collect();
    if spans.is_empty() {
        return text.to_string();
    }
    spans.sort_unstable();
    let mut out = text.to_string();
    for (a, b) in spans.into_iter().rev() {
        out.replace_range(a..b, &" ".repeat(b - a));
    }
    out
}

/// Blanks out (with spaces, so offsets still hold) the earlier values of a trend.
pub fn blank_earlier_values(text: &str) -> String {
    EARLIER_VALUE
        .replace_all(text, |caps: &regex::Captures| {
            let whole = caps.get(0).expect("the match");
            let earlier = ["a", "b", "c", "d"].iter().find_map(|g| caps.name(g)).expect("one alternative matched");
            let blank = " ".repeat(earlier.as_str().chars().count());
            let (a, b) = (earlier.start() - whole.start(), earlier.end() - whole.start());
            format!("{}{blank}{}", &whole.as_str()[..a], &whole.as_str()[b..])
        })
        .into_owned()
}

/// The status of a result line: corrected or preliminary when the line says so, else the
/// document's.
pub fn line_status(text: &str, document: ResultStatus) -> ResultStatus {
    if CORRECTED.is_match(text) {
        ResultStatus::Corrected
    } else if PRELIMINARY.is_match(text) {
        ResultStatus::Preliminary
    } else {
        document
    }
}

/// What the report says of its results' status outside result lines: titles and section
/// headings (`PRELIMINARY REPORT`, `MAGNESIUM - Preliminary result`, `Final result`), in
/// document order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusMarks(Vec<(usize, ResultStatus)>);

impl StatusMarks {
    /// The marks of `text`: lines that say preliminary or final and hold no result.
    pub fn read(text: &str, result_spans: &[Span]) -> Self {
        let mut marks = Vec::new();
        for line in super::lines::split_lines(text) {
            let (start, end, t) = line.trimmed();
            if result_spans.iter().any(|&(s, e)| s < end && start < e) {
                continue;
            }
            if PRELIMINARY.is_match(t) {
                marks.push((start, ResultStatus::Preliminary));
            } else if FINAL.is_match(t) {
                marks.push((start, ResultStatus::Final));
            }
        }
        Self(marks)
    }

    /// The status of a result at `offset` whose own row or line says none: the last mark
    /// before it (its section's heading or the report's title); a result before every mark
    /// is preliminary when the first mark says so (a report that calls itself preliminary
    /// below its results), else final.
    pub fn at(&self, offset: usize) -> ResultStatus {
        match self.0.iter().rev().find(|&&(at, _)| at <= offset) {
            Some(&(_, status)) => status,
            None => self.0.first().map_or(ResultStatus::Final, |&(_, status)| status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEXICON: &str = include_str!("../../../../pipelines/lab-report/analytes.tsv");

    fn classifier() -> Classifier {
        static LEX: LazyLock<Arc<Lexicon>> = LazyLock::new(|| Arc::new(Lexicon::parse(LEXICON).unwrap()));
        Classifier::new(LEX.clone())
    }

    fn verdict(line: &str) -> Result<String, &'static str> {
        let mut c = Candidate { start: 0, end: line.chars().count(), text: line.to_string() };
        classifier().classify(&mut c).map(|()| c.text).map_err(NonResult::as_str)
    }

    #[test]
    fn lexicon_file_loads_and_is_broad() {
        let lex = &classifier().lexicon;
        assert!(lex.len() >= 300, "{} entries", lex.len());
        let entry = |text: &str| lex.first(text).unwrap_or_else(|| panic!("{text}")).1.clone();
        for same in [
            &["Kalium 5,8 mmol/l", "K 4.1", "potassium 4.1", "Potasio 4,1", "potassio 4,1"][..],
            &["Hämoglobin 12,1", "hémoglobine 13", "Hemoglobina 13", "Hb 12", "haemoglobin 120"],
            &["Leucocitos 7,2", "Leukozyten 7,2", "WBC 7.2", "leucocytes 7,2"],
            &["γ-GT 40 U/L", "GGT 40", "gamma-GT 40"],
            &["Kreatinin 1,1", "créatinine 82", "creatinina 1,1", "Creatinine 82"],
        ] {
            let first = entry(same[0]);
            assert!(first.is_lab_test, "{}", same[0]);
            for text in &same[1..] {
                assert_eq!(entry(text), first, "{text}");
            }
        }
        // Abbreviations of capitals printed with dots.
        assert_eq!(entry("V.G.M. ........ 90,7 fL"), entry("MCV 90"));
        // Short mixed-case abbreviations match only as written; words never inside others.
        assert!(lex.first("k").is_none());
        assert!(lex.first("Kaliumchlorid-Infusion").is_none_or(|(_, a)| a.name != "Potassium"));
    }

    #[test]
    fn parse_errors_name_the_line() {
        assert!(Lexicon::parse("# c\nSodium\tanalyte\n").unwrap_err().contains("line 2"));
        assert!(Lexicon::parse("Sodium\tlab\tNa").unwrap_err().contains("unknown kind"));
        assert!(Lexicon::parse("# only\n").is_err());
    }

    #[test]
    fn results_are_kept() {
        for line in [
            "Sodium 139 mmol/L (135-145)",
            "Kalium 5,8 mmol/l 3,5-5,1 H",
            "Créatinine ........ 82 µmol/L (45-90)",
            "WBC       11.8     x10^9/L  4.0-11.0   H",
            "Glucose              Negative         Negative",
            "Zonulin 61 ng/mL",
            "Total protein 72 g/L (60-80)",
            "Total cholesterol 5.2 mmol/L",
            "Leukocytes   5-10 /hpf   0-5",
            "RBC  0-2 /HPF",
            "Hb 13.2 12.0-15.5",
            "CRP   < 4 mg/L   < 5",
            "Urine protein   Trace   Negative",
            "Triglicerydy     156    H       mg/dl        < 150",
        ] {
            assert!(verdict(line).is_ok(), "{line}: {:?}", verdict(line));
        }
    }

    #[test]
    fn non_results_are_set_aside_with_their_reason() {
        for (line, reason) in [
            ("Potassium            Pending", "pending"),
            ("Lipase   Haemolysed sample - not performed   13-60", "cancelled"),
            ("Ferritin: see comment", "not_reported"),
            ("Serial no: 12345678", "metadata"),
            ("Software version 4.2.1", "metadata"),
            ("TOTAL  EUR 24.50", "metadata"),
            ("Total: 3 tests", "metadata"),
            ("Therapeutic range: 10-20 mg/L", "target"),
            ("Borderline high   200-239", "interpretation"),
            ("Blood pressure 132/84 mmHg", "vital_sign"),
            ("Weight 82 kg", "vital_sign"),
            ("Room 12 on floor 3", "metadata"),
            ("Flat 4 Block 7", "no_analyte"),
            ("Target INR range: 2.0 - 3.0", "target"),
            ("TSH    w realizacji    0,27 - 4,20", "no_value"),
            ("Vitamin D: 25 to 50 nmol/L indicates insufficiency", "no_value"),
            ("a hemoglobin A1c value of 6.5% or greater", "interpretation"),
            ("LDL cholesterol 160 mg/dL and above", "interpretation"),
            ("Vitamin D status      25-OH Vitamin D", "no_value"),
            ("   Déficit: < 20 ng/mL", "interpretation"),
            ("Posible toxicidad: > 150 ng/mL", "interpretation"),
            ("Very high: >= 190 mg/dL", "interpretation"),
            ("Optimal >= 30 ng/mL", "interpretation"),
        ] {
            assert_eq!(verdict(line), Err(reason), "{line}");
        }
    }

    #[test]
    fn durations_days_and_method_years_are_no_values() {
        assert_eq!(verdict("Blood cultures: no growth at 5 days").unwrap(), "Blood cultures: no growth at   days");
        assert_eq!(verdict("Organ support: noradrenaline weaned day 2"), Err("no_value"));
        assert_eq!(verdict("eGFR reported using CKD-EPI 2021 without ethnicity coefficient"), Err("no_value"));
        // A value after the same words stays (`LDH 2010 U/L`, `Tag 3,5`), and a peak level
        // of drug monitoring is a result.
        assert_eq!(verdict("LDH 2010 U/L").unwrap(), "LDH 2010 U/L");
        assert_eq!(verdict("Kalium am Tag 3,5 mmol/l").unwrap(), "Kalium am Tag 3,5 mmol/l");
        assert_eq!(verdict("Gentamicin peak 8.2 mg/L").unwrap(), "Gentamicin peak 8.2 mg/L");
        assert_eq!(verdict("Glucose after 2 hours 8.9 mmol/L").unwrap(), "Glucose after   hours 8.9 mmol/L");
        // `Total` opening a name the lexicon lacks, with a lab unit, is no receipt line.
        assert!(verdict("Total Kolesterol   238   mg/dL   0 - 200").is_ok());
        assert_eq!(verdict("Total 3 items"), Err("metadata"));
        // Blood products given, and thresholds named before their number.
        assert_eq!(verdict("dopo trasfusione di 2 unità di emazie concentrate"), Err("no_value"));
        assert_eq!(verdict("Iron supplements started: ferrous fumarate 210 mg twice daily"), Err("no_value"));
        assert_eq!(verdict("ALP 145 units/L").unwrap(), "ALP 145 units/L");
        assert_eq!(verdict("Phototherapy threshold at 62 hours: 300 umol/L"), Err("target"));
        assert!(verdict("Troponin T (99th percentile cut-off 14 ng/L)   45 ng/L").is_ok());
        // An admission value before the discharge one, in Italian.
        assert_eq!(
            verdict("emoglobina all'ingresso 7,8 g/dL, alla dimissione 10,1 g/dL").unwrap(),
            "emoglobina                  g/dL, alla dimissione 10,1 g/dL"
        );
        let cl = classifier();
        assert!(cl.names_vital_sign(Some("Weight (kg)")) && cl.names_vital_sign(Some("Pulse (/min)")));
        assert!(!cl.names_vital_sign(Some("Haemoglobin")) && !cl.names_vital_sign(None));
    }

    #[test]
    fn earlier_values_of_a_trend_are_blanked() {
        let got = verdict("haemoglobin has fallen from 128 to 96 g/L").unwrap();
        assert_eq!(got, "haemoglobin has fallen          to 96 g/L");
        assert_eq!(
            verdict("Creatinine 180 umol/L (previously 120)").unwrap(),
            "Creatinine 180 umol/L                )"
        );
        assert_eq!(verdict("Hb 128 -> 96 g/L").unwrap(), "Hb        96 g/L");
        assert_eq!(verdict("Kreatinin von 1,4 auf 1,9 mg/dl").unwrap(), "Kreatinin         auf 1,9 mg/dl");
        assert_eq!(verdict("previous potassium 4.1"), Err("previous"));
        assert_eq!(
            verdict("potassium was 5.9 mmol/L last month but is 5.1 mmol/L today").unwrap(),
            "potassium was            last month but is 5.1 mmol/L today"
        );
        assert_eq!(
            verdict("creatinine rose from 98 umol/L in March to 126 in June and is 158 umol/L today").unwrap(),
            "creatinine rose         umol/L in March to     in June and is 158 umol/L today"
        );
        assert_eq!(verdict("ferritin 12 ug/L three months ago"), Err("previous"));
        // The admission value is the result when nothing later stands beside it.
        let line = "Hemoglobin was 8.7 g/dL on admission (reference 13.5-17.5)";
        assert_eq!(verdict(line).unwrap(), line);
        assert_eq!(
            verdict("Hb 8.7 g/dL on admission, 10.2 g/dL at discharge").unwrap(),
            "Hb          on admission, 10.2 g/dL at discharge"
        );
        // A unit with digits goes with its earlier value; a peak is an earlier value too.
        assert_eq!(
            verdict("white cell count 19.4 x10^9/L on admission, 8.2 x10^9/L").unwrap(),
            "white cell count              on admission, 8.2 x10^9/L"
        );
        assert_eq!(
            verdict("CRP peaked at 286 mg/L and was 41 mg/L at discharge").unwrap(),
            "CRP               mg/L and was 41 mg/L at discharge"
        );
    }

    #[test]
    fn interpretation_tables_under_a_header_of_categories() {
        let text = "Glucose 131 mg/dL\n\n                Normal     Prediabetes    Diabetes\n\
Fasting glucose  <100       100-125        >=126 mg/dL\nHbA1c            <5.7       5.7-6.4        >=6.5 %\n\n\
Sodium 139 mmol/L\nHigh  Low\n";
        let spans = interpretation_tables(text);
        assert_eq!(spans.len(), 1);
        let (s, e) = spans[0];
        let block: String = text.chars().skip(s).take(e - s).collect();
        assert!(block.trim_start().starts_with("Normal") && block.ends_with(">=6.5 %"), "{block:?}");
        // A flag header is no table of categories; a result line is no header.
        assert!(interpretation_tables("Result   Flag\nHigh\nGlucose 7.1 high\n").is_empty());
    }

    #[test]
    fn result_histories_keep_the_latest_date() {
        let rows = [
            ("02/09/2026    INR     1.7         31.5 mg", Some("INR")),
            ("16/09/2026    INR     2.3         35 mg", Some("02/09/2026 INR")),
            ("18/11/2026    INR     2.5", Some("INR")),
            ("18/11/2026    Hb      128 g/L", Some("Hb")),
            ("Potassium 4.1", Some("Potassium")),
        ];
        assert_eq!(classifier().earlier_dated(&rows), vec![0, 1]);
        // Month first when a second number is above 12; ISO dates; a test of one date only.
        let rows = [
            ("11/02/2026 Sodium 139", Some("Sodium")),
            ("09/14/2026 Sodium 141", Some("Na")),
            ("2026-01-05 Potassium 4.1", Some("K")),
            ("2025-12-30 Potassium 4.4", Some("Potassium")),
            ("2026-01-05 Urea 7.1", Some("Urea")),
        ];
        assert_eq!(classifier().earlier_dated(&rows), vec![1, 3]);
        // Months by name (`02-Dec-2026`).
        let rows = [
            ("02-Dec-2026   Serum sodium   139 mmol/L", Some("Serum sodium")),
            ("14-Jun-2026   Serum sodium   137 mmol/L", Some("Serum sodium")),
        ];
        assert_eq!(classifier().earlier_dated(&rows), vec![1]);
    }

    #[test]
    fn values_dated_to_admission_give_way_to_later_mentions() {
        let text = "Biologie : à l'entrée, natrémie à 124 mmol/L et kaliémie à 3,1 mmol/L ; à la sortie,\n\
natrémie à 134 mmol/L (N : 136-145) et kaliémie à 4,0 mmol/L.\nGlucose on admission 9.1 mmol/L.\n";
        let kept: Vec<Candidate> = [
            "natrémie à 124 mmol/L",
            "kaliémie à 3,1 mmol/L",
            "natrémie à 134 mmol/L (N : 136-145)",
            "kaliémie à 4,0 mmol/L",
            "Glucose on admission 9.1 mmol/L",
        ]
        .iter()
        .map(|s| {
            let start = text[..text.find(s).unwrap()].chars().count();
            Candidate { start, end: start + s.chars().count(), text: s.to_string() }
        })
        .collect();
        // The glucose of admission is the only one: it stays.
        assert_eq!(classifier().earlier_mentions(text, &kept), vec![0, 1]);
    }

    #[test]
    fn unresulted_labels_are_the_summarys() {
        let ours = [NonResult::Pending, NonResult::Cancelled, NonResult::NotReported, NonResult::Withdrawn];
        assert_eq!(ours.map(NonResult::as_str), medbatch_schemas::job::UNRESULTED_KINDS);
    }

    #[test]
    fn statuses_are_read() {
        assert_eq!(read_status("F"), Some(Ok(ResultStatus::Final)));
        assert_eq!(read_status("vorläufig"), Some(Ok(ResultStatus::Preliminary)));
        assert_eq!(read_status("Corrected"), Some(Ok(ResultStatus::Corrected)));
        assert_eq!(read_status("X"), Some(Err(NonResult::Cancelled)));
        assert_eq!(read_status("in attesa"), Some(Err(NonResult::Pending)));
        assert_eq!(read_status("storniert"), Some(Err(NonResult::Cancelled)));
        assert_eq!(read_status("7.2"), None);
        assert_eq!(line_status("Troponin 27 ng/L AMENDED", ResultStatus::Final), ResultStatus::Corrected);
        let report = "PRELIMINARY REPORT\nSodium 139 mmol/L\n";
        assert_eq!(StatusMarks::read(report, &[(19, 36)]).at(19), ResultStatus::Preliminary);
        assert_eq!(StatusMarks::read("Sodium 139 mmol/L prelim\n", &[(0, 24)]).at(0), ResultStatus::Final);
        // Section headings: each section's status holds until the next heading that says one.
        let report = "CHEMISTRY - Final result\nSodium 139\nMAGNESIUM - Preliminary result\nMagnesium 0.7\n";
        let marks = StatusMarks::read(report, &[(25, 35), (67, 80)]);
        assert_eq!((marks.at(25), marks.at(67)), (ResultStatus::Final, ResultStatus::Preliminary));
        // A report calling itself preliminary below its results.
        let report = "Sodium 139\nThis report is preliminary.\n";
        assert_eq!(StatusMarks::read(report, &[(0, 10)]).at(0), ResultStatus::Preliminary);
    }

    #[test]
    fn unresulted_lines_are_found_outside_candidates() {
        let text = "Sodium 139 mmol/L\nPotassium   pending\nNotes: none pending\n";
        let c = vec![Candidate { start: 0, end: 17, text: "Sodium 139 mmol/L".into() }];
        let got = classifier().unresulted_lines(text, &[], &c);
        assert_eq!(got, vec![SetAside { reason: NonResult::Pending, start: 18, end: 37 }]);
    }
}
