//! Delimited tables with a header row, read without the model.

use super::classify::{read_status, unresulted, NonResult, SetAside};
use super::items::{Flag, LabItem, Method, Parsed};
use super::lines::split_lines;
use super::numbers::{compute_flag, parse_range, parse_value, NUM};
use crate::grounding::Alignment;
use regex::Regex;
use std::sync::LazyLock;

/// Delimiters a table may use, tried in this order. A comma table must be real CSV: its
/// header names a test and a result column, and each row has exactly the header's number of
/// fields once quotes are honoured (so prose and decimal commas are not read as cells).
const TABLE_DELIMITERS: [char; 4] = ['|', '\t', ';', ','];

/// What a header cell names. Header words are compared lower-cased, with dots, `_` and
/// repeated spaces folded (`REF_RANGE` = `ref range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Test,
    Value,
    Unit,
    Range,
    /// A range with its unit after it (`135 - 145 mmol/L` under `Ref Range & Units`).
    RangeUnit,
    Low,
    High,
    Flag,
    Status,
    /// An earlier result (a cumulative report's previous column): not read.
    Previous,
    /// The result column of out-of-range values, beside a `Value` column of in-range ones
    /// (`IN RANGE | OUT OF RANGE`): a row's value is in one of the two.
    OutOfRange,
}

