//! The training run: AdamW (or Adam, SGD) with warm-up and cosine decay, masked multi-head
//! losses plus L2, validation metrics each epoch, atomic checkpoints, resume (with the changes
//! that are safe mid-run), and export of the best epoch.
//!
//! The loop is our own rather than burn-train's `Learner`: it must stop on a non-finite loss
//! while keeping the last good checkpoint, log every head's loss and the L2 term separately,
//! and select the exported epoch by a screening metric (referable-DR AUC). It uses burn's
//! optimizer, its optimizer-state records and burn-store for weights.
//!
//! This file wires the pieces: `samples` (what the run trains on), `epoch` (the steps of
//! one epoch), `validation`, `select` (the exported epoch), `schedule` (the learning
//! rate), `run_dir` (everything written to the run directory) and `provenance`.

mod epoch;
mod provenance;
mod run_dir;
mod samples;
pub mod schedule;
mod select;
mod validation;

pub use run_dir::{EpochLog, read_logs};
pub use schedule::learning_rate;
pub use validation::validation_metrics;

use crate::config::overrides::{Change, changes, check_resume};
use crate::config::{Overrides, TrainConfig};
use crate::dataset::DatasetFormat;
use crate::distill::Distiller;
use crate::distributed::{self, AllRanks, Collective, Quiet, sync, together};
use crate::scoring;
use anyhow::{Result, anyhow, bail};
use burn::prelude::*;
use epoch::EpochPlan;
use retina_model::{BackendChoice, BundleMetadata, HeadKind, RetinaConfig};
use run_dir::{CheckpointState, RunDir};
use schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use validation::label_counts;

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
    /// A store made by `retina-train prepare` (views decoded once), with an optional separate
    /// validation store.
    Prepared {
        /// The store folder.
        dir: PathBuf,
        /// A separate validation store.
        val: Option<PathBuf>,
    },
    /// `n` generated images (written into the run directory).
    Synthetic {
        /// Number of images.
        n: usize,
        /// Image side of the generated files.
        size: u32,
        /// Fraction made ungradable (labelled in a `quality` column).
        ungradable: f32,
        /// Relative frequency of grades 0-4 (runs written before it was recorded generated
        /// the screening mix).
        #[serde(default = "screening_mix")]
        grades: [f32; 5],
    },
}

fn screening_mix() -> [f32; 5] {
    crate::synth::SCREENING_MIX
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
    /// Each time the run was resumed: when, by which command, and what it changed.
    #[serde(default)]
    pub resumed: Vec<ResumeRecord>,
    /// The teacher bundle of a distillation run (`retina-train distill`; losses in the
    /// config's `[distill]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<PathBuf>,
}

/// One resumption of a run, recorded in its `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeRecord {
    /// The epoch of the checkpoint it continued from.
    pub after_epoch: usize,
    /// The command line.
    pub command: String,
    /// The settings it changed (config keys, and `backend`).
    pub changed: Vec<Change>,
}

/// What a resumption may change: config keys that are safe mid-run (see
/// [`crate::config::overrides::resume_rule`]) and the backend.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// Config changes (a file's keys and `--set`s), applied over the run's config.
    pub overrides: Overrides,
    /// Another backend.
    pub backend: Option<String>,
    /// The command line, for the record.
    pub command: String,
}

impl Resume {
    /// A resumption with these config changes.
    pub fn new(overrides: Overrides) -> Resume {
        Resume {
            overrides,
            backend: None,
            command: String::new(),
        }
    }
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
    /// Ranks (MPI processes) that trained the model.
    #[serde(default = "one_rank")]
    pub ranks: usize,
    /// Each rank's hash of its weights and running statistics after the last epoch, in rank
    /// order: all equal (the run stops when they are not). Absent with one rank.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_weight_hashes: Vec<String>,
    /// The rank that returned this summary (only rank 0 writes and prints it).
    #[serde(skip)]
    pub rank: usize,
}

fn one_rank() -> usize {
    1
}

