//! Small synthetic defect datasets (MVTec layout, masks included, seeded): procedural textures
//! with scratches, spots and cracks (the demo, tests), and parts that arrive in any orientation.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use std::path::Path;

pub const SIZE: usize = 224;
pub const DEFECTS: [&str; 3] = ["scratch", "spot", "crack"];

/// A woven-fabric-like gray texture with random phase, slight illumination change and noise.
// 6.28 and 3.14 are the dataset's definition (not τ and π): other values would change every
// synthetic image and so the demo's figures
#[allow(clippy::approx_constant)]
fn texture(rng: &mut impl Rng) -> Vec<f32> {
    let (px, py) = (rng.random_range(0.0..6.28f32), rng.random_range(0.0..6.28f32));
    let gain = rng.random_range(0.95..1.05f32);
    let mut v = vec![0f32; SIZE * SIZE];
    for y in 0..SIZE {
        for x in 0..SIZE {
            let (fx, fy) = (x as f32, y as f32);
            let weave = (fx * 0.55 + px).sin() * (fy * 0.55 + py).sin();
            let grain = (fx * 0.09 + fy * 0.05 + px).sin() * 0.3;
            v[y * SIZE + x] = gain * (128.0 + 40.0 * weave + 20.0 * grain) + rng.random_range(-6.0..6.0f32);
        }
    }
    v
}

fn stamp(img: &mut [f32], mask: &mut [u8], x: f32, y: f32, r: f32, delta: f32) {
    let (x0, x1) = ((x - r).floor().max(0.0) as usize, ((x + r).ceil() as usize).min(SIZE - 1));
    let (y0, y1) = ((y - r).floor().max(0.0) as usize, ((y + r).ceil() as usize).min(SIZE - 1));
    for yy in y0..=y1 {
        for xx in x0..=x1 {
            if (xx as f32 - x).powi(2) + (yy as f32 - y).powi(2) <= r * r && mask[yy * SIZE + xx] == 0 {
                img[yy * SIZE + xx] += delta;
                mask[yy * SIZE + xx] = 255;
            }
        }
    }
}

/// Paints one defect (each pixel changed at most once); returns its mask.
#[allow(clippy::approx_constant)] // the ranges define the dataset, see `texture`
pub fn paint_defect(img: &mut [f32], kind: &str, rng: &mut impl Rng) -> Vec<u8> {
    let mut mask = vec![0u8; SIZE * SIZE];
    let m = SIZE as f32;
    match kind {
        "scratch" => {
            let (x, y) = (rng.random_range(0.2 * m..0.8 * m), rng.random_range(0.2 * m..0.8 * m));
            let a = rng.random_range(0.0..3.14f32);
            let len = rng.random_range(0.25 * m..0.45 * m);
            for t in 0..(len as usize) {
                let t = t as f32 - len / 2.0;
                stamp(img, &mut mask, x + t * a.cos(), y + t * a.sin(), 1.2, 50.0);
            }
        }
        "spot" => {
            let (x, y) = (rng.random_range(0.25 * m..0.75 * m), rng.random_range(0.25 * m..0.75 * m));
            stamp(img, &mut mask, x, y, rng.random_range(0.05 * m..0.08 * m), -70.0);
        }
        _ => {
            let (mut x, mut y) = (rng.random_range(0.25 * m..0.75 * m), rng.random_range(0.25 * m..0.75 * m));
            let mut a = rng.random_range(0.0..6.28f32);
            for _ in 0..70 {
                a += rng.random_range(-0.5..0.5f32);
                x = (x + a.cos() * 1.5).clamp(2.0, m - 3.0);
                y = (y + a.sin() * 1.5).clamp(2.0, m - 3.0);
                stamp(img, &mut mask, x, y, 1.4, -70.0);
            }
        }
    }
    mask
}

fn save_gray(path: &Path, w: usize, h: usize, v: &[u8]) -> Result<()> {
    std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| Error::io(path, e))?;
    image::GrayImage::from_raw(w as u32, h as u32, v.to_vec())
        .expect("buffer matches size")
        .save(path)
        .map_err(|e| Error::format(path, e.to_string()))
}

fn to_u8(v: &[f32]) -> Vec<u8> {
    v.iter().map(|x| x.round().clamp(0.0, 255.0) as u8).collect()
}

/// Writes `n_train` good training images, `n_test_good` good test images and `n_per_defect`
/// images of each defect type (with masks) under `root`, deterministically from `seed`.
pub fn generate(root: &Path, n_train: usize, n_test_good: usize, n_per_defect: usize, seed: u64) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..n_train {
        save_gray(&root.join(format!("train/good/{i:03}.png")), SIZE, SIZE, &to_u8(&texture(&mut rng)))?;
    }
    for i in 0..n_test_good {
        save_gray(&root.join(format!("test/good/{i:03}.png")), SIZE, SIZE, &to_u8(&texture(&mut rng)))?;
    }
    for kind in DEFECTS {
        for i in 0..n_per_defect {
            let mut img = texture(&mut rng);
            let mask = paint_defect(&mut img, kind, &mut rng);
            save_gray(&root.join(format!("test/{kind}/{i:03}.png")), SIZE, SIZE, &to_u8(&img))?;
            save_gray(&root.join(format!("ground_truth/{kind}/{i:03}_mask.png")), SIZE, SIZE, &mask)?;
        }
    }
    Ok(())
}

/// The defect types of [`generate_parts`].
pub const PART_DEFECTS: [&str; 3] = ["missing_hole", "scratch", "chip"];

