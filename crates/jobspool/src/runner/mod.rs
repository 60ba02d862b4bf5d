//! The runner: claims jobs and runs a handler for each, in N slots, until it is told to stop.
//!
//! What it guarantees, and how:
//!
//! - **Every job ends done or dead**, following the exit-code contract in [`outcome`]. Each
//!   attempt's output is appended to the job's log between a header and a trailer.
//! - **No handler outlives its job or the runner.** Handlers run in their own process group with
//!   the parent-death signal set ([`child`]); timeouts, lease loss and shutdown signal the whole
//!   group, and whatever a handler leaves in its group when it exits is killed.
//! - **A lost lease stops the work.** Each running job's lease is heartbeated; when the
//!   heartbeat finds it lost, the handler is stopped and the job is not acknowledged.
//! - **Shutdown is bounded.** Signals are events on a channel ([`signals`]). SIGTERM or SIGINT
//!   stops claiming and lets running jobs finish within the grace period; then their groups get
//!   SIGTERM, then SIGKILL after a short deadline; unfinished jobs go back to ready without a
//!   failure counted. A second SIGTERM/SIGINT (or SIGQUIT) skips the grace period. Other signals
//!   never cancel a shutdown.
//! - **Idle costs nothing.** The runner sleeps until the store's watch reports new work, a
//!   scheduled job comes due, or its periodic tick (registration heartbeat and reclaim of
//!   expired leases) is due. There is no polling loop.

mod alarm;
pub mod child;
mod orphans;
pub mod outcome;
mod reaper;
mod signals;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use self::child::Spawn;
use self::outcome::{Decision, Ended, decide};
use self::signals::Sig;
use crate::config::{Backoff, format_duration};
use crate::error::{Error, Result};
use crate::job::{Job, JobId, format_ms, now_ms};
use crate::store::{Claim, Event, EventKind, JobLog, Lease, Outcome, RunnerStatus, Store, Wakeup};

/// The longest a stopped handler gets between SIGTERM and SIGKILL.
pub const KILL_AFTER: Duration = Duration::from_secs(5);

/// How often leftover temp files and old logs are collected.
const GC_EVERY: Duration = Duration::from_secs(3600);

/// How long the runner waits after a store error before claiming again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// How long a job claimed ahead (while every slot was busy) is held for a slot to come free
/// before it is given back, unstarted and not counted as an attempt. Claiming ahead takes the
/// claim and the opening of the job's log off the path from one handler's end to the next
/// one's start; the bound keeps a runner busy with long jobs from sitting on work another
/// runner could start. Jobs are claimed ahead only after a handler ran shorter than this.
const AHEAD_HOLD: Duration = Duration::from_millis(100);

/// A handler function's failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerError {
    /// Try again later (like exit 75).
    Retry(String),
    /// Never try again (like exit 100).
    Permanent(String),
    /// Failed; retried until attempts are exhausted (like any other exit code).
    Failed(String),
}

/// What a handler function sees.
pub struct JobContext {
    /// The job.
    pub job: Job,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    cancel: Arc<AtomicBool>,
}

