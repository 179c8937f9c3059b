//! The behaviour every [`StateStore`] backend must show. Lease deadlines follow the
//! store's own clock: the memory store's is moved by hand, Redis's is waited out.

use loupe_core::spec::{DatasetSpec, JobSpec, LayerInfo, LayerPlan, ModelRef, RenderSettings, Technique};
use loupe_core::task::{Failure, Lease, LeaseId, LeaseSecret, LeaseState, ShardSource, Work};

use super::{JobCursor, JobId, JobState, LeasePolicy, NewTask, StateError, StateStore, StoreCounters};

const POLICY: LeasePolicy = LeasePolicy { ttl_ms: 1_000, max_attempts: 3, task_time: super::TaskTime::DEFAULT };

/// How a store's clock moves on.
pub enum Time {
    /// The memory store's clock (see [`Time::memory_store`]), moved by hand.
    Manual(std::sync::Arc<std::sync::atomic::AtomicU64>),
    /// Real time (Redis's clock): waited out.
    Real,
}

impl Time {
    async fn pass(&self, ms: u64) {
        match self {
            Time::Manual(now) => {
                now.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
            }
            Time::Real => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
        }
    }

    /// A memory store on this clock.
    pub fn memory_store(&self) -> super::MemoryStateStore {
        match self {
            Time::Manual(now) => {
                let now = now.clone();
                super::MemoryStateStore::with_clock(Box::new(move || now.load(std::sync::atomic::Ordering::SeqCst)))
            }
            Time::Real => super::MemoryStateStore::new(),
        }
    }
}

pub(crate) fn spec() -> JobSpec {
    JobSpec {
        model: ModelRef { uri: "m.pt".into(), name: "m".into(), sha256: "00".into() },
        layers: vec![LayerPlan { layer: LayerInfo { name: "conv".into(), shape: vec![4, 8, 8] }, units: vec![0, 1, 2, 3].into(), techniques: None, steps: None, param: None, transforms: None }],
        techniques: vec![Technique::Channel],
        settings: RenderSettings { steps: 4, size: 16, input_size: 16, seed: 0, learning_rate: 0.05, ..Default::default() },
        batch: 2,
        out: "out".into(),
        dataset: None,
    }
}

fn tasks(n: u32) -> Vec<NewTask> {
    (0..n)
        .map(|i| NewTask::runnable(Work::render("conv", Technique::Channel, [2 * i, 2 * i + 1])))
        .collect()
}

/// [`spec`] with a dataset.
pub(crate) fn dataset_spec() -> JobSpec {
    JobSpec { dataset: Some(DatasetSpec { uri: "images/".into(), examples: 4, images_per_shard: 2, connections: true }), ..spec() }
}

pub(crate) fn map(shard: u32) -> Work {
    Work::Map { shard, source: ShardSource::Images { keys: vec![format!("{shard}a.jpg"), format!("{shard}b.jpg")] } }
}

/// A dataset job's tasks, as the coordinator shards them: `renders` render tasks, then
/// `maps` maps, then `reduces` reduces that each wait on every map.
pub(crate) fn dataset_tasks(renders: u32, maps: u32, reduces: u32) -> Vec<NewTask> {
    let mut all = tasks(renders);
    let map_indices: Vec<u32> = (renders..renders + maps).collect();
    all.extend((0..maps).map(|m| NewTask::runnable(map(m))));
    all.extend((0..reduces).map(|r| NewTask { work: Work::Reduce { layer: format!("layer{r}") }, after: map_indices.clone() }));
    all
}

fn is_reduce(l: &Lease) -> bool {
    matches!(l.task.work, Work::Reduce { .. })
}

pub async fn run_all(make: impl Fn() -> Box<dyn StateStore>, t: &Time) {
    run_all_async(|| std::future::ready(make()), t).await;
}

