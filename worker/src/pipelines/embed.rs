//! `embed` pipelines: an embedding model (MedSigLIP) embeds every image of a unit — each
//! image of a study, each slice kept of a series, each PNG or JPEG — into one row: the image's
//! L2-normalised embedding as a `FixedSizeList<Float32>` of `embed.dimensions`, and for each
//! zero-shot label of the spec the sigmoid probability that its text describes the image.
//! The labels' texts are embedded once per pipeline and kept.
//!
//! Tile pipelines (`imaging.unit = "tiles"`) embed each tissue tile of a band of a slide's
//! grid, a row each with the tile table's columns (slide, level, place, grid cell, tissue
//! fraction), so that the two tables join.
//!
//! Text pipelines (no `[imaging]`) embed documents instead: each document split at word
//! boundaries into chunks the text tower reads whole (63 tokens before `</s>`), a row per
//! chunk with its character offsets in the document.

use crate::parquet_out::{job_columns, ErrorReason, ErrorRow, ErrorStage, ParquetOutError};
use crate::pipeline::LoadedPipeline;
use crate::pipelines::{Outcome, Pipeline, RunCx, Unit};
use arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, Float32Builder, StringArray, StringBuilder, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use medbatch_engine::embed::{EmbedHandle, EmbedRequest};
use medbatch_schemas::pipeline::{EmbedSpec, ImagingUnit};
use std::sync::Arc;

/// The spec's `[embed]` section (checked at load: an embed pipeline has one).
fn spec(p: &LoadedPipeline) -> &EmbedSpec {
    p.spec.embed.as_ref().expect("task = \"embed\" pipelines have an [embed] section")
}

/// What a row of an embedding table stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rows {
    /// An image of a study, series or file.
    Images,
    /// A tissue tile of a whole-slide image (`imaging.unit = "tiles"`).
    Tiles,
    /// A chunk of a document's text (no `[imaging]`).
    Chunks,
}

impl Rows {
    fn of(p: &LoadedPipeline) -> Self {
        match &p.spec.imaging {
            None => Self::Chunks,
            Some(i) if i.unit == ImagingUnit::Tiles => Self::Tiles,
            Some(_) => Self::Images,
        }
    }
}

/// The columns of an embedding table: of images, of slide tiles, or of text chunks.
fn table_schema(e: &EmbedSpec, rows: Rows) -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let mut fields = match rows {
        Rows::Images => vec![
            // The unit the image came from (study or series UID, file name).
            Field::new("document_id", DataType::Utf8, false),
            // The image's place among the unit's images (0, 1, …).
            Field::new("image_index", DataType::UInt32, false),
            // The file the image came from.
            Field::new("image_source_uri", DataType::Utf8, false),
        ],
        // The tile table's columns: the two join on slide, level and place.
        Rows::Tiles => super::tiles::tile_fields(),
        Rows::Chunks => vec![
            Field::new("document_id", DataType::Utf8, false),
            Field::new("chunk_index", DataType::UInt32, false),
            // The chunk's characters in the document (Unicode scalar values, end exclusive).
            Field::new("evidence_start", DataType::UInt32, false),
            Field::new("evidence_end", DataType::UInt32, false),
        ],
    };
    fields.push(Field::new("embedding", DataType::FixedSizeList(item, e.dimensions as i32), false));
    fields.extend(e.labels.iter().map(|l| Field::new(format!("label_{}", l.name), DataType::Float32, false)));
    fields.extend([Field::new("source_uri", DataType::Utf8, false), Field::new("input_sha256", DataType::Utf8, false)]);
    fields.extend(medbatch_schemas::tables::provenance_fields().into_iter().skip(2));
    Arc::new(Schema::new(fields))
}

/// An `embed` pipeline.
pub struct Embed {
    pipeline: Arc<LoadedPipeline>,
    rows: Rows,
    schema: SchemaRef,
    /// The labels' text embeddings, computed by the first unit.
    labels: tokio::sync::OnceCell<Vec<Vec<f32>>>,
}

