//! `medbatch debug`: look inside the engine (token ids, greedy continuations).

use crate::model_path;
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
    /// Logits at the last position of a prompt given as token ids; prints the top entries as
    /// JSON, and writes every logit (little-endian f32) to `--dump` if given.
    Logits {
        #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
        model: String,
        /// Comma-separated prompt token ids (BOS included if wanted).
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Reference numerics: `llamacpp` (f16 KV and GELU table, the GGUF default) or `f32`.
        #[arg(long, default_value = "llamacpp")]
        numeric: String,
        #[arg(long)]
        dump: Option<std::path::PathBuf>,
    },
    /// Greedy continuation of a prompt; prints the text and the ids as JSON.
    Generate {
        #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
        model: String,
        /// Wrap the prompt in Gemma's turn format (for instruction-tuned models).
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 32)]
        max_tokens: u32,
        prompt: String,
    },
}

pub fn main(cmd: DebugCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DebugCommand::Tokenize { model, no_bos, special, text } => {
            let engine = model_path::load_engine(&model)?;
            let ids = engine.tokenizer.encode(&text, !no_bos, special);
            println!("{}", serde_json::to_string(&ids)?);
        }
        DebugCommand::Logits { model, tokens, top, numeric, dump } => {
            let mut engine = model_path::load_engine(&model)?;
            engine.model.numeric = match numeric.as_str() {
                "llamacpp" => medbatch_engine::model::NumericOptions { f16_attention: true, f16_gelu: true },
                "f32" => medbatch_engine::model::NumericOptions { f16_attention: false, f16_gelu: false },
                "f16-attention" => medbatch_engine::model::NumericOptions { f16_attention: true, f16_gelu: false },
                "f16-gelu" => medbatch_engine::model::NumericOptions { f16_attention: false, f16_gelu: true },
                other => anyhow::bail!("--numeric {other:?}: use llamacpp or f32"),
            };
            let rows = engine.all_logits(&tokens)?;
            let last = rows.last().expect("at least one token");
            let mut order: Vec<usize> = (0..last.len()).collect();
            order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
            let best: Vec<_> = order.iter().take(top).map(|&i| serde_json::json!([i, last[i]])).collect();
            println!("{}", serde_json::json!({ "top": best }));
            if let Some(p) = dump {
                let bytes: Vec<u8> = last.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::fs::write(&p, bytes)?;
            }
        }
        DebugCommand::Generate { model, chat, max_tokens, prompt } => {
            let mut engine = model_path::load_engine(&model)?;
            let g = engine.generate(&medbatch_engine::GenerateRequest {
                prompt,
                chat,
                shared_prefix_len: 0,
                add_bos: true,
                parse_special: false,
                max_new_tokens: max_tokens,
                stop: Vec::new(),
            })?;
            println!(
                "{}",
                serde_json::json!({ "text": g.text, "ids": g.ids, "prompt_tokens": g.prompt_tokens, "finish": format!("{:?}", g.finish), "engine_ms": g.engine_ms })
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
