//! `retina-train eval` and `calibrate`: screening metrics with confidence intervals, operating
//! points chosen on validation data, and reports with figures.

use crate::calibration;
use crate::data::LoaderSpec;
use crate::dataset::{DatasetFormat, Sample, check_images, read_labels};
use crate::metrics::{self, BinaryCounts};
use crate::plots;
use crate::scoring::predict;
use crate::scoring::{DecisionScore, HeadScore, score_heads};
use crate::trainer::read_logs;
use anyhow::{Result, bail};
use retina_model::host::write_atomic;
use retina_model::{
    BackendChoice, BundleMetadata, HeadKind, ModelBundle, OperatingPoint, Prediction,
};
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
    /// Content hashes of the images, recorded as they were decoded.
    pub hashes: Arc<crate::dataset::ImageHashes>,
    /// Where the model ran (the heat maps of the report run there too).
    pub device: burn::prelude::Device,
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
    let file = read_labels(data, format, images, &bundle.metadata.config.heads)?;
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
        check: Some(bundle.metadata.config.gradability()),
        ..LoaderSpec::plain(bundle.metadata.config.preprocess.clone(), heads.clone())
    };
    let samples = Arc::new(file.samples);
    let (preds, _) = predict(&bundle.model, None, &spec, &samples, 16, &backend.device)?;
    Ok(Scored {
        bundle,
        samples: Arc::try_unwrap(samples).unwrap_or_else(|a| (*a).clone()),
        preds,
        backend: backend.description,
        device: backend.device,
        hashes: spec.hashes,
    })
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

/// The rule the refusing decision (`ungradable`) is calibrated by, whatever the target of
/// the clinical decisions: refuse as much as possible while passing 99% of gradable images.
pub const REFUSAL_TARGET: Target = Target::Specificity(0.99);

/// Fits each classification head's temperature on the images the model answers (the
/// refusing head on all) at a bundle's first calibration; returns the predictions at the new
/// temperatures and a line per head. Later calibrations keep the temperatures, so every
/// operating point of a bundle refers to the same probabilities.
fn fit_temperatures(
    meta: &mut BundleMetadata,
    samples: &[Sample],
    preds: &[Prediction],
) -> Result<(Vec<Prediction>, Vec<String>)> {
    let old = meta.config.heads.clone();
    // Points chosen before would refer to other probabilities: only a bundle's first
    // calibration fits temperatures.
    let first = meta.operating_points == BundleMetadata::new(meta.config.clone()).operating_points;
    if !first {
        let kept = if old.iter().any(|h| h.temperature.is_some()) {
            "temperatures kept (fitted by the bundle's first calibration)"
        } else {
            "no temperatures fitted: the bundle's points were chosen without them (calibrate a \
             freshly trained bundle to fit them)"
        };
        return Ok((preds.to_vec(), vec![kept.into()]));
    }
    let gate = meta.point(None)?.1.clone();
    let mut report = Vec::new();
    for (i, spec) in old.iter().enumerate() {
        if spec.kind == HeadKind::Regression {
            continue;
        }
        let (z, y): (Vec<Vec<f32>>, Vec<f32>) = samples
            .iter()
            .zip(preds)
            .filter(|(_, p)| p.check.is_none() && (spec.refuses() || p.gradable(&gate)))
            .filter_map(|(s, p)| {
                Some((
                    calibration::logits(p, spec)?.to_vec(),
                    *s.labels.get(&spec.name)?,
                ))
            })
            .unzip();
        // With one class only, sharper is always likelier: the fit would run to its bound.
        let classes: std::collections::BTreeSet<u32> = y.iter().map(|v| *v as u32).collect();
        if classes.len() < 2 {
            report.push(format!(
                "{}: {} labelled images of {} class, temperature left at 1",
                spec.name,
                y.len(),
                classes.len()
            ));
            continue;
        }
        let Some(t) = calibration::fit_temperature(&z, &y, spec.kind) else {
            continue;
        };
        report.push(format!(
            "{}: temperature {t:.3} (NLL {:.4} -> {:.4} on {} images)",
            spec.name,
            calibration::nll(&z, &y, spec.kind, 1.0).max(0.0),
            calibration::nll(&z, &y, spec.kind, t).max(0.0),
            z.len()
        ));
        meta.config.heads[i].temperature = Some(t);
    }
    let preds = preds
        .iter()
        .map(|p| calibration::retemper(p, &meta.config.heads))
        .collect();
    Ok((preds, report))
}

