//! Whether good images show parts in one pose or in any orientation: how much farther rotated
//! views of held-out good images lie from the upright training images than their upright views.

use crate::error::{Error, Result};
use crate::features::{Extractor, FeatureCache};
use crate::progress::Progress;
use crate::views::View;
use rayon::prelude::*;
use std::path::PathBuf;

/// Rotations a probe image is seen in besides upright (exact transposes of the square input, so
/// no black corners tell a rotated view from an upright one).
pub const PROBE_ROTATIONS: [f64; 3] = [90.0, 180.0, 270.0];
/// At most this many reference images (evenly spaced over the training images) and probes.
pub const MAX_REFERENCES: usize = 200;
pub const MAX_PROBES: usize = 24;
/// A pose ratio below this means parts in any orientation (rotated good parts look like other
/// good parts). Chosen on the training images of five sets, none of their test images
/// (docs/results.md, "Fixed pose or any pose"): synthetic parts in any orientation 1.12; fixed
/// pose: synthetic textures 1.59, the same parts in a fixture 2.88, KolektorSDD 2.97, Magnetic
/// Tile Defects 3.22. 1.3 lies between 1.12 and 1.59 (near their geometric mean, 1.34).
pub const ANY_POSE_BELOW: f64 = 1.3;

/// What [`check_pose`] measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PoseCheck {
    /// Median nearest-reference distance of the rotated probe views over that of the upright
    /// ones; about 1 when orientation varies among the good images.
    pub ratio: f64,
    /// The ratio below which parts count as arriving in any orientation.
    pub any_pose_below: f64,
    pub any_pose: bool,
    pub probes: usize,
    pub references: usize,
}

impl PoseCheck {
    /// One line: the ratio, the bound, and what `train` did with it.
    pub fn verdict(&self) -> String {
        if self.any_pose {
            format!("pose ratio {:.3} < {}: parts in any orientation, trained with rotations", self.ratio, self.any_pose_below)
        } else {
            format!("pose ratio {:.3} >= {}: parts in a fixed pose, trained upright", self.ratio, self.any_pose_below)
        }
    }
}

/// At most `n` of `items`, evenly spaced.
fn spread<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    if items.len() <= n {
        return items.to_vec();
    }
    (0..n).map(|i| items[i * items.len() / n].clone()).collect()
}

/// Measures the pose ratio ([`pose_ratio`]) of the upright views of `references` and the views of
/// each probe upright and rotated by [`PROBE_ROTATIONS`]. Probes must not be among the references.
pub fn check_pose(
    ex: &Extractor,
    cache: &FeatureCache,
    references: &[PathBuf],
    probes: &[PathBuf],
    progress: &dyn Progress,
) -> Result<PoseCheck> {
    let (references, probes) = (spread(references, MAX_REFERENCES), spread(probes, MAX_PROBES));
    if references.is_empty() || probes.is_empty() {
        return Err(Error::Config(format!(
            "checking the pose needs reference and probe images, got {} and {}",
            references.len(),
            probes.len()
        )));
    }
    let dim = ex.feature_dim();
    progress.set_message("pose check");
    progress.set_length((references.len() + probes.len()) as u64);
    let upright = [View::rotation(0.0)];
    let reference_rows: Vec<f32> = references
        .par_iter()
        .map(|p| {
            let f = cache.features(ex, p, &upright)?;
            progress.step(1)?;
            Ok(f)
        })
        .collect::<Result<Vec<_>>>()?
        .concat();
    let views: Vec<View> = std::iter::once(0.0).chain(PROBE_ROTATIONS).map(View::rotation).collect();
    let probe_rows: Vec<Vec<f32>> = probes
        .par_iter()
        .map(|p| {
            let f = cache.features(ex, p, &views)?;
            progress.step(1)?;
            Ok(f)
        })
        .collect::<Result<_>>()?;
    let ratio = pose_ratio(&reference_rows, &probe_rows.concat(), dim, views.len())
        .ok_or_else(|| Error::Config("the pose check found no probe tile at a nonzero distance from the references".into()))?;
    Ok(PoseCheck {
        ratio,
        any_pose_below: ANY_POSE_BELOW,
        any_pose: ratio < ANY_POSE_BELOW,
        probes: probes.len(),
        references: references.len(),
    })
}

