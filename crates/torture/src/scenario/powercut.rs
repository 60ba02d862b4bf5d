//! Scenario 5: a real power cut. A QEMU guest (Debian's kernel, its initramfs plus `torture-op`)
//! runs producers and workers on an ext4 or xfs disk and streams the history out through a
//! serial port; the host kills QEMU with SIGKILL at a random moment — the guest's page cache,
//! its unsubmitted I/O and every process vanish at once, as in a power cut. The guest is booted
//! again: the file system recovers its journal, a runner's recovery and a fault-free drain run
//! (their history streamed out too), and the host checks the whole history against the queue
//! left on the disk.
//!
//! What this power cut does not do: QEMU's disk writes that completed are in the host's page
//! cache, which survives; so writes the guest submitted but never flushed are not lost, and a
//! disk's volatile cache reordering writes is not modelled. What the guest kernel had not yet
//! written (dirty pages, unsubmitted requests, uncommitted journal) is lost, which is what a
//! program's fsyncs must guard against.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Figures;
use super::disk::Mount;
use crate::history::{Entry, F, Recorder, Ty};
use crate::{Env, final_state};

const INIT: &str = r#"#!/usr/bin/busybox sh
B=/usr/bin/busybox
$B mkdir -p /proc /sys /dev /mnt
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in virtio_pci virtio_blk ext4 xfs; do /usr/sbin/modprobe $m; done
mode=work; seed=1
for a in $($B cat /proc/cmdline); do
  case $a in torture.mode=*) mode=${a#torture.mode=};; torture.seed=*) seed=${a#torture.seed=};; esac
done
$B stty -F /dev/ttyS1 raw -echo 2>/dev/null
$B mount /dev/vda /mnt || { echo "MOUNT FAILED"; $B poweroff -f; }
echo "guest: mode $mode"
H=/dev/ttyS1
if [ $mode = work ]; then
  for w in 1 2 3; do /usr/bin/torture-op /mnt/q c${seed}w$w worker 1000 5 3600000 10 > $H & done
  for p in 1 2; do /usr/bin/torture-op /mnt/q c${seed}p$p producer c${seed}p$p 100000 > $H & done
  echo "guest: working"
  $B sleep 100000
else
  /usr/bin/torture-op /mnt/q c${seed}recover recover > $H
  /usr/bin/torture-op /mnt/q c${seed}drain drain 300 > $H
  echo "guest: drained"
  $B sync
  $B umount /mnt
  $B sync
  echo "guest: done"
  $B poweroff -f
fi
"#;

/// What the guest needs: a kernel, and an initramfs with `torture-op` and the init above.
struct Guest {
    _dir: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
    kvm: bool,
}

fn find_kernel() -> Option<(PathBuf, PathBuf)> {
    let mut ks: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    ks.sort();
    let k = ks.pop()?;
    let ver = k
        .file_name()?
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let i = PathBuf::from(format!("/boot/initrd.img-{ver}"));
    i.exists().then_some((k, i))
}

fn prepare(env: &Env) -> Result<Guest, String> {
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        return Err("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 linux-image-amd64)".into());
    }
    let (kernel, initrd) =
        find_kernel().ok_or("no /boot/vmlinuz-* with its initrd (apt-get install linux-image-amd64)")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let un = dir.path().join("un");
    let o = Command::new("unmkinitramfs")
        .arg(&initrd)
        .arg(&un)
        .output()
        .map_err(|e| format!("unmkinitramfs: {e}"))?;
    if !o.status.success() {
        return Err(format!("unmkinitramfs: {}", String::from_utf8_lossy(&o.stderr)));
    }
    let root = if un.join("main").exists() {
        un.join("main")
    } else {
        un.clone()
    };
    let _ = std::fs::remove_dir_all(root.join("usr/lib/firmware"));
    std::fs::copy(&env.op, root.join("usr/bin/torture-op")).map_err(|e| e.to_string())?;
    // A debug build carries hundreds of MB of debug info: the initramfs must fit in guest RAM.
    let _ = Command::new("strip").arg(root.join("usr/bin/torture-op")).status();
    let lib = "libgcc_s.so.1";
    let _ = std::fs::copy(
        Path::new("/lib/x86_64-linux-gnu").join(lib),
        root.join("usr/lib/x86_64-linux-gnu").join(lib),
    );
    std::fs::write(root.join("torture-init"), INIT).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("torture-init"), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let out = dir.path().join("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("cpio failed".into());
    }
    // KVM is used only if a guest actually boots with it (nested KVM may hang).
    Ok(Guest {
        _dir: dir,
        kernel,
        initrd: out,
        kvm: false,
    })
}

