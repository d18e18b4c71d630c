//! Fixed-width (space-aligned) tables with a header row, read without the model.
//!
//! The header row's cells (separated by two spaces or more) name the columns in the
//! languages of [`super::table`]; each row's cells are put under the header cell they
//! overlap most (right-aligned numbers under a left-aligned header included). A header that
//! names the test column twice is two tables printed side by side: each half of a row is a
//! result of its own. A row is read only when every cell lands in a column of its own and
//! every half that holds anything has a test and a value; other rows (section headings,
//! comments, rows whose cells run together) are left to the model, line by line.

use super::classify::SetAside;
use super::items::{Flag, Method, Parsed};
use super::lines::{split_lines, Line};
use super::numbers::parse_value;
use super::table::{header_role, table_item, Columns, Role};
use regex::Regex;
use std::sync::LazyLock;

/// A cell of a space-aligned line: its character columns (within the line) and text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cell<'a> {
    from: usize,
    to: usize,
    text: &'a str,
}

/// Cells of a line split at runs of two or more spaces. `None` for lines with tabs (tab
/// tables are delimited ones) or without text.
fn cells(line: &str) -> Option<Vec<Cell<'_>>> {
    if line.contains('\t') || line.trim().is_empty() {
        return None;
    }
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].1 == ' ' {
            i += 1;
            continue;
        }
        let from = i;
        let mut to = i;
        // A cell runs until two spaces in a row (or the end).
        while to < chars.len() && !(chars[to].1 == ' ' && chars.get(to + 1).is_none_or(|c| c.1 == ' ')) {
            to += 1;
        }
        let (a, b) = (chars[from].0, chars.get(to).map_or(line.len(), |c| c.0));
        out.push(Cell { from, to, text: &line[a..b] });
        i = to;
    }
    Some(out)
}

/// One table of a header: its columns (indices into the header's cells) and their roles.
struct Half {
    /// Header cells of this half, in order.
    header: Vec<usize>,
    columns: Columns,
}

/// A header row: its cells and the one or two tables it heads.
struct Header<'a> {
    cells: Vec<Cell<'a>>,
    halves: Vec<Half>,
}

/// Reads a line as a header: at least three cells, three of them known column names, among
/// them a test and a result column (twice for tables side by side).
fn header(line: &str) -> Option<Header<'_>> {
    let mut cells = cells(line)?;
    if cells.len() < 3 {
        return None;
    }
    let mut roles: Vec<Option<Role>> = cells.iter().map(|c| header_role(c.text)).collect();
    dated_columns(&cells, &mut roles);
    // A monitoring sheet or cumulative table may leave the test column's heading blank
    // (`                Baseline   Week 2   Week 6`): the text left of the first heading is
    // the test column.
    let dated = roles.iter().filter(|r| matches!(r, Some(Role::Value | Role::Previous))).count();
    if !roles.contains(&Some(Role::Test)) && dated >= 2 && cells[0].from >= MIN_TEST_COLUMN_WIDTH {
        cells.insert(0, Cell { from: 0, to: cells[0].from - 1, text: "" });
        roles.insert(0, Some(Role::Test));
    }
    if roles.iter().filter(|r| r.is_some()).count() < 3 {
        return None;
    }
    // A second test column starts a second table.
    let tests: Vec<usize> = (0..roles.len()).filter(|&k| roles[k] == Some(Role::Test)).collect();
    let mut bounds = vec![0];
    bounds.extend(tests.iter().skip(1).copied());
    bounds.push(roles.len());
    let mut halves = Vec::new();
    for w in bounds.windows(2) {
        let columns = Columns::from_roles(&roles[w[0]..w[1]])?;
        halves.push(Half { header: (w[0]..w[1]).collect(), columns });
    }
    Some(Header { cells, halves })
}

/// Fewest characters left blank before the first heading for that blank to be read as an
/// unnamed test column (a test name is rarely shorter).
const MIN_TEST_COLUMN_WIDTH: usize = 6;

