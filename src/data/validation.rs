//! Validation data made from a dataset's own good training images: a seeded held-out part of
//! `train/good`, and copies of it with synthetic defects pasted in, written in MVTec AD layout.

use crate::data::Dataset;
use crate::error::{write_atomic, Error, Result};
use crate::views::{decode_rgb, Rgb8};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// The kinds of synthetic defect pasted into held-out images, in turn: three small ones drawn in
/// ([`paste_defect`]) and one large region of another good image's surface ([`paste_region`]).
pub const SYNTHETIC_DEFECTS: [&str; 4] = ["scratch", "spot", "crack", "region"];

/// A seeded split of training images into the part the flow is fitted on and a held-out part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldoutSplit {
    pub fit: Vec<PathBuf>,
    pub held_out: Vec<PathBuf>,
}

/// Holds out `fraction` of `images` (rounded, at least 1 and leaving at least 1 to fit), chosen
/// by a seeded shuffle; both parts keep the input's order. The same seed gives the same split.
pub fn holdout_split(images: &[PathBuf], fraction: f64, seed: u64) -> Result<HoldoutSplit> {
    if images.len() < 2 {
        return Err(Error::Config(format!("holding out part of {} training image(s) needs at least 2", images.len())));
    }
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::Config(format!("held-out fraction {fraction} is not between 0 and 1")));
    }
    let n_held = ((images.len() as f64 * fraction).round() as usize).clamp(1, images.len() - 1);
    let mut idx: Vec<usize> = (0..images.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x4F1D_0D7A_1E5E_ED00));
    let mut held = vec![false; images.len()];
    idx[..n_held].iter().for_each(|&i| held[i] = true);
    let pick = |want: bool| images.iter().zip(&held).filter(|(_, &h)| h == want).map(|(p, _)| p.clone()).collect();
    Ok(HoldoutSplit { fit: pick(false), held_out: pick(true) })
}

/// Changes the pixels of a disk by `delta` (each pixel once, marked in `mask`).
fn stamp(img: &mut Rgb8, mask: &mut [u8], x: f32, y: f32, r: f32, delta: f32) {
    let (w, h) = (img.width as f32, img.height as f32);
    let (x0, x1) = ((x - r).floor().max(0.0) as usize, ((x + r).ceil().min(w - 1.0)).max(0.0) as usize);
    let (y0, y1) = ((y - r).floor().max(0.0) as usize, ((y + r).ceil().min(h - 1.0)).max(0.0) as usize);
    for yy in y0..=y1 {
        for xx in x0..=x1 {
            let i = yy * img.width + xx;
            if (xx as f32 - x).powi(2) + (yy as f32 - y).powi(2) <= r * r && mask[i] == 0 {
                for c in 0..3 {
                    img.data[i * 3 + c] = (img.data[i * 3 + c] as f32 + delta).round().clamp(0.0, 255.0) as u8;
                }
                mask[i] = 255;
            }
        }
    }
}

/// Standard deviation of the image's luminance.
fn luminance_std(img: &Rgb8) -> f32 {
    let l: Vec<f32> = img.data.chunks_exact(3).map(|p| 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32).collect();
    let mean = l.iter().sum::<f32>() / l.len().max(1) as f32;
    (l.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / l.len().max(1) as f32).sqrt()
}

/// A copy of `img` with one synthetic defect (`scratch`: a thin straight line, `spot`: a disk,
/// `crack`: a thin random walk) of a size relative to the image's short side and a contrast of
/// 3 standard deviations of its luminance (40 to 100 grey levels), brighter or darker at random;
/// returns the image and the defect's mask (255 inside).
pub fn paste_defect(img: &Rgb8, kind: &str, rng: &mut impl Rng) -> (Rgb8, Vec<u8>) {
    let mut out = img.clone();
    let mut mask = vec![0u8; img.width * img.height];
    let (w, h) = (img.width as f32, img.height as f32);
    let side = w.min(h);
    let delta = (3.0 * luminance_std(img)).clamp(40.0, 100.0) * if rng.random_bool(0.5) { 1.0 } else { -1.0 };
    let (mut x, mut y) = (rng.random_range(0.2 * w..0.8 * w), rng.random_range(0.2 * h..0.8 * h));
    let thin = (0.006 * side).max(1.0);
    match kind {
        "scratch" => {
            let a = rng.random_range(0.0..std::f32::consts::PI);
            let len = rng.random_range(0.15 * side..0.35 * side);
            for t in 0..(len as usize) {
                let t = t as f32 - len / 2.0;
                stamp(&mut out, &mut mask, x + t * a.cos(), y + t * a.sin(), thin, delta);
            }
        }
        "spot" => stamp(&mut out, &mut mask, x, y, rng.random_range(0.02 * side..0.05 * side), delta),
        _ => {
            let mut a = rng.random_range(0.0..std::f32::consts::TAU);
            let step = (0.007 * side).max(1.0);
            for _ in 0..40 {
                a += rng.random_range(-0.5..0.5f32);
                x = (x + a.cos() * step).clamp(0.0, w - 1.0);
                y = (y + a.sin() * step).clamp(0.0, h - 1.0);
                stamp(&mut out, &mut mask, x, y, thin, delta);
            }
        }
    }
    (out, mask)
}

