//! The one path from a document's segments to model answers: render the prompt, build the
//! answer grammar, send the request, await it, check that the answer is complete. Every
//! failure on the way is an error row of the `model` stage; pipelines only parse answers.

use crate::parquet_out::{ErrorReason, ErrorRow, ErrorStage};
use crate::pipeline::{LoadedPipeline, RenderedPrompt};
use crate::pipelines::RunCx;
use medbatch_engine::image::Rgb8;
use medbatch_engine::sampling::Sampling;
use medbatch_engine::{EngineError, Finish, GenerateRequest, Generation};
use medbatch_schemas::pipeline::{GenerationSpec, PromptFormat};
use medbatch_schemas::Document;
use std::sync::Arc;
use tracing::Instrument;

/// A piece of a document the model is asked about: its character span and its text.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'s> {
    pub start: usize,
    pub end: usize,
    pub text: &'s str,
}

/// A complete answer to one segment.
#[derive(Debug)]
pub struct Reply {
    /// What is parsed: the answer's opening written by the prompt (see [`ask_all`]'s
    /// `primer`), then the generated text.
    pub answer: String,
    pub tokens_in: u32,
    pub tokens_out: u32,
    /// The answer stopped at `max_new_tokens` (only possible for unconstrained answers:
    /// a constrained one cut off is an error row).
    pub cut_off: bool,
}

