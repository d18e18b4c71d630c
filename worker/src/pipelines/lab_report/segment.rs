//! Segmentation of what parsers left into candidate result lines (prose into phrases).

use super::items::{Candidate, Span};
use super::lines::{overlaps_any, split_lines, Line};
use regex::Regex;
use std::sync::LazyLock;

/// Words that open a line that is not a result: identification, dates, ordering, signature,
/// comment and reference-range notes (English and German), and superseded values of an
/// amended report (`Previously reported as ...`). Words that also begin test names (`Sex
/// hormone-binding globulin`) count only as a label, followed by `:` or `#`.
static NON_RESULT_LINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)^\s*(?:
            (?:patient|pat\.|dob|d\.o\.b|date\ of\ birth|birth\ ?date|mrn|medical\ record|accession
            |specimen|collected|collection|received|reported|report\ date|printed|ordered|ordering
            |requested|requesting|physician|doctor|dr\.|provider|clinician|page|phone|tel|telephone
            |fax|address|verified|signed|electronically|reviewed|released|authori[sz]ed|approved
            |performed|called|comments?|notes?|interpretation|interprétation|interpretación|interpretazione
            |interpretatie|interpretação|beurteilung|disclaimer|footnote|reference
            |ref\.?\ ranges?|previously|previous\ results?|originally|reason\ for
            |probe|eingang|befund|geb\.|geburtsdatum|einsender|auftrag|auftragsnummer|auftrags-nr|seite|kommentar|bemerkung
            |validiert|registration|vorbefund|vorbefunde|vorwerte?|antériorités?|anteriorites?|résultats\ antérieurs
            |resultados\ anteriores|risultati\ precedenti|vorige\ uitslag(?:en)?|prior\ results?|last\ results?)\b
          | (?:name|date|time|location|ward|room|bed|sex|gender|age|account|visit|encounter|order
            |sample|method|methodology|nb|reason|datum|record|hospital|nhs|acc|lab|laboratory
            |department|source|status|priority|prescription|indication|plan|medications?|dose|dosage|regimen
            |treatment|therapy|advice|instructions?|diagnosis|history|allerg(?:y|ies)|material|matériel|materiale
            |drugs?|medicines?|medikation|médicament|médicaments|medicamento|medicamentos|farmaco|farmaci)\s*[:\#]
        )",
    )
    .unwrap()
});

static ADDRESS_WORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(?:street|st\.|road|rd\.|avenue|ave\.?|boulevard|blvd|lane|ln\.|drive|way|suite|floor|p\.?\s?o\.?\s?box|straße|strasse|str\.|weg|platz|gasse)(?:\b|\s|,|$)",
    )
    .unwrap()
});

static PHONE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\(?\+?\d{1,3}\)?[-. ]\(?\d{2,4}\)?[-. ]\d{3,4}[-. ]\d{3,4}\b").unwrap());

/// Dates (`2024-03-12`, `03/12/2024`, `12.03.2024`, `12-Mar-2024`, `Mar 12, 2024`) and
/// clock times with a two-digit hour (`08:15`, so titres like `1:40` survive).
pub(super) static DATE_OR_TIME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)
        \b\d{4}-\d{1,2}-\d{1,2}(?:[T\ ]\d{2}:\d{2}(?::\d{2})?)?\b
        | \b\d{1,2}/\d{1,2}/\d{2,4}\b
        | \b\d{1,2}-\d{1,2}-\d{4}\b
        | \b\d{1,2}\.\d{1,2}\.\d{4}\b
        | \b\d{1,2}[-\ ](?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?[-\ ,]+\d{2,4}\b
        | \b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\ \d{1,2},?\ \d{4}\b
        | \b[0-2]\d:[0-5]\d(?::[0-5]\d)?(?:\s?(?:am|pm|h|uhr)\b)?",
    )
    .unwrap()
});

/// Result words of qualitative tests (urinalysis, serology, microscopy).
pub(super) static QUALITATIVE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:not\s+detected|none\s+seen|non-?reactive|negative|positive|neg|pos|trace|detected|reactive|absent|present
        |few|moderate|many|rare|occasional|yellow|amber|straw|clear|cloudy|hazy|turbid
        |negativ[oae]?|positiv[oae]?|négati(?:f|ve)|positi(?:f|ve)|negatief|positief|no\s+detectad[oa]|detectad[oa]
        |non\s+détecté|détecté|nicht\s+nachweisbar|nachweisbar|non\s+rilevat[oa]|rilevat[oa]|niet\s+aantoonbaar
        |aantoonbaar|no\s+reactiv[oa]|reactiv[oa]|non\s+réacti(?:f|ve)|réacti(?:f|ve)|reaktiv|nicht\s+reaktiv
        |ausente|presente|assente|absente?|spuren|trazas|traces|tracce|sporen
        |immune|non-?immune|not\s+immune|equivocal|indeterminate|inconclusive|immun|nicht\s+immun|immunisée?|inmune
        |not\s+seen|nil\s+seen|not\s+observed|nicht\s+gesehen|non\s+vus?|no\s+se\s+observa|non\s+osservat[oia]
        |négati(?:f|ve)s|positi(?:f|ve)s|no\s+growth|no\s+significant\s+growth|sterile|kein\s+wachstum|steril|stériles?
        |pas\s+de\s+culture
        |sin\s+crecimiento|estéril|nessuna\s+crescita|geen\s+groei|sem\s+crescimento|mixed\s+growth|normal\s+flora
        |no\s+pathogens?\s+isolated|coliforms
        |(?:\p{L}+\s|\p{L}\.\s?)(?:aureus|epidermidis|lugdunensis|saprophyticus|pneumoniae|pyogenes|agalactiae|anginosus|coli
        |faecalis|faecium|aeruginosa|influenzae|albicans|glabrata|auris|mirabilis|cloacae|aerogenes|oxytoca|freundii
        |morganii|marcescens|baumannii|maltophilia|enterica|typhi|jejuni|difficile|perfringens|meningitidis|gonorrhoeae
        |tuberculosis|catarrhalis|fragilis|fumigatus|pylori|monocytogenes|spp\.?))\b",
    )
    .unwrap()
});

