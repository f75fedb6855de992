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
