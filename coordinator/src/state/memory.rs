//! State in process memory, for `loupe render`. A mutex makes each method one atomic
//! transition; it is a std mutex because no method awaits while holding it. Lease
//! deadlines follow the store's own clock (the process's, or one a test sets).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

use loupe_core::spec::JobSpec;
use loupe_core::task::{Failure, JobContext, Lease, LeaseId, LeaseSecret, LeaseState, TaskSpec, Work};

use super::{count_dataset_tasks, Completion, Dependencies, JobCursor, JobId, JobState, JobStatus, JobsPage, LeasePolicy, NewTask, StateError, StateResult, StateStore, StoreCounters};

/// Milliseconds by the store's clock.
pub type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

pub struct MemoryStateStore {
    inner: Mutex<Inner>,
    clock: Clock,
}

impl Default for MemoryStateStore {
    fn default() -> Self {
        Self::with_clock(Box::new(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_millis() as u64))
    }
}

impl MemoryStateStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose lease deadlines follow `clock` (tests move it by hand).
    pub fn with_clock(clock: Clock) -> Self {
        MemoryStateStore { inner: Mutex::default(), clock }
    }
}

#[derive(Default)]
struct Inner {
    /// Submission number of the last job, its place in the listing (not its id).
    last_seq: u64,
    jobs: HashMap<JobId, Job>,
    /// Job ids by submission number, for listing.
    order: BTreeMap<u64, JobId>,
    /// Runnable tasks, oldest first. A task waiting on prerequisites joins when the last
    /// of them completes.
    pending: VecDeque<(JobId, u32)>,
    /// Lease id (with its secret) -> the leased task: an id is looked up whole, so a
    /// forged one finds nothing.
    leases: HashMap<LeaseId, Held>,
    /// The monitoring totals; `queued` and `leased` are counted when asked.
    totals: StoreCounters,
}

struct Job {
    status: JobStatus,
    tasks: Vec<Task>,
    /// Its submission number.
    seq: u64,
    /// When it succeeded, failed or was cancelled.
    ended_ms: Option<u64>,
}

impl Job {
    fn end(&mut self, state: JobState, now_ms: u64) {
        self.status.state = state;
        self.ended_ms = Some(now_ms);
    }
}

struct Task {
    spec: TaskSpec,
    attempts: u32,
    /// Prerequisites not yet done.
    waiting: u32,
    /// Tasks that wait on this one.
    dependents: Vec<u32>,
    /// Leases handed back by stopping workers: they do not count as attempts.
    released: u32,
}

struct Held {
    job_id: JobId,
    index: u32,
    attempt: u32,
    deadline_ms: u64,
    /// The task's maximum time from the grant: no renewal goes past it.
    ends_ms: u64,
    worker: String,
}

impl Inner {
    /// The attempts a lease's task has used, not counting leases handed back.
    fn counted(&self, held: &Held) -> u32 {
        let released = self.jobs.get(&held.job_id).and_then(|j| j.tasks.get(held.index as usize)).map_or(0, |t| t.released);
        held.attempt.saturating_sub(released)
    }

    fn fail_job(&mut self, job_id: &JobId, message: String, now_ms: u64) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            if !job.status.state.is_terminal() {
                job.end(JobState::Failed { message }, now_ms);
            }
        }
        self.leases.retain(|_, h| h.job_id != *job_id);
    }

    /// Puts tasks whose lease ran out back in line, or fails their job when they have
    /// used every attempt.
    fn reclaim_expired(&mut self, now_ms: u64, policy: LeasePolicy) {
        let expired: Vec<LeaseId> = self.leases.iter().filter(|(_, h)| h.deadline_ms <= now_ms).map(|(id, _)| id.clone()).collect();
        for id in expired {
            // Failing a job above drops its other leases, which may be in this list too.
            let Some(held) = self.leases.remove(&id) else { continue };
            self.totals.lease_expiries += 1;
            let spec_id = format!("{}/{}", held.job_id, held.index);
            let counted = self.counted(&held);
            if counted >= policy.max_attempts {
                let msg = format!(
                    "task {spec_id} lost its lease {counted} times (last worker {}): the worker died or stalled",
                    held.worker
                );
                self.fail_job(&held.job_id, msg, now_ms);
            } else {
                self.totals.retries += 1;
                self.pending.push_front((held.job_id, held.index));
            }
        }
    }

    fn running(&self, job_id: &JobId) -> bool {
        self.jobs.get(job_id).is_some_and(|j| j.status.state == JobState::Running)
    }

    /// The state of a lease as its holder sees it.
    fn lease_state(&self, lease_id: &LeaseId) -> LeaseState {
        match self.leases.get(lease_id) {
            None => {
                match self.jobs.get(lease_id.job_id()).map(|j| &j.status.state) {
                    Some(JobState::Cancelled) => LeaseState::Cancelled,
                    _ => LeaseState::Lost,
                }
            }
            Some(_) => LeaseState::Held,
        }
    }
}

