//! Handler processes: started in their own process group, killed with the runner, signalled as
//! a group, and reaped without a process-id reuse race.
//!
//! Each handler is the leader of a new process group, so its children and grandchildren can be
//! signalled together. It gets `SIGKILL` as its parent-death signal, so it dies with the runner
//! even under `kill -9`. Its signal mask is emptied and every signal disposition reset to the
//! default, because a runner that ignores or blocks signals would otherwise pass that on.
//!
//! The handler is started the way `posix_spawn` starts a process — `clone(CLONE_VM |
//! CLONE_VFORK)`, borrowing the runner's memory until it execs — and not with `fork`:
//! `std::process::Command` falls back to a full `fork` of the runner as soon as anything must
//! happen between fork and exec, and copying the runner's page tables then taking
//! copy-on-write faults cost about 3 ms a job, five times the whole spawn of `true`
//! (BENCHMARKS.md, profile point 1). `posix_spawn` itself cannot set the parent-death signal,
//! nor register the group with the guardian before the handler can start children of its own,
//! so the few system calls between clone and exec are done here.
//!
//! Exit is observed through a pidfd, which becomes readable when the handler exits *but before
//! it is reaped*. While the exited leader is unreaped its process id — and so its process-group
//! id — cannot be reused, so the runner can kill whatever the handler left behind in its group
//! and only then reap it. Every `killpg` happens before the reap; none after.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::libc;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

/// A running handler process.
pub struct Handler {
    /// The handler's process id until it is reaped.
    pid: Option<libc::pid_t>,
    pidfd: AsyncFd<OwnedFd>,
    /// Its cell in the guardian's table, cleared if the handler is dropped unreaped (see
    /// `Drop`).
    guardian: Option<GuardianCell>,
}

/// A handler's cell in the guardian's table (a mapping that outlives every handler, see
/// [`Spawn::guardian`]).
struct GuardianCell(std::ptr::NonNull<AtomicI32>);

// SAFETY: the cell is an atomic in a shared mapping that lives as long as the runner; it is
// only ever read and written atomically.
unsafe impl Send for GuardianCell {}
unsafe impl Sync for GuardianCell {}

/// What to give a handler.
pub struct Spawn<'a> {
    /// Where the program is, when the caller has looked it up already; else `argv[0]`, looked
    /// up in `PATH` when it has no `/`.
    pub program: Option<&'a Path>,
    /// Program and arguments.
    pub argv: &'a [OsString],
    /// Extra environment variables, on top of the runner's own.
    pub env: &'a [(&'static str, String)],
    /// Standard input; `None` is `/dev/null`.
    pub stdin: Option<OwnedFd>,
    /// Standard output.
    pub stdout: OwnedFd,
    /// Standard error.
    pub stderr: OwnedFd,
    /// The handler's cell in the guardian's table, where it writes its process group before
    /// exec; see the `reaper` module. It must outlive the handler, which clears it if dropped
    /// unreaped.
    pub guardian: Option<&'a AtomicI32>,
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The runner's own environment as `NAME=value` strings, built once: a runner does not change
/// its environment, and rebuilding it for every handler was a measurable part of a spawn.
fn inherited_env() -> &'static [(Vec<u8>, CString)] {
    static ENV: std::sync::OnceLock<Vec<(Vec<u8>, CString)>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(k, v)| {
                let name = k.into_vec();
                let mut kv = name.clone();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                Some((name, CString::new(kv).ok()?))
            })
            .collect()
    })
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

/// A descriptor numbered 3 or above, so that putting the three standard ones in place in the
/// child can never overwrite one still to be used (a runner started with its own standard
/// descriptors closed gets low numbers for the files it opens).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    Ok(
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)).map(|n| {
            // SAFETY: fcntl just returned this new descriptor and nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(n) }
        })?,
    )
}