/// [`run_all`] for backends whose stores are made asynchronously (each case gets a fresh,
/// empty store).
pub async fn run_all_async<F: std::future::Future<Output = Box<dyn StateStore>>>(make: impl Fn() -> F, t: &Time) {
    each_task_is_leased_once_and_the_last_completion_ends_the_job(make().await.as_ref()).await;
    an_expired_lease_is_granted_again_and_the_stale_holder_is_refused(make().await.as_ref(), t).await;
    a_task_that_keeps_losing_its_lease_fails_the_job(make().await.as_ref(), t).await;
    a_lease_past_its_maximum_time_is_not_renewed(make().await.as_ref(), t).await;
    retryable_failures_are_retried_up_to_the_limit(make().await.as_ref()).await;
    a_permanent_failure_fails_the_job_at_once(make().await.as_ref()).await;
    a_cancelled_job_stops_its_workers_and_leases_nothing(make().await.as_ref()).await;
    a_job_with_nothing_to_render_goes_straight_to_indexing(make().await.as_ref()).await;
    a_reduce_is_leased_only_after_every_map_is_done(make().await.as_ref()).await;
    a_map_retried_after_its_lease_expired_still_gates_the_reduce(make().await.as_ref(), t).await;
    a_map_retried_after_a_failure_still_gates_the_reduce(make().await.as_ref()).await;
    a_failed_or_cancelled_job_never_releases_its_reduces(make().await.as_ref(), make().await.as_ref()).await;
    a_task_may_wait_only_on_earlier_tasks(make().await.as_ref()).await;
    the_counters_follow_queue_leases_expiries_retries_and_failures(make().await.as_ref(), t).await;
    a_released_task_goes_back_without_using_an_attempt(make().await.as_ref(), t).await;
    jobs_are_listed_newest_first_a_page_at_a_time(make().await.as_ref()).await;
    jobs_that_ended_longer_ago_than_the_retention_expire(make().await.as_ref(), t).await;
    a_forged_lease_id_cannot_renew_complete_or_fail_the_task(make().await.as_ref()).await;
    a_fresh_store_never_repeats_a_job_id_nor_honours_an_earlier_stores_lease(make().await.as_ref(), make().await.as_ref()).await;
    the_jobs_indexing_are_listed_until_they_end(make().await.as_ref()).await;
}

async fn each_task_is_leased_once_and_the_last_completion_ends_the_job(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(2), 0, 0).await.unwrap();
    let a = s.lease("w1", POLICY).await.unwrap().unwrap();
    let b = s.lease("w2", POLICY).await.unwrap().unwrap();
    assert_ne!(a.task.index, b.task.index);
    assert_eq!((a.attempt, a.task.job_id.as_str()), (1, id.as_str()));
    assert!(s.lease("w3", POLICY).await.unwrap().is_none(), "both tasks are held");
    let first = s.complete(&a.lease_id).await.unwrap();
    assert_eq!((first.lease, first.job_done), (LeaseState::Held, false));
    let last = s.complete(&b.lease_id).await.unwrap();
    assert!(last.job_done);
    let st = s.job(&id).await.unwrap();
    assert_eq!((st.state.clone(), st.tasks_done, st.images_done), (JobState::Indexing, 2, 4));
    s.finish(&id, JobState::Succeeded, 1, 2).await.unwrap();
    let st = s.job(&id).await.unwrap();
    assert_eq!((st.state, st.images_failed), (JobState::Succeeded, 1), "the failed images are kept with the outcome");
    assert_eq!(s.jobs().await.unwrap().len(), 1);
}

async fn an_expired_lease_is_granted_again_and_the_stale_holder_is_refused(s: &dyn StateStore, t: &Time) {
    s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let first = s.lease("w1", POLICY).await.unwrap().unwrap();
    assert_eq!((first.ttl_ms, first.max_ms), (POLICY.ttl_ms, POLICY.task_time.max_ms(&first.task, &first.job)), "durations, not deadlines");
    // Renewed in time, the lease holds past its first deadline.
    t.pass(700).await;
    assert_eq!(s.renew(&first.lease_id, POLICY).await.unwrap(), LeaseState::Held);
    t.pass(500).await;
    assert!(s.lease("w2", POLICY).await.unwrap().is_none());
    // Not renewed again, it expires and the task goes to another worker.
    t.pass(600).await;
    let second = s.lease("w2", POLICY).await.unwrap().expect("expired task is leased again");
    assert_eq!((second.task.index, second.attempt), (first.task.index, 2));
    assert_eq!(s.renew(&first.lease_id, POLICY).await.unwrap(), LeaseState::Lost);
    let stale = s.complete(&first.lease_id).await.unwrap();
    assert_eq!((stale.lease, stale.job_done), (LeaseState::Lost, false), "a stale completion is refused");
    assert!(s.complete(&second.lease_id).await.unwrap().job_done);
}