impl JobContext {
    /// True once the runner wants the function to stop early (timeout, lease lost, shutdown).
    /// Functions cannot be killed; long ones should check this and return.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// A handler function run in-process, on a blocking thread.
pub type HandlerFn = Arc<dyn Fn(&JobContext) -> std::result::Result<(), HandlerError> + Send + Sync>;

/// What runs for each job.
#[derive(Clone)]
pub enum Handler {
    /// A program and its arguments, run with the payload on standard input.
    Command(Vec<OsString>),
    /// A function, run in this process.
    Function(HandlerFn),
    /// Nothing but the jobs' own commands (requires `allow_job_commands`).
    JobCommands,
}

/// How a runner runs. Unset limits come from the queue's configuration.
#[derive(Clone)]
pub struct RunnerOptions {
    /// Jobs run at once.
    pub slots: usize,
    /// Exit once nothing is ready, scheduled or running.
    pub drain: bool,
    /// Lease duration.
    pub lease: Option<Duration>,
    /// Time limit per attempt, for jobs that set none.
    pub timeout: Option<Duration>,
    /// How long running jobs may take to finish after SIGTERM/SIGINT.
    pub grace: Duration,
    /// How long a handler gets between SIGTERM and SIGKILL.
    pub kill_after: Duration,
    /// Attempt limit, for jobs that set none.
    pub max_attempts: Option<u32>,
    /// Delay between attempts.
    pub backoff: Option<Backoff>,
    /// Run jobs that carry their own command.
    pub allow_job_commands: bool,
    /// The handler.
    pub handler: Handler,
    /// Show a one-line progress display on standard error (when it is a terminal).
    pub progress: bool,
}

impl RunnerOptions {
    /// Options for running `handler` with the defaults of the command line.
    pub fn new(handler: Handler) -> RunnerOptions {
        RunnerOptions {
            slots: std::thread::available_parallelism().map_or(1, |n| n.get()),
            drain: false,
            lease: None,
            timeout: None,
            grace: Duration::from_secs(30),
            kill_after: KILL_AFTER,
            max_attempts: None,
            backoff: None,
            allow_job_commands: false,
            handler,
            progress: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Jobs done.
    pub done: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Jobs that went dead.
    pub dead: u64,
    /// Jobs given back unfinished, their attempt not counted: at shutdown, or claimed ahead
    /// and not started in time.
    pub released: u64,
    /// Attempts abandoned because their lease was lost.
    pub lease_lost: u64,
    /// Claims of other (dead or stuck) claimers taken back.
    pub reclaimed: u64,
}

struct Settings {
    lease: Duration,
    heartbeat: Duration,
    timeout: Duration,
    max_attempts: u32,
    backoff: Backoff,
    kill_after: Duration,
}

impl Settings {
    /// The attempts a job gets: its own limit, else the runner's; at least one.
    fn max_attempts(&self, job: &Job) -> u32 {
        job.max_attempts.unwrap_or(self.max_attempts).max(1)
    }
}

struct Shared {
    store: Arc<dyn Store>,
    reaper: Mutex<reaper::Reaper>,
    settings: Settings,
    handler: Handler,
    /// Where the handler command's program is, found when the runner started.
    handler_path: Option<PathBuf>,
    allow_job_commands: bool,
    runner_id: String,
    host: String,
    /// This process's id, for the attempts' headers.
    pid: u32,
    /// Where to make a local store's calls.
    call_time: CallTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Run,
    Term,
    Kill,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Running,
    /// Waiting for running jobs until the grace deadline.
    Draining(Instant),
    /// Groups got SIGTERM; SIGKILL at the deadline.
    Terminating(Instant),
    /// Groups got SIGKILL; waiting for them to be reaped.
    Killing,
}

struct JobEnd {
    id: JobId,
    attempt: u32,
    ended: Ended,
    decision: Decision,
    took: Duration,
    error: Option<Error>,
}

/// The executable file `program` names, directly or through `PATH`.
fn find_program(program: &std::ffi::OsStr) -> Option<PathBuf> {
    use nix::unistd::{AccessFlags, access};
    let runnable = |p: &std::path::Path| p.is_file() && access(p, AccessFlags::X_OK).is_ok();
    if program.as_encoded_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return runnable(&path).then_some(path);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|candidate| runnable(candidate))
}

/// Runs a blocking store call off the async thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs until stopped by a signal (or, with `drain`, until the queue is empty), on a runtime of
/// its own. Handlers are started from the calling thread, which must outlive the run.
pub fn run(store: Arc<dyn Store>, opts: RunnerOptions) -> Result<RunReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(store.target(), "starting the runtime", e))?;
    // The loop runs as a task, not as `block_on`'s own future: waking a task from another
    // task on this thread is a push to the run queue, where waking `block_on`'s future writes
    // to the runtime's eventfd and costs a trip through epoll (twice per job).
    rt.block_on(async move {
        match tokio::spawn(run_async(store, opts)).await {
            Ok(report) => report,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    })
}

/// Shortest lease a runner accepts (the queue configuration's minimum too).
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// The runner's event loop.
pub async fn run_async(store: Arc<dyn Store>, opts: RunnerOptions) -> Result<RunReport> {
    // Signals first: until they are handled, SIGTERM or SIGALRM would kill the runner outright.
    let mut sigs = signals::listen().map_err(|e| Error::io(store.target(), "installing signal handlers", e))?;
    if opts.slots == 0 {
        return Err(Error::Invalid("a runner needs at least one slot (-j 1 or more)".into()));
    }
    if matches!(&opts.handler, Handler::Command(argv) if argv.is_empty()) {
        return Err(Error::Invalid(
            "no handler: give a command after --, or --allow-job-commands".into(),
        ));
    }
    // The handler is looked up in PATH once, here, rather than by every job's exec.
    let handler_path = match &opts.handler {
        Handler::Command(argv) => Some(find_program(&argv[0]).ok_or_else(|| {
            Error::Invalid(format!(
                "handler {:?} is not an executable file or a program on PATH; give the full path of the program to run for each job",
                argv[0]
            ))
        })?),
        _ => None,
    };
    if matches!(opts.handler, Handler::JobCommands) && !opts.allow_job_commands {
        return Err(Error::Invalid(
            "no handler: give a command after --, or --allow-job-commands to run the jobs' own commands".into(),
        ));
    }
    // The same limits a push and the queue's configuration enforce: out-of-range values would
    // make claims no store can represent, or jobs that can never run.
    if let Some(lease) = opts.lease {
        if lease < MIN_LEASE {
            return Err(Error::Invalid(format!(
                "lease of {} is too short: it must be at least {} (heartbeats go every third of it)",
                format_duration(lease),
                format_duration(MIN_LEASE)
            )));
        }
        crate::job::lease_ms(lease)?;
    }
    if opts.timeout == Some(Duration::ZERO) {
        return Err(Error::Invalid("timeout must be longer than 0".into()));
    }
    if let Some(t) = opts.timeout.filter(|t| *t > crate::job::MAX_DURATION) {
        return Err(Error::Invalid(format!(
            "timeout of {} is too long: the longest is 100 years",
            format_duration(t)
        )));
    }
    if opts.max_attempts == Some(0) {
        return Err(Error::Invalid("max attempts must be at least 1".into()));
    }
    let cfg = store.config().clone();
    let lease = opts.lease.unwrap_or(cfg.lease).max(MIN_LEASE);
    let settings = Settings {
        lease,
        heartbeat: (lease / 3).max(Duration::from_millis(30)),
        timeout: opts.timeout.unwrap_or(cfg.timeout),
        max_attempts: opts.max_attempts.unwrap_or(cfg.max_attempts).max(1),
        backoff: opts.backoff.unwrap_or(cfg.backoff),
        kill_after: opts.kill_after,
    };
    let tick_every = settings.heartbeat.min(Duration::from_secs(10));
    let mut status = RunnerStatus::for_this_process(opts.slots as u32);
    let runner_id = {
        let (s, st) = (Arc::clone(&store), status.clone());
        blocking(move || s.announce(&st)).await?
    };
    let guardian =
        reaper::Reaper::start().map_err(|e| Error::io(store.target(), "starting the guardian process", e))?;
    let shared = Arc::new(Shared {
        store: Arc::clone(&store),
        reaper: Mutex::new(guardian),
        settings,
        handler: opts.handler.clone(),
        handler_path,
        allow_job_commands: opts.allow_job_commands,
        runner_id: runner_id.clone(),
        host: status.host.clone(),
        pid: std::process::id(),
        call_time: CallTime::default(),
    });
    tracing::info!(
        queue = store.target(),
        runner = %runner_id,
        slots = opts.slots,
        lease = %format_duration(shared.settings.lease),
        "runner started"
    );

    let work = Arc::new(Notify::new());
    let runner_exited = Arc::new(Notify::new());
    let watch_guard = {
        let (w, r) = (Arc::clone(&work), Arc::clone(&runner_exited));
        store.watch(Arc::new(move |wake: Wakeup| {
            if wake.work {
                w.notify_one();
            }
            if wake.runner_exited {
                r.notify_one();
            }
        }))?
    };

    // Without a timerfd (it cannot fail on Linux short of running out of descriptors), tokio's
    // timer does the same job with a few more wake-ups.
    let alarm = alarm::Alarm::new()
        .inspect_err(|e| tracing::warn!("no timerfd ({e}); using the runtime's timer"))
        .ok();
    let (stop_tx, stop_rx) = watch::channel(Stop::Run);
    let mut jobs: JoinSet<JobEnd> = JoinSet::new();
    // A slot is busy while its handler runs. A job's task outlives its handler by the
    // bookkeeping that records the outcome (log trailer, ack, history), which runs beside the
    // next job's handler instead of delaying it: at most one such tail per slot, so at most
    // `2 × slots` tasks.
    let (slot_tx, mut slot_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut handlers = 0usize;
    // Claims run as tasks beside this loop, one per free slot, so that a store with a round
    // trip per claim (Redis) fills N slots in the time of one round trip, not N, and the loop
    // goes on reaping handlers meanwhile.
    let mut claims: JoinSet<Result<Option<(Claim, Opened)>>> = JoinSet::new();
    // While every slot is busy with short jobs, one job is claimed ahead (within the same
    // `2 × slots` claims), to start the moment a slot frees; given back if none frees in time.
    let mut held: Option<(Claim, Opened, tokio::time::Instant)> = None;
    let hold = AHEAD_HOLD.min(shared.settings.lease / 4);
    // How long the last handler to end ran; whether the last claim found a job; whether this
    // turn of the loop was woken by a claim that found none (which must not claim again).
    let (mut last_ran, mut found_more, mut found_none) = (Duration::MAX, false, false);
    let mut running: HashMap<tokio::task::Id, (JobId, u32, Instant)> = HashMap::new();
    let mut report = RunReport::default();
    let mut phase = Phase::Running;
    // The first upkeep pass comes before any claim, so that every run makes it, even one that
    // finds nothing to do (`run --drain` on an empty queue): claims of dead runners are taken
    // back (and so can be run now), stray files in running/ and dead/ are quarantined, leftovers
    // collected. The registration was just announced, so the first tick waits a full period.
    reclaim(&shared, &mut report).await;
    collect_garbage(&store).await;
    let mut next_tick = tokio::time::Instant::now() + tick_every;
    let mut next_gc = Instant::now() + GC_EVERY;
    let mut paused_until: Option<tokio::time::Instant> = None;
    let mut progress = Progress::new(opts.progress && std::io::stderr().is_terminal());
    // Starts a claimed job's handler in a free slot.
    macro_rules! start_job {
        ($claim:expr, $opened:expr) => {{
            let (claim, opened): (Claim, Opened) = ($claim, $opened);
            let (id, attempt) = (claim.lease.id.clone(), claim.lease.attempt);
            handlers += 1;
            let slot = Slot(Some(slot_tx.clone()));
            let handle = jobs.spawn(run_job(Arc::clone(&shared), claim, opened, Some(slot), stop_rx.clone()));
            running.insert(handle.id(), (id, attempt, Instant::now()));
        }};
    }

    loop {
        let now = tokio::time::Instant::now();
        if paused_until.is_some_and(|t| t <= now) {
            paused_until = None;
        }
        // Claim for the free slots.
        if phase == Phase::Running && paused_until.is_none() {
            // A job claimed ahead takes the first free slot.
            if handlers < opts.slots {
                if let Some((claim, opened, _)) = held.take() {
                    start_job!(claim, opened);
                }
            }
            let claimed = jobs.len() + claims.len() + usize::from(held.is_some());
            let free = opts.slots.saturating_sub(handlers + claims.len());
            // One claim until one finds a job, then one per free slot; while every slot is
            // busy with short jobs, one ahead.
            let want = if found_none {
                0
            } else if free > 0 {
                if found_more {
                    free
                } else {
                    usize::from(claims.is_empty())
                }
            } else {
                usize::from(found_more && held.is_none() && claims.is_empty() && last_ran < hold)
            };
            for _ in 0..want.min((2 * opts.slots).saturating_sub(claimed)) {
                claims.spawn(claim_next(Arc::clone(&shared)));
            }
            if opts.drain && jobs.is_empty() && claims.is_empty() && held.is_none() && paused_until.is_none() {
                let s = Arc::clone(&store);
                match blocking(move || s.idle()).await {
                    Ok(idle) if idle.is_idle() => break,
                    Ok(_) => {}
                    Err(e) => tracing::warn!("completion check failed: {e}"),
                }
            }
        } else if phase != Phase::Running && jobs.is_empty() && claims.is_empty() && held.is_none() {
            break;
        }
        found_none = false;

        // Sleep until something happens.
        let mut wake_at = next_tick;
        if let Some(t) = paused_until {
            wake_at = wake_at.min(t);
        }
        // Waiting for a free slot (or for a job's bookkeeping to end) needs no due time: the
        // job's task ending wakes the loop.
        let claiming =
            phase == Phase::Running && claims.is_empty() && handlers < opts.slots && jobs.len() < 2 * opts.slots;
        if claiming {
            let s = Arc::clone(&store);
            if let Ok(Some(due)) = blocking(move || s.next_due()).await {
                let wait = Duration::from_millis(due.saturating_sub(now_ms()));
                wake_at = wake_at.min(tokio::time::Instant::now() + wait);
            }
        }
        match phase {
            Phase::Draining(t) | Phase::Terminating(t) => wake_at = wake_at.min(t.into()),
            _ => {}
        }
        if let Some((_, _, until)) = &held {
            wake_at = wake_at.min(*until);
        }
        tokio::select! {
            biased;
            Some(sig) = sigs.recv() => {
                phase = on_signal(sig, phase, &opts, &stop_tx, &running, &report, jobs.len());
            }
            Some(ran) = slot_rx.recv() => {
                handlers -= 1;
                last_ran = ran;
            }
            Some(joined) = jobs.join_next_with_id(), if !jobs.is_empty() => {
                let end = match joined {
                    Ok((task, end)) => {
                        running.remove(&task);
                        end
                    }
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                };
                account(&end, &mut report);
                if matches!(end.ended, Ended::NoResources(_)) {
                    // Claiming more would only hand more jobs to a runner that cannot start them.
                    tracing::error!("{}; claiming again in {}", end.ended.describe(), format_duration(ERROR_PAUSE));
                    paused_until = Some(tokio::time::Instant::now() + ERROR_PAUSE);
                }
                progress.show(&report, handlers, opts.slots, false);
            }
            _ = work.notified(), if claiming => {}
            Some(claimed) = claims.join_next(), if !claims.is_empty() => {
                match claimed.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())) {
                    Ok(Some((claim, opened))) => {
                        found_more = true;
                        if phase == Phase::Running && handlers < opts.slots && held.is_none() {
                            start_job!(claim, opened);
                        } else if phase == Phase::Running && held.is_none() {
                            held = Some((claim, opened, tokio::time::Instant::now() + hold));
                        } else {
                            jobs.spawn(run_job(Arc::clone(&shared), claim, opened, None, stop_rx.clone()));
                        }
                    }
                    Ok(None) => (found_more, found_none) = (false, true),
                    Err(e) => {
                        tracing::error!("claiming failed: {e}; trying again in {}", format_duration(ERROR_PAUSE));
                        paused_until = Some(tokio::time::Instant::now() + ERROR_PAUSE);
                    }
                }
            }
            _ = runner_exited.notified() => {
                reclaim(&shared, &mut report).await;
            }
            _ = sleep(&alarm, wake_at) => {}
        }

        let now = tokio::time::Instant::now();
        if now >= next_tick {
            next_tick = now + tick_every;
            status.running = handlers as u32;
            status.done = report.done;
            status.failed = report.retried;
            status.dead = report.dead;
            let (s, st) = (Arc::clone(&store), status.clone());
            if let Err(e) = blocking(move || s.announce(&st)).await {
                tracing::warn!("updating the runner registration failed: {e}");
            }
            if phase == Phase::Running {
                reclaim(&shared, &mut report).await;
            }
            if next_gc <= Instant::now() {
                next_gc = Instant::now() + GC_EVERY;
                collect_garbage(&store).await;
            }
            progress.show(&report, handlers, opts.slots, true);
        }
        phase = escalate(phase, &stop_tx, &shared.settings, jobs.len());
        // The job claimed ahead goes back when no slot came free in time (one that just did
        // takes it at the top of the loop), or at shutdown.
        let usable = handlers < opts.slots && paused_until.is_none();
        let expired = |until: &tokio::time::Instant| *until <= tokio::time::Instant::now() && !usable;
        if held
            .as_ref()
            .is_some_and(|(_, _, until)| phase != Phase::Running || expired(until))
        {
            let (claim, opened, _) = held.take().expect("checked above");
            jobs.spawn(run_job(Arc::clone(&shared), claim, opened, None, stop_rx.clone()));
            // No claiming ahead again until a handler ends and shows the jobs are short.
            last_ran = Duration::MAX;
        }
    }

