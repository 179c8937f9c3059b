//! Where something lives: a local path or an S3 object or prefix. URIs are told apart
//! here and nowhere else.

use std::fmt;
use std::path::{Component, PathBuf};
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

    /// Whether this location is `prefix` or lies below it, by whole segments
    /// (`s3://b/atlases` holds `s3://b/atlases/run1`, not `s3://b/atlases2`). A relative
    /// path or a `..` segment lies under nothing: where it ends up is not in its text.
    pub fn is_under(&self, prefix: &Location) -> bool {
        self.unplaceable().is_none() && prefix.unplaceable().is_none() && self.within(prefix)
    }

    /// Refuses this location unless it lies under one of `prefixes` ([`Location::is_under`]);
    /// the error names `field`, the location and why.
    pub fn require_under(&self, field: &'static str, prefixes: &[Location]) -> Result<()> {
        if let Some(why) = self.unplaceable() {
            return Err(Error::invalid(field, format!("{self} {why}")));
        }
        if prefixes.iter().any(|p| self.is_under(p)) {
            return Ok(());
        }
        let list = prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
        Err(Error::invalid(field, format!("{self} is not under any location this cluster allows ({list})")))
    }

    /// Why no prefix can hold this location, if none can: a relative path or `..` (an S3
    /// key with one does not parse).
    pub fn unplaceable(&self) -> Option<&'static str> {
        match self {
            Location::Local(p) if !p.is_absolute() => Some("is a relative path; give an absolute one"),
            Location::Local(p) if p.components().any(|c| c == Component::ParentDir) => Some("has a `..` segment"),
            _ => None,
        }
    }

    fn within(&self, prefix: &Location) -> bool {
        match (self, prefix) {
            // Path::starts_with compares whole components.
            (Location::Local(path), Location::Local(root)) => path.starts_with(root),
            (Location::S3 { bucket, key }, Location::S3 { bucket: root_bucket, key: root }) => {
                bucket == root_bucket && (root.is_empty() || key == root || key.strip_prefix(root.as_str()).is_some_and(|rest| rest.starts_with('/')))
            }
            _ => false,
        }
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

    #[test]
    fn a_location_is_under_a_prefix_by_whole_segments_and_never_through_dot_dot() {
        let at = |uri: &str| Location::parse("test", uri).unwrap();
        let under = |uri: &str, prefix: &str| at(uri).is_under(&at(prefix));
        assert!(under("s3://b/atlases/run1", "s3://b/atlases"));
        assert!(under("s3://b/atlases/run1", "s3://b/atlases/"));
        assert!(under("s3://b/atlases", "s3://b/atlases"));
        assert!(under("s3://b/any/thing", "s3://b"));
        assert!(!under("s3://b/atlases2/run1", "s3://b/atlases"));
        assert!(!under("s3://other/atlases/run1", "s3://b/atlases"));
        assert!(Location::parse("test", "s3://b/atlases/../secrets").is_err(), "an S3 key of plain segments only");
        assert!(under("/data/models/m.pt", "/data/models"));
        assert!(under("file:///data/models/m.pt", "/data"));
        assert!(!under("/data/models2/m.pt", "/data/models"));
        assert!(!under("/data/models/../../etc/passwd", "/data/models"));
        assert!(!under("data/models/m.pt", "data/models"), "relative paths resolve against an unknown directory");
        assert!(!under("/", "/data"));
        assert!(!under("/data/m.pt", "s3://data"), "a local path is never under a bucket");
        assert!(!under("s3://data/m.pt", "/data"));
    }

    #[test]
    fn a_refused_location_names_the_field_the_location_and_the_reason() {
        let prefixes = [Location::parse("test", "s3://models/shared").unwrap(), Location::parse("test", "/srv/data").unwrap()];
        let refused = |uri: &str| Location::parse("dataset", uri).unwrap().require_under("dataset", &prefixes).unwrap_err().to_string();
        let e = refused("/");
        assert!(e.contains("invalid dataset: / is not under") && e.contains("(s3://models/shared, /srv/data)"), "{e}");
        let e = refused("/srv/data/../secrets");
        assert!(e.contains("invalid dataset: /srv/data/../secrets has a `..` segment"), "{e}");
        let e = refused("images");
        assert!(e.contains("images is a relative path"), "{e}");
        assert!(Location::parse("m", "s3://models/shared/m.pt").unwrap().require_under("model", &prefixes).is_ok());
        assert!(Location::parse("m", "/srv/data/imagenet").unwrap().require_under("dataset", &prefixes).is_ok());
    }
}
