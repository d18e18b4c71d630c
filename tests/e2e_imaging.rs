//! Imaging pipelines end to end: `medbatch run` with a real (tiny, random-weight) multimodal
//! Gemma 3 checkpoint over the bundled DICOM examples, and over real files nobody here wrote —
//! the DICOM test files inside pydicom's wheel and the NIfTI examples inside nibabel's
//! (`MEDBATCH_PYDICOM_DATA`, `MEDBATCH_NIBABEL_DATA`, set by infra/test.sh). Rows and error
//! rows are read back from the Parquet output.
//!
//! The tiny model reads 42-pixel images as 9 tokens and has a context of 512 tokens, so each
//! pipeline runs from a copy with shorter answers (string lengths, list lengths,
//! `max_new_tokens`) and fewer images; the prompts, the grouping and the pixel paths are the
//! pipelines' own.

mod common;
#[path = "../formats/tests/support/hostile.rs"]
mod hostile;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn model() -> String {
    repo_root().join("tests/fixtures/hf/multimodal/mm_window").to_string_lossy().into_owned()
}

/// How far a pipeline copy is cut down for the tiny model.
struct Size {
    max_images: usize,
    max_new_tokens: u32,
    max_length: u64,
    max_items: u64,
}

const RADIOGRAPH: Size = Size { max_images: 2, max_new_tokens: 200, max_length: 24, max_items: 2 };
/// The CT instruction alone is ~330 tokens of the fixture's small vocabulary.
const SERIES: Size = Size { max_images: 3, max_new_tokens: 128, max_length: 8, max_items: 1 };

/// Caps every `maxLength` and `maxItems` of a schema.
fn shorten(v: &mut Value, size: &Size) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match k.as_str() {
                    "maxLength" => *x = Value::from(x.as_u64().unwrap().min(size.max_length)),
                    "maxItems" => *x = Value::from(x.as_u64().unwrap().min(size.max_items)),
                    _ => shorten(x, size),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| shorten(x, size)),
        _ => {}
    }
}

/// A copy of `pipelines/NAME` sized for the tiny model.
fn tiny_pipeline(dir: &Path, name: &str, size: &Size) -> PathBuf {
    let src = repo_root().join("pipelines").join(name);
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    let toml = std::fs::read_to_string(dst.join("pipeline.toml")).unwrap();
    let toml: String = toml
        .lines()
        .map(|l| {
            if l.starts_with("max_new_tokens") {
                format!("max_new_tokens = {}", size.max_new_tokens)
            } else if l.starts_with("max_images") {
                format!("max_images = {}", size.max_images)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dst.join("pipeline.toml"), toml).unwrap();
    let mut schema: Value = serde_json::from_slice(&std::fs::read(dst.join("schema.json")).unwrap()).unwrap();
    shorten(&mut schema, size);
    std::fs::write(dst.join("schema.json"), serde_json::to_vec_pretty(&schema).unwrap()).unwrap();
    dst
}

struct Outcome {
    rows: usize,
    document_ids: Vec<String>,
    prompt_tokens: Vec<String>,
    /// (file name, reason, detail) of each error row, sorted.
    errors: Vec<(String, String, String)>,
    /// (document id, findings) of `cxr_reports` rows, sorted.
    answers: Vec<(String, String)>,
    /// The run's peak resident memory.
    peak_mib: f64,
    /// File names (last path segment, `#member` included) of the table's rows' sources.
    row_sources: Vec<String>,
    /// The run's standard error.
    stderr: String,
    /// `_documents`: (file name, status, reason, images, rows) of each row, sorted.
    documents: Vec<DocumentRow>,
    /// Slide-level tables: each row's `patches`.
    patches: Vec<Vec<PatchRow>>,
}

/// A patch of a slide-level row: slide, level, x, y, width, tissue fraction.
type PatchRow = (String, u32, u64, u64, u32, f32);

/// The `patches` column of a slide-level table, where there is one.
fn patches_of(batches: &[arrow::record_batch::RecordBatch]) -> Vec<Vec<PatchRow>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float32Type, UInt32Type, UInt64Type};
    let mut out = Vec::new();
    for b in batches {
        let Some(col) = b.column_by_name("patches") else { continue };
        let list = col.as_list::<i32>();
        for i in 0..list.len() {
            let v = list.value(i);
            let s = v.as_struct();
            let u32s = |n: &str| s.column_by_name(n).unwrap().as_primitive::<UInt32Type>().clone();
            let u64s = |n: &str| s.column_by_name(n).unwrap().as_primitive::<UInt64Type>().clone();
            let (level, width) = (u32s("level"), u32s("width"));
            let (x, y) = (u64s("x"), u64s("y"));
            let f = s.column_by_name("tissue_fraction").unwrap().as_primitive::<Float32Type>().clone();
            let slide = s.column_by_name("slide").unwrap().as_string::<i32>().clone();
            let row =
                |k| (slide.value(k).to_string(), level.value(k), x.value(k), y.value(k), width.value(k), f.value(k));
            out.push((0..s.len()).map(row).collect());
        }
    }
    out
}

/// A `_documents` row: file name (`#member` included), status, reason, images, rows.
type DocumentRow = (String, String, Option<String>, Option<String>, Option<String>);

fn run(pipeline: &Path, inputs: &[&str], table: &str) -> Outcome {
    run_with(pipeline, inputs, table, &[])
}

