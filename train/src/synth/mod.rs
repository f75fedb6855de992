//! A procedural generator of colour fundus photographs with known ground truth.
//!
//! Each image is drawn from its own RNG stream (seed and index), so generation is parallel and
//! the same seed gives the same bytes whatever the thread count.

pub mod render;
pub mod scene;

use crate::dataset::DatasetFormat;
use crate::degrade::{self, Degradation};
use anyhow::{Context, Result, bail};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
pub use render::{Layers, render};
use retina_model::host::write_atomic;
pub use scene::{Scene, Truth};
use std::path::{Path, PathBuf};

/// Grade mix of real screening populations (EyePACS-like): mostly healthy eyes.
pub const SCREENING_MIX: [f32; 5] = [0.73, 0.07, 0.15, 0.025, 0.025];

/// Grade mix of the images `fit --synthetic` generates to train on: enriched for the rare
/// grades, as a curated training set is, and most of all for proliferative eyes. Training draws
/// the grades equally often (`data.sampling = "balanced"`), so the mix sets how many *distinct*
/// eyes of each grade the model sees, not how often it sees each grade. A proliferative eye
/// differs from a moderate or severe one only by its new vessels, a fraction of a pixel wide at
/// 128 px, so it takes the most distinct examples: at 12.5 % (about 200 training eyes) the
/// default fit found 68-77 % of them on 3,000 held-out eyes, at 22.5 % (about 370) more; the
/// figures and commands are in `docs/history.md`.
pub const TRAINING_MIX: [f32; 5] = [0.30, 0.15, 0.20, 0.125, 0.225];

