//! Tensor operations candle lacks, as CPU custom ops: `atan` (with backward), overlapping
//! max-pool with a backward pass, and a fast depthwise convolution.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 tensors are supported")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// dst += a·src, with AVX2+FMA when the processor has them (checked once).
fn axpy(dst: &mut [f32], src: &[f32], a: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *FAST.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            // SAFETY: the features were detected on this processor.
            return unsafe { axpy_avx2(dst, src, a) };
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d += a * s;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(dst: &mut [f32], src: &[f32], a: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.mul_add(a, *d);
    }
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

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "max_pool2d")?;
        let (planes, h, w, oh, ow) = pool_dims(l, self.k, self.s)?;
        let mut out = vec![0f32; planes * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, o)| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            for (dst, i) in o.iter_mut().zip(argmax_windows(plane, w, oh, ow, self.k, self.s)) {
                *dst = plane[i];
            }
        });
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
        // Every input plane is copied once into a zero-padded buffer split into `s` column
        // phases (phase r holds padded columns r, r+s, ...), so all inner loops are contiguous.
        let pw = wp.div_ceil(s);
        let plane_len = s * hp * pw;
        let mut phases = vec![0f32; n * c * plane_len];
        phases.par_chunks_mut(plane_len).enumerate().for_each(|(p, ph)| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            for r in 0..s {
                // phase r, padded column j*s + r = input column j*s + r - pl
                let first = if r >= pl { 0 } else { (pl - r).div_ceil(s) };
                for y in 0..h {
                    let row = &plane[y * w..(y + 1) * w];
                    let dst = &mut ph[(r * hp + y + pt) * pw..(r * hp + y + pt + 1) * pw];
                    for (j, d) in dst.iter_mut().enumerate().skip(first) {
                        let col = j * s + r - pl;
                        if col >= w {
                            break;
                        }
                        *d = row[col];
                    }
                }
            }
        });
        let mut out = vec![0f32; n * o * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, out_plane)| {
            let (b, oc) = (p / o, p % o);
            let inputs = if self.depthwise { oc..oc + 1 } else { 0..c };
            for oy in 0..oh {
                let orow = &mut out_plane[oy * ow..(oy + 1) * ow];
                orow.fill(self.bias[oc]);
                for (j, ic) in inputs.clone().enumerate() {
                    let ph = &phases[(b * c + ic) * plane_len..(b * c + ic + 1) * plane_len];
                    let kern = &wt[(oc * wc + j) * k * k..(oc * wc + j + 1) * k * k];
                    for ky in 0..k {
                        for kx in 0..k {
                            let base = ((kx % s) * hp + oy * s + ky) * pw + kx / s;
                            axpy(orow, &ph[base..base + ow], kern[ky * k + kx]);
                        }
                    }
                }
                if self.relu6 {
                    for d in orow.iter_mut() {
                        *d = d.clamp(0.0, 6.0);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, o, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, weight: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = if self.relu6 { (grad * relu6_mask(res)?)? } else { grad.clone() };
        let (_, _, h, w) = x.dims4()?;
        let back = DirectConvInputGrad { stride: self.stride, pad: self.pad, depthwise: self.depthwise, h, w };
        // the weights are frozen: no gradient for them
        Ok((Some(g.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &back)?), None))
    }
}

/// 1 where 0 < v < 6 (ReLU6 passes the gradient), else 0.
fn relu6_mask(v: &Tensor) -> Result<Tensor> {
    let on = v.gt(0f32)?.to_dtype(candle_core::DType::F32)?;
    on.mul(&v.lt(6f32)?.to_dtype(candle_core::DType::F32)?)
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
                for oy in 0..oh {
                    for ox in 0..ow {
                        let gv = gplane[oy * ow + ox];
                        if gv == 0.0 {
                            continue;
                        }
                        for ky in 0..k {
                            let row = &mut gp[(oy * s + ky) * wp + ox * s..(oy * s + ky) * wp + ox * s + k];
                            for (d, kv) in row.iter_mut().zip(&kern[ky * k..(ky + 1) * k]) {
                                *d += kv * gv;
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
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, bias: &[f32], stride: usize, pad: (usize, usize, usize, usize), relu6: bool) -> Result<Tensor> {
    let op = DirectConv { stride, pad, bias: bias.to_vec(), relu6, depthwise: true };
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// Dense k×k convolution for few input channels (EfficientNet's stem), same fusion as above.
pub fn dense_conv2d(x: &Tensor, weight: &Tensor, bias: &[f32], stride: usize, pad: (usize, usize, usize, usize), relu6: bool) -> Result<Tensor> {
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
        let g = if self.relu6 { (grad * relu6_mask(pre)?)? } else { grad.clone() };
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
        (0..n * tiles).into_par_iter().for_each(|job| {
            let (b, t) = (job / tiles, job % tiles);
            let (c0, cols) = (t * TILE, TILE.min(hw - t * TILE));
            let base = b * o * hw + c0;
            // SAFETY: every job writes a disjoint column range [c0, c0+cols) of its image's rows.
            let d = dst.get();
            unsafe {
                for (r, &bv) in self.bias.iter().enumerate() {
                    std::slice::from_raw_parts_mut(d.add(base + r * hw), cols).fill(bv);
                }
                gemm::gemm(
                    o, cols, c,
                    d.add(base), 1, hw as isize, true,
                    self.weight.as_ptr(), 1, c as isize,
                    x.as_ptr().add(b * c * hw + c0), 1, hw as isize,
                    1.0, 1.0, false, false, false,
                    gemm::Parallelism::None,
                );
                for r in 0..o {
                    let row = std::slice::from_raw_parts_mut(d.add(base + r * hw), cols);
                    if self.relu6 {
                        row.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
                    }
                    if let Some(res) = residual {
                        row.iter_mut().zip(&res[base + r * hw..base + r * hw + cols]).for_each(|(v, x)| *v += x);
                    }
                }
            }
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
pub fn pointwise_conv(x: &Tensor, weight: &std::sync::Arc<[f32]>, bias: &std::sync::Arc<[f32]>, relu6: bool, residual: Option<&Tensor>) -> Result<Tensor> {
    let op = Pointwise { weight: weight.clone(), bias: bias.clone(), relu6 };
    let x = x.contiguous()?;
    match residual {
        Some(r) => x.apply_op2(&r.contiguous()?, op),
        None => x.apply_op1(op),
    }
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
        let (wv, bv): (std::sync::Arc<[f32]>, std::sync::Arc<[f32]>) = (w.flatten_all()?.to_vec1::<f32>()?.into(), b.to_vec1::<f32>()?.into());
        let got = pointwise_conv(&x, &wv, &bv, true, Some(&r))?;
        let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
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
            let probe = probe.narrow(1, 0, 3.min(o))?.pad_with_zeros(1, 0, o - 3.min(o))?.narrow(2, 0, oh.min(5))?.narrow(3, 0, ow.min(5))?;
            let probe = probe.pad_with_zeros(2, 0, oh - probe.dim(2)?)?.pad_with_zeros(3, 0, ow - probe.dim(3)?)?;
            let g = (y * &probe)?.sum_all()?.backward()?;
            let got = g.get(x.as_tensor()).unwrap().clone();
            // reference: explicit padding, candle's conv2d, bias, clamp (its backward needs
            // (padded - kernel) divisible by the stride, so the cases above are chosen that way)
            let xr = Var::from_tensor(&x0)?;
            let padded = xr.as_tensor().pad_with_zeros(2, pad.0, pad.1)?.pad_with_zeros(3, pad.2, pad.3)?;
            let yr = padded.conv2d(&w, 0, stride, 1, if depthwise { 3 } else { 1 })?.broadcast_add(&Tensor::new(bias.as_slice(), &dev)?.reshape((1, o, 1, 1))?)?.clamp(0f32, 6f32)?;
            let gr = (yr * &probe)?.sum_all()?.backward()?;
            let want = gr.get(xr.as_tensor()).unwrap();
            assert!(max_diff(&got, want)? < 1e-4, "stride {stride} depthwise {depthwise}: {}", max_diff(&got, want)?);
        }
        // pointwise with ReLU6, and with a residual
        let x = Var::from_tensor(&Tensor::randn(0f32, 3., (2, 5, 4, 3), &dev)?)?;
        let r = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 7, 4, 3), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (7, 5), &dev)?;
        let b = Tensor::randn(0f32, 1., 7, &dev)?;
        let (wv, bv): (std::sync::Arc<[f32]>, std::sync::Arc<[f32]>) = (w.flatten_all()?.to_vec1::<f32>()?.into(), b.to_vec1::<f32>()?.into());
        let probe = Tensor::randn(0f32, 1., (2, 7, 4, 3), &dev)?;
        for (relu6, residual) in [(true, false), (false, true)] {
            let y = pointwise_conv(x.as_tensor(), &wv, &bv, relu6, residual.then_some(r.as_tensor()))?;
            let g = (y * &probe)?.sum_all()?.backward()?;
            let mut yr = w.broadcast_matmul(&x.as_tensor().reshape((2, 5, 12))?)?.broadcast_add(&b.reshape((1, 7, 1))?)?.reshape((2, 7, 4, 3))?;
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
