//! The training loop: AdamW with warm-up and cosine decay, masked multi-head losses plus L2,
//! validation metrics each epoch, atomic checkpoints, resume, and export of the best epoch.
//!
//! The loop is our own rather than burn-train's `Learner`: it must stop on a non-finite loss
//! while keeping the last good checkpoint, log every head's loss and the L2 term separately,
//! and select the exported epoch by a screening metric (referable-DR AUC). It uses burn's
//! optimizer, its optimizer-state records and burn-store for weights.

use crate::config::TrainConfig;
use crate::data::{LoaderSpec, ViewCache, epoch_order, split};
use crate::dataset::{DatasetFormat, Sample, check_images, read_labels};
use crate::loss::{HeadTargets, RetinaLoss};
use crate::scoring;
use crate::synth::{self, SynthOptions};
use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use retina_model::host::write_atomic;
use retina_model::{
    BackendChoice, BundleMetadata, HeadKind, ModelBundle, Prediction, RetinaConfig, RetinaNet,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where the training data comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DataSource {
    /// A label file of some format, with an optional image folder.
    Labels {
        /// The label file.
        path: PathBuf,
        /// Its format.
        format: DatasetFormat,
        /// Image folder override.
        images: Option<PathBuf>,
        /// A separate validation label file (same format and image folder).
        val: Option<PathBuf>,
    },
    /// `n` generated images (written into the run directory).
    Synthetic {
        /// Number of images.
        n: usize,
        /// Image side of the generated files.
        size: u32,
    },
}

/// A training request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitRequest {
    /// The data.
    pub data: DataSource,
    /// The run directory.
    pub out: PathBuf,
    /// The configuration (after flag overrides).
    pub config: TrainConfig,
    /// `cpu`, `wgpu`, `auto`, ...
    pub backend: String,
    /// Skip unreadable images instead of failing.
    pub skip_bad_images: bool,
    /// The command line, for provenance.
    pub command: String,
}

/// One epoch's log line in `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochLog {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean total training loss.
    pub train_loss: f64,
    /// Mean training loss of each head (unweighted).
    pub train_head_loss: BTreeMap<String, f64>,
    /// Mean L2 term (the coefficient times the sum of squares).
    pub train_l2: f64,
    /// Validation metrics (`val_loss`, `referable_auc`, `kappa`, `fluid_auc`, ...).
    pub val: BTreeMap<String, f64>,
    /// Learning rate at the end of the epoch.
    pub learning_rate: f64,
    /// Training images per second (step time only).
    pub train_img_per_s: f64,
    /// Seconds the training loop waited for the data pipeline (decoding and augmenting runs on
    /// other threads; near zero when loading keeps up with the step).
    #[serde(default)]
    pub data_wait_s: f64,
    /// Wall time of the epoch, seconds.
    pub seconds: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitSummary {
    /// Run directory.
    pub out: PathBuf,
    /// Backend used.
    pub backend: String,
    /// Samples in the training and validation splits.
    pub train_samples: usize,
    /// Validation samples.
    pub val_samples: usize,
    /// Images skipped as unreadable.
    pub bad_images: usize,
    /// Rows skipped as ungradable by the label format.
    pub ungradable: usize,
    /// Training grade counts (before oversampling).
    pub train_grades: Vec<usize>,
    /// Class weights in effect, per head.
    pub class_weights: BTreeMap<String, Vec<f32>>,
    /// Sampling used.
    pub sampling: String,
    /// The validation metric that picked the exported epoch.
    pub select_metric: String,
    /// The exported epoch and its validation metrics.
    pub best_epoch: usize,
    /// The selection metric's value there.
    pub best_metric: f64,
    /// Validation metrics of the exported epoch.
    pub best_val: BTreeMap<String, f64>,
    /// Total wall time, seconds.
    pub seconds: f64,
    /// Hash of the data set (labels and image list).
    pub dataset_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    epoch: usize,
    step: usize,
    best_epoch: usize,
    best_metric: Option<f64>,
}

const CHECKPOINT: &str = "checkpoint";
const METRICS: &str = "metrics.jsonl";
const REQUEST: &str = "run.json";
const MODEL: &str = "model";
/// Most memory the decoded-image cache may take.
const CACHE_BUDGET_BYTES: usize = 4 << 30;

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn dataset_hash(samples: &[Sample]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325;
    for s in samples {
        h = fnv1a(s.image.to_string_lossy().as_bytes(), h);
        for (k, v) in &s.labels {
            h = fnv1a(k.as_bytes(), h);
            h = fnv1a(&v.to_le_bytes(), h);
        }
    }
    format!("fnv1a64:{h:016x}")
}

