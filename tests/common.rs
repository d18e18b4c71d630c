//! Helpers shared by the end-to-end tests: the binary, the demo model, a pyarrow reader.

#![allow(dead_code)]

use arrow::array::Array;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The demo model; the tests fail (never skip) when it is missing.
pub fn demo_model() -> PathBuf {
    let p = std::env::var_os("MEDBATCH_DEMO_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/medbatch/models/gemma-3-270m-q4_k_m.gguf")
    });
    assert!(p.is_file(), "demo model missing at {}: run `bash infra/fetch-demo-model.sh`", p.display());
    p
}

/// `medbatch ARGS`, to be run from the repository root with warnings logged.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medbatch"));
    c.args(args).current_dir(repo_root()).env("MEDBATCH_LOG", "warn");
    c
}

/// Runs `medbatch ARGS` from the repository root.
pub fn medbatch(args: &[&str]) -> Output {
    command(args).output().expect("run medbatch")
}

/// Runs `medbatch ARGS` like [`medbatch`] and also returns the process's peak resident
/// memory in MiB (its own `ru_maxrss`, read with `wait4`, so other tests' processes do not
/// count).
pub fn medbatch_peak(args: &[&str]) -> (Output, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let child = command(args)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run medbatch");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: `rusage` is plain data that wait4 fills in; `pid` is our own child, not yet
    // waited for (the `Child` handle is dropped without waiting).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    drop(child);
    let status = std::os::unix::process::ExitStatusExt::from_raw(status);
    let output = Output { status, stdout: std::fs::read(out_path).unwrap(), stderr: std::fs::read(err_path).unwrap() };
    // Linux reports ru_maxrss in KiB.
    (output, usage.ru_maxrss as f64 / 1024.0)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A Python with pyarrow (`MEDBATCH_PYTHON`, set by `infra/test.sh`); fails when missing.
/// Runs an independent check in Python (`python -c SCRIPT ARGS…`) and returns what it
/// printed, as JSON; its error output fails the test.
pub fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let o = Command::new(python()).arg("-c").arg(script).args(args).output().expect("run python");
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("the check prints JSON")
}

pub fn python() -> String {
    let py = std::env::var("MEDBATCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import pyarrow"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "{py} cannot import pyarrow: run the tests through `bash infra/test.sh`");
    py
}

