//! Loading a pipeline folder: spec, prompt template, answer schema, digest.

use medbatch_schemas::{Digest, PipelineRef, PipelineSpec};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};

/// Placeholder rendered into the template to find where per-item text starts; everything
/// before it is the prompt prefix shared by all items.
const ITEM_MARKER: &str = "\u{0}MEDBATCH_ITEM\u{0}";

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline {0}: not found (give a folder name under pipelines/ or a path)")]
    NotFound(String),
    #[error("pipeline {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// A pipeline ready to run.
#[derive(Debug, Clone)]
pub struct LoadedPipeline {
    pub dir: PathBuf,
    pub spec: PipelineSpec,
    pub template: String,
    pub schema: serde_json::Value,
    /// The JSON schema of a structured table's row: `output.schema`, else the answer schema.
    pub row_schema: serde_json::Value,
    pub digest: Digest,
    /// The analyte lexicon named by `extraction.lexicon`, parsed.
    pub lexicon: Option<std::sync::Arc<crate::pipelines::lab_report::Lexicon>>,
    /// Section mode's rules (`extraction.sections`, `context`, `status`), parsed.
    pub reading: Option<std::sync::Arc<crate::clinical::NoteReading>>,
}

/// A rendered prompt and the length of the prefix every item shares (the instructions and
/// examples, which the engine's prefix cache computes once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    pub text: String,
    pub shared_prefix_len: usize,
}

impl LoadedPipeline {
    /// Resolves `name_or_path`: an existing folder, else `pipelines/NAME` under the current
    /// directory or next to the executable's repository.
    pub fn resolve(name_or_path: &str) -> Result<PathBuf, PipelineError> {
        let direct = PathBuf::from(name_or_path);
        if direct.join("pipeline.toml").is_file() {
            return Ok(direct);
        }
        let is_name = !name_or_path.contains('/') && !name_or_path.contains('\\') && !name_or_path.starts_with('.');
        if is_name {
            let mut roots = vec![PathBuf::from("pipelines")];
            if let Some(dir) = option_env!("CARGO_MANIFEST_DIR") {
                roots.push(Path::new(dir).join("..").join("pipelines"));
            }
            for r in roots {
                let p = r.join(name_or_path);
                if p.join("pipeline.toml").is_file() {
                    return Ok(p);
                }
            }
        }
        Err(PipelineError::NotFound(name_or_path.to_string()))
    }

