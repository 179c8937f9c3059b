//! State in Redis, shared by the coordinators of a cluster. Every transition is one Lua
//! script (EVALSHA, loaded again by itself after a Redis restart), so it is atomic: two
//! coordinators never grant one task twice, and a coordinator killed mid-request leaves
//! either the whole transition or none of it. The lease policy comes in as arguments,
//! exactly as in [`super::MemoryStateStore`], whose behaviour this matches. Lease
//! deadlines follow one clock, Redis's own (`TIME`, allowed in scripts that write since
//! Redis 7 replicates their effects), so coordinators whose clocks disagree never reclaim
//! each other's live leases; a job's submission and end times are the coordinator's.
//!
//! Keys, under a prefix (`loupe:` by default):
//!
//! - `jobseq`: counter of submitted jobs: each job's submission number. Job ids are
//!   [`JobId::generate`]d apart from it (older coordinators named jobs `job-<n>` after
//!   it), so a new Redis or prefix never repeats an id.
//! - `jobindex`: ZSET of job ids scored by their submission number, for listing newest
//!   first a page at a time (a LIST `jobs` of an older coordinator is moved here at
//!   connect).
//! - `indexing`: SET of the ids of jobs in the `indexing` state, added by the scripts that
//!   enter it (create, complete) and removed by those that end a job, so coordinators find
//!   jobs left indexing without reading every job.
//! - `ended`: ZSET of the ids of jobs that succeeded, failed or were cancelled, scored by
//!   when (ms); `expire_jobs` drops those older than the retention: their hash and their
//!   place in both sets.
//! - `job:<id>`: HASH of the job's status: `spec` and `ctx` (the [`JobContext`] a lease
//!   carries) as JSON, `state` (`running`, `indexing`, `succeeded`, `failed`,
//!   `cancelled`), `message`, and the counters (`tasks_*`, `images_*`, and `maps_total`,
//!   `maps_done`, `reduces_total`, `reduces_done` for dataset tasks; absent in jobs
//!   stored before datasets, read as 0).
//! - `tasks:<id>`: HASH of the job's tasks: `<index>` -> [`TaskSpec`] JSON, `n<index>` ->
//!   the images it renders (its units; 0 for dataset tasks), `a<index>` -> leases granted,
//!   `r<index>` -> leases handed back by stopping workers (attempts used are `a - r`),
//!   `k<index>` -> `map` or `reduce` for a dataset task (absent for a render), and the
//!   dependencies: `w<index>` -> how many of the task's prerequisites are not yet done
//!   (present only while it waits), `d<index>` -> the tasks waiting on this one, as
//!   comma-separated half-open runs `<lo>:<hi>` (absent when none; every map of a job
//!   names its reduces in one run).
//! - `pending`: LIST of runnable tasks, oldest first. An entry is one task,
//!   `<job>/<index>`, or a half-open run of a new job's tasks, `<job>/<lo>:<hi>`, so
//!   submitting a job of any size queues it in O(1) and leasing from it stays O(1).
//!   Expired leases go back at the front, retries at the back. A waiting task is in no
//!   entry: the completion that brings its `w<index>` to 0 deletes that field and pushes
//!   it at the back, in the same script, so no lease can grant it early.
//! - `stats`: HASH of the monitoring totals (`lease_expiries`, `retries`, `failures`,
//!   `images_rendered`), counted by the scripts that make those transitions.
//! - `limits`: HASH lease id -> the task's maximum time (ms, Redis clock), past which it
//!   is not renewed.
//! - `leases`: HASH lease id -> worker; `deadlines`: ZSET lease id -> deadline (ms), so
//!   reclaiming reads only expired entries; `jobleases:<id>`: SET of a job's lease ids,
//!   dropped when the job fails or is cancelled.
//!
//! Once a job has ended its tasks are never read again, so `tasks:<id>` is dropped then;
//! the job hash stays, for listing, until `expire_jobs` finds it older than the retention.
//! (Not a Redis TTL: that would read the Redis clock, and expiry follows the coordinator's.)
//!
//! A job's tasks are written in pipelined chunks before the job exists (under a one-day
//! expiry, so a coordinator that dies mid-submit leaves nothing for long); one script
//! then records the job and queues its tasks, so the job appears all at once.
//!
//! The scripts touch keys they derive from the prefix, so this needs a standalone Redis
//! (or a cluster with the whole prefix in one hash slot, e.g. `{loupe}:`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ScriptInvocation};

use loupe_core::spec::{to_ranges, JobSpec};
use loupe_core::task::{Failure, JobContext, Lease, LeaseId, LeaseSecret, LeaseState, TaskSpec, Work};

use super::{count_dataset_tasks, Completion, Dependencies, JobCursor, JobId, JobState, JobStatus, JobsPage, LeasePolicy, NewTask, StateError, StateResult, StateStore, StoreCounters};

/// Tasks written per pipelined round trip when a job is submitted.
const TASKS_PER_ROUND_TRIP: usize = 2_000;
/// Tasks per HSET within a round trip.
const TASKS_PER_HSET: usize = 250;
/// How long the tasks of a job whose submission never finished are kept.
const UNFINISHED_SUBMIT_TTL_S: u64 = 86_400;
/// Jobs one script of `expire_jobs` drops, so that no script runs long.
const EXPIRED_PER_SCRIPT: usize = 256;

/// Helpers every script starts with. ARGV[1] is always the key prefix.
const PRELUDE: &str = r#"
local P = ARGV[1]
local PENDING = P .. 'pending'
local DEADLINES = P .. 'deadlines'
local LIMITS = P .. 'limits'
local LEASES = P .. 'leases'
local STATS = P .. 'stats'
local INDEX = P .. 'jobindex'
local ENDED = P .. 'ended'
local INDEXING = P .. 'indexing'
local function job_key(job) return P .. 'job:' .. job end
local function tasks_key(job) return P .. 'tasks:' .. job end
local function job_leases_key(job) return P .. 'jobleases:' .. job end

-- A lease id is '<job>/<index>#<attempt>.<secret>', as loupe_core::task::LeaseId writes
-- it. Only ids found whole in LEASES are parsed, so the secret is not read here; leases
-- granted before ids had one ('<job>/<index>#<attempt>') still parse, so they expire and
-- are reclaimed like any other.
local function parse_lease(id)
  return string.match(id, '^(.*)/(%d+)#(%d+)')
end

-- The attempts a lease's task has used: its attempt number less the leases handed back.
local function counted(job, index, attempt)
  return tonumber(attempt) - tonumber(redis.call('HGET', tasks_key(job), 'r' .. index) or '0')
end

local function is_terminal(state)
  return state == 'succeeded' or state == 'failed' or state == 'cancelled'
end

-- The one clock of lease deadlines (ms): Redis's, never a coordinator's.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function drop_lease(id, job)
  redis.call('HDEL', LEASES, id)
  redis.call('HDEL', LIMITS, id)
  redis.call('ZREM', DEADLINES, id)
  redis.call('SREM', job_leases_key(job), id)
end

local function drop_job_leases(job)
  local set = job_leases_key(job)
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    redis.call('HDEL', LEASES, id)
    redis.call('HDEL', LIMITS, id)
    redis.call('ZREM', DEADLINES, id)
  end
  redis.call('DEL', set)
end

-- Records when a job succeeded, failed or was cancelled, for expire_jobs.
local function job_ended(job, now)
  redis.call('ZADD', ENDED, now, job)
  redis.call('SREM', INDEXING, job)
end

