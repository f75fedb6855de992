//! Image-quality degradations with known labels: what makes a photograph ungradable, and
//! images that are no fundus photograph at all.
//!
//! `synth --ungradable` renders them into generated data sets; training applies them to views
//! on the fly (`degrade` in the training config), so a model learns its quality head from any
//! labelled data set. Strengths are relative to the image side, so one degradation reads the
//! same on a 3,000 px photograph and on a 128 px view, and they are strong on purpose: a
//! degraded image is labelled ungradable, so a mild one would teach the head to refuse
//! gradable photographs.

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One way an image becomes ungradable. Its [`name`](Degradation::name) is the quality head's
/// class it teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degradation {
    /// Out of focus (or a cataract's haze): detail below a few percent of the disc is gone.
    Blur,
    /// Far too dark: a small pupil or too little flash.
    Underexposed,
    /// Washed out: flash glare or a reflex.
    Overexposed,
    /// Misaligned camera: a large part of the field cut off.
    OffCentre,
    /// Lashes and lid shadows across the field.
    Occluded,
    /// No fundus: noise, a blank or single-coloured frame, a grey-scale picture, shapes.
    NotFundus,
}

impl Degradation {
    /// All of them, in the quality head's class order (after `gradable`).
    pub const ALL: [Degradation; 6] = [
        Degradation::Blur,
        Degradation::Underexposed,
        Degradation::Overexposed,
        Degradation::OffCentre,
        Degradation::Occluded,
        Degradation::NotFundus,
    ];

    /// The quality class it teaches.
    pub fn name(self) -> &'static str {
        match self {
            Degradation::Blur => "blur",
            Degradation::Underexposed => "underexposed",
            Degradation::Overexposed => "overexposed",
            Degradation::OffCentre => "off_centre",
            Degradation::Occluded => "occluded",
            Degradation::NotFundus => retina_model::quality::NOT_FUNDUS,
        }
    }

    /// The degraded image (same size). `NotFundus` replaces the picture; it keeps only its size
    /// and, for its grey-scale variant, its content.
    pub fn apply(self, img: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
        let (w, h) = img.dimensions();
        let side = w.min(h) as f32;
        match self {
            Degradation::Blur => {
                let sigma = side * rng.random_range(0.015..0.035);
                image::imageops::blur(img, sigma)
            }
            Degradation::Underexposed => {
                let gain = rng.random_range(0.10..0.22);
                map_pixels(img, |v, _| v * gain)
            }
            Degradation::Overexposed => {
                // Haze towards white plus gain: the fundus washes out, the border stays dark.
                let keep = rng.random_range(0.3..0.45);
                let gain = rng.random_range(1.2..1.6);
                // Glare is the flash's colour through the lens: pale, warm.
                const HAZE: [f32; 3] = [235.0, 190.0, 140.0];
                map_pixels(img, |v, c| {
                    if v < 8.0 {
                        v
                    } else {
                        (v * gain) * keep + HAZE[c] * (1.0 - keep)
                    }
                })
            }
            Degradation::OffCentre => {
                // Cut the field along a chord: everything beyond it is black, with a dark
                // penumbra before it, as when the camera is off the pupil's axis.
                let a = rng.random_range(0.0..std::f32::consts::TAU);
                let (ux, uy) = (a.cos(), a.sin());
                let r = side / 2.0;
                let cut = r * rng.random_range(-0.15..0.2);
                let penumbra = r * 0.25;
                let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
                let mut out = img.clone();
                for (x, y, p) in out.enumerate_pixels_mut() {
                    let d = (x as f32 + 0.5 - cx) * ux + (y as f32 + 0.5 - cy) * uy;
                    let f = ((cut - d) / penumbra).clamp(0.0, 1.0);
                    for c in p.0.iter_mut() {
                        *c = (*c as f32 * f) as u8;
                    }
                }
                out
            }
            Degradation::Occluded => occlude(img, rng),
            Degradation::NotFundus => not_fundus(img, rng),
        }
    }
}

