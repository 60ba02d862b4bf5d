//! Formatting for people: log setup, ages, previews, tables.

use std::io::{IsTerminal, Write};

use jobspool::job::{Job, Millis};

/// Sets up log lines on standard error. `JOBSPOOL_LOG` (a tracing filter such as `debug`)
/// overrides the verbosity flags.
pub fn init_tracing(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("JOBSPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// Writes a line to standard output (see [`out`]).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::out(format!($($arg)*).as_bytes(), true)
    };
}

/// Writes text to standard output without adding a newline (see [`out`]).
macro_rules! say_raw {
    ($($arg:tt)*) => {
        $crate::output::out(format!($($arg)*).as_bytes(), false)
    };
}

/// Writes bytes (and a newline, with `line`) to standard output and flushes them. When the reader
/// has gone away (EPIPE, as in `jobspool show Q ID --payload | head -c1`), nobody is left to read
/// anything more: the command ends at once, quietly, with exit 0 — what it did is done. Any
/// other write error is reported.
pub fn out(bytes: &[u8], line: bool) -> jobspool::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(bytes)
        .and_then(|()| if line { stdout.write_all(b"\n") } else { Ok(()) })
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(jobspool::Error::io("<stdout>", "writing", e)),
    }
}

/// A duration in milliseconds as a short human figure: `850ms`, `42s`, `5m`, `3h`, `2d`.
pub fn short_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// How long ago `since` was (or `in …` for a time in the future).
pub fn age(since: Millis, now: Millis) -> String {
    if since > now {
        format!("in {}", short_duration(since - now))
    } else {
        short_duration(now - since)
    }
}

/// Shows text with control characters escaped, cut to `max` characters.
pub fn clip(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    jobspool::body::escape_into(bytes, &mut out);
    cut(out, max)
}

/// Cuts text to `max` characters, marking the cut.
pub fn cut(out: String, max: usize) -> String {
    if out.chars().count() > max {
        let mut cut: String = out.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        out
    }
}

/// An argv for display, each argument quoted when it needs to be.
pub fn argv_display(argv: &[std::ffi::OsString]) -> String {
    argv.iter()
        .map(|a| {
            let bytes = a.as_encoded_bytes();
            let plain = !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(b));
            if plain {
                String::from_utf8_lossy(bytes).into_owned()
            } else {
                let mut s = String::new();
                jobspool::body::escape_into(bytes, &mut s);
                format!("'{}'", s.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The command, or else the payload, of a job, for one table cell.
pub fn preview(job: Option<&Job>, max: usize) -> String {
    match job {
        None => String::from("-"),
        Some(j) => match &j.command {
            Some(argv) => cut(argv_display(argv), max),
            None => clip(&j.payload, max),
        },
    }
}

/// Prints rows as left-aligned columns; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let n = cells.len();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i + 1 < n {
                out.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(short_duration(850), "850ms");
        assert_eq!(short_duration(42_000), "42s");
        assert_eq!(short_duration(300_000), "5m");
        assert_eq!(short_duration(3 * 3_600_000), "3h");
        assert_eq!(age(10_000, 4_000), "in 6s");
    }

    #[test]
    fn previews_escape_and_clip() {
        assert_eq!(clip(b"a\nb\tc", 20), "a\\nb\\x09c");
        assert_eq!(clip(b"abcdefgh", 5), "abcd…");
        let argv = vec!["sendmail".into(), "-t".into(), "it's here".into()];
        assert_eq!(argv_display(&argv), "sendmail -t 'it'\\''s here'");
    }
}