    pub fn load(name_or_path: &str) -> Result<Self, PipelineError> {
        let dir = Self::resolve(name_or_path)?;
        let shown = dir.display().to_string();
        let invalid = |reason: String| PipelineError::Invalid { path: shown.clone(), reason };
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| invalid(format!("{f}: {e}")));
        let spec = PipelineSpec::from_toml(&read("pipeline.toml")?).map_err(|e| invalid(e.to_string()))?;
        for (key, pattern) in [
            ("input.patient_pattern", &spec.input.patient_pattern),
            ("input.date_pattern", &spec.input.date_pattern),
            ("extraction.source_heading", &spec.extraction.source_heading),
        ] {
            let Some(p) = pattern else { continue };
            let re = regex::Regex::new(p).map_err(|e| invalid(format!("{key}: {e}")))?;
            if re.captures_len() < 2 {
                return Err(invalid(format!("{key} needs a capture group (the value)")));
            }
        }
        // A pipeline that prompts no generative model has no prompt.
        let model = spec.task.needs_prompt();
        let template = if model { read(&spec.prompt.template)? } else { String::new() };
        let schema: serde_json::Value = if model {
            serde_json::from_str(&read(&spec.prompt.schema)?)
                .map_err(|e| invalid(format!("{}: {e}", spec.prompt.schema)))?
        } else {
            serde_json::Value::Null
        };
        let mut digest = digest_dir(&dir).map_err(|e| invalid(format!("reading files: {e}")))?;
        // Files a spec names may live outside the folder (a sibling pipeline's): their
        // content is part of the digest either way.
        let mut named = |f: &str| -> Result<String, PipelineError> {
            let text = read(f)?;
            let mut h = Sha256::new();
            h.update(digest.to_string().as_bytes());
            h.update(format!("\0{f}\0").as_bytes());
            h.update(text.as_bytes());
            digest = Digest::from_sha256(h.finalize());
            Ok(text)
        };
        let row_schema: serde_json::Value = match &spec.output.schema {
            None => schema.clone(),
            Some(f) => serde_json::from_str(&named(f)?).map_err(|e| invalid(format!("{f}: {e}")))?,
        };
        let lexicon = match &spec.extraction.lexicon {
            None => None,
            Some(f) => {
                let lexicon = crate::pipelines::lab_report::Lexicon::parse(&named(f)?)
                    .map_err(|e| invalid(format!("{f}: {e}")))?;
                Some(std::sync::Arc::new(lexicon))
            }
        };
        let x = &spec.extraction;
        let reading = match (&x.sections, &x.context, &x.status) {
            (Some(s), Some(c), Some(t)) => {
                let parsed = crate::clinical::NoteReading::parse(&named(s)?, &named(c)?, &named(t)?)
                    .map_err(|(f, e)| invalid(format!("{}: {e}", [s, c, t][f])))?;
                Some(std::sync::Arc::new(parsed))
            }
            _ => None,
        };
        if spec.task == medbatch_schemas::pipeline::Task::Structured {
            let shown = spec.output.schema.as_deref().unwrap_or(&spec.prompt.schema);
            crate::pipelines::structured::check_pipeline(&row_schema, &spec.output)
                .map_err(|e| invalid(format!("{shown}: {e}")))?;
        }
        if model && spec.generation.constrained {
            crate::grammar::check_schema(&schema).map_err(|e| invalid(format!("{}: {e}", spec.prompt.schema)))?;
        }
        let p = Self { dir, spec, template, schema, row_schema, digest, lexicon, reading };
        // Cohort criteria are checked against the patient row now, not after a run's jobs.
        crate::patients::PatientStage::new(&p)?;
        if model {
            p.render("probe").map_err(|e| invalid(format!("{}: {e}", p.spec.prompt.template)))?;
        }
        Ok(p)
    }

    pub fn reference(&self) -> PipelineRef {
        PipelineRef { name: self.spec.name.clone(), version: self.spec.version.clone(), digest: self.digest.clone() }
    }

    /// The same pipeline decoding free text instead of under its answer grammar (to measure
    /// what the grammar changes); the digest changes with it, so the two never share a run.
    pub fn unconstrained(mut self) -> Self {
        if self.spec.generation.constrained {
            self.spec.generation.constrained = false;
            let mut h = Sha256::new();
            h.update(self.digest.to_string().as_bytes());
            h.update(b"\0generation.constrained=false");
            self.digest = Digest::from_sha256(h.finalize());
        }
        self
    }

    /// Renders the prompt template with the item text: a candidate line, or the whole
    /// document when the pipeline extracts per document. Templates see it as `line` and as
    /// `document`.
    pub fn render(&self, item: &str) -> Result<RenderedPrompt, minijinja::Error> {
        self.render_with(item, "", "")
    }

    /// [`Self::render`] with the template's `object` (what a localization prompt asks to
    /// find) and `section` (the kind of a note's section a section-mode prompt reads) set.
    pub fn render_with(&self, item: &str, object: &str, section: &str) -> Result<RenderedPrompt, minijinja::Error> {
        let env = minijinja::Environment::new();
        let tmpl = env.template_from_str(&self.template)?;
        let with_marker = tmpl.render(
            minijinja::context! { line => ITEM_MARKER, document => ITEM_MARKER, object => object, section => section },
        )?;
        let shared_prefix_len = with_marker.find(ITEM_MARKER).unwrap_or(0);
        Ok(RenderedPrompt { text: with_marker.replace(ITEM_MARKER, item), shared_prefix_len })
    }
}

