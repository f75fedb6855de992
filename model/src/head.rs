//! A prediction head: its spec (what it predicts, where it reads, how its answer is read) and
//! the runtime module (an optional hidden layer, then a linear output layer).
//!
//! Heads are data. Everything the rest of Retina needs to know about a head — its width, its
//! class names, the yes/no decision derived from it (the referable rule of the diagnosis head),
//! the range of a regression, the key its answer is reported under — comes from its
//! [`HeadSpec`], so a head nobody wrote code for trains, evaluates, predicts and serves.

use crate::config::ConfigError;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Name of the diagnosis head (ICDR grade).
pub const DIAGNOSIS: &str = "diagnosis";
/// Name of the macular-edema head.
pub const FLUID: &str = "fluid";
/// Name of the neovascularization-amount head.
pub const VESSEL_GROWTH: &str = "vessel_growth";
/// Name of the diagnosis head's derived decision: grade 2 (moderate) or worse.
pub const REFERABLE: &str = "referable";
/// Name of the image-quality head.
pub const QUALITY: &str = "quality";
/// Name of the quality head's refusing decision.
pub const UNGRADABLE: &str = "ungradable";
/// The quality head's classes: gradable, the reasons a photograph can be too poor to grade,
/// and not a fundus photograph at all.
pub const QUALITY_CLASSES: [&str; 7] = [
    "gradable",
    "blur",
    "underexposed",
    "overexposed",
    "off_centre",
    "occluded",
    crate::quality::NOT_FUNDUS,
];

/// Where a head reads its input: the pooled output of one trunk stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AttachPoint {
    /// The shared embedding: the last stage's global-average-pooled output.
    Embedding,
    /// The pooled output of stage `k` (1-based). Closer to the input, so a loss here shapes the
    /// early layers more directly.
    Stage(usize),
}

impl AttachPoint {
    /// The 1-based stage index this point reads, given the trunk's stage count.
    pub fn stage_index(self, num_stages: usize) -> usize {
        match self {
            AttachPoint::Embedding => num_stages,
            AttachPoint::Stage(k) => k,
        }
    }
}

impl fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachPoint::Embedding => write!(f, "embedding"),
            AttachPoint::Stage(k) => write!(f, "stage{k}"),
        }
    }
}

impl FromStr for AttachPoint {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        if t == "embedding" {
            return Ok(AttachPoint::Embedding);
        }
        t.strip_prefix("stage")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&k| k >= 1)
            .map(AttachPoint::Stage)
            .ok_or_else(|| ConfigError::BadAttachPoint(s.to_string()))
    }
}

impl TryFrom<String> for AttachPoint {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<AttachPoint> for String {
    fn from(a: AttachPoint) -> String {
        a.to_string()
    }
}

/// How a head turns the feature map it reads into one vector.
///
/// The global average suits findings spread over the retina (many haemorrhages, a pale
/// image); it dilutes one that covers a few pixels: a single tuft of new vessels in one
/// quadrant changes a channel's average by its share of the area, and a proliferative eye is
/// one such tuft away from a severe one. The global maximum answers "is it anywhere", which is
/// how the ICDR scale grades (any new vessel makes an eye proliferative). `average_max` feeds
/// the head both, side by side (the head's input is twice the stage's width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mean over the map (what the PyTorch reference network does).
    #[default]
    Average,
    /// The maximum over the map.
    Max,
    /// The mean and the maximum, concatenated `[average, max]`.
    AverageMax,
}

impl Pooling {
    fn is_average(&self) -> bool {
        *self == Pooling::Average
    }

    /// Whether the pooled vector includes the maximum over the map.
    pub fn uses_max(self) -> bool {
        self != Pooling::Average
    }

    /// Width of the pooled vector from a stage of `channels` channels.
    pub fn width(self, channels: usize) -> usize {
        match self {
            Pooling::Average | Pooling::Max => channels,
            Pooling::AverageMax => 2 * channels,
        }
    }