local function fail_job(job, message, now)
  local key = job_key(job)
  local state = redis.call('HGET', key, 'state')
  if state and not is_terminal(state) then
    redis.call('HSET', key, 'state', 'failed', 'message', message)
    job_ended(job, now)
  end
  drop_job_leases(job)
  redis.call('UNLINK', tasks_key(job))
end

-- 0: held, 1: cancelled, 2: lost.
local function lease_state(id)
  if redis.call('HEXISTS', LEASES, id) == 1 then return 0 end
  local job = string.match(id, '^(.*)/') or ''
  if redis.call('HGET', job_key(job), 'state') == 'cancelled' then return 1 end
  return 2
end

-- Puts tasks whose lease ran out back at the front of the line (the one that expired
-- first ends up first), or fails their job when they have used every attempt.
local function reclaim_expired(now, max_attempts)
  while true do
    local ids = redis.call('ZREVRANGEBYSCORE', DEADLINES, now, '-inf', 'LIMIT', 0, 256)
    if #ids == 0 then return end
    for _, id in ipairs(ids) do
      redis.call('ZREM', DEADLINES, id)
      redis.call('HDEL', LIMITS, id)
      local worker = redis.call('HGET', LEASES, id)
      local job, index, attempt = parse_lease(id)
      if worker and job then
        redis.call('HDEL', LEASES, id)
        redis.call('SREM', job_leases_key(job), id)
        redis.call('HINCRBY', STATS, 'lease_expiries', 1)
        local used = counted(job, index, attempt)
        if used >= max_attempts then
          fail_job(job, 'task ' .. job .. '/' .. index .. ' lost its lease ' .. used
            .. ' times (last worker ' .. worker .. '): the worker died or stalled', now)
        else
          redis.call('HINCRBY', STATS, 'retries', 1)
          redis.call('LPUSH', PENDING, job .. '/' .. index)
        end
      end
    end
  end
end
"#;

/// ARGV: prefix, job id, spec, ctx, state, created_ms, tasks_total, images_total,
/// images_skipped, maps_total, reduces_total, its submission number, then the runs `<lo>:<hi>`
/// of tasks that are runnable at once (the others wait on prerequisites).
const CREATE: &str = r#"
local job = ARGV[2]
redis.call('HSET', job_key(job), 'id', job, 'spec', ARGV[3], 'ctx', ARGV[4], 'state', ARGV[5],
  'message', '', 'created_ms', ARGV[6], 'tasks_total', ARGV[7], 'tasks_done', '0',
  'images_total', ARGV[8], 'images_skipped', ARGV[9], 'images_done', '0',
  'maps_total', ARGV[10], 'maps_done', '0', 'reduces_total', ARGV[11], 'reduces_done', '0')
redis.call('ZADD', INDEX, ARGV[12], job)
if ARGV[5] == 'indexing' then redis.call('SADD', INDEXING, job) end
if tonumber(ARGV[7]) > 0 then
  redis.call('PERSIST', tasks_key(job))
  for i = 13, #ARGV do
    redis.call('RPUSH', PENDING, job .. '/' .. ARGV[i])
  end
end
return 1
"#;

/// ARGV: prefix, worker, ttl (ms), max_attempts, the new lease's secret (drawn by the
/// coordinator: a script's own random numbers are not secret).
/// Returns nil, or {lease id, task JSON, attempt, job context JSON}.
const LEASE: &str = r#"
local now = now_ms()
reclaim_expired(now, tonumber(ARGV[4]))
while true do
  local entry = redis.call('LINDEX', PENDING, 0)
  if not entry then return false end
  local job, rest = string.match(entry, '^(.*)/([^/]*)$')
  local index = nil
  if job and redis.call('HGET', job_key(job), 'state') == 'running' then
    local lo, hi = string.match(rest, '^(%d+):(%d+)$')
    if lo then
      local next_lo = tonumber(lo) + 1
      if next_lo < tonumber(hi) then
        redis.call('LSET', PENDING, 0, job .. '/' .. string.format('%d', next_lo) .. ':' .. hi)
      else
        redis.call('LPOP', PENDING)
      end
      index = lo
    else
      redis.call('LPOP', PENDING)
      index = rest
    end
  else
    -- cancelled or failed since it was queued
    redis.call('LPOP', PENDING)
  end
  if index then
    local tasks = tasks_key(job)
    local attempt = redis.call('HINCRBY', tasks, 'a' .. index, 1)
    local id = job .. '/' .. index .. '#' .. attempt .. '.' .. ARGV[5]
    redis.call('HSET', LEASES, id, ARGV[2])
    redis.call('ZADD', DEADLINES, now + tonumber(ARGV[3]), id)
    redis.call('SADD', job_leases_key(job), id)
    return {id, redis.call('HGET', tasks, index), attempt, redis.call('HGET', job_key(job), 'ctx')}
  end
end
"#;

/// ARGV: prefix, lease id, max (ms from now, Redis clock). Sets a granted lease's maximum
/// time: a second step of granting, as only the coordinator reads a task's size. Returns 1
/// if the lease is still held.
const LIMIT: &str = r#"
if redis.call('HEXISTS', LEASES, ARGV[2]) == 0 then return 0 end
redis.call('HSET', LIMITS, ARGV[2], now_ms() + tonumber(ARGV[3]))
return 1
"#;

/// ARGV: prefix, lease id, ttl (ms), max_attempts. Returns the lease state code. A lease
/// past its maximum time expires now instead.
const RENEW: &str = r#"
local id = ARGV[2]
local now = now_ms()
reclaim_expired(now, tonumber(ARGV[4]))
local state = lease_state(id)
if state ~= 0 then return state end
local limit = redis.call('HGET', LIMITS, id)
if limit and now >= tonumber(limit) then
  redis.call('ZADD', DEADLINES, 'XX', now, id)
  reclaim_expired(now, tonumber(ARGV[4]))
  return lease_state(id)
end
redis.call('ZADD', DEADLINES, 'XX', now + tonumber(ARGV[3]), id)
return 0
"#;

/// ARGV: prefix, lease id. Returns {lease state code, 1 if the job is now indexing}.
/// Only a held lease counts, and a failed or cancelled job has none, so such a job
/// never releases the tasks waiting on this one.
const COMPLETE: &str = r#"
local id = ARGV[2]
local state = lease_state(id)
if state ~= 0 then return {state, 0} end
local job, index = parse_lease(id)
drop_lease(id, job)
local key = job_key(job)
local tasks = tasks_key(job)
local done = redis.call('HINCRBY', key, 'tasks_done', 1)
local units = redis.call('HGET', tasks, 'n' .. index) or '0'
redis.call('HINCRBY', key, 'images_done', units)
redis.call('HINCRBY', STATS, 'images_rendered', units)
local kind = redis.call('HGET', tasks, 'k' .. index)
if kind then redis.call('HINCRBY', key, kind .. 's_done', 1) end
local dependents = redis.call('HGET', tasks, 'd' .. index)
if dependents and redis.call('HGET', key, 'state') == 'running' then
  for lo, hi in string.gmatch(dependents, '(%d+):(%d+)') do
    for d = tonumber(lo), tonumber(hi) - 1 do
      local dep = string.format('%d', d)
      if redis.call('HINCRBY', tasks, 'w' .. dep, -1) == 0 then
        redis.call('HDEL', tasks, 'w' .. dep)
        redis.call('RPUSH', PENDING, job .. '/' .. dep)
      end
    end
  end
end
if done == tonumber(redis.call('HGET', key, 'tasks_total')) then
  redis.call('HSET', key, 'state', 'indexing')
  redis.call('SADD', INDEXING, job)
  return {0, 1}
end
return {0, 0}
"#;

