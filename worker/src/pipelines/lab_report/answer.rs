//! Model answers: JSON objects turned into items, every value grounded in the candidate.

use super::items::{Candidate, Flag, LabItem, Method};
use super::numbers::{compute_flag, parse_range, parse_value, NUM, RANGE_BOTH, RANGE_LOWER, RANGE_UPPER, SPACED_RANGE};
use super::segment::RESULT_VERBS;
use crate::grounding::Alignment;
use regex::Regex;
use serde_json::{Map, Value};
use std::sync::LazyLock;

/// Keys of the answer object, in the order the prompt's examples write them.
pub const ANSWER_FIELDS: [&str; 6] = ["test", "value", "unit", "ref_low", "ref_high", "flag"];

/// How the prompt ends: the answer object's opening, already written so the model only
/// continues it. The caller prepends it to the generated text before [`parse_answer`].
/// The examples write compact JSON (no spaces), which costs about a quarter fewer tokens.
pub const ANSWER_PRIMER: &str = "{\"test\":\"";

/// Answer strings that mean "absent".
const NULL_WORDS: &[&str] = &["null", "none", "n/a", "na", "-", "—", "nil"];

/// Most words a test name read from the text before the value may have; longer text is a
/// sentence, not a label.
const MAX_LABEL_WORDS: usize = 5;

/// Tokens that are a printed flag when they follow the value. Short ones must match case
/// (a lower-case `a` or `l` is a word), words need not. `N` is left out: a normal flag
/// adds nothing the range does not say, and `N` is too often something else.
const PRINTED_FLAG_TOKENS: &[&str] = &[
    "H", "L", "HH", "LL", "A", "AA", "HIGH", "LOW", "CRIT", "CRITICAL", "PANIC", "ABN", "ABNORMAL", "↑", "↓", "↑↑",
    "↓↓", "▲", "▼", "⇑", "⇓", "*", "!!",
];

/// Arrows, the flags some reports print right before the value (`WBC ..... ↑ 12.4`); see
/// `flag_before`.
const ARROWS: &[&str] = &["↑", "↓", "↑↑", "↓↓", "▲", "▼", "⇑", "⇓"];

/// Why a model answer gives no row. Messages carry positions and field names only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("answer is not a JSON object (at byte {at})")]
    NotJson { at: usize },
    #[error("answer ends inside the JSON object (at byte {at}); max_new_tokens or a stop string cut it")]
    Truncated { at: usize },
    #[error("answer field `{field}` is {found}, expected a string, a number or null")]
    BadField { field: &'static str, found: &'static str },
    #[error("answer has no value")]
    MissingValue,
}

impl AnswerError {
    /// The error row's reason.
    pub fn reason(&self) -> medbatch_schemas::ErrorReason {
        use medbatch_schemas::ErrorReason as R;
        match self {
            AnswerError::NotJson { .. } => R::UnparseableAnswer,
            AnswerError::Truncated { .. } => R::TruncatedAnswer,
            AnswerError::BadField { .. } => R::BadAnswerField,
            AnswerError::MissingValue => R::MissingValue,
        }
    }

    /// Stable label for the `_errors` table and metrics.
    pub fn label(&self) -> &'static str {
        self.reason().label()
    }
}

/// Turns the model's answer for `candidate` into an item.
///
/// The answer is one JSON object with [`ANSWER_FIELDS`] (strings, numbers or null; other
/// keys ignored); whatever follows its closing brace is ignored. Nothing the model says is
/// trusted unless the candidate text bears it out:
///
/// - value: must occur in the candidate as a token of its own, or as the same number
///   (`5.4` for `5,4`); otherwise the item is kept as answered with `alignment = none`
///   (copied from the examples or invented), and so is a bound of a printed range. A
///   value with a unit glued on (`255 x10^3/uL`, `8%`) is split. The row keeps the value
///   as printed; `value_numeric` is [`parse_value`] of it.
/// - test: the label printed before the value (`label_before`) unless the model names a
///   different printed test (`choose_test`); none when neither is printed.
/// - unit: kept if it occurs after the value, widened to the whole printed token
///   (`x10^9` → `x10^9/L`); otherwise none.
/// - range: [`parse_range`] of the text after the value; only when that finds nothing,
///   the model's bounds, each kept if it occurs after the value (swapped if reversed).
/// - flag: the model's flag if it is a known flag printed as a token of its own after the
///   value (not the `L` of `g/L`) or right before it (`flag_before`), else a flag printed
///   after the value (`PRINTED_FLAG_TOKENS`) or before it; then [`compute_flag`].
pub fn parse_answer(answer: &str, candidate: &Candidate) -> Result<LabItem, AnswerError> {
    let lead = answer.len() - answer.trim_start().len();
    let body = &answer[lead..];
    if !body.starts_with('{') {
        return Err(AnswerError::NotJson { at: lead });
    }
    let mut stream = serde_json::Deserializer::from_str(body).into_iter::<Map<String, Value>>();
    let object = match stream.next() {
        Some(Ok(object)) => object,
        Some(Err(e)) => {
            let at = lead + byte_offset(body, e.line(), e.column());
            return Err(if e.is_eof() { AnswerError::Truncated { at } } else { AnswerError::NotJson { at } });
        }
        None => return Err(AnswerError::Truncated { at: answer.len() }),
    };
    let [test, value, unit, ref_low, ref_high, flag] = ANSWER_FIELDS.map(|f| field_text(&object, f));
    let (test, unit, ref_low, ref_high, flag) = (test?, unit?, ref_low?, ref_high?, flag?);
    let (value, glued_unit) = split_glued_unit(value?.ok_or(AnswerError::MissingValue)?);
    let value_numeric = parse_value(&value);

    let text = candidate.text.as_str();
    // A value that cannot be one (a lone letter of the test name, `C` of `Protéine C
    // réactive`; a digit of a unit, `9` of `x10^9/L`) is read again: the first value printed
    // after the test's label.
    let (value, value_numeric) = match misread_value(text, &value) {
        Some(reread) => {
            let n = parse_value(&reread);
            (reread, n)
        }
        None => (value, value_numeric),
    };
    let Some((value_start, value_end)) = find_value(text, &value, value_numeric) else {
        // A word value may still be printed with other case or spacing, or misspelt by the
        // model (`Not detectd`): kept as printed, flagged by how it was found. Numbers must
        // be the printed token.
        let found = value_numeric
            .is_none()
            .then(|| crate::grounding::align(&value, text))
            .flatten()
            .filter(|l| matches!(l.alignment, Alignment::Normalized | Alignment::Fuzzy));
        return Ok(match found {
            Some(l) => {
                let printed: String = text.chars().skip(l.start).take(l.end - l.start).collect();
                LabItem { alignment: l.alignment, ..ungrounded_item(candidate, test, printed, unit, flag) }
            }
            None => ungrounded_item(candidate, test, value, unit, flag),
        });
    };
    let alignment = if text[value_start..value_end] == value { Alignment::Exact } else { Alignment::Normalized };
    // `<5`, `> 1476`: the comparator printed before the number belongs to the value.
    let value_start = comparator_before(text, value_start);
    let value_end = spaced_groups_end(text, value_start, value_end);
    // The row keeps the value as printed (`0,92` where the model wrote `0.92`).
    let value = text[value_start..value_end].to_string();
    let value_numeric = parse_value(&value);
    let before = &text[..value_start];
    let after = &text[value_end..];

    // Range and unit may be printed in brackets between the test name and the value.
    let bracket = range_before_value(before);
    let test = choose_test(test, text, bracket.map_or(before, |(s, _)| &before[..s]))
        .map(|t| super::items::without_footnote_marks(&t).to_string())
        .filter(|t| !t.is_empty());
    // A unit the model copied together with the value is the better witness.
    let unit = glued_unit.and_then(|u| unit_token(after, &u)).or_else(|| unit.and_then(|u| unit_token(after, &u)));
    // No unit from the answer (none given, or not printed after the value): a unit printed
    // right after the value (`36.4  %`, `13,9  g/dL`).
    let unit = unit.or_else(|| {
        let first = after.split_whitespace().next()?;
        let unit_like = first == "%"
            || (first.contains('/') && first.chars().any(char::is_alphabetic) && !first.contains("//"))
            || first.starts_with("10^")
            || first.starts_with("x10");
        (value_numeric.is_some() && unit_like && Flag::from_printed(first).is_none()).then(|| first.to_string())
    });
    // A unit printed in brackets after the test name (`Sodium (mmol/L)  140`).
    let (test, unit) = match (test, unit) {
        (Some(t), None) => match UNIT_AFTER_NAME.captures(&t) {
            Some(c) => (Some(c[1].trim_end().to_string()), Some(c[2].to_string())),
            None => (Some(t), None),
        },
        other => other,
    };
    // After a result word, a number with a unit is something else (a cut-off,
    // `Negative    50 ng/mL`): neither its unit nor the number belongs to the result.
    let unit = unit
        .filter(|u| value_numeric.is_some() || after.split_whitespace().next().is_some_and(|t| t.contains(u.as_str())));
    let (ref_low, ref_high) = match (parse_range(after), bracket) {
        ((None, None), Some((s, e))) => parse_range(&before[s..e]),
        ((None, None), None) if value_numeric.is_some() => model_bounds(ref_low, ref_high, after),
        ((None, None), None) => (None, None),
        (read, _) => read,
    };
    let unit = unit.or_else(|| {
        let (s, e) = bracket?;
        let group = &before[s + 1..e - 1];
        // The group's text after its range: `3.9-5.5 mmol/L` → `mmol/L`.
        group
            .split_whitespace()
            .rev()
            .find(|t| {
                parse_value(t).is_none()
                    && !t.chars().next().is_some_and(|c| c.is_ascii_digit() || matches!(c, '<' | '>' | '≤' | '≥'))
                    && t.chars().any(|c| c.is_alphabetic() || c == '%' || c == '/')
            })
            .map(str::to_string)
    });
    // A unit per collection period printed with a space (`g/24 h`, `mmol/24 Std`).
    let unit = unit.map(|u| match PER_HOURS.captures(after).filter(|c| c[1].eq_ignore_ascii_case(&u)) {
        Some(c) => c[0].trim().to_string(),
        None => u,
    });
    let before_flag = flag_before(before);
    let model_flag = flag.filter(|f| {
        Flag::from_printed(f).is_some()
            && (flag_tokens_after(after).any(|t| same_flag(t, f)) || before_flag.as_deref() == Some(f.trim()))
    });
    let printed = model_flag.or_else(|| printed_flag_after(after)).or(before_flag);
    Ok(LabItem {
        test,
        value: Some(value),
        value_numeric,
        unit,
        ref_low,
        ref_high,
        flag: compute_flag(value_numeric, ref_low, ref_high, printed.as_deref()),
        evidence_start: candidate.start,
        evidence_end: candidate.end,
        method: Method::Model,
        alignment,
        from_examples: false,
        status: None,
    })
}