/// Whether a value is a result word of a qualitative test (`Negative`, `Trace`, `Clear`, a
/// culture's `No growth` or the organism grown, `Streptococcus pneumoniae`, `E. coli`).
pub(super) fn is_qualitative(value: &str) -> bool {
    QUALITATIVE.is_match(value)
}

/// A word: a letter followed by letters or digits (`HbA1c`, `x10`, `Hämoglobin`).
static WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\p{L}[\p{L}\d]*").unwrap());

/// A line that starts with a one-letter analyte and a number (`K 4.1`, `P: 1.1`).
static ONE_LETTER_TEST: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\s*[A-Z]\s*[:=]?\s+[-−]?\d").unwrap());

/// Words that cannot be a test name: units, range and flag vocabulary, small words.
const NOT_TEST_WORDS: &[&str] = &[
    "mg",
    "dl",
    "ml",
    "mmol",
    "µmol",
    "umol",
    "nmol",
    "pmol",
    "mol",
    "meq",
    "iu",
    "miu",
    "fl",
    "pg",
    "ng",
    "µg",
    "ug",
    "mcg",
    "µl",
    "ul",
    "nl",
    "pl",
    "hpf",
    "lpf",
    "min",
    "sec",
    "mm",
    "cm",
    "kg",
    "m2",
    "x10",
    "mosm",
    "mosmol",
    "cells",
    "per",
    "hr",
    "hrs",
    "ref",
    "reference",
    "range",
    "normal",
    "interval",
    "to",
    "and",
    "or",
    "of",
    "the",
    "was",
    "were",
    "is",
    "at",
    "in",
    "on",
    "by",
    "up",
    "high",
    "low",
    "hi",
    "lo",
    "hh",
    "ll",
    "flag",
    "result",
    "results",
    "units",
    "unit",
    "value",
    "critical",
    "abnormal",
    "abn",
    "bis",
];

/// Lines made only of these words are table headers.
const HEADER_WORDS: &[&str] = &[
    "test",
    "tests",
    "name",
    "analyte",
    "component",
    "parameter",
    "result",
    "results",
    "value",
    "units",
    "unit",
    "reference",
    "ref",
    "range",
    "interval",
    "normal",
    "flag",
    "flags",
    "status",
    "comment",
    "comments",
    "previous",
    "specimen",
    "method",
    "your",
    "standard",
];

/// Verbs that report a result in running text (`Potassium was ...`, `sodium remained ...`).
pub(super) const RESULT_VERBS: &[&str] = &[
    "was",
    "were",
    "is",
    "are",
    "has",
    "had",
    "showed",
    "shows",
    "remained",
    "remains",
    "improved",
    "elevated",
    "raised",
    "decreased",
    "increased",
];
/// Other words that mark running text rather than a table or label line, in English and
/// (verbs and conjunctions only: articles and prepositions occur in test names) the other
/// languages of the lexicon.
const PROSE_WORDS: &[&str] = &[
    "noted", "revealed", "the", "with", "which", "and", "but", "et", "est", "était", "avec", "mais", "und", "ist",
    "war", "wurde", "mit", "aber", "fue", "está", "estaba", "pero", "è", "era", "ed", "ma", "werd", "maar", "foi",
    "estava",
];

fn is_prose_word(w: &str) -> bool {
    RESULT_VERBS.contains(&w) || PROSE_WORDS.contains(&w)
}
/// Fewest words for a line to be read as prose.
const PROSE_MIN_WORDS: usize = 6;

/// Words that open a phrase continuing the previous one ("..., below the reference range
/// of 12.0-15.5"); such a phrase is joined to the previous instead of standing alone.
const CONTINUATION_WORDS: &[&str] = &[
    "below",
    "above",
    "within",
    "outside",
    "up",
    "down",
    "from",
    "previously",
    "compared",
    "versus",
    "vs",
    "than",
    "which",
    "consistent",
    "reference",
    "ref",
    "normal",
    "range",
    "rising",
    "falling",
    "unchanged",
    "stable",
    "after",
    "before",
    "on",
    "by",
    "in",
    "at",
    "was",
    "were",
    "is",
    "are",
    "i.e.",
    "e.g.",
    "corrected",
    "improving",
    "improved",
    "recovering",
    "recovered",
    "normalised",
    "normalized",
    "settling",
    "settled",
    "now",
    "then",
    "subsequently",
    "later",
    "dropping",
    "dropped",
    "fell",
    "rose",
    "increasing",
    "decreasing",
    "declining",
    "trending",
    "returning",
    "returned",
    "reaching",
    "to",
    "contrôlée",
    "contrôlé",
    "corrigée",
    "normalisée",
    "kontrolliert",
    "controlada",
    "controllata",
];
/// A phrase without a value of at most this many words (a bare test name, as in
/// "Glucose, fasting, was 108") is carried into the next phrase instead of dropped.
const CARRY_MAX_WORDS: usize = 3;