/// ARGV: prefix, lease id, retryable (1/0), message, max_attempts, released (1/0).
/// Returns the lease state code. A released task goes back to the front of the line
/// without using an attempt.
const FAIL: &str = r#"
local id = ARGV[2]
local state = lease_state(id)
if state ~= 0 then return state end
local job, index, attempt = parse_lease(id)
drop_lease(id, job)
if ARGV[6] == '1' then
  redis.call('HINCRBY', tasks_key(job), 'r' .. index, 1)
  redis.call('LPUSH', PENDING, job .. '/' .. index)
  return 0
end
local retryable = ARGV[3] == '1'
redis.call('HINCRBY', STATS, 'failures', 1)
local used = counted(job, index, attempt)
if retryable and used < tonumber(ARGV[5]) then
  redis.call('HINCRBY', STATS, 'retries', 1)
  redis.call('RPUSH', PENDING, job .. '/' .. index)
else
  local why = ''
  if retryable then why = ' (after ' .. used .. ' attempts)' end
  fail_job(job, 'task ' .. job .. '/' .. index .. ' failed' .. why .. ': ' .. ARGV[4], now_ms())
end
return 0
"#;

/// ARGV: prefix, job id, state, message, now, images failed. Returns -1 when there is no
/// such job.
const FINISH: &str = r#"
local key = job_key(ARGV[2])
local state = redis.call('HGET', key, 'state')
if not state then return -1 end
if state == 'indexing' then
  redis.call('HSET', key, 'state', ARGV[3], 'message', ARGV[4], 'images_failed', ARGV[6])
  if is_terminal(ARGV[3]) then
    redis.call('UNLINK', tasks_key(ARGV[2]))
    job_ended(ARGV[2], ARGV[5])
  end
end
return 0
"#;

/// ARGV: prefix, job id, now. Returns 1 if cancelled, 0 if it had ended, -1 if no such
/// job.
const CANCEL: &str = r#"
local job = ARGV[2]
local key = job_key(job)
local state = redis.call('HGET', key, 'state')
if not state then return -1 end
if is_terminal(state) then return 0 end
redis.call('HSET', key, 'state', 'cancelled')
job_ended(job, ARGV[3])
drop_job_leases(job)
redis.call('UNLINK', tasks_key(job))
return 1
"#;

/// ARGV: prefix, the end time (ms) at or before which a job expires, the most to drop.
/// Returns how many jobs it dropped.
const EXPIRE: &str = r#"
local jobs = redis.call('ZRANGEBYSCORE', ENDED, '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, job in ipairs(jobs) do
  redis.call('ZREM', ENDED, job)
  redis.call('ZREM', INDEX, job)
  redis.call('UNLINK', job_key(job))
end
return #jobs
"#;

/// ARGV: prefix. Moves the LIST `jobs` of an older coordinator into `jobindex`; jobs that
/// had ended count as ended when they were created (their end time was not kept).
const MIGRATE: &str = r#"
local OLD = P .. 'jobs'
if redis.call('TYPE', OLD).ok ~= 'list' then return 0 end
local ids = redis.call('LRANGE', OLD, 0, -1)
for _, job in ipairs(ids) do
  local number = string.match(job, '^job%-(%d+)$')
  if number then redis.call('ZADD', INDEX, number, job) end
  local state, created = unpack(redis.call('HMGET', job_key(job), 'state', 'created_ms'))
  if state and is_terminal(state) then redis.call('ZADD', ENDED, created or 0, job) end
end
redis.call('DEL', OLD)
return #ids
"#;

/// ARGV: prefix. Returns {queued, leased, lease_expiries, retries, failures,
/// images_rendered}. Queued counts the runnable tasks of running jobs: a run entry counts
/// its length, and entries of jobs that ended stay in the list until a lease skips them.
const COUNTERS: &str = r#"
local running = {}
local queued = 0
for _, entry in ipairs(redis.call('LRANGE', PENDING, 0, -1)) do
  local job, rest = string.match(entry, '^(.*)/([^/]*)$')
  if job then
    if running[job] == nil then
      running[job] = redis.call('HGET', job_key(job), 'state') == 'running'
    end
    if running[job] then
      local lo, hi = string.match(rest, '^(%d+):(%d+)$')
      if lo then queued = queued + tonumber(hi) - tonumber(lo) else queued = queued + 1 end
    end
  end
end
local function total(field) return tonumber(redis.call('HGET', STATS, field) or '0') end
return {queued, redis.call('ZCARD', DEADLINES), total('lease_expiries'), total('retries'),
  total('failures'), total('images_rendered')}
"#;

/// The job hash fields [`RedisStateStore::job`] reads, in this order; the dataset task
/// counters and the failed images come last, as jobs stored before them lack them.
const STATUS_FIELDS: [&str; 15] = [
    "id",
    "spec",
    "state",
    "message",
    "created_ms",
    "tasks_total",
    "tasks_done",
    "images_total",
    "images_skipped",
    "images_done",
    "maps_total",
    "maps_done",
    "reduces_total",
    "reduces_done",
    "images_failed",
];

struct Scripts {
    create: Script,
    lease: Script,
    limit: Script,
    renew: Script,
    complete: Script,
    fail: Script,
    finish: Script,
    cancel: Script,
    expire: Script,
    migrate: Script,
    counters: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            create: s(CREATE),
            lease: s(LEASE),
            limit: s(LIMIT),
            renew: s(RENEW),
            complete: s(COMPLETE),
            fail: s(FAIL),
            finish: s(FINISH),
            cancel: s(CANCEL),
            expire: s(EXPIRE),
            migrate: s(MIGRATE),
            counters: s(COUNTERS),
        }
    }
}

/// The Redis backend. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct RedisStateStore {
    conn: ConnectionManager,
    prefix: String,
    scripts: Arc<Scripts>,
}

fn backend(e: impl std::fmt::Display) -> StateError {
    StateError::Backend(format!("redis: {e}"))
}

fn lease_state(code: i64) -> StateResult<LeaseState> {
    match code {
        0 => Ok(LeaseState::Held),
        1 => Ok(LeaseState::Cancelled),
        2 => Ok(LeaseState::Lost),
        other => Err(backend(format!("unexpected lease state {other}"))),
    }
}

fn encode_state(state: &JobState) -> (&'static str, &str) {
    match state {
        JobState::Running => ("running", ""),
        JobState::Indexing => ("indexing", ""),
        JobState::Succeeded => ("succeeded", ""),
        JobState::Failed { message } => ("failed", message),
        JobState::Cancelled => ("cancelled", ""),
    }
}

fn decode_state(state: &str, message: String) -> StateResult<JobState> {
    Ok(match state {
        "running" => JobState::Running,
        "indexing" => JobState::Indexing,
        "succeeded" => JobState::Succeeded,
        "failed" => JobState::Failed { message },
        "cancelled" => JobState::Cancelled,
        other => return Err(backend(format!("unknown job state {other:?}"))),
    })
}

/// `url` without its password, for logs and errors: `redis://user:***@host:6379/0`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split_once(':').map_or(user_info, |(user, _password)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// A client for `url`; a `rediss://` one trusts `tls_ca` (PEM) when given, else the
/// system's roots.
fn client(url: &str, tls_ca: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    match tls_ca {
        Some(ca) => redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert: Some(ca.to_vec()) }),
        None => redis::Client::open(url),
    }
}

impl RedisStateStore {
    /// Connects to `url` (`redis://host:port/db`, or `rediss://` for TLS trusting the
    /// system's roots) with keys under `loupe:`. Errors name the URL without its password.
    pub async fn connect(url: &str) -> StateResult<RedisStateStore> {
        Self::open(url, None, "loupe:").await
    }

