//! `medbatch debug`: look inside the engine (token ids, logits, greedy continuations), so
//! anyone can hold it against a reference implementation.

use crate::model_path;
use medbatch_engine::models::gemma3::NumericOptions;
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum DebugCommand {
    /// Print the token ids of a text as JSON.
    Tokenize {
        #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
        model: String,
        /// Do not prepend BOS.
        #[arg(long)]
        no_bos: bool,
        /// Parse control tokens such as `<start_of_turn>` written in the text.
        #[arg(long)]
        special: bool,
        text: String,
    },
    /// Logits of the last position of a prompt given as token ids (every position with
    /// `--all`): `{"logits": [...]}`.
    Logits {
        #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
        model: String,
        /// Comma-separated prompt token ids (BOS included if wanted).
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Every position's logits, as a list of lists.
        #[arg(long)]
        all: bool,
        /// Print JSON (the only output format; accepted for scripts that pass it).
        #[arg(long)]
        json: bool,
        /// Print only the `top` highest logits of the last position, as `[[id, logit], ...]`.
        #[arg(long)]
        top: Option<usize>,
        /// Numerics: `default` (the model's own: llama.cpp's for GGUF, f32 for checkpoints),
        /// `f32`, `f16-attention` or `f16-gelu`.
        #[arg(long, default_value = "default")]
        numeric: String,
        /// Also write the last position's logits (little-endian f32) to this file.
        #[arg(long)]
        dump: Option<std::path::PathBuf>,
        #[command(flatten)]
        split: model_path::SplitArgs,
        /// An image (PNG or JPEG) for a multimodal model; repeat for several. `--tokens` holds
        /// each image as a run of `<image_soft_token>` ids (between `<start_of_image>` and
        /// `<end_of_image>`), and the i-th image fills the i-th run.
        #[arg(long = "image")]
        images: Vec<std::path::PathBuf>,
    },
    /// Greedy continuation: of a text (`{"text", "ids", ...}`), or of token ids with
    /// `--tokens` (`{"tokens": [...]}`).
    Generate {
        #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
        model: String,
        /// Wrap the text in the model's chat format (for instruction-tuned models).
        #[arg(long)]
        chat: bool,
        /// Comma-separated prompt token ids instead of a text.
        #[arg(long, value_delimiter = ',')]
        tokens: Option<Vec<u32>>,
        #[arg(long, alias = "max-tokens", default_value_t = 32)]
        max_new_tokens: u32,
        /// Print JSON (the only output format).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        split: model_path::SplitArgs,
        /// An image (PNG or JPEG) for a multimodal model; repeat for several. With `--tokens`
        /// the i-th image fills the i-th run of `<image_soft_token>` ids; with a text, the
        /// i-th `<start_of_image>` written in it.
        #[arg(long = "image")]
        images: Vec<std::path::PathBuf>,
        prompt: Option<String>,
    },
    /// A SigLIP model's (MedSigLIP's) embeddings, as transformers' `SiglipModel` gives them:
    /// `{"image_embeds": [[…]], "text_embeds": [[…]], "logits_per_image": [[…]]}` (embeddings
    /// L2-normalised; logits before the sigmoid).
    Embed {
        /// A `SiglipModel` checkpoint folder (config.json, safetensors, tokenizer.json,
        /// preprocessor_config.json).
        #[arg(long)]
        model: std::path::PathBuf,
        /// An image (PNG or JPEG); repeat for several.
        #[arg(long = "image")]
        images: Vec<std::path::PathBuf>,
        /// A text; repeat for several.
        #[arg(long = "text")]
        texts: Vec<String>,
        /// The CUDA device to run on (the first of the list; a build with the `cuda`
        /// feature). Default: the CPU.
        #[arg(long, value_delimiter = ',')]
        devices: Vec<usize>,
        /// Print JSON (the only output format).
        #[arg(long)]
        json: bool,
    },
}

fn numeric(name: &str, default: NumericOptions) -> anyhow::Result<NumericOptions> {
    Ok(match name {
        "default" => default,
        "llamacpp" => NumericOptions { f16_attention: true, f16_gelu: true },
        "f32" => NumericOptions { f16_attention: false, f16_gelu: false },
        "f16-attention" => NumericOptions { f16_attention: true, f16_gelu: false },
        "f16-gelu" => NumericOptions { f16_attention: false, f16_gelu: true },
        other => anyhow::bail!("--numeric {other:?}: use default, llamacpp, f32, f16-attention or f16-gelu"),
    })
}

