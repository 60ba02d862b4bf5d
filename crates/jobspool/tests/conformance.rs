//! One conformance suite, written once, run against every store: the queue directory and Redis.
//!
//! Each behaviour below is a plain function over a [`Backend`]; the `conformance!` macro at the
//! bottom turns each into a test per store (`dir::NAME`, `redis::NAME`). A behaviour that holds
//! on one store and not the other is a bug in that store.

mod common;

use std::collections::HashSet;
use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use jobspool::runner::{self, Handler, RunnerOptions};
use jobspool::store::{self, EventKind, Store, Wakeup};
use jobspool::{Backoff, Error, JobId, NewJob, State};

/// A queue under test, and the means to open more handles to it (as other processes would).
trait Backend {
    /// A new, independent handle on the queue (its own connection or registration).
    fn open(&self) -> Arc<dyn Store>;
}

struct Dir {
    _tmp: tempfile::TempDir,
    path: String,
}

impl Backend for Dir {
    fn open(&self) -> Arc<dyn Store> {
        store::open(&self.path, true).unwrap()
    }
}

fn dir() -> Option<Box<dyn Backend>> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q").to_str().unwrap().to_string();
    Some(Box::new(Dir { _tmp: tmp, path }))
}

struct Redis {
    server: RedisServer,
}

impl Backend for Redis {
    fn open(&self) -> Arc<dyn Store> {
        store::open(&self.server.url("conformance"), true).unwrap()
    }
}

fn redis() -> Option<Box<dyn Backend>> {
    Some(Box::new(Redis {
        server: RedisServer::start()?,
    }))
}

fn id(s: &str) -> JobId {
    JobId::new(s).unwrap()
}

fn push(s: &dyn Store, name: &str, priority: i16) {
    s.push(&NewJob::new(name.as_bytes().to_vec()).id(id(name)).priority(priority))
        .unwrap();
}

const LEASE: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(200);

/// Waits until the short lease of a claim made now has certainly expired.
fn outlive_short_lease() {
    std::thread::sleep(SHORT * 3);
}

fn state_of(s: &dyn Store, name: &str) -> State {
    s.get(name).unwrap().info.state
}

// ---- the store API -------------------------------------------------------------------------

fn a_pushed_job_is_claimed_with_its_payload_and_first_attempt(b: &dyn Backend) {
    let s = b.open();
    let payload = b"bytes \0 with\nnewlines \xff".to_vec();
    let jid = s.push(&NewJob::new(payload.clone()).command(["echo", "hi"])).unwrap();
    let c = s.claim(LEASE).unwrap().expect("a ready job");
    assert_eq!(c.job.id, jid);
    assert_eq!(c.job.payload, payload);
    assert_eq!(c.job.command, Some(vec![OsString::from("echo"), OsString::from("hi")]));
    assert_eq!(c.lease.attempt, 1);
    assert_eq!(state_of(&*s, jid.as_str()), State::Running);
    assert!(s.claim(LEASE).unwrap().is_none(), "one job, one claim");
    s.ack(&c.lease).unwrap();
    assert!(matches!(s.get(jid.as_str()), Err(Error::NotFound { .. })));
    assert_eq!(s.stats().unwrap().running, 0);
}

fn claims_follow_priority_then_age(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "low", -5);
    push(&*s, "first", 0);
    std::thread::sleep(Duration::from_millis(5));
    push(&*s, "second", 0);
    push(&*s, "urgent", 10);
    let order: Vec<String> = std::iter::from_fn(|| s.claim(LEASE).unwrap())
        .map(|c| c.job.id.to_string())
        .collect();
    assert_eq!(order, ["urgent", "first", "second", "low"]);
}

fn delayed_jobs_are_scheduled_until_due(b: &dyn Backend) {
    let s = b.open();
    let before = jobspool::job::now_ms();
    s.push(
        &NewJob::new(b"later".to_vec())
            .id(id("later"))
            .delay(Duration::from_millis(400)),
    )
    .unwrap();
    let st = s.stats().unwrap();
    assert_eq!((st.ready, st.scheduled), (0, 1));
    assert_eq!(state_of(&*s, "later"), State::Scheduled);
    assert!(s.claim(LEASE).unwrap().is_none(), "not before its time");
    let due = s.next_due().unwrap().expect("a scheduled job has a due time");
    assert!(
        due >= before + 300 && due <= jobspool::job::now_ms() + 500,
        "{due} vs {before}"
    );
    std::thread::sleep(Duration::from_millis(450));
    let c = s.claim(LEASE).unwrap().expect("due now");
    assert_eq!(c.job.id.as_str(), "later");
    assert_eq!(s.next_due().unwrap(), None);
}