/// A cumulative report heads its result columns with the dates of the samples, a monitoring
/// sheet or a stay's summary with time points (`Admission  Day 3  Discharge`, `Baseline
/// Week 2  Week 12`): with no result column named, the column of the latest date or time
/// point (or the one marked `*` or current) is the result, the others earlier values, which
/// are not read.
fn dated_columns(cells: &[Cell], roles: &mut [Option<Role>]) {
    if roles.contains(&Some(Role::Value)) {
        return;
    }
    let points: Vec<(usize, u32)> = cells
        .iter()
        .enumerate()
        .filter(|&(k, _)| roles[k].is_none())
        .filter_map(|(k, c)| time_point(c.text).map(|p| (k, p)))
        .collect();
    if points.len() >= 2 {
        // The latest time point; of equal ones (two `Post` columns), the rightmost.
        let current = points.iter().max_by_key(|&&(k, p)| (p, k)).map(|&(k, _)| k);
        for &(k, _) in &points {
            roles[k] = Some(if Some(k) == current { Role::Value } else { Role::Previous });
        }
        return;
    }
    let dated: Vec<(usize, Option<ColumnDate>)> = cells
        .iter()
        .enumerate()
        .filter(|&(k, _)| roles[k].is_none())
        .filter_map(|(k, c)| column_date(c.text).map(|d| (k, d)))
        .collect();
    if dated.len() < 2 {
        return;
    }
    let marked = dated.iter().find(|(k, _)| cells[*k].text.contains('*')).map(|&(k, _)| k);
    // Day and month in the order that makes every date valid and the columns run in order
    // (day first when both do).
    let keys = |day_first: bool| -> Option<Vec<(u32, u32, u32)>> {
        dated.iter().map(|(_, d)| d.as_ref().and_then(|d| d.key(day_first))).collect()
    };
    let monotonic = |k: &Vec<(u32, u32, u32)>| k.windows(2).all(|w| w[0] <= w[1]) || k.windows(2).all(|w| w[0] >= w[1]);
    let keys = [true, false].into_iter().filter_map(keys).max_by_key(|k| monotonic(k));
    let current = marked.or_else(|| {
        let keys = keys?;
        let latest = (0..keys.len()).max_by_key(|&i| keys[i])?;
        Some(dated[latest].0)
    });
    let Some(current) = current else { return };
    for &(k, _) in &dated {
        roles[k] = Some(if k == current { Role::Value } else { Role::Previous });
    }
}

/// A date heading a result column: day and month in either order (`17/02/25`, `02.17.2025`),
/// or with the month named (`17-Feb-25`); a time after it is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ColumnDate {
    first: u32,
    second: u32,
    year: u32,
    /// The order is known (the month named, or year-month-day): `second` is the month and
    /// `first` the day.
    named: bool,
}

impl ColumnDate {
    /// (year, month, day) with day first or month first; `None` when that order is no date.
    fn key(&self, day_first: bool) -> Option<(u32, u32, u32)> {
        let (day, month) = if day_first || self.named { (self.first, self.second) } else { (self.second, self.first) };
        ((1..=12).contains(&month) && (1..=31).contains(&day)).then_some((self.year, month, day))
    }
}

/// A time point heading a result column, as an order key (earlier points smaller): the start
/// of a stay or treatment (`Admission`, `Baseline`, `Pre`, `J0`), a numbered day, week,
/// month, visit or cycle (`Day 3`, `Week 12`, `M6`, `Tag 5`, `Semaine 4`), or its end
/// (`Discharge`, `Post`, `Current`), in the lexicon's languages. Hours and minutes are no
/// time points here: the columns of a tolerance test (`0 min`, `120 min`) are all results.
fn time_point(cell: &str) -> Option<u32> {
    let c = cell.trim().trim_matches('*').trim().to_lowercase();
    if START_POINT.is_match(&c) {
        return Some(0);
    }
    if END_POINT.is_match(&c) {
        return Some(u32::MAX);
    }
    let caps = NUMBERED_POINT.captures(&c)?;
    let n: u32 = caps.name("n")?.as_str().parse().ok()?;
    let scale = match &caps["unit"] {
        "week" | "wk" | "w" | "woche" | "semaine" | "semana" | "settimana" | "sem" => 7,
        "month" | "mo" | "m" | "monat" | "mois" | "mes" | "mese" | "maand" => 30,
        "year" | "yr" | "jahr" | "an" | "año" | "ano" | "anno" | "jaar" => 365,
        _ => 1,
    };
    Some(n.saturating_mul(scale).saturating_add(1))
}

