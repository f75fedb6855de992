//! Scoring predictions against labels, head by head: the one path shared by validation during
//! training and by `eval`, so both report the same metrics under the same names.
//!
//! Names are `HEAD.METRIC`: `diagnosis.accuracy`, `diagnosis.quadratic_kappa`,
//! `diagnosis.referable_auc` (a multiclass head's decision is prefixed by the decision's name),
//! `fluid.auc`, `fluid.sensitivity`, `vessel_growth.mae`, ... Which metrics a head has follows
//! from its spec alone ([`metric_names`]), so a run can check its selection metric before the
//! first epoch.

use crate::data::LoaderSpec;
use crate::dataset::Sample;
use crate::loss::{HeadTargets, RetinaLoss};
use crate::metrics::{self, BinaryCounts};
use anyhow::Result;
use burn::prelude::*;
use retina_model::{Decision, HeadKind, HeadSpec, OperatingPoint, Prediction, RetinaNet};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The validation loss's name among the metrics.
pub const VAL_LOSS: &str = "val_loss";

/// Runs the model over `samples` (in order, through the data pipeline of `spec`); returns the
/// predictions and, given a loss, its mean over the samples: what validation and `eval` score.
pub fn predict(
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
            let t = HeadTargets::batch(&b.targets, device);
            let v: f32 = l.forward(model, &out, &t).total.into_scalar::<f32>();
            loss_sum += v as f64 * b.n as f64;
            n_loss += b.n;
        }
        let mut batch = Prediction::from_output(&out, &model.specs);
        for (p, r) in batch.iter_mut().zip(b.refusals) {
            p.check = r;
        }
        preds.extend(batch);
    }
    Ok((preds, (n_loss > 0).then(|| loss_sum / n_loss as f64)))
}

/// One yes/no decision scored over the samples that carry its head's label.
#[derive(Debug, Clone)]
pub struct DecisionScore {
    /// The decision (`referable`, `fluid`, ...).
    pub decision: Decision,
    /// The key prefix of its metrics inside its head: `referable_` for a multiclass head's
    /// decision, empty for a binary head (which is its own decision).
    pub prefix: String,
    /// P(yes) per sample.
    pub scores: Vec<f32>,
    /// Whether each sample's label says yes.
    pub truth: Vec<bool>,
    /// Which samples (indices into the scored set) the scores are of.
    pub samples: Vec<usize>,
    /// The threshold of the operating point.
    pub threshold: f32,
    /// Counts at that threshold.
    pub counts: BinaryCounts,
    /// ROC AUC (needs both classes).
    pub auc: Option<f64>,
}

/// One head scored over the samples that carry its label.
#[derive(Debug, Clone)]
pub struct HeadScore {
    /// The head's spec.
    pub spec: HeadSpec,
    /// Samples with a label for this head.
    pub n: usize,
    /// Samples without one.
    pub missing: usize,
    /// Labelled samples left out because the image was refused as ungradable at the point
    /// (the refusing head itself scores every labelled sample).
    pub refused: usize,
    /// Metrics by name (without the head prefix); `None` where undefined (e.g. one class).
    pub metrics: BTreeMap<String, Option<f64>>,
    /// A classification head's confusion matrix (rows: truth, columns: prediction).
    pub confusion: Option<Vec<Vec<usize>>>,
    /// The head's decision, if it has one.
    pub decision: Option<DecisionScore>,
}

/// Scores every head of `specs` on `samples` (labels) against `preds` (same order), with the
/// decisions taken at `point`.
pub fn score_heads(
    specs: &[HeadSpec],
    samples: &[Sample],
    preds: &[Prediction],
    point: &OperatingPoint,
) -> Vec<HeadScore> {
    specs
        .iter()
        .map(|spec| score_head(spec, samples, preds, point))
        .collect()
}

