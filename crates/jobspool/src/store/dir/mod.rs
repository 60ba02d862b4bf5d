//! The queue directory store: one file per job on local disk, its state being the folder it is
//! in and the fields of its name, every transition one atomic `rename`.
//!
//! See [`layout`] for the folders, [`name`] for the file names and [`crate::body`] for the file
//! contents. The rules that keep the contract:
//!
//! - **Push** writes `tmp/…`, fsyncs it, renames it into `ready/` (never over an existing name)
//!   and fsyncs `ready/` before reporting success. Any failure removes what was written. A
//!   batch writes every file, flushes the file system once, renames, and fsyncs `ready/` once.
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

pub mod fs;
pub mod index;
pub mod layout;
pub mod name;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use self::fs::{Dir, Fs, Kind, RealFs};
use self::index::Index;
use self::name::{QueuedName, RunningName, random_hex};
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

/// This process's entry in `runners/`, locked for as long as it exists.
struct Registration {
    id: String,
    file: Flock<File>,
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
}

impl Problem {
    fn code(&self) -> &'static str {
        match self {
            Problem::Corrupt(c) => c.code(),
            Problem::Kind(k) => k.word(),
            Problem::Other(code, _) => code,
            Problem::Gone => "gone",
        }
    }

    fn detail(&self) -> String {
        match self {
            Problem::Corrupt(c) => c.to_string(),
            Problem::Kind(k) => format!("a {} is not a job file", k.word()),
            Problem::Other(_, d) => d.clone(),
            Problem::Gone => "vanished".into(),
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
        })
    }

    /// The queue directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, dir: &Dir, name: impl AsRef<OsStr>) -> PathBuf {
        dir.path.join(name.as_ref())
    }

    // ---- the transition lock ------------------------------------------------------------

    /// Holds `running/` locked shared for the duration of a claim or a move back to `ready/`,
    /// so that a completion check (which locks it exclusively) never sees a job in neither.
    fn tx_shared(&self) -> Result<TxGuard<'_>> {
        let fd = match lock(&self.lock_pool).pop() {
            Some(fd) => fd,
            None => self
                .d
                .running
                .reopen()
                .map_err(|e| Error::io(&self.d.running.path, "opening", e))?,
        };
        match Flock::lock(fd, FlockArg::LockShared) {
            Ok(f) => Ok(TxGuard {
                store: self,
                lock: Some(f),
            }),
            Err((_, e)) => Err(Error::io(&self.d.running.path, "locking", e)),
        }
    }

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
                    _ => Problem::Other("unreadable", e.to_string()),
                });
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| Problem::Other("unreadable", e.to_string()))?;
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
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes)
            .map_err(|e| Problem::Other("unreadable", e.to_string()))?;
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
        if matches!(problem, Problem::Gone) {
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

    fn my_id(&self) -> Result<String> {
        if let Some(r) = lock(&self.me).as_ref() {
            return Ok(r.id.clone());
        }
        self.announce(&RunnerStatus::for_this_process(0))
    }

    /// Whether the claimer `id` is alive: its `runners/` entry exists and is locked.
    fn runner_alive(&self, id: &str, mine: &str) -> bool {
        if id == mine {
            return true;
        }
        let file = match self.fs.open_read(&self.d.runners, OsStr::new(id)) {
            Ok(f) => f,
            Err(e) if errno(&e) == Some(Errno::ENOENT) => return false,
            // Cannot tell: assume alive, and let the lease decide.
            Err(_) => return true,
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_) => false,
            Err((_, Errno::EWOULDBLOCK)) => true,
            Err(_) => true,
        }
    }

    // ---- finding jobs by id --------------------------------------------------------------

    /// Finds the job `id` in ready/, running/ or dead/: its state folder and file name.
    fn find(&self, id: &str) -> Result<Option<(State, OsString)>> {
        for (dir, state) in [
            (&self.d.ready, State::Ready),
            (&self.d.running, State::Running),
            (&self.d.dead, State::Dead),
        ] {
            for (name, _) in self.list_dir(dir)? {
                let matches = if state == State::Running {
                    RunningName::parse(name.as_bytes()).is_some_and(|n| n.id.as_str() == id)
                } else {
                    QueuedName::parse(name.as_bytes()).is_some_and(|n| n.id.as_str() == id)
                };
                if matches {
                    return Ok(Some((state, name)));
                }
            }
        }
        Ok(None)
    }

    fn list_dir(&self, dir: &Dir) -> Result<Vec<(OsString, Kind)>> {
        self.fs.list(dir).map_err(|e| Error::io(&dir.path, "listing", e))
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

    fn lease_name(&self, lease: &Lease) -> Result<RunningName> {
        RunningName::parse(lease.token.as_bytes())
            .filter(|n| n.id == lease.id)
            .ok_or_else(|| Error::Invalid(format!("{:?} is not a lease token of job {}", lease.token, lease.id)))
    }

    /// Maps a failed operation on `running/TOKEN` to lease loss when the name is gone.
    fn lease_error(&self, lease: &Lease, what: &'static str, e: io::Error) -> Error {
        if errno(&e) == Some(Errno::ENOENT) {
            let still_there = nix::sys::stat::fstatat(
                self.d.running.fd(),
                lease.token.as_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_ok();
            if !still_there {
                return Error::LeaseLost {
                    id: lease.id.to_string(),
                };
            }
        }
        Error::io(self.path(&self.d.running, &lease.token), what, e)
    }

    /// Renames the claim `lease` to `to` in `dir`.
    fn move_lease(&self, lease: &Lease, dir: &Dir, to: &str, what: &'static str) -> Result<()> {
        let _tx = if std::ptr::eq(dir, &self.d.ready) {
            Some(self.tx_shared()?)
        } else {
            None
        };
        self.fs
            .rename(&self.d.running, OsStr::new(&lease.token), dir, OsStr::new(to), true)
            .map_err(|e| self.lease_error(lease, what, e))
    }

    fn events_name(id: &JobId) -> OsString {
        OsString::from(format!("{id}.events"))
    }

    fn log_name(id: &JobId) -> OsString {
        OsString::from(format!("{id}.log"))
    }

    fn read_history(&self, id: &JobId) -> Vec<Event> {
        let mut text = String::new();
        if let Ok(mut f) = self.fs.open_read(&self.d.logs, &Self::events_name(id)) {
            let _ = f.read_to_string(&mut text);
        }
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    fn record_synced(&self, id: &JobId, event: &Event, sync: bool) -> Result<()> {
        let name = Self::events_name(id);
        let mut line = serde_json::to_vec(event).expect("events serialize");
        line.push(b'\n');
        let file = self
            .fs
            .open_append(&self.d.logs, &name, self.config.mode)
            .map_err(|e| Error::io(self.path(&self.d.logs, &name), "opening the history", e))?;
        self.fs
            .write(&file, &self.d.logs, &name, &line)
            .map_err(|e| Error::io(self.path(&self.d.logs, &name), "writing the history", e))?;
        if sync {
            self.fs
                .fsync(&file, &self.d.logs, &name)
                .map_err(|e| Error::io(self.path(&self.d.logs, &name), "syncing the history", e))?;
        }
        Ok(())
    }

    /// A file's mtime in milliseconds (the last heartbeat of a running job).
    fn mtime_ms(&self, dir: &Dir, name: &OsStr) -> Option<Millis> {
        let st = nix::sys::stat::fstatat(dir.fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        Some((st.st_mtime.max(0) as u64) * 1000 + (st.st_mtime_nsec.max(0) as u64) / 1_000_000)
    }

    fn info_from_name(&self, state: State, name: &OsStr, now: Millis) -> Option<JobInfo> {
        match state {
            State::Running => RunningName::parse(name.as_bytes()).map(|n| JobInfo {
                id: n.id.to_string(),
                state,
                attempts: n.attempts,
                priority: n.priority,
                since: n.claimed,
                expires: Some(n.expires(self.mtime_ms(&self.d.running, name).unwrap_or(0))),
                runner: Some(n.runner),
                reason: None,
                job: None,
            }),
            State::Quarantined => Some(parse_quarantine_name(name)),
            _ => QueuedName::parse(name.as_bytes()).map(|n| JobInfo {
                id: n.id.to_string(),
                state: if state == State::Ready && n.at > now {
                    State::Scheduled
                } else {
                    state
                },
                attempts: n.attempts,
                priority: n.priority,
                since: n.at,
                expires: None,
                runner: None,
                reason: None,
                job: None,
            }),
        }
    }

    /// Pushes that have been written to `tmp/` and must be removed if the push fails.
    fn cleanup(&self, tmp: &[OsString], ready: &[String], markers: &[JobId]) {
        for name in tmp {
            let _ = self.fs.unlink(&self.d.tmp, name, false);
        }
        for name in ready {
            let _ = self.fs.unlink(&self.d.ready, OsStr::new(name), false);
        }
        for id in markers {
            let _ = self.fs.unlink(&self.d.logs, &Self::events_name(id), false);
        }
    }

    /// Writes one job into `tmp/`; returns the temp name and the name it will have in `ready/`.
    fn write_tmp(&self, job: &NewJob, markers: &mut Vec<JobId>) -> Result<(JobId, OsString, String, File)> {
        job.validate()?;
        let id = match &job.id {
            Some(id) => {
                // The history file doubles as the id's reservation: it is created exclusively
                // and lives as long as the job or its log.
                let marker = Self::events_name(id);
                match self.fs.create(&self.d.logs, &marker, self.config.mode) {
                    Ok(_) => markers.push(id.clone()),
                    Err(e) if errno(&e) == Some(Errno::EEXIST) => {
                        return Err(Error::JobExists {
                            id: id.to_string(),
                            queue: self.target.clone(),
                        });
                    }
                    Err(e) => return Err(Error::io(self.path(&self.d.logs, &marker), "reserving the job id", e)),
                }
                id.clone()
            }
            None => JobId::generate(),
        };
        let created = now_ms();
        let stored = Job::from_new(job, id.clone(), created);
        let bytes = body::encode(&stored);
        let tmp = OsString::from(format!("{id}.{}.{}", std::process::id(), random_hex(8)));
        let file = self
            .fs
            .create(&self.d.tmp, &tmp, self.config.mode)
            .map_err(|e| Error::io(self.path(&self.d.tmp, &tmp), "creating the job file", e))?;
        if let Err(e) = self.fs.write(&file, &self.d.tmp, &tmp, &bytes) {
            let _ = self.fs.unlink(&self.d.tmp, &tmp, false);
            return Err(Error::io(self.path(&self.d.tmp, &tmp), "writing the job file", e));
        }
        let ready = QueuedName {
            priority: stored.priority,
            at: stored.run_at,
            attempts: 0,
            id: id.clone(),
        }
        .format();
        Ok((id, tmp, ready, file))
    }

    fn publish(&self, tmp: &OsStr, ready: &str) -> Result<()> {
        self.fs
            .rename(&self.d.tmp, tmp, &self.d.ready, OsStr::new(ready), true)
            .map_err(|e| {
                if errno(&e) == Some(Errno::EEXIST) {
                    let id = QueuedName::parse(ready.as_bytes())
                        .map(|n| n.id.to_string())
                        .unwrap_or_default();
                    Error::JobExists {
                        id,
                        queue: self.target.clone(),
                    }
                } else {
                    Error::io(self.path(&self.d.ready, ready), "moving the job into ready/", e)
                }
            })
    }
}

struct TxGuard<'a> {
    store: &'a DirStore,
    lock: Option<Flock<OwnedFd>>,
}

impl Drop for TxGuard<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.lock.take() {
            if let Ok(fd) = f.unlock() {
                lock(&self.store.lock_pool).push(fd);
            }
        }
    }
}

