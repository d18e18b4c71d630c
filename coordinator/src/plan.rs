//! Planning: inputs → jobs.

use crate::CoordinatorError;
use medbatch_connectors::inputs::{self, FoundInput, InputSource};
use medbatch_connectors::queue::JobQueue;
use medbatch_connectors::store::ObjectStore;
use medbatch_formats::dicom::{read_header_from, DicomHeader};
use medbatch_formats::sniff::{looks_like_dicom, DICOM_PREAMBLE_BYTES};
use medbatch_formats::wsi::tissue::{PatchGrid, PatchParams};
use medbatch_formats::wsi::{Slide, WsiLimits};
use medbatch_schemas::pipeline::{ImagingSpec, ImagingUnit, SlideGroup};
use medbatch_schemas::tables::{done_key, done_prefix, plan_key};
use medbatch_schemas::{CaseRef, Digest, InputKind, InputRef, Job, ModelRef, PipelineRef, RunId, Selection};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::Read;

/// Archive members per job: enough to amortize opening the archive, few enough that a
/// killed worker loses little work and several workers share one archive.
pub const MEMBERS_PER_JOB: usize = 16;

/// What a run is planned from.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub run_id: RunId,
    pub pipeline: PipelineRef,
    pub model: ModelRef,
    /// Output root as given by the user (recorded in each job).
    pub output: String,
    /// Input arguments: files, folders, archives, local or `s3://`.
    pub inputs: Vec<String>,
    /// Where the inputs are read from.
    pub source: InputSource,
    /// An imaging pipeline's settings: DICOM files are then grouped into studies, series or
    /// prior/current pairs by their headers, one job each.
    pub imaging: Option<ImagingSpec>,
}

/// The stored plan `_runs/RUN/plan.json`: every job of the run. Planning again with the same
/// run id must produce the same plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedRun {
    pub run_id: RunId,
    pub pipeline: PipelineRef,
    pub model: ModelRef,
    pub jobs: Vec<Job>,
    /// Input files found.
    pub files: u64,
    /// Documents expected, where known at planning time (plain text files and archive
    /// members count one each; record files count one until read).
    pub units: u64,
    /// Planned with `--incremental` ([`crate::index::skip_committed`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incremental: bool,
    /// Inputs not planned: committed before with the same content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<medbatch_schemas::IndexedInput>,
    /// The committed content of inputs planned again because they changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<medbatch_schemas::IndexedInput>,
}

/// Documents a job is expected to give, as far as planning knows: an input file or slide
/// counts one (a slide on its first band), an archive's members one each.
pub fn job_units(job: &Job) -> u64 {
    job.inputs
        .iter()
        .map(|i| match &i.selection {
            Selection::Whole => 1,
            Selection::Members(m) => m.len() as u64,
            Selection::Tiles { first_row, .. } => u64::from(*first_row == 0),
        })
        .sum()
}

/// SHA-256 of an input's bytes (an S3 object is streamed through once).
fn sha256_file(source: &InputSource, f: &FoundInput) -> Result<Digest, CoordinatorError> {
    let mut file = source.open(&f.uri, f.size, f.etag.as_deref())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|source| inputs::InputsError::Io { path: f.uri.clone(), source })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::from_sha256(h.finalize()))
}

/// Discovers inputs and derives the run's jobs (blocking: reads input files to digest them
/// and archive directories to list members).
pub fn plan_run(cfg: &PlanConfig) -> Result<PlannedRun, CoordinatorError> {
    let mut found = Vec::new();
    for arg in &cfg.inputs {
        let files = cfg.source.expand(arg)?;
        if files.is_empty() {
            return Err(CoordinatorError::NoInputs(arg.clone()));
        }
        found.extend(files);
    }
    // The same file named twice (directly and through a folder) is one input.
    found.sort_by(|a, b| a.uri.cmp(&b.uri));
    found.dedup_by(|a, b| a.uri == b.uri);

    if let Some(imaging) = &cfg.imaging {
        return plan_imaging(cfg, imaging, &found);
    }
    let mut jobs = Vec::new();
    let mut units = 0u64;
    for f in &found {
        let sha256 = sha256_file(&cfg.source, f)?;
        let kind = InputKind::from_name(&f.uri);
        let base = whole_input(f, sha256, kind);
        let mut selections = vec![Selection::Whole];
        if kind.is_archive() {
            // A listing that fails leaves the whole archive to one job, whose worker reports
            // the damage as error rows.
            if let Ok(file) = cfg.source.open(&f.uri, f.size, f.etag.as_deref()) {
                if let Ok(listing) = medbatch_formats::archive::list(kind, file) {
                    let complete = !listing.truncated;
                    let names: Vec<String> = listing.members.into_iter().map(|m| m.name).collect();
                    if !names.is_empty() && complete {
                        units += names.len() as u64;
                        selections = names.chunks(MEMBERS_PER_JOB).map(|c| Selection::Members(c.to_vec())).collect();
                    } else {
                        units += 1;
                    }
                }
            }
        } else {
            units += 1;
        }
        for selection in selections {
            let input = InputRef { selection, ..base.clone() };
            jobs.push(Job::new(
                cfg.run_id.clone(),
                cfg.pipeline.clone(),
                cfg.model.clone(),
                vec![input],
                cfg.output.clone(),
            ));
        }
    }
    Ok(PlannedRun {
        run_id: cfg.run_id.clone(),
        pipeline: cfg.pipeline.clone(),
        model: cfg.model.clone(),
        jobs,
        files: found.len() as u64,
        units,
        incremental: false,
        skipped: Vec::new(),
        superseded: Vec::new(),
    })
}

/// Largest file packed with others into one job by [`group_small_files`].
pub const SMALL_FILE_BYTES: u64 = 64 * 1024;
/// Most bytes of small files in one job.
pub const SMALL_JOB_BYTES: u64 = 1 << 20;
/// Default small files per job: as many as archive members per job.
pub const SMALL_FILES_PER_JOB: usize = MEMBERS_PER_JOB;

