//! An [`ArtifactStore`] in an S3 bucket (or any S3-compatible store).
//!
//! An atlas lives under `s3://bucket/prefix`; the store's keys are relative to that
//! prefix. A PutObject is atomic by S3's semantics (readers see the old object or the new,
//! never a part) and replaces what was there, which is what the trait asks for.
//!
//! Configuration is the standard AWS one ([`S3Store::from_env`]): `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, profiles
//! and the rest of the SDK's chain, plus `LOUPE_S3_FORCE_PATH_STYLE=1` for path-style
//! addressing, which most S3-compatible servers need. [`S3Store::new`] takes everything
//! explicitly instead and reads no environment.
//!
//! Transient failures (timeouts, refused or dropped connections, HTTP 5xx, throttling) are
//! retried by the SDK's standard retry strategy with exponential backoff and jitter, up to
//! [`S3Config::max_attempts`] attempts; then the operation fails with an [`Error::Remote`]
//! that names the object.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use tokio::sync::OnceCell;

use crate::store::{validate_key, ArtifactStore};
use crate::{Error, Result};

/// The environment variable that turns on path-style addressing (`1`/`true`/`yes`).
pub const FORCE_PATH_STYLE_ENV: &str = "LOUPE_S3_FORCE_PATH_STYLE";

/// The region used when none is configured (S3-compatible servers usually ignore it, but
/// requests must be signed for some region).
pub const DEFAULT_REGION: &str = "us-east-1";

/// The HTTPS client every S3 client here uses: hyper 1 and rustls on ring (the provider
/// tonic uses too), in place of the SDK's default client on aws-lc, which would add a C
/// library to every build (see the workspace Cargo.toml). Certificates are the system's.
pub fn http_client() -> aws_sdk_s3::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https()
}

/// Splits `s3://bucket/some/prefix` into `("bucket", "some/prefix")`. The prefix may be
/// empty (`s3://bucket`, `s3://bucket/`) and loses its trailing slashes; it must otherwise
/// be a relative path of plain segments, like an artifact key.
pub fn parse_s3_uri(uri: &str) -> Result<(String, String)> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| Error::invalid("S3 URI", format!("{uri:?} does not start with s3://")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    validate_bucket(bucket).map_err(|m| Error::invalid("S3 URI", format!("{uri:?}: {m}")))?;
    let prefix = normalise_prefix(prefix).map_err(|m| Error::invalid("S3 URI", format!("{uri:?}: {m}")))?;
    Ok((bucket.to_string(), prefix))
}

/// Bucket names as S3 and the common S3-compatible servers accept them (lenient about
/// case and underscores, which legacy buckets and some servers allow).
fn validate_bucket(bucket: &str) -> std::result::Result<(), String> {
    if bucket.is_empty() {
        return Err("the bucket name is empty".into());
    }
    if bucket.len() > 255 || !bucket.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
        return Err(format!("{bucket:?} is not a valid bucket name (letters, digits, '.', '-' and '_' only)"));
    }
    Ok(())
}

/// Drops trailing slashes; what is left must be empty or a valid key.
fn normalise_prefix(prefix: &str) -> std::result::Result<String, String> {
    let p = prefix.trim_end_matches('/');
    if !p.is_empty() && validate_key(p).is_err() {
        return Err(format!("prefix {prefix:?} is not a relative path of plain segments"));
    }
    Ok(p.to_string())
}

fn checked(bucket: &str, prefix: &str) -> Result<(String, String)> {
    validate_bucket(bucket).map_err(|m| Error::invalid("S3 bucket", m))?;
    let prefix = normalise_prefix(prefix).map_err(|m| Error::invalid("S3 prefix", m))?;
    Ok((bucket.to_string(), prefix))
}

/// Reads a boolean flag such as [`FORCE_PATH_STYLE_ENV`]: unset or empty is false.
fn parse_flag(name: &str, value: Option<&str>) -> Result<bool> {
    match value.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            "" | "0" | "false" | "no" | "off" => Ok(false),
            "1" | "true" | "yes" | "on" => Ok(true),
            _ => Err(Error::invalid("environment", format!("{name}={v:?}; use 1 or 0"))),
        },
    }
}