/// The pose ratio of probe tiles (`views` consecutive rows each, the upright view first) against
/// reference rows, all `dim` wide: the median distance of the rotated views over that of the
/// upright views, each distance to the nearest reference after z-scoring every dimension on the
/// references (a ratio of medians, so that for parts in any pose, where both come from one
/// distribution, it is about 1). `None` when the upright median is 0.
pub fn pose_ratio(references: &[f32], probes: &[f32], dim: usize, views: usize) -> Option<f64> {
    let n = references.len() / dim;
    let mut mean = vec![0f64; dim];
    let mut var = vec![0f64; dim];
    for r in references.chunks(dim) {
        r.iter().zip(&mut mean).for_each(|(&v, m)| *m += v as f64 / n as f64);
    }
    for r in references.chunks(dim) {
        r.iter().zip(&mean).zip(&mut var).for_each(|((&v, m), s)| *s += (v as f64 - m).powi(2) / n as f64);
    }
    // dimensions that do not vary among the references weigh as much as the typical one
    let typical = {
        let mut v: Vec<f64> = var.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2].max(f64::MIN_POSITIVE)
    };
    let scale: Vec<f64> = var.iter().map(|&s| 1.0 / s.max(1e-6 * typical).sqrt()).collect();
    let z = |row: &[f32]| -> Vec<f64> { row.iter().zip(&mean).zip(&scale).map(|((&v, m), s)| (v as f64 - m) * s).collect() };
    let refs: Vec<Vec<f64>> = references.chunks(dim).map(z).collect();
    let nearest = |row: &[f32]| -> f64 {
        let q = z(row);
        refs.iter().map(|r| r.iter().zip(&q).map(|(a, b)| (a - b).powi(2)).sum::<f64>()).fold(f64::INFINITY, f64::min).sqrt()
    };
    let per_tile: Vec<Vec<f64>> = probes.par_chunks(views * dim).map(|tile| tile.chunks(dim).map(nearest).collect()).collect();
    let upright: Vec<f64> = per_tile.iter().map(|d| d[0]).collect();
    let rotated: Vec<f64> = per_tile.iter().flat_map(|d| d[1..].iter().copied()).collect();
    let (u, r) = (median(upright)?, median(rotated)?);
    (u > 0.0).then(|| r / u)
}

/// The median of a non-empty list.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len();
    Some(if m % 2 == 1 { v[m / 2] } else { 0.5 * (v[m / 2 - 1] + v[m / 2]) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of `dim` values from a seeded generator.
    fn rows(seed: u64, n: usize, dim: usize, f: impl Fn(usize, &mut rand_chacha::ChaCha8Rng) -> Vec<f32>) -> Vec<f32> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let out: Vec<f32> = (0..n).flat_map(|i| f(i, &mut rng)).collect();
        assert_eq!(out.len(), n * dim);
        out
    }

    /// A part's feature vector at angle `a` (radians) plus noise: orientation lives in the first
    /// two dimensions as (cos a, sin a) · 4.
    fn part(a: f64, rng: &mut impl rand::Rng, dim: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim).map(|_| rng.random_range(-0.3..0.3)).collect();
        v[0] += 4.0 * a.cos() as f32;
        v[1] += 4.0 * a.sin() as f32;
        v
    }

    #[test]
    fn rotated_views_of_fixed_pose_parts_are_far_and_of_any_pose_parts_are_not() {
        use rand::Rng;
        use std::f64::consts::{FRAC_PI_2, TAU};
        let dim = 8;
        // fixed pose: every reference upright (angle 0); probes upright then at 90, 180, 270°
        let fixed_refs = rows(1, 200, dim, |_, r| part(0.0, r, dim));
        let probes = rows(2, 20 * 4, dim, |i, r| part((i % 4) as f64 * FRAC_PI_2, r, dim));
        let fixed = pose_ratio(&fixed_refs, &probes, dim, 4).unwrap();
        // any pose: references at uniform angles; the same probes (random base angle each)
        let any_refs = rows(3, 200, dim, |_, r| {
            let a = r.random_range(0.0..TAU);
            part(a, r, dim)
        });
        let any_probes = rows(4, 20 * 4, dim, |i, r| {
            let base = (i / 4) as f64 * 0.7;
            part(base + (i % 4) as f64 * FRAC_PI_2, r, dim)
        });
        let any = pose_ratio(&any_refs, &any_probes, dim, 4).unwrap();
        assert!(fixed > 2.0, "fixed pose ratio {fixed}");
        assert!((0.8..ANY_POSE_BELOW).contains(&any), "any pose ratio {any}");
    }

    #[test]
    fn the_ratio_is_of_medians_and_a_zero_upright_median_is_none() {
        let dim = 2;
        let refs = vec![0.0, 0.0, 1.0, 1.0];
        // one tile of 2 views whose upright view is a reference: upright median 0
        assert_eq!(pose_ratio(&refs, &[1.0, 1.0, 3.0, 3.0], dim, 2), None);
        // z-scored (mean 0.5, std 0.5: references (-1, -1), (1, 1)): upright distances 0 and √2,
        // rotated 4√2 (z (5, 5)) and √2; medians √2/2 and 5√2/2 → ratio 5
        let r = pose_ratio(&refs, &[1.0, 1.0, 3.0, 3.0, 1.5, 1.5, 1.5, 1.5], dim, 2).unwrap();
        assert!((r - 5.0).abs() < 1e-9, "{r}");
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn spread_keeps_all_or_an_even_subset() {
        let v: Vec<usize> = (0..10).collect();
        assert_eq!(spread(&v, 20), v);
        assert_eq!(spread(&v, 5), vec![0, 2, 4, 6, 8]);
    }
}
