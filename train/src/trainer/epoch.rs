//! One training epoch: the optimizer steps over the epoch's batches, the stop on a non-finite
//! loss, the per-head loss sums and the progress bar.

use super::schedule::Schedule;
use crate::data::{LoaderSpec, QualityBatch, Sampling, epoch_order};
use crate::dataset::Sample;
use crate::loss::{HeadTargets, RetinaLoss};
use anyhow::{Context, Result};
use burn::module::{Module, ParamGroup};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use retina_model::RetinaNet;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// What stays the same from epoch to epoch.
pub(super) struct EpochPlan<'a> {
    /// The objective.
    pub loss: &'a RetinaLoss,
    /// Training loader settings.
    pub spec: &'a LoaderSpec,
    /// Training samples.
    pub samples: &'a Arc<Vec<Sample>>,
    /// How samples are drawn.
    pub sampling: Sampling,
    /// Seed of the data order.
    pub seed: u64,
    /// Batch size.
    pub batch_size: usize,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// Last epoch of the run (for the progress bar).
    pub epochs: usize,
    /// Learning rate of each step.
    pub schedule: &'a Schedule,
    /// Autodiff device.
    pub device: &'a Device,
    /// The run directory (named in the non-finite-loss message).
    pub run_dir: &'a Path,
}

/// Means over one epoch's training samples.
#[derive(Debug, Clone)]
pub(super) struct EpochTotals {
    /// Mean total loss.
    pub loss: f64,
    /// Mean loss of each head, in network order.
    pub head_loss: Vec<f64>,
    /// Mean L2 term.
    pub l2: f64,
    /// Learning rate of the last step.
    pub learning_rate: f64,
    /// Images per second of step time.
    pub img_per_s: f64,
    /// Seconds spent waiting for batches.
    pub data_wait_s: f64,
    /// Images skipped as unreadable.
    pub bad_images: usize,
}

