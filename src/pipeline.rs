//! The pipeline that owns the work: a [`Detector`] is a model file opened with its backbone and
//! weights, and runs image → views → features → flow → score → decision → heat map for the CLI,
//! the server, the benchmarks and the experiments alike.

use crate::backbone::BackboneKind;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::features::{Extractor, FeatureCache};
use crate::flow::NormalizingFlow;
use crate::localize::{gradient_map, LocalizationFiles, LocalizationImages, MapStyle};
use crate::model::{Manifest, Model, Threshold, TrainingData, FORMAT, FORMAT_VERSION};
use crate::progress::Progress;
use crate::score::{anomaly_score, score_images, Evaluation, SampleScore, ScoreKind};
use crate::train::{train_flow_with_checkpoints, training_features, Checkpoint, TrainConfig, TrainingSummary};
use crate::transforms::{decode_rgb, resize_bilinear, test_views, InputNormalization, Rgb8, View};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// How a model file is opened. The `expect_*` fields are what the caller asked for; a model
/// trained otherwise is refused with a message saying so (stages, normalization and tiles are
/// fixed when training).
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub device: Device,
    /// Views per backbone forward pass.
    pub backbone_batch: usize,
    /// Feature cache (`dir: None` disables it).
    pub cache: FeatureCache,
    pub expect_stages: Option<Vec<usize>>,
    pub expect_normalization: Option<InputNormalization>,
    pub expect_tiles: Option<usize>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            device: Device::Cpu,
            backbone_batch: 4,
            cache: FeatureCache { dir: Some(FeatureCache::default_dir()) },
            expect_stages: None,
            expect_normalization: None,
            expect_tiles: None,
        }
    }
}

/// The decision on one image: its anomaly score and, when the model has a threshold, whether
/// the score reaches it (paper eq. 6).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Decision {
    pub score: f64,
    pub threshold: Option<f64>,
    pub is_anomaly: Option<bool>,
}

/// A model with the backbone it was trained on and the feature cache.
pub struct Detector {
    pub model: Model,
    pub extractor: Extractor,
    pub cache: FeatureCache,
}

/// The backbone weights installed for `kind`, or an error saying how to install them.
pub fn installed_weights(kind: BackboneKind) -> Result<PathBuf> {
    let path = crate::weights::weights_path(kind);
    if !path.is_file() {
        return Err(Error::Weights(format!("no {} weights at {}: run `differnet weights fetch {}`", kind.id(), path.display(), kind.id())));
    }
    Ok(path)
}

/// The installed backbone of a training configuration, with its stages, normalization and tiles.
fn extractor_for(cfg: &TrainConfig, opts: &OpenOptions) -> Result<Extractor> {
    let mut ex = Extractor::load(cfg.backbone, &installed_weights(cfg.backbone)?, &opts.device)?
        .with_stages(&cfg.feature_stages())?
        .with_normalization(cfg.input_normalization)
        .with_tiles(cfg.tiles);
    ex.batch = opts.backbone_batch.max(1);
    Ok(ex)
}

