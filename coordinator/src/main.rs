//! `loupe-coordinator`: the cluster's coordinator, a gRPC server over a state store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tracing::info;

use loupe_coordinator::state::{redacted_url, MemoryStateStore, RedisStateStore, StateStore};
use loupe_coordinator::monitor::Monitor;
use loupe_coordinator::shard::{parse_memory, Limits};
use loupe_coordinator::{server, Coordinator, CoordinatorConfig, INDEX_SWEEP_INTERVAL};
use loupe_core::location::Location;

#[derive(Parser)]
#[command(name = "loupe-coordinator", version, about = "Shards atlas jobs into tasks and leases them to workers")]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "LOUPE_LISTEN", default_value = "0.0.0.0:7600")]
    listen: SocketAddr,
    /// `memory` (lost on restart), `redis://[:PASSWORD@]HOST:PORT/DB`, or `rediss://...`
    /// for Redis over TLS.
    #[arg(long, env = "LOUPE_STATE", default_value = "memory")]
    state: String,
    /// PEM bundle of the CA that signs a `rediss://` Redis's certificate, when not one the
    /// system trusts.
    #[arg(long, env = "LOUPE_REDIS_TLS_CA")]
    redis_tls_ca: Option<PathBuf>,
    /// A lease not renewed within this time goes to another worker.
    #[arg(long, env = "LOUPE_LEASE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Attempts per task (expired leases and retryable failures).
    #[arg(long, env = "LOUPE_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,
    /// File holding the user token: the bearer token of the Jobs service (submit, get,
    /// watch, list, cancel), which people and tools hold.
    #[arg(long, env = "LOUPE_USER_TOKEN_FILE")]
    user_token_file: Option<PathBuf>,
    /// File holding the worker token: the bearer token of the Workers service (lease,
    /// renew, complete, fail), which only workers hold.
    #[arg(long, env = "LOUPE_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// Serve both services without tokens: anyone who can reach the port may submit,
    /// cancel, and complete or fail any task. For a trial on a trusted network only.
    #[arg(long, env = "LOUPE_INSECURE_NO_AUTH", conflicts_with_all = ["user_token_file", "worker_token_file"])]
    insecure_no_auth: bool,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "LOUPE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "LOUPE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Address of the HTTP endpoints /metrics (Prometheus), /healthz and /readyz (workers
    /// default to port 9601, so both run on one machine).
    #[arg(long, env = "LOUPE_METRICS_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], loupe_metrics::COORDINATOR_PORT)))]
    metrics_listen: SocketAddr,
    /// Refuse jobs whose atlas is not under this URI (e.g. s3://bucket/atlases): the
    /// cluster's workers can write only there.
    #[arg(long, env = "LOUPE_OUT_PREFIX")]
    out_prefix: Option<Location>,
    /// Where jobs may read from: a job whose model, dataset or input images are not under
    /// one of these (e.g. s3://bucket/models) is refused. Repeat the flag, or separate
    /// them with commas in the variable. At least one.
    #[arg(long = "input-prefix", env = "LOUPE_INPUT_PREFIX", value_delimiter = ',', required = true)]
    input_prefixes: Vec<Location>,
    /// Let jobs name paths on the coordinator's and workers' filesystems (under a local
    /// --input-prefix, and local atlases). Without it, only s3:// locations.
    #[arg(long, env = "LOUPE_ALLOW_LOCAL_PATHS")]
    allow_local_paths: bool,
    /// How long a job that ended (succeeded, failed, cancelled) stays listed and readable;
    /// then the state store forgets it. A job that has not ended never expires.
    #[arg(long, env = "LOUPE_JOB_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    job_retention: Duration,
    /// Units per job, summed over its layers, with the items of per-layer techniques
    /// (deepdream starts, caricature inputs, directions, per layer); a bigger job is
    /// refused at submit.
    #[arg(long, env = "LOUPE_MAX_UNITS_PER_JOB", default_value_t = Limits::default().max_units)]
    max_units_per_job: u64,
    /// Tasks per job (renders, maps and reduces); a job that needs more is refused.
    #[arg(long, env = "LOUPE_MAX_TASKS_PER_JOB", default_value_t = Limits::default().max_tasks)]
    max_tasks_per_job: u64,
    /// The memory one render task may take on a worker (bytes, or e.g. 12Gi): a job's
    /// batch that does not fit is split into smaller tasks.
    #[arg(long, env = "LOUPE_WORKER_MEMORY", default_value = "12Gi", value_parser = parse_memory)]
    worker_memory: u64,
}

/// Checks the prefixes once at start-up: each must be absolute and free of `..`, and a
/// local one needs --allow-local-paths (otherwise no job could use it).
fn check_prefixes(args: &Args) -> Result<()> {
    let inputs = args.input_prefixes.iter().map(|p| ("--input-prefix", p));
    for (flag, prefix) in inputs.chain(args.out_prefix.iter().map(|p| ("--out-prefix", p))) {
        if let Some(why) = prefix.unplaceable() {
            bail!("{flag} {prefix} {why}");
        }
        if matches!(prefix, Location::Local(_)) && !args.allow_local_paths {
            bail!("{flag} {prefix} is a local path: pass --allow-local-paths as well, or use an s3:// prefix");
        }
    }
    Ok(())
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))?;
    if !pem.starts_with(b"-----BEGIN") && !String::from_utf8_lossy(&pem).contains("-----BEGIN") {
        bail!("the {what} {} is not PEM (no -----BEGIN line)", path.display());
    }
    Ok(pem)
}

