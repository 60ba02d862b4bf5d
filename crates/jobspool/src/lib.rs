//! # jobspool
//!
//! A crash-safe job queue and worker supervisor. Producers push jobs into a queue; runners claim
//! them, run a handler for each, and every job ends *done* (removed) or *dead* (kept, with its
//! reason and logs) — never lost, never acknowledged twice.
//!
//! The default store is a queue directory on local disk ([`store::dir::DirStore`]): one file per
//! job, its state the folder it is in, every transition an atomic rename. See [`store`] for the
//! contract every store keeps.
//!
//! ```no_run
//! use jobspool::{NewJob, store};
//! use std::time::Duration;
//!
//! let queue = store::open("/var/spool/myqueue", true)?;
//! let id = queue.push(&NewJob::new(b"hello".to_vec()).priority(5))?;
//! if let Some(claim) = queue.claim(Duration::from_secs(30))? {
//!     // ... do the work, heartbeating the lease if it takes long ...
//!     queue.ack(&claim.lease)?;
//! }
//! # Ok::<(), jobspool::Error>(())
//! ```

pub mod body;
pub mod config;
pub mod error;
pub mod job;
pub mod runner;
pub mod store;

pub use config::{Backoff, QueueConfig};
pub use error::{Error, Result};
pub use job::{Job, JobId, NewJob, State};
pub use store::{Claim, Lease, Store};

/// This machine's host name, for runner registrations and log headers.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".into())
}
