//! `differnet predict` and `localize`: scores, decisions and heat maps of image files.

use super::{print_json, BackboneArgs, Bar, Cli, MapArgs};
use anyhow::Result;
use clap::Args;
use differnet::data::expand_inputs;
use differnet::pipeline::{Decision, Detector};
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
    /// Also write the results to this CSV file: `image_path,pred_score,pred_label,score`, one row
    /// per image; pred_score in [0, 1] (0.5 at the threshold), pred_label 1 for a defect, 0 for
    /// good; both empty when the model has no threshold.
    #[arg(long)]
    pub csv: Option<PathBuf>,
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
    let style = a.maps.style(&d)?;
    let paths = expand_inputs(&a.inputs)?;
    let views = d.views(a.views);
    let decisions = d.predict_paths(&paths, &views, &Bar::new(cli, "scoring"))?;
    let mut rows: Vec<serde_json::Value> = paths
        .iter()
        .zip(&decisions)
        .map(|(p, v)| {
            serde_json::json!({"path": p.display().to_string(), "score": v.score, "pred_score": v.pred_score,
                "pred_label": v.is_anomaly, "is_anomaly": v.is_anomaly, "threshold": v.threshold})
        })
        .collect();
    if let Some(file) = &a.csv {
        differnet::error::write_atomic(file, csv(&paths, &decisions).as_bytes())?;
    }
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
            let pred = v.pred_score.map_or("-".to_string(), |s| format!("{s:.3}"));
            println!("{:>12.6}  {:>5}  {:<6}  {}", v.score, pred, verdict, p.display());
        }
    }
    Ok(())
}

pub fn localize(cli: &Cli, a: &LocalizeArgs, dev: &candle_core::Device) -> Result<()> {
    let d = Detector::open(&a.model, &a.backbone.open_options(dev)?)?;
    let style = a.maps.style(&d)?;
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

/// The CSV of `predict --csv`: a header, then one row per image (paths quoted when they hold a
/// comma, a quote or a line break, quotes doubled, as RFC 4180 has it).
pub fn csv(paths: &[PathBuf], decisions: &[Decision]) -> String {
    let mut out = String::from("image_path,pred_score,pred_label,score\n");
    for (p, d) in paths.iter().zip(decisions) {
        let path = p.display().to_string();
        let path = if path.contains([',', '"', '\n', '\r']) { format!("\"{}\"", path.replace('"', "\"\"")) } else { path };
        let pred = d.pred_score.map_or(String::new(), |s| format!("{s}"));
        let label = d.is_anomaly.map_or(String::new(), |l| if l { "1".into() } else { "0".into() });
        out += &format!("{path},{pred},{label},{}\n", d.score);
    }
    out
}