fn claims_are_exclusive_between_threads_and_handles(b: &dyn Backend) {
    let n = 200;
    let s = b.open();
    let jobs: Vec<NewJob> = (0..n).map(|i| NewJob::new(format!("{i}").into_bytes())).collect();
    s.push_batch(&jobs).unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (s, barrier) = (b.open(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                let mut got = Vec::new();
                while let Some(c) = s.claim(LEASE).unwrap() {
                    got.push(c.job.id.to_string());
                    s.ack(&c.lease).unwrap();
                }
                got
            })
        })
        .collect();
    let all: Vec<String> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), n, "every job claimed once");
    assert_eq!(unique.len(), n, "no job claimed twice");
    assert_eq!(s.idle().unwrap(), store::Idle::default());
}

fn a_stale_holder_is_refused_every_transition(b: &dyn Backend) {
    let (a, other) = (b.open(), b.open());
    push(&*a, "contested", 0);
    let stale = a.claim(SHORT).unwrap().unwrap();
    outlive_short_lease();
    let back = other.reclaim(5).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].old_token, stale.lease.token);
    let fresh = other.claim(LEASE).unwrap().expect("reclaimed job is claimable");
    assert_eq!(fresh.lease.attempt, 2, "the reclaim counted an attempt");
    assert_ne!(fresh.lease.token, stale.lease.token);
    let lost = |r: jobspool::Result<()>| assert!(matches!(r, Err(Error::LeaseLost { .. })), "{r:?}");
    lost(a.heartbeat(&stale.lease));
    lost(a.ack(&stale.lease));
    lost(a.retry(&stale.lease, Duration::ZERO));
    lost(a.bury(&stale.lease, "stale"));
    lost(a.release(&stale.lease));
    // The new holder's claim is untouched by all of that.
    let d = other.get("contested").unwrap();
    assert_eq!(d.info.state, State::Running);
    other.heartbeat(&fresh.lease).unwrap();
    other.ack(&fresh.lease).unwrap();
    assert!(a.idle().unwrap().is_idle());
}

fn a_heartbeat_keeps_a_lease_alive(b: &dyn Backend) {
    let (s, other) = (b.open(), b.open());
    push(&*s, "long", 0);
    let c = s.claim(SHORT).unwrap().unwrap();
    let until = Instant::now() + SHORT * 4;
    while Instant::now() < until {
        std::thread::sleep(SHORT / 4);
        s.heartbeat(&c.lease).unwrap();
        assert!(
            other.reclaim(5).unwrap().is_empty(),
            "a heartbeated lease is not taken back"
        );
    }
    s.ack(&c.lease).unwrap();
}

fn reclaims_count_attempts_and_bury_when_exhausted(b: &dyn Backend) {
    let (s, other) = (b.open(), b.open());
    push(&*s, "poison", 0);
    for attempt in 1..=3u32 {
        let c = s.claim(SHORT).unwrap().expect("claimable again");
        assert_eq!(c.lease.attempt, attempt);
        outlive_short_lease();
        let back = other.reclaim(3).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].attempts, attempt);
        assert_eq!(back[0].buried, attempt == 3, "buried once attempts run out");
    }
    let d = s.get("poison").unwrap();
    assert_eq!(d.info.state, State::Dead);
    assert_eq!(d.info.attempts, 3);
    let reason = d.dead_reason().expect("a dead job keeps its reason");
    assert!(reason.contains("lease"), "{reason}");
    assert!(d.history.iter().any(|e| e.kind == EventKind::Reclaimed));
}

fn a_retry_counts_the_attempt_and_waits_its_delay(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "flaky", 0);
    let c = s.claim(LEASE).unwrap().unwrap();
    s.retry(&c.lease, Duration::from_millis(300)).unwrap();
    assert_eq!(state_of(&*s, "flaky"), State::Scheduled);
    assert!(s.claim(LEASE).unwrap().is_none(), "not before the delay");
    std::thread::sleep(Duration::from_millis(350));
    let c = s.claim(LEASE).unwrap().expect("due after the delay");
    assert_eq!(c.lease.attempt, 2);
    s.retry(&c.lease, Duration::ZERO).unwrap();
    assert_eq!(state_of(&*s, "flaky"), State::Ready, "no delay: ready at once");
    assert_eq!(s.get("flaky").unwrap().info.attempts, 2);
}

