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
fn argmax_windows(x: &[f32], h: usize, w: usize, oh: usize, ow: usize, k: usize, s: usize) -> Vec<usize> {
    let _ = h;
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
            for (dst, i) in o.iter_mut().zip(argmax_windows(plane, h, w, oh, ow, self.k, self.s)) {
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
            for (gi, i) in gp.iter().zip(argmax_windows(plane, h, w, oh, ow, self.k, self.s)) {
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

/// Depthwise convolution (groups = channels) on an already padded NCHW input, with the
/// per-channel bias and optional ReLU6 fused. Weight shape [C, 1, k, k].
struct Depthwise {
    stride: usize,
    bias: Vec<f32>,
    relu6: bool,
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise_conv2d"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "depthwise_conv2d")?;
        let wt = contiguous_f32(s2, l2, "depthwise_conv2d")?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let (wc, _, k, _) = l2.shape().dims4()?;
        if wc != c || h < k || w < k {
            candle_core::bail!("depthwise_conv2d: input {:?} does not fit weight {:?}", l1.shape(), l2.shape())
        }
        let s = self.stride;
        let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
        let mut out = vec![0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, o)| {
            let ch = p % c;
            let plane = &x[p * h * w..(p + 1) * h * w];
            let kern = &wt[ch * k * k..(ch + 1) * k * k];
            let b = self.bias[ch];
            let mut tmp = vec![0f32; if s == 1 { 0 } else { ow }];
            for oy in 0..oh {
                let orow = &mut o[oy * ow..(oy + 1) * ow];
                orow.fill(b);
                for ky in 0..k {
                    let irow = &plane[(oy * s + ky) * w..(oy * s + ky + 1) * w];
                    for kx in 0..k {
                        let wv = kern[ky * k + kx];
                        if s == 1 {
                            for (d, v) in orow.iter_mut().zip(&irow[kx..kx + ow]) {
                                *d += wv * v;
                            }
                        } else {
                            for (ox, t) in tmp.iter_mut().enumerate() {
                                *t = irow[ox * s + kx];
                            }
                            for (d, v) in orow.iter_mut().zip(&tmp) {
                                *d += wv * v;
                            }
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
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// Depthwise k×k convolution with fused bias (and ReLU6). `x` must be padded already.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, bias: &[f32], stride: usize, relu6: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &Depthwise { stride, bias: bias.to_vec(), relu6 })
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
            let got = depthwise_conv2d(&x, &w, &[0.0; 3], stride, false)?;
            let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "stride {stride}: {diff}");
        }
        Ok(())
    }
}
