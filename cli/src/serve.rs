//! `loupe serve`: the atlas and its viewer over HTTP, from a local directory or read
//! through from S3. Read-only: GET and HEAD of keys inside the atlas, nothing else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tracing::warn;

use loupe_core::location::Location;
use loupe_core::store::{self, ArtifactStore};
use loupe_metrics::http::{serve_connections, Limits};

#[derive(Args)]
pub struct ServeArgs {
    /// The atlas: a directory, or s3://bucket/prefix.
    pub atlas: String,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Connections served at once. One more closes the oldest (an idle one at once, a busy
    /// one after its response). 512 is far more than a team's browsers open (six each)
    /// and stays within the usual limit of 1024 open files.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// How long a client may take to send a request head, after connecting or after its
    /// previous response (so also how long an idle keep-alive connection stays open).
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,
}

fn positive_duration(s: &str) -> Result<Duration> {
    let d = humantime::parse_duration(s)?;
    anyhow::ensure!(!d.is_zero(), "must be more than zero");
    Ok(d)
}

/// Where the files come from. A local directory is read file by file, streamed, and only
/// where a path resolves inside the directory; S3 through the store, one object at a
/// time per connection (HEAD asks for its size only).
enum Atlas {
    Dir(PathBuf),
    Store(Arc<dyn ArtifactStore>),
}

/// What a response body is: a file streamed in chunks, or bytes in memory.
type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The chunk a file is streamed in: a connection holds one at a time.
const CHUNK: usize = 64 * 1024;

pub async fn serve(args: ServeArgs) -> Result<()> {
    let (atlas, has_atlas_json) = match Location::parse("atlas", &args.atlas)? {
        Location::Local(dir) => {
            let has = dir.join(loupe_core::atlas::ATLAS_KEY).is_file();
            (Atlas::Dir(dir), has)
        }
        Location::S3 { bucket, key } => {
            let store: Arc<dyn ArtifactStore> = Arc::new(loupe_core::s3::S3Store::from_env(&bucket, &key).await?);
            let has = store.get(loupe_core::atlas::ATLAS_KEY).await?.is_some();
            (Atlas::Store(store), has)
        }
    };
    let location = match &atlas {
        Atlas::Dir(dir) => dir.display().to_string(),
        Atlas::Store(store) => store.location(),
    };
    if !has_atlas_json {
        eprintln!("note: {location} has no atlas.json yet; the viewer will show it once a job starts");
    }
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    println!("serving {location} at http://{}/", listener.local_addr()?);
    let limits = Limits { max_connections: args.max_connections as usize, header_read_timeout: args.header_read_timeout };
    let atlas = Arc::new(atlas);
    let service = hyper::service::service_fn(move |req| respond(atlas.clone(), req));
    serve_connections(listener, limits, service, std::future::pending()).await;
    Ok(())
}

async fn respond(atlas: Arc<Atlas>, req: Request<Incoming>) -> std::result::Result<Response<Body>, Infallible> {
    let head = req.method() == Method::HEAD;
    if !(head || req.method() == Method::GET) {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET and HEAD only"));
    }
    let Some(key) = key_of(req.uri().path()) else {
        return Ok(plain(StatusCode::BAD_REQUEST, "not a path inside the atlas"));
    };
    let response = match find(&atlas, &key, head).await {
        Ok(Some((len, body))) => {
            let mut r = Response::new(body);
            let headers = r.headers_mut();
            headers.insert("content-type", store::content_type(&key).parse().expect("a valid header value"));
            headers.insert("content-length", len.into());
            // An atlas being written changes under the viewer: always ask again.
            headers.insert("cache-control", "no-cache".parse().expect("a valid header value"));
            r
        }
        Ok(None) => plain(StatusCode::NOT_FOUND, "not in the atlas"),
        Err(e) => {
            warn!(key, error = %e, "reading from the atlas failed");
            plain(StatusCode::BAD_GATEWAY, "reading the atlas failed")
        }
    };
    Ok(response)
}

/// The length of the file at `key` and its body (empty for HEAD), or `None` if the atlas
/// has no such file.
async fn find(atlas: &Atlas, key: &str, head: bool) -> Result<Option<(u64, Body)>> {
    match atlas {
        Atlas::Dir(dir) => {
            let Some((file, len)) = open_inside(dir, key).await? else { return Ok(None) };
            Ok(Some((len, if head { bytes(Bytes::new()) } else { chunks(file) })))
        }
        Atlas::Store(store) if head => Ok(store.size(key).await?.map(|len| (len, bytes(Bytes::new())))),
        Atlas::Store(store) => Ok(store.get(key).await?.map(|object| (object.len() as u64, bytes(Bytes::from(object))))),
    }
}

/// The regular file `key` names under `dir`, open, with its length; `None` unless its
/// path, symlinks resolved, lies inside `dir`'s own resolved path: a symlink in the atlas
/// that points outside it is as absent as a missing file.
async fn open_inside(dir: &Path, key: &str) -> std::io::Result<Option<(tokio::fs::File, u64)>> {
    let Some(root) = absent_is_none(tokio::fs::canonicalize(dir).await)? else { return Ok(None) };
    let Some(path) = absent_is_none(tokio::fs::canonicalize(root.join(key)).await)? else { return Ok(None) };
    if !path.starts_with(&root) {
        return Ok(None);
    }
    let Some(file) = absent_is_none(tokio::fs::File::open(&path).await)? else { return Ok(None) };
    // The length of the file opened, which an atlas writer replaces (renames over) but
    // never changes in place.
    let metadata = file.metadata().await?;
    Ok(metadata.is_file().then_some((file, metadata.len())))
}

/// `None` for a path that does not exist (or runs through a file as if it were a
/// directory), other errors as they are.
fn absent_is_none<T>(result: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match result {
        Ok(t) => Ok(Some(t)),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `file` as a body read [`CHUNK`] bytes at a time, as the connection takes them.
fn chunks(file: tokio::fs::File) -> Body {
    let frames = futures_util::stream::try_unfold(file, |mut file| async move {
        let mut chunk = vec![0; CHUNK];
        let n = file.read(&mut chunk).await?;
        chunk.truncate(n);
        Ok((n > 0).then(|| (Frame::data(Bytes::from(chunk)), file)))
    });
    StreamBody::new(frames).boxed_unsync()
}

fn bytes(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// The atlas key a request path names, percent-decoded once (layer directories are
/// themselves percent-escaped names, so the viewer escapes their `%`), or `None` for
/// anything that could leave the atlas: `..` or `.` segments in any encoding, empty
/// segments, backslashes, NUL, bad escapes.
fn key_of(path: &str) -> Option<String> {
    let decoded = percent_decode(path)?;
    let key = decoded.strip_prefix('/').unwrap_or(&decoded);
    let key = if key.is_empty() || key.ends_with('/') { format!("{key}index.html") } else { key.to_string() };
    store::validate_key(&key).ok()?;
    Some(key)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(bytes(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", "text/plain; charset=utf-8".parse().expect("a valid header value"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_the_atlas_map_to_keys() {
        assert_eq!(key_of("/").as_deref(), Some("index.html"));
        assert_eq!(key_of("/atlas.json").as_deref(), Some("atlas.json"));
        assert_eq!(key_of("/layers/conv1/units/3/channel.png").as_deref(), Some("layers/conv1/units/3/channel.png"));
        // A layer directory named `..%2Fescape` (an escaped hostile name) is reached as
        // `..%252Fescape`: one decode gives the literal directory name.
        assert_eq!(key_of("/layers/..%252Fescape/layer.json").as_deref(), Some("layers/..%2Fescape/layer.json"));
    }

    #[test]
    fn paths_that_could_leave_the_atlas_are_refused() {
        for bad in [
            "/../etc/passwd",
            "/layers/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2E%2Fetc%2Fpasswd",
            "/layers/%2e%2e%2f%2e%2e%2fsecret",
            "/..%5c..%5csecret",
            "//etc/passwd",
            "/a//b",
            "/./atlas.json",
            "/a%00b",
            "/%zz",
            "/%2",
        ] {
            assert_eq!(key_of(bad), None, "{bad}");
        }
    }
}