static START_POINT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)^(?:admission|on\ admission|baseline|pre|pre-?treatment|pre-?op|pre-?dialysis|before|initial|screening
        |aufnahme|ausgangswert|vorher|entrée|entree|avant|ingreso|basal|inicial|antes|ricovero|ingresso
        |prima|opname|início|inicio|[dj]0|t0|day\ 0|week\ 0)$",
    )
    .unwrap()
});

static END_POINT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)^(?:discharge|at\ discharge|on\ discharge|post|post-?treatment|post-?op|post-?dialysis|after|final|latest
        |current|entlassung|nachher|aktuell|sortie|après|apres|actuel|alta|después|despues|actual|dimissione|dopo|attuale
        |ontslag|huidig|atual)$",
    )
    .unwrap()
});

static NUMBERED_POINT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)^(?P<unit>day|d|tag|jour|j|día|dia|giorno|gg|dag|week|wk|w|woche|semaine|semana|settimana|sem|month|mo|m
        |monat|mois|mes|mese|maand|year|yr|jahr|an|año|ano|anno|jaar|visit|visite|visita|bezoek|cycle|zyklus|ciclo
        |cyclus)\.?\s?(?P<n>\d{1,3})$",
    )
    .unwrap()
});

/// `Some(None)`: a date-like heading whose numbers cannot be read; `None`: no date.
fn column_date(cell: &str) -> Option<Option<ColumnDate>> {
    let c = COLUMN_DATE.captures(cell.trim())?;
    let num = |i: usize| c.get(i).and_then(|m| m.as_str().parse::<u32>().ok());
    let year = |i: usize| num(i).map(|y| if y < 100 { 2000 + y } else { y }).unwrap_or(0);
    if let (Some(y), Some(m), Some(d)) = (num(4), num(5), num(6)) {
        return Some(Some(ColumnDate { first: d, second: m, year: y, named: true }));
    }
    if let Some(name) = c.get(8) {
        let month = super::numbers::month_number(name.as_str());
        return Some(month.and_then(|m| Some(ColumnDate { first: num(7)?, second: m, year: year(9), named: true })));
    }
    Some(Some(ColumnDate { first: num(1)?, second: num(2)?, year: year(3), named: false }))
}

static COLUMN_DATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)^\*?\s*(?:
            (\d{1,2})[./-](\d{1,2})(?:[./-](\d{4}|\d{2}))?
          | (\d{4})-(\d{2})-(\d{2})
          | (\d{1,2})[\s-]([A-Za-z]{3})[a-z]*\.?[\s-](\d{4}|\d{2})
        )(?:\s+\d{1,2}:\d{2})?\s*\*?$",
    )
    .unwrap()
});

/// A line of dates or clock times only (`21/11   23/11   26/11`, `08:10   07:55`).
fn dates_only(line: &str) -> bool {
    cells(line)
        .is_some_and(|cells| cells.iter().all(|c| column_date(c.text).is_some() || CLOCK_TIME.is_match(c.text.trim())))
}

static CLOCK_TIME: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\d{1,2}[:.h]\d{2}$").unwrap());

/// The header cell a row cell belongs under: the one it overlaps most, else the one whose
/// span (from its start to the next cell's start) holds the cell's start.
fn column_of(header: &[Cell], cell: &Cell) -> usize {
    let overlap = |h: &Cell| cell.to.min(h.to).saturating_sub(cell.from.max(h.from));
    let best = (0..header.len()).max_by_key(|&k| (overlap(&header[k]), std::cmp::Reverse(k)));
    match best {
        Some(k) if overlap(&header[k]) > 0 => k,
        _ => header.iter().rposition(|h| h.from <= cell.from).unwrap_or(0),
    }
}

/// A value cell that is a value: a number (with `<`/`>`), a qualitative word, or a status
/// the classifier reads (pending …); not a sentence.
fn value_like(v: &str) -> bool {
    let v = v.trim();
    let bare = v.trim_start_matches(['<', '>', '≤', '≥', '=', ' ']);
    let words = || v.split_whitespace();
    parse_value(bare).is_some()
        || super::classify::unresulted(v).is_some()
        || (words().count() <= 2
            && words().all(|w| parse_value(w).is_none())
            && !v.contains(':')
            && (super::segment::is_qualitative(v) || is_grade(v) || super::segment::looks_like_result(v)))
}

