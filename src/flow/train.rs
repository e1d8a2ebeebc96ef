//! Maximum-likelihood training of the flow (paper section 3.1.2, 4.2): random views of every
//! training image are extracted once (cached), then each epoch samples views and minimises L(y).

use crate::backbone::BackboneKind;
use crate::error::{Error, Result};
use crate::features::{Extractor, FeatureCache};
use crate::flow::adam::{Adam, AdamConfig};
use crate::flow::backward::FlowTrainer;
use crate::flow::{nll_loss, FlowConfig, NormalizingFlow};
use crate::progress::Progress;
use crate::views::{Augment, InputNormalization, View};
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;

/// Training schedule and transforms; defaults follow the paper and the official code.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub backbone: BackboneKind,
    /// Backbone stages pooled into the features; empty in models written before stages could
    /// be chosen, which used the last stage (see [`TrainConfig::feature_stages`]).
    #[serde(default)]
    pub stages: Vec<usize>,
    pub flow: FlowConfig,
    pub adam: AdamConfig,
    pub epochs: usize,
    /// Images per batch (official: 24); each contributes `views_per_image` views.
    pub batch_images: usize,
    /// Views of each image per epoch (official: 4).
    pub views_per_image: usize,
    /// Random views extracted once per training image; each epoch samples from them.
    pub cached_views: usize,
    pub augment: Augment,
    pub seed: u64,
    /// How pixels were normalized for the backbone (ImageNet's in models written before this
    /// could be chosen).
    #[serde(default, skip_serializing_if = "is_imagenet")]
    pub input_normalization: InputNormalization,
    /// Square tiles along each image's long side, each scored on its own (1: the whole image;
    /// 0: per image, by its aspect ratio).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub tiles: usize,
    /// Every epoch takes views no earlier epoch took: epoch e uses cached views
    /// [e·views_per_image, (e+1)·views_per_image) of each image, so `cached_views` must be at
    /// least epochs × views_per_image (the paper draws new random transforms every epoch).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh_views: bool,
}

/// The training schedules: what they fix (the rest is the paper's everywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// `Fast` or `Rotation`, whichever the pose check of the training images
    /// ([`crate::features::pose`]) finds: rotated good parts far from the upright ones mean a
    /// fixed pose. Its plan is `Fast`'s; `pipeline::train` switches to `Rotation`'s.
    Auto,
    /// Upright views only, 1 per image, 16 epochs, 1 test view: parts in a fixed pose.
    Fast,
    /// Random rotations, 4 views per image and epoch from 8 cached, 16 epochs, 16 test views:
    /// parts in any orientation, at a fraction of the paper schedule's cost.
    Rotation,
    /// Section 4.2: random rotations, 4 views per image and epoch from 16 cached, 192 epochs,
    /// 64 test views, Adam with its authors' β = (0.9, 0.999).
    Paper,
}

/// The numbers a schedule sets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulePlan {
    pub epochs: usize,
    pub views_per_image: usize,
    pub cached_views: usize,
    pub test_views: usize,
    pub rotate: bool,
    /// Tiles per image (0: by aspect ratio, [`DEFAULT_TILES`]; 1: the whole image squashed to
    /// the square input, as the paper's `Resize(448, 448)` does).
    pub tiles: usize,
    /// Adam's (β₁, β₂): the official code's (0.8, 0.8) for the fast schedule, the paper's
    /// "author-suggested" (0.9, 0.999) (section 4.2, Kingma and Ba's defaults) for its own.
    pub adam_betas: (f64, f64),
}

impl Schedule {
    pub fn plan(self) -> SchedulePlan {
        match self {
            Schedule::Auto | Schedule::Fast => SchedulePlan {
                epochs: 16,
                views_per_image: 1,
                cached_views: 1,
                test_views: 1,
                rotate: false,
                tiles: DEFAULT_TILES,
                adam_betas: (0.8, 0.8),
            },
            Schedule::Rotation => SchedulePlan {
                epochs: 16,
                views_per_image: 4,
                cached_views: 8,
                test_views: 16,
                rotate: true,
                tiles: DEFAULT_TILES,
                adam_betas: (0.8, 0.8),
            },
            Schedule::Paper => SchedulePlan {
                epochs: 192,
                views_per_image: 4,
                cached_views: 16,
                test_views: 64,
                rotate: true,
                tiles: 1,
                adam_betas: (0.9, 0.999),
            },
        }
    }
}

