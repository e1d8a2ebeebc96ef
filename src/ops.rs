//! Tensor operations candle lacks, as CPU custom ops: `atan` (with backward), overlapping
//! max-pool with a backward pass, and a fast depthwise convolution.

use crate::sgemm::{sgemm, sgemm_with, Backend::Rust};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The f32 values of a contiguous CPU tensor, or an error naming `op`.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: only f32 tensors are supported") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Whether this processor has AVX2 and FMA (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

struct Atan;

impl CustomOp1 for Atan {
    fn name(&self) -> &'static str {
        "atan"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "atan")?;
        Ok((CpuStorage::F32(x.iter().map(|v| v.atan()).collect()), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d/dx atan(x) = 1 / (1 + x^2)
        Ok(Some(grad.div(&(arg.sqr()? + 1.0)?)?))
    }
}

/// Element-wise arctangent with gradient.
pub fn atan(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Atan)
}

/// Max-pool over NCHW with a square window, no padding, floor mode (torch's `MaxPool2d(k, s)`).
struct MaxPool {
    k: usize,
    s: usize,
}

fn pool_dims(l: &Layout, k: usize, s: usize) -> Result<(usize, usize, usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    if h < k || w < k {
        candle_core::bail!("max_pool: input {h}x{w} smaller than window {k}")
    }
    Ok((n * c, h, w, (h - k) / s + 1, (w - k) / s + 1))
}

/// Index (within the plane) of the first maximum of each window, as PyTorch picks it.
fn argmax_windows(x: &[f32], w: usize, oh: usize, ow: usize, k: usize, s: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(oh * ow);
    for oy in 0..oh {
        for ox in 0..ow {
            let mut best = f32::NEG_INFINITY;
            let mut at = (oy * s) * w + ox * s;
            for ky in 0..k {
                let row = (oy * s + ky) * w;
                for kx in 0..k {
                    let v = x[row + ox * s + kx];
                    if v > best || v.is_nan() {
                        best = v;
                        at = row + ox * s + kx;
                    }
                }
            }
            out.push(at);
        }
    }
    out
}

/// The maximum of each window (NaN when the window holds one, like `argmax_windows`): the
/// column maxima of the window's rows first (contiguous, vectorized), then across columns.
fn max_windows(x: &[f32], w: usize, ow: usize, k: usize, s: usize, out: &mut [f32]) {
    let nan_max = |a: f32, b: f32| if a.is_nan() || b.is_nan() { f32::NAN } else { a.max(b) };
    let mut rows = vec![0f32; w];
    for (oy, dst) in out.chunks_mut(ow).enumerate() {
        rows.copy_from_slice(&x[oy * s * w..(oy * s + 1) * w]);
        for ky in 1..k {
            let r = &x[(oy * s + ky) * w..(oy * s + ky + 1) * w];
            rows.iter_mut().zip(r).for_each(|(m, v)| *m = nan_max(*m, *v));
        }
        for (ox, d) in dst.iter_mut().enumerate() {
            *d = rows[ox * s..ox * s + k].iter().copied().fold(f32::NEG_INFINITY, nan_max);
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "max_pool2d")?;
        let (planes, h, w, oh, ow) = pool_dims(l, self.k, self.s)?;
        let mut out = vec![0f32; planes * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, o)| max_windows(&x[p * h * w..(p + 1) * h * w], w, ow, self.k, self.s, o));
        let (n, c, _, _) = l.shape().dims4()?;
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolBackward { k: self.k, s: self.s })?;
        Ok(Some(g))
    }
}

/// Scatters the output gradient of a max-pool to the argmax of each window.
struct MaxPoolBackward {
    k: usize,
    s: usize,
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max_pool2d_backward"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "max_pool2d_backward")?;
        let g = contiguous_f32(s2, l2, "max_pool2d_backward")?;
        let (planes, h, w, oh, ow) = pool_dims(l1, self.k, self.s)?;
        let mut out = vec![0f32; planes * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(p, o)| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            let gp = &g[p * oh * ow..(p + 1) * oh * ow];
            for (gi, i) in gp.iter().zip(argmax_windows(plane, w, oh, ow, self.k, self.s)) {
                o[i] += gi;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `MaxPool2d(kernel, stride)` (no padding, floor mode) with a backward pass.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool { k: kernel, s: stride })
}

/// Every `factor`-th row and column of each NCHW plane (nearest-neighbour downsampling by an
/// integer factor), planes in parallel. Forward only.
struct Subsample {
    factor: usize,
}

impl CustomOp1 for Subsample {
    fn name(&self) -> &'static str {
        "subsample"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "subsample")?;
        let (n, c, h, w) = l.shape().dims4()?;
        let f = self.factor.max(1);
        let (oh, ow) = (h / f, w / f);
        let mut out = vec![0f32; n * c * oh * ow];
        if oh * ow > 0 {
            out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(dst, plane)| {
                for (y, row) in dst.chunks_exact_mut(ow).enumerate() {
                    let src = &plane[y * f * w..];
                    row.iter_mut().enumerate().for_each(|(x, d)| *d = src[x * f]);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// `x[:, :, ::factor, ::factor]` cut to `size / factor` rows and columns, without gradient.
pub fn subsample(x: &Tensor, factor: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Subsample { factor })
}

/// Sizes of one plane of a direct convolution. The zero-padded input plane (hp × wp) is stored
/// split into `s` column phases (phase r holds padded columns r, r+s, ...; pw columns each), so
/// every tap reads a contiguous run of its input row whatever the stride.
struct PlaneGeometry {
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    pt: usize,
    pl: usize,
    hp: usize,
    pw: usize,
    oh: usize,
    ow: usize,
}

impl PlaneGeometry {
    fn phases_len(&self) -> usize {
        self.s * self.hp * self.pw
    }

    /// Where each tap t = (ky, kx) reads its input row, from the start of an output row's:
    /// the same for every channel, so computed once per plane geometry.
    fn tap_offsets(&self) -> Vec<usize> {
        let PlaneGeometry { k, s, hp, pw, .. } = *self;
        (0..k * k).map(|t| ((t % k) % s * hp + t / k) * pw + (t % k) / s).collect()
    }

    /// Writes the padded, phase-split copy of `plane` into `dst` (resized as needed), each value
    /// passed through `on_copy` (the padding stays zero).
    #[inline(always)]
    fn fill_phases(&self, plane: &[f32], dst: &mut Vec<f32>, on_copy: OnCopy) {
        dst.resize(self.phases_len(), 0.0);
        self.fill_phases_into(plane, dst, on_copy)
    }

    /// [`Self::fill_phases`] into a slice of exactly `phases_len()` values. Only the padding is
    /// zeroed; every other value is written once.
    #[inline(always)]
    fn fill_phases_into(&self, plane: &[f32], dst: &mut [f32], on_copy: OnCopy) {
        let PlaneGeometry { h, w, s, pt, pl, hp, pw, .. } = *self;
        for r in 0..s {
            let phase = &mut dst[r * hp * pw..(r + 1) * hp * pw];
            phase[..pt * pw].fill(0.0);
            phase[(pt + h) * pw..].fill(0.0);
            // the columns j of this phase that hold input columns: pl <= j·s + r < pl + w
            let first = pl.saturating_sub(r).div_ceil(s).min(pw);
            let end = (pl + w).saturating_sub(r).div_ceil(s).min(pw);
            for y in pt..pt + h {
                phase[y * pw..y * pw + first].fill(0.0);
                phase[y * pw + end..(y + 1) * pw].fill(0.0);
            }
        }
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            if s == 1 {
                on_copy.copy(row, &mut dst[(y + pt) * pw + pl..(y + pt) * pw + pl + w]);
                continue;
            }
            if s == 2 {
                // even columns x = 2j go to phase pl % 2 at j + pl/2, odd ones to the other
                let even = ((pl % 2) * hp + y + pt) * pw + pl / 2;
                let odd = (((pl + 1) % 2) * hp + y + pt) * pw + pl.div_ceil(2);
                let (n_even, n_odd) = (w.div_ceil(2), w / 2);
                // the two phases are different planes of dst, so the slices are disjoint
                let (ev, od) = if even < odd {
                    let (a, b) = dst.split_at_mut(odd);
                    (&mut a[even..even + n_even], &mut b[..n_odd])
                } else {
                    let (a, b) = dst.split_at_mut(even);
                    (&mut b[..n_even], &mut a[odd..odd + n_odd])
                };
                deinterleave(row, ev, od, on_copy);
                if w % 2 == 1 {
                    ev[n_even - 1] = on_copy.apply(row[w - 1]);
                }
                continue;
            }
            // input column x sits at padded column x + pl = j·s + r
            for (x, &v) in row.iter().enumerate() {
                let col = x + pl;
                dst[((col % s) * hp + y + pt) * pw + col / s] = on_copy.apply(v);
            }
        }
    }
}

/// What happens to each input value as it is copied into the padded planes: nothing, or the
/// expansion's bias and ReLU6 (`clamp(v + bias, 0, 6)`), applied here so that no pass is spent on it.
#[derive(Clone, Copy)]
enum OnCopy {
    Identity,
    BiasRelu6(f32),
}

impl OnCopy {
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            OnCopy::Identity => v,
            OnCopy::BiasRelu6(b) => (v + b).clamp(0.0, 6.0),
        }
    }

