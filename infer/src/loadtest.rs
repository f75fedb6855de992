//! `retina-infer loadtest`: a bounded load against a running `serve`.
//!
//! A fixed number of clients send a fixed number of requests, one image each (the images given,
//! round robin): `POST /v1/predict`, or with `--protocol v2` the Open Inference Protocol's
//! `POST /v2/models/{name}/infer` with the image as binary tensor data, as `tritonclient` sends
//! it. Then the run reports throughput, latency percentiles, errors and the mean batch size the
//! server achieved over the run (from `GET /v1/stats` before and after).

use crate::serve::quantile;
use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Server base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Image files sent in turn.
    pub images: Vec<PathBuf>,
    /// Clients sending at once.
    pub concurrency: usize,
    /// Requests in all.
    pub requests: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Print one JSON object instead of text.
    pub json: bool,
    /// Which route to load.
    pub protocol: Protocol,
}

/// The route a load test sends its images to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// `POST /v1/predict`, the image as the raw body.
    V1,
    /// `POST /v2/models/{model}/infer`, the image as binary tensor data, binary outputs.
    V2 {
        /// The model name the server serves.
        model: String,
    },
}

/// One request's body and extra header.
#[derive(Clone)]
struct Prepared {
    body: Bytes,
    inference_header: Option<usize>,
}

impl Protocol {
    fn path(&self) -> String {
        match self {
            Protocol::V1 => "/v1/predict".into(),
            Protocol::V2 { model } => format!("/v2/models/{model}/infer"),
        }
    }

    fn prepare(&self, image: Vec<u8>) -> Prepared {
        match self {
            Protocol::V1 => Prepared {
                body: Bytes::from(image),
                inference_header: None,
            },
            Protocol::V2 { .. } => {
                let header = json!({
                    "inputs": [{
                        "name": "image", "shape": [1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": image.len() + 4},
                    }],
                    "parameters": {"binary_data_output": true},
                })
                .to_string();
                let mut body = header.clone().into_bytes();
                body.extend_from_slice(&(image.len() as u32).to_le_bytes());
                body.extend_from_slice(&image);
                Prepared {
                    body: Bytes::from(body),
                    inference_header: Some(header.len()),
                }
            }
        }
    }
}

/// Runs the load and prints the report. Fails if any request failed.
pub fn run(o: LoadOptions) -> Result<()> {
    if o.concurrency == 0 || o.requests == 0 {
        bail!("--concurrency and --requests must be at least 1");
    }
    let images: Vec<Vec<u8>> = o
        .images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .collect::<Result<_>>()?;
    if images.is_empty() {
        bail!("give at least one image file to send");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(load(&o, images))?;
    if o.json {
        println!("{report}");
    } else {
        println!(
            "{} requests to {}, {} clients, {:.2} s: {:.1} req/s\n\
             latency ms: p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}\n\
             errors: {}\n\
             server: mean batch {:.2}, largest {}, mean forward {:.1} ms",
            report["requests"],
            report["route"].as_str().unwrap_or("?"),
            report["concurrency"],
            report["wall_s"].as_f64().unwrap_or(0.0),
            report["throughput_rps"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["max"].as_f64().unwrap_or(0.0),
            report["errors"],
            report["mean_batch_size"].as_f64().unwrap_or(0.0),
            report["largest_batch"],
            report["mean_forward_ms"].as_f64().unwrap_or(0.0),
        );
    }
    let errors = report["errors"].as_u64().unwrap_or(u64::MAX);
    if errors > 0 {
        bail!(
            "{errors} of {} requests failed: {}",
            o.requests,
            report["error_samples"]
        );
    }
    Ok(())
}

async fn load(o: &LoadOptions, images: Vec<Vec<u8>>) -> Result<Value> {
    let base = o.url.trim_end_matches('/').to_string();
    // hyper's own client (the server's HTTP stack), plain HTTP/1.1 with keep-alive: what a
    // gateway in front of the service would speak.
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(o.concurrency)
        .build_http();
    let timeout = o.timeout;
    let before = get_stats(&client, &base, o.timeout)
        .await
        .with_context(|| {
            format!("cannot reach {base}/v1/stats: is `retina-infer serve` running there?")
        })?;
    let images: Arc<Vec<Prepared>> =
        Arc::new(images.into_iter().map(|i| o.protocol.prepare(i)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let total = o.requests;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.concurrency.min(total) {
        let (client, images, next, url) = (
            client.clone(),
            images.clone(),
            next.clone(),
            format!("{base}{}", o.protocol.path()),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let p = images[i % images.len()].clone();
                let t = Instant::now();
                // A request is done when its whole answer has arrived.
                match exchange(&client, "POST", &url, p.body, p.inference_header, timeout).await {
                    Ok((status, _)) if status.is_success() => {
                        lat.push(t.elapsed().as_secs_f64() * 1e3)
                    }
                    Ok((status, text)) => errors.push(format!("{status}: {text}")),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = Vec::new();
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors.extend(e);
    }
    let wall = t0.elapsed().as_secs_f64();
    let after = get_stats(&client, &base, o.timeout).await?;
    // Saturating: a server restarted during the run has smaller counters than before.
    let delta = |k: &str| {
        after[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(before[k].as_u64().unwrap_or(0))
    };
    let (imgs, batches) = (delta("images"), delta("batches"));
    let fwd_ms = |s: &Value| {
        s["mean_forward_ms"].as_f64().unwrap_or(0.0) * s["batches"].as_f64().unwrap_or(0.0)
    };
    let ok = latencies.len();
    Ok(json!({
        "url": base,
        "route": o.protocol.path(),
        "requests": total,
        "concurrency": o.concurrency,
        "ok": ok,
        "errors": errors.len(),
        "error_samples": errors.iter().take(3).collect::<Vec<_>>(),
        "wall_s": wall,
        "throughput_rps": ok as f64 / wall,
        "latency_ms": {
            "p50": quantile(&mut latencies, 0.5),
            "p90": quantile(&mut latencies, 0.9),
            "p99": quantile(&mut latencies, 0.99),
            "max": quantile(&mut latencies, 1.0),
        },
        "mean_batch_size": if batches == 0 { 0.0 } else { imgs as f64 / batches as f64 },
        "largest_batch": after["largest_batch"],
        "mean_forward_ms": if batches == 0 { 0.0 } else { (fwd_ms(&after) - fwd_ms(&before)) / batches as f64 },
    }))
}

type Http = Client<HttpConnector, Full<Bytes>>;

/// Sends one request and reads the whole answer within `timeout`: status and body text.
async fn exchange(
    client: &Http,
    method: &str,
    url: &str,
    body: Bytes,
    inference_header: Option<usize>,
    timeout: Duration,
) -> Result<(hyper::StatusCode, String)> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/octet-stream");
    if let Some(n) = inference_header {
        req = req.header("inference-header-content-length", n);
    }
    let req = req
        .body(Full::new(body))
        .with_context(|| format!("invalid URL {url}"))?;
    let answer = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {url} within {timeout:?}"))?
}

async fn get_stats(client: &Http, base: &str, timeout: Duration) -> Result<Value> {
    let url = format!("{base}/v1/stats");
    let (status, text) = exchange(client, "GET", &url, Bytes::new(), None, timeout).await?;
    if !status.is_success() {
        bail!("{url} answered {status}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))
}
