//! The job queue over RabbitMQ (AMQP 0-9-1, lapin).
//!
//! Objects (infra/amqp-topology.json, declared idempotently at every connect): a durable
//! direct exchange; per model a durable quorum queue bound with the model's routing key, with
//! a delivery limit and a dead-letter exchange; a fanout dead-letter exchange and its queue.
//! Publishing waits for the broker's confirm of each persistent message. Consumers ack
//! manually, with a prefetch sized to what the worker takes at once; a job is acked only
//! after its outputs are durable. When the connection drops, the queue reconnects with
//! exponential backoff and carries on (unacked deliveries come back from the broker).
//! `amqps://` URLs use TLS, with the platform's roots and an optional CA file.

use crate::queue::{Acker, Delivery, JobQueue, QueueError};
pub use crate::queue::{DeadJob, DeadLetters};
use async_trait::async_trait;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ExchangeKind};
use medbatch_schemas::Job;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// The broker objects medbatch uses (infra/amqp-topology.json).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Topology {
    pub exchange: String,
    pub queue_prefix: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Deliveries of one job before the broker dead-letters it.
    pub delivery_limit: u32,
}

impl Default for Topology {
    /// The shipped infra/amqp-topology.json.
    fn default() -> Self {
        serde_json::from_str(include_str!("../../infra/amqp-topology.json")).expect("shipped topology parses")
    }
}

impl Topology {
    /// The same objects with `suffix` appended to every name (isolated test runs).
    pub fn with_suffix(&self, suffix: &str) -> Self {
        Self {
            exchange: format!("{}{suffix}", self.exchange),
            queue_prefix: format!("{}{suffix}.", self.queue_prefix.trim_end_matches('.')),
            dead_letter_exchange: format!("{}{suffix}", self.dead_letter_exchange),
            dead_letter_queue: format!("{}{suffix}", self.dead_letter_queue),
            delivery_limit: self.delivery_limit,
        }
    }

    /// Queue of the jobs for one model.
    pub fn queue(&self, route: &str) -> String {
        format!("{}{route}", self.queue_prefix)
    }
}

/// Publishes in flight at once (confirms awaited per window).
pub const PUBLISH_WINDOW: usize = 256;

/// The routing key of a model: the first 16 hex digits of its digest.
pub fn model_route(model_digest: &str) -> String {
    model_digest.chars().take(16).collect()
}

/// How to reach the broker.
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL (credentials, host, port, vhost, `?heartbeat=`).
    pub url: String,
    /// PEM file with the CA that signed the broker's certificate (amqps).
    pub ca_file: Option<PathBuf>,
    pub topology: Topology,
    /// Unacknowledged deliveries the broker sends a consumer ahead.
    pub prefetch: u16,
    /// Heartbeat interval in seconds when the URL does not set one.
    pub heartbeat_s: u16,
    /// Reconnect attempts before giving up (backoff doubles from 0.5 s to 30 s).
    pub reconnect_attempts: u32,
    /// Name the connection shows in the broker's management tools.
    pub connection_name: String,
}

impl AmqpConfig {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            ca_file: None,
            topology: Topology::default(),
            prefetch: 4,
            heartbeat_s: 30,
            reconnect_attempts: 12,
            connection_name: "medbatch".into(),
        }
    }

    /// The URL with user and password masked, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// `amqp://user:secret@host/` → `amqp://user:***@host/`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn broker(e: impl std::fmt::Display) -> QueueError {
    QueueError::Broker(e.to_string())
}

/// A live connection with its publishing channel (confirm mode).
struct Live {
    conn: Connection,
    publish: Channel,
}

/// The consuming side: its channel and consumer stream.
struct Consuming {
    channel: Channel,
    consumer: Consumer,
    tag: String,
}

/// Header of a replayed job: its attempts before it was dead-lettered (all its stays in the
/// queue together).
const EARLIER_ATTEMPTS: &str = "x-medbatch-earlier-attempts";
/// Header of a replayed job: how often it was replayed.
const REPLAYS: &str = "x-medbatch-replays";
/// Header of a job's first publication, with its new run (see
/// [`crate::queue::Delivery::is_first_of_new_run`]); a retried publish goes
/// without it.
const NEW_RUN: &str = "x-medbatch-new-run";

/// A dead-lettered job published again by [`RabbitQueue::replay`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    pub job: DeadJob,
    /// Its deliveries before this replay.
    pub attempts: u32,
    /// Times it has been replayed, this one included.
    pub replays: u32,
}

