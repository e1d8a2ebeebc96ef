//! Heat maps, overlays and masks: the pictures of a normalized anomaly map at the image's
//! resolution, and writing them as PNG files.

use super::{normalize_map, GoodMapRange, MapKind, MapNormalization};
use crate::error::{Error, Result};
use crate::views::{png_bytes, Rgb8};
use std::path::Path;

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

/// The pictures of one localized image, at its own resolution.
pub struct LocalizationImages {
    /// Colour map of the normalized gradient map.
    pub heatmap: image::RgbImage,
    /// Image and colour map blended, with the contour of the thresholded region drawn in.
    pub overlay: image::RgbImage,
    /// White where the normalized map reaches the pixel threshold.
    pub mask: image::GrayImage,
}

/// Colour of the region contour drawn on overlays.
pub(crate) const CONTOUR: [u8; 3] = [0, 255, 128];

/// Heat map, overlay with contour and binary mask of a normalized map at the image's resolution.
pub fn render_localization(original: &Rgb8, normalized: &[f32], pixel_threshold: f32) -> LocalizationImages {
    let (w, h) = (original.width, original.height);
    let m = normalized;
    let inside: Vec<bool> = m.iter().map(|v| *v >= pixel_threshold).collect();
    let heat: Vec<u8> = m.iter().flat_map(|v| colormap(*v)).collect();
    let mut overlay: Vec<u8> = original.data.iter().zip(&heat).map(|(a, b)| ((*a as u16 + *b as u16) / 2) as u8).collect();
    // contour: region pixels with a 4-neighbour outside the region (or on the image border)
    let edge = |x: usize, y: usize| {
        x == 0
            || y == 0
            || x + 1 == w
            || y + 1 == h
            || !inside[y * w + x - 1]
            || !inside[y * w + x + 1]
            || !inside[(y - 1) * w + x]
            || !inside[(y + 1) * w + x]
    };
    for y in 0..h {
        for x in 0..w {
            if inside[y * w + x] && edge(x, y) {
                overlay[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&CONTOUR);
            }
        }
    }
    let mask: Vec<u8> = inside.iter().map(|&i| if i { 255 } else { 0 }).collect();
    LocalizationImages {
        heatmap: image::RgbImage::from_raw(w as u32, h as u32, heat).expect("sizes match"),
        overlay: image::RgbImage::from_raw(w as u32, h as u32, overlay).expect("sizes match"),
        mask: image::GrayImage::from_raw(w as u32, h as u32, mask).expect("sizes match"),
    }
}

/// Paths of the files written for one image.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LocalizationFiles {
    pub heatmap: std::path::PathBuf,
    pub overlay: std::path::PathBuf,
    pub mask: std::path::PathBuf,
}

/// Writes `<stem>_heatmap.png`, `<stem>_overlay.png` and `<stem>_mask.png` into `out_dir`, each atomically.
pub fn write_heatmaps(images: &LocalizationImages, out_dir: &Path, stem: &str) -> Result<LocalizationFiles> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let p = |kind: &str| out_dir.join(format!("{stem}_{kind}.png"));
    let files = LocalizationFiles { heatmap: p("heatmap"), overlay: p("overlay"), mask: p("mask") };
    crate::error::write_atomic(&files.heatmap, &png_bytes(&images.heatmap))?;
    crate::error::write_atomic(&files.overlay, &png_bytes(&images.overlay))?;
    crate::error::write_atomic(&files.mask, &png_bytes(&images.mask))?;
    Ok(files)
}

/// Which map is drawn and how: its kind, normalization and the pixel threshold of the mask
/// and contour.
#[derive(Clone, Debug)]
pub struct MapStyle {
    pub kind: MapKind,
    pub normalization: MapNormalization,
    pub good: Option<GoodMapRange>,
    /// Threshold on the normalized map, in [0, 1].
    pub pixel_threshold: f32,
}

impl MapStyle {
    /// Gradient maps with per-image min-max normalization, contour at 0.5 (the official code's).
    pub fn official() -> Self {
        MapStyle { kind: MapKind::Gradient, normalization: MapNormalization::Image, good: None, pixel_threshold: 0.5 }
    }

    /// `kind` drawn against the model's range of good maps when it has one of that kind, else
    /// by each image's own range; contour at 0.5.
    pub fn for_model(kind: MapKind, good: Option<&GoodMapRange>) -> Self {
        let good = good.filter(|g| g.map == kind).cloned();
        let normalization = if good.is_some() { MapNormalization::Good } else { MapNormalization::Image };
        MapStyle { kind, normalization, good, pixel_threshold: 0.5 }
    }

    /// The pictures of `map`, a map of this style's kind at the image's resolution.
    pub fn render(&self, original: &Rgb8, map: &[f32]) -> Result<LocalizationImages> {
        Ok(render_localization(original, &normalize_map(map, self.kind, self.normalization, self.good.as_ref())?, self.pixel_threshold))
    }
}