    /// [`Self::apply`] on 8 values (the same results: max then min, as the scalar clamp).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn apply8(self, v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        match self {
            OnCopy::Identity => v,
            OnCopy::BiasRelu6(b) => {
                _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, _mm256_set1_ps(b)), _mm256_setzero_ps()), _mm256_set1_ps(6.0))
            }
        }
    }

    /// dst[i] = apply(src[i]); with AVX2, 8 values at a time.
    #[inline(always)]
    fn copy(self, src: &[f32], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: AVX2 was detected; n is within both slices.
            return unsafe { self.copy_avx2(src, dst, n) };
        }
        for i in 0..n {
            dst[i] = self.apply(src[i]);
        }
    }

    /// [`Self::copy`] of the first `n` values with AVX2.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `n` ≤ both lengths.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn copy_avx2(self, src: &[f32], dst: &mut [f32], n: usize) {
        use std::arch::x86_64::*;
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), self.apply8(_mm256_loadu_ps(src.as_ptr().add(i))));
            i += 8;
        }
        for i in i..n {
            *dst.get_unchecked_mut(i) = self.apply(*src.get_unchecked(i));
        }
    }
}

/// ev[j] = f(row[2j]), od[j] = f(row[2j+1]) for the pairs of `row` (a trailing odd value is
/// left to the caller); with AVX2, 16 values at a time.
#[inline(always)]
fn deinterleave(row: &[f32], ev: &mut [f32], od: &mut [f32], f: OnCopy) {
    let pairs = (row.len() / 2).min(ev.len()).min(od.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 was detected; pairs is within all three slices.
        return unsafe { deinterleave_avx2(row, ev, od, f, pairs) };
    }
    for j in 0..pairs {
        ev[j] = f.apply(row[2 * j]);
        od[j] = f.apply(row[2 * j + 1]);
    }
}

/// [`deinterleave`] of the first `pairs` pairs with AVX2.
///
/// # Safety
/// AVX2 and FMA must be present; 2·pairs ≤ row.len(), pairs ≤ ev.len(), od.len().
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn deinterleave_avx2(row: &[f32], ev: &mut [f32], od: &mut [f32], f: OnCopy, pairs: usize) {
    use std::arch::x86_64::*;
    let mut j = 0;
    // every load reads row[2j..2j+16] with 2j+16 <= 2·pairs; every store writes [j, j+8), j+8 <= pairs
    while j + 8 <= pairs {
        let a = _mm256_loadu_ps(row.as_ptr().add(2 * j));
        let b = _mm256_loadu_ps(row.as_ptr().add(2 * j + 8));
        // per 128-bit lane: [a0 a2 b0 b2 | a4 a6 b4 b6], then lanes 0 2 1 3 of 64 bits
        let e = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(_mm256_shuffle_ps::<0b10_00_10_00>(a, b))));
        let o = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(_mm256_shuffle_ps::<0b11_01_11_01>(a, b))));
        _mm256_storeu_ps(ev.as_mut_ptr().add(j), f.apply8(e));
        _mm256_storeu_ps(od.as_mut_ptr().add(j), f.apply8(o));
        j += 8;
    }
    for j in j..pairs {
        *ev.get_unchecked_mut(j) = f.apply(*row.get_unchecked(2 * j));
        *od.get_unchecked_mut(j) = f.apply(*row.get_unchecked(2 * j + 1));
    }
}

/// The k×k taps of `kernel` over a phase-split padded plane (see [`PlaneGeometry`]) added to
/// `out`, or to `init` when given (then `out`'s old values are not read). With `relu6`, the
/// sums are clamped to [0, 6] as they are stored. `offsets` is `g.tap_offsets()`.
fn accumulate_taps(out: &mut [f32], phases: &[f32], kernel: &[f32], offsets: &[usize], g: &PlaneGeometry, init: Option<f32>, relu6: bool) {
    let PlaneGeometry { k, s, hp, pw, oh, ow, .. } = *g;
    assert!(
        out.len() >= oh * ow && phases.len() >= g.phases_len() && kernel.len() >= k * k && (k - 1) / s + ow <= pw && (oh - 1) * s + k <= hp
    );
    assert!(offsets.len() == k * k && offsets.iter().all(|&o| o + (oh - 1) * s * pw + ow <= g.phases_len()));
    let taps = Taps { offsets, weights: &kernel[..k * k] };
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features were detected on this processor; the assert above bounds every
        // read (tap offset + row start + ow ≤ phases_len) and write (oh·ow ≤ out.len()).
        return unsafe { accumulate_taps_avx2(out, phases, taps, g, init, relu6) };
    }
    let taps = offsets.iter().copied().zip(kernel.iter().copied());
    for oy in 0..oh {
        let orow = &mut out[oy * ow..(oy + 1) * ow];
        if let Some(b) = init {
            orow.fill(b);
        }
        for (off, w) in taps.clone() {
            let src = &phases[oy * s * pw + off..oy * s * pw + off + ow];
            orow.iter_mut().zip(src).for_each(|(d, v)| *d += w * v);
        }
        if relu6 {
            clamp_relu6(orow);
        }
    }
}

/// [`accumulate_taps`] on tiles of 1-2 output rows × 8-32 columns held in AVX registers while
/// all taps are added (several independent sums, so the FMA latency is hidden); the last
/// columns of a row through masked loads and stores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_taps_avx2(out: &mut [f32], phases: &[f32], taps: Taps, g: &PlaneGeometry, init: Option<f32>, relu6: bool) {
    use std::arch::x86_64::*;
    let PlaneGeometry { s, pw, oh, ow, .. } = *g;
    let (lo, hi) = if relu6 { (0.0, 6.0) } else { (f32::NEG_INFINITY, f32::INFINITY) };
    let t = TapTile { taps, init, lo: _mm256_set1_ps(lo), hi: _mm256_set1_ps(hi), src_row: s * pw, dst_row: ow };
    let mask = tail_mask(ow);
    let (src, dst) = (phases.as_ptr(), out.as_mut_ptr());
    let mut oy = 0;
    while oy < oh {
        let (row, orow) = (src.add(oy * s * pw), dst.add(oy * ow));
        if oy + 2 <= oh {
            t.rows::<2>(row, orow, ow, mask);
            oy += 2;
        } else {
            t.rows::<1>(row, orow, ow, mask);
            oy += 1;
        }
    }
}

/// The lanes of the last `ow % 8` columns of a row (for [`load8`] and [`store8`] with `MASKED`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tail_mask(ow: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let lanes: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    _mm256_loadu_si256(lanes.as_ptr().add(8 - ow % 8) as *const __m256i)
}

/// 8 floats from `p`, or with `MASKED` only the lanes of `mask` (the others read as 0). A
/// function, not a closure, so that it is inlined into the AVX2 caller with its intrinsics.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load8<const MASKED: bool>(p: *const f32, mask: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    if MASKED {
        _mm256_maskload_ps(p, mask)
    } else {
        _mm256_loadu_ps(p)
    }
}

/// Stores 8 floats at `p`, or with `MASKED` only the lanes of `mask` (see [`load8`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store8<const MASKED: bool>(p: *mut f32, mask: std::arch::x86_64::__m256i, v: std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    if MASKED {
        _mm256_maskstore_ps(p, mask, v)
    } else {
        _mm256_storeu_ps(p, v)
    }
}

/// The taps of one k×k kernel: where each reads (from [`PlaneGeometry::tap_offsets`]) and its weight.
#[derive(Clone, Copy)]
struct Taps<'a> {
    offsets: &'a [usize],
    weights: &'a [f32],
}

/// One tile of [`accumulate_taps_avx2`]: what every tile shares.
#[cfg(target_arch = "x86_64")]
struct TapTile<'a> {
    taps: Taps<'a>,
    init: Option<f32>,
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
    /// Floats between the input rows of consecutive output rows, and between output rows.
    src_row: usize,
    dst_row: usize,
}