fn map_pixels(img: &RgbImage, f: impl Fn(f32, usize) -> f32) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for (c, v) in p.0.iter_mut().enumerate() {
            *v = f(*v as f32, c).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// A lid shadow over one side and a few thick lash strokes, all soft-edged.
fn occlude(img: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = img.dimensions();
    let side = w.min(h) as f32;
    let mut shade = vec![1f32; (w * h) as usize];
    // The lid: a shadow from a random side reaching 35-60% across.
    let a = rng.random_range(0.0..std::f32::consts::TAU);
    let (ux, uy) = (a.cos(), a.sin());
    let reach = side * rng.random_range(0.35..0.6);
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    // Lashes: dark arcs hanging from the lid.
    let lashes: Vec<(f32, f32, f32, f32)> = (0..rng.random_range(4..9))
        .map(|_| {
            (
                rng.random_range(0.0..w as f32),
                rng.random_range(0.0..h as f32),
                side * rng.random_range(0.15..0.4),
                side * rng.random_range(0.012..0.03),
            )
        })
        .collect();
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            // Distance into the field from the shadowed edge.
            let d = side / 2.0 + ((px - cx) * ux + (py - cy) * uy);
            let mut s: f32 = (1.0 - ((reach - d) / (side * 0.1)).clamp(0.0, 1.0) * 0.92).max(0.05);
            for &(lx, ly, len, thick) in &lashes {
                // Each lash runs from its anchor towards the lid's direction.
                let (rx, ry) = (px - lx, py - ly);
                let along = rx * -ux + ry * -uy;
                let across = rx * -uy + ry * ux;
                if (0.0..len).contains(&along) {
                    let bend = across - along * along / (2.0 * side);
                    let t = (bend.abs() / thick).min(1.0);
                    s = s.min(0.08 + 0.92 * t);
                }
            }
            shade[(y * w + x) as usize] = s;
        }
    }
    let mut out = img.clone();
    for (i, p) in out.pixels_mut().enumerate() {
        for c in p.0.iter_mut() {
            *c = (*c as f32 * shade[i]) as u8;
        }
    }
    out
}

/// Something that is not a colour fundus photograph, of the same size.
fn not_fundus(img: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = img.dimensions();
    match rng.random_range(0..5) {
        // Uniform colour noise.
        0 => RgbImage::from_fn(w, h, |_, _| Rgb([rng.random(), rng.random(), rng.random()])),
        // A flat frame of one colour (white, black, anything).
        1 => {
            let c = Rgb([rng.random(), rng.random(), rng.random()]);
            RgbImage::from_pixel(w, h, c)
        }
        // The fundus in grey (red-free photography, or a grey-scale scan).
        2 => map_grey(img),
        // Shapes on a background: a document, a scene.
        3 => {
            let bg = Rgb([rng.random(), rng.random(), rng.random()]);
            let mut out = RgbImage::from_pixel(w, h, bg);
            for _ in 0..rng.random_range(3..12) {
                let c = Rgb([rng.random(), rng.random(), rng.random()]);
                let (x0, y0) = (rng.random_range(0..w), rng.random_range(0..h));
                let (rw, rh) = (
                    rng.random_range(1..w / 2 + 2),
                    rng.random_range(1..h / 2 + 2),
                );
                for y in y0..(y0 + rh).min(h) {
                    for x in x0..(x0 + rw).min(w) {
                        out.put_pixel(x, y, c);
                    }
                }
            }
            out
        }
        // A smooth two-colour gradient.
        _ => {
            let a = [rng.random::<u8>(), rng.random(), rng.random()];
            let b = [rng.random::<u8>(), rng.random(), rng.random()];
            RgbImage::from_fn(w, h, |x, y| {
                let t = (x + y) as f32 / (w + h) as f32;
                Rgb(std::array::from_fn(|c| {
                    (a[c] as f32 * (1.0 - t) + b[c] as f32 * t) as u8
                }))
            })
        }
    }
}

fn map_grey(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let l = (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) as u8;
        *p = Rgb([l, l, l]);
    }
    out
}

