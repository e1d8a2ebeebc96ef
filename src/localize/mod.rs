//! Defect localization: gradient maps (paper section 3.3, eq. 7: gradients of each view's loss
//! with respect to the pixels), feature maps (distances under
//! [`crate::features::local_density`]), their normalization; pictures in [`render`].

pub mod render;

use crate::backbone::INPUT_SIZE;
use crate::error::{Error, Result};
use crate::features::local_density::DistanceGrid;
use crate::features::Extractor;
use crate::flow::{nll_loss, NormalizingFlow};
use crate::views::{rotate_pixels, Rgb8, View};
use candle_core::{Tensor, Var};

/// σ of the Gaussian blur applied to the gradients, in pixels of the 448×448 input.
pub const BLUR_SIGMA: f32 = 3.0;

/// σ of the Gaussian blur of feature maps, in pixels of the 448×448 input (PaDiM's and
/// PatchCore's 4).
pub const FEATURE_MAP_SIGMA: f32 = 4.0;

/// Which anomaly map localizes the defect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapKind {
    /// Gradients of the flow's loss with respect to the pixels (paper eq. 7): a backward pass
    /// through the backbone per view.
    #[default]
    Gradient,
    /// Distances of the backbone's local feature vectors under the model's local density:
    /// forward-only, from the same pass that scores the image.
    Features,
}

impl MapKind {
    pub fn id(self) -> &'static str {
        match self {
            MapKind::Gradient => "gradient",
            MapKind::Features => "features",
        }
    }
}

/// The feature map of one 448×448 input from its views' distance grids: each grid resized to
/// 448×448 (bilinear), rotated back, averaged over views, blurred with [`FEATURE_MAP_SIGMA`].
pub fn feature_map(grids: &[DistanceGrid], views: &[View]) -> Vec<f32> {
    let n = INPUT_SIZE * INPUT_SIZE;
    let mut acc = vec![0f32; n];
    for (g, view) in grids.iter().zip(views) {
        let up = resize_plane(&g.values, g.width, g.height, INPUT_SIZE, INPUT_SIZE);
        let back = if view.degrees == 0.0 { up } else { rotate_pixels(&up, INPUT_SIZE, INPUT_SIZE, 1, -view.degrees) };
        acc.iter_mut().zip(&back).for_each(|(a, b)| *a += b);
    }
    let k = grids.len().max(1) as f32;
    acc.iter_mut().for_each(|a| *a /= k);
    gaussian_blur(&acc, INPUT_SIZE, INPUT_SIZE, FEATURE_MAP_SIGMA)
}

/// The normalized 1-D Gaussian kernel of [`gaussian_blur`]: 2r + 1 taps, r = ⌊4σ + 0.5⌋.
pub fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let r = (4.0 * sigma + 0.5) as isize;
    let k: Vec<f32> = (-r..=r).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = k.iter().sum();
    k.iter().map(|v| v / total).collect()
}

/// Separable Gaussian blur of a w×h plane, kernel truncated at 4σ, mirrored edges (scipy's
/// `gaussian_filter` defaults: mode `reflect`, truncate 4).
pub fn gaussian_blur(plane: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as isize;
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let mut i = i;
        loop {
            if i < 0 {
                i = -i - 1;
            } else if i >= n {
                i = 2 * n - i - 1;
            } else {
                return i as usize;
            }
        }
    };
    let mut tmp = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            tmp[y * w + x] = k.iter().enumerate().map(|(j, kv)| kv * plane[y * w + reflect(x as isize + j as isize - r, w)]).sum();
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = k.iter().enumerate().map(|(j, kv)| kv * tmp[reflect(y as isize + j as isize - r, h) * w + x]).sum();
        }
    }
    out
}

/// Gradient map of one image already resized to 448×448, eq. 7 per view
/// (Σ_c |G ∗ ∇x_c L|), each view's map rotated back, averaged over views, then squared as the
/// official code does. Returns 448×448 values, row-major. Views go through the backbone and the
/// flow in batches of the extractor's batch size (the flow's weights are read once per batch);
/// each view's gradient is that of its own loss.
pub fn gradient_map(ex: &Extractor, flow: &NormalizingFlow, resized: &Rgb8, views: &[View]) -> Result<Vec<f32>> {
    let n = INPUT_SIZE * INPUT_SIZE;
    let mut acc = vec![0f32; n];
    for batch in views.chunks(ex.batch.max(1)) {
        let inputs = batch.iter().map(|view| ex.input_tensor(resized, view)).collect::<Result<Vec<_>>>()?;
        let x = Var::from_tensor(&Tensor::cat(&inputs, 0)?)?;
        let y = ex.features(x.as_tensor())?;
        let (z, logdet) = flow.forward_frozen(&y)?;
        // the loss is the batch's mean: times the batch size, each view's gradient is its own
        let grads = (nll_loss(&z, &logdet)? * batch.len() as f64)?.backward()?;
        let g = grads.get(x.as_tensor()).ok_or_else(|| Error::Config("no gradient reached the input".into()))?;
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        for (view, g) in batch.iter().zip(g.chunks_exact(3 * n)) {
            let mut map = vec![0f32; n];
            for c in 0..3 {
                let blurred = gaussian_blur(&g[c * n..(c + 1) * n], INPUT_SIZE, INPUT_SIZE, BLUR_SIGMA);
                map.iter_mut().zip(&blurred).for_each(|(m, b)| *m += b.abs());
            }
            let back = rotate_pixels(&map, INPUT_SIZE, INPUT_SIZE, 1, -view.degrees);
            acc.iter_mut().zip(&back).for_each(|(a, b)| *a += b);
        }
    }
    let k = views.len().max(1) as f32;
    Ok(acc.iter().map(|v| (v / k).powi(2)).collect())
}

