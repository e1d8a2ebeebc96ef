//! Winograd F(2×2, 3×3) convolution (Lavin & Gray, CVPR 2016) for AlexNet's 3×3 stride-1
//! layers: per 2×2 outputs, 16 products of a 4×4 input tile instead of 36, as 16 matrix products.
//!
//! y = Aᵀ·[(G·g·Gᵀ) ⊙ (Bᵀ·d·B)]·A for each 4×4 input tile d (stride 2, zero padding 1) and
//! 3×3 kernel g. The kernels' transforms are computed once; per call the input tiles are
//! transformed, the 16 element positions ξ of the tiles become 16 products
//! M_ξ[O, tiles] = U_ξ[O, C]·V_ξ[C, tiles] (`sgemm`), and each tile's 2×2 outputs are taken back.
//! The result equals direct convolution up to float rounding (the transforms use only ±1 and ½).

use crate::sgemm::sgemm;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// One 3×3 convolution (stride 1, padding 1) in the Winograd domain, with its bias.
pub struct Winograd3x3 {
    /// U = G·g·Gᵀ for every (out, in) pair, as 16 matrices [O, C] (ξ = 4·row + column).
    u: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

impl Winograd3x3 {
    /// From torch-layout weights [O, C, 3, 3] (row-major) and bias [O].
    pub fn new(weight: &[f32], bias: &[f32]) -> Self {
        let (o, c) = (bias.len(), weight.len() / 9 / bias.len().max(1));
        assert_eq!(weight.len(), o * c * 9, "Winograd3x3: weight is not [O, C, 3, 3]");
        let mut u = vec![0f32; 16 * o * c];
        // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]] applied to a 3-vector
        let g_times = |a: f32, b: f32, c: f32| [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c];
        for (oc, g) in weight.chunks_exact(9).enumerate() {
            // G·g (4×3), column by column
            let cols: [[f32; 4]; 3] = [g_times(g[0], g[3], g[6]), g_times(g[1], g[4], g[7]), g_times(g[2], g[5], g[8])];
            // (G·g)·Gᵀ (4×4), row by row
            for i in 0..4 {
                for (j, v) in g_times(cols[0][i], cols[1][i], cols[2][i]).into_iter().enumerate() {
                    u[(i * 4 + j) * o * c + oc] = v;
                }
            }
        }
        Winograd3x3 { u, bias: bias.to_vec(), inputs: c }
    }

    fn outputs(&self) -> usize {
        self.bias.len()
    }

    /// relu(conv3x3(x) + b) of a batch x [n, C, h, w] into `out` [n, O, h, w]; `parallel`
    /// spreads the transforms and the 16 products over the threads.
    fn forward(&self, x: &[f32], (n, h, w): (usize, usize, usize), out: &mut [f32], sc: &mut Scratch, parallel: bool) {
        let (c, o) = (self.inputs, self.outputs());
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let cols = n * th * tw;
        let tiles = Tiles { h, w, th, tw, cols };
        let Scratch { v, m, split } = sc;
        // V: [C][16][cols]: each channel's 16 transformed rows (every value written below)
        v.resize(c * 16 * cols, 0.0);
        let input_job = |(ci, rows): (usize, &mut [f32]), split: &mut Vec<f32>| {
            for b in 0..n {
                let plane = &x[(b * c + ci) * h * w..(b * c + ci + 1) * h * w];
                #[cfg(target_arch = "x86_64")]
                if crate::ops::has_avx2_fma() {
                    // SAFETY: the features were detected on this processor.
                    unsafe { tiles.input_transform_avx2(plane, split, rows, b) };
                    continue;
                }
                tiles.input_transform(plane, split, rows, b);
            }
        };
        if parallel {
            v.par_chunks_mut(16 * cols).enumerate().for_each_init(Vec::new, |split, job| input_job(job, split));
        } else {
            v.chunks_mut(16 * cols).enumerate().for_each(|job| input_job(job, split));
        }
        // M_ξ = U_ξ · V_ξ: [16][O][cols]
        m.resize(16 * o * cols, 0.0);
        let v = &*v;
        let product = |(xi, prod): (usize, &mut [f32])| {
            sgemm(o, cols, c, prod, false, (&self.u[xi * o * c..], c, 1), (&v[xi * cols..], 16 * cols, 1));
        };
        if parallel {
            m.par_chunks_mut(o * cols).enumerate().for_each(product);
        } else {
            m.chunks_mut(o * cols).enumerate().for_each(product);
        }
        // outputs: Aᵀ·M·A per tile, + bias, ReLU
        let m = &*m;
        let output_job = |(bo, plane): (usize, &mut [f32]), rows: &mut Vec<f32>| {
            let (b, oi) = (bo / o, bo % o);
            let first = oi * cols + b * th * tw;
            #[cfg(target_arch = "x86_64")]
            if crate::ops::has_avx2_fma() {
                // SAFETY: the features were detected on this processor.
                return unsafe { tiles.output_transform_avx2(m, o * cols, first, self.bias[oi], plane, rows) };
            }
            tiles.output_transform(m, o * cols, first, self.bias[oi], plane, rows);
        };
        if parallel {
            out.par_chunks_mut(h * w).enumerate().for_each_init(Vec::new, |rows, job| output_job(job, rows));
        } else {
            out.chunks_mut(h * w).enumerate().for_each(|job| output_job(job, split));
        }
    }
}

/// Buffers of one [`Winograd3x3::forward`] call, kept per thread between calls.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    split: Vec<f32>,
}

