//! The learning-rate schedule: linear warm-up, then cosine decay to a fraction of the peak.
//!
//! Ours rather than `burn::lr_scheduler`'s. Burn's `LinearLrSchedulerConfig` followed by
//! `CosineAnnealingLrSchedulerConfig` (in a `SequentialLrSchedulerConfig`) is the same curve on
//! paper, but does not express this one exactly:
//! - both refuse a peak above 1 (`initial_lr` must be in (0, 1]), which SGD users and the
//!   non-finite-loss test (a peak of 1e30) need;
//! - burn's schedulers are iterators with state; this schedule is a pure function of the global
//!   step, so a resumed run that was given more epochs stretches the decay over the new total
//!   without replaying or rewriting any scheduler record;
//! - burn's linear ramp computes `final - step_size * remaining` and its cosine `i / n * pi`,
//!   which differ from the closed form below in the last bits, and its linear scheduler needs
//!   `num_iters >= 1` where a one-step warm-up is `peak` at once;
//! - past `num_iters` burn's cosine keeps following `cos` back up; ours stays at the floor.

use crate::config::{ScheduleConfig, ScheduleKind};

/// The learning rate of every step of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate, reached at the end of the warm-up.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Steps of the whole run.
    pub total: usize,
    /// Decay after the warm-up: cosine to `final_fraction * peak`, or none (constant).
    pub cosine: bool,
    /// The floor of the cosine decay, as a fraction of the peak.
    pub final_fraction: f64,
}

impl Schedule {
    /// The schedule of a run of `epochs` epochs of `steps_per_epoch` steps peaking at `peak`.
    pub fn new(
        peak: f64,
        config: &ScheduleConfig,
        steps_per_epoch: usize,
        epochs: usize,
    ) -> Schedule {
        Schedule {
            peak,
            warmup: (config.warmup_epochs * steps_per_epoch as f64).round() as usize,
            total: steps_per_epoch * epochs,
            cosine: config.kind == ScheduleKind::Cosine,
            final_fraction: config.final_fraction,
        }
    }

    /// Learning rate of the 0-based global `step`.
    pub fn at(&self, step: usize) -> f64 {
        let (peak, warmup) = (self.peak, self.warmup);
        if step < warmup {
            return peak * (step + 1) as f64 / warmup as f64;
        }
        if !self.cosine {
            return peak;
        }
        let p = (step - warmup) as f64 / (self.total.saturating_sub(warmup)).max(1) as f64;
        let floor = self.final_fraction * peak;
        floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
    }
}

/// Learning rate at `step` of `total`: linear warm-up, then cosine decay to 1% of the peak (the
/// default schedule).
pub fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    Schedule {
        peak,
        warmup,
        total,
        cosine: true,
        final_fraction: 0.01,
    }
    .at(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule before it became configurable, verbatim: the default must match it bit for
    /// bit at every step.
    fn previous(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return peak * (step + 1) as f64 / warmup as f64;
        }
        let p = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        let floor = 0.01 * peak;
        floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs()
    }

    /// A few steps against the closed form `floor + (peak - floor) (1 + cos(pi p)) / 2`.
    #[test]
    fn warm_up_then_cosine_to_one_percent() {
        let s = Schedule::new(2e-3, &ScheduleConfig::default(), 10, 5);
        assert_eq!((s.warmup, s.total), (10, 50));
        assert!(close(s.at(0), 2e-4));
        assert!(close(s.at(4), 1e-3));
        assert!(close(s.at(9), 2e-3));
        assert!(close(s.at(10), 2e-3));
        assert!(close(s.at(30), 2e-5 + (2e-3 - 2e-5) * 0.5));
        for step in [10, 17, 30, 45, 49] {
            let p = (step - 10) as f64 / 40.0;
            let closed = 2e-5 + (2e-3 - 2e-5) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
            assert!(close(s.at(step), closed), "step {step}");
        }
        // Past the end (a resumed run given fewer epochs) it stays at the floor.
        assert!(close(s.at(80), 2e-5));
        for step in 0..60 {
            assert_eq!(s.at(step), previous(2e-3, step, 10, 50), "step {step}");
            assert_eq!(
                learning_rate(3e-3, step, 7, 40),
                previous(3e-3, step, 7, 40)
            );
        }
    }

    #[test]
    fn constant_after_the_warm_up() {
        let constant = |warmup_epochs| ScheduleConfig {
            warmup_epochs,
            kind: ScheduleKind::Constant,
            ..ScheduleConfig::default()
        };
        let s = Schedule::new(0.1, &constant(0.5), 4, 3);
        assert_eq!(s.warmup, 2);
        assert!(close(s.at(0), 0.05));
        for step in 1..20 {
            assert_eq!(s.at(step), 0.1);
        }
        // No warm-up: the peak from the first step.
        assert_eq!(Schedule::new(0.1, &constant(0.0), 4, 3).at(0), 0.1);
    }
}
