//! Domain logic of the `lab-report` pipeline: from a lab report's text to result rows.
//!
//! A report reaches the model only where code cannot read it reliably. The order is:
//!
//! 1. Deterministic parsers read standard structured formats: HL7 v2 OBX segments
//!    ([`parse_hl7_obx`]) and delimited tables with a header row ([`parse_delimited_table`]).
//!    Each returns its items and the character spans it claimed.
//! 2. [`segment`] cuts the rest into candidate result lines (prose sentences into phrases),
//!    skipping claimed spans, headers, addresses, dates, signatures and comments.
//! 3. The model answers one JSON object per candidate (`pipelines/lab-report/prompt.j2`);
//!    [`parse_answer`] turns it into a [`LabItem`], recomputing numbers and the flag in code
//!    and refusing values that do not occur in the candidate.
//!
//! Every offset in this module is in characters (Unicode scalar values) of the document
//! text, the unit of the `evidence_start`/`evidence_end` columns. Nothing here does I/O or
//! calls the model, and no error message carries document text (it would be PHI in logs).

use crate::grounding::Alignment;
use regex::Regex;
use serde_json::{Map, Value};
use std::sync::LazyLock;

// ---------------------------------------------------------------------------------------
// Items
// ---------------------------------------------------------------------------------------

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
            "H" | "HI" | "HIGH" | "↑" => Some(Flag::High),
            "L" | "LO" | "LOW" | "↓" => Some(Flag::Low),
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
    Model,
}

impl Method {
    /// The value written to the `method` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Hl7Obx => "hl7_obx",
            Method::DelimitedTable => "delimited_table",
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
}

/// A character span `(start, end)` of the document, end exclusive.
pub type Span = (usize, usize);

/// What a deterministic parser read: its items, and the spans it claimed (never to be sent
/// to the model).
pub type Parsed = (Vec<LabItem>, Vec<Span>);

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

// ---------------------------------------------------------------------------------------
// Numbers, ranges, flags
// ---------------------------------------------------------------------------------------

/// Reads a plain number: `13.2`, `-2.5`, `1,234.5`, `5,4`, `1.234,5`.
///
/// Comma rule: one comma followed by 1, 2 or 4+ digits is a decimal comma (`5,4` → 5.4);
/// commas between groups of three digits with a dot or a second comma are thousands
/// separators (`1,234.5`, `1,234,567`); `0,125` is a decimal comma (thousands groups never
/// start with 0). A lone `d,ddd` (`1,234`) is ambiguous — 1234 in US reports, 1.234 in
/// European ones (urine specific gravity `1,015`) — and gives `None` rather than a guess.
/// Comparators (`<0.27`, `>60`), words (`negative`) and grades (`1+`) give `None`.
pub fn parse_value(s: &str) -> Option<f64> {
    let s = s.trim();
    let (negative, body) = match s.strip_prefix('-').or_else(|| s.strip_prefix('−')) {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let well_formed = body.starts_with(|c: char| c.is_ascii_digit())
        && body.ends_with(|c: char| c.is_ascii_digit())
        && body.chars().all(|c| c.is_ascii_digit() || c == '.' || c == ',');
    if !well_formed {
        return None;
    }
    let normalized = normalize_separators(body)?;
    let v: f64 = normalized.parse().ok()?;
    v.is_finite().then_some(if negative { -v } else { v })
}

/// Rewrites digits with `.`/`,` separators to a form `f64::from_str` reads, or `None` when
/// the separators are inconsistent or ambiguous (see [`parse_value`]).
fn normalize_separators(body: &str) -> Option<String> {
    let dots = body.matches('.').count();
    let commas = body.matches(',').count();
    let grouped = |int: &str, sep: char| {
        let mut groups = int.split(sep);
        let first = groups.next().unwrap_or("");
        (1..=3).contains(&first.len()) && groups.all(|g| g.len() == 3)
    };
    match (dots, commas) {
        (0, 0) | (1, 0) => Some(body.to_string()),
        (0, 1) => {
            let (int, frac) = body.split_once(',')?;
            if frac.len() != 3 || int.starts_with('0') {
                Some(format!("{int}.{frac}"))
            } else {
                None
            }
        }
        (0, _) => grouped(body, ',').then(|| body.replace(',', "")),
        (_, 0) => grouped(body, '.').then(|| body.replace('.', "")),
        _ => {
            // Both separators: the last one is the decimal mark, the other groups thousands.
            let (dec, group) = if body.rfind('.') > body.rfind(',') { ('.', ',') } else { (',', '.') };
            let (int, frac) = body.rsplit_once(dec)?;
            (grouped(int, group) && !frac.contains(group)).then(|| format!("{}.{frac}", int.replace(group, "")))
        }
    }
}

/// A number as it appears in text: digits with `.`/`,` separators.
const NUM: &str = r"\d+(?:[.,]\d+)*";

static RANGE_BOTH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?i)([-−]?{NUM})\s*(?:-|–|—|\.\.|\bto\b|\bbis\b)\s*([-−]?{NUM})")).unwrap());
static RANGE_UPPER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?i)(?:<=|≤|<|\bup to\b|\bbelow\b|\bless than\b)\s*({NUM})")).unwrap());
static RANGE_LOWER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?i)(?:>=|≥|>|\babove\b|\bgreater than\b)\s*({NUM})")).unwrap());