/// Everything the child needs, prepared by the parent: between clone and exec the child may
/// not allocate or take locks (it runs on borrowed memory, beside the runner's other threads).
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    fds: [RawFd; 3],
    guardian: *const AtomicI32,
    parent: libc::pid_t,
    /// The step that failed and its errno, written by the child when it cannot exec.
    failed: AtomicI32,
    errno: AtomicI32,
}

const STEP_PDEATHSIG: i32 = 1;
const STEP_SETPGID: i32 = 2;
const STEP_DUP2: i32 = 3;
const STEP_EXEC: i32 = 4;

/// The child, between clone and exec. Only async-signal-safe system calls, on its own stack.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive and unmoved until this child has
    // exec'd or exited (CLONE_VFORK suspends the parent thread until then).
    let a = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: plain system calls on integers and on memory the parent prepared.
    unsafe {
        let fail = |step: i32| -> ! {
            a.errno.store(*libc::__errno_location(), Ordering::Relaxed);
            a.failed.store(step, Ordering::Release);
            libc::_exit(127)
        };
        // Every signal but SIGCHLD is blocked (the parent blocked them before clone), so no
        // handler of the runner's can run on this borrowed memory; their dispositions go before
        // the mask.
        // Every signal, realtime ones included (an ignored one is inherited across exec), and
        // raw: glibc's `sigaction` refuses the two it reserves for itself.
        let default = [libc::SIG_DFL, 0, 0, 0];
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &default,
                    std::ptr::null_mut::<usize>(),
                    8usize,
                );
            }
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail(STEP_PDEATHSIG);
        }
        // The runner may have died before the parent-death signal was set.
        if libc::getppid() != a.parent {
            libc::_exit(127);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(STEP_SETPGID);
        }
        // Register the new process group with the guardian before anything can start in it.
        // The guardian reads its table only at end-of-file on its pipe, which cannot come
        // before this process exec'd or died (it holds a close-on-exec copy of the write end).
        if let Some(cell) = a.guardian.as_ref() {
            cell.store(libc::getpid(), Ordering::SeqCst);
        }
        for (target, &fd) in a.fds.iter().enumerate() {
            if libc::dup2(fd, target as libc::c_int) < 0 {
                fail(STEP_DUP2);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execvpe(a.program, a.argv, a.envp);
        fail(STEP_EXEC)
    }
}

