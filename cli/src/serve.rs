//! `loupe serve`: the atlas and its viewer over HTTP, from a local directory or read
//! through from S3. Read-only: GET and HEAD of keys inside the atlas, nothing else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use loupe_core::store::{self, ArtifactStore};

#[derive(Args)]
pub struct ServeArgs {
    /// The atlas: a directory, or s3://bucket/prefix.
    pub atlas: String,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    let store = store::open(&args.atlas).await?;
    if store.get(loupe_core::atlas::ATLAS_KEY).await?.is_none() {
        eprintln!("note: {} has no atlas.json yet; the viewer will show it once a job starts", store.location());
    }
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    println!("serving {} at http://{}/", store.location(), listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let store = store.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(store.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                warn!(error = %e, "serving a connection failed");
            }
        });
    }
}

async fn respond(store: Arc<dyn ArtifactStore>, req: Request<Incoming>) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let head = req.method() == Method::HEAD;
    if !(head || req.method() == Method::GET) {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET and HEAD only"));
    }
    let Some(key) = key_of(req.uri().path()) else {
        return Ok(plain(StatusCode::BAD_REQUEST, "not a path inside the atlas"));
    };
    let response = match store.get(&key).await {
        Ok(Some(bytes)) => {
            let len = bytes.len();
            let mut r = Response::new(Full::new(if head { Bytes::new() } else { Bytes::from(bytes) }));
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

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
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
