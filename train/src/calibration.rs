//! Probability calibration: temperature scaling (Guo et al., 2017) fitted on validation data,
//! and the measures of how well probabilities match frequencies (expected calibration error,
//! Brier score, reliability bins).
//!
//! A temperature divides a head's logits before softmax or sigmoid. It leaves the ranking of a
//! binary head's scores (and so its AUC) unchanged and moves its probabilities towards (T > 1)
//! or away from (T < 1) one half, so an over-confident network's 0.99 can become the 0.85 it
//! deserves.

use retina_model::prediction::probabilities;
use retina_model::{HeadKind, HeadSpec, Prediction};

/// Bins of the expected calibration error and the reliability diagram.
pub const BINS: usize = 10;

/// One reliability bin: mean predicted probability, observed frequency, count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bin {
    /// Mean P(yes) of the bin's samples.
    pub confidence: f64,
    /// Share of them that were yes.
    pub frequency: f64,
    /// How many.
    pub count: usize,
}

/// Equal-width bins of P(yes) over `[0, 1]`; empty bins are left out.
pub fn reliability(scores: &[f32], truth: &[bool], bins: usize) -> Vec<Bin> {
    let mut acc = vec![(0f64, 0usize, 0usize); bins];
    for (&s, &t) in scores.iter().zip(truth) {
        let b = ((s.clamp(0.0, 1.0) as f64 * bins as f64) as usize).min(bins - 1);
        acc[b].0 += s as f64;
        acc[b].1 += usize::from(t);
        acc[b].2 += 1;
    }
    acc.into_iter()
        .filter(|a| a.2 > 0)
        .map(|(sum, pos, n)| Bin {
            confidence: sum / n as f64,
            frequency: pos as f64 / n as f64,
            count: n,
        })
        .collect()
}

/// Expected calibration error of a yes/no decision: the count-weighted mean gap between
/// confidence and frequency over [`BINS`] equal-width bins. `None` without samples.
pub fn ece(scores: &[f32], truth: &[bool]) -> Option<f64> {
    let n = scores.len();
    (n > 0).then(|| {
        reliability(scores, truth, BINS)
            .iter()
            .map(|b| b.count as f64 * (b.confidence - b.frequency).abs())
            .sum::<f64>()
            / n as f64
    })
}

/// Brier score: mean squared difference between P(yes) and the outcome (0 is perfect; always
/// answering 0.5 scores 0.25).
pub fn brier(scores: &[f32], truth: &[bool]) -> Option<f64> {
    let n = scores.len();
    (n > 0).then(|| {
        scores
            .iter()
            .zip(truth)
            .map(|(&s, &t)| (s as f64 - f64::from(u8::from(t))).powi(2))
            .sum::<f64>()
            / n as f64
    })
}

/// The raw logits of a head for one image (before any temperature), as the prediction kept
/// them; `None` for regressions and heads the prediction lacks.
pub fn logits<'a>(p: &'a Prediction, spec: &HeadSpec) -> Option<&'a [f32]> {
    (spec.kind != HeadKind::Regression)
        .then(|| p.raw.get(&spec.name).map(Vec::as_slice))
        .flatten()
}

/// Mean negative log-likelihood of `labels` under logits `z` at temperature `t`.
pub fn nll(z: &[Vec<f32>], labels: &[f32], kind: HeadKind, t: f32) -> f64 {
    let total: f64 = z
        .iter()
        .zip(labels)
        .map(|(row, &y)| {
            let p = probabilities(row, kind, t);
            let q = match kind {
                HeadKind::Binary => {
                    if y > 0.5 {
                        p[0]
                    } else {
                        1.0 - p[0]
                    }
                }
                _ => p[y as usize],
            };
            -(q.max(1e-12) as f64).ln()
        })
        .sum();
    total / z.len().max(1) as f64
}

/// The temperature minimising the NLL of `labels` under `z` (golden-section search on
/// log T in [1/20, 20]: the NLL is convex in 1/T). `None` without samples.
pub fn fit_temperature(z: &[Vec<f32>], labels: &[f32], kind: HeadKind) -> Option<f32> {
    if z.is_empty() {
        return None;
    }
    let f = |log_t: f64| nll(z, labels, kind, log_t.exp() as f32);
    let (mut a, mut b) = ((1.0f64 / 20.0).ln(), 20f64.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - g * (b - a), a + g * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..60 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = f(d);
        }
    }
    Some((((a + b) / 2.0).exp()) as f32)
}

