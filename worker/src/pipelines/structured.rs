//! `structured` pipelines: the answer schema's objects become rows, with Arrow columns
//! derived from the schema (string, number, integer, boolean, string enums as dictionaries,
//! arrays as lists, objects as structs; nullable unless required and not `null`-typed), one
//! row per document or one per element of the array property `output.items`.
//!
//! The model reads the whole document, in token-budgeted chunks when it is long
//! ([`crate::chunk`]); rows from all chunks are merged, those with the same evidence span
//! kept once, and evidence offsets mapped back to the whole document.

use crate::chunk::chunk_by_tokens;
use crate::grounding::{align, Alignment, Located};
use crate::model_call::{ask_all, u32_of, Segment};
use crate::parquet_out::{job_columns, ErrorReason, ErrorRow, ErrorStage, JobProvenance, ParquetOutError};
use crate::pipeline::LoadedPipeline;
use crate::pipelines::{Outcome, Pipeline, RunCx, SlideRegions, Unit};
use arrow::array::{ArrayRef, BooleanBuilder, StringBuilder, StringDictionaryBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Fields, Int32Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use medbatch_schemas::pipeline::{ExtractionUnit, ImagingUnit, OutputSpec, RowMode};
use serde_json::Value;
use std::sync::Arc;

/// Why a schema cannot be turned into columns.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("schema {pointer}: {reason}")]
pub struct ColumnsError {
    pub pointer: String,
    pub reason: String,
}

fn dict_utf8() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// The schema of one row: the answer object, or the object items of `output.items`.
pub fn row_schema<'a>(schema: &'a Value, output: &OutputSpec) -> Result<&'a Value, ColumnsError> {
    let err = |pointer: &str, reason: &str| ColumnsError { pointer: pointer.into(), reason: reason.into() };
    match output.rows {
        RowMode::PerDocument => Ok(schema),
        RowMode::PerItem => {
            let items = output.items.as_deref().ok_or_else(|| err("/", "rows = \"per_item\" needs output.items"))?;
            let at = format!("/properties/{items}");
            let arr = schema.pointer(&at).ok_or_else(|| err(&at, "no such property (output.items)"))?;
            arr.get("items").ok_or_else(|| err(&at, "output.items must name an array property with `items`"))
        }
    }
}

/// The columns of a row: its schema's properties but the evidence map
/// (`output.evidence_map`, which is no column), in property order.
pub fn row_columns(schema: &Value, output: &OutputSpec) -> Result<Vec<Field>, ColumnsError> {
    let row = row_schema(schema, output)?;
    match &output.evidence_map {
        None => schema_fields(row),
        Some(map) => {
            let mut row = row.clone();
            if let Some(Value::Object(props)) = row.get_mut("properties") {
                props.remove(map);
            }
            if let Some(Value::Array(req)) = row.get_mut("required") {
                req.retain(|r| r.as_str() != Some(map.as_str()));
            }
            schema_fields(&row)
        }
    }
}

/// The columns a row schema (an object) maps to, in property order.
pub fn schema_fields(row: &Value) -> Result<Vec<Field>, ColumnsError> {
    match column_type(row, "")? {
        (DataType::Struct(fields), _) => Ok(fields.iter().map(|f| f.as_ref().clone()).collect()),
        _ => Err(ColumnsError { pointer: "/".into(), reason: "a row must be an object".into() }),
    }
}

