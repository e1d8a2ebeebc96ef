//! Winograd minimal filtering (Lavin & Gray, CVPR 2016) for AlexNet's layers, on 6×6 input tiles:
//! F(4×4, 3×3) for conv3-5 and F(2×2, 5×5) for conv2, 36 products per tile; conv1 (11×11, stride
//! 4) as a 3×3 F(4×4, 3×3) over its 4×4 phase planes ([`PhaseSplitConv`]).
//!
//! y = Aᵀ·[(G·g·Gᵀ) ⊙ (Bᵀ·d·B)]·A for each 6×6 input tile d (stride m, the outputs per tile
//! side; m + k − 1 = 6) and k×k kernel g. The matrices come from the interpolation points
//! {0, 1, −1, 2, −2, ∞} (Toom-Cook: G evaluates the kernel there, Bᵀ is the transposed
//! interpolation, Aᵀ the transposed evaluation of the output; see [`BT`]). The kernels' transforms
//! are computed once (in f64); per call the input tiles are transformed, the 36 element positions
//! ξ of the tiles become 36 products M_ξ[O, tiles] = U_ξ[O, C]·V_ξ[C, tiles] (`sgemm`), and each
//! tile's m×m outputs are taken back. Both transforms run over whole planes, not tile by tile:
//! the padded plane is split into its m×m polyphase sub-planes (rows and columns by their residue
//! mod m), where element (r, j) of every tile is one run shifted by (r / m, j / m), so every step
//! is a long vectorizable run. The result equals direct convolution up to float rounding.

use crate::kernels::sgemm::sgemm;
use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

/// Input tile side: m + k − 1 for both F(4×4, 3×3) and F(2×2, 5×5).
const ALPHA: usize = 6;
/// Element positions ξ = 6·row + column of a tile: one matrix product each.
const XI: usize = ALPHA * ALPHA;
/// The finite interpolation points (the sixth is ∞).
const POINTS: [f64; ALPHA - 1] = [0.0, 1.0, -1.0, 2.0, -2.0];

/// Bᵀ of both variants (the same six points): row j < 5 holds the coefficients (ascending) of
/// Π_{l≠j} (x − p_l), row 5 those of Π_l (x − p_l): the Lagrange interpolation, transposed, each
/// row scaled by its denominator Π_{l≠j} (p_j − p_l), which G divides out (so Bᵀ stays in small
/// integers). Written out so the kernels see constants; `matrices_follow_from_the_points` derives them.
const BT: [[f32; ALPHA]; ALPHA] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
/// Aᵀ of F(4×4, 3×3): p_jⁱ for i < 4, and 1 in the last row's ∞ column.
const AT_4: [[f32; ALPHA]; 4] =
    [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -2.0, 0.0], [0.0, 1.0, 1.0, 4.0, 4.0, 0.0], [0.0, 1.0, -1.0, 8.0, -8.0, 1.0]];
/// Aᵀ of F(2×2, 5×5).
const AT_2: [[f32; ALPHA]; 2] = [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -2.0, 1.0]];

