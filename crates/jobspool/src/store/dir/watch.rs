//! Waking a runner when jobs arrive or a claimer dies, from a background thread blocked on inotify.

use super::*;

impl DirStore {
    pub(super) fn start_watch(&self, wake: Wake) -> Result<Box<dyn WatchGuard>> {
        let fd = {
            let mut guard = lock(&self.index);
            let idx = guard.get_or_insert_with(|| Index::new(&self.root));
            match idx.fd() {
                Some(fd) => Some(
                    fd.try_clone_to_owned()
                        .map_err(|e| Error::io(&self.root, "watching", e))?,
                ),
                None => None,
            }
        };
        let (stop_read, stop_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io(&self.root, "creating the watch pipe", e))?;
        let index = Arc::clone(&self.index);
        let thread = std::thread::Builder::new()
            .name("jobspool-watch".into())
            .spawn(move || watch_loop(fd, stop_read, index, wake))
            .map_err(|e| Error::io(&self.root, "starting the watch thread", e))?;
        Ok(Box::new(DirWatch {
            stop: Some(stop_write),
            thread: Some(thread),
        }))
    }

    pub(super) fn earliest_due(&self) -> Result<Option<Millis>> {
        let mut guard = lock(&self.index);
        let idx = guard.get_or_insert_with(|| Index::new(&self.root));
        idx.drain();
        idx.refresh(&*self.fs, &self.d.ready)
            .map_err(|e| Error::io(&self.d.ready.path, "listing", e))?;
        Ok(idx.next_due())
    }
}

pub(super) struct DirWatch {
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatchGuard for DirWatch {}

impl Drop for DirWatch {
    fn drop(&mut self) {
        // Closing the write end makes the watcher's poll return.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(super) fn watch_loop(fd: Option<OwnedFd>, stop: OwnedFd, index: Arc<Mutex<Option<Index>>>, wake: Wake) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let (ready, stopped) = {
            let stop_fd = PollFd::new(stop.as_fd(), PollFlags::POLLIN);
            match &fd {
                Some(fd) => {
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN), stop_fd];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Ok(_) => {}
                        Err(Errno::EINTR) => continue,
                        Err(e) => {
                            tracing::error!("waiting for queue events failed: {e}");
                            std::thread::sleep(index::FALLBACK_RESCAN);
                        }
                    }
                    (
                        fds[0].revents().is_some_and(|r| !r.is_empty()),
                        fds[1].revents().is_some_and(|r| !r.is_empty()),
                    )
                }
                None => {
                    let mut fds = [stop_fd];
                    let timeout =
                        PollTimeout::try_from(index::FALLBACK_RESCAN.as_millis() as i32).unwrap_or(PollTimeout::MAX);
                    match poll(&mut fds, timeout) {
                        Ok(0) => (true, false),
                        Ok(_) => (false, true),
                        Err(_) => (true, false),
                    }
                }
            }
        };
        if stopped {
            return;
        }
        if ready {
            let drained = match (&fd, lock(&index).as_mut()) {
                (_, None) => return,
                (Some(_), Some(idx)) => idx.drain(),
                (None, Some(_)) => index::Drained {
                    work: true,
                    runner_exited: true,
                },
            };
            if drained.work || drained.runner_exited {
                wake(Wakeup {
                    work: drained.work,
                    runner_exited: drained.runner_exited,
                });
            }
        }
    }
}