#[cfg(target_arch = "x86_64")]
impl TapTile<'_> {
    /// R whole output rows from `dst` on: tiles of 32, 16 and 8 columns, then the masked rest.
    #[inline(always)]
    unsafe fn rows<const R: usize>(&self, src: *const f32, dst: *mut f32, ow: usize, mask: std::arch::x86_64::__m256i) {
        let mut x = 0;
        while x + 32 <= ow {
            self.run::<R, 4, false>(src.add(x), dst.add(x), mask);
            x += 32;
        }
        while x + 16 <= ow {
            self.run::<R, 2, false>(src.add(x), dst.add(x), mask);
            x += 16;
        }
        while x + 8 <= ow {
            self.run::<R, 1, false>(src.add(x), dst.add(x), mask);
            x += 8;
        }
        if x < ow {
            self.run::<R, 1, true>(src.add(x), dst.add(x), mask);
        }
    }

    /// R output rows × V vectors of 8 columns starting at `dst`, reading from `src`; with
    /// `MASKED` (V = 1), only the lanes of `mask`. Each sum adds the taps in the same order
    /// with the same fused multiply-adds, whatever the tile.
    #[inline(always)]
    unsafe fn run<const R: usize, const V: usize, const MASKED: bool>(
        &self,
        src: *const f32,
        dst: *mut f32,
        mask: std::arch::x86_64::__m256i,
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (v, a) in acc.iter_mut().enumerate() {
                *a = match self.init {
                    Some(b) => _mm256_set1_ps(b),
                    None => load8::<MASKED>(dst.add(r * self.dst_row + 8 * v), mask),
                };
            }
        }
        for (&off, &w) in self.taps.offsets.iter().zip(self.taps.weights) {
            let wv = _mm256_set1_ps(w);
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(load8::<MASKED>(src.add(r * self.src_row + off + 8 * v), mask), wv, *a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, a) in acc.iter().enumerate() {
                store8::<MASKED>(dst.add(r * self.dst_row + 8 * v), mask, _mm256_min_ps(_mm256_max_ps(*a, self.lo), self.hi));
            }
        }
    }
}

/// Output channels the dense-taps tiles compute together.
const STEM_OUTPUTS: usize = 4;
/// Output rows per job of the dense taps: the input rows they read stay in L2.
const STEM_BAND_ROWS: usize = 8;

/// A dense convolution with few input channels (EfficientNet's stem) as taps over the
/// phase-split padded planes of all input channels, [`STEM_OUTPUTS`] output channels per tile,
/// so every input vector loaded serves four sums. Each sum adds the bias, then the taps in the
/// order (input channel, ky, kx) by fused multiply-adds: the same values as one
/// [`accumulate_taps`] pass per input channel.
#[cfg(target_arch = "x86_64")]
struct DenseTaps<'a> {
    /// Where tap (ic, ky, kx) reads, from the start of an output row's input rows in the image's phases.
    offsets: Vec<usize>,
    /// Weights regrouped [O / 4][tap][4].
    weights: Vec<[f32; STEM_OUTPUTS]>,
    bias: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
impl<'a> DenseTaps<'a> {
    /// `offsets` of one plane's taps, `plane_len` floats per input channel's phases, `c` input
    /// channels, weight [O, c, k, k].
    fn new(offsets: &[usize], plane_len: usize, c: usize, weight: &[f32], bias: &'a [f32]) -> Self {
        let kk = offsets.len();
        let offsets = (0..c).flat_map(|ic| offsets.iter().map(move |&t| ic * plane_len + t)).collect();
        let weights = (0..bias.len() / STEM_OUTPUTS)
            .flat_map(|g| (0..c * kk).map(move |tap| std::array::from_fn(|j| weight[(g * STEM_OUTPUTS + j) * c * kk + tap])))
            .collect();
        DenseTaps { offsets, weights, bias }
    }

    /// Output rows `rows` of all output planes of one image (`dst`: its [O, oh, ow] output)
    /// from `phases` (its input channels' phase-split planes).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn band_avx2(&self, phases: &[f32], dst: *mut f32, g: &PlaneGeometry, rows: std::ops::Range<usize>, relu6: bool) {
        use std::arch::x86_64::*;
        let PlaneGeometry { s, pw, oh, ow, .. } = *g;
        let (lo, hi) = if relu6 { (0.0, 6.0) } else { (f32::NEG_INFINITY, f32::INFINITY) };
        let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        let mask = tail_mask(ow);
        let taps = self.offsets.len();
        for (group, weights) in self.weights.chunks(taps).enumerate() {
            let bias: [f32; STEM_OUTPUTS] = std::array::from_fn(|j| self.bias[group * STEM_OUTPUTS + j]);
            for oy in rows.clone() {
                let src = phases.as_ptr().add(oy * s * pw);
                let out = dst.add(group * STEM_OUTPUTS * oh * ow + oy * ow);
                let tile = StemTile { offsets: &self.offsets, weights, bias, lo, hi, plane: oh * ow };
                let mut x = 0;
                while x + 24 <= ow {
                    tile.run::<3, false>(src.add(x), out.add(x), mask);
                    x += 24;
                }
                while x + 8 <= ow {
                    tile.run::<1, false>(src.add(x), out.add(x), mask);
                    x += 8;
                }
                if x < ow {
                    tile.run::<1, true>(src.add(x), out.add(x), mask);
                }
            }
        }
    }
}

/// One tile of [`DenseTaps`]: 4 output channels × V vectors of 8 columns of one output row.
#[cfg(target_arch = "x86_64")]
struct StemTile<'a> {
    offsets: &'a [usize],
    weights: &'a [[f32; STEM_OUTPUTS]],
    bias: [f32; STEM_OUTPUTS],
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
    /// Floats between the output planes of consecutive channels.
    plane: usize,
}

#[cfg(target_arch = "x86_64")]
impl StemTile<'_> {
    #[inline(always)]
    unsafe fn run<const V: usize, const MASKED: bool>(&self, src: *const f32, dst: *mut f32, mask: std::arch::x86_64::__m256i) {
        use std::arch::x86_64::*;
        let mut acc: [[__m256; V]; STEM_OUTPUTS] = std::array::from_fn(|j| [_mm256_set1_ps(self.bias[j]); V]);
        for (&off, w) in self.offsets.iter().zip(self.weights) {
            let xs: [__m256; V] = std::array::from_fn(|v| load8::<MASKED>(src.add(off + 8 * v), mask));
            for (acc, &w) in acc.iter_mut().zip(w) {
                let wv = _mm256_set1_ps(w);
                for (a, x) in acc.iter_mut().zip(xs) {
                    *a = _mm256_fmadd_ps(x, wv, *a);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (v, a) in acc.iter().enumerate() {
                store8::<MASKED>(dst.add(j * self.plane + 8 * v), mask, _mm256_min_ps(_mm256_max_ps(*a, self.lo), self.hi));
            }
        }
    }
}

fn clamp_relu6(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = x.clamp(0.0, 6.0));
}

/// Direct k×k convolution for the two cases EfficientNet needs, dense with few input channels
/// (the stem) and depthwise (groups = channels), with zero padding, bias and optional ReLU6
/// fused into one pass. Weight [O, C/groups, k, k]; padding (top, bottom, left, right).
struct DirectConv {
    stride: usize,
    pad: (usize, usize, usize, usize),
    bias: Vec<f32>,
    relu6: bool,
    depthwise: bool,
}

impl DirectConv {
    /// The dense case (few input channels: the stem), [n, o, oh, ow]: every input plane is
    /// padded once, then shared by all output channels.
    fn dense(&self, x: &[f32], wt: &[f32], (n, c, o): (usize, usize, usize), geo: &PlaneGeometry, offsets: &[usize]) -> Vec<f32> {
        let PlaneGeometry { h, w, k, s, pw, oh, ow, .. } = *geo;
        let plane_len = geo.phases_len();
        let mut phases = vec![0f32; n * c * plane_len];
        phases
            .par_chunks_mut(plane_len)
            .enumerate()
            .for_each(|(p, ph)| geo.fill_phases_into(&x[p * h * w..(p + 1) * h * w], ph, OnCopy::Identity));
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() && o % STEM_OUTPUTS == 0 {
            let taps = DenseTaps::new(offsets, plane_len, c, wt, &self.bias);
            assert!(taps.offsets.iter().all(|&t| t + (oh - 1) * s * pw + ow <= c * plane_len));
            let bands = oh.div_ceil(STEM_BAND_ROWS);
            let len = n * o * oh * ow;
            // not zeroed first: the jobs below write every value (all rows of all planes)
            let mut out: Vec<f32> = Vec::with_capacity(len);
            let dst = SharedMut(out.as_mut_ptr());
            (0..n * bands).into_par_iter().for_each(|job| {
                let (b, band) = (job / bands, job % bands);
                let rows = band * STEM_BAND_ROWS..((band + 1) * STEM_BAND_ROWS).min(oh);
                let image = &phases[b * c * plane_len..(b + 1) * c * plane_len];
                // SAFETY: AVX2 was detected; the assert above bounds every read, and each job
                // writes only rows `rows` of its image's output planes.
                unsafe { taps.band_avx2(image, dst.get().add(b * o * oh * ow), geo, rows, self.relu6) };
            });
            // SAFETY: the capacity is len and the jobs above wrote all len values.
            unsafe { out.set_len(len) };
            return out;
        }
        let mut out = vec![0f32; n * o * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, out_plane)| {
            let (b, oc) = (p / o, p % o);
            for ic in 0..c {
                let ph = &phases[(b * c + ic) * plane_len..(b * c + ic + 1) * plane_len];
                let init = (ic == 0).then_some(self.bias[oc]);
                accumulate_taps(out_plane, ph, &wt[(oc * c + ic) * k * k..(oc * c + ic + 1) * k * k], offsets, geo, init, false);
            }
            if self.relu6 {
                clamp_relu6(out_plane);
            }
        });
        out
    }
}

