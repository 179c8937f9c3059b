//! A job's id, and its progress as the coordinator's state store keeps it and clients see it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::spec::JobSpec;

/// A job's id, made by [`JobId::generate`] (`job-<yyyymmdd>t<hhmmss>-<8 hex digits>`;
/// jobs recorded before that are `job-<n>`). Ids also come in from users and
/// over gRPC, so they are checked once, where they arrive. '/' and '#' are refused
/// because task and lease ids (`<job>/<index>#<attempt>`) and atlas keys embed the job
/// id; whitespace and control characters because ids are printed and typed back.
/// It serialises as the plain string, so stored and wire formats stay as they were.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// A new id, unique across coordinators, their restarts and state stores: atlas keys
    /// (`partials/<job>/`) and leases embed it, so a repeated id would mix two jobs' work.
    /// The UTC time makes it readable, 32 random bits unique among jobs of one second.
    pub fn generate() -> JobId {
        use rand::RngCore;
        let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        // "2026-12-01T23:59:00Z" -> "20261201t235900"
        let compact: String = time.chars().filter(char::is_ascii_alphanumeric).take(15).collect::<String>().to_ascii_lowercase();
        JobId(format!("job-{compact}-{:08x}", rand::rngs::OsRng.next_u32()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for JobId {
    type Error = crate::Error;
    fn try_from(s: String) -> crate::Result<JobId> {
        let bad = |why: &str| Err(crate::Error::invalid("job id", format!("{s:?} {why}")));
        if s.is_empty() {
            return bad("is empty");
        }
        if let Some(c) = s.chars().find(|&c| c == '/' || c == '#' || c.is_whitespace() || c.is_control()) {
            return bad(&format!("contains {c:?}"));
        }
        Ok(JobId(s))
    }
}

impl FromStr for JobId {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<JobId> {
        JobId::try_from(s.to_string())
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Tasks are pending or leased.
    Running,
    /// Every task is done; the coordinator is writing the atlas index.
    Indexing,
    Succeeded,
    Failed { message: String },
    Cancelled,
}

impl JobState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled)
    }
}

/// A job as the state store knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    pub created_ms: u64,
    /// Every task of the job: renders, dataset maps and reduces.
    pub tasks_total: u32,
    pub tasks_done: u32,
    /// Dataset map tasks (one per shard), among the tasks above; 0 without a dataset.
    #[serde(default)]
    pub maps_total: u32,
    #[serde(default)]
    pub maps_done: u32,
    /// Dataset reduce tasks (one per layer), among the tasks above; 0 without a dataset.
    #[serde(default)]
    pub reduces_total: u32,
    #[serde(default)]
    pub reduces_done: u32,
    /// Images (unit x technique) the job covers, including those already in the atlas.
    pub images_total: u64,
    /// Images already complete in the atlas when the job was submitted (a resume).
    pub images_skipped: u64,
    /// Images rendered by this job's finished tasks (map and reduce tasks render none).
    pub images_done: u64,
    /// Images of the job whose optimisation diverged, recorded as failed in the atlas;
    /// counted when the job ends (0 until then).
    #[serde(default)]
    pub images_failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_parse_and_print_back() {
        for good in ["job-1", "job-42", "nonsense", "a.b_c-d"] {
            let id: JobId = good.parse().unwrap();
            assert_eq!((id.as_str(), id.to_string()), (good, good.to_string()));
            assert_eq!(serde_json::to_string(&id).unwrap(), format!("{good:?}"));
            assert_eq!(serde_json::from_str::<JobId>(&format!("{good:?}")).unwrap(), id);
        }
        for (bad, why) in [("", "is empty"), ("a/b", "'/'"), ("job-1#2", "'#'"), ("job 1", "' '"), ("job-1\n", "'\\n'"), ("\u{7f}", "'\\u{7f}'")] {
            let e = bad.parse::<JobId>().unwrap_err().to_string();
            assert!(e.starts_with("invalid job id") && e.contains(why), "{bad:?}: {e}");
        }
        assert!(serde_json::from_str::<JobId>(r#""a/b""#).is_err());
    }

    #[test]
    fn generated_job_ids_are_unique_readable_and_valid() {
        let ids: std::collections::HashSet<JobId> = (0..1000).map(|_| JobId::generate()).collect();
        assert_eq!(ids.len(), 1000, "ids repeat");
        for id in &ids {
            let s = id.as_str();
            let (time, random) = s.strip_prefix("job-").unwrap().split_once('-').unwrap();
            assert!(time.len() == 15 && time.as_bytes()[8] == b't' && time.starts_with("20"), "{s}");
            assert!(random.len() == 8 && random.chars().all(|c| c.is_ascii_hexdigit()), "{s}");
            assert_eq!(s.parse::<JobId>().unwrap(), *id);
        }
    }
}
