//! The job commands against a cluster's coordinator: submit, watch, status, jobs, cancel.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use loupe_core::job::{JobId, JobState, JobStatus};
use loupe_proto::{v1, MAX_MESSAGE_BYTES};
use loupe_proto::v1::jobs_client::JobsClient;
use loupe_worker::client::{channel, BearerToken, TlsOptions};

use crate::job::{job_spec, JobArgs, Progress};

#[derive(Args, Debug)]
pub struct Connection {
    /// The coordinator's gRPC URL, e.g. http://coordinator:7600.
    #[arg(long, env = "LOUPE_COORDINATOR")]
    pub coordinator: String,
    /// File holding the user token (the coordinator's --user-token-file); the worker
    /// token does not open the Jobs service.
    #[arg(long, env = "LOUPE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM bundle of the CAs that sign an https:// coordinator's certificate.
    #[arg(long, env = "LOUPE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate carries, when not the URL's host (e.g.
    /// through `kubectl port-forward` to localhost).
    #[arg(long, env = "LOUPE_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Where the atlas goes: s3://bucket/prefix, or a directory every worker shares (or
    /// `out` in the job file).
    #[arg(long)]
    pub out: Option<String>,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(Args, Debug)]
pub struct JobRef {
    /// The job id `submit` printed.
    // Parsed by clap, so a malformed id is refused before any call.
    pub job: JobId,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Show at most this many jobs, newest first.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    #[command(flatten)]
    pub conn: Connection,
}

type Client = JobsClient<InterceptedService<Channel, BearerToken>>;

