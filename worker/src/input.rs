//! Reading inputs: one [`InputRef`] becomes documents and input errors.
//!
//! This module owns the boundary between untrusted bytes and [`Document`]s: `.txt`, `.jsonl`
//! and `.csv` files, and `.tar` / `.tar.gz` / `.zip` archives of them, read synchronously and
//! streamed (nothing is written to disk). Every way an input can be bad becomes an
//! [`InputError`] through the sink, and reading goes on with the next record or member where
//! the format allows, so one bad note never costs the rest of an archive.
//!
//! Memory stays bounded whatever the input claims: a document, record or member is never read
//! into memory past its limit plus one byte, declared sizes are checked before reading and
//! inflated bytes are counted while reading (headers can lie), and gzip streams are metered as
//! a whole so a bomb stops early. Error details name offsets, sizes, line numbers, field names
//! and formats — never document text, which is patient data.

use crate::pipelines::{Source, Unit};
use medbatch_connectors::inputs::InputSource;
use medbatch_formats::archive::{self, Flow, Take, TarEnd, TarEntry, ZipEnd, ZipOpened, ZipVisitor, GZ_BUFFER_BYTES};
use medbatch_formats::limits::{InputLimits, RATIO_CHECK_MIN_BYTES};
use medbatch_formats::meter::{read_capped, StreamMeter};
use medbatch_formats::records;
use medbatch_schemas::document::check_member_name;
use medbatch_schemas::pipeline::{InputSpec, PipelineSpec};
use medbatch_schemas::{Document, InputError, InputErrorKind, InputKind, InputRef, Selection};
use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read};

/// What listing and reading need from an input: bytes, and seeking (zip's directory is at the end).
pub use medbatch_connectors::inputs::ReadSeek;

/// Read size when copying a member into memory.
const COPY_CHUNK_BYTES: usize = 64 << 10;

/// Reads a job's inputs into units for its pipeline, and input errors, in input order:
/// documents for text pipelines, prompts' images for imaging pipelines ([`crate::imaging`]).
pub fn read_units(inputs: &[InputRef], source: &InputSource, spec: &PipelineSpec) -> Vec<Result<Unit, InputError>> {
    if spec.imaging.is_some() {
        return crate::imaging::read_imaging(inputs, source, spec);
    }
    let limits = InputLimits::from_spec(&spec.input);
    let mut units = Vec::new();
    for input in inputs {
        let mut sink = |r: Result<Document, InputError>| {
            units.push(r.map(|doc| {
                // A member's documents carry `URI#MEMBER` (see `Place::member`).
                let member =
                    doc.source_uri.strip_prefix(&input.uri).and_then(|m| m.strip_prefix('#')).map(String::from);
                let source = Source {
                    uri: input.uri.clone(),
                    member,
                    sha256: input.sha256.clone(),
                    images: None,
                    skipped: None,
                };
                Unit { doc, images: Vec::new(), sources: vec![source], slides: Vec::new() }
            }))
        };
        match source.open(&input.uri, input.size, input.etag.as_deref()) {
            Ok(f) => read_documents(input, f, &spec.input, &limits, &mut sink),
            Err(e) => sink(Err(InputError {
                source_uri: input.uri.clone(),
                member: None,
                record: None,
                kind: InputErrorKind::Unreadable,
                detail: e.to_string(),
            })),
        }
    }
    units
}

/// Reads one input and hands each document, or the error that replaces it, to `sink`.
///
/// Never fails as a whole: an unreadable input is itself an error row. For archives,
/// `Selection::Members` yields only the listed members and an error row for each listed
/// member that is not there; on a plain file the selection is ignored.
pub fn read_documents(
    input: &InputRef,
    reader: Box<dyn ReadSeek>,
    spec: &InputSpec,
    limits: &InputLimits,
    sink: &mut dyn FnMut(Result<Document, InputError>),
) {
    // The name patterns were checked when the pipeline was loaded.
    let pattern = |p: &Option<String>| p.as_deref().and_then(|p| regex::Regex::new(p).ok());
    let patterns = (pattern(&spec.patient_pattern), pattern(&spec.date_pattern));
    let mut r = Reader { input, spec, limits, sink, patterns };
    let top = Place::file(input);
    if input.kind == InputKind::Unsupported || !spec.kinds.contains(&input.kind) {
        let detail = format!("input kind {:?} is not read by this pipeline", input.kind);
        r.fail(&top, None, InputErrorKind::UnsupportedKind, detail);
        return;
    }
    match input.kind {
        InputKind::Text => r.read_text_file(reader),
        InputKind::Parquet => {
            if let Err(detail) = medbatch_formats::guard::guarded("parquet", || r.read_parquet(reader)) {
                r.fail(&top, None, InputErrorKind::Unreadable, detail);
            }
        }
        InputKind::Jsonl | InputKind::Csv => {
            let mut buffered = BufReader::new(reader);
            let result = if input.kind == InputKind::Jsonl {
                r.parse_jsonl(&top, &mut buffered)
            } else {
                r.parse_csv(&top, &mut buffered)
            };
            if let Err(e) = result {
                r.fail(&top, None, InputErrorKind::Unreadable, format!("read failed ({:?})", e.kind()));
            }
        }
        InputKind::Tar | InputKind::TarGz | InputKind::Zip => {
            let mut wanted = Wanted::new(&input.selection);
            let mut walk = Walk::default();
            // A panic inside the archive crates (or a record parser) on crafted bytes ends this
            // archive with an error row instead of taking the worker down.
            let halt = medbatch_formats::guard::guarded("archive", || match input.kind {
                InputKind::Zip => r.read_zip(reader, &mut wanted, &mut walk),
                kind => r.read_tar(reader, kind == InputKind::TarGz, &mut wanted, &mut walk),
            })
            .unwrap_or_else(|detail| {
                r.fail(&top, None, InputErrorKind::TruncatedArchive, detail);
                Some(Halt {
                    kind: InputErrorKind::TruncatedArchive,
                    why: "the archive reader failed before this member",
                })
            });
            r.finish_archive(&wanted, halt, &walk);
        }
        // Images and volumes are read by imaging pipelines (crate::imaging), whose specs
        // are the only ones that may list them; the check above has already refused them.
        InputKind::Dicom | InputKind::Image | InputKind::Nifti | InputKind::Slide | InputKind::Unsupported => {}
    }
}

/// Where documents come from: the input itself, or one member of it.
struct Place {
    source_uri: String,
    member: Option<String>,
}

impl Place {
    fn file(input: &InputRef) -> Self {
        Self { source_uri: input.uri.clone(), member: None }
    }

    fn member(input: &InputRef, name: &str) -> Self {
        Self { source_uri: format!("{}#{}", input.uri, name), member: Some(name.to_string()) }
    }
}

/// Why an archive walk stopped before the archive's end. Listed members not reached by then
/// get an error row of this kind.
struct Halt {
    kind: InputErrorKind,
    why: &'static str,
}

/// Progress through one archive.
#[derive(Default)]
struct Walk {
    /// Members turned into documents or error rows.
    processed: usize,
    /// Bytes inflated from members (zip); tar.gz is metered on the stream instead.
    inflated: u64,
}

/// The members a read should yield, and which of them were found.
struct Wanted<'s> {
    listed: Option<&'s [String]>,
    names: HashSet<&'s str>,
    found: HashSet<String>,
}

impl<'s> Wanted<'s> {
    fn new(selection: &'s Selection) -> Self {
        match selection {
            // A band of a slide's grid selects nothing in a document file: it is read whole.
            Selection::Whole | Selection::Tiles { .. } => {
                Self { listed: None, names: HashSet::new(), found: HashSet::new() }
            }
            Selection::Members(names) => {
                Self { listed: Some(names), names: names.iter().map(String::as_str).collect(), found: HashSet::new() }
            }
        }
    }

    fn wants(&mut self, name: &str) -> bool {
        if self.listed.is_none() {
            return true;
        }
        let hit = self.names.contains(name);
        if hit {
            self.found.insert(name.to_string());
        }
        hit
    }

