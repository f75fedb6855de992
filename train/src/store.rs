//! Prepared data sets: every photograph decoded, disc-cropped and resized once
//! (`retina-train prepare`), into one file of fixed-size views that training reads back with
//! positional reads.
//!
//! Why: a camera-size JPEG costs tens of milliseconds to decode even at a reduced DCT scale,
//! every epoch, while a stored view is one read of `3·S²` bytes. The store holds the view the
//! network sees before augmentation and normalisation (steps 1-3 of the preprocessing); the
//! augmentation resamples that view each epoch, exactly as it does a view decoded from the
//! photograph, and Graham's subtraction and the normalisation are applied after it, so they may
//! change without preparing again.
//!
//! Layout of a store folder:
//! - `store.json`: the manifest, written last and atomically: its presence marks a complete
//!   store. The view settings it was made with, the labels of every kept image with its slot and
//!   content hash, and the images left out with their reasons.
//! - `views.bin`: the views, `S·S·3` bytes of RGB each, slot after slot.
//! - while `prepare` runs, `progress.jsonl`: the settings on its first line, then one line per
//!   image done. Views are appended and synced before their lines, so an interrupted `prepare`
//!   resumes from the last line written and loses nothing.

use crate::dataset::{DatasetFormat, ImageHashes, LabelFile, Sample, check_images, read_labels};
use anyhow::{Context, Result, anyhow, bail};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use retina_model::host::write_atomic;
use retina_model::{HeadSpec, PreprocessConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The manifest's file name; a folder holding it is a prepared store.
pub const MANIFEST: &str = "store.json";
const VIEWS: &str = "views.bin";
const PROGRESS: &str = "progress.jsonl";
const FORMAT_VERSION: u32 = 1;
/// Images decoded between two syncs of the store: the most a crash can cost, and (with the
/// view size) the memory `prepare` holds.
const CHUNK: usize = 32;

/// The preprocessing settings that shape a stored view. The others (Graham's subtraction, mean
/// and standard deviation) act on the view afterwards, so a store serves any value of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewSettings {
    /// Side of the square view, in pixels (the model's input size).
    pub image_size: usize,
    /// Whether the black border around the disc is cropped.
    pub crop_to_disc: bool,
    /// Luminance threshold of the disc.
    pub disc_threshold: f32,
    /// Largest photograph side accepted.
    pub max_dimension: u32,
}

impl ViewSettings {
    /// The view-shaping part of a model's preprocessing.
    pub fn of(p: &PreprocessConfig) -> Self {
        ViewSettings {
            image_size: p.image_size,
            crop_to_disc: p.crop_to_disc,
            disc_threshold: p.disc_threshold,
            max_dimension: p.max_dimension,
        }
    }

    /// What differs from `model`'s, one `name: store X, model Y` entry per setting.
    pub fn differences(&self, model: &ViewSettings) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name}: store {a}, model {b}"));
            }
        };
        check(
            "image_size",
            self.image_size.to_string(),
            model.image_size.to_string(),
        );
        check(
            "crop_to_disc",
            self.crop_to_disc.to_string(),
            model.crop_to_disc.to_string(),
        );
        check(
            "disc_threshold",
            self.disc_threshold.to_string(),
            model.disc_threshold.to_string(),
        );
        check(
            "max_dimension",
            self.max_dimension.to_string(),
            model.max_dimension.to_string(),
        );
        out
    }

    fn view_bytes(&self) -> usize {
        self.image_size * self.image_size * 3
    }
}

/// One stored image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredImage {
    /// The photograph it was made from (as the label file named it, resolved).
    pub image: PathBuf,
    /// Line in the label file.
    pub line: usize,
    /// Labels by head name.
    pub labels: BTreeMap<String, f32>,
    /// Patient, where the format knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// XXH3-128 of the photograph's bytes, hex.
    pub hash: String,
    /// Its place in `views.bin`.
    pub slot: usize,
}

/// An image `prepare` left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeftOut {
    /// The photograph.
    pub image: PathBuf,
    /// Line in the label file.
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// What the first line of `progress.jsonl` and the manifest both record about how a store was
/// made; a resumed `prepare` must ask for the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreOrigin {
    /// The label file's name (not its folder: the store names no machine paths it need not).
    pub label_file: String,
    /// Its format.
    pub format: String,
    /// Number of rows kept by the label reader.
    pub rows: usize,
    /// Hash of the label rows (image names and labels).
    pub labels_hash: String,
    /// The view settings.
    pub view: ViewSettings,
}

