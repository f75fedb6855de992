//! What validation needs besides predicting ([`crate::scoring::predict`]): the metrics, through
//! the scoring `eval` uses too, and the label counts behind automatic class weights.

use crate::dataset::Sample;
use crate::scoring;
use retina_model::{HeadKind, Prediction};
use std::collections::BTreeMap;

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
