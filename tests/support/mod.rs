//! Support for tests that run the real release binary as separate processes: free
//! ports, replicas that are killed when dropped (even when a test fails), signals
//! sent with `kill`, a minimal blocking HTTP/1.1 client and scratch folders.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port nobody listens on right now (the kernel's pick for port 0).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// A folder under the system temp dir, removed on drop unless the test is failing
/// (then it is kept, and its path printed, for the logs inside it).
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("pandaguard-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Scratch { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `pandaguard serve` on 127.0.0.1:`port`, started from the project folder with
/// `config/default.toml` and the given `PANDAGUARD_*` overrides; stderr goes to a file.
pub struct Replica {
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    pub fn spawn(name: &str, port: u16, env: &[(&str, &str)], log: &Path) -> Replica {
        let stderr = File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_pandaguard"));
        command
            .current_dir(root())
            .args(["serve", "--config", "config/default.toml", "--bind", &format!("127.0.0.1:{port}")])
            .env_remove("ORT_DYLIB_PATH")
            .env("PANDAGUARD_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child =
            command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", env!("CARGO_BIN_EXE_pandaguard")));
        Replica { name: name.to_string(), port, log: log.to_path_buf(), child: Some(child) }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (e.g. "TERM", "INT") with the system's `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `/health/ready` until it answers 200; panics (with the log) if the
    /// process exits first or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = get(self.addr(), "/health/ready") {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!("{} exited with {status} before it was ready:\n{}", self.name, self.stderr());
            }
            assert!(started.elapsed() < timeout, "{} not ready after {timeout:?}:\n{}", self.name, self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); returns the
/// status and the body. Connection errors (refused, reset) are `Err`.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    read_response(&mut stream)
}

pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    request(addr, "GET", path, b"")
}

/// Reads a whole `Connection: close` response: status and body (de-chunked if needed).
pub fn read_response(stream: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// The labelled sample photos (`make setup` copies them): path and ImageNet class.
pub fn samples() -> Vec<(PathBuf, usize)> {
    let dir = root().join("testdata/imagenet");
    let csv = std::fs::read_to_string(dir.join("labels.csv"))
        .expect("testdata/imagenet/labels.csv is missing: run `make setup`");
    csv.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (file, class) = line.split_once(',').expect("file,class_id");
            (dir.join(file), class.trim().parse().expect("class id"))
        })
        .collect()
}

/// `raw.class_id` of a `/classify` answer.
pub fn raw_class_id(body: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value.get("raw")?.get("class_id")?.as_u64()
}

/// The nginx executable: on `PATH` or in /usr/sbin (where Debian puts it). `None`
/// when it is not installed.
pub fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin"), PathBuf::from("/usr/local/nginx/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}
