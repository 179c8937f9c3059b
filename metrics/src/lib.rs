//! Monitoring endpoints shared by `loupe-coordinator` and `loupe-worker`: a small HTTP
//! server with
//!
//! - `GET /metrics`: Prometheus text exposition (format 0.0.4), made on each scrape by
//!   the process's [`Probe`];
//! - `GET /healthz`: liveness, 200 while the process answers at all;
//! - `GET /readyz`: readiness, 200 when the probe says the process can serve, else 503
//!   with the reason.
//!
//! The accept loop, with its connection cap and timeouts, is [`http`]'s, shared with
//! `loupe serve`.
//!
//! The exposition is written by hand ([`Exposition`]) rather than through a metrics
//! registry crate: both processes have a handful of series, most of them read from state
//! that already exists (the state store, the worker's counters) at scrape time.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

pub mod http;

/// What a process exposes: its metrics, and whether it is ready.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    /// The metrics, as an [`Exposition`] filled in now.
    async fn metrics(&self) -> Exposition;
    /// `Ok` when the process can do its work; `Err` says why not.
    async fn ready(&self) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A Prometheus text exposition being written: a family (`# HELP`, `# TYPE`) then its
/// samples.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a metric family. Its samples follow through [`Exposition::sample`].
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.text, "{k}=\"{v}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
        self
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Where each binary serves these endpoints when `--metrics-listen` is not given. The
/// ports differ so that a coordinator and a worker started on one machine with their
/// defaults do not collide; on Kubernetes each pod has its own address and the chart sets
/// the address explicitly.
pub const COORDINATOR_PORT: u16 = 9600;
pub const WORKER_PORT: u16 = 9601;

/// The listener for `--metrics-listen`: `given` exactly (an error if it is taken), else
/// `0.0.0.0:default_port`, or any free port when that one is taken, so that several
/// workers on one machine (one per GPU) start with their defaults. The caller logs the
/// address it got.
pub async fn bind(given: Option<SocketAddr>, default_port: u16) -> std::io::Result<TcpListener> {
    if let Some(addr) = given {
        return TcpListener::bind(addr).await;
    }
    match TcpListener::bind((Ipv4Addr::UNSPECIFIED, default_port)).await {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await,
        bound => bound,
    }
}

/// The limits of the monitoring endpoints. Their clients are a Prometheus or two and the
/// kubelet's probes, each holding a connection or two: 64 leaves room for many and still
/// bounds what a flood can take from a process whose work is elsewhere. A probe's request
/// head arrives at once; 10 s is generous for a client on a slow network.
pub const LIMITS: http::Limits = http::Limits { max_connections: 64, header_read_timeout: Duration::from_secs(10) };

/// Serves the endpoints on `listener` until `shutdown` resolves, within [`LIMITS`].
pub async fn serve(listener: TcpListener, probe: Arc<dyn Probe>, shutdown: impl Future<Output = ()>) {
    let service = hyper::service::service_fn(move |req| respond(probe.clone(), req));
    http::serve_connections(listener, LIMITS, service, shutdown).await
}

async fn respond(probe: Arc<dyn Probe>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into()));
    }
    Ok(match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", probe.metrics().await.into_text()),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match probe.ready().await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /readyz\n".into()),
    })
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn exposition_escapes_label_values_and_writes_families() {
        let mut e = Exposition::new();
        e.family("loupe_jobs", Kind::Gauge, "Jobs by state.").sample("loupe_jobs", &[("state", "run\"ning")], 3.0);
        e.single("loupe_up", Kind::Gauge, "Up.", 0.5);
        assert_eq!(
            e.into_text(),
            "# HELP loupe_jobs Jobs by state.\n# TYPE loupe_jobs gauge\nloupe_jobs{state=\"run\\\"ning\"} 3\n\
             # HELP loupe_up Up.\n# TYPE loupe_up gauge\nloupe_up 0.5\n"
        );
    }

    struct Toggle(AtomicBool);

    #[async_trait]
    impl Probe for Toggle {
        async fn metrics(&self) -> Exposition {
            let mut e = Exposition::new();
            e.single("loupe_test_total", Kind::Counter, "A test counter.", 7.0);
            e
        }
        async fn ready(&self) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("the store is down".into())
            }
        }
    }

    #[tokio::test]
    async fn the_default_address_falls_back_to_a_free_port_and_a_given_one_does_not() {
        assert_ne!(COORDINATOR_PORT, WORKER_PORT);
        // The default port taken (by this test, or by anything else on the machine).
        let holder = TcpListener::bind((Ipv4Addr::UNSPECIFIED, WORKER_PORT)).await;
        let first = bind(None, WORKER_PORT).await.unwrap();
        let second = bind(None, WORKER_PORT).await.unwrap();
        let (a, b) = (first.local_addr().unwrap().port(), second.local_addr().unwrap().port());
        assert!(a != b && a != WORKER_PORT && b != WORKER_PORT, "{a} {b}");
        drop(holder);
        // An address given explicitly is used as given, and its being taken is an error.
        let taken = first.local_addr().unwrap();
        assert_eq!(bind(Some(taken), WORKER_PORT).await.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_answer_metrics_liveness_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let probe = Arc::new(Toggle(AtomicBool::new(false)));
        tokio::spawn(serve(listener, probe.clone(), std::future::pending()));
        let get = move |path: &'static str| {
            tokio::task::spawn_blocking(move || {
                let (status, _, body) = loupe_testsupport::http_get(&addr.to_string(), path);
                (status, String::from_utf8(body).unwrap())
            })
        };
        let (status, body) = get("/metrics").await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("loupe_test_total 7\n"), "{body}");
        assert_eq!(get("/healthz").await.unwrap().0, 200);
        let (status, body) = get("/readyz").await.unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("the store is down"), "{body}");
        probe.0.store(true, Ordering::SeqCst);
        assert_eq!(get("/readyz").await.unwrap().0, 200);
        assert_eq!(get("/nothing").await.unwrap().0, 404);
    }
}