/// Reads a reference range: `12.0-15.5`, `12.0 - 15.5`, `12,0–15,5`, `3.5 to 5.1`,
/// `(ref 3.5-5.1 mmol/L)` → both bounds; `<5`, `≤5`, `up to 5` → upper only; `>60`, `≥60` →
/// lower only. Bounds are read with [`parse_value`]. A number glued to a letter (`CA19-9`)
/// is not a bound, and a range whose low bound exceeds its high bound is discarded.
pub fn parse_range(s: &str) -> (Option<f64>, Option<f64>) {
    let free = |m: &regex::Match| !preceded_by_alphanumeric(s, m.start());
    if let Some(c) = RANGE_BOTH.captures_iter(s).find(|c| free(&c.get(0).unwrap())) {
        let low = parse_value(&c[1]);
        let high = parse_value(&c[2]);
        return match (low, high) {
            (Some(l), Some(h)) if l > h => (None, None),
            bounds => bounds,
        };
    }
    if let Some(c) = RANGE_UPPER.captures(s) {
        return (None, parse_value(&c[1]));
    }
    if let Some(c) = RANGE_LOWER.captures(s) {
        return (parse_value(&c[1]), None);
    }
    (None, None)
}

fn preceded_by_alphanumeric(s: &str, byte: usize) -> bool {
    s[..byte].chars().next_back().is_some_and(|c| c.is_alphanumeric())
}

/// The flag of a result: a printed flag wins ([`Flag::from_printed`]); otherwise the value
/// is compared with the range, bounds inclusive (`<5` reads as "up to 5"); `None` when
/// there is no printed flag and no numeric value with at least one bound.
pub fn compute_flag(
    value_numeric: Option<f64>,
    ref_low: Option<f64>,
    ref_high: Option<f64>,
    printed: Option<&str>,
) -> Option<Flag> {
    if let Some(flag) = printed.and_then(Flag::from_printed) {
        return Some(flag);
    }
    let v = value_numeric?;
    if ref_low.is_none() && ref_high.is_none() {
        return None;
    }
    if ref_low.is_some_and(|low| v < low) {
        Some(Flag::Low)
    } else if ref_high.is_some_and(|high| v > high) {
        Some(Flag::High)
    } else {
        Some(Flag::Normal)
    }
}

// ---------------------------------------------------------------------------------------
// Lines and character offsets
// ---------------------------------------------------------------------------------------

/// A line of the document without its terminator (`\n`, `\r\n` or `\r`, so HL7 segments
/// separated by carriage returns are lines too).
#[derive(Clone, Copy, Debug)]
struct Line<'a> {
    /// Character offset of the first character.
    start: usize,
    /// Byte offset of the first character.
    byte_start: usize,
    text: &'a str,
}

impl<'a> Line<'a> {
    fn byte_end(&self) -> usize {
        self.byte_start + self.text.len()
    }

    fn char_end(&self) -> usize {
        self.start + self.text.chars().count()
    }

    /// Character span and text of the line without surrounding whitespace.
    fn trimmed(&self) -> (usize, usize, &'a str) {
        let lead = self.text.len() - self.text.trim_start().len();
        let t = self.text.trim();
        let start = self.start + self.text[..lead].chars().count();
        (start, start + t.chars().count(), t)
    }
}

fn split_lines(text: &str) -> Vec<Line<'_>> {
    let mut lines = Vec::new();
    let mut chars = text.char_indices().peekable();
    let (mut line_byte, mut line_char, mut pos) = (0, 0, 0);
    while let Some((byte, c)) = chars.next() {
        if c != '\n' && c != '\r' {
            pos += 1;
            continue;
        }
        lines.push(Line { start: line_char, byte_start: line_byte, text: &text[line_byte..byte] });
        pos += 1;
        line_byte = byte + 1;
        if c == '\r' && chars.peek().is_some_and(|&(_, next)| next == '\n') {
            chars.next();
            pos += 1;
            line_byte += 1;
        }
        line_char = pos;
    }
    if line_byte < text.len() {
        lines.push(Line { start: line_char, byte_start: line_byte, text: &text[line_byte..] });
    }
    lines
}

fn overlaps_any(spans: &[Span], start: usize, end: usize) -> bool {
    spans.iter().any(|&(s, e)| s < end && start < e)
}

// ---------------------------------------------------------------------------------------
// HL7 v2 OBX segments
// ---------------------------------------------------------------------------------------

/// HL7 v2 delimiters, read from MSH-1/MSH-2 when the message has an MSH segment.
struct Hl7Delimiters {
    field: char,
    component: char,
    repetition: char,
    escape: char,
    subcomponent: char,
}

impl Hl7Delimiters {
    const DEFAULT: Self = Self { field: '|', component: '^', repetition: '~', escape: '\\', subcomponent: '&' };

    fn from_lines(lines: &[Line]) -> Self {
        let Some(msh) = lines.iter().map(|l| l.text.trim_start()).find(|t| t.starts_with("MSH")) else {
            return Self::DEFAULT;
        };
        let mut rest = msh[3..].chars();
        let Some(field) = rest.next() else {
            return Self::DEFAULT;
        };
        let enc: Vec<char> = rest.take_while(|&c| c != field).collect();
        let d = Self::DEFAULT;
        Self {
            field,
            component: enc.first().copied().unwrap_or(d.component),
            repetition: enc.get(1).copied().unwrap_or(d.repetition),
            escape: enc.get(2).copied().unwrap_or(d.escape),
            subcomponent: enc.get(3).copied().unwrap_or(d.subcomponent),
        }
    }

    /// `XYZ|...`: three upper-case letters or digits, the first a letter, then the field
    /// delimiter.
    fn is_segment(&self, t: &str) -> bool {
        let mut c = t.chars();
        let id: Vec<char> = c.by_ref().take(3).collect();
        id.len() == 3
            && id[0].is_ascii_uppercase()
            && id.iter().all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit())
            && c.next() == Some(self.field)
    }

    /// Replaces the standard escapes (`\F\`, `\S\`, `\T\`, `\R\`, `\E\`); other escapes
    /// (formatting, hex) become a space.
    fn unescape(&self, s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(i) = rest.find(self.escape) {
            out.push_str(&rest[..i]);
            let after = &rest[i + self.escape.len_utf8()..];
            let Some(j) = after.find(self.escape) else {
                out.push_str(&rest[i..]);
                return out;
            };
            match &after[..j] {
                "F" => out.push(self.field),
                "S" => out.push(self.component),
                "T" => out.push(self.subcomponent),
                "R" => out.push(self.repetition),
                "E" => out.push(self.escape),
                _ => out.push(' '),
            }
            rest = &after[j + self.escape.len_utf8()..];
        }
        out.push_str(rest);
        out
    }
}

