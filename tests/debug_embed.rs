//! `medbatch debug embed` on the tiny SigLIP checkpoint (`tests/fixtures/siglip/tiny/`):
//! the image file's and the texts' embeddings equal transformers' (within 1e-4), and the
//! logits are the scale and bias of the checkpoint over their dot products.

mod common;

use common::*;
use serde_json::Value;

fn vector(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn debug_embed_prints_transformers_embeddings_and_logits() {
    let dir = repo_root().join("tests/fixtures/siglip/tiny");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let texts = reference["texts"].as_array().unwrap();
    let (a, b) = (texts[0].as_str().unwrap(), texts[2].as_str().unwrap());
    let picture = dir.join("picture.png");
    let o = medbatch(&[
        "debug",
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        picture.to_str().unwrap(),
        "--text",
        a,
        "--text",
        b,
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let got: Value = serde_json::from_slice(&o.stdout).unwrap();
    let close = |x: &[f64], y: &[f64]| x.len() == y.len() && x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-4);
    let image = vector(&got["image_embeds"][0]);
    assert!(close(&image, &vector(&reference["picture_image_embeds"])), "{image:?}");
    let want_texts = [vector(&reference["text_embeds"][0]), vector(&reference["text_embeds"][2])];
    for (k, want) in want_texts.iter().enumerate() {
        assert!(close(&vector(&got["text_embeds"][k]), want), "text {k}");
    }
    // The fixture's logit scale is e^2.3 and its bias -1.5.
    let logits = vector(&got["logits_per_image"][0]);
    for (k, want) in want_texts.iter().enumerate() {
        let dot: f64 = image.iter().zip(want).map(|(p, q)| p * q).sum();
        assert!((logits[k] - (2.3f64.exp() * dot - 1.5)).abs() < 1e-3, "{logits:?}");
    }
    // Nothing to embed is an error, not an empty answer.
    let o = medbatch(&["debug", "embed", "--model", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--image or --text"), "{}", text(&o.stderr));
}
