//! The producer and operator commands, and the error policy: one line, a clear exit code.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::*;

fn with_stdin(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = cmd(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn init_is_idempotent_and_push_creates_a_missing_queue() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("new");
    let qs = q.to_str().unwrap();
    let id = push(&q, &["--payload", "x"]);
    assert_eq!(id.len(), 36, "a generated UUIDv7: {id}");
    for _ in 0..2 {
        let o = run(&["init", qs, "--mode", "0600"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("file mode 0600"));
    }
    assert_eq!(stats(&q)["ready"], 1, "init keeps the jobs");
    let config = std::fs::read_to_string(q.join("jobspool.toml")).unwrap();
    assert!(config.contains("mode = \"0600\""), "{config}");
}

#[test]
fn payloads_come_from_the_flag_a_file_or_stdin_and_batches_from_lines() {
    let (d, q) = queue();
    let qs = q.to_str().unwrap();
    push(&q, &["--id", "flag", "--payload", "from flag"]);
    let file = d.path().join("payload.bin");
    std::fs::write(&file, b"\x00\x01binary\xff").unwrap();
    push(&q, &["--id", "file", "--payload-file", file.to_str().unwrap()]);
    let o = with_stdin(&["push", qs, "--id", "stdin"], b"from stdin\n");
    assert!(o.status.success());
    let payload = |id: &str| run(&["show", qs, id, "--payload"]).stdout;
    assert_eq!(payload("flag"), b"from flag");
    assert_eq!(payload("file"), b"\x00\x01binary\xff");
    assert_eq!(payload("stdin"), b"from stdin\n");

    let o = with_stdin(&["push", qs, "--batch", "--priority", "7"], b"one\ntwo\nthree\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<String> = stdout(&o).lines().map(String::from).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(payload(&ids[1]), b"two");
    assert_eq!(stats(&q)["ready"], 6);
    // Priority 7 sorts first in ready/ and in the listing.
    let ls = stdout(&run(&["ls", qs, "--state", "ready"]));
    let first = ls.lines().nth(1).unwrap();
    assert!(first.starts_with(&ids[0]) && first.contains(" 7 "), "{ls}");
}

#[test]
fn ls_show_and_stats_speak_to_people_and_to_programs() {
    let (_d, q) = queue();
    let qs = q.to_str().unwrap();
    push(
        &q,
        &[
            "--id",
            "cmd",
            "--priority",
            "-3",
            "--max-attempts",
            "4",
            "--timeout",
            "90s",
            "--",
            "sendmail",
            "-t",
            "it's",
        ],
    );
    push(&q, &["--id", "later", "--delay", "1h", "--payload", "tab\there"]);
    let table = stdout(&run(&["ls", qs]));
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("sendmail -t 'it'\\''s'"), "{table}");
    assert!(table.contains("scheduled") && table.contains("in 59m"), "{table}");
    let json = stdout(&run(&["ls", qs, "--json", "--state", "scheduled"]));
    let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["state"].as_str(), v["attempts"].as_u64()),
        (Some("later"), Some("scheduled"), Some(0))
    );
    let shown = stdout(&run(&["show", qs, "cmd"]));
    for want in [
        "state:        ready",
        "priority:     -3",
        "max attempts: 4",
        "timeout:      90s",
        "command:      sendmail -t",
    ] {
        assert!(shown.contains(want), "{want:?} missing in\n{shown}");
    }
    let v: serde_json::Value = serde_json::from_slice(&run(&["show", qs, "cmd", "--json"]).stdout).unwrap();
    assert_eq!(v["command"], serde_json::json!(["sendmail", "-t", "it's"]));
    assert_eq!(v["timeout_ms"], 90_000);
    let s = stats(&q);
    for key in ["ready", "scheduled", "running", "dead", "quarantined"] {
        assert!(s[key].is_u64(), "{key} is not an integer in {s}");
    }
    assert_eq!((s["ready"].as_u64(), s["scheduled"].as_u64()), (Some(1), Some(1)));
    assert!(s["oldest_ready_age_ms"].is_u64());
}

