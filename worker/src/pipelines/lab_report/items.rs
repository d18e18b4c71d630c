//! What a lab report yields: items (one result each), their flags, how they were read, and the
//! candidates the model reads.

use super::classify::{ResultStatus, SetAside};
use crate::grounding::Alignment;

/// Abnormality flag of a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flag {
    Low,
    High,
    Normal,
    Abnormal,
    Critical,
}

impl Flag {
    /// The value written to the `flag` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Low => "low",
            Flag::High => "high",
            Flag::Normal => "normal",
            Flag::Abnormal => "abnormal",
            Flag::Critical => "critical",
        }
    }

    /// Reads a flag as laboratories print it (`H`, `LOW`, `↑`, `HH`, `CRITICAL`, `*`, HL7
    /// OBX-8 codes). `None` for text that is not a known flag.
    pub fn from_printed(printed: &str) -> Option<Flag> {
        let raw = printed.trim();
        if !raw.is_empty() && raw.chars().all(|c| c == '*') {
            // A bare asterisk is the usual "outside reference" marker without direction.
            return Some(Flag::Abnormal);
        }
        let s =
            raw.trim_matches(|c: char| matches!(c, '*' | '(' | ')' | '[' | ']') || c.is_whitespace()).to_uppercase();
        if s.contains("CRIT") || s.contains("PANIC") || s.contains("!!") {
            return Some(Flag::Critical);
        }
        // Multi-word cells like "HH CRITICAL" are caught above; otherwise the first word counts.
        let first = s.split_whitespace().next().unwrap_or("");
        match first {
            "HH" | "LL" | "AA" | "↑↑" | "↓↓" => Some(Flag::Critical),
            "H" | "HI" | "HIGH" | "↑" | "▲" | "⇑" => Some(Flag::High),
            "L" | "LO" | "LOW" | "↓" | "▼" | "⇓" => Some(Flag::Low),
            "A" | "ABN" | "ABNL" | "ABNORMAL" => Some(Flag::Abnormal),
            "N" | "NORM" | "NORMAL" | "WNL" => Some(Flag::Normal),
            _ => None,
        }
    }
}

/// How a row was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Hl7Obx,
    DelimitedTable,
    FixedWidthTable,
    Model,
}

impl Method {
    /// The value written to the `method` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Hl7Obx => "hl7_obx",
            Method::DelimitedTable => "delimited_table",
            Method::FixedWidthTable => "fixed_width_table",
            Method::Model => "model",
        }
    }
}

/// One reported result: a row of `lab_results` before provenance columns are added.
#[derive(Clone, Debug, PartialEq)]
pub struct LabItem {
    pub test: Option<String>,
    /// The value as printed (`"13.2"`, `"<0.3"`, `"Negative"`, `"1+"`).
    pub value: Option<String>,
    /// The value when it is a plain number ([`parse_value`]).
    pub value_numeric: Option<f64>,
    pub unit: Option<String>,
    pub ref_low: Option<f64>,
    pub ref_high: Option<f64>,
    pub flag: Option<Flag>,
    /// Character span of the evidence (segment, table row or candidate) in the document.
    pub evidence_start: usize,
    pub evidence_end: usize,
    pub method: Method,
    /// How the value was found in the evidence: exactly, normalized (`5.4` for `5,4`), or
    /// not at all (`none`: kept, flagged, not trusted).
    pub alignment: Alignment,
    /// The value is not in the document but is in the prompt's examples: copied from them.
    pub from_examples: bool,
    /// Final, preliminary or corrected, as the row or line says; `None` when it says nothing
    /// (the status of its section or report then applies, [`super::classify::StatusMarks`]).
    pub status: Option<ResultStatus>,
}

/// A character span `(start, end)` of the document, end exclusive.
pub type Span = (usize, usize);

/// What a deterministic parser read: its items, the spans it claimed (never to be sent to
/// the model), and the entries it read that are not results (pending, cancelled …).
#[derive(Debug, Default)]
pub struct Parsed {
    pub items: Vec<LabItem>,
    pub claimed: Vec<Span>,
    pub set_aside: Vec<SetAside>,
}

/// A piece of the document the model is asked about: one result line or prose phrase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Character offsets into the document; `end - start == text.chars().count()`.
    pub start: usize,
    pub end: usize,
    /// The span's text, with line breaks of wrapped prose replaced by spaces (one space per
    /// break character, so offsets inside `text` still map onto the document).
    pub text: String,
}

/// A test name without the footnote marks printed after it (`Ferritin ¹`, `Free T4 †`,
/// `Total protein *`): the marks point to a note at the foot of the report, not to the test.
pub fn without_footnote_marks(name: &str) -> &str {
    name.trim_end_matches(|c: char| c.is_whitespace() || is_footnote_mark(c))
}

/// A footnote mark: a superscript digit, a dagger, a section or pilcrow sign, an asterisk.
pub fn is_footnote_mark(c: char) -> bool {
    matches!(c, '¹' | '²' | '³' | '⁴' | '⁵' | '⁶' | '⁷' | '⁸' | '⁹' | '⁰' | '†' | '‡' | '§' | '¶' | '*')
}
