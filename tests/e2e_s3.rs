//! End-to-end: an embedded run writing to S3 (`--out s3://…`, the local S3-compatible server
//! of `infra/s3-server.sh`, reached through the AWS SDK's standard variables), read back
//! independently with pyarrow's S3 filesystem, equal to the same run written locally. (The
//! parts are listed and read by name: s3s-fs answers a HEAD on a "folder" key with an error,
//! which pyarrow's dataset discovery would trip on.)

mod common;

use common::*;
use serde_json::Value;

#[test]
fn a_run_written_to_s3_reads_back_with_pyarrow_like_the_local_one() {
    let model = demo_model();
    let bucket = format!("medbatch-e2e-{}", std::process::id());
    py_s3(&format!("fs.create_dir('{bucket}')\nprint('{{}}')"));
    let inputs = ["examples/lab-reports/hl7-oru.txt", "examples/lab-reports/liver-pipe-table.txt"];
    let uri = format!("s3://{bucket}/runs");
    let mut args = vec!["run", "lab-report"];
    args.extend_from_slice(&inputs);
    args.extend_from_slice(&["--out", &uri, "--model", model.to_str().unwrap(), "--run-id", "s3"]);
    let o = medbatch(&args);
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", text(&o.stderr));
    assert!(stdout.contains(&format!("{uri}/lab_results/run_id=s3")), "{stdout}");

    let (local_rows, batches) = embedded_lab_rows(&inputs, "s3");

    let got = py_s3(&format!(
        "sel = fs.get_file_info(pafs.FileSelector('{bucket}/runs/lab_results', recursive=True))\n\
         files = [f.path for f in sel if f.type == pafs.FileType.File]\n\
         t = ds.dataset(files, filesystem=fs, format='parquet').to_table()\n\
         m = json.loads(fs.open_input_stream('{bucket}/runs/_runs/s3/manifest.json').read())\n\
         ok = fs.get_file_info('{bucket}/runs/_runs/s3/_SUCCESS').type == pafs.FileType.File\n\
         print(json.dumps({{'rows': t.num_rows, 'values': sorted(t.column('value').to_pylist()), 'parts': len(m['parts']), 'success': ok}}))"
    ));
    assert_eq!(got["rows"].as_u64().unwrap() as usize, local_rows);
    assert!(local_rows >= 10);
    let mut local_values: Vec<Value> =
        string_column(&batches, "value").into_iter().map(|v| v.map_or(Value::Null, Value::String)).collect();
    local_values.sort_by_key(|v| v.to_string());
    let mut s3_values = got["values"].as_array().unwrap().clone();
    s3_values.sort_by_key(|v| v.to_string());
    assert_eq!(s3_values, local_values);
    assert_eq!(got["success"], true);
    assert!(got["parts"].as_u64().unwrap() >= 2);
    py_s3(&format!("fs.delete_dir('{bucket}')\nprint('{{}}')"));
}

/// Inputs on S3 (a plain file, a JSONL file and a tar.gz and zip archive, under a prefix) give
/// the same rows as the same files on disk; the archives are split into member jobs at
/// planning and read with ranged requests.
#[test]
fn inputs_on_s3_read_like_the_same_files_on_disk() {
    let model = demo_model();
    let bucket = format!("medbatch-in-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let local_in = dir.path().join("in");
    std::fs::create_dir(&local_in).unwrap();
    // Reports the pipeline's parsers read (no model calls, so the test is quick): HL7 and a
    // pipe table, as plain files, JSONL records and archive members.
    let ex = repo_root().join("examples/lab-reports");
    std::fs::copy(ex.join("hl7-oru.txt"), local_in.join("hl7-oru.txt")).unwrap();
    // The archives and JSONL, and the upload of the folder, made with Python's standard
    // library and pyarrow (not with medbatch's code).
    let ex_s = ex.to_str().unwrap();
    let in_s = local_in.to_str().unwrap();
    py_s3(&format!(
        "import tarfile, zipfile, pathlib\n\
         reports = ['hl7-oru.txt', 'liver-pipe-table.txt']\n\
         with open('{in_s}/records.jsonl', 'w') as f:\n\
         \x20   for r in reports:\n\
         \x20       f.write(json.dumps({{'id': 'rec-' + r, 'text': open('{ex_s}/' + r).read()}}) + '\\n')\n\
         with tarfile.open('{in_s}/bundle.tar.gz', 'w:gz') as t:\n\
         \x20   for r in reports:\n\
         \x20       t.add('{ex_s}/' + r, arcname='reports/' + r)\n\
         with zipfile.ZipFile('{in_s}/more.zip', 'w', zipfile.ZIP_DEFLATED) as z:\n\
         \x20   for r in reports:\n\
         \x20       z.write('{ex_s}/' + r, arcname=r)\n\
         fs.create_dir('{bucket}')\n\
         for p in sorted(pathlib.Path('{in_s}').iterdir()):\n\
         \x20   with fs.open_output_stream('{bucket}/in/' + p.name, compression=None) as o:\n\
         \x20       o.write(p.read_bytes())\n\
         print('{{}}')"
    ));
    let run = |input: &str, out: &str| {
        let o =
            medbatch(&["run", "lab-report", input, "--out", out, "--model", model.to_str().unwrap(), "--run-id", "in"]);
        assert!(o.status.success(), "{}\n{}", text(&o.stdout), text(&o.stderr));
        let (rows, _, batches) = read_parquet_dir(&std::path::Path::new(out).join("lab_results"));
        (rows, batches)
    };
    let from_s3 = dir.path().join("from-s3");
    let from_disk = dir.path().join("from-disk");
    let (s3_rows, s3_batches) = run(&format!("s3://{bucket}/in"), from_s3.to_str().unwrap());
    let (disk_rows, disk_batches) = run(in_s, from_disk.to_str().unwrap());
    assert_eq!(s3_rows, disk_rows);
    assert!(s3_rows >= 50, "{s3_rows}");
    assert!(!from_s3.join("_errors").exists(), "error rows reading from S3");
    let sorted = |b: &[arrow::record_batch::RecordBatch], c: &str| {
        let mut v = string_column(b, c);
        v.sort();
        v
    };
    for column in ["document_id", "test", "value", "unit"] {
        assert_eq!(sorted(&s3_batches, column), sorted(&disk_batches, column), "{column}");
    }
    let uris = sorted(&s3_batches, "source_uri");
    assert!(
        uris.iter().all(|u| u.as_deref().is_some_and(|u| u.starts_with(&format!("s3://{bucket}/in/")))),
        "{uris:?}"
    );
    for archive in ["bundle.tar.gz", "more.zip"] {
        assert!(uris.iter().any(|u| u.as_deref().is_some_and(|u| u.contains(archive))), "no rows from {archive}");
    }
    py_s3(&format!("fs.delete_dir('{bucket}')\nprint('{{}}')"));
}
