//! Claims and everything done under a lease: claim, heartbeat, ack, retry, bury, release, and
//! taking back the claims of dead or stuck claimers.

use super::*;

impl DirStore {
    /// Holds `running/` locked shared for the duration of a claim or a move back to `ready/`,
    /// so that a completion check (which locks it exclusively) never sees a job in neither.
    pub(super) fn tx_shared(&self) -> Result<TxGuard<'_>> {
        Ok(self.tx_shared_if(true)?.expect("a waiting lock is taken or fails"))
    }

    /// [`DirStore::tx_shared`], or `None` at once when it would wait (`wait` false) because a
    /// completion check holds the lock.
    fn tx_shared_if(&self, wait: bool) -> Result<Option<TxGuard<'_>>> {
        let fd = match lock(&self.lock_pool).pop() {
            Some(fd) => fd,
            None => self
                .d
                .running
                .reopen()
                .map_err(|e| Error::io(&self.d.running.path, "opening", e))?,
        };
        let how = if wait {
            FlockArg::LockShared
        } else {
            FlockArg::LockSharedNonblock
        };
        match Flock::lock(fd, how) {
            Ok(f) => Ok(Some(TxGuard {
                store: self,
                lock: Some(f),
            })),
            Err((fd, Errno::EWOULDBLOCK)) if !wait => {
                lock(&self.lock_pool).push(fd);
                Ok(None)
            }
            Err((_, e)) => Err(Error::io(&self.d.running.path, "locking", e)),
        }
    }

    pub(super) fn lease_name(&self, lease: &Lease) -> Result<RunningName> {
        RunningName::parse(lease.token.as_bytes())
            .filter(|n| n.id == lease.id)
            .ok_or_else(|| Error::Invalid(format!("{:?} is not a lease token of job {}", lease.token, lease.id)))
    }

    /// Looks at the claim's name in `running/` now (not following a symlink).
    fn stat_claim(&self, lease: &Lease) -> nix::Result<nix::sys::stat::FileStat> {
        nix::sys::stat::fstatat(
            self.d.running.fd(),
            lease.token.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    }

    /// Maps a failed operation on `running/TOKEN` to lease loss when the name is gone.
    pub(super) fn lease_error(&self, lease: &Lease, what: &'static str, e: io::Error) -> Error {
        if errno(&e) == Some(Errno::ENOENT) {
            let still_there = self.stat_claim(lease).is_ok();
            if !still_there {
                return Error::LeaseLost {
                    id: lease.id.to_string(),
                };
            }
        }
        Error::io(self.path(&self.d.running, &lease.token), what, e)
    }

    /// Renames the claim `lease` to `to` in `dir`.
    pub(super) fn move_lease(&self, lease: &Lease, dir: &Dir, to: &str, what: &'static str) -> Result<()> {
        let moved = {
            let _tx = if std::ptr::eq(dir, &self.d.ready) {
                Some(self.tx_shared()?)
            } else {
                None
            };
            self.fs
                .rename(&self.d.running, OsStr::new(&lease.token), dir, OsStr::new(to), true)
        };
        moved.or_else(|e| self.settle(lease, what, e, Some((dir, to))))
    }

    /// What a transition whose call failed with `e` did: `Ok` when it took effect all the same.
    ///
    /// A call can fail after it made its change (the error comes back on the way out, as from a
    /// network file system), and a repeat would then find the claim's name gone and take the
    /// holder's own ack for a stolen lease. So, unless the error is ENOENT (the name was gone
    /// before the call), a name now gone is looked into: the job where this transition puts it
    /// (at `to` under a lease not yet expired, or, for an ack, in no folder at all) means the call
    /// applied; the job in the queue elsewhere means the lease was taken meanwhile, and is lost.
    /// A job moved to `ready/` and claimed again before this look, or whose lease has expired by
    /// now, is not recognised: the error stands, as before.
    fn settle(&self, lease: &Lease, what: &'static str, e: io::Error, to: Option<(&Dir, &str)>) -> Result<()> {
        if errno(&e) != Some(Errno::ENOENT) && matches!(self.stat_claim(lease), Err(Errno::ENOENT)) {
            match to {
                Some((dir, name)) => {
                    // A reclaimer can make the very same name (a retry due now, a bury, in the
                    // same millisecond as its reclaim), but only of an expired lease: the name
                    // there under a lease still valid by its mtime (the last heartbeat, which a
                    // rename keeps) can only be this call's.
                    let unexpired = self
                        .lease_name(lease)
                        .ok()
                        .zip(self.mtime_ms(dir, OsStr::new(name)))
                        .is_some_and(|(r, mtime)| now_ms() < r.expires(mtime));
                    if unexpired {
                        return Ok(());
                    }
                }
                None => {
                    // Under the exclusive lock a job moving between folders cannot be missed.
                    let found = self
                        .lock_running_exclusive()
                        .and_then(|_held| self.find(lease.id.as_str()));
                    match found {
                        Ok(None) => return Ok(()),
                        Ok(Some(_)) => {
                            return Err(Error::LeaseLost {
                                id: lease.id.to_string(),
                            });
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        Err(self.lease_error(lease, what, e))
    }

    /// Claims the next due job. Unless `wait`, gives up with [`Claimed::WouldWait`] before
    /// anything moves rather than wait for what may take long: the index in use by another
    /// claim, a listing of `ready/` (the first, or after the watcher lost events), or the lock
    /// a completion check holds.
    pub(super) fn claim_next(&self, lease: Duration, wait: bool) -> Result<Claimed> {
        // Refused before anything moves: a lease too long for the name would write a running
        // name nobody can parse, and the job would be quarantined.
        let lease_ms = crate::job::lease_ms(lease)?;
        let runner = self.my_id()?;
        loop {
            let (foreign, entry) = {
                let mut guard = if wait {
                    lock(&self.index)
                } else {
                    match self.index.try_lock() {
                        Ok(g) => g,
                        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                        Err(std::sync::TryLockError::WouldBlock) => return Ok(Claimed::WouldWait),
                    }
                };
                let idx = guard.get_or_insert_with(|| Index::new(&self.root));
                idx.drain();
                if !wait && idx.is_stale() {
                    return Ok(Claimed::WouldWait);
                }
                idx.refresh(&*self.fs, &self.d.ready)
                    .map_err(|e| Error::io(&self.d.ready.path, "listing", e))?;
                (idx.take_foreign(&self.d.ready), idx.pop(now_ms()))
            };
            for (name, kind) in foreign {
                let problem = if kind == Kind::File {
                    Problem::Other("bad-name", "the name is not a job name".into())
                } else {
                    Problem::Kind(kind)
                };
                self.quarantine(&self.d.ready, &name, &problem);
            }
            let Some(entry) = entry else { return Ok(Claimed::Empty) };
            let q = entry.name();
            let from = q.format();
            let r = RunningName {
                priority: q.priority,
                run_at: q.at,
                attempts: q.attempts,
                runner: runner.clone(),
                claimed: now_ms(),
                lease_ms,
                nonce: random_hex(8),
                id: q.id.clone(),
            };
            let token = r.format();
            let renamed = {
                let Some(_tx) = self.tx_shared_if(wait)? else {
                    if let Some(idx) = lock(&self.index).as_mut() {
                        idx.put_back(entry);
                    }
                    return Ok(Claimed::WouldWait);
                };
                self.fs.rename(
                    &self.d.ready,
                    OsStr::new(&from),
                    &self.d.running,
                    OsStr::new(&token),
                    false,
                )
            };
            match renamed {
                Ok(()) => {}
                // Another claimer won this one: take the next.
                Err(e) if errno(&e) == Some(Errno::ENOENT) => continue,
                Err(e) => {
                    if let Some(idx) = lock(&self.index).as_mut() {
                        idx.put_back(entry);
                    }
                    return Err(Error::io(self.path(&self.d.ready, &from), "claiming", e));
                }
            }
            match self.read_body(&self.d.running, OsStr::new(&token), Some(&q.id)) {
                Ok(job) => {
                    return Ok(Claimed::Job(Claim {
                        job,
                        lease: Lease {
                            id: q.id,
                            attempt: q.attempts.saturating_add(1),
                            token,
                        },
                    }));
                }
                // A transient read error says nothing about the job: give the claim back
                // (else it stays claimed by this runner and is reclaimed when it goes away).
                Err(Problem::Io(e)) => {
                    let back = {
                        let _tx = self.tx_shared()?;
                        self.fs.rename(
                            &self.d.running,
                            OsStr::new(&token),
                            &self.d.ready,
                            OsStr::new(&from),
                            true,
                        )
                    };
                    if back.is_ok() {
                        if let Some(idx) = lock(&self.index).as_mut() {
                            idx.put_back(entry);
                        }
                    }
                    return Err(Error::io(
                        self.path(&self.d.running, &token),
                        "reading the claimed job",
                        e,
                    ));
                }
                Err(problem) => self.quarantine(&self.d.running, OsStr::new(&token), &problem),
            }
        }
    }

    pub(super) fn heartbeat_lease(&self, lease: &Lease) -> Result<()> {
        self.lease_name(lease)?;
        self.fs
            .touch(&self.d.running, OsStr::new(&lease.token))
            .map_err(|e| self.lease_error(lease, "heartbeat", e))
    }

    pub(super) fn ack_lease(&self, lease: &Lease) -> Result<()> {
        self.lease_name(lease)?;
        self.fs
            .unlink(&self.d.running, OsStr::new(&lease.token), false)
            .or_else(|e| self.settle(lease, "acknowledging", e, None))
    }

    pub(super) fn retry_lease(&self, lease: &Lease, delay: Duration) -> Result<()> {
        let r = self.lease_name(lease)?;
        let to = QueuedName {
            priority: r.priority,
            // Never later than a name can hold, whatever the backoff.
            at: now_ms()
                .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                .min(crate::job::MAX_RUN_AT),
            attempts: r.attempts.saturating_add(1),
            id: r.id,
        }
        .format();
        self.move_lease(lease, &self.d.ready, &to, "retrying")
    }

    pub(super) fn bury_lease(&self, lease: &Lease, reason: &str) -> Result<()> {
        let r = self.lease_name(lease)?;
        let attempts = r.attempts.saturating_add(1);
        let to = QueuedName {
            priority: r.priority,
            at: now_ms(),
            attempts,
            id: r.id.clone(),
        }
        .format();
        self.move_lease(lease, &self.d.dead, &to, "burying")?;
        let mut event = Event::now(EventKind::Dead, attempts, Some(reason.to_string()));
        event.runner = Some(r.runner);
        // A dead job is rare and its reason is what the operator needs: make both durable.
        self.record_synced(&r.id, &event, true)?;
        self.fs
            .sync_dir(&self.d.dead)
            .map_err(|e| Error::io(&self.d.dead.path, "syncing", e))
    }

    pub(super) fn release_lease(&self, lease: &Lease) -> Result<()> {
        let r = self.lease_name(lease)?;
        let to = QueuedName {
            priority: r.priority,
            at: r.run_at,
            attempts: r.attempts,
            id: r.id,
        }
        .format();
        self.move_lease(lease, &self.d.ready, &to, "releasing")
    }

    pub(super) fn reclaim_expired(&self, max_attempts: u32) -> Result<Vec<Reclaimed>> {
        let mine = self.my_id()?;
        let mut alive: HashMap<String, bool> = HashMap::new();
        let mut out = Vec::new();
        for (name, kind) in self.list_dir(&self.d.running)? {
            if kind != Kind::File {
                self.quarantine(&self.d.running, &name, &Problem::Kind(kind));
                continue;
            }
            let Some(r) = RunningName::parse(name.as_bytes()) else {
                self.quarantine(
                    &self.d.running,
                    &name,
                    &Problem::Other("bad-name", "the name is not a lease name".into()),
                );
                continue;
            };
            let is_alive = *alive
                .entry(r.runner.clone())
                .or_insert_with(|| self.runner_alive(&r.runner, &mine));
            let cause = if !is_alive {
                ReclaimCause::RunnerDied
            } else {
                let Some(mtime) = self.mtime_ms(&self.d.running, &name) else {
                    continue;
                };
                if now_ms() < r.expires(mtime) {
                    continue;
                }
                ReclaimCause::LeaseExpired
            };
            let job = match self.read_body(&self.d.running, &name, Some(&r.id)) {
                Ok(job) => job,
                // Not readable now (EIO, EMFILE…): left for a later pass, never quarantined.
                Err(Problem::Io(_)) => continue,
                Err(problem) => {
                    self.quarantine(&self.d.running, &name, &problem);
                    continue;
                }
            };
            let attempts = r.attempts.saturating_add(1);
            let limit = job.max_attempts.unwrap_or(max_attempts).max(1);
            let buried = attempts >= limit;
            let lease = Lease {
                id: r.id.clone(),
                attempt: attempts,
                token: name.to_string_lossy().into_owned(),
            };
            let what = match cause {
                ReclaimCause::RunnerDied => "its runner died",
                ReclaimCause::LeaseExpired => "its lease expired",
            };
            let moved = if buried {
                let to = QueuedName {
                    priority: r.priority,
                    at: now_ms(),
                    attempts,
                    id: r.id.clone(),
                }
                .format();
                self.move_lease(&lease, &self.d.dead, &to, "reclaiming")
            } else {
                let to = QueuedName {
                    priority: r.priority,
                    at: now_ms(),
                    attempts,
                    id: r.id.clone(),
                }
                .format();
                self.move_lease(&lease, &self.d.ready, &to, "reclaiming")
            };
            match moved {
                Ok(()) => {}
                Err(Error::LeaseLost { .. }) => continue,
                Err(e) => return Err(e),
            }
            let mut event = Event::now(
                EventKind::Reclaimed,
                attempts,
                Some(format!("attempt {attempts}: {what}")),
            );
            event.runner = Some(r.runner.clone());
            let _ = self.record_synced(&r.id, &event, false);
            if buried {
                let reason = format!("{what} on attempt {attempts} of {limit}; no attempts left");
                let _ = self.record_synced(&r.id, &Event::now(EventKind::Dead, attempts, Some(reason)), true);
            }
            tracing::warn!(job = %r.id, attempt = attempts, buried, "reclaimed: {what}");
            out.push(Reclaimed {
                id: r.id,
                old_token: lease.token,
                cause,
                attempts,
                buried,
            });
        }
        // Entries of dead claimers are removed once their claims are taken back.
        for (id, is_alive) in alive {
            if !is_alive {
                let _ = self.fs.unlink(&self.d.runners, OsStr::new(&id), false);
            }
        }
        Ok(out)
    }
}

/// What [`DirStore::claim_next`] found.
pub(super) enum Claimed {
    Job(Claim),
    /// Nothing is due.
    Empty,
    /// It would have had to wait, and was asked not to; nothing moved.
    WouldWait,
}

pub(super) struct TxGuard<'a> {
    store: &'a DirStore,
    lock: Option<Flock<OwnedFd>>,
}

impl Drop for TxGuard<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.lock.take() {
            if let Ok(fd) = f.unlock() {
                lock(&self.store.lock_pool).push(fd);
            }
        }
    }
}
