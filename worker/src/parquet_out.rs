//! Rows → Arrow record batches → Parquet bytes, for the output tables of
//! `medbatch_schemas::tables`.

use arrow::array::{
    ArrayRef, StringBuilder, StringDictionaryBuilder, TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use medbatch_schemas::tables::{documents_schema, errors_schema};
pub use medbatch_schemas::{DocumentStatus, ErrorReason, ErrorStage};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::sync::Arc;

/// What every row of one job shares.
#[derive(Clone, Debug)]
pub struct JobProvenance {
    pub job_id: String,
    pub run_id: String,
    pub pipeline: String,
    pub pipeline_digest: String,
    pub model_id: String,
    pub model_digest: String,
    /// Microseconds since the Unix epoch, UTC.
    pub generated_at_us: i64,
}

/// One `_errors` row. `detail` never holds document text.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorRow {
    pub source_uri: String,
    pub member: Option<String>,
    pub record: Option<String>,
    pub document_id: Option<String>,
    pub stage: ErrorStage,
    pub reason: ErrorReason,
    pub detail: String,
    pub evidence: Option<(u32, u32)>,
    pub input_sha256: Option<String>,
}

/// One `_documents` row: what became of one input document, record, member or image file.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentRow {
    pub source_uri: String,
    pub member: Option<String>,
    pub record: Option<String>,
    pub document_id: Option<String>,
    pub status: DocumentStatus,
    /// The failure's or the skip's stable label.
    pub reason: Option<&'static str>,
    pub images: Option<u32>,
    /// Rows in the pipeline's table and in `_errors`, tokens in and out (`None` on the other
    /// files of a several-file prompt: they are on its first file's row).
    pub counts: Option<Counts>,
    pub input_sha256: Option<String>,
}

/// What one document gave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub rows: u32,
    pub error_rows: u32,
    pub tokens_in: u64,
    pub tokens_out: u64,
}

impl ErrorRow {
    /// An error row about a document read from an input (`span`: the characters concerned).
    pub fn of_document(
        doc: &medbatch_schemas::Document,
        stage: ErrorStage,
        reason: ErrorReason,
        detail: String,
        span: Option<(usize, usize)>,
    ) -> Self {
        Self {
            source_uri: doc.source_uri.clone(),
            member: None,
            record: None,
            document_id: Some(doc.id.clone()),
            stage,
            reason,
            detail,
            evidence: span.map(|(s, e)| (to_u32(s), to_u32(e))),
            input_sha256: Some(doc.input_sha256.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParquetOutError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("output schema: {0}")]
    Schema(String),
}

pub(crate) fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Columns job_id, run_id, pipeline, pipeline_digest, model_id, model_digest, generated_at.
pub(crate) fn job_columns(n: usize, p: &JobProvenance) -> Vec<ArrayRef> {
    let repeat = |s: &str| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * s.len());
        for _ in 0..n {
            b.append_value(s);
        }
        Arc::new(b.finish())
    };
    let mut ts = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    for _ in 0..n {
        ts.append_value(p.generated_at_us);
    }
    vec![
        repeat(&p.job_id),
        repeat(&p.run_id),
        repeat(&p.pipeline),
        repeat(&p.pipeline_digest),
        repeat(&p.model_id),
        repeat(&p.model_digest),
        Arc::new(ts.finish()),
    ]
}

/// The job columns of `_errors` and `_documents`: those of [`job_columns`] but
/// `model_digest` (job_id, run_id, pipeline, pipeline_digest, model_id, generated_at).
fn run_columns(n: usize, p: &JobProvenance) -> Vec<ArrayRef> {
    let mut job = job_columns(n, p);
    job.remove(5);
    job
}