    drop(watch_guard);
    progress.finish(&report);
    let s = Arc::clone(&store);
    if let Err(e) = blocking(move || s.retire()).await {
        tracing::warn!("removing the runner registration failed: {e}");
    }
    tracing::info!(
        done = report.done,
        retried = report.retried,
        dead = report.dead,
        released = report.released,
        "runner stopped"
    );
    Ok(report)
}

fn on_signal(
    sig: Sig,
    phase: Phase,
    opts: &RunnerOptions,
    stop_tx: &watch::Sender<Stop>,
    running: &HashMap<tokio::task::Id, (JobId, u32, Instant)>,
    report: &RunReport,
    jobs: usize,
) -> Phase {
    let terminate_now = |why: &str| {
        tracing::warn!(
            "{why}: stopping {jobs} running job(s) now (SIGTERM, SIGKILL after {})",
            format_duration(opts.kill_after)
        );
        let _ = stop_tx.send(Stop::Term);
        Phase::Terminating(Instant::now() + opts.kill_after)
    };
    match (sig, phase) {
        (Sig::Term | Sig::Int, Phase::Running) => {
            tracing::info!(
                "received {}: no new claims; waiting up to {} for {jobs} running job(s)",
                if sig == Sig::Term { "SIGTERM" } else { "SIGINT" },
                format_duration(opts.grace)
            );
            Phase::Draining(Instant::now() + opts.grace)
        }
        (Sig::Term | Sig::Int, Phase::Draining(_)) => terminate_now("second stop signal"),
        (Sig::Quit, Phase::Running | Phase::Draining(_)) => terminate_now("received SIGQUIT"),
        (Sig::Term | Sig::Int | Sig::Quit, p) => p,
        (Sig::Usr1, p) => {
            let now = Instant::now();
            let list: Vec<String> = running
                .values()
                .map(|(id, attempt, since)| {
                    format!(
                        "{id} (attempt {attempt}, {})",
                        format_duration(Duration::from_millis(now.duration_since(*since).as_millis() as u64))
                    )
                })
                .collect();
            tracing::info!(
                phase = ?p,
                done = report.done,
                retried = report.retried,
                dead = report.dead,
                released = report.released,
                reclaimed = report.reclaimed,
                "status: {} running: [{}]",
                running.len(),
                list.join(", ")
            );
            p
        }
        (Sig::Ignored(name), p) => {
            tracing::info!("received {name}; ignored");
            p
        }
    }
}