fn env_flag(name: &str) -> Result<bool> {
    parse_flag(name, std::env::var(name).ok().as_deref())
}

/// Static credentials for [`S3Config`].
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl S3Credentials {
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        S3Credentials { access_key_id: access_key_id.into(), secret_access_key: secret_access_key.into(), session_token: None }
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .field("session_token", &self.session_token.as_ref().map(|_| "** redacted **"))
            .finish()
    }
}

/// Everything [`S3Store::new`] needs, given explicitly (no environment is read).
#[derive(Clone, Debug)]
pub struct S3Config {
    /// The service's URL (`http://127.0.0.1:9000`); `None` is AWS S3 for the region.
    pub endpoint: Option<String>,
    /// `None` is [`DEFAULT_REGION`].
    pub region: Option<String>,
    /// `http://endpoint/bucket/key` rather than `http://bucket.endpoint/key`.
    pub force_path_style: bool,
    /// `None` sends unsigned (anonymous) requests, for public buckets.
    pub credentials: Option<S3Credentials>,
    /// Attempts per request, the first included (at least 1).
    pub max_attempts: u32,
    /// The backoff base for throttling errors (the SDK uses a shorter base for other
    /// transient errors); the n-th retry waits a random time up to `base * 2^n`.
    pub initial_backoff: Duration,
    /// The longest single backoff.
    pub max_backoff: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one attempt may wait for the response headers after sending the request.
    pub read_timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            force_path_style: false,
            credentials: None,
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
        }
    }
}

impl S3Config {
    fn retry_config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(self.initial_backoff)
            .with_max_backoff(self.max_backoff)
    }

    fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder().connect_timeout(self.connect_timeout).read_timeout(self.read_timeout).build()
    }
}

/// A client and what the error messages say about it.
#[derive(Debug)]
struct Remote {
    client: Client,
    endpoint: Option<String>,
    max_attempts: u32,
    backoff: Duration,
}

/// An atlas under `s3://bucket/prefix`.
pub struct S3Store {
    bucket: String,
    /// No leading or trailing slash; empty for the bucket's root.
    prefix: String,
    remote: Remote,
    /// Set once the bucket is known to exist (or cannot be checked).
    bucket_checked: OnceCell<()>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store").field("location", &self.location()).finish_non_exhaustive()
    }
}

