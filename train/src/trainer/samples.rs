//! What a run trains and validates on: the samples of its data source, split, and the loader
//! settings for both sets (augmentation, the decoded-image cache).

use super::{DataSource, FitRequest};
use crate::data::{Augment, LoaderSpec, QualityTeaching, ViewCache, split};
use crate::dataset::{DatasetFormat, ImageHashes, LabelFile, Sample, check_images, read_labels};
use crate::store::ViewStore;
use crate::synth::{self, SynthOptions};
use anyhow::{Result, anyhow};
use retina_model::{PreprocessConfig, RetinaConfig};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

/// Most memory the decoded-image cache may take.
const CACHE_BUDGET_BYTES: usize = 4 << 30;

/// The samples of a run.
pub(super) struct Samples {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    /// Rows the label format skipped as ungradable.
    pub ungradable: usize,
    /// Missing image files skipped (with `skip_bad_images`).
    pub missing: usize,
    /// The prepared stores the sets come from, if they do.
    pub stores: Option<(Arc<ViewStore>, Arc<ViewStore>)>,
}

/// Loads the samples of a request and splits off the validation set (unless one is given).
pub(super) fn load(req: &FitRequest, model: &RetinaConfig) -> Result<Samples> {
    let cfg = &req.config;
    let heads = &model.heads;
    match &req.data {
        DataSource::Prepared { dir, val } => {
            let open = |d: &PathBuf| -> Result<Arc<ViewStore>> {
                let s = ViewStore::open(d)?;
                s.check(&model.preprocess)?;
                Ok(Arc::new(s))
            };
            let store = open(dir)?;
            let file = store.label_file(heads)?;
            let ungradable = file.skipped_ungradable;
            let left_out = store.manifest().left_out.len();
            match val {
                Some(v) => {
                    let val_store = open(v)?;
                    let vf = val_store.label_file(heads)?;
                    Ok(Samples {
                        train: file.samples,
                        val: vf.samples,
                        ungradable: ungradable + vf.skipped_ungradable,
                        missing: left_out + val_store.manifest().left_out.len(),
                        stores: Some((store, val_store)),
                    })
                }
                None => {
                    let (train, val) = split(&file.samples, cfg.data.val_fraction, cfg.seed);
                    Ok(Samples {
                        train,
                        val,
                        ungradable,
                        missing: left_out,
                        stores: Some((store.clone(), store)),
                    })
                }
            }
        }
        DataSource::Synthetic {
            n,
            size,
            ungradable,
            grades,
        } => {
            let dir = req.out.join("synthetic");
            let label = synth::label_path(&dir, DatasetFormat::Native);
            if !label.is_file() {
                eprintln!(
                    "generating {n} synthetic images ({size} px) into {}",
                    dir.display()
                );
                synth::generate(&SynthOptions {
                    out: dir.clone(),
                    count: *n,
                    size: *size,
                    seed: cfg.seed,
                    grades: *grades,
                    missing: 0.0,
                    ungradable: *ungradable,
                    format: DatasetFormat::Native,
                    progress: std::io::stderr().is_terminal(),
                })?;
            }
            let file = read_labels(&label, DatasetFormat::Native, None, heads)?;
            let (train, val) = split(&file.samples, cfg.data.val_fraction, cfg.seed);
            Ok(Samples {
                train,
                val,
                ungradable: 0,
                missing: 0,
                stores: None,
            })
        }
        DataSource::Labels {
            path,
            format,
            images,
            val,
        } => {
            let mut file = read_labels(path, *format, images.as_deref(), heads)?;
            let mut missing = 0;
            let keep_present = |f: &mut LabelFile, missing: &mut usize| -> Result<()> {
                if req.skip_bad_images {
                    let before = f.samples.len();
                    f.samples.retain(|s| s.image.is_file());
                    *missing += before - f.samples.len();
                    Ok(())
                } else {
                    check_images(f).map_err(|e| {
                        anyhow!("{e}\nhint: pass --images DIR, or --skip-bad-images to skip it")
                    })
                }
            };
            keep_present(&mut file, &mut missing)?;
            let ungradable = file.skipped_ungradable;
            match val {
                Some(v) => {
                    let mut vf = read_labels(v, *format, images.as_deref(), heads)?;
                    keep_present(&mut vf, &mut missing)?;
                    Ok(Samples {
                        train: file.samples,
                        val: vf.samples,
                        ungradable: ungradable + vf.skipped_ungradable,
                        missing,
                        stores: None,
                    })
                }
                None => {
                    let (train, val) = split(&file.samples, cfg.data.val_fraction, cfg.seed);
                    Ok(Samples {
                        train,
                        val,
                        ungradable,
                        missing,
                        stores: None,
                    })
                }
            }
        }
    }
}