/// Digest of every file in the pipeline folder (sorted relative paths and contents), so a
/// changed prompt or schema changes the digest recorded on every row.
pub fn digest_dir(dir: &Path) -> std::io::Result<Digest> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "__pycache__" {
                continue;
            }
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f).to_string_lossy().replace('\\', "/");
        h.update(rel.as_bytes());
        h.update([0]);
        let bytes = std::fs::read(&f)?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(Digest::from_sha256(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medbatch_schemas::pipeline::{ExtractionUnit, PromptFormat};

    fn pipelines_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines")
    }

    #[test]
    fn shipped_pipelines_load_and_render() {
        let line = LoadedPipeline::load(pipelines_dir().join("lab-report").to_str().unwrap()).unwrap();
        let r = line.render("Sodium 139 mmol/L").unwrap();
        assert!(r.shared_prefix_len > 0 && r.text[r.shared_prefix_len..].starts_with("Sodium 139 mmol/L"));
        assert_eq!(line.render("x").unwrap().text[..r.shared_prefix_len], r.text[..r.shared_prefix_len]);
        let doc = LoadedPipeline::load(pipelines_dir().join("lab-report-document").to_str().unwrap()).unwrap();
        assert_eq!((doc.spec.extraction.unit, doc.spec.prompt.format), (ExtractionUnit::Document, PromptFormat::Chat));
        assert!(doc.render("REPORT TEXT").unwrap().text.contains("REPORT TEXT"));
        assert_eq!(doc.spec.output.table, line.spec.output.table);
        // One lexicon for both (the document pipeline names its sibling's file).
        let (a, b) = (line.lexicon.as_ref().unwrap(), doc.lexicon.as_ref().unwrap());
        assert!(a.len() >= 300 && a.len() == b.len());
        assert!(matches!(LoadedPipeline::load("no-such-pipeline"), Err(PipelineError::NotFound(_))));
    }

    #[test]
    fn every_shipped_pipeline_loads_and_builds_its_table() {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(pipelines_dir()).unwrap() {
            let dir = entry.unwrap().path();
            if !dir.join("pipeline.toml").is_file() {
                continue;
            }
            let loaded =
                LoadedPipeline::load(dir.to_str().unwrap()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let pipeline = crate::pipelines::for_spec(std::sync::Arc::new(loaded))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let schema = pipeline.schema();
            for column in ["document_id", "source_uri", "run_id", "model_digest"] {
                assert!(schema.field_with_name(column).is_ok(), "{}: no {column} column", dir.display());
            }
            names.push(pipeline.loaded().spec.name.clone());
        }
        names.sort();
        for want in [
            "cohort-facts",
            "cxr-localize",
            "image-embeddings",
            "pathology-report",
            "text-embeddings",
            "wsi-tile-embeddings",
            "wsi-tiles",
        ] {
            assert!(names.iter().any(|n| n == want), "{names:?}");
        }
    }

    #[test]
    fn digest_covers_every_file() {
        let d = tempfile::tempdir().unwrap();
        for f in ["pipeline.toml", "prompt.j2", "schema.json", "analytes.tsv"] {
            std::fs::copy(pipelines_dir().join("lab-report").join(f), d.path().join(f)).unwrap();
        }
        let a = LoadedPipeline::load(d.path().to_str().unwrap()).unwrap();
        std::fs::write(d.path().join("prompt.j2"), "Line: {{ line }}\nJSON: {\"test\":\"").unwrap();
        let b = LoadedPipeline::load(d.path().to_str().unwrap()).unwrap();
        assert_ne!(a.digest, b.digest);
        // The lexicon is part of the digest, and a broken one is refused naming its line.
        let lexicon = d.path().join("analytes.tsv");
        let mut text = std::fs::read_to_string(&lexicon).unwrap();
        text.push_str("Zonulin\tanalyte\tzonulin\n");
        std::fs::write(&lexicon, &text).unwrap();
        let c = LoadedPipeline::load(d.path().to_str().unwrap()).unwrap();
        assert_ne!(b.digest, c.digest);
        text.push_str("Broken line without tabs\n");
        std::fs::write(&lexicon, &text).unwrap();
        let err = LoadedPipeline::load(d.path().to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("analytes.tsv") && err.contains("line"), "{err}");
        std::fs::remove_file(&lexicon).unwrap();
        let err = LoadedPipeline::load(d.path().to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("analytes.tsv"), "{err}");
        std::fs::write(d.path().join("schema.json"), "not json").unwrap();
        let err = LoadedPipeline::load(d.path().to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("schema.json"), "{err}");
    }
}
