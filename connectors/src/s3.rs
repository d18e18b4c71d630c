//! The object store over S3 and S3-compatible servers (aws-sdk-s3).
//!
//! `s3://bucket/prefix` locations. Configuration is the SDK's standard one: credentials from
//! its provider chain (environment, profile files, web identity, instance metadata), the
//! region from `AWS_REGION` (us-east-1 when unset, as local servers expect), the endpoint from
//! `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` or an explicit override. Path-style addressing
//! is used when the endpoint's host is an IP address or `localhost` (no per-bucket DNS
//! there). Requests are retried with exponential backoff on throttling, timeouts and 5xx
//! (the SDK's standard retry mode, more attempts than its default); an attempt that gets no
//! response within two minutes counts as a timeout. Errors name the
//! operation and key, never credentials or object contents.

use crate::store::{check_key, ObjectStore, StoreError};
use async_trait::async_trait;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

/// Objects at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Size of each uploaded part (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 << 20;
/// Attempts per request (first try included).
const MAX_ATTEMPTS: u32 = 6;
/// The SDK sets no limit on the wait for a response: a server that accepts a request and
/// never answers would hold a worker (and its jobs) forever. An attempt whose first response
/// byte has not come after this long fails and is retried like a timeout. Generous enough for
/// a 16 MiB part over a slow link (about 140 KB/s).
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A parsed `s3://bucket/prefix` location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://bucket[/prefix]`; None for anything else.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        valid_bucket.then(|| Self { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() })
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }
}

/// Whether an endpoint URL's host is an IP address or localhost (then path-style).
pub fn needs_path_style(endpoint: &str) -> bool {
    let host = endpoint.split("://").nth(1).unwrap_or(endpoint);
    let host = host.split(['/', '?']).next().unwrap_or("");
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
    };
    host == "localhost" || host.ends_with(".localhost") || host.parse::<std::net::IpAddr>().is_ok()
}

/// An S3 client from the SDK's standard configuration (credentials, region, endpoint
/// variables), `endpoint` overriding the endpoint; path-style for IP/localhost endpoints.
pub async fn client(endpoint: Option<&str>) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .build(),
        );
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    let sdk = loader.load().await;
    let mut conf = aws_sdk_s3::config::Builder::from(&sdk);
    if sdk.region().is_none() {
        conf = conf.region(aws_sdk_s3::config::Region::new("us-east-1"));
    }
    let endpoint = endpoint
        .map(str::to_string)
        .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
    if endpoint.as_deref().is_some_and(needs_path_style) {
        conf = conf.force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(conf.interceptor(Metered).build())
}

/// Records each S3 request's latency (first attempt to the end, retries included) and its
/// retries in the metrics, labelled by operation.
#[derive(Debug)]
struct Metered;

/// When the request's first attempt began.
#[derive(Clone, Debug)]
struct Began(std::time::Instant);

impl aws_smithy_types::config_bag::Storable for Began {
    type Storer = aws_smithy_types::config_bag::StoreReplace<Self>;
}

/// The operation of a request, as a closed label value.
fn operation(cfg: &aws_smithy_types::config_bag::ConfigBag) -> &'static str {
    use aws_smithy_runtime_api::client::orchestrator::Metadata;
    match cfg.load::<Metadata>().map(|m| m.name()) {
        Some("PutObject") => "put",
        Some("GetObject") => "get",
        Some("HeadObject") => "head",
        Some("ListObjectsV2") => "list",
        Some("DeleteObject") => "delete",
        Some("CreateMultipartUpload" | "UploadPart" | "CompleteMultipartUpload" | "AbortMultipartUpload") => {
            "multipart"
        }
        _ => "other",
    }
}

impl aws_smithy_runtime_api::client::interceptors::Intercept for Metered {
    fn name(&self) -> &'static str {
        "medbatch-metrics"
    }

    fn read_before_execution(
        &self,
        _: &aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        cfg.interceptor_state().store_put(Began(std::time::Instant::now()));
        Ok(())
    }

    fn read_before_attempt(
        &self,
        _: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        use aws_smithy_runtime_api::client::retries::RequestAttempts;
        if cfg.load::<RequestAttempts>().is_some_and(|a| a.attempts() > 1) {
            metrics::counter!("medbatch_s3_retries_total", "op" => operation(cfg)).increment(1);
        }
        Ok(())
    }

    fn read_after_execution(
        &self,
        _: &aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef<'_>,
        _: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Some(Began(t)) = cfg.load::<Began>() {
            metrics::histogram!("medbatch_s3_request_seconds", "op" => operation(cfg))
                .record(t.elapsed().as_secs_f64());
        }
        Ok(())
    }
}

/// A short reason from an SDK error, without credentials or request details.
pub(crate) fn sdk_message<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    e: &SdkError<E, R>,
) -> String {
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!("{} ({})", err.message().unwrap_or("service error"), err.code().unwrap_or("no code"))
        }
        SdkError::TimeoutError(_) => "timed out".into(),
        SdkError::DispatchFailure(d) => format!("could not reach the endpoint ({d:?})").chars().take(300).collect(),
        other => format!("{other}"),
    }
}

/// A store under an S3 location.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    loc: S3Location,
}

