//! Losses between models: a student network learns from a trained teacher's outputs and
//! features as well as from the labels (`retina-train distill --teacher BUNDLE`).
//!
//! - **Logits**: on every multiclass head the two networks share (by name; the diagnosis),
//!   the temperature-scaled KL divergence `T^2 KL(softmax(t / T) || softmax(s / T))` (Hinton et
//!   al. 2015; the `T^2` keeps its gradient's scale independent of `T`), burn-nn's `KLDivLoss`.
//! - **Binary heads** (fluid): the same divergence between the two Bernoulli distributions, a
//!   binary logit `z` being the two-class logits `[0, z]`: the teacher's probability as a soft
//!   target, its own entropy subtracted so the term is 0 when the student agrees.
//! - **Features**: a chosen student stage's feature map, through a learned 1x1 projection to
//!   the teacher stage's width, against that teacher stage's map (both average-pooled to the
//!   coarser grid where they differ), as a mean squared error relative to the teacher map's mean
//!   square (FitNets, Romero et al. 2015). The projection trains with the student and is not
//!   exported: the student bundle stands alone.
//!
//! The teacher runs in inference mode on the same augmented view as the student (at its own
//! input size and normalisation), once per view, so nothing is stored for the data set.
//! Heads that refuse (the quality head) learn from their own examples and are not distilled;
//! regression heads are not either.

use crate::loss::RetinaLoss;
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::{KLDivLossConfig, Reduction};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::module::adaptive_avg_pool2d;
use retina_model::{
    HeadKind, ModelBundle, PreprocessConfig, RetinaConfig, RetinaNet, RetinaOutput,
};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `[distill]`: the weights of the losses between teacher and student, read by
/// `retina-train distill` (a `fit` has no teacher and ignores them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// Softmax temperature of the logit and binary terms: above 1 it softens the teacher's
    /// distribution so the student also learns which wrong grades the teacher found plausible.
    pub temperature: f32,
    /// Weight of the labelled losses (every head of `[loss]`, the refusing head excepted); 0
    /// trains from the teacher alone.
    pub labels: f32,
    /// Weight of the KL term on each shared multiclass head (the diagnosis).
    pub logits: f32,
    /// Weight of the soft-target term on each shared binary head (fluid).
    pub binary: f32,
    /// Weight of the feature-matching term; 0 switches it (and its projection) off.
    pub features: f32,
    /// The teacher stage (1-based) whose feature map the student matches; the teacher's last
    /// stage when not given.
    pub teacher_stage: Option<usize>,
    /// The student stage (1-based) that matches it, through the projection; the student's last
    /// stage when not given.
    pub student_stage: Option<usize>,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            temperature: 4.0,
            labels: 1.0,
            logits: 1.0,
            binary: 1.0,
            features: 0.5,
            teacher_stage: None,
            student_stage: None,
        }
    }
}

impl DistillConfig {
    /// Checks the numbers (the stages are checked against the networks by [`Distiller::new`]).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "distill.temperature must be a positive number, not {}",
                self.temperature
            );
        }
        for (name, w) in [
            ("labels", self.labels),
            ("logits", self.logits),
            ("binary", self.binary),
            ("features", self.features),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                bail!("distill.{name} must be a weight >= 0, not {w}");
            }
        }
        if self.labels + self.logits + self.binary + self.features == 0.0 {
            bail!("distill: every weight is 0, so the student would learn nothing");
        }
        Ok(())
    }
}

/// The learned 1x1 convolution that maps a student stage's channels onto the teacher stage's.
#[derive(Module, Debug)]
pub struct Projection {
    /// `[C_teacher, C_student, 1, 1]` with a bias.
    pub conv: Conv2d,
}

/// A head both networks have, with the same name and kind.
#[derive(Debug, Clone)]
struct Pair {
    student: usize,
    teacher: usize,
    binary: bool,
}

/// The distillation terms of one batch (each already weighted; `None` when off).
#[derive(Debug, Clone, Default)]
pub struct DistillTerms {
    /// The KL terms of the multiclass heads, summed.
    pub logits: Option<Tensor<1>>,
    /// The soft-target terms of the binary heads, summed.
    pub binary: Option<Tensor<1>>,
    /// The feature-matching term.
    pub features: Option<Tensor<1>>,
}

/// Names of the terms, in the order the logs keep them.
pub const TERMS: [&str; 3] = ["logits", "binary", "features"];

