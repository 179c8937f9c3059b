//! The HTTP/1 accept loop of every loupe HTTP endpoint (`loupe serve`, the metrics port):
//! bounded so that no client, careless or hostile, can stop it from answering others.
//!
//! - **Header-read timeout.** A connection must send a complete request head within
//!   [`Limits::header_read_timeout`] of connecting or of its previous response, so a
//!   silent or byte-at-a-time client is dropped (hyper's timer also runs while a
//!   keep-alive connection waits for its next request: it is the idle timeout too).
//! - **Connection cap.** At most [`Limits::max_connections`] connections are served at
//!   once. A connection that arrives at the cap asks the oldest one to close (at once if
//!   it is idle, after its current response if not, as nginx drops idle keep-alive
//!   connections when it runs out) and takes its slot: thousands of idle connections
//!   delay a new request by one close, not by their timeouts. At most [`ADMISSION_QUEUE`]
//!   connections wait for a slot, each for at most [`ADMISSION_WAIT`] (then it is
//!   answered 503); while the queue is full, the server accepts nothing and new
//!   connections wait in the listen backlog. Open sockets stay below
//!   `max_connections + ADMISSION_QUEUE`.
//! - **Accept errors** (out of file descriptors, most often) are logged once per kind a
//!   minute and followed by a short back-off: the server neither exits nor spins.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as StdError;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// How much an HTTP server takes on at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; see the module documentation for what happens at the
    /// cap.
    pub max_connections: usize,
    /// How long a connection may take to send a request head, from connecting or from its
    /// previous response.
    pub header_read_timeout: Duration,
}

/// Connections that may wait for a slot while the oldest ones close.
pub const ADMISSION_QUEUE: usize = 64;
/// How long a connection waits for a slot before it is answered 503.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(10);
/// The pause after a failed `accept`: long enough not to spin while the process is out
/// of file descriptors, short enough that a freed one is used at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// An accept error of one kind is logged at most once per this long.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The connections being served, oldest first, each with the signal that asks it to
/// close.
#[derive(Default)]
struct Registry {
    next: u64,
    open: BTreeMap<u64, Arc<Notify>>,
}

impl Registry {
    fn add(&mut self) -> (u64, Arc<Notify>) {
        let id = self.next;
        self.next += 1;
        let close = Arc::new(Notify::new());
        self.open.insert(id, close.clone());
        (id, close)
    }

    /// Asks the oldest connection to close; it leaves the registry, so each arrival at
    /// the cap asks a different one.
    fn close_oldest(&mut self) {
        if let Some((_, close)) = self.open.pop_first() {
            close.notify_one();
        }
    }
}

struct Server<S> {
    service: S,
    limits: Limits,
    slots: Arc<Semaphore>,
    queue: Arc<Semaphore>,
    registry: Mutex<Registry>,
}

/// Serves HTTP/1 on `listener` with `service` until `shutdown` resolves, within `limits`.
pub async fn serve_connections<S, B>(listener: TcpListener, limits: Limits, service: S, shutdown: impl Future<Output = ()>)
where
    S: HttpService<Incoming, ResBody = B> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let server = Arc::new(Server {
        service,
        limits,
        slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        queue: Arc::new(Semaphore::new(ADMISSION_QUEUE)),
        registry: Mutex::new(Registry::default()),
    });
    let mut logged: HashMap<std::io::ErrorKind, Instant> = HashMap::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => server.admit(stream).await,
            Err(e) => {
                let now = Instant::now();
                if logged.get(&e.kind()).is_none_or(|at| now.duration_since(*at) >= ACCEPT_LOG_INTERVAL) {
                    warn!(error = %e, "accepting a connection failed; retrying (logged once a minute per kind of error)");
                    logged.insert(e.kind(), now);
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

impl<S, B> Server<S>
where
    S: HttpService<Incoming, ResBody = B> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    /// Gives `stream` a slot: a free one, or the oldest connection's once it closes.
    async fn admit(self: &Arc<Self>, stream: TcpStream) {
        // A slot that frees up while connections wait is theirs: each has asked one
        // connection to close and waits for that slot, and taking it here would leave one
        // of them waiting for the header-read timeout (or ADMISSION_WAIT) instead.
        let nobody_waits = self.queue.available_permits() == ADMISSION_QUEUE;
        if let Some(slot) = nobody_waits.then(|| self.slots.clone().try_acquire_owned().ok()).flatten() {
            let registered = self.registry().add();
            tokio::spawn(self.clone().serve_one(stream, slot, registered));
            return;
        }
        // A full queue stops the accept loop: later connections wait in the listen
        // backlog, and a place frees up within ADMISSION_WAIT.
        // It is registered as it arrives, not once it has a slot: arrivals can outrun the
        // connections taking their slots (a busy machine), and each arrival's close must
        // reach a connection older than it, served or waiting. A waiting one asked to
        // close gives its place in line up, which serves the arrival as a freed slot would.
        let place = self.queue.clone().acquire_owned().await.expect("the queue is never closed");
        let (id, close) = {
            let mut registry = self.registry();
            registry.close_oldest();
            registry.add()
        };
        let server = self.clone();
        tokio::spawn(async move {
            let slot = tokio::select! {
                slot = tokio::time::timeout(ADMISSION_WAIT, server.slots.clone().acquire_owned()) => slot,
                _ = close.notified() => return,
            };
            drop(place);
            match slot {
                Ok(Ok(slot)) => server.serve_one(stream, slot, (id, close)).await,
                _ => {
                    server.registry().open.remove(&id);
                    refuse(stream).await
                }
            }
        });
    }

    /// Serves one connection in its slot until it ends, or until it is asked to close
    /// (then after its current response).
    async fn serve_one(self: Arc<Self>, stream: TcpStream, slot: OwnedSemaphorePermit, (id, close): (u64, Arc<Notify>)) {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.limits.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), self.service.clone());
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = close.notified() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        match result {
            // A client that hung up or sent nothing in time: routine on a network.
            Err(e) if e.is_timeout() || e.is_incomplete_message() || e.is_closed() || e.is_canceled() => {}
            Err(e) => warn!(error = %e, "serving a connection failed"),
            Ok(()) => {}
        }
        self.registry().open.remove(&id);
        drop(slot);
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().expect("the registry lock is never poisoned")
    }
}

