//! The coordinator's state: jobs, their tasks and the leases on them. Every method is one
//! atomic transition, so two coordinators sharing a backend can never grant one task
//! twice. The in-memory backend serves `loupe render`; the cluster adds Redis.
//!
//! A task may wait on other tasks of its job (a dataset reduce waits on every map): it is
//! not runnable, and no lease grants it, until all of them are done. The completion of
//! its last prerequisite makes it runnable in the same transition. The dependencies are
//! state like any other, so a restarted coordinator keeps them.

use async_trait::async_trait;
use loupe_core::spec::JobSpec;
pub use loupe_core::job::{JobId, JobState, JobStatus};
use loupe_core::task::{Failure, JobContext, Lease, LeaseId, LeaseState, ShardSource, TaskSpec, Work};

mod memory;
pub use memory::{Clock, MemoryStateStore};
mod redis;
pub use redis::{redacted_url, RedisStateStore};

#[cfg(test)]
pub(crate) mod conformance;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no job {0:?}")]
    NoSuchJob(String),
    #[error("state store: {0}")]
    Backend(String),
    /// The tasks given to `create_job` do not form a valid job (a prerequisite that is
    /// not an earlier task of the job).
    #[error("invalid tasks: {0}")]
    InvalidTasks(String),
}

pub type StateResult<T> = std::result::Result<T, StateError>;

/// Lease rules, passed into each transition so all backends apply the same ones.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    pub ttl_ms: u64,
    /// Attempts a task may use, counting expired leases and retryable failures.
    pub max_attempts: u32,
    /// The longest a task may hold its lease, by its size.
    pub task_time: TaskTime,
}

/// How long a task may run from its grant, by its size: generous allowances, so that
/// only a task that hangs (a device that stopped answering while the worker still
/// renews) reaches it. The store renews no lease past it, and the worker stops the task.
#[derive(Debug, Clone, Copy)]
pub struct TaskTime {
    /// Never less than this, whatever the size (fetching a model, starting a device).
    pub floor_ms: u64,
    /// A render's allowance per image, optimisation step and pixel (ns).
    pub render_ns_per_pixel_step: u64,
    /// A map's allowance per image of its shard (ms); a tar shard counts as
    /// [`TaskTime::TAR_SHARD_IMAGES`], since its images are counted only when it is read.
    pub map_ms_per_image: u64,
    /// A reduce's (one layer's merge, crops and statistics table).
    pub reduce_ms: u64,
}

impl TaskTime {
    pub const DEFAULT: TaskTime = TaskTime { floor_ms: 600_000, render_ns_per_pixel_step: 20_000, map_ms_per_image: 2_000, reduce_ms: 3_600_000 };
    pub const TAR_SHARD_IMAGES: u64 = 10_000;

    /// The longest `task` of the job `job` may run (ms).
    pub fn max_ms(&self, task: &TaskSpec, job: &JobContext) -> u64 {
        let sized = match &task.work {
            Work::Render { layer, targets, .. } => {
                let s = job.settings_for(layer);
                let pixel_steps = (targets.len() as u64).saturating_mul(u64::from(s.steps)).saturating_mul(u64::from(s.size).pow(2));
                pixel_steps.saturating_mul(self.render_ns_per_pixel_step) / 1_000_000
            }
            Work::Map { source: ShardSource::Images { keys }, .. } => (keys.len() as u64).saturating_mul(self.map_ms_per_image),
            Work::Map { source: ShardSource::Tar { .. }, .. } => Self::TAR_SHARD_IMAGES.saturating_mul(self.map_ms_per_image),
            Work::Reduce { .. } => self.reduce_ms,
        };
        sized.max(self.floor_ms)
    }
}

/// A task as a job is created with: its work, and the tasks it waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub work: Work,
    /// Positions (in the list given to `create_job`) of earlier tasks of the same job that
    /// must all be done before this one is runnable. Empty: runnable at once.
    pub after: Vec<u32>,
}

impl NewTask {
    /// A task that waits on nothing.
    pub fn runnable(work: Work) -> NewTask {
        NewTask { work, after: Vec::new() }
    }
}

/// The dependency graph of a job's tasks, checked: per task, how many prerequisites it
/// waits on, and which tasks wait on it (sorted). Prerequisites must come earlier in the
/// list, which rules out cycles, so a job always has a runnable task until it is done.
pub(crate) struct Dependencies {
    pub waits: Vec<u32>,
    pub dependents: Vec<Vec<u32>>,
}

impl Dependencies {
    pub fn of(tasks: &[NewTask]) -> StateResult<Dependencies> {
        let mut waits = vec![0u32; tasks.len()];
        let mut dependents = vec![Vec::new(); tasks.len()];
        for (i, task) in tasks.iter().enumerate() {
            let mut after = task.after.clone();
            after.sort_unstable();
            after.dedup();
            if let Some(&bad) = after.iter().find(|&&p| p as usize >= i) {
                return Err(StateError::InvalidTasks(format!("task {i} waits on task {bad}, which does not come before it")));
            }
            waits[i] = after.len() as u32;
            for p in after {
                dependents[p as usize].push(i as u32);
            }
        }
        Ok(Dependencies { waits, dependents })
    }
}