impl DistillTerms {
    /// The terms in [`TERMS`] order.
    pub fn parts(&self) -> [Option<&Tensor<1>>; 3] {
        [
            self.logits.as_ref(),
            self.binary.as_ref(),
            self.features.as_ref(),
        ]
    }

    /// Their sum (`None` when all are off).
    pub fn sum(&self) -> Option<Tensor<1>> {
        self.parts()
            .into_iter()
            .flatten()
            .cloned()
            .reduce(|a, b| a + b)
    }
}

/// A teacher and what the student learns from it.
#[derive(Debug)]
pub struct Distiller {
    /// The loss weights.
    pub config: DistillConfig,
    /// The teacher, on the device under autodiff (no gradients: inference mode).
    teacher: RetinaNet,
    /// The teacher's preprocessing, where it differs from the student's (its own input size
    /// or normalisation): the loader then makes a second input from each view.
    pub teacher_preprocess: Option<PreprocessConfig>,
    pairs: Vec<Pair>,
    /// `(teacher, student)` stages of the feature term.
    stages: Option<(usize, usize)>,
    /// `(student width, teacher width)` of the projection.
    widths: (usize, usize),
}

impl Distiller {
    /// Loads the teacher bundle in `dir` onto `device` (the plain device the student's
    /// autodiff device wraps) and pairs it with a student of config `student`.
    pub fn new(
        config: DistillConfig,
        dir: &Path,
        student: &RetinaConfig,
        device: &Device,
    ) -> Result<Distiller> {
        config.validate()?;
        let bundle = ModelBundle::load(dir, device).with_context(|| {
            format!(
                "cannot load the teacher bundle {} (a resumed run uses the teacher its \
                     run.json names; restore the bundle there)",
                dir.display()
            )
        })?;
        let teacher_config = &bundle.metadata.config;
        let mut pairs = Vec::new();
        for (s, spec) in student.heads.iter().enumerate() {
            if spec.refuses() {
                continue;
            }
            let Some(t) = teacher_config
                .heads
                .iter()
                .position(|h| h.name == spec.name)
            else {
                continue;
            };
            let theirs = &teacher_config.heads[t];
            match (spec.kind, theirs.kind) {
                (HeadKind::Multiclass(a), HeadKind::Multiclass(b)) if a == b => {}
                (HeadKind::Binary, HeadKind::Binary) => {}
                (HeadKind::Regression, HeadKind::Regression) => continue,
                (mine, other) => bail!(
                    "the student's head `{}` is {mine} and the teacher's ({}) is {other}: rename \
                     one, or make them the same kind",
                    spec.name,
                    dir.display()
                ),
            }
            pairs.push(Pair {
                student: s,
                teacher: t,
                binary: spec.kind == HeadKind::Binary,
            });
        }
        let shared = |binary: bool| pairs.iter().any(|p| p.binary == binary);
        if (config.logits > 0.0 && !shared(false)) || (config.binary > 0.0 && !shared(true)) {
            let missing = if config.logits > 0.0 && !shared(false) {
                ("multiclass", "logits")
            } else {
                ("binary", "binary")
            };
            bail!(
                "the teacher {} and the student share no {} head by name (teacher: {}; \
                 student: {}): set distill.{}=0, or give the heads the same names",
                dir.display(),
                missing.0,
                names(teacher_config),
                names(student),
                missing.1
            );
        }
        let stage = |which: &str, given: Option<usize>, c: &RetinaConfig| -> Result<usize> {
            let n = c.trunk.stages.len();
            match given {
                None => Ok(n),
                Some(k) if (1..=n).contains(&k) => Ok(k),
                Some(k) => bail!(
                    "distill.{which}_stage = {k}, but the {which}'s trunk has stages 1 to {n}"
                ),
            }
        };
        let ts = stage("teacher", config.teacher_stage, teacher_config)?;
        let ss = stage("student", config.student_stage, student)?;
        let stages = (config.features > 0.0).then_some((ts, ss));
        let widths = (
            student.trunk.stage_width(ss),
            teacher_config.trunk.stage_width(ts),
        );
        let teacher_preprocess = (teacher_config.preprocess != student.preprocess)
            .then(|| teacher_config.preprocess.clone());
        Ok(Distiller {
            config,
            teacher: bundle.model,
            teacher_preprocess,
            pairs,
            stages,
            widths,
        })
    }

    /// The projection of the feature term, freshly initialised (`None` when the term is off).
    pub fn projection(&self, device: &Device) -> Option<Projection> {
        self.stages.map(|_| Projection {
            conv: Conv2dConfig::new([self.widths.0, self.widths.1], [1, 1])
                .with_padding(PaddingConfig2d::Valid)
                .init(device),
        })
    }

