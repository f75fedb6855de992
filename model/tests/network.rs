//! The network, bundles and backends, on small inputs (32 px) so the suite stays fast.

mod common;

use retina_model::bundle::{BUNDLE_FORMAT_VERSION, METADATA_FILE, WEIGHTS_FILE};
use retina_model::burn::prelude::*;
use retina_model::*;
use std::path::Path;

fn small(size: usize) -> RetinaConfig {
    let mut c = RetinaConfig::preset("small").unwrap();
    c.preprocess.image_size = size;
    c
}

fn input(n: usize, size: usize, seed: u64, device: &Device) -> Tensor<4> {
    let data = common::lcg_values(n * 3 * size * size, seed);
    Tensor::from_data(TensorData::new(data, [n, 3, size, size]), device)
}

fn host(t: &Tensor<2>) -> Vec<f32> {
    t.clone().into_data().try_into_vec_as::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_head_kind_at_every_attach_point_has_the_right_shape() {
    let device = Device::flex();
    let base = small(32);
    let stages = base.trunk.stages.len();
    let mut heads = Vec::new();
    for k in 1..=stages {
        for (kind, tag) in [
            (HeadKind::Multiclass(5), "m"),
            (HeadKind::Binary, "b"),
            (HeadKind::Regression, "r"),
        ] {
            heads.push(
                HeadSpec::new(format!("{tag}{k}"), kind)
                    .with_attach(AttachPoint::Stage(k))
                    .with_hidden((k % 2 == 0).then_some(8)),
            );
        }
    }
    heads.push(HeadSpec::new("emb".into(), HeadKind::Multiclass(3)));
    let mut config = base.clone();
    config.heads = heads;
    let net = config.init(&device).unwrap();
    let out = net.forward(input(2, 32, 1, &device));
    assert_eq!(out.heads.len(), config.heads.len());
    for (spec, t) in config.heads.iter().zip(&out.heads) {
        assert_eq!(
            t.dims(),
            [2, spec.kind.output_width()],
            "head {}",
            spec.name
        );
    }
    // The embeddings of every stage are returned, with the stage's width.
    assert_eq!(out.embeddings.len(), stages);
    for (k, e) in out.embeddings.iter().enumerate() {
        assert_eq!(e.dims(), [2, base.trunk.stages[k].width]);
    }
    assert_eq!(out.head("emb").unwrap().dims(), [2, 3]);
}

/// Heads that pool by the maximum, on the trunk's fast channels-last path, answer as the
/// plain NCHW computation (the stage's feature map, pooled as the spec says) and as NdArray
/// (burn's own operations): the right stage's maximum reaches the right head, `[average, max]`
/// in that order.
#[test]
fn max_pooling_heads_read_their_own_stage_on_every_path() {
    let mut config = small(32);
    config.heads = vec![
        HeadSpec::new("avg".into(), HeadKind::Multiclass(3)),
        HeadSpec::new("both".into(), HeadKind::Multiclass(3)).with_pooling(Pooling::AverageMax),
        HeadSpec::new("max2".into(), HeadKind::Regression)
            .with_attach(AttachPoint::Stage(2))
            .with_pooling(Pooling::Max),
        HeadSpec::new("both3".into(), HeadKind::Binary)
            .with_attach(AttachPoint::Stage(3))
            .with_pooling(Pooling::AverageMax)
            .with_hidden(Some(4)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let flex = BackendChoice::Flex.select().unwrap().device;
    let net = config.init(&flex).unwrap();
    let out = net.forward(input(3, 32, 4, &flex));
    for (i, spec) in config.heads.iter().enumerate() {
        let map = net.feature_map(input(3, 32, 4, &flex), i);
        let plain = host(&net.head_from_feature_map(i, map));
        let d = max_abs_diff(&host(&out.heads[i]), &plain);
        assert!(
            d < 1e-4,
            "head {}: fast path and feature map differ by {d}",
            spec.name
        );
    }
    // The average-max head's input is twice its stage's width.
    let path = dir.path().join("bundle");
    ModelBundle::new(net, BundleMetadata::new(config.clone()))
        .save(&path)
        .unwrap();
    let nd = BackendChoice::Ndarray.select().unwrap().device;
    let other = ModelBundle::load(&path, &nd).unwrap();
    assert_eq!(other.metadata.config.heads[1].pooling, Pooling::AverageMax);
    assert_eq!(other.model.heads[1].out.weight.dims(), [2 * 64, 3]);
    let theirs = other.model.forward(input(3, 32, 4, &nd));
    for (i, spec) in config.heads.iter().enumerate() {
        let d = max_abs_diff(&host(&out.heads[i]), &host(&theirs.heads[i]));
        assert!(
            d < 1e-4,
            "head {}: flex and ndarray differ by {d}",
            spec.name
        );
    }
    // Swapping the maximum for the average changes the answer (the test sees the difference).
    let mut avg = config.clone();
    avg.heads[2].pooling = Pooling::Average;
    let mut swapped = avg.init(&flex).unwrap();
    swapped = swapped.load_record(ModelBundle::load(&path, &flex).unwrap().model.into_record());
    let d = max_abs_diff(
        &host(&swapped.forward(input(3, 32, 4, &flex)).heads[2]),
        &host(&out.heads[2]),
    );
    assert!(d > 1e-3, "average and maximum gave the same answer ({d})");
}

#[test]
fn early_heads_do_not_run_the_deep_stages() {
    let device = Device::flex();
    let mut config = small(32);
    config.heads =
        vec![HeadSpec::new("early".into(), HeadKind::Binary).with_attach(AttachPoint::Stage(2))];
    let out = config
        .init(&device)
        .unwrap()
        .forward(input(1, 32, 2, &device));
    assert_eq!(out.embeddings.len(), 2);
}

#[test]
fn unknown_stage_fails_at_init_with_a_clear_message() {
    let mut config = small(32);
    config.heads[2].attach = AttachPoint::Stage(9);
    let err = config.init(&Device::flex()).unwrap_err().to_string();
    assert!(
        err.contains("vessel_growth") && err.contains("stage9") && err.contains("stage4"),
        "{err}"
    );
}

#[test]
fn reference_preset_matches_the_pytorch_parameter_count() {
    // shared/peer/model.py: 1,228,103 parameters (buffers such as running stats excluded).
    let mut config = RetinaConfig::preset("reference").unwrap();
    config.heads = HeadSpec::clinical_heads();
    assert_eq!(
        config.init(&Device::flex()).unwrap().parameter_count(),
        1_228_103
    );
    // The quality head: Linear(256 -> 7).
    let full = RetinaConfig::preset("reference").unwrap();
    assert_eq!(
        full.init(&Device::flex()).unwrap().parameter_count(),
        1_228_103 + 256 * 7 + 7
    );
}

#[test]
fn l2_term_is_the_sum_of_squared_parameters() {
    let device = Device::flex();
    let net = small(32).init(&device).unwrap();
    let l2: f32 = net.l2_sum_of_squares().into_scalar::<f32>();
    // Recompute from the exported tensors, skipping the running statistics.
    let mut expected = 0.0f64;
    let dir = tempfile::tempdir().unwrap();
    let mut bundle = ModelBundle::new(net, BundleMetadata::new(small(32)));
    bundle.save(&dir.path().join("m")).unwrap();
    for (name, _shape, values) in read_safetensors(&dir.path().join("m").join(WEIGHTS_FILE)) {
        if !name.contains("running_") {
            expected += values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        }
    }
    // BN gamma = 1 contributes, so the term is far from zero.
    assert!(expected > 100.0);
    assert!(
        ((l2 as f64) - expected).abs() / expected < 1e-5,
        "{l2} vs {expected}"
    );
}

/// Minimal safetensors reader for tests: (name, shape, f32 values), in file order of the header.
fn read_safetensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for (name, v) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(v["dtype"], "F32", "{name}");
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let off: Vec<usize> = v["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let vals = data[off[0]..off[1]]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.push((name.clone(), shape, vals));
    }
    out
}

fn saved_bundle(dir: &Path) -> (std::path::PathBuf, RetinaNet) {
    let device = Device::flex();
    let config = small(32);
    let net = config.init(&device).unwrap();
    let path = dir.join("bundle");
    let mut b = ModelBundle::new(net.clone(), BundleMetadata::new(config));
    b.save(&path).unwrap();
    (path, net)
}

#[test]
fn bundle_round_trip_gives_bit_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (path, net) = saved_bundle(dir.path());
    let device = Device::flex();
    let loaded = ModelBundle::load(&path, &device).unwrap();
    assert_eq!(loaded.metadata.format_version, BUNDLE_FORMAT_VERSION);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path.join(WEIGHTS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "a bundle is readable by others");
    }
    assert_eq!(loaded.metadata.config, small(32));
    let x = input(3, 32, 7, &device);
    let a = net.forward(x.clone());
    let b = loaded.model.forward(x);
    for (ta, tb) in a.heads.iter().zip(&b.heads) {
        assert_eq!(host(ta), host(tb), "outputs must be bit-identical");
    }
    // Saving over an existing bundle replaces it and leaves no scratch directories behind.
    let mut again = loaded;
    again.metadata.provenance.epochs = Some(3);
    again.save(&path).unwrap();
    assert_eq!(
        BundleMetadata::load(&path).unwrap().provenance.epochs,
        Some(3)
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("bundle")]);
}

