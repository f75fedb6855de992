//! Rasterising a [`Scene`] into an RGB image.

use super::scene::{Distractor, LesionKind, Pt, Scene, Segment, VesselKind};
use image::{ImageBuffer, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What to draw; everything except the lesions is identical between the two settings.
#[derive(Debug, Clone, Copy)]
pub struct Layers {
    /// Draw lesions (and grade-specific vessel changes: beading, new vessels).
    pub lesions: bool,
}

impl Default for Layers {
    fn default() -> Self {
        Layers { lesions: true }
    }
}

struct Canvas {
    w: usize,
    px: Vec<[f32; 3]>,
}

impl Canvas {
    fn bbox(&self, c: Pt, r: f32) -> (usize, usize, usize, usize) {
        let clamp = |v: f32| v.max(0.0).min(self.w as f32 - 1.0) as usize;
        (
            clamp(c.0 - r),
            clamp(c.0 + r + 1.0),
            clamp(c.1 - r),
            clamp(c.1 + r + 1.0),
        )
    }

    /// Blends `colour` over a disc with an anti-aliased (or soft) edge.
    fn disc(&mut self, c: Pt, r: f32, colour: [f32; 3], alpha: f32, soft: f32) {
        let (x0, x1, y0, y1) = self.bbox(c, r + soft + 1.0);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let d = ((x as f32 + 0.5 - c.0).powi(2) + (y as f32 + 0.5 - c.1).powi(2)).sqrt();
                let cov = ((r - d) / soft.max(1.0) + 0.5).clamp(0.0, 1.0);
                if cov > 0.0 {
                    mix(&mut self.px[y * self.w + x], colour, cov * alpha);
                }
            }
        }
    }

    /// Blends `colour` with a Gaussian opacity profile.
    fn gauss(&mut self, c: Pt, sigma: f32, colour: [f32; 3], alpha: f32) {
        let (x0, x1, y0, y1) = self.bbox(c, 3.0 * sigma);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let d2 = (x as f32 + 0.5 - c.0).powi(2) + (y as f32 + 0.5 - c.1).powi(2);
                let a = alpha * (-d2 / (2.0 * sigma * sigma)).exp();
                mix(&mut self.px[y * self.w + x], colour, a);
            }
        }
    }

    /// Scales brightness with a Gaussian profile (`amount` > 0 darkens, < 0 brightens).
    fn shade(&mut self, c: Pt, sigma: f32, amount: f32) {
        let (x0, x1, y0, y1) = self.bbox(c, 3.0 * sigma);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let d2 = (x as f32 + 0.5 - c.0).powi(2) + (y as f32 + 0.5 - c.1).powi(2);
                let k = 1.0 - amount * (-d2 / (2.0 * sigma * sigma)).exp();
                for v in &mut self.px[y * self.w + x] {
                    *v *= k;
                }
            }
        }
    }
}

fn mix(p: &mut [f32; 3], c: [f32; 3], a: f32) {
    for i in 0..3 {
        p[i] += (c[i] - p[i]) * a;
    }
}

/// A coverage layer for line work: strokes take the maximum coverage, so overlapping segments
/// at vessel joints do not darken twice.
struct StrokeLayer {
    w: usize,
    cov: Vec<f32>,
    col: Vec<[f32; 3]>,
}

impl StrokeLayer {
    fn new(w: usize) -> Self {
        StrokeLayer {
            w,
            cov: vec![0.0; w * w],
            col: vec![[0.0; 3]; w * w],
        }
    }

    fn stroke(&mut self, a: Pt, b: Pt, width: f32, colour: [f32; 3], alpha: f32) {
        let half = width / 2.0;
        let pad = half + 1.5;
        let clamp = |v: f32| v.max(0.0).min(self.w as f32 - 1.0) as usize;
        let (x0, x1) = (clamp(a.0.min(b.0) - pad), clamp(a.0.max(b.0) + pad));
        let (y0, y1) = (clamp(a.1.min(b.1) - pad), clamp(a.1.max(b.1) + pad));
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len2 = (dx * dx + dy * dy).max(1e-9);
        // Thin lines fade rather than vanish below a pixel.
        let strength = alpha * (width.min(1.0));
        let half = half.max(0.5);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let t = (((px - a.0) * dx + (py - a.1) * dy) / len2).clamp(0.0, 1.0);
                let d = ((px - a.0 - t * dx).powi(2) + (py - a.1 - t * dy).powi(2)).sqrt();
                let cov = (half - d + 0.5).clamp(0.0, 1.0) * strength;
                let i = y * self.w + x;
                if cov > self.cov[i] {
                    self.cov[i] = cov;
                    self.col[i] = colour;
                }
            }
        }
    }

    fn composite(&self, canvas: &mut Canvas) {
        for (i, p) in canvas.px.iter_mut().enumerate() {
            if self.cov[i] > 0.0 {
                mix(p, self.col[i], self.cov[i]);
            }
        }
    }
}

