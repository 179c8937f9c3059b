//! The behaviour every [`StateStore`] backend must show. Time is passed in, so expiry is
//! tested without sleeping.

use loupe_core::spec::{JobSpec, LayerInfo, LayerPlan, ModelRef, RenderSettings, Technique};
use loupe_core::task::{Failure, LeaseState, TaskSpec};

use super::{JobState, LeasePolicy, StateStore};

const POLICY: LeasePolicy = LeasePolicy { ttl_ms: 1_000, max_attempts: 3 };

fn spec() -> JobSpec {
    JobSpec {
        model: ModelRef { uri: "m.pt".into(), name: "m".into(), sha256: "00".into() },
        layers: vec![LayerPlan { layer: LayerInfo { name: "conv".into(), shape: vec![4, 8, 8] }, units: vec![0, 1, 2, 3] }],
        techniques: vec![Technique::Channel],
        settings: RenderSettings { steps: 4, size: 16, input_size: 16, seed: 0, learning_rate: 0.05 },
        batch: 2,
        out: "out".into(),
    }
}

fn tasks(n: u32) -> Vec<TaskSpec> {
    (0..n)
        .map(|i| TaskSpec { job_id: String::new(), index: i, layer: "conv".into(), technique: Technique::Channel, units: vec![2 * i, 2 * i + 1] })
        .collect()
}

pub async fn run_all(make: impl Fn() -> Box<dyn StateStore>) {
    run_all_async(|| std::future::ready(make())).await;
}

/// [`run_all`] for backends whose stores are made asynchronously (each case gets a fresh,
/// empty store).
pub async fn run_all_async<F: std::future::Future<Output = Box<dyn StateStore>>>(make: impl Fn() -> F) {
    each_task_is_leased_once_and_the_last_completion_ends_the_job(make().await.as_ref()).await;
    an_expired_lease_is_granted_again_and_the_stale_holder_is_refused(make().await.as_ref()).await;
    a_task_that_keeps_losing_its_lease_fails_the_job(make().await.as_ref()).await;
    retryable_failures_are_retried_up_to_the_limit(make().await.as_ref()).await;
    a_permanent_failure_fails_the_job_at_once(make().await.as_ref()).await;
    a_cancelled_job_stops_its_workers_and_leases_nothing(make().await.as_ref()).await;
    a_job_with_nothing_to_render_goes_straight_to_indexing(make().await.as_ref()).await;
}

async fn each_task_is_leased_once_and_the_last_completion_ends_the_job(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(2), 0, 0).await.unwrap();
    let a = s.lease("w1", 0, POLICY).await.unwrap().unwrap();
    let b = s.lease("w2", 0, POLICY).await.unwrap().unwrap();
    assert_ne!(a.task.index, b.task.index);
    assert_eq!((a.attempt, a.task.job_id.as_str()), (1, id.as_str()));
    assert!(s.lease("w3", 0, POLICY).await.unwrap().is_none(), "both tasks are held");
    let first = s.complete(&a.lease_id, 1).await.unwrap();
    assert_eq!((first.lease, first.job_done), (LeaseState::Held, false));
    let last = s.complete(&b.lease_id, 1).await.unwrap();
    assert!(last.job_done);
    let st = s.job(&id).await.unwrap();
    assert_eq!((st.state.clone(), st.tasks_done, st.images_done), (JobState::Indexing, 2, 4));
    s.finish(&id, JobState::Succeeded).await.unwrap();
    assert_eq!(s.job(&id).await.unwrap().state, JobState::Succeeded);
    assert_eq!(s.jobs().await.unwrap().len(), 1);
}

