//! Localization from the features the flow sees, before pooling: one Gaussian of the backbone's
//! local feature vectors, shared by every position, fitted on good images; a pixel's anomaly is
//! the Mahalanobis distance of its vector. Forward-only: a map costs the backbone pass it reuses.
//!
//! Shared rather than per position (PaDiM): a part may arrive in any orientation or offset, and
//! tiles of a long image see different places of it, so "what a good vector looks like" must not
//! depend on where it is.
//!
//! With image contrast ([`modelled_vectors`]) each vector is followed by its difference from its
//! image's median vector (over all its tiles and views): a region whose surface is good on some
//! part but not like the rest of this one (a band of another finish) stands out, where the
//! vector alone looks good.
//!
//! With a coarse scale ([`LocalDensity::coarse`]) a second Gaussian models the vectors averaged
//! over a window of grid cells ([`box_average`]); a position's distance is the larger of the
//! two: the fine scale keeps small defects sharp, the coarse one sees a region's texture. The
//! coarse distances are eroded ([`min_filter`], same radius): every window within reach of a
//! thin defect covers it, so without the erosion its whole neighbourhood would light up.

use crate::error::{Error, Result};

/// Ridge added to the covariance, relative to its mean variance (trace / dim): keeps it
/// invertible when there are fewer independent vectors than dimensions.
pub const SHRINKAGE: f64 = 0.01;

/// The fitted density: mean μ and precision Σ⁻¹ of the local vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalGaussian {
    /// Length of the vectors it models: a view's channels, twice that with `image_contrast`.
    pub dim: usize,
    pub mean: Vec<f32>,
    /// Σ⁻¹, dim × dim row-major (symmetric).
    pub precision: Vec<f32>,
    /// The vectors are followed by their difference from their image's median vector
    /// ([`modelled_vectors`]).
    pub image_contrast: bool,
}

/// One view's local vectors on the backbone's grid: `width` × `height` positions × channels,
/// row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalGrid {
    pub width: usize,
    pub height: usize,
    pub vectors: Vec<f32>,
}

/// The median vector of one image's grids (all its tiles and views): per channel, the value of
/// rank ⌊n / 2⌋ among the n positions.
pub fn image_median(grids: &[LocalGrid], channels: usize) -> Vec<f32> {
    let n: usize = grids.iter().map(|g| g.vectors.len() / channels.max(1)).sum();
    if n == 0 {
        return vec![0.0; channels];
    }
    let mut column = vec![0f32; n];
    (0..channels)
        .map(|c| {
            let values = grids.iter().flat_map(|g| g.vectors.iter().skip(c).step_by(channels));
            column.iter_mut().zip(values).for_each(|(dst, v)| *dst = *v);
            *column.select_nth_unstable_by(n / 2, f32::total_cmp).1
        })
        .collect()
}

/// The local feature density of a model: a Gaussian of the local vectors and, optionally, one
/// of the vectors box-averaged at a coarse scale. Distances are the larger of the two.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalDensity {
    /// The Gaussian of the local vectors themselves.
    pub fine: LocalGaussian,
    pub coarse: Option<CoarseGaussian>,
}

/// The Gaussian of the local vectors averaged over a (2r + 1)² window of grid cells.
#[derive(Clone, Debug, PartialEq)]
pub struct CoarseGaussian {
    /// r, in cells of the backbone's grid.
    pub radius: usize,
    /// Each distance is replaced by the smallest within r cells ([`min_filter`]); false only in
    /// models written before the erosion existed.
    pub eroded: bool,
    pub gaussian: LocalGaussian,
}

impl CoarseGaussian {
    /// The coarse scale's distance grids of one image's local grids: the distances of the
    /// box-averaged vectors, eroded when [`CoarseGaussian::eroded`].
    pub fn image_distances(&self, grids: &[LocalGrid]) -> Vec<DistanceGrid> {
        let boxed: Vec<LocalGrid> = grids.iter().map(|g| box_average(g, self.radius)).collect();
        let distances = self.gaussian.image_distances(&boxed);
        if self.eroded {
            distances.iter().map(|d| min_filter(d, self.radius)).collect()
        } else {
            distances
        }
    }
}

impl LocalDensity {
    /// The distance grids of one image's local grids (all its tiles and views): per position,
    /// the larger of the fine and the coarse scale's distance.
    pub fn image_distances(&self, grids: &[LocalGrid]) -> Vec<DistanceGrid> {
        let mut fine = self.fine.image_distances(grids);
        if let Some(c) = &self.coarse {
            for (f, coarse) in fine.iter_mut().zip(c.image_distances(grids)) {
                f.values.iter_mut().zip(coarse.values).for_each(|(a, b)| *a = a.max(b));
            }
        }
        fine
    }

