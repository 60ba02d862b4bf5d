//! The queue directory store: one file per job on local disk, its state being the folder it is
//! in and the fields of its name, every transition one atomic `rename`.
//!
//! See [`layout`] for the folders, [`name`] for the file names and [`crate::body`] for the file
//! contents. The rules that keep the contract:
//!
//! - **Push** writes `tmp/…`, fsyncs it, renames it into `ready/` (never over an existing name)
//!   and fsyncs `ready/` before reporting success. Any failure removes what was written. A
//!   batch writes every file, flushes the file system once, renames, and fsyncs `ready/` once.
//!   Concurrent pushes on one handle share the directory flush (group commit): each writes and
//!   fsyncs its own file, then whoever finds no flush running renames every push synced so far
//!   into `ready/`, fsyncs `ready/` once and reports each push's own outcome. A push alone
//!   never waits for company.
//! - **Claim** renames `ready/NAME` to `running/NAME+LEASE`; exactly one claimer's rename
//!   succeeds, the others get `ENOENT` and take the next candidate from the [`index`].
//! - **Heartbeat** sets the mtime of `running/NAME+LEASE` by name; **ack** unlinks it;
//!   **retry**, **release** and **bury** rename it. When the lease was taken over, that name is
//!   gone, the call fails with `ENOENT`, and the caller gets [`Error::LeaseLost`]: a stale holder
//!   can never touch the new holder's claim, whose name differs.
//! - **Liveness**: each claimer holds an exclusive `flock` on its `runners/` entry for its whole
//!   life. A free lock means the claimer died, and its claims are reclaimed at once; a held lock
//!   with an old mtime means a live but stuck claimer, reclaimed when its lease expires.
//! - **Completion** (`idle`) is observed under an exclusive `flock` on `running/` that claims and
//!   moves back to `ready/` hold shared, so no job can slip between the two listings.

mod admin;
pub mod fs;
pub mod index;
mod inspect;
pub mod layout;
mod lease;
mod logs;
pub mod name;
mod push;
mod runners;
mod watch;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use self::fs::{Dir, Fs, Kind, RealFs};
use self::index::Index;
use self::name::{QueuedName, RunningName, random_hex};
use self::runners::Registration;
use super::{
    Claim, Detail, Event, EventKind, Idle, JobInfo, JobLog, Lease, ReclaimCause, Reclaimed, RunnerInfo, RunnerStatus,
    Stats, Store, Wake, Wakeup, WatchGuard,
};
use crate::body::{self, Corrupt};
use crate::config::QueueConfig;
use crate::error::{Error, Result};
use crate::job::{Job, JobId, MAX_PAYLOAD, Millis, NewJob, State, now_ms};

pub use self::layout::{InitOptions, init};

/// How old a file in `tmp/` must be before it is taken for the leftover of a crashed push.
pub const TMP_GRACE: Duration = Duration::from_secs(3600);

/// How long a completion check waits for in-flight claims before giving up.
const IDLE_LOCK_WAIT: Duration = Duration::from_secs(10);

struct Dirs {
    root: Dir,
    tmp: Dir,
    ready: Dir,
    running: Dir,
    dead: Dir,
    quarantine: Dir,
    logs: Dir,
    runners: Dir,
}

impl Dirs {
    fn open(root: &Path) -> Result<Dirs> {
        let open = |name: &'static str| {
            Dir::open(root, name).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Error::Config {
                        path: root.join(name),
                        msg: format!("is missing; run `jobspool init {}` to repair the queue", root.display()),
                    }
                } else {
                    Error::io(root.join(name), "opening a queue folder", e)
                }
            })
        };
        let dirs = Dirs {
            root: open(".")?,
            tmp: open("tmp")?,
            ready: open("ready")?,
            running: open("running")?,
            dead: open("dead")?,
            quarantine: open("quarantine")?,
            logs: open("logs")?,
            runners: open("runners")?,
        };
        // Renames between folders only work within one file system (maildir's rule).
        let dev = |d: &Dir| {
            nix::sys::stat::fstat(d.fd())
                .map(|s| s.st_dev)
                .map_err(|e| Error::io(&d.path, "inspecting", e))
        };
        let root_dev = dev(&dirs.root)?;
        for d in [
            &dirs.tmp,
            &dirs.ready,
            &dirs.running,
            &dirs.dead,
            &dirs.quarantine,
            &dirs.logs,
            &dirs.runners,
        ] {
            if dev(d)? != root_dev {
                return Err(Error::Config {
                    path: d.path.clone(),
                    msg: "is on a different file system from the rest of the queue; renames would fail (EXDEV). Keep every folder on one file system".into(),
                });
            }
        }
        Ok(dirs)
    }
}

