//! From how an attempt ended to what happens to its job: the exit-code contract.
//!
//! | attempt ended with | job |
//! |---|---|
//! | exit 0 | done (removed) |
//! | exit 75 (`EX_TEMPFAIL`) | retried after backoff; dead when attempts are exhausted |
//! | exit 100 | dead now (permanent failure) |
//! | any other exit, a signal, the timeout, a failure to start | retried after backoff; dead when attempts are exhausted |
//! | the runner stopped it while shutting down | released: back to ready, attempt not counted |
//! | the runner could not start it for want of processes, memory or descriptors | released: back to ready, attempt not counted; the runner pauses its claims |
//! | claimed ahead, and no slot came free in time | released: back to ready, attempt not counted |
//! | its lease was lost | nothing: the job belongs to another claimer now |

use std::time::Duration;

use nix::libc;

use crate::config::Backoff;

/// Exit code asking for a retry later (`EX_TEMPFAIL` from `sysexits.h`).
pub const EXIT_RETRY: i32 = 75;
/// Exit code declaring a permanent failure.
pub const EXIT_PERMANENT: i32 = 100;

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The handler exited with this code.
    Exit(i32),
    /// The handler was killed by this signal (not sent by the runner).
    Signal(String),
    /// The handler ran past its time limit and was killed.
    TimedOut(Duration),
    /// The handler could not be started.
    SpawnFailed(String),
    /// The handler could not be started because the runner ran out of processes, memory or
    /// descriptors: nothing to do with the job.
    NoResources(String),
    /// A handler function (library) returned a failure.
    Failed(String),
    /// The runner stopped the handler because it is shutting down.
    Stopped,
    /// The job was claimed ahead of a free slot and given back unstarted: no slot came free
    /// in time, or the runner began shutting down.
    GivenBack,
    /// The lease was lost while the handler ran; it was stopped.
    LeaseLost,
    /// The job carries its own command and the runner does not allow that, or there is no
    /// handler for it: it cannot run here.
    Refused(String),
}

impl Ended {
    /// A few words for logs and dead reasons.
    pub fn describe(&self) -> String {
        match self {
            Ended::Exit(0) => "exit 0".into(),
            Ended::Exit(EXIT_RETRY) => format!("exit {EXIT_RETRY} (temporary failure)"),
            Ended::Exit(EXIT_PERMANENT) => format!("exit {EXIT_PERMANENT} (permanent failure)"),
            Ended::Exit(c) => format!("exit {c}"),
            Ended::Signal(s) => format!("killed by {s}"),
            Ended::TimedOut(d) => format!("timed out after {}", crate::config::format_duration(*d)),
            Ended::SpawnFailed(e) => format!("could not start the handler: {e}"),
            Ended::NoResources(e) => format!("the runner could not start the handler: {e}"),
            Ended::Failed(e) => format!("failed: {e}"),
            Ended::Stopped => "stopped by the runner's shutdown".into(),
            Ended::GivenBack => "claimed ahead of a free slot and given back unstarted".into(),
            Ended::LeaseLost => "lease lost".into(),
            Ended::Refused(why) => why.clone(),
        }
    }
}

impl Ended {
    /// A handler that could not be started (`what` says which step failed and why): the
    /// runner's own shortage of processes, memory or descriptors (`errno` EAGAIN, ENOMEM,
    /// EMFILE, ENFILE) is no fault of the job and must not use up its attempts; anything else
    /// (the program is missing, not executable…) fails the attempt.
    pub fn not_started(what: String, errno: Option<i32>) -> Ended {
        match errno {
            Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => Ended::NoResources(what),
            _ => Ended::SpawnFailed(what),
        }
    }
}

/// What to do with the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Done: acknowledge.
    Ack,
    /// Failed, attempts left: schedule again after `delay`.
    Retry {
        /// Backoff delay.
        delay: Duration,
        /// What failed.
        reason: String,
    },
    /// Dead, with the reason.
    Bury {
        /// Why.
        reason: String,
    },
    /// Give it back without counting the attempt.
    Release,
    /// Touch nothing: the lease is gone.
    Abandon,
}

