//! The Open Inference Protocol (KServe v2) REST subset beside `/v1`: health, model metadata and
//! readiness, and `infer` with a BYTES input of encoded images or an FP32 input of network
//! inputs, as JSON or binary data.

use super::{find_model, read_body, refuse, run_job, run_network_inputs_job, AppState, ImageVerdict, Refusal, ServedModel};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use std::sync::Arc;
use std::time::Instant;

/// The header that gives the length of the JSON part of a body with binary tensor data.
const HEADER_LENGTH: &str = "inference-header-content-length";
/// The version every served model is listed under.
const VERSION: &str = "1";

/// Routes that score or describe models (behind the token, when one is set).
///
/// An infer request's input is one BYTES tensor of N elements, each an encoded image (PNG, JPEG,
/// BMP, TIFF): in JSON `data` as base64 strings, or in the binary tensor extension (the body is
/// `Inference-Header-Content-Length` bytes of JSON, then each element as a 4-byte little-endian
/// length and its bytes). Or an FP32 tensor [N, 3, 448, 448] of network inputs, preprocessed as
/// the exported ONNX graph's `input` (docs/deploy.md), each image's test views consecutive. Outputs per image: `score` (FP64), with a threshold `pred_label` (BOOL)
/// and with a threshold and score range `pred_score` (FP64), in JSON or, when asked (`binary_data`, `binary_data_output`),
/// as binary data. Images go through the same limits, queue and 4xx answers as `/v1/score`.
pub fn model_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_version))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_version))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_version))
}

/// Routes for probes and clients' discovery (always open).
pub fn open_routes() -> Router<Arc<AppState>> {
    Router::new().route("/v2", get(server_metadata)).route("/v2/health/live", get(live)).route("/v2/health/ready", get(ready))
}

async fn server_metadata(State(state): State<Arc<AppState>>) -> Response {
    state.count("/v2", StatusCode::OK);
    Json(serde_json::json!({"name": "differnet", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]}))
        .into_response()
}

async fn live(State(state): State<Arc<AppState>>) -> Response {
    state.count("/v2/health/live", StatusCode::OK);
    Json(serde_json::json!({"live": true})).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ready = !state.models().is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    state.count("/v2/health/ready", status);
    (status, Json(serde_json::json!({"ready": ready}))).into_response()
}

/// The outputs a model gives: `pred_label` needs its threshold, `pred_score` also its score range.
fn available_outputs(m: &crate::model::Manifest) -> Vec<&'static str> {
    let mut names = vec!["score"];
    if m.threshold.is_some() && m.score_range.is_some() {
        names.push("pred_score");
    }
    if m.threshold.is_some() {
        names.push("pred_label");
    }
    names
}

/// The served model `name`, if `version` (when given) is the one it is served under.
fn model_at(state: &AppState, name: &str, version: Option<&str>) -> Result<Arc<ServedModel>, Refusal> {
    let model = find_model(state, Some(name))?;
    match version {
        Some(v) if v != VERSION => Err((StatusCode::NOT_FOUND, format!("model `{name}` has only version {VERSION}, not `{v}`"))),
        _ => Ok(model),
    }
}

fn metadata(state: &AppState, name: &str, version: Option<&str>) -> Response {
    let response = match model_at(state, name, version) {
        Ok(model) => {
            let m = &model.detector.model.manifest;
            let outputs: Vec<serde_json::Value> = available_outputs(m)
                .iter()
                .map(|&name| serde_json::json!({"name": name, "datatype": if name == "pred_label" { "BOOL" } else { "FP64" }, "shape": [-1]}))
                .collect();
            Json(serde_json::json!({
                "name": model.name,
                "versions": [VERSION],
                "platform": "differnet",
                "inputs": [{"name": "input", "datatype": "BYTES", "shape": [-1]}],
                "outputs": outputs,
                "parameters": {
                    "backbone": m.backbone.id(),
                    "test_views": m.test_views,
                    "threshold": m.threshold.as_ref().map(|t| t.value),
                    "model_id": m.parameters_sha256.chars().take(16).collect::<String>(),
                },
            }))
            .into_response()
        }
        Err(r) => refuse(r),
    };
    state.count("/v2/models/metadata", response.status());
    response
}

async fn model_metadata(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    metadata(&state, &name, None)
}

