//! Looking without changing: listings, counts, the completion check, one job's detail.

use super::*;

impl DirStore {
    /// Finds the job `id` in ready/, running/ or dead/: its state folder and file name.
    pub(super) fn find(&self, id: &str) -> Result<Option<(State, OsString)>> {
        for (dir, state) in [
            (&self.d.ready, State::Ready),
            (&self.d.running, State::Running),
            (&self.d.dead, State::Dead),
        ] {
            for (name, _) in self.list_dir(dir)? {
                let matches = if state == State::Running {
                    RunningName::parse(name.as_bytes()).is_some_and(|n| n.id.as_str() == id)
                } else {
                    QueuedName::parse(name.as_bytes()).is_some_and(|n| n.id.as_str() == id)
                };
                if matches {
                    return Ok(Some((state, name)));
                }
            }
        }
        Ok(None)
    }

    pub(super) fn info_from_name(&self, state: State, name: &OsStr, now: Millis) -> Option<JobInfo> {
        match state {
            State::Running => RunningName::parse(name.as_bytes()).map(|n| JobInfo {
                id: n.id.to_string(),
                state,
                attempts: n.attempts,
                priority: n.priority,
                since: n.claimed,
                expires: Some(n.expires(self.mtime_ms(&self.d.running, name).unwrap_or(0))),
                lease_ms: Some(n.lease_ms),
                runner: Some(n.runner),
                reason: None,
                job: None,
            }),
            State::Quarantined => Some(parse_quarantine_name(name)),
            _ => QueuedName::parse(name.as_bytes()).map(|n| JobInfo {
                id: n.id.to_string(),
                state: if state == State::Ready && n.at > now {
                    State::Scheduled
                } else {
                    state
                },
                attempts: n.attempts,
                priority: n.priority,
                since: n.at,
                expires: None,
                lease_ms: None,
                runner: None,
                reason: None,
                job: None,
            }),
        }
    }

    /// A file's mtime in milliseconds (the last heartbeat of a running job).
    pub(super) fn mtime_ms(&self, dir: &Dir, name: &OsStr) -> Option<Millis> {
        let st = nix::sys::stat::fstatat(dir.fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        Some((st.st_mtime.max(0) as u64) * 1000 + (st.st_mtime_nsec.max(0) as u64) / 1_000_000)
    }

    pub(super) fn list_jobs(&self, states: &[State], bodies: bool) -> Result<Vec<JobInfo>> {
        let now = now_ms();
        let mut out = Vec::new();
        let mut folders: Vec<State> = Vec::new();
        for s in states {
            let folder = if *s == State::Scheduled { State::Ready } else { *s };
            if !folders.contains(&folder) {
                folders.push(folder);
            }
        }
        for folder in folders {
            let dir = self.dir_of(folder);
            let mut names = self.list_dir(dir)?;
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, _) in names {
                let Some(mut info) = self.info_from_name(folder, &name, now) else {
                    continue;
                };
                if !states.contains(&info.state) {
                    continue;
                }
                if bodies && info.state != State::Quarantined {
                    let id = JobId::new(info.id.clone()).ok();
                    info.job = self.read_body(dir, &name, id.as_ref()).ok();
                }
                out.push(info);
            }
        }
        Ok(out)
    }

    pub(super) fn count(&self) -> Result<Stats> {
        let now = now_ms();
        let mut s = Stats::default();
        self.each_entry(&self.d.ready, |name, _| {
            if let Some(n) = QueuedName::parse(name.as_bytes()) {
                if n.at > now {
                    s.scheduled += 1;
                } else {
                    s.ready += 1;
                    s.oldest_ready = Some(s.oldest_ready.map_or(n.at, |o: Millis| o.min(n.at)));
                }
            }
        })?;
        self.each_entry(&self.d.running, |name, _| {
            s.running += u64::from(RunningName::parse(name.as_bytes()).is_some());
        })?;
        self.each_entry(&self.d.dead, |name, _| {
            s.dead += u64::from(QueuedName::parse(name.as_bytes()).is_some());
        })?;
        self.each_entry(&self.d.quarantine, |_, _| s.quarantined += 1)?;
        Ok(s)
    }

    /// Locks `running/` exclusively: no claim and no move back to `ready/` (which hold it
    /// shared) happens until the lock is dropped, so a job is seen in exactly one folder.
    pub(super) fn lock_running_exclusive(&self) -> Result<Flock<OwnedFd>> {
        let fd = self
            .d
            .running
            .reopen()
            .map_err(|e| Error::io(&self.d.running.path, "opening", e))?;
        let deadline = std::time::Instant::now() + IDLE_LOCK_WAIT;
        let mut fd = fd;
        loop {
            match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(l),
                Err((back, Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                    fd = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((_, e)) => return Err(Error::io(&self.d.running.path, "locking for a consistent look", e)),
            }
        }
    }

    pub(super) fn observe_idle(&self) -> Result<Idle> {
        let _held = self.lock_running_exclusive()?;
        let now = now_ms();
        let mut idle = Idle::default();
        self.each_entry(&self.d.ready, |name, _| {
            if let Some(n) = QueuedName::parse(name.as_bytes()) {
                if n.at > now {
                    idle.scheduled += 1;
                } else {
                    idle.ready += 1;
                }
            }
        })?;
        for (name, _) in self.list_dir(&self.d.running)? {
            if RunningName::parse(name.as_bytes()).is_some() {
                idle.running += 1;
            }
        }
        Ok(idle)
    }

    pub(super) fn detail(&self, id: &str) -> Result<Detail> {
        if let Some((state, name)) = self.find(id)? {
            let dir = self.dir_of(state);
            let info = self.info_from_name(state, &name, now_ms()).expect("found by parsing");
            let jid = JobId::new(id)?;
            let job = match self.read_body(dir, &name, Some(&jid)) {
                Ok(job) => Some(job),
                Err(Problem::Gone) => return self.get(id),
                Err(p) => {
                    return Err(Error::Invalid(format!(
                        "{}: {}; it will be quarantined when a runner claims it",
                        self.path(dir, &name).display(),
                        p.detail()
                    )));
                }
            };
            return Ok(Detail {
                info,
                job,
                history: self.read_history(&jid),
            });
        }
        let qname = OsStr::new(id);
        if !id.contains('/') && id != "." && id != ".." && !id.is_empty() {
            if let Ok(file) = self.fs.open_read(&self.d.quarantine, qname) {
                drop(file);
                return Ok(Detail {
                    info: parse_quarantine_name(qname),
                    job: self.read_body(&self.d.quarantine, qname, None).ok(),
                    history: Vec::new(),
                });
            }
            if fs::lstat_kind(&self.d.quarantine, qname) != Kind::Vanished {
                return Ok(Detail {
                    info: parse_quarantine_name(qname),
                    job: None,
                    history: Vec::new(),
                });
            }
        }
        Err(Error::NotFound {
            id: id.to_string(),
            queue: self.target.clone(),
        })
    }
}

/// Parses a quarantine entry name `TIME.REASON.FOLDER.ORIGINAL`.
pub(super) fn parse_quarantine_name(name: &OsStr) -> JobInfo {
    let text = name.to_string_lossy();
    let mut parts = text.splitn(4, '.');
    let since = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
    let reason = parts.next().map(str::to_string);
    let from = parts.next().unwrap_or("");
    JobInfo {
        id: text.to_string(),
        state: State::Quarantined,
        attempts: 0,
        priority: 0,
        since,
        expires: None,
        lease_ms: None,
        runner: None,
        reason: reason.map(|r| format!("{r} (from {from}/)")),
        job: None,
    }
}
