//! Group commit of concurrent pushes on one store handle: pushes that arrive while a directory
//! flush is running share the next one, and each still gets its own outcome. The groups here
//! are made deterministic by holding the first push's flush of `ready/` until the others are
//! queued behind it (`DirStore::queued_pushes`), never by timing.

mod common;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{FaultFs, names, queue};
use jobspool::store::dir::DirStore;
use jobspool::store::dir::fs::{Dir, Fs, Kind};
use jobspool::store::dir::name::QueuedName;
use jobspool::{Error, JobId, NewJob, Store};

const LEASE: Duration = Duration::from_secs(30);

/// A [`FaultFs`] whose first directory sync can be held until the test lets it go, or whose
/// directory syncs can all be made slow (a slow disk, so that pushes overlap).
#[derive(Default)]
struct GateFs {
    inner: FaultFs,
    armed: AtomicBool,
    /// (held, someone is waiting at the gate)
    gate: Mutex<(bool, bool)>,
    cv: Condvar,
    slow_dir: Option<Duration>,
}

impl GateFs {
    fn held(inner: FaultFs) -> GateFs {
        GateFs {
            inner,
            armed: AtomicBool::new(true),
            gate: Mutex::new((true, false)),
            ..Default::default()
        }
    }

    fn wait_until_someone_is_held(&self) {
        let mut g = self.gate.lock().unwrap();
        while !g.1 {
            g = self.cv.wait(g).unwrap();
        }
    }

    fn release(&self) {
        self.gate.lock().unwrap().0 = false;
        self.cv.notify_all();
    }

    fn count(&self, call: &str) -> usize {
        self.inner
            .calls()
            .iter()
            .filter(|c| c.as_str() == call || c.starts_with(&format!("{call} ")))
            .count()
    }
}

impl Fs for GateFs {
    fn create(&self, dir: &Dir, name: &OsStr, mode: u32) -> io::Result<File> {
        self.inner.create(dir, name, mode)
    }
    fn write(&self, file: &File, dir: &Dir, name: &OsStr, buf: &[u8]) -> io::Result<()> {
        self.inner.write(file, dir, name, buf)
    }
    fn fsync(&self, file: &File, dir: &Dir, name: &OsStr) -> io::Result<()> {
        self.inner.fsync(file, dir, name)
    }
    fn sync_dir(&self, dir: &Dir) -> io::Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let mut g = self.gate.lock().unwrap();
            g.1 = true;
            self.cv.notify_all();
            while g.0 {
                g = self.cv.wait(g).unwrap();
            }
        }
        if let Some(d) = self.slow_dir {
            std::thread::sleep(d);
        }
        self.inner.sync_dir(dir)
    }
    fn syncfs(&self, dir: &Dir) -> io::Result<()> {
        self.inner.syncfs(dir)
    }
    fn rename(&self, from: &Dir, name: &OsStr, to: &Dir, new: &OsStr, noreplace: bool) -> io::Result<()> {
        self.inner.rename(from, name, to, new, noreplace)
    }
    fn unlink(&self, dir: &Dir, name: &OsStr, is_dir: bool) -> io::Result<()> {
        self.inner.unlink(dir, name, is_dir)
    }
    fn touch(&self, dir: &Dir, name: &OsStr) -> io::Result<()> {
        self.inner.touch(dir, name)
    }
    fn open_read(&self, dir: &Dir, name: &OsStr) -> io::Result<File> {
        self.inner.open_read(dir, name)
    }
    fn open_append(&self, dir: &Dir, name: &OsStr, mode: u32, fresh: bool) -> io::Result<(File, bool)> {
        self.inner.open_append(dir, name, mode, fresh)
    }
    fn list(&self, dir: &Dir) -> io::Result<Vec<(OsString, Kind)>> {
        self.inner.list(dir)
    }
}

