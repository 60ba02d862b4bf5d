//! A throw-away Redis server for the Redis store's workloads: 127.0.0.1, a free port, a temp dir,
//! AOF with `appendfsync always` (the setting the no-loss promise needs), stopped by pid.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub port: u16,
    pub version: String,
}

impl Server {
    pub fn start(dir: &Path) -> Result<Server, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        // Empty: an append-only file left by an earlier run would be loaded first (the server
        // answers `LOADING` meanwhile) and its queues would sit beside this run's.
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("redis.log")).map_err(|e| e.to_string())?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        let mut server = Server {
            child,
            port,
            version: String::new(),
        };
        let t = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                if s.write_all(b"INFO server\r\n").is_ok() {
                    let mut buf = vec![0; 4096];
                    if let Ok(k) = s.read(&mut buf)
                        && k > 0
                        && buf[0] != b'-'
                    {
                        let text = String::from_utf8_lossy(&buf[..k]);
                        server.version = text
                            .lines()
                            .find_map(|l| l.strip_prefix("redis_version:"))
                            .unwrap_or("?")
                            .trim()
                            .to_string();
                        return Ok(server);
                    }
                }
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err("redis-server did not answer within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, queue: &str) -> String {
        format!("redis://127.0.0.1:{}/0?queue={queue}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one command (after `SELECT db`) on a fresh connection and returns its reply as text:
/// enough for `INFO` and `FLUSHDB`.
pub fn command(port: u16, db: u32, args: &[&str]) -> Result<String, String> {
    use std::io::BufRead;
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("redis: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut out = Vec::new();
    for cmd in [
        vec!["SELECT".to_string(), db.to_string()],
        args.iter().map(|a| a.to_string()).collect(),
    ] {
        out.extend_from_slice(format!("*{}\r\n", cmd.len()).as_bytes());
        for a in cmd {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    }
    (&s).write_all(&out).map_err(|e| format!("redis: {e}"))?;
    let mut r = std::io::BufReader::new(&s);
    let mut reply = String::new();
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| format!("redis: {e}"))?;
        let line = line.trim_end();
        reply = match line.as_bytes().first() {
            Some(b'+' | b':') => line[1..].to_string(),
            Some(b'$') => {
                let n: usize = line[1..].parse().map_err(|_| format!("redis: bad reply {line:?}"))?;
                let mut buf = vec![0; n + 2];
                r.read_exact(&mut buf).map_err(|e| format!("redis: {e}"))?;
                String::from_utf8_lossy(&buf[..n]).into_owned()
            }
            _ => return Err(format!("redis: {line}")),
        };
    }
    Ok(reply)
}

/// A field of `INFO` (for example `used_memory`).
pub fn info_field(port: u16, section: &str, field: &str) -> Option<u64> {
    let text = command(port, 0, &["INFO", section]).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (up to 60 s) until the server has no append-only-file rewrite running or scheduled.
/// Filling a backlog doubles the AOF, which starts an automatic rewrite (a fork writing the
/// whole data set while every write still waits for its own fsync): timing claims meanwhile
/// measures the rewrite, not the claims.
pub fn quiet(port: u16) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let busy = ["aof_rewrite_in_progress", "aof_rewrite_scheduled"]
            .iter()
            .any(|f| info_field(port, "persistence", f).unwrap_or(0) != 0);
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The harness's server as seen by item 5.
pub struct Probe(pub u16);

impl crate::work::Server for Probe {
    fn memory(&self) -> Option<u64> {
        quiet(self.0);
        info_field(self.0, "memory", "used_memory")
    }

    fn reset_stats(&self) {
        let _ = command(self.0, 0, &["CONFIG", "RESETSTAT"]);
    }

    fn us_per_script(&self) -> Option<f64> {
        let text = command(self.0, 0, &["INFO", "commandstats"]).ok()?;
        let line = text.lines().find_map(|l| l.strip_prefix("cmdstat_evalsha:"))?;
        line.split(',')
            .find_map(|kv| kv.strip_prefix("usec_per_call="))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// A loopback proxy to the server that counts the requests its clients send, by command (and,
/// for `EVALSHA`, by script: jobspool's transitions are all scripts). Put in front of one
/// process only, it counts that process's requests, which the server's own `INFO commandstats`
/// cannot tell apart from other clients'. Replies pass through untouched.
pub struct CountingProxy {
    pub port: u16,
    counts: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl CountingProxy {
    pub fn start(upstream: u16) -> Result<CountingProxy, String> {
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let counts = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let scripts: Arc<std::collections::HashMap<String, &'static str>> = Arc::new(
            jobspool::store::redis::script_digests()
                .into_iter()
                .map(|(name, sha)| (sha, name))
                .collect(),
        );
        let c = Arc::clone(&counts);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (Ok(mut c_in), Ok(mut s_out), Ok(mut s_in)) =
                    (client.try_clone(), server.try_clone(), server.try_clone())
                else {
                    continue;
                };
                let (counts, scripts) = (Arc::clone(&c), Arc::clone(&scripts));
                std::thread::spawn(move || {
                    let mut pending: Vec<u8> = Vec::new();
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match c_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        let mut used = 0;
                        while let Some((len, name)) = parse_request(&pending[used..], &scripts) {
                            *counts
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(name)
                                .or_insert(0) += 1;
                            used += len;
                        }
                        pending.drain(..used);
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let mut client = client;
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut client);
                    let _ = client.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(CountingProxy { port, counts })
    }

    /// Requests so far, by name (`CLAIM` style for scripts: `evalsha claim`).
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Requests counted between two [`CountingProxy::counts`] snapshots, by name.
pub fn count_delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = after
        .iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// One complete request at the start of `b` (a RESP array of bulk strings, as clients send, or
/// an inline command): its length in bytes and its name. `None` while incomplete.
fn parse_request(b: &[u8], scripts: &std::collections::HashMap<String, &'static str>) -> Option<(usize, String)> {
    fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = b.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
        Some((&b[at..end], end + 2))
    }
    if b.is_empty() {
        return None;
    }
    if b[0] != b'*' {
        let (l, next) = line(b, 0)?;
        let name = String::from_utf8_lossy(l)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_lowercase();
        return Some((next, name));
    }
    let (head, mut at) = line(b, 0)?;
    let n: usize = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
    let mut args: Vec<&[u8]> = Vec::new();
    for _ in 0..n {
        let (h, start) = line(b, at)?;
        let len: usize = std::str::from_utf8(h.get(1..)?).ok()?.parse().ok()?;
        let end = start + len;
        if b.len() < end + 2 {
            return None;
        }
        if args.len() < 2 {
            args.push(&b[start..end]);
        }
        at = end + 2;
    }
    let name = String::from_utf8_lossy(args.first().copied().unwrap_or(b"")).to_lowercase();
    let name = match (name.as_str(), args.get(1)) {
        ("evalsha", Some(sha)) => {
            let sha = String::from_utf8_lossy(sha).to_lowercase();
            format!("evalsha {}", scripts.get(&sha).copied().unwrap_or("(other script)"))
        }
        _ => name,
    };
    Some((at, name))
}