impl Embed {
    pub fn new(pipeline: Arc<LoadedPipeline>) -> Self {
        let rows = Rows::of(&pipeline);
        let schema = table_schema(spec(&pipeline), rows);
        Self { pipeline, rows, schema, labels: tokio::sync::OnceCell::new() }
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

/// A document split at whitespace into chunks of whole words of at most `capacity` tokens
/// (as `count` counts them), as character ranges; a word longer than that is a chunk alone
/// (the tokenizer cuts it).
fn chunks(
    text: &str,
    capacity: usize,
    count: impl Fn(&str) -> Result<usize, medbatch_engine::EngineError>,
) -> Result<Vec<(usize, usize)>, medbatch_engine::EngineError> {
    // Words as byte ranges.
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                words.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push((s, text.len()));
    }
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut k = 0;
    while k < words.len() {
        let first = words[k].0;
        let mut end = words[k].1;
        k += 1;
        while k < words.len() && count(&text[first..words[k].1])? <= capacity {
            end = words[k].1;
            k += 1;
        }
        out.push((first, end));
    }
    // Byte ranges to character ranges.
    let chars = |b: usize| text[..b].chars().count();
    Ok(out.into_iter().map(|(a, b)| (chars(a), chars(b))).collect())
}

/// A unit the model could not embed: an error row about its document.
fn failed(unit: &Unit, detail: String) -> Outcome {
    Outcome {
        errors: vec![ErrorRow::of_document(&unit.doc, ErrorStage::Model, ErrorReason::Inference, detail, None)],
        ..Outcome::default()
    }
}

impl Embed {
    /// The unit's rows from its columns up to `input_sha256`: the job columns and zero tokens
    /// (no generation) added.
    fn outcome(
        &self,
        mut cols: Vec<ArrayRef>,
        n: usize,
        cx: &RunCx<'_>,
        started: std::time::Instant,
    ) -> Result<Outcome, ParquetOutError> {
        let engine_ms = started.elapsed().as_millis() as u64;
        if n == 0 {
            return Ok(Outcome { engine_ms, ..Outcome::default() });
        }
        cols.extend(job_columns(n, cx.provenance));
        let zeros: ArrayRef = Arc::new(arrow::array::UInt32Array::from(vec![0u32; n]));
        cols.extend([zeros.clone(), zeros]);
        let batch = RecordBatch::try_new(self.schema.clone(), cols)?;
        Ok(Outcome { batch: Some(batch), engine_ms, ..Outcome::default() })
    }

