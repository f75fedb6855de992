//! `retina-infer bench`: batch-1 latency and batch-16 throughput of the forward pass, measured
//! like `shared/peer/bench.py` measures PyTorch and ONNX Runtime.

use anyhow::Result;
use burn::prelude::*;
use retina_model::{BackendChoice, RetinaConfig};
use serde_json::json;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark and prints the result.
pub fn run(
    preset: String,
    size: usize,
    backend: BackendChoice,
    runs: usize,
    as_json: bool,
) -> Result<()> {
    let backend = backend.select()?;
    let device = &backend.device;
    device.seed(0);
    let mut config = RetinaConfig::preset(&preset)?;
    // The network the PyTorch peer runs: the preset's trunk and the clinical heads.
    config.heads = retina_model::HeadSpec::clinical_heads();
    config.preprocess.image_size = size;
    let model = config.init(device)?;
    let input = |n: usize| {
        let vals: Vec<f32> = (0..n * 3 * size * size)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::<4>::from_data(TensorData::new(vals, [n, 3, size, size]), device)
    };
    // Reading the outputs to the host waits for the device.
    let time = |x: &Tensor<4>| {
        let t0 = Instant::now();
        let out = model.forward(x.clone());
        for h in out.heads {
            let _ = h.into_data();
        }
        t0.elapsed().as_secs_f64()
    };
    let x1 = input(1);
    for _ in 0..5 {
        time(&x1);
    }
    let b1: Vec<f64> = (0..runs.max(1)).map(|_| time(&x1)).collect();
    let x16 = input(16);
    for _ in 0..2 {
        time(&x16);
    }
    let b16: Vec<f64> = (0..7).map(|_| time(&x16)).collect();
    let b1_ms = 1e3 * median(b1.clone());
    let b1_min = 1e3 * b1.iter().cloned().fold(f64::INFINITY, f64::min);
    let b16_img_s = 16.0 / median(b16);
    if as_json {
        println!(
            "{}",
            json!({
                "preset": preset, "image_size": size, "backend": backend.description,
                "cpu": retina_kernels::cpu_model(), "isa": retina_kernels::active_isa().name(),
                "b1_latency_ms": b1_ms, "b1_latency_ms_min": b1_min, "b16_img_per_s": b16_img_s,
                "peak_rss_mib": retina_model::host::peak_rss_mib(),
            })
        );
    } else {
        println!(
            "{preset} at {size} px on {} ({}, {} kernels): batch-1 latency {b1_ms:.1} ms (min {b1_min:.1}), batch-16 throughput {b16_img_s:.1} img/s",
            backend.description,
            retina_kernels::cpu_model(),
            retina_kernels::active_isa().name()
        );
    }
    Ok(())
}
