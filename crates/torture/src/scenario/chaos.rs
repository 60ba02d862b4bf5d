//! Scenario 4: several producers and workers as real processes on one queue, while the scenario
//! kills them (SIGKILL) and freezes them (SIGSTOP, then SIGCONT after more than their lease) at
//! random; then everything stops, a fault-free drain runs, and the history is checked.
//!
//! Scenario 3 (a real full disk) reuses it on a small loop-mounted ext4 (see `disk`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Figures;
use crate::history::F;
use crate::{Env, Run};

struct Proc {
    child: Child,
    p: String,
    worker: bool,
    /// When frozen: when to continue it.
    thaw_at: Option<Instant>,
}

/// Settings of one chaos run.
pub struct Chaos {
    pub producers: usize,
    pub workers: usize,
    pub jobs_per_producer: u64,
    /// Pause between two pushes of a producer (keeps the backlog within what workers drain).
    pub push_pause: Duration,
    pub lease: Duration,
    pub work: Duration,
    pub retry_pct: u64,
    /// Mean time between two faults.
    pub fault_every: Duration,
    pub duration: Duration,
    /// Stop starting producers once this many have been started (0: no limit).
    pub max_producer_runs: usize,
}

fn spawn(env: &Env, run: &mut Run, worker: bool, c: &Chaos) -> Proc {
    let p = run.label(if worker { "w" } else { "p" });
    let mut cmd = Command::new(&env.op);
    cmd.arg(&run.queue).arg(&p);
    if worker {
        cmd.args([
            "worker".to_string(),
            c.lease.as_millis().to_string(),
            c.work.as_millis().to_string(),
            "3600000".to_string(),
            c.retry_pct.to_string(),
        ]);
    } else {
        cmd.args([
            "producer".to_string(),
            p.clone(),
            c.jobs_per_producer.to_string(),
            c.push_pause.as_millis().to_string(),
        ]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(run.history_out())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn torture-op");
    Proc {
        child,
        p,
        worker,
        thaw_at: None,
    }
}

/// Runs the chaos on `run`'s queue and returns (kills, stops) made; leaves nothing running.
pub fn chaos(env: &Env, run: &mut Run, c: &Chaos, rng: &mut fastrand::Rng) -> (u64, u64, usize) {
    let mut procs: Vec<Proc> = Vec::new();
    let mut producer_runs = 0;
    for _ in 0..c.workers {
        procs.push(spawn(env, run, true, c));
    }
    for _ in 0..c.producers {
        procs.push(spawn(env, run, false, c));
        producer_runs += 1;
    }
    let (mut kills, mut stops) = (0u64, 0u64);
    let start = Instant::now();
    let mut next_fault = start + c.fault_every.mul_f64(rng.f64() * 2.0);
    while start.elapsed() < c.duration {
        std::thread::sleep(Duration::from_millis(10));
        let now = Instant::now();
        // Thaw frozen processes whose time has come.
        for pr in procs.iter_mut() {
            if pr.thaw_at.is_some_and(|t| t <= now) {
                let _ = kill(Pid::from_raw(pr.child.id() as i32), Signal::SIGCONT);
                run.info(&pr.p, F::Cont);
                pr.thaw_at = None;
            }
        }
        // Replace processes that ended (killed, or producers done).
        let mut i = 0;
        while i < procs.len() {
            if let Ok(Some(status)) = procs[i].child.try_wait() {
                let pr = procs.remove(i);
                run.ended(&pr.p, status);
                let limit = c.max_producer_runs == 0 || producer_runs < c.max_producer_runs;
                if pr.worker || limit {
                    if !pr.worker {
                        producer_runs += 1;
                    }
                    procs.push(spawn(env, run, pr.worker, c));
                }
                continue;
            }
            i += 1;
        }
        if now < next_fault || procs.is_empty() {
            continue;
        }
        next_fault = now + c.fault_every.mul_f64(rng.f64() * 2.0);
        let k = rng.usize(0..procs.len());
        let pr = &mut procs[k];
        if pr.thaw_at.is_some() {
            continue;
        }
        let pid = Pid::from_raw(pr.child.id() as i32);
        if pr.worker && rng.bool() {
            // Freeze it for one to three leases.
            if kill(pid, Signal::SIGSTOP).is_ok() {
                run.info(&pr.p, F::Stop);
                stops += 1;
                pr.thaw_at = Some(now + c.lease.mul_f64(1.0 + rng.f64() * 2.0));
            }
        } else if kill(pid, Signal::SIGKILL).is_ok() {
            let _ = pr.child.wait();
            run.info(&pr.p, F::Kill);
            kills += 1;
            let pr = procs.remove(k);
            let limit = c.max_producer_runs == 0 || producer_runs < c.max_producer_runs;
            if pr.worker || limit {
                if !pr.worker {
                    producer_runs += 1;
                }
                procs.push(spawn(env, run, pr.worker, c));
            }
        }
    }
    // The end: thaw, then kill everything that is left (recorded: they may hold leases).
    for mut pr in procs {
        let pid = Pid::from_raw(pr.child.id() as i32);
        if pr.thaw_at.is_some() {
            let _ = kill(pid, Signal::SIGCONT);
            run.info(&pr.p, F::Cont);
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = pr.child.wait();
        run.info(&pr.p, F::Kill);
    }
    (kills, stops, producer_runs)
}

/// Scenario 4.
pub fn chaos_scenario(env: &Env) -> Figures {
    chaos_on(env, "chaos", Run::new(None))
}

#[path = "../../../jobspool/tests/common/redis_server.rs"]
mod redis_server;

/// Scenario 4 on the Redis store: the same producers and workers, killed and frozen the same
/// way, against a private `redis-server` (AOF, `appendfsync always`). Leases expire by the
/// server's clock; a killed worker's claims come back when their lease does.
pub fn redis_chaos_scenario(env: &Env) -> Figures {
    let Some(server) = redis_server::RedisServer::start() else {
        let mut figs = Figures::new("redis-chaos");
        figs.skipped = Some("redis-server is not on PATH".into());
        return figs;
    };
    let figs = chaos_on(env, "redis-chaos", Run::redis(&server.url("chaos")));
    drop(server);
    figs
}

fn chaos_on(env: &Env, name: &str, mut run: Run) -> Figures {
    let mut figs = Figures::new(name);
    let mut rng = fastrand::Rng::with_seed(env.seed);
    let c = Chaos {
        producers: 2,
        workers: 3,
        jobs_per_producer: 50,
        push_pause: Duration::from_millis(4),
        lease: Duration::from_millis(1000),
        work: Duration::from_millis(4),
        retry_pct: 10,
        fault_every: Duration::from_millis(150),
        duration: env.duration,
        max_producer_runs: 0,
    };
    let start = Instant::now();
    let (kills, stops, producer_runs) = chaos(env, &mut run, &c, &mut rng);
    let fin = run.drain(Duration::from_secs(600));
    let r = run.check(&fin);
    figs.faults = kills + stops;
    figs.add_run(name, &r);
    figs.notes.push(format!(
        "{} producers and {} workers at a time for {:.0}s (lease {} ms): {} producer processes, {} SIGKILLs, {} SIGSTOPs past the lease",
        c.producers,
        c.workers,
        start.elapsed().as_secs_f64(),
        c.lease.as_millis(),
        producer_runs,
        kills,
        stops
    ));
    keep_history(&run, name);
    figs
}

/// Copies a run's history next to the figures when `TORTURE_KEEP` names a directory.
pub fn keep_history(run: &Run, name: &str) {
    if let Some(dir) = std::env::var_os("TORTURE_KEEP") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(&run.history, Path::new(&dir).join(format!("{name}.history.jsonl")));
    }
}
