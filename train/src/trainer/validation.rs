//! Validation of a model on a sample set: predictions, the mean validation loss and the
//! screening metrics. Moved here unchanged from the former `trainer.rs` (a shared scoring module
//! will replace these bodies).

use crate::data::LoaderSpec;
use crate::dataset::Sample;
use crate::loss::{HeadTargets, RetinaLoss};
use crate::metrics;
use anyhow::Result;
use burn::prelude::*;
use retina_model::{HeadKind, Prediction, RetinaNet};
use std::collections::BTreeMap;
use std::sync::Arc;

pub(super) fn label_counts(samples: &[Sample], head: &str, kind: HeadKind) -> Option<Vec<usize>> {
    let k = match kind {
        HeadKind::Multiclass(n) => n,
        HeadKind::Binary => 2,
        HeadKind::Regression => return None,
    };
    let mut c = vec![0; k];
    for s in samples {
        if let Some(v) = s.labels.get(head) {
            let i = (*v as usize).min(k - 1);
            c[i] += 1;
        }
    }
    Some(c)
}

pub(super) fn targets(t: &[Vec<Option<f32>>], device: &Device) -> Vec<HeadTargets> {
    t.iter()
        .map(|v| HeadTargets::from_options(v, device))
        .collect()
}

/// Runs the model over `samples`; returns predictions (in order) and the mean validation loss.
pub fn predict_samples(
    model: &RetinaNet,
    loss: Option<&RetinaLoss>,
    spec: &LoaderSpec,
    samples: &Arc<Vec<Sample>>,
    batch_size: usize,
    device: &Device,
) -> Result<(Vec<Prediction>, Option<f64>)> {
    let kinds = model.head_kinds();
    let s = spec.preprocess.image_size;
    let rx = spec.clone().spawn(
        samples.clone(),
        (0..samples.len()).collect(),
        batch_size,
        2,
        0,
    );
    let mut preds = Vec::with_capacity(samples.len());
    let (mut loss_sum, mut n_loss) = (0.0, 0usize);
    for batch in rx {
        let b = batch?;
        if b.n == 0 {
            continue;
        }
        let x = Tensor::<4>::from_data(TensorData::new(b.images, [b.n, 3, s, s]), device);
        let out = model.forward(x);
        if let Some(l) = loss {
            let t = targets(&b.targets, device);
            let v: f32 = l.forward(model, &out, &t).total.into_scalar::<f32>();
            loss_sum += v as f64 * b.n as f64;
            n_loss += b.n;
        }
        preds.extend(Prediction::from_output(&out, &kinds));
    }
    Ok((preds, (n_loss > 0).then(|| loss_sum / n_loss as f64)))
}

/// Validation metrics of predictions against the samples' labels.
pub fn validation_metrics(
    specs: &[retina_model::HeadSpec],
    samples: &[Sample],
    preds: &[Prediction],
) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for spec in specs {
        let pairs: Vec<(&Sample, &Prediction)> = samples
            .iter()
            .zip(preds)
            .filter(|(s, _)| s.labels.contains_key(&spec.name))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        match spec.kind {
            HeadKind::Multiclass(k) => {
                let truth: Vec<usize> = pairs
                    .iter()
                    .map(|(s, _)| s.labels[&spec.name] as usize)
                    .collect();
                let pred: Vec<usize> = pairs
                    .iter()
                    .map(|(_, p)| match &p.heads[&spec.name] {
                        retina_model::HeadAnswer::Multiclass { class, .. } => *class,
                        _ => 0,
                    })
                    .collect();
                let acc = truth.iter().zip(&pred).filter(|(a, b)| a == b).count() as f64
                    / truth.len() as f64;
                let prefix = if spec.name == retina_model::DIAGNOSIS {
                    String::new()
                } else {
                    format!("{}_", spec.name)
                };
                m.insert(format!("{prefix}accuracy"), acc);
                if let Some(k) = metrics::quadratic_kappa(&truth, &pred, k) {
                    m.insert(format!("{prefix}kappa"), k);
                }
                if spec.name == retina_model::DIAGNOSIS {
                    let scores: Vec<f32> = pairs
                        .iter()
                        .map(|(_, p)| p.referable_probability().unwrap_or(0.0))
                        .collect();
                    let pos: Vec<bool> = truth.iter().map(|g| *g >= 2).collect();
                    if let Some(a) = metrics::roc_auc(&scores, &pos) {
                        m.insert("referable_auc".into(), a);
                    }
                }
            }
            HeadKind::Binary => {
                let scores: Vec<f32> = pairs
                    .iter()
                    .map(|(_, p)| p.decision_probability(&spec.name).unwrap_or(0.0))
                    .collect();
                let pos: Vec<bool> = pairs
                    .iter()
                    .map(|(s, _)| s.labels[&spec.name] > 0.5)
                    .collect();
                if let Some(a) = metrics::roc_auc(&scores, &pos) {
                    m.insert(format!("{}_auc", spec.name), a);
                }
            }
            HeadKind::Regression => {
                let truth: Vec<f32> = pairs.iter().map(|(s, _)| s.labels[&spec.name]).collect();
                let pred: Vec<f32> = pairs
                    .iter()
                    .map(|(_, p)| match &p.heads[&spec.name] {
                        retina_model::HeadAnswer::Regression { value } => value.clamp(0.0, 1.0),
                        _ => 0.0,
                    })
                    .collect();
                if let Some(e) = metrics::mae(&pred, &truth) {
                    m.insert(format!("{}_mae", spec.name), e);
                }
            }
        }
    }
    m
}
