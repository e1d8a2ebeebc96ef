//! Images and their views (paper section 3.2): decoding and PNG encoding, Pillow-exact resize and
//! rotation on 8-bit RGB, brightness/contrast/saturation jitter, and the backbone's input normalization.

use crate::error::{Error, Result};
use std::path::Path;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Largest image side accepted, and pixel count, before decoding allocates anything.
pub const MAX_SIDE: u32 = 20_000;
pub const MAX_PIXELS: u64 = 100_000_000;

/// An 8-bit RGB image, interleaved, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn from_gray(width: usize, height: usize, gray: &[u8]) -> Self {
        Rgb8 { width, height, data: gray.iter().flat_map(|&v| [v, v, v]).collect() }
    }

    /// An image from interleaved 8-bit pixels, row-major, with 1 (grey), 3 (RGB) or 4 (RGBA)
    /// channels, converted as decoding a file is: grey repeated, alpha dropped. The error says
    /// what is wrong with the buffer.
    pub fn from_pixels(data: &[u8], height: usize, width: usize, channels: usize) -> std::result::Result<Self, String> {
        if height == 0 || width == 0 {
            return Err(format!("image has no pixels ({height}x{width})"));
        }
        if height > MAX_SIDE as usize || width > MAX_SIDE as usize || (height as u64) * (width as u64) > MAX_PIXELS {
            return Err(format!("image is {height}x{width}: more than {MAX_SIDE} a side or {MAX_PIXELS} pixels"));
        }
        if ![1, 3, 4].contains(&channels) {
            return Err(format!("{channels} channels: expected 1 (grey), 3 (RGB) or 4 (RGBA)"));
        }
        if data.len() != height * width * channels {
            return Err(format!("{} bytes for {height}x{width}x{channels} pixels", data.len()));
        }
        let data = match channels {
            1 => data.iter().flat_map(|&v| [v, v, v]).collect(),
            3 => data.to_vec(),
            _ => data.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        };
        Ok(Rgb8 { width, height, data })
    }
    /// Channel `c` as a plane (for tests and heat maps).
    pub fn channel(&self, c: usize) -> Vec<u8> {
        self.data.iter().skip(c).step_by(3).copied().collect()
    }
}

/// Decodes any supported file (PNG, JPEG, BMP, TIFF; gray, RGB, RGBA, 16 bit) to 8-bit RGB as
/// PIL's `convert('RGB')` does (alpha dropped). Headers claiming huge sizes are refused first.
pub fn load_rgb(path: &Path) -> Result<Rgb8> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes).map_err(|reason| Error::Image { path: path.to_path_buf(), reason })
}

/// PNG bytes of an image buffer.
pub fn png_bytes<P: image::PixelWithColorType>(img: &image::ImageBuffer<P, Vec<P::Subpixel>>) -> Vec<u8>
where
    [P::Subpixel]: image::EncodableLayout,
{
    let mut buf = std::io::Cursor::new(vec![]);
    img.write_to(&mut buf, image::ImageFormat::Png).expect("PNG encoding into memory");
    buf.into_inner()
}

/// Decodes an in-memory image; the error says what is wrong with it.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<Rgb8, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not a recognised image format (PNG, JPEG, BMP, TIFF)".into());
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| e.to_string())?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image has no pixels".into());
    }
    let rgb = img.to_rgb8();
    Ok(Rgb8 { width: rgb.width() as usize, height: rgb.height() as usize, data: rgb.into_raw() })
}

const PRECISION_BITS: u32 = 22;