    /// The pooled vector `[N, width]` from a stage's average and (where [`Self::uses_max`])
    /// maximum, each `[N, C]`.
    pub fn combine(self, average: Tensor<2>, max: Option<Tensor<2>>) -> Tensor<2> {
        match (self, max) {
            (Pooling::Average, _) => average,
            (Pooling::Max, Some(max)) => max,
            (Pooling::AverageMax, Some(max)) => Tensor::cat(vec![average, max], 1),
            (_, None) => panic!("a {self}-pooling head needs its stage's maximum"),
        }
    }

    /// Pools a feature map `[N, C, H, W]` to `[N, width]`.
    pub fn pool(self, map: Tensor<4>) -> Tensor<2> {
        let [n, c, h, w] = map.dims();
        let flat = map.reshape([n, c, h * w]);
        let max = self
            .uses_max()
            .then(|| flat.clone().max_dim(2).reshape([n, c]));
        self.combine(flat.mean_dim(2).reshape([n, c]), max)
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooling::Average => "average",
            Pooling::Max => "max",
            Pooling::AverageMax => "average_max",
        })
    }
}

/// What a head predicts, which decides its output width and its loss family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// One of `n` classes (logits of width `n`), e.g. the ICDR grade.
    Multiclass(usize),
    /// Present / absent (one logit), e.g. macular edema.
    Binary,
    /// A real number (one output), e.g. the amount of neovascularization in 0..1.
    Regression,
}

impl HeadKind {
    /// Width of the head's output.
    pub fn output_width(self) -> usize {
        match self {
            HeadKind::Multiclass(n) => n,
            HeadKind::Binary | HeadKind::Regression => 1,
        }
    }

    /// Number of classes a label can take (2 for binary); `None` for a regression.
    pub fn classes(self) -> Option<usize> {
        match self {
            HeadKind::Multiclass(n) => Some(n),
            HeadKind::Binary => Some(2),
            HeadKind::Regression => None,
        }
    }
}

impl fmt::Display for HeadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadKind::Multiclass(n) => write!(f, "multiclass({n})"),
            HeadKind::Binary => write!(f, "binary"),
            HeadKind::Regression => write!(f, "regression"),
        }
    }
}

/// How a regression's raw output becomes its value.
///
/// A bounded amount that is 0 for most images (new vessels: none below grade 4) is badly served
/// by a raw output: an L1 loss learns the conditional median, which is 0 until the network is
/// sure, and a squared error leaves every healthy eye a little above 0. Through the logistic
/// link the output `z` maps to `low + (high - low) * sigmoid(z)`, so the bounds are reached
/// only at large `|z|` and the soft-target cross entropy (the head's default loss then)
/// estimates the conditional mean, which is what a correlation with the truth rewards. Measured
/// on the vessel-growth head (`docs/history.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// The output is the value (clamped into the range, where there is one).
    #[default]
    Identity,
    /// `low + (high - low) * sigmoid(output)`; needs a `range`.
    Logistic,
}

impl Link {
    fn is_identity(&self) -> bool {
        *self == Link::Identity
    }
}

/// A yes/no decision read off a multiclass head: "yes" when the class is `from_class` or
/// higher, with probability `P(class >= from_class)`. The diagnosis head's `referable`
/// (grade 2 or worse) is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdDecision {
    /// The decision's name: the key of its threshold in an operating point and of its answer.
    pub name: String,
    /// Lowest class that counts as "yes".
    pub from_class: usize,
    /// A "yes" refuses the image: no other head's answer or decision is given for it (the
    /// quality head's `ungradable`). At most one decision of a network refuses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refuses: bool,
}