/// The answers to a document's segments, in segment order, and what they cost.
#[derive(Debug, Default)]
pub struct Asked {
    pub replies: Vec<Result<Reply, ErrorRow>>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Wall time from the first request to the last answer (the requests run concurrently,
    /// batched by the engine).
    pub engine_ms: u64,
}

/// One prompt about a segment: its text, the grammar its answer is decoded under (`None`:
/// free text), its images.
pub struct Prompt {
    pub rendered: RenderedPrompt,
    pub grammar: Option<medbatch_engine::Grammar>,
    pub images: Vec<Arc<Rgb8>>,
}

/// Asks the model about every segment of `doc`, each prompt with `images` (none for text).
///
/// Every request is sent before any is awaited, so the engine batches them (and other
/// documents' requests) into shared forward passes. A prompt may end inside the answer:
/// when the answer is unconstrained, the prompt is not chat-formatted and it ends with
/// `primer`, the reply's answer starts with the primer. A constrained answer is decoded whole,
/// under the pipeline schema's grammar over the segment.
pub async fn ask_all(
    cx: &RunCx<'_>,
    pipeline: &LoadedPipeline,
    doc: &Document,
    segments: &[Segment<'_>],
    images: &[Arc<Rgb8>],
    primer: Option<&str>,
) -> Asked {
    let prepare = |_: usize, s: &Segment<'_>| {
        let rendered = pipeline
            .render(s.text)
            .map_err(|e| (ErrorReason::PromptRender, format!("template error: {}", e.kind())))?;
        let grammar = match pipeline.spec.generation.constrained {
            true => Some(
                crate::grammar::answer_grammar(&pipeline.schema, s.text)
                    .map_err(|e| (ErrorReason::Grammar, format!("answer grammar: {e}")))?,
            ),
            false => None,
        };
        Ok(Prompt { rendered, grammar, images: images.to_vec() })
    };
    ask_each(cx, pipeline, doc, segments, primer, prepare).await
}

/// [`ask_all`] with each segment's prompt made by `prepare` from its place and the segment
/// (its text, grammar and images).
/// A thinking trace (`generation.thinking`) is dropped from each answer.
pub async fn ask_each(
    cx: &RunCx<'_>,
    pipeline: &LoadedPipeline,
    doc: &Document,
    segments: &[Segment<'_>],
    primer: Option<&str>,
    prepare: impl Fn(usize, &Segment<'_>) -> Result<Prompt, (ErrorReason, String)>,
) -> Asked {
    let spec = &pipeline.spec;
    let chat = spec.prompt.format == PromptFormat::Chat;
    let started = std::time::Instant::now();
    let thinking_end = thinking_ids(pipeline, cx.engine().tokenizer()).map(|(_, end)| end);
    let mut pending = Vec::with_capacity(segments.len());
    for (k, s) in segments.iter().enumerate() {
        let prepared = prepare(k, s).map(|p| {
            let primed = match primer {
                Some(pr) if p.grammar.is_none() && !chat && p.rendered.text.ends_with(pr) => pr,
                _ => "",
            };
            let seed = item_seed(cx.job_seed, &doc.id, s.start);
            (model_request(pipeline, p.rendered, seed, p.grammar, p.images), primed)
        });
        pending.push(prepared.map(|(req, primed)| {
            let engine = cx.engine().clone();
            (tokio::spawn(async move { engine.generate(req).await }.in_current_span()), primed)
        }));
    }
    let mut out = Asked::default();
    for (s, task) in segments.iter().zip(pending) {
        let err = |(reason, detail): (ErrorReason, String)| {
            ErrorRow::of_document(doc, ErrorStage::Model, reason, detail, Some((s.start, s.end)))
        };
        let (task, primed) = match task {
            Ok(t) => t,
            Err(e) => {
                out.replies.push(Err(err(e)));
                continue;
            }
        };
        let generation = match awaited(task).await {
            Ok(g) => g,
            Err(e) => {
                out.replies.push(Err(err(e)));
                continue;
            }
        };
        let tokens_out = generation.ids.len() as u64;
        out.tokens_in += u64::from(generation.prompt_tokens);
        out.tokens_out += tokens_out;
        (cx.on_generated)(tokens_out);
        if let Some(e) = incomplete(&spec.generation, &generation) {
            out.replies.push(Err(err(e)));
            continue;
        }
        let text = match thinking_end {
            Some(end) => after_thinking(&generation.ids, end, cx.engine().tokenizer()).unwrap_or(generation.text),
            None => generation.text,
        };
        out.replies.push(Ok(Reply {
            answer: format!("{primed}{text}"),
            tokens_in: generation.prompt_tokens,
            tokens_out: u32_of(generation.ids.len()),
            cut_off: generation.finish == Finish::Length,
        }));
    }
    out.engine_ms = started.elapsed().as_millis() as u64;
    out
}

/// The text of the generated `ids` after the last `end` of a thinking trace (`None`: the model
/// did not think).
pub fn after_thinking(ids: &[u32], end: u32, tokenizer: &medbatch_engine::tokenizer::Tokenizer) -> Option<String> {
    let at = ids.iter().rposition(|&t| t == end)?;
    Some(tokenizer.decode(&ids[at + 1..], false))
}

/// The ids of the tokens a thinking trace starts and ends with (`generation.thinking`), when
/// the model's vocabulary has each as one token.
pub fn thinking_ids(
    pipeline: &LoadedPipeline,
    tokenizer: &medbatch_engine::tokenizer::Tokenizer,
) -> Option<(u32, u32)> {
    let [start, end] = &pipeline.spec.generation.thinking[..] else { return None };
    let one = |name: &str| match tokenizer.encode(name, false, true)[..] {
        [id] => Some(id),
        _ => None,
    };
    Some((one(start)?, one(end)?))
}

/// A seed per (job, document, segment): stable across reruns and machines.
pub(crate) fn item_seed(job_seed: u64, document_id: &str, start: usize) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(job_seed.to_le_bytes());
    h.update(document_id.as_bytes());
    h.update((start as u64).to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

pub(crate) fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The engine request for one rendered prompt, with the pipeline's generation settings.
fn model_request(
    pipeline: &LoadedPipeline,
    rendered: RenderedPrompt,
    seed: u64,
    grammar: Option<medbatch_engine::Grammar>,
    images: Vec<Arc<Rgb8>>,
) -> GenerateRequest {
    let g = &pipeline.spec.generation;
    GenerateRequest {
        prompt: rendered.text,
        chat: pipeline.spec.prompt.format == PromptFormat::Chat,
        add_bos: true,
        parse_special: false,
        max_new_tokens: g.max_new_tokens,
        stop: g.stop.clone(),
        sampling: Sampling { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p, seed },
        grammar,
        images,
    }
}

/// The answer of a spawned request, or an error row's reason and detail. Grammar messages can
/// quote the segment the grammar copies from: they are never passed on.
async fn awaited(
    task: tokio::task::JoinHandle<Result<Generation, EngineError>>,
) -> Result<Generation, (ErrorReason, String)> {
    match task.await {
        Ok(Ok(g)) => Ok(g),
        Ok(Err(EngineError::Grammar(_))) => {
            Err((ErrorReason::Grammar, "the answer grammar was rejected by the decoder".into()))
        }
        Ok(Err(e)) => Err((engine_reason(&e), e.to_string())),
        Err(e) => Err((ErrorReason::EngineTask, format!("generation task failed: {e}"))),
    }
}

/// The error row's reason for an engine error.
fn engine_reason(e: &EngineError) -> ErrorReason {
    match e {
        EngineError::Load(_) => ErrorReason::ModelLoad,
        EngineError::Compute(_) => ErrorReason::Inference,
        EngineError::Request(_) => ErrorReason::InvalidRequest,
        EngineError::Grammar(_) => ErrorReason::Grammar,
        EngineError::Stopped => ErrorReason::EngineStopped,
    }
}

/// Why a constrained answer is not complete (it is then an error row, never a broken row).
fn incomplete(spec: &GenerationSpec, g: &Generation) -> Option<(ErrorReason, String)> {
    match g.finish {
        _ if !spec.constrained => None,
        Finish::Stop | Finish::Eos => None,
        Finish::Grammar => Some((ErrorReason::Grammar, "the decoder could not continue the answer grammar".into())),
        Finish::Length => {
            Some((ErrorReason::Truncated, format!("answer cut off at max_new_tokens ({})", spec.max_new_tokens)))
        }
    }
}