const ARTERY: [f32; 3] = [170.0, 42.0, 30.0];
const VEIN: [f32; 3] = [118.0, 24.0, 24.0];
const NEW_VESSEL: [f32; 3] = [150.0, 28.0, 32.0];
const MICROANEURYSM: [f32; 3] = [105.0, 14.0, 12.0];
const HAEMORRHAGE: [f32; 3] = [110.0, 18.0, 14.0];
const EXUDATE: [f32; 3] = [246.0, 228.0, 125.0];
const COTTON_WOOL: [f32; 3] = [238.0, 226.0, 205.0];
const HAZE: [f32; 3] = [225.0, 200.0, 150.0];

/// Renders a scene.
pub fn render(scene: &Scene, layers: Layers) -> RgbImage {
    let w = scene.size as usize;
    let px_per_unit = scene.radius;
    let mut canvas = Canvas {
        w,
        px: vec![[0.0; 3]; w * w],
    };

    // Background: colour, vignetting, low-frequency texture, the darker macula, the optic disc.
    let od_r = scene.optic_disc_radius;
    for y in 0..w {
        for x in 0..w {
            let p = scene.to_fundus(x as f32 + 0.5, y as f32 + 0.5);
            let d2 = p.0 * p.0 + p.1 * p.1;
            if d2 > 1.02 {
                continue;
            }
            let mut k = 1.0 - scene.vignette * d2;
            for &(kx, ky, ph, amp) in &scene.texture {
                k += amp * (kx * p.0 + ky * p.1 + ph).sin();
            }
            let df2 = (p.0 - scene.fovea.0).powi(2) + (p.1 - scene.fovea.1).powi(2);
            k *= 1.0 - scene.macula_darkness * (-df2 / (2.0 * 0.1 * 0.1)).exp();
            k *= 1.0 - 0.25 * (-df2 / (2.0 * 0.018 * 0.018)).exp();
            let mut c = [
                scene.background[0] * k,
                scene.background[1] * k,
                scene.background[2] * k,
            ];
            let dod =
                ((p.0 - scene.optic_disc.0).powi(2) + (p.1 - scene.optic_disc.1).powi(2)).sqrt();
            let disc = ((od_r - dod) / 0.012 + 0.5).clamp(0.0, 1.0);
            if disc > 0.0 {
                mix(&mut c, [248.0, 215.0, 150.0], disc * 0.9);
                let cup = ((0.45 * od_r - dod) / 0.015 + 0.5).clamp(0.0, 1.0);
                mix(&mut c, [255.0, 245.0, 215.0], cup * 0.8);
            }
            // Soft edge of the field stop.
            let edge = ((1.0 - d2.sqrt()) * px_per_unit + 0.5).clamp(0.0, 1.0);
            canvas.px[y * w + x] = [c[0] * edge, c[1] * edge, c[2] * edge];
        }
    }
    // The foveal light reflex.
    canvas.disc(
        scene.to_pixel(scene.fovea),
        0.006 * px_per_unit,
        [230.0, 190.0, 150.0],
        0.6,
        1.0,
    );

    // Vessels.
    let mut vessels = StrokeLayer::new(w);
    let mut reflex = StrokeLayer::new(w);
    for s in &scene.vessels {
        let mut width = s.width;
        if layers.lesions && s.beading > 0.0 {
            // Venous beading: the calibre swells and narrows along the vein.
            let m = ((s.a.0 + s.a.1) * 90.0).sin();
            width *= 1.0 + s.beading * m.max(0.0);
        }
        let (a, b) = (scene.to_pixel(s.a), scene.to_pixel(s.b));
        let colour = if s.kind == VesselKind::Artery {
            ARTERY
        } else {
            VEIN
        };
        vessels.stroke(a, b, width * px_per_unit, colour, 0.85);
        if s.kind == VesselKind::Artery && s.width > 0.012 {
            reflex.stroke(
                a,
                b,
                0.25 * width * px_per_unit,
                [235.0, 140.0, 110.0],
                0.35,
            );
        }
    }
    vessels.composite(&mut canvas);
    reflex.composite(&mut canvas);

    if layers.lesions {
        draw_new_vessels(&scene.new_vessels, scene, &mut canvas);
        for l in &scene.lesions {
            let c = scene.to_pixel(l.at);
            let r = l.radius * px_per_unit;
            match l.kind {
                LesionKind::Microaneurysm => {
                    canvas.disc(c, r.max(0.7), MICROANEURYSM, l.alpha, 1.0)
                }
                LesionKind::Haemorrhage => canvas.disc(c, r, HAEMORRHAGE, l.alpha, 1.5),
                LesionKind::HardExudate => canvas.disc(c, r.max(0.7), EXUDATE, l.alpha, 1.0),
                LesionKind::CottonWool => canvas.gauss(c, r * 0.6, COTTON_WOOL, l.alpha),
                LesionKind::MacularHaze => canvas.gauss(c, r, HAZE, l.alpha),
            }
        }
    }

    for d in &scene.distractors {
        match *d {
            Distractor::Dust { at, radius, amount } => {
                canvas.shade(scene.to_pixel(at), radius * px_per_unit * 0.5, amount)
            }
            Distractor::Sheen { radius, amount } => {
                // A ring of brightening around the macula, as seen in young eyes.
                let n = 24;
                for i in 0..n {
                    let t = i as f32 / n as f32 * std::f32::consts::TAU;
                    let p = (
                        scene.fovea.0 + radius * t.cos(),
                        scene.fovea.1 + radius * 0.8 * t.sin(),
                    );
                    canvas.shade(scene.to_pixel(p), 0.05 * px_per_unit, -amount);
                }
            }
        }
    }

    camera(scene, canvas)
}