/// Header names of each role, in English, French, German, Spanish, Italian, Dutch and
/// Portuguese (the languages of the analyte lexicon; LIS exports and printed tables),
/// written from the conventions of laboratory information systems.
const HEADERS: &[(Role, &[&str])] = &[
    (
        Role::Test,
        &[
            "test",
            "tests",
            "test name",
            "testname",
            "analyte",
            "component",
            "parameter",
            "investigation",
            "examination",
            "observation",
            "term",
            "description",
            "assay",
            "determination",
            "analyse",
            "analyses",
            "examen",
            "paramètre",
            "parametre",
            "libellé",
            "libelle",
            "untersuchung",
            "analyt",
            "bezeichnung",
            "prueba",
            "determinación",
            "determinacion",
            "análisis",
            "analisis",
            "magnitud",
            "esame",
            "esami",
            "analisi",
            "parametro",
            "test eseguito",
            "bepaling",
            "bepalingen",
            "onderzoek",
            "exame",
            "análise",
        ],
    ),
    (
        Role::Value,
        &[
            "result",
            "results",
            "value",
            "current",
            "current result",
            "latest",
            "latest result",
            "aktuell",
            "actuel",
            "actual",
            "attuale",
            "huidig",
            "atual",
            "result value",
            "observed value",
            "résultat",
            "resultat",
            "valeur",
            "ergebnis",
            "wert",
            "messwert",
            "befund",
            "resultado",
            "valor",
            "risultato",
            "esito",
            "valore",
            "uitslag",
            "resultaat",
            "waarde",
            "resultado do exame",
            "in range",
            "within range",
            "normal result",
        ],
    ),
    (
        Role::Unit,
        &[
            "unit",
            "units",
            "uom",
            "unité",
            "unite",
            "unités",
            "einheit",
            "unidad",
            "unidades",
            "unità",
            "unita",
            "udm",
            "u m",
            "eenheid",
            "eenheden",
            "unidade",
            "unità di misura",
            "unita di misura",
            "unité de mesure",
            "unidad de medida",
            "unidade de medida",
            "maßeinheit",
            "masseinheit",
        ],
    ),
    (
        Role::Range,
        &[
            "reference",
            "reference range",
            "reference interval",
            "reference values",
            "ref",
            "ref range",
            "ref interval",
            "normal range",
            "normal values",
            "range",
            "références",
            "reference",
            "valeurs de référence",
            "valeurs de reference",
            "intervalle de référence",
            "normes",
            "referenzbereich",
            "referenzwert",
            "referenzwerte",
            "normbereich",
            "normalwerte",
            "valores de referencia",
            "valor de referencia",
            "valeur de référence",
            "valeur de reference",
            "valore di riferimento",
            "valor de referência",
            "referenzintervall",
            "referenz",
            "intervalo de referencia",
            "rango de referencia",
            "rango",
            "valori di riferimento",
            "intervallo di riferimento",
            "range di riferimento",
            "valori normali",
            "referentie",
            "referentiewaarden",
            "referentiewaarde",
            "normaalwaarden",
            "valores de referência",
            "valores de referencia",
            "intervalo de referência",
        ],
    ),
    (
        Role::RangeUnit,
        &[
            "ref range & units",
            "ref range and units",
            "ref range/units",
            "reference range & units",
            "reference range and units",
            "reference range/units",
            "reference interval & units",
            "reference interval/units",
            "normal range & units",
            "normal range/units",
            "range & units",
            "range and units",
            "range/units",
            "référence et unité",
            "référence/unité",
            "referenzbereich/einheit",
            "referenzbereich und einheit",
            "rango/unidades",
            "valores de referencia/unidades",
            "riferimento/unità",
            "referentie/eenheid",
        ],
    ),
    (
        Role::Low,
        &[
            "low",
            "ref low",
            "lower limit",
            "low limit",
            "min",
            "minimum",
            "lower",
            "limite inférieure",
            "limite inferieure",
            "untere grenze",
            "untergrenze",
            "unterer referenzwert",
            "lower reference limit",
            "lower reference limits",
            "lower reference",
            "reference low",
            "ref lower",
            "lower ref",
            "lower limit of normal",
            "lln",
            "normal low",
            "valeur inférieure",
            "untere referenzgrenze",
            "límite inferior de referencia",
            "limite inferiore",
            "límite inferior",
            "limite inferior",
            "mínimo",
            "minimo",
        ],
    ),
    (
        Role::High,
        &[
            "high",
            "ref high",
            "upper limit",
            "high limit",
            "max",
            "maximum",
            "upper",
            "limite supérieure",
            "limite superieure",
            "obere grenze",
            "obergrenze",
            "oberer referenzwert",
            "upper reference limit",
            "upper reference limits",
            "upper reference",
            "reference high",
            "ref upper",
            "upper ref",
            "upper limit of normal",
            "uln",
            "normal high",
            "valeur supérieure",
            "obere referenzgrenze",
            "límite superior de referencia",
            "limite superiore",
            "límite superior",
            "limite superior",
            "máximo",
            "maximo",
        ],
    ),
    (
        Role::Flag,
        &[
            "flag",
            "flags",
            "abnormal flag",
            "abn",
            "h/l",
            "indicator",
            "interpretation",
            "indicateur",
            "anomalie",
            "kennzeichen",
            "markierung",
            "bewertung",
            "indicador",
            "marca",
            "fuera de rango",
            "segnalazione",
            "fuori range",
            "afwijkend",
            "markering",
            "alerta",
        ],
    ),
    (
        Role::Previous,
        &[
            "previous",
            "prev",
            "previous result",
            "last result",
            "prior",
            "prior result",
            "vorwert",
            "vorbefund",
            "précédent",
            "precedent",
            "résultat antérieur",
            "antérieur",
            "anterior",
            "resultado anterior",
            "previo",
            "precedente",
            "vorige",
            "vorige uitslag",
            "antériorité",
            "antériorités",
            "anteriorite",
            "anteriorites",
            "résultats antérieurs",
            "historique",
            "vorwerte",
            "resultados anteriores",
            "risultati precedenti",
            "vorige uitslagen",
            "resultado anterior",
        ],
    ),
    (Role::OutOfRange, &["out of range", "outside range", "out of range result", "abnormal result"]),
    (
        Role::Status,
        &["status", "result status", "statut", "état", "etat", "befundstatus", "estado", "stato", "stato referto"],
    ),
];

