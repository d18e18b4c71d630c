//! Chaos: a distributed run survives killed workers, a restarted S3 server and a dropped
//! broker connection, and its output is exactly once.
//!
//! 600 one-note jobs of a `structured` pipeline run on a tiny random-weight Gemma 3 (the
//! Hugging Face fixture `gqa_window` with the fixture tokenizer) through the real engine,
//! served by three `medbatch work` processes over the real RabbitMQ, writing to the local
//! S3-compatible server. While `medbatch submit` follows the run: a worker is killed with
//! SIGKILL right after it starts a job, three times (each replaced by a fresh worker); the S3
//! server is restarted; the broker closes one worker's connection; and `submit` itself is
//! killed and started again with the same run id. Afterwards the
//! manifest lists every job once with the digests of the parts as stored, no stray part is
//! left, no job's rows appear in two parts, and the row counts equal those of an embedded
//! run over the same inputs. A job of a pipeline version no worker serves is dead-lettered
//! after the delivery limit, `submit` says so and stops, and `status` shows it; once a
//! worker serves that version, `replay` publishes it again with its attempt count carried on,
//! and commits the run.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// Enough jobs that the run outlasts the chaos: each job takes well under 0.1 s, and the
// chaos steps (a kill, a storage restart, ...) take seconds.
const DOCS: usize = 600;

/// The tiny random-weight checkpoint: model files of one fixture plus the fixture tokenizer.
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-gemma3");
    std::fs::create_dir(&model).unwrap();
    let fixtures = repo_root().join("tests/fixtures/hf");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixtures.join("models/gqa_window").join(f), model.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"] {
        std::fs::copy(fixtures.join("tokenizer").join(f), model.join(f)).unwrap();
    }
    model
}

/// A per-document `structured` pipeline named `chaos-triage` in `root`; `variant` changes
/// its prompt (and so its digest).
fn pipeline(root: &Path, variant: &str) -> PathBuf {
    let dir = root.join("chaos-triage");
    std::fs::create_dir_all(&dir).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "urgent": { "type": "boolean" },
            "service": { "enum": ["cardiology", "oncology", "renal", "other"] },
            "score": { "type": "integer", "minimum": 0, "maximum": 9 }
        },
        "required": ["urgent", "service", "score"],
        "additionalProperties": false
    });
    std::fs::write(dir.join("schema.json"), serde_json::to_vec_pretty(&schema).unwrap()).unwrap();
    std::fs::write(
        dir.join("pipeline.toml"),
        "name = \"chaos-triage\"\nversion = \"1\"\ntask = \"structured\"\n\n[input]\n\n[output]\ntable = \"triage\"\n\
         rows = \"per_document\"\n\n[prompt]\ntemplate = \"prompt.j2\"\nschema = \"schema.json\"\n\n[generation]\n\
         max_new_tokens = 48\n\n[extraction]\nunit = \"document\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("prompt.j2"), format!("Triage {variant} as JSON.\nNote: {{{{ document }}}}\nJSON:"))
        .unwrap();
    dir
}

/// A running `medbatch work` whose log lines are collected.
struct Worker {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn spawn(namespace: &str, model: &Path, pipelines: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_medbatch"))
            .args(["work", "--model", model.to_str().unwrap(), "--concurrency", "2"])
            .arg("--pipelines")
            .arg(pipelines)
            .current_dir(repo_root())
            .env("MEDBATCH_AMQP_NAMESPACE", namespace)
            .env("MEDBATCH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, log }
    }

    fn count(&self, what: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(what)).count()
    }

    /// Job ids this worker has started and not finished.
    fn in_hand(&self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        let mut open: Vec<String> = Vec::new();
        for l in log.iter() {
            let Some(id) = l.split("job_id=").nth(1).and_then(|s| s.split([' ', '}']).next()) else { continue };
            if l.contains("job started") {
                open.push(id.to_string());
            } else if l.contains("job done") || l.contains("job failed") || l.contains("finished first") {
                open.retain(|x| x != id);
            }
        }
        open
    }

    /// The last `n` lines of its log.
    fn tail(&self, n: usize) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(n)..].to_vec()
    }

    /// Waits for the worker to start a job, then kills it with SIGKILL; returns the jobs it
    /// held. `state` describes the rest of the run for the failure message.
    fn kill_mid_job(&mut self, state: &dyn Fn() -> String) -> Vec<String> {
        let before = self.count("job started");
        let t = Instant::now();
        while self.count("job started") == before {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "worker started no job in 300 s: {:?}\n{}",
                self.log.lock().unwrap(),
                state()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let held = self.in_hand();
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        held
    }
}

fn done_jobs(workers: &[&Worker]) -> usize {
    workers.iter().map(|w| w.count("job done")).sum()
}

