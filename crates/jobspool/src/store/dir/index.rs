//! The in-memory index of `ready/`, kept current by inotify, so that a claim never scans the
//! directory: the directory is listed once, then every push (a rename into `ready/`) arrives as
//! an event and is inserted in order.
//!
//! Events are hints. The watch is armed before the first listing, so a push that lands between
//! the two is seen by one or the other; an entry that is gone by the time it is claimed simply
//! fails its rename and is dropped; a queue overflow marks the index stale and the next claim
//! lists the directory again. Only arrivals are watched: names leaving `ready/` (this runner's
//! own claims, which are popped from the index first, and other claimers', removals, a `mv` by
//! hand) would wake the watching thread once per claim for nothing the failed rename does not
//! already handle. Where inotify is unavailable (no instances or watches left), the
//! index is relisted at most once per [`FALLBACK_RESCAN`] instead, and a warning says so.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use super::fs::{Dir, Fs, Kind, lstat_kind};
use super::name::QueuedName;
use crate::job::{JobId, Millis};

/// How often the index is relisted when inotify cannot be used.
pub const FALLBACK_RESCAN: Duration = Duration::from_secs(1);

/// A job id stored compactly: generated UUIDv7 ids as 16 bytes, others as text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum IdKey {
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl IdKey {
    fn new(id: &JobId) -> IdKey {
        let s = id.as_str();
        match uuid::Uuid::try_parse(s) {
            Ok(u) if u.hyphenated().to_string() == s => IdKey::Uuid(*u.as_bytes()),
            _ => IdKey::Text(s.into()),
        }
    }

    fn to_id(&self) -> JobId {
        match self {
            IdKey::Uuid(b) => JobId::new(uuid::Uuid::from_bytes(*b).hyphenated().to_string()),
            IdKey::Text(s) => JobId::new(&**s),
        }
        .expect("indexed ids were valid")
    }
}

/// One ready or scheduled job. Orders by priority, then run-at, then id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    key: u16,
    at: Millis,
    id: IdKey,
    attempts: u32,
}

impl Entry {
    fn new(n: &QueuedName) -> Entry {
        Entry {
            key: (crate::job::MAX_PRIORITY - n.priority) as u16,
            at: n.at,
            id: IdKey::new(&n.id),
            attempts: n.attempts,
        }
    }

    /// The name this entry stands for.
    pub fn name(&self) -> QueuedName {
        QueuedName {
            priority: crate::job::MAX_PRIORITY - self.key as i16,
            at: self.at,
            attempts: self.attempts,
            id: self.id.to_id(),
        }
    }
}

/// What draining the event queue found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// New jobs (or foreign entries) appeared in `ready/`, or the index must be relisted.
    pub work: bool,
    /// A registered claimer closed its entry in `runners/`: it may have died.
    pub runner_exited: bool,
}

/// The ready index and the inotify instance feeding it.
pub struct Index {
    inotify: Option<Inotify>,
    ready_wd: Option<WatchDescriptor>,
    runners_wd: Option<WatchDescriptor>,
    due: BTreeSet<Entry>,
    future: BTreeSet<(Millis, Entry)>,
    foreign: Vec<(OsString, Kind)>,
    stale: bool,
    last_listing: Option<Instant>,
    buf: Vec<u8>,
}

impl Index {
    /// Arms the watches (before anything is listed) and marks the index for its first listing.
    pub fn new(root: &Path) -> Index {
        let mut index = Index {
            inotify: None,
            ready_wd: None,
            runners_wd: None,
            due: BTreeSet::new(),
            future: BTreeSet::new(),
            foreign: Vec::new(),
            stale: true,
            last_listing: None,
            buf: vec![0; 64 * 1024],
        };
        match Inotify::init() {
            Ok(inotify) => {
                let ready = inotify.watches().add(
                    root.join("ready"),
                    WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE | WatchMask::CREATE | WatchMask::ONLYDIR,
                );
                let runners = inotify
                    .watches()
                    .add(root.join("runners"), WatchMask::CLOSE_WRITE | WatchMask::ONLYDIR);
                match (ready, runners) {
                    (Ok(r), Ok(w)) => {
                        index.ready_wd = Some(r);
                        index.runners_wd = Some(w);
                        index.inotify = Some(inotify);
                    }
                    (Err(e), _) | (_, Err(e)) => tracing::warn!(
                        queue = %root.display(),
                        "cannot watch the queue with inotify ({e}); new jobs are found by relisting ready/ every second instead (raise fs.inotify.max_user_watches to fix)"
                    ),
                }
            }
            Err(e) => tracing::warn!(
                queue = %root.display(),
                "cannot create an inotify instance ({e}); new jobs are found by relisting ready/ every second instead (raise fs.inotify.max_user_instances to fix)"
            ),
        }
        index
    }