async fn model_metadata_version(State(state): State<Arc<AppState>>, Path((name, version)): Path<(String, String)>) -> Response {
    metadata(&state, &name, Some(&version))
}

fn readiness(state: &AppState, name: &str, version: Option<&str>) -> Response {
    let response = match model_at(state, name, version) {
        Ok(_) => Json(serde_json::json!({"name": name, "ready": true})).into_response(),
        Err(r) => refuse(r),
    };
    state.count("/v2/models/ready", response.status());
    response
}

async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    readiness(&state, &name, None)
}

async fn model_ready_version(State(state): State<Arc<AppState>>, Path((name, version)): Path<(String, String)>) -> Response {
    readiness(&state, &name, Some(&version))
}

#[derive(serde::Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(serde::Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

fn flag(parameters: &Option<serde_json::Map<String, serde_json::Value>>, key: &str) -> Option<bool> {
    parameters.as_ref()?.get(key)?.as_bool()
}

fn bad_request(message: impl Into<String>) -> Refusal {
    (StatusCode::BAD_REQUEST, message.into())
}

/// Splits a body into its JSON request and the binary data after it.
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(InferRequest, &'a [u8]), Refusal> {
    let json_len =
        match headers.get(HEADER_LENGTH) {
            None => body.len(),
            Some(v) => v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).filter(|&n| n <= body.len()).ok_or_else(|| {
                bad_request(format!("{HEADER_LENGTH} must be a number of bytes no larger than the body ({})", body.len()))
            })?,
        };
    let request = serde_json::from_slice(&body[..json_len]).map_err(|e| bad_request(format!("inference request JSON: {e}")))?;
    Ok((request, &body[json_len..]))
}

/// What a request's one input holds.
enum Inputs {
    /// Encoded images, named `input[i]`.
    Images(Vec<(String, Vec<u8>)>),
    /// Network inputs, [N, 3, 448, 448] row-major (the exported ONNX graph's `input`).
    NetworkInputs(Vec<f32>),
}

/// The request's one input: a BYTES tensor of encoded images, or an FP32 tensor of network
/// inputs, `views` rows per image.
fn request_inputs(request: &InferRequest, binary: &[u8], views: usize, combined: bool) -> Result<Inputs, Refusal> {
    let [input] = request.inputs.as_slice() else {
        return Err(bad_request(format!("one input (a BYTES tensor of encoded images) expected, got {}", request.inputs.len())));
    };
    if input.datatype == "FP32" {
        return network_inputs(input, binary, views, combined).map(Inputs::NetworkInputs);
    }
    input_images(input, binary).map(Inputs::Images)
}

/// An FP32 input [N, 3, 448, 448] of network inputs (preprocessed as docs/deploy.md says), the
/// `views` views of each image consecutive.
fn network_inputs(input: &InputTensor, binary: &[u8], views: usize, combined: bool) -> Result<Vec<f32>, Refusal> {
    let side = crate::backbone::INPUT_SIZE as i64;
    let [n, 3, h, w] = input.shape.as_slice() else {
        return Err(bad_request(format!("FP32 input shape {:?}: expected [N, 3, {side}, {side}]", input.shape)));
    };
    if (*h, *w) != (side, side) || *n < 1 {
        return Err(bad_request(format!("FP32 input shape {:?}: expected [N, 3, {side}, {side}] with N >= 1", input.shape)));
    }
    let n = usize::try_from(*n).map_err(|_| bad_request("FP32 input: N is too large"))?;
    if !n.is_multiple_of(views) {
        return Err(bad_request(format!("FP32 input: {n} rows are not whole images of {views} views each")));
    }
    if combined && views > 1 {
        return Err(bad_request(format!(
            "FP32 input: this model combines the flow's score with its feature map over {views} rotated views; send encoded images"
        )));
    }
    let count = n.checked_mul(3 * (side * side) as usize).ok_or_else(|| bad_request("FP32 input: N is too large"))?;
    let size = input.parameters.as_ref().and_then(|p| p.get("binary_data_size"));
    let values: Vec<f32> = match (size, &input.data) {
        (Some(_), None) => {
            if binary.len() != count * 4 {
                return Err(bad_request(format!(
                    "FP32 input of shape {:?} needs {} bytes of binary data, got {}",
                    input.shape,
                    count * 4,
                    binary.len()
                )));
            }
            binary.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        (None, Some(data)) => {
            let mut values = Vec::with_capacity(count);
            flatten_numbers(data, &mut values).map_err(bad_request)?;
            values
        }
        (Some(_), Some(_)) => return Err(bad_request("an input has either `data` or `binary_data_size`, not both")),
        (None, None) => return Err(bad_request(format!("input `{}` has no data", input.name))),
    };
    if values.len() != count {
        return Err(bad_request(format!("FP32 input shape {:?} says {count} values, the data holds {}", input.shape, values.len())));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad_request(format!("FP32 input value {i} is not finite")));
    }
    Ok(values)
}

