//! The directory store's own guarantees: the durability protocol (observed and faulted through
//! the file-system seam), claim exclusivity between many claimers, fencing of stale holders,
//! quarantine of everything that is not a valid job, and id uniqueness.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{FaultFs, names, queue};
use jobspool::store::dir::DirStore;
use jobspool::{Claim, Error, JobId, NewJob, State, Store};

const LEASE: Duration = Duration::from_secs(30);

fn faulty(q: &Path, fs: FaultFs) -> (Arc<FaultFs>, DirStore) {
    let fs = Arc::new(fs);
    let store = DirStore::open_with(q, false, fs.clone()).unwrap();
    (fs, store)
}

#[test]
fn push_writes_syncs_renames_then_syncs_the_directory() {
    let (_d, q) = queue();
    let (fs, store) = faulty(&q, FaultFs::default());
    let id = store.push(&NewJob::new("x")).unwrap();
    let calls = fs.calls();
    let kinds: Vec<&str> = calls.iter().map(|c| c.split(' ').next().unwrap()).collect();
    assert_eq!(kinds, ["create", "write", "fsync", "rename", "sync_dir"], "{calls:?}");
    assert!(calls[0].starts_with("create tmp/"), "{calls:?}");
    assert!(calls[2].starts_with("fsync tmp/"), "{calls:?}");
    assert!(
        calls[3].contains("-> ready/0999.") && calls[3].ends_with(id.as_str()),
        "{calls:?}"
    );
    assert_eq!(calls[4], "sync_dir ready");
}

#[test]
fn a_caller_id_is_reserved_before_anything_else_is_written() {
    let (_d, q) = queue();
    let (fs, store) = faulty(&q, FaultFs::default());
    store
        .push(&NewJob::new("x").id(JobId::new("order-1").unwrap()))
        .unwrap();
    assert_eq!(fs.calls()[0], "create logs/order-1.events");
}

fn assert_nothing_left(q: &Path) {
    assert!(names(q, "ready").is_empty(), "ready/: {:?}", names(q, "ready"));
    assert!(names(q, "tmp").is_empty(), "tmp/: {:?}", names(q, "tmp"));
    assert!(names(q, "logs").is_empty(), "logs/: {:?}", names(q, "logs"));
}

#[test]
fn a_failed_fsync_fails_the_push_and_leaves_nothing() {
    let (_d, q) = queue();
    let (_fs, store) = faulty(&q, FaultFs::failing("fsync", 1, nix::libc::EIO));
    let err = store.push(&NewJob::new("x").id(JobId::new("j1").unwrap())).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("syncing the job file"), "{err}");
    assert_nothing_left(&q);
    // The fsync error is not retried into a success, but the next push works.
    store.push(&NewJob::new("y").id(JobId::new("j1").unwrap())).unwrap();
    assert_eq!(names(&q, "ready").len(), 1);
}

#[test]
fn enospc_while_writing_fails_the_push_and_leaves_nothing() {
    let (_d, q) = queue();
    let (_fs, store) = faulty(&q, FaultFs::failing("write", 1, nix::libc::ENOSPC));
    let err = store.push(&NewJob::new("x")).unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_nothing_left(&q);
}

#[test]
fn a_failed_directory_sync_takes_the_job_back() {
    let (_d, q) = queue();
    let (_fs, store) = faulty(&q, FaultFs::failing("sync_dir", 1, nix::libc::EIO));
    let err = store.push(&NewJob::new("x").id(JobId::new("j2").unwrap())).unwrap_err();
    assert!(err.to_string().contains("the job was not added"), "{err}");
    assert_nothing_left(&q);
}

#[test]
fn a_failed_rename_leaves_nothing() {
    let (_d, q) = queue();
    let (_fs, store) = faulty(&q, FaultFs::failing("rename", 1, nix::libc::EACCES));
    assert!(store.push(&NewJob::new("x")).is_err());
    assert_nothing_left(&q);
}

