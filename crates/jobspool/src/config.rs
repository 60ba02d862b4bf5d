//! Queue defaults (`jobspool.toml` in a queue directory, or a hash in Redis) and the value types
//! they are made of: durations written as `500ms`, `30s`, `5m`, `1h`, and a backoff range.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Parses a duration written as a number and a unit (`500ms`, `30s`, `5m`, `1h`, `2d`, or
/// combinations like `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        Error::Invalid(format!(
            "invalid duration {s:?}: {e}; write a number and a unit, like 500ms, 30s, 5m or 1h"
        ))
    })
}

/// Formats a duration the way `parse_duration` reads it.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d.subsec_millis() != 0 && d.as_secs() == 0 {
        return format!("{}ms", d.as_millis());
    }
    humantime::format_duration(Duration::new(d.as_secs(), d.subsec_millis() * 1_000_000))
        .to_string()
        .replace(' ', "")
}

/// Exponential backoff between attempts: the first retry waits about `min`, each further one
/// twice as long, never more than `max`. A random jitter of up to half the delay is subtracted so
/// that a batch of jobs that failed together does not come back together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before the retry that follows `attempts` failed attempts (1 for the first).
    pub fn delay(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(40);
        let full = self
            .min
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let half = full / 2;
        let jitter_ms = fastrand::u64(0..=half.as_millis() as u64);
        full - Duration::from_millis(jitter_ms)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(3600),
        }
    }
}

impl FromStr for Backoff {
    type Err = Error;
    fn from_str(s: &str) -> Result<Backoff> {
        let (a, b) = s
            .split_once("..")
            .ok_or_else(|| Error::Invalid(format!("invalid backoff {s:?}: write MIN..MAX, like 1s..1h")))?;
        let (min, max) = (parse_duration(a)?, parse_duration(b)?);
        if min > max || min.is_zero() {
            return Err(Error::Invalid(format!(
                "invalid backoff {s:?}: MIN must be above 0 and not above MAX"
            )));
        }
        Ok(Backoff { min, max })
    }
}

impl fmt::Display for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", format_duration(self.min), format_duration(self.max))
    }
}

/// A queue's defaults, used where neither the job nor the runner says otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Layout version; this build understands 1.
    pub version: u32,
    /// Permission bits of every job, log and runner file, whatever the creator's umask.
    #[serde(with = "mode_text")]
    pub mode: u32,
    /// Group that shares the queue, if any (informational; the directories carry it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Attempts before a job is dead.
    pub max_attempts: u32,
    /// How long a claim stays valid without a heartbeat.
    #[serde(with = "duration_text")]
    pub lease: Duration,
    /// Longest one attempt may run.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Delay between attempts.
    #[serde(with = "backoff_text")]
    pub backoff: Backoff,
    /// How long logs of finished jobs are kept.
    #[serde(with = "duration_text")]
    pub log_retention: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            version: 1,
            mode: 0o660,
            group: None,
            max_attempts: 5,
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(3600),
            backoff: Backoff::default(),
            log_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl QueueConfig {
    /// Parses and checks a configuration file's text.
    pub fn parse(text: &str) -> std::result::Result<QueueConfig, String> {
        // The version first: a layout this build does not know may lack the fields it expects,
        // and "missing field mode" would hide the real reason.
        #[derive(Deserialize)]
        struct Version {
            version: Option<toml::Value>,
        }
        if let Ok(Version { version: Some(v) }) = toml::from_str::<Version>(text) {
            if v.as_integer() != Some(1) {
                return Err(format!("unsupported queue layout version {v} (this jobspool reads 1)"));
            }
        }
        let cfg: QueueConfig = toml::from_str(text).map_err(|e| e.message().to_string())?;
        if cfg.version != 1 {
            return Err(format!(
                "queue layout version {} is not supported by this jobspool (it knows version 1)",
                cfg.version
            ));
        }
        if cfg.mode & !0o777 != 0 || cfg.mode & 0o600 != 0o600 {
            return Err(format!(
                "mode {:04o} must give the owner read and write and have no bits beyond 0777",
                cfg.mode
            ));
        }
        if cfg.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if cfg.lease < Duration::from_millis(100) {
            return Err("lease must be at least 100ms".into());
        }
        if cfg.timeout.is_zero() {
            return Err("timeout must be above 0".into());
        }
        if cfg.lease > crate::job::MAX_DURATION || cfg.timeout > crate::job::MAX_DURATION {
            return Err("lease and timeout must be at most 100 years".into());
        }
        Ok(cfg)
    }

    /// The text of a configuration file, with a comment saying what each key does.
    pub fn to_toml(&self) -> String {
        let mut s =
            String::from("# jobspool queue defaults; a job's own settings and the runner's options override them.\n");
        s.push_str(&toml::to_string(self).expect("config serializes"));
        s
    }
}

