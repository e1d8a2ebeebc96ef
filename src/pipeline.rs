//! The pipeline that owns the work: a [`Detector`] is a model file opened with its backbone and
//! weights, and runs image → views → features → flow → score → decision → heat map for the CLI,
//! the server, the benchmarks and the experiments alike.

use crate::backbone::BackboneKind;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::eval::evaluation::{Evaluation, SampleScore};
use crate::eval::pixel_metrics::PixelMetrics;
use crate::features::local_density::{LocalDensity, LocalDensityFit, LocalDensityInfo};
use crate::features::pose::{check_pose, PoseCheck};
use crate::features::{Extractor, FeatureCache};
use crate::flow::train::{train_flow_with_checkpoints, training_features, Checkpoint, SchedulePlan, TrainConfig, TrainingSummary};
use crate::flow::NormalizingFlow;
use crate::localize::render::{write_heatmaps, LocalizationFiles, LocalizationImages, MapStyle};
use crate::localize::{feature_map, gradient_map, resize_plane, GoodMapRange, MapKind};
use crate::model::{
    FlowStorage, ImageScore, Manifest, Model, ScoreRange, ScoreStandardization, Threshold, TrainingData, FORMAT, FORMAT_VERSION,
};
use crate::progress::Progress;
use crate::score::{anomaly_score, largest_tile_score, score_images, view_scores, ScoreKind};
use crate::views::{decode_rgb, resize_bilinear, square_tiles, test_views, tile_origins, InputNormalization, Rgb8, View};
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
    /// The score normalized as anomalib does, clamp((s − θ)/(max − min) + 0.5, 0, 1) with the
    /// model's threshold θ and the score range of good images: 0.5 at the threshold. `None`
    /// without a threshold or range.
    pub pred_score: Option<f64>,
}

/// An anomaly map at an image's own resolution, row-major; larger is more anomalous.
#[derive(Clone, Debug, PartialEq)]
pub struct AnomalyMap {
    pub kind: MapKind,
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

/// A model with the backbone it was trained on and the feature cache.
pub struct Detector {
    pub model: Model,
    pub extractor: Extractor,
    pub cache: FeatureCache,
}

/// The backbone weights installed for `kind`, or an error saying how to install them.
pub fn installed_weights(kind: BackboneKind) -> Result<PathBuf> {
    let path = crate::backbone::weights::weights_path(kind);
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
        let m = &self.model.manifest;
        let threshold = m.threshold.as_ref().map(|t| t.value);
        let pred_score = threshold.zip(m.score_range).map(|(t, r)| r.normalize(score, t));
        Decision { score, threshold, is_anomaly: threshold.map(|t| score >= t), pred_score }
    }

    /// The map drawn when none is asked for: feature maps when the model has a local density,
    /// gradient maps otherwise.
    pub fn default_map(&self) -> MapKind {
        if self.model.local.is_some() {
            MapKind::Features
        } else {
            MapKind::Gradient
        }
    }

    /// How maps of `kind` (default: [`Self::default_map`]) are drawn by default: against the
    /// model's range of good maps of that kind when it has one, else per image.
    pub fn map_style(&self, kind: Option<MapKind>) -> MapStyle {
        MapStyle::for_model(kind.unwrap_or(self.default_map()), self.model.manifest.localization.as_ref())
    }

    /// τ(x) of a decoded image over `views` (each tile's mean, the largest over tiles).
    pub fn score_image(&self, img: &Rgb8, views: &[View]) -> Result<f64> {
        Ok(self.inspect(img, views, None)?.0)
    }

    /// The anomaly score of a decoded image (the model's [`ImageScore`]) and, when `map` is
    /// given, its anomaly map of that kind at the image's resolution. Feature maps come from the
    /// same backbone passes as the score; tiles are mapped one by one and put back where they
    /// came from (the larger value where two overlap).
    pub fn inspect(&self, img: &Rgb8, views: &[View], map: Option<MapKind>) -> Result<(f64, Option<AnomalyMap>)> {
        let combined = matches!(self.model.manifest.image_score, ImageScore::FlowAndMapMax(_));
        let parts = self.inspect_parts(img, views, map == Some(MapKind::Features) || combined, map == Some(MapKind::Gradient))?;
        let score = self.image_score(parts.flow, parts.features.as_deref());
        let values = match map {
            Some(MapKind::Features) => parts.features,
            Some(MapKind::Gradient) => parts.gradient,
            None => None,
        };
        let map = map.zip(values).map(|(kind, values)| AnomalyMap { kind, width: img.width, height: img.height, values });
        Ok((score, map))
    }

