//! `differnet test`, `report` and `calibrate`: a model on labelled data (image and pixel
//! metrics, an HTML report) and the thresholds stored in it.

use super::{print_json, BackboneArgs, Bar, Cli, MapArgs, ScoreArg};
use anyhow::{bail, Context, Result};
use clap::Args;
use differnet::data::{expand_inputs, Dataset};
use differnet::eval::evaluation::Evaluation;
use differnet::eval::metrics;
use differnet::localize::MapKind;
use differnet::model::{Model, ScoreRange, Threshold};
use differnet::pipeline::Detector;
use std::path::{Path, PathBuf};

/// What `test` and `report` evaluate.
#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub data: PathBuf,
    /// Override the number of test views stored in the model.
    #[arg(long)]
    pub views: Option<usize>,
    /// Override the per-view score stored in the model.
    #[arg(long, value_enum)]
    pub score: Option<ScoreArg>,
    /// Also compute the anomaly maps (--map) of every test image and pixel AUROC / AUPRO
    /// against the ground-truth masks (gradient maps are slow: one backward pass per view).
    #[arg(long)]
    pub pixel_metrics: bool,
    /// Views averaged per map for --pixel-metrics (default: the model's test views).
    #[arg(long)]
    pub pixel_views: Option<usize>,
    /// Hard cases of each kind (high-scoring good, low-scoring defective) shown with heat maps in a report.
    #[arg(long, default_value_t = 4)]
    pub gallery: usize,
    /// Views averaged per heat map of the report's gallery.
    #[arg(long, default_value_t = 4)]
    pub gallery_views: usize,
    #[command(flatten)]
    pub maps: MapArgs,
    #[command(flatten)]
    pub backbone: BackboneArgs,
}

#[derive(Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write a report (HTML, Markdown, plots, results.json) into this folder.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Folder for index.html, summary.md, results.json and the plots.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct CalibrateArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Set this value directly.
    #[arg(long, conflicts_with_all = ["fpr", "best_f1"])]
    pub value: Option<f64>,
    /// Choose the threshold for this false-positive rate on held-out good images (--good).
    #[arg(long, requires = "good")]
    pub fpr: Option<f64>,
    /// Folder of held-out good images for --fpr.
    #[arg(long)]
    pub good: Option<PathBuf>,
    /// Choose the F1-optimal threshold on a labelled dataset (--data, MVTec layout).
    #[arg(long, requires = "data")]
    pub best_f1: bool,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Store the range of the heat maps (--map) of these good images, for `--normalize good`.
    #[arg(long)]
    pub localization_good: Option<PathBuf>,
    /// Views averaged per heat map for --localization-good (default: the model's test views).
    #[arg(long)]
    pub pixel_views: Option<usize>,
    /// Which maps --localization-good measures (default: the model's, see `localize --map`).
    #[arg(long, value_enum)]
    pub map: Option<super::MapKindArg>,
    #[command(flatten)]
    pub backbone: BackboneArgs,
}

/// Image metrics (and pixel metrics of maps of kind `pixel.0` over `pixel.1` views, when asked)
/// of a detector on a dataset.
pub fn evaluate(cli: &Cli, d: &Detector, ds: &Dataset, views: Option<usize>, pixel: Option<(MapKind, usize)>) -> Result<Evaluation> {
    let mut ev = d.evaluate(ds, views, &Bar::new(cli, "scoring"))?;
    if let Some((kind, v)) = pixel {
        d.add_pixel_metrics(&mut ev, ds, v, kind, &Bar::new(cli, "pixel maps"))?;
    }
    Ok(ev)
}

/// `test` and `report`: image metrics, optionally pixel metrics, and a report folder.
fn evaluate_and_report(cli: &Cli, a: &EvalArgs, report: Option<&Path>, dev: &candle_core::Device) -> Result<Evaluation> {
    if report.is_some() || a.pixel_metrics {
        // refuse bad heat-map settings before the long evaluation, not after it
        a.maps.check(&Model::read_manifest(&a.model)?)?;
    }
    let mut d = Detector::open(&a.model, &a.backbone.open_options(dev)?)?;
    if let Some(s) = a.score {
        d.model.manifest.score = s.into();
    }
    let ds = Dataset::open(&a.data)?;
    let pixel_views = a.pixel_views.unwrap_or(d.model.manifest.test_views);
    let ev = evaluate(cli, &d, &ds, a.views, a.pixel_metrics.then_some((a.maps.kind(&d.model.manifest), pixel_views)))?;
    if let Some(dir) = report {
        let style = a.maps.style(&d)?;
        let gallery = differnet::report::gallery(&d, &ev, a.gallery, &d.views(Some(a.gallery_views)), &style, &Bar::new(cli, "gallery"))?;
        let title = format!(
            "DifferNet report: {}",
            a.data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| a.data.display().to_string())
        );
        let r = differnet::report::Report { title, model: a.model.display().to_string(), evaluation: &ev, gallery };
        differnet::report::write_report(dir, &r)?;
    }
    Ok(ev)
}

