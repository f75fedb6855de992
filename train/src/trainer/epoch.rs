//! One training epoch: the optimizer steps over the epoch's batches, the stop on a non-finite
//! loss, the per-head loss sums and the progress bar.
//!
//! A step takes one global batch of `batch_size` samples from the epoch's order and splits it
//! into `ranks x accumulate` micro-batches ([`crate::distributed::part`]): rank `r` computes
//! the gradients of micro-batches `r * accumulate ..`, each weighted by its share of the batch,
//! sums them, and the ranks sum theirs in one all-reduce. One process with `accumulate = K`
//! therefore takes the same steps as K ranks (the same samples, augmentations and batch-norm
//! batches), which is what the MPI tests compare.

use super::schedule::Schedule;
use crate::data::{HostBatch, LoaderSpec, QualityBatch, Sampling, epoch_order};
use crate::dataset::Sample;
use crate::distill::{DistillTerms, Distiller, Projection, TERMS};
use crate::distributed::sync;
use crate::distributed::{Collective, part, together};
use crate::loss::{HeadTargets, RetinaLoss};
use anyhow::{Context, Result};
use burn::module::{Module, ParamGroup};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use retina_model::RetinaNet;
use std::collections::BTreeMap;
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
    /// The device under autodiff (where gradients live).
    pub base_device: &'a Device,
    /// The run directory (named in the non-finite-loss message).
    pub run_dir: &'a Path,
    /// The ranks training this model.
    pub group: &'a dyn Collective,
    /// Micro-batches per step on each rank.
    pub accumulate: usize,
    /// The teacher and its losses, in a distillation run.
    pub distill: Option<&'a Distiller>,
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
    /// Seconds spent in the gradient all-reduce (0 with one rank).
    pub allreduce_s: f64,
    /// Bytes each rank sent to the all-reduce per step (0 with one rank).
    pub allreduce_bytes: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Mean of each distillation term (weighted), by name; empty without a teacher.
    pub distill: BTreeMap<String, f64>,
}