    /// The student stage whose feature map the loss reads (`None` when the term is off).
    pub fn student_stage(&self) -> Option<usize> {
        self.stages.map(|(_, s)| s)
    }

    /// Scales the labelled losses by `labels` (the refusing head, taught from its own
    /// examples, keeps its weight).
    pub fn scale_labels(&self, loss: &mut RetinaLoss, student: &RetinaConfig) {
        for (h, spec) in loss.heads.iter_mut().zip(&student.heads) {
            if !spec.refuses() {
                h.weight *= self.config.labels;
            }
        }
    }

    /// The weighted terms of one batch: `student` is the student's output on it (and its
    /// kept stage's feature map), `teacher_images` the teacher's input (the student's own
    /// where their preprocessing agrees).
    pub fn terms(
        &self,
        student: &RetinaOutput,
        student_map: Option<Tensor<4>>,
        projection: Option<&Projection>,
        teacher_images: Tensor<4>,
    ) -> DistillTerms {
        // Inference: batch norm on its running statistics, no graph.
        let images = teacher_images.inner();
        let (out, map) = match self.stages {
            Some((ts, _)) => {
                let (o, m) = self.teacher.forward_keeping(images, ts);
                (o, Some(m))
            }
            None => (self.teacher.forward(images), None),
        };
        let temp = self.config.temperature;
        let mut terms = DistillTerms::default();
        for p in &self.pairs {
            let s = student.heads[p.student].clone();
            let teacher = out.heads[p.teacher].clone().autodiff();
            let (slot, weight, value) = if p.binary {
                (
                    &mut terms.binary,
                    self.config.binary,
                    divergence(two_class(s), two_class(teacher), temp),
                )
            } else {
                (
                    &mut terms.logits,
                    self.config.logits,
                    divergence(s, teacher, temp),
                )
            };
            if weight > 0.0 {
                let value = value * weight;
                *slot = Some(match slot.take() {
                    Some(sum) => sum + value,
                    None => value,
                });
            }
        }
        if let (Some(sm), Some(tm), Some(proj)) = (student_map, map, projection) {
            terms.features = Some(feature_term(sm, tm.autodiff(), proj) * self.config.features);
        }
        terms
    }
}

/// `T^2 KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch.
fn divergence(student: Tensor<2>, teacher: Tensor<2>, temp: f32) -> Tensor<1> {
    let target = softmax(teacher / temp, 1);
    KLDivLossConfig::new().init().forward(
        log_softmax(student / temp, 1),
        target,
        Reduction::BatchMean,
    ) * (temp * temp)
}

/// A binary head's logit `z` as the two-class logits `[0, z]` (`sigmoid(z)` is the second
/// class's softmax).
fn two_class(z: Tensor<2>) -> Tensor<2> {
    Tensor::cat(vec![z.zeros_like(), z], 1)
}

/// The relative squared error between the projected student map and the teacher's, on the
/// coarser of their two grids.
fn feature_term(student: Tensor<4>, teacher: Tensor<4>, proj: &Projection) -> Tensor<1> {
    let [_, _, hs, ws] = student.dims();
    let [_, _, ht, wt] = teacher.dims();
    let grid = [hs.min(ht), ws.min(wt)];
    let coarse = |x: Tensor<4>, h: usize, w: usize| {
        if [h, w] == grid {
            x
        } else {
            adaptive_avg_pool2d(x, grid)
        }
    };
    let student = proj.conv.forward(coarse(student, hs, ws));
    let teacher = coarse(teacher, ht, wt);
    let scale = teacher.clone().powi_scalar(2).mean() + 1e-6;
    (student - teacher).powi_scalar(2).mean() / scale
}

