//! Handler processes: started in their own process group, killed with the runner, signalled as
//! a group, and reaped without a process-id reuse race.
//!
//! Each handler is the leader of a new process group, so its children and grandchildren can be
//! signalled together. It gets `SIGKILL` as its parent-death signal, so it dies with the runner
//! even under `kill -9`. Its signal mask is emptied and every signal disposition reset to the
//! default, because a runner that ignores or blocks signals would otherwise pass that on.
//!
//! Exit is observed through a pidfd, which becomes readable when the handler exits *but before
//! it is reaped*. While the exited leader is unreaped its process id — and so its process-group
//! id — cannot be reused, so the runner can kill whatever the handler left behind in its group
//! and only then reap it. Every `killpg` happens before the reap; none after.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ExitStatus, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

/// A running handler process.
pub struct Handler {
    child: Option<Child>,
    pidfd: AsyncFd<OwnedFd>,
}

/// What to give a handler.
pub struct Spawn<'a> {
    /// Program and arguments.
    pub argv: &'a [OsString],
    /// Extra environment variables.
    pub env: &'a [(&'static str, String)],
    /// Standard input.
    pub stdin: Stdio,
    /// Standard output.
    pub stdout: Stdio,
    /// Standard error.
    pub stderr: Stdio,
    /// The runner's guardian (the write end of its pipe), which the handler registers its
    /// process group with before exec; see the `reaper` module.
    pub guardian: Option<RawFd>,
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Handler {
    /// Starts a handler. Must be called from a thread that lives as long as the runner: the
    /// parent-death signal fires when the *thread* that forked exits.
    pub fn spawn(spec: Spawn<'_>) -> io::Result<Handler> {
        let mut cmd = std::process::Command::new(&spec.argv[0]);
        cmd.args(&spec.argv[1..])
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(spec.stdin)
            .stdout(spec.stdout)
            .stderr(spec.stderr)
            .process_group(0);
        let parent = std::process::id() as nix::libc::pid_t;
        let guardian = spec.guardian;
        // The child reports its pid here too, so that a registration can be withdrawn when the
        // exec then fails (std reaps the child and returns no pid).
        let (pid_read, pid_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let pid_write_fd = pid_write.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (prctl, getppid, sigaction, sigprocmask, raise).
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The runner may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::raise(libc::SIGKILL);
                }
                // Register the new process group with the guardian before anything can start in
                // it. The guardian sees end-of-file only once this process has exec'd or died
                // (it holds the close-on-exec write end until then), so it reads this first.
                if let Some(fd) = guardian {
                    let pid = libc::getpid() as u32;
                    let bytes = pid.to_le_bytes();
                    libc::write(pid_write_fd, bytes.as_ptr().cast(), bytes.len());
                    super::reaper::send_raw(fd, b'+', pid);
                }
                for sig in 1..libc::SIGRTMIN() {
                    if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                        libc::signal(sig, libc::SIG_DFL);
                    }
                }
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        drop(pid_write);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if let Some(fd) = guardian {
                    let mut bytes = [0u8; 4];
                    let mut pipe = std::fs::File::from(pid_read);
                    if std::io::Read::read_exact(&mut pipe, &mut bytes).is_ok() {
                        super::reaper::send_raw(fd, b'-', u32::from_le_bytes(bytes));
                    }
                }
                return Err(e);
            }
        };
        drop(pid_read);
        let registered = pidfd_open(child.id()).and_then(|fd| {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open, and always returns the
            // same descriptor, for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)
        });
        let pidfd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                if let Some(fd) = guardian {
                    super::reaper::send_raw(fd, b'-', child.id());
                }
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Handler {
            child: Some(child),
            pidfd,
        })
    }

    /// The handler's process id (and process-group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Takes the handler's standard input pipe, if one was requested.
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.as_mut().and_then(|c| c.stdin.take())
    }

    /// Takes the handler's standard output pipe, if one was requested.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Sends `signal` to the handler's whole process group. Only valid until [`Handler::reap`].
    pub fn signal_group(&self, signal: Signal) {
        let Some(child) = &self.child else { return };
        match killpg(Pid::from_raw(child.id() as i32), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pid = child.id(), "cannot signal the handler's process group: {e}"),
        }
    }

    /// Resolves when the handler has exited (it is not reaped yet).
    pub async fn exited(&self) -> io::Result<()> {
        let mut guard = self.pidfd.readable().await?;
        guard.retain_ready();
        Ok(())
    }

    /// Kills whatever the exited handler left in its process group, then reaps it.
    pub fn reap(mut self) -> io::Result<ExitStatus> {
        self.signal_group(Signal::SIGKILL);
        self.child.take().expect("reaped once").wait()
    }
}

impl Drop for Handler {
    /// A handler is never left behind: if it was not reaped (the runner is unwinding), its
    /// group is killed and it is reaped here.
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal_group(Signal::SIGKILL);
            if let Some(mut c) = self.child.take() {
                let _ = c.wait();
            }
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
    use std::io::Read;

    fn spawn(argv: &[&str], guardian: RawFd) -> io::Result<Handler> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        Handler::spawn(Spawn {
            argv: &argv,
            env: &[],
            stdin: Stdio::null(),
            stdout: Stdio::null(),
            stderr: Stdio::null(),
            guardian: Some(guardian),
        })
    }

    /// The messages the guardian would have read, as (op, pgid).
    fn messages(read: OwnedFd) -> Vec<(u8, u32)> {
        let mut bytes = Vec::new();
        std::fs::File::from(read).read_to_end(&mut bytes).unwrap();
        bytes
            .chunks(5)
            .map(|m| (m[0], u32::from_le_bytes([m[1], m[2], m[3], m[4]])))
            .collect()
    }

    #[tokio::test]
    async fn a_handler_registers_its_group_with_the_guardian_before_exec_and_a_failed_exec_withdraws_it() {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let handler = spawn(&["true"], write.as_raw_fd()).unwrap();
        let pid = handler.pid();
        handler.exited().await.unwrap();
        handler.reap().unwrap();
        assert!(spawn(&["/no/such/program"], write.as_raw_fd()).is_err());
        drop(write);
        let got = messages(read);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], (b'+', pid), "registered by the handler itself: {got:?}");
        assert_eq!(got[1].0, b'+');
        assert_eq!(
            got[2],
            (b'-', got[1].1),
            "a failed exec withdraws its registration: {got:?}"
        );
    }
}