/// Arrow type of a sub-schema, and whether it admits null.
fn column_type(s: &Value, at: &str) -> Result<(DataType, bool), ColumnsError> {
    let err = |reason: String| ColumnsError { pointer: if at.is_empty() { "/".into() } else { at.into() }, reason };
    let m = s.as_object().ok_or_else(|| err("a schema must be an object".into()))?;
    if let Some(e) = m.get("enum").and_then(Value::as_array) {
        let nullable = e.iter().any(Value::is_null);
        if e.iter().all(|v| v.is_string() || v.is_null()) {
            return Ok((dict_utf8(), nullable));
        }
        return Err(err("only enums of strings map to a column".into()));
    }
    let mut types: Vec<&str> = match m.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ if m.get("const").is_some_and(Value::is_string) => vec!["string"],
        _ => return Err(err("needs a `type` (or a string `enum`)".into())),
    };
    let nullable = types.contains(&"null");
    types.retain(|t| *t != "null");
    if types.len() == 2 && types.contains(&"integer") && types.contains(&"number") {
        types = vec!["number"];
    }
    let [t] = types[..] else {
        return Err(err(format!("types {types:?}: one column holds one type")));
    };
    let dt = match t {
        "string" => DataType::Utf8,
        "number" => DataType::Float64,
        "integer" => DataType::Int64,
        "boolean" => DataType::Boolean,
        "array" => {
            let items = m.get("items").ok_or_else(|| err("an array needs `items`".into()))?;
            let (it, it_null) = column_type(items, &format!("{at}/items"))?;
            DataType::List(Arc::new(Field::new("item", it, it_null)))
        }
        "object" => {
            let props = m
                .get("properties")
                .and_then(Value::as_object)
                .ok_or_else(|| err("an object needs `properties`".into()))?;
            let required: Vec<&str> = m
                .get("required")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut fields = Vec::with_capacity(props.len());
            for (k, v) in props {
                let (ft, fnull) = column_type(v, &format!("{at}/properties/{k}"))?;
                fields.push(Field::new(k, ft, fnull || !required.contains(&k.as_str())));
            }
            DataType::Struct(Fields::from(fields))
        }
        other => return Err(err(format!("type {other:?} has no column type"))),
    };
    Ok((dt, nullable))
}

/// Checks at pipeline load that a `structured` pipeline's schema maps to columns.
pub fn check_pipeline(schema: &Value, output: &OutputSpec) -> Result<(), ColumnsError> {
    let row = row_schema(schema, output)?;
    let fields = row_columns(schema, output)?;
    if let Some(ev) = &output.evidence {
        let f = fields.iter().find(|f| f.name() == ev).ok_or_else(|| ColumnsError {
            pointer: "/".into(),
            reason: format!("output.evidence names `{ev}`, which the row does not have"),
        })?;
        if f.data_type() != &DataType::Utf8 {
            return Err(ColumnsError {
                pointer: "/".into(),
                reason: format!("output.evidence `{ev}` must be a string"),
            });
        }
    }
    if let Some(map) = &output.evidence_map {
        let err = |reason: String| Err(ColumnsError { pointer: "/".into(), reason });
        if output.rows != RowMode::PerDocument || output.evidence.is_some() {
            return err("output.evidence_map goes with rows = \"per_document\" and no output.evidence".into());
        }
        let prop = row.pointer(&format!("/properties/{map}"));
        if prop.and_then(|p| p.get("type")) != Some(&Value::from("object")) {
            return err(format!("output.evidence_map names `{map}`, which is not an object property"));
        }
    }
    for reserved in RESERVED {
        if fields.iter().any(|f| f.name() == reserved) {
            return Err(ColumnsError {
                pointer: "/".into(),
                reason: format!("property `{reserved}` is a column medbatch adds"),
            });
        }
    }
    Ok(())
}

/// Columns medbatch adds to every structured row.
const RESERVED: [&str; 11] = [
    "document_id",
    "patient_id",
    "note_date",
    "item_index",
    "evidence_start",
    "evidence_end",
    "alignment",
    "from_examples",
    "source_uri",
    "input_sha256",
    "tokens_in",
];

/// One row of a structured table.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub document_id: String,
    /// The document's patient and date, when the input gives them.
    pub patient_id: Option<String>,
    pub note_date: Option<String>,
    pub source_uri: String,
    pub input_sha256: String,
    /// Position among the document's rows (per-item tables).
    pub item_index: u32,
    /// The row object, as the model answered it.
    pub value: Value,
    /// Where its evidence quote was found in the document.
    pub evidence: Option<Located>,
    /// The quote is not in the document but is in the prompt's examples.
    pub from_examples: bool,
    pub tokens_in: u32,
    pub tokens_out: u32,
}

