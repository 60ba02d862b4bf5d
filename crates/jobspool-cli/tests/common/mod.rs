//! Helpers for tests that drive the real `jobspool` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_jobspool")
}

/// A fresh queue directory inside a temp dir (kept alive by the returned guard).
pub fn queue() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    let out = run(&["init", q.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (dir, q)
}

pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).stdin(Stdio::null()).env("JOBSPOOL_LOG", "info");
    c
}

pub fn run(args: &[&str]) -> Output {
    cmd(args).output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Pushes a job and returns its id.
pub fn push(q: &Path, args: &[&str]) -> String {
    let mut all = vec!["push", q.to_str().unwrap()];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(o.status.success(), "push failed: {}", stderr(&o));
    stdout(&o).trim().to_string()
}

/// Starts a command (a runner, usually) in the background with its output piped.
pub fn spawn(args: &[&str]) -> Running {
    Running(cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
}

/// A process a test started, killed and reaped when the test ends, however it ends: a test
/// that failed half-way used to leave its runner running, holding its pipes and its queue.
pub struct Running(pub Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `cond` up to `limit`; the limit is generous and only guards against a hang.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child to exit, up to `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn count(q: &Path, folder: &str) -> usize {
    std::fs::read_dir(q.join(folder)).map(|d| d.count()).unwrap_or(0)
}

pub fn stats(q: &Path) -> serde_json::Value {
    let o = run(&["stats", q.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Processes whose environment mentions `needle` (e.g. a queue path), other than this one.
pub fn processes_with_env(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        // Zombies have no environment and are not running.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z')) {
            continue;
        }
        if let Ok(env) = std::fs::read(e.path().join("environ")) {
            if env.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

/// CPU time (user + system, in clock ticks) of a process.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Voluntary context switches of all threads of a process (how often it went to sleep).
pub fn wakeups(pid: u32) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("status")) {
            for line in s.lines() {
                if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                    total += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    total
}

/// Live runners registered on a queue, as `status --json` reports them.
pub fn live_runners(qs: &str) -> usize {
    let o = run(&["status", qs, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["runners"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["alive"] == true).count())
}

/// An idle runner on queue `qs` sleeps (few wake-ups, no CPU) and starts a pushed job within
/// milliseconds; shared by the directory and Redis tests.
pub fn an_idle_runner_sleeps_and_wakes_at_once(qs: &str, scratch: &Path) {
    let marker = scratch.join("ran");
    let script = format!("echo \"$JOBSPOOL_JOB_ID $(date +%s%N)\" >> {}", marker.display());
    let mut r = spawn(&["run", qs, "-j", "1", "--", "sh", "-c", &script]);
    wait_for("registration", Duration::from_secs(60), || live_runners(qs) == 1);
    std::thread::sleep(Duration::from_millis(500));
    let pid = r.id();
    let (cpu0, wake0) = (cpu_ticks(pid), wakeups(pid));
    std::thread::sleep(Duration::from_secs(3));
    let (cpu1, wake1) = (cpu_ticks(pid), wakeups(pid));
    eprintln!(
        "idle for 3s: {} clock ticks of CPU, {} wake-ups",
        cpu1 - cpu0,
        wake1 - wake0
    );
    // A polling loop, even at 100ms, would wake 30 times here; the runner's tick is 10s.
    assert!(wake1 - wake0 <= 6, "an idle runner woke {} times in 3s", wake1 - wake0);
    assert!(
        cpu1 - cpu0 <= 2,
        "an idle runner used {} ticks of CPU in 3s",
        cpu1 - cpu0
    );
    // Wake-up latency, push command start to handler start, over 20 pushes each made as soon
    // as the previous job ran. A runner that polls would be woken by its poll, so each push
    // would land just after one and wait nearly a whole interval: a median under 500ms fails
    // any poll interval of a second or more, while an event-driven runner needs milliseconds
    // (the margin absorbs a loaded machine).
    let mut latencies_ms: Vec<f64> = Vec::new();
    for i in 0..20 {
        let id = format!("w{i}");
        let pushed = std::time::SystemTime::now();
        let o = run(&["push", qs, "--id", &id, "--payload", "wake up"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let mut ran_ns: Option<u128> = None;
        wait_for("the job to run", Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&marker).unwrap_or_default();
            ran_ns = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{id} ")).and_then(|t| t.trim().parse().ok()));
            ran_ns.is_some()
        });
        let pushed_ns = pushed.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        latencies_ms.push(ran_ns.unwrap().saturating_sub(pushed_ns) as f64 / 1e6);
    }
    latencies_ms.sort_by(f64::total_cmp);
    let median = latencies_ms[latencies_ms.len() / 2];
    eprintln!("wake-up latency (push command start to handler start): median {median:.1}ms, all {latencies_ms:.1?}");
    assert!(
        median < 500.0,
        "median wake-up latency {median:.0}ms: the runner polls instead of waking on a push ({latencies_ms:.0?})"
    );
    signal(&r, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        wait_exit(&mut r, Duration::from_secs(60)).and_then(|s| s.code()),
        Some(0)
    );
}
