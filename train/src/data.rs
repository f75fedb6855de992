//! Feeding the trainer: splits, sampling, augmentation and a parallel background loader.

use crate::dataset::{ImageHashes, Sample};
use crate::degrade::Degradation;
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use retina_model::{GradabilityCheck, PreprocessConfig, PreprocessError, Refusal};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

/// Splits samples into training and validation sets, stratified by grade and grouped by
/// patient: both eyes of a patient land on the same side. Samples without a patient id are
/// their own group. Deterministic for a seed.
pub fn split(samples: &[Sample], val_fraction: f32, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        let key = s
            .patient
            .clone()
            .unwrap_or_else(|| format!("\u{0}{}", s.image.display()));
        groups.entry(key).or_default().push(i);
    }
    // Stratum of a group: its worst grade (6 = ungraded).
    let mut strata: BTreeMap<usize, Vec<Vec<usize>>> = BTreeMap::new();
    for (_, members) in groups {
        let g = members
            .iter()
            .filter_map(|&i| samples[i].grade())
            .max()
            .unwrap_or(6);
        strata.entry(g).or_default().push(members);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5151_7a17);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (_, mut groups) in strata {
        groups.shuffle(&mut rng);
        let n_val = (groups.len() as f32 * val_fraction).round() as usize;
        for (k, members) in groups.into_iter().enumerate() {
            let dst = if k < n_val { &mut val } else { &mut train };
            dst.extend(members.into_iter().map(|i| samples[i].clone()));
        }
    }
    // Keep label-file order within each side, for readable logs.
    train.sort_by_key(|s| s.line);
    val.sort_by_key(|s| s.line);
    (train, val)
}

/// How training samples are drawn each epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Every sample once per epoch, shuffled.
    Shuffle,
    /// Grades drawn equally often (with replacement): oversampling the rare grades, the
    /// alternative to class weights (the default: see `DataConfig`).
    #[default]
    Balanced,
}

impl std::str::FromStr for Sampling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shuffle" => Ok(Self::Shuffle),
            "balanced" => Ok(Self::Balanced),
            o => Err(format!(
                "unknown sampling `{o}`: choose shuffle or balanced"
            )),
        }
    }
}

/// The sample order of one epoch.
pub fn epoch_order(samples: &[Sample], sampling: Sampling, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1 + epoch as u64 * 7919));
    match sampling {
        Sampling::Shuffle => {
            let mut v: Vec<usize> = (0..samples.len()).collect();
            v.shuffle(&mut rng);
            v
        }
        Sampling::Balanced => {
            let mut by_grade: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (i, s) in samples.iter().enumerate() {
                by_grade.entry(s.grade().unwrap_or(99)).or_default().push(i);
            }
            let classes: Vec<&Vec<usize>> = by_grade.values().collect();
            (0..samples.len())
                .map(|_| {
                    let c = classes[rng.random_range(0..classes.len())];
                    c[rng.random_range(0..c.len())]
                })
                .collect()
        }
    }
}

/// How much larger than the network's input the views are that a resampling augmentation
/// is given (see [`Augment::apply`]).
pub const OVERSAMPLE: usize = 2;

/// Training-time augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Random horizontal and vertical flips (a fundus flipped is still a fundus).
    pub flips: bool,
    /// Maximum rotation, degrees.
    pub rotation: f32,
    /// Maximum relative zoom in or out.
    pub scale: f32,
    /// Maximum relative brightness change.
    pub brightness: f32,
    /// Maximum relative contrast change.
    pub contrast: f32,
    /// Maximum per-channel gain change (colour jitter).
    pub colour: f32,
}

impl Default for Augment {
    /// Flips and colour jitter; no rotation or zoom. Photographs of one camera are taken
    /// upright at one field of view (the generator already turns its scenes by up to 10°), and
    /// at the main command's budget learning rotation invariance cost the network what it
    /// learns of new vessels: with ±20° and ±8 % (resampled from views at twice the size),
    /// validation vessel-growth r 0.46 and proliferative recall 0.08 at epoch 27 of 40, against
    /// 0.77 and 0.51 without (seed 1, `docs/history.md`). Turn them on for mixed cameras.
    fn default() -> Self {
        Augment {
            flips: true,
            rotation: 0.0,
            scale: 0.0,
            brightness: 0.15,
            contrast: 0.15,
            colour: 0.05,
        }
    }
}

