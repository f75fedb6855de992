//! The Open Inference Protocol routes, `/metrics` and model reloads of `retina-infer serve`,
//! through the real binary: a stock client of the protocol (Python's tritonclient), hand-written
//! requests for the error answers, and reloads under load.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The Python with tritonclient and prometheus_client that `.ci/run` sets up
/// (`RETINA_TEST_PYTHON`, else `~/.cache/retina/venv`). Without one the test cannot run: under
/// CI that is a failure, elsewhere a skip with the reason.
fn python() -> Option<PathBuf> {
    let candidates = std::env::var_os("RETINA_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/retina/venv/bin/python")),
        );
    for p in candidates {
        let ok = Command::new(&p)
            .args(["-c", "import tritonclient.http, prometheus_client, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(p);
        }
    }
    let why = "no Python with tritonclient[http] and prometheus_client (set RETINA_TEST_PYTHON, \
               or run .ci/run, which makes ~/.cache/retina/venv)";
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    None
}

#[test]
fn a_stock_client_speaks_the_protocol_and_metrics_parse() {
    let Some(py) = python() else { return };
    let server = Server::start(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oip_client.py");
    let out = Command::new(py)
        .arg(script)
        .arg(&server.addr)
        .arg(sample(1))
        .arg(sample(2))
        .arg(sample(3))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("OK"),
        "{stdout}\n{stderr}\nserver log:\n{}",
        server.log()
    );
}

fn infer_body(images: &[&[u8]]) -> Vec<u8> {
    use base64::Engine as _;
    let data: Vec<String> = images
        .iter()
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        .collect();
    serde_json::to_vec(&json!({
        "inputs": [{"name": "image", "shape": [images.len()], "datatype": "BYTES", "data": data}]
    }))
    .unwrap()
}

