//! The job body format, version 1: a text header a person can read with `head`, then the payload
//! bytes as they were given.
//!
//! ```text
//! JOBSPOOL 1
//! id 01936f0e-8a4c-7d2e-9b1a-5f3c2d1e0a9b
//! created 1732350000123
//! priority 0
//! run-at 1732350000123
//! max-attempts 5            (only when the job set it)
//! timeout-ms 30000          (only when the job set it)
//! arg /usr/bin/sendmail     (one line per argv element, only for command jobs)
//! arg -t
//! payload 11
//! crc32c 1a2b3c4d
//!
//! hello world
//! ```
//!
//! Every header line is `key SP value LF`, in this order. `arg` values escape `\` as `\\`, LF as
//! `\n`, and any other control byte or byte that is not UTF-8 as `\xHH`, so an argv round-trips
//! byte for byte. The `crc32c` line holds the CRC-32C of every byte before it and of the payload;
//! the file ends exactly where the payload ends. A body is written once and never modified: the
//! job's changing state lives in the store (the file name, or Redis fields), not here.
//!
//! Decoding is strict: anything else (a different first line, an unknown key, a key out of
//! order, a length that does not match, a wrong checksum) is a [`Corrupt`] error naming why, and
//! the store quarantines the file instead of running it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::time::Duration;

use crate::job::{Job, JobId, MAX_PAYLOAD, MAX_PRIORITY, MIN_PRIORITY};

/// The first line of every version-1 body.
pub const MAGIC: &[u8] = b"JOBSPOOL ";
/// The body format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest header accepted (argv can be long, but not unbounded).
pub const MAX_HEADER: usize = 4 << 20;

/// Why a body is not a valid job. `code()` is a short token used in quarantine file names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// Zero bytes.
    #[error("empty file")]
    Empty,
    /// Does not start with `JOBSPOOL `.
    #[error("not a jobspool job (bad magic)")]
    BadMagic,
    /// A version this build does not know.
    #[error("unsupported body version {0}")]
    UnknownVersion(String),
    /// Ends before the header or payload is complete.
    #[error("truncated: {0}")]
    Truncated(String),
    /// A header line that is not what version 1 allows at that place.
    #[error("bad header: {0}")]
    BadHeader(String),
    /// The checksum does not match the content.
    #[error("checksum mismatch: header says {stored:08x}, content has {actual:08x}")]
    BadChecksum {
        /// The checksum written in the header.
        stored: u32,
        /// The checksum of the bytes found.
        actual: u32,
    },
    /// Bytes after the payload.
    #[error("{0} unexpected bytes after the payload")]
    TrailingBytes(usize),
    /// Bigger than the limits.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The body's id is not the id its name or key says.
    #[error("id {body} in the body does not match {name} in its name")]
    IdMismatch {
        /// Id in the body.
        body: String,
        /// Id in the name.
        name: String,
    },
}

impl Corrupt {
    /// A short, file-name-safe token for the reason.
    pub fn code(&self) -> &'static str {
        match self {
            Corrupt::Empty => "empty",
            Corrupt::BadMagic => "bad-magic",
            Corrupt::UnknownVersion(_) => "bad-version",
            Corrupt::Truncated(_) => "truncated",
            Corrupt::BadHeader(_) => "bad-header",
            Corrupt::BadChecksum { .. } => "bad-checksum",
            Corrupt::TrailingBytes(_) => "trailing-bytes",
            Corrupt::TooLarge(_) => "too-large",
            Corrupt::IdMismatch { .. } => "id-mismatch",
        }
    }
}

