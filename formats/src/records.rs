//! Records: whole-file text, JSON Lines and CSV, read one record at a time. Every record
//! becomes a document's id and text or a [`Reject`] naming the record (its id, or its line
//! number before the id is known) and the problem; reading goes on with the next record. A
//! record is never read into memory past its limit (a line that never ends, an unclosed CSV
//! quote); details name positions, sizes and fields, never text.

use crate::limits::InputLimits;
use crate::sniff::{binary_problem, format_hint, UTF8_BOM};
use medbatch_schemas::pipeline::InputSpec;
use medbatch_schemas::InputErrorKind;
use serde_json::Value;
use std::cell::Cell;
use std::io::{self, BufRead, Read};
use std::rc::Rc;

/// A JSONL line or CSV record carries escapes and other fields besides its text, so a record
/// may be this many times the document limit (plus [`RECORD_SLACK_BYTES`]) before it is
/// refused unread; the text itself is then held to the document limit.
const RECORD_OVERHEAD_FACTOR: u64 = 2;
const RECORD_SLACK_BYTES: u64 = 64 << 10;
/// The csv reader's own buffer, counted as slack when bounding one record.
const CSV_BUFFER_BYTES: usize = 8 << 10;

/// One record read: its fields, or why it cannot be a document.
pub type Record = Result<Fields, Reject>;

/// What a record gives a document: its id and text, and its patient and date when the
/// spec names their fields (`input.patient_field`, `input.date_field`) and the record has
/// them (a string or a number; empty counts as absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fields {
    pub id: String,
    pub text: String,
    pub patient: Option<String>,
    pub date: Option<String>,
}

/// The largest JSONL line or CSV record read before its text is judged.
pub fn max_record_bytes(limits: &InputLimits) -> u64 {
    limits.max_document_bytes.saturating_mul(RECORD_OVERHEAD_FACTOR).saturating_add(RECORD_SLACK_BYTES)
}

/// Whether a record file holds no bytes at all (a reject for the whole file).
fn nothing_to_read(r: &mut dyn BufRead, emit: &mut dyn FnMut(Record)) -> io::Result<bool> {
    let empty = r.fill_buf()?.is_empty();
    if empty {
        fail(emit, None, InputErrorKind::Empty, "0 bytes");
    }
    Ok(empty)
}

fn fail(emit: &mut dyn FnMut(Record), record: Option<String>, kind: InputErrorKind, detail: impl Into<String>) {
    emit(Err(Reject { record, kind, detail: detail.into() }));
}

