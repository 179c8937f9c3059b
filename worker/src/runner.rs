//! The worker loop: lease a task, run its work (see [`crate::tasks`]) while renewing the
//! lease beside it, report. A rendered task is stored and reported while the next one
//! renders. The same loop runs in `loupe render` (against the in-process coordinator) and
//! in the cluster's workers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tch::Device;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use loupe_core::api::{ApiError, WorkerApi};
use loupe_core::task::{Failure, Lease, LeaseState};

use crate::metrics::{TaskOutcome, WorkerMetrics};
use crate::tasks::{TaskSignals, TaskWork, Tasks};
use crate::Error;

pub use crate::tasks::profile_totals;

#[cfg(test)]
mod tests;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Shown to the coordinator in leases (for messages about lost leases).
    pub name: String,
    pub device: Device,
    /// How long to wait before asking again when no task is runnable.
    pub idle_poll: Duration,
    /// Where models fetched from object storage are kept, by digest.
    pub model_cache: PathBuf,
    /// False for the benchmark aid that measures the coordinator: each task writes one
    /// tiny artifact instead of rendering (`loupe-worker --no-render`).
    pub render: bool,
    /// Time each step's phases (it synchronises the device, so it is off by default) and
    /// log the split per task; [`profile_totals`] sums them.
    pub profile: bool,
    /// Counted as tasks end; served on `/metrics` by `loupe-worker`.
    pub metrics: Arc<WorkerMetrics>,
}

/// What a worker did, for the caller's summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    pub tasks_done: u64,
    pub images_written: u64,
}

/// Runs the worker loop until `shutdown` turns true. It ends early only when the
/// coordinator refuses this worker (another protocol version, a wrong token).
///
/// A rendered task's PNGs are encoded and stored, and the task reported, while the next
/// task renders: one task finishing beside one rendering keeps the device busy.
pub async fn run_worker(api: Arc<dyn WorkerApi>, config: WorkerConfig, shutdown: watch::Receiver<bool>) -> std::result::Result<WorkerStats, ApiError> {
    let work = Arc::new(Tasks::new(&config));
    Worker::new(api, work, config, shutdown).run().await
}

/// The first wait before leasing (or reporting completion) again after the coordinator
/// failed to answer; it doubles with each failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest such wait.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The worker loop's state between leases.
struct Worker<W: TaskWork> {
    api: Arc<dyn WorkerApi>,
    work: Arc<W>,
    config: WorkerConfig,
    shutdown: watch::Receiver<bool>,
    stats: WorkerStats,
    /// The last rendered task, being stored and reported while the next one runs; it
    /// yields the images written when the task completed.
    finishing: Option<JoinHandle<Option<u64>>>,
    /// The wait before leasing again while the coordinator is unavailable.
    backoff: Duration,
}

/// What asking for a lease gave.
enum Leased {
    Task(Box<Lease>),
    /// Nothing is runnable now.
    Nothing,
    /// The coordinator did not answer; ask again after a backoff.
    Unavailable,
}

impl<W: TaskWork> Worker<W> {
    fn new(api: Arc<dyn WorkerApi>, work: Arc<W>, config: WorkerConfig, shutdown: watch::Receiver<bool>) -> Self {
        Worker { api, work, config, shutdown, stats: WorkerStats::default(), finishing: None, backoff: FIRST_BACKOFF }
    }

    /// Leases and runs tasks until shutdown, or until the coordinator refuses this worker
    /// (then a task still finishing is not waited for).
    async fn run(mut self) -> std::result::Result<WorkerStats, ApiError> {
        while !*self.shutdown.borrow() {
            let go_on = match self.lease().await? {
                Leased::Task(lease) => {
                    self.run_task(*lease).await;
                    true
                }
                Leased::Nothing => self.idle().await,
                Leased::Unavailable => self.back_off().await,
            };
            if !go_on {
                break;
            }
        }
        self.await_finishing().await;
        Ok(self.stats)
    }

