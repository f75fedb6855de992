//! The HTTP routes of `retina-infer serve` and their error answers.
//!
//! Every answer, error or not, is JSON. Image errors use the same object as
//! `predict --json` (`{"image", "error": {"kind", "message"}}`); request errors use
//! `{"error": {"kind", "message"}}`.

// Helpers return the finished error `Response` as their `Err`, so a handler can `return` it as
// is; it is 128 bytes and built once per failed request, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use super::batcher::{BatchError, Batcher, LatencyWindow};
use super::metrics::{Metrics, RequestLabels, RouteLabels};
use super::oip;
use crate::engine::{Answered, ImageError, error_json, image_error, prediction_json};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, MatchedPath, Multipart, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use retina_model::{BundleMetadata, OperatingPoint};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// What `GET /v1/model` describes; known once the model thread has loaded the bundle.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Bundle path or `embedded:default ...`.
    pub name: String,
    /// The name clients address it by (`--model-name`; the Open Inference Protocol's name).
    pub served_name: String,
    /// Content hash of the bundle (changes when a reload brings other weights or metadata).
    pub version: String,
    /// How many reloads ago it was loaded: 0 at start, one more per reload.
    pub generation: u64,
    /// Seconds loading and warming it up took.
    pub load_seconds: f64,
    /// Backend name.
    pub backend: &'static str,
    /// Backend with adapter and fallback reason.
    pub backend_description: String,
    /// The bundle's metadata.
    pub metadata: BundleMetadata,
}

impl ModelInfo {
    fn point(&self, name: Option<&str>) -> Result<(String, &OperatingPoint), Response> {
        self.metadata.point(name).map_err(|e| {
            api_error(
                StatusCode::BAD_REQUEST,
                "unknown_operating_point",
                e.to_string(),
            )
        })
    }
}

/// Request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Longest time a client may take to send its body.
    pub body_timeout: Duration,
}

/// Everything the handlers share.
pub struct AppState {
    /// Set once the model is loaded and warmed up; replaced on reload.
    model: RwLock<Option<Arc<ModelInfo>>>,
    /// Queue to the model thread.
    pub batcher: Batcher<ModelInfo>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// One reload at a time.
    pub reloading: tokio::sync::Mutex<()>,
    /// Tells the SIGHUP task to end (at shutdown).
    pub reload_stop: tokio::sync::watch::Sender<bool>,
    /// Request limits.
    pub limits: Limits,
    /// Set when SIGTERM arrived: `/readyz` turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
    started: Instant,
    next_id: AtomicU64,
    requests: AtomicU64,
    by_class: [AtomicU64; 5],
    latency: LatencyWindow,
}

impl AppState {
    /// Shared state for a batcher and limits.
    pub fn new(batcher: Batcher<ModelInfo>, limits: Limits, metrics: Metrics) -> Self {
        Self {
            model: RwLock::new(None),
            batcher,
            metrics,
            reloading: tokio::sync::Mutex::new(()),
            reload_stop: tokio::sync::watch::Sender::new(false),
            limits,
            draining: AtomicBool::new(false),
            started: Instant::now(),
            next_id: AtomicU64::new(1),
            requests: AtomicU64::new(0),
            by_class: Default::default(),
            latency: LatencyWindow::new(10_000),
        }
    }
}