    /// Listed members not found, in listing order, each once.
    fn missing(&self) -> Vec<&'s str> {
        let mut seen = HashSet::new();
        self.listed
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .filter(|n| !self.found.contains(*n) && seen.insert(*n))
            .collect()
    }
}

/// Why reading a member into memory stopped.
enum ReadFail {
    /// A limit was reached; `stream` when the whole archive stream must stop too.
    Limit { kind: InputErrorKind, detail: String, stream: bool },
    /// The bytes ran out or were corrupt.
    Io { error: io::Error, read: u64 },
}

/// What a member's inflated bytes are measured against for the ratio limit.
enum Compressed {
    /// Not compressed (plain tar, stored zip member).
    No,
    /// The zip header's compressed size; the zip reader never reads past it.
    Declared(u64),
    /// Measured on a metered gzip stream, from this compressed offset.
    Metered(u64),
}

/// Limits for reading one member into memory.
struct Budget {
    cap: u64,
    /// Kind reported past `cap`: too large when stored, a bomb when inflated.
    over_cap: InputErrorKind,
    cap_name: &'static str,
    /// Size the header declares; inflating past it means the header lied.
    declared: Option<u64>,
    compressed: Compressed,
}

struct Reader<'a, 's> {
    input: &'a InputRef,
    spec: &'a InputSpec,
    limits: &'a InputLimits,
    sink: &'s mut dyn FnMut(Result<Document, InputError>),
    /// `input.patient_pattern` and `input.date_pattern`, compiled.
    patterns: (Option<regex::Regex>, Option<regex::Regex>),
}

impl Reader<'_, '_> {
    /// A document of `fields`; its patient and date, where the record has none, from the
    /// file's (or member's) name by the spec's patterns.
    fn doc(&mut self, place: &Place, fields: records::Fields) {
        let name = place.member.as_deref().unwrap_or_else(|| file_name(&self.input.uri));
        let from_name = |p: &Option<regex::Regex>| {
            p.as_ref().and_then(|re| re.captures(name)).and_then(|c| c.get(1)).map(|m| m.as_str().to_string())
        };
        let patient_id = fields.patient.or_else(|| from_name(&self.patterns.0));
        let date = fields.date.or_else(|| from_name(&self.patterns.1));
        (self.sink)(Ok(Document {
            id: fields.id,
            source_uri: place.source_uri.clone(),
            input_sha256: self.input.sha256.clone(),
            text: fields.text,
            patient_id,
            date,
        }))
    }

    /// A whole-file document: its name is its id.
    fn file_doc(&mut self, place: &Place, id: String, text: String) {
        self.doc(place, records::Fields { id, text, patient: None, date: None });
    }

    fn fail(&mut self, place: &Place, record: Option<String>, kind: InputErrorKind, detail: impl Into<String>) {
        (self.sink)(Err(InputError {
            source_uri: self.input.uri.clone(),
            member: place.member.clone(),
            record,
            kind,
            detail: detail.into(),
        }))
    }

    // ---- plain files -------------------------------------------------------------------

    fn read_text_file(&mut self, mut reader: Box<dyn ReadSeek>) {
        let place = Place::file(self.input);
        let limit = self.limits.max_document_bytes;
        match read_capped(&mut reader, limit) {
            Err(e) => self.fail(&place, None, InputErrorKind::Unreadable, format!("read failed ({:?})", e.kind())),
            Ok(None) => self.fail(
                &place,
                None,
                InputErrorKind::TooLarge,
                format!("file exceeds the document limit of {limit} bytes"),
            ),
            Ok(Some(bytes)) => match records::text(bytes) {
                Ok(text) => self.file_doc(&place, file_name(&self.input.uri).to_string(), text),
                Err((kind, detail)) => self.fail(&place, None, kind, detail),
            },
        }
    }

