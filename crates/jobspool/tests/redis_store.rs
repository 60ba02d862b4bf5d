//! Redis-only behaviour that the conformance suite cannot reach: answers lost on the wire,
//! requests held on the wire while other callers of the same handle go on, an attempt's end
//! written in one step (or not at all under a stale lease), and the requests a job costs.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use common::redis_server::RedisServer;
use jobspool::runner::{self, Handler, RunnerOptions};
use jobspool::store::{Event, EventKind, Outcome};
use jobspool::{Error, NewJob, store};

/// A loopback proxy to a Redis server that, when armed, lets the next request through but
/// swallows its answer and drops the connection: the server acted, the client never hears.
/// Armed the other way, it holds the next request (says so on `held`) until `release`.
struct LossyProxy {
    port: u16,
    drop_next_reply: Arc<AtomicBool>,
    hold_next_request: Arc<AtomicBool>,
    held: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl LossyProxy {
    fn start(upstream: u16) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let drop_next_reply = Arc::new(AtomicBool::new(false));
        let hold_next_request = Arc::new(AtomicBool::new(false));
        let (held_tx, held) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let armed = Arc::clone(&drop_next_reply);
        let hold = Arc::clone(&hold_next_request);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (hold, held_tx, release_rx) = (Arc::clone(&hold), held_tx.clone(), Arc::clone(&release_rx));
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match c_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if hold.swap(false, Ordering::SeqCst) {
                            let _ = held_tx.send(());
                            let _ = release_rx.lock().unwrap().recv();
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let armed = Arc::clone(&armed);
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if armed.swap(false, Ordering::SeqCst) {
                            let _ = client.shutdown(Shutdown::Both);
                            let _ = server.shutdown(Shutdown::Both);
                            break;
                        }
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        LossyProxy {
            port,
            drop_next_reply,
            hold_next_request,
            held,
            release,
        }
    }
}

#[test]
fn a_claim_whose_answer_was_lost_is_handed_over_on_the_next_claim_not_held_until_its_lease_expires() {
    let Some(server) = RedisServer::start() else { return };
    let direct = store::open(&server.url("lossy"), true).unwrap();
    let proxy = LossyProxy::start(server.port);
    let via_proxy = store::open(&format!("redis://127.0.0.1:{}/0?queue=lossy", proxy.port), false).unwrap();
    // A first claim loads the script into the server, so the next request is the claim itself.
    assert!(via_proxy.claim(Duration::from_secs(600)).unwrap().is_none());
    let pushed = direct.push(&NewJob::new(b"only one".to_vec())).unwrap();

    proxy.drop_next_reply.store(true, Ordering::SeqCst);
    let lost = via_proxy.claim(Duration::from_secs(600));
    assert!(lost.is_err(), "the answer was swallowed: {lost:?}");
    assert_eq!(direct.stats().unwrap().running, 1, "the server did make the claim");

    // The next claim (on a new connection) gets that same claim, not nothing.
    let claim = via_proxy
        .claim(Duration::from_secs(600))
        .unwrap()
        .expect("the unanswered claim is handed over");
    assert_eq!(claim.job.id, pushed);
    assert_eq!(claim.lease.attempt, 1, "no attempt was counted for the lost answer");
    via_proxy.ack(&claim.lease).unwrap();
    assert!(direct.idle().unwrap().is_idle());
    assert!(via_proxy.claim(Duration::from_secs(600)).unwrap().is_none());
}

#[test]
fn a_push_or_ack_whose_answer_was_lost_is_repeated_and_applied_once_not_reported_failed() {
    let Some(server) = RedisServer::start() else { return };
    let direct = store::open(&server.url("lossy2"), true).unwrap();
    let proxy = LossyProxy::start(server.port);
    let via_proxy = store::open(&format!("redis://127.0.0.1:{}/0?queue=lossy2", proxy.port), false).unwrap();
    // Load the scripts through the proxy first, so the armed drop hits the request itself.
    let warm = via_proxy.push(&NewJob::new(b"warm".to_vec())).unwrap();
    let c = via_proxy.claim(Duration::from_secs(600)).unwrap().unwrap();
    assert_eq!(c.job.id, warm);
    via_proxy.heartbeat(&c.lease).unwrap();

    // The ack reaches the server, its answer is lost: the store repeats it, the repeat is
    // answered as the first was, and the ack is reported — it took effect.
    proxy.drop_next_reply.store(true, Ordering::SeqCst);
    via_proxy
        .ack(&c.lease)
        .expect("an applied ack is not reported as failed");
    assert!(direct.idle().unwrap().is_idle());
    assert!(
        matches!(
            via_proxy.retry(&c.lease, Duration::ZERO),
            Err(jobspool::Error::LeaseLost { .. })
        ),
        "the claim is over: any other transition is refused"
    );
    assert!(direct.idle().unwrap().is_idle(), "and changed nothing");

    // The same for a push: one job, reported pushed.
    proxy.drop_next_reply.store(true, Ordering::SeqCst);
    let id = via_proxy
        .push(&NewJob::new(b"once".to_vec()))
        .expect("an applied push is not reported as failed");
    let st = direct.stats().unwrap();
    assert_eq!(st.ready, 1, "pushed exactly once");
    assert_eq!(direct.claim(Duration::from_secs(600)).unwrap().unwrap().job.id, id);
}

#[test]
fn a_caller_waiting_for_an_answer_does_not_hold_up_other_callers_of_the_same_handle() {
    let Some(server) = RedisServer::start() else { return };
    let direct = store::open(&server.url("pool"), true).unwrap();
    let proxy = LossyProxy::start(server.port);
    let shared = store::open(&format!("redis://127.0.0.1:{}/0?queue=pool", proxy.port), false).unwrap();
    // A first call leaves an idle connection in the handle, which the held claim takes.
    let pushed = shared.push(&NewJob::new(b"one".to_vec())).unwrap();

    proxy.hold_next_request.store(true, Ordering::SeqCst);
    let (done_tx, done) = mpsc::channel();
    let held_claim = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            let r = shared.claim(Duration::from_secs(600));
            let _ = done_tx.send(());
            r
        })
    };
    proxy.held.recv().unwrap();
    // The claim is on the wire and cannot be answered until released. Another caller of the
    // same handle is answered meanwhile: it has a connection of its own. (With one connection
    // per handle it would wait until the held claim failed on its read timeout, and the check
    // below would see that claim finished first. No clock is read.)
    let st = shared.stats().unwrap();
    assert!(
        done.try_recv().is_err(),
        "the second call was answered only after the held one ended: calls on one handle are serialised"
    );
    assert_eq!(
        (st.ready, st.running),
        (1, 0),
        "the held claim has not reached the server"
    );

    proxy.release.send(()).unwrap();
    let claim = held_claim
        .join()
        .unwrap()
        .unwrap()
        .expect("the held claim is answered once released");
    assert_eq!(claim.job.id, pushed);
    shared.ack(&claim.lease).unwrap();
    assert!(direct.idle().unwrap().is_idle());
}

