//! A whole SigLIP model (MedSigLIP's layout: vision tower with its attention-pooling head,
//! text tower, logit scale and bias) against transformers' `SiglipModel` on a tiny
//! random-weight checkpoint (`tests/fixtures/siglip/tiny/`, made by
//! `tests/fixtures/siglip/make_fixture.py`): token ids equal to SigLIP's reference tokenizer,
//! image and text embeddings and `logits_per_image` within 1e-4, and a PNG file through
//! SigLIP's image processor (Pillow's bicubic resize) to the same pixel values and embedding.

use medbatch_engine::load::siglip::load_siglip;
use medbatch_engine::models::siglip::l2_normalize;
use serde_json::Value;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/siglip/tiny")
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn siglip_embeddings_and_logits_match_transformers() {
    let dir = fixture();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (model, tokenizer) = load_siglip(&dir, &candle_core::Device::Cpu).unwrap();

    // Token ids: SigLIP's slow tokenizer, padded to 64 with EOS, truncated keeping EOS last.
    let mut texts = Vec::new();
    for (text, want) in reference["texts"].as_array().unwrap().iter().zip(reference["input_ids"].as_array().unwrap()) {
        let want: Vec<u32> = want.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = tokenizer.encode(text.as_str().unwrap()).unwrap();
        assert_eq!(got, want, "{text}");
        texts.push(got);
    }

    // Images: the fixture's pixel values, [2, 3, 56, 56].
    let bytes = std::fs::read(dir.join("pixel_values.f32le.bin")).unwrap();
    let pixels: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let per_image = pixels.len() / 2;
    let features = matrix(&reference["image_features"]);
    let want_images = matrix(&reference["image_embeds"]);
    let mut images = Vec::new();
    for (k, chunk) in pixels.chunks_exact(per_image).enumerate() {
        let mut e = model.image_features(chunk).unwrap();
        let d = max_diff(&e, &features[k]);
        assert!(d < 1e-4, "pooled image {k}: max |Δ| {d}");
        l2_normalize(&mut e);
        let d = max_diff(&e, &want_images[k]);
        assert!(d < 1e-4, "image embedding {k}: max |Δ| {d}");
        images.push(e);
    }
    let want_texts = matrix(&reference["text_embeds"]);
    let mut text_embeds = Vec::new();
    for (k, ids) in texts.iter().enumerate() {
        let mut e = model.text_features(ids).unwrap();
        l2_normalize(&mut e);
        let d = max_diff(&e, &want_texts[k]);
        assert!(d < 1e-4, "text embedding {k}: max |Δ| {d}");
        text_embeds.push(e);
    }
    let want_logits = matrix(&reference["logits_per_image"]);
    for (i, image) in images.iter().enumerate() {
        let got: Vec<f32> = text_embeds.iter().map(|t| model.logit(image, t)).collect();
        let d = max_diff(&got, &want_logits[i]);
        assert!(d < 1e-4, "logits_per_image row {i}: max |Δ| {d} ({got:?} against {:?})", want_logits[i]);
    }
}