/// One JSON object per line. Returns only I/O errors of `r`; everything wrong with the
/// content becomes a [`Reject`].
pub fn jsonl(
    r: &mut dyn BufRead,
    spec: &InputSpec,
    limits: &InputLimits,
    emit: &mut dyn FnMut(Record),
) -> io::Result<()> {
    if nothing_to_read(r, emit)? {
        return Ok(());
    }
    if r.fill_buf()?.starts_with(UTF8_BOM) {
        r.consume(UTF8_BOM.len());
    }
    let head = r.fill_buf()?;
    if let Some(&first) = head.iter().find(|b| !b.is_ascii_whitespace()) {
        if first != b'{' {
            let detail = format!("not JSON Lines: first non-blank byte is not '{{'{}", format_hint(head));
            fail(emit, None, InputErrorKind::WrongFormat, detail);
            return Ok(());
        }
    }

    let cap = usize::try_from(max_record_bytes(limits)).unwrap_or(usize::MAX);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    let mut records = 0u64;
    loop {
        let line = match read_line_capped(r, &mut buf, cap)? {
            Line::Eof => break,
            Line::TooLong(n) => {
                line_no += 1;
                records += 1;
                let detail = format!("line {line_no} is {n} bytes, over the record limit of {cap} bytes");
                fail(emit, Some(line_no.to_string()), InputErrorKind::TooLarge, detail);
                continue;
            }
            Line::Complete => {
                line_no += 1;
                trim_line_end(&buf)
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        records += 1;
        emit(jsonl_record(line, line_no, spec).and_then(|f| checked_text(f, line_no, spec, limits)));
    }
    if records == 0 {
        fail(emit, None, InputErrorKind::Empty, "no records");
    }
    Ok(())
}

/// Records with a header row naming the id and text columns. Returns only I/O errors of
/// `r`; everything wrong with the content becomes a [`Reject`].
pub fn csv(
    r: &mut dyn BufRead,
    spec: &InputSpec,
    limits: &InputLimits,
    emit: &mut dyn FnMut(Record),
) -> io::Result<()> {
    if nothing_to_read(r, emit)? {
        return Ok(());
    }
    if let Some(problem) = binary_problem(r.fill_buf()?) {
        fail(emit, None, InputErrorKind::WrongFormat, format!("not CSV: {problem}"));
        return Ok(());
    }

    let record_cap = max_record_bytes(limits);
    let feed = Rc::new(FeedState::default());
    feed.stop_at.set(record_cap.saturating_add(CSV_BUFFER_BYTES as u64));
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .buffer_capacity(CSV_BUFFER_BYTES)
        .from_reader(CsvFeed { inner: r, state: Rc::clone(&feed) });

    let header = match csv.byte_headers() {
        Ok(h) => h.clone(),
        Err(e) => return csv_failed(emit, limits, &feed, e, 1),
    };
    let column = |name: &str| {
        header.iter().position(|h| {
            let h = h.strip_prefix(UTF8_BOM).unwrap_or(h);
            std::str::from_utf8(h).is_ok_and(|h| h.trim() == name)
        })
    };
    if header.iter().all(|h| h.is_empty()) {
        fail(emit, None, InputErrorKind::Empty, "no header row");
        return Ok(());
    }
    let (id_field, text_field) = (&spec.id_field, &spec.text_field);
    let Some(text_col) = column(text_field) else {
        fail(emit, None, InputErrorKind::MissingField, format!("no {text_field:?} column in the header"));
        return Ok(());
    };
    let Some(id_col) = column(id_field) else {
        fail(emit, None, InputErrorKind::MissingField, format!("no {id_field:?} column in the header"));
        return Ok(());
    };
    // Optional columns: a file without them gives documents without a patient or date.
    let patient_col = spec.patient_field.as_deref().and_then(column);
    let date_col = spec.date_field.as_deref().and_then(column);
    let optional = |row: &csv::ByteRecord, col: Option<usize>| {
        col.and_then(|c| row.get(c))
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };

    let mut row = csv::ByteRecord::new();
    let mut records = 0u64;
    loop {
        let next_line = csv.position().line();
        match csv.read_byte_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return csv_failed(emit, limits, &feed, e, next_line),
        }
        feed.stop_at.set(csv.position().byte().saturating_add(record_cap).saturating_add(CSV_BUFFER_BYTES as u64));
        records += 1;
        let line = row.position().map_or(next_line, |p| p.line());
        let parsed = csv_record(&row, (id_col, text_col), line, spec).and_then(|(id, text)| {
            let fields = Fields { id, text, patient: optional(&row, patient_col), date: optional(&row, date_col) };
            checked_text(fields, line, spec, limits)
        });
        emit(parsed);
    }
    if records == 0 {
        fail(emit, None, InputErrorKind::Empty, "no records after the header");
    }
    Ok(())
}

fn csv_failed(
    emit: &mut dyn FnMut(Record),
    limits: &InputLimits,
    feed: &FeedState,
    e: csv::Error,
    line: u64,
) -> io::Result<()> {
    let record = Some(line.to_string());
    if feed.tripped.get() {
        let detail = format!(
            "record starting on line {line} exceeds the record limit of {} bytes; rest of the file not read",
            max_record_bytes(limits)
        );
        fail(emit, record, InputErrorKind::TooLarge, detail);
        return Ok(());
    }
    match e.into_kind() {
        csv::ErrorKind::Io(io) => Err(io),
        // With `flexible` and byte records no parse error is expected; report without text.
        _ => {
            fail(emit, record, InputErrorKind::MalformedRecord, format!("line {line}: CSV parse error"));
            Ok(())
        }
    }
}

/// A record (or a whole file) that cannot become a document, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The record's id, or its line number before the id is known; `None` for a problem of
    /// the whole file.
    pub record: Option<String>,
    pub kind: InputErrorKind,
    /// Positions, sizes and field names, never the record's text.
    pub detail: String,
}

