//! This process's registration in `runners/`, and the liveness of others' (by their locks).

use super::*;

impl DirStore {
    pub(super) fn my_id(&self) -> Result<String> {
        if let Some(r) = lock(&self.me).as_ref() {
            return Ok(r.id.clone());
        }
        self.announce(&RunnerStatus::for_this_process(0))
    }

    /// Whether the claimer `id` is alive: its `runners/` entry exists and is locked.
    pub(super) fn runner_alive(&self, id: &str, mine: &str) -> bool {
        if id == mine {
            return true;
        }
        let file = match self.fs.open_read(&self.d.runners, OsStr::new(id)) {
            Ok(f) => f,
            Err(e) if errno(&e) == Some(Errno::ENOENT) => return false,
            // Cannot tell: assume alive, and let the lease decide.
            Err(_) => return true,
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_) => false,
            Err((_, Errno::EWOULDBLOCK)) => true,
            Err(_) => true,
        }
    }

    pub(super) fn publish_status(&self, status: &RunnerStatus) -> Result<String> {
        let mut me = lock(&self.me);
        let mut text = serde_json::to_vec(status).expect("status serializes");
        text.push(b'\n');
        if let Some(reg) = me.as_ref() {
            let path = self.path(&self.d.runners, &reg.id);
            // Pad with spaces over any longer previous content, in one write.
            let old_len = reg.file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
            if text.len() < old_len {
                text.resize(old_len, b' ');
            }
            reg.file
                .write_all_at(&text, 0)
                .map_err(|e| Error::io(&path, "updating the runner entry", e))?;
            return Ok(reg.id.clone());
        }
        // Created in tmp/, locked, then renamed into runners/: an entry is never visible unlocked.
        let id = random_hex(16);
        let tmp = OsString::from(format!("runner.{id}"));
        let tmp_path = self.path(&self.d.tmp, &tmp);
        let file = self
            .fs
            .create(&self.d.tmp, &tmp, self.config.mode)
            .map_err(|e| Error::io(&tmp_path, "creating the runner entry", e))?;
        drop(file);
        let file = nix::fcntl::openat(
            self.d.tmp.fd(),
            tmp.as_os_str(),
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NOFOLLOW,
            nix::sys::stat::Mode::empty(),
        )
        .map(File::from)
        .map_err(|e| Error::io(&tmp_path, "opening the runner entry", e));
        let result = file.and_then(|f| {
            let locked = Flock::lock(f, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| Error::io(&tmp_path, "locking the runner entry", e))?;
            locked
                .write_all_at(&text, 0)
                .map_err(|e| Error::io(&tmp_path, "writing the runner entry", e))?;
            self.fs
                .rename(&self.d.tmp, &tmp, &self.d.runners, OsStr::new(&id), true)
                .map_err(|e| Error::io(self.path(&self.d.runners, &id), "registering the runner", e))?;
            Ok(locked)
        });
        match result {
            Ok(file) => {
                *me = Some(Registration { id: id.clone(), file });
                Ok(id)
            }
            Err(e) => {
                let _ = self.fs.unlink(&self.d.tmp, &tmp, false);
                Err(e)
            }
        }
    }

    pub(super) fn unregister(&self) -> Result<()> {
        if let Some(reg) = lock(&self.me).take() {
            match self.fs.unlink(&self.d.runners, OsStr::new(&reg.id), false) {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(Errno::ENOENT) => {}
                Err(e) => {
                    return Err(Error::io(
                        self.path(&self.d.runners, &reg.id),
                        "removing the runner entry",
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    pub(super) fn list_runners(&self) -> Result<Vec<RunnerInfo>> {
        let mine = lock(&self.me).as_ref().map(|r| r.id.clone()).unwrap_or_default();
        let mut out = Vec::new();
        for (name, kind) in self.list_dir(&self.d.runners)? {
            if kind != Kind::File {
                continue;
            }
            let id = name.to_string_lossy().into_owned();
            let Ok(mut f) = self.fs.open_read(&self.d.runners, &name) else {
                continue;
            };
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let heartbeat = f
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .map(crate::job::to_ms)
                .unwrap_or(0);
            drop(f);
            out.push(RunnerInfo {
                alive: self.runner_alive(&id, &mine),
                status: serde_json::from_str(text.trim_end()).unwrap_or_default(),
                heartbeat,
                id,
            });
        }
        out.sort_by_key(|r| r.status.started);
        Ok(out)
    }
}

/// This process's entry in `runners/`, locked for as long as it exists.
pub(super) struct Registration {
    pub(super) id: String,
    pub(super) file: Flock<File>,
}
