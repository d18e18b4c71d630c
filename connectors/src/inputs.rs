//! Input files: listing what a user named, and opening it for reading.
//!
//! Inputs are local paths, `file://` URIs, or `s3://bucket/key` objects and prefixes.
//! Reading is blocking (`Read + Seek`): decoders run on blocking threads; S3 objects are
//! streamed with ranged requests ([`crate::s3_input`]).

use crate::s3::S3Location;
use crate::s3_input::{list_objects, ObjectInfo, S3RangeSource, S3Reader};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tokio::runtime::Handle;

#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("unsupported input URI {0:?}: give a local path, a file:// URI or s3://bucket/key")]
    Scheme(String),
    #[error("{0}")]
    Remote(String),
}

/// What input decoders read from: bytes and seeking.
pub trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// A file found under an input argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundInput {
    /// `file:///absolute/path` or `s3://bucket/key`.
    pub uri: String,
    pub size: u64,
    /// The object's version tag on S3 (its ETag), checked again when the object is read.
    pub etag: Option<String>,
}

/// The local path a URI or path argument names.
pub fn local_path(arg: &str) -> Result<PathBuf, InputsError> {
    if let Some(rest) = arg.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if arg.contains("://") {
        return Err(InputsError::Scheme(arg.to_string()));
    }
    Ok(PathBuf::from(arg))
}

/// `file://` URI of an absolute path.
pub fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// Where inputs are read from: the local file system, and S3 when the source was made inside
/// a Tokio runtime (S3 requests run on it).
#[derive(Clone, Default)]
pub struct InputSource {
    s3: Option<S3Access>,
}

#[derive(Clone)]
struct S3Access {
    handle: Handle,
    endpoint: Option<String>,
    client: Arc<OnceLock<aws_sdk_s3::Client>>,
}

impl std::fmt::Debug for InputSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputSource").field("s3", &self.s3.is_some()).finish()
    }
}

impl InputSource {
    /// Local files only.
    pub fn local() -> Self {
        Self::default()
    }

    /// Local files and S3 objects; `endpoint` overrides the SDK's endpoint variables. Call
    /// it inside a Tokio runtime; the source then reads S3 through that runtime, from
    /// blocking threads.
    pub fn with_s3(endpoint: Option<String>) -> Self {
        let s3 = Handle::try_current().ok().map(|handle| S3Access { handle, endpoint, client: Arc::default() });
        Self { s3 }
    }

    fn s3(&self, uri: &str) -> Result<(&S3Access, aws_sdk_s3::Client), InputsError> {
        let access = self.s3.as_ref().ok_or_else(|| InputsError::Scheme(uri.to_string()))?;
        let client =
            access.client.get_or_init(|| access.handle.block_on(crate::s3::client(access.endpoint.as_deref()))).clone();
        Ok((access, client))
    }

    /// The object an `s3://bucket/key` URI names, with the access to read it.
    fn object(
        &self,
        uri: &str,
        size: u64,
        etag: Option<&str>,
    ) -> Result<(&S3Access, aws_sdk_s3::Client, ObjectInfo), InputsError> {
        let loc = S3Location::parse(uri)
            .filter(|l| !l.prefix.is_empty())
            .ok_or_else(|| InputsError::Remote(format!("{uri}: not a valid s3://bucket/key location")))?;
        let (access, client) = self.s3(uri)?;
        Ok((access, client, ObjectInfo { bucket: loc.bucket, key: loc.prefix, size, etag: etag.map(str::to_string) }))
    }