/// Packs the jobs of one small file each (a whole text, JSONL, CSV or Parquet file under
/// [`SMALL_FILE_BYTES`]) into jobs of up to `per_job` files and [`SMALL_JOB_BYTES`], in the
/// plan's order (by URI), as archive members share a job: a job's fixed cost — its marker
/// check, its parts and marker written, the broker's round trips — is then shared by the
/// files. Other jobs stay as they are; `per_job` ≤ 1 changes nothing. Deterministic (the same
/// jobs give the same groups, and so the same job ids), so a run planned again finds its jobs.
/// An incremental plan is grouped after its unchanged inputs are skipped, so that a job never
/// mixes new inputs with committed ones.
pub fn group_small_files(plan: &mut PlannedRun, per_job: usize) {
    if per_job <= 1 {
        return;
    }
    let small = |j: &Job| {
        matches!(j.inputs.as_slice(), [i] if i.selection == Selection::Whole
            && i.size <= SMALL_FILE_BYTES
            && matches!(i.kind, InputKind::Text | InputKind::Jsonl | InputKind::Csv | InputKind::Parquet))
    };
    let (small_jobs, mut jobs): (Vec<Job>, Vec<Job>) = std::mem::take(&mut plan.jobs).into_iter().partition(small);
    let mut group: Vec<InputRef> = Vec::new();
    let mut bytes = 0;
    let flush = |group: &mut Vec<InputRef>, jobs: &mut Vec<Job>| {
        if !group.is_empty() {
            let inputs = std::mem::take(group);
            jobs.push(Job::new(
                plan.run_id.clone(),
                plan.pipeline.clone(),
                plan.model.clone(),
                inputs,
                small_jobs[0].output.clone(),
            ));
        }
    };
    for j in &small_jobs {
        let i = &j.inputs[0];
        if group.len() >= per_job || bytes + i.size > SMALL_JOB_BYTES {
            flush(&mut group, &mut jobs);
            bytes = 0;
        }
        bytes += i.size;
        group.push(i.clone());
    }
    flush(&mut group, &mut jobs);
    plan.jobs = jobs;
}

/// A reader that digests every byte read through it.
struct Digesting<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// One pass over an imaging input (one stream of an S3 object): its SHA-256, its kind, and
/// its DICOM header when it has a readable one. The kind is the extension's; a file without
/// an extension that carries the DICOM marker is DICOM (archives often store instances as
/// bare UIDs or numbers). The header is read from the same bytes as the digest, up to the
/// pixel data; the rest is read for the digest alone.
fn scan_imaging(
    source: &InputSource,
    f: &FoundInput,
) -> Result<(Digest, InputKind, Option<DicomHeader>), CoordinatorError> {
    let io_err = |source| inputs::InputsError::Io { path: f.uri.clone(), source };
    let mut r = Digesting { inner: source.open(&f.uri, f.size, f.etag.as_deref())?, hash: Sha256::new() };
    let (kind, header) = kind_and_header(f, &mut r)?;
    std::io::copy(&mut r, &mut std::io::sink()).map_err(io_err)?;
    Ok((Digest::from_sha256(r.hash.finalize()), kind, header))
}

/// An imaging input's kind and, for DICOM, its header, read from the start of `r` up to the
/// pixel data. The kind is the extension's; a file without an extension that carries the
/// DICOM marker is DICOM.
fn kind_and_header(f: &FoundInput, r: &mut impl Read) -> Result<(InputKind, Option<DicomHeader>), CoordinatorError> {
    let mut kind = InputKind::from_name(&f.uri);
    let base = f.uri.rsplit('/').next().unwrap_or(&f.uri);
    let bare = kind == InputKind::Unsupported && !base.contains('.');
    let mut header = None;
    if kind == InputKind::Dicom || bare {
        let mut head = Vec::new();
        r.take(DICOM_PREAMBLE_BYTES as u64 + 4)
            .read_to_end(&mut head)
            .map_err(|source| inputs::InputsError::Io { path: f.uri.clone(), source })?;
        if bare && looks_like_dicom(&head) {
            kind = InputKind::Dicom;
        }
        if kind == InputKind::Dicom {
            let stream = std::io::Cursor::new(head).chain(r);
            header = read_header_from(std::io::BufReader::new(stream), f.size).ok();
        }
    }
    Ok((kind, header))
}

/// The whole of a found input as a job's input.
fn whole_input(f: &FoundInput, sha256: Digest, kind: InputKind) -> InputRef {
    InputRef {
        uri: f.uri.clone(),
        size: f.size,
        sha256,
        kind,
        selection: Selection::Whole,
        etag: f.etag.clone(),
        case: None,
    }
}

/// One DICOM file with its header, for grouping.
struct Instance {
    input: InputRef,
    header: DicomHeader,
}

impl Instance {
    /// Order within a series or study: instance number, then the file's URI.
    fn order(&self) -> (i64, &str) {
        (self.header.instance_number.unwrap_or(i64::MAX), &self.input.uri)
    }
}