/// Parses one non-blank JSONL line into its id and text.
fn jsonl_record(line: &[u8], line_no: u64, spec: &InputSpec) -> Result<Fields, Reject> {
    let at_line = |kind, detail| Reject { record: Some(line_no.to_string()), kind, detail };
    let text = std::str::from_utf8(line).map_err(|e| {
        let detail = format!("line {line_no}: invalid UTF-8 at byte offset {} of the line", e.valid_up_to());
        at_line(InputErrorKind::InvalidUtf8, detail)
    })?;
    let mut object = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => o,
        Ok(other) => {
            let detail = format!("line {line_no}: record is a JSON {}, not an object", json_type(&other));
            return Err(at_line(InputErrorKind::MalformedRecord, detail));
        }
        Err(e) => {
            // serde_json's messages can quote the input; report position and class only.
            let detail = format!("line {line_no} column {}: JSON {:?} error", e.column(), e.classify());
            return Err(at_line(InputErrorKind::MalformedRecord, detail));
        }
    };
    let (id_field, text_field) = (&spec.id_field, &spec.text_field);
    let id = match object.get(id_field) {
        None | Some(Value::Null) => {
            return Err(at_line(InputErrorKind::MissingField, format!("line {line_no}: no {id_field:?} field")))
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(at_line(InputErrorKind::MissingField, format!("line {line_no}: {id_field:?} is empty")))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            let detail =
                format!("line {line_no}: {id_field:?} is a JSON {}, expected string or number", json_type(other));
            return Err(at_line(InputErrorKind::MalformedRecord, detail));
        }
    };
    let at_id = |kind, detail| Reject { record: Some(id.clone()), kind, detail };
    let text = match object.remove(text_field) {
        None | Some(Value::Null) => {
            return Err(at_id(InputErrorKind::MissingField, format!("line {line_no}: no {text_field:?} field")))
        }
        Some(Value::String(s)) => s,
        Some(other) => {
            let detail = format!("line {line_no}: {text_field:?} is a JSON {}, expected string", json_type(&other));
            return Err(at_id(InputErrorKind::MalformedRecord, detail));
        }
    };
    // Optional fields: a string or a number; anything else (or empty) counts as absent.
    let optional = |field: &Option<String>| match field.as_ref().and_then(|f| object.get(f)) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let (patient, date) = (optional(&spec.patient_field), optional(&spec.date_field));
    Ok(Fields { id, text, patient, date })
}

/// Takes the id and text out of one CSV row, given their column indexes.
fn csv_record(
    row: &csv::ByteRecord,
    (id_col, text_col): (usize, usize),
    line: u64,
    spec: &InputSpec,
) -> Result<(String, String), Reject> {
    let (id_field, text_field) = (&spec.id_field, &spec.text_field);
    let at_line = |kind, detail| Reject { record: Some(line.to_string()), kind, detail };
    let short_row = |field: &str| format!("line {line}: row has {} fields, no {field:?} column", row.len());
    let bad_utf8 = |field: &str, e: std::str::Utf8Error| {
        format!("line {line}: {field:?} has invalid UTF-8 at byte offset {}", e.valid_up_to())
    };
    let id = match row.get(id_col).map(std::str::from_utf8) {
        None => return Err(at_line(InputErrorKind::MissingField, short_row(id_field))),
        Some(Err(e)) => return Err(at_line(InputErrorKind::InvalidUtf8, bad_utf8(id_field, e))),
        Some(Ok(id)) if id.trim().is_empty() => {
            return Err(at_line(InputErrorKind::MissingField, format!("line {line}: {id_field:?} is empty")))
        }
        Some(Ok(id)) => id.to_string(),
    };
    let at_id = |kind, detail| Reject { record: Some(id.clone()), kind, detail };
    let text = match row.get(text_col).map(std::str::from_utf8) {
        None => return Err(at_id(InputErrorKind::MissingField, short_row(text_field))),
        Some(Err(e)) => return Err(at_id(InputErrorKind::InvalidUtf8, bad_utf8(text_field, e))),
        Some(Ok(text)) => text.to_string(),
    };
    Ok((id, text))
}

