//! Screening metrics: ROC AUC (ties counted half), quadratic weighted kappa, confusion
//! matrices, sensitivity / specificity at a threshold, regression errors, bootstrap intervals.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Area under the ROC curve: the probability that a random positive scores above a random
/// negative, ties counting one half (the Mann-Whitney U statistic). `None` without both classes.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|p| **p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Mid-ranks for tied scores.
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        for k in &idx[i..=j] {
            if positive[*k] {
                rank_sum_pos += mid;
            }
        }
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// ROC curve points `(false positive rate, true positive rate, threshold)`, from the highest
/// threshold down.
pub fn roc_curve(scores: &[f32], positive: &[bool]) -> Vec<(f64, f64, f32)> {
    let n_pos = positive.iter().filter(|p| **p).count().max(1) as f64;
    let n_neg = (positive.len() - positive.iter().filter(|p| **p).count()).max(1) as f64;
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut pts = vec![(0.0, 0.0, f32::INFINITY)];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let t = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == t {
            if positive[idx[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        pts.push((fp / n_neg, tp / n_pos, t));
    }
    pts
}

/// Counts at a threshold (score >= threshold means "positive").
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BinaryCounts {
    /// True positives.
    pub tp: usize,
    /// False positives.
    pub fp: usize,
    /// True negatives.
    pub tn: usize,
    /// False negatives.
    pub fn_: usize,
}

impl BinaryCounts {
    /// Tallies predictions at `threshold`.
    pub fn at(scores: &[f32], positive: &[bool], threshold: f32) -> BinaryCounts {
        let mut c = BinaryCounts::default();
        for (s, p) in scores.iter().zip(positive) {
            match (*s >= threshold, *p) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, false) => c.tn += 1,
                (false, true) => c.fn_ += 1,
            }
        }
        c
    }

    fn ratio(a: usize, b: usize) -> Option<f64> {
        (a + b > 0).then(|| a as f64 / (a + b) as f64)
    }

    /// TP / (TP + FN).
    pub fn sensitivity(&self) -> Option<f64> {
        Self::ratio(self.tp, self.fn_)
    }
    /// TN / (TN + FP).
    pub fn specificity(&self) -> Option<f64> {
        Self::ratio(self.tn, self.fp)
    }
    /// Positive predictive value, TP / (TP + FP).
    pub fn ppv(&self) -> Option<f64> {
        Self::ratio(self.tp, self.fp)
    }
    /// Negative predictive value, TN / (TN + FN).
    pub fn npv(&self) -> Option<f64> {
        Self::ratio(self.tn, self.fn_)
    }
    /// F1 score.
    pub fn f1(&self) -> Option<f64> {
        let d = 2 * self.tp + self.fp + self.fn_;
        (d > 0).then(|| 2.0 * self.tp as f64 / d as f64)
    }
    /// Share of positives.
    pub fn prevalence(&self) -> Option<f64> {
        Self::ratio(self.tp + self.fn_, self.tn + self.fp)
    }
}

/// `k x k` confusion matrix, rows = truth, columns = prediction.
pub fn confusion(truth: &[usize], pred: &[usize], k: usize) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; k]; k];
    for (t, p) in truth.iter().zip(pred) {
        if *t < k && *p < k {
            m[*t][*p] += 1;
        }
    }
    m
}

/// Cohen's kappa with quadratic weights, the standard agreement measure for ordinal DR grades.
pub fn quadratic_kappa(truth: &[usize], pred: &[usize], k: usize) -> Option<f64> {
    let n = truth.len();
    if n == 0 || k < 2 {
        return None;
    }
    let o = confusion(truth, pred, k);
    let rows: Vec<f64> = (0..k).map(|i| o[i].iter().sum::<usize>() as f64).collect();
    let cols: Vec<f64> = (0..k)
        .map(|j| (0..k).map(|i| o[i][j]).sum::<usize>() as f64)
        .collect();
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..k {
        for j in 0..k {
            let w = ((i as f64 - j as f64) / (k as f64 - 1.0)).powi(2);
            num += w * o[i][j] as f64;
            den += w * rows[i] * cols[j] / n as f64;
        }
    }
    if den == 0.0 {
        // Both raters constant and identical: perfect agreement; otherwise undefined.
        return (num == 0.0).then_some(1.0);
    }
    Some(1.0 - num / den)
}

/// Mean absolute error.
pub fn mae(pred: &[f32], truth: &[f32]) -> Option<f64> {
    (!pred.is_empty()).then(|| {
        pred.iter()
            .zip(truth)
            .map(|(p, t)| (p - t).abs() as f64)
            .sum::<f64>()
            / pred.len() as f64
    })
}

/// Root mean squared error.
pub fn rmse(pred: &[f32], truth: &[f32]) -> Option<f64> {
    (!pred.is_empty()).then(|| {
        (pred
            .iter()
            .zip(truth)
            .map(|(p, t)| ((p - t) as f64).powi(2))
            .sum::<f64>()
            / pred.len() as f64)
            .sqrt()
    })
}

