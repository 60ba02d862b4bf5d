//! The library's typed errors.
//!
//! Every error names what it was about (a path, a job id, a queue) so that a command-line front
//! end can print it as one line. Lease loss is its own variant because callers must react to it
//! differently from an I/O failure: the job belongs to someone else now, so the caller stops
//! working on it and must not acknowledge it.

use std::io;
use std::path::PathBuf;

/// Result type of every fallible library call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lease this caller holds is no longer valid: its lease expired and another claimer
    /// reclaimed the job, or an operator removed or moved it. The caller must stop working on the
    /// job; any acknowledgement, heartbeat, retry, burial or release it attempts is refused.
    #[error("job {id}: lease lost (it expired and the job was reclaimed, or the job was moved or removed)")]
    LeaseLost {
        /// The job whose lease was lost.
        id: String,
    },

    /// A push named an id that the queue already knows (a queued, running or dead job).
    #[error("job {id} already exists in {queue}; choose another id or remove the old job with `jobspool rm`")]
    JobExists {
        /// The id that was refused.
        id: String,
        /// The queue it was refused in.
        queue: String,
    },

    /// A push named the id of a job that finished recently. The id stays reserved while the
    /// finished job's log and history are kept, so that pushing a finished idempotency key again
    /// is harmless; removing them (`jobspool rm`) frees it.
    #[error(
        "job {id} finished recently; its id stays reserved while its log is kept (log retention {retention}); `jobspool rm {queue} {id}` frees it"
    )]
    Finished {
        /// The id that was refused.
        id: String,
        /// The queue it was refused in.
        queue: String,
        /// How long finished jobs' logs are kept, as written in the queue's configuration.
        retention: String,
    },

    /// No job with this id is in the queue (in the states that were searched).
    #[error("no job {id} in {queue}")]
    NotFound {
        /// The id that was looked for.
        id: String,
        /// The queue that was searched.
        queue: String,
    },

    /// The job exists but is not in a state that allows the operation.
    #[error("job {id} is {state}: {what}")]
    WrongState {
        /// The job.
        id: String,
        /// Its current state.
        state: &'static str,
        /// What could not be done.
        what: &'static str,
    },

    /// A caller-given value (job id, priority, duration, mode…) is not acceptable.
    #[error("{0}")]
    Invalid(String),

    /// A file-system call failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The path the call was about.
        path: PathBuf,
        /// What was being done, in a few words.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The queue's configuration or layout is unusable.
    #[error("{}: {msg}", path.display())]
    Config {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong and what to do about it.
        msg: String,
    },

    /// A remote store (Redis) could not be reached or answered with an error.
    #[error("{target}: {msg}")]
    Backend {
        /// The store's address.
        target: String,
        /// What failed.
        msg: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path and action it concerns.
    pub fn io(path: impl Into<PathBuf>, what: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io {
            path: path.into(),
            what,
            source: source.into(),
        }
    }

    /// True when the error means "this lease no longer belongs to you".
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost { .. })
    }
}