#[test]
fn truncated_weights_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved_bundle(dir.path());
    let w = path.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = ModelBundle::load(&path, &Device::flex()).unwrap_err();
    assert!(matches!(err, BundleError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");

    // A file of the recorded size whose header is garbage is reported as corrupt, not a panic.
    let mut garbage = bytes.clone();
    garbage[..16].copy_from_slice(&[0xff; 16]);
    std::fs::write(&w, &garbage).unwrap();
    let err = ModelBundle::load(&path, &Device::flex()).unwrap_err();
    assert!(matches!(err, BundleError::CorruptWeights { .. }), "{err}");
}

fn edit_metadata(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = path.join(METADATA_FILE);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn newer_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved_bundle(dir.path());
    edit_metadata(&path, |v| {
        v["format_version"] = serde_json::json!(BUNDLE_FORMAT_VERSION + 1);
        v["something_new"] = serde_json::json!({"x": 1});
    });
    let err = ModelBundle::load(&path, &Device::flex()).unwrap_err();
    assert!(matches!(err, BundleError::NewerFormat { .. }), "{err}");
    assert!(err.to_string().contains("upgrade"), "{err}");
}

/// A format-1 bundle (the embedded model as it was first written) still reads: the referable
/// rule, the grade names and the vessel-growth range that version 1 implied by head name are
/// filled into the specs, so its answers keep their meaning.
#[test]
fn format_1_bundles_are_read_with_the_rules_they_implied() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/testdata/model-v1.json"
    ))
    .unwrap();
    assert!(text.contains("\"format_version\": 1"));
    let meta = BundleMetadata::parse(&text, "model-v1.json".into()).unwrap();
    assert_eq!(meta.format_version, BUNDLE_FORMAT_VERSION);
    let c = &meta.config;
    assert_eq!(c.heads[0], HeadSpec::diagnosis());
    // The link came later: such a bundle's vessel output is the value itself.
    assert_eq!(
        c.heads[2],
        HeadSpec::vessel_growth().with_link(Link::Identity)
    );
    let names: Vec<String> = c.decisions().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["referable", "fluid"]);
    assert_eq!(meta.class_names()["diagnosis"][4], "proliferative");
    // Written again, it is the current format and says the rules itself.
    let again = serde_json::to_string(&meta).unwrap();
    assert!(
        again.contains("\"from_class\":2") && !again.contains("class_names"),
        "{again}"
    );
}