/// Why a file in a state folder is not a usable job.
enum Problem {
    /// The body does not decode.
    Corrupt(Corrupt),
    /// Not a regular file.
    Kind(Kind),
    /// Something else that makes it unusable (unreadable, hard-linked…), as a code and a detail.
    Other(&'static str, String),
    /// It vanished (moved or removed by someone else).
    Gone,
    /// Reading it failed for a reason that says nothing about the file (EIO, ENOSPC, EMFILE…):
    /// it may be a valid job, so it is never quarantined for this; try again later.
    Io(io::Error),
}

impl Problem {
    fn code(&self) -> &'static str {
        match self {
            Problem::Corrupt(c) => c.code(),
            Problem::Kind(k) => k.word(),
            Problem::Other(code, _) => code,
            Problem::Gone => "gone",
            Problem::Io(_) => "io-error",
        }
    }

    fn detail(&self) -> String {
        match self {
            Problem::Corrupt(c) => c.to_string(),
            Problem::Kind(k) => format!("a {} is not a job file", k.word()),
            Problem::Other(_, d) => d.clone(),
            Problem::Gone => "vanished".into(),
            Problem::Io(e) => format!("cannot be read now: {e}"),
        }
    }
}

/// A queue directory.
pub struct DirStore {
    target: String,
    root: PathBuf,
    config: QueueConfig,
    fs: Arc<dyn Fs>,
    d: Dirs,
    index: Arc<Mutex<Option<Index>>>,
    me: Mutex<Option<Registration>>,
    lock_pool: Mutex<Vec<OwnedFd>>,
    /// Concurrent pushes on this handle share their flushes (see [`push`]).
    group: push::GroupCommit,
}

impl std::fmt::Debug for DirStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(e: &io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw)
}

impl DirStore {
    /// Opens the queue directory at `path`; with `create`, a missing queue is created with
    /// default settings first.
    pub fn open(path: impl AsRef<Path>, create: bool) -> Result<DirStore> {
        Self::open_with(path, create, Arc::new(RealFs))
    }

    /// Opens with a custom file-system layer (for tests that observe or fault its calls).
    pub fn open_with(path: impl AsRef<Path>, create: bool, fs: Arc<dyn Fs>) -> Result<DirStore> {
        let root = path.as_ref().to_path_buf();
        let config = match layout::read_config(&root) {
            Ok(c) => c,
            Err(Error::Config { .. }) if create && !root.join(layout::CONFIG_FILE).exists() => {
                layout::init(&root, &InitOptions::default())?
            }
            Err(e) => return Err(e),
        };
        let d = Dirs::open(&root)?;
        Ok(DirStore {
            target: root.display().to_string(),
            root,
            config,
            fs,
            d,
            index: Arc::new(Mutex::new(None)),
            me: Mutex::new(None),
            lock_pool: Mutex::new(Vec::new()),
            group: Default::default(),
        })
    }

    /// The queue directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many pushes on this handle have written their job file and wait for a flush that
    /// has not started yet (they will share it). For tests and diagnostics.
    pub fn queued_pushes(&self) -> usize {
        self.group.queued()
    }

    fn path(&self, dir: &Dir, name: impl AsRef<OsStr>) -> PathBuf {
        dir.path.join(name.as_ref())
    }

    // ---- the transition lock ------------------------------------------------------------

    // ---- reading and quarantining -------------------------------------------------------

