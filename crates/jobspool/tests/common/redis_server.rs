//! A private `redis-server` for one test: a free loopback port, a temp directory, AOF with
//! `appendfsync always` (the setting the no-loss promise needs), killed when dropped.
//!
//! When `redis-server` is not on PATH the test is skipped with a message — unless
//! `JOBSPOOL_REQUIRE_REDIS` is set (CI sets it), in which case it fails.
//!
//! Shared by the library's and the CLI's tests (`#[path]`-included), so it uses only std and nix.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

impl RedisServer {
    /// Starts a server, or returns `None` (after saying why) when the test should be skipped.
    pub fn start() -> Option<RedisServer> {
        if !on_path("redis-server") {
            assert!(
                std::env::var_os("JOBSPOOL_REQUIRE_REDIS").is_none(),
                "redis-server is not on PATH and JOBSPOOL_REQUIRE_REDIS is set: install it (apt-get install redis-server)"
            );
            eprintln!("SKIPPED: redis-server is not on PATH; install it to run the Redis store tests");
            return None;
        }
        // A port another test grabs between our probe and the server's bind makes the server
        // fail at once; try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut s = RedisServer {
                port,
                dir: tempfile::tempdir().unwrap(),
                child: None,
            };
            if s.launch() {
                return Some(s);
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// The directory holding the AOF.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A queue URL on this server.
    pub fn url(&self, queue: &str) -> String {
        format!("redis://127.0.0.1:{}/0?queue={queue}", self.port)
    }

    fn launch(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe. The server dies with the thread that started it
        // (the test), even if the test binary is killed.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("spawning redis-server");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if self.ping() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// True when the server answers PING.
    pub fn ping(&self) -> bool {
        self.command(&["PING"]).is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one command and returns the raw reply (enough for simple replies in tests).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Kills the server at once (no save, no clean shutdown): what survives is the AOF.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and directory (it reloads the AOF).
    pub fn restart(&mut self) {
        self.kill();
        let start = Instant::now();
        while !self.launch() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not restart"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(PathBuf::from(self.dir.path()).join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
