//! Direct convolutions by taps over polyphase planes: depthwise k×k and small dense (the stem)
//! with fused bias and ReLU6, their input gradients, and the ReLU6 gradient; AVX2 beside portable.

use super::contiguous_f32;
#[cfg(target_arch = "x86_64")]
use super::has_avx2_fma;
use super::SharedMut;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Sizes of one plane of a direct convolution. The zero-padded input plane (hp × wp) is stored
/// split into `s` column phases (phase r holds padded columns r, r+s, ...; pw columns each), so
/// every tap reads a contiguous run of its input row whatever the stride.
pub(super) struct PlaneGeometry {
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: usize,
    pub(super) s: usize,
    pub(super) pt: usize,
    pub(super) pl: usize,
    pub(super) hp: usize,
    pub(super) pw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
}

impl PlaneGeometry {
    fn phases_len(&self) -> usize {
        self.s * self.hp * self.pw
    }

    /// Where each tap t = (ky, kx) reads its input row, from the start of an output row's:
    /// the same for every channel, so computed once per plane geometry.
    pub(super) fn tap_offsets(&self) -> Vec<usize> {
        let PlaneGeometry { k, s, hp, pw, .. } = *self;
        (0..k * k).map(|t| ((t % k) % s * hp + t / k) * pw + (t % k) / s).collect()
    }

    /// Writes the padded, phase-split copy of `plane` into `dst` (resized as needed), each value
    /// passed through `on_copy` (the padding stays zero).
    #[inline(always)]
    pub(super) fn fill_phases(&self, plane: &[f32], dst: &mut Vec<f32>, on_copy: OnCopy) {
        dst.resize(self.phases_len(), 0.0);
        self.fill_phases_into(plane, dst, on_copy)
    }

    /// [`Self::fill_phases`] into a slice of exactly `phases_len()` values. Only the padding is
    /// zeroed; every other value is written once.
    #[inline(always)]
    pub(super) fn fill_phases_into(&self, plane: &[f32], dst: &mut [f32], on_copy: OnCopy) {
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
pub(super) enum OnCopy {
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
pub(super) fn accumulate_taps(
    out: &mut [f32],
    phases: &[f32],
    kernel: &[f32],
    offsets: &[usize],
    g: &PlaneGeometry,
    init: Option<f32>,
    relu6: bool,
) {
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
pub(super) fn relu6_grad(grad: &Tensor, v: &Tensor) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_diff;
    use candle_core::Device;

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
}
