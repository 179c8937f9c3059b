//! The coordinator as a worker sees it. The in-process coordinator implements it for
//! `loupe render`; the cluster's gRPC client implements the same trait, so the worker loop
//! is one piece of code for both.

use async_trait::async_trait;

use crate::task::{Failure, Lease, LeaseId, LeaseState};

#[async_trait]
pub trait WorkerApi: Send + Sync {
    /// A lease on the next runnable task, or `None` when nothing is runnable now.
    async fn lease(&self, worker: &str) -> ApiResult<Option<Lease>>;
    /// Extends the lease (the heartbeat).
    async fn renew(&self, lease_id: &LeaseId) -> ApiResult<LeaseState>;
    /// Reports the task done; its artifacts are already in the store.
    async fn complete(&self, lease_id: &LeaseId) -> ApiResult<LeaseState>;
    /// Reports the task failed.
    async fn fail(&self, lease_id: &LeaseId, failure: Failure) -> ApiResult<LeaseState>;
}

/// Errors of the API itself, as opposed to outcomes such as a lost lease, which are
/// [`LeaseState`] values.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The coordinator could not be reached or failed (a restart, its state store down):
    /// asking again later may work.
    #[error("{0}")]
    Unavailable(String),
    /// The coordinator refused this worker (another protocol version, a wrong token):
    /// asking again will not help.
    #[error("{0}")]
    Refused(String),
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;
