//! The operations endpoint (`--metrics-addr` on `work`, `submit` and `run`): Prometheus
//! metrics at `/metrics`, and the probes `/healthz` (the engine is not stalled; it does not
//! depend on the broker) and `/readyz` (the model is loaded and the queue's consumer is live).
//!
//! The libraries record through the `metrics` facade; this module installs the Prometheus
//! recorder (no listener of its own) and serves the three paths with hyper on one port, so
//! that one container port serves both the scrape and the kubelet's probes. Names are
//! prefixed `medbatch_`, label sets are closed (pipeline and table names, closed enums), and
//! no label or value ever holds document text. docs/operations.md lists them.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use medbatch_engine::EngineHandle;
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Histogram buckets of times (seconds): from a fast step to a long job.
const SECONDS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Buckets of token rows per forward pass.
const TOKENS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];

/// `--metrics-addr`, shared by `work`, `submit` and `run`.
#[derive(clap::Args, Clone, Debug)]
pub struct OpsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics, and the probes /healthz and /readyz
    /// (e.g. 0.0.0.0:9090; port 0 picks a free port, printed at start).
    #[arg(long, env = "MEDBATCH_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
}

impl OpsArgs {
    /// Starts the endpoint when `--metrics-addr` is given; returns its health state.
    pub async fn start(&self) -> anyhow::Result<Arc<Health>> {
        let health = Arc::new(Health::default());
        if let Some(addr) = self.metrics_addr {
            let bound = start(addr, health.clone()).await?;
            eprintln!("medbatch: metrics on http://{bound}/metrics (probes /healthz, /readyz)");
        }
        Ok(health)
    }
}

/// What the probes look at; filled in as the process starts.
#[derive(Default)]
pub struct Health {
    /// The model is loaded (set once the process is ready to take work).
    loaded: AtomicBool,
    /// The engine whose calls must not outlast `stall`.
    engine: OnceLock<(EngineHandle, Duration)>,
    /// Whether the queue's consumer is live (unset: no queue, as in `run`).
    queue: OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl Health {
    /// The engine, whose one call may last up to `stall` before `/healthz` fails.
    pub fn set_engine(&self, engine: EngineHandle, stall: Duration) {
        let _ = self.engine.set((engine, stall));
    }

    /// Readiness also asks `live` whether the queue's consumer is live.
    pub fn set_queue(&self, live: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.queue.set(Box::new(live));
    }

    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::SeqCst);
    }

    fn busy(&self) -> Option<Duration> {
        self.engine.get().and_then(|(e, _)| e.busy_for())
    }

    /// `Err(why)` when one call into the model has lasted longer than the stall limit.
    fn healthy(&self) -> Result<(), String> {
        match (self.busy(), self.engine.get()) {
            (Some(busy), Some((_, stall))) if busy > *stall => Err(format!(
                "the engine has been inside one call for {:.1} s (limit {:.1} s)",
                busy.as_secs_f64(),
                stall.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }

    fn ready(&self) -> Result<(), &'static str> {
        if !self.loaded.load(Ordering::SeqCst) {
            return Err("the model is not loaded yet");
        }
        if self.queue.get().is_some_and(|live| !live()) {
            return Err("the queue's consumer is not connected");
        }
        Ok(())
    }
}

/// Installs the Prometheus recorder, describes the metrics, and serves `/metrics`,
/// `/healthz` and `/readyz` on `addr` (port 0: any free port). Returns the address bound.
pub async fn start(addr: SocketAddr, health: Arc<Health>) -> anyhow::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full("medbatch_engine_step_tokens".into()), TOKENS)?
        .install_recorder()?;
    describe();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (handle, health) = (handle.clone(), health.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let reply = answer(&req, &handle, &health);
                    async move { Ok::<_, std::convert::Infallible>(reply) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok(bound)
}

fn answer(req: &Request<hyper::body::Incoming>, handle: &PrometheusHandle, health: &Health) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", kind)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    let text = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => {
            let busy = health.busy().unwrap_or_default();
            metrics::gauge!("medbatch_engine_busy_seconds").set(busy.as_secs_f64());
            reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", handle.render())
        }
        "/healthz" => match health.healthy() {
            Ok(()) => reply(StatusCode::OK, text, "ok\n".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, text, format!("{why}\n")),
        },
        "/readyz" => match health.ready() {
            Ok(()) => reply(StatusCode::OK, text, "ready\n".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, text, format!("{why}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, text, "/metrics, /healthz or /readyz\n".into()),
    }
}

/// The HELP lines and units of every metric medbatch records.
fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h};
    c!("medbatch_jobs_started_total", "Jobs started, by pipeline");
    c!("medbatch_jobs_done_total", "Jobs done (their parts and completion marker written), by pipeline");
    c!("medbatch_jobs_failed_total", "Jobs that failed and went back to the queue, by pipeline");
    c!("medbatch_jobs_dead_lettered_total", "Jobs rejected to the dead-letter queue, by pipeline");
    c!("medbatch_jobs_published_total", "Jobs published to the queue by submit");
    c!("medbatch_documents_total", "Documents of finished jobs, by pipeline and outcome (ok, failed)");
    c!("medbatch_rows_total", "Rows written, by table (the system tables _errors and _documents included)");
    c!("medbatch_error_rows_total", "Error rows, by stage and reason");
    c!("medbatch_prompt_tokens_total", Unit::Count, "Prompt tokens of finished jobs, by pipeline");
    c!("medbatch_generation_tokens_total", Unit::Count, "Generated tokens of finished jobs, by pipeline");
    h!("medbatch_queue_lag_seconds", Unit::Seconds, "Time from a job's publication to its delivery");
    h!("medbatch_engine_step_seconds", Unit::Seconds, "Wall time of one decoding step (forward pass and sampling)");
    h!("medbatch_engine_step_tokens", Unit::Count, "Token rows per forward pass");
    h!(
        "medbatch_time_to_first_token_seconds",
        Unit::Seconds,
        "Time from a request's admission to the engine to its first generated token"
    );
    g!("medbatch_engine_sequences_running", "Sequences in flight after the last step");
    g!("medbatch_engine_sequences_waiting", "Requests waiting for admission after the last step");
    g!("medbatch_kv_blocks_used", "KV cache pages held by sequences or the prefix cache");
    g!("medbatch_kv_blocks_free", "KV cache pages free");
    c!("medbatch_prefix_cache_queries_total", Unit::Count, "Prompt tokens looked up in the prefix cache");
    c!("medbatch_prefix_cache_hits_total", Unit::Count, "Prompt tokens found in the prefix cache");
    c!("medbatch_engine_preemptions_total", "Sequences preempted because the KV cache ran out");
    g!(
        "medbatch_engine_busy_seconds",
        Unit::Seconds,
        "How long the engine's current call has lasted (0 between calls); a stall when it keeps growing"
    );
    h!("medbatch_s3_request_seconds", Unit::Seconds, "S3 request latency (retries included), by operation");
    c!("medbatch_s3_retries_total", "S3 request attempts after the first, by operation");
    g!("medbatch_run_jobs_planned", "Jobs of the run followed by submit");
    g!("medbatch_run_jobs_done", "Jobs of the run followed by submit with a completion marker");
}
