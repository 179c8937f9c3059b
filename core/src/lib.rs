//! What every part of loupe shares.
//!
//! - [`spec`]: a job as a user states it (model, layers, units, techniques, settings).
//! - [`units`]: a layer's chosen units as sorted, disjoint ranges.
//! - [`task`]: the unit of work a coordinator leases to a worker, and the lease itself.
//! - [`atlas`]: the public on-disk/S3 layout (keys, manifests, per-unit records).
//! - [`store`]: the [`store::ArtifactStore`] trait and its local-directory backend.
//! - [`location`]: a local path or `s3://bucket/prefix`, parsed once.
//! - [`s3`]: the S3 backend of [`store::ArtifactStore`] (any S3-compatible store).
//! - [`viewer`]: the static atlas viewer (viewer/), embedded and written into each atlas.
//! - [`seed`]: how per-unit seeds derive from the job seed, so any worker gives the same image.
//! - [`job`]: a job's id, state and progress.
//! - [`api`]: the [`api::WorkerApi`] trait, the coordinator as a worker sees it.

pub mod api;
pub mod atlas;
pub mod error;
pub mod job;
pub mod location;
pub mod seed;
pub mod s3;
pub mod spec;
pub mod store;
pub mod task;
pub mod units;
pub mod viewer;

pub use error::{Error, Result};

/// The loupe version written into every atlas.
pub const LOUPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// An atlas JSON file's bytes: pretty-printed, with a final newline.
pub fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("plain data serialises");
    bytes.push(b'\n');
    bytes
}

/// The lowercase hex sha256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// The lowercase hex sha256 of a file, which names a model in atlases and leases.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Reads a bearer token from a file (surrounding whitespace dropped). The error names the
/// file, never the token.
pub fn read_token_file(path: &std::path::Path) -> std::result::Result<String, Error> {
    let token = std::fs::read_to_string(path).map_err(|source| Error::Io { key: path.display().to_string(), source })?;
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(Error::invalid("token file", format!("{} is empty", path.display())));
    }
    Ok(token)
}