/// Sleeps until `at` on the event loop's timerfd, or the runtime's timer without one.
async fn sleep(alarm: &Option<alarm::Alarm>, at: tokio::time::Instant) {
    if let Some(a) = alarm {
        if a.sleep_until(at).await.is_ok() {
            return;
        }
    }
    sleep_until(at).await;
}

/// Moves a shutdown along when its deadline passes.
fn escalate(phase: Phase, stop_tx: &watch::Sender<Stop>, s: &Settings, jobs: usize) -> Phase {
    let now = Instant::now();
    match phase {
        Phase::Draining(t) if now >= t && jobs > 0 => {
            tracing::warn!("grace period over: sending SIGTERM to {jobs} running job(s)");
            let _ = stop_tx.send(Stop::Term);
            Phase::Terminating(now + s.kill_after)
        }
        Phase::Terminating(t) if now >= t && jobs > 0 => {
            tracing::warn!("sending SIGKILL to {jobs} job(s) still running");
            let _ = stop_tx.send(Stop::Kill);
            Phase::Killing
        }
        p => p,
    }
}

fn account(end: &JobEnd, report: &mut RunReport) {
    let took = format_duration(Duration::from_millis(end.took.as_millis() as u64));
    if let Some(e) = &end.error {
        tracing::error!(job = %end.id, attempt = end.attempt, "{}; recording the outcome failed: {e}", end.ended.describe());
    }
    match &end.decision {
        Decision::Ack => {
            report.done += 1;
            tracing::debug!(job = %end.id, attempt = end.attempt, "done in {took}");
        }
        Decision::Retry { delay, reason } => {
            report.retried += 1;
            tracing::warn!(job = %end.id, attempt = end.attempt, "{reason}; retrying in {}", format_duration(*delay));
        }
        Decision::Bury { reason } => {
            report.dead += 1;
            tracing::error!(job = %end.id, attempt = end.attempt, "dead: {reason}");
        }
        Decision::Release => {
            report.released += 1;
            tracing::info!(job = %end.id, attempt = end.attempt, "released back to ready: {}", end.ended.describe());
        }
        Decision::Abandon => {
            report.lease_lost += 1;
            tracing::warn!(job = %end.id, attempt = end.attempt, "lease lost (the job was reclaimed or removed); its handler was stopped and it was not acknowledged");
        }
    }
}

async fn collect_garbage(store: &Arc<dyn Store>) {
    let s = Arc::clone(store);
    match blocking(move || s.collect_garbage()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("collected {n} leftover temp files and old logs"),
        Err(e) => tracing::warn!("collecting garbage failed: {e}"),
    }
}