impl Detector {
    /// Opens a model file and its backbone (the installed weights must be the ones it was
    /// trained with: checked by sha256), with the stages, normalization and tiles it was trained on.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        let model = Model::load(path, &opts.device)?;
        let train = &model.manifest.train;
        let stages = train.feature_stages();
        let refuse = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        if opts.expect_stages.as_ref().is_some_and(|s| *s != stages) {
            return Err(refuse(format!("trained on the features of stages {stages:?}; --stages cannot change them")));
        }
        if opts.expect_normalization.is_some_and(|n| n != train.input_normalization) {
            return Err(refuse(format!(
                "trained with {} input normalization; --input-norm cannot change it",
                train.input_normalization.id()
            )));
        }
        if opts.expect_tiles.is_some_and(|t| t != train.tiles) {
            return Err(refuse(format!("trained with {} tile(s) per image (0: by aspect ratio); --tiles cannot change them", train.tiles)));
        }
        let extractor = extractor_for(train, opts)?;
        model.check_backbone(extractor.kind(), &extractor.weights_sha256, path)?;
        if extractor.feature_dim() != model.flow.config.dim {
            return Err(refuse(format!(
                "the flow takes {} features but stages {stages:?} give {}",
                model.flow.config.dim,
                extractor.feature_dim()
            )));
        }
        Ok(Detector { model, extractor, cache: opts.cache.clone() })
    }

    /// A detector from parts built in memory (benchmarks, tests).
    pub fn new(model: Model, extractor: Extractor, cache: FeatureCache) -> Self {
        Detector { model, extractor, cache }
    }

    /// The test views: `n` rotations, or the model's own number of them.
    pub fn views(&self, n: Option<usize>) -> Vec<View> {
        test_views(n.unwrap_or(self.model.manifest.test_views))
    }

    /// The decision for an anomaly score at the model's threshold.
    pub fn decide(&self, score: f64) -> Decision {
        let threshold = self.model.manifest.threshold.as_ref().map(|t| t.value);
        Decision { score, threshold, is_anomaly: threshold.map(|t| score >= t) }
    }

    /// τ(x) of a decoded image over `views` (each tile's mean, the largest over tiles).
    pub fn score_image(&self, img: &Rgb8, views: &[View]) -> Result<f64> {
        let feats = self.extractor.image_features(img, views)?;
        anomaly_score(&self.model.flow, &feats, self.model.flow.config.dim, self.model.manifest.score, views.len(), &self.extractor.device)
    }

    /// Scores of image files (features from the cache when present), one per path.
    pub fn score_paths(&self, paths: &[PathBuf], views: &[View], progress: &dyn Progress) -> Result<Vec<f64>> {
        score_images(&self.model.flow, self.model.manifest.score, &self.extractor, &self.cache, paths, views, progress)
    }

    /// Decisions for image files.
    pub fn predict_paths(&self, paths: &[PathBuf], views: &[View], progress: &dyn Progress) -> Result<Vec<Decision>> {
        Ok(self.score_paths(paths, views, progress)?.into_iter().map(|s| self.decide(s)).collect())
    }

    /// Image metrics on a labelled dataset (MVTec layout) with `views` test rotations (default:
    /// the model's).
    pub fn evaluate(&self, ds: &Dataset, views: Option<usize>, progress: &dyn Progress) -> Result<Evaluation> {
        ds.require_test()?;
        let views = views.unwrap_or(self.model.manifest.test_views);
        let paths: Vec<PathBuf> = ds.test.iter().map(|s| s.path.clone()).collect();
        let scores = self.score_paths(&paths, &test_views(views), progress)?;
        let samples = ds
            .test
            .iter()
            .zip(scores)
            .map(|(s, score)| SampleScore { path: s.path.display().to_string(), defect: s.defect.clone(), score })
            .collect();
        let m = &self.model.manifest;
        Ok(Evaluation::from_scores(m.backbone.id(), samples, views, m.score, m.threshold.as_ref().map(|t| t.value)))
    }

    /// The gradient map (paper eq. 7) of a decoded image on the 448 × 448 network input,
    /// averaged over `views`.
    pub fn heat_map(&self, img: &Rgb8, views: &[View]) -> Result<Vec<f32>> {
        gradient_map(
            &self.extractor,
            &self.model.flow,
            &resize_bilinear(img, crate::backbone::INPUT_SIZE, crate::backbone::INPUT_SIZE),
            views,
        )
    }

    /// Heat map, overlay and mask of a decoded image at its own resolution.
    pub fn localization_images(&self, img: &Rgb8, views: &[View], style: &MapStyle) -> Result<LocalizationImages> {
        style.render(img, &self.heat_map(img, views)?)
    }

    /// Writes `<stem>_heatmap.png`, `_overlay.png` and `_mask.png` of an image file into `out`.
    pub fn write_localization(&self, path: &Path, views: &[View], style: &MapStyle, out: &Path) -> Result<LocalizationFiles> {
        crate::localize::write_localization(&self.extractor, &self.model.flow, path, views, style, out)
    }

    /// Decodes an image file (the error names it).
    pub fn read_image(path: &Path) -> Result<Rgb8> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        decode_rgb(&bytes).map_err(|reason| Error::Image { path: path.to_path_buf(), reason })
    }
}

