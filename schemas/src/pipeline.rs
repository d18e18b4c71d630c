//! The pipeline spec: `pipelines/NAME/pipeline.toml`.
//!
//! A pipeline folder holds the spec, a prompt template, the JSON schema of the model's answer
//! and a small evaluation set. The spec says which inputs are accepted, how a document becomes
//! prompts, how answers become rows, and how the model generates.

use crate::job::InputKind;
use serde::{Deserialize, Serialize};

/// Why a pipeline spec is invalid.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("pipeline.toml: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("pipeline.toml: {0}")]
    Invalid(String),
}

/// What the pipeline produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Structured rows extracted from documents.
    Extract,
    /// A short text per document whose every sentence lists the words of the document it
    /// rests on (summaries): the answer is `sentences` of `{text, evidence}`, each quote
    /// located in the document and a sentence without support flagged.
    Generate,
    /// Rows are the answer schema's objects, with columns derived from the schema: one row
    /// per document, or one per element of the array property `output.items`.
    Structured,
    /// No model: one row per tissue tile of each whole-slide image (`imaging.unit =
    /// "tiles"`), with its level, place, size, tissue fraction and pixel size. Runs need no
    /// model and take no prompt.
    Tiles,
    /// Embeddings from a SigLIP model (MedSigLIP): one row per image with its L2-normalised
    /// embedding and a probability column per zero-shot label of `[embed]` (imaging
    /// pipelines), or one row per chunk of a document's text (text pipelines). No prompt.
    Embed,
    /// Bounding boxes from MedGemma 1.5 (`[localize]`): each image of a unit asked where
    /// each of the spec's objects is, the answer a list of `[y0, x0, y1, x1]` boxes on a
    /// 0–1000 scale decoded under the schema's grammar; a row per box with its corners in
    /// pixels of the original image.
    Localize,
}

impl Task {
    /// Whether the pipeline calls a model (every task but `tiles`).
    pub fn needs_model(self) -> bool {
        self != Self::Tiles
    }

    /// Whether the pipeline prompts a generative model (and so has a `[prompt]`).
    pub fn needs_prompt(self) -> bool {
        !matches!(self, Self::Tiles | Self::Embed)
    }
}

/// Embedding pipelines (`task = "embed"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedSpec {
    /// The embedding width the output column holds (MedSigLIP: 1,152); a model of another
    /// width is refused.
    pub dimensions: usize,
    /// Zero-shot labels: a column `label_NAME` each, the sigmoid probability (SigLIP's) that
    /// the label's text describes the image.
    #[serde(default)]
    pub labels: Vec<EmbedLabel>,
}

/// Localization pipelines (`task = "localize"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalizeSpec {
    /// What to find: each image is asked about each object in a prompt of its own (the
    /// template's `object`).
    pub objects: Vec<String>,
    /// Pad each image to a square (centred, black) before the model sees it, as Google's
    /// localization notebook does; boxes are mapped back to the original image. (Done by
    /// the pipeline, which knows each image's size: `imaging.pad_to_square` stays false.)
    #[serde(default = "default_true")]
    pub pad_to_square: bool,
    /// Most tokens of visible reasoning before `Final Answer:` (the prompt asks for
    /// reasoning first); past it the grammar moves on to the answer.
    #[serde(default = "default_reasoning_tokens")]
    pub reasoning_tokens: u32,
}

fn default_reasoning_tokens() -> u32 {
    512
}

/// A zero-shot label: a column name and the text it is scored with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedLabel {
    pub name: String,
    pub text: String,
}

/// The whole spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub task: Task,
    pub input: InputSpec,
    pub output: OutputSpec,
    /// Every task but `tiles` (which calls no model) has a prompt.
    #[serde(default)]
    pub prompt: PromptSpec,
    #[serde(default)]
    pub generation: GenerationSpec,
    #[serde(default)]
    pub extraction: ExtractionSpec,
    #[serde(default)]
    pub model: ModelSpec,
    /// Imaging pipelines: how images, DICOM studies and series, and volumes become prompts.
    #[serde(default)]
    pub imaging: Option<ImagingSpec>,
    /// Embedding pipelines: the embedding width and the zero-shot labels.
    #[serde(default)]
    pub embed: Option<EmbedSpec>,
    /// Localization pipelines: the objects to find and how images are padded.
    #[serde(default)]
    pub localize: Option<LocalizeSpec>,
    /// Per-document structured pipelines with a patient: the patient-level stage run once a
    /// run's jobs are all done (`patient_facts`, `cohort_members`).
    #[serde(default)]
    pub patients: Option<PatientsSpec>,
    /// Per-document generate pipelines with a patient: the stage run once a run's jobs are
    /// all done that gathers each patient's supported summary sentences of the run into one
    /// row (the input of a per-patient digest).
    #[serde(default)]
    pub patient_notes: Option<PatientNotesSpec>,
}

