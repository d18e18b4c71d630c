//! Object storage for outputs: Parquet parts, completion markers, manifests.

use async_trait::async_trait;
use bytes::Bytes;
use std::path::{Path, PathBuf};

/// Errors from a store. Messages name keys, never contents.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid key {0:?}")]
    InvalidKey(String),
    #[error("{op} {key}: {source}")]
    Io { op: &'static str, key: String, source: std::io::Error },
    /// A remote store's answer (after its retries).
    #[error("{op} {key}: {message}")]
    Remote { op: &'static str, key: String, message: String },
}

/// Opens an output root: a local directory (created if needed) or an S3 location
/// (`s3://bucket/prefix`, through `s3_endpoint` when given). Returns the store and how to show
/// its root.
pub async fn open(
    out: &str,
    s3_endpoint: Option<&str>,
) -> Result<(std::sync::Arc<dyn ObjectStore>, String), StoreError> {
    if out.starts_with("s3://") {
        let s = crate::s3::S3Store::connect(out, s3_endpoint).await?;
        let root = s.location();
        Ok((std::sync::Arc::new(s), root))
    } else {
        let s = LocalStore::create(Path::new(out))?;
        let root = s.root().canonicalize().unwrap_or_else(|_| s.root().to_path_buf());
        Ok((std::sync::Arc::new(s), root.display().to_string()))
    }
}

/// A flat key space of immutable-once-written objects. Keys are `/`-separated relative
/// paths without `.` or `..` segments.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Where the store points, for messages (a directory or a URI).
    fn location(&self) -> String;
    /// Writes `bytes` at `key`, replacing any previous object atomically: a reader sees the
    /// old object or the new one, never a partial one.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError>;
    /// Writes only if no object exists at `key`; returns whether it wrote.
    async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError>;
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError>;
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;
    /// Keys under `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Removes the object at `key`; removing an absent object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// Validates a key: relative, `/`-separated, no empty, `.` or `..` segments.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && !key.contains('\\')
        && key.split('/').all(|s| !s.is_empty() && s != "." && s != "..");
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidKey(key.to_string()))
    }
}

/// A store in a local directory. Writes go to a temporary file in the same directory, are
/// flushed to disk, then renamed into place.
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn create(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|source| StoreError::Io {
            op: "create directory",
            key: root.display().to_string(),
            source,
        })?;
        // Fail early, with a clear reason, when the directory is not writable.
        let probe = root.join(format!(".medbatch-write-probe-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|source| StoreError::Io {
            op: "write to",
            key: root.display().to_string(),
            source,
        })?;
        let _ = std::fs::remove_file(&probe);
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn io<'a>(op: &'static str, key: &'a str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
        move |source| StoreError::Io { op, key: key.to_string(), source }
    }

    fn write_atomic(path: &Path, bytes: &[u8], exclusive: bool) -> std::io::Result<bool> {
        use std::io::Write;
        let dir = path.parent().expect("keys have a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        if exclusive {
            // hard_link fails if the target exists, which makes the write exclusive.
            let r = std::fs::hard_link(&tmp, path);
            std::fs::remove_file(&tmp)?;
            return match r {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            };
        }
        std::fs::rename(&tmp, path)?;
        Ok(true)
    }
}

static TMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[async_trait]
impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || Self::write_atomic(&path, &bytes, false))
            .await
            .expect("write task")
            .map(|_| ())
            .map_err(Self::io("write", key))
    }

    async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || Self::write_atomic(&path, &bytes, true))
            .await
            .expect("write task")
            .map_err(Self::io("write", key))
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io("read", key)(e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        tokio::fs::try_exists(&path).await.map_err(Self::io("stat", key))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Self::io("list", &prefix)(e)),
                };
                for entry in entries {
                    let entry = entry.map_err(Self::io("list", &prefix))?;
                    let p = entry.path();
                    let rel = p.strip_prefix(&root).expect("under root").to_string_lossy().replace('\\', "/");
                    if entry.file_type().map_err(Self::io("list", &prefix))?.is_dir() {
                        // Descend only where the prefix can still match.
                        if rel.starts_with(&prefix) || prefix.starts_with(&format!("{rel}/")) {
                            stack.push(p);
                        }
                    } else if rel.starts_with(&prefix) && !entry.file_name().to_string_lossy().starts_with(".tmp-") {
                        out.push(rel);
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .expect("list task")
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io("delete", key)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_and_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::create(dir.path()).unwrap();
        s.put("a/b/c.json", Bytes::from_static(b"1")).await.unwrap();
        s.put("a/b/c.json", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(s.get("a/b/c.json").await.unwrap().unwrap(), Bytes::from_static(b"2"));
        assert!(s.put_if_absent("a/x", Bytes::from_static(b"1")).await.unwrap());
        assert!(!s.put_if_absent("a/x", Bytes::from_static(b"2")).await.unwrap());
        assert_eq!(s.get("a/x").await.unwrap().unwrap(), Bytes::from_static(b"1"));
        assert_eq!(s.list("a/b/").await.unwrap(), vec!["a/b/c.json".to_string()]);
        assert_eq!(s.list("a/").await.unwrap().len(), 2);
        assert!(s.get("nope").await.unwrap().is_none());
        assert!(!s.exists("nope").await.unwrap());
        s.delete("a/x").await.unwrap();
        s.delete("a/x").await.unwrap();
        assert!(!s.exists("a/x").await.unwrap());
    }

    #[test]
    fn keys_cannot_escape() {
        for k in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "./a"] {
            assert!(check_key(k).is_err(), "{k:?}");
        }
        assert!(check_key("lab_results/run_id=r/part-1.parquet").is_ok());
    }

    #[test]
    fn unwritable_root_is_reported() {
        let err = LocalStore::create(Path::new("/proc/medbatch-cannot-write")).unwrap_err();
        assert!(err.to_string().contains("/proc/medbatch-cannot-write"), "{err}");
    }
}
