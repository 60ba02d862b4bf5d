//! Finding and stopping handler processes of a claim that was taken back.
//!
//! A runner killed with `SIGKILL` takes its handlers with it (parent-death signal), but not their
//! children, which keep running in the dead handler's process group. Every handler gets its
//! lease token in `JOBSPOOL_LEASE`, and its children inherit it; when a claim is reclaimed on this
//! machine, the processes whose environment carries that token are killed, so that a reclaimed
//! job never runs twice at once. Processes of other users that this one may not inspect are left
//! alone, as are processes that cleared their environment.

use std::fs;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Kills every process on this machine whose environment has `JOBSPOOL_LEASE=token`. Returns how
/// many were killed.
pub fn kill_by_lease(token: &str) -> usize {
    let needle = format!("JOBSPOOL_LEASE={token}");
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else { return 0 };
    let mut killed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|var| var == needle.as_bytes())
            && kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}
