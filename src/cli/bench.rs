//! `differnet bench`: throughput, latency and memory on this machine (library: `bench`), and
//! optionally train + test end to end on a dataset with `train`'s defaults.

use super::{print_json, BackboneArg, Bar, Cli};
use anyhow::Result;
use clap::Args;
use differnet::pipeline::Detector;
use differnet::settings::TrainSettings;
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
    /// Training epochs of the end-to-end run, which uses `train`'s default schedule (16 epochs).
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
        // train's defaults
        let settings = TrainSettings {
            backbone: Some(differnet::backbone::BackboneKind::EfficientnetLite0),
            hidden: a.hidden,
            epochs: a.e2e_epochs,
            backbone_batch: a.backbone_batch.max(1),
            cache_dir: Some(tmp.join("cache")),
            ..TrainSettings::default()
        };
        let opts = settings.options(data.clone(), tmp.join("model.safetensors"), dev)?;
        let open = opts.open.clone();
        let t = std::time::Instant::now();
        let model = differnet::pipeline::train(&opts, &Bar::new(cli, "features"), &Bar::new(cli, "flow"), &Bar::new(cli, "calibrate"))?;
        let d = Detector::open(&opts.out, &open)?;
        let ev = d.evaluate(&differnet::data::Dataset::open(data)?, None, &Bar::new(cli, "scoring"))?;
        r.e2e_seconds = Some(t.elapsed().as_secs_f64());
        r.image_auroc = Some(ev.image_auroc);
        let (cfg, pose) = (&model.manifest.train, model.manifest.training.pose_check.as_ref());
        r.e2e_settings = Some(format!(
            "{} training images, train's defaults{}: {} epochs, {} view(s) per image, rotation {}; {} test images x {} view(s); flow width {}; empty feature cache",
            model.manifest.training_data.n_images,
            pose.map(|p| format!(" ({})", p.verdict())).unwrap_or_default(),
            cfg.epochs,
            cfg.views_per_image,
            if cfg.augment.rotate { "on" } else { "off" },
            ev.n_good + ev.n_defect,
            model.manifest.test_views,
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
