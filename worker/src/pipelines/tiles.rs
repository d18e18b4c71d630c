//! `tiles` pipelines: one row per tissue tile of a whole-slide image, no model. A tile is a
//! cell of the slide's patch grid at the pipeline's magnification (`imaging.slide`) that
//! passes the tissue test; its row gives the slide, the level and the place and size of the
//! tile in that level's pixels, its grid column and row, its tissue fraction, the level's
//! magnification and micrometres per pixel. A slide is planned as jobs over bands of grid
//! rows; each job writes the rows of its band. This is the table embedding pipelines read
//! tiles from.

use crate::parquet_out::{job_columns, ParquetOutError};
use crate::pipeline::LoadedPipeline;
use crate::pipelines::{Outcome, Pipeline, RunCx, Unit};
use arrow::array::{
    ArrayRef, Float32Builder, Float64Builder, StringArray, StringBuilder, UInt32Array, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;

/// The columns that place a tile: its slide, level, place and size, grid cell, tissue
/// fraction, magnification and pixel size (the tile table's, and the first of a tile
/// embedding table's, so that the two join on them).
pub fn tile_fields() -> Vec<Field> {
    vec![
        // The slide: its file name, or a DICOM slide's header digest (16 hex digits).
        Field::new("document_id", DataType::Utf8, false),
        Field::new("level", DataType::UInt32, false),
        // Place and size in pixels of `level`.
        Field::new("x", DataType::UInt64, false),
        Field::new("y", DataType::UInt64, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("grid_col", DataType::UInt32, false),
        Field::new("grid_row", DataType::UInt32, false),
        // Share of the tile's mask pixels that pass the tissue test on their own.
        Field::new("tissue_fraction", DataType::Float32, false),
        Field::new("magnification", DataType::Float64, false),
        // Micrometres per pixel of `level`, when the slide states its pixel size.
        Field::new("mpp_x", DataType::Float64, true),
        Field::new("mpp_y", DataType::Float64, true),
    ]
}

/// The columns of a tile table.
pub fn table_schema() -> SchemaRef {
    let mut fields = tile_fields();
    fields.extend([Field::new("source_uri", DataType::Utf8, false), Field::new("input_sha256", DataType::Utf8, false)]);
    fields.extend(medbatch_schemas::tables::provenance_fields().into_iter().skip(2));
    Arc::new(Schema::new(fields))
}

/// A `tiles` pipeline.
pub struct Tiles {
    pipeline: Arc<LoadedPipeline>,
    schema: SchemaRef,
}

impl Tiles {
    pub fn new(pipeline: Arc<LoadedPipeline>) -> Self {
        Self { pipeline, schema: table_schema() }
    }
}

/// The [`tile_fields`] columns of a unit's tiles, a slide at a time in reading order, and
/// their number.
pub fn tile_columns(unit: &Unit) -> (Vec<ArrayRef>, usize) {
    let n = unit.slides.iter().map(|s| s.regions.len()).sum();
    let u32_of = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let mut doc = StringBuilder::new();
    let (mut level, mut width, mut height) =
        (UInt32Builder::with_capacity(n), UInt32Builder::with_capacity(n), UInt32Builder::with_capacity(n));
    let (mut x, mut y) = (UInt64Builder::with_capacity(n), UInt64Builder::with_capacity(n));
    let (mut col, mut row) = (UInt32Builder::with_capacity(n), UInt32Builder::with_capacity(n));
    let mut fraction = Float32Builder::with_capacity(n);
    let (mut mag, mut mpp_x, mut mpp_y) =
        (Float64Builder::with_capacity(n), Float64Builder::with_capacity(n), Float64Builder::with_capacity(n));
    for s in &unit.slides {
        for r in &s.regions {
            doc.append_value(&s.id);
            level.append_value(u32_of(r.level as u64));
            x.append_value(r.x);
            y.append_value(r.y);
            width.append_value(r.width);
            height.append_value(r.height);
            col.append_value(u32_of(r.x / s.step.max(1)));
            row.append_value(u32_of(r.y / s.step.max(1)));
            fraction.append_value(r.tissue_fraction);
            mag.append_value(s.magnification);
            mpp_x.append_option(s.mpp.map(|m| m.0));
            mpp_y.append_option(s.mpp.map(|m| m.1));
        }
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(doc.finish()),
        Arc::new(level.finish()),
        Arc::new(x.finish()),
        Arc::new(y.finish()),
        Arc::new(width.finish()),
        Arc::new(height.finish()),
        Arc::new(col.finish()),
        Arc::new(row.finish()),
        Arc::new(fraction.finish()),
        Arc::new(mag.finish()),
        Arc::new(mpp_x.finish()),
        Arc::new(mpp_y.finish()),
    ];
    (cols, n)
}

/// The rows of one unit's tiles.
fn tiles_batch(
    schema: &SchemaRef,
    unit: &Unit,
    prov: &crate::parquet_out::JobProvenance,
) -> Result<RecordBatch, ParquetOutError> {
    let (mut cols, n) = tile_columns(unit);
    let uri: ArrayRef = Arc::new(StringArray::from(vec![unit.doc.source_uri.as_str(); n]));
    let sha: ArrayRef = Arc::new(StringArray::from(vec![unit.doc.input_sha256.as_str(); n]));
    cols.extend([uri, sha]);
    cols.extend(job_columns(n, prov));
    // No model: no tokens in or out.
    let zeros: ArrayRef = Arc::new(UInt32Array::from(vec![0u32; n]));
    cols.extend([zeros.clone(), zeros]);
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

#[async_trait::async_trait]
impl Pipeline for Tiles {
    fn loaded(&self) -> &LoadedPipeline {
        &self.pipeline
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The unit's tissue tiles as rows; nothing can fail past reading the slide.
    async fn run(&self, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError> {
        let batch = tiles_batch(&self.schema, unit, cx.provenance)?;
        Ok(Outcome { batch: (batch.num_rows() > 0).then_some(batch), ..Outcome::default() })
    }
}
