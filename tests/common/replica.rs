//! The release binary as separate processes: replicas that are killed when dropped
//! (even when a test fails), signals sent with `kill`, free ports, scratch folders and
//! the nginx executable.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::http::get;
use super::paths::root;

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

    /// A memory figure of the process from /proc (e.g. "VmHWM:" peak RSS, "VmRSS:"), in MiB.
    pub fn memory_mib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let line =
            status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} for {}", self.name));
        line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) / 1024
    }

    /// The process's open file descriptors.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
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

    /// Polls `/health/live` until it answers 200 (listening; models may still load).
    pub fn wait_live(&mut self, timeout: Duration) {
        let started = Instant::now();
        while !matches!(get(self.addr(), "/health/live"), Ok((200, _))) {
            if let Some(status) = self.try_wait() {
                panic!("{} exited with {status} before it listened:\n{}", self.name, self.stderr());
            }
            assert!(started.elapsed() < timeout, "{} not live after {timeout:?}:\n{}", self.name, self.stderr());
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

/// The nginx executable: on `PATH` or in /usr/sbin (where Debian puts it). `None`
/// when it is not installed.
pub fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin"), PathBuf::from("/usr/local/nginx/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}