/// The user and worker tokens, both or (with --insecure-no-auth) neither: a coordinator
/// never serves one service open by accident.
fn tokens(args: &Args) -> Result<(Option<String>, Option<String>)> {
    let (user, worker) = match (&args.user_token_file, &args.worker_token_file) {
        (Some(user), Some(worker)) => (loupe_core::read_token_file(user)?, loupe_core::read_token_file(worker)?),
        _ if args.insecure_no_auth => return Ok((None, None)),
        _ => bail!(
            "the coordinator needs both --user-token-file and --worker-token-file (LOUPE_USER_TOKEN_FILE, LOUPE_WORKER_TOKEN_FILE), \
             or --insecure-no-auth to let anyone who reaches it submit jobs and report tasks"
        ),
    };
    if user == worker {
        bail!("--user-token-file and --worker-token-file hold the same token: users could then report tasks as workers; give each its own");
    }
    Ok((Some(user), Some(worker)))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOUPE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a container's log (kubectl logs, a
        // log collector) would get the escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if args.max_attempts == 0 {
        bail!("--max-attempts must be at least 1");
    }
    let (user_token, worker_token) = tokens(&args)?;
    check_prefixes(&args)?;
    // tonic's TLS server needs a process-wide rustls provider. Only ring is linked, which
    // rustls would pick by itself; choosing it here keeps that true if a dependency ever
    // turns on a second provider (then neither would be the default).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tonic::transport::Identity::from_pem(read_pem(cert, "TLS certificate")?, read_pem(key, "TLS key")?)),
        _ => None,
    };
    let state: Arc<dyn StateStore> = if args.state == "memory" {
        Arc::new(MemoryStateStore::new())
    } else if args.state.starts_with("redis://") || args.state.starts_with("rediss://") {
        let ca = args.redis_tls_ca.as_deref().map(|path| read_pem(path, "Redis TLS CA")).transpose()?;
        // The store's errors name the URL without its password.
        Arc::new(RedisStateStore::connect_trusting(&args.state, ca.as_deref()).await?)
    } else {
        bail!("--state {:?}: use memory, redis://HOST:PORT/DB or rediss://HOST:PORT/DB", redacted_url(&args.state));
    };
    let config = CoordinatorConfig {
        lease_ttl: args.lease_ttl,
        max_attempts: args.max_attempts,
        out_prefix: args.out_prefix,
        input_prefixes: Some(args.input_prefixes),
        allow_local_paths: args.allow_local_paths,
        job_retention: args.job_retention,
        limits: Limits { max_units: args.max_units_per_job, max_tasks: args.max_tasks_per_job, worker_memory: args.worker_memory },
    };
    let coordinator = Arc::new(Coordinator::new(state, config));
    coordinator.recover().await.context("recovering jobs left by a previous coordinator")?;
    tokio::spawn(coordinator.clone().sweep_indexing(INDEX_SWEEP_INTERVAL));
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen).await.with_context(|| format!("listening on {} (--metrics-listen)", args.metrics_listen))?;
    info!(
        listen = %listener.local_addr()?, metrics = %metrics.local_addr()?,
        state = %redacted_url(&args.state), auth = user_token.is_some(), tls = tls.is_some(),
        "coordinator serving"
    );
    tokio::spawn(loupe_metrics::serve(metrics, Arc::new(Monitor::new(coordinator.clone())), std::future::pending()));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        info!("shutting down");
    };
    server::serve(listener, coordinator, server::ServeOptions { user_token, worker_token, tls }, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(extra: &[&str]) -> Result<Args> {
        let args = Args::try_parse_from([&["loupe-coordinator", "--insecure-no-auth"][..], extra].concat())?;
        check_prefixes(&args)?;
        Ok(args)
    }

    #[test]
    fn input_prefixes_are_required_and_a_local_one_needs_allow_local_paths() {
        let args = parsed(&["--input-prefix", "s3://models/shared", "--input-prefix", "s3://datasets"]).unwrap();
        assert_eq!(args.input_prefixes.len(), 2);
        assert!(!args.allow_local_paths);
        assert!(parsed(&["--input-prefix", "/srv/models", "--allow-local-paths"]).is_ok());
        for (extra, says) in [
            (&[][..], "--input-prefix"),
            (&["--input-prefix", "/srv/models"][..], "--input-prefix /srv/models is a local path: pass --allow-local-paths"),
            (&["--input-prefix", "s3://m", "--out-prefix", "/srv/atlases"][..], "--out-prefix /srv/atlases is a local path"),
            (&["--input-prefix", "models", "--allow-local-paths"][..], "--input-prefix models is a relative path"),
            (&["--input-prefix", "/srv/../etc", "--allow-local-paths"][..], "has a `..` segment"),
            (&["--input-prefix", "gs://b/x"][..], "unsupported scheme"),
        ] {
            let e = format!("{:#}", parsed(extra).err().unwrap_or_else(|| panic!("{extra:?} accepted")));
            assert!(e.contains(says), "{extra:?}: {e}");
        }
    }
}
