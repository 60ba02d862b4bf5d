//! Scenario 8: a queue shared by a group. Producers under two uids (umask 077 and 022) and
//! workers under a third push and work at the same time, some killed along the way; every
//! operation is in the history. Zero permission errors, and the history check must pass. Then
//! layouts that break sharing (sticky bit, wrong group, a folder without group write) must be
//! reported by `jobspool doctor` with the fix.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Figures;
use crate::history::F;
use crate::{Env, Run};

const GROUP: u32 = 47_100;

fn as_user(env: &Env, run: &mut Run, uid: u32, umask: u32, args: &[String]) -> (String, std::process::Child) {
    let p = run.label(&format!("u{uid}-"));
    let mut c = Command::new(&env.op);
    c.arg(&run.queue)
        .arg(&p)
        .args(args)
        .uid(uid)
        .gid(GROUP)
        .stdin(Stdio::null())
        .stdout(run.history_out())
        .stderr(Stdio::piped());
    // SAFETY: umask is async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            nix::libc::umask(umask as nix::libc::mode_t);
            Ok(())
        });
    }
    (p, c.spawn().expect("spawn"))
}

/// Scenario 8.
pub fn multi_user(env: &Env) -> Figures {
    let mut figs = Figures::new("multi-user");
    if !crate::is_root() {
        figs.skipped = Some("needs root to run processes under other uids".into());
        return figs;
    }
    let mut run = Run::new(None);
    std::fs::set_permissions(run.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    jobspool::store::dir::init(
        &run.queue,
        &jobspool::store::dir::InitOptions {
            group: Some(GROUP.to_string()),
            mode: Some(0o660),
        },
    )
    .unwrap();
    let per = if env.long { 2000 } else { 150 };
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(as_user(
            env,
            &mut run,
            47_102,
            0o077,
            &["worker", "2000", "2", "3600000", "10"].map(String::from),
        ));
    }
    let mut producers = Vec::new();
    for (uid, umask) in [(47_101, 0o077), (47_103, 0o022)] {
        for k in 0..2 {
            let prefix = format!("u{uid}k{k}");
            producers.push(as_user(
                env,
                &mut run,
                uid,
                umask,
                &["producer".into(), prefix, per.to_string()],
            ));
        }
    }
    let mut stderr_all = String::new();
    let start = Instant::now();
    // Kill one worker mid-way and start another under the same uid.
    std::thread::sleep(Duration::from_millis(300));
    let (p, mut c) = workers.remove(0);
    let _ = c.kill();
    let _ = c.wait();
    run.info(&p, F::Kill);
    figs.faults += 1;
    workers.push(as_user(
        env,
        &mut run,
        47_102,
        0o022,
        &["worker", "2000", "2", "3600000", "10"].map(String::from),
    ));
    for (p, c) in producers {
        let o = c.wait_with_output().unwrap();
        stderr_all += &String::from_utf8_lossy(&o.stderr);
        run.ended(&p, o.status);
    }
    // Let the workers finish the backlog, then stop them.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let s = jobspool::store::dir::DirStore::open(&run.queue, false).unwrap();
        use jobspool::store::Store;
        if s.idle().map(|i| i.is_idle()).unwrap_or(false) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (p, mut c) in workers {
        let _ = c.kill();
        let o = c.wait_with_output().unwrap();
        stderr_all += &String::from_utf8_lossy(&o.stderr);
        run.info(&p, F::Kill);
    }
    let fin = run.drain(Duration::from_secs(30));
    let r = run.check(&fin);
    let (h, _) = crate::history::read(&run.history).unwrap();
    let denied: Vec<&str> = h
        .iter()
        .filter(|e| e.err.contains("ermission") || e.err.contains("EACCES") || e.err.contains("EPERM"))
        .map(|e| e.err.as_str())
        .collect();
    for d in denied.iter().take(5) {
        figs.violation("permissions", d);
    }
    if stderr_all.contains("ermission") {
        figs.violation(
            "permissions",
            stderr_all.lines().find(|l| l.contains("ermission")).unwrap_or(""),
        );
    }
    if fin.quarantined > 0 {
        figs.violation("permissions", format!("{} entries quarantined", fin.quarantined));
    }
    figs.add_run("multi-user", &r);
    figs.notes.push(format!(
        "producers uid 47101 (umask 077) and 47103 (umask 022), workers uid 47102 (umask 077, then 022), group {GROUP}: {} pushes, {} deliveries, {} permission errors in {:.1}s",
        r.pushes_ok,
        r.deliveries,
        denied.len(),
        start.elapsed().as_secs_f64()
    ));
    // Layouts that break sharing, each reported by doctor with its fix.
    let qs = run.queue.to_str().unwrap().to_string();
    let doctor = |what: &str, figs: &mut Figures, expect_problem: bool, needle: &str| {
        let o = Command::new(&env.jobspool).args(["doctor", &qs]).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        figs.cases += 1;
        let code = o.status.code();
        if expect_problem && (code != Some(1) || !out.contains(needle)) {
            figs.violation(
                &format!("doctor: {what}"),
                format!("exit {code:?}, no {needle:?} in: {out}"),
            );
        } else if !expect_problem && code != Some(0) {
            figs.violation(
                &format!("doctor: {what}"),
                format!("exit {code:?} on a good layout: {out}"),
            );
        } else if expect_problem {
            let fix = out
                .lines()
                .find(|l| l.contains(needle))
                .unwrap_or("")
                .trim()
                .to_string();
            figs.notes.push(format!("doctor on {what}: {fix}"));
        }
    };
    // Killed workers are still registered until a runner's garbage collection: do one.
    run.op(env, None, &["recover"]);
    doctor("the shared layout", &mut figs, false, "");
    let ready = run.queue.join("ready");
    std::fs::set_permissions(&ready, std::fs::Permissions::from_mode(0o3770)).unwrap();
    doctor("a sticky ready/", &mut figs, true, "chmod -t");
    std::fs::set_permissions(&ready, std::fs::Permissions::from_mode(0o2770)).unwrap();
    let _ = nix::unistd::chown(
        &run.queue.join("running"),
        None,
        Some(nix::unistd::Gid::from_raw(47_999)),
    );
    doctor("running/ of the wrong group", &mut figs, true, "fix with");
    let _ = nix::unistd::chown(
        &run.queue.join("running"),
        None,
        Some(nix::unistd::Gid::from_raw(GROUP)),
    );
    std::fs::set_permissions(run.queue.join("tmp"), std::fs::Permissions::from_mode(0o2750)).unwrap();
    doctor("tmp/ without group write", &mut figs, true, "fix with");
    figs
}