/// Encodes a job as a version-1 body.
pub fn encode(job: &Job) -> Vec<u8> {
    let mut head = String::with_capacity(160);
    let _ = writeln!(head, "JOBSPOOL {VERSION}");
    let _ = writeln!(head, "id {}", job.id);
    let _ = writeln!(head, "created {}", job.created);
    let _ = writeln!(head, "priority {}", job.priority);
    let _ = writeln!(head, "run-at {}", job.run_at);
    if let Some(n) = job.max_attempts {
        let _ = writeln!(head, "max-attempts {n}");
    }
    if let Some(t) = job.timeout {
        let _ = writeln!(head, "timeout-ms {}", t.as_millis());
    }
    for arg in job.command.iter().flatten() {
        head.push_str("arg ");
        escape_into(arg.as_bytes(), &mut head);
        head.push('\n');
    }
    let _ = writeln!(head, "payload {}", job.payload.len());
    let crc = crc32c::crc32c_append(crc32c::crc32c(head.as_bytes()), &job.payload);
    let _ = write!(head, "crc32c {crc:08x}\n\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&job.payload);
    out
}

/// Decodes a version-1 body.
pub fn decode(bytes: &[u8]) -> Result<Job, Corrupt> {
    if bytes.is_empty() {
        return Err(Corrupt::Empty);
    }
    let head = &bytes[..bytes.len().min(MAGIC.len())];
    if head != &MAGIC[..head.len()] {
        return Err(Corrupt::BadMagic);
    }
    let mut r = Reader { bytes, pos: 0 };
    let first = r.line()?;
    let version = first.strip_prefix(MAGIC).ok_or(Corrupt::BadMagic)?;
    if version != b"1" {
        return Err(Corrupt::UnknownVersion(
            String::from_utf8_lossy(&version[..version.len().min(20)]).into_owned(),
        ));
    }
    let id_text = r.field("id")?;
    let id = std::str::from_utf8(id_text)
        .ok()
        .filter(|s| JobId::check(s).is_ok())
        .ok_or_else(|| Corrupt::BadHeader("invalid id".into()))?;
    let created = r.number("created")?;
    let priority: i64 = parse_int(r.field("priority")?, "priority")?;
    if !(i64::from(MIN_PRIORITY)..=i64::from(MAX_PRIORITY)).contains(&priority) {
        return Err(Corrupt::BadHeader(format!("priority {priority} out of range")));
    }
    let run_at = r.number("run-at")?;
    let mut max_attempts = None;
    let mut timeout = None;
    let mut command: Vec<OsString> = Vec::new();
    let mut key = r.key()?;
    if key == b"max-attempts" {
        let n = r.value_number("max-attempts")?;
        if n == 0 || n > u64::from(u32::MAX) {
            return Err(Corrupt::BadHeader("max-attempts out of range".into()));
        }
        max_attempts = Some(n as u32);
        key = r.key()?;
    }
    if key == b"timeout-ms" {
        let n = r.value_number("timeout-ms")?;
        if n == 0 {
            return Err(Corrupt::BadHeader("timeout-ms is 0".into()));
        }
        timeout = Some(Duration::from_millis(n));
        key = r.key()?;
    }
    while key == b"arg" {
        let raw = r.line()?;
        command.push(OsString::from_vec(unescape(raw)?));
        key = r.key()?;
    }
    if key != b"payload" {
        return Err(Corrupt::BadHeader(format!(
            "unexpected key {:?}",
            String::from_utf8_lossy(&key[..key.len().min(40)])
        )));
    }
    let len = r.value_number("payload")?;
    if len > MAX_PAYLOAD as u64 {
        return Err(Corrupt::TooLarge(format!("payload of {len} bytes")));
    }
    let covered_end = r.pos;
    let crc_text = r.field("crc32c")?;
    if crc_text.len() != 8 || !crc_text.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Corrupt::BadHeader("crc32c is not 8 lowercase hex digits".into()));
    }
    let stored = std::str::from_utf8(crc_text)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or_else(|| Corrupt::BadHeader("crc32c is not 8 hex digits".into()))?;
    let blank = r.line()?;
    if !blank.is_empty() {
        return Err(Corrupt::BadHeader("no blank line after the header".into()));
    }
    let payload_start = r.pos;
    let available = bytes.len() - payload_start;
    let len = len as usize;
    if available < len {
        return Err(Corrupt::Truncated(format!("payload has {available} of {len} bytes")));
    }
    if available > len {
        return Err(Corrupt::TrailingBytes(available - len));
    }
    let payload = &bytes[payload_start..];
    let actual = crc32c::crc32c_append(crc32c::crc32c(&bytes[..covered_end]), payload);
    if actual != stored {
        return Err(Corrupt::BadChecksum { stored, actual });
    }
    Ok(Job {
        id: JobId::new(id).expect("checked above"),
        created,
        priority: priority as i16,
        run_at,
        max_attempts,
        timeout,
        command: if command.is_empty() { None } else { Some(command) },
        payload: payload.to_vec(),
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// The next line, without its LF.
    fn line(&mut self) -> Result<&'a [u8], Corrupt> {
        let rest = &self.bytes[self.pos..];
        let limit = rest.len().min(MAX_HEADER.saturating_sub(self.pos));
        match rest[..limit].iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None if limit < rest.len() || self.pos >= MAX_HEADER => {
                Err(Corrupt::TooLarge("header longer than 4 MiB".into()))
            }
            None => Err(Corrupt::Truncated("header ends mid-line".into())),
        }
    }

    /// The next key, leaving the position at its value.
    fn key(&mut self) -> Result<&'a [u8], Corrupt> {
        let rest = &self.bytes[self.pos..];
        let end = rest.len().min(64);
        match rest[..end].iter().position(|&b| b == b' ' || b == b'\n') {
            Some(n) if rest[n] == b' ' => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            Some(_) => Err(Corrupt::BadHeader("header line without a value".into())),
            None if end < 64 => Err(Corrupt::Truncated("header ends mid-line".into())),
            None => Err(Corrupt::BadHeader("header key too long".into())),
        }
    }

    fn field(&mut self, want: &str) -> Result<&'a [u8], Corrupt> {
        let key = self.key()?;
        if key != want.as_bytes() {
            return Err(Corrupt::BadHeader(format!(
                "expected {want}, found {:?}",
                String::from_utf8_lossy(key)
            )));
        }
        self.line()
    }

    fn number(&mut self, want: &str) -> Result<u64, Corrupt> {
        let text = self.field(want)?;
        parse_int(text, want)
    }

    fn value_number(&mut self, what: &str) -> Result<u64, Corrupt> {
        let text = self.line()?;
        parse_int(text, what)
    }
}