#[test]
fn rm_removes_jobs_with_their_logs() {
    let (_d, q) = queue();
    let qs = q.to_str().unwrap();
    push(&q, &["--id", "gone", "--payload", "x"]);
    push(&q, &["--id", "kept", "--payload", "x"]);
    let o = run(&["rm", qs, "gone", "missing"]);
    assert_eq!(o.status.code(), Some(2), "an unknown id is reported");
    assert!(stderr(&o).contains("no job missing"));
    assert_eq!(stats(&q)["ready"], 1);
    assert!(!q.join("logs/gone.events").exists());
    push(&q, &["--id", "gone", "--payload", "again"]);
}

#[test]
fn bad_input_gets_one_clear_line_and_a_non_zero_exit() {
    let (_d, q) = queue();
    let qs = q.to_str().unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["push", qs, "--id", "../etc/passwd", "--payload", "x"],
            2,
            "invalid job id",
        ),
        (vec!["push", qs, "--id", "a/b", "--payload", "x"], 2, "invalid job id"),
        (
            vec!["push", qs, "--priority", "1000", "--payload", "x"],
            2,
            "out of range",
        ),
        (
            vec!["push", qs, "--delay", "soon", "--payload", "x"],
            2,
            "invalid duration",
        ),
        (
            vec!["push", qs, "--payload-file", "/no/such/file"],
            2,
            "/no/such/file: cannot read the payload file",
        ),
        (vec!["show", qs, "nope"], 2, "no job nope"),
        (vec!["retry", qs, "nope"], 2, "no job nope"),
        (vec!["ls", "/no/such/queue"], 2, "jobspool init /no/such/queue"),
        (vec!["push", "/etc", "--payload", "x"], 2, "not a jobspool queue"),
        (vec!["run", qs, "--", "/no/such/handler"], 2, "not an executable"),
        (vec!["run", qs], 2, "no handler"),
        (vec!["wait", qs, "--timeout", "x"], 2, "invalid duration"),
    ];
    for (args, code, needle) in cases {
        let o = run(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{args:?}: {err}"
        );
        if code != 2 || !err.starts_with("error:") {
            assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: more than one line: {err}");
        }
    }
    assert_eq!(stats(&q)["ready"], 0, "nothing was half-written");
    assert!(std::fs::read_dir(q.join("tmp")).unwrap().next().is_none());
}