#[test]
fn a_batch_flushes_once_before_any_job_is_visible_and_syncs_ready_once() {
    let (_d, q) = queue();
    let (fs, store) = faulty(&q, FaultFs::default());
    let jobs: Vec<NewJob> = (0..50).map(|i| NewJob::new(format!("{i}"))).collect();
    let ids = store.push_batch(&jobs).unwrap();
    assert_eq!(ids.len(), 50);
    let calls = fs.calls();
    let count = |op: &str| calls.iter().filter(|c| c.split(' ').next() == Some(op)).count();
    assert_eq!((count("create"), count("write"), count("fsync")), (50, 50, 0));
    assert_eq!((count("syncfs"), count("rename"), count("sync_dir")), (1, 50, 1));
    let syncfs_at = calls.iter().position(|c| c == "syncfs tmp").unwrap();
    let first_rename = calls.iter().position(|c| c.starts_with("rename")).unwrap();
    assert!(
        syncfs_at < first_rename,
        "bodies must be durable before they are visible"
    );
    assert_eq!(calls.last().unwrap(), "sync_dir ready");
    assert_eq!(names(&q, "ready").len(), 50);
}

#[test]
fn a_failed_batch_adds_nothing() {
    for (op, nth) in [("write", 7), ("syncfs", 1), ("rename", 9), ("sync_dir", 1)] {
        let (_d, q) = queue();
        let (_fs, store) = faulty(&q, FaultFs::failing(op, nth, nix::libc::EIO));
        let jobs: Vec<NewJob> = (0..20)
            .map(|i| NewJob::new(format!("{i}")).id(JobId::new(format!("b{i}")).unwrap()))
            .collect();
        assert!(store.push_batch(&jobs).is_err(), "{op}");
        assert_nothing_left(&q);
    }
}

#[test]
fn duplicate_ids_are_refused_until_the_job_is_removed() {
    let (_d, q) = queue();
    let store = DirStore::open(&q, false).unwrap();
    let id = JobId::new("mail-7").unwrap();
    store.push(&NewJob::new("a").id(id.clone())).unwrap();
    let err = store.push(&NewJob::new("b").id(id.clone())).unwrap_err();
    assert!(matches!(err, Error::JobExists { .. }), "{err}");
    // Still refused while it runs, and while it is dead.
    let claim = store.claim(LEASE).unwrap().unwrap();
    assert!(matches!(
        store.push(&NewJob::new("b").id(id.clone())),
        Err(Error::JobExists { .. })
    ));
    store.bury(&claim.lease, "test").unwrap();
    assert!(matches!(
        store.push(&NewJob::new("b").id(id.clone())),
        Err(Error::JobExists { .. })
    ));
    assert_eq!(store.remove("mail-7").unwrap(), Some(State::Dead));
    store.push(&NewJob::new("c").id(id)).unwrap();
    let batch = [
        NewJob::new("x").id(JobId::new("d").unwrap()),
        NewJob::new("y").id(JobId::new("d").unwrap()),
    ];
    assert!(store.push_batch(&batch).is_err());
}

#[test]
fn claims_are_exclusive_between_many_threads_and_store_instances() {
    let (_d, q) = queue();
    let n = 2000;
    let producer = DirStore::open(&q, false).unwrap();
    let jobs: Vec<NewJob> = (0..n).map(|i| NewJob::new(format!("{i}"))).collect();
    let pushed: HashSet<JobId> = producer.push_batch(&jobs).unwrap().into_iter().collect();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let q = q.clone();
            std::thread::spawn(move || {
                // Half the threads share a store instance with another thread.
                let store = Arc::new(DirStore::open(&q, false).unwrap());
                let mut got = Vec::new();
                while let Some(c) = store.claim(LEASE).unwrap() {
                    got.push(c.job.id.clone());
                    if t % 2 == 0 {
                        store.ack(&c.lease).unwrap();
                    } else {
                        // Acks of a retried claim must fail: the name moved.
                        store.ack(&c.lease).unwrap();
                        assert!(store.ack(&c.lease).unwrap_err().is_lease_lost());
                    }
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().unwrap());
    }
    let unique: HashSet<JobId> = all.iter().cloned().collect();
    assert_eq!(all.len(), n, "a job was claimed twice or lost");
    assert_eq!(unique, pushed);
    assert!(names(&q, "ready").is_empty() && names(&q, "running").is_empty());
}

/// Two handles on `q`: `a` claimed a job under a 50 ms lease, which expired, and `b` took the
/// claim back; `a`'s stale claim is returned with both.
fn stolen_claim(q: &Path) -> (DirStore, DirStore, Claim) {
    let a = DirStore::open(q, false).unwrap();
    let b = DirStore::open(q, false).unwrap();
    a.push(&NewJob::new("x").max_attempts(5)).unwrap();
    let stale = a.claim(Duration::from_millis(50)).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(120));
    let reclaimed = b.reclaim(5).unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].attempts, 1);
    (a, b, stale)
}

