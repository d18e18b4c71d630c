//! The embedding service: a SigLIP model (MedSigLIP) on a thread of its own, taking `Embed`
//! requests — images and texts — from any number of callers and running them in batches:
//! whatever requests are waiting when the thread turns to them are gathered, their images
//! preprocessed and sent through the image tower `max_batch` at a time, their texts through
//! the text tower likewise, and each caller gets its own embeddings back (L2-normalised, in
//! request order). The generation service (`service`) serves Gemma models; this one serves
//! the encoder-only SigLIP.

use crate::image::{pixel_values, ImageConfig, Rgb8};
use crate::models::siglip::{l2_normalize, SiglipModel};
use crate::tokenizer::siglip::SiglipTokenizer;
use crate::EngineError;
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// What to embed.
#[derive(Clone, Debug, Default)]
pub struct EmbedRequest {
    pub images: Vec<Arc<Rgb8>>,
    pub texts: Vec<String>,
}

/// L2-normalised embeddings, one per image and per text of the request, in its order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Embeddings {
    pub images: Vec<Vec<f32>>,
    pub texts: Vec<Vec<f32>>,
}

/// What the service tells about its model.
#[derive(Clone, Debug)]
pub struct EmbedInfo {
    /// The checkpoint folder's name, and its fingerprint (as generation models are named
    /// in jobs).
    pub id: String,
    pub digest: String,
    /// The embedding width.
    pub dim: usize,
    /// `exp(logit_scale)` and `logit_bias`: a text's logit for an image is
    /// `scale · ⟨image, text⟩ + bias` (its sigmoid the probability).
    pub scale: f32,
    pub bias: f32,
    /// Requests' images and texts run this many at a time.
    pub max_batch: usize,
}

impl EmbedInfo {
    /// The sigmoid probability that `text` describes `image` (both L2-normalised).
    pub fn probability(&self, image: &[f32], text: &[f32]) -> f32 {
        let dot: f32 = image.iter().zip(text).map(|(a, b)| a * b).sum();
        1.0 / (1.0 + (-(self.scale * dot + self.bias)).exp())
    }
}

type Reply = oneshot::Sender<Result<Embeddings, EngineError>>;

/// A handle to the embedding thread (cheap to clone).
#[derive(Clone)]
pub struct EmbedHandle {
    tx: mpsc::Sender<(EmbedRequest, Reply)>,
    info: EmbedInfo,
    tokenizer: Arc<SiglipTokenizer>,
}

impl EmbedHandle {
    /// Loads a `SiglipModel` checkpoint folder (weights, tokenizer, processor settings) on
    /// `device` (the CPU, or a CUDA device in a build with the `cuda` feature) and starts its
    /// thread.
    pub fn load(dir: &std::path::Path, max_batch: usize, device: &candle_core::Device) -> Result<Self, EngineError> {
        let (model, tokenizer) = crate::load::siglip::load_siglip(dir, device)?;
        let images = crate::image::read_preprocessor_config(dir, model.vision.image_size)?;
        let mut h = Self::start(model, tokenizer, images, max_batch)?;
        h.info.id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        h.info.digest = crate::engine::checkpoint_fingerprint(dir).map_err(|e| EngineError::Load(e.to_string()))?;
        Ok(h)
    }

    /// Starts the thread with its model, tokenizer and image processing settings.
    pub fn start(
        model: SiglipModel,
        tokenizer: SiglipTokenizer,
        images: ImageConfig,
        max_batch: usize,
    ) -> Result<Self, EngineError> {
        let info = EmbedInfo {
            id: String::new(),
            digest: String::new(),
            dim: model.text.head.weight.dim(0).map_err(EngineError::from)?,
            scale: model.logit_scale.exp(),
            bias: model.logit_bias,
            max_batch: max_batch.max(1),
        };
        let (tx, rx) = mpsc::channel();
        let batch = info.max_batch;
        let tokenizer = Arc::new(tokenizer);
        let theirs = tokenizer.clone();
        std::thread::Builder::new()
            .name("medbatch-embed".into())
            .spawn(move || serve(&model, &theirs, &images, batch, &rx))
            .map_err(|e| EngineError::Load(format!("embedding thread: {e}")))?;
        Ok(Self { tx, info, tokenizer })
    }

    pub fn info(&self) -> &EmbedInfo {
        &self.info
    }

    /// The model's tokenizer (to split texts into chunks the text tower reads whole).
    pub fn tokenizer(&self) -> &SiglipTokenizer {
        &self.tokenizer
    }

    /// Embeds a request's images and texts (batched with whatever else is waiting).
    pub async fn embed(&self, req: EmbedRequest) -> Result<Embeddings, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((req, reply)).map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }
}

/// The thread: takes every waiting request, runs their images and texts in batches, answers.
fn serve(
    model: &SiglipModel,
    tokenizer: &SiglipTokenizer,
    cfg: &ImageConfig,
    max_batch: usize,
    rx: &mpsc::Receiver<(EmbedRequest, Reply)>,
) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let results = run(model, tokenizer, cfg, max_batch, waiting.iter().map(|(r, _)| r));
        match results {
            Ok(all) => {
                // A caller that gave up has dropped its receiver: nothing to tell it.
                for ((_, reply), mine) in waiting.into_iter().zip(split(all)) {
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for (_, reply) in waiting {
                    let _ = reply.send(Err(EngineError::Compute(e.to_string())));
                }
            }
        }
    }
}

/// Every image and text of the waiting requests, embedded, in order.
fn run<'a>(
    model: &SiglipModel,
    tokenizer: &SiglipTokenizer,
    cfg: &ImageConfig,
    max_batch: usize,
    requests: impl Iterator<Item = &'a EmbedRequest> + Clone,
) -> Result<(Vec<usize>, Vec<usize>, Embeddings), EngineError> {
    let image_counts: Vec<usize> = requests.clone().map(|r| r.images.len()).collect();
    let text_counts: Vec<usize> = requests.clone().map(|r| r.texts.len()).collect();
    let mut out = Embeddings::default();
    let images: Vec<&Arc<Rgb8>> = requests.clone().flat_map(|r| r.images.iter()).collect();
    for chunk in images.chunks(max_batch) {
        let pixels: Vec<Vec<f32>> = chunk.iter().map(|img| pixel_values(img, cfg)).collect();
        let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
        out.images.extend(model.image_features_batch(&refs)?);
    }
    let texts: Vec<&String> = requests.flat_map(|r| r.texts.iter()).collect();
    for chunk in texts.chunks(max_batch) {
        let ids = chunk.iter().map(|t| tokenizer.encode(t)).collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        out.texts.extend(model.text_features_batch(&refs)?);
    }
    out.images.iter_mut().chain(out.texts.iter_mut()).for_each(|v| l2_normalize(v));
    Ok((image_counts, text_counts, out))
}

/// Splits the embeddings of all requests back into each request's.
fn split((image_counts, text_counts, all): (Vec<usize>, Vec<usize>, Embeddings)) -> Vec<Embeddings> {
    let (mut images, mut texts) = (all.images.into_iter(), all.texts.into_iter());
    image_counts
        .iter()
        .zip(&text_counts)
        .map(|(&i, &t)| Embeddings {
            images: images.by_ref().take(i).collect(),
            texts: texts.by_ref().take(t).collect(),
        })
        .collect()
}
