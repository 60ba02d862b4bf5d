//! The results table and the machine description written next to it.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// Whether a row met its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// Measured; no target for this row.
    Info,
    /// Not measured (the reason is in the note).
    Skipped,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Info => "",
            Verdict::Skipped => "skipped",
        }
    }
}

/// One line of the results table.
#[derive(Clone, Debug)]
pub struct Row {
    /// The item of issue 5 it answers (1..9).
    pub item: String,
    pub workload: String,
    pub value: String,
    pub reference: String,
    pub ratio: Option<f64>,
    pub target: String,
    pub verdict: Verdict,
    pub note: String,
}

impl Row {
    pub fn new(item: &str, workload: impl Into<String>) -> Row {
        Row {
            item: item.into(),
            workload: workload.into(),
            value: String::new(),
            reference: String::new(),
            ratio: None,
            target: String::new(),
            verdict: Verdict::Info,
            note: String::new(),
        }
    }

    pub fn value(mut self, v: impl Into<String>) -> Row {
        self.value = v.into();
        self
    }

    pub fn reference(mut self, r: impl Into<String>) -> Row {
        self.reference = r.into();
        self
    }

    /// Sets the ratio and, when given, judges it against a lower bound.
    pub fn ratio(mut self, r: f64, at_least: Option<f64>) -> Row {
        self.ratio = Some(r);
        if let Some(min) = at_least {
            self.target = format!("≥ {min}");
            self.verdict = if r >= min { Verdict::Met } else { Verdict::Missed };
        }
        self
    }

    pub fn target(mut self, t: impl Into<String>, met: bool) -> Row {
        self.target = t.into();
        self.verdict = if met { Verdict::Met } else { Verdict::Missed };
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }

    pub fn skipped(item: &str, workload: impl Into<String>, why: impl Into<String>) -> Row {
        let mut r = Row::new(item, workload);
        r.verdict = Verdict::Skipped;
        r.note = why.into();
        r
    }
}

/// One peer measurement (a `RESULT` line of a peer script), or a skipped peer.
#[derive(Clone, Debug)]
pub struct PeerRow {
    pub peer: String,
    pub variant: String,
    pub n: u64,
    pub enqueue: Option<f64>,
    pub drain: Option<f64>,
    pub durability: String,
    /// jobspool's figures of the same class, same run: (what, enqueue/s, drain/s).
    pub ours: Option<(String, f64, f64)>,
    pub note: String,
}

pub fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{:.0}", v)
    } else if v >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| # | workload | result | reference (same run) | ratio | target | verdict | note |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let ratio = r.ratio.map(|x| format!("{x:.2}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.item,
            r.workload,
            r.value,
            r.reference,
            ratio,
            r.target,
            r.verdict.word(),
            r.note.replace('|', "/")
        );
    }
    s
}

pub fn peer_table(rows: &[PeerRow]) -> String {
    let mut s = String::new();
    s.push_str("| peer | variant | N | enqueue/s | drain/s | durability | jobspool, same class, same run (enqueue/s, drain/s) | jobspool ahead? |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for p in rows {
        let f = |x: Option<f64>| x.map(rate).unwrap_or_else(|| "–".into());
        let (ours, ahead) = match &p.ours {
            Some((what, e, d)) => {
                let ahead_e = p.enqueue.is_none_or(|x| *e >= x);
                let ahead_d = p.drain.is_none_or(|x| *d >= x);
                let verdict = match (ahead_e, ahead_d) {
                    (true, true) => "yes".to_string(),
                    (false, true) => "**no** (enqueue)".to_string(),
                    (true, false) => "**no** (drain)".to_string(),
                    (false, false) => "**no** (both)".to_string(),
                };
                (format!("{what}: {}, {}", rate(*e), rate(*d)), verdict)
            }
            None => (String::new(), String::new()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {}{} |",
            p.peer,
            p.variant,
            p.n,
            f(p.enqueue),
            f(p.drain),
            p.durability.replace('|', "/"),
            ours,
            ahead,
            if p.note.is_empty() {
                String::new()
            } else {
                format!(" {}", p.note.replace('|', "/"))
            }
        );
    }
    s
}

fn cmd_line(prog: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(prog).args(args).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if s.is_empty() { None } else { Some(s) }
}

/// The machine, the file system of `dir`, and versions, as markdown lines.
pub fn machine(dir: &Path, jobspool_bin: Option<&Path>) -> String {
    let mut s = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let df = cmd_line("df", &["-T", &dir.to_string_lossy()])
        .and_then(|o| {
            o.lines()
                .last()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "?".into());
    let _ = writeln!(s, "- CPU: {cores} cores ({cpu}); memory {mem}; kernel {kernel}");
    let _ = writeln!(s, "- work directory: `{}` on `{df}` (df -T)", dir.display());
    if df.split_whitespace().nth(1) == Some("tmpfs") {
        let _ = writeln!(s, "- WARNING: tmpfs ignores fsync; durable figures mean nothing here");
    }
    if let Some(mount) = cmd_line(
        "findmnt",
        &["-no", "SOURCE,FSTYPE,OPTIONS", "-T", &dir.to_string_lossy()],
    ) {
        let fields: Vec<&str> = mount.split_whitespace().collect();
        let _ = writeln!(s, "- mount: `{}`", fields.join(" "));
        if let [source, "ext4", ..] = fields.as_slice() {
            // jbd2 lists each journal it runs as DEVICE-8.
            let dev = source.rsplit('/').next().unwrap_or(source);
            if !Path::new(&format!("/proc/fs/jbd2/{dev}-8")).exists() {
                let _ = writeln!(
                    s,
                    "- ext4 **without a journal**: its inode allocator skips every inode freed in the last \
                     60 s (360 s while its inode-table block is dirty), so each file created costs more the \
                     more files were deleted just before (by the previous item, say)"
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "- {}; jobspool {}; git {}",
        cmd_line("rustc", &["--version"]).unwrap_or_else(|| "rustc ?".into()),
        jobspool_bin
            .and_then(|b| cmd_line(&b.to_string_lossy(), &["--version"]))
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
        cmd_line("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into())
    );
    let _ = writeln!(
        s,
        "- load average at start: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    s
}
