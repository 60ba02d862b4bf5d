//! Stores: where jobs live between push and completion.
//!
//! [`Store`] is the seam between the queue's semantics and its storage. Every store keeps the
//! same contract:
//!
//! - a job is in exactly one state: ready, scheduled, running (under a lease), or dead; done jobs
//!   are removed;
//! - a successful push is durable before it returns, a failed one leaves nothing visible;
//! - a claim is exclusive: one claimer wins, and it holds a lease token that every later
//!   transition of that claim (heartbeat, ack, retry, bury, release) must present. Once the lease
//!   is lost — expired and reclaimed, or the job removed — every one of those is refused with
//!   [`Error::LeaseLost`](crate::Error::LeaseLost) and changes nothing;
//! - claim cost does not grow with the backlog.
//!
//! [`dir::DirStore`] keeps a queue directory on local disk; [`redis::RedisStore`] keeps a queue in a
//! Redis server. [`open`] picks one from a path or a URL (`redis://HOST:PORT/DB?queue=NAME`).

pub mod dir;
pub mod redis;

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::QueueConfig;
use crate::error::Result;
use crate::job::{Job, JobId, Millis, NewJob, State};

/// A claim's proof of ownership. Cheap to clone; opaque apart from the fields shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The claimed job.
    pub id: JobId,
    /// The attempt this claim is (1 for the first run).
    pub attempt: u32,
    /// The store's token for this claim; no other claim of any job ever has the same one.
    pub token: String,
}

/// A claimed job: its body and the lease under which it may be worked on.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The job as pushed.
    pub job: Job,
    /// The lease to present to every later transition.
    pub lease: Lease,
}

/// One job as seen by a listing.
#[derive(Clone, Debug, Serialize)]
pub struct JobInfo {
    /// The job's id (for quarantined entries: the file or key name).
    pub id: String,
    /// Its state.
    pub state: State,
    /// Attempts made so far (for running jobs: before the current one).
    pub attempts: u32,
    /// Its priority.
    pub priority: i16,
    /// The time the state is measured from: run-at for ready and scheduled jobs, claim time for
    /// running ones, time of death for dead ones, time of quarantine for quarantined entries.
    pub since: Millis,
    /// The runner holding a running job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// When a running job's lease expires unless heartbeated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<Millis>,
    /// A running job's lease duration in milliseconds: the one its claim was made with (each
    /// claim carries its own, which may differ from the queue's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// For quarantined entries: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The body, when the listing was asked to read it and could.
    #[serde(skip)]
    pub job: Option<Job>,
}

/// Counts per state, from one pass over the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Runnable now.
    pub ready: u64,
    /// Waiting for their run-at time.
    pub scheduled: u64,
    /// Claimed.
    pub running: u64,
    /// Dead.
    pub dead: u64,
    /// Set aside as not valid jobs.
    pub quarantined: u64,
    /// Run-at time of the oldest ready job (how long work has been waiting).
    pub oldest_ready: Option<Millis>,
}

/// What a completion check saw, in one consistent observation: no claim, retry or release can
/// have happened between looking at the ready and running jobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Idle {
    /// Jobs runnable now.
    pub ready: u64,
    /// Jobs waiting for their run-at time.
    pub scheduled: u64,
    /// Jobs under a lease.
    pub running: u64,
}

impl Idle {
    /// Nothing ready, scheduled or running.
    pub fn is_idle(&self) -> bool {
        self.ready == 0 && self.scheduled == 0 && self.running == 0
    }
}

/// What happened to one job in a job's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// An attempt began.
    Started,
    /// The attempt succeeded; the job is done.
    Done,
    /// The attempt failed; the job will be retried.
    Failed,
    /// The job was given back without counting a failure (runner shutdown).
    Released,
    /// The job went dead.
    Dead,
    /// A lease expired or its runner died; the job was taken back.
    Reclaimed,
    /// A dead job was sent back to ready.
    Revived,
    /// The holder lost its lease and stopped.
    LeaseLost,
}

/// One entry of a job's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Event {
    /// When.
    pub at: Millis,
    /// What.
    pub kind: EventKind,
    /// Which attempt it concerns (0 when none).
    pub attempt: u32,
    /// Which runner recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// Details: exit status, reason, duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// An event at the current time.
    pub fn now(kind: EventKind, attempt: u32, detail: Option<String>) -> Event {
        Event {
            at: crate::job::now_ms(),
            kind,
            attempt,
            runner: None,
            detail,
        }
    }
}

