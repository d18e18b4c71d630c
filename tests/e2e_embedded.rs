//! End-to-end: the `medbatch` binary on the bundled example reports with the real demo model,
//! output read back with the parquet crate and with pyarrow; reruns; bad input; failures
//! that stop a run with a one-line reason.

mod common;

use common::*;
use medbatch_schemas::Manifest;
use std::io::Write;
use std::path::Path;

fn manifest(out: &Path, run: &str) -> Manifest {
    let p = out.join(format!("_runs/{run}/manifest.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

#[test]
fn demo_run_writes_parquet_that_both_readers_agree_on_and_reruns_do_nothing() {
    let model = demo_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    let o = medbatch(&[
        "run",
        "lab-report",
        "examples/lab-reports",
        "--out",
        out_s,
        "--model",
        model.to_str().unwrap(),
        "--run-id",
        "e2e",
        "--workers",
        "2",
    ]);
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}", o.status, text(&o.stderr));
    assert!(stdout.contains("lab_results/run_id=e2e"), "summary does not say where the Parquet went:\n{stdout}");

    let m = manifest(&out, "e2e");
    assert!(out.join("_runs/e2e/_SUCCESS").is_file());
    assert!(m.documents_ok >= 8, "{m:?}");
    // Every part in the manifest exists with the recorded digest and row count.
    for part in &m.parts {
        let bytes = std::fs::read(out.join(&part.key)).unwrap();
        assert_eq!(medbatch_schemas::Digest::of_bytes(&bytes), part.sha256, "{}", part.key);
        assert_eq!(bytes.len() as u64, part.bytes);
    }
    let manifest_rows: u64 = m.parts.iter().filter(|p| p.table == "lab_results").map(|p| p.rows).sum();

    let (rows, names, batches) = read_parquet_dir(&out.join("lab_results"));
    assert_eq!(rows as u64, manifest_rows);
    assert!(rows >= 40, "only {rows} lab results from the examples");
    for c in [
        "document_id",
        "source_uri",
        "test",
        "value",
        "value_numeric",
        "unit",
        "ref_low",
        "ref_high",
        "flag",
        "evidence_start",
        "evidence_end",
        "alignment",
        "from_examples",
        "run_id",
        "job_id",
        "model_digest",
    ] {
        assert!(names.iter().any(|n| n == c), "missing column {c}: {names:?}");
    }
    // Deterministic parsers handled the HL7 and table reports; the model the rest.
    let methods = string_column(&batches, "method");
    for m in ["hl7_obx", "delimited_table", "model"] {
        assert!(methods.iter().any(|x| x.as_deref() == Some(m)), "no rows by {m}");
    }
    // Every row says how its value was found; the grammar only lets the model copy from the
    // line, so nearly all are found verbatim.
    let alignment = string_column(&batches, "alignment");
    assert!(alignment.iter().all(|a| ["exact", "normalized", "fuzzy", "none"].contains(&a.as_deref().unwrap())));
    let exact = alignment.iter().filter(|a| a.as_deref() == Some("exact")).count();
    assert!(exact * 10 >= rows * 9, "{exact} of {rows} rows exact");
    let flags = string_column(&batches, "flag");
    assert!(flags
        .iter()
        .all(|f| f.as_deref().is_none_or(|f| ["low", "high", "normal", "abnormal", "critical"].contains(&f))));

    // pyarrow reads the same table independently.
    let script = format!(
        "import json, pyarrow.parquet as pq, pyarrow.dataset as ds\n\
         t = ds.dataset('{}', format='parquet', partitioning='hive').to_table()\n\
         print(json.dumps({{'rows': t.num_rows, 'columns': t.column_names, 'values': t.column('value').to_pylist()}}))",
        out.join("lab_results").display()
    );
    let py = std::process::Command::new(python()).args(["-c", &script]).output().unwrap();
    assert!(py.status.success(), "pyarrow failed: {}", text(&py.stderr));
    let v: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(v["rows"].as_u64().unwrap() as usize, rows);
    let ours: Vec<serde_json::Value> = string_column(&batches, "value")
        .into_iter()
        .map(|s| s.map_or(serde_json::Value::Null, serde_json::Value::String))
        .collect();
    let mut theirs: Vec<serde_json::Value> = v["values"].as_array().unwrap().clone();
    let mut ours_sorted = ours.clone();
    let key = |x: &serde_json::Value| x.to_string();
    ours_sorted.sort_by_key(key);
    theirs.sort_by_key(key);
    assert_eq!(ours_sorted, theirs);

    // A rerun with the same run id does no finished job again and leaves the output alone.
    let before: Vec<_> =
        walk(&out).into_iter().map(|p| (p.clone(), std::fs::metadata(&p).unwrap().modified().unwrap())).collect();
    let o2 = medbatch(&[
        "run",
        "lab-report",
        "examples/lab-reports",
        "--out",
        out_s,
        "--model",
        model.to_str().unwrap(),
        "--run-id",
        "e2e",
    ]);
    assert!(o2.status.success(), "{}", text(&o2.stderr));
    assert!(text(&o2.stderr).contains("(0 to do"), "{}", text(&o2.stderr));
    for (p, t) in before {
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), t, "{} was rewritten", p.display());
    }
    assert_eq!(manifest(&out, "e2e"), m);
}