/// The request a resumption of the run in `dir` would train: the run's own, with the changes
/// of `resume` applied and recorded. Refuses a change that is not safe mid-run, naming the key
/// and why.
pub fn plan_resume(dir: &Path, resume: &Resume) -> Result<FitRequest> {
    let run = RunDir::new(dir);
    let mut req = run.read_request()?;
    let state = run.read_state()?;
    let config = resume.overrides.apply_to(&req.config)?;
    let mut changed = changes(&req.config, &config)?;
    check_resume(&changed)?;
    config.validate()?;
    if let Some(b) = &resume.backend
        && *b != req.backend
    {
        changed.push(Change {
            key: "backend".into(),
            from: Some(req.backend.clone().into()),
            to: Some(b.clone().into()),
        });
        req.backend = b.clone();
    }
    for c in &changed {
        eprintln!("resume: {c}");
    }
    req.config = config;
    req.out = dir.to_path_buf();
    req.resumed.push(ResumeRecord {
        after_epoch: state.epoch,
        command: resume.command.clone(),
        changed,
    });
    Ok(req)
}

/// Continues the run in `dir` from its last checkpoint, with the changes of `resume` (more
/// epochs, another learning rate, ...; see [`plan_resume`]).
pub fn resume(dir: &Path, resume: &Resume) -> Result<FitSummary> {
    fit_inner(plan_resume(dir, resume)?, true)
}

/// The backend recorded in the run.json of `dir`, if it can be read.
pub fn recorded_backend(dir: &Path) -> Option<String> {
    RunDir::new(dir).read_request().ok().map(|r| r.backend)
}

/// Trains a new run.
pub fn fit(req: FitRequest) -> Result<FitSummary> {
    RunDir::new(&req.out).ensure_fresh()?;
    fit_inner(req, false)
}

fn fit_inner(req: FitRequest, resuming: bool) -> Result<FitSummary> {
    let group = distributed::join()?;
    let group = group.as_ref();
    match train(req, resuming, group) {
        Ok(summary) => Ok(summary),
        // Every rank met these errors together and returns; MPI finalises as each exits.
        Err(e) if group.size() == 1 || e.is::<Quiet>() || e.is::<AllRanks>() => Err(e),
        // An error on one rank that the others cannot know of (an unreadable image, a full
        // disk): they would wait in the next collective forever, so end the job.
        Err(e) => {
            eprintln!("error on rank {} of {}: {e:#}", group.rank(), group.size());
            group.abort(2)
        }
    }
}