/// Words that introduce a cut-off or threshold, right before its number.
static CUTOFF_BEFORE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(?:cut-?\s?off|threshold|seuil|grenzwert|umbral|soglia|drempel(?:waarde)?)\s*:?\s*(?:[<>≤≥]=?\s*)?$",
    )
    .unwrap()
});

/// A test name with its unit in brackets after it: `Sodium (mmol/L)`, `HbA1c (%)`, `MCV (fL)`.
pub(super) static UNIT_AFTER_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(.*\p{L}.*?)\s*[(\[]((?:[^()\[\]\s\d]*/[^()\[\]\s]+)|(?:x\s?)?10\^?\*?\d+/[^()\[\]\s]+|%|(?i:fl|pg|kpa|mm\s?hg|secs?))[)\]]$").unwrap()
});

/// `<`, `>`, `≤`, `≥` (or `<=`, `>=`), with at most one space, or a minus sign glued to the
/// number (`BE −4.1`), right before `at` and not glued to a word or number before it (`x<5`
/// is no value, `3.5-5.1` a range): the start of the value with it.
fn comparator_before(text: &str, at: usize) -> usize {
    COMPARATOR_AT_END.captures(&text[..at]).and_then(|c| c.get(1).or(c.get(2))).map_or(at, |m| m.start())
}

static COMPARATOR_AT_END: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[^\p{L}\p{N}])((?:[<>]=?|[≤≥]) ?)$|(?:^|[\s(\[:=])([-−])$").unwrap());

/// Numbers printed as values: not inside a word or unit (`B12`, `x10^9`, `HbA1c`), with an
/// optional comparator.
static VALUE_TOKEN: LazyLock<Regex> = LazyLock::new(|| Regex::new(&format!(r"(?:[<>≤≥]=?\s?)?{NUM}")).unwrap());

/// A value that cannot be the line's value, read again: `Some(first printed value)` when
/// the answer is a word that is no qualitative result (a letter of the test name) or a
/// number printed only inside a unit or word, and the line prints a value number.
fn misread_value(text: &str, value: &str) -> Option<String> {
    let v = value.trim();
    let numeric = parse_value(v.trim_start_matches(['<', '>', '≤', '≥', '=', ' '])).is_some();
    let word_ok = !numeric
        && (super::segment::is_qualitative(v)
            || v.chars().any(|c| c.is_ascii_digit())
            || v.chars().all(|c| matches!(c, '+' | '-' | '±')));
    // A unit given as the value (`g/dL`, `mmol/L`, `%`) is no value.
    let unit_word = !numeric && (v == "%" || (v.contains('/') && !v.chars().any(|c| c.is_ascii_digit())));
    let brackets = bracket_spans(text);
    let in_brackets = |s: usize, e: usize| brackets.iter().any(|&(bs, be)| bs <= s && e <= be);
    let spans = token_spans(text, v, false);
    let first = first_value_span(text);
    let reread = || first.map(|(s, e)| text[s..e].to_string());
    // A code printed in brackets in the test's name (`Dog dander (e5)`) is no value either.
    let code_in_brackets = !numeric
        && v.chars().any(|c| c.is_ascii_digit())
        && !spans.is_empty()
        && spans.iter().all(|&(s, e)| in_brackets(s, e));
    if code_in_brackets {
        return reread();
    }
    // A clock time (`at 11:30`) is no value; nor a number printed only inside a word
    // (`3` of `Complement C3`) or as a collection period (`24` of `orina de 24 h`).
    let clock = CLOCK.is_match(v);
    let glued_only = numeric
        && spans.is_empty()
        && text.match_indices(v).any(|(at, _)| text[..at].chars().next_back().is_some_and(char::is_alphabetic));
    let hours_only = numeric && !spans.is_empty() && spans.iter().all(|&(_, e)| HOURS_AFTER.is_match(&text[e..]));
    if (clock || glued_only || hours_only) && first.is_some() {
        return reread();
    }
    // Part of an ABO and RhD group (`negative` of `A RhD negative`): the whole group.
    let group = BLOOD_GROUP.find(text).map(|m| m.as_str().trim_end());
    if let Some(g) = group.filter(|g| !numeric && *g != v && g.to_lowercase().contains(&v.to_lowercase())) {
        return Some(g.to_string());
    }
    if word_ok && !unit_word {
        return None;
    }
    if numeric {
        // A result word printed in a column before the number (`Cannabinoids  Negative  50
        // ng/mL`: the number is the cut-off) is the value.
        if let Some(&(at, _)) = spans.first() {
            let word = super::segment::QUALITATIVE
                .find_iter(&text[..at])
                .filter(|m| text[..m.start()].ends_with("  ") && !in_brackets(m.start(), m.end()))
                .last();
            if let Some(m) = word {
                return Some(m.as_str().to_string());
            }
        }
        // A number printed nowhere but in an exponent (`x10^9/L`), a unit (`mL/min/1.73m2`,
        // where it is no token), a bracketed range before the value (`ALT (<33 U/L) ..... 28`)
        // or the range after it (`↑ >2000  pg/mL  232-1245`: `232`) is misread; one not
        // printed at all is left to grounding (`alignment = none`).
        let mut occurrences = text.match_indices(v).peekable();
        let in_unit = occurrences.peek().is_some() && occurrences.all(|(at, _)| text[..at].ends_with('/'));
        if in_unit {
            return reread();
        }
        let in_exponent = spans.iter().all(|&(s, _)| text[..s].ends_with(['^', '*']));
        let in_range_before = spans.iter().all(|&(s, e)| in_brackets(s, e)) && first.is_some();
        let ranges: Vec<(usize, usize)> = RANGE_BOTH.find_iter(text).map(|m| (m.start(), m.end())).collect();
        let in_range_after = spans.iter().all(|&(s, e)| ranges.iter().any(|&(a, b)| a <= s && e <= b))
            && first.is_some_and(|(f, _)| spans.iter().all(|&(s, _)| f < s));
        if spans.is_empty() || !(in_exponent || in_range_before || in_range_after) {
            return None;
        }
    }
    // A word of the test's name given as the value of a line with no value number whose
    // value is a result word (`Sputum culture: Streptococcus pneumoniae`): that result word.
    if !numeric && !word_ok && !unit_word && first.is_none() && !spans.is_empty() {
        let after_name =
            super::segment::QUALITATIVE.find_iter(text).find(|m| spans.iter().all(|&(_, e)| e <= m.start()));
        if let Some(m) = after_name {
            return Some(m.as_str().to_string());
        }
    }
    if !numeric && !unit_word && v.chars().count() > 2 {
        // A word printed before the line's first value number is part of the test's name
        // (`Glucosa basal   126 mg/dL`, `Cholesterol LDL   148`): the value is that number.
        // Another word answer of some length (a test-specific result word) is judged by
        // grounding.
        let in_name = !word_ok && !spans.is_empty() && first.is_some_and(|(f, _)| spans.iter().all(|&(_, e)| e <= f));
        return if in_name { reread() } else { None };
    }
    reread()
}

/// The first token after a value when it is a unit per hours printed with a space
/// (`g/24 h`): that token (group 1) and the hours.
static PER_HOURS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^\s*(\S+/\d+)\s(?:h|hrs?|std|horas?|heures?|ore|uur)\b").unwrap());

/// An ABO group with its RhD type: `A RhD negative`, `O Rh+`, `AB pos`.
static BLOOD_GROUP: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:AB|A|B|O)\s*(?:Rh\s?\(?D\)?|RhD)?\s*(?:positive|negative|pos|neg|\+|-)(?:\s|$)").unwrap()
});

