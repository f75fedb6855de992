//! The inference engine: one loaded model, batched predictions for many images.

use anyhow::{Result, bail};

use rayon::prelude::*;
use retina_model::preprocess::batch_tensor;
use retina_model::{
    BackendChoice, HeadSpec, ModelBundle, OperatingPoint, Prediction, Prepared, SelectedBackend,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The default model compiled into the binary: the `small` preset trained by
/// `retina-train fit` on the project's synthetic images (see the README). Not for clinical use.
const DEFAULT_METADATA: &str = include_str!("../../assets/default-model/model.json");
const DEFAULT_WEIGHTS: &[u8] = include_bytes!("../../assets/default-model/weights.safetensors");

/// Name reported for the embedded model.
pub const DEFAULT_MODEL_NAME: &str = "embedded:default (synthetic-data demo, not for clinical use)";

/// One image to predict.
#[derive(Debug, Clone)]
pub enum Input {
    /// A file on disk.
    File(PathBuf),
    /// Bytes from stdin or a request, with a name for messages.
    Bytes {
        /// Name shown in output.
        name: String,
        /// The encoded image.
        bytes: Vec<u8>,
    },
    /// An argument that names no image (an empty folder, a FIFO, a device): answered with its
    /// error in its place, like an unreadable file, while the other arguments are answered.
    Unusable(ImageError),
}

impl Input {
    /// The name shown in the output.
    pub fn name(&self) -> String {
        match self {
            Input::File(p) => p.display().to_string(),
            Input::Bytes { name, .. } => name.clone(),
            Input::Unusable(e) => e.image.clone(),
        }
    }
}

/// File extensions taken from folders.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "tif", "tiff", "bmp", "webp", "jpe"];

/// Expands command-line arguments: files stay, folders become their image files (sorted),
/// `-` reads image bytes from stdin. An argument that yields no image (an empty or unreadable
/// folder, a FIFO or device, unreadable stdin) becomes an [`Input::Unusable`] in its place, so
/// one bad argument never costs the others their answers. Only an empty argument list is an
/// error.
pub fn collect_inputs(args: &[String]) -> Result<Vec<Input>> {
    let unusable = |name: &str, kind: &'static str, message: String| {
        Input::Unusable(ImageError {
            image: name.to_string(),
            kind,
            message,
        })
    };
    let mut out = Vec::new();
    for a in args {
        if a == "-" {
            let mut bytes = Vec::new();
            out.push(
                match std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes) {
                    Ok(_) => Input::Bytes {
                        name: "-".into(),
                        bytes,
                    },
                    Err(e) => unusable(a, "unreadable", format!("cannot read stdin: {e}")),
                },
            );
            continue;
        }
        let p = PathBuf::from(a);
        let meta = std::fs::metadata(&p);
        if meta.as_ref().is_ok_and(|m| m.is_dir()) {
            let listing = std::fs::read_dir(&p).map(|rd| {
                let mut files: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        f.is_file()
                            && f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                                IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                            })
                    })
                    .collect();
                files.sort();
                files
            });
            match listing {
                Ok(files) if files.is_empty() => out.push(unusable(
                    a,
                    "no_images",
                    format!(
                        "{}: the folder holds no images ({})",
                        p.display(),
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                )),
                Ok(files) => out.extend(files.into_iter().map(Input::File)),
                Err(e) => out.push(unusable(
                    a,
                    "unreadable",
                    format!("cannot list {}: {e}", p.display()),
                )),
            }
        } else if meta.as_ref().is_ok_and(|m| !m.is_file()) {
            // Reading a FIFO or a device would block or never end.
            out.push(unusable(
                a,
                "not_a_file",
                format!("{}: not a regular file or folder", p.display()),
            ));
        } else {
            // A missing file is reported per image, like an unreadable one.
            out.push(Input::File(p));
        }
    }
    if out.is_empty() {
        bail!("no images given: pass files, folders, or - for stdin");
    }
    Ok(out)
}