async fn a_task_that_keeps_losing_its_lease_fails_the_job(s: &dyn StateStore, t: &Time) {
    let id = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    for attempt in 1..=POLICY.max_attempts {
        let l = s.lease("w", POLICY).await.unwrap().unwrap();
        assert_eq!(l.attempt, attempt);
        t.pass(POLICY.ttl_ms + 1).await;
    }
    assert!(s.lease("w", POLICY).await.unwrap().is_none());
    match s.job(&id).await.unwrap().state {
        JobState::Failed { message } => assert!(message.contains("lost its lease 3 times"), "{message}"),
        other => panic!("expected failure, got {other:?}"),
    }
}

/// A task that runs past its maximum time (a worker still renewing a hung render) is
/// renewed no more: the store reclaims it and gives it to another worker.
async fn a_lease_past_its_maximum_time_is_not_renewed(s: &dyn StateStore, t: &Time) {
    let task_time = super::TaskTime { floor_ms: 3_000, render_ns_per_pixel_step: 0, map_ms_per_image: 0, reduce_ms: 0 };
    let short = LeasePolicy { ttl_ms: 2_000, task_time, ..POLICY };
    s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let first = s.lease("w1", short).await.unwrap().unwrap();
    assert_eq!(first.max_ms, 3_000);
    // Renewed in time, every second, while within its maximum time.
    for _ in 0..2 {
        t.pass(1_000).await;
        assert_eq!(s.renew(&first.lease_id, short).await.unwrap(), LeaseState::Held);
    }
    // Past it (though within the time to live of the last renewal): not renewed.
    t.pass(1_500).await;
    assert_eq!(s.renew(&first.lease_id, short).await.unwrap(), LeaseState::Lost, "past its maximum time");
    let second = s.lease("w2", short).await.unwrap().expect("the task is leased again at once");
    assert_eq!((second.task.index, second.attempt), (first.task.index, 2));
    assert_eq!(s.counters().await.unwrap().lease_expiries, 1);
}

async fn retryable_failures_are_retried_up_to_the_limit(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let transient = Failure::new(true, "store timed out");
    for attempt in 1..=POLICY.max_attempts {
        let l = s.lease("w", POLICY).await.unwrap().expect("retried");
        assert_eq!(l.attempt, attempt);
        s.fail(&l.lease_id, transient.clone(), POLICY).await.unwrap();
    }
    assert!(s.lease("w", POLICY).await.unwrap().is_none());
    match s.job(&id).await.unwrap().state {
        JobState::Failed { message } => assert!(message.contains("store timed out") && message.contains("3 attempts"), "{message}"),
        other => panic!("expected failure, got {other:?}"),
    }
}

async fn a_permanent_failure_fails_the_job_at_once(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(2), 0, 0).await.unwrap();
    let a = s.lease("w1", POLICY).await.unwrap().unwrap();
    let b = s.lease("w2", POLICY).await.unwrap().unwrap();
    let bad = Failure::new(false, "unknown layer \"conv9\"");
    s.fail(&a.lease_id, bad, POLICY).await.unwrap();
    match s.job(&id).await.unwrap().state {
        JobState::Failed { message } => assert!(message.contains("unknown layer"), "{message}"),
        other => panic!("expected failure, got {other:?}"),
    }
    assert_eq!(s.renew(&b.lease_id, POLICY).await.unwrap(), LeaseState::Lost, "the other task's worker is told to stop");
    assert!(s.lease("w3", POLICY).await.unwrap().is_none());
}

async fn a_cancelled_job_stops_its_workers_and_leases_nothing(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(2), 0, 0).await.unwrap();
    let a = s.lease("w1", POLICY).await.unwrap().unwrap();
    assert!(s.cancel(&id, 1).await.unwrap());
    assert_eq!(s.renew(&a.lease_id, POLICY).await.unwrap(), LeaseState::Cancelled);
    assert!(s.lease("w2", POLICY).await.unwrap().is_none());
    assert_eq!(s.complete(&a.lease_id).await.unwrap().lease, LeaseState::Cancelled);
    assert_eq!(s.job(&id).await.unwrap().state, JobState::Cancelled);
    assert!(!s.cancel(&id, 3).await.unwrap(), "cancelling twice reports it had ended");
}