pub fn test(cli: &Cli, a: &TestArgs, dev: &candle_core::Device) -> Result<()> {
    let ev = evaluate_and_report(cli, &a.eval, a.report.as_deref(), dev)?;
    if let Some(out) = &a.out {
        differnet::error::write_atomic(out, serde_json::to_string_pretty(&ev)?.as_bytes())?;
    }
    if cli.json {
        print_json(&ev)
    } else {
        print!("{}", ev.table())
    }
    Ok(())
}

pub fn report(cli: &Cli, a: &ReportArgs, dev: &candle_core::Device) -> Result<()> {
    let ev = evaluate_and_report(cli, &a.eval, Some(&a.out), dev)?;
    if cli.json {
        print_json(&serde_json::json!({"image_auroc": ev.image_auroc, "report": a.out.join("index.html")}));
    } else {
        print!("{}", ev.table());
        println!("report written to {}", a.out.join("index.html").display());
    }
    Ok(())
}

pub fn calibrate(cli: &Cli, a: &CalibrateArgs, dev: &candle_core::Device) -> Result<()> {
    let mut d = Detector::open(&a.model, &a.backbone.open_options(dev)?)?;
    let views = d.views(None);
    let mut score_range = None;
    let threshold = if let Some(v) = a.value {
        Some(Threshold { value: v, method: "user".into() })
    } else if let (Some(fpr), Some(good)) = (a.fpr, &a.good) {
        let paths = expand_inputs(std::slice::from_ref(good))?;
        let scores = d.score_paths(&paths, &views, &Bar::new(cli, "scoring"))?;
        let value = metrics::threshold_for_fpr(&scores, fpr).context("no good images")?;
        score_range = ScoreRange::of(&scores);
        Some(Threshold { value, method: format!("fpr={fpr} on {} good images", paths.len()) })
    } else if let (true, Some(data)) = (a.best_f1, &a.data) {
        let ev = evaluate(cli, &d, &Dataset::open(data)?, None, None)?;
        let scores: Vec<f64> = ev.samples.iter().map(|s| s.score).collect();
        let labels: Vec<bool> = ev.samples.iter().map(|s| s.defect != "good").collect();
        let (value, f1) = metrics::best_f1_threshold(&scores, &labels).context("no defective images")?;
        Some(Threshold { value, method: format!("best-f1 ({f1:.4}) on {} labelled images", scores.len()) })
    } else {
        None
    };
    let range = match &a.localization_good {
        Some(dir) => {
            let paths = expand_inputs(std::slice::from_ref(dir))?;
            let kind = a.map.map(MapKind::from).unwrap_or(d.default_map());
            Some(d.good_map_range(&paths, &d.views(a.pixel_views), kind, &Bar::new(cli, "good maps"))?)
        }
        None => None,
    };
    if threshold.is_none() && range.is_none() {
        bail!("give --value X, or --fpr RATE --good DIR, or --best-f1 --data DIR (decision threshold), and/or --localization-good DIR (heat-map range)");
    }
    if let Some(t) = &threshold {
        d.model.manifest.threshold = Some(t.clone());
    }
    if score_range.is_some() {
        d.model.manifest.score_range = score_range;
    }
    if let Some(r) = &range {
        d.model.manifest.localization = Some(r.clone());
    }
    d.model.save(&a.model)?;
    if cli.json {
        print_json(&serde_json::json!({"threshold": threshold, "localization": range}));
    } else {
        if let Some(t) = &threshold {
            println!("threshold {:.6} ({}) stored in {}", t.value, t.method, a.model.display());
        }
        if let Some(r) = &range {
            println!("{} map range {:.4e}..{:.4e} of {} good images stored in {}", r.map.id(), r.low, r.high, r.images, a.model.display());
        }
    }
    Ok(())
}