/// The numbers of an FP32 tensor's JSON `data`, flat or nested, in row-major order.
fn flatten_numbers(v: &serde_json::Value, out: &mut Vec<f32>) -> Result<(), String> {
    match v {
        serde_json::Value::Array(items) => items.iter().try_for_each(|i| flatten_numbers(i, out)),
        serde_json::Value::Number(x) => {
            out.push(x.as_f64().ok_or("FP32 data holds a number out of range")? as f32);
            Ok(())
        }
        other => Err(format!("FP32 data holds numbers, not {other}")),
    }
}

/// The encoded images of a BYTES input, named `input[i]`.
fn input_images(input: &InputTensor, binary: &[u8]) -> Result<Vec<(String, Vec<u8>)>, Refusal> {
    if input.datatype != "BYTES" {
        return Err(bad_request(format!(
            "input `{}` is {}: this service takes BYTES elements holding encoded images (PNG, JPEG, BMP, TIFF), or FP32 network inputs [N, 3, 448, 448]",
            input.name, input.datatype
        )));
    }
    let n = input.shape.iter().try_fold(1i64, |acc, &d| if d < 0 { None } else { acc.checked_mul(d) });
    let n = n.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| bad_request(format!("input shape {:?} is not a size", input.shape)))?;
    let size = input.parameters.as_ref().and_then(|p| p.get("binary_data_size"));
    let elements: Vec<Vec<u8>> = match (size, &input.data) {
        (Some(size), None) => {
            let size =
                size.as_u64().and_then(|s| usize::try_from(s).ok()).ok_or_else(|| bad_request("binary_data_size must be a number"))?;
            if size != binary.len() {
                return Err(bad_request(format!("binary_data_size {size} but {} bytes of binary data follow the JSON", binary.len())));
            }
            binary_elements(binary)?
        }
        (None, Some(data)) => {
            let mut strings = vec![];
            flatten_strings(data, &mut strings).map_err(bad_request)?;
            strings
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| {
                        bad_request(format!("input element {i} is not base64 (JSON BYTES elements hold base64-encoded images): {e}"))
                    })
                })
                .collect::<Result<_, _>>()?
        }
        (Some(_), Some(_)) => return Err(bad_request("an input has either `data` or `binary_data_size`, not both")),
        (None, None) => return Err(bad_request(format!("input `{}` has no data", input.name))),
    };
    if elements.len() != n {
        return Err(bad_request(format!("input shape {:?} says {n} elements, the data holds {}", input.shape, elements.len())));
    }
    if elements.is_empty() || elements.iter().any(Vec::is_empty) {
        return Err(bad_request("empty input: send one encoded image per element"));
    }
    Ok(elements.into_iter().enumerate().map(|(i, b)| (format!("{}[{i}]", input.name), b)).collect())
}