fn git_revision() -> Option<String> {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Loads the samples of a request; returns (train, val, skipped ungradable, missing files
/// skipped).
fn load_samples(
    req: &FitRequest,
    heads: &[retina_model::HeadSpec],
) -> Result<(Vec<Sample>, Vec<Sample>, usize, usize)> {
    let cfg = &req.config;
    match &req.data {
        DataSource::Synthetic { n, size } => {
            let dir = req.out.join("synthetic");
            let label = synth::label_path(&dir, DatasetFormat::Native);
            if !label.is_file() {
                eprintln!(
                    "generating {n} synthetic images ({size} px) into {}",
                    dir.display()
                );
                synth::generate(&SynthOptions {
                    out: dir.clone(),
                    count: *n,
                    size: *size,
                    seed: cfg.seed,
                    grades: synth::SCREENING_MIX,
                    missing: 0.0,
                    format: DatasetFormat::Native,
                    progress: std::io::stderr().is_terminal(),
                })?;
            }
            let file = read_labels(&label, DatasetFormat::Native, None, heads)?;
            let (train, val) = split(&file.samples, cfg.val_fraction, cfg.seed);
            Ok((train, val, 0, 0))
        }
        DataSource::Labels {
            path,
            format,
            images,
            val,
        } => {
            let mut file = read_labels(path, *format, images.as_deref(), heads)?;
            let mut missing = 0;
            let keep_present =
                |f: &mut crate::dataset::LabelFile, missing: &mut usize| -> Result<()> {
                    if req.skip_bad_images {
                        let before = f.samples.len();
                        f.samples.retain(|s| s.image.is_file());
                        *missing += before - f.samples.len();
                        Ok(())
                    } else {
                        check_images(f).map_err(|e| {
                            anyhow!("{e}\nhint: pass --images DIR, or --skip-bad-images to skip it")
                        })
                    }
                };
            keep_present(&mut file, &mut missing)?;
            let ungradable = file.skipped_ungradable;
            match val {
                Some(v) => {
                    let mut vf = read_labels(v, *format, images.as_deref(), heads)?;
                    keep_present(&mut vf, &mut missing)?;
                    Ok((
                        file.samples,
                        vf.samples,
                        ungradable + vf.skipped_ungradable,
                        missing,
                    ))
                }
                None => {
                    let (t, v) = split(&file.samples, cfg.val_fraction, cfg.seed);
                    Ok((t, v, ungradable, missing))
                }
            }
        }
    }
}

/// Learning rate at `step` of `total`: linear warm-up, then cosine decay to 1% of the peak.
pub fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let floor = 0.01 * peak;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
}

fn label_counts(samples: &[Sample], head: &str, kind: HeadKind) -> Option<Vec<usize>> {
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

fn targets(t: &[Vec<Option<f32>>], device: &Device) -> Vec<HeadTargets> {
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

fn write_checkpoint(
    out: &Path,
    model: &RetinaNet,
    optim: &burn::optim::ModuleOptimizer,
    meta: &BundleMetadata,
    state: &CheckpointState,
) -> Result<()> {
    let final_dir = out.join(CHECKPOINT);
    let partial = out.join(format!(".{CHECKPOINT}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    // burn's own module record keeps each parameter's id, which the optimizer state is keyed
    // by; weights restored from safetensors would get fresh ids and silently lose Adam's moments.
    model
        .clone()
        .save_file(partial.join("model.bpk"))
        .map_err(|e| anyhow!("cannot save the checkpoint weights: {e:?}"))?;
    write_atomic(
        &partial.join("model.json"),
        serde_json::to_string_pretty(meta)?.as_bytes(),
    )?;
    optim
        .save(partial.join("optimizer.bpk"))
        .map_err(|e| anyhow!("cannot save the optimizer state: {e:?}"))?;
    write_atomic(
        &partial.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    // Swap: the old checkpoint stays until the new one is complete.
    let old = out.join(format!(".{CHECKPOINT}.old"));
    let _ = std::fs::remove_dir_all(&old);
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old)?;
    }
    std::fs::rename(&partial, &final_dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Reads `metrics.jsonl`; a line that does not parse is an error at `file:line:column`.
pub fn read_logs(path: &Path) -> Result<Vec<EpochLog>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow!("{}:{}:{}: {e}", path.display(), i + 1, e.column()))
        })
        .collect()
}

fn write_logs(path: &Path, logs: &[EpochLog]) -> Result<()> {
    let mut s = String::new();
    for l in logs {
        s.push_str(&serde_json::to_string(l)?);
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())?;
    Ok(())
}

/// Continues the run in `dir` from its last checkpoint; `epochs` may extend it.
pub fn resume(dir: &Path, epochs: Option<usize>) -> Result<FitSummary> {
    let text = std::fs::read_to_string(dir.join(REQUEST))
        .with_context(|| format!("{} is not a run directory (no {REQUEST})", dir.display()))?;
    let mut req: FitRequest = serde_json::from_str(&text)?;
    if let Some(e) = epochs {
        req.config.epochs = e;
    }
    req.out = dir.to_path_buf();
    fit_inner(req, true)
}

/// Trains a new run.
pub fn fit(req: FitRequest) -> Result<FitSummary> {
    if req.out.join(CHECKPOINT).exists() {
        bail!(
            "{} already holds a training run; use --resume {} to continue it, or choose another --out",
            req.out.display(),
            req.out.display()
        );
    }
    fit_inner(req, false)
}

fn fit_inner(req: FitRequest, resuming: bool) -> Result<FitSummary> {
    let started = Instant::now();
    let cfg = req.config.clone();
    cfg.validate()?;
    let model_config: RetinaConfig = cfg.model_config()?;
    scoring::check_metric(&cfg.select_metric, &model_config.heads).map_err(|e| anyhow!(e))?;
    std::fs::create_dir_all(&req.out)
        .with_context(|| format!("cannot create {}", req.out.display()))?;
    write_atomic(
        &req.out.join(REQUEST),
        serde_json::to_string_pretty(&req)?.as_bytes(),
    )?;

    let choice: BackendChoice = req.backend.parse().map_err(|e: String| anyhow!(e))?;
    let backend = choice.select()?;
    eprintln!("backend: {}", backend.description);
    let device = backend.device.clone();
    device.seed(cfg.seed);
    let ad = device.clone().autodiff();

    let (train, val, ungradable, missing_files) = load_samples(&req, &model_config.heads)?;
    if train.is_empty() {
        bail!("no training samples left after the split");
    }
    let hash = dataset_hash(&train);
    let head_names: Vec<String> = model_config.heads.iter().map(|h| h.name.clone()).collect();
    let counts = |h: &str| {
        model_config
            .head(h)
            .and_then(|spec| label_counts(&train, h, spec.kind))
    };
    let loss = cfg.loss.init(&model_config.heads, &counts)?;
    let train_grades = counts(retina_model::DIAGNOSIS).unwrap_or_default();
    eprintln!(
        "data: {} training / {} validation images; training grades 0-4: {:?}; sampling {:?}",
        train.len(),
        val.len(),
        train_grades,
        cfg.sampling
    );

    let mut metadata = BundleMetadata::new(model_config.clone());
    let mut model = model_config.init(&ad)?;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .with_epsilon(1e-8)
        .init();
    let metrics_path = req.out.join(METRICS);
    let mut logs = Vec::new();
    let mut state = CheckpointState {
        epoch: 0,
        step: 0,
        best_epoch: 0,
        best_metric: None,
    };
    if resuming {
        let ck = req.out.join(CHECKPOINT);
        let st: CheckpointState = serde_json::from_str(
            &std::fs::read_to_string(ck.join("state.json"))
                .context("reading the checkpoint state")?,
        )?;
        model = model.try_load_file(ck.join("model.bpk")).map_err(|e| {
            anyhow!(
                "cannot load the checkpoint weights {}: {e:?}",
                ck.join("model.bpk").display()
            )
        })?;
        optim = optim
            .load(ck.join("optimizer.bpk"))
            .map_err(|e| anyhow!("cannot load the optimizer state: {e:?}"))?;
        logs = read_logs(&metrics_path)?;
        logs.retain(|l| l.epoch <= st.epoch);
        eprintln!("resuming after epoch {} (step {})", st.epoch, st.step);
        state = st;
    }

    // Decoded views cost S*S*3 bytes each; past the budget, decode every epoch instead of
    // exhausting memory on a large data set.
    let side = model_config.preprocess.image_size;
    let cache_bytes = (train.len() + val.len()) * side * side * 3;
    let cache_images = cfg.cache_images && cache_bytes <= CACHE_BUDGET_BYTES;
    if cfg.cache_images && !cache_images {
        eprintln!(
            "not caching decoded images: they would need {} MiB (budget {} MiB); decoding each epoch",
            cache_bytes >> 20,
            CACHE_BUDGET_BYTES >> 20
        );
    }
    let cache = cache_images.then(|| Arc::new(ViewCache::default()));
    let train_spec = LoaderSpec {
        preprocess: model_config.preprocess.clone(),
        heads: head_names.clone(),
        augment: cfg.augment,
        skip_bad: req.skip_bad_images,
        cache: cache.clone(),
        seed: cfg.seed,
    };
    let val_spec = LoaderSpec {
        augment: None,
        ..train_spec.clone()
    };
    let train = Arc::new(train);
    let val = Arc::new(val);
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let warmup = (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize;
    let s = model_config.preprocess.image_size;
    let tty = std::io::stderr().is_terminal();
    let mut bad_images = 0usize;
    let mut best_val = logs
        .iter()
        .find(|l| l.epoch == state.best_epoch)
        .map(|l| l.val.clone())
        .unwrap_or_default();

    for epoch in state.epoch + 1..=cfg.epochs {
        let t_epoch = Instant::now();
        let order = epoch_order(&train, cfg.sampling, cfg.seed, epoch);
        let rx = train_spec.clone().spawn(
            train.clone(),
            order,
            cfg.batch_size,
            3,
            (epoch * steps_per_epoch) as u64,
        );
        let bar = if tty {
            ProgressBar::new(steps_per_epoch as u64).with_style(
                ProgressStyle::with_template("epoch {msg} {bar:30} {pos}/{len} [{elapsed}<{eta}]")
                    .expect("valid template"),
            )
        } else {
            ProgressBar::hidden()
        };
        bar.set_message(format!("{epoch}/{}", cfg.epochs));
        let (mut sum_total, mut sum_l2, mut n_seen) = (0.0f64, 0.0f64, 0usize);
        let mut sum_heads = vec![0.0f64; head_names.len()];
        let mut step_time = 0.0f64;
        let mut data_wait = 0.0f64;
        let mut lr = 0.0;
        let mut batches = rx.into_iter().enumerate();
        loop {
            let waiting = Instant::now();
            let Some((b, batch)) = batches.next() else {
                break;
            };
            data_wait += waiting.elapsed().as_secs_f64();
            let batch = batch
                .with_context(|| format!("loading training batch {} of epoch {epoch}", b + 1))?;
            bad_images += batch.bad.len();
            for e in &batch.bad {
                eprintln!("skipped: {e}");
            }
            if batch.n == 0 {
                continue;
            }
            let t0 = Instant::now();
            let x = Tensor::<4>::from_data(TensorData::new(batch.images, [batch.n, 3, s, s]), &ad);
            let t = targets(&batch.targets, &ad);
            let out = model.forward(x);
            let l = loss.forward(&model, &out, &t);
            // One host read per step for the NaN check and the logs.
            let mut parts = vec![l.total.clone()];
            parts.extend(l.heads.iter().map(|(_, v)| v.clone()));
            parts.push(l.l2_sum.clone());
            let host: Vec<f32> = Tensor::cat(parts.iter().map(|p| p.clone().detach()).collect(), 0)
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32 host data");
            if !host.iter().all(|v| v.is_finite()) {
                bar.finish_and_clear();
                bail!(
                    "the loss became non-finite ({}) at epoch {epoch}, batch {}: training stopped. \
                     The last good checkpoint (epoch {}) is kept in {}; lower the learning rate \
                     (now {:.2e}) and continue with --resume {}",
                    host[0],
                    b + 1,
                    state.epoch,
                    req.out.join(CHECKPOINT).display(),
                    cfg.learning_rate,
                    req.out.display()
                );
            }
            lr = learning_rate(cfg.learning_rate, state.step, warmup, total_steps);
            let grads = GradientsParams::from_grads(l.total.backward(), &model);
            model = optim.step(lr, model, grads);
            state.step += 1;
            step_time += t0.elapsed().as_secs_f64();
            let n = batch.n as f64;
            sum_total += host[0] as f64 * n;
            for (i, v) in host[1..=head_names.len()].iter().enumerate() {
                sum_heads[i] += *v as f64 * n;
            }
            sum_l2 += *host.last().expect("l2") as f64 * loss.l2 as f64 * n;
            n_seen += batch.n;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let n = n_seen.max(1) as f64;

        // Validation on the inference snapshot (batch norm in eval mode, no autodiff).
        let valid = model.valid();
        let (preds, val_loss) = predict_samples(
            &valid,
            Some(&loss),
            &val_spec,
            &val,
            cfg.batch_size,
            &device,
        )?;
        let mut val_metrics = validation_metrics(&model_config.heads, &val, &preds);
        if let Some(v) = val_loss {
            val_metrics.insert(scoring::VAL_LOSS.into(), v);
        }
        let log = EpochLog {
            epoch,
            train_loss: sum_total / n,
            train_head_loss: head_names
                .iter()
                .cloned()
                .zip(sum_heads.iter().map(|v| v / n))
                .collect(),
            train_l2: sum_l2 / n,
            val: val_metrics.clone(),
            learning_rate: lr,
            train_img_per_s: n_seen as f64 / step_time.max(1e-9),
            data_wait_s: data_wait,
            seconds: t_epoch.elapsed().as_secs_f64(),
        };
        let shown: Vec<String> = val_metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        eprintln!(
            "epoch {epoch}/{}: loss {:.4} (l2 {:.4}), {:.1} img/s, {:.0} s (data wait {:.1} s) | val: {}",
            cfg.epochs,
            log.train_loss,
            log.train_l2,
            log.train_img_per_s,
            log.seconds,
            log.data_wait_s,
            shown.join(", ")
        );
        logs.push(log);
        write_logs(&metrics_path, &logs)?;

        // Export the best epoch as the run's model bundle.
        let current = val_metrics
            .get(&cfg.select_metric)
            .copied()
            .or_else(|| val_metrics.get(scoring::VAL_LOSS).copied());
        let better = match (current, state.best_metric) {
            (Some(c), Some(b)) => {
                if scoring::minimised(&cfg.select_metric) {
                    c < b
                } else {
                    c > b
                }
            }
            (Some(_), None) => true,
            (None, _) => state.best_epoch == 0,
        };
        metadata.provenance = retina_model::Provenance {
            dataset: Some(match &req.data {
                DataSource::Labels { path, format, .. } => format!("{} ({format})", path.display()),
                DataSource::Synthetic { n, size } => {
                    format!("{n} synthetic images at {size} px (seed {})", cfg.seed)
                }
            }),
            dataset_hash: Some(hash.clone()),
            epochs: Some(epoch),
            metrics: val_metrics.clone(),
            created: Some(retina_model::bundle::utc_now_rfc3339()),
            git_revision: git_revision(),
            command: Some(req.command.clone()),
            retina_version: Some(env!("CARGO_PKG_VERSION").into()),
        };
        if better {
            state.best_epoch = epoch;
            state.best_metric = current;
            best_val = val_metrics.clone();
            ModelBundle::new(model.valid(), metadata.clone()).save(&req.out.join(MODEL))?;
        }
        state.epoch = epoch;
        write_checkpoint(&req.out, &model, &optim, &metadata, &state)?;
    }

    let summary = FitSummary {
        out: req.out.clone(),
        backend: backend.description.clone(),
        train_samples: train.len(),
        val_samples: val.len(),
        bad_images: bad_images + missing_files,
        ungradable,
        train_grades,
        class_weights: loss
            .heads
            .iter()
            .filter_map(|h| match (&h.class_weights, h.kind) {
                (Some(w), _) => Some((h.name.clone(), w.clone())),
                (None, HeadKind::Binary) => Some((h.name.clone(), h.binary_weights.to_vec())),
                _ => None,
            })
            .collect(),
        sampling: format!("{:?}", cfg.sampling).to_lowercase(),
        select_metric: cfg.select_metric.clone(),
        best_epoch: state.best_epoch,
        best_metric: state.best_metric.unwrap_or(f64::NAN),
        best_val,
        seconds: started.elapsed().as_secs_f64(),
        dataset_hash: hash,
    };
    write_atomic(
        &req.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}