/// The table of each patient's summary sentences of one run: a row per patient, its text
/// the patient's notes in date order, each a heading line `Note <id> (<date>):` and its
/// supported sentences.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientNotesSpec {
    #[serde(default = "default_patient_notes_table")]
    pub table: String,
}

fn default_patient_notes_table() -> String {
    "patient_notes".into()
}

/// The patient-level stage: the run's rows grouped by patient into one row each (the
/// latest value of every field, with the note and date it came from; list fields merged),
/// and the patients meeting each cohort's criteria.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientsSpec {
    /// The patient table.
    #[serde(default = "default_patients_table")]
    pub table: String,
    /// The members table (a row per patient and cohort met).
    #[serde(default = "default_members_table")]
    pub members_table: String,
    #[serde(default)]
    pub cohorts: Vec<CohortSpec>,
}

/// A cohort: a name and criteria over the patient row, e.g.
/// `diabetes and lvef_percent < 40 and not diagnosis("heart transplant")`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortSpec {
    pub name: String,
    pub criteria: String,
}

fn default_patients_table() -> String {
    "patient_facts".into()
}

fn default_members_table() -> String {
    "cohort_members".into()
}

/// What one job (and one prompt) of an imaging pipeline covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImagingUnit {
    /// A DICOM study (radiographs: every image of the study, up to `max_images`); a PNG or
    /// JPEG file is a study of one image.
    Study,
    /// A DICOM series or a NIfTI volume (CT, MR): slices sampled uniformly down to
    /// `max_images`, each labelled `SLICE n`.
    Series,
    /// A patient's study and the study before it (by study date): the prior's image, then
    /// the current one.
    PriorCurrent,
    /// A whole-slide image (an SVS or pyramidal TIFF file, or the DICOM instances of one
    /// slide's series): tissue patches chosen by `imaging.slide`, up to `max_images`.
    Slide,
    /// The tissue tiles of a whole-slide image (`task = "tiles"`, or `"embed"` for an
    /// embedding a tile): every tissue cell of the patch grid of `imaging.slide`; a slide is
    /// planned as jobs of
    /// `imaging.slide.tiles_per_job` cells, in bands of whole grid rows.
    Tiles,
}

/// How tissue is told from glass on a slide's mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TissueDetection {
    /// Mean luminance of a cell within [1/255, 0.8] (Google's recipe, for white glass).
    Luminance,
    /// Mean saturation of a cell above the Otsu threshold of the slide's saturations.
    OtsuSaturation,
}

/// Patches of a whole-slide image (Google's MedGemma pathology recipe by default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlideSpec {
    /// Magnification the patches are read at.
    #[serde(default = "default_slide_magnification")]
    pub magnification: f64,
    /// Patch side in pixels at that magnification (MedGemma's image size).
    #[serde(default = "default_patch")]
    pub patch: u32,
    /// Distance between patch origins (the patch side: no overlap).
    #[serde(default = "default_patch")]
    pub stride: u32,
    /// Magnification of the tissue mask.
    #[serde(default = "default_mask_magnification")]
    pub mask_magnification: f64,
    #[serde(default = "default_tissue")]
    pub tissue: TissueDetection,
    /// Seed of the patch sample (with each slide's header digest): a rerun picks the same
    /// patches.
    #[serde(default)]
    pub seed: u64,
    /// Tile-level pipelines: grid cells per job (whole grid rows, at least one row).
    #[serde(default = "default_tiles_per_job")]
    pub tiles_per_job: u64,
    /// Slide-level pipelines: a prompt per slide, or per case (the slides a manifest CSV
    /// among the inputs puts in one case, or the DICOM slides of one study).
    #[serde(default)]
    pub group: SlideGroup,
}

