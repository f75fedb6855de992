//! `retina-infer serve`, tested through the real binary on a loopback port: every route, every
//! error answer, slow and abandoned clients, dynamic batching, the load-test client and a
//! SIGTERM drain.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::*;

#[test]
fn routes_answer_like_predict_json() {
    let server = Server::start(&[]);
    let (s, v) = server.get("/healthz");
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = server.get("/readyz");
    assert_eq!((s, v["status"].as_str()), (200, Some("ready")));

    let (s, model) = server.get("/v1/model");
    assert_eq!(s, 200);
    let heads: Vec<&str> = model["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert!(
        heads.contains(&"diagnosis") && heads.contains(&"fluid"),
        "{heads:?}"
    );
    assert!(model["operating_points"]["screening"]["thresholds"]["referable"].is_number());
    assert_eq!(model["default_point"], "screening");
    assert!(model["provenance"].is_object());

    // The answer for a raw body is exactly a line of `predict --json` for the same file.
    let png = std::fs::read(sample(2)).unwrap();
    let (s, answer) = server.post("/v1/predict?name=eye2.png", "image/png", &png);
    assert_eq!(s, 200, "{answer}");
    let cli = Command::new(BIN)
        .args(["predict", "--json", "--backend", "cpu"])
        .arg(sample(2))
        .output()
        .unwrap();
    assert!(cli.status.success());
    let line: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(answer["image"], "eye2.png");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    // The server adds the name clients address the model by.
    let mut served = keys(&answer);
    served.retain(|k| k != "model_name");
    assert_eq!(served, keys(&line));
    assert_eq!(answer["model_name"], "retina");
    assert_eq!(answer["model_version"], line["model_version"]);
    for key in ["diagnosis", "fluid", "vessel_growth"] {
        assert_eq!(keys(&answer[key]), keys(&line[key]), "{key}");
    }
    assert_eq!(answer["diagnosis"]["grade"], line["diagnosis"]["grade"]);
    assert_eq!(
        answer["diagnosis"]["referable"],
        line["diagnosis"]["referable"]
    );
    let (a, b) = (
        answer["diagnosis"]["probabilities"].as_array().unwrap(),
        line["diagnosis"]["probabilities"].as_array().unwrap(),
    );
    for (x, y) in a.iter().zip(b) {
        assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4);
    }
    assert_eq!(answer["operating_point"], "screening");

    // Another operating point, and an unknown one.
    let (s, v) = server.post("/v1/predict?point=confirmation", "image/png", &png);
    assert_eq!(
        (s, v["operating_point"].as_str()),
        (200, Some("confirmation"))
    );
    let (s, v) = server.post("/v1/predict?point=nope", "image/png", &png);
    assert_eq!((s, error_kind(&v)), (400, "unknown_operating_point"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("screening")
    );

    // Multipart: several files, one bad; each answered in order, 200 since some succeeded.
    let other = std::fs::read(sample(1)).unwrap();
    let (ct, body) = multipart(&[
        ("a.png", &png),
        ("notes.txt", b"not an image at all"),
        ("b.png", &other),
    ]);
    let (s, v) = server.post("/v1/predict", &ct, &body);
    assert_eq!(s, 200, "{v}");
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["image"], "a.png");
    assert_eq!(items[0]["diagnosis"]["grade"], answer["diagnosis"]["grade"]);
    assert_eq!(items[1]["image"], "notes.txt");
    assert_eq!(error_kind(&items[1]), "not_an_image");
    assert_eq!(items[2]["image"], "b.png");
    assert!(items[2]["diagnosis"]["grade"].is_u64());

    // Request ids: the client's is echoed, otherwise one is made.
    let (_, _, head) = server.request("GET /healthz HTTP/1.1\r\nX-Request-Id: cam-17-0042", b"");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-request-id: cam-17-0042"),
        "{head}"
    );
    let (_, _, head) = server.request("GET /healthz HTTP/1.1", b"");
    assert!(
        head.to_ascii_lowercase().contains("x-request-id: "),
        "{head}"
    );

    let (s, stats) = server.get("/v1/stats");
    assert_eq!(s, 200);
    assert_eq!(stats["images"], 4, "{stats}");
    assert!(stats["batches"].as_u64().unwrap() >= 1);

    // One structured line per request; names and sizes, never image data.
    let log = server.log_with("request_id=cam-17-0042");
    assert!(log.contains("request_id=cam-17-0042"), "{log}");
    assert!(
        log.contains("path=/v1/predict") && log.contains("status=200"),
        "{log}"
    );
    assert!(
        log.contains("image_sizes=") && log.contains("latency_ms="),
        "{log}"
    );
    assert!(
        !log.contains("not an image at all"),
        "image bytes leaked into the log"
    );
}

