//! End-to-end: a distributed run. Two `medbatch work` processes serve the real RabbitMQ
//! (in a namespace of their own), `medbatch submit` plans, publishes and follows the run,
//! the output goes to the local S3-compatible server; the result equals an embedded run over
//! the same inputs, every job is in the manifest once, and SIGTERM stops the workers cleanly.
//! A worker whose engine hangs exits, and another does its jobs.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};

const INPUTS: [&str; 3] = [
    "examples/lab-reports/hl7-oru.txt",
    "examples/lab-reports/liver-pipe-table.txt",
    "examples/lab-reports/chemistry-colon-lines.txt",
];

fn worker(namespace: &str, model: &str) -> Child {
    worker_with(namespace, model, &[])
}

fn worker_with(namespace: &str, model: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_medbatch"))
        .args(["work", "--model", model, "--concurrency", "2"])
        .args(extra)
        .current_dir(repo_root())
        .env("MEDBATCH_AMQP_NAMESPACE", namespace)
        .env("MEDBATCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `medbatch submit lab-report INPUTS --out OUT --model MODEL --run-id RUN` in `namespace`.
fn submit(namespace: &str, out: &str, model: &str, run_id: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medbatch"));
    c.args(["submit", "lab-report"])
        .args(INPUTS)
        .args(["--out", out, "--model", model, "--run-id", run_id])
        // A job per file: three jobs, shared between the workers.
        .args(["--files-per-job", "1"])
        .current_dir(repo_root())
        .env("MEDBATCH_AMQP_NAMESPACE", namespace);
    c
}

/// A child's lines, collected as they come (a pipe nobody reads could fill and block it).
type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

fn collect_lines(from: impl std::io::Read + Send + 'static) -> Lines {
    use std::io::BufRead;
    let lines = Lines::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    lines
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < std::time::Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The address a worker prints for `--metrics-addr 127.0.0.1:0`.
fn metrics_addr(lines: &Lines) -> String {
    let mut addr = None;
    wait_until("the metrics address", || {
        addr =
            lines.lock().unwrap().iter().find_map(|l| {
                l.split("metrics on http://").nth(1).and_then(|r| r.split('/').next()).map(str::to_string)
            });
        addr.is_some()
    });
    addr.unwrap()
}

/// A plain HTTP/1.0 GET: (status, body); (0, "") when nothing answers.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return (0, String::new()) };
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The workers' scrapes hold the job, document, row, token, engine, queue and S3 metrics, in
/// the Prometheus text format, and count `jobs` jobs done between them.
fn check_metrics(scraped: &[String], jobs: u64) {
    let all = scraped.join("\n");
    for name in [
        "medbatch_jobs_started_total{pipeline=\"lab-report\"}",
        "medbatch_documents_total{",
        "medbatch_rows_total{table=\"lab_results\"}",
        "medbatch_prompt_tokens_total{",
        "medbatch_generation_tokens_total{",
        "medbatch_engine_step_seconds_bucket{le=",
        "medbatch_engine_step_tokens_bucket{le=",
        "medbatch_time_to_first_token_seconds_count",
        "medbatch_kv_blocks_used",
        "medbatch_kv_blocks_free",
        "medbatch_prefix_cache_queries_total",
        "medbatch_queue_lag_seconds_count",
        "medbatch_s3_request_seconds_bucket{op=\"put\",le=",
        "medbatch_engine_busy_seconds",
        "# HELP medbatch_jobs_done_total",
        "# TYPE medbatch_engine_step_seconds histogram",
    ] {
        assert!(all.contains(name), "no {name} in the scrape:\n{all}");
    }
    let done: f64 = all
        .lines()
        .filter(|l| l.starts_with("medbatch_jobs_done_total{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum();
    assert_eq!(done as u64, jobs, "{all}");
    // Patient text never reaches a label: every label value is a known, closed one.
    for l in all.lines().filter(|l| l.starts_with("medbatch_") && l.contains('{')) {
        let labels = &l[l.find('{').unwrap() + 1..l.rfind('}').unwrap()];
        for kv in labels.split("\",").filter(|kv| !kv.is_empty()) {
            let (k, _) = kv.split_once('=').unwrap();
            assert!(["pipeline", "table", "stage", "reason", "outcome", "op", "le", "quantile"].contains(&k), "{l}");
        }
    }
}

/// No part key twice in a manifest's list.
fn assert_each_part_once(keys: &[serde_json::Value]) {
    let mut unique = keys.to_vec();
    unique.sort_by_key(|k| k.to_string());
    unique.dedup();
    assert_eq!(unique.len(), keys.len(), "a part repeats in the manifest: {keys:?}");
}

#[test]
fn a_run_over_rabbitmq_and_s3_equals_the_embedded_run() {
    let model = demo_model();
    let model = model.to_str().unwrap();
    std::env::var("MEDBATCH_AMQP_URL").expect("MEDBATCH_AMQP_URL: run the tests through `bash infra/test.sh`");
    let namespace = format!("e2e-{}", std::process::id());
    let _broker = BrokerNamespace(namespace.clone());
    let bucket = format!("medbatch-dist-{}", std::process::id());
    py_s3(&format!("fs.create_dir('{bucket}')\nprint('{{}}')"));
    // Both workers serve their metrics and probes on a port of their own.
    let mut workers: Vec<(Child, Lines)> = (0..2)
        .map(|_| {
            let mut w = worker_with(&namespace, model, &["--metrics-addr", "127.0.0.1:0"]);
            let lines = collect_lines(w.stderr.take().unwrap());
            (w, lines)
        })
        .collect();
    let addrs: Vec<String> = workers.iter().map(|(_, lines)| metrics_addr(lines)).collect();
    for a in &addrs {
        wait_until(&format!("{a} ready"), || http_get(a, "/readyz").0 == 200);
        assert_eq!(http_get(a, "/healthz"), (200, "ok\n".to_string()));
    }

    let out = format!("s3://{bucket}/runs");
    let submitted = submit(&namespace, &out, model, "dist").output().unwrap();
    let stdout = text(&submitted.stdout);
    let scraped: Vec<String> = addrs.iter().map(|a| http_get(a, "/metrics").1).collect();
    // Stop the workers whatever happened: SIGTERM, then they finish and exit.
    for (w, _) in &workers {
        Command::new("kill").args(["-TERM", &w.id().to_string()]).status().unwrap();
    }
    let mut worker_logs = Vec::new();
    for (mut w, lines) in workers.drain(..) {
        let status = w.wait().unwrap();
        worker_logs.push((status, lines.lock().unwrap().join("\n")));
    }
    check_metrics(&scraped, 3);
    assert!(submitted.status.success(), "{stdout}\n{}\n{worker_logs:?}", text(&submitted.stderr));
    for (status, log) in &worker_logs {
        assert!(status.success(), "worker exit {status:?}: {log}");
        assert!(log.contains("worker stopped after"), "{log}");
    }
    assert!(stdout.contains("3/3 done"), "{stdout}");

    // The same inputs, embedded.
    let (local_rows, _) = embedded_lab_rows(&INPUTS, "dist");

    let got = py_s3(&format!(
        "sel = fs.get_file_info(pafs.FileSelector('{bucket}/runs/lab_results', recursive=True))\n\
         files = [f.path for f in sel if f.type == pafs.FileType.File]\n\
         t = ds.dataset(files, filesystem=fs, format='parquet').to_table()\n\
         m = json.loads(fs.open_input_stream('{bucket}/runs/_runs/dist/manifest.json').read())\n\
         keys = [p['key'] for p in m['parts']]\n\
         print(json.dumps({{'rows': t.num_rows, 'keys': keys, 'jobs': m['jobs'], 'row_jobs': len(set(t.column('job_id').to_pylist()))}}))"
    ));
    assert_eq!(got["rows"].as_u64().unwrap() as usize, local_rows);
    // Every job once in the manifest: three jobs, no part key twice, rows from all three.
    assert_eq!(got["jobs"], 3);
    assert_each_part_once(got["keys"].as_array().unwrap());
    assert_eq!(got["row_jobs"], 3);
    // Status from the output, with the broker: committed, nothing queued.
    let o = Command::new(env!("CARGO_BIN_EXE_medbatch"))
        .args(["status", &out, "--run-id", "dist", "--json"])
        .env("MEDBATCH_AMQP_NAMESPACE", &namespace)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["state"], "committed");
    assert_eq!(s["jobs_queued"], 0);
    py_s3(&format!("fs.delete_dir('{bucket}')\nprint('{{}}')"));
}

#[test]
fn a_worker_whose_engine_hangs_exits_and_another_does_its_jobs() {
    // A worker told that 50 ms inside one model call means a hung device: every step over a
    // lab report is longer (hundreds of prompt tokens through 270M parameters on one or two
    // CPU cores), so it exits with code 4 when it starts its first job, leaving its jobs
    // unacknowledged. A second worker started afterwards gets them from the broker.
    let model = demo_model();
    let model = model.to_str().unwrap();
    std::env::var("MEDBATCH_AMQP_URL").expect("MEDBATCH_AMQP_URL: run the tests through `bash infra/test.sh`");
    let namespace = format!("e2e-stall-{}", std::process::id());
    let _broker = BrokerNamespace(namespace.clone());
    let bucket = format!("medbatch-stall-{}", std::process::id());
    py_s3(&format!("fs.create_dir('{bucket}')\nprint('{{}}')"));
    let stalled = worker_with(&namespace, model, &["--stall-timeout", "0.05"]);
    let out = format!("s3://{bucket}/runs");
    let submitting =
        submit(&namespace, &out, model, "stall").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let o = stalled.wait_with_output().unwrap();
    let log = text(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{log}");
    assert!(log.contains("hung GPU or tensor-parallel rank"), "{log}");
    let healthy = worker(&namespace, model);
    let submitted = submitting.wait_with_output().unwrap();
    Command::new("kill").args(["-TERM", &healthy.id().to_string()]).status().unwrap();
    let h = healthy.wait_with_output().unwrap();
    let stdout = text(&submitted.stdout);
    assert!(submitted.status.success(), "{stdout}\n{}\n{}", text(&submitted.stderr), text(&h.stderr));
    assert!(stdout.contains("3/3 done"), "{stdout}");
    // Every job once in the manifest, with its rows.
    let got = py_s3(&format!(
        "m = json.loads(fs.open_input_stream('{bucket}/runs/_runs/stall/manifest.json').read())\n\
         keys = [p['key'] for p in m['parts']]\n\
         print(json.dumps({{'jobs': m['jobs'], 'keys': keys}}))"
    ));
    assert_eq!(got["jobs"], 3);
    assert_each_part_once(got["keys"].as_array().unwrap());
    py_s3(&format!("fs.delete_dir('{bucket}')\nprint('{{}}')"));
}

/// A pipeline that calls no model over RabbitMQ: `submit wsi-tiles` routes its band jobs to
/// a worker started with `--model none` (which loads none), and the rows equal an embedded
/// run's.
#[test]
fn tile_jobs_go_to_a_worker_without_a_model() {
    std::env::var("MEDBATCH_AMQP_URL").expect("MEDBATCH_AMQP_URL: run the tests through `bash infra/test.sh`");
    let namespace = format!("e2e-tiles-{}", std::process::id());
    let _broker = BrokerNamespace(namespace.clone());
    let dir = tempfile::tempdir().unwrap();
    let slides = dir.path().join("slides");
    make_slides(&slides);
    // 64-px tiles at 10x: a 7 x 5 grid a slide, in bands of two rows.
    let p = tiles_pipeline(dir.path(), 64, 16);
    let inputs = [slides.join("jpeg-ycbcr.tiff"), slides.join("aperio-j2k-rgb.svs"), slides.join("dicom-j2k")];
    let inputs: Vec<&str> = inputs.iter().map(|p| p.to_str().unwrap()).collect();

    let w = worker_with(&namespace, "none", &["--pipelines", p.parent().unwrap().to_str().unwrap()]);
    let out = dir.path().join("out");
    let submitted = Command::new(env!("CARGO_BIN_EXE_medbatch"))
        .args(["submit", p.to_str().unwrap()])
        .args(&inputs)
        .args(["--out", out.to_str().unwrap(), "--run-id", "tiles"])
        .current_dir(repo_root())
        .env("MEDBATCH_AMQP_NAMESPACE", &namespace)
        .output()
        .unwrap();
    Command::new("kill").args(["-TERM", &w.id().to_string()]).status().unwrap();
    let log = text(&w.wait_with_output().unwrap().stderr);
    let stdout = text(&submitted.stdout);
    assert!(submitted.status.success(), "{stdout}\n{}\n{log}", text(&submitted.stderr));
    assert!(!log.contains("loading model"), "{log}");
    // Three slides, three bands each.
    assert!(stdout.contains("9/9 done") && stdout.contains("model none"), "{stdout}");
    let (rows, _, _) = read_parquet_dir(&out.join("wsi_tiles"));

    let embedded = dir.path().join("embedded");
    let mut args = vec!["run", p.to_str().unwrap()];
    args.extend(&inputs);
    args.extend(["--out", embedded.to_str().unwrap()]);
    let o = medbatch(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (local_rows, _, _) = read_parquet_dir(&embedded.join("wsi_tiles"));
    assert!(rows > 0);
    assert_eq!(rows, local_rows);
}

/// An embedding pipeline over RabbitMQ: `submit wsi-tile-embeddings` plans band jobs for the
/// SigLIP checkpoint, a worker started with it (the embedding service, no generation engine)
/// takes them, and the rows — each tile's embedding — equal an embedded run's.
#[test]
fn tile_embedding_jobs_go_to_a_worker_with_the_siglip_model() {
    use arrow::array::AsArray;
    use arrow::datatypes::Float32Type;
    std::env::var("MEDBATCH_AMQP_URL").expect("MEDBATCH_AMQP_URL: run the tests through `bash infra/test.sh`");
    let namespace = format!("e2e-tile-embed-{}", std::process::id());
    let _broker = BrokerNamespace(namespace.clone());
    let dir = tempfile::tempdir().unwrap();
    let slides = dir.path().join("slides");
    make_slides(&slides);
    // The tiny checkpoint's width, 64-px tiles at 10x, bands of two grid rows.
    let p = tile_embeddings_pipeline(dir.path());
    let pipelines = p.parent().unwrap().to_path_buf();
    let model = repo_root().join("tests/fixtures/siglip/tiny");
    let model = model.to_str().unwrap();
    let inputs = [slides.join("deflate.tiff"), slides.join("jpeg-ycbcr.tiff")];
    let inputs: Vec<&str> = inputs.iter().map(|p| p.to_str().unwrap()).collect();

    let w = worker_with(&namespace, model, &["--pipelines", pipelines.to_str().unwrap()]);
    let out = dir.path().join("out");
    let submitted = Command::new(env!("CARGO_BIN_EXE_medbatch"))
        .args(["submit", p.to_str().unwrap()])
        .args(&inputs)
        .args(["--out", out.to_str().unwrap(), "--model", model, "--run-id", "tile-embed"])
        .current_dir(repo_root())
        .env("MEDBATCH_AMQP_NAMESPACE", &namespace)
        .output()
        .unwrap();
    Command::new("kill").args(["-TERM", &w.id().to_string()]).status().unwrap();
    let log = text(&w.wait_with_output().unwrap().stderr);
    let stdout = text(&submitted.stdout);
    assert!(submitted.status.success(), "{stdout}\n{}\n{log}", text(&submitted.stderr));
    // Two slides, three bands each.
    assert!(stdout.contains("6/6 done"), "{stdout}");

    let embedded = dir.path().join("embedded");
    let mut args = vec!["run", p.to_str().unwrap()];
    args.extend(&inputs);
    args.extend(["--out", embedded.to_str().unwrap(), "--model", model]);
    let o = medbatch(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // Each tile's embedding, by slide and place.
    let tiles = |root: &std::path::Path| {
        let (_, _, batches) = read_parquet_dir(&root.join("wsi_tile_embeddings"));
        let mut out: Vec<(String, String, String, Vec<f32>)> = Vec::new();
        for b in batches.iter().filter(|b| b.num_rows() > 0) {
            let ids = string_column(std::slice::from_ref(b), "document_id");
            let (xs, ys) = (string_column(std::slice::from_ref(b), "x"), string_column(std::slice::from_ref(b), "y"));
            let emb = b.column_by_name("embedding").unwrap().as_fixed_size_list();
            for i in 0..b.num_rows() {
                let v = emb.value(i).as_primitive::<Float32Type>().values().to_vec();
                out.push((ids[i].clone().unwrap(), xs[i].clone().unwrap(), ys[i].clone().unwrap(), v));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.2, &a.1).cmp(&(&b.0, &b.2, &b.1)));
        out
    };
    let (distributed, local) = (tiles(&out), tiles(&embedded));
    assert!(!distributed.is_empty());
    assert_eq!(distributed.len(), local.len());
    for (a, b) in distributed.iter().zip(&local) {
        assert_eq!((&a.0, &a.1, &a.2), (&b.0, &b.1, &b.2), "the same tiles");
        assert!(a.3.iter().zip(&b.3).all(|(x, y)| (x - y).abs() < 1e-6), "{} {} {}", a.0, a.1, a.2);
    }
}
