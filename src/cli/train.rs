//! `differnet train`: the flags that become the library's [`TrainSettings`], then
//! [`differnet::pipeline::train`].

use super::{BackboneArgs, Bar, Cli, FlowStorageArg, JitterArgs, ScoreArg, Switch};
use anyhow::{Context, Result};
use clap::Args;
use differnet::model::Model;
use differnet::settings::{ImageScoreChoice, TilesSetting, TrainSettings};
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct TrainArgs {
    /// Dataset root (MVTec AD layout).
    #[arg(long)]
    pub data: PathBuf,
    /// Model file to write.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// Schedule. `fast` (default): upright views only, 1 per image, 16 epochs, 1 test view; with
    /// the combined image score it also held on parts in any orientation (synthetic parts:
    /// 0.995, against 0.964 with `rotation`; docs/results.md). `rotation`: random rotations, 4
    /// views per image and epoch from 8 cached, 16 epochs, 16 test views (2-5 times `fast`'s
    /// cost). `auto`: `fast` or `rotation`, whichever a pose check of the training images finds
    /// (held-out good images turned by 90°, 180°, 270° far from the upright ones: a fixed pose);
    /// `--rotate on|off` states the pose instead. `paper` (section 4.2): random rotations, 4
    /// views per image and epoch from 16 cached, 192 epochs, 64 test views, Adam β 0.9,0.999,
    /// whole images squashed to the square input (`--tiles 1`). The flags below override single
    /// settings of any.
    #[arg(long, value_enum, default_value = "fast")]
    pub schedule: Schedule,
    /// Training epochs (fast, rotation: 16; paper: 192).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Views of each image per epoch (fast: 1; rotation, paper: 4).
    #[arg(long)]
    pub views: Option<usize>,
    /// Views extracted once per training image and sampled each epoch (fast: 1, rotation: 8, paper: 16).
    #[arg(long)]
    pub cached_views: Option<usize>,
    /// Train every epoch on views no earlier epoch saw, as the paper draws new random transforms
    /// each epoch: epochs × views are extracted per image before training (the paper schedule:
    /// 768 AlexNet views of each image, about 16 hours for MTD on 2 cores, 1.8 GB of features).
    /// Without it each epoch samples from the cached views, which the flow overfits over long
    /// schedules (docs/results.md).
    #[arg(long, conflicts_with = "cached_views")]
    pub fresh_views: bool,
    /// Images per batch (official: 24, i.e. 96 views).
    #[arg(long, default_value_t = 24)]
    pub batch: usize,
    /// Test views stored with the model (rotations i*360/n; fast: 1, rotation: 16, paper: 64).
    #[arg(long)]
    pub test_views: Option<usize>,
    /// Coupling blocks (paper: 8).
    #[arg(long, default_value_t = 8)]
    pub blocks: usize,
    /// Hidden width of the subnets (paper: 2048).
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    /// Soft-clamp alpha (paper: 3).
    #[arg(long, default_value_t = 3.0)]
    pub alpha: f64,
    /// Adam learning rate (paper: 2e-4).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Adam's β₁,β₂ (fast: the official code's 0.8,0.8; paper: 0.9,0.999, the "author-suggested"
    /// values of section 4.2).
    #[arg(long, value_name = "B1,B2", value_delimiter = ',', num_args = 2)]
    pub adam_betas: Option<Vec<f64>>,
    #[command(flatten)]
    pub jitter: JitterArgs,
    /// Random rotations in training: on (rotation, paper) or off (fast); with `--schedule auto`
    /// this states the pose and skips the pose check.
    #[arg(long, value_name = "on|off")]
    pub rotate: Option<Switch>,
    /// Per-view score stored with the model.
    #[arg(long, value_enum, default_value = "mean-z2")]
    pub score: ScoreArg,
    /// Decision threshold on the anomaly score (default: chosen on the held-out images for
    /// --target-fpr).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Fraction of the training images kept out of the flow's fit (seeded, at least 3): their
    /// scores set the threshold, the range of pred_score and of good heat maps. With fewer than
    /// 10 training images nothing is held out and no threshold is stored.
    #[arg(long, default_value_t = differnet::pipeline::DEFAULT_HOLDOUT, conflicts_with = "no_holdout")]
    pub holdout: f64,
    /// Fit the flow on every training image; store no threshold (unless --threshold) and no ranges.
    #[arg(long)]
    pub no_holdout: bool,
    /// False-positive rate of good parts the stored threshold allows, measured on the held-out
    /// images (with fewer than 1/RATE of them, a Gaussian fit of their scores sets it).
    #[arg(long, default_value_t = differnet::pipeline::DEFAULT_TARGET_FPR)]
    pub target_fpr: f64,
    /// Do not fit the local feature density (no feature maps; heat maps are gradient maps).
    #[arg(long)]
    pub no_feature_maps: bool,
    /// Feature maps from each local vector together with its difference from its image's median
    /// vector over all its tiles (on, the default), or from the vector alone (off): on finds more
    /// of a large region of a surface unlike the rest of the part (uneven finish, a band of other
    /// material) that looks good by itself.
    #[arg(long, value_name = "on|off")]
    pub image_contrast: Option<Switch>,
    /// Feature maps also at a coarse scale: a second density of the local vectors averaged over
    /// a (2r+1)² window of grid cells, r = CELLS, its distances eroded over the same window, each
    /// position's distance the larger of the two scales' (finds large regions of another texture;
    /// the fine scale keeps small defects sharp). 0: the fine scale alone.
    #[arg(long, value_name = "CELLS", default_value_t = differnet::pipeline::DEFAULT_COARSE_RADIUS)]
    pub coarse_radius: usize,
    /// Image score. `combined` (default but with `--schedule paper`): the flow's score plus the
    /// feature map's maximum, each standardized on the held-out good images, so that a small
    /// defect global pooling washes out still counts; `flow`: the flow's score alone, the
    /// paper's (default with `--schedule paper`, and whenever nothing is held out or there are no
    /// feature maps).
    #[arg(long, value_enum)]
    pub image_score: Option<ImageScoreArg>,
    /// Use only the first N training images (sorted by name).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Seed for every random choice (views, initialisation, batches).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the model every N epochs, as OUT with `.epochN` before the extension.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// How the model file stores the flow: `f32`, or `f16` (half the file; computation stays f32,
    /// the flow is rounded before the threshold is set). `differnet export` converts a model.
    #[arg(long, value_enum, default_value = "f32")]
    pub flow_storage: FlowStorageArg,
}

