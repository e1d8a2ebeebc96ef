//! `differnet predict` and `localize`: scores, decisions and heat maps of image files.

use super::{print_json, BackboneArgs, Bar, Cli, MapArgs};
use anyhow::Result;
use clap::Args;
use differnet::data::expand_inputs;
use differnet::pipeline::Detector;
use differnet::progress::Progress;
use std::path::PathBuf;

#[derive(Args)]
pub struct PredictArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Image files or folders.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long)]
    pub views: Option<usize>,
    /// Also write heat maps, overlays and masks (as `localize` does) into this folder.
    #[arg(long)]
    pub heatmaps: Option<PathBuf>,
    #[command(flatten)]
    pub maps: MapArgs,
    #[command(flatten)]
    pub backbone: BackboneArgs,
}

#[derive(Args)]
pub struct LocalizeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Image files or folders.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Folder for `<name>_heatmap.png`, `<name>_overlay.png` and `<name>_mask.png`.
    #[arg(long)]
    pub out: PathBuf,
    /// Rotations averaged (default: the model's test views).
    #[arg(long)]
    pub views: Option<usize>,
    #[command(flatten)]
    pub maps: MapArgs,
    #[command(flatten)]
    pub backbone: BackboneArgs,
}

pub fn predict(cli: &Cli, a: &PredictArgs, dev: &candle_core::Device) -> Result<()> {
    let d = Detector::open(&a.model, &a.backbone.open_options(dev)?)?;
    let style = a.maps.style(&d.model)?;
    let paths = expand_inputs(&a.inputs)?;
    let views = d.views(a.views);
    let decisions = d.predict_paths(&paths, &views, &Bar::new(cli, "scoring"))?;
    let mut rows: Vec<serde_json::Value> = paths
        .iter()
        .zip(&decisions)
        .map(|(p, v)| serde_json::json!({"path": p.display().to_string(), "score": v.score, "is_anomaly": v.is_anomaly, "threshold": v.threshold}))
        .collect();
    if let Some(dir) = &a.heatmaps {
        let b = Bar::new(cli, "localize");
        b.set_length(paths.len() as u64);
        for (row, p) in rows.iter_mut().zip(&paths) {
            row["maps"] = serde_json::to_value(d.write_localization(p, &views, &style, dir)?)?;
            b.inc(1);
        }
    }
    if cli.json {
        print_json(&rows);
    } else {
        if d.model.manifest.threshold.is_none() {
            eprintln!("note: the model has no threshold; set one with `differnet calibrate`");
        }
        for (p, v) in paths.iter().zip(&decisions) {
            let verdict = match v.is_anomaly {
                Some(true) => "DEFECT",
                Some(false) => "ok",
                None => "-",
            };
            println!("{:>12.6}  {:<6}  {}", v.score, verdict, p.display());
        }
    }
    Ok(())
}

pub fn localize(cli: &Cli, a: &LocalizeArgs, dev: &candle_core::Device) -> Result<()> {
    let d = Detector::open(&a.model, &a.backbone.open_options(dev)?)?;
    let style = a.maps.style(&d.model)?;
    let paths = expand_inputs(&a.inputs)?;
    let views = d.views(a.views);
    let b = Bar::new(cli, "localize");
    b.set_length(paths.len() as u64);
    let mut rows = vec![];
    for p in &paths {
        let files = d.write_localization(p, &views, &style, &a.out)?;
        rows.push(serde_json::json!({"path": p, "heatmap": files.heatmap, "overlay": files.overlay, "mask": files.mask}));
        b.inc(1);
    }
    drop(b);
    if cli.json {
        print_json(&rows)
    } else {
        println!("{} heat maps written to {}", rows.len(), a.out.display())
    }
    Ok(())
}
