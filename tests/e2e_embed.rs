//! End-to-end: the image-embeddings pipeline with the tiny random-weight SigLIP checkpoint
//! (`tests/fixtures/siglip/tiny/`): each image's row holds transformers' embedding of it and
//! the sigmoid label probabilities; a bad file is an error row; a model of another width is
//! refused row by row.

mod common;

use arrow::array::AsArray;
use arrow::datatypes::Float32Type;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn siglip() -> PathBuf {
    repo_root().join("tests/fixtures/siglip/tiny")
}

/// The image-embeddings pipeline sized for the tiny model (32 dimensions), without padding
/// (the fixture's reference is of the unpadded image), with two of the fixture's texts as
/// labels.
fn pipeline(dir: &Path, dimensions: usize, labels: [&str; 2]) -> PathBuf {
    let p = dir.join(format!("image-embeddings-{dimensions}"));
    std::fs::create_dir_all(&p).unwrap();
    let toml = std::fs::read_to_string(repo_root().join("pipelines/image-embeddings/pipeline.toml")).unwrap();
    let head = &toml[..toml.find("[[embed.labels]]").unwrap()];
    let mut toml = head
        .replace("dimensions = 1152", &format!("dimensions = {dimensions}"))
        .replace("pad_to_square = true", "pad_to_square = false");
    for (k, text) in labels.iter().enumerate() {
        toml.push_str(&format!("[[embed.labels]]\nname = \"l{k}\"\ntext = \"{text}\"\n\n"));
    }
    toml.push_str("[output]\ntable = \"image_embeddings\"\n");
    std::fs::write(p.join("pipeline.toml"), toml).unwrap();
    p
}

#[test]
fn image_embeddings_equal_transformers_with_label_probabilities() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(siglip().join("reference.json")).unwrap()).unwrap();
    let texts = reference["texts"].as_array().unwrap();
    let labels = [texts[0].as_str().unwrap(), texts[2].as_str().unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::copy(siglip().join("picture.png"), images.join("picture.png")).unwrap();
    std::fs::write(images.join("notes.png"), "Seen in clinic today.").unwrap();
    let p = pipeline(dir.path(), 32, labels);
    let out = dir.path().join("out");
    let model = siglip();
    let o = medbatch(&[
        "run",
        p.to_str().unwrap(),
        images.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (rows, _, batches) = read_parquet_dir(&out.join("image_embeddings"));
    assert_eq!(rows, 1);
    let b = &batches.iter().find(|b| b.num_rows() > 0).unwrap();
    let emb = b.column_by_name("embedding").unwrap().as_fixed_size_list();
    assert_eq!(emb.value_length(), 32);
    let got: Vec<f32> = emb.value(0).as_primitive::<Float32Type>().values().to_vec();
    let want: Vec<f32> =
        reference["picture_image_embeds"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4), "{got:?}");
    for (k, t) in [0usize, 2].iter().enumerate() {
        let text: Vec<f32> =
            reference["text_embeds"][*t].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let dot: f32 = want.iter().zip(&text).map(|(a, b)| a * b).sum();
        let p = 1.0 / (1.0 + (-(2.3f32.exp() * dot - 1.5)).exp());
        let col = b.column_by_name(&format!("label_l{k}")).unwrap().as_primitive::<Float32Type>();
        assert!((col.value(0) - p).abs() < 1e-4, "label {k}: {} against {p}", col.value(0));
    }
    assert_eq!(string_column(&batches, "model_id"), [Some("tiny".to_string())]);
    assert_eq!(string_column(&batches, "document_id"), [Some("picture.png".to_string())]);
    let (_, _, eb) = read_parquet_dir(&out.join("_errors"));
    let reasons: Vec<Option<String>> = string_column(&eb, "reason");
    assert_eq!(reasons, [Some("wrong_format".to_string())], "{:?}", string_column(&eb, "detail"));

    // A pipeline whose table holds another width: an error row, no embedding written.
    let wrong = pipeline(dir.path(), 16, labels);
    let out2 = dir.path().join("out2");
    let o = medbatch(&[
        "run",
        wrong.to_str().unwrap(),
        images.join("picture.png").to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (_, _, eb) = read_parquet_dir(&out2.join("_errors"));
    let detail = string_column(&eb, "detail");
    assert!(detail[0].as_deref().unwrap().contains("32 dimensions"), "{detail:?}");
}

/// Text embeddings of a note: chunks of whole words covering the note in order, each row's
/// embedding the one `medbatch debug embed --text CHUNK` gives for its text.
#[test]
fn text_embeddings_embed_each_chunk_of_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("text-embeddings");
    std::fs::create_dir(&p).unwrap();
    let toml = std::fs::read_to_string(repo_root().join("pipelines/text-embeddings/pipeline.toml")).unwrap();
    std::fs::write(p.join("pipeline.toml"), toml.replace("dimensions = 1152", "dimensions = 32")).unwrap();
    let note = "Chest radiograph: no acute findings. Small left pleural effusion, unchanged since \
                the prior study; cardiomegaly is not seen. Recommend follow-up in six weeks.\n\
                Pathology: invasive ductal carcinoma of the breast, grade 2, margins clear.";
    let file = dir.path().join("note.txt");
    std::fs::write(&file, note).unwrap();
    let out = dir.path().join("out");
    let model = siglip();
    let o = medbatch(&[
        "run",
        p.to_str().unwrap(),
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (rows, _, batches) = read_parquet_dir(&out.join("text_embeddings"));
    assert!(rows >= 2, "a note longer than 63 tokens of the tiny tokenizer is several chunks: {rows}");
    let starts: Vec<usize> =
        string_column(&batches, "evidence_start").into_iter().map(|v| v.unwrap().parse().unwrap()).collect();
    let ends: Vec<usize> =
        string_column(&batches, "evidence_end").into_iter().map(|v| v.unwrap().parse().unwrap()).collect();
    let chars: Vec<char> = note.chars().collect();
    let pieces: Vec<String> = starts.iter().zip(&ends).map(|(&a, &b)| chars[a..b].iter().collect()).collect();
    // Every word once, in order; chunks end and start on word boundaries.
    assert_eq!(pieces.join(" ").split_whitespace().collect::<Vec<_>>(), note.split_whitespace().collect::<Vec<_>>());
    assert!(starts.windows(2).all(|w| w[0] < w[1]));
    let b = batches.iter().find(|b| b.num_rows() > 0).unwrap();
    let emb = b.column_by_name("embedding").unwrap().as_fixed_size_list();
    for (k, piece) in pieces.iter().enumerate() {
        let o = medbatch(&["debug", "embed", "--model", model.to_str().unwrap(), "--text", piece, "--json"]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let want: Value = serde_json::from_slice(&o.stdout).unwrap();
        let want: Vec<f32> =
            want["text_embeds"][0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let got: Vec<f32> = emb.value(k).as_primitive::<Float32Type>().values().to_vec();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "chunk {k}");
    }
}