/// What one prompt of a slide-level pipeline covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlideGroup {
    /// One slide.
    #[default]
    Slide,
    /// The slides of one case: a manifest CSV among the inputs (columns `slide`: a slide's
    /// file name, URI, or a DICOM slide's folder name; `case`) groups them, and DICOM slides
    /// it does not name are grouped by study. `max_images` patches are shared among the
    /// case's slides; each patch is labelled with its slide (`SLIDE n`).
    Case,
}

fn default_tiles_per_job() -> u64 {
    4096
}

fn default_slide_magnification() -> f64 {
    10.0
}
fn default_patch() -> u32 {
    896
}
fn default_mask_magnification() -> f64 {
    1.25
}
fn default_tissue() -> TissueDetection {
    TissueDetection::Luminance
}

impl Default for SlideSpec {
    fn default() -> Self {
        Self {
            magnification: default_slide_magnification(),
            patch: default_patch(),
            stride: default_patch(),
            mask_magnification: default_mask_magnification(),
            tissue: default_tissue(),
            seed: 0,
            tiles_per_job: default_tiles_per_job(),
            group: SlideGroup::Slide,
        }
    }
}

/// How an imaging pipeline reads its inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagingSpec {
    pub unit: ImagingUnit,
    /// DICOM modalities read (`CR`, `DX`, `CT`, `MR` …); files of others become error rows.
    /// Empty: any.
    #[serde(default)]
    pub modalities: Vec<String>,
    /// Most images in one prompt: a series is sampled uniformly down to it (Google's CT
    /// recipe uses 85), a study keeps its first images by instance number.
    #[serde(default = "default_max_images")]
    pub max_images: usize,
    /// Pad each image to a square (centred, black) before resizing, as MedGemma's chest
    /// X-ray notebooks do.
    #[serde(default)]
    pub pad_to_square: bool,
    /// Most bytes of decoded samples one image file or volume may declare (rows × columns ×
    /// frames × samples × bytes a sample), checked before any buffer is reserved; a gzip
    /// NIfTI is never inflated past it.
    #[serde(default = "default_max_decoded_bytes")]
    pub max_decoded_bytes: u64,
    /// Whole-slide patches (`unit = "slide"`); `max_images` is the most patches a prompt
    /// holds (125 in Google's recipe).
    #[serde(default)]
    pub slide: SlideSpec,
}

fn default_max_images() -> usize {
    85
}

/// 1 GiB of decoded samples for one image file (all its frames) or volume: a CT series of
/// 1,000 slices of 512 × 512 at 16 bits is 500 MiB.
pub const DEFAULT_MAX_DECODED_BYTES: u64 = 1 << 30;

fn default_max_decoded_bytes() -> u64 {
    DEFAULT_MAX_DECODED_BYTES
}

/// Which inputs the pipeline reads and how records map to documents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Accepted input kinds (archives are opened and their members checked against this list).
    #[serde(default = "default_kinds")]
    pub kinds: Vec<InputKind>,
    /// Field (JSONL key or CSV column) holding the document id.
    #[serde(default = "default_id_field")]
    pub id_field: String,
    /// Field holding the document text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Largest document accepted, in bytes.
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: u64,
    /// Field (JSONL key or CSV column) holding the patient a record belongs to; a record
    /// without it has none (or the file name's, by `patient_pattern`).
    #[serde(default)]
    pub patient_field: Option<String>,
    /// Field holding the note's date, as written (ISO dates sort and compare as text).
    #[serde(default)]
    pub date_field: Option<String>,
    /// A regular expression over a file's (or archive member's) name whose first capture
    /// group is the patient, for documents that are whole files (e.g. `^([A-Z]+-[0-9]+)_`),
    /// and for records without `patient_field`.
    #[serde(default)]
    pub patient_pattern: Option<String>,
    /// The same for the note's date (e.g. `([0-9]{4}-[0-9]{2}-[0-9]{2})`).
    #[serde(default)]
    pub date_pattern: Option<String>,
}

impl InputSpec {
    /// Whether documents carry a patient or a date (the tables then have their columns).
    pub fn has_patient_or_date(&self) -> bool {
        self.patient_field.is_some()
            || self.date_field.is_some()
            || self.patient_pattern.is_some()
            || self.date_pattern.is_some()
    }
}