    /// The model's image score from the flow's score and, for [`ImageScore::FlowAndMapMax`], the
    /// image's feature map.
    fn image_score(&self, flow: f64, feature_map: Option<&[f32]>) -> f64 {
        match (self.model.manifest.image_score, feature_map) {
            (ImageScore::FlowAndMapMax(st), Some(m)) => st.combine(flow, map_max(m)),
            _ => flow,
        }
    }

    /// Scores of several decoded images over `views`, the same as [`Self::score_image`] of each:
    /// the backbone and maps image by image, the flow once over the views of all of them (its
    /// weights are read once per batch instead of once per image, as a server needs under load).
    pub fn score_batch(&self, imgs: &[Rgb8], views: &[View]) -> Result<Vec<f64>> {
        let combined = matches!(self.model.manifest.image_score, ImageScore::FlowAndMapMax(_));
        let parts = imgs.iter().map(|img| self.local_parts(img, views, combined, false)).collect::<Result<Vec<_>>>()?;
        let all: Vec<f32> = parts.iter().flat_map(|p| p.features_per_view.iter().copied()).collect();
        let m = &self.model;
        let dim = m.flow.config.dim;
        let scores = view_scores(&m.flow, &all, dim, m.manifest.score, &self.extractor.device)?;
        let mut rest = &scores[..];
        let mut out = Vec::with_capacity(parts.len());
        for p in &parts {
            let (own, next) = rest.split_at(p.features_per_view.len() / dim);
            rest = next;
            out.push(self.image_score(largest_tile_score(own, views.len()), p.features.as_deref()));
        }
        Ok(out)
    }

    /// τ(x) of a decoded image over `views` (each tile's mean, the largest over tiles) and the
    /// feature and gradient maps asked for, at the image's resolution.
    fn inspect_parts(&self, img: &Rgb8, views: &[View], features: bool, gradient: bool) -> Result<InspectParts> {
        let local = self.local_parts(img, views, features, gradient)?;
        let m = &self.model;
        let flow =
            anomaly_score(&m.flow, &local.features_per_view, m.flow.config.dim, m.manifest.score, views.len(), &self.extractor.device)?;
        Ok(InspectParts { flow, features: local.features, gradient: local.gradient })
    }

    /// The pooled features of every tile and view of a decoded image (rows of the flow's input)
    /// and the feature and gradient maps asked for, at the image's resolution.
    fn local_parts(&self, img: &Rgb8, views: &[View], features: bool, gradient: bool) -> Result<LocalParts> {
        let tiles = self.extractor.tiles_for(img.width, img.height);
        let mut feats = vec![];
        let blank = || vec![f32::NEG_INFINITY; img.width * img.height];
        let (mut fmap, mut gmap) = (features.then(blank), gradient.then(blank));
        let n = crate::backbone::INPUT_SIZE;
        // a 448×448 tile map put back at the tile's place (the larger value where tiles overlap)
        let place = |full: &mut Vec<f32>, m448: &[f32], (x0, y0, side): (usize, usize, usize)| {
            if tiles == 1 {
                *full = resize_plane(m448, n, n, img.width, img.height);
            } else {
                let part = resize_plane(m448, n, n, side, side);
                for y in 0..side {
                    let row = &mut full[(y0 + y) * img.width + x0..][..side];
                    row.iter_mut().zip(&part[y * side..(y + 1) * side]).for_each(|(a, b)| *a = a.max(*b));
                }
            }
        };
        let origins = tile_origins(img.width, img.height, tiles);
        // every tile's local grids first: image contrast compares them with the whole image's
        let mut local = vec![];
        for (tile, &origin) in square_tiles(img, tiles).iter().zip(&origins) {
            let resized = resize_bilinear(tile, n, n);
            if fmap.is_some() {
                let (f, grids) = self.extractor.view_features_and_local(&resized, views)?;
                feats.extend(f);
                local.extend(grids);
            } else {
                feats.extend(self.extractor.view_features(&resized, views)?);
            }
            if let Some(full) = gmap.as_mut() {
                place(full, &gradient_map(&self.extractor, &self.model.flow, &resized, views)?, origin);
            }
        }
        if let Some(full) = fmap.as_mut() {
            let distances = self.local_density()?.image_distances(&local);
            for (grids, &origin) in distances.chunks(views.len().max(1)).zip(&origins) {
                place(full, &feature_map(grids, views), origin);
            }
        }
        Ok(LocalParts { features_per_view: feats, features: fmap, gradient: gmap })
    }