/// The broker's answer to a publish with confirms: taken (and routed to a queue), or why not.
fn confirmed(c: Confirmation, route: &str) -> Result<(), QueueError> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(QueueError::Broker(format!("no queue is bound for model route {route}"))),
        Confirmation::Nack(_) => Err(QueueError::Broker("the broker refused a job (nack)".into())),
        Confirmation::NotRequested => Err(QueueError::Broker("publisher confirms are off".into())),
    }
}

/// A count in a message's headers (0 when absent).
fn header_count(props: &BasicProperties, name: &str) -> u32 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(n),
            AMQPValue::ShortInt(n) => u32::try_from(n).ok(),
            AMQPValue::ShortUInt(n) => Some(u32::from(n)),
            _ => None,
        })
        .unwrap_or(0)
}

/// A true flag in a message's headers.
fn header_flag(props: &BasicProperties, name: &str) -> bool {
    props.headers().as_ref().and_then(|h| h.inner().get(name).cloned()) == Some(AMQPValue::Boolean(true))
}

/// Why the broker dead-lettered a message (its latest `x-death` entry's reason).
fn death_reason(props: &BasicProperties) -> String {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned())
        .and_then(|v| match v {
            AMQPValue::FieldArray(a) => a.as_slice().first().cloned(),
            _ => None,
        })
        .and_then(|first| match first {
            AMQPValue::FieldTable(t) => t.inner().get("reason").cloned(),
            _ => None,
        })
        .and_then(|r| match r {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A job queue on RabbitMQ for one model's jobs (`route`).
pub struct RabbitQueue {
    config: AmqpConfig,
    route: String,
    live: Mutex<Option<Live>>,
    consuming: Mutex<Option<Consuming>>,
    closed: Arc<AtomicBool>,
}

impl RabbitQueue {
    /// Connects and declares the topology for `route` (a model's routing key).
    pub async fn connect(config: AmqpConfig, route: &str) -> Result<Self, QueueError> {
        let q = Self {
            config,
            route: route.to_string(),
            live: Mutex::new(None),
            consuming: Mutex::new(None),
            closed: Arc::new(AtomicBool::new(false)),
        };
        {
            let mut live = q.live.lock().await;
            *live = Some(q.open().await?);
        }
        Ok(q)
    }

    fn url(&self) -> String {
        let u = &self.config.url;
        if u.contains("heartbeat=") {
            return u.clone();
        }
        let sep = if u.contains('?') { '&' } else { '?' };
        format!("{u}{sep}heartbeat={}", self.config.heartbeat_s)
    }

    async fn open(&self) -> Result<Live, QueueError> {
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: match &self.config.ca_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| QueueError::Broker(format!("CA file {}: {e}", p.display())))?,
                ),
                None => None,
            },
        };
        let runtime = lapin::runtime::default_runtime().map_err(broker)?;
        let props = ConnectionProperties::default().with_connection_name(self.config.connection_name.as_str().into());
        let conn = Connection::connect_with_config(&self.url(), props, tls, runtime)
            .await
            .map_err(|e| QueueError::Broker(format!("connecting to {}: {e}", self.config.redacted_url())))?;
        let publish = conn.create_channel().await.map_err(broker)?;
        declare(&publish, &self.config.topology, &self.route).await?;
        publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker)?;
        Ok(Live { conn, publish })
    }

    /// Whether the queue is open and connected, and its consumer's channel (once consuming
    /// began) too: a worker's readiness. Never waits: a lock held by a reconnect or by a
    /// consumer waiting for a delivery counts as live.
    pub fn is_live(&self) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        let connected = self.live.try_lock().map_or(true, |l| l.as_ref().is_some_and(|l| l.conn.status().connected()));
        let consuming =
            self.consuming.try_lock().map_or(true, |c| c.as_ref().is_none_or(|c| c.channel.status().connected()));
        connected && consuming
    }

    /// Publishes again the dead-lettered jobs of `run_id` (only those dead-lettered for
    /// `reason`, when given), each to its model's queue, and removes them from the dead-letter
    /// queue once the broker has confirmed the new copy (a failure in between leaves a job in
    /// both: harmless, as a finished job's redelivery is acknowledged without work). A replayed
    /// job carries the attempts it had before (`x-medbatch-earlier-attempts`), so its attempt
    /// numbers go on from there, and how often it was replayed (`x-medbatch-replays`). Looks
    /// at up to `max` messages; the others stay where they are. Returns the jobs replayed,
    /// with the reason each had been dead-lettered for and its attempts so far.
    pub async fn replay(&self, run_id: &str, reason: Option<&str>, max: usize) -> Result<Vec<Replayed>, QueueError> {
        let live = self.live.lock().await;
        let live = live.as_ref().ok_or(QueueError::Closed)?;
        // A channel of its own: the messages it takes and does not replay go back to the
        // dead-letter queue when it closes.
        let ch = live.conn.create_channel().await.map_err(broker)?;
        ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker)?;
        let mut replayed = Vec::new();
        let queue = self.config.topology.dead_letter_queue.as_str();
        for _ in 0..max {
            let got = ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.map_err(broker)?;
            let Some(m) = got else { break };
            let props = &m.delivery.properties;
            let why = death_reason(props);
            let Ok(job) = serde_json::from_slice::<Job>(&m.delivery.data) else { continue };
            if job.run_id.as_str() != run_id || reason.is_some_and(|r| r != why) {
                continue;
            }
            // The attempts of this stay in the queue: the broker's count of redeliveries, and
            // the first delivery.
            let attempts = header_count(props, EARLIER_ATTEMPTS) + header_count(props, "x-delivery-count") + 1;
            let replays = header_count(props, REPLAYS) + 1;
            let mut headers = FieldTable::default();
            headers.insert(EARLIER_ATTEMPTS.into(), AMQPValue::LongUInt(attempts));
            headers.insert(REPLAYS.into(), AMQPValue::LongUInt(replays));
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            let new = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(job.job_id.to_string().into())
                .with_timestamp(now)
                .with_headers(headers);
            let route = model_route(job.model.digest.as_str());
            let confirm = ch
                .basic_publish(
                    self.config.topology.exchange.as_str().into(),
                    route.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &m.delivery.data,
                    new,
                )
                .await
                .map_err(broker)?;
            confirmed(confirm.await.map_err(broker)?, &route)?;
            m.delivery.acker.ack(BasicAckOptions::default()).await.map_err(broker)?;
            replayed.push(Replayed {
                job: DeadJob { run_id: run_id.to_string(), job_id: job.job_id.to_string(), reason: why },
                attempts,
                replays,
            });
        }
        let _ = ch.close(200, "replayed".into()).await;
        Ok(replayed)
    }

    /// Runs `f` until it succeeds, reconnecting with backoff after connection errors.
    async fn with_reconnect<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, QueueError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, QueueError>>,
    {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.config.reconnect_attempts && !self.closed.load(Ordering::SeqCst) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "{what} failed; reconnecting");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    *self.consuming.lock().await = None;
                    let mut live = self.live.lock().await;
                    *live = self.open().await.ok();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// No more deliveries: the consumer is cancelled and `next` returns `None`.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(c) = self.consuming.lock().await.take() {
            let _ = c.channel.basic_cancel(c.tag.as_str().into(), BasicCancelOptions::default()).await;
        }
    }

    /// Messages waiting in this model's queue and in the dead-letter queue.
    pub async fn depths(&self) -> Result<(u32, u32), QueueError> {
        let live = self.live.lock().await;
        let live = live.as_ref().ok_or(QueueError::Closed)?;
        let ch = live.conn.create_channel().await.map_err(broker)?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let t = &self.config.topology;
        let jobs = ch.queue_declare(t.queue(&self.route).as_str().into(), passive, FieldTable::default()).await;
        let dead = ch.queue_declare(t.dead_letter_queue.as_str().into(), passive, FieldTable::default()).await;
        let _ = ch.close(200, "done".into()).await;
        Ok((jobs.map_err(broker)?.message_count(), dead.map_err(broker)?.message_count()))
    }

    /// Looks at up to `max` messages of the dead-letter queue without removing them: each is
    /// taken unacknowledged on a channel of its own, read, and returned to the queue when the
    /// channel closes. Jobs are identified by run and job id; other messages by their size.
    pub async fn dead_letters(&self, max: usize) -> Result<DeadLetters, QueueError> {
        self.with_reconnect("reading the dead-letter queue", || self.dead_letters_once(max)).await
    }

    async fn dead_letters_once(&self, max: usize) -> Result<DeadLetters, QueueError> {
        let live = self.live.lock().await;
        let live = live.as_ref().ok_or(QueueError::Closed)?;
        let ch = live.conn.create_channel().await.map_err(broker)?;
        let mut out = DeadLetters::default();
        let queue = self.config.topology.dead_letter_queue.as_str();
        while out.scanned < max {
            let got = ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.map_err(broker)?;
            let Some(m) = got else { break };
            out.scanned += 1;
            let reason = death_reason(&m.delivery.properties);
            match serde_json::from_slice::<Job>(&m.delivery.data) {
                Ok(job) => {
                    out.jobs.push(DeadJob { run_id: job.run_id.to_string(), job_id: job.job_id.to_string(), reason })
                }
                Err(_) => out.other += 1,
            }
            out.remaining = m.message_count;
        }
        // Closing the channel returns every message taken above to the queue.
        let _ = ch.close(200, "peeked".into()).await;
        Ok(out)
    }

    /// Sends every job, then waits for every confirm: all or an error (after which the
    /// caller publishes the batch again; a job published twice is harmless, as a finished
    /// job's redelivery is acknowledged without work).
    async fn publish_once(&self, jobs: &[Job], new_run: bool) -> Result<(), QueueError> {
        let live = self.live.lock().await;
        let live = live.as_ref().ok_or_else(|| QueueError::Broker("not connected".into()))?;
        let mut pending = Vec::with_capacity(jobs.len());
        for job in jobs {
            let payload = serde_json::to_vec(job).map_err(broker)?;
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(job.job_id.to_string().into())
                .with_timestamp(
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs(),
                );
            let props = if new_run {
                let mut headers = FieldTable::default();
                headers.insert(NEW_RUN.into(), AMQPValue::Boolean(true));
                props.with_headers(headers)
            } else {
                props
            };
            let route = model_route(job.model.digest.as_str());
            let confirm = live
                .publish
                .basic_publish(
                    self.config.topology.exchange.as_str().into(),
                    route.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &payload,
                    props,
                )
                .await
                .map_err(broker)?;
            pending.push((route, confirm));
        }
        for (route, confirm) in pending {
            confirmed(confirm.await.map_err(broker)?, &route)?;
        }
        Ok(())
    }

    async fn consume(&self) -> Result<(), QueueError> {
        let mut consuming = self.consuming.lock().await;
        if consuming.is_some() {
            return Ok(());
        }
        let live = self.live.lock().await;
        let live = live.as_ref().ok_or_else(|| QueueError::Broker("not connected".into()))?;
        let channel = live.conn.create_channel().await.map_err(broker)?;
        channel.basic_qos(self.config.prefetch.max(1), BasicQosOptions::default()).await.map_err(broker)?;
        let tag = format!("medbatch-{}", std::process::id());
        let consumer = channel
            .basic_consume(
                self.config.topology.queue(&self.route).as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        *consuming = Some(Consuming { channel, consumer, tag });
        Ok(())
    }

    async fn next_once(&self) -> Result<Option<Delivery>, QueueError> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Ok(None);
            }
            self.consume().await?;
            let item = {
                let mut consuming = self.consuming.lock().await;
                // `close` (or a reconnect) may have taken the consumer meanwhile.
                let Some(c) = consuming.as_mut() else { continue };
                tokio::select! {
                    item = c.consumer.next() => item,
                    // Re-check `closed` now and then.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            };
            let d = match item {
                None if self.closed.load(Ordering::SeqCst) => return Ok(None),
                None => return Err(QueueError::Broker("the consumer was cancelled by the broker".into())),
                Some(Err(e)) => return Err(broker(e)),
                Some(Ok(d)) => d,
            };
            // Deliveries after the first carry the broker's count of earlier ones; a job
            // replayed from the dead-letter queue, the attempts before it was dead-lettered.
            let earlier =
                header_count(&d.properties, "x-delivery-count") + header_count(&d.properties, EARLIER_ATTEMPTS);
            match serde_json::from_slice::<Job>(&d.data) {
                Ok(mut job) => {
                    job.attempt = earlier + 1;
                    let published = *d.properties.timestamp();
                    let first = earlier == 0 && !d.redelivered && header_flag(&d.properties, NEW_RUN);
                    let delivery = Delivery::new(job, Box::new(RabbitAcker { acker: d.acker }));
                    let delivery = if first { delivery.first_of_new_run() } else { delivery };
                    return Ok(Some(match published {
                        Some(t) => delivery.published_at(t),
                        None => delivery,
                    }));
                }
                Err(e) => {
                    // Never a job: straight to the dead-letter queue, and on to the next.
                    tracing::error!(error = %e, bytes = d.data.len(), "undecodable message dead-lettered");
                    let _ = d.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await;
                }
            }
        }
    }
}

