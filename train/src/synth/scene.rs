//! A synthetic fundus as data: anatomy, lesions and camera, drawn from a seeded RNG.
//!
//! All geometry is in *fundus units*: the origin is the centre of the fundus disc, the disc has
//! radius 1, x points right and y down. The renderer maps these to pixels with the scene's
//! centre, radius and rotation. Keeping the scene as data lets the same eye be rendered with and
//! without its lesions, which is how the tests check that lesions are really drawn.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use retina_model::Grade;
use std::f32::consts::PI;

/// A point in fundus units.
pub type Pt = (f32, f32);

/// Ground-truth labels of one synthetic image (before any are hidden as "missing").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Truth {
    /// ICDR grade.
    pub grade: Grade,
    /// Amount of neovascularization, 0..1 (0 below grade 4).
    pub vessel_growth: f32,
    /// Macular edema present.
    pub fluid: bool,
}

/// Vessel type: arteries are thinner and lighter, veins wider and darker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VesselKind {
    /// Artery (lighter red, with a central light reflex).
    Artery,
    /// Vein (darker red).
    Vein,
    /// New vessel (neovascularization): fine and tortuous.
    New,
}

/// One straight piece of a vessel.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// Start.
    pub a: Pt,
    /// End.
    pub b: Pt,
    /// Full width, fundus units.
    pub width: f32,
    /// Artery, vein or new vessel.
    pub kind: VesselKind,
    /// Extra width factor where the vein is beaded (grade 3), applied only with lesions on.
    pub beading: f32,
}

/// What a lesion or distractor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LesionKind {
    /// Tiny dark-red dot.
    Microaneurysm,
    /// Dot or blot haemorrhage: larger, dark red.
    Haemorrhage,
    /// Yellow-white lipid deposit.
    HardExudate,
    /// Fluffy pale patch (nerve-fibre infarct).
    CottonWool,
    /// Diffuse pale haze over the macula (with edema).
    MacularHaze,
}

/// One lesion.
#[derive(Debug, Clone, Copy)]
pub struct Lesion {
    /// Kind.
    pub kind: LesionKind,
    /// Centre.
    pub at: Pt,
    /// Radius, fundus units.
    pub radius: f32,
    /// Opacity.
    pub alpha: f32,
}

/// Benign things present at every grade.
#[derive(Debug, Clone, Copy)]
pub enum Distractor {
    /// Dust on the lens: a soft grey shadow.
    Dust {
        /// Centre.
        at: Pt,
        /// Radius.
        radius: f32,
        /// Darkening.
        amount: f32,
    },
    /// The bright sheen of a young retina around the macula.
    Sheen {
        /// Ring radius around the fovea.
        radius: f32,
        /// Brightening.
        amount: f32,
    },
}

/// Camera and acquisition variation.
#[derive(Debug, Clone, Copy)]
pub struct Camera {
    /// Overall exposure gain.
    pub exposure: f32,
    /// Per-channel white-balance gains.
    pub white_balance: [f32; 3],
    /// Gaussian blur sigma in pixels (0 = sharp).
    pub blur: f32,
    /// Sensor noise standard deviation (0-255 scale).
    pub noise: f32,
    /// Seed of the noise field, so two renders of one scene get the same noise.
    pub noise_seed: u64,
    /// JPEG round trip quality, if the image goes through JPEG compression.
    pub jpeg_quality: Option<u8>,
}

/// Everything needed to render one image.
#[derive(Debug, Clone)]
pub struct Scene {
    /// Image side in pixels.
    pub size: u32,
    /// Disc centre in pixels.
    pub centre: Pt,
    /// Disc radius in pixels.
    pub radius: f32,
    /// Rotation of the fundus frame, radians.
    pub rotation: f32,
    /// Right eye (optic disc on the right of the image) or left.
    pub right_eye: bool,
    /// Optic disc centre.
    pub optic_disc: Pt,
    /// Optic disc radius.
    pub optic_disc_radius: f32,
    /// Fovea centre.
    pub fovea: Pt,
    /// Background colour (RGB, 0-255) at the centre.
    pub background: [f32; 3],
    /// Low-frequency texture waves: (kx, ky, phase, amplitude).
    pub texture: Vec<(f32, f32, f32, f32)>,
    /// Brightness lost at the rim (vignetting).
    pub vignette: f32,
    /// Darkening of the macula.
    pub macula_darkness: f32,
    /// The vessel tree (arteries and veins).
    pub vessels: Vec<Segment>,
    /// New vessels (grade 4).
    pub new_vessels: Vec<Segment>,
    /// Lesions.
    pub lesions: Vec<Lesion>,
    /// Benign distractors.
    pub distractors: Vec<Distractor>,
    /// Camera.
    pub camera: Camera,
    /// The labels this scene was drawn for.
    pub truth: Truth,
    /// Whose non-proliferative lesions the eye carries: its own grade below 4; for a
    /// proliferative eye, those of a moderate or a severe eye (even odds), so that only the new
    /// vessels set it apart, as the ICDR scale defines it.
    pub npdr: Grade,
}

