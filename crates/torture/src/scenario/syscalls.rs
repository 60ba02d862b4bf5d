//! Scenarios 1 and 2: a kill, or an I/O error, at every file-system system call of every
//! operation, injected by `strace` into a real process; then recovery, a fault-free drain and the
//! history check.

use std::time::Duration;

use super::Figures;
use crate::{Env, Run, age_tmp, count_syscalls, entries};

/// The system calls the store makes on the queue (writes to the history use `writev`, which is
/// never in this set).
pub const FS_SYSCALLS: &str = "openat,read,write,pread64,fsync,fdatasync,syncfs,rename,renameat,renameat2,link,linkat,unlink,unlinkat,utimensat,fchmod,mkdirat,getdents64,flock,newfstatat,statx,fstat,lseek,close";

/// The calls an I/O error is injected into.
pub const ERROR_SYSCALLS: [&str; 7] = [
    "openat",
    "write",
    "fsync",
    "syncfs",
    "renameat2",
    "unlinkat",
    "utimensat",
];

/// The errors injected.
pub const ERRNOS: [&str; 5] = ["EIO", "ENOSPC", "EDQUOT", "EACCES", "EROFS"];

type Setup<'a> = Box<dyn Fn(&mut Run) + 'a>;

/// One operation to fault: a name, how to prepare the queue, and `torture-op` arguments.
struct Case<'a> {
    name: &'static str,
    setup: Setup<'a>,
    args: Vec<&'static str>,
}

fn one(env: &Env) -> Setup<'_> {
    Box::new(move |r: &mut Run| {
        r.op(env, None, &["push", "j1", "j2"]);
    })
}

fn held(env: &Env) -> Setup<'_> {
    Box::new(move |r: &mut Run| {
        r.op(env, None, &["push", "j1", "j2"]);
        r.op(env, None, &["claim-then", "hold"]);
        // The leftover of a push that crashed after writing its temp file.
        std::fs::write(r.queue.join("tmp").join("j9.4242.0123abcd"), b"JOBSPOOL 1\nid j9\n").unwrap();
        age_tmp(&r.queue);
    })
}

fn cases(env: &Env) -> Vec<Case<'_>> {
    vec![
        Case {
            name: "push",
            setup: Box::new(|_| {}),
            args: vec!["push", "p1"],
        },
        Case {
            name: "batch",
            setup: Box::new(|_| {}),
            args: vec!["batch", "b1", "b2", "b3"],
        },
        Case {
            name: "claim+ack",
            setup: one(env),
            args: vec!["claim-then", "ack"],
        },
        Case {
            name: "claim+heartbeat+ack",
            setup: one(env),
            args: vec!["claim-then", "heartbeat-ack"],
        },
        Case {
            name: "claim+retry",
            setup: one(env),
            args: vec!["claim-then", "retry"],
        },
        Case {
            name: "claim+bury",
            setup: one(env),
            args: vec!["claim-then", "bury"],
        },
        Case {
            name: "reclaim",
            setup: held(env),
            args: vec!["reclaim"],
        },
        Case {
            name: "recovery",
            setup: held(env),
            args: vec!["recover"],
        },
    ]
}

/// After a faulted run: what a restarting runner does (reclaim, garbage collection of leftovers
/// old enough), then checks that nothing is left in `tmp/`.
fn recover(env: &Env, run: &mut Run, figs: &mut Figures, case: &str) {
    age_tmp(&run.queue);
    let o = run.op(env, None, &["recover"]);
    if !o.status.success() {
        figs.violation(case, format!("recovery failed: {}", o.stderr.trim()));
    }
    let left = entries(&run.queue, "tmp");
    if !left.is_empty() {
        figs.violation(case, format!("temp files left after recovery: {left:?}"));
    }
}

fn finish(run: &Run, figs: &mut Figures, case: &str, unreadable_expected: bool) {
    let mut fin = run.drain(Duration::from_secs(30));
    if unreadable_expected {
        // EACCES on opening a job file is what a job the runner may not read looks like: it is
        // quarantined as "unreadable", with the fix in the log (by design, FAILURE-MODES 25).
        for (reason, id) in crate::quarantined(&run.queue) {
            if reason == "unreadable" {
                fin.reported.insert(id);
                fin.quarantined -= 1;
            }
        }
    }
    if fin.quarantined > 0 {
        figs.violation(
            case,
            format!(
                "{} entries quarantined: something partial became visible",
                fin.quarantined
            ),
        );
    }
    let r = run.check(&fin);
    figs.add_run(case, &r);
}

/// Which invocations to fault: every one in the long form; in the short form a seeded sample of
/// at most `short` per operation, always including the first and the last.
fn plan(env: &Env, counts: &[(String, u64)], short: usize, salt: u64) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = Vec::new();
    for (sc, n) in counts {
        for k in 1..=*n {
            all.push((sc.clone(), k));
        }
    }
    if env.long || all.len() <= short {
        return all;
    }
    let mut rng = fastrand::Rng::with_seed(env.seed ^ salt);
    let mut pick: Vec<(String, u64)> = Vec::new();
    for (sc, n) in counts {
        pick.push((sc.clone(), *n));
    }
    while pick.len() < short {
        let c = all[rng.usize(0..all.len())].clone();
        if !pick.contains(&c) {
            pick.push(c);
        }
    }
    pick
}