    /// [`Self::connect`] to a `rediss://` URL whose certificate `tls_ca` (PEM) signed,
    /// when given: a cluster's own CA.
    pub async fn connect_trusting(url: &str, tls_ca: Option<&[u8]>) -> StateResult<RedisStateStore> {
        Self::open(url, tls_ca, "loupe:").await
    }

    /// Connects with keys under `prefix`, so several stores can share one Redis.
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> StateResult<RedisStateStore> {
        Self::open(url, None, prefix).await
    }

    async fn open(url: &str, tls_ca: Option<&[u8]>, prefix: &str) -> StateResult<RedisStateStore> {
        let unreachable = |e: redis::RedisError| backend(format!("connecting to {}: {e}", redacted_url(url)));
        if tls_ca.is_some() && !url.starts_with("rediss://") {
            return Err(backend(format!("a TLS CA is given for {}, which is not rediss://", redacted_url(url))));
        }
        let client = client(url, tls_ca).map_err(unreachable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // A transition is not idempotent, so give a slow one time rather than report
            // a failure that may in fact have happened; submitting a big job takes a while.
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_number_of_retries(4)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config).await.map_err(unreachable)?;
        let store = RedisStateStore { conn, prefix: prefix.to_string(), scripts: Arc::new(Scripts::new()) };
        let moved: u64 = store.invoke(&store.invocation(&store.scripts.migrate)).await?;
        if moved > 0 {
            tracing::info!(jobs = moved, "moved the job list of an older coordinator into the job index");
        }
        Ok(store)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A script invocation with the prefix as ARGV[1].
    fn invocation<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.arg(&self.prefix);
        inv
    }

    async fn invoke<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> StateResult<T> {
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(backend)
    }

    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> StateResult<T> {
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn).await.map_err(backend)
    }

    fn status_cmd(&self, job_id: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key(&format!("job:{job_id}"))).arg(&STATUS_FIELDS[..]);
        cmd
    }

    fn parse_status(job_id: &str, fields: Vec<Option<String>>) -> StateResult<JobStatus> {
        let mut fields = fields.into_iter();
        let mut next = || fields.next().flatten();
        let id = next();
        let spec = next();
        let state = next();
        let (Some(id), Some(spec), Some(state)) = (id, spec, state) else {
            return Err(StateError::NoSuchJob(job_id.to_string()));
        };
        let message = next().unwrap_or_default();
        let mut num = |name: &str| -> StateResult<u64> {
            next().and_then(|v| v.parse().ok()).ok_or_else(|| backend(format!("job {job_id} has no valid {name}")))
        };
        let created_ms = num("created_ms")?;
        let tasks_total = num("tasks_total")?;
        let tasks_done = num("tasks_done")?;
        let images_total = num("images_total")?;
        let images_skipped = num("images_skipped")?;
        let images_done = num("images_done")?;
        let mut count = || next().and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
        let (maps_total, maps_done, reduces_total, reduces_done) = (count(), count(), count(), count());
        let images_failed = next().and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(JobStatus {
            id: id.parse().map_err(|e| backend(format!("job {job_id} has {e}")))?,
            spec: serde_json::from_str(&spec).map_err(|e| backend(format!("job {job_id} spec: {e}")))?,
            state: decode_state(&state, message)?,
            created_ms,
            tasks_total: tasks_total as u32,
            tasks_done: tasks_done as u32,
            images_total,
            images_skipped,
            images_done,
            maps_total,
            maps_done,
            reduces_total,
            reduces_done,
            images_failed,
        })
    }

    async fn job_once(&self, job_id: &str) -> StateResult<JobStatus> {
        let fields: Vec<Option<String>> = self.query(&self.status_cmd(job_id)).await?;
        Self::parse_status(job_id, fields)
    }

    /// One page from `jobindex`: its ids (one more than asked, to learn whether older
    /// ones remain), then their hashes in one round trip.
    async fn jobs_page_once(&self, before: Option<JobCursor>, limit: usize) -> StateResult<JobsPage> {
        let max = before.map_or("+inf".to_string(), |c| format!("({}", c.0));
        let mut range = redis::cmd("ZREVRANGEBYSCORE");
        range.arg(self.key("jobindex")).arg(max).arg("-inf").arg("WITHSCORES").arg("LIMIT").arg(0).arg(limit + 1);
        let mut ids: Vec<(String, f64)> = self.query(&range).await?;
        let more = ids.len() > limit;
        ids.truncate(limit);
        let next = if more { ids.last().map(|(_, n)| JobCursor(*n as u64)) } else { None };
        if ids.is_empty() {
            return Ok(JobsPage { jobs: Vec::new(), next });
        }
        let mut pipe = redis::pipe();
        for (id, _) in &ids {
            pipe.add_command(self.status_cmd(id));
        }
        let mut conn = self.conn.clone();
        let all: Vec<Vec<Option<String>>> = pipe.query_async(&mut conn).await.map_err(backend)?;
        let mut jobs = Vec::with_capacity(ids.len());
        for ((id, n), fields) in ids.iter().zip(all) {
            match Self::parse_status(id, fields) {
                Ok(status) => jobs.push((JobCursor(*n as u64), status)),
                Err(StateError::NoSuchJob(_)) => {} // expired since the index was read
                Err(e) => return Err(e),
            }
        }
        Ok(JobsPage { jobs, next })
    }
}

/// Sorted task indices as comma-separated half-open runs `<lo>:<hi>`, as the scripts read them.
fn runs(indices: &[u32]) -> String {
    to_ranges(indices).into_iter().map(|(lo, hi)| format!("{lo}:{hi}")).collect::<Vec<_>>().join(",")
}

/// Runs a read again once if it failed for want of a connection (the manager reconnects
/// in the meantime). Only reads: a transition that failed may have happened.
async fn read_twice<T, F, Fut>(f: F) -> StateResult<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = StateResult<T>>,
{
    match f().await {
        Err(StateError::Backend(_)) => f().await,
        other => other,
    }
}

#[async_trait]
impl StateStore for RedisStateStore {
    async fn create_job(&self, spec: JobSpec, tasks: Vec<NewTask>, images_skipped: u64, now_ms: u64) -> StateResult<JobId> {
        let deps = Dependencies::of(&tasks)?;
        let (maps_total, reduces_total) = count_dataset_tasks(&tasks);
        let tasks_total = u32::try_from(tasks.len()).map_err(|_| backend("too many tasks in one job"))?;
        let seq: u64 = self.query(redis::cmd("INCR").arg(self.key("jobseq"))).await?;
        let id = JobId::generate();
        let tasks_key = self.key(&format!("tasks:{id}"));
        let mut conn = self.conn.clone();
        for (r, round) in tasks.chunks(TASKS_PER_ROUND_TRIP).enumerate() {
            let mut pipe = redis::pipe();
            for (c, chunk) in round.chunks(TASKS_PER_HSET).enumerate() {
                let first = r * TASKS_PER_ROUND_TRIP + c * TASKS_PER_HSET;
                let mut hset = redis::cmd("HSET");
                hset.arg(&tasks_key);
                for (i, task) in chunk.iter().enumerate() {
                    let index = (first + i) as u32;
                    let spec = TaskSpec { job_id: id.clone(), index, work: task.work.clone() };
                    let json = serde_json::to_string(&spec).map_err(backend)?;
                    hset.arg(index).arg(json).arg(format!("n{index}")).arg(spec.work.images());
                    if !matches!(spec.work, Work::Render { .. }) {
                        hset.arg(format!("k{index}")).arg(spec.work.kind());
                    }
                    let waits = deps.waits[index as usize];
                    if waits > 0 {
                        hset.arg(format!("w{index}")).arg(waits);
                    }
                    let dependents = &deps.dependents[index as usize];
                    if !dependents.is_empty() {
                        hset.arg(format!("d{index}")).arg(runs(dependents));
                    }
                }
                pipe.add_command(hset).ignore();
            }
            if r == 0 {
                pipe.cmd("EXPIRE").arg(&tasks_key).arg(UNFINISHED_SUBMIT_TTL_S).ignore();
            }
            pipe.exec_async(&mut conn).await.map_err(backend)?;
        }
        let ctx = JobContext::of(&spec);
        let state = if tasks_total == 0 { JobState::Indexing } else { JobState::Running };
        let runnable: Vec<u32> = (0..tasks_total).filter(|&i| deps.waits[i as usize] == 0).collect();
        let mut inv = self.invocation(&self.scripts.create);
        inv.arg(id.as_str())
            .arg(serde_json::to_string(&spec).map_err(backend)?)
            .arg(serde_json::to_string(&ctx).map_err(backend)?)
            .arg(encode_state(&state).0)
            .arg(now_ms)
            .arg(tasks_total)
            .arg(spec.total_images())
            .arg(images_skipped)
            .arg(maps_total)
            .arg(reduces_total)
            .arg(seq);
        for (lo, hi) in to_ranges(&runnable) {
            inv.arg(format!("{lo}:{hi}"));
        }
        let _: i64 = self.invoke(&inv).await?;
        Ok(id)
    }

