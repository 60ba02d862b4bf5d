//! The machine's own limits, measured in the same run and on the same file system as the queues:
//! what jobspool's operations cost at the least, with nothing of jobspool in them.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Bytes written per file: about the size of a small job file (header + short payload).
pub const FILE_BYTES: usize = 256;

fn fresh(dir: &Path, sub: &str) -> std::io::Result<()> {
    let _ = fs::remove_dir_all(dir.join(sub));
    fs::create_dir_all(dir.join(sub))
}

/// Durable file create: write, fsync the file, rename tmp/ -> new/, fsync new/. Files per second.
pub fn durable_create(dir: &Path, n: usize) -> std::io::Result<f64> {
    fresh(dir, "tmp")?;
    fresh(dir, "new")?;
    let body = vec![b'x'; FILE_BYTES];
    let newdir = File::open(dir.join("new"))?;
    let t = Instant::now();
    for i in 0..n {
        let tmp = dir.join("tmp").join(i.to_string());
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dir.join("new").join(i.to_string()))?;
        newdir.sync_all()?;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(dir.join("tmp"));
    let _ = fs::remove_dir_all(dir.join("new"));
    Ok(rate)
}

/// Durable file create from `threads` threads at once, each doing the whole of
/// [`durable_create`] for its own files into one shared `new/` (its own descriptor of it), as
/// independent durable producers would. What the file system gives concurrent flushes for
/// free (a disk that merges cache flushes). Files per second, `threads * (n / threads)` files.
pub fn durable_create_threads(dir: &Path, n: usize, threads: usize) -> std::io::Result<f64> {
    fresh(dir, "tmp")?;
    fresh(dir, "new")?;
    let per = n / threads;
    let t = Instant::now();
    let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|j| {
                s.spawn(move || {
                    let body = vec![b'x'; FILE_BYTES];
                    let newdir = File::open(dir.join("new"))?;
                    for i in 0..per {
                        let name = format!("{j}.{i}");
                        let tmp = dir.join("tmp").join(&name);
                        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                        f.write_all(&body)?;
                        f.sync_all()?;
                        drop(f);
                        fs::rename(&tmp, dir.join("new").join(&name))?;
                        newdir.sync_all()?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("durable create thread"))
            .collect()
    });
    let rate = (per * threads) as f64 / t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(dir.join("tmp"));
    let _ = fs::remove_dir_all(dir.join("new"));
    for r in results {
        r?;
    }
    Ok(rate)
}

/// Plain file create + rename, no fsync. Files per second.
pub fn create_rename(dir: &Path, n: usize) -> std::io::Result<f64> {
    fresh(dir, "tmp")?;
    fresh(dir, "new")?;
    let body = vec![b'x'; FILE_BYTES];
    let t = Instant::now();
    for i in 0..n {
        let tmp = dir.join("tmp").join(i.to_string());
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&body)?;
        drop(f);
        fs::rename(&tmp, dir.join("new").join(i.to_string()))?;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(dir.join("tmp"));
    let _ = fs::remove_dir_all(dir.join("new"));
    Ok(rate)
}

/// Plain rename of existing files from one folder to another, no fsync. Renames per second.
pub fn rename(dir: &Path, n: usize) -> std::io::Result<f64> {
    fresh(dir, "a")?;
    fresh(dir, "b")?;
    for i in 0..n {
        File::create(dir.join("a").join(i.to_string()))?;
    }
    let t = Instant::now();
    for i in 0..n {
        fs::rename(dir.join("a").join(i.to_string()), dir.join("b").join(i.to_string()))?;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(dir.join("a"));
    let _ = fs::remove_dir_all(dir.join("b"));
    Ok(rate)
}

/// fork+exec+wait of `true` from `threads` threads at once (std::process::Command). Per second.
pub fn spawn_true(n: usize, threads: usize) -> std::io::Result<f64> {
    let t = Instant::now();
    let per = n / threads;
    let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    for _ in 0..per {
                        let st = Command::new("true")
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()?;
                        if !st.success() {
                            return Err(std::io::Error::other("true failed"));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("spawn thread")).collect()
    });
    for r in results {
        r?;
    }
    Ok((per * threads) as f64 / t.elapsed().as_secs_f64())
}

/// The same file-system calls as a claim + ack, with nothing else: rename a/i -> b/i, open and
/// read b/i, unlink it. Files of FILE_BYTES, flushed to disk before the loop. Per second.
pub fn rename_read_unlink(dir: &Path, n: usize) -> std::io::Result<f64> {
    fresh(dir, "a")?;
    fresh(dir, "b")?;
    let body = vec![b'x'; FILE_BYTES];
    for i in 0..n {
        fs::write(dir.join("a").join(i.to_string()), &body)?;
    }
    // Job files are durable when claimed: their blocks are allocated, so unlinking them frees
    // blocks (and, on a file system mounted with `discard`, waits for a discard). Flush these
    // too, so that the floor does the same work.
    let d = File::open(dir.join("a"))?;
    // SAFETY: syncfs takes a descriptor this function owns for the duration of the call.
    if unsafe { nix::libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = Vec::with_capacity(FILE_BYTES);
    let t = Instant::now();
    for i in 0..n {
        let b = dir.join("b").join(i.to_string());
        fs::rename(dir.join("a").join(i.to_string()), &b)?;
        buf.clear();
        std::io::Read::read_to_end(&mut File::open(&b)?, &mut buf)?;
        fs::remove_file(&b)?;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(dir.join("a"));
    let _ = fs::remove_dir_all(dir.join("b"));
    Ok(rate)
}
