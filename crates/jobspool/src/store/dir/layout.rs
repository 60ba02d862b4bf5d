//! Creating, opening and checking a queue directory's layout and permissions.
//!
//! ```text
//! QUEUE/
//!   jobspool.toml   layout version and defaults
//!   tmp/            pushes are written here, then renamed into ready/
//!   ready/          queued jobs (ready, or scheduled when their run-at is in the future)
//!   running/        claimed jobs, named with their lease
//!   dead/           failed jobs
//!   quarantine/     files that are not valid jobs, named with the reason
//!   logs/           ID.log (handler output) and ID.events (history) per job
//!   runners/        one entry per live claimer, locked by it for its whole life
//! ```
//!
//! A queue shared by a group has its group on every directory with the setgid bit (so new files
//! inherit the group), and every file is given the configured mode explicitly after creation,
//! whatever the creator's umask. The sticky bit is refused: it lets only a file's owner rename
//! it, which breaks claims of jobs pushed by another user.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::QueueConfig;
use crate::error::{Error, Result};

/// The folders of a queue directory, in creation order.
pub const FOLDERS: [&str; 7] = ["tmp", "ready", "running", "dead", "quarantine", "logs", "runners"];

/// The configuration file's name.
pub const CONFIG_FILE: &str = "jobspool.toml";

/// Options of `jobspool init`.
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// Group to share the queue with.
    pub group: Option<String>,
    /// File mode for job, log and runner files.
    pub mode: Option<u32>,
}

/// Directory permission bits that let the holders of a file mode use the queue: whoever may
/// write files may also create and rename entries, whoever may read may list.
pub fn dir_mode(file_mode: u32, setgid: bool) -> u32 {
    let mut m = 0o700;
    for shift in [3, 0] {
        let bits = (file_mode >> shift) & 0o7;
        if bits & 0o2 != 0 {
            m |= 0o7 << shift;
        } else if bits & 0o4 != 0 {
            m |= 0o5 << shift;
        }
    }
    if setgid {
        m |= 0o2000;
    }
    m
}

fn resolve_group(name: &str) -> Result<nix::unistd::Gid> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(Error::Invalid(format!(
            "group {name:?} does not exist; create it (groupadd {name}) or name an existing group"
        ))),
        Err(e) => Err(Error::Invalid(format!("cannot look up group {name:?}: {e}"))),
    }
}

/// Creates or repairs a queue directory; idempotent. Returns the configuration in force.
pub fn init(root: &Path, opts: &InitOptions) -> Result<QueueConfig> {
    let has_config = root.join(CONFIG_FILE).exists();
    let existing = match read_config(root) {
        Ok(c) => Some(c),
        Err(e) if has_config => {
            tracing::warn!("{e}; rewriting it with default settings");
            None
        }
        Err(_) => None,
    };
    if !has_config && root.exists() {
        let non_empty = fs::read_dir(root)
            .map_err(|e| Error::io(root, "reading the directory", e))?
            .next()
            .is_some();
        if non_empty {
            return Err(Error::Config {
                path: root.to_path_buf(),
                msg: format!(
                    "exists, is not empty and has no {CONFIG_FILE}: it is not a jobspool queue; name a new or empty directory"
                ),
            });
        }
    }
    let mut cfg = existing.unwrap_or_default();
    if let Some(mode) = opts.mode {
        cfg.mode = mode;
    }
    if opts.group.is_some() {
        cfg.group = opts.group.clone();
    }
    let gid = cfg.group.as_deref().map(resolve_group).transpose()?;
    let dmode = dir_mode(cfg.mode, gid.is_some());

    fs::create_dir_all(root).map_err(|e| Error::io(root, "creating the queue directory", e))?;
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    dirs.extend(FOLDERS.iter().map(|f| root.join(f)));
    for dir in &dirs {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(dir, "creating a queue folder", e)),
        }
        let meta = fs::symlink_metadata(dir).map_err(|e| Error::io(dir, "inspecting", e))?;
        if !meta.is_dir() {
            return Err(Error::Config {
                path: dir.clone(),
                msg: "is not a directory (a symlink or a file is in the way); move it aside and run init again".into(),
            });
        }
        if let Some(gid) = gid {
            nix::unistd::chown(dir.as_path(), None, Some(gid))
                .map_err(|e| Error::io(dir, "changing the group (are you a member of it, or root?)", e))?;
        }
        // The queue root may be shared with other things; only its sticky bit matters to us
        // when it is one of our folders.
        fs::set_permissions(dir, fs::Permissions::from_mode(dmode))
            .map_err(|e| Error::io(dir, "setting permissions", e))?;
    }
    write_config(root, &cfg, gid)?;
    Ok(cfg)
}