/// `store.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreManifest {
    /// Layout version.
    pub format_version: u32,
    /// How it was made.
    pub origin: StoreOrigin,
    /// Head names the labels cover.
    pub heads: Vec<String>,
    /// Kept images, in label-file order.
    pub images: Vec<StoredImage>,
    /// Images left out (`--skip-bad-images`), with reasons.
    pub left_out: Vec<LeftOut>,
    /// Rows the label format marked ungradable.
    pub skipped_ungradable: usize,
}

/// A line of `progress.jsonl` after the first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Done {
    Stored { row: usize, hash: String },
    LeftOut { row: usize, reason: String },
}

/// What `prepare` is asked to do.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Label file.
    pub labels: PathBuf,
    /// Its format.
    pub format: DatasetFormat,
    /// Image folder override.
    pub images: Option<PathBuf>,
    /// The store folder.
    pub out: PathBuf,
    /// The model's preprocessing.
    pub preprocess: PreprocessConfig,
    /// The model's heads (which label columns to read).
    pub heads: Vec<HeadSpec>,
    /// Leave out unreadable photographs (listed with reasons) instead of stopping.
    pub skip_bad_images: bool,
    /// Show a progress bar.
    pub progress: bool,
}

/// What `prepare` did.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareSummary {
    /// The store folder.
    pub out: PathBuf,
    /// Images in the store.
    pub stored: usize,
    /// Images done by an earlier, interrupted run (not redone).
    pub resumed: usize,
    /// Images left out, with reasons.
    pub left_out: Vec<LeftOut>,
    /// Size of the views file.
    pub bytes: u64,
    /// Wall time of this run.
    pub seconds: f64,
    /// Images decoded per second by this run.
    pub img_per_s: f64,
}

fn labels_hash(samples: &[Sample]) -> String {
    use xxhash_rust::xxh3::Xxh3;
    let mut h = Xxh3::new();
    for s in samples {
        h.update(s.image.to_string_lossy().as_bytes());
        h.update(&[0]);
        for (k, v) in &s.labels {
            h.update(k.as_bytes());
            h.update(&v.to_le_bytes());
        }
    }
    format!("xxh3-128:{:032x}", h.digest128())
}

/// Decodes, disc-crops and resizes every image of a label file once, into a store.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let started = Instant::now();
    opts.preprocess
        .validate()
        .map_err(|e| anyhow!("preprocessing: {e}"))?;
    let file = read_labels(
        &opts.labels,
        opts.format,
        opts.images.as_deref(),
        &opts.heads,
    )?;
    if !opts.skip_bad_images {
        check_images(&file).map_err(|e| {
            anyhow!("{e}\nhint: pass --images DIR, or --skip-bad-images to leave it out")
        })?;
    }
    let out = &opts.out;
    if out.join(MANIFEST).is_file() {
        bail!(
            "{} is already a complete store; choose another --out (or delete it to prepare again)",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let view = ViewSettings::of(&opts.preprocess);
    let origin = StoreOrigin {
        label_file: file
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format: opts.format.to_string(),
        rows: file.samples.len(),
        labels_hash: labels_hash(&file.samples),
        view: view.clone(),
    };
    let (mut done, resumed) = resume_point(out, &origin)?;
    let stride = view.view_bytes();
    let slots = done
        .iter()
        .filter(|d| matches!(d, Done::Stored { .. }))
        .count();
    let views = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(out.join(VIEWS))
        .with_context(|| format!("cannot open {}", out.join(VIEWS).display()))?;
    // Views past the last recorded line belong to a chunk that did not finish: drop them.
    views.set_len((slots * stride) as u64)?;
    let mut views = std::io::BufWriter::new(views);
    use std::io::Seek;
    views.seek(std::io::SeekFrom::End(0))?;
    let mut progress = OpenOptions::new()
        .append(true)
        .open(out.join(PROGRESS))
        .with_context(|| format!("cannot open {}", out.join(PROGRESS).display()))?;

    let bar = if opts.progress {
        ProgressBar::new(file.samples.len() as u64).with_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} photographs ({per_sec}, {eta} left)",
            )
            .expect("valid template"),
        )
    } else {
        ProgressBar::hidden()
    };
    bar.set_position(resumed as u64);
    let todo: Vec<usize> = (resumed..file.samples.len()).collect();
    for chunk in todo.chunks(CHUNK) {
        let results: Vec<(usize, Result<StoredView, String>)> = chunk
            .par_iter()
            .map(|&row| (row, prepare_one(&opts.preprocess, &file.samples[row].image)))
            .collect();
        let mut lines = String::new();
        for (row, r) in results {
            let d = match r {
                Ok((pixels, hash)) => {
                    views.write_all(&pixels)?;
                    Done::Stored {
                        row,
                        hash: format!("{hash:032x}"),
                    }
                }
                Err(reason) if opts.skip_bad_images => Done::LeftOut { row, reason },
                Err(reason) => {
                    // Keep what this chunk did before the bad image.
                    finish_chunk(&mut views, &mut progress, &lines)?;
                    let s = &file.samples[row];
                    bail!(
                        "{}:{}: {reason}\nhint: --skip-bad-images leaves such images out (listed \
                         in the store); run the same command again to resume where this stopped",
                        file.path.display(),
                        s.line
                    );
                }
            };
            lines.push_str(&serde_json::to_string(&d)?);
            lines.push('\n');
            done.push(d);
            bar.inc(1);
        }
        finish_chunk(&mut views, &mut progress, &lines)?;
    }
    bar.finish_and_clear();
    drop(views);

    let mut images = Vec::new();
    let mut left_out = Vec::new();
    for d in &done {
        match d {
            Done::Stored { row, hash } => {
                let s = &file.samples[*row];
                images.push(StoredImage {
                    image: s.image.clone(),
                    line: s.line,
                    labels: s.labels.clone(),
                    patient: s.patient.clone(),
                    hash: hash.clone(),
                    slot: images.len(),
                });
            }
            Done::LeftOut { row, reason } => {
                let s = &file.samples[*row];
                left_out.push(LeftOut {
                    image: s.image.clone(),
                    line: s.line,
                    reason: reason.clone(),
                });
            }
        }
    }
    let stored = images.len();
    let manifest = StoreManifest {
        format_version: FORMAT_VERSION,
        origin,
        heads: opts.heads.iter().map(|h| h.name.clone()).collect(),
        images,
        left_out: left_out.clone(),
        skipped_ungradable: file.skipped_ungradable,
    };
    write_atomic(
        &out.join(MANIFEST),
        serde_json::to_string(&manifest)?.as_bytes(),
    )?;
    std::fs::remove_file(out.join(PROGRESS)).ok();
    let seconds = started.elapsed().as_secs_f64();
    Ok(PrepareSummary {
        out: out.clone(),
        stored,
        resumed,
        left_out,
        bytes: (stored * stride) as u64,
        seconds,
        img_per_s: (file.samples.len() - resumed) as f64 / seconds.max(1e-9),
    })
}