/// A format-2 bundle (the embedded default model before the quality head) reads as one
/// without temperatures, refusing heads or check thresholds: the default check runs, nothing is
/// rescaled, and it is written back as the current format.
#[test]
fn format_2_bundles_read_without_the_format_3_additions() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/testdata/model-v2.json"
    ))
    .unwrap();
    assert!(text.contains("\"format_version\": 2"));
    let meta = BundleMetadata::parse(&text, "model-v2.json".into()).unwrap();
    assert_eq!(meta.format_version, BUNDLE_FORMAT_VERSION);
    let c = &meta.config;
    assert_eq!(c.heads.len(), 3);
    assert!(
        c.heads
            .iter()
            .all(|h| h.temperature.is_none() && !h.refuses())
    );
    assert_eq!(c.gradability, None);
    assert_eq!(c.gradability(), GradabilityCheck::default());
    let again = serde_json::to_string(&meta).unwrap();
    assert!(
        !again.contains("temperature") && !again.contains("refuses"),
        "{again}"
    );
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved_bundle(dir.path());
    // Claim the diagnosis head has 4 classes: its weights in the file have 5.
    edit_metadata(&path, |v| {
        v["config"]["heads"][0]["kind"] = serde_json::json!({"multiclass": 4});
        v["config"]["heads"][0]["classes"] = serde_json::Value::Null;
    });
    let err = ModelBundle::load(&path, &Device::flex()).unwrap_err();
    match &err {
        BundleError::ShapeMismatch {
            tensor,
            expected,
            found,
            ..
        } => {
            assert!(tensor.starts_with("heads.0.out"), "{tensor}");
            assert_ne!(expected, found);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}

#[test]
fn malformed_metadata_gives_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved_bundle(dir.path());
    std::fs::write(
        path.join(METADATA_FILE),
        "{\n  \"format_version\": 1,\n  \"config\": [\n",
    )
    .unwrap();
    let err = ModelBundle::load(&path, &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.json:4:"), "{err}");
    let err = ModelBundle::load(&dir.path().join("nope"), &Device::flex()).unwrap_err();
    assert!(matches!(err, BundleError::NotFound { .. }));
}

#[test]
fn pytorch_layout_export_has_the_reference_state_dict_keys_and_round_trips() {
    let device = Device::flex();
    let mut config = RetinaConfig::preset("reference").unwrap();
    config.heads = HeadSpec::clinical_heads();
    let net = config.init(&device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ref_torch.safetensors");
    net.export_torch(&config, &file).unwrap();
    let tensors = read_safetensors(&file);
    // torch: 67 entries in state_dict() once the 12 num_batches_tracked counters are left out.
    assert_eq!(tensors.len(), 67);
    let shape = |n: &str| {
        tensors
            .iter()
            .find(|t| t.0 == n)
            .map(|t| t.1.clone())
            .unwrap_or_else(|| panic!("missing {n}"))
    };
    assert_eq!(shape("stem.0.weight"), [32, 3, 3, 3]);
    assert_eq!(shape("stem.0.bias"), [32]);
    assert_eq!(shape("stem.1.weight"), [32]);
    assert_eq!(shape("stem.1.running_var"), [32]);
    assert_eq!(shape("stage1.conv1.weight"), [32, 32, 3, 3]);
    assert_eq!(shape("stage2.shortcut.0.weight"), [64, 32, 1, 1]);
    assert_eq!(shape("stage2.shortcut.1.bias"), [64]);
    assert_eq!(shape("stage4.bn2.running_mean"), [256]);
    assert_eq!(shape("diagnosis.weight"), [5, 256]);
    assert_eq!(shape("fluid.bias"), [1]);
    assert_eq!(shape("vessel.weight"), [1, 128]);

    // Import into a differently initialised network: identical outputs afterwards.
    let mut other = config.init(&device).unwrap();
    let x = input(2, 64, 3, &device);
    assert_ne!(
        host(&net.forward(x.clone()).heads[0]),
        host(&other.forward(x.clone()).heads[0])
    );
    other.import_torch(&config, &file).unwrap();
    assert_eq!(
        host(&net.forward(x.clone()).heads[0]),
        host(&other.forward(x).heads[0])
    );

    // The logistic link of the vessel head travels in the file's metadata; a head with the
    // identity link, like a file PyTorch wrote, records none and reads as the identity.
    let links = retina_model::torch::regression_links(&file, &config).unwrap();
    assert_eq!(links, [("vessel_growth".to_string(), Link::Logistic)]);
    // Under the key the README documents, for tools other than Retina.
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(
        header["__metadata__"]["retina.vessel_growth.link"],
        "logistic"
    );
    let mut raw = config.clone();
    raw.heads[2].link = Link::Identity;
    let plain = dir.path().join("identity.safetensors");
    net.export_torch(&raw, &plain).unwrap();
    let links = retina_model::torch::regression_links(&plain, &config).unwrap();
    assert_eq!(links, [("vessel_growth".to_string(), Link::Identity)]);

    // So does the preprocessing, which the weights alone do not give: read back as written,
    // whatever the preset's; a file without it gives none; a record that is not one is an
    // error naming the file.
    assert_eq!(
        retina_model::torch::recorded_preprocess(&file).unwrap(),
        Some(config.preprocess.clone())
    );
    let mut graham = config.clone();
    graham.preprocess.graham = !config.preprocess.graham;
    graham.preprocess.image_size = 96;
    let other_prep = dir.path().join("graham.safetensors");
    net.export_torch(&graham, &other_prep).unwrap();
    assert_eq!(
        retina_model::torch::recorded_preprocess(&other_prep).unwrap(),
        Some(graham.preprocess.clone())
    );
    assert!(header["__metadata__"][retina_model::torch::PREPROCESS_KEY].is_string());
    let rewrite = |meta: serde_json::Value, name: &str| {
        let mut h = header.clone();
        h["__metadata__"] = meta;
        let text = serde_json::to_vec(&h).unwrap();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(&bytes[8 + n..]);
        let path = dir.path().join(name);
        std::fs::write(&path, out).unwrap();
        path
    };
    let bare = rewrite(serde_json::json!({}), "bare.safetensors");
    assert_eq!(
        retina_model::torch::recorded_preprocess(&bare).unwrap(),
        None
    );
    let bad = rewrite(
        serde_json::json!({"retina.preprocess": "{\"graham\": \"yes\"}"}),
        "bad.safetensors",
    );
    let err = retina_model::torch::recorded_preprocess(&bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("retina.preprocess"),
        "{err}"
    );

    // A head that pools by the maximum says so (PyTorch must pool that way too); the preset's
    // config, with what the file records, takes the weights back. A record that is no pooling
    // is an error naming the file and the key.
    let mut pooled_cfg = config.clone();
    pooled_cfg.heads[0].pooling = Pooling::AverageMax;
    let pooled_net = pooled_cfg.init(&device).unwrap();
    let pooled_file = dir.path().join("pooled.safetensors");
    pooled_net.export_torch(&pooled_cfg, &pooled_file).unwrap();
    let recorded = retina_model::torch::recorded_pooling(&pooled_file, &config).unwrap();
    assert_eq!(recorded[0], ("diagnosis".to_string(), Pooling::AverageMax));
    assert!(recorded[1..].iter().all(|(_, p)| *p == Pooling::Average));
    let mut back_cfg = config.clone();
    for (h, (_, p)) in back_cfg.heads.iter_mut().zip(recorded) {
        h.pooling = p;
    }
    let mut back = back_cfg.init(&device).unwrap();
    back.import_torch(&back_cfg, &pooled_file).unwrap();
    let x = input(2, 64, 6, &device);
    assert_eq!(
        host(&back.forward(x.clone()).heads[0]),
        host(&pooled_net.forward(x).heads[0])
    );
    // A record that is no pooling, or a link that is neither (read as the identity, silently,
    // before), is an error naming the file and the key.
    let refused = |key: &str, value: &str, read: &dyn Fn(&Path) -> Result<(), BundleError>| {
        let name = format!("{value}.safetensors");
        let path = rewrite(serde_json::json!({ key: value }), &name);
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains(&name) && err.contains(key), "{err}");
    };
    refused("retina.diagnosis.pooling", "median", &|p| {
        retina_model::torch::recorded_pooling(p, &config).map(drop)
    });
    refused("retina.vessel_growth.link", "sigmoid", &|p| {
        retina_model::torch::regression_links(p, &config).map(drop)
    });

    // The wrong architecture is refused with a named tensor.
    let small_cfg = small(32);
    let mut wrong = small_cfg.init(&device).unwrap();
    let err = wrong.import_torch(&small_cfg, &file).unwrap_err();
    assert!(matches!(err, BundleError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn flex_and_ndarray_agree() {
    let flex = BackendChoice::Flex.select().unwrap();
    let nd = BackendChoice::Ndarray.select().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved_bundle(dir.path());
    let a = ModelBundle::load(&path, &flex.device).unwrap();
    let b = ModelBundle::load(&path, &nd.device).unwrap();
    let oa = a.model.forward(input(2, 32, 5, &flex.device));
    let ob = b.model.forward(input(2, 32, 5, &nd.device));
    for (x, y) in oa.heads.iter().zip(&ob.heads) {
        let d = max_abs_diff(&host(x), &host(y));
        assert!(d < 1e-4, "flex vs ndarray differ by {d}");
    }
}

/// CPU vs GPU (wgpu) on the same bundle. CI installs Mesa's software Vulkan driver so this runs
/// there for real; with no adapter at all it fails under CI and is skipped (loudly) elsewhere.
#[test]
fn cpu_and_wgpu_agree_on_the_same_weights() {
    let gpu = match BackendChoice::Wgpu.select() {
        Ok(g) => g,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED cpu_and_wgpu_agree_on_the_same_weights: {e}");
            return;
        }
        Err(e) => panic!("CI must have a wgpu adapter: {e}"),
    };
    eprintln!("wgpu parity on {}", gpu.description);
    let cpu = BackendChoice::Cpu.select().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved_bundle(dir.path());
    let a = ModelBundle::load(&path, &cpu.device).unwrap();
    let b = ModelBundle::load(&path, &gpu.device).unwrap();
    let oa = a.model.forward(input(2, 32, 9, &cpu.device));
    let ob = b.model.forward(input(2, 32, 9, &gpu.device));
    for (x, y) in oa.heads.iter().zip(&ob.heads) {
        let d = max_abs_diff(&host(x), &host(y));
        assert!(d < 1e-3, "cpu vs wgpu logits differ by {d}");
    }
}

#[test]
fn backend_names_parse() {
    for (s, b) in [
        ("cpu", BackendChoice::Cpu),
        ("WGPU", BackendChoice::Wgpu),
        ("auto", BackendChoice::Auto),
        ("ndarray", BackendChoice::Ndarray),
    ] {
        assert_eq!(s.parse::<BackendChoice>().unwrap(), b);
    }
    assert!(
        "cuda"
            .parse::<BackendChoice>()
            .unwrap_err()
            .contains("choose")
    );
}

/// One training step of the whole reference-shaped network: Flex (through the im2col/gemm
/// convolution and the fused batch norms) against NdArray (burn's own operations), from the same
/// weights. Outputs, every parameter's gradient and the running statistics must agree.
#[test]
#[allow(deprecated)]
fn training_step_through_the_fast_paths_matches_burns_own_operations() {
    use retina_model::burn::module::{ModuleVisitor, Param};
    use retina_model::burn::tensor::Gradients;

    /// Every float parameter's gradient and every running statistic, in visiting order.
    struct Collect<'a> {
        grads: &'a Gradients,
        out: Vec<(String, bool, Vec<f32>)>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            let (has_grad, v) = match t.grad(self.grads) {
                Some(g) => (true, g.into_data()),
                None => (false, t.into_data()), // buffers (running mean/var) have no gradient
            };
            let v = v.try_into_vec_as::<f32>().unwrap();
            self.out.push((format!("{:?}", param.id), has_grad, v));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let mut config = RetinaConfig::preset("reference").unwrap();
    config.preprocess.image_size = 48;
    // Fixed weights, so a run is reproducible.
    let device = BackendChoice::Flex.select().unwrap().device;
    device.seed(0);
    let init = config.init(&device).unwrap();
    let path = dir.path().join("bundle");
    ModelBundle::new(init, BundleMetadata::new(config))
        .save(&path)
        .unwrap();
    let step = |choice: BackendChoice| {
        let device = choice.select().unwrap().device.autodiff();
        let net = ModelBundle::load(&path, &device).unwrap().model;
        let out = net.forward(input(3, 48, 9, &device));
        let mut loss = net.l2_sum_of_squares().mul_scalar(1e-4);
        for (i, h) in out.heads.iter().enumerate() {
            let probe = input(3, 48, 20 + i as u64, &device).reshape([-1]).narrow(
                0,
                0,
                h.dims().iter().product(),
            );
            loss = loss + (h.clone().reshape([-1]) * probe).sum();
        }
        let heads: Vec<Vec<f32>> = out.heads.iter().map(host).collect();
        let grads = loss.backward();
        let mut collect = Collect {
            grads: &grads,
            out: Vec::new(),
        };
        net.visit(&mut collect);
        (heads, collect.out)
    };
    let (fast_heads, fast) = step(BackendChoice::Flex);
    let (ref_heads, reference) = step(BackendChoice::Ndarray);
    for (a, b) in fast_heads.iter().zip(&ref_heads) {
        assert!(max_abs_diff(a, b) < 1e-4, "head outputs differ");
    }
    assert_eq!(fast.len(), reference.len());
    let with_grad = |v: &[(String, bool, Vec<f32>)]| v.iter().filter(|p| p.1).count();
    assert_eq!(with_grad(&fast), with_grad(&reference));
    // 12 convolutions + 24 batch-norm gamma/beta + 6 head weight/bias + the stem conv's bias.
    let expected = 12 + 24 + 6 + 1;
    assert!(
        with_grad(&fast) >= expected,
        "gradients for {}",
        with_grad(&fast)
    );
    // Both sides sum thousands of f32 products whose total largely cancels (the output gradient
    // of a batch norm has zero mean per channel), in different orders: over random weights the
    // largest difference measured 0.5-1.1e-3 of the tensor's largest value. A wrong index or a
    // missing term shows up as differences of the order of the values themselves.
    for ((name, _, a), (_, _, b)) in fast.iter().zip(&reference) {
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(a, b);
        assert!(
            d <= 5e-3 * scale,
            "{name} ({} values): gradient or statistic differs by {d} (scale {scale})",
            a.len()
        );
    }
}
