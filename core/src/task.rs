//! Tasks, the unit of work a coordinator hands out, and leases on them.

use serde::{Deserialize, Serialize};

use crate::spec::{ModelRef, RenderSettings, Technique};

/// A task: one optimisation of a batch of units of one layer with one technique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub job_id: String,
    /// Position of the task in its job; with the job id it names the task.
    pub index: u32,
    pub layer: String,
    pub technique: Technique,
    pub units: Vec<u32>,
}

impl TaskSpec {
    pub fn id(&self) -> String {
        format!("{}/{}", self.job_id, self.index)
    }
}

/// What a worker needs to know about the task's job to render it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobContext {
    pub model: ModelRef,
    pub settings: RenderSettings,
    pub out: String,
}

/// A lease: the right to run one attempt of a task until `deadline_ms` unless renewed.
/// Renew, complete and fail name the lease id, so a stale holder is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub lease_id: String,
    pub task: TaskSpec,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    pub job: JobContext,
}

/// What a coordinator says of a lease when its holder renews or reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// Still held (renewed), or the report was accepted.
    Held,
    /// The task's job was cancelled: stop and write nothing more.
    Cancelled,
    /// The lease expired or was replaced; the holder's work is no longer wanted.
    Lost,
}

/// Why a task failed, as the worker reports it; only the coordinator decides retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// True for transient trouble (a store timeout); false for a problem a retry cannot fix
    /// (a model that is not TorchScript, an unknown layer), which fails the job at once.
    pub retryable: bool,
    pub message: String,
}

/// Where a dataset map task's images come from. Keys are relative to the job's dataset
/// URI (a local directory or an S3 prefix); an image's id in the atlas is its key, or
/// `<tar key>/<member name>` for a member of a tar shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ShardSource {
    /// A run of image files (JPEG or PNG), in key order.
    Images { keys: Vec<String> },
    /// One WebDataset `.tar` shard: every JPEG or PNG member, in archive order.
    Tar { key: String },
}