impl Handler {
    /// Starts a handler. Must be called from a thread that lives as long as the runner: the
    /// parent-death signal fires when the *thread* that started the handler exits.
    pub fn spawn(spec: Spawn<'_>) -> io::Result<Handler> {
        let Some(first) = spec.argv.first() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no program to run"));
        };
        let program = cstring(spec.program.map_or(first.as_os_str(), Path::as_os_str))?;
        let args = spec.argv.iter().map(|a| cstring(a)).collect::<io::Result<Vec<_>>>()?;
        let env: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| cstring(OsStr::new(&format!("{k}={v}"))))
            .collect::<io::Result<_>>()?;
        let argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let envp: Vec<*const libc::c_char> = inherited_env()
            .iter()
            .filter(|(name, _)| !spec.env.iter().any(|(ours, _)| ours.as_bytes() == name.as_slice()))
            .map(|(_, kv)| kv.as_ptr())
            .chain(env.iter().map(|e| e.as_ptr()))
            .chain([std::ptr::null()])
            .collect();
        let stdin = match spec.stdin {
            Some(fd) => fd,
            None => std::fs::File::open("/dev/null")?.into(),
        };
        let fds = [
            above_stdio(stdin)?,
            above_stdio(spec.stdout)?,
            above_stdio(spec.stderr)?,
        ];
        let child = ChildArgs {
            program: program.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            fds: [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()],
            guardian: spec.guardian.map_or(std::ptr::null(), std::ptr::from_ref),
            parent: std::process::id() as libc::pid_t,
            failed: AtomicI32::new(0),
            errno: AtomicI32::new(0),
        };
        // The child's stack: room for execvpe's path buffer and, for a script without a `#!`
        // line, its copy of argv (what glibc's posix_spawn allows).
        let mut stack = Box::<[u8]>::new_uninit_slice(64 * 1024 + argv.len() * std::mem::size_of::<usize>());
        let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
        // SAFETY: blocking every signal of this thread (raw, so glibc's internal ones too)
        // keeps signal handlers off the borrowed memory until the child has reset them; the
        // child runs `child_main` on its own stack with pointers into `child`, `argv`, `envp`
        // and `program`, all alive until clone returns, which with CLONE_VFORK is after the
        // child exec'd or exited.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            // Except SIGCHLD. An ignored signal is dropped when it is sent, but not while the
            // thread it is sent to (the one that started the exiting handler: this one) blocks
            // it: then it is queued and delivered to any other thread, whose blocking system
            // call it interrupts, and a socket read with a timeout fails with EINTR instead of
            // restarting (Redis requests failed that way, a few times a second with two slots).
            // Nothing sends SIGCHLD to the child before it resets its dispositions: it has no
            // children yet.
            libc::sigdelset(&mut all, libc::SIGCHLD);
            libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &all, &mut old, 8usize);
            let pid = libc::clone(
                child_main,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &child as *const ChildArgs as *mut libc::c_void,
            );
            let clone_error = io::Error::last_os_error();
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &old,
                std::ptr::null_mut::<libc::sigset_t>(),
                8usize,
            );
            if pid < 0 {
                return Err(clone_error);
            }
            pid
        };
        drop(stack);
        let step = child.failed.load(Ordering::Acquire);
        if step != 0 {
            // The child exited instead of exec'ing.
            withdraw(pid, spec.guardian);
            let errno = io::Error::from_raw_os_error(child.errno.load(Ordering::Relaxed));
            return Err(match step {
                STEP_EXEC => errno,
                STEP_PDEATHSIG => io::Error::new(errno.kind(), format!("setting the parent-death signal: {errno}")),
                STEP_SETPGID => io::Error::new(errno.kind(), format!("starting a process group: {errno}")),
                _ => io::Error::new(errno.kind(), format!("redirecting standard input and output: {errno}")),
            });
        }
        let registered = pidfd_open(pid).and_then(|fd| {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open, and always returns the
            // same descriptor, for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)
        });
        match registered {
            Ok(pidfd) => Ok(Handler {
                pid: Some(pid),
                pidfd,
                guardian: spec.guardian.map(|cell| GuardianCell(std::ptr::NonNull::from(cell))),
            }),
            Err(e) => {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                withdraw(pid, spec.guardian);
                Err(e)
            }
        }
    }

    /// The handler's process id (and process-group id).
    pub fn pid(&self) -> u32 {
        self.pid.map_or(0, |p| p as u32)
    }

    /// Sends `signal` to the handler's whole process group. Only valid until [`Handler::reap`].
    pub fn signal_group(&self, signal: Signal) {
        let Some(pid) = self.pid else { return };
        match killpg(Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pid, "cannot signal the handler's process group: {e}"),
        }
    }

    /// Resolves when the handler has exited (it is not reaped yet).
    pub async fn exited(&self) -> io::Result<()> {
        let mut guard = self.pidfd.readable().await?;
        guard.retain_ready();
        Ok(())
    }

    /// Reaps the handler. What it left in its process group should be killed first
    /// ([`Handler::signal_group`]): once the leader is reaped, its group id can be reused.
    pub fn reap(mut self) -> io::Result<ExitStatus> {
        wait(self.pid.take().expect("reaped once"))
    }

    /// [`Handler::reap`] without waiting: the handler is given back if it has not exited yet.
    /// Once [`Handler::exited`] resolved, this reaps it at once, on the caller's thread.
    pub fn try_reap(mut self) -> Result<io::Result<ExitStatus>, Handler> {
        match waitpid(self.pid.expect("reaped once"), libc::WNOHANG) {
            Ok(None) => Err(self),
            reaped => {
                self.pid = None;
                Ok(reaped.and_then(|status| status.ok_or_else(|| io::Error::other("no status"))))
            }
        }
    }
}

