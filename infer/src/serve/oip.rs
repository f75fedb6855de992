//! The Open Inference Protocol (KServe v2) over HTTP/REST, beside `/v1`: what inference
//! gateways and the stock clients of Triton, KServe, Seldon MLServer and OpenVINO Model Server
//! speak.
//!
//! The model takes one input, `image`: `BYTES` of shape `[N]` (or `[N, 1]`), each element the
//! encoded file (JPEG, PNG, ...). In a JSON body a `BYTES` element is a string, which cannot hold
//! arbitrary bytes, so it is read as base64; the binary tensor data extension (the
//! `Inference-Header-Content-Length` header, which `tritonclient` uses) carries the raw bytes.
//! Outputs are named after the heads (see [`output_specs`]); they are answered in JSON, or as
//! binary data where the request asks for it (`binary_data` on an output, `binary_data_output`
//! on the request). Errors answer `{"error": "..."}`.

// As in `api`: handlers return their finished error `Response` as the `Err`.
#![allow(clippy::result_large_err)]

use super::api::{AppState, ModelInfo, Outcome, decode_for_model};
use super::batcher::BatchError;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use retina_model::{HeadAnswer, HeadKind, HeadSpec, OperatingPoint, Prediction};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Instant;

/// The header of the binary tensor data extension: the length of the JSON part.
const HEADER_LENGTH: &str = "inference-header-content-length";
/// The one input.
pub const INPUT: &str = "image";

/// An error in the protocol's form.
pub fn error(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Response {
    let mut r = (status, axum::Json(json!({"error": message.into()}))).into_response();
    r.extensions_mut().insert(Outcome {
        kind,
        ..Outcome::default()
    });
    r
}

fn not_ready() -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "the model is still loading; poll GET /v2/health/ready",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// The model asked for by name (and version, where given), or the error to answer.
fn find(st: &AppState, name: &str, version: Option<&str>) -> Result<Arc<ModelInfo>, Response> {
    let Some(m) = st.current() else {
        return Err(not_ready());
    };
    if name != m.served_name {
        return Err(error(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!("no model `{name}`; this server serves `{}`", m.served_name),
        ));
    }
    if let Some(v) = version
        && v != m.version
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            "unknown_version",
            format!(
                "model `{name}` has no version `{v}`; the version serving is `{}`",
                m.version
            ),
        ));
    }
    Ok(m)
}

/// `GET /v2`: server metadata.
pub async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "retina-infer",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository"],
    }))
    .into_response()
}

/// `GET /v2/health/live`.
pub async fn live() -> Response {
    axum::Json(json!({"live": true})).into_response()
}

/// `GET /v2/health/ready`: 200 once the model is loaded, 503 before and while draining.
pub async fn ready(State(st): State<Arc<AppState>>) -> Response {
    let ready = st.current().is_some() && !st.is_draining();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({"ready": ready}))).into_response()
}

/// One output tensor of the model: name, datatype and shape (-1 for the batch).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    /// Tensor name.
    pub name: String,
    /// `FP32`, `INT64` or `BOOL`.
    pub datatype: &'static str,
    /// Shape, `-1` for the batch dimension.
    pub shape: Vec<i64>,
    what: What,
}

#[derive(Debug, Clone, PartialEq)]
enum What {
    Probabilities(String),
    Class(String),
    Probability(String),
    Decision(String),
    Value(String),
    Gradable,
    Reason,
}