/// OBX-11 statuses whose result must not be reported: `D` deletes the observation, `W`
/// marks it as posted in error.
const HL7_WITHDRAWN_STATUSES: [&str; 2] = ["D", "W"];

/// Reads HL7 v2 OBX segments: test = OBX-3 text component (component 2, else the alternate
/// text, component 5; never the code), value = OBX-5 (coded values by their text, structured
/// numerics like `<^0.3` joined to `<0.3`), unit = OBX-6 component 1, range = OBX-7, flag =
/// OBX-8 through [`compute_flag`] (computed from value and range when OBX-8 is empty).
/// Evidence is the segment's span. Every segment of the message (MSH, PID, NTE, ...) is
/// claimed, so no part of it reaches the model. `None` when there is no OBX segment.
pub fn parse_hl7_obx(text: &str) -> Option<Parsed> {
    let lines = split_lines(text);
    let delims = Hl7Delimiters::from_lines(&lines);
    let mut items = Vec::new();
    let mut claimed = Vec::new();
    let mut saw_obx = false;
    for line in &lines {
        let (start, end, seg) = line.trimmed();
        if !delims.is_segment(seg) {
            continue;
        }
        claimed.push((start, end));
        if !seg.starts_with("OBX") {
            continue;
        }
        saw_obx = true;
        if let Some(item) = obx_item(seg, &delims, start, end) {
            items.push(item);
        }
    }
    saw_obx.then_some((items, claimed))
}

fn obx_item(seg: &str, d: &Hl7Delimiters, start: usize, end: usize) -> Option<LabItem> {
    let fields: Vec<&str> = seg.split(d.field).collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or("");
    let component = |f: &str, i: usize| -> Option<String> {
        let c = f.split(d.repetition).next()?.split(d.component).nth(i - 1)?;
        let c = d.unescape(c).trim().to_string();
        (!c.is_empty()).then_some(c)
    };
    if HL7_WITHDRAWN_STATUSES.contains(&field(11).trim()) {
        return None;
    }
    let test = component(field(3), 2).or_else(|| component(field(3), 5));
    let raw_value = field(5);
    let value = match field(2).trim() {
        "SN" => {
            let joined: String = raw_value.split(d.component).map(|c| d.unescape(c)).collect();
            Some(joined.trim().to_string())
        }
        "CE" | "CWE" | "CNE" => component(raw_value, 2).or_else(|| component(raw_value, 1)),
        _ => Some(d.unescape(raw_value).trim().to_string()),
    }
    .filter(|v| !v.is_empty())?;
    let value_numeric = parse_value(&value);
    let unit = component(field(6), 1).or_else(|| component(field(6), 2));
    let (ref_low, ref_high) = parse_range(&d.unescape(field(7)));
    let printed = field(8).split(d.repetition).next().unwrap_or("").trim();
    let printed = (!printed.is_empty()).then_some(printed);
    Some(LabItem {
        test,
        value: Some(value),
        value_numeric,
        unit,
        ref_low,
        ref_high,
        flag: compute_flag(value_numeric, ref_low, ref_high, printed),
        evidence_start: start,
        evidence_end: end,
        method: Method::Hl7Obx,
        alignment: Alignment::Exact,
        from_examples: false,
    })
}

// ---------------------------------------------------------------------------------------
// Delimited tables
// ---------------------------------------------------------------------------------------

/// Delimiters a table may use, tried in this order. Commas are not among them: decimal
/// commas and free text make comma tables ambiguous.
const TABLE_DELIMITERS: [char; 3] = ['|', '\t', ';'];

const TEST_HEADERS: &[&str] = &["test", "tests", "test name", "analyte", "component", "parameter", "investigation"];
const VALUE_HEADERS: &[&str] = &["result", "results", "value", "result value"];
const UNIT_HEADERS: &[&str] = &["unit", "units"];
const RANGE_HEADERS: &[&str] = &[
    "reference",
    "reference range",
    "reference interval",
    "ref",
    "ref range",
    "ref interval",
    "normal range",
    "normal values",
    "range",
];
const FLAG_HEADERS: &[&str] = &["flag", "flags", "abnormal flag", "abn", "h/l"];

/// Column positions of a table, from its header row.
struct Columns {
    test: usize,
    value: usize,
    unit: Option<usize>,
    range: Option<usize>,
    flag: Option<usize>,
}

/// Cells of a delimited line, trimmed; the empty outer cells of `| a | b |` are dropped.
fn split_cells(line: &str, delim: char) -> Vec<&str> {
    let t = line.trim();
    let t = if delim == '|' { t.strip_prefix('|').unwrap_or(t) } else { t };
    let t = if delim == '|' { t.strip_suffix('|').unwrap_or(t) } else { t };
    t.split(delim).map(str::trim).collect()
}

fn header_columns(line: &str) -> Option<(char, Columns)> {
    for delim in TABLE_DELIMITERS {
        if !line.contains(delim) {
            continue;
        }
        let names: Vec<String> = split_cells(line, delim)
            .iter()
            .map(|c| {
                let lower = c.to_lowercase().replace('.', "");
                lower.trim_end_matches(':').split_whitespace().collect::<Vec<_>>().join(" ")
            })
            .collect();
        let find = |set: &[&str]| names.iter().position(|n| set.contains(&n.as_str()));
        if let (Some(test), Some(value)) = (find(TEST_HEADERS), find(VALUE_HEADERS)) {
            let columns =
                Columns { test, value, unit: find(UNIT_HEADERS), range: find(RANGE_HEADERS), flag: find(FLAG_HEADERS) };
            return Some((delim, columns));
        }
    }
    None
}

