//! Input files: listing what a user named, and opening it for reading.
//!
//! Inputs are local paths or `file://` URIs today; object-store URIs come with the S3
//! connector. Reading is blocking (`Read + Seek`): decoders run on blocking threads.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("unsupported input URI {0:?}: give a local path or file:// URI")]
    Scheme(String),
}

/// A file found under an input argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundInput {
    /// `file:///absolute/path`.
    pub uri: String,
    pub path: PathBuf,
    pub size: u64,
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

/// Expands an input argument into files: a file is itself; a folder is every regular file
/// below it (hidden files and folders skipped), sorted by path. Symbolic links given
/// directly are followed; links found inside folders are skipped so a folder cannot pull in
/// files from elsewhere.
pub fn expand(arg: &str) -> Result<Vec<FoundInput>, InputsError> {
    let path = local_path(arg)?;
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| InputsError::Io { path: p, source }
    };
    let path = std::fs::canonicalize(&path).map_err(io(&path))?;
    let meta = std::fs::metadata(&path).map_err(io(&path))?;
    if meta.is_file() {
        return Ok(vec![FoundInput { uri: file_uri(&path), size: meta.len(), path }]);
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
                out.push(FoundInput { uri: file_uri(&p), path: p, size });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Opens an input for reading.
pub fn open(uri: &str) -> Result<std::fs::File, InputsError> {
    let p = local_path(uri)?;
    std::fs::File::open(&p).map_err(|source| InputsError::Io { path: p.display().to_string(), source })
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
        let found = expand(d.path().to_str().unwrap()).unwrap();
        let names: Vec<_> = found.iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["b.txt", "a.txt"]);
        assert!(found[0].uri.starts_with("file:///"));
        assert!(expand("/nonexistent/medbatch").is_err());
        assert!(matches!(local_path("s3://b/k"), Err(InputsError::Scheme(_))));
    }
}