impl AppState {
    /// The model serving now, once loaded.
    pub fn current(&self) -> Option<Arc<ModelInfo>> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `info` the model serving now.
    pub fn set_current(&self, info: Arc<ModelInfo>) {
        self.metrics
            .set_model(&info.served_name, &info.version, info.load_seconds);
        *self.model.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    /// Ends the SIGHUP task.
    pub fn stop_reloads(&self) {
        self.reload_stop.send_replace(true);
    }

    /// Whether SIGTERM has arrived.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// What a handler did, read by the request log.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Images in the request.
    pub images: usize,
    /// Body size.
    pub body_bytes: usize,
    /// Decoded sizes, `WxH`, of the images.
    pub sizes: Vec<String>,
    /// `ok` or the error kind.
    pub kind: &'static str,
}

/// The routes, with request logging around them.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/model", get(model))
        .route("/v1/stats", get(stats))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v2", get(oip::server_metadata))
        .route("/v2/health/live", get(oip::live))
        .route("/v2/health/ready", get(oip::ready))
        .route("/v2/models/{name}", get(oip::model_metadata))
        .route("/v2/models/{name}/ready", get(oip::model_ready))
        .route("/v2/models/{name}/infer", post(oip::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(oip::model_version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(oip::model_version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(oip::infer_version),
        )
        .route("/v2/repository/models/{name}/load", post(oip::load))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// A JSON error answer.
pub fn api_error(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Response {
    let mut r = (
        status,
        axum::Json(json!({"error": {"kind": kind, "message": message.into()}})),
    )
        .into_response();
    r.extensions_mut().insert(Outcome {
        kind,
        ..Outcome::default()
    });
    r
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if st.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    match st.current() {
        Some(_) => axum::Json(json!({"status": "ready"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn model(State(st): State<Arc<AppState>>) -> Response {
    let Some(m) = st.current() else {
        return not_ready();
    };
    let meta = &m.metadata;
    axum::Json(json!({
        "model": m.name,
        "model_name": m.served_name,
        "model_version": m.version,
        "backend": m.backend,
        "backend_description": m.backend_description,
        "format_version": meta.format_version,
        "heads": meta.config.heads,
        "class_names": meta.class_names(),
        "operating_points": meta.operating_points,
        "default_point": meta.default_point,
        "provenance": meta.provenance,
        "preprocess": meta.config.preprocess,
        "trunk": meta.config.trunk,
    }))
    .into_response()
}

async fn stats(State(st): State<Arc<AppState>>) -> Response {
    let b = &st.batcher.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let batches = load(&b.batches);
    axum::Json(json!({
        "uptime_s": st.started.elapsed().as_secs_f64(),
        "requests": load(&st.requests),
        "responses": {
            "1xx": load(&st.by_class[0]), "2xx": load(&st.by_class[1]), "3xx": load(&st.by_class[2]),
            "4xx": load(&st.by_class[3]), "5xx": load(&st.by_class[4]),
        },
        "images": load(&b.images),
        "batches": batches,
        "mean_batch_size": b.mean_batch(),
        "largest_batch": load(&b.largest),
        "abandoned_images": load(&b.abandoned),
        "mean_forward_ms": if batches == 0 { 0.0 } else { load(&b.forward_us) as f64 / batches as f64 / 1e3 },
        "predict_latency_ms": {
            "window": "last 10000 requests",
            "p50": st.latency.quantile(0.5),
            "p99": st.latency.quantile(0.99),
        },
    }))
    .into_response()
}

async fn not_found(req: Request) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no route {} {}; routes: POST /v1/predict, GET /v1/model, GET /v1/stats, GET /healthz, GET /readyz, GET /metrics, and the Open Inference Protocol's under /v2 (GET /v2/models/{{name}}, POST /v2/models/{{name}}/infer, ...)",
            req.method(),
            req.uri().path()
        ),
    )
}

fn not_ready() -> Response {
    let mut r = api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "the model is still loading; poll GET /readyz",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

#[derive(Debug, Deserialize)]
struct PredictQuery {
    /// Operating point for the decisions.
    point: Option<String>,
    /// Name echoed as `image` for a raw body.
    name: Option<String>,
    /// Add a Grad-CAM panel (PNG, base64) to each answer as `heatmap_png`.
    #[serde(default)]
    heatmap: bool,
}

/// `POST /v1/predict`: one image as the raw body, or several as `multipart/form-data`.
async fn predict(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let Some(model) = st.current() else {
        return not_ready();
    };
    let query = match Query::<PredictQuery>::try_from_uri(req.uri()) {
        Ok(Query(q)) => q,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    let (point_name, point) = match model.point(query.point.as_deref()) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let multipart = is_multipart(req.headers());
    let (parts, body) = req.into_parts();
    let bytes = match read_body(body, &parts.headers, st.limits).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body_bytes = bytes.len();
    let images: Vec<(String, Bytes)> = if multipart {
        match read_parts(Request::from_parts(parts, Body::from(bytes))).await {
            Ok(v) => v,
            Err(r) => return r,
        }
    } else {
        let name = query.name.unwrap_or_else(|| "request-body".into());
        vec![(name, bytes)]
    };

    // Decode on the blocking pool, all images of the request at once.
    let config = Arc::new(model.metadata.config.clone());
    let decodes: Vec<_> = images
        .into_iter()
        .map(|(name, bytes)| {
            let config = config.clone();
            let kept = query.heatmap.then(|| bytes.clone());
            (
                kept,
                tokio::task::spawn_blocking(move || decode_for_model(&config, name, &bytes)),
            )
        })
        .collect();
    let mut pending = Vec::with_capacity(decodes.len());
    let mut sizes = Vec::new();
    for (kept, d) in decodes {
        let decoded = match d.await {
            Ok(r) => r,
            Err(e) => {
                return api_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("decoding failed: {e}"),
                );
            }
        };
        match decoded {
            Ok(d) => {
                sizes.push(d.size.clone());
                let heat = match kept {
                    Some(bytes) => match st.batcher.explain(d.input.clone(), model.generation) {
                        Ok(rx) => Some((bytes, d.crop, d.source, rx)),
                        Err(e) => return batch_error(e),
                    },
                    None => None,
                };
                match st.batcher.submit(d.input, model.generation) {
                    Ok(rx) => pending.push(Ok((d.name, rx, heat, d.refusal))),
                    Err(e) => return batch_error(e),
                }
            }
            Err(e) => pending.push(Err(e)),
        }
    }

    let n = pending.len();
    let mut answers = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut first_error: Option<&'static str> = None;
    for p in pending {
        match p {
            Ok((name, rx, heat, refusal)) => match rx.await {
                Ok(Ok(mut prediction)) => {
                    prediction.check = refusal;
                    let mut v = prediction_json(
                        &prediction,
                        &model.metadata.config.heads,
                        &Answered {
                            image: &name,
                            backend: model.backend,
                            model: &model.name,
                            model_version: &model.version,
                            point,
                            point_name: &point_name,
                            elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
                        },
                    );
                    // The name clients address it by, which `predict --json` has no use for.
                    v["model_name"] = json!(model.served_name);
                    if let Some((bytes, crop, source, rx)) = heat {
                        match panel(
                            &model,
                            &prediction,
                            (point, &point_name),
                            bytes,
                            crop,
                            source,
                            rx,
                        )
                        .await
                        {
                            Ok(png) => v["heatmap_png"] = json!(png),
                            Err(r) => return r,
                        }
                    }
                    answers.push(v);
                    statuses.push(StatusCode::OK);
                }
                Ok(Err(e)) => return batch_error(e),
                Err(_) => return batch_error(BatchError::Stopped),
            },
            Err(e) => {
                first_error.get_or_insert(e.kind);
                statuses.push(image_status(&e));
                answers.push(error_json(&e));
            }
        }
    }
    // A single image answers with its own status; several answer 200 when any succeeded,
    // each failed one carrying its error object, as in `predict --json`.
    let status = if statuses.contains(&StatusCode::OK) {
        StatusCode::OK
    } else {
        statuses[0]
    };
    let kind = if status == StatusCode::OK {
        "ok"
    } else {
        first_error.unwrap_or("error")
    };
    let body = if multipart {
        Value::Array(answers)
    } else {
        answers.pop().expect("one answer for one image")
    };
    let mut r = (status, axum::Json(body)).into_response();
    r.extensions_mut().insert(Outcome {
        images: n,
        body_bytes,
        sizes,
        kind,
    });
    r
}

/// The heat map panel of one answered image, base64 PNG.
async fn panel(
    model: &ModelInfo,
    prediction: &retina_model::Prediction,
    (point, point_name): (&OperatingPoint, &str),
    bytes: Bytes,
    crop: retina_model::CropBox,
    source: (u32, u32),
    rx: tokio::sync::oneshot::Receiver<Result<crate::heatmap::HeatMap, BatchError>>,
) -> Result<String, Response> {
    let heat = match rx.await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return Err(batch_error(e)),
        Err(_) => return Err(batch_error(BatchError::Stopped)),
    };
    let pre = model.metadata.config.preprocess.clone();
    let caption =
        crate::heatmap::caption(&model.metadata.config.heads, prediction, point, point_name);
    let png = tokio::task::spawn_blocking(move || {
        let photo = crate::heatmap::Photo {
            bytes: &bytes,
            name: "request",
            crop,
            source,
        };
        crate::heatmap::panel_png(
            &pre,
            photo,
            &heat,
            &caption,
            crate::heatmap::DEFAULT_MAX_SIDE,
        )
    })
    .await;
    match png {
        Ok(Ok(png)) => {
            use base64::Engine as _;
            Ok(base64::engine::general_purpose::STANDARD.encode(png))
        }
        Ok(Err(e)) => Err(api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("drawing the heat map failed: {e:#}"),
        )),
        Err(e) => Err(api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("drawing the heat map failed: {e}"),
        )),
    }
}

fn is_multipart(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        })
}

/// Reads the whole body, refusing it early (by its declared length) or as soon as it grows
/// past the limit, and giving up on clients that stall.
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limits: Limits,
) -> Result<Bytes, Response> {
    let too_large = || {
        api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the request body is over the {:.1} MiB limit (--max-body-mb)",
                limits.max_body as f64 / (1 << 20) as f64
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(
        limits.body_timeout,
        axum::body::to_bytes(body, limits.max_body),
    )
    .await
    {
        Err(_) => Err(api_error(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request body did not arrive within {} s",
                limits.body_timeout.as_secs_f64()
            ),
        )),
        Ok(Err(e)) => {
            let inner = e.into_inner();
            if inner.is::<http_body_util::LengthLimitError>() {
                Err(too_large())
            } else {
                Err(api_error(
                    StatusCode::BAD_REQUEST,
                    "body_read",
                    format!("could not read the request body: {inner}"),
                ))
            }
        }
        Ok(Ok(b)) if b.is_empty() => Err(api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty",
            "the request body is empty: send the image bytes, or multipart/form-data with files",
        )),
        Ok(Ok(b)) => Ok(b),
    }
}

/// Every part of a multipart body is one image, named by its file name (or field name).
async fn read_parts(req: Request) -> Result<Vec<(String, Bytes)>, Response> {
    let mut mp = Multipart::from_request(req, &())
        .await
        .map_err(|e| api_error(StatusCode::BAD_REQUEST, "bad_multipart", e.body_text()))?;
    let mut out = Vec::new();
    loop {
        match mp.next_field().await {
            Ok(Some(field)) => {
                let name = field
                    .file_name()
                    .or(field.name())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("part-{}", out.len() + 1));
                let bytes = field.bytes().await.map_err(|e| {
                    api_error(StatusCode::BAD_REQUEST, "bad_multipart", e.body_text())
                })?;
                out.push((name, bytes));
            }
            Ok(None) => break,
            Err(e) => {
                return Err(api_error(
                    StatusCode::BAD_REQUEST,
                    "bad_multipart",
                    e.body_text(),
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty",
            "the multipart body holds no parts: attach one or more image files",
        ));
    }
    Ok(out)
}

/// One image of a request, prepared for the model.
pub(super) struct Decoded {
    pub name: String,
    pub input: Vec<f32>,
    /// `WxH` of the photograph, for the log.
    pub size: String,
    pub crop: retina_model::CropBox,
    pub source: (u32, u32),
    /// The gradability check's refusal, attached to the prediction when it comes back.
    pub refusal: Option<retina_model::Refusal>,
}

/// Decodes and prepares one image for a model with `config`, and runs its gradability check.
pub(super) fn decode_for_model(
    config: &retina_model::RetinaConfig,
    name: String,
    bytes: &[u8],
) -> Result<Decoded, ImageError> {
    let p = config
        .preprocess
        .prepare_bytes(bytes, &name)
        .map_err(|e| image_error(name.clone(), e))?;
    Ok(Decoded {
        size: format!("{}x{}", p.source_size.0, p.source_size.1),
        refusal: config.gradability().check(&p.view, p.disc_found),
        name,
        input: p.input,
        crop: p.crop,
        source: p.source_size,
    })
}

/// 415 when the bytes are no image format we read; 422 when they are one but cannot be used.
pub(super) fn image_status(e: &ImageError) -> StatusCode {
    match e.kind {
        "not_an_image" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

fn batch_error(e: BatchError) -> Response {
    batch_error_as(e, api_error)
}

/// A queue or model failure as an answer in the form `make` writes (`/v1`'s or the protocol's):
/// 503 with `Retry-After` when trying again helps, 500 when the forward pass failed.
pub(super) fn batch_error_as(
    e: BatchError,
    make: fn(StatusCode, &'static str, String) -> Response,
) -> Response {
    let (status, kind) = match e {
        BatchError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        BatchError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        BatchError::Replaced => (StatusCode::SERVICE_UNAVAILABLE, "replaced"),
        BatchError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    let mut r = make(status, kind, e.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// Request id, one log line per request, JSON bodies for the router's own bare errors.
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:08x}", st.next_id.fetch_add(1, Ordering::Relaxed)));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // The route template, so that the metrics' label values stay few.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let mut resp = next.run(req).await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED
        && !resp.headers().contains_key(header::CONTENT_TYPE)
    {
        // The router adds the `Allow` header itself, after this layer.
        resp = api_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{method} is not allowed on {path}; the Allow header lists the methods it takes"
            ),
        );
    }
    let status = resp.status();
    let latency_ms = t0.elapsed().as_secs_f64() * 1e3;
    st.requests.fetch_add(1, Ordering::Relaxed);
    let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
    st.by_class[class].fetch_add(1, Ordering::Relaxed);
    let outcome = resp
        .extensions()
        .get::<Outcome>()
        .cloned()
        .unwrap_or(Outcome {
            kind: if status.is_success() { "ok" } else { "error" },
            ..Outcome::default()
        });
    if path == "/v1/predict" && status.is_success() {
        st.latency.record(latency_ms);
    }
    st.metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route.clone(),
            method: method.to_string(),
            status: status.as_u16().to_string(),
        })
        .inc();
    st.metrics
        .latency
        .get_or_create(&RouteLabels { route })
        .observe(latency_ms / 1e3);
    // Names and sizes only: image bytes never reach the log.
    tracing::info!(
        request_id = %id,
        method = %method,
        path = %path,
        status = status.as_u16(),
        outcome = %outcome.kind,
        images = outcome.images,
        body_bytes = outcome.body_bytes,
        image_sizes = %outcome.sizes.join(","),
        latency_ms = (latency_ms * 1000.0).round() / 1000.0,
        "request"
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