impl CustomOp2 for DirectConv {
    fn name(&self) -> &'static str {
        "direct_conv2d"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "direct_conv2d")?;
        let wt = contiguous_f32(s2, l2, "direct_conv2d")?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let (o, wc, k, _) = l2.shape().dims4()?;
        let (pt, pb, pl, pr) = self.pad;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        let fits = if self.depthwise { o == c && wc == 1 } else { wc == c };
        if !fits || hp < k || wp < k || self.bias.len() != o {
            candle_core::bail!("direct_conv2d: input {:?} does not fit weight {:?}", l1.shape(), l2.shape())
        }
        let s = self.stride;
        let (oh, ow) = ((hp - k) / s + 1, (wp - k) / s + 1);
        let geo = PlaneGeometry { h, w, k, s, pt, pl, hp, pw: wp.div_ceil(s), oh, ow };
        let offsets = geo.tap_offsets();
        let out = if self.depthwise {
            // one plane per job: its padded copy lives in the job's scratch buffer, in cache
            let mut out = vec![0f32; n * o * oh * ow];
            out.par_chunks_mut(oh * ow).enumerate().for_each_init(Vec::new, |scratch, (p, out_plane)| {
                let oc = p % o;
                geo.fill_phases(&x[p * h * w..(p + 1) * h * w], scratch, OnCopy::Identity);
                accumulate_taps(out_plane, scratch, &wt[oc * k * k..(oc + 1) * k * k], &offsets, &geo, Some(self.bias[oc]), self.relu6);
            });
            out
        } else {
            self.dense(x, wt, (n, c, o), &geo, &offsets)
        };
        Ok((CpuStorage::F32(out), Shape::from((n, o, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, weight: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = if self.relu6 { relu6_grad(grad, res)? } else { grad.clone() };
        let (_, _, h, w) = x.dims4()?;
        let back = DirectConvInputGrad { stride: self.stride, pad: self.pad, depthwise: self.depthwise, h, w };
        // the weights are frozen: no gradient for them
        Ok((Some(g.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &back)?), None))
    }
}

/// The gradient through ReLU6: `grad` where 0 < v < 6 (v the activation), else 0, in one pass.
fn relu6_grad(grad: &Tensor, v: &Tensor) -> Result<Tensor> {
    grad.contiguous()?.apply_op2_no_bwd(&v.contiguous()?, &Relu6Grad)
}

struct Relu6Grad;

impl CustomOp2 for Relu6Grad {
    fn name(&self) -> &'static str {
        "relu6_grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, v) = (contiguous_f32(s1, l1, "relu6_grad")?, contiguous_f32(s2, l2, "relu6_grad")?);
        if g.len() != v.len() {
            candle_core::bail!("relu6_grad: gradient {:?} and activation {:?} differ", l1.shape(), l2.shape())
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(1 << 14).zip(g.par_chunks(1 << 14).zip(v.par_chunks(1 << 14))).for_each(|(o, (g, v))| {
            o.iter_mut().zip(g.iter().zip(v)).for_each(|(o, (g, v))| *o = if *v > 0.0 && *v < 6.0 { *g } else { 0.0 })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Input gradient of [`DirectConv`]: scatters each output gradient back through the kernel.
struct DirectConvInputGrad {
    stride: usize,
    pad: (usize, usize, usize, usize),
    depthwise: bool,
    h: usize,
    w: usize,
}

impl CustomOp2 for DirectConvInputGrad {
    fn name(&self) -> &'static str {
        "direct_conv2d_input_grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, "direct_conv2d_input_grad")?;
        let wt = contiguous_f32(s2, l2, "direct_conv2d_input_grad")?;
        let (n, o, oh, ow) = l1.shape().dims4()?;
        let (wo, wc, k, _) = l2.shape().dims4()?;
        let c = if self.depthwise { o } else { wc };
        if wo != o {
            candle_core::bail!("direct_conv2d_input_grad: gradient {:?} does not fit weight {:?}", l1.shape(), l2.shape())
        }
        let (s, (pt, pb, pl, pr), h, w) = (self.stride, self.pad, self.h, self.w);
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        let mut out = vec![0f32; n * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(p, dst)| {
            let (b, ic) = (p / c, p % c);
            let mut gp = vec![0f32; hp * wp];
            let outputs = if self.depthwise { ic..ic + 1 } else { 0..o };
            for oc in outputs {
                let j = if self.depthwise { 0 } else { ic };
                let kern = &wt[(oc * wc + j) * k * k..(oc * wc + j + 1) * k * k];
                let gplane = &g[(b * o + oc) * oh * ow..(b * o + oc + 1) * oh * ow];
                // tap by tap: each output row's gradient, times the tap, added to a padded
                // input row (contiguous for stride 1, so the loop vectorizes)
                for ky in 0..k {
                    for kx in 0..k {
                        let kv = kern[ky * k + kx];
                        for (oy, grow) in gplane.chunks_exact(ow).enumerate() {
                            let start = (oy * s + ky) * wp + kx;
                            if s == 1 {
                                gp[start..start + ow].iter_mut().zip(grow).for_each(|(d, gv)| *d += kv * gv);
                            } else {
                                gp[start..].iter_mut().step_by(s).zip(grow).for_each(|(d, gv)| *d += kv * gv);
                            }
                        }
                    }
                }
            }
            for y in 0..h {
                dst[y * w..(y + 1) * w].copy_from_slice(&gp[(y + pt) * wp + pl..(y + pt) * wp + pl + w]);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }
}

/// Depthwise k×k convolution with zero padding (top, bottom, left, right), fused bias and
/// optional ReLU6; gradient with respect to the input (weights are frozen).
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &[f32],
    stride: usize,
    pad: (usize, usize, usize, usize),
    relu6: bool,
) -> Result<Tensor> {
    let op = DirectConv { stride, pad, bias: bias.to_vec(), relu6, depthwise: true };
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// Dense k×k convolution for few input channels (EfficientNet's stem), same fusion as above.
pub fn dense_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &[f32],
    stride: usize,
    pad: (usize, usize, usize, usize),
    relu6: bool,
) -> Result<Tensor> {
    let op = DirectConv { stride, pad, bias: bias.to_vec(), relu6, depthwise: false };
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// 1×1 convolution as one matrix product per image (`gemm`), with bias, optional ReLU6 and
/// optional residual added in the same pass. Weight is [O, C] row-major.
#[derive(Clone)]
struct Pointwise {
    weight: std::sync::Arc<[f32]>,
    bias: std::sync::Arc<[f32]>,
    relu6: bool,
}

impl Pointwise {
    /// Gradient with respect to x of `relu6?(W·x + b)`, given the pre-residual output `pre`.
    fn input_grad(&self, x: &Tensor, pre: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let o = self.bias.len();
        let g = if self.relu6 { relu6_grad(grad, pre)? } else { grad.clone() };
        let wt = Tensor::from_slice(&self.weight, (o, c), x.device())?.t()?.contiguous()?;
        wt.broadcast_matmul(&g.reshape((n, o, h * w))?)?.reshape((n, c, h, w))
    }

    fn run(&self, x: &[f32], shape: &Shape, residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = shape.dims4()?;
        let o = self.bias.len();
        if self.weight.len() != o * c {
            candle_core::bail!("pointwise_conv: weight has {} values, expected {o}x{c}", self.weight.len())
        }
        let hw = h * w;
        let mut out = vec![0f32; n * o * hw];
        // Column tiles small enough to stay in cache, so bias, ReLU6 and the residual are
        // applied right after the tile's product instead of in another pass over memory.
        const TILE: usize = 256;
        let tiles = hw.div_ceil(TILE);
        let dst = SharedMut(out.as_mut_ptr());
        (0..n * tiles).into_par_iter().for_each_init(Vec::new, |product, job| {
            let (b, t) = (job / tiles, job % tiles);
            let (c0, cols) = (t * TILE, TILE.min(hw - t * TILE));
            product.resize(o * cols, 0.0);
            // the gemm crate, not OpenBLAS, for these small, many products: as fast here
            // (measured), and EfficientNet features then do not depend on the system
            sgemm_with(Rust, o, cols, c, product, false, (&self.weight, c, 1), (&x[b * c * hw + c0..], hw, 1));
            // SAFETY: every job writes a disjoint column range [c0, c0+cols) of its image's rows.
            unsafe { store_rows(dst, b * o * hw + c0, hw, product, cols, &self.bias, self.relu6, residual) };
        });
        Ok((CpuStorage::F32(out), Shape::from((n, o, h, w))))
    }
}

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        "pointwise_conv"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(contiguous_f32(s, l, "pointwise_conv")?, l.shape(), None)
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.input_grad(x, res, grad)?))
    }
}

impl CustomOp2 for Pointwise {
    fn name(&self) -> &'static str {
        "pointwise_conv_residual"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let r = contiguous_f32(s2, l2, "pointwise_conv_residual")?;
        self.run(contiguous_f32(s1, l1, "pointwise_conv_residual")?, l1.shape(), Some(r))
    }
    fn bwd(&self, x: &Tensor, residual: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let pre = (res - residual)?;
        Ok((Some(self.input_grad(x, &pre, grad)?), Some(grad.clone())))
    }
}

/// Stores a product tile `product` [O, cols] into the output rows that start at `base` (row
/// stride `stride`) as `relu6?(p + bias)`, plus `residual` read at the same indices.
///
/// # Safety
/// `dst` must hold `base + (O-1)·stride + cols` values and no other thread may touch this range.
#[allow(clippy::too_many_arguments)]
unsafe fn store_rows(
    dst: SharedMut,
    base: usize,
    stride: usize,
    product: &[f32],
    cols: usize,
    bias: &[f32],
    relu6: bool,
    residual: Option<&[f32]>,
) {
    for (r, (p, &bv)) in product.chunks(cols).zip(bias).enumerate() {
        let start = base + r * stride;
        let row = std::slice::from_raw_parts_mut(dst.get().add(start), cols);
        row.iter_mut().zip(p).for_each(|(v, p)| *v = if relu6 { (p + bv).clamp(0.0, 6.0) } else { p + bv });
        if let Some(res) = residual {
            row.iter_mut().zip(&res[start..start + cols]).for_each(|(v, x)| *v += x);
        }
    }
}

/// A raw pointer that may be shared by rayon jobs writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Fused 1×1 convolution: `relu6?(W·x + b) (+ residual)`; `weight` is [O, C] row-major.
/// Differentiable with respect to x and the residual (weights are frozen).
pub fn pointwise_conv(
    x: &Tensor,
    weight: &std::sync::Arc<[f32]>,
    bias: &std::sync::Arc<[f32]>,
    relu6: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = Pointwise { weight: weight.clone(), bias: bias.clone(), relu6 };
    let x = x.contiguous()?;
    match residual {
        Some(r) => x.apply_op2(&r.contiguous()?, op),
        None => x.apply_op1(op),
    }
}

/// A weight matrix (row-major) and its bias, shared without copying.
pub type WeightsAndBias = (std::sync::Arc<[f32]>, std::sync::Arc<[f32]>);

/// Folded weights of one inverted-residual block (MBConv): optional 1×1 expansion with ReLU6,
/// depthwise k×k with ReLU6, 1×1 projection, and the residual when `residual`.
pub struct MbConvWeights {
    /// [E, C] and [E]; `None` when the block does not expand (E = C).
    pub expand: Option<WeightsAndBias>,
    /// [E, k, k] and [E].
    pub depthwise: WeightsAndBias,
    /// [O, E] and [O].
    pub project: WeightsAndBias,
    pub kernel: usize,
    pub stride: usize,
    pub residual: bool,
}

/// A whole MBConv block computed band by band: each band of output rows expands only the input
/// rows it needs, so the 6× wider expanded tensor never leaves the cache. Forward only.
struct FusedMbConv<'a> {
    w: &'a MbConvWeights,
    pad: (usize, usize, usize, usize),
    /// Floats of the expanded band kept in cache.
    band_floats: usize,
}

/// Per-job buffers of [`FusedMbConv`], reused across bands.
#[derive(Default)]
struct BandScratch {
    expanded: Vec<f32>,
    phases: Vec<f32>,
    depthwise: Vec<f32>,
    projected: Vec<f32>,
}

/// Floats of the expanded band (1 MiB: measured best between 128 KiB and 4 MiB on a 512 KiB-L2 core).
const BAND_FLOATS: usize = 256 * 1024;

impl FusedMbConv<'_> {
    fn run(&self, x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Result<(Vec<f32>, Shape)> {
        let m = self.w;
        let (k, s) = (m.kernel, m.stride);
        let e = m.depthwise.1.len();
        let o = m.project.1.len();
        let (pt, pb, pl, pr) = self.pad;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        let expand_fits = m.expand.as_ref().map_or(e == c, |(wt, b)| wt.len() == e * c && b.len() == e);
        if !expand_fits || m.depthwise.0.len() != e * k * k || m.project.0.len() != o * e || hp < k || wp < k {
            candle_core::bail!("mbconv: weights do not fit an input of {c} channels")
        }
        let (oh, ow) = ((hp - k) / s + 1, (wp - k) / s + 1);
        if m.residual && (s != 1 || o != c || oh != h || ow != w) {
            candle_core::bail!("mbconv: the residual needs stride 1 and equal shapes")
        }
        let rows_in = (self.band_floats / (e * w)).max(k);
        let band = ((rows_in - k) / s + 1).min(oh);
        let bands = oh.div_ceil(band);
        // not zeroed first: the jobs below write every value (rows [oy0, oy1) of every channel
        // of their image, for bands that cover all rows of all images)
        let len = n * o * oh * ow;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let dst = SharedMut(out.as_mut_ptr());
        let plan = BandPlan { c, h, w, e, o, k, s, pt, pl, wp, oh, ow, band, bands };
        thread_local! {
            // kept per thread across calls, so the buffers are not allocated and zeroed anew for
            // every block (a band job runs no nested parallel work, so it is never re-entered)
            static SCRATCH: std::cell::RefCell<BandScratch> = std::cell::RefCell::default();
        }
        (0..n * bands).into_par_iter().for_each(|job| {
            SCRATCH.with_borrow_mut(|sc| {
                #[cfg(target_arch = "x86_64")]
                if has_avx2_fma() {
                    // SAFETY: the features were detected on this processor.
                    return unsafe { self.band_job_avx2(&plan, x, dst, sc, job) };
                }
                self.band_job(&plan, x, dst, sc, job)
            })
        });
        // SAFETY: the capacity is len and all len values were written by the jobs above.
        unsafe { out.set_len(len) };
        Ok((out, Shape::from((n, o, oh, ow))))
    }

    /// [`Self::band_job`] compiled for AVX2 + FMA, so its plain loops use them too.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn band_job_avx2(&self, plan: &BandPlan, x: &[f32], dst: SharedMut, sc: &mut BandScratch, job: usize) {
        self.band_job(plan, x, dst, sc, job)
    }

    /// One band of one image: expansion, depthwise, projection into `dst` (the [n, o, oh, ow]
    /// output, of which this job writes only its own rows).
    #[inline(always)]
    fn band_job(&self, plan: &BandPlan, x: &[f32], dst: SharedMut, sc: &mut BandScratch, job: usize) {
        let m = self.w;
        let BandPlan { c, h, w, e, o, k, s, pt, pl, wp, oh, ow, band, bands } = *plan;
        let (b, t) = (job / bands, job % bands);
        let (oy0, oy1) = (t * band, ((t + 1) * band).min(oh));
        // input rows [r0, r1) of the padded plane, of which [y0, y1) are real rows
        let r0 = (oy0 * s) as isize - pt as isize;
        let r1 = ((oy1 - 1) * s + k) as isize - pt as isize;
        let (y0, y1) = (r0.max(0) as usize, (r1.min(h as isize)) as usize);
        let rows = y1 - y0;
        let image = &x[b * c * h * w..(b + 1) * c * h * w];
        // 1. expansion of the band's rows: [E, rows·w]
        let (expanded, channel_stride): (&[f32], usize) = match &m.expand {
            Some((wt, _)) => {
                // W·x only: the bias and ReLU6 are applied while padding (step 2)
                sc.expanded.resize(e * rows * w, 0.0);
                sgemm_with(Rust, e, rows * w, c, &mut sc.expanded, false, (wt, c, 1), (&image[y0 * w..], h * w, 1));
                (&sc.expanded[..], rows * w)
            }
            None => (&image[y0 * w..], h * w),
        };
        // 2. depthwise k×k over the band, zero padding where it leaves the image
        let geo = PlaneGeometry {
            h: rows,
            w,
            k,
            s,
            pt: (y0 as isize - r0) as usize,
            pl,
            hp: (r1 - r0) as usize,
            pw: wp.div_ceil(s),
            oh: oy1 - oy0,
            ow,
        };
        let plane_out = geo.oh * ow;
        let offsets = geo.tap_offsets();
        // (every value of these buffers is written below before it is read)
        sc.depthwise.resize(e * plane_out, 0.0);
        let (dw, dbias) = (&m.depthwise.0, &m.depthwise.1);
        for ch in 0..e {
            let src = &expanded[ch * channel_stride..ch * channel_stride + rows * w];
            let on_copy = match &m.expand {
                Some((_, ebias)) => OnCopy::BiasRelu6(ebias[ch]),
                None => OnCopy::Identity,
            };
            geo.fill_phases(src, &mut sc.phases, on_copy);
            let d = &mut sc.depthwise[ch * plane_out..(ch + 1) * plane_out];
            accumulate_taps(d, &sc.phases, &dw[ch * k * k..(ch + 1) * k * k], &offsets, &geo, Some(dbias[ch]), true);
        }
        // 3. projection into the output columns of this band, plus the residual
        let (pw_, pbias) = (&m.project.0, &m.project.1);
        let base = b * o * oh * ow + oy0 * ow;
        sc.projected.resize(o * plane_out, 0.0);
        sgemm_with(Rust, o, plane_out, e, &mut sc.projected, false, (pw_, e, 1), (&sc.depthwise, plane_out, 1));
        // (a residual block keeps shape: x and the output share the same index of a position)
        let residual = m.residual.then_some(x);
        // SAFETY: every job writes the disjoint columns [oy0·ow, oy1·ow) of its image's rows.
        unsafe { store_rows(dst, base, oh * ow, &sc.projected, plane_out, pbias, false, residual) };
    }
}