fn bury_keeps_the_reason_and_revive_resets_the_attempts(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "doomed", 3);
    let c = s.claim(LEASE).unwrap().unwrap();
    s.bury(&c.lease, "exit 100: permanent failure").unwrap();
    let d = s.get("doomed").unwrap();
    assert_eq!(d.info.state, State::Dead);
    assert_eq!(d.dead_reason(), Some("exit 100: permanent failure"));
    assert_eq!(s.stats().unwrap().dead, 1);
    assert!(s.claim(LEASE).unwrap().is_none(), "dead jobs are not claimed");
    s.revive(&id("doomed")).unwrap();
    let d = s.get("doomed").unwrap();
    assert_eq!((d.info.state, d.info.attempts, d.info.priority), (State::Ready, 0, 3));
    assert!(d.history.iter().any(|e| e.kind == EventKind::Revived));
    assert!(
        matches!(s.revive(&id("doomed")), Err(Error::WrongState { .. })),
        "only dead jobs can be revived"
    );
    assert!(matches!(s.revive(&id("nope")), Err(Error::NotFound { .. })));
    let c = s.claim(LEASE).unwrap().unwrap();
    assert_eq!(c.lease.attempt, 1);
    s.bury(&c.lease, "again").unwrap();
    push(&*s, "alive", 0);
    let revived = s.revive_all().unwrap();
    assert_eq!(revived, vec![id("doomed")]);
}

fn a_release_does_not_count_an_attempt(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "interrupted", 0);
    let c = s.claim(LEASE).unwrap().unwrap();
    s.release(&c.lease).unwrap();
    let d = s.get("interrupted").unwrap();
    assert_eq!((d.info.state, d.info.attempts), (State::Ready, 0));
    assert_eq!(s.claim(LEASE).unwrap().unwrap().lease.attempt, 1);
}

fn remove_works_in_every_state_and_fences_the_holder(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "r-ready", 0);
    s.push(&NewJob::new(vec![]).id(id("r-sched")).delay(Duration::from_secs(3600)))
        .unwrap();
    assert_eq!(s.remove("r-ready").unwrap(), Some(State::Ready));
    assert_eq!(s.remove("r-sched").unwrap(), Some(State::Scheduled));
    push(&*s, "r-running", 0);
    let c = s.claim(LEASE).unwrap().unwrap();
    assert_eq!(s.remove("r-running").unwrap(), Some(State::Running));
    assert!(matches!(s.heartbeat(&c.lease), Err(Error::LeaseLost { .. })));
    assert!(matches!(s.ack(&c.lease), Err(Error::LeaseLost { .. })));
    assert!(matches!(s.remove("r-running"), Err(Error::NotFound { .. })));
    assert!(s.idle().unwrap().is_idle());
}

fn ids_are_unique_and_batches_all_or_nothing(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "once", 0);
    assert!(matches!(
        s.push(&NewJob::new(vec![]).id(id("once"))),
        Err(Error::JobExists { .. })
    ));
    let batch = vec![NewJob::new(vec![]).id(id("b1")), NewJob::new(vec![]).id(id("once"))];
    assert!(matches!(s.push_batch(&batch), Err(Error::JobExists { .. })));
    let repeated = vec![NewJob::new(vec![]).id(id("b2")), NewJob::new(vec![]).id(id("b2"))];
    assert!(s.push_batch(&repeated).is_err());
    assert_eq!(s.stats().unwrap().ready, 1, "a refused batch adds nothing");
    assert!(matches!(s.get("b1"), Err(Error::NotFound { .. })));
    let ids = s
        .push_batch(&(0..50).map(|i| NewJob::new(vec![i])).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(ids.len(), 50);
    assert_eq!(s.stats().unwrap().ready, 51);
}