fn names(c: &RetinaConfig) -> String {
    c.heads
        .iter()
        .map(|h| format!("{} ({})", h.name, h.kind))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Device {
        retina_model::BackendChoice::Cpu.select().unwrap().device
    }

    /// The term, by hand: `T^2 sum_k p_k (ln p_k - ln q_k)` averaged over the batch.
    fn by_hand(s: &[[f32; 3]], t: &[[f32; 3]], temp: f32) -> f32 {
        let soft = |z: &[f32; 3]| {
            let m = z.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = z.iter().map(|v| ((v - m) / temp).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<_>>()
        };
        let mut total = 0.0;
        for (a, b) in s.iter().zip(t) {
            let (q, p) = (soft(a), soft(b));
            total += p
                .iter()
                .zip(&q)
                .map(|(p, q)| p * (p.ln() - q.ln()))
                .sum::<f32>();
        }
        temp * temp * total / s.len() as f32
    }

    #[test]
    fn feature_term_is_zero_for_a_perfect_projection_and_pools_to_the_coarser_grid() {
        let device = cpu();
        let proj = Projection {
            conv: Conv2dConfig::new([2, 2], [1, 1]).init(&device),
        };
        // Identity weights, no bias: the student's map is the teacher's.
        let proj = Projection {
            conv: Conv2d {
                weight: burn::module::Param::from_tensor(
                    Tensor::<2>::eye(2, &device).reshape([2, 2, 1, 1]),
                ),
                bias: None,
                ..proj.conv
            },
        };
        let teacher = Tensor::<4>::random(
            [2, 2, 4, 4],
            burn::tensor::Distribution::Uniform(0.0, 1.0),
            &device,
        );
        let v: f32 = feature_term(teacher.clone(), teacher.clone(), &proj).into_scalar();
        assert!(v.abs() < 1e-6, "{v}");
        // A student at twice the resolution whose 2x2 means are the teacher's matches it.
        let fine = teacher
            .clone()
            .reshape([2, 2, 4, 1, 4, 1])
            .repeat_dim(3, 2)
            .repeat_dim(5, 2)
            .reshape([2, 2, 8, 8]);
        let v: f32 = feature_term(fine, teacher.clone(), &proj).into_scalar();
        assert!(v.abs() < 1e-6, "{v}");
        // Twice the teacher: an error of exactly the teacher's own mean square.
        let off: f32 = feature_term(teacher.clone() * 2.0, teacher, &proj).into_scalar();
        assert!((off - 1.0).abs() < 1e-3, "{off}");
    }

    #[test]
    fn weights_are_checked_and_any_one_of_them_may_carry_the_student() {
        let with = |labels, logits, binary, features| DistillConfig {
            labels,
            logits,
            binary,
            features,
            ..DistillConfig::default()
        };
        for ok in [
            with(0.0, 1.0, 0.0, 0.0),
            with(1.0, 1.0, 0.0, 0.0),
            with(0.0, 0.0, 1.0, 1.0),
            with(0.0, 0.0, 0.0, 2.0),
        ] {
            assert!(ok.validate().is_ok(), "{ok:?}");
        }
        let e = with(1.0, -1.0, 1.0, 1.0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("distill.logits"), "{e}");
        let e = with(1.0, 1.0, f32::NAN, 1.0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("distill.binary"), "{e}");
        assert!(with(0.0, 0.0, 0.0, 0.0).validate().is_err());
    }

    #[test]
    fn kl_term_matches_its_definition_and_vanishes_when_the_student_agrees() {
        let device = cpu();
        let s = [[1.0f32, -2.0, 0.5], [0.0, 3.0, -1.0]];
        let t = [[2.0f32, 0.0, -1.0], [0.5, 0.5, 4.0]];
        let tensor = |v: &[[f32; 3]; 2]| Tensor::<2>::from_data(TensorData::from(*v), &device);
        for temp in [1.0, 3.0] {
            let value: f32 = divergence(tensor(&s), tensor(&t), temp).into_scalar();
            let expected = by_hand(&s, &t, temp);
            assert!(
                (value - expected).abs() < 1e-5,
                "T = {temp}: {value} vs by hand {expected}"
            );
            let same: f32 = divergence(tensor(&t), tensor(&t), temp).into_scalar();
            assert!(same.abs() < 1e-6, "{same}");
        }
    }

    #[test]
    fn binary_term_is_the_kl_of_the_two_bernoulli_distributions() {
        let device = cpu();
        let (zs, zt, temp) = (0.3f32, -1.2f32, 2.0f32);
        let col = |z: f32| Tensor::<2>::from_data(TensorData::from([[z]]), &device);
        let value: f32 = divergence(two_class(col(zs)), two_class(col(zt)), temp).into_scalar();
        let sig = |z: f32| 1.0 / (1.0 + (-z / temp).exp());
        let (q, p) = (sig(zs), sig(zt));
        let expected = temp * temp * (p * (p / q).ln() + (1.0 - p) * ((1.0 - p) / (1.0 - q)).ln());
        assert!((value - expected).abs() < 1e-5, "{value} vs {expected}");
    }
}