async fn a_job_with_nothing_to_render_goes_straight_to_indexing(s: &dyn StateStore) {
    let id = s.create_job(spec(), vec![], 4, 0).await.unwrap();
    let st = s.job(&id).await.unwrap();
    assert_eq!((st.state, st.images_skipped, st.images_total), (JobState::Indexing, 4, 4));
}

async fn a_reduce_is_leased_only_after_every_map_is_done(s: &dyn StateStore) {
    // Tasks 0 (render), 1 and 2 (maps), 3 (reduce of layer0), 4 (reduce of layer1).
    let id = s.create_job(dataset_spec(), dataset_tasks(1, 2, 2), 0, 0).await.unwrap();
    let st = s.job(&id).await.unwrap();
    assert_eq!((st.tasks_total, st.maps_total, st.reduces_total, st.maps_done, st.reduces_done), (5, 2, 2, 0, 0));
    let render = s.lease("w1", POLICY).await.unwrap().unwrap();
    let map0 = s.lease("w2", POLICY).await.unwrap().unwrap();
    assert_eq!((render.task.index, map0.task.index), (0, 1));
    assert_eq!(map0.task.work, map(0), "a map's work survives the store");
    assert_eq!(map0.job.dataset, dataset_spec().dataset, "the lease carries the dataset");
    assert_eq!(render.job.dataset, dataset_spec().dataset);
    // One map done, the other still pending: the next lease is that map, not a reduce.
    assert_eq!(s.complete(&map0.lease_id).await.unwrap(), super::Completion { lease: LeaseState::Held, job_done: false });
    let map1 = s.lease("w2", POLICY).await.unwrap().unwrap();
    assert_eq!((map1.task.index, map1.task.work.clone()), (2, map(1)));
    // The last map is leased, not done: still nothing to lease.
    assert!(s.lease("w3", POLICY).await.unwrap().is_none(), "no reduce while a map is leased");
    assert!(!s.complete(&render.lease_id).await.unwrap().job_done);
    assert!(s.lease("w3", POLICY).await.unwrap().is_none(), "no reduce while a map is leased");
    let st = s.job(&id).await.unwrap();
    assert_eq!((st.tasks_done, st.maps_done, st.images_done), (2, 1, 2));
    // The last map's completion releases both reduces.
    assert!(!s.complete(&map1.lease_id).await.unwrap().job_done);
    let r0 = s.lease("w1", POLICY).await.unwrap().expect("the reduces are runnable after the last map");
    let r1 = s.lease("w2", POLICY).await.unwrap().expect("both reduces are runnable");
    let mut reduces = vec![r0.task.work.clone(), r1.task.work.clone()];
    reduces.sort_by_key(|w| w.layer().map(str::to_string));
    assert_eq!(reduces, vec![Work::Reduce { layer: "layer0".into() }, Work::Reduce { layer: "layer1".into() }]);
    assert_eq!((r0.attempt, r1.attempt), (1, 1));
    assert!(s.lease("w3", POLICY).await.unwrap().is_none());
    assert!(!s.complete(&r0.lease_id).await.unwrap().job_done);
    assert!(s.complete(&r1.lease_id).await.unwrap().job_done, "the last reduce ends the job");
    let st = s.job(&id).await.unwrap();
    assert_eq!(
        (st.state, st.tasks_done, st.maps_done, st.reduces_done, st.images_done),
        (JobState::Indexing, 5, 2, 2, 2),
        "map and reduce tasks count no images"
    );
}

