//! Jobs: their ids, what a producer submits, and what a claimer receives.

use std::ffi::OsString;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Longest accepted job id, in bytes. Ids end up in file names, which are limited to 255 bytes
/// together with the state fields around them.
pub const MAX_ID_LEN: usize = 128;

/// Highest priority; jobs with a higher priority are claimed first.
pub const MAX_PRIORITY: i16 = 999;
/// Lowest priority.
pub const MIN_PRIORITY: i16 = -999;

/// Largest payload a job may carry. Claimers read the whole payload into memory.
pub const MAX_PAYLOAD: usize = 256 << 20;

/// Latest run-at time a job may have, in milliseconds since the epoch: thirteen decimal digits,
/// the width of the time field in the queue directory's file names (2286-11-20T17:46:39.999Z).
pub const MAX_RUN_AT: Millis = 9_999_999_999_999;

/// Longest time limit per attempt and longest lease: 100 years (of 365.25 days, as `100y` is
/// read). Longer values are surely mistakes, and every store can represent this one (in file
/// names, job headers, Redis scores).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Checks a lease duration a claim is to be made under and returns it in milliseconds: more
/// than 0, at most [`MAX_DURATION`].
pub fn lease_ms(lease: Duration) -> Result<u64> {
    if lease.is_zero() {
        return Err(Error::Invalid("lease must be longer than 0".into()));
    }
    if lease > MAX_DURATION {
        return Err(Error::Invalid(format!(
            "lease of {} is too long: the longest is 100 years",
            crate::config::format_duration(lease)
        )));
    }
    Ok(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1))
}

/// A job's identity: generated (a UUIDv7, which sorts by creation time) or given by the caller.
///
/// Caller-given ids are restricted to `[A-Za-z0-9._:@+=-]`, 1 to 128 bytes, not starting with
/// `.` or `-` and not containing `..`, so that an id can never name a path outside the queue, hide
/// as a dotfile, or be mistaken for a command-line option.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(String);