fn a_finished_jobs_id_stays_reserved_until_removed(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "order-42", 0);
    let c = s.claim(LEASE).unwrap().unwrap();
    s.open_log(&c.job.id).unwrap().append(b"sent\n").unwrap();
    s.record(&c.job.id, &store::Event::now(EventKind::Done, 1, None))
        .unwrap();
    s.ack(&c.lease).unwrap();
    assert!(matches!(s.get("order-42"), Err(Error::NotFound { .. })));
    let history = s
        .finished(&id("order-42"))
        .unwrap()
        .expect("a finished job's history is kept");
    assert!(history.iter().any(|e| e.kind == EventKind::Done));
    assert!(
        matches!(
            s.push(&NewJob::new(vec![]).id(id("order-42"))),
            Err(Error::Finished { .. })
        ),
        "re-pushing a finished idempotency key does not run it again"
    );
    assert_eq!(s.remove("order-42").unwrap(), None, "only leftovers were removed");
    assert_eq!(s.finished(&id("order-42")).unwrap(), None);
    assert!(matches!(s.remove("order-42"), Err(Error::NotFound { .. })));
    push(&*s, "order-42", 0);
    assert_eq!(
        s.finished(&id("order-42")).unwrap(),
        None,
        "a queued job is not finished"
    );
}

fn stats_idle_and_list_see_every_state(b: &dyn Backend) {
    let s = b.open();
    for name in ["s-a", "s-b", "s-c", "s-d"] {
        push(&*s, name, 0);
    }
    s.push(&NewJob::new(vec![]).id(id("s-later")).delay(Duration::from_secs(3600)))
        .unwrap();
    let running = s.claim(LEASE).unwrap().unwrap();
    let dead = s.claim(LEASE).unwrap().unwrap();
    s.bury(&dead.lease, "no").unwrap();
    let st = s.stats().unwrap();
    assert_eq!(
        (st.ready, st.scheduled, st.running, st.dead, st.quarantined),
        (2, 1, 1, 1, 0)
    );
    assert!(st.oldest_ready.is_some());
    let idle = s.idle().unwrap();
    assert_eq!((idle.ready, idle.scheduled, idle.running), (2, 1, 1));
    assert!(!idle.is_idle(), "a leased job is work in progress");
    let listed = s.list(&[State::Running], true).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, running.job.id.as_str());
    assert!(listed[0].expires.is_some() && listed[0].runner.is_some());
    assert_eq!(listed[0].job.as_ref().unwrap().payload, running.job.payload);
    let all = s
        .list(&[State::Ready, State::Scheduled, State::Running, State::Dead], false)
        .unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(s.list(&[State::Dead], false).unwrap()[0].id, dead.job.id.as_str());
}

fn logs_and_history_are_kept_per_job(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "talky", 0);
    let c = s.claim(LEASE).unwrap().unwrap();
    let jid = c.job.id.clone();
    let mut log = s.open_log(&jid).unwrap();
    assert_eq!(log.size().unwrap(), 0);
    log.append(b"first line\n").unwrap();
    log.append(b"second line\n").unwrap();
    assert_eq!(log.size().unwrap(), 23);
    assert_eq!(s.read_log(&jid, 0).unwrap().unwrap(), b"first line\nsecond line\n");
    assert_eq!(s.read_log(&jid, 11).unwrap().unwrap(), b"second line\n");
    assert_eq!(s.read_log(&id("never-ran"), 0).unwrap(), None);
    let mut ev = store::Event::now(EventKind::Started, 1, Some("went".into()));
    ev.runner = Some("r1".into());
    s.record(&jid, &ev).unwrap();
    s.bury(&c.lease, "gave up").unwrap();
    let d = s.get("talky").unwrap();
    let kinds: Vec<EventKind> = d.history.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Started, EventKind::Dead]);
    assert_eq!(d.history[0].runner.as_deref(), Some("r1"));
}

fn a_watch_wakes_on_a_push_from_another_handle(b: &dyn Backend) {
    let (s, producer) = (b.open(), b.open());
    let (tx, rx) = mpsc::channel::<Wakeup>();
    let tx = std::sync::Mutex::new(tx);
    let _guard = s
        .watch(Arc::new(move |w| {
            let _ = tx.lock().unwrap().send(w);
        }))
        .unwrap();
    while rx.try_recv().is_ok() {}
    let pushed = Instant::now();
    push(&*producer, "wake-me", 0);
    let deadline = Duration::from_secs(10);
    loop {
        let w = rx.recv_timeout(deadline).expect("a push wakes the watcher");
        if w.work {
            break;
        }
    }
    eprintln!("wake-up after {:?}", pushed.elapsed());
}