/// Everything known about one job.
#[derive(Clone, Debug)]
pub struct Detail {
    /// Its state and counters.
    pub info: JobInfo,
    /// Its body (absent for quarantined entries that could not be decoded).
    pub job: Option<Job>,
    /// Its history, oldest first.
    pub history: Vec<Event>,
}

impl Detail {
    /// The reason recorded when the job went dead, if it is dead.
    pub fn dead_reason(&self) -> Option<&str> {
        if self.info.state != State::Dead {
            return None;
        }
        self.history
            .iter()
            .rev()
            .find(|e| e.kind == EventKind::Dead)
            .and_then(|e| e.detail.as_deref())
    }
}

/// Why an expired claim was taken back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReclaimCause {
    /// Its runner is gone (its lock is free, or its registration expired).
    RunnerDied,
    /// Its lease ran out without a heartbeat.
    LeaseExpired,
}

/// One job taken back by [`Store::reclaim`].
#[derive(Clone, Debug)]
pub struct Reclaimed {
    /// The job.
    pub id: JobId,
    /// The token of the claim that was taken back (so its processes can be found and stopped).
    pub old_token: String,
    /// Why.
    pub cause: ReclaimCause,
    /// Attempts counted now, including the reclaimed one.
    pub attempts: u32,
    /// True when that exhausted its attempts and the job went dead instead of back to ready.
    pub buried: bool,
}

/// What a runner publishes about itself, for `status` and `check`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RunnerStatus {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Start time.
    pub started: Millis,
    /// Number of slots (0 for a library claimer).
    pub slots: u32,
    /// Jobs running now.
    pub running: u32,
    /// Jobs finished by this runner.
    pub done: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Jobs that went dead.
    pub dead: u64,
}

impl RunnerStatus {
    /// A status for this process, with no work done yet.
    pub fn for_this_process(slots: u32) -> RunnerStatus {
        RunnerStatus {
            host: crate::hostname(),
            pid: std::process::id(),
            started: crate::job::now_ms(),
            slots,
            ..RunnerStatus::default()
        }
    }
}

/// A registered runner as seen by others.
#[derive(Clone, Debug, Serialize)]
pub struct RunnerInfo {
    /// Its id (the one in the lease tokens it issues).
    pub id: String,
    /// What it last published.
    pub status: RunnerStatus,
    /// When it last published (its heartbeat).
    pub heartbeat: Millis,
    /// Whether it is alive: its lock is held, or its registration has not expired.
    pub alive: bool,
}

/// Where a handler's output goes.
pub trait JobLog: Send {
    /// Appends bytes (headers and trailers written by the runner, or copied output).
    fn append(&mut self, bytes: &[u8]) -> Result<()>;
    /// The log's size in bytes now (where the next attempt's output will start).
    fn size(&self) -> Result<u64>;
    /// A file the handler may write its output to directly, when the store keeps logs in files.
    /// When `None`, the runner copies the handler's output through `append`.
    fn child_output(&self) -> Result<Option<File>>;
}

/// How a claim ends, as [`Store::end_attempt`] applies it: one of the transitions that give up a
/// lease ([`Store::ack`], [`Store::retry`], [`Store::bury`], [`Store::release`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: the job is removed ([`Store::ack`]).
    Ack,
    /// Failed: the attempt is counted and the job runs again after `delay` ([`Store::retry`]).
    Retry {
        /// How long until the job is runnable again.
        delay: Duration,
    },
    /// Dead, with its reason recorded in its history by the store ([`Store::bury`]).
    Bury {
        /// Why.
        reason: String,
    },
    /// Given back, runnable now, the attempt not counted ([`Store::release`]).
    Release,
}

/// Why a [`Store::watch`] woke its caller. Both are hints: they may be spurious or coalesced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wakeup {
    /// New jobs may be ready to claim (scheduled jobs coming due are found through
    /// [`Store::next_due`] instead).
    pub work: bool,
    /// A claimer may have died: its claims can be reclaimed now.
    pub runner_exited: bool,
}

/// Called from a background thread whenever the store may have changed.
pub type Wake = Arc<dyn Fn(Wakeup) + Send + Sync>;

/// Stops a [`Store::watch`] when dropped.
pub trait WatchGuard: Send {}

/// The operations every store provides. See the module documentation for the contract.
pub trait Store: Send + Sync {
    /// The queue's address as the user gave it (a path or a URL), for messages.
    fn target(&self) -> &str;

