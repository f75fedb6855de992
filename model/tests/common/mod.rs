//! Helpers shared by retina-model's integration tests.

/// Deterministic values in [-1, 1) from a 64-bit LCG, independent of any backend's RNG, so a
/// test's inputs and weights are the same on every backend and every run.
pub fn lcg_values(n: usize, seed: u64) -> Vec<f32> {
    let step = |s: u64| {
        s.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    };
    let mut s = step(seed);
    (0..n)
        .map(|_| {
            s = step(s);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}
