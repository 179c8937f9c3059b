//! The coordinator's state: jobs, their tasks and the leases on them. Every method is one
//! atomic transition, so two coordinators sharing a backend can never grant one task
//! twice. The in-memory backend serves `loupe render`; the cluster adds Redis.

use async_trait::async_trait;
use loupe_core::spec::JobSpec;
pub use loupe_core::job::{JobState, JobStatus};
use loupe_core::task::{Failure, Lease, LeaseState, TaskSpec};

mod memory;
pub use memory::MemoryStateStore;
mod redis;
pub use redis::RedisStateStore;

#[cfg(test)]
pub(crate) mod conformance;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no job {0:?}")]
    NoSuchJob(String),
    #[error("state store: {0}")]
    Backend(String),
}

pub type StateResult<T> = std::result::Result<T, StateError>;

/// Lease rules, passed into each transition so all backends apply the same ones.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    pub ttl_ms: u64,
    /// Attempts a task may use, counting expired leases and retryable failures.
    pub max_attempts: u32,
}

/// What `complete` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub lease: LeaseState,
    /// True when this completion finished the job's last task: the job is now `Indexing`.
    pub job_done: bool,
}

#[async_trait]
pub trait StateStore: Send + Sync {
    /// Records a new job and its tasks (which may be none, when the atlas already holds
    /// everything). Returns the job id.
    async fn create_job(&self, spec: JobSpec, tasks: Vec<TaskSpec>, images_skipped: u64, now_ms: u64) -> StateResult<String>;
    /// Grants the next runnable task: a pending one, or one whose lease expired. A task
    /// that has used all its attempts fails its job instead.
    async fn lease(&self, worker: &str, now_ms: u64, policy: LeasePolicy) -> StateResult<Option<Lease>>;
    async fn renew(&self, lease_id: &str, now_ms: u64, policy: LeasePolicy) -> StateResult<LeaseState>;
    async fn complete(&self, lease_id: &str, now_ms: u64) -> StateResult<Completion>;
    /// A retryable failure goes back to pending while attempts remain; any other fails the job.
    async fn fail(&self, lease_id: &str, failure: Failure, now_ms: u64, policy: LeasePolicy) -> StateResult<LeaseState>;
    /// Ends an `Indexing` job as `Succeeded` or `Failed`.
    async fn finish(&self, job_id: &str, outcome: JobState) -> StateResult<()>;
    /// Cancels a running job; returns false if it had already ended.
    async fn cancel(&self, job_id: &str) -> StateResult<bool>;
    async fn job(&self, job_id: &str) -> StateResult<JobStatus>;
    async fn jobs(&self) -> StateResult<Vec<JobStatus>>;
}