    /// Named tensors for the model file: the fine scale's under `local_density.`, the coarse
    /// one's under `local_density.coarse.`.
    pub fn tensors(&self) -> Result<Vec<(String, candle_core::Tensor)>> {
        let mut out = self.fine.tensors(TENSOR_PREFIX)?;
        if let Some(c) = &self.coarse {
            out.extend(c.gaussian.tensors(COARSE_TENSOR_PREFIX)?);
        }
        Ok(out)
    }

    /// From the tensors of a model file as its manifest entry describes them (`path` names
    /// the file in errors).
    pub fn from_tensors(
        tensors: &std::collections::HashMap<String, candle_core::Tensor>,
        info: &LocalDensityInfo,
        path: &std::path::Path,
    ) -> Result<Self> {
        let read = |prefix| LocalGaussian::from_tensors(tensors, prefix, info.dim, info.image_contrast, path);
        let coarse = match info.coarse_radius {
            Some(radius) => Some(CoarseGaussian { radius, eroded: info.coarse_eroded, gaussian: read(COARSE_TENSOR_PREFIX)? }),
            None => None,
        };
        Ok(LocalDensity { fine: read(TENSOR_PREFIX)?, coarse })
    }

    /// sha256 over the fine scale's mean and precision, then the coarse scale's (f32
    /// little-endian): for a fine scale alone the same as [`LocalGaussian::sha256`].
    pub fn sha256(&self) -> String {
        let scales = std::iter::once(&self.fine).chain(self.coarse.as_ref().map(|c| &c.gaussian));
        let bytes: Vec<u8> = scales.flat_map(|g| g.mean.iter().chain(&g.precision)).flat_map(|v| v.to_le_bytes()).collect();
        crate::backbone::weights::sha256_hex(&bytes)
    }
}

/// Running fit of a [`LocalDensity`], image by image.
#[derive(Clone, Debug)]
pub struct LocalDensityFit {
    channels: usize,
    image_contrast: bool,
    fine: GaussianFit,
    coarse: Option<(usize, GaussianFit)>,
}

impl LocalDensityFit {
    /// A fit of local vectors of `channels`, with image contrast or not, and a coarse scale of
    /// `coarse_radius` cells when given.
    pub fn new(channels: usize, image_contrast: bool, coarse_radius: Option<usize>) -> Self {
        let dim = modelled_dim(channels, image_contrast);
        LocalDensityFit { channels, image_contrast, fine: GaussianFit::new(dim), coarse: coarse_radius.map(|r| (r, GaussianFit::new(dim))) }
    }

    /// Adds one image's local grids (all its tiles and views).
    pub fn add_image(&mut self, grids: &[LocalGrid]) {
        self.fine.add(&modelled_vectors(grids, self.channels, self.image_contrast));
        if let Some((radius, fit)) = &mut self.coarse {
            let boxed: Vec<LocalGrid> = grids.iter().map(|g| box_average(g, *radius)).collect();
            fit.add(&modelled_vectors(&boxed, self.channels, self.image_contrast));
        }
    }

    /// Local vectors added so far (per scale).
    pub fn count(&self) -> u64 {
        self.fine.count()
    }

    pub fn finish(&self) -> Result<LocalDensity> {
        let image_contrast = self.image_contrast;
        let coarse = match &self.coarse {
            Some((radius, fit)) => {
                Some(CoarseGaussian { radius: *radius, eroded: true, gaussian: LocalGaussian { image_contrast, ..fit.finish()? } })
            }
            None => None,
        };
        Ok(LocalDensity { fine: LocalGaussian { image_contrast, ..self.fine.finish()? }, coarse })
    }
}