/// Parses a quarantine entry name `TIME.REASON.FOLDER.ORIGINAL`.
fn parse_quarantine_name(name: &OsStr) -> JobInfo {
    let text = name.to_string_lossy();
    let mut parts = text.splitn(4, '.');
    let since = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
    let reason = parts.next().map(str::to_string);
    let from = parts.next().unwrap_or("");
    JobInfo {
        id: text.to_string(),
        state: State::Quarantined,
        attempts: 0,
        priority: 0,
        since,
        expires: None,
        runner: None,
        reason: reason.map(|r| format!("{r} (from {from}/)")),
        job: None,
    }
}

struct DirLog {
    file: File,
    path: PathBuf,
}

impl JobLog for DirLog {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, "writing the log", e))
    }

    fn size(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&self.path, "inspecting the log", e))
    }

    fn child_output(&self) -> Result<Option<File>> {
        self.file
            .try_clone()
            .map(Some)
            .map_err(|e| Error::io(&self.path, "duplicating the log descriptor", e))
    }
}

struct DirWatch {
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatchGuard for DirWatch {}

impl Drop for DirWatch {
    fn drop(&mut self) {
        // Closing the write end makes the watcher's poll return.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Store for DirStore {
    fn target(&self) -> &str {
        &self.target
    }

    fn config(&self) -> &QueueConfig {
        &self.config
    }

    fn push(&self, job: &NewJob) -> Result<JobId> {
        let mut markers = Vec::new();
        let (id, tmp, ready, file) = match self.write_tmp(job, &mut markers) {
            Ok(w) => w,
            Err(e) => {
                self.cleanup(&[], &[], &markers);
                return Err(e);
            }
        };
        if let Err(e) = self.fs.fsync(&file, &self.d.tmp, &tmp) {
            // Never retried: after a failed fsync the page cache may claim data the disk lost.
            self.cleanup(std::slice::from_ref(&tmp), &[], &markers);
            return Err(Error::io(self.path(&self.d.tmp, &tmp), "syncing the job file", e));
        }
        drop(file);
        if let Err(e) = self.publish(&tmp, &ready) {
            self.cleanup(&[tmp], &[], &markers);
            return Err(e);
        }
        if let Err(e) = self.fs.sync_dir(&self.d.ready) {
            return Err(self.unpublish(&ready, &markers, e));
        }
        Ok(id)
    }

    fn push_batch(&self, jobs: &[NewJob]) -> Result<Vec<JobId>> {
        let mut seen = HashSet::new();
        for job in jobs {
            job.validate()?;
            if let Some(id) = &job.id {
                if !seen.insert(id) {
                    return Err(Error::Invalid(format!("job id {id} appears twice in the batch")));
                }
            }
        }
        let mut markers = Vec::new();
        let mut written: Vec<(JobId, OsString, String)> = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.write_tmp(job, &mut markers) {
                Ok((id, tmp, ready, _file)) => written.push((id, tmp, ready)),
                Err(e) => {
                    let tmps: Vec<_> = written.into_iter().map(|w| w.1).collect();
                    self.cleanup(&tmps, &[], &markers);
                    return Err(e);
                }
            }
        }
        // One flush makes every body durable before any of them becomes visible.
        if let Err(e) = self.fs.syncfs(&self.d.tmp) {
            let tmps: Vec<_> = written.into_iter().map(|w| w.1).collect();
            self.cleanup(&tmps, &[], &markers);
            return Err(Error::io(&self.d.tmp.path, "syncing the batch", e));
        }
        let mut published: Vec<String> = Vec::with_capacity(written.len());
        for (i, (_, tmp, ready)) in written.iter().enumerate() {
            if let Err(e) = self.publish(tmp, ready) {
                let rest: Vec<_> = written[i..].iter().map(|w| w.1.clone()).collect();
                self.cleanup(&rest, &published, &markers);
                return Err(e);
            }
            published.push(ready.clone());
        }
        if let Err(e) = self.fs.sync_dir(&self.d.ready) {
            let mut first = None;
            for name in &published {
                let err = self.unpublish(name, &[], io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(5)));
                first.get_or_insert(err);
            }
            self.cleanup(&[], &[], &markers);
            return Err(first.unwrap_or_else(|| Error::io(&self.d.ready.path, "syncing", e)));
        }
        Ok(written.into_iter().map(|w| w.0).collect())
    }