/// A dipstick grade or a titre: `1+`, `++`, `1:80`, `1/8`.
fn is_grade(v: &str) -> bool {
    let v = v.trim();
    let plus = v.trim_start_matches(|c: char| c.is_ascii_digit());
    (!plus.is_empty() && plus.chars().all(|c| c == '+') && plus.len() <= 4)
        || v.split_once([':', '/'])
            .is_some_and(|(a, b)| a == "1" && !b.is_empty() && b.chars().all(|c| c.is_ascii_digit()))
}

/// The rows of one line under a header: items and set-aside entries with their character
/// spans, or `None` when the line is not a row of the table.
fn read_row(header: &Header, line: &Line) -> Option<Parsed> {
    let mut row: Vec<Cell> = cells(line.text)?.into_iter().flat_map(|c| split_overflow(&header.cells, c)).collect();
    // A flag printed in a column the header does not name, right of every header cell
    // (`Kalium  5,4 ... 3,5 - 5,1   +`): the row's flag.
    let header_end = header.cells.last().map_or(0, |c| c.to);
    let trailing_flag = match row.last() {
        Some(c) if row.len() > 1 && c.from >= header_end && is_flag_mark(c.text) => row.pop().map(|c| c.text),
        _ => None,
    };
    let mut at: Vec<Option<Cell>> = vec![None; header.cells.len()];
    for c in &row {
        let k = column_of(&header.cells, c);
        if at[k].replace(*c).is_some() {
            return None;
        }
    }
    let mut out = Parsed::default();
    for (h, half) in header.halves.iter().enumerate() {
        let mine: Vec<Cell> = half.header.iter().filter_map(|&k| at[k]).collect();
        let (Some(first), Some(last)) = (mine.first(), mine.last()) else { continue };
        let mut texts: Vec<String> =
            half.header.iter().map(|&k| at[k].map_or(String::new(), |c| c.text.to_string())).collect();
        let mut columns = half.columns.clone();
        // `IN RANGE | OUT OF RANGE`: a value in the second column is the row's value.
        if let Some(o) = columns.out_of_range.filter(|_| texts[columns.value].is_empty()) {
            texts.swap(columns.value, o);
        }
        // `125 mUI/mL` under the result header of a table without a unit column (or with
        // an empty unit cell): the value and its unit.
        let v = columns.value;
        if let Some(c) = VALUE_WITH_UNIT.captures(&texts[v].clone()).filter(|c| Flag::from_printed(&c[2]).is_none()) {
            split_cell(&mut texts, &mut columns.unit, v, &c[1], &c[2]);
        }
        // `5.9 H` under the result header: the flag printed right after the value.
        let split = texts[v].rsplit_once(' ').map(|(value, flag)| (value.trim().to_string(), flag.to_string()));
        if let Some((value, flag)) = split.filter(|(v, f)| Flag::from_printed(f).is_some() && parse_value(v).is_some())
        {
            split_cell(&mut texts, &mut columns.flag, v, &value, &flag);
        }
        if let Some(flag) = trailing_flag.filter(|_| h + 1 == header.halves.len()) {
            match columns.flag {
                Some(k) if texts[k].is_empty() => texts[k] = flag.to_string(),
                Some(_) => {}
                None => {
                    texts.push(flag.to_string());
                    columns.flag = Some(texts.len() - 1);
                }
            }
        }
        columns.count = texts.len();
        // A row without a value whose status cell says why (`In process`, `Cancelled`) is
        // an entry without a result.
        let unresulted =
            columns.status.is_some_and(|k| matches!(super::classify::read_status(&texts[k]), Some(Err(_))));
        if texts[columns.test].is_empty() || !(value_like(&texts[columns.value]) || unresulted) {
            return None;
        }
        // A row indented under the test column and without a unit in a table that prints
        // units (a phase- or age-specific reference range under its result,
        // `   Postmenopausal   < 103`) is no result of its own: left to the line reader.
        let indented = at[half.header[half.columns.test]]
            .is_some_and(|t| t.from > header.cells[half.header[half.columns.test]].from + 1);
        if indented && half.columns.unit.is_some() && columns.unit.is_some_and(|u| texts[u].is_empty()) {
            return None;
        }
        let (start, end) = (line.start + first.from, line.start + last.to);
        match table_item(&texts, &columns, start, end, Method::FixedWidthTable)? {
            Ok(item) => out.items.push(item),
            Err(reason) => out.set_aside.push(SetAside { reason, start, end }),
        }
    }
    (!out.items.is_empty() || !out.set_aside.is_empty()).then(|| {
        let (start, end, _) = line.trimmed();
        out.claimed.push((start, end));
        out
    })
}

