//! The inspection service (`differnet serve`): `/v1` and Open Inference Protocol routes over a
//! bounded queue and worker pool; size limits, timeouts, a connection cap, a token, metrics, reload.

pub mod open_inference;

use crate::localize::MapKind;
use crate::pipeline::{Detector, OpenOptions};
use crate::views::{decode_rgb, Rgb8};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A model ready to serve, under its name.
pub struct ServedModel {
    pub name: String,
    pub detector: Detector,
}

/// Models served from files: `(name, path)` pairs opened with `opts`.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub models: Vec<(String, PathBuf)>,
    pub opts: OpenOptions,
}

impl ModelFiles {
    /// Opens every model file (its name prefixed to any error).
    pub fn open(&self) -> crate::Result<Vec<ServedModel>> {
        self.models
            .iter()
            .map(|(name, path)| {
                let detector = Detector::open(path, &self.opts).map_err(|e| crate::Error::Config(format!("model {name}: {e}")))?;
                Ok(ServedModel { name: name.clone(), detector })
            })
            .collect()
    }

    /// A loader that opens the files again (SIGHUP).
    pub fn loader(self) -> Loader {
        Box::new(move || self.open())
    }
}

/// Service limits and sizes.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
    /// Largest image in pixels, read from its header before decoding (413 above).
    pub max_pixels: u64,
    /// Jobs waiting for a worker; when full, requests get 503 with Retry-After.
    pub queue: usize,
    /// Inference threads (at least 1 to serve anything).
    pub workers: usize,
    /// Test views per image (default: each model's own).
    pub views: Option<usize>,
    /// Views per heat map (`?heatmap=1`).
    pub heatmap_views: usize,
    /// Most images a worker scores together: requests waiting in the queue for the same model
    /// (without `?heatmap=1`) share one flow pass; 1 scores each request alone.
    pub batch_images: usize,
    /// A request's headers must arrive within this time (also the longest a kept-alive connection
    /// may sit idle), and its body within this time after them (408 otherwise).
    pub read_timeout: Duration,
    /// Connections open at once; further clients wait in the listener's backlog.
    pub max_connections: usize,
    /// When set, the scoring routes (`/v1/score`, `/v1/model`) need `Authorization: Bearer
    /// TOKEN` (401 otherwise); health and metrics stay open for probes.
    pub token: Option<BearerToken>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 32 << 20,
            max_pixels: 40_000_000,
            queue: 64,
            workers: 2,
            views: None,
            heatmap_views: 4,
            batch_images: 8,
            read_timeout: Duration::from_secs(30),
            max_connections: 256,
            token: None,
        }
    }
}

/// The secret clients present as `Authorization: Bearer TOKEN`; never printed.
#[derive(Clone)]
pub struct BearerToken(String);

impl BearerToken {
    /// A token of at least one visible character (surrounding whitespace is dropped).
    pub fn new(secret: &str) -> crate::Result<Self> {
        let t = secret.trim();
        if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(crate::Error::Config("a bearer token must be one word of visible characters".into()));
        }
        Ok(BearerToken(t.to_string()))
    }

    /// Reads the token from a file (its only content, a trailing newline allowed).
    pub fn from_file(path: &std::path::Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
        Self::new(&text).map_err(|e| crate::Error::format(path, e.to_string()))
    }

    /// Whether an `Authorization` header value presents this token (compared in time
    /// independent of where they differ).
    fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(given) = authorization.and_then(|a| a.strip_prefix(b"Bearer ")) else { return false };
        let want = self.0.as_bytes();
        given.len() == want.len() && given.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Loads the served models again (on SIGHUP).
pub type Loader = Box<dyn Fn() -> crate::Result<Vec<ServedModel>> + Send + Sync>;

type Models = Arc<HashMap<String, Arc<ServedModel>>>;

