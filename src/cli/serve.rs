//! `differnet serve`: the HTTP service over the models given (library: `serve`).

use anyhow::{bail, Context, Result};
use clap::Args;
use differnet::features::FeatureCache;
use differnet::pipeline::OpenOptions;
use differnet::serve::{AppState, BearerToken, Limits, ModelFiles};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ServeArgs {
    /// Model to serve, as PATH or NAME=PATH; repeat for several (the first is the default;
    /// others are chosen with `?model=NAME`). SIGHUP reloads them from their files.
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Inference threads (each uses all cores for its matrix products; two overlap one's
    /// decoding and small steps with the other's products).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Requests waiting for a worker before new ones get 503 + Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Largest image in pixels, checked from its header before decoding (larger: 413).
    #[arg(long, default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Test views per image (default: each model's own; fewer is faster).
    #[arg(long)]
    pub views: Option<usize>,
    /// Views per heat map for `?heatmap=1`.
    #[arg(long, default_value_t = 4)]
    pub heatmap_views: usize,
    /// Most images a worker scores together: requests already waiting for the same model
    /// (without `?heatmap=1`) share one flow pass, read from memory once; 1: each on its own.
    #[arg(long, default_value_t = 8)]
    pub batch_images: usize,
    /// Views per backbone forward pass.
    #[arg(long, default_value_t = 4)]
    pub backbone_batch: usize,
    /// Seconds a request's headers may take to arrive (also the longest a kept-alive connection
    /// may idle), and its body after them (408).
    #[arg(long, default_value_t = 30.0)]
    pub read_timeout: f64,
    /// Connections open at once; further clients wait in the listener's backlog.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// File holding a bearer token: the scoring routes then need `Authorization: Bearer TOKEN`
    /// (401 otherwise); /healthz and /metrics stay open. The service speaks plain HTTP: put a
    /// TLS proxy in front of it when the network is not trusted.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

pub fn run(a: &ServeArgs, dev: &candle_core::Device) -> Result<()> {
    let models = a
        .models
        .iter()
        .map(|m| match m.split_once('=') {
            Some((name, path)) => (name.to_string(), PathBuf::from(path)),
            None => (Path::new(m).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| m.clone()), PathBuf::from(m)),
        })
        .collect();
    if a.workers == 0 || a.queue == 0 || a.max_connections == 0 {
        bail!("--workers, --queue and --max-connections must be at least 1");
    }
    if !(a.read_timeout.is_finite() && a.read_timeout > 0.0) {
        bail!("--read-timeout must be a positive number of seconds");
    }
    let token = a.token_file.as_deref().map(BearerToken::from_file).transpose()?;
    let opts =
        OpenOptions { device: dev.clone(), backbone_batch: a.backbone_batch, cache: FeatureCache { dir: None }, ..OpenOptions::default() };
    let files = ModelFiles { models, opts };
    let served = files.open()?;
    let names: Vec<String> = served.iter().map(|m| m.name.clone()).collect();
    let limits = Limits {
        max_body_bytes: a.max_body_bytes,
        max_pixels: a.max_pixels,
        queue: a.queue,
        workers: a.workers,
        views: a.views,
        heatmap_views: a.heatmap_views,
        batch_images: a.batch_images.max(1),
        read_timeout: std::time::Duration::from_secs_f64(a.read_timeout),
        max_connections: a.max_connections,
        token,
    };
    let state = AppState::start(served, limits, Some(files.loader()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&a.addr).await.with_context(|| format!("cannot listen on {}", a.addr))?;
        eprintln!(
            "serving {} on http://{} (POST /v1/score, GET /v1/model, /healthz, /metrics){}",
            names.join(", "),
            listener.local_addr()?,
            if a.token_file.is_some() { "; scoring routes need the bearer token" } else { "" }
        );
        differnet::serve::serve(state, listener).await?;
        Ok(())
    })
}
