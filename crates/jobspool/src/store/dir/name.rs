//! File names of the queue directory. A job's changing state lives in its name, so that every
//! transition is one atomic rename and the body is written once.
//!
//! ```text
//! ready/  and dead/   PPPP.TTTTTTTTTTTTT.A.ID
//! running/            PPPP.TTTTTTTTTTTTT.A.RRRRRRRRRRRRRRRR.CCCCCCCCCCCCC.L.NNNNNNNN.ID
//! ```
//!
//! - `PPPP`: 999 minus the priority, four digits, so that names sort most urgent first;
//! - `T…`: milliseconds since the epoch, thirteen digits — the run-at time in `ready/` (a time
//!   in the future means scheduled), the time of death in `dead/`, the original run-at time in
//!   `running/` (restored on release);
//! - `A`: attempts made before now;
//! - `R…`: the claimer's id (its entry in `runners/`, whose lock says whether it is alive);
//! - `C…`: the claim time; `L`: the lease duration in milliseconds. The lease expires at the
//!   later of the claim time and the file's mtime (the last heartbeat), plus `L`;
//! - `N…`: a random nonce, making every claim's name unique;
//! - `ID`: the job id, last, because it may contain dots.
//!
//! Names are parsed strictly: a name is valid only if formatting what was parsed gives the same
//! name back. Anything else in a state folder is quarantined.

use std::fmt::Write as _;

use crate::job::{JobId, MAX_PRIORITY, Millis};

/// A job's name in `ready/` or `dead/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedName {
    /// Priority.
    pub priority: i16,
    /// Run-at time (ready), or time of death (dead).
    pub at: Millis,
    /// Attempts made.
    pub attempts: u32,
    /// Job id.
    pub id: JobId,
}

/// A job's name in `running/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningName {
    /// Priority.
    pub priority: i16,
    /// Run-at time before the claim.
    pub run_at: Millis,
    /// Attempts made before this claim.
    pub attempts: u32,
    /// Claimer id, 16 hex digits.
    pub runner: String,
    /// Claim time.
    pub claimed: Millis,
    /// Lease duration in milliseconds.
    pub lease_ms: u64,
    /// Random nonce, 8 hex digits.
    pub nonce: String,
    /// Job id.
    pub id: JobId,
}

fn priority_key(priority: i16) -> u16 {
    (MAX_PRIORITY - priority) as u16
}

fn priority_from_key(key: u16) -> Option<i16> {
    let p = MAX_PRIORITY - i16::try_from(key).ok()?;
    (crate::job::MIN_PRIORITY..=MAX_PRIORITY).contains(&p).then_some(p)
}

impl QueuedName {
    /// The file name.
    pub fn format(&self) -> String {
        let mut s = String::with_capacity(24 + self.id.as_str().len());
        let _ = write!(
            s,
            "{:04}.{:013}.{}.{}",
            priority_key(self.priority),
            self.at,
            self.attempts,
            self.id
        );
        s
    }

    /// Parses a file name; `None` if it is not exactly a valid name.
    pub fn parse(name: &[u8]) -> Option<QueuedName> {
        let name = std::str::from_utf8(name).ok()?;
        let mut parts = name.splitn(4, '.');
        let priority = priority_from_key(fixed_digits(parts.next()?, 4)? as u16)?;
        let at = fixed_digits(parts.next()?, 13)?;
        let attempts = u32::try_from(plain_number(parts.next()?)?).ok()?;
        let id = JobId::new(parts.next()?).ok()?;
        let parsed = QueuedName {
            priority,
            at,
            attempts,
            id,
        };
        (parsed.format() == name).then_some(parsed)
    }
}

impl RunningName {
    /// The file name (the lease token).
    pub fn format(&self) -> String {
        let mut s = String::with_capacity(72 + self.id.as_str().len());
        let _ = write!(
            s,
            "{:04}.{:013}.{}.{}.{:013}.{}.{}.{}",
            priority_key(self.priority),
            self.run_at,
            self.attempts,
            self.runner,
            self.claimed,
            self.lease_ms,
            self.nonce,
            self.id
        );
        s
    }

