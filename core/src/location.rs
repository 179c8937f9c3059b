//! Where something lives: a local path or an S3 object or prefix. URIs are told apart
//! here and nowhere else.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Error, Result};

/// A local path (`PATH` or `file://PATH`) or `s3://bucket/key-or-prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    Local(PathBuf),
    /// `key` has no leading or trailing slash; empty for the bucket's root.
    S3 { bucket: String, key: String },
}

impl Location {
    /// Parses a location as users write it; the error names `what` (`output`, `model`...).
    pub fn parse(what: &'static str, uri: &str) -> Result<Location> {
        if uri.trim().is_empty() {
            return Err(Error::invalid(what, format!("the {what} location is empty")));
        }
        if uri.starts_with("s3://") {
            let (bucket, key) = crate::s3::parse_s3_uri(uri)?;
            return Ok(Location::S3 { bucket, key });
        }
        if let Some((scheme, _)) = uri.split_once("://") {
            if scheme != "file" {
                return Err(Error::invalid(what, format!("{uri:?}: unsupported scheme {scheme:?}; use s3://bucket/prefix or a local path")));
            }
        }
        Ok(Location::Local(PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri))))
    }

}

impl FromStr for Location {
    type Err = Error;
    fn from_str(s: &str) -> Result<Location> {
        Location::parse("location", s)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, key } if key.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_once_and_print_back() {
        assert_eq!(Location::parse("output", "atlas/demo").unwrap(), Location::Local("atlas/demo".into()));
        assert_eq!(Location::parse("output", "file:///tmp/a").unwrap(), Location::Local("/tmp/a".into()));
        let s3 = Location::parse("output", "s3://bucket/atlases/run1/").unwrap();
        assert_eq!(s3, Location::S3 { bucket: "bucket".into(), key: "atlases/run1".into() });
        assert_eq!(s3.to_string(), "s3://bucket/atlases/run1");
        assert_eq!(Location::parse("output", "s3://bucket").unwrap().to_string(), "s3://bucket");
        let e = Location::parse("output", "gs://b/x").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme \"gs\""), "{e}");
        assert!(Location::parse("output", " ").unwrap_err().to_string().contains("empty"));
        assert!(Location::parse("output", "s3://").is_err());
    }
}