    /// A text pipeline's unit: a row per chunk of the document.
    async fn run_text(
        &self,
        unit: &Unit,
        cx: &RunCx<'_>,
        embedder: &EmbedHandle,
        started: std::time::Instant,
    ) -> Result<Outcome, ParquetOutError> {
        let e = spec(&self.pipeline);
        let fail = |detail: String| failed(unit, detail);
        let tokenizer = embedder.tokenizer();
        let ranges = match chunks(&unit.doc.text, tokenizer.capacity(), |t| tokenizer.count(t)) {
            Ok(r) => r,
            Err(err) => return Ok(fail(err.to_string())),
        };
        let chars: Vec<char> = unit.doc.text.chars().collect();
        let texts: Vec<String> = ranges.iter().map(|&(a, b)| chars[a..b].iter().collect()).collect();
        let embeddings = match embedder.embed(EmbedRequest { images: Vec::new(), texts }).await {
            Ok(r) => r.texts,
            Err(err) => return Ok(fail(err.to_string())),
        };
        let n = embeddings.len();
        let mut doc = StringBuilder::new();
        let (mut index, mut start, mut end) =
            (UInt32Builder::with_capacity(n), UInt32Builder::with_capacity(n), UInt32Builder::with_capacity(n));
        let mut values = Float32Builder::with_capacity(n * e.dimensions);
        let (mut uri, mut sha) = (StringBuilder::new(), StringBuilder::new());
        for (k, (v, &(a, b))) in embeddings.iter().zip(&ranges).enumerate() {
            doc.append_value(&unit.doc.id);
            index.append_value(k as u32);
            start.append_value(a as u32);
            end.append_value(b as u32);
            values.append_slice(v);
            uri.append_value(&unit.doc.source_uri);
            sha.append_value(unit.doc.input_sha256.as_str());
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let embedding = FixedSizeListArray::try_new(item, e.dimensions as i32, Arc::new(values.finish()), None)?;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(doc.finish()),
            Arc::new(index.finish()),
            Arc::new(start.finish()),
            Arc::new(end.finish()),
            Arc::new(embedding),
            Arc::new(uri.finish()),
            Arc::new(sha.finish()),
        ];
        self.outcome(cols, n, cx, started)
    }
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
        let fail = |detail: String| failed(unit, detail);
        if embedder.info().dim != e.dimensions {
            return Ok(fail(format!(
                "the model embeds in {} dimensions, the pipeline's table holds {} (embed.dimensions)",
                embedder.info().dim,
                e.dimensions
            )));
        }
        let started = std::time::Instant::now();
        if self.rows == Rows::Chunks {
            return self.run_text(unit, cx, embedder, started).await;
        }
        // A band of a slide's grid that is all glass: no tiles, no rows.
        if unit.images.is_empty() {
            return self.outcome(Vec::new(), 0, cx, started);
        }
        let labels = match self.label_embeddings(embedder).await {
            Ok(l) => l.clone(),
            Err(err) => return Ok(fail(format!("embedding the labels: {err}"))),
        };
        let images = match embedder.embed(EmbedRequest { images: unit.images.clone(), texts: Vec::new() }).await {
            Ok(r) => r.images,
            Err(err) => return Ok(fail(err.to_string())),
        };
        let n = images.len();
        // The columns before the embedding: the image's place in its unit, or the tile's.
        let mut cols: Vec<ArrayRef> = match self.rows {
            Rows::Tiles => {
                let (cols, tiles) = super::tiles::tile_columns(unit);
                if tiles != n {
                    return Ok(fail(format!("{n} tile images for {tiles} tiles")));
                }
                cols
            }
            _ => {
                let files = unit.image_sources();
                let (mut doc, mut index, mut file) =
                    (StringBuilder::new(), UInt32Builder::with_capacity(n), StringBuilder::new());
                for k in 0..n {
                    doc.append_value(&unit.doc.id);
                    index.append_value(k as u32);
                    file.append_value(files.get(k).copied().unwrap_or(unit.doc.source_uri.as_str()));
                }
                vec![Arc::new(doc.finish()), Arc::new(index.finish()), Arc::new(file.finish())]
            }
        };
        let mut values = Float32Builder::with_capacity(n * e.dimensions);
        let mut label_cols: Vec<Float32Builder> = labels.iter().map(|_| Float32Builder::with_capacity(n)).collect();
        for v in &images {
            values.append_slice(v);
            for (col, label) in label_cols.iter_mut().zip(&labels) {
                col.append_value(embedder.info().probability(v, label));
            }
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values: Float32Array = values.finish();
        cols.push(Arc::new(FixedSizeListArray::try_new(item, e.dimensions as i32, Arc::new(values), None)?));
        cols.extend(label_cols.iter_mut().map(|c| Arc::new(c.finish()) as ArrayRef));
        cols.extend([
            Arc::new(StringArray::from(vec![unit.doc.source_uri.as_str(); n])) as ArrayRef,
            Arc::new(StringArray::from(vec![unit.doc.input_sha256.as_str(); n])),
        ]);
        self.outcome(cols, n, cx, started)
    }
}

#[cfg(test)]
mod tests {
    use super::chunks;

    /// Counts words as tokens (one a word).
    fn words(t: &str) -> Result<usize, medbatch_engine::EngineError> {
        Ok(t.split_whitespace().count())
    }

    #[test]
    fn chunks_are_whole_words_within_the_capacity_covering_the_text() {
        let text = "  one two\tthree four five six   seven é eight ";
        let c = chunks(text, 3, words).unwrap();
        let chars: Vec<char> = text.chars().collect();
        let pieces: Vec<String> = c.iter().map(|&(a, b)| chars[a..b].iter().collect()).collect();
        assert_eq!(pieces, ["one two\tthree", "four five six", "seven é eight"]);
        assert_eq!(chunks("", 3, words).unwrap(), Vec::<(usize, usize)>::new());
        // A word over the capacity is a chunk alone.
        assert_eq!(chunks("a bbbbbb c", 0, words).unwrap(), [(0, 1), (2, 8), (9, 10)]);
    }
}
