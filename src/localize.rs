//! Defect localization (paper section 3.3, eq. 7): gradients of each view's loss with respect to
//! the input pixels, blurred, summed over channels, rotated back and averaged; heat-map images.

use crate::backbone::{multiscale_features, INPUT_SIZE};
use crate::error::{Error, Result};
use crate::features::Extractor;
use crate::flow::{nll_loss, NormalizingFlow};
use crate::transforms::{rotate_pixels, Rgb8, View};
use candle_core::Var;
use std::path::Path;

/// σ of the Gaussian blur applied to the gradients, in pixels of the 448×448 input.
pub const BLUR_SIGMA: f32 = 3.0;

/// Separable Gaussian blur of a w×h plane, kernel truncated at 4σ, mirrored edges (scipy's
/// `gaussian_filter` defaults: mode `reflect`, truncate 4).
pub fn gaussian_blur(plane: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    let r = (4.0 * sigma + 0.5) as isize;
    let k: Vec<f32> = (-r..=r).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / total).collect();
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
/// official code does. Returns 448×448 values, row-major.
pub fn gradient_map(ex: &Extractor, flow: &NormalizingFlow, resized: &Rgb8, views: &[View]) -> Result<Vec<f32>> {
    let n = INPUT_SIZE * INPUT_SIZE;
    let mut acc = vec![0f32; n];
    for view in views {
        let x = Var::from_tensor(&ex.input_tensor(resized, view)?)?;
        let y = multiscale_features(ex.backbone.as_ref(), x.as_tensor())?;
        let (z, logdet) = flow.forward(&y)?;
        let grads = nll_loss(&z, &logdet)?.backward()?;
        let g = grads.get(x.as_tensor()).ok_or_else(|| Error::Config("no gradient reached the input".into()))?;
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        let mut map = vec![0f32; n];
        for c in 0..3 {
            let blurred = gaussian_blur(&g[c * n..(c + 1) * n], INPUT_SIZE, INPUT_SIZE, BLUR_SIGMA);
            map.iter_mut().zip(&blurred).for_each(|(m, b)| *m += b.abs());
        }
        let back = rotate_pixels(&map, INPUT_SIZE, INPUT_SIZE, 1, -view.degrees);
        acc.iter_mut().zip(&back).for_each(|(a, b)| *a += b);
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
    let img = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(INPUT_SIZE as u32, INPUT_SIZE as u32, map.to_vec()).expect("448x448 map");
    image::imageops::resize(&img, width as u32, height as u32, image::imageops::FilterType::Triangle).into_raw()
}

/// A perceptual colour map (dark blue → red → yellow) of a value in [0, 1].
pub fn colormap(v: f32) -> [u8; 3] {
    const STOPS: [(f32, [f32; 3]); 5] =
        [(0.0, [0.0, 0.0, 0.3]), (0.25, [0.3, 0.0, 0.6]), (0.5, [0.8, 0.1, 0.3]), (0.75, [1.0, 0.5, 0.0]), (1.0, [1.0, 1.0, 0.6])];
    let v = v.clamp(0.0, 1.0);
    let i = STOPS.iter().position(|s| s.0 >= v).unwrap_or(4).max(1);
    let (a, b) = (STOPS[i - 1], STOPS[i]);
    let t = (v - a.0) / (b.0 - a.0);
    std::array::from_fn(|c| ((a.1[c] + t * (b.1[c] - a.1[c])) * 255.0).round() as u8)
}

/// Writes `<stem>_heatmap.png` (colour map at the image's resolution) and `<stem>_overlay.png`
/// (image and colour map blended) for a normalized map; returns their paths.
pub fn write_heatmaps(original: &Rgb8, normalized_448: &[f32], out_dir: &Path, stem: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let m = resize_map(normalized_448, original.width, original.height);
    let heat: Vec<u8> = m.iter().flat_map(|v| colormap(*v)).collect();
    let overlay: Vec<u8> = original.data.iter().zip(&heat).map(|(a, b)| ((*a as u16 + *b as u16) / 2) as u8).collect();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut paths = vec![];
    for (name, data) in [("heatmap", heat), ("overlay", overlay)] {
        let p = out_dir.join(format!("{stem}_{name}.png"));
        let mut buf = std::io::Cursor::new(vec![]);
        image::RgbImage::from_raw(original.width as u32, original.height as u32, data)
            .expect("sizes match")
            .write_to(&mut buf, image::ImageFormat::Png)
            .map_err(|e| Error::format(&p, e.to_string()))?;
        crate::error::write_atomic(&p, &buf.into_inner())?;
        paths.push(p);
    }
    Ok((paths[0].clone(), paths[1].clone()))
}

/// Pixel AUROC and AUPRO (FPR ≤ 0.3) of the gradient maps against the ground-truth masks.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PixelMetrics {
    pub pixel_auroc: f64,
    pub aupro: f64,
    /// Per defect type (its images plus all good images): (pixel AUROC, AUPRO).
    pub per_defect: std::collections::BTreeMap<String, (f64, f64)>,
    /// Views averaged per gradient map.
    pub views: usize,
}