/// Imaging runs: DICOM headers (never pixels) group files into studies, series or
/// prior/current pairs of one patient's studies; every other input (PNG, JPEG, NIfTI, a
/// file whose header cannot be read, a kind the pipeline does not read) is a job alone, and
/// its worker reports what is wrong with it.
fn plan_imaging(cfg: &PlanConfig, imaging: &ImagingSpec, found: &[FoundInput]) -> Result<PlannedRun, CoordinatorError> {
    if matches!(imaging.unit, ImagingUnit::Slide | ImagingUnit::Tiles) {
        return plan_slides(cfg, imaging, found);
    }
    let mut singles: Vec<InputRef> = Vec::new();
    let mut instances: Vec<Instance> = Vec::new();
    for f in found {
        let (sha256, kind, header) = scan_imaging(&cfg.source, f)?;
        let input = whole_input(f, sha256, kind);
        let key_ok = |h: &DicomHeader| match imaging.unit {
            ImagingUnit::Series => !h.series_uid.is_empty(),
            _ => !h.study_uid.is_empty(),
        };
        match header {
            Some(header) if key_ok(&header) => instances.push(Instance { input, header }),
            _ => singles.push(input),
        }
    }
    let mut groups: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
    for i in instances {
        let key = match imaging.unit {
            ImagingUnit::Series | ImagingUnit::Slide | ImagingUnit::Tiles => i.header.series_uid.clone(),
            ImagingUnit::Study | ImagingUnit::PriorCurrent => i.header.study_uid.clone(),
        };
        groups.entry(key).or_default().push(i);
    }
    for g in groups.values_mut() {
        g.sort_by(|a, b| a.order().cmp(&b.order()));
    }
    let mut job_inputs: Vec<Vec<InputRef>> = Vec::new();
    if imaging.unit == ImagingUnit::PriorCurrent {
        // A patient's studies in date order; each study after the first is paired with the
        // one before it. A first study is a job alone (its worker reports that it has no
        // prior), as is a study without a patient id.
        let mut by_patient: BTreeMap<String, Vec<Vec<Instance>>> = BTreeMap::new();
        for (uid, g) in groups {
            let patient = g[0].header.patient_id.clone();
            let key = if patient.is_empty() { format!("\u{0}{uid}") } else { patient };
            by_patient.entry(key).or_default().push(g);
        }
        for studies in by_patient.values_mut() {
            studies.sort_by(|a, b| {
                (&a[0].header.study_date, &a[0].header.study_uid)
                    .cmp(&(&b[0].header.study_date, &b[0].header.study_uid))
            });
            for (k, study) in studies.iter().enumerate() {
                let mut inputs = Vec::new();
                if k > 0 {
                    inputs.extend(studies[k - 1].iter().map(|i| i.input.clone()));
                }
                inputs.extend(study.iter().map(|i| i.input.clone()));
                job_inputs.push(inputs);
            }
        }
    } else {
        job_inputs.extend(groups.into_values().map(|g| g.into_iter().map(|i| i.input).collect()));
    }
    job_inputs.extend(singles.into_iter().map(|i| vec![i]));
    Ok(one_unit_a_job(cfg, job_inputs, found.len()))
}

/// The plan of a run whose jobs are one unit each (imaging: a study, series or slide).
fn one_unit_a_job(cfg: &PlanConfig, job_inputs: Vec<Vec<InputRef>>, files: usize) -> PlannedRun {
    let jobs: Vec<Job> = job_inputs
        .into_iter()
        .map(|inputs| Job::new(cfg.run_id.clone(), cfg.pipeline.clone(), cfg.model.clone(), inputs, cfg.output.clone()))
        .collect();
    PlannedRun {
        run_id: cfg.run_id.clone(),
        pipeline: cfg.pipeline.clone(),
        model: cfg.model.clone(),
        units: jobs.len() as u64,
        jobs,
        files: files as u64,
        incremental: false,
        skipped: Vec::new(),
        superseded: Vec::new(),
    }
}

/// A slide file's identity from its header alone (`SlideInfo::identity`: ETag, size, header
/// digest), with its patch grid for `params`; a slide whose header cannot be read gets an
/// identity from its ETag, size and name, and its worker reports what is wrong with it.
fn slide_identity(source: &InputSource, f: &FoundInput, params: &PatchParams) -> (Digest, Option<PatchGrid>) {
    let etag = f.etag.as_deref();
    let slide =
        source.open_range(&f.uri, f.size, etag).ok().and_then(|src| Slide::open(src, &WsiLimits::default()).ok());
    match slide {
        // The patch grid comes from the same header (tile-level runs split by it).
        Some(slide) => (slide.info().identity(etag, f.size), slide.patch_grid(params).ok()),
        None => (
            Digest::of_bytes(format!("unreadable slide\n{}\n{}\n{}", etag.unwrap_or(""), f.size, f.uri).as_bytes()),
            None,
        ),
    }
}

/// Like [`kind_and_header`], reading only the header's bytes (in ranges of 256 KiB and up)
/// instead of a stream: DICOM whole-slide instances run to gigabytes.
fn dicom_kind_and_header(
    source: &InputSource,
    f: &FoundInput,
) -> Result<(InputKind, Option<DicomHeader>), CoordinatorError> {
    let mut kind = InputKind::from_name(&f.uri);
    let base = f.uri.rsplit('/').next().unwrap_or(&f.uri);
    let bare = kind == InputKind::Unsupported && !base.contains('.');
    if kind != InputKind::Dicom && !bare {
        return Ok((kind, None));
    }
    let src = source.open_range(&f.uri, f.size, f.etag.as_deref())?;
    let marker = (DICOM_PREAMBLE_BYTES as u64 + 4).min(f.size) as usize;
    let head = src.read_at(0, marker).map_err(|source| inputs::InputsError::Io { path: f.uri.clone(), source })?;
    if bare && looks_like_dicom(&head) {
        kind = InputKind::Dicom;
    }
    if kind != InputKind::Dicom {
        return Ok((kind, None));
    }
    // A header that cannot be read leaves the file to a job alone; its worker reports why.
    let header =
        medbatch_formats::wsi::dicom::header_prefix(&*src, medbatch_formats::wsi::DEFAULT_WSI_LIMITS.max_header_bytes)
            .ok()
            .and_then(|(prefix, at, _)| {
                let len = prefix.len() as u64;
                read_header_from(std::io::Cursor::new(&prefix[..at]), f.size.max(len)).ok()
            });
    Ok((kind, header))
}