async fn a_map_retried_after_its_lease_expired_still_gates_the_reduce(s: &dyn StateStore, t: &Time) {
    let id = s.create_job(dataset_spec(), dataset_tasks(0, 2, 1), 0, 0).await.unwrap();
    let a = s.lease("w1", POLICY).await.unwrap().unwrap();
    let b = s.lease("w2", POLICY).await.unwrap().unwrap();
    assert!(!s.complete(&a.lease_id).await.unwrap().job_done);
    // b's worker dies: its lease expires and the map is granted again, not the reduce.
    t.pass(POLICY.ttl_ms + 1).await;
    let b2 = s.lease("w3", POLICY).await.unwrap().expect("the expired map is leased again");
    assert_eq!((b2.task.index, b2.attempt), (b.task.index, 2));
    assert!(s.lease("w4", POLICY).await.unwrap().is_none(), "no reduce while the retried map runs");
    // The stale holder's completion does not count, so it releases nothing.
    assert_eq!(s.complete(&b.lease_id).await.unwrap().lease, LeaseState::Lost);
    assert!(s.lease("w4", POLICY).await.unwrap().is_none(), "a stale completion releases nothing");
    assert_eq!(s.job(&id).await.unwrap().maps_done, 1);
    assert!(!s.complete(&b2.lease_id).await.unwrap().job_done);
    let r = s.lease("w4", POLICY).await.unwrap().expect("the reduce, once the retried map is done");
    assert!(is_reduce(&r), "{r:?}");
    assert!(s.complete(&r.lease_id).await.unwrap().job_done);
}

async fn a_map_retried_after_a_failure_still_gates_the_reduce(s: &dyn StateStore) {
    s.create_job(dataset_spec(), dataset_tasks(0, 1, 1), 0, 0).await.unwrap();
    let m = s.lease("w1", POLICY).await.unwrap().unwrap();
    s.fail(&m.lease_id, Failure::new(true, "store timed out"), POLICY).await.unwrap();
    let m2 = s.lease("w1", POLICY).await.unwrap().expect("the failed map is retried");
    assert_eq!((m2.task.index, m2.attempt), (0, 2));
    assert!(s.lease("w2", POLICY).await.unwrap().is_none(), "no reduce while the map is retried");
    assert!(!s.complete(&m2.lease_id).await.unwrap().job_done);
    let r = s.lease("w2", POLICY).await.unwrap().unwrap();
    assert!(is_reduce(&r), "{r:?}");
}

async fn a_failed_or_cancelled_job_never_releases_its_reduces(failing: &dyn StateStore, cancelling: &dyn StateStore) {
    let id = failing.create_job(dataset_spec(), dataset_tasks(0, 2, 1), 0, 0).await.unwrap();
    let a = failing.lease("w1", POLICY).await.unwrap().unwrap();
    let b = failing.lease("w2", POLICY).await.unwrap().unwrap();
    assert!(!failing.complete(&a.lease_id).await.unwrap().job_done);
    failing.fail(&b.lease_id, Failure::new(false, "not an image"), POLICY).await.unwrap();
    assert!(matches!(failing.job(&id).await.unwrap().state, JobState::Failed { .. }));
    assert!(failing.lease("w3", POLICY).await.unwrap().is_none(), "a failed job's reduce is never leased");

    let id = cancelling.create_job(dataset_spec(), dataset_tasks(0, 2, 1), 0, 0).await.unwrap();
    let a = cancelling.lease("w1", POLICY).await.unwrap().unwrap();
    let b = cancelling.lease("w2", POLICY).await.unwrap().unwrap();
    assert!(!cancelling.complete(&a.lease_id).await.unwrap().job_done);
    assert!(cancelling.cancel(&id, 2).await.unwrap());
    assert_eq!(cancelling.complete(&b.lease_id).await.unwrap().lease, LeaseState::Cancelled);
    assert!(cancelling.lease("w3", POLICY).await.unwrap().is_none(), "a cancelled job's reduce is never leased");
    let st = cancelling.job(&id).await.unwrap();
    assert_eq!((st.state, st.maps_done, st.reduces_done), (JobState::Cancelled, 1, 0));
}