/// Reads (or starts) `progress.jsonl`: the images already done and how many rows that covers.
fn resume_point(out: &Path, origin: &StoreOrigin) -> Result<(Vec<Done>, usize)> {
    let path = out.join(PROGRESS);
    if !path.is_file() {
        if out.join(VIEWS).exists() {
            bail!(
                "{} holds a views file but no progress record: not a store this version can \
                 resume; choose another --out",
                out.display()
            );
        }
        let mut f = File::create(&path)?;
        writeln!(f, "{}", serde_json::to_string(origin)?)?;
        f.sync_all()?;
        return Ok((Vec::new(), 0));
    }
    let mut lines = BufReader::new(File::open(&path)?).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let was: StoreOrigin = serde_json::from_str(&first).with_context(|| {
        format!(
            "{}:1: not a progress record of `retina-train prepare`",
            path.display()
        )
    })?;
    if &was != origin {
        let mut why = was.view.differences(&origin.view);
        if was.labels_hash != origin.labels_hash || was.rows != origin.rows {
            why.push(format!(
                "labels: the store was started from {} ({} rows), now {} ({} rows) with other content",
                was.label_file, was.rows, origin.label_file, origin.rows
            ));
        }
        bail!(
            "{} holds an interrupted store made with other settings ({}); resume it with the \
             same command, or choose another --out",
            out.display(),
            why.join("; ")
        );
    }
    let mut done = Vec::new();
    let mut good_bytes = first.len() + 1;
    for line in lines {
        let line = line?;
        // A line cut short by the interruption is redone.
        let Ok(d) = serde_json::from_str::<Done>(&line) else {
            break;
        };
        good_bytes += line.len() + 1;
        done.push(d);
    }
    // Drop a torn last line so appended lines start clean.
    OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(good_bytes as u64)?;
    let rows = done.len();
    Ok((done, rows))
}

/// Makes a chunk durable: views first, then the lines that point at them.
fn finish_chunk(
    views: &mut std::io::BufWriter<File>,
    progress: &mut File,
    lines: &str,
) -> Result<()> {
    views.flush()?;
    views.get_ref().sync_data()?;
    progress.write_all(lines.as_bytes())?;
    progress.sync_data()?;
    Ok(())
}

/// A view's pixels and its photograph's content hash.
type StoredView = (Vec<u8>, u128);