fn draw_new_vessels(segments: &[Segment], scene: &Scene, canvas: &mut Canvas) {
    let mut layer = StrokeLayer::new(canvas.w);
    for s in segments {
        let (a, b) = (scene.to_pixel(s.a), scene.to_pixel(s.b));
        layer.stroke(a, b, s.width * scene.radius, NEW_VESSEL, 0.95);
    }
    layer.composite(canvas);
}

/// Exposure, white balance, blur, sensor noise, the field stop, 8-bit quantisation and an
/// optional JPEG round trip.
fn camera(scene: &Scene, canvas: Canvas) -> RgbImage {
    let w = canvas.w as u32;
    let cam = &scene.camera;
    let gain = [
        cam.exposure * cam.white_balance[0],
        cam.exposure * cam.white_balance[1],
        cam.exposure * cam.white_balance[2],
    ];
    let img: ImageBuffer<Rgb<f32>, Vec<f32>> = ImageBuffer::from_fn(w, w, |x, y| {
        let p = canvas.px[(y * w + x) as usize];
        Rgb([p[0] * gain[0], p[1] * gain[1], p[2] * gain[2]])
    });
    let img = if cam.blur > 0.05 {
        image::imageops::blur(&img, cam.blur)
    } else {
        img
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cam.noise_seed);
    let mut out = RgbImage::new(w, w);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let inside = scene.to_fundus(x as f32 + 0.5, y as f32 + 0.5);
        let src = img.get_pixel(x, y);
        let field = inside.0 * inside.0 + inside.1 * inside.1 <= 1.0;
        // Draw the noise for every pixel so the field is the same whatever the content.
        let n: [f32; 3] = [gaussian(&mut rng), gaussian(&mut rng), gaussian(&mut rng)];
        for c in 0..3 {
            let v = if field {
                src[c] + n[c] * cam.noise
            } else {
                src[c] + n[c].abs()
            };
            p[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    match cam.jpeg_quality {
        Some(q) => jpeg_round_trip(&out, q),
        None => out,
    }
}

fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-7);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Compresses and decompresses, leaving JPEG's block and ringing artefacts in the pixels.
pub fn jpeg_round_trip(img: &RgbImage, quality: u8) -> RgbImage {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
        .encode_image(img)
        .expect("encoding to memory cannot fail");
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
        .expect("our own JPEG decodes")
        .to_rgb8()
}