    /// What an exported graph (`differnet export --format onnx`) takes for a decoded image: per
    /// tile, its views' network inputs and the size its anomaly map is resized to (the image's
    /// own size for one tile). The image's score is the largest of its tiles' graph scores.
    pub fn network_inputs(&self, img: &Rgb8, views: &[View]) -> Result<Vec<NetworkInput>> {
        let tiles = self.extractor.tiles_for(img.width, img.height);
        let n = crate::backbone::INPUT_SIZE;
        square_tiles(img, tiles)
            .iter()
            .map(|tile| {
                let (height, width) = if tiles == 1 { (img.height, img.width) } else { (tile.height, tile.width) };
                Ok(NetworkInput {
                    values: self.extractor.view_inputs(&resize_bilinear(tile, n, n), views)?,
                    rows: views.len(),
                    height,
                    width,
                })
            })
            .collect()
    }

    /// Scores of images given as network inputs (the rows an exported graph takes, e.g. from
    /// [`Self::network_inputs`] of one-tile images): [images × views, 3, 448, 448] row-major, each
    /// image's `views` rows consecutive. A combined score's map maximum is taken at 448 × 448
    /// (the graph's default `image_size`) and needs one view per image.
    pub fn score_network_inputs(&self, rows: &[f32], views: usize) -> Result<Vec<f64>> {
        let n = crate::backbone::INPUT_SIZE;
        let per_row = 3 * n * n;
        let count = rows.len() / per_row;
        if views == 0 || count == 0 || !rows.len().is_multiple_of(per_row) || !count.is_multiple_of(views) {
            return Err(Error::Config(format!(
                "network inputs: {} values are not whole images of {views} views of 3 x {n} x {n}",
                rows.len()
            )));
        }
        let combined = matches!(self.model.manifest.image_score, ImageScore::FlowAndMapMax(_));
        if combined && views > 1 {
            return Err(Error::Config(format!(
                "the model combines the flow's score with its feature map; network inputs give one view per image, not {views}"
            )));
        }
        let density = if combined { Some(self.local_density()?) } else { None };
        let (mut features, mut maps) = (Vec::with_capacity(count * self.model.flow.config.dim), vec![]);
        for chunk in rows.chunks(per_row * self.extractor.batch.max(1)) {
            let x = candle_core::Tensor::from_slice(chunk, (chunk.len() / per_row, 3, n, n), &self.extractor.device)?;
            let (f, grids) = self.extractor.input_features(&x, density.is_some())?;
            features.extend(f);
            if let Some(d) = density {
                // one view of a one-tile image per row: each row is an image of its own
                let one = [View::rotation(0.0)];
                maps.extend(grids.iter().map(|g| feature_map(&d.image_distances(std::slice::from_ref(g)), &one)));
            }
        }
        let m = &self.model;
        let scores = view_scores(&m.flow, &features, m.flow.config.dim, m.manifest.score, &self.extractor.device)?;
        Ok(crate::score::mean_per_image(&scores, views)
            .into_iter()
            .enumerate()
            .map(|(i, flow)| self.image_score(flow, maps.get(i).map(Vec::as_slice)))
            .collect())
    }

    /// The model's local feature density, or an error saying the model has none.
    fn local_density(&self) -> Result<&LocalDensity> {
        self.model.local.as_ref().ok_or_else(|| {
            Error::Config(
                "the model has no local feature density (trained before feature maps existed): retrain it, or use --map gradient".into(),
            )
        })
    }

    /// Scores of image files, one per path: the flow's from cached features when the model's
    /// image score is the flow's alone, else each image's flow score and feature map.
    pub fn score_paths(&self, paths: &[PathBuf], views: &[View], progress: &dyn Progress) -> Result<Vec<f64>> {
        Ok(self.score_parts_paths(paths, views, progress)?.into_iter().map(|(score, _)| score).collect())
    }

