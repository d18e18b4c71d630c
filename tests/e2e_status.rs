//! End-to-end: `medbatch status` reads where a run stands from its output alone — finished
//! and committed, or with jobs still to do.

mod common;

use common::*;
use serde_json::Value;

fn status(out: &str, run: &str) -> Value {
    let o = medbatch(&["status", out, "--run-id", run, "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn status_reports_a_finished_run_and_one_with_jobs_to_go() {
    let model = demo_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    // Reports the parsers read: no generation, so this is quick.
    let o = medbatch(&[
        "run",
        "lab-report",
        "examples/lab-reports/hl7-oru.txt",
        "examples/lab-reports/liver-pipe-table.txt",
        "--out",
        out_s,
        "--model",
        model.to_str().unwrap(),
        "--run-id",
        "st",
        // A job per file: the run has two jobs to take one back out of.
        "--files-per-job",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = status(out_s, "st");
    assert_eq!(s["state"], "committed");
    assert_eq!((s["jobs_planned"].as_u64(), s["jobs_done"].as_u64()), (Some(2), Some(2)));
    let manifest: medbatch_schemas::Manifest =
        serde_json::from_slice(&std::fs::read(out.join("_runs/st/manifest.json")).unwrap()).unwrap();
    let rows: u64 = manifest.parts.iter().filter(|p| p.table == "lab_results").map(|p| p.rows).sum();
    assert_eq!(s["rows"].as_u64(), Some(rows));
    assert!(rows > 0);

    // Take one job back out: the run is running again, with one job to go and an ETA.
    let done = out.join("_runs/st/done");
    let first = std::fs::read_dir(&done).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(first).unwrap();
    std::fs::remove_file(out.join("_runs/st/manifest.json")).unwrap();
    std::fs::remove_file(out.join("_runs/st/_SUCCESS")).unwrap();
    let s = status(out_s, "st");
    assert_eq!(s["state"], "running");
    assert_eq!((s["jobs_done"].as_u64(), s["jobs_remaining"].as_u64()), (Some(1), Some(1)));
    assert!(s["eta_s"].is_number(), "{s}");
    let table = medbatch(&["status", out_s, "--run-id", "st"]);
    assert!(text(&table.stdout).contains("1/2 done (0 with error rows), 1 to go"), "{}", text(&table.stdout));

    // A run that is not there is a one-line error.
    let o = medbatch(&["status", out_s, "--run-id", "other"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("no run other"), "{}", text(&o.stderr));
}
