//! Where atlas artifacts go. Every backend writes each key atomically (a reader sees the
//! old bytes or the new, never a part) and overwrites rather than duplicates, so a
//! retried task's outputs replace its earlier attempt's.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::location::Location;
use crate::{Error, Result};

#[async_trait]
pub trait ArtifactStore: Send + Sync {
    /// Writes `bytes` at `key`, atomically, replacing what was there.
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()>;
    /// The bytes at `key`, or `None` if there are none.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// The length of what is at `key`, without reading it (`loupe serve`'s HEAD), or
    /// `None` if there is nothing.
    async fn size(&self, key: &str) -> Result<Option<u64>>;
    /// Every key that starts with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Removes what is at `key`; nothing there is no error, so a retried clean-up succeeds.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Where the store points, for messages.
    fn location(&self) -> String;
}

/// The media type of an atlas file, by extension: S3 stores it with the object (a static
/// website serves it as stored, and browsers refuse a stylesheet of any other type), and
/// `loupe serve` sends it.
pub fn content_type(key: &str) -> &'static str {
    match key.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("json") => "application/json",
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("txt") => "text/plain; charset=utf-8",
        Some("parquet") => "application/vnd.apache.parquet",
        _ => "application/octet-stream",
    }
}

/// Refuses keys that could leave the store's root: empty, absolute, `.`/`..` segments,
/// empty segments, backslashes or NUL bytes.
pub fn validate_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\\')
        || key.contains('\0')
        || key.split('/').any(|s| s.is_empty() || s == "." || s == "..");
    if bad {
        return Err(Error::invalid("artifact key", format!("{key:?} is not a relative path of plain segments")));
    }
    Ok(())
}

/// Opens the store an atlas URI names: `s3://bucket/prefix` (configured the standard AWS
/// way, see [`crate::s3`]), `file://PATH` or a plain directory path.
pub async fn open(uri: &str) -> Result<std::sync::Arc<dyn ArtifactStore>> {
    Ok(match Location::parse("output", uri)? {
        Location::S3 { bucket, key } => std::sync::Arc::new(crate::s3::S3Store::from_env(&bucket, &key).await?),
        Location::Local(path) => std::sync::Arc::new(LocalStore::new(path)),
    })
}

/// Reads a whole object named by URI: `s3://bucket/key` or a local file path. Models are
/// fetched this way by the coordinator (to record their digest) and the workers.
pub async fn fetch(uri: &str) -> Result<Option<Vec<u8>>> {
    match Location::parse("object", uri)? {
        Location::S3 { bucket, key } => {
            if key.is_empty() {
                return Err(Error::invalid("object", format!("{uri:?} names a bucket, not an object")));
            }
            crate::s3::S3Store::from_env(&bucket, "").await?.get(&key).await
        }
        Location::Local(path) => {
            if !is_regular_file("object", &path)? {
                return Ok(None);
            }
            tokio::fs::read(&path).await.map(Some).map_err(|source| Error::Io { key: path.display().to_string(), source })
        }
    }
}

/// The lowercase hex sha256 of the object at `location` (a local file or an S3 object),
/// or `None` if there is none. It reads in bounded chunks, so a model of any size hashes
/// in constant memory; a local path must be a regular file.
pub async fn sha256(location: &Location) -> Result<Option<String>> {
    match location {
        Location::S3 { bucket, key } => {
            if key.is_empty() {
                return Err(Error::invalid("object", format!("{location} names a bucket, not an object")));
            }
            crate::s3::S3Store::from_env(bucket, "").await?.sha256(key).await
        }
        Location::Local(path) => {
            if !is_regular_file("object", path)? {
                return Ok(None);
            }
            let path = path.clone();
            let key = path.display().to_string();
            tokio::task::spawn_blocking(move || crate::sha256_file(&path))
                .await
                .expect("hashing task panicked")
                .map(Some)
                .map_err(|source| Error::Io { key, source })
        }
    }
}

