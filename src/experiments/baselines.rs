//! The paper's baselines (tables 1-2) on the same features the flow sees: distance to the nearest
//! training view (1-NN) and a one-class SVM, both after PCA to 64 dimensions and z-scoring (linfa).

use crate::error::{Error, Result};
use linfa::traits::{Fit, Predict};
use ndarray::{Array1, Array2, Axis};
use rayon::prelude::*;

/// Which baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// Euclidean distance to the nearest training view.
    NearestNeighbour,
    /// Negative decision value of a one-class SVM (RBF kernel, γ = 1/components, ν = 0.5:
    /// scikit-learn's defaults on z-scored data).
    OneClassSvm,
}

/// PCA to `components` dimensions fitted on training views, then z-scoring of each component.
pub struct Projection {
    pca: linfa_reduction::Pca<f64>,
    mean: Array1<f64>,
    std: Array1<f64>,
}

fn matrix(rows: &[f32], dim: usize) -> Array2<f64> {
    Array2::from_shape_vec((rows.len() / dim, dim), rows.iter().map(|v| *v as f64).collect()).expect("whole rows")
}

impl Projection {
    /// Fits on training views (row-major [n, dim]); fewer than `components` training views
    /// (or dimensions) give that many components instead.
    pub fn fit(train: &[f32], dim: usize, components: usize) -> Result<Self> {
        let x = matrix(train, dim);
        if x.nrows() < 2 {
            return Err(Error::Training("a baseline needs at least 2 training views".into()));
        }
        let ds = linfa::DatasetBase::from(x.clone());
        let k = components.min(dim).min(x.nrows() - 1);
        if k < components {
            tracing::warn!(components = k, "PCA: fewer training views or dimensions than {components} components");
        }
        let pca = linfa_reduction::Pca::params(k).fit(&ds).map_err(|e| Error::Training(format!("PCA: {e}")))?;
        let y = pca.predict(&x);
        let mean = y.mean_axis(Axis(0)).expect("rows");
        let std = y.std_axis(Axis(0), 1.0).mapv(|s| s.max(1e-12));
        Ok(Projection { pca, mean, std })
    }

    /// Projected, z-scored rows.
    pub fn apply(&self, rows: &[f32], dim: usize) -> Array2<f64> {
        (self.pca.predict(&matrix(rows, dim)) - &self.mean) / &self.std
    }
}

/// Distance of each test row to its nearest training row.
pub fn nearest_neighbour_distances(train: &Array2<f64>, test: &Array2<f64>) -> Vec<f64> {
    let train_rows: Vec<Vec<f64>> = train.outer_iter().map(|r| r.to_vec()).collect();
    test.outer_iter()
        .collect::<Vec<_>>()
        .par_iter()
        .map(|t| {
            train_rows
                .iter()
                .map(|r| r.iter().zip(t.iter()).map(|(a, b)| (a - b) * (a - b)).sum::<f64>())
                .fold(f64::INFINITY, f64::min)
                .sqrt()
        })
        .collect()
}

/// Per-view anomaly scores of `test` views under a baseline fitted on `train` views (both [n, dim]).
pub fn view_scores(kind: Baseline, train: &[f32], test: &[f32], dim: usize) -> Result<Vec<f64>> {
    const COMPONENTS: usize = 64;
    let proj = Projection::fit(train, dim, COMPONENTS)?;
    let (tr, te) = (proj.apply(train, dim), proj.apply(test, dim));
    match kind {
        Baseline::NearestNeighbour => Ok(nearest_neighbour_distances(&tr, &te)),
        Baseline::OneClassSvm => {
            let gamma = 1.0 / tr.ncols() as f64; // scikit-learn's `scale` on z-scored data
            let n = tr.nrows();
            let ds = linfa::DatasetBase::new(tr, Array2::from_elem((n, 1), ()));
            let svm = linfa_svm::Svm::<f64, linfa::dataset::Pr>::params()
                .nu_weight(0.5)
                .gaussian_kernel(1.0 / gamma)
                .fit(&ds)
                .map_err(|e| Error::Training(format!("one-class SVM: {e}")))?;
            Ok(te.outer_iter().map(|row| svm.rho - svm.weighted_sum(&row)).collect())
        }
    }
}

/// Image scores: per-view scores of `test` ([images × views, dim]) averaged per image.
pub fn image_scores(kind: Baseline, train: &[f32], test: &[f32], dim: usize, views: usize) -> Result<Vec<f64>> {
    let s = view_scores(kind, train, test, dim)?;
    Ok(crate::score::mean_per_image(&s, views))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Training views near the origin, test views near it or far away: both baselines rank the
    /// far ones higher; 1-NN distances equal a brute-force computation.
    #[test]
    fn baselines_rank_outliers_above_inliers() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let dim = 80;
        let train: Vec<f32> = (0..300 * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut test: Vec<f32> = (0..20 * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        for v in &mut test[10 * dim..] {
            *v *= 6.0;
        }
        for kind in [Baseline::NearestNeighbour, Baseline::OneClassSvm] {
            let s = view_scores(kind, &train, &test, dim).unwrap();
            let labels: Vec<bool> = (0..20).map(|i| i >= 10).collect();
            assert_eq!(crate::eval::metrics::auroc(&s, &labels), Some(1.0), "{kind:?}: {s:?}");
        }
        let a = Array2::from_shape_vec((3, 2), vec![0.0, 0.0, 3.0, 4.0, 1.0, 1.0]).unwrap();
        let b = Array2::from_shape_vec((2, 2), vec![3.0, 0.0, 0.0, -2.0]).unwrap();
        assert_eq!(nearest_neighbour_distances(&a, &b), vec![5f64.sqrt(), 2.0]);
    }
}
