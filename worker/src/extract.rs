//! Extraction of one document: deterministic parsers first, then the model on the
//! candidate lines left over.

use crate::labreport::{self, Candidate};
use crate::parquet_out::{ErrorRow, LabRow};
use crate::pipeline::LoadedPipeline;
use medbatch_engine::{EngineHandle, Finish, GenerateRequest};
use medbatch_schemas::pipeline::{ExtractionUnit, ParserKind, PromptFormat};
use medbatch_schemas::Document;

/// Rows and error rows produced from one document, with the tokens spent.
#[derive(Debug, Default)]
pub struct DocumentResult {
    pub rows: Vec<LabRow>,
    pub errors: Vec<ErrorRow>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub engine_ms: u64,
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Extracts lab results from `doc`.
pub async fn extract_document(doc: &Document, pipeline: &LoadedPipeline, engine: &EngineHandle) -> DocumentResult {
    let spec = &pipeline.spec;
    let mut out = DocumentResult::default();
    let mut claimed: Vec<(usize, usize)> = Vec::new();
    let row = |item: labreport::LabItem, tin: u32, tout: u32| LabRow {
        document_id: doc.id.clone(),
        source_uri: doc.source_uri.clone(),
        input_sha256: doc.input_sha256.to_string(),
        item,
        tokens_in: tin,
        tokens_out: tout,
    };
    for parser in &spec.extraction.parsers {
        let parsed = match parser {
            ParserKind::Hl7Obx => labreport::parse_hl7_obx(&doc.text),
            ParserKind::DelimitedTable => labreport::parse_delimited_table(&doc.text),
        };
        if let Some((items, spans)) = parsed {
            // A second parser never re-reads text the first one claimed.
            for it in items {
                if !claimed.iter().any(|&(s, e)| it.evidence_start >= s && it.evidence_end <= e) {
                    out.rows.push(row(it, 0, 0));
                }
            }
            claimed.extend(spans);
        }
    }
    let candidates: Vec<Candidate> = match spec.extraction.unit {
        ExtractionUnit::Line => labreport::segment(&doc.text, &claimed),
        ExtractionUnit::Document => {
            let n = doc.text.chars().count();
            vec![Candidate { start: 0, end: n, text: doc.text.clone() }]
        }
    };
    for c in candidates {
        let err = |reason: String, detail: String| ErrorRow {
            source_uri: doc.source_uri.clone(),
            member: None,
            record: None,
            document_id: Some(doc.id.clone()),
            stage: "model",
            reason,
            detail,
            evidence: Some((u32_of(c.start), u32_of(c.end))),
            input_sha256: Some(doc.input_sha256.to_string()),
        };
        let rendered = match pipeline.render(&c.text) {
            Ok(r) => r,
            Err(e) => {
                out.errors.push(err("prompt_render".into(), format!("template error: {}", e.kind())));
                continue;
            }
        };
        let chat = spec.prompt.format == PromptFormat::Chat;
        // A prompt may end inside the answer (the template writes its opening so the model only
        // continues it); the answer parsed is then that opening plus the generated text.
        let primer = if !chat && rendered.text.ends_with(labreport::ANSWER_PRIMER) { labreport::ANSWER_PRIMER } else { "" };
        let prompt = if chat { medbatch_engine::Engine::chat_prompt(&rendered.text) } else { rendered.text };
        let req = GenerateRequest {
            shared_prefix_len: if chat { 0 } else { rendered.shared_prefix_len },
            prompt,
            add_bos: true,
            parse_special: chat,
            max_new_tokens: spec.generation.max_new_tokens,
            stop: spec.generation.stop.clone(),
        };
        let generation = match engine.generate(req).await {
            Ok(g) => g,
            Err(e) => {
                out.errors.push(err(e.label().into(), e.to_string()));
                continue;
            }
        };
        out.tokens_in += u64::from(generation.prompt_tokens);
        out.tokens_out += generation.ids.len() as u64;
        out.engine_ms += generation.engine_ms;
        let (tin, tout) = (generation.prompt_tokens, u32_of(generation.ids.len()));
        match labreport::parse_answer(&format!("{primer}{}", generation.text), &c) {
            Ok(item) => out.rows.push(row(item, tin, tout)),
            Err(e) => {
                let truncated = generation.finish == Finish::Length;
                let mut r = err(e.label().to_string(), e.to_string());
                r.stage = "parse";
                if truncated {
                    r.detail.push_str(" (answer cut off at max_new_tokens)");
                }
                out.errors.push(r);
            }
        }
    }
    out
}
