//! Reading inputs from S3: listing what an `s3://bucket/prefix` argument names, and a
//! blocking `Read + Seek` over one object that streams it with ranged GETs.
//!
//! Decoders (text, JSONL, CSV, tar, tar.gz, zip) run on blocking threads and read through
//! `Read + Seek`. The SDK offers only async requests, so the reader drives them with the
//! runtime's handle from those threads. Sequential reads come from one open-ended ranged GET
//! (`Range: bytes=POS-`) consumed as it arrives, so an archive is streamed, never downloaded
//! whole; a seek backwards or far ahead (a zip's central directory, a member further on)
//! starts a new ranged GET there, and a short skip forward (a tar member's data) reads through
//! the stream already open. Every GET carries `If-Match` with the ETag seen at planning, so an
//! object replaced since then is an error, not a silent mix of two versions.

use crate::s3::{sdk_message, S3Location};
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use bytes::{Buf, Bytes};
use std::io::{self, Read, Seek, SeekFrom};
use tokio::runtime::Handle;

/// A forward seek up to this far reads through the open stream instead of a new request.
pub const SKIP_THROUGH_BYTES: u64 = 1 << 20;
/// Times a broken stream is reopened at the position reached before the read fails.
const REOPEN_ATTEMPTS: u32 = 3;

/// An object found under an input location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
}

impl ObjectInfo {
    pub fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// What `s3://bucket/prefix` names: the object at `prefix` when there is one, otherwise every
/// object below `prefix/` (the whole bucket for an empty prefix), like a folder: keys ending
/// in `/` (folder placeholders) and keys with a hidden segment (`.name`) are skipped. Sorted
/// by key.
pub async fn list_objects(client: &aws_sdk_s3::Client, loc: &S3Location) -> Result<Vec<ObjectInfo>, String> {
    let uri = |key: &str| format!("s3://{}/{key}", loc.bucket);
    if !loc.prefix.is_empty() {
        match client.head_object().bucket(&loc.bucket).key(&loc.prefix).send().await {
            Ok(h) => {
                return Ok(vec![ObjectInfo {
                    bucket: loc.bucket.clone(),
                    key: loc.prefix.clone(),
                    size: h.content_length().unwrap_or(0).max(0) as u64,
                    etag: h.e_tag().map(str::to_string),
                }])
            }
            Err(SdkError::ServiceError(s)) if s.err().is_not_found() => {}
            // Some servers answer a HEAD on a "folder" with an error other than 404: fall
            // through to listing, which says whether anything is there.
            Err(SdkError::ServiceError(_)) => {}
            Err(e) => return Err(format!("{}: {}", uri(&loc.prefix), sdk_message(&e))),
        }
    }
    let folder = if loc.prefix.is_empty() { String::new() } else { format!("{}/", loc.prefix) };
    let mut pages = client.list_objects_v2().bucket(&loc.bucket).prefix(&folder).into_paginator().send();
    let mut found = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| format!("listing {}: {}", uri(&folder), sdk_message(&e)))?;
        for o in page.contents() {
            let Some(key) = o.key() else { continue };
            let rel = &key[folder.len().min(key.len())..];
            if key.ends_with('/') || rel.split('/').any(|s| s.starts_with('.')) {
                continue;
            }
            found.push(ObjectInfo {
                bucket: loc.bucket.clone(),
                key: key.to_string(),
                size: o.size().unwrap_or(0).max(0) as u64,
                etag: o.e_tag().map(str::to_string),
            });
        }
    }
    // Some S3-compatible servers leave the ETag out of listings: ask for it object by object.
    for o in found.iter_mut().filter(|o| o.etag.is_none()) {
        let h = client
            .head_object()
            .bucket(&o.bucket)
            .key(&o.key)
            .send()
            .await
            .map_err(|e| format!("{}: {}", uri(&o.key), sdk_message(&e)))?;
        o.etag = h.e_tag().map(str::to_string);
    }
    found.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(found)
}

/// A ranged GET of `object` (`If-Match` its ETag when it has one). An object replaced since
/// planning is an error saying so; errors name the object.
fn ranged_get(
    client: &aws_sdk_s3::Client,
    handle: &Handle,
    object: &ObjectInfo,
    range: String,
) -> io::Result<aws_sdk_s3::operation::get_object::GetObjectOutput> {
    let error = |kind, reason: String| io::Error::new(kind, format!("{}: {reason}", object.uri()));
    let req =
        client.get_object().bucket(&object.bucket).key(&object.key).range(range).set_if_match(object.etag.clone());
    let changed = || {
        error(
            io::ErrorKind::InvalidData,
            "the object changed since the run was planned (ETag differs); plan a new run".into(),
        )
    };
    match handle.block_on(req.send()) {
        // The ETag is checked here too: not every S3-compatible server honours If-Match.
        Ok(o) if object.etag.as_deref().is_some_and(|want| o.e_tag().is_some_and(|got| got != want)) => Err(changed()),
        Ok(o) => Ok(o),
        Err(SdkError::ServiceError(s)) if s.raw().status().as_u16() == 412 => Err(changed()),
        Err(e) => Err(error(io::ErrorKind::Other, sdk_message(&e))),
    }
}