/// Probability of macular edema by grade: none at 0, rare at 1, common at 2-4.
pub const FLUID_RATE: [f32; 5] = [0.0, 0.04, 0.35, 0.5, 0.5];

fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

fn count(rng: &mut ChaCha8Rng, lo: usize, hi: usize) -> usize {
    rng.random_range(lo..=hi)
}

fn dist(a: Pt, b: Pt) -> f32 {
    ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt()
}

/// A uniformly random point inside the disc of radius `max_r`.
fn point_in_disc(rng: &mut ChaCha8Rng, max_r: f32) -> Pt {
    let r = max_r * rng.random::<f32>().sqrt();
    let t = uniform(rng, 0.0, 2.0 * PI);
    (r * t.cos(), r * t.sin())
}

/// Draws the labels of one image from a grade mix.
pub fn draw_truth(rng: &mut ChaCha8Rng, grade_mix: &[f32; 5]) -> Truth {
    let total: f32 = grade_mix.iter().sum();
    let mut u = rng.random::<f32>() * total;
    let mut grade = Grade::Proliferative;
    for (i, p) in grade_mix.iter().enumerate() {
        if u < *p {
            grade = Grade::from_index(i).unwrap();
            break;
        }
        u -= p;
    }
    let fluid = rng.random::<f32>() < FLUID_RATE[grade.index()];
    let vessel_growth = if grade == Grade::Proliferative {
        uniform(rng, 0.1, 1.0)
    } else {
        0.0
    };
    Truth {
        grade,
        vessel_growth,
        fluid,
    }
}

struct Walk {
    start: Pt,
    heading: f32,
    width: f32,
    length: f32,
    kind: VesselKind,
    depth: u32,
    /// Heading the walk bends toward (the arcade's course), if any.
    target: Option<f32>,
}

impl Scene {
    /// Draws a complete scene for `truth` at `size` pixels.
    pub fn draw(rng: &mut ChaCha8Rng, truth: Truth, size: u32) -> Scene {
        let s = size as f32;
        let centre = (
            s / 2.0 + uniform(rng, -0.03, 0.03) * s,
            s / 2.0 + uniform(rng, -0.03, 0.03) * s,
        );
        let radius = uniform(rng, 0.41, 0.47) * s;
        let right_eye = rng.random::<bool>();
        // The optic disc sits nasally, the fovea about 2.5 disc diameters temporal to it.
        let nasal = if right_eye { 1.0 } else { -1.0 };
        let od_r = uniform(rng, 0.075, 0.095);
        let optic_disc = (nasal * uniform(rng, 0.22, 0.28), uniform(rng, -0.05, 0.02));
        let fovea = (
            optic_disc.0 - nasal * 2.5 * 2.0 * od_r * uniform(rng, 0.95, 1.05),
            optic_disc.1 + uniform(rng, 0.02, 0.06),
        );
        let background = [
            uniform(rng, 185.0, 225.0),
            uniform(rng, 70.0, 100.0),
            uniform(rng, 30.0, 55.0),
        ];
        let texture = (0..6)
            .map(|_| {
                let f = uniform(rng, 3.0, 9.0);
                let t = uniform(rng, 0.0, PI);
                (
                    f * t.cos(),
                    f * t.sin(),
                    uniform(rng, 0.0, 2.0 * PI),
                    uniform(rng, 0.01, 0.03),
                )
            })
            .collect();
        let mut scene = Scene {
            size,
            centre,
            radius,
            rotation: uniform(rng, -10.0, 10.0).to_radians(),
            right_eye,
            optic_disc,
            optic_disc_radius: od_r,
            fovea,
            background,
            texture,
            vignette: uniform(rng, 0.25, 0.45),
            macula_darkness: uniform(rng, 0.2, 0.35),
            vessels: Vec::new(),
            new_vessels: Vec::new(),
            lesions: Vec::new(),
            distractors: Vec::new(),
            camera: Camera {
                exposure: uniform(rng, 0.8, 1.15),
                white_balance: [
                    uniform(rng, 0.92, 1.08),
                    uniform(rng, 0.92, 1.08),
                    uniform(rng, 0.92, 1.08),
                ],
                blur: if rng.random::<bool>() {
                    uniform(rng, 0.3, 1.0) * s / 256.0
                } else {
                    0.0
                },
                noise: uniform(rng, 1.0, 5.0),
                noise_seed: rng.random(),
                jpeg_quality: rng.random::<bool>().then(|| rng.random_range(70..=95)),
            },
            npdr: truth.grade,
            truth,
        };
        if scene.truth.grade == Grade::Proliferative {
            // Drawn only for proliferative eyes, so the other grades' images stay as they were.
            scene.npdr = if rng.random::<bool>() {
                Grade::Severe
            } else {
                Grade::Moderate
            };
        }
        scene.draw_vessels(rng);
        scene.draw_lesions(rng);
        scene.draw_distractors(rng);
        scene
    }