impl EpochPlan<'_> {
    /// The gradients of the quality examples' loss (weighted as the refusing head's loss
    /// is), computed with every batch norm frozen on its running statistics (burn's frozen
    /// `BatchNorm`: the inference formula, gradients still flowing, the statistics untouched).
    /// Degraded views so teach the trunk and the refusing head without entering the batch
    /// statistics of gradable photographs, at training or at inference. Returns the gradients,
    /// the summed loss and the number of examples.
    fn quality_grads(
        &self,
        model: &RetinaNet,
        all: &ParamGroup,
        qb: QualityBatch,
    ) -> Result<Option<(GradientsParams, f64, usize)>> {
        let s = self.spec.preprocess.image_size;
        let n = qb.labels.len();
        let Some(q) = model.specs.iter().position(|h| h.refuses()) else {
            return Ok(None);
        };
        if n == 0 {
            return Ok(None);
        }
        // Same parameter ids as `model`: the gradients apply to `model` itself.
        let frozen_bn = model
            .clone()
            .freeze()
            .set_require_grad_group(all.clone(), true);
        let x = Tensor::<4>::from_data(TensorData::new(qb.images, [n, 3, s, s]), self.device);
        let features = frozen_bn.feature_map(x, q);
        // The trunk gets `share` of the gradient, the head all of it.
        let share = self.loss.refusal_trunk_share;
        let features = if share < 1.0 {
            features.clone().detach() * (1.0 - share) + features * share
        } else {
            features
        };
        let out = frozen_bn.head_from_feature_map(q, features);
        let labels: Vec<Option<f32>> = qb.labels.into_iter().map(Some).collect();
        let t = crate::loss::HeadTargets::from_options(&labels, self.device);
        let head = &self.loss.heads[q];
        let loss = head.forward(out, &t);
        let value: f32 = loss.clone().detach().into_scalar::<f32>();
        if !value.is_finite() {
            // The caller stops the run, as for the main loss.
            return Ok(Some((GradientsParams::new(), value as f64, n)));
        }
        let grads = GradientsParams::from_grads((loss * head.weight).backward(), &frozen_bn);
        Ok(Some((grads, value as f64 * n as f64, n)))
    }

    /// Trains `epoch` (1-based), advancing the global `step`. `last_good` is the epoch of the
    /// last checkpoint, named when a non-finite loss stops the run (before the step that would
    /// have applied it, so the weights and the checkpoint stay finite).
    pub fn run(
        &self,
        epoch: usize,
        mut model: RetinaNet,
        optim: &mut ModuleOptimizer,
        step: &mut usize,
        last_good: usize,
    ) -> Result<(RetinaNet, EpochTotals)> {
        let s = self.spec.preprocess.image_size;
        let heads = self.spec.heads.len();
        let order = epoch_order(self.samples, self.sampling, self.seed, epoch);
        let rx = self.spec.clone().spawn(
            self.samples.clone(),
            order,
            self.batch_size,
            3,
            (epoch * self.steps_per_epoch) as u64,
        );
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new(self.steps_per_epoch as u64).with_style(
                ProgressStyle::with_template("epoch {msg} {bar:30} {pos}/{len} [{elapsed}<{eta}]")
                    .expect("valid template"),
            )
        } else {
            ProgressBar::hidden()
        };
        bar.set_message(format!("{epoch}/{}", self.epochs));
        let (mut sum_total, mut sum_l2, mut n_seen) = (0.0f64, 0.0f64, 0usize);
        let mut sum_heads = vec![0.0f64; heads];
        let mut step_time = 0.0f64;
        let mut data_wait = 0.0f64;
        let mut bad_images = 0usize;
        let (mut sum_quality, mut n_quality) = (0.0f64, 0usize);
        // Every parameter's id: optimizer steps keep them, so once an epoch is enough.
        let all = ParamGroup::ids_from_module(model.clone());
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
            let t0 = Instant::now();
            let non_finite = |value: f32| {
                anyhow::anyhow!(
                    "the loss became non-finite ({value}) at epoch {epoch}, batch {}: training stopped. \
                     The last good checkpoint (epoch {last_good}) is kept in {}; lower the \
                     learning rate (now {:.2e}) and continue with --resume {}",
                    b + 1,
                    self.run_dir.join("checkpoint").display(),
                    self.schedule.peak,
                    self.run_dir.display()
                )
            };
            let quality = match batch.quality {
                Some(qb) => self.quality_grads(&model, &all, qb)?,
                None => None,
            };
            if let Some((_, v, _)) = &quality
                && !v.is_finite()
            {
                bar.finish_and_clear();
                return Err(non_finite(*v as f32));
            }
            if let Some((_, loss, n)) = &quality {
                sum_quality += loss;
                n_quality += n;
            }
            if batch.n == 0 {
                if let Some((grads, _, _)) = quality {
                    lr = self.schedule.at(*step);
                    model = optim.step(lr, model, grads);
                    *step += 1;
                }
                step_time += t0.elapsed().as_secs_f64();
                continue;
            }
            let x = Tensor::<4>::from_data(
                TensorData::new(batch.images, [batch.n, 3, s, s]),
                self.device,
            );
            let t = HeadTargets::batch(&batch.targets, self.device);
            let out = model.forward(x);
            let l = self.loss.forward(&model, &out, &t);
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
                return Err(non_finite(host[0]));
            }
            lr = self.schedule.at(*step);
            let mut grads = GradientsParams::from_grads(l.total.backward(), &model);
            if let Some((extra, _, _)) = quality {
                grads = add_gradients(&model, grads, extra);
            }
            model = optim.step(lr, model, grads);
            *step += 1;
            step_time += t0.elapsed().as_secs_f64();
            let n = batch.n as f64;
            sum_total += host[0] as f64 * n;
            for (i, v) in host[1..=heads].iter().enumerate() {
                sum_heads[i] += *v as f64 * n;
            }
            sum_l2 += *host.last().expect("l2") as f64 * self.loss.l2 as f64 * n;
            n_seen += batch.n;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let n = n_seen.max(1) as f64;
        let mut head_loss: Vec<f64> = sum_heads.iter().map(|v| v / n).collect();
        // The quality head learns from its own examples only: their mean.
        if let Some(q) = model.specs.iter().position(|h| h.refuses())
            && n_quality > 0
        {
            head_loss[q] = sum_quality / n_quality as f64;
        }
        Ok((
            model,
            EpochTotals {
                loss: sum_total / n,
                head_loss,
                l2: sum_l2 / n,
                learning_rate: lr,
                img_per_s: n_seen as f64 / step_time.max(1e-9),
                data_wait_s: data_wait,
                bad_images,
            },
        ))
    }
}

/// `a + b`, parameter by parameter (a parameter with a gradient in only one keeps it).
fn add_gradients(model: &RetinaNet, a: GradientsParams, b: GradientsParams) -> GradientsParams {
    struct Add {
        a: GradientsParams,
        b: GradientsParams,
    }
    impl burn::module::ModuleVisitor for Add {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if let Some(g) = self.b.remove::<D>(param.id) {
                let sum = match self.a.remove::<D>(param.id) {
                    Some(f) => f + g,
                    None => g,
                };
                self.a.register(param.id, sum);
            }
        }
    }
    let mut add = Add { a, b };
    burn::module::Module::visit(model, &mut add);
    add.a
}