/// The open stream: bytes not yet consumed, starting at offset `at`.
struct Body {
    stream: ByteStream,
    buf: Bytes,
    at: u64,
}

/// A blocking `Read + Seek` over one S3 object. Use it from blocking threads (not from async
/// tasks: it waits on the runtime).
pub struct S3Reader {
    client: aws_sdk_s3::Client,
    handle: Handle,
    object: ObjectInfo,
    pos: u64,
    body: Option<Body>,
    /// Ranged GETs sent, for tests and statistics.
    requests: u64,
}

impl S3Reader {
    pub fn new(client: aws_sdk_s3::Client, handle: Handle, object: ObjectInfo) -> Self {
        Self { client, handle, object, pos: 0, body: None, requests: 0 }
    }

    /// Ranged GETs sent so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    fn error(&self, kind: io::ErrorKind, reason: String) -> io::Error {
        io::Error::new(kind, format!("{}: {reason}", self.object.uri()))
    }

    fn open_at(&mut self, pos: u64) -> io::Result<Body> {
        self.requests += 1;
        let o = ranged_get(&self.client, &self.handle, &self.object, format!("bytes={pos}-"))?;
        Ok(Body { stream: o.body, buf: Bytes::new(), at: pos })
    }
}

impl Read for S3Reader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() || self.pos >= self.object.size {
            return Ok(0);
        }
        let mut failures = 0u32;
        loop {
            // Keep the open stream only if the position is at or a short way past it.
            if let Some(b) = &self.body {
                if b.at > self.pos || self.pos - b.at > SKIP_THROUGH_BYTES {
                    self.body = None;
                }
            }
            if self.body.is_none() {
                self.body = Some(self.open_at(self.pos)?);
            }
            let b = self.body.as_mut().expect("opened above");
            if b.buf.is_empty() {
                match self.handle.block_on(b.stream.next()) {
                    Some(Ok(bytes)) => b.buf = bytes,
                    ended => {
                        // The stream ended before the object's end, or broke: reopen where
                        // the reader is, a few times.
                        self.body = None;
                        failures += 1;
                        if failures > REOPEN_ATTEMPTS {
                            let reason = match ended {
                                Some(Err(e)) => format!("reading failed at byte {}: {e}", self.pos),
                                _ => format!("the stream ended at byte {} of {}", self.pos, self.object.size),
                            };
                            return Err(self.error(io::ErrorKind::UnexpectedEof, reason));
                        }
                    }
                }
                continue;
            }
            if b.at < self.pos {
                let skip = (self.pos - b.at).min(b.buf.len() as u64) as usize;
                b.buf.advance(skip);
                b.at += skip as u64;
                continue;
            }
            let n = out.len().min(b.buf.len());
            out[..n].copy_from_slice(&b.buf[..n]);
            b.buf.advance(n);
            b.at += n as u64;
            self.pos += n as u64;
            return Ok(n);
        }
    }
}

impl Seek for S3Reader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.object.size.checked_add_signed(d),
        };
        let target =
            target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the object"))?;
        self.pos = target;
        Ok(target)
    }
}

/// Random access to one S3 object for whole-slide images: each read is one bounded ranged
/// GET (`Range: bytes=A-B`, `If-Match` the ETag seen at planning), so a worker fetches the
/// slide's header and the tiles it reads and nothing else (wrap it in
/// `medbatch_formats::wsi::Metered` to count reads and bytes). Use it from blocking threads
/// (it waits on the runtime).
pub struct S3RangeSource {
    client: aws_sdk_s3::Client,
    handle: Handle,
    object: ObjectInfo,
}

impl S3RangeSource {
    pub fn new(client: aws_sdk_s3::Client, handle: Handle, object: ObjectInfo) -> Self {
        Self { client, handle, object }
    }

    pub fn object(&self) -> &ObjectInfo {
        &self.object
    }

    fn error(&self, kind: io::ErrorKind, reason: String) -> io::Error {
        io::Error::new(kind, format!("{}: {reason}", self.object.uri()))
    }

    fn get(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let last = offset + len as u64 - 1;
        let out = ranged_get(&self.client, &self.handle, &self.object, format!("bytes={offset}-{last}"))?;
        let body = self
            .handle
            .block_on(out.body.collect())
            .map_err(|e| self.error(io::ErrorKind::UnexpectedEof, format!("reading bytes {offset}..: {e}")))?
            .into_bytes();
        Ok(body)
    }
}

impl medbatch_formats::wsi::RangeRead for S3RangeSource {
    fn size(&self) -> u64 {
        self.object.size
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        medbatch_formats::wsi::source::check_range(offset, len, self.object.size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        // The SDK retries failed requests; a body cut short is asked for again a few times.
        let mut last = None;
        for _ in 0..=REOPEN_ATTEMPTS {
            match self.get(offset, len) {
                Ok(b) if b.len() == len => return Ok(b.to_vec()),
                Ok(b) => {
                    last = Some(self.error(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} of {len} bytes came back for bytes {offset}..", b.len()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }
}