/// Polls `cond` until it holds; a guard against a hang, not a measurement.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "never happened: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Pushes `first` and, while its flush of `ready/` is held, `rest` from threads of their own;
/// lets the flush go once `queued` of them wait behind it, so that those are flushed together
/// as one group after `first`. Returns the outcomes, `first`'s first.
fn push_a_group(
    fs: &Arc<GateFs>,
    store: &Arc<DirStore>,
    first: NewJob,
    rest: Vec<NewJob>,
    queued: usize,
) -> Vec<Result<JobId, Error>> {
    let a = {
        let store = Arc::clone(store);
        std::thread::spawn(move || store.push(&first))
    };
    fs.wait_until_someone_is_held();
    let others: Vec<_> = rest
        .into_iter()
        .map(|job| {
            let store = Arc::clone(store);
            std::thread::spawn(move || store.push(&job))
        })
        .collect();
    eventually("the other pushes queued behind the held flush", || {
        store.queued_pushes() == queued
    });
    fs.release();
    let mut out = vec![a.join().unwrap()];
    out.extend(others.into_iter().map(|h| h.join().unwrap()));
    out
}

fn with_id(id: &str) -> NewJob {
    NewJob::new(id.as_bytes().to_vec()).id(JobId::new(id).unwrap())
}

/// [`assert_nothing_left_but`] the pushes of `out` that succeeded.
/// The error of the one push of `out` that failed.
fn the_one_failure(out: &[jobspool::Result<JobId>]) -> &jobspool::Error {
    let failed: Vec<&jobspool::Error> = out.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "{out:?}");
    failed[0]
}

fn assert_only_successes_left(q: &Path, out: &[jobspool::Result<JobId>]) {
    let ok: Vec<String> = out
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|id| id.to_string()))
        .collect();
    let ok: Vec<&str> = ok.iter().map(String::as_str).collect();
    assert_nothing_left_but(q, &ok);
}

fn assert_nothing_left_but(q: &Path, ids: &[&str]) {
    let ready = names(q, "ready");
    assert_eq!(ready.len(), ids.len(), "ready/: {ready:?}");
    for id in ids {
        assert!(
            ready.iter().any(|n| n.ends_with(&format!(".{id}"))),
            "{id} not in ready/: {ready:?}"
        );
    }
    assert!(names(q, "tmp").is_empty(), "tmp/: {:?}", names(q, "tmp"));
    let mut logs = names(q, "logs");
    logs.sort();
    let mut want: Vec<String> = ids.iter().map(|id| format!("{id}.events")).collect();
    want.sort();
    assert_eq!(logs, want, "logs/ (id reservations) of the failed pushes must be gone");
}