/// Applies the exit-code contract. `attempt` is this attempt's number (1 for the first),
/// `max_attempts` the job's limit, `output` the last lines the attempt printed.
pub fn decide(ended: &Ended, attempt: u32, max_attempts: u32, backoff: &Backoff, output: &str) -> Decision {
    let with_output = |reason: String| {
        if output.trim().is_empty() {
            reason
        } else {
            format!("{reason}; last output: {}", output.trim_end())
        }
    };
    match ended {
        Ended::Exit(0) => Decision::Ack,
        Ended::Stopped | Ended::GivenBack | Ended::NoResources(_) => Decision::Release,
        Ended::LeaseLost => Decision::Abandon,
        Ended::Exit(EXIT_PERMANENT) | Ended::Refused(_) => Decision::Bury {
            reason: with_output(format!("{} on attempt {attempt}", ended.describe())),
        },
        _ if attempt >= max_attempts => Decision::Bury {
            reason: with_output(format!(
                "{} on attempt {attempt} of {max_attempts}; no attempts left",
                ended.describe()
            )),
        },
        _ => Decision::Retry {
            delay: backoff.delay(attempt),
            reason: with_output(format!("{} on attempt {attempt} of {max_attempts}", ended.describe())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backoff {
        "1s..1m".parse().unwrap()
    }

    #[test]
    fn the_exit_code_contract() {
        assert_eq!(decide(&Ended::Exit(0), 1, 3, &b(), ""), Decision::Ack);
        assert!(matches!(
            decide(&Ended::Exit(75), 1, 3, &b(), ""),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            decide(&Ended::Exit(1), 2, 3, &b(), ""),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            decide(&Ended::Signal("SIGSEGV".into()), 1, 3, &b(), ""),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            decide(&Ended::TimedOut(Duration::from_secs(5)), 1, 3, &b(), ""),
            Decision::Retry { .. }
        ));
        assert_eq!(decide(&Ended::Stopped, 1, 3, &b(), ""), Decision::Release);
        assert_eq!(decide(&Ended::GivenBack, 1, 3, &b(), ""), Decision::Release);
        assert_eq!(
            decide(&Ended::NoResources("fork".into()), 3, 3, &b(), ""),
            Decision::Release
        );
        assert_eq!(decide(&Ended::LeaseLost, 3, 3, &b(), ""), Decision::Abandon);
        match decide(&Ended::Exit(100), 1, 3, &b(), "boom\n") {
            Decision::Bury { reason } => {
                assert_eq!(reason, "exit 100 (permanent failure) on attempt 1; last output: boom")
            }
            d => panic!("{d:?}"),
        }
        match decide(&Ended::Exit(3), 3, 3, &b(), "") {
            Decision::Bury { reason } => assert_eq!(reason, "exit 3 on attempt 3 of 3; no attempts left"),
            d => panic!("{d:?}"),
        }
        match decide(&Ended::Exit(75), 3, 3, &b(), "") {
            Decision::Bury { reason } => assert!(reason.starts_with("exit 75 (temporary failure) on attempt 3 of 3")),
            d => panic!("{d:?}"),
        }
    }

    /// A runner out of descriptors or processes used to fail every job it claimed, until each
    /// was dead; only the handler's own failures to start count against the job.
    #[test]
    fn a_handler_the_runner_had_no_resources_to_start_is_given_back_not_failed() {
        for errno in [libc::EAGAIN, libc::ENOMEM, libc::EMFILE, libc::ENFILE] {
            let ended = Ended::not_started("x".into(), Some(errno));
            assert!(matches!(ended, Ended::NoResources(_)), "{errno}");
            assert_eq!(decide(&ended, 5, 5, &b(), ""), Decision::Release);
        }
        for errno in [Some(libc::ENOENT), Some(libc::EACCES), Some(libc::ENOEXEC), None] {
            let ended = Ended::not_started("x".into(), errno);
            assert!(matches!(ended, Ended::SpawnFailed(_)), "{errno:?}");
            assert!(matches!(decide(&ended, 1, 5, &b(), ""), Decision::Retry { .. }));
        }
    }

    #[test]
    fn retries_back_off_exponentially() {
        let b: Backoff = "1s..1h".parse().unwrap();
        let delay = |attempt| match decide(&Ended::Exit(1), attempt, 10, &b, "") {
            Decision::Retry { delay, .. } => delay,
            d => panic!("{d:?}"),
        };
        assert!(delay(1) <= Duration::from_secs(1) && delay(1) >= Duration::from_millis(500));
        assert!(delay(4) <= Duration::from_secs(8) && delay(4) >= Duration::from_secs(4));
    }
}
