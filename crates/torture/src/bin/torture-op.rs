//! The faulted process: performs queue operations through the jobspool library and appends each
//! one's invocation and outcome to the history on its standard output (see `torture::history`).
//!
//! `torture-op QUEUE PROC OP [ARGS...]`, where OP is one of
//! - `push ID...`                 one durable push per id (payload = the id)
//! - `batch ID...`                one batch push of every id
//! - `claim-then ACTION [LEASE_MS]` claim one job, then ACTION: ack, retry, bury, release,
//!   heartbeat-ack (heartbeat, then ack), hold (die by SIGKILL holding the lease)
//! - `reclaim`                    take back the claims of dead or expired claimers
//! - `recover`                    what a restarting runner does: open, reclaim, collect garbage
//! - `worker LEASE_MS WORK_MS IDLE_EXIT_MS RETRY_PCT` claim and work until idle that long
//! - `producer PREFIX N [PAUSE_MS]` push N jobs PREFIX-0 … PREFIX-(N-1), pausing between pushes
//! - `drain [SECS]`               claim and acknowledge everything (the final, fault-free drain)
//!
//! It never logs through `write(2)` (no tracing subscriber is installed), so that fault injection
//! on `write` only ever hits the store's own writes.

use std::time::{Duration, Instant};

use jobspool::store::Store;
use jobspool::{JobId, NewJob};
use torture::history::{Entry, F, Recorder, Ty};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: torture-op QUEUE PROC OP [ARGS...]");
        std::process::exit(2);
    }
    let (queue, p, op, rest) = (&args[0], &args[1], args[2].as_str(), &args[3..]);
    let rec = Recorder::inherited(1, p);
    let code = match run(queue, &rec, op, rest) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("torture-op: {e}");
            3
        }
    };
    std::process::exit(code);
}

/// A queue directory or a Redis URL: the operations are the store's, whichever it is.
fn open(queue: &str) -> jobspool::Result<std::sync::Arc<dyn Store>> {
    jobspool::store::open(queue, false)
}

fn push_one(store: &dyn Store, rec: &Recorder, id: &str) -> bool {
    rec.log(Ty::Invoke, F::Push, id, "");
    let job = JobId::new(id).map(|jid| NewJob::new(id.as_bytes().to_vec()).id(jid));
    match job.and_then(|j| store.push(&j)) {
        Ok(_) => {
            rec.log(Ty::Ok, F::Push, id, "");
            true
        }
        Err(e) => {
            rec.record(&Entry::new(&rec.p, Ty::Fail, F::Push).job(id).err(e));
            false
        }
    }
}

fn claim(store: &dyn Store, rec: &Recorder, lease: Duration) -> Result<Option<jobspool::Claim>, ()> {
    rec.log(Ty::Invoke, F::Claim, "", "");
    match store.claim(lease) {
        Ok(Some(c)) => {
            rec.log(Ty::Ok, F::Claim, c.lease.id.as_str(), &c.lease.token);
            Ok(Some(c))
        }
        Ok(None) => {
            rec.log(Ty::Ok, F::Claim, "", "");
            Ok(None)
        }
        Err(e) => {
            rec.record(&Entry::new(&rec.p, Ty::Fail, F::Claim).err(e));
            Err(())
        }
    }
}

fn transition(store: &dyn Store, rec: &Recorder, f: F, lease: &jobspool::Lease) -> bool {
    let id = lease.id.as_str();
    rec.log(Ty::Invoke, f, id, &lease.token);
    let r = match f {
        F::Ack => store.ack(lease),
        F::Retry => store.retry(lease, Duration::ZERO),
        F::Bury => store.bury(lease, "buried by torture"),
        F::Release => store.release(lease),
        F::Heartbeat => store.heartbeat(lease),
        _ => unreachable!(),
    };
    match r {
        Ok(()) => {
            rec.log(Ty::Ok, f, id, &lease.token);
            true
        }
        Err(e) => {
            rec.record(&Entry::new(&rec.p, Ty::Fail, f).job(id).lease(&lease.token).err(e));
            false
        }
    }
}

fn reclaim(store: &dyn Store, rec: &Recorder) -> bool {
    rec.log(Ty::Invoke, F::Reclaim, "", "");
    match store.reclaim(1_000_000) {
        Ok(v) => {
            let mut e = Entry::new(&rec.p, Ty::Ok, F::Reclaim);
            e.leases = v.into_iter().map(|r| r.old_token).collect();
            rec.record(&e);
            true
        }
        Err(e) => {
            rec.record(&Entry::new(&rec.p, Ty::Fail, F::Reclaim).err(e));
            false
        }
    }
}