/// Tile geometry of one call: h×w maps, th×tw tiles of 2×2 outputs each, `cols` tiles in all.
#[derive(Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    cols: usize,
}

impl Tiles {
    /// [`Self::input_transform`] compiled for AVX2 (its loops over the tiles of a row vectorize).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn input_transform_avx2(&self, plane: &[f32], split: &mut Vec<f32>, rows: &mut [f32], b: usize) {
        self.input_transform(plane, split, rows, b)
    }

    /// [`Self::output_transform`] compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn output_transform_avx2(&self, m: &[f32], stride: usize, first: usize, bias: f32, plane: &mut [f32], pairs: &mut Vec<f32>) {
        self.output_transform(m, stride, first, bias, plane, pairs)
    }

    /// Bᵀ·d·B of every 4×4 tile of one image's channel plane into the 16 rows `rows[ξ·cols ..]`
    /// at image b's columns. `split` is scratch for the zero-padded plane with its even and odd
    /// columns apart, so that the tiles of a row of tiles are read as contiguous runs (tile tx
    /// reads padded columns 2tx..2tx+3 = even[tx], odd[tx], even[tx+1], odd[tx+1]).
    #[inline(always)]
    fn input_transform(&self, plane: &[f32], split: &mut Vec<f32>, rows: &mut [f32], b: usize) {
        let Tiles { h, w, th, tw, cols } = *self;
        let half = tw + 1; // (2tw + 2) padded columns, half of them even
        split.clear();
        split.resize(2 * (2 * th + 2) * half, 0.0);
        for y in 0..h {
            let (even, odd) = split[2 * (y + 1) * half..2 * (y + 2) * half].split_at_mut(half);
            // padded column x + 1 holds input column x
            for (x, &v) in plane[y * w..(y + 1) * w].iter().enumerate() {
                if (x + 1) % 2 == 0 { even[(x + 1) / 2] = v } else { odd[(x + 1) / 2] = v }
            }
        }
        for ty in 0..th {
            let row = |r: usize| {
                let at = 2 * (2 * ty + r) * half;
                (&split[at..at + half], &split[at + half..at + 2 * half])
            };
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            let col = b * th * tw + ty * tw;
            let out: [&mut [f32]; 16] = split_rows(rows, cols, col, tw);
            for tx in 0..tw {
                // d·B on each of the 4 rows: columns a − c, b + c, c − b, b − d
                let db = |(e, o): (&[f32], &[f32])| {
                    let (a, b, c, d) = (e[tx], o[tx], e[tx + 1], o[tx + 1]);
                    [a - c, b + c, c - b, b - d]
                };
                let (p0, p1, p2, p3) = (db(r0), db(r1), db(r2), db(r3));
                // Bᵀ·(d·B): rows p0 − p2, p1 + p2, p2 − p1, p1 − p3
                for j in 0..4 {
                    out[j][tx] = p0[j] - p2[j];
                    out[4 + j][tx] = p1[j] + p2[j];
                    out[8 + j][tx] = p2[j] - p1[j];
                    out[12 + j][tx] = p1[j] - p3[j];
                }
            }
        }
    }

    /// Aᵀ·M·A of every tile of one output channel (its products at `m[ξ·stride + first + tile]`),
    /// plus `bias`, through ReLU, into the h×w `plane` (tiles cut at odd edges). Each step runs
    /// over a whole row of tiles (contiguous, so it vectorizes); `scratch` holds 12 such rows.
    #[inline(always)]
    fn output_transform(&self, m: &[f32], stride: usize, first: usize, bias: f32, plane: &mut [f32], scratch: &mut Vec<f32>) {
        let Tiles { h, w, th, tw, .. } = *self;
        scratch.clear();
        scratch.resize(12 * tw, 0.0);
        for ty in 0..th {
            let run = |xi: usize| &m[xi * stride + first + ty * tw..xi * stride + first + (ty + 1) * tw];
            // Aᵀ·M: rows m0 + m1 + m2 and m1 − m2 − m3, for each of the 4 columns c
            let (s, out) = scratch.split_at_mut(8 * tw);
            for (c, (s0, s1)) in s.chunks_exact_mut(2 * tw).map(|p| p.split_at_mut(tw)).enumerate() {
                let (m0, m1, m2, m3) = (run(c), run(4 + c), run(8 + c), run(12 + c));
                for tx in 0..tw {
                    s0[tx] = m0[tx] + m1[tx] + m2[tx];
                    s1[tx] = m1[tx] - m2[tx] - m3[tx];
                }
            }
            // (Aᵀ·M)·A: columns s0 + s1 + s2 and s1 − s2 − s3, for both rows r
            let col = |c: usize, r: usize| &s[(2 * c + r) * tw..(2 * c + r + 1) * tw];
            for (r, lr) in out.chunks_exact_mut(2 * tw).enumerate() {
                let y = 2 * ty + r;
                if y >= h {
                    break;
                }
                let (left, right) = lr.split_at_mut(tw);
                let (c0, c1, c2, c3) = (col(0, r), col(1, r), col(2, r), col(3, r));
                for tx in 0..tw {
                    left[tx] = (c0[tx] + c1[tx] + c2[tx] + bias).max(0.0);
                    right[tx] = (c1[tx] - c2[tx] - c3[tx] + bias).max(0.0);
                }
                let row = &mut plane[y * w..(y + 1) * w];
                for (pair, (l, r)) in row.chunks_mut(2).zip(left.iter().zip(right.iter())) {
                    pair[0] = *l;
                    if let Some(v) = pair.get_mut(1) {
                        *v = *r;
                    }
                }
            }
        }
    }
}