/// Whether `path` (symlinks followed) is a regular file: `false` when nothing is there, an
/// error naming `what` when it is something else. Checked before reading, since a device
/// such as /dev/zero never ends, opening a FIFO blocks, and a directory has no bytes.
pub fn is_regular_file(what: &'static str, path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(_) => Err(Error::invalid(what, format!("{} is not a regular file", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io { key: path.display().to_string(), source }),
    }
}

/// An atlas in a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
}

/// Temporary files carry this marker; `list` skips them and a crash leaves at most one of
/// them behind, never a partial file under a real key.
const TMP_MARKER: &str = ".loupe-tmp-";

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io_err(key: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { key: key.to_string(), source }
}

/// Where a write to `path` goes before its rename: a random name, since writers that
/// share a directory need not share anything else (two containers on one volume are
/// both process 1, and each process has its own counters).
fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().expect("store paths have a file name").to_string_lossy();
    path.with_file_name(format!("{name}{TMP_MARKER}{:032x}", rand::random::<u128>()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("store paths have a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = temporary_path(path);
    let result = (|| {
        let mut f = match std::fs::File::create(&tmp) {
            // A delete of the directory's last file removes the directory; make it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)?;
                std::fs::File::create(&tmp)?
            }
            created => created?,
        };
        f.write_all(bytes)?;
        // The data must be on disk before the rename makes it visible under its key.
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the file at `path` and then each directory up to `root` that this leaves
/// empty, so that a deleted key leaves no trace in a listing of the atlas directory.
fn remove_with_empty_parents(root: &Path, path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut dir = path.parent();
    while let Some(d) = dir.filter(|d| *d != root && d.starts_with(root)) {
        // Fails, and stops the walk, at the first directory something else still uses.
        if std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(root, &path, out)?;
        } else if !entry.file_name().to_string_lossy().contains(TMP_MARKER) {
            let rel = path.strip_prefix(root).expect("walk stays under root");
            out.push(rel.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/"));
        }
    }
    Ok(())
}

#[async_trait]
impl ArtifactStore for LocalStore {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        let k = key.to_string();
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .expect("write task panicked")
            .map_err(io_err(&k))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    async fn size(&self, key: &str) -> Result<Option<u64>> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // Walk only the deepest directory the prefix names, not the whole atlas.
        let dir_part = prefix.rfind('/').map(|i| &prefix[..i]).unwrap_or("");
        if !dir_part.is_empty() {
            validate_key(dir_part)?;
        }
        let root = self.root.clone();
        let start = root.join(dir_part);
        let mut keys = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, &start, &mut out).map(|_| out)
        })
        .await
        .expect("list task panicked")
        .map_err(io_err(prefix))?;
        keys.retain(|k| k.starts_with(prefix));
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || remove_with_empty_parents(&root, &path)).await.expect("delete task panicked").map_err(io_err(key))
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// The behaviour every [`ArtifactStore`] must show; each backend's tests call these.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub async fn put_get_overwrite(store: &dyn ArtifactStore) {
        store.put("a/b/c.json", b"one".to_vec()).await.unwrap();
        assert_eq!(store.get("a/b/c.json").await.unwrap().as_deref(), Some(&b"one"[..]));
        store.put("a/b/c.json", b"two".to_vec()).await.unwrap();
        assert_eq!(store.get("a/b/c.json").await.unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(store.list("a/").await.unwrap(), vec!["a/b/c.json".to_string()], "an overwrite must not duplicate");
        assert_eq!(store.get("a/b/missing").await.unwrap(), None);
        assert_eq!(store.size("a/b/c.json").await.unwrap(), Some(3));
        assert_eq!(store.size("a/b/missing").await.unwrap(), None);
    }

    pub async fn delete_removes_only_its_key(store: &dyn ArtifactStore) {
        store.put("d/e/f.json", b"one".to_vec()).await.unwrap();
        store.put("d/g.json", b"two".to_vec()).await.unwrap();
        store.delete("d/e/f.json").await.unwrap();
        assert_eq!(store.get("d/e/f.json").await.unwrap(), None);
        assert_eq!(store.list("d/").await.unwrap(), vec!["d/g.json".to_string()]);
        store.delete("d/e/f.json").await.expect("deleting what is not there succeeds");
        store.delete("d/g.json").await.unwrap();
        assert_eq!(store.list("d/").await.unwrap(), Vec::<String>::new());
        assert!(store.delete("../x").await.is_err(), "an escaping key is refused");
    }

    pub async fn list_by_prefix(store: &dyn ArtifactStore) {
        for k in ["layers/x/units/0/channel.png", "layers/x/units/10/channel.png", "layers/xy/layer.json", "atlas.json"] {
            store.put(k, vec![1, 2, 3]).await.unwrap();
        }
        assert_eq!(
            store.list("layers/x/").await.unwrap(),
            vec!["layers/x/units/0/channel.png".to_string(), "layers/x/units/10/channel.png".to_string()]
        );
        assert_eq!(store.list("layers/x").await.unwrap().len(), 3);
        assert_eq!(store.list("nothing/").await.unwrap(), Vec::<String>::new());
    }

    pub async fn refuses_escaping_keys(store: &dyn ArtifactStore) {
        for k in ["../x", "/etc/passwd", "a/../../b", "a//b", "", "a\\b"] {
            assert!(store.put(k, vec![0]).await.is_err(), "{k:?} must be refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        conformance::put_get_overwrite(&store).await;
        conformance::delete_removes_only_its_key(&store).await;
        assert!(!dir.path().join("d").exists() && dir.path().exists(), "a delete leaves no empty directory, and the root");
        conformance::list_by_prefix(&store).await;
        conformance::refuses_escaping_keys(&store).await;
    }

    #[tokio::test]
    async fn a_local_file_hashes_as_its_bytes_do_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.pt");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &bytes).unwrap();
        let at = |p: &Path| Location::Local(p.to_path_buf());
        assert_eq!(sha256(&at(&file)).await.unwrap(), Some(crate::sha256_bytes(&bytes)));
        assert_eq!(sha256(&at(&dir.path().join("missing.pt"))).await.unwrap(), None);
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        for path in [Path::new("/dev/zero"), dir.path(), &fifo] {
            let e = sha256(&at(path)).await.unwrap_err().to_string();
            assert!(e.contains(&format!("{} is not a regular file", path.display())), "{e}");
            let e = fetch(&path.to_string_lossy()).await.unwrap_err().to_string();
            assert!(e.contains("is not a regular file"), "{e}");
        }
    }

    /// Every container's first process is pid 1, so a name made of the pid and a
    /// per-process counter is the same in two containers that share a volume.
    #[test]
    fn temporary_names_do_not_repeat_across_processes() {
        let path = Path::new("/atlas/layers/x/layer.json");
        let names: std::collections::HashSet<PathBuf> = (0..1000).map(|_| temporary_path(path)).collect();
        assert_eq!(names.len(), 1000);
        let pid = format!("-{}-", std::process::id());
        for name in &names {
            let name = name.file_name().unwrap().to_string_lossy();
            assert!(name.starts_with("layer.json.loupe-tmp-") && !name.contains(&pid), "{name} carries the process id");
        }
    }

    /// Two stores on one directory (two containers sharing a volume) writing one key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_local_stores_write_one_key_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let stores = [std::sync::Arc::new(LocalStore::new(dir.path())), std::sync::Arc::new(LocalStore::new(dir.path()))];
        let values: Vec<Vec<u8>> = (0..2u8).map(|v| vec![v; 64 * 1024]).collect();
        let mut set = tokio::task::JoinSet::new();
        for (store, value) in stores.iter().zip(&values) {
            for _ in 0..4 {
                let (store, value) = (store.clone(), value.clone());
                set.spawn(async move {
                    for _ in 0..50 {
                        store.put("atlas.json", value.clone()).await.unwrap();
                    }
                });
            }
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
            let now = stores[0].get("atlas.json").await.unwrap().unwrap();
            assert!(values.contains(&now), "atlas.json holds neither value ({} bytes)", now.len());
        }
        assert_eq!(stores[1].list("").await.unwrap(), vec!["atlas.json".to_string()]);
    }

    #[tokio::test]
    async fn local_store_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store.put("x/y.png", vec![9; 1000]).await.unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path().join("x")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("y.png")]);
    }
}
