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
