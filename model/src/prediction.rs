//! Turning raw head outputs into clinical answers: probabilities, grades and decisions.

use crate::bundle::OperatingPoint;
use crate::config::{DIAGNOSIS, HeadKind};
use crate::grade::{Grade, REFERABLE_FROM};
use crate::network::RetinaOutput;
use burn::tensor::activation::{sigmoid, softmax};
use serde::Serialize;
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
    /// A regression value.
    Regression {
        /// The predicted value.
        value: f32,
    },
}

/// Every head's answer for one image, by head name, plus the derived referable probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Answers by head name.
    pub heads: BTreeMap<String, HeadAnswer>,
}

impl Prediction {
    /// Converts a batch's raw outputs (one host read per head).
    pub fn from_output(out: &RetinaOutput, kinds: &[HeadKind]) -> Vec<Prediction> {
        let n = out.heads.first().map(|t| t.dims()[0]).unwrap_or(0);
        let mut preds = vec![
            Prediction {
                heads: BTreeMap::new()
            };
            n
        ];
        for ((name, raw), kind) in out.names.iter().zip(&out.heads).zip(kinds) {
            let vals: Vec<f32> = match kind {
                HeadKind::Multiclass(_) => softmax(raw.clone(), 1),
                HeadKind::Binary => sigmoid(raw.clone()),
                HeadKind::Regression => raw.clone(),
            }
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 host data");
            let w = kind.output_width();
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
                    HeadKind::Regression => HeadAnswer::Regression { value: row[0] },
                };
                p.heads.insert(name.clone(), answer);
            }
        }
        preds
    }

    /// P(referable) = P(grade >= 2), from the diagnosis head.
    pub fn referable_probability(&self) -> Option<f32> {
        match self.heads.get(DIAGNOSIS)? {
            HeadAnswer::Multiclass { probabilities, .. } => {
                Some(probabilities[REFERABLE_FROM.index()..].iter().sum())
            }
            _ => None,
        }
    }

    /// The most probable ICDR grade.
    pub fn grade(&self) -> Option<Grade> {
        match self.heads.get(DIAGNOSIS)? {
            HeadAnswer::Multiclass { class, .. } => Grade::from_index(*class),
            _ => None,
        }
    }

    /// P(yes) of a binary decision: `referable` or a binary head's name.
    pub fn decision_probability(&self, decision: &str) -> Option<f32> {
        if decision == "referable" {
            return self.referable_probability();
        }
        match self.heads.get(decision)? {
            HeadAnswer::Binary { probability } => Some(*probability),
            _ => None,
        }
    }

    /// The yes/no answer of a decision at an operating point (threshold 0.5 if the point has
    /// none for it).
    pub fn decide(&self, decision: &str, point: &OperatingPoint) -> Option<bool> {
        self.decision_probability(decision)
            .map(|p| p >= point.threshold(decision))
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
