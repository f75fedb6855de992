//! End to end through the real binaries: generate images, train briefly, predict on the CPU and
//! on the GPU (wgpu; Mesa's software Vulkan driver in CI), and the failure paths users hit.

mod common;

use common::{bin, field, json_lines, run, synth};
use std::process::Command;

const KEYS: [&str; 10] = [
    "image",
    "diagnosis.grade",
    "diagnosis.probabilities",
    "diagnosis.referable",
    "diagnosis.referable_probability",
    "fluid.probability",
    "fluid.present",
    "vessel_growth.amount",
    "backend",
    "model",
];

#[test]
fn predict_json_lines_carry_every_key_and_a_corrupt_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let images = synth(dir.path(), 3);
    std::fs::write(
        images.join("zz_corrupt.png"),
        b"\x89PNG\r\n\x1a\nthis is not really a png",
    )
    .unwrap();
    let out = run(
        "retina-infer",
        &[
            "predict",
            images.to_str().unwrap(),
            "--json",
            "--backend",
            "cpu",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "one unreadable image makes the exit status 1"
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 4);
    for v in &lines[..3] {
        for k in KEYS {
            assert!(!field(v, k).is_null(), "missing {k} in {v}");
        }
        assert!(v["elapsed_ms"].as_f64().unwrap() >= 0.0);
        let p: f64 = v["diagnosis"]["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!((p - 1.0).abs() < 1e-4, "probabilities sum to {p}");
        let grade = v["diagnosis"]["grade"].as_u64().unwrap();
        assert!(grade <= 4);
    }
    let bad = &lines[3];
    assert!(bad["image"].as_str().unwrap().ends_with("zz_corrupt.png"));
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("zz_corrupt.png"),
        "{bad}"
    );
    assert!(bad.get("diagnosis").is_none());
}