/// The grid with each vector replaced by the mean of the vectors within `radius` cells of it
/// (a (2r + 1)² window clipped at the grid's border).
pub fn box_average(grid: &LocalGrid, radius: usize) -> LocalGrid {
    let (w, h) = (grid.width, grid.height);
    let c = grid.vectors.len() / (w * h).max(1);
    // summed-area table over positions, per channel: (h + 1) × (w + 1) × c, f64
    let mut sat = vec![0f64; (h + 1) * (w + 1) * c];
    for y in 0..h {
        for x in 0..w {
            for k in 0..c {
                let v = grid.vectors[(y * w + x) * c + k] as f64;
                sat[((y + 1) * (w + 1) + x + 1) * c + k] =
                    v + sat[(y * (w + 1) + x + 1) * c + k] + sat[((y + 1) * (w + 1) + x) * c + k] - sat[(y * (w + 1) + x) * c + k];
            }
        }
    }
    let mut vectors = vec![0f32; grid.vectors.len()];
    for y in 0..h {
        let (y0, y1) = (y.saturating_sub(radius), (y + radius + 1).min(h));
        for x in 0..w {
            let (x0, x1) = (x.saturating_sub(radius), (x + radius + 1).min(w));
            let area = ((y1 - y0) * (x1 - x0)) as f64;
            for k in 0..c {
                let s = sat[(y1 * (w + 1) + x1) * c + k] - sat[(y0 * (w + 1) + x1) * c + k] - sat[(y1 * (w + 1) + x0) * c + k]
                    + sat[(y0 * (w + 1) + x0) * c + k];
                vectors[(y * w + x) * c + k] = (s / area) as f32;
            }
        }
    }
    LocalGrid { width: w, height: h, vectors }
}

/// The grid with each value replaced by the smallest within `radius` cells of it (a (2r + 1)²
/// window clipped at the grid's border): a grey-scale erosion, rows then columns.
pub fn min_filter(grid: &DistanceGrid, radius: usize) -> DistanceGrid {
    let (w, h) = (grid.width, grid.height);
    let mut rows = vec![0f32; grid.values.len()];
    for y in 0..h {
        let row = &grid.values[y * w..(y + 1) * w];
        for x in 0..w {
            rows[y * w + x] = row[x.saturating_sub(radius)..(x + radius + 1).min(w)].iter().copied().fold(f32::INFINITY, f32::min);
        }
    }
    let mut values = vec![0f32; grid.values.len()];
    for y in 0..h {
        for x in 0..w {
            values[y * w + x] =
                (y.saturating_sub(radius)..(y + radius + 1).min(h)).map(|yy| rows[yy * w + x]).fold(f32::INFINITY, f32::min);
        }
    }
    DistanceGrid { width: w, height: h, values }
}

/// Each of `vectors` (rows × channels) followed by its difference from `median`: rows × 2·channels.
fn with_difference(vectors: &[f32], median: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * vectors.len());
    for v in vectors.chunks_exact(median.len()) {
        out.extend_from_slice(v);
        out.extend(v.iter().zip(median).map(|(a, m)| a - m));
    }
    out
}

/// Length of the vectors a density models for local vectors of `channels`.
pub fn modelled_dim(channels: usize, image_contrast: bool) -> usize {
    if image_contrast {
        2 * channels
    } else {
        channels
    }
}

/// The vectors a density models for one image's grids (all its tiles and views), grid after
/// grid: the local vectors themselves, or with `image_contrast` each followed by its difference
/// from the image's median vector ([`image_median`]).
pub fn modelled_vectors(grids: &[LocalGrid], channels: usize, image_contrast: bool) -> Vec<f32> {
    if image_contrast {
        let median = image_median(grids, channels);
        grids.iter().flat_map(|g| with_difference(&g.vectors, &median)).collect()
    } else {
        grids.iter().flat_map(|g| g.vectors.iter().copied()).collect()
    }
}

/// Running sums of local vectors for [`LocalGaussian`]: the vectors are shifted by the first
/// batch's mean before their outer products are summed (in f64), so large means do not cancel
/// the covariance away.
#[derive(Clone, Debug)]
pub struct GaussianFit {
    dim: usize,
    count: u64,
    shift: Option<Vec<f32>>,
    sum: Vec<f64>,
    outer: Vec<f64>,
}

impl GaussianFit {
    pub fn new(dim: usize) -> Self {
        GaussianFit { dim, count: 0, shift: None, sum: vec![0.0; dim], outer: vec![0.0; dim * dim] }
    }