/// Fits the heads' temperatures (on a bundle's first calibration), chooses thresholds on
/// `data` and writes them into the bundle as the point `name`. The refusing decision is
/// calibrated by [`REFUSAL_TARGET`]; where the data do not label it, it keeps the default
/// point's threshold.
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
    let mut meta = s.bundle.metadata.clone();
    let (preds, mut report) = fit_temperatures(&mut meta, &s.samples, &s.preds)?;
    let mut point = OperatingPoint {
        thresholds: Default::default(),
        method: format!("{target:?} on {} (n={})", data.display(), s.samples.len()),
    };
    let mut missing = Vec::new();
    let heads = &meta.config.heads;
    // Clinical decisions are scored on the images the default point answers.
    let (_, gate) = meta.point(None)?;
    for head in score_heads(heads, &s.samples, &preds, gate) {
        let Some(decision) = head.decision else {
            continue;
        };
        let (d, scores, truth) = (decision.decision.name, decision.scores, decision.truth);
        let refusing = head.spec.refuses();
        let rule = if refusing { REFUSAL_TARGET } else { target };
        let Some(t) = choose_threshold(&scores, &truth, rule) else {
            if refusing && head.n == 0 {
                let t = gate.threshold(&d);
                report.push(format!(
                    "{d}: no quality labels in {}, threshold {t:.4} kept from the default point",
                    data.display()
                ));
                point.thresholds.insert(d, t);
                continue;
            }
            let pos = truth.iter().filter(|t| **t).count();
            missing.push(format!(
                "{d} ({pos} positive, {} negative)",
                truth.len() - pos
            ));
            continue;
        };
        let c = BinaryCounts::at(&scores, &truth, t);
        report.push(format!(
            "{d}: threshold {t:.4} ({rule:?}) -> sensitivity {:.3}, specificity {:.3} (n={})",
            c.sensitivity().unwrap_or(f64::NAN),
            c.specificity().unwrap_or(f64::NAN),
            scores.len()
        ));
        point.thresholds.insert(d, t);
    }
    // A point that left a decision at the uncalibrated 0.5 would look calibrated and decide
    // at a threshold nobody chose: refuse it, and write nothing.
    if !missing.is_empty() {
        bail!(
            "{} cannot calibrate {}: each decision needs positive and negative labelled images; \
             calibrate on a validation set that has both",
            data.display(),
            missing.join(", ")
        );
    }
    // A bundle that has only the uncalibrated 0.5 point makes its first calibrated point the
    // default: otherwise `predict` and `eval` would go on deciding at 0.5 after calibration.
    let uncalibrated = BundleMetadata::new(meta.config.clone()).operating_points;
    if meta.operating_points == uncalibrated {
        meta.default_point = name.clone();
    }
    meta.operating_points.insert(name.clone(), point.clone());
    meta.save_in_place(model)?;
    Ok((name, point, report))
}

/// Makes the operating point `name` the bundle's default (what `predict`, `serve` and `eval` use
/// when no point is named); the error lists the points the bundle has.
pub fn set_default_point(model: &Path, name: &str) -> Result<()> {
    let mut meta = BundleMetadata::load(model)?;
    let (name, _) = meta.point(Some(name))?;
    meta.default_point = name;
    meta.save_in_place(model)?;
    Ok(())
}

fn num(v: Option<f64>) -> Value {
    v.filter(|x| x.is_finite())
        .map(Value::from)
        .unwrap_or(Value::Null)
}

fn auc_interval(scores: &[f32], truth: &[bool], seed: u64) -> Value {
    metrics::bootstrap_interval(scores.len(), 1000, 0.95, seed, |idx| {
        let s: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        let t: Vec<bool> = idx.iter().map(|&i| truth[i]).collect();
        metrics::roc_auc(&s, &t)
    })
    .map(|(lo, hi)| json!([lo, hi]))
    .unwrap_or(Value::Null)
}