async fn reclaim(sh: &Arc<Shared>, report: &mut RunReport) {
    let s = Arc::clone(&sh.store);
    let max = sh.settings.max_attempts;
    match blocking(move || s.reclaim(max)).await {
        Ok(list) => {
            for r in list {
                report.reclaimed += 1;
                // Out of attempts: the job went dead during this run, like a buried one.
                if r.buried {
                    report.dead += 1;
                    tracing::error!(job = %r.id, attempt = r.attempts, "dead: its claim was taken back with no attempts left");
                }
                let token = r.old_token.clone();
                let killed = blocking(move || orphans::kill_by_lease(&token)).await;
                if killed > 0 {
                    tracing::warn!(job = %r.id, "killed {killed} leftover process(es) of the reclaimed claim");
                }
            }
        }
        Err(e) => tracing::warn!("reclaiming expired leases failed: {e}"),
    }
}

/// How long, at least, the runner keeps trying to record a job's outcome while the store is
/// unreachable (a Redis restart, a full disk being cleared).
const OUTCOME_PATIENCE: Duration = Duration::from_secs(60);

/// Records an outcome, trying again with backoff while the store fails for reasons other than
/// a lost lease, for up to `patience`. Repeating is safe: a store recognises a transition whose
/// first try was applied but reported failed (the directory store by where the job now is,
/// Redis by the outcome it keeps for each claim) and reports it done; a transition tried after
/// the lease expired and the job was reclaimed is refused as `LeaseLost`.
fn persist(id: &JobId, patience: Duration, mut transition: impl FnMut() -> Result<()>) -> Result<()> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match transition() {
            Err(e @ (Error::Backend { .. } | Error::Io { .. })) if started.elapsed() + pause < patience => {
                tracing::warn!(job = %id, "recording the outcome failed: {e}; trying again in {}", format_duration(pause));
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// A handler's standard input (`None`: `/dev/null`), output and error, and the read end of its
/// output pipe when the store's log is no file the handler can write to itself. A failure is
/// the attempt's end: [`Ended::not_started`] tells the runner's shortages from the job's.
fn handler_stdio(
    log: &dyn JobLog,
    payload: &[u8],
) -> std::result::Result<(Option<OwnedFd>, OwnedFd, OwnedFd, Option<OwnedFd>), Ended> {
    let failed = |what: &str, e: std::io::Error| Ended::not_started(format!("{what}: {e}"), e.raw_os_error());
    // Output goes straight into the log file when the store has one; else through a pipe.
    let direct = log.child_output().map_err(|e| {
        let errno = match &e {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        };
        Ended::not_started(e.to_string(), errno)
    })?;
    let (stdout, stderr, pipe_read) = match direct {
        Some(file) => {
            let f2 = file
                .try_clone()
                .map_err(|e| failed("duplicating the log descriptor", e))?;
            (OwnedFd::from(file), OwnedFd::from(f2), None)
        }
        None => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| failed("creating the output pipe", e.into()))?;
            let w2 = w.try_clone().map_err(|e| failed("duplicating the output pipe", e))?;
            (w, w2, Some(r))
        }
    };
    // The payload is whole before the handler starts: a memory file, not a pipe, so that a
    // runner killed while feeding it can never hand a handler a truncated payload that reads as
    // complete (end of file on the pipe reaches the handler before its parent-death signal).
    let stdin = if payload.is_empty() {
        None
    } else {
        Some(OwnedFd::from(
            payload_file(payload).map_err(|e| failed("writing the payload", e))?,
        ))
    };
    Ok((stdin, stdout, stderr, pipe_read))
}

/// An anonymous memory file holding `payload`, positioned at its start.
fn payload_file(payload: &[u8]) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::FileExt;
    let fd = nix::sys::memfd::memfd_create("jobspool-payload", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let f = std::fs::File::from(fd);
    // At an offset, leaving the file's own at its start for the handler.
    f.write_all_at(payload, 0)?;
    Ok(f)
}

/// The last `lines` lines of `bytes`, at most `max` bytes, as text.
fn tail(bytes: &[u8], lines: usize, max: usize) -> String {
    let bytes = &bytes[bytes.len().saturating_sub(max)..];
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// A claimed job's log, opened with the attempt's header written, and where that header starts.
type Opened = Result<(Box<dyn JobLog>, u64)>;

/// Claims a job and opens its attempt's log: on the event loop when the store's calls are
/// short (see [`CallTime`]) and it can claim at once (a queue directory, unless a listing or
/// another process's lock is in the way); else in one trip to a blocking thread.
async fn claim_next(sh: Arc<Shared>) -> Result<Option<(Claim, Opened)>> {
    fn open(sh: &Shared, claimed: Option<Claim>, started: Instant) -> Result<Option<(Claim, Opened)>> {
        let Some(claim) = claimed else {
            return Ok(None);
        };
        let opened = open_attempt(sh, &claim);
        sh.call_time.record(started.elapsed());
        Ok(Some((claim, opened)))
    }
    if sh.store.is_local() && sh.call_time.short() {
        let started = Instant::now();
        if let Some(claimed) = sh.store.claim_now(sh.settings.lease) {
            return open(&sh, claimed?, started);
        }
    }
    blocking(move || {
        let started = Instant::now();
        open(&sh, sh.store.claim(sh.settings.lease)?, started)
    })
    .await
}

/// How long a local store's calls on a job's path (claim and log, acknowledgement) take, as a
/// moving average, to choose where to make them. While they are short, on the event loop: a
/// trip to a blocking thread and back cost more than the calls themselves, 0.51 -> 0.59 of bare
/// spawn at `-j 2` on a journaled ext4 where they take 70-100 µs (BENCHMARKS.md, profile point
/// 17). Once they are long, on a thread, where they hold up nothing else: on an ext4 without a
/// journal, after many deletions, the same calls took 0.6-1.5 ms, and on the loop they held up
/// every other slot's reaping and starting (691 against 828 jobs/s at `-j 2`).
#[derive(Default)]
struct CallTime(std::sync::atomic::AtomicU64);

impl CallTime {
    /// Calls longer than this, on average, are made on a thread.
    const LONG: Duration = Duration::from_micros(250);

    fn short(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) < Self::LONG.as_nanos() as u64
    }

    /// Adds one call's time, with a weight of 1/8 (a race between two threads loses one
    /// call's time, which is harmless).
    fn record(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let mean = self.0.load(Relaxed);
        self.0.store(mean - mean / 8 + ns / 8, Relaxed);
    }
}