    /// Asks for a lease. Only a refusal is an error.
    async fn lease(&mut self) -> std::result::Result<Leased, ApiError> {
        match self.api.lease(&self.config.name).await {
            Ok(lease) => {
                self.config.metrics.set_registered(true);
                self.backoff = FIRST_BACKOFF;
                Ok(lease.map_or(Leased::Nothing, |l| Leased::Task(Box::new(l))))
            }
            Err(e @ ApiError::Refused(_)) => Err(e),
            Err(e) => {
                self.config.metrics.set_registered(false);
                // The coordinator may be restarting: back off and ask again.
                warn!(worker = %self.config.name, error = %e, "leasing failed; retrying");
                Ok(Leased::Unavailable)
            }
        }
    }

    /// Waits out the backoff and doubles it. False when shutting down.
    async fn back_off(&mut self) -> bool {
        if !sleep_unless_stopped(self.backoff, &mut self.shutdown).await {
            return false;
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        true
    }

    /// Nothing to lease: lets the last task finish, so that its reduce can start, or else
    /// waits a poll. False when shutting down.
    async fn idle(&mut self) -> bool {
        if self.finishing.is_some() {
            self.await_finishing().await;
            return true;
        }
        sleep_unless_stopped(self.config.idle_poll, &mut self.shutdown).await
    }

    /// Waits for the task being stored, if any, and counts it.
    async fn await_finishing(&mut self) {
        if let Some(f) = self.finishing.take() {
            self.stats.count(f.await.unwrap_or(None));
        }
    }

    /// Runs a leased task's work while renewing its lease, and reports how it ended; a
    /// rendered task goes on to be stored beside the next task.
    async fn run_task(&mut self, lease: Lease) {
        let task_id = lease.task.id();
        info!(task_id, attempt = lease.attempt, kind = lease.task.work.kind(), layer = lease.task.work.layer().unwrap_or("-"), units = lease.task.work.images(), "task leased");
        let renewal = Renewal::of(&lease);
        let signals = Arc::new(TaskSignals::default());
        let work = self.work.run(&lease, &signals);
        let (result, shutting_down) = with_renewal(self.api.as_ref(), &lease, renewal, &signals, Some(&mut self.shutdown), work).await;
        match result {
            Ok(Some(finished)) => self.start_finishing(lease, renewal, finished).await,
            Ok(None) => self.completed(&lease).await,
            Err(e) => self.failed(&lease, e, shutting_down).await,
        }
    }

    /// The task's outputs are all stored: reports it complete.
    async fn completed(&mut self, lease: &Lease) {
        report_complete(self.api.as_ref(), lease, &mut self.shutdown).await;
        self.config.metrics.task_ended(lease.task.work.kind(), TaskOutcome::Done, 0);
        self.stats.count(Some(0));
    }

    /// The work stopped with `e`: a shutdown hands the task back; a lease that ended needs
    /// no report; any other error is reported, retryable as the error says.
    async fn failed(&self, lease: &Lease, e: Error, shutting_down: bool) {
        let kind = lease.task.work.kind();
        let (failure, outcome) = match e {
            Error::Cancelled if shutting_down => (Failure::released("the worker shut down"), TaskOutcome::Released),
            Error::Cancelled => return self.config.metrics.task_ended(kind, TaskOutcome::Released, 0),
            e => (Failure::new(e.retryable(), e.to_string()), TaskOutcome::Failed),
        };
        report_failure(self.api.as_ref(), lease, failure).await;
        self.config.metrics.task_ended(kind, outcome, 0);
    }

    /// Stores and reports a rendered task in the background, once the task stored before
    /// it is done.
    async fn start_finishing(&mut self, lease: Lease, renewal: Renewal, finished: W::Finished) {
        self.await_finishing().await;
        let (api, work, shutdown, metrics) = (self.api.clone(), self.work.clone(), self.shutdown.clone(), self.config.metrics.clone());
        self.finishing = Some(tokio::spawn(async move { finish_render(api, work.as_ref(), lease, renewal, finished, shutdown, &metrics).await }));
    }
}

impl WorkerStats {
    /// Counts a task that completed with `images` written; `None`: it did not complete.
    fn count(&mut self, images: Option<u64>) {
        if let Some(images) = images {
            self.tasks_done += 1;
            self.images_written += images;
        }
    }
}

/// Resolves when `shutdown` turns true or its sender goes away.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps for `d`; false, at once, if `shutdown` turns true (or its sender goes away)
/// first.
async fn sleep_unless_stopped(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! { _ = tokio::time::sleep(d) => true, _ = stopped(shutdown) => false }
}

/// The shortest wait between renewals, whatever the lease's time to live.
const MIN_RENEW_EVERY: Duration = Duration::from_millis(50);
/// How many times to live a task may go without progress before its lease is left to
/// expire. Generous, since fetching a model or a shard counts no steps; a hung device
/// (a CUDA hang blocks the torch thread) makes none ever again.
const STALL_TTLS: u32 = 3;

/// When a task's lease is renewed, by this worker's monotonic clock (the lease carries
/// durations, so the coordinator's clock never enters): every third of its time to live
/// while the work makes progress, until the task's maximum time from the grant.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    every: Duration,
    stall_after: Duration,
    ends_at: Instant,
}