#[test]
fn human_output_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let images = synth(dir.path(), 1);
    let file = images.join("synth_00000.png");
    let out = Command::new(bin("retina-infer"))
        .args(["predict", "-", "--backend", "cpu"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in ["diagnosis", "referable", "fluid", "vessel_growth", "ms)"] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    let out = run(
        "retina-infer",
        &["predict", "/no/such/eye.jpg", "--backend", "cpu"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/no/such/eye.jpg"));
}

#[test]
fn unknown_operating_point_and_bad_model_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let images = synth(dir.path(), 1);
    let out = run(
        "retina-infer",
        &[
            "predict",
            images.to_str().unwrap(),
            "--point",
            "surgery",
            "--backend",
            "cpu",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no operating point `surgery`"));
    let out = run(
        "retina-infer",
        &[
            "predict",
            images.to_str().unwrap(),
            "--model",
            dir.path().to_str().unwrap(),
            "--backend",
            "cpu",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no model bundle here"));
}

/// Same grades and probabilities within 1e-3 on the CPU and on wgpu.
#[test]
fn cpu_and_wgpu_predictions_agree() {
    let probe = run(
        "retina-infer",
        &[
            "bench",
            "--preset",
            "small",
            "--image-size",
            "32",
            "--runs",
            "1",
            "--backend",
            "wgpu",
            "--json",
        ],
    );
    if !probe.status.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide a wgpu adapter (software Vulkan)"
        );
        eprintln!("SKIPPED cpu_and_wgpu_predictions_agree: no wgpu adapter");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = synth(dir.path(), 4);
    let cpu = json_lines(&run(
        "retina-infer",
        &[
            "predict",
            images.to_str().unwrap(),
            "--json",
            "--backend",
            "cpu",
        ],
    ));
    let gpu = json_lines(&run(
        "retina-infer",
        &[
            "predict",
            images.to_str().unwrap(),
            "--json",
            "--backend",
            "wgpu",
        ],
    ));
    assert_eq!(gpu[0]["backend"], "wgpu");
    for (a, b) in cpu.iter().zip(&gpu) {
        assert_eq!(a["diagnosis"]["grade"], b["diagnosis"]["grade"]);
        let pa = a["diagnosis"]["probabilities"].as_array().unwrap();
        let pb = b["diagnosis"]["probabilities"].as_array().unwrap();
        for (x, y) in pa.iter().zip(pb) {
            assert!(
                (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-3,
                "{a} vs {b}"
            );
        }
        let (fa, fb) = (
            a["fluid"]["probability"].as_f64().unwrap(),
            b["fluid"]["probability"].as_f64().unwrap(),
        );
        assert!((fa - fb).abs() < 1e-3);
    }
}

#[test]
fn wgpu_without_an_adapter_is_a_clear_message() {
    // Point the Vulkan loader and the EGL (OpenGL) dispatcher at no driver: no adapter exists.
    let out = Command::new(bin("retina-infer"))
        .args([
            "bench",
            "--preset",
            "small",
            "--image-size",
            "32",
            "--runs",
            "1",
            "--backend",
            "wgpu",
        ])
        .env("VK_ICD_FILENAMES", "/nonexistent.json")
        .env("VK_DRIVER_FILES", "/nonexistent.json")
        .env("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent.json")
        .env("__EGL_VENDOR_LIBRARY_DIRS", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no usable GPU adapter for --backend wgpu"),
        "{err}"
    );
    assert!(
        err.contains("--backend cpu"),
        "the message says what to do: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn train_briefly_then_predict_with_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let out = run(
        "retina-train",
        &[
            "fit",
            "--synthetic",
            "24",
            "--synthetic-size",
            "64",
            "--synthetic-grades",
            "0,0,0,1,1",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--out",
            run_dir.to_str().unwrap(),
            "--backend",
            "cpu",
        ],
    );
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["best_epoch"], 1);
    assert!(run_dir.join("model/model.json").is_file());
    let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let epoch: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    for k in ["train_loss", "train_l2", "train_head_loss", "val"] {
        assert!(!epoch[k].is_null(), "{k} missing in {epoch}");
    }
    // How long the step waited for data: measured, and within the epoch.
    let wait = epoch["data_wait_s"].as_f64().expect("data_wait_s");
    assert!(
        wait >= 0.0 && wait <= epoch["seconds"].as_f64().unwrap(),
        "{epoch}"
    );
    // The generated grades follow --synthetic-grades, and the bundle says which mix it saw.
    let labels = std::fs::read_to_string(run_dir.join("synthetic/labels.csv")).unwrap();
    let grades: Vec<&str> = labels
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    assert_eq!(grades.len(), 24);
    assert!(grades.iter().all(|g| *g == "3" || *g == "4"), "{grades:?}");
    assert!(grades.contains(&"3") && grades.contains(&"4"), "{grades:?}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("model/model.json")).unwrap())
            .unwrap();
    let dataset = meta["provenance"]["dataset"].as_str().unwrap();
    assert!(dataset.contains("grades 0-4 0/0/0/50/50 %"), "{dataset}");

    let images = run_dir.join("synthetic/images");
    let out = run(
        "retina-infer",
        &[
            "predict",
            images.to_str().unwrap(),
            "--json",
            "--model",
            run_dir.join("model").to_str().unwrap(),
            "--backend",
            "cpu",
        ],
    );
    assert!(out.status.success());
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 24);
    assert!(lines[0]["model"].as_str().unwrap().ends_with("model"));

    // Starting again into the same run directory is refused with advice.
    let again = run(
        "retina-train",
        &[
            "fit",
            "--synthetic",
            "24",
            "--out",
            run_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(again.status.code(), Some(2), "a fatal error exits 2");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
}

/// The README runs the binaries as `cargo run --bin NAME` from the workspace root, with no `-p`:
/// the root's default members must include every crate (the umbrella package alone has no bins).
#[test]
fn readme_cargo_run_finds_both_binaries() {
    let exe = std::env::current_exe().unwrap();
    if exe.parent().unwrap().parent().unwrap().file_name() != Some("debug".as_ref()) {
        return; // `cargo run` without --release would start a second, dev-profile build.
    }
    bin("retina-train"); // built once, with the workspace's features
    for name in ["retina-train", "retina-infer"] {
        let out = Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["run", "--quiet", "--bin", name, "--", "--version"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo run --bin {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(name));
    }
}

/// `retina-train bench --phases` splits the step into forward, backward and optimizer times that
/// fit inside it; without the flag the JSON has no such field.
#[test]
fn training_bench_reports_the_phases_of_a_step() {
    let args = [
        "bench",
        "--preset",
        "small",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "3",
        "--backend",
        "cpu",
        "--json",
    ];
    let plain = json_lines(&run("retina-train", &args));
    assert!(plain[0].get("phases").is_none(), "{}", plain[0]);
    let with = json_lines(&run("retina-train", &[&args[..], &["--phases"]].concat()));
    let r = &with[0];
    let phase = |k: &str| {
        r["phases"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k}: {r}"))
    };
    let (f, b, o) = (
        phase("forward_s"),
        phase("backward_s"),
        phase("optimizer_s"),
    );
    assert!(f > 0.0 && b > 0.0 && o > 0.0, "{r}");
    // Each is a median of parts of a step, so none exceeds the slowest step.
    let slowest = r["max_step_s"].as_f64().unwrap();
    assert!(f.max(b).max(o) <= slowest, "{r}");
}

#[test]
fn one_bad_argument_does_not_cost_the_others_their_answers() {
    let dir = tempfile::tempdir().unwrap();
    let images = synth(dir.path(), 2);
    let empty = dir.path().join("empty_dir");
    std::fs::create_dir(&empty).unwrap();
    let fifo = dir.path().join("pipe.png");
    let made_fifo = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    let a = images.join("synth_00000.png");
    let b = images.join("synth_00001.png");
    let mut args = vec![
        "predict".to_string(),
        "--json".into(),
        "--backend".into(),
        "cpu".into(),
        a.display().to_string(),
        empty.display().to_string(),
        "/no/such/eye.jpg".into(),
    ];
    if made_fifo {
        args.push(fifo.display().to_string());
    }
    args.push(b.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("retina-infer", &args);
    assert_eq!(out.status.code(), Some(1), "some inputs failed: exit 1");
    let lines = json_lines(&out);
    assert_eq!(
        lines.len(),
        if made_fifo { 5 } else { 4 },
        "a line per argument"
    );
    assert!(lines[0]["diagnosis"]["grade"].is_u64(), "{}", lines[0]);
    assert_eq!(lines[1]["error"]["kind"], "no_images", "{}", lines[1]);
    assert!(lines[2]["error"]["message"].is_string(), "{}", lines[2]);
    if made_fifo {
        assert_eq!(lines[3]["error"]["kind"], "not_a_file", "{}", lines[3]);
    }
    let last = lines.last().unwrap();
    assert!(last["image"].as_str().unwrap().ends_with("synth_00001.png"));
    assert!(last["diagnosis"]["grade"].is_u64(), "{last}");
}

/// `auto` on a machine without a hardware GPU (CI has only Mesa's software Vulkan driver) takes
/// the CPU without starting the wgpu runtime: nothing on stderr but Retina's own words (the GL
/// probe printed `XDG_RUNTIME_DIR` errors).
#[test]
fn auto_without_a_hardware_gpu_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let images = synth(dir.path(), 1);
    let out = Command::new(bin("retina-infer"))
        .args(["predict", images.join("synth_00000.png").to_str().unwrap()])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let backend_line = err.lines().find(|l| l.starts_with("model: ")).unwrap_or("");
    if backend_line.contains("wgpu") {
        return; // a real GPU here: auto rightly took it
    }
    let foreign: Vec<&str> = err.lines().filter(|l| !l.starts_with("model: ")).collect();
    assert!(
        foreign.is_empty(),
        "stderr beyond Retina's own line: {foreign:?}"
    );
}

/// The values of `predict --json`, not only its keys: the grade is the most probable class, the
/// referable probability is the mass of grades 2-4 and the decision is that probability against
/// the threshold printed beside it, likewise for fluid; a refused image has no answers but keeps
/// its probabilities; and the embedded model gets the labelled samples mostly right (when this
/// was written it answered all 12, with 11 referable decisions and 10 grades right: two of the
/// three proliferative eyes, with little new vessel, were called moderate and severe; the
/// closest to a refusal had P(ungradable) 0.21 against a threshold of 0.212).
#[test]
fn predict_json_values_are_consistent_and_mostly_right() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run(
        "retina-infer",
        &[
            "predict",
            "--json",
            "--backend",
            "cpu",
            root.join("assets/samples/images").to_str().unwrap(),
        ],
    );
    let lines = json_lines(&out);
    let labels = std::fs::read_to_string(root.join("assets/samples/labels.csv")).unwrap();
    let truth: std::collections::HashMap<String, usize> = labels
        .lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            let image = f.next().unwrap().rsplit('/').next().unwrap().to_string();
            (image, f.next().unwrap().parse().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), truth.len());
    let (mut grades_right, mut referable_right, mut refused) = (0, 0, 0);
    for v in &lines {
        if field(v, "quality.gradable").as_bool() == Some(false) {
            assert_eq!(v["decision"], "ungradable", "{v}");
            assert!(field(v, "diagnosis.grade").is_null(), "{v}");
            assert!(field(v, "diagnosis.referable").is_null(), "{v}");
            assert!(field(v, "diagnosis.probabilities").is_array(), "{v}");
            refused += 1;
            continue;
        }
        let p: Vec<f64> = field(v, "diagnosis.probabilities")
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{v}");
        let argmax = (0..p.len()).max_by(|a, b| p[*a].total_cmp(&p[*b])).unwrap();
        let grade = field(v, "diagnosis.grade").as_u64().unwrap() as usize;
        assert_eq!(grade, argmax, "{v}");
        let p_ref = field(v, "diagnosis.referable_probability")
            .as_f64()
            .unwrap();
        assert!((p_ref - p[2..].iter().sum::<f64>()).abs() < 1e-5, "{v}");
        let t = field(v, "diagnosis.referable_threshold").as_f64().unwrap();
        assert_eq!(
            field(v, "diagnosis.referable").as_bool(),
            Some(p_ref >= t),
            "{v}"
        );
        let (pf, tf) = (
            field(v, "fluid.probability").as_f64().unwrap(),
            field(v, "fluid.threshold").as_f64().unwrap(),
        );
        assert_eq!(field(v, "fluid.present").as_bool(), Some(pf >= tf), "{v}");
        let image = v["image"].as_str().unwrap().rsplit('/').next().unwrap();
        let g = truth[image];
        grades_right += usize::from(grade == g);
        referable_right += usize::from(field(v, "diagnosis.referable").as_bool() == Some(g >= 2));
    }
    assert!(refused <= 2, "{refused} of 12 good samples refused");
    let answered = lines.len() - refused;
    assert!(
        referable_right + 1 >= answered,
        "{referable_right} of {answered} referable decisions right"
    );
    assert!(
        grades_right + 2 >= answered,
        "{grades_right} of {answered} grades right"
    );
}

/// `eval`, `calibrate`, `export-torch` and `import-torch` through the binary: a calibrated
/// point lands in the bundle and becomes its default; a set with one class cannot be calibrated
/// and says so; exporting to PyTorch's layout and importing back gives a bundle that answers
/// exactly as the original.
#[test]
fn eval_calibrate_and_the_torch_round_trip_through_the_binary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.json", "weights.safetensors"] {
        std::fs::copy(root.join("assets/default-model").join(f), model.join(f)).unwrap();
    }
    let labels = root.join("assets/samples/labels.csv");
    let (m, l) = (model.to_str().unwrap(), labels.to_str().unwrap());

    let report = dir.path().join("report");
    let out = run(
        "retina-train",
        &[
            "eval",
            "--model",
            m,
            "--data",
            l,
            "--out",
            report.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("metrics.json")).unwrap()).unwrap();
    // Every sample is scored: answered, or refused by the quality head (counted, not scored).
    let (n, refused) = (
        metrics["diagnosis"]["n"].as_u64().unwrap(),
        metrics["diagnosis"]["refused"].as_u64().unwrap(),
    );
    assert_eq!(n + refused, 12, "{}", metrics["diagnosis"]);
    assert!(n >= 10, "{}", metrics["diagnosis"]);
    assert!(report.join("report.html").is_file());

    let out = run(
        "retina-train",
        &[
            "calibrate",
            "--model",
            m,
            "--data",
            l,
            "--target",
            "youden",
            "--default",
            "youden",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = retina_model::BundleMetadata::load(&model).unwrap();
    assert_eq!(meta.default_point, "youden");
    assert!(
        meta.operating_points["youden"]
            .thresholds
            .contains_key("referable")
    );

    // Only healthy eyes: no threshold can be chosen for `referable`.
    let healthy = dir.path().join("healthy.csv");
    let image_dir = root.join("assets/samples/images");
    let healthy_text: Vec<String> = std::fs::read_to_string(&labels)
        .unwrap()
        .lines()
        .enumerate()
        .filter(|(i, r)| *i == 0 || r.split(',').nth(1) == Some("0"))
        .map(|(_, r)| r.replacen("images/", &format!("{}/", image_dir.display()), 1))
        .collect();
    assert!(healthy_text.len() >= 3, "{healthy_text:?}");
    let healthy_text = healthy_text.join("\n");
    std::fs::write(&healthy, healthy_text + "\n").unwrap();
    let out = run(
        "retina-train",
        &[
            "calibrate",
            "--model",
            m,
            "--data",
            healthy.to_str().unwrap(),
            "--target",
            "sensitivity=0.9",
            "--name",
            "onlyhealthy",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("referable"), "{err}");
    assert!(
        !retina_model::BundleMetadata::load(&model)
            .unwrap()
            .operating_points
            .contains_key("onlyhealthy"),
        "a failed calibration writes nothing"
    );

    // PyTorch layout and back, with the vessel-growth head pooling by the maximum (the same
    // weights fit it): the weights do not say how a head pools, the file's metadata does, and
    // the imported bundle must pool that way to answer as the original.
    let meta_path = model.join("model.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let heads = meta["config"]["heads"].as_array_mut().unwrap();
    let vessel = heads
        .iter_mut()
        .find(|h| h["name"] == "vessel_growth")
        .unwrap();
    vessel["pooling"] = "max".into();
    std::fs::write(&meta_path, serde_json::to_string_pretty(&meta).unwrap()).unwrap();
    let torch = dir.path().join("torch.safetensors");
    let out = run(
        "retina-train",
        &[
            "export-torch",
            "--model",
            m,
            "--out",
            torch.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = dir.path().join("back");
    let out = run(
        "retina-train",
        &[
            "import-torch",
            "--weights",
            torch.to_str().unwrap(),
            "--preset",
            "small",
            "--out",
            back.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = root.join("assets/samples/images");
    let answers = |bundle: &std::path::Path| {
        json_lines(&run(
            "retina-infer",
            &[
                "predict",
                "--json",
                "--backend",
                "cpu",
                "--model",
                bundle.to_str().unwrap(),
                images.to_str().unwrap(),
            ],
        ))
    };
    let pooling = |bundle: &std::path::Path| {
        retina_model::BundleMetadata::load(bundle)
            .unwrap()
            .config
            .head("vessel_growth")
            .unwrap()
            .pooling
    };
    assert_eq!(pooling(&back), retina_model::Pooling::Max);
    let (a, b) = (answers(&model), answers(&back));
    assert_eq!(a.len(), 12);
    // The PyTorch layout carries weights, not the bundle's fitted temperature: the imported
    // bundle answers at temperature 1, so p^T (renormalised) of the original must equal it.
    let t = retina_model::BundleMetadata::load(&model)
        .unwrap()
        .config
        .head("diagnosis")
        .unwrap()
        .temperature
        .unwrap_or(1.0) as f64;
    let mut both_answered = 0;
    for (x, y) in a.iter().zip(&b) {
        let p: Vec<f64> = field(x, "diagnosis.probabilities")
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap().powf(t))
            .collect();
        let sum: f64 = p.iter().sum();
        let q = field(y, "diagnosis.probabilities");
        for (pi, qi) in p.iter().zip(q.as_array().unwrap()) {
            let qi = qi.as_f64().unwrap();
            assert!((pi / sum - qi).abs() < 1e-5, "{}: {p:?} vs {q}", x["image"]);
        }
        // Nor the quality head's temperature: the two may refuse different images. Where both
        // answer, the vessel-growth amount (no temperature) is the same.
        if field(x, "quality.gradable").as_bool() == Some(true)
            && field(y, "quality.gradable").as_bool() == Some(true)
        {
            both_answered += 1;
            assert_eq!(
                field(x, "vessel_growth.amount"),
                field(y, "vessel_growth.amount")
            );
        }
    }
    assert!(
        both_answered >= 10,
        "{both_answered} of 12 answered by both"
    );
}