#[test]
fn a_stale_holder_can_neither_ack_nor_extend_nor_retry_nor_bury_nor_release() {
    let (_d, q) = queue();
    let (a, b, stale) = stolen_claim(&q);
    let fresh = b.claim(LEASE).unwrap().unwrap();
    assert_eq!(fresh.lease.attempt, 2);
    assert_ne!(fresh.lease.token, stale.lease.token);
    let running_before = names(&q, "running");
    for (what, r) in [
        ("heartbeat", a.heartbeat(&stale.lease)),
        ("ack", a.ack(&stale.lease)),
        ("retry", a.retry(&stale.lease, Duration::ZERO)),
        ("bury", a.bury(&stale.lease, "stale")),
        ("release", a.release(&stale.lease)),
    ] {
        assert!(
            matches!(r, Err(Error::LeaseLost { .. })),
            "stale {what} was not refused: {r:?}"
        );
    }
    assert_eq!(
        names(&q, "running"),
        running_before,
        "a stale call touched the new claim"
    );
    assert!(names(&q, "ready").is_empty() && names(&q, "dead").is_empty());
    b.heartbeat(&fresh.lease).unwrap();
    b.ack(&fresh.lease).unwrap();
    assert!(names(&q, "running").is_empty());
}

#[test]
fn the_claims_of_a_dead_claimer_are_reclaimed_at_once_and_counted() {
    let (_d, q) = queue();
    let survivor = DirStore::open(&q, false).unwrap();
    survivor.push(&NewJob::new("x").max_attempts(2)).unwrap();
    {
        let doomed = DirStore::open(&q, false).unwrap();
        let _claim = doomed.claim(LEASE).unwrap().unwrap();
        // Dropping the store releases its lock, as the death of its process would.
    }
    let r = survivor.reclaim(5).unwrap();
    assert_eq!(r.len(), 1, "the lease was long but the owner is gone");
    assert_eq!(r[0].cause, jobspool::store::ReclaimCause::RunnerDied);
    assert!(!r[0].buried);
    {
        let doomed = DirStore::open(&q, false).unwrap();
        let _claim = doomed.claim(LEASE).unwrap().unwrap();
    }
    // The second death exhausts max-attempts 2: the job is dead, not looping.
    let r = survivor.reclaim(5).unwrap();
    assert!(r[0].buried);
    let dead = survivor.list(&[State::Dead], false).unwrap();
    assert_eq!(dead.len(), 1);
    let detail = survivor.get(&dead[0].id).unwrap();
    assert!(
        detail.dead_reason().unwrap().contains("runner died"),
        "{:?}",
        detail.dead_reason()
    );
    // A live but slow claimer keeps its claim while its lease runs.
    survivor.push(&NewJob::new("slow")).unwrap();
    let live = DirStore::open(&q, false).unwrap();
    let _held = live.claim(LEASE).unwrap().unwrap();
    assert!(survivor.reclaim(5).unwrap().is_empty());
}