#[test]
fn concurrent_pushes_get_distinct_ids_and_every_job_is_claimable() {
    let (_d, q) = queue();
    let store = Arc::new(DirStore::open(&q, false).unwrap());
    let threads = 8;
    let per = 50;
    let pushed: Vec<Vec<JobId>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let store = Arc::clone(&store);
                s.spawn(move || {
                    (0..per)
                        .map(|i| {
                            // Every other job with an id of the caller's, the rest generated.
                            let job = if i % 2 == 0 {
                                with_id(&format!("t{t}-{i}"))
                            } else {
                                NewJob::new(format!("{t}/{i}"))
                            };
                            store.push(&job).unwrap()
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<JobId> = pushed.into_iter().flatten().collect();
    let unique: HashSet<JobId> = all.iter().cloned().collect();
    assert_eq!(all.len(), threads * per);
    assert_eq!(unique.len(), all.len(), "two pushes returned the same id");
    assert!(names(&q, "tmp").is_empty());
    // A fresh handle (as a runner would open) claims every one of them, each once.
    let runner = DirStore::open(&q, false).unwrap();
    let mut claimed = HashSet::new();
    while let Some(c) = runner.claim(LEASE).unwrap() {
        assert!(claimed.insert(c.job.id.clone()), "claimed twice: {}", c.job.id);
        runner.ack(&c.lease).unwrap();
    }
    assert_eq!(claimed, unique);
}

#[test]
fn concurrent_pushes_share_directory_fsyncs() {
    let (_d, q) = queue();
    // A disk whose directory flush takes a millisecond, so that pushes overlap whatever the
    // machine; nothing here is timed.
    let fs = Arc::new(GateFs {
        slow_dir: Some(Duration::from_millis(1)),
        ..Default::default()
    });
    let store = Arc::new(DirStore::open_with(&q, false, fs.clone()).unwrap());
    let (threads, per) = (8, 100);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let store = Arc::clone(&store);
            s.spawn(move || {
                for _ in 0..per {
                    store.push(&NewJob::new("x")).unwrap();
                }
            });
        }
    });
    let (dir_syncs, fsyncs, renames) = (fs.count("sync_dir ready"), fs.count("fsync"), fs.count("rename"));
    println!(
        "{} pushes: {dir_syncs} fsyncs of ready/, {fsyncs} file fsyncs",
        threads * per
    );
    assert_eq!(names(&q, "ready").len(), threads * per);
    assert_eq!((fsyncs, renames), (threads * per, threads * per));
    assert!(
        dir_syncs < threads * per,
        "no group commit: {dir_syncs} fsyncs of ready/"
    );
    assert_eq!(fs.count("syncfs"), 0);
}

#[test]
fn a_push_alone_makes_the_calls_it_always_made() {
    let (_d, q) = queue();
    let fs = Arc::new(GateFs::default());
    let store = DirStore::open_with(&q, false, fs.clone()).unwrap();
    for _ in 0..3 {
        store.push(&NewJob::new("x")).unwrap();
    }
    let kinds: Vec<String> = fs
        .inner
        .calls()
        .iter()
        .map(|c| c.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["create", "write", "fsync", "rename", "sync_dir"].repeat(3));
}

fn ops(fs: &GateFs) -> Vec<String> {
    fs.inner
        .calls()
        .iter()
        .map(|c| c.split(' ').next().unwrap().to_string())
        .collect()
}

#[test]
fn a_group_shares_one_directory_flush_and_is_durable_before_it_is_visible() {
    let (_d, q) = queue();
    let fs = Arc::new(GateFs::held(FaultFs::default()));
    let store = Arc::new(DirStore::open_with(&q, false, fs.clone()).unwrap());
    let rest = (1..=4).map(|i| with_id(&format!("g{i}"))).collect();
    let out = push_a_group(&fs, &store, with_id("a"), rest, 4);
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
    let ops = ops(&fs);
    // The first push alone, then the four as one group: four renames, one fsync of ready/.
    let visible: Vec<&str> = ops
        .iter()
        .map(String::as_str)
        .filter(|o| *o == "rename" || *o == "sync_dir")
        .collect();
    assert_eq!(
        visible,
        ["rename", "sync_dir", "rename", "rename", "rename", "rename", "sync_dir"],
        "{ops:?}"
    );
    // Every file was fsynced (by its own pusher) before the group's first rename.
    let fsyncs: Vec<usize> = (0..ops.len()).filter(|&i| ops[i] == "fsync").collect();
    let renames: Vec<usize> = (0..ops.len()).filter(|&i| ops[i] == "rename").collect();
    assert_eq!(fsyncs.len(), 5);
    assert!(fsyncs.iter().all(|&f| f < renames[1]), "{ops:?}");
    assert_nothing_left_but(&q, &["a", "g1", "g2", "g3", "g4"]);
}

#[test]
fn a_failed_directory_flush_fails_every_push_of_its_group_and_leaves_none_visible() {
    let (_d, q) = queue();
    // The second fsync of ready/ is the group's (the first push alone made the first).
    let fs = Arc::new(GateFs::held(FaultFs::failing("sync_dir", 2, nix::libc::EIO)));
    let store = Arc::new(DirStore::open_with(&q, false, fs.clone()).unwrap());
    let rest = (1..=4).map(|i| with_id(&format!("g{i}"))).collect();
    let out = push_a_group(&fs, &store, with_id("a"), rest, 4);
    assert!(out[0].is_ok(), "the push flushed before the failure stands: {out:?}");
    for r in &out[1..] {
        let e = r.as_ref().unwrap_err();
        assert!(
            matches!(e, Error::Io { .. }) && e.to_string().contains("the job was not added"),
            "{e}"
        );
    }
    assert_nothing_left_but(&q, &["a"]);
    // Nothing sticks: the ids are free again and the next pushes work.
    for i in 1..=4 {
        store.push(&with_id(&format!("g{i}"))).unwrap();
    }
    assert_eq!(names(&q, "ready").len(), 5);
}

#[test]
fn a_failed_file_fsync_fails_only_that_push_and_the_rest_still_group() {
    let (_d, q) = queue();
    // fsync 1 is the first push's; 2..=5 are the others', each on its own thread: fail one.
    let fs = Arc::new(GateFs::held(FaultFs::failing("fsync", 3, nix::libc::EIO)));
    let store = Arc::new(DirStore::open_with(&q, false, fs.clone()).unwrap());
    let rest = (1..=4).map(|i| with_id(&format!("g{i}"))).collect();
    // The failed push never queues: three wait behind the held flush.
    let out = push_a_group(&fs, &store, with_id("a"), rest, 3);
    let e = the_one_failure(&out);
    assert!(e.to_string().contains("syncing the job file"), "{e}");
    assert_only_successes_left(&q, &out);
    assert_eq!(fs.count("sync_dir"), 2, "the three others shared one directory flush");
}

#[test]
fn a_failed_rename_in_a_group_fails_only_that_push() {
    let (_d, q) = queue();
    // Rename 1 is the first push's; 2..=5 are the group's: fail its second.
    let fs = Arc::new(GateFs::held(FaultFs::failing("rename", 3, nix::libc::EACCES)));
    let store = Arc::new(DirStore::open_with(&q, false, fs.clone()).unwrap());
    let rest = (1..=4).map(|i| with_id(&format!("g{i}"))).collect();
    let out = push_a_group(&fs, &store, with_id("a"), rest, 4);
    let e = the_one_failure(&out);
    assert!(e.to_string().contains("moving the job into ready/"), "{e}");
    assert_only_successes_left(&q, &out);
    // One directory flush for the group's three renames that worked.
    assert_eq!(fs.count("sync_dir"), 2);
}

#[test]
fn a_taken_name_in_a_group_is_job_exists_for_that_push_only() {
    let (_d, q) = queue();
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let taken = QueuedName {
        priority: 0,
        at: 1_700_000_000_000,
        attempts: 0,
        id: JobId::new("g2").unwrap(),
    }
    .format();
    // Someone else's file already holds the name g2's push would take in ready/ (its id
    // reservation in logs/ is free, so only the rename can notice).
    std::fs::write(q.join("ready").join(&taken), b"not ours").unwrap();
    let fs = Arc::new(GateFs::held(FaultFs::default()));
    let store = Arc::new(DirStore::open_with(&q, false, fs.clone()).unwrap());
    let rest = (1..=4).map(|i| with_id(&format!("g{i}")).run_at(at)).collect();
    let out = push_a_group(&fs, &store, with_id("a"), rest, 4);
    for (i, r) in out.iter().enumerate() {
        if i == 2 {
            assert!(matches!(r, Err(Error::JobExists { id, .. }) if id == "g2"), "{r:?}");
        } else {
            assert!(r.is_ok(), "push {i}: {r:?}");
        }
    }
    assert_eq!(
        std::fs::read(q.join("ready").join(&taken)).unwrap(),
        b"not ours",
        "the other file is untouched"
    );
    std::fs::remove_file(q.join("ready").join(&taken)).unwrap();
    assert_nothing_left_but(&q, &["a", "g1", "g3", "g4"]);
    assert_eq!(fs.count("sync_dir"), 2);
}