/// Reads every Parquet file under `dir` with the parquet crate; returns (rows, schema field
/// names of the first file).
pub fn read_parquet_dir(dir: &Path) -> (usize, Vec<String>, Vec<arrow::record_batch::RecordBatch>) {
    let mut rows = 0;
    let mut names = Vec::new();
    let mut batches = Vec::new();
    let mut files: Vec<PathBuf> =
        walk(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
    files.sort();
    for f in files {
        let file = std::fs::File::open(&f).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
        for b in reader {
            let b = b.unwrap();
            if names.is_empty() {
                names = b.schema().fields().iter().map(|f| f.name().clone()).collect();
            }
            rows += b.num_rows();
            batches.push(b);
        }
    }
    (rows, names, batches)
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Column `name` of all batches as strings (nulls as None), for string/dictionary columns.
pub fn string_column(batches: &[arrow::record_batch::RecordBatch], name: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for b in batches {
        let col = b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
        let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8).unwrap();
        let s = col.as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
        for i in 0..s.len() {
            out.push(if s.is_null(i) { None } else { Some(s.value(i).to_string()) });
        }
    }
    out
}

/// Runs a Python snippet with pyarrow's S3 filesystem `fs` pointed at the test server.
pub fn py_s3(body: &str) -> serde_json::Value {
    let endpoint =
        std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL: run the tests through `bash infra/test.sh`");
    let script = format!(
        "import json, os, pyarrow.fs as pafs, pyarrow.dataset as ds\n\
         e = os.environ['AWS_ENDPOINT_URL'].split('://')\n\
         fs = pafs.S3FileSystem(endpoint_override=e[1], scheme=e[0], access_key=os.environ['AWS_ACCESS_KEY_ID'],\n\
             secret_key=os.environ['AWS_SECRET_ACCESS_KEY'], region='us-east-1', allow_bucket_creation=True, allow_bucket_deletion=True)\n\
         {body}\n\
         del fs\n\
         pafs.finalize_s3()\n"
    );
    let o = std::process::Command::new(python()).args(["-c", &script]).output().unwrap();
    // On a loaded machine the AWS SDK's threads inside pyarrow can still be running when the
    // interpreter exits, and the C++ runtime aborts ("terminate called without an active
    // exception") after the script has printed its result. That teardown abort is not a
    // failure of what the script did; anything else is.
    let teardown_abort = text(&o.stderr).trim() == "terminate called without an active exception";
    assert!(o.status.success() || teardown_abort, "pyarrow against {endpoint}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("pyarrow against {endpoint}: {e}: {}", text(&o.stderr)))
}

/// Runs `inputs` through the lab-report pipeline in this process's embedded mode into a
/// temporary folder; returns the rows of `lab_results` (row count and batches).
pub fn embedded_lab_rows(inputs: &[&str], run_id: &str) -> (usize, Vec<arrow::record_batch::RecordBatch>) {
    let model = demo_model();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("out");
    let mut args = vec!["run", "lab-report"];
    args.extend_from_slice(inputs);
    args.extend_from_slice(&["--out", local.to_str().unwrap(), "--model", model.to_str().unwrap(), "--run-id", run_id]);
    let o = medbatch(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (rows, _, batches) = read_parquet_dir(&local.join("lab_results"));
    (rows, batches)
}

/// Names of the broker's `what` (`queues`, `exchanges`) that belong to `namespace`
/// (`MEDBATCH_AMQP_NAMESPACE`: the shipped names with `-namespace` appended).
fn broker_names(what: &str, namespace: &str) -> Vec<String> {
    let o = Command::new("rabbitmqctl")
        .args([&format!("list_{what}"), "-q", "--no-table-headers", "name"])
        .output()
        .expect("rabbitmqctl");
    let tag = format!("-{namespace}");
    text(&o.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| n.ends_with(&tag) || n.contains(&format!("{tag}.")))
        .map(str::to_string)
        .collect()
}

/// The broker objects of a test's namespace, deleted when this is dropped (also when the
/// test fails), so that test runs leave the shared broker as they found it.
pub struct BrokerNamespace(pub String);

impl Drop for BrokerNamespace {
    fn drop(&mut self) {
        let (queues, exchanges) = (broker_names("queues", &self.0), broker_names("exchanges", &self.0));
        let Ok(url) = std::env::var("MEDBATCH_AMQP_URL") else { return };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let Ok(conn) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await else {
                return;
            };
            let Ok(ch) = conn.create_channel().await else { return };
            for q in &queues {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            for x in &exchanges {
                let _ = ch.exchange_delete(x.as_str().into(), Default::default()).await;
            }
            let _ = conn.close(200, "test done".into()).await;
        });
    }
}

/// What the broker says about a namespace, for failure messages: resource alarms (a broker
/// short of disk or memory blocks publishers) and each queue's ready and unacknowledged
/// messages and consumers.
pub fn broker_state(namespace: &str) -> String {
    let run = |args: &[&str]| {
        Command::new(args[0]).args(&args[1..]).output().map(|o| text(&o.stdout) + &text(&o.stderr)).unwrap_or_default()
    };
    let alarms = run(&["rabbitmq-diagnostics", "-q", "alarms"]);
    let tag = format!("-{namespace}");
    let queues: Vec<String> = run(&[
        "rabbitmqctl",
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
    ])
    .lines()
    .filter(|l| l.contains(&tag))
    .map(str::to_string)
    .collect();
    format!("broker alarms: {}; queues (ready, unacked, consumers): {queues:?}", alarms.trim())
}

/// The wsi-tiles pipeline copied with tiles of `patch` px at 10x in jobs of `tiles_per_job`
/// cells, as `dir/PATCH-TILES/wsi-tiles` (a folder of pipelines a worker can serve from).
pub fn tiles_pipeline(dir: &Path, patch: u32, tiles_per_job: u64) -> PathBuf {
    let p = dir.join(format!("{patch}-{tiles_per_job}")).join("wsi-tiles");
    std::fs::create_dir_all(&p).unwrap();
    let toml = std::fs::read_to_string(repo_root().join("pipelines/wsi-tiles/pipeline.toml")).unwrap();
    let toml = toml
        .replace("patch = 896", &format!("patch = {patch}"))
        .replace("stride = 896", &format!("stride = {patch}"))
        .replace("tiles_per_job = 4096", &format!("tiles_per_job = {tiles_per_job}"));
    std::fs::write(p.join("pipeline.toml"), toml).unwrap();
    p
}

/// The whole-slide oracle's synthetic slides (TIFF, SVS and DICOM pyramids, glass) written
/// into `dir` (created).
pub fn make_slides(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let o = Command::new(python())
        .arg(repo_root().join("formats/tests/support/wsi_oracle.py"))
        .arg("make")
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// The wsi-tile-embeddings pipeline sized for the tiny SigLIP checkpoint (32 dimensions),
/// with tiles of 64 px at 10x in bands of 16 cells (two grid rows of the oracle's slides),
/// as `dir/pipelines/wsi-tile-embeddings`.
pub fn tile_embeddings_pipeline(dir: &Path) -> PathBuf {
    let p = dir.join("pipelines/wsi-tile-embeddings");
    std::fs::create_dir_all(&p).unwrap();
    let toml = std::fs::read_to_string(repo_root().join("pipelines/wsi-tile-embeddings/pipeline.toml")).unwrap();
    let toml = toml
        .replace("dimensions = 1152", "dimensions = 32")
        .replace("patch = 896", "patch = 64")
        .replace("stride = 896", "stride = 64")
        .replace("tiles_per_job = 64", "tiles_per_job = 16");
    std::fs::write(p.join("pipeline.toml"), toml).unwrap();
    p
}
