//! Winograd F(2×2, 3×3) convolution (Lavin & Gray, CVPR 2016) for AlexNet's stride-1 layers:
//! per 2×2 outputs, 16 products of a 4×4 input tile instead of 36 (3×3) or 100 (5×5, as four 3×3).
//!
//! y = Aᵀ·[(G·g·Gᵀ) ⊙ (Bᵀ·d·B)]·A for each 4×4 input tile d (stride 2) and 3×3 kernel g. The
//! kernels' transforms are computed once; per call the input tiles are transformed, the 16
//! element positions ξ of the tiles become 16 products M_ξ[O, tiles] = U_ξ[O, C]·V_ξ[C, tiles]
//! (`sgemm`), and each tile's 2×2 outputs are taken back. A 5×5 kernel is split into four 3×3
//! kernels at offsets (2a, 2b), a, b ∈ {0, 1} (taps assigned once, the rest zero): the part of
//! (a, b) is the 3×3 result at tile (ty + a, tx + b), so M_ξ = Σ_ab U_abξ·V_ξ shifted by that
//! many tiles, on a grid one tile larger than the output's. The result equals direct
//! convolution up to float rounding (the transforms use only ±1 and ½).

use crate::sgemm::sgemm;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// One k×k convolution (k = 3 or 5, stride 1, padding (k − 1)/2) in the Winograd domain.
pub struct WinogradConv {
    /// U = G·g·Gᵀ of each 3×3 part of every (out, in) kernel, as [part][ξ] matrices [O, C]
    /// (ξ = 4·row + column; parts (a, b) in row-major order).
    u: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    /// 3×3 parts per axis: 1 for k = 3, 2 for k = 5.
    parts: usize,
}

impl WinogradConv {
    /// Kernel sizes this lowering takes.
    pub fn supports(k: usize, stride: usize, pad: usize) -> bool {
        (k == 3 || k == 5) && stride == 1 && 2 * pad + 1 == k
    }

    /// From torch-layout weights [O, C, k, k] (row-major) and bias [O].
    pub fn new(weight: &[f32], bias: &[f32], k: usize) -> Self {
        assert!(k == 3 || k == 5, "WinogradConv: kernels of 3 or 5, not {k}");
        let (o, c) = (bias.len(), weight.len() / (k * k) / bias.len().max(1));
        assert_eq!(weight.len(), o * c * k * k, "WinogradConv: weight is not [O, C, {k}, {k}]");
        let parts = (k - 1) / 2;
        // tap ky belongs to part a = min(ky / 2, parts − 1), at row ky − 2a of its 3×3 kernel
        let part_of = |t: usize| (t / 2).min(parts - 1);
        let mut u = vec![0f32; parts * parts * 16 * o * c];
        // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]] applied to a 3-vector
        let g_times = |a: f32, b: f32, c: f32| [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c];
        for (oc, kernel) in weight.chunks_exact(k * k).enumerate() {
            for (pa, pb) in (0..parts).flat_map(|a| (0..parts).map(move |b| (a, b))) {
                let mut g = [0f32; 9];
                for (i, j) in (0..3).flat_map(|i| (0..3).map(move |j| (i, j))) {
                    let (ky, kx) = (2 * pa + i, 2 * pb + j);
                    if ky < k && kx < k && part_of(ky) == pa && part_of(kx) == pb {
                        g[i * 3 + j] = kernel[ky * k + kx];
                    }
                }
                // G·g (4×3), column by column, then (G·g)·Gᵀ (4×4), row by row
                let cols: [[f32; 4]; 3] = [g_times(g[0], g[3], g[6]), g_times(g[1], g[4], g[7]), g_times(g[2], g[5], g[8])];
                let part = (pa * parts + pb) * 16;
                for i in 0..4 {
                    for (j, v) in g_times(cols[0][i], cols[1][i], cols[2][i]).into_iter().enumerate() {
                        u[(part + i * 4 + j) * o * c + oc] = v;
                    }
                }
            }
        }
        WinogradConv { u, bias: bias.to_vec(), inputs: c, parts }
    }

    fn outputs(&self) -> usize {
        self.bias.len()
    }

    /// relu(conv(x) + b) of a batch x [n, C, h, w] into `out` [n, O, h, w]; `parallel`
    /// spreads the transforms and the 16 products over the threads.
    fn forward(&self, x: &[f32], (n, h, w): (usize, usize, usize), out: &mut [f32], sc: &mut Scratch, parallel: bool) {
        let (c, o) = (self.inputs, self.outputs());
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        // input tiles: the output's grid and parts − 1 more in each direction
        let (gh, gw) = (th + self.parts - 1, tw + self.parts - 1);
        let cols = n * gh * gw;
        let tiles = Tiles { h, w, th, tw, gh, gw, pad: self.parts, cols };
        // the products' columns: all tiles but the last ones no output tile reaches
        let last_shift = (self.parts - 1) * (gw + 1);
        let product_cols = cols - last_shift;
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
        // M_ξ = Σ_ab U_abξ · V_ξ shifted by (a, b) tiles: [16][O][product_cols]
        m.resize(16 * o * product_cols, 0.0);
        let v = &*v;
        let product = |(xi, prod): (usize, &mut [f32])| {
            for (part, (a, b)) in (0..self.parts).flat_map(|a| (0..self.parts).map(move |b| (a, b))).enumerate() {
                let u = &self.u[(part * 16 + xi) * o * c..];
                sgemm(o, product_cols, c, prod, part > 0, (u, c, 1), (&v[xi * cols + a * gw + b..], 16 * cols, 1));
            }
        };
        if parallel {
            m.par_chunks_mut(o * product_cols).enumerate().for_each(product);
        } else {
            m.chunks_mut(o * product_cols).enumerate().for_each(product);
        }
        // outputs: Aᵀ·M·A per tile, + bias, ReLU
        let m = &*m;
        let output_job = |(bo, plane): (usize, &mut [f32]), rows: &mut Vec<f32>| {
            let (b, oi) = (bo / o, bo % o);
            let first = oi * product_cols + b * gh * gw;
            #[cfg(target_arch = "x86_64")]
            if crate::ops::has_avx2_fma() {
                // SAFETY: the features were detected on this processor.
                return unsafe { tiles.output_transform_avx2(m, o * product_cols, first, self.bias[oi], plane, rows) };
            }
            tiles.output_transform(m, o * product_cols, first, self.bias[oi], plane, rows);
        };
        if parallel {
            out.par_chunks_mut(h * w).enumerate().for_each_init(Vec::new, |rows, job| output_job(job, rows));
        } else {
            out.chunks_mut(h * w).enumerate().for_each(|job| output_job(job, split));
        }
    }
}