impl Augment {
    /// No augmentation.
    pub fn none() -> Augment {
        Augment {
            flips: false,
            rotation: 0.0,
            scale: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            colour: 0.0,
        }
    }

    /// Whether this augmentation resamples the image (rotates or zooms it). Such a one is
    /// given views made at [`OVERSAMPLE`] times the network's input size.
    pub fn resamples(&self) -> bool {
        self.rotation > 0.0 || self.scale > 0.0
    }

    /// The side of the views this augmentation is given for a network input of `input` px.
    pub fn view_side(augment: Option<&Augment>, input: usize) -> usize {
        if augment.is_some_and(Augment::resamples) {
            input * OVERSAMPLE
        } else {
            input
        }
    }

    /// A randomly flipped, rotated, zoomed and colour-jittered copy of `img` at `out` x `out`
    /// pixels: one resampling, each output pixel the mean of bilinear samples on a grid as
    /// fine as `img`'s pixels (2x2 from a view twice the output's size).
    ///
    /// Why sample that finely: bilinear interpolation at the output's own size averages
    /// neighbouring pixels wherever a sample falls between them, so a vessel a third of a pixel
    /// wide (new vessels at 128 px) loses up to half of its contrast to each rotation.
    pub fn apply(&self, img: &RgbImage, out: u32, rng: &mut ChaCha8Rng) -> RgbImage {
        let sym = |rng: &mut ChaCha8Rng, m: f32| {
            if m > 0.0 {
                rng.random_range(-m..=m)
            } else {
                0.0
            }
        };
        let fx = if self.flips && rng.random::<bool>() {
            -1.0
        } else {
            1.0
        };
        let fy = if self.flips && rng.random::<bool>() {
            -1.0
        } else {
            1.0
        };
        let angle = sym(rng, self.rotation).to_radians();
        let zoom = 1.0 + sym(rng, self.scale);
        let bright = 1.0 + sym(rng, self.brightness);
        let contrast = 1.0 + sym(rng, self.contrast);
        let gains = [
            bright * (1.0 + sym(rng, self.colour)),
            bright * (1.0 + sym(rng, self.colour)),
            bright * (1.0 + sym(rng, self.colour)),
        ];
        let (w, h) = img.dimensions();
        // Source pixels per output pixel, and sub-samples per output pixel along each axis.
        let scale = (w as f32 / out as f32, h as f32 / out as f32);
        let k = (scale.0.max(scale.1).ceil() as usize).clamp(1, 4);
        let c_out = out as f32 / 2.0;
        let (s, c) = angle.sin_cos();
        let mean = 128.0;
        let src = img.as_raw();
        let mut out_img = RgbImage::new(out, out);
        for (x, y, p) in out_img.enumerate_pixels_mut() {
            let mut acc = [0.0f32; 3];
            let mut inside = false;
            for j in 0..k {
                for i in 0..k {
                    // Inverse map: sub-sample of the output pixel -> source position.
                    let u = x as f32 + (i as f32 + 0.5) / k as f32;
                    let v = y as f32 + (j as f32 + 0.5) / k as f32;
                    let (dx, dy) = ((u - c_out) / zoom, (v - c_out) / zoom);
                    let (rx, ry) = (c * dx + s * dy, -s * dx + c * dy);
                    let sx = (c_out + fx * rx) * scale.0 - 0.5;
                    let sy = (c_out + fy * ry) * scale.1 - 0.5;
                    if sx < 0.0 || sy < 0.0 || sx > (w - 1) as f32 || sy > (h - 1) as f32 {
                        continue; // outside: black, like the border of a fundus photograph
                    }
                    inside = true;
                    let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                    let (x1, y1) = ((x0 + 1).min(w as usize - 1), (y0 + 1).min(h as usize - 1));
                    let (ax, ay) = (sx - x0 as f32, sy - y0 as f32);
                    for (ch, a) in acc.iter_mut().enumerate() {
                        let at = |xx: usize, yy: usize| src[(yy * w as usize + xx) * 3 + ch] as f32;
                        *a += (at(x0, y0) * (1.0 - ax) + at(x1, y0) * ax) * (1.0 - ay)
                            + (at(x0, y1) * (1.0 - ax) + at(x1, y1) * ax) * ay;
                    }
                }
            }
            if !inside {
                continue;
            }
            let n = (k * k) as f32;
            for ch in 0..3 {
                let v = acc[ch] / n;
                // Contrast around mid-grey keeps black borders dark enough to stay a border.
                let v = ((v - mean) * contrast + mean).max(0.0).min(v * 2.0 + 1.0) * gains[ch];
                p[ch] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        out_img
    }
}

/// How a run teaches its refusing head (the quality head) when the data do not label it.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityTeaching {
    /// Index of the refusing head among the loader's heads.
    pub head: usize,
    /// Its first refusing class: a label at or above it refuses the image, so the sample
    /// teaches no other head (what an ungradable photograph shows cannot be trusted).
    pub from_class: usize,
    /// Share of the samples that also give a quality example.
    pub share: f32,
    /// Share of the quality examples degraded on the fly.
    pub fraction: f32,
    /// The degradations the head has a class for, with that class.
    pub degradations: Vec<(Degradation, usize)>,
}

impl QualityTeaching {
    /// The teaching for `specs` (the network's heads): `share` of the samples give a quality
    /// example, `fraction` of those degraded; `None` when no head refuses. Degradations are matched to the head's classes
    /// by name; a sample without a quality label counts as gradable (class 0), since a
    /// labelled data set's photographs were graded.
    pub fn for_heads(
        specs: &[retina_model::HeadSpec],
        share: f32,
        fraction: f32,
    ) -> Option<QualityTeaching> {
        let (head, spec) = specs.iter().enumerate().find(|(_, h)| h.refuses())?;
        let from_class = spec.decision.as_ref().map(|d| d.from_class)?;
        let names = spec.class_names();
        let degradations = Degradation::ALL
            .iter()
            .filter_map(|d| {
                let c = names.iter().position(|n| n == d.name())?;
                (c >= from_class).then_some((*d, c))
            })
            .collect();
        Some(QualityTeaching {
            head,
            from_class,
            share,
            fraction,
            degradations,
        })
    }
}

/// One batch, ready to become tensors.
#[derive(Debug)]
pub struct HostBatch {
    /// Normalised images, `[n, 3, S, S]` flattened.
    pub images: Vec<f32>,
    /// Per head (in head order), one optional label per sample.
    pub targets: Vec<Vec<Option<f32>>>,
    /// Number of samples.
    pub n: usize,
    /// Images that could not be read (skipped with `--skip-bad-images`).
    pub bad: Vec<String>,
    /// The gradability check's answer per sample (where the loader runs the check).
    pub refusals: Vec<Option<Refusal>>,
    /// Examples for the refusing head, when the loader teaches it.
    pub quality: Option<QualityBatch>,
    /// The same views as `images` in a distillation teacher's preprocessing (its input size
    /// and normalisation), where the loader has one; empty otherwise.
    pub teacher_images: Vec<f32>,
}

/// Views and quality classes that teach the refusing head (see [`LoaderSpec::load_batch`]).
#[derive(Debug, Default)]
pub struct QualityBatch {
    /// Normalised views, `[n, 3, S, S]` flattened.
    pub images: Vec<f32>,
    /// The quality class of each.
    pub labels: Vec<f32>,
}

/// Caches each image's cropped, resized view (before augmentation and normalisation), so an
/// image is decoded once per run, not once per epoch. Training views are [`OVERSAMPLE`] times
/// the input size when the augmentation resamples.
#[derive(Default)]
pub struct ViewCache {
    views: Mutex<HashMap<std::path::PathBuf, Arc<LoadedView>>>,
}

/// A decoded view and whether preprocessing found a disc in its photograph.
#[derive(Debug)]
pub struct LoadedView {
    /// The cropped, resized view.
    pub image: RgbImage,
    /// See [`retina_model::View::disc_found`].
    pub disc_found: bool,
}

/// The parameters a loader needs.
#[derive(Clone)]
pub struct LoaderSpec {
    /// Shared preprocessing.
    pub preprocess: PreprocessConfig,
    /// Head names, in network order.
    pub heads: Vec<String>,
    /// Augmentation (None on validation).
    pub augment: Option<Augment>,
    /// Skip unreadable images instead of failing.
    pub skip_bad: bool,
    /// Cache decoded views in memory.
    pub cache: Option<Arc<ViewCache>>,
    /// Seed for augmentation.
    pub seed: u64,
    /// Content hashes of the files decoded, shared by the loaders of one run.
    pub hashes: Arc<ImageHashes>,
    /// A prepared store to read views from instead of decoding photographs.
    pub store: Option<Arc<crate::store::ViewStore>>,
    /// Teach the refusing head (training-time degradations, implicit gradable labels).
    pub quality: Option<QualityTeaching>,
    /// Run the gradability check on each view (for scoring).
    pub check: Option<GradabilityCheck>,
    /// A distillation teacher's preprocessing, where it differs from `preprocess`: each
    /// training view also becomes the teacher's input, augmented once for both (at the larger
    /// of the two sizes, then resized down for the smaller).
    pub teacher: Option<PreprocessConfig>,
}

/// `view` as the input of a network with preprocessing `pre`: resized to its input size
/// where the view was made larger (for a distillation teacher), then normalised.
fn network_input(pre: &PreprocessConfig, view: &RgbImage) -> Vec<f32> {
    let s = pre.image_size as u32;
    if view.dimensions() == (s, s) {
        pre.normalise(view)
    } else {
        pre.normalise(&image::imageops::resize(
            view,
            s,
            s,
            image::imageops::FilterType::Triangle,
        ))
    }
}

/// A batch or the error that stopped the loader.
pub type LoadResult = Result<HostBatch, PreprocessError>;

impl LoaderSpec {
    /// A loader of `heads`' labels with `preprocess` and nothing else: no augmentation, cache,
    /// store, quality teaching, gradability check or teacher; seed 0.
    pub fn plain(preprocess: PreprocessConfig, heads: Vec<String>) -> LoaderSpec {
        LoaderSpec {
            preprocess,
            heads,
            augment: None,
            skip_bad: false,
            cache: None,
            seed: 0,
            hashes: Default::default(),
            store: None,
            quality: None,
            check: None,
            teacher: None,
        }
    }

