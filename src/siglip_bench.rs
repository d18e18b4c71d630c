//! `medbatch bench siglip`: embedding speed of a random-weight SigLIP of MedSigLIP-448's shape
//! (vision 448/14, 1,024 patches, 27 layers, hidden 1,152, 16 heads, MLP 4,304, with the
//! attention-pooling head; text 27 layers of the same width, 64 tokens, vocabulary 32,000), in
//! f32 on the CPU: images per second through the processor's bicubic resize and the tower,
//! texts per second through the tokenizer's framing and the text tower, peak memory.

use candle_core::{Device, Tensor};
use medbatch_engine::models::siglip::{
    l2_normalize, BiasLinear, LayerNorm, PoolingHead, SiglipModel, TextTower, VisionEncoder, VisionLayer,
};
use std::process::ExitCode;
use std::time::Instant;

const HIDDEN: usize = 1152;
const MLP: usize = 4304;
const LAYERS: usize = 27;
const HEADS: usize = 16;
const IMAGE: usize = 448;
const PATCH: usize = 14;
const VOCAB: usize = 32000;
const TEXT_LENGTH: usize = 64;

/// Weights N(0, 1/fan_in) and norms near one, so activations keep a realistic scale.
struct Random {
    dev: Device,
}

impl Random {
    fn lin(&self, out: usize, inp: usize) -> anyhow::Result<BiasLinear> {
        Ok(BiasLinear {
            weight: Tensor::randn(0f32, (1.0 / inp as f64).sqrt() as f32, (out, inp), &self.dev)?,
            bias: Tensor::randn(0f32, 0.02, out, &self.dev)?,
        })
    }

    fn ln(&self) -> anyhow::Result<LayerNorm> {
        Ok(LayerNorm {
            weight: (Tensor::randn(0f32, 0.1, HIDDEN, &self.dev)? + 1.0)?,
            bias: Tensor::zeros(HIDDEN, candle_core::DType::F32, &self.dev)?,
            eps: 1e-6,
        })
    }

    fn layers(&self) -> anyhow::Result<Vec<VisionLayer>> {
        (0..LAYERS)
            .map(|_| {
                Ok(VisionLayer {
                    layer_norm1: self.ln()?,
                    q: self.lin(HIDDEN, HIDDEN)?,
                    k: self.lin(HIDDEN, HIDDEN)?,
                    v: self.lin(HIDDEN, HIDDEN)?,
                    out: self.lin(HIDDEN, HIDDEN)?,
                    layer_norm2: self.ln()?,
                    fc1: self.lin(MLP, HIDDEN)?,
                    fc2: self.lin(HIDDEN, MLP)?,
                })
            })
            .collect()
    }

    fn model(&self) -> anyhow::Result<SiglipModel> {
        let patches = (IMAGE / PATCH).pow(2);
        let vision = VisionEncoder {
            image_size: IMAGE,
            patch_size: PATCH,
            num_channels: 3,
            num_heads: HEADS,
            patch: self.lin(HIDDEN, 3 * PATCH * PATCH)?,
            position: Tensor::randn(0f32, 0.02, (patches, HIDDEN), &self.dev)?,
            layers: self.layers()?,
            post_layernorm: self.ln()?,
            device: self.dev.clone(),
        };
        let head = PoolingHead {
            probe: Tensor::randn(0f32, 1.0, (1, HIDDEN), &self.dev)?,
            q: self.lin(HIDDEN, HIDDEN)?,
            k: self.lin(HIDDEN, HIDDEN)?,
            v: self.lin(HIDDEN, HIDDEN)?,
            out: self.lin(HIDDEN, HIDDEN)?,
            layernorm: self.ln()?,
            fc1: self.lin(MLP, HIDDEN)?,
            fc2: self.lin(HIDDEN, MLP)?,
        };
        let text = TextTower {
            token: Tensor::randn(0f32, 0.02, (VOCAB, HIDDEN), &self.dev)?,
            position: Tensor::randn(0f32, 0.02, (TEXT_LENGTH, HIDDEN), &self.dev)?,
            layers: self.layers()?,
            final_layer_norm: self.ln()?,
            head: self.lin(HIDDEN, HIDDEN)?,
            num_heads: HEADS,
        };
        Ok(SiglipModel { vision, head, text, logit_scale: 2.3, logit_bias: -10.0 })
    }
}

