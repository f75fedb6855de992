//! `[optimizer]`: AdamW (the default), Adam or SGD with momentum, built with burn's
//! `AdamWConfig`, `AdamConfig` and `SgdConfig`.

use anyhow::{Result, bail};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};
use serde::{Deserialize, Serialize};

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay.
    #[default]
    Adamw,
    /// Adam; `weight_decay` is an L2 penalty added to the gradient.
    Adam,
    /// Stochastic gradient descent with momentum; `weight_decay` as in Adam.
    Sgd,
}

/// `[optimizer]`. The defaults are the AdamW the trainer always used: burn's betas, epsilon
/// 1e-8, no decoupled weight decay (the explicit L2 term is `loss.l2`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// `adamw`, `adam` or `sgd`.
    pub kind: OptimizerKind,
    /// Peak learning rate (reached after the warm-up of `[schedule]`).
    pub learning_rate: f64,
    /// Weight decay: decoupled for AdamW, an L2 penalty on the gradient for Adam and SGD.
    pub weight_decay: f32,
    /// Adam's first-moment decay.
    pub beta1: f32,
    /// Adam's second-moment decay.
    pub beta2: f32,
    /// Adam's denominator term.
    pub epsilon: f32,
    /// SGD momentum (0: plain SGD).
    pub momentum: f64,
    /// SGD dampening of the momentum (PyTorch's default 0; burn's own default is 0.1).
    pub dampening: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// Clip each parameter's gradient to this L2 norm (burn clips per parameter tensor, not
    /// over all parameters together).
    pub clip_grad_norm: Option<f32>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Adamw,
            learning_rate: 2e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            clip_grad_norm: None,
        }
    }
}

impl OptimizerConfig {
    /// Checks the numbers.
    pub fn validate(&self) -> Result<()> {
        if self.learning_rate.is_nan() || self.learning_rate <= 0.0 {
            bail!(
                "optimizer.learning_rate must be > 0, not {}",
                self.learning_rate
            );
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("optimizer.beta1 and beta2 must be in [0, 1)");
        }
        if self.epsilon.is_nan() || self.epsilon <= 0.0 || self.weight_decay.is_nan() {
            bail!("optimizer.epsilon must be > 0 and weight_decay a number");
        }
        if !(0.0..=1.0).contains(&self.momentum) || !(0.0..=1.0).contains(&self.dampening) {
            bail!("optimizer.momentum and dampening must be in [0, 1]");
        }
        if let Some(c) = self.clip_grad_norm
            && (c.is_nan() || c <= 0.0)
        {
            bail!("optimizer.clip_grad_norm must be > 0");
        }
        Ok(())
    }

    /// The optimizer, with empty state.
    pub fn init(&self) -> ModuleOptimizer {
        let clip = self.clip_grad_norm.map(GradientClippingConfig::Norm);
        let decay = (self.weight_decay != 0.0).then(|| WeightDecayConfig::new(self.weight_decay));
        match self.kind {
            OptimizerKind::Adamw => AdamWConfig::new()
                .with_beta_1(self.beta1)
                .with_beta_2(self.beta2)
                .with_epsilon(self.epsilon)
                .with_weight_decay(self.weight_decay)
                .with_grad_clipping(clip)
                .init(),
            OptimizerKind::Adam => AdamConfig::new()
                .with_beta_1(self.beta1)
                .with_beta_2(self.beta2)
                .with_epsilon(self.epsilon)
                .with_weight_decay(decay)
                .with_grad_clipping(clip)
                .init(),
            OptimizerKind::Sgd => SgdConfig::new()
                .with_momentum((self.momentum > 0.0).then(|| {
                    MomentumConfig::new()
                        .with_momentum(self.momentum)
                        .with_dampening(self.dampening)
                        .with_nesterov(self.nesterov)
                }))
                .with_weight_decay(decay)
                .with_gradient_clipping(clip)
                .init(),
        }
    }
}