    /// Grants a lease, then sets its maximum time, which only this side can size. A
    /// coordinator that dies between the two leaves a lease bounded by its TTL alone.
    async fn lease(&self, worker: &str, policy: LeasePolicy) -> StateResult<Option<Lease>> {
        let mut inv = self.invocation(&self.scripts.lease);
        inv.arg(worker).arg(policy.ttl_ms).arg(policy.max_attempts).arg(LeaseSecret::random().as_str());
        let granted: Option<(String, String, u32, String)> = self.invoke(&inv).await?;
        let Some((lease_id, task, attempt, ctx)) = granted else {
            return Ok(None);
        };
        let task: TaskSpec = serde_json::from_str(&task).map_err(|e| backend(format!("task of {lease_id}: {e}")))?;
        let job: JobContext = serde_json::from_str(&ctx).map_err(|e| backend(format!("job context of {lease_id}: {e}")))?;
        let max_ms = policy.task_time.max_ms(&task, &job);
        let mut limit = self.invocation(&self.scripts.limit);
        limit.arg(&lease_id).arg(max_ms);
        let _: i64 = self.invoke(&limit).await?;
        Ok(Some(Lease { lease_id: lease_id.parse().map_err(|e| backend(format!("the script granted {e}")))?, task, attempt, ttl_ms: policy.ttl_ms, max_ms, job }))
    }

    async fn renew(&self, lease_id: &LeaseId, policy: LeasePolicy) -> StateResult<LeaseState> {
        let mut inv = self.invocation(&self.scripts.renew);
        inv.arg(lease_id.to_string()).arg(policy.ttl_ms).arg(policy.max_attempts);
        lease_state(self.invoke(&inv).await?)
    }

    async fn complete(&self, lease_id: &LeaseId) -> StateResult<Completion> {
        let mut inv = self.invocation(&self.scripts.complete);
        inv.arg(lease_id.to_string());
        let (code, job_done): (i64, i64) = self.invoke(&inv).await?;
        Ok(Completion { lease: lease_state(code)?, job_done: job_done == 1 })
    }

    async fn fail(&self, lease_id: &LeaseId, failure: Failure, policy: LeasePolicy) -> StateResult<LeaseState> {
        let mut inv = self.invocation(&self.scripts.fail);
        inv.arg(lease_id.to_string()).arg(if failure.retryable { "1" } else { "0" }).arg(&failure.message).arg(policy.max_attempts).arg(if failure.released { "1" } else { "0" });
        lease_state(self.invoke(&inv).await?)
    }

    async fn finish(&self, job_id: &JobId, outcome: JobState, images_failed: u64, now_ms: u64) -> StateResult<()> {
        let (state, message) = encode_state(&outcome);
        let mut inv = self.invocation(&self.scripts.finish);
        inv.arg(job_id.as_str()).arg(state).arg(message).arg(now_ms).arg(images_failed);
        match self.invoke::<i64>(&inv).await? {
            -1 => Err(StateError::NoSuchJob(job_id.to_string())),
            _ => Ok(()),
        }
    }