/// Declares the exchanges and queues for `route` (idempotent; refuses objects that exist
/// with other arguments, naming them).
async fn declare(ch: &Channel, t: &Topology, route: &str) -> Result<(), QueueError> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    fn exists(what: &str) -> impl Fn(lapin::Error) -> QueueError + '_ {
        move |e| QueueError::Broker(format!("declaring {what}: {e}"))
    }
    ch.exchange_declare(t.exchange.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default())
        .await
        .map_err(exists(&t.exchange))?;
    ch.exchange_declare(t.dead_letter_exchange.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .map_err(exists(&t.dead_letter_exchange))?;
    let qopts = QueueDeclareOptions { durable: true, ..Default::default() };
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(t.dead_letter_queue.as_str().into(), qopts, quorum.clone())
        .await
        .map_err(exists(&t.dead_letter_queue))?;
    ch.queue_bind(
        t.dead_letter_queue.as_str().into(),
        t.dead_letter_exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(broker)?;
    let queue = t.queue(route);
    let mut args = quorum;
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(t.delivery_limit)));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(t.dead_letter_exchange.as_str().into()));
    ch.queue_declare(queue.as_str().into(), qopts, args).await.map_err(exists(&queue))?;
    ch.queue_bind(
        queue.as_str().into(),
        t.exchange.as_str().into(),
        route.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(broker)?;
    Ok(())
}

