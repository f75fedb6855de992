//! Command-line interface of `retina-train`: every flag in one place.

use crate::bench;
use crate::config::{Overrides, Set};
use crate::dataset::DatasetFormat;
use crate::store::{self, ViewStore};
use crate::synth::{self, SynthOptions};
use crate::trainer::{self, DataSource, FitRequest, Resume};
use crate::util::parse_grade_mix;
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use retina_model::burn::prelude::Device;
use retina_model::host::write_atomic;
use retina_model::{BackendChoice, BundleMetadata, ModelBundle, RetinaConfig};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Train, evaluate and generate data for the Retina diabetic-retinopathy screening network.
#[derive(Parser, Debug)]
#[command(name = "retina-train", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model on a labelled data set (or on generated images with --synthetic N).
    Fit(Box<FitArgs>),
    /// Train a student network with losses between it and a trained teacher bundle (the
    /// teacher's diagnosis logits, its binary heads' probabilities and a stage's features; the
    /// weights and the temperature in the config's [distill]) as well as the labels; takes
    /// every flag of `fit`.
    Distill(Box<DistillArgs>),
    /// Decode, disc-crop and resize every photograph of a label file once, into a store that
    /// `fit --data STORE` trains from without decoding again (resumes if interrupted).
    Prepare(PrepareArgs),
    /// Time full training steps (forward, losses, backward, optimizer).
    Bench(BenchArgs),
    /// Evaluate a model bundle on a labelled set: metrics.json, report.md and figures.
    Eval(EvalArgs),
    /// Choose decision thresholds on a validation set and store them in the bundle.
    Calibrate(CalibrateArgs),
    /// Generate synthetic fundus photographs with known labels.
    Synth(SynthArgs),
    /// Write a bundle's weights as a PyTorch-layout safetensors file.
    ExportTorch {
        /// Model bundle directory.
        #[arg(long)]
        model: PathBuf,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a bundle from PyTorch-layout safetensors weights of a preset network.
    ImportTorch {
        /// PyTorch-layout .safetensors file (a `state_dict` of the matching network).
        #[arg(long)]
        weights: PathBuf,
        /// The architecture the weights belong to.
        #[arg(long, default_value = "reference")]
        preset: String,
        /// Output bundle directory.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct FitArgs {
    /// Label file of the training data, or a store made by `retina-train prepare`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Format of the label file: native, aptos, eyepacs, idrid, messidor2, ddr [default: native].
    #[arg(long)]
    format: Option<DatasetFormat>,
    /// Image folder (default: the format's usual folder beside the label file).
    #[arg(long)]
    images: Option<PathBuf>,
    /// A separate validation label file, or store (instead of splitting the training data).
    #[arg(long)]
    val: Option<PathBuf>,
    /// Train on N generated images instead of a data set (the embedded default).
    #[arg(long, conflicts_with = "data")]
    synthetic: Option<usize>,
    /// Side of the generated images [default: 256].
    #[arg(long)]
    synthetic_size: Option<u32>,
    /// Fraction of the generated images made ungradable, labelled for the quality head
    /// (see `synth --ungradable`) [default: 0].
    #[arg(long)]
    synthetic_ungradable: Option<f32>,
    /// Relative frequency of grades 0-4 in the generated images [default: 30,15,20,12.5,22.5,
    /// enriched for the rare grades; `73,7,15,2.5,2.5` is a screening population].
    #[arg(long, value_parser = parse_grade_mix, value_name = "MIX")]
    synthetic_grades: Option<[f32; 5]>,
    /// Run directory: checkpoints, metrics.jsonl, and the exported bundle in RUN_DIR/model.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint. Settings that may change
    /// mid-run (epochs, batch size, learning rate, schedule, clipping, select_metric,
    /// data.cache_images) can be given and are recorded in run.json; others are refused.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Training config (TOML); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Set a config key: a dotted TOML path and a TOML value, else a string
    /// (`--set optimizer.learning_rate=1e-3 --set data.sampling=balanced`). Repeatable; applied
    /// after --config and the shorthand flags.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Set>,
    /// Print the resolved config (file, then flags) as TOML and exit without training.
    #[arg(long)]
    print_config: bool,
    /// Network preset: small, reference, resnet18 (`--set model.preset=...`).
    #[arg(long)]
    preset: Option<String>,
    /// Epochs (`--set epochs=...`).
    #[arg(long)]
    epochs: Option<usize>,
    /// Input size in pixels (`--set model.image_size=...`).
    #[arg(long)]
    image_size: Option<usize>,
    /// Batch size (`--set batch_size=...`).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate (`--set optimizer.learning_rate=...`).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Backend: cpu, wgpu, auto (also flex, ndarray) [default: cpu; on --resume, the run's].
    #[arg(long)]
    backend: Option<String>,
    /// Seed (`--set seed=...`).
    #[arg(long)]
    seed: Option<u64>,
    /// Skip unreadable or missing images (counted in the summary) instead of failing.
    #[arg(long)]
    skip_bad_images: bool,
}

impl FitArgs {
    /// The config changes the flags ask for: the file, the shorthands, then `--set`.
    fn overrides(&self) -> Result<Overrides> {
        let mut o = Overrides {
            file: self.config.clone(),
            sets: Vec::new(),
        };
        let int = |v: usize| i64::try_from(v).context("value too large");
        if let Some(v) = &self.preset {
            o = o.set("model.preset", v.as_str());
        }
        if let Some(v) = self.epochs {
            o = o.set("epochs", int(v)?);
        }
        if let Some(v) = self.image_size {
            o = o.set("model.image_size", int(v)?);
        }
        if let Some(v) = self.batch_size {
            o = o.set("batch_size", int(v)?);
        }
        if let Some(v) = self.learning_rate {
            o = o.set("optimizer.learning_rate", v);
        }
        if let Some(v) = self.seed {
            o = o.set("seed", i64::try_from(v).context("--seed too large")?);
        }
        o.sets.extend(self.set.iter().cloned());
        Ok(o)
    }

    /// Flags that describe the data of a new run, which a resumed run cannot change.
    fn data_flags(&self) -> Vec<&'static str> {
        [
            ("--data", self.data.is_some()),
            ("--synthetic", self.synthetic.is_some()),
            ("--synthetic-size", self.synthetic_size.is_some()),
            (
                "--synthetic-ungradable",
                self.synthetic_ungradable.is_some(),
            ),
            ("--synthetic-grades", self.synthetic_grades.is_some()),
            ("--format", self.format.is_some()),
            ("--images", self.images.is_some()),
            ("--val", self.val.is_some()),
            ("--skip-bad-images", self.skip_bad_images),
            ("--out", self.out.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, given)| given.then_some(f))
        .collect()
    }
}

