//! A guardian process that kills the runner's handler groups if the runner dies.
//!
//! A handler dies with the runner (parent-death signal), but its own children do not: the
//! parent-death signal is not inherited. So each runner forks one small guardian at start. Each
//! handler registers its process group over a pipe between fork and exec, before it can start a
//! process of its own (registering after the spawn returned left a window in which a runner
//! killed at that moment left the handler's first children behind), and the runner unregisters
//! it when the handler is done; when the runner exits —
//! even by `kill -9` — the pipe reaches end-of-file and the guardian kills every group still
//! registered, then exits. On a clean exit no group is registered and it just exits.
//!
//! The guardian only makes async-signal-safe calls (it is forked from a multi-threaded process):
//! no allocation, no locks, a fixed table of groups.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::libc;
use nix::unistd::{ForkResult, Pid};

/// Most handler groups the guardian tracks at once (more slots than that are not protected).
const MAX_GROUPS: usize = 4096;

/// The runner's end of the guardian.
pub struct Reaper {
    pipe: Option<std::fs::File>,
    child: Pid,
}

impl Reaper {
    /// Forks the guardian.
    pub fn start() -> io::Result<Reaper> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // SAFETY: the child only calls async-signal-safe functions and then _exit.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Child => {
                drop(write);
                guard(read)
            }
            ForkResult::Parent { child } => {
                drop(read);
                Ok(Reaper {
                    pipe: Some(std::fs::File::from(write)),
                    child,
                })
            }
        }
    }

    fn send(&mut self, op: u8, pgid: u32) {
        if let Some(p) = self.pipe.as_mut() {
            // Five bytes are below PIPE_BUF: written whole or not at all.
            let _ = p.write_all(&message(op, pgid));
        }
    }

    /// The write end of the guardian's pipe. A handler registers its own process group through
    /// it between fork and exec (see `child::Handler::spawn`), before it can start any process
    /// of its own; the descriptor is close-on-exec.
    pub fn fd(&self) -> Option<RawFd> {
        self.pipe.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Unregisters a handler's process group (just before it is reaped).
    pub fn forget(&mut self, pgid: u32) {
        self.send(b'-', pgid);
    }
}

/// One message to the guardian: `+` registers a process group, `-` unregisters it.
pub fn message(op: u8, pgid: u32) -> [u8; 5] {
    let mut msg = [0u8; 5];
    msg[0] = op;
    msg[1..].copy_from_slice(&pgid.to_le_bytes());
    msg
}

/// Sends one message to the guardian through its raw descriptor. Async-signal-safe: one
/// `write` of five bytes, which is below PIPE_BUF and so never interleaves with other writers.
pub fn send_raw(fd: RawFd, op: u8, pgid: u32) {
    let msg = message(op, pgid);
    // SAFETY: writes five bytes from a stack buffer to a descriptor the caller keeps open.
    unsafe {
        nix::libc::write(fd, msg.as_ptr().cast(), msg.len());
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.pipe.take();
        let _ = nix::sys::wait::waitpid(self.child, None);
    }
}

/// The guardian's whole life, in the forked child.
fn guard(read: OwnedFd) -> ! {
    let fd = read.as_raw_fd();
    // SAFETY: plain system calls on integers and a stack buffer; no allocation.
    unsafe {
        // Survive the signals aimed at the runner's process group (a terminal's Ctrl-C): the
        // guardian's job starts when the runner is gone.
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP && sig != libc::SIGCHLD {
                libc::signal(sig, libc::SIG_IGN);
            }
        }
        // Hold nothing of the runner's: its lock on runners/ must go when it dies. Two
        // close_range calls instead of 65 536 closes (which cost every runner start ~30 ms);
        // the loop stays for kernels older than 5.9.
        let below = fd == 0 || libc::syscall(libc::SYS_close_range, 0u32, (fd - 1) as u32, 0u32) == 0;
        let above = libc::syscall(libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 0u32) == 0;
        if !below || !above {
            for other in 0..65536 {
                if other != fd {
                    libc::close(other);
                }
            }
        }
        let mut groups = [0i32; MAX_GROUPS];
        let mut buf = [0u8; 5 * 64];
        let mut have = 0usize;
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().add(have).cast(), buf.len() - have);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            have += n as usize;
            let whole = have - have % 5;
            let mut i = 0;
            while i < whole {
                let pgid = i32::from_le_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]);
                if buf[i] == b'+' {
                    if let Some(slot) = groups.iter_mut().find(|g| **g == 0) {
                        *slot = pgid;
                    }
                } else if let Some(slot) = groups.iter_mut().find(|g| **g == pgid) {
                    *slot = 0;
                }
                i += 5;
            }
            buf.copy_within(whole..have, 0);
            have -= whole;
        }
        for g in groups {
            if g > 0 {
                libc::kill(-g, libc::SIGKILL);
            }
        }
        libc::_exit(0)
    }
}
