//! Operator actions: reviving dead jobs, removing jobs, collecting leftovers, checking the layout.

use super::*;

impl DirStore {
    pub(super) fn revive_one(&self, id: &JobId) -> Result<()> {
        match self.find(id.as_str())? {
            Some((State::Dead, name)) => {
                let n = QueuedName::parse(name.as_bytes()).expect("found by parsing");
                let to = QueuedName {
                    priority: n.priority,
                    at: now_ms(),
                    attempts: 0,
                    id: n.id,
                }
                .format();
                match self
                    .fs
                    .rename(&self.d.dead, &name, &self.d.ready, OsStr::new(&to), true)
                {
                    Ok(()) => {}
                    // Revived by someone else at the same moment: it is no longer dead.
                    Err(e) if errno(&e) == Some(Errno::ENOENT) => {
                        return Err(Error::WrongState {
                            id: id.to_string(),
                            state: "not dead",
                            what: "revived by someone else",
                        });
                    }
                    Err(e) => return Err(Error::io(self.path(&self.d.dead, &name), "reviving", e)),
                }
                self.fs
                    .sync_dir(&self.d.ready)
                    .map_err(|e| Error::io(&self.d.ready.path, "syncing", e))?;
                let _ = self.record_synced(
                    id,
                    &Event::now(
                        EventKind::Revived,
                        n.attempts,
                        Some(format!("after {} attempts", n.attempts)),
                    ),
                    false,
                );
                Ok(())
            }
            Some((state, _)) => Err(Error::WrongState {
                id: id.to_string(),
                state: state.as_str(),
                what: "only dead jobs can be retried",
            }),
            None => Err(Error::NotFound {
                id: id.to_string(),
                queue: self.target.clone(),
            }),
        }
    }