#[async_trait]
impl StateStore for MemoryStateStore {
    async fn create_job(&self, spec: JobSpec, tasks: Vec<NewTask>, images_skipped: u64, now_ms: u64) -> StateResult<JobId> {
        let deps = Dependencies::of(&tasks)?;
        let (maps_total, reduces_total) = count_dataset_tasks(&tasks);
        let mut inner = self.inner.lock().unwrap();
        let id = JobId::generate();
        let tasks: Vec<Task> = tasks
            .into_iter()
            .zip(deps.waits.into_iter().zip(deps.dependents))
            .enumerate()
            .map(|(i, (task, (waiting, dependents)))| Task {
                spec: TaskSpec { job_id: id.clone(), index: i as u32, work: task.work },
                attempts: 0,
                waiting,
                dependents,
                released: 0,
            })
            .collect();
        let state = if tasks.is_empty() { JobState::Indexing } else { JobState::Running };
        let status = JobStatus {
            id: id.clone(),
            images_total: spec.total_images(),
            spec,
            state,
            created_ms: now_ms,
            tasks_total: tasks.len() as u32,
            tasks_done: 0,
            maps_total,
            maps_done: 0,
            reduces_total,
            reduces_done: 0,
            images_skipped,
            images_done: 0,
            images_failed: 0,
        };
        for (i, task) in tasks.iter().enumerate() {
            if task.waiting == 0 {
                inner.pending.push_back((id.clone(), i as u32));
            }
        }
        inner.last_seq += 1;
        let seq = inner.last_seq;
        inner.order.insert(seq, id.clone());
        inner.jobs.insert(id.clone(), Job { status, tasks, seq, ended_ms: None });
        Ok(id)
    }

    async fn lease(&self, worker: &str, policy: LeasePolicy) -> StateResult<Option<Lease>> {
        let now_ms = (self.clock)();
        let mut inner = self.inner.lock().unwrap();
        inner.reclaim_expired(now_ms, policy);
        while let Some((job_id, index)) = inner.pending.pop_front() {
            if !inner.running(&job_id) {
                continue; // cancelled or failed since it was queued
            }
            let job = inner.jobs.get_mut(&job_id).expect("running job exists");
            let task = &mut job.tasks[index as usize];
            task.attempts += 1;
            let job_context = JobContext::of(&job.status.spec);
            let lease = Lease {
                lease_id: LeaseId::new(&job_id, index, task.attempts, LeaseSecret::random()),
                max_ms: policy.task_time.max_ms(&task.spec, &job_context),
                task: task.spec.clone(),
                attempt: task.attempts,
                ttl_ms: policy.ttl_ms,
                job: job_context,
            };
            let (deadline_ms, ends_ms) = (now_ms + lease.ttl_ms, now_ms.saturating_add(lease.max_ms));
            let held = Held { job_id, index, attempt: lease.attempt, deadline_ms, ends_ms, worker: worker.to_string() };
            inner.leases.insert(lease.lease_id.clone(), held);
            return Ok(Some(lease));
        }
        Ok(None)
    }

    /// A lease past its task's maximum time is not renewed: it expires now.
    async fn renew(&self, lease_id: &LeaseId, policy: LeasePolicy) -> StateResult<LeaseState> {
        let now_ms = (self.clock)();
        let mut inner = self.inner.lock().unwrap();
        inner.reclaim_expired(now_ms, policy);
        if let Some(h) = inner.leases.get_mut(lease_id) {
            let over = now_ms >= h.ends_ms;
            h.deadline_ms = if over { now_ms } else { now_ms + policy.ttl_ms };
            if over {
                inner.reclaim_expired(now_ms, policy);
            }
        }
        Ok(inner.lease_state(lease_id))
    }

    async fn complete(&self, lease_id: &LeaseId) -> StateResult<Completion> {
        let mut inner = self.inner.lock().unwrap();
        let state = inner.lease_state(lease_id);
        let Some(held) = inner.leases.remove(lease_id) else {
            return Ok(Completion { lease: state, job_done: false });
        };
        let job = inner.jobs.get_mut(&held.job_id).expect("leased task's job exists");
        job.status.tasks_done += 1;
        let task = &job.tasks[held.index as usize];
        let images = task.spec.work.images();
        job.status.images_done += images;
        match task.spec.work {
            Work::Map { .. } => job.status.maps_done += 1,
            Work::Reduce { .. } => job.status.reduces_done += 1,
            Work::Render { .. } => {}
        }
        // A held lease means a running job: a failed or cancelled one has no leases, so it
        // never gets here and never releases the tasks waiting on this one.
        let mut released = Vec::new();
        for d in task.dependents.clone() {
            let dependent = &mut job.tasks[d as usize];
            dependent.waiting -= 1;
            if dependent.waiting == 0 {
                released.push((held.job_id.clone(), d));
            }
        }
        let job_done = job.status.tasks_done == job.status.tasks_total;
        if job_done {
            job.status.state = JobState::Indexing;
        }
        inner.pending.extend(released);
        inner.totals.images_rendered += images;
        Ok(Completion { lease: LeaseState::Held, job_done })
    }