/// Evaluates a bundle on a labelled set; writes `metrics.json`, `report.md` and figures into
/// `out`. Returns the metrics: per head the same names validation logs (`accuracy`,
/// `quadratic_kappa`, `referable_auc`, `auc`, `mae`, ...; see [`crate::scoring`]), plus
/// `n`, `missing`, confusion matrices and AUC confidence intervals.
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
    let (pname, point) = meta.point(point_name)?;
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
    // The report names the model and the data by what they are, not by where they sat on the
    // machine that wrote it (a report travels; `metrics.json` keeps the paths).
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    let trained = [
        Some(format!("`{}` preset", meta.config.preset)),
        meta.provenance
            .dataset
            .as_ref()
            .map(|d| format!("trained on {d}")),
        meta.provenance.epochs.map(|e| format!("epoch {e}")),
    ];
    let trained: Vec<String> = trained.into_iter().flatten().collect();
    let data_hash = crate::dataset::content_hash(&s.samples, &s.hashes);
    root.insert("data_hash".into(), json!(data_hash));
    let _ = writeln!(
        md,
        "# Evaluation report\n\n- model: `{}` ({})\n- data: `{}` ({format} format, {} images, {data_hash})\n- operating point: `{pname}` ({})\n- backend: {}\n",
        file_name(model),
        trained.join(", "),
        file_name(data),
        s.samples.len(),
        point.method,
        s.backend
    );

    gradability_report(&s.preds, point, &mut root, &mut md);
    // The same predictions at the network's own temperature, for "before" calibration.
    let untempered: Vec<retina_model::HeadSpec> = meta
        .config
        .heads
        .iter()
        .map(|h| retina_model::HeadSpec {
            temperature: None,
            ..h.clone()
        })
        .collect();
    let tempered = meta.config.heads.iter().any(|h| h.temperature.is_some());
    let raw_preds: Vec<Prediction> = if tempered {
        s.preds
            .iter()
            .map(|p| calibration::retemper(p, &untempered))
            .collect()
    } else {
        s.preds.clone()
    };
    let mut reliability = Vec::new();
    let mut calibration_md = String::new();
    for head in score_heads(&meta.config.heads, &s.samples, &s.preds, point) {
        let mut h = Map::new();
        h.insert("n".into(), json!(head.n));
        h.insert("missing".into(), json!(head.missing));
        h.insert("refused".into(), json!(head.refused));
        if let Some(d) = &head.decision {
            let before: Vec<f32> = d
                .samples
                .iter()
                .map(|&i| {
                    raw_preds[i]
                        .decision_score(&d.decision.name)
                        .unwrap_or(f32::NAN)
                })
                .collect();
            let p = &d.prefix;
            let (ece, brier) = (
                calibration::ece(&d.scores, &d.truth),
                calibration::brier(&d.scores, &d.truth),
            );
            let (ece0, brier0) = (
                calibration::ece(&before, &d.truth),
                calibration::brier(&before, &d.truth),
            );
            h.insert(format!("{p}ece"), num(ece));
            h.insert(format!("{p}brier"), num(brier));
            h.insert(format!("{p}ece_uncalibrated"), num(ece0));
            h.insert(format!("{p}brier_uncalibrated"), num(brier0));
            let _ = writeln!(
                calibration_md,
                "| {} | {} | {} | {} | {} | {} |",
                d.decision.name,
                head.spec
                    .temperature
                    .map(|t| format!("{t:.3}"))
                    .unwrap_or_else(|| "1 (none)".into()),
                fmt(ece0),
                fmt(ece),
                fmt(brier0),
                fmt(brier)
            );
            if !d.scores.is_empty() {
                reliability.push(plots::ReliabilityCurve {
                    name: d.decision.name.clone(),
                    before: calibration::reliability(&before, &d.truth, calibration::BINS),
                    after: calibration::reliability(&d.scores, &d.truth, calibration::BINS),
                });
            }
        }
        for (k, v) in &head.metrics {
            h.insert(k.clone(), num(*v));
        }
        head_report(&head, out, &mut h, &mut md)?;
        if let Some(d) = &head.decision {
            h.insert(
                format!("{}auc_ci95", d.prefix),
                auc_interval(&d.scores, &d.truth, 7),
            );
            decision_report(d, &h, &mut md, &mut curves);
        }
        root.insert(head.spec.name.clone(), Value::Object(h));
    }
    if !reliability.is_empty() {
        plots::reliability(
            &out.join("reliability.png"),
            "Reliability: before and after temperature scaling",
            &reliability,
        )?;
        let _ = writeln!(
            md,
            "## Calibration\n\nExpected calibration error ({} bins) and Brier score of each decision, at the network's own temperature (before) and at the temperature `calibrate` fitted (after: what the model answers).\n\n| decision | temperature | ECE before | ECE after | Brier before | Brier after |\n|---|---|---|---|---|---|\n{calibration_md}\n![reliability](reliability.png)\n",
            calibration::BINS
        );
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
    write_atomic(
        &out.join("metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    crate::gallery::write_report(
        out, &md, &s.bundle, &s.device, &s.samples, &s.preds, point, &pname,
    )?;
    Ok(metrics)
}

/// How many images were refused, by what and why: `gradability` in the metrics, a section of
/// the report. The clinical metrics that follow are of the images answered.
fn gradability_report(
    preds: &[Prediction],
    point: &OperatingPoint,
    root: &mut Map<String, Value>,
    md: &mut String,
) {
    let refusals: Vec<retina_model::Refusal> =
        preds.iter().filter_map(|p| p.refusal(point)).collect();
    let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in &refusals {
        *reasons.entry(r.reason.as_str()).or_default() += 1;
    }
    let by_check = refusals.iter().filter(|r| r.by == "check").count();
    root.insert(
        "gradability".into(),
        json!({
            "n": preds.len(),
            "ungradable": refusals.len(),
            "ungradable_by_check": by_check,
            "ungradable_by_model": refusals.len() - by_check,
            "reasons": reasons,
        }),
    );
    let reasons: Vec<String> = reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(
        md,
        "## Gradability\n\n{} of {} images refused as ungradable ({} by the check before the network, {} by the quality head){}. The clinical metrics below are of the {} images answered.\n",
        refusals.len(),
        preds.len(),
        by_check,
        refusals.len() - by_check,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(": {}", reasons.join(", "))
        },
        preds.len() - refusals.len()
    );
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

/// A head's own section of the report: its table, and its confusion matrix and figure.
fn head_report(
    head: &HeadScore,
    out: &Path,
    h: &mut Map<String, Value>,
    md: &mut String,
) -> Result<()> {
    let spec = &head.spec;
    let get = |k: &str| head.metrics.get(k).copied().flatten();
    let (n, missing) = (head.n, head.missing);
    let missing = if head.refused > 0 {
        format!("{missing}, refused as ungradable = {}", head.refused)
    } else {
        missing.to_string()
    };
    match spec.kind {
        HeadKind::Multiclass(_) => {
            let _ = writeln!(
                md,
                "## {} (multiclass, n = {n}, missing = {missing})\n\n| accuracy | quadratic kappa |\n|---|---|\n| {} | {} |\n",
                spec.name,
                fmt(get("accuracy")),
                fmt(get("quadratic_kappa"))
            );
        }
        HeadKind::Binary => {
            let _ = writeln!(
                md,
                "## {} (binary, n = {n}, missing = {missing})\n",
                spec.name
            );
        }
        HeadKind::Regression => {
            let _ = writeln!(
                md,
                "## {} (regression, n = {n}, missing = {missing})\n\n| MAE | RMSE | Pearson r |\n|---|---|---|\n| {} | {} | {} |\n",
                spec.name,
                fmt(get("mae")),
                fmt(get("rmse")),
                fmt(get("pearson_r"))
            );
        }
    }
    if let Some(cm) = &head.confusion {
        h.insert("confusion".into(), json!(cm));
        let names = spec.class_names();
        let _ = writeln!(
            md,
            "Confusion matrix (rows: truth, columns: prediction):\n\n| | {} |\n|---|{}",
            names.join(" | "),
            "---|".repeat(names.len())
        );
        for (i, row) in cm.iter().enumerate() {
            let cells: Vec<String> = row.iter().map(|c| c.to_string()).collect();
            let _ = writeln!(md, "| **{}** | {} |", names[i], cells.join(" | "));
        }
        let _ = writeln!(md, "\n![confusion](confusion_{}.png)\n", spec.name);
        plots::confusion(
            &out.join(format!("confusion_{}.png", spec.name)),
            &format!("{}: confusion matrix", spec.name),
            cm,
            &names,
        )?;
    }
    Ok(())
}

/// A decision's table in the report, and its ROC curve.
fn decision_report(
    d: &DecisionScore,
    h: &Map<String, Value>,
    md: &mut String,
    curves: &mut Vec<plots::RocCurve>,
) {
    let c = d.counts;
    let ci_text = h
        .get(&format!("{}auc_ci95", d.prefix))
        .and_then(Value::as_array)
        .map(|a| {
            format!(
                "{:.3}-{:.3}",
                a[0].as_f64().unwrap_or(0.0),
                a[1].as_f64().unwrap_or(0.0)
            )
        })
        .unwrap_or_else(|| "-".into());
    let name = &d.decision.name;
    let t = d.threshold;
    let _ = writeln!(
        md,
        "### {name} (n = {})\n\n| AUC (95% CI) | threshold | sensitivity | specificity | PPV | NPV | F1 | prevalence |\n|---|---|---|---|---|---|---|---|\n| {} ({ci_text}) | {t:.3} | {} | {} | {} | {} | {} | {} |\n",
        d.scores.len(),
        fmt(d.auc),
        fmt(c.sensitivity()),
        fmt(c.specificity()),
        fmt(c.ppv()),
        fmt(c.npv()),
        fmt(c.f1()),
        fmt(c.prevalence())
    );
    if let Some(auc) = d.auc {
        curves.push(plots::RocCurve {
            name: format!("{name} (AUC {auc:.3})"),
            points: metrics::roc_curve(&d.scores, &d.truth)
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
