//! Anomaly scores τ(x) (paper eq. 5): the flow maps each view's features to z, and the per-view
//! scores are averaged over the test views; the decision compares τ with a threshold (eq. 6).

use crate::error::{Error, Result};
use crate::features::{Extractor, FeatureCache};
use crate::flow::NormalizingFlow;
use crate::progress::Progress;
use crate::views::View;
use candle_core::{Device, Tensor};

/// How a view is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreKind {
    /// Mean of z² over dimensions (official code; ranks like −log p_Z(z) of eq. 5).
    MeanZ2,
    /// Negative log-likelihood of the features per dimension, −log p_Y(y)/D
    /// = (½‖z‖² − log|det J|)/D + ½·log 2π, i.e. the training loss L(y) of eq. 4.
    Nll,
}

/// Per-view scores of a [views, dim] feature matrix.
pub fn view_scores(flow: &NormalizingFlow, features: &[f32], dim: usize, kind: ScoreKind, device: &Device) -> Result<Vec<f64>> {
    let n = features.len() / dim;
    let mut out = Vec::with_capacity(n);
    for chunk in features.chunks(dim * 256) {
        let y = Tensor::from_slice(chunk, (chunk.len() / dim, dim), device)?;
        let (z, logdet) = flow.forward_frozen(&y)?;
        let z2: Vec<f32> = z.sqr()?.sum(1)?.to_vec1()?;
        match kind {
            ScoreKind::MeanZ2 => out.extend(z2.iter().map(|&s| s as f64 / dim as f64)),
            ScoreKind::Nll => {
                let ld: Vec<f32> = logdet.to_vec1()?;
                let c = 0.5 * (2.0 * std::f64::consts::PI).ln();
                out.extend(z2.iter().zip(&ld).map(|(&s, &l)| (0.5 * s as f64 - l as f64) / dim as f64 + c));
            }
        }
    }
    Ok(out)
}

/// τ(x) of one image from its [tiles × views, dim] features: the mean of each tile's per-view
/// scores (eq. 5; one tile: the whole image), the largest over the tiles.
pub fn anomaly_score(flow: &NormalizingFlow, features: &[f32], dim: usize, kind: ScoreKind, views: usize, device: &Device) -> Result<f64> {
    let s = view_scores(flow, features, dim, kind, device)?;
    Ok(largest_tile_score(&s, views))
}

/// The largest over tiles of the mean over each tile's `views` consecutive view scores.
pub fn largest_tile_score(view_scores: &[f64], views: usize) -> f64 {
    mean_per_image(view_scores, views).into_iter().fold(f64::NEG_INFINITY, f64::max)
}

/// Per-view scores of consecutive images, `views` each, averaged per image (eq. 5).
pub fn mean_per_image(view_scores: &[f64], views: usize) -> Vec<f64> {
    view_scores.chunks(views.max(1)).map(|v| v.iter().sum::<f64>() / v.len() as f64).collect()
}

/// Scores of image files (features from the cache when present), one per path. The flow runs
/// on the views of several images at once: large matrix products are much faster than many small ones.
pub fn score_images(
    flow: &NormalizingFlow,
    kind: ScoreKind,
    ex: &Extractor,
    cache: &FeatureCache,
    paths: &[std::path::PathBuf],
    views: &[View],
    bar: &dyn Progress,
) -> Result<Vec<f64>> {
    if views.is_empty() {
        return Err(Error::Config("at least one test view is needed".into()));
    }
    let dim = flow.config.dim;
    bar.set_length(paths.len() as u64);
    let per_batch = (256 / views.len()).max(1);
    let mut out = Vec::with_capacity(paths.len());
    for chunk in paths.chunks(per_batch) {
        use rayon::prelude::*;
        let per_image: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|p| {
                let f = cache.features(ex, p, views)?;
                bar.step(1)?;
                Ok(f)
            })
            .collect::<Result<_>>()?;
        let feats = per_image.concat();
        let s = view_scores(flow, &feats, dim, kind, &ex.device)?;
        let mut at = 0;
        for f in &per_image {
            let rows = f.len() / dim;
            out.push(largest_tile_score(&s[at..at + rows], views.len()));
            at += rows;
        }
    }
    Ok(out)
}
