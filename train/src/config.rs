//! The training configuration (`train.toml`); command-line flags override it.

use crate::data::{Augment, Sampling};
use crate::loss::LossConfig;
use anyhow::{Context, Result, bail};
use retina_model::{HeadSpec, RetinaConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything a training run needs to know. Defaults suit a few thousand images on a CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Network preset: `small`, `reference` or `resnet18`.
    pub preset: String,
    /// Input size override (default: the preset's).
    pub image_size: Option<usize>,
    /// Head overrides (names, kinds, attach points, hidden widths); default: the preset's.
    pub heads: Option<Vec<HeadSpec>>,
    /// Apply Graham's local-average-colour subtraction.
    pub graham: bool,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay (the explicit L2 term is in `loss.l2`).
    pub weight_decay: f32,
    /// Epochs of linear warm-up before the cosine decay.
    pub warmup_epochs: f64,
    /// Share of the data held out for validation (when no validation file is given).
    pub val_fraction: f32,
    /// `shuffle`, or `balanced` to oversample rare grades.
    pub sampling: Sampling,
    /// Training-time augmentation; `augment = false` in TOML turns it off.
    #[serde(with = "augment_serde")]
    pub augment: Option<Augment>,
    /// Keep decoded, resized images in memory between epochs (skipped above 4 GiB).
    pub cache_images: bool,
    /// Validation metric that picks the exported epoch (`diagnosis.referable_auc`, `val_loss`,
    /// `diagnosis.quadratic_kappa`, `fluid.auc`, `vessel_growth.mae`, ...: the names of
    /// [`crate::scoring`]). Losses and errors are minimised, the others maximised.
    pub select_metric: String,
    /// Seed of everything random.
    pub seed: u64,
    /// The objective.
    pub loss: LossConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            preset: "small".into(),
            image_size: None,
            heads: None,
            graham: false,
            epochs: 12,
            batch_size: 16,
            learning_rate: 2e-3,
            weight_decay: 0.0,
            warmup_epochs: 1.0,
            val_fraction: 0.2,
            sampling: Sampling::Shuffle,
            augment: Some(Augment::default()),
            cache_images: true,
            select_metric: "diagnosis.referable_auc".into(),
            seed: 0,
            loss: LossConfig::new(),
        }
    }
}

mod augment_serde {
    use super::Augment;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Switch(bool),
        Settings(Augment),
    }

    pub fn serialize<S: Serializer>(v: &Option<Augment>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => Repr::Settings(*a).serialize(s),
            None => Repr::Switch(false).serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Augment>, D::Error> {
        Ok(match Repr::deserialize(d)? {
            Repr::Switch(true) => Some(Augment::default()),
            Repr::Switch(false) => None,
            Repr::Settings(a) => Some(a),
        })
    }
}

impl TrainConfig {
    /// Reads a TOML file; errors carry the line and column.
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let (line, col) = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                    (line, col)
                })
                .unwrap_or((1, 1));
            anyhow::anyhow!("{}:{line}:{col}: {}", path.display(), e.message())
        })
    }

    /// The network this config trains.
    pub fn model_config(&self) -> Result<RetinaConfig> {
        let mut c = RetinaConfig::preset(&self.preset)?;
        if let Some(s) = self.image_size {
            c.preprocess.image_size = s;
        }
        if let Some(h) = &self.heads {
            c.heads = h.clone();
        }
        c.preprocess.graham = self.graham;
        c.validate()?;
        Ok(c)
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            bail!("epochs and batch_size must be at least 1");
        }
        if self.learning_rate.is_nan()
            || self.learning_rate <= 0.0
            || !(0.0..0.9).contains(&self.val_fraction)
        {
            bail!("learning_rate must be > 0 and val_fraction in [0, 0.9)");
        }
        self.model_config()?;
        Ok(())
    }
}