    /// (image score, flow score) of image files.
    fn score_parts_paths(&self, paths: &[PathBuf], views: &[View], progress: &dyn Progress) -> Result<Vec<(f64, f64)>> {
        if self.model.manifest.image_score == ImageScore::Flow {
            let scores = score_images(&self.model.flow, self.model.manifest.score, &self.extractor, &self.cache, paths, views, progress)?;
            return Ok(scores.into_iter().map(|s| (s, s)).collect());
        }
        progress.set_length(paths.len() as u64);
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let parts = self.inspect_parts(&Self::read_image(p)?, views, true, false)?;
            out.push((self.image_score(parts.flow, parts.features.as_deref()), parts.flow));
            progress.step(1)?;
        }
        progress.finish();
        Ok(out)
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
        let scores = self.score_parts_paths(&paths, &test_views(views), progress)?;
        let m = &self.model.manifest;
        let combined = m.image_score != ImageScore::Flow;
        let samples = ds
            .test
            .iter()
            .zip(&scores)
            .map(|(s, &(score, flow))| SampleScore {
                path: s.path.display().to_string(),
                defect: s.defect.clone(),
                score,
                map_max: None,
                flow_score: combined.then_some(flow),
            })
            .collect();
        let mut ev = Evaluation::from_scores(m.backbone.id(), samples, views, m.score, m.threshold.as_ref().map(|t| t.value));
        if combined {
            let (flow, labels): (Vec<f64>, Vec<bool>) = scores.iter().zip(&ds.test).map(|(s, t)| (s.1, t.defect != "good")).unzip();
            ev.flow_score_auroc = crate::eval::metrics::auroc(&flow, &labels);
        }
        Ok(ev)
    }

    /// The anomaly map of kind `kind` of a decoded image at its resolution, over `views`.
    pub fn anomaly_map(&self, img: &Rgb8, views: &[View], kind: MapKind) -> Result<AnomalyMap> {
        Ok(self.inspect(img, views, Some(kind))?.1.expect("a map was asked for"))
    }

    /// Heat map, overlay and mask of a decoded image at its own resolution, of the style's kind.
    pub fn localization_images(&self, img: &Rgb8, views: &[View], style: &MapStyle) -> Result<LocalizationImages> {
        style.render(img, &self.anomaly_map(img, views, style.kind)?.values)
    }

    /// Writes `<stem>_heatmap.png`, `_overlay.png` and `_mask.png` of an image file into `out`.
    pub fn write_localization(&self, path: &Path, views: &[View], style: &MapStyle, out: &Path) -> Result<LocalizationFiles> {
        let pictures = self.localization_images(&Self::read_image(path)?, views, style)?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
        write_heatmaps(&pictures, out, &stem)
    }

    /// The range of the maps of kind `kind` of good images, for heat maps drawn against good parts.
    pub fn good_map_range(&self, paths: &[PathBuf], views: &[View], kind: MapKind, progress: &dyn Progress) -> Result<GoodMapRange> {
        progress.set_length(paths.len() as u64);
        let mut maps = vec![];
        for p in paths {
            maps.push(self.anomaly_map(&Self::read_image(p)?, views, kind)?.values);
            progress.step(1)?;
        }
        GoodMapRange::from_maps(kind, &maps, views.len())
            .ok_or_else(|| Error::Config("no good images to calibrate the heat maps on".into()))
    }

    /// Maps of kind `kind` over `views` of every test image: pixel AUROC and AUPRO against the
    /// masks (overall and per defect type; defective images without a mask are left out of
    /// them), each sample's map maximum and the image AUROC of those maxima, all stored in `ev`.
    pub fn add_pixel_metrics(&self, ev: &mut Evaluation, ds: &Dataset, views: usize, kind: MapKind, progress: &dyn Progress) -> Result<()> {
        let v = test_views(views);
        progress.set_length(ds.test.len() as u64);
        let mut items = vec![];
        let mut maxima = std::collections::HashMap::new();
        for s in &ds.test {
            let map = self.anomaly_map(&Self::read_image(&s.path)?, &v, kind)?;
            maxima.insert(s.path.display().to_string(), map_max(&map.values));
            progress.step(1)?;
            let mask: Vec<bool> = match &s.mask {
                Some(m) => {
                    let m = Self::read_image(m)?;
                    if (m.width, m.height) != (map.width, map.height) {
                        return Err(Error::Dataset {
                            path: s.path.clone(),
                            reason: format!("mask is {}x{}, image is {}x{}", m.width, m.height, map.width, map.height),
                        });
                    }
                    m.channel(0).iter().map(|&v| v > 127).collect()
                }
                None if s.is_defect() => continue,
                None => vec![false; map.width * map.height],
            };
            items.push((s.defect.clone(), map.values, mask, map.width));
        }
        ev.pixel = Some(PixelMetrics::compute(kind, &items, views));
        for sample in &mut ev.samples {
            sample.map_max = maxima.get(&sample.path).copied();
        }
        let (m, labels): (Vec<f64>, Vec<bool>) = ev.samples.iter().filter_map(|s| Some((s.map_max?, s.defect != "good"))).unzip();
        ev.map_max_auroc = crate::eval::metrics::auroc(&m, &labels);
        Ok(())
    }

    /// Decodes an image file (the error names it).
    pub fn read_image(path: &Path) -> Result<Rgb8> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        decode_rgb(&bytes).map_err(|reason| Error::Image { path: path.to_path_buf(), reason })
    }
}