/// The outputs, from the heads: a multiclass head `h` gives `h_probabilities` (FP32 `[N, C]`)
/// and `h_<answer key>` (INT64 `[N]`, e.g. `diagnosis_grade`), and its decision `d` gives
/// `d_probability` (FP32 `[N]`) and `d` (BOOL `[N]`, e.g. `referable`); a binary head gives
/// `h_probability` and `h_<answer key>` (BOOL, e.g. `fluid_present`); a regression gives `h`
/// (FP32 `[N]`, e.g. `vessel_growth`). Every model adds `gradable` (BOOL `[N]`) and
/// `ungradable_reason` (BYTES `[N]`, empty when gradable): for an ungradable image every other
/// decision reads false, since it was not made; `gradable` says which.
pub fn output_specs(heads: &[HeadSpec]) -> Vec<OutputSpec> {
    let mut out = Vec::new();
    let mut push = |name: String, datatype, shape: Vec<i64>, what| {
        out.push(OutputSpec {
            name,
            datatype,
            shape,
            what,
        })
    };
    for h in heads {
        let n = &h.name;
        match h.kind {
            HeadKind::Multiclass(c) => {
                push(
                    format!("{n}_probabilities"),
                    "FP32",
                    vec![-1, c as i64],
                    What::Probabilities(n.clone()),
                );
                push(
                    format!("{n}_{}", h.answer_key()),
                    "INT64",
                    vec![-1],
                    What::Class(n.clone()),
                );
                if let Some(d) = h.decision_rule() {
                    push(
                        format!("{}_probability", d.name),
                        "FP32",
                        vec![-1],
                        What::Probability(d.name.clone()),
                    );
                    push(d.name.clone(), "BOOL", vec![-1], What::Decision(d.name));
                }
            }
            HeadKind::Binary => {
                push(
                    format!("{n}_probability"),
                    "FP32",
                    vec![-1],
                    What::Probability(n.clone()),
                );
                push(
                    format!("{n}_{}", h.answer_key()),
                    "BOOL",
                    vec![-1],
                    What::Decision(n.clone()),
                );
            }
            HeadKind::Regression => {
                push(n.clone(), "FP32", vec![-1], What::Value(n.clone()));
            }
        }
    }
    push("gradable".into(), "BOOL", vec![-1], What::Gradable);
    push("ungradable_reason".into(), "BYTES", vec![-1], What::Reason);
    out
}

/// `GET /v2/models/{name}`.
pub async fn model_metadata(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    metadata(&st, &name, None)
}

/// `GET /v2/models/{name}/versions/{version}`.
pub async fn model_version_metadata(
    State(st): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata(&st, &name, Some(&version))
}

fn metadata(st: &AppState, name: &str, version: Option<&str>) -> Response {
    let m = match find(st, name, version) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let outputs: Vec<Value> = output_specs(&m.metadata.config.heads)
        .iter()
        .map(|o| json!({"name": o.name, "datatype": o.datatype, "shape": o.shape}))
        .collect();
    axum::Json(json!({
        "name": m.served_name,
        "versions": [m.version],
        "platform": "retina",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
        "parameters": {
            "operating_points": m.metadata.operating_points.keys().collect::<Vec<_>>(),
            "default_operating_point": m.metadata.default_point,
            "class_names": m.metadata.class_names(),
        },
    }))
    .into_response()
}