/// A clock time with a two-digit hour (`08:45`, `11:30`); titres (`1:320`) are not.
static CLOCK: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[0-2]\d:[0-5]\d$").unwrap());

/// Hours right after a number: a collection period or time point (`24 h`, `24-h`, `2 hours`).
static HOURS_AFTER: LazyLock<Regex> = LazyLock::new(|| {
    // `h` in lower case only: `4.6 H` is a flag.
    Regex::new(r"^\s?-?\s?(?:h|(?i:hrs?|hours?|horas?|heures?|std|stunden|ore|uur))\b").unwrap()
});

/// Byte span of the first number that stands as a value, its comparator included: not glued
/// to a word or unit (`B12`, `x10^9`), not in brackets, not part of a two-sided range (a
/// one-sided `>90` outside brackets is a value).
fn first_value_span(text: &str) -> Option<(usize, usize)> {
    let glued = |s: usize, e: usize| {
        text[..s].chars().next_back().is_some_and(|c| c.is_alphanumeric() || matches!(c, '^' | '.' | ','))
            || text[e..].chars().next().is_some_and(|c| c.is_alphabetic() || c == '^')
    };
    let ranges: Vec<(usize, usize)> = RANGE_BOTH.find_iter(text).map(|m| (m.start(), m.end())).collect();
    let brackets = bracket_spans(text);
    let inside = |spans: &[(usize, usize)], s: usize, e: usize| spans.iter().any(|&(a, b)| a <= s && e <= b);
    VALUE_TOKEN.find_iter(text).map(|m| (m.start(), m.end())).find(|&(s, e)| {
        !glued(s, e)
            && !inside(&ranges, s, e)
            && !inside(&brackets, s, e)
            && !HOURS_AFTER.is_match(&text[e..])
            && !CLOCK.is_match(&text[s..e])
    })
}

/// Byte spans of the bracketed groups (`(…)`, `[…]`, not nested) of `text`.
fn bracket_spans(text: &str) -> Vec<(usize, usize)> {
    BRACKETED.find_iter(text).map(|m| (m.start(), m.end())).collect()
}

static BRACKETED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[(\[][^()\[\]]*[)\]]").unwrap());

/// `Glucose, fasting (3.9-5.5 mmol/L) ...... 7.8`: the bracketed group of `before` holding a
/// range, printed between the test name and the value; its byte span in `before`.
fn range_before_value(before: &str) -> Option<(usize, usize)> {
    let (s, e) = *bracket_spans(before).last()?;
    let between = &before[e..];
    let plain = between.chars().all(|c| c.is_whitespace() || matches!(c, '.' | ':' | '=' | '…' | '-' | '_'));
    let range = parse_range(&before[s..e]);
    (plain && (range.0.is_some() || range.1.is_some())).then_some((s, e))
}

/// An answer whose value the candidate does not bear out: kept as the model gave it,
/// flagged `alignment = none`, with nothing read from the text (no range, no computed flag).
fn ungrounded_item(
    candidate: &Candidate,
    test: Option<String>,
    value: String,
    unit: Option<String>,
    flag: Option<String>,
) -> LabItem {
    LabItem {
        test,
        value_numeric: parse_value(&value),
        value: Some(value),
        unit,
        ref_low: None,
        ref_high: None,
        flag: flag.as_deref().and_then(Flag::from_printed),
        evidence_start: candidate.start,
        evidence_end: candidate.end,
        method: Method::Model,
        alignment: Alignment::None,
        from_examples: false,
        status: None,
    }
}

fn field_text(object: &Map<String, Value>, field: &'static str) -> Result<Option<String>, AnswerError> {
    let text = match object.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(_)) => return Err(AnswerError::BadField { field, found: "a boolean" }),
        Some(Value::Array(_)) => return Err(AnswerError::BadField { field, found: "an array" }),
        Some(Value::Object(_)) => return Err(AnswerError::BadField { field, found: "an object" }),
    };
    let absent = text.is_empty() || NULL_WORDS.contains(&text.to_lowercase().as_str());
    Ok((!absent).then_some(text))
}

/// Byte offset of serde_json's 1-based line and column in `s`.
fn byte_offset(s: &str, line: usize, column: usize) -> usize {
    let line_start: usize = s.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum();
    (line_start + column.saturating_sub(1)).min(s.len())
}

/// A number followed by a unit (`255 x10^3/uL`, `8%`, `5.9mmol/L`); grades (`1+`) and
/// ranges (`25-50`) are not split.
static GLUED_UNIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"^((?:[<>≤≥]=?\s?)?[-−]?(?:{SPACED}|{NUM}))\s*([\p{{L}}%µ/].*)$")).unwrap());

/// A count with its thousands grouped by spaces (`251 000`).
const SPACED: &str = r"\d{1,3}(?:[ \u{a0}\u{202f}]\d{3})+(?:[.,]\d+)?";

/// `251` of `251 000`: the groups printed after a value that belong to it, when the next
/// group starts with `0` (no value does) or the line prints a range in grouped thousands too
/// (`150 000 - 400 000`). The byte end of the value `text[start..end]` with them.
fn spaced_groups_end(text: &str, start: usize, end: usize) -> usize {
    let Some(tail) = SPACED_TAIL.captures(&text[end..]).and_then(|c| c.get(1)) else { return end };
    let zero = tail.as_str().trim_start_matches([' ', '\u{a0}', '\u{202f}']).starts_with('0');
    let whole = end + tail.end();
    if (zero || SPACED_RANGE.is_match(text)) && parse_value(&text[start..whole]).is_some() {
        whole
    } else {
        end
    }
}

static SPACED_TAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^((?:[ \u{a0}\u{202f}]\d{3})+(?:[.,]\d+)?)(?:$|[^\d.,\-–])").unwrap());

/// `"255 x10^3/uL"` → value `255` and unit `x10^3/uL`; other values unchanged.
fn split_glued_unit(value: String) -> (String, Option<String>) {
    if parse_value(&value).is_some() {
        return (value, None);
    }
    match GLUED_UNIT.captures(&value) {
        Some(c) => (c[1].to_string(), Some(c[2].trim().to_string())),
        None => (value, None),
    }
}

static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(NUM).unwrap());

/// A token joining the bounds of a range (`3.5 - 5.1`, `3.5 to 5.1`).
static RANGE_WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)^(?:-|–|—|to|bis|à|a|\.\.)$").unwrap());

/// The `k`-th element of a whole-report answer's array, as JSON text.
pub fn nth_answer_object(answer: &str, k: usize) -> Option<String> {
    let open = answer.find('[')?;
    let objects: Vec<Value> = serde_json::Deserializer::from_str(&answer[open..]).into_iter().next()?.ok()?;
    objects.get(k).map(Value::to_string)
}