/// Splits clauses of a sentence: `, and`, `and`, `but`, `while`, `whereas` (and their
/// French, German, Spanish, Italian and Dutch words), commas followed by a space (decimal
/// commas have none) and semicolons.
static PHRASE_SPLIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i),?\s+(?:and|but|while|whereas|et|mais|und|aber|sowie|y|pero|ma|maar)\s+|,\s+|;\s*").unwrap()
});

fn lowercase_words(s: &str) -> impl Iterator<Item = String> + '_ {
    WORD.find_iter(s).map(|m| m.as_str().to_lowercase())
}

/// A value: a digit that is not part of a date or time, or a qualitative result word.
fn has_value(s: &str) -> bool {
    let without_dates = DATE_OR_TIME.replace_all(s, " ");
    without_dates.chars().any(|c| c.is_ascii_digit()) || QUALITATIVE.is_match(s)
}

/// An abbreviation printed with dots between its capitals (`V.G.M.`, `C.C.M.H.`).
static DOTTED_ABBREVIATION: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b(?:\p{Lu}\.){2,}").unwrap());

fn has_test_word(s: &str) -> bool {
    let stripped = QUALITATIVE.replace_all(s, " ");
    ONE_LETTER_TEST.is_match(s)
        || DOTTED_ABBREVIATION.is_match(s)
        || lowercase_words(&stripped).any(|w| w.chars().count() >= 2 && !NOT_TEST_WORDS.contains(&w.as_str()))
}

pub(super) fn looks_like_result(s: &str) -> bool {
    has_value(s) && has_test_word(s)
}

fn is_header_line(s: &str) -> bool {
    let mut words = lowercase_words(s).peekable();
    words.peek().is_some() && words.all(|w| HEADER_WORDS.contains(&w.as_str()))
}

/// A street name with its abbreviated kind after it, then a comma or the end (`Harbor Rd,`,
/// `Research Park Dr,`): `Dr` here is no doctor.
static STREET_ABBREVIATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\p{Lu}\p{Ll}+\s(?:Rd|Dr|St|Ave|Blvd|Ln|Hwy|Pkwy)\.?(?:,|\s*$)").unwrap());

fn is_address_line(s: &str) -> bool {
    PHONE.is_match(s)
        || (s.trim_start().starts_with(|c: char| c.is_ascii_digit())
            && (ADDRESS_WORD.is_match(s) || STREET_ABBREVIATION.is_match(s)))
}

fn is_non_result_line(s: &str) -> bool {
    NON_RESULT_LINE.is_match(s) || is_address_line(s) || is_header_line(s)
}

fn is_prose(s: &str) -> bool {
    let words: Vec<String> = lowercase_words(s).collect();
    // Two sentences on one line (`CRP à 12 mg/L (N < 5). Hémoglobine stable à 11,2 g/dL.`)
    // are running text in any language; a table row has no sentence end inside it.
    words.len() >= PROSE_MIN_WORDS
        && (words.iter().any(|w| is_prose_word(w.as_str())) || sentence_ranges(s.trim()).len() >= 2)
}

/// Whether `next` continues a wrapped prose line `prev`: `prev` does not end a sentence,
/// `next` does not start one, and `next` is not a result line of its own (`pH 6.5`,
/// `eGFR: 52 mL/min` start in lower case too).
fn continues(prev: &str, next: &str) -> bool {
    !prev.trim_end().ends_with(['.', '!', '?', ':', ';'])
        && next.trim_start().starts_with(|c: char| c.is_lowercase() || c.is_ascii_digit() || c == '(')
        && (is_prose(next) || !looks_like_result(next))
}

/// Cuts a document into candidate result lines and phrases, outside the `claimed` spans
/// (character offsets, as returned by the parsers).
///
/// A line is a candidate when it has a value (a digit outside dates and times, or a
/// qualitative word such as negative/trace/detected) and a test-like word (not a unit or
/// range word), and is not a header, identification, date, address, signature, comment or
/// superseded-value line. Multi-column lines stay one candidate. Prose (lines of at least
/// `PROSE_MIN_WORDS` words with verbs or conjunctions, joined with wrapped continuation
/// lines) is split into sentences, then into phrases at `and`/commas/semicolons, so
/// "Potassium was 5.9 mmol/L (3.5-5.1) and sodium 139 mmol/L" gives two candidates.
pub fn segment(text: &str, claimed: &[Span]) -> Vec<Candidate> {
    let lines = split_lines(text);
    let usable = |l: &Line| usable(l, claimed);
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let first = lines[i];
        i += 1;
        if !usable(&first) {
            continue;
        }
        // A footnote and its indented continuation lines: notes on methods and thresholds.
        if let Some(indent) = footnote_indent(first.text) {
            while i < lines.len() && !lines[i].text.trim().is_empty() && indentation(lines[i].text) > indent {
                i += 1;
            }
            continue;
        }
        if is_prose(first.text) {
            let mut last = first;
            while i < lines.len() && usable(&lines[i]) && continues(last.text, lines[i].text) {
                last = lines[i];
                i += 1;
            }
            let block = &text[first.byte_start..last.byte_end()];
            out.extend(prose_candidates(block, first.start));
        } else {
            let (start, mut end, t) = first.trimmed();
            if !looks_like_result(t) {
                if let Some((c, next)) = stacked_result(&lines, i - 1, claimed) {
                    out.push(c);
                    i = next;
                }
                continue;
            }
            // A value printed alone, its unit and range on the lines below: one candidate,
            // the line breaks and indentation as spaces (offsets still map onto the text).
            let mut text = t.to_string();
            if NUMBER_AT_END.is_match(t) {
                // A header-like line (`Normal: 0 - 34`) may carry the range here.
                while i < lines.len()
                    && !lines[i].text.trim().is_empty()
                    && !overlaps_any(claimed, lines[i].start, lines[i].char_end())
                    && !NON_RESULT_LINE.is_match(lines[i].text)
                    && continuation(lines[i].text)
                    && !RANGE_IN.is_match(&text[t.len()..])
                {
                    let (_, next_end, _) = lines[i].trimmed();
                    text.push_str(&" ".repeat(lines[i].start - end));
                    text.extend(lines[i].text.chars().take(next_end - lines[i].start));
                    end = next_end;
                    i += 1;
                }
            }
            if text.len() > t.len() {
                out.push(Candidate { start, end, text });
            } else {
                out.extend(columns(Candidate { start, end, text }).into_iter().flat_map(list_items));
            }
        }
    }
    out
}