/// Result for one image.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ImageVerdict {
    pub name: String,
    pub score: f64,
    /// The score normalized to [0, 1], 0.5 at the threshold (see [`crate::pipeline::Decision`]).
    #[serde(default)]
    pub pred_score: Option<f64>,
    /// Whether the score reaches the threshold (anomalib's name for `is_anomaly`).
    #[serde(default)]
    pub pred_label: Option<bool>,
    pub is_anomaly: Option<bool>,
    pub threshold: Option<f64>,
    pub model: String,
    /// First 16 hex digits of the model's parameter checksum.
    pub model_id: String,
    pub latency_ms: f64,
    /// Overlay PNG (base64) when `?heatmap=1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_png_base64: Option<String>,
}

struct Job {
    model: Arc<ServedModel>,
    images: Vec<(String, Vec<u8>)>,
    /// Network inputs instead of images (a `/v2` FP32 tensor): [rows, 3, 448, 448] row-major,
    /// the views of each image consecutive; `images` is then empty.
    network_inputs: Option<Vec<f32>>,
    heatmap: bool,
    reply: oneshot::Sender<std::result::Result<Vec<ImageVerdict>, (StatusCode, String)>>,
}

/// Latency histogram bucket bounds in seconds.
const BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Default)]
struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    images: AtomicU64,
    rejected_busy: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

/// Shared state of the service.
pub struct AppState {
    models: RwLock<Models>,
    default_model: String,
    limits: Limits,
    queue: mpsc::Sender<Job>,
    /// The workers' end of the queue (held here too, so the queue stays open without workers).
    _jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    metrics: Metrics,
    loader: Option<Loader>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({"error": message.into()}))).into_response()
}

