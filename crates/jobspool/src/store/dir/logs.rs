//! Per-job files in `logs/`: `ID.log` (handler output) and `ID.events` (history, JSON lines).

use super::*;

impl DirStore {
    pub(super) fn events_name(id: &JobId) -> OsString {
        OsString::from(format!("{id}.events"))
    }

    pub(super) fn log_name(id: &JobId) -> OsString {
        OsString::from(format!("{id}.log"))
    }

    pub(super) fn read_history(&self, id: &JobId) -> Vec<Event> {
        let mut text = String::new();
        if let Ok(mut f) = self.fs.open_read(&self.d.logs, &Self::events_name(id)) {
            let _ = f.read_to_string(&mut text);
        }
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    pub(super) fn record_synced(&self, id: &JobId, event: &Event, sync: bool) -> Result<()> {
        let name = Self::events_name(id);
        let mut line = serde_json::to_vec(event).expect("events serialize");
        line.push(b'\n');
        // A job's history begins with its first start.
        let fresh = event.kind == EventKind::Started && event.attempt == 1;
        let (file, _) = self
            .fs
            .open_append(&self.d.logs, &name, self.config.mode, fresh)
            .map_err(|e| Error::io(self.path(&self.d.logs, &name), "opening the history", e))?;
        self.fs
            .write(&file, &self.d.logs, &name, &line)
            .map_err(|e| Error::io(self.path(&self.d.logs, &name), "writing the history", e))?;
        if sync {
            self.fs
                .fsync(&file, &self.d.logs, &name)
                .map_err(|e| Error::io(self.path(&self.d.logs, &name), "syncing the history", e))?;
        }
        Ok(())
    }

    pub(super) fn append_event(&self, id: &JobId, event: &Event) -> Result<()> {
        self.record_synced(id, event, false)
    }

    /// Opens a job's log, `fresh` when it is likely new (a first attempt); says whether it was
    /// created, and so is empty.
    pub(super) fn open_job_log(&self, id: &JobId, fresh: bool) -> Result<(DirLog, bool)> {
        let name = Self::log_name(id);
        let path = self.path(&self.d.logs, &name);
        let (file, created) = self
            .fs
            .open_append(&self.d.logs, &name, self.config.mode, fresh)
            .map_err(|e| Error::io(&path, "opening the log", e))?;
        Ok((DirLog { file, path }, created))
    }

    pub(super) fn read_job_log(&self, id: &JobId, from: u64) -> Result<Option<Vec<u8>>> {
        let name = Self::log_name(id);
        let mut file = match self.fs.open_read(&self.d.logs, &name) {
            Ok(f) => f,
            Err(e) if errno(&e) == Some(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(Error::io(self.path(&self.d.logs, &name), "opening the log", e)),
        };
        let mut buf = Vec::new();
        file.seek(io::SeekFrom::Start(from))
            .and_then(|_| file.read_to_end(&mut buf))
            .map_err(|e| Error::io(self.path(&self.d.logs, &name), "reading the log", e))?;
        Ok(Some(buf))
    }
}

pub(super) struct DirLog {
    file: File,
    path: PathBuf,
}

impl JobLog for DirLog {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, "writing the log", e))
    }

    fn size(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&self.path, "inspecting the log", e))
    }

    fn child_output(&self) -> Result<Option<File>> {
        self.file
            .try_clone()
            .map(Some)
            .map_err(|e| Error::io(&self.path, "duplicating the log descriptor", e))
    }
}