fn runners_register_and_retire(b: &dyn Backend) {
    let (s, observer) = (b.open(), b.open());
    let status = store::RunnerStatus::for_this_process(4);
    let rid = s.announce(&status).unwrap();
    let seen = observer.runners().unwrap();
    let me = seen.iter().find(|r| r.id == rid).expect("registered");
    assert!(me.alive);
    assert_eq!((me.status.slots, me.status.pid), (4, std::process::id()));
    s.retire().unwrap();
    assert!(observer.runners().unwrap().iter().all(|r| r.id != rid));
}

// ---- the runner on each store ---------------------------------------------------------------

fn runner_options(argv: &[&str]) -> RunnerOptions {
    let mut o = RunnerOptions::new(Handler::Command(argv.iter().map(OsString::from).collect()));
    o.slots = 2;
    o.drain = true;
    o.max_attempts = Some(2);
    o.backoff = Some(Backoff {
        min: Duration::from_millis(20),
        max: Duration::from_millis(40),
    });
    o
}

fn the_runner_keeps_the_exit_code_contract(b: &dyn Backend) {
    let s = b.open();
    for (name, code) in [("ok", "0"), ("tempfail", "75"), ("permanent", "100"), ("crash", "3")] {
        s.push(&NewJob::new(code.as_bytes().to_vec()).id(id(name))).unwrap();
    }
    let report = runner::run(
        b.open(),
        runner_options(&["sh", "-c", "read code; echo \"out $code\"; exit $code"]),
    )
    .unwrap();
    assert_eq!(
        (report.done, report.dead, report.retried),
        (1, 3, 2),
        "ok done; permanent dead at once; tempfail and crash retried once, then dead"
    );
    assert!(matches!(s.get("ok"), Err(Error::NotFound { .. })));
    let reason = |n: &str| s.get(n).unwrap().dead_reason().unwrap().to_string();
    assert!(reason("permanent").contains("100"), "{}", reason("permanent"));
    assert!(reason("crash").contains("exit 3"), "{}", reason("crash"));
    assert!(reason("crash").contains("out 3"), "the reason quotes the last output");
    assert_eq!(s.get("tempfail").unwrap().info.attempts, 2);
    let log = String::from_utf8(s.read_log(&id("crash"), 0).unwrap().unwrap()).unwrap();
    assert_eq!(log.matches("attempt ").count(), 2, "{log}");
    assert!(log.contains("out 3"), "{log}");
    assert!(s.idle().unwrap().is_idle());
}

/// Asserts that `parts` occur in `text` in this order.
fn in_order(text: &str, parts: &[&str]) {
    let mut at = 0;
    for p in parts {
        match text[at..].find(p) {
            Some(i) => at += i + p.len(),
            None => panic!("{p:?} missing, or out of order, in:\n{text}"),
        }
    }
}

fn every_attempt_leaves_its_header_output_trailer_and_events(b: &dyn Backend) {
    let s = b.open();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["ok", "flaky", "doomed"] {
        push(&*s, name, 0);
    }
    // `flaky` fails its first attempt (75: retried) and succeeds on its second.
    let script = format!(
        "read name; echo \"out $name $JOBSPOOL_ATTEMPT\"; case $name in ok) exit 0;; doomed) exit 100;; esac; \
         [ -e {dir}/$name ] && exit 0; touch {dir}/$name; exit 75",
        dir = tmp.path().display()
    );
    let report = runner::run(b.open(), runner_options(&["sh", "-c", &script])).unwrap();
    assert_eq!((report.done, report.retried, report.dead), (2, 1, 1));
    let log = |n: &str| String::from_utf8(s.read_log(&id(n), 0).unwrap().unwrap()).unwrap();
    let kinds = |h: &[store::Event]| h.iter().map(|e| e.kind).collect::<Vec<_>>();
    use EventKind::*;

    let ok = log("ok");
    in_order(
        &ok,
        &[
            "=== jobspool: attempt 1 of 2",
            "\nout ok 1\n",
            "=== jobspool: exit 0 after",
        ],
    );
    assert_eq!(ok.matches("=== jobspool: exit").count(), 1, "one trailer: {ok}");
    let history = s
        .finished(&id("ok"))
        .unwrap()
        .expect("a finished job's history is kept");
    assert_eq!(kinds(&history), [Started, Done]);
    assert!(
        history.iter().all(|e| e.attempt == 1 && e.runner.is_some()),
        "{history:?}"
    );

    let flaky = log("flaky");
    in_order(
        &flaky,
        &[
            "=== jobspool: attempt 1 of 2",
            "\nout flaky 1\n",
            "=== jobspool: exit 75 (temporary failure) after",
            "=== jobspool: attempt 2 of 2",
            "\nout flaky 2\n",
            "=== jobspool: exit 0 after",
        ],
    );
    assert_eq!(
        flaky.matches("=== jobspool: exit").count(),
        2,
        "one trailer per attempt: {flaky}"
    );
    let history = s.finished(&id("flaky")).unwrap().unwrap();
    assert_eq!(kinds(&history), [Started, Failed, Started, Done]);
    assert!(
        history[1].detail.as_deref().unwrap().contains("out flaky 1"),
        "the failure quotes the attempt's own output: {history:?}"
    );

    let doomed = log("doomed");
    in_order(
        &doomed,
        &[
            "=== jobspool: attempt 1 of 2",
            "\nout doomed 1\n",
            "=== jobspool: exit 100 (permanent failure) after",
        ],
    );
    assert_eq!(doomed.matches("=== jobspool: exit").count(), 1, "{doomed}");
    let d = s.get("doomed").unwrap();
    assert_eq!(kinds(&d.history), [Started, Dead]);
    let reason = d.dead_reason().unwrap();
    assert!(
        reason.contains("out doomed 1") && !reason.contains("=== jobspool"),
        "the reason quotes the output, not the runner's own lines: {reason}"
    );
}

