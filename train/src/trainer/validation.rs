//! Validation of a model on a sample set: predictions, the mean validation loss, and the
//! metrics through [`crate::scoring`], the scoring `eval` uses too.

use crate::data::LoaderSpec;
use crate::dataset::Sample;
use crate::loss::{HeadTargets, RetinaLoss};
use crate::scoring;
use anyhow::Result;
use burn::prelude::*;
use retina_model::{HeadKind, Prediction, RetinaNet};
use std::collections::BTreeMap;
use std::sync::Arc;

pub(super) fn label_counts(samples: &[Sample], head: &str, kind: HeadKind) -> Option<Vec<usize>> {
    let k = kind.classes()?;
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
        preds.extend(Prediction::from_output(&out, &model.specs));
    }
    Ok((preds, (n_loss > 0).then(|| loss_sum / n_loss as f64)))
}

/// Validation metrics of predictions against the samples' labels, at the default 0.5
/// thresholds: the same scoring and names as `eval` ([`crate::scoring`]).
pub fn validation_metrics(
    specs: &[retina_model::HeadSpec],
    samples: &[Sample],
    preds: &[Prediction],
) -> BTreeMap<String, f64> {
    let point = retina_model::OperatingPoint::default_for(&[]);
    scoring::flat(&scoring::score_heads(specs, samples, preds, &point))
}