    /// The side of the augmented image: the larger of the network's input and the
    /// distillation teacher's (the smaller is resized from it).
    fn input_side(&self) -> usize {
        self.teacher
            .as_ref()
            .map_or(0, |t| t.image_size)
            .max(self.preprocess.image_size)
    }

    fn view(&self, s: &Sample) -> Result<Arc<LoadedView>, PreprocessError> {
        if let Some(store) = &self.store {
            // A store keeps views of photographs whose disc was found or not alike; the
            // check's disc rule does not apply to them.
            return store
                .view(&s.image)
                .map(|image| {
                    Arc::new(LoadedView {
                        image,
                        disc_found: true,
                    })
                })
                .map_err(|reason| PreprocessError::Corrupt {
                    name: s.image.display().to_string(),
                    reason,
                });
        }
        if let Some(c) = &self.cache
            && let Some(v) = c.views.lock().expect("cache lock").get(&s.image)
        {
            return Ok(v.clone());
        }
        let name = s.image.display().to_string();
        let bytes = std::fs::read(&s.image).map_err(|source| PreprocessError::Io {
            name: name.clone(),
            source,
        })?;
        self.hashes.record(&s.image, &bytes);
        let side = Augment::view_side(self.augment.as_ref(), self.input_side());
        let v = if side == self.preprocess.image_size {
            self.preprocess.view_from_bytes(&bytes, &name)?
        } else {
            PreprocessConfig {
                image_size: side,
                ..self.preprocess.clone()
            }
            .view_from_bytes(&bytes, &name)?
        };
        let view = Arc::new(LoadedView {
            image: v.image,
            disc_found: v.disc_found,
        });
        if let Some(c) = &self.cache {
            c.views
                .lock()
                .expect("cache lock")
                .insert(s.image.clone(), view.clone());
        }
        Ok(view)
    }