/// Turns a whole-report answer — a JSON array of answer objects, as larger models give when
/// the pipeline says `extraction.unit = "document"` — into items. Each object is grounded on
/// one of `lines` (the report's candidate lines, from [`segment`]) with [`parse_answer`]:
/// first a line not yet used that names the object's test, then any line not yet used,
/// then any line. An object no line bears out is kept with `alignment = none` and an empty
/// evidence span, so invented results are flagged, never trusted nor silently dropped.
pub fn parse_document_answer(answer: &str, lines: &[Candidate]) -> Vec<Result<LabItem, AnswerError>> {
    let Some(open) = answer.find('[') else {
        return vec![Err(AnswerError::NotJson { at: 0 })];
    };
    let mut stream = serde_json::Deserializer::from_str(&answer[open..]).into_iter::<Vec<Value>>();
    let objects = match stream.next() {
        Some(Ok(objects)) => objects,
        Some(Err(e)) if e.is_eof() => return vec![Err(AnswerError::Truncated { at: answer.len() })],
        _ => return vec![Err(AnswerError::NotJson { at: open })],
    };
    let mut used = vec![false; lines.len()];
    let mut out = Vec::with_capacity(objects.len());
    for object in objects {
        let Value::Object(map) = &object else {
            out.push(Err(AnswerError::NotJson { at: open }));
            continue;
        };
        let test = map.get("test").and_then(Value::as_str).unwrap_or("").to_lowercase();
        let text = object.to_string();
        let names_test = |c: &Candidate| !test.is_empty() && c.text.to_lowercase().contains(&test);
        let passes: [&dyn Fn(usize) -> bool; 3] = [&|i| !used[i] && names_test(&lines[i]), &|i| !used[i], &|_| true];
        let mut found = None;
        'search: for pass in passes {
            for (i, line) in lines.iter().enumerate() {
                if pass(i) {
                    if let Ok(item) = parse_answer(&text, line) {
                        if item.alignment != Alignment::None {
                            found = Some((i, item));
                            break 'search;
                        }
                    }
                }
            }
        }
        match found {
            Some((i, item)) => {
                used[i] = true;
                out.push(Ok(item));
            }
            // No line bears it out: kept, flagged `alignment = none`, with an empty span.
            None => out.push(parse_answer(&text, &Candidate { start: 0, end: 0, text: String::new() })),
        }
    }
    out
}

/// Byte span of the value in `text`: its first occurrence as a token, else the first
/// number equal to `numeric` (in absolute value: a range's dash is not a minus sign).
/// Occurrences strictly inside a printed reference range do not count, so a bound the
/// model copied as the value (`12` or `12,0` from `12,0–16,0`) is not grounded; a value
/// that is itself range-shaped (`25-50` cells per field) still is.
fn find_value(text: &str, value: &str, numeric: Option<f64>) -> Option<(usize, usize)> {
    let ranges: Vec<(usize, usize)> = [&*RANGE_BOTH, &*RANGE_UPPER, &*RANGE_LOWER]
        .iter()
        .flat_map(|re| re.find_iter(text).map(|m| (m.start(), m.end())))
        .collect();
    let in_range = |(s, e): (usize, usize)| ranges.iter().any(|&(rs, re)| rs <= s && e <= re && (rs, re) != (s, e));
    let spans = token_spans(text, value, false);
    // A value printed with its comparator (`>1476`, `<5`) reads like a one-sided range: it is
    // the value when it is the line's first value ([`first_value_span`]).
    let first = first_value_span(text);
    let compared = |(s, e): (usize, usize)| first.is_some_and(|(fs, fe)| fs <= s && e == fe);
    let literal = spans.iter().copied().find(|&span| !in_range(span));
    let literal = literal.or_else(|| spans.iter().copied().min().filter(|&span| compared(span)));
    literal.or_else(|| {
        let v = numeric?.abs();
        NUMBER
            .find_iter(text)
            .map(|m| (m.start(), m.end()))
            .filter(|&span| !in_range(span))
            .find(|&(s, e)| parse_value(&text[s..e]).is_some_and(|n| (n - v).abs() <= f64::EPSILON * v.max(1.0)))
    })
}

/// Byte span of the first occurrence of `needle` as a token (`token_spans`).
fn find_token(haystack: &str, needle: &str, short_case_sensitive: bool) -> Option<(usize, usize)> {
    token_spans(haystack, needle, short_case_sensitive).into_iter().next()
}

/// Byte spans of the occurrences of `needle` in `haystack` as a token of its own: no
/// letter or digit on either side, and not inside a number (`3` does not occur in `13.2`
/// or `3.5`). Case is ignored, except for needles of at most two characters when
/// `short_case_sensitive` (flags: `H` is not `h`).
fn token_spans(haystack: &str, needle: &str, short_case_sensitive: bool) -> Vec<(usize, usize)> {
    const SHORT_CHARS: usize = 2;
    let needle = needle.trim();
    if needle.is_empty() {
        return Vec::new();
    }
    let ignore_case = !(short_case_sensitive && needle.chars().count() <= SHORT_CHARS);
    let pattern = format!("{}{}", if ignore_case { "(?i)" } else { "" }, regex::escape(needle));
    let Ok(re) = Regex::new(&pattern) else {
        return Vec::new();
    };
    // A neighbour joins the match if it is alphanumeric, or a decimal or thousands mark
    // with a digit beyond it.
    let joins = |c: Option<char>, beyond: Option<char>| {
        c.is_some_and(char::is_alphanumeric)
            || (matches!(c, Some('.' | ',')) && beyond.is_some_and(|b| b.is_ascii_digit()))
    };
    let spans = re.find_iter(haystack).filter(|m| {
        let mut before = haystack[..m.start()].chars().rev();
        let mut after = haystack[m.end()..].chars();
        !joins(before.next(), before.next()) && !joins(after.next(), after.next())
    });
    spans.map(|m| (m.start(), m.end())).collect()
}

/// The test name printed before the value: `Chloride ....... ` → `Chloride`,
/// `AMENDED: Potassium ` → `Potassium`, `The troponin I was ` → `troponin I`. `None` when
/// that text is longer than `MAX_LABEL_WORDS` or has no letter.
fn label_before(before: &str) -> Option<String> {
    let separators = |c: char| c.is_whitespace() || matches!(c, ':' | '.' | '=' | ',' | '…' | '-' | '−');
    // The name ends where dot leaders start (`WBC ........ ↑ 12.4`); an arrow flag printed
    // before the value is no part of it.
    let before = LEADER.find(before).map_or(before, |m| &before[..m.start()]);
    let mut label = before.trim_end_matches(separators);
    if let Some(flag) = flag_before(label) {
        label = label[..label.len() - flag.len()].trim_end_matches(separators);
    }
    // A prefix such as "AMENDED:" or "Result:" names the line, not the test (a colon inside
    // a name, `albumin:creatinine ratio`, does not).
    let label = label.rsplit_once(": ").map_or(label, |(_, rest)| rest);
    let words: Vec<&str> = label.split_whitespace().collect();
    let end = words.iter().position(|w| ends_label(&w.to_lowercase())).unwrap_or(words.len());
    let start = words.iter().take_while(|w| ARTICLES.contains(&w.to_lowercase().as_str())).count();
    let words = &words[start.min(end)..end];
    let label = words.join(" ");
    let label = label.trim_end_matches(separators);
    (label.chars().any(char::is_alphabetic) && words.len() <= MAX_LABEL_WORDS).then(|| label.to_string())
}

/// Dot or underscore leaders between a test name and its value.
static LEADER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\.{2,}|…|_{2,}|(?:\s\.){3,}").unwrap());

/// Words besides [`RESULT_VERBS`] that end a test name in running text
/// (`Hemoglobin of ...`, `CRP rose to ...`).
const LABEL_END_WORDS: &[&str] = &["rose", "fell", "measured", "at", "of", "to"];

fn ends_label(w: &str) -> bool {
    RESULT_VERBS.contains(&w) || LABEL_END_WORDS.contains(&w)
}
/// Words before a test name in letters (`His creatinine`, `the patient's potassium`).
const ARTICLES: &[&str] =
    &["the", "a", "an", "his", "her", "their", "its", "patient's", "with", "and", "but", "while", "whereas", "also"];

