//! Rows → Arrow record batches → Parquet bytes, for the output tables of
//! `medbatch_schemas::tables`.

use crate::labreport::LabItem;
use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, StringBuilder, StringDictionaryBuilder, TimestampMicrosecondBuilder,
    UInt32Builder,
};
use arrow::datatypes::Int32Type;
use arrow::record_batch::RecordBatch;
use medbatch_schemas::tables::{errors_schema, lab_results_schema};
pub use medbatch_schemas::{ErrorReason, ErrorStage};
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

/// One `lab_results` row.
#[derive(Clone, Debug)]
pub struct LabRow {
    pub document_id: String,
    pub source_uri: String,
    pub input_sha256: String,
    pub item: LabItem,
    pub tokens_in: u32,
    pub tokens_out: u32,
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

#[derive(Debug, thiserror::Error)]
pub enum ParquetOutError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("output schema: {0}")]
    Schema(String),
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Builds the `lab_results` batch.
pub fn lab_results_batch(rows: &[LabRow], prov: &JobProvenance) -> Result<RecordBatch, ParquetOutError> {
    let n = rows.len();
    let mut document_id = StringBuilder::new();
    let mut test = StringBuilder::new();
    let mut value = StringBuilder::new();
    let mut value_numeric = Float64Builder::with_capacity(n);
    let mut unit = StringBuilder::new();
    let mut ref_low = Float64Builder::with_capacity(n);
    let mut ref_high = Float64Builder::with_capacity(n);
    let mut flag = StringDictionaryBuilder::<Int32Type>::new();
    let mut ev_start = UInt32Builder::with_capacity(n);
    let mut ev_end = UInt32Builder::with_capacity(n);
    let mut method = StringDictionaryBuilder::<Int32Type>::new();
    let mut alignment = StringDictionaryBuilder::<Int32Type>::new();
    let mut from_examples = BooleanBuilder::with_capacity(n);
    let mut source_uri = StringBuilder::new();
    let mut input_sha256 = StringBuilder::new();
    let mut tokens_in = UInt32Builder::with_capacity(n);
    let mut tokens_out = UInt32Builder::with_capacity(n);
    for r in rows {
        let it = &r.item;
        document_id.append_value(&r.document_id);
        test.append_option(it.test.as_deref());
        value.append_option(it.value.as_deref());
        value_numeric.append_option(it.value_numeric);
        unit.append_option(it.unit.as_deref());
        ref_low.append_option(it.ref_low);
        ref_high.append_option(it.ref_high);
        match it.flag {
            Some(f) => {
                flag.append_value(f.as_str());
            }
            None => flag.append_null(),
        }
        ev_start.append_value(to_u32(it.evidence_start));
        ev_end.append_value(to_u32(it.evidence_end));
        method.append_value(it.method.as_str());
        alignment.append_value(it.alignment.as_str());
        from_examples.append_value(it.from_examples);
        source_uri.append_value(&r.source_uri);
        input_sha256.append_value(&r.input_sha256);
        tokens_in.append_value(r.tokens_in);
        tokens_out.append_value(r.tokens_out);
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(document_id.finish()),
        Arc::new(test.finish()),
        Arc::new(value.finish()),
        Arc::new(value_numeric.finish()),
        Arc::new(unit.finish()),
        Arc::new(ref_low.finish()),
        Arc::new(ref_high.finish()),
        Arc::new(flag.finish()),
        Arc::new(ev_start.finish()),
        Arc::new(ev_end.finish()),
        Arc::new(method.finish()),
        Arc::new(alignment.finish()),
        Arc::new(from_examples.finish()),
        Arc::new(source_uri.finish()),
        Arc::new(input_sha256.finish()),
    ];
    cols.extend(job_columns(n, prov));
    cols.push(Arc::new(tokens_in.finish()));
    cols.push(Arc::new(tokens_out.finish()));
    Ok(RecordBatch::try_new(lab_results_schema(), cols)?)
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
    let job = job_columns(n, prov);
    // _errors has no model_digest column: keep job_id, run_id, pipeline, pipeline_digest,
    // model_id and generated_at.
    cols.extend([job[0].clone(), job[1].clone(), job[2].clone(), job[3].clone(), job[4].clone(), job[6].clone()]);
    Ok(RecordBatch::try_new(errors_schema(), cols)?)
}

/// Serializes one batch as a Parquet file (zstd).
pub fn to_parquet(batch: &RecordBatch) -> Result<Vec<u8>, ParquetOutError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_created_by(format!("medbatch {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))?;
    w.write(batch)?;
    w.close()?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grounding::Alignment;
    use crate::labreport::{Flag, Method};
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, UInt32Type};
    use medbatch_schemas::InputErrorKind;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn prov() -> JobProvenance {
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

    fn read(bytes: Vec<u8>) -> RecordBatch {
        let mut r = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap().build().unwrap();
        r.next().unwrap().unwrap()
    }

    #[test]
    fn lab_rows_round_trip_through_parquet() {
        let item = LabItem {
            test: Some("Potassium".into()),
            value: Some("<0.27".into()),
            value_numeric: None,
            unit: Some("mmol/L".into()),
            ref_low: Some(3.5),
            ref_high: None,
            flag: Some(Flag::High),
            evidence_start: 3,
            evidence_end: 40,
            method: Method::Model,
            alignment: Alignment::Normalized,
            from_examples: false,
        };
        let rows = vec![LabRow {
            document_id: "d1".into(),
            source_uri: "file:///x.txt".into(),
            input_sha256: "abc".into(),
            item,
            tokens_in: 12,
            tokens_out: 7,
        }];
        let batch = read(to_parquet(&lab_results_batch(&rows, &prov()).unwrap()).unwrap());
        assert_eq!(batch.schema(), lab_results_schema());
        assert_eq!(batch.num_rows(), 1);
        let col = |n: &str| batch.column_by_name(n).unwrap().clone();
        assert_eq!(col("value").as_string::<i32>().value(0), "<0.27");
        assert!(col("value_numeric").is_null(0));
        assert_eq!(col("ref_low").as_primitive::<Float64Type>().value(0), 3.5);
        assert!(col("ref_high").is_null(0));
        assert_eq!(col("evidence_end").as_primitive::<UInt32Type>().value(0), 40);
        let flag = arrow::compute::cast(&col("flag"), &arrow::datatypes::DataType::Utf8).unwrap();
        assert_eq!(flag.as_string::<i32>().value(0), "high");
        assert_eq!(col("run_id").as_string::<i32>().value(0), "r");
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
}