/// Draws a degradation, each equally often.
pub fn draw(rng: &mut ChaCha8Rng) -> Degradation {
    Degradation::ALL[rng.random_range(0..Degradation::ALL.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{Layers, render, scene_for};
    use rand::SeedableRng;
    use retina_model::quality::ViewStats;

    fn fundus() -> RgbImage {
        render(&scene_for(3, 0, 128, &[1.0; 5]), Layers::default())
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Mean absolute difference of horizontal neighbours' green values: detail.
    fn detail(img: &RgbImage) -> f64 {
        let (w, h) = img.dimensions();
        let mut sum = 0.0;
        for y in 0..h {
            for x in 1..w {
                sum += (img.get_pixel(x, y)[1] as f64 - img.get_pixel(x - 1, y)[1] as f64).abs();
            }
        }
        sum / ((w - 1) * h) as f64
    }

    fn mean(img: &RgbImage) -> f64 {
        img.pixels()
            .map(|p| p.0.iter().map(|&v| v as f64).sum::<f64>() / 3.0)
            .sum::<f64>()
            / (img.width() * img.height()) as f64
    }

    fn black_share(img: &RgbImage) -> f64 {
        img.pixels().filter(|p| p.0.iter().all(|&v| v < 10)).count() as f64
            / (img.width() * img.height()) as f64
    }

    #[test]
    fn each_degradation_does_what_its_name_says() {
        let img = fundus();
        for seed in 0..5 {
            let r = &mut rng(seed);
            let blurred = Degradation::Blur.apply(&img, r);
            assert!(detail(&blurred) < 0.6 * detail(&img), "blur keeps detail");
            let dark = Degradation::Underexposed.apply(&img, r);
            assert!(mean(&dark) < 0.3 * mean(&img));
            let bright = Degradation::Overexposed.apply(&img, r);
            let (s0, s1) = (ViewStats::of(&img), ViewStats::of(&bright));
            assert!(s1.mean[1] > s0.mean[1] + 40.0, "{s0:?} {s1:?}");
            let luma = |s: &ViewStats| 0.299 * s.mean[0] + 0.587 * s.mean[1] + 0.114 * s.mean[2];
            assert!(
                s1.contrast / luma(&s1) < 0.8 * s0.contrast / luma(&s0),
                "washed out: {s0:?} {s1:?}"
            );
            let cut = Degradation::OffCentre.apply(&img, r);
            assert!(
                black_share(&cut) > black_share(&img) + 0.2,
                "a large part of the field cut"
            );
            let lashes = Degradation::Occluded.apply(&img, r);
            assert!(mean(&lashes) < 0.85 * mean(&img), "shadowed");
            assert_eq!(lashes.dimensions(), img.dimensions());
        }
    }

    #[test]
    fn not_fundus_images_are_varied_and_the_check_refuses_the_obvious_ones() {
        let img = fundus();
        let check = retina_model::GradabilityCheck::default();
        let (mut refused, mut kinds) = (0, std::collections::BTreeSet::new());
        for seed in 0..40 {
            let other = Degradation::NotFundus.apply(&img, &mut rng(seed));
            assert_eq!(other.dimensions(), img.dimensions());
            kinds.insert(format!("{:?}", ViewStats::of(&other).contrast > 3.0));
            let grey = other.pixels().all(|p| p[0] == p[1] && p[1] == p[2]);
            let flat = ViewStats::of(&other).contrast < 1.0;
            if grey || flat {
                assert!(
                    check.check(&other, true).is_some(),
                    "grey or flat passed the check"
                );
            }
            refused += usize::from(check.check(&other, true).is_some());
        }
        assert_eq!(kinds.len(), 2, "flat and structured kinds both drawn");
        // Noise, flat frames and grey-scale pictures are three of the five kinds.
        assert!(
            refused >= 40 * 2 / 5,
            "{refused} of 40 refused by the check"
        );
    }

    #[test]
    fn draws_cover_every_degradation() {
        let r = &mut rng(9);
        let drawn: std::collections::BTreeSet<&str> = (0..200).map(|_| draw(r).name()).collect();
        assert_eq!(drawn.len(), Degradation::ALL.len());
        assert_eq!(
            Degradation::ALL.map(Degradation::name).to_vec(),
            retina_model::QUALITY_CLASSES[1..].to_vec(),
            "the quality head's classes, in order"
        );
    }
}
