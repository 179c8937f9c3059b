//! The job commands against a cluster's coordinator: submit, watch, status, jobs, cancel.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use loupe_core::job::{JobId, JobState, JobStatus};
use loupe_proto::v1;
use loupe_proto::v1::jobs_client::JobsClient;
use loupe_worker::client::{channel, BearerToken, TlsOptions};

use crate::job::{job_spec, JobArgs, Progress};

#[derive(Args, Debug)]
pub struct Connection {
    /// The coordinator's gRPC URL, e.g. http://coordinator:7600.
    #[arg(long, env = "LOUPE_COORDINATOR")]
    pub coordinator: String,
    /// File holding the bearer token.
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

type Client = JobsClient<InterceptedService<Channel, BearerToken>>;

fn client(conn: &Connection) -> Result<Client> {
    let token = conn.token_file.as_deref().map(loupe_core::read_token_file).transpose()?;
    let token = BearerToken::new(token.as_deref()).map_err(|e| anyhow!(e))?;
    let tls = TlsOptions { ca: conn.tls_ca.clone(), domain: conn.tls_domain.clone() };
    Ok(JobsClient::with_interceptor(channel(&conn.coordinator, &tls).map_err(|e| anyhow!(e))?, token))
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
    let mut c = client(&args.conn)?;
    let resp = c.submit(v1::SubmitRequest { spec: Some((&spec).into()) }).await.map_err(|s| refused("submit refused", s))?;
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
    format!("{} {state}: {done}/{} units, {}/{} tasks", s.id, s.images_total, s.tasks_done, s.tasks_total)
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

pub async fn jobs(conn: Connection) -> Result<ExitCode> {
    let mut c = client(&conn)?;
    let jobs = c.list(v1::ListJobsRequest {}).await.map_err(|s| refused("listing jobs refused", s))?.into_inner().jobs;
    for j in jobs {
        let s = status_of(j)?;
        println!("{}  out {}", describe(&s), s.spec.out);
    }
    Ok(ExitCode::SUCCESS)
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