/// A copy of `img` whose band along one edge (chosen at random, 15-45% of the image deep, its
/// inner boundary wandering by up to 3% of the side) holds the pixels of `donor` (another good
/// image, resized to `img`'s size) at the same places: a large area of a surface that is good
/// on its own but not this part's, as a whole region of uneven finish or a wrong material is.
/// Returns the image and the region's mask (255 inside).
pub fn paste_region(img: &Rgb8, donor: &Rgb8, rng: &mut impl Rng) -> (Rgb8, Vec<u8>) {
    let donor = crate::views::resize_bilinear(donor, img.width, img.height);
    let (w, h) = (img.width, img.height);
    let edge = rng.random_range(0..4u8);
    // along the edge: position t in 0..len; across it: depth from the edge
    let (len, across) = if edge < 2 { (w, h) } else { (h, w) };
    let depth = rng.random_range(0.15..0.45f32) * across as f32;
    let wander = 0.03 * len.min(across) as f32;
    let (mut off, mut boundary) = (0f32, Vec::with_capacity(len));
    for _ in 0..len {
        off = (off + rng.random_range(-1.0..1.0f32) * wander * 0.1).clamp(-wander, wander);
        boundary.push(depth + off);
    }
    let mut out = img.clone();
    let mut mask = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let (t, d) = match edge {
                0 => (x, y),
                1 => (x, h - 1 - y),
                2 => (y, x),
                _ => (y, w - 1 - x),
            };
            if (d as f32) < boundary[t] {
                let i = y * w + x;
                out.data[i * 3..i * 3 + 3].copy_from_slice(&donor.data[i * 3..i * 3 + 3]);
                mask[i] = 255;
            }
        }
    }
    (out, mask)
}

/// What [`write_validation_set`] wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ValidationSet {
    pub root: PathBuf,
    pub fit_images: usize,
    pub held_out_images: usize,
    pub synthetic_defects: usize,
    pub fraction: f64,
    pub seed: u64,
}