    /// The queue's defaults.
    fn config(&self) -> &QueueConfig;

    /// Adds one job durably and returns its id.
    fn push(&self, job: &NewJob) -> Result<JobId>;

    /// Adds many jobs with one durability flush. Either every job is added, or none.
    fn push_batch(&self, jobs: &[NewJob]) -> Result<Vec<JobId>>;

    /// Claims the most urgent runnable job, if there is one, under a lease of `lease`. Never
    /// blocks waiting for work; use [`Store::watch`] and [`Store::next_due`] to know when to call.
    fn claim(&self, lease: Duration) -> Result<Option<Claim>>;

    /// [`Store::claim`] when it can be made at once, with nothing to wait for but a few system
    /// calls on local files; `None`, with nothing moved, when it would wait (for a server, for
    /// a lock another process holds, for a listing of the whole queue). The caller then makes
    /// the claim with [`Store::claim`], on a thread that may wait.
    ///
    /// The runner claims on its event loop this way while a local store's calls stay short:
    /// handing a claim to a thread and back costs more than the claim itself (BENCHMARKS.md,
    /// profile point 17).
    fn claim_now(&self, _lease: Duration) -> Option<Result<Option<Claim>>> {
        None
    }

    /// Whether [`Store::begin_attempt`], and [`Store::end_attempt`] with [`Outcome::Ack`], are
    /// a few system calls on local files that wait neither for a server nor for a disk flush,
    /// so that the runner may make them on its event loop rather than on a thread (see
    /// [`Store::claim_now`]).
    fn is_local(&self) -> bool {
        false
    }

    /// Extends a lease: the claim stays valid for its lease duration from now.
    fn heartbeat(&self, lease: &Lease) -> Result<()>;

    /// Acknowledges success: the job is removed.
    fn ack(&self, lease: &Lease) -> Result<()>;

    /// Counts the attempt as failed and schedules the job again after `delay`.
    fn retry(&self, lease: &Lease, delay: Duration) -> Result<()>;

    /// Moves the job to dead, recording `reason` in its history.
    fn bury(&self, lease: &Lease, reason: &str) -> Result<()>;

    /// Gives the job back, runnable now, without counting the attempt.
    fn release(&self, lease: &Lease) -> Result<()>;

    /// Starts an attempt of a claimed job: opens its log, appends the attempt's `header` to it and
    /// records `started` in its history (a failure to record it is ignored: the history is a
    /// record, not part of the job's state). Returns the log, for the attempt's output, and the
    /// offset where `header` starts (to read back what this attempt wrote).
    ///
    /// The lease is not checked: the claim was just made. Not repeated on failure (a repeat
    /// could write the header twice); a caller that gets an error gives the job back.
    ///
    /// The default makes one call per step; a store whose every call is a round trip to a server
    /// overrides it to do all of it in one.
    fn begin_attempt(&self, lease: &Lease, header: &[u8], started: &Event) -> Result<(Box<dyn JobLog>, u64)> {
        let mut log = self.open_log(&lease.id)?;
        let start = log.size()?;
        log.append(header)?;
        let _ = self.record(&lease.id, started);
        Ok((log, start))
    }

    /// Ends an attempt: appends `trailer` to the job's log, applies `outcome` under `lease`, then
    /// records `event` in the job's history (if any; a failure to record it is ignored). A
    /// [`Outcome::Bury`] records its own dead event with the reason, so callers pass no event
    /// for it.
    ///
    /// `log` is the attempt's log as [`Store::begin_attempt`] returned it, for stores that write
    /// the trailer through it: the default appends the trailer there first (whatever the lease,
    /// and ignoring a failure, since the outcome matters more than the log). A caller repeating a
    /// call that failed (the transition is safe to repeat, see [`Store::ack`]) passes `None`,
    /// so the trailer is written once.
    ///
    /// Stores that override this write the trailer, the transition and the event as one atomic
    /// step, and only while `lease` holds: when it is lost, nothing at all is written and
    /// [`Error::LeaseLost`](crate::Error::LeaseLost) is returned, as by the transition alone. A
    /// repeat of a call that was applied but whose answer was lost is answered as the first was
    /// and writes nothing twice.
    fn end_attempt(
        &self,
        lease: &Lease,
        log: Option<Box<dyn JobLog>>,
        trailer: &[u8],
        outcome: &Outcome,
        event: Option<&Event>,
    ) -> Result<()> {
        if let Some(mut log) = log {
            let _ = log.append(trailer);
        }
        match outcome {
            Outcome::Ack => self.ack(lease)?,
            Outcome::Retry { delay } => self.retry(lease, *delay)?,
            Outcome::Bury { reason } => self.bury(lease, reason)?,
            Outcome::Release => self.release(lease)?,
        }
        if let Some(event) = event {
            let _ = self.record(&lease.id, event);
        }
        Ok(())
    }