#[test]
fn bad_input_gets_a_json_error_and_the_service_survives() {
    let server = Server::start(&["--max-body-mb", "1"]);

    let (s, v) = server.post("/v1/predict", "text/plain", b"hello, this is text");
    assert_eq!((s, error_kind(&v)), (415, "not_an_image"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("JPEG"));

    // A JPEG cut short: a real format, unusable bytes.
    let img = image::RgbImage::from_fn(200, 200, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let (s, v) = server.post("/v1/predict", "image/jpeg", &jpeg[..jpeg.len() / 2]);
    assert_eq!((s, error_kind(&v)), (422, "corrupt"), "{v}");

    let (s, v) = server.post("/v1/predict", "image/png", b"");
    assert_eq!((s, error_kind(&v)), (422, "empty"), "{v}");

    // Over the limit, by declared length: refused before the body is sent ...
    let mut c = TcpStream::connect(&server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        (1 << 20) + 10
    )
    .unwrap();
    let (s, v, _) = read_response(&mut c);
    assert_eq!((s, error_kind(&v)), (413, "too_large"), "{v}");
    // ... and streamed in chunks with no declared length.
    let mut c = TcpStream::connect(&server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![1u8; 64 * 1024];
    for _ in 0..20 {
        if write!(c, "{:x}\r\n", chunk.len()).is_err()
            || c.write_all(&chunk).is_err()
            || c.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let (s, v, _) = read_response(&mut c);
    assert_eq!((s, error_kind(&v)), (413, "too_large"), "{v}");

    let (s, v) = server.get("/v1/predict");
    assert_eq!((s, error_kind(&v)), (405, "method_not_allowed"), "{v}");
    let (_, _, head) = server.request("GET /v1/predict HTTP/1.1", b"");
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
    let (s, v) = server.post("/v1/model", "application/json", b"{}");
    assert_eq!((s, error_kind(&v)), (405, "method_not_allowed"));
    let (s, v) = server.get("/v2/anything");
    assert_eq!((s, error_kind(&v)), (404, "not_found"));

    let (s, v) = server.post(
        "/v1/predict",
        "multipart/form-data; boundary=abc",
        b"--xyz\r\nnot really multipart\r\n",
    );
    assert!(s == 400 || s == 422, "{s} {v}");
    assert!(v["error"]["kind"].is_string());
    let (s, v) = server.post("/v1/predict", "multipart/form-data", b"x");
    assert_eq!((s, error_kind(&v)), (400, "bad_multipart"), "{v}");

    // Still serving, with the errors counted.
    let png = std::fs::read(sample(0)).unwrap();
    let (s, _) = server.post("/v1/predict", "image/png", &png);
    assert_eq!(s, 200);
    let (_, stats) = server.get("/v1/stats");
    assert!(stats["responses"]["4xx"].as_u64().unwrap() >= 9, "{stats}");
    let log = server.log_with("outcome=not_an_image");
    assert!(log.contains("outcome=not_an_image"), "{log}");
}

#[test]
fn slow_and_abandoned_clients_time_out() {
    let server = Server::start(&["--client-timeout-s", "1"]);
    // A body that never finishes: 408 after the timeout.
    let mut c = TcpStream::connect(&server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        c,
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial"
    )
    .unwrap();
    let t0 = Instant::now();
    let (s, v, _) = read_response(&mut c);
    assert_eq!((s, error_kind(&v)), (408, "timeout"), "{v}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    // Headers that never finish: the connection is closed.
    let mut c = TcpStream::connect(&server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "POST /v1/predict HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "slow headers held the connection"
    );

    // A client that hangs up halfway through its body.
    let mut c = TcpStream::connect(&server.addr).unwrap();
    write!(
        c,
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nabc"
    )
    .unwrap();
    drop(c);

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.get("/healthz").0, 200);
    let png = std::fs::read(sample(3)).unwrap();
    assert_eq!(server.post("/v1/predict", "image/png", &png).0, 200);
}

#[test]
fn concurrent_requests_share_batches_and_loadtest_reports() {
    let server = Server::start(&["--max-batch", "8", "--max-wait-ms", "300"]);
    // Different images at once: each answer must be its own image's, as it is alone (a batcher
    // that mixed up the rows of a batch would hand answers to the wrong requests).
    let images: Vec<Arc<Vec<u8>>> = (0..12)
        .map(|i| Arc::new(std::fs::read(sample(i)).unwrap()))
        .collect();
    let alone: Vec<Value> = images
        .iter()
        .map(|png| {
            let (s, v, _) = request_at(&server.addr, "POST /v1/predict HTTP/1.1", png);
            assert_eq!(s, 200, "{v}");
            v
        })
        .collect();
    let (_, before) = server.get("/v1/stats");
    let threads: Vec<_> = (0..16)
        .map(|k| {
            let (addr, png) = (server.addr.clone(), images[k % 12].clone());
            std::thread::spawn(move || request_at(&addr, "POST /v1/predict HTTP/1.1", &png))
        })
        .collect();
    let mut distinct = std::collections::BTreeSet::new();
    for (k, t) in threads.into_iter().enumerate() {
        let (s, v, _) = t.join().unwrap();
        assert_eq!(s, 200, "{v}");
        let (got, want) = (
            v["diagnosis"]["probabilities"].as_array().unwrap(),
            alone[k % 12]["diagnosis"]["probabilities"]
                .as_array()
                .unwrap(),
        );
        for (a, b) in got.iter().zip(want) {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() < 1e-5, "request {k}: {got:?}, alone {want:?}");
        }
        // Every probability at full precision: a confident model answers 1.0000 for most
        // healthy eyes, so one rounded class would not tell the images apart.
        distinct.insert(format!("{got:?}"));
    }
    assert!(
        distinct.len() > 4,
        "the images should differ in their answers: {distinct:?}"
    );
    let (_, after) = server.get("/v1/stats");
    let (b0, b1) = (
        before["batches"].as_u64().unwrap(),
        after["batches"].as_u64().unwrap(),
    );
    assert!(
        b1 - b0 <= 8,
        "16 concurrent requests in {} batches",
        b1 - b0
    );
    let (_, stats) = server.get("/v1/stats");
    assert_eq!(stats["images"], 28);
    assert!(stats["largest_batch"].as_u64().unwrap() <= 8);

    let out = Command::new(BIN)
        .args(["loadtest", "--url", &server.base, "--concurrency", "8"])
        .args(["--requests", "48", "--json"])
        .arg(sample(4))
        .arg(sample(5))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], 48);
    assert_eq!(report["errors"], 0);
    assert!(report["throughput_rps"].as_f64().unwrap() > 0.0);
    let (p50, p99) = (
        report["latency_ms"]["p50"].as_f64().unwrap(),
        report["latency_ms"]["p99"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{report}");
    assert!(
        report["mean_batch_size"].as_f64().unwrap() > 1.0,
        "{report}"
    );

    // Against nothing, the load test says so and fails.
    let out = Command::new(BIN)
        .args(["loadtest", "--url", "http://127.0.0.1:9", "--requests", "1"])
        .arg(sample(4))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `retina-infer serve` running"));
}

#[test]
fn sigterm_drains_in_flight_requests() {
    // A long batching wait keeps the request in flight when the signal arrives.
    let mut server = Server::start(&["--max-batch", "64", "--max-wait-ms", "3000"]);
    let png = std::fs::read(sample(6)).unwrap();
    let addr = server.addr.clone();
    let client = std::thread::spawn(move || request_at(&addr, "POST /v1/predict HTTP/1.1", &png));
    // Well inside the batching wait, so the request is queued when the signal arrives.
    std::thread::sleep(Duration::from_millis(1000));
    // During the drain (the request waits ~2 s more for its batch), new connections are refused.
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server should still be draining"
    );
    assert!(
        TcpStream::connect(&server.addr).is_err(),
        "still accepting connections while draining"
    );
    let status = server.terminate();
    let (s, v, _) = client.join().unwrap();
    assert_eq!(s, 200, "the in-flight request finished: {v}");
    assert!(v["diagnosis"]["grade"].is_u64());
    assert!(status.success(), "clean exit: {status:?}");
    let log = server.log_with("stopped cleanly");
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(TcpStream::connect(&server.addr).is_err(), "still listening");
}

#[test]
fn startup_errors_are_clear() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--model",
            "/nonexistent/bundle",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no model bundle"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["serve", "--addr", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cannot listen on {addr}")));
}