/// Where the numbers of a step's host side sit in the buffer that travels with its gradients.
struct StepStats;
impl StepStats {
    const NON_FINITE: usize = 0;
    const TOTAL: usize = 1;
    const N: usize = 2;
    const QUALITY: usize = 3;
    const N_QUALITY: usize = 4;
    const L2: usize = 5;
    const HEADS: usize = 6;
    /// The distillation terms follow the heads' losses.
    fn distill(heads: usize) -> std::ops::Range<usize> {
        Self::HEADS + heads..Self::HEADS + heads + TERMS.len()
    }
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
        scale: f32,
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
        let grads =
            GradientsParams::from_grads((loss * (head.weight * scale)).backward(), &frozen_bn);
        Ok(Some((grads, value as f64 * n as f64, n)))
    }

    /// The gradients of one micro-batch (clinical and quality examples), its loss weighted by
    /// `weight` (its share of the global batch); its loss sums are added to `stats`. `Err`
    /// carries a non-finite loss value.
    fn micro_batch(
        &self,
        model: &RetinaNet,
        projection: Option<&Projection>,
        all: &ParamGroup,
        batch: HostBatch,
        weight: f32,
        stats: &mut [f32],
    ) -> Result<std::result::Result<Option<GradientsParams>, f32>> {
        let s = self.spec.preprocess.image_size;
        let heads = self.spec.heads.len();
        let mut grads = None;
        if let Some(qb) = batch.quality
            && let Some((g, v, n)) = self.quality_grads(model, all, qb, weight)?
        {
            if !v.is_finite() {
                return Ok(Err(v as f32));
            }
            stats[StepStats::QUALITY] += v as f32;
            stats[StepStats::N_QUALITY] += n as f32;
            grads = Some(g);
        }
        if batch.n == 0 {
            return Ok(Ok(grads));
        }
        let x = Tensor::<4>::from_data(
            TensorData::new(batch.images, [batch.n, 3, s, s]),
            self.device,
        );
        let t = HeadTargets::batch(&batch.targets, self.device);
        let (out, kept) = match self.distill.and_then(Distiller::student_stage) {
            Some(stage) => {
                let (out, map) = model.forward_keeping(x.clone(), stage);
                (out, Some(map))
            }
            None => (model.forward(x.clone()), None),
        };
        let l = self.loss.forward(model, &out, &t);
        let terms = self.distill.map(|d| {
            let teacher_x = match &d.teacher_preprocess {
                None => x,
                Some(p) => {
                    let side = p.image_size;
                    Tensor::<4>::from_data(
                        TensorData::new(batch.teacher_images, [batch.n, 3, side, side]),
                        self.base_device,
                    )
                }
            };
            d.terms(&out, kept, projection, teacher_x)
        });
        let total = match terms.as_ref().and_then(DistillTerms::sum) {
            Some(d) => l.total + d,
            None => l.total,
        };
        // One host read per micro-batch for the NaN check and the logs.
        let mut parts = vec![total.clone()];
        parts.extend(l.heads.iter().map(|(_, v)| v.clone()));
        parts.push(l.l2_sum.clone());
        let zero = || Tensor::<1>::zeros([1], self.device);
        if let Some(terms) = &terms {
            parts.extend(terms.parts().map(|t| t.cloned().unwrap_or_else(zero)));
        }
        let host: Vec<f32> = Tensor::cat(parts.iter().map(|p| p.clone().detach()).collect(), 0)
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 host data");
        if !host.iter().all(|v| v.is_finite()) {
            return Ok(Err(host[0]));
        }
        let total = if weight == 1.0 { total } else { total * weight };
        let mut backward = total.backward();
        let mut g = GradientsParams::from_module(&mut backward, model);
        if let Some(p) = projection {
            let mut pg = GradientsParams::from_module(&mut backward, p);
            move_gradients(p, &mut pg, &mut g);
        }
        let n = batch.n as f32;
        stats[StepStats::TOTAL] += host[0] * n;
        for (i, v) in host[1..=heads].iter().enumerate() {
            stats[StepStats::HEADS + i] += v * n;
        }
        stats[StepStats::L2] += host[heads + 1] * self.loss.l2 * n;
        stats[StepStats::N] += n;
        if terms.is_some() {
            for (slot, v) in StepStats::distill(heads).zip(&host[heads + 2..]) {
                stats[slot] += v * n;
            }
        }
        Ok(Ok(Some(match grads {
            Some(mut q) => {
                add_gradients(model, projection, &mut q, g);
                q
            }
            None => g,
        })))
    }

    /// This rank's micro-batches of `epoch`: for each step, `accumulate` of them, each with
    /// its augmentation number and its weight (its share of the global batch).
    fn micro_batches(&self, epoch: usize) -> (Vec<(u64, Vec<usize>)>, Vec<f32>) {
        let order = epoch_order(self.samples, self.sampling, self.seed, epoch);
        let parts = self.group.size() * self.accumulate;
        let first = self.group.rank() * self.accumulate;
        let (mut batches, mut weights) = (Vec::new(), Vec::new());
        for (j, batch) in order.chunks(self.batch_size).enumerate() {
            let global = (epoch * self.steps_per_epoch + j) as u64;
            for p in first..first + self.accumulate {
                let range = part(batch.len(), p, parts);
                weights.push(range.len() as f32 / batch.len() as f32);
                batches.push((global * parts as u64 + p as u64, batch[range].to_vec()));
            }
        }
        (batches, weights)
    }

    /// Trains `epoch` (1-based), advancing the global `step`. `last_good` is the epoch of the
    /// last checkpoint, named when a non-finite loss stops the run (before the step that would
    /// have applied it, so the weights and the checkpoint stay finite).
    pub fn run(
        &self,
        epoch: usize,
        mut model: RetinaNet,
        projection: &mut Option<Projection>,
        optim: &mut ModuleOptimizer,
        step: &mut usize,
        last_good: usize,
    ) -> Result<(RetinaNet, EpochTotals)> {
        let heads = self.spec.heads.len();
        let (batches, weights) = self.micro_batches(epoch);
        let rx = self
            .spec
            .clone()
            .spawn_batches(self.samples.clone(), batches, 3);
        let bar = if self.group.is_root() && std::io::stderr().is_terminal() {
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
        let mut sum_distill = [0.0f64; TERMS.len()];
        let mut step_time = 0.0f64;
        let mut data_wait = 0.0f64;
        let mut bad_images = 0usize;
        let (mut sum_quality, mut n_quality) = (0.0f64, 0usize);
        let (mut allreduce_s, mut allreduce_bytes, mut steps) = (0.0f64, 0usize, 0usize);
        // Every parameter's id: optimizer steps keep them, so once an epoch is enough.
        let all = ParamGroup::ids_from_module(model.clone());
        let mut lr = 0.0;
        let mut batches = rx.into_iter();
        let mut weights = weights.into_iter();
        for j in 0..self.steps_per_epoch {
            let t_step = Instant::now();
            let mut waited = 0.0;
            let mut grads: Option<GradientsParams> = None;
            let mut stats = vec![0f32; StepStats::distill(heads).end];
            let mut own_non_finite = None;
            // With several micro-batches, each updates batch norm's running statistics from
            // the same start and the step keeps their mean, as K ranks do (each updates its
            // own, and the ranks average them).
            let start_stats = (self.accumulate > 1).then(|| sync::running_statistics(&model));
            let mut stats_sum = vec![0f32; start_stats.as_ref().map_or(0, Vec::len)];
            for a in 0..self.accumulate {
                if let Some(start) = &start_stats
                    && a > 0
                {
                    model = sync::set_running_statistics(model, start);
                }
                let waiting = Instant::now();
                let Some(batch) = batches.next() else {
                    break;
                };
                let weight = weights.next().expect("one weight per micro-batch");
                waited += waiting.elapsed().as_secs_f64();
                let batch = batch.with_context(|| {
                    format!("loading training batch {} of epoch {epoch}", j + 1)
                })?;
                bad_images += batch.bad.len();
                for e in &batch.bad {
                    eprintln!("skipped: {e}");
                }
                if own_non_finite.is_none() {
                    match self.micro_batch(
                        &model,
                        projection.as_ref(),
                        &all,
                        batch,
                        weight,
                        &mut stats,
                    )? {
                        Ok(Some(g)) => {
                            grads = Some(match grads {
                                Some(mut a) => {
                                    add_gradients(&model, projection.as_ref(), &mut a, g);
                                    a
                                }
                                None => g,
                            })
                        }
                        Ok(None) => {}
                        Err(value) => own_non_finite = Some(value),
                    }
                }
                if start_stats.is_some() {
                    let now = sync::running_statistics(&model);
                    stats_sum.iter_mut().zip(now).for_each(|(s, v)| *s += v);
                }
            }
            if start_stats.is_some() {
                let k = self.accumulate as f32;
                stats_sum.iter_mut().for_each(|v| *v /= k);
                model = sync::set_running_statistics(model, &stats_sum);
            }
            if own_non_finite.is_some() {
                stats[StepStats::NON_FINITE] = 1.0;
            }
            let mut grads = grads.unwrap_or_default();
            if self.group.size() > 1 {
                let t = Instant::now();
                let (sum, bytes) =
                    sync::all_reduce_step(self.group, &model, grads, &mut stats, self.base_device);
                grads = sum;
                allreduce_s += t.elapsed().as_secs_f64();
                allreduce_bytes = bytes;
            }
            if stats[StepStats::NON_FINITE] > 0.0 {
                bar.finish_and_clear();
                let value = own_non_finite.map_or("on another rank".into(), |v| v.to_string());
                let ranks = if self.group.size() > 1 {
                    format!(" (on {} of {} ranks)", stats[0], self.group.size())
                } else {
                    String::new()
                };
                let e = anyhow::anyhow!(
                    "the loss became non-finite ({value}) at epoch {epoch}, batch {}{ranks}: \
                     training stopped. The last good checkpoint (epoch {last_good}) is kept in \
                     {}; lower the learning rate (now {:.2e}) and continue with --resume {}",
                    j + 1,
                    self.run_dir.join("checkpoint").display(),
                    self.schedule.peak,
                    self.run_dir.display()
                );
                return Err(together(self.group, e));
            }
            if !grads.is_empty() {
                lr = self.schedule.at(*step);
                // One optimizer for both: its state is keyed by parameter id.
                if let Some(p) = projection.take() {
                    let mut own = GradientsParams::new();
                    move_gradients(&p, &mut grads, &mut own);
                    *projection = Some(optim.step(lr, p, own));
                }
                model = optim.step(lr, model, grads);
                steps += 1;
            }
            *step += 1;
            data_wait += waited;
            step_time += t_step.elapsed().as_secs_f64() - waited;
            sum_total += stats[StepStats::TOTAL] as f64;
            for (i, v) in stats[StepStats::HEADS..StepStats::HEADS + heads]
                .iter()
                .enumerate()
            {
                sum_heads[i] += *v as f64;
            }
            for (sum, &v) in sum_distill
                .iter_mut()
                .zip(&stats[StepStats::distill(heads)])
            {
                *sum += v as f64;
            }
            sum_l2 += stats[StepStats::L2] as f64;
            n_seen += stats[StepStats::N] as usize;
            sum_quality += stats[StepStats::QUALITY] as f64;
            n_quality += stats[StepStats::N_QUALITY] as usize;
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
                allreduce_s,
                allreduce_bytes,
                steps,
                distill: match self.distill {
                    Some(_) => TERMS
                        .iter()
                        .zip(sum_distill)
                        .map(|(name, v)| (name.to_string(), v / n))
                        .collect(),
                    None => BTreeMap::new(),
                },
            },
        ))
    }
}

/// `a += b`, parameter by parameter, over the model's and the projection's parameters (a
/// parameter with a gradient in only one keeps it).
fn add_gradients(
    model: &RetinaNet,
    projection: Option<&Projection>,
    a: &mut GradientsParams,
    mut b: GradientsParams,
) {
    move_gradients(model, &mut b, a);
    if let Some(p) = projection {
        move_gradients(p, &mut b, a);
    }
}

/// Moves the gradient of each of `module`'s parameters from `from` into `to`, adding it to
/// the one `to` holds.
fn move_gradients<M: Module>(module: &M, from: &mut GradientsParams, to: &mut GradientsParams) {
    struct Move<'a> {
        from: &'a mut GradientsParams,
        to: &'a mut GradientsParams,
    }
    impl burn::module::ModuleVisitor for Move<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if let Some(g) = self.from.remove::<D>(param.id) {
                let sum = match self.to.remove::<D>(param.id) {
                    Some(f) => f + g,
                    None => g,
                };
                self.to.register(param.id, sum);
            }
        }
    }
    module.visit(&mut Move { from, to });
}