/// The rows of an exported graph's `input` for one tile of an image, and its `image_size`.
#[derive(Clone, Debug)]
pub struct NetworkInput {
    /// [rows, 3, 448, 448] row-major, one row per view.
    pub values: Vec<f32>,
    pub rows: usize,
    pub height: usize,
    pub width: usize,
}

/// What a decoded image gives before the flow: its pooled features and the maps asked for.
struct LocalParts {
    /// [tiles × views, dim] row-major.
    features_per_view: Vec<f32>,
    features: Option<Vec<f32>>,
    gradient: Option<Vec<f32>>,
}

/// What [`Detector::inspect_parts`] computed for one image.
struct InspectParts {
    /// The flow's score τ(x).
    flow: f64,
    features: Option<Vec<f32>>,
    gradient: Option<Vec<f32>>,
}

/// The largest finite value of a map.
fn map_max(map: &[f32]) -> f64 {
    map.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max) as f64
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
    /// Fraction of the training images kept out of the flow's fit; their scores set the
    /// threshold (unless `threshold` is given), the score range of `pred_score` and the range of
    /// good heat maps. `None`: every image is fitted and nothing is calibrated.
    pub holdout: Option<f64>,
    /// The false-positive rate the stored threshold allows (on the held-out images).
    pub target_fpr: f64,
    /// Fit the local feature density that feature maps need.
    pub feature_maps: bool,
    /// The local vectors carry their difference from their image's median
    /// ([`crate::features::local_density::modelled_vectors`]).
    pub image_contrast: bool,
    /// Radius in grid cells of the local density's coarse scale
    /// ([`crate::features::local_density::LocalDensity::coarse`]); `None`: the fine scale alone.
    pub coarse_radius: Option<usize>,
    /// Score images by the flow's score and the feature map's maximum, standardized on the
    /// held-out images ([`ImageScore::FlowAndMapMax`]); needs `feature_maps` and held-out images,
    /// else the flow's score alone.
    pub combined_score: bool,
    /// How the model file stores the flow (f16 halves it; the flow is rounded before calibration).
    pub flow_storage: FlowStorage,
    /// When set, `train` first checks whether the good images show parts in a fixed pose
    /// ([`check_pose`]); parts in any orientation are trained and scored with this plan's
    /// epochs, views, cached views, rotation, Adam betas and test views instead.
    pub any_pose_plan: Option<SchedulePlan>,
    pub open: OpenOptions,
}