    /// The rows of a Parquet file as records: the spec's fields are its columns (strings, or
    /// any type Arrow casts to text — numbers, dates), read a few rows at a time. The whole
    /// file is held in memory (the format's footer is at its end), capped as an archive's
    /// inflated bytes are; the column chunks' declared sizes are checked against the same cap
    /// before anything is decoded. Snappy- and zstd-compressed files are read (the defaults of
    /// pyarrow, Spark and medbatch); another codec is an error row naming it.
    fn read_parquet(&mut self, mut reader: Box<dyn ReadSeek>) {
        use arrow::array::{Array, StringArray};
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use parquet::arrow::ProjectionMask;
        let place = Place::file(self.input);
        let cap = self.limits.max_archive_inflated_bytes;
        let bytes = match read_capped(&mut reader, cap) {
            Err(e) => {
                return self.fail(&place, None, InputErrorKind::Unreadable, format!("read failed ({:?})", e.kind()))
            }
            Ok(None) => return self.fail(&place, None, InputErrorKind::TooLarge, format!("file exceeds {cap} bytes")),
            Ok(Some(b)) if b.is_empty() => return self.fail(&place, None, InputErrorKind::Empty, "0 bytes"),
            Ok(Some(b)) => bytes::Bytes::from(b),
        };
        let builder = match ParquetRecordBatchReaderBuilder::try_new(bytes) {
            Ok(b) => b,
            Err(e) => return self.fail(&place, None, InputErrorKind::WrongFormat, format!("not a Parquet file: {e}")),
        };
        let spec = self.spec;
        let wanted =
            [Some(&spec.id_field), Some(&spec.text_field), spec.patient_field.as_ref(), spec.date_field.as_ref()];
        let schema = builder.schema().clone();
        let index = |name: Option<&String>| name.and_then(|n| schema.fields().iter().position(|f| f.name() == n));
        let at: Vec<Option<usize>> = wanted.iter().map(|n| index(*n)).collect();
        for (field, i) in [(&spec.id_field, at[0]), (&spec.text_field, at[1])] {
            if i.is_none() {
                let detail = format!("no column {field:?}");
                return self.fail(&place, None, InputErrorKind::MissingField, detail);
            }
        }
        let mut roots: Vec<usize> = at.iter().flatten().copied().collect();
        roots.sort_unstable();
        roots.dedup();
        let descr = builder.parquet_schema();
        let leaves: Vec<usize> =
            (0..descr.num_columns()).filter(|&j| roots.contains(&descr.get_column_root_idx(j))).collect();
        let declared: i64 = builder
            .metadata()
            .row_groups()
            .iter()
            .flat_map(|g| leaves.iter().filter_map(move |&j| g.columns().get(j)))
            .map(|c| c.uncompressed_size().max(0))
            .sum();
        if declared as u64 > cap {
            let detail = format!("its text columns declare {declared} bytes, over the limit of {cap}");
            return self.fail(&place, None, InputErrorKind::TooLarge, detail);
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
        let reader = match builder.with_projection(mask).with_batch_size(64).build() {
            Ok(r) => r,
            Err(e) => return self.fail(&place, None, InputErrorKind::Unreadable, e.to_string()),
        };
        let limit = self.limits.max_document_bytes;
        let mut row = 0u64;
        for batch in reader {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    let detail = format!("rows after {row} could not be read: {e}");
                    return self.fail(&place, None, InputErrorKind::Unreadable, detail);
                }
            };
            let mut columns: Vec<Option<StringArray>> = Vec::with_capacity(4);
            for name in wanted {
                let col = name.and_then(|n| batch.column_by_name(n));
                let text = match col.map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8)) {
                    None => None,
                    Some(Ok(c)) => c.as_any().downcast_ref::<StringArray>().cloned(),
                    Some(Err(e)) => {
                        let detail = format!("column {:?} cannot be read as text: {e}", name.unwrap());
                        return self.fail(&place, None, InputErrorKind::WrongFormat, detail);
                    }
                };
                columns.push(text);
            }
            let value = |c: &Option<StringArray>, i: usize| {
                c.as_ref().filter(|c| c.is_valid(i)).map(|c| c.value(i).to_string()).filter(|v| !v.trim().is_empty())
            };
            for i in 0..batch.num_rows() {
                row += 1;
                let Some(id) = value(&columns[0], i) else {
                    let detail = format!("row {row}: {:?} is empty", spec.id_field);
                    self.fail(&place, Some(row.to_string()), InputErrorKind::MissingField, detail);
                    continue;
                };
                let Some(text) = value(&columns[1], i) else {
                    let detail = format!("row {row}: {:?} is empty", spec.text_field);
                    self.fail(&place, Some(id), InputErrorKind::Empty, detail);
                    continue;
                };
                if text.len() as u64 > limit {
                    let detail =
                        format!("row {row}: text is {} bytes, over the document limit of {limit} bytes", text.len());
                    self.fail(&place, Some(id), InputErrorKind::TooLarge, detail);
                    continue;
                }
                let fields = records::Fields { id, text, patient: value(&columns[2], i), date: value(&columns[3], i) };
                self.doc(&place, fields);
            }
        }
        // A file with a schema and no rows is an empty table (an empty night's gathered
        // notes, say): no documents, and nothing wrong with it.
    }

    /// One JSON object per line. Returns only I/O errors of `r`; everything wrong with the
    /// content becomes error rows.
    fn parse_jsonl(&mut self, place: &Place, r: &mut dyn BufRead) -> io::Result<()> {
        let (spec, limits) = (self.spec, self.limits);
        records::jsonl(r, spec, limits, &mut |rec| self.record(place, rec))
    }

    /// Records with a header row naming the id and text columns. Returns only I/O errors of
    /// `r`; everything wrong with the content becomes error rows.
    fn parse_csv(&mut self, place: &Place, r: &mut dyn BufRead) -> io::Result<()> {
        let (spec, limits) = (self.spec, self.limits);
        records::csv(r, spec, limits, &mut |rec| self.record(place, rec))
    }

    fn record(&mut self, place: &Place, rec: records::Record) {
        match rec {
            Ok(fields) => self.doc(place, fields),
            Err(r) => self.fail(place, r.record, r.kind, r.detail),
        }
    }

    // ---- archives ----------------------------------------------------------------------

    /// Checks a member's name and whether it is wanted. `None`: skip it silently (a
    /// directory, or not selected); `Some(Err)`: stop the archive.
    fn admit(&mut self, name: &str, wanted: &mut Wanted, walk: &mut Walk) -> Option<Result<Place, Halt>> {
        if name.ends_with('/') || !wanted.wants(name) {
            return None;
        }
        if walk.processed >= self.limits.max_members {
            let detail = format!("archive has more than {} members; the rest are not read", self.limits.max_members);
            self.fail(&Place::file(self.input), None, InputErrorKind::TooLarge, detail);
            return Some(Err(Halt { kind: InputErrorKind::TooLarge, why: "archive member limit reached" }));
        }
        walk.processed += 1;
        Some(Ok(Place::member(self.input, name)))
    }

    /// The kind of a member by its extension, if the pipeline reads it; otherwise an error row.
    fn member_kind(&mut self, place: &Place, name: &str) -> Option<InputKind> {
        let kind = InputKind::from_name(name);
        let problem = if kind.is_archive() {
            format!("nested {kind:?} archive is not read")
        } else if kind == InputKind::Unsupported {
            "member extension is not a readable document kind".to_string()
        } else if !self.spec.kinds.contains(&kind) {
            format!("member kind {kind:?} is not read by this pipeline")
        } else {
            return Some(kind);
        };
        self.fail(place, None, InputErrorKind::UnsupportedKind, problem);
        None
    }

    fn budget(&self, kind: InputKind, inflated: bool, declared: Option<u64>, compressed: Compressed) -> Budget {
        let (doc, member) = (self.limits.max_document_bytes, self.limits.max_member_bytes);
        let (cap, over_cap, cap_name) = if kind == InputKind::Text && doc < member {
            (doc, InputErrorKind::TooLarge, "document limit")
        } else if inflated {
            (member, InputErrorKind::CompressionBomb, "member limit")
        } else {
            (member, InputErrorKind::TooLarge, "member limit")
        };
        Budget { cap, over_cap, cap_name, declared, compressed }
    }

    fn parse_member(&mut self, place: &Place, name: &str, kind: InputKind, bytes: Vec<u8>) {
        // Members are in memory, so the parsers' only error source (I/O) cannot occur.
        let _ = match kind {
            InputKind::Text => {
                match records::text(bytes) {
                    Ok(text) => self.file_doc(place, name.to_string(), text),
                    Err((kind, detail)) => self.fail(place, None, kind, detail),
                }
                Ok(())
            }
            InputKind::Jsonl => self.parse_jsonl(place, &mut bytes.as_slice()),
            InputKind::Csv => self.parse_csv(place, &mut bytes.as_slice()),
            other => {
                self.fail(place, None, InputErrorKind::UnsupportedKind, format!("{other:?} member is not read"));
                Ok(())
            }
        };
    }

    fn read_tar(
        &mut self,
        mut reader: Box<dyn ReadSeek>,
        gzip: bool,
        wanted: &mut Wanted,
        walk: &mut Walk,
    ) -> Option<Halt> {
        let top = Place::file(self.input);
        if let Err((kind, detail)) = archive::open_tar(&mut reader, gzip) {
            self.fail(&top, None, kind, detail);
            return Some(Halt { kind, why: "archive could not be opened" });
        }
        let truncated = Halt { kind: InputErrorKind::TruncatedArchive, why: "archive ends before this member" };
        let mut halt = None;
        let (max_inflated, max_ratio) = (self.limits.max_archive_inflated_bytes, self.limits.max_inflate_ratio);
        let end =
            archive::walk_tar(reader, gzip, max_inflated, max_ratio, &mut |e| match self.tar_member(e, wanted, walk) {
                Ok(()) => Flow::Next,
                Err(h) => {
                    halt = Some(h);
                    Flow::Stop
                }
            });
        match end {
            TarEnd::Complete => None,
            TarEnd::Stopped => halt,
            TarEnd::NoEndMarker => {
                let detail = format!("archive ends without an end-of-archive marker after {} members", walk.processed);
                self.fail(&top, None, InputErrorKind::TruncatedArchive, detail);
                Some(truncated)
            }
            TarEnd::Limit { kind, detail } => {
                self.fail(&top, None, kind, detail);
                Some(Halt { kind, why: "archive stream stopped at a limit before this member" })
            }
            TarEnd::Broken(error) => {
                let detail = format!("archive is truncated or corrupt after {} members ({error:?})", walk.processed);
                self.fail(&top, None, InputErrorKind::TruncatedArchive, detail);
                Some(truncated)
            }
        }
    }

    /// Reads one tar member. `Err` stops the archive.
    fn tar_member(&mut self, e: TarEntry<'_>, wanted: &mut Wanted, walk: &mut Walk) -> Result<(), Halt> {
        let place = match self.admit(&e.name, wanted, walk) {
            None => return Ok(()),
            Some(Err(halt)) => return Err(halt),
            Some(Ok(place)) => place,
        };
        if !e.name_is_utf8 {
            self.fail(&place, None, InputErrorKind::UnsafePath, "member name is not valid UTF-8");
            return Ok(());
        }
        if let Err(why) = check_member_name(&e.name) {
            self.fail(&place, None, InputErrorKind::UnsafePath, why);
            return Ok(());
        }
        if let Some(what) = e.link {
            self.fail(&place, None, InputErrorKind::Link, format!("member is a {what}"));
            return Ok(());
        }
        if let Some(t) = &e.other_type {
            let detail = format!("tar entry type {t} is not a regular file");
            self.fail(&place, None, InputErrorKind::UnsupportedKind, detail);
            return Ok(());
        }
        let Some(kind) = self.member_kind(&place, &e.name) else {
            return Ok(());
        };
        let (meter, size) = (e.meter, e.size);
        let compressed = if meter.is_gzip() { Compressed::Metered(meter.compressed()) } else { Compressed::No };
        let budget = self.budget(kind, meter.is_gzip(), None, compressed);
        if size > budget.cap {
            let detail = format!("member is {size} bytes, over the {} of {} bytes", budget.cap_name, budget.cap);
            self.fail(&place, None, budget.over_cap, detail);
            return Ok(());
        }
        let truncated = Halt { kind: InputErrorKind::TruncatedArchive, why: "archive ends before this member" };
        match read_member(e.data, &budget, self.limits, Some(meter)) {
            Ok(bytes) if (bytes.len() as u64) < size => {
                let detail = format!("member ends after {} of {size} bytes", bytes.len());
                self.fail(&place, None, InputErrorKind::TruncatedArchive, detail);
                Err(truncated)
            }
            Ok(bytes) => {
                self.parse_member(&place, &e.name, kind, bytes);
                Ok(())
            }
            Err(ReadFail::Limit { kind, detail, stream }) => {
                self.fail(&place, None, kind, detail);
                if stream {
                    return Err(Halt { kind, why: "archive stream stopped at a limit before this member" });
                }
                Ok(())
            }
            Err(ReadFail::Io { error, read }) => {
                let detail =
                    format!("member data is truncated or corrupt after {read} of {size} bytes ({:?})", error.kind());
                self.fail(&place, None, InputErrorKind::TruncatedArchive, detail);
                Err(truncated)
            }
        }
    }

    fn read_zip(&mut self, mut reader: Box<dyn ReadSeek>, wanted: &mut Wanted, walk: &mut Walk) -> Option<Halt> {
        let top = Place::file(self.input);
        if let Err((kind, detail)) = archive::open_zip(&mut reader) {
            self.fail(&top, None, kind, detail);
            let why = if kind == InputErrorKind::Unreadable {
                "archive could not be read"
            } else {
                "archive could not be opened"
            };
            return Some(Halt { kind, why });
        }
        let mut visitor = ZipReading { reader: self, wanted, walk, place: None, halt: None };
        let end = archive::walk_zip(reader, &mut visitor);
        let halt = visitor.halt.take();
        match end {
            ZipEnd::Complete => None,
            ZipEnd::Stopped => halt,
            // The members before the cut still yield documents; the archive as a whole is
            // reported truncated.
            ZipEnd::LocalHeaders { class, taken, .. } => {
                let detail =
                    format!("zip central directory is unreadable ({class}); {taken} members read from local headers");
                self.fail(&top, None, InputErrorKind::TruncatedArchive, detail);
                halt.or(Some(Halt { kind: InputErrorKind::TruncatedArchive, why: "archive ends before this member" }))
            }
        }
    }

    /// Reads one zip member after its name passed. `Err` stops the archive.
    fn zip_member<R: Read>(
        &mut self,
        place: &Place,
        name: &str,
        file: &mut zip::read::ZipFile<'_, R>,
        walk: &mut Walk,
    ) -> Result<(), Halt> {
        if file.is_symlink() {
            self.fail(place, None, InputErrorKind::Link, "member is a symbolic link");
            return Ok(());
        }
        let Some(kind) = self.member_kind(place, name) else {
            return Ok(());
        };
        let (size, packed) = (file.size(), file.compressed_size());
        let inflated = file.compression() != zip::CompressionMethod::Stored;
        let compressed = if inflated { Compressed::Declared(packed) } else { Compressed::No };
        let budget = self.budget(kind, inflated, Some(size), compressed);
        let ratio = self.limits.max_inflate_ratio;
        if inflated && size > RATIO_CHECK_MIN_BYTES && size > packed.saturating_mul(ratio) {
            let detail = format!("member declares {size} bytes inflated from {packed}, over the {ratio}:1 ratio limit");
            self.fail(place, None, InputErrorKind::CompressionBomb, detail);
            return Ok(());
        }
        if size > budget.cap {
            let detail = format!("member declares {size} bytes, over the {} of {} bytes", budget.cap_name, budget.cap);
            self.fail(place, None, budget.over_cap, detail);
            return Ok(());
        }
        let total_limit = self.limits.max_archive_inflated_bytes;
        if walk.inflated.saturating_add(size) > total_limit {
            let detail = format!("archive inflates past {total_limit} bytes");
            self.fail(place, None, InputErrorKind::CompressionBomb, detail);
            return Err(Halt { kind: InputErrorKind::CompressionBomb, why: "archive inflated-size limit reached" });
        }
        match read_member(file, &budget, self.limits, None) {
            Ok(bytes) => {
                walk.inflated += bytes.len() as u64;
                if (bytes.len() as u64) < size {
                    let detail = format!("member inflates to {} of its declared {size} bytes", bytes.len());
                    self.fail(place, None, InputErrorKind::TruncatedArchive, detail);
                } else {
                    self.parse_member(place, name, kind, bytes);
                }
            }
            Err(ReadFail::Limit { kind, detail, .. }) => self.fail(place, None, kind, detail),
            Err(ReadFail::Io { error, read }) => {
                walk.inflated += read;
                let detail = format!("member data is truncated or corrupt after {read} bytes ({:?})", error.kind());
                self.fail(place, None, InputErrorKind::TruncatedArchive, detail);
            }
        }
        Ok(())
    }

    fn finish_archive(&mut self, wanted: &Wanted, halt: Option<Halt>, walk: &Walk) {
        for name in wanted.missing() {
            let place = Place::member(self.input, name);
            match &halt {
                Some(h) => self.fail(&place, None, h.kind, format!("member not read: {}", h.why)),
                None => self.fail(
                    &place,
                    None,
                    InputErrorKind::Unreadable,
                    "member listed at planning time is not in the archive",
                ),
            }
        }
        if halt.is_none() && walk.processed == 0 && wanted.listed.is_none() {
            self.fail(&Place::file(self.input), None, InputErrorKind::Empty, "archive holds no files");
        }
    }
}

