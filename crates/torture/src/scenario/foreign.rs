//! Scenario 7: foreign entries in every folder of a queue — dotfiles, subdirectories, FIFOs,
//! sockets, device nodes, symlinks (to files outside the queue, and loops), hard links, files of
//! other owners, mode 0000, 255-byte and non-UTF-8 names. The real `jobspool run --drain` and
//! garbage collection must not hang, follow, or delete them, must report each, and must run the
//! valid jobs.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Figures;
use crate::{Env, entries};

/// Puts one of each kind of foreign entry into `folder`; returns how many, and their kinds.
fn plant(q: &Path, folder: &str, outside: &Path, listeners: &mut Vec<std::os::unix::net::UnixListener>) -> Vec<String> {
    let d = q.join(folder);
    let mut kinds = Vec::new();
    let mut add = |k: &str| kinds.push(k.to_string());
    std::fs::write(d.join(".hidden"), b"JOBSPOOL 1\n").unwrap();
    add("dotfile");
    std::fs::create_dir(d.join("0999.0000000000000.0.subdir")).unwrap();
    std::fs::write(d.join("0999.0000000000000.0.subdir/inner"), b"x").unwrap();
    add("subdirectory named like a job");
    nix::unistd::mkfifo(
        &d.join("0999.0000000000000.0.fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    add("fifo");
    listeners.push(std::os::unix::net::UnixListener::bind(d.join("0999.0000000000000.0.sock")).unwrap());
    add("socket");
    if crate::is_root() {
        nix::sys::stat::mknod(
            &d.join("0999.0000000000000.0.dev"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        add("device (/dev/null)");
    }
    std::os::unix::fs::symlink(outside.join("secret"), d.join("0999.0000000000000.0.link")).unwrap();
    add("symlink to a file outside");
    std::os::unix::fs::symlink("0999.0000000000000.0.loop", d.join("0999.0000000000000.0.loop")).unwrap();
    add("symlink loop");
    std::fs::hard_link(outside.join("hardlinked"), d.join("0999.0000000000000.0.hard")).unwrap();
    add("hard link to a file outside");
    let zero = d.join("0999.0000000000000.0.mode0000");
    std::fs::write(&zero, b"JOBSPOOL 1\nnot really\n").unwrap();
    std::fs::set_permissions(&zero, std::fs::Permissions::from_mode(0o000)).unwrap();
    add("mode 0000");
    if crate::is_root() {
        let other = d.join("0999.0000000000000.0.nobody");
        std::fs::write(&other, b"owned by nobody").unwrap();
        let _ = nix::unistd::chown(
            &other,
            Some(nix::unistd::Uid::from_raw(65534)),
            Some(nix::unistd::Gid::from_raw(65534)),
        );
        add("file of another owner");
    }
    let long = format!("0999.0000000000000.0.{}", "x".repeat(255 - 21));
    std::fs::write(d.join(&long), b"long").unwrap();
    add("255-byte name");
    let bytes: &[u8] = b"0999.0000000000000.0.\xff\xfe-not-utf8";
    std::fs::write(d.join(OsStr::from_bytes(bytes)), b"bytes").unwrap();
    add("non-UTF-8 name");
    std::fs::write(d.join("README"), b"a note someone left").unwrap();
    add("plain file with a non-job name");
    kinds
}

/// Scenario 7.
pub fn foreign(env: &Env) -> Figures {
    let mut figs = Figures::new("foreign-entries");
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"must stay untouched").unwrap();
    std::fs::write(outside.join("hardlinked"), b"also untouched").unwrap();
    let jb = env.jobspool.to_str().unwrap().to_string();
    let qs = q.to_str().unwrap().to_string();
    let ok = Command::new(&jb)
        .args(["init", &qs])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "init");
    let mut listeners = Vec::new();
    let mut planted = 0;
    for folder in ["ready", "running", "dead", "tmp"] {
        let kinds = plant(&q, folder, &outside, &mut listeners);
        planted += kinds.len();
        if folder == "ready" {
            figs.notes.push(format!(
                "kinds planted in each of ready/ running/ dead/ tmp/: {}",
                kinds.join(", ")
            ));
        }
    }
    // Valid jobs among them.
    for i in 0..5 {
        let st = Command::new(&jb)
            .args(["push", &qs, "--id", &format!("good{i}"), "--payload", "ok"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let before_tmp = entries(&q, "tmp");
    // The real runner, bounded in time: it must not hang on a FIFO or a loop.
    let marker = dir.path().join("ran");
    let start = Instant::now();
    let mut child = Command::new(&jb)
        .args(["run", &qs, "--drain", "-j", "2", "--", "sh", "-c"])
        .arg(format!("echo \"$JOBSPOOL_JOB_ID\" >> {}", marker.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    figs.cases = 1;
    figs.faults = planted as u64;
    match status {
        None => figs.violation("run --drain", "hung for 60 s"),
        Some(s) if !s.success() => figs.violation("run --drain", format!("exited {s}: {stderr}")),
        _ => {}
    }
    figs.notes
        .push(format!("run --drain took {:.2}s", start.elapsed().as_secs_f64()));
    // Garbage collection (by a status/ls/gc path) must not delete them either.
    let _ = Command::new(&jb).args(["status", &qs]).stdout(Stdio::null()).status();
    let ran = std::fs::read_to_string(&marker).unwrap_or_default();
    let mut ran: Vec<&str> = ran.lines().collect();
    ran.sort();
    if ran != ["good0", "good1", "good2", "good3", "good4"] {
        figs.violation("valid jobs", format!("ran {ran:?}"));
    }
    if std::fs::read(outside.join("secret")).ok().as_deref() != Some(&b"must stay untouched"[..]) {
        figs.violation("symlink", "the file outside the queue was changed or removed");
    }
    if std::fs::read(outside.join("hardlinked")).ok().as_deref() != Some(&b"also untouched"[..]) {
        figs.violation("hard link", "the file outside the queue was changed or removed");
    }
    let quarantined = entries(&q, "quarantine");
    let in_place: usize = ["ready", "running", "dead"].iter().map(|f| entries(&q, f).len()).sum();
    let expected = planted - before_tmp.len();
    figs.notes.push(format!(
        "{} entries planted in ready/ running/ dead/: {} quarantined, {} left in place; tmp/ entries kept: {}/{}",
        expected,
        quarantined.len(),
        in_place,
        entries(&q, "tmp").len(),
        before_tmp.len()
    ));
    if quarantined.len() + in_place != expected {
        figs.violation(
            "no deletion",
            format!(
                "{expected} planted, {} quarantined + {in_place} in place",
                quarantined.len()
            ),
        );
    }
    if entries(&q, "tmp").len() != before_tmp.len() {
        figs.violation("no deletion", "entries of tmp/ were removed");
    }
    let mut reasons: std::collections::BTreeMap<String, u32> = Default::default();
    for n in &quarantined {
        *reasons
            .entry(n.split('.').nth(1).unwrap_or("?").to_string())
            .or_default() += 1;
    }
    figs.notes.push(format!("quarantine reasons: {reasons:?}"));
    for f in ["ready", "running", "dead"] {
        for n in entries(&q, f) {
            figs.notes.push(format!("left in {f}/: {n:?}"));
        }
    }
    let ls = Command::new(&jb)
        .args(["ls", &qs, "--state", "quarantine"])
        .output()
        .unwrap();
    if !ls.status.success() {
        figs.violation("ls --state quarantine", String::from_utf8_lossy(&ls.stderr).to_string());
    }
    let warned = stderr.matches("quarantined").count();
    figs.notes
        .push(format!("runner log lines reporting a quarantine: {warned}"));
    figs
}
