//! Scenario 3: a real full disk and real inode exhaustion. A small ext4 image is loop-mounted
//! (a size- and inode-capped tmpfs when loop devices are not available), filled nearly full of
//! blocks or of inodes, and the chaos of scenario 4 runs on it. Pushes must fail cleanly,
//! claimed jobs must keep their state, nothing partial may become visible; after room is made,
//! recovery leaves no temp file, and the drain and history check must pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::Figures;
use super::chaos::{Chaos, chaos};
use crate::{Env, Run, age_tmp, entries};

/// A mounted scratch file system, unmounted on drop.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub point: PathBuf,
    pub kind: String,
}

impl Mount {
    /// A loop-mounted ext4 (or xfs) image of `mb` MiB with at most `inodes` inodes (ext4 only).
    pub fn image(fs: &str, mb: u64, inodes: Option<u64>) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = dir.path().join("fs.img");
        let point = dir.path().join("mnt");
        std::fs::create_dir(&point).map_err(|e| e.to_string())?;
        let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
        f.set_len(mb << 20).map_err(|e| e.to_string())?;
        let mut mkfs = Command::new(format!("mkfs.{fs}"));
        mkfs.arg("-q");
        if fs == "ext4" {
            if let Some(n) = inodes {
                mkfs.args(["-N", &n.to_string()]);
            }
        }
        if fs == "xfs" {
            mkfs.arg("-f");
        }
        let o = mkfs.arg(&img).output().map_err(|e| format!("mkfs.{fs}: {e}"))?;
        if !o.status.success() {
            return Err(format!("mkfs.{fs}: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
        loop_mount(&img, &point)?;
        Ok(Mount {
            dir,
            point,
            kind: format!(
                "loop-mounted {fs} of {mb} MiB{}",
                inodes.map(|n| format!(", {n} inodes")).unwrap_or_default()
            ),
        })
    }

    /// Loop-mounts an existing image (the mount point lives in a temp dir).
    pub fn existing(img: &Path) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let point = dir.path().join("mnt");
        std::fs::create_dir(&point).map_err(|e| e.to_string())?;
        loop_mount(img, &point)?;
        Ok(Mount {
            dir,
            point,
            kind: format!("{}", img.display()),
        })
    }

    /// A tmpfs capped in size and inodes.
    pub fn tmpfs(kb: u64, inodes: u64) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let point = dir.path().join("mnt");
        std::fs::create_dir(&point).map_err(|e| e.to_string())?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kb}k,nr_inodes={inodes}"), "tmpfs"])
            .arg(&point)
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!("mount -t tmpfs: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
        Ok(Mount {
            dir,
            point,
            kind: format!("tmpfs of {kb} KiB, {inodes} inodes"),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Whatever still runs there was killed by the scenario; retry briefly if busy.
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.point)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        let _ = &self.dir;
    }
}

/// Fills `dir` with filler: blocks (one big file, until ENOSPC) or inodes (empty files, until
/// ENOSPC); then frees `leave` units. Returns the filler paths.
fn fill(dir: &Path, inodes: bool, leave: usize) -> Vec<PathBuf> {
    use std::io::Write;
    let mut made = Vec::new();
    if inodes {
        for i in 0.. {
            let p = dir.join(format!("filler{i}"));
            match std::fs::File::create(&p) {
                Ok(_) => made.push(p),
                Err(_) => break,
            }
        }
        for p in made.drain(made.len().saturating_sub(leave)..) {
            let _ = std::fs::remove_file(p);
        }
    } else {
        let p = dir.join("filler");
        if let Ok(mut f) = std::fs::File::create(&p) {
            let block = vec![0xa5u8; 4096];
            while f.write_all(&block).is_ok() {}
            let _ = f.sync_all();
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.set_len(len.saturating_sub(leave as u64 * 1024));
            let _ = f.sync_all();
        }
        made.push(p);
    }
    made
}

fn one(env: &Env, figs: &mut Figures, m: &Mount, inodes: bool) {
    let case = format!("{} {}", m.kind, if inodes { "out of inodes" } else { "out of space" });
    let mut run = Run::new(Some(&m.point));
    let filler_dir = m.point.join("filler");
    std::fs::create_dir_all(&filler_dir).unwrap();
    let fillers = fill(&filler_dir, inodes, if inodes { 12 } else { 48 });
    let mut rng = fastrand::Rng::with_seed(env.seed ^ inodes as u64);
    let c = Chaos {
        producers: 2,
        workers: 2,
        jobs_per_producer: 40,
        push_pause: Duration::ZERO,
        lease: Duration::from_millis(1500),
        work: Duration::from_millis(5),
        retry_pct: 10,
        fault_every: Duration::from_millis(400),
        duration: if env.long {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(4)
        },
        max_producer_runs: if env.long { 0 } else { 30 },
    };
    let (kills, stops, _) = chaos(env, &mut run, &c, &mut rng);
    // Nothing partial visible while full: every entry of ready/ must decode.
    let store = jobspool::store::dir::DirStore::open(&run.queue, false);
    let partial_before = crate::entries(&run.queue, "quarantine").len();
    drop(store);
    // Make room, recover as a restarting runner would, drain.
    for f in fillers {
        let _ = std::fs::remove_file(f);
    }
    age_tmp(&run.queue);
    let o = run.op(env, None, &["recover"]);
    if !o.status.success() {
        figs.violation(&case, format!("recovery failed: {}", o.stderr.trim()));
    }
    let left = entries(&run.queue, "tmp");
    if !left.is_empty() {
        figs.violation(&case, format!("temp files left after recovery: {left:?}"));
    }
    let fin = run.drain(Duration::from_secs(60));
    if fin.quarantined > 0 || partial_before > 0 {
        figs.violation(
            &case,
            format!(
                "{} entries quarantined: something partial became visible",
                fin.quarantined
            ),
        );
    }
    let r = run.check(&fin);
    figs.faults += kills + stops;
    figs.notes.push(format!(
        "{case}: pushes ok={} failed={} unknown={}, {kills} kills, {stops} stops; {}",
        r.pushes_ok,
        r.pushes_failed,
        r.pushes_unknown,
        if r.is_ok() { "check passed" } else { "CHECK FAILED" }
    ));
    if r.pushes_failed == 0 {
        figs.notes
            .push(format!("{case}: no push failed — the file system never filled up"));
    }
    figs.add_run(&case, &r);
}

/// Scenario 3.
pub fn full_disk(env: &Env) -> Figures {
    let mut figs = Figures::new("full-disk");
    if !crate::is_root() {
        figs.skipped = Some("needs root to mount a small file system".into());
        return figs;
    }
    for inodes in [false, true] {
        let m = Mount::image("ext4", 16, Some(256)).or_else(|e| {
            figs.notes
                .push(format!("loop-mounted ext4 unavailable ({e}); using a tmpfs"));
            Mount::tmpfs(2048, 256)
        });
        match m {
            Ok(m) => one(env, &mut figs, &m, inodes),
            Err(e) => {
                figs.skipped = Some(format!("cannot mount a small file system: {e}"));
                return figs;
            }
        }
    }
    figs
}

/// Mounts the file-system image `img` on `point` through a loop device.
fn loop_mount(img: &Path, point: &Path) -> Result<(), String> {
    let o = Command::new("mount")
        .args(["-o", "loop"])
        .arg(img)
        .arg(point)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!("mount -o loop: {}", String::from_utf8_lossy(&o.stderr).trim()));
    }
    Ok(())
}