/// Pillow's bilinear coefficients for one axis: per output index (first input index, weights).
fn bilinear_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filterscale).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u64 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (f - 0.5) as i32
                    } else {
                        (f + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    ((v + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Bilinear resize exactly as Pillow's 8-bit `Image.resize(size, BILINEAR)`: horizontal pass
/// into an 8-bit intermediate, then vertical; an axis whose size is unchanged is not resampled.
pub fn resize_bilinear(img: &Rgb8, width: usize, height: usize) -> Rgb8 {
    let mut cur = img.clone();
    if width != cur.width {
        let coeffs = bilinear_coeffs(cur.width, width);
        let mut out = vec![0u8; width * cur.height * 3];
        for y in 0..cur.height {
            let row = &cur.data[y * cur.width * 3..(y + 1) * cur.width * 3];
            for (x, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let s: i64 = k.iter().enumerate().map(|(i, &kv)| row[(xmin + i) * 3 + c] as i64 * kv as i64).sum();
                    out[(y * width + x) * 3 + c] = clip8(s);
                }
            }
        }
        cur = Rgb8 { width, height: cur.height, data: out };
    }
    if height != cur.height {
        let coeffs = bilinear_coeffs(cur.height, height);
        let w3 = cur.width * 3;
        let mut out = vec![0u8; w3 * height];
        for (y, (ymin, k)) in coeffs.iter().enumerate() {
            for xc in 0..w3 {
                let s: i64 = k.iter().enumerate().map(|(i, &kv)| cur.data[(ymin + i) * w3 + xc] as i64 * kv as i64).sum();
                out[y * w3 + xc] = clip8(s);
            }
        }
        cur = Rgb8 { width: cur.width, height, data: out };
    }
    cur
}

fn round15(v: f64) -> f64 {
    format!("{v:.15}").parse().unwrap()
}

/// Rotation counter-clockwise by `degrees` about the centre, nearest neighbour, same size, black
/// fill: Pillow's `Image.rotate(angle)` bit for bit (exact transposes for multiples of 90°).
pub fn rotate_nearest(img: &Rgb8, degrees: f64) -> Rgb8 {
    Rgb8 { width: img.width, height: img.height, data: rotate_pixels(&img.data, img.width, img.height, 3, degrees) }
}

/// [`rotate_nearest`] for any interleaved pixel buffer (`channels` values per pixel), e.g. float maps.
pub fn rotate_pixels<T: Copy + Default>(src: &[T], w: usize, h: usize, channels: usize, degrees: f64) -> Vec<T> {
    let angle = degrees.rem_euclid(360.0);
    let px = |x: usize, y: usize| &src[(y * w + x) * channels..(y * w + x + 1) * channels];
    let mut out = vec![T::default(); w * h * channels];
    let exact = angle == 0.0 || angle == 180.0 || ((angle == 90.0 || angle == 270.0) && w == h);
    if exact {
        for i in 0..h {
            for j in 0..w {
                let from = match angle as u32 {
                    0 => px(j, i),
                    90 => px(w - 1 - i, j),
                    180 => px(w - 1 - j, h - 1 - i),
                    _ => px(i, h - 1 - j),
                };
                out[(i * w + j) * channels..(i * w + j + 1) * channels].copy_from_slice(from);
            }
        }
        return out;
    }
    let t = -angle.to_radians();
    let (a, b, d, e) = (round15(t.cos()), round15(t.sin()), round15(-t.sin()), round15(t.cos()));
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let c = a * -cx + b * -cy + cx;
    let f = d * -cx + e * -cy + cy;
    let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
    let (fa, fb, fd, fe) = (fix(a), fix(b), fix(d), fix(e));
    let fc = fix(c + a * 0.5 + b * 0.5);
    let ff = fix(f + d * 0.5 + e * 0.5);
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let xin = (fc + y * fb + x * fa) >> 16;
            let yin = (ff + y * fe + x * fd) >> 16;
            if xin >= 0 && yin >= 0 && (xin as usize) < w && (yin as usize) < h {
                let o = (y as usize * w + x as usize) * channels;
                out[o..o + channels].copy_from_slice(px(xin as usize, yin as usize));
            }
        }
    }
    out
}

/// One colour adjustment of torchvision's `ColorJitter` on a PIL image.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ColorOp {
    Brightness(f32),
    Contrast(f32),
    Saturation(f32),
}

fn luma(p: &[u8]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// PIL `Image.blend(degenerate, img, factor)` with its float arithmetic and truncation.
fn blend(img: &mut Rgb8, factor: f32, degenerate: impl Fn(usize, usize) -> u8) {
    for i in 0..img.width * img.height {
        for c in 0..3 {
            let d = degenerate(i, c) as f32;
            let v = d + factor * (img.data[i * 3 + c] as f32 - d);
            img.data[i * 3 + c] = if v <= 0.0 {
                0
            } else if v >= 255.0 {
                255
            } else {
                v as u8
            };
        }
    }
}

/// Applies the colour adjustments in the given order (PIL `ImageEnhance` semantics).
pub fn color_jitter(img: &Rgb8, ops: &[ColorOp]) -> Rgb8 {
    let mut out = img.clone();
    for op in ops {
        match *op {
            ColorOp::Brightness(f) => blend(&mut out, f, |_, _| 0),
            ColorOp::Contrast(f) => {
                let n = out.width * out.height;
                let sum: u64 = out.data.chunks(3).map(|p| luma(p) as u64).sum();
                let mean = (sum as f64 / n as f64 + 0.5) as u8;
                blend(&mut out, f, |_, _| mean)
            }
            ColorOp::Saturation(f) => {
                let gray: Vec<u8> = out.data.chunks(3).map(luma).collect();
                blend(&mut out, f, |i, _| gray[i])
            }
        }
    }
    out
}

/// Square tiles along the long side of an image, `n` of them (1: the whole image), each the
/// short side wide and spaced evenly from one end to the other (overlapping where the long side
/// is not a multiple of the short one): tall or wide images keep their aspect ratio.
pub fn square_tiles(img: &Rgb8, n: usize) -> Vec<Rgb8> {
    if n <= 1 {
        return vec![img.clone()];
    }
    tile_origins(img.width, img.height, n)
        .into_iter()
        .map(|(x0, y0, side)| {
            let mut data = Vec::with_capacity(side * side * 3);
            for y in y0..y0 + side {
                let row = (y * img.width + x0) * 3;
                data.extend_from_slice(&img.data[row..row + side * 3]);
            }
            Rgb8 { width: side, height: side, data }
        })
        .collect()
}

/// Where the tiles of [`square_tiles`] lie in a width × height image: (x, y, side) of each; one
/// tile of the whole image's short side at (0, 0) when `n` ≤ 1 (that tile is then the whole image).
pub fn tile_origins(width: usize, height: usize, n: usize) -> Vec<(usize, usize, usize)> {
    let side = width.min(height);
    let long = width.max(height);
    let n = n.max(1);
    (0..n)
        .map(|i| {
            let offset = if n == 1 { 0 } else { i * (long - side) / (n - 1) };
            if width >= height {
                (offset, 0, side)
            } else {
                (0, offset, side)
            }
        })
        .collect()
}

/// Width and height from an encoded image's header (no decoding), if it can be read.
pub fn image_size(bytes: &[u8]) -> Option<(usize, usize)> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().ok()?;
    reader.into_dimensions().ok().map(|(w, h)| (w as usize, h as usize))
}