    /// Vectors added so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds `vectors`, rows × dim row-major.
    pub fn add(&mut self, vectors: &[f32]) {
        let d = self.dim;
        let rows = vectors.len() / d;
        if rows == 0 {
            return;
        }
        let shift = self.shift.get_or_insert_with(|| {
            let mut m = vec![0f32; d];
            vectors.chunks_exact(d).for_each(|v| m.iter_mut().zip(v).for_each(|(a, b)| *a += b));
            m.iter_mut().for_each(|a| *a /= rows as f32);
            m
        });
        let centred: Vec<f32> = vectors.chunks_exact(d).flat_map(|v| v.iter().zip(shift.iter()).map(|(a, b)| a - b)).collect();
        for v in centred.chunks_exact(d) {
            self.sum.iter_mut().zip(v).for_each(|(s, x)| *s += *x as f64);
        }
        // XᵀX of this batch in f32 (rows are few), summed in f64
        let mut xtx = vec![0f32; d * d];
        crate::kernels::sgemm::sgemm(d, d, rows, &mut xtx, false, (&centred, 1, d), (&centred, d, 1));
        self.outer.iter_mut().zip(&xtx).for_each(|(o, x)| *o += *x as f64);
        self.count += rows as u64;
    }

    /// The Gaussian of the vectors added: Σ = E[(x−c)(x−c)ᵀ] − (μ−c)(μ−c)ᵀ + ridge.
    pub fn finish(&self) -> Result<LocalGaussian> {
        let d = self.dim;
        if self.count < 2 {
            return Err(Error::Config(format!("fitting the local feature density needs at least 2 vectors, got {}", self.count)));
        }
        let n = self.count as f64;
        let shift = self.shift.as_ref().expect("set with the first vectors");
        let m: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let mut cov: Vec<f64> = (0..d * d).map(|i| self.outer[i] / n - m[i / d] * m[i % d]).collect();
        let ridge = SHRINKAGE * (0..d).map(|i| cov[i * d + i]).sum::<f64>() / d as f64;
        (0..d).for_each(|i| cov[i * d + i] += ridge.max(1e-12));
        let precision = invert_spd(&cov, d)
            .ok_or_else(|| Error::Config("the local feature covariance is not positive definite (constant images?)".into()))?;
        Ok(LocalGaussian {
            dim: d,
            mean: m.iter().zip(shift).map(|(a, c)| (a + *c as f64) as f32).collect(),
            precision: precision.iter().map(|v| *v as f32).collect(),
            image_contrast: false,
        })
    }
}

/// Inverse of a symmetric positive definite n × n matrix (Cholesky, f64); `None` if it is not.
pub fn invert_spd(a: &[f64], n: usize) -> Option<Vec<f64>> {
    // a = L·Lᵀ
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = a[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    // L⁻¹ (lower triangular), then a⁻¹ = L⁻ᵀ·L⁻¹
    let mut li = vec![0f64; n * n];
    for j in 0..n {
        li[j * n + j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let s: f64 = (j..i).map(|k| l[i * n + k] * li[k * n + j]).sum();
            li[i * n + j] = -s / l[i * n + i];
        }
    }
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (i..n).map(|k| li[k * n + i] * li[k * n + j]).sum();
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }
    Some(inv)
}

impl LocalGaussian {
    /// The distance grids of one image's local grids (all its tiles and views, as the backbone
    /// gives them), each vector made into the vector this density models first.
    pub fn image_distances(&self, grids: &[LocalGrid]) -> Vec<DistanceGrid> {
        let channels = if self.image_contrast { self.dim / 2 } else { self.dim };
        let median = self.image_contrast.then(|| image_median(grids, channels));
        grids
            .iter()
            .map(|g| {
                let values = match &median {
                    Some(m) => self.distances(&with_difference(&g.vectors, m)),
                    None => self.distances(&g.vectors),
                };
                DistanceGrid { width: g.width, height: g.height, values }
            })
            .collect()
    }

    /// Mahalanobis distance √((x−μ)ᵀ Σ⁻¹ (x−μ)) of each row of `vectors` (rows × dim).
    pub fn distances(&self, vectors: &[f32]) -> Vec<f32> {
        let d = self.dim;
        let rows = vectors.len() / d;
        let centred: Vec<f32> = vectors.chunks_exact(d).flat_map(|v| v.iter().zip(&self.mean).map(|(a, b)| a - b)).collect();
        let mut y = vec![0f32; rows * d];
        crate::kernels::sgemm::sgemm(rows, d, d, &mut y, false, (&centred, d, 1), (&self.precision, d, 1));
        centred
            .chunks_exact(d)
            .zip(y.chunks_exact(d))
            .map(|(c, y)| c.iter().zip(y).map(|(a, b)| a * b).sum::<f32>().max(0.0).sqrt())
            .collect()
    }

