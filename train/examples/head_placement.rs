//! Moving a head changes what the trunk learns.
//!
//! Trains the `small` network twice on the same generated images: once with the `fluid` head on
//! the final embedding (the default) and once on stage 2. Then measures how much fluid
//! information the *stage-2* pooled embedding carries on held-out images: the ROC AUC of its
//! best single channel for fluid, and how many of its channels separate fluid at AUC >= 0.7.
//! A loss close to a layer shapes that layer: with the head on stage 2, stage 2 must encode
//! edema by itself.
//!
//!     cargo run --example head_placement -- [WORK_DIR] [SEEDS] [EPOCHS]

mod common;

use anyhow::Result;
use retina_model::burn::prelude::*;
use retina_model::{AttachPoint, BackendChoice, FLUID, HeadSpec, ModelBundle};
use retina_train::config::{
    DataConfig, ModelSection, OptimizerConfig, PreprocessSection, TrainConfig,
};
use retina_train::data::{LoaderSpec, Sampling};
use retina_train::dataset::{DatasetFormat, Sample, read_labels};
use retina_train::metrics::roc_auc;
use std::path::Path;
use std::sync::Arc;

fn main() -> Result<()> {
    let (work, seeds, epochs) = common::args("head-placement", 6)?;
    let train = common::generated(&work, "train", 600, 31)?;
    let test = common::generated(&work, "test", 300, 32)?;
    let test_samples = std::sync::Arc::new(
        read_labels(
            &test,
            DatasetFormat::Native,
            None,
            &HeadSpec::default_heads(),
        )?
        .samples,
    );
    println!(
        "{}",
        common::header(
            "fluid head on",
            &[
                "fluid AUC (head)",
                "best stage-2 channel AUC",
                "stage-2 channels with AUC >= 0.7 (of 32)"
            ]
        )
    );
    for attach in [AttachPoint::Embedding, AttachPoint::Stage(2)] {
        let mut per_seed = Vec::new();
        for seed in 0..seeds {
            per_seed.push(probe(&work, &train, &test_samples, attach, seed, epochs)?);
        }
        println!("{}", common::row(&attach.to_string(), &per_seed));
    }
    Ok(())
}

/// Trains with the fluid head at `attach` and probes the stage-2 embedding on the test images:
/// the head's fluid AUC, the best stage-2 channel's, and the channels at AUC >= 0.7.
fn probe(
    work: &Path,
    train: &Path,
    test_samples: &Arc<Vec<Sample>>,
    attach: AttachPoint,
    seed: u64,
    epochs: usize,
) -> Result<Vec<f64>> {
    let mut heads = HeadSpec::default_heads();
    heads[1].attach = attach;
    let config = TrainConfig {
        model: ModelSection {
            image_size: Some(96),
            heads: Some(heads),
            preprocess: PreprocessSection {
                graham: Some(false),
                ..PreprocessSection::default()
            },
            ..ModelSection::default()
        },
        epochs,
        seed,
        select_metric: "diagnosis.referable_auc".into(),
        data: DataConfig {
            sampling: Sampling::Shuffle,
            ..DataConfig::default()
        },
        optimizer: OptimizerConfig {
            learning_rate: 3e-3,
            ..OptimizerConfig::default()
        },
        ..TrainConfig::default()
    };
    let out = common::train_with_val(
        work,
        &format!("run-{attach}-{seed}"),
        train,
        None,
        config,
        None,
    )?;
    let device = BackendChoice::Cpu.select()?.device;
    let bundle = ModelBundle::load(&out.join("model"), &device)?;
    let pre = bundle.metadata.config.preprocess.clone();
    let spec = LoaderSpec::plain(pre.clone(), vec![FLUID.into()]);
    let (mut channels, mut fluid_p, mut truth): (Vec<Vec<f32>>, Vec<f32>, Vec<bool>) =
        (Vec::new(), Vec::new(), Vec::new());
    let idx: Vec<usize> = (0..test_samples.len()).collect();
    for (b, chunk) in idx.chunks(32).enumerate() {
        let batch = spec.load_batch(test_samples, chunk, b as u64)?;
        let s = pre.image_size;
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, [batch.n, 3, s, s]), &device);
        let out = bundle.model.forward(x);
        let emb: Vec<f32> = out.embeddings[1]
            .clone()
            .into_data()
            .try_into_vec_as::<f32>()?;
        let width = out.embeddings[1].dims()[1];
        let p: Vec<f32> = burn::tensor::activation::sigmoid(out.head(FLUID).unwrap().clone())
            .into_data()
            .try_into_vec_as::<f32>()?;
        for i in 0..batch.n {
            channels.push(emb[i * width..(i + 1) * width].to_vec());
            fluid_p.push(p[i]);
            truth.push(batch.targets[0][i] == Some(1.0));
        }
    }
    let width = channels[0].len();
    let aucs: Vec<f64> = (0..width)
        .map(|c| {
            let v: Vec<f32> = channels.iter().map(|row| row[c]).collect();
            let a = roc_auc(&v, &truth).unwrap_or(0.5);
            a.max(1.0 - a)
        })
        .collect();
    let best = aucs.iter().cloned().fold(0.5, f64::max);
    let strong = aucs.iter().filter(|a| **a >= 0.7).count();
    Ok(vec![
        roc_auc(&fluid_p, &truth).unwrap_or(f64::NAN),
        best,
        strong as f64,
    ])
}