/// `mix` as percentages, `30/15/20/12.5/22.5`.
pub fn mix_percentages(mix: &[f32; 5]) -> String {
    let total: f32 = mix.iter().sum();
    mix.iter()
        .map(|w| {
            let pct = w / total * 100.0;
            // Whole percentages print without decimals; others with at most one.
            let s = format!("{pct:.1}");
            s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Output folder.
    pub out: PathBuf,
    /// Number of images.
    pub count: usize,
    /// Image side in pixels.
    pub size: u32,
    /// Seed.
    pub seed: u64,
    /// Relative frequency of grades 0-4.
    pub grades: [f32; 5],
    /// Fraction of auxiliary labels (vessel growth, fluid) left blank.
    pub missing: f32,
    /// Fraction of images made ungradable (each degradation equally often), labelled in a
    /// `quality` column. 0 writes no such column.
    pub ungradable: f32,
    /// Layout and label file to write.
    pub format: DatasetFormat,
    /// Show a progress bar.
    pub progress: bool,
}

/// The labels written for one image (`None` = left blank as missing).
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenLabels {
    /// Image path relative to the label file.
    pub image: String,
    /// ICDR grade.
    pub diagnosis: u8,
    /// Vessel growth, unless hidden.
    pub vessel_growth: Option<f32>,
    /// Fluid, unless hidden.
    pub fluid: Option<bool>,
    /// The full truth, hidden or not.
    pub truth: Truth,
    /// How the image was made ungradable, if it was.
    pub degradation: Option<Degradation>,
}

/// The RNG of image `index` under `seed` (SplitMix64-style mixing, so neighbouring seeds and
/// indices give unrelated streams).
pub fn image_rng(seed: u64, index: u64, stream: u64) -> ChaCha8Rng {
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

/// Draws the scene of image `index`.
pub fn scene_for(seed: u64, index: u64, size: u32, grades: &[f32; 5]) -> Scene {
    let mut rng = image_rng(seed, index, 0);
    let truth = scene::draw_truth(&mut rng, grades);
    Scene::draw(&mut rng, truth, size)
}

/// Image `index` of a data set: its scene, the rendered photograph (degraded where the
/// options draw it so) and the degradation.
pub fn picture(opts: &SynthOptions, index: u64) -> (Scene, RgbImage, Option<Degradation>) {
    let scene = scene_for(opts.seed, index, opts.size, &opts.grades);
    let mut img = render(&scene, Layers::default());
    let mut rng = image_rng(opts.seed, index, 3);
    let degradation = (rng.random::<f32>() < opts.ungradable).then(|| {
        let d = degrade::draw(&mut rng);
        img = d.apply(&img, &mut rng);
        d
    });
    (scene, img, degradation)
}

fn file_name(format: DatasetFormat, index: usize, seed: u64) -> (String, &'static str) {
    match format {
        DatasetFormat::Native => (format!("synth_{index:05}"), "png"),
        DatasetFormat::Aptos => {
            // APTOS ids are 12 hex digits.
            let id: u64 = image_rng(seed, index as u64, 2).random::<u64>() & 0xFFFF_FFFF_FFFF;
            (format!("{id:012x}"), "png")
        }
        DatasetFormat::Eyepacs => (
            format!(
                "{}_{}",
                10 + index / 2,
                if index.is_multiple_of(2) {
                    "left"
                } else {
                    "right"
                }
            ),
            "jpeg",
        ),
        DatasetFormat::Idrid => (format!("IDRiD_{:03}", index + 1), "jpg"),
        other => unreachable!("synth does not write {other}"),
    }
}

fn encode(img: &RgbImage, ext: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    match ext {
        "png" => image::codecs::png::PngEncoder::new(&mut bytes)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .expect("encoding to memory cannot fail"),
        _ => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 92)
            .encode_image(img)
            .expect("encoding to memory cannot fail"),
    }
    bytes
}

use image::ImageEncoder;

/// Generates the data set; returns the labels written, in order.
pub fn generate(opts: &SynthOptions) -> Result<Vec<WrittenLabels>> {
    if opts.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(32..=4096).contains(&opts.size) {
        bail!("--size must be 32-4096 pixels (got {})", opts.size);
    }
    if !(0.0..=1.0).contains(&opts.missing) {
        bail!(
            "--missing must be a fraction in 0..1 (got {})",
            opts.missing
        );
    }
    if opts.grades.iter().any(|p| *p < 0.0 || !p.is_finite())
        || opts.grades.iter().sum::<f32>() <= 0.0
    {
        bail!("--grades needs five non-negative weights with a positive sum");
    }
    if matches!(opts.format, DatasetFormat::Messidor2 | DatasetFormat::Ddr) {
        bail!("synth writes the native, aptos, eyepacs and idrid formats");
    }
    if !(0.0..=1.0).contains(&opts.ungradable) {
        bail!(
            "--ungradable must be a fraction in 0..1 (got {})",
            opts.ungradable
        );
    }
    if opts.ungradable > 0.0 && opts.format != DatasetFormat::Native {
        bail!(
            "--ungradable needs --format native: the {} format has no image-quality column",
            opts.format
        );
    }
    let image_dir_rel = match opts.format {
        DatasetFormat::Native => "images",
        f => f.default_image_dir(),
    };
    let image_dir = opts.out.join(image_dir_rel);
    std::fs::create_dir_all(&image_dir)
        .with_context(|| format!("cannot create {}", image_dir.display()))?;

    let bar = if opts.progress {
        ProgressBar::new(opts.count as u64).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} images ({per_sec}, {eta} left)")
                .expect("valid template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let labels: Vec<WrittenLabels> = (0..opts.count)
        .into_par_iter()
        .map(|i| -> Result<WrittenLabels> {
            let (scene, img, degradation) = picture(opts, i as u64);
            let (stem, ext) = file_name(opts.format, i, opts.seed);
            let name = format!("{stem}.{ext}");
            let path = image_dir.join(&name);
            write_atomic(&path, &encode(&img, ext))?;
            let mut hide = image_rng(opts.seed, i as u64, 1);
            let t = scene.truth;
            let vessel_growth = (hide.random::<f32>() >= opts.missing).then_some(t.vessel_growth);
            let fluid = (hide.random::<f32>() >= opts.missing).then_some(t.fluid);
            bar.inc(1);
            Ok(WrittenLabels {
                image: if opts.format == DatasetFormat::Native {
                    format!("{image_dir_rel}/{name}")
                } else {
                    stem
                },
                diagnosis: t.grade.index() as u8,
                vessel_growth,
                fluid,
                truth: t,
                degradation,
            })
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    write_label_file(opts, &labels)?;
    Ok(labels)
}

fn write_label_file(opts: &SynthOptions, labels: &[WrittenLabels]) -> Result<()> {
    let mut s = String::new();
    match opts.format {
        DatasetFormat::Native => {
            let quality = opts.ungradable > 0.0;
            s.push_str("image,diagnosis,vessel_growth,fluid");
            s.push_str(if quality { ",quality\n" } else { "\n" });
            for l in labels {
                // A picture with no fundus in it has no retinopathy to label.
                if l.degradation == Some(Degradation::NotFundus) {
                    s.push_str(&format!(
                        "{},,,,{}\n",
                        l.image,
                        Degradation::NotFundus.name()
                    ));
                    continue;
                }
                let vg = l
                    .vessel_growth
                    .map(|v| format!("{v:.4}"))
                    .unwrap_or_default();
                let fl = l.fluid.map(|f| (f as u8).to_string()).unwrap_or_default();
                s.push_str(&format!("{},{},{vg},{fl}", l.image, l.diagnosis));
                if quality {
                    let q = l.degradation.map(Degradation::name).unwrap_or("gradable");
                    s.push_str(&format!(",{q}"));
                }
                s.push('\n');
            }
        }
        DatasetFormat::Aptos => {
            s.push_str("id_code,diagnosis\n");
            for l in labels {
                s.push_str(&format!("{},{}\n", l.image, l.diagnosis));
            }
        }
        DatasetFormat::Eyepacs => {
            s.push_str("image,level\n");
            for l in labels {
                s.push_str(&format!("{},{}\n", l.image, l.diagnosis));
            }
        }
        DatasetFormat::Idrid => {
            // As distributed: trailing spaces in a header cell and trailing empty columns.
            s.push_str("Image name,Retinopathy grade,Risk of macular edema ,,\n");
            for l in labels {
                // IDRiD grades edema risk 0-2: 2 when exudates are near the fovea.
                let risk = match l.fluid {
                    Some(true) => "2",
                    Some(false) => "0",
                    None => "",
                };
                s.push_str(&format!("{},{},{risk},,\n", l.image, l.diagnosis));
            }
        }
        _ => unreachable!("checked in generate"),
    }
    let path = label_path(&opts.out, opts.format);
    write_atomic(&path, s.as_bytes())?;
    Ok(())
}

/// Where `synth` puts the label file for a format.
pub fn label_path(out: &Path, format: DatasetFormat) -> PathBuf {
    out.join(format.default_label_file())
}

/// Tiles images into one picture (for the README's contact sheet).
pub fn contact_sheet(images: &[RgbImage], columns: u32, tile: u32) -> RgbImage {
    let rows = (images.len() as u32).div_ceil(columns);
    let gap = 4;
    let mut sheet = RgbImage::from_pixel(
        columns * (tile + gap) + gap,
        rows * (tile + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (i, img) in images.iter().enumerate() {
        let t = image::imageops::resize(img, tile, tile, image::imageops::FilterType::Triangle);
        let (c, r) = (i as u32 % columns, i as u32 / columns);
        image::imageops::replace(
            &mut sheet,
            &t,
            (gap + c * (tile + gap)) as i64,
            (gap + r * (tile + gap)) as i64,
        );
    }
    sheet
}