/// The Arrow schema of a structured pipeline's table.
pub fn table_schema(pipeline: &LoadedPipeline) -> Result<Arc<Schema>, ColumnsError> {
    let mut fields = vec![Field::new("document_id", DataType::Utf8, false)];
    if pipeline.spec.input.has_patient_or_date() {
        fields.extend([Field::new("patient_id", DataType::Utf8, true), Field::new("note_date", DataType::Utf8, true)]);
    }
    if pipeline.spec.output.rows == RowMode::PerItem {
        fields.push(Field::new("item_index", DataType::UInt32, false));
    }
    let columns = row_columns(&pipeline.row_schema, &pipeline.spec.output)?;
    match &pipeline.spec.output.evidence_map {
        Some(map) => fields.extend(evidence_fields(&columns, map)),
        None => {
            fields.extend(columns);
            fields.extend([
                Field::new("evidence_start", DataType::UInt32, true),
                Field::new("evidence_end", DataType::UInt32, true),
                Field::new("alignment", dict_utf8(), true),
                Field::new("from_examples", DataType::Boolean, false),
            ]);
        }
    }
    if slide_level(pipeline) {
        fields.push(Field::new("patches", patches_type(), false));
    }
    fields.extend([Field::new("source_uri", DataType::Utf8, false), Field::new("input_sha256", DataType::Utf8, false)]);
    fields.extend(medbatch_schemas::tables::provenance_fields().into_iter().skip(2));
    Ok(Arc::new(Schema::new(fields)))
}

/// The columns of a row whose quotes are in the evidence map `map` (which is not a column):
/// each field in schema order, a top-level field followed by its `NAME_evidence_start`,
/// `NAME_evidence_end` and `NAME_alignment`, a list of objects with `evidence_start`,
/// `evidence_end` and `alignment` in each item.
fn evidence_fields(fields: &[Field], map: &str) -> Vec<Field> {
    let offsets = |prefix: &str, alignment: DataType| {
        [
            Field::new(format!("{prefix}evidence_start"), DataType::UInt32, true),
            Field::new(format!("{prefix}evidence_end"), DataType::UInt32, true),
            Field::new(format!("{prefix}alignment"), alignment, true),
        ]
    };
    let mut out = Vec::new();
    for f in fields.iter().filter(|f| f.name() != map) {
        match object_items(f) {
            Some(items) => {
                let mut item_fields: Vec<Field> = items.iter().map(|x| x.as_ref().clone()).collect();
                item_fields.extend(offsets("", DataType::Utf8));
                let item = Field::new("item", DataType::Struct(item_fields.into()), false);
                out.push(Field::new(f.name(), DataType::List(Arc::new(item)), f.is_nullable()));
            }
            None => {
                out.push(f.clone());
                out.extend(offsets(&format!("{}_", f.name()), dict_utf8()));
            }
        }
    }
    out
}

/// The item fields of a list-of-objects column.
fn object_items(f: &Field) -> Option<&Fields> {
    match f.data_type() {
        DataType::List(item) => match item.data_type() {
            DataType::Struct(fs) => Some(fs),
            _ => None,
        },
        _ => None,
    }
}

/// The answer with its evidence map's quotes aligned to `text` and written beside what they
/// support (as [`evidence_fields`] lays them out), the map itself removed. A quote that is
/// not found gives null offsets and `none`; a field without a quote, nulls.
fn with_evidence(answer: &Value, map: &str, lists: &[&str], text: &str) -> Value {
    let Value::Object(m) = answer else { return answer.clone() };
    let quotes = m.get(map).and_then(Value::as_object);
    let located = |key: &str| -> [Value; 3] {
        match quotes.and_then(|q| q.get(key)).and_then(Value::as_str) {
            None => [Value::Null, Value::Null, Value::Null],
            Some(q) => match align(q, text) {
                Some(l) => [l.start.into(), l.end.into(), l.alignment.as_str().into()],
                None => [Value::Null, Value::Null, Alignment::None.as_str().into()],
            },
        }
    };
    let names = |prefix: &str| ["evidence_start", "evidence_end", "alignment"].map(|n| format!("{prefix}{n}"));
    let mut out = serde_json::Map::new();
    for (k, v) in m.iter().filter(|(k, _)| k.as_str() != map) {
        match v {
            Value::Array(items) if lists.contains(&k.as_str()) => {
                let items = items.iter().enumerate().map(|(i, item)| {
                    let mut item = item.clone();
                    if let Value::Object(o) = &mut item {
                        o.extend(names("").into_iter().zip(located(&format!("{k}[{i}]"))));
                    }
                    item
                });
                out.insert(k.clone(), Value::Array(items.collect()));
            }
            _ => {
                out.insert(k.clone(), v.clone());
                out.extend(names(&format!("{k}_")).into_iter().zip(located(k)));
            }
        }
    }
    Value::Object(out)
}

