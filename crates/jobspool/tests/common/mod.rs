//! Shared test helpers: a file-system layer that records and faults calls.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::sync::Mutex;

use jobspool::store::dir::fs::{Dir, Fs, Kind, RealFs};

/// Records every call as `op folder/name`, and fails the `nth` call of `op` (1-based) with
/// `errno` — once, or from then on when `sticky`. With `after`, the faulted call is made first
/// and its error reported after it took effect (an answer lost on its way back).
#[derive(Default)]
pub struct FaultFs {
    pub log: Mutex<Vec<String>>,
    pub fault: Mutex<Option<Fault>>,
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub op: &'static str,
    pub nth: usize,
    pub errno: i32,
    pub sticky: bool,
    pub seen: usize,
    pub after: bool,
}

impl FaultFs {
    pub fn failing(op: &'static str, nth: usize, errno: i32) -> FaultFs {
        FaultFs {
            log: Mutex::new(Vec::new()),
            fault: Mutex::new(Some(Fault {
                op,
                nth,
                errno,
                sticky: false,
                seen: 0,
                after: false,
            })),
        }
    }

    /// [`FaultFs::failing`], with the call applied before its error is reported.
    pub fn failing_after(op: &'static str, nth: usize, errno: i32) -> FaultFs {
        let fs = FaultFs::failing(op, nth, errno);
        if let Some(f) = fs.fault.lock().unwrap().as_mut() {
            f.after = true;
        }
        fs
    }

    pub fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    fn call(&self, op: &'static str, dir: &Dir, name: Option<&OsStr>) -> io::Result<()> {
        self.faulted(op, dir, name).map(|_| ())
    }

    /// Records the call; `Err` to fail it before it is made, `Ok(Some(errno))` to make it and
    /// then report `errno`.
    fn faulted(&self, op: &'static str, dir: &Dir, name: Option<&OsStr>) -> io::Result<Option<i32>> {
        let entry = match name {
            Some(n) => format!("{op} {}/{}", dir.name, n.to_string_lossy()),
            None => format!("{op} {}", dir.name),
        };
        self.log.lock().unwrap().push(entry);
        let mut fault = self.fault.lock().unwrap();
        if let Some(f) = fault.as_mut() {
            if f.op == op {
                f.seen += 1;
                if f.seen == f.nth || (f.sticky && f.seen > f.nth) {
                    if f.after {
                        return Ok(Some(f.errno));
                    }
                    return Err(io::Error::from_raw_os_error(f.errno));
                }
            }
        }
        Ok(None)
    }

    /// Makes a call, faulted before or after it as set up.
    fn apply<T>(
        &self,
        op: &'static str,
        dir: &Dir,
        name: Option<&OsStr>,
        f: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let late = self.faulted(op, dir, name)?;
        let r = f()?;
        match late {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(r),
        }
    }
}

impl Fs for FaultFs {
    fn create(&self, dir: &Dir, name: &OsStr, mode: u32) -> io::Result<File> {
        self.call("create", dir, Some(name))?;
        RealFs.create(dir, name, mode)
    }
    fn write(&self, file: &File, dir: &Dir, name: &OsStr, buf: &[u8]) -> io::Result<()> {
        self.call("write", dir, Some(name))?;
        RealFs.write(file, dir, name, buf)
    }
    fn fsync(&self, file: &File, dir: &Dir, name: &OsStr) -> io::Result<()> {
        self.call("fsync", dir, Some(name))?;
        RealFs.fsync(file, dir, name)
    }
    fn sync_dir(&self, dir: &Dir) -> io::Result<()> {
        self.call("sync_dir", dir, None)?;
        RealFs.sync_dir(dir)
    }
    fn syncfs(&self, dir: &Dir) -> io::Result<()> {
        self.call("syncfs", dir, None)?;
        RealFs.syncfs(dir)
    }
    fn rename(&self, from: &Dir, name: &OsStr, to: &Dir, new: &OsStr, noreplace: bool) -> io::Result<()> {
        let late = self.faulted("rename", from, Some(name));
        self.log
            .lock()
            .unwrap()
            .last_mut()
            .unwrap()
            .push_str(&format!(" -> {}/{}", to.name, new.to_string_lossy()));
        let late = late?;
        RealFs.rename(from, name, to, new, noreplace)?;
        late.map_or(Ok(()), |errno| Err(io::Error::from_raw_os_error(errno)))
    }
    fn unlink(&self, dir: &Dir, name: &OsStr, is_dir: bool) -> io::Result<()> {
        self.apply("unlink", dir, Some(name), || RealFs.unlink(dir, name, is_dir))
    }
    fn touch(&self, dir: &Dir, name: &OsStr) -> io::Result<()> {
        self.call("touch", dir, Some(name))?;
        RealFs.touch(dir, name)
    }
    fn open_read(&self, dir: &Dir, name: &OsStr) -> io::Result<File> {
        self.call("open_read", dir, Some(name))?;
        RealFs.open_read(dir, name)
    }
    fn open_append(&self, dir: &Dir, name: &OsStr, mode: u32, fresh: bool) -> io::Result<(File, bool)> {
        self.call("open_append", dir, Some(name))?;
        RealFs.open_append(dir, name, mode, fresh)
    }
    fn list(&self, dir: &Dir) -> io::Result<Vec<(OsString, Kind)>> {
        self.call("list", dir, None)?;
        RealFs.list(dir)
    }
}

/// A fresh queue directory with default settings, inside a temporary directory.
pub fn queue() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    jobspool::store::dir::init(&q, &Default::default()).unwrap();
    (dir, q)
}

/// Names in a queue folder.
pub fn names(root: &std::path::Path, folder: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join(folder))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
pub mod redis_server;