fn score_head(
    spec: &HeadSpec,
    samples: &[Sample],
    preds: &[Prediction],
    point: &OperatingPoint,
) -> HeadScore {
    // Clinical metrics are of the images the model answers; the refusing head is scored on
    // all, refusals by the check included. `kept` holds the sample index of each pair.
    let mut n_labelled = 0;
    let (pairs, kept): (Vec<(f32, &Prediction)>, Vec<usize>) = samples
        .iter()
        .zip(preds)
        .enumerate()
        .filter_map(|(i, (s, p))| {
            let label = *s.labels.get(&spec.name)?;
            n_labelled += 1;
            (spec.refuses() || p.gradable(point)).then_some(((label, p), i))
        })
        .unzip();
    let mut m = BTreeMap::new();
    let mut confusion = None;
    match spec.kind {
        HeadKind::Multiclass(k) => {
            let truth: Vec<usize> = pairs.iter().map(|(l, _)| *l as usize).collect();
            let pred: Vec<usize> = pairs
                .iter()
                .map(|(_, p)| p.class(&spec.name).unwrap_or(0))
                .collect();
            let acc = (!truth.is_empty()).then(|| {
                truth.iter().zip(&pred).filter(|(a, b)| a == b).count() as f64 / truth.len() as f64
            });
            m.insert("accuracy".into(), acc);
            m.insert(
                "quadratic_kappa".into(),
                metrics::quadratic_kappa(&truth, &pred, k),
            );
            let c = metrics::confusion(&truth, &pred, k);
            // Each class's recall: a rare grade a model never predicts hides in the kappa.
            for (class, row) in c.iter().enumerate() {
                let n: usize = row.iter().sum();
                m.insert(
                    format!("recall_{class}"),
                    (n > 0).then(|| row[class] as f64 / n as f64),
                );
            }
            confusion = Some(c);
        }
        HeadKind::Binary => {
            let truth: Vec<usize> = pairs.iter().map(|(l, _)| usize::from(*l > 0.5)).collect();
            let pred: Vec<usize> = pairs
                .iter()
                .map(|(_, p)| usize::from(p.decide(&spec.name, point) == Some(true)))
                .collect();
            confusion = Some(metrics::confusion(&truth, &pred, 2));
        }
        HeadKind::Regression => {
            let truth: Vec<f32> = pairs.iter().map(|(l, _)| *l).collect();
            let pred: Vec<f32> = pairs
                .iter()
                .map(|(_, p)| p.value(&spec.name).unwrap_or(f32::NAN))
                .collect();
            m.insert("mae".into(), metrics::mae(&pred, &truth));
            m.insert("rmse".into(), metrics::rmse(&pred, &truth));
            m.insert("pearson_r".into(), metrics::pearson(&pred, &truth));
        }
    }
    let decision = spec.decision_rule().map(|d| {
        let mut idx = Vec::new();
        let (scores, truth): (Vec<f32>, Vec<bool>) = pairs
            .iter()
            .zip(&kept)
            .filter_map(|((l, p), &i)| {
                let s = p.decision_score(&d.name)?;
                idx.push(i);
                Some((s, d.truth(*l)))
            })
            .unzip();
        let threshold = point.threshold(&d.name);
        let counts = BinaryCounts::at(&scores, &truth, threshold);
        let prefix = decision_prefix(spec, &d);
        let auc = metrics::roc_auc(&scores, &truth);
        for (key, v) in decision_metrics(auc, &counts) {
            m.insert(format!("{prefix}{key}"), v);
        }
        m.insert(format!("{prefix}threshold"), Some(threshold as f64));
        DecisionScore {
            decision: d,
            prefix,
            scores,
            truth,
            samples: idx,
            threshold,
            counts,
            auc,
        }
    });
    HeadScore {
        spec: spec.clone(),
        n: pairs.len(),
        missing: samples.len() - n_labelled,
        refused: n_labelled - pairs.len(),
        metrics: m,
        confusion,
        decision,
    }
}

fn decision_prefix(spec: &HeadSpec, d: &Decision) -> String {
    if d.name == spec.name {
        String::new()
    } else {
        format!("{}_", d.name)
    }
}

const DECISION_METRICS: [&str; 8] = [
    "auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "prevalence",
    "threshold",
];

fn decision_metrics(auc: Option<f64>, c: &BinaryCounts) -> [(&'static str, Option<f64>); 7] {
    [
        ("auc", auc),
        ("sensitivity", c.sensitivity()),
        ("specificity", c.specificity()),
        ("ppv", c.ppv()),
        ("npv", c.npv()),
        ("f1", c.f1()),
        ("prevalence", c.prevalence()),
    ]
}

/// The scores as one flat map `HEAD.METRIC -> value` (undefined values left out): what an
/// epoch logs and what selects the exported epoch.
pub fn flat(scores: &[HeadScore]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for h in scores {
        for (k, v) in &h.metrics {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                out.insert(format!("{}.{k}", h.spec.name), v);
            }
        }
    }
    out
}

/// Every metric name that scoring `specs` can produce, plus the validation loss: the valid
/// values of `select_metric`.
pub fn metric_names(specs: &[HeadSpec]) -> Vec<String> {
    let mut names = vec![VAL_LOSS.to_string()];
    for spec in specs {
        let own: &[&str] = match spec.kind {
            HeadKind::Multiclass(_) => &["accuracy", "quadratic_kappa"],
            HeadKind::Binary => &[],
            HeadKind::Regression => &["mae", "rmse", "pearson_r"],
        };
        names.extend(own.iter().map(|k| format!("{}.{k}", spec.name)));
        if let HeadKind::Multiclass(k) = spec.kind {
            names.extend((0..k).map(|c| format!("{}.recall_{c}", spec.name)));
        }
        if let Some(d) = spec.decision_rule() {
            let prefix = decision_prefix(spec, &d);
            names.extend(
                DECISION_METRICS
                    .iter()
                    .map(|k| format!("{}.{prefix}{k}", spec.name)),
            );
        }
    }
    names
}