#[test]
fn an_image_file_is_preprocessed_and_embedded_as_transformers_does() {
    let dir = fixture();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (model, _) = load_siglip(&dir, &candle_core::Device::Cpu).unwrap();
    let cfg = medbatch_engine::image::read_preprocessor_config(&dir, model.vision.image_size).unwrap();
    assert_eq!(cfg.filter, medbatch_engine::image::Filter::Bicubic);
    let img = medbatch_engine::image::to_rgb(image::open(dir.join("picture.png")).unwrap()).unwrap();
    let pixels = medbatch_engine::image::pixel_values(&img, &cfg);
    let want: Vec<f32> =
        reference["picture_pixel_values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let d = max_diff(&pixels, &want);
    assert!(d < 1e-6, "pixel values: max |Δ| {d} (Pillow's bicubic resize, 8-bit passes)");
    let mut e = model.image_features(&pixels).unwrap();
    l2_normalize(&mut e);
    let want: Vec<f32> =
        reference["picture_image_embeds"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let d = max_diff(&e, &want);
    assert!(d < 1e-4, "image embedding: max |Δ| {d}");
}

#[test]
fn a_batch_gives_each_item_what_it_gives_alone() {
    let dir = fixture();
    let (model, tokenizer) = load_siglip(&dir, &candle_core::Device::Cpu).unwrap();
    let bytes = std::fs::read(dir.join("pixel_values.f32le.bin")).unwrap();
    let pixels: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let images: Vec<&[f32]> = pixels.chunks_exact(pixels.len() / 2).collect();
    let batch = model.image_features_batch(&images).unwrap();
    for (k, img) in images.iter().enumerate() {
        let d = max_diff(&batch[k], &model.image_features(img).unwrap());
        assert!(d < 1e-5, "image {k}: max |Δ| {d}");
    }
    let ids: Vec<Vec<u32>> = ["pleural effusion", "a chest x-ray", "normal colonic mucosa"]
        .iter()
        .map(|t| tokenizer.encode(t).unwrap())
        .collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batch = model.text_features_batch(&refs).unwrap();
    for (k, t) in refs.iter().enumerate() {
        let d = max_diff(&batch[k], &model.text_features(t).unwrap());
        assert!(d < 1e-5, "text {k}: max |Δ| {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedding_service_batches_callers_and_answers_each_its_own() {
    use medbatch_engine::embed::{EmbedHandle, EmbedRequest};
    let dir = fixture();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (model, tokenizer) = load_siglip(&dir, &candle_core::Device::Cpu).unwrap();
    let cfg = medbatch_engine::image::read_preprocessor_config(&dir, model.vision.image_size).unwrap();
    let handle = EmbedHandle::start(model, tokenizer, cfg, 2).unwrap();
    let picture =
        std::sync::Arc::new(medbatch_engine::image::to_rgb(image::open(dir.join("picture.png")).unwrap()).unwrap());
    let texts: Vec<String> =
        reference["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    // Three callers at once: images and texts spread over them, more than one batch.
    let calls = [
        EmbedRequest { images: vec![picture.clone()], texts: vec![texts[0].clone(), texts[1].clone()] },
        EmbedRequest { images: vec![picture.clone(), picture.clone()], texts: vec![] },
        EmbedRequest { images: vec![], texts: vec![texts[3].clone(), texts[2].clone()] },
    ];
    let answers = futures_join(&handle, calls).await;
    let want_image: Vec<f32> =
        reference["picture_image_embeds"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let want_texts = matrix(&reference["text_embeds"]);
    assert_eq!((answers[0].images.len(), answers[0].texts.len()), (1, 2));
    assert_eq!((answers[1].images.len(), answers[1].texts.len()), (2, 0));
    assert_eq!((answers[2].images.len(), answers[2].texts.len()), (0, 2));
    for e in answers[0].images.iter().chain(&answers[1].images) {
        assert!(max_diff(e, &want_image) < 1e-4);
    }
    for (got, want) in
        [(&answers[0].texts[0], 0), (&answers[0].texts[1], 1), (&answers[2].texts[0], 3), (&answers[2].texts[1], 2)]
    {
        assert!(max_diff(got, &want_texts[want]) < 1e-4, "text {want}");
    }
    // The sigmoid of the fixture's logit.
    let p = handle.info().probability(&answers[0].images[0], &answers[0].texts[0]);
    let dot: f32 = answers[0].images[0].iter().zip(&answers[0].texts[0]).map(|(a, b)| a * b).sum();
    assert!((p - 1.0 / (1.0 + (-(2.3f32.exp() * dot - 1.5)).exp())).abs() < 1e-6);
}

async fn futures_join(
    handle: &medbatch_engine::embed::EmbedHandle,
    calls: [medbatch_engine::embed::EmbedRequest; 3],
) -> Vec<medbatch_engine::embed::Embeddings> {
    let [a, b, c] = calls;
    let (x, y, z) = tokio::join!(handle.embed(a), handle.embed(b), handle.embed(c));
    vec![x.unwrap(), y.unwrap(), z.unwrap()]
}