/// What `train` needs besides the training configuration: where the images are, where the
/// model goes, what is stored with it.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Dataset root (MVTec AD layout: `train/good`).
    pub data: PathBuf,
    /// Model file to write.
    pub out: PathBuf,
    pub config: TrainConfig,
    /// Per-view score stored with the model.
    pub score: ScoreKind,
    /// Test views stored with the model.
    pub test_views: usize,
    pub threshold: Option<f64>,
    /// Only the first N training images (sorted by name).
    pub max_images: Option<usize>,
    /// Also write the model every N epochs, as `out` with `.epochN` before the extension.
    pub checkpoint_every: Option<usize>,
    pub open: OpenOptions,
}

/// Trains a model on the good images of a dataset and writes it (atomically) to `opts.out`:
/// features of the training views (cached), the flow, and a manifest with everything needed to
/// reproduce and check it. `features` and `flow` receive the progress of the two phases.
pub fn train(opts: &TrainOptions, features: &dyn Progress, flow: &dyn Progress) -> Result<Model> {
    let cfg = &opts.config;
    cfg.validate()?;
    let kind = cfg.backbone;
    let ex = extractor_for(cfg, &opts.open)?;
    let ds = Dataset::open(&opts.data)?;
    ds.require_train()?;
    let mut images = ds.train.clone();
    if let Some(n) = opts.max_images {
        images.truncate(n);
    }
    tracing::info!(backbone = kind.id(), images = images.len(), "training");
    let t0 = std::time::Instant::now();
    let feats = training_features(&images, cfg, &ex, &opts.open.cache, features)?;
    features.finish();
    let feature_seconds = t0.elapsed().as_secs_f64();
    let mut shas: Vec<String> = images.iter().map(|p| crate::weights::sha256_file(p)).collect::<Result<_>>()?;
    shas.sort();
    let training_data = TrainingData {
        root: opts.data.display().to_string(),
        n_images: images.len(),
        images_sha256: crate::weights::sha256_hex(shas.join("").as_bytes()),
    };
    let manifest = |cfg: &TrainConfig, summary: TrainingSummary| Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        library_version: env!("CARGO_PKG_VERSION").into(),
        backbone: kind,
        backbone_weights_sha256: ex.weights_sha256.clone(),
        flow: cfg.flow.clone(),
        permutations: vec![],
        score: opts.score,
        test_views: opts.test_views,
        train: cfg.clone(),
        threshold: opts.threshold.map(|value| Threshold { value, method: "user".into() }),
        localization: None,
        training_data: training_data.clone(),
        training: TrainingSummary { feature_seconds, ..summary },
        parameters_sha256: String::new(),
    };
    let mut save_checkpoint = |epoch: usize, flow: &NormalizingFlow, summary: &TrainingSummary| -> Result<()> {
        let mut c = cfg.clone();
        c.epochs = epoch;
        let path = opts.out.with_extension(format!("epoch{epoch}.safetensors"));
        crate::model::write(&path, manifest(&c, summary.clone()), flow)?;
        tracing::info!(epoch, path = %path.display(), "checkpoint written");
        Ok(())
    };
    let checkpoint = opts.checkpoint_every.map(|every| Checkpoint { every, save: &mut save_checkpoint });
    let (trained, summary) = train_flow_with_checkpoints(&feats, cfg, &opts.open.device, flow, checkpoint)?;
    flow.finish();
    // `write` fills in the parameter checksum and permutations, hashing the parameters once
    let manifest = crate::model::write(&opts.out, manifest(cfg, summary), &trained)?;
    Ok(Model { manifest, flow: trained })
}