/// A loaded model on a device.
pub struct Engine {
    /// The bundle.
    pub bundle: ModelBundle,
    /// Where it runs.
    pub backend: SelectedBackend,
    /// Model name for the output (`embedded:default` or the bundle path).
    pub model_name: String,
    /// The bundle's version: 16 hex digits of the XXH3 hash of its metadata and weights, so a
    /// retrained or recalibrated bundle gets a new one.
    pub version: String,
}

fn bundle_version(metadata: &[u8], weights: &[u8]) -> String {
    use xxhash_rust::xxh3::Xxh3;
    let mut h = Xxh3::new();
    h.update(metadata);
    h.update(weights);
    format!("{:016x}", h.digest())
}

/// The answer for one image.
#[derive(Debug, Clone)]
pub struct ImageResult {
    /// Image name.
    pub image: String,
    /// The prediction.
    pub prediction: Prediction,
    /// The cropped, resized image the network saw.
    pub view: image::RgbImage,
    /// Where that view sits in the photograph.
    pub crop: retina_model::CropBox,
    /// The photograph's size.
    pub source_size: (u32, u32),
    /// Milliseconds for this image's share of decoding and its batch's forward pass.
    pub elapsed_ms: f64,
}

/// Why one image got no prediction.
#[derive(Debug, Clone)]
pub struct ImageError {
    /// Image name.
    pub image: String,
    /// Error kind: `unreadable`, `not_an_image`, `corrupt`, `too_large`.
    pub kind: &'static str,
    /// What happened.
    pub message: String,
}

impl Engine {
    /// Loads `model` (a bundle directory) or the embedded default.
    pub fn load(model: Option<&Path>, backend: BackendChoice) -> Result<Engine> {
        let backend = backend.select()?;
        let (bundle, model_name, version) = match model {
            Some(dir) => {
                // Read once for the version; the bundle loader reports what is missing.
                let read = |f: &str| std::fs::read(dir.join(f)).unwrap_or_default();
                let version = bundle_version(
                    &read(retina_model::bundle::METADATA_FILE),
                    &read(retina_model::bundle::WEIGHTS_FILE),
                );
                (
                    ModelBundle::load(dir, &backend.device)?,
                    dir.display().to_string(),
                    version,
                )
            }
            None => (
                ModelBundle::from_bytes(
                    "embedded:default",
                    DEFAULT_METADATA,
                    DEFAULT_WEIGHTS,
                    &backend.device,
                )?,
                DEFAULT_MODEL_NAME.to_string(),
                bundle_version(DEFAULT_METADATA.as_bytes(), DEFAULT_WEIGHTS),
            ),
        };
        Ok(Engine {
            bundle,
            backend,
            model_name,
            version,
        })
    }

    /// The operating point by name (`None` = the bundle's default), or a clear error listing
    /// the ones the bundle has.
    pub fn operating_point(&self, name: Option<&str>) -> Result<(String, &OperatingPoint)> {
        Ok(self.bundle.metadata.point(name)?)
    }

    /// The heads of the loaded model, in output order.
    pub fn heads(&self) -> &[HeadSpec] {
        &self.bundle.metadata.config.heads
    }

    /// Decodes (in parallel) and predicts a list of images, `batch_size` at a time.
    pub fn predict(
        &self,
        inputs: &[Input],
        batch_size: usize,
    ) -> Vec<Result<ImageResult, ImageError>> {
        let config = &self.bundle.metadata.config;
        let pre = &config.preprocess;
        let mut results = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(batch_size.max(1)) {
            let t0 = Instant::now();
            let prepared: Vec<Result<Prepared, ImageError>> = chunk
                .par_iter()
                .map(|input| {
                    let r = match input {
                        Input::File(p) => pre.prepare_path(p),
                        Input::Bytes { name, bytes } => pre.prepare_bytes(bytes, name),
                        Input::Unusable(e) => return Err(e.clone()),
                    };
                    r.map_err(|e| image_error(input.name(), e))
                })
                .collect();
            let ok: Vec<&Prepared> = prepared.iter().filter_map(|r| r.as_ref().ok()).collect();
            let inputs: Vec<&[f32]> = ok.iter().map(|p| p.input.as_slice()).collect();
            let preds = self.forward(&inputs);
            let per_image = t0.elapsed().as_secs_f64() * 1e3 / chunk.len() as f64;
            let mut preds = preds.into_iter();
            for (input, p) in chunk.iter().zip(prepared) {
                results.push(p.map(|prep| {
                    let mut prediction = preds.next().expect("one prediction per decoded image");
                    prediction.check = config.gradability().check(&prep.view, prep.disc_found);
                    ImageResult {
                        image: input.name(),
                        prediction,
                        view: prep.view,
                        crop: prep.crop,
                        source_size: prep.source_size,
                        elapsed_ms: per_image,
                    }
                }));
            }
        }
        results
    }

