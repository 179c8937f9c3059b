//! A hostile client against a real coordinator on Redis: raw gRPC requests that bypass the
//! CLI, each one a bad request that a careless or malicious caller could send. For every
//! one the coordinator must answer with a clear error that names the problem, keep
//! serving, keep its memory bounded, and leave the other jobs alone: a job submitted
//! before the attack, rendered by a real worker, must still complete whole.

use std::time::Duration;

use loupe_core::spec::{NamedImage, RenderSettings};
use loupe_e2e::*;
use loupe_proto::v1::{self, jobs_client::JobsClient, workers_client::WorkersClient};
use loupe_proto::PROTOCOL_VERSION;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A bad request and what the coordinator must answer: the status code, and words the
/// message must hold.
struct Refusal {
    what: &'static str,
    code: Code,
    words: &'static [&'static str],
}

/// How long one request may take: far more than any answer needs, far less than the 60 s
/// the lying shape kept the coordinator busy before issue 15.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// The coordinator's peak resident memory after every attack (the chart's limit is 1 GiB).
const MEMORY_BOUND_KB: u64 = 300 * 1024;

fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(ANSWER_DEADLINE);
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// Checks the answer: refused with the code and words, within the deadline.
fn check<T: std::fmt::Debug>(refusal: &Refusal, answer: Result<tonic::Response<T>, tonic::Status>) {
    let status = match answer {
        Ok(r) => panic!("{}: accepted, answered {:?}", refusal.what, r.into_inner()),
        Err(s) => s,
    };
    let message = status.message().to_lowercase();
    let named = refusal.words.iter().all(|w| message.contains(&w.to_lowercase()));
    assert!(
        status.code() == refusal.code && named,
        "{}: expected {:?} naming {:?}, got {:?}: {}",
        refusal.what,
        refusal.code,
        refusal.words,
        status.code(),
        status.message()
    );
}

struct Attacker {
    jobs: JobsClient<Channel>,
    workers: WorkersClient<Channel>,
    user: String,
    worker: String,
}

impl Attacker {
    async fn connect(c: &Cluster) -> Attacker {
        let channel = Channel::from_shared(c.url()).unwrap().connect().await.unwrap();
        // The attacker's own limits are wide open: the coordinator's must do the refusing.
        let jobs = JobsClient::new(channel.clone()).max_encoding_message_size(usize::MAX).max_decoding_message_size(usize::MAX);
        let workers = WorkersClient::new(channel).max_encoding_message_size(usize::MAX).max_decoding_message_size(usize::MAX);
        let tokens = c.tokens.expect("a cluster with tokens");
        Attacker { jobs, workers, user: tokens.user.into(), worker: tokens.worker.into() }
    }

    async fn submit(&mut self, spec: v1::JobSpec) -> Result<tonic::Response<v1::SubmitResponse>, tonic::Status> {
        self.jobs.submit(with_token(v1::SubmitRequest { spec: Some(spec) }, Some(&self.user))).await
    }
}

/// A valid job on the tiny model: `conv` has 4 units, `logits` 3.
fn good_spec(model: &str, out: &str) -> v1::JobSpec {
    let layer = |name: &str, shape: Vec<i64>, units: u32| v1::LayerPlan {
        layer: Some(v1::Layer { name: name.into(), shape }),
        units: vec![v1::UnitRange { start: 0, end: units }],
        techniques: vec![],
        steps: 0,
        options_json: String::new(),
    };
    v1::JobSpec {
        model: Some(v1::ModelRef { uri: model.into(), name: "tiny".into(), sha256: String::new() }),
        layers: vec![layer("conv", vec![4, 8, 8], 4), layer("logits", vec![3], 3)],
        techniques: vec![v1::Technique::Channel as i32],
        settings: Some(settings(|_| {})),
        batch: 4,
        out: out.into(),
        dataset: None,
    }
}

/// Render settings on the wire, as the CLI sends them, changed by `change`.
fn settings(change: impl FnOnce(&mut RenderSettings)) -> v1::RenderSettings {
    let mut s = RenderSettings { steps: 20, size: 16, input_size: 16, seed: 1, ..Default::default() };
    change(&mut s);
    v1::RenderSettings::from(&s)
}