    fn inside(&self, p: Pt, margin: f32) -> bool {
        p.0 * p.0 + p.1 * p.1 <= (1.0 - margin).powi(2)
    }

    /// Four arcades of paired arteries and veins leave the optic disc and branch; the temporal
    /// ones curve around the macula, and no vessel enters the foveal avascular zone.
    fn draw_vessels(&mut self, rng: &mut ChaCha8Rng) {
        let temporal = if self.right_eye { PI } else { 0.0 };
        let nasal = temporal + PI;
        let beaded = self.npdr >= Grade::Severe;
        let mut walks = Vec::new();
        for (up, side) in [
            (-1.0f32, temporal),
            (1.0, temporal),
            (-1.0, nasal),
            (1.0, nasal),
        ] {
            let is_temporal = side == temporal;
            // Leave the disc steeply up or down, then bend toward the arcade's course.
            let leave = side + up * (if is_temporal { 1.25 } else { 0.7 }) * side_sign(side);
            for kind in [VesselKind::Vein, VesselKind::Artery] {
                let offset = if kind == VesselKind::Vein {
                    0.12
                } else {
                    -0.12
                };
                walks.push(Walk {
                    start: self.optic_disc,
                    heading: leave + offset * up + uniform(rng, -0.1, 0.1),
                    width: if kind == VesselKind::Vein {
                        0.026
                    } else {
                        0.019
                    } * uniform(rng, 0.9, 1.1),
                    length: if is_temporal {
                        uniform(rng, 1.1, 1.4)
                    } else {
                        uniform(rng, 0.7, 0.9)
                    },
                    kind,
                    depth: 0,
                    target: Some(side + up * 0.35 * side_sign(side)),
                });
            }
        }
        let step = 0.02;
        while let Some(w) = walks.pop() {
            let mut p = w.start;
            let mut h = w.heading;
            let steps = (w.length / step) as usize;
            let mut next_branch = count(rng, 6, 11);
            let vein_beading = beaded && w.kind == VesselKind::Vein && rng.random::<f32>() < 0.6;
            for i in 0..steps {
                if let Some(t) = w.target {
                    h += 0.09 * angle_diff(t, h);
                }
                h += uniform(rng, -0.12, 0.12);
                let q = (p.0 + step * h.cos(), p.1 + step * h.sin());
                if !self.inside(q, 0.03) || dist(q, self.fovea) < 0.09 {
                    break;
                }
                let taper = 1.0 - 0.55 * i as f32 / steps as f32;
                self.vessels.push(Segment {
                    a: p,
                    b: q,
                    width: w.width * taper,
                    kind: w.kind,
                    beading: if vein_beading { 0.5 } else { 0.0 },
                });
                p = q;
                if i == next_branch && w.depth < 3 {
                    next_branch += count(rng, 6, 12);
                    let dir = if rng.random::<bool>() { 1.0 } else { -1.0 };
                    walks.push(Walk {
                        start: p,
                        heading: h + dir * uniform(rng, 0.4, 0.9),
                        width: w.width * taper * uniform(rng, 0.6, 0.75),
                        length: w.length * uniform(rng, 0.3, 0.5),
                        kind: w.kind,
                        depth: w.depth + 1,
                        target: None,
                    });
                }
            }
        }
    }