/// Tiles for images of this width and height: the long side over the short side, rounded up,
/// when it is at least 1.5 (KolektorSDD's 500 × 1250 → 3); 1 for images closer to square.
pub fn auto_tiles(width: usize, height: usize) -> usize {
    let (long, short) = (width.max(height), width.min(height).max(1));
    if long * 2 < short * 3 {
        1
    } else {
        long.div_ceil(short)
    }
}

/// How 8-bit pixel values become the network's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputNormalization {
    /// (v/255 − mean) / std with ImageNet's per-channel mean and std (torchvision's models).
    #[default]
    Imagenet,
    /// (v − 127) / 128, the input range the TF-Lite EfficientNet-Lite models were trained on.
    Lite,
}

impl InputNormalization {
    pub fn id(self) -> &'static str {
        match self {
            InputNormalization::Imagenet => "imagenet",
            InputNormalization::Lite => "lite",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "imagenet" => Some(InputNormalization::Imagenet),
            "lite" => Some(InputNormalization::Lite),
            _ => None,
        }
    }
    /// The table `lut[c][v]` of the normalized value of channel c at pixel value v, in f32.
    pub fn lut(self) -> [[f32; 256]; 3] {
        match self {
            InputNormalization::Imagenet => normalize_lut(),
            InputNormalization::Lite => [std::array::from_fn(|v| (v as f32 - 127.0) / 128.0); 3],
        }
    }
}

/// The table `lut[c][v] = (v/255 - mean_c) / std_c` in f32, as `ToTensor` + `Normalize` compute it.
pub fn normalize_lut() -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, value) in table.iter_mut().enumerate() {
            *value = ((v as f32 / 255.0) - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    lut
}

/// Converts to the normalized CHW float tensor data fed to the backbone.
pub fn to_normalized_chw(img: &Rgb8, lut: &[[f32; 256]; 3]) -> Vec<f32> {
    let mut out = vec![0f32; 3 * img.width * img.height];
    to_normalized_chw_into(img, lut, &mut out);
    out
}

/// [`to_normalized_chw`] into `out` (3·width·height values), e.g. one view's part of a batch.
pub fn to_normalized_chw_into(img: &Rgb8, lut: &[[f32; 256]; 3], out: &mut [f32]) {
    let n = img.width * img.height;
    assert_eq!(out.len(), 3 * n, "to_normalized_chw_into: output does not fit a {}x{} image", img.width, img.height);
    let (r, gb) = out.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        r[i] = lut[0][p[0] as usize];
        g[i] = lut[1][p[1] as usize];
        b[i] = lut[2][p[2] as usize];
    }
}

/// One view of an image: a rotation and optional colour jitter (paper eq. 5's T_i).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct View {
    pub degrees: f64,
    pub color: Vec<ColorOp>,
}

impl View {
    pub fn rotation(degrees: f64) -> Self {
        View { degrees, color: vec![] }
    }
    /// Applies this view to an image already resized to the network input size.
    pub fn apply(&self, resized: &Rgb8) -> Rgb8 {
        let rotated = rotate_nearest(resized, self.degrees);
        if self.color.is_empty() {
            rotated
        } else {
            color_jitter(&rotated, &self.color)
        }
    }
}

/// The fixed test views: `n` rotations by i·360/n degrees (official code), no jitter.
pub fn test_views(n: usize) -> Vec<View> {
    (0..n).map(|i| View::rotation(i as f64 * 360.0 / n as f64)).collect()
}