/// Column positions of a table, from its header row.
#[derive(Clone, Debug)]
pub(super) struct Columns {
    pub(super) count: usize,
    pub(super) test: usize,
    pub(super) value: usize,
    pub(super) unit: Option<usize>,
    pub(super) range: Option<usize>,
    pub(super) range_unit: Option<usize>,
    pub(super) low: Option<usize>,
    pub(super) high: Option<usize>,
    pub(super) flag: Option<usize>,
    pub(super) status: Option<usize>,
    pub(super) out_of_range: Option<usize>,
}

impl Columns {
    /// The columns of a header whose cells name `roles`; `None` without a test and a
    /// result column.
    pub(super) fn from_roles(roles: &[Option<Role>]) -> Option<Self> {
        let find = |role: Role| roles.iter().position(|r| *r == Some(role));
        Some(Self {
            count: roles.len(),
            test: find(Role::Test)?,
            value: find(Role::Value)?,
            unit: find(Role::Unit),
            range: find(Role::Range),
            range_unit: find(Role::RangeUnit),
            low: find(Role::Low),
            high: find(Role::High),
            flag: find(Role::Flag),
            status: find(Role::Status),
            out_of_range: find(Role::OutOfRange),
        })
    }
}

/// What a header cell names, if it is a known column name.
pub(super) fn header_role(cell: &str) -> Option<Role> {
    let role = |name: &str| HEADERS.iter().find(|(_, names)| names.contains(&name)).map(|(r, _)| *r);
    let name = header_name(cell);
    // A name with a date or unit in brackets after it (`Vorwert (08.10.26)`, `Result (SI)`).
    role(&name).or_else(|| {
        let (bare, rest) = name.split_once(" (")?;
        rest.ends_with(')').then(|| role(bare.trim())).flatten()
    })
}

/// Cells of a delimited line, trimmed. `|` tables drop the empty outer cells of `| a | b |`;
/// the other delimiters are read as CSV (double quotes honoured, a quoted delimiter is text).
fn split_cells(line: &str, delim: char) -> Vec<String> {
    let t = line.trim();
    if delim == '|' {
        let t = t.strip_prefix('|').unwrap_or(t);
        let t = t.strip_suffix('|').unwrap_or(t);
        return t.split(delim).map(|c| c.trim().to_string()).collect();
    }
    // Every line of a report is tried as a header: only a line with quotes needs the CSV reader.
    if !t.contains('"') {
        return t.split(delim).map(|c| c.trim().to_string()).collect();
    }
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).flexible(true).delimiter(delim as u8).from_reader(t.as_bytes());
    match reader.records().next() {
        Some(Ok(record)) => record.iter().map(|c| c.trim().to_string()).collect(),
        _ => t.split(delim).map(|c| c.trim().to_string()).collect(),
    }
}

fn header_name(cell: &str) -> String {
    let lower = cell.to_lowercase().replace(['.', '_'], " ");
    lower.trim_end_matches(':').split_whitespace().collect::<Vec<_>>().join(" ")
}