    fn random_site(&self, rng: &mut ChaCha8Rng, max_r: f32, avoid_fovea: f32) -> Pt {
        loop {
            let p = point_in_disc(rng, max_r);
            if dist(p, self.optic_disc) > self.optic_disc_radius * 1.4
                && dist(p, self.fovea) > avoid_fovea
            {
                return p;
            }
        }
    }

    /// Lesions by ICDR grade, following the international clinical scale: the
    /// non-proliferative lesions of [`Scene::npdr`], then a proliferative eye's new vessels.
    /// (Proliferative eyes once had lesions of their own: cotton-wool spots with a moderate
    /// eye's haemorrhage count, which told them apart without a look at the new vessels.)
    fn draw_lesions(&mut self, rng: &mut ChaCha8Rng) {
        let g = self.npdr;
        let (ma, haem) = match g {
            Grade::None => (0, 0),
            Grade::Mild => (count(rng, 2, 6), 0),
            Grade::Moderate => (count(rng, 6, 14), count(rng, 2, 8)),
            Grade::Severe => (count(rng, 10, 20), 0), // haemorrhages placed per quadrant below
            Grade::Proliferative => unreachable!("a background is never proliferative"),
        };
        for _ in 0..ma {
            let at = self.random_site(rng, 0.85, 0.05);
            self.lesions.push(Lesion {
                kind: LesionKind::Microaneurysm,
                at,
                radius: uniform(rng, 0.006, 0.011),
                alpha: uniform(rng, 0.75, 0.95),
            });
        }
        let haemorrhage = |scene: &mut Scene, rng: &mut ChaCha8Rng, at: Pt| {
            // A blot is a few overlapping blobs.
            let r = uniform(rng, 0.014, 0.032);
            for _ in 0..count(rng, 1, 3) {
                let j = (uniform(rng, -r, r) * 0.6, uniform(rng, -r, r) * 0.6);
                scene.lesions.push(Lesion {
                    kind: LesionKind::Haemorrhage,
                    at: (at.0 + j.0, at.1 + j.1),
                    radius: r * uniform(rng, 0.6, 1.0),
                    alpha: uniform(rng, 0.7, 0.9),
                });
            }
        };
        for _ in 0..haem {
            let at = self.random_site(rng, 0.85, 0.05);
            haemorrhage(self, rng, at);
        }
        if g == Grade::Severe {
            // The 4-2-1 rule's first criterion: many haemorrhages in all four quadrants.
            for q in 0..4 {
                let (sx, sy) = (
                    if q % 2 == 0 { 1.0 } else { -1.0 },
                    if q < 2 { 1.0 } else { -1.0 },
                );
                for _ in 0..count(rng, 5, 9) {
                    let p = loop {
                        let p = self.random_site(rng, 0.85, 0.05);
                        if p.0 * sx > 0.05 && p.1 * sy > 0.05 {
                            break p;
                        }
                    };
                    haemorrhage(self, rng, p);
                }
            }
        }
        if g >= Grade::Severe {
            for _ in 0..count(rng, 1, 4) {
                let at = self.random_site(rng, 0.65, 0.15);
                self.lesions.push(Lesion {
                    kind: LesionKind::CottonWool,
                    at,
                    radius: uniform(rng, 0.025, 0.045),
                    alpha: uniform(rng, 0.45, 0.7),
                });
            }
        }
        // Scattered hard exudates, kept away from the macula: exudates near the fovea are the
        // sign of edema and appear exactly when `fluid` is set.
        if g >= Grade::Moderate && rng.random::<f32>() < 0.4 {
            for _ in 0..count(rng, 2, 8) {
                let at = self.random_site(rng, 0.85, 0.45);
                self.lesions.push(Lesion {
                    kind: LesionKind::HardExudate,
                    at,
                    radius: uniform(rng, 0.006, 0.012),
                    alpha: uniform(rng, 0.7, 0.95),
                });
            }
        }
        if self.truth.fluid {
            // Circinate rings of exudates around the leaking centre, plus a macular haze.
            for _ in 0..count(rng, 1, 2) {
                let c = (
                    self.fovea.0 + uniform(rng, -0.05, 0.05),
                    self.fovea.1 + uniform(rng, -0.05, 0.05),
                );
                let ring = uniform(rng, 0.07, 0.15);
                for _ in 0..count(rng, 14, 32) {
                    let t = uniform(rng, 0.0, 2.0 * PI);
                    let r = ring * uniform(rng, 0.8, 1.2);
                    self.lesions.push(Lesion {
                        kind: LesionKind::HardExudate,
                        at: (c.0 + r * t.cos(), c.1 + r * t.sin()),
                        radius: uniform(rng, 0.006, 0.014),
                        alpha: uniform(rng, 0.75, 0.95),
                    });
                }
            }
            self.lesions.push(Lesion {
                kind: LesionKind::MacularHaze,
                at: self.fovea,
                radius: uniform(rng, 0.1, 0.16),
                alpha: uniform(rng, 0.12, 0.2),
            });
        }
        if self.truth.grade == Grade::Proliferative {
            self.draw_new_vessels(rng);
        }
    }

