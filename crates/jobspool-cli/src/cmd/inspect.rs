//! Commands that look: ls, show, stats, status, logs.

use std::time::Duration;

use jobspool::job::{format_ms, now_ms};
use jobspool::store::{Detail, Event, EventKind, JobInfo};
use jobspool::{Error, JobId, Result, State};
use serde_json::{Value, json};

use super::open;
use crate::cli::StateFilter;
use crate::output::{age, argv_display, clip, preview, short_duration, table};

fn info_json(info: &JobInfo, now: u64) -> Value {
    let mut v = serde_json::to_value(info).expect("info serializes");
    v["age_ms"] = json!(now as i64 - info.since as i64);
    if let Some(job) = &info.job {
        v["created"] = json!(job.created);
        if let Some(cmd) = &job.command {
            v["command"] = json!(cmd.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>());
        }
        v["payload_bytes"] = json!(job.payload.len());
        v["payload_preview"] = json!(clip(&job.payload, 80));
    }
    v
}

pub fn ls(queue: &str, state: StateFilter, json: bool) -> Result<u8> {
    let store = open(queue)?;
    let jobs = store.list(&state.states(), true)?;
    let now = now_ms();
    if json {
        for info in &jobs {
            say!("{}", info_json(info, now))?;
        }
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                i.state.to_string(),
                i.attempts.to_string(),
                age(i.since, now),
                i.priority.to_string(),
                match &i.reason {
                    Some(r) => r.clone(),
                    None => preview(i.job.as_ref(), 60),
                },
            ]
        })
        .collect();
    crate::output::out(
        table(
            &["ID", "STATE", "ATTEMPTS", "AGE", "PRIORITY", "COMMAND/PAYLOAD"],
            &rows,
        )
        .as_bytes(),
        false,
    )?;
    Ok(0)
}

fn detail_json(d: &Detail, now: u64) -> Value {
    let info = JobInfo {
        job: d.job.clone(),
        ..d.info.clone()
    };
    let mut v = info_json(&info, now);
    if let Some(job) = &d.job {
        v["run_at"] = json!(job.run_at);
        v["max_attempts"] = json!(job.max_attempts);
        v["timeout_ms"] = json!(job.timeout.map(|t| t.as_millis() as u64));
        match std::str::from_utf8(&job.payload) {
            Ok(text) => v["payload"] = json!(text),
            Err(_) => v["payload_utf8"] = json!(false),
        }
    }
    v["dead_reason"] = json!(d.dead_reason());
    v["history"] = json!(d.history);
    v
}

fn print_history(history: &[Event]) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    say!("history:")?;
    for e in history {
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        say!(
            "  {}  {:<10} attempt {}{}{}",
            format_ms(e.at),
            kind,
            e.attempt,
            e.runner.as_deref().map(|r| format!("  runner {r}")).unwrap_or_default(),
            e.detail.as_deref().map(|d| format!("  {d}")).unwrap_or_default()
        )?;
    }
    Ok(())
}

/// `show` of a job that finished: it is gone from the queue, but its log and history are kept
/// (and keep its id reserved) until they are collected or removed.
fn show_finished(queue: &str, id: &str, history: &[Event], json: bool, payload: bool) -> Result<u8> {
    if payload {
        return Err(Error::Invalid(format!(
            "job {id} finished; its payload is no longer kept (only its log and history are)"
        )));
    }
    if json {
        let v = json!({
            "id": id,
            "state": "done",
            "finished": history.iter().rev().find(|e| e.kind == EventKind::Done).map(|e| e.at),
            "history": history,
        });
        say!("{v}")?;
        return Ok(0);
    }
    say!("{:<14}{id}", "id:")?;
    say!(
        "{:<14}done (finished; `jobspool logs {queue} {id}` shows its log)",
        "state:"
    )?;
    if let Some(e) = history.iter().rev().find(|e| e.kind == EventKind::Done) {
        say!("{:<14}{} ({})", "finished at:", format_ms(e.at), age(e.at, now_ms()))?;
    }
    say!(
        "{:<14}its log and history keep the id reserved until collected; `jobspool rm {queue} {id}` frees it",
        "note:"
    )?;
    print_history(history)?;
    Ok(0)
}