/// The sizes [`FusedMbConv`] works with.
#[derive(Clone, Copy)]
struct BandPlan {
    c: usize,
    h: usize,
    w: usize,
    e: usize,
    o: usize,
    k: usize,
    s: usize,
    pt: usize,
    pl: usize,
    wp: usize,
    oh: usize,
    ow: usize,
    band: usize,
    bands: usize,
}

impl CustomOp1 for FusedMbConv<'_> {
    fn name(&self) -> &'static str {
        "mbconv"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "mbconv")?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (out, shape) = self.run(x, n, c, h, w)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

/// One MBConv block fused band by band (see [`MbConvWeights`]), padding (top, bottom, left,
/// right) around the depthwise input. No gradient: for feature extraction only.
pub fn mbconv_fused(x: &Tensor, weights: &MbConvWeights, pad: (usize, usize, usize, usize)) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&FusedMbConv { w: weights, pad, band_floats: BAND_FLOATS })
}

/// A fully connected layer with frozen parameters, `x·Wᵀ + b` by `sgemm` (OpenBLAS when present):
/// scoring runs the flow's subnets with it. Its backward gives the input's gradient only (the
/// gradient maps' pass to the pixels); the parameters get none.
struct FrozenLinear;

impl CustomOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen_linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) =
            (contiguous_f32(s1, l1, "frozen_linear")?, contiguous_f32(s2, l2, "frozen_linear")?, contiguous_f32(s3, l3, "frozen_linear")?);
        let (rows, input) = l1.shape().dims2()?;
        let (output, w_input) = l2.shape().dims2()?;
        if w_input != input || b.len() != output {
            candle_core::bail!("frozen_linear: x {:?}, weight {:?}, bias {:?} do not fit", l1.shape(), l2.shape(), l3.shape())
        }
        if rows <= FEW_ROWS {
            return Ok((CpuStorage::F32(linear_few_rows(x, rows, input, w, b)), Shape::from((rows, output))));
        }
        let mut y: Vec<f32> = b.iter().copied().cycle().take(rows * output).collect();
        sgemm(rows, output, input, &mut y, true, (x, input, 1), (w, 1, input));
        Ok((CpuStorage::F32(y), Shape::from((rows, output))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &FrozenLinearInputGrad)?), None, None))
    }
}