/// Loader settings for training (augmented) and validation (not), sharing one cache of decoded
/// views when it fits the budget. With a distillation `teacher` whose input differs from the
/// model's, training also makes the teacher's input from each view.
pub(super) fn loader_specs(
    req: &FitRequest,
    model: &RetinaConfig,
    data: &Samples,
    teacher: Option<&PreprocessConfig>,
) -> (LoaderSpec, LoaderSpec) {
    let teacher = teacher.cloned();
    if let Some(t) = &teacher {
        let (mine, theirs) = (&model.preprocess, t);
        if (mine.crop_to_disc, mine.disc_threshold, mine.max_dimension)
            != (
                theirs.crop_to_disc,
                theirs.disc_threshold,
                theirs.max_dimension,
            )
        {
            eprintln!(
                "warning: the teacher crops photographs otherwise than the student \
                 (crop_to_disc, disc_threshold, max_dimension); it sees the student's crop"
            );
        }
        if data.stores.is_some() && theirs.image_size > mine.image_size {
            eprintln!(
                "warning: the store holds {} px views; the teacher's {} px input is resized up \
                 from them (train from the label file for views at the teacher's size)",
                mine.image_size, theirs.image_size
            );
        }
    }
    let cfg = &req.config;
    let images = data.train.len() + data.val.len();
    if let Some((train_store, val_store)) = &data.stores {
        // Stored views are read from disk each time (the OS caches what fits): no decoding to
        // save, and no memory to spend on a cache.
        let hashes = Arc::new(ImageHashes::default());
        train_store.record_hashes(&hashes);
        val_store.record_hashes(&hashes);
        let train = LoaderSpec {
            preprocess: model.preprocess.clone(),
            heads: model.heads.iter().map(|h| h.name.clone()).collect(),
            augment: cfg.data.augment,
            skip_bad: req.skip_bad_images,
            cache: None,
            seed: cfg.seed,
            hashes,
            store: Some(train_store.clone()),
            quality: QualityTeaching::for_heads(
                &model.heads,
                cfg.data.quality_share,
                cfg.data.degrade,
            ),
            check: None,
            teacher: teacher.clone(),
        };
        let val = LoaderSpec {
            augment: None,
            teacher: None,
            store: Some(val_store.clone()),
            check: Some(model.gradability()),
            ..train.clone()
        };
        return (train, val);
    }
    // Decoded views cost S*S*3 bytes each; past the budget, decode every epoch instead of
    // exhausting memory on a large data set.
    // Views are made at the larger of the student's and the teacher's input sizes, times the
    // oversampling a resampling augmentation asks for.
    let side = Augment::view_side(
        cfg.data.augment.as_ref(),
        teacher
            .as_ref()
            .map_or(0, |t| t.image_size)
            .max(model.preprocess.image_size),
    );
    let cache_bytes = images * side * side * 3;
    let cache_images = cfg.data.cache_images && cache_bytes <= CACHE_BUDGET_BYTES;
    if cfg.data.cache_images && !cache_images {
        eprintln!(
            "not caching decoded images: they would need {} MiB (budget {} MiB); decoding each epoch",
            cache_bytes >> 20,
            CACHE_BUDGET_BYTES >> 20
        );
    }
    let train = LoaderSpec {
        preprocess: model.preprocess.clone(),
        heads: model.heads.iter().map(|h| h.name.clone()).collect(),
        augment: cfg.data.augment,
        skip_bad: req.skip_bad_images,
        cache: cache_images.then(|| Arc::new(ViewCache::default())),
        seed: cfg.seed,
        hashes: Default::default(),
        store: None,
        quality: QualityTeaching::for_heads(&model.heads, cfg.data.quality_share, cfg.data.degrade),
        check: None,
        teacher,
    };
    let val = LoaderSpec {
        augment: None,
        teacher: None,
        check: Some(model.gradability()),
        ..train.clone()
    };
    (train, val)
}