/// The 16 runs `rows[ξ·cols + col .. + len]` as separate mutable slices.
fn split_rows(rows: &mut [f32], cols: usize, col: usize, len: usize) -> [&mut [f32]; 16] {
    let mut rest = rows;
    let mut runs: [&mut [f32]; 16] = Default::default();
    for run in runs.iter_mut() {
        let taken = std::mem::take(&mut rest);
        let (this, next) = taken.split_at_mut(cols.min(taken.len()));
        *run = &mut this[col..col + len];
        rest = next;
    }
    runs
}

impl CustomOp1 for Winograd3x3 {
    fn name(&self) -> &'static str {
        "winograd3x3"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = st else { candle_core::bail!("winograd3x3: only f32 tensors are supported") };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("winograd3x3: input must be contiguous") };
        let (n, c, h, w) = l.shape().dims4()?;
        if c != self.inputs {
            candle_core::bail!("winograd3x3: input has {c} channels, the weights {}", self.inputs)
        }
        let (x, o) = (&data[a..b], self.outputs());
        let mut out = vec![0f32; n * o * h * w];
        thread_local! {
            // the transformed tiles and products (tens of MB), kept per thread so their pages
            // are not faulted in anew for every call
            static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
        }
        // the whole batch at once (the 16 products as wide as possible), spread over the threads
        // unless called from a job that already has its own
        let parallel = rayon::current_thread_index().is_none();
        SCRATCH.with_borrow_mut(|sc| self.forward(x, (n, h, w), &mut out, sc, parallel));
        Ok((CpuStorage::F32(out), Shape::from((n, o, h, w))))
    }
}

/// relu(conv2d(x, g, padding 1) + bias) for 3×3 kernels in the Winograd domain. No gradient.
pub fn conv3x3_relu(x: &Tensor, weights: &Winograd3x3) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_direct_convolution_for_even_odd_and_tiny_maps() -> Result<()> {
        let dev = &Device::Cpu;
        let (o, c) = (5, 7);
        let g: Vec<f32> = (0..o * c * 9).map(|i| ((i * 37 % 101) as f32 - 50.0) / 80.0).collect();
        let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.3 - 0.6).collect();
        let wg = Winograd3x3::new(&g, &bias);
        for (n, h, w) in [(2, 6, 6), (1, 13, 13), (3, 27, 27), (1, 5, 8), (2, 1, 1), (1, 2, 3)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), dev)?;
            let want = x
                .conv2d(&Tensor::from_slice(&g, (o, c, 3, 3), dev)?, 1, 1, 1, 1)?
                .broadcast_add(&Tensor::from_slice(&bias, (1, o, 1, 1), dev)?)?
                .relu()?;
            let got = conv3x3_relu(&x, &wg)?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "{n}x{c}x{h}x{w}: max error {err}");
            assert!(want.flatten_all()?.max(0)?.to_scalar::<f32>()? > 0.5, "the check sees real values");
        }
        Ok(())
    }
}
