//! Command-line syntax.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Parses durations written as `500ms`, `30s`, `5m`, `1h`.
fn duration(s: &str) -> Result<Duration, String> {
    jobspool::config::parse_duration(s).map_err(|e| e.to_string())
}

fn backoff(s: &str) -> Result<jobspool::Backoff, String> {
    s.parse().map_err(|e: jobspool::Error| e.to_string())
}

fn mode(s: &str) -> Result<u32, String> {
    jobspool::config::parse_mode(s).map_err(|e| e.to_string())
}

/// A crash-safe job queue and worker supervisor.
///
/// QUEUE is a queue directory on local disk.
#[derive(Parser, Debug)]
#[command(name = "jobspool", version, about, max_term_width = 100)]
pub struct Cli {
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors in the log output.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a queue, or repair and re-permission an existing one (idempotent).
    Init {
        /// The queue.
        queue: String,
        /// Share the queue with this group: directories get the group and the setgid bit.
        #[arg(long)]
        group: Option<String>,
        /// Mode of every job, log and runner file, whatever the creator's umask (e.g. 0660).
        #[arg(long, value_parser = mode)]
        mode: Option<u32>,
    },
    /// Add a job (or, with --batch, one job per line of standard input) and print its id.
    Push(PushArgs),
    /// List jobs.
    Ls {
        /// The queue.
        queue: String,
        /// Which jobs to list.
        #[arg(long, value_enum, default_value_t = StateFilter::All)]
        state: StateFilter,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job: its state, settings, history, and the reason it died.
    Show {
        /// The queue.
        queue: String,
        /// The job id (or the name of a quarantined entry).
        id: String,
        /// A JSON object instead of text.
        #[arg(long, conflicts_with = "payload")]
        json: bool,
        /// Write the raw payload to standard output, and nothing else.
        #[arg(long)]
        payload: bool,
    },
    /// Count jobs per state and give the age of the oldest ready job.
    Stats {
        /// The queue.
        queue: String,
        /// A JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send dead jobs back to ready, with a fresh attempt budget.
    Retry {
        /// The queue.
        queue: String,
        /// The dead jobs to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Retry every dead job.
        #[arg(long)]
        all: bool,
    },
    /// Remove jobs (a running job's runner stops it at its next heartbeat), with their logs.
    Rm {
        /// The queue.
        queue: String,
        /// Job ids or quarantined entry names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print a job's log (handler output of every attempt).
    Logs {
        /// The queue.
        queue: String,
        /// The job id.
        id: String,
        /// Keep printing as the log grows, until the job is done or dead.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run jobs: claim them and run a handler for each, until signalled (or, with --drain, until
    /// the queue is empty).
    Run(RunArgs),
    /// Wait until nothing is ready, scheduled or running. Exit 0 if no job is dead, 1 if some
    /// are, 124 on timeout.
    Wait {
        /// The queue.
        queue: String,
        /// Give up after this long.
        #[arg(long, value_parser = duration)]
        timeout: Option<Duration>,
    },
    /// Monitoring check (Nagios/Icinga plugin convention): one status line with perfdata; exit
    /// 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Check(CheckArgs),
    /// Show the queue's counts and its registered runners.
    Status {
        /// The queue.
        queue: String,
        /// A JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the queue's layout and permissions and say how to fix what is wrong.
    Doctor {
        /// The queue.
        queue: String,
    },
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The queue (created with default settings if missing).
    pub queue: String,
    /// Job id (default: a generated, time-sortable id). Refused if the id exists.
    #[arg(long, conflicts_with = "batch")]
    pub id: Option<String>,
    /// Priority from -999 to 999; higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i16,
    /// Run no earlier than this long from now.
    #[arg(long, value_parser = duration)]
    pub delay: Option<Duration>,
    /// Attempts before the job is dead (default: the runner's, then the queue's).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Longest one attempt may run (default: the runner's, then the queue's).
    #[arg(long, value_parser = duration)]
    pub timeout: Option<Duration>,
    /// The payload, as text.
    #[arg(long, conflicts_with_all = ["payload_file", "batch"])]
    pub payload: Option<String>,
    /// Read the payload from this file.
    #[arg(long, conflicts_with = "batch")]
    pub payload_file: Option<PathBuf>,
    /// One job per line of standard input, all made durable with one flush; prints one id per line.
    #[arg(long)]
    pub batch: bool,
    /// The job's own command (run only by runners started with --allow-job-commands).
    #[arg(last = true)]
    pub command: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The queue.
    pub queue: String,
    /// Number of jobs run at once (default: the number of CPUs).
    #[arg(short = 'j', long)]
    pub jobs: Option<u32>,
    /// Exit when nothing is ready, scheduled or running: 0 if no job went dead during the run, 1 if some did.
    #[arg(long)]
    pub drain: bool,
    /// How long a claim stays valid without a heartbeat (default: the queue's).
    #[arg(long, value_parser = duration)]
    pub lease: Option<Duration>,
    /// Longest one attempt may run (jobs may set their own; default: the queue's).
    #[arg(long, value_parser = duration)]
    pub timeout: Option<Duration>,
    /// On SIGTERM or SIGINT, how long running jobs may take to finish before they are stopped.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub grace: Duration,
    /// Attempts before a job is dead (jobs may set their own; default: the queue's).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Delay between attempts, MIN..MAX, doubling each time (default: the queue's).
    #[arg(long, value_parser = backoff)]
    pub backoff: Option<jobspool::Backoff>,
    /// Run jobs that carry their own command. Without this, such jobs are buried: whoever can
    /// write the queue must not gain command execution by it.
    #[arg(long)]
    pub allow_job_commands: bool,
    /// The handler: a program and its arguments, run once per job with the payload on standard
    /// input (no shell).
    #[arg(last = true)]
    pub handler: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The queue.
    pub queue: String,
    /// WARNING when at least this many jobs are dead.
    #[arg(long, default_value_t = 1)]
    pub warn_dead: u64,
    /// CRITICAL when at least this many jobs are dead.
    #[arg(long)]
    pub crit_dead: Option<u64>,
    /// WARNING when the oldest ready job has waited this long.
    #[arg(long, value_parser = duration)]
    pub warn_age: Option<Duration>,
    /// CRITICAL when the oldest ready job has waited this long.
    #[arg(long, value_parser = duration)]
    pub crit_age: Option<Duration>,
    /// CRITICAL when fewer runners than this are alive.
    #[arg(long, default_value_t = 0)]
    pub min_runners: u64,
}

/// Which jobs `ls` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StateFilter {
    Ready,
    Scheduled,
    Running,
    Dead,
    Quarantine,
    All,
}

impl StateFilter {
    pub fn states(self) -> Vec<jobspool::State> {
        use jobspool::State::*;
        match self {
            StateFilter::Ready => vec![Ready],
            StateFilter::Scheduled => vec![Scheduled],
            StateFilter::Running => vec![Running],
            StateFilter::Dead => vec![Dead],
            StateFilter::Quarantine => vec![Quarantined],
            StateFilter::All => vec![Ready, Scheduled, Running, Dead, Quarantined],
        }
    }
}