/// A prediction head: data, not code. Any number of heads can share the trunk.
///
/// Only `name` and `kind` are required in a config file; unknown keys are refused (a typo
/// would otherwise silently drop a setting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    /// The head's name; also the label column it learns from and the key of its output.
    pub name: String,
    /// What it predicts.
    pub kind: HeadKind,
    /// Which embedding it reads (default: `embedding`).
    #[serde(default = "embedding")]
    pub attach: AttachPoint,
    /// How the stage's feature map is pooled for this head (default: the average).
    #[serde(default, skip_serializing_if = "Pooling::is_average")]
    pub pooling: Pooling,
    /// Width of an optional hidden layer (Linear + ReLU) before the output layer.
    #[serde(default)]
    pub hidden: Option<usize>,
    /// Names of a multiclass head's classes, in index order (default `0`, `1`, ...).
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// A yes/no decision derived from a multiclass head (e.g. `referable` from grade 2).
    /// A binary head is its own decision, under its own name.
    #[serde(default)]
    pub decision: Option<ThresholdDecision>,
    /// The values a regression can take, `[low, high]`: labels outside are refused, answers
    /// are clamped into it. `None` leaves the regression unbounded.
    #[serde(default)]
    pub range: Option<[f32; 2]>,
    /// How a regression's output becomes its value (default: the output itself).
    #[serde(default, skip_serializing_if = "Link::is_identity")]
    pub link: Link,
    /// The key of the head's main answer in a prediction (default: `class` for a multiclass
    /// head, `present` for a binary one, `value` for a regression).
    #[serde(default)]
    pub answer_key: Option<String>,
    /// Temperature the head's logits are divided by before softmax or sigmoid, fitted by
    /// `retina-train calibrate` so that probabilities match observed frequencies. `None`
    /// (uncalibrated) is 1. Training ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
}

fn embedding() -> AttachPoint {
    AttachPoint::Embedding
}

impl HeadSpec {
    /// A head on the embedding, with no hidden layer and the kind's defaults.
    pub fn new(name: String, kind: HeadKind) -> HeadSpec {
        HeadSpec {
            name,
            kind,
            attach: AttachPoint::Embedding,
            pooling: Pooling::Average,
            hidden: None,
            classes: None,
            decision: None,
            range: None,
            link: Link::Identity,
            answer_key: None,
            temperature: None,
        }
    }

    /// Sets where the head reads.
    pub fn with_attach(mut self, attach: AttachPoint) -> Self {
        self.attach = attach;
        self
    }

    /// Sets how the head pools the feature map it reads.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Sets the hidden layer's width.
    pub fn with_hidden(mut self, hidden: Option<usize>) -> Self {
        self.hidden = hidden;
        self
    }

    /// Sets the class names.
    pub fn with_classes(mut self, classes: Option<Vec<String>>) -> Self {
        self.classes = classes;
        self
    }

    /// Sets the derived decision.
    pub fn with_decision(mut self, decision: Option<ThresholdDecision>) -> Self {
        self.decision = decision;
        self
    }

    /// Sets a regression's range.
    pub fn with_range(mut self, range: Option<[f32; 2]>) -> Self {
        self.range = range;
        self
    }

    /// Sets a regression's link.
    pub fn with_link(mut self, link: Link) -> Self {
        self.link = link;
        self
    }

    /// Sets the answer key.
    pub fn with_answer_key(mut self, key: Option<String>) -> Self {
        self.answer_key = key;
        self
    }
}

/// How a decision is read off its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionRule {
    /// The binary head's own probability; a label > 0.5 is "yes".
    Binary,
    /// `P(class >= k)` of a multiclass head; a label >= k is "yes".
    FromClass(usize),
}

/// A yes/no decision the network supports, with the head it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Its name (`referable`, `fluid`, ...): the key of its threshold in an operating point.
    pub name: String,
    /// The head it is read from.
    pub head: String,
    /// How.
    pub rule: DecisionRule,
}

impl Decision {
    /// Whether a label of the head counts as "yes".
    pub fn truth(&self, label: f32) -> bool {
        match self.rule {
            DecisionRule::Binary => label > 0.5,
            DecisionRule::FromClass(k) => label >= k as f32,
        }
    }

    /// Whether a class index counts as "yes" (for class weights and the decision bias).
    pub fn class_is_positive(&self, class: usize) -> bool {
        match self.rule {
            DecisionRule::Binary => class == 1,
            DecisionRule::FromClass(k) => class >= k,
        }
    }