/// BYTES elements in the binary extension's layout: each a 4-byte little-endian length, then
/// that many bytes.
fn binary_elements(mut data: &[u8]) -> Result<Vec<Vec<u8>>, Refusal> {
    let mut out = vec![];
    while !data.is_empty() {
        let Some((len, rest)) = data.split_first_chunk::<4>() else {
            return Err(bad_request("binary BYTES data ends inside an element's 4-byte length"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(bad_request(format!("a binary BYTES element claims {len} bytes, {} remain", rest.len())));
        }
        out.push(rest[..len].to_vec());
        data = &rest[len..];
    }
    Ok(out)
}

/// The strings of a (possibly nested) JSON array, in row-major order.
fn flatten_strings(v: &serde_json::Value, out: &mut Vec<String>) -> Result<(), String> {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => {
            for item in items {
                flatten_strings(item, out)?;
            }
        }
        other => return Err(format!("BYTES data holds strings (base64 images), not {other}")),
    }
    Ok(())
}

/// One output tensor: its JSON description and, when binary, its bytes.
fn output_tensor(name: &str, verdicts: &[ImageVerdict], binary: bool) -> Result<(serde_json::Value, Vec<u8>), Refusal> {
    let n = verdicts.len();
    let needs_threshold =
        || bad_request(format!("output `{name}` needs a threshold and a score range, and this model lacks them (`differnet calibrate`)"));
    let (datatype, values, bytes): (&str, serde_json::Value, Vec<u8>) = match name {
        "score" => {
            let s: Vec<f64> = verdicts.iter().map(|v| v.score).collect();
            ("FP64", serde_json::json!(s), s.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        "pred_score" => {
            let s: Vec<f64> = verdicts.iter().map(|v| v.pred_score.ok_or_else(needs_threshold)).collect::<Result<_, _>>()?;
            ("FP64", serde_json::json!(s), s.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        "pred_label" => {
            let l: Vec<bool> = verdicts.iter().map(|v| v.pred_label.ok_or_else(needs_threshold)).collect::<Result<_, _>>()?;
            ("BOOL", serde_json::json!(l), l.iter().map(|&b| b as u8).collect())
        }
        other => return Err(bad_request(format!("no output named `{other}` (score, pred_score, pred_label)"))),
    };
    Ok(if binary {
        (serde_json::json!({"name": name, "datatype": datatype, "shape": [n], "parameters": {"binary_data_size": bytes.len()}}), bytes)
    } else {
        (serde_json::json!({"name": name, "datatype": datatype, "shape": [n], "data": values}), vec![])
    })
}

async fn infer(State(state): State<Arc<AppState>>, Path(name): Path<String>, headers: HeaderMap, request: Request) -> Response {
    infer_route(&state, &name, None, &headers, request).await
}

async fn infer_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    infer_route(&state, &name, Some(&version), &headers, request).await
}

async fn infer_route(state: &Arc<AppState>, name: &str, version: Option<&str>, headers: &HeaderMap, request: Request) -> Response {
    let start = Instant::now();
    let response = infer_inner(state, name, version, headers, request).await.unwrap_or_else(|r| r);
    state.count("/v2/models/infer", response.status());
    if response.status().is_success() {
        state.observe(start.elapsed().as_secs_f64());
    }
    response
}

async fn infer_inner(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, Response> {
    let model = model_at(state, name, version).map_err(refuse)?;
    let body = read_body(state, request).await?;
    let (request, binary) = split_body(headers, &body).map_err(refuse)?;
    let d = &model.detector;
    let combined = matches!(d.model.manifest.image_score, crate::model::ImageScore::FlowAndMapMax(_));
    let inputs = request_inputs(&request, binary, d.views(state.limits.views).len(), combined).map_err(refuse)?;
    let available = available_outputs(&d.model.manifest);
    let verdicts = match inputs {
        Inputs::Images(images) => run_job(state, model.clone(), images, false).await?,
        Inputs::NetworkInputs(rows) => run_network_inputs_job(state, model.clone(), rows).await?,
    };
    let all_binary = flag(&request.parameters, "binary_data_output").unwrap_or(false);
    let wanted: Vec<(String, bool)> = match &request.outputs {
        Some(outputs) => outputs.iter().map(|o| (o.name.clone(), flag(&o.parameters, "binary_data").unwrap_or(all_binary))).collect(),
        None => available.iter().map(|n| (n.to_string(), all_binary)).collect(),
    };
    let mut outputs = vec![];
    let mut data = vec![];
    for (name, binary) in &wanted {
        let (description, bytes) = output_tensor(name, &verdicts, *binary).map_err(refuse)?;
        outputs.push(description);
        data.extend(bytes);
    }
    let mut head = serde_json::json!({"model_name": model.name, "model_version": VERSION, "outputs": outputs});
    if let Some(id) = &request.id {
        head["id"] = serde_json::json!(id);
    }
    if wanted.iter().all(|(_, binary)| !binary) {
        return Ok(Json(head).into_response());
    }
    let mut body = serde_json::to_vec(&head).expect("JSON serializes");
    let json_len = body.len();
    body.extend(data);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static(HEADER_LENGTH), json_len.to_string()),
        ],
        body,
    )
        .into_response())
}