/// Writes a tar.gz with the given (name, bytes) regular members, names written raw.
fn tar_gz(path: &Path, members: &[(&str, &[u8])], symlink: Option<(&str, &str)>) {
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    if let Some((name, target)) = symlink {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_link_name(target).unwrap();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
}

#[test]
fn bad_inputs_become_error_rows_and_the_run_goes_on() {
    let model = demo_model();
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    let good = "Sodium 139 mmol/L (135-145)\n";
    std::fs::write(inp.join("good.txt"), good).unwrap();
    std::fs::write(inp.join("empty.txt"), "").unwrap();
    std::fs::write(inp.join("latin1.txt"), b"Glucose 5,4 mmol/l \xe9lev\xe9\n").unwrap();
    std::fs::write(
        inp.join("records.jsonl"),
        format!(
            "{{\"id\": \"r1\", \"text\": {}}}\n{{not json\n{{\"id\": \"r3\", \"text\": {}}}\n",
            serde_json::json!(good),
            serde_json::json!(good)
        ),
    )
    .unwrap();
    std::fs::write(inp.join("notext.csv"), "id,body\n1,Sodium 139\n").unwrap();
    std::fs::write(inp.join("fake.zip"), "this is not a zip archive\n").unwrap();
    std::fs::write(inp.join("binary.txt"), b"%PDF-1.7\n\x00\x01\x02binary").unwrap();
    std::fs::write(inp.join("huge.txt"), "Sodium 139 mmol/L\n".repeat(70_000)).unwrap();
    tar_gz(
        &inp.join("traversal.tar.gz"),
        &[("../evil.txt", good.as_bytes()), ("/etc/passwd.txt", good.as_bytes()), ("ok.txt", good.as_bytes())],
        Some(("link.txt", "/etc/passwd")),
    );
    // A truncated archive: the first half of a valid one.
    tar_gz(
        &inp.join("whole.tar.gz"),
        &[("a.txt", good.repeat(400).as_bytes()), ("b.txt", good.repeat(400).as_bytes())],
        None,
    );
    let whole = std::fs::read(inp.join("whole.tar.gz")).unwrap();
    std::fs::write(inp.join("truncated.tar.gz"), &whole[..whole.len() / 2]).unwrap();
    std::fs::remove_file(inp.join("whole.tar.gz")).unwrap();
    // A zip bomb: 50 MB of zeros deflate to ~50 KB (ratio ~1000).
    {
        let f = std::fs::File::create(inp.join("bomb.zip")).unwrap();
        let mut z = zip::ZipWriter::new(f);
        z.start_file("zeros.txt", zip::write::SimpleFileOptions::default()).unwrap();
        let zeros = vec![b'0'; 1 << 20];
        for _ in 0..50 {
            z.write_all(&zeros).unwrap();
        }
        z.finish().unwrap();
    }

    let out = dir.path().join("out");
    let o = medbatch(&[
        "run",
        "lab-report",
        inp.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--run-id",
        "bad",
    ]);
    assert!(o.status.success(), "stdout:\n{}\nstderr:\n{}", text(&o.stdout), text(&o.stderr));
    let (_, _, errs) = read_parquet_dir(&out.join("_errors"));
    let reasons = string_column(&errs, "reason");
    let sources = string_column(&errs, "source_uri");
    let members = string_column(&errs, "member");
    let details = string_column(&errs, "detail");
    let find = |file: &str, reason: &str| {
        (0..reasons.len())
            .any(|i| sources[i].as_deref().unwrap_or("").ends_with(file) && reasons[i].as_deref() == Some(reason))
    };
    for (file, reason) in [
        ("empty.txt", "empty"),
        ("latin1.txt", "invalid_utf8"),
        ("records.jsonl", "malformed_record"),
        ("notext.csv", "missing_field"),
        ("fake.zip", "wrong_format"),
        ("binary.txt", "wrong_format"),
        ("huge.txt", "too_large"),
        ("traversal.tar.gz", "unsafe_path"),
        ("traversal.tar.gz", "link_member"),
        ("truncated.tar.gz", "truncated_archive"),
        ("bomb.zip", "compression_bomb"),
    ] {
        assert!(
            find(file, reason),
            "no {reason} error row for {file}: {:?}",
            reasons.iter().zip(&sources).collect::<Vec<_>>()
        );
    }
    assert!(members.iter().flatten().any(|m| m.contains("../evil.txt")), "{members:?}");
    // Error details never carry document text.
    for d in details.iter().flatten() {
        assert!(!d.contains("Sodium"), "detail leaks text: {d}");
    }
    // The good documents next to the bad ones were processed.
    let (rows, _, batches) = read_parquet_dir(&out.join("lab_results"));
    let docs = string_column(&batches, "document_id");
    assert!(rows >= 3, "{docs:?}");
    for want in ["good.txt", "r1", "r3", "ok.txt"] {
        assert!(docs.iter().flatten().any(|d| d.ends_with(want)), "no rows for {want}: {docs:?}");
    }
    // Logs carry no document text either.
    assert!(!text(&o.stderr).contains("Sodium"));
}

#[test]
fn runs_that_cannot_start_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let out_s = out.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["run", "lab-report", "examples/lab-reports", "--out", out_s, "--model", "/nonexistent/model.gguf"],
            "not found",
        ),
        (&["run", "no-such-pipeline", "examples/lab-reports", "--out", out_s, "--model", "demo"], "no-such-pipeline"),
        (
            &["run", "lab-report", "examples/lab-reports", "--out", "/proc/medbatch-out", "--model", "demo"],
            "/proc/medbatch-out",
        ),
        (&["run", "lab-report", "examples/lab-reports", "--out", out_s, "--run-id", "../x"], "invalid run id"),
    ];
    for (args, needle) in cases {
        let o = medbatch(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or("");
        assert!(last.starts_with("medbatch: ") && last.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn eval_scores_the_demo_model_on_the_gold_set() {
    let model = demo_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = medbatch(&[
        "run",
        "lab-report",
        "pipelines/lab-report/eval/dev/reports",
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--run-id",
        "eval",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // The dev split has pending and cancelled entries: the summary counts them (no rows).
    let summary = text(&o.stdout);
    assert!(summary.contains("set aside") && summary.contains("pending"), "{summary}");
    let e = medbatch(&["eval", "lab-report", "--pred", out.to_str().unwrap(), "--run-id", "eval", "--json"]);
    assert!(e.status.success(), "{}", text(&e.stderr));
    let r: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r["documents"], 75);
    assert!(r["gold_items"].as_u64().unwrap() >= 400);
    // Measured item F1 and exact-match rate on the dev split with constrained decoding are in
    // docs/benchmarks.md; these floors catch regressions without tying the test to one
    // rounding of the model.
    assert!(r["item_f1"].as_f64().unwrap() >= 0.93, "{r}");
    assert!(r["item_precision"].as_f64().unwrap() >= 0.93, "{r}");
    assert!(r["exact_match_rate"].as_f64().unwrap() >= 0.85, "{r}");
    // Per layout (one per report), and the rows that matched no result by kind.
    assert_eq!(r["per_document"].as_array().unwrap().len(), 75);
    assert!(r["false_positives"].is_object(), "{r}");
    // Under the grammar every answer that finishes parses; the few that do not are answers
    // cut off at max_new_tokens (measured 0.951).
    assert!(r["schema_valid_rate"].as_f64().unwrap() >= 0.93, "{r}");
    assert!(r["grounding_rate"].as_f64().unwrap() >= 0.9, "{r}");
    let table = medbatch(&["eval", "lab-report", "--pred", out.to_str().unwrap()]);
    let table = text(&table.stdout);
    assert!(table.contains("precision") && table.contains("rows matching no result"), "{table}");
    assert!(table.contains("ward-email-inline-bloods.txt"), "{table}");
    // The document pipeline is scored on the same gold sets (its pipeline.toml points there).
    let d = medbatch(&["eval", "lab-report-document", "--gold", "dev", "--pred", out.to_str().unwrap(), "--json"]);
    assert!(d.status.success(), "{}", text(&d.stderr));
    let dr: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
    assert_eq!(dr["gold_items"], r["gold_items"]);
}

#[test]
fn answers_cut_off_by_the_token_limit_are_truncated_error_rows() {
    let model = demo_model();
    let dir = tempfile::tempdir().unwrap();
    // The lab-report pipeline with room for a few tokens only: no answer can complete.
    let pipeline = dir.path().join("lab-report-short");
    std::fs::create_dir(&pipeline).unwrap();
    for f in ["prompt.j2", "schema.json", "analytes.tsv"] {
        std::fs::copy(repo_root().join("pipelines/lab-report").join(f), pipeline.join(f)).unwrap();
    }
    let spec = std::fs::read_to_string(repo_root().join("pipelines/lab-report/pipeline.toml")).unwrap();
    let spec = spec.replace("max_new_tokens = 96", "max_new_tokens = 6");
    assert!(spec.contains("max_new_tokens = 6\n"));
    std::fs::write(pipeline.join("pipeline.toml"), spec).unwrap();
    let out = dir.path().join("out");
    let o = medbatch(&[
        "run",
        pipeline.to_str().unwrap(),
        "examples/lab-reports/prose-narrative.txt",
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--run-id",
        "short",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (_, _, errors) = read_parquet_dir(&out.join("_errors"));
    let reasons = string_column(&errors, "reason");
    assert!(!reasons.is_empty());
    assert!(reasons.iter().all(|r| r.as_deref() == Some("truncated")), "{reasons:?}");
    let details = string_column(&errors, "detail");
    assert!(details.iter().all(|d| d.as_deref() == Some("answer cut off at max_new_tokens (6)")), "{details:?}");
    // No broken row was written: the table holds no model rows at all.
    let rows_dir = out.join("lab_results");
    if rows_dir.exists() {
        let (_, _, batches) = read_parquet_dir(&rows_dir);
        assert!(string_column(&batches, "method").iter().all(|m| m.as_deref() != Some("model")));
    }
}
