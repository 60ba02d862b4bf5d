//! A queue shared by a group: producers and runners under different uids, whatever their umask.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;

const GROUP: u32 = 47_000;

fn as_user(uid: u32, umask: u32, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(bin());
    c.args(args)
        .uid(uid)
        .gid(GROUP)
        .env("JOBSPOOL_LOG", "warn")
        .stdin(std::process::Stdio::null());
    // SAFETY: umask is async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            nix::libc::umask(umask as nix::libc::mode_t);
            Ok(())
        });
    }
    c.output().unwrap()
}

/// A queue shared by `GROUP` with file mode 0660, in a directory every uid can enter; `None`
/// (after saying so) when not root, since the tests run processes under other uids.
fn group_queue() -> Option<(tempfile::TempDir, std::path::PathBuf)> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to run processes under other uids");
        return None;
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let q = d.path().join("q");
    let o = run(&[
        "init",
        q.to_str().unwrap(),
        "--group",
        &GROUP.to_string(),
        "--mode",
        "0660",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    Some((d, q))
}

#[test]
fn producers_with_any_umask_and_a_runner_under_other_uids_share_a_group_queue() {
    let Some((d, q)) = group_queue() else { return };
    let qs = q.to_str().unwrap();
    for folder in ["ready", "running", "logs", "tmp"] {
        let m = std::fs::metadata(q.join(folder)).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o2770, "{folder}");
        assert_eq!(m.gid(), GROUP, "{folder}");
    }
    // Two producers, one with a umask that would make its files private.
    for (uid, umask) in [(47_001, 0o077), (47_003, 0o022)] {
        let o = as_user(uid, umask, &["push", qs, "--payload", &format!("from {uid}")]);
        assert!(o.status.success(), "push as {uid}: {}", stderr(&o));
    }
    for entry in std::fs::read_dir(q.join("ready")).unwrap() {
        let m = entry.unwrap().metadata().unwrap();
        assert_eq!(m.mode() & 0o777, 0o660, "the umask did not decide the mode");
        assert_eq!(m.gid(), GROUP, "the setgid folder gave the file its group");
    }
    // A runner under a third uid claims, runs, logs and removes both.
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = format!("cat >> {}/got", out.display());
    let o = as_user(47_002, 0o077, &["run", qs, "--drain", "--", "sh", "-c", &script]);
    assert_eq!(o.status.code(), Some(0), "runner: {}", stderr(&o));
    assert!(!stderr(&o).contains("ermission denied"), "{}", stderr(&o));
    let got = std::fs::read_to_string(out.join("got")).unwrap();
    assert!(got.contains("from 47001") && got.contains("from 47003"), "{got}");
    let s = stats(&q);
    assert_eq!(
        (s["ready"].as_u64(), s["dead"].as_u64(), s["quarantined"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
    // The logs the runner wrote are readable by the producers' group too.
    for entry in std::fs::read_dir(q.join("logs")).unwrap() {
        let m = entry.unwrap().metadata().unwrap();
        assert_eq!(m.mode() & 0o777, 0o660);
    }
    let o = as_user(47_001, 0o077, &["doctor", qs]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
}

#[test]
fn a_sticky_or_wrongly_grouped_layout_is_reported_with_the_fix() {
    let (_d, q) = queue();
    let qs = q.to_str().unwrap();
    std::fs::set_permissions(q.join("running"), std::fs::Permissions::from_mode(0o1770)).unwrap();
    let o = run(&["doctor", qs]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("sticky bit") && stdout(&o).contains("chmod -t"),
        "{}",
        stdout(&o)
    );
    let o = run(&["init", qs]);
    assert!(o.status.success());
    assert_eq!(run(&["doctor", qs]).status.code(), Some(0));
}

/// Found by the torture suite (multi-user): a heartbeat set only the mtime, which the kernel
/// allows only the file's owner, so a runner under another uid than the producer's failed every
/// heartbeat with EPERM; a job longer than its lease was reclaimed and run again, forever.
#[test]
fn a_runner_under_another_uid_heartbeats_a_long_job_and_runs_it_once() {
    let Some((d, q)) = group_queue() else { return };
    let qs = q.to_str().unwrap();
    let o = as_user(47_001, 0o077, &["push", qs, "--id", "long", "--payload", "x"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Three leases long: it lives only if its heartbeats work.
    let script = format!("echo run >> {}/runs; sleep 2.5", out.display());
    let o = as_user(
        47_002,
        0o022,
        &["run", qs, "--drain", "--lease", "800ms", "--", "sh", "-c", &script],
    );
    assert_eq!(o.status.code(), Some(0), "runner: {}", stderr(&o));
    assert!(!stderr(&o).contains("not permitted"), "{}", stderr(&o));
    let runs = std::fs::read_to_string(out.join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 1, "ran {} times", runs.lines().count());
}