/// Opens the claimed job's log, writes the attempt's header and records its start
/// ([`Store::begin_attempt`]: one round trip on a store that has a server).
fn open_attempt(sh: &Shared, claim: &Claim) -> Opened {
    let attempt = claim.lease.attempt;
    let max_attempts = sh.settings.max_attempts(&claim.job);
    let header = format!(
        "=== jobspool: attempt {attempt} of {max_attempts} · {} · runner {} on {} pid {} ===\n",
        format_ms(now_ms()),
        sh.runner_id,
        sh.host,
        sh.pid
    );
    let mut ev = Event::now(EventKind::Started, attempt, None);
    ev.runner = Some(sh.runner_id.clone());
    sh.store.begin_attempt(&claim.lease, header.as_bytes(), &ev)
}

/// A busy slot, given back to the main loop (once) when its handler has ended, with how long
/// the handler ran, or when the job's task ends or unwinds without one.
struct Slot(Option<tokio::sync::mpsc::UnboundedSender<Duration>>);

impl Slot {
    fn free(&mut self, ran: Duration) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(ran);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.free(Duration::MAX);
    }
}

/// How an attempt ended, to be recorded: the last output read back, the decision, then
/// trailer, transition and history in one [`Store::end_attempt`].
struct Finish {
    store: Arc<dyn Store>,
    lease: Lease,
    ended: Ended,
    trailer: String,
    /// Where the attempt's header starts in its log.
    log_start: u64,
    max_attempts: u32,
    backoff: Backoff,
    runner: String,
}

impl Finish {
    /// Records the outcome, trying the transition again for up to `patience` while it fails
    /// for a reason that may pass. `log` goes with the first try only: a store that writes the
    /// trailer through it writes it once however often the transition is tried.
    fn run(&self, log: Option<Box<dyn JobLog>>, patience: Duration) -> (Decision, Option<Error>) {
        let Finish {
            store: s,
            lease,
            ended,
            trailer,
            log_start,
            max_attempts,
            backoff,
            runner,
        } = self;
        let attempt = lease.attempt;
        // Read before the trailer is written: the attempt's own output only.
        let output = match &ended {
            Ended::Exit(0) | Ended::Stopped | Ended::GivenBack | Ended::LeaseLost => String::new(),
            _ => s
                .read_log(&lease.id, *log_start)
                .ok()
                .flatten()
                .map(|b| {
                    // Leave out our own header.
                    let text = String::from_utf8_lossy(&b);
                    let body: Vec<&str> = text.lines().filter(|l| !l.starts_with("=== jobspool: ")).collect();
                    tail(body.join("\n").as_bytes(), 5, 2000)
                })
                .unwrap_or_default(),
        };
        let decision = decide(ended, attempt, *max_attempts, backoff, &output);
        let event = |kind: EventKind, detail: String| {
            let mut ev = Event::now(kind, attempt, Some(detail));
            ev.runner = Some(runner.clone());
            ev
        };
        let outcome = match &decision {
            Decision::Ack => Some((Outcome::Ack, Some(event(EventKind::Done, ended.describe())))),
            Decision::Retry { delay, reason } => Some((
                Outcome::Retry { delay: *delay },
                Some(event(
                    EventKind::Failed,
                    format!("{reason}; retry in {}", format_duration(*delay)),
                )),
            )),
            // Bury records the reason itself.
            Decision::Bury { reason } => Some((Outcome::Bury { reason: reason.clone() }, None)),
            Decision::Release => Some((Outcome::Release, Some(event(EventKind::Released, ended.describe())))),
            Decision::Abandon => None,
        };
        let mut log = log;
        let result = match &outcome {
            Some((outcome, ev)) => persist(&lease.id, patience, || {
                s.end_attempt(lease, log.take(), trailer.as_bytes(), outcome, ev.as_ref())
            }),
            None => Ok(()),
        };
        let (decision, error) = match result {
            Ok(()) => (decision, None),
            Err(Error::LeaseLost { .. }) => (Decision::Abandon, None),
            Err(e) => (decision, Some(e)),
        };
        if decision == Decision::Abandon {
            // The lease was lost while the handler ran (the log is still here: the trailer
            // says how the attempt ended), or at the end (the store wrote nothing of it, or
            // only the trailer, before the transition was refused). Either way, say so.
            if let Some(mut log) = log.take() {
                let _ = log.append(trailer.as_bytes());
            }
            let _ = s.record(&lease.id, &event(EventKind::LeaseLost, ended.describe()));
        }
        (decision, error)
    }
}

/// Runs a claimed job's attempt in `slot` and records its outcome. Without a slot, the job was
/// claimed ahead and no slot came free in time: it is given back unstarted, its attempt not
/// counted.
async fn run_job(
    sh: Arc<Shared>,
    claim: Claim,
    opened: Opened,
    mut slot: Option<Slot>,
    stop: watch::Receiver<Stop>,
) -> JobEnd {
    let started = Instant::now();
    let Claim { job, lease } = claim;
    let id = lease.id.clone();
    let attempt = lease.attempt;
    let max_attempts = sh.settings.max_attempts(&job);
    let timeout = job.timeout.unwrap_or(sh.settings.timeout);

    // Decide what runs: a command (and where its program is, when known), or the function.
    type Command = (Vec<OsString>, Option<PathBuf>);
    let program: std::result::Result<Option<Command>, String> = match (&job.command, &sh.handler) {
        (Some(argv), _) if sh.allow_job_commands => Ok(Some((argv.clone(), None))),
        (Some(_), _) => {
            Err("the job carries its own command and this runner was not started with --allow-job-commands".into())
        }
        (None, Handler::Command(argv)) => Ok(Some((argv.clone(), sh.handler_path.clone()))),
        (None, Handler::Function(_)) => Ok(None),
        (None, Handler::JobCommands) => Err("the job has no command and this runner has no handler".into()),
    };

    let (mut log, log_start) = match opened {
        Ok(v) => v,
        Err(e) => {
            // Without a log the job cannot be run as promised: give it back and pause.
            tracing::error!(job = %id, "cannot open the job's log: {e}; releasing it");
            let s = Arc::clone(&sh.store);
            let l = lease.clone();
            let error = blocking(move || s.release(&l)).await.err();
            return JobEnd {
                id,
                attempt,
                ended: Ended::Stopped,
                decision: Decision::Release,
                took: started.elapsed(),
                error,
            };
        }
    };

    let ended = match program {
        _ if slot.is_none() => Ended::GivenBack,
        Err(why) => Ended::Refused(why),
        Ok(Some(command)) => {
            let (ended, back) = supervise_command(&sh, &lease, job, command, log, timeout, stop, max_attempts).await;
            log = back;
            ended
        }
        Ok(None) => supervise_function(&sh, &lease, job, timeout, stop).await,
    };
    let took = started.elapsed();
    if let Some(slot) = slot.as_mut() {
        slot.free(took);
    }

    // Last output, decision, then trailer + transition + history in one step (one round trip
    // on a store that has a server: see `Store::end_attempt`).
    let finish = Finish {
        store: Arc::clone(&sh.store),
        trailer: format!(
            "=== jobspool: {} after {} ===\n",
            ended.describe(),
            format_duration(Duration::from_millis(took.as_millis() as u64))
        ),
        lease,
        ended,
        log_start,
        max_attempts,
        backoff: sh.settings.backoff,
        runner: sh.runner_id.clone(),
    };
    let patience = sh.settings.lease.max(OUTCOME_PATIENCE);
    let succeeded = sh.store.is_local() && finish.ended == Ended::Exit(0);
    let ((decision, error), ended) = if succeeded && sh.call_time.short() {
        // A success is acknowledged on the event loop while the store's calls are short (see
        // `CallTime`), once; a repeat after a failure goes to a thread, where it may wait.
        // But after the freed slot's next handler has started, not before: two turns of the
        // scheduler, which runs tasks in the order they were woken. In the first the main loop
        // takes the slot and spawns the next job's task; in the second that task starts its
        // handler. Acknowledging first kept the slot empty for the length of the ack
        // (`-j 1`: 1 323 -> 1 481 jobs/s on a journaled ext4, in alternating runs).
        for _ in 0..2 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        match finish.run(Some(log), Duration::ZERO) {
            (_, Some(Error::Backend { .. } | Error::Io { .. })) => {
                blocking(move || (finish.run(None, patience), finish.ended)).await
            }
            done => {
                sh.call_time.record(started.elapsed());
                (done, finish.ended)
            }
        }
    } else {
        let sh = Arc::clone(&sh);
        blocking(move || {
            let started = Instant::now();
            let done = finish.run(Some(log), patience);
            if succeeded && done.1.is_none() {
                sh.call_time.record(started.elapsed());
            }
            (done, finish.ended)
        })
        .await
    };
    JobEnd {
        id,
        attempt,
        ended,
        decision,
        took,
        error,
    }
}