/// A long test name pushes the first value against it with one space
/// (`eGFR (mL/min/1.73m2) >90   >90   86`): a cell that runs past the start of the next
/// heading and ends in a number there is two cells, the name and the number.
fn split_overflow<'a>(header: &[Cell], c: Cell<'a>) -> Vec<Cell<'a>> {
    let Some(h) = header.iter().find(|h| c.from < h.from && h.from < c.to) else { return vec![c] };
    let Some((head, tail)) = c.text.rsplit_once(' ') else { return vec![c] };
    let head_to = c.from + head.trim_end().chars().count();
    let number = parse_value(tail.trim_start_matches(['<', '>', '≤', '≥'])).is_some();
    if !number || !head.chars().any(char::is_alphabetic) || head_to > h.from + 1 {
        return vec![c];
    }
    let tail_from = c.to - tail.chars().count();
    vec![Cell { from: c.from, to: head_to, text: head.trim_end() }, Cell { from: tail_from, to: c.to, text: tail }]
}

/// A printed flag or an out-of-range mark (`H`, `+`, `-`, `*`, `!`).
fn is_flag_mark(text: &str) -> bool {
    let t = text.trim();
    Flag::from_printed(t).is_some()
        || (!t.is_empty() && t.len() <= 2 && t.chars().all(|c| matches!(c, '+' | '-' | '*' | '!')))
}

/// Splits the value cell `v` into `value` and a `rest` (a unit or a flag) that goes to the
/// column `slot` when that cell is empty, or to a new cell when the table has no such column.
/// Nothing changes when the column's cell already holds something.
fn split_cell(texts: &mut Vec<String>, slot: &mut Option<usize>, v: usize, value: &str, rest: &str) {
    match *slot {
        Some(k) if !texts[k].is_empty() => return,
        Some(k) => texts[k] = rest.to_string(),
        None => {
            texts.push(rest.to_string());
            *slot = Some(texts.len() - 1);
        }
    }
    texts[v] = value.to_string();
}

/// A value and a unit in one cell (`125 mUI/mL`, `>250 UI/mL`, `8 %`); not a value with a
/// flag (`5.9 H`).
static VALUE_WITH_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^((?:[<>≤≥]=?\s?)?\d+(?:[.,]\d+)?)\s+((?:[µμa-zA-Z%][^\s]*|x\s?10\S*|10\^\S*))$").unwrap()
});

/// `----` and `====` rules under a header.
fn is_rule(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && t.chars().all(|c| matches!(c, '-' | '=' | '_' | ' ' | '+'))
}