    fn claim(&self, lease: Duration) -> Result<Option<Claim>> {
        let runner = self.my_id()?;
        let lease_ms = lease.as_millis().max(1) as u64;
        loop {
            let (foreign, entry) = {
                let mut guard = lock(&self.index);
                let idx = guard.get_or_insert_with(|| Index::new(&self.root));
                idx.drain();
                idx.refresh(&*self.fs, &self.d.ready)
                    .map_err(|e| Error::io(&self.d.ready.path, "listing", e))?;
                (idx.take_foreign(&self.d.ready), idx.pop(now_ms()))
            };
            for (name, kind) in foreign {
                let problem = if kind == Kind::File {
                    Problem::Other("bad-name", "the name is not a job name".into())
                } else {
                    Problem::Kind(kind)
                };
                self.quarantine(&self.d.ready, &name, &problem);
            }
            let Some(entry) = entry else { return Ok(None) };
            let q = entry.name();
            let from = q.format();
            let r = RunningName {
                priority: q.priority,
                run_at: q.at,
                attempts: q.attempts,
                runner: runner.clone(),
                claimed: now_ms(),
                lease_ms,
                nonce: random_hex(8),
                id: q.id.clone(),
            };
            let token = r.format();
            let renamed = {
                let _tx = self.tx_shared()?;
                self.fs.rename(
                    &self.d.ready,
                    OsStr::new(&from),
                    &self.d.running,
                    OsStr::new(&token),
                    false,
                )
            };
            match renamed {
                Ok(()) => {}
                // Another claimer won this one: take the next.
                Err(e) if errno(&e) == Some(Errno::ENOENT) => continue,
                Err(e) => {
                    if let Some(idx) = lock(&self.index).as_mut() {
                        idx.put_back(entry);
                    }
                    return Err(Error::io(self.path(&self.d.ready, &from), "claiming", e));
                }
            }
            match self.read_body(&self.d.running, OsStr::new(&token), Some(&q.id)) {
                Ok(job) => {
                    return Ok(Some(Claim {
                        job,
                        lease: Lease {
                            id: q.id,
                            attempt: q.attempts.saturating_add(1),
                            token,
                        },
                    }));
                }
                Err(problem) => self.quarantine(&self.d.running, OsStr::new(&token), &problem),
            }
        }
    }