/// `waitpid` on our own child, retried when interrupted; `None` when `WNOHANG` found it running.
fn waitpid(pid: libc::pid_t, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing its status into a local.
        match unsafe { libc::waitpid(pid, &mut status, flags) } {
            0 => return Ok(None),
            n if n > 0 => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Waits for a child and returns its status.
fn wait(pid: libc::pid_t) -> io::Result<ExitStatus> {
    waitpid(pid, 0)?.ok_or_else(|| io::Error::other("waitpid returned no status"))
}

/// Takes back a handler that will not be supervised (its exec failed, or it cannot be watched):
/// withdraws its group from the guardian and reaps it.
fn withdraw(pid: libc::pid_t, guardian: Option<&AtomicI32>) {
    if let Some(cell) = guardian {
        cell.store(0, Ordering::SeqCst);
    }
    let _ = wait(pid);
}

impl Drop for Handler {
    /// A handler is never left behind: if it was not reaped (the runner is unwinding), its
    /// group is killed, withdrawn from the guardian, and it is reaped here. Withdrawn before
    /// the reap: once reaped, its group id may be reused by an unrelated process group, which
    /// the guardian would kill if the runner then died. Only if the cell still holds this
    /// group: a cell the runner had already freed may hold another handler's by now.
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            if let Some(cell) = &self.guardian {
                // SAFETY: see `GuardianCell`.
                let cell = unsafe { cell.0.as_ref() };
                let _ = cell.compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
            }
            let _ = wait(pid);
        }
    }
}

/// Describes an exit status in words: `exit 3`, `killed by SIGKILL`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(argv: &[&str], guardian: &AtomicI32) -> io::Result<Handler> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        Handler::spawn(Spawn {
            program: None,
            argv: &argv,
            env: &[],
            stdin: None,
            stdout: std::fs::File::create("/dev/null").unwrap().into(),
            stderr: std::fs::File::create("/dev/null").unwrap().into(),
            guardian: Some(guardian),
        })
    }

    /// A handler dropped unreaped (the runner unwinding) was killed and reaped, but its group
    /// stayed registered: had the runner then died, the guardian would have killed that group id,
    /// by then free for any process to take.
    #[tokio::test]
    async fn a_handler_dropped_unreaped_withdraws_its_group_but_never_another_handlers() {
        let cell = AtomicI32::new(0);
        let handler = spawn(&["sleep", "30"], &cell).unwrap();
        let pid = handler.pid() as i32;
        assert_eq!(cell.load(Ordering::SeqCst), pid);
        drop(handler);
        assert_eq!(cell.load(Ordering::SeqCst), 0, "withdrawn when dropped");
        // SAFETY: kill with signal 0 only checks for existence.
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "killed and reaped");

        // The runner freed the cell and another handler took it: leave that one alone.
        let handler = spawn(&["sleep", "30"], &cell).unwrap();
        cell.store(1, Ordering::SeqCst);
        drop(handler);
        assert_eq!(cell.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_handler_registers_its_group_with_the_guardian_before_exec_and_a_failed_exec_withdraws_it() {
        let cell = AtomicI32::new(0);
        let handler = spawn(&["true"], &cell).unwrap();
        // The spawn returns once the handler exec'd: it registered itself before.
        assert_eq!(cell.load(Ordering::SeqCst), handler.pid() as i32);
        handler.exited().await.unwrap();
        handler.reap().unwrap();
        let failed = AtomicI32::new(0);
        assert!(spawn(&["/no/such/program"], &failed).is_err());
        assert_eq!(
            failed.load(Ordering::SeqCst),
            0,
            "a failed exec withdraws its registration"
        );
    }
}
