//! End-to-end: incremental runs (`--incremental`) of cohort-facts-sections with the demo
//! model. Night one processes three notes; night two, after one note changed and one was
//! added, processes exactly those two (the manifest lists the two skipped with the run that
//! did them, and the changed note's earlier content as superseded), and its patient table
//! counts each current note once; night three, with nothing new, plans no job and gives the
//! same patient table.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn note(dir: &Path, file: &str, id: &str, patient: &str, date: &str, text: &str) {
    let rec = json!({ "id": id, "patient_id": patient, "note_date": date, "text": text });
    std::fs::write(dir.join(file), format!("{rec}\n")).unwrap();
}

fn night(inputs: &Path, out: &Path, run: &str) -> String {
    let model = demo_model();
    let o = medbatch(&[
        "run",
        "cohort-facts-sections",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--run-id",
        run,
        "--incremental",
    ]);
    assert!(o.status.success(), "exit {:?}\n{}\n{}", o.status, text(&o.stdout), text(&o.stderr));
    format!("{}{}", text(&o.stdout), text(&o.stderr))
}

fn manifest(out: &Path, run: &str) -> Value {
    serde_json::from_slice(&std::fs::read(out.join(format!("_runs/{run}/manifest.json"))).unwrap()).unwrap()
}

/// (patient, notes, document ids) of a run's patient table, and its members' count.
fn patients(out: &Path, run: &str) -> Vec<(String, u64, Vec<String>)> {
    let o = std::process::Command::new(python())
        .arg("-c")
        .arg(
            r#"
import json, sys, glob, pyarrow.parquet as pq
rows = [r for f in sorted(glob.glob(sys.argv[1] + "/*.parquet")) for r in pq.ParquetFile(f).read().to_pylist()]
print(json.dumps(sorted([r["patient_id"], r["notes"], r["document_ids"]] for r in rows)))
"#,
        )
        .arg(out.join(format!("patient_facts/run_id={run}")))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_nightly_incremental_run_processes_only_what_is_new_or_changed() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inbox");
    let out = dir.path().join("out");
    std::fs::create_dir(&inputs).unwrap();
    note(&inputs, "a.jsonl", "a", "P-1", "2025-01-01", "PMH: T2DM, HTN.\nMeds: metformin 500 mg BID.\n");
    note(&inputs, "b.jsonl", "b", "P-1", "2025-01-05", "Echo: LVEF 35%.\n");
    note(&inputs, "c.jsonl", "c", "P-2", "2025-01-03", "Social: never smoker.\n");
    let first = night(&inputs, &out, "night-1");
    assert!(first.contains("incremental: 0 unchanged"), "{first}");
    // Three small notes share one job.
    assert_eq!(manifest(&out, "night-1")["jobs"], 1);
    assert_eq!(
        patients(&out, "night-1"),
        [("P-1".to_string(), 2, vec!["a".to_string(), "b".to_string()]), ("P-2".into(), 1, vec!["c".into()])]
    );

    // A day later: b corrected, d new.
    note(&inputs, "b.jsonl", "b", "P-1", "2025-01-05", "Echo: LVEF 30%. Corrected report.\n");
    note(&inputs, "d.jsonl", "d", "P-2", "2025-01-06", "A/P: COPD exacerbation.\n");
    let second = night(&inputs, &out, "night-2");
    assert!(second.contains("incremental: 2 unchanged since a committed run (skipped), 1 changed"), "{second}");
    let m = manifest(&out, "night-2");
    // One job, of only the changed and the new note: small files are grouped after the
    // unchanged ones are skipped.
    assert_eq!(m["jobs"], 1);
    let plan: Value = serde_json::from_slice(&std::fs::read(out.join("_runs/night-2/plan.json")).unwrap()).unwrap();
    let planned: Vec<&str> = plan["jobs"][0]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["uri"].as_str().unwrap().rsplit('/').next().unwrap())
        .collect();
    assert_eq!(planned, ["b.jsonl", "d.jsonl"], "only the changed and the new note");
    let skipped: Vec<(&str, &str)> = m["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["uri"].as_str().unwrap().rsplit('/').next().unwrap(), s["run_id"].as_str().unwrap()))
        .collect();
    assert_eq!(skipped, [("a.jsonl", "night-1"), ("c.jsonl", "night-1")]);
    let superseded = &m["superseded"].as_array().unwrap()[0];
    assert!(superseded["uri"].as_str().unwrap().ends_with("/b.jsonl") && superseded["run_id"] == "night-1");
    let (rows, _, _) = read_parquet_dir(&out.join("note_facts/run_id=night-2"));
    assert_eq!(rows, 2);
    // The patient table is over the current notes of both nights: b once, in its new content.
    let want = [
        ("P-1".to_string(), 2, vec!["a".to_string(), "b".to_string()]),
        ("P-2".into(), 2, vec!["c".into(), "d".into()]),
    ];
    assert_eq!(patients(&out, "night-2"), want);
    let o = std::process::Command::new(python())
        .arg("-c")
        .arg(
            r#"
import sys, glob, pyarrow.parquet as pq
rows = [r for f in glob.glob(sys.argv[1] + "/*.parquet") for r in pq.ParquetFile(f).read().to_pylist()]
p1 = [r for r in rows if r["patient_id"] == "P-1"][0]
print(p1["lvef_percent_document_id"] or "")
"#,
        )
        .arg(out.join("patient_facts/run_id=night-2"))
        .output()
        .unwrap();
    let lvef_from = text(&o.stdout);
    assert!(lvef_from.trim().is_empty() || lvef_from.trim() == "b", "an LVEF, if any, from b: {lvef_from}");

    // Nothing new: no job, the same patients.
    let third = night(&inputs, &out, "night-3");
    assert!(third.contains("incremental: 4 unchanged"), "{third}");
    assert_eq!(manifest(&out, "night-3")["jobs"], 0);
    assert_eq!(patients(&out, "night-3"), want);

    // Running night 2 again (same run id) plans the same jobs, finds them done, and keeps its
    // manifest.
    let before = std::fs::read(out.join("_runs/night-2/manifest.json")).unwrap();
    night(&inputs, &out, "night-2");
    assert_eq!(std::fs::read(out.join("_runs/night-2/manifest.json")).unwrap(), before);
}