    fn heartbeat(&self, lease: &Lease) -> Result<()> {
        self.lease_name(lease)?;
        self.fs
            .touch(&self.d.running, OsStr::new(&lease.token))
            .map_err(|e| self.lease_error(lease, "heartbeat", e))
    }

    fn ack(&self, lease: &Lease) -> Result<()> {
        self.lease_name(lease)?;
        self.fs
            .unlink(&self.d.running, OsStr::new(&lease.token), false)
            .map_err(|e| self.lease_error(lease, "acknowledging", e))
    }

    fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        let r = self.lease_name(lease)?;
        let to = QueuedName {
            priority: r.priority,
            at: now_ms().saturating_add(delay.as_millis() as u64),
            attempts: r.attempts.saturating_add(1),
            id: r.id,
        }
        .format();
        self.move_lease(lease, &self.d.ready, &to, "retrying")
    }

    fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        let r = self.lease_name(lease)?;
        let attempts = r.attempts.saturating_add(1);
        let to = QueuedName {
            priority: r.priority,
            at: now_ms(),
            attempts,
            id: r.id.clone(),
        }
        .format();
        self.move_lease(lease, &self.d.dead, &to, "burying")?;
        let mut event = Event::now(EventKind::Dead, attempts, Some(reason.to_string()));
        event.runner = Some(r.runner);
        // A dead job is rare and its reason is what the operator needs: make both durable.
        self.record_synced(&r.id, &event, true)?;
        self.fs
            .sync_dir(&self.d.dead)
            .map_err(|e| Error::io(&self.d.dead.path, "syncing", e))
    }

    fn release(&self, lease: &Lease) -> Result<()> {
        let r = self.lease_name(lease)?;
        let to = QueuedName {
            priority: r.priority,
            at: r.run_at,
            attempts: r.attempts,
            id: r.id,
        }
        .format();
        self.move_lease(lease, &self.d.ready, &to, "releasing")
    }

    fn reclaim(&self, max_attempts: u32) -> Result<Vec<Reclaimed>> {
        let mine = self.my_id()?;
        let mut alive: HashMap<String, bool> = HashMap::new();
        let mut out = Vec::new();
        for (name, kind) in self.list_dir(&self.d.running)? {
            if kind != Kind::File {
                self.quarantine(&self.d.running, &name, &Problem::Kind(kind));
                continue;
            }
            let Some(r) = RunningName::parse(name.as_bytes()) else {
                self.quarantine(
                    &self.d.running,
                    &name,
                    &Problem::Other("bad-name", "the name is not a lease name".into()),
                );
                continue;
            };
            let is_alive = *alive
                .entry(r.runner.clone())
                .or_insert_with(|| self.runner_alive(&r.runner, &mine));
            let cause = if !is_alive {
                ReclaimCause::RunnerDied
            } else {
                let Some(mtime) = self.mtime_ms(&self.d.running, &name) else {
                    continue;
                };
                if now_ms() < r.expires(mtime) {
                    continue;
                }
                ReclaimCause::LeaseExpired
            };
            let job = match self.read_body(&self.d.running, &name, Some(&r.id)) {
                Ok(job) => job,
                Err(problem) => {
                    self.quarantine(&self.d.running, &name, &problem);
                    continue;
                }
            };
            let attempts = r.attempts.saturating_add(1);
            let limit = job.max_attempts.unwrap_or(max_attempts).max(1);
            let buried = attempts >= limit;
            let lease = Lease {
                id: r.id.clone(),
                attempt: attempts,
                token: name.to_string_lossy().into_owned(),
            };
            let what = match cause {
                ReclaimCause::RunnerDied => "its runner died",
                ReclaimCause::LeaseExpired => "its lease expired",
            };
            let moved = if buried {
                let to = QueuedName {
                    priority: r.priority,
                    at: now_ms(),
                    attempts,
                    id: r.id.clone(),
                }
                .format();
                self.move_lease(&lease, &self.d.dead, &to, "reclaiming")
            } else {
                let to = QueuedName {
                    priority: r.priority,
                    at: now_ms(),
                    attempts,
                    id: r.id.clone(),
                }
                .format();
                self.move_lease(&lease, &self.d.ready, &to, "reclaiming")
            };
            match moved {
                Ok(()) => {}
                Err(Error::LeaseLost { .. }) => continue,
                Err(e) => return Err(e),
            }
            let mut event = Event::now(
                EventKind::Reclaimed,
                attempts,
                Some(format!("attempt {attempts}: {what}")),
            );
            event.runner = Some(r.runner.clone());
            let _ = self.record_synced(&r.id, &event, false);
            if buried {
                let reason = format!("{what} on attempt {attempts} of {limit}; no attempts left");
                let _ = self.record_synced(&r.id, &Event::now(EventKind::Dead, attempts, Some(reason)), true);
            }
            tracing::warn!(job = %r.id, attempt = attempts, buried, "reclaimed: {what}");
            out.push(Reclaimed {
                id: r.id,
                old_token: lease.token,
                cause,
                attempts,
                buried,
            });
        }
        // Entries of dead claimers are removed once their claims are taken back.
        for (id, is_alive) in alive {
            if !is_alive {
                let _ = self.fs.unlink(&self.d.runners, OsStr::new(&id), false);
            }
        }
        Ok(out)
    }

    fn list(&self, states: &[State], bodies: bool) -> Result<Vec<JobInfo>> {
        let now = now_ms();
        let mut out = Vec::new();
        let mut folders: Vec<State> = Vec::new();
        for s in states {
            let folder = if *s == State::Scheduled { State::Ready } else { *s };
            if !folders.contains(&folder) {
                folders.push(folder);
            }
        }
        for folder in folders {
            let dir = self.dir_of(folder);
            let mut names = self.list_dir(dir)?;
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, _) in names {
                let Some(mut info) = self.info_from_name(folder, &name, now) else {
                    continue;
                };
                if !states.contains(&info.state) {
                    continue;
                }
                if bodies && info.state != State::Quarantined {
                    let id = JobId::new(info.id.clone()).ok();
                    info.job = self.read_body(dir, &name, id.as_ref()).ok();
                }
                out.push(info);
            }
        }
        Ok(out)
    }

    fn stats(&self) -> Result<Stats> {
        let now = now_ms();
        let mut s = Stats::default();
        for (name, _) in self.list_dir(&self.d.ready)? {
            if let Some(n) = QueuedName::parse(name.as_bytes()) {
                if n.at > now {
                    s.scheduled += 1;
                } else {
                    s.ready += 1;
                    s.oldest_ready = Some(s.oldest_ready.map_or(n.at, |o: Millis| o.min(n.at)));
                }
            }
        }
        s.running = self
            .list_dir(&self.d.running)?
            .iter()
            .filter(|(n, _)| RunningName::parse(n.as_bytes()).is_some())
            .count() as u64;
        s.dead = self
            .list_dir(&self.d.dead)?
            .iter()
            .filter(|(n, _)| QueuedName::parse(n.as_bytes()).is_some())
            .count() as u64;
        s.quarantined = self.list_dir(&self.d.quarantine)?.len() as u64;
        Ok(s)
    }

    fn idle(&self) -> Result<Idle> {
        let fd = self
            .d
            .running
            .reopen()
            .map_err(|e| Error::io(&self.d.running.path, "opening", e))?;
        let deadline = std::time::Instant::now() + IDLE_LOCK_WAIT;
        let mut fd = fd;
        let _held = loop {
            match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((back, Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                    fd = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((_, e)) => return Err(Error::io(&self.d.running.path, "locking for a completion check", e)),
            }
        };
        let now = now_ms();
        let mut idle = Idle::default();
        for (name, _) in self.list_dir(&self.d.ready)? {
            if let Some(n) = QueuedName::parse(name.as_bytes()) {
                if n.at > now {
                    idle.scheduled += 1;
                } else {
                    idle.ready += 1;
                }
            }
        }
        for (name, _) in self.list_dir(&self.d.running)? {
            if RunningName::parse(name.as_bytes()).is_some() {
                idle.running += 1;
            }
        }
        Ok(idle)
    }

    fn get(&self, id: &str) -> Result<Detail> {
        if let Some((state, name)) = self.find(id)? {
            let dir = self.dir_of(state);
            let info = self.info_from_name(state, &name, now_ms()).expect("found by parsing");
            let jid = JobId::new(id)?;
            let job = match self.read_body(dir, &name, Some(&jid)) {
                Ok(job) => Some(job),
                Err(Problem::Gone) => return self.get(id),
                Err(p) => {
                    return Err(Error::Invalid(format!(
                        "{}: {}; it will be quarantined when a runner claims it",
                        self.path(dir, &name).display(),
                        p.detail()
                    )));
                }
            };
            return Ok(Detail {
                info,
                job,
                history: self.read_history(&jid),
            });
        }
        let qname = OsStr::new(id);
        if !id.contains('/') && id != "." && id != ".." && !id.is_empty() {
            if let Ok(file) = self.fs.open_read(&self.d.quarantine, qname) {
                drop(file);
                return Ok(Detail {
                    info: parse_quarantine_name(qname),
                    job: self.read_body(&self.d.quarantine, qname, None).ok(),
                    history: Vec::new(),
                });
            }
            if fs::lstat_kind(&self.d.quarantine, qname) != Kind::Vanished {
                return Ok(Detail {
                    info: parse_quarantine_name(qname),
                    job: None,
                    history: Vec::new(),
                });
            }
        }
        Err(Error::NotFound {
            id: id.to_string(),
            queue: self.target.clone(),
        })
    }

    fn revive(&self, id: &JobId) -> Result<()> {
        match self.find(id.as_str())? {
            Some((State::Dead, name)) => {
                let n = QueuedName::parse(name.as_bytes()).expect("found by parsing");
                let to = QueuedName {
                    priority: n.priority,
                    at: now_ms(),
                    attempts: 0,
                    id: n.id,
                }
                .format();
                match self
                    .fs
                    .rename(&self.d.dead, &name, &self.d.ready, OsStr::new(&to), true)
                {
                    Ok(()) => {}
                    // Revived by someone else at the same moment: it is no longer dead.
                    Err(e) if errno(&e) == Some(Errno::ENOENT) => {
                        return Err(Error::WrongState {
                            id: id.to_string(),
                            state: "not dead",
                            what: "revived by someone else",
                        });
                    }
                    Err(e) => return Err(Error::io(self.path(&self.d.dead, &name), "reviving", e)),
                }
                self.fs
                    .sync_dir(&self.d.ready)
                    .map_err(|e| Error::io(&self.d.ready.path, "syncing", e))?;
                let _ = self.record_synced(
                    id,
                    &Event::now(
                        EventKind::Revived,
                        n.attempts,
                        Some(format!("after {} attempts", n.attempts)),
                    ),
                    false,
                );
                Ok(())
            }
            Some((state, _)) => Err(Error::WrongState {
                id: id.to_string(),
                state: state.as_str(),
                what: "only dead jobs can be retried",
            }),
            None => Err(Error::NotFound {
                id: id.to_string(),
                queue: self.target.clone(),
            }),
        }
    }

    fn revive_all(&self) -> Result<Vec<JobId>> {
        let mut out = Vec::new();
        for (name, _) in self.list_dir(&self.d.dead)? {
            if let Some(n) = QueuedName::parse(name.as_bytes()) {
                match self.revive(&n.id) {
                    Ok(()) => out.push(n.id),
                    Err(Error::WrongState { .. } | Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    fn remove(&self, id: &str) -> Result<State> {
        if let Some((state, name)) = self.find(id)? {
            let dir = self.dir_of(state);
            match self.fs.unlink(dir, &name, false) {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(Errno::ENOENT) => return self.remove(id),
                Err(e) => return Err(Error::io(self.path(dir, &name), "removing", e)),
            }
            let jid = JobId::new(id)?;
            let _ = self.fs.unlink(&self.d.logs, &Self::log_name(&jid), false);
            let _ = self.fs.unlink(&self.d.logs, &Self::events_name(&jid), false);
            self.fs.sync_dir(dir).map_err(|e| Error::io(&dir.path, "syncing", e))?;
            let state = self.info_from_name(state, &name, now_ms()).map_or(state, |i| i.state);
            return Ok(state);
        }
        let qname = OsStr::new(id);
        if !id.contains('/') && id != "." && id != ".." && !id.is_empty() {
            match fs::lstat_kind(&self.d.quarantine, qname) {
                Kind::Vanished => {}
                Kind::Directory => {
                    return Err(Error::Invalid(format!(
                        "{} is a directory; inspect it and remove it by hand",
                        self.path(&self.d.quarantine, qname).display()
                    )));
                }
                _ => {
                    self.fs
                        .unlink(&self.d.quarantine, qname, false)
                        .map_err(|e| Error::io(self.path(&self.d.quarantine, qname), "removing", e))?;
                    return Ok(State::Quarantined);
                }
            }
        }
        Err(Error::NotFound {
            id: id.to_string(),
            queue: self.target.clone(),
        })
    }

    fn record(&self, id: &JobId, event: &Event) -> Result<()> {
        self.record_synced(id, event, false)
    }

    fn open_log(&self, id: &JobId) -> Result<Box<dyn JobLog>> {
        let name = Self::log_name(id);
        let path = self.path(&self.d.logs, &name);
        let file = self
            .fs
            .open_append(&self.d.logs, &name, self.config.mode)
            .map_err(|e| Error::io(&path, "opening the log", e))?;
        Ok(Box::new(DirLog { file, path }))
    }

    fn read_log(&self, id: &JobId, from: u64) -> Result<Option<Vec<u8>>> {
        let name = Self::log_name(id);
        let mut file = match self.fs.open_read(&self.d.logs, &name) {
            Ok(f) => f,
            Err(e) if errno(&e) == Some(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(Error::io(self.path(&self.d.logs, &name), "opening the log", e)),
        };
        let mut buf = Vec::new();
        file.seek(io::SeekFrom::Start(from))
            .and_then(|_| file.read_to_end(&mut buf))
            .map_err(|e| Error::io(self.path(&self.d.logs, &name), "reading the log", e))?;
        Ok(Some(buf))
    }

    fn watch(&self, wake: Wake) -> Result<Box<dyn WatchGuard>> {
        let fd = {
            let mut guard = lock(&self.index);
            let idx = guard.get_or_insert_with(|| Index::new(&self.root));
            match idx.fd() {
                Some(fd) => Some(
                    fd.try_clone_to_owned()
                        .map_err(|e| Error::io(&self.root, "watching", e))?,
                ),
                None => None,
            }
        };
        let (stop_read, stop_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io(&self.root, "creating the watch pipe", e))?;
        let index = Arc::clone(&self.index);
        let thread = std::thread::Builder::new()
            .name("jobspool-watch".into())
            .spawn(move || watch_loop(fd, stop_read, index, wake))
            .map_err(|e| Error::io(&self.root, "starting the watch thread", e))?;
        Ok(Box::new(DirWatch {
            stop: Some(stop_write),
            thread: Some(thread),
        }))
    }

    fn next_due(&self) -> Result<Option<Millis>> {
        let mut guard = lock(&self.index);
        let idx = guard.get_or_insert_with(|| Index::new(&self.root));
        idx.drain();
        idx.refresh(&*self.fs, &self.d.ready)
            .map_err(|e| Error::io(&self.d.ready.path, "listing", e))?;
        Ok(idx.next_due())
    }

    fn announce(&self, status: &RunnerStatus) -> Result<String> {
        let mut me = lock(&self.me);
        let mut text = serde_json::to_vec(status).expect("status serializes");
        text.push(b'\n');
        if let Some(reg) = me.as_ref() {
            let path = self.path(&self.d.runners, &reg.id);
            // Pad with spaces over any longer previous content, in one write.
            let old_len = reg.file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
            if text.len() < old_len {
                text.resize(old_len, b' ');
            }
            reg.file
                .write_all_at(&text, 0)
                .map_err(|e| Error::io(&path, "updating the runner entry", e))?;
            return Ok(reg.id.clone());
        }
        // Created in tmp/, locked, then renamed into runners/: an entry is never visible unlocked.
        let id = random_hex(16);
        let tmp = OsString::from(format!("runner.{id}"));
        let tmp_path = self.path(&self.d.tmp, &tmp);
        let file = self
            .fs
            .create(&self.d.tmp, &tmp, self.config.mode)
            .map_err(|e| Error::io(&tmp_path, "creating the runner entry", e))?;
        drop(file);
        let file = nix::fcntl::openat(
            self.d.tmp.fd(),
            tmp.as_os_str(),
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NOFOLLOW,
            nix::sys::stat::Mode::empty(),
        )
        .map(File::from)
        .map_err(|e| Error::io(&tmp_path, "opening the runner entry", e));
        let result = file.and_then(|f| {
            let locked = Flock::lock(f, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| Error::io(&tmp_path, "locking the runner entry", e))?;
            locked
                .write_all_at(&text, 0)
                .map_err(|e| Error::io(&tmp_path, "writing the runner entry", e))?;
            self.fs
                .rename(&self.d.tmp, &tmp, &self.d.runners, OsStr::new(&id), true)
                .map_err(|e| Error::io(self.path(&self.d.runners, &id), "registering the runner", e))?;
            Ok(locked)
        });
        match result {
            Ok(file) => {
                *me = Some(Registration { id: id.clone(), file });
                Ok(id)
            }
            Err(e) => {
                let _ = self.fs.unlink(&self.d.tmp, &tmp, false);
                Err(e)
            }
        }
    }

    fn retire(&self) -> Result<()> {
        if let Some(reg) = lock(&self.me).take() {
            match self.fs.unlink(&self.d.runners, OsStr::new(&reg.id), false) {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(Errno::ENOENT) => {}
                Err(e) => {
                    return Err(Error::io(
                        self.path(&self.d.runners, &reg.id),
                        "removing the runner entry",
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    fn runners(&self) -> Result<Vec<RunnerInfo>> {
        let mine = lock(&self.me).as_ref().map(|r| r.id.clone()).unwrap_or_default();
        let mut out = Vec::new();
        for (name, kind) in self.list_dir(&self.d.runners)? {
            if kind != Kind::File {
                continue;
            }
            let id = name.to_string_lossy().into_owned();
            let Ok(mut f) = self.fs.open_read(&self.d.runners, &name) else {
                continue;
            };
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let heartbeat = f
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .map(crate::job::to_ms)
                .unwrap_or(0);
            drop(f);
            out.push(RunnerInfo {
                alive: self.runner_alive(&id, &mine),
                status: serde_json::from_str(text.trim_end()).unwrap_or_default(),
                heartbeat,
                id,
            });
        }
        out.sort_by_key(|r| r.status.started);
        Ok(out)
    }

    fn collect_garbage(&self) -> Result<u64> {
        let mut removed = 0;
        let now = std::time::SystemTime::now();
        let age = |dir: &Dir, name: &OsStr| -> Option<Duration> {
            let st = nix::sys::stat::fstatat(dir.fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
            let mtime = crate::job::from_ms((st.st_mtime.max(0) as u64) * 1000);
            now.duration_since(mtime).ok()
        };
        for (name, kind) in self.list_dir(&self.d.tmp)? {
            if kind == Kind::File && age(&self.d.tmp, &name).is_some_and(|a| a > TMP_GRACE) {
                // A runner entry still being registered is locked; leave those alone.
                if name.as_bytes().starts_with(b"runner.") {
                    if let Ok(f) = self.fs.open_read(&self.d.tmp, &name) {
                        if Flock::lock(f, FlockArg::LockSharedNonblock).is_err() {
                            continue;
                        }
                    }
                }
                if self.fs.unlink(&self.d.tmp, &name, false).is_ok() {
                    tracing::info!(file = %self.path(&self.d.tmp, &name).display(), "removed the leftover of a crashed push");
                    removed += 1;
                }
            }
        }
        let mut live: HashSet<String> = HashSet::new();
        for (name, _) in self
            .list_dir(&self.d.ready)?
            .into_iter()
            .chain(self.list_dir(&self.d.dead)?)
        {
            if let Some(n) = QueuedName::parse(name.as_bytes()) {
                live.insert(n.id.to_string());
            }
        }
        for (name, _) in self.list_dir(&self.d.running)? {
            if let Some(n) = RunningName::parse(name.as_bytes()) {
                live.insert(n.id.to_string());
            }
        }
        for (name, kind) in self.list_dir(&self.d.logs)? {
            let text = name.to_string_lossy();
            let Some(id) = text.strip_suffix(".log").or_else(|| text.strip_suffix(".events")) else {
                continue;
            };
            if kind != Kind::File || live.contains(id) {
                continue;
            }
            if age(&self.d.logs, &name).is_some_and(|a| a > self.config.log_retention)
                && self.fs.unlink(&self.d.logs, &name, false).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn doctor(&self) -> Result<Vec<String>> {
        let mut problems = layout::doctor(&self.root, &self.config);
        for (name, kind) in self.list_dir(&self.d.ready)? {
            if kind != Kind::File || QueuedName::parse(name.as_bytes()).is_none() {
                problems.push(format!(
                    "{}: is not a job ({}); a runner will quarantine it",
                    self.path(&self.d.ready, &name).display(),
                    kind.word()
                ));
                continue;
            }
            if let Err(e) = self.fs.open_read(&self.d.ready, &name) {
                problems.push(format!(
                    "{}: cannot be read by this user ({e}); fix its mode or group, or the producer's (`jobspool init --mode`)",
                    self.path(&self.d.ready, &name).display()
                ));
            }
        }
        for r in self.runners()? {
            if !r.alive {
                problems.push(format!(
                    "runner {} (pid {} on {}) is gone but still registered; the next runner will reclaim its jobs",
                    r.id, r.status.pid, r.status.host
                ));
            }
        }
        Ok(problems)
    }
}

impl DirStore {
    /// After `ready/` could not be synced, takes the pushed job back out. If a runner already
    /// claimed it, the outcome is unknown and the error says so.
    fn unpublish(&self, ready: &str, markers: &[JobId], e: io::Error) -> Error {
        match self.fs.unlink(&self.d.ready, OsStr::new(ready), false) {
            Ok(()) => {
                self.cleanup(&[], &[], markers);
                Error::io(&self.d.ready.path, "syncing the directory (the job was not added)", e)
            }
            Err(_) => Error::io(
                &self.d.ready.path,
                "syncing the directory (the job was already claimed and may run: its push is not known to be durable)",
                e,
            ),
        }
    }
}

fn watch_loop(fd: Option<OwnedFd>, stop: OwnedFd, index: Arc<Mutex<Option<Index>>>, wake: Wake) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let (ready, stopped) = {
            let stop_fd = PollFd::new(stop.as_fd(), PollFlags::POLLIN);
            match &fd {
                Some(fd) => {
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN), stop_fd];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Ok(_) => {}
                        Err(Errno::EINTR) => continue,
                        Err(e) => {
                            tracing::error!("waiting for queue events failed: {e}");
                            std::thread::sleep(index::FALLBACK_RESCAN);
                        }
                    }
                    (
                        fds[0].revents().is_some_and(|r| !r.is_empty()),
                        fds[1].revents().is_some_and(|r| !r.is_empty()),
                    )
                }
                None => {
                    let mut fds = [stop_fd];
                    let timeout =
                        PollTimeout::try_from(index::FALLBACK_RESCAN.as_millis() as i32).unwrap_or(PollTimeout::MAX);
                    match poll(&mut fds, timeout) {
                        Ok(0) => (true, false),
                        Ok(_) => (false, true),
                        Err(_) => (true, false),
                    }
                }
            }
        };
        if stopped {
            return;
        }
        if ready {
            let drained = match (&fd, lock(&index).as_mut()) {
                (_, None) => return,
                (Some(_), Some(idx)) => idx.drain(),
                (None, Some(_)) => index::Drained {
                    work: true,
                    runner_exited: true,
                },
            };
            if drained.work || drained.runner_exited {
                wake(Wakeup {
                    work: drained.work,
                    runner_exited: drained.runner_exited,
                });
            }
        }
    }
}
