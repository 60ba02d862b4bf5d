//! The event loop's own timer: a timerfd that wakes the runner once, when asked.
//!
//! tokio's timer wheel parks a long sleep until the slot boundaries of its levels and re-arms
//! there, so an idle runner sleeping ten seconds to its next tick woke two or three times on the
//! way (measured in BENCHMARKS.md, item 7). A timerfd set to the deadline wakes it exactly then.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// A one-shot timer on `CLOCK_MONOTONIC`, re-armed by every [`Alarm::sleep_until`].
pub struct Alarm {
    fd: AsyncFd<Timer>,
    /// The deadline the timer is armed for and has not reported yet: the event loop sleeps
    /// to the same deadline several times a job, and re-arming it each time is a system call.
    armed: std::sync::Mutex<Option<Instant>>,
}

/// `TimerFd` as the raw descriptor `AsyncFd` wants.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Alarm {
    /// A new timer, registered with the current runtime.
    pub fn new() -> io::Result<Alarm> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: the AsyncFd owns the Timer, which owns the descriptor, open and unchanged for
        // the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(Timer(fd)) }.map_err(|e| e.into_parts().1)?;
        Ok(Alarm {
            fd,
            armed: std::sync::Mutex::new(None),
        })
    }

    /// Returns at `at` (at once when it has passed). Cancel-safe: dropping the future leaves
    /// the timer to be re-armed by the next call.
    pub async fn sleep_until(&self, at: Instant) -> io::Result<()> {
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        {
            let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
            if *armed != Some(at) {
                // Re-arming also resets an expiry a cancelled sleep left unread.
                *armed = None;
                self.fd.get_ref().0.set(
                    Expiration::OneShot(TimeSpec::from_duration(wait)),
                    TimerSetTimeFlags::empty(),
                )?;
                *armed = Some(at);
            }
        }
        loop {
            let mut ready = self.fd.readable().await?;
            let mut count = [0u8; 8];
            match ready.try_io(|fd| nix::unistd::read(fd.get_ref().0.as_fd(), &mut count).map_err(io::Error::from)) {
                Ok(Ok(_)) => {
                    *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                // Readiness left over from an earlier, cancelled sleep: wait for this one.
                Err(_would_block) => continue,
            }
        }
    }
}