/// Whether point (u, v) in the part's own frame (centre at 0, 0) is on the part: a 120 × 52 px
/// plate with rounded ends, two holes (the left one larger) and a notch in its upper edge,
/// so that no rotation maps it onto itself.
fn on_part(u: f32, v: f32, filled_hole: Option<usize>) -> bool {
    let (half_len, half_w) = (60.0f32, 26.0f32);
    let body =
        if u.abs() <= half_len - half_w { v.abs() <= half_w } else { (u.abs() - (half_len - half_w)).powi(2) + v * v <= half_w * half_w };
    let holes = [(-34.0f32, 0.0f32, 11.0f32), (34.0, 0.0, 7.0)];
    let in_hole = holes.iter().enumerate().any(|(k, (hx, hy, r))| Some(k) != filled_hole && (u - hx).powi(2) + (v - hy).powi(2) <= r * r);
    let in_notch = (u - 8.0).abs() <= 7.0 && v <= -half_w + 10.0;
    body && !in_hole && !in_notch
}

/// Renders one part rotated by `angle` and shifted by (dx, dy) on a dark, noisy background;
/// `defect` paints one defect on it and returns its mask.
fn part_image(rng: &mut impl Rng, defect: Option<&str>, fixed_pose: bool) -> (Vec<f32>, Vec<u8>) {
    let angle = rng.random_range(0.0..std::f32::consts::TAU);
    // a fixture: the same draw mapped to ±5°
    let angle = if fixed_pose { (angle / std::f32::consts::TAU - 0.5) * 10f32.to_radians() } else { angle };
    let (dx, dy) = (rng.random_range(-12.0..12.0f32), rng.random_range(-12.0..12.0f32));
    let (ca, sa) = (angle.cos(), angle.sin());
    let c = SIZE as f32 / 2.0;
    let filled = (defect == Some("missing_hole")).then(|| rng.random_range(0..2usize));
    let brightness = rng.random_range(165.0..185.0f32);
    let mut img = vec![0f32; SIZE * SIZE];
    let mut mask = vec![0u8; SIZE * SIZE];
    for y in 0..SIZE {
        for x in 0..SIZE {
            let (px, py) = (x as f32 - c - dx, y as f32 - c - dy);
            let (u, v) = (ca * px + sa * py, -sa * px + ca * py);
            let on = on_part(u, v, None);
            let shade = brightness + 0.15 * u; // light falls off along the part
            img[y * SIZE + x] = if on { shade } else { 35.0 } + rng.random_range(-5.0..5.0f32);
            if filled.is_some() && !on && on_part(u, v, filled) {
                img[y * SIZE + x] = shade + rng.random_range(-5.0..5.0f32);
                mask[y * SIZE + x] = 255;
            }
        }
    }
    match defect {
        Some("scratch") => {
            // a dark line across the plate, in its own frame
            let (u0, v0) = (rng.random_range(-40.0..40.0f32), rng.random_range(-15.0..15.0f32));
            let a = rng.random_range(0.0..std::f32::consts::PI);
            for t in -18..=18 {
                let (u, v) = (u0 + t as f32 * a.cos(), v0 + t as f32 * a.sin());
                if on_part(u, v, None) {
                    let (x, y) = (ca * u - sa * v + c + dx, sa * u + ca * v + c + dy);
                    stamp(&mut img, &mut mask, x, y, 1.3, -80.0);
                }
            }
        }
        Some("chip") => {
            // a bite out of the rim: part pixels within a disk on the edge become background
            let along = rng.random_range(-30.0..30.0f32);
            let side = if rng.random_bool(0.5) { 26.0 } else { -26.0 };
            let (cx, cy) = (ca * along - sa * side + c + dx, sa * along + ca * side + c + dy);
            let r = rng.random_range(7.0..10.0f32);
            for y in 0..SIZE {
                for x in 0..SIZE {
                    let i = y * SIZE + x;
                    if (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) <= r * r && img[i] > 100.0 {
                        img[i] = 35.0 + rng.random_range(-5.0..5.0f32);
                        mask[i] = 255;
                    }
                }
            }
        }
        _ => {}
    }
    (img, mask)
}

/// Writes a synthetic dataset of parts that arrive in any orientation (a plate with two holes
/// and a notch, rotated uniformly and shifted a little; with `fixed_pose`, turned by at most 5°
/// as in a fixture): `n_train` good training images, `n_test_good` good test images and
/// `n_per_defect` of each of [`PART_DEFECTS`] with masks.
pub fn generate_parts(root: &Path, n_train: usize, n_test_good: usize, n_per_defect: usize, seed: u64, fixed_pose: bool) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x9A27_5000);
    for i in 0..n_train {
        save_gray(&root.join(format!("train/good/{i:03}.png")), SIZE, SIZE, &to_u8(&part_image(&mut rng, None, fixed_pose).0))?;
    }
    for i in 0..n_test_good {
        save_gray(&root.join(format!("test/good/{i:03}.png")), SIZE, SIZE, &to_u8(&part_image(&mut rng, None, fixed_pose).0))?;
    }
    for kind in PART_DEFECTS {
        for i in 0..n_per_defect {
            let (img, mask) = part_image(&mut rng, Some(kind), fixed_pose);
            save_gray(&root.join(format!("test/{kind}/{i:03}.png")), SIZE, SIZE, &to_u8(&img))?;
            save_gray(&root.join(format!("ground_truth/{kind}/{i:03}_mask.png")), SIZE, SIZE, &mask)?;
        }
    }
    Ok(())
}