/// Builds the `_errors` batch.
pub fn errors_batch(rows: &[ErrorRow], prov: &JobProvenance) -> Result<RecordBatch, ParquetOutError> {
    let n = rows.len();
    let mut source_uri = StringBuilder::new();
    let mut member = StringBuilder::new();
    let mut record = StringBuilder::new();
    let mut document_id = StringBuilder::new();
    let mut stage = StringDictionaryBuilder::<Int32Type>::new();
    let mut reason = StringDictionaryBuilder::<Int32Type>::new();
    let mut detail = StringBuilder::new();
    let mut ev_start = UInt32Builder::with_capacity(n);
    let mut ev_end = UInt32Builder::with_capacity(n);
    let mut input_sha256 = StringBuilder::new();
    for r in rows {
        source_uri.append_value(&r.source_uri);
        member.append_option(r.member.as_deref());
        record.append_option(r.record.as_deref());
        document_id.append_option(r.document_id.as_deref());
        stage.append_value(r.stage.label());
        reason.append_value(r.reason.label());
        detail.append_value(&r.detail);
        ev_start.append_option(r.evidence.map(|e| e.0));
        ev_end.append_option(r.evidence.map(|e| e.1));
        input_sha256.append_option(r.input_sha256.as_deref());
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(source_uri.finish()),
        Arc::new(member.finish()),
        Arc::new(record.finish()),
        Arc::new(document_id.finish()),
        Arc::new(stage.finish()),
        Arc::new(reason.finish()),
        Arc::new(detail.finish()),
        Arc::new(ev_start.finish()),
        Arc::new(ev_end.finish()),
        Arc::new(input_sha256.finish()),
    ];
    cols.extend(run_columns(n, prov));
    Ok(RecordBatch::try_new(errors_schema(), cols)?)
}