    /// Named tensors for the model file: `{prefix}.mean` and `{prefix}.precision`.
    pub fn tensors(&self, prefix: &str) -> Result<Vec<(String, candle_core::Tensor)>> {
        let dev = candle_core::Device::Cpu;
        Ok(vec![
            (format!("{prefix}.mean"), candle_core::Tensor::from_slice(&self.mean, self.dim, &dev)?),
            (format!("{prefix}.precision"), candle_core::Tensor::from_slice(&self.precision, (self.dim, self.dim), &dev)?),
        ])
    }

    /// From the tensors `{prefix}.mean` and `{prefix}.precision` of a model file (`path` names
    /// it in errors).
    pub fn from_tensors(
        tensors: &std::collections::HashMap<String, candle_core::Tensor>,
        prefix: &str,
        dim: usize,
        image_contrast: bool,
        path: &std::path::Path,
    ) -> Result<Self> {
        let get = |part: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let name = format!("{prefix}.{part}");
            let t = tensors.get(&name).ok_or_else(|| Error::format(path, format!("missing local density tensor `{name}`")))?;
            if t.dims() != shape {
                return Err(Error::format(path, format!("`{name}` has shape {:?}, expected {shape:?}", t.dims())));
            }
            Ok(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
        };
        Ok(LocalGaussian { dim, mean: get("mean", &[dim])?, precision: get("precision", &[dim, dim])?, image_contrast })
    }

    /// sha256 over the mean and precision (f32 little-endian), recorded in the manifest.
    pub fn sha256(&self) -> String {
        let bytes: Vec<u8> = self.mean.iter().chain(&self.precision).flat_map(|v| v.to_le_bytes()).collect();
        crate::backbone::weights::sha256_hex(&bytes)
    }
}

/// Distances of one view's local vectors, on the backbone's grid (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct DistanceGrid {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

/// Prefix of the fine scale's tensors in a model file (`.mean`, `.precision`).
pub const TENSOR_PREFIX: &str = "local_density";
/// Prefix of the coarse scale's tensors.
pub const COARSE_TENSOR_PREFIX: &str = "local_density.coarse";

/// What the manifest records of a model's local density.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LocalDensityInfo {
    /// Length of a modelled vector: the pooled stages' channels together, twice that with
    /// `image_contrast`.
    pub dim: usize,
    /// The vectors carry their difference from their image's median ([`modelled_vectors`]);
    /// absent (false) in models written before it existed.
    #[serde(default)]
    pub image_contrast: bool,
    /// Radius in grid cells of the coarse scale's box average, when it has one (absent in
    /// models written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coarse_radius: Option<usize>,
    /// The coarse distances are eroded ([`CoarseGaussian::eroded`]); absent (false) in models
    /// written before the erosion existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub coarse_eroded: bool,
    /// Local vectors (positions × views × images) it was fitted on.
    pub vectors: u64,
    pub images: usize,
    pub shrinkage: f64,
    /// sha256 of the mean and precision tensors ([`LocalDensity::sha256`]).
    pub sha256: String,
}

