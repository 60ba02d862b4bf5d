//! The file-system calls the directory store makes, behind a trait so that tests can observe
//! their order and inject a failure at any one of them.
//!
//! Every call is relative to an open directory of the queue ([`Dir`]) and never follows a
//! symbolic link, so a link or a `..` placed in the queue by someone else cannot redirect a
//! write, a read or a rename outside it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::{Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// An open directory of the queue, named for messages and for tests.
#[derive(Debug)]
pub struct Dir {
    /// The folder's name inside the queue (`ready`, `tmp`, …; `.` for the queue itself).
    pub name: &'static str,
    /// Its full path, for messages.
    pub path: PathBuf,
    fd: OwnedFd,
}

impl Dir {
    /// Opens `name` inside `parent` (or the queue root itself when `parent` is `None`).
    pub fn open(root: &Path, name: &'static str) -> io::Result<Dir> {
        let path = if name == "." {
            root.to_path_buf()
        } else {
            root.join(name)
        };
        let fd = nix::fcntl::open(
            &path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(Dir { name, path, fd })
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A second descriptor for the same directory (a separate open file description, so it
    /// can carry its own `flock`).
    pub fn reopen(&self) -> io::Result<OwnedFd> {
        Ok(nix::fcntl::openat(
            self.fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?)
    }
}

/// What a directory entry is, from `readdir` (or `lstat` where the file system does not say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
    /// A block or character device.
    Device,
    /// Gone before it could be looked at.
    Vanished,
}

impl Kind {
    /// The word used in quarantine reasons.
    pub fn word(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Directory => "directory",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::Device => "device",
            Kind::Vanished => "vanished",
        }
    }
}

/// The file-system calls of the directory store.
pub trait Fs: Send + Sync {
    /// Creates a new file (never an existing one, never through a link), with exactly `mode`
    /// whatever the umask.
    fn create(&self, dir: &Dir, name: &OsStr, mode: u32) -> io::Result<File>;
    /// Writes all of `buf` to a file created by `create` or `open_append`.
    fn write(&self, file: &File, dir: &Dir, name: &OsStr, buf: &[u8]) -> io::Result<()>;
    /// Flushes a file's data and metadata to stable storage.
    fn fsync(&self, file: &File, dir: &Dir, name: &OsStr) -> io::Result<()>;
    /// Flushes a directory's entries to stable storage.
    fn sync_dir(&self, dir: &Dir) -> io::Result<()>;
    /// Flushes the whole file system that holds `dir`.
    fn syncfs(&self, dir: &Dir) -> io::Result<()>;
    /// Renames atomically; with `noreplace`, fails with `EEXIST` rather than replace a file.
    fn rename(&self, from: &Dir, name: &OsStr, to: &Dir, new: &OsStr, noreplace: bool) -> io::Result<()>;
    /// Removes a file (or, with `dir`, an empty directory).
    fn unlink(&self, dir: &Dir, name: &OsStr, is_dir: bool) -> io::Result<()>;
    /// Sets a file's modification time to now, by name, without following links.
    fn touch(&self, dir: &Dir, name: &OsStr) -> io::Result<()>;
    /// Opens a file for reading without following links and without blocking on a FIFO.
    fn open_read(&self, dir: &Dir, name: &OsStr) -> io::Result<File>;
    /// Opens a file for appending, creating it with exactly `mode` if missing; says whether it
    /// was created. `fresh` says which is likely, so that the likely case costs one `open`.
    fn open_append(&self, dir: &Dir, name: &OsStr, mode: u32, fresh: bool) -> io::Result<(File, bool)>;
    /// Lists a directory.
    fn list(&self, dir: &Dir) -> io::Result<Vec<(OsString, Kind)>>;
    /// Calls `each` for every entry of a directory as it is read, without holding the whole
    /// listing: `ready/` can hold millions of jobs, and the index built from it is all that
    /// needs to stay. The default goes through [`Fs::list`].
    fn list_each(&self, dir: &Dir, each: &mut dyn FnMut(&OsStr, Kind)) -> io::Result<()> {
        for (name, kind) in self.list(dir)? {
            each(&name, kind);
        }
        Ok(())
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits as nix::libc::mode_t)
}

impl Fs for RealFs {
    fn create(&self, dir: &Dir, name: &OsStr, bits: u32) -> io::Result<File> {
        let fd = nix::fcntl::openat(
            dir.fd(),
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            mode(bits),
        )?;
        // The umask may have removed group bits a shared queue needs: set them explicitly.
        if let Err(e) = nix::sys::stat::fchmod(&fd, mode(bits)) {
            let _ = nix::unistd::unlinkat(dir.fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir);
            return Err(e.into());
        }
        Ok(File::from(fd))
    }

    fn write(&self, mut file: &File, _dir: &Dir, _name: &OsStr, buf: &[u8]) -> io::Result<()> {
        file.write_all(buf)
    }

    fn fsync(&self, file: &File, _dir: &Dir, _name: &OsStr) -> io::Result<()> {
        Ok(nix::unistd::fsync(file)?)
    }

    fn sync_dir(&self, dir: &Dir) -> io::Result<()> {
        Ok(nix::unistd::fsync(dir.fd())?)
    }

    fn syncfs(&self, dir: &Dir) -> io::Result<()> {
        Ok(nix::unistd::syncfs(dir.fd())?)
    }

    fn rename(&self, from: &Dir, name: &OsStr, to: &Dir, new: &OsStr, noreplace: bool) -> io::Result<()> {
        let flags = if noreplace {
            RenameFlags::RENAME_NOREPLACE
        } else {
            RenameFlags::empty()
        };
        match nix::fcntl::renameat2(from.fd(), name, to.fd(), new, flags) {
            // Some file systems (old tmpfs, some FUSE) lack renameat2 flags: fall back to a
            // link + unlink pair, which is also exclusive on the target.
            Err(Errno::EINVAL) if noreplace => {
                nix::unistd::linkat(from.fd(), name, to.fd(), new, nix::fcntl::AtFlags::empty())?;
                match nix::unistd::unlinkat(from.fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            other => Ok(other?),
        }
    }

    fn unlink(&self, dir: &Dir, name: &OsStr, is_dir: bool) -> io::Result<()> {
        let flag = if is_dir {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        Ok(nix::unistd::unlinkat(dir.fd(), name, flag)?)
    }

    fn touch(&self, dir: &Dir, name: &OsStr) -> io::Result<()> {
        Ok(nix::sys::stat::utimensat(
            dir.fd(),
            name,
            // Both times to now: the only change the kernel allows a caller that does not own the
            // file but may write it (a runner under another uid than the job's producer, in a
            // group-shared queue). Setting only the mtime needs ownership (EPERM otherwise).
            &TimeSpec::UTIME_NOW,
            &TimeSpec::UTIME_NOW,
            UtimensatFlags::NoFollowSymlink,
        )?)
    }

    fn open_read(&self, dir: &Dir, name: &OsStr) -> io::Result<File> {
        let fd = nix::fcntl::openat(
            dir.fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    fn open_append(&self, dir: &Dir, name: &OsStr, bits: u32, fresh: bool) -> io::Result<(File, bool)> {
        let flags = OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let open = || nix::fcntl::openat(dir.fd(), name, flags, Mode::empty());
        if !fresh {
            match open() {
                Err(Errno::ENOENT) => {}
                other => return Ok((File::from(other?), false)),
            }
        }
        match nix::fcntl::openat(dir.fd(), name, flags | OFlag::O_CREAT | OFlag::O_EXCL, mode(bits)) {
            Ok(fd) => {
                // The umask may have removed group bits a shared queue needs.
                nix::sys::stat::fchmod(&fd, mode(bits))?;
                Ok((File::from(fd), true))
            }
            // There already, or created by someone else in between: open it.
            Err(Errno::EEXIST) => Ok((File::from(open()?), false)),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self, dir: &Dir) -> io::Result<Vec<(OsString, Kind)>> {
        let mut out = Vec::new();
        self.list_each(dir, &mut |name, kind| out.push((name.to_os_string(), kind)))?;
        Ok(out)
    }

    fn list_each(&self, dir: &Dir, each: &mut dyn FnMut(&OsStr, Kind)) -> io::Result<()> {
        let mut d = nix::dir::Dir::from_fd(dir.reopen()?)?;
        for entry in d.iter() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsStr::from_bytes(name);
            use nix::dir::Type;
            let kind = match entry.file_type() {
                Some(Type::File) => Kind::File,
                Some(Type::Directory) => Kind::Directory,
                Some(Type::Symlink) => Kind::Symlink,
                Some(Type::Fifo) => Kind::Fifo,
                Some(Type::Socket) => Kind::Socket,
                Some(Type::BlockDevice | Type::CharacterDevice) => Kind::Device,
                None => lstat_kind(dir, name),
            };
            each(name, kind);
        }
        Ok(())
    }
}

/// What `name` is, without following it.
pub fn lstat_kind(dir: &Dir, name: &OsStr) -> Kind {
    use nix::sys::stat::SFlag;
    match nix::sys::stat::fstatat(dir.fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFDIR => Kind::Directory,
            SFlag::S_IFLNK => Kind::Symlink,
            SFlag::S_IFIFO => Kind::Fifo,
            SFlag::S_IFSOCK => Kind::Socket,
            _ => Kind::Device,
        },
        Err(_) => Kind::Vanished,
    }
}
