//! Scenario 9: hostile ids and commands — `../x`, absolute paths, NUL, very long ids, shell
//! metacharacters in argv — through the real `jobspool` command, every run traced by `strace`:
//! each is rejected or used literally, and no file outside the queue is created, written,
//! renamed or removed.
//!
//! Scenario 10 (poison jobs) is here too: a handler that kills its runner every time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Figures;
use crate::{Env, entries};

/// System calls that change the file system, and how to find their path arguments.
const MUTATING: [&str; 14] = [
    "openat",
    "open",
    "creat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "link",
    "linkat",
    "symlinkat",
    "utimensat",
];

/// Reads an strace log and returns the calls that touched a path outside `root`: absolute
/// paths outside it, and relative names with a `/` or `..` in them (the store only ever names
/// entries of its own folders). Read-only opens outside (the dynamic loader, /proc) are fine.
fn outside_touches(log: &str, root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().to_string();
    let mut bad = Vec::new();
    for line in log.lines() {
        let line = line.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
        let Some(name) = line.split('(').next() else { continue };
        if !MUTATING.contains(&name) {
            continue;
        }
        if (name == "openat" || name == "open")
            && !(line.contains("O_CREAT") || line.contains("O_WRONLY") || line.contains("O_RDWR"))
        {
            continue;
        }
        if name == "utimensat" && line.contains("(AT_FDCWD, NULL") {
            continue;
        }
        // Every quoted string is a path argument for these calls.
        let mut rest = line;
        while let Some(start) = rest.find('"') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('"') else { break };
            let path = &after[..end];
            rest = &after[end + 1..];
            let outside = if path.starts_with('/') {
                !path.starts_with(&root) && !path.starts_with("/dev/null") && !path.starts_with("/proc/")
            } else {
                path.contains("..") || (path.contains('/') && !line.contains("AT_FDCWD"))
            };
            if outside {
                bad.push(line.to_string());
                break;
            }
        }
    }
    bad
}