    /// The descriptor to wait on for events, if inotify is in use.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.inotify.as_ref().map(|i| i.as_fd())
    }

    /// Applies every pending event without blocking.
    pub fn drain(&mut self) -> Drained {
        let mut found = Drained::default();
        if self.inotify.is_none() {
            if self.last_listing.is_none_or(|t| t.elapsed() >= FALLBACK_RESCAN) {
                self.stale = true;
                found.work = true;
                found.runner_exited = true;
            }
            return found;
        };
        let mut batch: Vec<(bool, bool, EventMask, Option<OsString>)> = Vec::new();
        loop {
            batch.clear();
            let inotify = self.inotify.as_mut().expect("checked above");
            match inotify.read_events(&mut self.buf) {
                Ok(events) => {
                    for e in events {
                        batch.push((
                            Some(&e.wd) == self.ready_wd.as_ref(),
                            Some(&e.wd) == self.runners_wd.as_ref(),
                            e.mask,
                            e.name.map(OsStr::to_os_string),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("reading inotify events failed ({e}); relisting ready/");
                    self.stale = true;
                    found.work = true;
                    break;
                }
            }
            for (is_ready, is_runners, mask, name) in batch.drain(..) {
                if mask.contains(EventMask::Q_OVERFLOW) {
                    self.stale = true;
                    found.work = true;
                    found.runner_exited = true;
                    continue;
                }
                if is_runners {
                    found.runner_exited = true;
                    continue;
                }
                if !is_ready {
                    continue;
                }
                if mask.contains(EventMask::IGNORED) {
                    // The ready/ directory itself went away: nothing will work until it is back.
                    self.stale = true;
                    found.work = true;
                    continue;
                }
                let Some(name) = name else { continue };
                if mask.contains(EventMask::CREATE) && !mask.contains(EventMask::ISDIR) {
                    // A regular file created in place is indexed when it is closed; anything
                    // else (a link, a FIFO…) never will be, so look at it now.
                    self.foreign.push((name, Kind::Vanished));
                    found.work = true;
                } else {
                    // MOVED_TO, CLOSE_WRITE, or a directory created in ready/.
                    let kind = if mask.contains(EventMask::ISDIR) {
                        Kind::Directory
                    } else {
                        Kind::File
                    };
                    self.insert(&name, kind);
                    found.work = true;
                }
            }
        }
        found
    }

    fn insert(&mut self, name: &OsStr, kind: Kind) {
        match (kind, QueuedName::parse(name.as_bytes())) {
            (Kind::File, Some(n)) => {
                let e = Entry::new(&n);
                self.future.insert((e.at, e));
            }
            _ => self.foreign.push((name.to_os_string(), kind)),
        }
    }

    /// Relists `ready/` if the index is stale.
    pub fn refresh(&mut self, fs: &dyn Fs, ready: &Dir) -> io::Result<()> {
        if !self.stale {
            return Ok(());
        }
        // Discard queued events first: the listing reflects everything that happened before it,
        // and events queued during it are applied afterwards (inserting and removing by name
        // is idempotent).
        if self.inotify.is_some() {
            let _ = self.drain();
        }
        // Inserted as read, never held as a whole listing (a million names would double the
        // memory the index itself needs). A listing that fails leaves the index stale, to be
        // listed again from scratch.
        self.due.clear();
        self.future.clear();
        self.foreign.clear();
        fs.list_each(ready, &mut |name, kind| self.insert(name, kind))?;
        self.stale = false;
        self.last_listing = Some(Instant::now());
        Ok(())
    }

    /// Entries that are not jobs, found since the last call, with what they looked like.
    pub fn take_foreign(&mut self, ready: &Dir) -> Vec<(OsString, Kind)> {
        let mut out = std::mem::take(&mut self.foreign);
        // Entries announced by IN_CREATE were pushed as `Vanished`: look at what they are now.
        for (name, kind) in &mut out {
            if *kind == Kind::Vanished {
                *kind = lstat_kind(ready, name);
            }
        }
        // A regular file announced by IN_CREATE is left to its IN_CLOSE_WRITE or rename.
        out.retain(|(name, kind)| {
            *kind != Kind::Vanished && !(*kind == Kind::File && QueuedName::parse(name.as_bytes()).is_some())
        });
        out
    }

    /// Takes the most urgent entry runnable at `now`.
    pub fn pop(&mut self, now: Millis) -> Option<Entry> {
        while let Some((at, _)) = self.future.first() {
            if *at > now {
                break;
            }
            let (_, e) = self.future.pop_first().expect("checked");
            self.due.insert(e);
        }
        self.due.pop_first()
    }

    /// Puts back an entry whose claim failed for a reason other than losing the race.
    pub fn put_back(&mut self, e: Entry) {
        self.future.insert((e.at, e));
    }

    /// The earliest run-at time of the scheduled entries.
    pub fn next_due(&self) -> Option<Millis> {
        self.future.first().map(|(at, _)| *at)
    }

    /// Whether the next [`Index::refresh`] lists `ready/`.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Marks the index for relisting (after an operator moved files, say).
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// Whether inotify is in use.
    pub fn is_watching(&self) -> bool {
        self.inotify.is_some()
    }

    /// Number of indexed entries.
    pub fn len(&self) -> usize {
        self.due.len() + self.future.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(idx: &Index) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(idx.fd().expect("inotify in use"), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
    }

    /// The watching thread woke for every claim, whose rename out of `ready/` is an event too.
    #[test]
    fn a_name_arriving_in_ready_is_an_event_and_one_leaving_is_not() {
        let d = tempfile::tempdir().unwrap();
        for sub in ["ready", "runners", "running"] {
            std::fs::create_dir(d.path().join(sub)).unwrap();
        }
        let mut idx = Index::new(d.path());
        assert!(!readable(&idx));
        std::fs::write(d.path().join("job"), b"").unwrap();
        std::fs::rename(d.path().join("job"), d.path().join("ready/job")).unwrap();
        assert!(readable(&idx), "a push (a rename into ready/) must wake the watcher");
        idx.drain();
        assert!(!readable(&idx));
        std::fs::rename(d.path().join("ready/job"), d.path().join("running/job")).unwrap();
        assert!(!readable(&idx), "a claim (a rename out of ready/) woke the watcher");
    }
}