/// The indentation of a footnote line: one that opens with a footnote mark (`¹`, `†`, or `*`
/// before a word in lower case) and then text. `None` for other lines; a line opening
/// with `*` and a test name is a flagged result (`*Potassium  6.8`).
fn footnote_indent(line: &str) -> Option<usize> {
    let t = line.trim_start();
    let indent = line.len() - t.len();
    let rest = if let Some(r) = t.strip_prefix(|c: char| super::items::is_footnote_mark(c) && c != '*') {
        r.trim_start_matches(super::items::is_footnote_mark)
    } else if let Some(r) = t.strip_prefix('*') {
        let r = r.trim_start();
        if !r.starts_with(|c: char| c.is_lowercase()) {
            return None;
        }
        r
    } else {
        return None;
    };
    rest.trim_start().starts_with(char::is_alphabetic).then_some(indent)
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// A line segmentation may read: not blank, not claimed by a parser, not a header,
/// identification, address or other non-result line.
fn usable(l: &Line, claimed: &[Span]) -> bool {
    !l.text.trim().is_empty() && !overlaps_any(claimed, l.start, l.char_end()) && !is_non_result_line(l.text)
}

/// Most label lines (`Your value`, `Standard range`) between a test name printed alone and
/// its value.
const STACK_MAX_LABELS: usize = 2;
/// Most words of a test name printed alone on a line.
const STACK_MAX_NAME_WORDS: usize = 6;

/// A result printed as a stack of lines, as patient portals and some printouts show them: the
/// test name alone, label lines (`Your value`), the value with its unit, then the range and
/// flag on lines of their own, each possibly under a label (`Standard range`). One candidate
/// from the name to the last line of the stack, its label lines and line breaks blanked with
/// spaces (offsets still map onto the text); the index of the line after it. `None` when the
/// line at `k` does not start such a stack.
fn stacked_result(lines: &[Line], k: usize, claimed: &[Span]) -> Option<(Candidate, usize)> {
    let name = lines[k].text;
    if has_value(name) || !has_test_word(name) || lowercase_words(name).count() > STACK_MAX_NAME_WORDS {
        return None;
    }
    let mut j = k + 1;
    while j < lines.len() && j - k - 1 < STACK_MAX_LABELS && is_header_line(lines[j].text) {
        j += 1;
    }
    let value = lines.get(j)?;
    // The value line holds a value, not just the range (`0 - 32 IU/L` under `Pending`).
    let outside_ranges = super::numbers::RANGE_BOTH.replace_all(value.text, " ");
    if !usable(value, claimed) || !has_value(&outside_ranges) || !continuation(value.text) {
        return None;
    }
    let mut last = j;
    while last + 1 < lines.len() {
        // Label lines, and unit, range or flag lines.
        let l = &lines[last + 1];
        if !(is_header_line(l.text) || (usable(l, claimed) && continuation(l.text))) {
            break;
        }
        last += 1;
    }
    // Trailing label lines belong to the next stack.
    while is_header_line(lines[last].text) {
        last -= 1;
    }
    let (start, _, _) = lines[k].trimmed();
    let mut text = String::new();
    let mut at = start;
    for l in &lines[k..=last] {
        let (s, e, t) = l.trimmed();
        text.push_str(&" ".repeat(s - at));
        if is_header_line(t) {
            text.push_str(&" ".repeat(e - s));
        } else {
            text.push_str(t);
        }
        at = e;
    }
    Some((Candidate { start, end: at, text }, last + 1))
}

/// Whether a line holds only a unit, range or flag (no test name of its own, and a number
/// or a unit or range word): what a report prints below a value printed alone.
fn continuation(next: &str) -> bool {
    !has_test_word(&UNIT_OR_RANGE_WORD.replace_all(next, " ")) && (has_value(next) || UNIT_OR_RANGE_WORD.is_match(next))
}

/// A line ending in a plain number (a value printed without its unit).
static NUMBER_AT_END: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\p{L}.*\s[<>]?\d+(?:[.,]\d+)?$").unwrap());

/// Words that introduce or are a unit or range on a continuation line (`Units:`, `Ref:`,
/// `Normal:`, `mIU/L`), never a test name.
static UNIT_OR_RANGE_WORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:units?|ref(?:erence)?|range|normal|interval|low|high|h|l)\b|\b\S*/\S+").unwrap()
});