/// Runs a handler process to its end, heartbeating the lease, enforcing the timeout and
/// obeying shutdown. Returns how it ended and the log (which a copying thread may have held).
#[allow(clippy::too_many_arguments)]
async fn supervise_command(
    sh: &Arc<Shared>,
    lease: &Lease,
    job: Job,
    (argv, program): (Vec<OsString>, Option<PathBuf>),
    log: Box<dyn JobLog>,
    timeout: Duration,
    mut stop: watch::Receiver<Stop>,
    max_attempts: u32,
) -> (Ended, Box<dyn JobLog>) {
    let env = [
        ("JOBSPOOL_JOB_ID", lease.id.to_string()),
        ("JOBSPOOL_ATTEMPT", lease.attempt.to_string()),
        ("JOBSPOOL_MAX_ATTEMPTS", max_attempts.to_string()),
        ("JOBSPOOL_QUEUE", sh.store.target().to_string()),
        ("JOBSPOOL_LEASE", lease.token.clone()),
    ];
    let (stdin, stdout, stderr, pipe_read) = match handler_stdio(log.as_ref(), &job.payload) {
        Ok(fds) => fds,
        Err(ended) => return (ended, log),
    };
    // The handler registers its group with the guardian itself, before exec, in a cell of the
    // guardian's table reserved for it here.
    let (spawned, cell) = {
        let mut reaper = sh.reaper.lock().unwrap_or_else(|e| e.into_inner());
        let cell = reaper.reserve();
        let spawned = child::Handler::spawn(Spawn {
            program: program.as_deref(),
            argv: &argv,
            env: &env,
            stdin,
            stdout,
            stderr,
            guardian: cell.map(|i| reaper.cell(i)),
        });
        if let (Err(_), Some(i)) = (&spawned, cell) {
            reaper.forget(i);
        }
        (spawned, cell)
    };
    let handler = match spawned {
        Ok(h) => h,
        Err(e) => {
            let program = argv[0].to_string_lossy().into_owned();
            return (Ended::not_started(format!("{program}: {e}"), e.raw_os_error()), log);
        }
    };
    // Copy piped output into the log on a blocking thread; a log the handler writes to
    // directly stays here for the trailer.
    let (mut copier, mut log_back) = match pipe_read {
        Some(r) => {
            let mut log = log;
            let copier = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut r = std::fs::File::from(r);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let _ = log.append(&buf[..n]);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                log
            });
            (Some(copier), None)
        }
        None => (None, Some(log)),
    };

    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let mut heartbeat = tokio::time::interval_at(start + sh.settings.heartbeat, sh.settings.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut kill_at: Option<tokio::time::Instant> = None;
    let (mut timed_out, mut lease_lost, mut stopped, mut killed) = (false, false, false, false);
    let mut stop_open = true;
    if *stop.borrow() != Stop::Run {
        stopped = true;
        handler.signal_group(nix::sys::signal::Signal::SIGTERM);
        kill_at = Some(tokio::time::Instant::now() + sh.settings.kill_after);
    }
    loop {
        tokio::select! {
            biased;
            r = handler.exited() => {
                if let Err(e) = r {
                    tracing::error!(job = %lease.id, "waiting for the handler failed: {e}");
                }
                break;
            }
            changed = stop.changed(), if stop_open => {
                if changed.is_err() {
                    stop_open = false;
                    continue;
                }
                let now = *stop.borrow();
                match now {
                    Stop::Run => {}
                    Stop::Term => {
                        stopped = true;
                        handler.signal_group(nix::sys::signal::Signal::SIGTERM);
                        kill_at.get_or_insert(tokio::time::Instant::now() + sh.settings.kill_after);
                    }
                    Stop::Kill => {
                        stopped = true;
                        killed = true;
                        handler.signal_group(nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
            _ = sleep_until(deadline), if !timed_out && !lease_lost => {
                timed_out = true;
                tracing::warn!(job = %lease.id, "timed out after {}; stopping its process group", format_duration(timeout));
                handler.signal_group(nix::sys::signal::Signal::SIGTERM);
                kill_at.get_or_insert(tokio::time::Instant::now() + sh.settings.kill_after);
            }
            _ = sleep_until(kill_at.unwrap_or(deadline)), if kill_at.is_some() && !killed => {
                killed = true;
                handler.signal_group(nix::sys::signal::Signal::SIGKILL);
            }
            _ = heartbeat.tick(), if !lease_lost => {
                let (s, l) = (Arc::clone(&sh.store), lease.clone());
                match blocking(move || s.heartbeat(&l)).await {
                    Ok(()) => {}
                    Err(Error::LeaseLost { .. }) => {
                        lease_lost = true;
                        tracing::warn!(job = %lease.id, "lease lost while running; stopping its handler");
                        handler.signal_group(nix::sys::signal::Signal::SIGTERM);
                        kill_at.get_or_insert(tokio::time::Instant::now() + sh.settings.kill_after);
                    }
                    Err(e) => tracing::warn!(job = %lease.id, "heartbeat failed: {e}"),
                }
            }
        }
    }
    // Kill what the handler left in its group *before* the guardian forgets the group: were the
    // runner killed between the two, nobody would kill the leftovers. (The group leader is not
    // reaped yet, so its group id cannot have been reused.)
    handler.signal_group(nix::sys::signal::Signal::SIGKILL);
    if let Some(i) = cell {
        sh.reaper.lock().unwrap_or_else(|e| e.into_inner()).forget(i);
    }
    // The handler has exited (its pidfd said so), so it is reaped here without a thread hop.
    let reaped = match handler.try_reap() {
        Ok(r) => r,
        Err(handler) => blocking(move || handler.reap()).await,
    };
    let status = match reaped {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(job = %lease.id, "reaping the handler failed: {e}");
            None
        }
    };
    if let Some(c) = copier.take() {
        if let Ok(l) = c.await {
            log_back = Some(l);
        }
    }
    let ended = if lease_lost {
        Ended::LeaseLost
    } else if timed_out {
        Ended::TimedOut(timeout)
    } else {
        match status {
            Some(s) if s.success() => Ended::Exit(0),
            Some(_) if stopped => Ended::Stopped,
            Some(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(c), _) => Ended::Exit(c),
                    (None, Some(sig)) => Ended::Signal(
                        nix::sys::signal::Signal::try_from(sig)
                            .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string()),
                    ),
                    _ => Ended::Failed("ended without a status".into()),
                }
            }
            None => Ended::Failed("its exit status was lost".into()),
        }
    };
    let log = match log_back {
        Some(l) => l,
        None => match sh.store.open_log(&lease.id) {
            Ok(l) => l,
            Err(_) => Box::new(NoLog),
        },
    };
    (ended, log)
}