    /// Expands an input argument into files (blocking). A local file is itself; a local
    /// folder is every regular file below it (hidden files and folders skipped), sorted by
    /// path; symbolic links given directly are followed, links found inside folders are
    /// skipped so a folder cannot pull in files from elsewhere. `s3://bucket/key` is that
    /// object, `s3://bucket/prefix` every object below the prefix, sorted by key.
    pub fn expand(&self, arg: &str) -> Result<Vec<FoundInput>, InputsError> {
        if arg.starts_with("s3://") {
            let loc = S3Location::parse(arg)
                .ok_or_else(|| InputsError::Remote(format!("{arg}: not a valid s3://bucket/key location")))?;
            let (access, client) = self.s3(arg)?;
            let objects = access.handle.block_on(list_objects(&client, &loc)).map_err(InputsError::Remote)?;
            return Ok(objects.into_iter().map(|o| FoundInput { uri: o.uri(), size: o.size, etag: o.etag }).collect());
        }
        expand_local(arg)
    }

    /// Opens an input for reading (blocking). An S3 object is read with `If-Match: etag` when
    /// an ETag is given.
    pub fn open(&self, uri: &str, size: u64, etag: Option<&str>) -> Result<Box<dyn ReadSeek>, InputsError> {
        if uri.starts_with("s3://") {
            let (access, client, object) = self.object(uri, size, etag)?;
            return Ok(Box::new(S3Reader::new(client, access.handle.clone(), object)));
        }
        let p = local_path(uri)?;
        let f = std::fs::File::open(&p).map_err(|source| InputsError::Io { path: p.display().to_string(), source })?;
        Ok(Box::new(f))
    }

    /// Opens an input for random access a range at a time (whole-slide images): a local
    /// file with positioned reads, an S3 object with one bounded ranged GET a read
    /// (`If-Match: etag` when an ETag is given). Blocking, like [`InputSource::open`].
    pub fn open_range(
        &self,
        uri: &str,
        size: u64,
        etag: Option<&str>,
    ) -> Result<Box<dyn medbatch_formats::wsi::RangeRead>, InputsError> {
        if uri.starts_with("s3://") {
            let (access, client, object) = self.object(uri, size, etag)?;
            return Ok(Box::new(S3RangeSource::new(client, access.handle.clone(), object)));
        }
        let p = local_path(uri)?;
        let f = medbatch_formats::wsi::FileSource::open(&p)
            .map_err(|source| InputsError::Io { path: p.display().to_string(), source })?;
        Ok(Box::new(f))
    }
}

fn expand_local(arg: &str) -> Result<Vec<FoundInput>, InputsError> {
    let path = local_path(arg)?;
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| InputsError::Io { path: p, source }
    };
    let path = std::fs::canonicalize(&path).map_err(io(&path))?;
    let meta = std::fs::metadata(&path).map_err(io(&path))?;
    if meta.is_file() {
        return Ok(vec![FoundInput { uri: file_uri(&path), size: meta.len(), etag: None }]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = entry.file_type().map_err(io(&entry.path()))?;
            let p = entry.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let size = entry.metadata().map_err(io(&p))?.len();
                out.push((p.clone(), FoundInput { uri: file_uri(&p), size, etag: None }));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out.into_iter().map(|(_, f)| f).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_folders_sorted_and_skips_hidden() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("b.txt"), "b").unwrap();
        std::fs::write(d.path().join("sub/a.txt"), "a").unwrap();
        std::fs::write(d.path().join(".hidden"), "h").unwrap();
        let src = InputSource::local();
        let found = src.expand(d.path().to_str().unwrap()).unwrap();
        let names: Vec<_> = found.iter().map(|f| f.uri.rsplit('/').next().unwrap().to_string()).collect();
        assert_eq!(names, vec!["b.txt", "a.txt"]);
        assert!(found[0].uri.starts_with("file:///"));
        assert!(src.expand("/nonexistent/medbatch").is_err());
        // Without a runtime there is no S3 access: the URI is refused, not panicked on.
        assert!(matches!(src.expand("s3://bucket/k"), Err(InputsError::Scheme(_))));
        assert!(matches!(local_path("s3://b/k"), Err(InputsError::Scheme(_))));
        let mut f = src.open(&found[0].uri, 1, None).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "b");
    }
}