fn run_with(pipeline: &Path, inputs: &[&str], table: &str, extra: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let m = model();
    let mut args = vec!["run", pipeline.to_str().unwrap()];
    args.extend_from_slice(inputs);
    args.extend_from_slice(&["--out", out.to_str().unwrap(), "--model", &m]);
    args.extend_from_slice(extra);
    let (o, peak_mib) = medbatch_peak(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (rows, _, batches) = read_parquet_dir(&out.join(table));
    let document_ids = string_column(&batches, "document_id").into_iter().flatten().collect();
    let row_sources = string_column(&batches, "source_uri")
        .into_iter()
        .flatten()
        .map(|u| u.rsplit('/').next().unwrap().to_string())
        .collect();
    let prompt_tokens = string_column(&batches, "tokens_in").into_iter().flatten().collect();
    let patches = patches_of(&batches);
    let mut answers: Vec<(String, String)> = string_column(&batches, "document_id")
        .into_iter()
        .zip(string_column(&batches, if table == "cxr_reports" { "findings" } else { "document_id" }))
        .map(|(d, f)| (d.unwrap_or_default(), f.unwrap_or_default()))
        .collect();
    answers.sort();
    let (_, _, eb) = read_parquet_dir(&out.join("_errors"));
    let files: Vec<String> = string_column(&eb, "source_uri")
        .into_iter()
        .map(|u| u.unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    let mut errors: Vec<(String, String, String)> = files
        .into_iter()
        .zip(string_column(&eb, "reason"))
        .zip(string_column(&eb, "detail"))
        .map(|((f, r), d)| (f, r.unwrap(), d.unwrap_or_default()))
        .collect();
    errors.sort();
    let (_, _, db) = read_parquet_dir(&out.join("_documents"));
    let file = |(u, m): (Option<String>, Option<String>)| {
        let f = u.unwrap().rsplit('/').next().unwrap().to_string();
        m.map_or(f.clone(), |m| format!("{f}#{m}"))
    };
    let mut documents: Vec<DocumentRow> = string_column(&db, "source_uri")
        .into_iter()
        .zip(string_column(&db, "member"))
        .map(file)
        .zip(string_column(&db, "status"))
        .zip(string_column(&db, "reason"))
        .zip(string_column(&db, "images"))
        .zip(string_column(&db, "rows"))
        .map(|((((f, s), r), i), n)| (f, s.unwrap(), r, i, n))
        .collect();
    documents.sort();
    let stderr = text(&o.stderr);
    Outcome { rows, document_ids, prompt_tokens, errors, answers, peak_mib, row_sources, stderr, documents, patches }
}

fn reasons(o: &Outcome) -> Vec<(&str, &str)> {
    o.errors.iter().map(|(f, r, _)| (f.as_str(), r.as_str())).collect()
}

#[test]
fn cxr_report_one_row_per_study_and_error_rows_for_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_pipeline(dir.path(), "cxr-report", &RADIOGRAPH);
    let o = run(&p, &["examples/imaging/cxr"], "cxr_reports");
    // Three studies (PAT-A prior and current, PAT-B's file without an extension).
    assert_eq!(o.rows, 3, "{:?}", o.errors);
    let mut ids = o.document_ids.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one row per study: {:?}", o.document_ids);
    assert!(ids.iter().all(|i| i.starts_with("1.2.826.0.1.3680043.10.1234.")), "study UIDs: {ids:?}");
    // Each prompt holds one image (9 soft tokens plus its markers) and the instruction.
    assert!(o.prompt_tokens.iter().all(|t| t.parse::<u32>().unwrap() > 9), "{:?}", o.prompt_tokens);
    assert_eq!(reasons(&o), vec![("not-dicom.dcm", "wrong_format"), ("truncated.dcm", "corrupt_image")]);
    assert!(o.errors[0].2.contains("not a DICOM file"), "{:?}", o.errors[0]);
    assert!(o.errors[1].2.contains("truncated or corrupt"), "{:?}", o.errors[1]);
}

#[test]
fn cxr_longitudinal_pairs_a_patients_studies_by_date() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_pipeline(dir.path(), "cxr-longitudinal", &RADIOGRAPH);
    let o = run(&p, &["examples/imaging/cxr"], "cxr_comparisons");
    // PAT-A's current study with its prior: one row, named by both study UIDs.
    assert_eq!(o.rows, 1, "{:?}", o.errors);
    assert!(o.document_ids[0].contains(" prior "), "{:?}", o.document_ids);
    // PAT-A's first study and PAT-B's only study have nothing to compare with.
    assert_eq!(
        reasons(&o),
        vec![
            ("PAT-B-DX-0001", "not_applicable"),
            ("not-dicom.dcm", "wrong_format"),
            ("pat-a-2025-01-10.dcm", "not_applicable"),
            ("truncated.dcm", "corrupt_image"),
        ]
    );
    assert!(o.errors[0].2.contains("no earlier study"), "{:?}", o.errors[0]);
}

#[test]
fn ct_findings_one_row_per_series_with_labelled_slices() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_pipeline(dir.path(), "ct-findings", &SERIES);
    let o = run(&p, &["examples/imaging/ct"], "ct_findings");
    assert_eq!(o.rows, 1, "24 slice files are one series: {:?}", o.errors);
    assert!(o.errors.is_empty(), "{:?}", o.errors);
    // Three of the 24 slices, each 9 soft tokens between its markers.
    let tokens: u32 = o.prompt_tokens[0].parse().unwrap();
    assert!(tokens > 3 * 11, "{tokens}");
    // Every file is accounted for: the three slices sampled, the 21 others left out.
    assert_eq!(o.documents.len(), 24, "{:?}", o.documents);
    let used: Vec<&DocumentRow> = o.documents.iter().filter(|d| d.1 == "ok").collect();
    assert_eq!(used.len(), 3, "{used:?}");
    assert!(used.iter().all(|d| d.2.is_none() && d.3.as_deref() == Some("1")), "{used:?}");
    let skipped = o.documents.iter().filter(|d| d.1 == "skipped");
    assert!(skipped.clone().all(|d| d.2.as_deref() == Some("sampled_out") && d.3.as_deref() == Some("0")));
    assert_eq!(skipped.count(), 21);
    // The series' one row is counted once, on its first file used.
    let counted: Vec<&str> = o.documents.iter().filter_map(|d| d.4.as_deref()).collect();
    assert_eq!(counted, ["1"], "{:?}", o.documents);
}

fn data(var: &str) -> PathBuf {
    PathBuf::from(std::env::var(var).unwrap_or_else(|_| panic!("{var}: run the tests through `bash infra/test.sh`")))
}

#[test]
fn real_dicom_and_nifti_files_become_rows_or_clear_error_rows() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let dicom = data("MEDBATCH_PYDICOM_DATA");
    for f in ["CT_small.dcm", "MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_truncated.dcm"] {
        std::fs::copy(dicom.join(f), inputs.join(f)).unwrap();
    }
    let nifti = data("MEDBATCH_NIBABEL_DATA");
    for f in ["anatomical.nii", "standard.nii.gz", "example_nifti2.nii.gz"] {
        std::fs::copy(nifti.join(f), inputs.join(f)).unwrap();
    }
    let p = tiny_pipeline(dir.path(), "ct-findings", &SERIES);
    let o = run(&p, &[inputs.to_str().unwrap()], "ct_findings");
    // CT_small (a series of one slice) and the two NIfTI-1 volumes.
    assert_eq!(o.rows, 3, "{:?}", o.errors);
    let mut ids = o.document_ids.clone();
    ids.sort();
    // The CT row is named by its SeriesInstanceUID, the volumes by their file names.
    assert!(ids[0].starts_with("1.3.6.1.4.1.5962."), "{ids:?}");
    assert_eq!(ids[1..], ["anatomical.nii".to_string(), "standard.nii.gz".to_string()]);
    assert_eq!(
        reasons(&o),
        vec![
            ("MR_small.dcm", "not_applicable"),
            ("MR_small_jpeg_ls_lossless.dcm", "unsupported_encoding"),
            ("MR_truncated.dcm", "corrupt_image"),
            ("example_nifti2.nii.gz", "unsupported_encoding"),
        ]
    );
    assert!(o.errors[1].2.contains("JPEG-LS"), "{:?}", o.errors[1]);
    assert!(o.errors[0].2.contains("\"MR\""), "{:?}", o.errors[0]);
}

