//! A real server (real ONNX Runtime, real models, real TCP) started inside the test
//! process on an ephemeral port, and the configuration tests start it with.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use pandaguard::config::Config;

use super::paths::root;

/// A configuration that reads models from the project and logs little.
pub fn test_config(models: &[&str]) -> Config {
    let mut config = Config::default();
    config.models.dir = root().join("models");
    config.models.load = models.iter().map(|m| m.to_string()).collect();
    config.models.default = models[0].to_string();
    config.server.bind = "127.0.0.1:0".into();
    config.server.drain_delay_ms = 0;
    config
}

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    /// Sending on this (or dropping it) triggers the graceful shutdown.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts `pandaguard`'s HTTP server on its own runtime thread and waits until
    /// `/health/ready` answers 200.
    pub fn start(config: Config) -> TestServer {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let signal = async move {
                    let _ = stop_rx.await;
                    "test"
                };
                if let Err(e) = pandaguard::http::serve_on(config, listener, signal).await {
                    panic!("server failed: {e}");
                }
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30)).expect("server did not bind");
        let server = TestServer { addr, stop: Some(stop_tx), thread: Some(thread) };
        server.wait_ready(Duration::from_secs(120));
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn wait_ready(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(self.addr) {
                use std::io::{Read, Write};
                let _ = stream.write_all(b"GET /health/ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            assert!(started.elapsed() < timeout, "server not ready after {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
