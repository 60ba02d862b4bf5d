//! Commands that execute and watch execution: run, wait, check.

use std::time::{Duration, Instant};

use jobspool::job::now_ms;
use jobspool::runner::{Handler, KILL_AFTER, RunnerOptions};
use jobspool::{Result, State};

use super::open;
use crate::cli::{CheckArgs, RunArgs};
use crate::output::short_duration;

pub fn run(args: RunArgs) -> Result<u8> {
    let store = open(&args.queue)?;
    let handler = if args.handler.is_empty() {
        Handler::JobCommands
    } else {
        Handler::Command(args.handler)
    };
    let mut opts = RunnerOptions::new(handler);
    if let Some(j) = args.jobs {
        opts.slots = j as usize;
    }
    opts.drain = args.drain;
    opts.lease = args.lease;
    opts.timeout = args.timeout;
    opts.grace = args.grace;
    opts.kill_after = KILL_AFTER;
    opts.max_attempts = args.max_attempts;
    opts.backoff = args.backoff;
    opts.allow_job_commands = args.allow_job_commands;
    opts.progress = true;
    let report = jobspool::runner::run(store, opts)?;
    Ok(if args.drain && report.dead > 0 { 1 } else { 0 })
}

pub fn wait(queue: &str, timeout: Option<Duration>) -> Result<u8> {
    let store = open(queue)?;
    let started = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        let looked = Instant::now();
        let idle = store.idle()?;
        let cost = looked.elapsed();
        if idle.is_idle() {
            let s = store.stats()?;
            say!(
                "{queue}: all done after {}: nothing ready, scheduled or running; {} dead, {} quarantined",
                short_duration(started.elapsed().as_millis() as u64),
                s.dead,
                s.quarantined
            )?;
            return Ok(if s.dead > 0 { 1 } else { 0 });
        }
        let remaining = timeout.map(|t| t.saturating_sub(started.elapsed()));
        if remaining == Some(Duration::ZERO) {
            say!(
                "{queue}: timed out after {}: {} ready, {} scheduled, {} running",
                short_duration(started.elapsed().as_millis() as u64),
                idle.ready,
                idle.scheduled,
                idle.running
            )?;
            return Ok(124);
        }
        // Completions are not announced by the store, so look again after a short, growing
        // pause — and never spend more than a tenth of the time looking, on a large queue.
        let pause_now = pause.max(cost * 10);
        std::thread::sleep(remaining.map_or(pause_now, |r| r.min(pause_now)));
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warning,
    Critical,
}

pub fn check(args: CheckArgs) -> Result<u8> {
    match check_status(&args) {
        Ok((level, line)) => {
            let word = match level {
                Level::Ok => "OK",
                Level::Warning => "WARNING",
                Level::Critical => "CRITICAL",
            };
            say!("JOBSPOOL {word} - {line}")?;
            Ok(level as u8)
        }
        Err(e) => {
            say!("JOBSPOOL UNKNOWN - {e}")?;
            Ok(3)
        }
    }
}

fn check_status(a: &CheckArgs) -> Result<(Level, String)> {
    let store = open(&a.queue)?;
    let s = store.stats()?;
    let runners = store.runners()?;
    let live = runners.iter().filter(|r| r.alive).count() as u64;
    let now = now_ms();
    // "Long expired": past expiry by one more lease — the claim's own, which the runner that
    // made it chose (`run --lease`), else the queue's.
    let queue_lease_ms = store.config().lease.as_millis() as u64;
    let expired: Vec<_> = store
        .list(&[State::Running], false)?
        .into_iter()
        .filter(|j| {
            let lease_ms = j.lease_ms.unwrap_or(queue_lease_ms);
            j.expires.is_some_and(|e| now > e.saturating_add(lease_ms))
        })
        .collect();
    let oldest = s.oldest_ready.map(|t| now.saturating_sub(t));
    let mut problems: Vec<(Level, String)> = Vec::new();
    let crit_dead = a.crit_dead.unwrap_or(u64::MAX);
    if s.dead >= crit_dead {
        problems.push((Level::Critical, format!("{} dead (critical at {crit_dead})", s.dead)));
    } else if s.dead >= a.warn_dead.max(1) {
        problems.push((Level::Warning, format!("{} dead", s.dead)));
    }
    if let Some(age) = oldest {
        let over = |t: Option<Duration>| t.is_some_and(|t| age >= t.as_millis() as u64);
        if over(a.crit_age) {
            problems.push((
                Level::Critical,
                format!("oldest ready job waited {}", short_duration(age)),
            ));
        } else if over(a.warn_age) {
            problems.push((
                Level::Warning,
                format!("oldest ready job waited {}", short_duration(age)),
            ));
        }
    }
    if live < a.min_runners {
        problems.push((
            Level::Critical,
            format!("{live} live runner(s), fewer than {}", a.min_runners),
        ));
    }
    if !expired.is_empty() {
        let level = if live == 0 { Level::Critical } else { Level::Warning };
        problems.push((
            level,
            format!(
                "{} running job(s) with long-expired leases{}",
                expired.len(),
                if live == 0 {
                    " and no live runner to reclaim them"
                } else {
                    " not reclaimed"
                }
            ),
        ));
    }
    // Set-ups that cannot keep the contract: a Redis server that does not fsync its AOF, a
    // queue directory whose permissions break sharing.
    for p in store.doctor()? {
        problems.push((Level::Warning, p));
    }
    if s.quarantined > 0 {
        problems.push((Level::Warning, format!("{} quarantined file(s)", s.quarantined)));
    }
    problems.sort_by_key(|p| std::cmp::Reverse(p.0));
    let level = problems.first().map_or(Level::Ok, |p| p.0);
    let summary = if problems.is_empty() {
        format!(
            "{} ready, {} running, {} dead, {live} runner(s)",
            s.ready, s.running, s.dead
        )
    } else {
        problems.iter().map(|p| p.1.clone()).collect::<Vec<_>>().join("; ")
    };
    let ms = |d: Option<Duration>| d.map(|d| (d.as_millis() / 1000).to_string()).unwrap_or_default();
    let perf = format!(
        "ready={} scheduled={} running={} dead={};{};{};0 quarantined={} oldest_age={}s;{};{};0 runners={};;{};0",
        s.ready,
        s.scheduled,
        s.running,
        s.dead,
        a.warn_dead.max(1),
        a.crit_dead.map(|c| c.to_string()).unwrap_or_default(),
        s.quarantined,
        oldest.unwrap_or(0) / 1000,
        ms(a.warn_age),
        ms(a.crit_age),
        live,
        // Nagios range syntax: `N:` alerts when the value is below N.
        if a.min_runners > 0 {
            format!("{}:", a.min_runners)
        } else {
            String::new()
        },
    );
    Ok((level, format!("{summary} | {perf}")))
}
