//! The jobspool torture suite.
//!
//! A scenario starts faulted processes (`torture-op`, or the real `jobspool` command) on a queue
//! directory, records a history of every operation outside them ([`history`]), kills, freezes or
//! faults them, then drains the queue without faults and checks the history ([`checker`]).
//! `cargo run --release -p torture -- --long` runs every scenario's long form and prints the
//! figures that `RELIABILITY.md` records; `cargo test -p torture` runs the short forms.

pub mod checker;
pub mod history;
pub mod scenario;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use jobspool::State;

use crate::checker::Final;
use crate::history::{Entry, F, Recorder, Ty};

/// Where the programs a scenario drives are, and how hard it should try.
#[derive(Clone, Debug)]
pub struct Env {
    /// The `torture-op` helper.
    pub op: PathBuf,
    /// The `jobspool` command (built by `cargo build --workspace`).
    pub jobspool: PathBuf,
    /// The long form (every k, minutes of chaos) rather than the short, seeded CI form.
    pub long: bool,
    /// Seed for every random choice.
    pub seed: u64,
    /// For time-bounded scenarios: how long.
    pub duration: Duration,
}

impl Env {
    /// Finds the helpers next to `exe` (the `torture` binary, or a test's executable).
    pub fn beside(dir: &Path, long: bool, seed: u64) -> Env {
        let mut d = dir.to_path_buf();
        // Test executables live in target/PROFILE/deps.
        if d.ends_with("deps") {
            d.pop();
        }
        Env {
            op: d.join("torture-op"),
            jobspool: d.join("jobspool"),
            long,
            seed,
            duration: if long {
                Duration::from_secs(300)
            } else {
                Duration::from_secs(8)
            },
        }
    }
}

/// True when this process may mount, change owners and switch users.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when `strace` can be run.
pub fn have_strace() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A queue directory and its history, in a temp dir removed on drop.
pub struct Run {
    pub dir: tempfile::TempDir,
    /// Holds the history, always on the system's temp file system (never on a faulted one).
    pub hdir: tempfile::TempDir,
    pub queue: PathBuf,
    pub history: PathBuf,
    /// The scenario's own recorder (kills, stops, the drain).
    pub rec: Recorder,
    seq: u64,
}

impl Run {
    /// A fresh queue under `base` (the system temp dir when `None`).
    pub fn new(base: Option<&Path>) -> Run {
        let dir = match base {
            Some(b) => tempfile::tempdir_in(b).expect("temp dir"),
            None => tempfile::tempdir().expect("temp dir"),
        };
        let queue = dir.path().join("q");
        jobspool::store::dir::init(&queue, &Default::default()).expect("init queue");
        Run::with_queue(dir, queue)
    }

    /// A fresh Redis queue at `url` (a `redis://…?queue=NAME` URL on a server of the caller's).
    pub fn redis(url: &str) -> Run {
        jobspool::store::redis::RedisStore::init(url, Default::default(), false).expect("init queue");
        Run::with_queue(tempfile::tempdir().expect("temp dir"), PathBuf::from(url))
    }

    fn with_queue(dir: tempfile::TempDir, queue: PathBuf) -> Run {
        let hdir = tempfile::tempdir().expect("temp dir");
        let history = hdir.path().join("history.jsonl");
        let rec = Recorder::open(&history, "scenario").expect("history");
        Run {
            dir,
            hdir,
            queue,
            history,
            rec,
            seq: 0,
        }
    }

    /// A new process label.
    pub fn label(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("{what}{}", self.seq)
    }

