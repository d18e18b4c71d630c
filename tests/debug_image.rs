//! `medbatch debug logits|generate --image`: the multimodal parity fixture through the CLI.

mod common;

use common::*;

fn fixture() -> (String, serde_json::Value) {
    let dir = repo_root().join("tests/fixtures/hf/multimodal/mm_window");
    let r = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (dir.to_string_lossy().into_owned(), r)
}

fn list(v: &serde_json::Value) -> String {
    v.as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn image_args(p: &serde_json::Value) -> Vec<String> {
    let base = repo_root().join("tests/fixtures/hf");
    p["images"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| ["--image".to_string(), base.join(i.as_str().unwrap()).to_string_lossy().into_owned()])
        .collect()
}

#[test]
fn logits_and_greedy_tokens_with_images() {
    let (model, r) = fixture();
    for p in r["prompts"].as_array().unwrap() {
        let tokens = list(&p["input_ids"]);
        let mut args = vec!["debug", "logits", "--model", &model, "--tokens", &tokens];
        let images = image_args(p);
        args.extend(images.iter().map(String::as_str));
        let o = medbatch(&args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let got: Vec<f32> = got["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let bytes =
            std::fs::read(repo_root().join("tests/fixtures/hf").join(p["full_logits"]["file"].as_str().unwrap()))
                .unwrap();
        let want: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let last = &want[want.len() - got.len()..];
        let d = got.iter().zip(last).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-4, "{}: last-position logits differ by {d}", p["name"]);
        // The model split over two tensor-parallel ranks.
        let mut split = args.clone();
        split.extend(["--tp", "2"]);
        let o = medbatch(&split);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let d = v["logits"].as_array().unwrap().iter().zip(&got).map(|(a, b)| (a.as_f64().unwrap() as f32 - b).abs());
        assert!(d.fold(0f32, f32::max) <= 1e-4, "{}: --tp 2 logits", p["name"]);

        let mut args = vec!["debug", "generate", "--model", &model, "--tokens", &tokens, "--max-new-tokens", "8"];
        args.extend(images.iter().map(String::as_str));
        let o = medbatch(&args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(got["tokens"], p["greedy"]["tokens"], "{}", p["name"]);

        // The prompt as text: the engine expands each marker as the processor does.
        let mut args = vec!["debug", "generate", "--model", &model, "--max-new-tokens", "8"];
        args.extend(images.iter().map(String::as_str));
        args.push(p["text"].as_str().unwrap());
        let o = medbatch(&args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(got["ids"], p["greedy"]["tokens"], "{} from text", p["name"]);
        assert_eq!(got["prompt_tokens"].as_u64().unwrap() as usize, p["input_ids"].as_array().unwrap().len());
    }
}

#[test]
fn images_are_refused_clearly() {
    let (model, r) = fixture();
    let p = &r["prompts"][0];
    let tokens = list(&p["input_ids"]);
    // A soft-token run without an image.
    let o = medbatch(&["debug", "logits", "--model", &model, "--tokens", &tokens]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("no image"), "{}", text(&o.stderr));
    // A file that is not an image is named.
    let bogus = repo_root().join("README.md");
    let o = medbatch(&["debug", "logits", "--model", &model, "--tokens", &tokens, "--image", bogus.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("README.md"), "{}", text(&o.stderr));
}