/// The checks every record's text passes once id and text are known.
fn checked_text(fields: Fields, line: u64, spec: &InputSpec, limits: &InputLimits) -> Result<Fields, Reject> {
    let limit = limits.max_document_bytes;
    let text = &fields.text;
    let (kind, detail) = if text.len() as u64 > limit {
        let detail = format!("line {line}: text is {} bytes, over the document limit of {limit} bytes", text.len());
        (InputErrorKind::TooLarge, detail)
    } else if text.trim().is_empty() {
        (InputErrorKind::Empty, format!("line {line}: {:?} is empty", spec.text_field))
    } else {
        return Ok(fields);
    };
    Err(Reject { record: Some(fields.id), kind, detail })
}

enum Line {
    Eof,
    Complete,
    /// Over the cap; the line was consumed but not kept. Holds its length.
    TooLong(u64),
}

/// Reads one line (with its `\n`) into `buf`, keeping at most `cap` bytes: a longer line is
/// consumed to its end without being buffered.
fn read_line_capped(r: &mut dyn BufRead, buf: &mut Vec<u8>, cap: usize) -> io::Result<Line> {
    buf.clear();
    let mut total = 0u64;
    let mut over = false;
    loop {
        let available = r.fill_buf()?;
        if available.is_empty() {
            return Ok(match (total, over) {
                (0, _) => Line::Eof,
                (_, true) => Line::TooLong(total),
                _ => Line::Complete,
            });
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let take = newline.map_or(available.len(), |i| i + 1);
        total += take as u64;
        if !over && buf.len() + take > cap {
            over = true;
            buf.clear();
        }
        if !over {
            buf.extend_from_slice(&available[..take]);
        }
        r.consume(take);
        if newline.is_some() {
            return Ok(if over { Line::TooLong(total) } else { Line::Complete });
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[derive(Default)]
struct FeedState {
    fed: Cell<u64>,
    /// Offset the csv reader may not be fed past until the current record ends.
    stop_at: Cell<u64>,
    tripped: Cell<bool>,
}

/// Feeds the csv reader, refusing to feed one record past its cap: csv buffers a whole
/// record, and a record that never ends (an unclosed quote) would otherwise grow without
/// bound.
struct CsvFeed<'r> {
    inner: &'r mut dyn BufRead,
    state: Rc<FeedState>,
}

impl Read for CsvFeed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (fed, stop_at) = (self.state.fed.get(), self.state.stop_at.get());
        if fed >= stop_at {
            self.state.tripped.set(true);
            return Err(io::Error::other("csv record over the record limit"));
        }
        let len = buf.len().min(usize::try_from(stop_at - fed).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.state.fed.set(fed + n as u64);
        Ok(n)
    }
}

/// Whole-file text: checks format, encoding and emptiness. Errors carry kind and detail.
pub fn text(bytes: Vec<u8>) -> Result<String, (InputErrorKind, String)> {
    if bytes.is_empty() {
        return Err((InputErrorKind::Empty, "0 bytes".into()));
    }
    if let Some(problem) = binary_problem(&bytes) {
        return Err((InputErrorKind::WrongFormat, format!("not text: {problem}")));
    }
    let len = bytes.len();
    let text = String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        (InputErrorKind::InvalidUtf8, format!("invalid UTF-8 at byte offset {offset}"))
    })?;
    let text = match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    };
    if text.trim().is_empty() {
        return Err((InputErrorKind::Empty, format!("only whitespace ({len} bytes)")));
    }
    Ok(text)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InputLimits {
        InputLimits::from_spec(&spec())
    }

    fn spec() -> InputSpec {
        InputSpec {
            kinds: vec![medbatch_schemas::InputKind::Jsonl, medbatch_schemas::InputKind::Csv],
            id_field: "id".into(),
            text_field: "text".into(),
            max_document_bytes: 1 << 20,
            patient_field: None,
            date_field: None,
            patient_pattern: None,
            date_pattern: None,
        }
    }

    fn collect(read: impl FnOnce(&mut dyn FnMut(Record)) -> io::Result<()>) -> Vec<Record> {
        let mut out = Vec::new();
        read(&mut |r| out.push(r)).unwrap();
        out
    }

    #[test]
    fn each_record_is_a_document_or_a_reject_naming_it() {
        let (spec, limits) = (spec(), limits());
        let lines =
            b"{\"id\": \"a\", \"text\": \"Hb 13.1\"}\n{\"id\": 7, \"text\": \"Patient secret\"\n\n{\"id\": \"c\"}\n";
        let got = collect(|emit| jsonl(&mut &lines[..], &spec, &limits, emit));
        let plain = |id: &str, text: &str| Fields { id: id.into(), text: text.into(), patient: None, date: None };
        assert_eq!(got[0], Ok(plain("a", "Hb 13.1")));
        let bad = got[1].clone().unwrap_err();
        assert_eq!((bad.record.as_deref(), bad.kind), (Some("2"), InputErrorKind::MalformedRecord));
        assert!(!bad.detail.contains("secret"), "{}", bad.detail);
        let missing = got[2].clone().unwrap_err();
        assert_eq!((missing.record.as_deref(), missing.kind), (Some("c"), InputErrorKind::MissingField));
        assert_eq!(got.len(), 3);

        let csv_bytes = b"id,text\nx,\"K 4.1, ok\"\ny,\n";
        let got = collect(|emit| csv(&mut &csv_bytes[..], &spec, &limits, emit));
        assert_eq!(got[0], Ok(plain("x", "K 4.1, ok")));
        assert_eq!(got[1].clone().unwrap_err().kind, InputErrorKind::Empty);
    }

    #[test]
    fn patient_and_date_fields_are_read_when_named_and_present() {
        let spec = InputSpec { patient_field: Some("patient".into()), date_field: Some("date".into()), ..spec() };
        let limits = limits();
        let lines = b"{\"id\": \"a\", \"text\": \"t\", \"patient\": 1042, \"date\": \"2025-01-10\"}\n{\"id\": \"b\", \"text\": \"t\", \"patient\": \" \", \"date\": [1]}\n";
        let got = collect(|emit| jsonl(&mut &lines[..], &spec, &limits, emit));
        let got: Vec<(Option<String>, Option<String>)> =
            got.into_iter().map(|r| r.map(|f| (f.patient, f.date)).unwrap()).collect();
        assert_eq!(got, [(Some("1042".into()), Some("2025-01-10".into())), (None, None)]);
        // A CSV file without the date column: documents without a date.
        let csv_bytes = b"id,patient,text\nx,P-7,note\ny,,note\n";
        let got = collect(|emit| csv(&mut &csv_bytes[..], &spec, &limits, emit));
        let got: Vec<(Option<String>, Option<String>)> =
            got.into_iter().map(|r| r.map(|f| (f.patient, f.date)).unwrap()).collect();
        assert_eq!(got, [(Some("P-7".into()), None), (None, None)]);
    }

    #[test]
    fn whole_file_text_is_checked_for_format_encoding_and_content() {
        assert_eq!(text(b"\xEF\xBB\xBFnote".to_vec()), Ok("note".into()));
        assert_eq!(text(b"  \n".to_vec()).unwrap_err().0, InputErrorKind::Empty);
        assert_eq!(text(b"%PDF-1.4".to_vec()).unwrap_err().0, InputErrorKind::WrongFormat);
        assert_eq!(text(vec![b'a', 0xff]).unwrap_err().0, InputErrorKind::InvalidUtf8);
    }
}