/// Headers that lie, each an error row naming the field or the size, in runs that stay under
/// 1 GiB of memory: a gzip NIfTI inflating to 6 GiB behind a small header, one declaring
/// 6 GiB of voxels, a DICOM declaring 65,535 × 65,535 pixels in 4,000 frames, DICOMs with
/// Rows = 0 and with a RescaleSlope of "ab", a PNG declaring 30,000 × 30,000 pixels.
#[test]
fn lying_headers_are_error_rows_and_memory_stays_under_1_gib() {
    use hostile::{dicom, gzip_bomb, nifti, nifti_header, png_claiming, Dicom};
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(inputs.join(name), bytes).unwrap();
    write("bomb.nii.gz", gzip_bomb(&nifti(&[64, 64, 4]), 6 << 30));
    write("declares-6gib.nii.gz", gzip_bomb(&nifti_header(&[2048, 2048, 768]), 6 << 30));
    write("huge.dcm", dicom(&Dicom { rows: 65535, columns: 65535, frames: 4000, ..Dicom::default() }));
    write("rows-0.dcm", dicom(&Dicom { rows: 0, ..Dicom::default() }));
    write("slope-ab.dcm", dicom(&Dicom { slope: "ab", ..Dicom::default() }));
    let p = tiny_pipeline(dir.path(), "ct-findings", &SERIES);
    let o = run(&p, &[inputs.to_str().unwrap()], "ct_findings");
    assert_eq!(o.rows, 0);
    assert_eq!(
        reasons(&o),
        vec![
            ("bomb.nii.gz", "compression_bomb"),
            ("declares-6gib.nii.gz", "too_large"),
            ("huge.dcm", "too_large"),
            ("rows-0.dcm", "corrupt_image"),
            ("slope-ab.dcm", "corrupt_image"),
        ]
    );
    assert!(o.errors[3].2.contains("Rows"), "{:?}", o.errors[3]);
    assert!(o.errors[4].2.contains("RescaleSlope is not a number"), "{:?}", o.errors[4]);
    eprintln!("ct-findings over lying headers: peak {:.0} MiB", o.peak_mib);
    assert!(o.peak_mib < 1024.0, "ct-findings peaked at {:.0} MiB", o.peak_mib);

    let png_dir = dir.path().join("png");
    std::fs::create_dir_all(&png_dir).unwrap();
    std::fs::write(png_dir.join("huge.png"), png_claiming(30_000, 30_000)).unwrap();
    let p = tiny_pipeline(dir.path(), "cxr-report", &RADIOGRAPH);
    let o = run(&p, &[png_dir.to_str().unwrap()], "cxr_reports");
    assert_eq!(reasons(&o), vec![("huge.png", "too_large")]);
    assert!(o.errors[0].2.contains("30000x30000"), "{:?}", o.errors[0]);
    eprintln!("cxr-report over a PNG declaring 30,000 x 30,000: peak {:.0} MiB", o.peak_mib);
    assert!(o.peak_mib < 1024.0, "cxr-report peaked at {:.0} MiB", o.peak_mib);
}

/// SplitMix64: a fixed stream of pseudo-random numbers, so the corpus is the same every run.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Damaged copies of a file: bit flips, truncations, inserted bytes, a duplicated chunk.
fn mutants(seed: &[u8], mix: &mut Mix) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for round in 0..2 {
        let mut b = seed.to_vec();
        let i = mix.below(b.len());
        b[i] ^= 1 << mix.below(8);
        out.push(("flip1", b));
        let mut b = seed.to_vec();
        for _ in 0..8 {
            let i = mix.below(b.len());
            b[i] ^= 1 << mix.below(8);
        }
        out.push(("flip8", b));
        let cut = if round == 0 { seed.len() / 2 } else { mix.below(seed.len()) };
        out.push(("cut", seed[..cut].to_vec()));
        let mut b = seed.to_vec();
        let at = mix.below(b.len());
        let noise: Vec<u8> = (0..16).map(|_| mix.next() as u8).collect();
        b.splice(at..at, noise);
        out.push(("insert", b));
        let mut b = seed.to_vec();
        let (from, len) = (mix.below(b.len()), 1 + mix.below(64));
        let chunk = b[from..(from + len).min(b.len())].to_vec();
        let at = mix.below(b.len());
        b.splice(at..at, chunk);
        out.push(("dup", b));
    }
    out
}

fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, *data).unwrap();
    }
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut e, &b.into_inner().unwrap()).unwrap();
    e.finish().unwrap()
}

