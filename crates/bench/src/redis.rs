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
                    if let Ok(k) = s.read(&mut buf) {
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