async fn a_task_may_wait_only_on_earlier_tasks(s: &dyn StateStore) {
    let mut bad = dataset_tasks(0, 1, 1);
    bad[0].after = vec![1];
    match s.create_job(dataset_spec(), bad, 0, 0).await {
        Err(StateError::InvalidTasks(msg)) => assert!(msg.contains("task 0 waits on task 1"), "{msg}"),
        other => panic!("expected invalid tasks, got {other:?}"),
    }
    assert!(s.jobs().await.unwrap().is_empty(), "nothing is recorded");
    // Duplicate prerequisites count once.
    let mut twice = dataset_tasks(0, 1, 1);
    twice[1].after = vec![0, 0];
    s.create_job(dataset_spec(), twice, 0, 0).await.unwrap();
    let m = s.lease("w", POLICY).await.unwrap().unwrap();
    assert!(!s.complete(&m.lease_id).await.unwrap().job_done);
    let r = s.lease("w", POLICY).await.unwrap().expect("released by its one prerequisite");
    assert!(s.complete(&r.lease_id).await.unwrap().job_done);
}

async fn the_counters_follow_queue_leases_expiries_retries_and_failures(s: &dyn StateStore, t: &Time) {
    s.ping().await.unwrap();
    assert_eq!(s.counters().await.unwrap(), StoreCounters::default());
    s.create_job(spec(), tasks(3), 0, 0).await.unwrap();
    let counters = s.counters().await.unwrap();
    assert_eq!((counters.queued, counters.leased), (3, 0));

    // One lease expires and is retried; one task fails and is retried; one completes.
    let expiring = s.lease("w1", POLICY).await.unwrap().unwrap();
    let failing = s.lease("w1", POLICY).await.unwrap().unwrap();
    let counters = s.counters().await.unwrap();
    assert_eq!((counters.queued, counters.leased), (1, 2));
    s.fail(&failing.lease_id, Failure::new(true, "oom"), POLICY).await.unwrap();
    t.pass(POLICY.ttl_ms + 1).await;
    let done = s.lease("w2", POLICY).await.unwrap().unwrap(); // reclaims `expiring`
    assert_ne!(done.lease_id, expiring.lease_id);
    s.complete(&done.lease_id).await.unwrap();
    assert_eq!(
        s.counters().await.unwrap(),
        StoreCounters { queued: 2, leased: 0, lease_expiries: 1, retries: 2, failures: 1, images_rendered: 2 }
    );

    // A cancelled job's tasks are no longer queued; the totals stay.
    let job = done.task.job_id.clone();
    s.cancel(&job, 2_020).await.unwrap();
    let counters = s.counters().await.unwrap();
    assert_eq!((counters.queued, counters.leased, counters.retries), (0, 0, 2));
}

async fn a_released_task_goes_back_without_using_an_attempt(s: &dyn StateStore, t: &Time) {
    let job = s.create_job(spec(), tasks(2), 0, 0).await.unwrap();
    // Released more often than the attempt limit: still granted, first in line.
    for _ in 0..5 {
        let l = s.lease("w", POLICY).await.unwrap().unwrap();
        assert_eq!(l.task.index, 0, "a released task is next in line");
        assert_eq!(s.fail(&l.lease_id, Failure::released("stopping"), POLICY).await.unwrap(), LeaseState::Held);
        // The released lease is gone: its holder is told so.
        assert_eq!(s.renew(&l.lease_id, POLICY).await.unwrap(), LeaseState::Lost);
    }
    assert_eq!(s.counters().await.unwrap().failures, 0, "a release is not a failure");
    // Real attempts still count: a failure, an expiry, then a failure fails the job.
    let l = s.lease("w", POLICY).await.unwrap().unwrap();
    assert_eq!(l.task.index, 0);
    s.fail(&l.lease_id, Failure::new(true, "oom"), POLICY).await.unwrap();
    let l = s.lease("w", POLICY).await.unwrap().unwrap();
    assert_eq!(l.task.index, 1);
    s.complete(&l.lease_id).await.unwrap();
    let l = s.lease("w", POLICY).await.unwrap().unwrap();
    assert_eq!(l.task.index, 0);
    t.pass(POLICY.ttl_ms + 1).await;
    let again = s.lease("w", POLICY).await.unwrap().unwrap(); // the lease on task 0 expired
    assert_eq!(again.task.index, 0);
    assert_eq!(s.job(&job).await.unwrap().state, JobState::Running, "two of three attempts used");
    s.fail(&again.lease_id, Failure::new(true, "oom"), POLICY).await.unwrap();
    match s.job(&job).await.unwrap().state {
        JobState::Failed { message } => assert!(message.contains("after 3 attempts"), "{message}"),
        other => panic!("the job should have failed, is {other:?}"),
    }
}

