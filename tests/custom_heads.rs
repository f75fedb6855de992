//! Heads are data, end to end: a config with two heads no code knows about — a regression
//! `cup_disc_ratio` on stage 3 and a binary `laser_scars` on the embedding, labelled in extra
//! CSV columns — trains, evaluates, calibrates, predicts (human and JSON) and serves through
//! the real binaries.

mod common;

use common::{bin, json_lines, run, run_in, synth};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TRAIN_TOML: &str = r#"
epochs = 2
batch_size = 8
select_metric = "laser_scars.auc"

[model]
preset = "small"
image_size = 48

[[model.heads]]
name = "diagnosis"
kind = { multiclass = 5 }
classes = ["none", "mild", "moderate", "severe", "proliferative"]
decision = { name = "referable", from_class = 2 }
answer_key = "grade"

[[model.heads]]
name = "cup_disc_ratio"
kind = "regression"
attach = "stage3"
range = [0.1, 0.9]
answer_key = "ratio"

[[model.heads]]
name = "laser_scars"
kind = "binary"
hidden = 8

[data]
val_fraction = 0.25
augment = false
"#;

/// Rewrites the generated `labels.csv` (image,diagnosis,vessel_growth,fluid) into one with the
/// two new heads' columns: a ratio that follows the grade and scars on every third eye, with
/// some labels left blank (missing).
fn relabel(dir: &Path) {
    let path = dir.join("labels.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::from("image,diagnosis,cup_disc_ratio,laser_scars\n");
    for (i, line) in text.lines().skip(1).enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let grade: f32 = f[1].parse().unwrap();
        let ratio = if i % 7 == 3 {
            String::new()
        } else {
            format!("{:.2}", 0.2 + 0.15 * grade)
        };
        let scars = if i % 5 == 4 {
            ""
        } else if i % 3 == 0 {
            "1"
        } else {
            "0"
        };
        out.push_str(&format!("{},{},{ratio},{scars}\n", f[0], f[1]));
    }
    std::fs::write(&path, out).unwrap();
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One HTTP/1.1 exchange over a fresh connection: the request line, `body` (with its length)
/// and `Connection: close`; answers the status and the JSON body.
fn exchange(addr: &str, request_line: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{request_line}\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn post_image(addr: &str, png: &[u8]) -> (u16, Value) {
    exchange(addr, "POST /v1/predict HTTP/1.1", "image/png", png)
}

fn get(addr: &str, path: &str) -> (u16, Value) {
    exchange(addr, &format!("GET {path} HTTP/1.1"), "text/plain", b"")
}

/// Checks one answer's new heads: a ratio inside the head's range under its answer key, a
/// scar probability with its decision and threshold.
fn check_answer(v: &Value) {
    let ratio = v["cup_disc_ratio"]["ratio"]
        .as_f64()
        .unwrap_or_else(|| panic!("no cup_disc_ratio.ratio in {v}"));
    assert!(
        (0.1..=0.9).contains(&ratio),
        "clamped into the range: {ratio}"
    );
    let p = v["laser_scars"]["probability"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{v}");
    assert!(v["laser_scars"]["present"].is_boolean(), "{v}");
    assert!(v["laser_scars"]["threshold"].is_number(), "{v}");
    assert!(v["diagnosis"]["grade"].as_u64().unwrap() <= 4, "{v}");
    assert!(v["diagnosis"]["referable_probability"].is_number(), "{v}");
    assert!(
        v.get("fluid").is_none() && v.get("vessel_growth").is_none(),
        "{v}"
    );
}

#[test]
fn a_head_no_code_knows_trains_evaluates_predicts_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let images = synth(&data, 24);
    relabel(&data);
    let labels = data.join("labels.csv");
    let config = dir.path().join("train.toml");
    std::fs::write(&config, TRAIN_TOML).unwrap();
    let run_dir = dir.path().join("run");
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // Train, started outside any repository: the provenance still names the code's revision.
    let out = run_in(
        dir.path(),
        "retina-train",
        &[
            "fit",
            "--data",
            &s(&labels),
            "--config",
            &s(&config),
            "--out",
            &s(&run_dir),
        ],
    );
    assert!(out.status.success(), "fit failed");
    let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    for k in [
        "cup_disc_ratio.mae",
        "laser_scars.sensitivity",
        "diagnosis.quadratic_kappa",
    ] {
        assert!(last["val"][k].is_number(), "validation logs {k}: {last}");
    }
    assert!(
        last["train_head_loss"]["cup_disc_ratio"].is_number(),
        "{last}"
    );
    assert!(last["train_head_loss"]["laser_scars"].is_number(), "{last}");
    let model = run_dir.join("model");
    let built_from = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(rev) = built_from {
        let meta: Value = read_json(&model.join("model.json"));
        assert_eq!(meta["provenance"]["git_revision"], rev.as_str(), "{meta}");
    }

    // Evaluate.
    let eval_dir = dir.path().join("eval");
    let out = run(
        "retina-train",
        &[
            "eval",
            "--model",
            &s(&model),
            "--data",
            &s(&labels),
            "--out",
            &s(&eval_dir),
        ],
    );
    assert!(out.status.success(), "eval failed");
    let m: Value = read_json(&eval_dir.join("metrics.json"));
    assert!(m["cup_disc_ratio"]["mae"].is_number(), "{m}");
    assert_eq!(m["cup_disc_ratio"]["missing"], 3, "{m}"); // rows 3, 10 and 17 are blank
    assert!(m["laser_scars"]["sensitivity"].is_number(), "{m}");
    assert_eq!(m["laser_scars"]["missing"], 4, "{m}");
    let report = std::fs::read_to_string(eval_dir.join("report.md")).unwrap();
    assert!(report.contains("## cup_disc_ratio (regression"), "{report}");
    assert!(report.contains("### laser_scars"), "{report}");

    // Calibrate: the new binary head gets a threshold of its own.
    let out = run(
        "retina-train",
        &[
            "calibrate",
            "--model",
            &s(&model),
            "--data",
            &s(&labels),
            "--target",
            "youden",
        ],
    );
    assert!(out.status.success(), "calibrate failed");
    // An explicit default, and a point the bundle lacks refused with the ones it has.
    let out = run(
        "retina-train",
        &[
            "calibrate",
            "--model",
            &s(&model),
            "--data",
            &s(&labels),
            "--target",
            "sensitivity=0.9",
            "--default",
            "nope",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no operating point `nope`") && err.contains("youden"),
        "{err}"
    );
    let unchanged: Value = read_json(&model.join("model.json"));
    assert!(
        unchanged["operating_points"].get("screening").is_none(),
        "nothing written"
    );
    let meta: Value = read_json(&model.join("model.json"));
    assert!(
        meta["operating_points"]["youden"]["thresholds"]["laser_scars"].is_number(),
        "{meta}"
    );
    // The first calibrated point of a bundle that had only the 0.5 one becomes its default.
    assert_eq!(meta["default_point"], "youden", "{meta}");

    // Predict: JSON and human.
    let out = run(
        "retina-infer",
        &[
            "predict",
            &s(&images),
            "--model",
            &s(&model),
            "--json",
            "--backend",
            "cpu",
        ],
    );
    assert!(out.status.success());
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 24);
    lines.iter().for_each(check_answer);
    assert!(lines.iter().all(|v| v["operating_point"] == "youden"));
    let out = run(
        "retina-infer",
        &[
            "predict",
            &s(&images.join("synth_00000.png")),
            "--model",
            &s(&model),
            "--backend",
            "cpu",
        ],
    );
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in ["diagnosis", "referable", "cup_disc_ratio", "laser_scars"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(want)),
            "no `{want}` line in:\n{text}"
        );
    }

    // Serve.
    let mut child = Command::new(bin("retina-infer"))
        .args(["serve", "--addr", "127.0.0.1:0", "--backend", "cpu"])
        .args(["--model", &s(&model)])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let t0 = Instant::now();
    while get(&addr, "/readyz").0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(120), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, info) = get(&addr, "/v1/model");
    assert_eq!(status, 200);
    let heads: Vec<&str> = info["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(heads, ["diagnosis", "cup_disc_ratio", "laser_scars"]);
    let png = std::fs::read(images.join("synth_00001.png")).unwrap();
    let (status, v) = post_image(&addr, &png);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{v}");
    check_answer(&v);
}