/// `|---|:---:|` and `====` rows under a header.
fn is_separator_row(line: &str) -> bool {
    let t = line.trim();
    t.contains(['-', '=']) && t.chars().all(|c| matches!(c, '-' | '=' | ':' | '+' | '|' | ';' | '\t' | ' '))
}

/// Reads tables whose cells are separated by `|`, tabs or `;` and whose header row names
/// a test column (test/analyte/component) and a result column (result/value), optionally
/// units, reference range and flag. The table runs until a blank line or a line without
/// the delimiter. Rows without a value (section rows) yield no item. Header, separator and
/// row lines are claimed; evidence is the row's span. Fixed-width whitespace tables are
/// not read here: their columns are guesses, so they go to the model line by line.
/// `None` when no table with at least one row is found.
pub fn parse_delimited_table(text: &str) -> Option<Parsed> {
    let lines = split_lines(text);
    let mut items = Vec::new();
    let mut claimed = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some((delim, cols)) = header_columns(lines[i].text) else {
            i += 1;
            continue;
        };
        let header = lines[i].trimmed();
        let mut j = i + 1;
        while j < lines.len() && !lines[j].text.trim().is_empty() && lines[j].text.contains(delim) {
            let (start, end, row) = lines[j].trimmed();
            claimed.push((start, end));
            if !is_separator_row(row) {
                items.extend(table_item(&split_cells(row, delim), &cols, start, end));
            }
            j += 1;
        }
        if j > i + 1 {
            claimed.push((header.0, header.1));
        }
        i = j.max(i + 1);
    }
    claimed.sort_unstable();
    (!claimed.is_empty()).then_some((items, claimed))
}

fn table_item(cells: &[&str], cols: &Columns, start: usize, end: usize) -> Option<LabItem> {
    let cell = |i: Option<usize>| i.and_then(|i| cells.get(i)).map(|c| c.trim()).filter(|c| !c.is_empty());
    let value = cell(Some(cols.value))?.to_string();
    let value_numeric = parse_value(&value);
    let (ref_low, ref_high) = cell(cols.range).map(parse_range).unwrap_or((None, None));
    Some(LabItem {
        test: cell(Some(cols.test)).map(str::to_string),
        value: Some(value),
        value_numeric,
        unit: cell(cols.unit).map(str::to_string),
        ref_low,
        ref_high,
        flag: compute_flag(value_numeric, ref_low, ref_high, cell(cols.flag)),
        evidence_start: start,
        evidence_end: end,
        method: Method::DelimitedTable,
        alignment: Alignment::Exact,
        from_examples: false,
    })
}

// ---------------------------------------------------------------------------------------
// Segmentation into candidates
// ---------------------------------------------------------------------------------------

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
            |performed|called|comments?|notes?|interpretation|disclaimer|footnote|reference
            |ref\.?\ ranges?|previously|previous\ results?|originally|reason\ for
            |probe|eingang|befund|geb\.|geburtsdatum|einsender|auftrag|seite|kommentar|bemerkung
            |validiert)\b
          | (?:name|date|time|location|ward|room|bed|sex|gender|age|account|visit|encounter|order
            |sample|method|methodology|nb|reason|datum|record|hospital|nhs|acc|lab|laboratory
            |department|source|status|priority)\s*[:\#]
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
static DATE_OR_TIME: LazyLock<Regex> = LazyLock::new(|| {
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
static QUALITATIVE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(?:not\s+detected|none\s+seen|non-?reactive|negative|positive|neg|pos|trace|detected|reactive|absent|present|few|moderate|many|rare|occasional|yellow|amber|straw|clear|cloudy|hazy|turbid)\b",
    )
    .unwrap()
});

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
];

/// Verbs that report a result in running text (`Potassium was ...`, `sodium remained ...`).
const RESULT_VERBS: &[&str] = &[
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
/// Other words that mark running text rather than a table or label line.
const PROSE_WORDS: &[&str] = &["noted", "revealed", "the", "with", "which", "and", "but"];

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
];
/// A phrase without a value of at most this many words (a bare test name, as in
/// "Glucose, fasting, was 108") is carried into the next phrase instead of dropped.
const CARRY_MAX_WORDS: usize = 3;

/// Splits clauses of a sentence: `, and`, `and`, `but`, `while`, `whereas`, commas followed
/// by a space (decimal commas have none) and semicolons.
static PHRASE_SPLIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i),?\s+(?:and|but|while|whereas)\s+|,\s+|;\s*").unwrap());

fn lowercase_words(s: &str) -> impl Iterator<Item = String> + '_ {
    WORD.find_iter(s).map(|m| m.as_str().to_lowercase())
}

/// A value: a digit that is not part of a date or time, or a qualitative result word.
fn has_value(s: &str) -> bool {
    let without_dates = DATE_OR_TIME.replace_all(s, " ");
    without_dates.chars().any(|c| c.is_ascii_digit()) || QUALITATIVE.is_match(s)
}

fn has_test_word(s: &str) -> bool {
    let stripped = QUALITATIVE.replace_all(s, " ");
    ONE_LETTER_TEST.is_match(s)
        || lowercase_words(&stripped).any(|w| w.chars().count() >= 2 && !NOT_TEST_WORDS.contains(&w.as_str()))
}

fn looks_like_result(s: &str) -> bool {
    has_value(s) && has_test_word(s)
}

fn is_header_line(s: &str) -> bool {
    let mut words = lowercase_words(s).peekable();
    words.peek().is_some() && words.all(|w| HEADER_WORDS.contains(&w.as_str()))
}