/// Whether a metric is one a person watches during training: the loss, a multiclass head's
/// kappa, every decision's AUC, a regression's MAE.
pub fn is_headline(metric: &str) -> bool {
    metric == VAL_LOSS
        || metric.ends_with("auc")
        || metric.ends_with(".quadratic_kappa")
        || metric.ends_with(".mae")
}

/// Whether a metric is better when smaller (losses and errors).
pub fn minimised(metric: &str) -> bool {
    metric.ends_with("loss") || metric.ends_with(".mae") || metric.ends_with(".rmse")
}

/// Checks that `metric` is one that scoring `specs` produces; the error lists the valid ones.
pub fn check_metric(metric: &str, specs: &[HeadSpec]) -> Result<(), String> {
    let names = metric_names(specs);
    if names.iter().any(|n| n == metric) {
        Ok(())
    } else {
        Err(format!(
            "select_metric `{metric}` is not a validation metric of this model; choose one of: {}",
            names.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use retina_model::{HeadAnswer, RetinaConfig};
    use std::path::PathBuf;

    fn sample(labels: &[(&str, f32)]) -> Sample {
        Sample {
            image: PathBuf::from("x.png"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            patient: None,
            line: 1,
        }
    }

    fn pred(grade_probs: [f32; 5], fluid: f32, vessel: f32) -> Prediction {
        let mut p = Prediction::default();
        let class = retina_model::prediction::argmax(&grade_probs);
        p.heads.insert(
            "diagnosis".into(),
            HeadAnswer::Multiclass {
                probabilities: grade_probs.to_vec(),
                class,
            },
        );
        p.decisions
            .insert("referable".into(), grade_probs[2..].iter().sum());
        p.heads
            .insert("fluid".into(), HeadAnswer::Binary { probability: fluid });
        p.decisions.insert("fluid".into(), fluid);
        p.heads.insert(
            "vessel_growth".into(),
            HeadAnswer::Regression { value: vessel },
        );
        p
    }

    #[test]
    fn names_are_the_ones_scoring_produces() {
        let specs = RetinaConfig::preset("small").unwrap().heads;
        let samples = vec![
            sample(&[("diagnosis", 0.0), ("fluid", 0.0), ("vessel_growth", 0.0)]),
            sample(&[("diagnosis", 3.0), ("fluid", 1.0), ("vessel_growth", 0.5)]),
            sample(&[("diagnosis", 1.0)]),
        ];
        let preds = vec![
            pred([0.7, 0.2, 0.05, 0.03, 0.02], 0.2, 0.1),
            pred([0.1, 0.1, 0.2, 0.5, 0.1], 0.8, 0.4),
            pred([0.2, 0.5, 0.2, 0.05, 0.05], 0.4, 0.0),
        ];
        let point = OperatingPoint::default_for(&["referable".into(), "fluid".into()]);
        let scores = score_heads(&specs, &samples, &preds, &point);
        let flat = flat(&scores);
        let names = metric_names(&specs);
        for k in flat.keys() {
            assert!(names.contains(k), "{k} is produced but not named");
        }
        assert_eq!(flat["diagnosis.referable_auc"], 1.0);
        assert_eq!(flat["diagnosis.accuracy"], 1.0);
        assert_eq!(flat["diagnosis.recall_3"], 1.0);
        // No eye of grade 2 or 4: no recall, rather than 0 or 1.
        assert!(!flat.contains_key("diagnosis.recall_2"));
        // One of the two grade-0 eyes called mild: recall 1/2.
        let preds = vec![
            pred([0.7, 0.2, 0.05, 0.03, 0.02], 0.2, 0.1),
            pred([0.1, 0.1, 0.2, 0.5, 0.1], 0.8, 0.4),
            pred([0.2, 0.5, 0.2, 0.05, 0.05], 0.4, 0.0),
            pred([0.2, 0.5, 0.2, 0.05, 0.05], 0.4, 0.0),
        ];
        let mut samples = samples.clone();
        samples.push(sample(&[("diagnosis", 0.0)]));
        let two = super::flat(&score_heads(&specs, &samples, &preds, &point));
        assert_eq!(two["diagnosis.recall_0"], 0.5);
        assert_eq!(two["diagnosis.recall_1"], 1.0);
        assert_eq!(flat["fluid.auc"], 1.0);
        assert!((flat["vessel_growth.mae"] - 0.1).abs() < 1e-6);
        assert_eq!(scores[1].n, 2);
        assert_eq!(scores[1].missing, 1);
        assert!(check_metric("diagnosis.referable_auc", &specs).is_ok());
        let e = check_metric("referable_auc", &specs).unwrap_err();
        assert!(e.contains("diagnosis.referable_auc"), "{e}");
        assert!(minimised("vessel_growth.mae") && minimised(VAL_LOSS));
        assert!(!minimised("fluid.auc"));
    }
}