/// G (6×k) of F(m, k) on [`POINTS`] and ∞: p_jᵗ / Π_{l≠j} (p_j − p_l), and 1 at the last tap of
/// the ∞ row (the kernel evaluated at the points, with the interpolation's denominators).
fn kernel_transform(k: usize) -> Vec<Vec<f64>> {
    let denominator = |j: usize| -> f64 { POINTS.iter().enumerate().filter(|(l, _)| *l != j).map(|(_, &p)| POINTS[j] - p).product() };
    (0..ALPHA)
        .map(|j| {
            (0..k)
                .map(|t| {
                    if j < ALPHA - 1 {
                        POINTS[j].powi(t as i32) / denominator(j)
                    } else if t == k - 1 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// One k×k convolution (k = 3 or 5, stride 1, padding up to (k − 1)/2) in the Winograd domain.
pub struct WinogradConv {
    /// U = G·g·Gᵀ of every (out, in) kernel, as 36 matrices [O, C] (ξ = 6·row + column).
    u: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    kernel: usize,
    /// Zero padding on each side: (k − 1)/2 keeps the map's size, 0 is a "valid" convolution.
    pad: usize,
}

impl WinogradConv {
    /// Kernel sizes this lowering takes.
    pub fn supports(k: usize, stride: usize, pad: usize) -> bool {
        (k == 3 || k == 5) && stride == 1 && 2 * pad + 1 == k
    }

    /// From torch-layout weights [O, C, k, k] (row-major) and bias [O], padding (k − 1)/2.
    pub fn new(weight: &[f32], bias: &[f32], k: usize) -> Self {
        Self::with_padding(weight, bias, k, (k - 1) / 2)
    }

    /// [`Self::new`] with `pad` ≤ (k − 1)/2 zeros on each side: maps of h×w give
    /// (h + 2·pad − k + 1)×(w + 2·pad − k + 1).
    pub fn with_padding(weight: &[f32], bias: &[f32], k: usize, pad: usize) -> Self {
        assert!(k == 3 || k == 5, "WinogradConv: kernels of 3 or 5, not {k}");
        assert!(2 * pad < k, "WinogradConv: padding {pad} of a {k}x{k} kernel");
        let (o, c) = (bias.len(), weight.len() / (k * k) / bias.len().max(1));
        assert_eq!(weight.len(), o * c * k * k, "WinogradConv: weight is not [O, C, {k}, {k}]");
        let g = kernel_transform(k);
        let mut u = vec![0f32; XI * o * c];
        for (oc, kernel) in weight.chunks_exact(k * k).enumerate() {
            // G·g (6×k), then (G·g)·Gᵀ (6×6), in f64
            let gk: Vec<f64> = (0..ALPHA * k).map(|at| (0..k).map(|s| g[at / k][s] * kernel[s * k + at % k] as f64).sum()).collect();
            for (a, b) in (0..ALPHA).flat_map(|a| (0..ALPHA).map(move |b| (a, b))) {
                let v: f64 = (0..k).map(|t| gk[a * k + t] * g[b][t]).sum();
                u[(a * ALPHA + b) * o * c + oc] = v as f32;
            }
        }
        WinogradConv { u, bias: bias.to_vec(), inputs: c, kernel: k, pad }
    }

    fn outputs(&self) -> usize {
        self.bias.len()
    }

    /// Output side of an input side (0 where the map is smaller than the kernel).
    fn output_side(&self, side: usize) -> usize {
        (side + 2 * self.pad + 1).saturating_sub(self.kernel)
    }

    /// relu(conv(x) + b) of each input batch x [n, C, h, w] into its `out` [n, O, oh, ow], the
    /// tiles of all inputs side by side in one set of 36 products; `parallel` spreads the
    /// transforms and the products over the threads.
    fn forward(&self, inputs: &[InputMaps], outs: &mut [Vec<f32>], sc: &mut Scratch, parallel: bool) {
        match self.kernel {
            3 => self.forward_tiles(&AT_4, inputs, outs, sc, parallel),
            _ => self.forward_tiles(&AT_2, inputs, outs, sc, parallel),
        }
    }

    /// [`Self::forward`] with tiles of M×M outputs and their Aᵀ.
    fn forward_tiles<const M: usize>(
        &self,
        at: &[[f32; ALPHA]; M],
        inputs: &[InputMaps],
        outs: &mut [Vec<f32>],
        sc: &mut Scratch,
        parallel: bool,
    ) {
        let (c, o) = (self.inputs, self.outputs());
        // a tile reaches (6 − 1) / M sub-plane rows and columns beyond its own
        let reach = (ALPHA - 1) / M;
        // each input's geometry and its first column among all tiles
        let mut cols = 0;
        let mut groups: Vec<(Tiles, usize, usize)> = inputs
            .iter()
            .map(|&(_, (n, h, w))| {
                let (oh, ow) = (self.output_side(h), self.output_side(w));
                let (th, tw) = (oh.div_ceil(M), ow.div_ceil(M));
                let first = cols;
                cols += n * th * tw;
                (Tiles { pad: self.pad, h, w, oh, ow, th, tw, hq: th + reach, wq: tw + reach, cols: 0 }, first, n)
            })
            .collect();
        groups.iter_mut().for_each(|(tiles, _, _)| tiles.cols = cols);
        let Scratch { v, m: products, products_zero, planes } = sc;
        // V: [C][36][cols]: each channel's 36 transformed rows (every value written below)
        let v = grown(v, c * XI * cols);
        let input_job = |(ci, rows): (usize, &mut [f32]), planes: &mut Vec<f32>| {
            for (&(x, _), &(tiles, first, n)) in inputs.iter().zip(&groups) {
                let hw = tiles.h * tiles.w;
                for b in 0..n {
                    let plane = &x[(b * c + ci) * hw..(b * c + ci + 1) * hw];
                    let first = first + b * tiles.th * tiles.tw;
                    #[cfg(target_arch = "x86_64")]
                    if crate::kernels::has_avx2_fma() {
                        // SAFETY: the features were detected on this processor.
                        unsafe { tiles.input_transform_avx2::<M>(plane, planes, rows, first) };
                        continue;
                    }
                    tiles.input_transform::<M>(plane, planes, rows, first);
                }
            }
        };
        if parallel {
            v.par_chunks_mut(XI * cols).enumerate().for_each_init(Vec::new, |planes, job| input_job(job, planes));
        } else {
            v.chunks_mut(XI * cols).enumerate().for_each(|job| input_job(job, planes));
        }
        // M_ξ = U_ξ · V_ξ: [36][O][cols], added to zeros: with β = 0, OpenBLAS would first
        // write zeros over all of M in a pass of its own (tens of MB); the output pass below
        // zeroes each row instead right after reading it, while it is in cache
        if !*products_zero {
            products.fill(0.0);
        }
        *products_zero = false;
        let products = grown(products, XI * o * cols);
        let v = &*v;
        let product = |(xi, prod): (usize, &mut [f32])| {
            sgemm(o, cols, c, prod, true, (&self.u[xi * o * c..], c, 1), (&v[xi * cols..], XI * cols, 1));
        };
        if parallel {
            products.par_chunks_mut(o * cols).enumerate().for_each(product);
        } else {
            products.chunks_mut(o * cols).enumerate().for_each(product);
        }
        // outputs: one job per output channel, Aᵀ·M·A of all its tiles at once (its 36 rows
        // M_ξ[o] are runs over every column), + bias, ReLU, into its plane of each image
        let mut channels: Vec<(Vec<&mut [f32]>, Vec<OutputPlane>)> = (0..o).map(|_| (Vec::with_capacity(XI), Vec::new())).collect();
        for (row, values) in products.chunks_mut(cols).enumerate() {
            channels[row % o].0.push(values);
        }
        for (out, &(tiles, first, _)) in outs.iter_mut().zip(&groups) {
            for (bo, plane) in out.chunks_mut(tiles.oh * tiles.ow).enumerate() {
                channels[bo % o].1.push((tiles, first + bo / o * tiles.th * tiles.tw, plane));
            }
        }
        let output_job = |(oi, (mut rows, mut planes)): (usize, (Vec<&mut [f32]>, Vec<OutputPlane>)), scratch: &mut Vec<f32>| {
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::has_avx2_fma() {
                // SAFETY: the features were detected on this processor.
                return unsafe { output_channel_avx2(at, &mut rows, self.bias[oi], &mut planes, scratch) };
            }
            output_channel(at, &mut rows, self.bias[oi], &mut planes, scratch);
        };
        if parallel {
            channels.into_par_iter().enumerate().for_each_init(Vec::new, |scratch, job| output_job(job, scratch));
        } else {
            channels.into_iter().enumerate().for_each(|job| output_job(job, planes));
        }
        *products_zero = true;
    }
}

/// One input batch of a [`WinogradConv::forward`] call: its values [n, C, h, w] and (n, h, w).
type InputMaps<'a> = (&'a [f32], (usize, usize, usize));

/// Buffers of one [`WinogradConv::forward`] call, kept per thread between calls.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    /// Every value of `m` is 0 (false while a call is under way, or after one was cut short).
    products_zero: bool,
    planes: Vec<f32>,
}

/// The first `len` values of `buffer`, grown (with zeros) to hold them if needed. Never shrunk, so
/// that the next call with a larger layer does not fill the buffer anew (the callers overwrite
/// every value they read, except the products, which rely on `Scratch::products_zero`).
fn grown(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// Tile geometry of one call: h×w maps padded by `pad`, oh×ow outputs in th×tw tiles of M×M
/// each, the padded plane's M×M sub-planes hq×wq each, `cols` tiles in the batch.
#[derive(Clone, Copy)]
struct Tiles {
    pad: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    th: usize,
    tw: usize,
    hq: usize,
    wq: usize,
    cols: usize,
}

/// dst[i][q] = Σ_j coef[i][j]·src[j][q] for q < len, in one pass over the six source runs. The
/// coefficients are constants where this is inlined, so the zero terms compile away. The runs go
/// in blocks of 8, then 4, then 1 values through local arrays, which the compiler turns into
/// vector registers (working on the slices directly, it would have to check that no destination
/// overlaps a source, and gives up beyond a few such checks).
#[inline(always)]
fn transform_runs<const N: usize>(coef: &[[f32; ALPHA]; N], src: [&[f32]; ALPHA], dst: [&mut [f32]; N], len: usize) {
    let src = src.map(|s| &s[..len]);
    let mut dst = dst.map(|d| &mut d[..len]);
    let mut q = 0;
    while q + 8 <= len {
        transform_block::<N, 8>(coef, &src, &mut dst, q);
        q += 8;
    }
    if q + 4 <= len {
        transform_block::<N, 4>(coef, &src, &mut dst, q);
        q += 4;
    }
    while q < len {
        transform_block::<N, 1>(coef, &src, &mut dst, q);
        q += 1;
    }
}

/// [`transform_runs`] of the L values from q on.
#[inline(always)]
fn transform_block<const N: usize, const L: usize>(coef: &[[f32; ALPHA]; N], src: &[&[f32]; ALPHA], dst: &mut [&mut [f32]; N], q: usize) {
    let mut d = [[0f32; L]; ALPHA];
    for (d, s) in d.iter_mut().zip(src) {
        d.copy_from_slice(&s[q..q + L]);
    }
    for (row, out) in coef.iter().zip(dst.iter_mut()) {
        // −0 + x = x for every x, so the first term needs no special case
        let mut acc = [-0.0f32; L];
        for (&c, v) in row.iter().zip(&d) {
            if c != 0.0 {
                for (a, v) in acc.iter_mut().zip(v) {
                    *a += c * v;
                }
            }
        }
        out[q..q + L].copy_from_slice(&acc);
    }
}

impl Tiles {
    /// [`Self::input_transform`] compiled for AVX2 (its runs vectorize).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn input_transform_avx2<const M: usize>(&self, plane: &[f32], scratch: &mut Vec<f32>, rows: &mut [f32], first: usize) {
        self.input_transform::<M>(plane, scratch, rows, first)
    }

    /// Bᵀ·d·B of every 6×6 tile of one image's channel plane into the 36 rows `rows[ξ·cols ..]`,
    /// from column `first` on. The zero-padded plane is laid out as its M×M sub-planes (padded
    /// (Y, X) at sub-plane (Y mod M, X mod M), place (Y / M, X / M)); tile (ty, tx)'s element
    /// (r, j) is then sub-plane (r mod M, j mod M) at (ty + r / M, tx + j / M), so each
    /// transform step is one run over all tiles (the last `reach` columns of each sub-plane row
    /// start no tile and compute values nobody reads).
    #[inline(always)]
    fn input_transform<const M: usize>(&self, plane: &[f32], scratch: &mut Vec<f32>, rows: &mut [f32], first: usize) {
        let Tiles { pad, h, w, th, tw, hq, wq, cols, .. } = *self;
        let (sub, reach) = (hq * wq, wq - tw);
        let scratch = grown(scratch, (M * M + ALPHA * M) * sub);
        let (subplanes, row_pass) = scratch.split_at_mut(M * M * sub);
        subplanes.fill(0.0);
        for (y, src) in plane.chunks_exact(w).enumerate().take(h) {
            let yy = y + pad;
            for pj in 0..M {
                // the input columns x with (x + pad) mod M = pj
                let x0 = (pj + M - pad % M) % M;
                let dst = &mut subplanes[((yy % M) * M + pj) * sub + (yy / M) * wq + (x0 + pad) / M..];
                for (d, &v) in dst.iter_mut().zip(src.iter().skip(x0).step_by(M)) {
                    *d = v;
                }
            }
        }
        // d·B along the rows: row_pass[c][pi] = Σ_j Bᵀ[c][j]·subplane(pi, j mod M) shifted by j / M
        let len = sub - reach;
        for pi in 0..M {
            let src = std::array::from_fn(|j| &subplanes[(pi * M + j % M) * sub + j / M..]);
            let mut dst = row_pass.chunks_exact_mut(M * sub).map(|c| &mut c[pi * sub..]);
            transform_runs(&BT, src, std::array::from_fn(|_| dst.next().unwrap()), len);
        }
        // Bᵀ·(d·B) along the columns for each column c of the tiles, one row of tiles at a time
        // (straight into V's rows ξ = (r, c), whose columns hold no `reach` gap)
        for (c, ty) in (0..ALPHA).flat_map(|c| (0..th).map(move |ty| (c, ty))) {
            let src = std::array::from_fn(|i| &row_pass[(c * M + i % M) * sub + (i / M + ty) * wq..]);
            let mut dst = rows.chunks_exact_mut(ALPHA * cols).map(|r| &mut r[c * cols + first + ty * tw..]);
            transform_runs(&BT, src, std::array::from_fn(|_| dst.next().unwrap()), tw);
        }
    }
}

/// One image's plane of an output channel: its tile geometry, its first column among all
/// tiles, its values.
type OutputPlane<'a> = (Tiles, usize, &'a mut [f32]);

/// [`output_channel`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_channel_avx2<const M: usize>(
    at: &[[f32; ALPHA]; M],
    rows: &mut [&mut [f32]],
    bias: f32,
    planes: &mut [OutputPlane],
    scratch: &mut Vec<f32>,
) {
    output_channel(at, rows, bias, planes, scratch)
}

/// Aᵀ·M·A of every tile of one output channel (`rows[ξ]`: its products M_ξ over all columns,
/// left zero once read), plus `bias`, through ReLU, into the planes it covers (tiles cut at the
/// edges). Both passes run over all columns at once; each output row then takes its M values per
/// tile interleaved.
#[inline(always)]
fn output_channel<const M: usize>(
    at: &[[f32; ALPHA]; M],
    rows: &mut [&mut [f32]],
    bias: f32,
    planes: &mut [OutputPlane],
    scratch: &mut Vec<f32>,
) {
    let cols = rows[0].len();
    let (left, out) = grown(scratch, (ALPHA + 1) * M * cols).split_at_mut(ALPHA * M * cols);
    // Aᵀ·M: left[c][p] = Σ_i Aᵀ[p][i]·M_(i, c)
    for (c, left) in left.chunks_exact_mut(M * cols).enumerate() {
        let mut dst = left.chunks_exact_mut(cols);
        transform_runs(at, std::array::from_fn(|i| &*rows[i * ALPHA + c]), std::array::from_fn(|_| dst.next().unwrap()), cols);
    }
    rows.iter_mut().for_each(|row| row.fill(0.0));
    // (Aᵀ·M)·A: output (p, q) of every tile = Σ_c Aᵀ[q][c]·left[c][p], + bias, ReLU
    for p in 0..M {
        let mut dst = out.chunks_exact_mut(cols);
        transform_runs(at, std::array::from_fn(|c| &left[(c * M + p) * cols..]), std::array::from_fn(|_| dst.next().unwrap()), cols);
        for (tiles, first, plane) in planes.iter_mut() {
            let Tiles { oh: h, ow: w, th, tw, .. } = *tiles;
            for ty in (0..th).take_while(|ty| M * ty + p < h) {
                let src: [&[f32]; M] = std::array::from_fn(|q| &out[q * cols + *first + ty * tw..][..tw]);
                let y = M * ty + p;
                let mut outputs = plane[y * w..(y + 1) * w].chunks_exact_mut(M);
                for (tx, dst) in (&mut outputs).enumerate() {
                    for (q, v) in dst.iter_mut().enumerate() {
                        *v = (src[q][tx] + bias).max(0.0);
                    }
                }
                for (q, v) in outputs.into_remainder().iter_mut().enumerate() {
                    *v = (src[q][w / M] + bias).max(0.0);
                }
            }
        }
    }
}

/// relu(conv2d(x, g, the weights' padding) + bias) of each input in the Winograd domain, the tiles
/// of all inputs in one set of 36 products (so the small maps of the lower scales share the
/// products, and the packing of the transformed kernels, with the large ones). No gradient.
pub fn conv_relu_each(xs: &[Tensor], weights: &WinogradConv) -> Result<Vec<Tensor>> {
    let xs: Vec<Tensor> = xs.iter().map(|x| x.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
    let mut inputs = Vec::with_capacity(xs.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("winograd_conv: CPU tensors only") };
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != weights.inputs {
            candle_core::bail!("winograd_conv: input has {c} channels, the weights {}", weights.inputs)
        }
        inputs.push((crate::kernels::contiguous_f32(cpu, layout, "winograd_conv")?, (n, h, w)));
    }
    let o = weights.outputs();
    // empty maps (no tiles) give empty outputs and take no part
    let out_len = |&(n, h, w): &(usize, usize, usize)| n * o * weights.output_side(h) * weights.output_side(w);
    inputs.retain(|(_, dims)| out_len(dims) > 0);
    let mut outs: Vec<Vec<f32>> = inputs.iter().map(|(_, dims)| vec![0f32; out_len(dims)]).collect();
    if !inputs.is_empty() {
        thread_local! {
            // the transformed tiles and products (tens of MB), kept per thread so their pages
            // are not faulted in anew for every call
            static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
        }
        // spread over the threads unless called from a job that already has its own
        let parallel = rayon::current_thread_index().is_none();
        SCRATCH.with_borrow_mut(|sc| weights.forward(&inputs, &mut outs, sc, parallel));
    }
    drop(guards);
    let mut outs = outs.into_iter();
    xs.iter()
        .map(|x| {
            let (n, _, h, w) = x.dims4()?;
            let out = if out_len(&(n, h, w)) == 0 { vec![] } else { outs.next().unwrap_or_default() };
            Tensor::from_vec(out, (n, o, weights.output_side(h), weights.output_side(w)), x.device())
        })
        .collect()
}

/// [`conv_relu_each`] of one input.
pub fn conv_relu(x: &Tensor, weights: &WinogradConv) -> Result<Tensor> {
    Ok(conv_relu_each(std::slice::from_ref(x), weights)?.remove(0))
}

/// A strided k×k convolution as a stride-1 one that [`WinogradConv`] takes (AlexNet's conv1:
/// 11×11, stride 4 → 3×3 over 3·16 channels, no padding): the zero-padded input split into its
/// s×s phase planes, plane c·s² + s·py + px holding padded pixels (s·i + py, s·j + px) of channel
/// c, and tap (s·a + py, s·b + px) of the kernel at (a, b) of that plane's kernel (zero beyond k),
/// so that y(i, j) = Σ over planes and (a, b) of tap · plane(i + a, j + b).
pub struct PhaseSplitConv {
    kernel: usize,
    stride: usize,
    pad: usize,
    inner: WinogradConv,
}

impl PhaseSplitConv {
    /// Strides and kernel sizes this lowering takes: 3 taps per phase, as F(4×4, 3×3).
    pub fn supports(k: usize, stride: usize, pad: usize) -> bool {
        stride > 1 && k.div_ceil(stride) == 3 && pad < k
    }

    /// From torch-layout weights [O, C, k, k] (row-major) and bias [O].
    pub fn new(weight: &[f32], bias: &[f32], k: usize, stride: usize, pad: usize) -> Self {
        assert!(Self::supports(k, stride, pad), "PhaseSplitConv: {k}x{k}, stride {stride}, padding {pad}");
        let (o, s, taps) = (bias.len(), stride, k.div_ceil(stride));
        let c = weight.len() / (k * k) / o.max(1);
        assert_eq!(weight.len(), o * c * k * k, "PhaseSplitConv: weight is not [O, C, {k}, {k}]");
        let planes = c * s * s;
        let mut phase_weight = vec![0f32; o * planes * taps * taps];
        for (i, &v) in weight.iter().enumerate() {
            let (oc, ky, kx) = (i / (k * k), i / k % k, i % k);
            let plane = (oc % c) * s * s + (ky % s) * s + kx % s;
            phase_weight[(((oc / c) * planes + plane) * taps + ky / s) * taps + kx / s] = v;
        }
        PhaseSplitConv { kernel: k, stride, pad, inner: WinogradConv::with_padding(&phase_weight, bias, taps, 0) }
    }

    /// The phase planes of x [n, C, h, w]: [n, C·s², oh + 2, ow + 2], oh×ow the output's size.
    fn phase_planes(&self, x: &Tensor) -> Result<Tensor> {
        let (s, p, k) = (self.stride, self.pad, self.kernel);
        let x = x.contiguous()?;
        let (n, c, h, w) = x.dims4()?;
        let out_side = |side: usize| if side + 2 * p >= k { (side + 2 * p - k) / s + 1 } else { 0 };
        let (hs, ws) = (out_side(h) + 2, out_side(w) + 2);
        let mut out = vec![0f32; n * c * s * s * hs * ws];
        if h * w > 0 {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("phase planes: CPU tensors only") };
            let src = crate::kernels::contiguous_f32(cpu, layout, "phase planes")?;
            out.par_chunks_mut(s * s * hs * ws).zip(src.par_chunks(h * w)).for_each(|(dst, plane)| {
                for (phase, dst) in dst.chunks_mut(hs * ws).enumerate() {
                    let (py, px) = (phase / s, phase % s);
                    // plane columns j read input column s·j + px − p, where it lies inside
                    let j0 = p.saturating_sub(px).div_ceil(s);
                    let j1 = ws.min((w + p).saturating_sub(px).div_ceil(s));
                    for (i, row) in dst.chunks_mut(ws).enumerate() {
                        let Some(y) = (s * i + py).checked_sub(p).filter(|&y| y < h) else { continue };
                        if j0 < j1 {
                            let src = plane[y * w..(y + 1) * w].iter().skip(s * j0 + px - p).step_by(s);
                            row[j0..j1].iter_mut().zip(src).for_each(|(d, v)| *d = *v);
                        }
                    }
                }
            });
        }
        Tensor::from_vec(out, (n, c * s * s, hs, ws), x.device())
    }

    /// relu(conv2d(x, g, padding, stride) + bias) of each input, all in one Winograd call. No gradient.
    pub fn conv_relu_each(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let planes: Vec<Tensor> = xs.iter().map(|x| self.phase_planes(x)).collect::<Result<_>>()?;
        conv_relu_each(&planes, &self.inner)
    }

    /// [`Self::conv_relu_each`] of one input.
    pub fn conv_relu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.conv_relu_each(std::slice::from_ref(x))?.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// relu(conv2d(x, g) + bias) by candle: the reference.
    fn direct(x: &Tensor, g: &[f32], bias: &[f32], k: usize, pad: usize, stride: usize) -> Result<Tensor> {
        let (o, c, dev) = (bias.len(), x.dim(1)?, x.device());
        x.conv2d(&Tensor::from_slice(g, (o, c, k, k), dev)?, pad, stride, 1, 1)?
            .broadcast_add(&Tensor::from_slice(bias, (1, o, 1, 1), dev)?)?
            .relu()
    }

    /// max |got − want| after checking that the shapes agree and that `want` has a value above
    /// `floor` (so that the comparison sees real values, not a map of zeros after ReLU).
    fn max_error(got: &Tensor, want: &Tensor, floor: f32, case: &str) -> Result<f32> {
        assert_eq!(got.dims(), want.dims(), "{case}");
        assert!(want.flatten_all()?.max(0)?.to_scalar::<f32>()? > floor, "{case}: the check sees real values");
        (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Toom-Cook on the points, independently of the written-out matrices: Bᵀ's rows are the
    /// coefficients of the products Π (x − p_l) over all points but one (and over all), Aᵀ's
    /// columns the powers of each point.
    #[test]
    fn matrices_follow_from_the_points() {
        let product_poly = |skip: Option<usize>| {
            let mut c = vec![1f64];
            for (_, &p) in POINTS.iter().enumerate().filter(|(l, _)| Some(*l) != skip) {
                let mut next = vec![0f64; c.len() + 1];
                for (i, &ci) in c.iter().enumerate() {
                    next[i + 1] += ci;
                    next[i] -= p * ci;
                }
                c = next;
            }
            c
        };
        for (j, row) in BT.iter().enumerate() {
            let mut want = product_poly((j < ALPHA - 1).then_some(j));
            want.resize(ALPHA, 0.0);
            assert_eq!(row.map(f64::from).to_vec(), want, "Bᵀ row {j}");
        }
        let at = |m: usize| -> Vec<Vec<f64>> {
            (0..m)
                .map(|i| {
                    (0..ALPHA)
                        .map(|j| {
                            if j < ALPHA - 1 {
                                POINTS[j].powi(i as i32)
                            } else if i == m - 1 {
                                1.0
                            } else {
                                0.0
                            }
                        })
                        .collect()
                })
                .collect()
        };
        assert_eq!(AT_4.iter().map(|r| r.map(f64::from).to_vec()).collect::<Vec<_>>(), at(4));
        assert_eq!(AT_2.iter().map(|r| r.map(f64::from).to_vec()).collect::<Vec<_>>(), at(2));
    }

    /// The 1-D identity behind the 2-D one: Aᵀ·[(G·g) ⊙ (Bᵀ·d)] is the correlation of d with g.
    #[test]
    fn transforms_compute_the_1d_correlation_exactly() {
        let check = |at: &[[f32; ALPHA]], k: usize| {
            let gt = kernel_transform(k);
            let d: Vec<f64> = (0..ALPHA).map(|i| (i * i) as f64 * 0.5 - 3.0 + i as f64).collect();
            let g: Vec<f64> = (0..k).map(|t| 1.5 - t as f64 * 0.75 + (t * t) as f64 * 0.25).collect();
            let gg: Vec<f64> = gt.iter().map(|row| row.iter().zip(&g).map(|(a, b)| a * b).sum()).collect();
            let bd: Vec<f64> = BT.iter().map(|row| row.iter().zip(&d).map(|(a, b)| *a as f64 * b).sum()).collect();
            for (i, row) in at.iter().enumerate() {
                let got: f64 = (0..ALPHA).map(|j| row[j] as f64 * gg[j] * bd[j]).sum();
                let want: f64 = (0..k).map(|t| g[t] * d[i + t]).sum();
                assert!((got - want).abs() < 1e-9 * want.abs().max(1.0), "F({}, {k}) output {i}: {got} vs {want}", at.len());
            }
        };
        check(&AT_4, 3);
        check(&AT_2, 5);
    }

    /// Maps of three sizes (and an empty one) in one call: each as its own direct convolution.
    /// Both paths: spread over the pool (as every other test) and sequential inside a pool job.
    #[test]
    fn several_inputs_in_one_call_match_their_direct_convolutions() -> Result<()> {
        let dev = &Device::Cpu;
        let (o, c) = (6, 4);
        let bias: Vec<f32> = (0..o).map(|i| 0.2 - i as f32 * 0.1).collect();
        for k in [3, 5] {
            let g: Vec<f32> = (0..o * c * k * k).map(|i| ((i * 29 % 89) as f32 - 44.0) / 70.0).collect();
            let weights = WinogradConv::new(&g, &bias, k);
            let xs: Vec<Tensor> = [(2, 27, 27), (2, 13, 13), (0, 6, 6), (2, 6, 6)]
                .into_iter()
                .map(|(n, h, w)| {
                    Tensor::from_vec((0..n * c * h * w).map(|i| ((i * 41 % 83) as f32 - 40.0) / 25.0).collect(), (n, c, h, w), dev)
                })
                .collect::<Result<_>>()?;
            // from this thread (spread over the pool) and from inside a pool job (sequential)
            let spread = conv_relu_each(&xs, &weights)?;
            let sequential = rayon::join(|| conv_relu_each(&xs, &weights), || ()).0?;
            assert_eq!((spread.len(), sequential.len()), (xs.len(), xs.len()));
            for (x, y) in xs.iter().zip(&spread).chain(xs.iter().zip(&sequential)) {
                let want = direct(x, &g, &bias, k, (k - 1) / 2, 1)?;
                assert_eq!(y.dims(), want.dims());
                if want.elem_count() > 0 {
                    let err = max_error(y, &want, 0.5, &format!("k {k}, {:?}", x.dims()))?;
                    assert!(err < 1e-4, "k {k}, {:?}: max error {err}", x.dims());
                }
            }
        }
        Ok(())
    }

    #[test]
    fn matches_direct_convolution_for_3x3_and_5x5_every_padding_edge_remainder_and_tiny_maps() -> Result<()> {
        let dev = &Device::Cpu;
        let (o, c) = (5, 7);
        let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.3 - 0.6).collect();
        let sizes = [(2, 6, 6), (1, 13, 13), (3, 27, 27), (1, 5, 8), (2, 1, 1), (1, 2, 3), (1, 7, 10), (1, 4, 9), (1, 55, 11)];
        let cases = [(3, 1), (3, 0), (5, 2), (5, 1), (5, 0)];
        for ((k, pad), (n, h, w)) in cases.into_iter().flat_map(|case| sizes.map(|s| (case, s))) {
            let g: Vec<f32> = (0..o * c * k * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 80.0).collect();
            let xv: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
            let x = Tensor::from_vec(xv, (n, c, h, w), dev)?;
            let got = conv_relu(&x, &WinogradConv::with_padding(&g, &bias, k, pad))?;
            if h.min(w) + 2 * pad < k {
                // no output: an empty map of the right shape
                assert_eq!(got.dims(), [n, o, (h + 2 * pad + 1).saturating_sub(k), (w + 2 * pad + 1).saturating_sub(k)]);
                assert_eq!(got.elem_count(), 0);
                continue;
            }
            let case = format!("k {k}, pad {pad}, {n}x{c}x{h}x{w}");
            let err = max_error(&got, &direct(&x, &g, &bias, k, pad, 1)?, 0.5, &case)?;
            assert!(err < 1e-4, "{case}: max error {err}");
        }
        Ok(())
    }

    /// conv1's lowering (and two other strides) against candle's strided conv2d.
    #[test]
    fn phase_split_matches_strided_convolution() -> Result<()> {
        let dev = &Device::Cpu;
        let (o, c) = (6, 3);
        let bias: Vec<f32> = (0..o).map(|i| 0.1 * i as f32 - 0.2).collect();
        let sizes = [(2, 32, 32), (1, 27, 30), (1, 11, 11), (1, 12, 15), (1, 5, 6), (1, 60, 61)];
        for ((k, stride, pad), (n, h, w)) in [(11, 4, 2), (9, 3, 1), (7, 3, 3)].into_iter().flat_map(|case| sizes.map(|s| (case, s))) {
            let g: Vec<f32> = (0..o * c * k * k).map(|i| ((i * 31 % 103) as f32 - 51.0) / 400.0).collect();
            let x = Tensor::from_vec((0..n * c * h * w).map(|i| ((i * 43 % 89) as f32 - 44.0) / 30.0).collect(), (n, c, h, w), dev)?;
            let got = PhaseSplitConv::new(&g, &bias, k, stride, pad).conv_relu(&x)?;
            if h.min(w) + 2 * pad < k {
                assert_eq!(got.elem_count(), 0, "{k}x{k}/{stride} on {h}x{w}");
                continue;
            }
            let case = format!("{k}x{k}/{stride}, pad {pad}, {n}x{c}x{h}x{w}");
            let err = max_error(&got, &direct(&x, &g, &bias, k, pad, stride)?, 0.3, &case)?;
            assert!(err < 1e-4, "{case}: max error {err}");
        }
        Ok(())
    }
}