fn history_kinds(s: &dyn store::Store, id: &jobspool::JobId) -> Vec<EventKind> {
    let history = match s.get(id.as_str()) {
        Ok(d) => d.history,
        Err(_) => s.finished(id).unwrap().unwrap_or_default(),
    };
    history.iter().map(|e| e.kind).collect()
}

fn log_text(s: &dyn store::Store, id: &jobspool::JobId) -> String {
    String::from_utf8(s.read_log(id, 0).unwrap().unwrap_or_default()).unwrap()
}

#[test]
fn an_end_attempt_under_a_stale_lease_writes_no_trailer_and_no_event_and_is_refused() {
    let Some(server) = RedisServer::start() else { return };
    let s = store::open(&server.url("stale"), true).unwrap();
    let id = s.push(&NewJob::new(b"x".to_vec())).unwrap();
    let a = s.claim(Duration::from_millis(100)).unwrap().unwrap();
    let started = |n| Event::now(EventKind::Started, n, None);
    let (log_a, start) = s.begin_attempt(&a.lease, b"=== A begins ===\n", &started(1)).unwrap();
    assert_eq!(start, 0);
    // A's lease runs out; B's claim takes the job back and claims it again.
    std::thread::sleep(Duration::from_millis(300));
    let b = s
        .claim(Duration::from_secs(600))
        .unwrap()
        .expect("reclaimed and claimed again");
    assert_eq!((&b.job.id, b.lease.attempt), (&id, 2));
    let (_log_b, start) = s.begin_attempt(&b.lease, b"=== B begins ===\n", &started(2)).unwrap();
    assert_eq!(start, 17, "B's header starts after A's");
    let (log_before, history_before) = (log_text(&*s, &id), s.get(id.as_str()).unwrap().history);

    let mut log_a = Some(log_a);
    for outcome in [
        Outcome::Ack,
        Outcome::Retry { delay: Duration::ZERO },
        Outcome::Bury { reason: "stale".into() },
        Outcome::Release,
    ] {
        let done = Event::now(EventKind::Done, 1, Some("stale".into()));
        let r = s.end_attempt(&a.lease, log_a.take(), b"=== A ends ===\n", &outcome, Some(&done));
        assert!(matches!(r, Err(Error::LeaseLost { .. })), "{outcome:?}: {r:?}");
    }
    assert_eq!(log_text(&*s, &id), log_before, "no trailer from the stale holder");
    let d = s.get(id.as_str()).unwrap();
    assert_eq!(d.history, history_before, "no event from the stale holder");
    assert_eq!(d.info.state, jobspool::State::Running, "B still holds the job");
    s.heartbeat(&b.lease).unwrap();

    let done = Event::now(EventKind::Done, 2, None);
    s.end_attempt(&b.lease, None, b"=== B ends ===\n", &Outcome::Ack, Some(&done))
        .unwrap();
    assert_eq!(
        log_text(&*s, &id),
        "=== A begins ===\n=== B begins ===\n=== B ends ===\n"
    );
    assert_eq!(
        history_kinds(&*s, &id),
        [
            EventKind::Started,
            EventKind::Reclaimed,
            EventKind::Started,
            EventKind::Done
        ]
    );
    assert!(s.idle().unwrap().is_idle());
}