fn header_columns(line: &str) -> Option<(char, Columns)> {
    for delim in TABLE_DELIMITERS {
        if !line.contains(delim) {
            continue;
        }
        let roles: Vec<Option<Role>> = split_cells(line, delim).iter().map(|c| header_role(c)).collect();
        if delim == ',' && roles.len() < 3 {
            continue;
        }
        if let Some(columns) = Columns::from_roles(&roles) {
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

/// Reads tables whose cells are separated by `|`, tabs, `;` or `,` (CSV with quotes) and
/// whose header row names a test column and a result column (synonyms in English, French,
/// German and Spanish), optionally units, a reference range or separate low and high
/// limits, a flag and a result status. The table runs until a blank line or a line that is
/// not a row of it. Rows without a value (section rows) and entries that are not results
/// (pending, cancelled … by their status or value cell) yield no item. Header, separator and
/// row lines are claimed; evidence is the row's span. Fixed-width whitespace tables are not
/// read here: their columns are guesses, so they go to the model line by line.
/// `None` when no table with at least one row is found.
pub fn parse_delimited_table(text: &str) -> Option<Parsed> {
    let lines = split_lines(text);
    let mut parsed = Parsed::default();
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
            let cells = split_cells(row, delim);
            if delim == ',' && cells.len() != cols.count {
                break;
            }
            parsed.claimed.push((start, end));
            if !is_separator_row(row) {
                match table_item(&cells, &cols, start, end, Method::DelimitedTable) {
                    Some(Ok(item)) => parsed.items.push(item),
                    Some(Err(reason)) => parsed.set_aside.push(SetAside { reason, start, end }),
                    None => {}
                }
            }
            j += 1;
        }
        if j > i + 1 {
            parsed.claimed.push((header.0, header.1));
        }
        i = j.max(i + 1);
    }
    parsed.claimed.sort_unstable();
    (!parsed.claimed.is_empty()).then_some(parsed)
}

/// Words of a positive qualitative result and of a negative reference, in the languages of
/// [`HEADERS`].
static POSITIVE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^(?:positive?|pos|positiv[oae]?|positif|positief|reactive|reactiv[oa]|réactif|reaktiv|detected|detectad[oa]|détecté|nachweisbar|rilevat[oa]|aantoonbaar|present|presente|présent)$").unwrap()
});
static NEGATIVE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^(?:negative?|neg|negativ[oae]?|négatif|negatief|non-?reactive|no\s+reactiv[oa]|non\s+réactif|nicht\s+reaktiv|not\s+detected|no\s+detectad[oa]|non\s+détecté|nicht\s+nachweisbar|non\s+rilevat[oa]|niet\s+aantoonbaar|absent|ausente|assente|absente)$").unwrap()
});

/// The unit printed after a range in a `Ref Range & Units` cell (`135 - 145 mmol/L`,
/// `>=60 mL/min/1.73 m2`); `None` for a range alone or a qualitative reference.
fn unit_after_range(cell: &str) -> Option<String> {
    let unit = RANGE_THEN_UNIT.captures(cell)?.get(1)?.as_str().trim();
    unit.chars().any(|c| c.is_alphabetic() || c == '%').then(|| unit.to_string())
}

static RANGE_THEN_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(?i)^\s*(?:(?:[<>]\s*or\s*=|[<>≤≥=]=?|=[<>])\s*)?{NUM}(?:\s*(?:-|–|to)\s*{NUM})?\s+(\S.*)$"))
        .unwrap()
});

/// `abnormal` for a positive result whose reference is negative (`Positivo` against
/// `Negativo`); no flag otherwise (a negative result without a printed flag has none).
fn qualitative_flag(value: &str, reference: Option<&str>) -> Option<Flag> {
    (POSITIVE.is_match(value.trim()) && reference.is_some_and(|r| NEGATIVE.is_match(r.trim())))
        .then_some(Flag::Abnormal)
}