/// A zip walk reading members into documents: admission and name checks when a member is
/// offered, reading once it is opened.
struct ZipReading<'r, 'a, 's, 'w, 'n> {
    reader: &'r mut Reader<'a, 's>,
    wanted: &'w mut Wanted<'n>,
    walk: &'w mut Walk,
    /// The member offered and taken, until it is opened.
    place: Option<Place>,
    halt: Option<Halt>,
}

impl ZipVisitor for ZipReading<'_, '_, '_, '_, '_> {
    fn offer(&mut self, name: &str, _size: u64) -> Take {
        let place = match self.reader.admit(name, self.wanted, self.walk) {
            None => return Take::Skip,
            Some(Err(halt)) => {
                self.halt = Some(halt);
                return Take::Stop;
            }
            Some(Ok(place)) => place,
        };
        if let Err(why) = check_member_name(name) {
            self.reader.fail(&place, None, InputErrorKind::UnsafePath, why);
            return Take::Skip;
        }
        self.place = Some(place);
        Take::Open
    }

    fn member<R: Read>(&mut self, name: &str, file: ZipOpened<'_, '_, R>) -> Flow {
        let Some(place) = self.place.take() else { return Flow::Next };
        let result = match file {
            Ok(file) => self.reader.zip_member(&place, name, file, self.walk),
            Err((kind, detail)) => {
                self.reader.fail(&place, None, kind, detail);
                Ok(())
            }
        };
        match result {
            Ok(()) => Flow::Next,
            Err(halt) => {
                self.halt = Some(halt);
                Flow::Stop
            }
        }
    }
}

// ---- bounded reading -------------------------------------------------------------------