impl S3Store {
    /// A store configured explicitly; reads no environment.
    pub fn new(bucket: &str, prefix: &str, config: &S3Config) -> Result<S3Store> {
        let (bucket, prefix) = checked(bucket, prefix)?;
        if config.max_attempts == 0 {
            return Err(Error::invalid("S3 config", "max_attempts must be at least 1"));
        }
        let mut b = aws_sdk_s3::Config::builder()
            .http_client(http_client())
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone().unwrap_or_else(|| DEFAULT_REGION.to_string())))
            .force_path_style(config.force_path_style)
            .retry_config(config.retry_config())
            .timeout_config(config.timeout_config());
        if let Some(endpoint) = &config.endpoint {
            b = b.endpoint_url(endpoint);
        }
        match &config.credentials {
            Some(c) => {
                let creds = Credentials::new(
                    c.access_key_id.clone(),
                    c.secret_access_key.clone(),
                    c.session_token.clone(),
                    None,
                    "loupe-s3-config",
                );
                b = b.credentials_provider(creds);
            }
            None => b = b.allow_no_auth(),
        }
        let remote = Remote {
            client: Client::from_conf(b.build()),
            endpoint: config.endpoint.clone(),
            max_attempts: config.max_attempts,
            backoff: config.initial_backoff,
        };
        Ok(Self::with_remote(bucket, prefix, remote))
    }

    /// A store configured the standard AWS way (environment, profiles, instance roles),
    /// plus [`FORCE_PATH_STYLE_ENV`]. Requests retry as [`S3Config::default`] says, unless
    /// `AWS_MAX_ATTEMPTS` is set.
    pub async fn from_env(bucket: &str, prefix: &str) -> Result<S3Store> {
        let (bucket, prefix) = checked(bucket, prefix)?;
        let force_path_style = env_flag(FORCE_PATH_STYLE_ENV)?;
        let remote = env_remote(aws_config::defaults(BehaviorVersion::latest()), force_path_style).await;
        Ok(Self::with_remote(bucket, prefix, remote))
    }

    fn with_remote(bucket: String, prefix: String, remote: Remote) -> S3Store {
        S3Store { bucket, prefix, remote, bucket_checked: OnceCell::new() }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The prefix the store's keys are under, without trailing slash; empty for the root.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The object key of a store key.
    fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// `s3://bucket/prefix/key`, for messages.
    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.object_key(key))
    }

    /// The lowercase hex sha256 of the object at `key`, or `None` if there is none. The
    /// body is hashed as it streams, so an object of any size takes constant memory.
    pub async fn sha256(&self, key: &str) -> Result<Option<String>> {
        use sha2::{Digest, Sha256};
        let hasher = self.read_chunks(key, Sha256::new, |hasher, chunk| hasher.update(chunk)).await?;
        Ok(hasher.map(|h| hex::encode(h.finalize())))
    }

    /// Streams the object at `key` into `fold`, chunk by chunk as the body arrives,
    /// starting from `init()`; `None` if there is no such object. The SDK retries the
    /// request, but not a body that breaks off while streaming: those start over here.
    async fn read_chunks<A>(&self, key: &str, init: impl Fn() -> A, fold: impl Fn(&mut A, &[u8])) -> Result<Option<A>> {
        validate_key(key)?;
        let remote = &self.remote;
        self.check_bucket(remote, key).await?;
        let mut attempt = 1;
        loop {
            let Some(mut body) = self.get_object(remote, key).await? else { return Ok(None) };
            let mut acc = init();
            let streamed = loop {
                match body.try_next().await {
                    Ok(Some(chunk)) => fold(&mut acc, &chunk),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            match streamed {
                Ok(()) => return Ok(Some(acc)),
                Err(_) if attempt < remote.max_attempts => {
                    tokio::time::sleep(remote.backoff.saturating_mul(1 << (attempt - 1).min(6))).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(Error::Remote {
                        key: self.uri(key),
                        message: format!("reading the object failed (tried {attempt} times): {}", causes(&e)),
                    })
                }
            }
        }
    }

    /// GetObject's body, or `None` if there is no such object.
    async fn get_object(&self, remote: &Remote, key: &str) -> Result<Option<ByteStream>> {
        match remote.client.get_object().bucket(&self.bucket).key(self.object_key(key)).send().await {
            Ok(out) => Ok(Some(out.body)),
            Err(e) => {
                let missing = match e.as_service_error() {
                    Some(se) if se.is_no_such_key() => true,
                    // Some servers answer a bare 404 with no error code.
                    Some(_) => status(&e) == Some(404) && e.code().is_none(),
                    None => false,
                };
                if missing {
                    Ok(None)
                } else {
                    Err(self.remote_error(remote, key, "GetObject", e))
                }
            }
        }
    }

    /// Fails clearly if the bucket does not exist, once per store: S3-compatible servers
    /// differ in what a missing bucket does to GetObject and PutObject (some answer
    /// NoSuchKey, some create it).
    async fn check_bucket(&self, remote: &Remote, key: &str) -> Result<()> {
        self.bucket_checked
            .get_or_try_init(|| async {
                match remote.client.head_bucket().bucket(&self.bucket).send().await {
                    Ok(_) => Ok(()),
                    Err(e) => match status(&e) {
                        Some(404) => Err(Error::Remote { key: self.uri(key), message: self.no_such_bucket(remote) }),
                        // Forbidden: HeadBucket needs s3:ListBucket, which a writer may lack;
                        // let the operation itself say whether it is allowed.
                        Some(403) => Ok(()),
                        _ => Err(self.remote_error(remote, key, "HeadBucket", e)),
                    },
                }
            })
            .await
            .map(|_| ())
    }

    fn no_such_bucket(&self, remote: &Remote) -> String {
        match &remote.endpoint {
            Some(ep) => format!("bucket {:?} does not exist at {ep}", self.bucket),
            None => format!("bucket {:?} does not exist", self.bucket),
        }
    }

    fn remote_error<E>(&self, remote: &Remote, key: &str, op: &str, err: SdkError<E>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let n = remote.max_attempts;
        let endpoint = remote.endpoint.as_deref().unwrap_or("S3");
        let message = match &err {
            SdkError::ServiceError(_) => {
                let status = status(&err).unwrap_or(0);
                let code = err.code().unwrap_or("");
                let detail = match (code, err.message()) {
                    ("", Some(m)) => format!("HTTP {status}: {m}"),
                    ("", None) => format!("HTTP {status}"),
                    (c, Some(m)) => format!("HTTP {status} {c}: {m}"),
                    (c, None) => format!("HTTP {status} {c}"),
                };
                match code {
                    "NoSuchBucket" => self.no_such_bucket(remote),
                    "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" | "InvalidToken" => {
                        format!("{op} was refused ({detail}); check the credentials and the bucket's permissions")
                    }
                    _ if status >= 500 || status == 429 || code == "SlowDown" || code == "Throttling" => {
                        format!("{op} failed after {n} attempts ({detail})")
                    }
                    _ if status == 301 => {
                        let region = err
                            .raw_response()
                            .and_then(|r| r.headers().get("x-amz-bucket-region"))
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default();
                        format!("{op} failed ({detail}): the bucket is in another region{region}; set AWS_REGION to it")
                    }
                    _ => format!("{op} failed ({detail})"),
                }
            }
            SdkError::TimeoutError(_) => format!("{op} timed out (tried {n} times)"),
            SdkError::DispatchFailure(d) if d.is_timeout() => {
                format!("{op} timed out waiting for {endpoint} (tried up to {n} times): {}", causes(&err))
            }
            SdkError::DispatchFailure(_) => {
                format!("{op} could not reach {endpoint} (tried up to {n} times): {}", causes(&err))
            }
            SdkError::ResponseError(_) => {
                format!("{op} got an unreadable response from {endpoint} (tried up to {n} times): {}", causes(&err))
            }
            _ => format!("{op} failed: {}", causes(&err)),
        };
        Error::Remote { key: self.uri(key), message }
    }
}

/// An error and its sources, `outer: inner: innermost`, skipping repeats.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn status<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// A client from the SDK's configuration chain.
async fn env_remote(loader: aws_config::ConfigLoader, force_path_style: bool) -> Remote {
    let sdk = loader.http_client(http_client()).load().await;
    let defaults = S3Config::default();
    let mut b = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(force_path_style);
    if sdk.region().is_none() {
        b = b.region(Region::new(DEFAULT_REGION));
    }
    let max_attempts = if std::env::var_os("AWS_MAX_ATTEMPTS").is_some() {
        sdk.retry_config().map(|r| r.max_attempts()).unwrap_or(defaults.max_attempts)
    } else {
        b = b.retry_config(defaults.retry_config());
        defaults.max_attempts
    };
    // Keep any timeouts the environment set; fill in ours for the rest.
    let mut timeouts = sdk.timeout_config().cloned().unwrap_or_else(TimeoutConfig::disabled);
    timeouts.take_defaults_from(&defaults.timeout_config());
    b = b.timeout_config(timeouts);
    Remote {
        client: Client::from_conf(b.build()),
        endpoint: sdk.endpoint_url().map(str::to_string),
        max_attempts,
        backoff: defaults.initial_backoff,
    }
}

/// A content type from the key's extension, so objects serve sensibly over HTTP.
#[async_trait]
impl ArtifactStore for S3Store {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        validate_key(key)?;
        let remote = &self.remote;
        self.check_bucket(remote, key).await?;
        remote
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .content_type(crate::store::content_type(key))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| self.remote_error(remote, key, "PutObject", e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.read_chunks(key, Vec::new, |bytes, chunk| bytes.extend_from_slice(chunk)).await
    }

    async fn size(&self, key: &str) -> Result<Option<u64>> {
        validate_key(key)?;
        let remote = &self.remote;
        self.check_bucket(remote, key).await?;
        match remote.client.head_object().bucket(&self.bucket).key(self.object_key(key)).send().await {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            // HeadObject has no body, so a missing object is a bare 404.
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.remote_error(remote, key, "HeadObject", e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // As LocalStore: the directory part of the prefix must be a plain relative path.
        if let Some(i) = prefix.rfind('/') {
            validate_key(&prefix[..i])?;
        }
        let remote = &self.remote;
        self.check_bucket(remote, prefix).await?;
        let root = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let full = format!("{root}{prefix}");
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = remote
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .set_prefix((!full.is_empty()).then(|| full.clone()))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.remote_error(remote, prefix, "ListObjectsV2", e))?;
            for object in out.contents() {
                let Some(rel) = object.key().and_then(|k| k.strip_prefix(root.as_str())) else { continue };
                // Skip "directory" markers that consoles create.
                if !rel.is_empty() && !rel.ends_with('/') {
                    keys.push(rel.to_string());
                }
            }
            if out.is_truncated() != Some(true) {
                break;
            }
            match out.next_continuation_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => {
                    return Err(Error::Remote {
                        key: self.uri(prefix),
                        message: "ListObjectsV2 said the listing was truncated but gave no continuation token".into(),
                    })
                }
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let remote = &self.remote;
        self.check_bucket(remote, key).await?;
        // DeleteObject succeeds for a key that is not there.
        remote
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
            .map_err(|e| self.remote_error(remote, key, "DeleteObject", e))?;
        Ok(())
    }

    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::conformance;
    use loupe_testsupport::{S3Server, S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY};
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn config(endpoint: String) -> S3Config {
        S3Config {
            endpoint: Some(endpoint),
            region: Some(S3_REGION.to_string()),
            force_path_style: true,
            credentials: Some(S3Credentials::new(S3_ACCESS_KEY, S3_SECRET_KEY)),
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(10),
        }
    }

    /// A store on the test server, with short retries.
    pub(crate) fn store(server: &S3Server, bucket: &str, prefix: &str) -> S3Store {
        S3Store::new(bucket, prefix, &config(server.endpoint())).unwrap()
    }

    /// Fails the test instead of hanging.
    async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), f).await.unwrap_or_else(|_| panic!("{what} hung"))
    }

    #[test]
    fn parses_s3_uris() {
        let ok = |u: &str| parse_s3_uri(u).unwrap();
        assert_eq!(ok("s3://bucket/some/prefix"), ("bucket".into(), "some/prefix".into()));
        assert_eq!(ok("s3://bucket/some/prefix///"), ("bucket".into(), "some/prefix".into()));
        assert_eq!(ok("s3://bucket"), ("bucket".into(), "".into()));
        assert_eq!(ok("s3://bucket/"), ("bucket".into(), "".into()));
        assert_eq!(ok("s3://my.bucket-1/a"), ("my.bucket-1".into(), "a".into()));
        for bad in ["bucket/prefix", "s3:/bucket", "file:///x", "s3://", "s3:///prefix", "s3://bucket//x", "s3://bucket/a/../b", "s3://bu cket/x", "s3://bucket/a//b", "s3://key:secret@bucket/x"] {
            match parse_s3_uri(bad) {
                Err(Error::Invalid { what: "S3 URI", message }) => assert!(message.contains(bad), "{message}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn parses_the_path_style_flag() {
        assert!(!parse_flag("X", None).unwrap());
        for v in ["", "0", "false", "No"] {
            assert!(!parse_flag("X", Some(v)).unwrap(), "{v}");
        }
        for v in ["1", "true", "YES", " on "] {
            assert!(parse_flag("X", Some(v)).unwrap(), "{v}");
        }
        assert!(parse_flag("X", Some("maybe")).is_err());
    }

    #[test]
    fn location_and_keys() {
        let cfg = S3Config::default();
        let s = S3Store::new("b", "atlases/run-1/", &cfg).unwrap();
        assert_eq!(s.location(), "s3://b/atlases/run-1");
        assert_eq!(s.object_key("a/x.png"), "atlases/run-1/a/x.png");
        assert_eq!(S3Store::new("b", "", &cfg).unwrap().location(), "s3://b");
        assert!(S3Store::new("", "x", &cfg).is_err());
        assert!(S3Store::new("b", "../x", &cfg).is_err());
        assert!(S3Store::new("b", "x", &S3Config { max_attempts: 0, ..S3Config::default() }).is_err());
        let creds = format!("{:?}", S3Credentials::new("id", "very-secret"));
        assert!(!creds.contains("very-secret"), "{creds}");
        assert_eq!(crate::store::content_type("a/b.PNG"), "image/png");
        assert_eq!(crate::store::content_type("models/demo.pt"), "application/octet-stream");
    }

    #[tokio::test]
    async fn s3_store_conforms() {
        let server = S3Server::start(&["bucket", "root"]);
        let s = store(&server, "bucket", "atlases/run-1");
        bounded("conformance", async {
            conformance::put_get_overwrite(&s).await;
            conformance::list_by_prefix(&s).await;
            conformance::refuses_escaping_keys(&s).await;
            conformance::delete_removes_only_its_key(&s).await;
        })
        .await;
        // The objects really are under the prefix.
        assert!(server.root.path().join("bucket/atlases/run-1/a/b/c.json").is_file());

        // And at the root of a bucket.
        let s = store(&server, "root", "");
        bounded("conformance at the root", async {
            conformance::put_get_overwrite(&s).await;
            conformance::list_by_prefix(&s).await;
        })
        .await;
    }

    /// The `from_env` path (SDK configuration chain), with the values given to the loader
    /// rather than through the process environment.
    #[tokio::test]
    async fn sdk_config_chain_store_conforms() {
        let server = S3Server::start(&["bucket"]);
        let loader = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(server.endpoint())
            .region(Region::new(S3_REGION))
            .credentials_provider(Credentials::new(S3_ACCESS_KEY, S3_SECRET_KEY, None, None, "test"));
        let remote = env_remote(loader, true).await;
        let s = S3Store::with_remote("bucket".into(), "p".into(), remote);
        bounded("conformance", conformance::put_get_overwrite(&s)).await;
    }

    #[tokio::test]
    async fn lists_more_than_a_thousand_keys() {
        let server = S3Server::start(&["bucket"]);
        let s = Arc::new(store(&server, "bucket", "big"));
        let n = 1234;
        let mut expected: Vec<String> = (0..n).map(|i| format!("many/{i}.json")).collect();
        bounded("writing keys", async {
            for chunk in expected.chunks(64) {
                let mut set = tokio::task::JoinSet::new();
                for k in chunk {
                    let (s, k) = (s.clone(), k.clone());
                    set.spawn(async move { s.put(&k, b"{}".to_vec()).await });
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap().unwrap();
                }
            }
        })
        .await;
        s.put("other.json", vec![]).await.unwrap();
        expected.sort();
        let listed = bounded("listing", s.list("many/")).await.unwrap();
        assert_eq!(listed.len(), n);
        assert_eq!(listed, expected);
        assert_eq!(s.list("").await.unwrap().len(), n + 1);
    }

    #[tokio::test]
    async fn other_prefixes_are_not_listed() {
        let server = S3Server::start(&["bucket"]);
        let a = store(&server, "bucket", "atlas");
        let a2 = store(&server, "bucket", "atlas2");
        let root = store(&server, "bucket", "");
        bounded("isolation", async {
            a.put("atlas.json", b"a".to_vec()).await.unwrap();
            a.put("layers/x/layer.json", b"a".to_vec()).await.unwrap();
            a2.put("atlas.json", b"a2".to_vec()).await.unwrap();
            root.put("atlas.json", b"root".to_vec()).await.unwrap();
            root.put("atlasx.json", b"root".to_vec()).await.unwrap();

            assert_eq!(a.list("").await.unwrap(), vec!["atlas.json".to_string(), "layers/x/layer.json".to_string()]);
            assert_eq!(a.list("atlas").await.unwrap(), vec!["atlas.json".to_string()]);
            assert_eq!(a2.list("").await.unwrap(), vec!["atlas.json".to_string()]);
            assert_eq!(a.get("atlas.json").await.unwrap().unwrap(), b"a");
            assert_eq!(a2.get("atlas.json").await.unwrap().unwrap(), b"a2");
            assert_eq!(root.get("atlas.json").await.unwrap().unwrap(), b"root");
            assert_eq!(a2.get("layers/x/layer.json").await.unwrap(), None);
            assert_eq!(
                root.list("").await.unwrap(),
                vec!["atlas.json", "atlas/atlas.json", "atlas/layers/x/layer.json", "atlas2/atlas.json", "atlasx.json"]
            );
        })
        .await;
    }

    #[tokio::test]
    async fn round_trips_a_large_object() {
        let server = S3Server::start(&["models"]);
        let s = store(&server, "models", "");
        let bytes: Vec<u8> = (0..24 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        bounded("large object", async {
            s.put("models/demo.pt", bytes.clone()).await.unwrap();
            let got = s.get("models/demo.pt").await.unwrap().expect("the object is there");
            assert!(got == bytes, "the object came back different ({} bytes)", got.len());
        })
        .await;
    }

    #[tokio::test]
    async fn a_missing_bucket_is_a_clear_error() {
        let server = S3Server::start(&["bucket"]);
        let s = store(&server, "no-such-bucket", "p");
        let msgs = bounded("missing bucket", async {
            vec![
                s.get("atlas.json").await.unwrap_err().to_string(),
                s.put("atlas.json", vec![1]).await.unwrap_err().to_string(),
                s.list("").await.unwrap_err().to_string(),
            ]
        })
        .await;
        for m in msgs {
            assert!(m.contains("s3://no-such-bucket/p"), "{m}");
            assert!(m.contains("bucket \"no-such-bucket\" does not exist"), "{m}");
        }
        assert!(!server.root.path().join("no-such-bucket").exists(), "put must not create the bucket");
    }

    #[tokio::test]
    async fn wrong_credentials_are_a_clear_error() {
        let server = S3Server::start(&["bucket"]);
        let cfg = S3Config { credentials: Some(S3Credentials::new(S3_ACCESS_KEY, "wrong")), ..config(server.endpoint()) };
        let s = S3Store::new("bucket", "p", &cfg).unwrap();
        let e = bounded("wrong credentials", s.put("a.json", vec![1])).await.unwrap_err().to_string();
        assert!(e.contains("s3://bucket/p/a.json") && e.contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn a_down_server_fails_after_retries() {
        let port = loupe_testsupport::free_port();
        let s = S3Store::new("bucket", "p", &config(format!("http://127.0.0.1:{port}"))).unwrap();
        // `bounded` is the check that the retries end: it fails the test if they do not.
        let e = bounded("down server", s.get("atlas.json")).await.unwrap_err().to_string();
        assert!(e.contains("s3://bucket/p/atlas.json") && e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }

    /// A plain-HTTP server that answers each request with `respond(n)` (n counts from 0)
    /// and closes the connection; `None` holds the connection open without answering.
    fn fake_server(respond: impl Fn(usize) -> Option<String> + Send + 'static) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = Vec::new();
                let mut byte = [0u8; 1];
                while !buf.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => buf.push(byte[0]),
                        _ => break,
                    }
                }
                // Read the body too: closing a socket with unread data resets it, and the
                // client would see the reset rather than the response.
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<u64>().unwrap_or(0)))
                    .unwrap_or(0);
                let _ = std::io::copy(&mut (&mut conn).take(len), &mut std::io::sink());
                let n = c.fetch_add(1, Ordering::SeqCst);
                match respond(n) {
                    Some(r) => {
                        let _ = conn.write_all(r.as_bytes());
                    }
                    None => held.push(conn),
                }
            }
        });
        (endpoint, count)
    }

    fn http(status: &str, body: &str) -> String {
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    }

    const UNAVAILABLE: &str = "<Error><Code>ServiceUnavailable</Code><Message>try later</Message></Error>";

    #[tokio::test]
    async fn retries_server_errors_then_succeeds() {
        // The first request is the bucket check.
        let (endpoint, count) = fake_server(|n| match n {
            0 => Some(http("200 OK", "")),
            1 | 2 => Some(http("503 Service Unavailable", UNAVAILABLE)),
            _ => Some(http("200 OK", "hello")),
        });
        let s = S3Store::new("bucket", "p", &config(endpoint)).unwrap();
        let got = bounded("flaky server", s.get("atlas.json")).await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"hello"[..]));
        assert_eq!(count.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn hashes_a_large_object_as_it_streams() {
        let server = S3Server::start(&["models"]);
        let s = store(&server, "models", "");
        let bytes: Vec<u8> = (0..24 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        bounded("hashing", async {
            s.put("big.pt", bytes.clone()).await.unwrap();
            assert_eq!(s.sha256("big.pt").await.unwrap(), Some(crate::sha256_bytes(&bytes)));
            assert_eq!(s.sha256("missing.pt").await.unwrap(), None);
        })
        .await;
    }

    #[tokio::test]
    async fn hashing_starts_over_after_a_body_that_breaks_off() {
        let (endpoint, count) = fake_server(|n| match n {
            0 => Some(http("200 OK", "")),
            1 => Some("HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nhel".to_string()),
            _ => Some(http("200 OK", "hello")),
        });
        let s = S3Store::new("bucket", "", &config(endpoint)).unwrap();
        let got = bounded("broken body", s.sha256("models/demo.pt")).await.unwrap();
        assert_eq!(got, Some(crate::sha256_bytes(b"hello")), "the partial body must not count");
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retries_a_body_that_breaks_off() {
        let (endpoint, count) = fake_server(|n| match n {
            0 => Some(http("200 OK", "")),
            1 => Some("HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nhel".to_string()),
            _ => Some(http("200 OK", "hello")),
        });
        let s = S3Store::new("bucket", "", &config(endpoint)).unwrap();
        let got = bounded("broken body", s.get("models/demo.pt")).await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"hello"[..]));
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_on_persistent_server_errors() {
        let (endpoint, count) = fake_server(|n| match n {
            0 => Some(http("200 OK", "")),
            _ => Some(http("503 Service Unavailable", UNAVAILABLE)),
        });
        let cfg = S3Config { max_attempts: 4, ..config(endpoint) };
        let s = S3Store::new("bucket", "p", &cfg).unwrap();
        let e = bounded("failing server", s.put("a.json", b"{}".to_vec())).await.unwrap_err().to_string();
        assert!(e.contains("s3://bucket/p/a.json") && e.contains("503") && e.contains("after 4 attempts"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1 + 4);
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let (endpoint, count) = fake_server(|n| match n {
            0 => Some(http("200 OK", "")),
            _ => None,
        });
        let cfg = S3Config { max_attempts: 2, read_timeout: Duration::from_millis(300), ..config(endpoint) };
        let s = S3Store::new("bucket", "p", &cfg).unwrap();
        let e = bounded("silent server", s.list("")).await.unwrap_err().to_string();
        assert!(e.contains("s3://bucket/p/") && e.contains("ListObjectsV2 timed out"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1 + 2);
    }
}