/// `--runs` timed batches of each size of `batches` (the CPU: one image or text at a time),
/// on the first of `devices` (none: the CPU); the median of each is reported.
pub fn run(runs: usize, devices: &[usize], batches: &[usize]) -> anyhow::Result<ExitCode> {
    let t = Instant::now();
    let dev = crate::model_path::embed_device(devices)?;
    let on_gpu = !devices.is_empty();
    let batches: Vec<usize> = if on_gpu { batches.iter().copied().filter(|&b| b > 0).collect() } else { vec![1] };
    anyhow::ensure!(!batches.is_empty(), "--batches: give at least one batch size");
    let model = Random { dev: dev.clone() }.model()?;
    let place = match devices.first() {
        Some(i) => format!("CUDA device {i}"),
        None => format!("CPU, {} threads", medbatch_engine::kernels::threads()),
    };
    println!(
        "SigLIP of MedSigLIP-448's shape: vision {IMAGE}/{PATCH} ({} patches) and text ({TEXT_LENGTH} tokens), {LAYERS} layers each, hidden {HIDDEN}, {HEADS} heads, MLP {MLP}; f32, {place}; random weights made in {:.1} s",
        (IMAGE / PATCH).pow(2),
        t.elapsed().as_secs_f64()
    );
    let cfg = medbatch_engine::image::ImageConfig {
        size: IMAGE,
        filter: medbatch_engine::image::Filter::Bicubic,
        ..Default::default()
    };
    let png = crate::bench::synthetic_image(1024, 1024, true, image::ImageFormat::Png)?;
    let img = medbatch_engine::image::to_rgb(medbatch_formats::image::decode(&png, &Default::default())?)?;
    // A batch of images: each through the processor's resize (on the CPU), then the tower.
    let images = |b: usize| -> anyhow::Result<f64> {
        let t = Instant::now();
        let pixels: Vec<Vec<f32>> = (0..b).map(|_| medbatch_engine::image::pixel_values(&img, &cfg)).collect();
        let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
        let mut out = model.image_features_batch(&refs)?;
        out.iter_mut().for_each(|e| l2_normalize(e));
        anyhow::ensure!(
            out.len() == b && out.iter().all(|e| e.len() == HIDDEN && e.iter().all(|x| x.is_finite())),
            "the image tower's output is not an embedding"
        );
        Ok(t.elapsed().as_secs_f64())
    };
    // Texts: label prompts of the zero-shot kind; the tower always reads 64 positions.
    let texts = |b: usize, r: usize| -> anyhow::Result<f64> {
        let ids: Vec<Vec<u32>> = (0..b)
            .map(|k| (0..TEXT_LENGTH as u32).map(|i| (i * 37 + (r * b + k) as u32 * 101) % VOCAB as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let t = Instant::now();
        let mut out = model.text_features_batch(&refs)?;
        out.iter_mut().for_each(|e| l2_normalize(e));
        anyhow::ensure!(out.iter().flatten().all(|x| x.is_finite()), "the text tower produced non-finite values");
        Ok(t.elapsed().as_secs_f64())
    };
    for &b in &batches {
        if on_gpu {
            // The first call loads kernels and fills the allocator's pools: not timed.
            images(b)?;
            texts(b, 0)?;
        }
        let mut image_times = Vec::with_capacity(runs);
        for r in 0..runs {
            let secs = images(b)?;
            if !on_gpu {
                println!("  image {}: {secs:.2} s", r + 1);
            }
            image_times.push(secs);
        }
        let text_times = (0..runs * 4).map(|r| texts(b, r)).collect::<anyhow::Result<Vec<f64>>>()?;
        let image_s = crate::bench::median(image_times);
        let text_s = crate::bench::median(text_times);
        println!(
            "batch {b}: median {image_s:.3} s per batch of images ({:.2} images/s), {text_s:.4} s per batch of texts ({:.1} texts/s)",
            b as f64 / image_s,
            b as f64 / text_s,
        );
    }
    println!("peak memory {:.0} MiB (host)", crate::bench::peak_rss_mib().unwrap_or(0.0));
    Ok(ExitCode::SUCCESS)
}