/// Buffers of one [`WinogradConv::forward`] call, kept per thread between calls.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    split: Vec<f32>,
}

/// Tile geometry of one call: h×w maps, th×tw tiles of 2×2 outputs each; the input tiles on a
/// gh×gw grid over the plane padded by `pad`, `cols` of them in the batch.
#[derive(Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    gh: usize,
    gw: usize,
    pad: usize,
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
        let Tiles { h, w, gh, gw, pad, cols, .. } = *self;
        let half = gw + 1; // (2gw + 2) padded columns, half of them even
        split.clear();
        split.resize(2 * (2 * gh + 2) * half, 0.0);
        for y in 0..h {
            let at = 2 * (y + pad) * half;
            let (even, odd) = split[at..at + 2 * half].split_at_mut(half);
            // padded column x + pad holds input column x
            for (x, &v) in plane[y * w..(y + 1) * w].iter().enumerate() {
                let px = x + pad;
                if px % 2 == 0 { even[px / 2] = v } else { odd[px / 2] = v }
            }
        }
        for ty in 0..gh {
            let row = |r: usize| {
                let at = 2 * (2 * ty + r) * half;
                (&split[at..at + half], &split[at + half..at + 2 * half])
            };
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            let col = b * gh * gw + ty * gw;
            let out: [&mut [f32]; 16] = split_rows(rows, cols, col, gw);
            for tx in 0..gw {
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

    /// Aᵀ·M·A of every tile of one output channel (tile (ty, tx)'s products at
    /// `m[ξ·stride + first + ty·gw + tx]`), plus `bias`, through ReLU, into the h×w `plane`
    /// (tiles cut at odd edges). Each step runs over a whole row of tiles (contiguous, so it
    /// vectorizes); `scratch` holds 12 such rows.
    #[inline(always)]
    fn output_transform(&self, m: &[f32], stride: usize, first: usize, bias: f32, plane: &mut [f32], scratch: &mut Vec<f32>) {
        let Tiles { h, w, th, tw, gw, .. } = *self;
        scratch.clear();
        scratch.resize(12 * tw, 0.0);
        for ty in 0..th {
            let run = |xi: usize| &m[xi * stride + first + ty * gw..xi * stride + first + ty * gw + tw];
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

impl CustomOp1 for WinogradConv {
    fn name(&self) -> &'static str {
        "winograd_conv"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::ops::contiguous_f32(st, l, "winograd_conv")?;
        let (n, c, h, w) = l.shape().dims4()?;
        if c != self.inputs {
            candle_core::bail!("winograd_conv: input has {c} channels, the weights {}", self.inputs)
        }
        let o = self.outputs();
        let mut out = vec![0f32; n * o * h * w];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((n, o, h, w))));
        }
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

/// relu(conv2d(x, g, padding (k − 1)/2) + bias) in the Winograd domain. No gradient.
pub fn conv_relu(x: &Tensor, weights: &WinogradConv) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_direct_convolution_for_3x3_and_5x5_on_even_odd_and_tiny_maps() -> Result<()> {
        let dev = &Device::Cpu;
        let (o, c) = (5, 7);
        let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.3 - 0.6).collect();
        let sizes = [(2, 6, 6), (1, 13, 13), (3, 27, 27), (1, 5, 8), (2, 1, 1), (1, 2, 3)];
        for (k, (n, h, w)) in [3, 5].into_iter().flat_map(|k| sizes.map(|s| (k, s))) {
            let g: Vec<f32> = (0..o * c * k * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 80.0).collect();
            let xv: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
            let x = Tensor::from_vec(xv, (n, c, h, w), dev)?;
            let want = x
                .conv2d(&Tensor::from_slice(&g, (o, c, k, k), dev)?, (k - 1) / 2, 1, 1, 1)?
                .broadcast_add(&Tensor::from_slice(&bias, (1, o, 1, 1), dev)?)?
                .relu()?;
            let got = conv_relu(&x, &WinogradConv::new(&g, &bias, k))?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "k {k}, {n}x{c}x{h}x{w}: max error {err}");
            assert!(want.flatten_all()?.max(0)?.to_scalar::<f32>()? > 0.5, "the check sees real values");
        }
        Ok(())
    }
}