fn train(mut req: FitRequest, resuming: bool, group: &dyn Collective) -> Result<FitSummary> {
    let started = Instant::now();
    let root = group.is_root();
    if group.size() > 1 {
        // Rank 0's request (config, data source, backend), so every rank runs the same.
        let bytes = group.broadcast(if root {
            serde_json::to_vec(&req)?
        } else {
            Vec::new()
        });
        req = serde_json::from_slice(&bytes)?;
    }
    let cfg = req.config.clone();
    cfg.validate()?;
    let model_config: RetinaConfig = cfg.model_config()?;
    scoring::check_metric(&cfg.select_metric, &model_config.heads).map_err(|e| anyhow!(e))?;
    distributed::check_split(cfg.batch_size, group.size(), cfg.accumulate)?;
    let run = RunDir::new(&req.out);
    if resuming {
        let ranks = run.read_state()?.ranks;
        if ranks != group.size() {
            return Err(together(
                group,
                anyhow!(
                    "{} was trained on {ranks} rank(s) and this resumption has {}: the data \
                     order, micro-batches and optimizer steps depend on the number of ranks\n\
                     hint: resume with {}",
                    req.out.display(),
                    group.size(),
                    if ranks == 1 {
                        "one process (no mpirun)".to_string()
                    } else {
                        format!("mpirun -np {ranks}")
                    }
                ),
            ));
        }
    }
    if root {
        run.write_request(&req)?;
    }

    let choice: BackendChoice = req.backend.parse().map_err(|e: String| anyhow!(e))?;
    if group.local_size() > 1 && matches!(choice, BackendChoice::Wgpu | BackendChoice::Auto) {
        // One GPU per rank on a machine: the local rank's.
        retina_model::backend::use_gpu_of_local_rank(group.local_rank(), group.local_size());
    }
    let backend = choice.select()?;
    if root {
        eprintln!("backend: {}", backend.description);
        if group.size() > 1 {
            eprintln!("ranks: {}", group.describe());
        }
    }
    let device = backend.device.clone();
    device.seed(cfg.seed);
    let ad = device.clone().autodiff();

    // Before the data: a teacher that does not fit the student fails at once.
    let distiller = match &req.teacher {
        None => None,
        Some(_) if group.size() > 1 => {
            return Err(together(
                group,
                anyhow!(
                    "distillation runs in one process: its projection's gradients are not \
                     all-reduced\nhint: run without mpirun; --set accumulate=K trains the same \
                     global batch in K parts"
                ),
            ));
        }
        Some(dir) => {
            let d = Distiller::new(cfg.distill.clone(), dir, &model_config, &device)?;
            if root {
                eprintln!(
                    "teacher: {} (temperature {}; weights: labels {}, logits {}, binary {}, \
                     features {})",
                    dir.display(),
                    cfg.distill.temperature,
                    cfg.distill.labels,
                    cfg.distill.logits,
                    cfg.distill.binary,
                    cfg.distill.features
                );
            }
            Some(d)
        }
    };

    // Rank 0 first: it may write the data (a synthetic set) the others then read.
    let data = if root {
        let d = samples::load(&req, &model_config);
        group.barrier();
        d?
    } else {
        group.barrier();
        samples::load(&req, &model_config)?
    };
    if data.train.is_empty() {
        bail!("no training samples left after the split");
    }
    let head_names: Vec<String> = model_config.heads.iter().map(|h| h.name.clone()).collect();
    let counts = |h: &str| {
        model_config
            .head(h)
            .and_then(|spec| label_counts(&data.train, h, spec.kind))
    };
    let mut loss = cfg.loss.init(&model_config.heads, &counts)?;
    if let Some(d) = &distiller {
        d.scale_labels(&mut loss, &model_config);
    }
    let loss = loss;
    let train_grades = counts(retina_model::DIAGNOSIS).unwrap_or_default();
    if root {
        eprintln!(
            "data: {} training / {} validation images; training grades 0-4: {:?}; sampling {:?}",
            data.train.len(),
            data.val.len(),
            train_grades,
            cfg.data.sampling
        );
    }

    let mut metadata = BundleMetadata::new(model_config.clone());
    let mut model = model_config.init(&ad)?;
    let mut projection = distiller.as_ref().and_then(|d| d.projection(&ad));
    let mut optim = cfg.optimizer.init();
    let mut logs = Vec::new();
    let mut state = CheckpointState {
        ranks: group.size(),
        ..CheckpointState::default()
    };
    if resuming {
        let (m, o, p, st) = run.read_checkpoint(model, optim, projection)?;
        (model, optim, projection) = (m, o, p);
        logs = run.read_logs()?;
        logs.retain(|l| l.epoch <= st.epoch);
        if root {
            eprintln!("resuming after epoch {} (step {})", st.epoch, st.step);
        }
        state = st;
    } else {
        // Every rank starts from rank 0's weights.
        model = sync::broadcast_model(group, model);
    }

    let teacher_input = distiller
        .as_ref()
        .and_then(|d| d.teacher_preprocess.as_ref());
    let (train_spec, val_spec) = samples::loader_specs(&req, &model_config, &data, teacher_input);
    // Named by the images' bytes, hashed as the first epoch decodes them.
    let mut hash = None;
    let train = Arc::new(data.train);
    let val = Arc::new(data.val);
    // Each rank validates a contiguous shard; the predictions are gathered in order.
    let val_shard = {
        let r = distributed::part(val.len(), group.rank(), group.size());
        Arc::new(val[r].to_vec())
    };
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let schedule = Schedule::new(
        cfg.optimizer.learning_rate,
        &cfg.schedule,
        steps_per_epoch,
        cfg.epochs,
    );
    let plan = EpochPlan {
        loss: &loss,
        spec: &train_spec,
        samples: &train,
        sampling: cfg.data.sampling,
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        steps_per_epoch,
        epochs: cfg.epochs,
        schedule: &schedule,
        device: &ad,
        base_device: &device,
        run_dir: run.root(),
        group,
        accumulate: cfg.accumulate,
        distill: distiller.as_ref(),
    };
    let mut bad_images = 0usize;
    let mut best_val = logs
        .iter()
        .find(|l| l.epoch == state.best_epoch)
        .map(|l| l.val.clone())
        .unwrap_or_default();
    let mut weight_hashes = Vec::new();

    for epoch in state.epoch + 1..=cfg.epochs {
        let t_epoch = Instant::now();
        let (trained, totals) = plan.run(
            epoch,
            model,
            &mut projection,
            &mut optim,
            &mut state.step,
            state.epoch,
        )?;
        // Each rank's batch-norm statistics come from its own shard: one average for all.
        model = sync::average_running_statistics(group, trained);
        weight_hashes = sync::check_identical(group, &model).map_err(|e| together(group, e))?;
        bad_images += totals.bad_images;

        // Validation on the inference snapshot (batch norm in eval mode, no autodiff).
        let (preds, val_loss) = validation::predict_sharded(
            group,
            &model.valid(),
            &loss,
            &val_spec,
            &val_shard,
            cfg.batch_size,
            &device,
        )?;
        let mut val_metrics = validation_metrics(&model_config.heads, &val, &preds);
        if let Some(v) = val_loss {
            val_metrics.insert(scoring::VAL_LOSS.into(), v);
        }
        let parallel = group.size() > 1;
        let log = EpochLog {
            epoch,
            train_loss: totals.loss,
            train_head_loss: head_names.iter().cloned().zip(totals.head_loss).collect(),
            train_l2: totals.l2,
            val: val_metrics.clone(),
            learning_rate: totals.learning_rate,
            train_img_per_s: totals.img_per_s,
            data_wait_s: totals.data_wait_s,
            seconds: t_epoch.elapsed().as_secs_f64(),
            ranks: parallel.then_some(group.size()),
            allreduce_s_per_step: parallel.then(|| totals.allreduce_s / totals.steps.max(1) as f64),
            allreduce_bytes_per_step: parallel.then_some(totals.allreduce_bytes),
            train_distill_loss: totals.distill.clone(),
        };
        let current = val_metrics
            .get(&cfg.select_metric)
            .copied()
            .or_else(|| val_metrics.get(scoring::VAL_LOSS).copied());
        let improves = select::improves(
            &cfg.select_metric,
            current,
            state.best_metric,
            state.best_epoch,
        );
        if improves {
            state.best_epoch = epoch;
            state.best_metric = current;
            best_val = val_metrics.clone();
        }
        state.epoch = epoch;
        logs.push(log.clone());
        if !root {
            continue;
        }
        report(&log, cfg.epochs);
        run.write_logs(&logs)?;

        // Export the best epoch as the run's model bundle.
        let hash =
            hash.get_or_insert_with(|| crate::dataset::content_hash(&train, &train_spec.hashes));
        metadata.provenance = provenance::provenance(&req, hash, epoch, &val_metrics);
        if improves {
            run.export_best(model.valid(), &metadata)?;
        }
        run.write_checkpoint(&model, &optim, projection.as_ref(), &metadata, &state)?;
    }
    // The other ranks read nothing rank 0 writes after this point, but their summary must not
    // claim an exported model before it exists.
    group.barrier();

    let summary = FitSummary {
        out: req.out.clone(),
        backend: backend.description.clone(),
        train_samples: train.len(),
        val_samples: val.len(),
        bad_images: bad_images + data.missing,
        ungradable: data.ungradable,
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
        sampling: format!("{:?}", cfg.data.sampling).to_lowercase(),
        select_metric: cfg.select_metric.clone(),
        best_epoch: state.best_epoch,
        best_metric: state.best_metric.unwrap_or(f64::NAN),
        best_val,
        seconds: started.elapsed().as_secs_f64(),
        dataset_hash: hash
            .unwrap_or_else(|| crate::dataset::content_hash(&train, &train_spec.hashes)),
        ranks: group.size(),
        rank_weight_hashes: weight_hashes.iter().map(|h| format!("{h:016x}")).collect(),
        rank: group.rank(),
    };
    if root {
        run.write_summary(&summary)?;
    }
    Ok(summary)
}

/// The epoch's line on stderr.
/// One line per epoch on the terminal: the headline metrics (all of them are in metrics.jsonl).
fn report(log: &EpochLog, epochs: usize) {
    let shown: Vec<String> = log
        .val
        .iter()
        .filter(|(k, _)| scoring::is_headline(k))
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    eprintln!(
        "epoch {}/{epochs}: loss {:.4} (l2 {:.4}), {:.1} img/s, {:.0} s (data wait {:.1} s) | val: {}",
        log.epoch,
        log.train_loss,
        log.train_l2,
        log.train_img_per_s,
        log.seconds,
        log.data_wait_s,
        shown.join(", ")
    );
}