/// How answers become rows of which table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output table name (a path segment under the output root).
    pub table: String,
    /// One row per document, or one per extracted item.
    #[serde(default)]
    pub rows: RowMode,
    /// `structured` pipelines with one row per item: the answer's array property whose
    /// elements (objects) are the rows.
    #[serde(default)]
    pub items: Option<String>,
    /// `structured` pipelines: the row's string property quoting its evidence; it is
    /// aligned to character offsets of the document (`evidence_start`, `evidence_end`,
    /// `alignment`).
    #[serde(default)]
    pub evidence: Option<String>,
    /// `structured` pipelines with one row per document: the answer's object property that
    /// maps field paths (`NAME` of a top-level field, `NAME[i]` of an item of a list of
    /// objects) to the quote supporting each. Each quote is aligned to the document: a
    /// top-level field gets `NAME_evidence_start`, `NAME_evidence_end` and `NAME_alignment`
    /// columns, each list item `evidence_start`, `evidence_end` and `alignment` fields.
    #[serde(default)]
    pub evidence_map: Option<String>,
    /// `structured` pipelines whose prompt answers something smaller than a row (section
    /// mode, `extraction.unit = "section"`): the JSON schema of the table's row (a file of
    /// the pipeline folder, or a path relative to it, e.g. a sibling pipeline's). Default:
    /// the prompt's answer schema.
    #[serde(default)]
    pub schema: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowMode {
    PerDocument,
    #[default]
    PerItem,
}

/// How prompts are built.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    /// Prompt template file (minijinja), relative to the pipeline folder.
    pub template: String,
    /// JSON schema of one answer, relative to the pipeline folder.
    pub schema: String,
    /// `raw` completion prompts (base models) or the model's `chat` turn format.
    #[serde(default)]
    pub format: PromptFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    #[default]
    Raw,
    Chat,
}

/// Generation settings. Decoding is greedy unless `temperature` > 0; sampling is seeded
/// from the job id, so a rerun reproduces its output either way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: u32,
    /// Extra stop strings, besides the model's end-of-turn and end-of-sequence tokens.
    #[serde(default)]
    pub stop: Vec<String>,
    /// 0 (the default) is greedy decoding.
    #[serde(default)]
    pub temperature: f32,
    /// Sample among the `top_k` most likely tokens (0 = no limit).
    #[serde(default)]
    pub top_k: usize,
    /// Sample within the smallest set of tokens reaching this probability (1 = no limit).
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Decode under the answer schema's grammar (the default): every answer parses and
    /// validates, `copy` fields are substrings of the text the model reads, and an answer
    /// cut off by `max_new_tokens` is an error row `truncated`. `false` decodes free text
    /// (until a stop string) and parses whatever comes.
    #[serde(default = "default_true")]
    pub constrained: bool,
    /// The two special tokens a model's thinking trace lies between (MedGemma 1.5:
    /// `["<unused94>", "<unused95>"]`): the trace is dropped from the answer before it is
    /// parsed (its tokens still count as generated), and a localization grammar lets the
    /// answer start with one. Empty: no thinking.
    #[serde(default)]
    pub thinking: Vec<String>,
}

impl Default for GenerationSpec {
    fn default() -> Self {
        Self {
            max_new_tokens: default_max_new_tokens(),
            stop: Vec::new(),
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            constrained: true,
            thinking: Vec::new(),
        }
    }
}

fn default_top_p() -> f32 {
    1.0
}

fn default_true() -> bool {
    true
}