/// Moves every evidence offset [`with_evidence`] wrote by `by` characters (a chunk's start
/// in its document).
fn shift_offsets(v: &mut Value, by: usize) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k.ends_with("evidence_start") || k.ends_with("evidence_end") {
                    if let Some(n) = x.as_u64() {
                        *x = (n + by as u64).into();
                    }
                } else {
                    shift_offsets(x, by);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| shift_offsets(x, by)),
        _ => {}
    }
}

/// Whether the pipeline reads whole-slide images (its rows then say which patches the model
/// saw).
fn slide_level(pipeline: &LoadedPipeline) -> bool {
    pipeline.spec.imaging.as_ref().is_some_and(|i| i.unit == ImagingUnit::Slide)
}

/// The fields of one patch: its slide (file name, or a DICOM slide's header digest), its
/// level, place and size in that level's pixels, and its tissue fraction.
fn patch_fields() -> Fields {
    Fields::from(vec![
        Field::new("slide", DataType::Utf8, false),
        Field::new("level", DataType::UInt32, false),
        Field::new("x", DataType::UInt64, false),
        Field::new("y", DataType::UInt64, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("tissue_fraction", DataType::Float32, false),
    ])
}

/// `patches`: the patches of the row's prompt, in prompt order.
fn patches_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(patch_fields()), false)))
}

/// The `patches` column of `n` rows of one unit: its slides' patches on every row.
fn patches_column(slides: &[SlideRegions], n: usize) -> Result<ArrayRef, ParquetOutError> {
    use arrow::array::{Float32Array, ListArray, StringArray, StructArray, UInt32Array, UInt64Array};
    use medbatch_formats::wsi::tissue::Patch;
    let per_row: Vec<(&str, &Patch)> =
        slides.iter().flat_map(|s| s.regions.iter().map(move |p| (s.id.as_str(), p))).collect();
    let all = || (0..n).flat_map(|_| per_row.iter());
    let u32s = |f: fn(&Patch) -> u32| -> ArrayRef { Arc::new(UInt32Array::from_iter_values(all().map(|p| f(p.1)))) };
    let u64s = |f: fn(&Patch) -> u64| -> ArrayRef { Arc::new(UInt64Array::from_iter_values(all().map(|p| f(p.1)))) };
    let values = StructArray::try_new(
        patch_fields(),
        vec![
            Arc::new(StringArray::from_iter_values(all().map(|p| p.0))),
            u32s(|p| u32::try_from(p.level).unwrap_or(u32::MAX)),
            u64s(|p| p.x),
            u64s(|p| p.y),
            u32s(|p| p.width),
            u32s(|p| p.height),
            Arc::new(Float32Array::from_iter_values(all().map(|p| p.1.tissue_fraction))),
        ],
        None,
    )?;
    let offsets = arrow::buffer::OffsetBuffer::from_lengths(std::iter::repeat_n(per_row.len(), n));
    let DataType::List(item) = patches_type() else { unreachable!("patches are a list") };
    Ok(Arc::new(ListArray::try_new(item, offsets, Arc::new(values), None)?))
}

