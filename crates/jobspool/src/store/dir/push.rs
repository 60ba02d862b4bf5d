//! Durable pushes, one at a time or in batches.

use super::*;

impl DirStore {
    /// Pushes that have been written to `tmp/` and must be removed if the push fails.
    pub(super) fn cleanup(&self, tmp: &[OsString], ready: &[String], markers: &[JobId]) {
        for name in tmp {
            let _ = self.fs.unlink(&self.d.tmp, name, false);
        }
        for name in ready {
            let _ = self.fs.unlink(&self.d.ready, OsStr::new(name), false);
        }
        for id in markers {
            let _ = self.fs.unlink(&self.d.logs, &Self::events_name(id), false);
        }
    }

    /// Writes one job into `tmp/`; returns the temp name and the name it will have in `ready/`.
    pub(super) fn write_tmp(&self, job: &NewJob, markers: &mut Vec<JobId>) -> Result<(JobId, OsString, String, File)> {
        job.validate()?;
        let id = match &job.id {
            Some(id) => {
                // The history file doubles as the id's reservation: it is created exclusively
                // and lives as long as the job or its log.
                let marker = Self::events_name(id);
                match self.fs.create(&self.d.logs, &marker, self.config.mode) {
                    Ok(_) => markers.push(id.clone()),
                    Err(e) if errno(&e) == Some(Errno::EEXIST) => {
                        // Not in any folder: only a finished job's log and history hold the id.
                        if self.find(id.as_str())?.is_none() {
                            return Err(Error::Finished {
                                id: id.to_string(),
                                queue: self.target.clone(),
                                retention: crate::config::format_duration(self.config.log_retention),
                            });
                        }
                        return Err(Error::JobExists {
                            id: id.to_string(),
                            queue: self.target.clone(),
                        });
                    }
                    Err(e) => return Err(Error::io(self.path(&self.d.logs, &marker), "reserving the job id", e)),
                }
                id.clone()
            }
            None => JobId::generate(),
        };
        let created = now_ms();
        let stored = Job::from_new(job, id.clone(), created);
        let bytes = body::encode(&stored);
        let tmp = OsString::from(format!("{id}.{}.{}", std::process::id(), random_hex(8)));
        let file = self
            .fs
            .create(&self.d.tmp, &tmp, self.config.mode)
            .map_err(|e| Error::io(self.path(&self.d.tmp, &tmp), "creating the job file", e))?;
        if let Err(e) = self.fs.write(&file, &self.d.tmp, &tmp, &bytes) {
            let _ = self.fs.unlink(&self.d.tmp, &tmp, false);
            return Err(Error::io(self.path(&self.d.tmp, &tmp), "writing the job file", e));
        }
        let ready = QueuedName {
            priority: stored.priority,
            at: stored.run_at,
            attempts: 0,
            id: id.clone(),
        }
        .format();
        Ok((id, tmp, ready, file))
    }

    pub(super) fn publish(&self, tmp: &OsStr, ready: &str) -> Result<()> {
        self.fs
            .rename(&self.d.tmp, tmp, &self.d.ready, OsStr::new(ready), true)
            .map_err(|e| {
                if errno(&e) == Some(Errno::EEXIST) {
                    let id = QueuedName::parse(ready.as_bytes())
                        .map(|n| n.id.to_string())
                        .unwrap_or_default();
                    Error::JobExists {
                        id,
                        queue: self.target.clone(),
                    }
                } else {
                    Error::io(self.path(&self.d.ready, ready), "moving the job into ready/", e)
                }
            })
    }

    /// After `ready/` could not be synced, takes the pushed job back out. If a runner already
    /// claimed it, the outcome is unknown and the error says so.
    pub(super) fn unpublish(&self, ready: &str, markers: &[JobId], e: io::Error) -> Error {
        match self.fs.unlink(&self.d.ready, OsStr::new(ready), false) {
            Ok(()) => {
                self.cleanup(&[], &[], markers);
                Error::io(&self.d.ready.path, "syncing the directory (the job was not added)", e)
            }
            Err(_) => Error::io(
                &self.d.ready.path,
                "syncing the directory (the job was already claimed and may run: its push is not known to be durable)",
                e,
            ),
        }
    }

    pub(super) fn push_one(&self, job: &NewJob) -> Result<JobId> {
        let mut markers = Vec::new();
        let (id, tmp, ready, file) = match self.write_tmp(job, &mut markers) {
            Ok(w) => w,
            Err(e) => {
                self.cleanup(&[], &[], &markers);
                return Err(e);
            }
        };
        if let Err(e) = self.fs.fsync(&file, &self.d.tmp, &tmp) {
            // Never retried: after a failed fsync the page cache may claim data the disk lost.
            self.cleanup(std::slice::from_ref(&tmp), &[], &markers);
            return Err(Error::io(self.path(&self.d.tmp, &tmp), "syncing the job file", e));
        }
        drop(file);
        if let Err(e) = self.publish(&tmp, &ready) {
            self.cleanup(&[tmp], &[], &markers);
            return Err(e);
        }
        if let Err(e) = self.fs.sync_dir(&self.d.ready) {
            return Err(self.unpublish(&ready, &markers, e));
        }
        Ok(id)
    }

    pub(super) fn push_many(&self, jobs: &[NewJob]) -> Result<Vec<JobId>> {
        let mut seen = HashSet::new();
        for job in jobs {
            job.validate()?;
            if let Some(id) = &job.id {
                if !seen.insert(id) {
                    return Err(Error::Invalid(format!("job id {id} appears twice in the batch")));
                }
            }
        }
        let mut markers = Vec::new();
        let mut written: Vec<(JobId, OsString, String)> = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.write_tmp(job, &mut markers) {
                Ok((id, tmp, ready, _file)) => written.push((id, tmp, ready)),
                Err(e) => {
                    let tmps: Vec<_> = written.into_iter().map(|w| w.1).collect();
                    self.cleanup(&tmps, &[], &markers);
                    return Err(e);
                }
            }
        }
        // One flush makes every body durable before any of them becomes visible.
        if let Err(e) = self.fs.syncfs(&self.d.tmp) {
            let tmps: Vec<_> = written.into_iter().map(|w| w.1).collect();
            self.cleanup(&tmps, &[], &markers);
            return Err(Error::io(&self.d.tmp.path, "syncing the batch", e));
        }
        let mut published: Vec<String> = Vec::with_capacity(written.len());
        for (i, (_, tmp, ready)) in written.iter().enumerate() {
            if let Err(e) = self.publish(tmp, ready) {
                let rest: Vec<_> = written[i..].iter().map(|w| w.1.clone()).collect();
                self.cleanup(&rest, &published, &markers);
                return Err(e);
            }
            published.push(ready.clone());
        }
        if let Err(e) = self.fs.sync_dir(&self.d.ready) {
            let mut first = None;
            for name in &published {
                let err = self.unpublish(name, &[], io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(5)));
                first.get_or_insert(err);
            }
            self.cleanup(&[], &[], &markers);
            return Err(first.unwrap_or_else(|| Error::io(&self.d.ready.path, "syncing", e)));
        }
        Ok(written.into_iter().map(|w| w.0).collect())
    }
}