#[test]
fn protocol_errors_are_the_protocols_error_objects() {
    let server = Server::start(&["--model-name", "eyes"]);
    let png = std::fs::read(sample(1)).unwrap();
    let json_ct = "application/json";
    let (status, v) = server.get("/v2/models/retina");
    assert_eq!(status, 404);
    assert!(
        v["error"].as_str().unwrap().contains("serves `eyes`"),
        "{v}"
    );
    let (status, v) = server.get("/v2/models/eyes");
    assert_eq!(status, 200, "{v}");
    let version = v["versions"][0].as_str().unwrap().to_string();
    let (status, _) = server.get(&format!("/v2/models/eyes/versions/{version}/ready"));
    assert_eq!(status, 200);

    // A JSON request with base64 BYTES is answered, with the model's name and version.
    let (status, v) = server.post("/v2/models/eyes/infer", json_ct, &infer_body(&[&png]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model_name"], "eyes");
    assert_eq!(v["model_version"], version.as_str());
    let names: Vec<&str> = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"diagnosis_probabilities") && names.contains(&"referable"));

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "not valid JSON"),
        (
            serde_json::to_vec(&json!({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]})).unwrap(),
            "one input, `image`",
        ),
        (
            serde_json::to_vec(&json!({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]})).unwrap(),
            "BYTES",
        ),
        (
            serde_json::to_vec(&json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}]})).unwrap(),
            "declares 2 elements but carries 1",
        ),
        (
            serde_json::to_vec(&json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]})).unwrap(),
            "base64",
        ),
        (
            serde_json::to_vec(&json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}], "outputs": [{"name": "grade"}]})).unwrap(),
            "no output `grade`",
        ),
        (
            serde_json::to_vec(&json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}], "parameters": {"operating_point": "surgery"}})).unwrap(),
            "surgery",
        ),
    ];
    for (body, expected) in cases {
        let (status, v) = server.post("/v2/models/eyes/infer", json_ct, &body);
        assert_eq!(status, 400, "{v}");
        let message = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("not the protocol's error: {v}"));
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    // Binary extension with a header length beyond the body.
    let (status, v, _) = server.request(
        "POST /v2/models/eyes/infer HTTP/1.1\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: 999",
        b"{}",
    );
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap().contains(
            "Inference-Header-Content-Length"
                .to_ascii_lowercase()
                .as_str()
        ),
        "{v}"
    );
    // Garbage bytes: 415 as on /v1, in the protocol's form.
    let (status, v) = server.post("/v2/models/eyes/infer", json_ct, &infer_body(&[b"garbage"]));
    assert_eq!(status, 415, "{v}");
    assert!(v["error"].is_string(), "{v}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A reload under load answers every request; a broken bundle on disk is refused and the old
/// model keeps serving; a changed bundle gets a new version in every answer.
#[test]
fn reloads_under_load_lose_no_request_and_refuse_a_broken_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("model");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default-model"),
        &bundle,
    );
    let server = Server::start(&["--model", bundle.to_str().unwrap(), "--max-wait-ms", "2"]);
    let (_, v) = server.get("/v2/models/retina");
    let v1 = v["versions"][0].as_str().unwrap().to_string();
    let png = Arc::new(std::fs::read(sample(2)).unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, png, stop, answered) = (
                server.addr.clone(),
                png.clone(),
                stop.clone(),
                answered.clone(),
            );
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (status, v, _) = request_at(
                        &addr,
                        "POST /v1/predict HTTP/1.1\r\nContent-Type: image/png",
                        &png,
                    );
                    if status == 200 {
                        answered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.push(format!("{status} {v}"));
                    }
                }
                failures
            })
        })
        .collect();
    let pid = server.child.id().to_string();
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(150));
        if i % 2 == 0 {
            assert!(
                Command::new("kill")
                    .args(["-HUP", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
        } else {
            let (status, v) =
                server.post("/v2/repository/models/retina/load", "application/json", b"");
            assert_eq!(status, 200, "{v}");
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "requests lost during reloads: {failures:?}"
    );
    assert!(
        answered.load(Ordering::Relaxed) > 10,
        "too little load to tell"
    );
    assert!(
        server
            .log_with("reloaded")
            .contains("SIGHUP: reloading the model")
    );

    // A broken bundle on disk: refused, the old model keeps answering.
    let weights = bundle.join("weights.safetensors");
    let good = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &good[..good.len() / 3]).unwrap();
    let (status, v) = server.post("/v2/repository/models/retina/load", "application/json", b"");
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("old model keeps serving"),
        "{v}"
    );
    let (status, v) = server.post("/v1/predict", "image/png", &png);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model_version"], v1.as_str());

    // A changed bundle (another default operating point): a new version everywhere.
    std::fs::write(&weights, &good).unwrap();
    let meta_path = bundle.join("model.json");
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["default_point"] = json!("confirmation");
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    let (status, v) = server.post("/v2/repository/models/retina/load", "application/json", b"");
    assert_eq!(status, 200, "{v}");
    let v2 = v["version"].as_str().unwrap().to_string();
    assert_ne!(v2, v1);
    let (_, v) = server.post("/v1/predict", "image/png", &png);
    assert_eq!(
        (v["model_version"].as_str(), v["operating_point"].as_str()),
        (Some(v2.as_str()), Some("confirmation"))
    );

    // The reloads are counted by result.
    let (status, _, head) = server.request("GET /metrics HTTP/1.1", b"");
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let text = metrics_text(&server);
    let count = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    // Three loads through the API and the last one, plus the SIGHUPs (signals sent close
    // together may arrive as one).
    let ok = count("retina_model_reloads_total{result=\"ok\"}");
    assert!((5.0..=7.0).contains(&ok), "{ok} reloads");
    assert!(
        text.contains("retina_model_reloads_total{result=\"refused\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "retina_model{{name=\"retina\",version=\"{v2}\"}} 1"
        )),
        "{text}"
    );
}

fn metrics_text(server: &Server) -> String {
    let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    if raw
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    }
}
