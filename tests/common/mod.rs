//! Support shared by the integration tests, by what it does:
//! - [`paths`]: the project's folders and the labelled sample photos;
//! - [`in_process`]: a real server (real ONNX Runtime, real models, real TCP) started
//!   inside the test process on an ephemeral port, and the test configuration;
//! - [`replica`]: the release binary as separate processes (replicas killed when
//!   dropped, signals, free ports, scratch folders, nginx);
//! - [`http`]: a minimal blocking HTTP/1.1 client and a `reqwest` client.
//!
//! Each test binary uses a different part of it.

#![allow(dead_code, unused_imports)]

pub mod http;
pub mod in_process;
pub mod paths;
pub mod replica;

pub use http::{client, get, raw_class_id, read_json_answer, read_response, request};
pub use in_process::{TestServer, test_config};
pub use paths::{photo, read, root, samples, venv_python};
pub use replica::{Replica, Scratch, find_nginx, free_port};
