//! A whole inverted-residual block (MBConv: expand, depthwise, project) computed band by band so
//! the expanded tensor stays in cache; forward only (gradients go through the unfused ops).

use super::contiguous_f32;
use super::direct_conv::{accumulate_taps, OnCopy, PlaneGeometry};
#[cfg(target_arch = "x86_64")]
use super::has_avx2_fma;
use super::pointwise::store_rows;
use super::sgemm::{sgemm_with, Backend::Rust};
use super::SharedMut;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{dense_conv2d, depthwise_conv2d, max_diff, pointwise_conv};
    use candle_core::{Device, Var};

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