impl TrainOptions {
    /// `train`'s defaults around a configuration: the default score, the test views of the
    /// configuration's schedule (1 unless it rotates: then 64), 15% held out for a 1%-FPR
    /// threshold, feature maps and the combined image score, no checkpoints.
    pub fn new(data: PathBuf, out: PathBuf, config: TrainConfig) -> Self {
        let test_views =
            if config.augment.rotate { crate::flow::train::Schedule::Paper } else { crate::flow::train::Schedule::Fast }.plan().test_views;
        TrainOptions {
            data,
            out,
            config,
            score: ScoreKind::MeanZ2,
            test_views,
            threshold: None,
            max_images: None,
            checkpoint_every: None,
            holdout: Some(DEFAULT_HOLDOUT),
            target_fpr: DEFAULT_TARGET_FPR,
            feature_maps: true,
            image_contrast: DEFAULT_IMAGE_CONTRAST,
            coarse_radius: Some(DEFAULT_COARSE_RADIUS),
            combined_score: true,
            flow_storage: FlowStorage::F32,
            any_pose_plan: None,
            open: OpenOptions::default(),
        }
    }
}

/// Whether `train`'s feature maps use image contrast by default: on, chosen on the validation
/// sets (their region defects localized better on all three, the small ones and image AUROC
/// unchanged; docs/results.md).
pub const DEFAULT_IMAGE_CONTRAST: bool = true;

/// Radius in grid cells of the local density's coarse scale by default: 8, a 17 × 17 window
/// (272 px of the 448 input on EfficientNet-Lite0's 28-cell grid), eroded over the same window;
/// chosen on the validation sets (the highest AUPRO averaged over the three of radii 5 and 8;
/// 11 fell below 8 on both sets it was run on; docs/results.md, "A coarse scale").
pub const DEFAULT_COARSE_RADIUS: usize = 8;

/// `train`'s default held-out fraction of the training images.
pub const DEFAULT_HOLDOUT: f64 = 0.15;
/// At least this many images are held out (more than the fraction gives when there are few).
pub const MIN_HELD_OUT: usize = 3;
/// With fewer training images nothing is held out (the flow needs them all); `train` warns.
pub const MIN_IMAGES_FOR_HOLDOUT: usize = 10;
/// `train`'s default false-positive rate of the stored threshold.
pub const DEFAULT_TARGET_FPR: f64 = 0.01;
/// Views of each image the local density is fitted on, at most: the model's first test views.
const LOCAL_FIT_VIEWS: usize = 4;