/// How `train` makes image scores (see `train --image-score`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageScoreArg {
    Combined,
    Flow,
}

/// Training schedules (see `train --schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    Auto,
    Fast,
    Rotation,
    Paper,
}

impl From<Schedule> for differnet::flow::train::Schedule {
    fn from(s: Schedule) -> Self {
        match s {
            Schedule::Auto => Self::Auto,
            Schedule::Fast => Self::Fast,
            Schedule::Rotation => Self::Rotation,
            Schedule::Paper => Self::Paper,
        }
    }
}

impl TrainArgs {
    /// The library's settings for these flags.
    pub fn settings(&self) -> Result<TrainSettings> {
        let b = &self.backbone;
        let tiles = match b.tiles.as_deref() {
            None => None,
            Some(t) => {
                let setting = TilesSetting::Word(t.to_string());
                setting.count().with_context(|| format!("--tiles {t}"))?;
                Some(setting)
            }
        };
        Ok(TrainSettings {
            schedule: self.schedule.into(),
            epochs: self.epochs,
            views: self.views,
            cached_views: self.cached_views,
            fresh_views: self.fresh_views,
            batch: self.batch,
            test_views: self.test_views,
            blocks: self.blocks,
            hidden: self.hidden,
            alpha: self.alpha,
            lr: self.lr,
            adam_betas: self.adam_betas.as_deref().map(|b| [b[0], b[1]]),
            brightness: self.jitter.brightness,
            contrast: self.jitter.contrast,
            saturation: self.jitter.saturation,
            rotate: self.rotate.map(|r| r == Switch::On),
            score: self.score.into(),
            threshold: self.threshold,
            holdout: self.holdout,
            no_holdout: self.no_holdout,
            target_fpr: self.target_fpr,
            no_feature_maps: self.no_feature_maps,
            image_contrast: self.image_contrast.map_or(differnet::pipeline::DEFAULT_IMAGE_CONTRAST, |s| s == Switch::On),
            coarse_radius: self.coarse_radius,
            image_score: self.image_score.map(|s| match s {
                ImageScoreArg::Combined => ImageScoreChoice::Combined,
                ImageScoreArg::Flow => ImageScoreChoice::Flow,
            }),
            max_images: self.max_images,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            backbone: b.backbone.map(Into::into),
            cache_dir: b.cache_dir.clone(),
            no_cache: b.no_cache,
            backbone_batch: b.backbone_batch,
            stages: b.stages.clone(),
            input_norm: b.input_norm.map(Into::into),
            tiles,
            flow_storage: self.flow_storage.into(),
        })
    }
}

/// Trains with progress bars for the phases.
pub fn train(cli: &Cli, settings: &TrainSettings, data: PathBuf, out: PathBuf, dev: &candle_core::Device) -> Result<Model> {
    let opts = settings.options(data, out, dev)?;
    Ok(differnet::pipeline::train(&opts, &Bar::new(cli, "features"), &Bar::new(cli, "flow"), &Bar::new(cli, "calibrate"))?)
}

pub fn run(cli: &Cli, a: &TrainArgs, dev: &candle_core::Device) -> Result<()> {
    let model = train(cli, &a.settings()?, a.data.clone(), a.out.clone(), dev)?;
    if cli.json {
        super::print_json(&model.manifest);
    } else {
        println!(
            "model written to {} ({} parameters, backbone {})",
            a.out.display(),
            model.flow.parameter_count(),
            model.manifest.backbone.id()
        );
        if let Some(p) = &model.manifest.training.pose_check {
            println!("pose check: {} ({} held-out images against {} fitted ones)", p.verdict(), p.probes, p.references);
        }
    }
    Ok(())
}