fn zipped(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in files {
        w.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        std::io::Write::write_all(&mut w, data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// A per-document `structured` pipeline over text inputs, for the tiny model.
fn text_pipeline(root: &Path) -> PathBuf {
    let dir = root.join("note-flags");
    std::fs::create_dir_all(&dir).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "abnormal": { "type": "boolean" } },
        "required": ["abnormal"],
        "additionalProperties": false
    });
    std::fs::write(dir.join("schema.json"), serde_json::to_vec(&schema).unwrap()).unwrap();
    std::fs::write(
        dir.join("pipeline.toml"),
        "name = \"note-flags\"\nversion = \"1\"\ntask = \"structured\"\n\n[input]\n\n[output]\ntable = \"flags\"\n\
         rows = \"per_document\"\n\n[prompt]\ntemplate = \"prompt.j2\"\nschema = \"schema.json\"\n\n[generation]\n\
         max_new_tokens = 16\n\n[extraction]\nunit = \"document\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("prompt.j2"), "Flag as JSON.\nNote: {{ document }}\nJSON:").unwrap();
    dir
}

/// A corpus of damaged files — bit flips, truncations, insertions and duplicated chunks of
/// text, JSONL, CSV, tar.gz, zip, DICOM, PNG and NIfTI files — never stops a run: every run
/// exits 0 without a panic and within [`CORPUS_PEAK_MIB`] of memory, and every text input
/// (each archive included) has a row or an error row that names it.
/// The corpus's files are a few KB: a run over them needs the tiny model and little more
/// (about 35 MiB measured). The bound is far below the 1 GiB so that a header length
/// trusted by a decoder shows (a damaged DICOM VR once took a run to 773 MiB).
const CORPUS_PEAK_MIB: f64 = 256.0;

#[test]
fn damaged_files_of_every_format_never_stop_a_run() {
    use hostile::{dicom, gzip_bomb, nifti, Dicom};
    let dir = tempfile::tempdir().unwrap();
    let mut mix = Mix(0x6D65_6462_6174_6368);
    let note = b"Potassium 4.1 mmol/L (3.5-5.1)\nSodium 139 mmol/L (135-145)\nCreatinine 88 umol/L\n".to_vec();
    let jsonl = b"{\"id\": \"n1\", \"text\": \"Hb 13.2 g/dL\"}\n{\"id\": \"n2\", \"text\": \"WBC 6.1\"}\n".to_vec();
    let csv = b"id,text\nc1,\"Hb 13.2, normal\"\nc2,Na 140 mmol/L\n".to_vec();
    let members: [(&str, &[u8]); 3] = [("a.txt", &note), ("b.jsonl", &jsonl), ("c.csv", &csv)];
    let text_seeds: Vec<(&str, Vec<u8>)> = vec![
        ("txt", note.clone()),
        ("jsonl", jsonl.clone()),
        ("csv", csv.clone()),
        ("tar.gz", tar_gz(&members)),
        ("zip", zipped(&members)),
    ];
    let texts = dir.path().join("texts");
    std::fs::create_dir_all(&texts).unwrap();
    let mut names = Vec::new();
    for (ext, seed) in &text_seeds {
        for (k, (how, bytes)) in mutants(seed, &mut mix).into_iter().enumerate() {
            let name = format!("{how}-{k}.{ext}");
            std::fs::write(texts.join(&name), bytes).unwrap();
            names.push(name);
        }
    }
    let p = text_pipeline(dir.path());
    let o = run(&p, &[texts.to_str().unwrap()], "flags");
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    eprintln!(
        "{} damaged text files: {} rows, {} error rows, peak {:.0} MiB",
        names.len(),
        o.rows,
        o.errors.len(),
        o.peak_mib
    );
    assert!(o.peak_mib < CORPUS_PEAK_MIB, "peak {:.0} MiB", o.peak_mib);
    for name in &names {
        let named = |s: &String| s == name || s.starts_with(&format!("{name}#"));
        assert!(
            o.row_sources.iter().any(named) || o.errors.iter().any(|(f, _, _)| named(f)),
            "{name}: neither a row nor an error row"
        );
        assert!(o.documents.iter().any(|d| named(&d.0)), "{name}: no `_documents` row");
    }
    // Each document's rows are counted once: the table's rows add up to its row count.
    let counted: usize = o.documents.iter().filter_map(|d| d.4.as_deref()).map(|n| n.parse::<usize>().unwrap()).sum();
    assert_eq!(counted, o.rows);

    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut png = Vec::new();
    image::RgbImage::from_fn(16, 12, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let image_seeds: Vec<(&str, Vec<u8>)> = vec![
        ("dcm", dicom(&Dicom { rows: 16, columns: 12, pixel_bytes: 16 * 12 * 2, ..Dicom::default() })),
        ("png", png),
        ("nii.gz", gzip_bomb(&nifti(&[16, 12, 4]), 0)),
    ];
    let mut image_names = Vec::new();
    for (ext, seed) in &image_seeds {
        for (k, (how, bytes)) in mutants(seed, &mut mix).into_iter().enumerate() {
            let name = format!("{how}-{k}.{ext}");
            std::fs::write(images.join(&name), bytes).unwrap();
            image_names.push(name);
        }
    }
    let count = image_names.len();
    for (name, table) in [("ct-findings", "ct_findings"), ("cxr-report", "cxr_reports")] {
        let p = tiny_pipeline(dir.path(), name, if name == "ct-findings" { &SERIES } else { &RADIOGRAPH });
        let o = run(&p, &[images.to_str().unwrap()], table);
        assert!(!o.stderr.contains("panicked"), "{name}: {}", o.stderr);
        eprintln!(
            "{name} over {count} damaged images: {} rows, {} error rows, peak {:.0} MiB",
            o.rows,
            o.errors.len(),
            o.peak_mib
        );
        assert!(o.peak_mib < CORPUS_PEAK_MIB, "{name}: peak {:.0} MiB", o.peak_mib);
        assert!(!o.errors.is_empty(), "{name}: damaged files must give error rows");
        // Every file has exactly one `_documents` row (used, left out, or failed), and a
        // failed one its error row.
        for file in &image_names {
            let rows: Vec<&DocumentRow> = o.documents.iter().filter(|d| &d.0 == file).collect();
            assert_eq!(rows.len(), 1, "{name}: {file}: {rows:?}");
            if rows[0].1 == "failed" {
                assert!(o.errors.iter().any(|e| &e.0 == file), "{name}: {file} failed without an error row");
            }
        }
        assert_eq!(o.documents.len(), image_names.len(), "{name}: {:?}", o.documents);
    }
}

/// Uploads every file below `folder` to `s3://bucket/prefix/` (a new bucket) with pyarrow,
/// not with medbatch's code.
fn upload_folder(folder: &Path, bucket: &str, prefix: &str) {
    py_s3(&format!(
        "import pathlib\n\
         fs.create_dir('{bucket}')\n\
         root = pathlib.Path('{src}')\n\
         for p in sorted(root.rglob('*')):\n\
         \x20   if p.is_file():\n\
         \x20       with fs.open_output_stream('{bucket}/{prefix}/' + str(p.relative_to(root)), compression=None) as f:\n\
         \x20           f.write(p.read_bytes())\n\
         print('{{}}')",
        src = folder.display()
    ));
}

/// DICOM on S3 (the local S3-compatible server of infra/test.sh): planning reads the headers
/// through ranged requests and the workers the files, with the same rows and error rows as
/// the same folder on disk.
#[test]
fn dicom_on_s3_groups_and_reads_like_the_same_files_on_disk() {
    let bucket = format!("medbatch-img-{}", std::process::id());
    upload_folder(&repo_root().join("examples/imaging/cxr"), &bucket, "cxr");
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_pipeline(dir.path(), "cxr-report", &RADIOGRAPH);
    let s3 = run(&p, &[&format!("s3://{bucket}/cxr")], "cxr_reports");
    let local = run(&p, &["examples/imaging/cxr"], "cxr_reports");
    py_s3(&format!("fs.delete_dir('{bucket}')\nprint('{{}}')"));
    let sorted = |o: &Outcome| {
        let mut v = o.document_ids.clone();
        v.sort();
        v
    };
    assert_eq!(s3.rows, 3, "{:?}", s3.errors);
    assert_eq!(sorted(&s3), sorted(&local));
    assert_eq!(reasons(&s3), reasons(&local));
}

/// The same run with the model split over 2 and 4 tensor-parallel ranks (`--tp`, threads on
/// the CPU) writes the same rows: the same greedy answers, word for word.
#[test]
fn tensor_parallel_runs_write_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_pipeline(dir.path(), "cxr-report", &RADIOGRAPH);
    let one = run(&p, &["examples/imaging/cxr"], "cxr_reports");
    assert_eq!(one.rows, 3);
    for tp in ["2", "4"] {
        let split = run_with(&p, &["examples/imaging/cxr"], "cxr_reports", &["--tp", tp]);
        assert_eq!(split.answers, one.answers, "--tp {tp}");
        assert_eq!(reasons(&split), reasons(&one), "--tp {tp}");
    }
}

/// Slides: two patches a prompt, short answers (the instruction and two patches are ~400
/// tokens of the 512).
const SLIDES: Size = Size { max_images: 2, max_new_tokens: 110, max_length: 8, max_items: 1 };

/// The pathology-report pipeline sized for the tiny model: two patches of 64 px at 10x (the
/// synthetic slides are 1,000 x 760 pixels at 20x: a 7 x 5 grid on level 1).
fn tiny_pathology(dir: &Path) -> PathBuf {
    let p = tiny_pipeline(dir, "pathology-report", &SLIDES);
    let toml = std::fs::read_to_string(p.join("pipeline.toml")).unwrap();
    let toml = toml.replace("patch = 896", "patch = 64").replace("stride = 896", "stride = 64");
    std::fs::write(p.join("pipeline.toml"), toml).unwrap();
    p
}

/// Synthetic slides written by the whole-slide oracle (tifffile, pydicom) into `root/slides`,
/// with a truncated copy and a text file named `.svs`; returns the folder and the inputs of
/// a run (a TIFF, an SVS with JPEG 2000 tiles, a DICOM slide's folder, a glass-only slide and
/// the two broken files), relative to the folder.
fn synthetic_slides(root: &Path) -> (PathBuf, [&'static str; 6]) {
    let slides = root.join("slides");
    std::fs::create_dir(&slides).unwrap();
    let oracle = repo_root().join("formats/tests/support/wsi_oracle.py");
    let make = std::process::Command::new(python()).arg(&oracle).arg("make").arg(&slides).output().unwrap();
    assert!(make.status.success(), "{}", text(&make.stderr));
    let damaged = slides.join("truncated.tiff");
    let o = std::process::Command::new(python())
        .arg(&oracle)
        .args(["damage", slides.join("jpeg-ycbcr.tiff").to_str().unwrap(), damaged.to_str().unwrap(), "truncate"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    std::fs::write(slides.join("note.svs"), "Seen in clinic today.").unwrap();
    // Only what the runs read.
    for f in ["raw.tiff", "deflate.tiff", "lzw-predictor.tiff", "jpeg-rgb.tiff", "aperio-j2k-rgb.svs"] {
        std::fs::remove_file(slides.join(f)).unwrap();
    }
    for d in ["dicom-jpeg-eot", "dicom-j2k", "dicom-sparse"] {
        std::fs::remove_dir_all(slides.join(d)).unwrap();
    }
    let inputs =
        ["jpeg-ycbcr.tiff", "aperio-j2k-ycbcr.svs", "dicom-jpeg-bot", "glass.tiff", "truncated.tiff", "note.svs"];
    (slides, inputs)
}

#[test]
fn pathology_report_one_row_per_slide_from_its_tissue_patches() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_pathology(dir.path());
    let (slides, names) = synthetic_slides(dir.path());
    let inputs: Vec<String> = names.iter().map(|n| slides.join(n).to_string_lossy().into_owned()).collect();
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let o = run(&p, &inputs, "pathology_reports");
    // Three slides with tissue: a TIFF, an SVS and a DICOM slide of three instances.
    assert_eq!(o.rows, 3, "{:?}", o.errors);
    // The single-file slides are named by their files; the DICOM slide (a folder of
    // instances) by the first 16 hex digits of its header digest.
    let (mut named, digests): (Vec<&str>, Vec<&str>) =
        o.document_ids.iter().map(String::as_str).partition(|id| id.contains('.'));
    named.sort();
    assert_eq!(named, ["aperio-j2k-ycbcr.svs", "jpeg-ycbcr.tiff"], "{:?}", o.document_ids);
    assert!(
        matches!(digests[..], [d] if d.len() == 16 && d.bytes().all(|b| b.is_ascii_hexdigit())),
        "a DICOM slide is named by its header digest: {:?}",
        o.document_ids
    );
    // Each row lists its two patches: 64 px on the 10x level, in reading order, on whole
    // grid cells, partly tissue.
    assert_eq!(o.patches.len(), 3);
    for p in &o.patches {
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|q| q.1 == 1 && q.4 == 64 && q.2 % 64 == 0 && q.3 % 64 == 0), "{p:?}");
        assert!(p.iter().all(|q| q.5 > 0.0 && q.5 <= 1.0), "{p:?}");
        assert!((p[0].3, p[0].2) < (p[1].3, p[1].2), "{p:?}");
        assert_eq!(p[0].0, p[1].0, "one slide's patches: {p:?}");
    }
    // Two patches of 9 soft tokens each, after the instruction.
    assert!(o.prompt_tokens.iter().all(|t| t.parse::<u32>().unwrap() > 2 * 9), "{:?}", o.prompt_tokens);
    assert_eq!(
        reasons(&o),
        vec![("glass.tiff", "not_applicable"), ("note.svs", "wrong_format"), ("truncated.tiff", "corrupt_image")]
    );
    assert!(o.errors[0].2.contains("no tissue found"), "{:?}", o.errors[0]);
    assert!(!o.errors[1].2.contains("clinic"), "no file content in errors: {:?}", o.errors[1]);
    // The patches come from the file holding the 10x level; the DICOM slide's other
    // instances gave none.
    let images: Vec<(&str, Option<&str>)> =
        o.documents.iter().filter(|d| d.1 == "ok").map(|d| (d.0.as_str(), d.3.as_deref())).collect();
    assert!(images.contains(&("jpeg-ycbcr.tiff", Some("2"))), "{images:?}");
    assert!(images.contains(&("level-1.dcm", Some("2"))), "{images:?}");
    assert!(images.contains(&("level-0.dcm", Some("0"))), "{images:?}");
}

/// Slides grouped by case: a manifest puts the TIFF and the SVS in one case (one row, the
/// two patches shared between them, each labelled with its slide) and the glass slide with
/// the truncated one in another (no row: an error for each); the DICOM slide, not in the
/// manifest, is a case of its study.
#[test]
fn pathology_report_one_row_per_case_of_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_pathology(dir.path());
    let toml = std::fs::read_to_string(p.join("pipeline.toml")).unwrap();
    // The labels (`SLIDE n`) take a few tokens of the tiny model's 512.
    let toml =
        toml.replace("seed = 0", "seed = 0\ngroup = \"case\"").replace("max_new_tokens = 110", "max_new_tokens = 96");
    std::fs::write(p.join("pipeline.toml"), toml).unwrap();
    let (slides, _) = synthetic_slides(dir.path());
    std::fs::write(
        slides.join("cases.csv"),
        "slide,case\njpeg-ycbcr.tiff,CASE-1\naperio-j2k-ycbcr.svs,CASE-1\nglass.tiff,CASE-2\ntruncated.tiff,CASE-2\n",
    )
    .unwrap();
    std::fs::remove_file(slides.join("note.svs")).unwrap();
    let o = run(&p, &[slides.to_str().unwrap()], "pathology_reports");
    let mut ids = o.document_ids.clone();
    ids.sort();
    assert_eq!(ids.len(), 2, "{:?}", o.errors);
    assert_eq!(ids[1], "CASE-1");
    assert!(ids[0].starts_with("1.2."), "the DICOM slide's case is its study: {ids:?}");
    assert_eq!(reasons(&o), vec![("glass.tiff", "not_applicable"), ("truncated.tiff", "corrupt_image")]);
    // CASE-1's row: one patch of each slide (two patches a prompt, shared).
    let case = &o.patches[o.document_ids.iter().position(|d| d == "CASE-1").unwrap()];
    let mut from: Vec<&str> = case.iter().map(|q| q.0.as_str()).collect();
    from.sort();
    assert_eq!(from, ["aperio-j2k-ycbcr.svs", "jpeg-ycbcr.tiff"], "{case:?}");
    let images: Vec<(&str, Option<&str>)> = o
        .documents
        .iter()
        .filter(|d| d.0.ends_with(".tiff") || d.0.ends_with(".svs"))
        .map(|d| (d.0.as_str(), d.3.as_deref()))
        .collect();
    assert_eq!(
        images,
        [
            ("aperio-j2k-ycbcr.svs", Some("1")),
            ("glass.tiff", None),
            ("jpeg-ycbcr.tiff", Some("1")),
            ("truncated.tiff", None)
        ]
    );
}