fn sorted(counts: std::collections::HashMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort();
    v
}

/// Scenario 1: SIGKILL on entry to the k-th call of each file-system system call, for every k,
/// for every operation (push, batch push, claim, heartbeat, ack, retry, bury, reclaim and the
/// recovery path itself). Then recovery, a fault-free drain, and the history check.
pub fn kill_at_every_syscall(env: &Env) -> Figures {
    let mut figs = Figures::new("kill-at-every-syscall");
    if !crate::have_strace() {
        figs.skipped = Some("strace is not installed".into());
        return figs;
    }
    for (i, case) in cases(env).iter().enumerate() {
        let counts = sorted(count_syscalls(env, FS_SYSCALLS, &*case.setup, &case.args));
        let total: u64 = counts.iter().map(|c| c.1).sum();
        let plan = plan(env, &counts, 12, i as u64);
        figs.notes.push(format!(
            "{}: {} file-system calls in an unfaulted run ({}); {} killed runs",
            case.name,
            total,
            counts
                .iter()
                .map(|(s, n)| format!("{s}={n}"))
                .collect::<Vec<_>>()
                .join(" "),
            plan.len()
        ));
        for (sc, k) in plan {
            let label = format!("{} kill at {sc}#{k}", case.name);
            let mut run = Run::new(None);
            (case.setup)(&mut run);
            let o = run.op(env, Some((&sc, &format!("{sc}:signal=KILL:when={k}"))), &case.args);
            if o.killed() {
                figs.faults += 1;
            }
            recover(env, &mut run, &mut figs, &label);
            finish(&run, &mut figs, &label, false);
        }
    }
    figs
}

/// Scenario 2: each of EIO, ENOSPC, EDQUOT, EACCES and EROFS returned by the k-th call of
/// open, write, fsync, syncfs, rename, unlink and utimensat — once, and from then on — for every
/// operation. No success may be reported for a push whose fsync failed, nothing partial may
/// become visible, and no temp file may be left after recovery.
pub fn io_errors(env: &Env) -> Figures {
    let mut figs = Figures::new("io-errors");
    if !crate::have_strace() {
        figs.skipped = Some("strace is not installed".into());
        return figs;
    }
    let mut failed_cleanly = 0u64;
    let mut tmp_left_before_recovery = 0u64;
    for (i, case) in cases(env).iter().enumerate() {
        let counts = sorted(count_syscalls(env, &ERROR_SYSCALLS.join(","), &*case.setup, &case.args));
        let plan = plan(env, &counts, 6, 100 + i as u64);
        let mut runs = 0;
        for (sc, k) in &plan {
            for (j, errno) in ERRNOS.iter().enumerate() {
                for sticky in [false, true] {
                    // The short form takes one errno per call, rotating, and both modes.
                    if !env.long && (j as u64 + *k) % ERRNOS.len() as u64 != 0 {
                        continue;
                    }
                    let when = if sticky { format!("{k}+") } else { k.to_string() };
                    let label = format!(
                        "{} {errno} at {sc}#{k}{}",
                        case.name,
                        if sticky { " and after" } else { "" }
                    );
                    let mut run = Run::new(None);
                    (case.setup)(&mut run);
                    let log = run.dir.path().join("inject.log");
                    let o = run.op_logged(env, sc, &format!("{sc}:error={errno}:when={when}"), &log, &case.args);
                    runs += 1;
                    let injected = std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| l.contains("(INJECTED)"))
                        .map(|l| l.to_string())
                        .collect::<Vec<_>>();
                    figs.faults += injected.len() as u64;
                    let (h, _) = crate::history::read(&run.history).unwrap();
                    let pushed_ok = h.iter().any(|e| {
                        e.p.starts_with(&o.p) && e.f == crate::history::F::Push && e.ty == crate::history::Ty::Ok
                    });
                    let sync_failed = injected.iter().any(|l| {
                        l.starts_with("fsync")
                            || l.starts_with("syncfs")
                            || l.contains(" fsync(")
                            || l.contains(" syncfs(")
                    });
                    if pushed_ok && sync_failed && (case.name == "push" || case.name == "batch") {
                        figs.violation(&label, "a push reported success although its fsync failed");
                    }
                    if !o.status.success() {
                        failed_cleanly += 1;
                    }
                    if (case.name == "push" || case.name == "batch") && !entries(&run.queue, "tmp").is_empty() {
                        tmp_left_before_recovery += 1;
                    }
                    recover(env, &mut run, &mut figs, &label);
                    finish(&run, &mut figs, &label, *errno == "EACCES" && sc == "openat");
                }
            }
        }
        figs.notes.push(format!(
            "{}: {} calls faultable ({}); {} faulted runs",
            case.name,
            counts.iter().map(|c| c.1).sum::<u64>(),
            counts
                .iter()
                .map(|(s, n)| format!("{s}={n}"))
                .collect::<Vec<_>>()
                .join(" "),
            runs
        ));
    }
    figs.notes.push(format!(
        "operations that reported an error: {failed_cleanly}; failed pushes that left a temp file until recovery (their cleanup itself faulted): {tmp_left_before_recovery}"
    ));
    figs
}