/// Slide runs: an SVS or pyramidal TIFF file is a job; DICOM files are grouped by series
/// (a DICOM whole-slide image is the instances of one series), a job each. No slide is read
/// past its header: a slide's identity is its ETag, size and header digest, a DICOM
/// instance's its ETag, size and header fields (up to the pixel data). A tile-level
/// pipeline's slide is split into bands of its patch grid ([`tile_bands`]).
fn plan_slides(cfg: &PlanConfig, imaging: &ImagingSpec, found: &[FoundInput]) -> Result<PlannedRun, CoordinatorError> {
    let by_case = imaging.slide.group == SlideGroup::Case;
    let mut job_inputs: Vec<Vec<InputRef>> = Vec::new();
    // Series UID → (study UID, instances).
    let mut series: BTreeMap<String, (String, Vec<(i64, InputRef)>)> = BTreeMap::new();
    let mut manifest = Manifest::default();
    let mut slide_files = 0;
    // Patch grids of TIFF slides, read with their identity (tile-level runs split by them).
    let params = PatchParams::from_spec(imaging);
    let mut grids: BTreeMap<String, PatchGrid> = BTreeMap::new();
    for f in found {
        if by_case && InputKind::from_name(&f.uri) == InputKind::Csv {
            manifest.read(&cfg.source, f)?;
            continue;
        }
        slide_files += 1;
        // Nothing is streamed: DICOM headers and slide headers are read a range at a time.
        let (kind, header) = match InputKind::from_name(&f.uri) {
            InputKind::Slide => (InputKind::Slide, None),
            _ => dicom_kind_and_header(&cfg.source, f)?,
        };
        let sha256 = match (kind, &header) {
            (InputKind::Slide, _) => {
                let (identity, grid) = slide_identity(&cfg.source, f, &params);
                grids.extend(grid.map(|g| (f.uri.clone(), g)));
                identity
            }
            (InputKind::Dicom, Some(h)) => Digest::of_bytes(
                format!("dicom instance\n{}\n{}\n{h:?}", f.etag.as_deref().unwrap_or(""), f.size).as_bytes(),
            ),
            _ => sha256_file(&cfg.source, f)?,
        };
        let input = whole_input(f, sha256, kind);
        match header {
            Some(h) if !h.series_uid.is_empty() => {
                let entry = series.entry(h.series_uid.clone()).or_insert_with(|| (h.study_uid.clone(), Vec::new()));
                entry.1.push((h.instance_number.unwrap_or(i64::MAX), input));
            }
            _ => job_inputs.push(vec![input]),
        }
    }
    let mut studies: BTreeMap<String, String> = BTreeMap::new();
    for (study, mut g) in series.into_values() {
        g.sort_by(|a, b| (a.0, &a.1.uri).cmp(&(b.0, &b.1.uri)));
        if !study.is_empty() {
            studies.insert(g[0].1.uri.clone(), study);
        }
        job_inputs.push(g.into_iter().map(|(_, i)| i).collect());
    }
    if by_case {
        job_inputs.sort_by(|a, b| a[0].uri.cmp(&b[0].uri));
        return Ok(one_unit_a_job(cfg, group_cases(job_inputs, &manifest, &studies), slide_files));
    }
    job_inputs.sort_by(|a, b| a[0].uri.cmp(&b[0].uri));
    if imaging.unit != ImagingUnit::Tiles {
        return Ok(one_unit_a_job(cfg, job_inputs, slide_files));
    }
    let mut banded = Vec::new();
    for inputs in job_inputs {
        let grid = match inputs[0].kind {
            InputKind::Dicom => dicom_grid(&cfg.source, &params, &inputs),
            _ => grids.get(&inputs[0].uri).copied(),
        };
        for selection in tile_bands(grid, imaging.slide.tiles_per_job) {
            banded.push(inputs.iter().map(|i| InputRef { selection: selection.clone(), ..i.clone() }).collect());
        }
    }
    let mut plan = one_unit_a_job(cfg, banded, slide_files);
    // A slide's bands are parts of one unit.
    plan.units = plan
        .jobs
        .iter()
        .filter(|j| !matches!(j.inputs[0].selection, Selection::Tiles { first_row, .. } if first_row > 0))
        .count() as u64;
    Ok(plan)
}

/// Slide manifests of a run grouped by case: which case each slide belongs to, by the
/// slide's file name, URI or (for a DICOM slide) folder name.
#[derive(Default)]
struct Manifest {
    cases: BTreeMap<String, String>,
}

/// Largest manifest read: a line per slide of an archive is far below it.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