#[test]
fn pathology_report_reads_slides_straight_from_s3_like_the_files_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_pathology(dir.path());
    let (slides, names) = synthetic_slides(dir.path());
    let bucket = format!("medbatch-wsi-{}", std::process::id());
    upload_folder(&slides, &bucket, "slides");
    let remote: Vec<String> = names.iter().map(|n| format!("s3://{bucket}/slides/{n}")).collect();
    let remote: Vec<&str> = remote.iter().map(String::as_str).collect();
    let local: Vec<String> = names.iter().map(|n| slides.join(n).to_string_lossy().into_owned()).collect();
    let local: Vec<&str> = local.iter().map(String::as_str).collect();
    let s3 = run(&p, &remote, "pathology_reports");
    let disk = run(&p, &local, "pathology_reports");
    py_s3(&format!("fs.delete_dir('{bucket}')\nprint('{{}}')"));
    let sorted = |o: &Outcome| {
        let mut v = o.document_ids.clone();
        v.sort();
        v
    };
    assert_eq!(s3.rows, 3, "{:?}", s3.errors);
    assert_eq!(sorted(&s3), sorted(&disk), "the same slides, the same rows");
    assert_eq!(reasons(&s3), reasons(&disk));
    let patches = |o: &Outcome| -> Vec<(String, Option<String>)> {
        o.documents.iter().map(|d| (d.0.clone(), d.3.clone())).collect()
    };
    assert_eq!(patches(&s3), patches(&disk), "the same patches from each file");
}