/// A lease id names its task and attempt, which anyone can guess; only its secret makes it
/// the holder's. A forged one (right job, index and attempt, wrong secret) gets the answer
/// of a lost lease and changes nothing.
async fn a_forged_lease_id_cannot_renew_complete_or_fail_the_task(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let held = s.lease("w1", POLICY).await.unwrap().unwrap();
    let forged = LeaseId::new(&id, held.task.index, held.attempt, LeaseSecret::random());
    assert_ne!(forged, held.lease_id);
    assert_eq!(s.renew(&forged, POLICY).await.unwrap(), LeaseState::Lost);
    assert_eq!(s.complete(&forged).await.unwrap(), super::Completion { lease: LeaseState::Lost, job_done: false });
    assert_eq!(s.fail(&forged, Failure::new(false, "forged"), POLICY).await.unwrap(), LeaseState::Lost);
    assert_eq!(s.fail(&forged, Failure::new(true, "forged"), POLICY).await.unwrap(), LeaseState::Lost);
    let status = s.job(&id).await.unwrap();
    assert_eq!((status.state, status.tasks_done), (JobState::Running, 0), "the job is untouched");
    assert_eq!(s.counters().await.unwrap().failures, 0, "no failure was recorded");
    // The holder still has its lease, its attempt unspent, and finishes the job.
    assert_eq!(s.renew(&held.lease_id, POLICY).await.unwrap(), LeaseState::Held);
    assert!(s.complete(&held.lease_id).await.unwrap().job_done);
}

/// The ids of a page of jobs and where the next one starts.
async fn page(s: &dyn StateStore, before: Option<JobCursor>, limit: usize) -> (Vec<JobId>, Option<JobCursor>) {
    let page = s.jobs_page(before, limit).await.unwrap();
    (page.jobs.into_iter().map(|(_, j)| j.id).collect(), page.next)
}

async fn jobs_are_listed_newest_first_a_page_at_a_time(s: &dyn StateStore) {
    assert_eq!(page(s, None, 10).await, (vec![], None));
    let mut ids = Vec::new();
    for t in 0..5 {
        ids.push(s.create_job(spec(), tasks(1), 0, t).await.unwrap());
    }
    let (first, next) = page(s, None, 2).await;
    assert_eq!(first, vec![ids[4].clone(), ids[3].clone()]);
    // A job submitted between two pages neither repeats a job nor skips one.
    let newest = s.create_job(spec(), tasks(1), 0, 5).await.unwrap();
    let (second, next) = page(s, Some(next.expect("more after the first page")), 2).await;
    assert_eq!(second, vec![ids[2].clone(), ids[1].clone()]);
    let (last, next) = page(s, Some(next.expect("more after the second page")), 2).await;
    assert_eq!((last, next), (vec![ids[0].clone()], None), "the last page says so");
    let (exact, next) = page(s, None, 6).await;
    assert_eq!((exact.len(), next), (6, None), "a page that ends with the oldest job is the last");
    assert_eq!(exact[0], newest);
    let all: Vec<JobId> = s.jobs().await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(all, exact);
}