struct RabbitAcker {
    acker: lapin::Acker,
}

#[async_trait]
impl Acker for RabbitAcker {
    // A delivery whose channel is gone cannot be settled; the broker returns it to the
    // queue by itself. That is not an error of the job: its redelivery finds the completion
    // marker and is acknowledged without work (or, for a nack, is simply delivered again).
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        if let Err(e) = self.acker.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %e, "ack lost with its channel; the broker will redeliver the job");
        }
        Ok(())
    }

    async fn nack(self: Box<Self>, _job: Job, requeue: bool) -> Result<(), QueueError> {
        if let Err(e) = self.acker.nack(BasicNackOptions { requeue, ..Default::default() }).await {
            tracing::warn!(error = %e, "nack lost with its channel; the broker will redeliver the job");
        }
        Ok(())
    }
}

#[async_trait]
impl JobQueue for RabbitQueue {
    async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        self.with_reconnect("publish", || self.publish_once(std::slice::from_ref(job), false)).await
    }

    async fn publish_batch(&self, jobs: &[Job]) -> Result<(), QueueError> {
        for window in jobs.chunks(PUBLISH_WINDOW) {
            self.with_reconnect("publish", || self.publish_once(window, false)).await?;
        }
        Ok(())
    }

    async fn publish_new_run(&self, jobs: &[Job]) -> Result<(), QueueError> {
        for window in jobs.chunks(PUBLISH_WINDOW) {
            // Only a window's first try is marked: a retry may publish jobs twice.
            let mut tries = 0;
            self.with_reconnect("publish", || {
                tries += 1;
                self.publish_once(window, tries == 1)
            })
            .await?;
        }
        Ok(())
    }

    async fn next(&self) -> Result<Option<Delivery>, QueueError> {
        self.with_reconnect("consume", || self.next_once()).await
    }

    async fn dead_letters(&self, max: usize) -> Result<DeadLetters, QueueError> {
        RabbitQueue::dead_letters(self, max).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_topology_and_names() {
        let t = Topology::default();
        assert_eq!(t.delivery_limit, 3);
        assert_eq!(t.queue("abc"), "medbatch.jobs.abc");
        let s = t.with_suffix("-t1");
        assert_eq!((s.exchange.as_str(), s.queue("abc")), ("medbatch.jobs-t1", "medbatch.jobs-t1.abc".to_string()));
        assert_eq!(model_route("0123456789abcdef0123"), "0123456789abcdef");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqps://u:p@w@host/"), "amqps://u:***@host/");
        assert_eq!(redact_url("amqp://host/"), "amqp://host/");
    }
}