    /// P(yes) from the head's output probabilities (softmax row or sigmoid).
    pub fn probability(&self, probabilities: &[f32]) -> f32 {
        match self.rule {
            DecisionRule::Binary => probabilities[0],
            DecisionRule::FromClass(k) => probabilities[k.min(probabilities.len())..].iter().sum(),
        }
    }
}

impl HeadSpec {
    /// The default heads: the [clinical heads](HeadSpec::clinical_heads) and image quality on
    /// the embedding.
    pub fn default_heads() -> Vec<HeadSpec> {
        let mut heads = Self::clinical_heads();
        heads.push(Self::quality());
        heads
    }

    /// The clinical heads: diagnosis (the five ICDR grades, `referable` from grade 2) and fluid
    /// on the embedding, vessel growth (0..1) on stage 3. With the `reference` trunk they are
    /// exactly the PyTorch benchmark network (`shared/peer/model.py`).
    pub fn clinical_heads() -> Vec<HeadSpec> {
        vec![
            Self::diagnosis(),
            HeadSpec::new(FLUID.into(), HeadKind::Binary),
            Self::vessel_growth(),
        ]
    }

    /// The image-quality head: gradable or the reason not, `ungradable` (refusing) from
    /// class 1.
    pub fn quality() -> HeadSpec {
        HeadSpec::new(QUALITY.into(), HeadKind::Multiclass(QUALITY_CLASSES.len()))
            .with_classes(Some(
                QUALITY_CLASSES.iter().map(|c| c.to_string()).collect(),
            ))
            .with_decision(Some(ThresholdDecision {
                name: UNGRADABLE.into(),
                from_class: 1,
                refuses: true,
            }))
            .with_answer_key(Some("reason".into()))
    }

    /// Whether this head's decision refuses images (see [`ThresholdDecision::refuses`]).
    pub fn refuses(&self) -> bool {
        self.decision.as_ref().is_some_and(|d| d.refuses)
    }

    /// The ICDR diagnosis head on the embedding.
    pub fn diagnosis() -> HeadSpec {
        HeadSpec::new(DIAGNOSIS.into(), HeadKind::Multiclass(crate::NUM_GRADES))
            .with_classes(Some(crate::Grade::class_names()))
            .with_decision(Some(ThresholdDecision {
                name: REFERABLE.into(),
                from_class: crate::grade::REFERABLE_FROM.index(),
                refuses: false,
            }))
            .with_answer_key(Some("grade".into()))
    }

    /// The neovascularization-amount head (0..1) on stage 3.
    pub fn vessel_growth() -> HeadSpec {
        HeadSpec::new(VESSEL_GROWTH.into(), HeadKind::Regression)
            .with_attach(AttachPoint::Stage(3))
            .with_range(Some([0.0, 1.0]))
            .with_link(Link::Logistic)
            .with_answer_key(Some("amount".into()))
    }

    /// The class names, in index order (`0`, `1`, ... where the spec names none); empty for a
    /// regression, `absent`/`present` for a binary head.
    pub fn class_names(&self) -> Vec<String> {
        match self.kind {
            HeadKind::Multiclass(n) => match &self.classes {
                Some(c) => c.clone(),
                None => (0..n).map(|i| i.to_string()).collect(),
            },
            HeadKind::Binary => vec!["absent".into(), "present".into()],
            HeadKind::Regression => Vec::new(),
        }
    }

    /// The yes/no decision this head supports, if any.
    pub fn decision_rule(&self) -> Option<Decision> {
        match (self.kind, &self.decision) {
            (HeadKind::Binary, _) => Some(Decision {
                name: self.name.clone(),
                head: self.name.clone(),
                rule: DecisionRule::Binary,
            }),
            (HeadKind::Multiclass(_), Some(d)) => Some(Decision {
                name: d.name.clone(),
                head: self.name.clone(),
                rule: DecisionRule::FromClass(d.from_class),
            }),
            _ => None,
        }
    }