impl JobId {
    /// Generates a fresh, time-sortable id.
    pub fn generate() -> JobId {
        JobId(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    /// Validates a caller-given id.
    pub fn new(id: impl Into<String>) -> Result<JobId> {
        let id = id.into();
        match Self::check(&id) {
            Ok(()) => Ok(JobId(id)),
            Err(why) => Err(Error::Invalid(format!(
                "invalid job id {id:?}: {why}; ids are 1 to {MAX_ID_LEN} characters from A-Z a-z 0-9 . _ : @ + = -, not starting with . or -"
            ))),
        }
    }

    /// Why `id` is not a valid job id, if it is not.
    pub fn check(id: &str) -> std::result::Result<(), &'static str> {
        if id.is_empty() {
            return Err("it is empty");
        }
        if id.len() > MAX_ID_LEN {
            return Err("it is too long");
        }
        if id.starts_with('.') || id.starts_with('-') {
            return Err("it starts with . or -");
        }
        if id.contains("..") {
            return Err("it contains ..");
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:@+=-".contains(&b)) {
            return Err("it contains a character outside A-Z a-z 0-9 . _ : @ + = -");
        }
        Ok(())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for JobId {
    type Err = Error;
    fn from_str(s: &str) -> Result<JobId> {
        JobId::new(s)
    }
}

impl AsRef<str> for JobId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Milliseconds since the Unix epoch: the one time representation stored on disk and in Redis.
pub type Millis = u64;

/// The current wall-clock time in milliseconds since the epoch.
pub fn now_ms() -> Millis {
    to_ms(SystemTime::now())
}

/// Converts a wall-clock time to milliseconds since the epoch (0 before the epoch).
pub fn to_ms(t: SystemTime) -> Millis {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// Converts milliseconds since the epoch to a wall-clock time.
pub fn from_ms(ms: Millis) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Formats a millisecond timestamp as RFC 3339 (UTC, millisecond precision).
pub fn format_ms(ms: Millis) -> String {
    humantime::format_rfc3339_millis(from_ms(ms)).to_string()
}

/// A job as a producer submits it.
///
/// Everything but the payload is optional; unset limits fall back to the runner's options and
/// then to the queue's defaults in `jobspool.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewJob {
    /// Caller-chosen id; a UUIDv7 is generated when `None`.
    pub id: Option<JobId>,
    /// Opaque bytes handed to the handler on standard input.
    pub payload: Vec<u8>,
    /// Higher runs first; from -999 to 999, default 0.
    pub priority: i16,
    /// Earliest time the job may run; `None` means now.
    pub run_at: Option<Millis>,
    /// Attempts before the job is declared dead.
    pub max_attempts: Option<u32>,
    /// Longest one attempt may run before its handler is killed.
    pub timeout: Option<Duration>,
    /// The job's own command (argv, never a shell string). Runners only execute it when started
    /// with `--allow-job-commands`.
    pub command: Option<Vec<OsString>>,
}

impl NewJob {
    /// A job carrying `payload`, with every option at its default.
    pub fn new(payload: impl Into<Vec<u8>>) -> NewJob {
        NewJob {
            payload: payload.into(),
            ..NewJob::default()
        }
    }

    /// Sets the id.
    pub fn id(mut self, id: JobId) -> NewJob {
        self.id = Some(id);
        self
    }

    /// Sets the priority (higher runs first).
    pub fn priority(mut self, priority: i16) -> NewJob {
        self.priority = priority;
        self
    }

    /// Makes the job runnable only after `delay` from now.
    pub fn delay(mut self, delay: Duration) -> NewJob {
        // A delay too long to add up is kept as the latest time there is; validate refuses it.
        self.run_at = Some(
            u64::try_from(delay.as_millis())
                .ok()
                .and_then(|ms| now_ms().checked_add(ms))
                .unwrap_or(Millis::MAX),
        );
        self
    }

    /// Makes the job runnable only at or after `at`.
    pub fn run_at(mut self, at: SystemTime) -> NewJob {
        self.run_at = Some(to_ms(at));
        self
    }

    /// Sets the attempt limit.
    pub fn max_attempts(mut self, n: u32) -> NewJob {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the per-attempt time limit.
    pub fn timeout(mut self, timeout: Duration) -> NewJob {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the job's own command.
    pub fn command<I, S>(mut self, argv: I) -> NewJob
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.command = Some(argv.into_iter().map(Into::into).collect());
        self
    }

    /// Checks the limits every store enforces, before anything is written.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(Error::Invalid(format!(
                "priority {} is out of range: use {MIN_PRIORITY} to {MAX_PRIORITY}",
                self.priority
            )));
        }
        if self.payload.len() > MAX_PAYLOAD {
            return Err(Error::Invalid(format!(
                "payload of {} bytes is larger than the limit of {MAX_PAYLOAD} bytes; store large data elsewhere and pass its path",
                self.payload.len()
            )));
        }
        if self.max_attempts == Some(0) {
            return Err(Error::Invalid("max attempts must be at least 1".to_string()));
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(Error::Invalid("timeout must be longer than 0".to_string()));
        }
        if let Some(t) = self.timeout.filter(|t| *t > MAX_DURATION) {
            return Err(Error::Invalid(format!(
                "timeout of {} is too long: the longest is 100 years",
                crate::config::format_duration(t)
            )));
        }
        if self.run_at.is_some_and(|at| at > MAX_RUN_AT) {
            return Err(Error::Invalid(format!(
                "run-at time is too far in the future: the latest a queue can hold is {}; use a shorter delay",
                format_ms(MAX_RUN_AT)
            )));
        }
        if let Some(argv) = &self.command {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(Error::Invalid("a job command needs a program name".into()));
            }
        }
        Ok(())
    }
}