pub fn show(queue: &str, id: &str, json: bool, payload: bool) -> Result<u8> {
    let store = open(queue)?;
    let d = match store.get(id) {
        Ok(d) => d,
        Err(e @ Error::NotFound { .. }) => {
            let history = match JobId::new(id) {
                Ok(jid) => store.finished(&jid)?,
                Err(_) => None,
            };
            return match history {
                Some(history) => show_finished(queue, id, &history, json, payload),
                None => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    let now = now_ms();
    if payload {
        let job = d
            .job
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("{id} has no readable payload")))?;
        crate::output::out(&job.payload, false)?;
        return Ok(0);
    }
    if json {
        say!("{}", detail_json(&d, now))?;
        return Ok(0);
    }
    let i = &d.info;
    let mut lines = vec![
        ("id", i.id.clone()),
        ("state", i.state.to_string()),
        ("attempts", i.attempts.to_string()),
        ("priority", i.priority.to_string()),
    ];
    let since_label = match i.state {
        State::Ready => "ready since",
        State::Scheduled => "runs at",
        State::Running => "claimed at",
        State::Dead => "died at",
        State::Quarantined => "quarantined at",
    };
    lines.push((since_label, format!("{} ({})", format_ms(i.since), age(i.since, now))));
    if let Some(r) = &i.runner {
        lines.push(("runner", r.clone()));
    }
    if let Some(r) = &i.reason {
        lines.push(("reason", r.clone()));
    }
    if let Some(job) = &d.job {
        lines.push(("created", format_ms(job.created)));
        if let Some(n) = job.max_attempts {
            lines.push(("max attempts", n.to_string()));
        }
        if let Some(t) = job.timeout {
            lines.push(("timeout", short_duration(t.as_millis() as u64)));
        }
        if let Some(argv) = &job.command {
            lines.push(("command", argv_display(argv)));
        }
        lines.push((
            "payload",
            format!("{} bytes: {}", job.payload.len(), clip(&job.payload, 60)),
        ));
    }
    if let Some(r) = d.dead_reason() {
        lines.push(("dead reason", r.to_string()));
    }
    for (k, v) in lines {
        say!("{:<14}{v}", format!("{k}:"))?;
    }
    print_history(&d.history)?;
    Ok(0)
}

fn stats_json(s: &jobspool::store::Stats, now: u64) -> Value {
    json!({
        "ready": s.ready,
        "scheduled": s.scheduled,
        "running": s.running,
        "dead": s.dead,
        "quarantined": s.quarantined,
        "oldest_ready_age_ms": s.oldest_ready.map(|t| now.saturating_sub(t)),
    })
}

pub fn stats(queue: &str, json: bool) -> Result<u8> {
    let store = open(queue)?;
    let s = store.stats()?;
    let now = now_ms();
    if json {
        say!("{}", stats_json(&s, now))?;
        return Ok(0);
    }
    say!("ready        {}", s.ready)?;
    say!("scheduled    {}", s.scheduled)?;
    say!("running      {}", s.running)?;
    say!("dead         {}", s.dead)?;
    say!("quarantined  {}", s.quarantined)?;
    say!(
        "oldest ready {}",
        s.oldest_ready
            .map_or("-".to_string(), |t| short_duration(now.saturating_sub(t)))
    )?;
    Ok(0)
}

pub fn status(queue: &str, json: bool) -> Result<u8> {
    let store = open(queue)?;
    let s = store.stats()?;
    let runners = store.runners()?;
    let now = now_ms();
    if json {
        let mut v = stats_json(&s, now);
        v["runners"] = json!(runners);
        say!("{v}")?;
        return Ok(0);
    }
    stats(queue, false)?;
    say!("")?;
    let rows: Vec<Vec<String>> = runners
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                if r.alive { "alive".into() } else { "gone".into() },
                r.status.host.clone(),
                r.status.pid.to_string(),
                format!("{}/{}", r.status.running, r.status.slots),
                r.status.done.to_string(),
                r.status.failed.to_string(),
                r.status.dead.to_string(),
                age(r.heartbeat, now),
            ]
        })
        .collect();
    say_raw!(
        "{}",
        table(
            &[
                "RUNNER",
                "STATE",
                "HOST",
                "PID",
                "RUNNING",
                "DONE",
                "FAILED",
                "DEAD",
                "HEARTBEAT"
            ],
            &rows
        )
    )?;
    Ok(0)
}

pub fn logs(queue: &str, id: &str, follow: bool) -> Result<u8> {
    let store = open(queue)?;
    let jid = JobId::new(id.to_string())?;
    // No log yet: an unknown job is the same error with or without --follow; a job that has not
    // run yet has nothing to print (or, followed, will have).
    if store.read_log(&jid, 0)?.is_none() {
        match store.get(id) {
            Ok(_) => {}
            Err(e @ Error::NotFound { .. }) => {
                return match store.finished(&jid)? {
                    Some(_) => Ok(0),
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
        if !follow {
            return Ok(0);
        }
    }
    let mut offset = 0u64;
    let mut quiet_for = Duration::ZERO;
    loop {
        match store.read_log(&jid, offset)? {
            Some(bytes) if !bytes.is_empty() => {
                offset += bytes.len() as u64;
                crate::output::out(&bytes, false)?;
                quiet_for = Duration::ZERO;
            }
            Some(_) | None => {}
        }
        if !follow {
            return Ok(0);
        }
        // Stop following once the job has finished (done, dead or gone) and the log is quiet.
        if quiet_for >= Duration::from_secs(1) {
            quiet_for = Duration::ZERO;
            match store.get(id) {
                Ok(d) if matches!(d.info.state, State::Dead | State::Quarantined) => return Ok(0),
                Err(Error::NotFound { .. }) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        quiet_for += Duration::from_millis(200);
    }
}