fn prepare_one(pre: &PreprocessConfig, path: &Path) -> Result<StoredView, String> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {name}: {e}"))?;
    let hash = xxhash_rust::xxh3::xxh3_128(&bytes);
    let view = pre
        .view_from_bytes(&bytes, &name)
        .map_err(|e| e.to_string())?;
    Ok((view.image.into_raw(), hash))
}

/// A prepared store opened for reading.
#[derive(Debug)]
pub struct ViewStore {
    dir: PathBuf,
    manifest: StoreManifest,
    views: File,
    slots: HashMap<PathBuf, usize>,
}

impl ViewStore {
    /// Whether `path` is a prepared store's folder.
    pub fn is_store(path: &Path) -> bool {
        path.join(MANIFEST).is_file()
    }

    /// Opens a store, checking that its views file is whole.
    pub fn open(dir: &Path) -> Result<ViewStore> {
        let mpath = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&mpath)
            .with_context(|| format!("cannot read {}", mpath.display()))?;
        let manifest: StoreManifest = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}:{}:{}: not a store manifest: {e}",
                mpath.display(),
                e.line(),
                e.column()
            )
        })?;
        if manifest.format_version != FORMAT_VERSION {
            bail!(
                "{}: store format {} (this build reads {FORMAT_VERSION}); prepare it again",
                mpath.display(),
                manifest.format_version
            );
        }
        let vpath = dir.join(VIEWS);
        let views =
            File::open(&vpath).with_context(|| format!("cannot open {}", vpath.display()))?;
        let want = (manifest.images.len() * manifest.origin.view.view_bytes()) as u64;
        let have = views.metadata()?.len();
        if have != want {
            bail!(
                "{}: {have} bytes where the manifest needs {want}: the store is damaged; \
                 prepare it again",
                vpath.display()
            );
        }
        let slots = manifest
            .images
            .iter()
            .map(|i| (i.image.clone(), i.slot))
            .collect();
        Ok(ViewStore {
            dir: dir.to_path_buf(),
            manifest,
            views,
            slots,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &StoreManifest {
        &self.manifest
    }

    /// Refuses a store whose views were made with other settings than the model's, naming
    /// each difference.
    pub fn check(&self, model: &PreprocessConfig) -> Result<()> {
        let diff = self
            .manifest
            .origin
            .view
            .differences(&ViewSettings::of(model));
        if !diff.is_empty() {
            bail!(
                "the store {} was prepared with other preprocessing than the model's: {}\n\
                 hint: prepare it again with the model's settings (`retina-train prepare \
                 --image-size {} ...`)",
                self.dir.display(),
                diff.join("; "),
                model.image_size
            );
        }
        Ok(())
    }

    /// The stored images as samples, in label-file order.
    pub fn label_file(&self, heads: &[HeadSpec]) -> Result<LabelFile> {
        for h in heads {
            if !self.manifest.heads.contains(&h.name) {
                bail!(
                    "the store {} has no labels for the model's head `{}` (it has {}); prepare \
                     it again with the model's config",
                    self.dir.display(),
                    h.name,
                    self.manifest.heads.join(", ")
                );
            }
        }
        Ok(LabelFile {
            path: self.dir.join(MANIFEST),
            format: DatasetFormat::Native,
            samples: self
                .manifest
                .images
                .iter()
                .map(|i| Sample {
                    image: i.image.clone(),
                    labels: i.labels.clone(),
                    patient: i.patient.clone(),
                    line: i.line,
                })
                .collect(),
            skipped_ungradable: self.manifest.skipped_ungradable,
        })
    }

    /// Fills `hashes` with the photographs' recorded content hashes.
    pub fn record_hashes(&self, hashes: &ImageHashes) {
        for i in &self.manifest.images {
            if let Ok(h) = u128::from_str_radix(&i.hash, 16) {
                hashes.insert(&i.image, h);
            }
        }
    }

    /// The stored view of `image`, read from disk (the OS caches what fits).
    pub fn view(&self, image: &Path) -> Result<RgbImage, String> {
        let slot = *self.slots.get(image).ok_or_else(|| {
            format!(
                "{} is not in the store {}",
                image.display(),
                self.dir.display()
            )
        })?;
        let side = self.manifest.origin.view.image_size;
        let stride = side * side * 3;
        let mut buf = vec![0u8; stride];
        read_at(&self.views, &mut buf, (slot * stride) as u64)
            .map_err(|e| format!("{}: cannot read slot {slot}: {e}", self.dir.display()))?;
        Ok(RgbImage::from_raw(side as u32, side as u32, buf).expect("stride matches the side"))
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(windows)]
fn read_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match f.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}
