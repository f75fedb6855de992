//! Weights trained in PyTorch load into Retina and give the same outputs.
//!
//! The fixture (assets/testdata) is the reference network of shared/peer/model.py with seeded
//! weights and batch-norm statistics, saved by `docs/make_torch_fixture.py` with PyTorch 2.15,
//! with its eval-mode outputs on a deterministic input.

use retina_model::burn::prelude::*;
use retina_model::{RetinaConfig, VESSEL_GROWTH};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/testdata")
        .join(name)
}

#[test]
fn pytorch_reference_weights_give_pytorch_outputs() {
    let device = Device::flex();
    let mut config = RetinaConfig::preset("reference").unwrap();
    config.heads = retina_model::HeadSpec::clinical_heads();
    config.preprocess.image_size = 64;
    let mut net = config.init(&device).unwrap();
    net.import_torch(&config, &fixture("refnet_torch.safetensors"))
        .expect("all 67 tensors apply; the 12 num_batches_tracked counters are ignored");
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("refnet_torch_outputs.json")).unwrap(),
    )
    .unwrap();
    let n = 2 * 3 * 64 * 64;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let out = net.forward(Tensor::from_data(
        TensorData::new(x, [2, 3, 64, 64]),
        &device,
    ));
    for (ours, theirs) in [
        ("diagnosis", "diagnosis"),
        ("fluid", "fluid"),
        (VESSEL_GROWTH, "vessel"),
    ] {
        let got: Vec<f32> = out
            .head(ours)
            .unwrap()
            .clone()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let exp: Vec<f32> = want[theirs]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), exp.len(), "{ours}");
        for (g, e) in got.iter().zip(&exp) {
            assert!((g - e).abs() < 1e-5, "{ours}: got {got:?}, PyTorch {exp:?}");
        }
    }
}

/// The PyTorch key names of a network the reference preset does not cover: a stage of two
/// blocks (`stage2.0.`, `stage2.1.`, as an `nn.Sequential` of blocks numbers them) and a head
/// with a hidden layer (`vessel.0.` and `vessel.2.`: Linear, ReLU, Linear); and the round trip
/// through them gives the same outputs.
#[test]
fn export_keys_for_multi_block_stages_and_hidden_layer_heads() {
    let device = Device::flex();
    let mut config = RetinaConfig::preset("small").unwrap();
    config.trunk.stages[1].depth = 2;
    let vg = config
        .heads
        .iter()
        .position(|h| h.name == VESSEL_GROWTH)
        .unwrap();
    config.heads[vg].hidden = Some(8);
    config.preprocess.image_size = 32;
    let model = config.init(&device).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    model.export_torch(&config, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for key in [
        "stem.0.weight",
        "stage1.conv1.weight",
        "stage2.0.conv1.weight",
        "stage2.0.shortcut.0.weight",
        "stage2.1.conv2.weight",
        "stage2.1.bn2.running_var",
        "diagnosis.weight",
        "vessel.0.weight",
        "vessel.0.bias",
        "vessel.2.weight",
    ] {
        assert!(
            header.contains_key(key),
            "no `{key}` in {:?}",
            header.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        !header
            .keys()
            .any(|k| k.starts_with("stage2.conv1") || k.starts_with("vessel.weight"))
    );
    let [cout, cin] = [0, 1].map(|i| header["vessel.0.weight"]["shape"][i].as_u64().unwrap());
    assert_eq!(cout, 8, "PyTorch's Linear weight is [out, in]");
    assert!(cin > 8);

    let mut back = config.init(&device).unwrap();
    back.import_torch(&config, &path).unwrap();
    let x = Tensor::<4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
    for (a, b) in model
        .forward(x.clone())
        .heads
        .iter()
        .zip(back.forward(x).heads)
    {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.clone().into_data().try_into_vec_as().unwrap(),
            b.into_data().try_into_vec_as().unwrap(),
        );
        assert_eq!(a, b);
    }
}