    /// Loads, augments and normalises a batch in parallel (rayon).
    ///
    /// With a refusing head to teach (training), a share of the samples (every one labelled
    /// ungradable) also give one example to the quality batch: the view degraded (with
    /// probability `fraction`) or clean. The main batch
    /// keeps only photographs not labelled ungradable and never teaches the quality head: a
    /// degraded image in it would shift batch norm's batch statistics away from gradable
    /// photographs, and that alone stalls what the clinical heads learn (measured: referable
    /// AUC 0.56 instead of 0.95 after 8 epochs with 15% of views over-exposed). The trainer
    /// runs the quality batch through a pass of its own, batch norm frozen on its running
    /// statistics.
    pub fn load_batch(&self, samples: &[Sample], idx: &[usize], batch_no: u64) -> LoadResult {
        struct Loaded {
            input: Option<Vec<f32>>,
            teacher: Option<Vec<f32>>,
            refusal: Option<Refusal>,
            quality: Option<(Vec<f32>, f32)>,
        }
        let teach = self
            .augment
            .is_some()
            .then_some(self.quality.as_ref())
            .flatten();
        let ungradable = |i: usize| {
            self.quality.as_ref().is_some_and(|q| {
                samples[i]
                    .labels
                    .get(&self.heads[q.head])
                    .is_some_and(|&l| l >= q.from_class as f32)
            })
        };
        let per: Vec<Result<Loaded, PreprocessError>> = idx
            .par_iter()
            .enumerate()
            .map(|(k, &i)| {
                let view = self.view(&samples[i])?;
                let refusal = self
                    .check
                    .and_then(|c| c.check(&view.image, view.disc_found));
                let Some(a) = self.augment else {
                    return Ok(Loaded {
                        input: Some(network_input(&self.preprocess, &view.image)),
                        teacher: self.teacher.as_ref().map(|t| network_input(t, &view.image)),
                        refusal,
                        quality: None,
                    });
                };
                let mut rng = ChaCha8Rng::seed_from_u64(
                    self.seed ^ batch_no.wrapping_mul(1_000_003) ^ (k as u64) << 40,
                );
                let img = a.apply(&view.image, self.input_side() as u32, &mut rng);
                let own_ungradable = ungradable(i);
                // A photograph labelled ungradable always teaches quality: it teaches nothing
                // else.
                let quality = teach.filter(|q| own_ungradable || rng.random::<f32>() < q.share);
                let input = (teach.is_none() || !own_ungradable)
                    .then(|| network_input(&self.preprocess, &img));
                let teacher = input
                    .as_ref()
                    .and(self.teacher.as_ref())
                    .map(|t| network_input(t, &img));
                let quality = quality.map(|q| {
                    let own = samples[i].labels.get(&self.heads[q.head]).copied();
                    if !q.degradations.is_empty() && rng.random::<f32>() < q.fraction {
                        let (d, class) = q.degradations[rng.random_range(0..q.degradations.len())];
                        // Preprocessing runs again on the degraded view, as it would on a
                        // degraded photograph (a dark frame loses its disc, a cut one
                        // recentres).
                        let degraded = self.preprocess.crop_and_resize(&d.apply(&img, &mut rng));
                        (self.preprocess.normalise(&degraded), class as f32)
                    } else {
                        // The same view as the clinical batch's, normalised once.
                        let x = input
                            .clone()
                            .unwrap_or_else(|| network_input(&self.preprocess, &img));
                        (x, own.unwrap_or(0.0))
                    }
                });
                Ok(Loaded {
                    input,
                    teacher,
                    refusal,
                    quality,
                })
            })
            .collect();
        let s = self.preprocess.image_size;
        let mut images = Vec::with_capacity(idx.len() * 3 * s * s);
        let mut targets = vec![Vec::with_capacity(idx.len()); self.heads.len()];
        let mut bad = Vec::new();
        let mut refusals = Vec::with_capacity(idx.len());
        let mut teacher_images = Vec::new();
        let mut quality = teach.map(|_| QualityBatch::default());
        for (r, &i) in per.into_iter().zip(idx) {
            let l = match r {
                Ok(l) => l,
                Err(e) if self.skip_bad => {
                    bad.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let (Some(qb), Some((x, label))) = (&mut quality, l.quality) {
                qb.images.extend_from_slice(&x);
                qb.labels.push(label);
            }
            let Some(input) = l.input else { continue };
            images.extend_from_slice(&input);
            if let Some(t) = l.teacher {
                teacher_images.extend_from_slice(&t);
            }
            refusals.push(l.refusal);
            let refused = ungradable(i);
            for (h, (t, name)) in targets.iter_mut().zip(&self.heads).enumerate() {
                let label = samples[i].labels.get(name).copied();
                let label = match &self.quality {
                    // Taught from the quality batch alone.
                    Some(q) if teach.is_some() && h == q.head => None,
                    // What an ungradable photograph shows cannot be trusted.
                    Some(q) if refused && h != q.head => None,
                    _ => label,
                };
                t.push(label);
            }
        }
        let n = images.len() / (3 * s * s);
        Ok(HostBatch {
            images,
            targets,
            n,
            bad,
            refusals,
            quality,
            teacher_images,
        })
    }

    /// Starts a background thread that loads the batches of `order` (in chunks of
    /// `batch_size`) ahead of the trainer, at most `prefetch` batches in flight.
    pub fn spawn(
        self,
        samples: Arc<Vec<Sample>>,
        order: Vec<usize>,
        batch_size: usize,
        prefetch: usize,
        first_batch_no: u64,
    ) -> Receiver<LoadResult> {
        let batches = order
            .chunks(batch_size)
            .enumerate()
            .map(|(b, chunk)| (first_batch_no + b as u64, chunk.to_vec()))
            .collect();
        self.spawn_batches(samples, batches, prefetch)
    }

    /// Like [`spawn`](Self::spawn), for batches given one by one with the number that seeds
    /// each one's augmentation (a rank's micro-batches of the global batches; empty ones
    /// give an empty batch, so every rank yields the same number).
    pub fn spawn_batches(
        self,
        samples: Arc<Vec<Sample>>,
        batches: Vec<(u64, Vec<usize>)>,
        prefetch: usize,
    ) -> Receiver<LoadResult> {
        let (tx, rx): (SyncSender<LoadResult>, _) = sync_channel(prefetch.max(1));
        std::thread::spawn(move || {
            for (batch_no, idx) in batches {
                let r = self.load_batch(&samples, &idx, batch_no);
                let stop = r.is_err();
                if tx.send(r).is_err() || stop {
                    break;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sample(i: usize, grade: usize, patient: Option<&str>) -> Sample {
        Sample {
            image: PathBuf::from(format!("{i}.png")),
            labels: BTreeMap::from([("diagnosis".to_string(), grade as f32)]),
            patient: patient.map(str::to_string),
            line: i + 2,
        }
    }

    #[test]
    fn split_is_stratified_and_keeps_patients_together() {
        let mut samples = Vec::new();
        for p in 0..200 {
            let g = if p % 10 == 0 { 3 } else { 0 };
            samples.push(sample(2 * p, g, Some(&format!("p{p}"))));
            samples.push(sample(2 * p + 1, g, Some(&format!("p{p}"))));
        }
        let (train, val) = split(&samples, 0.2, 1);
        assert_eq!(train.len() + val.len(), 400);
        let val_patients: std::collections::HashSet<_> =
            val.iter().map(|s| s.patient.clone()).collect();
        assert!(
            train.iter().all(|s| !val_patients.contains(&s.patient)),
            "a patient straddles the split"
        );
        let rare_val = val.iter().filter(|s| s.grade() == Some(3)).count();
        assert_eq!(rare_val, 8, "20% of the 20 grade-3 patients, both eyes");
        assert_eq!(split(&samples, 0.2, 1).1, val, "deterministic");
    }

    #[test]
    fn balanced_sampling_evens_out_grades() {
        let samples: Vec<Sample> = (0..1000)
            .map(|i| sample(i, if i < 950 { 0 } else { 4 }, None))
            .collect();
        let order = epoch_order(&samples, Sampling::Balanced, 3, 0);
        let rare = order.iter().filter(|&&i| i >= 950).count();
        assert!((400..600).contains(&rare), "{rare}");
        let plain = epoch_order(&samples, Sampling::Shuffle, 3, 0);
        let mut sorted = plain.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    }

    /// Rotation by up to 20° and nothing else.
    fn rotating() -> Augment {
        Augment {
            rotation: 20.0,
            ..Augment::none()
        }
    }

    /// Peak brightening of a thin vertical line after a rotation, averaged over seeds.
    fn line_peak(view: &RgbImage, out: u32) -> f32 {
        let rotate = rotating();
        let seeds = 8;
        let mut total = 0.0;
        for seed in 0..seeds {
            let img = rotate.apply(view, out, &mut ChaCha8Rng::seed_from_u64(seed));
            // Rows away from the top and bottom, where the line runs whole.
            let peak = (out / 4..3 * out / 4)
                .map(|y| (0..out).map(|x| img.get_pixel(x, y)[1]).max().unwrap())
                .map(|v| v as f32 - 100.0)
                .sum::<f32>()
                / (out / 2) as f32;
            total += peak;
        }
        total / seeds as f32
    }

    #[test]
    fn a_rotation_keeps_a_line_half_a_pixel_wide() {
        // A 1-pixel line in a view at twice the output's size: half an output pixel wide.
        let line = |side: u32| {
            RgbImage::from_fn(side, side, |x, _| {
                image::Rgb(if x == side / 2 - 1 {
                    [250, 250, 250]
                } else {
                    [100, 100, 100]
                })
            })
        };
        let view = line(64);
        let supersampled = line_peak(&view, 32);
        // What rotating at the output's own size leaves of it (the earlier pipeline).
        let small = image::imageops::resize(&view, 32, 32, image::imageops::FilterType::Triangle);
        let resized_first = line_peak(&small, 32);
        // Half a pixel of +150 holds +75 of a pixel's area; sampling at the finer grid keeps
        // most of it, interpolating twice does not.
        assert!(supersampled > 45.0, "{supersampled}");
        assert!(
            supersampled > 1.3 * resized_first,
            "supersampled {supersampled}, resized then rotated {resized_first}"
        );
        // Every row keeps the line's whole area (about 75 / cos of the angle; the rows of the
        // central square, inside the field at any rotation): one sample a
        // pixel from the fine grid would hit the line in some rows and miss it in others.
        let rotate = rotating();
        for seed in 0..8 {
            let img = rotate.apply(&view, 32, &mut ChaCha8Rng::seed_from_u64(seed));
            let rows: Vec<f32> = (8..24)
                .map(|y| (8..24).map(|x| img.get_pixel(x, y)[1] as f32 - 100.0).sum())
                .collect();
            let (lo, hi) = rows
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &r| (a.min(r), b.max(r)));
            assert!(lo > 60.0 && hi < 100.0, "seed {seed}: row sums {rows:?}");
        }
        // The mean brightness is kept: sampling finer must not brighten or darken the image.
        let mean = |img: &RgbImage| {
            let c = img.width() / 4..3 * img.width() / 4;
            let v: Vec<f32> = img
                .enumerate_pixels()
                .filter(|(x, y, _)| c.contains(x) && c.contains(y))
                .map(|(_, _, p)| p[1] as f32)
                .collect();
            v.iter().sum::<f32>() / v.len() as f32
        };
        let big = RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([0, ((x * 7 + y * 3) % 200) as u8, 0])
        });
        let a = rotate.apply(&big, 32, &mut ChaCha8Rng::seed_from_u64(1));
        let b = rotate.apply(
            &image::imageops::resize(&big, 32, 32, image::imageops::FilterType::Triangle),
            32,
            &mut ChaCha8Rng::seed_from_u64(1),
        );
        assert!(
            (mean(&a) - mean(&b)).abs() < 3.0,
            "{} {}",
            mean(&a),
            mean(&b)
        );
    }

    #[test]
    fn the_training_loader_caches_views_at_twice_the_input_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eye.png");
        // A bright disc on black, so preprocessing finds a fundus to crop.
        RgbImage::from_fn(96, 96, |x, y| {
            let (dx, dy) = (x as f32 - 48.0, y as f32 - 48.0);
            image::Rgb(if dx * dx + dy * dy < 40.0 * 40.0 {
                [180, 80, 40]
            } else {
                [0, 0, 0]
            })
        })
        .save(&path)
        .unwrap();
        let samples = vec![Sample {
            image: path.clone(),
            ..sample(0, 0, None)
        }];
        let mut preprocess = retina_model::RetinaConfig::preset("small")
            .unwrap()
            .preprocess;
        preprocess.image_size = 32;
        let spec = |augment: Option<Augment>| LoaderSpec {
            augment,
            cache: Some(Arc::new(ViewCache::default())),
            ..LoaderSpec::plain(preprocess.clone(), vec!["diagnosis".into()])
        };
        let turning = Augment {
            rotation: 10.0,
            ..Augment::default()
        };
        for (augment, side) in [
            (Some(turning), 64),
            (Some(Augment::default()), 32),
            (None, 32),
        ] {
            let spec = spec(augment);
            let batch = spec.load_batch(&samples, &[0], 0).unwrap();
            assert_eq!(batch.images.len(), 3 * 32 * 32, "the network's input size");
            let cache = spec.cache.as_ref().unwrap().views.lock().unwrap();
            assert_eq!(cache[&path].image.dimensions(), (side, side), "{augment:?}");
        }
    }

    #[test]
    fn training_views_are_oversampled_only_for_a_resampling_augmentation() {
        let turning = Augment {
            rotation: 10.0,
            ..Augment::default()
        };
        assert_eq!(Augment::view_side(Some(&turning), 128), 256);
        let zooming = Augment {
            scale: 0.1,
            ..Augment::default()
        };
        assert_eq!(Augment::view_side(Some(&zooming), 128), 256);
        assert_eq!(Augment::view_side(Some(&Augment::default()), 128), 128);
        assert_eq!(Augment::view_side(None, 128), 128);
        let flips_only = Augment {
            flips: true,
            brightness: 0.1,
            ..Augment::none()
        };
        assert_eq!(Augment::view_side(Some(&flips_only), 128), 128);
    }

    #[test]
    fn augmentation_changes_pixels_but_not_size_and_none_is_identity_like() {
        let img = RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, 100])
        });
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let turning = Augment {
            rotation: 20.0,
            scale: 0.08,
            ..Augment::default()
        };
        let a = turning.apply(&img, 32, &mut rng);
        assert_eq!(a.dimensions(), (32, 32));
        assert_ne!(a, img);
        assert_ne!(Augment::default().apply(&img, 32, &mut rng), img);
        assert_eq!(turning.apply(&img, 16, &mut rng).dimensions(), (16, 16));
        let same = Augment::none().apply(&img, 32, &mut rng);
        let diff: i32 = same
            .pixels()
            .zip(img.pixels())
            .map(|(p, q)| (p[0] as i32 - q[0] as i32).abs())
            .max()
            .unwrap();
        assert!(diff <= 1, "{diff}");
    }
}