async fn an_expired_lease_is_granted_again_and_the_stale_holder_is_refused(s: &dyn StateStore) {
    s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let first = s.lease("w1", 0, POLICY).await.unwrap().unwrap();
    // Renewed in time, the lease holds past its first deadline.
    assert_eq!(s.renew(&first.lease_id, 900, POLICY).await.unwrap(), LeaseState::Held);
    assert!(s.lease("w2", 1_500, POLICY).await.unwrap().is_none());
    // Not renewed again, it expires and the task goes to another worker.
    let second = s.lease("w2", 1_901, POLICY).await.unwrap().expect("expired task is leased again");
    assert_eq!((second.task.index, second.attempt), (first.task.index, 2));
    assert_eq!(s.renew(&first.lease_id, 1_902, POLICY).await.unwrap(), LeaseState::Lost);
    let stale = s.complete(&first.lease_id, 1_903).await.unwrap();
    assert_eq!((stale.lease, stale.job_done), (LeaseState::Lost, false), "a stale completion is refused");
    assert!(s.complete(&second.lease_id, 1_904).await.unwrap().job_done);
}

async fn a_task_that_keeps_losing_its_lease_fails_the_job(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let mut now = 0;
    for attempt in 1..=POLICY.max_attempts {
        let l = s.lease("w", now, POLICY).await.unwrap().unwrap();
        assert_eq!(l.attempt, attempt);
        now += POLICY.ttl_ms + 1;
    }
    assert!(s.lease("w", now, POLICY).await.unwrap().is_none());
    match s.job(&id).await.unwrap().state {
        JobState::Failed { message } => assert!(message.contains("lost its lease 3 times"), "{message}"),
        other => panic!("expected failure, got {other:?}"),
    }
}

async fn retryable_failures_are_retried_up_to_the_limit(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(1), 0, 0).await.unwrap();
    let transient = Failure { retryable: true, message: "store timed out".into() };
    for attempt in 1..=POLICY.max_attempts {
        let l = s.lease("w", 0, POLICY).await.unwrap().expect("retried");
        assert_eq!(l.attempt, attempt);
        s.fail(&l.lease_id, transient.clone(), 0, POLICY).await.unwrap();
    }
    assert!(s.lease("w", 0, POLICY).await.unwrap().is_none());
    match s.job(&id).await.unwrap().state {
        JobState::Failed { message } => assert!(message.contains("store timed out") && message.contains("3 attempts"), "{message}"),
        other => panic!("expected failure, got {other:?}"),
    }
}

async fn a_permanent_failure_fails_the_job_at_once(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(2), 0, 0).await.unwrap();
    let a = s.lease("w1", 0, POLICY).await.unwrap().unwrap();
    let b = s.lease("w2", 0, POLICY).await.unwrap().unwrap();
    let bad = Failure { retryable: false, message: "unknown layer \"conv9\"".into() };
    s.fail(&a.lease_id, bad, 0, POLICY).await.unwrap();
    match s.job(&id).await.unwrap().state {
        JobState::Failed { message } => assert!(message.contains("unknown layer"), "{message}"),
        other => panic!("expected failure, got {other:?}"),
    }
    assert_eq!(s.renew(&b.lease_id, 1, POLICY).await.unwrap(), LeaseState::Lost, "the other task's worker is told to stop");
    assert!(s.lease("w3", 0, POLICY).await.unwrap().is_none());
}

async fn a_cancelled_job_stops_its_workers_and_leases_nothing(s: &dyn StateStore) {
    let id = s.create_job(spec(), tasks(2), 0, 0).await.unwrap();
    let a = s.lease("w1", 0, POLICY).await.unwrap().unwrap();
    assert!(s.cancel(&id).await.unwrap());
    assert_eq!(s.renew(&a.lease_id, 1, POLICY).await.unwrap(), LeaseState::Cancelled);
    assert!(s.lease("w2", 1, POLICY).await.unwrap().is_none());
    assert_eq!(s.complete(&a.lease_id, 2).await.unwrap().lease, LeaseState::Cancelled);
    assert_eq!(s.job(&id).await.unwrap().state, JobState::Cancelled);
    assert!(!s.cancel(&id).await.unwrap(), "cancelling twice reports it had ended");
}

async fn a_job_with_nothing_to_render_goes_straight_to_indexing(s: &dyn StateStore) {
    let id = s.create_job(spec(), vec![], 4, 0).await.unwrap();
    let st = s.job(&id).await.unwrap();
    assert_eq!((st.state, st.images_skipped, st.images_total), (JobState::Indexing, 4, 4));
}
