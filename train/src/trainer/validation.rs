//! What validation needs besides predicting ([`crate::scoring::predict`]): the metrics, through
//! the scoring `eval` uses too, and the label counts behind automatic class weights.

use crate::data::LoaderSpec;
use crate::dataset::Sample;
use crate::distributed::Collective;
use crate::loss::RetinaLoss;
use crate::scoring;
use anyhow::{Context, Result};
use burn::prelude::*;
use retina_model::{HeadKind, Prediction, RetinaNet};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Predictions over every rank's `shard` of the validation set, gathered in rank order (the
/// shards are consecutive, so that is the set's order), and the mean loss over all of them.
/// With one rank, [`scoring::predict`] itself.
pub(super) fn predict_sharded(
    group: &dyn Collective,
    model: &RetinaNet,
    loss: &RetinaLoss,
    spec: &LoaderSpec,
    shard: &Arc<Vec<Sample>>,
    batch_size: usize,
    device: &Device,
) -> Result<(Vec<Prediction>, Option<f64>)> {
    let (preds, mean) = scoring::predict(model, Some(loss), spec, shard, batch_size, device)?;
    if group.size() == 1 {
        return Ok((preds, mean));
    }
    // Validation ignores the gradability check (see `validation_metrics`): the raw outputs
    // are the whole prediction.
    type Shard = (f64, usize, Vec<Vec<Vec<f32>>>);
    let raw = |p: &Prediction| -> Vec<Vec<f32>> {
        model.specs.iter().map(|h| p.raw[&h.name].clone()).collect()
    };
    let mine: Shard = (
        mean.unwrap_or(0.0) * preds.len() as f64,
        preds.len(),
        preds.iter().map(raw).collect(),
    );
    let (mut all, mut loss_sum, mut n) = (Vec::new(), 0.0, 0);
    for bytes in group.all_gather(&serde_json::to_vec(&mine)?) {
        let (sum, count, rows): Shard =
            serde_json::from_slice(&bytes).context("a rank's validation predictions")?;
        loss_sum += sum;
        n += count;
        for row in rows {
            let mut p = Prediction::default();
            for (h, r) in model.specs.iter().zip(row) {
                p.answer(h, r);
            }
            all.push(p);
        }
    }
    Ok((all, (n > 0).then(|| loss_sum / n as f64)))
}

/// How many labels of each class `head` has among `samples` (`None` for a regression).
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

/// Validation metrics of predictions against the samples' labels, at the default 0.5
/// thresholds: the same scoring and names as `eval` ([`crate::scoring`]).
///
/// Unlike `eval`, validation scores the clinical heads on the photographs *labelled*
/// gradable, whatever the model refuses: a quality head still learning would otherwise
/// choose which images the selection metric sees.
pub fn validation_metrics(
    specs: &[retina_model::HeadSpec],
    samples: &[Sample],
    preds: &[Prediction],
) -> BTreeMap<String, f64> {
    let point = retina_model::OperatingPoint::default_for(&[]);
    let preds: Vec<Prediction> = preds
        .iter()
        .map(|p| Prediction {
            check: None,
            gate: None,
            ..p.clone()
        })
        .collect();
    let samples: Vec<Sample> = samples
        .iter()
        .map(|s| {
            let mut s = s.clone();
            let refused = specs.iter().any(|h| {
                h.decision.as_ref().filter(|d| d.refuses).is_some_and(|d| {
                    s.labels
                        .get(&h.name)
                        .is_some_and(|&l| l >= d.from_class as f32)
                })
            });
            if refused {
                s.labels
                    .retain(|name, _| specs.iter().any(|h| h.refuses() && &h.name == name));
            }
            s
        })
        .collect();
    scoring::flat(&scoring::score_heads(specs, &samples, &preds, &point))
}