/// The input gradient of [`FrozenLinear`]: `g·W` for g [rows, out], W [out, in].
struct FrozenLinearInputGrad;

impl CustomOp2 for FrozenLinearInputGrad {
    fn name(&self) -> &'static str {
        "frozen_linear_input_grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, w) = (contiguous_f32(s1, l1, "frozen_linear_input_grad")?, contiguous_f32(s2, l2, "frozen_linear_input_grad")?);
        let (rows, output) = l1.shape().dims2()?;
        let (w_output, input) = l2.shape().dims2()?;
        if w_output != output {
            candle_core::bail!("frozen_linear_input_grad: grad {:?} and weight {:?} do not fit", l1.shape(), l2.shape())
        }
        let mut dx = vec![0f32; rows * input];
        if rows <= FEW_ROWS {
            few_rows_times_weight(g, rows, output, w, input, &mut dx);
        } else {
            sgemm(rows, input, output, &mut dx, false, (g, output, 1), (w, input, 1));
        }
        Ok((CpuStorage::F32(dx), Shape::from((rows, input))))
    }
}

/// `dx = g·W` for a few rows of g [rows, out] and W [out, in], streaming W once: each job owns a
/// band of dx's columns and adds `g[r, o]·W[o, band]` for every o (no packing of W).
fn few_rows_times_weight(g: &[f32], rows: usize, output: usize, w: &[f32], input: usize, dx: &mut [f32]) {
    const COLUMNS_PER_JOB: usize = 256;
    let bands = input.div_ceil(COLUMNS_PER_JOB);
    let parts: Vec<Vec<f32>> = (0..bands)
        .into_par_iter()
        .map(|band| {
            let c0 = band * COLUMNS_PER_JOB;
            let width = COLUMNS_PER_JOB.min(input - c0);
            let mut part = vec![0f32; rows * width];
            for o in 0..output {
                let wo = &w[o * input + c0..][..width];
                for r in 0..rows {
                    let gv = g[r * output + o];
                    part[r * width..(r + 1) * width].iter_mut().zip(wo).for_each(|(d, wv)| *d += gv * wv);
                }
            }
            part
        })
        .collect();
    for (band, part) in parts.iter().enumerate() {
        let c0 = band * COLUMNS_PER_JOB;
        let width = part.len() / rows.max(1);
        for r in 0..rows {
            dx[r * input + c0..][..width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
}

/// Rows up to which [`frozen_linear`] streams the weights itself instead of calling `sgemm`:
/// `sgemm` copies (packs) all of W before multiplying, which for a few rows (one image's test
/// views) costs more than the products; here each weight row is read once, straight from memory.
const FEW_ROWS: usize = 16;

/// `x·wᵀ + b` for a few rows (≤ 16) of x [rows, in], w [out, in], b [out]. x is transposed
/// once into columns of 8 or 16 lanes (rows padded with zeros), so that one AVX register holds
/// 8 rows' sums: a tile of J outputs keeps their sums for all rows in registers over the whole
/// input while each weight is broadcast once, and x's columns stay in cache for all tiles.
fn linear_few_rows(x: &[f32], rows: usize, input: usize, w: &[f32], b: &[f32]) -> Vec<f32> {
    const OUTPUTS_PER_JOB: usize = 24;
    let output = b.len();
    assert!(rows <= FEW_ROWS && x.len() == rows * input && w.len() == output * input);
    if rows == 0 || output == 0 || input == 0 {
        return b.iter().copied().cycle().take(rows * output).collect();
    }
    let lanes = rows.next_multiple_of(8);
    let mut xt = vec![0f32; input * lanes];
    for (r, row) in x.chunks_exact(input).enumerate() {
        for (k, v) in row.iter().enumerate() {
            xt[k * lanes + r] = *v;
        }
    }
    // the result transposed, [out, lanes], so that each job owns one contiguous part
    let mut yt = vec![0f32; output * lanes];
    yt.par_chunks_mut(OUTPUTS_PER_JOB * lanes).enumerate().for_each(|(job, part)| {
        let j0 = job * OUTPUTS_PER_JOB;
        let w = &w[j0 * input..(j0 + part.len() / lanes) * input];
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: features detected; w holds part.len()/lanes rows of `input`, xt `input`
            // columns of `lanes`.
            return unsafe { few_rows_job_avx2(&xt, lanes, w, input, part) };
        }
        for (yj, wj) in part.chunks_exact_mut(lanes).zip(w.chunks_exact(input)) {
            for (k, wv) in wj.iter().enumerate() {
                yj.iter_mut().zip(&xt[k * lanes..(k + 1) * lanes]).for_each(|(y, xv)| *y += wv * xv);
            }
        }
    });
    let mut y = vec![0f32; rows * output];
    for (o, (col, bias)) in yt.chunks(lanes).zip(b).enumerate() {
        for (r, v) in col[..rows].iter().enumerate() {
            y[r * output + o] = v + bias;
        }
    }
    y
}

/// One job of [`linear_few_rows`]: `part` [outs, lanes] = w [outs, input] · xt [input, lanes],
/// in tiles of 6 outputs (16 lanes) or 12 outputs (8 lanes), the last outputs one at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn few_rows_job_avx2(xt: &[f32], lanes: usize, w: &[f32], input: usize, part: &mut [f32]) {
    assert!(xt.len() >= input * lanes && w.len() * lanes == part.len() * input);
    let outs = part.len() / lanes;
    let (xt, w, y) = (xt.as_ptr(), w.as_ptr(), part.as_mut_ptr());
    match lanes {
        16 => outer_tiles::<6, 2>(xt, w, input, y, outs),
        _ => outer_tiles::<12, 1>(xt, w, input, y, outs),
    }
}

/// `outs` outputs as tiles of J, the last ones one at a time (see [`outer_tile`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn outer_tiles<const J: usize, const V: usize>(xt: *const f32, w: *const f32, input: usize, y: *mut f32, outs: usize) {
    let mut j = 0;
    while j + J <= outs {
        outer_tile::<J, V>(xt, w.add(j * input), input, y.add(j * 8 * V));
        j += J;
    }
    while j < outs {
        outer_tile::<1, V>(xt, w.add(j * input), input, y.add(j * 8 * V));
        j += 1;
    }
}