/// A reference range already on a line (`3.5-5.1`, `< 5`).
static RANGE_IN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\d\s*[-–]\s*\d|[<>]\s*\d").unwrap());

/// Splits a line holding two results side by side (two tables on one page, or
/// `Na: 131 mmol/L (135-145)      Hb: 96 g/L`) at the wide gap before the second test name:
/// the left part must be a result of its own, and the right part start with a test-like
/// word and hold a value.
fn columns(c: Candidate) -> Vec<Candidate> {
    let chars: Vec<char> = c.text.chars().collect();
    let mut k = 0;
    while k < chars.len() {
        if chars[k] != ' ' {
            k += 1;
            continue;
        }
        let gap_start = k;
        while k < chars.len() && chars[k] == ' ' {
            k += 1;
        }
        if k - gap_start < MIN_COLUMN_GAP || k == chars.len() {
            continue;
        }
        let left: String = chars[..gap_start].iter().collect();
        let right: String = chars[k..].iter().collect();
        let first_word = lowercase_words(&right).next().unwrap_or_default();
        // A one-letter name is an element's symbol printed before its value (`K 5.9`).
        let symbol = SYMBOL_THEN_VALUE.is_match(&right);
        let starts_with_name = right.starts_with(char::is_alphabetic)
            && (first_word.chars().count() >= 2 || symbol)
            && !NOT_TEST_WORDS.contains(&first_word.as_str())
            && !UNIT_OR_RANGE_WORD.is_match(right.split_whitespace().next().unwrap_or(""));
        if starts_with_name
            && looks_like_result(&left)
            && (RANGE_OR_UNIT_AFTER_VALUE.is_match(&left) || ENDS_WITH_VALUE.is_match(&left))
            && looks_like_result(&right)
        {
            let mut out = vec![Candidate { start: c.start, end: c.start + gap_start, text: left }];
            out.extend(columns(Candidate { start: c.start + k, end: c.end, text: right }));
            return out;
        }
    }
    vec![c]
}

/// Splits a line listing results separated by commas or semicolons (`Na 133 (135-145), K
/// 5.6 (3.5-5.3), urea 11.2`) into one candidate per result, when at least two of its
/// pieces name a test and hold a value; a piece without a value (`Glucose, fasting 5.1`)
/// joins the next one, or the last one at the end. Separators inside brackets (`(3.5, 5.1)`)
/// do not split.
fn list_items(c: Candidate) -> Vec<Candidate> {
    let text = c.text.as_str();
    let mut cuts = Vec::new();
    let mut depth = 0i32;
    let bytes: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(b, ch)) in bytes.iter().enumerate() {
        match ch {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | ';' if depth <= 0 && bytes.get(k + 1).is_some_and(|&(_, n)| n == ' ') => cuts.push(b),
            _ => {}
        }
    }
    if cuts.is_empty() {
        return vec![c];
    }
    let mut pieces: Vec<(usize, usize)> = Vec::new();
    let mut from = 0;
    for cut in cuts.into_iter().chain([text.len()]) {
        pieces.push((from, cut));
        from = (cut + 1).min(text.len());
    }
    // A piece's number must stand free: `25-OH` of `Vitamin D, 25-OH, total` is a name.
    // A piece that opens with its value, the end of the stay or a continuation word has no
    // name of its own: a later value of the previous piece's test (`WCC 19.4 on admission,
    // 8.2 on discharge`, `all'ingresso 7,8 g/dL, alla dimissione 10,1 g/dL`, `initialement à
    // 168 µmol/L, contrôlée à 92 µmol/L`).
    let unnamed = |(a, b): (usize, usize)| starts_with_continuation(&text[a..b]);
    let is_result = |(a, b): (usize, usize)| {
        let piece = &text[a..b];
        !unnamed((a, b)) && looks_like_result(piece) && (FREE_NUMBER.is_match(piece) || QUALITATIVE.is_match(piece))
    };
    if pieces.iter().filter(|&&p| is_result(p)).count() < 2 {
        return vec![c];
    }
    // Merge value-less pieces into the next result piece (the last ones into the previous).
    let mut merged: Vec<(usize, usize)> = Vec::new();
    let mut carry: Option<usize> = None;
    for (a, b) in pieces {
        if let (None, Some(last), true) = (carry, merged.last_mut(), unnamed((a, b))) {
            last.1 = b;
            continue;
        }
        let start = carry.take().unwrap_or(a);
        if is_result((a, b)) {
            merged.push((start, b));
        } else {
            carry = Some(start);
        }
    }
    if let (Some(_), Some(last)) = (carry, merged.last_mut()) {
        last.1 = text.len();
    }
    merged
        .into_iter()
        .map(|(a, b)| {
            let piece = &text[a..b];
            let lead = piece.len() - piece.trim_start().len();
            let t = piece.trim();
            let start = c.start + text[..a + lead].chars().count();
            Candidate { start, end: start + t.chars().count(), text: t.to_string() }
        })
        .collect()
}

/// A number not glued to a word by a hyphen or letter (`25-OH`, `B12`, `CA19-9` are names).
static FREE_NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[^\p{L}\d.,\-])\d+(?:[.,]\d+)?(?:$|[^\p{L}\d.,\-]|-\d)").unwrap());

