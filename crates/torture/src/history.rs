//! The operation history: one JSON object per line, appended to a file that the scenario (the
//! parent, never faulted) owns.
//!
//! Faulted processes write to it through a descriptor they inherit as standard output, with
//! `writev` — a system call the fault injector is never told to touch — and one call per line, so
//! that lines from concurrent processes never interleave (`O_APPEND` on a regular file). Only a
//! writer killed in the middle of a line can leave a fragment (see [`read`]).
//! The order of the lines is the order of the operations: an operation's `invoke` line is written
//! before it starts and its `ok`/`fail` line after it returned; an `invoke` with no completion from
//! a process that died is an operation of unknown outcome (Jepsen's `info`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a line says about its operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ty {
    /// The operation is about to start.
    Invoke,
    /// It returned success.
    Ok,
    /// It returned an error (it took no effect, by the contract).
    Fail,
    /// Something the scenario did or saw (a kill, a power cut, an exit).
    Info,
}

/// The operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum F {
    Push,
    Claim,
    Heartbeat,
    Ack,
    Retry,
    Bury,
    Release,
    Reclaim,
    /// The scenario killed process `p` (SIGKILL, or the injector's kill).
    Kill,
    /// The scenario stopped process `p` (SIGSTOP).
    Stop,
    /// The scenario continued process `p` (SIGCONT).
    Cont,
    /// Process `p` exited on its own, possibly still holding leases (`err` says why).
    Exit,
    /// Every process died at once and unsynced state may be gone.
    PowerCut,
}

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The process (a label chosen by the scenario, unique for the run).
    pub p: String,
    #[serde(rename = "type")]
    pub ty: Ty,
    pub f: F,
    /// The job concerned.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job: String,
    /// The lease token concerned.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease: String,
    /// For a reclaim: the tokens of the claims it took back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<String>,
    /// For a failure: the error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub err: String,
    /// Milliseconds since the epoch (informative only: the order of lines is what counts).
    #[serde(default)]
    pub t: u64,
}

impl Entry {
    pub fn new(p: &str, ty: Ty, f: F) -> Entry {
        Entry {
            p: p.to_string(),
            ty,
            f,
            job: String::new(),
            lease: String::new(),
            leases: Vec::new(),
            err: String::new(),
            t: jobspool::job::now_ms(),
        }
    }
    pub fn job(mut self, job: &str) -> Entry {
        self.job = job.to_string();
        self
    }
    pub fn lease(mut self, lease: &str) -> Entry {
        self.lease = lease.to_string();
        self
    }
    pub fn err(mut self, err: impl ToString) -> Entry {
        self.err = err.to_string();
        self
    }
}

/// Appends lines to a history with one `writev` each.
pub struct Recorder {
    fd: RawFd,
    _file: Option<File>,
    /// The process label put in every line.
    pub p: String,
}

impl Recorder {
    /// Appends to the file at `path` (created if missing).
    pub fn open(path: &Path, p: &str) -> io::Result<Recorder> {
        let file = OpenOptions::new().create(true).append(true).mode(0o644).open(path)?;
        Ok(Recorder {
            fd: file.as_raw_fd(),
            _file: Some(file),
            p: p.to_string(),
        })
    }

    /// Appends to an inherited descriptor (a faulted process's standard output).
    pub fn inherited(fd: RawFd, p: &str) -> Recorder {
        Recorder {
            fd,
            _file: None,
            p: p.to_string(),
        }
    }

    /// Writes one line. Never through `write(2)`, which fault injection may target.
    pub fn record(&self, e: &Entry) {
        let mut line = serde_json::to_vec(e).expect("entries serialize");
        line.push(b'\n');
        let iov = [io::IoSlice::new(&line)];
        // SAFETY: the descriptor is open for the life of the recorder (owned or inherited).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = nix::sys::uio::writev(fd, &iov);
    }

    /// Records a line of this recorder's process.
    pub fn log(&self, ty: Ty, f: F, job: &str, lease: &str) {
        self.record(&Entry::new(&self.p, ty, f).job(job).lease(lease));
    }
}

/// Reads a history file; lines that do not parse (torn by the death of their writer) are counted,
/// and a whole line glued to a torn fragment is recovered.
pub fn read(path: &Path) -> io::Result<(Vec<Entry>, usize)> {
    let text = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice(line) {
            Ok(e) => out.push(e),
            Err(_) => {
                // A writer killed in the middle of its line (a fatal signal can cut a write to
                // a regular file short at a page boundary) leaves a fragment that the next line
                // is glued to: that fragment is dropped (the killed writer's operation stays
                // unknown) and the glued line kept.
                bad += 1;
                let marker = b"{\"p\":\"";
                if let Some(at) = line.windows(marker.len()).rposition(|w| w == marker) {
                    if at > 0 {
                        if let Ok(e) = serde_json::from_slice(&line[at..]) {
                            out.push(e);
                        }
                    }
                }
            }
        }
    }
    Ok((out, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_glued_to_a_torn_fragment_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        let whole = serde_json::to_string(&Entry::new("b", Ty::Ok, F::Push).job("j2")).unwrap();
        let text = format!("{{\"p\":\"a\",\"type\":\"ok\",\"f\":\"cl{whole}\n{whole}\n");
        std::fs::write(&path, text).unwrap();
        let (h, torn) = read(&path).unwrap();
        assert_eq!(torn, 1);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].job, "j2");
    }
}