    /// The key the head's main answer is reported under.
    pub fn answer_key(&self) -> &str {
        match (&self.answer_key, self.kind) {
            (Some(k), _) => k,
            (None, HeadKind::Multiclass(_)) => "class",
            (None, HeadKind::Binary) => "present",
            (None, HeadKind::Regression) => "value",
        }
    }

    /// A regression's value from its raw output: through the [`Link`], clamped into the
    /// spec's range where it has one.
    pub fn value(&self, raw: f32) -> f32 {
        match (self.link, self.range) {
            (Link::Logistic, Some([lo, hi])) => lo + (hi - lo) / (1.0 + (-raw).exp()),
            (_, Some([lo, hi])) => raw.clamp(lo, hi),
            (_, None) => raw,
        }
    }

    /// Parses a label cell for this head: a class index (multiclass), 0/1/yes/no/true/false
    /// (binary) or a number inside the range (regression). The message says what was expected.
    pub fn parse_label(&self, cell: &str) -> Result<f32, String> {
        let t = cell.trim();
        match self.kind {
            HeadKind::Multiclass(n) => {
                let named = self
                    .classes
                    .as_ref()
                    .and_then(|c| c.iter().position(|x| x.eq_ignore_ascii_case(t)));
                let idx = match named {
                    Some(i) => Some(i),
                    None => t
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.fract() == 0.0 && *v >= 0.0)
                        .map(|v| v as usize),
                };
                match idx {
                    Some(i) if i < n => Ok(i as f32),
                    _ => Err(format!(
                        "expected a class of `{}`: an integer 0-{} or one of {:?}, found `{t}`",
                        self.name,
                        n - 1,
                        self.class_names()
                    )),
                }
            }
            HeadKind::Binary => match t.to_ascii_lowercase().as_str() {
                "1" | "1.0" | "yes" | "true" | "y" => Ok(1.0),
                "0" | "0.0" | "no" | "false" | "n" => Ok(0.0),
                _ => Err(format!(
                    "expected 0 or 1 (or yes/no) for `{}`, found `{t}`",
                    self.name
                )),
            },
            HeadKind::Regression => {
                let v: f32 = t
                    .parse()
                    .ok()
                    .filter(|v: &f32| v.is_finite())
                    .ok_or_else(|| format!("expected a number for `{}`, found `{t}`", self.name))?;
                match self.range {
                    Some([lo, hi]) if !(lo..=hi).contains(&v) => {
                        Err(format!("`{}` must lie in {lo}..{hi}, found {v}", self.name))
                    }
                    _ => Ok(v),
                }
            }
        }
    }

    /// Checks the spec on its own (attach points are checked against the trunk by
    /// [`crate::RetinaConfig::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !valid_name(&self.name) {
            return bad(format!(
                "head name `{}` must be non-empty lowercase letters, digits and `_`",
                self.name
            ));
        }
        if let HeadKind::Multiclass(n) = self.kind
            && n < 2
        {
            return bad(format!(
                "head `{}` is multiclass({n}): needs >= 2",
                self.name
            ));
        }
        if self.hidden == Some(0) {
            return bad(format!(
                "head `{}` has a hidden layer of width 0",
                self.name
            ));
        }
        match (self.kind, &self.classes) {
            (HeadKind::Multiclass(n), Some(c)) if c.len() != n => {
                return bad(format!(
                    "head `{}` is multiclass({n}) but names {} classes",
                    self.name,
                    c.len()
                ));
            }
            (HeadKind::Binary | HeadKind::Regression, Some(_)) => {
                return bad(format!(
                    "head `{}` is {}: `classes` is for multiclass heads",
                    self.name, self.kind
                ));
            }
            _ => {}
        }
        match (self.kind, &self.decision) {
            (HeadKind::Multiclass(n), Some(d)) => {
                if !valid_name(&d.name) {
                    return bad(format!(
                        "decision name `{}` of head `{}` must be non-empty lowercase letters, \
                         digits and `_`",
                        d.name, self.name
                    ));
                }
                if d.from_class == 0 || d.from_class >= n {
                    return bad(format!(
                        "decision `{}` of head `{}` starts at class {}: needs 1..{}",
                        d.name,
                        self.name,
                        d.from_class,
                        n - 1
                    ));
                }
            }
            (HeadKind::Binary, Some(_)) => {
                return bad(format!(
                    "head `{}` is binary: it is its own decision, named `{}`; drop `decision`",
                    self.name, self.name
                ));
            }
            (HeadKind::Regression, Some(_)) => {
                return bad(format!(
                    "head `{}` is a regression: a decision needs a multiclass head",
                    self.name
                ));
            }
            _ => {}
        }
        match (self.kind, self.range) {
            (HeadKind::Regression, Some([lo, hi]))
                if !(lo.is_finite() && hi.is_finite() && lo < hi) =>
            {
                return bad(format!(
                    "head `{}` has range [{lo}, {hi}]: needs finite low < high",
                    self.name
                ));
            }
            (HeadKind::Multiclass(_) | HeadKind::Binary, Some(_)) => {
                return bad(format!(
                    "head `{}` is {}: `range` is for regression heads",
                    self.name, self.kind
                ));
            }
            _ => {}
        }
        match (self.kind, self.link, self.range) {
            (HeadKind::Regression, Link::Logistic, None) => {
                return bad(format!(
                    "head `{}` has link = \"logistic\": it needs a `range = [low, high]`",
                    self.name
                ));
            }
            (HeadKind::Multiclass(_) | HeadKind::Binary, Link::Logistic, _) => {
                return bad(format!(
                    "head `{}` is {}: `link` is for regression heads",
                    self.name, self.kind
                ));
            }
            _ => {}
        }
        match (self.kind, self.temperature) {
            (_, Some(t)) if !(t.is_finite() && t > 0.0) => {
                return bad(format!(
                    "head `{}` has temperature {t}: needs a finite value > 0",
                    self.name
                ));
            }
            (HeadKind::Regression, Some(_)) => {
                return bad(format!(
                    "head `{}` is a regression: a temperature is for classification heads",
                    self.name
                ));
            }
            _ => {}
        }
        if let Some(k) = &self.answer_key
            && (!valid_name(k) || k.ends_with("_probability") || k == "probabilities")
        {
            return bad(format!(
                "answer_key `{k}` of head `{}` must be lowercase letters, digits and `_` \
                 (and not a probability key)",
                self.name
            ));
        }
        Ok(())
    }

    /// Builds the head for an input embedding of width `input_width`.
    pub fn init(&self, input_width: usize, device: &Device) -> Head {
        let width = self.kind.output_width();
        let (hidden, out_in) = match self.hidden {
            Some(h) => (Some(LinearConfig::new(input_width, h).init(device)), h),
            None => (None, input_width),
        };
        let mut out = LinearConfig::new(out_in, width).init(device);
        // A refusing head starts from the prior that most photographs are gradable (the
        // prior-probability initialisation of Lin et al.'s focal-loss paper): with uniform
        // logits it would refuse (n-1)/n of everything, an untrained or barely trained
        // model's answers included.
        if let (true, HeadKind::Multiclass(n)) = (self.refuses(), self.kind) {
            let mut b = vec![0f32; n];
            b[0] = (GRADABLE_PRIOR / (1.0 - GRADABLE_PRIOR) * (n - 1) as f32).ln();
            out.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(b, [n]),
                device,
            )));
        }
        Head { hidden, out }
    }
}