fn is_address_line(s: &str) -> bool {
    PHONE.is_match(s) || (s.trim_start().starts_with(|c: char| c.is_ascii_digit()) && ADDRESS_WORD.is_match(s))
}

fn is_non_result_line(s: &str) -> bool {
    NON_RESULT_LINE.is_match(s) || is_address_line(s) || is_header_line(s)
}

fn is_prose(s: &str) -> bool {
    let words: Vec<String> = lowercase_words(s).collect();
    words.len() >= PROSE_MIN_WORDS && words.iter().any(|w| is_prose_word(w.as_str()))
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
    let usable = |l: &Line| {
        !l.text.trim().is_empty() && !overlaps_any(claimed, l.start, l.char_end()) && !is_non_result_line(l.text)
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let first = lines[i];
        i += 1;
        if !usable(&first) {
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
            let (start, end, t) = first.trimmed();
            if looks_like_result(t) {
                out.push(Candidate { start, end, text: t.to_string() });
            }
        }
    }
    out
}

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

fn starts_with_continuation(piece: &str) -> bool {
    let first = piece.split_whitespace().next().unwrap_or("").to_lowercase();
    CONTINUATION_WORDS.contains(&first.as_str())
}

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

// ---------------------------------------------------------------------------------------
// Model answers
// ---------------------------------------------------------------------------------------

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
    "↓↓", "*", "!!",
];

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
/// - flag: the model's flag if it occurs in the candidate and is a known flag, else a flag
///   printed after the value (`PRINTED_FLAG_TOKENS`); then [`compute_flag`].
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
    // The row keeps the value as printed (`0,92` where the model wrote `0.92`).
    let value = text[value_start..value_end].to_string();
    let before = &text[..value_start];
    let after = &text[value_end..];

    let test = choose_test(test, text, before);
    // A unit the model copied together with the value is the better witness.
    let unit = glued_unit.and_then(|u| unit_token(after, &u)).or_else(|| unit.and_then(|u| unit_token(after, &u)));
    let (ref_low, ref_high) = match parse_range(after) {
        (None, None) => model_bounds(ref_low, ref_high, after),
        read => read,
    };
    let model_flag = flag.filter(|f| Flag::from_printed(f).is_some() && find_token(text, f, true).is_some());
    let printed = model_flag.or_else(|| printed_flag_after(after));
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
    })
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
    LazyLock::new(|| Regex::new(&format!(r"^([-−]?{NUM})\s*([\p{{L}}%µ/].*)$")).unwrap());

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

/// Byte span of the value in `text`: its first occurrence as a token, else the first
/// number equal to `numeric` (in absolute value: a range's dash is not a minus sign).
/// Occurrences strictly inside a printed reference range do not count, so a bound the
/// model copied as the value (`12` or `12,0` from `12,0–16,0`) is not grounded; a value
/// that is itself range-shaped (`25-50` cells per field) still is.
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

fn find_value(text: &str, value: &str, numeric: Option<f64>) -> Option<(usize, usize)> {
    let ranges: Vec<(usize, usize)> = [&*RANGE_BOTH, &*RANGE_UPPER, &*RANGE_LOWER]
        .iter()
        .flat_map(|re| re.find_iter(text).map(|m| (m.start(), m.end())))
        .collect();
    let in_range = |(s, e): (usize, usize)| ranges.iter().any(|&(rs, re)| rs <= s && e <= re && (rs, re) != (s, e));
    let literal = token_spans(text, value, false).into_iter().find(|&span| !in_range(span));
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
    let separators = |c: char| c.is_whitespace() || matches!(c, ':' | '.' | '=' | ',' | '…' | '-');
    let label = before.trim_end_matches(separators);
    // A prefix such as "AMENDED:" or "Result:" names the line, not the test.
    let label = label.rsplit_once(':').map_or(label, |(_, rest)| rest);
    let words: Vec<&str> = label.split_whitespace().collect();
    let end = words.iter().position(|w| ends_label(&w.to_lowercase())).unwrap_or(words.len());
    let start = usize::from(words.first().is_some_and(|w| ARTICLES.contains(&w.to_lowercase().as_str())));
    let words = &words[start.min(end)..end];
    let label = words.join(" ");
    let label = label.trim_end_matches(separators);
    (label.chars().any(char::is_alphabetic) && words.len() <= MAX_LABEL_WORDS).then(|| label.to_string())
}

/// Words besides [`RESULT_VERBS`] that end a test name in running text
/// (`Hemoglobin of ...`, `CRP rose to ...`).
const LABEL_END_WORDS: &[&str] = &["rose", "fell", "measured", "at", "of", "to"];

fn ends_label(w: &str) -> bool {
    RESULT_VERBS.contains(&w) || LABEL_END_WORDS.contains(&w)
}
const ARTICLES: &[&str] = &["the", "a", "an"];