/// Pearson correlation; `None` when either side is constant.
pub fn pearson(a: &[f32], b: &[f32]) -> Option<f64> {
    let n = a.len() as f64;
    if a.len() < 2 {
        return None;
    }
    let ma = a.iter().map(|x| *x as f64).sum::<f64>() / n;
    let mb = b.iter().map(|x| *x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (*x as f64 - ma, *y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    (saa > 0.0 && sbb > 0.0).then(|| sab / (saa * sbb).sqrt())
}

/// Percentile bootstrap interval (resampling cases) of a statistic; `level` = 0.95 for 95%.
pub fn bootstrap_interval(
    n: usize,
    resamples: usize,
    level: f64,
    seed: u64,
    stat: impl Fn(&[usize]) -> Option<f64>,
) -> Option<(f64, f64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut values: Vec<f64> = (0..resamples)
        .filter_map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            stat(&idx)
        })
        .collect();
    if values.len() < resamples / 2 {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let q = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    Some((q((1.0 - level) / 2.0), q(1.0 - (1.0 - level) / 2.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_by_hand_with_ties() {
        // Positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4), (0.8>0.1), (0.4=0.4 -> 1/2),
        // (0.4>0.1): 3.5 / 4.
        let auc = roc_auc(&[0.8, 0.4, 0.4, 0.1], &[true, true, false, false]).unwrap();
        assert!((auc - 0.875).abs() < 1e-12);
        assert_eq!(roc_auc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(roc_auc(&[0.1, 0.9], &[true, true]), None);
    }

    #[test]
    fn kappa_by_hand() {
        assert_eq!(
            quadratic_kappa(&[0, 1, 2, 3, 4], &[0, 1, 2, 3, 4], 5),
            Some(1.0)
        );
        // 3 classes, truth [0,1,2], pred [0,2,2]: O off-diagonal (1,2)=1 with w=1/4;
        // E: rows 1,1,1; cols 1,0,2 -> sum w*E = (1/3)[w01*0+w02*2 + w10*1+w12*2 + w20*1+w21*0]
        //  = (1/3)[2*1 + 0.25 + 2*0.25 + 1] = 3.75/3 = 1.25; kappa = 1 - 0.25/1.25 = 0.8.
        let k = quadratic_kappa(&[0, 1, 2], &[0, 2, 2], 3).unwrap();
        assert!((k - 0.8).abs() < 1e-12, "{k}");
        // Systematic disagreement is negative.
        assert!(quadratic_kappa(&[0, 0, 4, 4], &[4, 4, 0, 0], 5).unwrap() < 0.0);
    }

    #[test]
    fn threshold_counts_and_rates() {
        let c = BinaryCounts::at(&[0.9, 0.6, 0.4, 0.2], &[true, false, true, false], 0.5);
        assert_eq!((c.tp, c.fp, c.tn, c.fn_), (1, 1, 1, 1));
        assert_eq!(c.sensitivity(), Some(0.5));
        assert_eq!(c.f1(), Some(0.5));
    }

    #[test]
    fn bootstrap_interval_contains_the_estimate() {
        let scores: Vec<f32> = (0..200).map(|i| ((i * 37) % 100) as f32 / 100.0).collect();
        let pos: Vec<bool> = scores
            .iter()
            .enumerate()
            .map(|(i, s)| (*s > 0.4) ^ (i % 7 == 0))
            .collect();
        let est = roc_auc(&scores, &pos).unwrap();
        let (lo, hi) = bootstrap_interval(200, 300, 0.95, 1, |idx| {
            let s: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
            let p: Vec<bool> = idx.iter().map(|&i| pos[i]).collect();
            roc_auc(&s, &p)
        })
        .unwrap();
        assert!(lo <= est && est <= hi && lo < hi, "{lo} {est} {hi}");
    }

    /// A known case: the mean of 400 fair coin flips (0/1, half each). Its standard error is
    /// 0.5/sqrt(400) = 0.025, so a 95% percentile interval is about ±1.96·0.025 wide: 0.098.
    #[test]
    fn bootstrap_interval_has_the_width_theory_gives() {
        let flips: Vec<f64> = (0..400).map(|i| (i % 2) as f64).collect();
        let mean =
            |idx: &[usize]| Some(idx.iter().map(|&i| flips[i]).sum::<f64>() / idx.len() as f64);
        let (lo, hi) = bootstrap_interval(400, 2000, 0.95, 3, mean).unwrap();
        assert!(
            (hi - lo - 0.098).abs() < 0.012,
            "width {} ({lo}, {hi})",
            hi - lo
        );
        assert!(
            ((lo + hi) / 2.0 - 0.5).abs() < 0.01,
            "centre {}",
            (lo + hi) / 2.0
        );
        // A 50% interval is about 0.674/1.96 as wide.
        let (l50, h50) = bootstrap_interval(400, 2000, 0.5, 3, mean).unwrap();
        assert!(
            ((h50 - l50) / (hi - lo) - 0.344).abs() < 0.06,
            "{l50} {h50}"
        );
    }

    #[test]
    fn regression_errors() {
        assert_eq!(mae(&[1.0, 2.0], &[0.0, 4.0]), Some(1.5));
        assert!((rmse(&[1.0, 2.0], &[0.0, 4.0]).unwrap() - (2.5f64).sqrt()).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1.0, 1.0], &[0.0, 1.0]), None);
    }
}