fn write_config(root: &Path, cfg: &QueueConfig, gid: Option<nix::unistd::Gid>) -> Result<()> {
    let path = root.join(CONFIG_FILE);
    let text = cfg.to_toml();
    if fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        // Unchanged: still make sure its mode and group are right.
        fix_file(&path, cfg.mode, gid)?;
        return Ok(());
    }
    let tmp = root.join("tmp").join(format!("{CONFIG_FILE}.{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, "creating", e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(&tmp, "writing", e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, "syncing", e))?;
        fix_file(&tmp, cfg.mode, gid)?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "replacing", e))?;
        fs::File::open(root)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(root, "syncing", e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn fix_file(path: &Path, mode: u32, gid: Option<nix::unistd::Gid>) -> Result<()> {
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| Error::io(path, "changing the group", e))?;
    }
    // The config is readable by whoever may read jobs, writable only as the file mode allows.
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o666))
        .map_err(|e| Error::io(path, "setting permissions", e))
}

/// Reads and checks `jobspool.toml`.
pub fn read_config(root: &Path) -> Result<QueueConfig> {
    let path = root.join(CONFIG_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let msg = if root.is_dir() {
                format!(
                    "is not a jobspool queue (no {CONFIG_FILE}); create it with `jobspool init {}`",
                    root.display()
                )
            } else {
                format!("no such queue; create it with `jobspool init {}`", root.display())
            };
            return Err(Error::Config {
                path: root.to_path_buf(),
                msg,
            });
        }
        Err(e) => return Err(Error::io(&path, "reading the queue configuration", e)),
    };
    QueueConfig::parse(&text).map_err(|msg| Error::Config {
        path,
        msg: format!("{msg}; fix the file or run `jobspool init` to rewrite it"),
    })
}

/// Checks the layout for problems that would break the contract or sharing between users.
/// Each entry says what is wrong and how to fix it.
pub fn doctor(root: &Path, cfg: &QueueConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let root_dev = fs::metadata(root).map(|m| m.dev()).ok();
    let want_gid = cfg.group.as_deref().and_then(|g| resolve_group(g).ok());
    let dmode = dir_mode(cfg.mode, cfg.group.is_some());
    for folder in FOLDERS {
        let path = root.join(folder);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!(
                    "{}: {e}; run `jobspool init {}` to recreate it",
                    path.display(),
                    root.display()
                ));
                continue;
            }
        };
        if !meta.is_dir() {
            problems.push(format!(
                "{}: is not a directory; move it aside and run `jobspool init`",
                path.display()
            ));
            continue;
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o1000 != 0 {
            problems.push(format!(
                "{}: has the sticky bit, so only a file's owner can claim it; fix with `chmod -t {}`",
                path.display(),
                path.display()
            ));
        }
        if mode & 0o002 != 0 && cfg.group.is_none() {
            problems.push(format!(
                "{}: is world-writable and the queue has no group: anyone can inject jobs; share it with a group instead (`jobspool init {} --group G`)",
                path.display(),
                root.display()
            ));
        }
        if mode & 0o777 != dmode & 0o777 {
            problems.push(format!(
                "{}: mode {:04o} does not match the queue's file mode {:04o} (expected {:04o}); fix with `jobspool init {}`",
                path.display(),
                mode,
                cfg.mode,
                dmode,
                root.display()
            ));
        }
        if let Some(gid) = want_gid {
            if meta.gid() != gid.as_raw() {
                problems.push(format!(
                    "{}: group {} is not the queue's group {}; fix with `jobspool init {} --group {}`",
                    path.display(),
                    meta.gid(),
                    gid,
                    root.display(),
                    cfg.group.as_deref().unwrap_or_default()
                ));
            }
            if mode & 0o2000 == 0 {
                problems.push(format!(
                    "{}: lacks the setgid bit, so new files do not inherit the queue's group; fix with `chmod g+s {}`",
                    path.display(),
                    path.display()
                ));
            }
        }
        if root_dev.is_some() && Some(meta.dev()) != root_dev {
            problems.push(format!(
                "{}: is on a different file system from the queue, so renames into and out of it fail (EXDEV); keep every folder on one file system",
                path.display()
            ));
        }
        if nix::unistd::access(
            &path,
            nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .is_err()
        {
            problems.push(format!(
                "{}: this user cannot read and write it; add the user to the queue's group or fix the permissions",
                path.display()
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_modes_follow_file_modes() {
        assert_eq!(dir_mode(0o600, false), 0o700);
        assert_eq!(dir_mode(0o660, true), 0o2770);
        assert_eq!(dir_mode(0o640, false), 0o750);
        assert_eq!(dir_mode(0o644, false), 0o755);
        assert_eq!(dir_mode(0o666, false), 0o777);
    }
}