/// Bad specs, each a valid one with one thing wrong.
fn bad_specs(model: &str) -> Vec<(Refusal, v1::JobSpec)> {
    let good = || good_spec(model, "s3://atlas/hostile");
    let with = |f: &dyn Fn(&mut v1::JobSpec)| {
        let mut s = good();
        f(&mut s);
        s
    };
    let ranges = |r: &[(u32, u32)]| r.iter().map(|&(start, end)| v1::UnitRange { start, end }).collect::<Vec<_>>();
    let refusal = |what, words| Refusal { what, code: Code::InvalidArgument, words };
    vec![
        (
            refusal("a lying shape of 4294967295 units, all selected", &["units per job", "at most"]),
            with(&|s| {
                s.layers[0].layer.as_mut().unwrap().shape = vec![4_294_967_295];
                s.layers[0].units = ranges(&[(0, 4_294_967_295)]);
            }),
        ),
        (refusal("overlapping unit ranges", &["overlap"]), with(&|s| s.layers[0].units = ranges(&[(0, 3), (2, 4)]))),
        (refusal("unsorted unit ranges", &["sorted"]), with(&|s| s.layers[0].units = ranges(&[(2, 4), (0, 1)]))),
        (refusal("an empty unit range", &["empty"]), with(&|s| s.layers[0].units = ranges(&[(2, 2)]))),
        (refusal("a unit past the layer", &["4 units"]), with(&|s| s.layers[0].units = ranges(&[(0, 5)]))),
        (
            refusal("more tasks than a job may have", &["tasks", "at most"]),
            with(&|s| {
                s.layers[0].layer.as_mut().unwrap().shape = vec![900_000];
                s.layers[0].units = ranges(&[(0, 900_000)]);
                s.batch = 1;
            }),
        ),
        (
            refusal("a million caricature items: 1,001 inputs on each of 1,000 layers", &["items", "at most"]),
            with(&|s| {
                let inputs = (0..1001).map(|i| NamedImage { name: format!("i{i}"), uri: format!("s3://models/{i}.jpg") }).collect();
                s.settings = Some(settings(|r| r.options.caricature_inputs = inputs));
                s.techniques = vec![v1::Technique::Caricature as i32];
                s.layers = (0..1000).map(|l| v1::LayerPlan { layer: Some(v1::Layer { name: format!("l{l}"), shape: vec![3] }), ..s.layers[1].clone() }).collect();
            }),
        ),
        (refusal("a model outside the input prefixes", &["s3://atlas/tiny.pt", "not under"]), with(&|s| s.model.as_mut().unwrap().uri = "s3://atlas/tiny.pt".into())),
        (refusal("a model on the coordinator's disk", &["/dev/zero", "local"]), with(&|s| s.model.as_mut().unwrap().uri = "/dev/zero".into())),
        (
            refusal("a dataset of the coordinator's whole filesystem", &["dataset", "local"]),
            with(&|s| s.dataset = Some(v1::DatasetSpec { uri: "/".into(), examples: 4, images_per_shard: 10, skip_connections: false })),
        ),
        (
            refusal("a caricature input outside the input prefixes", &["s3://other/secret.jpg"]),
            with(&|s| {
                s.techniques.push(v1::Technique::Caricature as i32);
                let input = NamedImage { name: "x".into(), uri: "s3://other/secret.jpg".into() };
                s.settings = Some(settings(|r| r.options.caricature_inputs = vec![input.clone()]));
            }),
        ),
        (refusal("an atlas outside the out prefix", &["s3://models/overwrite", "under"]), with(&|s| s.out = "s3://models/overwrite".into())),
        (refusal("a NaN learning rate", &["learning rate"]), with(&|s| s.settings.as_mut().unwrap().learning_rate = f64::NAN)),
        (refusal("an unknown technique", &["technique"]), with(&|s| s.techniques = vec![99])),
        (refusal("options that are not JSON", &["options"]), with(&|s| s.settings.as_mut().unwrap().options_json = "{not json".into())),
        (refusal("a layer name of 300 bytes", &["layer name", "longer"]), with(&|s| s.layers[0].layer.as_mut().unwrap().name = "x".repeat(300))),
        (
            refusal("16 diversity images of 2048 px, more than a worker holds", &["memory"]),
            with(&|s| {
                s.settings = Some(settings(|r| {
                    (r.size, r.input_size) = (2048, 2048);
                    r.options.diversity_images = 16;
                }));
                s.techniques = vec![v1::Technique::Diversity as i32];
            }),
        ),
    ]
}