/// A job as stored: what was submitted, with its id and creation time fixed.
///
/// This is immutable once written; a job's changing state (attempts, lease, next run time)
/// is kept by the store beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The job's id.
    pub id: JobId,
    /// When it was pushed.
    pub created: Millis,
    /// Higher runs first.
    pub priority: i16,
    /// The run-at time it was pushed with.
    pub run_at: Millis,
    /// The job's own attempt limit, if it set one.
    pub max_attempts: Option<u32>,
    /// The job's own time limit per attempt, if it set one.
    pub timeout: Option<Duration>,
    /// The job's own command, if it has one.
    pub command: Option<Vec<OsString>>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Job {
    /// Fixes a submitted job's id and times.
    pub fn from_new(new: &NewJob, id: JobId, created: Millis) -> Job {
        Job {
            id,
            created,
            priority: new.priority,
            run_at: new.run_at.unwrap_or(created),
            max_attempts: new.max_attempts,
            timeout: new.timeout,
            command: new.command.clone(),
            payload: new.payload.clone(),
        }
    }
}

/// The states a job can be in. Done jobs are removed, so they have no state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting to be claimed, runnable now.
    Ready,
    /// Waiting for its run-at time (a delayed job or a retry in backoff).
    Scheduled,
    /// Claimed by a runner, under a lease.
    Running,
    /// Failed for good; kept with its reason until retried or removed.
    Dead,
    /// Not a valid job: set aside with the reason, never executed.
    Quarantined,
}

impl State {
    /// The state's name as shown to people and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Scheduled => "scheduled",
            State::Running => "running",
            State::Dead => "dead",
            State::Quarantined => "quarantined",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_sort_by_time() {
        let a = JobId::generate();
        std::thread::sleep(Duration::from_millis(2));
        let b = JobId::generate();
        assert!(JobId::check(a.as_str()).is_ok());
        assert!(a < b);
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "",
            "../x",
            "a/b",
            "/etc/passwd",
            "a\0b",
            "..",
            ".hidden",
            "-rf",
            "a..b",
            "sp ace",
            "semi;colon",
            "new\nline",
            "$(reboot)",
            "é",
        ] {
            assert!(JobId::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(JobId::new("x".repeat(MAX_ID_LEN + 1)).is_err());
        for good in [
            "a",
            "mail-42",
            "build.7",
            "user@host:1",
            "A+B=C",
            "x".repeat(MAX_ID_LEN).as_str(),
        ] {
            assert!(JobId::new(good).is_ok(), "{good:?} was refused");
        }
    }

    #[test]
    fn out_of_range_values_are_refused() {
        assert!(NewJob::new("x").priority(1000).validate().is_err());
        assert!(NewJob::new("x").priority(-1000).validate().is_err());
        assert!(NewJob::new("x").max_attempts(0).validate().is_err());
        assert!(NewJob::new("x").command(Vec::<String>::new()).validate().is_err());
        assert!(NewJob::new("x").priority(999).validate().is_ok());
    }

    #[test]
    fn run_at_and_timeouts_beyond_what_a_queue_can_hold_are_refused() {
        let year = Duration::from_secs(365 * 24 * 3600);
        assert!(NewJob::new("x").delay(200 * year).validate().is_ok());
        assert!(NewJob::new("x").delay(300 * year).validate().is_err());
        assert!(NewJob::new("x").delay(Duration::MAX).validate().is_err());
        assert!(NewJob::new("x").delay(1_000_000_000 * year).validate().is_err());
        let far = UNIX_EPOCH + Duration::from_millis(MAX_RUN_AT + 1);
        assert!(NewJob::new("x").run_at(far).validate().is_err());
        assert!(NewJob::new("x").timeout(MAX_DURATION).validate().is_ok());
        assert!(
            NewJob::new("x")
                .timeout(MAX_DURATION + Duration::from_millis(1))
                .validate()
                .is_err()
        );
        assert!(NewJob::new("x").timeout(Duration::MAX).validate().is_err());
        assert!(lease_ms(Duration::ZERO).is_err());
        assert!(lease_ms(1_000_000_000 * year).is_err());
        assert_eq!(lease_ms(Duration::from_millis(1500)).unwrap(), 1500);
    }
}
