//! `lab_results` rows and their record batch.

use super::classify::ResultStatus;
use super::items::LabItem;
use crate::parquet_out::{job_columns, to_u32, JobProvenance, ParquetOutError};
use arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, StringBuilder, StringDictionaryBuilder, UInt32Builder};
use arrow::datatypes::Int32Type;
use arrow::record_batch::RecordBatch;
use medbatch_schemas::tables::lab_results_schema;
use std::sync::Arc;

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
    let mut status = StringDictionaryBuilder::<Int32Type>::new();
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
        status.append_value(it.status.unwrap_or(ResultStatus::Final).as_str());
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
        Arc::new(status.finish()),
        Arc::new(source_uri.finish()),
        Arc::new(input_sha256.finish()),
    ];
    cols.extend(job_columns(n, prov));
    cols.push(Arc::new(tokens_in.finish()));
    cols.push(Arc::new(tokens_out.finish()));
    Ok(RecordBatch::try_new(lab_results_schema(), cols)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grounding::Alignment;
    use crate::parquet_out::tests::{prov, read};
    use crate::parquet_out::to_parquet;
    use crate::pipelines::lab_report::{Flag, Method};
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, UInt32Type};

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
            status: Some(crate::pipelines::lab_report::ResultStatus::Corrected),
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
        let status = arrow::compute::cast(&col("status"), &arrow::datatypes::DataType::Utf8).unwrap();
        assert_eq!(status.as_string::<i32>().value(0), "corrected");
        assert_eq!(col("run_id").as_string::<i32>().value(0), "r");
    }
}
