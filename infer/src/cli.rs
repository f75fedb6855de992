//! Command-line interface of `retina-infer`: every flag in one place.

use crate::engine::{Engine, Input, collect_inputs, error_json};
use crate::heatmap;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use retina_model::BackendChoice;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Diabetic-retinopathy screening predictions for fundus photographs.
#[derive(Parser, Debug)]
#[command(name = "retina-infer", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Predict grade, referable DR, fluid and vessel growth for images.
    Predict(PredictArgs),
    /// Time inference: batch-1 latency and batch-16 throughput.
    Bench(BenchArgs),
    /// Serve predictions over HTTP (POST /v1/predict, the Open Inference Protocol under /v2,
    /// GET /metrics), batching concurrent requests; SIGHUP reloads the model.
    Serve(ServeArgs),
    /// Send a bounded load to a running `serve` and report throughput and latency.
    Loadtest(LoadtestArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Model bundle directory (default: the embedded demo model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend: cpu, wgpu, auto.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Address to listen on (port 0 picks a free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Most images in one forward pass.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_batch: u32,
    /// Longest an image waits for others to fill its batch, in milliseconds.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Largest request body in MiB (larger gets 413).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_body_mb: u32,
    /// Seconds a client gets to send its headers, and then its body (then 408).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    client_timeout_s: u64,
    /// Seconds SIGTERM waits for in-flight requests before exiting.
    #[arg(long, default_value_t = 30)]
    drain_s: u64,
    /// Images that may wait for the model before new ones get 503 (default: 64 batches).
    #[arg(long)]
    queue: Option<usize>,
    /// Threads decoding images (default: the number of cores).
    #[arg(long)]
    decode_threads: Option<usize>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// The name clients address the model by (`/v2/models/NAME/infer`).
    #[arg(long, default_value = "retina")]
    model_name: String,
}

#[derive(clap::Args, Debug)]
struct LoadtestArgs {
    /// Image files to send, in turn.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Base URL of the service.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Clients sending at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Seconds before one request counts as failed.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Route to load: v1 (`POST /v1/predict`) or v2 (the Open Inference Protocol's infer, with
    /// the image as binary tensor data).
    #[arg(long, default_value = "v1", value_parser = ["v1", "v2"])]
    protocol: String,
    /// The model name for --protocol v2.
    #[arg(long, default_value = "retina")]
    model_name: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct PredictArgs {
    /// Image files, folders (every image inside), or - for image bytes on stdin.
    #[arg(required = true)]
    images: Vec<String>,
    /// Model bundle directory (default: the embedded demo model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend: cpu, wgpu, auto.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Operating point of the bundle (e.g. screening, confirmation).
    #[arg(long)]
    point: Option<String>,
    /// One JSON object per image (JSON Lines).
    #[arg(long)]
    json: bool,
    /// Write a Grad-CAM panel per image into this folder (NAME_heatmap.png): the photograph and
    /// the heat drawn over it at the photograph's resolution, a colour scale and the answer.
    #[arg(long)]
    heatmap: Option<PathBuf>,
    /// Longest side of the photographs in a heat map panel.
    #[arg(long, default_value_t = heatmap::DEFAULT_MAX_SIDE, value_parser = clap::value_parser!(u32).range(64..=8192))]
    heatmap_max_side: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Network preset (random weights).
    #[arg(long, default_value = "reference")]
    preset: String,
    /// Input size.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Backend: cpu, wgpu, flex, ndarray.
    #[arg(long, default_value = "cpu")]
    backend: BackendChoice,
    /// Batch-1 runs timed.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

/// Runs the CLI.
pub fn main() -> ExitCode {
    retina_kernels::allocator::keep_freed_memory();
    retina_kernels::startup::quiet_vulkan_layers();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Predict(a) => predict(a),
        Command::Bench(a) => crate::bench::run(a.preset, a.image_size, a.backend, a.runs, a.json)
            .map(|()| ExitCode::SUCCESS),
        Command::Serve(a) => serve(a).map(|()| ExitCode::SUCCESS),
        Command::Loadtest(a) => crate::loadtest::run(crate::loadtest::LoadOptions {
            url: a.url,
            images: a.images,
            concurrency: a.concurrency,
            requests: a.requests,
            timeout: Duration::from_secs(a.timeout_s),
            json: a.json,
            protocol: match a.protocol.as_str() {
                "v2" => crate::loadtest::Protocol::V2 {
                    model: a.model_name.clone(),
                },
                _ => crate::loadtest::Protocol::V1,
            },
        })
        .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(2)
        }
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let max_batch = a.max_batch as usize;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    crate::serve::run(crate::serve::ServeOptions {
        model: a.model,
        backend: a.backend,
        addr: a.addr,
        policy: crate::serve::batcher::BatchPolicy {
            max_batch,
            max_wait: Duration::from_millis(a.max_wait_ms),
            queue_capacity: a.queue.unwrap_or(64 * max_batch).max(1),
        },
        max_body: a.max_body_mb as usize * (1 << 20),
        client_timeout: Duration::from_secs(a.client_timeout_s),
        drain: Duration::from_secs(a.drain_s),
        decode_threads: a.decode_threads.unwrap_or(cores).max(1),
        log_json: a.log_json,
        model_name: a.model_name,
    })
}

fn predict(a: PredictArgs) -> Result<ExitCode> {
    let inputs = collect_inputs(&a.images)?;
    let engine = Engine::load(a.model.as_deref(), a.backend)?;
    let (point_name, point) = engine.operating_point(a.point.as_deref())?;
    if let Some(dir) = &a.heatmap {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if !a.json {
        eprintln!(
            "model: {}; backend: {}",
            engine.model_name, engine.backend.description
        );
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = 0;
    for (input, r) in inputs.iter().zip(engine.predict(&inputs, a.batch_size)) {
        match r {
            Ok(r) => {
                if a.json {
                    writeln!(out, "{}", engine.to_json(&r, point, &point_name))?;
                } else {
                    write_human(&mut out, &engine, &r, point, &point_name)?;
                }
                if let Some(dir) = &a.heatmap {
                    let stem = std::path::Path::new(&r.image)
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .filter(|s| *s != "-")
                        .unwrap_or("stdin")
                        .to_string();
                    let bytes = match input {
                        Input::File(p) => std::fs::read(p)
                            .with_context(|| format!("cannot read {} again", p.display()))?,
                        Input::Bytes { bytes, .. } => bytes.clone(),
                        Input::Unusable(_) => continue,
                    };
                    let pre = &engine.bundle.metadata.config.preprocess;
                    let heat = heatmap::grad_cam(
                        &engine.bundle,
                        &pre.normalise(&r.view),
                        &engine.backend.device,
                    )?;
                    let photo = heatmap::Photo {
                        bytes: &bytes,
                        name: &r.image,
                        crop: r.crop,
                        source: r.source_size,
                    };
                    let caption =
                        heatmap::caption(engine.heads(), &r.prediction, point, &point_name);
                    let png = heatmap::panel_png(pre, photo, &heat, &caption, a.heatmap_max_side)?;
                    let path = dir.join(format!("{stem}_heatmap.png"));
                    retina_model::host::write_atomic(&path, &png)?;
                }
            }
            Err(e) => {
                failed += 1;
                if a.json {
                    writeln!(out, "{}", error_json(&e))?;
                } else {
                    writeln!(out, "{}\n  error: {}\n", e.image, e.message)?;
                }
            }
        }
    }
    out.flush()?;
    if failed > 0 {
        eprintln!("{failed} of {} images could not be read", inputs.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn write_human(
    out: &mut impl Write,
    engine: &Engine,
    r: &crate::engine::ImageResult,
    point: &retina_model::OperatingPoint,
    point_name: &str,
) -> Result<()> {
    let p = &r.prediction;
    writeln!(out, "{}   (operating point {point_name})", r.image)?;
    // A model without a quality head still has the check's answer to give.
    if !engine.heads().iter().any(retina_model::HeadSpec::refuses)
        && let Some(refusal) = p.refusal(point)
    {
        writeln!(
            out,
            "  {:<14} UNGRADABLE: {} ({})",
            "quality", refusal.reason, refusal.detail
        )?;
    }
    for spec in engine.heads() {
        for line in p.head_lines(spec, point) {
            writeln!(out, "  {line}")?;
        }
    }
    writeln!(out, "  ({}, {:.1} ms)\n", engine.backend.name, r.elapsed_ms)?;
    Ok(())
}