/// A row's item, or why the row is not a result; `None` for a row without a value (a
/// section row).
pub(super) fn table_item(
    cells: &[String],
    cols: &Columns,
    start: usize,
    end: usize,
    method: Method,
) -> Option<Result<LabItem, NonResult>> {
    let cell = |i: Option<usize>| i.and_then(|i| cells.get(i)).map(|c| c.trim()).filter(|c| !c.is_empty());
    let status = match cell(cols.status).and_then(read_status) {
        Some(Err(reason)) => return Some(Err(reason)),
        Some(Ok(status)) => Some(status),
        None => None,
    };
    let value = cell(Some(cols.value)).or(cell(cols.out_of_range))?.to_string();
    if let Some(reason) = unresulted(&value) {
        return Some(Err(reason));
    }
    // A dash for the value (`—`, `--`, `n/a` is a word of `unresulted`): nothing reported.
    if value.chars().all(|c| matches!(c, '-' | '–' | '—' | '.' | '*' | '/')) {
        return Some(Err(NonResult::NotReported));
    }
    let value_numeric = parse_value(&value);
    let (ref_low, ref_high) = match cell(cols.range).or(cell(cols.range_unit)) {
        Some(r) => parse_range(r),
        None => (cell(cols.low).and_then(parse_value), cell(cols.high).and_then(parse_value)),
    };
    let flag = compute_flag(value_numeric, ref_low, ref_high, cell(cols.flag))
        .or_else(|| qualitative_flag(&value, cell(cols.range)));
    // A unit in brackets after the test name (`Sodium (mmol/L)`, a header `Analyte (unit)`):
    // the row's unit when its unit cell gives none.
    let test = cell(Some(cols.test)).map(super::items::without_footnote_marks).filter(|t| !t.is_empty());
    let name_unit = test.and_then(|t| super::answer::UNIT_AFTER_NAME.captures(t));
    let unit = cell(cols.unit).map(str::to_string).or_else(|| name_unit.as_ref().map(|c| c[2].to_string()));
    let test = match (&name_unit, cell(cols.unit)) {
        (Some(c), None) => Some(c[1].to_string()),
        _ => test.map(str::to_string),
    };
    Some(Ok(LabItem {
        test,
        value: Some(value),
        value_numeric,
        // Without a unit column, a unit printed after the range (`<5.7 %`) is the unit.
        unit: unit.or_else(|| {
            cell(cols.range_unit).or(cell(cols.range).filter(|_| cols.unit.is_none())).and_then(unit_after_range)
        }),
        ref_low,
        ref_high,
        flag,
        evidence_start: start,
        evidence_end: end,
        method,
        alignment: Alignment::Exact,
        from_examples: false,
        status,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::classify::ResultStatus;
    use super::super::items::Flag;
    use super::super::lines::span_text;
    use super::super::segment::segment;
    use super::*;

    // ---- delimited tables ----

    #[test]
    fn markdown_pipe_table() {
        let text = "Panel µ°\n\n| Test | Result | Units | Ref. range | Flag |\n|---|---|---|---|---|\n\
| ALT | 64 | U/L | 7-56 | H |\n| Albumin | 3,3 | g/dL | 3,5–5,0 | |\n| CHEMISTRY | | | | |\n\nSigned.";
        let Parsed { items, claimed, .. } = parse_delimited_table(text).unwrap();
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
    fn units_in_test_names_and_footnote_marks() {
        let text = "Analyte (unit);Result;Flag;Reference interval\nSodium (mmol/L);143;;133 - 146\n\
MCV (fL);101;H;80 - 100\nFerritin ¹;9;L;15 - 300\n";
        let items = parse_delimited_table(text).unwrap().items;
        let read: Vec<_> = items.iter().map(|i| (i.test.as_deref().unwrap(), i.unit.as_deref())).collect();
        assert_eq!(read, [("Sodium", Some("mmol/L")), ("MCV", Some("fL")), ("Ferritin", None)]);
    }

    #[test]
    fn dashes_for_values_and_earlier_result_columns() {
        let text = "| Test | Result | Unit | Reference range | Flag |\n|:--|--:|:--|:--|:-:|\n\
| Free T4 | 11.9 | pmol/L | 12.0–22.0 | **L** |\n| Folate (serum) | — | nmol/L | > 7.0 | |\n\n\
Examen;Résultat;Unité;Valeurs de référence;Antériorités\nFerritine;18;µg/L;30 - 400;25 (02/05/26)\n";
        let p = parse_delimited_table(text).unwrap();
        let got: Vec<_> = p.items.iter().map(|i| (i.value.as_deref().unwrap(), i.flag)).collect();
        assert_eq!(got, vec![("11.9", Some(Flag::Low)), ("18", Some(Flag::Low))]);
        assert_eq!(p.set_aside.iter().map(|s| s.reason.as_str()).collect::<Vec<_>>(), vec!["not_reported"]);
    }

    #[test]
    fn tab_and_semicolon_tables() {
        let tab = "Analyte\tValue\tUnit\tReference range\nSodium\t139\tmmol/L\t135-145\nK\t5.9\tmmol/L\t3.5-5.1\n";
        let Parsed { items, .. } = parse_delimited_table(tab).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].flag, Some(Flag::High));
        let semi = "Component;Result;Units;Normal range\nKalium;5,3;mmol/l;3,5-5,1\n";
        let Parsed { items, .. } = parse_delimited_table(semi).unwrap();
        assert_eq!(items[0].value_numeric, Some(5.3));
        assert_eq!(items[0].flag, Some(Flag::High));
    }

    #[test]
    fn csv_with_quoted_commas_separate_limits_and_statuses() {
        let csv = "Lab export\n\"MRN\",\"Test\",\"Result\",\"Units\",\"Low\",\"High\",\"Status\"\n\
\"12\",\"Bilirubin, total\",\"25\",\"umol/L\",\"\",\"21\",\"Final\"\n\
\"12\",\"Iron, serum\",\"9,5\",\"umol/L\",\"10\",\"30\",\"Preliminary\"\n\
\"12\",\"Folate\",\"\",\"ug/L\",\"3\",\"20\",\"Pending\"\n\
\"12\",\"Ferritin\",\"Cancelled\",\"ug/L\",\"30\",\"400\",\"Final\"\n\nNote, not a row.\n";
        let Parsed { items, claimed, set_aside } = parse_delimited_table(csv).unwrap();
        let reasons: Vec<_> = set_aside.iter().map(|s| s.reason).collect();
        assert_eq!(reasons, [NonResult::Pending, NonResult::Cancelled]);
        let statuses: Vec<_> = items.iter().map(|i| i.status).collect();
        assert_eq!(statuses, [Some(ResultStatus::Final), Some(ResultStatus::Preliminary)]);
        let got: Vec<_> =
            items.iter().map(|i| (i.test.as_deref(), i.value.as_deref(), i.ref_low, i.ref_high, i.flag)).collect();
        assert_eq!(
            got,
            [
                (Some("Bilirubin, total"), Some("25"), None, Some(21.0), Some(Flag::High)),
                (Some("Iron, serum"), Some("9,5"), Some(10.0), Some(30.0), Some(Flag::Low)),
            ]
        );
        assert_eq!(claimed.len(), 5, "the header and every row, pending and cancelled ones too");
        assert!(segment(csv, &claimed).iter().all(|c| !c.text.contains("Folate")));
    }

    #[test]
    fn headers_in_other_languages_and_codes() {
        let de = "Parameter;Wert;Einheit;Untere Grenze;Obere Grenze;Status\nNatrium;131;mmol/l;135;145;endgültig\nLipase;;U/l;13;60;storniert\n";
        let Parsed { items, set_aside, .. } = parse_delimited_table(de).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(set_aside[0].reason, NonResult::Cancelled);
        assert_eq!((items[0].ref_low, items[0].ref_high, items[0].flag), (Some(135.0), Some(145.0), Some(Flag::Low)));
        let tsv = "TEST_CODE\tTEST_NAME\tRESULT\tUNITS\tFLAG\tREF_RANGE\nK\tPotassium\t5.9\tmmol/L\tH\t3.5-5.1\n";
        let Parsed { items, .. } = parse_delimited_table(tsv).unwrap();
        assert_eq!((items[0].test.as_deref(), items[0].flag), (Some("Potassium"), Some(Flag::High)));
        // Prose with commas is not a table.
        let prose = "Test, result and units, as discussed, follow below\nSodium, 139, mmol/L is fine\n";
        assert!(parse_delimited_table(prose).is_none_or(|p| p.items.is_empty()));
    }

    #[test]
    fn fixed_width_and_headerless_tables_are_not_parsed() {
        let fixed = "Test      Result   Units\nSodium    139      mmol/L\n";
        assert!(parse_delimited_table(fixed).is_none());
        let headerless = "Sodium|139|mmol/L\nPotassium|4.1|mmol/L\n";
        assert!(parse_delimited_table(headerless).is_none());
    }
}