fn num(rest: &[String], i: usize, default: u64) -> u64 {
    rest.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn run(queue: &str, rec: &Recorder, op: &str, rest: &[String]) -> jobspool::Result<i32> {
    match op {
        "push" => {
            let store = open(queue)?;
            let mut ok = true;
            for id in rest {
                ok &= push_one(&*store, rec, id);
            }
            Ok(if ok { 0 } else { 1 })
        }
        "batch" => {
            let store = open(queue)?;
            let subs: Vec<Recorder> = (0..rest.len())
                .map(|i| Recorder::inherited(1, &format!("{}#{i}", rec.p)))
                .collect();
            let mut jobs = Vec::new();
            for (id, r) in rest.iter().zip(&subs) {
                r.log(Ty::Invoke, F::Push, id, "");
                jobs.push(NewJob::new(id.as_bytes().to_vec()).id(JobId::new(id)?));
            }
            match store.push_batch(&jobs) {
                Ok(_) => {
                    for (id, r) in rest.iter().zip(&subs) {
                        r.log(Ty::Ok, F::Push, id, "");
                    }
                    Ok(0)
                }
                Err(e) => {
                    for (id, r) in rest.iter().zip(&subs) {
                        r.record(&Entry::new(&r.p, Ty::Fail, F::Push).job(id).err(&e));
                    }
                    Ok(1)
                }
            }
        }
        "claim-then" => {
            let store = open(queue)?;
            let action = rest.first().map(String::as_str).unwrap_or("ack");
            let lease = Duration::from_millis(num(rest, 1, 30_000));
            let Ok(Some(c)) = claim(&*store, rec, lease) else {
                return Ok(1);
            };
            let ok = match action {
                "ack" => transition(&*store, rec, F::Ack, &c.lease),
                "retry" => transition(&*store, rec, F::Retry, &c.lease),
                "bury" => transition(&*store, rec, F::Bury, &c.lease),
                "release" => transition(&*store, rec, F::Release, &c.lease),
                // Dies by SIGKILL while holding the lease (sets up a claim of a dead runner).
                "hold" => {
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                    false
                }
                "heartbeat-ack" => {
                    transition(&*store, rec, F::Heartbeat, &c.lease) && transition(&*store, rec, F::Ack, &c.lease)
                }
                other => return Err(jobspool::Error::Invalid(format!("unknown action {other}"))),
            };
            Ok(if ok { 0 } else { 1 })
        }
        "reclaim" => {
            let store = open(queue)?;
            Ok(if reclaim(&*store, rec) { 0 } else { 1 })
        }
        "recover" => {
            let store = open(queue)?;
            let ok = reclaim(&*store, rec);
            let gc = store.collect_garbage().is_ok();
            // A runner that exits cleanly withdraws its registration.
            let _ = store.retire();
            Ok(if ok && gc { 0 } else { 1 })
        }
        "worker" => {
            let store = open(queue)?;
            let lease = Duration::from_millis(num(rest, 0, 1000));
            let work = Duration::from_millis(num(rest, 1, 5));
            let idle_exit = Duration::from_millis(num(rest, 2, 2000));
            let retry_pct = num(rest, 3, 0);
            let mut idle_since = Instant::now();
            let mut n = 0u64;
            loop {
                n += 1;
                if n % 8 == 0 {
                    reclaim(&*store, rec);
                }
                match claim(&*store, rec, lease) {
                    Ok(Some(c)) => {
                        idle_since = Instant::now();
                        std::thread::sleep(work / 2);
                        if !transition(&*store, rec, F::Heartbeat, &c.lease) {
                            continue;
                        }
                        std::thread::sleep(work / 2);
                        if fastrand::u64(0..100) < retry_pct {
                            transition(&*store, rec, F::Retry, &c.lease);
                        } else {
                            transition(&*store, rec, F::Ack, &c.lease);
                        }
                    }
                    Ok(None) => {
                        if idle_since.elapsed() > idle_exit {
                            return Ok(0);
                        }
                        reclaim(&*store, rec);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(()) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        "drain" => {
            torture::drain_queue(std::path::Path::new(queue), rec, Duration::from_secs(num(rest, 0, 120)));
            Ok(0)
        }
        "producer" => {
            let store = open(queue)?;
            let prefix = rest.first().cloned().unwrap_or_else(|| "job".into());
            let n = num(rest, 1, 10);
            let pause = Duration::from_millis(num(rest, 2, 0));
            for i in 0..n {
                if !push_one(&*store, rec, &format!("{prefix}-{i}")) {
                    // A full disk: do not flood the history.
                    std::thread::sleep(Duration::from_millis(10));
                }
                std::thread::sleep(pause);
            }
            Ok(0)
        }
        other => Err(jobspool::Error::Invalid(format!("unknown op {other}"))),
    }
}