/// `train`'s default tiles: 0, as many as each image's aspect ratio asks for (1 for images closer
/// to square than 1.5 : 1). Chosen on validation data (docs/results.md): held-out good images and
/// pasted synthetic defects of KolektorSDD (image AUROC 0.590 → 0.813) and Magnetic Tile Defects
/// (0.886 → 0.911).
pub const DEFAULT_TILES: usize = 0;

impl TrainConfig {
    /// `train`'s configuration of `schedule` for `backbone`: its default stages and
    /// normalization, the schedule's tiles, no colour jitter.
    pub fn with_schedule(backbone: BackboneKind, schedule: Schedule) -> Self {
        let p = schedule.plan();
        let mut cfg = TrainConfig::new(backbone);
        cfg.train_by(&p);
        cfg.tiles = p.tiles;
        cfg
    }

    /// Takes a plan's training numbers: epochs, views per image, cached views, rotation and
    /// Adam's betas (not its tiles or test views, which belong to the extractor and the model).
    pub fn train_by(&mut self, p: &SchedulePlan) {
        (self.epochs, self.views_per_image, self.cached_views) = (p.epochs, p.views_per_image, p.cached_views);
        self.augment.rotate = p.rotate;
        (self.adam.beta1, self.adam.beta2) = p.adam_betas;
    }
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn is_imagenet(n: &InputNormalization) -> bool {
    *n == InputNormalization::Imagenet
}

impl TrainConfig {
    pub fn new(backbone: BackboneKind) -> Self {
        TrainConfig {
            backbone,
            stages: backbone.default_stages(),
            flow: FlowConfig::new(backbone.feature_dim(&backbone.default_stages())),
            adam: AdamConfig::default(),
            epochs: 192,
            batch_images: 24,
            views_per_image: 4,
            cached_views: 16,
            augment: Augment::default(),
            seed: 0,
            input_normalization: backbone.input_normalization(),
            tiles: 1,
            fresh_views: false,
        }
    }
    /// The pooled stages (the last one for models written before stages could be chosen).
    pub fn feature_stages(&self) -> Vec<usize> {
        if self.stages.is_empty() {
            self.backbone.last_stage()
        } else {
            self.stages.clone()
        }
    }