#[test]
fn a_hostile_client_is_refused_clearly_and_harms_no_other_job() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start_configured(Some(TOKENS), false, &["--out-prefix", "s3://atlas", "--worker-memory", "4Gi"]);
    let model = c.upload_tiny(&rt);
    let victim = c.submit(&model, "s3://atlas/victim", &["--steps", "20", "--size", "16", "--batch", "2", "--techniques", "channel"]);
    let mut refused = 0;
    rt.block_on(async {
        let mut a = Attacker::connect(&c).await;
        for (refusal, spec) in bad_specs(&model) {
            check(&refusal, a.submit(spec).await);
            refused += 1;
        }
        a_batch_too_big_for_a_worker_is_split(&mut a, &model).await;
        refused += credentials(&mut a, &victim).await;
        refused += ids_and_sizes(&mut a, &model).await;
    });
    eprintln!("hostile requests refused: {refused}");

    // The coordinator still serves, within its memory, and the victim job completes whole.
    c.start_worker();
    let o = c.loupe(&["watch", &victim]);
    assert_ok(&o);
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));
    let records: Vec<String> = c.list(&rt, "atlas", "victim/").into_iter().filter(|k| k.contains("/units/") && k.ends_with(".json")).collect();
    assert_eq!(records.len(), 7, "every unit of the victim job rendered: {records:?}");
    let (code, _, metrics) = http_get(&format!("127.0.0.1:{}", c.metrics_port), "/metrics");
    assert_eq!(code, 200, "/metrics after the attacks: {}", String::from_utf8_lossy(&metrics));
    let peak = peak_memory_kb(c.coordinator_pid());
    eprintln!("the coordinator's peak resident memory: {} MiB", peak / 1024);
    assert!(peak < MEMORY_BOUND_KB, "the coordinator's peak memory was {peak} kB");
}

/// `--size 2048 --batch 4096` passes every limit alone; together they would not fit a
/// worker, so the job is accepted in smaller tasks (the batch only groups units). It is
/// cancelled before any worker sees it.
async fn a_batch_too_big_for_a_worker_is_split(a: &mut Attacker, model: &str) {
    let mut spec = good_spec(model, "s3://atlas/big");
    spec.settings = Some(settings(|r| (r.size, r.input_size) = (2048, 2048)));
    spec.batch = 4096;
    // The submitter's shapes are checked by the first worker that loads the model; this
    // job is cancelled before that.
    spec.layers[0].layer.as_mut().unwrap().shape = vec![64, 8, 8];
    spec.layers[0].units = vec![v1::UnitRange { start: 0, end: 64 }];
    let job_id = a.submit(spec).await.expect("a big batch is split, not refused").into_inner().job_id;
    let user = a.user.clone();
    let status = a.jobs.get(with_token(v1::GetJobRequest { job_id: job_id.clone() }, Some(&user))).await.unwrap().into_inner();
    assert!(status.tasks_total >= 8 + 1, "64 + 3 units of a batch of 4096 in {} tasks: not split", status.tasks_total);
    a.jobs.cancel(with_token(v1::CancelJobRequest { job_id }, Some(&user))).await.unwrap();
}

