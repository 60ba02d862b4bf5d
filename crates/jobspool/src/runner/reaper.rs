//! A guardian process that kills the runner's handler groups if the runner dies.
//!
//! A handler dies with the runner (parent-death signal), but its own children do not: the
//! parent-death signal is not inherited. So each runner forks one small guardian at start,
//! sharing with it a table of process groups in memory mapped before the fork. Each handler
//! writes its process group into a cell of that table between fork and exec, before it can
//! start a process of its own (registering after the spawn returned left a window in which a
//! runner killed at that moment left the handler's first children behind), and the runner
//! clears the cell when the handler is done. The guardian sleeps on a pipe nobody writes to:
//! when the runner exits — even by `kill -9` — the pipe reaches end-of-file and the guardian
//! kills every group still in the table, then exits. On a clean exit the table is empty.
//!
//! A table rather than messages on the pipe: registering and forgetting are then a store to
//! memory each, where messages cost two system calls and two wake-ups of the guardian per job.
//! The handler's store happens before its exec, and the guardian reads the table only after
//! end-of-file, which cannot come before that exec closed the handler's copy of the pipe.
//!
//! The guardian only makes async-signal-safe calls (it is forked from a multi-threaded process):
//! no allocation, no locks.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::libc;
use nix::unistd::{ForkResult, Pid};

/// Most handler groups the guardian tracks at once (more handlers than that are not protected).
const MAX_GROUPS: usize = 4096;

/// The size of the shared table: a cell per group.
const TABLE_BYTES: usize = MAX_GROUPS * std::mem::size_of::<AtomicI32>();

/// The runner's end of the guardian.
pub struct Reaper {
    pipe: Option<std::fs::File>,
    child: Pid,
    /// `MAX_GROUPS` cells shared with the guardian: a process group id, or 0 when free.
    table: *mut AtomicI32,
    /// Cells no handler holds.
    free: Vec<usize>,
}

// SAFETY: the table is plain shared memory of atomics, valid until `drop` unmaps it; the
// runner reaches a `Reaper` only through a mutex.
unsafe impl Send for Reaper {}

impl Reaper {
    /// Maps the table and forks the guardian.
    pub fn start() -> io::Result<Reaper> {
        // SAFETY: a fresh anonymous shared mapping, zero-filled, owned by this Reaper.
        let table = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                TABLE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if table == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let table = table.cast::<AtomicI32>();
        let unmap = || {
            // SAFETY: unmaps the mapping made above, which nothing else uses.
            unsafe { libc::munmap(table.cast(), TABLE_BYTES) };
        };
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).inspect_err(|_| unmap())?;
        // SAFETY: the child only calls async-signal-safe functions and then _exit.
        match unsafe { nix::unistd::fork() }.inspect_err(|_| unmap())? {
            ForkResult::Child => {
                drop(write);
                guard(read, table)
            }
            ForkResult::Parent { child } => {
                drop(read);
                Ok(Reaper {
                    pipe: Some(std::fs::File::from(write)),
                    child,
                    table,
                    free: (0..MAX_GROUPS).rev().collect(),
                })
            }
        }
    }

    /// Takes a free cell for the next handler to register its process group in (see
    /// `child::Handler::spawn`); `None` when every cell is taken.
    pub fn reserve(&mut self) -> Option<usize> {
        self.free.pop()
    }

    /// The cell `index`, to give the handler.
    pub fn cell(&self, index: usize) -> &AtomicI32 {
        assert!(index < MAX_GROUPS);
        // SAFETY: in bounds, and the mapping lives as long as `self`.
        unsafe { &*self.table.add(index) }
    }

    /// Unregisters a handler's process group (just before it is reaped) and frees its cell.
    pub fn forget(&mut self, index: usize) {
        self.cell(index).store(0, Ordering::SeqCst);
        self.free.push(index);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.pipe.take();
        let _ = nix::sys::wait::waitpid(self.child, None);
        // SAFETY: the guardian has exited and no handler holds a cell past the runner's end.
        unsafe { libc::munmap(self.table.cast(), TABLE_BYTES) };
    }
}

/// The guardian's whole life, in the forked child.
fn guard(read: OwnedFd, table: *mut AtomicI32) -> ! {
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
        // Nothing is written to the pipe: end-of-file says the runner is gone.
        let mut byte = 0u8;
        loop {
            let n = libc::read(fd, (&raw mut byte).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        for i in 0..MAX_GROUPS {
            let g = (*table.add(i)).load(Ordering::SeqCst);
            if g > 0 {
                libc::kill(-g, libc::SIGKILL);
            }
        }
        libc::_exit(0)
    }
}
