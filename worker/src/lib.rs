//! The worker: it leases tasks from a coordinator and renders them with libtorch. This is
//! the only crate that links tch.
//!
//! - [`model`]: loading a TorchScript model that follows docs/models.md, and its layers.
//! - [`param`], [`transform`], [`objective`], [`render`]: the feature-visualisation recipe.
//! - [`png`]: deterministic PNG encoding.
//! - [`examples`]: the dataset tasks: a map's statistics over one shard, a reduce's merge,
//!   crops and `stats.parquet`.
//! - [`runner`]: the worker loop: leases, lease renewal, reports, hand-back on shutdown.
//! - [`tasks`]: a leased task's work (render, map, reduce) and storing its images.
//! - [`torch`]: the torch thread, where libtorch runs with the last model loaded.
//! - [`device`]: `auto`, `cpu`, `cuda:N`, checked at start-up.
//! - [`metrics`]: the worker's Prometheus metrics and readiness.
//! - [`client`]: the coordinator over gRPC (bearer token, TLS).

pub mod client;
pub mod connections;
pub mod device;
pub mod examples;
pub mod metrics;
pub mod model;
pub mod objective;
pub mod param;
pub mod png;
pub mod render;
pub mod runner;
pub mod tasks;
pub mod torch;
pub mod transform;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file is missing, not TorchScript, or breaks the contract.
    #[error("{0}")]
    Model(String),
    #[error("unknown layer {0}")]
    UnknownLayer(String),
    #[error("{0}")]
    Device(String),
    /// A libtorch error while rendering (a kernel failure).
    #[error("libtorch: {0}")]
    Torch(String),
    /// The batch did not fit in the device's memory; a smaller one may.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error(transparent)]
    Store(#[from] loupe_core::Error),
    /// The worker's own disk failed (the model cache): another worker may do better.
    #[error("{0}")]
    LocalDisk(String),
    /// The task was stopped before it finished: cancelled, lease lost or shutdown.
    #[error("stopped before finishing")]
    Cancelled,
}

impl Error {
    /// Whether running the task again could succeed. A bad model or layer fails the
    /// same way every time.
    pub fn retryable(&self) -> bool {
        matches!(self, Error::Torch(_) | Error::OutOfMemory(_) | Error::Store(_) | Error::LocalDisk(_) | Error::Cancelled)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// libtorch's words for an allocation that failed ("CUDA out of memory", "DefaultCPUAllocator:
/// not enough memory").
pub(crate) fn is_out_of_memory(message: &str) -> bool {
    message.contains("out of memory") || message.contains("not enough memory")
}