fn qemu(g: &Guest, disk: &Path, console: &Path, history: &Path, mode: &str, seed: u64) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        if g.kvm { "kvm" } else { "tcg" },
        "-m",
        "512",
        "-smp",
        "2",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&g.kernel)
    .arg("-initrd")
    .arg(&g.initrd)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 loglevel=3 rdinit=/torture-init torture.mode={mode} torture.seed={seed}"
    ))
    .arg("-drive")
    .arg(format!("file={},format=raw,if=virtio,cache=writeback", disk.display()))
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-chardev")
    .arg(format!("file,id=hist,path={},append=on", history.display()))
    .args(["-device", "isa-serial,chardev=hist"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    c
}

fn ok_lines(history: &Path) -> usize {
    std::fs::read(history)
        .map(|b| b.windows(13).filter(|w| w == b"\"type\":\"ok\",\"").count())
        .unwrap_or(0)
}

/// One cycle: make the file system, work, cut the power, reboot, drain, check.
fn cycle(g: &Guest, fs: &str, seed: u64, rng: &mut fastrand::Rng, figs: &mut Figures) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(320 << 20))
        .map_err(|e| e.to_string())?;
    let mk = Command::new(format!("mkfs.{fs}"))
        .args(if fs == "xfs" { vec!["-q", "-f"] } else { vec!["-q"] })
        .arg(&disk)
        .output()
        .map_err(|e| format!("mkfs.{fs}: {e}"))?;
    if !mk.status.success() {
        return Err(format!("mkfs.{fs}: {}", String::from_utf8_lossy(&mk.stderr)));
    }
    {
        let m = Mount::existing(&disk)?;
        jobspool::store::dir::init(&m.point.join("q"), &Default::default()).map_err(|e| e.to_string())?;
    }
    let history = dir.path().join("history.jsonl");
    let console = dir.path().join("console.log");
    std::fs::write(&history, b"").map_err(|e| e.to_string())?;
    let mut q = qemu(g, &disk, &console, &history, "work", seed)
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    while ok_lines(&history) < 50 {
        if start.elapsed() > Duration::from_secs(240) || q.try_wait().map_err(|e| e.to_string())?.is_some() {
            let _ = q.kill();
            let _ = q.wait();
            return Err(format!(
                "the guest did no work; console: {}",
                std::fs::read_to_string(&console).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Work for a random while, then cut the power.
    std::thread::sleep(Duration::from_millis(500 + rng.u64(0..4000)));
    q.kill().map_err(|e| e.to_string())?;
    let _ = q.wait();
    let worked = start.elapsed();
    let rec = Recorder::open(&history, "host").map_err(|e| e.to_string())?;
    // A line torn by the cut is ended, so that the next one parses.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&history)
            .map_err(|e| e.to_string())?;
        f.write_all(b"\n").map_err(|e| e.to_string())?;
    }
    rec.record(&Entry::new("host", Ty::Info, F::PowerCut));
    // Reboot: recovery and the drain, their history appended.
    let st = qemu(g, &disk, &console, &history, "check", seed)
        .status()
        .map_err(|e| e.to_string())?;
    let con = std::fs::read_to_string(&console).unwrap_or_default();
    if !st.success() || !con.contains("guest: done") {
        return Err(format!(
            "the check boot failed ({st}): {}",
            con.lines().rev().take(10).collect::<Vec<_>>().join(" | ")
        ));
    }
    let fin = {
        let m = Mount::existing(&disk)?;
        final_state(&m.point.join("q"))
    };
    let (h, torn) = crate::history::read(&history).map_err(|e| e.to_string())?;
    let mut r = crate::checker::check(&h, &fin);
    // The power cut may cut the last line short (informative).
    r.torn_lines = torn as u64;
    if fin.quarantined > 0 {
        figs.violation(
            &format!("{fs} cycle {seed}"),
            format!("{} entries quarantined after the power cut", fin.quarantined),
        );
    }
    figs.faults += 1;
    figs.notes.push(format!(
        "{fs} cycle {seed}: cut after {:.1}s; pushes ok={} unknown={}, deliveries={}, acks={}; lost={} vanished={} unexpected={} stale={} duplicates: {}",
        worked.as_secs_f64(),
        r.pushes_ok,
        r.pushes_unknown,
        r.deliveries,
        r.acks_ok,
        r.lost,
        r.vanished,
        r.unexpected,
        r.stale_ack_accepted,
        r.duplicates.iter().map(|(c, n)| format!("{c}={n}")).collect::<Vec<_>>().join(" ")
    ));
    if let Some(keep) = std::env::var_os("TORTURE_KEEP") {
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(
            &history,
            Path::new(&keep).join(format!("powercut-{fs}-{seed}.history.jsonl")),
        );
    }
    figs.add_run(&format!("{fs} cycle {seed}"), &r);
    Ok(())
}

/// Scenario 5.
pub fn power_cut(env: &Env) -> Figures {
    let mut figs = Figures::new("power-cut");
    if !crate::is_root() {
        figs.skipped = Some("needs root (loop mounts to prepare and inspect the guest's disk)".into());
        return figs;
    }
    if std::env::var_os("TORTURE_QEMU").is_none() && !env.long {
        figs.skipped =
            Some("the QEMU power cut takes minutes under emulation: set TORTURE_QEMU=1 or run --long".into());
        return figs;
    }
    let g = match prepare(env) {
        Ok(g) => g,
        Err(e) => {
            figs.skipped = Some(e);
            return figs;
        }
    };
    let mut rng = fastrand::Rng::with_seed(env.seed);
    let cycles = if env.long { 4 } else { 1 };
    for fs in ["ext4", "xfs"] {
        if Command::new(format!("mkfs.{fs}")).arg("-V").output().is_err() {
            figs.notes.push(format!("{fs}: mkfs.{fs} is not installed; skipped"));
            continue;
        }
        for c in 0..cycles {
            if let Err(e) = cycle(&g, fs, env.seed * 100 + c, &mut rng, &mut figs) {
                figs.violation(&format!("{fs} cycle {c}"), e);
            }
        }
    }
    figs.notes
        .push("QEMU with TCG (software emulation): /dev/kvm exists here but a KVM guest hung at boot".into());
    figs
}
