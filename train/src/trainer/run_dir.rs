//! The run directory: `run.json` (the request), `metrics.jsonl` (one [`EpochLog`] a line), the
//! checkpoint (weights, optimizer state, progress; replaced atomically as a whole) and the
//! exported bundle of the best epoch in `model/`.

use super::FitRequest;
use crate::distill::Projection;
use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use retina_model::host::{replace_dir, write_atomic};
use retina_model::{BundleMetadata, ModelBundle, RetinaNet};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    /// Validation metrics (`val_loss`, `diagnosis.referable_auc`, `diagnosis.quadratic_kappa`,
    /// `fluid.auc`, ...: the names of [`crate::scoring`]).
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
    /// Ranks that trained the epoch (MPI), when more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<usize>,
    /// Mean seconds per step in the gradient all-reduce (with more than one rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_s_per_step: Option<f64>,
    /// Bytes each rank sends to the all-reduce per step (with more than one rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_bytes_per_step: Option<usize>,
    /// Mean training value of each distillation term (weighted as in the total), in a
    /// `retina-train distill` run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub train_distill_loss: BTreeMap<String, f64>,
}

/// Progress of a run, stored with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CheckpointState {
    /// Last finished epoch.
    pub epoch: usize,
    /// Optimizer steps taken (the schedule's position).
    pub step: usize,
    /// The exported epoch (0: none yet).
    pub best_epoch: usize,
    /// The selection metric's value there.
    pub best_metric: Option<f64>,
    /// The number of ranks (MPI processes) the run trains with: its data order, micro-batches
    /// and optimizer steps depend on it, so a resumption must use the same.
    #[serde(default = "one")]
    pub ranks: usize,
}

fn one() -> usize {
    1
}

impl Default for CheckpointState {
    fn default() -> Self {
        CheckpointState {
            epoch: 0,
            step: 0,
            best_epoch: 0,
            best_metric: None,
            ranks: 1,
        }
    }
}

const CHECKPOINT: &str = "checkpoint";
const METRICS: &str = "metrics.jsonl";
const REQUEST: &str = "run.json";
const MODEL: &str = "model";
/// The distillation projection's weights in a checkpoint (not part of the exported student).
const PROJECTION: &str = "projection.bpk";

/// Reads a `metrics.jsonl` (no file: no epochs yet). The one reader of the format: a bad line is
/// an error at `file:line:column`, never skipped.
pub fn read_logs(path: &Path) -> Result<Vec<EpochLog>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| anyhow!("{}:{}:{}: {e}", path.display(), i + 1, e.column()))
        })
        .collect()
}