impl S3Store {
    /// A store at `uri` (`s3://bucket/prefix`); `endpoint` overrides the SDK's endpoint
    /// variables.
    pub async fn connect(uri: &str, endpoint: Option<&str>) -> Result<Self, StoreError> {
        let loc = S3Location::parse(uri)
            .ok_or_else(|| StoreError::InvalidKey(format!("{uri} (expected s3://bucket/prefix)")))?;
        Ok(Self { client: client(endpoint).await, loc })
    }

    pub fn location_parts(&self) -> &S3Location {
        &self.loc
    }

    fn err<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, R>,
    ) -> StoreError {
        let message = sdk_message(&e);
        StoreError::Remote { op, key: format!("s3://{}/{}", self.loc.bucket, self.loc.key(key)), message }
    }

    async fn put_multipart(&self, key: &str, full: &str, bytes: Bytes) -> Result<(), StoreError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.loc.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.err("start upload", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let mut parts = Vec::new();
        for (i, chunk) in bytes.chunks(PART_SIZE).enumerate() {
            let n = i as i32 + 1;
            let sent = self
                .client
                .upload_part()
                .bucket(&self.loc.bucket)
                .key(full)
                .upload_id(&upload_id)
                .part_number(n)
                .body(ByteStream::from(bytes.slice_ref(chunk)))
                .send()
                .await;
            match sent {
                Ok(p) => {
                    parts.push(CompletedPart::builder().part_number(n).set_e_tag(p.e_tag().map(str::to_string)).build())
                }
                Err(e) => {
                    let _ = self
                        .client
                        .abort_multipart_upload()
                        .bucket(&self.loc.bucket)
                        .key(full)
                        .upload_id(&upload_id)
                        .send()
                        .await;
                    return Err(self.err("upload part", key, e));
                }
            }
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.loc.bucket)
            .key(full)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| self.err("complete upload", key, e))?;
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn location(&self) -> String {
        if self.loc.prefix.is_empty() {
            format!("s3://{}", self.loc.bucket)
        } else {
            format!("s3://{}/{}", self.loc.bucket, self.loc.prefix)
        }
    }

    /// One PUT is atomic on S3 (readers see the old or the new object); large objects go
    /// up in parts and appear when the upload completes.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        check_key(key)?;
        let full = self.loc.key(key);
        if bytes.len() >= MULTIPART_THRESHOLD {
            return self.put_multipart(key, &full, bytes).await;
        }
        self.client
            .put_object()
            .bucket(&self.loc.bucket)
            .key(&full)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| self.err("put", key, e))?;
        Ok(())
    }

    /// A conditional write (`If-None-Match: *`): exactly one of concurrent writers wins.
    async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        check_key(key)?;
        let sent = self
            .client
            .put_object()
            .bucket(&self.loc.bucket)
            .key(self.loc.key(key))
            .if_none_match("*")
            .body(ByteStream::from(bytes))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(s)) if matches!(s.raw().status().as_u16(), 412 | 409) => Ok(false),
            Err(e) => Err(self.err("put if absent", key, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        let got = self.client.get_object().bucket(&self.loc.bucket).key(self.loc.key(key)).send().await;
        match got {
            Ok(o) => {
                let body = o.body.collect().await.map_err(|e| StoreError::Remote {
                    op: "read",
                    key: key.to_string(),
                    message: e.to_string(),
                })?;
                Ok(Some(body.into_bytes()))
            }
            Err(SdkError::ServiceError(s)) if s.err().is_no_such_key() => Ok(None),
            Err(e) => Err(self.err("get", key, e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        match self.client.head_object().bucket(&self.loc.bucket).key(self.loc.key(key)).send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(s)) if s.err().is_not_found() => Ok(false),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let full = self.loc.key(prefix);
        let strip = if self.loc.prefix.is_empty() { 0 } else { self.loc.prefix.len() + 1 };
        let mut pages = self.client.list_objects_v2().bucket(&self.loc.bucket).prefix(&full).into_paginator().send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.err("list", prefix, e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key()).map(|k| k[strip.min(k.len())..].to_string()));
        }
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.loc.bucket)
            .key(self.loc.key(key))
            .send()
            .await
            .map_err(|e| self.err("delete", key, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            S3Location::parse("s3://my-bucket/runs/2026/"),
            Some(S3Location { bucket: "my-bucket".into(), prefix: "runs/2026".into() })
        );
        assert_eq!(
            S3Location::parse("s3://my-bucket"),
            Some(S3Location { bucket: "my-bucket".into(), prefix: "".into() })
        );
        assert_eq!(S3Location::parse("s3://My_Bucket/x"), None);
        assert_eq!(S3Location::parse("/local/path"), None);
        let l = S3Location::parse("s3://b-1/p").unwrap();
        assert_eq!(l.key("_runs/r/plan.json"), "p/_runs/r/plan.json");
    }

    #[test]
    fn path_style_for_ip_and_localhost_endpoints() {
        assert!(needs_path_style("http://127.0.0.1:9000"));
        assert!(needs_path_style("http://localhost:9000/"));
        assert!(needs_path_style("http://[::1]:9000"));
        assert!(needs_path_style("https://10.0.0.5"));
        assert!(!needs_path_style("https://s3.eu-west-1.amazonaws.com"));
        assert!(!needs_path_style("https://minio.internal:9000"));
    }
}