/// Scales a map to [0, 1] by its own minimum and maximum (the official per-image normalization).
pub fn normalize_min_max(map: &[f32]) -> Vec<f32> {
    let (lo, hi) = map.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let span = (hi - lo).max(f32::MIN_POSITIVE);
    map.iter().map(|v| (v - lo) / span).collect()
}

/// Bilinear resize of a square 448 map to the image's own size.
pub fn resize_map(map: &[f32], width: usize, height: usize) -> Vec<f32> {
    resize_plane(map, INPUT_SIZE, INPUT_SIZE, width, height)
}

/// Bilinear resize of a w×h plane (row-major) to dw×dh, pixel centres aligned (half-pixel
/// convention, edges clamped). Values are not clamped (the `image` crate's f32 resize clamps
/// to [0, 1]).
pub fn resize_plane(plane: &[f32], w: usize, h: usize, dw: usize, dh: usize) -> Vec<f32> {
    if (w, h) == (dw, dh) {
        return plane.to_vec();
    }
    // source coordinate of each destination column / row: (index, weight of the next one)
    let taps = |n: usize, dn: usize| -> Vec<(usize, usize, f32)> {
        (0..dn)
            .map(|i| {
                let x = ((i as f32 + 0.5) * n as f32 / dn as f32 - 0.5).clamp(0.0, (n - 1) as f32);
                let x0 = x.floor() as usize;
                (x0, (x0 + 1).min(n - 1), x - x0 as f32)
            })
            .collect()
    };
    let (cols, rows) = (taps(w, dw), taps(h, dh));
    let mut out = Vec::with_capacity(dw * dh);
    for &(y0, y1, fy) in &rows {
        for &(x0, x1, fx) in &cols {
            let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
            let bottom = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// How a gradient map is scaled to [0, 1] before it is drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapNormalization {
    /// By the image's own minimum and maximum (official code): every map has a hot spot.
    #[default]
    Image,
    /// By the range of the maps of good images stored with the model (`calibrate
    /// --localization-good`): a good part stays calm, a defect saturates.
    Good,
}

/// Value range of the maps of good images, stored in the model for
/// [`MapNormalization::Good`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GoodMapRange {
    /// The kind of map measured (gradient maps in models written before feature maps existed).
    #[serde(default)]
    pub map: MapKind,
    /// Median pixel value of the good maps: drawn as 0.
    pub low: f32,
    /// Largest pixel value of any good map: drawn as 1.
    pub high: f32,
    pub images: usize,
    pub views: usize,
}

impl GoodMapRange {
    pub fn from_maps(map: MapKind, maps: &[Vec<f32>], views: usize) -> Option<Self> {
        let mut all: Vec<f32> = maps.iter().flatten().copied().filter(|v| v.is_finite()).collect();
        if all.is_empty() {
            return None;
        }
        let mid = all.len() / 2;
        let (_, low, _) = all.select_nth_unstable_by(mid, f32::total_cmp);
        let low = *low;
        let high = all.iter().copied().fold(f32::MIN, f32::max);
        Some(GoodMapRange { map, low, high, images: maps.len(), views })
    }

    pub fn normalize(&self, map: &[f32]) -> Vec<f32> {
        let span = (self.high - self.low).max(f32::MIN_POSITIVE);
        map.iter().map(|v| ((v - self.low) / span).clamp(0.0, 1.0)).collect()
    }
}

/// Scales a map of kind `kind` to [0, 1] as chosen; `Good` needs the model's [`GoodMapRange`]
/// of that kind.
pub fn normalize_map(map: &[f32], kind: MapKind, how: MapNormalization, good: Option<&GoodMapRange>) -> Result<Vec<f32>> {
    match (how, good) {
        (MapNormalization::Image, _) => Ok(normalize_min_max(map)),
        (MapNormalization::Good, Some(r)) if r.map == kind => Ok(r.normalize(map)),
        (MapNormalization::Good, _) => Err(Error::Config(format!(
            "the model has no range of good images' {} maps; run `differnet calibrate --model MODEL --localization-good DIR --map {}` first",
            kind.id(),
            kind.id()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::render::{render_localization, CONTOUR};
    use super::*;

    #[test]
    fn batched_gradient_maps_are_the_mean_of_each_views_own() -> Result<()> {
        // random AlexNet (its weights do not matter here) and a small flow on its 768 features
        let dev = candle_core::Device::Cpu;
        let mut ex = Extractor::from_backbone(Box::new(crate::backbone::AlexNet::random(&dev)?), "random".into(), &dev);
        ex.batch = 2;
        let flow = NormalizingFlow::new(crate::flow::FlowConfig { dim: 768, blocks: 2, hidden: 16, alpha: 3.0 }, 1, &dev)?;
        let img = Rgb8 {
            width: INPUT_SIZE,
            height: INPUT_SIZE,
            data: (0..INPUT_SIZE * INPUT_SIZE * 3).map(|i| ((i * 7919) % 251) as u8).collect(),
        };
        let views = crate::views::test_views(3);
        // sqrt of a map is the mean over views of Σ_c |G ∗ ∇x_c L|; one view at a time gives each term
        let all: Vec<f32> = gradient_map(&ex, &flow, &img, &views)?.iter().map(|v| v.sqrt()).collect();
        let mut mean = vec![0f32; all.len()];
        for v in &views {
            let one = gradient_map(&ex, &flow, &img, std::slice::from_ref(v))?;
            mean.iter_mut().zip(&one).for_each(|(m, o)| *m += o.sqrt() / 3.0);
        }
        let scale = mean.iter().cloned().fold(0f32, f32::max);
        assert!(scale > 0.0, "no gradient");
        let worst = all.iter().zip(&mean).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4 * scale, "batched map differs by {worst} (scale {scale})");
        Ok(())
    }

    #[test]
    fn blur_keeps_mass_and_constants() {
        let flat = vec![2.0f32; 30 * 20];
        assert!(gaussian_blur(&flat, 30, 20, 3.0).iter().all(|v| (v - 2.0).abs() < 1e-5));
        let mut spike = vec![0f32; 41 * 41];
        spike[20 * 41 + 20] = 1.0;
        let b = gaussian_blur(&spike, 41, 41, 3.0);
        assert!((b.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let peak = b.iter().cloned().fold(0f32, f32::max);
        assert_eq!(b[20 * 41 + 20], peak);
    }

    #[test]
    fn good_range_keeps_good_maps_calm_and_contours_the_region() {
        let good = vec![vec![0.0, 1.0, 1.0, 2.0], vec![1.0, 1.0, 1.0, 3.0]];
        let r = GoodMapRange::from_maps(MapKind::Gradient, &good, 4).unwrap();
        assert_eq!((r.low, r.high), (1.0, 3.0));
        assert_eq!(r.normalize(&[0.0, 2.0, 3.0, 9.0]), vec![0.0, 0.5, 1.0, 1.0]);
        assert!(normalize_map(&[1.0], MapKind::Gradient, MapNormalization::Good, None).is_err());
        assert!(normalize_map(&[1.0], MapKind::Features, MapNormalization::Good, Some(&r)).is_err(), "a range of another kind used");
        // a 100×100 square of ones at (100..200)² of a 448×448 image: its 396 border pixels are contour
        let n = INPUT_SIZE;
        let sq = |i: usize| (100..200).contains(&(i / n)) && (100..200).contains(&(i % n));
        let map: Vec<f32> = (0..n * n).map(|i| if sq(i) { 1.0 } else { 0.0 }).collect();
        let original = Rgb8 { width: n, height: n, data: vec![0; n * n * 3] };
        let pics = render_localization(&original, &map, 0.5);
        let inside = |x: u32, y: u32| pics.mask.get_pixel(x, y).0[0] == 255;
        assert_eq!((0..n * n).filter(|&i| inside((i % n) as u32, (i / n) as u32)).count(), 100 * 100);
        let contour = |x: u32, y: u32| pics.overlay.get_pixel(x, y).0 == CONTOUR;
        assert_eq!((0..n * n).filter(|&i| contour((i % n) as u32, (i / n) as u32)).count(), 396);
        assert!(contour(100, 150) && contour(199, 199) && !contour(150, 150) && !contour(99, 150));
    }

    #[test]
    fn resizing_keeps_values_beyond_one_and_interpolates_linearly() {
        // a ramp 0, 10, 20, 30 doubled: half-pixel centres give 0, 2.5, 7.5, ... 30 at the ends
        let up = resize_plane(&[0.0, 10.0, 20.0, 30.0], 4, 1, 8, 1);
        assert_eq!(up, vec![0.0, 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30.0]);
        assert_eq!(resize_plane(&[5.0; 6], 3, 2, 7, 5), vec![5.0; 35]);
        let down = resize_plane(&up, 8, 1, 4, 1);
        assert!(down.iter().zip([1.25f32, 10.0, 20.0, 28.75]).all(|(a, b)| (a - b).abs() < 1e-5), "{down:?}");
    }

    #[test]
    fn rotating_a_map_back_is_exact_for_quarter_turns() {
        let m: Vec<f32> = (0..16 * 16).map(|i| i as f32).collect();
        for d in [90.0, 180.0, 270.0] {
            assert_eq!(rotate_pixels(&rotate_pixels(&m, 16, 16, 1, d), 16, 16, 1, -d), m);
        }
    }
}