    async fn indexing_jobs(&self) -> StateResult<Vec<JobId>> {
        let ids: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(self.key("indexing"))).await?;
        ids.into_iter().map(|id| id.parse().map_err(|e| backend(format!("the set of indexing jobs holds {e}")))).collect()
    }

    async fn cancel(&self, job_id: &JobId, now_ms: u64) -> StateResult<bool> {
        let mut inv = self.invocation(&self.scripts.cancel);
        inv.arg(job_id.as_str()).arg(now_ms);
        match self.invoke::<i64>(&inv).await? {
            -1 => Err(StateError::NoSuchJob(job_id.to_string())),
            done => Ok(done == 1),
        }
    }

    async fn job(&self, job_id: &JobId) -> StateResult<JobStatus> {
        read_twice(|| self.job_once(job_id.as_str())).await
    }

    async fn jobs_page(&self, before: Option<JobCursor>, limit: usize) -> StateResult<JobsPage> {
        read_twice(|| self.jobs_page_once(before, limit)).await
    }

    async fn expire_jobs(&self, now_ms: u64, retention_ms: u64) -> StateResult<u64> {
        let Some(ended_by) = now_ms.checked_sub(retention_ms) else { return Ok(0) };
        let mut inv = self.invocation(&self.scripts.expire);
        inv.arg(ended_by).arg(EXPIRED_PER_SCRIPT);
        let mut total = 0;
        loop {
            let dropped: u64 = self.invoke(&inv).await?;
            total += dropped;
            if dropped < EXPIRED_PER_SCRIPT as u64 {
                return Ok(total);
            }
        }
    }

    async fn ping(&self) -> StateResult<()> {
        let pong: String = redis::cmd("PING").query_async(&mut self.conn.clone()).await.map_err(backend)?;
        if pong != "PONG" {
            return Err(backend(format!("PING answered {pong:?}")));
        }
        Ok(())
    }

    async fn counters(&self) -> StateResult<StoreCounters> {
        let inv = self.invocation(&self.scripts.counters);
        let (queued, leased, lease_expiries, retries, failures, images_rendered): (u64, u64, u64, u64, u64, u64) = self.invoke(&inv).await?;
        Ok(StoreCounters { queued, leased, lease_expiries, retries, failures, images_rendered })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use loupe_core::spec::Technique;
    use loupe_testsupport::RedisServer;

    use super::*;

    const POLICY: LeasePolicy = LeasePolicy { ttl_ms: 60_000, max_attempts: 3, task_time: crate::state::TaskTime::DEFAULT };

    fn fresh_prefix() -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        format!("test{}:", N.fetch_add(1, Ordering::Relaxed))
    }

    fn spec() -> JobSpec {
        use loupe_core::spec::{LayerInfo, LayerPlan, ModelRef, RenderSettings};
        JobSpec {
            model: ModelRef { uri: "m.pt".into(), name: "m".into(), sha256: "00".into() },
            layers: vec![LayerPlan { layer: LayerInfo { name: "conv".into(), shape: vec![4, 8, 8] }, units: vec![0, 1, 2, 3].into(), techniques: None, steps: None, param: None, transforms: None }],
            techniques: vec![Technique::Channel],
            settings: RenderSettings { steps: 4, size: 16, input_size: 16, seed: 7, learning_rate: 0.05, ..Default::default() },
            batch: 2,
            out: "out".into(),
            dataset: None,
        }
    }

    fn render(i: u32, units: u32) -> Work {
        Work::render("conv", Technique::Channel, (0..units).map(|u| i * units + u))
    }

    fn tasks(n: u32, units: u32) -> Vec<NewTask> {
        (0..n).map(|i| NewTask::runnable(render(i, units))).collect()
    }

    /// Retries `f` until it succeeds, for calls made while Redis comes back.
    async fn eventually<T, Fut: std::future::Future<Output = StateResult<T>>>(what: &str, f: impl Fn() -> Fut) -> T {
        let start = Instant::now();
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) if start.elapsed() < Duration::from_secs(120) => {
                    eprintln!("{what}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{what}: still failing after 120 s: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn redis_store_conforms() {
        let server = RedisServer::start();
        let url = server.url();
        super::super::conformance::run_all_async(|| {
            let url = url.clone();
            async move {
                Box::new(RedisStateStore::connect_with_prefix(&url, &fresh_prefix()).await.unwrap()) as Box<dyn StateStore>
            }
        }, &super::super::conformance::Time::Real)
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_coordinators_never_grant_a_task_twice() {
        const TASKS: u32 = 600;
        let server = RedisServer::start();
        let prefix = fresh_prefix();
        let a = Arc::new(RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap());
        let b = Arc::new(RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap());
        let id = a.create_job(spec(), tasks(TASKS, 2), 0, 0).await.unwrap();
        let mut handles = Vec::new();
        for (n, store) in [a.clone(), b.clone()].into_iter().cycle().take(8).enumerate() {
            handles.push(tokio::spawn(async move {
                let worker = format!("w{n}");
                let mut got = Vec::new();
                let mut finished_job = 0;
                while let Some(lease) = store.lease(&worker, POLICY).await.unwrap() {
                    got.push(lease.task.index);
                    assert_eq!(lease.attempt, 1);
                    let done = store.complete(&lease.lease_id).await.unwrap();
                    assert_eq!(done.lease, LeaseState::Held);
                    finished_job += done.job_done as u32;
                }
                (got, finished_job)
            }));
        }
        let mut all = Vec::new();
        let mut finished = 0;
        for h in handles {
            let (got, f) = h.await.unwrap();
            all.extend(got);
            finished += f;
        }
        assert_eq!(all.len(), TASKS as usize, "every task granted exactly once");
        assert_eq!(all.iter().copied().collect::<HashSet<_>>(), (0..TASKS).collect::<HashSet<_>>());
        assert_eq!(finished, 1, "exactly one completion ends the job");
        let st = b.job(&id).await.unwrap();
        assert_eq!((st.state, st.tasks_done, st.images_done), (JobState::Indexing, TASKS, 2 * TASKS as u64));
    }

    #[tokio::test]
    async fn job_ids_are_unique_across_coordinators_and_listed_newest_first() {
        let server = RedisServer::start();
        let prefix = fresh_prefix();
        let a = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        let b = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..6 {
            let s = if i % 2 == 0 { &a } else { &b };
            ids.push(s.create_job(spec(), tasks(1, 1), 0, i).await.unwrap());
        }
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 6, "ids repeat: {ids:?}");
        let listed: Vec<JobId> = a.jobs().await.unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(listed, ids.iter().rev().cloned().collect::<Vec<_>>());
        assert!(matches!(a.job(&"job-99".parse().unwrap()).await, Err(StateError::NoSuchJob(_))));
        assert!(matches!(a.cancel(&"job-99".parse().unwrap(), 0).await, Err(StateError::NoSuchJob(_))));
        assert!(matches!(a.finish(&"job-99".parse().unwrap(), JobState::Succeeded, 0, 0).await, Err(StateError::NoSuchJob(_))));
        let never_granted = |job: &str| LeaseId::new(&job.parse().unwrap(), 0, 7, LeaseSecret::random());
        assert_eq!(a.renew(&never_granted("nonsense"), POLICY).await.unwrap(), LeaseState::Lost);
        assert_eq!(a.complete(&never_granted("job-1")).await.unwrap().lease, LeaseState::Lost);
    }

    #[tokio::test]
    async fn a_lease_carries_its_task_and_job_context() {
        let server = RedisServer::start();
        let s = RedisStateStore::connect_with_prefix(&server.url(), &fresh_prefix()).await.unwrap();
        let id = s.create_job(spec(), tasks(3, 2), 5, 42).await.unwrap();
        let short = LeasePolicy { ttl_ms: 1_000, ..POLICY };
        let l = s.lease("w", short).await.unwrap().unwrap();
        assert_eq!((l.lease_id.job_id(), l.lease_id.index(), l.lease_id.attempt()), (&id, 0, 1));
        assert!(l.lease_id.to_string().starts_with(&format!("{id}/0#1.")), "{}", l.lease_id);
        assert_eq!(l.task, TaskSpec { job_id: id.clone(), index: 0, work: render(0, 2) });
        assert_eq!((l.ttl_ms, l.max_ms), (1_000, POLICY.task_time.max_ms(&l.task, &l.job)));
        assert_eq!(l.job, JobContext::of(&spec()));
        let st = s.job(&id).await.unwrap();
        assert_eq!((st.spec, st.created_ms, st.tasks_total, st.images_skipped, st.images_total), (spec(), 42, 3, 5, 4));
        // Expired leases go back to the front of the line; retries to the back.
        let l1 = s.lease("w", short).await.unwrap().unwrap();
        assert_eq!(l1.task.index, 1);
        s.fail(&l1.lease_id, Failure::new(true, "x"), short).await.unwrap();
        tokio::time::sleep(Duration::from_millis(short.ttl_ms + 200)).await;
        let again = s.lease("w", POLICY).await.unwrap().unwrap();
        assert_eq!((again.task.index, again.attempt), (0, 2), "the expired task comes first");
        let next = s.lease("w", POLICY).await.unwrap().unwrap();
        assert_eq!((next.task.index, next.attempt), (2, 1));
        let last = s.lease("w", POLICY).await.unwrap().unwrap();
        assert_eq!((last.task.index, last.attempt), (1, 2), "the retried task went to the back");
    }

    /// Two coordinators whose clocks disagree by far more than the time to live: lease
    /// deadlines follow Redis's clock alone, so neither reclaims the other's live lease
    /// (when each passed its own time, the one ahead reclaimed every lease at once).
    #[tokio::test]
    async fn coordinators_with_skewed_clocks_do_not_reclaim_live_leases() {
        let server = RedisServer::start();
        let prefix = fresh_prefix();
        let short = LeasePolicy { ttl_ms: 2_000, ..POLICY };
        let behind = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        let ahead = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        behind.create_job(spec(), tasks(2, 1), 0, 0).await.unwrap();
        let held = behind.lease("w1", short).await.unwrap().unwrap();
        let other = ahead.lease("w2", short).await.unwrap().expect("the other task");
        assert_ne!(other.task.index, held.task.index);
        assert!(ahead.lease("w3", short).await.unwrap().is_none(), "the live lease is not reclaimed");
        assert_eq!(ahead.renew(&held.lease_id, short).await.unwrap(), LeaseState::Held);
        assert_eq!(behind.renew(&other.lease_id, short).await.unwrap(), LeaseState::Held);
        assert_eq!(ahead.counters().await.unwrap().lease_expiries, 0);
    }

    #[tokio::test]
    async fn state_survives_a_restarted_coordinator() {
        let server = RedisServer::start();
        let prefix = fresh_prefix();
        let first = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        let id = first.create_job(spec(), tasks(3, 2), 0, 0).await.unwrap();
        let a = first.lease("w1", POLICY).await.unwrap().unwrap();
        let b = first.lease("w2", POLICY).await.unwrap().unwrap();
        drop(first);

        let second = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        let st = second.job(&id).await.unwrap();
        assert_eq!((st.state, st.tasks_total, st.tasks_done), (JobState::Running, 3, 0));
        assert_eq!(second.jobs().await.unwrap().len(), 1);
        assert_eq!(second.renew(&a.lease_id, POLICY).await.unwrap(), LeaseState::Held);
        assert!(!second.complete(&a.lease_id).await.unwrap().job_done);
        assert!(!second.complete(&b.lease_id).await.unwrap().job_done);
        let c = second.lease("w3", POLICY).await.unwrap().unwrap();
        assert_eq!(c.task.index, 2);
        assert!(second.lease("w4", POLICY).await.unwrap().is_none());
        assert!(second.complete(&c.lease_id).await.unwrap().job_done);
        let mut exists = redis::cmd("EXISTS");
        exists.arg(second.key(&format!("tasks:{id}")));
        let tasks_exist = || second.query::<bool>(&exists);
        assert!(tasks_exist().await.unwrap());
        second.finish(&id, JobState::Succeeded, 0, 14).await.unwrap();
        assert_eq!(second.job(&id).await.unwrap().state, JobState::Succeeded);
        assert!(!tasks_exist().await.unwrap(), "an ended job's tasks are dropped");
    }

    /// An older coordinator kept its jobs in a LIST `jobs`: the next one to connect moves
    /// them into the index, and the ones that had ended can expire.
    #[tokio::test]
    async fn the_job_list_of_an_older_coordinator_is_moved_into_the_index() {
        let server = RedisServer::start();
        let prefix = fresh_prefix();
        let old = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        let running = old.create_job(spec(), tasks(1, 2), 0, 5).await.unwrap();
        let ended = old.create_job(spec(), tasks(1, 2), 0, 6).await.unwrap();
        assert!(old.cancel(&ended, 7).await.unwrap());
        // What an older coordinator left: jobs named by their number, their ids in a LIST,
        // no index, no end times.
        let mut rewind = redis::pipe();
        let [running, ended] = [(running, "job-1"), (ended, "job-2")].map(|(id, numbered)| {
            rewind.cmd("RENAME").arg(old.key(&format!("job:{id}"))).arg(old.key(&format!("job:{numbered}"))).ignore();
            rewind.cmd("HSET").arg(old.key(&format!("job:{numbered}"))).arg("id").arg(numbered).ignore();
            numbered.parse::<JobId>().unwrap()
        });
        rewind.cmd("DEL").arg(old.key("jobindex")).arg(old.key("ended")).ignore();
        rewind.cmd("RPUSH").arg(old.key("jobs")).arg(running.as_str()).arg(ended.as_str()).ignore();
        rewind.exec_async(&mut old.conn.clone()).await.unwrap();
        assert!(old.jobs().await.unwrap().is_empty());

        let new = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        let listed: Vec<JobId> = new.jobs().await.unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(listed, vec![ended.clone(), running.clone()]);
        assert!(!new.query::<bool>(redis::cmd("EXISTS").arg(new.key("jobs"))).await.unwrap());
        assert_eq!(new.expire_jobs(6 + 1_000, 1_000).await.unwrap(), 1, "an ended job counts as ended when created");
        assert_eq!(new.jobs().await.unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>(), vec![running]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_redis_loses_nothing_and_the_store_reconnects() {
        let mut server = RedisServer::start_with(true);
        let s = RedisStateStore::connect_with_prefix(&server.url(), &fresh_prefix()).await.unwrap();
        let id = s.create_job(spec(), tasks(4, 2), 0, 0).await.unwrap();
        let a = s.lease("w1", POLICY).await.unwrap().unwrap();
        let b = s.lease("w2", POLICY).await.unwrap().unwrap();
        assert!(!s.complete(&a.lease_id).await.unwrap().job_done);

        server.kill();
        match s.job(&id).await {
            Err(StateError::Backend(msg)) => eprintln!("with redis down: {msg}"),
            other => panic!("expected a backend error with redis down, got {other:?}"),
        }
        assert!(matches!(s.lease("w3", POLICY).await, Err(StateError::Backend(_))));
        server.restart();

        let st = eventually("reading the job", || s.job(&id)).await;
        assert_eq!((st.state, st.tasks_done, st.images_done), (JobState::Running, 1, 2));
        // The held lease is still held; the remaining tasks are still queued.
        assert_eq!(s.renew(&b.lease_id, POLICY).await.unwrap(), LeaseState::Held);
        assert_eq!(s.complete(&a.lease_id).await.unwrap().lease, LeaseState::Lost, "a done task stays done");
        let c = s.lease("w3", POLICY).await.unwrap().unwrap();
        let d = s.lease("w4", POLICY).await.unwrap().unwrap();
        assert_eq!((c.task.index, d.task.index, c.attempt, d.attempt), (2, 3, 1, 1));
        assert!(s.lease("w5", POLICY).await.unwrap().is_none());
        for l in [&b, &c] {
            assert!(!s.complete(&l.lease_id).await.unwrap().job_done);
        }
        assert!(s.complete(&d.lease_id).await.unwrap().job_done);
        assert_eq!(s.job(&id).await.unwrap().images_done, 8);
    }

    #[tokio::test]
    async fn a_restarted_coordinator_keeps_a_reduce_blocked_until_the_last_map() {
        use crate::state::conformance::{dataset_spec, dataset_tasks};
        let server = RedisServer::start();
        let prefix = fresh_prefix();
        let first = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        // Tasks 0 (render), 1 to 3 (maps), 4 (the reduce).
        let id = first.create_job(dataset_spec(), dataset_tasks(1, 3, 1), 0, 0).await.unwrap();
        let leases: Vec<Lease> = lease_n(first.clone(), 4).await;
        assert_eq!(leases.iter().map(|l| l.task.index).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert!(!first.complete(&leases[1].lease_id).await.unwrap().job_done);
        assert!(!first.complete(&leases[2].lease_id).await.unwrap().job_done);
        drop(first);

        let second = RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap();
        let st = second.job(&id).await.unwrap();
        assert_eq!((st.tasks_total, st.tasks_done, st.maps_total, st.maps_done, st.reduces_total), (5, 2, 3, 2, 1));
        assert!(second.lease("w", POLICY).await.unwrap().is_none(), "the reduce is still blocked after a restart");
        assert!(!second.complete(&leases[0].lease_id).await.unwrap().job_done);
        assert!(second.lease("w", POLICY).await.unwrap().is_none(), "a render does not release the reduce");
        let mut waiting = redis::cmd("HGET");
        waiting.arg(second.key(&format!("tasks:{id}"))).arg("w4");
        assert_eq!(second.query::<Option<u32>>(&waiting).await.unwrap(), Some(1), "one map left, in Redis");
        assert!(!second.complete(&leases[3].lease_id).await.unwrap().job_done);
        assert_eq!(second.query::<Option<u32>>(&waiting).await.unwrap(), None);
        let r = second.lease("w", POLICY).await.unwrap().expect("the last map released the reduce");
        assert_eq!((r.task.index, r.task.work.clone()), (4, Work::Reduce { layer: "layer0".into() }));
        assert!(second.complete(&r.lease_id).await.unwrap().job_done);
        let st = second.job(&id).await.unwrap();
        assert_eq!((st.state, st.maps_done, st.reduces_done, st.images_done), (JobState::Indexing, 3, 1, 2));
    }

    /// `n` leases in a row from one store.
    async fn lease_n(s: RedisStateStore, n: usize) -> Vec<Lease> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(s.lease("w", POLICY).await.unwrap().unwrap());
        }
        out
    }

    /// Many workers on two coordinators drain a dataset job: every task once, and no
    /// reduce before every map's completion was reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_coordinators_never_grant_a_reduce_early() {
        use crate::state::conformance::{dataset_spec, dataset_tasks};
        use std::sync::atomic::AtomicU32;
        const RENDERS: u32 = 40;
        const MAPS: u32 = 60;
        const REDUCES: u32 = 5;
        let server = RedisServer::start();
        let prefix = fresh_prefix();
        let a = Arc::new(RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap());
        let b = Arc::new(RedisStateStore::connect_with_prefix(&server.url(), &prefix).await.unwrap());
        let id = a.create_job(dataset_spec(), dataset_tasks(RENDERS, MAPS, REDUCES), 0, 0).await.unwrap();
        // Maps whose completion has been sent (counted before sending, so a reduce granted
        // after the last one's completion always sees them all).
        let maps_reported = Arc::new(AtomicU32::new(0));
        let mut handles = Vec::new();
        let total = RENDERS + MAPS + REDUCES;
        let deadline = Instant::now() + Duration::from_secs(120);
        for (n, store) in [a.clone(), b.clone()].into_iter().cycle().take(8).enumerate() {
            let maps_reported = maps_reported.clone();
            let id = id.clone();
            handles.push(tokio::spawn(async move {
                let mut got = Vec::new();
                // Each worker stops when every task is done, not after some idle polls: a
                // reduce may stay blocked for a long time behind maps other workers hold.
                while store.job(&id).await.unwrap().tasks_done < total {
                    assert!(Instant::now() < deadline, "the job was not drained within the deadline");
                    let Some(lease) = store.lease(&format!("w{n}"), POLICY).await.unwrap() else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    match lease.task.work {
                        Work::Map { .. } => {
                            maps_reported.fetch_add(1, Ordering::SeqCst);
                        }
                        Work::Reduce { .. } => assert_eq!(maps_reported.load(Ordering::SeqCst), MAPS, "a reduce granted early"),
                        Work::Render { .. } => {}
                    }
                    got.push(lease.task.index);
                    assert_eq!(store.complete(&lease.lease_id).await.unwrap().lease, LeaseState::Held);
                }
                got
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap());
        }
        assert_eq!(all.len(), total as usize, "every task granted exactly once");
        assert_eq!(all.iter().copied().collect::<HashSet<_>>(), (0..total).collect::<HashSet<_>>());
        let st = b.job(&id).await.unwrap();
        assert_eq!((st.state, st.tasks_done, st.maps_done, st.reduces_done), (JobState::Indexing, total, MAPS, REDUCES));
    }

    /// A job of a million units in batches of 64 (15,625 tasks), submitted in one call, is
    /// leased and completed by 32 concurrent workers: every task exactly once, and every
    /// unit counted. (Its speed is bench/scale's figure, not this test's.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_million_unit_job_is_leased_once_per_task_by_concurrent_workers() {
        const TASKS: u32 = 15_625;
        let server = RedisServer::start();
        let s = Arc::new(RedisStateStore::connect_with_prefix(&server.url(), &fresh_prefix()).await.unwrap());
        let id = s.create_job(spec(), tasks(TASKS, 64), 0, 0).await.unwrap();
        let mut handles = Vec::new();
        for w in 0..32 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(l) = s.lease(&format!("w{w}"), POLICY).await.unwrap() {
                    assert_eq!(s.complete(&l.lease_id).await.unwrap().lease, LeaseState::Held);
                    got.push(l.task.index);
                }
                got
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap());
        }
        assert_eq!(all.len(), TASKS as usize, "no task granted twice");
        assert_eq!(all.into_iter().collect::<HashSet<_>>(), (0..TASKS).collect::<HashSet<_>>(), "every task granted");
        let st = s.job(&id).await.unwrap();
        assert_eq!((st.state, st.tasks_done, st.images_done), (JobState::Indexing, TASKS, 64 * TASKS as u64));
    }

    #[test]
    fn a_redis_url_is_shown_without_its_password() {
        for (url, shown) in [
            ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
            ("rediss://loupe:s3cret@redis.example:6380/2", "rediss://loupe:***@redis.example:6380/2"),
            ("rediss://loupe:p@ss:w@rd@redis/0", "rediss://loupe:***@redis/0"),
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://redis:6379/0?x=a@b", "redis://redis:6379/0?x=a@b"),
        ] {
            assert_eq!(redacted_url(url), shown, "{url}");
        }
    }

    /// A redis-server that serves only TLS (with a password), on a certificate of a CA
    /// made here with the `openssl` command.
    struct TlsRedis {
        dir: tempfile::TempDir,
        port: u16,
        child: std::process::Child,
    }

    impl TlsRedis {
        fn start() -> TlsRedis {
            let dir = tempfile::tempdir().unwrap();
            let openssl = |args: &[&str]| {
                let o = std::process::Command::new("openssl").args(args).current_dir(dir.path()).output().expect("running openssl");
                assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            };
            let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
            openssl(&[&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA"]].concat());
            openssl(&[&["req"][..], &ec, &["-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=localhost"]].concat());
            std::fs::write(dir.path().join("leaf.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
            openssl(&["x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "leaf.ext"]);
            let port = loupe_testsupport::free_port();
            let child = std::process::Command::new(loupe_testsupport::program("redis-server", "apt-get install -y redis-server"))
                .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--requirepass", "s3cret"])
                .args(["--tls-cert-file", "tls.crt", "--tls-key-file", "tls.key", "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
                .current_dir(dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("starting redis-server");
            loupe_testsupport::wait_for("redis-server to listen for TLS", Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
            TlsRedis { dir, port, child }
        }

        fn ca(&self) -> Vec<u8> {
            std::fs::read(self.dir.path().join("ca.crt")).unwrap()
        }
    }

    impl Drop for TlsRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn a_tls_redis_is_reached_with_its_ca_and_no_error_shows_the_password() {
        let redis = TlsRedis::start();
        let url = format!("rediss://:s3cret@127.0.0.1:{}/0", redis.port);
        let store = RedisStateStore::connect_trusting(&url, Some(&redis.ca())).await.unwrap();
        store.ping().await.unwrap();
        let id = store.create_job(spec(), tasks(1, 1), 0, 0).await.unwrap();
        assert_eq!(store.job(&id).await.unwrap().state, JobState::Running);

        let shown = format!("rediss://:***@127.0.0.1:{}/0", redis.port);
        let refused = [
            ("the system's roots do not know the test CA", RedisStateStore::connect(&url).await.err()),
            ("a wrong password", RedisStateStore::connect_trusting(&url.replace("s3cret", "wr0ng"), Some(&redis.ca())).await.err()),
            ("plaintext to a TLS port", RedisStateStore::connect(&url.replace("rediss://", "redis://")).await.err()),
        ];
        for (why, e) in refused {
            let e = e.unwrap_or_else(|| panic!("{why}: connected")).to_string();
            assert!(!e.contains("s3cret") && !e.contains("wr0ng"), "{why}: {e}");
            assert!(e.contains(":***@127.0.0.1"), "{why}: the error names the URL without its password: {e}");
        }
        let e = RedisStateStore::connect_trusting(&url.replace("rediss://", "redis://"), Some(&redis.ca())).await.err().unwrap().to_string();
        assert!(e.contains("not rediss://") && e.contains(&shown.replace("rediss://", "redis://")), "{e}");
    }
}
