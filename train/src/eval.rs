//! `retina-train eval` and `calibrate`: screening metrics with confidence intervals, operating
//! points chosen on validation data, and reports with figures.

use crate::data::LoaderSpec;
use crate::dataset::{DatasetFormat, Sample, check_images, read_labels};
use crate::metrics::{self, BinaryCounts};
use crate::plots;
use crate::trainer::{predict_samples, read_logs};
use crate::util::write_file_atomic;
use anyhow::{Result, anyhow, bail};
use retina_model::bundle::decisions;
use retina_model::{BackendChoice, HeadAnswer, HeadKind, ModelBundle, OperatingPoint, Prediction};
use serde_json::{Map, Value, json};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

/// A labelled set and the model's predictions on it.
pub struct Scored {
    /// The bundle.
    pub bundle: ModelBundle,
    /// The samples.
    pub samples: Vec<Sample>,
    /// Predictions, in sample order.
    pub preds: Vec<Prediction>,
    /// Backend description.
    pub backend: String,
}

/// Loads the bundle and labels, checks they describe the same heads, and predicts.
pub fn score(
    model: &Path,
    data: &Path,
    format: DatasetFormat,
    images: Option<&Path>,
    backend: BackendChoice,
) -> Result<Scored> {
    let backend = backend.select()?;
    let bundle = ModelBundle::load(model, &backend.device)?;
    let file = read_labels(data, format, images)?;
    check_images(&file)?;
    let heads: Vec<String> = bundle
        .metadata
        .config
        .heads
        .iter()
        .map(|h| h.name.clone())
        .collect();
    let mut labelled: Vec<&String> = file.samples.iter().flat_map(|s| s.labels.keys()).collect();
    labelled.sort();
    labelled.dedup();
    if let Some(extra) = labelled.iter().find(|h| !heads.contains(h)) {
        bail!(
            "{} labels the head `{extra}`, which the model {} does not have (its heads: {heads:?}); \
             evaluate with a bundle that has it, or drop that column",
            data.display(),
            model.display()
        );
    }
    if labelled.is_empty() {
        bail!(
            "{} has no labels for any of the model's heads {heads:?}",
            data.display()
        );
    }
    let spec = LoaderSpec {
        preprocess: bundle.metadata.config.preprocess.clone(),
        heads: heads.clone(),
        augment: None,
        skip_bad: false,
        cache: None,
        seed: 0,
    };
    let samples = Arc::new(file.samples);
    let (preds, _) = predict_samples(&bundle.model, None, &spec, &samples, 16, &backend.device)?;
    Ok(Scored {
        bundle,
        samples: Arc::try_unwrap(samples).unwrap_or_else(|a| (*a).clone()),
        preds,
        backend: backend.description,
    })
}

/// Scores of one yes/no decision over the samples that carry its label.
pub fn decision_scores(s: &Scored, decision: &str) -> (Vec<f32>, Vec<bool>) {
    let head = if decision == "referable" {
        retina_model::DIAGNOSIS
    } else {
        decision
    };
    let mut scores = Vec::new();
    let mut truth = Vec::new();
    for (sample, p) in s.samples.iter().zip(&s.preds) {
        if let (Some(label), Some(score)) =
            (sample.labels.get(head), p.decision_probability(decision))
        {
            scores.push(score);
            truth.push(if decision == "referable" {
                *label >= 2.0
            } else {
                *label > 0.5
            });
        }
    }
    (scores, truth)
}

/// What a calibration aims for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The highest threshold whose sensitivity is at least this.
    Sensitivity(f64),
    /// The lowest threshold whose specificity is at least this.
    Specificity(f64),
    /// The threshold maximising sensitivity + specificity - 1.
    Youden,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("target `{s}`: use sensitivity=0.95, specificity=0.98 or youden");
        if s == "youden" {
            return Ok(Target::Youden);
        }
        let (k, v) = s.split_once('=').ok_or_else(bad)?;
        let v: f64 = v.parse().map_err(|_| bad())?;
        if !(0.0..=1.0).contains(&v) {
            return Err(bad());
        }
        match k {
            "sensitivity" => Ok(Target::Sensitivity(v)),
            "specificity" => Ok(Target::Specificity(v)),
            _ => Err(bad()),
        }
    }
}