    fn read_body(&self, dir: &Dir, name: &OsStr, id: Option<&JobId>) -> std::result::Result<Job, Problem> {
        let mut file = match self.fs.open_read(dir, name) {
            Ok(f) => f,
            Err(e) => {
                return Err(match errno(&e) {
                    Some(Errno::ENOENT) => Problem::Gone,
                    Some(Errno::ELOOP) => Problem::Kind(Kind::Symlink),
                    Some(Errno::EACCES | Errno::EPERM) => Problem::Other(
                        "unreadable",
                        format!("cannot be read by this user ({e}); the producer's umask or group is wrong"),
                    ),
                    _ => Problem::Io(e),
                });
            }
        };
        let meta = file.metadata().map_err(Problem::Io)?;
        let ft = meta.file_type();
        if !ft.is_file() {
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                Kind::Directory
            } else if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_socket() {
                Kind::Socket
            } else {
                Kind::Device
            };
            return Err(Problem::Kind(kind));
        }
        if meta.nlink() > 1 {
            return Err(Problem::Other(
                "hard-linked",
                format!("has {} hard links; a job file must have exactly one", meta.nlink()),
            ));
        }
        if meta.len() > (MAX_PAYLOAD + body::MAX_HEADER) as u64 {
            return Err(Problem::Corrupt(Corrupt::TooLarge(format!("{} bytes", meta.len()))));
        }
        let limit = (MAX_PAYLOAD + body::MAX_HEADER) as u64;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // Through `take`, which neither asks the file's size again (`File::read_to_end` makes
        // two more system calls for that) nor reads past what a body may hold.
        (&mut file)
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(Problem::Io)?;
        if bytes.len() as u64 > limit {
            return Err(Problem::Corrupt(Corrupt::TooLarge(format!("more than {limit} bytes"))));
        }
        let job = body::decode(&bytes).map_err(Problem::Corrupt)?;
        if let Some(id) = id {
            if job.id != *id {
                return Err(Problem::Corrupt(Corrupt::IdMismatch {
                    body: job.id.to_string(),
                    name: id.to_string(),
                }));
            }
        }
        Ok(job)
    }

    /// Moves an entry that is not a valid job into `quarantine/`, named with the time, the
    /// reason and where it came from. Never follows, never deletes.
    fn quarantine(&self, from: &Dir, name: &OsStr, problem: &Problem) {
        if matches!(problem, Problem::Gone | Problem::Io(_)) {
            return;
        }
        let prefix = format!("{:013}.{}.{}.", now_ms(), problem.code(), from.name);
        let mut target = prefix.into_bytes();
        let room = 255 - target.len();
        let original = name.as_bytes();
        target.extend_from_slice(&original[..original.len().min(room)]);
        for attempt in 0..5 {
            let mut t = target.clone();
            if attempt > 0 {
                t.truncate(255 - 9);
                t.extend_from_slice(format!("~{}", random_hex(8)).as_bytes());
            }
            let t = OsStr::from_bytes(&t);
            match self.fs.rename(from, name, &self.d.quarantine, t, true) {
                Ok(()) => {
                    tracing::warn!(
                        file = %self.path(from, name).display(),
                        to = %self.path(&self.d.quarantine, t).display(),
                        reason = problem.code(),
                        "quarantined: {}",
                        problem.detail()
                    );
                    return;
                }
                Err(e) if errno(&e) == Some(Errno::EEXIST) => continue,
                Err(e) if errno(&e) == Some(Errno::ENOENT) => return,
                Err(e) => {
                    tracing::error!(
                        file = %self.path(from, name).display(),
                        "cannot quarantine ({}): {e}; it is left in place and skipped",
                        problem.detail()
                    );
                    return;
                }
            }
        }
    }

    // ---- claimer registration ------------------------------------------------------------

    // ---- finding jobs by id --------------------------------------------------------------

    fn list_dir(&self, dir: &Dir) -> Result<Vec<(OsString, Kind)>> {
        self.fs.list(dir).map_err(|e| Error::io(&dir.path, "listing", e))
    }

    /// Visits a folder's entries as they are read, for passes over folders that may hold
    /// millions of jobs (see [`Fs::list_each`]).
    fn each_entry(&self, dir: &Dir, mut visit: impl FnMut(&OsStr, Kind)) -> Result<()> {
        self.fs
            .list_each(dir, &mut visit)
            .map_err(|e| Error::io(&dir.path, "listing", e))
    }

    fn dir_of(&self, state: State) -> &Dir {
        match state {
            State::Ready | State::Scheduled => &self.d.ready,
            State::Running => &self.d.running,
            State::Dead => &self.d.dead,
            State::Quarantined => &self.d.quarantine,
        }
    }

    // ---- transitions of a held lease -----------------------------------------------------
}