impl LocalDensityInfo {
    /// The manifest entry of `density`, fitted on `vectors` local vectors of `images` images.
    pub fn of(density: &LocalDensity, vectors: u64, images: usize) -> Self {
        LocalDensityInfo {
            dim: density.fine.dim,
            image_contrast: density.fine.image_contrast,
            coarse_radius: density.coarse.as_ref().map(|c| c.radius),
            coarse_eroded: density.coarse.as_ref().is_some_and(|c| c.eroded),
            vectors,
            images,
            shrinkage: SHRINKAGE,
            sha256: density.sha256(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn inverse_is_exact_on_a_known_matrix() {
        // a = [[4, 2], [2, 3]], a⁻¹ = [[3, -2], [-2, 4]] / 8
        let inv = invert_spd(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let want = [0.375, -0.25, -0.25, 0.5];
        inv.iter().zip(want).for_each(|(a, b)| assert!((a - b).abs() < 1e-12, "{inv:?}"));
        assert!(invert_spd(&[1.0, 2.0, 2.0, 1.0], 2).is_none(), "indefinite matrix accepted");
        // a random SPD 7×7: a·a⁻¹ = I
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 7;
        let b: Vec<f64> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let a: Vec<f64> = (0..n * n)
            .map(|i| (0..n).map(|k| b[(i / n) * n + k] * b[(i % n) * n + k]).sum::<f64>() + if i / n == i % n { 0.5 } else { 0.0 })
            .collect();
        let inv = invert_spd(&a, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let p: f64 = (0..n).map(|k| a[i * n + k] * inv[k * n + j]).sum();
                assert!((p - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn fitted_gaussian_matches_the_closed_form() {
        // independent coordinates with means (100, -3, 7) and stds (2, 0.5, 1): the distance of a
        // point is √Σ((x−μ)/σ)² up to sampling error and the 1% ridge
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (mu, sd) = ([100.0f32, -3.0, 7.0], [2.0f32, 0.5, 1.0]);
        let mut fit = GaussianFit::new(3);
        for _ in 0..40 {
            let batch: Vec<f32> = (0..500 * 3)
                .map(|i| {
                    let g: f32 = (0..12).map(|_| rng.random::<f32>()).sum::<f32>() - 6.0;
                    mu[i % 3] + sd[i % 3] * g
                })
                .collect();
            fit.add(&batch);
        }
        assert_eq!(fit.count(), 20_000);
        let g = fit.finish().unwrap();
        for c in 0..3 {
            assert!((g.mean[c] - mu[c]).abs() < 0.05 * sd[c], "mean {:?}", g.mean);
        }
        let x = [104.0f32, -2.0, 4.0];
        let want = ((2.0f32).powi(2) + 2.0f32.powi(2) + 3.0f32.powi(2)).sqrt();
        let got = g.distances(&x)[0];
        assert!((got - want).abs() / want < 0.03, "distance {got}, closed form {want}");
        assert!(g.distances(&mu)[0] < 0.1);
    }

    #[test]
    fn tensors_round_trip() {
        let fine = LocalGaussian { dim: 2, mean: vec![1.0, 2.0], precision: vec![1.0, 0.5, 0.5, 2.0], image_contrast: true };
        let coarse = LocalGaussian { mean: vec![-1.0, 0.5], precision: vec![3.0, 0.0, 0.0, 0.25], ..fine.clone() };
        let d = LocalDensity { fine: fine.clone(), coarse: Some(CoarseGaussian { radius: 2, eroded: true, gaussian: coarse }) };
        let map: std::collections::HashMap<_, _> = d.tensors().unwrap().into_iter().collect();
        let mut info = LocalDensityInfo::of(&d, 0, 0);
        assert_eq!((info.dim, info.image_contrast, info.coarse_radius, info.coarse_eroded), (2, true, Some(2), true));
        assert_eq!(info.sha256, d.sha256());
        let path = std::path::Path::new("m");
        assert_eq!(LocalDensity::from_tensors(&map, &info, path).unwrap(), d);
        // a manifest written before the erosion existed has no `coarse_eroded`: read as false
        let mut json = serde_json::to_value(&info).unwrap();
        json.as_object_mut().unwrap().remove("coarse_eroded");
        let older: LocalDensityInfo = serde_json::from_value(json).unwrap();
        assert!(!LocalDensity::from_tensors(&map, &older, path).unwrap().coarse.unwrap().eroded);
        // the fine scale alone keeps the checksum of a model without a coarse scale
        info.coarse_radius = None;
        let alone = LocalDensity::from_tensors(&map, &info, path).unwrap();
        assert_eq!(alone, LocalDensity { fine: fine.clone(), coarse: None });
        assert_eq!(alone.sha256(), fine.sha256());
        assert_ne!(d.sha256(), fine.sha256());
        info.dim = 3;
        assert!(LocalDensity::from_tensors(&map, &info, path).is_err());
    }

    #[test]
    fn box_average_is_the_mean_over_the_clipped_window() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (w, h, c, r) = (5, 4, 3, 1);
        let grid = LocalGrid { width: w, height: h, vectors: (0..w * h * c).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let boxed = box_average(&grid, r);
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    let (mut sum, mut n) = (0f64, 0);
                    for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                        for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                            sum += grid.vectors[(yy * w + xx) * c + k] as f64;
                            n += 1;
                        }
                    }
                    let got = boxed.vectors[(y * w + x) * c + k] as f64;
                    assert!((got - sum / n as f64).abs() < 1e-6, "({x}, {y}, {k}): {got} vs {}", sum / n as f64);
                }
            }
        }
        // a window wider than the grid averages only the cells there are
        assert_eq!(box_average(&LocalGrid { width: 1, height: 1, vectors: vec![7.0] }, 4).vectors, vec![7.0]);
    }

    #[test]
    fn min_filter_is_the_smallest_value_in_the_clipped_window() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (w, h) = (7, 5);
        let grid = DistanceGrid { width: w, height: h, values: (0..w * h).map(|_| rng.random_range(0.0..5.0)).collect() };
        for r in [0, 1, 2, 9] {
            let eroded = min_filter(&grid, r);
            for y in 0..h {
                for x in 0..w {
                    let mut smallest = f32::INFINITY;
                    for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                        for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                            smallest = smallest.min(grid.values[yy * w + xx]);
                        }
                    }
                    assert_eq!(eroded.values[y * w + x], smallest, "r {r} at ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn the_eroded_coarse_scale_does_not_light_up_a_thin_defects_neighbourhood() {
        // good grids: ±1 per channel at random; the defect: one column of [4, 4], far from any
        // good vector. Every window within r columns of it covers it.
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (side, c, r, line) = (20, 2, 2, 10);
        let good = |rng: &mut rand::rngs::StdRng| LocalGrid {
            width: side,
            height: side,
            vectors: (0..side * side * c).map(|_| if rng.random_bool(0.5) { 1.0 } else { -1.0 }).collect(),
        };
        let mut fit = LocalDensityFit::new(c, false, Some(r));
        (0..40).for_each(|_| fit.add_image(&[good(&mut rng)]));
        let eroded = fit.finish().unwrap();
        assert!(eroded.coarse.as_ref().unwrap().eroded, "a new fit erodes its coarse scale");
        let mut plain = eroded.clone();
        plain.coarse.as_mut().unwrap().eroded = false;
        let mut test = good(&mut rng);
        for y in 0..side {
            test.vectors[(y * side + line) * c..][..c].copy_from_slice(&[4.0, 4.0]);
        }
        let column_values = |d: &LocalDensity, keep: &dyn Fn(usize) -> bool| -> Vec<f32> {
            let values = d.image_distances(std::slice::from_ref(&test)).remove(0).values;
            values.into_iter().enumerate().filter(|(i, _)| keep((i % side).abs_diff(line))).map(|p| p.1).collect()
        };
        let near = |off: usize| (1..=r).contains(&off);
        let far = |off: usize| off > 2 * r + 1;
        let largest = |v: &[f32]| v.iter().copied().fold(f32::MIN, f32::max);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let far_largest = largest(&column_values(&eroded, &far));
        // beside the line the eroded coarse scale raises no distance more than 1% above the fine
        // scale's, which is a good vector's there; without the erosion the neighbours glow
        let fine_only = LocalDensity { coarse: None, ..eroded.clone() };
        let (with_coarse, fine) = (column_values(&eroded, &near), column_values(&fine_only, &near));
        assert!(with_coarse.iter().zip(&fine).all(|(e, f)| *e <= 1.01 * f), "the eroded map glows beside the line");
        assert!(mean(&column_values(&plain, &near)) > 1.5 * far_largest, "without erosion the neighbours should glow");
        // the line itself stands out either way
        let on_line = column_values(&eroded, &|off| off == 0);
        assert!(on_line.iter().all(|v| *v > 2.0 * far_largest));
    }

    #[test]
    fn a_coarse_scale_finds_a_region_whose_texture_differs_where_the_fine_one_cannot() {
        // good grids: every vector ±1 per channel at random (a fine texture); the defect region
        // (the left half) holds [1, 1] everywhere, a vector as likely as any good one, whose
        // window means are far from a good texture's (about 0)
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (side, c) = (12, 2);
        let good = |rng: &mut rand::rngs::StdRng| LocalGrid {
            width: side,
            height: side,
            vectors: (0..side * side * c).map(|_| if rng.random_bool(0.5) { 1.0 } else { -1.0 }).collect(),
        };
        let mut fit = LocalDensityFit::new(c, false, Some(2));
        (0..40).for_each(|_| fit.add_image(&[good(&mut rng)]));
        let density = fit.finish().unwrap();
        let mut test = good(&mut rng);
        for y in 0..side {
            for x in 0..side / 2 {
                test.vectors[(y * side + x) * c..][..c].copy_from_slice(&[1.0, 1.0]);
            }
        }
        // defect positions against good ones at least a window's radius from the boundary
        let auroc = |values: &[f32]| {
            let column = |i: usize| i % side;
            let inside: Vec<f32> = values.iter().enumerate().filter(|(i, _)| column(*i) < side / 2).map(|p| *p.1).collect();
            let outside: Vec<f32> = values.iter().enumerate().filter(|(i, _)| column(*i) >= side / 2 + 2).map(|p| *p.1).collect();
            let wins: f64 = inside
                .iter()
                .flat_map(|a| {
                    outside.iter().map(move |b| {
                        if a > b {
                            1.0
                        } else if a == b {
                            0.5
                        } else {
                            0.0
                        }
                    })
                })
                .sum();
            wins / (inside.len() * outside.len()) as f64
        };
        let fine = auroc(&density.fine.image_distances(std::slice::from_ref(&test))[0].values);
        let both = auroc(&density.image_distances(std::slice::from_ref(&test))[0].values);
        assert!(both > 0.95 && both > fine + 0.2, "fine scale {fine:.3}, with the coarse scale {both:.3}");
        // the coarse scale can only raise a distance
        let f = density.fine.image_distances(std::slice::from_ref(&test)).remove(0).values;
        let b = density.image_distances(std::slice::from_ref(&test)).remove(0).values;
        assert!(f.iter().zip(&b).all(|(f, b)| b >= f));
    }

    #[test]
    fn image_contrast_is_the_difference_from_the_images_median() {
        // one image of two grids (2 + 3 positions × 2 channels); medians (rank 2 of 5): 3 and 40
        let grid = |vectors: Vec<f32>| LocalGrid { width: vectors.len() / 2, height: 1, vectors };
        let grids = [grid(vec![1.0, 10.0, 3.0, 50.0]), grid(vec![9.0, 40.0, 2.0, 30.0, 4.0, 60.0])];
        assert_eq!(image_median(&grids, 2), vec![3.0, 40.0]);
        let out = modelled_vectors(&grids, 2, true);
        let want = [1.0, 10.0, -2.0, -30.0, 3.0, 50.0, 0.0, 10.0, 9.0, 40.0, 6.0, 0.0, 2.0, 30.0, -1.0, -10.0, 4.0, 60.0, 1.0, 20.0];
        assert_eq!(out, want);
        assert_eq!(modelled_vectors(&grids, 2, false), [1.0, 10.0, 3.0, 50.0, 9.0, 40.0, 2.0, 30.0, 4.0, 60.0]);
        // a density over the modelled vectors takes the image's own grids
        let identity = (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect();
        let g = LocalGaussian { dim: 4, mean: vec![0.0; 4], precision: identity, image_contrast: true };
        let d: Vec<f32> = g.image_distances(&grids).into_iter().flat_map(|g| g.values).collect();
        let norm = |r: &[f32]| r.iter().map(|x| x * x).sum::<f32>().sqrt();
        d.iter().zip(want.chunks_exact(4)).for_each(|(a, r)| assert!((a - norm(r)).abs() < 1e-4, "{a} vs {}", norm(r)));
    }

    #[test]
    fn image_contrast_finds_a_region_of_another_images_surface() {
        // each image's surface is a random level shared by its positions plus small noise: the
        // vectors alone vary mostly between images, so a band holding another image's level looks
        // good to the plain density and not to the one with image contrast
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (positions, channels) = (64, 3);
        let surface = |level: &[f32; 3], rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
            (0..positions * channels).map(|i| level[i % channels] + 0.1 * (rng.random::<f32>() - 0.5)).collect()
        };
        let (mut plain, mut contrast) = (GaussianFit::new(channels), GaussianFit::new(2 * channels));
        for _ in 0..200 {
            let level = [rng.random_range(-3.0..3.0f32), rng.random_range(-3.0..3.0), rng.random_range(-3.0..3.0)];
            let v = surface(&level, &mut rng);
            let one = [LocalGrid { width: positions, height: 1, vectors: v }];
            plain.add(&modelled_vectors(&one, channels, false));
            contrast.add(&modelled_vectors(&one, channels, true));
        }
        let plain = plain.finish().unwrap();
        let contrast = LocalGaussian { image_contrast: true, ..contrast.finish().unwrap() };
        // a test image at level 1 whose last 20 positions hold a level-(-1) surface
        let mut v = surface(&[1.0; 3], &mut rng);
        v[(positions - 20) * channels..].copy_from_slice(&surface(&[-1.0; 3], &mut rng)[(positions - 20) * channels..]);
        let ratio = |d: Vec<f32>| {
            let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
            mean(&d[positions - 20..]) / mean(&d[..positions - 20])
        };
        let one = [LocalGrid { width: positions, height: 1, vectors: v }];
        let distances = |g: &LocalGaussian| g.image_distances(&one).remove(0).values;
        let (r_plain, r_contrast) = (ratio(distances(&plain)), ratio(distances(&contrast)));
        assert!(r_plain < 1.5, "the plain density flags the band: {r_plain}");
        assert!(r_contrast > 5.0, "image contrast misses the band: {r_contrast}");
    }
}