fn traced(jb: &Path, log: &Path, args: &[&str]) -> std::process::Output {
    Command::new("strace")
        .args(["-f", "-qq", "-s", "4096", "-o"])
        .arg(log)
        .args(["-e", "trace=%file,utimensat"])
        .arg(jb)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Scenario 9.
pub fn hostile(env: &Env) -> Figures {
    let mut figs = Figures::new("hostile-ids-and-commands");
    if !crate::have_strace() {
        figs.skipped = Some("strace is not installed".into());
        return figs;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    let qs = q.to_str().unwrap().to_string();
    let jb = &env.jobspool;
    let canary = dir.path().join("x");
    std::fs::write(&canary, b"canary").unwrap();
    init_queue(jb, &qs);
    let log = dir.path().join("strace.log");
    let long = "a".repeat(300);
    let very_long = "b".repeat(5000);
    let ids: Vec<String> = vec![
        "../x".into(),
        "../../x".into(),
        "a/../../x".into(),
        "/etc/passwd".into(),
        canary.to_string_lossy().into_owned(),
        "..".into(),
        ".".into(),
        "".into(),
        "a/b".into(),
        "x\ny".into(),
        "-rf".into(),
        "--payload".into(),
        "$(touch PWNED)".into(),
        "`touch PWNED`".into(),
        "; touch PWNED".into(),
        "a b".into(),
        "*".into(),
        long.clone(),
        very_long,
        "ok-id".into(),
    ];
    let mut rejected = 0;
    let mut accepted = Vec::new();
    let check_log = |figs: &mut Figures, what: &str| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        for b in outside_touches(&text, &q) {
            figs.violation(what, format!("touched outside the queue: {b}"));
        }
    };
    for id in &ids {
        let o = traced(jb, &log, &["push", &qs, "--id", id, "--payload", "p"]);
        figs.cases += 1;
        if o.status.success() {
            accepted.push(id.clone());
        } else {
            rejected += 1;
            if o.status.code() != Some(2) {
                figs.violation(
                    &format!("push --id {id:.40?}"),
                    format!("exit {} (want 2 for bad input)", o.status),
                );
            }
        }
        check_log(&mut figs, &format!("push --id {id:.40?}"));
        for cmd in [
            vec!["show", &qs, id.as_str()],
            vec!["rm", &qs, id.as_str()],
            vec!["logs", &qs, id.as_str()],
            vec!["retry", &qs, id.as_str()],
        ] {
            if id == "ok-id" && cmd[0] == "rm" {
                continue;
            }
            let _ = traced(jb, &log, &cmd);
            figs.cases += 1;
            check_log(&mut figs, &format!("{} {id:.40?}", cmd[0]));
        }
    }
    // NUL cannot pass through argv; through the library it must be refused.
    if jobspool::JobId::new("x\0y").is_ok() {
        figs.violation("library", "an id with a NUL was accepted");
    }
    figs.notes.push(format!(
        "{} ids tried: {} rejected with exit 2, accepted literally: {:?}",
        ids.len(),
        rejected,
        accepted.iter().map(|a| format!("{a:.20}")).collect::<Vec<_>>()
    ));
    // Shell metacharacters in a job's own argv and in the handler's: passed literally.
    let nasty: Vec<&str> = vec![
        "; touch PWNED",
        "$(touch PWNED)",
        "`touch PWNED`",
        "a b\tc",
        "*",
        "'\"",
        "\\n",
        "--help",
        "../../x",
        "& touch PWNED &",
        "| touch PWNED",
        "> PWNED",
    ];
    let mut args = vec![
        "push",
        &qs,
        "--id",
        "cmdjob",
        "--payload",
        "x",
        "--",
        "/usr/bin/printf",
        "%s\\n",
    ];
    args.extend(nasty.iter().copied());
    let o = traced(jb, &log, &args);
    if !o.status.success() {
        figs.violation("push -- CMD", String::from_utf8_lossy(&o.stderr).to_string());
    }
    check_log(&mut figs, "push -- CMD");
    let mut run_args = vec![
        "run",
        &qs,
        "--drain",
        "--allow-job-commands",
        "-j",
        "1",
        "--",
        "/usr/bin/printf",
        "%s\\n",
    ];
    run_args.extend(nasty.iter().copied());
    let o = Command::new("strace")
        .args(["-f", "-qq", "-s", "4096", "-o"])
        .arg(&log)
        .args(["-e", "trace=%file,utimensat"])
        .arg(jb)
        .args(&run_args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    figs.cases += 2;
    // The handler (printf) is not the queue: only the runner's own calls are checked, so
    // filter the handler's pids out by looking only at calls the runner can make; printf
    // writes to stdout only, so any call naming PWNED or outside paths is a violation.
    check_log(&mut figs, "run --allow-job-commands");
    let want: String = nasty.iter().map(|a| format!("{a}\n")).collect();
    for id in ["cmdjob", "ok-id"] {
        let log_text = std::fs::read_to_string(q.join("logs").join(format!("{id}.log"))).unwrap_or_default();
        if !log_text.contains(&want) {
            figs.violation(
                &format!("argv of {id}"),
                format!(
                    "not passed literally; log: {log_text:?} (run: {})",
                    String::from_utf8_lossy(&o.stderr)
                ),
            );
        }
    }
    for place in [dir.path().to_path_buf(), std::env::current_dir().unwrap(), q.clone()] {
        if place.join("PWNED").exists() {
            figs.violation("shell", format!("{} was created", place.join("PWNED").display()));
        }
    }
    if std::fs::read(&canary).ok().as_deref() != Some(&b"canary"[..]) {
        figs.violation("canary", "the file next to the queue was changed or removed");
    }
    figs.notes.push(format!(
        "{} metacharacter arguments passed literally to a job's own command and to the handler; canary and PWNED checks done",
        nasty.len()
    ));
    figs
}

/// Scenario 10: a handler that kills its runner (SIGKILL to its parent) every time. A supervisor
/// restarts the runner; the poison job must end dead after max attempts, every other job done.
pub fn poison(env: &Env) -> Figures {
    let mut figs = Figures::new("poison-jobs");
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    let qs = q.to_str().unwrap().to_string();
    let jb = &env.jobspool;
    init_queue(jb, &qs);
    let max_attempts = 3u32;
    let n_good = if env.long { 200 } else { 20 };
    let mut batch = Command::new(jb)
        .args(["push", &qs, "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = batch.stdin.take().unwrap();
        for i in 0..n_good {
            writeln!(input, "good {i}").unwrap();
        }
    }
    assert!(batch.wait().unwrap().success());
    let st = Command::new(jb)
        .args(["push", &qs, "--id", "poison", "--priority", "9", "--payload", "poison"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let done = dir.path().join("done");
    let script = format!(
        "p=$(cat); if [ \"$p\" = poison ]; then kill -9 $PPID; sleep 5; fi; echo \"$p\" >> {}",
        done.display()
    );
    let start = Instant::now();
    let mut restarts = 0;
    loop {
        let o = Command::new(jb)
            .args([
                "run",
                &qs,
                "--drain",
                "-j",
                "2",
                "--max-attempts",
                &max_attempts.to_string(),
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        if o.status.signal() == Some(9) {
            restarts += 1;
            figs.faults += 1;
            if restarts > 20 || start.elapsed() > Duration::from_secs(120) {
                figs.violation("poison", format!("still killing runners after {restarts} restarts"));
                break;
            }
            continue;
        }
        // Drained: exit 1 because a job went dead.
        if o.status.code() != Some(1) {
            figs.violation("run --drain", format!("exited {} (want 1: a job is dead)", o.status));
        }
        break;
    }
    figs.cases = 1;
    let ls = Command::new(jb)
        .args(["ls", &qs, "--state", "dead", "--json"])
        .output()
        .unwrap();
    let dead = String::from_utf8_lossy(&ls.stdout).to_string();
    if dead.lines().count() != 1 || !dead.contains("\"poison\"") {
        figs.violation("dead", format!("dead jobs: {dead}"));
    }
    let show = Command::new(jb).args(["show", &qs, "poison"]).output().unwrap();
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    let ran = std::fs::read_to_string(&done).unwrap_or_default();
    let partial = ran.lines().filter(|l| !l.starts_with("good ")).count();
    if partial > 0 {
        figs.violation("payload", format!("{partial} handlers ran on a partial payload"));
    }
    let unique: std::collections::HashSet<&str> = ran.lines().filter(|l| l.starts_with("good ")).collect();
    if unique.len() != n_good {
        figs.violation(
            "the rest",
            format!("{} of {n_good} good jobs ran: {unique:?}", unique.len()),
        );
    }
    // A good job on the other slot when the poison killed the runner runs again: a duplicate
    // whose cause is the runner's death (at most one per kill, with -j 2).
    let dups = ran.lines().count() - partial - unique.len();
    *figs
        .report
        .duplicates
        .entry(crate::checker::Cause::RunnerKilled)
        .or_default() += dups as u64;
    if dups > restarts {
        figs.violation(
            "duplicates",
            format!("{dups} duplicate runs for {restarts} runner deaths"),
        );
    }
    if restarts != max_attempts as usize {
        figs.violation(
            "attempts",
            format!("the runner was killed {restarts} times, max attempts is {max_attempts}"),
        );
    }
    let left: usize = ["ready", "running"].iter().map(|f| entries(&q, f).len()).sum();
    if left != 0 {
        figs.violation("drain", format!("{left} jobs left"));
    }
    let reason = show
        .lines()
        .find(|l| l.contains("runner died") || l.contains("reason"))
        .unwrap_or("")
        .trim()
        .to_string();
    figs.notes.push(format!(
        "max attempts {max_attempts}: runner killed {restarts} times, then the poison job was dead ({reason}); {} of {n_good} other jobs done ({dups} run twice: on the other slot of a killed runner); {:.1}s",
        unique.len(),
        start.elapsed().as_secs_f64()
    ));
    figs
}

/// Creates a queue with the real `jobspool init`.
fn init_queue(jobspool: &std::path::Path, queue: &str) {
    let st = Command::new(jobspool)
        .args(["init", queue])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "jobspool init {queue} failed");
}