/// `debug embed`: a SigLIP model's (MedSigLIP's) L2-normalised image and text embeddings
/// and `logits_per_image`, as transformers' `SiglipModel` returns them.
fn embed(
    model: &std::path::Path,
    images: &[std::path::PathBuf],
    texts: &[String],
    devices: &[usize],
) -> anyhow::Result<()> {
    use medbatch_engine::models::siglip::l2_normalize;
    anyhow::ensure!(!images.is_empty() || !texts.is_empty(), "give at least one --image or --text");
    let device = crate::model_path::embed_device(devices)?;
    let (siglip, tokenizer) = medbatch_engine::load::siglip::load_siglip(model, &device)?;
    let cfg = medbatch_engine::image::read_preprocessor_config(model, siglip.vision.image_size)?;
    let mut image_embeds = Vec::with_capacity(images.len());
    for img in read_images(images)? {
        let mut e = siglip.image_features(&medbatch_engine::image::pixel_values(&img, &cfg))?;
        l2_normalize(&mut e);
        image_embeds.push(e);
    }
    let mut text_embeds = Vec::with_capacity(texts.len());
    for t in texts {
        let mut e = siglip.text_features(&tokenizer.encode(t)?)?;
        l2_normalize(&mut e);
        text_embeds.push(e);
    }
    let logits: Vec<Vec<f32>> =
        image_embeds.iter().map(|i| text_embeds.iter().map(|t| siglip.logit(i, t)).collect()).collect();
    println!(
        "{}",
        serde_json::json!({ "image_embeds": image_embeds, "text_embeds": text_embeds, "logits_per_image": logits })
    );
    Ok(())
}

/// Decodes the images given on the command line.
fn read_images(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<std::sync::Arc<medbatch_engine::image::Rgb8>>> {
    paths
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            let img = medbatch_formats::image::decode(&bytes, &Default::default())
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            let img = medbatch_engine::image::to_rgb(img).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            Ok(std::sync::Arc::new(img))
        })
        .collect()
}

pub fn main(cmd: DebugCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DebugCommand::Tokenize { model, no_bos, special, text } => {
            let engine = model_path::load_engine(&model)?;
            let ids = engine.tokenizer.encode(&text, !no_bos, special);
            println!("{}", serde_json::to_string(&ids)?);
        }
        DebugCommand::Logits { model, tokens, all, json: _, top, numeric: num, dump, split, images } => {
            let mut engine = split.load(&model)?;
            engine.model.numeric = numeric(&num, engine.model.numeric)?;
            anyhow::ensure!(!tokens.is_empty(), "--tokens is empty");
            let image_rows = engine.encode_images(&read_images(&images)?)?;
            let rows = engine.all_logits_with(&tokens, image_rows.as_ref())?;
            let last = rows.last().expect("at least one token");
            if let Some(p) = dump {
                let bytes: Vec<u8> = last.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::fs::write(&p, bytes)?;
            }
            match top {
                Some(k) => {
                    let mut order: Vec<usize> = (0..last.len()).collect();
                    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
                    let best: Vec<_> = order.iter().take(k).map(|&i| serde_json::json!([i, last[i]])).collect();
                    println!("{}", serde_json::json!({ "top": best }));
                }
                None if all => println!("{}", serde_json::json!({ "logits": rows })),
                None => println!("{}", serde_json::json!({ "logits": last })),
            }
        }
        DebugCommand::Embed { model, images, texts, devices, json: _ } => embed(&model, &images, &texts, &devices)?,
        DebugCommand::Generate { model, chat, tokens, max_new_tokens, json: _, split, images, prompt } => {
            let mut engine = split.load(&model)?;
            let images = read_images(&images)?;
            match (tokens, prompt) {
                (Some(ids), None) => {
                    anyhow::ensure!(!ids.is_empty(), "--tokens is empty");
                    let image_rows = engine.encode_images(&images)?;
                    let out = engine.greedy_ids_with(&ids, image_rows.as_ref(), max_new_tokens as usize)?;
                    println!("{}", serde_json::json!({ "tokens": out }));
                }
                (None, Some(prompt)) => {
                    let g = engine.generate(&medbatch_engine::GenerateRequest {
                        prompt,
                        chat,
                        add_bos: true,
                        parse_special: !images.is_empty(),
                        max_new_tokens,
                        stop: Vec::new(),
                        sampling: medbatch_engine::sampling::Sampling::greedy(),
                        grammar: None,
                        images,
                    })?;
                    println!(
                        "{}",
                        serde_json::json!({ "text": g.text, "ids": g.ids, "prompt_tokens": g.prompt_tokens, "finish": format!("{:?}", g.finish), "engine_ms": g.engine_ms })
                    );
                }
                _ => anyhow::bail!("give either a prompt text or --tokens"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