impl Manifest {
    /// Reads a manifest CSV: a header row with `slide` and `case` columns (other columns
    /// ignored), then a row per slide. A slide named twice with two cases is refused.
    fn read(&mut self, source: &InputSource, f: &FoundInput) -> Result<(), CoordinatorError> {
        let bad = |reason: String| CoordinatorError::Manifest { path: f.uri.clone(), reason };
        if f.size > MAX_MANIFEST_BYTES {
            return Err(bad(format!("{} bytes, over the limit of {MAX_MANIFEST_BYTES}", f.size)));
        }
        let file = source.open(&f.uri, f.size, f.etag.as_deref())?;
        let mut r = csv::ReaderBuilder::new().flexible(true).from_reader(file);
        let headers = r.headers().map_err(|e| bad(format!("header row: {e}")))?.clone();
        let column = |name: &str| {
            headers
                .iter()
                .position(|h| h.trim().eq_ignore_ascii_case(name))
                .ok_or_else(|| bad(format!("no `{name}` column (a manifest has `slide` and `case` columns)")))
        };
        let (slide, case) = (column("slide")?, column("case")?);
        for (line, record) in r.records().enumerate() {
            // Line numbers, never the values: they may name patients.
            let record = record.map_err(|e| bad(format!("line {}: {e}", line + 2)))?;
            let (Some(s), Some(c)) = (record.get(slide), record.get(case)) else {
                return Err(bad(format!("line {}: fewer columns than the header", line + 2)));
            };
            let (s, c) = (s.trim(), c.trim());
            if s.is_empty() || c.is_empty() {
                continue;
            }
            match self.cases.insert(s.to_string(), c.to_string()) {
                Some(before) if before != c => {
                    return Err(bad(format!("line {}: a slide named before with another case", line + 2)))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The case of a slide (its inputs), by URI, file name, or a DICOM slide's folder name.
    fn case_of(&self, inputs: &[InputRef]) -> Option<&String> {
        inputs.iter().find_map(|i| {
            let mut parts = i.uri.rsplit('/');
            let name = parts.next().unwrap_or(&i.uri);
            let folder = parts.next().filter(|_| i.kind == InputKind::Dicom);
            let path = i.uri.strip_prefix("file://");
            [Some(i.uri.as_str()), path, Some(name), folder].into_iter().flatten().find_map(|k| self.cases.get(k))
        })
    }
}

/// Slides grouped into cases: a manifest's case, else a DICOM slide's study; a slide with
/// neither is a job alone. Each input of a case carries the case id and its slide's place
/// in it (slides in URI order).
fn group_cases(
    slides: Vec<Vec<InputRef>>,
    manifest: &Manifest,
    studies: &BTreeMap<String, String>,
) -> Vec<Vec<InputRef>> {
    let mut cases: BTreeMap<String, Vec<Vec<InputRef>>> = BTreeMap::new();
    let mut alone = Vec::new();
    for slide in slides {
        match manifest.case_of(&slide).or_else(|| studies.get(&slide[0].uri)) {
            Some(case) => cases.entry(case.clone()).or_default().push(slide),
            None => alone.push(slide),
        }
    }
    let mut jobs: Vec<Vec<InputRef>> = cases
        .into_iter()
        .map(|(id, slides)| {
            slides
                .into_iter()
                .enumerate()
                .flat_map(|(k, inputs)| {
                    let case = CaseRef { id: id.clone(), slide: k as u32 };
                    inputs.into_iter().map(move |i| InputRef { case: Some(case.clone()), ..i })
                })
                .collect()
        })
        .collect();
    jobs.extend(alone);
    jobs.sort_by(|a, b| a[0].uri.cmp(&b[0].uri));
    jobs
}

/// A DICOM slide's patch grid, from the headers of its instances.
fn dicom_grid(source: &InputSource, params: &PatchParams, inputs: &[InputRef]) -> Option<PatchGrid> {
    let sources: Option<Vec<_>> =
        inputs.iter().map(|i| source.open_range(&i.uri, i.size, i.etag.as_deref()).ok()).collect();
    Slide::open_dicom(sources?, &WsiLimits::default()).ok()?.patch_grid(params).ok()
}

/// The bands of a slide's patch grid: whole grid rows, about `tiles_per_job` cells each (one
/// row at least). A slide without a grid (an unreadable header, no magnification, smaller
/// than a patch) is one job of the whole slide; its worker reports why.
fn tile_bands(grid: Option<PatchGrid>, tiles_per_job: u64) -> Vec<Selection> {
    match grid {
        Some(g) if g.cols > 0 && g.rows > 0 => {
            let per_job = (tiles_per_job / g.cols).max(1);
            (0..g.rows)
                .step_by(per_job as usize)
                .map(|first_row| Selection::Tiles {
                    level: g.level as u32,
                    first_row,
                    rows: per_job.min(g.rows - first_row),
                })
                .collect()
        }
        _ => vec![Selection::Whole],
    }
}

/// Records the plan (or checks it against the one recorded by an earlier attempt of the
/// same run), then publishes every job that has no completion marker yet. Returns the ids
/// of the jobs published and the number already done.
pub async fn publish_pending(
    plan: &PlannedRun,
    store: &dyn ObjectStore,
    queue: &dyn JobQueue,
) -> Result<(Vec<medbatch_schemas::JobId>, usize), CoordinatorError> {
    let key = plan_key(&plan.run_id);
    let bytes = serde_json::to_vec_pretty(plan).expect("plan serializes");
    let new_run = store.put_if_absent(&key, bytes.into()).await?;
    if !new_run {
        let existing = store.get(&key).await?.unwrap_or_default();
        let earlier: PlannedRun = serde_json::from_slice(&existing)
            .map_err(|e| CoordinatorError::Corrupt { key: key.clone(), reason: e.to_string() })?;
        let ids = |p: &PlannedRun| p.jobs.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>();
        if ids(&earlier) != ids(plan) || earlier.pipeline != plan.pipeline || earlier.model != plan.model {
            return Err(CoordinatorError::PlanMismatch { run_id: plan.run_id.to_string() });
        }
    }
    // One listing of the markers rather than a request per job.
    let markers: std::collections::HashSet<String> =
        store.list(&done_prefix(&plan.run_id)).await?.into_iter().collect();
    let (pending, done): (Vec<&Job>, Vec<&Job>) =
        plan.jobs.iter().partition(|j| !markers.contains(&done_key(&j.run_id, &j.job_id)));
    let pending: Vec<Job> = pending.into_iter().cloned().collect();
    // A run planned just now has had no job published: its jobs' first deliveries need no
    // marker check.
    if new_run {
        queue.publish_new_run(&pending).await?;
    } else {
        queue.publish_batch(&pending).await?;
    }
    Ok((pending.into_iter().map(|j| j.job_id).collect(), done.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medbatch_connectors::queue::InProcessQueue;
    use medbatch_connectors::store::LocalStore;

    fn cfg(inputs: Vec<String>, run: &str) -> PlanConfig {
        PlanConfig {
            run_id: RunId::new(run).unwrap(),
            pipeline: PipelineRef { name: "p".into(), version: "1".into(), digest: Digest::of_bytes(b"p") },
            model: ModelRef { id: "m".into(), digest: Digest::of_bytes(b"m") },
            output: "/out".into(),
            inputs,
            source: InputSource::local(),
            imaging: None,
        }
    }

    fn write_tar(path: &std::path::Path, n: usize) {
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        for i in 0..n {
            let data = format!("doc {i}");
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("r{i:03}.txt"), data.as_bytes()).unwrap();
        }
        b.finish().unwrap();
    }

    #[test]
    fn small_files_share_jobs_and_the_rest_keep_their_own() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..40 {
            std::fs::write(d.path().join(format!("n{i:02}.txt")), format!("note {i}")).unwrap();
        }
        std::fs::write(d.path().join("big.txt"), "x".repeat(SMALL_FILE_BYTES as usize + 1)).unwrap();
        std::fs::write(d.path().join("records.jsonl"), "{}\n").unwrap();
        write_tar(&d.path().join("t.tar"), 3);
        let arg = d.path().to_str().unwrap().to_string();
        let whole = plan_run(&cfg(vec![arg.clone()], "r")).unwrap();
        assert_eq!(whole.jobs.len(), 43);
        let mut one = whole.clone();
        group_small_files(&mut one, 1);
        assert_eq!(one, whole, "one file per job: nothing changes");
        let mut grouped = whole.clone();
        group_small_files(&mut grouped, 16);
        let sizes: Vec<usize> = grouped.jobs.iter().map(|j| j.inputs.len()).collect();
        // The big file and the archive alone; 41 small files (40 notes and the JSONL) by 16.
        assert_eq!(sizes, [1, 1, 16, 16, 9], "{sizes:?}");
        let files: Vec<&str> = grouped.jobs.iter().flat_map(|j| &j.inputs).map(|i| i.uri.as_str()).collect();
        assert_eq!(files.len(), 43, "every input once");
        let mut again = plan_run(&cfg(vec![arg], "r")).unwrap();
        group_small_files(&mut again, 16);
        assert_eq!(again, grouped, "grouping is deterministic: the same job ids");
        // The byte limit: 60 KiB files, seventeen to a MiB.
        let e = tempfile::tempdir().unwrap();
        for i in 0..20 {
            std::fs::write(e.path().join(format!("m{i:02}.csv")), vec![b'a'; 60 * 1024]).unwrap();
        }
        let mut p = plan_run(&cfg(vec![e.path().to_str().unwrap().into()], "r")).unwrap();
        group_small_files(&mut p, 100);
        let sizes: Vec<usize> = p.jobs.iter().map(|j| j.inputs.len()).collect();
        assert_eq!(sizes, [17, 3]);
    }

    #[test]
    fn replanning_gives_the_same_jobs_and_archives_split_by_members() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.txt"), "x").unwrap();
        write_tar(&d.path().join("b.tar"), MEMBERS_PER_JOB + 3);
        let arg = d.path().to_str().unwrap().to_string();
        let p1 = plan_run(&cfg(vec![arg.clone(), format!("{arg}/a.txt")], "r")).unwrap();
        let p2 = plan_run(&cfg(vec![arg.clone()], "r")).unwrap();
        assert_eq!(p1, p2, "the same file named twice is one input; planning is deterministic");
        assert_eq!(p1.files, 2);
        assert_eq!(p1.jobs.len(), 3, "one text job, two archive jobs");
        assert_eq!(p1.units, 1 + MEMBERS_PER_JOB as u64 + 3);
        let p3 = plan_run(&cfg(vec![arg], "other")).unwrap();
        assert_ne!(p1.jobs[0].job_id, p3.jobs[0].job_id, "job ids depend on the run id");
        assert!(matches!(plan_run(&cfg(vec!["/nonexistent/x".into()], "r")), Err(CoordinatorError::Input(_))));
    }

    fn imaging(unit: ImagingUnit, folder: &str) -> PlannedRun {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/imaging").join(folder);
        let spec = ImagingSpec {
            unit,
            modalities: Vec::new(),
            max_images: 85,
            pad_to_square: false,
            max_decoded_bytes: medbatch_schemas::pipeline::DEFAULT_MAX_DECODED_BYTES,
            slide: Default::default(),
        };
        let c = PlanConfig { imaging: Some(spec), ..cfg(vec![dir.to_str().unwrap().into()], "r") };
        plan_run(&c).unwrap()
    }

    fn names(job: &Job) -> Vec<&str> {
        job.inputs.iter().map(|i| i.uri.rsplit('/').next().unwrap()).collect()
    }

    #[test]
    fn slides_are_planned_from_their_headers_one_job_each() {
        // Synthetic slides written by the whole-slide oracle (tifffile, pydicom).
        let python =
            std::env::var("MEDBATCH_PYTHON").expect("MEDBATCH_PYTHON: run the tests through `bash infra/test.sh`");
        let oracle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../formats/tests/support/wsi_oracle.py");
        let d = tempfile::tempdir().unwrap();
        let o = std::process::Command::new(python).arg(oracle).arg("make").arg(d.path()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let c = slide_plan(d.path());
        let p = plan_run(&c).unwrap();
        // Eight TIFF and SVS files, four DICOM slides of three instances each.
        assert_eq!(p.files, 8 + 4 * 3);
        assert_eq!(p.jobs.len(), 8 + 4, "{:?}", p.jobs.iter().map(names).collect::<Vec<_>>());
        let dicom: Vec<&Job> = p.jobs.iter().filter(|j| j.inputs[0].kind == InputKind::Dicom).collect();
        assert_eq!(dicom.len(), 4);
        for j in &dicom {
            assert_eq!(names(j), ["level-0.dcm", "level-1.dcm", "level-2.dcm"], "instances in instance-number order");
        }
        // A slide's identity comes from its header, not from digesting its bytes.
        let svs = p.jobs.iter().find(|j| j.inputs[0].uri.ends_with("aperio-j2k-rgb.svs")).unwrap();
        let path = d.path().join("aperio-j2k-rgb.svs");
        let size = std::fs::metadata(&path).unwrap().len();
        let slide = medbatch_formats::wsi::Slide::open(
            medbatch_formats::wsi::FileSource::open(&path).unwrap(),
            &medbatch_formats::wsi::WsiLimits::default(),
        )
        .unwrap();
        assert_eq!(svs.inputs[0].kind, InputKind::Slide);
        assert_eq!(svs.inputs[0].sha256, slide.info().identity(None, size));
        assert_ne!(svs.inputs[0].sha256, Digest::of_bytes(&std::fs::read(&path).unwrap()));
        assert_eq!(p, plan_run(&c).unwrap(), "planning is deterministic");

        // A tile-level pipeline: each slide's 7 x 5 grid (64-px tiles at 10x) in bands of
        // whole rows of about 16 cells (two rows), a job each; DICOM slides too.
        let mut spec = c.imaging.clone().unwrap();
        spec.unit = ImagingUnit::Tiles;
        spec.slide.patch = 64;
        spec.slide.stride = 64;
        spec.slide.tiles_per_job = 16;
        let t = PlanConfig { imaging: Some(spec), ..c.clone() };
        let tp = plan_run(&t).unwrap();
        assert_eq!(tp.units, 8 + 4, "a slide is one unit, whatever its bands");
        let bands = |name: &str| -> Vec<Selection> {
            tp.jobs.iter().filter(|j| j.inputs[0].uri.ends_with(name)).map(|j| j.inputs[0].selection.clone()).collect()
        };
        let want = |level| {
            vec![
                Selection::Tiles { level, first_row: 0, rows: 2 },
                Selection::Tiles { level, first_row: 2, rows: 2 },
                Selection::Tiles { level, first_row: 4, rows: 1 },
            ]
        };
        assert_eq!(bands("jpeg-ycbcr.tiff"), want(1));
        assert_eq!(bands("aperio-j2k-rgb.svs"), want(1));
        let dicom: Vec<&Job> = tp.jobs.iter().filter(|j| j.inputs[0].kind == InputKind::Dicom).collect();
        assert_eq!(dicom.len(), 4 * 3);
        for j in &dicom {
            assert_eq!(names(j), ["level-0.dcm", "level-1.dcm", "level-2.dcm"]);
            assert!(j.inputs.iter().all(|i| i.selection == j.inputs[0].selection), "one band for the slide's files");
        }
        // Every band is its own job, with its own id.
        let ids: std::collections::HashSet<_> = tp.jobs.iter().map(|j| j.job_id.clone()).collect();
        assert_eq!(ids.len(), tp.jobs.len());
        assert_eq!(tp, plan_run(&t).unwrap(), "planning is deterministic");
    }

    /// The oracle's synthetic slides (`make`) and a DICOM case of two slides (`make-case`)
    /// in one folder.
    fn slides_folder() -> tempfile::TempDir {
        let python =
            std::env::var("MEDBATCH_PYTHON").expect("MEDBATCH_PYTHON: run the tests through `bash infra/test.sh`");
        let oracle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../formats/tests/support/wsi_oracle.py");
        let d = tempfile::tempdir().unwrap();
        for (cmd, sub) in [("make", ""), ("make-case", "case")] {
            let at = d.path().join(sub);
            let o = std::process::Command::new(&python).arg(&oracle).arg(cmd).arg(&at).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        d
    }

    /// A slide-level run (the pathology recipe's defaults) over `folder`.
    fn slide_plan(folder: &std::path::Path) -> PlanConfig {
        let spec = ImagingSpec {
            unit: ImagingUnit::Slide,
            modalities: Vec::new(),
            max_images: 125,
            pad_to_square: false,
            max_decoded_bytes: medbatch_schemas::pipeline::DEFAULT_MAX_DECODED_BYTES,
            slide: Default::default(),
        };
        PlanConfig { imaging: Some(spec), ..cfg(vec![folder.to_str().unwrap().into()], "r") }
    }

    fn by_case(folder: &std::path::Path) -> PlanConfig {
        let mut c = slide_plan(folder);
        c.imaging.as_mut().expect("imaging").slide.group = SlideGroup::Case;
        c
    }

    #[test]
    fn slides_are_grouped_into_cases_by_a_manifest_or_their_dicom_study() {
        let d = slides_folder();
        // By file name, by path, and a DICOM slide by its folder; a line for a slide not in
        // the run, and an extra column.
        let tiff = d.path().join("jpeg-ycbcr.tiff");
        std::fs::write(
            d.path().join("cases.csv"),
            format!(
                "Slide,stain,Case\n{},HE,S-1\naperio-j2k-rgb.svs,HE,S-1\ndicom-jpeg-bot,HE,S-2\nraw.tiff,IHC,S-2\nelsewhere.svs,HE,S-9\n",
                tiff.display()
            ),
        )
        .unwrap();
        let p = plan_run(&by_case(d.path())).unwrap();
        let case_of = |j: &Job| j.inputs[0].case.as_ref().map(|c| c.id.clone());
        let job = |id: &str| p.jobs.iter().find(|j| case_of(j).as_deref() == Some(id)).unwrap();
        let slides = |j: &Job| -> Vec<(String, u32)> {
            j.inputs.iter().map(|i| (names_of(i), i.case.as_ref().unwrap().slide)).collect()
        };
        assert_eq!(slides(job("S-1")), [("aperio-j2k-rgb.svs".into(), 0), ("jpeg-ycbcr.tiff".into(), 1)]);
        assert_eq!(
            slides(job("S-2")),
            [
                ("dicom-jpeg-bot/level-0.dcm".into(), 0),
                ("dicom-jpeg-bot/level-1.dcm".into(), 0),
                ("dicom-jpeg-bot/level-2.dcm".into(), 0),
                ("raw.tiff".into(), 1)
            ]
        );
        // The two DICOM slides of one study are a case, by their headers.
        let study: Vec<&Job> = p.jobs.iter().filter(|j| j.inputs.len() == 6).collect();
        assert_eq!(study.len(), 1, "{:?}", p.jobs.iter().map(names).collect::<Vec<_>>());
        let parts: Vec<(String, u32)> = slides(study[0]);
        assert_eq!(parts.iter().filter(|s| s.0.starts_with("a/") && s.1 == 0).count(), 3, "{parts:?}");
        assert_eq!(parts.iter().filter(|s| s.0.starts_with("b/") && s.1 == 1).count(), 3, "{parts:?}");
        // The other TIFF files are slides alone; the manifest is not an input.
        let alone: Vec<&Job> = p.jobs.iter().filter(|j| case_of(j).is_none()).collect();
        assert!(alone.iter().all(|j| j.inputs.len() == 1 && j.inputs[0].kind == InputKind::Slide));
        assert_eq!(alone.len(), 8 - 3);
        assert_eq!(p.files, 8 + 4 * 3 + 2 * 3);
        // Other DICOM slides: a study each, a case of one slide.
        assert_eq!(p.jobs.len(), 2 + 1 + 3 + alone.len());
        assert_eq!(p, plan_run(&by_case(d.path())).unwrap(), "planning is deterministic");

        // A manifest that cannot be used stops planning, naming it and the line (never a value).
        for (csv, why) in [
            ("slide,specimen\nraw.tiff,S-1\n", "no `case` column"),
            ("slide,case\nraw.tiff,S-1\nraw.tiff,S-7\n", "line 3: a slide named before with another case"),
        ] {
            std::fs::write(d.path().join("cases.csv"), csv).unwrap();
            let e = plan_run(&by_case(d.path())).unwrap_err().to_string();
            assert!(e.contains("cases.csv") && e.contains(why), "{e}");
            assert!(!e.contains("S-7"), "{e}");
        }
    }

    /// An input's path below the test folder.
    fn names_of(i: &InputRef) -> String {
        let mut parts: Vec<&str> = i.uri.rsplit('/').take(2).collect();
        parts.reverse();
        if i.kind == InputKind::Dicom {
            parts.join("/")
        } else {
            parts[1].to_string()
        }
    }

    #[test]
    fn dicom_files_are_grouped_by_their_headers() {
        // Studies: PAT-A's two, PAT-B's (a file without an extension, found by its DICM
        // marker), and the unreadable text file alone; the truncated copy of PAT-A's current
        // image has a readable header and joins that study.
        let p = imaging(ImagingUnit::Study, "cxr");
        assert_eq!(p.files, 5);
        let mut jobs: Vec<Vec<&str>> = p.jobs.iter().map(names).collect();
        jobs.sort();
        assert_eq!(
            jobs,
            vec![
                vec!["PAT-B-DX-0001"],
                vec!["not-dicom.dcm"],
                vec!["pat-a-2025-01-10.dcm"],
                // Same instance number: ordered by URI (`broken/…` first).
                vec!["truncated.dcm", "pat-a-2025-06-02.dcm"],
            ]
        );
        assert!(p
            .jobs
            .iter()
            .flat_map(|j| &j.inputs)
            .filter(|i| !i.uri.ends_with("not-dicom.dcm"))
            .all(|i| i.kind == InputKind::Dicom));
        // Prior and current: PAT-A's first study alone, then both of PAT-A's studies.
        let p = imaging(ImagingUnit::PriorCurrent, "cxr");
        let jobs: Vec<Vec<&str>> = p.jobs.iter().map(names).collect();
        assert!(jobs.contains(&vec!["pat-a-2025-01-10.dcm"]));
        assert!(jobs.contains(&vec!["pat-a-2025-01-10.dcm", "truncated.dcm", "pat-a-2025-06-02.dcm"]), "{jobs:?}");
        assert_eq!(p.jobs.len(), 4);
        // A series: one job of 24 files in instance-number order (not file-name order).
        let p = imaging(ImagingUnit::Series, "ct");
        assert_eq!(p.jobs.len(), 1);
        let n = names(&p.jobs[0]);
        assert_eq!(n.len(), 24);
        assert_eq!(&n[..3], ["slice-00.dcm", "slice-07.dcm", "slice-14.dcm"]);
        assert_eq!(p, imaging(ImagingUnit::Series, "ct"), "planning is deterministic");
        // Digests come from the same pass as the headers: each is the file's SHA-256.
        for p in [imaging(ImagingUnit::Study, "cxr"), p] {
            for i in p.jobs.iter().flat_map(|j| &j.inputs) {
                let bytes = std::fs::read(i.uri.strip_prefix("file://").unwrap()).unwrap();
                assert_eq!(i.sha256, Digest::from_sha256(Sha256::digest(&bytes)), "{}", i.uri);
            }
        }
    }

    #[tokio::test]
    async fn publishing_is_resumable_and_refuses_a_different_plan() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.txt"), "x").unwrap();
        std::fs::write(d.path().join("b.txt"), "y").unwrap();
        let out = tempfile::tempdir().unwrap();
        let store = LocalStore::create(out.path()).unwrap();
        let plan = plan_run(&cfg(vec![d.path().to_str().unwrap().into()], "r")).unwrap();
        let q = InProcessQueue::new();
        let (published, done) = publish_pending(&plan, &store, &q).await.unwrap();
        assert_eq!((published.len(), done), (2, 0));
        // One job finishes; planning again publishes only the other.
        let j = &plan.jobs[0];
        store.put(&done_key(&j.run_id, &j.job_id), bytes::Bytes::from_static(b"{}")).await.unwrap();
        let q2 = InProcessQueue::new();
        let (published, done) = publish_pending(&plan, &store, &q2).await.unwrap();
        assert_eq!((published, done), (vec![plan.jobs[1].job_id.clone()], 1));
        // Same run id, different inputs: refused.
        std::fs::write(d.path().join("c.txt"), "z").unwrap();
        let other = plan_run(&cfg(vec![d.path().to_str().unwrap().into()], "r")).unwrap();
        assert!(matches!(publish_pending(&other, &store, &q2).await, Err(CoordinatorError::PlanMismatch { .. })));
    }
}