#[test]
fn a_done_jobs_id_stays_reserved_until_rm_frees_it() {
    let (_d, q) = queue();
    let qs = q.to_str().unwrap();
    push(&q, &["--id", "ok", "--payload", "x"]);
    let o = run(&["run", qs, "--drain", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // Pushing a finished idempotency key again is refused, saying why and what frees it.
    let o = run(&["push", qs, "--id", "ok", "--payload", "again"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("job ok finished recently"), "{err}");
    assert!(err.contains(&format!("jobspool rm {qs} ok")), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // show says it finished, with its history, instead of "no job".
    let o = run(&["show", qs, "ok"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("state:") && out.contains("done"), "{out}");
    assert!(out.contains("history:"), "{out}");
    let o = run(&["show", qs, "ok", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "done", "{v}");
    assert!(
        v["history"].as_array().unwrap().iter().any(|e| e["kind"] == "done"),
        "{v}"
    );
    // rm removes the log and history and frees the id.
    let o = run(&["rm", qs, "ok"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("the id can be pushed again"), "{}", stderr(&o));
    assert!(!q.join("logs/ok.events").exists() && !q.join("logs/ok.log").exists());
    let o = run(&["rm", qs, "ok"]);
    assert_eq!(o.status.code(), Some(2), "nothing is known any more");
    push(&q, &["--id", "ok", "--payload", "again"]);
}

#[test]
fn push_refuses_run_at_times_and_timeouts_a_queue_cannot_hold() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("never-created");
    let qs = q.to_str().unwrap();
    for (args, needle) in [
        (vec!["--delay", "300y"], "too far in the future"),
        (vec!["--delay", "1000000000y"], "too far in the future"),
        (
            vec!["--timeout", "1000000000y"],
            "timeout of 1000000000years is too long",
        ),
        (vec!["--timeout", "101y"], "too long"),
    ] {
        let mut all = vec!["push", qs, "--payload", "x"];
        all.extend_from_slice(&args);
        let o = run(&all);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(!q.exists(), "{args:?}: a refused push created the queue");
    }
    // The longest accepted values make jobs that are listed and kept, not quarantined.
    push(&q, &["--delay", "200y", "--timeout", "100y", "--payload", "x"]);
    let s = stats(&q);
    assert_eq!((s["scheduled"].as_u64(), s["quarantined"].as_u64()), (Some(1), Some(0)));
    let o = run(&["ls", qs, "--state", "scheduled", "--json"]);
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
}

#[test]
fn run_refuses_a_lease_timeout_or_attempt_limit_out_of_range_and_claims_nothing() {
    let (_d, q) = queue();
    let qs = q.to_str().unwrap();
    push(&q, &["--id", "precious", "--payload", "x"]);
    for (args, needle) in [
        (vec!["--lease", "1000000000y"], "lease of 1000000000years is too long"),
        (vec!["--lease", "101y"], "too long"),
        (vec!["--lease", "0s"], "lease of 0s is too short"),
        (vec!["--lease", "50ms"], "too short"),
        (vec!["--timeout", "0s"], "timeout must be longer than 0"),
        (vec!["--timeout", "1000000000y"], "too long"),
        (vec!["--max-attempts", "0"], "max attempts must be at least 1"),
    ] {
        let mut all = vec!["run", qs, "--drain"];
        all.extend_from_slice(&args);
        all.extend_from_slice(&["--", "true"]);
        let o = run(&all);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    let s = stats(&q);
    assert_eq!(
        (s["ready"].as_u64(), s["quarantined"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
}

#[test]
fn an_unreadable_payload_file_is_bad_input_and_creates_no_queue() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("never-created");
    let qs = q.to_str().unwrap();
    let dir = d.path().to_str().unwrap().to_string();
    for file in ["/no/such/file", dir.as_str()] {
        let o = run(&["push", qs, "--payload-file", file]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(&format!("{file}: cannot read the payload file")), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!q.exists(), "a failed push created the queue");
    }
}

/// Runs a command whose reader goes away at once (like `| head -c1`).
fn with_closed_stdout(args: &[&str]) -> std::process::Output {
    let mut child = cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn a_reader_that_goes_away_ends_output_quietly_with_exit_0() {
    let (_d, q) = queue();
    let qs = q.to_str().unwrap();
    // Each output is far larger than a pipe's buffer, so it is written after the reader left.
    let big = "x".repeat(1 << 20);
    let o = with_stdin(&["push", qs, "--id", "big"], big.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(q.join("logs/big.log"), &big).unwrap();
    let lines: String = (0..3000).map(|i| format!("job {i}\n")).collect();
    let o = with_stdin(&["push", qs, "--batch"], lines.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    for args in [
        vec!["show", qs, "big", "--payload"],
        vec!["logs", qs, "big"],
        vec!["ls", qs],
        vec!["ls", qs, "--json"],
    ] {
        let o = with_closed_stdout(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
    }
}

#[test]
fn a_queue_of_an_unsupported_layout_version_says_so() {
    let (_d, q) = queue();
    std::fs::write(q.join("jobspool.toml"), "version = 2\nshards = 4\n").unwrap();
    let o = run(&["ls", q.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unsupported queue layout version 2 (this jobspool reads 1)"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn logs_follow_of_an_unknown_job_is_the_same_error_as_without() {
    let (_d, q) = queue();
    let qs = q.to_str().unwrap();
    for args in [vec!["logs", qs, "nope"], vec!["logs", qs, "nope", "-f"]] {
        let o = cmd(&args).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("no job nope"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    // A job that has not run yet has no log: nothing to print, no error.
    push(&q, &["--id", "waiting", "--payload", "x"]);
    let o = run(&["logs", qs, "waiting"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