fn the_runner_gives_the_environment_and_runs_scheduled_jobs_on_time(b: &dyn Backend) {
    let s = b.open();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let pushed = jobspool::job::now_ms();
    s.push(
        &NewJob::new(b"payload".to_vec())
            .id(id("timed"))
            .delay(Duration::from_millis(600)),
    )
    .unwrap();
    let script = format!(
        "echo \"$JOBSPOOL_JOB_ID $JOBSPOOL_ATTEMPT $(cat) $(date +%s%3N)\" > {}",
        out.display()
    );
    let report = runner::run(b.open(), runner_options(&["sh", "-c", &script])).unwrap();
    assert_eq!(report.done, 1);
    let line = std::fs::read_to_string(&out).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&f[..3], ["timed", "1", "payload"]);
    let started: u64 = f[3].parse().unwrap();
    assert!(started >= pushed + 600, "ran {}ms after the push", started - pushed);
}

fn the_runner_stops_a_handler_whose_job_was_removed(b: &dyn Backend) {
    let s = b.open();
    push(&*s, "cancelled", 0);
    let mut o = runner_options(&["sleep", "30"]);
    o.lease = Some(Duration::from_millis(300));
    let runner_store = b.open();
    let stop = Arc::new(AtomicBool::new(false));
    let remover = {
        let (s, stop) = (b.open(), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if s.get("cancelled").is_ok_and(|d| d.info.state == State::Running) {
                    s.remove("cancelled").unwrap();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    let report = runner::run(runner_store, o).unwrap();
    stop.store(true, Ordering::Relaxed);
    remover.join().unwrap();
    assert_eq!(report.lease_lost, 1, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(25), "the handler was stopped");
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod dir_store {
            $(#[test] fn $name() { if let Some(b) = super::dir() { super::$name(&*b) } })*
        }
        mod redis_store {
            $(#[test] fn $name() { if let Some(b) = super::redis() { super::$name(&*b) } })*
        }
    };
}

conformance!(
    a_pushed_job_is_claimed_with_its_payload_and_first_attempt,
    claims_follow_priority_then_age,
    delayed_jobs_are_scheduled_until_due,
    claims_are_exclusive_between_threads_and_handles,
    a_stale_holder_is_refused_every_transition,
    a_heartbeat_keeps_a_lease_alive,
    reclaims_count_attempts_and_bury_when_exhausted,
    a_retry_counts_the_attempt_and_waits_its_delay,
    bury_keeps_the_reason_and_revive_resets_the_attempts,
    a_release_does_not_count_an_attempt,
    remove_works_in_every_state_and_fences_the_holder,
    ids_are_unique_and_batches_all_or_nothing,
    a_finished_jobs_id_stays_reserved_until_removed,
    stats_idle_and_list_see_every_state,
    logs_and_history_are_kept_per_job,
    a_watch_wakes_on_a_push_from_another_handle,
    runners_register_and_retire,
    the_runner_keeps_the_exit_code_contract,
    every_attempt_leaves_its_header_output_trailer_and_events,
    the_runner_gives_the_environment_and_runs_scheduled_jobs_on_time,
    the_runner_stops_a_handler_whose_job_was_removed,
);
