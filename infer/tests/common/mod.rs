//! The server harness shared by the `serve` tests: a running `retina-infer serve` on a loopback
//! port, and raw HTTP/1.1 requests to it.
#![allow(dead_code)] // each test binary uses a subset

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_retina-infer");

pub fn sample(i: usize) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/samples/images")
        .join(format!("synth_{i:05}.png"))
}

/// A running `serve`, stopped (SIGKILL) when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server and returns once it listens, without waiting for the model.
    pub fn spawn(extra: &[&str]) -> Server {
        // The CPU unless the test picks a backend.
        let backend: &[&str] = if extra.contains(&"--backend") {
            &[]
        } else {
            &["--backend", "cpu"]
        };
        let mut child = Command::new(BIN)
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(backend)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start retina-infer serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let addr = base.trim_start_matches("http://").to_string();
        Server {
            child,
            base,
            addr,
            log,
        }
    }

    /// Starts the server and waits until `/readyz` says the model is loaded.
    pub fn start(extra: &[&str]) -> Server {
        let server = Server::spawn(extra);
        let t0 = Instant::now();
        loop {
            let (status, _) = server.get("/readyz");
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "/readyz while loading");
            assert!(t0.elapsed() < Duration::from_secs(120), "never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// A request by hand over one connection: `(status, JSON body, head)`.
    pub fn request(&self, head: &str, body: &[u8]) -> (u16, Value, String) {
        request_at(&self.addr, head, body)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let (s, v, _) = self.request(&format!("GET {path} HTTP/1.1"), b"");
        (s, v)
    }

    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let (s, v, _) = self.request(
            &format!("POST {path} HTTP/1.1\r\nContent-Type: {content_type}"),
            body,
        );
        (s, v)
    }

    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The log once it holds `needle` (the stderr reader runs behind the responses).
    pub fn log_with(&self, needle: &str) -> String {
        let t0 = Instant::now();
        loop {
            let log = self.log();
            if log.contains(needle) || t0.elapsed() > Duration::from_secs(5) {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `head` (request line and extra headers) and `body` to `addr` over a new connection.
pub fn request_at(addr: &str, head: &str, body: &[u8]) -> (u16, Value, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = format!(
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (and close) before it has read the whole body.
    let _ = s.write_all(body);
    read_response(&mut s)
}

/// Reads one HTTP/1.1 response to the end of the connection: status, JSON body, raw head.
pub fn read_response(s: &mut TcpStream) -> (u16, Value, String) {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, json, head.to_string())
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "retina-test-boundary-7d3f";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub fn error_kind(v: &Value) -> &str {
    v["error"]["kind"].as_str().unwrap_or("<none>")
}