/// P(class 0) a refusing head starts at.
const GRADABLE_PRIOR: f32 = 0.95;

/// The runtime head built from a [`HeadSpec`]. Its output is raw: logits for classification
/// heads, the value itself for regression heads. Turning outputs into probabilities is the job
/// of [`crate::Prediction`], so that losses get the numerically stable raw values.
#[derive(Module, Debug)]
pub struct Head {
    /// Optional hidden layer (Linear + ReLU).
    pub hidden: Option<Linear>,
    /// Output layer.
    pub out: Linear,
}

impl Head {
    /// `[N, input_width]` to `[N, output_width]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = match &self.hidden {
            Some(l) => relu(l.forward(x)),
            None => x,
        };
        self.out.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_max_pooling_head_sees_one_hot_spot_that_the_average_dilutes() {
        // Two channels on a 4x4 map: channel 0 has one hot pixel (a single tuft), channel 1 a
        // faint uniform signal with the same mean.
        let device = Device::flex();
        let mut v = vec![0f32; 2 * 16];
        v[5] = 8.0;
        v[16..].fill(0.5);
        let map = Tensor::<4>::from_data(TensorData::new(v, [1, 2, 4, 4]), &device);
        let pooled = |p: Pooling| {
            p.pool(map.clone())
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap()
        };
        assert_eq!(pooled(Pooling::Average), [0.5, 0.5]);
        assert_eq!(pooled(Pooling::Max), [8.0, 0.5]);
        assert_eq!(pooled(Pooling::AverageMax), [0.5, 0.5, 8.0, 0.5]);
        assert_eq!(Pooling::AverageMax.width(48), 96);
        assert_eq!(Pooling::Max.width(48), 48);
    }

    #[test]
    fn pooling_is_named_in_a_config_only_when_it_is_not_the_average() {
        let plain = serde_json::to_string(&HeadSpec::diagnosis()).unwrap();
        assert!(!plain.contains("pooling"), "{plain}");
        let spec = HeadSpec::diagnosis().with_pooling(Pooling::AverageMax);
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains(r#""pooling":"average_max""#), "{text}");
        assert_eq!(serde_json::from_str::<HeadSpec>(&text).unwrap(), spec);
        // A spec written before the field existed reads as the average.
        let old: HeadSpec = serde_json::from_str(&plain).unwrap();
        assert_eq!(old.pooling, Pooling::Average);
        let typo = plain.replace(
            r#""name":"diagnosis""#,
            r#""name":"diagnosis","pooling":"maximum""#,
        );
        let err = serde_json::from_str::<HeadSpec>(&typo)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("maximum") && err.contains("average_max"),
            "{err}"
        );
    }

    #[test]
    fn attach_points_parse_and_print() {
        assert_eq!(
            "embedding".parse::<AttachPoint>().unwrap(),
            AttachPoint::Embedding
        );
        assert_eq!(
            "Stage3".parse::<AttachPoint>().unwrap(),
            AttachPoint::Stage(3)
        );
        assert!("stage0".parse::<AttachPoint>().is_err());
        assert!("layer2".parse::<AttachPoint>().is_err());
        assert_eq!(AttachPoint::Stage(2).to_string(), "stage2");
    }

    #[test]
    fn the_referable_rule_comes_from_the_diagnosis_spec() {
        let d = HeadSpec::diagnosis().decision_rule().unwrap();
        assert_eq!(d.name, REFERABLE);
        let yes: Vec<bool> = (0..5).map(|g| d.truth(g as f32)).collect();
        assert_eq!(yes, [false, false, true, true, true]);
        let p = d.probability(&[0.1, 0.2, 0.3, 0.25, 0.15]);
        assert!((p - 0.7).abs() < 1e-6, "{p}");
        // Moving the rule moves every consumer.
        let mut spec = HeadSpec::diagnosis();
        spec.decision.as_mut().unwrap().from_class = 3;
        let d = spec.decision_rule().unwrap();
        assert!(!d.truth(2.0) && d.truth(3.0));
        assert!((d.probability(&[0.1, 0.2, 0.3, 0.25, 0.15]) - 0.4).abs() < 1e-6);
    }

    #[test]
    fn labels_parse_by_kind_and_range() {
        let g = HeadSpec::diagnosis();
        assert_eq!(g.parse_label("3").unwrap(), 3.0);
        assert_eq!(g.parse_label("moderate").unwrap(), 2.0);
        assert!(g.parse_label("5").unwrap_err().contains("0-4"));
        assert!(g.parse_label("1.5").is_err());
        let v = HeadSpec::vessel_growth();
        assert_eq!(v.parse_label("0.25").unwrap(), 0.25);
        assert!(v.parse_label("1.5").unwrap_err().contains("0..1"));
        let free = HeadSpec::new("cup_disc_ratio".into(), HeadKind::Regression);
        assert_eq!(free.parse_label("7.5").unwrap(), 7.5);
        assert!(free.parse_label("nan").is_err());
        let b = HeadSpec::new("laser_scars".into(), HeadKind::Binary);
        assert_eq!(b.parse_label("yes").unwrap(), 1.0);
        assert!(b.parse_label("2").is_err());
    }

    #[test]
    fn a_config_needs_only_name_and_kind_and_refuses_typos() {
        let h: HeadSpec =
            serde_json::from_str(r#"{"name": "laser_scars", "kind": "binary"}"#).unwrap();
        assert_eq!(h, HeadSpec::new("laser_scars".into(), HeadKind::Binary));
        let e = serde_json::from_str::<HeadSpec>(
            r#"{"name": "x", "kind": "binary", "atach": "stage2"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("atach"), "{e}");
    }

    #[test]
    fn inconsistent_specs_are_refused() {
        let mut s = HeadSpec::diagnosis();
        s.classes = Some(vec!["a".into(), "b".into()]);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("names 2 classes")
        );
        let mut s = HeadSpec::diagnosis();
        s.decision.as_mut().unwrap().from_class = 5;
        assert!(s.validate().is_err());
        let s = HeadSpec::new("x".into(), HeadKind::Binary).with_range(Some([0.0, 1.0]));
        assert!(s.validate().is_err());
        let s = HeadSpec::new("x".into(), HeadKind::Regression).with_range(Some([1.0, 0.0]));
        assert!(s.validate().is_err());
        assert!(HeadSpec::vessel_growth().validate().is_ok());
        let s = HeadSpec::new("x".into(), HeadKind::Regression).with_link(Link::Logistic);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("needs a `range"), "{e}");
        let s = HeadSpec::new("x".into(), HeadKind::Binary).with_link(Link::Logistic);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("`link` is for regression heads"), "{e}");
    }

    /// The logistic link maps the output onto the range (the midpoint at 0, the bounds only
    /// approached); the identity clamps; no range leaves the output as it is.
    #[test]
    fn a_regression_value_follows_its_link() {
        let s = HeadSpec::new("x".into(), HeadKind::Regression)
            .with_range(Some([2.0, 6.0]))
            .with_link(Link::Logistic);
        assert_eq!(s.value(0.0), 4.0);
        let v = s.value(1.0);
        assert!(
            (v - (2.0 + 4.0 / (1.0 + (-1.0f32).exp()))).abs() < 1e-6,
            "{v}"
        );
        assert!(s.value(-30.0) >= 2.0 && s.value(-30.0) < 2.001);
        assert!(s.value(30.0) <= 6.0 && s.value(30.0) > 5.999);
        let s = s.with_link(Link::Identity);
        assert_eq!((s.value(1.0), s.value(-1.0), s.value(9.0)), (2.0, 2.0, 6.0));
        assert_eq!(s.value(3.5), 3.5);
        let s = s.with_range(None);
        assert_eq!(s.value(-7.0), -7.0);
    }

    /// Bundles written before the link existed have none and read as the identity; the
    /// identity is not written, the logistic link is and reads back.
    #[test]
    fn the_link_is_optional_in_a_spec() {
        let old: HeadSpec = serde_json::from_str(
            r#"{"name": "vessel_growth", "kind": "regression", "attach": "stage3",
                "range": [0.0, 1.0], "answer_key": "amount"}"#,
        )
        .unwrap();
        assert_eq!(old.link, Link::Identity);
        assert!(!serde_json::to_string(&old).unwrap().contains("link"));
        let new = HeadSpec::vessel_growth();
        assert_eq!(new.link, Link::Logistic);
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(r#""link":"logistic""#), "{json}");
        assert_eq!(serde_json::from_str::<HeadSpec>(&json).unwrap(), new);
    }
}