/// Builds the `_documents` batch.
pub fn documents_batch(rows: &[DocumentRow], prov: &JobProvenance) -> Result<RecordBatch, ParquetOutError> {
    let n = rows.len();
    let (mut source_uri, mut member, mut record, mut document_id) =
        (StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    let mut status = StringDictionaryBuilder::<Int32Type>::new();
    let mut reason = StringDictionaryBuilder::<Int32Type>::new();
    let mut images = UInt32Builder::with_capacity(n);
    let (mut nrows, mut nerrors) = (UInt32Builder::with_capacity(n), UInt32Builder::with_capacity(n));
    let mut input_sha256 = StringBuilder::new();
    let (mut tin, mut tout) = (UInt64Builder::with_capacity(n), UInt64Builder::with_capacity(n));
    for r in rows {
        source_uri.append_value(&r.source_uri);
        member.append_option(r.member.as_deref());
        record.append_option(r.record.as_deref());
        document_id.append_option(r.document_id.as_deref());
        status.append_value(r.status.label());
        match r.reason {
            Some(x) => {
                reason.append_value(x);
            }
            None => reason.append_null(),
        }
        images.append_option(r.images);
        nrows.append_option(r.counts.map(|c| c.rows));
        nerrors.append_option(r.counts.map(|c| c.error_rows));
        input_sha256.append_option(r.input_sha256.as_deref());
        tin.append_option(r.counts.map(|c| c.tokens_in));
        tout.append_option(r.counts.map(|c| c.tokens_out));
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(source_uri.finish()),
        Arc::new(member.finish()),
        Arc::new(record.finish()),
        Arc::new(document_id.finish()),
        Arc::new(status.finish()),
        Arc::new(reason.finish()),
        Arc::new(images.finish()),
        Arc::new(nrows.finish()),
        Arc::new(nerrors.finish()),
        Arc::new(input_sha256.finish()),
    ];
    cols.extend(run_columns(n, prov));
    cols.push(Arc::new(tin.finish()));
    cols.push(Arc::new(tout.finish()));
    Ok(RecordBatch::try_new(documents_schema(), cols)?)
}

/// The provenance columns [`job_columns`] fills, by name.
const JOB_COLUMNS: [&str; 7] =
    ["job_id", "run_id", "pipeline", "pipeline_digest", "model_id", "model_digest", "generated_at"];

/// A batch of `schema` from row objects: every column decoded from the rows by name
/// (arrow-json; dictionaries read as strings, then cast), but the job's provenance columns
/// (`job_id` … `generated_at`), which come from `prov`. The job columns must be
/// consecutive, as every table lays them out.
pub fn json_batch(
    schema: &SchemaRef,
    rows: &[serde_json::Value],
    prov: &JobProvenance,
) -> Result<RecordBatch, ParquetOutError> {
    let data: Vec<Field> = schema
        .fields()
        .iter()
        .filter(|f| !JOB_COLUMNS.contains(&f.name().as_str()))
        .map(|f| f.as_ref().clone())
        .collect();
    let plain: Vec<Field> = data.iter().map(|f| f.clone().with_data_type(plain_type(f.data_type()))).collect();
    let mut decoder = arrow_json::ReaderBuilder::new(Arc::new(Schema::new(plain))).build_decoder()?;
    decoder.serialize(rows)?;
    let decoded = decoder.flush()?;
    let mut decoded_cols = Vec::with_capacity(data.len());
    for (i, f) in data.iter().enumerate() {
        let c = match &decoded {
            Some(b) if !rows.is_empty() => b.column(i).clone(),
            _ => arrow::array::new_empty_array(f.data_type()),
        };
        decoded_cols.push(arrow::compute::cast(&c, f.data_type())?);
    }
    let mut job = job_columns(rows.len(), prov).into_iter();
    let mut decoded_cols = decoded_cols.into_iter();
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| if JOB_COLUMNS.contains(&f.name().as_str()) { job.next() } else { decoded_cols.next() })
        .collect::<Option<_>>()
        .ok_or_else(|| ParquetOutError::Schema("columns out of step".into()))?;
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// The type with dictionaries replaced by their values (what the JSON decoder reads).
pub(crate) fn plain_type(dt: &DataType) -> DataType {
    match dt {
        DataType::Dictionary(_, v) => v.as_ref().clone(),
        DataType::List(f) => DataType::List(Arc::new(f.as_ref().clone().with_data_type(plain_type(f.data_type())))),
        DataType::Struct(fs) => {
            DataType::Struct(fs.iter().map(|f| f.as_ref().clone().with_data_type(plain_type(f.data_type()))).collect())
        }
        other => other.clone(),
    }
}

/// Parts whose columns hold at least this many bytes in memory are compressed with zstd;
/// smaller ones with Snappy. The Parquet writer sets up two zstd contexts for each column
/// chunk, and creating one probes the CPU (`cpuid`, which traps to the hypervisor on a
/// virtual machine): for the part of a job of a few small documents, that set-up cost more
/// than everything else in writing it (a fifth of a worker's time on one-report jobs, see
/// docs/benchmarks.md), while zstd's smaller files matter only for large parts.
pub const ZSTD_FROM_BYTES: usize = 1 << 20;

/// Serializes one batch as a Parquet file: zstd, or Snappy when small (`ZSTD_FROM_BYTES`).
pub fn to_parquet(batch: &RecordBatch) -> Result<Vec<u8>, ParquetOutError> {
    let compression = if batch.get_array_memory_size() >= ZSTD_FROM_BYTES {
        Compression::ZSTD(ZstdLevel::default())
    } else {
        Compression::SNAPPY
    };
    let props = WriterProperties::builder()
        .set_compression(compression)
        .set_created_by(format!("medbatch {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))?;
    w.write(batch)?;
    w.close()?;
    Ok(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use medbatch_schemas::InputErrorKind;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    pub(crate) fn prov() -> JobProvenance {
        JobProvenance {
            job_id: "j".into(),
            run_id: "r".into(),
            pipeline: "lab-report".into(),
            pipeline_digest: "pd".into(),
            model_id: "m".into(),
            model_digest: "md".into(),
            generated_at_us: 1_700_000_000_000_000,
        }
    }

    pub(crate) fn read(bytes: Vec<u8>) -> RecordBatch {
        let mut r = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap().build().unwrap();
        r.next().unwrap().unwrap()
    }

    #[test]
    fn small_parts_are_snappy_and_large_ones_zstd() {
        use parquet::basic::Compression;
        let codec = |bytes: Vec<u8>| {
            let b = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
            let meta = b.metadata().clone();
            let codecs: Vec<Compression> = meta.row_group(0).columns().iter().map(|c| c.compression()).collect();
            (codecs, b.build().unwrap().map(|r| r.unwrap().num_rows()).sum::<usize>())
        };
        let batch = |n: usize| {
            let text: arrow::array::StringArray = (0..n).map(|i| Some(format!("value {i} of a column"))).collect();
            RecordBatch::try_from_iter([("text", Arc::new(text) as arrow::array::ArrayRef)]).unwrap()
        };
        let small = batch(10);
        assert!(small.get_array_memory_size() < ZSTD_FROM_BYTES);
        assert_eq!(codec(to_parquet(&small).unwrap()), (vec![Compression::SNAPPY], 10));
        let large = batch(100_000);
        assert!(large.get_array_memory_size() >= ZSTD_FROM_BYTES);
        assert_eq!(codec(to_parquet(&large).unwrap()), (vec![Compression::ZSTD(ZstdLevel::default())], 100_000));
    }

    #[test]
    fn error_rows_round_trip_through_parquet() {
        let rows = vec![ErrorRow {
            source_uri: "file:///a.tar.gz".into(),
            member: Some("../evil.txt".into()),
            record: None,
            document_id: None,
            stage: ErrorStage::Input,
            reason: InputErrorKind::UnsafePath.into(),
            detail: "member name climbs out with '..'".into(),
            evidence: None,
            input_sha256: None,
        }];
        let batch = read(to_parquet(&errors_batch(&rows, &prov()).unwrap()).unwrap());
        assert_eq!(batch.schema(), errors_schema());
        let member = batch.column_by_name("member").unwrap();
        assert_eq!(member.as_string::<i32>().value(0), "../evil.txt");
        assert!(batch.column_by_name("evidence_start").unwrap().is_null(0));
    }

    #[test]
    fn document_rows_round_trip_through_parquet() {
        let counted = Counts { rows: 2, error_rows: 1, tokens_in: 40, tokens_out: 9 };
        let rows = vec![
            DocumentRow {
                source_uri: "file:///study/a.dcm".into(),
                member: None,
                record: None,
                document_id: Some("1.2.3".into()),
                status: DocumentStatus::Ok,
                reason: None,
                images: Some(2),
                counts: Some(counted),
                input_sha256: Some("ab".into()),
            },
            DocumentRow {
                source_uri: "file:///study/b.dcm".into(),
                member: None,
                record: None,
                document_id: Some("1.2.3".into()),
                status: DocumentStatus::Skipped,
                reason: Some("max_images"),
                images: Some(0),
                counts: None,
                input_sha256: Some("cd".into()),
            },
        ];
        let batch = read(to_parquet(&documents_batch(&rows, &prov()).unwrap()).unwrap());
        assert_eq!(batch.schema(), documents_schema());
        let utf8 = |n: &str| {
            arrow::compute::cast(batch.column_by_name(n).unwrap(), &arrow::datatypes::DataType::Utf8).unwrap()
        };
        assert_eq!(
            (utf8("status").as_string::<i32>().value(1), utf8("reason").as_string::<i32>().value(1)),
            ("skipped", "max_images")
        );
        assert!(utf8("reason").is_null(0) && utf8("rows").is_null(1) && utf8("tokens_in").is_null(1));
        assert_eq!(
            (utf8("rows").as_string::<i32>().value(0), utf8("tokens_out").as_string::<i32>().value(0)),
            ("2", "9")
        );
        assert_eq!(utf8("model_id").as_string::<i32>().value(0), "m");
    }
}