/// Answers a connection that found no slot in time: 503, then close.
async fn refuse(mut stream: TcpStream) {
    let reply = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 22\r\nconnection: close\r\n\r\ntoo many connections\r\n";
    // Best effort, within a bound: the client may be gone or not reading. What it sent is
    // read before closing, or the kernel would reset the connection and the client could
    // lose the reply.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(reply).await?;
        stream.shutdown().await?;
        let mut sink = [0; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdTcpStream;

    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response};

    /// A server of `limits` answering every request "hello", on a port of its own.
    async fn hello(limits: Limits) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let service = hyper::service::service_fn(|_: Request<Incoming>| async { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"hello")))) });
        tokio::spawn(serve_connections(listener, limits, service, std::future::pending()));
        addr
    }

    /// Whether the server closed `stream`, reading within a generous deadline.
    fn closed_by_server(mut stream: StdTcpStream) -> bool {
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).is_ok()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_at_the_cap_make_room_for_a_new_request() {
        // A header timeout far longer than the test: only the cap's closing makes room.
        let addr = hello(Limits { max_connections: 8, header_read_timeout: Duration::from_secs(600) }).await;
        let (status, body, oldest_closed) = tokio::task::spawn_blocking(move || {
            let idle: Vec<_> = (0..50).map(|_| StdTcpStream::connect(&addr).unwrap()).collect();
            let (status, _, body) = loupe_testsupport::http_get(&addr, "/");
            let oldest = idle.into_iter().next().unwrap();
            (status, body, closed_by_server(oldest))
        })
        .await
        .unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
        assert!(oldest_closed, "the oldest idle connection was closed to make room");
    }

    /// Idle connections and requests interleaved at the cap: every request takes the slot
    /// its arrival freed, none waits for a slot another arrival took (that one would be
    /// answered 503 after ADMISSION_WAIT).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_request_is_answered_while_idle_connections_keep_arriving_at_the_cap() {
        let addr = hello(Limits { max_connections: 8, header_read_timeout: Duration::from_secs(600) }).await;
        let statuses = tokio::task::spawn_blocking(move || {
            let mut idle = Vec::new();
            let mut statuses = Vec::new();
            for _ in 0..40 {
                idle.extend((0..3).map(|_| StdTcpStream::connect(&addr).unwrap()));
                statuses.push(loupe_testsupport::http_get(&addr, "/").0);
            }
            statuses
        })
        .await
        .unwrap();
        assert_eq!(statuses, vec![200; 40]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_sends_no_full_request_head_in_time_is_disconnected() {
        let addr = hello(Limits { max_connections: 8, header_read_timeout: Duration::from_millis(200) }).await;
        let (silent, slow) = tokio::task::spawn_blocking(move || {
            let silent = StdTcpStream::connect(&addr).unwrap();
            let mut slow = StdTcpStream::connect(&addr).unwrap();
            slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
            (closed_by_server(silent), closed_by_server(slow))
        })
        .await
        .unwrap();
        assert!(silent && slow, "silent: {silent}, slow: {slow}");
    }
}