struct NoLog;

impl JobLog for NoLog {
    fn append(&mut self, _bytes: &[u8]) -> Result<()> {
        Ok(())
    }
    fn size(&self) -> Result<u64> {
        Ok(0)
    }
    fn child_output(&self) -> Result<Option<std::fs::File>> {
        Ok(None)
    }
}

/// Runs a handler function to its end on a blocking thread. Functions cannot be killed: on
/// timeout, lease loss or shutdown they are asked to stop ([`JobContext::cancelled`]) and
/// waited for.
async fn supervise_function(
    sh: &Arc<Shared>,
    lease: &Lease,
    job: Job,
    timeout: Duration,
    mut stop: watch::Receiver<Stop>,
) -> Ended {
    let Handler::Function(f) = &sh.handler else {
        return Ended::Refused("no handler function".into());
    };
    let f = Arc::clone(f);
    let cancel = Arc::new(AtomicBool::new(false));
    let ctx = JobContext {
        job,
        attempt: lease.attempt,
        cancel: Arc::clone(&cancel),
    };
    let mut task = tokio::task::spawn_blocking(move || f(&ctx));
    let start = tokio::time::Instant::now();
    let mut heartbeat = tokio::time::interval_at(start + sh.settings.heartbeat, sh.settings.heartbeat);
    let (mut timed_out, mut lease_lost, mut stopped) = (false, false, false);
    let mut stop_open = true;
    let result = loop {
        tokio::select! {
            biased;
            r = &mut task => break r,
            changed = stop.changed(), if stop_open => {
                if changed.is_err() {
                    stop_open = false;
                } else if *stop.borrow() != Stop::Run {
                    stopped = true;
                    cancel.store(true, Ordering::Relaxed);
                }
            }
            _ = sleep_until(start + timeout), if !timed_out => {
                timed_out = true;
                cancel.store(true, Ordering::Relaxed);
            }
            _ = heartbeat.tick(), if !lease_lost => {
                let (s, l) = (Arc::clone(&sh.store), lease.clone());
                if let Err(Error::LeaseLost { .. }) = blocking(move || s.heartbeat(&l)).await {
                    lease_lost = true;
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        }
    };
    if lease_lost {
        return Ended::LeaseLost;
    }
    if timed_out {
        return Ended::TimedOut(timeout);
    }
    match result {
        Ok(Ok(())) => Ended::Exit(0),
        _ if stopped => Ended::Stopped,
        Ok(Err(HandlerError::Retry(m))) => {
            tracing::info!(job = %lease.id, "asked for a retry: {m}");
            Ended::Exit(outcome::EXIT_RETRY)
        }
        Ok(Err(HandlerError::Permanent(m))) => Ended::Refused(format!("permanent failure: {m}")),
        Ok(Err(HandlerError::Failed(m))) => Ended::Failed(m),
        Err(e) => Ended::Failed(format!("panicked: {}", panic_message(&*e.into_panic()))),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// The one-line progress display.
struct Progress {
    on: bool,
    started: Instant,
    last: Option<Instant>,
    shown: bool,
}

impl Progress {
    fn new(on: bool) -> Progress {
        Progress {
            on,
            started: Instant::now(),
            last: None,
            shown: false,
        }
    }

    fn show(&mut self, r: &RunReport, running: usize, slots: usize, force: bool) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(now);
        let secs = now.duration_since(self.started).as_secs_f64().max(0.001);
        let line = format!(
            "running {running}/{slots} · done {} · failed {} · dead {} · {:.1} jobs/s",
            r.done,
            r.retried,
            r.dead,
            r.done as f64 / secs
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        self.shown = true;
    }

    fn finish(&mut self, r: &RunReport) {
        if self.on && self.shown {
            self.show(r, 0, 0, true);
            let _ = writeln!(std::io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local store's calls are made on the event loop while they are short, on a thread once
    /// they are long (on an ext4 without a journal they held up every slot's reaping and
    /// starting), and on the loop again once they are short again.
    #[test]
    fn store_calls_leave_the_event_loop_while_they_are_slow_and_come_back_when_fast() {
        let t = CallTime::default();
        assert!(t.short(), "on the loop to begin with");
        for _ in 0..5 {
            t.record(Duration::from_micros(80));
        }
        assert!(t.short());
        for _ in 0..20 {
            t.record(Duration::from_millis(1));
        }
        assert!(!t.short(), "1 ms calls go to a thread");
        for _ in 0..40 {
            t.record(Duration::from_micros(80));
        }
        assert!(t.short(), "back on the loop");
    }
}