/// J outputs × 8V lanes: `y[q·8V + l] = Σ_k w[q·input + k] · xt[k·8V + l]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn outer_tile<const J: usize, const V: usize>(xt: *const f32, w: *const f32, input: usize, y: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); V]; J];
    for k in 0..input {
        let mut xv = [_mm256_setzero_ps(); V];
        for (v, xr) in xv.iter_mut().enumerate() {
            *xr = _mm256_loadu_ps(xt.add(k * 8 * V + 8 * v));
        }
        for (q, row) in acc.iter_mut().enumerate() {
            let wb = _mm256_broadcast_ss(&*w.add(q * input + k));
            for v in 0..V {
                row[v] = _mm256_fmadd_ps(wb, xv[v], row[v]);
            }
        }
    }
    for (q, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            _mm256_storeu_ps(y.add(q * 8 * V + 8 * v), *a);
        }
    }
}

/// `x·weightᵀ + bias` for x [B, in], weight [out, in], bias [out], without gradient tracking.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &FrozenLinear)
}

/// [`frozen_linear`] in the graph of an input that needs a gradient: backward gives x's
/// gradient `g·weight` and none for the (frozen) parameters.
pub fn frozen_linear_tracked(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&weight.detach().contiguous()?, &bias.detach().contiguous()?, FrozenLinear)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn atan_matches_std_and_its_gradient_is_one_over_one_plus_x2() -> Result<()> {
        let xs = [-5f32, -0.5, 0.0, 0.3, 2.0, 40.0];
        let x = Var::new(&xs[..], &Device::Cpu)?;
        let y = atan(x.as_tensor())?;
        for (a, b) in y.to_vec1::<f32>()?.iter().zip(xs) {
            assert_eq!(*a, b.atan());
        }
        let g = y.sum_all()?.backward()?;
        let gx = g.get(&x).unwrap().to_vec1::<f32>()?;
        for (a, b) in gx.iter().zip(xs) {
            assert!((a - 1.0 / (1.0 + b * b)).abs() < 1e-7);
        }
        Ok(())
    }

    #[test]
    fn frozen_linear_input_gradient_matches_autograd_and_leaves_the_parameters_alone() -> Result<()> {
        let dev = Device::Cpu;
        let (input, output) = (300, 70);
        let w = Var::from_vec((0..output * input).map(|i| ((i * 37 % 101) as f32 - 50.0) / 97.0).collect(), (output, input), &dev)?;
        let b = Var::from_vec((0..output).map(|i| i as f32 * 0.01).collect(), output, &dev)?;
        // 3 rows: the streaming path; 20: sgemm
        for rows in [3, 20] {
            let xv: Vec<f32> = (0..rows * input).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let weights: Tensor = Tensor::from_vec((0..rows * output).map(|i| (i % 5) as f32 - 2.0).collect(), (rows, output), &dev)?;
            let x = Var::from_vec(xv.clone(), (rows, input), &dev)?;
            let y = frozen_linear_tracked(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
            let g = (y.clone() * &weights)?.sum_all()?.backward()?;
            let reference = Var::from_vec(xv, (rows, input), &dev)?;
            let y_ref = reference.as_tensor().matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())?;
            let g_ref = (y_ref.clone() * &weights)?.sum_all()?.backward()?;
            let diff = (y - y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "forward differs by {diff}");
            let (dx, dx_ref) = (g.get(&x).unwrap(), g_ref.get(&reference).unwrap());
            let diff = (dx - dx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "input gradient differs by {diff} at {rows} rows");
            assert!(g.get(&w).is_none() && g.get(&b).is_none(), "frozen parameters got a gradient");
        }
        Ok(())
    }

    #[test]
    fn max_pool_forward_and_backward_route_to_first_max() -> Result<()> {
        // 1x1x3x5 input, window 3 stride 2 -> 1x2 output; windows overlap in column 2.
        let v = [1f32, 2., 9., 0., 1., 0., 0., 0., 0., 8., 3., 3., 0., 7., 0.];
        let x = Var::from_slice(&v, (1, 1, 3, 5), &Device::Cpu)?;
        let y = max_pool2d(x.as_tensor(), 3, 2)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![9., 9.]);
        let g = (y.flatten_all()? * Tensor::new(&[1f32, 10.], &Device::Cpu)?)?.sum_all()?.backward()?;
        let gx = g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let mut want = vec![0f32; 15];
        want[2] = 11.0;
        assert_eq!(gx, want);
        Ok(())
    }

    #[test]
    fn depthwise_matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 9, 10), &dev)?;
        let w = Tensor::randn(0f32, 1., (3, 1, 3, 3), &dev)?;
        for stride in [1, 2] {
            let want = x.conv2d(&w, 0, stride, 1, 3)?;
            let got = depthwise_conv2d(&x, &w, &[0.0; 3], stride, (0, 0, 0, 0), false)?;
            let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "stride {stride}: {diff}");
            // padding fused into the op equals explicit zero padding (asymmetric, TF-SAME style)
            let padded = x.pad_with_zeros(2, 1, 2)?.pad_with_zeros(3, 2, 1)?;
            let want = padded.conv2d(&w, 0, stride, 1, 3)?;
            let got = depthwise_conv2d(&x, &w, &[0.0; 3], stride, (1, 2, 2, 1), false)?;
            let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "padded, stride {stride}: {diff}");
            let wd = Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?;
            let want = padded.conv2d(&wd, 0, stride, 1, 1)?;
            let got = dense_conv2d(&x, &wd, &[0.0; 4], stride, (1, 2, 2, 1), false)?;
            let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "dense, stride {stride}: {diff}");
        }
        // widths and heights that use every tile of the AVX2 kernel (2 rows × 32/16/8 columns,
        // the single last row, masked last columns), with bias and ReLU6
        for (k, stride, h, w) in [(3, 1, 5, 61), (5, 2, 6, 75), (3, 2, 9, 36), (5, 1, 3, 7)] {
            let x = Tensor::randn(0f32, 1., (1, 2, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (2, 1, k, k), &dev)?;
            let bias = [0.5f32, -0.25];
            let p = k / 2;
            let want = conv_bias_relu6(&x, &wt, &bias, (p, p), stride, 2)?;
            let got = depthwise_conv2d(&x, &wt, &bias, stride, (p, p, p, p), true)?;
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want)?;
            assert!(diff < 1e-5, "k{k} s{stride} {h}×{w}: {diff}");
        }
        Ok(())
    }

    /// The reference: candle's conv2d after zero padding (before, after) on both axes, + bias, ReLU6.
    fn conv_bias_relu6(
        x: &Tensor,
        w: &Tensor,
        bias: &[f32],
        (before, after): (usize, usize),
        stride: usize,
        groups: usize,
    ) -> Result<Tensor> {
        let y = x.pad_with_zeros(2, before, after)?.pad_with_zeros(3, before, after)?.conv2d(w, 0, stride, 1, groups)?;
        y.broadcast_add(&Tensor::from_slice(bias, (1, bias.len(), 1, 1), x.device())?)?.clamp(0f32, 6f32)
    }

    #[test]
    fn dense_taps_match_conv2d_on_every_tile() -> Result<()> {
        // the stem's kernel: 4 output channels per tile (8 outputs: two groups; 6: the per-plane
        // path), 24/8/masked columns, several bands of rows, TF-SAME padding, bias and ReLU6
        let dev = Device::Cpu;
        for (o, stride, h, w) in [(8, 2, 38, 77), (8, 1, 19, 33), (4, 2, 8, 16), (6, 2, 21, 50)] {
            let x = Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 0.5, (o, 3, 3, 3), &dev)?;
            let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.3 - 1.0).collect();
            let (t, b) = (if stride == 2 { 0 } else { 1 }, 1);
            let want = conv_bias_relu6(&x, &wt, &bias, (t, b), stride, 1)?;
            let got = dense_conv2d(&x, &wt, &bias, stride, (t, b, t, b), true)?;
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want)?;
            assert!(diff < 1e-5, "{o} outputs, s{stride} {h}×{w}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn frozen_linear_matches_the_definition_for_few_and_many_rows() -> Result<()> {
        // up to 16 rows take `linear_few_rows` (8 lanes for 1-8 rows, 16 for 9-16; 13 outputs =
        // whole tiles of 12 or 6 and then single outputs), more rows take `sgemm`
        let (input, output) = (27, 13);
        let w: Vec<f32> = (0..output * input).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let b: Vec<f32> = (0..output).map(|i| i as f32 * 0.25 - 1.0).collect();
        for rows in [1, 2, 3, 5, 7, 16, 17, 40] {
            let x: Vec<f32> = (0..rows * input).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let dev = &candle_core::Device::Cpu;
            let got = frozen_linear(
                &Tensor::from_slice(&x, (rows, input), dev)?,
                &Tensor::from_slice(&w, (output, input), dev)?,
                &Tensor::from_slice(&b, output, dev)?,
            )?;
            assert_eq!(got.dims(), &[rows, output]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            for r in 0..rows {
                for o in 0..output {
                    let want = b[o] + (0..input).map(|i| x[r * input + i] * w[o * input + i]).sum::<f32>();
                    assert!((got[r * output + o] - want).abs() < 1e-4, "rows {rows}, ({r}, {o}): {} vs {want}", got[r * output + o]);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn subsample_takes_every_factor_th_row_and_column() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 3, 7, 9), &Device::Cpu)?;
        for f in [1, 2, 3] {
            let rows = Tensor::new((0..7 / f).map(|i| (i * f) as u32).collect::<Vec<_>>(), &Device::Cpu)?;
            let cols = Tensor::new((0..9 / f).map(|i| (i * f) as u32).collect::<Vec<_>>(), &Device::Cpu)?;
            let want = x.index_select(&rows, 2)?.index_select(&cols, 3)?;
            let got = subsample(&x, f)?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?, "factor {f}");
        }
        Ok(())
    }

    #[test]
    fn pointwise_matches_matmul_with_bias_relu6_and_residual() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3., (2, 5, 4, 3), &dev)?;
        let w = Tensor::randn(0f32, 1., (7, 5), &dev)?;
        let b = Tensor::randn(0f32, 1., 7, &dev)?;
        let r = Tensor::randn(0f32, 1., (2, 7, 4, 3), &dev)?;
        let want = w.broadcast_matmul(&x.reshape((2, 5, 12))?)?.broadcast_add(&b.reshape((1, 7, 1))?)?.reshape((2, 7, 4, 3))?;
        let want = (want.clamp(0f32, 6f32)? + &r)?;
        let (wv, bv): (std::sync::Arc<[f32]>, std::sync::Arc<[f32]>) =
            (w.flatten_all()?.to_vec1::<f32>()?.into(), b.to_vec1::<f32>()?.into());
        let got = pointwise_conv(&x, &wv, &bv, true, Some(&r))?;
        let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn fused_mbconv_equals_its_three_ops_at_every_band_size() -> Result<()> {
        let dev = Device::Cpu;
        let rnd =
            |n: usize, scale: f32| -> Result<std::sync::Arc<[f32]>> { Ok(Tensor::randn(0f32, scale, n, &dev)?.to_vec1::<f32>()?.into()) };
        // (channels in, expansion, out, kernel, stride, residual, pad, height, width)
        let cases = [
            (4, 6, 4, 3, 1, true, (1, 1, 1, 1), 11, 9),
            (4, 6, 5, 5, 2, false, (1, 2, 1, 2), 13, 11),
            (4, 6, 5, 3, 2, false, (0, 1, 0, 1), 9, 9),
            (6, 1, 3, 3, 2, false, (0, 1, 0, 1), 8, 8),
            (3, 6, 3, 5, 1, true, (2, 2, 2, 2), 7, 12),
        ];
        for (c, ex, o, k, s, residual, pad, h, w) in cases {
            let e = c * ex;
            let expand = if ex == 1 { None } else { Some((rnd(e * c, 0.5)?, rnd(e, 0.5)?)) };
            let m = MbConvWeights {
                expand,
                depthwise: (rnd(e * k * k, 0.5)?, rnd(e, 0.5)?),
                project: (rnd(o * e, 0.5)?, rnd(o, 0.5)?),
                kernel: k,
                stride: s,
                residual,
            };
            let x = Tensor::randn(0f32, 2., (2, c, h, w), &dev)?;
            let hidden = match &m.expand {
                Some((wt, b)) => pointwise_conv(&x, wt, b, true, None)?,
                None => x.clone(),
            };
            let dw = Tensor::from_slice(&m.depthwise.0, (e, 1, k, k), &dev)?;
            let hidden = depthwise_conv2d(&hidden, &dw, &m.depthwise.1, s, pad, true)?;
            let want = pointwise_conv(&hidden, &m.project.0, &m.project.1, false, residual.then_some(&x))?;
            // bands of one output row up to the whole plane
            for band_floats in [1, e * w * (k + s), e * w * 4 * s, usize::MAX / 2] {
                let got = x.apply_op1_no_bwd(&FusedMbConv { w: &m, pad, band_floats })?;
                assert_eq!(got.dims(), want.dims());
                assert!(max_diff(&got, &want)? < 1e-4, "case c{c} k{k} s{s}, band {band_floats}: {}", max_diff(&got, &want)?);
            }
        }
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn fused_kernels_have_the_gradients_of_the_plain_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 2., (2, 3, 9, 10), &dev)?;
        let probe = Tensor::randn(0f32, 1., (2, 3, 5, 5), &dev)?;
        for (stride, pad, depthwise) in [(2, (1, 1, 1, 2), true), (1, (1, 1, 1, 1), true), (2, (1, 1, 0, 1), false)] {
            let o = if depthwise { 3 } else { 4 };
            let w = Tensor::randn(0f32, 1., (o, if depthwise { 1 } else { 3 }, 3, 3), &dev)?;
            let bias = vec![0.5f32; o];
            let x = Var::from_tensor(&x0)?;
            let y = if depthwise {
                depthwise_conv2d(x.as_tensor(), &w, &bias, stride, pad, true)?
            } else {
                dense_conv2d(x.as_tensor(), &w, &bias, stride, pad, true)?
            };
            let (oh, ow) = (y.dim(2)?, y.dim(3)?);
            let probe =
                probe.narrow(1, 0, 3.min(o))?.pad_with_zeros(1, 0, o - 3.min(o))?.narrow(2, 0, oh.min(5))?.narrow(3, 0, ow.min(5))?;
            let probe = probe.pad_with_zeros(2, 0, oh - probe.dim(2)?)?.pad_with_zeros(3, 0, ow - probe.dim(3)?)?;
            let g = (y * &probe)?.sum_all()?.backward()?;
            let got = g.get(x.as_tensor()).unwrap().clone();
            // reference: explicit padding, candle's conv2d, bias, clamp (its backward needs
            // (padded - kernel) divisible by the stride, so the cases above are chosen that way)
            let xr = Var::from_tensor(&x0)?;
            let padded = xr.as_tensor().pad_with_zeros(2, pad.0, pad.1)?.pad_with_zeros(3, pad.2, pad.3)?;
            let yr = padded
                .conv2d(&w, 0, stride, 1, if depthwise { 3 } else { 1 })?
                .broadcast_add(&Tensor::new(bias.as_slice(), &dev)?.reshape((1, o, 1, 1))?)?
                .clamp(0f32, 6f32)?;
            let gr = (yr * &probe)?.sum_all()?.backward()?;
            let want = gr.get(xr.as_tensor()).unwrap();
            assert!(max_diff(&got, want)? < 1e-4, "stride {stride} depthwise {depthwise}: {}", max_diff(&got, want)?);
        }
        // pointwise with ReLU6, and with a residual
        let x = Var::from_tensor(&Tensor::randn(0f32, 3., (2, 5, 4, 3), &dev)?)?;
        let r = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 7, 4, 3), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (7, 5), &dev)?;
        let b = Tensor::randn(0f32, 1., 7, &dev)?;
        let (wv, bv): (std::sync::Arc<[f32]>, std::sync::Arc<[f32]>) =
            (w.flatten_all()?.to_vec1::<f32>()?.into(), b.to_vec1::<f32>()?.into());
        let probe = Tensor::randn(0f32, 1., (2, 7, 4, 3), &dev)?;
        for (relu6, residual) in [(true, false), (false, true)] {
            let y = pointwise_conv(x.as_tensor(), &wv, &bv, relu6, residual.then_some(r.as_tensor()))?;
            let g = (y * &probe)?.sum_all()?.backward()?;
            let mut yr =
                w.broadcast_matmul(&x.as_tensor().reshape((2, 5, 12))?)?.broadcast_add(&b.reshape((1, 7, 1))?)?.reshape((2, 7, 4, 3))?;
            if relu6 {
                yr = yr.clamp(0f32, 6f32)?;
            }
            if residual {
                yr = (yr + r.as_tensor())?;
            }
            let gr = (yr * &probe)?.sum_all()?.backward()?;
            assert!(max_diff(g.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap())? < 1e-4);
            if residual {
                assert!(max_diff(g.get(r.as_tensor()).unwrap(), gr.get(r.as_tensor()).unwrap())? < 1e-6);
            }
        }
        Ok(())
    }
}
