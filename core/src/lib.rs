//! What every part of loupe shares.
//!
//! - [`spec`]: a job as a user states it (model, layers, units, techniques, settings).
//! - [`task`]: the unit of work a coordinator leases to a worker, and the lease itself.
//! - [`atlas`]: the public on-disk/S3 layout (keys, manifests, per-unit records).
//! - [`store`]: the [`store::ArtifactStore`] trait and its local-directory backend.
//! - [`seed`]: how per-unit seeds derive from the job seed, so any worker gives the same image.
//! - [`api`]: the [`api::WorkerApi`] trait, the coordinator as a worker sees it.

pub mod api;
pub mod atlas;
pub mod error;
pub mod seed;
pub mod spec;
pub mod store;
pub mod task;

pub use error::{Error, Result};

/// The loupe version written into every atlas.
pub const LOUPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The lowercase hex sha256 of a file, which names a model in atlases and leases.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