/// The test: the printed label before the value when it and the model's test contain one
/// another (the demo model shortens `Urea nitrogen` to `Urea`) or the model's test is not
/// printed at all (`K` for `Potassium`, misspellings); otherwise the model's test if printed.
fn choose_test(model: Option<String>, text: &str, before: &str) -> Option<String> {
    let label = label_before(before);
    let model = model.filter(|t| find_token(text, t, false).is_some());
    match (model, label) {
        (Some(m), Some(l)) => {
            let (ml, ll) = (m.to_lowercase(), l.to_lowercase());
            Some(if ll.contains(&ml) || ml.contains(&ll) { l } else { m })
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
    after.split_whitespace().map(trim).find(|token| token.to_lowercase().contains(&needle)).filter(|token| {
        Flag::from_printed(token).is_none()
            && parse_value(token).is_none()
            && token.chars().any(|c| c.is_alphabetic() || c == '%' || c == '/')
    })
}

/// The model's reference bounds, each kept only if that number is printed after the value
/// on its own (not the `10` or `9` of `x10^9/L`); a reversed pair is put in order.
fn model_bounds(low: Option<String>, high: Option<String>, after: &str) -> (Option<f64>, Option<f64>) {
    let standalone = |m: &regex::Match| {
        let before = after[..m.start()].chars().next_back();
        let next = after[m.end()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '^') && !next.is_some_and(|c| c.is_alphabetic() || c == '^')
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
        bounds => bounds,
    }
}

/// The first flag printed after the value (`PRINTED_FLAG_TOKENS`).
fn printed_flag_after(after: &str) -> Option<String> {
    after
        .split_whitespace()
        .map(|t| t.trim_matches(|c: char| matches!(c, '(' | ')' | '[' | ']' | ',' | ';' | '.')))
        .find(|t| {
            PRINTED_FLAG_TOKENS.contains(t)
                || (t.chars().count() > 2 && PRINTED_FLAG_TOKENS.contains(&t.to_uppercase().as_str()))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span_text(text: &str, start: usize, end: usize) -> String {
        text.chars().skip(start).take(end - start).collect()
    }

    // ---- numbers, ranges, flags ----

    #[test]
    fn parse_value_plain_numbers() {
        assert_eq!(parse_value("13.2"), Some(13.2));
        assert_eq!(parse_value(" 142 "), Some(142.0));
        assert_eq!(parse_value("-2.5"), Some(-2.5));
        assert_eq!(parse_value("−3"), Some(-3.0));
        assert_eq!(parse_value("0.005"), Some(0.005));
    }

    #[test]
    fn parse_value_comma_rules() {
        assert_eq!(parse_value("5,4"), Some(5.4));
        assert_eq!(parse_value("12,25"), Some(12.25));
        assert_eq!(parse_value("0,125"), Some(0.125));
        assert_eq!(parse_value("1,2345"), Some(1.2345));
        assert_eq!(parse_value("1,234.5"), Some(1234.5));
        assert_eq!(parse_value("1,234,567"), Some(1_234_567.0));
        assert_eq!(parse_value("1.234,5"), Some(1234.5));
        assert_eq!(parse_value("1.234.567"), Some(1_234_567.0));
        // Ambiguous: thousands in one convention, decimals in the other.
        assert_eq!(parse_value("1,234"), None);
        assert_eq!(parse_value("1,015"), None);
        // Inconsistent grouping.
        assert_eq!(parse_value("12,34,5"), None);
        assert_eq!(parse_value("1.2.3"), None);
        assert_eq!(parse_value("12.03.2024"), None);
    }

    #[test]
    fn parse_value_rejects_non_plain() {
        for s in ["<0.27", ">60", "negative", "1+", "", "-", "13.2 H", "1e5", "5.", ".5", "10^9", "25-50"] {
            assert_eq!(parse_value(s), None, "{s:?}");
        }
    }

    #[test]
    fn parse_range_forms() {
        assert_eq!(parse_range("12.0-15.5"), (Some(12.0), Some(15.5)));
        assert_eq!(parse_range("12.0 - 15.5"), (Some(12.0), Some(15.5)));
        assert_eq!(parse_range("12,0–15,5"), (Some(12.0), Some(15.5)));
        assert_eq!(parse_range("3.5 to 5.1"), (Some(3.5), Some(5.1)));
        assert_eq!(parse_range("(ref 3.5-5.1 mmol/L)"), (Some(3.5), Some(5.1)));
        assert_eq!(parse_range("[150 - 450]"), (Some(150.0), Some(450.0)));
        assert_eq!(parse_range("-2.0 - 2.0"), (Some(-2.0), Some(2.0)));
        assert_eq!(parse_range("<5"), (None, Some(5.0)));
        assert_eq!(parse_range("< 5,0"), (None, Some(5.0)));
        assert_eq!(parse_range("≤ 200"), (None, Some(200.0)));
        assert_eq!(parse_range(">60"), (Some(60.0), None));
        assert_eq!(parse_range("≥ 1.0"), (Some(1.0), None));
        assert_eq!(parse_range("4.0-11.0 x10^9/L"), (Some(4.0), Some(11.0)));
    }

    #[test]
    fn parse_range_refuses_nonsense() {
        assert_eq!(parse_range("Negative"), (None, None));
        assert_eq!(parse_range(""), (None, None));
        assert_eq!(parse_range("15.5-12.0"), (None, None));
        // A tumour-marker name is not a range.
        assert_eq!(parse_range("CA19-9 <37"), (None, Some(37.0)));
    }

    #[test]
    fn printed_flags() {
        let cases = [
            ("H", Flag::High),
            ("HIGH", Flag::High),
            ("high", Flag::High),
            ("↑", Flag::High),
            ("*H*", Flag::High),
            ("L", Flag::Low),
            ("Low", Flag::Low),
            ("↓", Flag::Low),
            ("HH", Flag::Critical),
            ("LL", Flag::Critical),
            ("HH  CRITICAL", Flag::Critical),
            ("critical", Flag::Critical),
            ("PANIC", Flag::Critical),
            ("!!", Flag::Critical),
            ("A", Flag::Abnormal),
            ("ABN", Flag::Abnormal),
            ("abnormal", Flag::Abnormal),
            ("*", Flag::Abnormal),
            ("N", Flag::Normal),
        ];
        for (s, f) in cases {
            assert_eq!(Flag::from_printed(s), Some(f), "{s:?}");
        }
        assert_eq!(Flag::from_printed(""), None);
        assert_eq!(Flag::from_printed("see note"), None);
    }

    #[test]
    fn compute_flag_printed_wins_then_range() {
        assert_eq!(compute_flag(Some(4.0), Some(3.5), Some(5.1), Some("H")), Some(Flag::High));
        assert_eq!(compute_flag(Some(3.0), Some(3.5), Some(5.1), None), Some(Flag::Low));
        assert_eq!(compute_flag(Some(5.9), Some(3.5), Some(5.1), None), Some(Flag::High));
        assert_eq!(compute_flag(Some(5.1), Some(3.5), Some(5.1), None), Some(Flag::Normal));
        assert_eq!(compute_flag(Some(7.0), None, Some(5.0), None), Some(Flag::High));
        assert_eq!(compute_flag(Some(45.0), Some(60.0), None, None), Some(Flag::Low));
        // An unknown printed flag falls back to the computation.
        assert_eq!(compute_flag(Some(3.0), Some(3.5), Some(5.1), Some("?")), Some(Flag::Low));
        assert_eq!(compute_flag(Some(3.0), None, None, None), None);
        assert_eq!(compute_flag(None, Some(1.0), Some(2.0), None), None);
    }

    #[test]
    fn labels_and_names_are_stable() {
        assert_eq!(Flag::Critical.as_str(), "critical");
        assert_eq!(Flag::Abnormal.as_str(), "abnormal");
        assert_eq!(Method::Hl7Obx.as_str(), "hl7_obx");
        assert_eq!(Method::DelimitedTable.as_str(), "delimited_table");
        assert_eq!(Method::Model.as_str(), "model");
        assert_eq!(AnswerError::NotJson { at: 0 }.label(), "unparseable_answer");
        assert_eq!(AnswerError::MissingValue.label(), "missing_value");
    }

    // ---- lines ----

    #[test]
    fn split_lines_handles_all_terminators_and_multibyte() {
        let text = "aµ\r\nb°\rc\n\nd±";
        let lines = split_lines(text);
        let got: Vec<(usize, &str)> = lines.iter().map(|l| (l.start, l.text)).collect();
        assert_eq!(got, vec![(0, "aµ"), (4, "b°"), (7, "c"), (9, ""), (10, "d±")]);
        for l in &lines {
            assert_eq!(span_text(text, l.start, l.char_end()), l.text);
        }
    }

    // ---- HL7 ----

    const HL7: &str = "MSH|^~\\&|LAB|H|EHR|H|20240315083000||ORU^R01|1|P|2.5.1\r\
PID|1||000123^^^H^MR||SAMPLE^TEST||19800101|F\r\
OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL|12.0-15.5|N|||F\r\
OBX|2|NM|2823-3^Potassium^LN||6.9|mmol/L|3.5-5.1|HH|||F\r\
OBX|3|SN|1988-5^CRP^LN||<^0.3|mg/dL|<0.9||||F\r\
OBX|4|NM|2951-2^Sodium^LN||128|mmol/L|136-145||||F\r\
OBX|5|CWE|5778-6^Color^LN||YEL^Yellow^L||||||F\r\
OBX|6|NM|2345-7^^LN^^Glucose, fasting||5.1|mmol/L|3.9\\S\\5.5|||F\r\
OBX|7|NM|9999-9^Deleted test^LN||1.0|U|||||D\r\
NTE|1||Comment 123 text";

    #[test]
    fn hl7_reads_obx_segments() {
        let (items, claimed) = parse_hl7_obx(HL7).unwrap();
        assert_eq!(items.len(), 6, "the deleted observation is dropped");
        let hb = &items[0];
        assert_eq!(hb.test.as_deref(), Some("Hemoglobin"));
        assert_eq!(hb.value.as_deref(), Some("13.2"));
        assert_eq!(hb.value_numeric, Some(13.2));
        assert_eq!(hb.unit.as_deref(), Some("g/dL"));
        assert_eq!((hb.ref_low, hb.ref_high), (Some(12.0), Some(15.5)));
        assert_eq!(hb.flag, Some(Flag::Normal));
        assert_eq!(hb.method, Method::Hl7Obx);
        assert_eq!(items[1].flag, Some(Flag::Critical));
        let crp = &items[2];
        assert_eq!(crp.value.as_deref(), Some("<0.3"));
        assert_eq!(crp.value_numeric, None);
        assert_eq!((crp.ref_low, crp.ref_high), (None, Some(0.9)));
        assert_eq!(crp.flag, None);
        assert_eq!(items[3].flag, Some(Flag::Low), "computed when OBX-8 is empty");
        assert_eq!(items[4].value.as_deref(), Some("Yellow"));
        assert_eq!(items[5].test.as_deref(), Some("Glucose, fasting"), "alternate text");
        assert_eq!(items[5].ref_low, None, "escaped ^ is not a range dash");
        // Every segment is claimed, and evidence is the OBX segment itself.
        assert_eq!(claimed.len(), 10);
        assert!(span_text(HL7, hb.evidence_start, hb.evidence_end).starts_with("OBX|1|NM|718-7"));
        assert!(span_text(HL7, hb.evidence_start, hb.evidence_end).ends_with("|F"));
        assert!(segment(HL7, &claimed).is_empty());
    }

    #[test]
    fn hl7_none_without_obx_and_custom_delimiters() {
        assert!(parse_hl7_obx("MSH|^~\\&|LAB\nPID|1||1").is_none());
        assert!(parse_hl7_obx("Hemoglobin 13.2 g/dL").is_none());
        let custom = "MSH#$~\\&#LAB\nOBX#1#NM#1-1$Urea$LN##7.1#mmol/L#2.5-7.8#H";
        let (items, _) = parse_hl7_obx(custom).unwrap();
        assert_eq!(items[0].test.as_deref(), Some("Urea"));
        assert_eq!(items[0].flag, Some(Flag::High));
    }

    #[test]
    fn hl7_offsets_are_characters() {
        let text = "NTE|1||µ° ± note\nOBX|1|NM|1-1^Kreatinin^LN||88|µmol/L|45–90|||F";
        let (items, _) = parse_hl7_obx(text).unwrap();
        let it = &items[0];
        assert_eq!(it.evidence_start, 17);
        assert_eq!(span_text(text, it.evidence_start, it.evidence_end), text.lines().nth(1).unwrap());
        assert_eq!(it.unit.as_deref(), Some("µmol/L"));
        assert_eq!((it.ref_low, it.ref_high), (Some(45.0), Some(90.0)));
    }

    // ---- delimited tables ----

    #[test]
    fn markdown_pipe_table() {
        let text = "Panel µ°\n\n| Test | Result | Units | Ref. range | Flag |\n|---|---|---|---|---|\n\
| ALT | 64 | U/L | 7-56 | H |\n| Albumin | 3,3 | g/dL | 3,5–5,0 | |\n| CHEMISTRY | | | | |\n\nSigned.";
        let (items, claimed) = parse_delimited_table(text).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].test.as_deref(), Some("ALT"));
        assert_eq!(items[0].flag, Some(Flag::High));
        assert_eq!(items[1].value_numeric, Some(3.3));
        assert_eq!((items[1].ref_low, items[1].ref_high), (Some(3.5), Some(5.0)));
        assert_eq!(items[1].flag, Some(Flag::Low), "computed from the range");
        assert_eq!(items[1].method, Method::DelimitedTable);
        assert_eq!(span_text(text, items[0].evidence_start, items[0].evidence_end), "| ALT | 64 | U/L | 7-56 | H |");
        assert_eq!(claimed.len(), 5, "header, separator and three rows");
        assert!(segment(text, &claimed).is_empty());
    }

    #[test]
    fn tab_and_semicolon_tables() {
        let tab = "Analyte\tValue\tUnit\tReference range\nSodium\t139\tmmol/L\t135-145\nK\t5.9\tmmol/L\t3.5-5.1\n";
        let (items, _) = parse_delimited_table(tab).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].flag, Some(Flag::High));
        let semi = "Component;Result;Units;Normal range\nKalium;5,3;mmol/l;3,5-5,1\n";
        let (items, _) = parse_delimited_table(semi).unwrap();
        assert_eq!(items[0].value_numeric, Some(5.3));
        assert_eq!(items[0].flag, Some(Flag::High));
    }

    #[test]
    fn fixed_width_and_headerless_tables_are_not_parsed() {
        let fixed = "Test      Result   Units\nSodium    139      mmol/L\n";
        assert!(parse_delimited_table(fixed).is_none());
        let headerless = "Sodium|139|mmol/L\nPotassium|4.1|mmol/L\n";
        assert!(parse_delimited_table(headerless).is_none());
    }

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
        assert_eq!(item.unit, None);
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
        let c = cand("Creatinine 68 µmol/L (ref 45-90)");
        let a = r#"{"test":"Creatinine","value":"68","unit":"mmol/L","ref_low":"45","ref_high":"90","flag":null}"#;
        assert_eq!(parse_answer(a, &c).unwrap().unit, None);
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
    fn answer_partial_number_is_ungrounded() {
        // "12" is not a token of "12,1" nor equal to 12.1.
        let c = cand("Hämoglobin          12,1   g/dl       12,0–16,0");
        let a = r#"{"test":"Hämoglobin","value":"12","unit":"g/dl","ref_low":"12","ref_high":"16","flag":"H"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().alignment, Alignment::None);
        let a = r#"{"test":"Hämoglobin","value":"12,0","unit":"g/dl"}"#;
        assert_eq!(parse_answer(a, &c).unwrap().alignment, Alignment::None);
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

    // ---- pipeline files ----

    const PIPELINE_TOML: &str = include_str!("../../pipelines/lab-report/pipeline.toml");
    const PROMPT: &str = include_str!("../../pipelines/lab-report/prompt.j2");
    const SCHEMA: &str = include_str!("../../pipelines/lab-report/schema.json");
    const EXAMPLES: [(&str, &str); 12] = [
        ("amended-result.txt", include_str!("../../examples/lab-reports/amended-result.txt")),
        ("cbc-fixed-width.txt", include_str!("../../examples/lab-reports/cbc-fixed-width.txt")),
        ("chemistry-colon-lines.txt", include_str!("../../examples/lab-reports/chemistry-colon-lines.txt")),
        ("critical-value-call.txt", include_str!("../../examples/lab-reports/critical-value-call.txt")),
        ("european-decimal-comma.txt", include_str!("../../examples/lab-reports/european-decimal-comma.txt")),
        ("hl7-oru.txt", include_str!("../../examples/lab-reports/hl7-oru.txt")),
        ("liver-pipe-table.txt", include_str!("../../examples/lab-reports/liver-pipe-table.txt")),
        ("multi-panel.txt", include_str!("../../examples/lab-reports/multi-panel.txt")),
        ("prose-narrative.txt", include_str!("../../examples/lab-reports/prose-narrative.txt")),
        ("urinalysis-qualitative.txt", include_str!("../../examples/lab-reports/urinalysis-qualitative.txt")),
        ("records.jsonl", include_str!("../../examples/lab-reports/records.jsonl")),
        ("records.csv", include_str!("../../examples/lab-reports/records.csv")),
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
        assert_eq!(spec.extraction.parsers, vec![ParserKind::Hl7Obx, ParserKind::DelimitedTable]);
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
            for parser in [parse_hl7_obx, parse_delimited_table] {
                if let Some((items, spans)) = parser(report) {
                    parsed += items.len();
                    claimed.extend(spans);
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
                "records.csv#csv-semicolon-003" => assert_eq!((parsed, candidates.len()), (4, 0)),
                _ => assert!(parsed == 0 && !candidates.is_empty(), "{name}"),
            }
            model_lines += candidates.len();
        }
        assert!(model_lines > 60, "{model_lines}");
    }
}