/// The smallest run of spaces that separates two columns of results (both sides must be
/// whole results, so a narrow gap is enough: `Ca adj 2.11 (2.20-2.60) L   PO4 2.31`).
const MIN_COLUMN_GAP: usize = 3;

/// An upper-case letter alone, then the value: `K 5.9`, `P 1.2`.
static SYMBOL_THEN_VALUE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\p{Lu}\s+[<>]?\d").unwrap());

/// A result line ending with its value (and a flag): `Glucose: 5.4`, `Hb 94 L`.
static ENDS_WITH_VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\p{L}.*\s[<>]?\d+(?:[.,]\d+)?(?:\s*(?:[HL]{1,2}|\*|↑|↓))?$").unwrap());

/// A value followed by a unit or range: the left part of a two-column line is a whole result.
static RANGE_OR_UNIT_AFTER_VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\d(?:[.,]\d+)?\s*\S*\s+(?:\S*\d|\S*/\S*|%)|\d\s*[-–]\s*\d").unwrap());

/// Byte ranges of the sentences of `block`: a sentence ends at `.`, `!` or `?` followed by
/// whitespace and then an upper-case letter or the end (so `5.9` and `approx. 5` do not end
/// one).
fn sentence_ranges(block: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let chars: Vec<(usize, char)> = block.char_indices().collect();
    for (k, &(byte, c)) in chars.iter().enumerate() {
        if !matches!(c, '.' | '!' | '?') || !chars.get(k + 1).is_some_and(|&(_, n)| n.is_whitespace()) {
            continue;
        }
        let next_word = chars[k + 1..].iter().find(|&&(_, n)| !n.is_whitespace());
        if next_word.is_none_or(|&(_, n)| n.is_uppercase()) {
            out.push((start, byte + c.len_utf8()));
            start = next_word.map_or(block.len(), |&(b, _)| b);
        }
    }
    if start < block.len() {
        out.push((start, block.len()));
    }
    out
}

/// Byte ranges of the phrases of one sentence, joined per `CONTINUATION_WORDS` and
/// `CARRY_MAX_WORDS`.
fn phrase_ranges(block: &str, (s0, s1): (usize, usize)) -> Vec<(usize, usize)> {
    let sentence = &block[s0..s1];
    let mut pieces = Vec::new();
    let mut at = 0;
    for m in PHRASE_SPLIT.find_iter(sentence) {
        pieces.push((s0 + at, s0 + m.start()));
        at = m.end();
    }
    pieces.push((s0 + at, s1));

    let mut merged: Vec<(usize, usize)> = Vec::new();
    let mut carried: Option<usize> = None;
    for (a, b) in pieces {
        let piece = &block[a..b];
        let current = if let Some(c) = carried.take() {
            (c, b)
        } else if let (Some(last), true) = (merged.last_mut(), starts_with_continuation(piece)) {
            last.1 = b;
            continue;
        } else {
            (a, b)
        };
        let text = &block[current.0..current.1];
        if !has_value(text) && lowercase_words(text).count() <= CARRY_MAX_WORDS {
            carried = Some(current.0);
            continue;
        }
        merged.push(current);
    }
    merged
}

/// A phrase that continues the previous one: it opens with a continuation word, or with a
/// value and no name of its own (`…on admission, 8.2 x10^9/L on discharge`), or with the end
/// of the stay and a value.
fn starts_with_continuation(piece: &str) -> bool {
    let first = piece.split_whitespace().next().unwrap_or("").to_lowercase();
    CONTINUATION_WORDS.contains(&first.as_str())
        || first.trim_start_matches(['<', '>', '≤', '≥']).starts_with(|c: char| c.is_ascii_digit())
        || (LATE_START.is_match(piece.trim_start()) && has_value(piece))
}

/// A phrase opening with the end of a stay (`alla dimissione 10,1 g/dL`, `à la sortie`,
/// `at discharge`): the later value of the previous phrase's test.
static LATE_START: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("(?ix)^(?:{})", super::classify::LATE_TIME)).unwrap());

