//! The coordinator over gRPC, as the worker loop's [`WorkerApi`]. The channel connects
//! lazily and reconnects by itself, so a restarted coordinator is found again.

use async_trait::async_trait;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use loupe_core::api::{ApiError, ApiResult, WorkerApi};
use loupe_core::task::{Failure, Lease, LeaseState};
use loupe_proto::v1::workers_client::WorkersClient;
use loupe_proto::{lease_state_from_i32, v1, PROTOCOL_VERSION};

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| "the token has characters a header cannot carry".to_string()))
            .transpose()
            .map(BearerToken)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub fn channel(url: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| format!("coordinator URL {url:?}: {e}"))?;
    Ok(endpoint.connect_timeout(std::time::Duration::from_secs(5)).connect_lazy())
}

pub struct GrpcWorkerApi {
    client: WorkersClient<InterceptedService<Channel, BearerToken>>,
}

impl GrpcWorkerApi {
    pub fn new(channel: Channel, token: BearerToken) -> Self {
        GrpcWorkerApi { client: WorkersClient::with_interceptor(channel, token) }
    }
}

fn api_error(s: Status) -> ApiError {
    match s.code() {
        Code::FailedPrecondition | Code::Unauthenticated | Code::PermissionDenied => ApiError::Refused(s.message().to_string()),
        _ => ApiError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn state(r: v1::LeaseStateResponse) -> ApiResult<LeaseState> {
    lease_state_from_i32(r.state).map_err(|e| ApiError::Unavailable(e.to_string()))
}

#[async_trait]
impl WorkerApi for GrpcWorkerApi {
    async fn lease(&self, worker: &str) -> ApiResult<Option<Lease>> {
        let req = v1::LeaseRequest { protocol_version: PROTOCOL_VERSION, worker: worker.to_string() };
        let resp = self.client.clone().lease(req).await.map_err(api_error)?.into_inner();
        resp.lease.map(Lease::try_from).transpose().map_err(|e| ApiError::Unavailable(format!("a malformed lease: {e}")))
    }

    async fn renew(&self, lease_id: &str) -> ApiResult<LeaseState> {
        let req = v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string() };
        state(self.client.clone().renew(req).await.map_err(api_error)?.into_inner())
    }

    async fn complete(&self, lease_id: &str) -> ApiResult<LeaseState> {
        let req = v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string() };
        state(self.client.clone().complete(req).await.map_err(api_error)?.into_inner())
    }

    async fn fail(&self, lease_id: &str, failure: Failure) -> ApiResult<LeaseState> {
        let req = v1::FailRequest { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string(), retryable: failure.retryable, message: failure.message };
        state(self.client.clone().fail(req).await.map_err(api_error)?.into_inner())
    }
}