/// infra/nightly/nightly.sh runs the night's incremental run under the date's run id: run
/// twice in a day it resumes that run (nothing done twice); the crontab line and the
/// Kubernetes CronJob call medbatch with flags it has.
#[test]
fn the_nightly_script_and_the_schedules_run_the_incremental_run() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inbox");
    let out = dir.path().join("out");
    std::fs::create_dir(&inputs).unwrap();
    note(&inputs, "a.jsonl", "a", "P-1", "2025-01-01", "PMH: HTN.\n");
    let nightly = |expect: &str| {
        let o = std::process::Command::new("bash")
            .arg(repo_root().join("infra/nightly/nightly.sh"))
            .current_dir(repo_root())
            .env("MEDBATCH_BIN", env!("CARGO_BIN_EXE_medbatch"))
            .env("MEDBATCH_PIPELINE", "cohort-facts-sections")
            .env("MEDBATCH_INPUTS", &inputs)
            .env("MEDBATCH_OUT", &out)
            .env("MEDBATCH_MODEL", demo_model())
            .env("MEDBATCH_LOG", "warn")
            .output()
            .unwrap();
        let all = format!("{}{}", text(&o.stdout), text(&o.stderr));
        assert!(o.status.success() && all.contains(expect), "{all}");
    };
    nightly("1 jobs (1 to do, 0 already done)");
    nightly("1 jobs (0 to do, 1 already done)");
    let runs: Vec<String> = std::fs::read_dir(out.join("_runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert_eq!(runs.len(), 1, "one run a day: {runs:?}");
    assert!(runs[0].starts_with("nightly-20"), "{runs:?}");

    // Every flag the schedules pass is one of the command's.
    let flags = |cmd: &str| text(&medbatch(&[cmd, "--help"]).stdout);
    let used = |file: &str| -> Vec<String> {
        let t = std::fs::read_to_string(repo_root().join(file)).unwrap();
        t.split_whitespace().filter(|w| w.starts_with("--")).map(|w| w.trim_matches('"').to_string()).collect()
    };
    let cron = std::fs::read_to_string(repo_root().join("infra/nightly/crontab")).unwrap();
    assert!(cron.contains("infra/nightly/nightly.sh"), "the crontab line calls the script");
    for (file, cmd) in [
        ("infra/nightly/nightly.sh", "run"),
        ("infra/nightly/nightly.sh", "submit"),
        ("infra/k8s/base/nightly-cronjob.yaml", "submit"),
    ] {
        let help = flags(cmd);
        let used = used(file);
        assert!(used.contains(&"--incremental".to_string()), "{file}");
        for f in used {
            assert!(help.contains(&f), "{file}: medbatch {cmd} has no {f}");
        }
    }
}