/// A tile row: document id, level, grid column, grid row, tissue fraction, model id.
type TileRow = (String, u32, u32, u32, String, String);

/// A wsi-tiles run: its tile rows (document id, level, grid column and row, tissue fraction,
/// model id), its error rows (file, reason, detail), and its stderr.
#[allow(clippy::type_complexity)]
fn tiles_run(pipeline: &Path, inputs: &[&str]) -> (Vec<TileRow>, Vec<(String, String, String)>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = vec!["run", pipeline.to_str().unwrap()];
    args.extend_from_slice(inputs);
    args.extend_from_slice(&["--out", out.to_str().unwrap(), "--model", "/no/such/model"]);
    let o = medbatch(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (_, _, b) = read_parquet_dir(&out.join("wsi_tiles"));
    let col = |name: &str| string_column(&b, name).into_iter().map(Option::unwrap).collect::<Vec<_>>();
    let num = |name: &str| col(name).into_iter().map(|v| v.parse::<u32>().unwrap()).collect::<Vec<_>>();
    let (ids, levels, cols, rows) = (col("document_id"), num("level"), num("grid_col"), num("grid_row"));
    let (fractions, models) = (col("tissue_fraction"), col("model_id"));
    let (xs, steps) = (col("x"), col("width"));
    for (x, (c, w)) in xs.iter().zip(cols.iter().zip(&steps)) {
        assert_eq!(x.parse::<u64>().unwrap(), u64::from(*c) * w.parse::<u64>().unwrap(), "x is the column's place");
    }
    let mut tiles: Vec<_> = (0..ids.len())
        .map(|i| (ids[i].clone(), levels[i], cols[i], rows[i], fractions[i].clone(), models[i].clone()))
        .collect();
    tiles.sort_by(|a, b| (&a.0, a.3, a.2).cmp(&(&b.0, b.3, b.2)));
    let (_, _, eb) = read_parquet_dir(&out.join("_errors"));
    let files =
        string_column(&eb, "source_uri").into_iter().map(|u| u.unwrap().rsplit('/').next().unwrap().to_string());
    let mut errors: Vec<(String, String, String)> = files
        .zip(string_column(&eb, "reason"))
        .zip(string_column(&eb, "detail"))
        .map(|((f, r), d)| (f, r.unwrap(), d.unwrap()))
        .collect();
    errors.sort();
    (tiles, errors, text(&o.stderr))
}

#[test]
fn wsi_tiles_one_row_per_tissue_tile_in_bands_without_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let (slides, names) = synthetic_slides(dir.path());
    // A slide whose header is sound and whose mask level has a tile of noise.
    let masked = slides.join("mask-garbage.tiff");
    let o = std::process::Command::new(python())
        .arg(repo_root().join("formats/tests/support/wsi_oracle.py"))
        .args(["damage", slides.join("jpeg-ycbcr.tiff").to_str().unwrap(), masked.to_str().unwrap(), "garbage-last"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut inputs: Vec<String> = names.iter().map(|n| slides.join(n).to_string_lossy().into_owned()).collect();
    inputs.push(masked.to_string_lossy().into_owned());
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    // Bands of two grid rows (three jobs a slide), and one job a slide.
    let (tiles, errors, stderr) = tiles_run(&tiles_pipeline(dir.path(), 64, 16), &inputs);
    let (whole, whole_errors, _) = tiles_run(&tiles_pipeline(dir.path(), 64, 4096), &inputs);
    assert!(stderr.contains("calls no model"), "{stderr}");
    assert_eq!(tiles, whole, "the bands' rows are the whole slides' rows, each once");
    assert!(tiles.iter().all(|t| t.1 == 1 && t.5 == "none"), "10x is level 1; no model: {tiles:?}");
    for t in &tiles {
        let f: f32 = t.4.parse().unwrap();
        assert!(f > 0.0 && f <= 1.0, "{t:?}");
    }
    // The TIFF's tiles are the tissue cells as the recipe computes them from OpenSlide's
    // pixels (the 5x level is the mask; a cell is 32 of its pixels).
    let tiff = slides.join("jpeg-ycbcr.tiff");
    let o = std::process::Command::new(python())
        .arg(repo_root().join("formats/tests/support/wsi_oracle.py"))
        .args(["tissue", tiff.to_str().unwrap(), "2", "32", "7", "5"])
        .output()
        .unwrap();
    let want: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut want: Vec<(u32, u32)> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[1].as_u64().unwrap() as u32, c[0].as_u64().unwrap() as u32))
        .collect();
    want.sort_unstable();
    let got: Vec<(u32, u32)> = tiles.iter().filter(|t| t.0 == "jpeg-ycbcr.tiff").map(|t| (t.3, t.2)).collect();
    assert!(!want.is_empty() && want.len() < 35, "{want:?}");
    assert_eq!(got, want);
    // The SVS and the DICOM slide (named by its header digest) have tiles too.
    let slides_with_tiles: std::collections::BTreeSet<&str> = tiles.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(slides_with_tiles.len(), 3, "{slides_with_tiles:?}");
    assert!(slides_with_tiles.contains("aperio-j2k-ycbcr.svs"));
    // Glass is reported once (by its first band), as are the text file and the truncated
    // slide (whose header is cut: one job); the mask tile that does not decode fails each
    // band's job, each row naming its rows.
    let reasons: Vec<(&str, &str)> = errors.iter().map(|e| (e.0.as_str(), e.1.as_str())).collect();
    assert_eq!(
        reasons,
        [
            ("glass.tiff", "not_applicable"),
            ("mask-garbage.tiff", "corrupt_image"),
            ("mask-garbage.tiff", "corrupt_image"),
            ("mask-garbage.tiff", "corrupt_image"),
            ("note.svs", "wrong_format"),
            ("truncated.tiff", "corrupt_image"),
        ],
        "{errors:?}"
    );
    for (k, rows) in ["0..2", "2..4", "4..5"].iter().enumerate() {
        assert!(errors[1 + k].2.contains(&format!("grid rows {rows}")), "{errors:?}");
        assert!(errors[1 + k].2.contains("level 2"), "the mask's level and tile are named: {errors:?}");
    }
    let whole_reasons: Vec<(&str, &str)> = whole_errors.iter().map(|e| (e.0.as_str(), e.1.as_str())).collect();
    assert_eq!(whole_reasons, [reasons[0], reasons[1], reasons[4], reasons[5]]);
}