/// `?heatmap=true` adds the photo-size Grad-CAM panel to the answer, as base64 PNG: the
/// photograph twice (256 px samples are shown at their own size) and the strip under them.
#[test]
fn heatmap_query_adds_the_panel() {
    use base64::Engine as _;
    use retina_model::explain::{PANEL_GAP, PANEL_STRIP};
    let server = Server::start(&[]);
    let png = std::fs::read(sample(3)).unwrap();
    let (s, v) = server.post("/v1/predict?heatmap=true", "image/png", &png);
    assert_eq!(s, 200, "{v}");
    let panel = base64::engine::general_purpose::STANDARD
        .decode(v["heatmap_png"].as_str().expect("heatmap_png"))
        .unwrap();
    let img = image::load_from_memory(&panel).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (2 * 256 + PANEL_GAP, 256 + PANEL_STRIP)
    );
    let (s, v) = server.post("/v1/predict", "image/png", &png);
    assert_eq!(s, 200);
    assert!(v.get("heatmap_png").is_none(), "only when asked for");
}

/// A full queue is refused with 503 and `Retry-After`, not queued without bound; bad query
/// strings and a decompression bomb over HTTP get their own errors; the service keeps
/// answering afterwards.
#[test]
fn overflow_bad_queries_and_bombs_over_http() {
    // One image may wait, one forward pass at a time, a long batch window: a burst overflows.
    let server = Server::start(&["--max-batch", "1", "--queue", "1", "--max-wait-ms", "0"]);
    let png = Arc::new(std::fs::read(sample(6)).unwrap());
    let threads: Vec<_> = (0..24)
        .map(|_| {
            let (addr, png) = (server.addr.clone(), png.clone());
            std::thread::spawn(move || request_at(&addr, "POST /v1/predict HTTP/1.1", &png))
        })
        .collect();
    let mut busy = 0;
    for t in threads {
        let (s, v, head) = t.join().unwrap();
        if s == 503 {
            busy += 1;
            assert_eq!(error_kind(&v), "busy", "{v}");
            assert!(
                head.to_ascii_lowercase().contains("retry-after: 1"),
                "{head}"
            );
        } else {
            assert_eq!(s, 200, "{v}");
        }
    }
    assert!(
        busy > 0,
        "24 requests at once into a queue of 1 should overflow"
    );

    let (s, v) = server.post("/v1/predict?heatmap=maybe", "image/png", &png);
    assert_eq!((s, error_kind(&v)), (400, "bad_query"), "{v}");
    let (s, v) = server.post("/v1/predict?point=surgery", "image/png", &png);
    assert_eq!((s, error_kind(&v)), (400, "unknown_operating_point"), "{v}");

    // A 1x1 BMP whose header declares 40000 x 40000 pixels (1.6 gigapixels): refused by its
    // declared size before anything is allocated.
    let mut bmp = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(1, 1)
        .write_to(&mut bmp, image::ImageFormat::Bmp)
        .unwrap();
    let mut bomb = bmp.into_inner();
    bomb[18..22].copy_from_slice(&40_000i32.to_le_bytes());
    bomb[22..26].copy_from_slice(&40_000i32.to_le_bytes());
    let (s, v) = server.post("/v1/predict", "image/bmp", &bomb);
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("40000x40000"),
        "{v}"
    );
    let (s, _) = server.post("/v1/predict", "image/png", &png);
    assert_eq!(s, 200, "the service answers after all of this");
}