    /// Sets the pooled stages and the flow's width to match.
    pub fn set_stages(&mut self, stages: &[usize]) -> Result<()> {
        self.backbone.check_stages(stages)?;
        self.stages = stages.to_vec();
        self.flow.dim = self.backbone.feature_dim(stages);
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        self.flow.validate()?;
        self.backbone.check_stages(&self.feature_stages())?;
        if self.epochs == 0 || self.batch_images == 0 || self.views_per_image == 0 {
            return Err(Error::Config("epochs, batch size and views per image must be at least 1".into()));
        }
        if self.cached_views < self.views_per_image {
            return Err(Error::Config(format!(
                "cached views ({}) must be at least the views per image ({})",
                self.cached_views, self.views_per_image
            )));
        }
        if self.fresh_views && self.cached_views < self.epochs * self.views_per_image {
            return Err(Error::Config(format!(
                "fresh views every epoch need epochs × views per image = {} cached views, got {}",
                self.epochs * self.views_per_image,
                self.cached_views
            )));
        }
        let (b1, b2) = (self.adam.beta1, self.adam.beta2);
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(Error::Config(format!("Adam's betas must each be in [0, 1), got ({b1}, {b2})")));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TrainingSummary {
    pub epochs: usize,
    /// Mean loss of each epoch.
    pub epoch_losses: Vec<f64>,
    pub feature_seconds: f64,
    pub flow_seconds: f64,
    /// What `train`'s pose check measured, when it ran one (`--schedule auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pose_check: Option<crate::features::pose::PoseCheck>,
}

/// The random training views of image `i`: deterministic in (seed, i).
pub fn training_views(cfg: &TrainConfig, i: usize) -> Vec<View> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
    (0..cfg.cached_views).map(|_| cfg.augment.sample(&mut rng)).collect()
}

/// Extracts (or loads from cache) the training views' features: one [cached_views, dim] matrix per
/// image, or per tile of each image when the extractor cuts images into tiles (tile by tile).
pub fn training_features(
    images: &[PathBuf],
    cfg: &TrainConfig,
    ex: &Extractor,
    cache: &FeatureCache,
    bar: &dyn Progress,
) -> Result<Vec<Vec<f32>>> {
    use rayon::prelude::*;
    bar.set_length(images.len() as u64);
    // images in parallel: one image's decoding overlaps another's backbone pass
    let per_image: Vec<Vec<f32>> = images
        .par_iter()
        .enumerate()
        .map(|(i, p)| {
            let f = cache.features(ex, p, &training_views(cfg, i))?;
            bar.step(1)?;
            Ok(f)
        })
        .collect::<Result<_>>()?;
    if ex.tiles() == 1 {
        return Ok(per_image);
    }
    // a tile's cached views are consecutive rows
    let per_tile = cfg.cached_views * ex.feature_dim();
    Ok(per_image.iter().flat_map(|f| f.chunks(per_tile).map(<[f32]>::to_vec)).collect())
}

/// Which of an image's `cached` views epoch `epoch` trains on: the next `views_per_image` of
/// them with [`TrainConfig::fresh_views`], else that many drawn at random.
fn epoch_views(cfg: &TrainConfig, epoch: usize, cached: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
    let k = cfg.views_per_image;
    if cfg.fresh_views {
        return (epoch * k..(epoch + 1) * k).map(|v| v % cached).collect();
    }
    let mut picks: Vec<usize> = (0..cached).collect();
    picks.shuffle(rng);
    picks.truncate(k);
    picks
}

fn check_finite(loss: f64, epoch: usize) -> Result<()> {
    if !loss.is_finite() {
        return Err(Error::Training(format!("loss became {loss} in epoch {}; nothing was saved (try a lower --lr)", epoch + 1)));
    }
    Ok(())
}

/// Called after every `every` epochs with the epoch number and the flow as trained so far.
pub struct Checkpoint<'a> {
    pub every: usize,
    pub save: &'a mut dyn FnMut(usize, &NormalizingFlow, &TrainingSummary) -> Result<()>,
}

/// Trains a fresh flow on per-image feature matrices. The same seed gives the same flow.
pub fn train_flow(
    features: &[Vec<f32>],
    cfg: &TrainConfig,
    ex_device: &candle_core::Device,
    bar: &dyn Progress,
) -> Result<(NormalizingFlow, TrainingSummary)> {
    train_flow_with_checkpoints(features, cfg, ex_device, bar, None)
}

/// [`train_flow`] with an optional checkpoint callback.
pub fn train_flow_with_checkpoints(
    features: &[Vec<f32>],
    cfg: &TrainConfig,
    ex_device: &candle_core::Device,
    bar: &dyn Progress,
    mut checkpoint: Option<Checkpoint>,
) -> Result<(NormalizingFlow, TrainingSummary)> {
    cfg.validate()?;
    if features.is_empty() {
        return Err(Error::Training("no training images".into()));
    }
    let dim = cfg.flow.dim;
    if let Some((i, _)) = features.iter().enumerate().find(|(_, f)| f.len() % dim != 0 || f.len() / dim < cfg.views_per_image) {
        return Err(Error::Training(format!("training image {i} has too few feature views for {} views per epoch", cfg.views_per_image)));
    }
    let new_flow = || NormalizingFlow::new(cfg.flow.clone(), cfg.seed, ex_device);
    // On the CPU the flow trains with its hand-written backward pass (flow_grad) on the trainer's
    // own copy of the parameters, and the candle flow is rebuilt from it only when saved, so its
    // parameters are not held twice; elsewhere with candle's autograd. Both compute the same
    // loss and gradients (tests/flow_reference.rs).
    let (mut flow, mut fast) =
        if ex_device.is_cpu() { (None, Some(FlowTrainer::new(cfg.flow.clone(), cfg.seed)?)) } else { (Some(new_flow()?), None) };
    let mut adam = flow.as_ref().map(|f| Adam::new(f.named_parameters().into_iter().map(|(_, v)| v.clone()).collect(), cfg.adam.clone()));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5EED);
    let mut summary = TrainingSummary::default();
    let start = std::time::Instant::now();
    bar.set_length(cfg.epochs as u64);
    let mut order: Vec<usize> = (0..features.len()).collect();
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let (mut total, mut batches) = (0f64, 0usize);
        for chunk in order.chunks(cfg.batch_images) {
            let mut rows = Vec::with_capacity(chunk.len() * cfg.views_per_image * dim);
            for &i in chunk {
                for v in epoch_views(cfg, epoch, features[i].len() / dim, &mut rng) {
                    rows.extend_from_slice(&features[i][v * dim..(v + 1) * dim]);
                }
            }
            let n_rows = chunk.len() * cfg.views_per_image;
            let value = match fast.as_mut() {
                Some(t) => {
                    let value = t.train_step(&rows, n_rows, &cfg.adam);
                    check_finite(value, epoch)?;
                    value
                }
                None => {
                    let (flow, adam) = (flow.as_ref().expect("flow without trainer"), adam.as_mut().expect("adam with flow"));
                    let y = Tensor::from_vec(rows, (n_rows, dim), ex_device)?;
                    let (z, logdet) = flow.forward(&y)?;
                    let loss = nll_loss(&z, &logdet)?;
                    let value = loss.to_scalar::<f32>()? as f64;
                    check_finite(value, epoch)?;
                    adam.step(&loss.backward()?)?;
                    value
                }
            };
            total += value;
            batches += 1;
        }
        let mean = total / batches as f64;
        summary.epoch_losses.push(mean);
        bar.set_message(&format!("loss {mean:.4}"));
        bar.step(1)?;
        tracing::debug!(epoch = epoch + 1, loss = mean, "epoch done");
        if let Some(c) = checkpoint.as_mut() {
            if c.every > 0 && (epoch + 1) % c.every == 0 && epoch + 1 < cfg.epochs {
                summary.epochs = epoch + 1;
                summary.flow_seconds = start.elapsed().as_secs_f64();
                match (&fast, &flow) {
                    (Some(t), _) => {
                        let snapshot = new_flow()?;
                        t.write_to(&snapshot)?;
                        (c.save)(epoch + 1, &snapshot, &summary)?;
                    }
                    (None, Some(f)) => (c.save)(epoch + 1, f, &summary)?,
                    (None, None) => unreachable!("a flow or its trainer exists"),
                }
            }
        }
    }
    if let Some(t) = fast.take() {
        let params = t.into_parameters();
        let f = new_flow()?;
        params.write_to(&f)?;
        flow = Some(f);
    }
    summary.epochs = cfg.epochs;
    summary.flow_seconds = start.elapsed().as_secs_f64();
    Ok((flow.expect("trained flow"), summary))
}