    /// The history file, opened for appending, to hand to a child as its standard output.
    pub fn history_out(&self) -> File {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&self.history)
            .expect("history")
    }

    /// Records something the scenario did to process `p`.
    pub fn info(&self, p: &str, f: F) {
        self.rec.record(&Entry::new(p, Ty::Info, f));
    }

    /// Runs `torture-op` to completion, optionally under `strace` with `inject` (a full
    /// `-e inject=` value restricted to `trace` syscalls), and records how it ended.
    pub fn op(&mut self, env: &Env, strace: Option<(&str, &str)>, args: &[&str]) -> Outcome {
        self.op_with(env, strace, Path::new("/dev/null"), args)
    }

    /// Like [`Run::op`] under `strace`, keeping its trace in `log` (injected calls are marked
    /// `(INJECTED)` there).
    pub fn op_logged(&mut self, env: &Env, trace: &str, inject: &str, log: &Path, args: &[&str]) -> Outcome {
        self.op_with(env, Some((trace, inject)), log, args)
    }

    fn op_with(&mut self, env: &Env, strace: Option<(&str, &str)>, log: &Path, args: &[&str]) -> Outcome {
        let p = self.label("op");
        let mut cmd = match strace {
            Some((trace, inject)) => {
                let mut c = Command::new("strace");
                c.args(["-f", "-qq", "-o"])
                    .arg(log)
                    .arg("-e")
                    .arg(format!("trace={trace}"))
                    .args(["-e", &format!("inject={inject}"), "--"])
                    .arg(&env.op);
                c
            }
            None => Command::new(&env.op),
        };
        cmd.arg(&self.queue).arg(&p).args(args);
        let out = cmd
            .stdin(Stdio::null())
            .stdout(self.history_out())
            .stderr(Stdio::piped())
            .output()
            .expect("run torture-op");
        self.ended(&p, out.status);
        Outcome {
            p,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Records how a process ended: killed, or exited on its own.
    pub fn ended(&self, p: &str, status: ExitStatus) {
        use std::os::unix::process::ExitStatusExt;
        if status.signal().is_some() || status.code() == Some(128 + 9) {
            self.info(p, F::Kill);
        } else {
            self.rec
                .record(&Entry::new(p, Ty::Info, F::Exit).err(format!("{status}")));
        }
    }

    /// Drains the queue without faults, recording every operation, and returns what is left.
    pub fn drain(&self, limit: Duration) -> Final {
        let rec = Recorder::open(&self.history, "drain").expect("history");
        drain_queue(&self.queue, &rec, limit);
        final_state(&self.queue)
    }

    /// Checks the history against the queue as the drain left it.
    pub fn check(&self, fin: &Final) -> checker::Report {
        let (h, torn) = history::read(&self.history).expect("read history");
        let mut r = checker::check(&h, fin);
        r.torn_lines = torn as u64;
        r
    }
}

/// Claims and acknowledges every job until nothing is ready, scheduled or running (or `limit`
/// passes), taking back the claims of dead claimers first, recording every operation.
pub fn drain_queue(queue: &Path, rec: &Recorder, limit: Duration) {
    let store = open(queue).expect("open queue for the drain");
    let p = rec.p.clone();
    let start = Instant::now();
    while start.elapsed() < limit {
        rec.log(Ty::Invoke, F::Reclaim, "", "");
        match store.reclaim(1_000_000) {
            Ok(v) => {
                let mut e = Entry::new(&p, Ty::Ok, F::Reclaim);
                e.leases = v.into_iter().map(|r| r.old_token).collect();
                rec.record(&e);
            }
            Err(e) => rec.record(&Entry::new(&p, Ty::Fail, F::Reclaim).err(e)),
        }
        rec.log(Ty::Invoke, F::Claim, "", "");
        match store.claim(Duration::from_secs(600)) {
            Ok(Some(c)) => {
                rec.log(Ty::Ok, F::Claim, c.lease.id.as_str(), &c.lease.token);
                rec.log(Ty::Invoke, F::Ack, c.lease.id.as_str(), &c.lease.token);
                match store.ack(&c.lease) {
                    Ok(()) => rec.log(Ty::Ok, F::Ack, c.lease.id.as_str(), &c.lease.token),
                    Err(e) => rec.record(
                        &Entry::new(&p, Ty::Fail, F::Ack)
                            .job(c.lease.id.as_str())
                            .lease(&c.lease.token)
                            .err(e),
                    ),
                }
                continue;
            }
            Ok(None) => rec.log(Ty::Ok, F::Claim, "", ""),
            Err(e) => rec.record(&Entry::new(&p, Ty::Fail, F::Claim).err(e)),
        }
        match store.idle() {
            Ok(i) if i.is_idle() => break,
            _ => std::thread::sleep(Duration::from_millis(25)),
        }
    }
    let _ = store.retire();
}

/// Opens a queue directory or, when `queue` is a `redis://` URL, a Redis queue.
fn open(queue: &Path) -> jobspool::Result<std::sync::Arc<dyn jobspool::Store>> {
    jobspool::store::open(&queue.to_string_lossy(), false)
}

/// What a queue holds after a drain.
pub fn final_state(queue: &Path) -> Final {
    let store = open(queue).expect("open queue");
    let mut fin = Final::default();
    for j in store
        .list(
            &[
                State::Ready,
                State::Scheduled,
                State::Running,
                State::Dead,
                State::Quarantined,
            ],
            false,
        )
        .expect("list")
    {
        match j.state {
            State::Dead => {
                fin.dead.insert(j.id);
            }
            State::Quarantined => fin.quarantined += 1,
            s => fin.stranded.push(format!("{s} {}", j.id)),
        }
    }
    fin
}

/// The entries of `quarantine/` as (reason, job id): names are `TIME.REASON.FOLDER.ORIGINAL`
/// and job names end with `.ID` (the ids the scenarios use have no dots).
pub fn quarantined(queue: &Path) -> Vec<(String, String)> {
    entries(queue, "quarantine")
        .into_iter()
        .map(|n| {
            let reason = n.split('.').nth(1).unwrap_or("").to_string();
            let id = n.rsplit('.').next().unwrap_or("").to_string();
            (reason, id)
        })
        .collect()
}

/// How a faulted process ended.
#[derive(Debug)]
pub struct Outcome {
    pub p: String,
    pub status: ExitStatus,
    pub stderr: String,
}

impl Outcome {
    pub fn killed(&self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        self.status.signal().is_some() || self.status.code() == Some(137)
    }
}

/// Names of the entries of a queue folder.
pub fn entries(queue: &Path, folder: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(queue.join(folder))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Counts, per system call, how often `torture-op ARGS` makes each of `trace` on a queue set
/// up by `setup` (one unfaulted run).
pub fn count_syscalls(env: &Env, trace: &str, setup: &dyn Fn(&mut Run), args: &[&str]) -> HashMap<String, u64> {
    let mut run = Run::new(None);
    setup(&mut run);
    let log = run.dir.path().join("strace.log");
    let status = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&log)
        .arg("-e")
        .arg(format!("trace={trace}"))
        .arg("--")
        .arg(&env.op)
        .arg(&run.queue)
        .arg("count")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("strace");
    assert!(
        status.success() || status.code() == Some(1),
        "unfaulted run failed: {status}"
    );
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
        let line = line.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
        if line.starts_with("<...") || line.starts_with("+++") || line.starts_with("---") {
            continue;
        }
        if let Some(name) = line.split('(').next() {
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                *counts.entry(name.to_string()).or_default() += 1;
            }
        }
    }
    counts
}

/// Sets the modification time of every file in `tmp/` two hours back, so that garbage
/// collection (which spares younger files: they may be pushes in progress) treats them as
/// leftovers of crashed pushes.
pub fn age_tmp(queue: &Path) {
    let old = std::time::SystemTime::now() - Duration::from_secs(7200);
    for name in entries(queue, "tmp") {
        if let Ok(f) = File::options().write(true).open(queue.join("tmp").join(&name)) {
            let _ = f.set_modified(old);
        }
    }
}