/// `GET /v2/models/{name}/ready` (and with a version).
pub async fn model_ready(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match find(&st, &name, None) {
        Ok(_) if !st.is_draining() => {
            axum::Json(json!({"name": name, "ready": true})).into_response()
        }
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"name": name, "ready": false})),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// `GET /v2/models/{name}/versions/{version}/ready`.
pub async fn model_version_ready(
    State(st): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    match find(&st, &name, Some(&version)) {
        Ok(_) => axum::Json(json!({"name": name, "ready": !st.is_draining()})).into_response(),
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputTensor>,
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// `POST /v2/models/{name}/infer`.
pub async fn infer(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    infer_at(st, name, None, req).await
}

/// `POST /v2/models/{name}/versions/{version}/infer`.
pub async fn infer_version(
    State(st): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    req: Request,
) -> Response {
    infer_at(st, name, Some(version), req).await
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

async fn infer_at(
    st: Arc<AppState>,
    name: String,
    version: Option<String>,
    req: Request,
) -> Response {
    let t0 = Instant::now();
    let model = match find(&st, &name, version.as_deref()) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let (parts, body) = req.into_parts();
    let bytes = match super::api::read_body(body, &parts.headers, st.limits).await {
        Ok(b) => b,
        Err(r) => return as_protocol_error(r).await,
    };
    let body_bytes = bytes.len();
    let (request, binary) = match split_binary(&parts.headers, &bytes) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let point_name = match request.parameters.get("operating_point") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return bad(format!(
                "parameter operating_point must be a string, got {other}"
            ));
        }
    };
    let (point_name, point) = match model.metadata.point(point_name) {
        Ok((n, p)) => (n, p.clone()),
        Err(e) => return bad(e.to_string()),
    };
    let images = match input_images(&request, &binary) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let specs = output_specs(&model.metadata.config.heads);
    let (wanted, binary_out) = match requested_outputs(&request, &specs) {
        Ok(v) => v,
        Err(r) => return r,
    };

    let n = images.len();
    let mut sizes = Vec::with_capacity(n);
    let mut pending = Vec::with_capacity(n);
    let decodes: Vec<_> = images
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            let config = model.metadata.config.clone();
            tokio::task::spawn_blocking(move || {
                decode_for_model(&config, format!("{INPUT}[{i}]"), &bytes)
            })
        })
        .collect();
    for d in decodes {
        match d.await {
            Ok(Ok(d)) => {
                sizes.push(d.size);
                match st.batcher.submit(d.input, model.generation) {
                    Ok(rx) => pending.push((rx, d.refusal)),
                    Err(e) => return batch_error(e),
                }
            }
            Ok(Err(e)) => {
                let status = super::api::image_status(&e);
                return error(status, e.kind, format!("{}: {}", e.image, e.message));
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("decoding failed: {e}"),
                );
            }
        }
    }
    let mut predictions = Vec::with_capacity(n);
    for (rx, refusal) in pending {
        match rx.await {
            Ok(Ok(mut p)) => {
                p.check = refusal;
                predictions.push(p)
            }
            Ok(Err(e)) => return batch_error(e),
            Err(_) => return batch_error(BatchError::Stopped),
        }
    }

    let mut outputs = Vec::new();
    let mut payload: Vec<u8> = Vec::new();
    for spec in specs
        .iter()
        .filter(|s| wanted.iter().any(|w| w.0 == s.name))
    {
        let as_binary = wanted
            .iter()
            .find(|w| w.0 == spec.name)
            .map(|w| w.1)
            .unwrap_or(false)
            || binary_out;
        let (data, raw) = tensor(spec, &predictions, &point);
        let mut shape = spec.shape.clone();
        shape[0] = n as i64;
        let mut o = json!({"name": spec.name, "datatype": spec.datatype, "shape": shape});
        if as_binary {
            o["parameters"] = json!({"binary_data_size": raw.len()});
            payload.extend_from_slice(&raw);
        } else {
            o["data"] = data;
        }
        outputs.push(o);
    }
    let mut head = json!({
        "model_name": model.served_name,
        "model_version": model.version,
        "outputs": outputs,
        "parameters": {
            "operating_point": point_name,
            "elapsed_ms": t0.elapsed().as_secs_f64() * 1e3,
        },
    });
    if let Some(id) = &request.id {
        head["id"] = json!(id);
    }
    let outcome = Outcome {
        images: n,
        body_bytes,
        sizes,
        kind: "ok",
    };
    let mut r = if payload.is_empty() {
        axum::Json(head).into_response()
    } else {
        let json_part = serde_json::to_vec(&head).expect("JSON");
        let len = json_part.len();
        let mut body = json_part;
        body.extend_from_slice(&payload);
        let mut r = Response::new(Body::from(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        r.headers_mut()
            .insert(HEADER_LENGTH, HeaderValue::from(len as u64));
        r
    };
    r.extensions_mut().insert(outcome);
    r
}

/// `/v1`'s error answers (413, 408, ...) rewritten in the protocol's form, status kept.
async fn as_protocol_error(r: Response) -> Response {
    let status = r.status();
    let kind = r
        .extensions()
        .get::<Outcome>()
        .map(|o| o.kind)
        .unwrap_or("error");
    let body = axum::body::to_bytes(r.into_body(), 1 << 16)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| status.to_string());
    error(status, kind, message)
}

