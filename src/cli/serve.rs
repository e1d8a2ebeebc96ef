//! `differnet serve`: the HTTP service over the models given (library: `serve`).

use anyhow::{bail, Context, Result};
use clap::Args;
use differnet::features::FeatureCache;
use differnet::pipeline::OpenOptions;
use differnet::serve::{AppState, Limits, ModelFiles};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ServeArgs {
    /// Model to serve, as PATH or NAME=PATH; repeat for several (the first is the default;
    /// others are chosen with `?model=NAME`). SIGHUP reloads them from their files.
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Inference threads (each uses all cores for its matrix products).
    #[arg(long, default_value_t = 1)]
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
    /// Views per backbone forward pass.
    #[arg(long, default_value_t = 4)]
    pub backbone_batch: usize,
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
    if a.workers == 0 || a.queue == 0 {
        bail!("--workers and --queue must be at least 1");
    }
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
    };
    let state = AppState::start(served, limits, Some(files.loader()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&a.addr).await.with_context(|| format!("cannot listen on {}", a.addr))?;
        eprintln!("serving {} on http://{} (POST /v1/score, GET /v1/model, /healthz, /metrics)", names.join(", "), listener.local_addr()?);
        differnet::serve::serve(state, listener).await?;
        Ok(())
    })
}