/// Ranges of the random training transforms (paper 4.2).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    pub rotate: bool,
    /// Jitter strength: factors uniform in [1 - x, 1 + x]; 0 disables.
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Augment { rotate: true, brightness: 0.0, contrast: 0.0, saturation: 0.0 }
    }
}

impl Augment {
    /// A random view: uniform rotation in [0, 360) and jitter in random order, like torchvision.
    pub fn sample(&self, rng: &mut impl rand::Rng) -> View {
        use rand::seq::SliceRandom;
        let degrees = if self.rotate { rng.random_range(0.0..360.0) } else { 0.0 };
        let mut color = vec![];
        if self.brightness > 0.0 {
            color.push(ColorOp::Brightness(rng.random_range(1.0 - self.brightness..=1.0 + self.brightness)));
        }
        if self.contrast > 0.0 {
            color.push(ColorOp::Contrast(rng.random_range(1.0 - self.contrast..=1.0 + self.contrast)));
        }
        if self.saturation > 0.0 {
            color.push(ColorOp::Saturation(rng.random_range(1.0 - self.saturation..=1.0 + self.saturation)));
        }
        color.shuffle(rng);
        View { degrees, color }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> Rgb8 {
        Rgb8 { width: w, height: h, data: (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect() }
    }

    #[test]
    fn pixels_convert_as_decoding_the_same_pixels_from_a_png_does() {
        let (w, h) = (5, 3);
        let grey: Vec<u8> = (0..w * h).map(|i| (i * 37 % 256) as u8).collect();
        let rgba: Vec<u8> = (0..w * h * 4).map(|i| (i * 53 % 256) as u8).collect();
        let grey_png = png_bytes(&image::GrayImage::from_raw(w as u32, h as u32, grey.clone()).unwrap());
        let rgba_png = png_bytes(&image::RgbaImage::from_raw(w as u32, h as u32, rgba.clone()).unwrap());
        assert_eq!(Rgb8::from_pixels(&grey, h, w, 1).unwrap().data, decode_rgb(&grey_png).unwrap().data);
        assert_eq!(Rgb8::from_pixels(&rgba, h, w, 4).unwrap().data, decode_rgb(&rgba_png).unwrap().data);
        let rgb = ramp(w, h);
        assert_eq!(Rgb8::from_pixels(&rgb.data, h, w, 3).unwrap().data, rgb.data);
        for (len, hh, ww, c, says) in [(0, 0, 4, 3, "no pixels"), (75, 5, 3, 5, "5 channels"), (10, 5, 3, 1, "10 bytes")] {
            let err = Rgb8::from_pixels(&vec![0; len], hh, ww, c).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn rotations_by_90_compose_to_identity() {
        let img = ramp(6, 6);
        let mut r = img.clone();
        for _ in 0..4 {
            r = rotate_nearest(&r, 90.0);
        }
        assert_eq!(r, img);
        assert_eq!(rotate_nearest(&rotate_nearest(&img, 90.0), 270.0), img);
        assert_eq!(rotate_nearest(&rotate_nearest(&img, 180.0), 180.0), img);
    }

    #[test]
    fn resize_to_same_size_is_identity_and_constant_stays_constant() {
        let img = ramp(5, 7);
        assert_eq!(resize_bilinear(&img, 5, 7), img);
        let flat = Rgb8 { width: 9, height: 4, data: vec![77; 9 * 4 * 3] };
        assert!(resize_bilinear(&flat, 20, 13).data.iter().all(|&v| v == 77));
    }

    #[test]
    fn brightness_one_is_identity() {
        let img = ramp(4, 4);
        assert_eq!(color_jitter(&img, &[ColorOp::Brightness(1.0), ColorOp::Contrast(1.0)]), img);
    }

    #[test]
    fn square_tiles_cover_the_long_side_end_to_end() {
        let img = ramp(4, 10);
        let tiles = square_tiles(&img, 3);
        assert_eq!(tiles.len(), 3);
        // offsets 0, 3, 6 along the height; each tile is the full width, 4 rows
        for (tile, y0) in tiles.iter().zip([0, 3, 6]) {
            assert_eq!((tile.width, tile.height), (4, 4));
            assert_eq!(tile.data[..], img.data[y0 * 4 * 3..(y0 + 4) * 4 * 3]);
        }
        let wide = ramp(9, 3);
        let last = square_tiles(&wide, 2).pop().unwrap();
        assert_eq!(last.data[..3 * 3], wide.data[6 * 3..9 * 3]); // first row, columns 6..9
        assert_eq!(square_tiles(&img, 1), vec![img.clone()]);
        assert_eq!((auto_tiles(500, 1250), auto_tiles(1250, 500), auto_tiles(400, 590), auto_tiles(400, 600)), (3, 3, 1, 2));
    }
}