/// The test: the printed label before the value when it and the model's test contain one
/// another or share a word (the demo model shortens `Urea nitrogen` to `Urea`) or the model's test is not
/// printed at all (`K` for `Potassium`, misspellings); otherwise the model's test if printed.
fn choose_test(model: Option<String>, text: &str, before: &str) -> Option<String> {
    let label = label_before(before);
    // A number is no test name (`86` for `CRP 86 (<5)`).
    let model = model.filter(|t| t.chars().any(char::is_alphabetic) && find_token(text, t, false).is_some());
    match (model, label) {
        (Some(m), Some(l)) => {
            let (ml, ll) = (m.to_lowercase(), l.to_lowercase());
            // The model cut or stretched the printed name (`His urine albumin` for `urine
            // albumin:creatinine ratio`): they share a word.
            let words = |s: &str| -> Vec<String> {
                s.split(|c: char| !c.is_alphanumeric()).filter(|w| w.chars().count() >= 3).map(str::to_string).collect()
            };
            let shared = words(&ml).iter().any(|w| !ARTICLES.contains(&w.as_str()) && words(&ll).contains(w));
            Some(if ll.contains(&ml) || ml.contains(&ll) || shared { l } else { m })
        }
        (m, l) => l.or(m),
    }
}

/// The printed token after the value that contains the model's unit, or `None` when the
/// unit is not printed there. Flags and plain numbers are not units.
fn unit_token(after: &str, unit: &str) -> Option<String> {
    let trim = |s: &str| s.trim_matches(|c: char| matches!(c, '(' | ')' | '[' | ']' | ',' | ';')).to_string();
    let unit = trim(unit.trim());
    if unit.is_empty() {
        return None;
    }
    let needle = unit.to_lowercase();
    let tokens: Vec<String> = after.split_whitespace().map(trim).collect();
    let k = tokens.iter().position(|token| token.to_lowercase().contains(&needle))?;
    let token = &tokens[k];
    // A unit belongs to the value or to a range after it (`3.5 - 5.1 mmol/L`, low and high
    // `3.5  5.1 mmol/L`), not to another number printed alone in a column of its own
    // (`INR  2.5   31.5 mg`: a dose).
    let number = |i: usize| parse_value(&tokens[i]).is_some();
    let of_other_number =
        k >= 1 && number(k - 1) && !(k >= 2 && (number(k - 2) || RANGE_WORD.is_match(&tokens[k - 2])));
    (!of_other_number
        && Flag::from_printed(token).is_none()
        && parse_value(token).is_none()
        && token.chars().any(|c| c.is_alphabetic() || c == '%' || c == '/'))
    .then(|| token.clone())
}

/// The model's reference bounds, each kept only if that number is printed after the value
/// on its own (not the `10` or `9` of `x10^9/L`); a reversed pair is put in order.
fn model_bounds(low: Option<String>, high: Option<String>, after: &str) -> (Option<f64>, Option<f64>) {
    // A cut-off or threshold (`(cut-off 100)`) is no reference bound.
    let standalone = |m: &regex::Match| {
        let before = after[..m.start()].chars().next_back();
        let next = after[m.end()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '^')
            && !next.is_some_and(|c| c.is_alphabetic() || c == '^')
            && !CUTOFF_BEFORE.is_match(&after[..m.start()])
    };
    let printed: Vec<f64> =
        NUMBER.find_iter(after).filter(standalone).filter_map(|m| parse_value(m.as_str())).collect();
    let bound = |b: Option<String>| {
        b.as_deref()
            .and_then(parse_value)
            .filter(|v| printed.iter().any(|p| (p - v.abs()).abs() <= f64::EPSILON * p.max(1.0)))
    };
    match (bound(low), bound(high)) {
        (Some(l), Some(h)) if l > h => (Some(h), Some(l)),
        // One printed number for both bounds (`7.1 % (53 mmol/mol)`) is no range.
        (Some(l), Some(h)) if l == h => (None, None),
        // A number printed alone, without `<`/`>` (which the range reader would have read),
        // is no limit either (`INR  2.5   31.5 mg`: a dose).
        (Some(_), None) | (None, Some(_)) => (None, None),
        bounds => bounds,
    }
}

/// The tokens printed after the value that may be a flag: words split at spaces, brackets
/// and list punctuation trimmed (`(H)`, `L,`), so a unit's letter (`g/L`) is never one.
fn flag_tokens_after(after: &str) -> impl Iterator<Item = &str> {
    after.split_whitespace().map(|t| t.trim_matches(|c: char| matches!(c, '(' | ')' | '[' | ']' | ',' | ';' | '.')))
}

/// Whether a printed token is the flag `f`: short flags match case (`L`, not `l`), words not.
fn same_flag(token: &str, f: &str) -> bool {
    let f = f.trim();
    token == f || (f.chars().count() > 2 && token.eq_ignore_ascii_case(f))
}

/// The first flag printed after the value (`PRINTED_FLAG_TOKENS`).
fn printed_flag_after(after: &str) -> Option<String> {
    flag_tokens_after(after)
        .find(|t| {
            PRINTED_FLAG_TOKENS.contains(t)
                || (t.chars().count() > 2 && PRINTED_FLAG_TOKENS.contains(&t.to_uppercase().as_str()))
        })
        .map(str::to_string)
}