/// Copies a member into memory within its budget, checking after every chunk, so neither a
/// large member nor a lying header gets more than `cap + 1` bytes into memory.
fn read_member(
    r: &mut dyn Read,
    budget: &Budget,
    limits: &InputLimits,
    meter: Option<&StreamMeter>,
) -> Result<Vec<u8>, ReadFail> {
    let member_limit = |kind, detail| ReadFail::Limit { kind, detail, stream: false };
    let ratio = limits.max_inflate_ratio;
    let mut out = Vec::new();
    let mut chunk = vec![0u8; COPY_CHUNK_BYTES];
    loop {
        let room = (budget.cap + 1 - out.len() as u64).min(COPY_CHUNK_BYTES as u64) as usize;
        let n = match r.read(&mut chunk[..room]) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                if let Some((kind, detail)) = meter.and_then(|m| m.verdict()) {
                    return Err(ReadFail::Limit { kind, detail, stream: true });
                }
                return Err(ReadFail::Io { error, read: out.len() as u64 });
            }
        };
        out.extend_from_slice(&chunk[..n]);
        let got = out.len() as u64;
        if let Some(declared) = budget.declared.filter(|d| got > *d) {
            let detail = format!("member inflates past its declared size of {declared} bytes");
            return Err(member_limit(InputErrorKind::CompressionBomb, detail));
        }
        if got > budget.cap {
            let detail = format!("member exceeds the {} of {} bytes", budget.cap_name, budget.cap);
            return Err(member_limit(budget.over_cap, detail));
        }
        let packed = match budget.compressed {
            Compressed::No => None,
            Compressed::Declared(c) => Some(c),
            Compressed::Metered(start) => meter.map(|m| m.compressed() - start + GZ_BUFFER_BYTES as u64),
        };
        if let Some(packed) = packed.filter(|p| got > RATIO_CHECK_MIN_BYTES && got > p.saturating_mul(ratio)) {
            let detail =
                format!("member inflates past {got} bytes from about {packed}, over the {ratio}:1 ratio limit");
            return Err(member_limit(InputErrorKind::CompressionBomb, detail));
        }
    }
}

