//! Peers: the scripts in `shared/bench/peers/` are called as they are (never rewritten); their
//! `RESULT {json}` lines are read back.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::report::PeerRow;

/// The class of a peer: which jobspool figures it is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// One process per job (`true`), 2-way parallel.
    Process,
    /// In-process no-op jobs, 2 consumers.
    InProcess,
}

pub struct Peer {
    pub name: &'static str,
    pub class: Class,
    /// Interpreter and script, then arguments; `N` and `REPS` are replaced.
    pub argv: &'static [&'static str],
    /// Largest N worth running (nq is O(N²), pueue ticks every 300 ms).
    pub max_n: usize,
    /// Skip unless asked for explicitly (slow).
    pub slow: bool,
}

pub const PEERS: &[Peer] = &[
    Peer {
        name: "tsp",
        class: Class::Process,
        argv: &["bash", "bench_tsp.sh", "N", "REPS"],
        max_n: 1000,
        slow: false,
    },
    Peer {
        name: "nq",
        class: Class::Process,
        argv: &["bash", "bench_nq.sh", "N", "REPS", "2", "held"],
        max_n: 1000,
        slow: false,
    },
    Peer {
        name: "pueue",
        class: Class::Process,
        argv: &["bash", "bench_pueue.sh", "N", "REPS", "held"],
        max_n: 200,
        slow: true,
    },
    Peer {
        name: "rq-fork",
        class: Class::Process,
        argv: &["python3", "bench_rq.py", "N", "REPS", "always", "fork"],
        max_n: 1000,
        slow: true,
    },
    Peer {
        name: "rq",
        class: Class::InProcess,
        argv: &["python3", "bench_rq.py", "N", "REPS", "always", "simple"],
        max_n: 100_000,
        slow: false,
    },
    Peer {
        name: "huey",
        class: Class::InProcess,
        argv: &["python3", "bench_huey.py", "N", "REPS", "default"],
        max_n: 100_000,
        slow: false,
    },
    Peer {
        name: "persist-queue",
        class: Class::InProcess,
        argv: &["python3", "bench_persistqueue.py", "N", "REPS", "sqlite-ack"],
        max_n: 100_000,
        slow: false,
    },
    Peer {
        name: "beanstalkd",
        class: Class::InProcess,
        argv: &["python3", "bench_beanstalkd.py", "N", "REPS", "0"],
        max_n: 100_000,
        slow: false,
    },
    Peer {
        name: "beanstalkd-f50",
        class: Class::InProcess,
        argv: &["python3", "bench_beanstalkd.py", "N", "REPS", "50"],
        max_n: 100_000,
        slow: false,
    },
    Peer {
        name: "postgres",
        class: Class::InProcess,
        argv: &["python3", "bench_postgres.py", "N", "REPS", "on"],
        max_n: 100_000,
        slow: false,
    },
];

/// Runs one peer script with a time limit (its whole process group is killed past it).
/// Returns its rows, or one skipped row saying why.
pub fn run(dir: &Path, peer: &Peer, n: usize, reps: usize, limit: Duration, log: &Path) -> Vec<PeerRow> {
    let n = n.min(peer.max_n);
    let args: Vec<String> = peer.argv[1..]
        .iter()
        .map(|a| match *a {
            "N" => n.to_string(),
            "REPS" => reps.to_string(),
            s => s.to_string(),
        })
        .collect();
    let skipped = |why: String| {
        vec![PeerRow {
            peer: peer.name.into(),
            variant: args[1..].join(" "),
            n: n as u64,
            enqueue: None,
            drain: None,
            durability: String::new(),
            ours: None,
            note: format!("skipped: {why}"),
        }]
    };
    let Ok(out) = std::fs::File::create(log) else {
        return skipped(format!("cannot write {}", log.display()));
    };
    let Ok(err) = out.try_clone() else {
        return skipped("cannot dup the log".into());
    };
    let child = Command::new(peer.argv[0])
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return skipped(format!("{}: {e}", peer.argv[0])),
    };
    let t = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if t.elapsed() > limit => {
                let pg = nix::unistd::Pid::from_raw(-(child.id() as i32));
                let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGTERM);
                std::thread::sleep(Duration::from_secs(2));
                let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break None,
        }
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut rows = Vec::new();
    for line in text.lines() {
        let Some(json) = line.strip_prefix("RESULT ") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            continue;
        };
        rows.push(PeerRow {
            peer: v["peer"].as_str().unwrap_or(peer.name).to_string(),
            variant: v["variant"].as_str().unwrap_or("").to_string(),
            n: v["n"].as_u64().unwrap_or(n as u64),
            enqueue: v["enqueue_rate"].as_f64(),
            drain: v["drain_rate"].as_f64(),
            durability: v["durability"].as_str().unwrap_or("").to_string(),
            ours: None,
            note: String::new(),
        });
    }
    if rows.is_empty() {
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .chars()
            .take(160)
            .collect::<String>();
        let why = match status {
            None => format!("no result within {} s", limit.as_secs()),
            Some(st) => format!("{st}: {last}"),
        };
        return skipped(why);
    }
    if rows.len() > 1 {
        // Median per variant over the repetitions.
        let mut merged: Vec<PeerRow> = Vec::new();
        for r in &rows {
            if merged.iter().any(|m| m.variant == r.variant) {
                continue;
            }
            let same: Vec<&PeerRow> = rows.iter().filter(|x| x.variant == r.variant).collect();
            let med = |f: &dyn Fn(&PeerRow) -> Option<f64>| {
                let mut v: Vec<f64> = same.iter().filter_map(|x| f(x)).collect();
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied()
            };
            let mut m = r.clone();
            m.enqueue = med(&|x| x.enqueue);
            m.drain = med(&|x| x.drain);
            m.note = format!("median of {}", same.len());
            merged.push(m);
        }
        rows = merged;
    }
    rows
}
