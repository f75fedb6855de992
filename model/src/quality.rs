//! Gradability: what the network must not be asked to grade.
//!
//! Two layers refuse an image. A cheap check on the network's view runs first and catches what
//! is no colour fundus photograph at all (no bright disc, flat or noise-like content, no red
//! cast); a trained `quality` head then catches photographs too degraded to grade (blur, under-
//! or over-exposure, a clipped field, occlusion). An image refused by either gets no clinical
//! answer: [`crate::Prediction::decide`] returns `None` for every other decision.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Name of the refusal reason the check gives, and of the quality head's class for it.
pub const NOT_FUNDUS: &str = "not_fundus";

/// Thresholds of the check that runs before the network. Part of the model config, so the
/// check a model was evaluated with is the one it serves with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradabilityCheck {
    /// Run the check at all.
    pub enabled: bool,
    /// Lowest standard deviation of luminance inside the disc, in grey levels (0-255): below
    /// it the view is flat (a blank, white or uniformly coloured frame).
    pub min_contrast: f32,
    /// Lowest correlation of horizontally neighbouring pixels' luminance inside the disc. Any
    /// photograph of a surface is smooth at the pixel scale (fundus views measure above 0.9);
    /// noise is not (about 0.25 after resizing).
    pub min_neighbour_correlation: f32,
    /// Lowest excess of mean red over mean blue inside the disc, in grey levels: the choroid
    /// makes every colour fundus photograph red-orange; grey-scale and blue-dominant images
    /// are something else.
    pub min_red_excess: f32,
}

impl Default for GradabilityCheck {
    fn default() -> Self {
        GradabilityCheck {
            enabled: true,
            min_contrast: 3.0,
            min_neighbour_correlation: 0.6,
            min_red_excess: 4.0,
        }
    }
}

/// Why an image was refused, and by what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    /// The reason's name: `not_fundus` from the check, or the quality head's most probable
    /// ungradable class (`blur`, `underexposed`, ...).
    pub reason: String,
    /// What was measured, for a person.
    pub detail: String,
    /// `check` (before the network) or the refusing head's name.
    pub by: String,
}

/// Statistics of a view inside its inscribed circle (where a centred fundus disc lies).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewStats {
    /// Mean of R, G, B.
    pub mean: [f32; 3],
    /// Standard deviation of luminance.
    pub contrast: f32,
    /// Correlation of horizontally neighbouring luminances.
    pub neighbour_correlation: f32,
}

impl ViewStats {
    /// Measures `view` inside 90% of its inscribed circle (the rim is often clipped or dark).
    pub fn of(view: &RgbImage) -> ViewStats {
        let (w, h) = view.dimensions();
        let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
        let r = 0.45 * w.min(h) as f32;
        let r2 = r * r;
        let luma =
            |p: &image::Rgb<u8>| 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
        let (mut sum, mut n) = ([0f64; 3], 0f64);
        let (mut sy, mut syy) = (0f64, 0f64);
        // Pairs (a, b) of horizontal neighbours, both inside.
        let (mut pa, mut pb, mut paa, mut pbb, mut pab, mut np) =
            (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
        for y in 0..h {
            let dy = y as f32 + 0.5 - cy;
            let mut prev: Option<f32> = None;
            for x in 0..w {
                let dx = x as f32 + 0.5 - cx;
                if dx * dx + dy * dy > r2 {
                    prev = None;
                    continue;
                }
                let p = view.get_pixel(x, y);
                for c in 0..3 {
                    sum[c] += p[c] as f64;
                }
                let l = luma(p);
                sy += l as f64;
                syy += (l * l) as f64;
                n += 1.0;
                if let Some(a) = prev {
                    let (a, b) = (a as f64, l as f64);
                    pa += a;
                    pb += b;
                    paa += a * a;
                    pbb += b * b;
                    pab += a * b;
                    np += 1.0;
                }
                prev = Some(l);
            }
        }
        if n == 0.0 {
            return ViewStats {
                mean: [0.0; 3],
                contrast: 0.0,
                neighbour_correlation: 0.0,
            };
        }
        let var = (syy / n - (sy / n).powi(2)).max(0.0);
        let corr = if np > 1.0 {
            let cov = pab / np - (pa / np) * (pb / np);
            let va = paa / np - (pa / np).powi(2);
            let vb = pbb / np - (pb / np).powi(2);
            if va > 1e-9 && vb > 1e-9 {
                cov / (va * vb).sqrt()
            } else {
                0.0
            }
        } else {
            0.0
        };
        ViewStats {
            mean: [
                (sum[0] / n) as f32,
                (sum[1] / n) as f32,
                (sum[2] / n) as f32,
            ],
            contrast: var.sqrt() as f32,
            neighbour_correlation: corr as f32,
        }
    }
}

impl GradabilityCheck {
    /// The check on a view (the disc-cropped, resized image the network sees); `disc_found`
    /// says whether preprocessing found a bright disc in the photograph. `None` passes.
    pub fn check(&self, view: &RgbImage, disc_found: bool) -> Option<Refusal> {
        if !self.enabled {
            return None;
        }
        let refuse = |detail: String| {
            Some(Refusal {
                reason: NOT_FUNDUS.into(),
                detail,
                by: "check".into(),
            })
        };
        if !disc_found {
            return refuse("no bright fundus disc found (a dark or blank frame)".into());
        }
        let s = ViewStats::of(view);
        if s.contrast < self.min_contrast {
            return refuse(format!(
                "flat content: luminance varies by {:.1} grey levels inside the disc (fundus \
                 photographs vary by more than {})",
                s.contrast, self.min_contrast
            ));
        }
        if s.neighbour_correlation < self.min_neighbour_correlation {
            return refuse(format!(
                "noise-like content: neighbouring pixels correlate at {:.2} (photographs above {})",
                s.neighbour_correlation, self.min_neighbour_correlation
            ));
        }
        let excess = s.mean[0] - s.mean[2];
        if excess < self.min_red_excess {
            return refuse(format!(
                "not a colour fundus photograph: mean red {:.0} vs blue {:.0} inside the disc \
                 (the fundus is red-orange)",
                s.mean[0], s.mean[2]
            ));
        }
        None
    }

