//! `medbatch`: run MedGemma / Gemma 3 pipelines over archives and write Parquet.
//!
//! The binary parses arguments, sets up logging, turns arguments into a validated
//! configuration and hands it to the library code; errors become one-line reasons and exit
//! codes here.

mod bench;
mod debug;
mod decode_bench;
mod distributed;
mod embedded;
mod eval;
mod kernel_bench;
mod model_path;
mod models;
mod ops;
mod progress;
mod siglip_bench;
mod status;
mod wsi_bench;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit code when a run could not start or could not complete (bad arguments, missing
/// model, unreadable pipeline, unwritable output, jobs that failed for good).
const EXIT_FAILURE: u8 = 1;
/// Exit code for usage errors (clap's own convention).
const EXIT_USAGE: u8 = 2;
/// Exit code of `submit` when every job left is dead-lettered (the rest of the run is done).
pub const EXIT_DEAD_LETTERED: u8 = 3;
/// Exit code of `work` when one call into the model outlasted `--stall-timeout`: the device
/// or a rank is taken to have hung, and the jobs in hand go back to the broker.
pub const EXIT_STALLED: u8 = 4;

/// The async runtime every subcommand that talks to queues, stores or the engine thread
/// runs on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting runtime")
}

/// This machine's name, for worker ids.
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "local".into())
}

#[derive(Parser)]
#[command(
    name = "medbatch",
    version,
    about = "Run MedGemma (Gemma 3) pipelines over hospital archives and write analysis-ready Parquet"
)]
struct Cli {
    /// Log filter (tracing syntax, e.g. `info` or `medbatch_worker=debug`). Logs go to
    /// stderr and never contain document text.
    #[arg(long, env = "MEDBATCH_LOG", default_value = "warn", global = true)]
    log: String,
    /// Log format.
    #[arg(long, env = "MEDBATCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// CPU threads for the model's matrix products and attention (threads split a product's
    /// output columns, never its inner sum, so results do not depend on this). Default: every
    /// core.
    #[arg(long, env = "CANDLE_NUM_THREADS", global = true, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline over inputs in this process (coordinator, in-process queue, workers).
    Run(embedded::RunArgs),
    /// Plan a run and publish its jobs to RabbitMQ, then follow it and commit it.
    Submit(distributed::SubmitArgs),
    /// Serve one model's jobs from RabbitMQ until stopped (SIGTERM finishes the jobs in hand).
    Work(distributed::WorkArgs),
    /// Publish a run's dead-lettered jobs again once their cause is fixed (their attempts go
    /// on from where they were), then follow the run and commit it.
    Replay(distributed::ReplayArgs),
    /// Where a run stands: jobs planned and done, rows, tokens/s, ETA (from its output).
    Status(status::StatusArgs),
    /// Score a run's output against a gold set: per-field precision, recall, F1.
    Eval(eval::EvalArgs),
    /// Measure speed on this machine: a model's prompt and generation speed (default),
    /// parallel sequences, grammars, kernels, decode steps, images, DICOM, publishing.
    Bench(bench::BenchArgs),
    /// Inspect the engine: tokenize, logits, generate.
    #[command(subcommand)]
    Debug(debug::DebugCommand),
    /// Inspect models without loading them.
    #[command(subcommand)]
    Models(models::ModelsCommand),
}

fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid --log filter {filter:?}: {e}"))?;
    // Colours only on a terminal: logs sent to files and collectors stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Keeps large buffers in the process between forward passes. glibc hands a freed block
/// above its mmap threshold (128 KiB, adapting up to 32 MiB) back to the system and trims
/// the heap top past 128 KiB, so each large temporary of a forward pass (a MedSigLIP layer's
/// 1,024 × 4,304 MLP activation is 17.6 MB) is faulted in page by page again: perf showed
/// about a tenth of a MedSigLIP image's time in clearing fresh pages. Blocks up to 32 MiB
/// (the most glibc allows) now come from the heap, which keeps up to 256 MiB of freed memory.
/// `MEDBATCH_SYSTEM_MALLOC=1` keeps glibc's defaults (to compare; docs/benchmarks.md has the
/// figures).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    if std::env::var_os("MEDBATCH_SYSTEM_MALLOC").is_some_and(|v| v == "1") {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters; called first thing in main, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // Set before any thread is spawned (nothing reads the environment concurrently);
        // candle's pools read it when first used.
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    if let Err(e) = init_logging(&cli.log, cli.log_format) {
        eprintln!("medbatch: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let result = match cli.command {
        Command::Run(args) => embedded::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Eval(args) => eval::main(args),
        Command::Status(args) => status::main(args),
        Command::Submit(args) => distributed::submit(args),
        Command::Work(args) => distributed::work(args),
        Command::Replay(args) => distributed::replay(args),
        Command::Debug(cmd) => debug::main(cmd),
        Command::Models(cmd) => models::main(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes, outermost first.
            let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
            eprintln!("medbatch: {msg}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