fn client(conn: &Connection) -> Result<Client> {
    let token = conn.token_file.as_deref().map(loupe_core::read_token_file).transpose()?;
    let token = BearerToken::new(token.as_deref()).map_err(|e| anyhow!(e))?;
    let tls = TlsOptions { ca: conn.tls_ca.clone(), domain: conn.tls_domain.clone() };
    let client = JobsClient::with_interceptor(channel(&conn.coordinator, &tls).map_err(|e| anyhow!(e))?, token);
    Ok(client.max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The coordinator's refusal, as the user should read it.
fn refused(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!("{what}: {} ({:?})", s.message(), s.code())
}

fn status_of(s: v1::JobStatus) -> Result<JobStatus> {
    JobStatus::try_from(s).map_err(|e| anyhow!("a malformed job status: {e}"))
}

pub async fn submit(args: SubmitArgs) -> Result<ExitCode> {
    // Cluster workers are GPUs: large tasks, which each worker splits to fit its memory.
    let spec = job_spec(&args.job, args.out.as_deref(), tch::Device::Cpu, 512).await?;
    let req = v1::SubmitRequest { spec: Some((&spec).into()) };
    loupe_proto::check_size("job", &req).map_err(|e| anyhow!("submit refused: {e}"))?;
    let mut c = client(&args.conn)?;
    let resp = c.submit(req).await.map_err(|s| refused("submit refused", s))?;
    println!("{}", resp.into_inner().job_id);
    Ok(ExitCode::SUCCESS)
}

/// One line about a job's state, as `status` and `watch` print it.
fn describe(s: &JobStatus) -> String {
    let done = s.images_skipped + s.images_done;
    let state = match &s.state {
        JobState::Failed { message } => format!("failed: {message}"),
        other => format!("{other:?}").to_lowercase(),
    };
    let failed = if s.images_failed > 0 { format!(" ({} failed: their optimisation diverged)", s.images_failed) } else { String::new() };
    format!("{} {state}: {done}/{} units{failed}, {}/{} tasks", s.id, s.images_total, s.tasks_done, s.tasks_total)
}

pub async fn watch(args: JobRef) -> Result<ExitCode> {
    let mut c = client(&args.conn)?;
    let mut stream = c.watch(v1::GetJobRequest { job_id: args.job.to_string() }).await.map_err(|s| refused("watch refused", s))?.into_inner();
    let mut bar: Option<Progress> = None;
    let mut last = None;
    while let Some(msg) = stream.message().await.map_err(|s| refused("the watch stream broke", s))? {
        let s = status_of(msg)?;
        bar.get_or_insert_with(|| Progress::new(&s)).update(&s);
        last = Some(s);
    }
    if let Some(b) = bar {
        b.finish();
    }
    let last = last.context("the coordinator sent no status")?;
    match &last.state {
        JobState::Succeeded => {
            println!("{}", describe(&last));
            Ok(ExitCode::SUCCESS)
        }
        JobState::Failed { message } => bail!("job {} failed: {message}", last.id),
        JobState::Cancelled => bail!("job {} was cancelled", last.id),
        other => bail!("job {} is {other:?}, but the stream ended", last.id),
    }
}

pub async fn status(args: JobRef) -> Result<ExitCode> {
    let mut c = client(&args.conn)?;
    let s = status_of(c.get(v1::GetJobRequest { job_id: args.job.into() }).await.map_err(|s| refused("status refused", s))?.into_inner())?;
    println!("{}", describe(&s));
    println!("  model {} ({})  out {}", s.spec.model.uri, &s.spec.model.sha256[..12.min(s.spec.model.sha256.len())], s.spec.out);
    Ok(ExitCode::SUCCESS)
}

pub async fn jobs(args: JobsArgs) -> Result<ExitCode> {
    let (jobs, more) = newest_jobs(&mut client(&args.conn)?, args.limit).await?;
    for s in &jobs {
        println!("{}  out {}", describe(s), s.spec.out);
    }
    if more {
        eprintln!("(the {} newest jobs; older ones remain: raise --limit)", args.limit);
    }
    Ok(ExitCode::SUCCESS)
}

/// Up to `limit` jobs, newest first, a page of `List` at a time; and whether older ones
/// remain.
async fn newest_jobs(c: &mut Client, limit: u32) -> Result<(Vec<JobStatus>, bool)> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    while jobs.len() < limit as usize {
        let left = limit - jobs.len() as u32;
        let page = c.list(v1::ListJobsRequest { page_size: left, page_token }).await.map_err(|s| refused("listing jobs refused", s))?.into_inner();
        for j in page.jobs.into_iter().take(left as usize) {
            jobs.push(status_of(j)?);
        }
        if page.next_page_token.is_empty() {
            return Ok((jobs, false));
        }
        page_token = page.next_page_token;
    }
    Ok((jobs, true))
}

pub async fn cancel(args: JobRef) -> Result<ExitCode> {
    let mut c = client(&args.conn)?;
    let resp = c.cancel(v1::CancelJobRequest { job_id: args.job.to_string() }).await.map_err(|s| refused("cancel refused", s))?.into_inner();
    if resp.cancelled {
        println!("{} cancelled", args.job);
    } else {
        println!("{} had already ended", args.job);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use loupe_coordinator::state::{MemoryStateStore, NewTask, StateStore};
    use loupe_coordinator::{server, Coordinator, CoordinatorConfig};
    use loupe_core::api::WorkerApi;
    use loupe_core::spec::{DatasetSpec, JobSpec, ModelRef, RenderSettings};
    use loupe_core::task::{ShardSource, Work};
    use loupe_worker::client::GrpcWorkerApi;

    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            model: ModelRef { uri: "m.pt".into(), name: "m".into(), sha256: "00".into() },
            layers: vec![],
            techniques: vec![],
            settings: RenderSettings::default(),
            batch: 1,
            out: "out".into(),
            dataset: None,
        }
    }

    /// A coordinator over `state` on a loopback port, without tokens; its URL.
    async fn served(state: Arc<MemoryStateStore>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let coordinator = Arc::new(Coordinator::new(state, CoordinatorConfig::default()));
        tokio::spawn(server::serve(listener, coordinator, server::ServeOptions::default(), std::future::pending()));
        url
    }

    /// The worker's client receives a lease of the largest map a shard may make, with
    /// keys of 200 bytes: 20 MB, five times tonic's default limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_worker_client_receives_a_map_of_100000_long_keys() {
        let state = Arc::new(MemoryStateStore::new());
        let keys = (0..DatasetSpec::MAX_IMAGES_PER_SHARD).map(|i| format!("{i:0>196}.jpg")).collect();
        let map = Work::Map { shard: 0, source: ShardSource::Images { keys } };
        state.create_job(spec(), vec![NewTask::runnable(map.clone())], 0, 0).await.unwrap();
        let url = served(state).await;
        let worker = GrpcWorkerApi::new(channel(&url, &TlsOptions::default()).unwrap(), BearerToken::new(None).unwrap());
        let lease = worker.lease("w").await.unwrap().expect("the map is leased");
        assert_eq!(lease.task.work, map);
    }

    /// More jobs than the largest page, so a listing takes two.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_pages_through_the_newest_up_to_the_limit() {
        const JOBS: u64 = 1_005;
        let state = Arc::new(MemoryStateStore::new());
        for t in 0..JOBS {
            state.create_job(spec(), vec![], 0, t).await.unwrap();
        }
        let conn = Connection { coordinator: served(state).await, token_file: None, tls_ca: None, tls_domain: None };
        let mut c = client(&conn).unwrap();

        let created = |jobs: &[JobStatus]| jobs.iter().map(|j| j.created_ms).collect::<Vec<_>>();
        let (newest, more) = newest_jobs(&mut c, 1_003).await.unwrap();
        assert_eq!(created(&newest), (2..JOBS).rev().collect::<Vec<_>>(), "newest first, across two pages");
        assert!(more, "two older jobs remain");
        let (all, more) = newest_jobs(&mut c, 2_000).await.unwrap();
        assert_eq!((all.len() as u64, more), (JOBS, false));
        let (exact, more) = newest_jobs(&mut c, JOBS as u32).await.unwrap();
        assert_eq!((exact.len() as u64, more), (JOBS, false), "a listing that ends on the oldest job says no more remain");
    }
}
