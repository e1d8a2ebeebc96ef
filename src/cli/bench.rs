//! `differnet bench`: throughput, latency and memory on this machine (library: `bench`), and
//! optionally train + test end to end on a dataset with `train`'s defaults.

use super::{print_json, BackboneArg, Bar, Cli};
use anyhow::Result;
use clap::Args;
use differnet::features::FeatureCache;
use differnet::flow::train::{Schedule, TrainConfig};
use differnet::pipeline::{Detector, OpenOptions, TrainOptions};
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchArgs {
    /// Backbone to time (AlexNet and VGG16 use random weights when none are installed).
    #[arg(long, value_enum, default_value = "efficientnet-lite0")]
    pub backbone: BackboneArg,
    /// Backbone views to time.
    #[arg(long, default_value_t = 32)]
    pub views: usize,
    /// Views per backbone forward pass.
    #[arg(long, default_value_t = 4)]
    pub backbone_batch: usize,
    /// Flow training steps to time (batch 96, paper width).
    #[arg(long, default_value_t = 5)]
    pub flow_steps: usize,
    /// Flow training batch (views).
    #[arg(long, default_value_t = 96)]
    pub flow_batch: usize,
    /// Hidden width of the flow's subnets.
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    /// Also time train + test end to end on this dataset (MVTec layout), with an empty feature
    /// cache: reports `e2e_seconds` and `image_auroc`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Training epochs of the end-to-end run, which uses `train`'s default schedule (fast: 16).
    #[arg(long)]
    pub e2e_epochs: Option<usize>,
}

pub fn run(cli: &Cli, a: &BenchArgs, dev: &candle_core::Device) -> Result<()> {
    let mut ex = differnet::bench::extractor(a.backbone.into(), dev)?;
    ex.batch = a.backbone_batch.max(1);
    let mut flow = differnet::flow::FlowConfig::new(ex.feature_dim());
    flow.hidden = a.hidden;
    let mut r = differnet::bench::run(&ex, a.views, &flow, a.flow_batch, a.flow_steps)?;
    if let Some(data) = &a.data {
        let tmp = std::env::temp_dir().join(format!("differnet-bench-{}", std::process::id()));
        let schedule = Schedule::Fast; // train's default
        let mut config = TrainConfig::with_schedule(differnet::backbone::BackboneKind::EfficientnetLite0, schedule);
        config.flow.hidden = a.hidden;
        if let Some(e) = a.e2e_epochs {
            config.epochs = e;
        }
        let open = OpenOptions { device: dev.clone(), cache: FeatureCache { dir: Some(tmp.join("cache")) }, ..OpenOptions::default() };
        let opts = TrainOptions { open: open.clone(), ..TrainOptions::new(data.clone(), tmp.join("model.safetensors"), config.clone()) };
        let t = std::time::Instant::now();
        let model = differnet::pipeline::train(&opts, &Bar::new(cli, "features"), &Bar::new(cli, "flow"), &Bar::new(cli, "calibrate"))?;
        let d = Detector::open(&opts.out, &open)?;
        let ev = d.evaluate(&differnet::data::Dataset::open(data)?, None, &Bar::new(cli, "scoring"))?;
        r.e2e_seconds = Some(t.elapsed().as_secs_f64());
        r.image_auroc = Some(ev.image_auroc);
        r.e2e_settings = Some(format!(
            "{} training images, fast schedule: {} epochs, {} view(s) per image, rotation {}; {} test images x {} view(s); flow width {}; empty feature cache",
            model.manifest.training_data.n_images,
            config.epochs,
            config.views_per_image,
            if config.augment.rotate { "on" } else { "off" },
            ev.n_good + ev.n_defect,
            opts.test_views,
            a.hidden
        ));
        r.peak_rss_bytes = differnet::bench::peak_rss_bytes().max(r.peak_rss_bytes);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if cli.json {
        print_json(&r)
    } else {
        print!("{}", r.table())
    }
    Ok(())
}
