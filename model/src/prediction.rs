//! Turning raw head outputs into clinical answers: probabilities, classes, decisions.
//!
//! Everything here reads the head specs, so a head added by config is answered, reported and
//! decided like the built-in ones.

use crate::bundle::OperatingPoint;
use crate::head::{HeadKind, HeadSpec};
use crate::network::RetinaOutput;
use crate::quality::Refusal;
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
    /// The gradability check's refusal, set by whoever ran the check on the image's view.
    pub check: Option<Refusal>,
    /// The network's refusing decision (the quality head's `ungradable`), if it has one.
    pub gate: Option<Gate>,
    /// Each head's raw output for the image (logits before any temperature; a regression's
    /// value before clamping), by head name: what calibration fits temperatures on.
    pub raw: BTreeMap<String, Vec<f32>>,
}

/// Where a prediction's refusing decision comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    /// The decision's name (`ungradable`).
    pub decision: String,
    /// The head it is read from (`quality`).
    pub head: String,
    /// The most probable refusing class (`blur`, `underexposed`, ...): the reason given when
    /// the decision says yes.
    pub reason: String,
}

impl Prediction {
    /// Converts a batch's raw outputs (one host read per head). `specs` are the network's
    /// heads, in output order.
    pub fn from_output(out: &RetinaOutput, specs: &[HeadSpec]) -> Vec<Prediction> {
        let n = out.heads.first().map(|t| t.dims()[0]).unwrap_or(0);
        let mut preds = vec![Prediction::default(); n];
        for (raw, spec) in out.heads.iter().zip(specs) {
            let vals: Vec<f32> = raw
                .clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32 host data");
            let w = spec.kind.output_width();
            for (i, p) in preds.iter_mut().enumerate() {
                p.answer(spec, vals[i * w..(i + 1) * w].to_vec());
            }
        }
        preds
    }

    /// Sets the answer of head `spec` from its raw output for this image (logits of a
    /// classification head, the value of a regression), at the spec's temperature. Calibration
    /// calls it again with other temperatures: the same arithmetic gives the same numbers.
    pub fn answer(&mut self, spec: &HeadSpec, raw: Vec<f32>) {
        let row = probabilities(&raw, spec.kind, spec.temperature.unwrap_or(1.0));
        let answer = match spec.kind {
            HeadKind::Multiclass(_) => HeadAnswer::Multiclass {
                class: argmax(&row),
                probabilities: row.clone(),
            },
            HeadKind::Binary => HeadAnswer::Binary {
                probability: row[0],
            },
            HeadKind::Regression => HeadAnswer::Regression {
                value: spec.value(row[0]),
            },
        };
        if let Some(d) = spec.decision_rule() {
            self.decisions.insert(d.name.clone(), d.probability(&row));
            if let (true, crate::DecisionRule::FromClass(k)) = (spec.refuses(), d.rule) {
                let names = spec.class_names();
                self.gate = Some(Gate {
                    decision: d.name.clone(),
                    head: spec.name.clone(),
                    reason: names[k + argmax(&row[k..])].clone(),
                });
            }
        }
        self.heads.insert(spec.name.clone(), answer);
        self.raw.insert(spec.name.clone(), raw);
    }

    /// P(yes) of a decision: `referable`, or a binary head's name.
    pub fn decision_probability(&self, decision: &str) -> Option<f32> {
        self.decisions.get(decision).copied()
    }