/// How many of the tasks are dataset maps and reduces.
pub(crate) fn count_dataset_tasks(tasks: &[NewTask]) -> (u32, u32) {
    let maps = tasks.iter().filter(|t| matches!(t.work, Work::Map { .. })).count() as u32;
    let reduces = tasks.iter().filter(|t| matches!(t.work, Work::Reduce { .. })).count() as u32;
    (maps, reduces)
}

/// A job's place in the listing, newest first: its submission number (counted by the
/// store, apart from its id). A page resumes after a cursor, so jobs submitted or expired
/// meanwhile neither repeat nor skip one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobCursor(pub u64);

/// One page of [`StateStore::jobs_page`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobsPage {
    /// Newest first, each with the cursor that resumes the listing after it.
    pub jobs: Vec<(JobCursor, JobStatus)>,
    /// Where the next page starts, when older jobs remain.
    pub next: Option<JobCursor>,
}

/// What `complete` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub lease: LeaseState,
    /// True when this completion finished the job's last task: the job is now `Indexing`.
    pub job_done: bool,
}

/// Counts for monitoring. The totals are kept by the store, not by a coordinator process,
/// so every coordinator of a cluster reports the same ones and a restart keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Runnable tasks of running jobs, waiting for a worker.
    pub queued: u64,
    /// Tasks under a lease (an expired one counts until it is reclaimed).
    pub leased: u64,
    /// Leases that ran out without being renewed.
    pub lease_expiries: u64,
    /// Tasks put back in line after an expired lease or a retryable failure.
    pub retries: u64,
    /// Failures that workers reported, retryable or not.
    pub failures: u64,
    /// Images (unit x technique) of completed render tasks.
    pub images_rendered: u64,
}

#[async_trait]
pub trait StateStore: Send + Sync {
    /// Records a new job and its tasks (which may be none, when the atlas already holds
    /// everything), numbered in the order given. Tasks that wait on nothing are runnable
    /// at once; the others when their last prerequisite completes. Returns the job id, a
    /// new [`JobId::generate`] one: never one that an earlier store or coordinator gave.
    async fn create_job(&self, spec: JobSpec, tasks: Vec<NewTask>, images_skipped: u64, now_ms: u64) -> StateResult<JobId>;
    /// Grants the next runnable task: a pending one, or one whose lease expired. A task
    /// that has used all its attempts fails its job instead. A task still waiting on a
    /// prerequisite is never granted.
    /// Lease deadlines follow the store's one clock (Redis's `TIME`, the memory store's
    /// process clock), never a coordinator's, so coordinators with skewed clocks never
    /// reclaim each other's live leases.
    async fn lease(&self, worker: &str, policy: LeasePolicy) -> StateResult<Option<Lease>>;
    /// Extends a held lease by the time to live, but never past its task's maximum time:
    /// a lease past it expires instead (and is answered `Lost`).
    async fn renew(&self, lease_id: &LeaseId, policy: LeasePolicy) -> StateResult<LeaseState>;
    /// Records the task done, and makes runnable the tasks for which it was the last
    /// prerequisite still to be done.
    async fn complete(&self, lease_id: &LeaseId) -> StateResult<Completion>;
    /// A retryable failure goes back to pending while attempts remain; any other fails the job.
    async fn fail(&self, lease_id: &LeaseId, failure: Failure, policy: LeasePolicy) -> StateResult<LeaseState>;
    /// Ends an `Indexing` job as `Succeeded` or `Failed`, with the number of its images
    /// that the atlas records as failed.
    async fn finish(&self, job_id: &JobId, outcome: JobState, images_failed: u64, now_ms: u64) -> StateResult<()>;
    /// The jobs in the `Indexing` state: every task done, the atlas index not yet written.
    /// Reads only those jobs, so coordinators can ask often.
    async fn indexing_jobs(&self) -> StateResult<Vec<JobId>>;
    /// Cancels a running job; returns false if it had already ended.
    async fn cancel(&self, job_id: &JobId, now_ms: u64) -> StateResult<bool>;
    async fn job(&self, job_id: &JobId) -> StateResult<JobStatus>;
    /// At most `limit` jobs, newest first, submitted before `before` (every job when
    /// `None`); a job that expires meanwhile is left out. Reads only the jobs it returns.
    async fn jobs_page(&self, before: Option<JobCursor>, limit: usize) -> StateResult<JobsPage>;
    /// Removes the jobs that ended (succeeded, failed or cancelled) at least `retention_ms`
    /// before `now_ms`; returns how many. A job that has not ended never expires.
    async fn expire_jobs(&self, now_ms: u64, retention_ms: u64) -> StateResult<u64>;
    /// Every job, newest first. Its cost is bounded by [`StateStore::expire_jobs`]: the jobs
    /// still running, and those that ended within the retention.
    async fn jobs(&self) -> StateResult<Vec<JobStatus>> {
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = self.jobs_page(before, 1_000).await?;
            all.extend(page.jobs.into_iter().map(|(_, job)| job));
            match page.next {
                Some(next) => before = Some(next),
                None => return Ok(all),
            }
        }
    }
    /// Succeeds when the backend answers: the coordinator's readiness.
    async fn ping(&self) -> StateResult<()>;
    async fn counters(&self) -> StateResult<StoreCounters>;
}