#[derive(clap::Args, Debug)]
struct DistillArgs {
    /// The teacher: a model bundle (a run's `model` directory). Its input size and
    /// preprocessing may differ from the student's; it sees the same augmented views.
    #[arg(long, required_unless_present = "resume")]
    teacher: Option<PathBuf>,
    #[command(flatten)]
    fit: FitArgs,
}

/// A labelled image set: label file, its format and the image folder.
#[derive(clap::Args, Debug)]
struct LabelSet {
    /// Label file.
    #[arg(long)]
    data: PathBuf,
    /// Format of the label file: native, aptos, eyepacs, idrid, messidor2, ddr.
    #[arg(long, default_value = "native")]
    format: DatasetFormat,
    /// Image folder (default: the format's usual folder beside the label file).
    #[arg(long)]
    images: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct PrepareArgs {
    /// The photographs and their labels.
    #[command(flatten)]
    set: LabelSet,
    /// Store folder (resumed when it holds an interrupted run of the same command).
    #[arg(long)]
    out: PathBuf,
    /// Training config (TOML) whose [model] section sets the preprocessing and heads.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Set a config key, as for `fit` (`--set model.preprocess.crop_to_disc=false`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<Set>,
    /// Network preset whose preprocessing to use (`--set model.preset=...`).
    #[arg(long)]
    preset: Option<String>,
    /// Input size in pixels: the side of the stored views (`--set model.image_size=...`).
    #[arg(long)]
    image_size: Option<usize>,
    /// Leave out unreadable photographs (listed in the store with reasons) instead of stopping.
    #[arg(long)]
    skip_bad_images: bool,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Model bundle directory.
    #[arg(long)]
    model: PathBuf,
    /// The (test) set.
    #[command(flatten)]
    set: LabelSet,
    /// Report folder.
    #[arg(long)]
    out: PathBuf,
    /// Operating point to report sensitivity and specificity at (default: the bundle's).
    #[arg(long)]
    point: Option<String>,
    /// Backend: cpu, wgpu, auto.
    #[arg(long, default_value = "cpu")]
    backend: BackendChoice,
}

#[derive(clap::Args, Debug)]
struct CalibrateArgs {
    /// Model bundle directory (updated in place, atomically).
    #[arg(long)]
    model: PathBuf,
    /// The validation set (never the test set).
    #[command(flatten)]
    set: LabelSet,
    /// sensitivity=0.95, specificity=0.98 or youden.
    #[arg(long)]
    target: crate::eval::Target,
    /// Name of the operating point (default: screening for a sensitivity target, confirmation
    /// for a specificity target, youden).
    #[arg(long)]
    name: Option<String>,
    /// Afterwards make this operating point the bundle's default (the one used when none is
    /// named). Without it, the first calibrated point of a bundle that has only the
    /// uncalibrated one becomes the default.
    #[arg(long, value_name = "NAME")]
    default: Option<String>,
    /// Backend: cpu, wgpu, auto.
    #[arg(long, default_value = "cpu")]
    backend: BackendChoice,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Network preset.
    #[arg(long, default_value = "reference")]
    preset: String,
    /// Input size.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Batch size.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Backend: cpu, wgpu, flex, ndarray.
    #[arg(long, default_value = "cpu")]
    backend: BackendChoice,
    /// Time the data pipeline instead (decode, crop, augment, normalise), on this many
    /// generated JPEG photographs.
    #[arg(long, value_name = "IMAGES")]
    pipeline: Option<usize>,
    /// Side of the generated photographs for --pipeline.
    #[arg(long, default_value_t = 1024)]
    source_size: u32,
    /// Also report the median forward, backward and optimizer time of a step (waits for the
    /// device between them).
    #[arg(long)]
    phases: bool,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct SynthArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Random seed; the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Relative frequency of grades 0-4 (default: a screening population, 73/7/15/2.5/2.5 %).
    #[arg(long, value_parser = parse_grade_mix)]
    grades: Option<[f32; 5]>,
    /// Fraction of auxiliary labels (vessel_growth, fluid) to leave blank.
    #[arg(long, default_value_t = 0.0)]
    missing: f32,
    /// Fraction of images to make ungradable (blur, under- or over-exposure, a clipped field,
    /// lashes, or no fundus at all; each equally often), labelled in a `quality` column
    /// (native format only).
    #[arg(long, default_value_t = 0.0)]
    ungradable: f32,
    /// Layout and label file: native, aptos, eyepacs or idrid.
    #[arg(long, default_value = "native")]
    format: DatasetFormat,
    /// Also write a contact sheet of the images to this PNG.
    #[arg(long)]
    contact_sheet: Option<PathBuf>,
}

/// Runs the CLI; errors are printed as `error: ...` with their causes. Exit status, as for
/// `retina-infer`: 0 done, 2 a usage or fatal error (clap's own usage errors exit 2 too).
pub fn main() -> ExitCode {
    retina_kernels::allocator::keep_freed_memory();
    retina_kernels::startup::quiet_vulkan_layers();
    let cli = Cli::parse();
    pin_default_device(&cli);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // Reported already, by rank 0 before the ranks parted (`distributed::together`).
        Err(e) if e.is::<crate::distributed::Quiet>() || e.is::<crate::distributed::AllRanks>() => {
            ExitCode::from(2)
        }
        Err(e) => {
            crate::util::report_error(&e);
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fit(a) => fit(*a, None),
        Command::Distill(a) => {
            let DistillArgs { teacher, fit: f } = *a;
            if let (Some(_), Some(dir)) = (&teacher, &f.resume) {
                bail!(
                    "--teacher cannot be used with --resume: the run keeps its teacher (see {})",
                    dir.join("run.json").display()
                );
            }
            fit(f, teacher)
        }
        Command::Prepare(a) => prepare(a),
        Command::Eval(a) => {
            let m = crate::eval::evaluate(
                &a.model,
                &a.set.data,
                a.set.format,
                a.set.images.as_deref(),
                &a.out,
                a.point.as_deref(),
                a.backend,
            )?;
            eprintln!("wrote {}/metrics.json and report.md", a.out.display());
            println!("{}", serde_json::to_string_pretty(&m)?);
            Ok(())
        }
        Command::Calibrate(a) => {
            // Check `--default` before anything is written: a run that fails changes nothing.
            if let Some(d) = &a.default {
                let writes = a.name.as_deref().unwrap_or(a.target.default_name());
                if d != writes {
                    BundleMetadata::load(&a.model)?.point(Some(d))?;
                }
            }
            let (name, _, report) = crate::eval::calibrate(
                &a.model,
                &a.set.data,
                a.set.format,
                a.set.images.as_deref(),
                a.target,
                a.name.as_deref(),
                a.backend,
            )?;
            for line in report {
                println!("{line}");
            }
            if let Some(d) = &a.default {
                crate::eval::set_default_point(&a.model, d)?;
            }
            let meta = BundleMetadata::load(&a.model)?;
            eprintln!(
                "operating point `{name}` written into {}; its default point is `{}`",
                a.model.display(),
                meta.default_point
            );
            Ok(())
        }
        Command::Bench(a) if a.pipeline.is_some() => {
            let r = bench::run_pipeline(
                a.pipeline.unwrap_or_default(),
                a.source_size,
                a.image_size,
                a.batch_size,
            )?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "data pipeline: {:.1} img/s from the photographs ({:.1} decoding them in \
                     full), {:.1} img/s from a prepared store made at {:.1} photographs/s ({} \
                     JPEGs of {} px to {} px, augmentation on, no cache, {} threads)",
                    r.pipeline_img_per_s,
                    r.full_decode_img_per_s,
                    r.store_pipeline_img_per_s,
                    r.prepare_img_per_s,
                    r.images,
                    r.source_size,
                    r.image_size,
                    r.threads
                );
            }
            Ok(())
        }
        Command::Bench(a) => {
            let r = bench::run(&bench::BenchOptions {
                preset: a.preset,
                image_size: a.image_size,
                batch_size: a.batch_size,
                steps: a.steps.max(1),
                backend: a.backend,
                phases: a.phases,
            })?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} on {} ({}, {} kernels): {:.2} train img/s (median step {:.3} s over {} \
                     steps, batch {}, {} px); peak RSS {:.0} MiB; loss {:.4} -> {:.4}",
                    r.preset,
                    r.backend,
                    r.cpu,
                    r.isa,
                    r.train_img_per_s,
                    r.median_step_s,
                    r.timed_steps,
                    r.batch_size,
                    r.image_size,
                    r.peak_rss_mib.unwrap_or(f64::NAN),
                    r.first_loss,
                    r.last_loss
                );
                if let Some(p) = &r.phases {
                    println!(
                        "  median phases: forward + losses {:.3} s, backward {:.3} s, optimizer {:.3} s",
                        p.forward_s, p.backward_s, p.optimizer_s
                    );
                }
            }
            Ok(())
        }
        Command::Synth(a) => {
            let opts = SynthOptions {
                out: a.out.clone(),
                count: a.count,
                size: a.size,
                seed: a.seed,
                grades: a.grades.unwrap_or(synth::SCREENING_MIX),
                missing: a.missing,
                ungradable: a.ungradable,
                format: a.format,
                progress: std::io::stderr().is_terminal(),
            };
            let t = std::time::Instant::now();
            let labels = synth::generate(&opts)?;
            let mut by_grade = [0usize; 5];
            let mut degraded = 0;
            for l in &labels {
                by_grade[l.diagnosis as usize] += 1;
                degraded += usize::from(l.degradation.is_some());
            }
            eprintln!(
                "wrote {} images ({} px, {} format) and {} in {:.1} s; grades 0-4: {:?}; ungradable: {degraded}",
                labels.len(),
                a.size,
                a.format,
                synth::label_path(&a.out, a.format).display(),
                t.elapsed().as_secs_f64(),
                by_grade
            );
            if let Some(sheet) = a.contact_sheet {
                let images: Vec<_> = (0..labels.len())
                    .map(|i| synth::picture(&opts, i as u64).1)
                    .collect();
                let img = synth::contact_sheet(&images, 6.min(images.len() as u32), 160);
                let mut bytes = Vec::new();
                img.write_to(
                    &mut std::io::Cursor::new(&mut bytes),
                    image::ImageFormat::Png,
                )?;
                write_atomic(&sheet, &bytes)?;
                eprintln!("contact sheet: {}", sheet.display());
            }
            Ok(())
        }
        Command::ExportTorch { model, out } => {
            let device = cpu();
            let bundle = ModelBundle::load(&model, &device)?;
            bundle.model.export_torch(&bundle.metadata.config, &out)?;
            eprintln!("wrote PyTorch-layout weights to {}", out.display());
            Ok(())
        }
        Command::ImportTorch {
            weights,
            preset,
            out,
        } => {
            let device = cpu();
            let mut config = RetinaConfig::preset(&preset)?;
            // Networks trained elsewhere (the PyTorch reference among them) have only the
            // clinical heads; the bundle then has no quality head, and the gradability check
            // before the network is all that refuses images.
            let names = retina_model::torch::tensor_names(&weights)?;
            if let Some(i) = config.heads.iter().position(|h| h.refuses())
                && !retina_model::torch::has_head(&names, &config.heads[i])
            {
                eprintln!(
                    "note: {} has no `{}` head; the bundle is made without one",
                    weights.display(),
                    config.heads[i].name
                );
                config.heads.remove(i);
            }
            // A PyTorch network's regression output is its value, unless the file was written
            // by `export-torch` from a head with the logistic link (its metadata says so).
            for (name, link) in retina_model::torch::regression_links(&weights, &config)? {
                let head = config.heads.iter_mut().find(|h| h.name == name);
                if let Some(h) = head.filter(|h| h.link != link) {
                    if link == retina_model::Link::Identity {
                        eprintln!(
                            "note: {} records no link for `{name}`: its output is read as the \
                             value itself, as PyTorch networks give it",
                            weights.display()
                        );
                    }
                    h.link = link;
                }
            }
            // Nor does a max-pooling head's weight say how it pooled; `export-torch` records it.
            for (name, pooling) in retina_model::torch::recorded_pooling(&weights, &config)? {
                if let Some(h) = config.heads.iter_mut().find(|h| h.name == name) {
                    h.pooling = pooling;
                }
            }
            // The weights do not say how images were prepared for them; `export-torch` records
            // it (Graham's subtraction, input size, normalisation), else the preset's stands.
            if let Some(p) = retina_model::torch::recorded_preprocess(&weights)? {
                config.preprocess = p;
            }
            let mut net = config.init(&device)?;
            net.import_torch(&config, &weights)
                .with_context(|| format!("importing {}", weights.display()))?;
            let mut meta = BundleMetadata::new(config);
            meta.provenance.dataset = Some(format!("imported from {}", weights.display()));
            meta.provenance.created = Some(retina_model::bundle::utc_now_rfc3339());
            ModelBundle::new(net, meta).save(&out)?;
            eprintln!("wrote bundle {}", out.display());
            Ok(())
        }
    }
}