/// Parses a permission mode written in octal (`0660`, `660`, `0o660`).
pub fn parse_mode(s: &str) -> Result<u32> {
    let digits = s.trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777 && m & 0o600 == 0o600)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "invalid mode {s:?}: write octal permission bits that include owner read and write, like 0660 or 0600"
            ))
        })
}

mod mode_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{mode:04o}"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .map_err(|_| serde::de::Error::custom(format!("mode {text:?} is not octal")))
    }
}

mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod backoff_text {
    use super::Backoff;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Backoff, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Backoff, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_documented_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("soon").is_err());
        for d in ["500ms", "30s", "5m", "1h", "1h30m", "7days"] {
            let parsed = parse_duration(d).unwrap();
            assert_eq!(parse_duration(&format_duration(parsed)).unwrap(), parsed);
        }
    }

    #[test]
    fn default_config_round_trips() {
        let cfg = QueueConfig {
            group: Some("mail".into()),
            ..QueueConfig::default()
        };
        assert_eq!(QueueConfig::parse(&cfg.to_toml()).unwrap(), cfg);
    }

    #[test]
    fn bad_config_is_refused_with_the_reason() {
        let good = QueueConfig::default().to_toml();
        assert!(
            QueueConfig::parse(&good.replace("version = 1", "version = 9"))
                .unwrap_err()
                .contains("version 9")
        );
        assert!(QueueConfig::parse(&good.replace("lease = \"30s\"", "lease = \"forever\"")).is_err());
        assert!(QueueConfig::parse(&format!("{good}\nsurprise = 1\n")).is_err());
        assert!(QueueConfig::parse("").is_err());
    }

    #[test]
    fn an_unsupported_layout_version_is_named_before_missing_fields() {
        let future = "version = 2\nsomething = \"new\"\n";
        assert_eq!(
            QueueConfig::parse(future).unwrap_err(),
            "unsupported queue layout version 2 (this jobspool reads 1)"
        );
        let good = QueueConfig::default().to_toml();
        assert_eq!(
            QueueConfig::parse(&good.replace("version = 1", "version = 9")).unwrap_err(),
            "unsupported queue layout version 9 (this jobspool reads 1)"
        );
    }

    #[test]
    fn a_lease_or_timeout_no_claim_could_carry_is_refused() {
        let good = QueueConfig::default().to_toml();
        for bad in [
            good.replace("lease = \"30s\"", "lease = \"1000000000y\""),
            good.replace("timeout = \"1h\"", "timeout = \"1000000000y\""),
        ] {
            assert_ne!(bad, good);
            assert!(
                QueueConfig::parse(&bad).unwrap_err().contains("at most 100 years"),
                "{bad}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b: Backoff = "100ms..1s".parse().unwrap();
        for _ in 0..100 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            assert!(b.delay(60) <= Duration::from_secs(1));
        }
        assert!("1s..100ms".parse::<Backoff>().is_err());
        assert!("1s".parse::<Backoff>().is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert!(parse_mode("0440").is_err());
        assert!(parse_mode("4755").is_err());
        assert!(parse_mode("rw").is_err());
    }
}