    /// The score a decision is ranked by: its probability, except that the refusing
    /// decision scores 1 for an image the check refused before the network.
    pub fn decision_score(&self, decision: &str) -> Option<f32> {
        match &self.gate {
            Some(g) if g.decision == decision && self.check.is_some() => Some(1.0),
            _ => self.decision_probability(decision),
        }
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

    /// Why the image gets no clinical answer at `point`, if it gets none: the check refused
    /// it, or the refusing decision's probability reaches its threshold.
    pub fn refusal(&self, point: &OperatingPoint) -> Option<Refusal> {
        if let Some(c) = &self.check {
            return Some(c.clone());
        }
        let g = self.gate.as_ref()?;
        let p = self.decision_probability(&g.decision)?;
        let t = point.threshold(&g.decision);
        (p >= t).then(|| Refusal {
            reason: g.reason.clone(),
            detail: format!("P({}) = {p:.3} >= threshold {t:.3}", g.decision),
            by: g.head.clone(),
        })
    }

    /// Whether the image is answered at `point` (see [`Prediction::refusal`]).
    pub fn gradable(&self, point: &OperatingPoint) -> bool {
        self.refusal(point).is_none()
    }

    /// The yes/no answer of a decision at an operating point (threshold 0.5 if the point has
    /// none for it); `None` for every decision but the refusing one when the image is refused.
    pub fn decide(&self, decision: &str, point: &OperatingPoint) -> Option<bool> {
        let is_gate = self.gate.as_ref().is_some_and(|g| g.decision == decision);
        if is_gate && self.check.is_some() {
            return Some(true);
        }
        if !is_gate && self.refusal(point).is_some() {
            return None;
        }
        self.decision_probability(decision)
            .map(|p| p >= point.threshold(decision))
    }

    /// The gradability answer as a JSON object: `gradable`, and when refused the `reason`,
    /// `detail` and what refused (`by`); with a refusing head also its probabilities, P(yes)
    /// and threshold.
    pub fn quality_json(&self, point: &OperatingPoint) -> Value {
        let refusal = self.refusal(point);
        let mut v = json!({
            "gradable": refusal.is_none(),
            "reason": refusal.as_ref().map(|r| r.reason.as_str()),
            "detail": refusal.as_ref().map(|r| r.detail.as_str()),
            "by": refusal.as_ref().map(|r| r.by.as_str()),
        });
        if let Some(g) = &self.gate {
            v[format!("{}_probability", g.decision)] =
                json!(self.decision_probability(&g.decision));
            v[format!("{}_threshold", g.decision)] = json!(point.threshold(&g.decision));
            if let Some(HeadAnswer::Multiclass { probabilities, .. }) = self.heads.get(&g.head) {
                v["probabilities"] = json!(probabilities);
            }
        }
        v
    }

    /// The answer of one head as a JSON object: a multiclass head's class (under its
    /// `answer_key`), class name and probabilities, plus its decision (`referable`,
    /// `referable_probability`, `referable_threshold`); a binary head's probability, yes/no
    /// and threshold; a regression's value.
    pub fn head_json(&self, spec: &HeadSpec, point: &OperatingPoint) -> Option<Value> {
        if spec.refuses() {
            return self
                .heads
                .contains_key(&spec.name)
                .then(|| self.quality_json(point));
        }
        let refused = self.refusal(point).is_some();
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
        // A refused image gets no clinical answer; the probabilities stay for audit.
        if refused {
            v[key] = Value::Null;
            if let Some(d) = spec.decision_rule().filter(|d| d.name != spec.name) {
                v[d.name.as_str()] = Value::Null;
            }
            if v.get("name").is_some() {
                v["name"] = Value::Null;
            }
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
        let refusal = self.refusal(point);
        if spec.refuses() {
            let (p, t) = self
                .gate
                .as_ref()
                .map(|g| {
                    (
                        self.decision_probability(&g.decision).unwrap_or(f32::NAN),
                        point.threshold(&g.decision),
                    )
                })
                .unwrap_or((f32::NAN, f32::NAN));
            lines.push(match &refusal {
                Some(r) if r.by == "check" => {
                    format!("{:<14} UNGRADABLE: {} ({})", spec.name, r.reason, r.detail)
                }
                Some(r) => format!(
                    "{:<14} UNGRADABLE: {}   p={p:.2} (threshold {t:.2})",
                    spec.name, r.reason
                ),
                None => format!(
                    "{:<14} gradable   p(ungradable)={p:.2} (threshold {t:.2})",
                    spec.name
                ),
            });
            return lines;
        }
        if let Some(r) = &refusal {
            lines.push(format!("{:<14} -   (not graded: {})", spec.name, r.reason));
            return lines;
        }
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

/// A head's answer values from its raw output: softmax of `raw / temperature` (multiclass),
/// the sigmoid of it (binary), or `raw` itself (regression). Computed on the host, in one place,
/// so every path that turns outputs into probabilities gives the same numbers to the bit.
pub fn probabilities(raw: &[f32], kind: HeadKind, temperature: f32) -> Vec<f32> {
    match kind {
        HeadKind::Multiclass(_) => {
            let z: Vec<f32> = raw.iter().map(|v| v / temperature).collect();
            let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.iter().map(|v| v / sum).collect()
        }
        HeadKind::Binary => vec![1.0 / (1.0 + (-raw[0] / temperature).exp())],
        HeadKind::Regression => raw.to_vec(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::{HeadSpec, QUALITY, UNGRADABLE};
    use burn::prelude::*;

    /// Predictions of the default heads for one image from raw head outputs.
    fn predict(diagnosis: [f32; 5], fluid: f32, quality: [f32; 7]) -> (Prediction, Vec<HeadSpec>) {
        let specs = HeadSpec::default_heads();
        let device = Device::flex();
        let t =
            |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &device);
        let out = RetinaOutput {
            heads: vec![t(&diagnosis), t(&[fluid]), t(&[0.3]), t(&quality)],
            embeddings: Vec::new(),
            names: specs.iter().map(|s| s.name.clone()).collect(),
        };
        (Prediction::from_output(&out, &specs).remove(0), specs)
    }

    fn point(ungradable: f32) -> OperatingPoint {
        OperatingPoint {
            thresholds: [
                ("referable".into(), 0.5),
                ("fluid".into(), 0.5),
                (UNGRADABLE.into(), ungradable),
            ]
            .into_iter()
            .collect(),
            method: "test".into(),
        }
    }

    #[test]
    fn a_refused_image_gets_no_clinical_answer_at_that_point_only() {
        // Referable (grade 4 logit high), fluid present, quality: blur most likely among the
        // refusing classes, P(ungradable) = 1 - e^2 / (e^2 + e^1.2 + 5) = 0.5296.
        let (p, specs) = predict(
            [0.0, 0.0, 0.0, 0.0, 5.0],
            3.0,
            [2.0, 1.2, 0.0, 0.0, 0.0, 0.0, 0.0],
        );
        let pu = p.decision_probability(UNGRADABLE).unwrap();
        assert!((pu - 0.5296).abs() < 1e-3, "{pu}");
        let gate = p.gate.clone().unwrap();
        assert_eq!(
            (gate.head.as_str(), gate.reason.as_str()),
            (QUALITY, "blur")
        );

        // Threshold above P(ungradable): answered.
        let lenient = point(0.9);
        assert!(p.gradable(&lenient));
        assert_eq!(p.decide("referable", &lenient), Some(true));
        assert_eq!(p.decide("fluid", &lenient), Some(true));
        assert_eq!(p.decide(UNGRADABLE, &lenient), Some(false));

        // Threshold below it: refused, every clinical decision withheld, the gate's own given.
        let strict = point(0.5);
        let r = p.refusal(&strict).unwrap();
        assert_eq!((r.reason.as_str(), r.by.as_str()), ("blur", QUALITY));
        assert_eq!(p.decide("referable", &strict), None);
        assert_eq!(p.decide("fluid", &strict), None);
        assert_eq!(p.decide(UNGRADABLE, &strict), Some(true));
        let d = p.head_json(&specs[0], &strict).unwrap();
        assert!(
            d["grade"].is_null() && d["referable"].is_null() && d["name"].is_null(),
            "{d}"
        );
        assert!(
            d["referable_probability"].as_f64().unwrap() > 0.9,
            "probabilities stay: {d}"
        );
        let f = p.head_json(&specs[1], &strict).unwrap();
        assert!(f["present"].is_null() && f.get("fluid").is_none(), "{f}");
        let q = p.head_json(&specs[3], &strict).unwrap();
        assert_eq!(q["gradable"], false);
        assert_eq!(q["reason"], "blur");
        assert_eq!(q["ungradable_threshold"], 0.5);
        let q = p.head_json(&specs[3], &lenient).unwrap();
        assert_eq!(q["gradable"], true);
        assert!(q["reason"].is_null());
    }

    #[test]
    fn the_check_refuses_whatever_the_quality_head_says() {
        let (mut p, _) = predict(
            [5.0, 0.0, 0.0, 0.0, 0.0],
            -3.0,
            [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        );
        let lenient = point(0.9);
        assert!(p.gradable(&lenient));
        assert_eq!(
            p.decision_score(UNGRADABLE),
            p.decision_probability(UNGRADABLE)
        );
        p.check = Some(Refusal {
            reason: crate::quality::NOT_FUNDUS.into(),
            detail: "flat".into(),
            by: "check".into(),
        });
        assert_eq!(p.refusal(&lenient).unwrap().by, "check");
        assert_eq!(p.decide("referable", &lenient), None);
        assert_eq!(p.decide(UNGRADABLE, &lenient), Some(true));
        assert_eq!(p.decision_score(UNGRADABLE), Some(1.0));
    }

    #[test]
    fn temperature_divides_the_logits() {
        let mut spec = HeadSpec::new("fluid".into(), HeadKind::Binary);
        let device = Device::flex();
        let out = |specs: &[HeadSpec]| {
            let o = RetinaOutput {
                heads: vec![Tensor::<2>::from_data(
                    TensorData::new(vec![2.0f32], [1, 1]),
                    &device,
                )],
                embeddings: Vec::new(),
                names: vec!["fluid".into()],
            };
            Prediction::from_output(&o, specs)[0].decisions["fluid"]
        };
        let plain = out(std::slice::from_ref(&spec));
        spec.temperature = Some(2.0);
        let tempered = out(std::slice::from_ref(&spec));
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((plain - sigmoid(2.0)).abs() < 1e-6);
        assert!((tempered - sigmoid(1.0)).abs() < 1e-6, "{tempered}");
    }
}