/// The files of one run.
#[derive(Debug, Clone)]
pub(super) struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> RunDir {
        RunDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The checkpoint directory.
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join(CHECKPOINT)
    }

    /// Whether a run has checkpointed here.
    pub fn has_checkpoint(&self) -> bool {
        self.checkpoint().exists()
    }

    /// Reads `run.json`.
    pub fn read_request(&self) -> Result<FitRequest> {
        let path = self.root.join(REQUEST);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a run directory (no {REQUEST})",
                self.root.display()
            )
        })?;
        serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}:{}:{}: {e} (run.json of an older version cannot be resumed)",
                path.display(),
                e.line(),
                e.column()
            )
        })
    }

    /// Writes `run.json`.
    pub fn write_request(&self, req: &FitRequest) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        write_atomic(
            &self.root.join(REQUEST),
            serde_json::to_string_pretty(req)?.as_bytes(),
        )?;
        Ok(())
    }

    /// The epochs logged so far.
    pub fn read_logs(&self) -> Result<Vec<EpochLog>> {
        read_logs(&self.root.join(METRICS))
    }

    /// Rewrites `metrics.jsonl` with `logs`.
    pub fn write_logs(&self, logs: &[EpochLog]) -> Result<()> {
        let mut s = String::new();
        for l in logs {
            s.push_str(&serde_json::to_string(l)?);
            s.push('\n');
        }
        write_atomic(&self.root.join(METRICS), s.as_bytes())?;
        Ok(())
    }

    /// Reads the progress of the last checkpoint.
    pub fn read_state(&self) -> Result<CheckpointState> {
        let path = self.checkpoint().join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the checkpoint state {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Restores the last checkpoint into `model` and `optim` (built with the run's config).
    pub fn read_checkpoint(
        &self,
        model: RetinaNet,
        optim: ModuleOptimizer,
        projection: Option<Projection>,
    ) -> Result<(
        RetinaNet,
        ModuleOptimizer,
        Option<Projection>,
        CheckpointState,
    )> {
        let ck = self.checkpoint();
        let state = self.read_state()?;
        let projection = projection
            .map(|p| {
                p.try_load_file(ck.join(PROJECTION)).map_err(|e| {
                    anyhow!(
                        "cannot load the distillation projection {}: {e:?}",
                        ck.join(PROJECTION).display()
                    )
                })
            })
            .transpose()?;
        let model = model.try_load_file(ck.join("model.bpk")).map_err(|e| {
            anyhow!(
                "cannot load the checkpoint weights {}: {e:?}",
                ck.join("model.bpk").display()
            )
        })?;
        let optim = optim
            .load(ck.join("optimizer.bpk"))
            .map_err(|e| anyhow!("cannot load the optimizer state: {e:?}"))?;
        Ok((model, optim, projection, state))
    }

    /// Writes a checkpoint: into a partial directory first, then swapped in, so a crash leaves
    /// either the previous checkpoint or the new one.
    pub fn write_checkpoint(
        &self,
        model: &RetinaNet,
        optim: &ModuleOptimizer,
        projection: Option<&Projection>,
        meta: &BundleMetadata,
        state: &CheckpointState,
    ) -> Result<()> {
        // The old checkpoint stays until the new one is complete.
        replace_dir(&self.checkpoint(), |partial| -> Result<()> {
            // burn's own module record keeps each parameter's id, which the optimizer state is
            // keyed by; weights restored from safetensors would get fresh ids and silently lose
            // Adam's moments.
            model
                .clone()
                .save_file(partial.join("model.bpk"))
                .map_err(|e| anyhow!("cannot save the checkpoint weights: {e:?}"))?;
            write_atomic(
                &partial.join("model.json"),
                serde_json::to_string_pretty(meta)?.as_bytes(),
            )?;
            if let Some(p) = projection {
                p.clone()
                    .save_file(partial.join(PROJECTION))
                    .map_err(|e| anyhow!("cannot save the distillation projection: {e:?}"))?;
            }
            optim
                .save(partial.join("optimizer.bpk"))
                .map_err(|e| anyhow!("cannot save the optimizer state: {e:?}"))?;
            write_atomic(
                &partial.join("state.json"),
                serde_json::to_string_pretty(state)?.as_bytes(),
            )?;
            Ok(())
        })
    }

    /// Exports `model` (an inference snapshot) as the run's bundle.
    pub fn export_best(&self, model: RetinaNet, meta: &BundleMetadata) -> Result<()> {
        ModelBundle::new(model, meta.clone()).save(&self.root.join(MODEL))?;
        Ok(())
    }

    /// Writes `summary.json`.
    pub fn write_summary<T: Serialize>(&self, summary: &T) -> Result<()> {
        write_atomic(
            &self.root.join("summary.json"),
            serde_json::to_string_pretty(summary)?.as_bytes(),
        )?;
        Ok(())
    }

    /// Refuses to start a new run over an existing one.
    pub fn ensure_fresh(&self) -> Result<()> {
        if self.has_checkpoint() {
            bail!(
                "{} already holds a training run; use --resume {} to continue it, or choose another --out",
                self.root.display(),
                self.root.display()
            );
        }
        Ok(())
    }
}