#[test]
fn an_end_attempt_whose_answer_was_lost_is_repeated_and_writes_its_trailer_and_event_once() {
    let Some(server) = RedisServer::start() else { return };
    let direct = store::open(&server.url("lossy3"), true).unwrap();
    let proxy = LossyProxy::start(server.port);
    let via_proxy = store::open(&format!("redis://127.0.0.1:{}/0?queue=lossy3", proxy.port), false).unwrap();
    for (outcome, kinds) in [
        (
            Outcome::Retry {
                delay: Duration::from_secs(3600),
            },
            vec![EventKind::Started, EventKind::Failed],
        ),
        (
            Outcome::Bury { reason: "no".into() },
            vec![EventKind::Started, EventKind::Dead],
        ),
        (Outcome::Ack, vec![EventKind::Started, EventKind::Done]),
    ] {
        let id = via_proxy.push(&NewJob::new(b"x".to_vec())).unwrap();
        let c = via_proxy.claim(Duration::from_secs(600)).unwrap().unwrap();
        let started = Event::now(EventKind::Started, 1, None);
        let (log, _) = via_proxy
            .begin_attempt(&c.lease, b"=== begins ===\n", &started)
            .unwrap();
        // Loads the script into the server, so the armed drop hits the request itself.
        let stale = jobspool::Lease {
            token: "nobody".into(),
            ..c.lease.clone()
        };
        assert!(direct.end_attempt(&stale, None, b"", &outcome, None).is_err());

        proxy.drop_next_reply.store(true, Ordering::SeqCst);
        // Bury records its own dead event.
        let event = (!matches!(outcome, Outcome::Bury { .. })).then(|| Event::now(kinds[1], 1, None));
        via_proxy
            .end_attempt(&c.lease, Some(log), b"=== ends ===\n", &outcome, event.as_ref())
            .expect("an applied end is not reported as failed");
        assert_eq!(
            log_text(&*direct, &id),
            "=== begins ===\n=== ends ===\n",
            "{outcome:?}: the trailer once"
        );
        assert_eq!(history_kinds(&*direct, &id), kinds, "{outcome:?}: the event once");
        assert!(
            direct.get(id.as_str()).map_or(true, |d| d.info.attempts == 1),
            "counted once"
        );
    }
}