impl Store for DirStore {
    fn target(&self) -> &str {
        &self.target
    }

    fn config(&self) -> &QueueConfig {
        &self.config
    }

    fn push(&self, job: &NewJob) -> Result<JobId> {
        self.push_one(job)
    }

    fn push_batch(&self, jobs: &[NewJob]) -> Result<Vec<JobId>> {
        self.push_many(jobs)
    }

    fn claim(&self, lease: Duration) -> Result<Option<Claim>> {
        match self.claim_next(lease, true)? {
            lease::Claimed::Job(claim) => Ok(Some(claim)),
            lease::Claimed::Empty => Ok(None),
            lease::Claimed::WouldWait => unreachable!("a claim allowed to wait never gives up"),
        }
    }

    fn claim_now(&self, lease: Duration) -> Option<Result<Option<Claim>>> {
        match self.claim_next(lease, false) {
            Ok(lease::Claimed::Job(claim)) => Some(Ok(Some(claim))),
            Ok(lease::Claimed::Empty) => Some(Ok(None)),
            Ok(lease::Claimed::WouldWait) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn is_local(&self) -> bool {
        true
    }

    fn heartbeat(&self, lease: &Lease) -> Result<()> {
        self.heartbeat_lease(lease)
    }

    fn ack(&self, lease: &Lease) -> Result<()> {
        self.ack_lease(lease)
    }

    fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        self.retry_lease(lease, delay)
    }

    fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        self.bury_lease(lease, reason)
    }

    fn release(&self, lease: &Lease) -> Result<()> {
        self.release_lease(lease)
    }

    fn reclaim(&self, max_attempts: u32) -> Result<Vec<Reclaimed>> {
        self.reclaim_expired(max_attempts)
    }

    fn list(&self, states: &[State], bodies: bool) -> Result<Vec<JobInfo>> {
        self.list_jobs(states, bodies)
    }

    fn stats(&self) -> Result<Stats> {
        self.count()
    }

    fn idle(&self) -> Result<Idle> {
        self.observe_idle()
    }

    fn get(&self, id: &str) -> Result<Detail> {
        self.detail(id)
    }

    fn revive(&self, id: &JobId) -> Result<()> {
        self.revive_one(id)
    }

    fn revive_all(&self) -> Result<Vec<JobId>> {
        self.revive_every()
    }

    fn remove(&self, id: &str) -> Result<Option<State>> {
        self.remove_one(id)
    }

    fn finished(&self, id: &JobId) -> Result<Option<Vec<Event>>> {
        self.finished_history(id)
    }

    fn record(&self, id: &JobId, event: &Event) -> Result<()> {
        self.append_event(id, event)
    }

    fn open_log(&self, id: &JobId) -> Result<Box<dyn JobLog>> {
        Ok(Box::new(self.open_job_log(id, false)?.0))
    }

    /// As the default, with fewer system calls on a first attempt: its log and history are
    /// created rather than looked for first, and a log just created needs no size.
    fn begin_attempt(&self, lease: &Lease, header: &[u8], started: &Event) -> Result<(Box<dyn JobLog>, u64)> {
        let (mut log, created) = self.open_job_log(&lease.id, lease.attempt == 1)?;
        let start = if created { 0 } else { log.size()? };
        log.append(header)?;
        let _ = self.record(&lease.id, started);
        Ok((Box::new(log), start))
    }

    fn read_log(&self, id: &JobId, from: u64) -> Result<Option<Vec<u8>>> {
        self.read_job_log(id, from)
    }

    fn watch(&self, wake: Wake) -> Result<Box<dyn WatchGuard>> {
        self.start_watch(wake)
    }

    fn next_due(&self) -> Result<Option<Millis>> {
        self.earliest_due()
    }

    fn announce(&self, status: &RunnerStatus) -> Result<String> {
        self.publish_status(status)
    }

    fn retire(&self) -> Result<()> {
        self.unregister()
    }

    fn runners(&self) -> Result<Vec<RunnerInfo>> {
        self.list_runners()
    }

    fn collect_garbage(&self) -> Result<u64> {
        self.collect()
    }

    fn doctor(&self) -> Result<Vec<String>> {
        self.check_layout()
    }
}