/// Writes a validation dataset for `ds` under `out` (MVTec AD layout): `train/good` links to the
/// fitted part of `ds.train`, `test/good` links to the held-out part, `test/<kind>` holds a copy
/// of each held-out image with one pasted defect of that kind (the kinds of [`SYNTHETIC_DEFECTS`]
/// in turn, so `test` reports each; a region comes from the next held-out image), and
/// `ground_truth/<kind>` their masks.
pub fn write_validation_set(ds: &Dataset, out: &Path, fraction: f64, seed: u64) -> Result<ValidationSet> {
    ds.require_train()?;
    let split = holdout_split(&ds.train, fraction, seed)?;
    let link = |src: &Path, dir: &str| -> Result<()> {
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let target = std::fs::canonicalize(src).map_err(|e| Error::io(src, e))?;
        let dst = dir.join(src.file_name().unwrap_or_default());
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(&target, &dst).map_err(|e| Error::io(&dst, e))
    };
    for p in &split.fit {
        link(p, "train/good")?;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x5EED_DEFEC7));
    for (i, p) in split.held_out.iter().enumerate() {
        link(p, "test/good")?;
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        let img = decode_rgb(&bytes).map_err(|reason| Error::Image { path: p.clone(), reason })?;
        let kind = SYNTHETIC_DEFECTS[i % SYNTHETIC_DEFECTS.len()];
        let (bad, mask) = match kind {
            "region" => {
                let q = &split.held_out[(i + 1) % split.held_out.len()];
                let bytes = std::fs::read(q).map_err(|e| Error::io(q, e))?;
                let donor = decode_rgb(&bytes).map_err(|reason| Error::Image { path: q.clone(), reason })?;
                paste_region(&img, &donor, &mut rng)
            }
            small => paste_defect(&img, small, &mut rng),
        };
        let stem = p.file_stem().unwrap_or_default().to_string_lossy();
        let rgb = image::RgbImage::from_raw(bad.width as u32, bad.height as u32, bad.data).expect("buffer matches size");
        write_atomic(&out.join(format!("test/{kind}/{stem}.png")), &crate::views::png_bytes(&rgb))?;
        let gray = image::GrayImage::from_raw(img.width as u32, img.height as u32, mask).expect("buffer matches size");
        let mut png = vec![];
        gray.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).map_err(|e| Error::format(p, e.to_string()))?;
        write_atomic(&out.join(format!("ground_truth/{kind}/{stem}_mask.png")), &png)?;
    }
    Ok(ValidationSet {
        root: out.to_path_buf(),
        fit_images: split.fit.len(),
        held_out_images: split.held_out.len(),
        synthetic_defects: split.held_out.len(),
        fraction,
        seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdout_is_seeded_disjoint_and_complete() {
        let images: Vec<PathBuf> = (0..20).map(|i| PathBuf::from(format!("{i:02}.png"))).collect();
        let a = holdout_split(&images, 0.2, 7).unwrap();
        assert_eq!(a, holdout_split(&images, 0.2, 7).unwrap());
        assert_ne!(a, holdout_split(&images, 0.2, 8).unwrap());
        assert_eq!((a.fit.len(), a.held_out.len()), (16, 4));
        let mut all: Vec<PathBuf> = a.fit.iter().chain(&a.held_out).cloned().collect();
        all.sort();
        assert_eq!(all, images);
        assert!(a.fit.iter().all(|p| !a.held_out.contains(p)));
        // tiny sets keep one image on each side
        let two = holdout_split(&images[..2], 0.01, 0).unwrap();
        assert_eq!((two.fit.len(), two.held_out.len()), (1, 1));
        assert!(holdout_split(&images[..1], 0.2, 0).is_err());
    }

    #[test]
    fn pasted_defects_change_exactly_their_mask() {
        let img = Rgb8 { width: 120, height: 300, data: (0..120 * 300 * 3).map(|i| (100 + (i / 3) % 7) as u8).collect() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for kind in &SYNTHETIC_DEFECTS[..3] {
            let (bad, mask) = paste_defect(&img, kind, &mut rng);
            let marked = mask.iter().filter(|&&m| m == 255).count();
            assert!(marked > 3, "{kind}: {marked} pixels");
            for (i, m) in mask.iter().enumerate() {
                let changed = bad.data[i * 3..i * 3 + 3] != img.data[i * 3..i * 3 + 3];
                assert_eq!(changed, *m == 255, "{kind}: pixel {i}");
            }
        }
    }

    #[test]
    fn a_pasted_region_is_the_donors_surface_along_one_edge() {
        let img = Rgb8 { width: 90, height: 60, data: vec![10; 90 * 60 * 3] };
        let donor = Rgb8 { width: 45, height: 30, data: vec![200; 45 * 30 * 3] };
        let mut edges = std::collections::HashSet::new();
        for seed in 0..12 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let (bad, mask) = paste_region(&img, &donor, &mut rng);
            let marked = mask.iter().filter(|&&m| m == 255).count() as f32 / mask.len() as f32;
            assert!((0.10..0.50).contains(&marked), "seed {seed}: {marked} of the image");
            for (i, m) in mask.iter().enumerate() {
                assert_eq!(bad.data[i * 3], if *m == 255 { 200 } else { 10 }, "seed {seed}: pixel {i}");
            }
            // the band touches exactly one edge's middle
            let at = |x: usize, y: usize| mask[y * 90 + x] == 255;
            let touched = [at(45, 0), at(45, 59), at(0, 30), at(89, 30)];
            assert_eq!(touched.iter().filter(|&&t| t).count(), 1, "seed {seed}: {touched:?}");
            edges.insert(touched.iter().position(|&t| t));
        }
        assert!(edges.len() >= 3, "edges chosen: {edges:?}");
    }
}
