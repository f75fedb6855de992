//! `retina-train bench`: the time of a full training step (forward, all losses, backward,
//! optimizer), measured like `shared/peer/bench.py` does for PyTorch.

use crate::loss::{ClassWeights, HeadLossConfig, HeadTargets, LossConfig};
use anyhow::{Result, anyhow};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use retina_model::{BackendChoice, PreprocessConfig, RetinaConfig};
use serde::Serialize;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Network preset.
    pub preset: String,
    /// Input side.
    pub image_size: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Timed steps (after 2 warm-up steps).
    pub steps: usize,
    /// Backend.
    pub backend: BackendChoice,
    /// Also time the phases of a step, waiting for the device after each (which costs an
    /// asynchronous backend some overlap, so it is off for the headline figure).
    pub phases: bool,
}

/// The result, also printed as JSON with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Preset.
    pub preset: String,
    /// Backend description.
    pub backend: String,
    /// The CPU's model name.
    pub cpu: String,
    /// The convolution kernels' instruction set (`avx512`, `avx2`, `portable`).
    pub isa: &'static str,
    /// Input side.
    pub image_size: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Trainable parameters.
    pub params: usize,
    /// Timed steps.
    pub timed_steps: usize,
    /// Median seconds per step.
    pub median_step_s: f64,
    /// Fastest step.
    pub min_step_s: f64,
    /// Slowest step.
    pub max_step_s: f64,
    /// Images per second at the median step.
    pub train_img_per_s: f64,
    /// Peak resident memory of the process, MiB (host memory; the GPU's is not included).
    pub peak_rss_mib: Option<f64>,
    /// Loss of the first and last step (it should fall on a repeated batch).
    pub first_loss: f32,
    /// Loss of the last step.
    pub last_loss: f32,
    /// Median seconds of each phase, with `phases`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<StepPhases>,
}

/// Where a training step's time goes (medians over the timed steps).
#[derive(Debug, Clone, Serialize)]
pub struct StepPhases {
    /// Forward pass and losses.
    pub forward_s: f64,
    /// Backward pass, gradients gathered per parameter.
    pub backward_s: f64,
    /// Optimizer update.
    pub optimizer_s: f64,
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn lcg_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The loss of the PyTorch reference (shared/peer/model.py).
pub fn reference_loss() -> LossConfig {
    LossConfig::new().with_heads(vec![
        HeadLossConfig::new("diagnosis".into())
            .with_class_weights(ClassWeights::Manual(vec![1.0, 2.0, 2.0, 4.0, 4.0])),
        HeadLossConfig::new("fluid".into())
            .with_weight(0.5)
            .with_pos_weight(Some(5.0)),
        HeadLossConfig::new("vessel_growth".into()).with_weight(0.5),
    ])
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchResult> {
    if opts.batch_size == 0 || opts.steps == 0 {
        anyhow::bail!("--batch-size and --steps must be at least 1");
    }
    let backend = opts.backend.select()?;
    let device = backend.device.clone();
    device.seed(0);
    let ad = device.clone().autodiff();
    let mut config = RetinaConfig::preset(&opts.preset)?;
    // The network the PyTorch peer trains: the preset's trunk and the clinical heads.
    config.heads = retina_model::HeadSpec::clinical_heads();
    config.preprocess.image_size = opts.image_size;
    let mut model = config.init(&ad)?;
    let params = model.parameter_count();
    let loss = reference_loss()
        .init(&config.heads, &|_| None)
        .map_err(|e| anyhow!(e))?;
    // Adam, lr 1e-3, eps 1e-8: the reference optimizer.
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init();
    let (n, s) = (opts.batch_size, opts.image_size);
    let x = Tensor::<4>::from_data(
        TensorData::new(lcg_values(n * 3 * s * s, 1), [n, 3, s, s]),
        &ad,
    );
    let r = lcg_values(3 * n, 2);
    let grades: Vec<Option<f32>> = r[..n]
        .iter()
        .map(|v| Some(((v + 1.0) * 2.5).floor().min(4.0)))
        .collect();
    let fluid: Vec<Option<f32>> = r[n..2 * n]
        .iter()
        .map(|v| Some((*v > 0.0) as u8 as f32))
        .collect();
    let vessel: Vec<Option<f32>> = r[2 * n..].iter().map(|v| Some((v + 1.0) / 2.0)).collect();
    let targets = [
        HeadTargets::from_options(&grades, &ad),
        HeadTargets::from_options(&fluid, &ad),
        HeadTargets::from_options(&vessel, &ad),
    ];
    let mut times = Vec::new();
    let mut phases: [Vec<f64>; 3] = Default::default();
    let mut losses = Vec::new();
    for i in 0..opts.steps + 2 {
        let t0 = Instant::now();
        let mut marks = [0.0; 3];
        let mut mark = |k: usize| {
            if opts.phases {
                // Without the wait an asynchronous backend would only have queued the work.
                let _ = device.sync();
                marks[k] = t0.elapsed().as_secs_f64();
            }
        };
        let out = model.forward(x.clone());
        let l = loss.forward(&model, &out, &targets);
        mark(0);
        let grads = GradientsParams::from_grads(l.total.backward(), &model);
        mark(1);
        model = optim.step(1e-3, model, grads);
        mark(2);
        // Reading the loss waits for the step to finish on asynchronous backends.
        let v: f32 = l.total.into_scalar::<f32>();
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
            for (k, p) in phases.iter_mut().enumerate() {
                p.push(marks[k] - if k == 0 { 0.0 } else { marks[k - 1] });
            }
        }
        losses.push(v);
    }
    let median = |v: &[f64]| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let [fwd, bwd, opt] = &phases;
    let phases = opts.phases.then(|| StepPhases {
        forward_s: median(fwd),
        backward_s: median(bwd),
        optimizer_s: median(opt),
    });
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(BenchResult {
        preset: opts.preset.clone(),
        backend: backend.description,
        cpu: retina_kernels::cpu_model(),
        isa: retina_kernels::active_isa().name(),
        image_size: s,
        batch_size: n,
        params,
        timed_steps: times.len(),
        median_step_s: median,
        min_step_s: sorted[0],
        max_step_s: *sorted.last().expect("at least one step"),
        train_img_per_s: n as f64 / median,
        peak_rss_mib: retina_model::host::peak_rss_mib(),
        first_loss: losses[0],
        last_loss: *losses.last().expect("at least one step"),
        phases,
    })
}

/// What the data pipeline alone sustains: decode, disc crop, resize, augmentation, Graham and
/// normalisation of JPEG photographs, with no training step competing for the cores.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineResult {
    /// Images loaded (each once, no cache).
    pub images: usize,
    /// Side of the generated JPEG photographs.
    pub source_size: u32,
    /// Network input side.
    pub image_size: usize,
    /// Worker threads (rayon).
    pub threads: usize,
    /// Images per second through the loader, decoding the photographs.
    pub pipeline_img_per_s: f64,
    /// The same work with every photograph decoded at full size first (how the loader worked
    /// before scaled decoding), for comparison on the machine at hand.
    pub full_decode_img_per_s: f64,
    /// Photographs per second through `prepare` (decode, crop, resize, write the store).
    pub prepare_img_per_s: f64,
    /// Images per second through the loader reading the prepared store (augmentation and
    /// normalisation still done per image).
    pub store_pipeline_img_per_s: f64,
}