/// The last path segment of a URI: the id of a whole-file document.
fn file_name(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or(uri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use medbatch_formats::limits::{DEFAULT_MAX_INFLATE_RATIO, DEFAULT_MAX_MEMBER_BYTES};
    use medbatch_schemas::Digest;
    use std::io::{Cursor, Seek, SeekFrom, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tar::EntryType;
    use zip::write::SimpleFileOptions;
    use InputErrorKind as K;

    /// Planted in test documents: no error detail may ever contain it.
    const SECRET: &str = "Jane Doe";

    fn spec() -> InputSpec {
        InputSpec {
            kinds: vec![
                InputKind::Text,
                InputKind::Jsonl,
                InputKind::Csv,
                InputKind::Tar,
                InputKind::TarGz,
                InputKind::Zip,
            ],
            id_field: "id".into(),
            text_field: "text".into(),
            max_document_bytes: 1 << 20,
            patient_field: None,
            date_field: None,
            patient_pattern: None,
            date_pattern: None,
        }
    }

    fn limits() -> InputLimits {
        InputLimits::from_spec(&spec())
    }

    #[derive(Default)]
    struct Out {
        docs: Vec<Document>,
        errors: Vec<InputError>,
    }

    impl Out {
        fn ids(&self) -> Vec<&str> {
            self.docs.iter().map(|d| d.id.as_str()).collect()
        }
        fn kinds(&self) -> Vec<InputErrorKind> {
            self.errors.iter().map(|e| e.kind).collect()
        }
        fn members(&self) -> Vec<Option<&str>> {
            self.errors.iter().map(|e| e.member.as_deref()).collect()
        }
    }

    fn input(uri: &str, bytes: &[u8], selection: Selection) -> InputRef {
        InputRef {
            uri: uri.into(),
            size: bytes.len() as u64,
            sha256: Digest::of_bytes(bytes),
            kind: InputKind::from_name(uri),
            selection,
            etag: None,
            case: None,
        }
    }

    fn read_from(input: &InputRef, reader: Box<dyn ReadSeek>, spec: &InputSpec, limits: &InputLimits) -> Out {
        let mut out = Out::default();
        read_documents(input, reader, spec, limits, &mut |r| match r {
            Ok(d) => out.docs.push(d),
            Err(e) => out.errors.push(e),
        });
        for e in &out.errors {
            assert!(!e.detail.contains(SECRET), "detail leaks document text: {e}");
            assert_eq!(e.source_uri, input.uri);
        }
        out
    }

    fn read_with(uri: &str, bytes: Vec<u8>, selection: Selection, limits: &InputLimits) -> Out {
        let input = input(uri, &bytes, selection);
        read_from(&input, Box::new(Cursor::new(bytes)), &spec(), limits)
    }

    fn read(uri: &str, bytes: impl Into<Vec<u8>>) -> Out {
        read_with(uri, bytes.into(), Selection::Whole, &limits())
    }

    /// A tar entry with raw name bytes: the tar crate's path setters refuse `..` and `/`.
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: EntryType, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if matches!(kind, EntryType::Symlink | EntryType::Link) {
            h.set_link_name("notes/a.txt").unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let kind = if name.ends_with('/') { EntryType::Directory } else { EntryType::Regular };
            raw_entry(&mut b, name, kind, data);
        }
        b.into_inner().unwrap()
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            if name.ends_with('/') {
                w.add_directory(*name, opts).unwrap();
            } else {
                w.start_file(*name, opts).unwrap();
                w.write_all(data).unwrap();
            }
        }
        w.finish().unwrap().into_inner()
    }

    /// Text that compresses about as badly as real notes, so archive cuts land mid-stream.
    fn noisy_note(seed: u32, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        let mut out = format!("{SECRET} note {seed}: ").into_bytes();
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.push(b'a' + (x % 26) as u8);
        }
        out
    }

    const JSONL: &[u8] =
        b"{\"id\":\"r1\",\"text\":\"Jane Doe, K 6.1\"}\n\n{\"id\":7,\"text\":\"Jane Doe, Na 140\"}\r\n";
    const CSV: &[u8] = b"id,text,ward\nc1,\"Jane Doe, K 4.1\",A\nc2,\"two\nlines\",B\n";

    #[test]
    fn input_limits_from_spec() {
        let mut s = spec();
        s.max_document_bytes = 1234;
        let l = InputLimits::from_spec(&s);
        assert_eq!(l.max_document_bytes, 1234);
        assert_eq!(l.max_inflate_ratio, DEFAULT_MAX_INFLATE_RATIO);
        assert_eq!(l.max_member_bytes, DEFAULT_MAX_MEMBER_BYTES);
    }

    #[test]
    fn input_text_file_is_one_document() {
        let out = read("s3://bucket/notes/n1.txt", "\u{feff}Jane Doe has a cough.\n");
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let d = &out.docs[0];
        assert_eq!((d.id.as_str(), d.source_uri.as_str()), ("n1.txt", "s3://bucket/notes/n1.txt"));
        assert_eq!(d.text, "Jane Doe has a cough.\n");
        assert_eq!(d.input_sha256, Digest::of_bytes("\u{feff}Jane Doe has a cough.\n".as_bytes()));
    }

    #[test]
    fn input_parquet_rows_become_documents() {
        use arrow::array::{ArrayRef, Date32Array, Int64Array, RecordBatch, StringArray};
        let long = "x".repeat(2 << 20);
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("id", Arc::new(StringArray::from(vec![Some("n1"), Some("n2"), None, Some("n4"), Some("n5")]))),
            ("text", Arc::new(StringArray::from(vec![Some(SECRET), None, Some("t"), Some(long.as_str()), Some("ok")]))),
            ("mrn", Arc::new(Int64Array::from(vec![Some(7), Some(7), Some(8), None, None]))),
            ("seen", Arc::new(Date32Array::from(vec![Some(20_429), None, None, None, None]))),
            ("other", Arc::new(StringArray::from(vec!["a"; 5]))),
        ];
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let bytes = crate::parquet_out::to_parquet(&batch).unwrap();
        let mut spec = spec();
        spec.kinds.push(InputKind::Parquet);
        (spec.patient_field, spec.date_field) = (Some("mrn".into()), Some("seen".into()));
        let read = |uri: &str, bytes: Vec<u8>, spec: &InputSpec| {
            read_from(&input(uri, &bytes, Selection::Whole), Box::new(Cursor::new(bytes.clone())), spec, &limits())
        };
        let out = read("s3://b/t/part-0.parquet", bytes.clone(), &spec);
        assert_eq!(out.ids(), ["n1", "n5"]);
        let d = &out.docs[0];
        assert_eq!(
            (d.text.as_str(), d.patient_id.as_deref(), d.date.as_deref()),
            (SECRET, Some("7"), Some("2025-12-07"))
        );
        assert_eq!(out.kinds(), [K::Empty, K::MissingField, K::TooLarge]);
        assert_eq!(out.errors[0].record.as_deref(), Some("n2"));
        assert_eq!(out.errors[1].record.as_deref(), Some("3"), "a row without an id is named by its number");
        // Not Parquet; no text column; a pipeline that does not read Parquet.
        assert_eq!(read("x.parquet", b"PAR1 not really".to_vec(), &spec).kinds(), [K::WrongFormat]);
        spec.text_field = "body".into();
        let missing = read("x.parquet", bytes.clone(), &spec);
        assert_eq!((missing.kinds(), missing.errors[0].detail.as_str()), (vec![K::MissingField], "no column \"body\""));
        assert_eq!(read("x.parquet", bytes, &self::spec()).kinds(), [K::UnsupportedKind]);
        // A table with no rows is no documents and no error.
        let empty = crate::parquet_out::to_parquet(&batch.slice(0, 0)).unwrap();
        spec.text_field = "text".into();
        let none = read("e.parquet", empty, &spec);
        assert!(none.docs.is_empty() && none.errors.is_empty());
    }

    #[test]
    fn input_jsonl_records_become_documents() {
        let out = read("file:///in/labs.jsonl", JSONL);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.ids(), ["r1", "7"]);
        assert_eq!(out.docs[1].text, "Jane Doe, Na 140");
        assert_eq!(out.docs[0].source_uri, "file:///in/labs.jsonl");
    }

    #[test]
    fn input_csv_records_become_documents() {
        let out = read("file:///in/labs.csv", CSV);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.ids(), ["c1", "c2"]);
        assert_eq!(out.docs[0].text, "Jane Doe, K 4.1");
        assert_eq!(out.docs[1].text, "two\nlines");
    }

    fn mixed_members() -> Vec<(&'static str, &'static [u8])> {
        vec![("notes/", b""), ("notes/a.txt", b"Jane Doe, first note"), ("b.jsonl", JSONL), ("c.csv", CSV)]
    }

    fn assert_mixed(out: &Out, uri: &str) {
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.ids(), ["notes/a.txt", "r1", "7", "c1", "c2"]);
        assert_eq!(out.docs[0].source_uri, format!("{uri}#notes/a.txt"));
        assert_eq!(out.docs[1].source_uri, format!("{uri}#b.jsonl"));
    }

    #[test]
    fn input_tar_members_are_read_by_extension() {
        let uri = "file:///in/batch.tar";
        let bytes = tar_of(&mixed_members());
        let out = read(uri, bytes.clone());
        assert_mixed(&out, uri);
        assert_eq!(out.docs[0].input_sha256, Digest::of_bytes(&bytes));
    }

    #[test]
    fn input_tar_gz_members_are_read_by_extension() {
        let uri = "s3://b/batch.tar.gz";
        assert_mixed(&read(uri, gz(&tar_of(&mixed_members()))), uri);
    }

    #[test]
    fn input_zip_members_are_read_by_extension() {
        let uri = "s3://b/batch.zip";
        assert_mixed(&read(uri, zip_of(&mixed_members())), uri);
    }

    #[test]
    fn input_selection_yields_listed_members_and_reports_missing() {
        let members: &[(&str, &[u8])] = &[("a.txt", b"Jane Doe a"), ("b.txt", b"Jane Doe b"), ("c.txt", b"Jane Doe c")];
        let selection = Selection::Members(vec!["c.txt".into(), "a.txt".into(), "gone.txt".into()]);
        for (uri, bytes) in [("x.tar", tar_of(members)), ("x.tar.gz", gz(&tar_of(members))), ("x.zip", zip_of(members))]
        {
            let out = read_with(uri, bytes, selection.clone(), &limits());
            assert_eq!(out.ids(), ["a.txt", "c.txt"], "{uri}");
            assert_eq!(out.kinds(), [K::Unreadable], "{uri}");
            assert_eq!(out.members(), [Some("gone.txt")], "{uri}");
        }
    }

    #[test]
    fn input_empty_file_member_and_record() {
        assert_eq!(read("e.txt", "").kinds(), [K::Empty]);
        assert_eq!(read("w.txt", " \n\t\n").kinds(), [K::Empty]);
        assert_eq!(read("e.jsonl", "\n\n").kinds(), [K::Empty]);
        assert_eq!(read("e.csv", "").kinds(), [K::Empty]);
        assert_eq!(read("e.tar", tar_of(&[])).kinds(), [K::Empty]);
        assert_eq!(read("e.zip", "").kinds(), [K::Empty]);

        let out = read("m.tar", tar_of(&[("empty.txt", b""), ("good.txt", b"Jane Doe ok")]));
        assert_eq!((out.ids(), out.kinds()), (vec!["good.txt"], vec![K::Empty]));
        assert_eq!(out.members(), [Some("empty.txt")]);

        let out = read("r.jsonl", "{\"id\":\"x\",\"text\":\"  \"}\n{\"id\":\"y\",\"text\":\"Jane Doe\"}\n");
        assert_eq!((out.ids(), out.kinds()), (vec!["y"], vec![K::Empty]));
        assert_eq!(out.errors[0].record.as_deref(), Some("x"));
    }

    #[test]
    fn input_invalid_utf8_reports_the_offset() {
        let bad = b"Jane Doe \xff\xfe rest".to_vec();
        let out = read("bad.txt", bad.clone());
        assert_eq!(out.kinds(), [K::InvalidUtf8]);
        assert!(out.errors[0].detail.contains("offset 9"), "{}", out.errors[0].detail);

        let out = read("m.zip", zip_of(&[("bad.txt", &bad), ("good.txt", b"Jane Doe ok")]));
        assert_eq!((out.ids(), out.kinds()), (vec!["good.txt"], vec![K::InvalidUtf8]));

        let mut jsonl = b"{\"id\":\"a\",\"text\":\"Jane Doe \xff\"}\n".to_vec();
        jsonl.extend_from_slice(b"{\"id\":\"b\",\"text\":\"Jane Doe ok\"}\n");
        let out = read("u.jsonl", jsonl);
        assert_eq!((out.ids(), out.kinds()), (vec!["b"], vec![K::InvalidUtf8]));
        assert!(out.errors[0].detail.contains("offset 27"), "{}", out.errors[0].detail);

        let mut csv = b"id,text\n1,Jane Doe \xff\n".to_vec();
        csv.extend_from_slice(b"2,Jane Doe ok\n");
        let out = read("u.csv", csv);
        assert_eq!((out.ids(), out.kinds()), (vec!["2"], vec![K::InvalidUtf8]));
        assert!(out.errors[0].detail.contains("offset 9"), "{}", out.errors[0].detail);
        assert_eq!(out.errors[0].record.as_deref(), Some("1"));
    }

    #[test]
    fn input_malformed_jsonl_line_among_good_ones() {
        let jsonl = "{\"id\":\"a\",\"text\":\"Jane Doe one\"}\n\
                     {\"id\":\"b\",\"text\":\"Jane Doe, cut off\n\
                     [\"Jane Doe\"]\n\
                     {\"id\":\"d\",\"text\":\"Jane Doe four\"}\n";
        let out = read("m.jsonl", jsonl);
        assert_eq!(out.ids(), ["a", "d"]);
        assert_eq!(out.kinds(), [K::MalformedRecord, K::MalformedRecord]);
        let records: Vec<_> = out.errors.iter().map(|e| e.record.as_deref()).collect();
        assert_eq!(records, [Some("2"), Some("3")]);
    }

    #[test]
    fn input_missing_fields() {
        let jsonl = "{\"text\":\"Jane Doe\"}\n{\"id\":\"q\"}\n{\"id\":true,\"text\":\"Jane Doe\"}\n{\"id\":\"ok\",\"text\":\"Jane Doe\"}\n";
        let out = read("f.jsonl", jsonl);
        assert_eq!(out.ids(), ["ok"]);
        assert_eq!(out.kinds(), [K::MissingField, K::MissingField, K::MalformedRecord]);
        assert_eq!(out.errors[0].record.as_deref(), Some("1"));
        assert_eq!(out.errors[1].record.as_deref(), Some("q"));

        // No text column: one error for the whole file, however many rows.
        let out = read("n.csv", "id,body\n1,Jane Doe\n2,Jane Doe\n");
        assert_eq!((out.docs.len(), out.kinds()), (0, vec![K::MissingField]));
        assert_eq!(out.errors[0].record, None);
        assert_eq!(read("n.csv", "key,text\n1,Jane Doe\n").kinds(), [K::MissingField]);

        // A short row lacks the text field; its neighbours still come through.
        let out = read("s.csv", "id,ward,text\n1,A\n2,B,Jane Doe ok\n");
        assert_eq!((out.ids(), out.kinds()), (vec!["2"], vec![K::MissingField]));
    }

    #[test]
    fn input_truncated_tar_gz_keeps_earlier_members() {
        let notes: Vec<(String, Vec<u8>)> = (0..20).map(|i| (format!("n{i:02}.txt"), noisy_note(i, 4000))).collect();
        let entries: Vec<(&str, &[u8])> = notes.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let full = gz(&tar_of(&entries));
        let out = read("cut.tar.gz", full[..full.len() / 2].to_vec());
        assert_eq!(out.kinds(), [K::TruncatedArchive]);
        assert!(!out.docs.is_empty() && out.docs.len() < 20, "{}", out.docs.len());
        let expected: Vec<String> = (0..out.docs.len()).map(|i| format!("n{i:02}.txt")).collect();
        assert_eq!(out.ids(), expected);

        // Listed members past the cut each get a row.
        let selection = Selection::Members(vec!["n00.txt".into(), "n19.txt".into()]);
        let out = read_with("cut.tar.gz", full[..full.len() / 2].to_vec(), selection, &limits());
        assert_eq!(out.ids(), ["n00.txt"]);
        assert_eq!(out.kinds(), [K::TruncatedArchive, K::TruncatedArchive]);
        assert_eq!(out.members().last(), Some(&Some("n19.txt")));
    }

    #[test]
    fn input_truncated_tar_and_zip_keep_earlier_members() {
        let a = noisy_note(1, 700);
        let b = noisy_note(2, 700);
        let tar = tar_of(&[("a.txt", &a), ("b.txt", &b)]);
        // Cut inside b's data (a: 512 header + 1024 data; b's data starts at 2048).
        let out = read("cut.tar", tar[..2300].to_vec());
        assert_eq!((out.ids(), out.kinds()), (vec!["a.txt"], vec![K::TruncatedArchive]));
        assert_eq!(out.members(), [Some("b.txt")]);
        // Cut exactly at a block boundary: only the missing end-of-archive marker tells.
        let out = read("cut.tar", tar[..1536].to_vec());
        assert_eq!((out.ids(), out.kinds()), (vec!["a.txt"], vec![K::TruncatedArchive]));
        assert_eq!(out.members(), [None]);

        let zip = zip_of(&[("a.txt", &a), ("b.txt", &b)]);
        let out = read("cut.zip", zip[..zip.len() - 40].to_vec());
        assert_eq!((out.ids(), out.kinds()), (vec!["a.txt", "b.txt"], vec![K::TruncatedArchive]));
        let out = read("cut.zip", zip[..zip.len() / 2].to_vec());
        assert_eq!(out.kinds().last(), Some(&K::TruncatedArchive));
        assert_eq!(out.ids(), ["a.txt"]);
    }

    #[test]
    fn input_unsafe_member_names() {
        let mut b = tar::Builder::new(Vec::new());
        for name in ["../evil.txt", "/etc/passwd", "notes/../../x.txt", "..\\evil.txt", "C:evil.txt"] {
            raw_entry(&mut b, name, EntryType::Regular, b"Jane Doe");
        }
        raw_entry(&mut b, "good.txt", EntryType::Regular, b"Jane Doe ok");
        let out = read("u.tar", b.into_inner().unwrap());
        assert_eq!(out.ids(), ["good.txt"]);
        assert_eq!(out.kinds(), [K::UnsafePath; 5]);
        assert_eq!(out.members()[..2], [Some("../evil.txt"), Some("/etc/passwd")]);

        let out =
            read("u.zip", zip_of(&[("../evil.txt", b"Jane Doe"), ("/etc/passwd", b"x"), ("good.txt", b"Jane Doe ok")]));
        assert_eq!((out.ids(), out.kinds()), (vec!["good.txt"], vec![K::UnsafePath, K::UnsafePath]));
    }

    #[test]
    fn input_link_members() {
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "notes/a.txt", EntryType::Regular, b"Jane Doe ok");
        raw_entry(&mut b, "sym.txt", EntryType::Symlink, b"");
        raw_entry(&mut b, "hard.txt", EntryType::Link, b"");
        let out = read("l.tar", b.into_inner().unwrap());
        assert_eq!((out.ids(), out.kinds()), (vec!["notes/a.txt"], vec![K::Link, K::Link]));

        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default();
        w.add_symlink("sym.txt", "/etc/passwd", opts).unwrap();
        w.start_file("good.txt", opts).unwrap();
        w.write_all(b"Jane Doe ok").unwrap();
        let out = read("l.zip", w.finish().unwrap().into_inner());
        assert_eq!((out.ids(), out.kinds()), (vec!["good.txt"], vec![K::Link]));
    }

    /// Counts bytes handed out, to prove an oversized input is not read past its limit.
    struct Counting {
        inner: Cursor<Vec<u8>>,
        read: Arc<AtomicU64>,
    }

    impl Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            Ok(n)
        }
    }

    impl Seek for Counting {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    #[test]
    fn input_too_large_documents_and_members() {
        let mut small = spec();
        small.max_document_bytes = 100;
        let lim = InputLimits::from_spec(&small);

        let read_count = Arc::new(AtomicU64::new(0));
        let big = vec![b'a'; 10 << 20];
        let reader = Counting { inner: Cursor::new(big.clone()), read: Arc::clone(&read_count) };
        let out = read_from(&input("big.txt", &big, Selection::Whole), Box::new(reader), &small, &lim);
        assert_eq!(out.kinds(), [K::TooLarge]);
        assert!(read_count.load(Ordering::Relaxed) <= 101, "read {} bytes", read_count.load(Ordering::Relaxed));
        assert_eq!(read_with("ok.txt", vec![b'a'; 100], Selection::Whole, &lim).ids(), ["ok.txt"]);

        let members: &[(&str, &[u8])] = &[("big.txt", &[b'a'; 101]), ("ok.txt", b"Jane Doe ok")];
        for (uri, bytes) in [("t.tar", tar_of(members)), ("t.tar.gz", gz(&tar_of(members))), ("t.zip", zip_of(members))]
        {
            let out = read_with(uri, bytes, Selection::Whole, &lim);
            assert_eq!((out.ids(), out.kinds()), (vec!["ok.txt"], vec![K::TooLarge]), "{uri}");
        }

        let jsonl =
            format!("{{\"id\":\"long\",\"text\":\"{}\"}}\n{{\"id\":\"ok\",\"text\":\"Jane Doe\"}}\n", "a".repeat(101));
        let out = read_with("r.jsonl", jsonl.into_bytes(), Selection::Whole, &lim);
        assert_eq!((out.ids(), out.kinds()), (vec!["ok"], vec![K::TooLarge]));
        // A line past the record limit is skipped unparsed.
        let huge = format!(
            "{{\"id\":\"huge\",\"text\":\"{}\"}}\n{{\"id\":\"ok\",\"text\":\"Jane Doe\"}}\n",
            "a".repeat(1 << 20)
        );
        let out = read_with("r.jsonl", huge.into_bytes(), Selection::Whole, &lim);
        assert_eq!((out.ids(), out.kinds()), (vec!["ok"], vec![K::TooLarge]));
        assert_eq!(out.errors[0].record.as_deref(), Some("1"));

        // A CSV record that never ends (an unclosed quote) stops the file at the record limit.
        let csv = format!("id,text\n1,Jane Doe ok\n2,\"{}", "a".repeat(1 << 20));
        let out = read_with("r.csv", csv.into_bytes(), Selection::Whole, &lim);
        assert_eq!((out.ids(), out.kinds()), (vec!["1"], vec![K::TooLarge]));
    }

    #[test]
    fn input_zip_bomb_by_declared_ratio() {
        let zeros = vec![0u8; 10 << 20];
        let out = read("bomb.zip", zip_of(&[("zeros.txt", &zeros), ("ok.txt", b"Jane Doe ok")]));
        assert_eq!((out.ids(), out.kinds()), (vec!["ok.txt"], vec![K::CompressionBomb]));
        assert_eq!(out.members(), [Some("zeros.txt")]);
    }

    #[test]
    fn input_zip_lying_header_is_caught_by_counting() {
        let zeros = vec![b' '; 10 << 20];
        let mut zip = zip_of(&[("zeros.txt", &zeros), ("ok.txt", b"Jane Doe ok")]);
        // Make both headers of the first member claim 1000 bytes inflated: the declared ratio
        // then looks harmless, and only counting while inflating catches it.
        assert_eq!(&zip[..4], b"PK\x03\x04");
        zip[22..26].copy_from_slice(&1000u32.to_le_bytes());
        let central = zip.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        zip[central + 24..central + 28].copy_from_slice(&1000u32.to_le_bytes());
        let out = read("liar.zip", zip);
        assert_eq!((out.ids(), out.kinds()), (vec!["ok.txt"], vec![K::CompressionBomb]));
        assert!(out.errors[0].detail.contains("declared size"), "{}", out.errors[0].detail);
    }

    #[test]
    fn input_tar_gz_bombs() {
        // The stream ratio stops the archive while the bomb member is inflated.
        let spaces = vec![b' '; 10 << 20];
        let tar = tar_of(&[("a.txt", b"Jane Doe ok"), ("spaces.jsonl", &spaces), ("c.txt", b"Jane Doe c")]);
        let out = read("bomb.tar.gz", gz(&tar));
        assert_eq!((out.ids(), out.kinds()), (vec!["a.txt"], vec![K::CompressionBomb]));
        assert_eq!(out.members(), [Some("spaces.jsonl")]);

        // A member declaring more than the member limit is refused unread.
        let mut lim = limits();
        lim.max_member_bytes = 1000;
        let big = noisy_note(3, 5000);
        let tar = tar_of(&[("big.jsonl", &big), ("ok.txt", b"Jane Doe ok")]);
        let out = read_with("m.tar.gz", gz(&tar), Selection::Whole, &lim);
        assert_eq!((out.ids(), out.kinds()), (vec!["ok.txt"], vec![K::CompressionBomb]));
    }

    #[test]
    fn input_wrong_format() {
        let text = "Jane Doe: this is a plain note, whatever its name says.\n".repeat(20);
        let pdf = b"%PDF-1.7\n1 0 obj Jane Doe".to_vec();
        let mut dicom = vec![0u8; 128];
        dicom.extend_from_slice(b"DICM");
        let zip = zip_of(&[("a.txt", b"Jane Doe")]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("really-text.zip", text.clone().into_bytes()),
            ("really-text.tar.gz", text.clone().into_bytes()),
            ("really-zip.tar.gz", zip.clone()),
            ("really-text.tar", text.clone().into_bytes()),
            ("short-text.tar", b"Jane Doe".to_vec()),
            ("gzip-of-text.tar.gz", gz(text.as_bytes())),
            ("report.txt", pdf.clone()),
            ("image.txt", dicom),
            ("nul.txt", b"Jane Doe\0\0\0".to_vec()),
            ("zip.txt", zip),
            ("rows.jsonl", b"id,text\n1,Jane Doe\n".to_vec()),
            ("pdf.csv", pdf.clone()),
        ];
        for (uri, bytes) in cases {
            let out = read(uri, bytes);
            assert_eq!((out.docs.len(), out.kinds()), (0, vec![K::WrongFormat]), "{uri}: {:?}", out.errors);
        }
        let out = read("m.tar", tar_of(&[("scan.txt", &pdf), ("ok.txt", b"Jane Doe ok")]));
        assert_eq!((out.ids(), out.kinds()), (vec!["ok.txt"], vec![K::WrongFormat]));
    }

    #[test]
    fn input_unsupported_kinds() {
        let inner = zip_of(&[("a.txt", b"Jane Doe")]);
        let tar =
            tar_of(&[("inner.zip", &inner), ("scan.pdf", b"%PDF"), ("rows.jsonl", JSONL), ("ok.txt", b"Jane Doe ok")]);
        let out = read("n.tar", tar.clone());
        assert_eq!(out.kinds(), [K::UnsupportedKind, K::UnsupportedKind]);
        assert_eq!(out.ids(), ["r1", "7", "ok.txt"]);

        // Members the pipeline does not accept, and inputs it does not accept.
        let mut only_text = spec();
        only_text.kinds = vec![InputKind::Tar, InputKind::Text];
        let out = read_from(&input("n.tar", &tar, Selection::Whole), Box::new(Cursor::new(tar)), &only_text, &limits());
        assert_eq!(out.kinds(), [K::UnsupportedKind; 3]);
        assert_eq!(out.ids(), ["ok.txt"]);
        let out =
            read_from(&input("a.jsonl", JSONL, Selection::Whole), Box::new(Cursor::new(JSONL)), &only_text, &limits());
        assert_eq!(out.kinds(), [K::UnsupportedKind]);
        assert_eq!(read("scan.pdf", "%PDF").kinds(), [K::UnsupportedKind]);
    }

    #[test]
    fn input_member_count_limit() {
        let mut lim = limits();
        lim.max_members = 2;
        let tar = tar_of(&[("a.txt", b"Jane Doe a"), ("b.txt", b"Jane Doe b"), ("c.txt", b"Jane Doe c")]);
        let out = read_with("many.tar", tar, Selection::Whole, &lim);
        assert_eq!((out.ids(), out.kinds()), (vec!["a.txt", "b.txt"], vec![K::TooLarge]));
        assert_eq!(out.members(), [None]);
    }

    #[test]
    fn input_oversized_tar_header_is_refused() {
        // A GNU long-name record the tar crate would buffer whole: 2 MiB of name, after a
        // large member that is skipped (seeked over in a tar, inflated through in a tar.gz).
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "a.txt", EntryType::Regular, b"Jane Doe ok");
        raw_entry(&mut b, "big.bin", EntryType::Regular, &noisy_note(5, 3 << 20));
        raw_entry(&mut b, "././@LongLink", EntryType::GNULongName, &vec![b'n'; 2 << 20]);
        raw_entry(&mut b, "b.txt", EntryType::Regular, b"Jane Doe b");
        let tar = b.into_inner().unwrap();
        for (uri, bytes) in [("long.tar", tar.clone()), ("long.tar.gz", gz(&tar))] {
            let out = read(uri, bytes);
            assert_eq!(out.ids(), ["a.txt"], "{uri}");
            assert_eq!(out.kinds(), [K::UnsupportedKind, K::TooLarge], "{uri}");
        }
    }
}