impl AppState {
    /// Starts the worker threads and returns the state to serve with [`router`].
    pub fn start(models: Vec<ServedModel>, limits: Limits, loader: Option<Loader>) -> crate::Result<Arc<Self>> {
        let default_model = models.first().map(|m| m.name.clone()).ok_or_else(|| crate::Error::Config("no model to serve".into()))?;
        let (tx, rx) = mpsc::channel::<Job>(limits.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        // (0 workers: requests only queue up; for tests of a full queue)
        for i in 0..limits.workers {
            let rx = rx.clone();
            let limits = limits.clone();
            std::thread::Builder::new()
                .name(format!("differnet-worker-{i}"))
                .spawn(move || loop {
                    let jobs = {
                        let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                        let Some(first) = rx.blocking_recv() else { break };
                        take_waiting(first, &mut rx, limits.batch_images)
                    };
                    // a bug must cost one batch, not a worker: catch a panic and answer 500
                    let results =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| score_jobs(&jobs, &limits))).unwrap_or_else(|_| {
                            jobs.iter()
                                .map(|_| Err((StatusCode::INTERNAL_SERVER_ERROR, "internal error while scoring (logged)".into())))
                                .collect()
                        });
                    for (job, result) in jobs.into_iter().zip(results) {
                        let _ = job.reply.send(result);
                    }
                })
                .map_err(|e| crate::Error::Config(format!("cannot start worker thread: {e}")))?;
        }
        let map: HashMap<String, Arc<ServedModel>> = models.into_iter().map(|m| (m.name.clone(), Arc::new(m))).collect();
        Ok(Arc::new(AppState {
            models: RwLock::new(Arc::new(map)),
            default_model,
            limits,
            queue: tx,
            _jobs: rx,
            metrics: Metrics::default(),
            loader,
        }))
    }

    fn models(&self) -> Models {
        self.models.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads every model with the loader; on failure the models in service stay.
    pub fn reload(&self) -> crate::Result<usize> {
        let Some(loader) = &self.loader else { return Ok(0) };
        match loader() {
            Ok(models) => {
                let n = models.len();
                let map: HashMap<String, Arc<ServedModel>> = models.into_iter().map(|m| (m.name.clone(), Arc::new(m))).collect();
                let old = std::mem::replace(&mut *self.models.write().unwrap_or_else(|p| p.into_inner()), Arc::new(map));
                release_when_unused(old);
                self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn count(&self, route: &str, status: StatusCode) {
        *self.metrics.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((route.to_string(), status.as_u16())).or_default() += 1;
    }

    fn observe(&self, seconds: f64) {
        let m = &self.metrics;
        for (b, bound) in m.latency_buckets.iter().zip(BUCKETS) {
            if seconds <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        m.latency_count.fetch_add(1, Ordering::Relaxed);
        m.latency_sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Jobs waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }
}

/// Hands replaced models' memory back to the system once the last job using them has finished
/// (checked every 100 ms for at most a minute), so that reloads do not leave the process holding
/// two models' worth of freed heap: measured with `scripts/soak.sh` on a 764 MB model, RSS rose
/// from 2.37 GB to 4.69 GB over the first two reloads without this.
fn release_when_unused(old: Models) {
    let weak: Vec<std::sync::Weak<ServedModel>> = old.values().map(Arc::downgrade).collect();
    drop(old);
    let spawned = std::thread::Builder::new().name("differnet-release".into()).spawn(move || {
        for _ in 0..600 {
            if weak.iter().all(|w| w.strong_count() == 0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        crate::return_freed_memory();
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the thread that releases a replaced model's memory: {e}");
    }
}

type JobResult = std::result::Result<Vec<ImageVerdict>, (StatusCode, String)>;

/// Whether `job` can share the flow pass of a batch led by `first`: the same model, and neither
/// asks for a heat map.
fn shares_pass(first: &Job, job: &Job) -> bool {
    !first.heatmap
        && !job.heatmap
        && first.network_inputs.is_none()
        && job.network_inputs.is_none()
        && Arc::ptr_eq(&first.model, &job.model)
}

/// `first` and the jobs already waiting behind it, up to `batch_images` images in all; a job that
/// cannot share the first's flow pass ([`shares_pass`]) ends the batch.
fn take_waiting(first: Job, rx: &mut mpsc::Receiver<Job>, batch_images: usize) -> Vec<Job> {
    let mut images = first.images.len();
    let mut jobs = vec![first];
    while images < batch_images {
        let Ok(next) = rx.try_recv() else { break };
        images += next.images.len();
        let alone = !shares_pass(&jobs[0], &next);
        jobs.push(next);
        if alone {
            break;
        }
    }
    jobs
}

/// Answers of a worker's jobs, in order: the leading ones that share the first's flow pass are
/// scored together, every other one on its own.
fn score_jobs(jobs: &[Job], limits: &Limits) -> Vec<JobResult> {
    let sharing = jobs.iter().take_while(|j| shares_pass(&jobs[0], j)).count();
    let mut results = if sharing > 1 { score_together(&jobs[..sharing], limits) } else { vec![] };
    results.extend(jobs[results.len()..].iter().map(|j| score_job(j, limits)));
    results
}

/// [`score_jobs`] of jobs that share one model and ask for no heat map: one flow pass.
fn score_together(jobs: &[Job], limits: &Limits) -> Vec<JobResult> {
    let t = Instant::now();
    let d = &jobs[0].model.detector;
    // each job's images are decoded into one list; a job with an unreadable image gets 422
    let mut images: Vec<Rgb8> = vec![];
    let decoded: Vec<std::result::Result<(), (StatusCode, String)>> = jobs
        .iter()
        .map(|j| {
            let mut own = Vec::with_capacity(j.images.len());
            for (name, bytes) in &j.images {
                own.push(decode_image(name, bytes)?);
            }
            images.append(&mut own);
            Ok(())
        })
        .collect();
    let scores = match d.score_batch(&images, &d.views(limits.views)) {
        Ok(scores) => scores,
        Err(e) => return jobs.iter().map(|_| Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))).collect(),
    };
    let latency_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut scores = scores.into_iter();
    jobs.iter()
        .zip(decoded)
        .map(|(job, decoded)| {
            decoded.map(|_| {
                job.images.iter().zip(scores.by_ref()).map(|((name, _), score)| verdict(job, name, score, latency_ms, None)).collect()
            })
        })
        .collect()
}

/// A request's image decoded, or the 422 answer naming it.
fn decode_image(name: &str, bytes: &[u8]) -> std::result::Result<Rgb8, (StatusCode, String)> {
    decode_rgb(bytes).map_err(|reason| (StatusCode::UNPROCESSABLE_ENTITY, format!("{name}: cannot read image: {reason}")))
}

/// The answer for one image of a job.
fn verdict(job: &Job, name: &str, score: f64, latency_ms: f64, overlay_png_base64: Option<String>) -> ImageVerdict {
    let d = &job.model.detector;
    let decision = d.decide(score);
    ImageVerdict {
        name: name.to_string(),
        score: decision.score,
        pred_score: decision.pred_score,
        pred_label: decision.is_anomaly,
        is_anomaly: decision.is_anomaly,
        threshold: decision.threshold,
        model: job.model.name.clone(),
        model_id: d.model.manifest.parameters_sha256.chars().take(16).collect(),
        latency_ms,
        overlay_png_base64,
    }
}

/// Scores (and optionally localizes) the images of a job on a worker thread.
fn score_job(job: &Job, limits: &Limits) -> JobResult {
    let m = &job.model;
    let d = &m.detector;
    let views = d.views(limits.views);
    let internal = |e: crate::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    if let Some(rows) = &job.network_inputs {
        let t = Instant::now();
        let scores = d.score_network_inputs(rows, views.len()).map_err(|e| match e {
            crate::Error::Config(m) => (StatusCode::UNPROCESSABLE_ENTITY, m),
            e => internal(e),
        })?;
        let latency_ms = t.elapsed().as_secs_f64() * 1e3;
        return Ok(scores.into_iter().enumerate().map(|(i, s)| verdict(job, &format!("input[{i}]"), s, latency_ms, None)).collect());
    }
    let mut out = vec![];
    for (name, bytes) in &job.images {
        let t = Instant::now();
        let original = decode_image(name, bytes)?;
        let style = d.map_style(None);
        // feature maps come from the scoring passes themselves; gradient maps need their own
        let (score, pictures) = match (job.heatmap, style.kind) {
            (false, _) => (d.score_image(&original, &views).map_err(internal)?, None),
            (true, MapKind::Features) => {
                let (score, map) = d.inspect(&original, &views, Some(MapKind::Features)).map_err(internal)?;
                (score, Some(style.render(&original, &map.expect("a map was asked for").values).map_err(internal)?))
            }
            (true, MapKind::Gradient) => {
                let score = d.score_image(&original, &views).map_err(internal)?;
                (score, Some(d.localization_images(&original, &d.views(Some(limits.heatmap_views)), &style).map_err(internal)?))
            }
        };
        let overlay_png_base64 = pictures.map(|p| base64::engine::general_purpose::STANDARD.encode(crate::views::png_bytes(&p.overlay)));
        out.push(verdict(job, name, score, t.elapsed().as_secs_f64() * 1e3, overlay_png_base64));
    }
    Ok(out)
}

/// What an image's header says about its size, read without decoding the image.
enum HeaderSize {
    Pixels(u64),
    /// The decoder refused the header's size under its own memory limits.
    TooLarge,
    /// Not an image this service reads; the decoder's reason.
    Unreadable(String),
}

fn header_size(bytes: &[u8]) -> HeaderSize {
    // PNG: IHDR is always the first chunk; read it directly so that a header without data
    // (a bomb's first bytes) is still measured
    if bytes.len() >= 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR" {
        let w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        return HeaderSize::Pixels(w as u64 * h as u64);
    }
    let Ok(reader) = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format() else {
        return HeaderSize::Unreadable("cannot read the header".into());
    };
    if reader.format().is_none() {
        return HeaderSize::Unreadable("not a PNG, JPEG, BMP or TIFF image".into());
    }
    match reader.into_dimensions() {
        Ok((w, h)) => HeaderSize::Pixels(w as u64 * h as u64),
        Err(image::ImageError::Limits(_)) => HeaderSize::TooLarge,
        Err(e) => HeaderSize::Unreadable(e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct ScoreQuery {
    model: Option<String>,
    heatmap: Option<u8>,
}

async fn score(State(state): State<Arc<AppState>>, Query(q): Query<ScoreQuery>, headers: HeaderMap, request: Request) -> Response {
    let start = Instant::now();
    let response = score_inner(&state, q, &headers, request).await;
    state.count("/v1/score", response.status());
    if response.status().is_success() {
        state.observe(start.elapsed().as_secs_f64());
    }
    response
}

async fn score_inner(state: &Arc<AppState>, q: ScoreQuery, headers: &HeaderMap, request: Request) -> Response {
    let model = match find_model(state, q.model.as_deref()) {
        Ok(m) => m,
        Err(refusal) => return refuse(refusal),
    };
    let images = match tokio::time::timeout(state.limits.read_timeout, read_images(headers, request)).await {
        Ok(Ok(images)) => images,
        Ok(Err(response)) => return response,
        Err(_) => return body_timeout(state),
    };
    if images.is_empty() || images.iter().any(|(_, b)| b.is_empty()) {
        return error(StatusCode::BAD_REQUEST, "empty request: send an image as the body, or multipart/form-data with one image per field");
    }
    match run_job(state, model, images, q.heatmap.unwrap_or(0) != 0).await {
        Ok(verdicts) => Json(serde_json::json!({"results": verdicts})).into_response(),
        Err(response) => response,
    }
}

/// A refused request: its status and the message answered as `{"error": message}`.
type Refusal = (StatusCode, String);

fn refuse((status, message): Refusal) -> Response {
    error(status, message)
}

/// The model named `name` (the default one when `None`), or a 404 naming those served.
fn find_model(state: &AppState, name: Option<&str>) -> std::result::Result<Arc<ServedModel>, Refusal> {
    let models = state.models();
    let name = name.unwrap_or(&state.default_model);
    models.get(name).cloned().ok_or_else(|| {
        (StatusCode::NOT_FOUND, format!("no model named `{name}` (served: {})", models.keys().cloned().collect::<Vec<_>>().join(", ")))
    })
}

/// Reads a request's whole body within the read timeout (408 after it).
async fn read_body(state: &AppState, request: Request) -> std::result::Result<axum::body::Bytes, Response> {
    match tokio::time::timeout(state.limits.read_timeout, axum::body::Bytes::from_request(request, &())).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(e.into_response()),
        Err(_) => Err(body_timeout(state)),
    }
}

fn body_timeout(state: &AppState) -> Response {
    error(StatusCode::REQUEST_TIMEOUT, format!("the request body did not arrive within {} s", state.limits.read_timeout.as_secs_f64()))
}

/// Checks the images' headers against the limits (413, 422), queues them for a worker (503 when
/// the queue is full) and waits for the verdicts: the one path every scoring route takes.
async fn run_job(
    state: &AppState,
    model: Arc<ServedModel>,
    images: Vec<(String, Vec<u8>)>,
    heatmap: bool,
) -> std::result::Result<Vec<ImageVerdict>, Response> {
    for (name, bytes) in &images {
        match header_size(bytes) {
            HeaderSize::Unreadable(reason) => {
                return Err(error(StatusCode::UNPROCESSABLE_ENTITY, format!("{name}: cannot read image: {reason}")))
            }
            HeaderSize::TooLarge => {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{name}: the image header claims a size beyond the decoder's limits"),
                ))
            }
            HeaderSize::Pixels(px) if px > state.limits.max_pixels => {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{name}: {px} pixels, more than the limit of {}", state.limits.max_pixels),
                ))
            }
            HeaderSize::Pixels(_) => {}
        }
    }
    let (reply, wait) = oneshot::channel();
    submit(state, Job { model, images, network_inputs: None, heatmap, reply }, wait).await
}

/// Scores network inputs ([`Job::network_inputs`]) on a worker, as [`run_job`] images.
async fn run_network_inputs_job(
    state: &AppState,
    model: Arc<ServedModel>,
    rows: Vec<f32>,
) -> std::result::Result<Vec<ImageVerdict>, Response> {
    let (reply, wait) = oneshot::channel();
    submit(state, Job { model, images: vec![], network_inputs: Some(rows), heatmap: false, reply }, wait).await
}

/// Queues a job (503 when the queue is full) and waits for its answer.
async fn submit(
    state: &AppState,
    job: Job,
    wait: oneshot::Receiver<std::result::Result<Vec<ImageVerdict>, (StatusCode, String)>>,
) -> std::result::Result<Vec<ImageVerdict>, Response> {
    if state.queue.try_send(job).is_err() {
        state.metrics.rejected_busy.fetch_add(1, Ordering::Relaxed);
        let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "all workers busy and the queue is full; retry later");
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return Err(r);
    }
    match wait.await {
        Ok(Ok(verdicts)) => {
            state.metrics.images.fetch_add(verdicts.len() as u64, Ordering::Relaxed);
            Ok(verdicts)
        }
        Ok(Err((status, message))) => Err(error(status, message)),
        Err(_) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the worker stopped before answering")),
    }
}

/// The images of a request: its body, or one per field of a multipart form.
async fn read_images(headers: &HeaderMap, request: Request) -> std::result::Result<Vec<(String, Vec<u8>)>, Response> {
    let is_multipart =
        headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("multipart/form-data"));
    let mut images = vec![];
    if is_multipart {
        let mut form = match Multipart::from_request(request, &()).await {
            Ok(f) => f,
            Err(e) => return Err(e.into_response()),
        };
        loop {
            match form.next_field().await {
                Ok(Some(field)) => {
                    let name = field.file_name().or(field.name()).unwrap_or("image").to_string();
                    match field.bytes().await {
                        Ok(b) => images.push((name, b.to_vec())),
                        Err(e) => return Err(error(e.status(), e.body_text())),
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(error(e.status(), e.body_text())),
            }
        }
    } else {
        match axum::body::Bytes::from_request(request, &()).await {
            Ok(b) => images.push(("body".to_string(), b.to_vec())),
            Err(e) => return Err(e.into_response()),
        }
    }
    Ok(images)
}

async fn model_info(State(state): State<Arc<AppState>>) -> Response {
    let models = state.models();
    let manifests: BTreeMap<&String, &crate::model::Manifest> = models.iter().map(|(k, v)| (k, &v.detector.model.manifest)).collect();
    state.count("/v1/model", StatusCode::OK);
    Json(serde_json::json!({"default": state.default_model, "models": manifests})).into_response()
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    state.count("/healthz", StatusCode::OK);
    Json(serde_json::json!({"status": "ok", "models": state.models().len(), "queue_depth": state.queue_depth()})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let mut s =
        String::from("# HELP differnet_requests_total HTTP requests by route and status.\n# TYPE differnet_requests_total counter\n");
    for ((route, status), n) in m.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        s += &format!("differnet_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n");
    }
    s += &format!("# HELP differnet_images_scored_total Images scored.\n# TYPE differnet_images_scored_total counter\ndiffernet_images_scored_total {}\n", m.images.load(Ordering::Relaxed));
    s += &format!("# HELP differnet_rejected_busy_total Requests refused with 503 because the queue was full.\n# TYPE differnet_rejected_busy_total counter\ndiffernet_rejected_busy_total {}\n", m.rejected_busy.load(Ordering::Relaxed));
    s += &format!(
        "# HELP differnet_queue_depth Jobs waiting for a worker.\n# TYPE differnet_queue_depth gauge\ndiffernet_queue_depth {}\n",
        state.queue_depth()
    );
    s += &format!(
        "# HELP differnet_reloads_total Model reloads (SIGHUP).\n# TYPE differnet_reloads_total counter\ndiffernet_reloads_total {}\n",
        m.reloads.load(Ordering::Relaxed)
    );
    s += &format!("# HELP differnet_reload_failures_total Failed model reloads.\n# TYPE differnet_reload_failures_total counter\ndiffernet_reload_failures_total {}\n", m.reload_failures.load(Ordering::Relaxed));
    s += "# HELP differnet_score_seconds Latency of successful /v1/score requests.\n# TYPE differnet_score_seconds histogram\n";
    for (b, bound) in m.latency_buckets.iter().zip(BUCKETS) {
        s += &format!("differnet_score_seconds_bucket{{le=\"{bound}\"}} {}\n", b.load(Ordering::Relaxed));
    }
    let count = m.latency_count.load(Ordering::Relaxed);
    s += &format!("differnet_score_seconds_bucket{{le=\"+Inf\"}} {count}\n");
    s += &format!(
        "differnet_score_seconds_sum {}\ndiffernet_score_seconds_count {count}\n",
        m.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    state.count("/metrics", StatusCode::OK);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}

/// The HTTP routes of the service.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    let scoring = Router::new()
        .route("/v1/score", post(score))
        .route("/v1/model", get(model_info))
        .merge(open_inference::model_routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(scoring)
        .merge(open_inference::open_routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// 401 for a scoring request without the service's bearer token (when it has one).
async fn require_token(State(state): State<Arc<AppState>>, request: Request, next: axum::middleware::Next) -> Response {
    if let Some(token) = &state.limits.token {
        if !token.admits(request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes())) {
            state.count(request.uri().path(), StatusCode::UNAUTHORIZED);
            let mut r = error(StatusCode::UNAUTHORIZED, "this route needs the header `Authorization: Bearer TOKEN`");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(request).await
}

/// Serves until SIGINT/SIGTERM, then stops accepting and lets requests in flight finish;
/// SIGHUP reloads the models. At most `max_connections` connections are open at once, and each
/// is closed when a request's headers take longer than `read_timeout` (or it idles that long).
pub async fn serve(state: Arc<AppState>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let s = state.clone();
        tokio::spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                let s = s.clone();
                match tokio::task::spawn_blocking(move || s.reload()).await {
                    Ok(Ok(n)) => tracing::info!(models = n, "models reloaded"),
                    Ok(Err(e)) => tracing::error!("reload failed, still serving the previous models: {e}"),
                    Err(e) => tracing::error!("reload task failed: {e}"),
                }
            }
        });
    }
    serve_until(state, listener, shutdown_signal()).await
}

/// [`serve`] until `stop` completes, without signal handlers (for tests and embedding).
pub async fn serve_until(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let max = state.limits.max_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    loop {
        // a free slot first, then a connection: over the cap, clients wait in the backlog
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // e.g. out of file descriptors: wait a little instead of spinning
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, mut stopped, timeout) = (app.clone(), stopped.clone(), state.limits.read_timeout);
        tokio::spawn(async move {
            let _slot = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(timeout);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), hyper_util::service::TowerToHyperService::new(app));
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                // (the guard `wait_for` returns is dropped at once: it must not live across an await)
                _ = async { let _ = stopped.wait_for(|&s| s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection closed: {e}");
            }
        });
    }
    tracing::info!("shutting down: finishing requests in flight");
    let _ = stopping.send(true);
    // every connection holds a slot until it ends
    let _all = slots.acquire_many(max as u32).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
