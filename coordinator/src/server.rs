//! The gRPC face of the coordinator: the Jobs service for people and tools, the Workers
//! service for workers, the standard health service, and bearer-token auth.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::info;

use loupe_core::job::JobId;
use loupe_core::spec::JobSpec;
use loupe_core::task::Failure;
use loupe_proto::v1::jobs_server::{Jobs, JobsServer};
use loupe_proto::v1::workers_server::{Workers, WorkersServer};
use loupe_proto::{v1, PROTOCOL_VERSION};

use crate::state::StateError;
use crate::{Coordinator, Error};

/// How often a watch stream looks for progress to send.
const WATCH_POLL: Duration = Duration::from_millis(200);

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match &e {
            Error::Invalid(_) | Error::Model(_) | Error::Dataset(_) => Status::invalid_argument(e.to_string()),
            Error::Conflict(_) => Status::failed_precondition(e.to_string()),
            Error::State(StateError::NoSuchJob(_)) => Status::not_found(e.to_string()),
            Error::State(StateError::Backend(_)) => Status::unavailable(e.to_string()),
            Error::State(StateError::InvalidTasks(_)) => Status::internal(e.to_string()),
        }
    }
}

fn state_status(e: StateError) -> Status {
    Error::State(e).into()
}

fn check_version(v: u32) -> Result<(), Status> {
    if v != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "worker speaks protocol version {v}, this coordinator speaks {PROTOCOL_VERSION}; run matching versions"
        )));
    }
    Ok(())
}

pub struct JobsApi(pub Arc<Coordinator>);

#[tonic::async_trait]
impl Jobs for JobsApi {
    async fn submit(&self, req: Request<v1::SubmitRequest>) -> Result<Response<v1::SubmitResponse>, Status> {
        let spec = req.into_inner().spec.ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let spec = JobSpec::try_from(spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let job_id = self.0.submit(spec).await?;
        Ok(Response::new(v1::SubmitResponse { job_id: job_id.into() }))
    }

    async fn get(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::JobStatus>, Status> {
        let status = self.0.status(&parse_id(&req.into_inner().job_id)?).await?;
        Ok(Response::new((&status).into()))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::JobStatus, Status>> + Send>>;

    async fn watch(&self, req: Request<v1::GetJobRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let job_id: JobId = parse_id(&req.into_inner().job_id)?;
        let first = self.0.status(&job_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let coordinator = self.0.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut status = Ok(first);
            loop {
                let s = match status {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let key = (s.state.clone(), s.images_done, s.tasks_done);
                if last.as_ref() != Some(&key) {
                    // A client that went away fails the send; stop watching for it.
                    if tx.send(Ok(v1::JobStatus::from(&s))).await.is_err() {
                        return;
                    }
                    last = Some(key);
                }
                if s.state.is_terminal() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = tx.closed() => return,
                }
                status = coordinator.status(&job_id).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list(&self, _req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        let jobs = self.0.jobs().await?;
        Ok(Response::new(v1::ListJobsResponse { jobs: jobs.iter().map(Into::into).collect() }))
    }

    async fn cancel(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::CancelJobResponse>, Status> {
        let job_id: JobId = parse_id(&req.into_inner().job_id)?;
        let cancelled = self.0.cancel(&job_id).await?;
        info!(job_id = job_id.as_str(), cancelled, "cancel requested");
        Ok(Response::new(v1::CancelJobResponse { cancelled }))
    }
}

pub struct WorkersApi(pub Arc<Coordinator>);

fn lease_state(s: loupe_core::task::LeaseState) -> Response<v1::LeaseStateResponse> {
    Response::new(v1::LeaseStateResponse { state: v1::LeaseState::from(s) as i32 })
}

#[tonic::async_trait]
impl Workers for WorkersApi {
    async fn lease(&self, req: Request<v1::LeaseRequest>) -> Result<Response<v1::LeaseResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let lease = self.0.lease_for(&req.worker).await.map_err(state_status)?;
        Ok(Response::new(v1::LeaseResponse { lease: lease.as_ref().map(Into::into) }))
    }

    async fn renew(&self, req: Request<v1::LeaseRef>) -> Result<Response<v1::LeaseStateResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        Ok(lease_state(self.0.renew_lease(&parse_id(&req.lease_id)?).await.map_err(state_status)?))
    }

    async fn complete(&self, req: Request<v1::LeaseRef>) -> Result<Response<v1::LeaseStateResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        Ok(lease_state(self.0.complete_lease(&parse_id(&req.lease_id)?).await?))
    }

    async fn fail(&self, req: Request<v1::FailRequest>) -> Result<Response<v1::LeaseStateResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let failure = Failure { retryable: req.retryable, message: req.message, released: req.released };
        Ok(lease_state(self.0.fail_lease(&parse_id(&req.lease_id)?, failure).await.map_err(state_status)?))
    }
}

/// A job or lease id from the wire; a malformed one is refused here, naming the problem.
fn parse_id<T: std::str::FromStr<Err = loupe_core::Error>>(id: &str) -> Result<T, Status> {
    id.parse().map_err(|e: loupe_core::Error| Status::invalid_argument(e.to_string()))
}

/// Checks `authorization: Bearer <token>` on every call. The token is compared in
/// constant time and never logged.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<str>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> Self {
        BearerAuth { expected: token.map(Into::into) }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else { return Ok(req) };
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated("a bearer token is required")),
        }
    }
}

/// How the gRPC server is reached: the bearer token every call must carry, and the TLS
/// identity (certificate chain and key, PEM) when it serves TLS.
#[derive(Default)]
pub struct ServeOptions {
    pub token: Option<String>,
    pub tls: Option<tonic::transport::Identity>,
}

/// Serves the coordinator on `listener` until `shutdown` resolves. The health service
/// answers without a token, so that Kubernetes probes can use it; the Jobs and Workers
/// services are reported SERVING only while the state store answers
/// ([`crate::monitor::keep_health`]).
pub async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Registered before the first request can arrive: until the state store has
    // answered, a readiness probe reads NOT_SERVING, not "service not registered".
    crate::monitor::set_health(&health, tonic_health::ServingStatus::NotServing).await;
    let health_task = tokio::spawn(crate::monitor::keep_health(coordinator.clone(), health));
    let auth = BearerAuth::new(options.token);
    // Small request/response RPCs: without TCP_NODELAY, Nagle's algorithm and delayed
    // ACKs add tens of milliseconds to each one.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = options.tls {
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let served = builder
        .add_service(health_service)
        .add_service(JobsServer::with_interceptor(JobsApi(coordinator.clone()), auth.clone()))
        .add_service(WorkersServer::with_interceptor(WorkersApi(coordinator), auth))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    health_task.abort();
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn another_protocol_version_is_refused_with_a_clear_status() {
        assert!(check_version(PROTOCOL_VERSION).is_ok());
        let s = check_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("protocol version"), "{}", s.message());
    }

    #[test]
    fn the_bearer_token_must_match() {
        let mut auth = BearerAuth::new(Some("t0k".into()));
        let with = |v: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = v {
                r.metadata_mut().insert("authorization", v.parse().unwrap());
            }
            r
        };
        assert!(auth.call(with(Some("Bearer t0k"))).is_ok());
        assert_eq!(auth.call(with(Some("Bearer t0x"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.call(with(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(BearerAuth::new(None).call(with(None)).is_ok(), "no token configured, no check");
    }
}