/// Wrong credentials, forged and stale lease ids. Returns how many were refused.
async fn credentials(a: &mut Attacker, victim: &str) -> usize {
    let lease_req = |token: Option<&str>| with_token(v1::LeaseRequest { protocol_version: PROTOCOL_VERSION, worker: "attacker".into() }, token);
    let get = |token: Option<&str>| with_token(v1::GetJobRequest { job_id: victim.into() }, token);
    let user = a.user.clone();
    let worker = a.worker.clone();
    check(&Refusal { what: "a call without a token", code: Code::Unauthenticated, words: &["token"] }, a.jobs.get(get(None)).await);
    check(&Refusal { what: "a user token on the Workers service", code: Code::Unauthenticated, words: &["worker"] }, a.workers.lease(lease_req(Some(&user))).await);
    check(&Refusal { what: "a worker token on the Jobs service", code: Code::Unauthenticated, words: &["user"] }, a.jobs.get(get(Some(&worker))).await);
    let cancel = with_token(v1::CancelJobRequest { job_id: victim.into() }, Some(&worker));
    check(&Refusal { what: "a worker token cancelling a job", code: Code::Unauthenticated, words: &["user"] }, a.jobs.cancel(cancel).await);

    // The attacker holds a real lease of the victim job, then forges ids next to it.
    let lease = a.workers.lease(lease_req(Some(&worker))).await.unwrap().into_inner().lease.expect("a task of the victim job");
    let real = lease.lease_id.clone();
    let (task, _secret) = real.rsplit_once('.').expect("a lease id with a secret part");
    let mut refused = 4;
    for forged in [format!("{task}.{}", "0".repeat(32)), format!("{victim}/0#1"), format!("{victim}/1#1")] {
        // A forged id is either refused as malformed or answered as a lost lease.
        let is_refused = |r: Result<tonic::Response<v1::LeaseStateResponse>, tonic::Status>| match r {
            Ok(r) => r.into_inner().state == v1::LeaseState::Lost as i32,
            Err(s) => s.code() == Code::InvalidArgument,
        };
        let complete = with_token(v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: forged.clone() }, Some(&worker));
        assert!(is_refused(a.workers.complete(complete).await), "completing forged lease {forged} was not refused");
        let fail = v1::FailRequest { protocol_version: PROTOCOL_VERSION, lease_id: forged.clone(), retryable: false, message: "forged".into(), released: false };
        assert!(is_refused(a.workers.fail(with_token(fail, Some(&worker))).await), "failing forged lease {forged} was not refused");
        refused += 2;
    }
    // The real lease is still held, and handed back without using an attempt.
    let renew = with_token(v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: real.clone() }, Some(&worker));
    assert_eq!(a.workers.renew(renew).await.unwrap().into_inner().state, v1::LeaseState::Held as i32, "forgeries did not touch the real lease");
    let release = v1::FailRequest { protocol_version: PROTOCOL_VERSION, lease_id: real, retryable: true, message: "handed back".into(), released: true };
    a.workers.fail(with_token(release, Some(&worker))).await.unwrap();
    refused
}

/// Malformed ids, an oversized message, an unbounded list. Returns how many were refused.
async fn ids_and_sizes(a: &mut Attacker, model: &str) -> usize {
    let user = a.user.clone();
    let worker = a.worker.clone();
    for (what, id) in [("a job id with a slash", "job-1/../x"), ("an empty job id", "")] {
        let r = a.jobs.get(with_token(v1::GetJobRequest { job_id: id.into() }, Some(&user))).await;
        check(&Refusal { what, code: Code::InvalidArgument, words: &["job id"] }, r);
    }
    let r = a.jobs.cancel(with_token(v1::CancelJobRequest { job_id: "job-999999".into() }, Some(&user))).await;
    check(&Refusal { what: "cancelling a job that does not exist", code: Code::NotFound, words: &["job-999999"] }, r);
    let garbage = with_token(v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: "\u{0}garbage".into() }, Some(&worker));
    check(&Refusal { what: "a lease id that is not one", code: Code::InvalidArgument, words: &["lease"] }, a.workers.complete(garbage).await);
    let old = with_token(v1::LeaseRequest { protocol_version: PROTOCOL_VERSION - 1, worker: "old".into() }, Some(&worker));
    check(&Refusal { what: "a worker of the previous protocol version", code: Code::FailedPrecondition, words: &["protocol version"] }, a.workers.lease(old).await);

    let mut huge = good_spec(model, "s3://atlas/huge");
    huge.settings.as_mut().unwrap().options_json = format!("{{\"caricature_inputs\":[], \"pad\": \"{}\"}}", "x".repeat(80 << 20));
    let r = a.submit(huge).await;
    check(&Refusal { what: "an 80 MB submit", code: Code::OutOfRange, words: &["message"] }, r);

    let list = with_token(v1::ListJobsRequest { page_size: 1_000_000, page_token: String::new() }, Some(&user));
    let page = a.jobs.list(list).await.expect("a list with a huge page size is served, clamped").into_inner();
    assert!(page.jobs.len() <= 1000, "a page holds at most the maximum");
    6
}

fn peak_memory_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the coordinator is still running");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