    /// Takes back claims whose runner is gone or whose lease expired. Each one counts as an
    /// attempt; a job whose attempts are exhausted (by its own limit, else `max_attempts`) goes
    /// dead. Safe to run from many processes at once: each claim is taken back once.
    fn reclaim(&self, max_attempts: u32) -> Result<Vec<Reclaimed>>;

    /// Jobs in the given states; with `bodies`, each job's body is read too.
    fn list(&self, states: &[State], bodies: bool) -> Result<Vec<JobInfo>>;

    /// Counts per state.
    fn stats(&self) -> Result<Stats>;

    /// Completion check in one consistent observation.
    fn idle(&self) -> Result<Idle>;

    /// One job's state, body and history. `id` may also name a quarantined entry.
    fn get(&self, id: &str) -> Result<Detail>;

    /// Sends one dead job back to ready with its attempts reset; its logs and history stay.
    fn revive(&self, id: &JobId) -> Result<()>;

    /// Sends every dead job back to ready; returns their ids.
    fn revive_all(&self) -> Result<Vec<JobId>>;

    /// Removes a job (in any state; a running job's holder loses its lease) with its log, or a
    /// quarantined entry. Returns the state it was in: `Some(state)` when a job or entry was
    /// removed, `None` when only a finished job's log and history remained and were removed (which
    /// frees its id for a new push). [`Error::NotFound`](crate::Error::NotFound) only when nothing
    /// at all is known about `id`.
    fn remove(&self, id: &str) -> Result<Option<State>>;

    /// The history of a job that finished (done, so no longer in the queue) but whose log and
    /// history are still kept, which also keeps its id reserved; `None` when the queue keeps
    /// nothing of a finished job `id`. Stores that keep no history of finished jobs need not
    /// override this.
    fn finished(&self, id: &JobId) -> Result<Option<Vec<Event>>> {
        let _ = id;
        Ok(None)
    }

    /// Appends an entry to a job's history.
    fn record(&self, id: &JobId, event: &Event) -> Result<()>;

    /// Opens a job's log for appending.
    fn open_log(&self, id: &JobId) -> Result<Box<dyn JobLog>>;

    /// Reads a job's log from byte `from`; returns the bytes and whether the log exists.
    fn read_log(&self, id: &JobId, from: u64) -> Result<Option<Vec<u8>>>;

    /// Calls `wake` whenever new work may have arrived, from a background thread, until the
    /// guard is dropped. Wake-ups are coalesced: a burst of pushes may cause a single call.
    fn watch(&self, wake: Wake) -> Result<Box<dyn WatchGuard>>;

    /// The earliest run-at time among scheduled jobs, if any.
    fn next_due(&self) -> Result<Option<Millis>>;

    /// Publishes this claimer's status (creating its registration on first use) and refreshes
    /// its heartbeat. Claims are made under this registration's id.
    fn announce(&self, status: &RunnerStatus) -> Result<String>;

    /// Removes this claimer's registration (clean exit).
    fn retire(&self) -> Result<()>;

    /// Every registered runner, alive or not.
    fn runners(&self) -> Result<Vec<RunnerInfo>>;

    /// Periodic upkeep: removes temp files of crashed pushes and logs of jobs finished longer
    /// ago than the retention. Returns how many files were removed.
    fn collect_garbage(&self) -> Result<u64>;

    /// Problems with the store's setup that would break the contract or sharing, each with its
    /// fix. Empty when all is well.
    fn doctor(&self) -> Result<Vec<String>>;
}

/// Opens a queue: a `redis://` or `rediss://` URL selects the Redis store, anything else is a
/// queue directory (created with default settings when `create` is true and it is missing).
pub fn open(target: &str, create: bool) -> Result<Arc<dyn Store>> {
    if redis::is_url(target) {
        return Ok(Arc::new(redis::RedisStore::open(target, create)?));
    }
    let store = dir::DirStore::open(target, create)?;
    Ok(Arc::new(store))
}