/// While the model loads and warms up, the service is live but not ready, and a prediction is
/// told to come back (503 `not_ready` with `Retry-After`), on both protocols. The GPU backend on
/// Mesa's software Vulkan driver takes seconds to warm up (kernel compilation), long enough to
/// ask; without a Vulkan driver the test cannot run (a failure under CI, as for the wgpu tests).
#[test]
fn requests_while_the_model_loads_are_told_to_retry() {
    let server = Server::spawn(&["--backend", "wgpu"]);
    let (s, v) = server.get("/readyz");
    if s == 200 {
        eprintln!("skipped: the model was ready before the first request ({v})");
        return;
    }
    if s == 0 {
        let log = server.log_with("error");
        assert!(
            std::env::var_os("CI").is_none(),
            "no wgpu adapter under CI: {log}"
        );
        eprintln!("skipped: no wgpu adapter here: {log}");
        return;
    }
    assert_eq!((s, v["status"].as_str()), (503, Some("loading")), "{v}");
    let png = std::fs::read(sample(7)).unwrap();
    let (s, v, head) = server.request("POST /v1/predict HTTP/1.1\r\nContent-Type: image/png", &png);
    eprintln!("a prediction while loading: {s}");
    if s == 503 {
        assert_eq!(error_kind(&v), "not_ready", "{v}");
        assert!(
            head.to_ascii_lowercase().contains("retry-after: 1"),
            "{head}"
        );
        let (s, v) = server.get("/v2/health/ready");
        assert!(s == 503 || s == 200, "{s} {v}");
    }
    assert_eq!(server.get("/healthz").0, 200, "live while loading");
    assert_eq!(server.get("/v2/health/live").0, 200, "live while loading");
    let t0 = Instant::now();
    while server.get("/readyz").0 != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "never ready: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (s, v) = server.post("/v1/predict", "image/png", &png);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["backend"], "wgpu");
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

/// What is no fundus photograph is refused over both protocols: no referable decision,
/// `ungradable` with its reason; a photograph beside it is answered as before.
#[test]
fn pictures_that_are_no_fundus_get_no_decision() {
    let server = Server::start(&["--model-name", "eyes"]);
    let white = png(&image::RgbImage::from_pixel(
        300,
        300,
        image::Rgb([255, 255, 255]),
    ));
    let (s, v) = server.post("/v1/predict?name=white.png", "image/png", &white);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["decision"], "ungradable", "{v}");
    assert_eq!(v["quality"]["gradable"], false);
    assert_eq!(v["quality"]["reason"], "not_fundus");
    assert_eq!(v["quality"]["by"], "check");
    assert!(
        v["diagnosis"]["referable"].is_null() && v["diagnosis"]["grade"].is_null(),
        "{v}"
    );
    assert!(
        v["diagnosis"]["referable_probability"].is_number(),
        "kept for audit: {v}"
    );

    let photo = std::fs::read(sample(2)).unwrap();
    let (s, v) = server.post("/v1/predict?name=eye.png", "image/png", &photo);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["quality"]["gradable"], true, "{v}");
    assert!(
        ["refer", "no_refer"].contains(&v["decision"].as_str().unwrap()),
        "{v}"
    );
    assert!(v["diagnosis"]["referable"].is_boolean(), "{v}");

    use base64::Engine as _;
    let data: Vec<String> = [&photo, &white]
        .iter()
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": data}]
    }))
    .unwrap();
    let (s, v) = server.post("/v2/models/eyes/infer", "application/json", &body);
    assert_eq!(s, 200, "{v}");
    let output = |name: &str| {
        v["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("no output {name}: {v}"))["data"]
            .clone()
    };
    assert_eq!(output("gradable"), serde_json::json!([true, false]));
    assert_eq!(
        output("ungradable_reason"),
        serde_json::json!(["", "not_fundus"])
    );
    assert_eq!(
        output("referable")[1],
        false,
        "a withheld decision reads false"
    );
}