/// Reads space-aligned tables with a header row (see the module comment). A table runs from
/// its header to the next blank line (a rule or one blank line right under the header
/// aside) or the next header. `None` when no row of any table is read.
pub fn parse_fixed_width_table(text: &str) -> Option<Parsed> {
    let lines = split_lines(text);
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < lines.len() {
        let Some(h) = header(lines[i].text) else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        let mut rows = 0;
        let mut claimed = Vec::new();
        while j < lines.len() {
            let l = &lines[j];
            if l.text.trim().is_empty() {
                if rows == 0 && j == i + 1 {
                    j += 1;
                    continue;
                }
                break;
            }
            // The dates or times of the samples printed under the columns' time points
            // (`Admission   Day 3   Discharge` over `21/11   23/11   26/11`) head no table.
            if rows == 0 && dates_only(l.text) {
                j += 1;
                continue;
            }
            if header(l.text).is_some() {
                break;
            }
            if is_rule(l.text) {
                let (s, e, _) = l.trimmed();
                claimed.push((s, e));
            } else if let Some(p) = read_row(&h, l) {
                rows += 1;
                parsed.items.extend(p.items);
                parsed.set_aside.extend(p.set_aside);
                claimed.extend(p.claimed);
            }
            j += 1;
        }
        if rows > 0 {
            let (s, e, _) = lines[i].trimmed();
            parsed.claimed.push((s, e));
            parsed.claimed.extend(claimed);
        }
        i = j.max(i + 1);
    }
    parsed.claimed.sort_unstable();
    (!parsed.items.is_empty()).then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::super::classify::NonResult;
    use super::super::lines::span_text;
    use super::super::segment::segment;
    use super::*;

    #[test]
    fn cells_split_at_two_spaces() {
        let got: Vec<_> =
            cells("  Mean cell volume   88.1 fL  80-100").unwrap().iter().map(|c| (c.from, c.text)).collect();
        assert_eq!(got, [(2, "Mean cell volume"), (21, "88.1 fL"), (30, "80-100")]);
        assert!(cells("a\tb").is_none());
    }

    #[test]
    fn aligned_table_with_header() {
        let text = "\
FULL BLOOD COUNT
Test                      Result   Units      Reference    Flag
-----------------------------------------------------------------
Haemoglobin                11.4    g/dL       13.5-17.5    L
White cell count            7.2    x10^9/L    4.0-11.0
Platelets                   452    x10^9/L    150-400
Reticulocytes            Pending   %          0.5-2.5
Comment: sample slightly lipaemic, results not affected

Signed";
        let Parsed { items, claimed, set_aside } = parse_fixed_width_table(text).unwrap();
        let got: Vec<_> = items
            .iter()
            .map(|i| (i.test.as_deref().unwrap(), i.value.as_deref().unwrap(), i.unit.as_deref(), i.ref_high, i.flag))
            .collect();
        assert_eq!(
            got,
            [
                ("Haemoglobin", "11.4", Some("g/dL"), Some(17.5), Some(Flag::Low)),
                ("White cell count", "7.2", Some("x10^9/L"), Some(11.0), Some(Flag::Normal)),
                ("Platelets", "452", Some("x10^9/L"), Some(400.0), Some(Flag::High)),
            ]
        );
        assert!(items.iter().all(|i| i.method == Method::FixedWidthTable && i.status.is_none()));
        assert_eq!(set_aside.iter().map(|s| s.reason).collect::<Vec<_>>(), [NonResult::Pending]);
        assert_eq!(
            span_text(text, items[0].evidence_start, items[0].evidence_end),
            "Haemoglobin                11.4    g/dL       13.5-17.5    L"
        );
        // Header, rule, four rows; the comment is left to the rest of the pipeline.
        assert_eq!(claimed.len(), 6);
        let left: Vec<_> = segment(text, &claimed).into_iter().map(|c| c.text).collect();
        assert!(left.iter().all(|t| !t.contains("Platelets") && !t.contains("Reticulocytes")), "{left:?}");
    }

    #[test]
    fn two_tables_side_by_side() {
        let text = "\
Analyte        Result  Units     Range         Analyte       Result  Units    Range
Sodium            139  mmol/L    135-145       ALT               64  U/L      7-56
Potassium         5.9  mmol/L    3.5-5.1       Albumin         33,0  g/L      35-50
Urea              6.1  mmol/L    2.5-7.8
                                               Bilirubin         12  umol/L   <21
";
        let Parsed { items, claimed, .. } = parse_fixed_width_table(text).unwrap();
        let got: Vec<_> =
            items.iter().map(|i| (i.test.as_deref().unwrap(), i.value.as_deref().unwrap(), i.flag)).collect();
        assert_eq!(
            got,
            [
                ("Sodium", "139", Some(Flag::Normal)),
                ("ALT", "64", Some(Flag::High)),
                ("Potassium", "5.9", Some(Flag::High)),
                ("Albumin", "33,0", Some(Flag::Low)),
                ("Urea", "6.1", Some(Flag::Normal)),
                ("Bilirubin", "12", Some(Flag::Normal)),
            ]
        );
        // Each half's evidence is its own cells.
        assert_eq!(
            span_text(text, items[1].evidence_start, items[1].evidence_end),
            "ALT               64  U/L      7-56"
        );
        assert_eq!(claimed.len(), 5);
    }

    #[test]
    fn other_languages_and_flags_after_values() {
        let text = "\
Untersuchung        Ergebnis    Einheit    Referenzbereich
Kalium              5,8 H       mmol/l     3,5-5,1
Natrium             131 L       mmol/l     135-145
";
        // No flag column: the letter after the value is the flag.
        let Parsed { items, .. } = parse_fixed_width_table(text).unwrap();
        let got: Vec<_> = items.iter().map(|i| (i.value.as_deref().unwrap(), i.flag)).collect();
        assert_eq!(got, [("5,8", Some(Flag::High)), ("131", Some(Flag::Low))]);
        let text = "\
Paramètre         Résultat   Unité      Valeurs de référence   Indicateur
Créatinine        82 H       µmol/L     45-80
";
        let Parsed { items, .. } = parse_fixed_width_table(text).unwrap();
        assert_eq!((items[0].value.as_deref(), items[0].flag), (Some("82"), Some(Flag::High)));
    }

    #[test]
    fn values_with_units_and_qualitative_results() {
        let text = "\
Determinación                    Resultado       Valor de referencia
Anticuerpos anti-HBs             125 mUI/mL      >10
Treponema pallidum               Positivo        Negativo
Anticuerpos anti-VHC             Negativo        Negativo
Toxoplasma IgG                   Pendiente
Rubéola IgG                      >250 UI/mL      >10
";
        let Parsed { items, set_aside, .. } = parse_fixed_width_table(text).unwrap();
        let got: Vec<_> =
            items.iter().map(|i| (i.value.as_deref().unwrap(), i.unit.as_deref(), i.ref_low, i.flag)).collect();
        assert_eq!(
            got,
            [
                ("125", Some("mUI/mL"), Some(10.0), Some(Flag::Normal)),
                ("Positivo", None, None, Some(Flag::Abnormal)),
                ("Negativo", None, None, None),
                (">250", Some("UI/mL"), Some(10.0), None),
            ]
        );
        assert_eq!(set_aside.len(), 1);
    }

    #[test]
    fn rows_that_do_not_fit_are_left_to_the_model() {
        let text = "\
Test          Result   Units    Reference
CHEMISTRY
Sodium        139      mmol/L   135-145
Mean corpuscular haemoglobin concentration 331 g/L 320-360
";
        let Parsed { items, claimed, .. } = parse_fixed_width_table(text).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(claimed.len(), 2, "the header and the sodium row");
        // Prose and two-cell lines are no header.
        assert!(parse_fixed_width_table("Test results  are  attached\nSodium  139\n").is_none());
    }

    #[test]
    fn in_range_and_out_of_range_columns() {
        let text = "TEST NAME                     IN RANGE     OUT OF RANGE    REFERENCE RANGE       LAB\n\
HEMOGLOBIN A1c                             6.9 H           <5.7 %                01\n\
   For someone without known diabetes, a value of 6.5% or greater indicates diabetes.\n\
GLUCOSE                       94                           65-99 mg/dL           01\n\
PSA, TOTAL                    1.2                          < OR = 4.0 ng/mL      02\n";
        let p = parse_fixed_width_table(text).unwrap();
        let got: Vec<_> = p
            .items
            .iter()
            .map(|i| {
                (
                    i.test.as_deref().unwrap(),
                    i.value.as_deref().unwrap(),
                    i.unit.as_deref(),
                    i.ref_low,
                    i.ref_high,
                    i.flag,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("HEMOGLOBIN A1c", "6.9", Some("%"), None, Some(5.7), Some(Flag::High)),
                ("GLUCOSE", "94", Some("mg/dL"), Some(65.0), Some(99.0), Some(Flag::Normal)),
                ("PSA, TOTAL", "1.2", Some("ng/mL"), None, Some(4.0), Some(Flag::Normal)),
            ]
        );
    }

    #[test]
    fn cumulative_tables_read_the_latest_column() {
        let values = |text: &str| -> Vec<String> {
            parse_fixed_width_table(text).unwrap().items.into_iter().filter_map(|i| i.value).collect()
        };
        // Oldest first, day first.
        let text = "\
Test        03/02/25   10/02/25   17/02/25   Units    Ref range
            08:10      07:55      08:20
Sodium      131        134        137        mmol/L   133-146
Potassium   5.8        5.2        4.6        mmol/L   3.5-5.3
";
        assert_eq!(values(text), ["137", "4.6"]);
        // Newest first, month first (`12/28` can only be month/day), and a marked column.
        let text = "\
Test        01/03/2025   12/28/2024   12/14/2024   Units
Sodium      140          138          135          mmol/L
";
        assert_eq!(values(text), ["140"]);
        let text = "\
Test        2025-02-03   2025-02-10*   2025-02-17   Units
Sodium      131          134           137          mmol/L
";
        assert_eq!(values(text), ["134"]);
        let text = "Test     Previous   Current   Units\nCRP      41         18        mg/L\n";
        assert_eq!(values(text), ["18"]);
        // Indented rows without a unit under a result (phase-specific ranges) are left alone.
        let text = "\
Test                 Result   Units
FSH                  7.4      IU/L
   Luteal phase      1.7 - 7.7
   Postmenopausal    < 103
";
        assert_eq!(values(text), ["7.4"]);
    }

    #[test]
    fn lower_reference_limit_columns() {
        let text = "Parameter              Result        Lower reference limit\n\
Sperm concentration    12 x10^6/mL   16\nVitality               61 %          54\nAgglutination          Not seen\n";
        let items = parse_fixed_width_table(text).unwrap().items;
        let read: Vec<_> =
            items.iter().map(|i| (i.value.as_deref().unwrap(), i.unit.as_deref(), i.ref_low, i.flag)).collect();
        assert_eq!(
            read,
            [
                ("12", Some("x10^6/mL"), Some(16.0), Some(Flag::Low)),
                ("61", Some("%"), Some(54.0), Some(Flag::Normal)),
                ("Not seen", None, None, None)
            ]
        );
    }

    #[test]
    fn time_point_columns_read_the_latest_point() {
        let items = |text: &str| parse_fixed_width_table(text).expect(text).items;
        // A stay's summary: time points over the dates of the samples.
        let text = "\
Test            Units     Admission   Day 3     Discharge   Ref. range
                          21/11       23/11     26/11
Sodium          mmol/L    129         134       139         133 - 146
CRP             mg/L      311         190       46          < 5
";
        let got = items(text);
        let values: Vec<_> = got.iter().filter_map(|i| i.value.as_deref()).collect();
        assert_eq!(values, ["139", "46"]);
        assert_eq!(got[1].flag, Some(Flag::High));
        // A monitoring sheet: no heading over the tests, units in the names, a value pushed
        // against a long name, `*` marks, the latest point first or last.
        let text = concat!(
            "                    Baseline     Week 2       Week 12\n",
            "ALT (U/L)           22           31           71 *\n",
            "eGFR (mL/min/1.73m2) >90         >90          83\n",
            "WBC (x10^9/L)       7.9          6.1          3.6 *\n",
        );
        let got = items(text);
        let read: Vec<_> = got
            .iter()
            .map(|i| (i.test.as_deref().unwrap(), i.value.as_deref().unwrap(), i.unit.as_deref(), i.flag))
            .collect();
        assert_eq!(
            read,
            [
                ("ALT", "71", Some("U/L"), Some(Flag::Abnormal)),
                ("eGFR", "83", Some("mL/min/1.73m2"), None),
                ("WBC", "3.6", Some("x10^9/L"), Some(Flag::Abnormal)),
            ]
        );
        let text = "Test        Week 12   Week 6   Baseline   Units\nAlbumin     38        39       41         g/L\n";
        assert_eq!(items(text)[0].value.as_deref(), Some("38"));
        // Minutes of a tolerance test are no time points: every column is a result of its own.
        assert_eq!(time_point("120 min"), None);
        assert_eq!(
            (time_point("Admission"), time_point("Tag 3"), time_point("Entlassung")),
            (Some(0), Some(4), Some(u32::MAX))
        );
        assert!(time_point("Semaine 2") > time_point("J10"));
    }
}