    /// One forward pass over already prepared inputs (normalised views), in order.
    pub fn forward(&self, inputs: &[&[f32]]) -> Vec<Prediction> {
        if inputs.is_empty() {
            return Vec::new();
        }
        let pre = &self.bundle.metadata.config.preprocess;
        let x = batch_tensor(inputs, pre.image_size, &self.backend.device);
        let out = self.bundle.model.forward(x);
        Prediction::from_output(&out, &self.bundle.model.specs)
    }

    /// The JSON object of one answer (`predict --json`).
    pub fn to_json(&self, r: &ImageResult, point: &OperatingPoint, point_name: &str) -> Value {
        prediction_json(
            &r.prediction,
            self.heads(),
            &Answered {
                image: &r.image,
                backend: self.backend.name,
                model: &self.model_name,
                model_version: &self.version,
                point,
                point_name,
                elapsed_ms: r.elapsed_ms,
            },
        )
    }
}

/// What an answer is about, besides the prediction itself.
#[derive(Debug, Clone, Copy)]
pub struct Answered<'a> {
    /// Image name.
    pub image: &'a str,
    /// Backend name (`flex`, `wgpu`, ...).
    pub backend: &'a str,
    /// Model name.
    pub model: &'a str,
    /// The bundle's version (content hash).
    pub model_version: &'a str,
    /// The operating point the decisions use.
    pub point: &'a OperatingPoint,
    /// Its name.
    pub point_name: &'a str,
    /// Milliseconds spent on this image.
    pub elapsed_ms: f64,
}

/// The JSON object of one answer: one line of `predict --json`, and the body of a
/// `POST /v1/predict` answer. Both go through here so the two never drift apart. Every head
/// is answered under its own name, as its spec says ([`Prediction::head_json`]); `decision`
/// sums it up: `ungradable`, else `refer` / `no_refer` for a model with a `referable`
/// decision, else `gradable`. A model without a quality head still reports its gradability
/// check under `quality`.
pub fn prediction_json(p: &Prediction, heads: &[HeadSpec], a: &Answered) -> Value {
    let decision = if !p.gradable(a.point) {
        "ungradable"
    } else {
        match p.decide(retina_model::REFERABLE, a.point) {
            Some(true) => "refer",
            Some(false) => "no_refer",
            None => "gradable",
        }
    };
    let mut v = json!({
        "image": a.image,
        "backend": a.backend,
        "model": a.model,
        "model_version": a.model_version,
        "operating_point": a.point_name,
        "decision": decision,
        "elapsed_ms": (a.elapsed_ms * 1000.0).round() / 1000.0,
    });
    for spec in heads {
        if let Some(answer) = p.head_json(spec, a.point) {
            v[spec.name.as_str()] = answer;
        }
    }
    if !heads.iter().any(HeadSpec::refuses) && v.get(retina_model::QUALITY).is_none() {
        v[retina_model::QUALITY] = p.quality_json(a.point);
    }
    v
}

/// The JSON object of a failed image.
pub fn error_json(e: &ImageError) -> Value {
    json!({"image": e.image, "error": {"kind": e.kind, "message": e.message}})
}

/// Classifies a preprocessing failure for the output.
pub fn image_error(image: String, e: retina_model::PreprocessError) -> ImageError {
    use retina_model::PreprocessError as P;
    let kind = match &e {
        P::Io { .. } => "unreadable",
        P::NotAnImage { .. } => "not_an_image",
        P::Corrupt { .. } | P::Empty { .. } => "corrupt",
        P::TooLarge { .. } => "too_large",
    };
    ImageError {
        image,
        kind,
        message: e.to_string(),
    }
}
