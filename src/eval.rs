//! `medbatch eval`: score a run's output against a pipeline's gold set.

use anyhow::Context;
use medbatch_worker::pipelines::lab_report::eval::{load_gold, load_predictions, render_table, score};
use medbatch_worker::LoadedPipeline;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Pipeline (folder name under pipelines/ or a path): names the table to score.
    pub pipeline: String,
    /// Gold set: a split of the pipeline's gold set (`dev`, the part tuned on, or `test`,
    /// held out; `extraction.gold` of pipeline.toml names where the splits are, `eval/` by
    /// default) or a folder with `reports/` and `gold/`.
    #[arg(long, default_value = "dev")]
    pub gold: String,
    /// Output root of the run to score (the `--out` of `medbatch run`).
    #[arg(long)]
    pub pred: PathBuf,
    /// Score only this run's partition (default: every run under --pred).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let pipeline = LoadedPipeline::load(&args.pipeline)?;
    let sets = pipeline.spec.extraction.gold.as_deref().unwrap_or("eval");
    let split = pipeline.dir.join(sets).join(&args.gold);
    let gold_dir = if split.join("gold").is_dir() { split } else { PathBuf::from(&args.gold) };
    // The table decides what is scored and how.
    match pipeline.spec.output.table.as_str() {
        "lab_results" => {}
        "note_facts" => return cohort(&args, &pipeline, &gold_dir),
        other => anyhow::bail!("no gold-set scoring for table {other:?} (lab_results and note_facts have one)"),
    }
    let gold = load_gold(&gold_dir)?;
    let (pred, errors) = load_predictions(&args.pred, &pipeline.spec.output.table, args.run_id.as_deref())
        .with_context(|| format!("reading the run under {}", args.pred.display()))?;
    let report = score(&gold, &pred, errors);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// Scores `note_facts` against a cohort-facts gold split (docs/cohort-facts.md, Scoring).
fn cohort(args: &EvalArgs, pipeline: &LoadedPipeline, gold_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    use medbatch_worker::pipelines::cohort_eval;
    let gold = cohort_eval::load_gold(gold_dir)?;
    let synonyms = cohort_eval::load_synonyms(&gold_dir.join("../synonyms.tsv"))?;
    let pred = cohort_eval::load_predictions(&args.pred, &pipeline.spec.output.table, args.run_id.as_deref())
        .with_context(|| format!("reading the run under {}", args.pred.display()))?;
    let report = cohort_eval::score(&gold, &pred, &synonyms);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", cohort_eval::render_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}