    /// Parses a file name; `None` if it is not exactly a valid name.
    pub fn parse(name: &[u8]) -> Option<RunningName> {
        let name = std::str::from_utf8(name).ok()?;
        let mut parts = name.splitn(8, '.');
        let priority = priority_from_key(fixed_digits(parts.next()?, 4)? as u16)?;
        let run_at = fixed_digits(parts.next()?, 13)?;
        let attempts = u32::try_from(plain_number(parts.next()?)?).ok()?;
        let runner = hex(parts.next()?, 16)?;
        let claimed = fixed_digits(parts.next()?, 13)?;
        let lease_ms = plain_number(parts.next()?)?;
        let nonce = hex(parts.next()?, 8)?;
        let id = JobId::new(parts.next()?).ok()?;
        let parsed = RunningName {
            priority,
            run_at,
            attempts,
            runner,
            claimed,
            lease_ms,
            nonce,
            id,
        };
        (parsed.format() == name).then_some(parsed)
    }

    /// When the lease expires, given the file's mtime (the last heartbeat).
    pub fn expires(&self, mtime: Millis) -> Millis {
        self.claimed.max(mtime).saturating_add(self.lease_ms)
    }
}

/// A new random claimer id or nonce of `digits` hex digits.
pub fn random_hex(digits: usize) -> String {
    let mut s = String::with_capacity(digits);
    for _ in 0..digits {
        let _ = write!(s, "{:x}", fastrand::u8(0..16));
    }
    s
}

fn fixed_digits(s: &str, width: usize) -> Option<u64> {
    (s.len() == width && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn plain_number(s: &str) -> Option<u64> {
    (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn hex(s: &str, width: usize) -> Option<String> {
    (s.len() == width && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued() -> QueuedName {
        QueuedName {
            priority: 5,
            at: 1_732_350_000_123,
            attempts: 2,
            id: JobId::new("mail.v2-42").unwrap(),
        }
    }

    #[test]
    fn queued_names_round_trip_and_sort_by_priority_then_time() {
        let n = queued();
        assert_eq!(n.format(), "0994.1732350000123.2.mail.v2-42");
        assert_eq!(QueuedName::parse(n.format().as_bytes()), Some(n.clone()));
        let urgent = QueuedName {
            priority: 999,
            ..n.clone()
        };
        let later = QueuedName {
            at: n.at + 1,
            ..n.clone()
        };
        let low = QueuedName {
            priority: -999,
            at: 0,
            ..n.clone()
        };
        let mut names = [low.format(), later.format(), n.format(), urgent.format()];
        names.sort();
        assert_eq!(names, [urgent.format(), n.format(), later.format(), low.format()]);
    }

    #[test]
    fn running_names_round_trip() {
        let r = RunningName {
            priority: -3,
            run_at: 1_732_350_000_123,
            attempts: 0,
            runner: "0123456789abcdef".into(),
            claimed: 1_732_350_000_456,
            lease_ms: 30_000,
            nonce: "deadbeef".into(),
            id: JobId::new("a.b.c").unwrap(),
        };
        assert_eq!(RunningName::parse(r.format().as_bytes()), Some(r.clone()));
        assert_eq!(r.expires(0), 1_732_350_030_456);
        assert_eq!(r.expires(1_732_350_100_000), 1_732_350_130_000);
    }

    #[test]
    fn non_canonical_or_foreign_names_are_refused() {
        for bad in [
            "",
            ".hidden",
            "0994.1732350000123.2.",
            "0994.1732350000123.02.x",
            "994.1732350000123.2.x",
            "0994.173235000012.2.x",
            "2000.1732350000123.2.x",
            "0994.1732350000123.2.../x",
            "0994.1732350000123.-2.x",
            "0994.1732350000123.2.x y",
            "random-file.txt",
        ] {
            assert!(QueuedName::parse(bad.as_bytes()).is_none(), "{bad:?} accepted");
        }
        assert!(QueuedName::parse(b"0994.1732350000123.2.\xff").is_none());
        assert!(RunningName::parse(b"0994.1732350000123.0.0123456789ABCDEF.1732350000456.30000.deadbeef.x").is_none());
        assert!(RunningName::parse(queued().format().as_bytes()).is_none());
    }
}