    async fn fail(&self, lease_id: &LeaseId, failure: Failure, policy: LeasePolicy) -> StateResult<LeaseState> {
        let now_ms = (self.clock)();
        let mut inner = self.inner.lock().unwrap();
        let state = inner.lease_state(lease_id);
        let Some(held) = inner.leases.remove(lease_id) else {
            return Ok(state);
        };
        let task_id = format!("{}/{}", held.job_id, held.index);
        if failure.released {
            // Back at the front: it was next in line before this worker took it.
            if let Some(task) = inner.jobs.get_mut(&held.job_id).and_then(|j| j.tasks.get_mut(held.index as usize)) {
                task.released += 1;
            }
            inner.pending.push_front((held.job_id, held.index));
            return Ok(LeaseState::Held);
        }
        inner.totals.failures += 1;
        let counted = inner.counted(&held);
        if failure.retryable && counted < policy.max_attempts {
            inner.totals.retries += 1;
            inner.pending.push_back((held.job_id, held.index));
        } else {
            let why = if failure.retryable { format!(" (after {counted} attempts)") } else { String::new() };
            inner.fail_job(&held.job_id, format!("task {task_id} failed{why}: {}", failure.message), now_ms);
        }
        Ok(LeaseState::Held)
    }

    async fn finish(&self, job_id: &JobId, outcome: JobState, images_failed: u64, now_ms: u64) -> StateResult<()> {
        let mut inner = self.inner.lock().unwrap();
        let job = inner.jobs.get_mut(job_id).ok_or_else(|| StateError::NoSuchJob(job_id.to_string()))?;
        if job.status.state == JobState::Indexing {
            job.status.images_failed = images_failed;
            job.end(outcome, now_ms);
        }
        Ok(())
    }

    async fn indexing_jobs(&self) -> StateResult<Vec<JobId>> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.jobs.iter().filter(|(_, j)| j.status.state == JobState::Indexing).map(|(id, _)| id.clone()).collect())
    }

    async fn cancel(&self, job_id: &JobId, now_ms: u64) -> StateResult<bool> {
        let mut inner = self.inner.lock().unwrap();
        let job = inner.jobs.get_mut(job_id).ok_or_else(|| StateError::NoSuchJob(job_id.to_string()))?;
        if job.status.state.is_terminal() {
            return Ok(false);
        }
        job.end(JobState::Cancelled, now_ms);
        inner.leases.retain(|_, h| h.job_id != *job_id);
        Ok(true)
    }

    async fn job(&self, job_id: &JobId) -> StateResult<JobStatus> {
        let inner = self.inner.lock().unwrap();
        inner.jobs.get(job_id).map(|j| j.status.clone()).ok_or_else(|| StateError::NoSuchJob(job_id.to_string()))
    }

    async fn jobs_page(&self, before: Option<JobCursor>, limit: usize) -> StateResult<JobsPage> {
        let inner = self.inner.lock().unwrap();
        let below = before.map_or(u64::MAX, |c| c.0);
        let mut older = inner.order.range(..below).rev();
        let jobs: Vec<(JobCursor, JobStatus)> = older.by_ref().take(limit).map(|(&seq, id)| (JobCursor(seq), inner.jobs[id].status.clone())).collect();
        let next = match (older.next(), jobs.last()) {
            (Some(_), Some((last, _))) => Some(*last),
            _ => None,
        };
        Ok(JobsPage { jobs, next })
    }

    async fn expire_jobs(&self, now_ms: u64, retention_ms: u64) -> StateResult<u64> {
        let mut inner = self.inner.lock().unwrap();
        let expired: Vec<(u64, JobId)> = inner
            .jobs
            .iter()
            .filter(|(_, j)| j.ended_ms.is_some_and(|end| end.saturating_add(retention_ms) <= now_ms))
            .map(|(id, j)| (j.seq, id.clone()))
            .collect();
        for (seq, id) in &expired {
            inner.order.remove(seq);
            inner.jobs.remove(id);
        }
        Ok(expired.len() as u64)
    }

    async fn ping(&self) -> StateResult<()> {
        Ok(())
    }

    async fn counters(&self) -> StateResult<StoreCounters> {
        let inner = self.inner.lock().unwrap();
        let queued = inner.pending.iter().filter(|(job, _)| inner.running(job)).count() as u64;
        Ok(StoreCounters { queued, leased: inner.leases.len() as u64, ..inner.totals })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_conforms() {
        use super::super::conformance::{run_all, Time};
        let t = Time::Manual(Default::default());
        run_all(|| Box::new(t.memory_store()) as Box<dyn StateStore>, &t).await;
    }
}