impl Target {
    /// The default operating-point name for this target.
    pub fn default_name(self) -> &'static str {
        match self {
            Target::Sensitivity(_) => "screening",
            Target::Specificity(_) => "confirmation",
            Target::Youden => "youden",
        }
    }
}

/// Picks a threshold for `target` on (scores, truth); `None` without both classes.
pub fn choose_threshold(scores: &[f32], truth: &[bool], target: Target) -> Option<f32> {
    let pos = truth.iter().filter(|t| **t).count();
    if pos == 0 || pos == truth.len() {
        return None;
    }
    let mut cands: Vec<f32> = scores.to_vec();
    cands.sort_by(f32::total_cmp);
    cands.dedup();
    // Above every score: nothing is called positive.
    cands.push(next_up(*cands.last().expect("non-empty")));
    let at = |t: f32| BinaryCounts::at(scores, truth, t);
    match target {
        Target::Sensitivity(s) => cands
            .iter()
            .rev()
            .find(|&&t| at(t).sensitivity().unwrap_or(0.0) >= s)
            .copied(),
        Target::Specificity(s) => cands
            .iter()
            .find(|&&t| at(t).specificity().unwrap_or(0.0) >= s)
            .copied(),
        Target::Youden => cands.iter().copied().max_by(|&a, &b| {
            let j = |t| {
                let c = at(t);
                c.sensitivity().unwrap_or(0.0) + c.specificity().unwrap_or(0.0)
            };
            j(a).total_cmp(&j(b))
        }),
    }
}

fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    let bits = x.to_bits();
    f32::from_bits(if x >= 0.0 { bits + 1 } else { bits - 1 })
}

/// Chooses thresholds on `data` and writes them into the bundle as the point `name`.
pub fn calibrate(
    model: &Path,
    data: &Path,
    format: DatasetFormat,
    images: Option<&Path>,
    target: Target,
    name: Option<&str>,
    backend: BackendChoice,
) -> Result<(String, OperatingPoint, Vec<String>)> {
    let s = score(model, data, format, images, backend)?;
    let name = name.unwrap_or(target.default_name()).to_string();
    let mut point = OperatingPoint {
        thresholds: Default::default(),
        method: format!("{target:?} on {} (n={})", data.display(), s.samples.len()),
    };
    let mut report = Vec::new();
    for d in decisions(&s.bundle.metadata.config) {
        let (scores, truth) = decision_scores(&s, &d);
        let Some(t) = choose_threshold(&scores, &truth, target) else {
            report.push(format!(
                "{d}: not calibrated (the set needs positives and negatives)"
            ));
            continue;
        };
        let c = BinaryCounts::at(&scores, &truth, t);
        report.push(format!(
            "{d}: threshold {t:.4} -> sensitivity {:.3}, specificity {:.3} (n={})",
            c.sensitivity().unwrap_or(f64::NAN),
            c.specificity().unwrap_or(f64::NAN),
            scores.len()
        ));
        point.thresholds.insert(d, t);
    }
    if point.thresholds.is_empty() {
        bail!("no decision could be calibrated on {}", data.display());
    }
    let mut meta = s.bundle.metadata.clone();
    meta.operating_points.insert(name.clone(), point.clone());
    meta.save_in_place(model)?;
    Ok((name, point, report))
}

fn num(v: Option<f64>) -> Value {
    v.filter(|x| x.is_finite())
        .map(Value::from)
        .unwrap_or(Value::Null)
}

fn auc_with_interval(scores: &[f32], truth: &[bool], seed: u64) -> (Option<f64>, Value) {
    let auc = metrics::roc_auc(scores, truth);
    let ci = metrics::bootstrap_interval(scores.len(), 1000, 0.95, seed, |idx| {
        let s: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        let t: Vec<bool> = idx.iter().map(|&i| truth[i]).collect();
        metrics::roc_auc(&s, &t)
    });
    (
        auc,
        ci.map(|(lo, hi)| json!([lo, hi])).unwrap_or(Value::Null),
    )
}