/// How an extraction pipeline splits a document before the model sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractionSpec {
    /// Deterministic parsers run before the model (`hl7_obx`, `delimited_table`,
    /// `fixed_width_table`); text they claim never reaches the model.
    #[serde(default)]
    pub parsers: Vec<ParserKind>,
    /// What the model sees at a time: one candidate line (small models) or the whole
    /// document (large models).
    #[serde(default)]
    pub unit: ExtractionUnit,
    /// Input budget of one prompt, in tokens of document text: a longer document is read in
    /// chunks of whole lines up to this size (whole-document pipelines).
    #[serde(default = "default_chunk_tokens")]
    pub chunk_tokens: usize,
    /// Tokens of text each chunk repeats from the end of the one before.
    #[serde(default = "default_chunk_overlap")]
    pub chunk_overlap_tokens: usize,
    /// The analyte lexicon (a file of the pipeline folder, or a path relative to it): a
    /// candidate that names none of its laboratory tests is set aside before the model.
    #[serde(default)]
    pub lexicon: Option<String>,
    /// The gold sets `medbatch eval` scores against (a folder of splits, relative to the
    /// pipeline folder; default `eval`): pipelines writing the same table share one.
    #[serde(default)]
    pub gold: Option<String>,
    /// Section mode (`unit = "section"`): the section headings (`heading <TAB> section`).
    #[serde(default)]
    pub sections: Option<String>,
    /// Section mode: the ConText trigger phrases deciding negation, experiencer and hedging
    /// of each mention (`phrase <TAB> category <TAB> direction`).
    #[serde(default)]
    pub context: Option<String>,
    /// Section mode: the status phrases of a mention's sentence (`phrase <TAB> kind <TAB>
    /// value`: a medication stopped or only recommended, a smoker who quit, a diabetes type).
    #[serde(default)]
    pub status: Option<String>,
    /// Generate pipelines: a document over `chunk_tokens` is not an error but summarized in
    /// pieces of whole paragraphs (then lines), and the pieces' sentences summarized again
    /// until one prompt holds them (map, then reduce); each final sentence's evidence is the
    /// quotes of the document its reduced sentences rest on.
    #[serde(default)]
    pub reduce: bool,
    /// Generate pipelines: a regular expression matching the heading line of each block of
    /// the document (e.g. `^Note (\S+) `); every sentence then lists, in `sources`, the
    /// first capture group of the headings above its evidence.
    #[serde(default)]
    pub source_heading: Option<String>,
}

impl Default for ExtractionSpec {
    fn default() -> Self {
        Self {
            parsers: Vec::new(),
            unit: ExtractionUnit::Line,
            chunk_tokens: default_chunk_tokens(),
            chunk_overlap_tokens: default_chunk_overlap(),
            lexicon: None,
            gold: None,
            sections: None,
            context: None,
            status: None,
            reduce: false,
            source_heading: None,
        }
    }
}

fn default_chunk_tokens() -> usize {
    4096
}

