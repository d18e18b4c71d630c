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

/// Tile embeddings of a lossless slide (Deflate tiles) in bands of two grid rows: the same
/// tiles as wsi-tiles finds, and each row's embedding and label probabilities those `medbatch
/// debug embed` gives for the tile's pixels as OpenSlide reads them (written to a PNG). A
/// slide of glass is an error row.
#[test]
fn wsi_tile_embeddings_embed_each_tissue_tile_like_debug_embed_of_its_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made");
    make_slides(&made);
    let slides = dir.path().join("slides");
    std::fs::create_dir(&slides).unwrap();
    for f in ["deflate.tiff", "glass.tiff"] {
        std::fs::rename(made.join(f), slides.join(f)).unwrap();
    }
    // Tiles of 64 px at 10x (level 1 of the 20x slide), bands of 16 cells (two grid rows).
    let p = tile_embeddings_pipeline(dir.path());
    let toml = std::fs::read_to_string(p.join("pipeline.toml")).unwrap();
    let labels: Vec<String> =
        toml.lines().filter_map(|l| l.strip_prefix("text = \"").map(|t| t.trim_end_matches('"').to_string())).collect();
    assert_eq!(labels.len(), 3);
    let out = dir.path().join("out");
    let model = siglip();
    let o = medbatch(&[
        "run",
        p.to_str().unwrap(),
        slides.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (rows, _, batches) = read_parquet_dir(&out.join("wsi_tile_embeddings"));
    let col = |name: &str| string_column(&batches, name).into_iter().map(Option::unwrap).collect::<Vec<_>>();
    let num = |name: &str| col(name).into_iter().map(|v| v.parse::<u64>().unwrap()).collect::<Vec<_>>();
    let (ids, levels, xs, ys, widths) = (col("document_id"), num("level"), num("x"), num("y"), num("width"));
    assert!(rows >= 4, "{rows}");
    assert!(ids.iter().all(|d| d == "deflate.tiff") && levels.iter().all(|&l| l == 1), "{ids:?} {levels:?}");
    assert!(widths.iter().all(|&w| w == 64));
    let (_, _, eb) = read_parquet_dir(&out.join("_errors"));
    let errors: Vec<(String, String)> = string_column(&eb, "source_uri")
        .into_iter()
        .zip(string_column(&eb, "reason"))
        .map(|(u, r)| (u.unwrap().rsplit('/').next().unwrap().to_string(), r.unwrap()))
        .collect();
    assert_eq!(errors, [("glass.tiff".to_string(), "not_applicable".to_string())]);

    // The tiles wsi-tiles finds with the same grid.
    let tiles_out = dir.path().join("tiles-out");
    let o = medbatch(&[
        "run",
        tiles_pipeline(dir.path(), 64, 16).to_str().unwrap(),
        slides.join("deflate.tiff").to_str().unwrap(),
        "--out",
        tiles_out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (_, _, tb) = read_parquet_dir(&tiles_out.join("wsi_tiles"));
    let places = |b: &[arrow::record_batch::RecordBatch]| {
        let mut v: Vec<(String, String)> = string_column(b, "x")
            .into_iter()
            .zip(string_column(b, "y"))
            .map(|(x, y)| (x.unwrap(), y.unwrap()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(places(&batches), places(&tb), "the tiles of wsi-tiles, each once");

    // Each tile's pixels as OpenSlide reads them (level 1 is half of level 0), as a PNG.
    let pngs = dir.path().join("tiles");
    std::fs::create_dir(&pngs).unwrap();
    let regions: Vec<String> = xs.iter().zip(&ys).map(|(x, y)| format!("[{}, {}]", x * 2, y * 2)).collect();
    let script = format!(
        "import imagecodecs, numpy as np, openslide\n\
         s = openslide.OpenSlide({slide:?})\n\
         for k, (x, y) in enumerate([{regions}]):\n\
         \x20   rgb = np.ascontiguousarray(np.asarray(s.read_region((x, y), 1, (64, 64)))[..., :3])\n\
         \x20   open(f'{dir}/{{k}}.png', 'wb').write(imagecodecs.png_encode(rgb))\n",
        slide = slides.join("deflate.tiff").to_str().unwrap(),
        regions = regions.join(", "),
        dir = pngs.to_str().unwrap(),
    );
    let o = std::process::Command::new(python()).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut args = vec!["debug".to_string(), "embed".into(), "--model".into(), model.to_string_lossy().into_owned()];
    for k in 0..rows {
        args.extend(["--image".into(), pngs.join(format!("{k}.png")).to_string_lossy().into_owned()]);
    }
    for l in &labels {
        args.extend(["--text".into(), l.clone()]);
    }
    args.push("--json".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = medbatch(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let want: Value = serde_json::from_slice(&o.stdout).unwrap();
    let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<f32>>();
    let mut k = 0;
    for b in batches.iter().filter(|b| b.num_rows() > 0) {
        let emb = b.column_by_name("embedding").unwrap().as_fixed_size_list();
        for i in 0..b.num_rows() {
            let got: Vec<f32> = emb.value(i).as_primitive::<Float32Type>().values().to_vec();
            let expected = floats(&want["image_embeds"][k]);
            assert!(got.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-5), "tile {k}: {got:?} {expected:?}");
            let logits = floats(&want["logits_per_image"][k]);
            for (j, name) in ["tumor", "benign", "necrosis"].iter().enumerate() {
                let p = b.column_by_name(&format!("label_{name}")).unwrap().as_primitive::<Float32Type>().value(i);
                let expected = 1.0 / (1.0 + (-logits[j]).exp());
                assert!((p - expected).abs() < 1e-5, "tile {k} label {name}: {p} against {expected}");
            }
            k += 1;
        }
    }
    assert_eq!(k, rows);
}
