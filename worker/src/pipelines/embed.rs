//! `embed` pipelines: an embedding model (MedSigLIP) embeds every image of a unit — each
//! image of a study, each slice kept of a series, each PNG or JPEG — into one row: the image's
//! L2-normalised embedding as a `FixedSizeList<Float32>` of `embed.dimensions`, and for each
//! zero-shot label of the spec the sigmoid probability that its text describes the image.
//! The labels' texts are embedded once per pipeline and kept.

use crate::parquet_out::{job_columns, ErrorReason, ErrorRow, ErrorStage, ParquetOutError};
use crate::pipeline::LoadedPipeline;
use crate::pipelines::{Outcome, Pipeline, RunCx, Unit};
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, Float32Builder, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use medbatch_engine::embed::{EmbedHandle, EmbedRequest};
use medbatch_schemas::pipeline::EmbedSpec;
use std::sync::Arc;

/// The spec's `[embed]` section (checked at load: an embed pipeline has one).
fn spec(p: &LoadedPipeline) -> &EmbedSpec {
    p.spec.embed.as_ref().expect("task = \"embed\" pipelines have an [embed] section")
}

/// The columns of an embedding table.
pub fn table_schema(e: &EmbedSpec) -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let mut fields = vec![
        // The unit the image came from (study or series UID, file name).
        Field::new("document_id", DataType::Utf8, false),
        // The image's place among the unit's images (0, 1, …).
        Field::new("image_index", DataType::UInt32, false),
        // The file the image came from.
        Field::new("image_source_uri", DataType::Utf8, false),
        Field::new("embedding", DataType::FixedSizeList(item, e.dimensions as i32), false),
    ];
    fields.extend(e.labels.iter().map(|l| Field::new(format!("label_{}", l.name), DataType::Float32, false)));
    fields.extend([Field::new("source_uri", DataType::Utf8, false), Field::new("input_sha256", DataType::Utf8, false)]);
    fields.extend(medbatch_schemas::tables::provenance_fields().into_iter().skip(2));
    Arc::new(Schema::new(fields))
}

/// An `embed` pipeline.
pub struct Embed {
    pipeline: Arc<LoadedPipeline>,
    schema: SchemaRef,
    /// The labels' text embeddings, computed by the first unit.
    labels: tokio::sync::OnceCell<Vec<Vec<f32>>>,
}

impl Embed {
    pub fn new(pipeline: Arc<LoadedPipeline>) -> Self {
        let schema = table_schema(spec(&pipeline));
        Self { pipeline, schema, labels: tokio::sync::OnceCell::new() }
    }

    async fn label_embeddings(&self, embedder: &EmbedHandle) -> Result<&Vec<Vec<f32>>, medbatch_engine::EngineError> {
        self.labels
            .get_or_try_init(|| async {
                let texts = spec(&self.pipeline).labels.iter().map(|l| l.text.clone()).collect();
                Ok(embedder.embed(EmbedRequest { images: Vec::new(), texts }).await?.texts)
            })
            .await
    }
}

/// Which file each of a unit's images came from, in image order.
fn image_sources(unit: &Unit) -> Vec<&str> {
    unit.sources.iter().flat_map(|s| std::iter::repeat_n(s.uri.as_str(), s.images.unwrap_or(0) as usize)).collect()
}

#[async_trait::async_trait]
impl Pipeline for Embed {
    fn loaded(&self) -> &LoadedPipeline {
        &self.pipeline
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// A row per image; a model error or a model of another width is an error row.
    async fn run(&self, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError> {
        let embedder = cx.embedder.expect("a job of an embed pipeline is taken only by a worker with its model");
        let e = spec(&self.pipeline);
        let fail = |detail: String| Outcome {
            errors: vec![ErrorRow::of_document(&unit.doc, ErrorStage::Model, ErrorReason::Inference, detail, None)],
            ..Outcome::default()
        };
        if embedder.info().dim != e.dimensions {
            return Ok(fail(format!(
                "the model embeds in {} dimensions, the pipeline's table holds {} (embed.dimensions)",
                embedder.info().dim,
                e.dimensions
            )));
        }
        let started = std::time::Instant::now();
        let labels = match self.label_embeddings(embedder).await {
            Ok(l) => l.clone(),
            Err(err) => return Ok(fail(format!("embedding the labels: {err}"))),
        };
        let images = match embedder.embed(EmbedRequest { images: unit.images.clone(), texts: Vec::new() }).await {
            Ok(r) => r.images,
            Err(err) => return Ok(fail(err.to_string())),
        };
        let n = images.len();
        let files = image_sources(unit);
        let (mut doc, mut index, mut file) =
            (StringBuilder::new(), UInt32Builder::with_capacity(n), StringBuilder::new());
        let mut values = Float32Builder::with_capacity(n * e.dimensions);
        let mut label_cols: Vec<Float32Builder> = labels.iter().map(|_| Float32Builder::with_capacity(n)).collect();
        let (mut uri, mut sha, mut zeros) =
            (StringBuilder::new(), StringBuilder::new(), UInt32Builder::with_capacity(n));
        for (k, v) in images.iter().enumerate() {
            doc.append_value(&unit.doc.id);
            index.append_value(k as u32);
            file.append_value(files.get(k).copied().unwrap_or(unit.doc.source_uri.as_str()));
            values.append_slice(v);
            for (col, label) in label_cols.iter_mut().zip(&labels) {
                col.append_value(embedder.info().probability(v, label));
            }
            uri.append_value(&unit.doc.source_uri);
            sha.append_value(unit.doc.input_sha256.as_str());
            zeros.append_value(0);
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values: Float32Array = values.finish();
        let embedding = FixedSizeListArray::try_new(item, e.dimensions as i32, Arc::new(values), None)?;
        let mut cols: Vec<ArrayRef> =
            vec![Arc::new(doc.finish()), Arc::new(index.finish()), Arc::new(file.finish()), Arc::new(embedding)];
        cols.extend(label_cols.iter_mut().map(|c| Arc::new(c.finish()) as ArrayRef));
        cols.extend([Arc::new(uri.finish()) as ArrayRef, Arc::new(sha.finish())]);
        cols.extend(job_columns(n, cx.provenance));
        let zeros: ArrayRef = Arc::new(zeros.finish());
        cols.extend([zeros.clone(), zeros]);
        let batch = RecordBatch::try_new(self.schema.clone(), cols)?;
        Ok(Outcome {
            batch: (n > 0).then_some(batch),
            engine_ms: started.elapsed().as_millis() as u64,
            ..Outcome::default()
        })
    }
}