/// Evaluates a bundle on a labelled set; writes `metrics.json`, `report.md` and figures into
/// `out`. Returns the metrics.
pub fn evaluate(
    model: &Path,
    data: &Path,
    format: DatasetFormat,
    images: Option<&Path>,
    out: &Path,
    point_name: Option<&str>,
    backend: BackendChoice,
) -> Result<Value> {
    let s = score(model, data, format, images, backend)?;
    let meta = &s.bundle.metadata;
    let pname = point_name.unwrap_or(&meta.default_point).to_string();
    let point = meta.operating_points.get(&pname).ok_or_else(|| {
        anyhow!(
            "the model has no operating point `{pname}` (it has {:?})",
            meta.operating_points.keys().collect::<Vec<_>>()
        )
    })?;
    std::fs::create_dir_all(out)?;
    let mut root = Map::new();
    root.insert("model".into(), json!(model.display().to_string()));
    root.insert("data".into(), json!(data.display().to_string()));
    root.insert(
        "operating_point".into(),
        json!({"name": pname, "method": point.method, "thresholds": point.thresholds}),
    );
    root.insert("backend".into(), json!(s.backend));
    let mut curves = Vec::new();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Evaluation report\n\n- model: `{}`\n- data: `{}` ({} images)\n- operating point: `{pname}` ({})\n- backend: {}\n",
        model.display(),
        data.display(),
        s.samples.len(),
        point.method,
        s.backend
    );

    for spec in &meta.config.heads {
        let present: Vec<usize> = (0..s.samples.len())
            .filter(|&i| s.samples[i].labels.contains_key(&spec.name))
            .collect();
        let missing = s.samples.len() - present.len();
        let mut h = Map::new();
        h.insert("n".into(), json!(present.len()));
        h.insert("missing".into(), json!(missing));
        match spec.kind {
            HeadKind::Multiclass(k) => {
                let truth: Vec<usize> = present
                    .iter()
                    .map(|&i| s.samples[i].labels[&spec.name] as usize)
                    .collect();
                let pred: Vec<usize> = present
                    .iter()
                    .map(|&i| match &s.preds[i].heads[&spec.name] {
                        HeadAnswer::Multiclass { class, .. } => *class,
                        _ => 0,
                    })
                    .collect();
                let acc = (!truth.is_empty()).then(|| {
                    truth.iter().zip(&pred).filter(|(a, b)| a == b).count() as f64
                        / truth.len() as f64
                });
                let cm = metrics::confusion(&truth, &pred, k);
                h.insert("accuracy".into(), num(acc));
                h.insert(
                    "quadratic_kappa".into(),
                    num(metrics::quadratic_kappa(&truth, &pred, k)),
                );
                h.insert("confusion".into(), json!(cm));
                let names = meta
                    .class_names
                    .get(&spec.name)
                    .cloned()
                    .unwrap_or_else(|| (0..k).map(|i| i.to_string()).collect());
                let _ = writeln!(
                    md,
                    "## {} (multiclass, n = {}, missing = {missing})\n\n| accuracy | quadratic kappa |\n|---|---|\n| {} | {} |\n",
                    spec.name,
                    present.len(),
                    fmt(acc),
                    fmt(metrics::quadratic_kappa(&truth, &pred, k))
                );
                let _ = writeln!(
                    md,
                    "Confusion matrix (rows: truth, columns: prediction):\n\n| | {} |\n|---|{}",
                    names.join(" | "),
                    "---|".repeat(k)
                );
                for (i, row) in cm.iter().enumerate() {
                    let cells: Vec<String> = row.iter().map(|c| c.to_string()).collect();
                    let _ = writeln!(md, "| **{}** | {} |", names[i], cells.join(" | "));
                }
                let _ = writeln!(md, "\n![confusion](confusion_{}.png)\n", spec.name);
                plots::confusion(
                    &out.join(format!("confusion_{}.png", spec.name)),
                    &format!("{}: confusion matrix", spec.name),
                    &cm,
                    &names,
                )?;
                if spec.name == retina_model::DIAGNOSIS && k == 5 {
                    binary_block(
                        &s,
                        "referable",
                        point,
                        &mut h,
                        &mut md,
                        &mut curves,
                        "referable_",
                    );
                }
            }
            HeadKind::Binary => {
                binary_block(&s, &spec.name, point, &mut h, &mut md, &mut curves, "")
            }
            HeadKind::Regression => {
                let truth: Vec<f32> = present
                    .iter()
                    .map(|&i| s.samples[i].labels[&spec.name])
                    .collect();
                let pred: Vec<f32> = present
                    .iter()
                    .map(|&i| match &s.preds[i].heads[&spec.name] {
                        HeadAnswer::Regression { value } => value.clamp(0.0, 1.0),
                        _ => 0.0,
                    })
                    .collect();
                let (mae, rmse, r) = (
                    metrics::mae(&pred, &truth),
                    metrics::rmse(&pred, &truth),
                    metrics::pearson(&pred, &truth),
                );
                h.insert("mae".into(), num(mae));
                h.insert("rmse".into(), num(rmse));
                h.insert("pearson_r".into(), num(r));
                let _ = writeln!(
                    md,
                    "## {} (regression, n = {}, missing = {missing})\n\n| MAE | RMSE | Pearson r |\n|---|---|---|\n| {} | {} | {} |\n",
                    spec.name,
                    present.len(),
                    fmt(mae),
                    fmt(rmse),
                    fmt(r)
                );
            }
        }
        root.insert(spec.name.clone(), Value::Object(h));
    }
    if !curves.is_empty() {
        plots::roc(
            &out.join("roc.png"),
            &format!("ROC, operating point `{pname}`"),
            &curves,
        )?;
        let _ = writeln!(md, "## ROC curves\n\n![roc](roc.png)\n");
    }
    // Training curves, when the bundle sits in a run directory.
    if let Some(run) = model.parent() {
        let log = run.join("metrics.jsonl");
        if log.is_file() {
            let logs = read_logs(&log)?;
            plots::training(&out.join("training.png"), &logs)?;
            let _ = writeln!(md, "## Training curves\n\n![training](training.png)\n");
        }
    }
    let metrics = Value::Object(root);
    write_file_atomic(
        &out.join("metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    write_file_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(metrics)
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

fn binary_block(
    s: &Scored,
    decision: &str,
    point: &OperatingPoint,
    h: &mut Map<String, Value>,
    md: &mut String,
    curves: &mut Vec<plots::RocCurve>,
    prefix: &str,
) {
    let (scores, truth) = decision_scores(s, decision);
    let t = point.threshold(decision);
    let c = BinaryCounts::at(&scores, &truth, t);
    let (auc, ci) = auc_with_interval(&scores, &truth, 7);
    h.insert(format!("{prefix}auc"), num(auc));
    h.insert(format!("{prefix}auc_ci95"), ci.clone());
    h.insert(format!("{prefix}threshold"), json!(t));
    h.insert(format!("{prefix}sensitivity"), num(c.sensitivity()));
    h.insert(format!("{prefix}specificity"), num(c.specificity()));
    h.insert(format!("{prefix}ppv"), num(c.ppv()));
    h.insert(format!("{prefix}npv"), num(c.npv()));
    h.insert(format!("{prefix}f1"), num(c.f1()));
    h.insert(format!("{prefix}prevalence"), num(c.prevalence()));
    let ci_text = ci
        .as_array()
        .map(|a| {
            format!(
                "{:.3}-{:.3}",
                a[0].as_f64().unwrap_or(0.0),
                a[1].as_f64().unwrap_or(0.0)
            )
        })
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(
        md,
        "### {decision} (n = {})\n\n| AUC (95% CI) | threshold | sensitivity | specificity | PPV | NPV | F1 | prevalence |\n|---|---|---|---|---|---|---|---|\n| {} ({ci_text}) | {t:.3} | {} | {} | {} | {} | {} | {} |\n",
        scores.len(),
        fmt(auc),
        fmt(c.sensitivity()),
        fmt(c.specificity()),
        fmt(c.ppv()),
        fmt(c.npv()),
        fmt(c.f1()),
        fmt(c.prevalence())
    );
    if auc.is_some() {
        curves.push(plots::RocCurve {
            name: format!("{decision} (AUC {:.3})", auc.unwrap_or(0.0)),
            points: metrics::roc_curve(&scores, &truth)
                .into_iter()
                .map(|(x, y, _)| (x, y))
                .collect(),
            operating: (
                1.0 - c.specificity().unwrap_or(0.0),
                c.sensitivity().unwrap_or(0.0),
            ),
        });
    }
}