impl PixelMetrics {
    /// From (defect type, map at mask resolution, mask, width) per test image.
    pub fn compute(items: &[(String, Vec<f32>, Vec<bool>, usize)], views: usize) -> Self {
        use crate::metrics::{aupro, pixel_auroc, PixelSample};
        fn sample(i: &(String, Vec<f32>, Vec<bool>, usize)) -> PixelSample<'_> {
            PixelSample { map: &i.1, mask: &i.2, width: i.3 }
        }
        let all: Vec<PixelSample> = items.iter().map(sample).collect();
        let mut per_defect = std::collections::BTreeMap::new();
        let types: std::collections::BTreeSet<&str> = items.iter().map(|i| i.0.as_str()).filter(|t| *t != "good").collect();
        for t in types {
            let subset: Vec<PixelSample> = items.iter().filter(|i| i.0 == "good" || i.0 == t).map(sample).collect();
            per_defect.insert(t.to_string(), (pixel_auroc(&subset).unwrap_or(f64::NAN), aupro(&subset)));
        }
        PixelMetrics { pixel_auroc: pixel_auroc(&all).unwrap_or(f64::NAN), aupro: aupro(&all), per_defect, views }
    }
}

/// Gradient map of an image file at 448×448, with the decoded original.
pub fn localize_image(ex: &Extractor, flow: &NormalizingFlow, path: &Path, views: &[View]) -> Result<(Rgb8, Vec<f32>)> {
    let original = crate::transforms::load_rgb(path)?;
    let resized = crate::transforms::resize_bilinear(&original, INPUT_SIZE, INPUT_SIZE);
    let map = gradient_map(ex, flow, &resized, views)?;
    Ok((original, map))
}

/// Writes the heat map and overlay of an image file (per-image min-max normalization) into `out`.
pub fn write_localization(ex: &Extractor, flow: &NormalizingFlow, path: &Path, views: &[View], out: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (original, map) = localize_image(ex, flow, path, views)?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    write_heatmaps(&original, &normalize_min_max(&map), out, &stem)
}

/// Gradient maps of all test images with masks (and all good ones) at the masks' resolution,
/// and their pixel metrics. Defective images without a mask are skipped.
pub fn pixel_metrics(ex: &Extractor, flow: &NormalizingFlow, ds: &crate::data::Dataset, views: usize, bar: &indicatif::ProgressBar) -> Result<PixelMetrics> {
    let v = crate::transforms::test_views(views);
    let mut items = vec![];
    for s in &ds.test {
        bar.inc(1);
        if s.is_defect() && s.mask.is_none() {
            continue;
        }
        let (original, map) = localize_image(ex, flow, &s.path, &v)?;
        let mask: Vec<bool> = match &s.mask {
            Some(m) => {
                let m = crate::transforms::load_rgb(m)?;
                if (m.width, m.height) != (original.width, original.height) {
                    return Err(Error::Dataset {
                        path: s.path.clone(),
                        reason: format!("mask is {}x{}, image is {}x{}", m.width, m.height, original.width, original.height),
                    });
                }
                m.channel(0).iter().map(|&v| v > 127).collect()
            }
            None => vec![false; original.width * original.height],
        };
        items.push((s.defect.clone(), resize_map(&map, original.width, original.height), mask, original.width));
    }
    Ok(PixelMetrics::compute(&items, views))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn rotating_a_map_back_is_exact_for_quarter_turns() {
        let m: Vec<f32> = (0..16 * 16).map(|i| i as f32).collect();
        for d in [90.0, 180.0, 270.0] {
            assert_eq!(rotate_pixels(&rotate_pixels(&m, 16, 16, 1, d), 16, 16, 1, -d), m);
        }
    }
}
