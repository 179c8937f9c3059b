use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid {what}: {message}")]
    Invalid { what: &'static str, message: String },
    #[error("artifact {key}: {source}")]
    Io { key: String, source: std::io::Error },
    #[error("artifact {key} is not valid JSON: {source}")]
    Json { key: String, source: serde_json::Error },
    /// A remote store (S3) refused or failed a request; `key` names the bucket and object.
    #[error("artifact {key}: {message}")]
    Remote { key: String, message: String },
    /// An atlas already holds something this job would contradict (another model, other
    /// render settings).
    #[error("{0}")]
    Conflict(String),
}

impl Error {
    pub fn invalid(what: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid { what, message: message.into() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