    /// Neovascularization: tufts of fine, tortuous loops at the disc (NVD) and elsewhere (NVE),
    /// more and larger as `vessel_growth` rises.
    fn draw_new_vessels(&mut self, rng: &mut ChaCha8Rng) {
        let v = self.truth.vessel_growth;
        let tufts = 1 + (v * 4.0).round() as usize;
        for t in 0..tufts {
            let at_disc = t == 0 && rng.random::<f32>() < 0.6;
            let c = if at_disc {
                let a = uniform(rng, 0.0, 2.0 * PI);
                let r = self.optic_disc_radius * uniform(rng, 0.3, 1.0);
                (
                    self.optic_disc.0 + r * a.cos(),
                    self.optic_disc.1 + r * a.sin(),
                )
            } else {
                // Along the vessel tree, where NVE grows.
                let s = self.vessels[rng.random_range(0..self.vessels.len())];
                s.a
            };
            let extent = 0.03 + 0.06 * v;
            for _ in 0..(3 + (v * 9.0).round() as usize) {
                let mut p = (
                    c.0 + uniform(rng, -extent, extent) * 0.5,
                    c.1 + uniform(rng, -extent, extent) * 0.5,
                );
                let mut h = uniform(rng, 0.0, 2.0 * PI);
                for _ in 0..count(rng, 10, 22) {
                    h += uniform(rng, -0.9, 0.9);
                    let q = (p.0 + 0.008 * h.cos(), p.1 + 0.008 * h.sin());
                    if dist(q, c) > extent || !self.inside(q, 0.03) {
                        h += PI * 0.7;
                        continue;
                    }
                    self.new_vessels.push(Segment {
                        a: p,
                        b: q,
                        width: uniform(rng, 0.0055, 0.008),
                        kind: VesselKind::New,
                        beading: 0.0,
                    });
                    p = q;
                }
            }
        }
    }

    fn draw_distractors(&mut self, rng: &mut ChaCha8Rng) {
        for _ in 0..count(rng, 0, 3) {
            self.distractors.push(Distractor::Dust {
                at: point_in_disc(rng, 0.85),
                radius: uniform(rng, 0.03, 0.07),
                amount: uniform(rng, 0.06, 0.14),
            });
        }
        if rng.random::<f32>() < 0.5 {
            self.distractors.push(Distractor::Sheen {
                radius: uniform(rng, 0.22, 0.34),
                amount: uniform(rng, 0.04, 0.09),
            });
        }
    }

    /// Fundus coordinates to pixel coordinates.
    pub fn to_pixel(&self, p: Pt) -> Pt {
        let (s, c) = self.rotation.sin_cos();
        (
            self.centre.0 + self.radius * (c * p.0 - s * p.1),
            self.centre.1 + self.radius * (s * p.0 + c * p.1),
        )
    }

    /// Pixel coordinates to fundus coordinates.
    pub fn to_fundus(&self, x: f32, y: f32) -> Pt {
        let (s, c) = self.rotation.sin_cos();
        let (dx, dy) = (
            (x - self.centre.0) / self.radius,
            (y - self.centre.1) / self.radius,
        );
        (c * dx + s * dy, -s * dx + c * dy)
    }
}

fn side_sign(side: f32) -> f32 {
    // Upward (negative y) for a temporal arcade on the left means turning clockwise.
    if side.cos() >= 0.0 { 1.0 } else { -1.0 }
}

fn angle_diff(target: f32, h: f32) -> f32 {
    let mut d = target - h;
    while d > PI {
        d -= 2.0 * PI;
    }
    while d < -PI {
        d += 2.0 * PI;
    }
    d
}