/// Generates `count` EyePACS-layout JPEGs of `source_size` px in a temporary folder (not timed),
/// then times the training loader over them in batches of `batch_size`, augmentation on,
/// cache off: the per-epoch cost when a data set is too large to cache.
pub fn run_pipeline(
    count: usize,
    source_size: u32,
    image_size: usize,
    batch_size: usize,
) -> Result<PipelineResult> {
    use crate::data::{Augment, LoaderSpec};
    use crate::dataset::format::{DatasetFormat, read_labels};
    use crate::synth::{SCREENING_MIX, SynthOptions, generate, label_path};
    if count == 0 || batch_size == 0 {
        anyhow::bail!("--pipeline-images and --batch-size must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let format = DatasetFormat::Eyepacs;
    generate(&SynthOptions {
        out: dir.path().to_path_buf(),
        count,
        size: source_size,
        seed: 7,
        grades: SCREENING_MIX,
        missing: 0.0,
        ungradable: 0.0,
        format,
        progress: false,
    })?;
    let labels = read_labels(
        &label_path(dir.path(), format),
        format,
        None,
        &retina_model::HeadSpec::default_heads(),
    )?;
    let mut preprocess = RetinaConfig::preset("small")?.preprocess;
    preprocess.image_size = image_size;
    let spec = LoaderSpec {
        augment: Some(Augment::default()),
        ..LoaderSpec::plain(
            preprocess,
            vec!["diagnosis".into(), "fluid".into(), "vessel_growth".into()],
        )
    };
    let order: Vec<usize> = (0..labels.samples.len()).collect();
    let time_loader = |spec: &LoaderSpec| -> Result<(usize, f64)> {
        let t0 = Instant::now();
        let mut loaded = 0;
        for (b, idx) in order.chunks(batch_size).enumerate() {
            loaded += spec.load_batch(&labels.samples, idx, b as u64)?.n;
        }
        Ok((loaded, loaded as f64 / t0.elapsed().as_secs_f64()))
    };
    let (loaded, raw) = time_loader(&spec)?;
    let full = {
        use rand::SeedableRng;
        use rayon::prelude::*;
        let pre = &spec.preprocess;
        let augment = Augment::default();
        // Views as training makes them: oversampled for the augmentation's resampling.
        let view_pre = PreprocessConfig {
            image_size: Augment::view_side(Some(&augment), pre.image_size),
            ..pre.clone()
        };
        let t0 = Instant::now();
        for chunk in labels.samples.chunks(batch_size) {
            chunk
                .par_iter()
                .enumerate()
                .try_for_each(|(k, s)| -> Result<()> {
                    let bytes = std::fs::read(&s.image)?;
                    let img = pre.decode(&bytes, "bench")?;
                    let view = view_pre.crop_and_resize(&img.to_rgb8());
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(k as u64);
                    let input = augment.apply(&view, pre.image_size as u32, &mut rng);
                    std::hint::black_box(pre.normalise(&input));
                    Ok(())
                })?;
        }
        labels.samples.len() as f64 / t0.elapsed().as_secs_f64()
    };

    let store_dir = dir.path().join("store");
    let prepared = crate::store::prepare(&crate::store::PrepareOptions {
        labels: label_path(dir.path(), format),
        format,
        images: None,
        out: store_dir.clone(),
        preprocess: spec.preprocess.clone(),
        heads: retina_model::HeadSpec::default_heads(),
        skip_bad_images: false,
        progress: false,
    })?;
    let from_store = LoaderSpec {
        store: Some(std::sync::Arc::new(crate::store::ViewStore::open(
            &store_dir,
        )?)),
        ..spec.clone()
    };
    let (_, stored) = time_loader(&from_store)?;
    Ok(PipelineResult {
        images: loaded,
        source_size,
        image_size,
        threads: rayon::current_num_threads(),
        pipeline_img_per_s: raw,
        full_decode_img_per_s: full,
        prepare_img_per_s: prepared.img_per_s,
        store_pipeline_img_per_s: stored,
    })
}
