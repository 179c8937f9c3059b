//! Monitoring: the Prometheus metrics and readiness that `loupe-coordinator` serves on
//! its metrics port, and the gRPC health of its services.
//!
//! Everything is read from the state store at scrape time, so with several coordinators
//! on one Redis each reports the cluster's numbers (aggregate with `max`, not `sum`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::warn;

use loupe_core::job::JobState;
use loupe_metrics::{Exposition, Kind, Probe};

use crate::Coordinator;

/// How often the gRPC health of the Jobs and Workers services is brought up to date.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

pub struct Monitor(pub Arc<Coordinator>);

const JOB_STATES: [&str; 5] = ["running", "indexing", "succeeded", "failed", "cancelled"];

fn state_name(s: &JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Indexing => "indexing",
        JobState::Succeeded => "succeeded",
        JobState::Failed { .. } => "failed",
        JobState::Cancelled => "cancelled",
    }
}

#[async_trait]
impl Probe for Monitor {
    async fn metrics(&self) -> Exposition {
        let state = &self.0.state;
        let mut e = Exposition::new();
        let (jobs, counters) = match (state.jobs().await, state.counters().await) {
            (Ok(jobs), Ok(counters)) => (jobs, counters),
            (Err(err), _) | (_, Err(err)) => {
                warn!(error = %err, "reading the state store for metrics failed");
                e.single("loupe_state_store_up", Kind::Gauge, "1 when the state store answers.", 0.0);
                return e;
            }
        };
        e.single("loupe_state_store_up", Kind::Gauge, "1 when the state store answers.", 1.0);

        e.family("loupe_jobs", Kind::Gauge, "Jobs by state.");
        for name in JOB_STATES {
            let n = jobs.iter().filter(|j| state_name(&j.state) == name).count();
            e.sample("loupe_jobs", &[("state", name)], n as f64);
        }

        // Over running jobs: `waiting` are tasks behind a prerequisite (a reduce behind
        // its maps); what is neither done, queued nor leased.
        let running = jobs.iter().filter(|j| j.state == JobState::Running);
        let (total, done) = running.fold((0u64, 0u64), |(t, d), j| (t + j.tasks_total as u64, d + j.tasks_done as u64));
        let waiting = total.saturating_sub(done + counters.queued + counters.leased);
        e.family("loupe_tasks", Kind::Gauge, "Tasks of running jobs by state (queued is the queue depth workers drain).");
        for (name, n) in [("waiting", waiting), ("queued", counters.queued), ("leased", counters.leased), ("done", done)] {
            e.sample("loupe_tasks", &[("state", name)], n as f64);
        }

        e.single("loupe_lease_expiries_total", Kind::Counter, "Leases that ran out without being renewed.", counters.lease_expiries as f64);
        e.single("loupe_task_retries_total", Kind::Counter, "Tasks put back in line after an expired lease or a retryable failure.", counters.retries as f64);
        e.single("loupe_task_failures_total", Kind::Counter, "Failures reported by workers, retryable or not.", counters.failures as f64);
        e.single("loupe_units_rendered_total", Kind::Counter, "Images (unit x technique) of completed render tasks; rate() gives units per second.", counters.images_rendered as f64);
        e
    }

    async fn ready(&self) -> Result<(), String> {
        self.0.state.ping().await.map_err(|e| e.to_string())
    }
}

/// Keeps the gRPC health of `loupe.v1.Jobs` and `loupe.v1.Workers` at SERVING while the
/// state store answers and NOT_SERVING while it does not (readiness probes ask for them);
/// the overall service `""` stays SERVING while the process runs (liveness).
pub async fn keep_health(coordinator: Arc<Coordinator>, reporter: HealthReporter) {
    let mut last = None;
    loop {
        let up = coordinator.state.ping().await;
        if last != Some(up.is_ok()) {
            if let Err(e) = &up {
                warn!(error = %e, "the state store does not answer: not ready");
            }
            set_health(&reporter, if up.is_ok() { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
            last = Some(up.is_ok());
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// Sets the gRPC health of both services that depend on the state store.
pub async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    use loupe_proto::v1::{jobs_server::JobsServer, workers_server::WorkersServer};
    reporter.set_service_status(<JobsServer<crate::server::JobsApi> as tonic::server::NamedService>::NAME, status).await;
    reporter.set_service_status(<WorkersServer<crate::server::WorkersApi> as tonic::server::NamedService>::NAME, status).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RedisStateStore;
    use crate::{server, CoordinatorConfig};
    use loupe_testsupport::RedisServer;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    async fn health(port: u16, service: &str) -> ServingStatus {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap();
        let mut client = HealthClient::new(channel);
        let r = client.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        ServingStatus::try_from(r.status).unwrap()
    }

    /// Waits (polling, within a deadline) until `service` reports `want`. The deadline is
    /// generous: a loaded machine may take several health intervals, and a Redis that was
    /// just killed can take its client's timeouts to be noticed.
    async fn until(port: u16, service: &str, want: ServingStatus) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while health(port, service).await != want {
            assert!(tokio::time::Instant::now() < deadline, "{service} never became {want:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the chart's gRPC probes ask: `""` for liveness, `loupe.v1.Jobs` for readiness.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_services_are_not_serving_while_redis_is_down_and_the_process_stays_live() {
        let redis = RedisServer::start();
        let state = Arc::new(RedisStateStore::connect(&redis.url()).await.unwrap());
        let coordinator = Arc::new(Coordinator::new(state, CoordinatorConfig::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(server::serve(listener, coordinator, server::ServeOptions::default(), std::future::pending()));
        until(port, "loupe.v1.Jobs", ServingStatus::Serving).await;
        assert_eq!(health(port, "loupe.v1.Workers").await, ServingStatus::Serving);

        let mut redis = tokio::task::spawn_blocking(move || {
            let mut redis = redis;
            redis.kill();
            redis
        })
        .await
        .unwrap();
        until(port, "loupe.v1.Jobs", ServingStatus::NotServing).await;
        assert_eq!(health(port, "loupe.v1.Workers").await, ServingStatus::NotServing);
        assert_eq!(health(port, "").await, ServingStatus::Serving, "liveness does not depend on Redis");

        redis = tokio::task::spawn_blocking(move || {
            redis.start_again();
            redis
        })
        .await
        .unwrap();
        until(port, "loupe.v1.Jobs", ServingStatus::Serving).await;
        drop(redis);
    }
}
