//! The runner as users run it: real `jobspool` processes, real handler processes, real signals.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const LONG: Duration = Duration::from_secs(60);

fn q_str(q: &std::path::Path) -> &str {
    q.to_str().unwrap()
}

#[test]
fn the_exit_code_contract_then_retry_then_success() {
    let (d, q) = queue();
    let qs = q_str(&q);
    // "flaky" fails until this file exists: then a retry of the dead job succeeds.
    let fixed = d.path().join("fixed");
    let flaky_script = format!(
        "test -e {} && exit 0; echo attempt $JOBSPOOL_ATTEMPT; exit 3",
        fixed.display()
    );
    push(&q, &["--id", "ok", "--", "true"]);
    push(
        &q,
        &[
            "--id",
            "perm",
            "--max-attempts",
            "5",
            "--",
            "sh",
            "-c",
            "echo broken for good >&2; exit 100",
        ],
    );
    push(
        &q,
        &["--id", "flaky", "--max-attempts", "2", "--", "sh", "-c", &flaky_script],
    );
    push(
        &q,
        &["--id", "later", "--max-attempts", "3", "--", "sh", "-c", "exit 75"],
    );
    push(
        &q,
        &["--id", "sig", "--max-attempts", "1", "--", "sh", "-c", "kill -SEGV $$"],
    );
    let o = run(&[
        "run",
        qs,
        "-j",
        "2",
        "--drain",
        "--allow-job-commands",
        "--backoff",
        "200ms..400ms",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "dead jobs make --drain exit 1: {}",
        stderr(&o)
    );
    let s = stats(&q);
    assert_eq!(
        (s["ready"].as_u64(), s["running"].as_u64(), s["dead"].as_u64()),
        (Some(0), Some(0), Some(4))
    );

    let show = |id: &str| -> serde_json::Value {
        let o = run(&["show", qs, id, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let perm = show("perm");
    assert_eq!(perm["attempts"], 1, "exit 100 is dead at once");
    assert_eq!(
        perm["dead_reason"],
        "exit 100 (permanent failure) on attempt 1; last output: broken for good"
    );
    let flaky = show("flaky");
    assert_eq!(flaky["attempts"], 2);
    assert_eq!(
        flaky["dead_reason"],
        "exit 3 on attempt 2 of 2; no attempts left; last output: attempt 2"
    );
    assert_eq!(show("later")["attempts"], 3, "exit 75 retries until max attempts");
    assert!(
        show("sig")["dead_reason"]
            .as_str()
            .unwrap()
            .starts_with("killed by SIGSEGV on attempt 1 of 1")
    );

    // Backoff: attempt 2 of "flaky" started no earlier than the backoff's lower bound after
    // attempt 1 failed (half of 200ms, for the jitter).
    let history = flaky["history"].as_array().unwrap();
    let failed_at = history.iter().find(|e| e["kind"] == "failed").unwrap()["at"]
        .as_u64()
        .unwrap();
    let second = history.iter().filter(|e| e["kind"] == "started").nth(1).unwrap()["at"]
        .as_u64()
        .unwrap();
    assert!(second >= failed_at + 100, "retried after {}ms", second - failed_at);

    // The log has one header and one trailer per attempt, with the output between.
    let log = stdout(&run(&["logs", qs, "flaky"]));
    assert_eq!(log.matches("=== jobspool: attempt").count(), 2, "{log}");
    assert!(log.contains("attempt 1\n=== jobspool: exit 3 after"), "{log}");

    // Retry the dead: fresh attempts, history kept; a second retry is harmless.
    let o = run(&["retry", qs, "--all"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).lines().count(), 4);
    let o = run(&["retry", qs, "perm"]);
    assert!(o.status.success() && stderr(&o).contains("not dead"), "{}", stderr(&o));
    assert_eq!(show("flaky")["attempts"], 0);
    // Now run them with a runner whose handler ignores job commands... by allowing none:
    // job commands are refused without --allow-job-commands.
    let o = run(&["run", qs, "--drain", "--max-attempts", "1", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    let reason = show("flaky")["dead_reason"].as_str().unwrap().to_string();
    assert!(reason.contains("--allow-job-commands"), "{reason}");
    assert!(
        show("flaky")["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "revived")
    );

    // Retry then success: the cause is fixed, `jobspool retry` revives the dead job, and a runner
    // that runs job commands finishes it. The others stay dead.
    std::fs::write(&fixed, "").unwrap();
    let o = run(&["retry", qs, "flaky"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(show("flaky")["state"], "ready");
    let o = run(&["run", qs, "--drain", "--allow-job-commands"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "only the revived job ran, and it succeeded: {}",
        stderr(&o)
    );
    let flaky = show("flaky");
    assert_eq!(flaky["state"], "done", "{flaky}");
    let kinds: Vec<&str> = flaky["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    let revived = kinds.iter().rposition(|k| *k == "revived").expect("revived");
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
    assert!(revived < kinds.len() - 1, "{kinds:?}");
    let s = stats(&q);
    assert_eq!((s["ready"].as_u64(), s["dead"].as_u64()), (Some(0), Some(3)), "{s}");
}

#[test]
fn retried_jobs_succeed_and_payloads_round_trip_byte_exactly() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let payload: Vec<u8> = b"quotes ' \" newline\n nul \0 high \xff end".to_vec();
    let mut child = cmd(&["push", qs, "--id", "bin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&payload).unwrap();
    assert!(child.wait().unwrap().success());
    // Fails on attempt 1, succeeds on attempt 2, copying its payload out.
    let script = format!(
        "cat > {}/$JOBSPOOL_JOB_ID.$JOBSPOOL_ATTEMPT; [ $JOBSPOOL_ATTEMPT -ge 2 ]",
        out.display()
    );
    let o = run(&[
        "run",
        qs,
        "--drain",
        "--backoff",
        "50ms..100ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("bin.1")).unwrap(), payload);
    assert_eq!(std::fs::read(out.join("bin.2")).unwrap(), payload);
    let shown = run(&["show", qs, "bin", "--payload"]);
    assert_eq!(shown.status.code(), Some(2), "a done job is gone");
}

#[test]
fn claims_are_exclusive_between_runner_processes() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let record = d.path().join("runs");
    let lines: String = (0..300).map(|i| format!("{i}\n")).collect();
    let mut p = cmd(&["push", qs, "--batch"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    p.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    assert!(p.wait().unwrap().success());
    let script = format!("echo $JOBSPOOL_JOB_ID >> {}", record.display());
    let mut runners: Vec<_> = (0..3)
        .map(|_| spawn(&["run", qs, "-j", "2", "--drain", "--", "sh", "-c", &script]))
        .collect();
    for r in &mut runners {
        assert_eq!(wait_exit(r, LONG).and_then(|s| s.code()), Some(0));
    }
    let text = std::fs::read_to_string(&record).unwrap();
    let ids: Vec<&str> = text.lines().collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 300, "every job ran exactly once");
    assert_eq!(unique.len(), 300);
}

#[test]
fn kill_9_of_the_runner_loses_nothing_and_leaves_no_handler_behind() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let runs = d.path().join("runs");
    let done = d.path().join("done");
    let n = 30;
    for i in 0..n {
        push(&q, &["--id", &format!("j{i}"), "--payload", "x"]);
    }
    // Each handler leaves a grandchild too, which must die with it.
    let script = format!(
        "echo $JOBSPOOL_JOB_ID >> {runs}; sleep 30 & sleep 0.3; echo $JOBSPOOL_JOB_ID >> {done}",
        runs = runs.display(),
        done = done.display()
    );
    let mut kills = 0;
    for round in 0..4 {
        let mut r = spawn(&["run", qs, "-j", "3", "--max-attempts", "20", "--", "sh", "-c", &script]);
        wait_for("handlers to start", LONG, || count(&q, "running") > 0);
        std::thread::sleep(Duration::from_millis(150 + 100 * round));
        signal(&r, Signal::SIGKILL);
        r.wait().unwrap();
        kills += 1;
        // No handler (or its children) outlives the runner.
        wait_for("orphans to die", Duration::from_secs(10), || {
            processes_with_env(qs).is_empty()
        });
    }
    // A fresh runner reclaims the dead runners' claims at once and finishes everything.
    let o = run(&[
        "run",
        qs,
        "-j",
        "3",
        "--drain",
        "--max-attempts",
        "20",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    wait_for("orphans to die", Duration::from_secs(10), || {
        processes_with_env(qs).is_empty()
    });
    let done_text = std::fs::read_to_string(&done).unwrap();
    let finished: HashSet<&str> = done_text.lines().collect();
    assert_eq!(finished.len(), n, "every job finished");
    let runs_text = std::fs::read_to_string(&runs).unwrap();
    let mut starts: HashMap<&str, usize> = HashMap::new();
    for id in runs_text.lines() {
        *starts.entry(id).or_default() += 1;
    }
    let duplicates: usize = starts.values().map(|c| c - 1).sum();
    // A runner holds at most two claims per slot: the job its handler runs, and one whose
    // handler has ended while its outcome is still being recorded. Each kill can repeat those.
    assert!(
        duplicates <= kills * 2 * 3,
        "{duplicates} duplicate runs for {kills} kills of a 3-slot runner"
    );
    let s = stats(&q);
    assert_eq!(
        (s["ready"].as_u64(), s["running"].as_u64(), s["dead"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
}

#[test]
fn shutdown_survives_a_storm_of_other_signals_and_gives_jobs_back() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    push(&q, &["--id", "stubborn-1", "--payload", "x"]);
    push(&q, &["--id", "stubborn-2", "--payload", "x"]);
    // Handlers that ignore SIGTERM and would run for a minute.
    let mut r = spawn(&[
        "run",
        qs,
        "-j",
        "2",
        "--grace",
        "1s",
        "--",
        "sh",
        "-c",
        "trap '' TERM; sleep 60 & wait; sleep 60",
    ]);
    wait_for("both jobs to run", LONG, || count(&q, "running") == 2);
    let started = Instant::now();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGALRM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        signal(&r, sig);
    }
    let status = wait_exit(&mut r, Duration::from_secs(30)).expect("the runner must stop within grace + kill deadline");
    assert_eq!(status.code(), Some(0));
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&{
        use std::io::Read;
        let mut b = Vec::new();
        r.stderr.take().unwrap().read_to_end(&mut b).unwrap();
        b
    })
    .into_owned();
    assert!(err.contains("received SIGHUP; ignored"), "{err}");
    assert!(err.contains("status:"), "SIGUSR1 logs the status: {err}");
    assert!(err.contains("released back to ready"), "{err}");
    eprintln!("shutdown took {took:?}");
    // Both jobs are back in ready with no attempt counted, and no handler survived.
    let s = stats(&q);
    assert_eq!(
        (s["ready"].as_u64(), s["running"].as_u64(), s["dead"].as_u64()),
        (Some(2), Some(0), Some(0))
    );
    let ls = stdout(&run(&["ls", qs, "--json"]));
    for line in ls.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["attempts"], 0, "{v}");
    }
    wait_for("handlers to die", Duration::from_secs(10), || {
        processes_with_env(qs).is_empty()
    });
    assert_eq!(count(&q, "runners"), 0, "a clean exit removes the registration");
}

#[test]
fn a_second_stop_signal_skips_the_grace_period() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    push(&q, &["--payload", "x"]);
    let mut r = spawn(&["run", qs, "--grace", "10m", "--", "sleep", "600"]);
    wait_for("the job to run", LONG, || count(&q, "running") == 1);
    signal(&r, Signal::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        r.try_wait().unwrap().is_none(),
        "the first signal waits for the grace period"
    );
    signal(&r, Signal::SIGTERM);
    let status = wait_exit(&mut r, Duration::from_secs(60)).expect("a second signal stops at once");
    assert_eq!(status.code(), Some(0));
    assert_eq!(stats(&q)["ready"], 1);
}

#[test]
fn a_frozen_runner_past_its_lease_cannot_acknowledge_the_job_another_finished() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let done = d.path().join("done");
    push(&q, &["--id", "contested", "--payload", "x"]);
    let script = format!("sleep 1.5; echo $JOBSPOOL_LEASE >> {}", done.display());
    let mut a = spawn(&["run", qs, "--lease", "500ms", "--", "sh", "-c", &script]);
    wait_for("A to claim", LONG, || count(&q, "running") == 1);
    signal(&a, Signal::SIGSTOP);
    // B sees A alive (its lock is held) but its lease expired: B reclaims, kills A's handler,
    // and runs the job itself.
    let o = run(&["run", qs, "--lease", "500ms", "--drain", "--", "sh", "-c", &script]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("reclaimed: its lease expired") || stderr(&o).contains("killed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&done).unwrap().lines().count(), 1);
    signal(&a, Signal::SIGCONT);
    // A resumes, finds its lease lost, and changes nothing.
    std::thread::sleep(Duration::from_secs(1));
    signal(&a, Signal::SIGTERM);
    let status = wait_exit(&mut a, LONG).unwrap();
    assert_eq!(status.code(), Some(0));
    let err = {
        use std::io::Read;
        let mut b = Vec::new();
        a.stderr.take().unwrap().read_to_end(&mut b).unwrap();
        String::from_utf8_lossy(&b).into_owned()
    };
    assert!(err.contains("lease lost"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&done).unwrap().lines().count(),
        1,
        "the stale handler never finished"
    );
    let s = stats(&q);
    assert_eq!(
        (s["ready"].as_u64(), s["running"].as_u64(), s["dead"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
}

#[test]
fn a_timeout_kills_the_handlers_grandchildren() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let pidfile = d.path().join("grandchild.pid");
    push(
        &q,
        &[
            "--id",
            "slow",
            "--timeout",
            "500ms",
            "--max-attempts",
            "1",
            "--payload",
            "x",
        ],
    );
    let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
    let o = run(&["run", qs, "--drain", "--", "sh", "-c", &script]);
    assert_eq!(o.status.code(), Some(1));
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    wait_for("the grandchild to die", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
    });
    let v: serde_json::Value = serde_json::from_slice(&run(&["show", qs, "slow", "--json"]).stdout).unwrap();
    assert!(
        v["dead_reason"].as_str().unwrap().starts_with("timed out after 500ms"),
        "{v}"
    );
}

#[test]
fn an_idle_runner_sleeps_and_wakes_at_once_on_a_push() {
    let (d, q) = queue();
    an_idle_runner_sleeps_and_wakes_at_once(q_str(&q), d.path());
}

#[test]
fn wait_decides_completion_and_reports_dead_jobs_and_timeouts() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let o = run(&["wait", qs]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("all done"), "{}", stdout(&o));

    // A running job holds `wait` until it finishes.
    let marker = d.path().join("finished");
    push(&q, &["--payload", "x"]);
    let script = format!("sleep 1; touch {}", marker.display());
    let mut r = spawn(&["run", qs, "--", "sh", "-c", &script]);
    wait_for("the job to run", LONG, || count(&q, "running") == 1);
    let o = run(&["wait", qs, "--timeout", "1m"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(marker.exists(), "wait returned while the job was still running");

    signal(&r, Signal::SIGTERM);
    wait_exit(&mut r, LONG).unwrap();
    push(&q, &["--max-attempts", "1", "--payload", "x", "--id", "bad"]);
    let o = run(&["run", qs, "--drain", "--", "false"]);
    assert_eq!(o.status.code(), Some(1));
    let o = run(&["wait", qs]);
    assert_eq!(o.status.code(), Some(1), "dead jobs: exit 1");

    push(&q, &["--delay", "1h", "--payload", "later"]);
    let o = run(&["wait", qs, "--timeout", "300ms"]);
    assert_eq!(o.status.code(), Some(124));
    assert!(stdout(&o).contains("1 scheduled"), "{}", stdout(&o));
}

#[test]
fn check_speaks_the_monitoring_plugin_convention() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    let o = run(&["check", qs]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).starts_with("JOBSPOOL OK - 0 ready, 0 running, 0 dead, 0 runner(s) | ready=0 "),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("runners=0"), "{}", stdout(&o));

    let o = run(&["check", qs, "--min-runners", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stdout(&o).starts_with("JOBSPOOL CRITICAL - 0 live runner(s), fewer than 1"),
        "{}",
        stdout(&o)
    );
    // Nagios range syntax: "1:" means critical below 1.
    assert!(stdout(&o).trim_end().ends_with(" runners=0;;1:;0"), "{}", stdout(&o));

    push(&q, &["--max-attempts", "1", "--payload", "x"]);
    assert_eq!(run(&["run", qs, "--drain", "--", "false"]).status.code(), Some(1));
    let o = run(&["check", qs]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).starts_with("JOBSPOOL WARNING - 1 dead"), "{}", stdout(&o));
    assert!(stdout(&o).contains("dead=1;1;;0"), "{}", stdout(&o));
    let o = run(&["check", qs, "--crit-dead", "1"]);
    assert_eq!(o.status.code(), Some(2));

    push(&q, &["--payload", "waiting"]);
    std::thread::sleep(Duration::from_millis(1100));
    let o = run(&["check", qs, "--warn-dead", "5", "--warn-age", "1s"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("oldest ready job waited"), "{}", stdout(&o));

    let o = run(&["check", "/nonexistent/queue"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stdout(&o).starts_with("JOBSPOOL UNKNOWN - "), "{}", stdout(&o));
}

#[test]
fn check_usage_errors_are_unknown_on_one_line() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    for (args, needle) in [
        (vec!["check", qs, "--warn-age", "soon"], "invalid duration"),
        (vec!["check", qs, "--crit-dead", "many"], "--crit-dead"),
        (vec!["check", qs, "--no-such-flag"], "--no-such-flag"),
        (vec!["check"], "<QUEUE>"),
        (vec!["-q", "check", qs, "--min-runners", "-1"], "-1"),
    ] {
        let o = run(&args);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {out} {}", stderr(&o));
        assert!(out.starts_with("JOBSPOOL UNKNOWN - "), "{args:?}: {out}");
        assert!(out.contains(needle), "{args:?}: {out}");
        assert_eq!(out.lines().count(), 1, "{args:?}: {out}");
    }
    // Other commands keep the usage exit code; help is still help.
    assert_eq!(run(&["ls", qs, "--no-such-flag"]).status.code(), Some(2));
    let o = run(&["check", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("Nagios"), "{}", stdout(&o));
}

/// Pushes a job, lets a runner (started with `run_args`) claim it, kills the runner with
/// `kill -9`, waits 1 s (past a 300 ms lease plus one more) and runs `check`.
fn check_after_a_runner_died_holding_a_job(q: &std::path::Path, run_args: &[&str]) -> std::process::Output {
    let qs = q_str(q);
    push(q, &["--id", "stuck", "--payload", "x"]);
    let mut args = vec!["run", qs];
    args.extend_from_slice(run_args);
    args.extend_from_slice(&["--", "sleep", "600"]);
    let mut r = spawn(&args);
    wait_for("the job to be claimed", LONG, || count(q, "running") == 1);
    signal(&r, Signal::SIGKILL);
    r.wait().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    run(&["check", qs])
}

#[test]
fn check_is_critical_for_long_expired_leases_with_no_live_runner() {
    let (_d, q) = queue();
    // A short queue lease, so that "long expired" (past expiry by one more lease) comes soon.
    let config = std::fs::read_to_string(q.join("jobspool.toml")).unwrap();
    let short = config.replace("lease = \"30s\"", "lease = \"300ms\"");
    assert_ne!(config, short);
    std::fs::write(q.join("jobspool.toml"), short).unwrap();
    // Past expiry plus one more lease, with no runner alive to reclaim it: critical.
    let o = check_after_a_runner_died_holding_a_job(&q, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(
        stdout(&o).starts_with(
            "JOBSPOOL CRITICAL - 1 running job(s) with long-expired leases and no live runner to reclaim them"
        ),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("running=1"), "{}", stdout(&o));
}

/// `check` took "long expired" to mean past expiry by one more of the *queue's* lease: a claim
/// made under a shorter lease of its own (`run --lease`) was not reported for as long as the
/// queue's lease (30 s by default). Each claim is judged by the lease it was made with.
#[test]
fn check_judges_long_expired_leases_by_each_claims_own_lease() {
    let (_d, q) = queue();
    // The queue keeps its default lease (30 s); this runner claims for 300 ms.
    let o = check_after_a_runner_died_holding_a_job(&q, &["--lease", "300ms"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("1 running job(s) with long-expired leases"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn jobs_removed_while_running_are_stopped_at_the_next_heartbeat() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    push(&q, &["--id", "cancel-me", "--payload", "x"]);
    let mut r = spawn(&["run", qs, "--lease", "600ms", "--", "sleep", "600"]);
    wait_for("the job to run", LONG, || count(&q, "running") == 1);
    let o = run(&["rm", qs, "cancel-me"]);
    assert!(
        o.status.success() && stderr(&o).contains("was running"),
        "{}",
        stderr(&o)
    );
    wait_for("the handler to be stopped", LONG, || {
        processes_with_env("JOBSPOOL_JOB_ID=cancel-me").is_empty()
    });
    signal(&r, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut r, LONG).and_then(|s| s.code()), Some(0));
    let s = stats(&q);
    assert_eq!(
        (s["ready"].as_u64(), s["running"].as_u64(), s["dead"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
}

#[test]
fn a_scheduled_job_runs_when_due_and_not_before() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let marker = d.path().join("ran");
    let script = format!("date +%s%3N > {}", marker.display());
    let mut r = spawn(&["run", qs, "--", "sh", "-c", &script]);
    wait_for("registration", LONG, || count(&q, "runners") == 1);
    let pushed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    push(&q, &["--delay", "1500ms", "--payload", "later"]);
    assert_eq!(stats(&q)["scheduled"], 1);
    wait_for("the scheduled job to run", LONG, || {
        std::fs::read_to_string(&marker).is_ok_and(|s| !s.trim().is_empty())
    });
    let ran: u128 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
    assert!(ran >= pushed + 1500, "ran {}ms after the push", ran - pushed);
    eprintln!("a job due in 1500ms ran after {}ms", ran - pushed);
    signal(&r, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut r, LONG).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_running_runner_quarantines_foreign_files_and_keeps_going() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let marker = d.path().join("ran");
    let script = format!("cat >> {}", marker.display());
    let mut r = spawn(&["run", qs, "--", "sh", "-c", &script]);
    wait_for("registration", LONG, || count(&q, "runners") == 1);
    std::fs::write(
        q.join("ready").join("0999.1732350000123.0.forged"),
        b"JOBSPOOL 1\nid forged\ngarbage",
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc/passwd", q.join("ready").join("0999.1732350000123.0.link")).unwrap();
    push(&q, &["--payload", "still flowing"]);
    wait_for("the valid job to run", LONG, || {
        std::fs::read_to_string(&marker).is_ok_and(|s| s == "still flowing")
    });
    wait_for("quarantine", LONG, || count(&q, "quarantine") == 2);
    signal(&r, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut r, LONG).and_then(|s| s.code()), Some(0));
    let err = {
        use std::io::Read;
        let mut b = Vec::new();
        r.stderr.take().unwrap().read_to_end(&mut b).unwrap();
        String::from_utf8_lossy(&b).into_owned()
    };
    assert!(err.contains("quarantined"), "{err}");
    let listed = stdout(&run(&["ls", qs, "--state", "quarantine"]));
    assert!(
        listed.contains("symlink (from ready/)") && listed.contains("truncated (from running/)"),
        "{listed}"
    );
    assert!(
        std::fs::metadata("/etc/passwd").is_ok(),
        "never followed, never deleted"
    );
}

#[test]
fn logs_follow_a_job_until_it_ends_and_status_lists_runners() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    push(&q, &["--id", "chatty", "--payload", "x"]);
    let mut r = spawn(&["run", qs, "--", "sh", "-c", "echo one; sleep 0.5; echo two"]);
    wait_for("the job to start", LONG, || {
        count(&q, "running") == 1 || count(&q, "logs") > 0
    });
    let o = run(&["logs", qs, "chatty", "--follow"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(
        text.contains("one\n") && text.contains("two\n") && text.contains("exit 0 after"),
        "{text}"
    );
    let status = stdout(&run(&["status", qs]));
    assert!(status.contains("alive"), "{status}");
    signal(&r, Signal::SIGKILL);
    r.wait().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&run(&["status", qs, "--json"]).stdout).unwrap();
    assert_eq!(
        status["runners"][0]["alive"], false,
        "a killed runner's entry is recognised as gone: {status}"
    );
}

#[test]
fn run_drain_with_nothing_to_do_still_makes_its_first_upkeep_pass() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    std::fs::write(q.join("running/not-a-lease"), "stray").unwrap();
    std::fs::write(q.join("dead/not-a-job"), "stray").unwrap();
    let o = run(&["run", qs, "--drain", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(count(&q, "running"), 0, "stray file left in running/");
    assert_eq!(count(&q, "dead"), 0, "stray file left in dead/");
    assert_eq!(count(&q, "quarantine"), 2);
}

/// Found by the torture suite (poison-jobs): a job that killed its runner on its last attempt
/// went dead when the next runner took its claim back, but `run --drain` still exited 0 ("no
/// job went dead during the run") and the runner's dead count missed it.
#[test]
fn a_job_buried_when_its_claim_is_taken_back_makes_drain_exit_1() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    push(&q, &["--id", "poison", "--max-attempts", "1", "--payload", "x"]);
    // The handler kills its runner: the claim is left behind with no attempts remaining.
    let o = run(&[
        "run",
        qs,
        "--drain",
        "-j",
        "1",
        "--",
        "sh",
        "-c",
        "kill -9 $PPID; sleep 5",
    ]);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&o.status),
        Some(9),
        "{}",
        stderr(&o)
    );
    let o = run(&["run", qs, "--drain", "-j", "1", "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "a job went dead in this run: {}", stderr(&o));
    assert_eq!(stats(&q)["dead"], 1);
}

/// Found by the torture suite (poison-jobs): the payload went to the handler through a pipe
/// fed after it started, so a runner killed at that moment closed the pipe and the handler —
/// not yet killed by its parent-death signal — read a truncated (here empty) payload as if it
/// were whole and acted on it. The payload is now a complete file before the handler starts.
#[test]
fn a_handler_never_sees_a_partial_payload_its_stdin_is_whole_before_it_starts() {
    let (d, q) = queue();
    let qs = q_str(&q);
    let payload = "x".repeat(300_000); // larger than a pipe's buffer
    let file = d.path().join("payload");
    std::fs::write(&file, &payload).unwrap();
    push(&q, &["--id", "big", "--payload-file", file.to_str().unwrap()]);
    let out = d.path().join("seen");
    // Not a pipe, and already its full size before the handler reads a byte.
    let script = format!(
        "if [ -p /dev/stdin ]; then echo pipe > {o}; else stat -L -c %s /dev/stdin > {o}; fi; cat > /dev/null",
        o = out.display()
    );
    let o = run(&["run", qs, "--drain", "-j", "1", "--", "sh", "-c", &script]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), payload.len().to_string());
}

/// The handler is started without `fork` (clone with a shared address space, as `posix_spawn`
/// does) and does its own setup before exec; this pins what that setup promises.
#[test]
fn a_handler_gets_default_signals_an_empty_mask_its_own_group_and_the_runners_environment() {
    use std::os::unix::process::CommandExt;
    let (d, q) = queue();
    let qs = q_str(&q);
    push(&q, &["--id", "sig"]);
    let out = d.path().join("status");
    let script = format!(
        // Builtins first, then exec, so that the handler process itself reads its status (a
        // shell blocks every signal around each fork, so a child of its would race with that).
        "echo \"Inherited: $JOBSPOOL_TEST_INHERITED\" > {o}; echo \"Job: $JOBSPOOL_JOB_ID\" >> {o}; exec grep -E '^(Pid|PPid|NSpgid|SigBlk|SigIgn):' /proc/self/status >> {o}",
        o = out.display()
    );
    // A runner that ignores some signals and blocks others, as one started by nohup or by a
    // careless supervisor would: its handlers must not inherit either.
    let mut runner = cmd(&["run", qs, "--drain", "-j", "1", "--", "sh", "-c", &script]);
    runner.env("JOBSPOOL_TEST_INHERITED", "yes");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        runner.pre_exec(|| {
            use nix::libc;
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            libc::signal(libc::SIGUSR2, libc::SIG_IGN);
            // A realtime one too: the reset once stopped at SIGRTMIN.
            libc::signal(libc::SIGRTMIN() + 1, libc::SIG_IGN);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGALRM);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = runner.spawn().unwrap();
    let runner_pid = child.id();
    assert!(wait_exit(&mut child, LONG).expect("the runner exits").success());
    let seen: HashMap<String, String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.to_string(), v.trim().to_string())))
        .collect();
    assert_eq!(seen["SigBlk"], "0000000000000000", "{seen:?}");
    assert_eq!(seen["SigIgn"], "0000000000000000", "{seen:?}");
    assert_eq!(
        seen["PPid"],
        runner_pid.to_string(),
        "a child of the runner itself: {seen:?}"
    );
    assert_eq!(
        seen["NSpgid"], seen["Pid"],
        "the leader of its own process group: {seen:?}"
    );
    assert_eq!(seen["Inherited"], "yes", "{seen:?}");
    assert_eq!(seen["Job"], "sig", "{seen:?}");
}

#[test]
fn a_handler_that_cannot_be_executed_fails_the_attempt_with_the_reason() {
    let (d, q) = queue();
    let qs = q_str(&q);
    // Executable when the runner starts, gone when the job runs: the exec itself fails.
    let prog = d.path().join("vanishing");
    std::fs::write(&prog, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut runner = spawn(&["run", qs, "--", prog.to_str().unwrap()]);
    wait_for("the runner to start", LONG, || live_runners(qs) == 1);
    std::fs::remove_file(&prog).unwrap();
    push(&q, &["--id", "noexec", "--max-attempts", "1"]);
    wait_for("the job to die", LONG, || count(&q, "dead") == 1);
    signal(&runner, Signal::SIGTERM);
    wait_exit(&mut runner, LONG).expect("the runner exits");
    let o = run(&["show", qs, "noexec"]);
    let text = stdout(&o);
    assert!(text.contains("No such file or directory"), "{text}");
}

/// Kills aimed at the spawn path itself: a runner whose handlers each leave a grandchild and
/// exit at once spends most of its time between clone and exec, registering groups with its
/// guardian and reaping; `kill -9` at any of those moments must leave no process behind.
#[test]
fn kill_9_while_handlers_are_being_started_leaves_no_grandchild_behind() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    let jobs: String = (0..2000).map(|_| "x\n").collect();
    let mut p = cmd(&["push", qs, "--batch"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(p.stdin.as_mut().unwrap(), jobs.as_bytes()).unwrap();
    assert!(p.wait().unwrap().success());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..40 {
        let mut r = spawn(&[
            "run",
            qs,
            "-j",
            "3",
            "--max-attempts",
            "1000",
            "--",
            "sh",
            "-c",
            "sleep 30 & exit 0",
        ]);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(5 + seed % 60));
        signal(&r, Signal::SIGKILL);
        r.wait().unwrap();
        wait_for("orphans to die", Duration::from_secs(10), || {
            processes_with_env(qs).is_empty()
        });
    }
}

/// While its slots run short jobs a runner claims one job ahead. That job must not wait behind
/// a long one that comes next: it goes back to ready unstarted and uncounted, once (not claimed
/// and given back over and over while the long job runs), and then runs as attempt 1.
#[test]
fn a_job_claimed_ahead_behind_a_long_one_goes_back_once_unstarted_and_uncounted() {
    let (_d, q) = queue();
    let qs = q_str(&q);
    push(&q, &["--id", "short", "--payload", "0"]);
    push(&q, &["--id", "long", "--payload", "3"]);
    push(&q, &["--id", "next", "--payload", "0"]);
    let mut r = spawn(&["run", qs, "-j", "1", "--drain", "--", "sh", "-c", "sleep \"$(cat)\""]);
    wait_for("the long job to run", LONG, || {
        !processes_with_env("JOBSPOOL_JOB_ID=long").is_empty()
    });
    wait_for("the job claimed ahead to be back in ready", LONG, || {
        count(&q, "ready") == 1
    });
    assert!(
        !processes_with_env("JOBSPOOL_JOB_ID=long").is_empty(),
        "the long job ended before the job behind it was given back"
    );
    assert_eq!(wait_exit(&mut r, LONG).and_then(|s| s.code()), Some(0));
    let shown = stdout(&run(&["show", qs, "next"]));
    assert_eq!(shown.matches("given back unstarted").count(), 1, "{shown}");
    // History lines read: time, event, "attempt", number, ...
    let events: Vec<(&str, &str)> = shown
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() >= 4 && w[2] == "attempt")
        .map(|w| (w[1], w[3]))
        .collect();
    assert_eq!(
        events.iter().filter(|e| e.0 == "done").collect::<Vec<_>>(),
        [&("done", "1")],
        "{shown}"
    );
}

/// A runner out of descriptors failed every job it claimed, one attempt after another, until
/// each was dead. The shortage is the runner's, not the job's: the job goes back to ready
/// unstarted and uncounted, and the runner pauses its claims and says why.
#[test]
fn a_runner_out_of_descriptors_gives_jobs_back_uncounted_instead_of_failing_them() {
    use std::os::unix::process::CommandExt;
    let (d, q) = queue();
    let qs = q_str(&q);
    // How many descriptors an idle runner holds.
    let mut idle = spawn(&["run", qs, "--", "cat"]);
    wait_for("registration", LONG, || count(&q, "runners") == 1);
    let held = std::fs::read_dir(format!("/proc/{}/fd", idle.id())).unwrap().count() as u64;
    signal(&idle, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut idle, LONG).and_then(|s| s.code()), Some(0));

    push(&q, &["--id", "j1", "--max-attempts", "2", "--payload", "hi"]);
    // Room for the job's log, not for what starting its handler needs besides.
    let limit = held + 2;
    let log = d.path().join("runner.err");
    let mut c = cmd(&["run", qs, "--", "cat"]);
    c.stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; the limits are plain integers.
    unsafe {
        c.pre_exec(move || {
            let l = nix::libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut r = Running(c.spawn().unwrap());
    let gave_back = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("the runner could not start the handler") && l.contains("claiming again in"))
            .count()
    };
    // Three give-backs: two failed attempts would already have made the job dead.
    wait_for("the job to be given back three times", LONG, || gave_back() >= 3);
    signal(&r, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut r, LONG).and_then(|s| s.code()), Some(0));
    let s = stats(&q);
    assert_eq!((s["ready"].as_u64(), s["dead"].as_u64()), (Some(1), Some(0)), "{s}");
    let shown = stdout(&run(&["show", qs, "j1"]));
    assert!(shown.contains("attempts:     0"), "{shown}");
}

/// The runner claims on its event loop when the store can claim at once. A claim that would
/// wait, here for the lock a completion check (`jobspool wait`) holds while it lists the queue,
/// must go to a thread instead: claimed on the loop, it stalled the runner behind the check,
/// with no handler reaped, no job acknowledged and no signal obeyed until the lock was let go.
#[test]
fn a_claim_waiting_for_a_checks_lock_does_not_stall_the_runners_event_loop() {
    use nix::fcntl::{Flock, FlockArg};
    let (d, q) = queue();
    let qs = q_str(&q);
    let gate = d.path().join("gate");
    let script = format!("while [ ! -e {} ]; do sleep 0.02; done", gate.display());
    push(&q, &["--id", "first"]);
    let mut r = spawn(&["run", qs, "-j", "2", "--", "sh", "-c", &script]);
    wait_for("the first job to run", LONG, || count(&q, "running") == 1);

    let check = Flock::lock(std::fs::File::open(q.join("running")).unwrap(), FlockArg::LockExclusive).unwrap();
    // The free slot's claim of this one now waits for the lock.
    push(&q, &["--id", "second"]);
    std::fs::write(&gate, "").unwrap();
    let history = |id: &str| std::fs::read_to_string(q.join("logs").join(format!("{id}.events"))).unwrap_or_default();
    wait_for(
        "the first job to be acknowledged while the check holds the lock",
        LONG,
        || count(&q, "running") == 0 && history("first").contains("\"done\""),
    );
    assert_eq!(count(&q, "ready"), 1, "the second job waits for the lock");
    drop(check);

    wait_for("the second job to run once the lock is free", LONG, || {
        history("second").contains("\"done\"")
    });
    signal(&r, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut r, LONG).and_then(|s| s.code()), Some(0));
}