fn batch_error(e: BatchError) -> Response {
    super::api::batch_error_as(e, error)
}

/// The JSON part of the body, and the binary part after it (empty without the extension).
fn split_binary(headers: &HeaderMap, body: &Bytes) -> Result<(InferRequest, Bytes), Response> {
    let json_len = match headers.get(HEADER_LENGTH) {
        None => body.len(),
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()) {
            Some(n) if n <= body.len() => n,
            _ => {
                return Err(bad(format!(
                    "the {HEADER_LENGTH} header must be a length within the {}-byte body",
                    body.len()
                )));
            }
        },
    };
    let request: InferRequest = serde_json::from_slice(&body[..json_len]).map_err(|e| {
        bad(format!(
            "the inference request is not valid JSON of the protocol: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    Ok((request, body.slice(json_len..)))
}

/// The encoded image files of the `image` input.
fn input_images(request: &InferRequest, binary: &Bytes) -> Result<Vec<Bytes>, Response> {
    if request.inputs.len() != 1 || request.inputs[0].name != INPUT {
        let names: Vec<&str> = request.inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(bad(format!(
            "this model takes one input, `{INPUT}` (BYTES: encoded image files); got {names:?}"
        )));
    }
    let input = &request.inputs[0];
    if input.datatype != "BYTES" {
        return Err(bad(format!(
            "input `{INPUT}` is BYTES (encoded image files), not {}",
            input.datatype
        )));
    }
    let count = match input.shape.as_slice() {
        [n] | [n, 1] if *n >= 1 => *n as usize,
        other => {
            return Err(bad(format!(
                "input `{INPUT}` has shape [N] or [N, 1] with N >= 1; got {other:?}"
            )));
        }
    };
    let images = match input.parameters.get("binary_data_size") {
        Some(size) => {
            let size = size
                .as_u64()
                .ok_or_else(|| bad("binary_data_size must be a non-negative integer"))?
                as usize;
            if size > binary.len() {
                return Err(bad(format!(
                    "binary_data_size {size} is beyond the {} bytes of binary data sent",
                    binary.len()
                )));
            }
            split_bytes_elements(&binary.slice(..size))?
        }
        None => {
            let data = input.data.as_ref().ok_or_else(|| {
                bad(format!(
                    "input `{INPUT}` has neither `data` nor binary data (binary_data_size)"
                ))
            })?;
            let mut flat = Vec::new();
            flatten(data, &mut flat);
            flat.iter()
                .enumerate()
                .map(|(i, v)| {
                    let s = v.as_str().ok_or_else(|| {
                        bad(format!("{INPUT}[{i}]: a BYTES element in JSON is a string"))
                    })?;
                    base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map(Bytes::from)
                        .map_err(|e| {
                            bad(format!(
                                "{INPUT}[{i}]: BYTES in a JSON body are read as base64 ({e}); \
                                 send raw bytes with the binary tensor data extension instead"
                            ))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    if images.len() != count {
        return Err(bad(format!(
            "input `{INPUT}` declares {count} elements but carries {}",
            images.len()
        )));
    }
    Ok(images)
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Binary BYTES: each element a 4-byte little-endian length, then that many bytes.
fn split_bytes_elements(data: &Bytes) -> Result<Vec<Bytes>, Response> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let Some(len) = data.get(at..at + 4) else {
            return Err(bad(
                "binary BYTES data ends inside an element's 4-byte length",
            ));
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        at += 4;
        if at + len > data.len() {
            return Err(bad(format!(
                "binary BYTES element {} declares {len} bytes, beyond the data sent",
                out.len()
            )));
        }
        out.push(data.slice(at..at + len));
        at += len;
    }
    Ok(out)
}

/// The outputs to answer (all, by default) with whether each goes as binary data, and whether
/// the request asks for every output as binary.
fn requested_outputs(
    request: &InferRequest,
    specs: &[OutputSpec],
) -> Result<(Vec<(String, bool)>, bool), Response> {
    let all_binary = request
        .parameters
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(asked) = &request.outputs else {
        return Ok((
            specs.iter().map(|s| (s.name.clone(), all_binary)).collect(),
            all_binary,
        ));
    };
    let mut out = Vec::new();
    for o in asked {
        if !specs.iter().any(|s| s.name == o.name) {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(bad(format!(
                "no output `{}`; the outputs are {}",
                o.name,
                names.join(", ")
            )));
        }
        let binary = o
            .parameters
            .get("binary_data")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        out.push((o.name.clone(), binary));
    }
    Ok((out, all_binary))
}

/// One output over the batch: its JSON data (flat, row-major) and its binary form.
fn tensor(spec: &OutputSpec, preds: &[Prediction], point: &OperatingPoint) -> (Value, Vec<u8>) {
    let mut raw = Vec::new();
    let data: Vec<Value> = match &spec.what {
        What::Probabilities(h) => preds
            .iter()
            .flat_map(|p| match p.heads.get(h) {
                Some(HeadAnswer::Multiclass { probabilities, .. }) => probabilities.clone(),
                _ => Vec::new(),
            })
            .inspect(|v| raw.extend_from_slice(&v.to_le_bytes()))
            .map(|v| json!(v))
            .collect(),
        What::Class(h) => preds
            .iter()
            .map(|p| p.class(h).unwrap_or(0) as i64)
            .inspect(|v| raw.extend_from_slice(&v.to_le_bytes()))
            .map(|v| json!(v))
            .collect(),
        What::Probability(d) => preds
            .iter()
            .map(|p| p.decision_probability(d).unwrap_or(f32::NAN))
            .inspect(|v| raw.extend_from_slice(&v.to_le_bytes()))
            .map(|v| json!(v))
            .collect(),
        What::Decision(d) => preds
            .iter()
            .map(|p| p.decide(d, point) == Some(true))
            .inspect(|v| raw.push(u8::from(*v)))
            .map(|v| json!(v))
            .collect(),
        What::Value(h) => preds
            .iter()
            .map(|p| p.value(h).unwrap_or(f32::NAN))
            .inspect(|v| raw.extend_from_slice(&v.to_le_bytes()))
            .map(|v| json!(v))
            .collect(),
        What::Gradable => preds
            .iter()
            .map(|p| p.gradable(point))
            .inspect(|v| raw.push(u8::from(*v)))
            .map(|v| json!(v))
            .collect(),
        // BYTES in the binary extension: each element a 4-byte little-endian length, then
        // its bytes.
        What::Reason => preds
            .iter()
            .map(|p| p.refusal(point).map(|r| r.reason).unwrap_or_default())
            .inspect(|v| {
                raw.extend_from_slice(&(v.len() as u32).to_le_bytes());
                raw.extend_from_slice(v.as_bytes());
            })
            .map(|v| json!(v))
            .collect(),
    };
    (Value::Array(data), raw)
}

/// `POST /v2/repository/models/{name}/load`: loads the bundle from disk again; the old model
/// keeps serving when the new one is refused.
pub async fn load(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if let Err(r) = find(&st, &name, None) {
        return r;
    }
    match super::reload(st.clone()).await {
        Ok(m) => axum::Json(json!({"name": m.served_name, "version": m.version})).into_response(),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "reload_refused",
            format!("the bundle on disk was not loaded, the old model keeps serving: {e:#}"),
        ),
    }
}