/// A slide of over 200 MB on S3 (an uncompressed pyramid written by the oracle): tiled in
/// three band jobs from ranged reads of its header and mask only, each job logging its
/// requests and bytes against the slide's size, with the same rows as the file on disk.
#[test]
fn a_large_slide_on_s3_is_tiled_from_a_few_ranged_reads() {
    let dir = tempfile::tempdir().unwrap();
    let slides = dir.path().join("large");
    std::fs::create_dir(&slides).unwrap();
    let path = slides.join("large.tiff");
    let o = std::process::Command::new(python())
        .arg(repo_root().join("formats/tests/support/wsi_oracle.py"))
        .args(["large", path.to_str().unwrap(), "210"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size >= 200 << 20, "{size}");
    // 224-px tiles at 10x: a 9 x 9 grid on the 10x level (2,112 px), in bands of 3 rows.
    let p = tiles_pipeline(dir.path(), 224, 27);
    let bucket = format!("medbatch-large-{}", std::process::id());
    upload_folder(&slides, &bucket, "slides");
    let run = |input: &str| {
        let out = dir.path().join(format!("out-{}", input.len()));
        let o = command(&["run", p.to_str().unwrap(), input, "--out", out.to_str().unwrap()])
            .env("MEDBATCH_LOG", "medbatch_worker=info,warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        let (rows, _, b) = read_parquet_dir(&out.join("wsi_tiles"));
        let mut cells: Vec<(String, String)> = string_column(&b, "grid_row")
            .into_iter()
            .flatten()
            .zip(string_column(&b, "grid_col").into_iter().flatten())
            .collect();
        cells.sort();
        assert_eq!(cells.len(), rows);
        (cells, text(&o.stderr))
    };
    let (s3_cells, log) = run(&format!("s3://{bucket}/slides/large.tiff"));
    let (disk_cells, _) = run(path.to_str().unwrap());
    py_s3(&format!("fs.delete_dir('{bucket}')\nprint('{{}}')"));
    assert_eq!(s3_cells, disk_cells, "the same tiles from S3 as from disk");
    assert!(!s3_cells.is_empty() && s3_cells.len() < 81, "tissue and glass: {}", s3_cells.len());
    // One log line per band job: requests and bytes against the slide's size.
    let field = |line: &str, name: &str| -> u64 {
        let at = line.find(&format!("{name}=")).unwrap_or_else(|| panic!("{name} in {line}")) + name.len() + 1;
        line[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    let reads: Vec<(u64, u64, u64)> = log
        .lines()
        .filter(|l| l.contains("slide read"))
        .map(|l| (field(l, "requests"), field(l, "bytes"), field(l, "size")))
        .collect();
    assert_eq!(reads.len(), 3, "{log}");
    for (requests, bytes, logged_size) in reads {
        assert_eq!(logged_size, size);
        // The header and the 2.5x mask level (528 x 528 pixels: nine uncompressed tiles of
        // 192 KiB).
        assert!(bytes < 4 << 20 && bytes < size / 50, "{bytes} bytes of {size}");
        assert!(requests < 64, "{requests} requests");
    }
}

/// cxr-localize with the tiny model over the bundled studies and a wide PNG: a row per box
/// of each image and object, the box's corners in pixels of the original image (the padding
/// to a square undone), the bad files error rows. The tiny model's boxes are noise; one box
/// an answer is required of it (the shipped schema allows none).
#[test]
fn cxr_localize_a_row_per_box_in_pixels_of_the_original_image() {
    let dir = tempfile::tempdir().unwrap();
    // (maxItems capped at 4 keeps box_2d's four numbers.)
    let size = Size { max_images: 2, max_new_tokens: 96, max_length: 6, max_items: 4 };
    let p = tiny_pipeline(dir.path(), "cxr-localize", &size);
    let toml = std::fs::read_to_string(p.join("pipeline.toml")).unwrap();
    let toml = toml.replace("reasoning_tokens = 512", "reasoning_tokens = 8").replace(
        "objects = [\"right clavicle\", \"left clavicle\", \"right lung\", \"left lung\", \"heart\"]",
        "objects = [\"heart\", \"left lung\"]",
    );
    std::fs::write(p.join("pipeline.toml"), toml).unwrap();
    let mut schema: Value = serde_json::from_slice(&std::fs::read(p.join("schema.json")).unwrap()).unwrap();
    schema["minItems"] = Value::from(1);
    schema["maxItems"] = Value::from(1);
    std::fs::write(p.join("schema.json"), serde_json::to_vec(&schema).unwrap()).unwrap();
    // The notebook's instructions are ~750 tokens of the fixture's vocabulary, past its context
    // of 512: the question alone.
    let prompt = std::fs::read_to_string(p.join("prompt.j2")).unwrap();
    let question = &prompt[prompt.find("Where is the").unwrap()..];
    std::fs::write(p.join("prompt.j2"), format!("{{{{ document }}}}{question}")).unwrap();
    let inputs = dir.path().join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    let mut png = Vec::new();
    image::RgbImage::from_fn(60, 24, |x, y| image::Rgb([x as u8 * 4, y as u8 * 10, 90]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(inputs.join("wide.png"), png).unwrap();

    let out = dir.path().join("out");
    let m = model();
    let args = [p.to_str().unwrap(), "examples/imaging/cxr", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let o = medbatch(&[&["run"][..], &args, &["--model", &m]].concat());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (rows, _, batches) = read_parquet_dir(&out.join("cxr_localizations"));
    let col = |name: &str| string_column(&batches, name).into_iter().map(Option::unwrap).collect::<Vec<_>>();
    let num = |name: &str| col(name).into_iter().map(|v| v.parse::<f64>().unwrap()).collect::<Vec<_>>();
    let (ids, objects, labels) = (col("document_id"), col("object"), col("label"));
    // Four images (three studies' radiographs and the PNG), two objects each, a box each.
    let images: std::collections::BTreeSet<(String, String)> = ids.iter().cloned().zip(col("image_index")).collect();
    assert_eq!(images.len(), 4, "{images:?} {:?}", text(&o.stderr));
    assert_eq!(rows, 8, "one box per image and object");
    assert!(objects.iter().all(|o| o == "heart" || o == "left lung"), "{objects:?}");
    assert!(labels.iter().all(|l| !l.is_empty() && l.chars().count() <= 6), "{labels:?}");
    let [y0, x0, y1, x1] = ["y0", "x0", "y1", "x1"].map(num);
    let [x_min, y_min, x_max, y_max] = ["x_min", "y_min", "x_max", "y_max"].map(num);
    let (w, h) = (num("image_width"), num("image_height"));
    for k in 0..rows {
        for v in [y0[k], x0[k], y1[k], x1[k]] {
            assert!((0.0..=1000.0).contains(&v), "row {k}: {v}");
        }
        // The model saw the image padded to a square of its longer side, centred.
        let side = w[k].max(h[k]);
        let (left, top) = (((side - w[k]) / 2.0).floor(), ((side - h[k]) / 2.0).floor());
        let px = |v: f64, pad: f64, max: f64| (v / 1000.0 * side - pad).clamp(0.0, max);
        let want = [
            px(x0[k], left, w[k]).min(px(x1[k], left, w[k])),
            px(y0[k], top, h[k]).min(px(y1[k], top, h[k])),
            px(x0[k], left, w[k]).max(px(x1[k], left, w[k])),
            px(y0[k], top, h[k]).max(px(y1[k], top, h[k])),
        ];
        let got = [x_min[k], y_min[k], x_max[k], y_max[k]];
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-9), "row {k}: {got:?} against {want:?}");
    }
    let png_rows: Vec<usize> = (0..rows).filter(|&k| ids[k] == "wide.png").collect();
    assert_eq!(png_rows.len(), 2);
    assert!(png_rows.iter().all(|&k| (w[k], h[k]) == (60.0, 24.0)));
    let (_, _, eb) = read_parquet_dir(&out.join("_errors"));
    let mut reasons: Vec<(String, String)> = string_column(&eb, "source_uri")
        .into_iter()
        .zip(string_column(&eb, "reason"))
        .map(|(u, r)| (u.unwrap().rsplit('/').next().unwrap().to_string(), r.unwrap()))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [("not-dicom.dcm".to_string(), "wrong_format".to_string()), ("truncated.dcm".into(), "corrupt_image".into())]
    );
}