    pub(super) fn revive_every(&self) -> Result<Vec<JobId>> {
        let mut out = Vec::new();
        for (name, _) in self.list_dir(&self.d.dead)? {
            if let Some(n) = QueuedName::parse(name.as_bytes()) {
                match self.revive(&n.id) {
                    Ok(()) => out.push(n.id),
                    Err(Error::WrongState { .. } | Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    pub(super) fn remove_one(&self, id: &str) -> Result<Option<State>> {
        if let Some((state, name)) = self.find(id)? {
            let dir = self.dir_of(state);
            match self.fs.unlink(dir, &name, false) {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(Errno::ENOENT) => return self.remove(id),
                Err(e) => return Err(Error::io(self.path(dir, &name), "removing", e)),
            }
            let jid = JobId::new(id)?;
            let _ = self.fs.unlink(&self.d.logs, &Self::log_name(&jid), false);
            let _ = self.fs.unlink(&self.d.logs, &Self::events_name(&jid), false);
            self.fs.sync_dir(dir).map_err(|e| Error::io(&dir.path, "syncing", e))?;
            let state = self.info_from_name(state, &name, now_ms()).map_or(state, |i| i.state);
            return Ok(Some(state));
        }
        let qname = OsStr::new(id);
        if !id.contains('/') && id != "." && id != ".." && !id.is_empty() {
            match fs::lstat_kind(&self.d.quarantine, qname) {
                Kind::Vanished => {}
                Kind::Directory => {
                    return Err(Error::Invalid(format!(
                        "{} is a directory; inspect it and remove it by hand",
                        self.path(&self.d.quarantine, qname).display()
                    )));
                }
                _ => {
                    self.fs
                        .unlink(&self.d.quarantine, qname, false)
                        .map_err(|e| Error::io(self.path(&self.d.quarantine, qname), "removing", e))?;
                    return Ok(Some(State::Quarantined));
                }
            }
        }
        // A finished job leaves its log and history behind (they keep its id reserved until
        // they are collected); removing them frees the id.
        if let Ok(jid) = JobId::new(id) {
            if self.keeps_leftovers(&jid) {
                // A job between two folders was missed by the first look; look again.
                if self.find(id)?.is_some() {
                    return self.remove(id);
                }
                for name in [Self::log_name(&jid), Self::events_name(&jid)] {
                    match self.fs.unlink(&self.d.logs, &name, false) {
                        Ok(()) => {}
                        Err(e) if errno(&e) == Some(Errno::ENOENT) => {}
                        Err(e) => return Err(Error::io(self.path(&self.d.logs, &name), "removing", e)),
                    }
                }
                self.fs
                    .sync_dir(&self.d.logs)
                    .map_err(|e| Error::io(&self.d.logs.path, "syncing", e))?;
                return Ok(None);
            }
        }
        Err(Error::NotFound {
            id: id.to_string(),
            queue: self.target.clone(),
        })
    }

    pub(super) fn collect(&self) -> Result<u64> {
        let mut removed = 0;
        let now = std::time::SystemTime::now();
        let age = |dir: &Dir, name: &OsStr| -> Option<Duration> {
            let st = nix::sys::stat::fstatat(dir.fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
            let mtime = crate::job::from_ms((st.st_mtime.max(0) as u64) * 1000);
            now.duration_since(mtime).ok()
        };
        for (name, kind) in self.list_dir(&self.d.tmp)? {
            if kind == Kind::File && age(&self.d.tmp, &name).is_some_and(|a| a > TMP_GRACE) {
                // A runner entry still being registered is locked; leave those alone.
                if name.as_bytes().starts_with(b"runner.") {
                    if let Ok(f) = self.fs.open_read(&self.d.tmp, &name) {
                        if Flock::lock(f, FlockArg::LockSharedNonblock).is_err() {
                            continue;
                        }
                    }
                }
                if self.fs.unlink(&self.d.tmp, &name, false).is_ok() {
                    tracing::info!(file = %self.path(&self.d.tmp, &name).display(), "removed the leftover of a crashed push");
                    removed += 1;
                }
            }
        }
        // Foreign entries in dead/ are never claimed, so nothing else would set them aside.
        for (name, kind) in self.list_dir(&self.d.dead)? {
            if kind != Kind::File {
                self.quarantine(&self.d.dead, &name, &Problem::Kind(kind));
            } else if QueuedName::parse(name.as_bytes()).is_none() {
                self.quarantine(
                    &self.d.dead,
                    &name,
                    &Problem::Other("bad-name", "the name is not a job name".into()),
                );
            }
        }
        // Entries of runners that died without retiring (their lock is free).
        let mine = lock(&self.me).as_ref().map(|r| r.id.clone()).unwrap_or_default();
        for (name, kind) in self.list_dir(&self.d.runners)? {
            let id = name.to_string_lossy().into_owned();
            if kind == Kind::File
                && !self.runner_alive(&id, &mine)
                && self.fs.unlink(&self.d.runners, &name, false).is_ok()
            {
                tracing::info!(runner = %id, "removed the entry of a runner that is gone");
                removed += 1;
            }
        }
        // Logs past their retention first (few, usually), then strike those whose job is still
        // queued, running or dead, streaming the state folders: a million queued jobs must not
        // become a million strings in memory.
        let mut expired: HashMap<String, Vec<OsString>> = HashMap::new();
        for (name, kind) in self.list_dir(&self.d.logs)? {
            let text = name.to_string_lossy();
            let Some(id) = text.strip_suffix(".log").or_else(|| text.strip_suffix(".events")) else {
                continue;
            };
            if kind == Kind::File && age(&self.d.logs, &name).is_some_and(|a| a > self.config.log_retention) {
                expired.entry(id.to_string()).or_default().push(name.clone());
            }
        }
        if expired.is_empty() {
            return Ok(removed);
        }
        for dir in [&self.d.ready, &self.d.dead] {
            self.each_entry(dir, |name, _| {
                if let Some(n) = QueuedName::parse(name.as_bytes()) {
                    expired.remove(n.id.as_str());
                }
            })?;
        }
        self.each_entry(&self.d.running, |name, _| {
            if let Some(n) = RunningName::parse(name.as_bytes()) {
                expired.remove(n.id.as_str());
            }
        })?;
        for name in expired.into_values().flatten() {
            if self.fs.unlink(&self.d.logs, &name, false).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub(super) fn check_layout(&self) -> Result<Vec<String>> {
        let mut problems = layout::doctor(&self.root, &self.config);
        for (name, kind) in self.list_dir(&self.d.ready)? {
            if kind != Kind::File || QueuedName::parse(name.as_bytes()).is_none() {
                problems.push(format!(
                    "{}: is not a job ({}); a runner will quarantine it",
                    self.path(&self.d.ready, &name).display(),
                    kind.word()
                ));
                continue;
            }
            if let Err(e) = self.fs.open_read(&self.d.ready, &name) {
                problems.push(format!(
                    "{}: cannot be read by this user ({e}); fix its mode or group, or the producer's (`jobspool init --mode`)",
                    self.path(&self.d.ready, &name).display()
                ));
            }
        }
        for r in self.runners()? {
            if !r.alive {
                problems.push(format!(
                    "runner {} (pid {} on {}) is gone but still registered; the next runner will reclaim its jobs",
                    r.id, r.status.pid, r.status.host
                ));
            }
        }
        Ok(problems)
    }

    /// Whether `logs/` still holds a log or history of `id`.
    pub(super) fn keeps_leftovers(&self, id: &JobId) -> bool {
        [Self::log_name(id), Self::events_name(id)]
            .iter()
            .any(|name| fs::lstat_kind(&self.d.logs, name) != Kind::Vanished)
    }

    /// The history of a job that is in no state folder but whose log or history is still kept.
    pub(super) fn finished_history(&self, id: &JobId) -> Result<Option<Vec<Event>>> {
        if self.find(id.as_str())?.is_some() || !self.keeps_leftovers(id) {
            return Ok(None);
        }
        Ok(Some(self.read_history(id)))
    }
}
