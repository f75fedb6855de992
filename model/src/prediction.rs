//! Turning raw head outputs into clinical answers: probabilities, classes, decisions.
//!
//! Everything here reads the head specs, so a head added by config is answered, reported and
//! decided like the built-in ones.

use crate::bundle::OperatingPoint;
use crate::head::{HeadKind, HeadSpec};
use crate::network::RetinaOutput;
use burn::tensor::activation::{sigmoid, softmax};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// One head's answer for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HeadAnswer {
    /// Class probabilities (sum to 1) and the most likely class.
    Multiclass {
        /// Probability per class.
        probabilities: Vec<f32>,
        /// Index of the most probable class.
        class: usize,
    },
    /// Probability of "present".
    Binary {
        /// P(present).
        probability: f32,
    },
    /// A regression value, clamped into the head's range where it has one.
    Regression {
        /// The predicted value.
        value: f32,
    },
}

/// Every head's answer for one image, by head name, and P(yes) of every decision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prediction {
    /// Answers by head name.
    pub heads: BTreeMap<String, HeadAnswer>,
    /// P(yes) by decision name (`referable`, `fluid`, ...), as the head specs define them.
    pub decisions: BTreeMap<String, f32>,
}

impl Prediction {
    /// Converts a batch's raw outputs (one host read per head). `specs` are the network's
    /// heads, in output order.
    pub fn from_output(out: &RetinaOutput, specs: &[HeadSpec]) -> Vec<Prediction> {
        let n = out.heads.first().map(|t| t.dims()[0]).unwrap_or(0);
        let mut preds = vec![Prediction::default(); n];
        for (raw, spec) in out.heads.iter().zip(specs) {
            let kind = spec.kind;
            let vals: Vec<f32> = match kind {
                HeadKind::Multiclass(_) => softmax(raw.clone(), 1),
                HeadKind::Binary => sigmoid(raw.clone()),
                HeadKind::Regression => raw.clone(),
            }
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 host data");
            let w = kind.output_width();
            let decision = spec.decision_rule();
            for (i, p) in preds.iter_mut().enumerate() {
                let row = &vals[i * w..(i + 1) * w];
                let answer = match kind {
                    HeadKind::Multiclass(_) => HeadAnswer::Multiclass {
                        probabilities: row.to_vec(),
                        class: argmax(row),
                    },
                    HeadKind::Binary => HeadAnswer::Binary {
                        probability: row[0],
                    },
                    HeadKind::Regression => HeadAnswer::Regression {
                        value: spec.clamp(row[0]),
                    },
                };
                if let Some(d) = &decision {
                    p.decisions.insert(d.name.clone(), d.probability(row));
                }
                p.heads.insert(spec.name.clone(), answer);
            }
        }
        preds
    }

    /// P(yes) of a decision: `referable`, or a binary head's name.
    pub fn decision_probability(&self, decision: &str) -> Option<f32> {
        self.decisions.get(decision).copied()
    }

    /// The most probable class of a multiclass head.
    pub fn class(&self, head: &str) -> Option<usize> {
        match self.heads.get(head)? {
            HeadAnswer::Multiclass { class, .. } => Some(*class),
            _ => None,
        }
    }

    /// The value of a regression head.
    pub fn value(&self, head: &str) -> Option<f32> {
        match self.heads.get(head)? {
            HeadAnswer::Regression { value } => Some(*value),
            _ => None,
        }
    }

    /// The yes/no answer of a decision at an operating point (threshold 0.5 if the point has
    /// none for it).
    pub fn decide(&self, decision: &str, point: &OperatingPoint) -> Option<bool> {
        self.decision_probability(decision)
            .map(|p| p >= point.threshold(decision))
    }

    /// The answer of one head as a JSON object: a multiclass head's class (under its
    /// `answer_key`), class name and probabilities, plus its decision (`referable`,
    /// `referable_probability`, `referable_threshold`); a binary head's probability, yes/no
    /// and threshold; a regression's value.
    pub fn head_json(&self, spec: &HeadSpec, point: &OperatingPoint) -> Option<Value> {
        let key = spec.answer_key();
        let mut v = match self.heads.get(&spec.name)? {
            HeadAnswer::Multiclass {
                probabilities,
                class,
            } => {
                let names = spec.class_names();
                json!({
                    key: class,
                    "name": names.get(*class).map(String::as_str).unwrap_or("?"),
                    "probabilities": probabilities,
                })
            }
            HeadAnswer::Binary { probability } => json!({
                "probability": probability,
                key: self.decide(&spec.name, point) == Some(true),
                "threshold": point.threshold(&spec.name),
            }),
            HeadAnswer::Regression { value } => json!({ key: value }),
        };
        if let (HeadKind::Multiclass(_), Some(d)) = (spec.kind, spec.decision_rule()) {
            v[d.name.as_str()] = json!(self.decide(&d.name, point) == Some(true));
            v[format!("{}_probability", d.name)] = json!(self.decision_probability(&d.name));
            v[format!("{}_threshold", d.name)] = json!(point.threshold(&d.name));
        }
        Some(v)
    }

    /// The answer of one head as lines for a person, e.g.
    /// `diagnosis      2 (moderate)   [none 0.02, ...]` and
    /// `referable      YES   p=0.93 (threshold 0.13)`.
    pub fn head_lines(&self, spec: &HeadSpec, point: &OperatingPoint) -> Vec<String> {
        let mut lines = Vec::new();
        let Some(answer) = self.heads.get(&spec.name) else {
            return lines;
        };
        let yes_no = |d: &str| match self.decide(d, point) {
            Some(true) => "YES",
            _ => "no",
        };
        match answer {
            HeadAnswer::Multiclass {
                probabilities,
                class,
            } => {
                let names = spec.class_names();
                let probs: Vec<String> = names
                    .iter()
                    .zip(probabilities)
                    .map(|(n, v)| format!("{n} {v:.2}"))
                    .collect();
                lines.push(format!(
                    "{:<14} {class} ({})   [{}]",
                    spec.name,
                    names.get(*class).map(String::as_str).unwrap_or("?"),
                    probs.join(", ")
                ));
                if let Some(d) = spec.decision_rule() {
                    lines.push(format!(
                        "{:<14} {}   p={:.2} (threshold {:.2})",
                        d.name,
                        yes_no(&d.name),
                        self.decision_probability(&d.name).unwrap_or(f32::NAN),
                        point.threshold(&d.name)
                    ));
                }
            }
            HeadAnswer::Binary { probability } => lines.push(format!(
                "{:<14} {}   p={probability:.2} (threshold {:.2})",
                spec.name,
                yes_no(&spec.name),
                point.threshold(&spec.name)
            )),
            HeadAnswer::Regression { value } => {
                lines.push(format!("{:<14} {value:.3}", spec.name));
            }
        }
        lines
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0
}