fn wait_for(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn medbatch_env(namespace: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medbatch"))
        .args(args)
        .current_dir(repo_root())
        .env("MEDBATCH_AMQP_NAMESPACE", namespace)
        .output()
        .unwrap()
}

/// Closes the broker connection of the process `pid`; returns how many were closed.
fn close_connection_of(pid: u32) -> usize {
    let list = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    let name = format!("medbatch pid {pid}");
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(&name)) {
        let conn = line.split_whitespace().next().unwrap();
        let o = Command::new("rabbitmqctl").args(["close_connection", conn, "chaos test"]).output().unwrap();
        closed += usize::from(o.status.success());
    }
    assert!(closed >= 1, "no connection of pid {pid} found: {text}");
    closed
}

#[test]
fn a_run_survives_killed_workers_a_storage_restart_and_a_dropped_connection() {
    std::env::var("MEDBATCH_AMQP_URL").expect("MEDBATCH_AMQP_URL: run the tests through `bash infra/test.sh`");
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let pipelines = dir.path().join("pipelines");
    let pipe = pipeline(&pipelines, "clinic notes");
    let inputs = dir.path().join("notes");
    std::fs::create_dir(&inputs).unwrap();
    for i in 0..DOCS {
        let note = format!(
            "Note {i}. Seen in clinic {}. Blood pressure {}/{} mmHg, pulse {}. Plan: review in {} weeks.\n",
            i % 7,
            100 + i % 50,
            60 + i % 30,
            55 + i % 40,
            1 + i % 6
        );
        std::fs::write(inputs.join(format!("note-{i:04}.txt")), note).unwrap();
    }
    let namespace = format!("chaos-{}", std::process::id());
    let _broker = BrokerNamespace(namespace.clone());
    let bucket = format!("medbatch-chaos-{}", std::process::id());
    py_s3(&format!("fs.create_dir('{bucket}')\nprint('{{}}')"));
    let out = format!("s3://{bucket}/out");

    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::spawn(&namespace, &model, &pipelines)).collect();
    let mut retired: Vec<Worker> = Vec::new();
    // Each submitter writes to files (a pipe nobody reads while it runs could fill and block it).
    let logs = tempfile::tempdir().unwrap();
    let mut submits = 0;
    let mut start_submit = || {
        submits += 1;
        let (o, e) =
            (logs.path().join(format!("submit-{submits}.out")), logs.path().join(format!("submit-{submits}.err")));
        let child = Command::new(env!("CARGO_BIN_EXE_medbatch"))
            .args(["submit", pipe.to_str().unwrap(), inputs.to_str().unwrap(), "--out", &out])
            .args(["--model", model.to_str().unwrap(), "--run-id", "chaos"])
            // A job per note: 600 jobs for the chaos to fall between.
            .args(["--files-per-job", "1"])
            .current_dir(repo_root())
            .env("MEDBATCH_AMQP_NAMESPACE", &namespace)
            .stdout(std::fs::File::create(&o).unwrap())
            .stderr(std::fs::File::create(&e).unwrap())
            .spawn()
            .unwrap();
        (child, o, e)
    };
    let mut submit = start_submit();

    // The chaos, each step once the run has got this far (jobs finished, all workers).
    let mut kills = Vec::new();
    let progress = |workers: &[Worker], retired: &[Worker]| {
        let all: Vec<&Worker> = workers.iter().chain(retired.iter()).collect();
        done_jobs(&all)
    };
    for (step, at) in [(0, 20), (1, 50), (2, 80), (3, 110), (4, 140), (5, 150)] {
        wait_for(&format!("{at} jobs done"), Duration::from_secs(300), || progress(&workers, &retired) >= at);
        match step {
            0 | 2 | 4 => {
                let mut victim = workers.remove(step / 2 % workers.len());
                let state = || {
                    let others: Vec<Vec<String>> = workers.iter().chain(retired.iter()).map(|w| w.tail(4)).collect();
                    format!("other workers' last lines: {others:?}\n{}", broker_state(&namespace))
                };
                kills.push(victim.kill_mid_job(&state));
                retired.push(victim);
                workers.push(Worker::spawn(&namespace, &model, &pipelines));
            }
            1 => {
                let o = Command::new("bash")
                    .args(["infra/s3-server.sh", "restart"])
                    .current_dir(repo_root())
                    .output()
                    .unwrap();
                assert!(o.status.success(), "restarting the S3 server: {}", text(&o.stderr));
            }
            3 => {
                close_connection_of(workers[0].child.id());
            }
            _ => {
                // The submitter killed and started again with the same run id: it plans the
                // same jobs and publishes only those without a marker.
                submit.0.kill().unwrap();
                submit.0.wait().unwrap();
                submit = start_submit();
            }
        }
    }
    let chaos_done_at = progress(&workers, &retired);
    assert!(chaos_done_at < DOCS, "the run finished before the chaos did ({chaos_done_at} jobs done)");
    for held in &kills {
        assert!(!held.is_empty(), "a worker was killed holding no job");
    }

    // The submitter commits and ends; one still following after ten minutes is a failure, with
    // what it said.
    let (mut child, o, e) = submit;
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(600) {
            child.kill().unwrap();
            child.wait().unwrap();
            let err = std::fs::read_to_string(&e).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(40).collect();
            panic!("submit did not end within 10 minutes of the chaos; its last lines (newest first): {tail:#?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = std::fs::read_to_string(&o).unwrap();
    let stderr = std::fs::read_to_string(&e).unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{DOCS}/{DOCS} done")), "{stdout}");
    // "N input files, N jobs (P published in T s, D already done)": some were done already.
    let published =
        stderr.split(" published in").next().and_then(|s| s.rsplit('(').next()).and_then(|n| n.parse::<usize>().ok());
    let already =
        stderr.split(" already done").next().and_then(|s| s.rsplit(", ").next()).and_then(|n| n.parse::<usize>().ok());
    let (published, already) = (published.expect(&stderr), already.expect(&stderr));
    assert_eq!(published + already, DOCS, "{stderr}");
    assert!(already >= 150, "{stderr}");

    // A job for a pipeline version no worker serves: returned by every worker until the
    // delivery limit dead-letters it; submit stops and says so, status shows it.
    let alt = pipeline(&dir.path().join("other-version"), "changed prompt");
    let poison_out = format!("s3://{bucket}/poison");
    let one = inputs.join("note-0000.txt");
    let o = medbatch_env(
        &namespace,
        &[
            "submit",
            alt.to_str().unwrap(),
            one.to_str().unwrap(),
            "--out",
            &poison_out,
            "--model",
            model.to_str().unwrap(),
            "--run-id",
            "poison",
        ],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{}\n{err}", text(&o.stdout));
    assert!(err.contains("dead-lettered"), "{err}");
    let o = medbatch_env(&namespace, &["status", &poison_out, "--run-id", "poison", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["jobs_dead_lettered"], 1, "{s}");
    assert_eq!(s["dead_lettered_jobs"][0]["reason"], "delivery_limit", "{s}");
    assert!(s["state"].as_str().unwrap().starts_with("stalled"), "{s}");
    assert_eq!(s["jobs_done"], 0, "{s}");

    // Stop the workers.
    for w in &workers {
        Command::new("kill").args(["-TERM", &w.child.id().to_string()]).status().unwrap();
    }
    // Every job a killed worker held was taken up again by another worker.
    let all: Vec<&Worker> = workers.iter().chain(retired.iter()).collect();
    for id in kills.iter().flatten() {
        let again = all
            .iter()
            .flat_map(|w| w.log.lock().unwrap().clone())
            .filter(|l| {
                l.contains(id.as_str())
                    && (l.contains("attempt=2") || l.contains("attempt=3") || l.contains("attempt=4"))
            })
            .count();
        assert!(again >= 1, "job {id}, held by a killed worker, was not delivered again");
    }
    let started: usize = all.iter().map(|w| w.count("job started")).sum();
    let skipped: usize = all.iter().map(|w| w.count("already done")).sum();
    eprintln!(
        "chaos: {} jobs, {started} starts, {skipped} redeliveries of finished jobs, jobs held at the kills: {kills:?}",
        DOCS
    );
    drop(all);
    let mut restarted = retired.iter().map(|w| w.count("reconnecting")).sum::<usize>();
    for mut w in workers.drain(..) {
        let status = w.child.wait().unwrap();
        assert!(status.success(), "worker exit {status:?}: {:?}", w.log.lock().unwrap());
        restarted += w.count("reconnecting");
    }
    assert!(restarted >= 1, "no worker saw its connection drop");
    eprintln!("chaos: {restarted} reconnects");

    // The fix: a worker that serves that version (the others are stopped). `replay`
    // publishes the dead-lettered job again (its attempts going on from where they were),
    // follows the run and commits it; status records the replay.
    let fixed = Worker::spawn(&namespace, &model, alt.parent().unwrap());
    let args = [
        "replay",
        &poison_out,
        "--run-id",
        "poison",
        "--reason",
        "delivery_limit",
        "--pipelines",
        alt.parent().unwrap().to_str().unwrap(),
    ];
    let o = medbatch_env(&namespace, &args);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("1 dead-lettered jobs published again"), "{err}");
    assert!(out.contains("1/1 done"), "{out}");
    let o = medbatch_env(&namespace, &["status", &poison_out, "--run-id", "poison", "--json"]);
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["state"], "committed", "{s}");
    assert_eq!(s["jobs_dead_lettered"], 0, "{s}");
    let replayed = &s["replays"][0]["jobs"][0];
    assert_eq!(replayed["reason"], "delivery_limit", "{s}");
    let before = replayed["attempts"].as_u64().unwrap();
    assert!(before >= 2, "the job had been delivered until the limit: {s}");
    let attempt = fixed
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("job started"))
        .find_map(|l| l.split("attempt=").nth(1).and_then(|a| a.split([' ', '}']).next()?.parse::<u64>().ok()));
    assert_eq!(attempt, Some(before + 1), "the replayed job's attempts go on: {:?}", fixed.tail(10));
    Command::new("kill").args(["-TERM", &fixed.child.id().to_string()]).status().unwrap();
    let mut fixed = fixed;
    assert!(fixed.child.wait().unwrap().success(), "{:?}", fixed.tail(10));

    // The output, read independently with pyarrow.
    let got = py_s3(&format!(
        "import hashlib, collections\n\
         import pyarrow as pa, pyarrow.parquet as pq\n\
         m = json.loads(fs.open_input_stream('{bucket}/out/_runs/chaos/manifest.json').read())\n\
         listed = set()\n\
         for t in ['triage/run_id=chaos', '_errors/run_id=chaos', '_documents/run_id=chaos', '_inputs']:\n\
         \x20   try:\n\
         \x20       sel = fs.get_file_info(pafs.FileSelector('{bucket}/out/' + t, recursive=True))\n\
         \x20   except FileNotFoundError:\n\
         \x20       sel = []\n\
         \x20   listed |= {{f.path[len('{bucket}/out/'):] for f in sel if f.type == pafs.FileType.File}}\n\
         rows = collections.Counter()\n\
         digest_ok = True\n\
         parts_of_job = collections.Counter()\n\
         mixed = []\n\
         for p in m['parts']:\n\
         \x20   data = fs.open_input_stream('{bucket}/out/' + p['key']).read()\n\
         \x20   digest_ok &= hashlib.sha256(data).hexdigest() == p['sha256'].split(':')[-1]\n\
         \x20   if p['table'] == '_inputs': continue\n\
         \x20   t = pq.read_table(pa.BufferReader(data))\n\
         \x20   ids = set(t.column('job_id').to_pylist())\n\
         \x20   if len(ids) != 1: mixed.append(p['key'])\n\
         \x20   for j in ids: parts_of_job[(p['table'], j)] += 1\n\
         \x20   rows[p['table']] += t.num_rows\n\
         print(json.dumps({{'jobs': m['jobs'], 'parts': len(m['parts']), 'keys': len({{p['key'] for p in m['parts']}}),\n\
         \x20   'listed': sorted(listed), 'manifest_keys': sorted(p['key'] for p in m['parts']), 'digest_ok': digest_ok,\n\
         \x20   'rows': rows, 'mixed': mixed, 'repeated': [k for k, n in parts_of_job.items() if n > 1],\n\
         \x20   'jobs_with_rows': len({{j for (_, j) in parts_of_job}})}}))"
    ));
    assert_eq!(got["jobs"], DOCS, "{got}");
    assert_eq!(got["parts"], got["keys"], "a part is listed twice: {got}");
    assert_eq!(got["listed"], got["manifest_keys"], "stored parts differ from the manifest's");
    assert_eq!(got["digest_ok"], true, "a part's bytes differ from its manifest digest");
    assert_eq!(got["mixed"], serde_json::json!([]), "{got}");
    assert_eq!(got["repeated"], serde_json::json!([]), "a job's rows are in two parts: {got}");
    assert_eq!(got["jobs_with_rows"], DOCS, "{got}");

    // The same inputs, embedded.
    let local = dir.path().join("embedded");
    let o = medbatch(&[
        "run",
        pipe.to_str().unwrap(),
        inputs.to_str().unwrap(),
        "--out",
        local.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--run-id",
        "chaos",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let count = |table: &str| {
        let d = local.join(table);
        if d.exists() {
            read_parquet_dir(&d).0
        } else {
            0
        }
    };
    let rows = &got["rows"];
    assert_eq!(rows["triage"].as_u64().unwrap_or(0) as usize, count("triage"), "{got}");
    assert_eq!(rows["_errors"].as_u64().unwrap_or(0) as usize, count("_errors"), "{got}");
    assert_eq!(count("triage") + count("_errors"), DOCS);
    // Every document accounted for once, under faults as embedded.
    assert_eq!(rows["_documents"].as_u64().unwrap_or(0) as usize, DOCS, "{got}");
    assert_eq!(count("_documents"), DOCS);
    py_s3(&format!("fs.delete_dir('{bucket}')\nprint('{{}}')"));
}
