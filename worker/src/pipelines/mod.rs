//! Pipelines behind one trait: what a job does with each document it read.
//!
//! A pipeline is picked once, from its spec's `task` ([`for_spec`]); the job loop then hands
//! it one [`Unit`] at a time and writes what comes back. Each pipeline owns its output
//! table: its Arrow schema and the record batch of each document's rows. Model calls go
//! through [`crate::model_call`], the one path from prompt to answer.

pub mod cohort_eval;
pub mod embed;
pub mod lab_report;
pub mod localize;
pub mod note_sections;
pub mod structured;
pub mod summary;
pub mod tiles;

use crate::parquet_out::{ErrorRow, JobProvenance, ParquetOutError};
use crate::pipeline::{LoadedPipeline, PipelineError};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use medbatch_engine::image::Rgb8;
use medbatch_engine::EngineHandle;
use medbatch_schemas::pipeline::Task;
use medbatch_schemas::{Digest, Document, SkipReason};
use std::sync::Arc;

/// What a pipeline reads at a time: one document, with the images of its prompt (none for
/// text; an imaging study's images for imaging pipelines).
#[derive(Debug)]
pub struct Unit {
    pub doc: Document,
    pub images: Vec<Arc<Rgb8>>,
    /// What the unit was read from, in order: the input (and member) of a text document; each
    /// file of an imaging prompt, with the images it gave or why it gave none. One
    /// `_documents` row each.
    pub sources: Vec<Source>,
    /// A whole-slide unit's regions, a slide at a time: the patches of its prompt (of each
    /// slide of a case), or its tissue tiles. Empty for other units.
    pub slides: Vec<SlideRegions>,
}

impl Unit {
    /// Which file each of the unit's images came from, in image order.
    pub fn image_sources(&self) -> Vec<&str> {
        self.sources.iter().flat_map(|s| std::iter::repeat_n(s.uri.as_str(), s.images.unwrap_or(0) as usize)).collect()
    }
}

/// The regions of a whole-slide image a unit stands for: the patches of its prompt
/// (slide-level pipelines) or the tissue tiles of its band (tile-level pipelines), each with
/// its level, place and size in pixels of that level, and tissue fraction.
#[derive(Clone, Debug, PartialEq)]
pub struct SlideRegions {
    /// The slide: its file name, or a DICOM slide's first 16 hex digits of its header digest.
    pub id: String,
    /// Magnification of the regions' level, and its micrometres per pixel (x, y) when the
    /// slide states them.
    pub magnification: f64,
    pub mpp: Option<(f64, f64)>,
    /// Distance between grid cells in pixels of that level: a region's grid column and row
    /// are its x and y over it.
    pub step: u64,
    pub regions: Vec<medbatch_formats::wsi::tissue::Patch>,
}

/// An input file (or archive member) a unit was read from.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub uri: String,
    pub member: Option<String>,
    pub sha256: Digest,
    /// Images it gave the prompt (imaging units only).
    pub images: Option<u32>,
    /// Read, but left out by the pipeline's recipe.
    pub skipped: Option<SkipReason>,
}

/// What running a unit needs besides the pipeline.
pub struct RunCx<'a> {
    /// The model's engine (`None` only for pipelines that call no model: the job checks it
    /// before any unit runs).
    pub engine: Option<&'a EngineHandle>,
    /// The embedding model's service (`embed` pipelines; checked like the engine).
    pub embedder: Option<&'a medbatch_engine::embed::EmbedHandle>,
    /// Seeds sampling (when the pipeline samples) so that a rerun reproduces it.
    pub job_seed: u64,
    /// The job columns of every row.
    pub provenance: &'a JobProvenance,
    /// Called with the tokens of each model answer, for progress.
    pub on_generated: &'a (dyn Fn(u64) + Sync),
}

impl RunCx<'_> {
    /// The engine of a model pipeline.
    pub fn engine(&self) -> &EngineHandle {
        self.engine.expect("a job of a model pipeline is taken only by a worker with the model")
    }
}

/// What one unit gave: its rows in the pipeline's table, its error rows, what it cost.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The unit's rows (`None` when it gave none).
    pub batch: Option<RecordBatch>,
    pub errors: Vec<ErrorRow>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Wall time of the model phase.
    pub engine_ms: u64,
    /// Pieces of the unit that are not results, by reason (`pending`, `metadata` …).
    pub set_aside: std::collections::BTreeMap<String, u64>,
}

impl Outcome {
    /// Rows in the pipeline's table.
    pub fn rows(&self) -> usize {
        self.batch.as_ref().map_or(0, RecordBatch::num_rows)
    }

    /// The outcome's cost and errors as the model call left them.
    pub(crate) fn from_asked(asked: &crate::model_call::Asked) -> Self {
        Self { tokens_in: asked.tokens_in, tokens_out: asked.tokens_out, engine_ms: asked.engine_ms, ..Self::default() }
    }
}

/// One kind of pipeline.
#[async_trait::async_trait]
pub trait Pipeline: Send + Sync {
    /// The pipeline folder it runs (spec, prompt, schema, digest).
    fn loaded(&self) -> &LoadedPipeline;

    /// The schema of its output table (`output.table` of the spec).
    fn schema(&self) -> SchemaRef;

    /// Turns one unit into rows and error rows. `Err` only when the rows cannot be encoded
    /// (the same rows would fail again: the job is dead-lettered).
    async fn run(&self, unit: &Unit, cx: &RunCx<'_>) -> Result<Outcome, ParquetOutError>;
}

/// The pipeline a spec asks for: the one place that looks at `task`.
pub fn for_spec(loaded: Arc<LoadedPipeline>) -> Result<Arc<dyn Pipeline>, PipelineError> {
    match loaded.spec.task {
        Task::Extract => Ok(Arc::new(lab_report::LabReport::new(loaded))),
        Task::Structured => Ok(Arc::new(structured::Structured::new(loaded)?)),
        Task::Tiles => Ok(Arc::new(tiles::Tiles::new(loaded))),
        Task::Embed => Ok(Arc::new(embed::Embed::new(loaded))),
        Task::Localize => Ok(Arc::new(localize::Localize::new(loaded)?)),
        Task::Generate => Ok(Arc::new(summary::Summary::new(loaded)?)),
    }
}