#[test]
fn the_runner_makes_three_writes_per_job_and_no_reads_when_jobs_succeed() {
    let Some(server) = RedisServer::start() else { return };
    let url = server.url("trips");
    let s = store::open(&url, true).unwrap();
    let opts = || {
        let mut o = RunnerOptions::new(Handler::Command(vec!["true".into()]));
        o.slots = 1;
        o.drain = true;
        o
    };
    let mut redis = ::redis::Client::open(format!("redis://127.0.0.1:{}/0", server.port))
        .unwrap()
        .get_connection()
        .unwrap();
    // Calls by the clients, per command (scripts' own commands are counted too, but none of
    // them is EVALSHA or STRLEN).
    let mut calls = |cmd: &str| -> u64 {
        let info: String = ::redis::cmd("INFO").arg("commandstats").query(&mut redis).unwrap();
        let prefix = format!("cmdstat_{cmd}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    };
    // A first run loads every script; then the cost of a run with nothing to do.
    s.push(&NewJob::new(Vec::new())).unwrap();
    runner::run(store::open(&url, false).unwrap(), opts()).unwrap();
    let evalsha = calls("evalsha");
    runner::run(store::open(&url, false).unwrap(), opts()).unwrap();
    let idle_run = calls("evalsha") - evalsha;

    const N: u64 = 20;
    let jobs: Vec<NewJob> = (0..N).map(|_| NewJob::new(Vec::new())).collect();
    s.push_batch(&jobs).unwrap();
    let (evalsha, strlen_before) = (calls("evalsha"), calls("strlen"));
    let report = runner::run(store::open(&url, false).unwrap(), opts()).unwrap();
    assert_eq!(report.done, N);
    let per_run = calls("evalsha") - evalsha;
    // Claim, begin (header + started), end (trailer + ack + done): 3 per job. A job used to
    // take 6 (claim, header, started, trailer, ack, done) and 2 reads (the log's size).
    // (A few more than the idle run: a last claim, a tick.)
    assert!(
        per_run <= 3 * N + idle_run + 5,
        "{per_run} scripts for {N} jobs, {idle_run} for a run with none: more than 3 per job"
    );
    assert_eq!(calls("strlen") - strlen_before, 0, "no read of the log's size");
    eprintln!("{per_run} scripts for {N} jobs, {idle_run} for a run with none");
}

/// Connections made to `server` so far (the server's own count; this query adds one).
fn connections_received(server: &RedisServer) -> u64 {
    let info = server.command(&["INFO", "stats"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

extern "C" fn ignore_signal(_: nix::libc::c_int) {}

/// A runner opened about 600 new connections during a 10 000-job push storm, against 7 for a
/// plain drain: each handler that exits sends SIGCHLD, and while the runner's spawning thread
/// has every signal blocked (the few system calls between clone and exec) even an ignored
/// SIGCHLD is queued and wakes another thread. On a socket with a read timeout, which every
/// pooled connection has, a signal fails the read with EINTR whatever its action: the call
/// failed ("claiming failed … trying again in 1s", "cannot open the job's log … releasing
/// it"), its connection and every older one were dropped, and the next calls reconnected. Here
/// SIGCHLD (with a handler, so that it is delivered, as it is to the runner's thread) is sent
/// to a thread making Redis calls, over and over.
#[test]
fn sigchld_during_a_call_neither_fails_it_nor_costs_a_connection() {
    const CALLS: usize = 2000;
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let Some(server) = RedisServer::start() else { return };
    let s = store::open(&server.url("sigchld"), true).unwrap();
    // SA_RESTART, as tokio's handlers have: a socket with a timeout is interrupted all the same.
    let action = SigAction::new(SigHandler::Handler(ignore_signal), SaFlags::SA_RESTART, SigSet::empty());
    // SAFETY: the handler does nothing; the previous action is put back below.
    let old = unsafe { sigaction(Signal::SIGCHLD, &action) }.unwrap();
    let before = connections_received(&server);
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let caller = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { nix::libc::pthread_self() }).unwrap();
            let mut failed = Vec::new();
            for _ in 0..CALLS {
                if let Err(e) = s.stats() {
                    failed.push(e.to_string());
                }
            }
            done.store(true, Ordering::Relaxed);
            failed
        })
    };
    let thread = rx.recv().unwrap();
    let mut sent = 0;
    while !done.load(Ordering::Relaxed) {
        // SAFETY: the thread is alive until `done` is set, which is checked just before.
        unsafe { nix::libc::pthread_kill(thread, nix::libc::SIGCHLD) };
        sent += 1;
        std::thread::sleep(Duration::from_micros(100));
    }
    let failed = caller.join().unwrap();
    // SAFETY: restores the action saved above.
    unsafe { sigaction(Signal::SIGCHLD, &old) }.unwrap();
    let opened = connections_received(&server) - before - 1;
    assert!(sent > 10, "only {sent} signals sent");
    assert!(
        failed.is_empty(),
        "{} of {CALLS} calls failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(
        opened <= 1,
        "{opened} connections opened for {CALLS} calls on one thread"
    );
}