async fn jobs_that_ended_longer_ago_than_the_retention_expire(s: &dyn StateStore, t: &Time) {
    const RETENTION: u64 = 10_000;
    let indexing = s.create_job(spec(), vec![], 0, 0).await.unwrap();
    let succeeded = s.create_job(spec(), vec![], 0, 0).await.unwrap();
    s.finish(&succeeded, JobState::Succeeded, 0, 100).await.unwrap();
    let cancelled = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    assert!(s.cancel(&cancelled, 200).await.unwrap());
    // A job that fails by losing its leases ends when the last expiry is reclaimed, by
    // the store's clock.
    let lost = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    for _ in 0..=POLICY.max_attempts {
        while let Some(l) = s.lease("w", POLICY).await.unwrap() {
            assert_eq!(l.task.job_id, lost, "the only runnable task");
        }
        t.pass(POLICY.ttl_ms + 1).await;
    }
    assert!(matches!(s.job(&lost).await.unwrap().state, JobState::Failed { .. }));
    let running = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();

    assert_eq!(s.expire_jobs(100 + RETENTION - 1, RETENTION).await.unwrap(), 0, "nothing is old enough yet");
    assert_eq!(s.expire_jobs(100 + RETENTION, RETENTION).await.unwrap(), 1);
    assert!(matches!(s.job(&succeeded).await, Err(StateError::NoSuchJob(_))));
    assert_eq!(s.expire_jobs(u64::MAX / 2, RETENTION).await.unwrap(), 2, "the cancelled and the failed job");
    let listed: Vec<JobId> = s.jobs().await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(listed, vec![running.clone(), indexing.clone()], "jobs that have not ended never expire");
    assert_eq!(s.expire_jobs(u64::MAX, RETENTION).await.unwrap(), 0);
    assert_eq!(s.job(&running).await.unwrap().state, JobState::Running);
    assert_eq!(s.job(&indexing).await.unwrap().state, JobState::Indexing);
    // An expired job's ids stay used: the next job gets a new one.
    let next = s.create_job(spec(), vec![], 0, 0).await.unwrap();
    assert!(![&running, &indexing, &succeeded, &cancelled, &lost].contains(&&next));
}

/// `before` is the store of a coordinator before its restart (a memory store) or an earlier
/// Redis; `after` the fresh one, given the same job. Its first job must get another id,
/// or the atlas's partials and a stale worker's lease would mix the two jobs.
async fn a_fresh_store_never_repeats_a_job_id_nor_honours_an_earlier_stores_lease(before: &dyn StateStore, after: &dyn StateStore) {
    let old_job = before.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let stale = before.lease("w1", POLICY).await.unwrap().unwrap();
    let new_job = after.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    assert_ne!(old_job, new_job, "a fresh store repeated a job id");
    let current = after.lease("w2", POLICY).await.unwrap().unwrap();
    assert_eq!(after.renew(&stale.lease_id, POLICY).await.unwrap(), LeaseState::Lost);
    let refused = after.complete(&stale.lease_id).await.unwrap();
    assert_eq!((refused.lease, refused.job_done), (LeaseState::Lost, false), "a stale worker completed the new job's task");
    // The same lease id with the new job's name (what a repeated id would have been) is
    // refused too: its secret was drawn by the other store.
    let renamed = LeaseId::new(&new_job, stale.lease_id.index(), stale.lease_id.attempt(), LeaseSecret::random());
    assert_eq!(after.complete(&renamed).await.unwrap().lease, LeaseState::Lost);
    let st = after.job(&new_job).await.unwrap();
    assert_eq!((st.state, st.tasks_done), (JobState::Running, 0));
    assert!(after.complete(&current.lease_id).await.unwrap().job_done);
}

async fn the_jobs_indexing_are_listed_until_they_end(s: &dyn StateStore) {
    let sorted = |mut ids: Vec<JobId>| {
        ids.sort();
        ids
    };
    let running = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let nothing_to_do = s.create_job(spec(), vec![], 0, 0).await.unwrap();
    let cancelled = s.create_job(spec(), vec![], 0, 0).await.unwrap();
    assert_eq!(sorted(s.indexing_jobs().await.unwrap()), sorted(vec![nothing_to_do.clone(), cancelled.clone()]));
    let l = s.lease("w", POLICY).await.unwrap().unwrap();
    assert!(s.complete(&l.lease_id).await.unwrap().job_done);
    assert_eq!(sorted(s.indexing_jobs().await.unwrap()), sorted(vec![running.clone(), nothing_to_do.clone(), cancelled.clone()]));
    assert!(s.cancel(&cancelled, 2).await.unwrap());
    s.finish(&nothing_to_do, JobState::Failed { message: "the index".into() }, 0, 2).await.unwrap();
    assert_eq!(s.indexing_jobs().await.unwrap(), vec![running.clone()]);
    s.finish(&running, JobState::Succeeded, 0, 3).await.unwrap();
    s.finish(&running, JobState::Succeeded, 0, 4).await.expect("a second finish (another coordinator's) is harmless");
    assert_eq!(s.job(&running).await.unwrap().state, JobState::Succeeded);
    assert!(s.indexing_jobs().await.unwrap().is_empty());
}