fn fit(a: FitArgs, teacher: Option<PathBuf>) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let overrides = a.overrides()?;
    let summary = if let Some(dir) = &a.resume {
        if let Some(flag) = a.data_flags().first() {
            bail!(
                "{flag} cannot be used with --resume: a run's data and directory are fixed \
                 (see {}); start a new run with --out to train on other data",
                dir.join("run.json").display()
            );
        }
        let resume = Resume {
            overrides,
            backend: a.backend.clone(),
            command,
        };
        if a.print_config {
            print!("{}", trainer::plan_resume(dir, &resume)?.config.to_toml()?);
            return Ok(());
        }
        trainer::resume(dir, &resume)?
    } else {
        let config = overrides.resolve()?;
        if a.print_config {
            config.validate()?;
            print!("{}", config.to_toml()?);
            return Ok(());
        }
        if a.synthetic.is_none()
            && let Some(flag) = a
                .data_flags()
                .into_iter()
                .find(|f| f.starts_with("--synthetic-"))
        {
            bail!("{flag} describes generated images: it needs --synthetic N");
        }
        let data = match (a.synthetic, a.data) {
            (Some(n), _) => DataSource::Synthetic {
                n,
                size: a.synthetic_size.unwrap_or(256),
                ungradable: a.synthetic_ungradable.unwrap_or(0.0),
                grades: a.synthetic_grades.unwrap_or(synth::TRAINING_MIX),
            },
            (None, Some(path)) if ViewStore::is_store(&path) => {
                if a.format.is_some() || a.images.is_some() {
                    bail!(
                        "{} is a prepared store: it carries its labels and views, so --format and --images do not apply",
                        path.display()
                    );
                }
                if let Some(v) = &a.val
                    && !ViewStore::is_store(v)
                {
                    bail!(
                        "--val {} must be a prepared store too when --data is one (`retina-train prepare --data {} --out VAL_STORE`)",
                        v.display(),
                        v.display()
                    );
                }
                DataSource::Prepared {
                    dir: path,
                    val: a.val,
                }
            }
            (None, Some(path)) => {
                if let Some(v) = &a.val
                    && ViewStore::is_store(v)
                {
                    bail!(
                        "--val {} is a prepared store but --data is a label file: give both as stores or both as label files",
                        v.display()
                    );
                }
                DataSource::Labels {
                    path,
                    format: a.format.unwrap_or(DatasetFormat::Native),
                    images: a.images,
                    val: a.val,
                }
            }
            (None, None) => bail!("give --data LABELS or --synthetic N (or --resume RUN_DIR)"),
        };
        let Some(out) = a.out else {
            bail!("give --out RUN_DIR, the directory the run writes to");
        };
        trainer::fit(FitRequest {
            data,
            out,
            config,
            backend: a.backend.unwrap_or_else(|| "cpu".into()),
            skip_bad_images: a.skip_bad_images,
            command,
            resumed: Vec::new(),
            teacher: teacher.map(|t| absolute(&t)).transpose()?,
        })?
    };
    if summary.rank != 0 {
        // Rank 0 speaks for an MPI run.
        return Ok(());
    }
    // Where the validation set cannot score the selection metric (one class only), the
    // validation loss chose the epoch: name what was used.
    let chosen_by = if summary.best_val.contains_key(&summary.select_metric) {
        summary.select_metric.as_str()
    } else {
        crate::scoring::VAL_LOSS
    };
    eprintln!(
        "done in {:.0} s: best epoch {} ({chosen_by} {:.4}); model bundle: {}",
        summary.seconds,
        summary.best_epoch,
        summary.best_metric,
        summary.out.join("model").display()
    );
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn prepare(a: PrepareArgs) -> Result<()> {
    let int = |v: usize| i64::try_from(v).context("value too large");
    let mut o = Overrides {
        file: a.config.clone(),
        sets: Vec::new(),
    };
    if let Some(v) = &a.preset {
        o = o.set("model.preset", v.as_str());
    }
    if let Some(v) = a.image_size {
        o = o.set("model.image_size", int(v)?);
    }
    o.sets.extend(a.sets.iter().cloned());
    let model = o.resolve()?.model_config()?;
    let s = store::prepare(&store::PrepareOptions {
        labels: a.set.data,
        format: a.set.format,
        images: a.set.images,
        out: a.out,
        preprocess: model.preprocess.clone(),
        heads: model.heads.clone(),
        skip_bad_images: a.skip_bad_images,
        progress: std::io::stderr().is_terminal(),
    })?;
    for l in &s.left_out {
        eprintln!(
            "left out {} (line {}): {}",
            l.image.display(),
            l.line,
            l.reason
        );
    }
    eprintln!(
        "stored {} views of {} px in {} ({:.0} MiB){}; {:.1} photographs/s; train with `retina-train fit --data {}`",
        s.stored,
        model.preprocess.image_size,
        s.out.display(),
        s.bytes as f64 / (1 << 20) as f64,
        if s.resumed > 0 {
            format!(", {} of them done by the interrupted run", s.resumed)
        } else {
            String::new()
        },
        s.img_per_s,
        s.out.display()
    );
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// burn materialises restored optimizer state on its *default* device (`BURN_DEVICE`, else the
/// GPU) before moving it to the parameters' device. Pin the default to the chosen backend so that
/// resuming a CPU run never starts the GPU runtime (or fails on a machine without one). Done
/// here, before any thread exists, because changing the environment later is unsound.
fn pin_default_device(cli: &Cli) {
    if std::env::var_os("BURN_DEVICE").is_some() {
        return;
    }
    let backend = match &cli.command {
        Command::Fit(a) => fit_backend(a),
        Command::Distill(a) => fit_backend(&a.fit),
        _ => return,
    };
    let name = match backend.parse::<BackendChoice>() {
        Ok(BackendChoice::Cpu | BackendChoice::Flex) => "flex",
        Ok(BackendChoice::Ndarray) => "ndarray",
        Ok(BackendChoice::Wgpu) => "wgpu",
        _ => return,
    };
    // SAFETY: single-threaded at this point (called first thing in main).
    unsafe { std::env::set_var("BURN_DEVICE", name) };
}

fn cpu() -> Device {
    BackendChoice::Cpu
        .select()
        .expect("the CPU backend is always available")
        .device
}

/// `path` made absolute (a run's teacher must be found again when it resumes elsewhere),
/// checked to be a model bundle.
fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(path).with_context(|| {
        format!(
            "--teacher {}: no such model bundle directory",
            path.display()
        )
    })?;
    if !abs.join(retina_model::bundle::METADATA_FILE).is_file() {
        bail!(
            "--teacher {}: not a model bundle (no model.json); give a run's `model` directory",
            path.display()
        );
    }
    Ok(abs)
}

/// The backend a fit (or distill) runs on: the flag, else a resumed run's own, else the CPU.
fn fit_backend(a: &FitArgs) -> String {
    match (&a.backend, &a.resume) {
        (Some(b), _) => b.clone(),
        // A resumed run keeps the backend in its run.json.
        (None, Some(dir)) => trainer::recorded_backend(dir).unwrap_or_else(|| "cpu".into()),
        (None, None) => "cpu".into(),
    }
}