fn default_chunk_overlap() -> usize {
    256
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParserKind {
    /// HL7 v2 OBX segments.
    Hl7Obx,
    /// Pipe-, tab- or semicolon-delimited tables with a header row.
    DelimitedTable,
    /// Fixed-width (space-aligned) tables with a header row, two side by side included.
    FixedWidthTable,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtractionUnit {
    #[default]
    Line,
    Document,
    /// A note's sections (found by their heading lines), each read in a prompt of its own;
    /// the mentions the model copies from a section are assessed by rules (negation,
    /// experiencer, status) and gathered into the note's row. For small models.
    Section,
}

/// Model recommendations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub recommended: String,
}

fn default_kinds() -> Vec<InputKind> {
    vec![InputKind::Text, InputKind::Jsonl, InputKind::Csv, InputKind::Tar, InputKind::TarGz, InputKind::Zip]
}
fn default_id_field() -> String {
    "id".into()
}
fn default_text_field() -> String {
    "text".into()
}
/// 1 MiB: far above any lab report or clinical note; larger inputs are almost always
/// misrouted binaries.
/// 1 MiB: the largest document accepted unless the spec says otherwise.
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 1 << 20;

fn default_max_document_bytes() -> u64 {
    DEFAULT_MAX_DOCUMENT_BYTES
}
fn default_max_new_tokens() -> u32 {
    128
}

impl PipelineSpec {
    /// Parses and validates a spec.
    pub fn from_toml(s: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(s)?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), SpecError> {
        let seg_ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        };
        if !seg_ok(&self.output.table) || self.output.table.starts_with('_') {
            return Err(SpecError::Invalid(format!(
                "output.table {:?} must be letters, digits, '_' or '-' and not start with '_'",
                self.output.table
            )));
        }
        if self.input.kinds.is_empty() {
            return Err(SpecError::Invalid("input.kinds is empty".into()));
        }
        if self.task == Task::Generate
            && (self.output.rows != RowMode::PerDocument
                || self.output.evidence.is_some()
                || self.output.evidence_map.is_some())
        {
            return Err(SpecError::Invalid(
                "task = \"generate\" writes one row per document (rows = \"per_document\"), its evidence in each sentence: no output.evidence or evidence_map".into(),
            ));
        }
        let g = &self.generation;
        if !(g.temperature >= 0.0 && g.temperature.is_finite() && g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(SpecError::Invalid("generation: temperature must be >= 0 and top_p in (0, 1]".into()));
        }
        if self.generation.max_new_tokens == 0 {
            return Err(SpecError::Invalid("generation.max_new_tokens must be > 0".into()));
        }
        if self.task.needs_prompt() && (self.prompt.template.is_empty() || self.prompt.schema.is_empty()) {
            return Err(SpecError::Invalid("[prompt] needs a template and a schema".into()));
        }
        for f in [&self.prompt.template, &self.prompt.schema] {
            if f.contains("..") || f.starts_with('/') {
                return Err(SpecError::Invalid(format!("{f:?} must be a file inside the pipeline folder")));
            }
        }
        if let Some(p) = &self.patients {
            let structured = self.task == Task::Structured && self.output.rows == RowMode::PerDocument;
            let patient = self.input.patient_field.is_some() || self.input.patient_pattern.is_some();
            if !structured || self.output.evidence_map.is_none() || !patient {
                return Err(SpecError::Invalid(
                    "[patients] goes with a structured pipeline, one row per document with an output.evidence_map, whose input names a patient (input.patient_field or patient_pattern)".into(),
                ));
            }
            let mut names = std::collections::HashSet::new();
            for t in [&p.table, &p.members_table] {
                if !seg_ok(t) || t.starts_with('_') || *t == self.output.table || !names.insert(t.as_str()) {
                    return Err(SpecError::Invalid(format!(
                        "patients: table {t:?} must be letters, digits, '_' or '-', not start with '_', and differ from the other tables"
                    )));
                }
            }
            let mut cohorts = std::collections::HashSet::new();
            for c in &p.cohorts {
                if c.name.trim().is_empty() || !cohorts.insert(c.name.as_str()) || c.criteria.trim().is_empty() {
                    return Err(SpecError::Invalid(format!(
                        "patients.cohorts: {:?} needs a unique name and criteria",
                        c.name
                    )));
                }
            }
        }
        if let Some(p) = &self.patient_notes {
            let generate = self.task == Task::Generate && self.output.rows == RowMode::PerDocument;
            let patient = self.input.patient_field.is_some() || self.input.patient_pattern.is_some();
            if !generate || !patient {
                return Err(SpecError::Invalid(
                    "[patient_notes] goes with a generate pipeline, one row per document, whose input names a patient (input.patient_field or patient_pattern)".into(),
                ));
            }
            if !seg_ok(&p.table) || p.table.starts_with('_') || p.table == self.output.table {
                return Err(SpecError::Invalid(format!(
                    "patient_notes: table {:?} must be letters, digits, '_' or '-', not start with '_', and differ from output.table",
                    p.table
                )));
            }
        }
        let x = &self.extraction;
        if (x.reduce || x.source_heading.is_some()) && self.task != Task::Generate {
            return Err(SpecError::Invalid("extraction.reduce and source_heading go with task = \"generate\"".into()));
        }
        let section_files = [&x.sections, &x.context, &x.status];
        if x.unit == ExtractionUnit::Section {
            if self.task != Task::Structured || self.output.rows != RowMode::PerDocument {
                return Err(SpecError::Invalid(
                    "extraction.unit = \"section\" goes with task = \"structured\" and rows = \"per_document\"".into(),
                ));
            }
            if section_files.iter().any(|f| f.is_none()) || self.output.schema.is_none() {
                return Err(SpecError::Invalid(
                    "extraction.unit = \"section\" needs extraction.sections, extraction.context, extraction.status and output.schema (the row the mentions fill)".into(),
                ));
            }
        } else if section_files.iter().any(|f| f.is_some()) {
            return Err(SpecError::Invalid(
                "extraction.sections, context and status go with extraction.unit = \"section\"".into(),
            ));
        }
        if !(self.generation.thinking.is_empty() || self.generation.thinking.len() == 2) {
            return Err(SpecError::Invalid(
                "generation.thinking names two special tokens (where a thinking trace starts and ends), or none".into(),
            ));
        }
        match (&self.localize, self.task) {
            (None, Task::Localize) => {
                return Err(SpecError::Invalid("task = \"localize\" needs a [localize] section".into()))
            }
            (Some(_), t) if t != Task::Localize => {
                return Err(SpecError::Invalid("a [localize] section goes with task = \"localize\"".into()))
            }
            (Some(l), _) => {
                if l.objects.is_empty() || l.objects.iter().any(|o| o.trim().is_empty()) {
                    return Err(SpecError::Invalid("localize.objects needs at least one object, none empty".into()));
                }
                match &self.imaging {
                    Some(i) if matches!(i.unit, ImagingUnit::Study | ImagingUnit::Series) => {
                        if i.pad_to_square {
                            return Err(SpecError::Invalid(
                                "a localization pipeline pads images itself (localize.pad_to_square), to map boxes back: leave imaging.pad_to_square false".into(),
                            ));
                        }
                    }
                    _ => {
                        return Err(SpecError::Invalid(
                            "task = \"localize\" reads images: it needs [imaging] with unit = \"study\" or \"series\""
                                .into(),
                        ))
                    }
                }
            }
            (None, _) => {}
        }
        match (&self.embed, self.task) {
            (None, Task::Embed) => return Err(SpecError::Invalid("task = \"embed\" needs an [embed] section".into())),
            (Some(_), t) if t != Task::Embed => {
                return Err(SpecError::Invalid("an [embed] section goes with task = \"embed\"".into()))
            }
            (Some(e), _) => {
                if e.dimensions == 0 {
                    return Err(SpecError::Invalid("embed.dimensions must be > 0".into()));
                }
                let mut names = std::collections::HashSet::new();
                for l in &e.labels {
                    let ok = !l.name.is_empty() && l.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok || !names.insert(l.name.as_str()) || l.text.trim().is_empty() {
                        return Err(SpecError::Invalid(format!(
                            "embed.labels: {:?} needs a unique name of letters, digits and '_' and a text",
                            l.name
                        )));
                    }
                }
                if self.imaging.is_none() && !e.labels.is_empty() {
                    return Err(SpecError::Invalid(
                        "embed.labels score images: a text embedding pipeline (no [imaging]) has none".into(),
                    ));
                }
            }
            (None, _) => {}
        }
        let imaging_kinds = self.input.kinds.iter().any(|k| k.is_imaging());
        match &self.imaging {
            Some(i) => {
                let tiles = i.unit == ImagingUnit::Tiles;
                if self.task == Task::Tiles && !tiles {
                    return Err(SpecError::Invalid("task = \"tiles\" needs imaging.unit = \"tiles\"".into()));
                }
                if tiles && !matches!(self.task, Task::Tiles | Task::Embed) {
                    return Err(SpecError::Invalid(
                        "imaging.unit = \"tiles\" goes with task = \"tiles\" (the tile table) or \"embed\" (an embedding a tile)"
                            .into(),
                    ));
                }
                if !tiles && !matches!(self.task, Task::Structured | Task::Embed | Task::Localize) {
                    return Err(SpecError::Invalid(
                        "imaging pipelines are `structured`, `embed`, `localize` or `tiles`".into(),
                    ));
                }
                if i.slide.group == SlideGroup::Case && i.unit != ImagingUnit::Slide {
                    return Err(SpecError::Invalid(
                        "imaging.slide.group = \"case\" needs imaging.unit = \"slide\"".into(),
                    ));
                }
                if i.slide.tiles_per_job == 0 {
                    return Err(SpecError::Invalid("imaging.slide.tiles_per_job must be > 0".into()));
                }
                if self.input.kinds.iter().any(|k| !k.is_imaging()) {
                    return Err(SpecError::Invalid("imaging pipelines read only dicom, image and nifti inputs".into()));
                }
                if i.max_images == 0 {
                    return Err(SpecError::Invalid("imaging.max_images must be > 0".into()));
                }
                if i.unit == ImagingUnit::PriorCurrent && self.input.kinds != [crate::job::InputKind::Dicom] {
                    return Err(SpecError::Invalid(
                        "imaging.unit = \"prior_current\" pairs DICOM studies: input.kinds must be [\"dicom\"]".into(),
                    ));
                }
            }
            None if self.task == Task::Tiles => {
                return Err(SpecError::Invalid(
                    "task = \"tiles\" needs an [imaging] section with unit = \"tiles\"".into(),
                ));
            }
            None if imaging_kinds => {
                return Err(SpecError::Invalid("dicom, image and nifti inputs need an [imaging] section".into()));
            }
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        name = "x"
        version = "1"
        task = "extract"
        [input]
        [output]
        table = "rows"
        [prompt]
        template = "prompt.j2"
        schema = "schema.json"
    "#;

    #[test]
    fn defaults_apply() {
        let s = PipelineSpec::from_toml(MIN).unwrap();
        assert_eq!(s.input.text_field, "text");
        assert_eq!(s.output.rows, RowMode::PerItem);
        assert_eq!(s.prompt.format, PromptFormat::Raw);
        assert_eq!(s.extraction.unit, ExtractionUnit::Line);
    }

    #[test]
    fn sampling_settings() {
        let s = PipelineSpec::from_toml(&format!("{MIN}\n[generation]\ntemperature = 0.7\ntop_k = 40\ntop_p = 0.9\n"))
            .unwrap();
        assert_eq!((s.generation.temperature, s.generation.top_k, s.generation.top_p), (0.7, 40, 0.9));
        assert_eq!(PipelineSpec::from_toml(MIN).unwrap().generation.temperature, 0.0);
        assert!(PipelineSpec::from_toml(&format!("{MIN}\n[generation]\ntop_p = 0.0\n")).is_err());
        assert!(PipelineSpec::from_toml(&format!("{MIN}\n[generation]\ntemperature = -1.0\n")).is_err());
    }

    #[test]
    fn rejects_bad_table_and_unknown_keys() {
        let bad = MIN.replace("table = \"rows\"", "table = \"../x\"");
        assert!(PipelineSpec::from_toml(&bad).is_err());
        let unk = format!("{MIN}\n[generation]\nbeam_width = 4\n");
        assert!(PipelineSpec::from_toml(&unk).is_err());
    }

    #[test]
    fn generate_writes_one_row_per_document_with_its_own_evidence() {
        let generate = MIN.replace("task = \"extract\"", "task = \"generate\"");
        let spec =
            PipelineSpec::from_toml(&generate.replace("table = \"rows\"", "table = \"rows\"\nrows = \"per_document\""));
        assert!(spec.is_ok(), "{spec:?}");
        let e = PipelineSpec::from_toml(&generate).unwrap_err();
        assert!(e.to_string().contains("per_document"), "{e}");
    }

    /// An imaging spec with `task`, `unit` and `extra` sections.
    fn imaging(task: &str, unit: &str, extra: &str) -> Result<PipelineSpec, SpecError> {
        PipelineSpec::from_toml(&format!(
            "name = \"x\"\nversion = \"1\"\ntask = \"{task}\"\n[input]\nkinds = [\"dicom\", \"image\"]\n\
             [output]\ntable = \"rows\"\n[prompt]\ntemplate = \"p.j2\"\nschema = \"s.json\"\n\
             [imaging]\nunit = \"{unit}\"\n{extra}"
        ))
    }

    #[test]
    fn tiles_go_with_the_tile_table_and_tile_embeddings_only() {
        assert!(imaging("tiles", "tiles", "").is_ok());
        assert!(imaging("embed", "tiles", "[embed]\ndimensions = 8\n").is_ok());
        let e = imaging("structured", "tiles", "").unwrap_err();
        assert!(e.to_string().contains("task = \"tiles\""), "{e}");
        assert!(imaging("tiles", "study", "").is_err());
    }

    #[test]
    fn localize_needs_objects_and_leaves_the_padding_to_itself() {
        let l = "[localize]\nobjects = [\"heart\"]\n";
        let s = imaging("localize", "study", l).unwrap();
        let spec = s.localize.unwrap();
        assert!(spec.pad_to_square, "padded as Google's notebook does, by default");
        assert_eq!(spec.reasoning_tokens, 512);
        assert!(imaging("localize", "study", "").unwrap_err().to_string().contains("[localize]"));
        let e = imaging("localize", "study", &format!("pad_to_square = true\n{l}")).unwrap_err();
        assert!(e.to_string().contains("imaging.pad_to_square"), "{e}");
        assert!(imaging("localize", "slide", l).is_err());
        assert!(imaging("localize", "study", "[localize]\nobjects = []\n").is_err());
        assert!(imaging("structured", "study", l).unwrap_err().to_string().contains("goes with"));
        let t = imaging("localize", "study", &format!("{l}[generation]\nthinking = [\"<a>\"]\n")).unwrap_err();
        assert!(t.to_string().contains("generation.thinking"), "{t}");
    }
}