#[cfg(test)]
mod stage_tests {
    use super::*;

    #[test]
    fn configs_written_before_stages_existed_mean_the_last_stage() {
        let mut v = serde_json::to_value(TrainConfig::new(BackboneKind::EfficientnetLite0)).unwrap();
        assert_eq!(v["stages"], serde_json::json!([3, 4, 5]));
        v.as_object_mut().unwrap().remove("stages");
        let old: TrainConfig = serde_json::from_value(v).unwrap();
        assert_eq!(old.feature_stages(), vec![6]);
        let mut cfg = TrainConfig::new(BackboneKind::EfficientnetLite0);
        assert_eq!(cfg.flow.dim, 3 * (80 + 112 + 192));
        cfg.set_stages(&[6]).unwrap();
        assert_eq!(cfg.flow.dim, 960);
        assert!(cfg.set_stages(&[5, 4]).is_err() && cfg.set_stages(&[7]).is_err() && cfg.set_stages(&[]).is_err());
        assert!(TrainConfig::new(BackboneKind::Alexnet).set_stages(&[1]).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_views_take_every_cached_view_once_and_need_enough_of_them() {
        let mut cfg = TrainConfig::new(BackboneKind::Alexnet);
        (cfg.epochs, cfg.views_per_image, cfg.cached_views, cfg.fresh_views) = (5, 4, 20, true);
        cfg.validate().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut used: Vec<usize> = (0..cfg.epochs).flat_map(|e| epoch_views(&cfg, e, cfg.cached_views, &mut rng)).collect();
        assert_eq!(&used[..4], &[0, 1, 2, 3], "epoch 0 takes the first views");
        used.sort_unstable();
        assert_eq!(used, (0..20).collect::<Vec<_>>(), "each view exactly once over the epochs");
        cfg.cached_views = 19;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("20 cached views, got 19"), "{err}");
        // sampled views: distinct within an epoch, from the cached ones, repeating across epochs
        cfg.fresh_views = false;
        let sampled: Vec<Vec<usize>> = (0..cfg.epochs).map(|e| epoch_views(&cfg, e, 6, &mut rng)).collect();
        for s in &sampled {
            let mut d = s.clone();
            d.sort_unstable();
            d.dedup();
            assert!(d.len() == 4 && d.iter().all(|v| *v < 6), "{s:?}");
        }
    }
}