/// The threshold for a false-positive rate `fpr` on good scores the flow was not fitted on: the
/// larger of the empirical one (at most ⌊fpr·n⌋ of them reach it) and the Gaussian estimate
/// mean + z₁₋fpr·std, which keeps a few held-out images from setting the threshold at their
/// maximum alone. Returns the value and how it was chosen.
pub fn holdout_threshold(good: &[f64], fpr: f64) -> Option<Threshold> {
    let empirical = crate::eval::metrics::threshold_for_fpr(good, fpr)?;
    let n = good.len() as f64;
    let mean = good.iter().sum::<f64>() / n;
    let std = (good.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    let gaussian = mean + crate::eval::metrics::normal_quantile(1.0 - fpr) * std;
    let (value, how) = if gaussian > empirical { (gaussian, "gaussian") } else { (empirical, "empirical") };
    Some(Threshold { value, method: format!("fpr={fpr} on {} held-out good images ({how})", good.len()) })
}

/// Trains a model on the good images of a dataset and writes it (atomically) to `opts.out`:
/// features of the training views (cached), the flow, and a manifest with everything needed to
/// reproduce and check it. `features`, `flow` and `after` receive the progress of the phases:
/// training features, the flow's epochs, then the local density and the held-out images.
pub fn train(opts: &TrainOptions, features: &dyn Progress, flow: &dyn Progress, after: &dyn Progress) -> Result<Model> {
    opts.config.validate()?;
    let ex = extractor_for(&opts.config, &opts.open)?;
    let ds = Dataset::open(&opts.data)?;
    ds.require_train()?;
    let mut images = ds.train.clone();
    if let Some(n) = opts.max_images {
        images.truncate(n);
    }
    let held_out = match opts.holdout {
        Some(f) if images.len() >= MIN_IMAGES_FOR_HOLDOUT => {
            let f = f.max(MIN_HELD_OUT as f64 / images.len() as f64);
            let split = crate::data::validation::holdout_split(&images, f, opts.config.seed)?;
            images = split.fit;
            split.held_out
        }
        Some(_) => {
            tracing::warn!(
                images = images.len(),
                "too few training images to hold any out (need {MIN_IMAGES_FOR_HOLDOUT}): no threshold is stored; set one with --threshold or `differnet calibrate`"
            );
            vec![]
        }
        None => vec![],
    };
    if !held_out.is_empty() && (held_out.len() as f64) * opts.target_fpr < 1.0 {
        tracing::warn!(
            held_out = held_out.len(),
            fpr = opts.target_fpr,
            "too few held-out images to measure a false-positive rate of {} (needs {}): the threshold leans on a Gaussian fit of their scores",
            opts.target_fpr,
            (1.0 / opts.target_fpr).ceil()
        );
    }
    let (opts, pose_check) = resolve_pose(opts, &ex, &images, &held_out, features)?;
    let opts = &opts;
    let cfg = &opts.config;
    let kind = cfg.backbone;
    tracing::info!(backbone = kind.id(), images = images.len(), held_out = held_out.len(), "training");
    let t0 = std::time::Instant::now();
    let feats = training_features(&images, cfg, &ex, &opts.open.cache, features)?;
    features.finish();
    let feature_seconds = t0.elapsed().as_secs_f64();
    let mut shas: Vec<String> = images.iter().map(|p| crate::backbone::weights::sha256_file(p)).collect::<Result<_>>()?;
    shas.sort();
    let training_data = TrainingData {
        root: opts.data.display().to_string(),
        n_images: images.len(),
        images_sha256: crate::backbone::weights::sha256_hex(shas.join("").as_bytes()),
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
        image_score: ImageScore::Flow,
        score_range: None,
        local_density: None,
        localization: None,
        training_data: training_data.clone(),
        training: TrainingSummary { feature_seconds, pose_check: pose_check.clone(), ..summary },
        flow_storage: opts.flow_storage,
        parameters_sha256: String::new(),
    };
    let mut save_checkpoint = |epoch: usize, flow: &NormalizingFlow, summary: &TrainingSummary| -> Result<()> {
        let mut c = cfg.clone();
        c.epochs = epoch;
        let path = opts.out.with_extension(format!("epoch{epoch}.safetensors"));
        crate::model::write(&path, manifest(&c, summary.clone()), flow, None)?;
        tracing::info!(epoch, path = %path.display(), "checkpoint written");
        Ok(())
    };
    let checkpoint = opts.checkpoint_every.map(|every| Checkpoint { every, save: &mut save_checkpoint });
    let (trained, summary) = train_flow_with_checkpoints(&feats, cfg, &opts.open.device, flow, checkpoint)?;
    flow.finish();
    // calibrate the flow the file will hold
    opts.flow_storage.round(&trained)?;
    let mut manifest = manifest(cfg, summary);
    let local = if opts.feature_maps {
        let views = test_views(opts.test_views.clamp(1, LOCAL_FIT_VIEWS));
        let g = fit_local_density(&ex, &images, &views, opts.image_contrast, opts.coarse_radius, after)?;
        manifest.local_density = Some(LocalDensityInfo::of(&g.0, g.1, images.len()));
        Some(g.0)
    } else {
        None
    };
    let mut detector = Detector::new(Model { manifest, flow: trained, local }, ex, opts.open.cache.clone());
    if !held_out.is_empty() {
        calibrate_on_held_out(&mut detector, &held_out, opts, after)?;
    }
    // `write` fills in the checksums and permutations, hashing the parameters once
    let m = detector.model;
    let manifest = crate::model::write(&opts.out, m.manifest, &m.flow, m.local.as_ref())?;
    Ok(Model { manifest, flow: m.flow, local: m.local })
}

/// `opts` with the pose check done when it asks for one ([`TrainOptions::any_pose_plan`]): the
/// held-out images (or, with none, a seeded fifth of the training images) probed against the
/// fitted ones; parts found in any orientation get the any-pose plan. Returns what the check
/// measured (`None` when none was asked for or there were too few images).
fn resolve_pose(
    opts: &TrainOptions,
    ex: &Extractor,
    fit: &[PathBuf],
    held_out: &[PathBuf],
    progress: &dyn Progress,
) -> Result<(TrainOptions, Option<PoseCheck>)> {
    let Some(plan) = opts.any_pose_plan else { return Ok((opts.clone(), None)) };
    let (references, probes) = if !held_out.is_empty() {
        (fit.to_vec(), held_out.to_vec())
    } else if fit.len() >= 2 {
        let split = crate::data::validation::holdout_split(fit, 0.2, opts.config.seed)?;
        (split.fit, split.held_out)
    } else {
        tracing::warn!(images = fit.len(), "too few training images to check their pose: trained for a fixed pose");
        return Ok((opts.clone(), None));
    };
    let check = check_pose(ex, &opts.open.cache, &references, &probes, progress)?;
    tracing::info!(
        ratio = check.ratio,
        any_pose_below = check.any_pose_below,
        probes = check.probes,
        references = check.references,
        "pose check: {}",
        if check.any_pose { "parts in any orientation: rotation schedule" } else { "parts in a fixed pose: fast schedule" }
    );
    let mut resolved = opts.clone();
    resolved.any_pose_plan = None;
    if check.any_pose {
        resolved.config.train_by(&plan);
        resolved.test_views = plan.test_views;
        resolved.config.validate()?;
    }
    Ok((resolved, Some(check)))
}

/// The local feature density of the training images: the first scale's stage maps of `views` of
/// every tile. Returns it with the number of vectors fitted.
fn fit_local_density(
    ex: &Extractor,
    images: &[PathBuf],
    views: &[View],
    image_contrast: bool,
    coarse_radius: Option<usize>,
    progress: &dyn Progress,
) -> Result<(LocalDensity, u64)> {
    tracing::info!(images = images.len(), views = views.len(), image_contrast, ?coarse_radius, "fitting the local feature density");
    progress.set_message("local density");
    progress.set_length(images.len() as u64);
    let mut fit = LocalDensityFit::new(ex.local_dim(), image_contrast, coarse_radius);
    for p in images {
        let img = Detector::read_image(p)?;
        let mut grids = vec![];
        for tile in square_tiles(&img, ex.tiles_for(img.width, img.height)) {
            grids.extend(ex.local_vectors(&resize_bilinear(&tile, crate::backbone::INPUT_SIZE, crate::backbone::INPUT_SIZE), views)?);
        }
        fit.add_image(&grids);
        progress.step(1)?;
    }
    Ok((fit.finish()?, fit.count()))
}

/// Scores (and maps) the held-out good images and stores in the model what they set: the
/// standardization of the combined image score (when asked for), the threshold for the target
/// false-positive rate (unless the user gave one), the score range of `pred_score`, and the
/// range of good maps of the default kind.
fn calibrate_on_held_out(d: &mut Detector, held_out: &[PathBuf], opts: &TrainOptions, progress: &dyn Progress) -> Result<()> {
    let views = d.views(None);
    let features = d.model.local.is_some();
    progress.set_message("held-out images");
    progress.set_length(held_out.len() as u64);
    let (mut parts, mut maps) = (vec![], vec![]);
    for p in held_out {
        let r = d.inspect_parts(&Detector::read_image(p)?, &views, features, false)?;
        parts.push((r.flow, r.features.as_deref().map(map_max)));
        maps.extend(r.features);
        progress.step(1)?;
    }
    progress.finish();
    if opts.combined_score && features {
        let pairs: Vec<(f64, f64)> = parts.iter().filter_map(|&(f, m)| Some((f, m?))).collect();
        match ScoreStandardization::of(&pairs) {
            Some(st) => d.model.manifest.image_score = ImageScore::FlowAndMapMax(st),
            None => tracing::warn!(images = pairs.len(), "the held-out scores do not spread: images are scored by the flow alone"),
        }
    }
    let scores: Vec<f64> = match d.model.manifest.image_score {
        ImageScore::FlowAndMapMax(st) => parts.iter().map(|&(f, m)| st.combine(f, m.unwrap_or(f64::NAN))).collect(),
        ImageScore::Flow => parts.iter().map(|p| p.0).collect(),
    };
    let m = &mut d.model.manifest;
    if m.threshold.is_none() {
        m.threshold = holdout_threshold(&scores, opts.target_fpr);
    }
    m.score_range = ScoreRange::of(&scores);
    if features {
        m.localization = GoodMapRange::from_maps(MapKind::Features, &maps, views.len());
    }
    if let (Some(t), Some(r)) = (&m.threshold, &m.score_range) {
        tracing::info!(threshold = t.value, method = %t.method, min = r.min, max = r.max, image_score = ?m.image_score, "held-out good images scored");
    }
    Ok(())
}