    /// Checks the thresholds are usable.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |v: f32| v.is_finite();
        let usable = ok(self.min_contrast)
            && ok(self.min_red_excess)
            && (-1.0..=1.0).contains(&self.min_neighbour_correlation);
        if !usable {
            return Err(format!(
                "gradability check thresholds must be finite, with the neighbour correlation in \
                 -1..1 (got {self:?})"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disc(mut f: impl FnMut(f32, f32) -> [u8; 3]) -> RgbImage {
        RgbImage::from_fn(128, 128, |x, y| {
            let (dx, dy) = (x as f32 - 64.0, y as f32 - 64.0);
            if dx * dx + dy * dy > 62.0 * 62.0 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb(f(x as f32, y as f32))
            }
        })
    }

    /// A smooth red-orange disc with a few dark "vessels": passes.
    fn fundus_like() -> RgbImage {
        disc(|x, y| {
            let vessel = ((x * 0.11).sin() * (y * 0.07).cos() * 40.0) as i32;
            let r = (170 + vessel).clamp(0, 255) as u8;
            [r, (80 + vessel / 2).clamp(0, 255) as u8, 30]
        })
    }

    #[test]
    fn a_fundus_like_view_passes_and_each_rule_refuses_its_case() {
        let c = GradabilityCheck::default();
        assert_eq!(c.check(&fundus_like(), true), None);
        let no_disc = c.check(&fundus_like(), false).unwrap();
        assert!(
            no_disc.detail.contains("no bright fundus disc"),
            "{no_disc:?}"
        );
        let flat = c.check(&disc(|_, _| [200, 90, 40]), true).unwrap();
        assert!(flat.detail.contains("flat"), "{flat:?}");
        // Uniform noise, red-dominant so only the structure rule can refuse it.
        let mut state = 12345u32;
        let noise = disc(|_, _| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = (state >> 24) as u8;
            [v, v / 2, v / 4]
        });
        let n = c.check(&noise, true).unwrap();
        assert!(n.detail.contains("noise"), "{n:?}");
        // The same structure in grey: refused for colour alone.
        let grey = disc(|x, y| {
            let v = (128.0 + (x * 0.11).sin() * (y * 0.07).cos() * 40.0) as u8;
            [v, v, v]
        });
        let g = c.check(&grey, true).unwrap();
        assert!(g.detail.contains("colour"), "{g:?}");
        assert!(
            [no_disc, flat, n, g]
                .iter()
                .all(|r| r.reason == NOT_FUNDUS && r.by == "check")
        );
        let off = GradabilityCheck {
            enabled: false,
            ..c
        };
        assert_eq!(off.check(&grey, false), None);
    }

    #[test]
    fn statistics_match_hand_computed_values() {
        // Left half luminance 100, right half 200 (grey): contrast 50, neighbours correlate
        // almost perfectly (one step per row).
        let img = RgbImage::from_fn(64, 64, |x, _| {
            let v = if x < 32 { 100 } else { 200 };
            image::Rgb([v, v, v])
        });
        let s = ViewStats::of(&img);
        assert!((s.contrast - 50.0).abs() < 0.5, "{s:?}");
        assert!(s.neighbour_correlation > 0.9, "{s:?}");
        assert!((s.mean[0] - 150.0).abs() < 1.0, "{s:?}");
    }
}