fn parse_int<T: std::str::FromStr>(text: &[u8], what: &str) -> Result<T, Corrupt> {
    let s = std::str::from_utf8(text).map_err(|_| Corrupt::BadHeader(format!("{what} is not a number")))?;
    // Canonical form only: no sign on unsigned values, no leading zeros, no spaces.
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || (digits.len() > 1 && digits.starts_with('0'))
    {
        return Err(Corrupt::BadHeader(format!("{what} is not a number")));
    }
    s.parse()
        .map_err(|_| Corrupt::BadHeader(format!("{what} is out of range")))
}

/// Escapes bytes so they fit on one header line and round-trip exactly.
pub fn escape_into(bytes: &[u8], out: &mut String) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

fn unescape(raw: &[u8]) -> Result<Vec<u8>, Corrupt> {
    let bad = || Corrupt::BadHeader("bad escape in arg".into());
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        match raw.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'n') => {
                out.push(b'\n');
                i += 2;
            }
            Some(b'x') => {
                let hex = raw.get(i + 2..i + 4).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 4;
            }
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn sample() -> Job {
        Job {
            id: JobId::new("mail-1").unwrap(),
            created: 1_732_350_000_123,
            priority: -5,
            run_at: 1_732_350_001_000,
            max_attempts: Some(3),
            timeout: Some(Duration::from_secs(30)),
            command: Some(vec![
                OsString::from("/bin/echo"),
                OsString::from("it's \"quoted\"\nand\\slashed"),
                OsString::from_vec(vec![0xff, 0x00, b'a', 0x1b]),
                OsString::from("héllo"),
            ]),
            payload: b"line1\nline2\0\xff".to_vec(),
        }
    }

    #[test]
    fn round_trips_every_field() {
        let job = sample();
        assert_eq!(decode(&encode(&job)).unwrap(), job);
        let plain = Job {
            max_attempts: None,
            timeout: None,
            command: None,
            payload: vec![],
            ..sample()
        };
        assert_eq!(decode(&encode(&plain)).unwrap(), plain);
    }

    #[test]
    fn header_is_readable_text() {
        let body = encode(&sample());
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("JOBSPOOL 1\nid mail-1\ncreated 1732350000123\npriority -5\n"));
        assert!(text.contains("arg it's \"quoted\"\\nand\\\\slashed\n"));
        assert!(text.contains("arg \\xff\\x00a\\x1b\n"));
        assert!(text.contains("arg héllo\n"));
    }

    #[test]
    fn every_truncation_is_detected() {
        let body = encode(&sample());
        for len in 0..body.len() {
            assert!(decode(&body[..len]).is_err(), "truncated to {len} bytes was accepted");
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let body = encode(&sample());
        for i in 0..body.len() {
            for bit in 0..8 {
                let mut b = body.clone();
                b[i] ^= 1 << bit;
                assert!(decode(&b).is_err(), "flip of bit {bit} at byte {i} was accepted");
            }
        }
    }

    #[test]
    fn reasons_are_specific() {
        let body = encode(&sample());
        assert_eq!(decode(b""), Err(Corrupt::Empty));
        assert_eq!(decode(b"GARBAGE\n"), Err(Corrupt::BadMagic));
        assert!(matches!(decode(b"JOBSPOOL 2\n"), Err(Corrupt::UnknownVersion(v)) if v == "2"));
        let mut extra = body.clone();
        extra.extend_from_slice(b"xx");
        assert_eq!(decode(&extra), Err(Corrupt::TrailingBytes(2)));
        let mut flipped = body.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&flipped), Err(Corrupt::BadChecksum { .. })));
        assert!(matches!(decode(&body[..body.len() - 1]), Err(Corrupt::Truncated(_))));
    }
}