#[test]
fn everything_that_is_not_a_valid_job_is_quarantined_with_its_reason() {
    let (_d, q) = queue();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let ready = q.join("ready");
    let mut expected = Vec::new();
    for entry in std::fs::read_dir(corpus.join("bad")).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let name = format!("0999.1732350000123.0.{stem}");
        std::fs::copy(&path, ready.join(&name)).unwrap();
        let reason = if stem == "zero-block" {
            "bad-magic".to_string()
        } else {
            stem
        };
        expected.push((reason, name));
    }
    std::fs::copy(corpus.join("good.job"), ready.join("0999.1732350000123.0.good")).unwrap();
    std::os::unix::fs::symlink(corpus.join("good.job"), ready.join("0999.1732350000123.0.link")).unwrap();
    nix::unistd::mkfifo(
        &ready.join("0999.1732350000123.0.fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    std::fs::create_dir(ready.join("0999.1732350000123.0.dir")).unwrap();
    std::fs::write(ready.join("not-a-job.txt"), "hello").unwrap();
    std::fs::write(ready.join(".hidden"), "hello").unwrap();
    let outside = q.parent().unwrap().join("outside.job");
    std::fs::copy(corpus.join("good.job"), &outside).unwrap();
    std::fs::hard_link(&outside, ready.join("0999.1732350000123.0.hardlinked")).ok();
    expected.extend([
        ("symlink".to_string(), "0999.1732350000123.0.link".to_string()),
        ("fifo".into(), "0999.1732350000123.0.fifo".into()),
        ("directory".into(), "0999.1732350000123.0.dir".into()),
        ("bad-name".into(), "not-a-job.txt".into()),
        ("bad-name".into(), ".hidden".into()),
        ("hard-linked".into(), "0999.1732350000123.0.hardlinked".into()),
    ]);

    let store = DirStore::open(&q, false).unwrap();
    let claim = store.claim(LEASE).unwrap().expect("the one good job is claimed");
    assert_eq!(claim.job.id.as_str(), "good");
    assert_eq!(claim.job.payload, b"hello world");
    assert!(store.claim(LEASE).unwrap().is_none());
    let quarantined = names(&q, "quarantine");
    assert_eq!(quarantined.len(), expected.len(), "{quarantined:#?}");
    for (reason, name) in &expected {
        // Entries that were claimed before their body was read are named after their claim,
        // which ends with the job id.
        let id = name.splitn(4, '.').nth(3).unwrap_or(name);
        let hit = quarantined.iter().any(|n| {
            n.contains(&format!(".{reason}.")) && (n.ends_with(name.as_str()) || n.ends_with(&format!(".{id}")))
        });
        assert!(hit, "{name} not quarantined as {reason}: {quarantined:#?}");
    }
    // Never followed, never deleted: the link target and the outside file are untouched.
    assert_eq!(
        std::fs::read(corpus.join("good.job")).unwrap().len(),
        std::fs::read(&outside).unwrap().len()
    );
    assert!(names(&q, "ready").is_empty());
    let listed = store.list(&[State::Quarantined], false).unwrap();
    assert_eq!(listed.len(), expected.len());
    assert!(listed.iter().all(|i| i.reason.is_some()));
}

#[test]
fn operators_may_move_and_remove_files_by_hand() {
    let (_d, q) = queue();
    let store = DirStore::open(&q, false).unwrap();
    store.push(&NewJob::new("a").id(JobId::new("a").unwrap())).unwrap();
    store.push(&NewJob::new("b").id(JobId::new("b").unwrap())).unwrap();
    let claim = store.claim(LEASE).unwrap().unwrap();
    // `rm running/*`: the holder's ack and heartbeat are refused, nothing panics.
    for n in names(&q, "running") {
        std::fs::remove_file(q.join("running").join(n)).unwrap();
    }
    assert!(store.heartbeat(&claim.lease).unwrap_err().is_lease_lost());
    assert!(store.ack(&claim.lease).unwrap_err().is_lease_lost());
    // `mv ready/* dead/` then `mv dead/* ready/`: the index follows.
    for n in names(&q, "ready") {
        std::fs::rename(q.join("ready").join(&n), q.join("dead").join(&n)).unwrap();
    }
    assert!(store.claim(LEASE).unwrap().is_none());
    for n in names(&q, "dead") {
        std::fs::rename(q.join("dead").join(&n), q.join("ready").join(&n)).unwrap();
    }
    let again = store.claim(LEASE).unwrap().expect("moved back by hand");
    assert_eq!(again.job.id.as_str(), "b");
}

#[test]
fn idle_sees_every_job_in_one_observation() {
    let (_d, q) = queue();
    let store = DirStore::open(&q, false).unwrap();
    assert!(store.idle().unwrap().is_idle());
    store
        .push(&NewJob::new("later").delay(Duration::from_secs(3600)))
        .unwrap();
    let idle = store.idle().unwrap();
    assert_eq!((idle.ready, idle.scheduled, idle.running), (0, 1, 0));
    store.push(&NewJob::new("now")).unwrap();
    let c = store.claim(LEASE).unwrap().unwrap();
    let idle = store.idle().unwrap();
    assert_eq!((idle.ready, idle.scheduled, idle.running), (0, 1, 1));
    store.ack(&c.lease).unwrap();
}

#[test]
fn a_queue_on_a_layout_that_breaks_sharing_is_reported() {
    let (_d, q) = queue();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(q.join("ready"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let store = DirStore::open(&q, false).unwrap();
    let problems = store.doctor().unwrap();
    assert!(
        problems.iter().any(|p| p.contains("sticky") && p.contains("chmod -t")),
        "{problems:#?}"
    );
    assert!(problems.iter().any(|p| p.contains("world-writable")), "{problems:#?}");
    jobspool::store::dir::init(&q, &Default::default()).unwrap();
    assert!(store.doctor().unwrap().is_empty(), "init repairs the modes");
}

#[test]
fn folders_on_another_file_system_are_refused_at_open() {
    // A bind mount is not available to every test runner; a missing folder is, and is refused
    // with the repair command.
    let (_d, q) = queue();
    std::fs::remove_dir(q.join("dead")).unwrap();
    let err = DirStore::open(&q, false).unwrap_err();
    assert!(err.to_string().contains("jobspool init"), "{err}");
}

fn age_file(path: &Path, secs: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = nix::sys::time::TimeSpec::new(now - secs, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

#[test]
fn garbage_collection_keeps_the_logs_of_live_jobs_and_reaps_crashed_pushes() {
    let (_d, q) = queue();
    let cfg = std::fs::read_to_string(q.join("jobspool.toml"))
        .unwrap()
        .replace("log_retention = \"7days\"", "log_retention = \"1s\"");
    std::fs::write(q.join("jobspool.toml"), cfg).unwrap();
    let store = DirStore::open(&q, false).unwrap();
    assert_eq!(store.config().log_retention, Duration::from_secs(1));
    // A job waiting to retry and a dead one keep their (old) logs; a finished one loses its log.
    for id in ["waiting", "dead", "finished"] {
        store.push(&NewJob::new("x").id(JobId::new(id).unwrap())).unwrap();
    }
    for _ in 0..3 {
        let c = store.claim(LEASE).unwrap().unwrap();
        store.open_log(&c.lease.id).unwrap().append(b"output\n").unwrap();
        match c.job.id.as_str() {
            "waiting" => store.retry(&c.lease, Duration::from_secs(3600)).unwrap(),
            "dead" => store.bury(&c.lease, "test").unwrap(),
            _ => store.ack(&c.lease).unwrap(),
        }
    }
    for f in names(&q, "logs") {
        age_file(&q.join("logs").join(f), 60);
    }
    // A push that crashed long ago, and one in progress now.
    std::fs::write(q.join("tmp/crashed.123.abcd"), "partial").unwrap();
    age_file(&q.join("tmp/crashed.123.abcd"), 7200);
    std::fs::write(q.join("tmp/inflight.456.ef01"), "partial").unwrap();
    std::fs::write(q.join("dead/stray.txt"), "not a job").unwrap();
    let removed = store.collect_garbage().unwrap();
    assert!(
        names(&q, "quarantine")[0].ends_with(".bad-name.dead.stray.txt"),
        "{:?}",
        names(&q, "quarantine")
    );
    assert_eq!(removed, 3, "the finished job's log and history, and the crashed push");
    assert_eq!(names(&q, "tmp"), ["inflight.456.ef01"]);
    let logs = names(&q, "logs");
    assert_eq!(logs, ["dead.events", "dead.log", "waiting.events", "waiting.log"]);
}

#[test]
fn a_done_jobs_id_stays_reserved_until_rm_frees_it() {
    let (_d, q) = queue();
    let store = DirStore::open(&q, false).unwrap();
    let id = JobId::new("ok").unwrap();
    store.push(&NewJob::new("a").id(id.clone())).unwrap();
    let claim = store.claim(LEASE).unwrap().unwrap();
    store
        .record(
            &id,
            &jobspool::store::Event::now(jobspool::store::EventKind::Done, 1, None),
        )
        .unwrap();
    store.ack(&claim.lease).unwrap();
    // Re-pushing a finished idempotency key is refused, with the way out.
    let err = store.push(&NewJob::new("b").id(id.clone())).unwrap_err();
    assert!(matches!(err, Error::Finished { .. }), "{err}");
    assert!(err.to_string().contains("jobspool rm"), "{err}");
    assert!(matches!(store.get("ok"), Err(Error::NotFound { .. })));
    let history = store.finished(&id).unwrap().expect("a finished job's history is kept");
    assert!(history.iter().any(|e| e.kind == jobspool::store::EventKind::Done));
    // rm removes the leftovers (None: no job was in the queue) and frees the id.
    assert_eq!(store.remove("ok").unwrap(), None);
    assert!(store.finished(&id).unwrap().is_none());
    assert!(matches!(store.remove("ok"), Err(Error::NotFound { .. })));
    store.push(&NewJob::new("c").id(id)).unwrap();
    assert_eq!(store.remove("ok").unwrap(), Some(State::Ready));
}

#[test]
fn pushes_beyond_what_a_job_name_can_hold_are_refused() {
    let (_d, q) = queue();
    let store = DirStore::open(&q, false).unwrap();
    let year = Duration::from_secs(31_557_600);
    for job in [
        NewJob::new("x").delay(300 * year),
        NewJob::new("x").delay(1_000_000_000 * year),
        NewJob::new("x").timeout(1_000_000_000 * year),
    ] {
        assert!(matches!(store.push(&job), Err(Error::Invalid(_))), "{job:?}");
        assert!(matches!(store.push_batch(&[job]), Err(Error::Invalid(_))));
    }
    assert!(names(&q, "ready").is_empty() && names(&q, "tmp").is_empty());
}

#[test]
fn a_claim_under_a_lease_no_name_can_hold_is_refused_and_the_job_stays() {
    let (_d, q) = queue();
    let store = DirStore::open(&q, false).unwrap();
    store.push(&NewJob::new("x")).unwrap();
    let forever = Duration::from_secs(1_000_000_000 * 31_557_600);
    for lease in [forever, Duration::ZERO, Duration::MAX] {
        assert!(matches!(store.claim(lease), Err(Error::Invalid(_))), "{lease:?}");
    }
    assert_eq!(names(&q, "ready").len(), 1);
    assert!(names(&q, "running").is_empty() && names(&q, "quarantine").is_empty());
    let claim = store.claim(jobspool::job::MAX_DURATION).unwrap().unwrap();
    assert_eq!(
        store.stats().unwrap().running,
        1,
        "the longest lease makes a valid claim"
    );
    store.ack(&claim.lease).unwrap();
}

/// Found by the torture suite (io-errors: EDQUOT on the open of a just-claimed job): a transient
/// error while reading a claimed job quarantined a valid job, which then never ran.
#[test]
fn a_transient_read_error_on_a_claimed_job_gives_it_back_instead_of_quarantining_it() {
    for errno in [nix::libc::EIO, nix::libc::EDQUOT, nix::libc::EMFILE] {
        let (_d, q) = queue();
        let plain = DirStore::open(&q, false).unwrap();
        let id = plain.push(&NewJob::new("x")).unwrap();
        let (_fs, store) = faulty(&q, FaultFs::failing("open_read", 1, errno));
        let err = store.claim(LEASE).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(names(&q, "quarantine").is_empty(), "{:?}", names(&q, "quarantine"));
        assert!(names(&q, "running").is_empty(), "the claim is given back");
        let claim = store.claim(LEASE).unwrap().expect("the job is still claimable");
        assert_eq!(claim.lease.id, id);
        assert_eq!(claim.lease.attempt, 1, "a failed read is not an attempt");
        store.ack(&claim.lease).unwrap();
    }
}

/// Found with the one above: the same error while reclaiming must leave the claim for a later
/// pass, not quarantine it.
#[test]
fn a_transient_read_error_while_reclaiming_leaves_the_claim_for_later() {
    let (_d, q) = queue();
    let plain = DirStore::open(&q, false).unwrap();
    plain.push(&NewJob::new("x")).unwrap();
    {
        let doomed = DirStore::open(&q, false).unwrap();
        let _claim = doomed.claim(LEASE).unwrap().unwrap();
    }
    // Reads: the dead claimer's runners/ entry (its lock), then the claimed body; fail the body.
    let (fs, store) = faulty(&q, FaultFs::failing("open_read", 2, nix::libc::EIO));
    assert!(store.reclaim(5).unwrap().is_empty());
    let reads: Vec<String> = fs.calls().into_iter().filter(|c| c.starts_with("open_read")).collect();
    assert!(reads[1].starts_with("open_read running/"), "{reads:?}");
    assert!(names(&q, "quarantine").is_empty(), "{:?}", names(&q, "quarantine"));
    assert_eq!(store.reclaim(5).unwrap().len(), 1, "taken back on the next pass");
    assert!(store.claim(LEASE).unwrap().is_some());
}

/// An ack, retry, bury or release whose call took effect but reported an error (the answer lost
/// on its way back) is the holder's own transition, not a stolen lease: the store answers it as
/// done, and a repeat never turns it into `LeaseLost`.
#[test]
fn a_transition_applied_but_reported_failed_is_not_a_lost_lease() {
    type Op = fn(&DirStore, &jobspool::store::Lease) -> jobspool::Result<()>;
    let ops: [(&str, &'static str, &str, Op); 4] = [
        ("ack", "unlink", "", |s, l| s.ack(l)),
        ("retry", "rename", "ready", |s, l| s.retry(l, Duration::ZERO)),
        ("bury", "rename", "dead", |s, l| s.bury(l, "no")),
        ("release", "rename", "ready", |s, l| s.release(l)),
    ];
    for (what, op, lands_in, call) in ops {
        let (_d, q) = queue();
        let store = DirStore::open(&q, false).unwrap();
        store.push(&NewJob::new("x")).unwrap();
        let claim = store.claim(LEASE).unwrap().unwrap();
        // The claim's own rename is behind us: the next call of `op` is the transition's.
        let (_fs, faulty) = faulty(&q, FaultFs::failing_after(op, 1, nix::libc::EIO));
        let r = call(&faulty, &claim.lease);
        assert!(r.is_ok(), "{what} applied, reported EIO: {r:?}");
        assert!(names(&q, "running").is_empty(), "{what}");
        if !lands_in.is_empty() {
            assert_eq!(names(&q, lands_in).len(), 1, "{what}");
        }
    }
}

/// A stolen lease is never taken for the holder's own transition when the holder's call fails:
/// the name is gone because a reclaimer moved the job, which is still in the queue.
#[test]
fn a_failed_transition_of_a_stolen_lease_is_not_taken_for_applied() {
    let (_d, q) = queue();
    let (_a, _b, stale) = stolen_claim(&q);
    let (_fs, faulty_a) = faulty(&q, FaultFs::failing("unlink", 1, nix::libc::EIO));
    let r = faulty_a.ack(&stale.lease);
    assert!(matches!(r, Err(Error::LeaseLost { .. })), "ack: {r:?}");
    let (_fs, faulty_a) = faulty(&q, FaultFs::failing("rename", 1, nix::libc::EIO));
    let r = faulty_a.retry(&stale.lease, Duration::ZERO);
    assert!(r.is_err(), "retry: {r:?}");
    assert_eq!(names(&q, "ready").len(), 1);
}

/// Pushes one job and drains it with a one-slot runner whose handler succeeds, through `fs`;
/// the runner must report it done, and no lease lost.
fn one_job_drained_through(q: &Path, fs: FaultFs) -> (JobId, Arc<FaultFs>, Arc<dyn Store>) {
    use jobspool::runner::{self, Handler, RunnerOptions};
    let id = DirStore::open(q, false).unwrap().push(&NewJob::new("x")).unwrap();
    let (fs, store) = faulty(q, fs);
    let store: Arc<dyn Store> = Arc::new(store);
    let mut o = RunnerOptions::new(Handler::Function(Arc::new(|_| Ok(()))));
    o.slots = 1;
    o.drain = true;
    let report = runner::run(Arc::clone(&store), o).unwrap();
    assert_eq!((report.done, report.lease_lost), (1, 0), "{report:?}");
    (id, fs, store)
}

/// The runner's ack reported EIO after its unlink took effect, and the outcome was recorded
/// again: the history said "lease lost" for a job that was done.
#[test]
fn a_retried_ack_whose_first_try_applied_is_recorded_done_not_lease_lost() {
    use jobspool::store::EventKind;
    let (_d, q) = queue();
    let (id, _fs, store) = one_job_drained_through(&q, FaultFs::failing_after("unlink", 1, nix::libc::EIO));
    let history = store.finished(&id).unwrap().expect("a done job keeps its history");
    let kinds: Vec<EventKind> = history.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EventKind::Done), "{kinds:?}");
    assert!(!kinds.contains(&EventKind::LeaseLost), "{kinds:?}");
}

/// A success on a local store is acknowledged on the runner's event loop, tried once there;
/// when that try fails, the outcome must still be recorded, by tries on a thread, with the
/// log's trailer written once.
#[test]
fn a_success_whose_ack_fails_once_on_the_event_loop_is_acknowledged_by_a_later_try() {
    use jobspool::store::EventKind;
    let (_d, q) = queue();
    let (id, fs, store) = one_job_drained_through(&q, FaultFs::failing("unlink", 1, nix::libc::EIO));
    let unlinks = fs.calls().iter().filter(|c| c.starts_with("unlink running/")).count();
    assert_eq!(unlinks, 2, "one failed try, one that took: {:?}", fs.calls());
    assert!(names(&q, "running").is_empty() && names(&q, "ready").is_empty());
    let kinds: Vec<EventKind> = store.finished(&id).unwrap().unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == EventKind::Done).count(), 1, "{kinds:?}");
    let log = String::from_utf8(store.read_log(&id, 0).unwrap().unwrap()).unwrap();
    assert_eq!(log.matches(" after ").count(), 1, "one trailer: {log}");
}

/// The runner claims on its event loop with `claim_now`, so that claim must never wait: not for
/// the first listing of `ready/` (a million names take seconds), nor for the lock a completion
/// check (`jobspool wait`, a draining runner's `idle`) holds while it lists the queue. It gives
/// up instead, having moved nothing, and the waiting `claim` takes over on a thread.
#[test]
fn a_claim_made_now_gives_up_with_nothing_moved_rather_than_list_the_queue_or_wait_for_a_check() {
    use nix::fcntl::{Flock, FlockArg};
    let (_d, q) = queue();
    let store = DirStore::open(&q, false).unwrap();
    for n in 0..3 {
        store.push(&NewJob::new(format!("{n}"))).unwrap();
    }
    assert!(
        store.claim_now(LEASE).is_none(),
        "the first claim lists ready/: not now"
    );
    assert_eq!(names(&q, "ready").len(), 3);
    store.claim(LEASE).unwrap().expect("the waiting claim lists and claims");

    let check = Flock::lock(std::fs::File::open(q.join("running")).unwrap(), FlockArg::LockExclusive).unwrap();
    assert!(store.claim_now(LEASE).is_none(), "a check holds running/: not now");
    assert_eq!(names(&q, "ready").len(), 2, "nothing moved");
    assert_eq!(names(&q, "running").len(), 1);
    drop(check);

    let claim = store
        .claim_now(LEASE)
        .expect("nothing to wait for")
        .unwrap()
        .expect("a job is due");
    assert_eq!(names(&q, "ready").len(), 1);
    assert!(names(&q, "running").contains(&claim.lease.token));
    store.ack(&claim.lease).unwrap();
    assert!(store.claim_now(LEASE).unwrap().unwrap().is_some());
    assert!(store.claim_now(LEASE).unwrap().unwrap().is_none(), "nothing is due");
}