/// `p` as the network answers with the heads `specs` (the same heads, at other
/// temperatures): probabilities, classes and decisions recomputed from the raw outputs, by the
/// arithmetic predictions use, so they equal what a model with those temperatures answers.
pub fn retemper(p: &Prediction, specs: &[HeadSpec]) -> Prediction {
    let mut out = p.clone();
    for spec in specs {
        if let Some(raw) = p.raw.get(&spec.name) {
            out.answer(spec, raw.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn ece_and_brier_by_hand() {
        // Two bins: 0.1 x4 with one yes (gap 0.15), 0.9 x4 with all yes (gap 0.1).
        let s = [0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9];
        let t = [true, false, false, false, true, true, true, true];
        let e = ece(&s, &t).unwrap();
        assert!((e - (4.0 * 0.15 + 4.0 * 0.1) / 8.0).abs() < 1e-6, "{e}");
        let b = brier(&s, &t).unwrap();
        let by_hand = (0.81 + 3.0 * 0.01 + 4.0 * 0.01) / 8.0;
        assert!((b - by_hand).abs() < 1e-6, "{b}");
        assert_eq!(ece(&[], &[]), None);
        let bins = reliability(&s, &t, 10);
        assert_eq!(bins.len(), 2);
        assert_eq!((bins[0].count, bins[0].frequency), (4, 0.25));
    }

    #[test]
    fn fitting_recovers_the_temperature_that_made_the_data() {
        // Labels drawn from softmax(z / 2.5): fitting on the raw z must find about 2.5, and a
        // network already at that temperature needs about 1 more.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (mut z, mut y) = (Vec::new(), Vec::new());
        for _ in 0..4000 {
            let row: Vec<f32> = (0..4).map(|_| rng.random_range(-6.0..6.0)).collect();
            let p = probabilities(&row, HeadKind::Multiclass(4), 2.5);
            let u: f32 = rng.random();
            let mut acc = 0.0;
            let class = p
                .iter()
                .position(|&q| {
                    acc += q;
                    u < acc
                })
                .unwrap_or(3);
            z.push(row);
            y.push(class as f32);
        }
        let t = fit_temperature(&z, &y, HeadKind::Multiclass(4)).unwrap();
        assert!((t - 2.5).abs() < 0.2, "{t}");
        let nll_fit = nll(&z, &y, HeadKind::Multiclass(4), t);
        assert!(nll_fit < nll(&z, &y, HeadKind::Multiclass(4), 1.0));
        assert!(nll_fit <= nll(&z, &y, HeadKind::Multiclass(4), t * 1.1));
        assert!(nll_fit <= nll(&z, &y, HeadKind::Multiclass(4), t / 1.1));

        // Binary, over-confident network (true temperature 3).
        let (mut zb, mut yb) = (Vec::new(), Vec::new());
        for _ in 0..4000 {
            let v: f32 = rng.random_range(-10.0..10.0);
            let p = 1.0 / (1.0 + (-v / 3.0).exp());
            zb.push(vec![v]);
            yb.push(f32::from(u8::from(rng.random::<f32>() < p)));
        }
        let tb = fit_temperature(&zb, &yb, HeadKind::Binary).unwrap();
        assert!((tb - 3.0).abs() < 0.3, "{tb}");
    }

    #[test]
    fn retempering_answers_as_the_tempered_head_does() {
        let spec = HeadSpec::new("fluid".into(), HeadKind::Binary);
        let hot = HeadSpec {
            temperature: Some(2.0),
            ..spec.clone()
        };
        let mut p = Prediction::default();
        p.answer(&spec, vec![2.0]);
        let q = retemper(&p, std::slice::from_ref(&hot));
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert_eq!(q.decisions["fluid"], sigmoid(1.0));
        let mut direct = Prediction::default();
        direct.answer(&hot, vec![2.0]);
        assert_eq!(q, direct, "bit for bit what the tempered head answers");
        assert_eq!(retemper(&q, std::slice::from_ref(&spec)), p);
    }
}