impl Renewal {
    /// For a lease granted now.
    fn of(lease: &Lease) -> Renewal {
        let ttl = Duration::from_millis(lease.ttl_ms);
        Renewal { every: (ttl / 3).max(MIN_RENEW_EVERY), stall_after: ttl * STALL_TTLS, ends_at: Instant::now() + Duration::from_millis(lease.max_ms) }
    }
}

/// Whether a task's work has stopped making progress: its step count has not moved for
/// the stall window.
struct Stall {
    steps: u64,
    moved_at: Instant,
    after: Duration,
}

impl Stall {
    fn new(signals: &TaskSignals, after: Duration) -> Stall {
        Stall { steps: signals.progress(), moved_at: Instant::now(), after }
    }

    fn stalled(&mut self, signals: &TaskSignals) -> bool {
        let steps = signals.progress();
        if steps != self.steps {
            (self.steps, self.moved_at) = (steps, Instant::now());
        }
        self.moved_at.elapsed() >= self.after
    }
}

/// Runs `work` while renewing its lease as `renewal` says, only while the work makes
/// progress: a stalled task's lease expires and the coordinator gives the task to another
/// worker. A lease that ends (job cancelled, lease lost), the task's maximum time or a
/// shutdown, when `shutdown` is given, cancels the work through `signals`. Returns the
/// work's result and whether the worker is shutting down.
async fn with_renewal<T>(
    api: &dyn WorkerApi,
    lease: &Lease,
    renewal: Renewal,
    signals: &TaskSignals,
    mut shutdown: Option<&mut watch::Receiver<bool>>,
    work: impl std::future::Future<Output = T>,
) -> (T, bool) {
    let task_id = lease.task.id();
    let mut renew = tokio::time::interval_at(Instant::now() + renewal.every, renewal.every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stall = Stall::new(signals, renewal.stall_after);
    let (mut shutting_down, mut was_stalled, mut over) = (false, false, false);
    let max_time = tokio::time::sleep_until(renewal.ends_at);
    tokio::pin!(work, max_time);
    loop {
        tokio::select! {
            r = &mut work => return (r, shutting_down),
            _ = renew.tick() => {
                let stalled = stall.stalled(signals);
                if stalled != was_stalled {
                    match stalled {
                        true => warn!(task_id, stalled_s = renewal.stall_after.as_secs_f64(), "the task made no progress; no longer renewing its lease, which will expire"),
                        false => info!(task_id, "the task makes progress again; renewing its lease"),
                    }
                    was_stalled = stalled;
                }
                if !stalled {
                    renew_once(api, lease, &renewal, signals).await;
                }
            }
            _ = &mut max_time, if !over => {
                over = true;
                warn!(task_id, max_s = lease.max_ms / 1000, "the task ran past its maximum time; stopping it");
                signals.cancel();
            }
            _ = stopped_if(shutdown.as_deref_mut()), if !shutting_down => {
                shutting_down = true;
                signals.cancel();
            }
        }
    }
}

/// Renews the lease once, waiting no longer than a renewal period (the next renewal may
/// still save the lease); one that ended cancels the work.
async fn renew_once(api: &dyn WorkerApi, lease: &Lease, renewal: &Renewal, signals: &TaskSignals) {
    let task_id = lease.task.id();
    match tokio::time::timeout(renewal.every, api.renew(&lease.lease_id)).await {
        Ok(Ok(LeaseState::Held)) => {}
        Ok(Ok(state)) => {
            info!(task_id, ?state, "lease ended; stopping the task");
            signals.cancel();
        }
        Ok(Err(e)) => warn!(task_id, error = %e, "renewing the lease failed"),
        Err(_) => warn!(task_id, waited_ms = renewal.every.as_millis() as u64, "the coordinator did not answer a renewal in time"),
    }
}

/// [`stopped`], or never without a receiver.
async fn stopped_if(shutdown: Option<&mut watch::Receiver<bool>>) {
    match shutdown {
        Some(s) => stopped(s).await,
        None => std::future::pending().await,
    }
}

/// Stores a rendered task's images and records and reports the task, renewing its lease
/// meanwhile. Returns the number of images written when the task completed.
async fn finish_render<W: TaskWork>(
    api: Arc<dyn WorkerApi>,
    work: &W,
    lease: Lease,
    renewal: Renewal,
    finished: W::Finished,
    mut shutdown: watch::Receiver<bool>,
    metrics: &WorkerMetrics,
) -> Option<u64> {
    // Storing is not interrupted by a shutdown: it is short, and the work is done. A lease
    // that ends (the job cancelled) stops it.
    let signals = TaskSignals::default();
    let store = work.store(&lease, finished, &signals);
    let (result, _) = with_renewal(api.as_ref(), &lease, renewal, &signals, None, store).await;
    match result {
        Ok(images) => {
            report_complete(api.as_ref(), &lease, &mut shutdown).await;
            metrics.task_ended("render", TaskOutcome::Done, images);
            Some(images)
        }
        Err(Error::Cancelled) => {
            metrics.task_ended("render", TaskOutcome::Released, 0);
            None
        }
        Err(e) => {
            report_failure(api.as_ref(), &lease, Failure::new(true, e.to_string())).await;
            metrics.task_ended("render", TaskOutcome::Failed, 0);
            None
        }
    }
}

async fn report_failure(api: &dyn WorkerApi, lease: &Lease, failure: Failure) {
    let task_id = lease.task.id();
    warn!(task_id, retryable = failure.retryable, message = %failure.message, "task failed");
    if let Err(e) = api.fail(&lease.lease_id, failure).await {
        warn!(task_id, error = %e, "reporting the failure failed; the lease will expire");
    }
}

/// Reports a finished task. The outputs are already stored, so a coordinator that is
/// restarting is asked again with backoff rather than the work being thrown away; if the
/// lease expired meanwhile, the task runs again and overwrites the same keys.
async fn report_complete(api: &dyn WorkerApi, lease: &Lease, shutdown: &mut watch::Receiver<bool>) {
    let task_id = lease.task.id();
    let mut backoff = FIRST_BACKOFF;
    for _ in 0..20 {
        match api.complete(&lease.lease_id).await {
            Ok(LeaseState::Held) => return debug!(task_id, "task complete"),
            Ok(state) => return info!(task_id, ?state, "completion not accepted; the outputs stand, overwritten by any retry"),
            Err(e) => warn!(task_id, error = %e, "reporting completion failed; retrying"),
        }
        if !sleep_unless_stopped(backoff, shutdown).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    warn!(task_id, "giving up reporting completion; the lease will expire and the task run again");
}
