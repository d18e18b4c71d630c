//! Delimited tables with a header row, read without the model.

use super::items::{LabItem, Method, Parsed};
use super::lines::split_lines;
use super::numbers::{compute_flag, parse_range, parse_value};
use crate::grounding::Alignment;

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

#[cfg(test)]
mod tests {
    use super::super::items::Flag;
    use super::super::lines::span_text;
    use super::super::segment::segment;
    use super::*;

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
}
