//! Which epoch the run exports: the best by one validation metric.

use crate::scoring::minimised;

/// Whether an epoch scoring `current` on `metric` beats the best so far (`best`, of
/// `best_epoch`; 0 when none). An epoch without the metric is exported only when nothing has
/// been, so a run always has a model.
pub(super) fn improves(
    metric: &str,
    current: Option<f64>,
    best: Option<f64>,
    best_epoch: usize,
) -> bool {
    match (current, best) {
        (Some(c), Some(b)) => {
            if minimised(metric) {
                c < b
            } else {
                c > b
            }
        }
        (Some(_), None) => true,
        (None, _) => best_epoch == 0,
    }
}