fn prose_candidates(block: &str, block_start: usize) -> Vec<Candidate> {
    let mut out = Vec::new();
    for sentence in sentence_ranges(block) {
        for (a, b) in phrase_ranges(block, sentence) {
            let piece = &block[a..b];
            let trimmed = piece.trim_start();
            let a = a + (piece.len() - trimmed.len());
            let b = a + trimmed.trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '.' | ',' | ';')).len();
            let t = &block[a..b];
            if !looks_like_result(t) {
                continue;
            }
            let start = block_start + block[..a].chars().count();
            out.push(Candidate { start, end: start + t.chars().count(), text: t.replace(['\r', '\n'], " ") });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::lines::span_text;
    use super::*;

    // ---- segmentation ----

    fn texts(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.text.as_str()).collect()
    }

    #[test]
    fn segment_keeps_result_lines_and_skips_the_rest() {
        let text = "CITY LAB\n1 Example Street, Faketown\nTel: (555) 010-0199\n\
Patient: DEMO, Alpha   DOB: 01/01/1970\nCollected: 2024-03-12 08:15\n\
Test      Result   Units   Reference   Flag\n\
WBC       11.8     x10^9/L  4.0-11.0   H\n\
Hemoglobin: 13.1 g/dL (ref 12.0-15.5)\nK 4.1 mmol/L\n\
Glucose              Negative         Negative\nKetones  1+\n\
12.4 g/dL\n(ref 3.5-5.1)\n2024-03-12\n\
Comment: potassium 5.2 repeated\nVerified by: J. Placeholder 12/03/2024\n\
Previously reported as 6.9 mmol/L\n";
        let c = segment(text, &[]);
        assert_eq!(
            texts(&c),
            vec![
                "WBC       11.8     x10^9/L  4.0-11.0   H",
                "Hemoglobin: 13.1 g/dL (ref 12.0-15.5)",
                "K 4.1 mmol/L",
                "Glucose              Negative         Negative",
                "Ketones  1+",
            ]
        );
    }

    #[test]
    fn segment_splits_result_lists() {
        let text = "Na 133 (135-145), K 5.6 (3.5-5.3), urea 11.2 (2.5-7.8)\nGlucose, fasting 5.1 mmol/L\nHb 104 (130-170); WCC 14.2, raised\n";
        let c = segment(text, &[]);
        assert_eq!(
            texts(&c),
            vec![
                "Na 133 (135-145)",
                "K 5.6 (3.5-5.3)",
                "urea 11.2 (2.5-7.8)",
                "Glucose, fasting 5.1 mmol/L",
                "Hb 104 (130-170)",
                "WCC 14.2, raised"
            ]
        );
        for cand in &c {
            assert_eq!(span_text(text, cand.start, cand.end), cand.text);
        }
    }

    #[test]
    fn segment_skips_footnotes_and_keeps_later_values_with_their_test() {
        let text = "Ferritin ¹   9 ug/L\n¹ Method changed on 01/10/2026; results are not comparable\n  with values 150 - 300 ng/L before.\n\
* outside the thresholds: ALT > 2x upper limit,\n  WBC < 3.5, platelets < 140.\n*Potassium 6.8 mmol/L\n\
Bloods: white cell count 19.4 x10^9/L on admission, 8.2 x10^9/L on discharge, CRP 41 mg/L.\n\
Sodium was 131 mmol/L on admission, corrected to 136 mmol/L (133-146) and urea was 9.8 mmol/L.\n";
        let c = segment(text, &[]);
        assert_eq!(
            texts(&c),
            vec![
                "Ferritin ¹   9 ug/L",
                "*Potassium 6.8 mmol/L",
                "Bloods: white cell count 19.4 x10^9/L on admission, 8.2 x10^9/L on discharge",
                "CRP 41 mg/L.",
                "Sodium was 131 mmol/L on admission, corrected to 136 mmol/L (133-146)",
                "urea was 9.8 mmol/L"
            ]
        );
        assert!(is_qualitative("Streptococcus pneumoniae") && is_qualitative("E. coli") && is_qualitative("No growth"));
        assert!(is_qualitative("Not seen") && is_qualitative("stériles") && is_qualitative("Immune"));
        // List pieces that continue the previous one stay with it.
        let text = "Créatininémie initialement à 168 µmol/L, contrôlée à 92 µmol/L (N : 45-90)\n\
Esami: emoglobina all'ingresso 7,8 g/dL, alla dimissione 10,1 g/dL (v.n. 13-17)\n";
        assert_eq!(
            texts(&segment(text, &[])),
            vec![
                "Créatininémie initialement à 168 µmol/L, contrôlée à 92 µmol/L (N : 45-90)",
                "Esami: emoglobina all'ingresso 7,8 g/dL, alla dimissione 10,1 g/dL (v.n. 13-17)"
            ]
        );
        // Running text in other languages, and two sentences on a line, are split into phrases;
        // a registration line and earlier results under their label are no candidates.
        let text = "Biologie : natrémie à 134 mmol/L et kaliémie à 4,0 mmol/L (N : 3,5-5,1).\n\
CRP à 12 mg/L (N < 5). Hémoglobine stable à 11,2 g/dL (N : 12-16).\n\
Registration no. 660 184 2291\nVorbefund vom 12.09.2026: Ferritin 25 µg/l, Vitamin B12 221 pg/ml.\n";
        assert_eq!(
            texts(&segment(text, &[])),
            vec![
                "Biologie : natrémie à 134 mmol/L",
                "kaliémie à 4,0 mmol/L (N : 3,5-5,1)",
                "CRP à 12 mg/L (N < 5)",
                "Hémoglobine stable à 11,2 g/dL (N : 12-16)"
            ]
        );
        assert!(!is_qualitative("Legionella urinary antigen") && !is_qualitative("broccoli"));
    }

    #[test]
    fn segment_joins_results_printed_as_stacks() {
        let text = "Sodium\nYour value\n137 mmol/L\nStandard range\n135 - 145 mmol/L\n\n\
Potassium\nYour value\n5.4 mmol/L\nStandard range\n3.5 - 5.1 mmol/L\nHigh\n\n\
ALT\nYour value\nPending\nStandard range\n0 - 32 IU/L\n\nLIVER PANEL\nCollected: Nov 2, 2026\n";
        let c = segment(text, &[]);
        assert_eq!(
            texts(&c),
            vec![
                "Sodium            137 mmol/L                135 - 145 mmol/L",
                "Potassium            5.4 mmol/L                3.5 - 5.1 mmol/L High",
            ]
        );
        for cand in &c {
            assert_eq!(span_text(text, cand.start, cand.end).chars().count(), cand.text.chars().count());
            assert!(span_text(text, cand.start, cand.end).starts_with(cand.text.split(' ').next().unwrap()));
        }
    }

    #[test]
    fn segment_keeps_names_with_numbers_and_skips_addresses() {
        // `25-OH` is part of the name: no list of results.
        let line = "VITAMIN D, 25-OH, TOTAL                              21 L            30-100 ng/mL          02";
        assert_eq!(texts(&segment(line, &[])), vec![line]);
        let text = "02 Summit Esoterics, 18 Research Park Dr, Elm Grove 00000    Lab Director: K. Liu, PhD\n\
01 Summit Reference Laboratories, 4100 Harbor Rd, Bay City 00000\n\
Plan: continue 31.5 mg per week. Next INR in 4 weeks.\n\
Interprétation du DFG (KDIGO) : G1 > 90 ; G2 60 à 89\nV.G.M. ........  90,7 fL   78,0 - 97,0\n";
        assert_eq!(texts(&segment(text, &[])), vec!["V.G.M. ........  90,7 fL   78,0 - 97,0"]);
    }

    #[test]
    fn segment_splits_prose_into_phrases() {
        let text = "Potassium was 5.9 mmol/L (3.5-5.1) and sodium 139 mmol/L.";
        let c = segment(text, &[]);
        assert_eq!(texts(&c), vec!["Potassium was 5.9 mmol/L (3.5-5.1)", "sodium 139 mmol/L"]);
        for cand in &c {
            assert_eq!(span_text(text, cand.start, cand.end), cand.text);
        }
        let text = "Hemoglobin was 10.4 g/dL, below the reference range of 12.0-15.5 g/dL. \
The troponin I was negative. Glucose, fasting, was 108 mg/dL.";
        assert_eq!(
            texts(&segment(text, &[])),
            vec![
                "Hemoglobin was 10.4 g/dL, below the reference range of 12.0-15.5 g/dL",
                "The troponin I was negative",
                "Glucose, fasting, was 108 mg/dL",
            ]
        );
    }

    #[test]
    fn segment_joins_wrapped_prose() {
        let text = "On admission the potassium was elevated at 5.9\r\nmmol/L and the sodium was 139 mmol/L.";
        let c = segment(text, &[]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].text, "On admission the potassium was elevated at 5.9  mmol/L");
        assert_eq!(c[0].end - c[0].start, c[0].text.chars().count());
        assert_eq!(span_text(text, c[1].start, c[1].end), "the sodium was 139 mmol/L");
        // A result line after unfinished prose stays a line of its own.
        let text = "Urine was collected and tested with the following results