/// Builds a structured table's batch from its records.
pub fn records_batch(
    pipeline: &LoadedPipeline,
    schema: &SchemaRef,
    records: &[Record],
    slides: &[SlideRegions],
    prov: &JobProvenance,
) -> Result<RecordBatch, ParquetOutError> {
    let fields =
        row_columns(&pipeline.row_schema, &pipeline.spec.output).map_err(|e| ParquetOutError::Schema(e.to_string()))?;
    let map = pipeline.spec.output.evidence_map.as_deref();
    // With an evidence map, the rows are already laid out with their quotes' offsets.
    let fields = match map {
        Some(m) => evidence_fields(&fields, m),
        None => fields,
    };
    let n = records.len();
    // The schema's columns, decoded from the row objects by arrow-json (dictionaries as
    // strings, then cast).
    let plain_fields: Vec<Field> =
        fields.iter().map(|f| f.clone().with_data_type(crate::parquet_out::plain_type(f.data_type()))).collect();
    let mut decoder = arrow_json::ReaderBuilder::new(Arc::new(Schema::new(plain_fields))).build_decoder()?;
    let values: Vec<&Value> = records.iter().map(|r| &r.value).collect();
    decoder.serialize(&values)?;
    let decoded = decoder.flush()?.unwrap_or_else(|| RecordBatch::new_empty(Arc::new(Schema::empty())));
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let mut doc = StringBuilder::new();
    let (mut patient, mut date) = (StringBuilder::new(), StringBuilder::new());
    let mut index = UInt32Builder::with_capacity(n);
    let (mut ev_start, mut ev_end) = (UInt32Builder::with_capacity(n), UInt32Builder::with_capacity(n));
    let mut alignment = StringDictionaryBuilder::<Int32Type>::new();
    let mut from_examples = BooleanBuilder::with_capacity(n);
    let (mut uri, mut sha) = (StringBuilder::new(), StringBuilder::new());
    let (mut tin, mut tout) = (UInt32Builder::with_capacity(n), UInt32Builder::with_capacity(n));
    for r in records {
        doc.append_value(&r.document_id);
        patient.append_option(r.patient_id.as_deref());
        date.append_option(r.note_date.as_deref());
        index.append_value(r.item_index);
        match r.evidence {
            Some(l) if l.alignment != Alignment::None => {
                ev_start.append_value(u32_of(l.start));
                ev_end.append_value(u32_of(l.end));
            }
            _ => {
                ev_start.append_null();
                ev_end.append_null();
            }
        }
        match (&pipeline.spec.output.evidence, r.evidence) {
            (None, _) => alignment.append_null(),
            (Some(_), Some(l)) => {
                alignment.append_value(l.alignment.as_str());
            }
            (Some(_), None) => {
                alignment.append_value(Alignment::None.as_str());
            }
        }
        from_examples.append_value(r.from_examples);
        uri.append_value(&r.source_uri);
        sha.append_value(&r.input_sha256);
        tin.append_value(r.tokens_in);
        tout.append_value(r.tokens_out);
    }
    cols.push(Arc::new(doc.finish()));
    if pipeline.spec.input.has_patient_or_date() {
        cols.extend([Arc::new(patient.finish()) as ArrayRef, Arc::new(date.finish())]);
    }
    if pipeline.spec.output.rows == RowMode::PerItem {
        cols.push(Arc::new(index.finish()));
    }
    for (i, f) in fields.iter().enumerate() {
        let c = if n == 0 { arrow::array::new_empty_array(f.data_type()) } else { decoded.column(i).clone() };
        cols.push(arrow::compute::cast(&c, f.data_type())?);
    }
    if map.is_none() {
        cols.push(Arc::new(ev_start.finish()));
        cols.push(Arc::new(ev_end.finish()));
        cols.push(Arc::new(alignment.finish()));
        cols.push(Arc::new(from_examples.finish()));
    }
    if slide_level(pipeline) {
        cols.push(patches_column(slides, n)?);
    }
    cols.push(Arc::new(uri.finish()));
    cols.push(Arc::new(sha.finish()));
    cols.extend(job_columns(n, prov));
    cols.push(Arc::new(tin.finish()));
    cols.push(Arc::new(tout.finish()));
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// A `structured` pipeline: the answer schema's objects as rows of a table derived from it.
pub struct Structured {
    pipeline: Arc<LoadedPipeline>,
    schema: Arc<Schema>,
    /// With an evidence map: the row's list-of-objects properties (their items carry their
    /// own offsets).
    lists: Vec<String>,
    /// The prompt's shared part (instructions and examples), to tell evidence copied from
    /// the examples from invented evidence.
    examples: String,
}

impl Structured {
    /// Fails when the answer schema does not map to columns (checked at load already).
    pub fn new(pipeline: Arc<LoadedPipeline>) -> Result<Self, crate::pipeline::PipelineError> {
        let schema = table_schema(&pipeline).map_err(|e| crate::pipeline::PipelineError::Invalid {
            path: pipeline.dir.display().to_string(),
            reason: format!("{}: {e}", pipeline.spec.prompt.schema),
        })?;
        let examples = pipeline.render("").map(|r| r.text[..r.shared_prefix_len].to_string()).unwrap_or_default();
        if pipeline.spec.extraction.unit == ExtractionUnit::Section {
            crate::pipelines::note_sections::check(&pipeline).map_err(|reason| {
                crate::pipeline::PipelineError::Invalid { path: pipeline.dir.display().to_string(), reason }
            })?;
        }
        let lists = row_columns(&pipeline.row_schema, &pipeline.spec.output)
            .map(|fs| fs.iter().filter(|f| object_items(f).is_some()).map(|f| f.name().clone()).collect())
            .unwrap_or_default();
        Ok(Self { pipeline, schema, lists, examples })
    }

    pub(crate) fn loaded_pipeline(&self) -> &LoadedPipeline {
        &self.pipeline
    }

    pub(crate) fn table_schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

#[async_trait::async_trait]
impl Pipeline for Structured {
    fn loaded(&self) -> &LoadedPipeline {
        &self.pipeline
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Reads the unit's document with the model and returns its rows (per document or per
    /// item), error rows for answers that are cut off or do not parse, and the tokens spent.
    async fn run(&self, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError> {
        let (doc, images, spec) = (&unit.doc, &unit.images, &self.pipeline.spec);
        if spec.extraction.unit == ExtractionUnit::Section {
            return crate::pipelines::note_sections::run(self, unit, cx).await;
        }
        let err = |stage: ErrorStage, reason: ErrorReason, detail: String, span: Option<(usize, usize)>| {
            ErrorRow::of_document(doc, stage, reason, detail, span)
        };
        let tokenizer = cx.engine().tokenizer();
        let count = |s: &str| tokenizer.encode(s, false, false).len();
        // An imaging document (its image block) is one prompt with all its images.
        let chunks = if images.is_empty() {
            chunk_by_tokens(&doc.text, spec.extraction.chunk_tokens, spec.extraction.chunk_overlap_tokens, &count)
        } else {
            vec![crate::chunk::Chunk { start: 0, end: doc.text.chars().count(), text: doc.text.clone(), tokens: 0 }]
        };
        if spec.output.rows == RowMode::PerDocument && chunks.len() > 1 {
            let tokens = count(&doc.text);
            let detail = format!(
                "{tokens} tokens exceed extraction.chunk_tokens = {}; a per-document pipeline reads a document in one prompt",
                spec.extraction.chunk_tokens
            );
            let errors = vec![err(ErrorStage::Input, ErrorReason::DocumentTooLong, detail, None)];
            return Ok(Outcome { errors, ..Outcome::default() });
        }
        let segments: Vec<Segment> =
            chunks.iter().map(|c| Segment { start: c.start, end: c.end, text: &c.text }).collect();
        let asked = ask_all(cx, &self.pipeline, doc, &segments, images, None).await;
        let mut out = Outcome::from_asked(&asked);
        let mut records: Vec<Record> = Vec::new();
        let mut seen_spans: Vec<(usize, usize)> = Vec::new();
        let mut index = 0u32;
        for (chunk, reply) in chunks.iter().zip(asked.replies) {
            let span = Some((chunk.start, chunk.end));
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
            let answer = match first_json_value(&reply.answer) {
                Some(v) => v,
                None => {
                    let reason =
                        if reply.cut_off { ErrorReason::TruncatedAnswer } else { ErrorReason::UnparseableAnswer };
                    out.errors.push(err(ErrorStage::Parse, reason, "the answer is not a JSON value".into(), span));
                    continue;
                }
            };
            let rows: Vec<Value> = match (spec.output.rows, spec.output.items.as_deref()) {
                (RowMode::PerItem, Some(items)) => match answer.get(items) {
                    Some(Value::Array(a)) => a.clone(),
                    _ => {
                        let detail = format!("`{items}` is not an array");
                        out.errors.push(err(ErrorStage::Parse, ErrorReason::BadAnswerField, detail, span));
                        continue;
                    }
                },
                _ => vec![answer],
            };
            for row in rows {
                // An evidence map's quotes, aligned to the chunk, beside what they support.
                let row = match (&spec.output.evidence_map, &self.lists) {
                    (Some(map), lists) => {
                        let lists: Vec<&str> = lists.iter().map(String::as_str).collect();
                        let mut v = with_evidence(&row, map, &lists, &chunk.text);
                        shift_offsets(&mut v, chunk.start);
                        v
                    }
                    (None, _) => row,
                };
                if !row.is_object() {
                    let detail = "a row is not an object".to_string();
                    out.errors.push(err(ErrorStage::Parse, ErrorReason::BadAnswerField, detail, span));
                    continue;
                }
                let (evidence, from_examples) = match spec.output.evidence.as_deref() {
                    None => (None, false),
                    Some(k) => {
                        let quote = row.get(k).and_then(Value::as_str).unwrap_or("");
                        let found = align(quote, &chunk.text).map(|l| Located {
                            start: l.start + chunk.start,
                            end: l.end + chunk.start,
                            ..l
                        });
                        let copied =
                            found.is_none() && crate::grounding::from_examples(quote, &self.examples, &doc.text);
                        (Some(found.unwrap_or(Located { start: 0, end: 0, alignment: Alignment::None })), copied)
                    }
                };
                // Chunks overlap: a row whose evidence was already found is the same row.
                if let Some(l) = evidence.filter(|l| l.alignment != Alignment::None) {
                    if seen_spans.contains(&(l.start, l.end)) {
                        continue;
                    }
                    seen_spans.push((l.start, l.end));
                }
                records.push(Record {
                    document_id: doc.id.clone(),
                    patient_id: doc.patient_id.clone(),
                    note_date: doc.date.clone(),
                    source_uri: doc.source_uri.clone(),
                    input_sha256: doc.input_sha256.to_string(),
                    item_index: index,
                    value: row,
                    evidence,
                    from_examples,
                    tokens_in: reply.tokens_in,
                    tokens_out: reply.tokens_out,
                });
                index += 1;
            }
        }
        if !records.is_empty() {
            out.batch = Some(records_batch(&self.pipeline, &self.schema, &records, &unit.slides, cx.provenance)?);
        }
        Ok(out)
    }
}

/// The first JSON value in `text` (leading whitespace skipped; what follows ignored).
pub(crate) fn first_json_value(text: &str) -> Option<Value> {
    serde_json::Deserializer::from_str(text.trim_start()).into_iter::<Value>().next()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all_types() -> Value {
        json!({
            "type": "object",
            "properties": {
                "age": { "type": "integer" },
                "weight": { "type": ["number", "null"] },
                "dose": { "type": ["integer", "number"] },
                "smoker": { "type": "boolean" },
                "sex": { "enum": ["female", "male", null] },
                "summary": { "type": "string" },
                "conditions": { "type": "array", "items": { "type": "string" } },
                "vitals": {
                    "type": "object",
                    "properties": { "hr": { "type": "integer" }, "bp": { "type": ["string", "null"] } },
                    "required": ["hr"]
                },
                "note": { "type": "string" }
            },
            "required": ["age", "weight", "dose", "smoker", "sex", "summary", "conditions", "vitals"]
        })
    }

    #[test]
    fn every_json_type_maps_to_a_column() {
        let f = schema_fields(&all_types()).unwrap();
        let t = |n: &str| f.iter().find(|x| x.name() == n).map(|x| (x.data_type().clone(), x.is_nullable())).unwrap();
        assert_eq!(t("age"), (DataType::Int64, false));
        assert_eq!(t("weight"), (DataType::Float64, true));
        assert_eq!(t("dose"), (DataType::Float64, false));
        assert_eq!(t("smoker"), (DataType::Boolean, false));
        assert_eq!(t("sex"), (dict_utf8(), true));
        assert_eq!(t("summary"), (DataType::Utf8, false));
        assert_eq!(t("conditions"), (DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))), false));
        let DataType::Struct(v) = t("vitals").0 else { panic!("struct expected") };
        assert_eq!((v[0].name().as_str(), v[0].is_nullable(), v[1].is_nullable()), ("hr", false, true));
        // Not required: nullable.
        assert_eq!(t("note"), (DataType::Utf8, true));
        assert_eq!(f.iter().map(|x| x.name().as_str()).collect::<Vec<_>>()[..3], ["age", "weight", "dose"]);
    }

    #[test]
    fn schemas_without_a_column_type_are_refused_with_their_place() {
        let e = schema_fields(&json!({ "type": "object", "properties": { "x": { "type": ["string", "number"] } } }));
        assert_eq!(e.unwrap_err().pointer, "/properties/x");
        let e = schema_fields(&json!({ "type": "object", "properties": { "x": { "anyOf": [] } } }));
        assert!(e.unwrap_err().reason.contains("type"));
        assert!(schema_fields(&json!({ "type": "array", "items": {} })).is_err());
        let out = OutputSpec {
            table: "t".into(),
            rows: RowMode::PerItem,
            items: None,
            evidence: None,
            evidence_map: None,
            schema: None,
        };
        assert!(row_schema(&all_types(), &out).unwrap_err().reason.contains("output.items"));
        let out = OutputSpec { items: Some("conditions".into()), ..out };
        assert!(check_pipeline(&all_types(), &out).unwrap_err().reason.contains("object"));
    }

    /// The shipped cohort-facts pipeline, its evidence map laid out beside each field.
    #[test]
    fn an_evidence_map_puts_each_quote_beside_what_it_supports() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/cohort-facts");
        let loaded = Arc::new(LoadedPipeline::load(dir.to_str().unwrap()).unwrap());
        let pipeline = Structured::new(loaded.clone()).unwrap();
        assert_eq!(pipeline.lists, ["current_medications", "diagnoses"]);
        let names: Vec<String> = pipeline.schema.fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(
            names[..9],
            [
                "document_id",
                "patient_id",
                "note_date",
                "smoking_status",
                "smoking_status_evidence_start",
                "smoking_status_evidence_end",
                "smoking_status_alignment",
                "diabetes",
                "diabetes_evidence_start"
            ]
        );
        assert!(!names.iter().any(|n| n == "evidence" || n == "alignment"), "{names:?}");
        let note = "Ex-smoker, quit 2019.\nMeds: furosemide 40 mg daily.\nNo h/o CAD.";
        let answer = json!({
            "smoking_status": "former", "diabetes": null, "diabetes_type": null,
            "lvef_percent": null, "hba1c_percent": null,
            "current_medications": [{ "name": "furosemide", "dose": "40 mg" }],
            "diagnoses": [{ "name": "coronary artery disease", "icd10": "I25.10", "negated": true, "subject": "patient" },
                          { "name": "asthma", "icd10": null, "negated": false, "subject": "patient" }],
            "evidence": { "smoking_status": "Ex-smoker, quit 2019.", "current_medications[0]": "FUROSEMIDE 40 mg",
                          "diagnoses[0]": "No h/o CAD", "diagnoses[1]": "asthma since childhood" }
        });
        let mut row = with_evidence(&answer, "evidence", &["current_medications", "diagnoses"], note);
        // A chunk starting 5 characters into its document moves every offset by 5.
        shift_offsets(&mut row, 5);
        assert_eq!(row["smoking_status_evidence_start"], json!(5));
        assert_eq!(row["smoking_status_evidence_end"], json!(26));
        assert_eq!(row["smoking_status_alignment"], json!("exact"));
        assert_eq!(row["diabetes_alignment"], Value::Null, "no quote for a null field");
        let med = &row["current_medications"][0];
        assert_eq!((med["alignment"].as_str(), med["evidence_start"].as_u64()), (Some("normalized"), Some(33)));
        assert_eq!(row["diagnoses"][0]["evidence_start"], json!(57));
        assert_eq!(row["diagnoses"][1]["alignment"], json!("none"));
        assert_eq!(row["diagnoses"][1]["evidence_start"], Value::Null);
        assert!(row.get("evidence").is_none());
        let record = Record {
            document_id: "n1".into(),
            patient_id: Some("P-7".into()),
            note_date: None,
            source_uri: "file:///n1.txt".into(),
            input_sha256: "0".repeat(64),
            item_index: 0,
            value: row,
            evidence: None,
            from_examples: false,
            tokens_in: 1,
            tokens_out: 1,
        };
        let prov = crate::parquet_out::JobProvenance {
            job_id: "j".into(),
            run_id: "r".into(),
            pipeline: "cohort-facts".into(),
            pipeline_digest: "d".into(),
            model_id: "m".into(),
            model_digest: "d".into(),
            generated_at_us: 0,
        };
        let batch = records_batch(&loaded, &pipeline.schema, &[record], &[], &prov).unwrap();
        assert_eq!(batch.num_rows(), 1);
        let meds = batch.column_by_name("current_medications").unwrap();
        let meds = meds.as_any().downcast_ref::<arrow::array::ListArray>().unwrap().value(0);
        let meds = meds.as_any().downcast_ref::<arrow::array::StructArray>().unwrap();
        let start = meds.column_by_name("evidence_start").unwrap();
        assert_eq!(start.as_any().downcast_ref::<arrow::array::UInt32Array>().unwrap().value(0), 33);
        let patient = batch.column_by_name("patient_id").unwrap();
        assert_eq!(patient.as_any().downcast_ref::<arrow::array::StringArray>().unwrap().value(0), "P-7");
    }

    #[test]
    fn first_json_value_skips_space_and_ignores_the_rest() {
        assert_eq!(first_json_value(" {\"a\":1}\nmore"), Some(json!({ "a": 1 })));
        assert_eq!(first_json_value("{\"a\":"), None);
        assert_eq!(first_json_value("no"), None);
    }
}
