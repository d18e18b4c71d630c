//! The RabbitMQ job queue against a real broker (`MEDBATCH_AMQP_URL`, default the local one
//! at 127.0.0.1:5672 that `infra/rabbitmq.sh` makes sure of). Each test declares its own
//! objects (names with a unique suffix) and deletes them afterwards. A broker that cannot be
//! reached fails the test.

use medbatch_connectors::amqp::{model_route, AmqpConfig, RabbitQueue, Topology};
use medbatch_connectors::queue::JobQueue;
use medbatch_schemas::{Digest, InputKind, InputRef, Job, ModelRef, PipelineRef, RunId, Selection};
use std::collections::BTreeSet;
use std::time::Duration;

fn url() -> String {
    std::env::var("MEDBATCH_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

const MODEL: &[u8] = b"test-model";

fn job(n: u32) -> Job {
    Job::new(
        RunId::new("amqp-test").unwrap(),
        PipelineRef { name: "p".into(), version: "1".into(), digest: Digest::of_bytes(b"p") },
        ModelRef { id: "m".into(), digest: Digest::of_bytes(MODEL) },
        vec![InputRef {
            uri: format!("file:///in/{n}.txt"),
            size: 1,
            sha256: Digest::of_bytes(b"x"),
            kind: InputKind::Text,
            selection: Selection::Whole,
            etag: None,
            case: None,
        }],
        "/out".into(),
    )
}

/// A config with objects of its own, and the route of the test model.
fn config(test: &str) -> (AmqpConfig, String) {
    let mut c = AmqpConfig::new(&url());
    let suffix = format!("-{test}-{}", std::process::id());
    c.topology = Topology::default().with_suffix(&suffix);
    c.prefetch = 2;
    c.connection_name = format!("medbatch{suffix}");
    (c, model_route(Digest::of_bytes(MODEL).as_str()))
}

/// A channel of its own on the test broker.
async fn raw_channel() -> lapin::Channel {
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default()).await.unwrap();
    conn.create_channel().await.unwrap()
}

/// Deletes the test's queues and exchanges.
async fn cleanup(c: &AmqpConfig, route: &str) {
    let t = &c.topology;
    let ch = raw_channel().await;
    for q in [t.queue(route), t.dead_letter_queue.clone()] {
        ch.queue_delete(q.as_str().into(), Default::default()).await.unwrap();
    }
    for x in [&t.exchange, &t.dead_letter_exchange] {
        ch.exchange_delete(x.as_str().into(), Default::default()).await.unwrap();
    }
}

/// Waits up to 10 s for the queue's (ready, dead-lettered) message counts.
async fn wait_for_depths(q: &RabbitQueue, want: (u32, u32)) {
    let mut depths = (u32::MAX, u32::MAX);
    for _ in 0..100 {
        depths = q.depths().await.unwrap();
        if depths == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("(ready, dead-lettered) = {depths:?}, expected {want:?}");
}

async fn next_job(q: &RabbitQueue) -> medbatch_connectors::queue::Delivery {
    tokio::time::timeout(Duration::from_secs(20), q.next())
        .await
        .expect("a delivery within 20 s")
        .expect("no broker error")
        .expect("queue open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_jobs_are_confirmed_and_each_delivered_once_across_consumers() {
    let (c, route) = config("once");
    let publisher = RabbitQueue::connect(c.clone(), &route).await.expect("broker reachable");
    let n = 40;
    for i in 0..n {
        publisher.publish(&job(i)).await.unwrap();
    }
    let (ready, dead) = publisher.depths().await.unwrap();
    assert_eq!((ready, dead), (n, 0));
    // Two consumers share the queue, each taking what the broker gives it (a consumer holds
    // up to its prefetch, so which one gets how many is the broker's choice).
    let a = std::sync::Arc::new(RabbitQueue::connect(c.clone(), &route).await.unwrap());
    let b = std::sync::Arc::new(RabbitQueue::connect(c.clone(), &route).await.unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut consumers = Vec::new();
    for q in [a.clone(), b.clone()] {
        let seen = seen.clone();
        consumers.push(tokio::spawn(async move {
            let mut taken = 0;
            while seen.lock().unwrap().len() < n as usize {
                assert!(std::time::Instant::now() < deadline, "not every job delivered within 60 s");
                let Ok(d) = tokio::time::timeout(Duration::from_millis(300), q.next()).await else { continue };
                let d = d.expect("no broker error").expect("queue open");
                assert_eq!(d.job.attempt, 1);
                assert!(seen.lock().unwrap().insert(d.job.job_id.to_string()), "{} delivered twice", d.job.job_id);
                d.ack().await.unwrap();
                taken += 1;
            }
            taken
        }));
    }
    let mut total = 0;
    for t in consumers {
        total += t.await.unwrap();
    }
    assert_eq!(total, n as usize);
    assert_eq!(seen.lock().unwrap().len(), n as usize);
    wait_for_depths(&publisher, (0, 0)).await;
    a.close().await;
    assert!(a.next().await.unwrap().is_none());
    cleanup(&c, &route).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_jobs_come_back_counted_then_go_to_the_dead_letter_queue() {
    let (c, route) = config("limit");
    let q = RabbitQueue::connect(c.clone(), &route).await.expect("broker reachable");
    q.publish(&job(1)).await.unwrap();
    // delivery_limit = 3: returned 3 times, delivered 4 times in all, then dead-lettered.
    for attempt in 1..=4 {
        let d = next_job(&q).await;
        assert_eq!(d.job.attempt, attempt);
        d.nack(true).await.unwrap();
    }
    wait_for_depths(&q, (0, 1)).await;
    // Looking at the dead-letter queue finds the job with the broker's reason, and leaves it.
    let seen = q.dead_letters(100).await.unwrap();
    let j = job(1);
    let dead = seen.of_run(j.run_id.as_str());
    assert_eq!(dead.len(), 1, "{seen:?}");
    assert_eq!((dead[0].job_id.as_str(), dead[0].reason.as_str()), (j.job_id.as_str(), "delivery_limit"));
    assert!(seen.of_run("another-run").is_empty());
    wait_for_depths(&q, (0, 1)).await;
    assert_eq!(q.dead_letters(100).await.unwrap().of_run(j.run_id.as_str()), dead, "a second look sees the same");
    cleanup(&c, &route).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_delivery_of_a_new_runs_publication_needs_no_marker_check() {
    let (c, route) = config("newrun");
    let q = RabbitQueue::connect(c.clone(), &route).await.expect("broker reachable");
    q.publish_new_run(&[job(1)]).await.unwrap();
    q.publish_batch(&[job(2)]).await.unwrap();
    let mut first = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let d = next_job(&q).await;
        first.insert(d.job.job_id.to_string(), d.is_first_of_new_run());
        if d.job.job_id == job(1).job_id {
            // Returned: its next delivery may follow one that finished it.
            d.nack(true).await.unwrap();
        } else {
            d.ack().await.unwrap();
        }
    }
    assert_eq!(first, [(job(1).job_id.to_string(), true), (job(2).job_id.to_string(), false)].into());
    let again = next_job(&q).await;
    assert_eq!((again.job.job_id.clone(), again.job.attempt, again.is_first_of_new_run()), (job(1).job_id, 2, false));
    again.ack().await.unwrap();
    wait_for_depths(&q, (0, 0)).await;
    cleanup(&c, &route).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_next_job_delivered() {
    let (c, route) = config("poison");
    let q = RabbitQueue::connect(c.clone(), &route).await.expect("broker reachable");
    // A message that is not a job, published straight to the exchange.
    let ch = raw_channel().await;
    ch.basic_publish(
        c.topology.exchange.as_str().into(),
        route.as_str().into(),
        Default::default(),
        b"not a job",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
    // It is queued before the job that follows.
    wait_for_depths(&q, (1, 0)).await;
    q.publish(&job(7)).await.unwrap();
    let d = next_job(&q).await;
    assert_eq!(d.job.job_id, job(7).job_id);
    d.ack().await.unwrap();
    wait_for_depths(&q, (0, 1)).await;
    cleanup(&c, &route).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_reopened_and_unacked_jobs_come_back() {
    let (c, route) = config("reconnect");
    let q = RabbitQueue::connect(c.clone(), &route).await.expect("broker reachable");
    for i in 0..3 {
        q.publish(&job(i)).await.unwrap();
    }
    let first = next_job(&q).await;
    let held = first.job.job_id.clone();
    // The broker drops this test's connection.
    let list = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(&c.connection_name)) {
        let pid = line.split_whitespace().next().unwrap();
        let o = std::process::Command::new("rabbitmqctl").args(["close_connection", pid, "test"]).output().unwrap();
        closed += usize::from(o.status.success());
    }
    assert!(closed >= 1, "no connection closed: {text}");
    // The unacked delivery went with its channel (settling it now is a no-op); the broker
    // delivers it again, counted. Deliveries already buffered when the connection dropped
    // may show up first; their acks are lost the same way and they come back too.
    first.ack().await.unwrap();
    let mut got = BTreeSet::new();
    let mut redelivered_held = false;
    while got.len() < 3 || !redelivered_held {
        let d = next_job(&q).await;
        redelivered_held |= d.job.job_id == held && d.job.attempt >= 2;
        got.insert(d.job.job_id.to_string());
        d.ack().await.unwrap();
    }
    // Publishing works again too.
    q.publish(&job(9)).await.unwrap();
    let d = next_job(&q).await;
    assert_eq!(d.job.job_id, job(9).job_id);
    d.ack().await.unwrap();
    cleanup(&c, &route).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_an_error_naming_it_without_the_password() {
    let mut c = AmqpConfig::new("amqp://guest:sekrit@127.0.0.1:1/%2f");
    c.reconnect_attempts = 0;
    let e = RabbitQueue::connect(c, "x").await.err().expect("no broker on port 1").to_string();
    assert!(e.contains("127.0.0.1:1"), "{e}");
    assert!(!e.contains("sekrit"), "{e}");
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let o = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_ca_file_reaches_the_broker_over_tls() {
    // A CA of the test's own and a certificate for localhost signed by it; a TLS proxy
    // (Python's ssl module) in front of the broker presents it.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=medbatch test CA",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(d.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
    let plain = url();
    let target = plain.split('@').nth(1).and_then(|h| h.split('/').next()).unwrap_or("127.0.0.1:5672").to_string();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tls_proxy.py");
    let mut proxy = std::process::Command::new("python3")
        .arg(&script)
        .args([d.join("server.pem"), d.join("server.key")])
        .arg(&target)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(proxy.stdout.take().unwrap()), &mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("proxy port: {line:?}"));
    let creds = plain.split("://").nth(1).and_then(|r| r.split('@').next()).unwrap_or("guest:guest").to_string();
    let tls_url = format!("amqps://{creds}@localhost:{port}/%2f");

    // With the CA file: a job goes through the broker over TLS.
    let (mut c, route) = config("tls");
    c.url = tls_url.clone();
    c.reconnect_attempts = 0;
    c.ca_file = Some(d.join("ca.pem"));
    let q = RabbitQueue::connect(c.clone(), &route).await.expect("amqps with the CA file");
    q.publish(&job(1)).await.unwrap();
    let got = next_job(&q).await;
    assert_eq!(got.job.job_id, job(1).job_id);
    got.ack().await.unwrap();

    // Without it the broker's certificate is not trusted: an error naming the broker, not
    // the password.
    let mut untrusted = c.clone();
    untrusted.ca_file = None;
    let e = RabbitQueue::connect(untrusted, &route).await.err().expect("an unknown CA is refused").to_string();
    assert!(e.contains(&format!("localhost:{port}")), "{e}");
    let password = creds.split(':').nth(1).unwrap_or("guest");
    assert!(!e.contains(&format!(":{password}@")), "{e}");
    // A CA file that does not exist is named.
    let mut missing = c.clone();
    missing.ca_file = Some(d.join("nope.pem"));
    let e = RabbitQueue::connect(missing, &route).await.err().expect("missing CA file").to_string();
    assert!(e.contains("nope.pem"), "{e}");

    cleanup(&c, &route).await;
    proxy.kill().ok();
    proxy.wait().ok();
}
