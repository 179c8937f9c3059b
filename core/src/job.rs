//! A job's progress as the coordinator's state store keeps it and clients see it.

use serde::{Deserialize, Serialize};

use crate::spec::JobSpec;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Tasks are pending or leased.
    Running,
    /// Every task is done; the coordinator is writing the atlas index.
    Indexing,
    Succeeded,
    Failed { message: String },
    Cancelled,
}

impl JobState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled)
    }
}

/// A job as the state store knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub created_ms: u64,
    /// Every task of the job: renders, dataset maps and reduces.
    pub tasks_total: u32,
    pub tasks_done: u32,
    /// Dataset map tasks (one per shard), among the tasks above; 0 without a dataset.
    #[serde(default)]
    pub maps_total: u32,
    #[serde(default)]
    pub maps_done: u32,
    /// Dataset reduce tasks (one per layer), among the tasks above; 0 without a dataset.
    #[serde(default)]
    pub reduces_total: u32,
    #[serde(default)]
    pub reduces_done: u32,
    /// Images (unit x technique) the job covers, including those already in the atlas.
    pub images_total: u64,
    /// Images already complete in the atlas when the job was submitted (a resume).
    pub images_skipped: u64,
    /// Images rendered by this job's finished tasks (map and reduce tasks render none).
    pub images_done: u64,
}