pH 6.5 5.0-8.0
";
        assert_eq!(texts(&segment(text, &[])), vec!["pH 6.5 5.0-8.0"]);
    }

    #[test]
    fn segment_splits_two_results_side_by_side() {
        let text = "Sodium        139     mmol/L  135-145           Haemoglobin   128     g/L       130-170\n\
Na: 131 mmol/L (135-145)                 Hb: 96 g/L (115-165)\n\
Creatinine    77      umol/L  60-110\n\
Na 138 (133-146)          K 5.9 (3.5-5.3) H   Urea 21.4 (2.5-7.8) H\n\
Glucose 5.4        HbA1c 48 mmol/mol\n";
        let c = segment(text, &[]);
        assert_eq!(
            texts(&c),
            [
                "Sodium        139     mmol/L  135-145",
                "Haemoglobin   128     g/L       130-170",
                "Na: 131 mmol/L (135-145)",
                "Hb: 96 g/L (115-165)",
                "Creatinine    77      umol/L  60-110",
                "Na 138 (133-146)",
                "K 5.9 (3.5-5.3) H",
                "Urea 21.4 (2.5-7.8) H",
                "Glucose 5.4",
                "HbA1c 48 mmol/mol",
            ]
        );
        for x in &c {
            assert_eq!(span_text(text, x.start, x.end), x.text);
        }
    }

    #[test]
    fn segment_joins_a_value_with_its_unit_and_range_lines() {
        let text = "TSH                        0.08\n      mIU/L                Ref: 0.27 - 4.20          LOW\n\
Troponin I ........ 212\n   Units: ng/L\n   Normal: 0 - 34\nSodium 139\nPotassium 4.1 mmol/L\n";
        let c = segment(text, &[]);
        assert_eq!(c.len(), 4, "{:?}", texts(&c));
        assert!(c[0].text.starts_with("TSH") && c[0].text.ends_with("LOW"), "{:?}", c[0].text);
        assert!(c[1].text.starts_with("Troponin") && c[1].text.ends_with("0 - 34"), "{:?}", c[1].text);
        assert_eq!(texts(&c)[2..], ["Sodium 139", "Potassium 4.1 mmol/L"]);
        for x in &c {
            assert_eq!(span_text(text, x.start, x.end).replace('\n', " "), x.text);
        }
    }

    #[test]
    fn segment_respects_claimed_spans() {
        let text = "Sodium 139 mmol/L\nPotassium 4.1 mmol/L\n";
        let c = segment(text, &[(0, 17)]);
        assert_eq!(texts(&c), vec!["Potassium 4.1 mmol/L"]);
    }

    #[test]
    fn segment_offsets_are_characters_with_multibyte_text() {
        let text = "Temp 37,2 °C ± 0,1\nKreatinin   68 µmol/L   45–90\n  Hämoglobin 12,1 g/dl\n";
        let c = segment(text, &[]);
        assert_eq!(c.len(), 3);
        assert_eq!((c[1].start, c[1].end), (19, 48));
        assert_eq!((c[2].start, c[2].end), (51, 71));
        for cand in &c {
            assert_eq!(span_text(text, cand.start, cand.end), cand.text);
        }
    }
}