/// A flag printed right before the value: an arrow (`WBC .... ↑ 12.4`), or a flag token in
/// a column of its own, two spaces or more after the name (`Potassium   H   5.8`).
fn flag_before(before: &str) -> Option<String> {
    let trimmed = before.trim_end();
    let last = trimmed.split_whitespace().next_back()?;
    let rest = &trimmed[..trimmed.len() - last.len()];
    let column = rest.ends_with("  ") && !rest.trim().is_empty() && PRINTED_FLAG_TOKENS.contains(&last);
    (ARROWS.contains(&last) || column).then(|| last.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::segment::segment;
    use super::*;

    // ---- answers ----

    fn cand(text: &str) -> Candidate {
        Candidate { start: 100, end: 100 + text.chars().count(), text: text.into() }
    }

    #[test]
    fn answer_is_parsed_and_junk_after_it_ignored() {
        let c = cand("Potassium: 5.6 mmol/L (ref 3.5-5.1) H");
        let a = r#"{"test": "Potassium", "value": "5.6", "unit": "mmol/L", "ref_low": "3.5", "ref_high": "5.1", "flag": "H"} Line: junk {"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!(item.test.as_deref(), Some("Potassium"));
        assert_eq!(item.value_numeric, Some(5.6));
        assert_eq!(item.unit.as_deref(), Some("mmol/L"));
        assert_eq!((item.ref_low, item.ref_high), (Some(3.5), Some(5.1)));
        assert_eq!(item.flag, Some(Flag::High));
        assert_eq!((item.evidence_start, item.evidence_end), (c.start, c.end));
        assert_eq!(item.method, Method::Model);
    }

    #[test]
    fn answer_numbers_and_nulls() {
        let c = cand("Kalium 3,4 mmol/l 3,5–5,1");
        let a = r#"{"test": "Kalium", "value": 3.4, "unit": "", "ref_low": 3.5, "ref_high": "5,1", "flag": null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!(item.value.as_deref(), Some("3,4"), "as printed");
        assert_eq!(item.unit.as_deref(), Some("mmol/l"), "printed right after the value");
        assert_eq!((item.ref_low, item.ref_high), (Some(3.5), Some(5.1)));
        assert_eq!(item.flag, Some(Flag::Low), "computed");
    }

    #[test]
    fn answer_flag_counts_only_when_printed() {
        // The model says H but the line prints no flag: the flag is computed (normal).
        let c = cand("Hemoglobin 13.1 g/dL 12.0-15.5");
        let a = r#"{"test": "Hemoglobin", "value": "13.1", "unit": "g/dL", "ref_low": "12.0", "ref_high": "15.5", "flag": "H"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().flag, Some(Flag::Normal));
        // "H" inside "Hemoglobin" is not a printed flag either; the word HIGH is.
        let c = cand("Hemoglobin 16.1 g/dL [12.0 - 15.5] HIGH");
        let a = r#"{"test": "Hemoglobin", "value": "16.1", "unit": "g/dL", "ref_low": null, "ref_high": null, "flag": "high"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().flag, Some(Flag::High));
    }

    #[test]
    fn answer_ranges_must_be_grounded() {
        let c = cand("Sodium 139 mmol/L");
        let a =
            r#"{"test": "Sodium", "value": "139", "unit": "mmol/L", "ref_low": "135", "ref_high": "145", "flag": "N"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.ref_low, item.ref_high, item.flag), (None, None, None));
    }

    #[test]
    fn answer_errors() {
        let c = cand("Sodium 139 mmol/L");
        let e = parse_answer("Sodium is 139", &c).unwrap_err();
        assert_eq!(
            (e.label(), e.to_string()),
            ("unparseable_answer", "answer is not a JSON object (at byte 0)".into())
        );
        let e = parse_answer(r#"{"test": "Sodium", "value": 139 "unit""#, &c).unwrap_err();
        assert_eq!(e, AnswerError::NotJson { at: 32 });
        let e = parse_answer(r#"{"test": "Sodium", "value": "13"#, &c).unwrap_err();
        assert_eq!(e.label(), "truncated_answer");
        let e = parse_answer(r#"{"test": "Sodium", "value": null}"#, &c).unwrap_err();
        assert_eq!(e, AnswerError::MissingValue);
        let e = parse_answer(r#"{"test": "Sodium", "value": "N/A"}"#, &c).unwrap_err();
        assert_eq!(e, AnswerError::MissingValue);
        let e = parse_answer(r#"{"test": "Sodium", "value": ["139"]}"#, &c).unwrap_err();
        assert_eq!(e.label(), "bad_answer_field");
        assert!(e.to_string().contains("`value` is an array"));
        // Copied from a few-shot example or invented.
        let it = parse_answer(r#"{"test": "Lipase", "value": "88"}"#, &c).unwrap();
        assert_eq!((it.alignment, it.value.as_deref(), it.ref_high), (Alignment::None, Some("88"), None));
        // A misspelt word value is found fuzzily and kept as printed.
        let q = cand("Bence Jones protein      Not detected     Not detected");
        let it = parse_answer(r#"{"test": "Bence Jones protein", "value": "Not detectd"}"#, &q).unwrap();
        assert_eq!((it.alignment, it.value.as_deref()), (Alignment::Fuzzy, Some("Not detected")));
        // Error messages never repeat document or answer text.
        for e in [AnswerError::NotJson { at: 3 }, AnswerError::MissingValue] {
            assert!(!e.to_string().contains("Sodium"));
        }
    }

    #[test]
    fn answer_qualitative_value() {
        let c = cand("Nitrite              Positive         Negative     A");
        let a =
            r#"{"test": "Nitrite", "value": "Positive", "unit": null, "ref_low": null, "ref_high": null, "flag": "A"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!(item.value_numeric, None);
        assert_eq!(item.flag, Some(Flag::Abnormal));
    }

    #[test]
    fn answer_test_falls_back_to_the_printed_label() {
        // The demo model spells "Chloride" as "Cloride" and swaps the bounds.
        let c = cand("Chloride .............. 104 mmol/L     [98 - 107]");
        let a = r#"{"test":"Cloride","value":"104","unit":"mmol/L","ref_low":"107","ref_high":"98","flag":"CL"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!(item.test.as_deref(), Some("Chloride"));
        assert_eq!((item.ref_low, item.ref_high), (Some(98.0), Some(107.0)));
        assert_eq!(item.flag, Some(Flag::Normal));
        // Shortened names get the printed label; prose gets the subject before the verb.
        let c = cand("Urea nitrogen: 24 mg/dL (ref 7-20) H");
        let a = r#"{"test":"Urea","value":"24","unit":"mg/dL"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().test.as_deref(), Some("Urea nitrogen"));
        let c = cand("AMENDED: Potassium 4.4 mmol/L (ref 3.5-5.1)");
        let a = r#"{"test":"K","value":"4.4"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().test.as_deref(), Some("Potassium"));
        // A word of the name given as the value of a culture: the organism printed after it.
        let c = cand("Sputum culture: Streptococcus pneumoniae, sensitive to amoxicillin");
        let a = r#"{"test":"Sputum","value":"Sputum"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().value.as_deref(), Some("Streptococcus pneumoniae"));
        let c = cand("The troponin I was negative");
        let a = r#"{"test":"The troponin I","value":"negative"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().test.as_deref(), Some("troponin I"));
        // A long sentence before the value is not a label; a printed model test is kept.
        let c = cand("In the emergency department the serum potassium was 5.9 mmol/L");
        let a = r#"{"test":"Kalium","value":"5.9"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().test, None);
        let a = r#"{"test":"serum potassium","value":"5.9"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().test.as_deref(), Some("serum potassium"));
    }

    #[test]
    fn answer_reads_arrows_and_leaders_and_refuses_flags_inside_units() {
        // An arrow before the value is its flag, and no part of the test name.
        let c = cand("WBC .................. ↑ 12.4     x10E3/uL     3.4-10.8");
        let a = r#"{"test":"WBC .................. ↑","value":"12.4","unit":"x10E3/uL","flag":"LL"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.flag), (Some("WBC"), Some(Flag::High)));
        let c = cand("Hematocrit ........... ↓ 36.1     %            37.5-51.0");
        let a = r#"{"test":"Hematocrit","value":"36.1","unit":"%","flag":null}"#;
        assert_eq!(parse_answer(a, &c).unwrap().flag, Some(Flag::Low));
        // A flag in a column of its own before the value; a letter of the name is none.
        let c = cand("Potassium     H     5.8 mmol/L");
        let a = r#"{"test":"Potassium H","value":"5.8","unit":"mmol/L","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.flag), (Some("Potassium"), Some(Flag::High)));
        let c = cand("Vitamin A 1.2 umol/L");
        let a = r#"{"test":"Vitamin A","value":"1.2","flag":"A"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.flag), (Some("Vitamin A"), None));
        // The model's `L` is the `L` of `x10^9/L`, not a printed flag: the range decides.
        let c = cand("B-Leukocyter            11,2       x10^9/L      3,5 - 8,8         *");
        let a =
            r#"{"test":"B-Leukocyter","value":"11,2","unit":"x10^9/L","ref_low":"3,5","ref_high":"8,8","flag":"L"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().flag, Some(Flag::High));
        // A bound of the range after the value is read again as the value.
        let c = cand("Vitamin B12 ........... ↑ >2000   pg/mL        232-1245");
        let a = r#"{"test":"B12","value":"232","unit":"pg/mL","ref_low":null,"ref_high":"1245","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.value.as_deref()), (Some("Vitamin B12"), Some(">2000")));
        assert_eq!(item.flag, Some(Flag::High));
    }

    #[test]
    fn answer_negative_values_keep_their_sign() {
        let c = cand("BE(B) −4.1 mmol/L");
        let a = r#"{"test":"BE(B) −","value":"4.1","unit":"mmol/L"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.value.as_deref()), (Some("BE(B)"), Some("−4.1")));
        assert_eq!(item.value_numeric, Some(-4.1));
        // The high bound of a range is no negative value.
        let c = cand("Potassium 3.5-5.1 5.9 mmol/L");
        let a = r#"{"test":"Potassium","value":"5.9"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().value.as_deref(), Some("5.9"));
    }

    #[test]
    fn answer_result_words_codes_and_cutoffs() {
        // The number after a result word is a cut-off, not the value, nor a bound.
        let c = cand("Cannabinoids (THC)              Negative    50 ng/mL");
        let a = r#"{"test":"Cannabinoids (THC) Negative","value":"50","unit":"ng/mL","ref_low":"50"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.value.as_deref()), (Some("Cannabinoids (THC)"), Some("Negative")));
        assert_eq!((item.unit, item.ref_low, item.ref_high), (None, None, None));
        let c = cand("Oxazepam                        840 ng/mL         (cut-off 100)");
        let a = r#"{"test":"Oxazepam","value":"840","unit":"ng/mL","ref_low":"100","ref_high":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.ref_low, item.ref_high, item.flag), (None, None, None));
        // An allergen code in brackets is no value.
        let c = cand("Dog dander (e5)                  < 0.10 kU/L       Class 0");
        let a = r#"{"test":"Dog dander (","value":"e5","unit":"kU/L"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.value.as_deref()), (Some("Dog dander (e5)"), Some("< 0.10")));
    }

    #[test]
    fn answer_unit_after_the_name_and_one_number_is_no_range() {
        let c = cand("Sodium (mmol/L)  140   135-145");
        let a = r#"{"test":"Sodium (mmol/L)","value":"140"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.unit.as_deref()), (Some("Sodium"), Some("mmol/L")));
        let c = cand("Neutrophils (Absolute) 4.1");
        let a = r#"{"test":"Neutrophils (Absolute)","value":"4.1"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().test.as_deref(), Some("Neutrophils (Absolute)"));
        let c = cand("HbA1c 7.1 % (53 mmol/mol)");
        let a = r#"{"test":"HbA1c","value":"7.1","unit":"%","ref_low":"53","ref_high":"53"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.ref_low, item.ref_high, item.flag), (None, None, None));
    }

    #[test]
    fn answer_units_and_numbers_in_the_wrong_field_are_read_again() {
        // A unit given as the value, a number inside a unit: the printed value instead.
        let c = cand("Hemoglobin was 8.7 g/dL on admission (reference 13.5-17.5)");
        let a = r#"{"test":"Hemoglobin","value":"g/dL","unit":"g/dL"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().value.as_deref(), Some("8.7"));
        let c = cand("with an eGFR of 38 mL/min/1.73m2");
        let a = r#"{"test":"with an eGFR","value":"1.73","unit":"mL/min/1.73m2"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.value.as_deref()), (Some("eGFR"), Some("38")));
        // A number is no test name; a colon inside a name does not cut it.
        let c = cand("CRP 86 (<5)");
        let a = r#"{"test":"86","value":"86"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().test.as_deref(), Some("CRP"));
        let c = cand("His urine albumin:creatinine ratio is 12.4 mg/mmol (normal <3)");
        let a = r#"{"test":"His urine albumin","value":"12.4"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().test.as_deref(), Some("urine albumin:creatinine ratio"));
    }

    #[test]
    fn answer_range_is_read_after_the_value() {
        // One-sided ranges the model gets backwards are read by code.
        let c = cand("HDL cholesterol ....... 38 mg/dL       [>40]          LOW");
        let a = r#"{"test":"HDL cholesterol","value":"38","unit":"mg/dL","ref_low":"30","ref_high":"40","flag":"LOW"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.ref_low, item.ref_high, item.flag), (Some(40.0), None, Some(Flag::Low)));
        // The value itself is never a bound.
        let c = cand("C-reactive protein was 86 mg/L (normal <5)");
        let a = r#"{"test":"C-reactive protein","value":"86","unit":"mg/L","ref_low":"5","ref_high":"86","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.ref_low, item.ref_high, item.flag), (None, Some(5.0), Some(Flag::High)));
        // When code reads no range, printed model bounds are used, in order.
        let c = cand("Glucose 108 mg/dL ref 70 / 99");
        let a = r#"{"test":"Glucose","value":"108","unit":"mg/dL","ref_low":"99","ref_high":"70","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.ref_low, item.ref_high, item.flag), (Some(70.0), Some(99.0), Some(Flag::High)));
    }

    #[test]
    fn answer_unit_must_be_printed_after_the_value() {
        let c = cand("WBC                      11.8     x10^9/L    4.0-11.0     H");
        let a = r#"{"test":"WBC","value":"11.8","unit":"x10^9","ref_low":"4.0","ref_high":"11.0","flag":"H"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().unit.as_deref(), Some("x10^9/L"));
        let c = cand("TSH: 6.8 mIU/L (ref 0.4-4.0) H");
        let a = r#"{"test":"TSH","value":"6.8","unit":"IU/L","ref_low":"0.4","ref_high":"4.0","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!(item.unit.as_deref(), Some("mIU/L"));
        assert_eq!(item.flag, Some(Flag::High), "printed H found by code");
        // Invented units are dropped: none is printed, or a different one is.
        let c = cand("Protein              Trace            Negative     A");
        let a = r#"{"test":"Protein","value":"Trace","unit":"mg/dL","ref_low":"0","ref_high":"A","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.unit, item.ref_low, item.ref_high), (None, None, None));
        assert_eq!(item.flag, Some(Flag::Abnormal));
        // A unit the model got wrong gives way to the one printed right after the value.
        let c = cand("Creatinine 68 µmol/L (ref 45-90)");
        let a = r#"{"test":"Creatinine","value":"68","unit":"mmol/L","ref_low":"45","ref_high":"90","flag":null}"#;
        assert_eq!(parse_answer(a, &c).unwrap().unit.as_deref(), Some("µmol/L"));
        let c = cand("HCT      36.4  %         [40.0  - 50.0 ]  L");
        let a = r#"{"test":"HCT","value":"36.4","unit":null,"ref_low":"40.0","ref_high":"50.0","flag":"L"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().unit.as_deref(), Some("%"));
    }

    #[test]
    fn answer_words_of_the_name_and_numbers_of_other_columns_are_not_the_result() {
        // A word of the test's name given as the value: the number after it is the value.
        let c = cand("Glucosa basal                    126 mg/dL (6,99 mmol/L)      74 - 106 mg/dL           *");
        let a = r#"{"test":"Glucosa","value":"basal","unit":null,"ref_low":null,"ref_high":null,"flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!(item.value.as_deref(), Some("126"));
        assert_eq!((item.ref_low, item.ref_high, item.flag), (Some(74.0), Some(106.0), Some(Flag::High)));
        let c = cand("Cholesterol LDL                     148    H       mg/dl        < 115");
        let a = r#"{"test":"Cholesterol","value":"LDL","unit":"mg/dl","ref_low":null,"ref_high":"115","flag":"H"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.value.as_deref(), item.unit.as_deref()), (Some("148"), Some("mg/dl")));
        // A number with a unit in a column of its own (a dose) gives neither unit nor limit.
        let c = cand("18/11/2026    INR     2.5         31.5 mg        SN");
        let a = r#"{"test":"INR","value":"2.5","unit":"mg","ref_low":"31.5","ref_high":null,"flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.unit, item.ref_low, item.ref_high, item.flag), (None, None, None, None));
        // Low and high limits in columns of their own still carry the unit.
        let c = cand("Potassium   4.1   3.5   5.1 mmol/L");
        let a = r#"{"test":"Potassium","value":"4.1","unit":"mmol/L","ref_low":"3.5","ref_high":"5.1","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.unit.as_deref(), item.ref_low, item.ref_high), (Some("mmol/L"), Some(3.5), Some(5.1)));
    }

    #[test]
    fn answer_counts_with_thousands_grouped_by_spaces() {
        let c = cand("Plaquettes ...........  251 000 /mm3       150 000 - 400 000     238 000  (02/05/26)");
        for value in ["251 000 /mm3", "251 000", "251"] {
            let a = format!(
                r#"{{"test":"Plaquettes","value":"{value}","unit":"/mm3","ref_low":null,"ref_high":null,"flag":null}}"#
            );
            let item = parse_answer(&a, &c).unwrap();
            assert_eq!(item.value.as_deref(), Some("251 000"), "{value}");
            assert_eq!(item.value_numeric, Some(251_000.0));
            assert_eq!(item.unit.as_deref(), Some("/mm3"));
            assert_eq!((item.ref_low, item.ref_high), (Some(150_000.0), Some(400_000.0)));
            assert_eq!(item.flag, Some(Flag::Normal));
        }
        // Without a grouped range, a group starting with another digit is another number.
        let c = cand("Glucose   105   110 mg/dL");
        let a = r#"{"test":"Glucose","value":"105","unit":null,"ref_low":null,"ref_high":null,"flag":null}"#;
        assert_eq!(parse_answer(a, &c).unwrap().value.as_deref(), Some("105"));
    }

    #[test]
    fn answer_value_with_glued_unit_is_split() {
        let c = cand("Platelets ............. 255 x10^3/uL   [150 - 450]");
        let a =
            r#"{"test":"Platelets","value":"255 x10^3/uL","unit":"uL","ref_low":"150","ref_high":"450","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.value.as_deref(), item.value_numeric), (Some("255"), Some(255.0)));
        assert_eq!(item.unit.as_deref(), Some("x10^3/uL"));
    }

    #[test]
    fn answer_glued_unit_beats_the_unit_field_and_exponents_are_not_bounds() {
        let c = cand("Serum iron 7 umol/L (ref 10-30) L");
        let a = r#"{"test":"Iron","value":"7 umol/L","unit":"mmol/L","ref_low":"10","ref_high":"30","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.value.as_deref(), item.unit.as_deref()), (Some("7"), Some("umol/L")));
        assert_eq!(item.flag, Some(Flag::Low));
        let c = cand("Transferrin saturation 8 % (ref 20-50) L");
        let a = r#"{"test":"Transferrin","value":"8%","unit":"L"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.test.as_deref(), item.unit.as_deref()), (Some("Transferrin saturation"), Some("%")));
        let c = cand("White cell count was 14.2 x10^9/L with neutrophilia");
        let a = r#"{"test":"White cell count","value":"14.2","unit":"x10^9/L","ref_low":"9","ref_high":"10"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.ref_low, item.ref_high, item.flag), (None, None, None));
    }

    #[test]
    fn answer_critical_flag_printed_in_the_line() {
        let c = cand("Potassium        6.8 mmol/L    (3.5-5.1)     HH  CRITICAL");
        let a = r#"{"test":"Potassium","value":"6.8","unit":"mmol/L","ref_low":"3.5","ref_high":"5.1","flag":null}"#;
        assert_eq!(parse_answer(a, &c).unwrap().flag, Some(Flag::Critical));
    }

    #[test]
    fn document_answers_are_grounded_line_by_line() {
        let report = "Sodium 139 mmol/L (135-145)\nPotassium 5.9 mmol/L (3.5-5.1) H\n";
        let lines = segment(report, &[]);
        let answer = r#"Here: [{"test":"Potassium","value":"5.9","unit":"mmol/L","ref_low":"3.5","ref_high":"5.1","flag":"H"},
            {"test":"Sodium","value":"139","unit":"mmol/L","ref_low":null,"ref_high":null,"flag":null},
            {"test":"Glucose","value":"5.5","unit":"mmol/L","ref_low":null,"ref_high":null,"flag":null}]"#;
        let items = parse_document_answer(answer, &lines);
        assert_eq!(items.len(), 3);
        let k = items[0].as_ref().unwrap();
        assert_eq!((k.test.as_deref(), k.flag), (Some("Potassium"), Some(Flag::High)));
        assert_eq!(k.evidence_start, lines[1].start);
        let na = items[1].as_ref().unwrap();
        assert_eq!((na.ref_low, na.ref_high, na.evidence_start), (Some(135.0), Some(145.0), lines[0].start));
        let glucose = items[2].as_ref().unwrap();
        assert_eq!((glucose.alignment, glucose.evidence_start, glucose.evidence_end), (Alignment::None, 0, 0));
        assert_eq!(parse_document_answer("no json", &lines)[0].as_ref().unwrap_err().label(), "unparseable_answer");
        assert_eq!(parse_document_answer("[{\"test\":", &lines)[0].as_ref().unwrap_err().label(), "truncated_answer");
    }

    #[test]
    fn answer_value_keeps_its_comparator_and_misread_values_are_read_again() {
        let c = cand("Vitamin B12                   >1476 pmol/L        145-569        H");
        let it = parse_answer(r#"{"test":"Vitamin B12","value":"1476","unit":"pmol/L"}"#, &c).unwrap();
        assert_eq!((it.value.as_deref(), it.unit.as_deref(), it.value_numeric), (Some(">1476"), Some("pmol/L"), None));
        let c = cand("Transferrin saturation        <5 %                20-50          L");
        let it = parse_answer(r#"{"test":"Transferrin saturation","value":"<5 %"}"#, &c).unwrap();
        assert_eq!((it.value.as_deref(), it.unit.as_deref()), (Some("<5"), Some("%")));
        // A letter of the test name, a digit of an exponent: the printed value instead.
        let c = cand("Protéine C réactive ........... 24,5 mg/L       (< 5,0)       *");
        let it = parse_answer(r#"{"test":"Protéine","value":"C"}"#, &c).unwrap();
        assert_eq!(
            (it.test.as_deref(), it.value.as_deref(), it.alignment),
            (Some("Protéine C réactive"), Some("24,5"), Alignment::Exact)
        );
        let c = cand("Neutrófilos               9,07        x10^9/L      [1,80 - 7,50]");
        let it = parse_answer(r#"{"test":"Neutrófilos 9,07 x10^","value":"9"}"#, &c).unwrap();
        assert_eq!(
            (it.test.as_deref(), it.value.as_deref(), it.flag),
            (Some("Neutrófilos"), Some("9,07"), Some(Flag::High))
        );
        // Range and unit in brackets between the test name and the value.
        let c = cand("Glucose, fasting (3.9-5.5 mmol/L) ......... 7.8  H");
        let it = parse_answer(r#"{"test":"Glucose","value":"7.8"}"#, &c).unwrap();
        let got = (it.test.as_deref(), it.unit.as_deref(), it.ref_low, it.ref_high, it.flag);
        assert_eq!(got, (Some("Glucose, fasting"), Some("mmol/L"), Some(3.9), Some(5.5), Some(Flag::High)));
        let c = cand("Urine ACR (<3.0 mg/mmol) .................. 4.6  H");
        let it = parse_answer(r#"{"test":"Urine ACR","value":"<3.0","unit":"mg/mmol"}"#, &c).unwrap();
        assert_eq!((it.value.as_deref(), it.unit.as_deref(), it.ref_high), (Some("4.6"), Some("mg/mmol"), Some(3.0)));
        let c = cand("eGFR (>60 mL/min/1.73m2) .................. >90");
        let it = parse_answer(r#"{"test":"eGFR","value":">60"}"#, &c).unwrap();
        assert_eq!((it.value.as_deref(), it.ref_low), (Some(">90"), Some(60.0)));
        // A one-sided bound after the value is no value.
        let c = cand("TSH 2.1 mIU/L <4.0");
        assert_eq!(parse_answer(r#"{"test":"TSH","value":"4.0"}"#, &c).unwrap().alignment, Alignment::None);
        // Grades and signs stay.
        let c = cand("Nitrite  +   Protein 30 mg/dL");
        assert_eq!(parse_answer(r#"{"test":"Nitrite","value":"+"}"#, &c).unwrap().value.as_deref(), Some("+"));
    }

    #[test]
    fn answer_numbers_of_names_times_and_periods_are_read_again() {
        let value = |line: &str, answer: &str| parse_answer(answer, &cand(line)).unwrap().value;
        let c3 = "Complement C3                           0.62 g/L          (0.75 - 1.65)";
        assert_eq!(value(c3, r#"{"test":"Complement C","value":"3"}"#).as_deref(), Some("0.62"));
        let time = "Repeat K 5.2 on fresh sample at 11:30";
        assert_eq!(value(time, r#"{"test":"K","value":"11:30"}"#).as_deref(), Some("5.2"));
        let period = "Albúmina en orina de 24 h         236 mg/24 h       < 30";
        let item = parse_answer(r#"{"test":"Albúmina","value":"24","unit":"mg/24"}"#, &cand(period)).unwrap();
        assert_eq!((item.value.as_deref(), item.unit.as_deref()), (Some("236"), Some("mg/24 h")));
        // A titre is no clock time; `4.6 H` is a value and its flag.
        let group = "Blood group                  A RhD negative";
        assert_eq!(value(group, r#"{"test":"Blood group","value":"negative"}"#).as_deref(), Some("A RhD negative"));
        let titre = "ANA (IIF)   1:320   (< 1:80)";
        assert_eq!(value(titre, r#"{"test":"ANA","value":"1:320"}"#).as_deref(), Some("1:320"));
        assert_eq!(value("Urine ACR (<3.0 mg/mmol) .... 4.6 H", r#"{"value":"<3.0"}"#).as_deref(), Some("4.6"));
    }

    #[test]
    fn answer_partial_number_is_ungrounded() {
        // "12" is not a token of "12,1" nor equal to 12.1.
        let c = cand("Hämoglobin          12,1   g/dl       12,0–16,0");
        let a = r#"{"test":"Hämoglobin","value":"12","unit":"g/dl","ref_low":"12","ref_high":"16","flag":"H"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().alignment, Alignment::None);
        // A bound of the range after the value is read again as the value.
        let a = r#"{"test":"Hämoglobin","value":"12,0","unit":"g/dl"}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.value.as_deref(), item.alignment), (Some("12,1"), Alignment::Exact));
        // A range-shaped value is its own token, not a bound.
        let c2 = cand("WBC                  25-50 /hpf       0-5          H");
        let a = r#"{"test":"WBC","value":"25-50","unit":"/hpf","ref_low":"0","ref_high":"5","flag":"H"}"#;
        let item = parse_answer(a, &c2).unwrap();
        assert_eq!(
            (item.value_numeric, item.ref_low, item.ref_high, item.flag),
            (None, Some(0.0), Some(5.0), Some(Flag::High))
        );
        // The same number in the other decimal notation is grounded.
        let a = r#"{"test":"Hämoglobin","value":"12.1","unit":"g/dl","ref_low":"12,0","ref_high":"16,0","flag":null}"#;
        let item = parse_answer(a, &c).unwrap();
        assert_eq!((item.value_numeric, item.ref_low, item.ref_high), (Some(12.1), Some(12.0), Some(16.0)));
        assert_eq!(item.flag, Some(Flag::Normal));
    }
}
